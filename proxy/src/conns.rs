//! Live connections, for `sluice conns` and the per-pod counts in `sluice pods`.
//!
//! The data path touches this twice per connection (register, deregister), each a short
//! critical section on one of several shards; byte counts are atomics updated without locks.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use serde::{Deserialize, Serialize};

const SHARDS: usize = 16;

/// Counters of one enrolled pod.
#[derive(Debug, Default)]
pub struct PodStats {
    pub open: AtomicU64,
    pub total: AtomicU64,
}

/// Which side of the mesh a connection is on, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From an enrolled pod on this node, captured by connect().
    Outbound,
    /// To an enrolled pod on this node (HBONE stream or captured plaintext).
    Inbound,
}

#[derive(Debug)]
pub struct ConnEntry {
    pub id: u64,
    pub direction: Direction,
    /// The other side's SPIFFE ID when it was authenticated by mTLS.
    pub peer_identity: Option<Arc<str>>,
    pub mtls: bool,
    /// Handed over in-process between two pods of this node (no tunnel, no TLS).
    pub same_node: bool,
    pub source_pod: Arc<str>,
    pub source_addr: SocketAddr,
    pub original_dst: SocketAddr,
    pub service: Option<Arc<str>>,
    /// The upstream endpoint (L4); for HTTP the address dialled, since each request picks its
    /// own endpoint.
    pub endpoint: SocketAddr,
    /// "tcp", "http/1.1" or "h2c".
    pub protocol: &'static str,
    /// HTTP requests carried so far (0 for opaque TCP).
    pub requests: AtomicU64,
    pub started: Instant,
    /// Bytes from the client to the upstream.
    pub sent: AtomicU64,
    /// Bytes from the upstream to the client.
    pub received: AtomicU64,
}

/// What the admin API shows for one connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnView {
    pub id: u64,
    pub direction: Direction,
    pub peer_identity: Option<String>,
    /// "mtls", "same-node" (handed over in-process between two pods of this node, identity
    /// attested by the node, no TLS) or "plaintext".
    pub security: String,
    pub source_pod: String,
    pub source_addr: SocketAddr,
    pub original_dst: SocketAddr,
    pub service: Option<String>,
    pub endpoint: SocketAddr,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub age_ms: u64,
}

pub struct ConnRegistry {
    next_id: AtomicU64,
    total: AtomicU64,
    shards: [Mutex<HashMap<u64, Arc<ConnEntry>>>; SHARDS],
}

impl Default for ConnRegistry {
    fn default() -> Self {
        Self {
            next_id: AtomicU64::new(1),
            total: AtomicU64::new(0),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

/// Registration of one live connection; dropping it removes the connection.
pub struct ConnGuard {
    registry: Arc<ConnRegistry>,
    pod: Arc<PodStats>,
    pub entry: Arc<ConnEntry>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.registry.shard(self.entry.id).lock().unwrap_or_else(|p| p.into_inner()).remove(&self.entry.id);
        self.pod.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct NewConn {
    pub direction: Direction,
    pub peer_identity: Option<Arc<str>>,
    pub mtls: bool,
    /// Handed over in-process between two pods of this node (see `same_node`).
    pub same_node: bool,
    pub source_pod: Arc<str>,
    pub source_addr: SocketAddr,
    pub original_dst: SocketAddr,
    pub service: Option<Arc<str>>,
    pub endpoint: SocketAddr,
    pub protocol: &'static str,
}

impl ConnRegistry {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<ConnEntry>>> {
        &self.shards[id as usize % SHARDS]
    }

    pub fn open(self: &Arc<Self>, pod: &Arc<PodStats>, c: NewConn) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ConnEntry {
            id,
            direction: c.direction,
            peer_identity: c.peer_identity,
            mtls: c.mtls,
            same_node: c.same_node,
            source_pod: c.source_pod,
            source_addr: c.source_addr,
            original_dst: c.original_dst,
            service: c.service,
            endpoint: c.endpoint,
            protocol: c.protocol,
            requests: AtomicU64::new(0),
            started: Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        self.shard(id).lock().unwrap_or_else(|p| p.into_inner()).insert(id, entry.clone());
        self.total.fetch_add(1, Ordering::Relaxed);
        pod.open.fetch_add(1, Ordering::Relaxed);
        pod.total.fetch_add(1, Ordering::Relaxed);
        ConnGuard { registry: self.clone(), pod: pod.clone(), entry }
    }

    pub fn open_count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// A consistent-enough view for the admin API, oldest first.
    pub fn snapshot(&self) -> Vec<ConnView> {
        let mut out: Vec<ConnView> = Vec::new();
        for shard in &self.shards {
            let entries: Vec<Arc<ConnEntry>> =
                shard.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
            out.extend(entries.iter().map(|e| ConnView {
                id: e.id,
                direction: e.direction,
                peer_identity: e.peer_identity.as_deref().map(str::to_string),
                security: match (e.same_node, e.mtls) {
                    (true, _) => "same-node",
                    (false, true) => "mtls",
                    (false, false) => "plaintext",
                }
                .to_string(),
                source_pod: e.source_pod.to_string(),
                source_addr: e.source_addr,
                original_dst: e.original_dst,
                service: e.service.as_deref().map(str::to_string),
                endpoint: e.endpoint,
                protocol: e.protocol.to_string(),
                requests: e.requests.load(Ordering::Relaxed),
                bytes_sent: e.sent.load(Ordering::Relaxed),
                bytes_received: e.received.load(Ordering::Relaxed),
                age_ms: e.started.elapsed().as_millis() as u64,
            }));
        }
        out.sort_by_key(|c| c.id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_tracks_open_and_total() {
        let reg = Arc::new(ConnRegistry::default());
        let pod = Arc::new(PodStats::default());
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let mk = || NewConn {
            direction: Direction::Outbound,
            peer_identity: None,
            mtls: false,
            same_node: false,
            source_pod: "ns/p".into(),
            source_addr: a,
            original_dst: a,
            service: None,
            endpoint: a,
            protocol: "tcp",
        };
        let g1 = reg.open(&pod, mk());
        let g2 = reg.open(&pod, mk());
        g1.entry.sent.fetch_add(5, Ordering::Relaxed);
        assert_eq!(reg.open_count(), 2);
        let snap = reg.snapshot();
        assert_eq!(snap[0].bytes_sent, 5);
        drop(g1);
        assert_eq!(reg.open_count(), 1);
        assert_eq!(pod.open.load(Ordering::Relaxed), 1);
        assert_eq!(pod.total.load(Ordering::Relaxed), 2);
        drop(g2);
        assert_eq!(reg.total(), 2);
        assert_eq!(reg.open_count(), 0);
    }
}
