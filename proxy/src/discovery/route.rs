//! Routes of the Kubernetes Gateway API for meshes ("GAMMA"): `HTTPRoute` and `GRPCRoute`
//! (gateway.networking.k8s.io/v1) whose `parentRefs` name a Service, and Istio's
//! `VirtualService` compiled into the same types per Service (see
//! [`super::istio::virtual_service`]): one routing engine, several APIs. Distilled at parse
//! time to what the L7 data path acts on; regular expressions are compiled once, here.
//!
//! A few variants exist for one API only, because the two APIs define them differently: a
//! VirtualService `prefix` is a plain string prefix ([`PathMatch::Prefix`]) where the Gateway
//! API's `PathPrefix` is element-wise, its redirect keeps the request's port
//! ([`Filter::Redirect`]), and it can answer directly ([`Filter::DirectResponse`]).
//!
//! Semantics sluice applies (the parser validates against them, the data path implements them):
//! - A route attaches to a Service (`parentRefs[].kind: Service`, group ""), optionally to one
//!   of its ports (`parentRefs[].port`). Other parents (Gateways) are ignored: sluice is a mesh,
//!   not an ingress.
//! - A route in the Service's own namespace is a *producer* route and applies to every client;
//!   a route in another namespace is a *consumer* route and applies only to clients in the
//!   route's namespace, instead of the producer routes (GEP-1426).
//! - `hostnames` are kept for the admin view but not matched: a mesh route is selected by the
//!   Service the client dialled, not by Host.
//! - A rule without `matches` matches every request (HTTP: `PathPrefix /`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::traffic::{FaultInjection, RetryPolicy};

/// HTTPRoute, GRPCRoute or a VirtualService compiled for one Service: each becomes a
/// [`Route`]; the kind decides which match fields apply and how rules are ordered (Gateway API
/// precedence, or a VirtualService's own order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
    #[serde(rename = "VirtualService")]
    VirtualService,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
            RouteKind::VirtualService => "VirtualService",
        }
    }

    /// The Gateway API's kinds (their rules are sorted by precedence; a VirtualService's are
    /// evaluated in the order written).
    pub fn is_gateway_api(self) -> bool {
        matches!(self, RouteKind::Http | RouteKind::Grpc)
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One HTTPRoute or GRPCRoute, or one VirtualService as it applies to one Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` as written (RFC 3339, which sorts as text); absent in a
    /// hand-written manifest. Older routes win precedence ties; a route without a timestamp
    /// counts as the newest.
    pub created: Option<String>,
    /// The Services the route attaches to (other parent kinds are dropped at parse time).
    pub parents: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

impl Route {
    /// "namespace/name", as precedence ties and logs name a route.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `parentRefs[]` naming a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ParentRef {
    /// Defaults to the route's namespace.
    pub namespace: String,
    pub name: String,
    /// Only this Service port; `None`: every port of the Service.
    pub port: Option<u16>,
}

/// `rules[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteRule {
    /// `rules[].name` (Gateway API 1.2+), for logs and the CLI.
    pub name: Option<String>,
    /// The request matches the rule if any match matches. Never empty: a rule written without
    /// matches gets one match-everything entry at parse time.
    pub matches: Vec<RouteMatch>,
    /// Rule-level filters, applied in order.
    pub filters: Vec<Filter>,
    /// Weighted backends. Empty (or every weight 0): requests get 500, as the spec requires.
    pub backends: Vec<BackendRef>,
    pub timeouts: RouteTimeouts,
    /// HTTPRoute `retry` (experimental channel, GEP-1731).
    pub retry: Option<RouteRetry>,
    /// A complete retry policy (a VirtualService's `retries`, or Istio's default for a rule
    /// without): wins over `retry` and over TrafficPolicies.
    pub retry_policy: Option<RetryPolicy>,
    /// Fault injection of this rule (a VirtualService's `fault`): every request the rule
    /// matches is subject to it.
    pub fault: Option<FaultInjection>,
    /// Where the rule was written, for the admin view, when that is not its place in the
    /// route: a delegated rule says `http[0] (delegate team/api http[1])`.
    pub origin: Option<String>,
}

/// One entry of `rules[].matches`. Every field present must match (AND).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct RouteMatch {
    /// `None` for GRPCRoute and for a VirtualService match without `uri` (any path);
    /// HTTPRoute defaults to `PathPrefix /`.
    pub path: Option<PathMatch>,
    /// The method (HTTPRoute: an upper-case name, exact).
    pub method: Option<ValueMatch>,
    /// Header names are stored lower-case (HTTP header names are case-insensitive).
    pub headers: Vec<HeaderMatch>,
    /// HTTPRoute only. Query parameter names are case-sensitive.
    pub query_params: Vec<HeaderMatch>,
    /// GRPCRoute only: `matches[].method`.
    pub grpc: Option<GrpcMethodMatch>,
    /// VirtualService `ignoreUriCase`: `Exact` and `Prefix` paths compare case-insensitively.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    /// VirtualService `authority`: the request's authority as sent (`Host` or `:authority`,
    /// with its port if the client wrote one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<ValueMatch>,
    /// VirtualService `scheme`: `http` for every request sluice routes (it does not terminate
    /// TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<ValueMatch>,
    /// VirtualService `withoutHeaders`: each must NOT match (a missing header counts as the
    /// empty value; `Present` means the header is absent).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub without_headers: Vec<HeaderMatch>,
    /// VirtualService `port`: only requests to this Service port. Applied when a table is
    /// compiled for a port, never per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// VirtualService `sourceLabels` / `sourceNamespace`: only requests from such client pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceMatch>,
}

/// Who a rule applies to (VirtualService `sourceLabels`, `sourceNamespace`): the client pod,
/// which sluice knows from the listener the connection arrived on.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct SourceMatch {
    /// Every label must be on the client pod.
    pub labels: std::collections::BTreeMap<String, String>,
    pub namespace: Option<String>,
}

impl SourceMatch {
    pub fn matches(&self, client: &ClientInfo<'_>) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == client.namespace)
            && (self.labels.is_empty()
                || client.labels.is_some_and(|l| self.labels.iter().all(|(k, v)| l.get(k) == Some(v))))
    }
}

/// The client of a request or connection, as rules with a [`SourceMatch`] see it.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    pub namespace: &'a str,
    /// The client pod's labels (`None`: not known, so no label condition holds).
    pub labels: Option<&'a std::collections::BTreeMap<String, String>>,
}

/// `matches[].path`. Values are as written (validated: they start with `/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`. A
    /// trailing `/` in the value is ignored (except for `/` itself).
    PathPrefix(String),
    /// The whole path must match (the expression is anchored).
    RegularExpression(Regex),
    /// VirtualService `uri.prefix`: a plain string prefix (`/foo` matches `/foobar` too), as
    /// Envoy's route prefix.
    Prefix(String),
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum ValueMatch {
    Exact(String),
    /// Anchored like every Gateway API regular expression in sluice: the whole value must
    /// match (as in Istio and Envoy Gateway).
    RegularExpression(Regex),
    /// VirtualService `prefix`.
    Prefix(String),
    /// VirtualService `{}` (or the regex `*`, as Istio reads it): the header or parameter is
    /// present, whatever its value.
    Present,
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::RegularExpression(re) => re.is_match(value),
            ValueMatch::Prefix(p) => value.starts_with(p.as_str()),
            ValueMatch::Present => true,
        }
    }
}

/// GRPCRoute `matches[].method`: the gRPC path is `/<service>/<method>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrpcMethodMatch {
    /// Fully qualified service name (`pkg.Service`); `None` matches any service.
    pub service: Option<ValueMatch>,
    /// `None` matches any method.
    pub method: Option<ValueMatch>,
}

/// A compiled, anchored regular expression that compares (and prints) as its source text.
#[derive(Clone)]
pub struct Regex {
    source: Arc<str>,
    compiled: regex::Regex,
}

impl Regex {
    /// Compiles `source` so that it must match the whole input (`^(?:source)$`). The error is
    /// the regex crate's message, for the manifest error.
    pub fn anchored(source: &str) -> Result<Regex, String> {
        Regex::build(source, &format!("^(?:{source})$"))
    }

    /// Compiles `source` as written, matching anywhere in the input (a VirtualService's
    /// `uriRegexRewrite.match`, which Envoy applies as a search-and-replace).
    pub fn unanchored(source: &str) -> Result<Regex, String> {
        Regex::build(source, source)
    }

    fn build(source: &str, pattern: &str) -> Result<Regex, String> {
        let compiled = regex::RegexBuilder::new(pattern)
            // Bound what one manifest can make the data path build and hold.
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Regex { source: source.into(), compiled })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.compiled.is_match(s)
    }

    /// Every non-overlapping match replaced by `replacement` (regex crate syntax: `${1}`).
    pub fn replace_all<'a>(&self, s: &'a str, replacement: &str) -> std::borrow::Cow<'a, str> {
        self.compiled.replace_all(s, replacement)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Regex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Regex {}

impl fmt::Debug for Regex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Regex({:?})", self.source)
    }
}

impl Serialize for Regex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// `backendRefs[]`: a Service port and its weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendRef {
    /// Defaults to the route's namespace.
    pub namespace: String,
    pub name: String,
    /// Required for a Service backend by the Gateway API; `None` here only when the parser
    /// could not require it (kept so that the data path answers 500 for it, as the spec says
    /// for an unresolvable reference, rather than rejecting the whole route).
    pub port: Option<u16>,
    /// Default 1; 0 means no traffic.
    pub weight: u32,
    /// Filters applied only when this backend is chosen (after the rule's filters).
    pub filters: Vec<Filter>,
    /// Why this reference cannot be used (a kind other than Service, a cross-namespace
    /// reference): requests sent to it get 500 and the reason is shown in the route table.
    pub invalid: Option<String>,
    /// A VirtualService destination's `subset`: the DestinationRule subset of the Service
    /// whose endpoints the request may go to.
    pub subset: Option<String>,
    /// What `namespace/name` names: a Service (always, for the Gateway API) or a ServiceEntry
    /// (a VirtualService destination whose host is a ServiceEntry's).
    pub kind: BackendKind,
}

/// The kind of object a [`BackendRef`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum BackendKind {
    #[default]
    Service,
    ServiceEntry,
}

/// `filters[]`. Only the core and extended filters sluice implements; anything else is a parse
/// error for the whole route (silently skipping a filter would change what requests look like).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestRedirect(RequestRedirect),
    #[serde(rename = "URLRewrite")]
    UrlRewrite(UrlRewrite),
    RequestMirror(RequestMirror),
    /// A VirtualService's `redirect` (the request is answered, not forwarded).
    #[serde(rename = "HTTPRedirect")]
    Redirect(HttpRedirect),
    /// A VirtualService's `directResponse`.
    DirectResponse(DirectResponse),
}

/// A VirtualService `redirect`, with Envoy's rules for the Location's authority: the
/// request's own host and port unless `authority` or a port is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRedirect {
    pub scheme: Option<String>,
    /// Replaces the request's host (and its port, unless `port` says one).
    pub authority: Option<String>,
    /// `uri` (ReplaceFullPath) or `prefixRewrite` (ReplacePrefix); `None` keeps the path.
    pub path: Option<PathModifier>,
    pub port: RedirectPort,
    /// 301 (the default), 302, 303, 307 or 308.
    pub status_code: u16,
}

/// The port of a redirect's Location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RedirectPort {
    /// As Envoy: the request host's own port when the host is kept, none with a new authority.
    Unchanged,
    /// `port`.
    Explicit(u16),
    /// `derivePort: FROM_REQUEST_PORT`: the Service port the client dialled.
    FromRequest,
}

/// A VirtualService `directResponse`: sluice answers with this status and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectResponse {
    pub status: u16,
    /// At most [`MAX_DIRECT_RESPONSE_BODY`] bytes.
    #[serde(serialize_with = "body_len")]
    pub body: Option<bytes::Bytes>,
}

/// A body as its length (views show how big it is, not its bytes).
fn body_len<S: serde::Serializer>(b: &Option<bytes::Bytes>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(b.as_ref().map_or(0, |b| b.len() as u64))
}

/// The largest `directResponse` body (Istio's validation allows 1 MiB).
pub const MAX_DIRECT_RESPONSE_BODY: usize = 1 << 20;

/// `set` replaces, `add` appends, `remove` deletes. Names are stored lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part of the path the rule's `PathPrefix` match matched.
    ReplacePrefixMatch(String),
    /// VirtualService `rewrite.uri` (Envoy's `prefix_rewrite`): replaces what the match's
    /// `uri` matched as a string: its prefix, the whole path for an exact or regex match, or
    /// the leading `/` for a match without `uri`.
    ReplacePrefix(String),
    /// VirtualService `rewrite.uriRegexRewrite`: every match of the expression in the path is
    /// replaced (`\1` in Istio's text is `${1}` here).
    RegexReplace { pattern: Regex, replacement: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRedirect {
    /// `http` or `https`; `None` keeps the request's.
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301 or 302 (the default), per the spec's enum.
    pub status_code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestMirror {
    pub backend: BackendRef,
    /// Share of requests mirrored, 0.0..=1.0 (`percent` or `fraction`); default 1.0.
    pub fraction: Fraction,
}

/// A share in 0.0..=1.0 that can live in `Eq` structs (the parser never produces NaN).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
pub struct Fraction(pub f64);

impl Eq for Fraction {}

/// `rules[].timeouts`. `None`: no deadline (the spec's "0s" also means none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RouteTimeouts {
    /// From the request's arrival until the whole response has been sent, retries included.
    #[serde(with = "opt_duration_ms")]
    pub request: Option<Duration>,
    /// One attempt at one backend.
    #[serde(with = "opt_duration_ms")]
    pub backend_request: Option<Duration>,
}

/// HTTPRoute `rules[].retry` (experimental channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteRetry {
    /// HTTP status codes to retry (each 400..=599).
    pub codes: Vec<u16>,
    /// Retries after the first attempt (the spec: "maximum number of times an individual
    /// request ... should be retried").
    pub attempts: u32,
    #[serde(with = "opt_duration_ms")]
    pub backoff: Option<Duration>,
}

mod opt_duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }
}

/// Parses a Gateway API duration (`^([0-9]{1,5}(h|m|s|ms)){1,4}$`, e.g. `1h`, `500ms`,
/// `1m30s`). Returns the reason on failure.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like \"500ms\", \"10s\" or \"1m30s\" (units h, m, s, ms)");
    let bytes = s.as_bytes();
    let (mut i, mut parts, mut total) = (0usize, 0usize, Duration::ZERO);
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() || digits.len() > 5 {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let unit = if s[i..].starts_with("ms") {
            i += 2;
            Duration::from_millis(n)
        } else {
            let d = match bytes.get(i) {
                Some(b'h') => Duration::from_secs(n * 3600),
                Some(b'm') => Duration::from_secs(n * 60),
                Some(b's') => Duration::from_secs(n),
                _ => return Err(bad()),
            };
            i += 1;
            d
        };
        total += unit;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1h2m3s4ms"), Ok(Duration::from_millis(3_723_004)));
        for bad in ["", "10", "1.5s", "s", "123456s", "1h2m3s4ms5ms", "-1s", "1d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn regexes_are_anchored_and_compare_by_source() {
        let re = Regex::anchored(".*user=test-user.*").unwrap();
        assert!(re.is_match("session=1; user=test-user; x=2"));
        assert!(!Regex::anchored("/v[0-9]").unwrap().is_match("/v1/extra"));
        assert_eq!(re, Regex::anchored(".*user=test-user.*").unwrap());
        assert!(Regex::anchored("(").is_err());
    }
}
