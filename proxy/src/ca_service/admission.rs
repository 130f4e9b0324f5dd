//! What the CA admits before it knows who is calling: connections and request streams, bounded
//! over all callers and per source address.
//!
//! Anybody who can reach port 15012 can open connections and streams without a token, and each
//! costs memory until it ends, so both are bounded twice: a global cap that sizes the CA's
//! memory, and a per-source share of it, so that one address cannot take every slot. A node
//! agent needs one connection (a few while it reconnects) and at most 16 streams at once (its
//! client's bound), so the per-source shares leave it ample room. The table holds an entry per
//! source with an open connection only, so it is bounded by the connection cap.
//!
//! Sources are addresses as the CA sees them. Node agents run on the host network, so each node
//! is its own address; if something translated many nodes to one address (an SNAT gateway in
//! front of the CA), they would share one source's share.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps (see [`super::server::ServerLimits`] for the values the CA runs with).
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub max_streams: usize,
    pub max_streams_per_source: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefused {
    /// All connections are taken.
    Limit,
    /// This source has its share of connections.
    SourceLimit,
}

impl ConnectionRefused {
    pub fn label(self) -> &'static str {
        match self {
            ConnectionRefused::Limit => "limit",
            ConnectionRefused::SourceLimit => "source_limit",
        }
    }
}

/// Why a stream was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefused {
    Limit,
    SourceLimit,
}

#[derive(Default)]
struct Counts {
    connections: usize,
    streams: usize,
}

pub struct Admission {
    limits: AdmissionLimits,
    connections: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    sources: Mutex<HashMap<IpAddr, Counts>>,
}

/// Held while a connection is open.
pub struct ConnectionPermit {
    admission: Arc<Admission>,
    source: IpAddr,
    _slot: OwnedSemaphorePermit,
}

/// Held while a request stream is being handled.
pub struct StreamPermit {
    admission: Arc<Admission>,
    source: IpAddr,
    _slot: OwnedSemaphorePermit,
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            limits,
            sources: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Counts>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection from `source`, if both caps allow it.
    pub fn connection(self: &Arc<Self>, source: IpAddr) -> Result<ConnectionPermit, ConnectionRefused> {
        let source = source.to_canonical();
        let slot = self.connections.clone().try_acquire_owned().map_err(|_| ConnectionRefused::Limit)?;
        let mut sources = self.sources();
        let counts = sources.entry(source).or_default();
        if counts.connections >= self.limits.max_connections_per_source {
            return Err(ConnectionRefused::SourceLimit);
        }
        counts.connections += 1;
        Ok(ConnectionPermit { admission: self.clone(), source, _slot: slot })
    }

    /// A request stream on a connection from `source`, if both caps allow it.
    pub fn stream(self: &Arc<Self>, source: IpAddr) -> Result<StreamPermit, StreamRefused> {
        let source = source.to_canonical();
        let slot = self.streams.clone().try_acquire_owned().map_err(|_| StreamRefused::Limit)?;
        let mut sources = self.sources();
        let counts = sources.entry(source).or_default();
        if counts.streams >= self.limits.max_streams_per_source {
            return Err(StreamRefused::SourceLimit);
        }
        counts.streams += 1;
        Ok(StreamPermit { admission: self.clone(), source, _slot: slot })
    }

    fn release(&self, source: IpAddr, connection: bool) {
        let mut sources = self.sources();
        if let Some(counts) = sources.get_mut(&source) {
            if connection {
                counts.connections = counts.connections.saturating_sub(1);
            } else {
                counts.streams = counts.streams.saturating_sub(1);
            }
            if counts.connections == 0 && counts.streams == 0 {
                sources.remove(&source);
            }
        }
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.limits.max_connections - self.connections.available_permits()
    }

    /// Streams being handled now.
    pub fn open_streams(&self) -> usize {
        self.limits.max_streams - self.streams.available_permits()
    }

    /// Sources with a connection or stream now.
    pub fn sources_tracked(&self) -> usize {
        self.sources().len()
    }

    /// Resolves once every connection has ended (or never, if more keep coming).
    pub async fn all_closed(&self) {
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        let _ = self.connections.acquire_many(all).await;
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.admission.release(self.source, true);
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.admission.release(self.source, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission() -> Arc<Admission> {
        Admission::new(AdmissionLimits {
            max_connections: 4,
            max_connections_per_source: 2,
            max_streams: 5,
            max_streams_per_source: 3,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 243, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 243, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 243, 0, 3));

    #[test]
    fn a_source_gets_its_share_of_connections_and_no_more() {
        let adm = admission();
        let a1 = adm.connection(A).unwrap();
        let _a2 = adm.connection(A).unwrap();
        assert_eq!(adm.connection(A).err(), Some(ConnectionRefused::SourceLimit));
        // IPv4-mapped IPv6 is the same source.
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(10, 243, 0, 1).to_ipv6_mapped());
        assert_eq!(adm.connection(mapped).err(), Some(ConnectionRefused::SourceLimit));
        let _b1 = adm.connection(B).unwrap();
        let _b2 = adm.connection(B).unwrap();
        assert_eq!(adm.connection(C).err(), Some(ConnectionRefused::Limit), "the global cap");
        assert_eq!(adm.open_connections(), 4);
        drop(a1);
        adm.connection(C).expect("a closed connection frees its slot");
    }

    #[test]
    fn a_source_gets_its_share_of_streams_and_no_more() {
        let adm = admission();
        let a: Vec<_> = (0..3).map(|_| adm.stream(A).unwrap()).collect();
        assert_eq!(adm.stream(A).err(), Some(StreamRefused::SourceLimit));
        let _b: Vec<_> = (0..2).map(|_| adm.stream(B).unwrap()).collect();
        assert_eq!(adm.stream(C).err(), Some(StreamRefused::Limit));
        drop(a);
        assert_eq!(adm.open_streams(), 2);
        adm.stream(C).unwrap();
    }

    #[test]
    fn sources_leave_the_table_with_their_last_permit() {
        let adm = admission();
        let conn = adm.connection(A).unwrap();
        let stream = adm.stream(A).unwrap();
        assert_eq!(adm.sources_tracked(), 1);
        drop(conn);
        assert_eq!(adm.sources_tracked(), 1, "its stream is still open");
        drop(stream);
        assert_eq!(adm.sources_tracked(), 0);
        // A refusal leaves nothing behind either.
        let _x: Vec<_> = (0..2).map(|_| adm.connection(B).unwrap()).collect();
        let _ = adm.connection(B);
        assert_eq!(adm.sources_tracked(), 1);
    }
}
