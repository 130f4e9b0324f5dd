//! Authorization: Istio's AuthorizationPolicy semantics, evaluated at the destination, per
//! connection (TCP) and per HTTP request.
//!
//! [`authorize`] is pure: it reads the policies a [`Model`] snapshot precomputed and allocates
//! nothing unless a policy decides (to name it in the [`Decision`]). The rules, as in Istio:
//!
//! 1. The policies that apply to a pod are those of its namespace, and those of the root
//!    namespace (`--root-namespace`, `istio-system` by default, which apply mesh-wide), whose
//!    selector matches the pod's labels (no selector: every pod).
//! 2. AUDIT policies that match are reported (logged and counted) and decide nothing.
//! 3. If any applicable DENY policy matches, the request is denied.
//! 4. Else, if at least one ALLOW policy applies, it is allowed only if one of them matches.
//!    An ALLOW policy with no rules matches nothing ("allow-nothing").
//! 5. Else it is allowed. (CUSTOM, which Istio evaluates first, is refused at parse time.)
//!
//! A policy matches if any of its rules matches; a rule matches if every part it has matches
//! (`from`: any of its sources; `to`: any of its operations; `when`: every condition); a source
//! or operation matches if every non-empty field in it matches. A plaintext client has no
//! principal and no namespace: it never matches `principals`/`namespaces` and always matches
//! `notPrincipals`/`notNamespaces`; likewise a request without a validated JWT for
//! `requestPrincipals` and `request.auth.*`.
//!
//! **TCP traffic** (no HTTP request: opaque bytes, or a pod no L7 rule selects) has no method,
//! path, host, header or JWT. Istio then ignores the HTTP-only fields, in the direction that is
//! safe for each action: an ALLOW rule that uses one never matches (a smaller allow), while in a
//! DENY or AUDIT rule the HTTP-only fields are dropped and the rest must match (a wider deny: a
//! DENY rule with only `methods: ["GET"]` denies every TCP connection).
//!
//! Not supported: trust-domain aliases (a principal matches the client's SPIFFE ID as written).

use std::net::IpAddr;

use http::HeaderMap;

use crate::discovery::traffic::IpNet;
use crate::discovery::{
    AuthorizationPolicy, AuthzAction, AuthzCondition, AuthzOperation, AuthzSource, ConditionKey,
    ConditionValues, Model, Pod, StringMatch,
};
use crate::jwt::validate::{string_or_list, Verified};

const SPIFFE_SCHEME: &str = "spiffe://";

/// Who opened a connection, as far as its certificate says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Source<'a> {
    /// The client's full SPIFFE ID (`spiffe://cluster.local/ns/a/sa/b`) from its verified
    /// certificate; `None` for a plaintext connection.
    pub principal: Option<&'a str>,
    /// The namespace in that SPIFFE ID; `None` for a plaintext connection.
    pub namespace: Option<&'a str>,
}

impl<'a> Source<'a> {
    /// A plaintext client (no certificate, hence no identity).
    pub const PLAINTEXT: Source<'static> = Source { principal: None, namespace: None };

    /// A mutual-TLS client with SPIFFE ID `principal`; the namespace is read from the ID's
    /// `/ns/<namespace>/` path segment (none if the ID has no such segment).
    pub fn mtls(principal: &'a str) -> Source<'a> {
        Source { principal: Some(principal), namespace: namespace_of(principal) }
    }

    /// `<namespace>/<service account>` of a SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`.
    fn service_account(&self) -> Option<(&'a str, &'a str)> {
        let (_td, path) = self.principal?.strip_prefix(SPIFFE_SCHEME)?.split_once('/')?;
        let (ns, rest) = path.strip_prefix("ns/")?.split_once('/')?;
        let sa = rest.strip_prefix("sa/")?;
        (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then_some((ns, sa))
    }
}

/// `spiffe://<td>/ns/<namespace>/...` → `<namespace>`.
fn namespace_of(id: &str) -> Option<&str> {
    let (_trust_domain, path) = id.strip_prefix(SPIFFE_SCHEME)?.split_once('/')?;
    let (ns, _) = path.strip_prefix("ns/")?.split_once('/')?;
    (!ns.is_empty()).then_some(ns)
}

/// What an HTTP request adds to a connection's attributes.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path without its query, normalized ([`super::request::normalize_path`]).
    pub path: &'a str,
    /// The authority (Host / `:authority`), lower-cased, port included when the client sent one.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// `remote.ip`: the last X-Forwarded-For address, else the peer's.
    pub remote_ip: Option<IpAddr>,
    /// The request's validated JWT, if it had one.
    pub auth: Option<&'a Verified>,
}

/// Everything a policy can look at, for one connection or one request.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    pub source: Source<'a>,
    /// The peer address (`source.ip`, `ipBlocks`).
    pub source_ip: Option<IpAddr>,
    /// The address and port the client dialled (`destination.ip`, `destination.port`, `ports`).
    pub dest_ip: Option<IpAddr>,
    pub dest_port: u16,
    /// `None`: TCP semantics.
    pub request: Option<Request<'a>>,
}

impl<'a> Attributes<'a> {
    /// A connection (TCP semantics) from `source` to `port`.
    pub fn tcp(source: Source<'a>, port: u16) -> Attributes<'a> {
        Attributes { source, source_ip: None, dest_ip: None, dest_port: port, request: None }
    }

    fn remote_ip(&self) -> Option<IpAddr> {
        match &self.request {
            Some(r) => r.remote_ip.or(self.source_ip),
            None => self.source_ip,
        }
    }
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided: the matching DENY policy, or the matching
    /// ALLOW policy. `None` when no single policy decided (no policy applies, or ALLOW
    /// policies apply and none matches).
    pub policy: Option<String>,
    /// One of the `Decision::*` reason constants, for logs and counters.
    pub reason: &'static str,
    /// `namespace/name` of the first AUDIT policy that matched, to be logged.
    pub audit: Option<String>,
}

impl Decision {
    pub const DENIED_BY_POLICY: &'static str = "denied by a DENY policy";
    pub const NO_ALLOW_MATCH: &'static str = "no ALLOW policy matches";
    pub const ALLOWED_BY_POLICY: &'static str = "allowed by an ALLOW policy";
    pub const NO_POLICY: &'static str = "no ALLOW policy applies";

    fn by(policy: &AuthorizationPolicy, allowed: bool, reason: &'static str) -> Decision {
        Decision { allowed, policy: Some(name(policy)), reason, audit: None }
    }
}

fn name(p: &AuthorizationPolicy) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// The policies that apply to `dest`: the root namespace's (mesh-wide), then its namespace's,
/// each list by name, those whose selector matches the pod.
pub fn applicable<'m>(
    model: &'m Model,
    root_namespace: &str,
    dest: &'m Pod,
) -> impl Iterator<Item = &'m std::sync::Arc<AuthorizationPolicy>> + 'm {
    let root =
        if dest.namespace == root_namespace { &[][..] } else { model.authorization_policies(root_namespace) };
    root.iter().chain(model.authorization_policies(&dest.namespace)).filter(move |p| p.selects(&dest.labels))
}

/// Whether some policy that applies to `dest` must see HTTP requests (see
/// [`AuthorizationPolicy::needs_requests`]).
pub fn needs_requests(model: &Model, root_namespace: &str, dest: &Pod) -> bool {
    applicable(model, root_namespace, dest).any(|p| p.needs_requests)
}

/// Decides whether a connection or request described by `attrs` may reach pod `dest`, from the
/// policies in `model` (see the module documentation for the rules).
pub fn authorize(model: &Model, root_namespace: &str, dest: &Pod, attrs: &Attributes<'_>) -> Decision {
    let mut audit = None;
    let mut deny = None;
    let mut any_allow = false;
    let mut allow = None;
    for p in applicable(model, root_namespace, dest) {
        match p.action {
            AuthzAction::Audit => {
                if audit.is_none() && policy_matches(p, attrs) {
                    audit = Some(name(p));
                }
            }
            AuthzAction::Deny => {
                if deny.is_none() && policy_matches(p, attrs) {
                    deny = Some(p);
                }
            }
            AuthzAction::Allow => {
                any_allow = true;
                if allow.is_none() && deny.is_none() && policy_matches(p, attrs) {
                    allow = Some(p);
                }
            }
        }
    }
    let mut decision = if let Some(p) = deny {
        Decision::by(p, false, Decision::DENIED_BY_POLICY)
    } else if let Some(p) = allow {
        Decision::by(p, true, Decision::ALLOWED_BY_POLICY)
    } else if any_allow {
        Decision { allowed: false, policy: None, reason: Decision::NO_ALLOW_MATCH, audit: None }
    } else {
        Decision { allowed: true, policy: None, reason: Decision::NO_POLICY, audit: None }
    };
    decision.audit = audit;
    decision
}

/// Whether a connection or request matches a policy's rules (whatever its action). No rules:
/// never.
pub fn policy_matches(policy: &AuthorizationPolicy, attrs: &Attributes<'_>) -> bool {
    policy.rules.iter().any(|rule| {
        // TCP: an ALLOW rule that needs HTTP never matches; in DENY and AUDIT rules the HTTP
        // fields are ignored (each matcher below answers `true` for them without a request).
        if attrs.request.is_none() && rule.http_only && policy.action == AuthzAction::Allow {
            return false;
        }
        (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, attrs)))
            && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, attrs)))
            && rule.when.iter().all(|c| condition_matches(c, attrs))
    })
}

fn source_matches(s: &AuthzSource, attrs: &Attributes<'_>) -> bool {
    // Policies hold principals without the scheme, as Istio writes them.
    let principal = attrs.source.principal.map(|p| p.strip_prefix(SPIFFE_SCHEME).unwrap_or(p));
    let account = attrs.source.service_account().map(|(ns, sa)| (ns, sa));
    let account_in = |list: &[String]| {
        account.is_some_and(|(ns, sa)| list.iter().any(|e| e.split_once('/') == Some((ns, sa))))
    };
    let remote = attrs.remote_ip();
    strings(&s.principals, &s.not_principals, principal)
        && strings(&s.namespaces, &s.not_namespaces, attrs.source.namespace)
        && (s.service_accounts.is_empty() || account_in(&s.service_accounts))
        && !account_in(&s.not_service_accounts)
        && ips(&s.ip_blocks, &s.not_ip_blocks, attrs.source_ip)
        && ips(&s.remote_ip_blocks, &s.not_remote_ip_blocks, remote)
        && match &attrs.request {
            Some(r) => strings(
                &s.request_principals,
                &s.not_request_principals,
                r.auth.map(|a| a.principal.as_str()),
            ),
            None => true,
        }
}

fn operation_matches(o: &AuthzOperation, attrs: &Attributes<'_>) -> bool {
    let port = attrs.dest_port;
    if !((o.ports.is_empty() || o.ports.contains(&port)) && !o.not_ports.contains(&port)) {
        return false;
    }
    let Some(r) = &attrs.request else {
        return true; // hosts, methods and paths are HTTP-only: ignored (see policy_matches)
    };
    let host_in = |list: &[StringMatch]| list.iter().any(|m| host_matches(m, r.host));
    (o.hosts.is_empty() || host_in(&o.hosts))
        && !host_in(&o.not_hosts)
        && strings(&o.methods, &o.not_methods, Some(r.method))
        && strings(&o.paths, &o.not_paths, Some(r.path))
}

/// A host written without a port matches the authority whatever its port; with one, exactly.
fn host_matches(m: &StringMatch, authority: &str) -> bool {
    let with_port = match m {
        StringMatch::Any => false,
        StringMatch::Exact(s) | StringMatch::Prefix(s) | StringMatch::Suffix(s) => s.contains(':'),
    };
    if with_port {
        m.matches(authority)
    } else {
        m.matches(super::request::host_without_port(authority))
    }
}

fn condition_matches(c: &AuthzCondition, attrs: &Attributes<'_>) -> bool {
    let req = attrs.request.as_ref();
    let auth = req.and_then(|r| r.auth);
    match &c.key {
        ConditionKey::SourceIp => ip_condition(c, attrs.source_ip),
        ConditionKey::RemoteIp => ip_condition(c, attrs.remote_ip()),
        ConditionKey::DestinationIp => ip_condition(c, attrs.dest_ip),
        ConditionKey::DestinationPort => match (&c.values, &c.not_values) {
            (ConditionValues::Ports(v), ConditionValues::Ports(n)) => {
                (v.is_empty() || v.contains(&attrs.dest_port)) && !n.contains(&attrs.dest_port)
            }
            _ => false,
        },
        ConditionKey::SourceNamespace => text_condition(c, attrs.source.namespace.into_iter()),
        ConditionKey::SourcePrincipal => text_condition(
            c,
            attrs.source.principal.map(|p| p.strip_prefix(SPIFFE_SCHEME).unwrap_or(p)).into_iter(),
        ),
        // HTTP-only keys: ignored without a request (see policy_matches).
        _ if req.is_none() => true,
        ConditionKey::RequestHeader(name) => {
            let r = req.expect("checked above");
            let mut values =
                r.headers.get_all(name.as_str()).iter().filter_map(|v| v.to_str().ok()).peekable();
            if values.peek().is_none() {
                return text_condition(c, std::iter::empty());
            }
            // Envoy matches a repeated header as its values joined by ','.
            let joined = values.collect::<Vec<_>>().join(",");
            text_condition(c, std::iter::once(joined.as_str()))
        }
        ConditionKey::RequestAuthPrincipal => {
            text_condition(c, auth.map(|a| a.principal.as_str()).into_iter())
        }
        ConditionKey::RequestAuthPresenter => {
            text_condition(c, auth.and_then(|a| a.presenter.as_deref()).into_iter())
        }
        ConditionKey::RequestAuthAudiences => {
            text_condition(c, auth.into_iter().flat_map(|a| a.audiences.iter().map(String::as_str)))
        }
        ConditionKey::RequestAuthClaims(path) => {
            let claim = auth.and_then(|a| {
                let mut v = a.claims.get(&path[0])?;
                for p in &path[1..] {
                    v = v.get(p)?;
                }
                Some(v)
            });
            let values = string_or_list(claim);
            text_condition(c, values.iter().map(String::as_str))
        }
    }
}

/// A text condition over an attribute with zero or more values: some value must match one of
/// `values` (when given), and none may match `notValues`.
fn text_condition<'v>(c: &AuthzCondition, values: impl Iterator<Item = &'v str> + Clone) -> bool {
    let (ConditionValues::Text(want), ConditionValues::Text(not)) = (&c.values, &c.not_values) else {
        return false;
    };
    let any = |list: &[StringMatch]| values.clone().any(|v| list.iter().any(|m| m.matches(v)));
    (want.is_empty() || any(want)) && !any(not)
}

fn ip_condition(c: &AuthzCondition, ip: Option<IpAddr>) -> bool {
    match (&c.values, &c.not_values) {
        (ConditionValues::Ips(v), ConditionValues::Ips(n)) => ips(v, n, ip),
        _ => false,
    }
}

/// A `values`/`notValues` pair: a non-empty `values` needs a value that matches one of them;
/// `not_values` needs the value to match none of them (an absent value matches none).
fn strings(values: &[StringMatch], not_values: &[StringMatch], value: Option<&str>) -> bool {
    let any = |list: &[StringMatch], v: &str| list.iter().any(|m| m.matches(v));
    (values.is_empty() || value.is_some_and(|v| any(values, v))) && !value.is_some_and(|v| any(not_values, v))
}

fn ips(blocks: &[IpNet], not_blocks: &[IpNet], ip: Option<IpAddr>) -> bool {
    let any = |list: &[IpNet], ip: IpAddr| list.iter().any(|n| n.contains(ip));
    (blocks.is_empty() || ip.is_some_and(|ip| any(blocks, ip))) && !ip.is_some_and(|ip| any(not_blocks, ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Format;
    use std::sync::Arc;

    const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {sluice.dev/mesh: enabled}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u-web, labels: {app: web, version: v1}}
spec: {serviceAccountName: web, nodeName: node-2}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, uid: u-api, labels: {app: api}}
spec: {serviceAccountName: api, nodeName: node-2}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: data, uid: u-db, labels: {app: web}}
status: {podIP: 10.244.2.12}
"#;

    const ROOT: &str = "istio-system";
    const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const DEV: &str = "spiffe://cluster.local/ns/dev/sa/tester";
    const BAR: &str = "spiffe://cluster.local/ns/team-a/sa/bar";
    const FOO: &str = "spiffe://cluster.local/ns/foo/sa/anything";
    const OTHER_TD: &str = "spiffe://example.org/ns/prod-prod/sa/web";

    /// A model of the pods above plus `policies` (YAML documents, `---`-separated).
    fn model(policies: &str) -> Model {
        let text = format!("{PODS}---\n{policies}");
        Model::from_manifest(&text, Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn pod<'m>(m: &'m Model, ns: &str, name: &str) -> &'m Arc<Pod> {
        m.pod(ns, name).unwrap()
    }

    fn policy(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  \
             namespace: shop\nspec:\n{spec}---\n"
        )
    }

    fn src(principal: Option<&str>) -> Source<'_> {
        principal.map_or(Source::PLAINTEXT, Source::mtls)
    }

    /// (source principal, destination port) → (allowed, deciding policy, reason).
    type Case<'a> = (Option<&'a str>, u16, bool, Option<&'a str>, &'static str);

    /// Asserts each case.
    #[track_caller]
    fn table(m: &Model, dest: &Pod, cases: &[Case<'_>]) {
        for &(principal, port, allowed, policy, reason) in cases {
            let d = authorize(m, ROOT, dest, &Attributes::tcp(src(principal), port));
            let want = Decision { allowed, policy: policy.map(str::to_owned), reason, audit: None };
            assert_eq!(d, want, "{principal:?} → {}/{}:{port}", dest.namespace, dest.name);
        }
    }

    const ALLOWED: &str = Decision::ALLOWED_BY_POLICY;
    const DENIED: &str = Decision::DENIED_BY_POLICY;
    const NO_MATCH: &str = Decision::NO_ALLOW_MATCH;
    const NONE: &str = Decision::NO_POLICY;

    #[test]
    fn source_from_spiffe_id() {
        assert_eq!(Source::mtls(FRONTEND), Source { principal: Some(FRONTEND), namespace: Some("shop") });
        assert_eq!(Source::mtls("spiffe://td/ns//sa/x").namespace, None);
        assert_eq!(Source::mtls("spiffe://td/other/path").namespace, None);
        assert_eq!(Source::mtls("cluster.local/ns/a/sa/b").namespace, None, "not a SPIFFE ID");
        assert_eq!(Source::PLAINTEXT, Source::default());
    }

    #[test]
    fn no_policy_allows_everything() {
        let m = model("");
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[(Some(DEV), 80, true, None, NONE), (None, 80, true, None, NONE)],
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let m = model(&format!(
            "{}{}",
            policy("allow-all", "  rules:\n  - {}\n"),
            policy(
                "deny-dev",
                "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [dev]\n"
            ),
        ));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[
                (Some(DEV), 8080, false, Some("shop/deny-dev"), DENIED),
                (Some(FRONTEND), 8080, true, Some("shop/allow-all"), ALLOWED),
                // A plaintext client has no namespace: the DENY does not match it.
                (None, 8080, true, Some("shop/allow-all"), ALLOWED),
            ],
        );
    }

    #[test]
    fn selector_limits_a_policy_to_matching_pods_of_its_namespace() {
        let m = model(&policy(
            "deny-dev-web",
            "  selector:\n    matchLabels: {app: web}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [dev]\n",
        ));
        table(&m, pod(&m, "shop", "web-1"), &[(Some(DEV), 80, false, Some("shop/deny-dev-web"), DENIED)]);
        // Wrong labels.
        table(&m, pod(&m, "shop", "api-1"), &[(Some(DEV), 80, true, None, NONE)]);
        // Right labels, other namespace: policies only apply in their own namespace.
        table(&m, pod(&m, "data", "db-1"), &[(Some(DEV), 80, true, None, NONE)]);

        let m = model(&policy(
            "both-labels",
            "  selector:\n    matchLabels: {app: web, version: v2}\n  rules:\n  - {}\n",
        ));
        table(&m, pod(&m, "shop", "web-1"), &[(Some(DEV), 80, true, None, NONE)]);
    }

    #[test]
    fn allow_nothing_denies_everything_until_something_is_allowed() {
        let m = model(&policy("allow-nothing", "  {}\n"));
        let web = pod(&m, "shop", "web-1");
        table(&m, web, &[(Some(FRONTEND), 8080, false, None, NO_MATCH), (None, 8080, false, None, NO_MATCH)]);
        // Istio's "allow-nothing, then allow by principal and port".
        let m = model(&format!(
            "{}{}",
            policy("allow-nothing", "  {}\n"),
            policy(
                "web-viewer",
                "  selector:\n    matchLabels: {app: web}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/frontend]\n    to:\n    - operation:\n        ports: [\"8080\"]\n",
            )
        ));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[
                (Some(FRONTEND), 8080, true, Some("shop/web-viewer"), ALLOWED),
                (Some(FRONTEND), 9090, false, None, NO_MATCH),
                (Some(DEV), 8080, false, None, NO_MATCH),
                (None, 8080, false, None, NO_MATCH),
            ],
        );
        // The api pod only has allow-nothing.
        table(&m, pod(&m, "shop", "api-1"), &[(Some(FRONTEND), 8080, false, None, NO_MATCH)]);
    }

    #[test]
    fn deny_without_rules_denies_nothing() {
        let m = model(&policy("deny-empty", "  action: DENY\n"));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[(Some(DEV), 80, true, None, NONE), (None, 80, true, None, NONE)],
        );
        let m = model(&policy("deny-all", "  action: DENY\n  rules:\n  - {}\n"));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[
                (Some(DEV), 80, false, Some("shop/deny-all"), DENIED),
                (None, 80, false, Some("shop/deny-all"), DENIED),
            ],
        );
    }

    #[test]
    fn principal_and_namespace_wildcards() {
        let allow = |name: &str, field: &str, values: &str| {
            model(&policy(name, &format!("  rules:\n  - from:\n    - source:\n        {field}: {values}\n")))
        };
        let any = allow("any", "principals", "[\"*\"]");
        table(
            &any,
            pod(&any, "shop", "web-1"),
            &[
                (Some(DEV), 1, true, Some("shop/any"), ALLOWED),
                (Some(OTHER_TD), 1, true, Some("shop/any"), ALLOWED),
                (None, 1, false, None, NO_MATCH),
            ],
        );
        let prefix = allow("prefix", "principals", "[\"cluster.local/ns/foo/*\"]");
        table(
            &prefix,
            pod(&prefix, "shop", "web-1"),
            &[(Some(FOO), 1, true, Some("shop/prefix"), ALLOWED), (Some(DEV), 1, false, None, NO_MATCH)],
        );
        let suffix = allow("suffix", "principals", "[\"*/sa/bar\"]");
        table(
            &suffix,
            pod(&suffix, "shop", "web-1"),
            &[(Some(BAR), 1, true, Some("shop/suffix"), ALLOWED), (Some(FOO), 1, false, None, NO_MATCH)],
        );
        // The full SPIFFE form in a policy means the same principal.
        let full = allow("full", "principals", "[\"spiffe://cluster.local/ns/shop/sa/frontend\"]");
        table(
            &full,
            pod(&full, "shop", "web-1"),
            &[(Some(FRONTEND), 1, true, Some("shop/full"), ALLOWED), (Some(DEV), 1, false, None, NO_MATCH)],
        );
        // Trust domains are part of the principal.
        let td = allow("td", "principals", "[\"cluster.local/ns/prod-prod/sa/web\"]");
        table(&td, pod(&td, "shop", "web-1"), &[(Some(OTHER_TD), 1, false, None, NO_MATCH)]);
        let ns = allow("ns", "namespaces", "[\"team-*\", \"*-prod\"]");
        table(
            &ns,
            pod(&ns, "shop", "web-1"),
            &[
                (Some(BAR), 1, true, Some("shop/ns"), ALLOWED),
                (Some(OTHER_TD), 1, true, Some("shop/ns"), ALLOWED),
                (Some(DEV), 1, false, None, NO_MATCH),
                (None, 1, false, None, NO_MATCH),
            ],
        );
        let any_ns = allow("any-ns", "namespaces", "[\"*\"]");
        table(
            &any_ns,
            pod(&any_ns, "shop", "web-1"),
            &[(Some(DEV), 1, true, Some("shop/any-ns"), ALLOWED), (None, 1, false, None, NO_MATCH)],
        );
    }

    #[test]
    fn plaintext_sources_match_only_negations() {
        // Istio's idiom for "mTLS only" as a policy: deny whatever has no principal.
        let m = model(&policy(
            "deny-plaintext",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]\n",
        ));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[(None, 80, false, Some("shop/deny-plaintext"), DENIED), (Some(DEV), 80, true, None, NONE)],
        );
        let m =
            model(&policy("not-shop", "  rules:\n  - from:\n    - source:\n        notNamespaces: [shop]\n"));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[
                (None, 80, true, Some("shop/not-shop"), ALLOWED),
                (Some(DEV), 80, true, Some("shop/not-shop"), ALLOWED),
                (Some(FRONTEND), 80, false, None, NO_MATCH),
            ],
        );
        let m = model(&policy(
            "not-dev",
            "  rules:\n  - from:\n    - source:\n        notPrincipals: [\"cluster.local/ns/dev/*\"]\n",
        ));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[(None, 80, true, Some("shop/not-dev"), ALLOWED), (Some(DEV), 80, false, None, NO_MATCH)],
        );
    }

    #[test]
    fn ports_and_not_ports() {
        let m = model(&format!(
            "{}{}",
            policy("allow-not-ssh", "  rules:\n  - to:\n    - operation:\n        notPorts: [\"22\"]\n"),
            policy(
                "deny-admin",
                "  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"9090\", 9091]\n"
            ),
        ));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[
                (Some(DEV), 80, true, Some("shop/allow-not-ssh"), ALLOWED),
                (None, 80, true, Some("shop/allow-not-ssh"), ALLOWED),
                (Some(DEV), 22, false, None, NO_MATCH),
                (Some(DEV), 9090, false, Some("shop/deny-admin"), DENIED),
                (Some(DEV), 9091, false, Some("shop/deny-admin"), DENIED),
            ],
        );
        // ports and notPorts together: in the first list and not in the second.
        let m = model(&policy("both", "  rules:\n  - to:\n    - operation:\n        ports: [\"80\", \"81\"]\n        notPorts: [\"81\"]\n"));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[(Some(DEV), 80, true, Some("shop/both"), ALLOWED), (Some(DEV), 81, false, None, NO_MATCH)],
        );
    }

    #[test]
    fn rules_or_sources_or_fields_and() {
        let m = model(&policy(
            "mixed",
            r#"  rules:
  - from:
    - source: {principals: [cluster.local/ns/shop/sa/frontend]}
    - source: {namespaces: [foo]}
    to:
    - operation: {ports: ["80"]}
    - operation: {ports: ["443"]}
  - from:
    - source:
        namespaces: [dev]
        notPrincipals: ["*/sa/tester"]
  - from:
    - source:
        namespaces: [team-a]
        principals: ["*/sa/bar"]
    to:
    - operation: {ports: ["7000"]}
"#,
        ));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[
                // Rule 1: either source, either port.
                (Some(FRONTEND), 80, true, Some("shop/mixed"), ALLOWED),
                (Some(FOO), 443, true, Some("shop/mixed"), ALLOWED),
                (Some(FRONTEND), 8080, false, None, NO_MATCH),
                // Rule 2: both fields of the source must match.
                (Some(DEV), 80, false, None, NO_MATCH),
                (Some("spiffe://cluster.local/ns/dev/sa/other"), 5, true, Some("shop/mixed"), ALLOWED),
                // Rule 3: source and port.
                (Some(BAR), 7000, true, Some("shop/mixed"), ALLOWED),
                (Some(BAR), 80, false, None, NO_MATCH),
            ],
        );
    }

    #[test]
    fn first_matching_policy_by_name_is_named() {
        let m = model(&format!(
            "{}{}",
            policy("b-deny", "  action: DENY\n  rules:\n  - {}\n"),
            policy("a-deny", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [dev]}\n"),
        ));
        table(
            &m,
            pod(&m, "shop", "web-1"),
            &[
                (Some(DEV), 80, false, Some("shop/a-deny"), DENIED),
                (Some(FOO), 80, false, Some("shop/b-deny"), DENIED),
            ],
        );
    }
}
