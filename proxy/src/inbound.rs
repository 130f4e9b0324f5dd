//! The destination side: connections *to* an enrolled pod on this node. They arrive either as
//! HBONE streams on the pod's `IP:15008` (from a mesh client, identity verified by mTLS) or as
//! plaintext captured by the kernel (`sk_lookup`) onto the pod's `IP:15006` listener (from a
//! client outside the mesh). Either way: peer authentication mode (plaintext only), then
//! authorization and delivery to the application from inside the pod's namespace with the
//! client's address.
//!
//! Authorization is per connection (Istio's TCP semantics) unless the connection carries HTTP
//! that sluice serves: a tunnel stream marked `x-sluice-l7`, or, for a pod that a policy needing
//! requests selects (an AuthorizationPolicy with HTTP fields or the remote IP, a
//! RequestAuthentication), any connection whose first bytes are HTTP. Those are authorized per
//! request (`l7::inbound`), with the JWT checked first.

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

/// What the destination side needs for security decisions beyond the model.
pub struct Security {
    /// Istio's root namespace (`--root-namespace`): its policies apply to every pod.
    pub root_namespace: Arc<str>,
    /// Key sets behind RequestAuthentications' `jwksUri`.
    pub jwks: Arc<crate::jwt::jwks::Jwks>,
    pub counters: SecurityCounters,
    /// Protocol detection for connections to pods that need requests seen.
    pub detect_timeout: Duration,
    pub opaque_ports: Vec<u16>,
}

/// Node-wide counters of request-level security.
#[derive(Debug, Default, Serialize)]
pub struct SecurityCounters {
    /// Requests answered 403 by an AuthorizationPolicy.
    pub http_denied: AtomicU64,
    /// Requests answered 401: a JWT that is not valid.
    pub jwt_rejected: AtomicU64,
    /// Requests that carried a valid JWT.
    pub jwt_verified: AtomicU64,
    /// Requests or connections that matched an AUDIT policy (logged).
    pub policy_audited: AtomicU64,
    /// Plaintext or opaque-tunnel connections read for HTTP because a policy needs requests.
    pub inbound_sniffed: AtomicU64,
}

/// Node-wide counters of the destination side.
#[derive(Debug, Default, Serialize)]
pub struct InboundCounters {
    pub tunnel_streams: AtomicU64,
    pub plaintext_accepted: AtomicU64,
    /// Connections from a pod of this node handed over in-process (no tunnel; see `same_node`).
    pub same_node_in: AtomicU64,
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
    pub security: Arc<Security>,
}

enum Verdict {
    Allowed,
    Denied(String),
}

impl Inbound {
    /// Authorizes a connection (TCP semantics) from `peer` with `principal` to `target`.
    fn authorize(&self, pod: &PodContext, peer: SocketAddr, target: SocketAddr, principal: Option<&SpiffeId>) -> Verdict {
        let model = self.model.load();
        let Some(dest) = model.pod(&pod.namespace, &pod.name) else {
            return Verdict::Denied("destination pod is no longer in the model".into());
        };
        let principal_str = principal.map(|p| p.to_string());
        let source = match principal_str.as_deref() {
            Some(id) => Source::mtls(id),
            None => Source::PLAINTEXT,
        };
        let attrs = policy::Attributes {
            source,
            source_ip: Some(peer.ip().to_canonical()),
            dest_ip: Some(target.ip().to_canonical()),
            dest_port: target.port(),
            request: None,
        };
        let decision = policy::authorize(&model, &self.security.root_namespace, dest, &attrs);
        if let Some(audit) = &decision.audit {
            self.security.counters.policy_audited.fetch_add(1, Ordering::Relaxed);
            let who = principal_str.clone().unwrap_or_else(|| lograte::source_of_ip(peer.ip()));
            if let Some(suppressed) = lograte::shared().allow("policy-audit", &who) {
                info!(pod = %pod.key, source = %who, port = target.port(), policy = %audit, allowed = decision.allowed, suppressed, "connection matched an AUDIT policy");
            }
        }
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

    /// Whether connections to `pod` must be read for HTTP requests (a policy that selects it
    /// needs them).
    fn needs_requests(&self, pod: &PodContext) -> bool {
        let model = self.model.load();
        let Some(dest) = model.pod(&pod.namespace, &pod.name) else { return false };
        let root = &self.security.root_namespace;
        policy::authz::needs_requests(&model, root, dest) || !crate::jwt::authn::rules_for(&model, root, dest).is_empty()
    }

    /// How to sniff a connection to `target`: the Service port it is an endpoint of may pin
    /// the protocol; well-known server-first ports are not sniffed.
    fn hint(&self, target: SocketAddr) -> crate::l7::detect::Hint {
        let model = self.model.load();
        let port = model
            .service_of_endpoint(target)
            .and_then(|(ns, name)| model.service(ns, name))
            .and_then(|svc| {
                // The Service port whose endpoints include this one.
                svc.ports.iter().find(|p| {
                    model.service_port(&svc.namespace, &svc.name, p.port).is_some_and(|t| t.endpoints().contains(&target))
                })
            })
            .cloned();
        crate::l7::detect::hint(port.as_ref(), target.port(), &self.security.opaque_ports)
    }

    fn l7_stream(&self, pod: &Arc<PodContext>, peer: SocketAddr, peer_identity: Option<Arc<str>>, target: SocketAddr, entry: Arc<crate::conns::ConnEntry>, held: (crate::admission::Permit, crate::conns::ConnGuard)) -> Arc<crate::l7::inbound::InboundStream> {
        Arc::new(crate::l7::inbound::InboundStream {
            pod: pod.clone(),
            telemetry: self.telemetry.clone(),
            model: self.model.clone(),
            security: self.security.clone(),
            peer,
            peer_identity,
            target,
            idle: self.idle.clone(),
            entry,
            held,
        })
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
    // HTTP (a stream from a sluice's L7 path, or one that turns out to be HTTP for a pod whose
    // policies need requests) is authorized per request; anything else here, per connection.
    let sniff = req.l7.is_none() && inbound.needs_requests(&pod);
    if req.l7.is_some() || sniff {
        // decided per request (or after sniffing) below
    } else if let Verdict::Denied(why) = inbound.authorize(&pod, req.peer, req.target, principal.as_ref()) {
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
            same_node: false,
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
        let ctx = inbound.l7_stream(&pod, req.peer, Some(req.peer_identity.clone()), req.target, guard.entry.clone(), (permit, guard));
        crate::l7::inbound::serve(crate::l7::io::TunnelIo::new(send, req.body), app, protocol, ctx).await;
        return;
    }
    let (mut send, mut body) = (send, req.body);
    let mut app = app;
    if sniff {
        inbound.security.counters.inbound_sniffed.fetch_add(1, Ordering::Relaxed);
        let hint = inbound.hint(req.target);
        let (protocol, prefix) = {
            let mut reader = RecvReader { recv: &mut body, pending: bytes::Bytes::new() };
            let (protocol, read) = crate::l7::detect::detect(&mut reader, hint, inbound.security.detect_timeout).await;
            // Bytes of a DATA frame the detection did not take go first too.
            (protocol, if reader.pending.is_empty() { read } else { [read, reader.pending].concat().into() })
        };
        if protocol != crate::l7::Protocol::Opaque {
            let ctx = inbound.l7_stream(&pod, req.peer, Some(req.peer_identity.clone()), req.target, guard.entry.clone(), (permit, guard));
            let io = crate::l7::io::Prefixed::new(prefix, crate::l7::io::TunnelIo::new(send, body));
            crate::l7::inbound::serve(io, app, protocol, ctx).await;
            return;
        }
        // Not HTTP: Istio's TCP semantics for this connection.
        if let Verdict::Denied(why) = inbound.authorize(&pod, req.peer, req.target, principal.as_ref()) {
            inbound.counters.policy_denied.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = lograte::shared().allow("policy-denied", &req.peer_identity) {
                warn!(pod = %pod.key, port = req.target.port(), source = %req.peer_identity, reason = %why, suppressed, "connection denied by authorization policy");
            }
            send.send_reset(h2::Reason::REFUSED_STREAM);
            return;
        }
        if !prefix.is_empty() {
            use tokio::io::AsyncWriteExt;
            if app.write_all(&prefix).await.is_err() {
                send.send_reset(h2::Reason::CONNECT_ERROR);
                return;
            }
            guard.entry.sent.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        }
    }
    // Bytes towards the application count as "received" from the peer's point of view of
    // this connection: sent = peer → app, received = app → peer, as for outbound.
    let tcp = InboundConn::new(&inbound, &pod, req.peer, req.target, Some(req.peer_identity.clone()));
    tcp.report(&inbound, &pod, &guard.entry, true);
    let (sent, received) = (&guard.entry.sent, &guard.entry.received);
    inbound.idle.run(pump::tcp_h2(app, bytes::Bytes::new(), send, body, received, sent), sent, received).await;
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
                tokio::spawn(handle_plaintext(stream, peer, pod, inbound, permit));
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

/// One plaintext connection; `permit` (its admission) is held until it ends, or handed to the
/// HTTP path, whose upgraded exchanges may outlive this function.
async fn handle_plaintext(
    client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    inbound: Arc<Inbound>,
    permit: crate::admission::Permit,
) {
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
    let mode = {
        let model = inbound.model.load();
        model.pod(&pod.namespace, &pod.name).map(|dest| {
            crate::policy::peer_auth::effective(&model, &inbound.security.root_namespace, dest, target.port())
        })
    };
    if let Some(mode) = mode.filter(|m| m.mode == PeerAuthMode::Strict) {
        inbound.counters.plaintext_refused_strict.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = lograte::shared().allow("strict-refused", &lograte::source_of_ip(peer.ip())) {
            warn!(pod = %pod.key, %peer, %target, by = %mode.source, suppressed, "plaintext connection refused: STRICT peer authentication (mTLS only)");
        }
        pump::reset(&client);
        return;
    }
    let mut client = client;
    let mut prefix = bytes::Bytes::new();
    if inbound.needs_requests(&pod) {
        inbound.security.counters.inbound_sniffed.fetch_add(1, Ordering::Relaxed);
        let hint = inbound.hint(target);
        let (protocol, read) = crate::l7::detect::detect(&mut client, hint, inbound.security.detect_timeout).await;
        if protocol != crate::l7::Protocol::Opaque {
            serve_plaintext_http(client, read, protocol, peer, target, pod, inbound, permit).await;
            return;
        }
        prefix = read;
    }
    if let Verdict::Denied(why) = inbound.authorize(&pod, peer, target, None) {
        inbound.counters.policy_denied.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = lograte::shared().allow("policy-denied", &lograte::source_of_ip(peer.ip())) {
            warn!(pod = %pod.key, %peer, port = target.port(), reason = %why, suppressed, "plaintext connection denied by authorization policy");
        }
        pump::reset(&client);
        return;
    }
    let Some((mut app, guard)) = deliver_plaintext(&client, peer, target, &pod, &inbound, "tcp").await else {
        return;
    };
    if !prefix.is_empty() {
        use tokio::io::AsyncWriteExt;
        if app.write_all(&prefix).await.is_err() {
            pump::reset(&client);
            return;
        }
        guard.entry.sent.fetch_add(prefix.len() as u64, Ordering::Relaxed);
    }
    let tcp = InboundConn::new(&inbound, &pod, peer, target, None);
    tcp.report(&inbound, &pod, &guard.entry, true);
    let (sent, received) = (&guard.entry.sent, &guard.entry.received);
    inbound.idle.run(l4::forward(client, app, sent, received), sent, received).await;
    tcp.report(&inbound, &pod, &guard.entry, false);
    drop(permit);
}

/// An accepted plaintext connection, opaque or HTTP: counts it, opens its delivery
/// connection into the pod's application and its `sluice conns` entry. If the application
/// cannot be reached the client is reset (counted, logged rate-limited) and `None` returned.
async fn deliver_plaintext(
    client: &TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    pod: &PodContext,
    inbound: &Inbound,
    protocol: &'static str,
) -> Option<(TcpStream, crate::conns::ConnGuard)> {
    inbound.counters.plaintext_accepted.fetch_add(1, Ordering::Relaxed);
    let app = match deliver::connect(&inbound.redirector, &pod.netns, pod.transparent, peer.ip(), target, inbound.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            inbound.counters.delivery_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = lograte::shared().allow("delivery-failed", &lograte::source_of_ip(peer.ip())) {
                info!(pod = %pod.key, %target, error = %e, suppressed, "delivery to the application failed; resetting");
            }
            pump::reset(client);
            return None;
        }
    };
    let guard = inbound.conns.open(
        &pod.stats,
        NewConn {
            direction: Direction::Inbound,
            peer_identity: None,
            mtls: false,
            same_node: false,
            source_pod: source_pod_name(&inbound.model, peer),
            source_addr: peer,
            original_dst: target,
            service: None,
            endpoint: target,
            protocol,
        },
    );
    Some((app, guard))
}

/// A plaintext connection that speaks HTTP, to a pod whose policies need requests: each
/// request is checked (JWT, authorization) and forwarded on one application connection.
async fn serve_plaintext_http(
    client: TcpStream,
    prefix: bytes::Bytes,
    protocol: crate::l7::Protocol,
    peer: SocketAddr,
    target: SocketAddr,
    pod: Arc<PodContext>,
    inbound: Arc<Inbound>,
    permit: crate::admission::Permit,
) {
    let Some((app, guard)) = deliver_plaintext(&client, peer, target, &pod, &inbound, protocol.as_str()).await else {
        return;
    };
    let ctx = inbound.l7_stream(&pod, peer, None, target, guard.entry.clone(), (permit, guard));
    crate::l7::inbound::serve(crate::l7::io::Prefixed::new(prefix, client), app, protocol, ctx).await;
}

/// Reads a tunnel stream's DATA frames for protocol detection, giving flow-control window back
/// as it goes; what it received but did not hand out stays in `pending`.
struct RecvReader<'a> {
    recv: &'a mut h2::RecvStream,
    pending: bytes::Bytes,
}

impl tokio::io::AsyncRead for RecvReader<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use bytes::Buf;
        use std::task::Poll;
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.pending = chunk;
                }
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
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

/// Why the destination side refused a connection handed over in-process (see `same_node`);
/// the same refusals an HBONE stream gets as a CONNECT status.
#[derive(Debug, thiserror::Error)]
pub enum LocalRefused {
    #[error("{0} is not an address of the destination pod")]
    WrongTarget(SocketAddr),
    #[error("{0} is one of sluice's own listeners")]
    Loop(SocketAddr),
    #[error("connection limit reached at the destination ({})", .0.as_str())]
    Limit(crate::admission::Refusal),
    #[error("denied by authorization policy: {0}")]
    Denied(String),
    #[error("delivery to the application failed: {0}")]
    Delivery(std::io::Error),
}

/// A connection the destination side accepted in-process: the application's socket and the
/// connection's place within the destination pod's bounds.
pub struct LocalAccepted {
    pub app: TcpStream,
    pub permit: crate::admission::Permit,
}

/// The destination side of a same-node hand-off, up to delivery: what [`handle_tunnel`] checks
/// before it answers a CONNECT, with `source` (the source pod, whose identity the node attested
/// at capture) in place of the certificate's peer. `per_request`: the source's L7 path carries
/// HTTP, authorized per request by [`serve_local_l7`] (as a stream marked `x-sluice-l7`);
/// otherwise the connection is authorized now with Istio's TCP semantics.
pub async fn accept_local(
    inbound: &Inbound,
    pod: &Arc<PodContext>,
    source: &PodContext,
    peer: SocketAddr,
    target: SocketAddr,
    per_request: bool,
) -> Result<LocalAccepted, LocalRefused> {
    inbound.counters.same_node_in.fetch_add(1, Ordering::Relaxed);
    if !pod.ips.contains(&target.ip()) || crate::deliver::is_link_local(target.ip()) {
        return Err(LocalRefused::WrongTarget(target));
    }
    if let Err(refused) = inbound.loop_guard.check_delivery(target) {
        inbound.loop_guard.refused(&source.identity_str, refused, crate::loopguard::Via::Delivery);
        return Err(LocalRefused::Loop(target));
    }
    let permit = inbound
        .admission
        .inbound_stream(&pod.slots, PeerKey::Identity(source.identity_str.clone()))
        .map_err(LocalRefused::Limit)?;
    if !per_request {
        // Opaque at the source (its detection read the first bytes and found no HTTP): for a
        // pod whose policies need requests, that is the sniff the tunnel's side would do.
        if inbound.needs_requests(pod) {
            inbound.security.counters.inbound_sniffed.fetch_add(1, Ordering::Relaxed);
        }
        if let Verdict::Denied(why) = inbound.authorize(pod, peer, target, Some(&source.identity)) {
            inbound.counters.policy_denied.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = lograte::shared().allow("policy-denied", &source.identity_str) {
                warn!(pod = %pod.key, port = target.port(), source = %source.identity_str, reason = %why, suppressed, "same-node connection denied by authorization policy");
            }
            return Err(LocalRefused::Denied(why));
        }
    }
    let app = deliver::connect(&inbound.redirector, &pod.netns, pod.transparent, peer.ip(), target, inbound.connect_timeout)
        .await
        .map_err(|e| {
            inbound.counters.delivery_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = lograte::shared().allow("delivery-failed", &source.identity_str) {
                info!(pod = %pod.key, %target, error = %e, suppressed, "delivery to the application failed");
            }
            LocalRefused::Delivery(e)
        })?;
    Ok(LocalAccepted { app, permit })
}

/// The registry entry of a same-node connection on the destination side.
fn local_conn(inbound: &Inbound, source: &PodContext, peer: SocketAddr, target: SocketAddr, protocol: &'static str) -> NewConn {
    NewConn {
        direction: Direction::Inbound,
        peer_identity: Some(source.identity_str.clone()),
        mtls: true,
        same_node: true,
        source_pod: source_pod_name(&inbound.model, peer),
        source_addr: peer,
        original_dst: target,
        service: None,
        endpoint: target,
        protocol,
    }
}

/// Serves HTTP handed over in-process by this node's L7 path (`stream`: its end of an
/// in-memory pipe), per request as for an HBONE stream marked `x-sluice-l7`: the destination's
/// JWT and authorization checks, `reporter=destination` telemetry.
pub async fn serve_local_l7<S>(
    inbound: Arc<Inbound>,
    pod: Arc<PodContext>,
    source: &PodContext,
    accepted: LocalAccepted,
    stream: S,
    protocol: crate::l7::Protocol,
    peer: SocketAddr,
    target: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let guard = inbound.conns.open(&pod.stats, local_conn(&inbound, source, peer, target, protocol.as_str()));
    let ctx = inbound.l7_stream(&pod, peer, Some(source.identity_str.clone()), target, guard.entry.clone(), (accepted.permit, guard));
    crate::l7::inbound::serve(stream, accepted.app, protocol, ctx).await;
}

/// The destination side's part of an opaque same-node connection: registry entry and
/// `reporter=destination` telemetry, around `forward` (which moves the bytes between the source
/// pod's socket and the application's, counting into the counters it is given).
pub async fn serve_local_opaque<F, Fut>(
    inbound: &Inbound,
    pod: &PodContext,
    source: &PodContext,
    accepted: LocalAccepted,
    peer: SocketAddr,
    target: SocketAddr,
    forward: F,
) where
    F: FnOnce(TcpStream, Arc<crate::conns::ConnEntry>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let guard = inbound.conns.open(&pod.stats, local_conn(inbound, source, peer, target, "tcp"));
    let tcp = InboundConn::new(inbound, pod, peer, target, Some(source.identity_str.clone()));
    tcp.report(inbound, pod, &guard.entry, true);
    forward(accepted.app, guard.entry.clone()).await;
    tcp.report(inbound, pod, &guard.entry, false);
    drop(accepted.permit);
}
