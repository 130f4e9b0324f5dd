//! `GET /routes[?service=NAMESPACE/NAME]`: the effective route table of every Service port
//! (or one Service), as the data path would apply it right now: rules in precedence order,
//! their backends with weights, and each backend's endpoints with their current load state
//! (peak-EWMA latency, requests in flight, requests sent).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{
    discovery::{
        route::{Filter, GrpcMethodMatch, PathMatch, RouteMatch, RouteRule, ValueMatch},
        route_table::RouteTable,
        Model, ServiceTarget,
    },
    l7::Balancer,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRoutesView {
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
    pub default_backend: BackendView,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableView {
    /// "all clients" or "clients in namespace X".
    pub clients: String,
    pub entries: Vec<EntryView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryView {
    /// 1-based precedence.
    pub order: usize,
    /// "HTTPRoute ns/name".
    pub route: String,
    pub rule: usize,
    pub rule_name: Option<String>,
    /// A one-line description of the match.
    pub matches: String,
    pub filters: Vec<String>,
    pub request_timeout_ms: Option<u64>,
    pub backend_request_timeout_ms: Option<u64>,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendView {
    /// "namespace/name:port".
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

/// The view of every Service port (sorted), or of one Service's ports.
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
            let mut tables = Vec::new();
            if let Some(routes) = model.port_routes(&svc.namespace, &svc.name, p.port) {
                if let Some(t) = routes.producer() {
                    tables.push(table("all clients".into(), t, model, balancer, now));
                }
                for (ns, t) in routes.consumers() {
                    tables.push(table(format!("clients in namespace {ns}"), t, model, balancer, now));
                }
            }
            out.push(ServiceRoutesView {
                service: key.clone(),
                cluster_ip: svc.cluster_ip.map(|ip| ip.to_string()),
                port: p.port,
                port_name: p.name.clone(),
                app_protocol: p.app_protocol.clone(),
                tables,
                default_backend: service_backend(target, 1, 100.0, None, balancer, now),
            });
        }
    }
    out
}

fn table(clients: String, t: &RouteTable, model: &Model, balancer: &Balancer, now: Instant) -> TableView {
    let entries = t
        .entries()
        .enumerate()
        .map(|(i, (route, rule_index, m))| {
            let rule = &route.rules[rule_index];
            EntryView {
                order: i + 1,
                route: format!("{} {}", route.kind, route.key()),
                rule: rule_index,
                rule_name: rule.name.clone(),
                matches: describe_match(m),
                filters: describe_filters(rule),
                request_timeout_ms: rule.timeouts.request.map(|d| d.as_millis() as u64),
                backend_request_timeout_ms: rule.timeouts.backend_request.map(|d| d.as_millis() as u64),
                backends: backends(rule, model, balancer, now),
            }
        })
        .collect();
    TableView { clients, entries }
}

fn backends(rule: &RouteRule, model: &Model, balancer: &Balancer, now: Instant) -> Vec<BackendView> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    rule.backends
        .iter()
        .map(|b| {
            let share = if total == 0 { 0.0 } else { 100.0 * f64::from(b.weight) / total as f64 };
            let name = format!("{}/{}:{}", b.namespace, b.name, b.port.map_or("?".into(), |p| p.to_string()));
            let target = b.port.and_then(|p| model.service_port(&b.namespace, &b.name, p));
            match (target, &b.invalid) {
                (Some(t), None) => service_backend(t, b.weight, share, None, balancer, now),
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
    match &m.path {
        Some(PathMatch::Exact(p)) => parts.push(format!("Exact {p}")),
        Some(PathMatch::PathPrefix(p)) => parts.push(format!("PathPrefix {p}")),
        Some(PathMatch::RegularExpression(r)) => parts.push(format!("RegularExpression {}", r.as_str())),
        None => {}
    }
    if let Some(method) = &m.method {
        parts.push(method.clone());
    }
    for h in &m.headers {
        parts.push(format!("header {}{}", h.name, value(&h.value)));
    }
    for q in &m.query_params {
        parts.push(format!("query {}{}", q.name, value(&q.value)));
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
            Filter::UrlRewrite(_) => "URLRewrite".to_owned(),
            Filter::RequestMirror(m) => {
                format!("RequestMirror {}/{} ({:.0}%)", m.backend.namespace, m.backend.name, m.fraction.0 * 100.0)
            }
        })
        .collect()
}
