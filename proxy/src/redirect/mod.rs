//! Kernel-side redirection: loads sluice's eBPF programs with aya, attaches them to the cgroup
//! under which the node's pods live, and owns the maps they share with user space.
//!
//! Ownership: one [`Redirector`] per daemon. The control path (enrollment) writes `ENROLLED`
//! and `CONFIG`; the data path only calls [`Redirector::take_original`], a single lock-free
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` syscall on `ORIG_BY_TUPLE`.

mod owners;
mod pins;
mod rawmap;

pub use owners::CaptureOwner;
use owners::InboundOwners;
use rawmap::RawMap;

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        CgroupSockAddr, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use sluice_common::{config, counter, names, AddrKey, ConnKey, OrigDst, PodEntry, SockKey, AF_INET, AF_INET6};
use thiserror::Error;
use tracing::{info, warn};

pub use pins::remove_pins;

/// The compiled kernel programs, embedded at build time (see build.rs).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice.bpf.o"));

/// Cgroup bpf_links are always multi-attach in the kernel and reject any flag, so the mode
/// passed must be the flag-less default; several sluice instances (and other tools) can still
/// attach to the same cgroup.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// A heartbeat older than this means sluice is gone (fail-open/closed kicks in).
const HEARTBEAT_STALE_AFTER: Duration = Duration::from_millis(3000);

#[derive(Debug, Error)]
pub enum RedirectError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {reason}")]
    Map { name: &'static str, reason: String },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning under {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    /// Another enrolled pod's plaintext to this address is captured already (link-local
    /// addresses are unique per link only, not per node).
    #[error("address {addr} is captured for pod {holder} already; two pods of a node cannot share an address")]
    AddressTaken { addr: IpAddr, holder: String },
}

/// How sluice behaves for enrolled pods while it is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Connections pass through unchanged (the default).
    Open,
    /// Connections are refused (ECONNREFUSED) until sluice is back.
    Closed,
}

pub struct RedirectConfig {
    /// Node name: names the pin directory.
    pub node: String,
    /// The cgroup (v2) the programs are attached to: the parent of all pod cgroups.
    pub attach_cgroup: PathBuf,
    /// cgroup v2 id of sluice's own cgroup.
    pub self_cgroup_id: u64,
    pub fail_mode: FailMode,
    /// bpffs mount point (pins go to `<bpffs>/sluice/<node>/`).
    pub bpffs: PathBuf,
}

/// One attached program, as reported by the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct AttachedProgram {
    pub name: &'static str,
    pub attach_type: &'static str,
    pub id: u32,
    pub link_id: Option<u32>,
    pub pinned: bool,
}

pub struct Redirector {
    // Owns the programs (and, in fail-open mode, their links: dropping it detaches them).
    // Locked only on the control path (attaching the inbound program to a pod's netns).
    ebpf: Mutex<Ebpf>,
    /// `INBOUND`, with the pod each entry was registered for.
    inbound: Mutex<(SockHash<MapData, AddrKey>, InboundOwners)>,
    _pinned: Vec<PinnedLink>,
    config: Mutex<Array<MapData, u64>>,
    /// Set by [`Redirector::mark_dead`]: the heartbeat stays silent from then on. Read and
    /// written under the `config` lock, so a beat cannot land after the stop.
    stopped: AtomicBool,
    enrolled: Mutex<HashMap<MapData, u64, PodEntry>>,
    counters: PerCpuArray<MapData, u64>,
    /// The data path's lookup-and-delete of original destinations (layout checked at load).
    orig_by_tuple: RawMap<ConnKey, OrigDst>,
    /// DELIVERING, updated around each delivery connect.
    delivering: RawMap<SockKey, u8>,
    programs: Vec<AttachedProgram>,
    fail_mode: FailMode,
}

/// Attach types, in the order the programs are attached.
const SOCK_ADDR_PROGRAMS: [(&str, &str); 4] = [
    (names::PROG_CONNECT4, "cgroup/connect4"),
    (names::PROG_CONNECT6, "cgroup/connect6"),
    (names::PROG_GETPEERNAME4, "cgroup/getpeername4"),
    (names::PROG_GETPEERNAME6, "cgroup/getpeername6"),
];

impl Redirector {
    /// Loads the programs, attaches them to `cfg.attach_cgroup` and starts the heartbeat
    /// at "alive". Returns the redirector and the aya-log reader (poll it to forward the
    /// programs' log lines into tracing).
    pub fn load_and_attach(
        cfg: &RedirectConfig,
    ) -> Result<(Self, aya_log::EbpfLogger<&'static dyn log::Log>), RedirectError> {
        // Kernel-side log lines cost a ring-buffer write each: only the levels that sluice's
        // own filter lets through for target `sluice_ebpf` are compiled in at load time.
        let kernel_log_level = kernel_log_level();
        // The maps are pinned per node and reused by the next process of the node.
        pins::ensure_bpffs(&cfg.bpffs).map_err(|reason| RedirectError::Pin { path: cfg.bpffs.clone(), reason })?;
        let maps_dir = pins::maps_dir(&cfg.bpffs, &cfg.node);
        std::fs::create_dir_all(&maps_dir)
            .map_err(|e| RedirectError::Pin { path: maps_dir.clone(), reason: e.to_string() })?;
        let reused = std::fs::read_dir(&maps_dir).map(|d| d.count()).unwrap_or(0) > 0;
        let mut ebpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &kernel_log_level, true)
            .default_map_pin_directory(&maps_dir)
            .load(BPF_OBJECT)
            .map_err(RedirectError::Load)?;
        if reused {
            info!(dir = %maps_dir.display(), "reusing the maps of a previous sluice process of this node");
        }
        // Before loading any program: the programs reference the log map.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).map_err(|e| RedirectError::Map {
            name: "AYA_LOGS",
            reason: e.to_string(),
        })?;

        let cgroup = File::open(&cfg.attach_cgroup).map_err(|source| RedirectError::Cgroup {
            path: cfg.attach_cgroup.clone(),
            source,
        })?;

        let mut config: Array<MapData, u64> = take_map(&mut ebpf, names::MAP_CONFIG)?;
        let fail_closed = u64::from(cfg.fail_mode == FailMode::Closed);
        for (slot, value) in [
            (config::SELF_CGROUP, cfg.self_cgroup_id),
            (config::FAIL_CLOSED, fail_closed),
            (config::STALE_AFTER_NS, HEARTBEAT_STALE_AFTER.as_nanos() as u64),
            (config::HEARTBEAT_NS, boottime_ns()),
            (config::OWNER_PID, u64::from(std::process::id())),
        ] {
            config.set(slot, value, 0).map_err(|e| map_err(names::MAP_CONFIG, e))?;
        }
        let enrolled: HashMap<MapData, u64, PodEntry> = take_map(&mut ebpf, names::MAP_ENROLLED)?;
        let counters: PerCpuArray<MapData, u64> = take_map(&mut ebpf, names::MAP_COUNTERS)?;
        let inbound: SockHash<MapData, AddrKey> = take_map(&mut ebpf, names::MAP_INBOUND)?;
        let orig_by_tuple = take_raw_lru(&mut ebpf, names::MAP_ORIG_BY_TUPLE)?;
        let delivering = take_raw_lru(&mut ebpf, names::MAP_DELIVERING)?;

        let mut fd_links: Vec<(&'static str, &'static str, FdLink)> = Vec::new();
        for (name, attach_type) in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|source| RedirectError::Program { name, source })?;
            let link = prog
                .attach(&cgroup, ATTACH_MODE)
                .map_err(|source| RedirectError::Program { name, source })?;
            if cfg.fail_mode == FailMode::Closed {
                let link = prog.take_link(link).map_err(|source| RedirectError::Program { name, source })?;
                let fd_link: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| {
                    RedirectError::Pin { path: cfg.bpffs.clone(), reason: e.to_string() }
                })?;
                fd_links.push((name, attach_type, fd_link));
            }
        }
        {
            let name = names::PROG_SOCKOPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            prog.load().map_err(|source| RedirectError::Program { name, source })?;
            let link = prog
                .attach(&cgroup, ATTACH_MODE)
                .map_err(|source| RedirectError::Program { name, source })?;
            if cfg.fail_mode == FailMode::Closed {
                let link = prog.take_link(link).map_err(|source| RedirectError::Program { name, source })?;
                let fd_link: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| {
                    RedirectError::Pin { path: cfg.bpffs.clone(), reason: e.to_string() }
                })?;
                fd_links.push((name, "sockops", fd_link));
            }
        }

        // The inbound program is loaded now and attached per pod network namespace later.
        {
            let name = names::PROG_INBOUND;
            let prog: &mut SkLookup = program(&mut ebpf, name)?;
            prog.load().map_err(|source| RedirectError::Program { name, source })?;
        }

        // The new programs are attached: now drop the links a previous fail-closed sluice of
        // this node left pinned, so that there is never a moment without redirection.
        let pin_dir = pins::pin_dir(&cfg.bpffs, &cfg.node);
        if let Err(e) = pins::remove_stale(&cfg.bpffs, &cfg.node) {
            warn!(dir = %pin_dir.display(), error = %e, "could not remove previous pins");
        }
        let links_dir = pins::links_dir(&cfg.bpffs, &cfg.node);

        let mut programs = Vec::new();
        let mut pinned = Vec::new();
        if cfg.fail_mode == FailMode::Closed {
            // Fail-closed: the links must outlive this process, so they are pinned in bpffs.
            std::fs::create_dir_all(&links_dir).map_err(|e| RedirectError::Pin {
                path: links_dir.clone(),
                reason: e.to_string(),
            })?;
            for (name, attach_type, link) in fd_links {
                let info = link.info().ok();
                let path = links_dir.join(name);
                let pinned_link = link.pin(&path).map_err(|e| RedirectError::Pin {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                programs.push(AttachedProgram {
                    name,
                    attach_type,
                    id: info.as_ref().map(|i| i.program_id()).unwrap_or(0),
                    link_id: info.as_ref().map(|i| i.id()),
                    pinned: true,
                });
                pinned.push(pinned_link);
            }
        } else {
            for (name, attach_type) in SOCK_ADDR_PROGRAMS.iter().copied().chain([(names::PROG_SOCKOPS, "sockops")]) {
                let id = ebpf
                    .program(name)
                    .and_then(|p| p.info().ok())
                    .map(|i| i.id())
                    .unwrap_or(0);
                programs.push(AttachedProgram { name, attach_type, id, link_id: None, pinned: false });
            }
        }
        // The inbound program is attached per enrolled pod's network namespace, not here.
        let inbound_id = ebpf.program(names::PROG_INBOUND).and_then(|p| p.info().ok()).map(|i| i.id()).unwrap_or(0);
        programs.push(AttachedProgram {
            name: names::PROG_INBOUND,
            attach_type: "sk_lookup (per pod netns)",
            id: inbound_id,
            link_id: None,
            pinned: false,
        });
        info!(
            cgroup = %cfg.attach_cgroup.display(),
            fail_mode = ?cfg.fail_mode,
            programs = programs.len(),
            "eBPF programs attached"
        );

        Ok((
            Self {
                ebpf: Mutex::new(ebpf),
                inbound: Mutex::new((inbound, InboundOwners::default())),
                _pinned: pinned,
                config: Mutex::new(config),
                stopped: AtomicBool::new(false),
                enrolled: Mutex::new(enrolled),
                counters,
                orig_by_tuple,
                delivering,
                programs,
                fail_mode: cfg.fail_mode,
            },
            logger,
        ))
    }

    /// Refreshes the liveness entry the programs check before redirecting (unless this
    /// process is stopping). (During a handover both processes beat; that is fine, either one
    /// alive means sluice is alive.)
    pub fn heartbeat(&self) {
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = config.set(config::HEARTBEAT_NS, boottime_ns(), 0) {
            warn!(error = %e, "cannot refresh the heartbeat in the eBPF config map");
        }
    }

    /// Stops this process's heartbeat for good (graceful stop) and marks sluice as gone right
    /// away, instead of waiting for staleness, unless a newer sluice process of this node has
    /// taken over the (shared) maps. Returns whether it marked sluice gone.
    pub fn mark_dead(&self) -> bool {
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        self.stopped.store(true, Ordering::Relaxed);
        let owner = config.get(&config::OWNER_PID, 0).unwrap_or(0);
        if owner != u64::from(std::process::id()) {
            drop(config);
            info!(successor_pid = owner, "a newer sluice process owns this node; leaving it in charge");
            return false;
        }
        if let Err(e) = config.set(config::HEARTBEAT_NS, 0, 0) {
            warn!(error = %e, "cannot clear the heartbeat in the eBPF config map; the kernel will notice sluice is gone when it goes stale");
        }
        true
    }

    /// Whether this process is still the node's owner (no successor started).
    pub fn is_owner(&self) -> bool {
        let config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        config.get(&config::OWNER_PID, 0).unwrap_or(0) == u64::from(std::process::id())
    }

    /// Starts redirecting connections made from `cgroup_id` (and its descendants).
    pub fn enroll(&self, cgroup_id: u64, pod_id: u32) -> Result<(), RedirectError> {
        let mut enrolled = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        enrolled
            .insert(cgroup_id, PodEntry { pod_id, flags: 0 }, 0)
            .map_err(|e| map_err(names::MAP_ENROLLED, e))
    }

    /// Stops redirecting new connections from `cgroup_id`. Open connections are unaffected.
    pub fn release(&self, cgroup_id: u64) -> Result<(), RedirectError> {
        let mut enrolled = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        match enrolled.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MAP_ENROLLED, e)),
        }
    }

    /// Attaches the inbound-capture program to a pod's network namespace. The link detaches
    /// when the returned value is dropped (pod released, or sluice gone).
    pub fn attach_inbound(&self, netns: std::os::fd::BorrowedFd<'_>) -> Result<FdLink, RedirectError> {
        let name = names::PROG_INBOUND;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let prog: &mut SkLookup = program(&mut ebpf, name)?;
        let id = prog.attach(netns).map_err(|source| RedirectError::Program { name, source })?;
        let link = prog.take_link(id).map_err(|source| RedirectError::Program { name, source })?;
        // sk_lookup links are always bpf_links, so this conversion cannot fail.
        let link: FdLink = match link.try_into() {
            Ok(l) => l,
            Err(never) => match never {},
        };
        Ok(link)
    }

    /// Makes `listener` the socket that receives captured plaintext connections to `pod_ip`
    /// (one of `owner`'s addresses; the listener must be of the same family). The kernel drops
    /// the entry by itself when the socket closes. Refused if another pod holds the address:
    /// taking it over would silently end that pod's capture.
    pub fn register_inbound(
        &self,
        pod_ip: IpAddr,
        listener: &impl AsRawFd,
        owner: &CaptureOwner,
    ) -> Result<(), RedirectError> {
        let key = addr_key(pod_ip);
        let mut inbound = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let (map, owners) = &mut *inbound;
        if let Some(holder) = owners.taken_by(pod_ip, owner) {
            let holder = holder.pod.to_string();
            return Err(RedirectError::AddressTaken { addr: pod_ip.to_canonical(), holder });
        }
        map.insert(key, listener.as_raw_fd(), 0).map_err(|e| map_err(names::MAP_INBOUND, e))?;
        owners.record(pod_ip, owner);
        Ok(())
    }

    /// Stops capturing plaintext to `pod_ip` for `owner` (its listener may stay open a moment
    /// longer). An entry another pod registered since is left alone; returns whether the
    /// entry was `owner`'s.
    pub fn unregister_inbound(&self, pod_ip: IpAddr, owner: &CaptureOwner) -> bool {
        let key = addr_key(pod_ip);
        let mut inbound = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let (map, owners) = &mut *inbound;
        if !owners.release(pod_ip, owner) {
            return false;
        }
        let _ = map.remove(&key);
        true
    }

    /// Exempts sluice's own delivery connection from `source` from inbound capture, until
    /// [`Self::delivery_done`]. (Its SYN carries the client's address, so only the exact
    /// source address and port tell it apart from the client's own connections.)
    pub fn delivery_started(&self, source: SocketAddr) {
        let key = delivery_key(source);
        if let Err(e) = self.delivering.update(&key, &1u8) {
            warn!(%source, error = %e, "cannot exempt a delivery from capture");
        }
    }

    pub fn delivery_done(&self, source: SocketAddr) {
        let _ = self.delivering.delete(&delivery_key(source));
    }

    /// The original destination of a connection accepted on pod `pod_id`'s outbound listener
    /// from `client` (its peer address), removing the record. `None` if the kernel did not
    /// redirect this connection.
    pub fn take_original(&self, pod_id: u32, client: SocketAddr) -> Option<OrigDstAddr> {
        let key = conn_key(pod_id, client);
        match self.orig_by_tuple.lookup_and_delete(&key) {
            Ok(Some(value)) => Some(OrigDstAddr::from(value)),
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "original destination lookup failed");
                None
            }
        }
    }

    /// Kernel counters, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        const NAMES: [(u32, &str); counter::LEN as usize] = [
            (counter::REDIRECTED, "redirected"),
            (counter::FAIL_OPEN, "fail_open_passthrough"),
            (counter::FAIL_CLOSED, "fail_closed_refused"),
            (counter::PEERNAME_REWRITTEN, "getpeername_rewritten"),
            (counter::TUPLE_RECORDED, "connections_recorded"),
            (counter::MAP_ERRORS, "map_errors"),
            (counter::INBOUND_CAPTURED, "inbound_captured"),
            (counter::LINK_LOCAL_PASSED, "link_local_passed_through"),
        ];
        NAMES
            .iter()
            .map(|(slot, name)| {
                let total = self
                    .counters
                    .get(slot, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (*name, total)
            })
            .collect()
    }

    pub fn programs(&self) -> &[AttachedProgram] {
        &self.programs
    }

    pub fn fail_mode(&self) -> FailMode {
        self.fail_mode
    }
}

/// An original destination as user space uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr {
    pub addr: SocketAddr,
    pub pod_id: u32,
    pub cgroup_id: u64,
}

impl From<OrigDst> for OrigDstAddr {
    fn from(v: OrigDst) -> Self {
        let ip = if v.family == AF_INET6 {
            let mut octets = [0u8; 16];
            for (i, word) in v.addr.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        } else {
            IpAddr::V4(Ipv4Addr::from(v.addr[0].to_ne_bytes()))
        };
        Self { addr: SocketAddr::new(ip, v.port), pod_id: v.pod_id, cgroup_id: v.cgroup_id }
    }
}

/// An address as the programs hold it: network byte order words (IPv4 in the first), and its
/// family. An IPv4-mapped IPv6 address is IPv4, as the kernel sees such traffic.
fn words(ip: IpAddr) -> ([u32; 4], u16) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
            }
            (w, AF_INET6)
        }
    }
}

fn addr_key(ip: IpAddr) -> AddrKey {
    let (addr, family) = words(ip);
    AddrKey { addr, family: u32::from(family) }
}

fn delivery_key(source: SocketAddr) -> SockKey {
    let (addr, family) = words(source.ip());
    SockKey { addr, port: source.port(), family }
}

/// The `ORIG_BY_TUPLE` key for a client as the listener sees it. An IPv4-mapped IPv6 peer is
/// keyed as IPv4, as the kernel side records it.
pub fn conn_key(pod_id: u32, client: SocketAddr) -> ConnKey {
    let mut key = ConnKey { pod_id, port: client.port(), family: AF_INET, addr: [0; 4] };
    match client.ip() {
        IpAddr::V4(v4) => key.addr[0] = u32::from_ne_bytes(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => key.addr[0] = u32::from_ne_bytes(v4.octets()),
            None => {
                key.family = AF_INET6;
                let o = v6.octets();
                for (i, word) in key.addr.iter_mut().enumerate() {
                    *word = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
                }
            }
        },
    }
    key
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(RedirectError::Program {
        name,
        source: aya::programs::ProgramError::InvalidName { name: name.to_string() },
    })?;
    prog.try_into().map_err(|source| RedirectError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| RedirectError::Map {
        name,
        reason: "missing from the eBPF object".into(),
    })?;
    T::try_from(map).map_err(|e| map_err(name, e))
}

/// An LRU hash map the data path uses through raw `bpf(2)` calls, its key and value sizes
/// checked against `K` and `V`.
fn take_raw_lru<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<RawMap<K, V>, RedirectError> {
    match ebpf.take_map(name) {
        Some(aya::maps::Map::LruHashMap(data)) => {
            RawMap::new(data).map_err(|e| RedirectError::Map { name, reason: e.to_string() })
        }
        _ => Err(RedirectError::Map { name, reason: "missing from the object or not an LRU hash".into() }),
    }
}

fn map_err(name: &'static str, e: aya::maps::MapError) -> RedirectError {
    RedirectError::Map { name, reason: e.to_string() }
}

/// The aya-log level (1 = error … 5 = trace) matching what tracing lets through for the
/// kernel programs' log target.
fn kernel_log_level() -> u8 {
    use tracing::{enabled, Level};
    if enabled!(target: "sluice_ebpf", Level::TRACE) {
        5
    } else if enabled!(target: "sluice_ebpf", Level::DEBUG) {
        4
    } else if enabled!(target: "sluice_ebpf", Level::INFO) {
        3
    } else if enabled!(target: "sluice_ebpf", Level::WARN) {
        2
    } else {
        1
    }
}

/// CLOCK_BOOTTIME in nanoseconds: the clock `bpf_ktime_get_boot_ns` reads.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where a node's pins live (for the CLI's cleanup and the admin view).
pub fn pin_dir(bpffs: &Path, node: &str) -> PathBuf {
    pins::pin_dir(bpffs, node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_key_normalises_v4_mapped_peers() {
        let v4: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(conn_key(7, v4), conn_key(7, mapped));
        let k = conn_key(7, v4);
        assert_eq!(k.family, AF_INET);
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port, 40000);
    }

    #[test]
    fn conn_key_keeps_real_v6() {
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        let k = conn_key(1, v6);
        assert_eq!(k.family, AF_INET6);
        assert_eq!(k.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn orig_dst_round_trips_addresses() {
        let d = OrigDst {
            addr: [u32::from_ne_bytes([10, 96, 0, 10]), 0, 0, 0],
            port: 80,
            family: AF_INET,
            pod_id: 3,
            cgroup_id: 9,
        };
        let a = OrigDstAddr::from(d);
        assert_eq!(a.addr, "10.96.0.10:80".parse().unwrap());
        assert_eq!((a.pod_id, a.cgroup_id), (3, 9));
    }
}
