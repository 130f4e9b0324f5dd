//! Parsers for the Gateway API's mesh routes (GAMMA): gateway.networking.k8s.io HTTPRoute (v1,
//! v1beta1) and GRPCRoute (v1), distilled into a [`Route`].
//!
//! The API server applies the CRDs' defaults and validation (OpenAPI and CEL rules) before an
//! object is stored; a manifest file has had neither. So both are applied here, with errors that
//! name the field: a route that parses here is one the API server accepts (within what sluice
//! implements), and both sources yield the same model.
//!
//! - Defaults: parentRefs[].group `gateway.networking.k8s.io` and kind `Gateway` (so a Service
//!   parent must say `group: ""`), namespaces default to the route's, a rule without matches
//!   matches everything, path type PathPrefix and value `/`, header and query match type Exact,
//!   backendRefs[].group "" and kind Service, weight 1, redirect statusCode 302, mirror share 100%,
//!   and an HTTPRoute without rules gets one match-everything rule.
//! - Parents other than core Services (Gateways) are dropped: sluice is a mesh, not an ingress.
//! - A backend sluice cannot resolve (another kind, another namespace) is kept, marked invalid:
//!   the spec wants 500s for its share of the traffic, not a rejected route.
//! - Filters are strict: an unknown field or a filter type sluice does not implement is an error,
//!   because skipping part of a filter silently changes what requests look like. Elsewhere
//!   unknown fields are ignored, as the API server would have pruned them.

use std::sync::Arc;
use std::time::Duration;

use super::fields::{NameRule, Node};
use super::manifest::{DocError, Meta};
use super::model::Object;
use super::route::{
    parse_duration, BackendRef, Filter, Fraction, GrpcMethodMatch, HeaderMatch, HeaderModifier, ParentRef,
    PathMatch, PathModifier, Regex, RequestMirror, RequestRedirect, Route, RouteKind, RouteMatch, RouteRetry,
    RouteRule, RouteTimeouts, UrlRewrite, ValueMatch,
};

// The CRDs' maxItems.
const MAX_PARENT_REFS: usize = 32;
const MAX_HOSTNAMES: usize = 16;
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
/// Across all rules of a route (a CEL rule of both CRDs).
const MAX_ROUTE_MATCHES: usize = 128;
/// headers, queryParams, a header modifier's set, add and remove.
const MAX_HEADERS: usize = 16;
const MAX_FILTERS: usize = 16;
const MAX_BACKENDS: usize = 16;
const MAX_WEIGHT: i64 = 1_000_000;
// The CRDs' maxLength of values.
const MAX_PATH_LEN: usize = 1024;
const MAX_HEADER_NAME_LEN: usize = 256;
const MAX_HEADER_VALUE_LEN: usize = 4096;
const MAX_QUERY_VALUE_LEN: usize = 1024;
const MAX_GRPC_NAME_LEN: usize = 1024;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const HTTP_METHODS: &[&str] =
    &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
/// Every filter config field: a filter may set only the one its type names.
const FILTER_CONFIGS: &[&str] = &[
    "requestHeaderModifier",
    "responseHeaderModifier",
    "requestMirror",
    "requestRedirect",
    "urlRewrite",
    "extensionRef",
    "cors",
    "externalAuth",
];
const CROSS_NAMESPACE: &str =
    "a cross-namespace backendRef needs a ReferenceGrant, which sluice does not support yet";

pub(crate) fn http_route(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    route(RouteKind::Http, meta, doc)
}

pub(crate) fn grpc_route(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    route(RouteKind::Grpc, meta, doc)
}

/// What the parsers of a route's parts need to know about the route.
#[derive(Clone, Copy)]
struct Cx<'a> {
    kind: RouteKind,
    /// The route's namespace: the default for parent and backend namespaces.
    namespace: &'a str,
    /// Whether the rule being parsed has exactly one match, with a PathPrefix path: what a
    /// ReplacePrefixMatch path modifier needs (a CEL rule of the HTTPRoute CRD).
    single_prefix_match: bool,
}

fn route(kind: RouteKind, meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let cx = Cx { kind, namespace: &meta.namespace, single_prefix_match: false };
    let mut route = Route {
        kind,
        namespace: meta.namespace.clone(),
        name: meta.name,
        created: meta.creation_timestamp,
        parents: Vec::new(),
        hostnames: Vec::new(),
        rules: Vec::new(),
    };
    match doc.get("spec") {
        // HTTPRoute's spec is required by its CRD; GRPCRoute's is optional.
        None if kind == RouteKind::Http => return Err(DocError::Missing { field: "spec".into() }),
        None => {}
        Some(spec) => {
            spec.expect_mapping()?;
            reject_session_persistence(&spec)?;
            route.parents = parent_refs(&spec, cx)?;
            route.hostnames = hostnames(&spec)?;
            route.rules = rules(&spec, cx)?;
        }
    }
    Ok(Object::Route(Arc::new(route)))
}

/// The elements of the list `key`, at most `max` (the CRD's maxItems).
pub(super) fn bounded_list<'a>(node: &Node<'a>, key: &str, max: usize) -> Result<Vec<Node<'a>>, DocError> {
    let items = node.list(key)?;
    if items.len() > max {
        return Err(DocError::Invalid {
            field: node.child_path(key),
            reason: format!("at most {max} entries are allowed, found {}", items.len()),
        });
    }
    Ok(items)
}

/// A required, non-empty string field.
pub(super) fn required_str<'a>(node: &Node<'a>, key: &str) -> Result<&'a str, DocError> {
    let n = node.require(key)?;
    let s = n.as_str()?;
    if s.is_empty() {
        return Err(n.invalid("must not be empty"));
    }
    Ok(s)
}

/// A namespace field, defaulting to the route's.
fn namespace_or(node: &Node<'_>, default: &str) -> Result<String, DocError> {
    match node.opt_str("namespace")? {
        None => Ok(default.to_owned()),
        Some(ns) => match NameRule::Dns1123Label.check(ns) {
            None => Ok(ns.to_owned()),
            Some(reason) => Err(node.require("namespace")?.invalid(reason)),
        },
    }
}

/// An integer field in `min..=max`.
pub(super) fn int_in(node: &Node<'_>, min: i64, max: i64) -> Result<i64, DocError> {
    let n = node.as_i64()?;
    if n < min || n > max {
        return Err(node.invalid(format!("{n} is out of range {min}-{max}")));
    }
    Ok(n)
}

/// `sessionPersistence` (an experimental field of rules) changes how requests are balanced;
/// ignoring it would route differently from what the route says.
fn reject_session_persistence(node: &Node<'_>) -> Result<(), DocError> {
    match node.get("sessionPersistence") {
        None => Ok(()),
        Some(n) => Err(n.invalid(
            "not supported: sluice balances every request on its own and has no session persistence",
        )),
    }
}

// --- spec.parentRefs, spec.hostnames ---

fn parent_refs(spec: &Node<'_>, cx: Cx<'_>) -> Result<Vec<ParentRef>, DocError> {
    let mut parents: Vec<ParentRef> = Vec::new();
    for node in bounded_list(spec, "parentRefs", MAX_PARENT_REFS)? {
        node.expect_mapping()?;
        let name = required_str(&node, "name")?;
        // The CRD's defaults make a bare parentRef a Gateway: a Service parent says group "".
        let group = match node.get("group") {
            None => GATEWAY_GROUP,
            Some(g) => g.as_str()?,
        };
        let kind = match node.get("kind") {
            None => "Gateway",
            Some(k) => k.as_str()?,
        };
        if !(group.is_empty() && kind == "Service") {
            continue; // a Gateway (or other) parent: not sluice's to serve
        }
        if let Some(section) = node.get("sectionName") {
            return Err(section.invalid(
                "not supported for a Service parent (GAMMA attaches a route to a whole Service, or to one of its ports with `port`)",
            ));
        }
        let namespace = namespace_or(&node, cx.namespace)?;
        let port = node.get("port").map(|p| p.as_port()).transpose()?;
        // The CRD's distinctness rules for several references to one parent.
        for other in parents.iter().filter(|p| p.namespace == namespace && p.name == name) {
            if other.port.is_none() || port.is_none() {
                return Err(node
                    .invalid("port must be set on every parentRef when two or more name the same Service"));
            }
            if other.port == port {
                return Err(node.invalid("duplicate parentRef: the same Service and port are named twice"));
            }
        }
        parents.push(ParentRef { namespace, name: name.to_owned(), port });
    }
    Ok(parents)
}

fn hostnames(spec: &Node<'_>) -> Result<Vec<String>, DocError> {
    let mut out = Vec::new();
    for node in bounded_list(spec, "hostnames", MAX_HOSTNAMES)? {
        let s = node.as_str()?;
        let bare = s.strip_prefix("*.").unwrap_or(s);
        if s.is_empty() || NameRule::Dns1123Subdomain.check(bare).is_some() {
            return Err(node.invalid(format!(
                "{s:?} is not a hostname (lower-case DNS labels separated by '.', optionally after a leading \"*.\")"
            )));
        }
        out.push(s.to_owned());
    }
    Ok(out)
}

// --- spec.rules ---

fn rules(spec: &Node<'_>, cx: Cx<'_>) -> Result<Vec<RouteRule>, DocError> {
    let nodes = bounded_list(spec, "rules", MAX_RULES)?;
    if nodes.is_empty() && cx.kind == RouteKind::Http {
        // The HTTPRoute CRD's default: one rule that matches every request (and, having no
        // backends, answers 500).
        return Ok(vec![RouteRule {
            name: None,
            matches: vec![match_all(RouteKind::Http)],
            filters: Vec::new(),
            backends: Vec::new(),
            timeouts: RouteTimeouts::default(),
            retry: None,
            retry_policy: None,
            fault: None,
            origin: None,
        }]);
    }
    let mut rules: Vec<RouteRule> = Vec::with_capacity(nodes.len());
    let mut total_matches = 0;
    for node in &nodes {
        let rule = rule(node, cx)?;
        if let Some(name) = &rule.name {
            if rules.iter().any(|r| r.name.as_ref() == Some(name)) {
                let field = node.require("name")?;
                return Err(
                    field.invalid(format!("duplicate rule name {name:?} (names are unique within a route)"))
                );
            }
        }
        // As the CRD counts: matches as written, after HTTPRoute's default of one.
        total_matches += node.list("matches")?.len().max(usize::from(cx.kind == RouteKind::Http));
        rules.push(rule);
    }
    if total_matches > MAX_ROUTE_MATCHES {
        return Err(DocError::Invalid {
            field: spec.child_path("rules"),
            reason: format!(
                "at most {MAX_ROUTE_MATCHES} matches are allowed across all rules of a route, found {total_matches}"
            ),
        });
    }
    Ok(rules)
}

fn rule(node: &Node<'_>, cx: Cx<'_>) -> Result<RouteRule, DocError> {
    node.expect_mapping()?;
    reject_session_persistence(node)?;
    let name = match node.get("name") {
        None => None,
        Some(n) => {
            let name = n.as_str()?;
            if let Some(reason) = NameRule::Dns1123Subdomain.check(name) {
                return Err(n.invalid(reason));
            }
            Some(name.to_owned())
        }
    };
    let matches = match cx.kind {
        RouteKind::Grpc => grpc_matches(node)?,
        // Only the Gateway API's kinds come through this parser.
        RouteKind::Http | RouteKind::VirtualService => http_matches(node)?,
    };
    let single_prefix_match =
        matches!(matches.as_slice(), [RouteMatch { path: Some(PathMatch::PathPrefix(_)), .. }]);
    let cx = Cx { single_prefix_match, ..cx };
    let filters = filters(node, cx)?;
    let backends = backend_refs(node, cx)?;
    let (timeouts, retry) = match cx.kind {
        RouteKind::Http | RouteKind::VirtualService => (timeouts(node)?, retry(node)?),
        RouteKind::Grpc => {
            grpc_has_no(node, "timeouts")?;
            grpc_has_no(node, "retry")?;
            (RouteTimeouts::default(), None)
        }
    };
    if !backends.is_empty() {
        // A redirect answers the request itself: backends would never be used (a CEL rule).
        if let Some(i) = filters.iter().position(|f| matches!(f, Filter::RequestRedirect(_))) {
            return Err(DocError::Invalid {
                field: format!("{}[{i}]", node.child_path("filters")),
                reason: "a RequestRedirect filter must not be used together with backendRefs".into(),
            });
        }
    }
    Ok(RouteRule { name, matches, filters, backends, timeouts, retry, retry_policy: None, fault: None, origin: None })
}

fn grpc_has_no(rule: &Node<'_>, key: &str) -> Result<(), DocError> {
    match rule.get(key) {
        None => Ok(()),
        Some(n) => Err(n.invalid(format!(
            "GRPCRoute has no {key} in the Gateway API (v1); only HTTPRoute rules have {key}"
        ))),
    }
}

/// What a rule without matches gets: every request matches.
fn match_all(kind: RouteKind) -> RouteMatch {
    match kind {
        RouteKind::Http | RouteKind::VirtualService => {
            RouteMatch { path: Some(PathMatch::PathPrefix("/".into())), ..RouteMatch::default() }
        }
        RouteKind::Grpc => RouteMatch::default(),
    }
}

// --- HTTPRoute matches ---

fn http_matches(rule: &Node<'_>) -> Result<Vec<RouteMatch>, DocError> {
    let nodes = bounded_list(rule, "matches", MAX_MATCHES)?;
    if nodes.is_empty() {
        return Ok(vec![match_all(RouteKind::Http)]);
    }
    nodes.iter().map(http_match).collect()
}

fn http_match(node: &Node<'_>) -> Result<RouteMatch, DocError> {
    node.expect_mapping()?;
    let path = match node.get("path") {
        None => PathMatch::PathPrefix("/".into()),
        Some(p) => path_match(&p)?,
    };
    let method = match node.get("method") {
        None => None,
        Some(m) => match m.as_str()? {
            s if HTTP_METHODS.contains(&s) => Some(ValueMatch::Exact(s.to_owned())),
            other => {
                return Err(
                    m.invalid(format!("{other:?} is not an HTTP method ({})", HTTP_METHODS.join(", ")))
                )
            }
        },
    };
    Ok(RouteMatch {
        path: Some(path),
        method,
        headers: value_matches(node, "headers", Names::Header, MAX_HEADER_VALUE_LEN)?,
        query_params: value_matches(node, "queryParams", Names::QueryParam, MAX_QUERY_VALUE_LEN)?,
        grpc: None,
        ..RouteMatch::default()
    })
}

fn path_match(node: &Node<'_>) -> Result<PathMatch, DocError> {
    node.expect_mapping()?;
    let value_node = node.get("value");
    let value = match &value_node {
        None => "/",
        Some(v) => v.as_str()?,
    };
    let at = value_node.as_ref().unwrap_or(node);
    if value.len() > MAX_PATH_LEN {
        return Err(
            at.invalid(format!("at most {MAX_PATH_LEN} characters are allowed, found {}", value.len()))
        );
    }
    let kind = match node.get("type") {
        None => "PathPrefix",
        Some(t) => match t.as_str()? {
            k @ ("Exact" | "PathPrefix" | "RegularExpression") => k,
            other => {
                return Err(t.invalid(format!(
                    "{other:?} is not a path match type (Exact, PathPrefix, RegularExpression)"
                )))
            }
        },
    };
    if kind == "RegularExpression" {
        return regex(at, value).map(PathMatch::RegularExpression);
    }
    if let Some(reason) = check_path(value) {
        return Err(at.invalid(format!("{value:?} {reason}")));
    }
    Ok(match kind {
        "Exact" => PathMatch::Exact(value.to_owned()),
        _ => PathMatch::PathPrefix(value.to_owned()),
    })
}

/// The HTTPRoute CRD's rules for an Exact or PathPrefix value: an absolute path without
/// ambiguous segments, in the characters a URI path may hold. `None` if valid, else why not.
fn check_path(value: &str) -> Option<String> {
    if !value.starts_with('/') {
        return Some("must be an absolute path starting with '/'".into());
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if value.contains(bad) {
            return Some(format!("must not contain {bad:?}"));
        }
    }
    for bad in ["/..", "/."] {
        if value.ends_with(bad) {
            return Some(format!("must not end with {bad:?}"));
        }
    }
    let b = value.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return Some("has a '%' that does not start a percent-encoded byte (%XX)".into());
            }
            i += 3;
            continue;
        }
        if !(c.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&c)) {
            return Some(format!(
                "has a character not allowed in a path ({:?}; use percent-encoding)",
                value[i..].chars().next().unwrap_or_default()
            ));
        }
        i += 1;
    }
    None
}

/// A compiled regular expression, or the regex crate's reason at `node`.
fn regex(node: &Node<'_>, source: &str) -> Result<Regex, DocError> {
    Regex::anchored(source).map_err(|e| node.invalid(format!("invalid regular expression: {e}")))
}

/// How names of a header or query parameter list compare.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Names {
    /// Case-insensitive: stored lower-case.
    Header,
    /// Case-sensitive: stored as written.
    QueryParam,
}

/// `headers[]` or `queryParams[]` of a match: `{type: Exact|RegularExpression, name, value}`.
fn value_matches(
    node: &Node<'_>,
    key: &str,
    names: Names,
    max_len: usize,
) -> Result<Vec<HeaderMatch>, DocError> {
    let mut out: Vec<HeaderMatch> = Vec::new();
    for n in bounded_list(node, key, MAX_HEADERS)? {
        n.expect_mapping()?;
        let name = header_name(&n.require("name")?, names)?;
        let value_node = n.require("value")?;
        let value = value_node.as_str()?;
        if value.is_empty() || value.len() > max_len {
            return Err(
                value_node.invalid(format!("must be 1 to {max_len} characters long, found {}", value.len()))
            );
        }
        let value = match n.get("type") {
            None => ValueMatch::Exact(value.to_owned()),
            Some(t) => match t.as_str()? {
                "Exact" => ValueMatch::Exact(value.to_owned()),
                "RegularExpression" => ValueMatch::RegularExpression(regex(&value_node, value)?),
                other => {
                    return Err(t.invalid(format!("{other:?} is not a match type (Exact, RegularExpression)")))
                }
            },
        };
        // The spec: when several entries name the same header (or parameter), only the first
        // one counts and the others are ignored.
        if out.iter().all(|h| h.name != name) {
            out.push(HeaderMatch { name, value });
        }
    }
    Ok(out)
}

/// An HTTP header name (RFC 7230 token, as the CRD's pattern), lower-cased for a header.
pub(super) fn header_name(node: &Node<'_>, names: Names) -> Result<String, DocError> {
    let name = node.as_str()?;
    let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN || !name.bytes().all(token) {
        return Err(node.invalid(format!(
            "{name:?} is not a valid header name (1 to {MAX_HEADER_NAME_LEN} letters, digits and !#$%&'*+-.^_`|~)"
        )));
    }
    Ok(match names {
        Names::Header => name.to_ascii_lowercase(),
        Names::QueryParam => name.to_owned(),
    })
}

// --- GRPCRoute matches ---

fn grpc_matches(rule: &Node<'_>) -> Result<Vec<RouteMatch>, DocError> {
    let nodes = bounded_list(rule, "matches", MAX_MATCHES)?;
    if nodes.is_empty() {
        return Ok(vec![match_all(RouteKind::Grpc)]);
    }
    let mut out = Vec::with_capacity(nodes.len());
    for node in &nodes {
        node.expect_mapping()?;
        out.push(RouteMatch {
            grpc: node.get("method").map(|m| grpc_method(&m)).transpose()?,
            headers: value_matches(node, "headers", Names::Header, MAX_HEADER_VALUE_LEN)?,
            ..RouteMatch::default()
        });
    }
    Ok(out)
}

fn grpc_method(node: &Node<'_>) -> Result<GrpcMethodMatch, DocError> {
    node.expect_mapping()?;
    let regex_type = match node.get("type") {
        None => false,
        Some(t) => match t.as_str()? {
            "Exact" => false,
            "RegularExpression" => true,
            other => {
                return Err(t.invalid(format!("{other:?} is not a match type (Exact, RegularExpression)")))
            }
        },
    };
    // "" is "any", as an absent field.
    let (service, method) = (node.opt_str("service")?, node.opt_str("method")?);
    if service.is_none() && method.is_none() {
        return Err(node.invalid("one or both of service and method must be set"));
    }
    let part = |key: &str, value: Option<&str>, check: fn(&str) -> bool, what: &str| -> Result<_, DocError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let n = node.require(key)?;
        if value.len() > MAX_GRPC_NAME_LEN {
            return Err(n.invalid(format!("at most {MAX_GRPC_NAME_LEN} characters are allowed")));
        }
        if regex_type {
            return regex(&n, value).map(|re| Some(ValueMatch::RegularExpression(re)));
        }
        if !check(value) {
            return Err(n.invalid(format!("{value:?} is not {what}")));
        }
        Ok(Some(ValueMatch::Exact(value.to_owned())))
    };
    let service = part(
        "service",
        // A leading '.' is protobuf's fully-qualified notation; the request path never has it.
        service.map(|s| if regex_type { s } else { s.strip_prefix('.').unwrap_or(s) }),
        is_grpc_service,
        "a fully qualified gRPC service name (letters, digits and '_' in '.'-separated parts not starting with a digit, e.g. \"grpc.health.v1.Health\")",
    )?;
    let method = part(
        "method",
        method,
        is_identifier,
        "a gRPC method name (letters, digits and '_', not starting with a digit)",
    )?;
    Ok(GrpcMethodMatch { service, method })
}

/// `[A-Za-z_][A-Za-z_0-9]*`
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Identifiers separated by '.' (the CRD: `^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$`,
/// after the optional leading '.' was stripped).
fn is_grpc_service(s: &str) -> bool {
    s.split('.').all(is_identifier)
}

// --- filters ---

fn filters(owner: &Node<'_>, cx: Cx<'_>) -> Result<Vec<Filter>, DocError> {
    let nodes = bounded_list(owner, "filters", MAX_FILTERS)?;
    let mut out: Vec<Filter> = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let filter = filter(node, cx)?;
        let kind = filter_type(&filter);
        // The CRDs' CEL rules on a filter list.
        if kind != "RequestMirror" && out.iter().any(|f| filter_type(f) == kind) {
            return Err(node.invalid(format!("{kind} filter cannot be repeated")));
        }
        let excludes = match kind {
            "RequestRedirect" => Some("URLRewrite"),
            "URLRewrite" => Some("RequestRedirect"),
            _ => None,
        };
        if excludes.is_some_and(|other| out.iter().any(|f| filter_type(f) == other)) {
            return Err(
                node.invalid("a filter list may have a RequestRedirect or a URLRewrite filter, not both")
            );
        }
        out.push(filter);
    }
    Ok(out)
}

fn filter_type(filter: &Filter) -> &'static str {
    match filter {
        Filter::RequestHeaderModifier(_) => "RequestHeaderModifier",
        Filter::ResponseHeaderModifier(_) => "ResponseHeaderModifier",
        Filter::RequestRedirect(_) => "RequestRedirect",
        Filter::UrlRewrite(_) => "URLRewrite",
        Filter::RequestMirror(_) => "RequestMirror",
        // VirtualService actions, never produced by this parser.
        Filter::Redirect(_) => "HTTPRedirect",
        Filter::DirectResponse(_) => "DirectResponse",
    }
}

fn filter(node: &Node<'_>, cx: Cx<'_>) -> Result<Filter, DocError> {
    node.expect_mapping()?;
    let type_node = node.require("type")?;
    let kind = type_node.as_str()?;
    let http = cx.kind == RouteKind::Http;
    let config_key = match kind {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "RequestMirror" => "requestMirror",
        "RequestRedirect" if http => "requestRedirect",
        "URLRewrite" if http => "urlRewrite",
        "RequestRedirect" | "URLRewrite" => {
            return Err(type_node.invalid(format!(
                "{kind} is not a GRPCRoute filter (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror)"
            )))
        }
        "ExtensionRef" | "CORS" | "ExternalAuth" => {
            return Err(type_node.invalid(format!(
                "filter type {kind} is not implemented by sluice; remove the filter (sluice never skips a filter silently)"
            )))
        }
        other => {
            let known = if http {
                "RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, RequestRedirect, URLRewrite"
            } else {
                "RequestHeaderModifier, ResponseHeaderModifier, RequestMirror"
            };
            return Err(type_node.invalid(format!("{other:?} is not a filter type sluice implements ({known})")));
        }
    };
    // The CRDs' CEL rules: a filter carries the config of its type and no other.
    node.only_fields(&["type", config_key], |field| {
        FILTER_CONFIGS
            .contains(&field)
            .then(|| format!("must not be set on a {kind} filter (its config is {config_key})"))
    })?;
    let config = node.require(config_key)?;
    config.expect_mapping()?;
    Ok(match config_key {
        "requestHeaderModifier" => Filter::RequestHeaderModifier(header_modifier(&config)?),
        "responseHeaderModifier" => Filter::ResponseHeaderModifier(header_modifier(&config)?),
        "requestMirror" => Filter::RequestMirror(request_mirror(&config, cx)?),
        "requestRedirect" => Filter::RequestRedirect(request_redirect(&config, cx)?),
        _ => Filter::UrlRewrite(url_rewrite(&config, cx)?),
    })
}

fn header_modifier(config: &Node<'_>) -> Result<HeaderModifier, DocError> {
    config.only_fields(&["set", "add", "remove"], |_| None)?;
    let mut m = HeaderModifier::default();
    // The spec allows one action per header name, across set, add and remove.
    let taken = |m: &HeaderModifier, name: &str| {
        if m.set.iter().any(|(n, _)| n == name) {
            Some("set")
        } else if m.add.iter().any(|(n, _)| n == name) {
            Some("add")
        } else if m.remove.iter().any(|n| n == name) {
            Some("remove")
        } else {
            None
        }
    };
    for key in ["set", "add"] {
        for n in bounded_list(config, key, MAX_HEADERS)? {
            n.only_fields(&["name", "value"], |_| None)?;
            let name_node = n.require("name")?;
            let name = header_name(&name_node, Names::Header)?;
            if let Some(list) = taken(&m, &name) {
                return Err(name_node.invalid(one_action(&name, list)));
            }
            let value = header_value(&n.require("value")?)?;
            let list = if key == "set" { &mut m.set } else { &mut m.add };
            list.push((name, value));
        }
    }
    for n in bounded_list(config, "remove", MAX_HEADERS)? {
        let name = header_name(&n, Names::Header)?;
        if let Some(list) = taken(&m, &name) {
            return Err(n.invalid(one_action(&name, list)));
        }
        m.remove.push(name);
    }
    Ok(m)
}

fn one_action(name: &str, list: &str) -> String {
    format!("{name:?} is already in {list}: a header may appear once in a modifier, in one of set, add and remove (names are case-insensitive)")
}

/// A header value to send: 1 to 4096 characters, and no control characters but tab, which would
/// split or corrupt the header on the wire.
fn header_value(node: &Node<'_>) -> Result<String, DocError> {
    let value = node.as_str()?;
    if value.is_empty() || value.len() > MAX_HEADER_VALUE_LEN {
        return Err(node
            .invalid(format!("must be 1 to {MAX_HEADER_VALUE_LEN} characters long, found {}", value.len())));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(node.invalid("must not contain control characters (other than tab)"));
    }
    Ok(value.to_owned())
}

fn request_redirect(config: &Node<'_>, cx: Cx<'_>) -> Result<RequestRedirect, DocError> {
    config.only_fields(&["scheme", "hostname", "path", "port", "statusCode"], |_| None)?;
    let scheme = match config.get("scheme") {
        None => None,
        Some(n) => match n.as_str()? {
            s @ ("http" | "https") => Some(s.to_owned()),
            other => return Err(n.invalid(format!("{other:?} is not a redirect scheme (http, https)"))),
        },
    };
    let status_code = match config.get("statusCode") {
        None => 302,
        Some(n) => match n.as_i64()? {
            code @ (301 | 302) => code as u16,
            other => return Err(n.invalid(format!("{other} is not a redirect status code (301, 302)"))),
        },
    };
    Ok(RequestRedirect {
        scheme,
        hostname: precise_hostname(config)?,
        path: config.get("path").map(|p| path_modifier(&p, cx)).transpose()?,
        port: config.get("port").map(|p| p.as_port()).transpose()?,
        status_code,
    })
}

fn url_rewrite(config: &Node<'_>, cx: Cx<'_>) -> Result<UrlRewrite, DocError> {
    config.only_fields(&["hostname", "path"], |_| None)?;
    Ok(UrlRewrite {
        hostname: precise_hostname(config)?,
        path: config.get("path").map(|p| path_modifier(&p, cx)).transpose()?,
    })
}

/// `hostname` of a redirect or rewrite: a DNS name without a wildcard.
fn precise_hostname(config: &Node<'_>) -> Result<Option<String>, DocError> {
    let Some(n) = config.get("hostname") else {
        return Ok(None);
    };
    let s = n.as_str()?;
    if NameRule::Dns1123Subdomain.check(s).is_some() {
        return Err(n.invalid(format!("{s:?} is not a hostname (lower-case DNS labels separated by '.')")));
    }
    Ok(Some(s.to_owned()))
}

fn path_modifier(node: &Node<'_>, cx: Cx<'_>) -> Result<PathModifier, DocError> {
    node.only_fields(&["type", "replaceFullPath", "replacePrefixMatch"], |_| None)?;
    let type_node = node.require("type")?;
    let kind = type_node.as_str()?;
    let (key, other) = match kind {
        "ReplaceFullPath" => ("replaceFullPath", "replacePrefixMatch"),
        "ReplacePrefixMatch" => ("replacePrefixMatch", "replaceFullPath"),
        t => {
            return Err(type_node
                .invalid(format!("{t:?} is not a path modifier type (ReplaceFullPath, ReplacePrefixMatch)")))
        }
    };
    if let Some(n) = node.get(other) {
        return Err(n.invalid(format!("must not be set when type is {kind}")));
    }
    let value_node =
        node.get(key).ok_or_else(|| node.invalid(format!("{key} must be set when type is {kind}")))?;
    // "" is meaningful here: a ReplacePrefixMatch of "" strips the prefix.
    let value = value_node.as_str()?;
    if value.len() > MAX_PATH_LEN {
        return Err(value_node.invalid(format!("at most {MAX_PATH_LEN} characters are allowed")));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(value_node.invalid("must not contain spaces or control characters"));
    }
    if key == "replaceFullPath" {
        return Ok(PathModifier::ReplaceFullPath(value.to_owned()));
    }
    // The CRD's CEL rule: the prefix to replace must be unambiguous.
    if !cx.single_prefix_match {
        return Err(type_node
            .invalid("ReplacePrefixMatch needs the rule to have exactly one match, with a PathPrefix path"));
    }
    Ok(PathModifier::ReplacePrefixMatch(value.to_owned()))
}

fn request_mirror(config: &Node<'_>, cx: Cx<'_>) -> Result<RequestMirror, DocError> {
    config.only_fields(&["backendRef", "percent", "fraction"], |_| None)?;
    let backend_node = config.require("backendRef")?;
    // A BackendObjectReference: no weight, no filters.
    backend_node.only_fields(&["group", "kind", "name", "namespace", "port"], |_| None)?;
    let backend = backend_object_ref(&backend_node, cx)?;
    let fraction = match (config.get("percent"), config.get("fraction")) {
        (Some(_), Some(f)) => return Err(f.invalid("only one of percent and fraction may be set")),
        (Some(p), None) => Fraction(int_in(&p, 0, 100)? as f64 / 100.0),
        (None, Some(f)) => fraction(&f)?,
        (None, None) => Fraction(1.0),
    };
    Ok(RequestMirror { backend, fraction })
}

fn fraction(node: &Node<'_>) -> Result<Fraction, DocError> {
    node.only_fields(&["numerator", "denominator"], |_| None)?;
    let numerator = int_in(&node.require("numerator")?, 0, i32::MAX.into())?;
    let denominator = match node.get("denominator") {
        None => 100,
        Some(d) => int_in(&d, 1, i32::MAX.into())?,
    };
    if numerator > denominator {
        return Err(node.invalid(format!("numerator {numerator} must not exceed denominator {denominator}")));
    }
    Ok(Fraction(numerator as f64 / denominator as f64))
}

// --- backendRefs ---

fn backend_refs(rule: &Node<'_>, cx: Cx<'_>) -> Result<Vec<BackendRef>, DocError> {
    let mut out = Vec::new();
    for node in bounded_list(rule, "backendRefs", MAX_BACKENDS)? {
        node.expect_mapping()?;
        reject_session_persistence(&node)?;
        let mut backend = backend_object_ref(&node, cx)?;
        if let Some(w) = node.get("weight") {
            backend.weight = int_in(&w, 0, MAX_WEIGHT)? as u32;
        }
        backend.filters = filters(&node, cx)?;
        out.push(backend);
    }
    Ok(out)
}

/// The reference part of a backendRef (also a mirror's `backendRef`), weight 1 and no filters.
fn backend_object_ref(node: &Node<'_>, cx: Cx<'_>) -> Result<BackendRef, DocError> {
    node.expect_mapping()?;
    let name = required_str(node, "name")?;
    let group = match node.get("group") {
        None => "",
        Some(g) => g.as_str()?,
    };
    let kind = match node.get("kind") {
        None => "Service",
        Some(k) => k.as_str()?,
    };
    let namespace = namespace_or(node, cx.namespace)?;
    let port = node.get("port").map(|p| p.as_port()).transpose()?;
    let service = group.is_empty() && kind == "Service";
    if service && port.is_none() {
        // A CEL rule of the CRDs.
        return Err(DocError::Invalid {
            field: node.child_path("port"),
            reason: "required for a Service backend".into(),
        });
    }
    let invalid = if !service {
        let what = if group.is_empty() { kind.to_owned() } else { format!("{kind}.{group}") };
        Some(format!("backend kind {what} is not supported (sluice routes to core Services only)"))
    } else if namespace != cx.namespace {
        Some(CROSS_NAMESPACE.to_owned())
    } else {
        None
    };
    Ok(BackendRef {
        namespace,
        name: name.to_owned(),
        port,
        weight: 1,
        filters: Vec::new(),
        invalid,
        subset: None,
        kind: Default::default(),
    })
}

// --- HTTPRoute timeouts and retry ---

fn timeouts(rule: &Node<'_>) -> Result<RouteTimeouts, DocError> {
    let Some(t) = rule.get("timeouts") else {
        return Ok(RouteTimeouts::default());
    };
    t.expect_mapping()?;
    let request = duration(&t, "request")?;
    let backend_request = duration(&t, "backendRequest")?;
    // The CRD's CEL rule; "0s" (no timeout) for the request lifts the bound.
    if let (Some(r), Some(b)) = (request, backend_request) {
        if !r.is_zero() && b > r {
            return Err(t.require("backendRequest")?.invalid(format!(
                "{b:?} is longer than the request timeout ({r:?}), which covers every backend request"
            )));
        }
    }
    let nonzero = |d: Option<Duration>| d.filter(|d| !d.is_zero());
    Ok(RouteTimeouts { request: nonzero(request), backend_request: nonzero(backend_request) })
}

pub(super) fn duration(node: &Node<'_>, key: &str) -> Result<Option<Duration>, DocError> {
    let Some(n) = node.get(key) else {
        return Ok(None);
    };
    parse_duration(n.as_str()?).map(Some).map_err(|reason| n.invalid(reason))
}

/// Attempts when `retry` does not say: one retry, Envoy's default for a retry policy (the spec
/// leaves it to the implementation).
const DEFAULT_RETRY_ATTEMPTS: u32 = 1;

fn retry(rule: &Node<'_>) -> Result<Option<RouteRetry>, DocError> {
    let Some(r) = rule.get("retry") else {
        return Ok(None);
    };
    r.expect_mapping()?;
    let mut codes: Vec<u16> = Vec::new();
    for n in r.list("codes")? {
        let code = int_in(&n, 400, 599)? as u16;
        if codes.contains(&code) {
            return Err(n.invalid(format!("duplicate status code {code}")));
        }
        codes.push(code);
    }
    let attempts = match r.get("attempts") {
        None => DEFAULT_RETRY_ATTEMPTS,
        Some(n) => int_in(&n, 0, u32::MAX.into())? as u32,
    };
    Ok(Some(RouteRetry { codes, attempts, backoff: duration(&r, "backoff")? }))
}
