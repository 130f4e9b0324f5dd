//! Nothing makes sluice connect to its own listeners.
//!
//! sluice listens inside every enrolled pod (`127.0.0.1:15001`, `<pod IP>:15006`,
//! `<pod IP>:15008`) and on the node (admin, metrics, readiness). A connection sluice makes on
//! a client's behalf that lands on one of those would be handled by sluice again, which would
//! connect again, and so on: a single `curl http://<pod IP>:15006/` from any pod filled the
//! process's file descriptors within a second and took every pod of the node off the mesh.
//! Whatever leads there (a captured connection to a reserved port, an HBONE CONNECT target, a
//! Service targetPort, a route backend, a ServiceEntry endpoint or a DNS answer), the
//! destination is checked here just before sluice would connect, and refused.
//!
//! The checks are cheap on the request path: the port is compared first, and only a reserved
//! port leads to address lookups. Refusals are counted, and logged through the shared log limiter
//! ([`crate::lograte`]: at most once per source per 10 s, and within a global rate), since an
//! attacker must not be able to flood the log either.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use sluice_common::{ADMIN_PORT, HBONE_PORT, INBOUND_PORT, METRICS_PORT, OUTBOUND_PORT, READY_PORT};
use tracing::warn;

use crate::discovery::Model;

/// sluice's listeners inside an enrolled pod's network namespace.
pub const POD_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT];

/// Why a destination is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTarget {
    /// One of sluice's listeners inside an enrolled pod (15001, 15006, 15008).
    PodListener(SocketAddr),
    /// One of sluice's node ports (admin, metrics, readiness) on an address of the node.
    NodeListener(SocketAddr),
}

impl SelfTarget {
    pub fn addr(&self) -> SocketAddr {
        match self {
            SelfTarget::PodListener(a) | SelfTarget::NodeListener(a) => *a,
        }
    }
}

impl std::fmt::Display for SelfTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelfTarget::PodListener(a) => write!(f, "{a} is one of sluice's own listeners in a mesh pod"),
            SelfTarget::NodeListener(a) => write!(f, "{a} is one of sluice's own ports on this node"),
        }
    }
}

/// Where the refused connection came from: the path that would have made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A captured outbound connection (opaque TCP).
    Outbound,
    /// An HTTP request's upstream (route backend, Service endpoint, ServiceEntry, mirror).
    Request,
    /// Delivery of an inbound connection (captured plaintext or an HBONE stream).
    Delivery,
}

impl Via {
    fn as_str(self) -> &'static str {
        match self {
            Via::Outbound => "outbound",
            Via::Request => "request",
            Via::Delivery => "delivery",
        }
    }
}

pub struct LoopGuard {
    /// The node's own addresses (every interface of the node's network namespace).
    node_addrs: ArcSwap<Vec<IpAddr>>,
    /// The node ports sluice listens on (the defaults and whatever the flags chose).
    node_ports: Vec<u16>,
    pub refused: AtomicU64,
    log: &'static crate::lograte::LogLimiter,
}

impl LoopGuard {
    /// `node_ports`: the admin, metrics and readiness ports actually in use (the defaults are
    /// always included: another sluice of the node may use them).
    pub fn new(node_ports: &[u16]) -> Self {
        let mut ports = vec![ADMIN_PORT, METRICS_PORT, READY_PORT];
        ports.extend(node_ports.iter().copied().filter(|p| *p != 0));
        ports.sort_unstable();
        ports.dedup();
        Self {
            node_addrs: ArcSwap::from_pointee(Vec::new()),
            node_ports: ports,
            refused: AtomicU64::new(0),
            log: crate::lograte::shared(),
        }
    }

    /// Replaces the node's addresses (control path; see [`node_addresses`]).
    pub fn set_node_addrs(&self, mut addrs: Vec<IpAddr>) {
        addrs.iter_mut().for_each(|a| *a = a.to_canonical());
        addrs.sort_unstable();
        addrs.dedup();
        if **self.node_addrs.load() != addrs {
            self.node_addrs.store(Arc::new(addrs));
        }
    }

    fn is_node_addr(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || ip.is_unspecified() || self.node_addrs.load().contains(&ip)
    }

    /// Checks a destination sluice is about to connect to on a client's behalf (from inside
    /// the client pod's network namespace, or through a tunnel to the destination pod).
    pub fn check_upstream(&self, model: &Model, dst: SocketAddr) -> Result<(), SelfTarget> {
        let port = dst.port();
        let ip = dst.ip().to_canonical();
        if POD_PORTS.contains(&port) {
            // In a pod's namespace, its loopback and its own addresses are where sluice
            // listens; any mesh pod's address is where a sluice listens (this one or another
            // node's, which would hand the connection on the same way).
            let mesh_pod =
                model.pod_by_ip(ip).is_some_and(|p| !p.host_network && model.is_enrolled(&p.namespace));
            if mesh_pod || self.is_node_addr(ip) {
                return Err(SelfTarget::PodListener(dst));
            }
        }
        if self.node_ports.contains(&port) && self.is_node_addr(ip) {
            return Err(SelfTarget::NodeListener(dst));
        }
        Ok(())
    }

    /// Checks the target of a delivery into an enrolled pod (its own address and a port the
    /// client asked for): sluice's listeners there are never a delivery target.
    pub fn check_delivery(&self, target: SocketAddr) -> Result<(), SelfTarget> {
        if POD_PORTS.contains(&target.port()) {
            return Err(SelfTarget::PodListener(target));
        }
        Ok(())
    }

    /// Counts a refusal and logs it, at most once per source per 10 s and within the log's
    /// global rate (saying how many were refused in between).
    pub fn refused(&self, source: &str, target: SelfTarget, via: Via) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let Some(suppressed) = self.log.allow("self-connection", source) else { return };
        warn!(
            source,
            destination = %target.addr(),
            via = via.as_str(),
            suppressed_since_last_log = suppressed,
            "refused a connection to sluice's own listener: {target} (it would loop through sluice)"
        );
    }
}

/// The addresses of every interface of the calling thread's network namespace (the node's).
pub fn node_addresses() -> std::io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter_map(|a| a.address)
        .filter_map(|s| {
            if let Some(v4) = s.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with_mesh_pod() -> Model {
        Model::from_manifest(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {sluice.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: u1}
spec: {nodeName: n1}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: plain, uid: u2}
spec: {nodeName: n1}
status: {podIP: 10.244.1.11}
"#,
            crate::discovery::Format::Yaml,
        )
        .unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sluice_pod_ports_of_mesh_pods_are_refused() {
        let model = model_with_mesh_pod();
        let g = LoopGuard::new(&[]);
        for port in POD_PORTS {
            let dst = SocketAddr::new("10.244.1.10".parse().unwrap(), port);
            assert_eq!(g.check_upstream(&model, dst), Err(SelfTarget::PodListener(dst)));
            // Loopback in the client pod is sluice's outbound listener.
            let lo = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
            assert!(g.check_upstream(&model, lo).is_err());
            let lo6 = SocketAddr::new("::1".parse().unwrap(), port);
            assert!(g.check_upstream(&model, lo6).is_err());
        }
        // An application port of a mesh pod, and a reserved port of a pod outside the mesh
        // (no sluice listens there), are fine.
        assert!(g.check_upstream(&model, addr("10.244.1.10:8080")).is_ok());
        assert!(g.check_upstream(&model, addr("10.244.1.11:15006")).is_ok());
        // An IPv4-mapped form is the same address.
        assert!(g.check_upstream(&model, addr("[::ffff:10.244.1.10]:15006")).is_err());
    }

    #[test]
    fn node_ports_on_node_addresses_are_refused() {
        let model = model_with_mesh_pod();
        let g = LoopGuard::new(&[16000]);
        g.set_node_addrs(vec!["10.244.1.1".parse().unwrap(), "fd00::1".parse().unwrap()]);
        for port in [ADMIN_PORT, METRICS_PORT, READY_PORT, 16000] {
            assert!(
                g.check_upstream(&model, SocketAddr::new("10.244.1.1".parse().unwrap(), port)).is_err(),
                "{port}"
            );
            assert!(
                g.check_upstream(&model, SocketAddr::new("fd00::1".parse().unwrap(), port)).is_err(),
                "{port}"
            );
        }
        // The same ports elsewhere (another node, an outside service) are fine.
        assert!(g.check_upstream(&model, addr("10.244.2.1:15020")).is_ok());
        assert!(g.check_upstream(&model, addr("192.0.2.7:15000")).is_ok());
        // sluice's pod ports on a node address too (a hostNetwork endpoint).
        assert!(g.check_upstream(&model, addr("10.244.1.1:15006")).is_err());
    }

    #[test]
    fn deliveries_to_sluice_ports_are_refused() {
        let g = LoopGuard::new(&[]);
        assert!(g.check_delivery(addr("10.244.1.10:15006")).is_err());
        assert!(g.check_delivery(addr("10.244.1.10:15008")).is_err());
        assert!(g.check_delivery(addr("[fe80::1]:15001")).is_err());
        assert!(g.check_delivery(addr("10.244.1.10:8080")).is_ok());
    }

    #[test]
    fn refusals_are_counted_every_time_and_logged_through_the_limiter() {
        let g = LoopGuard { log: Box::leak(Box::default()), ..LoopGuard::new(&[]) };
        let t = SelfTarget::PodListener(addr("10.244.1.10:15006"));
        for _ in 0..5 {
            g.refused("shop/a", t, Via::Delivery);
        }
        assert_eq!(g.refused.load(Ordering::Relaxed), 5);
        // One line for the source, four suppressed.
        assert_eq!(g.log.suppressed(), 4);
        assert_eq!(g.log.sources(), 1);
    }

    #[test]
    fn node_addresses_include_loopback() {
        let addrs = node_addresses().unwrap();
        assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
    }
}
