//! Where one request goes, decided from one model snapshot: the Service the client dialled
//! (or an external destination declared by a ServiceEntry), the route tables for the client's
//! namespace (Gateway API routes and VirtualServices, in the order of `istio::vs_mixing`), the
//! matching rule and its filters, a backend by weight (a Service port, a DestinationRule subset
//! of one, or a ServiceEntry port), and the traffic policies that apply.
//!
//! A VirtualService rule carries its own timeout, retries (its own or Istio's default) and
//! fault injection; a TrafficPolicy fills in only what the rule leaves unset (its timeout, its
//! local rate limit, its fault injection when the rule has none), and destination-level
//! behaviour stays the backend's.
//!
//! Which TrafficPolicy applies to what (a choice the CRD leaves open, recorded in
//! docs/design-notes.md): request-level behaviour (retries, request timeout, fault injection,
//! local rate limit) comes from the policy on the matched HTTPRoute, else the Service the
//! client dialled, else the backend Service; destination-level behaviour (circuit breaker,
//! outlier detection, connect timeout, TLS origination) from the backend the request goes to.
//!
//! An Istio DestinationRule of that backend adds what TrafficPolicy has no field for (subsets,
//! load balancing, consistent hashing, ISTIO_MUTUAL) and fills in the destination-level
//! settings TrafficPolicy leaves unset: where both set one group (connection limits, outlier
//! detection, connect timeout, TLS), the TrafficPolicy wins, as sluice's own and more specific
//! API (it can target one Service port or one route; see the design notes).

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
    balance::{Choice, LbPolicy},
    maglev::{self, Maglev},
    upstream::{IstioMutual, TlsTarget},
    Body,
};
use crate::discovery::istio::destination_rule::{
    Client, ClientTls, HashKey, LoadBalancer, PolicyLevel, Resolved, TlsMode,
};
use crate::discovery::{
    istio::subset::resolve_subset,
    route::{BackendKind, BackendRef, ClientInfo, Filter, HeaderModifier, RouteKind, RouteRetry},
    route_table::{Lookup, RequestParts, RouteTable, Selected},
    traffic::{
        CircuitBreaker, FaultInjection, OutboundPolicy, OutlierDetection, Resolution, RetryBudget, RetryOn, RetryPolicy,
        ServiceEntry, ServiceEntryPort, TrafficPolicy,
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
    /// The matched rule's own fault injection (a VirtualService's `fault`): wins over the
    /// policy's.
    pub fault: Option<FaultInjection>,
    pub breaker: Option<CircuitBreaker>,
    pub outlier: Option<OutlierDetection>,
    pub tls: Option<TlsTarget>,
    /// How an endpoint is chosen (a DestinationRule's `loadBalancer`; the node's policy
    /// otherwise).
    pub lb: PlanLb,
    /// A DestinationRule's ISTIO_MUTUAL, for endpoints outside the mesh (an error when the
    /// rule names no server identity to verify).
    pub istio_mutual: Option<Result<IstioMutual, String>>,
    /// A DestinationRule's `http.idleTimeout`.
    pub idle_timeout: Option<Duration>,
    /// `namespace/name` of the DestinationRule in force (and the subset), for logs.
    pub destination_rule: Option<Arc<str>>,
}

/// How the plan's endpoint is chosen.
#[derive(Debug, Clone, Default)]
pub enum PlanLb {
    #[default]
    Node,
    Policy(LbPolicy),
    /// Consistent hashing of a request key, through `table` when the control path built one
    /// over exactly the plan's endpoints.
    Hash { key: HashKey, table: Option<Arc<Maglev>> },
}

/// The hash key a request carries, and the cookie to set when it had none.
pub struct HashChoice {
    pub hash: Option<u64>,
    /// `Set-Cookie` for the response (a cookie key with a `ttl`, missing from the request).
    pub set_cookie: Option<http::HeaderValue>,
}

impl PlanLb {
    /// The key of this request (computed before the request is sent on; a missing key picks
    /// a random endpoint, as Envoy does).
    pub fn hash_of(&self, parts: &request::Parts, source: std::net::IpAddr) -> HashChoice {
        let PlanLb::Hash { key, .. } = self else { return HashChoice { hash: None, set_cookie: None } };
        match key {
            HashKey::Header { name } => HashChoice {
                hash: parts.headers.get(name.as_str()).map(|v| maglev::key_hash(v.as_bytes())),
                set_cookie: None,
            },
            HashKey::SourceIp => {
                let ip = source.to_canonical();
                let bytes = match ip {
                    std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                    std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                HashChoice { hash: Some(maglev::key_hash(&bytes)), set_cookie: None }
            }
            HashKey::QueryParameter { name } => HashChoice {
                hash: parts.uri.query().and_then(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == name.as_str())
                        .map(|(_, v)| maglev::key_hash(v.as_bytes()))
                }),
                set_cookie: None,
            },
            HashKey::Cookie { name, path, ttl } => match request_cookie(&parts.headers, name) {
                Some(v) => HashChoice { hash: Some(maglev::key_hash(v.as_bytes())), set_cookie: None },
                // Envoy's rule: with a ttl, a request without the cookie gets one (a ttl of 0
                // makes a session cookie), and is hashed by the new value.
                None => match ttl {
                    None => HashChoice { hash: None, set_cookie: None },
                    Some(ttl) => {
                        let value = format!("{:016x}", fastrand::u64(..));
                        let mut cookie = format!("{name}=\"{value}\"");
                        if let Some(p) = path {
                            cookie.push_str("; Path=");
                            cookie.push_str(p);
                        }
                        if !ttl.is_zero() {
                            cookie.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
                        }
                        cookie.push_str("; HttpOnly");
                        HashChoice {
                            hash: Some(maglev::key_hash(format!("\"{value}\"").as_bytes())),
                            set_cookie: http::HeaderValue::from_str(&cookie).ok(),
                        }
                    }
                },
            },
        }
    }

    /// The balancer's choice for a request with `hash`.
    pub fn choice(&self, hash: Option<u64>) -> Choice<'_> {
        match (self, hash) {
            (PlanLb::Node, _) => Choice::Node,
            (PlanLb::Policy(p), _) => Choice::Policy(*p),
            (PlanLb::Hash { table, .. }, Some(hash)) => Choice::Hash { hash, table: table.as_deref() },
            (PlanLb::Hash { .. }, None) => Choice::Policy(LbPolicy::Random),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, as sent (quotes included).
fn request_cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
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
            fault: None,
            breaker: None,
            outlier: None,
            tls: None,
            lb: PlanLb::Node,
            istio_mutual: None,
            idle_timeout: None,
            destination_rule: None,
        }
    }

    /// Applies the destination-level settings of a DestinationRule, under those of the
    /// TrafficPolicy `policy` (already applied by [`Plan::with_destination`]), which wins
    /// each group both set. `passthrough` is where PASSTHROUGH sends the request; `host` the
    /// destination's name for SNI.
    fn with_destination_rule(
        mut self,
        rule: &Resolved,
        policy: Option<&Arc<TrafficPolicy>>,
        ctx: &ConnCtx,
        passthrough: SocketAddr,
        host: &str,
    ) -> Result<Plan, ProxyError> {
        let p = &rule.policy;
        let tp = policy.map(|p| &**p);
        self.apply_rule_policy(p, tp, passthrough, |eps| rule_table(rule, eps));
        let tp_tls = tp.is_some_and(|t| t.tls.is_some());
        match &p.tls {
            Some(t) if !tp_tls => self.apply_rule_tls(t, ctx, host)?,
            _ => {}
        }
        self.destination_rule = Some(match &rule.subset {
            Some(s) => format!("{} subset {s}", rule.rule).into(),
            None => rule.rule.clone(),
        });
        Ok(self)
    }

    /// The rule's merged policy `p` but its TLS, under the TrafficPolicy `tp` (which wins each
    /// group it sets: circuit breaker, connect timeout, outlier detection). `table` finds the
    /// Maglev table built over the plan's endpoints.
    fn apply_rule_policy(
        &mut self,
        p: &PolicyLevel,
        tp: Option<&TrafficPolicy>,
        passthrough: SocketAddr,
        table: impl FnOnce(&Arc<[SocketAddr]>) -> Option<Arc<Maglev>>,
    ) {
        if let Some(pool) = &p.connection_pool {
            if tp.is_none_or(|t| t.circuit_breaker.is_none()) {
                let cb = CircuitBreaker {
                    max_connections: pool.max_connections,
                    max_pending_requests: pool.max_pending_requests,
                    max_requests: pool.max_requests,
                    max_retries: pool.max_retries,
                    max_requests_per_connection: pool.max_requests_per_connection,
                };
                self.breaker = (cb != CircuitBreaker::default()).then_some(cb);
            }
            if tp.is_none_or(|t| t.timeouts.connect.is_none()) {
                self.connect_timeout = pool.connect_timeout.or(self.connect_timeout);
            }
            self.idle_timeout = pool.idle_timeout;
        }
        if tp.is_none_or(|t| t.outlier_detection.is_none()) {
            self.outlier = p.outlier_detection.or(self.outlier);
        }
        self.lb = match &p.load_balancer {
            None | Some(LoadBalancer::Default) => PlanLb::Node,
            Some(LoadBalancer::RoundRobin) => PlanLb::Policy(LbPolicy::RoundRobin),
            // Envoy's LEAST_REQUEST is power of two choices over requests in flight; sluice's
            // P2C weighs requests in flight by peak-EWMA latency, which is the same choice
            // between equally fast endpoints.
            Some(LoadBalancer::LeastRequest) => PlanLb::Policy(LbPolicy::P2cEwma),
            Some(LoadBalancer::Random) => PlanLb::Policy(LbPolicy::Random),
            Some(LoadBalancer::Passthrough) => {
                // No balancing: to the address the client dialled (for a Service, its
                // ClusterIP, which the node's kube-proxy or CNI then balances).
                self.endpoints = Endpoints::Known(Arc::from([passthrough].as_slice()));
                PlanLb::Node
            }
            Some(LoadBalancer::ConsistentHash(ch)) => {
                let table = match &self.endpoints {
                    Endpoints::Known(eps) => table(eps),
                    Endpoints::Dns { .. } => None,
                };
                PlanLb::Hash { key: ch.key.clone(), table }
            }
        };
    }

    fn apply_rule_tls(&mut self, t: &ClientTls, ctx: &ConnCtx, host: &str) -> Result<(), ProxyError> {
        let sni = t.sni.as_deref().unwrap_or(host);
        match t.mode {
            TlsMode::Disable => {}
            TlsMode::Simple | TlsMode::Mutual => {
                let config = ctx
                    .dp
                    .l7
                    .tls_origin
                    .rule_config(t)
                    .map_err(|e| ProxyError::BadBackend(format!("TLS origination: {e}")))?;
                let server_name = rustls_pki_types::ServerName::try_from(sni.to_owned()).map_err(|e| {
                    ProxyError::BadBackend(format!("TLS origination: {sni:?} is not a server name: {e}"))
                })?;
                self.tls = Some(TlsTarget { config, server_name, sni: sni.into() });
            }
            TlsMode::IstioMutual => {
                self.istio_mutual = Some(match t.subject_alt_names.first() {
                    Some(id) => id
                        .parse::<crate::identity::SpiffeId>()
                        .map(|server| IstioMutual { server, sni: sni.into() })
                        .map_err(|e| format!("ISTIO_MUTUAL: subjectAltNames: {e}")),
                    None => Err("ISTIO_MUTUAL towards a destination outside the mesh needs subjectAltNames naming the server's SPIFFE ID".into()),
                });
            }
        }
        Ok(())
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
        return outside(model, ctx, parts, grpc);
    };
    let port = svc.port().port;
    let dialled_policy = model.traffic_policy_for_service(svc.namespace(), svc.name(), svc.port().name.as_deref());
    let tables = model.port_routes(svc.namespace(), svc.name(), port).map_or(&[][..], |r| r.for_client(&ctx.pod.namespace));
    if let Some(decision) = routed(model, ctx, parts, grpc, tables, port, dialled_policy)? {
        return Ok(decision);
    }
    // No route decides: the Service's own endpoints (of the ClusterIP's family), as a
    // DestinationRule in force shapes them.
    let rule = model.destination_rule_index().destination(dr_client(model, ctx), svc.namespace(), svc.name(), port, None);
    let rule = match rule {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(why)) => return Err(ProxyError::NoCluster(why)),
    };
    let endpoints = match rule {
        Some(r) => r.endpoints_of(AddressType::of(ctx.orig.ip())).0.clone(),
        None => svc.endpoints().clone(),
    };
    let plan = Plan::simple(
        format!("{}/{}:{port}", svc.namespace(), svc.name()),
        endpoints,
        balance_key(svc.namespace(), svc.name(), port),
    )
    .with_request_policies(&[dialled_policy])
    .with_destination(dialled_policy);
    Ok(Decision::Forward(match rule {
        Some(r) => {
            let host = crate::discovery::istio::service_fqdn(svc.namespace(), svc.name());
            plan.with_destination_rule(r, dialled_policy, ctx, ctx.orig, &host)?
        }
        None => plan,
    }))
}

/// The request through the chain of route tables of its destination: `None` when no table
/// decides for this client (the destination's own endpoints then), else where the matched rule
/// sends it (404 when the deciding table has no matching rule).
fn routed(
    model: &Model,
    ctx: &ConnCtx,
    parts: &mut request::Parts,
    grpc: bool,
    tables: &[Arc<RouteTable>],
    service_port: u16,
    dialled_policy: Option<&Arc<TrafficPolicy>>,
) -> Result<Option<Decision>, ProxyError> {
    if tables.is_empty() {
        return Ok(None);
    }
    // The client pod's labels, only when some rule asks (a lookup per request otherwise).
    let labels = if tables.iter().any(|t| t.uses_client_labels()) {
        model.pod(&ctx.pod.namespace, &ctx.pod.name).map(|p| &p.labels)
    } else {
        None
    };
    let authority = filters::request_host(parts);
    let request = RequestParts {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        authority: authority.as_deref(),
        client: ClientInfo { namespace: &ctx.pod.namespace, labels },
    };
    let mut selected = None;
    for t in tables {
        match t.lookup(&request, grpc) {
            Lookup::Matched(s) => {
                selected = Some(s);
                break;
            }
            Lookup::NoMatch => return Err(ProxyError::NoRoute),
            Lookup::NotForClient => continue,
        }
    }
    let Some(sel) = selected else { return Ok(None) };
    let mut response_filters = Vec::new();
    let mut mirrors = Vec::new();
    if let Some(resp) = apply_filters(&sel.rule.filters, sel, ctx, model, parts, service_port, &mut response_filters, &mut mirrors) {
        return Ok(Some(Decision::Respond(resp, response_filters)));
    }
    let istio = sel.route.kind == RouteKind::VirtualService;
    let backend = pick_backend(&sel.rule.backends).ok_or_else(|| {
        ProxyError::BadBackend(format!(
            "rule {} of {} {} has no backend with a weight above 0",
            sel.rule_index,
            sel.route.kind,
            sel.route.key()
        ))
    })?;
    if let Some(why) = &backend.invalid {
        let msg = format!("backend {}/{}: {why}", backend.namespace, backend.name);
        return Err(if istio { ProxyError::NoCluster(msg) } else { ProxyError::BadBackend(msg) });
    }
    let backend_policy = match backend.kind {
        BackendKind::Service => {
            let target = backend.port.and_then(|p| model.service_port(&backend.namespace, &backend.name, p));
            model.traffic_policy_for_service(&backend.namespace, &backend.name, target.and_then(|t| t.port().name.as_deref()))
        }
        BackendKind::ServiceEntry => model.traffic_policy_for_service_entry(&backend.namespace, &backend.name),
    };
    // Destination-level settings come with the backend's plan: its TrafficPolicy, then its
    // DestinationRule (the entry's plan sets its own).
    let mut plan = match backend.kind {
        BackendKind::ServiceEntry => entry_backend(model, ctx, backend)?,
        BackendKind::Service => service_backend(model, ctx, backend, istio, backend_policy)?,
    };
    if let Some(resp) = apply_filters(&backend.filters, sel, ctx, model, parts, service_port, &mut response_filters, &mut mirrors) {
        return Ok(Some(Decision::Respond(resp, response_filters)));
    }
    let route_policy = model.traffic_policy_for_route(sel.route.kind, &sel.route.namespace, &sel.route.name);
    plan.request_timeout = sel.rule.timeouts.request;
    plan.attempt_timeout = sel.rule.timeouts.backend_request;
    plan.response_filters = response_filters;
    plan.mirrors = mirrors;
    plan.fault = sel.rule.fault.clone();
    // A VirtualService rule's retries (its own or Istio's default) win; then a route policy's
    // retries, which win over the route's own `retry` field, which wins over the Services'.
    plan.retry = sel
        .rule
        .retry_policy
        .clone()
        .or_else(|| route_policy.and_then(|p| p.retries.clone()))
        .or_else(|| sel.rule.retry.as_ref().map(route_retry));
    Ok(Some(Decision::Forward(plan.with_request_policies(&[route_policy, dialled_policy, backend_policy]))))
}

/// A Service port chosen by a rule, or one of its DestinationRule subsets: the endpoints (the
/// subset's, as the DestinationRule in force for this client defines it), preferring the family
/// the client dialled, and the destination-level settings (its TrafficPolicy `policy`, then the
/// rule, see [`Plan::with_destination_rule`]).
fn service_backend(
    model: &Model,
    ctx: &ConnCtx,
    backend: &BackendRef,
    istio: bool,
    policy: Option<&Arc<TrafficPolicy>>,
) -> Result<Plan, ProxyError> {
    let target = backend.port.and_then(|p| model.service_port(&backend.namespace, &backend.name, p)).ok_or_else(|| {
        let msg = format!(
            "backend Service {}/{} port {} does not exist",
            backend.namespace,
            backend.name,
            backend.port.map_or("?".into(), |p| p.to_string())
        );
        if istio {
            ProxyError::NoCluster(msg)
        } else {
            ProxyError::BadBackend(msg)
        }
    })?;
    let (ns, name, bport) = (&backend.namespace, &backend.name, target.port().port);
    let subset = backend.subset.as_deref();
    // The family the client dialled, if the backend has it (see "Dual stack" in the design
    // notes).
    let family = AddressType::of(ctx.orig.ip());
    // An unknown subset is a cluster Istio would not have generated: 503 no-cluster, as Envoy.
    let rule = match model.destination_rule_index().destination(dr_client(model, ctx), ns, name, bport, subset) {
        None => match subset {
            Some(s) => {
                return Err(ProxyError::NoCluster(format!(
                    "subset {s:?} of {ns}/{name}: no DestinationRule for this client defines subsets of the Service"
                )))
            }
            None => None,
        },
        Some(Ok(r)) => Some(r),
        Some(Err(why)) => return Err(ProxyError::NoCluster(why)),
    };
    let endpoints = match rule {
        Some(r) => r.endpoints_preferring(family).0.clone(),
        None => target.endpoints_preferring(family).clone(),
    };
    let plan = match subset {
        None => Plan::simple(format!("{ns}/{name}:{bport}"), endpoints, balance_key(ns, name, bport)),
        Some(subset) => Plan::simple(
            format!("{ns}/{name}:{bport}/{subset}"),
            endpoints,
            balance_key(ns, &format!("{name}|{subset}"), bport),
        ),
    }
    .with_destination(policy);
    match rule {
        None => Ok(plan),
        Some(r) => {
            // PASSTHROUGH goes to the Service's own address of the client's family.
            let vip = target.service().cluster_ips.iter().find(|ip| AddressType::of(**ip) == family);
            let passthrough = vip.map_or(ctx.orig, |ip| SocketAddr::new(*ip, bport));
            let host = crate::discovery::istio::service_fqdn(ns, name);
            plan.with_destination_rule(r, policy, ctx, passthrough, &host)
        }
    }
}

/// The endpoints of a Service's subset: those whose pod carries the subset's labels.
pub fn subset_endpoints(
    model: &Model,
    namespace: &str,
    name: &str,
    subset: &str,
    endpoints: &Arc<[SocketAddr]>,
) -> Result<Arc<[SocketAddr]>, String> {
    let sel = resolve_subset(model, namespace, name, subset)?;
    Ok(endpoints
        .iter()
        .filter(|ep| {
            model.pod_by_ip(ep.ip()).is_some_and(|p| sel.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        })
        .copied()
        .collect())
}

/// A ServiceEntry port chosen by a VirtualService destination.
fn entry_backend(model: &Model, ctx: &ConnCtx, backend: &BackendRef) -> Result<Plan, ProxyError> {
    let entry = model.service_entry(&backend.namespace, &backend.name);
    let found = entry.and_then(|e| backend.port.and_then(|p| e.ports.iter().find(|ep| ep.number == p)).map(|p| (e, p)));
    let Some((entry, port)) = found else {
        return Err(ProxyError::NoCluster(format!(
            "ServiceEntry {}/{} has no port {}",
            backend.namespace,
            backend.name,
            backend.port.map_or("?".into(), |p| p.to_string())
        )));
    };
    service_entry_plan(model, ctx, entry, port, None)
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
/// destination declared by a ServiceEntry (matched by address, or by the Host header; its
/// VirtualServices route it), or anything else, which the client's namespace may forbid
/// (REGISTRY_ONLY).
fn outside(model: &Model, ctx: &ConnCtx, parts: &mut request::Parts, grpc: bool) -> Result<Decision, ProxyError> {
    let dialled = || Plan::simple(ctx.orig.to_string(), Arc::from([ctx.orig].as_slice()), 0);
    if model.pod_by_ip(ctx.orig.ip()).is_some() {
        return Ok(Decision::Forward(dialled()));
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
        return Ok(Decision::Forward(dialled()));
    };
    let tables =
        model.entry_port_routes(&entry.namespace, &entry.name, port.number).map_or(&[][..], |r| r.for_client(&ctx.pod.namespace));
    let matched_host = matched_host.map(str::to_owned);
    if !tables.is_empty() {
        let policy = model.traffic_policy_for_service_entry(&entry.namespace, &entry.name);
        if let Some(d) = routed(model, ctx, parts, grpc, tables, port.number, policy)? {
            return Ok(d);
        }
    }
    service_entry_plan(model, ctx, entry, port, matched_host.as_deref()).map(Decision::Forward)
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
    let rule = model.destination_rule_index().service_entry(dr_client(model, ctx), &entry.namespace, &entry.name, port.number);
    if let Some(rule) = rule {
        let sni_host = host.clone().unwrap_or_else(|| entry.name.clone());
        plan = plan.with_destination_rule(rule, policy, ctx, ctx.orig, &sni_host)?;
    }
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
            Filter::Redirect(rd) => return Some(filters::istio_redirect(parts, rd, sel.matched, service_port)),
            Filter::DirectResponse(d) => return Some(filters::direct_response(d)),
        }
    }
    None
}

/// The Maglev table of `rule` built over exactly `endpoints` (the list the plan hands to the
/// balancer), if there is one.
fn rule_table(rule: &Resolved, endpoints: &Arc<[SocketAddr]>) -> Option<Arc<Maglev>> {
    [AddressType::IPv4, AddressType::IPv6]
        .into_iter()
        .filter_map(|f| {
            let (eps, table) = rule.endpoints_of(f);
            Arc::ptr_eq(eps, endpoints).then(|| table.cloned()).flatten()
        })
        .next()
}

/// Who asks, as DestinationRule selection needs it: the client's namespace, and its labels
/// only when some rule selects clients by labels.
pub fn dr_client<'a>(model: &'a Model, ctx: &'a ConnCtx) -> Client<'a> {
    let labels = model
        .destination_rule_index()
        .needs_labels()
        .then(|| model.pod(&ctx.pod.namespace, &ctx.pod.name).map(|p| &p.labels))
        .flatten();
    Client { namespace: &ctx.pod.namespace, labels }
}

/// A backend by weight (weight 0 never); `None` if no backend has weight.
pub(crate) fn pick_backend(backends: &[BackendRef]) -> Option<&BackendRef> {
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

#[cfg(test)]
#[path = "plan_dr_tests.rs"]
mod dr_tests;
