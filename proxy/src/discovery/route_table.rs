//! The effective route table of one Service port, compiled once per snapshot from the routes
//! attached to it, and the per-request match against it.
//!
//! Two kinds of table. A Gateway API table (HTTPRoutes, GRPCRoutes) follows the Gateway API's
//! precedence. HTTPRoute, across every rule of every applicable route: an Exact path match first,
//! then (sluice's choice where the spec leaves it to the implementation) RegularExpression paths,
//! longest pattern first, then PathPrefix matches with the most characters; then a method match;
//! then the most header matches; then the most query parameter matches. GRPCRoute: the most
//! characters in the service match, then in the method match, then the most header matches.
//! Remaining ties: the oldest route, then `namespace/name` alphabetically, then rule order and
//! match order within a route. A gRPC request (`content-type: application/grpc*`) is matched
//! against GRPCRoutes first and then against HTTPRoutes (it is an HTTP/2 POST too); anything
//! else only against HTTPRoutes.
//!
//! A VirtualService table holds one VirtualService's rules as it applies to the port, in the
//! order written: the first rule (and, within it, the first match) that matches wins, gRPC
//! requests included.
//!
//! Which table a client uses: [`PortRoutes`] keeps, per client namespace, a chain of tables in
//! the order Istio's sidecars consider the resources for a host (see `istio::vs_mixing`). The
//! first table that has a rule for the client decides: its match, or 404 if none of its rules
//! matches; a table whose every rule is for other clients (`sourceLabels`, `sourceNamespace`)
//! is passed over, as Istio leaves such a resource out of that client's configuration. GAMMA's
//! producer and consumer routes are links of the same chains: a client's own namespace's
//! consumer routes first, the producer routes (in the Service's namespace) for the others.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, Method};

use super::route::{ClientInfo, GrpcMethodMatch, PathMatch, Route, RouteKind, RouteMatch, RouteRule, ValueMatch};

/// The route tables of one Service port: one chain per client namespace that needs its own,
/// and the chain of every other client.
#[derive(Debug, Default)]
pub struct PortRoutes {
    default: Chain,
    by_client: HashMap<String, Chain>,
}

/// Tables in the order a client consults them, and (for the admin view) the resources that
/// name the host but never decide for these clients.
#[derive(Debug, Default, Clone)]
pub struct Chain {
    pub tables: Vec<Arc<RouteTable>>,
    /// `Kind namespace/name` of resources behind another one that always decides first.
    pub shadowed: Vec<String>,
}

impl PortRoutes {
    /// The Gateway API tables alone: producer routes (in the Service's namespace) for every
    /// client, and each namespace's consumer routes for its own clients instead.
    pub fn build(svc_namespace: &str, attached: &[Arc<Route>]) -> PortRoutes {
        let (producer, consumer): (Vec<_>, Vec<_>) =
            attached.iter().cloned().partition(|r| r.namespace == svc_namespace);
        let mut by_ns: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        for r in consumer {
            by_ns.entry(r.namespace.clone()).or_default().push(r);
        }
        let producer = (!producer.is_empty()).then(|| Arc::new(RouteTable::build(&producer)));
        let chain = |first: Option<Arc<RouteTable>>| Chain { tables: first.into_iter().collect(), shadowed: Vec::new() };
        PortRoutes {
            default: chain(producer.clone()),
            by_client: by_ns
                .into_iter()
                .map(|(ns, rs)| (ns, Chain { tables: vec![Arc::new(RouteTable::build(&rs))], shadowed: Vec::new() }))
                .collect(),
        }
    }

    /// From chains already ordered (see `istio::vs_mixing`).
    pub fn from_chains(default: Chain, by_client: HashMap<String, Chain>) -> PortRoutes {
        PortRoutes { default, by_client }
    }

    /// The tables a client in `client_namespace` consults, in order (empty: no route applies,
    /// the Service's own endpoints do).
    pub fn for_client(&self, client_namespace: &str) -> &[Arc<RouteTable>] {
        &self.by_client.get(client_namespace).unwrap_or(&self.default).tables
    }

    /// Every audience, for the admin view: `None` for the clients of every namespace not
    /// listed, then each listed namespace, sorted.
    pub fn audiences(&self) -> Vec<(Option<&str>, &Chain)> {
        let mut v: Vec<(Option<&str>, &Chain)> = vec![(None, &self.default)];
        let mut named: Vec<_> = self.by_client.iter().map(|(k, c)| (Some(k.as_str()), c)).collect();
        named.sort_by_key(|(k, _)| *k);
        v.extend(named);
        v
    }

    pub fn is_empty(&self) -> bool {
        self.default.tables.is_empty() && self.by_client.values().all(|c| c.tables.is_empty())
    }
}

/// One ordered list of (route, rule, match) entries.
#[derive(Debug)]
pub struct RouteTable {
    http: Vec<Entry>,
    grpc: Vec<Entry>,
    /// A VirtualService's table: rules in the order written.
    ordered: bool,
    /// Every entry carries a client condition: the table decides only for the clients one of
    /// them names.
    client_scoped: bool,
}

#[derive(Debug)]
struct Entry {
    route: Arc<Route>,
    rule: usize,
    matcher: usize,
}

impl Entry {
    fn rule(&self) -> &RouteRule {
        &self.route.rules[self.rule]
    }

    fn matcher(&self) -> &RouteMatch {
        &self.rule().matches[self.matcher]
    }
}

/// What one request carries that routes can match on.
pub struct RequestParts<'a> {
    pub method: &'a Method,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The authority as the client sent it (`:authority` or `Host`).
    pub authority: Option<&'a str>,
    pub client: ClientInfo<'a>,
}

/// The rule a request matched.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    pub route: &'a Arc<Route>,
    pub rule: &'a RouteRule,
    pub rule_index: usize,
    pub matched: &'a RouteMatch,
}

/// What a table says about a request.
#[derive(Debug)]
pub enum Lookup<'a> {
    Matched(Selected<'a>),
    /// The table applies to this client, but no rule matches: 404.
    NoMatch,
    /// Every rule of the table is for other clients: the next table of the chain decides.
    NotForClient,
}

impl RouteTable {
    pub fn build(routes: &[Arc<Route>]) -> RouteTable {
        let mut http = Vec::new();
        let mut grpc = Vec::new();
        let ordered = routes.iter().any(|r| !r.kind.is_gateway_api());
        for route in routes {
            for (ri, rule) in route.rules.iter().enumerate() {
                for mi in 0..rule.matches.len() {
                    let e = Entry { route: route.clone(), rule: ri, matcher: mi };
                    match route.kind {
                        RouteKind::Http | RouteKind::VirtualService => http.push(e),
                        RouteKind::Grpc => grpc.push(e),
                    }
                }
            }
        }
        if !ordered {
            http.sort_by(|a, b| http_rank(a.matcher()).cmp(&http_rank(b.matcher())).then_with(|| tie(a, b)));
            grpc.sort_by(|a, b| grpc_rank(a.matcher()).cmp(&grpc_rank(b.matcher())).then_with(|| tie(a, b)));
        }
        let client_scoped = !http.is_empty() && http.iter().chain(&grpc).all(|e| e.matcher().source.is_some());
        RouteTable { http, grpc, ordered, client_scoped }
    }

    /// The highest-precedence rule matching the request, if any.
    pub fn select<'a>(&'a self, req: &RequestParts<'_>, grpc: bool) -> Option<Selected<'a>> {
        let grpc_hit = if grpc { self.grpc.iter().find(|e| matches_grpc(e.matcher(), req)) } else { None };
        let hit = grpc_hit.or_else(|| self.http.iter().find(|e| matches_http(e.matcher(), req)))?;
        Some(Selected { route: &hit.route, rule: hit.rule(), rule_index: hit.rule, matched: hit.matcher() })
    }

    /// The rule matching the request, or whether the table decides for this client at all.
    pub fn lookup<'a>(&'a self, req: &RequestParts<'_>, grpc: bool) -> Lookup<'a> {
        if let Some(s) = self.select(req, grpc) {
            return Lookup::Matched(s);
        }
        if self.client_scoped
            && !self.http.iter().chain(&self.grpc).any(|e| e.matcher().source.as_ref().is_some_and(|s| s.matches(&req.client)))
        {
            return Lookup::NotForClient;
        }
        Lookup::NoMatch
    }

    /// Whether the table holds a VirtualService's rules (in written order).
    pub fn is_ordered(&self) -> bool {
        self.ordered
    }

    /// Whether some entry needs the client pod's labels.
    pub fn uses_client_labels(&self) -> bool {
        self.http.iter().chain(&self.grpc).any(|e| e.matcher().source.as_ref().is_some_and(|s| !s.labels.is_empty()))
    }

    /// Every entry in precedence order, for the admin view: (route, rule index, match).
    pub fn entries(&self) -> impl Iterator<Item = (&Arc<Route>, usize, &RouteMatch)> {
        self.grpc.iter().chain(self.http.iter()).map(|e| (&e.route, e.rule, e.matcher()))
    }

    pub fn len(&self) -> usize {
        self.http.len() + self.grpc.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sort key of an HTTPRoute match: smaller sorts first (wins).
fn http_rank(m: &RouteMatch) -> (u8, std::cmp::Reverse<usize>, bool, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>) {
    let (class, len) = match &m.path {
        Some(PathMatch::Exact(v)) => (0, v.len()),
        Some(PathMatch::RegularExpression(r)) => (1, r.as_str().len()),
        Some(PathMatch::PathPrefix(v)) | Some(PathMatch::Prefix(v)) => (2, v.len()),
        None => (3, 0),
    };
    (
        class,
        std::cmp::Reverse(len),
        m.method.is_none(),
        std::cmp::Reverse(m.headers.len()),
        std::cmp::Reverse(m.query_params.len()),
    )
}

fn grpc_rank(m: &RouteMatch) -> (std::cmp::Reverse<usize>, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>) {
    let chars = |v: &Option<ValueMatch>| match v {
        Some(ValueMatch::Exact(s)) | Some(ValueMatch::Prefix(s)) => s.len(),
        Some(ValueMatch::RegularExpression(r)) => r.as_str().len(),
        Some(ValueMatch::Present) | None => 0,
    };
    let (svc, method) = m.grpc.as_ref().map_or((0, 0), |g| (chars(&g.service), chars(&g.method)));
    (std::cmp::Reverse(svc), std::cmp::Reverse(method), std::cmp::Reverse(m.headers.len()))
}

/// The oldest route first (one without a timestamp counts as the newest), then
/// `namespace/name`, then rule and match order.
fn tie(a: &Entry, b: &Entry) -> Ordering {
    let age = match (&a.route.created, &b.route.created) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    age.then_with(|| (&a.route.namespace, &a.route.name).cmp(&(&b.route.namespace, &b.route.name)))
        .then_with(|| a.route.kind.cmp(&b.route.kind))
        .then_with(|| (a.rule, a.matcher).cmp(&(b.rule, b.matcher)))
}

fn matches_http(m: &RouteMatch, req: &RequestParts<'_>) -> bool {
    if let Some(p) = &m.path {
        let hit = if m.ignore_uri_case { path_matches_ignoring_case(p, req.path) } else { path_matches(p, req.path) };
        if !hit {
            return false;
        }
    }
    if let Some(method) = &m.method {
        if !method.matches(req.method.as_str()) {
            return false;
        }
    }
    if let Some(a) = &m.authority {
        if !req.authority.is_some_and(|v| a.matches(v)) {
            return false;
        }
    }
    // sluice routes plaintext HTTP only (an application's TLS is passed through unparsed).
    if m.scheme.as_ref().is_some_and(|s| !s.matches("http")) {
        return false;
    }
    if m.source.as_ref().is_some_and(|s| !s.matches(&req.client)) {
        return false;
    }
    headers_match(&m.headers, req.headers)
        && without_headers_match(&m.without_headers, req.headers)
        && query_matches(&m.query_params, req.query)
}

fn matches_grpc(m: &RouteMatch, req: &RequestParts<'_>) -> bool {
    if let Some(g) = &m.grpc {
        if !grpc_method_matches(g, req.path) {
            return false;
        }
    }
    headers_match(&m.headers, req.headers)
}

/// Whether `path` matches; for PathPrefix, element-wise (`/foo` matches `/foo/bar`, not
/// `/foobar`); for a VirtualService's Prefix, as a string.
pub fn path_matches(p: &PathMatch, path: &str) -> bool {
    match p {
        PathMatch::Exact(v) => path == v,
        PathMatch::PathPrefix(v) => prefix_matches(v, path),
        PathMatch::RegularExpression(r) => r.is_match(path),
        PathMatch::Prefix(v) => path.starts_with(v.as_str()),
    }
}

/// `ignoreUriCase`: Exact and Prefix compare ASCII case-insensitively (a regular expression is
/// not affected, as in Envoy).
fn path_matches_ignoring_case(p: &PathMatch, path: &str) -> bool {
    match p {
        PathMatch::Exact(v) => path.eq_ignore_ascii_case(v),
        PathMatch::Prefix(v) => path.len() >= v.len() && path.as_bytes()[..v.len()].eq_ignore_ascii_case(v.as_bytes()),
        other => path_matches(other, path),
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = trim_prefix(prefix);
    if prefix == "/" {
        return path.starts_with('/');
    }
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A PathPrefix value without its trailing `/` (except `/` itself): `/foo/` matches like `/foo`.
pub fn trim_prefix(prefix: &str) -> &str {
    if prefix.len() > 1 {
        prefix.trim_end_matches('/')
    } else {
        prefix
    }
}

fn headers_match(matches: &[super::route::HeaderMatch], headers: &HeaderMap) -> bool {
    matches.iter().all(|hm| header_matches(hm, headers))
}

fn header_matches(hm: &super::route::HeaderMatch, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(hm.name.as_str()).iter().filter_map(|v| v.to_str().ok()).peekable();
    if values.peek().is_none() {
        return false;
    }
    let values: Vec<&str> = values.collect();
    values.iter().any(|v| hm.value.matches(v))
        // A repeated header also matches as one comma-joined value (RFC 9110 §5.3).
        || (values.len() > 1 && hm.value.matches(&values.join(",")))
}

/// VirtualService `withoutHeaders`: none may match. A missing header is the empty value (Envoy's
/// `treat_missing_header_as_empty`), except for a presence match, which a missing header
/// satisfies.
fn without_headers_match(matches: &[super::route::HeaderMatch], headers: &HeaderMap) -> bool {
    matches.iter().all(|hm| {
        if headers.contains_key(hm.name.as_str()) {
            !header_matches(hm, headers)
        } else {
            matches!(hm.value, ValueMatch::Present) || !hm.value.matches("")
        }
    })
}

fn query_matches(matches: &[super::route::HeaderMatch], query: Option<&str>) -> bool {
    if matches.is_empty() {
        return true;
    }
    let Some(query) = query else { return false };
    matches.iter().all(|qm| {
        // The first occurrence of the parameter counts, percent-decoded.
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == qm.name.as_str())
            .is_some_and(|(_, v)| qm.value.matches(&v))
    })
}

/// gRPC paths are `/<package.Service>/<Method>`.
fn grpc_method_matches(g: &GrpcMethodMatch, path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    g.service.as_ref().is_none_or(|s| s.matches(service)) && g.method.as_ref().is_none_or(|m| m.matches(method))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::route::{BackendRef, HeaderMatch, Regex, RouteTimeouts};

    fn route(name: &str, ns: &str, created: Option<&str>, kind: RouteKind, rules: Vec<Vec<RouteMatch>>) -> Arc<Route> {
        Arc::new(Route {
            kind,
            namespace: ns.into(),
            name: name.into(),
            created: created.map(str::to_owned),
            parents: vec![],
            hostnames: vec![],
            rules: rules
                .into_iter()
                .map(|matches| RouteRule {
                    name: None,
                    matches,
                    filters: vec![],
                    backends: vec![BackendRef {
                        namespace: ns.into(),
                        name: "b".into(),
                        port: Some(80),
                        weight: 1,
                        filters: vec![],
                        invalid: None,
                        subset: None,
                        kind: Default::default(),
                    }],
                    timeouts: RouteTimeouts::default(),
                    retry: None,
                    retry_policy: None,
                    fault: None,
                    origin: None,
                })
                .collect(),
        })
    }

    fn path(p: PathMatch) -> RouteMatch {
        RouteMatch { path: Some(p), ..RouteMatch::default() }
    }

    fn prefix(v: &str) -> RouteMatch {
        path(PathMatch::PathPrefix(v.into()))
    }

    fn header(name: &str, v: ValueMatch) -> HeaderMatch {
        HeaderMatch { name: name.into(), value: v }
    }

    fn req<'a>(method: &'a Method, path: &'a str, query: Option<&'a str>, headers: &'a HeaderMap) -> RequestParts<'a> {
        static NO_LABELS: std::sync::LazyLock<std::collections::BTreeMap<String, String>> =
            std::sync::LazyLock::new(Default::default);
        RequestParts { method, path, query, headers, authority: None, client: ClientInfo { namespace: "ns", labels: Some(&NO_LABELS) } }
    }

    fn pick(t: &RouteTable, method: &Method, p: &str, q: Option<&str>, h: &HeaderMap, grpc: bool) -> Option<(String, usize)> {
        t.select(&req(method, p, q, h), grpc).map(|s| (s.route.name.clone(), s.rule_index))
    }

    #[test]
    fn prefix_matching_is_element_wise() {
        assert!(prefix_matches("/foo", "/foo"));
        assert!(prefix_matches("/foo", "/foo/bar"));
        assert!(prefix_matches("/foo/", "/foo/bar"));
        assert!(prefix_matches("/foo/", "/foo"));
        assert!(!prefix_matches("/foo", "/foobar"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn precedence_follows_the_gateway_api() {
        let get = Method::GET;
        let h = HeaderMap::new();
        let t = RouteTable::build(&[
            route("a-catch-all", "ns", Some("2024-01-01T00:00:00Z"), RouteKind::Http, vec![vec![prefix("/")]]),
            route("b-prefix", "ns", Some("2025-01-01T00:00:00Z"), RouteKind::Http, vec![vec![prefix("/api")], vec![prefix("/api/v2")]]),
            route("c-exact", "ns", None, RouteKind::Http, vec![vec![path(PathMatch::Exact("/api/v2/x".into()))]]),
            route(
                "d-method",
                "ns",
                None,
                RouteKind::Http,
                vec![vec![RouteMatch { method: Some(ValueMatch::Exact("POST".into())), ..prefix("/api") }]],
            ),
        ]);
        // Exact beats every prefix, however long.
        assert_eq!(pick(&t, &get, "/api/v2/x", None, &h, false), Some(("c-exact".into(), 0)));
        // The longest prefix wins across routes and rules.
        assert_eq!(pick(&t, &get, "/api/v2/y", None, &h, false), Some(("b-prefix".into(), 1)));
        // Same prefix: a method match wins over none.
        assert_eq!(pick(&t, &Method::POST, "/api/z", None, &h, false), Some(("d-method".into(), 0)));
        assert_eq!(pick(&t, &get, "/api/z", None, &h, false), Some(("b-prefix".into(), 0)));
        assert_eq!(pick(&t, &get, "/other", None, &h, false), Some(("a-catch-all".into(), 0)));
    }

    #[test]
    fn more_header_and_query_matches_win_then_the_oldest_route() {
        let get = Method::GET;
        let mut h = HeaderMap::new();
        h.insert("x-user", "test".parse().unwrap());
        h.insert("cookie", "session=1; user=test-user; theme=dark".parse().unwrap());
        let hdr = |n: &str, v: &str| header(n, ValueMatch::Exact(v.into()));
        let t = RouteTable::build(&[
            route("new", "ns", Some("2025-06-01T00:00:00Z"), RouteKind::Http, vec![vec![prefix("/")]]),
            route("old", "ns", Some("2020-06-01T00:00:00Z"), RouteKind::Http, vec![vec![prefix("/")]]),
            route(
                "one-header",
                "ns",
                None,
                RouteKind::Http,
                vec![vec![RouteMatch { headers: vec![hdr("x-user", "test")], ..prefix("/") }]],
            ),
            route(
                "cookie-regex",
                "ns",
                None,
                RouteKind::Http,
                vec![vec![RouteMatch {
                    headers: vec![
                        header("cookie", ValueMatch::RegularExpression(Regex::anchored("^(.*?;)?( ?user=test-user)(;.*)?$").unwrap())),
                        hdr("x-user", "test"),
                    ],
                    ..prefix("/")
                }]],
            ),
            route(
                "query",
                "ns",
                None,
                RouteKind::Http,
                vec![vec![RouteMatch {
                    query_params: vec![HeaderMatch { name: "v".into(), value: ValueMatch::Exact("2 beta".into()) }],
                    ..prefix("/")
                }]],
            ),
        ]);
        assert_eq!(pick(&t, &get, "/", None, &h, false).unwrap().0, "cookie-regex");
        let mut only_user = HeaderMap::new();
        only_user.insert("x-user", "test".parse().unwrap());
        assert_eq!(pick(&t, &get, "/", None, &only_user, false).unwrap().0, "one-header");
        let none = HeaderMap::new();
        // Query params rank below headers; the value is percent-decoded; the first one counts.
        assert_eq!(pick(&t, &get, "/", Some("v=2%20beta&v=3"), &none, false).unwrap().0, "query");
        assert_eq!(pick(&t, &get, "/", Some("v=3&v=2+beta"), &none, false).unwrap().0, "old");
        // Equal matches: the oldest route.
        assert_eq!(pick(&t, &get, "/", None, &none, false).unwrap().0, "old");
    }

    #[test]
    fn grpc_routes_match_service_and_method_then_http_routes() {
        let post = Method::POST;
        let h = HeaderMap::new();
        let gm = |service: Option<&str>, method: Option<&str>| RouteMatch {
            grpc: Some(GrpcMethodMatch {
                service: service.map(|s| ValueMatch::Exact(s.into())),
                method: method.map(|m| ValueMatch::Exact(m.into())),
            }),
            ..RouteMatch::default()
        };
        let t = RouteTable::build(&[
            route("svc", "ns", None, RouteKind::Grpc, vec![vec![gm(Some("pkg.Echo"), None)]]),
            route("method", "ns", None, RouteKind::Grpc, vec![vec![gm(Some("pkg.Echo"), Some("Count"))]]),
            route("http", "ns", None, RouteKind::Http, vec![vec![prefix("/")]]),
        ]);
        assert_eq!(pick(&t, &post, "/pkg.Echo/Count", None, &h, true).unwrap().0, "method");
        assert_eq!(pick(&t, &post, "/pkg.Echo/Echo", None, &h, true).unwrap().0, "svc");
        assert_eq!(pick(&t, &post, "/pkg.Other/Echo", None, &h, true).unwrap().0, "http");
        // Not gRPC: GRPCRoutes do not apply.
        assert_eq!(pick(&t, &post, "/pkg.Echo/Count", None, &h, false).unwrap().0, "http");
    }

    #[test]
    fn consumer_routes_replace_producer_routes_for_their_namespace() {
        let producer = route("p", "svc-ns", None, RouteKind::Http, vec![vec![prefix("/")]]);
        let consumer = route("c", "client-ns", None, RouteKind::Http, vec![vec![prefix("/")]]);
        let pr = PortRoutes::build("svc-ns", &[producer, consumer]);
        let h = HeaderMap::new();
        let get = Method::GET;
        let name = |ns: &str| pick(&pr.for_client(ns)[0], &get, "/", None, &h, false).unwrap().0;
        assert_eq!(name("client-ns"), "c");
        assert_eq!(name("svc-ns"), "p");
        assert_eq!(name("elsewhere"), "p");
        assert!(PortRoutes::build("x", &[]).for_client("x").is_empty());
    }

    #[test]
    fn no_match_is_none() {
        let t = RouteTable::build(&[route("r", "ns", None, RouteKind::Http, vec![vec![path(PathMatch::Exact("/only".into()))]])]);
        assert!(pick(&t, &Method::GET, "/else", None, &HeaderMap::new(), false).is_none());
    }
}
