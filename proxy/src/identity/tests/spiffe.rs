use super::*;
use crate::discovery::Model;

#[test]
fn formats_and_parses_round_trip() {
    let id = SpiffeId::new("cluster.local", "shop", "web");
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!("spiffe://cluster.local/ns/shop/sa/web".parse::<SpiffeId>().unwrap(), id);
    assert_eq!(id.trust_domain_uri(), "spiffe://cluster.local");
    let odd = "spiffe://prod-1.example_org/ns/kube-system/sa/coredns.v2".parse::<SpiffeId>().unwrap();
    assert_eq!(odd.trust_domain, "prod-1.example_org");
    assert_eq!(odd.namespace, "kube-system");
    assert_eq!(odd.service_account, "coredns.v2");
}

#[test]
fn serializes_as_the_uri_string() {
    let id = SpiffeId::new("cluster.local", "shop", "web");
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, "\"spiffe://cluster.local/ns/shop/sa/web\"");
    assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    let err = serde_json::from_str::<SpiffeId>("\"https://cluster.local/ns/shop/sa/web\"").unwrap_err();
    assert!(err.to_string().contains("must start with \"spiffe://\""), "{err}");
}

#[test]
fn rejects_malformed_ids_with_the_reason() {
    let cases: &[(&str, &str)] = &[
        ("https://cluster.local/ns/a/sa/b", "must start with"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "must start with"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "invalid trust domain"),
        ("spiffe:///ns/a/sa/b", "invalid trust domain"),
        ("spiffe://cluster.local:8443/ns/a/sa/b", "invalid trust domain"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "invalid trust domain"),
        ("spiffe://cluster.local", "/ns/<namespace>/sa/<service account>"),
        ("spiffe://cluster.local/", "/ns/<namespace>/sa/<service account>"),
        ("spiffe://cluster.local/ns/a", "/ns/<namespace>/sa/<service account>"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "/ns/<namespace>/sa/<service account>"),
        ("spiffe://cluster.local/sa/b/ns/a", "/ns/<namespace>/sa/<service account>"),
        ("spiffe://cluster.local/ns//sa/b", "invalid path segment \"\""),
        ("spiffe://cluster.local/ns/../sa/b", "invalid path segment \"..\""),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "invalid path segment \"b?x=1\""),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "invalid path segment"),
        ("spiffe://cluster.local/ns/a%20b/sa/b", "invalid path segment"),
    ];
    for (input, want) in cases {
        let err = input.parse::<SpiffeId>().expect_err(input);
        assert!(err.to_string().contains(want), "{input}: {err}");
    }
    let long = format!("spiffe://cluster.local/ns/a/sa/{}", "b".repeat(2100));
    assert!(matches!(long.parse::<SpiffeId>(), Err(SpiffeError::TooLong { .. })));
}

#[test]
fn trust_domain_validation() {
    assert!(check_trust_domain(DEFAULT_TRUST_DOMAIN).is_ok());
    assert!(check_trust_domain("example.org").is_ok());
    for bad in ["", "Example.org", "a/b", "a:1", &"x".repeat(256)] {
        assert!(check_trust_domain(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn identity_of_a_pod_is_its_namespace_and_service_account() {
    let model = Model::from_manifest(super::PODS, crate::discovery::Format::Yaml).unwrap();
    let pod = model.pod("shop", "web-1").unwrap();
    assert_eq!(SpiffeId::for_pod("cluster.local", pod).to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(SpiffeId::for_pod("prod.example", pod).to_string(), "spiffe://prod.example/ns/shop/sa/web");
}
