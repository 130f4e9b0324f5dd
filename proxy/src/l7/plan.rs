//! Where one request goes, decided from one model snapshot: the Service the client dialled
//! (or an external destination declared by a ServiceEntry), its route table for the client's
//! namespace, the matching rule and its filters, a backend by weight, and the traffic policies
//! that apply.
//!
//! Which TrafficPolicy applies to what (a choice the CRD leaves open, recorded in
//! docs/design-notes.md): request-level behaviour (retries, request timeout, fault injection,
//! local rate limit) comes from the policy on the matched HTTPRoute, else the Service the
//! client dialled, else the backend Service; destination-level behaviour (circuit breaker,
//! outlier detection, connect timeout, TLS origination) from the backend the request goes to.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use http::{request, Response};

use super::{
    errors::ProxyError,
    filters,
    mirror::{self, MirrorTarget},
    server::ConnCtx,
    upstream::TlsTarget,
    Body,
};
use crate::discovery::{
    route::{BackendRef, Filter, HeaderModifier, RouteRetry},
    route_table::{RequestParts, Selected},
    traffic::{
        CircuitBreaker, OutboundPolicy, OutlierDetection, Resolution, RetryBudget, RetryOn, RetryPolicy, ServiceEntry,
        ServiceEntryPort, TrafficPolicy,
    },
    AddressType, Model,
};

/// The balancing key of a backend Service port (round-robin position): FNV-1a, cheap for a
/// few short strings (this runs on every request; SipHash was a measurable share of it).
pub fn balance_key(namespace: &str, name: &str, port: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()).chain(port.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where the request's endpoints come from.
pub enum Endpoints {
    Known(Arc<[SocketAddr]>),
    /// A DNS ServiceEntry: resolve `host` (port `port`) when sending. `service_entry`
    /// ("namespace/name") is what the lookup is counted against, with the source pod.
    Dns { host: String, port: u16, service_entry: Arc<str> },
}

/// The plan for one request.
pub struct Plan {
    /// "namespace/name:port" of the backend Service (or ServiceEntry), or the address dialled:
    /// the key of its balancer state, circuit breaker and retry budget.
    pub backend: String,
    pub endpoints: Endpoints,
    pub balance_key: u64,
    pub request_timeout: Option<Duration>,
    /// One attempt (a rule's `backendRequest`, or a retry policy's `perTryTimeout`).
    pub attempt_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    /// ResponseHeaderModifier filters of the rule and backend, in order.
    pub response_filters: Vec<HeaderModifier>,
    pub mirrors: Vec<MirrorTarget>,
    pub retry: Option<RetryPolicy>,
    /// The policy with request-level settings (fault injection, rate limit).
    pub request_policy: Option<Arc<TrafficPolicy>>,
    pub breaker: Option<CircuitBreaker>,
    pub outlier: Option<OutlierDetection>,
    pub tls: Option<TlsTarget>,
}

impl Plan {
    fn simple(backend: String, endpoints: Arc<[SocketAddr]>, balance_key: u64) -> Plan {
        Plan {
            backend,
            endpoints: Endpoints::Known(endpoints),
            balance_key,
            request_timeout: None,
            attempt_timeout: None,
            connect_timeout: None,
            response_filters: Vec::new(),
            mirrors: Vec::new(),
            retry: None,
            request_policy: None,
            breaker: None,
            outlier: None,
            tls: None,
        }
    }

    /// Applies the destination-level settings of the backend's policy.
    fn with_destination(mut self, policy: Option<&Arc<TrafficPolicy>>) -> Plan {
        if let Some(p) = policy {
            self.breaker = p.circuit_breaker;
            self.outlier = p.outlier_detection;
            self.connect_timeout = p.timeouts.connect;
        }
        self
    }

    /// Applies request-level settings from the first policy that has each.
    fn with_request_policies(mut self, policies: &[Option<&Arc<TrafficPolicy>>]) -> Plan {
        let first = |f: &dyn Fn(&TrafficPolicy) -> bool| policies.iter().flatten().find(|p| f(p)).map(|p| (*p).clone());
        if self.retry.is_none() {
            self.retry = first(&|p| p.retries.is_some()).and_then(|p| p.retries.clone());
        }
        if self.request_timeout.is_none() {
            self.request_timeout = first(&|p| p.timeouts.request.is_some()).and_then(|p| p.timeouts.request);
        }
        if self.attempt_timeout.is_none() {
            self.attempt_timeout = self.retry.as_ref().and_then(|r| r.per_try_timeout);
        }
        self.request_policy = first(&|p| p.fault_injection.is_some() || p.local_rate_limit.is_some());
        self
    }
}

pub enum Decision {
    Forward(Plan),
    /// A RequestRedirect filter answered.
    Respond(Response<Body>, Vec<HeaderModifier>),
}

/// Routes the request. Filters that change the request (headers, rewrite) are applied to
/// `parts` here.
pub fn decide(model: &Model, ctx: &ConnCtx, parts: &mut request::Parts, grpc: bool) -> Result<Decision, ProxyError> {
    let Some(svc) = model.service_for(ctx.orig.ip(), ctx.orig.port()) else {
        return outside(model, ctx, parts).map(Decision::Forward);
    };
    let port = svc.port().port;
    let dialled_policy = model.traffic_policy_for_service(svc.namespace(), svc.name(), svc.port().name.as_deref());
    let table = model.port_routes(svc.namespace(), svc.name(), port).and_then(|r| r.for_client(&ctx.pod.namespace));
    let Some(table) = table else {
        // No route: the Service's own endpoints.
        let plan = Plan::simple(
            format!("{}/{}:{port}", svc.namespace(), svc.name()),
            svc.endpoints().clone(),
            balance_key(svc.namespace(), svc.name(), port),
        );
        return Ok(Decision::Forward(plan.with_request_policies(&[dialled_policy]).with_destination(dialled_policy)));
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
    let route_policy = model.traffic_policy_for_route(sel.route.kind, &sel.route.namespace, &sel.route.name);
    let backend_policy = model.traffic_policy_for_service(&backend.namespace, &backend.name, target.port().name.as_deref());
    let mut plan = Plan::simple(
        format!("{}/{}:{bport}", backend.namespace, backend.name),
        // The family the client dialled, if the backend has it (see "Dual stack" in the
        // design notes).
        target.endpoints_preferring(AddressType::of(ctx.orig.ip())).clone(),
        balance_key(&backend.namespace, &backend.name, bport),
    );
    plan.request_timeout = sel.rule.timeouts.request;
    plan.attempt_timeout = sel.rule.timeouts.backend_request;
    plan.response_filters = response_filters;
    plan.mirrors = mirrors;
    // A route policy's retries win over the route's own `retry` field, which wins over the
    // Services' policies.
    plan.retry = route_policy.and_then(|p| p.retries.clone()).or_else(|| sel.rule.retry.as_ref().map(route_retry));
    Ok(Decision::Forward(
        plan.with_request_policies(&[route_policy, dialled_policy, backend_policy]).with_destination(backend_policy),
    ))
}

/// The Gateway API's HTTPRoute `retry` as a retry policy: its codes, connection failures, and
/// the default budget.
fn route_retry(r: &RouteRetry) -> RetryPolicy {
    RetryPolicy {
        attempts: r.attempts,
        per_try_timeout: None,
        retry_on: RetryOn {
            connect_failure: true,
            refused_stream: true,
            retriable_status_codes: !r.codes.is_empty(),
            ..RetryOn::default()
        },
        retriable_status_codes: r.codes.clone(),
        // The Gateway API retries what its codes say, whatever the method.
        retry_non_idempotent: true,
        backoff_base: r.backoff.unwrap_or(Duration::from_millis(25)),
        backoff_max: r.backoff.map_or(Duration::from_millis(250), |b| b * 10),
        budget: RetryBudget::default(),
    }
}

/// A destination that is not a Service: a mesh pod (forwarded as dialled), an external
/// destination declared by a ServiceEntry (matched by address, or by the Host header), or
/// anything else, which the client's namespace may forbid (REGISTRY_ONLY).
fn outside(model: &Model, ctx: &ConnCtx, parts: &request::Parts) -> Result<Plan, ProxyError> {
    let dialled = || Plan::simple(ctx.orig.to_string(), Arc::from([ctx.orig].as_slice()), 0);
    if model.pod_by_ip(ctx.orig.ip()).is_some() {
        return Ok(dialled());
    }
    let host = filters::request_host(parts);
    let entry = model
        .service_entry_for_addr(ctx.orig.ip(), ctx.orig.port())
        .map(|(e, p)| (e, p, None))
        .or_else(|| {
            let h = host.as_deref()?;
            model.service_entry_for_host(h, ctx.orig.port()).map(|(e, p)| (e, p, Some(h)))
        });
    let Some((entry, port, matched_host)) = entry else {
        if model.outbound_policy(&ctx.pod.namespace) == OutboundPolicy::RegistryOnly {
            return Err(ProxyError::EgressBlocked(ctx.orig, host));
        }
        return Ok(dialled());
    };
    service_entry_plan(model, ctx, entry, port, matched_host)
}

fn service_entry_plan(
    model: &Model,
    ctx: &ConnCtx,
    entry: &Arc<ServiceEntry>,
    port: &ServiceEntryPort,
    matched_host: Option<&str>,
) -> Result<Plan, ProxyError> {
    let policy = model.traffic_policy_for_service_entry(&entry.namespace, &entry.name);
    let target_port = port.target_port.unwrap_or(port.number);
    let key = format!("serviceentry:{}/{}:{}", entry.namespace, entry.name, port.number);
    let balance = balance_key(&entry.namespace, &entry.name, port.number);
    let host = matched_host
        .map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase())
        .or_else(|| entry.hosts.iter().find(|h| !h.starts_with('*')).cloned());
    let endpoints = match entry.resolution {
        Resolution::None => Endpoints::Known(Arc::from([SocketAddr::new(ctx.orig.ip(), target_port)].as_slice())),
        Resolution::Static => {
            let eps: Vec<SocketAddr> = entry
                .endpoints
                .iter()
                .filter_map(|e| {
                    let ip = e.address.parse().ok()?;
                    let p = e.ports.iter().find(|(n, _)| *n == port.name).map_or(target_port, |(_, p)| *p);
                    Some(SocketAddr::new(ip, p))
                })
                .collect();
            Endpoints::Known(eps.into())
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            let name = entry.endpoints.first().map(|e| e.address.clone()).or_else(|| host.clone());
            match name {
                Some(host) => Endpoints::Dns {
                    host,
                    port: target_port,
                    service_entry: format!("{}/{}", entry.namespace, entry.name).into(),
                },
                None => return Err(ProxyError::BadBackend(format!("ServiceEntry {}/{} has no host to resolve", entry.namespace, entry.name))),
            }
        }
    };
    let mut plan = Plan::simple(key, Arc::from([].as_slice()), balance);
    plan.endpoints = endpoints;
    let mut plan = plan.with_request_policies(&[policy]).with_destination(policy);
    if let Some(tls) = policy.and_then(|p| p.tls.as_ref().map(|t| (p, t))) {
        let (p, t) = tls;
        let sni = t.sni.clone().or(host).ok_or_else(|| {
            ProxyError::BadBackend(format!("TLS origination for ServiceEntry {}/{} needs an SNI", entry.namespace, entry.name))
        })?;
        plan.tls = Some(ctx.dp.l7.tls_target(&format!("{}/{}", p.namespace, p.name), &sni, t.ca_certificates.as_deref())?);
    }
    Ok(plan)
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

/// Whether a fault-injection header match holds for the request.
pub fn fault_applies(matches: &[(String, String)], headers: &http::HeaderMap) -> bool {
    matches.iter().all(|(name, value)| headers.get_all(name.as_str()).iter().any(|v| v.as_bytes() == value.as_bytes()))
}
