//! Where a connection goes: a Service ClusterIP:port resolves to the Service's ready endpoints
//! (picked round robin per Service port); any other destination (a pod IP, an outside address)
//! is forwarded as dialled.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, RwLock,
    },
};

use crate::discovery::Model;

/// The resolved target of one connection.
#[derive(Debug, Clone)]
pub struct Target {
    /// "namespace/name" of the Service, if the destination was a Service.
    pub service: Option<Arc<str>>,
    /// Identity of the Service port for balancing state (0 when not a Service).
    balance_key: u64,
    /// Ready endpoints (a single entry, the original destination, when not a Service).
    pub endpoints: Arc<[SocketAddr]>,
}

impl Target {
    /// A target chosen by a route (a VirtualService tcp/tls rule): `service` names it for
    /// telemetry and the connection registry, `balance_key` keys its round robin.
    pub fn routed(service: Option<Arc<str>>, balance_key: u64, endpoints: Arc<[SocketAddr]>) -> Target {
        Target { service, balance_key: balance_key | 1, endpoints }
    }
}

pub fn resolve(model: &Model, dst: SocketAddr) -> Target {
    match model.service_for(dst.ip(), dst.port()) {
        Some(svc) => {
            let mut h = DefaultHasher::new();
            svc.namespace().hash(&mut h);
            svc.name().hash(&mut h);
            dst.port().hash(&mut h);
            Target {
                service: Some(format!("{}/{}", svc.namespace(), svc.name()).into()),
                balance_key: h.finish() | 1,
                endpoints: svc.endpoints().clone(),
            }
        }
        None => Target { service: None, balance_key: 0, endpoints: Arc::from([dst].as_slice()) },
    }
}

/// Round robin per Service port. Counters are created once per Service port and then only
/// read under the lock's shared side.
#[derive(Default)]
pub struct RoundRobin {
    counters: RwLock<HashMap<u64, Arc<AtomicUsize>>>,
}

impl RoundRobin {
    pub fn pick(&self, target: &Target) -> Option<SocketAddr> {
        match target.endpoints.len() {
            0 => None,
            1 => Some(target.endpoints[0]),
            n => {
                let counter = self.counter(target.balance_key);
                let i = counter.fetch_add(1, Ordering::Relaxed) % n;
                Some(target.endpoints[i])
            }
        }
    }

    fn counter(&self, key: u64) -> Arc<AtomicUsize> {
        if let Some(c) = self.counters.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return c.clone();
        }
        self.counters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(AtomicUsize::new(0)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_spreads_evenly() {
        let eps: Arc<[SocketAddr]> =
            Arc::from(vec!["10.0.0.1:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap(), "10.0.0.3:80".parse().unwrap()]);
        let t = Target { service: Some("a/b".into()), balance_key: 7, endpoints: eps.clone() };
        let rr = RoundRobin::default();
        let mut counts = HashMap::new();
        for _ in 0..300 {
            *counts.entry(rr.pick(&t).unwrap()).or_insert(0) += 1;
        }
        assert!(eps.iter().all(|e| counts[e] == 100), "{counts:?}");
    }

    #[test]
    fn no_endpoints_means_no_pick() {
        let t = Target { service: Some("a/b".into()), balance_key: 7, endpoints: Arc::from(Vec::new()) };
        assert_eq!(RoundRobin::default().pick(&t), None);
    }
}
