//! The destination side of HTTP: an HBONE stream that the source node's sluice marked as
//! carrying HTTP (`x-sluice-l7` on its CONNECT), and, for a pod that a policy needing requests
//! selects (an L7 AuthorizationPolicy, a RequestAuthentication), any other tunnel stream or
//! plaintext connection that turned out to be HTTP, is served by hyper here, and each request is
//! forwarded on the connection's own connection to the application. One inbound connection maps
//! to one application connection, as at L4 (the source side pools and balances; this side
//! observes and enforces): so the destination node reports every request
//! (`reporter=destination` metrics, access logs, the server-side span of a trace), checks its
//! JWT (401 when invalid) and authorizes it (403 `RBAC: access denied`) before the application
//! sees it.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{
    body::Incoming,
    client::conn::{http1 as client1, http2 as client2},
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::Mutex};
use tracing::debug;

use super::{
    detect::Protocol,
    errors::ProxyError,
    observe::{grpc_status, CountBody, Observation, Observed, PeerInfo},
    Body,
};
use crate::{
    discovery::{Model, Service},
    l4::PodContext,
    telemetry::{Reporter, Telemetry},
};

/// What every request on one inbound connection (tunnel stream or plaintext) shares.
pub struct InboundStream {
    pub pod: Arc<PodContext>,
    pub telemetry: Arc<Telemetry>,
    pub model: Arc<arc_swap::ArcSwap<Model>>,
    /// Root namespace, JWKS cache, counters.
    pub security: Arc<crate::inbound::Security>,
    /// The peer (the source pod's address, or a plaintext client's).
    pub peer: SocketAddr,
    /// The client's verified SPIFFE ID; `None` for plaintext.
    pub peer_identity: Option<Arc<str>>,
    /// The application address the stream was for.
    pub target: SocketAddr,
    /// Upgraded exchanges are closed after this long without a byte either way.
    pub idle: Arc<crate::idle::IdleTimeout>,
    pub entry: Arc<crate::conns::ConnEntry>,
    /// The stream's admission permit and registry entry: held while anything of the stream
    /// lives, hyper's connection or the bridge of an upgraded exchange (which holds this).
    pub held: (crate::admission::Permit, crate::conns::ConnGuard),
}

enum AppSender {
    Http1(Mutex<client1::SendRequest<Body>>),
    Http2(client2::SendRequest<Body>),
}

/// Serves HTTP on an inbound connection (a tunnel stream, or plaintext with the bytes protocol
/// detection read replayed first), forwarding to the application over `app`.
pub async fn serve<S>(stream: S, app: TcpStream, protocol: Protocol, ctx: Arc<InboundStream>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let sender = match handshake(app, protocol).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            debug!(pod = %ctx.pod.key, error = %e, "HTTP handshake with the application failed");
            return;
        }
    };
    let svc_ctx = ctx.clone();
    let service = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let sender = sender.clone();
        Box::pin(async move { Ok::<_, std::convert::Infallible>(handle(req, ctx, &sender).await) })
    });
    let io = TokioIo::new(stream);
    let result = match protocol {
        Protocol::Http2 => http2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).serve_connection(io, service).await,
        _ => http1::Builder::new().timer(TokioTimer::new()).half_close(true).serve_connection(io, service).with_upgrades().await,
    };
    if let Err(e) = result {
        debug!(pod = %ctx.pod.key, peer = %ctx.peer, error = %e, "inbound HTTP stream ended with an error");
    }
}

async fn handshake(app: TcpStream, protocol: Protocol) -> Result<AppSender, hyper::Error> {
    let io = TokioIo::new(app);
    Ok(match protocol {
        Protocol::Http2 => {
            let (sender, conn) = client2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).handshake(io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            AppSender::Http2(sender)
        }
        _ => {
            let (sender, conn) = client1::Builder::new().handshake(io).await?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            AppSender::Http1(Mutex::new(sender))
        }
    })
}

async fn handle(req: Request<Incoming>, ctx: Arc<InboundStream>, sender: &AppSender) -> Response<Body> {
    let grpc = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"));
    let (mut parts, body) = req.into_parts();
    let span = ctx.telemetry.start_span(Reporter::Destination, &mut parts.headers);
    let authority = super::filters::request_host(&parts).unwrap_or_default();
    let model = ctx.model.load();
    let request_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut obs = Observation {
        telemetry: ctx.telemetry.clone(),
        reporter: Reporter::Destination,
        start: Instant::now(),
        start_system: std::time::SystemTime::now(),
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        authority,
        grpc,
        source: PeerInfo {
            workload: model.workload_by_ip(ctx.peer.ip()).cloned(),
            principal: ctx.peer_identity.clone(),
            addr: Some(ctx.peer),
        },
        destination: PeerInfo {
            workload: Some(ctx.pod.workload.clone()),
            principal: Some(ctx.pod.identity_str.clone()),
            addr: Some(ctx.target),
        },
        service: None,
        upstream: Some(ctx.target),
        mtls: ctx.peer_identity.is_some(),
        access_log: crate::telemetry::access_log_wanted(&model, &[&ctx.pod.namespace]),
        span,
        request_bytes: request_bytes.clone(),
        flags: "-",
        status: 0,
        grpc_status: None,
    };
    obs.service = service_of(&model, &obs.authority, ctx.target);
    if let Some(w) = &obs.source.workload {
        obs.access_log |= crate::telemetry::access_log_wanted(&model, &[&w.namespace]);
    }
    drop(model);
    if let Err(reply) = check_request(&mut parts, &ctx, grpc).await {
        obs.status = reply.status().as_u16();
        obs.grpc_status = grpc_status(reply.headers());
        return reply.map(|b| Observed::new(b, obs).boxed());
    }
    let req = Request::from_parts(parts, CountBody::new(body, request_bytes).map_err(Into::into).boxed());
    let upgrade = super::proxy::wants_upgrade(&req);
    let mut req = req;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let upgrade_ask = upgrade.then(|| super::proxy::UpgradeAsk::of(&req));
    let result = match sender {
        AppSender::Http1(s) => {
            let mut s = s.lock().await;
            match s.ready().await {
                Ok(()) => s.send_request(req).await,
                Err(e) => Err(e),
            }
        }
        AppSender::Http2(s) => s.clone().send_request(req).await,
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let err = ProxyError::Upstream(super::upstream::UpstreamError::Request { endpoint: ctx.target, source: e });
            obs.flags = err.flag();
            let resp = err.into_response(grpc);
            obs.status = resp.status().as_u16();
            obs.grpc_status = grpc_status(resp.headers());
            return resp.map(|b| Observed::new(b, obs).boxed());
        }
    };
    // Only a real switch (see `proxy::is_upgraded`) becomes a pipe; a 101 nobody asked for is
    // the application's protocol error, answered 502.
    let upgraded = match super::proxy::is_upgraded(upgrade_ask.as_ref(), &resp) {
        Ok(u) => u,
        Err(err) => {
            obs.flags = err.flag();
            let resp = err.into_response(grpc);
            obs.status = resp.status().as_u16();
            obs.grpc_status = grpc_status(resp.headers());
            return resp.map(|b| Observed::new(b, obs).boxed());
        }
    };
    if let (true, Some(client_upgrade)) = (upgraded, client_upgrade) {
        // The bridge holds the stream's context (its permit and `sluice conns` entry) until it
        // ends, and counts the application side's bytes into the entry.
        let upstream = hyper::upgrade::on(&mut resp);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (sent, received) = (&ctx.entry.sent, &ctx.entry.received);
            let end = super::upgrade::bridge(client_upgrade, upstream, &ctx.idle, sent, received).await;
            debug!(pod = %ctx.pod.key, target = %ctx.target, peer = ?ctx.peer_identity, ?end, "inbound upgraded connection ended");
        });
    }
    obs.status = resp.status().as_u16();
    obs.grpc_status = grpc_status(resp.headers());
    resp.map(|b: Incoming| -> Body { Observed::new(b.map_err(Into::into), obs).boxed() })
}

/// RequestAuthentication, then authorization, for one request; the reply that refuses it.
/// The head is rewritten for the application (token removed, JWT outputs set).
async fn check_request(parts: &mut http::request::Parts, ctx: &InboundStream, grpc: bool) -> Result<(), Response<Body>> {
    use crate::policy::{self, request as req, Attributes, Request as PolicyRequest, Source};
    use std::sync::atomic::Ordering;
    let sec = &ctx.security;
    let model = ctx.model.load_full();
    let Some(dest) = model.pod(&ctx.pod.namespace, &ctx.pod.name) else {
        return Err(local_reply(StatusCode::SERVICE_UNAVAILABLE, "destination pod is no longer in the model", grpc));
    };
    let rules = crate::jwt::authn::rules_for(&model, &sec.root_namespace, dest);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let verified = match crate::jwt::authn::authenticate(parts, &rules, &sec.jwks, now).await {
        Ok(v) => v,
        Err(e) => {
            sec.counters.jwt_rejected.fetch_add(1, Ordering::Relaxed);
            let source = ctx.peer_identity.as_deref().map_or_else(|| crate::lograte::source_of_ip(ctx.peer.ip()), str::to_owned);
            if let Some(suppressed) = crate::lograte::shared().allow("jwt-rejected", &source) {
                tracing::info!(pod = %ctx.pod.key, %source, path = %parts.uri.path(), reason = %e, suppressed, "request refused: invalid JWT (401)");
            }
            let mut reply = local_reply(StatusCode::UNAUTHORIZED, &e.to_string(), grpc);
            let realm = format!("Bearer realm=\"http://{}{}\", error=\"invalid_token\"", super::filters::request_host(parts).unwrap_or_default(), parts.uri.path());
            if let Ok(v) = http::HeaderValue::from_str(&realm) {
                reply.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return Err(reply);
        }
    };
    if verified.is_some() {
        sec.counters.jwt_verified.fetch_add(1, Ordering::Relaxed);
    }
    let target = parts.uri.path_and_query().map_or_else(|| parts.uri.path(), |p| p.as_str());
    let path = req::normalize_path(target);
    let host = super::filters::request_host(parts).unwrap_or_default().to_ascii_lowercase();
    let attrs = Attributes {
        source: ctx.peer_identity.as_deref().map_or(Source::PLAINTEXT, Source::mtls),
        source_ip: Some(ctx.peer.ip().to_canonical()),
        dest_ip: Some(ctx.target.ip().to_canonical()),
        dest_port: ctx.target.port(),
        request: Some(PolicyRequest {
            method: parts.method.as_str(),
            path: &path,
            host: &host,
            headers: &parts.headers,
            remote_ip: req::remote_ip(&parts.headers),
            auth: verified.as_ref(),
        }),
    };
    let decision = policy::authorize(&model, &sec.root_namespace, dest, &attrs);
    let source = || ctx.peer_identity.as_deref().map_or_else(|| crate::lograte::source_of_ip(ctx.peer.ip()), str::to_owned);
    if let Some(audit) = &decision.audit {
        sec.counters.policy_audited.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = crate::lograte::shared().allow("policy-audit", &source()) {
            tracing::info!(pod = %ctx.pod.key, source = %source(), method = %parts.method, path = %path, policy = %audit, allowed = decision.allowed, suppressed, "request matched an AUDIT policy");
        }
    }
    if !decision.allowed {
        sec.counters.http_denied.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = crate::lograte::shared().allow("policy-denied", &source()) {
            tracing::warn!(pod = %ctx.pod.key, source = %source(), method = %parts.method, path = %path, reason = decision.reason, policy = decision.policy.as_deref().unwrap_or("no policy"), suppressed, "request denied by authorization policy (403)");
        }
        return Err(local_reply(StatusCode::FORBIDDEN, policy::DENIED_BODY, grpc));
    }
    Ok(())
}

/// A reply sluice makes itself for a security decision: the status and Envoy's text, as Istio
/// users know them; for gRPC, trailers-only with the status gRPC maps it to.
fn local_reply(status: StatusCode, text: &str, grpc: bool) -> Response<Body> {
    use http::HeaderValue;
    if grpc {
        let mut r = Response::new(super::empty_body());
        let code: u16 = match status {
            StatusCode::UNAUTHORIZED => 16, // UNAUTHENTICATED
            StatusCode::FORBIDDEN => 7,     // PERMISSION_DENIED
            _ => 14,                        // UNAVAILABLE
        };
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(code));
        if let Ok(v) = HeaderValue::from_str(text) {
            h.insert("grpc-message", v);
        }
        return r;
    }
    let mut r = Response::new(super::full_body(bytes::Bytes::copy_from_slice(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The Service a request arriving at an endpoint was for: named by its authority (a cluster
/// DNS name or the ClusterIP), else the only Service with that endpoint.
fn service_of(model: &Model, authority: &str, endpoint: SocketAddr) -> Option<Arc<Service>> {
    let host = authority.rsplit_once(':').map_or(authority, |(h, p)| if p.bytes().all(|b| b.is_ascii_digit()) { h } else { authority });
    if let Ok(ip) = host.parse() {
        let port = authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(80);
        if let Some(t) = model.service_for(ip, port) {
            return Some(t.service().clone());
        }
    }
    // name, name.ns, name.ns.svc, name.ns.svc.<cluster domain>
    let mut labels = host.split('.');
    if let (Some(name), Some(ns)) = (labels.next(), labels.next()) {
        if labels.next().is_none_or(|l| l == "svc") {
            if let Some(svc) = model.service(ns, name) {
                return Some(svc.clone());
            }
        }
    }
    let (ns, name) = model.service_of_endpoint(endpoint)?;
    model.service(ns, name).cloned()
}
