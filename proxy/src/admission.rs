//! Admission: the bounds that keep one pod (or one peer) from taking the node proxy's file
//! descriptors and memory from every other pod of the node.
//!
//! sluice is one process for the whole node, so its `RLIMIT_NOFILE` and its memory are shared
//! by everyone. Admission counts **every socket sluice holds for traffic**: the client sockets
//! it accepts, the upstream and tunnel sockets it dials (pooled or not, idle or busy), the
//! delivery sockets it opens into destination pods. Each is a unit, taken before the socket is
//! made and given back when it closes. The bounds:
//!
//! - **node-wide**: `2 × --max-connections` sockets, the cap derived from `RLIMIT_NOFILE` and
//!   the cgroup's memory limit ([`derive`]);
//! - **per source pod** (outbound): `--pod-max-connections` client connections from it, and as
//!   many sockets dialled on its behalf (its idle pooled connections and tunnels included, so
//!   they come out of its own share; when it is at its bound, its idle pooled connections are
//!   closed to make room before anything is refused);
//! - **per destination pod** (inbound to an enrolled pod of this node: captured plaintext on
//!   15006 and HBONE streams on 15008), in connections;
//! - **per peer** (inbound, node-wide), in connections: its verified SPIFFE identity for HBONE,
//!   else the pod its address belongs to, else its address (IPv6: its /64) ([`PeerKey`]).
//!
//! Flags stay in connections, a proxied connection being two sockets (the client's and
//! sluice's upstream or delivery socket). A connection or dial over a bound is refused at once
//! (a reset, an HTTP 503 overflow, an HBONE 503) and counted; the defaults divide the node-wide
//! cap so that one pod, or one peer, can never take it all.

mod derive;
mod peer;

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

pub use derive::{own_memory_limit, BoundBy, Derivation, CONNECTION_MEMORY};
pub use peer::PeerKey;

const PEER_SHARDS: usize = 16;
/// After closing idle connections found nothing to close, do not look again for this long
/// (a pod hammering its bound must not make every attempt walk the pools).
const SHED_QUIET: Duration = Duration::from_millis(50);

/// The effective limits. The flags' values are in connections; `max_sockets` is what the
/// node-wide bound counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AdmissionConfig {
    /// Node-wide proxied connections (outbound and inbound together): `max_sockets / 2`.
    pub max_connections: u32,
    /// Per enrolled source pod, outbound: client connections, and as many dialled sockets.
    pub pod_max_connections: u32,
    /// Per enrolled destination pod, inbound (15006 and HBONE streams).
    pub pod_max_inbound: u32,
    /// Per peer (SPIFFE identity, pod, or address), inbound, node-wide.
    pub peer_max_inbound: u32,
    /// Node-wide sockets sluice may hold for traffic.
    #[serde(default)]
    pub max_sockets: u32,
    /// How the node-wide cap was chosen.
    #[serde(default)]
    pub derivation: Option<Derivation>,
}

/// Limits given on the command line; `None` = derive from the node-wide cap.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmissionFlags {
    pub max_connections: Option<u32>,
    pub pod_max_connections: Option<u32>,
    pub pod_max_inbound: Option<u32>,
    pub peer_max_inbound: Option<u32>,
}

impl AdmissionConfig {
    /// Limits set by hand (tests), with the node's sockets at two per connection.
    pub fn new(
        max_connections: u32,
        pod_max_connections: u32,
        pod_max_inbound: u32,
        peer_max_inbound: u32,
    ) -> Self {
        AdmissionConfig {
            max_connections,
            pod_max_connections,
            pod_max_inbound,
            peer_max_inbound,
            max_sockets: max_connections.saturating_mul(2),
            derivation: None,
        }
    }

    /// The limits for a process allowed `nofile` descriptors and `memory_max` bytes (its
    /// cgroup's limit, if any), with the flags' overrides. Returns the config and a warning for
    /// every flag that had to be lowered to fit.
    pub fn derive(
        nofile: u64,
        memory_max: Option<u64>,
        flags: AdmissionFlags,
    ) -> (AdmissionConfig, Vec<String>) {
        let mut warnings = Vec::new();
        let (max_connections, derivation) = derive::node_cap(nofile, memory_max, flags.max_connections);
        if let Some(n) = flags.max_connections.filter(|n| *n > max_connections) {
            let by = match derivation.bound_by {
                BoundBy::Memory => format!(
                    "the memory limit {} MiB can hold ({} KiB per connection, {} MiB kept back)",
                    memory_max.unwrap_or(0) >> 20,
                    CONNECTION_MEMORY >> 10,
                    derivation.memory_reserve >> 20
                ),
                _ => format!("RLIMIT_NOFILE {nofile} can hold (2 descriptors per connection plus headroom)"),
            };
            warnings.push(format!("--max-connections {n} is more than {by}; using {max_connections}"));
        }
        let mut within = |flag: &str, value: Option<u32>, default: u32| -> u32 {
            match value {
                Some(n) if n > max_connections => {
                    warnings.push(format!("--{flag} {n} is more than the node-wide --max-connections {max_connections}; using {max_connections}"));
                    max_connections
                }
                Some(n) => n.max(1),
                None => default.max(1),
            }
        };
        let config = AdmissionConfig {
            pod_max_connections: within(
                "pod-max-connections",
                flags.pod_max_connections,
                max_connections / 4,
            ),
            pod_max_inbound: within(
                "pod-max-inbound-connections",
                flags.pod_max_inbound,
                max_connections / 4,
            ),
            peer_max_inbound: within(
                "peer-max-inbound-connections",
                flags.peer_max_inbound,
                max_connections / 2,
            ),
            max_connections,
            max_sockets: max_connections.saturating_mul(2),
            derivation: Some(derivation),
        };
        (config, warnings)
    }
}

/// Which bound refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Node,
    SourcePod,
    DestinationPod,
    Peer,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Node => "node connection limit (--max-connections)",
            Refusal::SourcePod => "per-pod connection limit (--pod-max-connections)",
            Refusal::DestinationPod => "per-destination-pod limit (--pod-max-inbound-connections)",
            Refusal::Peer => "per-peer limit (--peer-max-inbound-connections)",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pod's counts. They outlive the pod's enrollment while a connection holds them (see
/// [`Admission::pod_slots`]), so a pod released and enrolled again is still held to its bounds
/// by the connections it already has.
#[derive(Debug, Default)]
pub struct PodSlots {
    /// Client connections from the pod (outbound).
    pub outbound: AtomicU32,
    /// Sockets sluice dialled on the pod's behalf (upstream connections and tunnels).
    pub dialled: AtomicU32,
    /// Connections to the pod (inbound).
    pub inbound: AtomicU32,
    /// Until when (ms since the admission's start) closing this pod's idle connections is not
    /// tried again, after an attempt found none.
    shed_quiet_until: AtomicU64,
}

/// Refusals per bound, and what was done to avoid them.
#[derive(Debug, Default, Serialize)]
pub struct AdmissionCounters {
    pub refused_node_limit: AtomicU64,
    pub refused_pod_limit: AtomicU64,
    pub refused_destination_pod_limit: AtomicU64,
    pub refused_peer_limit: AtomicU64,
    /// Upstream or tunnel connections not made because a bound was reached (the request got
    /// a 503 overflow, the connection a reset).
    pub dials_refused: AtomicU64,
    /// Idle pooled connections closed to make room for a new socket.
    pub idle_shed: AtomicU64,
}

/// Whose idle pooled connections to close to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The pod's (the `src_pod` of the pools' keys).
    Pod(u32),
    /// Anyone's (the node-wide bound was reached).
    Any,
}

type Shedder = Box<dyn Fn(Shed) -> usize + Send + Sync>;

pub struct Admission {
    pub config: AdmissionConfig,
    sockets: AtomicU32,
    connections: AtomicU32,
    peers: [Mutex<HashMap<PeerKey, u32>>; PEER_SHARDS],
    /// Every pod's counts by UID, while someone holds them.
    pods: Mutex<HashMap<Arc<str>, Weak<PodSlots>>>,
    /// Closes idle pooled connections (set once the pools exist).
    shedder: OnceLock<Shedder>,
    node_shed_quiet_until: AtomicU64,
    epoch: Instant,
    pub counters: AdmissionCounters,
}

/// A connection's or socket's place within every bound it counts against; dropping it gives
/// them back.
#[must_use = "the connection holds its slots only while the permit lives"]
pub struct Permit {
    admission: Arc<Admission>,
    sockets: u32,
    connection: bool,
    pod: Option<(Arc<PodSlots>, Share)>,
    peer: Option<PeerKey>,
}

/// Which of a pod's counts a permit holds.
#[derive(Debug, Clone, Copy)]
enum Share {
    Outbound,
    Dialled,
    Inbound,
}

impl Share {
    fn counter(self, slots: &PodSlots) -> &AtomicU32 {
        match self {
            Share::Outbound => &slots.outbound,
            Share::Dialled => &slots.dialled,
            Share::Inbound => &slots.inbound,
        }
    }
}

/// Takes `n` units of `counter` if it stays within `max`.
fn take(counter: &AtomicU32, n: u32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |c| c.checked_add(n).filter(|c| *c <= max))
        .is_ok()
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            config,
            sockets: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            peers: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            pods: Mutex::default(),
            shedder: OnceLock::new(),
            node_shed_quiet_until: AtomicU64::new(0),
            epoch: Instant::now(),
            counters: AdmissionCounters::default(),
        }
    }

    /// Sets what closes idle pooled connections to make room (the pools exist after the
    /// admission does). It returns how many it closed, their units already given back.
    pub fn set_shedder(&self, shed: impl Fn(Shed) -> usize + Send + Sync + 'static) {
        let _ = self.shedder.set(Box::new(shed));
    }

    /// Connections admitted and still open, node-wide (client connections, inbound connections
    /// and HBONE streams).
    pub fn open(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Sockets held for traffic, node-wide.
    pub fn sockets(&self) -> u32 {
        self.sockets.load(Ordering::Relaxed)
    }

    /// Peers with inbound connections open (the per-peer table's size).
    pub fn peers(&self) -> usize {
        self.peers.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }

    /// The counts of the pod with `uid`: the same ones as long as anything (its enrollment, a
    /// connection) holds them, new ones otherwise. The table keeps only pods someone holds.
    pub fn pod_slots(&self, uid: &str) -> Arc<PodSlots> {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slots) = pods.get(uid).and_then(Weak::upgrade) {
            return slots;
        }
        pods.retain(|_, w| w.strong_count() > 0);
        let slots = Arc::new(PodSlots::default());
        pods.insert(uid.into(), Arc::downgrade(&slots));
        slots
    }

    /// Pods whose counts are held (enrolled, or with connections still open).
    pub fn pods_tracked(&self) -> usize {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.values().filter(|w| w.strong_count() > 0).count()
    }

    /// An outbound client connection from an enrolled pod of this node (its client socket).
    pub fn outbound(self: &Arc<Self>, pod: &Arc<PodSlots>) -> Result<Permit, Refusal> {
        let attempt =
            || self.try_admit(1, true, Some((pod, Share::Outbound, self.config.pod_max_connections)), None);
        let result = attempt().or_else(|refusal| self.after_shed(refusal, None, attempt));
        self.counted(result)
    }

    /// A socket sluice dials on behalf of pod `pod_id` (an upstream connection, a tunnel).
    /// At the pod's bound its idle pooled connections are closed to make room; at the node's,
    /// anyone's.
    pub fn dial(self: &Arc<Self>, pod: &Arc<PodSlots>, pod_id: u32) -> Result<Permit, Refusal> {
        let attempt =
            || self.try_admit(1, false, Some((pod, Share::Dialled, self.config.pod_max_connections)), None);
        let result = attempt().or_else(|refusal| self.after_shed(refusal, Some((pod, pod_id)), attempt));
        if result.is_err() {
            self.counters.dials_refused.fetch_add(1, Ordering::Relaxed);
        }
        self.counted(result)
    }

    /// A plaintext connection to an enrolled pod of this node, from `peer`: the client's socket
    /// and the delivery socket.
    pub fn inbound_plaintext(
        self: &Arc<Self>,
        pod: &Arc<PodSlots>,
        peer: PeerKey,
    ) -> Result<Permit, Refusal> {
        self.inbound(2, pod, peer)
    }

    /// An HBONE stream to an enrolled pod of this node, from `peer`: its delivery socket (the
    /// tunnel's own socket is admitted with the tunnel, [`Admission::node_only`]).
    pub fn inbound_stream(self: &Arc<Self>, pod: &Arc<PodSlots>, peer: PeerKey) -> Result<Permit, Refusal> {
        self.inbound(1, pod, peer)
    }

    fn inbound(
        self: &Arc<Self>,
        sockets: u32,
        pod: &Arc<PodSlots>,
        peer: PeerKey,
    ) -> Result<Permit, Refusal> {
        let attempt = || {
            self.try_admit(
                sockets,
                true,
                Some((pod, Share::Inbound, self.config.pod_max_inbound)),
                Some(&peer),
            )
        };
        let result = attempt().or_else(|refusal| self.after_shed(refusal, None, attempt));
        self.counted(result)
    }

    /// A socket that counts only node-wide (an HBONE tunnel connection, which carries the
    /// streams that are admitted one by one).
    pub fn node_only(self: &Arc<Self>) -> Result<Permit, Refusal> {
        let attempt = || self.try_admit(1, false, None, None);
        let result = attempt().or_else(|refusal| self.after_shed(refusal, None, attempt));
        self.counted(result)
    }

    fn counted(&self, result: Result<Permit, Refusal>) -> Result<Permit, Refusal> {
        if let Err(refusal) = &result {
            let counter = match refusal {
                Refusal::Node => &self.counters.refused_node_limit,
                Refusal::SourcePod => &self.counters.refused_pod_limit,
                Refusal::DestinationPod => &self.counters.refused_destination_pod_limit,
                Refusal::Peer => &self.counters.refused_peer_limit,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// After `refusal`, closes the idle pooled connections whose units would make room (the
    /// pod's own for its dial bound, anyone's for the node's) and tries once more.
    fn after_shed(
        &self,
        refusal: Refusal,
        dialler: Option<(&PodSlots, u32)>,
        attempt: impl Fn() -> Result<Permit, Refusal>,
    ) -> Result<Permit, Refusal> {
        let shed = match (refusal, dialler) {
            (Refusal::Node, _) => self.shed(Shed::Any, &self.node_shed_quiet_until),
            (Refusal::SourcePod, Some((slots, pod_id))) => {
                self.shed(Shed::Pod(pod_id), &slots.shed_quiet_until)
            }
            _ => 0,
        };
        if shed == 0 {
            return Err(refusal);
        }
        attempt()
    }

    fn shed(&self, scope: Shed, quiet_until: &AtomicU64) -> usize {
        let Some(shedder) = self.shedder.get() else { return 0 };
        let now = self.epoch.elapsed().as_millis() as u64;
        if now < quiet_until.load(Ordering::Relaxed) {
            return 0;
        }
        let n = shedder(scope);
        if n == 0 {
            quiet_until.store(now + SHED_QUIET.as_millis() as u64, Ordering::Relaxed);
        } else {
            self.counters.idle_shed.fetch_add(n as u64, Ordering::Relaxed);
        }
        n
    }

    /// Takes `sockets` node-wide units, a unit of the pod's share and one of the peer's, or
    /// nothing. Counts nothing: the caller counts the final refusal.
    fn try_admit(
        self: &Arc<Self>,
        sockets: u32,
        connection: bool,
        pod: Option<(&Arc<PodSlots>, Share, u32)>,
        peer: Option<&PeerKey>,
    ) -> Result<Permit, Refusal> {
        if !take(&self.sockets, sockets, self.config.max_sockets) {
            return Err(Refusal::Node);
        }
        // From here on the permit gives back whatever it holds when dropped, refusals included.
        let mut permit =
            Permit { admission: self.clone(), sockets, connection: false, pod: None, peer: None };
        if let Some((slots, share, max)) = pod {
            if !take(share.counter(slots), 1, max) {
                return Err(match share {
                    Share::Outbound | Share::Dialled => Refusal::SourcePod,
                    Share::Inbound => Refusal::DestinationPod,
                });
            }
            permit.pod = Some((slots.clone(), share));
        }
        if let Some(peer) = peer {
            let mut shard = self.shard(peer).lock().unwrap_or_else(|p| p.into_inner());
            let n = shard.entry(peer.clone()).or_insert(0);
            if *n >= self.config.peer_max_inbound {
                if *n == 0 {
                    shard.remove(peer);
                }
                return Err(Refusal::Peer);
            }
            *n += 1;
            drop(shard);
            permit.peer = Some(peer.clone());
        }
        if connection {
            self.connections.fetch_add(1, Ordering::AcqRel);
            permit.connection = true;
        }
        Ok(permit)
    }

    fn shard(&self, peer: &PeerKey) -> &Mutex<HashMap<PeerKey, u32>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        peer.hash(&mut h);
        &self.peers[h.finish() as usize % PEER_SHARDS]
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let a = &self.admission;
        a.sockets.fetch_sub(self.sockets, Ordering::AcqRel);
        if self.connection {
            a.connections.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some((slots, share)) = &self.pod {
            share.counter(slots).fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(peer) = self.peer.take() {
            let mut shard = a.shard(&peer).lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = shard.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    // Entries live only while the peer has connections: the table is bounded
                    // by the connections admitted.
                    shard.remove(&peer);
                }
            }
        }
    }
}

/// A dialled socket's unit, shared by the socket (whose owner drops it when the socket
/// closes) and the pool that keeps the connection while it is idle. When the pool closes an
/// idle connection to make room, it revokes the unit: the unit is free at once, and the socket
/// follows within moments on its own task. (Waiting for that task would make every refusal
/// asynchronous; the few sockets closing at any time fit in the descriptor headroom.)
#[derive(Default)]
pub struct Lease(Mutex<Option<Permit>>);

impl Lease {
    pub fn new(permit: Permit) -> Arc<Lease> {
        Arc::new(Lease(Mutex::new(Some(permit))))
    }

    /// Gives the unit back now. Returns whether it still held it.
    pub fn revoke(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take().is_some()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to our own struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: u32, pod: u32, dest: u32, peer: u32) -> Arc<Admission> {
        Arc::new(Admission::new(AdmissionConfig::new(max, pod, dest, peer)))
    }

    fn addr(s: &str) -> PeerKey {
        PeerKey::of_unknown_addr(s.parse().unwrap())
    }

    #[test]
    fn defaults_fit_inside_the_descriptor_limit() {
        let (c, w) = AdmissionConfig::derive(20_000, None, AdmissionFlags::default());
        assert!(w.is_empty());
        // 2 descriptors per connection plus 1/8 headroom.
        assert_eq!(c.max_connections, (20_000 - 2_500) / 2);
        assert_eq!(c.max_sockets, 20_000 - 2_500);
        assert_eq!(c.pod_max_connections, c.max_connections / 4);
        assert_eq!(c.pod_max_inbound, c.max_connections / 4);
        assert_eq!(c.peer_max_inbound, c.max_connections / 2);
        assert_eq!(c.derivation.unwrap().bound_by, BoundBy::Descriptors);
        // With the DaemonSet's 1 GiB, memory decides and the shares follow.
        let (c, _) = AdmissionConfig::derive(1 << 20, Some(1 << 30), AdmissionFlags::default());
        assert_eq!((c.max_connections, c.pod_max_connections), (12_288, 3_072));
        assert_eq!(c.derivation.unwrap().bound_by, BoundBy::Memory);
    }

    #[test]
    fn flags_that_do_not_fit_are_lowered_with_a_warning() {
        let flags = AdmissionFlags {
            max_connections: Some(1_000_000),
            pod_max_connections: Some(20_000),
            pod_max_inbound: Some(10),
            peer_max_inbound: None,
        };
        let (c, w) = AdmissionConfig::derive(20_000, None, flags);
        assert_eq!(c.max_connections, 8_750);
        assert_eq!(c.pod_max_connections, c.max_connections);
        assert_eq!(c.pod_max_inbound, 10);
        assert_eq!(w.len(), 2, "{w:?}");
        let (c, w) = AdmissionConfig::derive(
            1 << 20,
            Some(1 << 30),
            AdmissionFlags { max_connections: Some(50_000), ..Default::default() },
        );
        assert_eq!(c.max_connections, 12_288);
        assert!(w[0].contains("memory limit 1024 MiB"), "{w:?}");
    }

    #[test]
    fn per_pod_bounds_refuse_and_release() {
        let a = cfg(100, 2, 3, 100);
        let pod = Arc::new(PodSlots::default());
        let p1 = a.outbound(&pod).unwrap();
        let _p2 = a.outbound(&pod).unwrap();
        assert_eq!(a.outbound(&pod).err(), Some(Refusal::SourcePod));
        assert_eq!(a.counters.refused_pod_limit.load(Ordering::Relaxed), 1);
        // The refusal gave its node-wide socket back.
        assert_eq!((a.open(), a.sockets()), (2, 2));
        drop(p1);
        assert!(a.outbound(&pod).is_ok());
        // Inbound counts separately.
        let held: Vec<Permit> =
            (0..3).map(|_| a.inbound_plaintext(&pod, addr("10.0.0.1")).unwrap()).collect();
        assert_eq!(a.inbound_plaintext(&pod, addr("10.0.0.1")).err(), Some(Refusal::DestinationPod));
        drop(held);
        assert_eq!(pod.inbound.load(Ordering::Relaxed), 0);
        assert_eq!(a.peers(), 0, "the peer table forgets peers without connections");
    }

    #[test]
    fn sockets_are_counted_one_by_one_node_wide() {
        // 5 connections = 10 sockets.
        let a = cfg(5, 10, 10, 10);
        let pod = Arc::new(PodSlots::default());
        let conns: Vec<Permit> = (0..3).map(|_| a.outbound(&pod).unwrap()).collect();
        let dials: Vec<Permit> = (0..3).map(|_| a.dial(&pod, 1).unwrap()).collect();
        // A plaintext inbound connection holds the client's socket and the delivery socket.
        let plain = a.inbound_plaintext(&pod, addr("10.0.0.1")).unwrap();
        assert_eq!((a.sockets(), a.open()), (8, 4));
        // An HBONE stream only its delivery socket.
        let stream = a.inbound_stream(&pod, PeerKey::Identity("spiffe://td/ns/a/sa/b".into())).unwrap();
        let tunnel = a.node_only().unwrap();
        assert_eq!(a.sockets(), 10);
        assert_eq!(a.inbound_plaintext(&pod, addr("10.0.0.2")).err(), Some(Refusal::Node));
        assert_eq!(a.dial(&pod, 1).err(), Some(Refusal::Node));
        assert_eq!(a.counters.refused_node_limit.load(Ordering::Relaxed), 2);
        assert_eq!(a.counters.dials_refused.load(Ordering::Relaxed), 1);
        drop((conns, dials, plain, stream, tunnel));
        assert_eq!((a.sockets(), a.open()), (0, 0));
        assert!([&pod.outbound, &pod.dialled, &pod.inbound].iter().all(|c| c.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_pod_dials_as_many_sockets_as_it_may_have_connections() {
        let a = cfg(100, 3, 3, 3);
        let pod = Arc::new(PodSlots::default());
        let _conns: Vec<Permit> = (0..3).map(|_| a.outbound(&pod).unwrap()).collect();
        let _dials: Vec<Permit> = (0..3).map(|_| a.dial(&pod, 7).unwrap()).collect();
        assert_eq!(a.dial(&pod, 7).err(), Some(Refusal::SourcePod));
        // Another pod is not held by it.
        assert!(a.dial(&Arc::new(PodSlots::default()), 8).is_ok());
    }

    /// Pooled connections as the shedder sees them: (pod, lease), idle.
    type Idle = Arc<Mutex<Vec<(u32, Arc<Lease>)>>>;

    fn shedder(idle: &Idle) -> impl Fn(Shed) -> usize + Send + Sync + 'static {
        let idle = idle.clone();
        move |scope| {
            let mut idle = idle.lock().unwrap();
            let before = idle.len();
            idle.retain(|(pod, lease)| {
                let shed = scope == Shed::Any || scope == Shed::Pod(*pod);
                if shed {
                    lease.revoke();
                }
                !shed
            });
            before - idle.len()
        }
    }

    #[test]
    fn idle_pooled_connections_make_room_before_a_refusal() {
        let a = cfg(4, 2, 4, 4);
        let idle: Idle = Arc::default();
        a.set_shedder(shedder(&idle));
        let (p1, p2) = (Arc::new(PodSlots::default()), Arc::new(PodSlots::default()));
        // Pod 1 has two idle pooled connections: its dial share is full.
        for _ in 0..2 {
            idle.lock().unwrap().push((1, Lease::new(a.dial(&p1, 1).unwrap())));
        }
        // Its next dial closes its own idle ones and goes through; pod 2's are left alone.
        idle.lock().unwrap().push((2, Lease::new(a.dial(&p2, 2).unwrap())));
        let d = a.dial(&p1, 1).unwrap();
        assert_eq!(idle.lock().unwrap().len(), 1, "pod 1's idle connections closed, pod 2's kept");
        assert_eq!(a.counters.idle_shed.load(Ordering::Relaxed), 2);
        assert_eq!(p1.dialled.load(Ordering::Relaxed), 1);
        // The node is full (8 sockets): pod 2's idle connection makes room for a client.
        let held: Vec<Permit> = (0..6).map(|_| a.outbound(&Arc::new(PodSlots::default())).unwrap()).collect();
        assert_eq!(a.sockets(), 8);
        let last = a.outbound(&Arc::new(PodSlots::default())).unwrap();
        assert!(idle.lock().unwrap().is_empty());
        // Nothing left to close: refused, and the pools are not walked again for a moment.
        assert_eq!(a.dial(&p1, 1).err(), Some(Refusal::Node));
        assert_eq!(a.counters.dials_refused.load(Ordering::Relaxed), 1);
        drop((d, held, last));
    }

    #[test]
    fn a_revoked_lease_gives_its_unit_back_once() {
        let a = cfg(10, 10, 10, 10);
        let pod = Arc::new(PodSlots::default());
        let lease = Lease::new(a.dial(&pod, 1).unwrap());
        let socket_side = lease.clone();
        assert!(lease.revoke());
        assert_eq!((a.sockets(), pod.dialled.load(Ordering::Relaxed)), (0, 0));
        assert!(!lease.revoke());
        drop((lease, socket_side));
        assert_eq!(a.sockets(), 0, "not given back twice");
    }

    #[test]
    fn a_pods_counts_survive_its_reenrollment_while_connections_hold_them() {
        let a = cfg(100, 2, 2, 100);
        let enrolled = a.pod_slots("uid-1");
        let held = a.outbound(&enrolled).unwrap();
        let _held2 = a.outbound(&enrolled).unwrap();
        drop(enrolled); // released; its connections go on
        let again = a.pod_slots("uid-1");
        assert_eq!(a.outbound(&again).err(), Some(Refusal::SourcePod), "the old connections still count");
        drop(held);
        assert!(a.outbound(&again).is_ok());
        assert!(!Arc::ptr_eq(&again, &a.pod_slots("uid-2")));
        // Nobody holds uid-2's any more: the table forgets it at the next new pod.
        let _third = a.pod_slots("uid-3");
        assert_eq!(a.pods_tracked(), 2);
        assert_eq!(a.pods.lock().unwrap().len(), 2);
    }

    #[test]
    fn one_peer_is_bounded_across_destination_pods() {
        let a = cfg(100, 100, 100, 3);
        let (x, y) = (Arc::new(PodSlots::default()), Arc::new(PodSlots::default()));
        let id = || PeerKey::Identity("spiffe://cluster.local/ns/a/sa/b".into());
        let _h = [
            a.inbound_stream(&x, id()).unwrap(),
            a.inbound_stream(&y, id()).unwrap(),
            a.inbound_stream(&x, id()).unwrap(),
        ];
        assert_eq!(a.inbound_stream(&y, id()).err(), Some(Refusal::Peer));
        // Another peer is not affected.
        let _other = a.inbound_plaintext(&y, addr("10.0.0.9")).unwrap();
        assert_eq!(y.inbound.load(Ordering::Relaxed), 2, "the refused one gave its pod slot back");
        // An IPv6 peer rotating through its /64 is one peer.
        let _v6: Vec<Permit> =
            (1..=3).map(|i| a.inbound_plaintext(&x, addr(&format!("2001:db8::{i}"))).unwrap()).collect();
        assert_eq!(a.inbound_plaintext(&y, addr("2001:db8::ffff")).err(), Some(Refusal::Peer));
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_bounds() {
        let a = cfg(32, 1000, 1000, 1000);
        let pod = Arc::new(PodSlots::default());
        let peak = Arc::new(AtomicU32::new(0));
        std::thread::scope(|s| {
            for i in 0..8 {
                let (a, pod, peak) = (a.clone(), pod.clone(), peak.clone());
                s.spawn(move || {
                    for _ in 0..2000 {
                        let p = if i % 2 == 0 {
                            a.outbound(&pod)
                        } else {
                            a.inbound_plaintext(&pod, addr("10.0.0.1"))
                        };
                        if let Ok(p) = p {
                            peak.fetch_max(a.sockets(), Ordering::Relaxed);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 64);
        assert_eq!((a.sockets(), a.open()), (0, 0));
        assert_eq!(pod.outbound.load(Ordering::Relaxed), 0);
    }
}
