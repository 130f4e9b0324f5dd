//! VirtualServices compiled, per snapshot, into what the data path matches: for every Service
//! and ServiceEntry port a VirtualService's hosts name, a [`Route`] of kind `VirtualService`
//! (its http rules in order, destinations resolved to Service or ServiceEntry ports) and a
//! [`StreamRoute`] (its tcp and tls rules).
//!
//! Hosts, as Istio's sidecars resolve them: a short name is `<name>.<the resource's
//! namespace>.svc.<cluster domain>`; anything with a dot is taken as written. A host names a
//! Service by its FQDN, or a ServiceEntry by one of its hosts; `*.suffix` names every such host
//! under `suffix`, and `*` every one. When wildcard resources overlap, a host takes only the most
//! specific (Istio's `mostSpecificWildcardVsIndex`). A host that names nothing known is inert.
//!
//! Delegation (Istio's `MergeHTTPRoutes`): a root rule with `delegate` is replaced by the
//! delegate's rules, each match merged with the root's (a delegate match that conflicts with
//! every root match drops its rule), and each field the delegate rule leaves unset (rewrite,
//! timeout, retries, fault, mirrors, headers) taken from the root rule. A delegate that does
//! not exist, has hosts, or is not exported to the root's namespace drops the root rule, which
//! the admin view reports.
//!
//! Work is bounded: a VirtualService is compiled once per listener port number (every Service
//! with that port shares the result), not once per Service.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::cluster_domain;
use super::virtual_service::{
    istio_default_retries, Destination, HeaderOps, HttpAction, HttpMatch, HttpRule, Mirror, StreamMatch,
    StreamRuleSpec, VirtualService,
};
use crate::discovery::model::Service;
use crate::discovery::route::{
    BackendKind, BackendRef, ClientInfo, Filter, PathMatch, RequestMirror, Route, RouteKind, RouteMatch, RouteRule,
    RouteTimeouts, UrlRewrite, ValueMatch,
};
use crate::discovery::traffic::ServiceEntry;

/// A VirtualService's tcp and tls rules as they apply to one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamRoute {
    pub namespace: String,
    pub name: String,
    pub created: Option<String>,
    pub rules: Vec<StreamRule>,
}

/// One tcp or tls rule: the first whose match holds takes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamRule {
    /// `tcp[0]`, `tls[1]`: where it was written.
    pub origin: String,
    pub tls: bool,
    /// Any of them (empty: every connection; only tcp rules may have none).
    pub matches: Vec<StreamMatch>,
    pub backends: Vec<BackendRef>,
}

/// What a tcp or tls rule can see of a connection.
#[derive(Debug, Clone, Copy)]
pub struct StreamConn<'a> {
    /// The address the client dialled.
    pub dst: IpAddr,
    /// The client pod's address.
    pub src: IpAddr,
    /// The ClientHello's server name, when one was read.
    pub sni: Option<&'a str>,
    pub client: ClientInfo<'a>,
}

impl StreamRoute {
    /// The first rule that takes the connection.
    pub fn select(&self, conn: &StreamConn<'_>) -> Option<&StreamRule> {
        self.rules.iter().find(|r| r.takes(conn))
    }

    /// Whether some rule may apply to this client (none does when each is for other clients:
    /// then the next resource for the host decides).
    pub fn for_client(&self, client: &ClientInfo<'_>) -> bool {
        self.rules
            .iter()
            .any(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.source.as_ref().is_none_or(|s| s.matches(client))))
    }

    /// Whether any rule needs the ClientHello's server name.
    pub fn needs_sni(&self) -> bool {
        self.rules.iter().any(|r| r.tls)
    }
}

impl StreamRule {
    fn takes(&self, conn: &StreamConn<'_>) -> bool {
        self.matches.is_empty() && !self.tls || self.matches.iter().any(|m| stream_match(m, self.tls, conn))
    }
}

fn stream_match(m: &StreamMatch, tls: bool, conn: &StreamConn<'_>) -> bool {
    if tls {
        let Some(sni) = conn.sni else { return false };
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        if !m.sni_hosts.iter().any(|h| host_covers(h, &sni)) {
            return false;
        }
    }
    (m.destination_subnets.is_empty() || m.destination_subnets.iter().any(|n| n.contains(conn.dst)))
        && m.source_subnet.is_none_or(|n| n.contains(conn.src))
        && m.source.as_ref().is_none_or(|s| s.matches(&conn.client))
}

/// Whether the (possibly wildcard) `pattern` covers the host `name`: `*` covers everything,
/// `*.a.b` covers `x.a.b` and `x.y.a.b`.
pub fn host_covers(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
        None => pattern == name,
    }
}

/// A VirtualService's contribution to one port of one Service or ServiceEntry.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub vs: Arc<VirtualService>,
    /// Its http rules for the port (`None`: none applies there).
    pub http: Option<Arc<Route>>,
    /// Its tcp and tls rules for the port.
    pub stream: Option<Arc<StreamRoute>>,
}

/// port → the VirtualServices for it, in no particular order (`vs_mixing` orders them per
/// client).
pub type PortCandidates = Vec<(u16, Vec<Candidate>)>;

/// The VirtualServices of a snapshot, compiled.
#[derive(Debug, Default)]
pub struct VsIndex {
    /// Service namespace → name → its ports' candidates.
    pub services: HashMap<String, HashMap<String, PortCandidates>>,
    /// ServiceEntry namespace → name → its ports' candidates.
    pub entries: HashMap<String, HashMap<String, PortCandidates>>,
    /// VirtualService `namespace/name` → what it names, and what went wrong compiling it.
    pub status: BTreeMap<String, VsStatus>,
}

/// What a VirtualService applies to in this snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VsStatus {
    /// `Service ns/name`, `ServiceEntry ns/name`.
    pub targets: Vec<String>,
    /// Rules dropped and why (a delegate that is missing, or conflicts).
    pub problems: Vec<String>,
}

/// What a host resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Target<'a> {
    Service(&'a str, &'a str),
    Entry(&'a str, &'a str),
}

/// The lookups host resolution needs.
struct Registry<'a> {
    /// FQDN → Service.
    services: HashMap<String, &'a Arc<Service>>,
    /// Host → ServiceEntries declaring it (namespace/name order).
    entry_hosts: HashMap<&'a str, Vec<&'a Arc<ServiceEntry>>>,
    entries: Vec<&'a Arc<ServiceEntry>>,
    /// namespace → name → delegate VirtualService.
    delegates: HashMap<(&'a str, &'a str), &'a Arc<VirtualService>>,
}

/// `name.namespace.svc.<domain>`.
pub fn service_fqdn(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.{}", cluster_domain())
}

/// A host as written in a resource of `namespace`, fully qualified as Istio does it.
pub fn qualify(host: &str, namespace: &str) -> String {
    if host == "*" || host.contains('.') {
        host.to_owned()
    } else {
        service_fqdn(namespace, host)
    }
}

/// Compiles every VirtualService that applies to the mesh.
pub fn compile<'a>(
    services: impl Iterator<Item = &'a Arc<Service>>,
    entries: impl Iterator<Item = &'a Arc<ServiceEntry>>,
    virtual_services: impl Iterator<Item = &'a Arc<VirtualService>>,
) -> VsIndex {
    let mut reg = Registry { services: HashMap::new(), entry_hosts: HashMap::new(), entries: Vec::new(), delegates: HashMap::new() };
    for s in services {
        reg.services.insert(service_fqdn(&s.namespace, &s.name), s);
    }
    let mut all_entries: Vec<&Arc<ServiceEntry>> = entries.collect();
    all_entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for e in &all_entries {
        for h in &e.hosts {
            reg.entry_hosts.entry(h.as_str()).or_default().push(e);
        }
    }
    reg.entries = all_entries;
    let mut roots: Vec<&Arc<VirtualService>> = Vec::new();
    for vs in virtual_services {
        if vs.is_delegate() {
            reg.delegates.insert((vs.namespace.as_str(), vs.name.as_str()), vs);
        } else {
            roots.push(vs);
        }
    }
    roots.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut index = VsIndex::default();
    // Which VirtualServices name each target, with how specifically (exact: MAX).
    let mut by_target: BTreeMap<Target<'_>, Vec<(usize, &Arc<VirtualService>)>> = BTreeMap::new();
    for vs in &roots {
        let status = index.status.entry(vs.key()).or_default();
        if !vs.for_mesh() {
            status.problems.push(format!(
                "bound to gateways {:?} only (not `mesh`): it applies to no traffic sluice carries",
                vs.gateways
            ));
            continue;
        }
        for host in &vs.hosts {
            let fqdn = qualify(host, &vs.namespace);
            for (target, specificity) in reg.targets_of(&fqdn) {
                let list = by_target.entry(target).or_default();
                match list.iter_mut().find(|(_, v)| Arc::ptr_eq(v, vs)) {
                    Some(e) => e.0 = e.0.max(specificity),
                    None => list.push((specificity, vs)),
                }
            }
        }
    }
    // Expanded http rules (delegation resolved) and compiled tables, per VirtualService.
    let mut expanded: HashMap<String, Arc<Vec<(HttpRule, String)>>> = HashMap::new();
    let mut compiled: HashMap<(String, u16), (Option<Arc<Route>>, Option<Arc<StreamRoute>>)> = HashMap::new();
    for (target, mut list) in by_target {
        // Exact names always count; of the wildcards, only the most specific.
        let best_wildcard = list.iter().filter(|(s, _)| *s != usize::MAX).map(|(s, _)| *s).max();
        list.retain(|(s, _)| *s == usize::MAX || Some(*s) == best_wildcard);
        let ports: Vec<u16> = match target {
            Target::Service(ns, name) => {
                let svc = reg.services.get(&service_fqdn(ns, name)).expect("target from the registry");
                let mut p: Vec<u16> = svc.ports.iter().map(|p| p.port).collect();
                p.sort_unstable();
                p.dedup();
                p
            }
            Target::Entry(ns, name) => {
                let e = reg.entries.iter().find(|e| e.namespace == ns && e.name == name).expect("target from the registry");
                let mut p: Vec<u16> = e.ports.iter().map(|p| p.number).collect();
                p.sort_unstable();
                p.dedup();
                p
            }
        };
        let mut per_port: PortCandidates = Vec::new();
        for port in ports {
            let mut candidates = Vec::new();
            for (_, vs) in &list {
                let key = vs.key();
                let rules = expanded
                    .entry(key.clone())
                    .or_insert_with(|| {
                        let (rules, problems) = expand_delegates(vs, &reg);
                        index.status.entry(key.clone()).or_default().problems.extend(problems);
                        Arc::new(rules)
                    })
                    .clone();
                let (http, stream) = compiled
                    .entry((key, port))
                    .or_insert_with(|| (compile_http(vs, &rules, port, &reg), compile_stream(vs, port, &reg)))
                    .clone();
                if http.is_some() || stream.is_some() {
                    candidates.push(Candidate { vs: (*vs).clone(), http, stream });
                }
            }
            if !candidates.is_empty() {
                per_port.push((port, candidates));
            }
        }
        let label = match target {
            Target::Service(ns, name) => format!("Service {ns}/{name}"),
            Target::Entry(ns, name) => format!("ServiceEntry {ns}/{name}"),
        };
        for (_, vs) in &list {
            index.status.entry(vs.key()).or_default().targets.push(label.clone());
        }
        if per_port.is_empty() {
            continue;
        }
        let (map, ns, name) = match target {
            Target::Service(ns, name) => (&mut index.services, ns, name),
            Target::Entry(ns, name) => (&mut index.entries, ns, name),
        };
        map.entry(ns.to_owned()).or_default().insert(name.to_owned(), per_port);
    }
    index
}

impl<'a> Registry<'a> {
    /// The Services and ServiceEntries a qualified host names, with its specificity (exact:
    /// `usize::MAX`, a wildcard: the length of what follows its `*`).
    fn targets_of(&self, fqdn: &str) -> Vec<(Target<'a>, usize)> {
        let mut out = Vec::new();
        if !fqdn.starts_with('*') {
            if let Some(s) = self.services.get(fqdn) {
                out.push((Target::Service(&s.namespace, &s.name), usize::MAX));
            }
            for e in self.entry_hosts.get(fqdn).into_iter().flatten() {
                out.push((Target::Entry(&e.namespace, &e.name), usize::MAX));
            }
            return out;
        }
        let specificity = fqdn.len() - 1;
        for (name, s) in &self.services {
            if host_covers(fqdn, name) {
                out.push((Target::Service(&s.namespace, &s.name), specificity));
            }
        }
        for (host, list) in &self.entry_hosts {
            if host_covers(fqdn, host) || *host == fqdn {
                for e in list {
                    out.push((Target::Entry(&e.namespace, &e.name), specificity));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// A destination host (as written in a resource of `namespace`) as a backend of a rule
    /// on `listen_port`.
    fn backend(&self, d: &Destination, namespace: &str, listen_port: u16, weight: u32) -> BackendRef {
        self.backend_of(&d.host, d.subset.clone(), d.port, namespace, listen_port, weight, d.filters.clone())
    }

    #[allow(clippy::too_many_arguments)]
    fn backend_of(
        &self,
        host: &str,
        subset: Option<String>,
        port: Option<u16>,
        namespace: &str,
        listen_port: u16,
        weight: u32,
        filters: Vec<Filter>,
    ) -> BackendRef {
        let fqdn = qualify(host, namespace);
        // No port: the destination's only port, else the port the client dialled (Istio's
        // GetDestinationCluster).
        if let Some(s) = self.services.get(&fqdn) {
            let port = port.or_else(|| (s.ports.len() == 1).then(|| s.ports[0].port)).unwrap_or(listen_port);
            return BackendRef {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                port: Some(port),
                weight,
                filters,
                invalid: None,
                subset,
                kind: BackendKind::Service,
            };
        }
        if let Some(e) = self.entry_hosts.get(fqdn.as_str()).and_then(|l| l.first()) {
            let port = port.or_else(|| (e.ports.len() == 1).then(|| e.ports[0].number)).unwrap_or(listen_port);
            return BackendRef {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                port: Some(port),
                weight,
                filters,
                invalid: None,
                subset,
                kind: BackendKind::ServiceEntry,
            };
        }
        BackendRef {
            namespace: namespace.to_owned(),
            name: fqdn.clone(),
            port: port.or(Some(listen_port)),
            weight,
            filters,
            invalid: Some(format!("host {fqdn} is neither a Service nor a ServiceEntry host")),
            subset,
            kind: BackendKind::Service,
        }
    }
}

/// A root's http rules with every `delegate` replaced by the delegate's (merged) rules, each
/// with where it was written; and the rules dropped, with why.
fn expand_delegates(vs: &VirtualService, reg: &Registry<'_>) -> (Vec<(HttpRule, String)>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, rule) in vs.http.iter().enumerate() {
        let HttpAction::Delegate { namespace, name } = &rule.action else {
            out.push((rule.clone(), format!("http[{i}]")));
            continue;
        };
        let ns = if namespace.is_empty() { vs.namespace.as_str() } else { namespace.as_str() };
        let Some(delegate) = reg.delegates.get(&(ns, name.as_str())) else {
            problems.push(format!("http[{i}]: delegate VirtualService {ns}/{name} does not exist (or has hosts): rule ignored"));
            continue;
        };
        if !delegate.export_to.visible_to(&vs.namespace) {
            problems.push(format!(
                "http[{i}]: delegate VirtualService {ns}/{name} is not exported to namespace {}: rule ignored",
                vs.namespace
            ));
            continue;
        }
        for (j, d) in delegate.http.iter().enumerate() {
            match merge_rule(rule, d) {
                Some(merged) => out.push((merged, format!("http[{i}] (delegate {ns}/{name} http[{j}])"))),
                None => problems.push(format!(
                    "http[{i}]: delegate {ns}/{name} http[{j}] matches nothing the root's match allows: rule ignored"
                )),
            }
        }
    }
    (out, problems)
}

/// Istio's mergeHTTPRoute: the delegate's rule, its matches narrowed by the root's, its unset
/// fields taken from the root. `None`: the matches conflict.
fn merge_rule(root: &HttpRule, delegate: &HttpRule) -> Option<HttpRule> {
    let matches = merge_matches(&root.matches, &delegate.matches)?;
    let name = match (&root.name, &delegate.name) {
        (Some(r), Some(d)) => Some(format!("{r}-{d}")),
        (r, d) => d.clone().or_else(|| r.clone()),
    };
    Some(HttpRule {
        name,
        matches,
        action: delegate.action.clone(),
        rewrite: delegate.rewrite.clone().or_else(|| root.rewrite.clone()),
        timeout: delegate.timeout.or(root.timeout),
        retries: delegate.retries.clone().or_else(|| root.retries.clone()),
        fault: delegate.fault.clone().or_else(|| root.fault.clone()),
        mirrors: delegate.mirrors.clone().or_else(|| root.mirrors.clone()),
        headers: delegate.headers.clone().or_else(|| root.headers.clone()),
    })
}

/// Every delegate match must fit under some root match; each pair that fits becomes one match.
fn merge_matches(root: &[HttpMatch], delegate: &[HttpMatch]) -> Option<Vec<HttpMatch>> {
    if root.is_empty() {
        return Some(delegate.to_vec());
    }
    if delegate.is_empty() {
        return Some(root.to_vec());
    }
    let mut out = Vec::new();
    for leaf in delegate {
        let mut found = false;
        for r in root {
            if conflict(r, leaf) {
                continue;
            }
            out.push(merge_match(r, leaf));
            found = true;
        }
        if !found {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

fn merge_match(root: &HttpMatch, leaf: &HttpMatch) -> HttpMatch {
    let (r, l) = (&root.m, &leaf.m);
    let merge_named = |a: &[crate::discovery::route::HeaderMatch], b: &[crate::discovery::route::HeaderMatch]| {
        let mut out: Vec<_> = a.iter().filter(|x| !b.iter().any(|y| y.name == x.name)).cloned().collect();
        out.extend(b.iter().cloned());
        out
    };
    let source = match (&r.source, &l.source) {
        (None, s) | (s, None) => s.clone(),
        (Some(a), Some(b)) => {
            let mut labels = a.labels.clone();
            labels.extend(b.labels.clone());
            Some(crate::discovery::route::SourceMatch { labels, namespace: b.namespace.clone().or_else(|| a.namespace.clone()) })
        }
    };
    HttpMatch {
        name: match (&root.name, &leaf.name) {
            (Some(a), Some(b)) => Some(format!("{a}-{b}")),
            (a, b) => b.clone().or_else(|| a.clone()),
        },
        m: RouteMatch {
            path: l.path.clone().or_else(|| r.path.clone()),
            method: l.method.clone().or_else(|| r.method.clone()),
            headers: merge_named(&r.headers, &l.headers),
            query_params: merge_named(&r.query_params, &l.query_params),
            grpc: None,
            ignore_uri_case: l.ignore_uri_case,
            authority: l.authority.clone().or_else(|| r.authority.clone()),
            scheme: l.scheme.clone().or_else(|| r.scheme.clone()),
            without_headers: merge_named(&r.without_headers, &l.without_headers),
            port: l.port.or(r.port),
            source,
        },
        gateways: if leaf.gateways.is_empty() { root.gateways.clone() } else { leaf.gateways.clone() },
    }
}

/// Istio's hasConflict: whether the leaf asks for something the root excludes.
fn conflict(root: &HttpMatch, leaf: &HttpMatch) -> bool {
    let (r, l) = (&root.m, &leaf.m);
    let path = |p: &Option<PathMatch>| -> Option<ValueMatch> {
        p.as_ref().map(|p| match p {
            PathMatch::Exact(v) => ValueMatch::Exact(v.clone()),
            PathMatch::Prefix(v) | PathMatch::PathPrefix(v) => ValueMatch::Prefix(v.clone()),
            PathMatch::RegularExpression(re) => ValueMatch::RegularExpression(re.clone()),
        })
    };
    if value_conflict(path(&r.path).as_ref(), path(&l.path).as_ref())
        || value_conflict(r.scheme.as_ref(), l.scheme.as_ref())
        || value_conflict(r.method.as_ref(), l.method.as_ref())
        || value_conflict(r.authority.as_ref(), l.authority.as_ref())
    {
        return true;
    }
    let named = |root: &[crate::discovery::route::HeaderMatch], leaf: &[crate::discovery::route::HeaderMatch]| {
        leaf.iter().any(|lh| value_conflict(root.iter().find(|rh| rh.name == lh.name).map(|rh| &rh.value), Some(&lh.value)))
    };
    if named(&r.headers, &l.headers) || named(&r.without_headers, &l.without_headers) || named(&r.query_params, &l.query_params)
    {
        return true;
    }
    if r.ignore_uri_case != l.ignore_uri_case {
        return true;
    }
    if let (Some(a), Some(b)) = (r.port, l.port) {
        if a != b {
            return true;
        }
    }
    let (rs, ls) = (r.source.clone().unwrap_or_default(), l.source.clone().unwrap_or_default());
    if rs.namespace.is_some() && ls.namespace != rs.namespace {
        return true;
    }
    if ls.labels.iter().any(|(k, v)| rs.labels.get(k).is_some_and(|rv| rv != v)) {
        return true;
    }
    if !root.gateways.is_empty() && !leaf.gateways.is_empty() && leaf.gateways.iter().any(|g| !root.gateways.contains(g)) {
        return true;
    }
    false
}

/// Istio's stringMatchConflict.
fn value_conflict(root: Option<&ValueMatch>, leaf: Option<&ValueMatch>) -> bool {
    let (Some(root), Some(leaf)) = (root, leaf) else { return false };
    use ValueMatch::*;
    let specific = |v: &ValueMatch| matches!(v, Exact(_) | Prefix(_) | RegularExpression(_));
    if matches!(root, RegularExpression(_)) && specific(leaf) {
        return true;
    }
    if matches!(leaf, RegularExpression(_)) && specific(root) {
        return true;
    }
    match (root, leaf) {
        (Exact(_), Prefix(_)) => true,
        (Exact(r), Exact(l)) => r != l,
        (Exact(_), _) => true,
        (Prefix(r), Prefix(l)) | (Prefix(r), Exact(l)) => !l.starts_with(r.as_str()),
        _ => true,
    }
}

/// The http rules of `vs` that apply on `port`, as a Route (`None`: none applies).
fn compile_http(vs: &VirtualService, rules: &[(HttpRule, String)], port: u16, reg: &Registry<'_>) -> Option<Arc<Route>> {
    let mut out = Vec::new();
    for (rule, origin) in rules {
        if let Some(r) = compile_rule(vs, rule, origin, port, reg) {
            out.push(r);
        }
    }
    (!out.is_empty()).then(|| {
        Arc::new(Route {
            kind: RouteKind::VirtualService,
            namespace: vs.namespace.clone(),
            name: vs.name.clone(),
            created: vs.created.clone(),
            parents: Vec::new(),
            hostnames: vs.hosts.clone(),
            rules: out,
        })
    })
}

fn compile_rule(vs: &VirtualService, rule: &HttpRule, origin: &str, port: u16, reg: &Registry<'_>) -> Option<RouteRule> {
    let matches: Vec<RouteMatch> = if rule.matches.is_empty() {
        vec![RouteMatch::default()]
    } else {
        let kept: Vec<RouteMatch> = rule
            .matches
            .iter()
            .filter(|m| m.for_mesh() && m.m.port.is_none_or(|p| p == port))
            .map(|m| {
                let mut rm = m.m.clone();
                rm.port = None;
                // A match that names gateways (`mesh` among them) is not narrowed by source:
                // Istio's sourceMatchHTTP checks one or the other.
                if !m.gateways.is_empty() {
                    rm.source = None;
                }
                rm
            })
            .collect();
        if kept.is_empty() {
            return None;
        }
        kept
    };
    let mut filters = Vec::new();
    // The host the upstream sees: `rewrite.authority` wins over a `headers` host.
    let authority = rule
        .rewrite
        .as_ref()
        .and_then(|r| r.authority.clone())
        .or_else(|| rule.headers.as_ref().and_then(|h| h.authority.clone()));
    let path = rule.rewrite.as_ref().and_then(|r| r.path.clone());
    if authority.is_some() || path.is_some() {
        filters.push(Filter::UrlRewrite(UrlRewrite { hostname: authority, path }));
    }
    if let Some(h) = &rule.headers {
        let no_authority = HeaderOps { authority: None, ..h.clone() };
        filters.extend(super::virtual_service::header_filters(&no_authority));
    }
    for m in rule.mirrors.iter().flatten() {
        filters.push(mirror_filter(m, &vs.namespace, port, reg));
    }
    let backends = match &rule.action {
        HttpAction::Route(dests) => {
            let single = dests.len() == 1;
            dests.iter().map(|d| reg.backend(d, &vs.namespace, port, if single { 1 } else { d.weight })).collect()
        }
        HttpAction::Redirect(r) => {
            filters.push(Filter::Redirect(r.clone()));
            Vec::new()
        }
        HttpAction::DirectResponse(d) => {
            filters.push(Filter::DirectResponse(d.clone()));
            Vec::new()
        }
        // Expanded before compiling; a delegate that could not be expanded was dropped.
        HttpAction::Delegate { .. } => return None,
    };
    Some(RouteRule {
        name: rule.name.clone(),
        matches,
        filters,
        backends,
        timeouts: RouteTimeouts { request: rule.timeout.filter(|t| !t.is_zero()), backend_request: None },
        retry: None,
        retry_policy: Some(rule.retries.clone().unwrap_or_else(istio_default_retries)),
        fault: rule.fault.clone(),
        origin: Some(origin.to_owned()),
    })
}

fn mirror_filter(m: &Mirror, namespace: &str, port: u16, reg: &Registry<'_>) -> Filter {
    let mut backend = reg.backend_of(&m.host, m.subset.clone(), m.port, namespace, port, 1, Vec::new());
    if backend.kind == BackendKind::ServiceEntry {
        backend.invalid = Some("mirroring to a ServiceEntry is not supported (mirror to a Service)".into());
    }
    Filter::RequestMirror(RequestMirror { backend, fraction: m.fraction })
}

fn compile_stream(vs: &VirtualService, port: u16, reg: &Registry<'_>) -> Option<Arc<StreamRoute>> {
    let mut rules = Vec::new();
    let lists: [(&[StreamRuleSpec], bool, &str); 2] = [(&vs.tls, true, "tls"), (&vs.tcp, false, "tcp")];
    // Istio puts the TLS filter chains (selected by SNI) before the TCP ones.
    for (list, tls, label) in lists {
        for (i, r) in list.iter().enumerate() {
            let matches: Vec<StreamMatch> = r
                .matches
                .iter()
                .filter(|m| m.for_mesh() && m.port.is_none_or(|p| p == port))
                .cloned()
                .collect();
            if !r.matches.is_empty() && matches.is_empty() {
                continue;
            }
            let single = r.route.len() == 1;
            let backends =
                r.route.iter().map(|d| reg.backend(d, &vs.namespace, port, if single { 1 } else { d.weight })).collect();
            rules.push(StreamRule { origin: format!("{label}[{i}]"), tls, matches, backends });
        }
    }
    (!rules.is_empty()).then(|| {
        Arc::new(StreamRoute { namespace: vs.namespace.clone(), name: vs.name.clone(), created: vs.created.clone(), rules })
    })
}
