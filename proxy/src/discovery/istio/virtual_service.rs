//! Istio's `VirtualService` (networking.istio.io v1, v1beta1, v1alpha3: one schema), parsed
//! with serde types that mirror the published API and validated, into [`VirtualService`]: the
//! resource as written, minus what sluice cannot honour, which is refused with its field path and
//! the reason. Hosts and destinations are resolved later, per snapshot, in `vs_compile`.
//!
//! What sluice does with each part (README, "VirtualService"):
//! - `gateways` empty or naming `mesh`: the resource applies to mesh traffic; naming only
//!   gateways, it is accepted and applies to nothing sluice carries (an ingress gateway's
//!   business). A match whose own `gateways` do not name `mesh` is dropped the same way.
//! - `http` rules in order, first match wins; `match` (uri, scheme, method, authority, headers,
//!   withoutHeaders, queryParams, ignoreUriCase, port, sourceLabels, sourceNamespace; `name` and
//!   `statPrefix` are labels only), `route` (host, subset, port, weight, headers), `redirect`,
//!   `directResponse`, `delegate`, `rewrite` (uri, uriRegexRewrite, authority), `timeout`,
//!   `retries`, `fault`, `mirror`/`mirrorPercentage`/`mirrorPercent`/`mirrors`, `headers`.
//! - `tcp` rules (destinationSubnets, port, sourceSubnet, sourceLabels, sourceNamespace) and
//!   `tls` rules (sniHosts and the same), with weighted destinations.
//! - `exportTo`: which client namespaces see the resource.
//! - Refused with a reason: `corsPolicy`, `fault.delay.exponentialDelay` and
//!   `fault.abort.http2Error` (Istio does not implement them either), JWT claim matches
//!   (`@request.auth.claims`), `retries.retryRemoteLocalities: true`,
//!   `retries.retryIgnorePreviousHosts: false`, retry conditions sluice has no equivalent for,
//!   and IP addresses as hosts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

use super::{fraction_of, from_spec, invalid, nullable, parse_go_duration, Percent};
use crate::discovery::fields::Node;
use crate::discovery::manifest::{DocError, Meta};
use crate::discovery::model::Object;
use crate::discovery::route::{
    DirectResponse, Filter, Fraction, HeaderMatch, HeaderModifier, HttpRedirect, PathMatch, PathModifier,
    RedirectPort, Regex, RouteMatch, SourceMatch, ValueMatch, MAX_DIRECT_RESPONSE_BODY,
};
use crate::discovery::traffic::{FaultAbort, FaultDelay, FaultInjection, IpNet, RetryBudget, RetryOn, RetryPolicy};

/// The gateway name that means "the sidecars", i.e. mesh traffic.
pub const MESH_GATEWAY: &str = "mesh";

// --- the published schema (serde) ---

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default, deserialize_with = "nullable")]
    hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    gateways: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    http: Vec<HttpRouteSpec>,
    #[serde(default, deserialize_with = "nullable")]
    tls: Vec<TlsRouteSpec>,
    #[serde(default, deserialize_with = "nullable")]
    tcp: Vec<TcpRouteSpec>,
    #[serde(default, deserialize_with = "nullable")]
    export_to: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpRouteSpec {
    name: Option<String>,
    #[serde(rename = "match", default, deserialize_with = "nullable")]
    matches: Vec<HttpMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    route: Vec<HttpDestinationSpec>,
    redirect: Option<RedirectSpec>,
    direct_response: Option<DirectResponseSpec>,
    delegate: Option<DelegateSpec>,
    rewrite: Option<RewriteSpec>,
    timeout: Option<String>,
    retries: Option<RetriesSpec>,
    fault: Option<FaultSpec>,
    mirror: Option<DestinationSpec>,
    #[serde(default, deserialize_with = "nullable")]
    mirrors: Vec<MirrorPolicySpec>,
    mirror_percent: Option<u32>,
    mirror_percentage: Option<Percent>,
    cors_policy: Option<serde::de::IgnoredAny>,
    headers: Option<HeadersSpec>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpMatchSpec {
    name: Option<String>,
    uri: Option<StringMatchSpec>,
    scheme: Option<StringMatchSpec>,
    method: Option<StringMatchSpec>,
    authority: Option<StringMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    headers: BTreeMap<String, Option<StringMatchSpec>>,
    port: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    source_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    gateways: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    query_params: BTreeMap<String, Option<StringMatchSpec>>,
    #[serde(default)]
    ignore_uri_case: bool,
    #[serde(default, deserialize_with = "nullable")]
    without_headers: BTreeMap<String, Option<StringMatchSpec>>,
    source_namespace: Option<String>,
    stat_prefix: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct StringMatchSpec {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpDestinationSpec {
    destination: Option<DestinationSpec>,
    #[serde(default)]
    weight: i64,
    headers: Option<HeadersSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteDestinationSpec {
    destination: Option<DestinationSpec>,
    #[serde(default)]
    weight: i64,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DestinationSpec {
    #[serde(default)]
    host: String,
    subset: Option<String>,
    port: Option<PortSelectorSpec>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct PortSelectorSpec {
    number: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RedirectSpec {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<u32>,
    derive_port: Option<String>,
    scheme: Option<String>,
    redirect_code: Option<u32>,
    prefix_rewrite: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectResponseSpec {
    status: Option<u32>,
    body: Option<BodySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodySpec {
    string: Option<String>,
    bytes: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelegateSpec {
    #[serde(default)]
    name: String,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RewriteSpec {
    uri: Option<String>,
    authority: Option<String>,
    uri_regex_rewrite: Option<RegexRewriteSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegexRewriteSpec {
    #[serde(rename = "match", default)]
    pattern: String,
    #[serde(default)]
    rewrite: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RetriesSpec {
    #[serde(default)]
    attempts: i64,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
    retry_remote_localities: Option<bool>,
    retry_ignore_previous_hosts: Option<bool>,
    backoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    delay: Option<DelaySpec>,
    abort: Option<AbortSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DelaySpec {
    percent: Option<i64>,
    fixed_delay: Option<String>,
    exponential_delay: Option<serde::de::IgnoredAny>,
    percentage: Option<Percent>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AbortSpec {
    http_status: Option<i64>,
    grpc_status: Option<String>,
    http2_error: Option<serde::de::IgnoredAny>,
    percentage: Option<Percent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorPolicySpec {
    destination: Option<DestinationSpec>,
    percentage: Option<Percent>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct HeadersSpec {
    request: Option<HeaderOperationsSpec>,
    response: Option<HeaderOperationsSpec>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct HeaderOperationsSpec {
    #[serde(default, deserialize_with = "nullable")]
    set: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    add: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TlsRouteSpec {
    #[serde(rename = "match", default, deserialize_with = "nullable")]
    matches: Vec<TlsMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    route: Vec<RouteDestinationSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpRouteSpec {
    #[serde(rename = "match", default, deserialize_with = "nullable")]
    matches: Vec<L4MatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    route: Vec<RouteDestinationSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TlsMatchSpec {
    #[serde(default, deserialize_with = "nullable")]
    sni_hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    destination_subnets: Vec<String>,
    port: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    source_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    gateways: Vec<String>,
    source_namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct L4MatchSpec {
    #[serde(default, deserialize_with = "nullable")]
    destination_subnets: Vec<String>,
    port: Option<u32>,
    source_subnet: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    source_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    gateways: Vec<String>,
    source_namespace: Option<String>,
}

// --- the distilled resource ---

/// One VirtualService as written, validated. Destination hosts are kept as written (short
/// names too); `vs_compile` resolves them against each snapshot's Services and ServiceEntries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339): among resources for one host, the oldest
    /// applies (Istio's rule for sidecars).
    pub created: Option<String>,
    /// Lower-case, as written (`reviews`, `reviews.shop.svc.cluster.local`, `*.example.com`).
    /// Empty: a delegate, used only through another VirtualService's `delegate`.
    pub hosts: Vec<String>,
    /// `gateways` as written (empty: `mesh`).
    pub gateways: Vec<String>,
    pub export_to: ExportTo,
    pub http: Vec<HttpRule>,
    pub tcp: Vec<StreamRuleSpec>,
    pub tls: Vec<StreamRuleSpec>,
}

impl VirtualService {
    /// Whether it applies to mesh traffic (`gateways` empty or naming `mesh`).
    pub fn for_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }

    /// A delegate: no hosts of its own.
    pub fn is_delegate(&self) -> bool {
        self.hosts.is_empty()
    }

    /// "namespace/name".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `exportTo`: which namespaces' clients see the resource.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ExportTo {
    /// `*` (or nothing written): every namespace.
    pub public: bool,
    /// `~`: no namespace.
    pub none: bool,
    /// Namespaces named (`.` is stored as the resource's own namespace).
    pub namespaces: Vec<String>,
}

impl ExportTo {
    pub fn visible_to(&self, client_namespace: &str) -> bool {
        !self.none && (self.public || self.namespaces.iter().any(|n| n == client_namespace))
    }
}

/// One `http` rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HttpRule {
    pub name: Option<String>,
    /// Empty: every request.
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    /// `rewrite`: the authority and path the upstream sees.
    pub rewrite: Option<Rewrite>,
    /// `timeout`; `Some(ZERO)` written as `0s`: none.
    pub timeout: Option<Duration>,
    /// `retries`; `None`: Istio's default policy applies.
    pub retries: Option<RetryPolicy>,
    pub fault: Option<FaultInjection>,
    /// `mirror` (with `mirrorPercentage`/`mirrorPercent`) and `mirrors`; `None`: not written.
    pub mirrors: Option<Vec<Mirror>>,
    /// `headers` of the rule; `None`: not written.
    pub headers: Option<HeaderOps>,
}

/// One `match` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HttpMatch {
    pub name: Option<String>,
    /// uri, scheme, method, authority, headers, withoutHeaders, queryParams, ignoreUriCase,
    /// port and source, as the data path matches them.
    pub m: RouteMatch,
    /// `gateways` of the match (empty: the resource's).
    pub gateways: Vec<String>,
}

impl HttpMatch {
    /// Whether this match applies to mesh traffic: its own `gateways`, if any, name `mesh`.
    pub fn for_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }
}

/// What a matched rule does.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum HttpAction {
    Route(Vec<Destination>),
    Redirect(HttpRedirect),
    DirectResponse(DirectResponse),
    /// The rules of the delegate VirtualService `namespace/name`, merged with this one's.
    Delegate { namespace: String, name: String },
}

/// A `destination`, with its weight and (HTTP only) its own header operations.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Destination {
    /// Lower-case, as written (a short name is resolved in the VirtualService's namespace).
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
    /// `headers` of the destination, applied when it is chosen.
    pub filters: Vec<Filter>,
}

/// A mirror destination and the share of requests copied to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mirror {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub fraction: Fraction,
}

/// `rewrite`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rewrite {
    pub authority: Option<String>,
    pub path: Option<PathModifier>,
}

/// `headers`: request and response operations, and the authority a `set`/`add` of `host` or
/// `:authority` rewrites (as Istio turns it into Envoy's host rewrite).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct HeaderOps {
    pub request: HeaderModifier,
    pub response: HeaderModifier,
    pub authority: Option<String>,
}

/// A `tcp` or `tls` rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamRuleSpec {
    /// Empty (tcp only): every connection.
    pub matches: Vec<StreamMatch>,
    pub route: Vec<Destination>,
}

/// A `tcp` or `tls` match.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct StreamMatch {
    /// tls: `sniHosts`, lower-case (`*.example.com` wildcards, `*` any).
    pub sni_hosts: Vec<String>,
    /// The address the client dialled is in one of these.
    pub destination_subnets: Vec<IpNet>,
    pub port: Option<u16>,
    /// tcp: the client pod's address is in it.
    pub source_subnet: Option<IpNet>,
    pub source: Option<SourceMatch>,
    pub gateways: Vec<String>,
}

impl StreamMatch {
    pub fn for_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }
}

// --- parsing and validation ---

const RETRY_ON_KNOWN: &str = "5xx, gateway-error, reset, reset-before-request, connect-failure, retriable-4xx, refused-stream, retriable-status-codes, envoy-ratelimited, http3-post-connect-failure, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or an HTTP status code";

pub(crate) fn parse(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let spec: Spec = match doc.get("spec") {
        None => Spec::default(),
        Some(n) if n.value.is_null() => Spec::default(),
        Some(n) => from_spec(n.value)?,
    };
    let vs = distill(meta, spec)?;
    Ok(Object::VirtualService(Arc::new(vs)))
}

fn distill(meta: Meta, spec: Spec) -> Result<VirtualService, DocError> {
    let ns = meta.namespace.clone();
    let mut hosts = Vec::with_capacity(spec.hosts.len());
    for (i, h) in spec.hosts.iter().enumerate() {
        hosts.push(host_name(h).map_err(|r| invalid(format!("spec.hosts[{i}]"), r))?);
    }
    let export_to = export_to(&spec.export_to, &ns)?;
    let delegate = hosts.is_empty();
    if delegate {
        // A delegate is only reachable through a root's `delegate`: it cannot carry what only
        // a root can (Istio's validation says the same).
        if !spec.tcp.is_empty() || !spec.tls.is_empty() {
            return Err(invalid(
                if spec.tcp.is_empty() { "spec.tls" } else { "spec.tcp" },
                "a VirtualService without hosts is a delegate: it may only have http rules (add hosts to route TCP or TLS)",
            ));
        }
        if !spec.gateways.is_empty() {
            return Err(invalid("spec.gateways", "a delegate (no hosts) takes its root's gateways; remove them"));
        }
        if spec.http.is_empty() {
            return Err(invalid("spec.hosts", "at least one host is required (a delegate, without hosts, needs http rules)"));
        }
    } else if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        return Err(invalid("spec", "a VirtualService needs http, tcp or tls rules"));
    }
    let mut http = Vec::with_capacity(spec.http.len());
    for (i, r) in spec.http.into_iter().enumerate() {
        http.push(http_rule(r, &format!("spec.http[{i}]"), delegate)?);
    }
    let mut tcp = Vec::with_capacity(spec.tcp.len());
    for (i, r) in spec.tcp.into_iter().enumerate() {
        let at = format!("spec.tcp[{i}]");
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.into_iter().enumerate() {
            let at = format!("{at}.match[{j}]");
            let mut sm = StreamMatch {
                destination_subnets: subnets(&m.destination_subnets, &format!("{at}.destinationSubnets"))?,
                port: m.port.map(|p| port(p, &format!("{at}.port"))).transpose()?,
                source_subnet: m
                    .source_subnet
                    .as_deref()
                    .map(|s| ip_net(s).map_err(|r| invalid(format!("{at}.sourceSubnet"), r)))
                    .transpose()?,
                gateways: m.gateways,
                ..StreamMatch::default()
            };
            sm.source = source_match(m.source_labels, m.source_namespace, &at)?;
            matches.push(sm);
        }
        tcp.push(StreamRuleSpec { matches, route: stream_route(r.route, &at)? });
    }
    let mut tls = Vec::with_capacity(spec.tls.len());
    for (i, r) in spec.tls.into_iter().enumerate() {
        let at = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            return Err(invalid(format!("{at}.match"), "a tls rule needs at least one match (with sniHosts)"));
        }
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.into_iter().enumerate() {
            let at = format!("{at}.match[{j}]");
            if m.sni_hosts.is_empty() {
                return Err(invalid(format!("{at}.sniHosts"), "at least one SNI host is required"));
            }
            let mut sni = Vec::with_capacity(m.sni_hosts.len());
            for (k, h) in m.sni_hosts.iter().enumerate() {
                let name = host_name(h).map_err(|r| invalid(format!("{at}.sniHosts[{k}]"), r))?;
                // As Istio's validation: a tls rule only sees connections to the resource's
                // hosts, so a server name outside them could never match.
                if !hosts.iter().any(|host| name_within(&name, host)) {
                    return Err(invalid(
                        format!("{at}.sniHosts[{k}]"),
                        format!("{name:?} is not one of the VirtualService's hosts or under one of its wildcards ({})", hosts.join(", ")),
                    ));
                }
                sni.push(name);
            }
            let mut sm = StreamMatch {
                sni_hosts: sni,
                destination_subnets: subnets(&m.destination_subnets, &format!("{at}.destinationSubnets"))?,
                port: m.port.map(|p| port(p, &format!("{at}.port"))).transpose()?,
                gateways: m.gateways,
                ..StreamMatch::default()
            };
            sm.source = source_match(m.source_labels, m.source_namespace, &at)?;
            matches.push(sm);
        }
        tls.push(StreamRuleSpec { matches, route: stream_route(r.route, &at)? });
    }
    Ok(VirtualService {
        namespace: meta.namespace,
        name: meta.name,
        created: meta.creation_timestamp,
        hosts,
        gateways: spec.gateways,
        export_to,
        http,
        tcp,
        tls,
    })
}

/// A host as Istio's validation accepts it (a DNS name, optionally with a leading `*.`, or
/// `*`), lower-cased.
fn host_name(h: &str) -> Result<String, String> {
    if h.is_empty() {
        return Err("must not be empty".into());
    }
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{h:?}: an IP address as a host is not supported (sluice matches VirtualService hosts to Services and ServiceEntries by name)"
        ));
    }
    if h == "*" {
        return Ok(h.into());
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    let valid = name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !valid {
        return Err(format!("{h:?} is not a host name (DNS labels, optionally after a leading \"*.\")"));
    }
    Ok(h.to_ascii_lowercase())
}

/// Whether the (possibly wildcard) host `name` is `host` or within it, as Istio's
/// `host.Name.SubsetOf`: `a.example.com` and `*.x.example.com` are within `*.example.com`,
/// everything is within `*`.
fn name_within(name: &str, host: &str) -> bool {
    match (host.strip_prefix('*'), name.strip_prefix('*')) {
        (Some(suffix), Some(inner)) => inner.ends_with(suffix),
        (Some(suffix), None) => name.ends_with(suffix),
        (None, Some(_)) => false,
        (None, None) => name == host,
    }
}

fn export_to(list: &[String], ns: &str) -> Result<ExportTo, DocError> {
    if list.is_empty() {
        // Istio's default (meshConfig.defaultVirtualServiceExportTo unset): every namespace.
        return Ok(ExportTo { public: true, ..ExportTo::default() });
    }
    let mut out = ExportTo::default();
    for (i, e) in list.iter().enumerate() {
        match e.as_str() {
            "*" => out.public = true,
            "~" => {
                if list.len() > 1 {
                    return Err(invalid(format!("spec.exportTo[{i}]"), "\"~\" (exported nowhere) must be the only entry"));
                }
                out.none = true;
            }
            "." => out.namespaces.push(ns.to_owned()),
            other => {
                if let Some(reason) = crate::discovery::fields::NameRule::Dns1123Label.check(other) {
                    return Err(invalid(format!("spec.exportTo[{i}]"), format!("{other:?}: {reason} (or \".\", \"*\", \"~\")")));
                }
                out.namespaces.push(other.to_owned());
            }
        }
    }
    if out.public {
        out.namespaces.clear();
    }
    out.namespaces.sort();
    out.namespaces.dedup();
    Ok(out)
}

fn http_rule(r: HttpRouteSpec, at: &str, in_delegate: bool) -> Result<HttpRule, DocError> {
    if r.cors_policy.is_some() {
        return Err(invalid(
            format!("{at}.corsPolicy"),
            "not supported: sluice does not answer CORS preflights or add CORS headers (leave CORS to the application)",
        ));
    }
    let mut matches = Vec::with_capacity(r.matches.len());
    for (i, m) in r.matches.into_iter().enumerate() {
        matches.push(http_match(m, &format!("{at}.match[{i}]"))?);
    }
    let actions = [!r.route.is_empty(), r.redirect.is_some(), r.direct_response.is_some(), r.delegate.is_some()];
    let count = actions.iter().filter(|a| **a).count();
    if count == 0 {
        return Err(invalid(at, "a rule needs one of route, redirect, directResponse or delegate"));
    }
    if count > 1 {
        return Err(invalid(at, "route, redirect, directResponse and delegate exclude each other: set only one"));
    }
    let action = if let Some(d) = r.delegate {
        if in_delegate {
            return Err(invalid(format!("{at}.delegate"), "a delegate cannot delegate again (Istio supports one level)"));
        }
        if d.name.is_empty() {
            return Err(invalid(format!("{at}.delegate.name"), "must not be empty"));
        }
        // The rule's other fields (rewrite, timeout, retries, ...) are the defaults of the
        // delegate's rules, as Istio merges them.
        HttpAction::Delegate { namespace: d.namespace.filter(|n| !n.is_empty()).unwrap_or_default(), name: d.name }
    } else if let Some(rd) = r.redirect {
        if r.rewrite.is_some() {
            return Err(invalid(format!("{at}.rewrite"), "rewrite and redirect exclude each other"));
        }
        HttpAction::Redirect(redirect(rd, &format!("{at}.redirect"))?)
    } else if let Some(dr) = r.direct_response {
        HttpAction::DirectResponse(direct_response(dr, &format!("{at}.directResponse"))?)
    } else {
        let mut dests = Vec::with_capacity(r.route.len());
        for (i, d) in r.route.into_iter().enumerate() {
            let dat = format!("{at}.route[{i}]");
            let filters = match d.headers {
                Some(h) => header_filters(&header_ops(h, &format!("{dat}.headers"))?),
                None => Vec::new(),
            };
            dests.push(destination(d.destination, d.weight, filters, &dat)?);
        }
        check_weights(&dests, &format!("{at}.route"))?;
        HttpAction::Route(dests)
    };
    let rewrite = r.rewrite.map(|rw| rewrite(rw, &format!("{at}.rewrite"))).transpose()?;
    let timeout = r.timeout.as_deref().map(|t| duration(t, &format!("{at}.timeout"))).transpose()?;
    let retries = r.retries.map(|rt| retries(rt, &format!("{at}.retries"))).transpose()?;
    let fault = r.fault.map(|f| fault(f, &format!("{at}.fault"))).transpose()?;
    let mut mirrors: Option<Vec<Mirror>> = None;
    if let Some(m) = r.mirror {
        // mirrorPercentage wins over the deprecated mirrorPercent; neither: 100 %.
        let share = match (r.mirror_percentage, r.mirror_percent) {
            (Some(p), _) => fraction_of(p.value).map_err(|e| invalid(format!("{at}.mirrorPercentage.value"), e))?,
            (None, Some(p)) => fraction_of(f64::from(p)).map_err(|e| invalid(format!("{at}.mirrorPercent"), e))?,
            (None, None) => 1.0,
        };
        let (host, subset, port) = destination_parts(Some(m), &format!("{at}.mirror"))?;
        mirrors.get_or_insert_with(Vec::new).push(Mirror { host, subset, port, fraction: Fraction(share) });
    } else if r.mirror_percentage.is_some() || r.mirror_percent.is_some() {
        let field = if r.mirror_percentage.is_some() { "mirrorPercentage" } else { "mirrorPercent" };
        return Err(invalid(format!("{at}.{field}"), "needs mirror (the destination to copy requests to)"));
    }
    for (i, m) in r.mirrors.into_iter().enumerate() {
        let mat = format!("{at}.mirrors[{i}]");
        let share = match m.percentage {
            Some(p) => fraction_of(p.value).map_err(|e| invalid(format!("{mat}.percentage.value"), e))?,
            None => 1.0,
        };
        let (host, subset, port) = destination_parts(m.destination, &format!("{mat}.destination"))?;
        mirrors.get_or_insert_with(Vec::new).push(Mirror { host, subset, port, fraction: Fraction(share) });
    }
    let headers = r.headers.map(|h| header_ops(h, &format!("{at}.headers"))).transpose()?;
    Ok(HttpRule {
        name: r.name.filter(|n| !n.is_empty()),
        matches,
        action,
        rewrite,
        timeout,
        retries,
        fault,
        mirrors,
        headers,
    })
}

fn http_match(m: HttpMatchSpec, at: &str) -> Result<HttpMatch, DocError> {
    let path = match m.uri {
        None => None,
        Some(u) => match string_match(&u, &format!("{at}.uri"))? {
            None | Some(ValueMatch::Present) => None,
            Some(ValueMatch::Exact(p)) => Some(PathMatch::Exact(p)),
            Some(ValueMatch::Prefix(p)) => Some(PathMatch::Prefix(p)),
            Some(ValueMatch::RegularExpression(r)) => Some(PathMatch::RegularExpression(r)),
        },
    };
    let opt = |s: Option<StringMatchSpec>, field: &str| -> Result<Option<ValueMatch>, DocError> {
        match s {
            None => Ok(None),
            Some(s) => Ok(Some(string_match(&s, &format!("{at}.{field}"))?.unwrap_or(ValueMatch::Present))),
        }
    };
    let headers = header_matches(m.headers, &format!("{at}.headers"), true)?;
    let without_headers = header_matches(m.without_headers, &format!("{at}.withoutHeaders"), true)?;
    let query_params = header_matches(m.query_params, &format!("{at}.queryParams"), false)?;
    let mut rm = RouteMatch {
        path,
        method: opt(m.method, "method")?,
        headers,
        query_params,
        grpc: None,
        ignore_uri_case: m.ignore_uri_case,
        authority: opt(m.authority, "authority")?,
        scheme: opt(m.scheme, "scheme")?,
        without_headers,
        port: m.port.map(|p| port(p, &format!("{at}.port"))).transpose()?,
        source: None,
    };
    rm.source = source_match(m.source_labels, m.source_namespace, at)?;
    // statPrefix names Envoy statistics; sluice keeps no per-route statistics, so it has no
    // effect (README, "VirtualService").
    let _ = m.stat_prefix;
    Ok(HttpMatch { name: m.name.filter(|n| !n.is_empty()), m: rm, gateways: m.gateways })
}

/// `{exact|prefix|regex}`; `None` for `{}` (which Istio reads as "present", or "any" for a uri).
fn string_match(s: &StringMatchSpec, at: &str) -> Result<Option<ValueMatch>, DocError> {
    let set = [s.exact.is_some(), s.prefix.is_some(), s.regex.is_some()].iter().filter(|b| **b).count();
    if set > 1 {
        return Err(invalid(at, "exact, prefix and regex exclude each other: set only one"));
    }
    if let Some(e) = &s.exact {
        return Ok(Some(ValueMatch::Exact(e.clone())));
    }
    if let Some(p) = &s.prefix {
        return Ok(Some(ValueMatch::Prefix(p.clone())));
    }
    if let Some(r) = &s.regex {
        // Istio turns the (non-RE2) regex `*` into a presence match.
        if r == "*" {
            return Ok(Some(ValueMatch::Present));
        }
        let re = Regex::anchored(r).map_err(|e| invalid(format!("{at}.regex"), format!("invalid regular expression: {e}")))?;
        return Ok(Some(ValueMatch::RegularExpression(re)));
    }
    Ok(None)
}

fn header_matches(
    map: BTreeMap<String, Option<StringMatchSpec>>,
    at: &str,
    header: bool,
) -> Result<Vec<HeaderMatch>, DocError> {
    let mut out = Vec::with_capacity(map.len());
    for (name, m) in map {
        let field = format!("{at}[{name:?}]");
        if name.is_empty() {
            return Err(invalid(field, "a name must not be empty"));
        }
        if header {
            if name.starts_with("@request.auth.claims") {
                return Err(invalid(
                    field,
                    "matching JWT claims is not supported in routes: sluice routes at the client's node, before any RequestAuthentication runs",
                ));
            }
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(field, format!("{name:?} is not an HTTP header name")));
            }
        }
        let value = match m {
            None => ValueMatch::Present,
            Some(s) => string_match(&s, &field)?.unwrap_or(ValueMatch::Present),
        };
        // Header names are case-insensitive; query parameter names are not.
        out.push(HeaderMatch { name: if header { name.to_ascii_lowercase() } else { name }, value });
    }
    Ok(out)
}

fn source_match(labels: BTreeMap<String, String>, namespace: Option<String>, _at: &str) -> Result<Option<SourceMatch>, DocError> {
    let namespace = namespace.filter(|n| !n.is_empty());
    if labels.is_empty() && namespace.is_none() {
        return Ok(None);
    }
    Ok(Some(SourceMatch { labels, namespace }))
}

fn port(p: u32, at: &str) -> Result<u16, DocError> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(at, format!("{p} is not a port (1 to 65535)"))),
    }
}

fn subnets(list: &[String], at: &str) -> Result<Vec<IpNet>, DocError> {
    list.iter().enumerate().map(|(i, s)| ip_net(s).map_err(|r| invalid(format!("{at}[{i}]"), r))).collect()
}

fn ip_net(s: &str) -> Result<IpNet, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{s:?}: bad prefix length"))?,
    };
    Ok(IpNet { addr, prefix })
}

fn destination_parts(d: Option<DestinationSpec>, at: &str) -> Result<(String, Option<String>, Option<u16>), DocError> {
    let d = d.ok_or_else(|| DocError::Missing { field: at.to_owned() })?;
    if d.host.is_empty() {
        return Err(DocError::Missing { field: format!("{at}.host") });
    }
    let host = host_name(&d.host).map_err(|r| invalid(format!("{at}.host"), r))?;
    if host.contains('*') {
        return Err(invalid(format!("{at}.host"), "a destination must name one host, not a wildcard"));
    }
    let port = match d.port.and_then(|p| p.number) {
        None | Some(0) => None,
        Some(p) => Some(port(p, &format!("{at}.port.number"))?),
    };
    Ok((host, d.subset.filter(|s| !s.is_empty()), port))
}

fn destination(d: Option<DestinationSpec>, weight: i64, filters: Vec<Filter>, at: &str) -> Result<Destination, DocError> {
    let (host, subset, port) = destination_parts(d, &format!("{at}.destination"))?;
    let weight = u32::try_from(weight).map_err(|_| invalid(format!("{at}.weight"), format!("{weight} is not a weight (0 or more)")))?;
    Ok(Destination { host, subset, port, weight, filters })
}

/// One destination takes every request whatever its weight; several share by weight (a 0
/// gets none), and at least one must have some.
fn check_weights(dests: &[Destination], at: &str) -> Result<(), DocError> {
    if dests.len() > 1 && dests.iter().all(|d| d.weight == 0) {
        return Err(invalid(at, "every destination has weight 0: no request could be routed"));
    }
    Ok(())
}

fn stream_route(route: Vec<RouteDestinationSpec>, at: &str) -> Result<Vec<Destination>, DocError> {
    if route.is_empty() {
        return Err(invalid(format!("{at}.route"), "at least one destination is required"));
    }
    let mut out = Vec::with_capacity(route.len());
    for (i, d) in route.into_iter().enumerate() {
        out.push(destination(d.destination, d.weight, Vec::new(), &format!("{at}.route[{i}]"))?);
    }
    check_weights(&out, &format!("{at}.route"))?;
    Ok(out)
}

fn redirect(rd: RedirectSpec, at: &str) -> Result<HttpRedirect, DocError> {
    let status_code = match rd.redirect_code.unwrap_or(0) {
        0 => 301,
        c @ (301 | 302 | 303 | 307 | 308) => c as u16,
        c => return Err(invalid(format!("{at}.redirectCode"), format!("{c} is not a redirect status (301, 302, 303, 307, 308)"))),
    };
    if rd.uri.is_some() && rd.prefix_rewrite.is_some() {
        return Err(invalid(at, "uri and prefixRewrite exclude each other"));
    }
    let port = match (rd.port, rd.derive_port.as_deref()) {
        (Some(_), Some(_)) => return Err(invalid(at, "port and derivePort exclude each other")),
        (Some(p), None) => RedirectPort::Explicit(port(p, &format!("{at}.port"))?),
        (None, Some("FROM_REQUEST_PORT")) => RedirectPort::FromRequest,
        // Istio leaves the port alone for FROM_PROTOCOL_DEFAULT (Envoy's default behaviour).
        (None, Some("FROM_PROTOCOL_DEFAULT")) | (None, None) => RedirectPort::Unchanged,
        (None, Some(other)) => {
            return Err(invalid(format!("{at}.derivePort"), format!("{other:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT")))
        }
    };
    let scheme = match rd.scheme.as_deref() {
        None | Some("") => None,
        Some(s @ ("http" | "https")) => Some(s.to_owned()),
        Some(other) => return Err(invalid(format!("{at}.scheme"), format!("{other:?} is not http or https"))),
    };
    let path = match (rd.uri, rd.prefix_rewrite) {
        (Some(u), _) if !u.is_empty() => Some(PathModifier::ReplaceFullPath(u)),
        (_, Some(p)) if !p.is_empty() => Some(PathModifier::ReplacePrefix(p)),
        _ => None,
    };
    Ok(HttpRedirect { scheme, authority: rd.authority.filter(|a| !a.is_empty()), path, port, status_code })
}

fn direct_response(dr: DirectResponseSpec, at: &str) -> Result<DirectResponse, DocError> {
    let status = dr.status.ok_or_else(|| DocError::Missing { field: format!("{at}.status") })?;
    if !(200..=599).contains(&status) {
        return Err(invalid(format!("{at}.status"), format!("{status} is not an HTTP status (200 to 599)")));
    }
    let body = match dr.body {
        None => None,
        Some(BodySpec { string: Some(_), bytes: Some(_) }) => return Err(invalid(format!("{at}.body"), "string and bytes exclude each other")),
        Some(BodySpec { string: Some(s), .. }) => Some(bytes::Bytes::from(s)),
        Some(BodySpec { bytes: Some(b), .. }) => Some(bytes::Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| invalid(format!("{at}.body.bytes"), format!("not base64: {e}")))?,
        )),
        Some(_) => None,
    };
    if body.as_ref().is_some_and(|b| b.len() > MAX_DIRECT_RESPONSE_BODY) {
        return Err(invalid(format!("{at}.body"), format!("at most {MAX_DIRECT_RESPONSE_BODY} bytes are allowed")));
    }
    Ok(DirectResponse { status: status as u16, body })
}

fn rewrite(rw: RewriteSpec, at: &str) -> Result<Rewrite, DocError> {
    let path = match (rw.uri, rw.uri_regex_rewrite) {
        (Some(u), Some(_)) if !u.is_empty() => return Err(invalid(at, "uri and uriRegexRewrite exclude each other")),
        (_, Some(r)) => {
            let re = Regex::unanchored(&r.pattern)
                .map_err(|e| invalid(format!("{at}.uriRegexRewrite.match"), format!("invalid regular expression: {e}")))?;
            if r.pattern.is_empty() {
                return Err(DocError::Missing { field: format!("{at}.uriRegexRewrite.match") });
            }
            Some(PathModifier::RegexReplace { pattern: re, replacement: envoy_substitution(&r.rewrite) })
        }
        (Some(u), None) if !u.is_empty() => Some(PathModifier::ReplacePrefix(u)),
        _ => None,
    };
    let authority = rw.authority.filter(|a| !a.is_empty());
    if path.is_none() && authority.is_none() {
        return Err(invalid(at, "rewrite needs uri, uriRegexRewrite or authority"));
    }
    Ok(Rewrite { authority, path })
}

/// Envoy's (RE2's) substitution text (`\1` for a group, `\\` for a backslash) as the regex
/// crate's (`${1}`, with `$` escaped as `$$`).
fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    out.push_str(&format!("${{{d}}}"));
                }
                Some('\\') => {
                    chars.next();
                    out.push('\\');
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn duration(s: &str, at: &str) -> Result<Duration, DocError> {
    parse_go_duration(s).map_err(|e| invalid(at, e))
}

/// `retries`, with Istio's meaning: `attempts` retries after the first try (0 disables
/// retrying), on the conditions of `retryOn` (Envoy's vocabulary; status codes may be listed
/// directly) or Istio's default conditions.
fn retries(r: RetriesSpec, at: &str) -> Result<RetryPolicy, DocError> {
    if r.retry_remote_localities == Some(true) {
        return Err(invalid(
            format!("{at}.retryRemoteLocalities"),
            "not supported: sluice balances over every endpoint of a destination, without localities",
        ));
    }
    if r.retry_ignore_previous_hosts == Some(false) {
        return Err(invalid(
            format!("{at}.retryIgnorePreviousHosts"),
            "not supported: sluice always retries on another endpoint while there is one",
        ));
    }
    let attempts = u32::try_from(r.attempts)
        .map_err(|_| invalid(format!("{at}.attempts"), format!("{} is not a number of attempts (0 or more)", r.attempts)))?;
    let per_try_timeout = r
        .per_try_timeout
        .as_deref()
        .map(|t| duration(t, &format!("{at}.perTryTimeout")))
        .transpose()?
        .filter(|d| !d.is_zero());
    let backoff = r.backoff.as_deref().map(|t| duration(t, &format!("{at}.backoff"))).transpose()?.filter(|d| !d.is_zero());
    let (retry_on, codes) = match r.retry_on.as_deref().filter(|s| !s.trim().is_empty()) {
        None => (istio_default_retry_on(), Vec::new()),
        Some(s) => retry_on(s, &format!("{at}.retryOn"))?,
    };
    Ok(istio_retry_policy(attempts, per_try_timeout, retry_on, codes, backoff))
}

/// Istio's default conditions (`connect-failure,refused-stream,unavailable,cancelled,
/// retriable-status-codes`, the last with no codes unless a request names some).
pub fn istio_default_retry_on() -> RetryOn {
    RetryOn { connect_failure: true, refused_stream: true, grpc_unavailable: true, grpc_cancelled: true, ..RetryOn::default() }
}

/// The retry policy Istio gives a VirtualService rule without `retries`: 2 retries on its
/// default conditions.
pub fn istio_default_retries() -> RetryPolicy {
    istio_retry_policy(2, None, istio_default_retry_on(), Vec::new(), None)
}

fn istio_retry_policy(
    attempts: u32,
    per_try_timeout: Option<Duration>,
    retry_on: RetryOn,
    codes: Vec<u16>,
    backoff: Option<Duration>,
) -> RetryPolicy {
    // Envoy's backoff: 25 ms base, capped at ten times the base.
    let base = backoff.unwrap_or(Duration::from_millis(25));
    RetryPolicy {
        attempts,
        per_try_timeout,
        retry_on,
        retriable_status_codes: codes,
        // Envoy retries whatever the method: so does Istio.
        retry_non_idempotent: true,
        backoff_base: base,
        backoff_max: base * 10,
        budget: RetryBudget::default(),
    }
}

fn retry_on(s: &str, at: &str) -> Result<(RetryOn, Vec<u16>), DocError> {
    let mut on = RetryOn::default();
    let mut codes: Vec<u16> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(code) = part.parse::<u16>() {
            if !(100..=599).contains(&code) {
                return Err(invalid(at, format!("{code} is not an HTTP status code")));
            }
            if !codes.contains(&code) {
                codes.push(code);
            }
            on.retriable_status_codes = true;
            continue;
        }
        match part {
            "5xx" => on.status_5xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" => on.reset = true,
            // A request that never reached the upstream: what sluice knows as a failed
            // connect or a refused stream.
            "reset-before-request" => {
                on.connect_failure = true;
                on.refused_stream = true;
            }
            "connect-failure" => on.connect_failure = true,
            // Envoy's retriable-4xx is 409 Conflict only.
            "retriable-4xx" => {
                on.retriable_status_codes = true;
                if !codes.contains(&409) {
                    codes.push(409);
                }
            }
            "refused-stream" => on.refused_stream = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            "envoy-ratelimited" => on.envoy_ratelimited = true,
            // sluice never speaks HTTP/3: the condition cannot occur.
            "http3-post-connect-failure" => {}
            "cancelled" => on.grpc_cancelled = true,
            "deadline-exceeded" => on.grpc_deadline_exceeded = true,
            "internal" => on.grpc_internal = true,
            "resource-exhausted" => on.grpc_resource_exhausted = true,
            "unavailable" => on.grpc_unavailable = true,
            "retriable-headers" => {
                return Err(invalid(
                    at,
                    "retriable-headers is not supported: it needs Envoy's retriable_headers, which a VirtualService cannot set",
                ))
            }
            other => return Err(invalid(at, format!("{other:?} is not a retry condition ({RETRY_ON_KNOWN})"))),
        }
    }
    Ok((on, codes))
}

fn fault(f: FaultSpec, at: &str) -> Result<FaultInjection, DocError> {
    let delay = match f.delay {
        None => None,
        Some(d) => {
            let dat = format!("{at}.delay");
            if d.exponential_delay.is_some() {
                return Err(invalid(format!("{dat}.exponentialDelay"), "not supported (Istio does not implement it either); use fixedDelay"));
            }
            let fixed = d.fixed_delay.as_deref().ok_or_else(|| DocError::Missing { field: format!("{dat}.fixedDelay") })?;
            let fixed = duration(fixed, &format!("{dat}.fixedDelay"))?;
            Some(FaultDelay { fixed, fraction: Fraction(share(d.percentage, d.percent, &dat)?) })
        }
    };
    let abort = match f.abort {
        None => None,
        Some(a) => {
            let aat = format!("{at}.abort");
            if a.http2_error.is_some() {
                return Err(invalid(format!("{aat}.http2Error"), "not supported (Istio does not implement it either); use httpStatus or grpcStatus"));
            }
            let fraction = Fraction(share(a.percentage, None, &aat)?);
            match (a.http_status, a.grpc_status) {
                (Some(_), Some(_)) => return Err(invalid(&aat, "httpStatus and grpcStatus exclude each other")),
                (Some(h), None) => {
                    if !(200..=599).contains(&h) {
                        return Err(invalid(format!("{aat}.httpStatus"), format!("{h} is not an HTTP status (200 to 599)")));
                    }
                    Some(FaultAbort { http_status: h as u16, grpc_status: None, fraction })
                }
                (None, Some(g)) => {
                    let code = grpc_code(&g).ok_or_else(|| {
                        invalid(format!("{aat}.grpcStatus"), format!("{g:?} is not a gRPC status name (OK, CANCELLED, ..., UNAVAILABLE, UNAUTHENTICATED)"))
                    })?;
                    // An HTTP client of such a rule gets 503, gRPC's mapping of UNAVAILABLE.
                    Some(FaultAbort { http_status: 503, grpc_status: Some(code), fraction })
                }
                (None, None) => return Err(invalid(&aat, "needs httpStatus or grpcStatus")),
            }
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err(invalid(at, "fault needs a delay, an abort or both"));
    }
    Ok(FaultInjection { delay, abort, matches: Vec::new() })
}

/// A fault's share: `percentage`, else the deprecated integer `percent`, else 100 %.
fn share(p: Option<Percent>, percent: Option<i64>, at: &str) -> Result<f64, DocError> {
    match (p, percent) {
        (Some(p), _) => fraction_of(p.value).map_err(|e| invalid(format!("{at}.percentage.value"), e)),
        (None, Some(n)) => fraction_of(n as f64).map_err(|e| invalid(format!("{at}.percent"), e)),
        (None, None) => Ok(1.0),
    }
}

/// gRPC status names (grpc/doc/statuscodes.md), as Istio takes them; a number is taken too.
fn grpc_code(name: &str) -> Option<u16> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    if let Ok(n) = name.parse::<u16>() {
        return (n <= 16).then_some(n);
    }
    NAMES.iter().position(|n| n.eq_ignore_ascii_case(name)).map(|i| i as u16)
}

fn header_ops(h: HeadersSpec, at: &str) -> Result<HeaderOps, DocError> {
    let mut out = HeaderOps::default();
    if let Some(req) = h.request {
        let (m, authority) = header_modifier(req, &format!("{at}.request"), true)?;
        out.request = m;
        out.authority = authority;
    }
    if let Some(resp) = h.response {
        out.response = header_modifier(resp, &format!("{at}.response"), false)?.0;
    }
    Ok(out)
}

/// One side's `set`, `add`, `remove`. On the request side, `host` or `:authority` in `set` or
/// `add` is the authority the upstream sees (Istio's host rewrite; `set` wins over `add`).
fn header_modifier(ops: HeaderOperationsSpec, at: &str, request: bool) -> Result<(HeaderModifier, Option<String>), DocError> {
    let mut m = HeaderModifier::default();
    let mut authority = None;
    let mut set_authority = None;
    let name_ok = |name: &str, field: String| -> Result<String, DocError> {
        if name.starts_with(':') {
            return Err(invalid(field, format!("{name:?}: pseudo-headers cannot be changed (only :authority, on requests)")));
        }
        http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid(field, format!("{name:?} is not an HTTP header name")))?;
        Ok(name.to_ascii_lowercase())
    };
    for (which, map) in [("set", ops.set), ("add", ops.add)] {
        for (name, value) in map {
            let field = format!("{at}.{which}[{name:?}]");
            if name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host") {
                if !request {
                    return Err(invalid(field, "the authority is a request header"));
                }
                if which == "set" {
                    set_authority = Some(value);
                } else {
                    authority = Some(value);
                }
                continue;
            }
            let name = name_ok(&name, field.clone())?;
            if http::HeaderValue::from_str(&value).is_err() {
                return Err(invalid(field, "not a valid header value"));
            }
            if which == "set" { &mut m.set } else { &mut m.add }.push((name, value));
        }
    }
    for (i, name) in ops.remove.into_iter().enumerate() {
        let field = format!("{at}.remove[{i}]");
        m.remove.push(name_ok(&name, field)?);
    }
    Ok((m, set_authority.or(authority)))
}

/// A destination's header operations as the filters applied when it is chosen.
pub(crate) fn header_filters(ops: &HeaderOps) -> Vec<Filter> {
    let mut out = Vec::new();
    if !ops.request.set.is_empty() || !ops.request.add.is_empty() || !ops.request.remove.is_empty() {
        out.push(Filter::RequestHeaderModifier(ops.request.clone()));
    }
    if let Some(a) = &ops.authority {
        out.push(Filter::UrlRewrite(crate::discovery::route::UrlRewrite { hostname: Some(a.clone()), path: None }));
    }
    if !ops.response.set.is_empty() || !ops.response.add.is_empty() || !ops.response.remove.is_empty() {
        out.push(Filter::ResponseHeaderModifier(ops.response.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutions_become_the_regex_crates() {
        assert_eq!(envoy_substitution("\\2/instance/\\1"), "${2}/instance/${1}");
        assert_eq!(envoy_substitution("/cost$"), "/cost$$");
        assert_eq!(envoy_substitution("a\\\\b"), "a\\b");
    }

    #[test]
    fn grpc_names() {
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_code("unavailable"), Some(14));
        assert_eq!(grpc_code("4"), Some(4));
        assert_eq!(grpc_code("NOPE"), None);
    }

    #[test]
    fn sni_hosts_within_the_resources_hosts() {
        assert!(name_within("a.example.com", "a.example.com"));
        assert!(name_within("a.example.com", "*.example.com"));
        assert!(name_within("*.x.example.com", "*.example.com"));
        assert!(name_within("anything.test", "*"));
        assert!(!name_within("example.com", "*.example.com"));
        assert!(!name_within("*.example.com", "a.example.com"));
        assert!(!name_within("b.example.com", "a.example.com"));
    }

    #[test]
    fn hosts() {
        assert_eq!(host_name("Reviews"), Ok("reviews".into()));
        assert_eq!(host_name("*.bookinfo.svc.cluster.local"), Ok("*.bookinfo.svc.cluster.local".into()));
        assert!(host_name("10.0.0.1").unwrap_err().contains("IP address"));
        assert!(host_name("a..b").is_err());
        assert!(host_name("*foo.com").is_err());
    }
}
