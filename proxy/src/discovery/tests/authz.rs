//! Peer authentication mode and AuthorizationPolicy: parsing Istio's shapes, rejecting what L4
//! cannot enforce, and the model's per-namespace policy lists.

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

// --- AuthorizationPolicy: rejections ---

/// The error for a policy with this spec, after the object label.
fn policy_err(spec: &str) -> String {
    let e = err(&fixtures::policy("shop", "p", spec));
    let label = "AuthorizationPolicy \"shop/p\": ";
    let at = e.find(label).unwrap_or_else(|| panic!("no object label in {e}"));
    e[at + label.len()..].to_owned()
}

#[test]
fn http_attributes_are_rejected() {
    for field in ["methods", "notMethods", "paths", "notPaths", "hosts", "notHosts"] {
        let e = policy_err(&format!(
            "  rules:\n  - to:\n    - operation:\n        ports: [\"80\"]\n        {field}: [\"GET\"]\n"
        ));
        assert_eq!(
            e,
            format!(
                "spec.rules[0].to[0].operation.{field}: {field} is an HTTP attribute; sluice authorizes connections (L4) and cannot enforce it"
            )
        );
    }
}

#[test]
fn conditions_request_principals_and_ip_blocks_are_rejected() {
    let e = policy_err("  rules:\n  - when:\n    - key: request.headers[version]\n      values: [\"v1\"]\n");
    assert_eq!(e, "spec.rules[0].when: conditions are not supported at L4 yet");
    for field in ["requestPrincipals", "notRequestPrincipals"] {
        let e = policy_err(&format!("  rules:\n  - from:\n    - source:\n        {field}: [\"*\"]\n"));
        assert_eq!(
            e,
            format!("spec.rules[0].from[0].source.{field}: request principals come from JWTs in HTTP requests; sluice authorizes connections (L4) and cannot enforce them")
        );
    }
    for field in ["ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"] {
        let e = policy_err(&format!(
            "  rules:\n  - from:\n    - source:\n        principals: [\"*\"]\n        {field}: [\"10.0.0.0/8\"]\n"
        ));
        assert_eq!(e, format!("spec.rules[0].from[0].source.{field}: IP blocks are not supported at L4 yet"));
    }
    let e = policy_err("  rules:\n  - from:\n    - source:\n        serviceAccounts: [\"shop/web\"]\n");
    assert!(e.starts_with("spec.rules[0].from[0].source.serviceAccounts: not supported yet; name the identity in principals"), "{e}");
}

#[test]
fn actions_and_target_refs_are_rejected() {
    for action in ["AUDIT", "CUSTOM"] {
        let e = policy_err(&format!("  action: {action}\n  rules:\n  - {{}}\n"));
        assert_eq!(
            e,
            format!("spec.action: action {action} is not supported (sluice enforces ALLOW and DENY)")
        );
    }
    assert_eq!(policy_err("  action: allow\n"), "spec.action: \"allow\" is not an action (ALLOW, DENY)");
    let e = policy_err("  action: CUSTOM\n  provider:\n    name: ext-authz\n  rules:\n  - {}\n");
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
    assert_eq!(
        e,
        "spec.rules[0].from[0].source.notPrincipal: unknown field (known: principals, notPrincipals, namespaces, notNamespaces)"
    );
    let e = policy_err("  selector:\n    app: web\n");
    assert_eq!(e, "spec.selector.app: unknown field (known: matchLabels)");
    let e = policy_err("  rule:\n  - {}\n");
    assert_eq!(e, "spec.rule: unknown field (known: selector, action, rules)");
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
    assert_eq!(e, "spec.rules[0].from[0].source.principals[0]: expected a string, found a number");
    let e = policy_err("  rules:\n  - from:\n      source: {}\n");
    assert_eq!(e, "spec.rules[0].from: expected a list, found a mapping");
    let e = policy_err("  selector:\n    matchLabels:\n      version: 1\n");
    assert_eq!(e, "spec.selector.matchLabels[\"version\"]: expected a string, found a number (quote it)");
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
    assert!(m.errors()[0].reason.ends_with("IP blocks are not supported at L4 yet"), "{:?}", m.errors());
}
