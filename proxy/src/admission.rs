//! Admission of proxied connections: the bounds that keep one pod (or one peer) from taking
//! the node proxy's file descriptors from every other pod of the node.
//!
//! sluice is one process for the whole node, so its `RLIMIT_NOFILE` is shared by everyone.
//! Each proxied connection holds about two descriptors (the client's socket, and the upstream
//! or delivery socket). Admission counts connections against:
//!
//! - a **node-wide cap** derived from `RLIMIT_NOFILE`: `(nofile − headroom) / 2`, the headroom
//!   kept for what is not counted per connection (listeners, pooled upstream connections and
//!   tunnels, the admin, metrics and readiness endpoints, maps, log files);
//! - **per source pod** (outbound, from an enrolled pod on this node);
//! - **per destination pod** (inbound to an enrolled pod of this node: captured plaintext on
//!   15006 and HBONE streams on 15008);
//! - **per peer** (inbound, node-wide): the client's verified SPIFFE identity for HBONE, its
//!   address for plaintext.
//!
//! A connection over a bound is reset at once (an HBONE stream is answered 503) and counted.
//! The defaults divide the node-wide cap so that one pod, or one peer, can never take it all.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use serde::Serialize;

/// Descriptors kept out of the per-connection budget: at least this many...
const MIN_HEADROOM: u64 = 1024;
/// ...or this share of the limit (1/8), whichever is more.
const HEADROOM_SHARE: u64 = 8;
const PEER_SHARDS: usize = 16;

/// The effective limits (all in connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AdmissionConfig {
    /// Node-wide proxied connections (outbound and inbound together).
    pub max_connections: u32,
    /// Per enrolled source pod, outbound.
    pub pod_max_connections: u32,
    /// Per enrolled destination pod, inbound (15006 and HBONE streams).
    pub pod_max_inbound: u32,
    /// Per peer (SPIFFE identity, or address for plaintext), inbound, node-wide.
    pub peer_max_inbound: u32,
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
    /// The node-wide cap that `nofile` descriptors allow.
    pub fn cap_for(nofile: u64) -> u32 {
        let headroom = MIN_HEADROOM.max(nofile / HEADROOM_SHARE);
        (nofile.saturating_sub(headroom) / 2).clamp(1, u64::from(u32::MAX)) as u32
    }

    /// The limits for a process allowed `nofile` descriptors, with the flags' overrides. Returns
    /// the config and a warning for every flag that had to be lowered to fit.
    pub fn derive(nofile: u64, flags: AdmissionFlags) -> (AdmissionConfig, Vec<String>) {
        let mut warnings = Vec::new();
        let fits = Self::cap_for(nofile);
        let max_connections = match flags.max_connections {
            Some(n) if n > fits => {
                warnings.push(format!(
                    "--max-connections {n} is more than RLIMIT_NOFILE {nofile} can hold (2 descriptors per connection plus headroom); using {fits}"
                ));
                fits
            }
            Some(n) => n.max(1),
            None => fits,
        };
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
        };
        (config, warnings)
    }
}

/// Who an inbound connection is from, for the per-peer bound.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A verified SPIFFE identity (HBONE).
    Identity(Arc<str>),
    /// The source address (plaintext from outside the mesh).
    Addr(IpAddr),
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

/// One pod's connection counts (outbound from it, inbound to it).
#[derive(Debug, Default)]
pub struct PodSlots {
    pub outbound: AtomicU32,
    pub inbound: AtomicU32,
}

/// Refusals per bound.
#[derive(Debug, Default, Serialize)]
pub struct AdmissionCounters {
    pub refused_node_limit: AtomicU64,
    pub refused_pod_limit: AtomicU64,
    pub refused_destination_pod_limit: AtomicU64,
    pub refused_peer_limit: AtomicU64,
}

pub struct Admission {
    pub config: AdmissionConfig,
    open: AtomicU32,
    peers: [Mutex<HashMap<PeerKey, u32>>; PEER_SHARDS],
    pub counters: AdmissionCounters,
}

/// A connection's place within every bound it counts against; dropping it gives them back.
#[must_use = "the connection holds its slots only while the permit lives"]
pub struct Permit {
    admission: Arc<Admission>,
    pod: Option<(Arc<PodSlots>, Direction)>,
    peer: Option<PeerKey>,
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn counter(self, slots: &PodSlots) -> &AtomicU32 {
        match self {
            Direction::Outbound => &slots.outbound,
            Direction::Inbound => &slots.inbound,
        }
    }
}

/// Takes one unit of `counter` if it stays within `max`.
fn take(counter: &AtomicU32, max: u32) -> bool {
    counter.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Self {
            config,
            open: AtomicU32::new(0),
            peers: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            counters: AdmissionCounters::default(),
        }
    }

    /// Connections admitted and still open, node-wide.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// Peers with inbound connections open (the per-peer table's size).
    pub fn peers(&self) -> usize {
        self.peers.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }

    /// An outbound connection from an enrolled pod of this node.
    pub fn outbound(self: &Arc<Self>, pod: &Arc<PodSlots>) -> Result<Permit, Refusal> {
        self.admit(Some((pod, Direction::Outbound, self.config.pod_max_connections)), None)
    }

    /// An inbound connection to an enrolled pod of this node, from `peer`.
    pub fn inbound(self: &Arc<Self>, pod: &Arc<PodSlots>, peer: PeerKey) -> Result<Permit, Refusal> {
        self.admit(Some((pod, Direction::Inbound, self.config.pod_max_inbound)), Some(peer))
    }

    /// A connection that counts only node-wide (an HBONE tunnel connection, which carries the
    /// streams that are admitted one by one).
    pub fn node_only(self: &Arc<Self>) -> Result<Permit, Refusal> {
        self.admit(None, None)
    }

    fn admit(
        self: &Arc<Self>,
        pod: Option<(&Arc<PodSlots>, Direction, u32)>,
        peer: Option<PeerKey>,
    ) -> Result<Permit, Refusal> {
        if !take(&self.open, self.config.max_connections) {
            self.counters.refused_node_limit.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Node);
        }
        // From here on the permit gives back whatever it holds when dropped, refusals included.
        let mut permit = Permit { admission: self.clone(), pod: None, peer: None };
        if let Some((slots, dir, max)) = pod {
            if !take(dir.counter(slots), max) {
                let (counter, refusal) = match dir {
                    Direction::Outbound => (&self.counters.refused_pod_limit, Refusal::SourcePod),
                    Direction::Inbound => {
                        (&self.counters.refused_destination_pod_limit, Refusal::DestinationPod)
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
                return Err(refusal);
            }
            permit.pod = Some((slots.clone(), dir));
        }
        if let Some(peer) = peer {
            let mut shard = self.shard(&peer).lock().unwrap_or_else(|p| p.into_inner());
            let n = shard.entry(peer.clone()).or_insert(0);
            if *n >= self.config.peer_max_inbound {
                if *n == 0 {
                    shard.remove(&peer);
                }
                drop(shard);
                self.counters.refused_peer_limit.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Peer);
            }
            *n += 1;
            drop(shard);
            permit.peer = Some(peer);
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
        a.open.fetch_sub(1, Ordering::AcqRel);
        if let Some((slots, dir)) = &self.pod {
            dir.counter(slots).fetch_sub(1, Ordering::AcqRel);
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
        Arc::new(Admission::new(AdmissionConfig {
            max_connections: max,
            pod_max_connections: pod,
            pod_max_inbound: dest,
            peer_max_inbound: peer,
        }))
    }

    #[test]
    fn defaults_fit_inside_the_descriptor_limit() {
        let (c, w) = AdmissionConfig::derive(20_000, AdmissionFlags::default());
        assert!(w.is_empty());
        // 2 descriptors per connection plus 1/8 headroom.
        assert_eq!(c.max_connections, (20_000 - 2_500) / 2);
        assert!(u64::from(c.max_connections) * 2 + 2_500 <= 20_000);
        assert_eq!(c.pod_max_connections, c.max_connections / 4);
        assert_eq!(c.pod_max_inbound, c.max_connections / 4);
        assert_eq!(c.peer_max_inbound, c.max_connections / 2);
        // A small limit keeps at least 1024 descriptors back.
        assert_eq!(AdmissionConfig::cap_for(4096), (4096 - 1024) / 2);
        assert_eq!(AdmissionConfig::cap_for(100), 1);
    }

    #[test]
    fn flags_that_do_not_fit_are_lowered_with_a_warning() {
        let flags = AdmissionFlags {
            max_connections: Some(1_000_000),
            pod_max_connections: Some(20_000),
            pod_max_inbound: Some(10),
            peer_max_inbound: None,
        };
        let (c, w) = AdmissionConfig::derive(20_000, flags);
        assert_eq!(c.max_connections, AdmissionConfig::cap_for(20_000));
        assert_eq!(c.pod_max_connections, c.max_connections);
        assert_eq!(c.pod_max_inbound, 10);
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn per_pod_bounds_refuse_and_release() {
        let a = cfg(100, 2, 3, 100);
        let pod = Arc::new(PodSlots::default());
        let p1 = a.outbound(&pod).unwrap();
        let _p2 = a.outbound(&pod).unwrap();
        assert_eq!(a.outbound(&pod).err(), Some(Refusal::SourcePod));
        assert_eq!(a.counters.refused_pod_limit.load(Ordering::Relaxed), 1);
        // The refusal gave its node-wide slot back.
        assert_eq!(a.open(), 2);
        drop(p1);
        assert!(a.outbound(&pod).is_ok());
        // Inbound counts separately.
        let peer = || PeerKey::Addr("10.0.0.1".parse().unwrap());
        let held: Vec<Permit> = (0..3).map(|_| a.inbound(&pod, peer()).unwrap()).collect();
        assert_eq!(a.inbound(&pod, peer()).err(), Some(Refusal::DestinationPod));
        drop(held);
        assert_eq!(pod.inbound.load(Ordering::Relaxed), 0);
        assert_eq!(a.peers(), 0, "the peer table forgets peers without connections");
    }

    #[test]
    fn the_node_bound_holds_across_pods_and_peers() {
        let a = cfg(5, 4, 4, 4);
        let pods: Vec<Arc<PodSlots>> = (0..3).map(|_| Arc::default()).collect();
        let mut held = Vec::new();
        for (i, p) in pods.iter().enumerate() {
            if let Ok(permit) = a.outbound(p) {
                held.push(permit);
            }
            if let Ok(permit) = a.inbound(p, PeerKey::Identity(format!("spiffe://x/{i}").into())) {
                held.push(permit);
            }
        }
        assert_eq!(held.len(), 5);
        assert_eq!(a.node_only().err(), Some(Refusal::Node));
        assert_eq!(a.counters.refused_node_limit.load(Ordering::Relaxed), 2);
        drop(held);
        assert_eq!(a.open(), 0);
        assert!(pods
            .iter()
            .all(|p| p.outbound.load(Ordering::Relaxed) == 0 && p.inbound.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn one_peer_is_bounded_across_destination_pods() {
        let a = cfg(100, 100, 100, 3);
        let (x, y) = (Arc::new(PodSlots::default()), Arc::new(PodSlots::default()));
        let id = || PeerKey::Identity("spiffe://cluster.local/ns/a/sa/b".into());
        let _h = [a.inbound(&x, id()).unwrap(), a.inbound(&y, id()).unwrap(), a.inbound(&x, id()).unwrap()];
        assert_eq!(a.inbound(&y, id()).err(), Some(Refusal::Peer));
        // Another peer is not affected.
        assert!(a.inbound(&y, PeerKey::Addr("10.0.0.9".parse().unwrap())).is_ok());
        assert_eq!(y.inbound.load(Ordering::Relaxed), 1, "the refused one gave its pod slot back");
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_bounds() {
        let a = cfg(64, 1000, 1000, 1000);
        let pod = Arc::new(PodSlots::default());
        let peak = Arc::new(AtomicU32::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                let (a, pod, peak) = (a.clone(), pod.clone(), peak.clone());
                s.spawn(move || {
                    for _ in 0..2000 {
                        if let Ok(p) = a.outbound(&pod) {
                            peak.fetch_max(a.open(), Ordering::Relaxed);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 64);
        assert_eq!(a.open(), 0);
        assert_eq!(pod.outbound.load(Ordering::Relaxed), 0);
    }
}
