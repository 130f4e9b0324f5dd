//! One request through the proxy: find where it goes (the Service the client dialled, its
//! routes, a weighted backend), pick an endpoint (P2C over peak-EWMA by default), send it on a
//! pooled upstream connection from the client pod's namespace (inside the HBONE tunnel when
//! the endpoint is an enrolled pod), and stream the response back. When that fails, the
//! client gets a response sluice makes itself ([`super::errors`]), never a hang.

use std::{
    convert::Infallible,
    hash::{DefaultHasher, Hash, Hasher},
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use http::{header, uri::PathAndQuery, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

use super::{
    body::Deadline,
    errors::ProxyError,
    server::ConnCtx,
    upstream::{Dial, Wire},
    Body,
};
use crate::{discovery::Model, l4};

/// Handles one request; never fails (errors become responses).
pub async fn handle(req: Request<Incoming>, ctx: Arc<ConnCtx>) -> Result<Response<Body>, Infallible> {
    let l7 = &ctx.dp.l7;
    l7.counters.requests.fetch_add(1, Ordering::Relaxed);
    let grpc = is_grpc(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let result = forward(req, &ctx, grpc).await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            l7.counters.local_replies.fetch_add(1, Ordering::Relaxed);
            info!(
                pod = %ctx.pod.key,
                dst = %ctx.orig,
                %method,
                path = %path,
                status = e.status().as_u16(),
                flag = e.flag(),
                error = %e,
                "request answered by sluice"
            );
            e.into_response(grpc)
        }
    };
    if ctx.wire == Wire::Http1 && ctx.closing.load(Ordering::Relaxed) {
        // Draining: this connection's last response (see server.rs).
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// Where one request goes, decided from one model snapshot.
struct Plan {
    /// "namespace/name:port" of the backend Service, or the address dialled.
    backend: String,
    endpoints: Arc<[SocketAddr]>,
    /// Identifies the endpoint set for round robin.
    balance_key: u64,
    request_timeout: Option<Duration>,
    backend_timeout: Option<Duration>,
}

fn plan(model: &Model, ctx: &ConnCtx) -> Result<Plan, ProxyError> {
    let target = crate::routing::resolve(model, ctx.orig);
    let backend = match (&target.service, model.service_for(ctx.orig.ip(), ctx.orig.port())) {
        (Some(name), Some(t)) => format!("{name}:{}", t.port().port),
        _ => ctx.orig.to_string(),
    };
    let mut h = DefaultHasher::new();
    backend.hash(&mut h);
    Ok(Plan {
        balance_key: h.finish(),
        backend,
        endpoints: target.endpoints,
        request_timeout: None,
        backend_timeout: None,
    })
}

async fn forward(mut req: Request<Incoming>, ctx: &ConnCtx, _grpc: bool) -> Result<Response<Body>, ProxyError> {
    let started = tokio::time::Instant::now();
    let (plan, endpoint, inflight, mesh_peer) = {
        let model = ctx.dp.model.load();
        let plan = plan(&model, ctx)?;
        let (endpoint, inflight) = ctx
            .dp
            .l7
            .balancer
            .pick(plan.balance_key, &plan.endpoints)
            .ok_or_else(|| ProxyError::NoEndpoints(plan.backend.clone()))?;
        let mesh_peer = l4::mesh_identity(&model, endpoint, &ctx.dp.trust_domain);
        (plan, endpoint, inflight, mesh_peer)
    };

    let upgrade = wants_upgrade(&req);
    if upgrade && ctx.wire == Wire::Http2 {
        return Err(ProxyError::Unsupported("CONNECT and protocol upgrades over HTTP/2 are not supported"));
    }
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let upstream_req = prepare(req, ctx.wire, upgrade);

    let dial = Dial { pod: &ctx.pod, dp: &ctx.dp, endpoint, mesh_peer, wire: ctx.wire };
    let upstreams = &ctx.dp.l7.upstreams;
    let attempt = async {
        if upgrade {
            upstreams.send_upgrade(&dial, upstream_req).await
        } else {
            upstreams.send(&dial, upstream_req).await
        }
    };
    let deadline = plan.request_timeout.map(|t| started + t);
    let attempt_deadline = match (deadline, plan.backend_timeout.map(|t| tokio::time::Instant::now() + t)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let result = match attempt_deadline {
        None => attempt.await,
        Some(at) => match tokio::time::timeout_at(at, attempt).await {
            Ok(r) => r,
            Err(_) => {
                inflight.failed();
                return Err(match (deadline, plan.request_timeout) {
                    (Some(d), Some(t)) if d <= at => ProxyError::RequestTimeout(t),
                    _ => ProxyError::BackendTimeout(plan.backend_timeout.unwrap_or_default()),
                });
            }
        },
    };
    let mut resp = match result {
        Ok(r) => {
            inflight.complete();
            r
        }
        Err(e) => {
            inflight.failed();
            return Err(e.into());
        }
    };

    if let Some(client_upgrade) = client_upgrade {
        if is_upgraded(&resp) {
            ctx.dp.l7.counters.upgrades.fetch_add(1, Ordering::Relaxed);
            bridge_upgrade(client_upgrade, hyper::upgrade::on(&mut resp), ctx.pod.key.clone(), endpoint);
        }
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    let resp = resp.map(|b: Incoming| -> Body {
        match (deadline, plan.request_timeout) {
            (Some(at), Some(limit)) => Deadline::new(b, at, limit).boxed(),
            _ => b.map_err(Into::into).boxed(),
        }
    });
    debug!(pod = %ctx.pod.key, backend = %plan.backend, %endpoint, status = resp.status().as_u16(), "proxied");
    Ok(resp)
}

/// `content-type: application/grpc` (or `application/grpc+proto`, ...).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// CONNECT, or an HTTP/1.1 `Connection: upgrade` with an `Upgrade` header (WebSocket).
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    if req.method() == Method::CONNECT {
        return true;
    }
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn is_upgraded(resp: &Response<Incoming>) -> bool {
    resp.status() == StatusCode::SWITCHING_PROTOCOLS || resp.status().is_success()
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Makes the client's request fit for the upstream connection: hop-by-hop headers removed
/// (except what an upgrade needs), HTTP/1.1 in origin form with a Host, HTTP/2 with scheme and
/// authority.
fn prepare(req: Request<Incoming>, wire: Wire, upgrade: bool) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    match wire {
        Wire::Http1 => {
            if parts.method != Method::CONNECT && parts.uri.authority().is_some() {
                // Absolute-form from the client: the upstream wants origin form and a Host.
                if !parts.headers.contains_key(header::HOST) {
                    if let Some(v) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                        parts.headers.insert(header::HOST, v);
                    }
                }
                let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
                parts.uri = Uri::from(pq);
            }
            parts.version = Version::HTTP_11;
        }
        Wire::Http2 => {
            if parts.uri.scheme().is_none() || parts.uri.authority().is_none() {
                let authority = parts
                    .uri
                    .authority()
                    .map(|a| a.as_str().to_owned())
                    .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
                let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
                if let Some(a) = authority {
                    if let Ok(u) = Uri::try_from(format!("http://{a}{pq}")) {
                        parts.uri = u;
                    }
                }
            }
            parts.version = Version::HTTP_2;
        }
    }
    Request::from_parts(parts, body.map_err(Into::into).boxed())
}

/// Removes connection-specific headers (RFC 9110 §7.6.1): they describe the client's
/// connection to sluice, not sluice's connection to the upstream.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && !(keep_upgrade && t == "upgrade"))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for h in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(h);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    // TE may only say "trailers" past a hop (gRPC needs exactly that).
    if let Some(te) = headers.get(header::TE) {
        if !te.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))) {
            headers.remove(header::TE);
        } else {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// After a 101 (or a 2xx to CONNECT), both connections belong to the upgraded protocol:
/// copy bytes both ways until both sides are done.
fn bridge_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    pod: Arc<str>,
    endpoint: SocketAddr,
) {
    tokio::spawn(async move {
        let (c, u) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(%pod, %endpoint, error = %e, "upgrade did not complete");
                return;
            }
        };
        let started = Instant::now();
        let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
        match tokio::io::copy_bidirectional(&mut c, &mut u).await {
            Ok((up, down)) => debug!(%pod, %endpoint, up, down, ms = started.elapsed().as_millis() as u64, "upgraded connection closed"),
            Err(e) => debug!(%pod, %endpoint, error = %e, "upgraded connection failed"),
        }
    });
}
