//! L4 authorization: Istio's AuthorizationPolicy semantics, evaluated per connection at the
//! destination.
//!
//! [`authorize`] is pure: it reads the policies a [`Model`] snapshot precomputed (per namespace,
//! in name order) and allocates nothing unless a policy decides (to name it in the
//! [`Decision`]). The rules, as in Istio:
//!
//! 1. The policies that apply are those of the destination pod's namespace whose selector
//!    matches the pod's labels (no selector: every pod of the namespace).
//! 2. If any applicable DENY policy matches the connection, it is denied.
//! 3. Else, if at least one ALLOW policy applies, the connection is allowed only if one of them
//!    matches. An ALLOW policy with no rules matches nothing ("allow-nothing").
//! 4. Else it is allowed.
//!
//! A policy matches if any of its rules matches; a rule matches if every part it has matches
//! (`from`: any of its sources; `to`: any of its operations; a rule `{}` matches everything);
//! a source matches if every non-empty list in it matches. A plaintext client has no principal
//! and no namespace: it never matches `principals`/`namespaces` and always matches
//! `notPrincipals`/`notNamespaces`.
//!
//! Not supported: Istio's root namespace (`istio-system` by default), whose policies apply to
//! every workload of the mesh. sluice applies only the destination namespace's own policies; a
//! policy in `istio-system` governs the pods of `istio-system` only. Trust-domain aliases are
//! not applied either: a principal matches the client's SPIFFE ID as written.

use crate::discovery::{
    AuthorizationPolicy, AuthzAction, AuthzOperation, AuthzSource, Model, Pod, StringMatch,
};

const SPIFFE_SCHEME: &str = "spiffe://";

/// Who opened a connection, as far as authorization is concerned.
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
}

/// `spiffe://<td>/ns/<namespace>/...` → `<namespace>`.
fn namespace_of(id: &str) -> Option<&str> {
    let (_trust_domain, path) = id.strip_prefix(SPIFFE_SCHEME)?.split_once('/')?;
    let (ns, _) = path.strip_prefix("ns/")?.split_once('/')?;
    (!ns.is_empty()).then_some(ns)
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
}

impl Decision {
    pub const DENIED_BY_POLICY: &'static str = "denied by a DENY policy";
    pub const NO_ALLOW_MATCH: &'static str = "no ALLOW policy matches";
    pub const ALLOWED_BY_POLICY: &'static str = "allowed by an ALLOW policy";
    pub const NO_POLICY: &'static str = "no ALLOW policy applies";

    fn by(policy: &AuthorizationPolicy, allowed: bool, reason: &'static str) -> Decision {
        Decision { allowed, policy: Some(format!("{}/{}", policy.namespace, policy.name)), reason }
    }
}

/// Decides whether `source` may connect to port `port` of pod `dest`, from the policies in
/// `model` (see the module documentation for the rules).
pub fn authorize(model: &Model, dest: &Pod, port: u16, source: &Source<'_>) -> Decision {
    let policies = model.authorization_policies(&dest.namespace);
    let applying = |action| policies.iter().filter(move |p| p.action == action && p.selects(&dest.labels));

    if let Some(p) = applying(AuthzAction::Deny).find(|p| policy_matches(p, port, source)) {
        return Decision::by(p, false, Decision::DENIED_BY_POLICY);
    }
    let mut any_allow = false;
    for p in applying(AuthzAction::Allow) {
        if policy_matches(p, port, source) {
            return Decision::by(p, true, Decision::ALLOWED_BY_POLICY);
        }
        any_allow = true;
    }
    if any_allow {
        Decision { allowed: false, policy: None, reason: Decision::NO_ALLOW_MATCH }
    } else {
        Decision { allowed: true, policy: None, reason: Decision::NO_POLICY }
    }
}

/// Whether a connection matches a policy's rules (whatever its action). No rules: never.
pub fn policy_matches(policy: &AuthorizationPolicy, port: u16, source: &Source<'_>) -> bool {
    policy.rules.iter().any(|rule| {
        (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, source)))
            && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, port)))
    })
}

fn source_matches(s: &AuthzSource, source: &Source<'_>) -> bool {
    // Policies hold principals without the scheme, as Istio writes them.
    let principal = source.principal.map(|p| p.strip_prefix(SPIFFE_SCHEME).unwrap_or(p));
    condition(&s.principals, &s.not_principals, principal)
        && condition(&s.namespaces, &s.not_namespaces, source.namespace)
}

/// A `values`/`notValues` pair: a non-empty `values` needs a value that matches one of them;
/// `not_values` needs the value to match none of them (an absent value matches none).
fn condition(values: &[StringMatch], not_values: &[StringMatch], value: Option<&str>) -> bool {
    let any = |list: &[StringMatch], v: &str| list.iter().any(|m| m.matches(v));
    (values.is_empty() || value.is_some_and(|v| any(values, v))) && !value.is_some_and(|v| any(not_values, v))
}

fn operation_matches(o: &AuthzOperation, port: u16) -> bool {
    (o.ports.is_empty() || o.ports.contains(&port)) && !o.not_ports.contains(&port)
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
            let d = authorize(m, dest, port, &src(principal));
            let want = Decision { allowed, policy: policy.map(str::to_owned), reason };
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
