//! The destination side: connections *to* an enrolled pod on this node. They arrive either as
//! HBONE streams on the pod's `IP:15008` (from a mesh client, identity verified by mTLS) or as
//! plaintext captured by the kernel (`sk_lookup`) onto the pod's `IP:15006` listener (from a
//! client outside the mesh). Either way: peer authentication mode, authorization policy, then
//! delivery to the application from inside the pod's namespace with the client's address.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use http::{Response, StatusCode};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    admission::PeerKey,
    conns::{ConnRegistry, Direction, NewConn},
    deliver,
    discovery::{Model, PeerAuthMode},
    identity::SpiffeId,
    l4::{self, PodContext},
    lograte,
    policy::{self, Source},
    transport::{pump, server, TunnelRequest},
};

/// Node-wide counters of the destination side.
#[derive(Debug, Default, Serialize)]
pub struct InboundCounters {
    pub tunnel_streams: AtomicU64,
    pub plaintext_accepted: AtomicU64,
    pub plaintext_refused_strict: AtomicU64,
    pub policy_denied: AtomicU64,
    pub delivery_failed: AtomicU64,
}

pub struct Inbound {
    pub redirector: Arc<crate::redirect::Redirector>,
    pub model: Arc<ArcSwap<Model>>,
    pub conns: Arc<ConnRegistry>,
    pub counters: InboundCounters,
    pub tunnel_stats: Arc<server::ServerStats>,
    pub connect_timeout: Duration,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    pub loop_guard: Arc<crate::loopguard::LoopGuard>,
    pub admission: Arc<crate::admission::Admission>,
    /// Opaque TCP with no bytes either way for this long is closed.
    pub idle: Arc<crate::idle::IdleTimeout>,
}

enum Verdict {
    Allowed,
    Denied(String),
}

impl Inbound {
    fn authorize(&self, pod: &PodContext, port: u16, principal: Option<&SpiffeId>) -> Verdict {
        let model = self.model.load();
        let Some(dest) = model.pod(&pod.namespace, &pod.name) else {
            return Verdict::Denied("destination pod is no longer in the model".into());
        };
        let principal_str = principal.map(|p| p.to_string());
        let source = match principal_str.as_deref() {
            Some(id) => Source::mtls(id),
            None => Source::PLAINTEXT,
        };
        let decision = policy::authorize(&model, dest, port, &source);
        if decision.allowed {
            Verdict::Allowed
        } else {
            Verdict::Denied(format!(
                "{} ({})",
                decision.reason,
                decision.policy.as_deref().unwrap_or("no policy")
            ))
        }
    }
}

/// Handles one HBONE stream addressed to `pod`.
pub async fn handle_tunnel(mut req: TunnelRequest, pod: Arc<PodContext>, inbound: Arc<Inbound>) {
    inbound.counters.tunnel_streams.fetch_add(1, Ordering::Relaxed);
    if !pod.ips.contains(&req.target.ip()) || crate::deliver::is_link_local(req.target.ip()) {
        if let Some(suppressed) = lograte::shared().allow("hbone-wrong-target", &req.peer_identity) {
            warn!(pod = %pod.key, target = %req.target, peer = %req.peer_identity, suppressed, "HBONE: CONNECT target is not this pod");
        }
        server::reply(&mut req.respond, StatusCode::BAD_REQUEST);
        return;
    }
    if let Err(refused) = inbound.loop_guard.check_delivery(req.target) {
        inbound.loop_guard.refused(&req.peer_identity, refused, crate::loopguard::Via::Delivery);
        server::reply(&mut req.respond, StatusCode::BAD_REQUEST);
        return;
    }
    let peer = PeerKey::Identity(req.peer_identity.clone());
    let permit = match inbound.admission.inbound_stream(&pod.slots, peer) {
        Ok(p) => p,
        Err(refusal) => {
            debug!(pod = %pod.key, peer = %req.peer_identity, limit = refusal.as_str(), "HBONE stream refused: connection limit reached");
            server::reply(&mut req.respond, StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let principal: Option<SpiffeId> = req.peer_identity.parse().ok();
    if let Verdict::Denied(why) = inbound.authorize(&pod, req.target.port(), principal.as_ref()) {
        inbound.counters.policy_denied.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = lograte::shared().allow("policy-denied", &req.peer_identity) {
            warn!(pod = %pod.key, port = req.target.port(), source = %req.peer_identity, reason = %why, suppressed, "connection denied by authorization policy");
        }
        server::reply(&mut req.respond, StatusCode::FORBIDDEN);
        return;
    }
    let app = match deliver::connect(&inbound.redirector, &pod.netns, pod.transparent, req.peer.ip(), req.target, inbound.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            inbound.counters.delivery_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = lograte::shared().allow("delivery-failed", &req.peer_identity) {
                info!(pod = %pod.key, target = %req.target, error = %e, suppressed, "delivery to the application failed");
            }
            server::reply(&mut req.respond, StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let response = Response::builder().status(StatusCode::OK).body(()).expect("valid response");
    let send = match req.respond.send_response(response, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.key, error = %e, "tunnel stream gone before it was answered");
            return;
        }
    };
    let guard = inbound.conns.open(
        &pod.stats,
        NewConn {
            direction: Direction::Inbound,
            peer_identity: Some(req.peer_identity.clone()),
            mtls: true,
            source_pod: source_pod_name(&inbound.model, req.peer),
            source_addr: req.peer,
            original_dst: req.target,
            service: None,
            endpoint: req.target,
            protocol: "tcp",
        },
    );
    if let Some(protocol) = req.l7 {
        // HTTP from a sluice's L7 path: served per request on this side too.
        let ctx = Arc::new(crate::l7::inbound::InboundStream {
            pod: pod.clone(),
            telemetry: inbound.telemetry.clone(),
            model: inbound.model.clone(),
            peer: req.peer,
            peer_identity: req.peer_identity.clone(),
            target: req.target,
            idle: inbound.idle.clone(),
            entry: guard.entry.clone(),
            held: (permit, guard),
        });
        crate::l7::inbound::serve(crate::l7::io::TunnelIo::new(send, req.body), app, protocol, ctx).await;
        return;
    }
    // Bytes towards the application count as "received" from the peer's point of view of
    // this connection: sent = peer → app, received = app → peer, as for outbound.
    let tcp = InboundConn::new(&inbound, &pod, req.peer, req.target, Some(req.peer_identity.clone()));
    tcp.report(&inbound, &pod, &guard.entry, true);
    let (sent, received) = (&guard.entry.sent, &guard.entry.received);
    inbound.idle.run(pump::tcp_h2(app, bytes::Bytes::new(), send, req.body, received, sent), sent, received).await;
    tcp.report(&inbound, &pod, &guard.entry, false);
    drop(permit);
}

/// Serves the pod's plaintext-capture listener (`IP:15006`) until the task is aborted.
pub async fn serve_plaintext(listener: TcpListener, pod: Arc<PodContext>, inbound: Arc<Inbound>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // A pod in the model counts as itself whatever its address; see `PeerKey`.
                let key = PeerKey::of_addr(&inbound.model.load(), peer.ip());
                let permit = match inbound.admission.inbound_plaintext(&pod.slots, key) {
                    Ok(p) => p,
                    Err(refusal) => {
                        debug!(pod = %pod.key, %peer, limit = refusal.as_str(), "inbound connection refused: connection limit reached");
                        pump::reset(&stream);
                        continue;
                    }
                };
                let pod = pod.clone();
                let inbound = inbound.clone();
                tokio::spawn(async move {
                    handle_plaintext(stream, peer, pod, inbound).await;
                    drop(permit);
                });
            }
            Err(e) => {
                if let Some(suppressed) = lograte::shared().allow("accept-failed", &pod.key) {
                    warn!(pod = %pod.key, error = %e, suppressed, "inbound accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_plaintext(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, inbound: Arc<Inbound>) {
    // sk_lookup hands us the connection without rewriting it: our local address is the one
    // the client dialled.
    let Ok(target) = client.local_addr() else { return };
    // Dialled directly (15006 is sluice's own listener): delivering it would connect to the
    // same listener again.
    if let Err(refused) = inbound.loop_guard.check_delivery(target) {
        inbound.loop_guard.refused(&lograte::source_of_ip(peer.ip()), refused, crate::loopguard::Via::Delivery);
        pump::reset(&client);
        return;
    }
    let mode = inbound.model.load().peer_auth_mode(&pod.namespace);
    if mode == PeerAuthMode::Strict {
        inbound.counters.plaintext_refused_strict.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = lograte::shared().allow("strict-refused", &lograte::source_of_ip(peer.ip())) {
            warn!(pod = %pod.key, %peer, %target, suppressed, "plaintext connection refused: namespace is STRICT (mTLS only)");
        }
        pump::reset(&client);
        return;
    }
    if let Verdict::Denied(why) = inbound.authorize(&pod, target.port(), None) {
        inbound.counters.policy_denied.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = lograte::shared().allow("policy-denied", &lograte::source_of_ip(peer.ip())) {
            warn!(pod = %pod.key, %peer, port = target.port(), reason = %why, suppressed, "plaintext connection denied by authorization policy");
        }
        pump::reset(&client);
        return;
    }
    inbound.counters.plaintext_accepted.fetch_add(1, Ordering::Relaxed);
    let app = match deliver::connect(&inbound.redirector, &pod.netns, pod.transparent, peer.ip(), target, inbound.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            inbound.counters.delivery_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = lograte::shared().allow("delivery-failed", &lograte::source_of_ip(peer.ip())) {
                info!(pod = %pod.key, %target, error = %e, suppressed, "delivery to the application failed; resetting");
            }
            pump::reset(&client);
            return;
        }
    };
    let guard = inbound.conns.open(
        &pod.stats,
        NewConn {
            direction: Direction::Inbound,
            peer_identity: None,
            mtls: false,
            source_pod: source_pod_name(&inbound.model, peer),
            source_addr: peer,
            original_dst: target,
            service: None,
            endpoint: target,
            protocol: "tcp",
        },
    );
    let tcp = InboundConn::new(&inbound, &pod, peer, target, None);
    tcp.report(&inbound, &pod, &guard.entry, true);
    let (sent, received) = (&guard.entry.sent, &guard.entry.received);
    inbound.idle.run(l4::forward(client, app, sent, received), sent, received).await;
    tcp.report(&inbound, &pod, &guard.entry, false);
}

/// What TCP telemetry says about one inbound connection (reporter=destination).
struct InboundConn {
    src_workload: Option<Arc<crate::discovery::WorkloadInfo>>,
    principal: Option<Arc<str>>,
    service: Option<Arc<crate::discovery::Service>>,
    access_log: bool,
    peer: SocketAddr,
    target: SocketAddr,
    start: std::time::SystemTime,
    started: std::time::Instant,
}

impl InboundConn {
    fn new(inbound: &Inbound, pod: &PodContext, peer: SocketAddr, target: SocketAddr, principal: Option<Arc<str>>) -> Self {
        let model = inbound.model.load();
        let src_workload = model.workload_by_ip(peer.ip()).cloned();
        let mut namespaces = vec![pod.namespace.as_ref()];
        if let Some(w) = &src_workload {
            namespaces.push(&w.namespace);
        }
        InboundConn {
            access_log: crate::telemetry::access_log_wanted(&model, &namespaces),
            service: model.service_of_endpoint(target).and_then(|(ns, name)| model.service(ns, name).cloned()),
            src_workload,
            principal,
            peer,
            target,
            start: std::time::SystemTime::now(),
            started: std::time::Instant::now(),
        }
    }

    fn report(&self, inbound: &Inbound, pod: &PodContext, entry: &crate::conns::ConnEntry, opened: bool) {
        use crate::telemetry::{ConnRecord, Peer, Reporter, ServiceRef};
        let rec = ConnRecord {
            reporter: Reporter::Destination,
            start: self.start,
            duration: self.started.elapsed(),
            source: Peer { workload: self.src_workload.as_deref(), principal: self.principal.as_deref(), addr: Some(self.peer) },
            destination: Peer { workload: Some(&pod.workload), principal: Some(&pod.identity_str), addr: Some(self.target) },
            service: self.service.as_ref().map(|s| ServiceRef { namespace: &s.namespace, name: &s.name }),
            // Istio's direction: sent = server → client, received = client → server.
            sent: entry.received.load(Ordering::Relaxed),
            received: entry.sent.load(Ordering::Relaxed),
            mtls: self.principal.is_some(),
            response_flags: "-",
            access_log: self.access_log,
        };
        if opened {
            inbound.telemetry.connection_opened(&rec);
        } else {
            inbound.telemetry.connection_closed(&rec);
        }
    }
}

/// "ns/name" of the pod with the peer's IP if the model knows it, else the IP.
fn source_pod_name(model: &ArcSwap<Model>, peer: SocketAddr) -> Arc<str> {
    match model.load().pod_by_ip(peer.ip()) {
        Some(p) => format!("{}/{}", p.namespace, p.name).into(),
        None => peer.ip().to_string().into(),
    }
}
