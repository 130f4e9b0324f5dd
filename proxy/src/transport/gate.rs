//! What the HBONE server lets in before and after authentication.
//!
//! Port 15008 of every enrolled pod is reachable by any pod of the cluster, mesh or not. A TCP
//! connection that has not finished its mutual-TLS handshake proves nothing about who sent it,
//! so it must not take what authenticated traffic needs: it waits in a small bucket of its own
//! ([`MAX_HANDSHAKES_PER_SOURCE`] per source address, IPv6 by /64, and [`MAX_HANDSHAKES`]
//! node-wide), and only once the client's certificate is verified does the connection take its
//! node-wide admission permit, and its place within its identity's bound of tunnel connections
//! ([`TunnelGate::tunnel`]). A pod that opens thousands of TCP connections to 15008 and stalls
//! them holds at most its bucket, each for at most the handshake deadline, and no other pod's
//! connections are refused for it.

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
};

use crate::keyed::KeyedCounts;

/// Unauthenticated connections (TCP accepted, mutual TLS not done) from one source address at
/// once. A real client is a sluice (or ztunnel) dialling from its pod's address: one handshake
/// per tunnel it opens, a few milliseconds each.
pub const MAX_HANDSHAKES_PER_SOURCE: u32 = 64;
/// Unauthenticated connections at once, node-wide.
pub const MAX_HANDSHAKES: u32 = 512;

/// Authenticated tunnel connections one identity may hold on this node at once: a quarter of
/// the node-wide connection cap, the share a pod gets (each tunnel connection is one
/// descriptor and counts node-wide; its streams are admitted one by one, per peer and pod).
pub fn tunnels_per_identity(config: &crate::admission::AdmissionConfig) -> u32 {
    (config.max_connections / 4).max(1)
}

/// Why a connection was refused before it could be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    /// The source already has [`MAX_HANDSHAKES_PER_SOURCE`] handshakes in progress.
    Source,
    /// [`MAX_HANDSHAKES`] handshakes are in progress node-wide.
    Node,
    /// The client's identity already holds its bound of tunnel connections.
    Identity,
}

impl GateRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            GateRefusal::Source => "unauthenticated connections from this source",
            GateRefusal::Node => "unauthenticated connections node-wide",
            GateRefusal::Identity => "tunnel connections of this identity",
        }
    }
}

/// The node-wide state of the HBONE server's bounds, and what they refused.
pub struct TunnelGate {
    handshakes: AtomicU32,
    sources: KeyedCounts<IpAddr>,
    identities: KeyedCounts<Arc<str>>,
    tunnels: AtomicU32,
    pub refused_source: AtomicU64,
    pub refused_node: AtomicU64,
    pub refused_identity: AtomicU64,
}

impl std::fmt::Debug for TunnelGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelGate")
            .field("handshakes", &self.handshakes())
            .field("tunnels", &self.tunnels())
            .finish()
    }
}

impl Default for TunnelGate {
    fn default() -> Self {
        Self {
            handshakes: AtomicU32::new(0),
            sources: KeyedCounts::new(),
            identities: KeyedCounts::new(),
            tunnels: AtomicU32::new(0),
            refused_source: AtomicU64::new(0),
            refused_node: AtomicU64::new(0),
            refused_identity: AtomicU64::new(0),
        }
    }
}

/// The source key of an address: itself for IPv4, its /64 for IPv6 (a host may use any
/// address of its /64, so per address it would be as many sources as it likes).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
    }
}

/// An unauthenticated connection's place in the handshake bucket; given back when dropped.
#[must_use = "the handshake holds its place only while this lives"]
pub struct Handshake {
    gate: Arc<TunnelGate>,
    source: IpAddr,
}

/// An authenticated tunnel connection's place within its identity's bound.
#[must_use = "the tunnel holds its place only while this lives"]
pub struct TunnelPlace {
    gate: Arc<TunnelGate>,
    identity: Arc<str>,
}

impl TunnelGate {
    /// A place for a connection from `peer` to do its handshake.
    pub fn handshake(self: &Arc<Self>, peer: IpAddr) -> Result<Handshake, GateRefusal> {
        let taken = self
            .handshakes
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < MAX_HANDSHAKES).then_some(n + 1))
            .is_ok();
        if !taken {
            self.refused_node.fetch_add(1, Ordering::Relaxed);
            return Err(GateRefusal::Node);
        }
        let source = source_key(peer);
        if !self.sources.take(&source, MAX_HANDSHAKES_PER_SOURCE) {
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            self.refused_source.fetch_add(1, Ordering::Relaxed);
            return Err(GateRefusal::Source);
        }
        Ok(Handshake { gate: self.clone(), source })
    }

    /// A place for an authenticated tunnel connection of `identity`, at most `max` at once.
    pub fn tunnel(self: &Arc<Self>, identity: &Arc<str>, max: u32) -> Result<TunnelPlace, GateRefusal> {
        if !self.identities.take(identity, max) {
            self.refused_identity.fetch_add(1, Ordering::Relaxed);
            return Err(GateRefusal::Identity);
        }
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        Ok(TunnelPlace { gate: self.clone(), identity: identity.clone() })
    }

    /// Handshakes in progress (unauthenticated connections held).
    pub fn handshakes(&self) -> u32 {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// Authenticated tunnel connections open.
    pub fn tunnels(&self) -> u32 {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// (sources with a handshake in progress, identities with a tunnel open): the tables' sizes.
    pub fn table_sizes(&self) -> (usize, usize) {
        (self.sources.len(), self.identities.len())
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.gate.sources.give(&self.source);
        self.gate.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for TunnelPlace {
    fn drop(&mut self) {
        self.gate.identities.give(&self.identity);
        self.gate.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_source_holds_at_most_its_share_of_handshakes() {
        let g = Arc::new(TunnelGate::default());
        let held: Vec<Handshake> =
            (0..MAX_HANDSHAKES_PER_SOURCE).map(|_| g.handshake(ip("10.244.1.12")).unwrap()).collect();
        assert_eq!(g.handshake(ip("10.244.1.12")).err(), Some(GateRefusal::Source));
        assert_eq!(g.refused_source.load(Ordering::Relaxed), 1);
        // Another source is not affected.
        let other = g.handshake(ip("10.244.1.13")).unwrap();
        assert_eq!(g.handshakes(), MAX_HANDSHAKES_PER_SOURCE + 1);
        drop(held);
        drop(other);
        assert_eq!(g.handshakes(), 0);
        assert_eq!(g.table_sizes(), (0, 0), "the source table forgets sources without handshakes");
    }

    #[test]
    fn an_ipv6_source_cannot_rotate_addresses_within_its_64() {
        let g = Arc::new(TunnelGate::default());
        let held: Vec<Handshake> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|i| {
                g.handshake(IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 7, i as u16))).unwrap()
            })
            .collect();
        assert_eq!(g.handshake(ip("fd00:10:244:1:ffff::1")).err(), Some(GateRefusal::Source));
        assert!(g.handshake(ip("fd00:10:244:2::1")).is_ok());
        drop(held);
    }

    #[test]
    fn the_node_bucket_bounds_many_sources() {
        let g = Arc::new(TunnelGate::default());
        let mut held = Vec::new();
        let mut refused = 0;
        for i in 0..(MAX_HANDSHAKES + 100) {
            match g.handshake(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))) {
                Ok(h) => held.push(h),
                Err(r) => {
                    assert_eq!(r, GateRefusal::Node);
                    refused += 1;
                }
            }
        }
        assert_eq!(held.len() as u32, MAX_HANDSHAKES);
        assert_eq!(refused, 100);
        assert_eq!(g.refused_node.load(Ordering::Relaxed), 100);
        drop(held);
        assert_eq!(g.handshakes(), 0);
    }

    #[test]
    fn tunnels_are_bounded_per_identity() {
        let g = Arc::new(TunnelGate::default());
        let a: Arc<str> = "spiffe://cluster.local/ns/a/sa/x".into();
        let b: Arc<str> = "spiffe://cluster.local/ns/b/sa/y".into();
        let held: Vec<TunnelPlace> = (0..3).map(|_| g.tunnel(&a, 3).unwrap()).collect();
        assert_eq!(g.tunnel(&a, 3).err(), Some(GateRefusal::Identity));
        let other = g.tunnel(&b, 3).unwrap();
        assert_eq!(g.tunnels(), 4);
        drop(held);
        assert!(g.tunnel(&a, 3).is_ok());
        drop(other);
        assert_eq!(g.table_sizes().1, 0);
    }
}
