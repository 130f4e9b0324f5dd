//! Gateway API mesh routes (HTTPRoute, GRPCRoute): parsing with the CRDs' defaults and
//! validation rules, the model's per-Service-port attachment, the `GET /model` view, and the two
//! sources (a manifest directory that keeps the last good route, API objects through the
//! Kubernetes source's store).

use std::fs;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fixtures;
use crate::discovery::kube::resources::watches;
use crate::discovery::kube::store::KubeStore;
use crate::discovery::kube::ApiObject;
use crate::discovery::manifest::{parse, Format};
use crate::discovery::route::*;
use crate::discovery::*;

const BOOKINFO_CANARY: &str =
    include_str!("../../../../deploy/examples/bookinfo/20-reviews-canary.httproute.yaml");

fn one(yaml: &str) -> Route {
    let mut objects = parse(yaml, Format::Yaml).unwrap_or_else(|e| panic!("parse failed: {e}"));
    assert_eq!(objects.len(), 1);
    match objects.remove(0) {
        Object::Route(r) => (*r).clone(),
        other => panic!("not a route: {other:?}"),
    }
}

fn err(yaml: &str) -> String {
    match parse(yaml, Format::Yaml) {
        Ok(o) => panic!("expected an error, parsed {o:?}"),
        Err(e) => e.to_string(),
    }
}

/// An HTTPRoute `shop/r` with `spec` (YAML indented by two spaces).
fn http(spec: &str) -> String {
    format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\n  namespace: shop\nspec:\n{spec}")
}

/// A GRPCRoute `shop/g` with `spec` (YAML indented by two spaces).
fn grpc(spec: &str) -> String {
    format!("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: g\n  namespace: shop\nspec:\n{spec}")
}

/// One rule of an HTTPRoute attached to shop/web, with `rule` as the rule's body (YAML indented
/// by six spaces, under `- `).
fn http_rule(rule: &str) -> String {
    http(&format!(
        "  parentRefs:\n  - {{group: \"\", kind: Service, name: web}}\n  rules:\n  - {}",
        rule.trim_start()
    ))
}

/// Asserts that `yaml` is rejected and that the message names `field` and says `reason`.
fn rejects(yaml: &str, field: &str, reason: &str) {
    let e = err(yaml);
    assert!(
        e.contains(&format!("{field}: {reason}")),
        "expected `{field}: {reason}…` in:\n  {e}\nfor:\n{yaml}"
    );
}

fn svc_backend(name: &str, port: u16, weight: u32) -> BackendRef {
    BackendRef {
        namespace: "bookinfo".into(),
        name: name.into(),
        port: Some(port),
        weight,
        filters: vec![],
        invalid: None,
        subset: None,
        kind: BackendKind::Service,
    }
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch { path: Some(PathMatch::PathPrefix(p.into())), ..RouteMatch::default() }
}

fn exact(name: &str, value: &str) -> HeaderMatch {
    HeaderMatch { name: name.into(), value: ValueMatch::Exact(value.into()) }
}

// --- What parses, and to what ---

#[test]
fn bookinfo_canary_parses_to_the_expected_model() {
    let route = one(BOOKINFO_CANARY);
    let expected = Route {
        kind: RouteKind::Http,
        namespace: "bookinfo".into(),
        name: "reviews-canary".into(),
        created: None,
        parents: vec![ParentRef { namespace: "bookinfo".into(), name: "reviews".into(), port: Some(9080) }],
        hostnames: vec![],
        rules: vec![
            RouteRule {
                name: None,
                matches: vec![RouteMatch { headers: vec![exact("end-user", "jason")], ..prefix("/") }],
                filters: vec![],
                backends: vec![svc_backend("reviews-v2", 9080, 1)],
                timeouts: RouteTimeouts::default(),
                retry: None,
                retry_policy: None,
                fault: None,
                origin: None,
            },
            RouteRule {
                name: None,
                matches: vec![prefix("/")],
                filters: vec![],
                backends: vec![svc_backend("reviews-v1", 9080, 90), svc_backend("reviews-v2", 9080, 10)],
                timeouts: RouteTimeouts { request: Some(Duration::from_secs(10)), backend_request: None },
                retry: None,
                retry_policy: None,
                fault: None,
                origin: None,
            },
        ],
    };
    assert_eq!(route, expected);
    // v1beta1 is the same resource.
    let beta = one(
        &BOOKINFO_CANARY.replace("gateway.networking.k8s.io/v1\n", "gateway.networking.k8s.io/v1beta1\n")
    );
    assert_eq!(beta, expected);
}

#[test]
fn defaults_of_the_crds() {
    let r = one(&http(
        r#"  parentRefs:
  - {group: "", kind: Service, name: web}
  rules:
  - backendRefs:
    - {name: web, port: 80}
  - matches:
    - headers: [{name: X-User, value: alice}]
    - path: {type: Exact}
    - path: {value: /api}
    - method: POST
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow, port: 80}
    - type: URLRewrite
      urlRewrite: {hostname: web.shop.svc.cluster.local}
  - filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow, port: 80}
        fraction: {numerator: 5}
    timeouts: {request: 0s, backendRequest: 500ms}
    retry: {codes: [503]}
"#,
    ));
    assert_eq!(r.created, None);
    assert_eq!(r.parents, [ParentRef { namespace: "shop".into(), name: "web".into(), port: None }]);
    // A rule without matches matches every request.
    assert_eq!(r.rules[0].matches, [prefix("/")]);
    let b = &r.rules[0].backends[0];
    assert_eq!((b.namespace.as_str(), b.name.as_str(), b.port, b.weight), ("shop", "web", Some(80), 1));
    assert_eq!(b.invalid, None);
    let m = &r.rules[1].matches;
    assert_eq!(m[0], RouteMatch { headers: vec![exact("x-user", "alice")], ..prefix("/") }, "path /, Exact");
    assert_eq!(m[1].path, Some(PathMatch::Exact("/".into())), "value /");
    assert_eq!(m[2].path, Some(PathMatch::PathPrefix("/api".into())), "type PathPrefix");
    assert_eq!(m[3], RouteMatch { method: Some(ValueMatch::Exact("POST".into())), ..prefix("/") });
    let Filter::RequestMirror(mirror) = &r.rules[1].filters[0] else { panic!("{:?}", r.rules[1].filters) };
    assert_eq!(mirror.fraction, Fraction(1.0), "everything is mirrored by default");
    assert_eq!(mirror.backend.namespace, "shop");
    assert_eq!(
        r.rules[1].filters[1],
        Filter::UrlRewrite(UrlRewrite { hostname: Some("web.shop.svc.cluster.local".into()), path: None })
    );
    assert_eq!(
        r.rules[2].filters[0],
        Filter::RequestRedirect(RequestRedirect {
            scheme: Some("https".into()),
            hostname: None,
            path: None,
            port: None,
            status_code: 302
        })
    );
    let Filter::RequestMirror(mirror) = &r.rules[2].filters[1] else { panic!() };
    assert_eq!(mirror.fraction, Fraction(0.05), "denominator 100 by default");
    assert_eq!(
        r.rules[2].timeouts,
        RouteTimeouts { request: None, backend_request: Some(Duration::from_millis(500)) },
        "0s is no timeout"
    );
    assert_eq!(r.rules[2].retry, Some(RouteRetry { codes: vec![503], attempts: 1, backoff: None }));

    // No rules at all: the CRD's default rule (match everything, no backends: 500).
    let r = one(&http("  parentRefs:\n  - {group: \"\", kind: Service, name: web, namespace: other}\n"));
    assert_eq!(r.rules.len(), 1);
    assert_eq!(r.rules[0].matches, [prefix("/")]);
    assert!(r.rules[0].backends.is_empty());
    assert_eq!(r.parents[0].namespace, "other");
    // The namespace of a route without one, and a GRPCRoute without spec.
    let r = one("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\n");
    assert_eq!((r.namespace.as_str(), r.kind), ("default", RouteKind::Grpc));
    assert!(r.parents.is_empty() && r.rules.is_empty());
}

#[test]
fn creation_timestamp_rules_names_hostnames_and_full_filters() {
    let r = one(&http(
        r#"  parentRefs:
  - {group: "", kind: Service, name: web, port: 80}
  hostnames: [web.shop.svc.cluster.local, "*.example.com"]
  rules:
  - name: api
    matches:
    - path: {type: RegularExpression, value: "/v[0-9]+/.*"}
      queryParams:
      - {type: RegularExpression, name: debug, value: "1|true"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Env, value: prod}]
        add: [{name: X-Trace, value: "a, b"}]
        remove: [X-Internal]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        remove: [Server]
    backendRefs:
    - name: web
      port: 80
      weight: 0
      filters:
      - type: URLRewrite
        urlRewrite:
          path: {type: ReplaceFullPath, replaceFullPath: /v2}
  - name: old
    matches:
    - path: {type: PathPrefix, value: /old}
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: new.example.com
        port: 8443
        statusCode: 301
        path: {type: ReplacePrefixMatch, replacePrefixMatch: ""}
"#,
    )
    .replace("  namespace: shop\n", "  namespace: shop\n  creationTimestamp: \"2026-03-02T09:14:07Z\"\n"));
    assert_eq!(r.created.as_deref(), Some("2026-03-02T09:14:07Z"));
    assert_eq!(r.hostnames, ["web.shop.svc.cluster.local", "*.example.com"]);
    let api = &r.rules[0];
    assert_eq!(api.name.as_deref(), Some("api"));
    let Some(PathMatch::RegularExpression(re)) = &api.matches[0].path else { panic!("{:?}", api.matches) };
    assert!(re.is_match("/v2/users") && !re.is_match("/api/v2/users"), "anchored");
    let ValueMatch::RegularExpression(q) = &api.matches[0].query_params[0].value else { panic!() };
    assert!(q.is_match("true") && !q.is_match("truex"));
    assert_eq!(
        api.filters[0],
        Filter::RequestHeaderModifier(HeaderModifier {
            set: vec![("x-env".into(), "prod".into())],
            add: vec![("x-trace".into(), "a, b".into())],
            remove: vec!["x-internal".into()],
        })
    );
    assert_eq!(
        api.filters[1],
        Filter::ResponseHeaderModifier(HeaderModifier {
            remove: vec!["server".into()],
            ..Default::default()
        })
    );
    assert_eq!(api.backends[0].weight, 0);
    assert_eq!(
        api.backends[0].filters,
        [Filter::UrlRewrite(UrlRewrite {
            hostname: None,
            path: Some(PathModifier::ReplaceFullPath("/v2".into()))
        })]
    );
    assert_eq!(
        r.rules[1].filters[0],
        Filter::RequestRedirect(RequestRedirect {
            scheme: None,
            hostname: Some("new.example.com".into()),
            path: Some(PathModifier::ReplacePrefixMatch(String::new())),
            port: Some(8443),
            status_code: 301,
        })
    );
}

#[test]
fn only_service_parents_are_kept() {
    let r = one(&http(
        r#"  parentRefs:
  - name: mesh-gateway
  - {group: gateway.networking.k8s.io, kind: Gateway, name: edge, sectionName: https}
  - {kind: Service, name: not-core}
  - {group: "", kind: Service, name: web, port: 80}
  - {group: "", kind: Service, name: web, port: 9090}
  - {group: "", kind: Service, name: api, namespace: backend}
"#,
    ));
    let parents: Vec<_> = r.parents.iter().map(|p| (p.namespace.as_str(), p.name.as_str(), p.port)).collect();
    assert_eq!(parents, [("shop", "web", Some(80)), ("shop", "web", Some(9090)), ("backend", "api", None)]);
}

#[test]
fn headers_and_query_params_first_entry_wins() {
    let r = one(&http_rule(
        r#"matches:
    - headers:
      - {name: X-Tenant, value: a}
      - {name: x-tenant, value: b}
      - {name: X-TENANT, type: RegularExpression, value: ".*"}
      - {name: X-Other, value: c}
      queryParams:
      - {name: page, value: "1"}
      - {name: Page, value: "2"}
      - {name: page, value: "3"}
"#,
    ));
    let m = &r.rules[0].matches[0];
    assert_eq!(m.headers, [exact("x-tenant", "a"), exact("x-other", "c")]);
    assert_eq!(
        m.query_params,
        [exact("page", "1"), exact("Page", "2")],
        "query parameter names are case-sensitive"
    );
}

#[test]
fn regex_compile_errors_carry_the_regex_crate_message() {
    let e = err(&http_rule("matches:\n    - path: {type: RegularExpression, value: \"/v(1\"}\n"));
    assert!(
        e.contains("spec.rules[0].matches[0].path.value: invalid regular expression: regex parse error"),
        "{e}"
    );
    assert!(e.contains("unclosed group"), "the regex crate's reason: {e}");
    let e =
        err(&http_rule("matches:\n    - headers: [{name: x, type: RegularExpression, value: \"[a-\"}]\n"));
    assert!(e.contains("spec.rules[0].matches[0].headers[0].value: invalid regular expression: "), "{e}");
    let e =
        err(&grpc("  rules:\n  - matches:\n    - method: {type: RegularExpression, service: \"foo.(\"}\n"));
    assert!(e.contains("spec.rules[0].matches[0].method.service: invalid regular expression: "), "{e}");
}

#[test]
fn grpc_route_with_service_and_method_matches() {
    let r = one(&grpc(
        r#"  parentRefs:
  - {group: "", kind: Service, name: greeter, port: 50051}
  rules:
  - matches:
    - method: {service: helloworld.Greeter, method: SayHello}
      headers: [{name: X-Canary, value: "yes"}]
    - method: {service: .grpc.health.v1.Health}
    - method: {type: RegularExpression, method: "Say.*"}
    backendRefs:
    - {name: greeter-v2, port: 50051}
  - backendRefs:
    - {name: greeter, port: 50051}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: grpc}]}
"#,
    ));
    assert_eq!(r.kind, RouteKind::Grpc);
    let m = &r.rules[0].matches;
    let svc = |s: &str| Some(ValueMatch::Exact(s.into()));
    assert_eq!(
        m[0],
        RouteMatch {
            path: None,
            method: None,
            headers: vec![exact("x-canary", "yes")],
            query_params: vec![],
            grpc: Some(GrpcMethodMatch { service: svc("helloworld.Greeter"), method: svc("SayHello") }),
            ..RouteMatch::default()
        }
    );
    assert_eq!(
        m[1].grpc,
        Some(GrpcMethodMatch { service: svc("grpc.health.v1.Health"), method: None }),
        "the leading '.' of a fully qualified name is not part of the request path"
    );
    let Some(GrpcMethodMatch { service: None, method: Some(ValueMatch::RegularExpression(re)) }) = &m[2].grpc
    else {
        panic!("{:?}", m[2])
    };
    assert!(re.is_match("SayHello") && !re.is_match("Greet"));
    assert_eq!(r.rules[1].matches, [RouteMatch::default()], "no matches: every gRPC request");
    assert_eq!(r.rules[1].backends[0].port, Some(50051));
}

#[test]
fn unusable_backends_are_kept_as_invalid() {
    let r = one(&http_rule(
        r#"backendRefs:
    - {name: web, port: 80, weight: 3}
    - {name: web, namespace: other, port: 80}
    - {group: multicluster.x-k8s.io, kind: ServiceImport, name: web, weight: 2}
    - {group: "", kind: Pod, name: web-0, port: 8080}
    - {group: example.com, kind: Service, name: web}
"#,
    ));
    let b = &r.rules[0].backends;
    assert_eq!(b.len(), 5, "kept, so that their share of the traffic gets 500");
    assert_eq!(b[0].invalid, None);
    assert_eq!(
        b[1].invalid.as_deref(),
        Some("a cross-namespace backendRef needs a ReferenceGrant, which sluice does not support yet")
    );
    assert_eq!((b[1].namespace.as_str(), b[1].port), ("other", Some(80)));
    assert!(
        b[2].invalid.as_deref().is_some_and(|r| r.contains("ServiceImport.multicluster.x-k8s.io")),
        "{b:?}"
    );
    assert_eq!((b[2].port, b[2].weight), (None, 2), "only a Service needs a port");
    assert!(
        b[3].invalid.as_deref().is_some_and(|r| r.contains("backend kind Pod is not supported")),
        "{b:?}"
    );
    assert!(b[4].invalid.is_some(), "a Service of another group is not a core Service");
}

// --- Validation: every rule names the field ---

#[test]
fn route_level_rules() {
    rejects(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n",
        "HTTPRoute \"r\"",
        "missing required field `spec`",
    );
    rejects(
        &http("  parentRefs: []\n").replace("name: r", "name: R"),
        "metadata.name",
        "\"R\" is not a valid name",
    );
    rejects(
        &grpc("  rules: []\n")
            .replace("gateway.networking.k8s.io/v1\n", "gateway.networking.k8s.io/v1beta1\n"),
        "GRPCRoute \"shop/g\"",
        "kind GRPCRoute is not served at apiVersion \"gateway.networking.k8s.io/v1beta1\"",
    );
    let many = |n: usize, item: &str| (0..n).map(|i| item.replace("{i}", &i.to_string())).collect::<String>();
    rejects(
        &http(&format!("  parentRefs:\n{}", many(33, "  - {group: \"\", kind: Service, name: s{i}}\n"))),
        "spec.parentRefs",
        "at most 32 entries are allowed, found 33",
    );
    rejects(
        &http("  parentRefs:\n  - {group: \"\", kind: Service, name: web, sectionName: http}\n"),
        "spec.parentRefs[0].sectionName",
        "not supported for a Service parent",
    );
    rejects(
        &http("  parentRefs:\n  - {group: \"\", kind: Service, name: web, port: 0}\n"),
        "spec.parentRefs[0].port",
        "port 0 is out of range 1-65535",
    );
    rejects(
        &http("  parentRefs:\n  - {group: \"\", kind: Service, name: web, namespace: Shop}\n"),
        "spec.parentRefs[0].namespace",
        "\"Shop\" is not a valid name",
    );
    rejects(
        &http("  parentRefs:\n  - {group: \"\", kind: Service, name: \"\"}\n"),
        "spec.parentRefs[0].name",
        "must not be empty",
    );
    rejects(
        &http("  parentRefs:\n  - {group: \"\", kind: Service, name: web}\n  - {group: \"\", kind: Service, name: web, port: 80}\n"),
        "spec.parentRefs[1]",
        "port must be set on every parentRef when two or more name the same Service",
    );
    rejects(
        &http("  parentRefs:\n  - {group: \"\", kind: Service, name: web, port: 80}\n  - {group: \"\", kind: Service, name: web, port: 80}\n"),
        "spec.parentRefs[1]",
        "duplicate parentRef",
    );
    rejects(&http("  hostnames: [\"\"]\n"), "spec.hostnames[0]", "\"\" is not a hostname");
    rejects(&http("  hostnames: [Web.Shop]\n"), "spec.hostnames[0]", "\"Web.Shop\" is not a hostname");
    rejects(
        &http(&format!("  hostnames:\n{}", many(17, "  - h{i}.example.com\n"))),
        "spec.hostnames",
        "at most 16 entries are allowed, found 17",
    );
    rejects(
        &http(&format!("  rules:\n{}", many(17, "  - {}\n"))),
        "spec.rules",
        "at most 16 entries are allowed",
    );
    let rule_of_64 = format!("  - matches:\n{}", many(64, "    - path: {value: /p{i}}\n"));
    rejects(
        &http(&format!("  rules:\n{rule_of_64}{rule_of_64}  - {{}}\n")),
        "spec.rules",
        "at most 128 matches",
    );
    rejects(
        &http(&format!("  rules:\n  - matches:\n{}", many(65, "    - path: {value: /p{i}}\n"))),
        "spec.rules[0].matches",
        "at most 64 entries are allowed, found 65",
    );
    rejects(
        &http("  rules:\n  - name: Bad_Name\n"),
        "spec.rules[0].name",
        "\"Bad_Name\" is not a valid name",
    );
    rejects(&http("  rules:\n  - name: a\n  - name: a\n"), "spec.rules[1].name", "duplicate rule name \"a\"");
    for at in [
        "spec.sessionPersistence",
        "spec.rules[0].sessionPersistence",
        "spec.rules[0].backendRefs[0].sessionPersistence",
    ] {
        let sp = "sessionPersistence: {sessionName: s}";
        let yaml = match at {
            "spec.sessionPersistence" => http(&format!("  {sp}\n")),
            "spec.rules[0].sessionPersistence" => http(&format!("  rules:\n  - {sp}\n")),
            _ => http(&format!("  rules:\n  - backendRefs:\n    - {{name: web, port: 80, {sp}}}\n")),
        };
        rejects(&yaml, at, "not supported");
    }
}

#[test]
fn http_match_rules() {
    let path = |ty: &str, value: &str| {
        http_rule(&format!("matches:\n    - path: {{type: {ty}, value: \"{value}\"}}\n"))
    };
    let at = "spec.rules[0].matches[0]";
    rejects(&path("Prefix", "/"), &format!("{at}.path.type"), "\"Prefix\" is not a path match type");
    rejects(
        &path("Exact", "api"),
        &format!("{at}.path.value"),
        "\"api\" must be an absolute path starting with '/'",
    );
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        for ty in ["Exact", "PathPrefix"] {
            rejects(
                &path(ty, &format!("/a{bad}b")),
                &format!("{at}.path.value"),
                &format!("\"/a{bad}b\" must not contain"),
            );
        }
    }
    rejects(&path("PathPrefix", "/a/.."), &format!("{at}.path.value"), "\"/a/..\" must not end with \"/..\"");
    rejects(&path("Exact", "/a/."), &format!("{at}.path.value"), "\"/a/.\" must not end with \"/.\"");
    rejects(
        &path("Exact", "/a b"),
        &format!("{at}.path.value"),
        "\"/a b\" has a character not allowed in a path",
    );
    rejects(&path("Exact", "/a%zz"), &format!("{at}.path.value"), "\"/a%zz\" has a '%' that does not start");
    // Regular expressions are not paths: only their syntax is checked.
    let r = one(&path("RegularExpression", ".*//.*"));
    assert!(matches!(&r.rules[0].matches[0].path, Some(PathMatch::RegularExpression(_))));
    rejects(
        &path("PathPrefix", &format!("/{}", "a".repeat(1024))),
        &format!("{at}.path.value"),
        "at most 1024",
    );

    let rule = |m: &str| http_rule(&format!("matches:\n    - {m}\n"));
    rejects(&rule("method: get"), &format!("{at}.method"), "\"get\" is not an HTTP method (GET, HEAD,");
    rejects(
        &rule("headers: [{name: \"x user\", value: a}]"),
        &format!("{at}.headers[0].name"),
        "\"x user\" is not a valid header name",
    );
    rejects(
        &rule("headers: [{name: \":path\", value: a}]"),
        &format!("{at}.headers[0].name"),
        "\":path\" is not a valid header name",
    );
    rejects(&rule("headers: [{value: a}]"), "", &format!("missing required field `{at}.headers[0].name`"));
    rejects(
        &rule("headers: [{name: x, value: \"\"}]"),
        &format!("{at}.headers[0].value"),
        "must be 1 to 4096 characters long",
    );
    rejects(
        &rule("headers: [{name: x, type: Prefix, value: a}]"),
        &format!("{at}.headers[0].type"),
        "\"Prefix\" is not a match type",
    );
    rejects(
        &rule(&format!("queryParams: [{{name: q, value: \"{}\"}}]", "v".repeat(1025))),
        &format!("{at}.queryParams[0].value"),
        "must be 1 to 1024 characters long",
    );
    rejects(
        &rule("queryParams: [{name: \"a=b\", value: c}]"),
        &format!("{at}.queryParams[0].name"),
        "\"a=b\" is not a valid header name",
    );
    let many = (0..17).map(|i| format!("{{name: h{i}, value: v}}")).collect::<Vec<_>>().join(", ");
    rejects(
        &rule(&format!("headers: [{many}]")),
        &format!("{at}.headers"),
        "at most 16 entries are allowed, found 17",
    );
    rejects(
        &rule(&format!("queryParams: [{many}]")),
        &format!("{at}.queryParams"),
        "at most 16 entries are allowed, found 17",
    );
}

#[test]
fn filter_rules() {
    let with = |filters: &str| http_rule(&format!("filters:\n{filters}"));
    let f0 = "spec.rules[0].filters[0]";
    rejects(&with("    - {requestHeaderModifier: {}}\n"), "", &format!("missing required field `{f0}.type`"));
    rejects(
        &with("    - {type: RequestHeaderModifier}\n"),
        "",
        &format!("missing required field `{f0}.requestHeaderModifier`"),
    );
    rejects(
        &with("    - {type: RequestHeaderModifier, requestHeaderModifier: {}, urlRewrite: {}}\n"),
        &format!("{f0}.urlRewrite"),
        "must not be set on a RequestHeaderModifier filter (its config is requestHeaderModifier)",
    );
    rejects(
        &with("    - {type: RequestHeaderModifier, requestHeaderModifier: {}, priority: 1}\n"),
        &format!("{f0}.priority"),
        "unknown field (known: type, requestHeaderModifier)",
    );
    for ty in ["ExtensionRef", "CORS", "ExternalAuth"] {
        rejects(
            &with(&format!(
                "    - {{type: {ty}, extensionRef: {{group: example.com, kind: Auth, name: a}}}}\n"
            )),
            &format!("{f0}.type"),
            &format!("filter type {ty} is not implemented by sluice"),
        );
    }
    rejects(
        &with("    - {type: Compress}\n"),
        &format!("{f0}.type"),
        "\"Compress\" is not a filter type sluice implements",
    );
    rejects(
        &with("    - {type: RequestHeaderModifier, requestHeaderModifier: {}}\n    - {type: RequestHeaderModifier, requestHeaderModifier: {}}\n"),
        "spec.rules[0].filters[1]",
        "RequestHeaderModifier filter cannot be repeated",
    );
    rejects(
        &with(
            "    - {type: URLRewrite, urlRewrite: {}}\n    - {type: RequestRedirect, requestRedirect: {}}\n",
        ),
        "spec.rules[0].filters[1]",
        "a filter list may have a RequestRedirect or a URLRewrite filter, not both",
    );
    // RequestMirror may repeat.
    let two_mirrors = one(&with(
        "    - {type: RequestMirror, requestMirror: {backendRef: {name: a, port: 80}}}\n    - {type: RequestMirror, requestMirror: {backendRef: {name: b, port: 80}, percent: 50}}\n",
    ));
    let Filter::RequestMirror(m) = &two_mirrors.rules[0].filters[1] else { panic!() };
    assert_eq!((m.backend.name.as_str(), m.fraction), ("b", Fraction(0.5)));
    rejects(
        &http_rule("backendRefs: [{name: web, port: 80}]\n    filters:\n    - {type: RequestRedirect, requestRedirect: {}}\n"),
        f0,
        "a RequestRedirect filter must not be used together with backendRefs",
    );

    // Header modifiers.
    let hm = |body: &str| {
        with(&format!("    - type: RequestHeaderModifier\n      requestHeaderModifier: {body}\n"))
    };
    let c = format!("{f0}.requestHeaderModifier");
    rejects(
        &hm("{sett: [{name: a, value: b}]}"),
        &format!("{c}.sett"),
        "unknown field (known: set, add, remove)",
    );
    rejects(
        &hm("{set: [{name: a, value: b, append: true}]}"),
        &format!("{c}.set[0].append"),
        "unknown field",
    );
    rejects(
        &hm("{set: [{name: X-A, value: b}, {name: x-a, value: c}]}"),
        &format!("{c}.set[1].name"),
        "\"x-a\" is already in set",
    );
    rejects(
        &hm("{set: [{name: x-a, value: b}], remove: [X-A]}"),
        &format!("{c}.remove[0]"),
        "\"x-a\" is already in set",
    );
    rejects(
        &hm("{add: [{name: x-a, value: b}], remove: [x-b, x-b]}"),
        &format!("{c}.remove[1]"),
        "\"x-b\" is already in remove",
    );
    rejects(
        &hm("{remove: [\"bad name\"]}"),
        &format!("{c}.remove[0]"),
        "\"bad name\" is not a valid header name",
    );
    rejects(
        &hm("{add: [{name: a, value: \"x\\r\\ny: z\"}]}"),
        &format!("{c}.add[0].value"),
        "must not contain control characters",
    );
    rejects(&hm("{add: [{name: a}]}"), "", &format!("missing required field `{c}.add[0].value`"));
    let many = (0..17).map(|i| format!("h{i}")).collect::<Vec<_>>().join(", ");
    rejects(
        &hm(&format!("{{remove: [{many}]}}")),
        &format!("{c}.remove"),
        "at most 16 entries are allowed, found 17",
    );

    // Redirects and rewrites.
    let rr = |body: &str| with(&format!("    - type: RequestRedirect\n      requestRedirect: {body}\n"));
    let c = format!("{f0}.requestRedirect");
    rejects(&rr("{scheme: ftp}"), &format!("{c}.scheme"), "\"ftp\" is not a redirect scheme (http, https)");
    rejects(
        &rr("{statusCode: 307}"),
        &format!("{c}.statusCode"),
        "307 is not a redirect status code (301, 302)",
    );
    rejects(&rr("{port: 70000}"), &format!("{c}.port"), "port 70000 is out of range 1-65535");
    rejects(
        &rr("{hostname: \"*.example.com\"}"),
        &format!("{c}.hostname"),
        "\"*.example.com\" is not a hostname",
    );
    rejects(&rr("{path: {replaceFullPath: /x}}"), "", &format!("missing required field `{c}.path.type`"));
    rejects(
        &rr("{path: {type: ReplaceFullPath}}"),
        &format!("{c}.path"),
        "replaceFullPath must be set when type is ReplaceFullPath",
    );
    rejects(
        &rr("{path: {type: ReplaceFullPath, replaceFullPath: /x, replacePrefixMatch: /y}}"),
        &format!("{c}.path.replacePrefixMatch"),
        "must not be set when type is ReplaceFullPath",
    );
    rejects(
        &rr("{path: {type: Replace, replaceFullPath: /x}}"),
        &format!("{c}.path.type"),
        "\"Replace\" is not a path modifier type",
    );
    rejects(
        &with("    - type: URLRewrite\n      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: \"/a b\"}}\n"),
        &format!("{f0}.urlRewrite.path.replaceFullPath"),
        "must not contain spaces",
    );
    rejects(
        &with("    - type: URLRewrite\n      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /x}, scheme: https}\n"),
        &format!("{f0}.urlRewrite.scheme"),
        "unknown field (known: hostname, path)",
    );
    // ReplacePrefixMatch needs exactly one match, a PathPrefix one, at rule and backend level.
    let prefix_rewrite =
        "{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}";
    for (matches, ok) in [
        ("", true),
        ("matches: [{path: {value: /v1}}]\n    ", true),
        ("matches: [{headers: [{name: a, value: b}]}]\n    ", true),
        ("matches: [{path: {type: Exact, value: /v1}}]\n    ", false),
        ("matches: [{path: {type: RegularExpression, value: /v1.*}}]\n    ", false),
        ("matches: [{path: {value: /v1}}, {path: {value: /v2}}]\n    ", false),
    ] {
        let rule_level = http_rule(&format!("{matches}filters: [{prefix_rewrite}]\n"));
        let backend_level = http_rule(&format!(
            "{matches}backendRefs: [{{name: web, port: 80, filters: [{prefix_rewrite}]}}]\n"
        ));
        if ok {
            one(&rule_level);
            one(&backend_level);
        } else {
            let reason =
                "ReplacePrefixMatch needs the rule to have exactly one match, with a PathPrefix path";
            rejects(&rule_level, &format!("{f0}.urlRewrite.path.type"), reason);
            rejects(&backend_level, "spec.rules[0].backendRefs[0].filters[0].urlRewrite.path.type", reason);
        }
    }

    // Mirrors.
    let mirror = |body: &str| with(&format!("    - type: RequestMirror\n      requestMirror: {body}\n"));
    let c = format!("{f0}.requestMirror");
    rejects(&mirror("{percent: 10}"), "", &format!("missing required field `{c}.backendRef`"));
    rejects(
        &mirror("{backendRef: {name: a}}"),
        &format!("{c}.backendRef.port"),
        "required for a Service backend",
    );
    rejects(
        &mirror("{backendRef: {name: a, port: 80, weight: 2}}"),
        &format!("{c}.backendRef.weight"),
        "unknown field",
    );
    rejects(
        &mirror("{backendRef: {name: a, port: 80}, percent: 5, fraction: {numerator: 1}}"),
        &format!("{c}.fraction"),
        "only one of percent and fraction may be set",
    );
    rejects(
        &mirror("{backendRef: {name: a, port: 80}, percent: 101}"),
        &format!("{c}.percent"),
        "101 is out of range 0-100",
    );
    rejects(
        &mirror("{backendRef: {name: a, port: 80}, fraction: {numerator: 3, denominator: 2}}"),
        &format!("{c}.fraction"),
        "numerator 3 must not exceed denominator 2",
    );
    rejects(
        &mirror("{backendRef: {name: a, port: 80}, fraction: {numerator: 0, denominator: 0}}"),
        &format!("{c}.fraction.denominator"),
        "0 is out of range 1-",
    );
    rejects(
        &mirror("{backendRef: {name: a, port: 80}, fraction: {denominator: 10}}"),
        "",
        &format!("missing required field `{c}.fraction.numerator`"),
    );
    let r = one(&mirror(
        "{backendRef: {name: a, namespace: other, port: 80}, fraction: {numerator: 1, denominator: 3}}",
    ));
    let Filter::RequestMirror(m) = &r.rules[0].filters[0] else { panic!() };
    assert!(m.backend.invalid.is_some(), "a cross-namespace mirror is kept, unusable");
    assert!((m.fraction.0 - 1.0 / 3.0).abs() < 1e-12);
}

#[test]
fn backend_rules() {
    let b0 = "spec.rules[0].backendRefs[0]";
    rejects(
        &http_rule("backendRefs: [{name: web}]\n"),
        &format!("{b0}.port"),
        "required for a Service backend",
    );
    rejects(
        &http_rule("backendRefs: [{group: \"\", kind: Service, name: web}]\n"),
        &format!("{b0}.port"),
        "required for a Service backend",
    );
    rejects(&http_rule("backendRefs: [{port: 80}]\n"), "", &format!("missing required field `{b0}.name`"));
    rejects(
        &http_rule("backendRefs: [{name: web, port: 80, weight: -1}]\n"),
        &format!("{b0}.weight"),
        "-1 is out of range 0-1000000",
    );
    rejects(
        &http_rule("backendRefs: [{name: web, port: 80, weight: 1000001}]\n"),
        &format!("{b0}.weight"),
        "1000001 is out of range",
    );
    rejects(
        &http_rule(
            "backendRefs: [{name: web, port: 80, filters: [{type: ExtensionRef, extensionRef: {}}]}]\n",
        ),
        &format!("{b0}.filters[0].type"),
        "filter type ExtensionRef is not implemented by sluice",
    );
    let many = (0..17).map(|i| format!("{{name: b{i}, port: 80}}")).collect::<Vec<_>>().join(", ");
    rejects(
        &http_rule(&format!("backendRefs: [{many}]\n")),
        "spec.rules[0].backendRefs",
        "at most 16 entries are allowed, found 17",
    );
    // A redirect at backend level is the CRD's business (extended support), not an error.
    one(&http_rule("backendRefs: [{name: web, port: 80, filters: [{type: RequestRedirect, requestRedirect: {port: 8080}}]}]\n"));
}

#[test]
fn timeout_and_retry_rules() {
    let t = "spec.rules[0].timeouts";
    rejects(&http_rule("timeouts: {request: \"10\"}\n"), &format!("{t}.request"), "\"10\" is not a duration");
    rejects(
        &http_rule("timeouts: {backendRequest: 1.5s}\n"),
        &format!("{t}.backendRequest"),
        "\"1.5s\" is not a duration",
    );
    rejects(
        &http_rule("timeouts: {request: 10s, backendRequest: 11s}\n"),
        &format!("{t}.backendRequest"),
        "11s is longer than the request timeout (10s)",
    );
    let r = one(&http_rule("timeouts: {request: 0s, backendRequest: 1m}\n"));
    assert_eq!(
        r.rules[0].timeouts,
        RouteTimeouts { request: None, backend_request: Some(Duration::from_secs(60)) }
    );
    let r = one(&http_rule("timeouts: {request: 10s, backendRequest: 10s}\n"));
    assert_eq!(r.rules[0].timeouts.backend_request, Some(Duration::from_secs(10)));

    let rt = "spec.rules[0].retry";
    rejects(&http_rule("retry: {codes: [399]}\n"), &format!("{rt}.codes[0]"), "399 is out of range 400-599");
    rejects(
        &http_rule("retry: {codes: [503, 503]}\n"),
        &format!("{rt}.codes[1]"),
        "duplicate status code 503",
    );
    rejects(&http_rule("retry: {attempts: -1}\n"), &format!("{rt}.attempts"), "-1 is out of range 0-");
    rejects(&http_rule("retry: {backoff: 1x}\n"), &format!("{rt}.backoff"), "\"1x\" is not a duration");
    let r = one(&http_rule("retry: {codes: [502, 503], attempts: 3, backoff: 100ms}\n"));
    assert_eq!(
        r.rules[0].retry,
        Some(RouteRetry { codes: vec![502, 503], attempts: 3, backoff: Some(Duration::from_millis(100)) })
    );
}

#[test]
fn grpc_rules() {
    let rule = |body: &str| grpc(&format!("  rules:\n  - {body}\n"));
    let m0 = "spec.rules[0].matches[0]";
    rejects(
        &rule("timeouts: {request: 1s}"),
        "spec.rules[0].timeouts",
        "GRPCRoute has no timeouts in the Gateway API",
    );
    rejects(&rule("retry: {attempts: 2}"), "spec.rules[0].retry", "GRPCRoute has no retry");
    rejects(
        &rule("matches: [{method: {type: Exact}}]"),
        &format!("{m0}.method"),
        "one or both of service and method must be set",
    );
    rejects(
        &rule("matches: [{method: {service: \"\", method: \"\"}}]"),
        &format!("{m0}.method"),
        "one or both",
    );
    rejects(
        &rule("matches: [{method: {service: my-svc}}]"),
        &format!("{m0}.method.service"),
        "\"my-svc\" is not a fully qualified gRPC service name",
    );
    rejects(
        &rule("matches: [{method: {service: pkg..Svc}}]"),
        &format!("{m0}.method.service"),
        "\"pkg..Svc\" is not a fully qualified",
    );
    rejects(
        &rule("matches: [{method: {service: 1pkg.Svc}}]"),
        &format!("{m0}.method.service"),
        "\"1pkg.Svc\" is not a fully qualified",
    );
    rejects(
        &rule("matches: [{method: {method: Say.Hello}}]"),
        &format!("{m0}.method.method"),
        "\"Say.Hello\" is not a gRPC method name",
    );
    rejects(
        &rule("matches: [{method: {type: Prefix, method: Say}}]"),
        &format!("{m0}.method.type"),
        "\"Prefix\" is not a match type",
    );
    rejects(
        &rule("matches: [{headers: [{name: \"a b\", value: c}]}]"),
        &format!("{m0}.headers[0].name"),
        "\"a b\" is not a valid header name",
    );
    let many = vec!["{}"; 65].join(", ");
    rejects(
        &rule(&format!("matches: [{many}]")),
        "spec.rules[0].matches",
        "at most 64 entries are allowed, found 65",
    );
    for ty in ["RequestRedirect", "URLRewrite"] {
        rejects(
            &rule(&format!("filters: [{{type: {ty}}}]")),
            "spec.rules[0].filters[0].type",
            &format!("{ty} is not a GRPCRoute filter"),
        );
    }
    rejects(
        &rule("filters: [{type: ExtensionRef}]"),
        "spec.rules[0].filters[0].type",
        "filter type ExtensionRef is not implemented",
    );
    rejects(
        &rule("backendRefs: [{name: greeter}]"),
        "spec.rules[0].backendRefs[0].port",
        "required for a Service backend",
    );
    // Anything the API server would prune (here a typo'd field outside filters) is ignored.
    one(&rule("matchez: [{}]"));
}

// --- The model ---

/// A Service `ns/name` with these ports.
fn service(ns: &str, name: &str, ports: &[u16]) -> String {
    let ports: String = ports.iter().map(|p| format!("  - {{name: p{p}, port: {p}}}\n")).collect();
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports:\n{ports}")
}

/// A route of `kind` named `ns/name`, created at `created` (if any), attached to `parent`
/// (`ns/svc` or `ns/svc:port`).
fn attached(kind: &str, ns: &str, name: &str, created: Option<&str>, parent: &str) -> String {
    let (svc, port) = match parent.split_once(':') {
        Some((s, p)) => (s, format!(", port: {p}")),
        None => (parent, String::new()),
    };
    let (svc_ns, svc_name) = svc.split_once('/').unwrap();
    let created = created.map(|c| format!(", creationTimestamp: \"{c}\"")).unwrap_or_default();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}{created}}}\n\
         spec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: {svc_name}, namespace: {svc_ns}{port}}}\n"
    )
}

fn model(docs: &[String]) -> Model {
    Model::from_manifest(&docs.join("---\n"), Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn keys(routes: &[std::sync::Arc<Route>]) -> Vec<String> {
    routes.iter().map(|r| format!("{} {}", r.kind, r.key())).collect()
}

#[test]
fn attached_routes_per_port() {
    let m = model(&[
        service("shop", "web", &[80, 9090]),
        attached("HTTPRoute", "shop", "http-only", Some("2026-01-01T00:00:00Z"), "shop/web:80"),
        attached("HTTPRoute", "shop", "all-ports", Some("2026-01-02T00:00:00Z"), "shop/web"),
        attached("HTTPRoute", "shop", "no-such-port", Some("2026-01-01T00:00:00Z"), "shop/web:8080"),
        attached("GRPCRoute", "shop", "metrics", None, "shop/web:9090"),
    ]);
    assert_eq!(
        keys(m.attached_routes("shop", "web", 80)),
        ["HTTPRoute shop/http-only", "HTTPRoute shop/all-ports"]
    );
    assert_eq!(
        keys(m.attached_routes("shop", "web", 9090)),
        ["HTTPRoute shop/all-ports", "GRPCRoute shop/metrics"]
    );
    assert!(m.attached_routes("shop", "web", 8080).is_empty(), "not a port of the Service");
    assert!(m.attached_routes("shop", "nope", 80).is_empty());
    assert!(m.attached_routes("other", "web", 80).is_empty());
    assert_eq!(m.routes().count(), 4, "every route is in the model, attached or not");
    assert!(m.route(RouteKind::Http, "shop", "no-such-port").is_some());
    assert!(m.route(RouteKind::Grpc, "shop", "http-only").is_none());
}

#[test]
fn a_route_attaches_once_its_service_appears() {
    let route = attached("HTTPRoute", "shop", "canary", None, "shop/web:80");
    let m = model(std::slice::from_ref(&route));
    assert!(m.route(RouteKind::Http, "shop", "canary").is_some());
    assert!(m.attached_routes("shop", "web", 80).is_empty(), "no Service yet");
    let m = model(&[route, service("shop", "web", &[80])]);
    assert_eq!(keys(m.attached_routes("shop", "web", 80)), ["HTTPRoute shop/canary"]);
}

#[test]
fn attached_routes_are_ordered_by_creation_then_name() {
    let m = model(&[
        service("shop", "web", &[80]),
        attached("HTTPRoute", "shop", "newest", None, "shop/web"),
        attached("HTTPRoute", "shop", "b-late", Some("2026-03-02T09:14:08Z"), "shop/web:80"),
        attached("HTTPRoute", "shop", "c-early", Some("2026-03-02T09:14:07Z"), "shop/web"),
        // A consumer route from another namespace, as old as c-early: namespace breaks the tie.
        attached("HTTPRoute", "client", "z-consumer", Some("2026-03-02T09:14:07Z"), "shop/web:80"),
        // Same name, both kinds: two routes (the kind is part of the key), HTTPRoute first.
        attached("GRPCRoute", "shop", "b-late", Some("2026-03-02T09:14:08Z"), "shop/web"),
        attached("HTTPRoute", "shop", "also-newest", None, "shop/web"),
    ]);
    assert_eq!(
        keys(m.attached_routes("shop", "web", 80)),
        [
            "HTTPRoute client/z-consumer",
            "HTTPRoute shop/c-early",
            "HTTPRoute shop/b-late",
            "GRPCRoute shop/b-late",
            "HTTPRoute shop/also-newest",
            "HTTPRoute shop/newest",
        ]
    );
    // Two parentRefs to one Service (two ports) still attach the route once per port.
    let m = model(&[
        service("shop", "web", &[80, 81]),
        http("  parentRefs:\n  - {group: \"\", kind: Service, name: web, port: 80}\n  - {group: \"\", kind: Service, name: web, port: 81}\n"),
    ]);
    assert_eq!(keys(m.attached_routes("shop", "web", 80)), ["HTTPRoute shop/r"]);
    assert_eq!(keys(m.attached_routes("shop", "web", 81)), ["HTTPRoute shop/r"]);
}

#[test]
fn duplicate_routes_conflict_only_within_a_kind() {
    let text = [
        attached("HTTPRoute", "shop", "r", None, "shop/web"),
        attached("GRPCRoute", "shop", "r", None, "shop/web"),
    ]
    .join("---\n");
    assert_eq!(parse(&text, Format::Yaml).unwrap().len(), 2);
    let twice = [
        attached("HTTPRoute", "shop", "r", None, "shop/web"),
        attached("HTTPRoute", "shop", "r", None, "shop/api"),
    ]
    .join("---\n");
    let e = err(&twice);
    assert!(e.contains("HTTPRoute \"shop/r\" is defined twice in this file"), "{e}");
}

#[test]
fn model_view_lists_routes() {
    let m = model(&[
        fixtures::SERVICE.to_owned(),
        BOOKINFO_CANARY.to_owned(),
        attached("GRPCRoute", "shop", "web", None, "shop/web"),
        attached("HTTPRoute", "shop", "web", None, "shop/web:80"),
    ]);
    let v = serde_json::to_value(m.view()).unwrap();
    assert_eq!(
        v["routes"],
        serde_json::json!([
            {"kind": "HTTPRoute", "namespace": "bookinfo", "name": "reviews-canary", "parents": ["bookinfo/reviews:9080"],
             "hostnames": [], "rules": 2,
             "backends": ["bookinfo/reviews-v2:9080=1", "bookinfo/reviews-v1:9080=90", "bookinfo/reviews-v2:9080=10"]},
            {"kind": "HTTPRoute", "namespace": "shop", "name": "web", "parents": ["shop/web:80"], "hostnames": [],
             "rules": 1, "backends": []},
            {"kind": "GRPCRoute", "namespace": "shop", "name": "web", "parents": ["shop/web"], "hostnames": [],
             "rules": 0, "backends": []},
        ])
    );
    assert_eq!(v["services"][0]["name"], "web", "the other fields are unchanged");
}

// --- The sources ---

/// A malformed edit of a route file keeps the route's last good version in force.
#[test]
fn a_malformed_route_file_keeps_the_last_good_route() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("canary.yaml");
    fs::write(dir.path().join("reviews.yaml"), service("bookinfo", "reviews", &[9080])).unwrap();
    fs::write(&file, BOOKINFO_CANARY).unwrap();
    let (tx, rx) = mpsc::channel();
    let _handle = ManifestDir::spawn(dir.path(), move |m| {
        let _ = tx.send(m);
    })
    .unwrap();
    let until = |what: &str, ok: &dyn Fn(&Model) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = rx.recv_timeout(left).unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
            if ok(&m) {
                return m;
            }
        }
    };
    let weights = |m: &Model| {
        m.attached_routes("bookinfo", "reviews", 9080)
            .first()
            .map(|r| r.rules[1].backends.iter().map(|b| b.weight).collect::<Vec<_>>())
    };
    let m = until("the canary", &|m| weights(m).is_some());
    assert_eq!(weights(&m), Some(vec![90, 10]));

    fs::write(
        &file,
        BOOKINFO_CANARY.replace("weight: 10", "weight: 50").replace("- type: Exact", "- type: Fuzzy"),
    )
    .unwrap();
    let m = until("the error", &|m| !m.errors().is_empty());
    assert_eq!(m.errors()[0].file, file);
    assert!(m.errors()[0].reason.contains("spec.rules[0].matches[0].headers[0].type"), "{:?}", m.errors());
    assert_eq!(weights(&m), Some(vec![90, 10]), "the last good route stays");

    fs::write(&file, BOOKINFO_CANARY.replace("weight: 10", "weight: 50")).unwrap();
    let m = until("the fix", &|m| m.errors().is_empty());
    assert_eq!(weights(&m), Some(vec![90, 50]));
}

/// A route as the API server sends it in a list (custom resources keep apiVersion and kind),
/// through `ApiObject` as the Kubernetes source does, makes the same model object as
/// the manifest.
#[test]
fn api_routes_make_the_same_model_as_manifests() {
    let watch = |label: &str| watches().iter().position(|w| w.label == label).unwrap();
    let mut s = KubeStore::new(&watches());
    for i in 0..watches().len() {
        s.init(i);
        s.init_done(i);
    }
    let api = |yaml: &str| {
        let mut v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        v["metadata"]["creationTimestamp"] = "2026-03-02T09:14:07Z".into();
        v["metadata"]["uid"] = "0f0e0d0c-0000-4000-8000-000000000001".into();
        v["metadata"]["resourceVersion"] = "42".into();
        v["status"] = serde_json::json!({"parents": []});
        v
    };
    let obj = |v: Value| ApiObject::from_json(v).expect("the source decodes the route");
    assert!(s.apply(watch("httproutes"), obj(api(BOOKINFO_CANARY))).changed());
    let grpc_yaml = attached("GRPCRoute", "bookinfo", "ratings", None, "bookinfo/ratings");
    assert!(s.apply(watch("grpcroutes"), obj(api(&grpc_yaml))).changed());
    let mut bad = api(&grpc_yaml);
    bad["metadata"]["name"] = "broken".into();
    bad["spec"]["rules"] = serde_json::json!([{"timeouts": {"request": "1s"}}]);
    s.apply(watch("grpcroutes"), obj(bad));
    let m = s.build();

    let from_api = m.route(RouteKind::Http, "bookinfo", "reviews-canary").unwrap();
    let mut expected = one(BOOKINFO_CANARY);
    expected.created = Some("2026-03-02T09:14:07Z".into());
    assert_eq!(**from_api, expected);
    assert!(m.route(RouteKind::Grpc, "bookinfo", "ratings").is_some());
    assert_eq!(m.errors().len(), 1);
    assert_eq!(m.errors()[0].file.to_str(), Some("kubernetes:GRPCRoute/bookinfo/broken"));
    assert!(m.errors()[0].reason.contains("spec.rules[0].timeouts"), "{:?}", m.errors());
}
