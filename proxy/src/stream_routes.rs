//! A VirtualService's `tcp` and `tls` rules applied to an opaque connection: which resource
//! decides for the client (`discovery::istio::vs_mixing`), the ClientHello's server name when a
//! `tls` rule needs it (read within bounds, every byte handed back), the first rule that takes
//! the connection, and a destination by weight resolved to endpoints. The byte forwarding that
//! follows is the ordinary one ([`crate::l4`]).

use std::net::SocketAddr;
use std::sync::{atomic::Ordering, Arc};

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::{
    discovery::{
        istio::{destination_rule::Client as DrClient, vs_compile::StreamConn},
        route::{BackendKind, BackendRef, ClientInfo},
        traffic::Resolution,
        AddressType, Model,
    },
    l4::{DataPath, PodContext},
    l7::{
        dns::Asker,
        plan::{balance_key, pick_backend},
        sni::{self, Hello},
    },
    lograte,
    routing::Target,
};

/// Where a connection goes.
pub enum Routed {
    /// No tcp/tls rule decides: the dialled destination as usual.
    Default,
    /// A rule chose this destination.
    To(Target),
    /// A rule chose a destination that does not exist: the connection is reset (Envoy closes
    /// a connection to a cluster Istio did not generate).
    Refused(String),
}

/// Applies the tcp/tls rules of the dialled Service (or ServiceEntry) port. Returns the
/// decision and the bytes read from the client so far (`prefix` and any ClientHello bytes),
/// which go upstream first.
pub async fn route(client: &mut TcpStream, prefix: Bytes, orig: SocketAddr, pod: &PodContext, dp: &DataPath) -> (Routed, Bytes) {
    let model = dp.model.load_full();
    let chain = match model.service_for(orig.ip(), orig.port()) {
        Some(t) => model.stream_routes(t.namespace(), t.name(), t.port().port),
        None => model
            .service_entry_for_addr(orig.ip(), orig.port())
            .and_then(|(e, p)| model.entry_stream_routes(&e.namespace, &e.name, p.number)),
    };
    let Some(chain) = chain else { return (Routed::Default, prefix) };
    let labels = model.pod(&pod.namespace, &pod.name).map(|p| &p.labels);
    let who = ClientInfo { namespace: &pod.namespace, labels };
    let (sni, prefix) = if chain.needs_sni(&who) {
        match sni::read_sni(client, prefix, sni::SNI_TIMEOUT).await {
            (Hello::Sni(name), read) => (Some(name), read),
            (other, read) => {
                dp.l7.counters.tls_sni_unread.fetch_add(1, Ordering::Relaxed);
                debug!(pod = %pod.key, dst = %orig, verdict = ?other, bytes = read.len(), "no TLS server name read; tls rules cannot match");
                (None, read)
            }
        }
    } else {
        (None, prefix)
    };
    let conn = StreamConn { dst: orig.ip(), src: pod.ip, sni: sni.as_deref(), client: who };
    let Some((route, rule)) = chain.select(&conn) else { return (Routed::Default, prefix) };
    let Some(backend) = pick_backend(&rule.backends) else {
        return (Routed::Refused(format!("{} of VirtualService {}/{} has no destination with weight", rule.origin, route.namespace, route.name)), prefix);
    };
    debug!(pod = %pod.key, dst = %orig, sni = ?sni, vs = %format!("{}/{}", route.namespace, route.name), rule = %rule.origin,
        backend = %format!("{}/{}:{:?}", backend.namespace, backend.name, backend.port), "tcp/tls rule");
    let decided = match destination(&model, backend, orig, pod, dp).await {
        Ok(t) => {
            dp.l7.counters.tcp_routed.fetch_add(1, Ordering::Relaxed);
            Routed::To(t)
        }
        Err(why) => {
            dp.l7.counters.tcp_route_refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = lograte::shared().allow("tcp-route-refused", &pod.key) {
                warn!(pod = %pod.key, dst = %orig, vs = %format!("{}/{}", route.namespace, route.name), rule = %rule.origin,
                    reason = %why, suppressed, "connection reset: its VirtualService destination does not exist");
            }
            Routed::Refused(why)
        }
    };
    (decided, prefix)
}

/// A rule's destination as endpoints: a Service port (or one of its subsets), or a
/// ServiceEntry port.
async fn destination(model: &Model, b: &BackendRef, orig: SocketAddr, pod: &PodContext, dp: &DataPath) -> Result<Target, String> {
    if let Some(why) = &b.invalid {
        return Err(why.clone());
    }
    let port = b.port.ok_or("no port")?;
    let name: Arc<str> = format!("{}/{}", b.namespace, b.name).into();
    match b.kind {
        BackendKind::Service => {
            let t = model
                .service_port(&b.namespace, &b.name, port)
                .ok_or_else(|| format!("Service {}/{} has no port {port}", b.namespace, b.name))?;
            let family = AddressType::of(orig.ip());
            Ok(match &b.subset {
                None => Target::routed(Some(name), balance_key(&b.namespace, &b.name, port), t.endpoints_preferring(family).clone()),
                // The subset as the DestinationRule that applies to this client defines it (its
                // namespace's rule first, as for HTTP; see `l7::plan`). Its traffic policy is not
                // applied to opaque connections (README, "DestinationRule").
                Some(s) => {
                    let labels = model
                        .destination_rule_index()
                        .needs_labels()
                        .then(|| model.pod(&pod.namespace, &pod.name).map(|p| &p.labels))
                        .flatten();
                    let client = DrClient { namespace: &pod.namespace, labels };
                    let resolved = match model.destination_rule_index().destination(client, &b.namespace, &b.name, port, Some(s)) {
                        Some(Ok(r)) => r,
                        Some(Err(why)) => return Err(why),
                        None => {
                            return Err(format!(
                                "subset {s:?} of {}/{}: no DestinationRule for this client defines subsets of the Service",
                                b.namespace, b.name
                            ))
                        }
                    };
                    Target::routed(
                        Some(name),
                        balance_key(&b.namespace, &format!("{}|{s}", b.name), port),
                        resolved.endpoints_preferring(family).0.clone(),
                    )
                }
            })
        }
        BackendKind::ServiceEntry => {
            let e = model.service_entry(&b.namespace, &b.name).ok_or("no such ServiceEntry")?;
            let p = e.ports.iter().find(|p| p.number == port).ok_or_else(|| format!("ServiceEntry {name} has no port {port}"))?;
            let target_port = p.target_port.unwrap_or(p.number);
            let eps: Arc<[SocketAddr]> = match e.resolution {
                Resolution::None => Arc::from([SocketAddr::new(orig.ip(), target_port)].as_slice()),
                Resolution::Static => e
                    .endpoints
                    .iter()
                    .filter_map(|ep| {
                        let ip = ep.address.parse().ok()?;
                        let port = ep.ports.iter().find(|(n, _)| *n == p.name).map_or(target_port, |(_, q)| *q);
                        Some(SocketAddr::new(ip, port))
                    })
                    .collect(),
                Resolution::Dns | Resolution::DnsRoundRobin => {
                    let host = e
                        .endpoints
                        .first()
                        .map(|ep| ep.address.clone())
                        .or_else(|| e.hosts.iter().find(|h| !h.starts_with('*')).cloned())
                        .ok_or("a DNS ServiceEntry without a host to resolve")?;
                    let asker = Asker { pod: &pod.key, service_entry: &name };
                    dp.l7.resolve(&host, target_port, asker).await.map_err(|e| e.to_string())?
                }
            };
            Ok(Target::routed(Some(name), balance_key(&b.namespace, &b.name, port), eps))
        }
    }
}
