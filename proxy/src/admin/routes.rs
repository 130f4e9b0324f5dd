//! `GET /routes[?service=NAMESPACE/NAME]`: the effective route table of every Service port
//! (or one Service), and of every ServiceEntry port a VirtualService names, as the data path
//! would apply it right now: per audience (the clients of which namespaces), the resources
//! consulted in order (HTTPRoutes, GRPCRoutes, VirtualServices: each rule names the
//! kind/namespace/name and the place in it that produced it), the resources shadowed for those
//! clients, the tcp/tls rules, the backends with weights, and each backend's endpoints with
//! their current load state (peak-EWMA latency, requests in flight, requests sent).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::{
    discovery::{
        istio::vs_compile::StreamRoute,
        route::{BackendKind, BackendRef, Filter, GrpcMethodMatch, PathMatch, PathModifier, RouteMatch, RouteRule, ValueMatch},
        route_table::{Chain, RouteTable},
        Model, ServiceTarget,
    },
    l7::Balancer,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRoutesView {
    /// `Service` or `ServiceEntry`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// "namespace/name".
    pub service: String,
    pub cluster_ip: Option<String>,
    pub port: u16,
    pub port_name: Option<String>,
    pub app_protocol: Option<String>,
    /// One table per audience: the producer routes ("all clients") and each namespace with
    /// consumer routes of its own. Empty when no route attaches: requests then go to the
    /// Service's endpoints (`default_backend`).
    pub tables: Vec<TableView>,
    /// VirtualServices' tcp and tls rules, per audience (opaque connections).
    #[serde(default)]
    pub streams: Vec<StreamTableView>,
    pub default_backend: BackendView,
    /// The DestinationRule in force for this Service, per audience (its subsets, load
    /// balancing, connection pool, outlier detection and TLS apply to the backends above).
    #[serde(default)]
    pub destination_rules: Vec<DestinationRuleView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestinationRuleView {
    /// "clients in namespace X", "clients in other namespaces", "pods of X labelled a=b".
    pub clients: String,
    /// "namespace/name".
    pub rule: String,
    pub subsets: Vec<String>,
}

fn service_kind() -> String {
    "Service".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableView {
    /// "all clients", "clients in namespace X", "clients in other namespaces".
    pub clients: String,
    pub entries: Vec<EntryView>,
    /// Resources that also name this port but are never consulted for these clients (one
    /// before them always decides): `Kind namespace/name`.
    #[serde(default)]
    pub shadowed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamTableView {
    pub clients: String,
    pub rules: Vec<StreamRuleView>,
    #[serde(default)]
    pub shadowed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRuleView {
    pub order: usize,
    /// "VirtualService ns/name".
    pub route: String,
    /// `tcp[0]`, `tls[1]`.
    pub rule: String,
    /// A one-line description of the match.
    pub matches: String,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryView {
    /// 1-based precedence.
    pub order: usize,
    /// "HTTPRoute ns/name", "VirtualService ns/name".
    pub route: String,
    pub rule: usize,
    pub rule_name: Option<String>,
    /// Where in the resource the rule was written, when not plain `rules[rule]`:
    /// `http[1]`, `http[0] (delegate ns/name http[2])`.
    #[serde(default)]
    pub origin: Option<String>,
    /// A one-line description of the match.
    pub matches: String,
    pub filters: Vec<String>,
    pub request_timeout_ms: Option<u64>,
    pub backend_request_timeout_ms: Option<u64>,
    /// `2 retries on connect-failure, 5xx` (a rule's own retry policy).
    #[serde(default)]
    pub retries: Option<String>,
    /// `delay 7000ms 100%, abort 500 10%`.
    #[serde(default)]
    pub fault: Option<String>,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendView {
    /// "namespace/name:port", with "/subset" for a DestinationRule subset; ServiceEntries as
    /// "serviceentry:namespace/name:port".
    pub backend: String,
    pub weight: u32,
    /// Share of the rule's traffic, in percent.
    pub share_percent: f64,
    /// Why the backend cannot be used (requests sent to it get 500).
    pub invalid: Option<String>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointView {
    pub address: String,
    /// Peak-EWMA latency estimate now; `None` before sluice sent it anything.
    pub ewma_ms: Option<f64>,
    pub pending: u32,
    pub requests: u64,
}

/// The view of every Service port (sorted), or of one Service's ports; then the ServiceEntry
/// ports VirtualServices name.
pub fn view(model: &Model, balancer: &Balancer, only: Option<&str>) -> Vec<ServiceRoutesView> {
    let now = Instant::now();
    let mut services: Vec<_> = model.services().collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut out = Vec::new();
    for svc in services {
        let key = format!("{}/{}", svc.namespace, svc.name);
        if only.is_some_and(|o| o != key && o != svc.name) {
            continue;
        }
        for p in &svc.ports {
            let Some(target) = model.service_port(&svc.namespace, &svc.name, p.port) else { continue };
            let tables = model.port_routes(&svc.namespace, &svc.name, p.port).map_or_else(Vec::new, |routes| {
                audiences(routes.audiences()).into_iter().map(|(who, c)| table(who, c, model, balancer, now)).collect()
            });
            let streams = model.stream_routes(&svc.namespace, &svc.name, p.port).map_or_else(Vec::new, |s| {
                audiences_of(s.audiences(), |c| (&c.routes, &c.shadowed))
                    .into_iter()
                    .map(|(who, c)| stream_table(who, &c.routes, &c.shadowed, model, balancer, now))
                    .collect()
            });
            out.push(ServiceRoutesView {
                kind: "Service".into(),
                service: key.clone(),
                cluster_ip: svc.cluster_ip.map(|ip| ip.to_string()),
                port: p.port,
                port_name: p.name.clone(),
                app_protocol: p.app_protocol.clone(),
                tables,
                streams,
                default_backend: service_backend(target, 1, 100.0, None, balancer, now),
                destination_rules: destination_rules(model, &svc.namespace, &svc.name),
            });
        }
    }
    let mut entries: Vec<_> = model.service_entries().collect();
    entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for e in entries {
        let key = format!("{}/{}", e.namespace, e.name);
        if only.is_some_and(|o| o != key && o != e.name) {
            continue;
        }
        for p in &e.ports {
            let http = model.entry_port_routes(&e.namespace, &e.name, p.number);
            let stream = model.entry_stream_routes(&e.namespace, &e.name, p.number);
            if http.is_none() && stream.is_none() {
                continue;
            }
            let tables = http.map_or_else(Vec::new, |routes| {
                audiences(routes.audiences()).into_iter().map(|(who, c)| table(who, c, model, balancer, now)).collect()
            });
            let streams = stream.map_or_else(Vec::new, |s| {
                audiences_of(s.audiences(), |c| (&c.routes, &c.shadowed))
                    .into_iter()
                    .map(|(who, c)| stream_table(who, &c.routes, &c.shadowed, model, balancer, now))
                    .collect()
            });
            out.push(ServiceRoutesView {
                kind: "ServiceEntry".into(),
                service: key.clone(),
                cluster_ip: e.addresses.first().map(ToString::to_string),
                port: p.number,
                port_name: Some(p.name.clone()).filter(|n| !n.is_empty()),
                app_protocol: Some(p.protocol.clone()).filter(|n| !n.is_empty()),
                tables,
                streams,
                default_backend: BackendView {
                    backend: format!("serviceentry:{key}:{}", p.number),
                    weight: 1,
                    share_percent: 100.0,
                    invalid: None,
                    endpoints: Vec::new(),
                },
                destination_rules: Vec::new(),
            });
        }
    }
    out
}

/// Audiences with the same chain shown once: "all clients" when every namespace uses the same,
/// else each group of namespaces, then "clients in other namespaces".
fn audiences<'a>(list: Vec<(Option<&'a str>, &'a Chain)>) -> Vec<(String, &'a Chain)> {
    audiences_of(list, |c| (&c.tables, &c.shadowed))
        .into_iter()
        .filter(|(_, c)| !c.tables.is_empty() || !c.shadowed.is_empty())
        .collect()
}

/// Groups audiences whose chains (compared by identity of their tables) are the same.
fn audiences_of<'a, C, T: 'a>(
    list: Vec<(Option<&'a str>, &'a C)>,
    parts: impl Fn(&'a C) -> (&'a Vec<Arc<T>>, &'a Vec<String>),
) -> Vec<(String, &'a C)> {
    let same = |a: &'a C, b: &'a C| {
        let ((ta, sa), (tb, sb)) = (parts(a), parts(b));
        ta.len() == tb.len() && ta.iter().zip(tb).all(|(x, y)| Arc::ptr_eq(x, y)) && sa == sb
    };
    let default = list.iter().find(|(k, _)| k.is_none()).map(|(_, c)| *c);
    let mut groups: Vec<(Vec<&str>, &C)> = Vec::new();
    for (k, c) in &list {
        let Some(ns) = k else { continue };
        if default.is_some_and(|d| same(d, c)) {
            continue;
        }
        match groups.iter_mut().find(|(_, g)| same(g, c)) {
            Some((names, _)) => names.push(ns),
            None => groups.push((vec![ns], c)),
        }
    }
    let mut out: Vec<(String, &C)> = groups
        .into_iter()
        .map(|(names, c)| {
            let label = if names.len() == 1 {
                format!("clients in namespace {}", names[0])
            } else {
                format!("clients in namespaces {}", names.join(", "))
            };
            (label, c)
        })
        .collect();
    if let Some(d) = default {
        out.push((if out.is_empty() { "all clients".into() } else { "clients in other namespaces".into() }, d));
    }
    out
}

fn table(clients: String, chain: &Chain, model: &Model, balancer: &Balancer, now: Instant) -> TableView {
    let entries = chain
        .tables
        .iter()
        .flat_map(|t: &Arc<RouteTable>| t.entries())
        .enumerate()
        .map(|(i, (route, rule_index, m))| {
            let rule = &route.rules[rule_index];
            EntryView {
                order: i + 1,
                route: format!("{} {}", route.kind, route.key()),
                rule: rule_index,
                rule_name: rule.name.clone(),
                origin: rule.origin.clone(),
                matches: describe_match(m),
                filters: describe_filters(rule),
                request_timeout_ms: rule.timeouts.request.map(|d| d.as_millis() as u64),
                backend_request_timeout_ms: rule.timeouts.backend_request.map(|d| d.as_millis() as u64),
                retries: rule.retry_policy.as_ref().map(describe_retries),
                fault: rule.fault.as_ref().map(describe_fault),
                backends: backends(rule, model, balancer, now),
            }
        })
        .collect();
    TableView { clients, entries, shadowed: chain.shadowed.clone() }
}

fn stream_table(
    clients: String,
    routes: &[Arc<StreamRoute>],
    shadowed: &[String],
    model: &Model,
    balancer: &Balancer,
    now: Instant,
) -> StreamTableView {
    let rules = routes
        .iter()
        .flat_map(|r| r.rules.iter().map(move |rule| (r, rule)))
        .enumerate()
        .map(|(i, (r, rule))| StreamRuleView {
            order: i + 1,
            route: format!("VirtualService {}/{}", r.namespace, r.name),
            rule: rule.origin.clone(),
            matches: describe_stream_match(rule),
            backends: backend_views(&rule.backends, model, balancer, now),
        })
        .collect();
    StreamTableView { clients, rules, shadowed: shadowed.to_vec() }
}

fn describe_stream_match(rule: &crate::discovery::istio::vs_compile::StreamRule) -> String {
    if rule.matches.is_empty() {
        return "any connection".into();
    }
    rule.matches
        .iter()
        .map(|m| {
            let mut parts = Vec::new();
            if !m.sni_hosts.is_empty() {
                parts.push(format!("sni {}", m.sni_hosts.join("|")));
            }
            if !m.destination_subnets.is_empty() {
                parts.push(format!("dst {}", m.destination_subnets.iter().map(ToString::to_string).collect::<Vec<_>>().join("|")));
            }
            if let Some(n) = m.source_subnet {
                parts.push(format!("src {n}"));
            }
            if let Some(src) = &m.source {
                parts.push(describe_source(src));
            }
            if parts.is_empty() {
                "any connection".to_owned()
            } else {
                parts.join(", ")
            }
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn describe_source(s: &crate::discovery::route::SourceMatch) -> String {
    let mut parts = Vec::new();
    if let Some(ns) = &s.namespace {
        parts.push(format!("from namespace {ns}"));
    }
    if !s.labels.is_empty() {
        parts.push(format!(
            "from pods {}",
            s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
        ));
    }
    parts.join(", ")
}

fn describe_retries(r: &crate::discovery::traffic::RetryPolicy) -> String {
    if r.attempts == 0 {
        return "no retries".into();
    }
    let o = &r.retry_on;
    let mut on: Vec<String> = [
        (o.connect_failure, "connect-failure"),
        (o.refused_stream, "refused-stream"),
        (o.reset, "reset"),
        (o.status_5xx, "5xx"),
        (o.gateway_error, "gateway-error"),
        (o.grpc_cancelled, "cancelled"),
        (o.grpc_deadline_exceeded, "deadline-exceeded"),
        (o.grpc_internal, "internal"),
        (o.grpc_resource_exhausted, "resource-exhausted"),
        (o.grpc_unavailable, "unavailable"),
        (o.envoy_ratelimited, "envoy-ratelimited"),
    ]
    .iter()
    .filter(|(b, _)| *b)
    .map(|(_, n)| (*n).to_owned())
    .collect();
    on.extend(r.retriable_status_codes.iter().map(|c| c.to_string()));
    let mut s = format!("{} retries on {}", r.attempts, on.join(","));
    if let Some(t) = r.per_try_timeout {
        s.push_str(&format!(", {}ms per try", t.as_millis()));
    }
    s
}

fn describe_fault(f: &crate::discovery::traffic::FaultInjection) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &f.delay {
        parts.push(format!("delay {}ms {}%", d.fixed.as_millis(), d.fraction.0 * 100.0));
    }
    if let Some(a) = &f.abort {
        match a.grpc_status {
            Some(g) => parts.push(format!("abort grpc {g} {}%", a.fraction.0 * 100.0)),
            None => parts.push(format!("abort {} {}%", a.http_status, a.fraction.0 * 100.0)),
        }
    }
    parts.join(", ")
}

fn backends(rule: &RouteRule, model: &Model, balancer: &Balancer, now: Instant) -> Vec<BackendView> {
    backend_views(&rule.backends, model, balancer, now)
}

fn destination_rules(model: &Model, ns: &str, name: &str) -> Vec<DestinationRuleView> {
    model
        .destination_rule_index()
        .in_force(ns, name)
        .into_iter()
        .map(|(clients, rule, subsets)| DestinationRuleView { clients, rule, subsets })
        .collect()
}

fn backend_views(list: &[BackendRef], model: &Model, balancer: &Balancer, now: Instant) -> Vec<BackendView> {
    let total: u64 = list.iter().map(|b| u64::from(b.weight)).sum();
    list.iter()
        .map(|b| {
            let share = if total == 0 { 0.0 } else { 100.0 * f64::from(b.weight) / total as f64 };
            let port = b.port.map_or("?".into(), |p| p.to_string());
            let name = match b.kind {
                BackendKind::Service => format!("{}/{}:{port}", b.namespace, b.name),
                BackendKind::ServiceEntry => format!("serviceentry:{}/{}:{port}", b.namespace, b.name),
            };
            if b.kind == BackendKind::ServiceEntry {
                return BackendView { backend: name, weight: b.weight, share_percent: share, invalid: b.invalid.clone(), endpoints: Vec::new() };
            }
            let target = b.port.and_then(|p| model.service_port(&b.namespace, &b.name, p));
            match (target, &b.invalid) {
                (Some(t), None) => {
                    let mut v = service_backend(t, b.weight, share, None, balancer, now);
                    if let Some(subset) = &b.subset {
                        v.backend = format!("{}/{subset}", v.backend);
                        match crate::l7::plan::subset_endpoints(model, &b.namespace, &b.name, subset, t.endpoints()) {
                            Ok(eps) => v.endpoints.retain(|e| eps.iter().any(|a| a.to_string() == e.address)),
                            Err(why) => {
                                v.invalid = Some(why);
                                v.endpoints.clear();
                            }
                        }
                    }
                    v
                }
                (_, invalid) => BackendView {
                    backend: name,
                    weight: b.weight,
                    share_percent: share,
                    invalid: Some(invalid.clone().unwrap_or_else(|| "no such Service port".into())),
                    endpoints: Vec::new(),
                },
            }
        })
        .collect()
}

fn service_backend(
    t: &ServiceTarget,
    weight: u32,
    share: f64,
    invalid: Option<String>,
    balancer: &Balancer,
    now: Instant,
) -> BackendView {
    let tau = balancer.ewma_config().tau;
    BackendView {
        backend: format!("{}/{}:{}", t.namespace(), t.name(), t.port().port),
        weight,
        share_percent: share,
        invalid,
        endpoints: t
            .endpoints()
            .iter()
            .map(|addr| {
                let load = balancer.endpoint(*addr);
                EndpointView {
                    address: addr.to_string(),
                    ewma_ms: load.as_ref().filter(|l| l.requests() > 0).map(|l| l.estimate(now, tau).as_secs_f64() * 1e3),
                    pending: load.as_ref().map_or(0, |l| l.pending()),
                    requests: load.as_ref().map_or(0, |l| l.requests()),
                }
            })
            .collect(),
    }
}

fn value(v: &ValueMatch) -> String {
    match v {
        ValueMatch::Exact(s) => format!("={s}"),
        ValueMatch::RegularExpression(r) => format!("~{}", r.as_str()),
        ValueMatch::Prefix(p) => format!("^={p}"),
        ValueMatch::Present => " present".into(),
    }
}

/// `PathPrefix /api, GET, header x-user=test, query v~2.*` / `grpc pkg.Svc/Method`.
pub fn describe_match(m: &RouteMatch) -> String {
    let mut parts = Vec::new();
    if let Some(GrpcMethodMatch { service, method }) = &m.grpc {
        let s = service.as_ref().map_or("*".into(), |v| value(v).trim_start_matches('=').to_owned());
        let me = method.as_ref().map_or("*".into(), |v| value(v).trim_start_matches('=').to_owned());
        parts.push(format!("grpc {s}/{me}"));
    }
    let case = if m.ignore_uri_case { " (any case)" } else { "" };
    match &m.path {
        Some(PathMatch::Exact(p)) => parts.push(format!("Exact {p}{case}")),
        Some(PathMatch::PathPrefix(p)) => parts.push(format!("PathPrefix {p}")),
        Some(PathMatch::RegularExpression(r)) => parts.push(format!("RegularExpression {}", r.as_str())),
        Some(PathMatch::Prefix(p)) => parts.push(format!("Prefix {p}{case}")),
        None => {}
    }
    match &m.method {
        Some(ValueMatch::Exact(method)) => parts.push(method.clone()),
        Some(other) => parts.push(format!("method{}", value(other))),
        None => {}
    }
    if let Some(a) = &m.authority {
        parts.push(format!("authority{}", value(a)));
    }
    if let Some(a) = &m.scheme {
        parts.push(format!("scheme{}", value(a)));
    }
    for h in &m.headers {
        parts.push(format!("header {}{}", h.name, value(&h.value)));
    }
    for h in &m.without_headers {
        parts.push(format!("without header {}{}", h.name, value(&h.value)));
    }
    for q in &m.query_params {
        parts.push(format!("query {}{}", q.name, value(&q.value)));
    }
    if let Some(src) = &m.source {
        parts.push(describe_source(src));
    }
    if parts.is_empty() {
        "any request".into()
    } else {
        parts.join(", ")
    }
}

fn describe_filters(rule: &RouteRule) -> Vec<String> {
    rule.filters
        .iter()
        .map(|f| match f {
            Filter::RequestHeaderModifier(_) => "RequestHeaderModifier".to_owned(),
            Filter::ResponseHeaderModifier(_) => "ResponseHeaderModifier".to_owned(),
            Filter::RequestRedirect(r) => format!("RequestRedirect {}", r.status_code),
            Filter::UrlRewrite(rw) => match (&rw.hostname, &rw.path) {
                (_, Some(PathModifier::RegexReplace { pattern, .. })) => format!("rewrite ~{}", pattern.as_str()),
                (_, Some(PathModifier::ReplacePrefix(p))) => format!("rewrite uri {p}"),
                (Some(h), None) => format!("rewrite authority {h}"),
                _ => "URLRewrite".to_owned(),
            },
            Filter::RequestMirror(m) => {
                let subset = m.backend.subset.as_ref().map_or(String::new(), |s| format!("/{s}"));
                format!("RequestMirror {}/{}{subset} ({}%)", m.backend.namespace, m.backend.name, m.fraction.0 * 100.0)
            }
            Filter::Redirect(r) => format!("redirect {}", r.status_code),
            Filter::DirectResponse(d) => format!("directResponse {}", d.status),
        })
        .collect()
}
