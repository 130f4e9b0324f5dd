//! AuthorizationPolicy on HTTP requests (operations, request principals, `when`), on TCP
//! connections when policies use HTTP-only fields (Istio's TCP semantics), the root namespace,
//! AUDIT, and the order DENY → ALLOW.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use serde_json::json;

use super::authz::{authorize, Attributes, Decision, Request, Source};
use super::request::{normalize_path, remote_ip};
use crate::discovery::{Format, Model, Pod};
use crate::jwt::validate::Verified;

const ROOT: &str = "istio-system";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const DEV: &str = "spiffe://cluster.local/ns/dev/sa/tester";

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {sluice.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u-web, labels: {app: web}}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: bank, uid: u-api, labels: {app: api}}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: istiod, namespace: istio-system, uid: u-istiod, labels: {app: istiod}}
status: {podIP: 10.244.2.12}
"#;

fn model(policies: &[String]) -> Model {
    let text = format!("{PODS}---\n{}", policies.join("---\n"));
    Model::from_manifest(&text, Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}")
}

fn web(m: &Model) -> &Arc<Pod> {
    m.pod("shop", "web-1").unwrap()
}

/// An HTTP request as the destination sees it.
struct Req {
    principal: Option<&'static str>,
    method: &'static str,
    target: &'static str,
    host: &'static str,
    headers: HeaderMap,
    peer: IpAddr,
    port: u16,
    auth: Option<Verified>,
}

fn get(target: &'static str) -> Req {
    Req {
        principal: Some(FRONTEND),
        method: "GET",
        target,
        host: "web.shop.svc.cluster.local",
        headers: HeaderMap::new(),
        peer: "10.244.1.5".parse().unwrap(),
        port: 8080,
        auth: None,
    }
}

impl Req {
    fn method(mut self, m: &'static str) -> Req {
        self.method = m;
        self
    }
    fn from(mut self, p: Option<&'static str>) -> Req {
        self.principal = p;
        self
    }
    fn host(mut self, h: &'static str) -> Req {
        self.host = h;
        self
    }
    fn header(mut self, k: &'static str, v: &str) -> Req {
        self.headers.append(k, v.parse().unwrap());
        self
    }
    fn peer(mut self, ip: &str) -> Req {
        self.peer = ip.parse().unwrap();
        self
    }
    fn port(mut self, p: u16) -> Req {
        self.port = p;
        self
    }
    fn jwt(mut self, sub: &str, claims: serde_json::Value) -> Req {
        let serde_json::Value::Object(mut c) = claims else { panic!() };
        c.insert("iss".into(), json!("https://issuer.test"));
        c.insert("sub".into(), json!(sub));
        self.auth = Some(Verified {
            principal: format!("https://issuer.test/{sub}"),
            audiences: crate::jwt::validate::string_or_list(c.get("aud")),
            presenter: c.get("azp").and_then(|v| v.as_str()).map(str::to_owned),
            claims: c,
            payload: String::new(),
        });
        self
    }

    /// Authorized as an HTTP request (`http`) or as the connection it came on (TCP semantics).
    fn decide(&self, m: &Model, dest: &Pod, http: bool) -> Decision {
        let path = normalize_path(self.target);
        // The destination lower-cases the authority before authorization.
        let host = self.host.to_ascii_lowercase();
        let attrs = Attributes {
            source: self.principal.map_or(Source::PLAINTEXT, Source::mtls),
            source_ip: Some(self.peer),
            dest_ip: Some(dest.ip),
            dest_port: self.port,
            request: http.then(|| Request {
                method: self.method,
                path: &path,
                host: &host,
                headers: &self.headers,
                remote_ip: remote_ip(&self.headers),
                auth: self.auth.as_ref(),
            }),
        };
        authorize(m, ROOT, dest, &attrs)
    }

    fn allowed(&self, m: &Model) -> bool {
        self.decide(m, web(m), true).allowed
    }

    fn tcp_allowed(&self, m: &Model) -> bool {
        self.decide(m, web(m), false).allowed
    }
}

#[test]
fn path_forms_exact_prefix_suffix_any_and_not() {
    let m = model(&[policy(
        "shop",
        "paths",
        "  selector: {matchLabels: {app: web}}\n  rules:\n  - to:\n    - operation:\n        paths: [\"/exact\", \"/api/*\", \"*.png\"]\n        notPaths: [\"/api/admin*\"]\n",
    )]);
    for (target, want) in [
        ("/exact", true),
        ("/exact/", false),
        ("/exactly", false),
        ("/exact?q=1", true),
        ("/api/", true),
        ("/api/v1/items", true),
        ("/api", false),
        ("/img/logo.png", true),
        ("/img/logo.png.txt", false),
        ("/api/admin", false),
        ("/api/admins/x", false),
        ("/api/x/../admin", false), // normalized before matching: cannot walk around notPaths
        ("/other", false),
    ] {
        assert_eq!(get(target).allowed(&m), want, "{target}");
    }
    let m = model(&[policy("shop", "any", "  rules:\n  - to:\n    - operation:\n        paths: [\"*\"]\n")]);
    assert!(get("/anything/at/all").allowed(&m));
}

#[test]
fn methods_hosts_and_ports() {
    let m = model(&[policy(
        "shop",
        "ops",
        "  rules:\n  - to:\n    - operation:\n        methods: [GET, HEAD]\n        hosts: [\"web.shop.svc.cluster.local\", \"*.example.com\", \"api.test:8443\"]\n        ports: [\"8080\", \"8443\"]\n  - to:\n    - operation:\n        notMethods: [GET, POST, PUT, HEAD, PATCH, OPTIONS]\n        notHosts: [\"internal*\"]\n",
    )]);
    assert!(get("/").allowed(&m));
    assert!(get("/").method("HEAD").allowed(&m));
    assert!(!get("/").method("POST").allowed(&m), "not in methods, and in the second rule's notMethods");
    assert!(get("/").method("DELETE").allowed(&m), "second rule: any method but the listed ones");
    assert!(!get("/").method("DELETE").host("internal.shop").allowed(&m), "notHosts");
    // Hosts: case-insensitive, a port in the request is ignored unless the policy names one.
    assert!(get("/").host("WEB.shop.svc.cluster.local:8080").allowed(&m));
    assert!(get("/").host("a.b.example.com").allowed(&m));
    assert!(!get("/").host("example.com").allowed(&m));
    assert!(get("/").host("api.test:8443").port(8443).allowed(&m));
    assert!(!get("/").host("api.test:9443").port(8443).allowed(&m));
    assert!(!get("/").port(9090).allowed(&m), "ports");
}

#[test]
fn request_principals_need_a_valid_jwt() {
    let m = model(&[policy(
        "shop",
        "jwt",
        "  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"https://issuer.test/*\"]\n        notRequestPrincipals: [\"*/mallory\"]\n",
    )]);
    assert!(!get("/").allowed(&m), "no token: no request principal");
    assert!(get("/").jwt("alice", json!({})).allowed(&m));
    assert!(!get("/").jwt("mallory", json!({})).allowed(&m));
    // Istio's idiom for "a token is required": requestPrincipals ["*"].
    let m = model(&[policy(
        "shop",
        "require",
        "  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"*\"]\n",
    )]);
    assert!(!get("/").allowed(&m));
    assert!(get("/").jwt("bob", json!({})).allowed(&m));
    let d = get("/").decide(&m, web(&m), true);
    assert_eq!((d.allowed, d.reason), (false, Decision::NO_ALLOW_MATCH));
}

#[test]
fn ip_blocks_are_the_peer_and_remote_ip_blocks_the_original_client() {
    let m = model(&[policy(
        "shop",
        "ips",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.244.9.0/24\"]\n  - from:\n    - source:\n        remoteIpBlocks: [\"203.0.113.0/24\"]\n        notRemoteIpBlocks: [\"203.0.113.7\"]\n",
    )]);
    assert!(get("/").allowed(&m));
    assert!(!get("/").peer("10.244.9.3").allowed(&m), "ipBlocks: the peer");
    assert!(!get("/").peer("10.244.9.3").tcp_allowed(&m));
    // remote.ip: the last X-Forwarded-For entry; without one, the peer.
    assert!(!get("/").header("x-forwarded-for", "198.51.100.1, 203.0.113.5").allowed(&m));
    assert!(get("/").header("x-forwarded-for", "203.0.113.5, 198.51.100.1").allowed(&m));
    assert!(get("/").header("x-forwarded-for", "203.0.113.7").allowed(&m), "notRemoteIpBlocks");
    assert!(!get("/").peer("203.0.113.5").allowed(&m));
    assert!(!get("/").peer("203.0.113.5").tcp_allowed(&m), "TCP: the peer is the remote address");
    // The peer's address in XFF does not count as the peer for ipBlocks.
    assert!(get("/").header("x-forwarded-for", "10.244.9.3").allowed(&m));
}

/// A policy of one rule `when: [cond]` (ALLOW).
fn when(cond: &str) -> Model {
    model(&[policy("shop", "when", &format!("  rules:\n  - when:\n    - {cond}\n"))])
}

#[test]
fn every_condition_key() {
    let m = when("key: request.headers[X-Version]\n      values: [\"v1\", \"v2*\"]");
    assert!(get("/").header("x-version", "v1").allowed(&m));
    assert!(get("/").header("x-version", "v2-beta").allowed(&m));
    assert!(!get("/").header("x-version", "v3").allowed(&m));
    assert!(!get("/").allowed(&m), "absent header");
    let m = when("key: request.headers[x-debug]\n      notValues: [\"*\"]");
    assert!(get("/").allowed(&m), "absent header matches notValues [*]");
    assert!(!get("/").header("x-debug", "1").allowed(&m));

    let m = when("key: source.ip\n      values: [\"10.244.1.0/24\"]");
    assert!(get("/").allowed(&m));
    assert!(!get("/").peer("10.244.3.1").allowed(&m));
    assert!(get("/").tcp_allowed(&m), "source.ip is not HTTP-only");

    let m = when("key: remote.ip\n      values: [\"192.0.2.0/24\"]");
    assert!(get("/").header("x-forwarded-for", "192.0.2.9").allowed(&m));
    assert!(!get("/").allowed(&m));

    let m = when("key: source.namespace\n      values: [shop]");
    assert!(get("/").allowed(&m));
    assert!(!get("/").from(Some(DEV)).allowed(&m));
    assert!(!get("/").from(None).allowed(&m), "plaintext has no namespace");

    let m = when("key: source.principal\n      values: [\"cluster.local/ns/shop/sa/frontend\"]");
    assert!(get("/").allowed(&m));
    assert!(!get("/").from(Some(DEV)).allowed(&m));

    let m = when("key: request.auth.principal\n      values: [\"https://issuer.test/alice\"]");
    assert!(get("/").jwt("alice", json!({})).allowed(&m));
    assert!(!get("/").jwt("bob", json!({})).allowed(&m));
    assert!(!get("/").allowed(&m));

    let m = when("key: request.auth.audiences\n      values: [bookinfo]");
    assert!(get("/").jwt("a", json!({"aud": ["x", "bookinfo"]})).allowed(&m));
    assert!(!get("/").jwt("a", json!({"aud": "x"})).allowed(&m));

    let m = when("key: request.auth.presenter\n      values: [web-app]");
    assert!(get("/").jwt("a", json!({"azp": "web-app"})).allowed(&m));
    assert!(!get("/").jwt("a", json!({"azp": "cli"})).allowed(&m));

    let m = when("key: request.auth.claims[groups]\n      values: [admins]");
    assert!(get("/").jwt("a", json!({"groups": ["dev", "admins"]})).allowed(&m), "a list claim: any element");
    assert!(get("/").jwt("a", json!({"groups": "admins"})).allowed(&m));
    assert!(!get("/").jwt("a", json!({"groups": ["dev"]})).allowed(&m));
    let m = when("key: request.auth.claims[realm][role]\n      values: [owner]");
    assert!(get("/").jwt("a", json!({"realm": {"role": "owner"}})).allowed(&m), "nested claim");
    assert!(!get("/").jwt("a", json!({"realm": {"role": "guest"}})).allowed(&m));
    assert!(!get("/").jwt("a", json!({"role": "owner"})).allowed(&m));

    let m = when("key: destination.ip\n      values: [\"10.244.2.0/24\"]");
    assert!(get("/").allowed(&m));
    let m = when("key: destination.ip\n      notValues: [\"10.244.2.10\"]");
    assert!(!get("/").allowed(&m));

    let m = when("key: destination.port\n      values: [\"8080\"]");
    assert!(get("/").allowed(&m));
    assert!(!get("/").port(9090).allowed(&m));
    assert!(get("/").tcp_allowed(&m));


    // Conditions of one rule are ANDed.
    let m = model(&[policy(
        "shop",
        "and",
        "  rules:\n  - when:\n    - key: request.headers[x-a]\n      values: [\"1\"]\n    - key: source.namespace\n      values: [shop]\n",
    )]);
    assert!(get("/").header("x-a", "1").allowed(&m));
    assert!(!get("/").header("x-a", "1").from(Some(DEV)).allowed(&m));
}

#[test]
fn tcp_semantics_of_http_only_fields() {
    // ALLOW with an HTTP-only field never matches a connection: with nothing else allowing it,
    // TCP is refused while HTTP GETs pass.
    let allow_get =
        policy("shop", "allow-get", "  rules:\n  - to:\n    - operation:\n        methods: [GET]\n");
    let m = model(&[allow_get.clone()]);
    assert!(get("/").allowed(&m));
    assert!(!get("/").tcp_allowed(&m));
    // A second ALLOW rule without HTTP fields still allows TCP.
    let m = model(&[
        allow_get.clone(),
        policy("shop", "allow-port", "  rules:\n  - to:\n    - operation:\n        ports: [\"9000\"]\n"),
    ]);
    assert!(get("/").port(9000).tcp_allowed(&m));
    assert!(!get("/").port(8080).tcp_allowed(&m));
    // DENY: the HTTP-only fields are dropped and the rest must match, so the deny is wider.
    let m = model(&[policy(
        "shop",
        "deny-dev-delete",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [dev]\n    to:\n    - operation:\n        methods: [DELETE]\n",
    )]);
    assert!(get("/").from(Some(DEV)).allowed(&m), "HTTP: a GET from dev is not a DELETE");
    assert!(!get("/").from(Some(DEV)).method("DELETE").allowed(&m));
    assert!(!get("/").from(Some(DEV)).tcp_allowed(&m), "TCP from dev: denied");
    assert!(get("/").tcp_allowed(&m), "TCP from elsewhere: the namespace still has to match");
    // A DENY of only HTTP fields denies every connection.
    let m = model(&[policy(
        "shop",
        "deny-jwtless",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        notRequestPrincipals: [\"*\"]\n",
    )]);
    assert!(!get("/").tcp_allowed(&m));
    assert!(!get("/").allowed(&m), "HTTP without a token");
    assert!(get("/").jwt("a", json!({})).allowed(&m));
}

#[test]
fn deny_before_allow_and_audit_decides_nothing() {
    let m = model(&[
        policy("shop", "a-allow-all", "  rules:\n  - {}\n"),
        policy(
            "shop",
            "b-deny-admin",
            "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin*\"]\n",
        ),
        policy(
            "shop",
            "c-audit-post",
            "  action: AUDIT\n  rules:\n  - to:\n    - operation:\n        methods: [POST]\n",
        ),
    ]);
    let d = get("/admin").decide(&m, web(&m), true);
    assert_eq!(
        (d.allowed, d.policy.as_deref(), d.audit.as_deref()),
        (false, Some("shop/b-deny-admin"), None)
    );
    let d = get("/x").method("POST").decide(&m, web(&m), true);
    assert_eq!(
        (d.allowed, d.policy.as_deref(), d.audit.as_deref()),
        (true, Some("shop/a-allow-all"), Some("shop/c-audit-post"))
    );
    let d = get("/admin").method("POST").decide(&m, web(&m), true);
    assert_eq!(
        (d.allowed, d.audit.as_deref()),
        (false, Some("shop/c-audit-post")),
        "audited even when denied"
    );
    // AUDIT alone allows (no ALLOW policy applies), and on TCP it is matched as DENY rules are.
    let m = model(&[policy(
        "shop",
        "audit",
        "  action: AUDIT\n  rules:\n  - to:\n    - operation:\n        methods: [POST]\n",
    )]);
    let d = get("/").decide(&m, web(&m), false);
    assert_eq!((d.allowed, d.reason, d.audit.as_deref()), (true, Decision::NO_POLICY, Some("shop/audit")));
}

#[test]
fn root_namespace_policies_apply_to_every_namespace() {
    let m = model(&[
        policy(ROOT, "deny-dev", "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [dev]\n"),
        policy(ROOT, "web-only-get", "  selector: {matchLabels: {app: web}}\n  rules:\n  - to:\n    - operation:\n        methods: [GET]\n"),
    ]);
    assert!(!get("/").from(Some(DEV)).allowed(&m), "mesh-wide DENY");
    let api = m.pod("bank", "api-1").unwrap();
    assert!(!get("/").from(Some(DEV)).decide(&m, api, true).allowed);
    assert!(get("/").decide(&m, api, true).allowed, "selector app=web: not the api pod");
    assert!(get("/").allowed(&m));
    assert!(!get("/").method("PUT").allowed(&m), "the mesh-wide ALLOW with a selector");
    // In another root namespace, they are ordinary namespace policies of istio-system.
    let path = normalize_path("/");
    let attrs = Attributes {
        source: Source::mtls(DEV),
        source_ip: None,
        dest_ip: None,
        dest_port: 8080,
        request: Some(Request {
            method: "GET",
            path: &path,
            host: "web",
            headers: &HeaderMap::new(),
            remote_ip: None,
            auth: None,
        }),
    };
    assert!(authorize(&m, "mesh-root", web(&m), &attrs).allowed);
    // The root namespace's own pods get its policies once.
    let istiod = m.pod(ROOT, "istiod").unwrap();
    assert!(!authorize(&m, ROOT, istiod, &attrs).allowed);
}
