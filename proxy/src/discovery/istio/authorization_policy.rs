//! Istio's AuthorizationPolicy (`security.istio.io` v1 and v1beta1), parsed into the model that
//! `policy::authz` evaluates at the destination, per connection and per HTTP request.
//!
//! Everything Istio's schema has is either enforced or rejected with the field and the reason:
//! `targetRef`/`targetRefs` (sluice applies policies to the pods `selector` chooses), action
//! CUSTOM and its `provider` (an external authorizer), `experimental.*` condition keys and path
//! templates (`{*}`, `{**}`). A wildcard `*` is allowed where Istio allows one (alone, at the
//! start or at the end; ports, IP blocks and condition keys are exact) and refused elsewhere,
//! since Istio would take it literally and it would never match.
//!
//! Each rule remembers whether it uses an HTTP-only field (`requestPrincipals`, `hosts`,
//! `methods`, `paths`, `request.*` conditions), because Istio applies such rules to TCP traffic
//! in a way of its own (see `policy::authz`); each policy remembers whether it needs to see
//! requests at all (an HTTP-only field, or the remote IP, which HTTP takes from
//! X-Forwarded-For), which is what makes the destination parse plaintext HTTP for a pod.

use std::fmt;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::{invalid, nullable, parse_ip_net, spec, PortValue, WorkloadSelector};
use crate::discovery::fields::Node;
use crate::discovery::manifest::{DocError, Meta};
use crate::discovery::model::{Labels, Object, StringMatch};
use crate::discovery::traffic::IpNet;

// ---------------------------------------------------------------------------------------------
// The model.

/// What an [`AuthorizationPolicy`] does with what its rules match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AuthzAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    /// Logged (and counted) when matched; never allows or denies anything.
    #[serde(rename = "AUDIT")]
    Audit,
}

impl AuthzAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
        }
    }
}

impl fmt::Display for AuthzAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `rules[].from[].source`: who a connection or request comes from. Every non-empty list must
/// match; an empty list is no condition (Istio cannot tell an empty list from an absent one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSource {
    /// Matched against the client's SPIFFE ID without `spiffe://` (`cluster.local/ns/a/sa/b`);
    /// stored in that form whichever form the policy used.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    /// Matched against `<iss>/<sub>` of the request's validated JWT (HTTP only).
    pub request_principals: Vec<StringMatch>,
    pub not_request_principals: Vec<StringMatch>,
    /// Matched against the namespace in the client's SPIFFE ID.
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// `<namespace>/<service account>` of the client's SPIFFE ID, exact, any trust domain.
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    /// The connection's peer address (`source.ip`).
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    /// The original client address (`remote.ip`): for HTTP the last X-Forwarded-For entry,
    /// else the peer address.
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
}

impl AuthzSource {
    fn http_only(&self) -> bool {
        !self.request_principals.is_empty() || !self.not_request_principals.is_empty()
    }

    fn uses_remote_ip(&self) -> bool {
        !self.remote_ip_blocks.is_empty() || !self.not_remote_ip_blocks.is_empty()
    }
}

/// `rules[].to[].operation`: what a connection or request is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzOperation {
    /// The request's host (Host / :authority), lower-cased; a host written without a port
    /// matches the authority whatever its port.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    /// The destination (application) port.
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<StringMatch>,
    pub not_methods: Vec<StringMatch>,
    /// The request path without its query, normalized (RFC 3986 dot segments removed).
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
}

impl AuthzOperation {
    fn http_only(&self) -> bool {
        [&self.hosts, &self.not_hosts, &self.methods, &self.not_methods, &self.paths, &self.not_paths]
            .iter()
            .any(|l| !l.is_empty())
    }
}

/// The attribute a `when` condition reads (Istio's condition keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConditionKey {
    /// `request.headers[<name>]` (name lower-cased): the header's values joined by `,`.
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestAuthPrincipal,
    RequestAuthAudiences,
    RequestAuthPresenter,
    /// `request.auth.claims[a][b]...`: the path into the JWT's claims.
    RequestAuthClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
}

impl ConditionKey {
    /// The keys sluice understands, for the error about an unknown one.
    const KNOWN: &'static str =
        "request.headers[NAME], source.ip, remote.ip, source.namespace, source.principal, \
        request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[NAME], \
        destination.ip, destination.port";

    fn parse(key: &str) -> Result<ConditionKey, String> {
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "request.auth.principal" => ConditionKey::RequestAuthPrincipal,
            "request.auth.audiences" => ConditionKey::RequestAuthAudiences,
            "request.auth.presenter" => ConditionKey::RequestAuthPresenter,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            // Istio reads the SNI of the mTLS connection the server sidecar terminates, which
            // its client sidecar set. Between sluice nodes that connection is sluice's own (its
            // server name is not the destination's host), and a client's own TLS is opaque
            // bytes to the destination: no value would mean what the policy's author meant.
            "connection.sni" => return Err(
                "\"connection.sni\" is not supported: the destination sees sluice's node-to-node \
                 mTLS, whose server name is not one the policy could mean; match the destination \
                 with to.operation.hosts or ports, or destination.port"
                    .to_owned(),
            ),
            k if k.starts_with("request.headers") => {
                let names = bracketed(&k["request.headers".len()..])
                    .filter(|n| n.len() == 1)
                    .ok_or_else(|| format!("{k:?}: write a header condition as request.headers[<name>]"))?;
                ConditionKey::RequestHeader(names[0].to_ascii_lowercase())
            }
            k if k.starts_with("request.auth.claims") => {
                let names = bracketed(&k["request.auth.claims".len()..]).ok_or_else(|| {
                    format!(
                        "{k:?}: write a claim condition as request.auth.claims[<name>] (nested: [<a>][<b>])"
                    )
                })?;
                ConditionKey::RequestAuthClaims(names)
            }
            k if k.starts_with("experimental.") => return Err(format!(
                "{k:?}: experimental condition keys are Envoy filter metadata, which sluice does not have"
            )),
            k => return Err(format!("unknown condition key {k:?} (known: {})", Self::KNOWN)),
        })
    }

    /// Conditions Istio only evaluates on HTTP requests.
    pub fn http_only(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::RequestAuthPrincipal
                | ConditionKey::RequestAuthAudiences
                | ConditionKey::RequestAuthPresenter
                | ConditionKey::RequestAuthClaims(_)
        )
    }

    fn value_kind(&self) -> ValueKind {
        match self {
            ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => ValueKind::Ip,
            ConditionKey::DestinationPort => ValueKind::Port,
            _ => ValueKind::Text,
        }
    }
}

impl fmt::Display for ConditionKey {
    /// The key as a policy writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConditionKey::RequestHeader(n) => write!(f, "request.headers[{n}]"),
            ConditionKey::SourceIp => f.write_str("source.ip"),
            ConditionKey::RemoteIp => f.write_str("remote.ip"),
            ConditionKey::SourceNamespace => f.write_str("source.namespace"),
            ConditionKey::SourcePrincipal => f.write_str("source.principal"),
            ConditionKey::RequestAuthPrincipal => f.write_str("request.auth.principal"),
            ConditionKey::RequestAuthAudiences => f.write_str("request.auth.audiences"),
            ConditionKey::RequestAuthPresenter => f.write_str("request.auth.presenter"),
            ConditionKey::RequestAuthClaims(path) => {
                f.write_str("request.auth.claims")?;
                path.iter().try_for_each(|p| write!(f, "[{p}]"))
            }
            ConditionKey::DestinationIp => f.write_str("destination.ip"),
            ConditionKey::DestinationPort => f.write_str("destination.port"),
        }
    }
}

impl Serialize for ConditionKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `[a][b]...` → `["a", "b"]`; `None` unless the whole text is such groups, each non-empty.
fn bracketed(mut rest: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let (name, after) = inner.split_once(']')?;
        if name.is_empty() || name.contains('[') {
            return None;
        }
        out.push(name.to_owned());
        rest = after;
    }
    (!out.is_empty()).then_some(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Text,
    Ip,
    Port,
}

/// The values of a condition, typed by its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ConditionValues {
    Text(Vec<StringMatch>),
    Ips(Vec<IpNet>),
    Ports(Vec<u16>),
}

impl ConditionValues {
    pub fn is_empty(&self) -> bool {
        match self {
            ConditionValues::Text(v) => v.is_empty(),
            ConditionValues::Ips(v) => v.is_empty(),
            ConditionValues::Ports(v) => v.is_empty(),
        }
    }
}

/// One entry of `rules[].when`: the key's value must match one of `values` (when given) and
/// none of `not_values`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzCondition {
    pub key: ConditionKey,
    pub values: ConditionValues,
    pub not_values: ConditionValues,
}

/// One entry of `spec.rules`: `from` (any source), `to` (any operation) and `when` (every
/// condition) must all match; what is empty is no condition, so a rule `{}` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuthzRule {
    pub from: Vec<AuthzSource>,
    pub to: Vec<AuthzOperation>,
    pub when: Vec<AuthzCondition>,
    /// The rule uses a field only HTTP requests have (see the module documentation).
    #[serde(skip)]
    pub http_only: bool,
}

/// Istio's `security.istio.io` AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    /// `spec.selector.matchLabels`: the pods it applies to (those with all these labels) in its
    /// namespace, or in every namespace for a policy in the root namespace. Empty, or no
    /// selector at all, selects every pod.
    pub selector: Labels,
    /// `spec.action`, ALLOW when absent.
    pub action: AuthzAction,
    /// `spec.rules`. A request matches the policy if it matches any rule; with no rules the
    /// policy matches nothing (an ALLOW policy without rules is Istio's "allow-nothing").
    pub rules: Vec<AuthzRule>,
    /// Some rule needs the HTTP request (an HTTP-only field, or the remote IP, which HTTP takes
    /// from X-Forwarded-For): the destination parses plaintext HTTP for the pods it selects.
    #[serde(skip)]
    pub needs_requests: bool,
}

impl AuthorizationPolicy {
    /// Whether the policy applies to a pod with these labels (the caller checks that the pod
    /// is in the policy's namespace, or that the policy is in the root namespace).
    pub fn selects(&self, pod_labels: &Labels) -> bool {
        self.selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    }
}

// ---------------------------------------------------------------------------------------------
// Istio's schema.

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    rules: Vec<Rule>,
    #[serde(default)]
    target_ref: Option<IgnoredAny>,
    #[serde(default)]
    target_refs: Option<IgnoredAny>,
    #[serde(default)]
    provider: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    #[serde(default, deserialize_with = "nullable")]
    from: Vec<From>,
    #[serde(default, deserialize_with = "nullable")]
    to: Vec<To>,
    #[serde(default, deserialize_with = "nullable")]
    when: Vec<Condition>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct From {
    #[serde(default)]
    source: Option<Source>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct To {
    #[serde(default)]
    operation: Option<Operation>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Source {
    #[serde(default, deserialize_with = "nullable")]
    principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_request_principals: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_namespaces: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_service_accounts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    remote_ip_blocks: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Operation {
    #[serde(default, deserialize_with = "nullable")]
    hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    ports: Vec<PortValue>,
    #[serde(default, deserialize_with = "nullable")]
    not_ports: Vec<PortValue>,
    #[serde(default, deserialize_with = "nullable")]
    methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_methods: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    paths: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_paths: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Condition {
    key: String,
    #[serde(default, deserialize_with = "nullable")]
    values: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    not_values: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Schema → model.

pub(crate) fn parse(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    // No spec at all is `spec: {}`: an ALLOW policy without rules, i.e. allow-nothing.
    let spec: Spec = spec(doc)?.unwrap_or_default();
    let at = "spec";
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        let field = if spec.target_ref.is_some() { "targetRef" } else { "targetRefs" };
        return Err(invalid(
            format!("{at}.{field}"),
            "not supported: sluice applies policies to the pods chosen by spec.selector",
        ));
    }
    let action = match spec.action.as_deref() {
        // "" is proto3's zero value, which is ALLOW.
        None | Some("ALLOW") | Some("") => AuthzAction::Allow,
        Some("DENY") => AuthzAction::Deny,
        Some("AUDIT") => AuthzAction::Audit,
        Some("CUSTOM") => {
            return Err(invalid(
                format!("{at}.action"),
                "action CUSTOM delegates the decision to an external authorizer (an extension provider); sluice has none and does not support it",
            ))
        }
        Some(other) => {
            return Err(invalid(format!("{at}.action"), format!("{other:?} is not an action (ALLOW, DENY, AUDIT)")))
        }
    };
    if spec.provider.is_some() {
        return Err(invalid(
            format!("{at}.provider"),
            "belongs to action CUSTOM, which sluice does not support",
        ));
    }
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, rule) in spec.rules.into_iter().enumerate() {
        rules.push(authz_rule(rule, &format!("{at}.rules[{i}]"))?);
    }
    let needs_requests = rules.iter().any(|r| {
        r.http_only
            || r.from.iter().any(AuthzSource::uses_remote_ip)
            || r.when.iter().any(|c| c.key == ConditionKey::RemoteIp)
    });
    Ok(Object::AuthorizationPolicy(std::sync::Arc::new(AuthorizationPolicy {
        namespace: meta.namespace,
        name: meta.name,
        selector: spec.selector.map(|s| s.match_labels).unwrap_or_default(),
        action,
        rules,
        needs_requests,
    })))
}

fn authz_rule(rule: Rule, at: &str) -> Result<AuthzRule, DocError> {
    let mut out = AuthzRule::default();
    for (i, from) in rule.from.into_iter().enumerate() {
        // A `from` without a source matches every source.
        let source = from.source.unwrap_or_default();
        out.from.push(authz_source(source, &format!("{at}.from[{i}].source"))?);
    }
    for (i, to) in rule.to.into_iter().enumerate() {
        let op = to.operation.unwrap_or_default();
        out.to.push(authz_operation(op, &format!("{at}.to[{i}].operation"))?);
    }
    for (i, c) in rule.when.into_iter().enumerate() {
        out.when.push(condition(c, &format!("{at}.when[{i}]"))?);
    }
    out.http_only = out.from.iter().any(AuthzSource::http_only)
        || out.to.iter().any(AuthzOperation::http_only)
        || out.when.iter().any(|c| c.key.http_only());
    Ok(out)
}

fn authz_source(s: Source, at: &str) -> Result<AuthzSource, DocError> {
    Ok(AuthzSource {
        principals: matches(&s.principals, &format!("{at}.principals"), strip_spiffe)?,
        not_principals: matches(&s.not_principals, &format!("{at}.notPrincipals"), strip_spiffe)?,
        request_principals: matches(&s.request_principals, &format!("{at}.requestPrincipals"), same)?,
        not_request_principals: matches(
            &s.not_request_principals,
            &format!("{at}.notRequestPrincipals"),
            same,
        )?,
        namespaces: matches(&s.namespaces, &format!("{at}.namespaces"), same)?,
        not_namespaces: matches(&s.not_namespaces, &format!("{at}.notNamespaces"), same)?,
        service_accounts: service_accounts(&s.service_accounts, &format!("{at}.serviceAccounts"))?,
        not_service_accounts: service_accounts(&s.not_service_accounts, &format!("{at}.notServiceAccounts"))?,
        ip_blocks: ip_blocks(&s.ip_blocks, &format!("{at}.ipBlocks"))?,
        not_ip_blocks: ip_blocks(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?,
        remote_ip_blocks: ip_blocks(&s.remote_ip_blocks, &format!("{at}.remoteIpBlocks"))?,
        not_remote_ip_blocks: ip_blocks(&s.not_remote_ip_blocks, &format!("{at}.notRemoteIpBlocks"))?,
    })
}

fn authz_operation(op: Operation, at: &str) -> Result<AuthzOperation, DocError> {
    Ok(AuthzOperation {
        hosts: matches(&op.hosts, &format!("{at}.hosts"), same)?.into_iter().map(lower).collect(),
        not_hosts: matches(&op.not_hosts, &format!("{at}.notHosts"), same)?.into_iter().map(lower).collect(),
        ports: ports(&op.ports, &format!("{at}.ports"))?,
        not_ports: ports(&op.not_ports, &format!("{at}.notPorts"))?,
        methods: matches(&op.methods, &format!("{at}.methods"), same)?,
        not_methods: matches(&op.not_methods, &format!("{at}.notMethods"), same)?,
        paths: paths(&op.paths, &format!("{at}.paths"))?,
        not_paths: paths(&op.not_paths, &format!("{at}.notPaths"))?,
    })
}

fn condition(c: Condition, at: &str) -> Result<AuthzCondition, DocError> {
    let key = ConditionKey::parse(&c.key).map_err(|reason| invalid(format!("{at}.key"), reason))?;
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(invalid(at, format!("condition {} needs values or notValues", c.key)));
    }
    let typed = |list: &[String], field: &str| -> Result<ConditionValues, DocError> {
        let at = format!("{at}.{field}");
        Ok(match key.value_kind() {
            ValueKind::Ip => ConditionValues::Ips(ip_blocks(list, &at)?),
            ValueKind::Port => ConditionValues::Ports(
                list.iter()
                    .enumerate()
                    .map(|(i, s)| {
                        PortValue::Text(s.clone()).port().map_err(|r| invalid(format!("{at}[{i}]"), r))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            ValueKind::Text => {
                let normalize =
                    if matches!(key, ConditionKey::SourcePrincipal) { strip_spiffe } else { same };
                ConditionValues::Text(matches(list, &at, normalize)?)
            }
        })
    };
    let values = typed(&c.values, "values")?;
    let not_values = typed(&c.not_values, "notValues")?;
    Ok(AuthzCondition { key, values, not_values })
}

fn same(s: &str) -> &str {
    s
}

/// Principals as Istio writes them (`cluster.local/ns/a/sa/b`) or as full SPIFFE IDs.
fn strip_spiffe(s: &str) -> &str {
    s.strip_prefix("spiffe://").unwrap_or(s)
}

fn lower(m: StringMatch) -> StringMatch {
    match m {
        StringMatch::Any => StringMatch::Any,
        StringMatch::Exact(s) => StringMatch::Exact(s.to_ascii_lowercase()),
        StringMatch::Prefix(s) => StringMatch::Prefix(s.to_ascii_lowercase()),
        StringMatch::Suffix(s) => StringMatch::Suffix(s.to_ascii_lowercase()),
    }
}

fn matches(list: &[String], at: &str, normalize: fn(&str) -> &str) -> Result<Vec<StringMatch>, DocError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| StringMatch::parse(normalize(s)).map_err(|r| invalid(format!("{at}[{i}]"), r)))
        .collect()
}

fn paths(list: &[String], at: &str) -> Result<Vec<StringMatch>, DocError> {
    for (i, p) in list.iter().enumerate() {
        if p.contains("{*}") || p.contains("{**}") {
            return Err(invalid(
                format!("{at}[{i}]"),
                format!("{p:?}: path templates ({{*}}, {{**}}) are not supported; use a prefix (\"/a/*\") or suffix (\"*/b\") form"),
            ));
        }
    }
    matches(list, at, same)
}

fn ports(list: &[PortValue], at: &str) -> Result<Vec<u16>, DocError> {
    list.iter().enumerate().map(|(i, p)| p.port().map_err(|r| invalid(format!("{at}[{i}]"), r))).collect()
}

fn ip_blocks(list: &[String], at: &str) -> Result<Vec<IpNet>, DocError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| parse_ip_net(s).map_err(|r| invalid(format!("{at}[{i}]"), r)))
        .collect()
}

/// `<namespace>/<service account>`, both DNS labels.
fn service_accounts(list: &[String], at: &str) -> Result<Vec<String>, DocError> {
    use crate::discovery::fields::NameRule;
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let ok = s.split_once('/').is_some_and(|(ns, sa)| {
                NameRule::Dns1123Label.check(ns).is_none() && NameRule::Dns1123Subdomain.check(sa).is_none()
            });
            if ok {
                Ok(s.clone())
            } else {
                Err(invalid(
                    format!("{at}[{i}]"),
                    format!("{s:?} is not <namespace>/<service account> (no wildcards)"),
                ))
            }
        })
        .collect()
}
