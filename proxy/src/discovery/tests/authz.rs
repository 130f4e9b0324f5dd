//! Peer authentication (the namespace annotation, Istio's PeerAuthentication) and
//! AuthorizationPolicy: parsing Istio's shapes, rejecting what sluice cannot enforce, and the
//! model's per-namespace lists.

use std::fs;

use super::fixtures;
use crate::discovery::manifest::{parse, Format};
use crate::discovery::*;

fn one(yaml: &str) -> Object {
    let mut objects = parse(yaml, Format::Yaml).unwrap_or_else(|e| panic!("parse failed: {e}"));
    assert_eq!(objects.len(), 1);
    objects.remove(0)
}

fn policy(yaml: &str) -> AuthorizationPolicy {
    match one(yaml) {
        Object::AuthorizationPolicy(p) => (*p).clone(),
        other => panic!("not a policy: {other:?}"),
    }
}

fn err(yaml: &str) -> String {
    match parse(yaml, Format::Yaml) {
        Ok(o) => panic!("expected an error, parsed {o:?}"),
        Err(e) => e.to_string(),
    }
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

// --- Peer authentication ---

#[test]
fn peer_auth_annotation_and_default() {
    let Object::Namespace(ns) = one(&fixtures::namespace_peer_auth("bank", "STRICT")) else { panic!() };
    assert_eq!(ns.peer_auth, PeerAuthMode::Strict);
    assert!(!ns.peer_auth.accepts_plaintext());
    let Object::Namespace(ns) = one(&fixtures::namespace_peer_auth("shop", "PERMISSIVE")) else { panic!() };
    assert_eq!(ns.peer_auth, PeerAuthMode::Permissive);
    let Object::Namespace(ns) = one(fixtures::NAMESPACE) else { panic!() };
    assert_eq!(ns.peer_auth, PeerAuthMode::Permissive, "absent means PERMISSIVE");
    assert!(ns.peer_auth.accepts_plaintext());

    let text = format!(
        "{}---\n{}",
        fixtures::namespace_peer_auth("bank", "STRICT"),
        fixtures::namespace_peer_auth("shop", "PERMISSIVE")
    );
    let m = Model::from_manifest(&text, Format::Yaml).unwrap();
    assert_eq!(m.peer_auth_mode("bank"), PeerAuthMode::Strict);
    assert_eq!(m.peer_auth_mode("shop"), PeerAuthMode::Permissive);
    assert_eq!(m.peer_auth_mode("unknown"), PeerAuthMode::Permissive);
    assert_eq!(PeerAuthMode::Strict.to_string(), "STRICT");
}

#[test]
fn peer_auth_rejects_other_values() {
    for bad in ["strict", "DISABLE", "\"\"", "UNSET"] {
        let e = err(&fixtures::namespace_peer_auth("bank", bad));
        let shown = bad.trim_matches('"');
        assert!(
            e.ends_with(&format!(
                "Namespace \"bank\": metadata.annotations[\"sluice.dev/peer-authentication\"]: \
                 {shown:?} is not a peer authentication mode (STRICT, PERMISSIVE)"
            )),
            "{e}"
        );
    }
}

// --- AuthorizationPolicy: accepted shapes ---

#[test]
fn allow_nothing_from_kubectl_output() {
    let p = policy(fixtures::ALLOW_NOTHING);
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "allow-nothing"));
    assert_eq!(p.action, AuthzAction::Allow);
    assert!(p.selector.is_empty() && p.rules.is_empty());
    // No spec at all is the same policy.
    let p = policy(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing}\n",
    );
    assert_eq!(p.namespace, "default");
    assert!(p.rules.is_empty() && p.action == AuthzAction::Allow);
}

#[test]
fn deny_from_namespace_v1beta1() {
    let p = policy(fixtures::DENY_FROM_NAMESPACE);
    assert_eq!(p.action, AuthzAction::Deny);
    assert_eq!(p.selector, Labels::from([("app".into(), "web".into())]));
    assert_eq!(p.rules.len(), 1);
    assert_eq!(p.rules[0].from.len(), 1);
    assert_eq!(p.rules[0].from[0].namespaces, [exact("dev")]);
    assert!(p.rules[0].to.is_empty());
}

#[test]
fn allow_by_principal_and_port() {
    let p = policy(fixtures::ALLOW_PRINCIPAL_PORT);
    assert_eq!(p.action, AuthzAction::Allow);
    let rule = &p.rules[0];
    assert_eq!(rule.from[0].principals, [exact("cluster.local/ns/shop/sa/frontend")]);
    assert_eq!(rule.to[0].ports, [8080, 9091]);
    assert!(rule.to[0].not_ports.is_empty());
}

#[test]
fn principal_forms_wildcards_and_integer_ports() {
    let p = policy(&fixtures::policy(
        "shop",
        "forms",
        r#"  rules:
  - from:
    - source:
        principals:
        - spiffe://cluster.local/ns/a/sa/b
        - cluster.local/ns/a/sa/c
        - "*"
        - cluster.local/ns/foo/*
        - "*/sa/bar"
        notPrincipals: ["spiffe://cluster.local/ns/a/*"]
        namespaces: ["*", "team-*", "*-prod", "web"]
        notNamespaces: [kube-system]
    to:
    - operation:
        ports: [8080, "9090"]
        notPorts: ["22"]
  - {}
"#,
    ));
    let s = &p.rules[0].from[0];
    assert_eq!(
        s.principals,
        [
            exact("cluster.local/ns/a/sa/b"),
            exact("cluster.local/ns/a/sa/c"),
            StringMatch::Any,
            StringMatch::Prefix("cluster.local/ns/foo/".into()),
            StringMatch::Suffix("/sa/bar".into()),
        ]
    );
    assert_eq!(s.not_principals, [StringMatch::Prefix("cluster.local/ns/a/".into())]);
    assert_eq!(
        s.namespaces,
        [
            StringMatch::Any,
            StringMatch::Prefix("team-".into()),
            StringMatch::Suffix("-prod".into()),
            exact("web")
        ]
    );
    assert_eq!(s.not_namespaces, [exact("kube-system")]);
    assert_eq!(p.rules[0].to[0].ports, [8080, 9090]);
    assert_eq!(p.rules[0].to[0].not_ports, [22]);
    // `{}` is a rule with no conditions (matches everything), distinct from no rule at all.
    assert_eq!(p.rules[1], AuthzRule::default());
    // Written back in the policy's own notation (admin API, logs).
    assert_eq!(s.principals[3].to_string(), "cluster.local/ns/foo/*");
    assert_eq!(serde_json::to_value(&s.principals[4]).unwrap(), "*/sa/bar");
}

#[test]
fn empty_lists_and_empty_entries_are_no_condition() {
    // Istio cannot tell an empty list from an absent one; an entry without source/operation
    // is an entry without conditions.
    let p = policy(&fixtures::policy(
        "shop",
        "empties",
        "  rules:\n  - from:\n    - {}\n    to:\n    - operation: {}\n      \n  - from: []\n    to: []\n    when: []\n",
    ));
    assert_eq!(p.rules[0].from, [AuthzSource::default()]);
    assert_eq!(p.rules[0].to, [AuthzOperation::default()]);
    assert_eq!(p.rules[1], AuthzRule::default());
}

#[test]
fn empty_selector_selects_every_pod() {
    let p = policy(&fixtures::policy("shop", "all", "  selector: {}\n  action: DENY\n  rules:\n  - {}\n"));
    assert!(p.selector.is_empty());
    assert!(p.selects(&Labels::new()));
    let p = policy(fixtures::DENY_FROM_NAMESPACE);
    assert!(p.selects(&Labels::from([("app".into(), "web".into()), ("v".into(), "1".into())])));
    assert!(!p.selects(&Labels::from([("app".into(), "api".into())])));
    assert!(!p.selects(&Labels::new()));
}

#[test]
fn istio_list_output() {
    let text = format!(
        "apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n{}{}",
        indent_item(fixtures::ALLOW_NOTHING),
        indent_item(fixtures::DENY_FROM_NAMESPACE)
    );
    let objects = parse(&text, Format::Yaml).unwrap();
    assert_eq!(objects.iter().map(Object::kind).collect::<Vec<_>>(), [Kind::AuthorizationPolicy; 2]);
}

/// A document as a `- ` list item.
fn indent_item(doc: &str) -> String {
    let mut out = String::new();
    for (i, line) in doc.trim_start_matches('\n').lines().enumerate() {
        out.push_str(if i == 0 { "- " } else { "  " });
        out.push_str(line);
        out.push('\n');
    }
    out
}


#[test]
fn http_attributes_are_parsed() {
    let p = policy(&fixtures::policy(
        "shop",
        "l7",
        r#"  rules:
  - to:
    - operation:
        methods: ["GET", "HEAD"]
        notMethods: ["DELETE"]
        paths: ["/api/*", "*/info", "/exact", "*"]
        notPaths: ["/api/admin*"]
        hosts: ["Reviews.Shop.svc.cluster.local", "*.example.com", "api:8080"]
        notHosts: ["Internal*"]
        ports: ["9080"]
  - from:
    - source:
        requestPrincipals: ["https://issuer.example/*", "*"]
        notRequestPrincipals: ["*/blocked"]
  - from:
    - source:
        namespaces: [shop]
"#,
    ));
    let op = &p.rules[0].to[0];
    assert_eq!(op.methods, [exact("GET"), exact("HEAD")]);
    assert_eq!(op.not_methods, [exact("DELETE")]);
    assert_eq!(
        op.paths,
        [
            StringMatch::Prefix("/api/".into()),
            StringMatch::Suffix("/info".into()),
            exact("/exact"),
            StringMatch::Any
        ]
    );
    assert_eq!(op.not_paths, [StringMatch::Prefix("/api/admin".into())]);
    // Hosts are compared case-insensitively: stored lower-cased.
    assert_eq!(
        op.hosts,
        [exact("reviews.shop.svc.cluster.local"), StringMatch::Suffix(".example.com".into()), exact("api:8080")]
    );
    assert_eq!(op.not_hosts, [StringMatch::Prefix("internal".into())]);
    assert_eq!(op.ports, [9080]);
    let s = &p.rules[1].from[0];
    assert_eq!(s.request_principals, [StringMatch::Prefix("https://issuer.example/".into()), StringMatch::Any]);
    assert_eq!(s.not_request_principals, [StringMatch::Suffix("/blocked".into())]);
    // Which rules need an HTTP request (and so which make the destination read requests).
    assert!(p.rules[0].http_only && p.rules[1].http_only && !p.rules[2].http_only);
    assert!(p.needs_requests);
    let l4 = policy(fixtures::ALLOW_PRINCIPAL_PORT);
    assert!(!l4.rules[0].http_only && !l4.needs_requests);
}

#[test]
fn conditions_ip_blocks_and_service_accounts_are_parsed() {
    let p = policy(&fixtures::policy(
        "shop",
        "when",
        r#"  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.0/8", "192.0.2.7"]
        notIpBlocks: ["10.1.0.0/16"]
        remoteIpBlocks: ["203.0.113.0/24", "2001:db8::/32"]
        notRemoteIpBlocks: ["203.0.113.9"]
        serviceAccounts: ["shop/frontend"]
        notServiceAccounts: ["shop/legacy"]
    when:
    - key: request.headers[X-Version]
      values: ["v1", "v2*"]
    - key: source.ip
      values: ["10.0.0.0/8"]
    - key: remote.ip
      notValues: ["198.51.100.1"]
    - key: source.namespace
      values: ["shop"]
    - key: source.principal
      values: ["spiffe://cluster.local/ns/shop/sa/frontend"]
    - key: request.auth.principal
      values: ["https://issuer.example/alice"]
    - key: request.auth.audiences
      values: ["bookinfo"]
    - key: request.auth.presenter
      values: ["web-app"]
    - key: request.auth.claims[groups]
      values: ["admins"]
    - key: request.auth.claims[realm][role]
      notValues: ["guest"]
    - key: destination.ip
      values: ["10.244.1.0/24"]
    - key: destination.port
      values: ["9080", "9090"]
"#,
    ));
    let rule = &p.rules[0];
    let s = &rule.from[0];
    assert_eq!(s.ip_blocks.iter().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.0/8", "192.0.2.7"]);
    assert_eq!(s.not_ip_blocks[0].to_string(), "10.1.0.0/16");
    assert_eq!(s.remote_ip_blocks[1].to_string(), "2001:db8::/32");
    assert_eq!(s.service_accounts, ["shop/frontend"]);
    assert_eq!(s.not_service_accounts, ["shop/legacy"]);
    let keys: Vec<String> = rule.when.iter().map(|c| c.key.to_string()).collect();
    assert_eq!(
        keys,
        [
            "request.headers[x-version]",
            "source.ip",
            "remote.ip",
            "source.namespace",
            "source.principal",
            "request.auth.principal",
            "request.auth.audiences",
            "request.auth.presenter",
            "request.auth.claims[groups]",
            "request.auth.claims[realm][role]",
            "destination.ip",
            "destination.port",
        ]
    );
    assert_eq!(rule.when[0].values, ConditionValues::Text(vec![exact("v1"), StringMatch::Prefix("v2".into())]));
    assert!(matches!(&rule.when[1].values, ConditionValues::Ips(v) if v.len() == 1));
    assert!(rule.when[2].values.is_empty());
    // Principals lose their scheme, as in from.source.
    assert_eq!(rule.when[4].values, ConditionValues::Text(vec![exact("cluster.local/ns/shop/sa/frontend")]));
    assert_eq!(rule.when[9].key, ConditionKey::RequestAuthClaims(vec!["realm".into(), "role".into()]));
    assert_eq!(rule.when[11].values, ConditionValues::Ports(vec![9080, 9090]));
    assert!(rule.http_only, "request.* keys are HTTP-only");
    assert!(p.needs_requests);
    // remote IPs alone need requests too (HTTP takes them from X-Forwarded-For), but are not
    // HTTP-only (TCP has a remote address as well).
    let p = policy(&fixtures::policy(
        "shop",
        "remote",
        "  rules:\n  - from:\n    - source:\n        remoteIpBlocks: [\"10.0.0.0/8\"]\n",
    ));
    assert!(!p.rules[0].http_only && p.needs_requests);
}

// --- AuthorizationPolicy: rejections ---

/// The error for a policy with this spec, after the object label.
fn policy_err(spec: &str) -> String {
    let e = err(&fixtures::policy("shop", "p", spec));
    let label = "AuthorizationPolicy \"shop/p\": ";
    let at = e.find(label).unwrap_or_else(|| panic!("no object label in {e}"));
    e[at + label.len()..].to_owned()
}

#[test]
fn bad_conditions_are_rejected() {
    let when = |key: &str, values: &str| {
        policy_err(&format!("  rules:\n  - when:\n    - key: {key}\n      {values}\n"))
    };
    assert!(
        when("request.method", "values: [GET]").starts_with("spec.rules[0].when[0].key: unknown condition key \"request.method\" (known: request.headers[NAME], source.ip"),
        "{}",
        when("request.method", "values: [GET]")
    );
    assert_eq!(
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", "values: [\"[update]\"]"),
        "spec.rules[0].when[0].key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\": experimental condition keys are Envoy filter metadata, which sluice does not have"
    );
    // Never silently unmatched: the destination has no SNI the condition could mean.
    let sni = when("connection.sni", "values: [\"*.shop.svc.cluster.local\"]");
    assert!(
        sni.starts_with("spec.rules[0].when[0].key: \"connection.sni\" is not supported: the destination sees sluice's node-to-node mTLS"),
        "{sni}"
    );
    assert_eq!(
        when("request.headers", "values: [a]"),
        "spec.rules[0].when[0].key: \"request.headers\": write a header condition as request.headers[<name>]"
    );
    assert_eq!(
        when("request.auth.claims[]", "values: [a]"),
        "spec.rules[0].when[0].key: \"request.auth.claims[]\": write a claim condition as request.auth.claims[<name>] (nested: [<a>][<b>])"
    );
    assert_eq!(when("source.ip", "values: []"), "spec.rules[0].when[0]: condition source.ip needs values or notValues");
    assert_eq!(
        when("source.ip", "values: [\"10.0.0.0/33\"]"),
        "spec.rules[0].when[0].values[0]: \"10.0.0.0/33\" is not an IP address or CIDR block (e.g. 10.0.0.1 or 10.0.0.0/8)"
    );
    assert_eq!(
        when("destination.port", "notValues: [\"http\"]"),
        "spec.rules[0].when[0].notValues[0]: \"http\" is not a port number (1-65535)"
    );
    let e = policy_err("  rules:\n  - from:\n    - source:\n        ipBlocks: [\"dev\"]\n");
    assert_eq!(
        e,
        "spec.rules[0].from[0].source.ipBlocks[0]: \"dev\" is not an IP address or CIDR block (e.g. 10.0.0.1 or 10.0.0.0/8)"
    );
    let e = policy_err("  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"web\"]\n");
    assert_eq!(
        e,
        "spec.rules[0].from[0].source.serviceAccounts[0]: \"web\" is not <namespace>/<service account> (no wildcards)"
    );
    let e = policy_err("  rules:\n  - to:\n    - operation:\n        paths: [\"/api/{*}/info\"]\n");
    assert!(e.starts_with("spec.rules[0].to[0].operation.paths[0]: \"/api/{*}/info\": path templates"), "{e}");
    let e = policy_err("  rules:\n  - to:\n    - operation:\n        methods: [\"G*T\"]\n");
    assert_eq!(
        e,
        "spec.rules[0].to[0].operation.methods[0]: \"G*T\": a wildcard '*' may only stand alone, at the start or at the end (as in Istio)"
    );
}

#[test]
fn actions_and_target_refs() {
    assert_eq!(policy(&fixtures::policy("shop", "a", "  action: AUDIT\n  rules:\n  - {}\n")).action, AuthzAction::Audit);
    let e = policy_err("  action: CUSTOM\n  provider:\n    name: ext-authz\n  rules:\n  - {}\n");
    assert_eq!(
        e,
        "spec.action: action CUSTOM delegates the decision to an external authorizer (an extension provider); sluice has none and does not support it"
    );
    assert_eq!(policy_err("  action: allow\n"), "spec.action: \"allow\" is not an action (ALLOW, DENY, AUDIT)");
    let e = policy_err("  provider:\n    name: ext-authz\n  rules:\n  - {}\n");
    assert_eq!(e, "spec.provider: belongs to action CUSTOM, which sluice does not support");
    let e =
        policy_err("  targetRef:\n    kind: Gateway\n    group: gateway.networking.k8s.io\n    name: gw\n");
    assert_eq!(
        e,
        "spec.targetRef: not supported: sluice applies policies to the pods chosen by spec.selector"
    );
    let e = policy_err("  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: web\n");
    assert_eq!(
        e,
        "spec.targetRefs: not supported: sluice applies policies to the pods chosen by spec.selector"
    );
}

#[test]
fn unknown_fields_and_bad_values_are_rejected() {
    // A typo in a security policy must not be ignored.
    let e = policy_err("  rules:\n  - from:\n    - source:\n        notPrincipal: [\"*\"]\n");
    assert!(
        e.starts_with("spec.rules[0].from[0].source.notPrincipal: unknown field `notPrincipal`, expected one of `principals`, `notPrincipals`"),
        "{e}"
    );
    let e = policy_err("  selector:\n    app: web\n");
    assert_eq!(e, "spec.selector.app: unknown field `app`, expected `matchLabels`");
    let e = policy_err("  rule:\n  - {}\n");
    assert!(e.starts_with("spec.rule: unknown field `rule`, expected one of `selector`, `action`, `rules`"), "{e}");
    let e = policy_err("  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n");
    assert_eq!(e, "spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port number (1-65535)");
    let e = policy_err("  rules:\n  - to:\n    - operation:\n        notPorts: [70000]\n");
    assert_eq!(e, "spec.rules[0].to[0].operation.notPorts[0]: port 70000 is out of range 1-65535");
    let e = policy_err("  rules:\n  - to:\n    - operation:\n        ports: [\"0\"]\n");
    assert_eq!(e, "spec.rules[0].to[0].operation.ports[0]: \"0\" is not a port number (1-65535)");
    let e = policy_err(
        "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/*/sa/web\"]\n",
    );
    assert_eq!(
        e,
        "spec.rules[0].from[0].source.principals[0]: \"cluster.local/ns/*/sa/web\": a wildcard '*' may only stand alone, at the start or at the end (as in Istio)"
    );
    let e = policy_err("  rules:\n  - from:\n    - source:\n        namespaces: [\"\"]\n");
    assert_eq!(e, "spec.rules[0].from[0].source.namespaces[0]: must not be empty");
    let e = policy_err("  rules:\n  - from:\n    - source:\n        principals: [1]\n");
    assert!(e.starts_with("spec.rules[0].from[0].source.principals[0]: invalid type: integer `1`, expected a string"), "{e}");
    let e = policy_err("  rules:\n  - from:\n      source: {}\n");
    assert!(e.starts_with("spec.rules[0].from: invalid type: map, expected a sequence"), "{e}");
    let e = policy_err("  selector:\n    matchLabels:\n      version: 1\n");
    assert!(e.starts_with("spec.selector.matchLabels.version: invalid type: integer `1`, expected a string"), "{e}");
}

#[test]
fn unserved_version() {
    let e = err("apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n");
    assert!(
        e.ends_with("kind AuthorizationPolicy is not served at apiVersion \"security.istio.io/v1alpha1\" (use \"security.istio.io/v1\" or \"security.istio.io/v1beta1\")"),
        "{e}"
    );
}

// --- The model ---

#[test]
fn model_lists_policies_per_namespace_by_name() {
    let text = [
        fixtures::ALLOW_PRINCIPAL_PORT.to_owned(),
        fixtures::policy("other", "x", "{}"),
        fixtures::DENY_FROM_NAMESPACE.to_owned(),
        fixtures::ALLOW_NOTHING.to_owned(),
    ]
    .join("---\n");
    let m = Model::from_manifest(&text, Format::Yaml).unwrap();
    let names: Vec<&str> = m.authorization_policies("shop").iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["allow-nothing", "deny-from-dev", "web-viewer"]);
    assert_eq!(m.authorization_policies("other").len(), 1);
    assert!(m.authorization_policies("nobody").is_empty());
    assert_eq!(m.authorization_policy("shop", "deny-from-dev").unwrap().action, AuthzAction::Deny);
    assert_eq!(m.all_authorization_policies().count(), 4);
}

#[test]
fn same_policy_in_two_files_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.yaml"), fixtures::DENY_FROM_NAMESPACE).unwrap();
    fs::write(
        dir.path().join("b.yaml"),
        fixtures::DENY_FROM_NAMESPACE.replace("action: DENY", "action: ALLOW"),
    )
    .unwrap();
    let m = ManifestDir::load(dir.path()).unwrap();
    assert_eq!(
        m.authorization_policy("shop", "deny-from-dev").unwrap().action,
        AuthzAction::Deny,
        "a.yaml wins"
    );
    assert_eq!(m.errors().len(), 1);
    assert!(
        m.errors()[0].reason.contains("AuthorizationPolicy \"shop/deny-from-dev\" is also defined in a.yaml"),
        "{:?}",
        m.errors()
    );
}

#[test]
fn bad_policy_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    fs::write(&file, fixtures::DENY_FROM_NAMESPACE).unwrap();
    let mut store = crate::discovery::store::Store::new(dir.path().to_owned());
    store.scan().unwrap();
    assert_eq!(store.build().authorization_policies("shop").len(), 1);
    fs::write(&file, fixtures::DENY_FROM_NAMESPACE.replace("namespaces:", "ipBlocks:")).unwrap();
    assert!(store.refresh("p.yaml".as_ref()));
    let m = store.build();
    let p = m.authorization_policy("shop", "deny-from-dev").expect("last good policy stays in force");
    assert_eq!(p.rules[0].from[0].namespaces, [exact("dev")]);
    assert!(m.errors()[0].reason.ends_with("\"dev\" is not an IP address or CIDR block (e.g. 10.0.0.1 or 10.0.0.0/8)"), "{:?}", m.errors());
}
