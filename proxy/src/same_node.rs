//! Same-node hand-off: when the destination of a mesh connection is an enrolled pod of this
//! node, one sluice process holds both ends, so the connection does not go through an mTLS
//! tunnel to itself. The source side asks [`SameNode::lookup`] for the destination pod; if it
//! is served here, the destination side's checks (the CONNECT target, the loop guard,
//! admission, peer authentication and authorization with the source pod's identity) run
//! in-process and the bytes go straight to the application, delivered from inside the
//! destination pod's namespace as an HBONE stream would be.
//!
//! The source's identity is the one the node attested when it captured the connection (the
//! pod's cgroup, hence its service account): the same fact the source's certificate would have
//! carried, signed by the same node. Peer authentication counts the hand-off as mutual TLS;
//! plaintext from outside the mesh never takes this path (it arrives on the capture listener).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
};

use arc_swap::ArcSwap;

use crate::{inbound::Inbound, l4::PodContext};

/// How traffic between two pods of this node travels (`--same-node`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SameNodeMode {
    /// Handed over in-process: policy applied, no TLS, no HTTP/2 framing.
    InProcess,
    /// Through an HBONE tunnel to this node's own tunnel port, as across nodes (the default
    /// for now: see the design notes, "Same-node traffic and the destination-side pass").
    #[default]
    Tunnel,
}

/// The enrolled pods of this node that can take a connection in-process, by address.
pub struct SameNode {
    mode: SameNodeMode,
    /// Written by the enroller (control path), read per connection: copy on write.
    pods: ArcSwap<HashMap<IpAddr, Arc<PodContext>>>,
    /// The destination side; set once at start-up (it is built after the data path).
    inbound: OnceLock<Arc<Inbound>>,
    /// Connections (opaque or HTTP) handed over in-process.
    pub handoffs: AtomicU64,
}

impl SameNode {
    pub fn new(mode: SameNodeMode) -> Self {
        SameNode { mode, pods: Default::default(), inbound: OnceLock::new(), handoffs: AtomicU64::new(0) }
    }

    pub fn mode(&self) -> SameNodeMode {
        self.mode
    }

    pub fn set_inbound(&self, inbound: Arc<Inbound>) {
        let _ = self.inbound.set(inbound);
    }

    /// The pod serves the mesh here (its tunnel port is open, so its identity's certificate is
    /// in): connections to it may be handed over.
    pub fn insert(&self, pod: &Arc<PodContext>) {
        if self.mode == SameNodeMode::Tunnel {
            return;
        }
        self.pods.rcu(|current| {
            let mut next = HashMap::clone(current);
            for ip in pod.ips.iter().filter(|ip| !crate::deliver::is_link_local(**ip)) {
                next.insert(ip.to_canonical(), pod.clone());
            }
            next
        });
    }

    /// The pod is released: connections to it go through the ordinary path (and find nothing).
    pub fn remove(&self, pod: &PodContext) {
        self.pods.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.retain(|_, p| p.pod_id != pod.pod_id);
            next
        });
    }

    /// The destination pod at `ip` and the destination side, if the connection can be handed
    /// over in-process.
    pub fn lookup(&self, ip: IpAddr) -> Option<(Arc<PodContext>, Arc<Inbound>)> {
        let inbound = self.inbound.get()?;
        let pod = self.pods.load().get(&ip.to_canonical())?.clone();
        Some((pod, inbound.clone()))
    }

    pub fn handed_off(&self) {
        self.handoffs.fetch_add(1, Ordering::Relaxed);
    }
}
