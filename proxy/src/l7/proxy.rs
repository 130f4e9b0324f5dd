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

use http::{
    header, request, uri::PathAndQuery, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

use super::{
    body::{Deadline, Tee},
    errors::ProxyError,
    filters,
    mirror::{self, MirrorTarget},
    server::ConnCtx,
    upstream::{Dial, Wire},
    Body,
};
use crate::{
    discovery::{
        route::{BackendRef, Filter, HeaderModifier},
        route_table::{RequestParts, Selected},
        Model,
    },
    l4,
};

/// Handles one request; never fails (errors become responses).
pub async fn handle(req: Request<Incoming>, ctx: Arc<ConnCtx>) -> Result<Response<Body>, Infallible> {
    let l7 = &ctx.dp.l7;
    l7.counters.requests.fetch_add(1, Ordering::Relaxed);
    ctx.entry.requests.fetch_add(1, Ordering::Relaxed);
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

/// The balancing key of a backend Service port (round-robin position).
pub fn balance_key(namespace: &str, name: &str, port: u16) -> u64 {
    let mut h = DefaultHasher::new();
    (namespace, name, port).hash(&mut h);
    h.finish()
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
    /// ResponseHeaderModifier filters of the rule and backend, in order.
    response_filters: Vec<HeaderModifier>,
    mirrors: Vec<MirrorTarget>,
}

impl Plan {
    fn simple(backend: String, endpoints: Arc<[SocketAddr]>, balance_key: u64) -> Plan {
        Plan {
            backend,
            endpoints,
            balance_key,
            request_timeout: None,
            backend_timeout: None,
            response_filters: Vec::new(),
            mirrors: Vec::new(),
        }
    }
}

enum Decision {
    Forward(Plan),
    /// A RequestRedirect filter answered.
    Respond(Response<Body>, Vec<HeaderModifier>),
}

/// Routes the request: the Service the client dialled, its route table for the client's
/// namespace, the matching rule and its filters, a backend by weight. Filters that change the
/// request (headers, rewrite) are applied to `parts` here.
fn decide(model: &Model, ctx: &ConnCtx, parts: &mut request::Parts, grpc: bool) -> Result<Decision, ProxyError> {
    let Some(svc) = model.service_for(ctx.orig.ip(), ctx.orig.port()) else {
        // Not a Service (a pod IP, an outside address): forwarded as dialled.
        return Ok(Decision::Forward(Plan::simple(ctx.orig.to_string(), Arc::from([ctx.orig].as_slice()), 0)));
    };
    let port = svc.port().port;
    let table = model.port_routes(svc.namespace(), svc.name(), port).and_then(|r| r.for_client(&ctx.pod.namespace));
    let Some(table) = table else {
        // No route: the Service's own endpoints.
        return Ok(Decision::Forward(Plan::simple(
            format!("{}/{}:{port}", svc.namespace(), svc.name()),
            svc.endpoints().clone(),
            balance_key(svc.namespace(), svc.name(), port),
        )));
    };
    let request = RequestParts { method: &parts.method, path: parts.uri.path(), query: parts.uri.query(), headers: &parts.headers };
    let sel = table.select(&request, grpc).ok_or(ProxyError::NoRoute)?;
    let mut response_filters = Vec::new();
    let mut mirrors = Vec::new();
    if let Some(resp) = apply_filters(&sel.rule.filters, sel, ctx, model, parts, port, &mut response_filters, &mut mirrors) {
        return Ok(Decision::Respond(resp, response_filters));
    }
    let backend = pick_backend(&sel.rule.backends).ok_or_else(|| {
        ProxyError::BadBackend(format!(
            "rule {} of {} {} has no backend with a weight above 0",
            sel.rule_index,
            sel.route.kind,
            sel.route.key()
        ))
    })?;
    if let Some(why) = &backend.invalid {
        return Err(ProxyError::BadBackend(format!("backend {}/{}: {why}", backend.namespace, backend.name)));
    }
    let target = backend.port.and_then(|p| model.service_port(&backend.namespace, &backend.name, p)).ok_or_else(|| {
        ProxyError::BadBackend(format!(
            "backend Service {}/{} port {} does not exist",
            backend.namespace,
            backend.name,
            backend.port.map_or("?".into(), |p| p.to_string())
        ))
    })?;
    if let Some(resp) = apply_filters(&backend.filters, sel, ctx, model, parts, port, &mut response_filters, &mut mirrors) {
        return Ok(Decision::Respond(resp, response_filters));
    }
    let bport = target.port().port;
    Ok(Decision::Forward(Plan {
        backend: format!("{}/{}:{bport}", backend.namespace, backend.name),
        endpoints: target.endpoints().clone(),
        balance_key: balance_key(&backend.namespace, &backend.name, bport),
        request_timeout: sel.rule.timeouts.request,
        backend_timeout: sel.rule.timeouts.backend_request,
        response_filters,
        mirrors,
    }))
}

/// Applies a filter list in order. Returns a response if a RequestRedirect answers.
#[allow(clippy::too_many_arguments)]
fn apply_filters(
    list: &[Filter],
    sel: Selected<'_>,
    ctx: &ConnCtx,
    model: &Model,
    parts: &mut request::Parts,
    service_port: u16,
    response_filters: &mut Vec<HeaderModifier>,
    mirrors: &mut Vec<MirrorTarget>,
) -> Option<Response<Body>> {
    for f in list {
        match f {
            Filter::RequestHeaderModifier(m) => filters::modify_headers(&mut parts.headers, m),
            Filter::ResponseHeaderModifier(m) => response_filters.push(m.clone()),
            Filter::UrlRewrite(rw) => filters::rewrite(parts, rw, sel.matched, ctx.wire),
            Filter::RequestRedirect(rd) => return Some(filters::redirect(parts, rd, sel.matched, service_port)),
            Filter::RequestMirror(m) => mirrors.extend(mirror::resolve(ctx, model, m)),
        }
    }
    None
}

/// A backend by weight (weight 0 never); `None` if no backend has weight.
fn pick_backend(backends: &[BackendRef]) -> Option<&BackendRef> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut x = fastrand::u64(..total);
    for b in backends {
        let w = u64::from(b.weight);
        if x < w {
            return Some(b);
        }
        x -= w;
    }
    None
}

async fn forward(req: Request<Incoming>, ctx: &Arc<ConnCtx>, grpc: bool) -> Result<Response<Body>, ProxyError> {
    let started = tokio::time::Instant::now();
    let (mut parts, body) = req.into_parts();
    let model = ctx.dp.model.load_full();
    let plan = match decide(&model, ctx, &mut parts, grpc)? {
        Decision::Forward(plan) => plan,
        Decision::Respond(mut resp, response_filters) => {
            for m in &response_filters {
                filters::modify_headers(resp.headers_mut(), m);
            }
            return Ok(resp);
        }
    };
    let (endpoint, inflight) = ctx
        .dp
        .l7
        .balancer
        .pick(plan.balance_key, &plan.endpoints)
        .ok_or_else(|| ProxyError::NoEndpoints(plan.backend.clone()))?;
    let mesh_peer = l4::mesh_identity(&model, endpoint, &ctx.dp.trust_domain);
    drop(model);

    let mut req = Request::from_parts(parts, body);
    let upgrade = wants_upgrade(&req);
    if upgrade && ctx.wire == Wire::Http2 {
        return Err(ProxyError::Unsupported("CONNECT and protocol upgrades over HTTP/2 are not supported"));
    }
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut upstream_req = prepare(req, ctx.wire, upgrade);
    if !plan.mirrors.is_empty() {
        let (parts, body) = upstream_req.into_parts();
        let (tee, copy) = Tee::new(body, mirror::BODY_LIMIT);
        mirror::spawn(ctx, plan.mirrors, &parts, copy);
        upstream_req = Request::from_parts(parts, tee.boxed());
    }

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
        Ok((r, dispatched)) => {
            inflight.complete(dispatched);
            r
        }
        Err(e) => {
            inflight.failed();
            return Err(e.into());
        }
    };

    let mut upgraded = false;
    if let Some(client_upgrade) = client_upgrade {
        if is_upgraded(&resp) {
            upgraded = true;
            ctx.dp.l7.counters.upgrades.fetch_add(1, Ordering::Relaxed);
            bridge_upgrade(client_upgrade, hyper::upgrade::on(&mut resp), ctx.pod.key.clone(), endpoint);
        }
    }
    // A 101 must keep `Upgrade` and `Connection: upgrade` (RFC 9110 §7.8): the client checks
    // them before it switches protocols.
    strip_hop_by_hop(resp.headers_mut(), upgraded);
    for m in &plan.response_filters {
        filters::modify_headers(resp.headers_mut(), m);
    }
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
