//! One request through the proxy: where it goes ([`super::plan`]), the limits and faults that
//! apply (per-pod limit, local rate limit, fault injection, circuit breaker), then attempts:
//! pick an endpoint (P2C over peak-EWMA by default, avoiding endpoints already tried and those
//! ejected by outlier detection), send it on a pooled upstream connection from the client
//! pod's namespace (inside the HBONE tunnel when the endpoint is an enrolled pod), retry what
//! the retry policy and its budget allow, and stream the response back. When it fails, the
//! client gets a response sluice makes itself ([`super::errors`]), never a hang.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header, request, uri::PathAndQuery, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
    Version,
};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{debug, info};

use super::{
    balance::Outcome,
    body::{Deadline, Tee},
    errors::ProxyError,
    filters, full_body,
    limits::{Breaker, Overflow},
    mirror,
    observe::{self, CountBody, Observation, Observed, PeerInfo},
    plan::{self, Decision, Endpoints, Plan},
    server::ConnCtx,
    upgrade,
    upstream::{Dial, SendError, UpstreamError, Wire},
    Body,
};
use crate::{discovery::traffic::RetryPolicy, l4, telemetry::Reporter};

pub use super::plan::balance_key;

/// The response flag of a request whose client closed its connection before sluice had an
/// answer for it (Envoy's `DC`).
pub const DOWNSTREAM_CLOSED: &str = "downstream-closed";

/// A request body is kept for a retry only up to this size (a larger one streams, and is not
/// retried once sent).
const RETRY_BODY_LIMIT: usize = 64 * 1024;

/// Handles one request; never fails (errors become responses).
pub async fn handle(req: Request<Incoming>, ctx: Arc<ConnCtx>) -> Result<Response<Body>, Infallible> {
    let l7 = &ctx.dp.l7;
    l7.counters.requests.fetch_add(1, Ordering::Relaxed);
    ctx.entry.requests.fetch_add(1, Ordering::Relaxed);
    let grpc = is_grpc(req.headers());
    let client_eof = req.extensions().get::<super::server::ClientEof>().cloned();
    let (mut parts, body) = req.into_parts();
    let span = ctx.dp.telemetry.start_span(Reporter::Source, &mut parts.headers);
    let request_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut obs = Observation {
        telemetry: ctx.dp.telemetry.clone(),
        reporter: Reporter::Source,
        start: std::time::Instant::now(),
        start_system: std::time::SystemTime::now(),
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        authority: filters::request_host(&parts).unwrap_or_default(),
        grpc,
        source: PeerInfo {
            workload: Some(ctx.pod.workload.clone()),
            principal: Some(ctx.pod.identity_str.clone()),
            addr: Some(ctx.entry.source_addr),
        },
        destination: PeerInfo::default(),
        service: ctx.dp.model.load().service_for(ctx.orig.ip(), ctx.orig.port()).map(|t| t.service().clone()),
        upstream: None,
        mtls: false,
        access_log: false,
        span,
        request_bytes: request_bytes.clone(),
        flags: "-",
        status: 0,
        grpc_status: None,
    };
    let req = Request::from_parts(parts, CountBody::new(body, request_bytes).map_err(Into::into).boxed());
    let result = forward(req, &ctx, grpc, &mut obs).await;
    // The client closed its side before there was an answer: it may be reading still (a
    // half-close), or be gone (killed, gave up), which look the same until sluice writes.
    let mut unseen = false;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) if client_eof.as_ref().is_some_and(|eof| eof.seen()) => {
            // sluice's own error reply is still written (a half-closed client gets it), but it
            // is not recorded as a failure the client saw: response code 0, as Envoy and Istio
            // report a downstream disconnect.
            unseen = true;
            obs.flags = DOWNSTREAM_CLOSED;
            if let Some(suppressed) = crate::lograte::shared().allow("request-unanswered", &ctx.pod.key) {
                info!(
                    pod = %ctx.pod.key,
                    dst = %ctx.orig,
                    method = %obs.method,
                    path = %obs.uri.path(),
                    reply = e.status().as_u16(),
                    error = %e,
                    suppressed,
                    "request ended after the client had closed its connection; not counted as answered"
                );
            }
            e.into_response(grpc)
        }
        Err(e) => {
            obs.flags = e.flag();
            l7.counters.local_replies.fetch_add(1, Ordering::Relaxed);
            if matches!(e, ProxyError::EgressBlocked(..)) {
                l7.counters.egress_refused.fetch_add(1, Ordering::Relaxed);
            }
            // One line per request would be one per request a client chooses to make fail:
            // per pod and kind of answer, within the log's rates (the access log and metrics
            // have every request).
            if let Some(suppressed) = crate::lograte::shared().allow(e.flag(), &ctx.pod.key) {
                info!(
                    pod = %ctx.pod.key,
                    dst = %ctx.orig,
                    method = %obs.method,
                    path = %obs.uri.path(),
                    status = e.status().as_u16(),
                    flag = e.flag(),
                    error = %e,
                    suppressed,
                    "request answered by sluice"
                );
            }
            e.into_response(grpc)
        }
    };
    if ctx.wire == Wire::Http1 && ctx.closing.load(Ordering::Relaxed) {
        // Draining: this connection's last response (see server.rs).
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    obs.status = if unseen { 0 } else { resp.status().as_u16() };
    obs.grpc_status = if unseen { None } else { observe::grpc_status(resp.headers()) };
    {
        let model = ctx.dp.model.load();
        let dst_ns = obs.destination.workload.as_ref().map(|w| w.namespace.clone());
        obs.access_log = crate::telemetry::access_log_wanted(&model, &[&ctx.pod.namespace, dst_ns.as_deref().unwrap_or("")]);
    }
    Ok(resp.map(|b| Observed::new(b, obs).boxed()))
}

async fn forward(req: Request<Body>, ctx: &Arc<ConnCtx>, grpc: bool, obs: &mut Observation) -> Result<Response<Body>, ProxyError> {
    let started = tokio::time::Instant::now();
    let l7 = &ctx.dp.l7;
    // One pod's requests in flight are bounded: it cannot take the node proxy from the others.
    let _pod_slot = ctx.pod.limiter.request().ok_or_else(|| {
        l7.limit_counters.pod_overflow.fetch_add(1, Ordering::Relaxed);
        ProxyError::Overflow(Overflow::PodRequests)
    })?;
    let (mut parts, body) = req.into_parts();
    let mut plan = {
        let model = ctx.dp.model.load_full();
        match plan::decide(&model, ctx, &mut parts, grpc)? {
            Decision::Forward(plan) => plan,
            Decision::Respond(mut resp, response_filters) => {
                for m in &response_filters {
                    filters::modify_headers(resp.headers_mut(), m);
                }
                return Ok(resp);
            }
        }
    };
    apply_request_policy(&plan, ctx, &parts, grpc).await?;
    // A consistent hash's key is read before the request moves on (and a cookie is made for a
    // request that has none, when the policy says so).
    let hashed = plan.lb.hash_of(&parts, ctx.entry.source_addr.ip());
    let endpoints = match &plan.endpoints {
        Endpoints::Known(eps) => eps.clone(),
        Endpoints::Dns { host, port, service_entry } => {
            let who = super::dns::Asker { pod: &ctx.pod.key, service_entry };
            // Boxed: a DNS lookup's future would otherwise add to every request's (see `send`).
            let resolved = Box::pin(l7.resolve(host, *port, who)).await;
            resolved.map_err(|e| ProxyError::NoEndpoints(format!("{} ({e})", plan.backend)))?
        }
    };
    if endpoints.is_empty() {
        return Err(ProxyError::NoEndpoints(plan.backend.clone()));
    }
    let breaker = plan.breaker.map(|cfg| (l7.breakers.get(&plan.backend, &(), |_| Breaker::default()), cfg));
    let _request_slot = match &breaker {
        Some((b, cfg)) => Some(b.request(cfg).map_err(ProxyError::Overflow)?),
        None => None,
    };

    let mut req = Request::from_parts(parts, body);
    let upgrade = wants_upgrade(&req);
    // What the client asked to switch to, to check the answer against once it comes.
    let upgrade_ask = upgrade.then(|| UpgradeAsk::of(&req));
    if upgrade && ctx.wire == Wire::Http2 {
        return Err(ProxyError::Unsupported("CONNECT and protocol upgrades over HTTP/2 are not supported"));
    }
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let mut upstream_req = prepare(req, ctx.wire, upgrade);
    if !plan.mirrors.is_empty() {
        let (parts, body) = upstream_req.into_parts();
        let body = mirror::start(ctx, std::mem::take(&mut plan.mirrors), &parts, body);
        upstream_req = Request::from_parts(parts, body);
    }
    let retry = plan.retry.as_ref().filter(|r| r.attempts > 0 && !upgrade);
    let mut replay = match retry {
        Some(_) => Some(Replay::new(&mut upstream_req)),
        None => None,
    };
    let budget = retry.map(|r| {
        let b = l7.budgets.get(&plan.backend, &r.budget, super::limits::Budget::new);
        b.deposit();
        b
    });
    let deadline = plan.request_timeout.map(|t| started + t);
    let min_health = plan.outlier.map_or(0, |o| o.min_health_percent);

    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut pending_req = Some(upstream_req);
    let mut attempt: u32 = 0;
    // Counts against the destination's `maxRetries` while a retry is in flight.
    let mut retry_slot = None;
    loop {
        let (endpoint, inflight) = l7
            .balancer
            .pick_with(plan.balance_key, &endpoints, &tried, min_health, plan.lb.choice(hashed.hash))
            .ok_or_else(|| ProxyError::NoEndpoints(plan.backend.clone()))?;
        tried.push(endpoint);
        if let Err(target) = ctx.dp.loop_guard.check_upstream(&ctx.dp.model.load(), endpoint) {
            ctx.dp.loop_guard.refused(&ctx.pod.key, target, crate::loopguard::Via::Request);
            return Err(ProxyError::SelfConnection(target));
        }
        let Some(this_req) = pending_req.take().or_else(|| replay.as_mut().and_then(Replay::rebuild)) else {
            unreachable!("a retry only starts with a request to send");
        };
        let mesh_peer = {
            let model = ctx.dp.model.load();
            obs.destination = PeerInfo { workload: model.workload_by_ip(endpoint.ip()).cloned(), principal: None, addr: Some(endpoint) };
            l4::mesh_identity(&model, endpoint, &ctx.dp)
        };
        // A pod enrolled before its identity's certificate came: a mesh destination needs it.
        // Wait for it as for a slow connect, then refuse; never send without mTLS instead.
        if mesh_peer.is_some() {
            let limit = plan.connect_timeout.unwrap_or(ctx.dp.connect_timeout);
            if !ctx.dp.identity.await_certificate(&ctx.pod.identity, limit).await {
                return Err(ProxyError::NoCertificate(ctx.pod.identity.to_string()));
            }
        }
        // ISTIO_MUTUAL matters only outside the mesh (towards a mesh pod, the tunnel is it).
        let istio_mutual = match (&mesh_peer, &plan.istio_mutual) {
            (None, Some(Err(why))) => return Err(ProxyError::BadBackend(why.clone())),
            (None, Some(Ok(m))) => Some(m.clone()),
            _ => None,
        };
        obs.upstream = Some(endpoint);
        obs.mtls = mesh_peer.is_some() || istio_mutual.is_some();
        obs.destination.principal = mesh_peer.as_ref().map(|p| Arc::from(p.to_string()));
        let dial = Dial {
            pod: &ctx.pod,
            dp: &ctx.dp,
            endpoint,
            mesh_peer,
            wire: ctx.wire,
            breaker: breaker.clone(),
            tls: plan.tls.clone(),
            istio_mutual,
            connect_timeout: plan.connect_timeout.unwrap_or(ctx.dp.connect_timeout),
            idle_timeout: plan.idle_timeout,
        };
        let attempt_deadline = match (deadline, plan.attempt_timeout.map(|t| tokio::time::Instant::now() + t)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let send = async {
            if upgrade {
                // Boxed: an upgrade dials its own connection, a large future that would
                // otherwise be part of every request's (moved whole when the request's task
                // is boxed, in `server.rs`).
                Box::pin(l7.upstreams.send_upgrade(&dial, this_req)).await
            } else {
                l7.upstreams.send(&dial, this_req).await
            }
        };
        let result = match attempt_deadline {
            None => send.await,
            Some(at) => match tokio::time::timeout_at(at, send).await {
                Ok(r) => r,
                Err(_) => {
                    inflight.failed();
                    record(ctx, &plan, endpoint, Outcome::Gateway, &endpoints);
                    let whole = deadline.is_some_and(|d| d <= at);
                    let err = if whole {
                        ProxyError::RequestTimeout(plan.request_timeout.unwrap_or_default())
                    } else {
                        ProxyError::BackendTimeout(plan.attempt_timeout.unwrap_or_default())
                    };
                    // A try that ran out of its own time may be retried within the request's.
                    if !whole && retry_allowed(retry, attempt, &budget, &mut replay, true, ctx, &breaker) {
                        attempt += 1;
                        retry_slot = breaker.as_ref().and_then(|(b, cfg)| b.retry(cfg).ok());
                        backoff(retry, attempt, deadline).await;
                        continue;
                    }
                    return Err(err);
                }
            },
        };
        match result {
            Ok((mut resp, dispatched)) => {
                inflight.complete(dispatched);
                record(ctx, &plan, endpoint, Outcome::of_status(resp.status().as_u16()), &endpoints);
                if let Some(r) = retry {
                    if retryable_response(&resp, r, parts_method_idempotent(&replay))
                        && retry_allowed(retry, attempt, &budget, &mut replay, true, ctx, &breaker)
                    {
                        debug!(pod = %ctx.pod.key, %endpoint, status = resp.status().as_u16(), attempt, "retrying");
                        drop(resp);
                        attempt += 1;
                        retry_slot = breaker.as_ref().and_then(|(b, cfg)| b.retry(cfg).ok());
                        backoff(retry, attempt, deadline).await;
                        continue;
                    }
                }
                let upgraded = is_upgraded(upgrade_ask.as_ref(), &resp)?;
                if let (true, Some(client_upgrade)) = (upgraded, client_upgrade) {
                    l7.counters.upgrades.fetch_add(1, Ordering::Relaxed);
                    bridge_upgrade(client_upgrade, hyper::upgrade::on(&mut resp), ctx.clone(), endpoint);
                }
                // A 101 must keep `Upgrade` and `Connection: upgrade` (RFC 9110 §7.8): the
                // client checks them before it switches protocols.
                strip_hop_by_hop(resp.headers_mut(), upgraded);
                for m in &plan.response_filters {
                    filters::modify_headers(resp.headers_mut(), m);
                }
                if let Some(cookie) = &hashed.set_cookie {
                    resp.headers_mut().append(header::SET_COOKIE, cookie.clone());
                }
                let resp = resp.map(|b: super::upstream::UpstreamBody| -> Body {
                    match (deadline, plan.request_timeout) {
                        (Some(at), Some(limit)) => Deadline::new(b, at, limit).boxed(),
                        _ => b.map_err(Into::into).boxed(),
                    }
                });
                debug!(pod = %ctx.pod.key, backend = %plan.backend, destination_rule = plan.destination_rule.as_deref(), %endpoint, status = resp.status().as_u16(), attempt, "proxied");
                drop(retry_slot);
                return Ok(resp);
            }
            Err(SendError { error, request }) => {
                inflight.failed();
                if let UpstreamError::Overflow(o) = error {
                    return Err(ProxyError::Overflow(o));
                }
                let outcome = if error.is_connect() { Outcome::ConnectFailure } else { Outcome::Gateway };
                record(ctx, &plan, endpoint, outcome, &endpoints);
                if let Some(r) = retry {
                    // A request that never left sluice goes again as it is.
                    let unsent = request.is_some();
                    if retryable_error(&error, r) && retry_allowed(retry, attempt, &budget, &mut replay, !unsent, ctx, &breaker) {
                        debug!(pod = %ctx.pod.key, %endpoint, error = %error, attempt, "retrying");
                        pending_req = request;
                        attempt += 1;
                        retry_slot = breaker.as_ref().and_then(|(b, cfg)| b.retry(cfg).ok());
                        backoff(retry, attempt, deadline).await;
                        continue;
                    }
                }
                return Err(error.into());
            }
        }
    }
}

/// Local rate limit and fault injection, before anything is sent.
async fn apply_request_policy(plan: &Plan, ctx: &ConnCtx, parts: &request::Parts, _grpc: bool) -> Result<(), ProxyError> {
    let l7 = &ctx.dp.l7;
    if let Some(fault) = &plan.fault {
        // The rule's own fault (a VirtualService's) replaces the policy's. Envoy's order: the
        // delay, then the abort, each drawn on its own.
        if let Some(delay) = &fault.delay {
            if fastrand::f64() < delay.fraction.0 {
                l7.limit_counters.faults_delayed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay.fixed).await;
            }
        }
        if let Some(abort) = &fault.abort {
            if fastrand::f64() < abort.fraction.0 {
                l7.limit_counters.faults_aborted.fetch_add(1, Ordering::Relaxed);
                return Err(ProxyError::FaultAbort { http: abort.http_status, grpc: abort.grpc_status });
            }
        }
    }
    let Some(policy) = &plan.request_policy else { return Ok(()) };
    if let Some(rl) = &policy.local_rate_limit {
        let key = format!("{}/{}", policy.namespace, policy.name);
        let bucket = l7.rate_limits.get(&key, rl, super::limits::TokenBucket::new);
        if let Err(wait) = bucket.try_take() {
            l7.limit_counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(ProxyError::RateLimited { status: rl.status, retry_after: wait });
        }
    }
    if let Some(fault) = policy.fault_injection.as_ref().filter(|_| plan.fault.is_none()) {
        if plan::fault_applies(&fault.matches, &parts.headers) {
            if let Some(abort) = &fault.abort {
                if fastrand::f64() < abort.fraction.0 {
                    l7.limit_counters.faults_aborted.fetch_add(1, Ordering::Relaxed);
                    return Err(ProxyError::FaultAbort { http: abort.http_status, grpc: abort.grpc_status });
                }
            }
            if let Some(delay) = &fault.delay {
                if fastrand::f64() < delay.fraction.0 {
                    l7.limit_counters.faults_delayed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay.fixed).await;
                }
            }
        }
    }
    Ok(())
}

/// Feeds outlier detection (when the destination has it configured).
fn record(ctx: &ConnCtx, plan: &Plan, endpoint: SocketAddr, outcome: Outcome, endpoints: &[SocketAddr]) {
    if let Some(cfg) = &plan.outlier {
        if let Some(t) = ctx.dp.l7.balancer.record_outcome(endpoint, outcome, cfg, endpoints) {
            info!(backend = %plan.backend, %endpoint, ejected_for_ms = t.as_millis() as u64, "endpoint ejected by outlier detection");
        }
    }
}

/// Whether another try may start: attempts left, the request can be sent again, the retry
/// budget and the circuit breaker's `maxRetries` allow it.
fn retry_allowed(
    retry: Option<&RetryPolicy>,
    attempt: u32,
    budget: &Option<Arc<super::limits::Budget>>,
    replay: &mut Option<Replay>,
    needs_replay: bool,
    ctx: &ConnCtx,
    breaker: &Option<(Arc<Breaker>, crate::discovery::traffic::CircuitBreaker)>,
) -> bool {
    let Some(r) = retry else { return false };
    if attempt >= r.attempts {
        return false;
    }
    if needs_replay && !replay.as_mut().is_some_and(|rp| rp.check()) {
        return false;
    }
    if let Some((b, cfg)) = breaker {
        // `maxRetries`: retries in flight towards this destination (the slot is taken by
        // the caller once it commits to the retry).
        if cfg.max_retries.is_some_and(|max| b.retries.load(Ordering::Relaxed) >= max) {
            b.overflows.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    }
    let l7 = &ctx.dp.l7;
    if budget.as_ref().is_some_and(|b| !b.withdraw()) {
        l7.limit_counters.retry_budget_exhausted.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    l7.limit_counters.retries.fetch_add(1, Ordering::Relaxed);
    true
}

/// Exponential backoff with full jitter, never past the request's deadline.
async fn backoff(retry: Option<&RetryPolicy>, attempt: u32, deadline: Option<tokio::time::Instant>) {
    let Some(r) = retry else { return };
    let cap = r.backoff_base.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(r.backoff_max);
    let wait = Duration::from_nanos(fastrand::u64(..=cap.as_nanos().min(u64::MAX as u128) as u64));
    let until = tokio::time::Instant::now() + wait;
    tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
}

fn retryable_error(e: &UpstreamError, r: &RetryPolicy) -> bool {
    (r.retry_on.connect_failure && e.is_connect())
        || (r.retry_on.refused_stream && e.is_refused_stream())
        || (r.retry_on.reset && matches!(e, UpstreamError::Request { .. }))
}

fn retryable_response<B>(resp: &Response<B>, r: &RetryPolicy, idempotent: bool) -> bool {
    let s = resp.status().as_u16();
    let by_status = (idempotent || r.retry_non_idempotent)
        && ((r.retry_on.status_5xx && s >= 500)
            || (r.retry_on.gateway_error && (502..=504).contains(&s))
            || (r.retry_on.retriable_status_codes && r.retriable_status_codes.contains(&s)));
    // gRPC statuses in a trailers-only response (in the headers): what Envoy retries on.
    let grpc = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u16>().ok());
    let by_grpc = match grpc {
        Some(1) => r.retry_on.grpc_cancelled,
        Some(4) => r.retry_on.grpc_deadline_exceeded,
        Some(8) => r.retry_on.grpc_resource_exhausted,
        Some(13) => r.retry_on.grpc_internal,
        Some(14) => r.retry_on.grpc_unavailable,
        _ => false,
    };
    let rate_limited = r.retry_on.envoy_ratelimited && resp.headers().contains_key("x-envoy-ratelimited");
    by_status || by_grpc || rate_limited
}

fn parts_method_idempotent(replay: &Option<Replay>) -> bool {
    replay.as_ref().is_some_and(|r| matches!(r.head.method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE))
}

/// What a retry needs to send the request again: its head, and its body once the first try
/// has read it whole (kept while it streamed, up to [`RETRY_BODY_LIMIT`]).
struct Replay {
    head: request::Parts,
    body: Option<tokio::sync::oneshot::Receiver<Bytes>>,
    ready: Option<Bytes>,
}

impl Replay {
    fn new(req: &mut Request<Body>) -> Replay {
        let mut head = Request::new(());
        *head.method_mut() = req.method().clone();
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        let body = std::mem::replace(req.body_mut(), super::empty_body());
        let (tee, copy) = Tee::new(body, RETRY_BODY_LIMIT);
        *req.body_mut() = tee.boxed();
        Replay { head: head.into_parts().0, body: Some(copy), ready: None }
    }

    /// Whether the whole body is at hand (collecting it if the first try finished reading it).
    fn check(&mut self) -> bool {
        if self.ready.is_some() {
            return true;
        }
        if let Some(rx) = &mut self.body {
            if let Ok(b) = rx.try_recv() {
                self.ready = Some(b);
                self.body = None;
            }
        }
        self.ready.is_some()
    }

    fn rebuild(&mut self) -> Option<Request<Body>> {
        let body = self.ready.clone()?;
        let mut req = Request::new(full_body(body));
        *req.method_mut() = self.head.method.clone();
        *req.uri_mut() = self.head.uri.clone();
        *req.version_mut() = self.head.version;
        *req.headers_mut() = self.head.headers.clone();
        Some(req)
    }
}

/// `content-type: application/grpc` (or `application/grpc+proto`, ...).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// CONNECT, or an HTTP/1.1 `Connection: upgrade` with an `Upgrade` header (WebSocket).
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    if req.method() == Method::CONNECT {
        return true;
    }
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

/// What a request asked to leave HTTP for: CONNECT, or the protocols of its `Upgrade` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeAsk {
    Connect,
    /// The offered protocols (`name` or `name/version`), as sent.
    Protocols(Vec<String>),
}

impl UpgradeAsk {
    /// For a request [`wants_upgrade`] said yes to.
    pub fn of<B>(req: &Request<B>) -> UpgradeAsk {
        if req.method() == Method::CONNECT {
            return UpgradeAsk::Connect;
        }
        UpgradeAsk::Protocols(upgrade_tokens(req.headers()))
    }
}

fn upgrade_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether the upstream's answer turns the exchange into a byte pipe. Only two answers do
/// (RFC 9110 §7.8, §9.3.6, §15.2.2): a `101 Switching Protocols` to an Upgrade request, naming
/// in its own `Upgrade` header only protocols the client offered, and a 2xx to CONNECT.
/// Anything else is an ordinary response, whose hop-by-hop `Upgrade`/`Connection` headers are
/// stripped like any other's.
///
/// A 101 that breaks these rules (to a request that asked for nothing, to CONNECT, or
/// switching to a protocol the client did not offer) is refused: passed on, it would make the
/// client's connection (which hyper ends after any 101) or the client's idea of the protocol
/// whatever the upstream chose, so sluice answers 502 `upstream-protocol-error` instead.
pub fn is_upgraded<B>(ask: Option<&UpgradeAsk>, resp: &Response<B>) -> Result<bool, ProxyError> {
    let status = resp.status();
    match ask {
        Some(UpgradeAsk::Connect) if status.is_success() => Ok(true),
        Some(UpgradeAsk::Protocols(offered)) if status == StatusCode::SWITCHING_PROTOCOLS => {
            let chosen = upgrade_tokens(resp.headers());
            if chosen.is_empty() {
                return Err(ProxyError::UpstreamProtocol(
                    "a 101 Switching Protocols without an Upgrade header".into(),
                ));
            }
            match chosen.iter().find(|c| !offered.iter().any(|o| same_protocol(o, c))) {
                Some(other) => Err(ProxyError::UpstreamProtocol(format!(
                    "a 101 Switching Protocols to {other:?}, which the client did not offer ({offered:?})"
                ))),
                None => Ok(true),
            }
        }
        _ if status == StatusCode::SWITCHING_PROTOCOLS => Err(ProxyError::UpstreamProtocol(match ask {
            Some(UpgradeAsk::Connect) => {
                "a 101 Switching Protocols to CONNECT (a tunnel is opened by a 2xx)".into()
            }
            _ => "a 101 Switching Protocols to a request that asked for no protocol change".into(),
        })),
        _ => Ok(false),
    }
}

/// Protocol tokens (`name["/" version]`) compare case-insensitively; an answer may leave out
/// the version the client offered (`websocket` for `websocket/13`), not change it.
fn same_protocol(offered: &str, chosen: &str) -> bool {
    let split = |t: &str| -> (String, Option<String>) {
        match t.split_once('/') {
            Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v.trim().to_ascii_lowercase())),
            None => (t.trim().to_ascii_lowercase(), None),
        }
    };
    let ((on, ov), (cn, cv)) = (split(offered), split(chosen));
    on == cn && (cv.is_none() || cv == ov)
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
fn prepare(req: Request<Body>, wire: Wire, upgrade: bool) -> Request<Body> {
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
    Request::from_parts(parts, body)
}

/// Removes connection-specific headers (RFC 9110 §7.6.1): they describe the client's
/// connection to sluice, not sluice's connection to the upstream.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty() && !(keep_upgrade && t == "upgrade") && t != "close" && t != "keep-alive")
            .collect();
        for name in named {
            headers.remove(name.as_str());
        }
        if !keep_upgrade {
            headers.remove(header::CONNECTION);
        }
    }
    // Static names: a lookup without parsing a name (this runs twice per request).
    for h in [&KEEP_ALIVE, &PROXY_CONNECTION, &header::TRANSFER_ENCODING] {
        if headers.contains_key(h) {
            headers.remove(h);
        }
    }
    if !keep_upgrade && headers.contains_key(header::UPGRADE) {
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
/// copy bytes both ways until both sides are done, or neither sent anything for the idle
/// timeout. The bridge holds the client connection's context (its admission permit and its
/// `sluice conns` entry) and the upstream connection's circuit-breaker slot until it ends.
fn bridge_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    ctx: Arc<ConnCtx>,
    endpoint: SocketAddr,
) {
    tokio::spawn(async move {
        let started = Instant::now();
        // The client side is counted into the connection's entry already (see server.rs);
        // these count the upstream side, for the idle timeout.
        let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
        let end = upgrade::bridge(client, upstream, &ctx.dp.idle, &sent, &received).await;
        let ms = started.elapsed().as_millis() as u64;
        debug!(pod = %ctx.pod.key, %endpoint, id = ctx.entry.id, ?end, ms, "upgraded connection ended");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, upgrade: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri("/chat").version(Version::HTTP_11);
        if let Some(u) = upgrade {
            b = b.header(header::UPGRADE, u).header(header::CONNECTION, "Upgrade");
        }
        b.body(()).unwrap()
    }

    fn response(status: u16, upgrade: Option<&str>) -> Response<()> {
        let mut b = Response::builder().status(status);
        if let Some(u) = upgrade {
            b = b.header(header::UPGRADE, u).header(header::CONNECTION, "upgrade");
        }
        b.body(()).unwrap()
    }

    fn ask(req: &Request<()>) -> Option<UpgradeAsk> {
        wants_upgrade(req).then(|| UpgradeAsk::of(req))
    }

    #[test]
    fn only_101_to_an_upgrade_or_2xx_to_connect_switches() {
        let ws = ask(&request(Method::GET, Some("websocket")));
        let connect = ask(&request(Method::CONNECT, None));
        // The two legitimate switches.
        assert!(is_upgraded(ws.as_ref(), &response(101, Some("websocket"))).unwrap());
        assert!(is_upgraded(ws.as_ref(), &response(101, Some("WebSocket"))).unwrap());
        assert!(is_upgraded(connect.as_ref(), &response(200, None)).unwrap());
        // A 2xx to an Upgrade request is an ordinary response (the connection stays HTTP), even
        // when the upstream adds Upgrade headers to it.
        assert!(!is_upgraded(ws.as_ref(), &response(200, Some("websocket"))).unwrap());
        assert!(!is_upgraded(ws.as_ref(), &response(204, None)).unwrap());
        // Refusals of a switch are ordinary responses too.
        assert!(!is_upgraded(ws.as_ref(), &response(400, None)).unwrap());
        assert!(!is_upgraded(connect.as_ref(), &response(403, None)).unwrap());
        // Plain requests never switch on a 2xx.
        assert!(!is_upgraded(None, &response(200, None)).unwrap());
    }

    #[test]
    fn a_101_the_client_did_not_ask_for_is_a_protocol_error() {
        let plain = ask(&request(Method::GET, None));
        assert_eq!(plain, None);
        let err = is_upgraded(plain.as_ref(), &response(101, Some("websocket"))).unwrap_err();
        assert_eq!(err.flag(), "upstream-protocol-error");
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        let connect = ask(&request(Method::CONNECT, None));
        assert!(is_upgraded(connect.as_ref(), &response(101, Some("websocket"))).is_err());
        // Switching to something the client did not offer, or not saying to what.
        let ws = ask(&request(Method::GET, Some("websocket")));
        let err = is_upgraded(ws.as_ref(), &response(101, Some("h2c"))).unwrap_err();
        assert!(err.to_string().contains("\"h2c\""), "{err}");
        assert!(is_upgraded(ws.as_ref(), &response(101, None)).is_err());
        // Versions: an answer may leave the version out, not change it.
        let versioned = ask(&request(Method::GET, Some("foo/2, websocket")));
        assert!(is_upgraded(versioned.as_ref(), &response(101, Some("foo"))).unwrap());
        assert!(is_upgraded(versioned.as_ref(), &response(101, Some("FOO/2"))).unwrap());
        assert!(is_upgraded(versioned.as_ref(), &response(101, Some("foo/3"))).is_err());
    }
}
