//! The destination side of an HTTP upstream connection: an HBONE stream that the source
//! node's sluice marked as carrying HTTP (`x-sluice-l7` on its CONNECT) is served by hyper here
//! too, and each request is forwarded on the stream's own connection to the application. One
//! tunnel stream maps to one application connection, as at L4 (the source side pools and
//! balances; this side observes): so the destination node reports every request
//! (`reporter=destination` metrics, access logs, the server-side span of a trace) and can
//! later authorize requests, not just connections.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::{header, Request, Response};
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
    io::TunnelIo,
    observe::{grpc_status, CountBody, Observation, Observed, PeerInfo},
    Body,
};
use crate::{
    discovery::{Model, Service},
    l4::PodContext,
    telemetry::{Reporter, Telemetry},
};

/// What every request on one inbound tunnel stream shares.
pub struct InboundStream {
    pub pod: Arc<PodContext>,
    pub telemetry: Arc<Telemetry>,
    pub model: Arc<arc_swap::ArcSwap<Model>>,
    /// The tunnel's peer (the source pod's address).
    pub peer: SocketAddr,
    pub peer_identity: Arc<str>,
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

/// Serves HTTP on the tunnel stream, forwarding to the application over `app`.
pub async fn serve(stream: TunnelIo, app: TcpStream, protocol: Protocol, ctx: Arc<InboundStream>) {
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
            principal: Some(ctx.peer_identity.clone()),
            addr: Some(ctx.peer),
        },
        destination: PeerInfo {
            workload: Some(ctx.pod.workload.clone()),
            principal: Some(ctx.pod.identity_str.clone()),
            addr: Some(ctx.target),
        },
        service: None,
        upstream: Some(ctx.target),
        mtls: true,
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
            debug!(pod = %ctx.pod.key, target = %ctx.target, peer = %ctx.peer_identity, ?end, "inbound upgraded connection ended");
        });
    }
    obs.status = resp.status().as_u16();
    obs.grpc_status = grpc_status(resp.headers());
    resp.map(|b: Incoming| -> Body { Observed::new(b.map_err(Into::into), obs).boxed() })
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
