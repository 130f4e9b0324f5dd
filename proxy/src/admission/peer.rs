//! Who an inbound connection counts against for the per-peer bound: one key per party that can
//! open connections, whatever number of addresses it has.
//!
//! - HBONE: the peer's verified SPIFFE identity.
//! - Plaintext from an address of a pod in the model: that pod (its UID), so a dual-stack pod's
//!   IPv4 and IPv6 addresses count together.
//! - Any other IPv6 address: its /64. A host usually holds a whole /64 (SLAAC, or a delegated
//!   prefix) and can rotate through it at will, so the exact address would be no bound at all.
//!   IPv6 link-local sources outside the model therefore share one key per link, which is the
//!   price of not letting one of them rotate past the bound.
//! - Any other IPv4 address: itself.

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use crate::discovery::Model;

/// Who an inbound connection is from, for the per-peer bound.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A verified SPIFFE identity (HBONE).
    Identity(Arc<str>),
    /// A pod in the model (its UID), whichever of its addresses it came from.
    Pod(Arc<str>),
    /// An IPv4 address outside the model.
    Addr(IpAddr),
    /// The /64 of an IPv6 address outside the model.
    Net64(Ipv6Addr),
}

impl PeerKey {
    /// The key of a plaintext connection from `ip`.
    pub fn of_addr(model: &Model, ip: IpAddr) -> PeerKey {
        let ip = ip.to_canonical();
        if let Some(pod) = model.pod_by_ip(ip) {
            return PeerKey::Pod(pod.uid.as_str().into());
        }
        PeerKey::of_unknown_addr(ip)
    }

    /// The key of an address that belongs to no known pod.
    pub fn of_unknown_addr(ip: IpAddr) -> PeerKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => PeerKey::Addr(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                PeerKey::Net64(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_outside_the_model_count_by_their_64() {
        let k = |s: &str| PeerKey::of_unknown_addr(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff:ffff:ffff:fffe"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("fe80::1"), k("fe80::aaaa:bbbb:cccc:dddd"), "link-local: one key per link");
        // IPv4 by address, and an IPv4-mapped IPv6 address is that IPv4 address.
        assert_ne!(k("10.0.0.1"), k("10.0.0.2"));
        assert_eq!(k("::ffff:10.0.0.1"), k("10.0.0.1"));
    }

    #[test]
    fn a_dual_stack_pod_is_one_peer() {
        let model = Model::from_manifest(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: plain, uid: u-dual}
spec: {nodeName: n1}
status: {podIP: 10.244.1.11, podIPs: [{ip: 10.244.1.11}, {ip: "fd00:10:244:1::11"}]}
"#,
            crate::discovery::Format::Yaml,
        )
        .unwrap();
        let k = |s: &str| PeerKey::of_addr(&model, s.parse().unwrap());
        assert_eq!(k("10.244.1.11"), PeerKey::Pod("u-dual".into()));
        assert_eq!(k("fd00:10:244:1::11"), k("10.244.1.11"));
        assert_eq!(k("::ffff:10.244.1.11"), k("10.244.1.11"));
        // Another address of the same /64 that no pod holds is not that pod.
        assert_eq!(k("fd00:10:244:1::99"), PeerKey::Net64("fd00:10:244:1::".parse().unwrap()));
    }
}
