//! Istio's VirtualService against the compiled tables: Istio's order (first match wins), host
//! resolution (short names, FQDNs, ServiceEntry hosts), `exportTo`, several resources for one
//! host (VirtualServices and HTTPRoutes, as Istio's sidecars order them), client conditions,
//! delegation, retries and faults as the rule carries them, tcp/tls rules, and rejections
//! naming the field.

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue, Method};

use crate::discovery::istio::vs_compile::StreamConn;
use crate::discovery::manifest::{parse, Format};
use crate::discovery::route::ClientInfo;
use crate::discovery::route_table::{Lookup, RequestParts};
use crate::discovery::*;

fn model(docs: &[String]) -> Model {
    Model::from_manifest(&docs.join("---\n"), Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn service(ns: &str, name: &str, ports: &[u16]) -> String {
    let ports: String = ports.iter().map(|p| format!("  - {{name: http-{p}, port: {p}}}\n")).collect();
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports:\n{ports}")
}

/// A VirtualService `ns/name` created at `created` (if any) with `spec` (indented by two).
fn vs(ns: &str, name: &str, created: Option<&str>, spec: &str) -> String {
    let created = created.map(|c| format!(", creationTimestamp: \"{c}\"")).unwrap_or_default();
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}{created}}}\nspec:\n{spec}")
}

/// An HTTPRoute `ns/name` on Service `svc` (`ns/name`) sending everything to `backend`.
fn httproute(ns: &str, name: &str, created: &str, svc: &str, backend: &str) -> String {
    let (svc_ns, svc_name) = svc.split_once('/').unwrap();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\n\
         spec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: {svc_name}, namespace: {svc_ns}}}\n  rules:\n  - backendRefs:\n    - {{name: {backend}, namespace: {svc_ns}, port: 80}}\n"
    )
}

fn err(yaml: &str) -> String {
    match parse(yaml, Format::Yaml) {
        Ok(o) => panic!("expected an error, parsed {o:?}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `yaml` is rejected with a message naming `field` and containing `reason`.
fn rejects(yaml: &str, field: &str, reason: &str) {
    let e = err(yaml);
    assert!(
        e.contains(field) && e.contains(reason),
        "expected `{field}` and `{reason}` in:\n  {e}\nfor:\n{yaml}"
    );
}

/// A request from a client pod.
struct Req<'a> {
    ns: &'a str,
    labels: Option<&'a BTreeMap<String, String>>,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
}

fn req<'a>(ns: &'a str, path: &'a str) -> Req<'a> {
    Req { ns, labels: None, path, headers: &[] }
}

/// What the chain of tables of `svc_ns/svc:port` decides for `r`: `route rule → backends`,
/// `404`, or `service` (no resource decides: the Service's own endpoints).
fn decide(m: &Model, svc: &str, port: u16, r: &Req<'_>) -> String {
    let (svc_ns, svc_name) = svc.split_once('/').unwrap();
    let mut headers = HeaderMap::new();
    for (k, v) in r.headers {
        headers.insert(
            http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let parts = RequestParts {
        method: &Method::GET,
        path: r.path,
        query: None,
        headers: &headers,
        authority: None,
        client: ClientInfo { namespace: r.ns, labels: r.labels },
    };
    let tables = m.port_routes(svc_ns, svc_name, port).map_or(&[][..], |t| t.for_client(r.ns));
    for t in tables {
        match t.lookup(&parts, false) {
            Lookup::Matched(s) => {
                let backends: Vec<String> = s
                    .rule
                    .backends
                    .iter()
                    .map(|b| format!("{}/{}:{} {}", b.namespace, b.name, b.port.unwrap_or(0), b.weight))
                    .collect();
                return format!(
                    "{} {} #{} → {}",
                    s.route.kind,
                    s.route.key(),
                    s.rule_index,
                    backends.join(", ")
                );
            }
            Lookup::NoMatch => return "404".into(),
            Lookup::NotForClient => continue,
        }
    }
    "service".into()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn rules_are_evaluated_in_order_and_the_first_match_wins() {
    // A Gateway API table would prefer the Exact path; Istio takes the first rule that matches.
    let spec = "  hosts: [web]\n  http:\n  - match:\n    - uri: {prefix: /api}\n    route:\n    - destination: {host: web-a}\n\
                \x20 - match:\n    - uri: {exact: /api/x}\n    route:\n    - destination: {host: web-b}\n\
                \x20 - match:\n    - headers: {x-canary: {exact: \"yes\"}}\n    route:\n    - destination: {host: web-b}\n";
    let m = model(&[
        service("shop", "web", &[80]),
        service("shop", "web-a", &[80]),
        service("shop", "web-b", &[80]),
        vs("shop", "web", None, spec),
    ]);
    assert_eq!(
        decide(&m, "shop/web", 80, &req("shop", "/api/x")),
        "VirtualService shop/web #0 → shop/web-a:80 1"
    );
    let canary = Req { headers: &[("x-canary", "yes")], ..req("shop", "/other") };
    assert_eq!(decide(&m, "shop/web", 80, &canary), "VirtualService shop/web #2 → shop/web-b:80 1");
    assert_eq!(
        decide(&m, "shop/web", 80, &req("shop", "/other")),
        "404",
        "no rule matches: 404 (Envoy's answer)"
    );
}

/// `withoutHeaders` (the request must lack the header, or carry it with a value that does not
/// match) and `ignoreUriCase` (the uri match, not the headers, ignores case).
#[test]
fn without_headers_and_ignore_uri_case() {
    let spec = "  hosts: [web]\n  http:\n  - match:\n    - withoutHeaders: {x-canary: {exact: \"yes\"}}\n      uri: {prefix: /API}\n      ignoreUriCase: true\n    route:\n    - destination: {host: web-a}\n\
                \x20 - route:\n    - destination: {host: web-b}\n";
    let m = model(&[
        service("shop", "web", &[80]),
        service("shop", "web-a", &[80]),
        service("shop", "web-b", &[80]),
        vs("shop", "web", None, spec),
    ]);
    let a = "VirtualService shop/web #0 → shop/web-a:80 1";
    let b = "VirtualService shop/web #1 → shop/web-b:80 1";
    assert_eq!(decide(&m, "shop/web", 80, &req("shop", "/api/x")), a, "prefix /API matches /api, no header");
    assert_eq!(decide(&m, "shop/web", 80, &req("shop", "/Api/x")), a);
    assert_eq!(decide(&m, "shop/web", 80, &req("shop", "/other")), b);
    let canary = Req { headers: &[("x-canary", "yes")], ..req("shop", "/api/x") };
    assert_eq!(decide(&m, "shop/web", 80, &canary), b, "the header present with its value: not matched");
    let other = Req { headers: &[("x-canary", "no")], ..req("shop", "/api/x") };
    assert_eq!(decide(&m, "shop/web", 80, &other), a, "present with another value still lacks it");
}

#[test]
fn hosts_short_names_fqdns_and_service_entries() {
    let entry = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: ext, namespace: shop}\n\
                 spec:\n  hosts: [api.example.com]\n  ports:\n  - {number: 443, name: http, protocol: HTTP}\n  resolution: DNS\n"
        .to_owned();
    let m = model(&[
        service("shop", "reviews", &[9080]),
        service("other", "reviews", &[9080]),
        entry,
        // A short name is the resource's namespace's Service.
        vs("other", "short", None, "  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n"),
        // The FQDN names shop's from anywhere; the destination too.
        vs(
            "client",
            "fqdn",
            None,
            "  hosts: [reviews.shop.svc.cluster.local]\n  http:\n  - route:\n    - destination: {host: reviews.shop.svc.cluster.local, port: {number: 9080}}\n",
        ),
        vs("shop", "ext", None, "  hosts: [api.example.com]\n  http:\n  - route:\n    - destination: {host: api.example.com}\n"),
    ]);
    assert_eq!(
        decide(&m, "other/reviews", 9080, &req("other", "/")),
        "VirtualService other/short #0 → other/reviews:9080 1"
    );
    assert_eq!(
        decide(&m, "shop/reviews", 9080, &req("web", "/")),
        "VirtualService client/fqdn #0 → shop/reviews:9080 1"
    );
    let entry_tables = m.entry_port_routes("shop", "ext", 443).expect("the ServiceEntry host has a table");
    assert_eq!(entry_tables.for_client("shop").len(), 1);
    let status = m.virtual_service_status("client/fqdn").expect("status");
    assert_eq!(status.targets, ["Service shop/reviews"]);
}

#[test]
fn several_virtual_services_for_one_host_are_not_merged_the_oldest_decides() {
    let m = model(&[
        service("shop", "web", &[80]),
        service("shop", "web-a", &[80]),
        service("shop", "web-b", &[80]),
        vs("shop", "newer", Some("2026-02-01T00:00:00Z"), "  hosts: [web]\n  http:\n  - match:\n    - uri: {prefix: /b}\n    route:\n    - destination: {host: web-b}\n"),
        vs("shop", "older", Some("2026-01-01T00:00:00Z"), "  hosts: [web]\n  http:\n  - match:\n    - uri: {prefix: /a}\n    route:\n    - destination: {host: web-a}\n"),
    ]);
    assert_eq!(
        decide(&m, "shop/web", 80, &req("shop", "/a")),
        "VirtualService shop/older #0 → shop/web-a:80 1"
    );
    // The newer resource is never consulted, even for what only it matches (istio/istio#36621).
    assert_eq!(decide(&m, "shop/web", 80, &req("shop", "/b")), "404");
}

#[test]
fn httproutes_and_virtual_services_mix_as_in_istio() {
    let docs = [
        service("shop", "web", &[80]),
        service("shop", "web-a", &[80]),
        service("shop", "web-b", &[80]),
        service("shop", "web-c", &[80]),
        // The VirtualService is older than the producer HTTPRoute.
        vs(
            "shop",
            "vs",
            Some("2026-01-01T00:00:00Z"),
            "  hosts: [web]\n  http:\n  - route:\n    - destination: {host: web-a}\n",
        ),
        httproute("shop", "producer", "2026-02-01T00:00:00Z", "shop/web", "web-b"),
        httproute("team", "consumer", "2026-03-01T00:00:00Z", "shop/web", "web-c"),
    ];
    let m = model(&docs);
    // In the Service's namespace its own HTTPRoutes come first (Istio's UseGatewaySemantics
    // with the client's namespace).
    assert_eq!(decide(&m, "shop/web", 80, &req("shop", "/")), "HTTPRoute shop/producer #0 → shop/web-b:80 1");
    // A namespace with consumer routes: they come first.
    assert_eq!(decide(&m, "shop/web", 80, &req("team", "/")), "HTTPRoute team/consumer #0 → shop/web-c:80 1");
    // Elsewhere: the public VirtualService and the producer route, oldest first.
    assert_eq!(
        decide(&m, "shop/web", 80, &req("elsewhere", "/")),
        "VirtualService shop/vs #0 → shop/web-a:80 1"
    );
}

#[test]
fn export_to_limits_the_clients_that_see_a_virtual_service() {
    let m = model(&[
        service("shop", "web", &[80]),
        service("shop", "web-a", &[80]),
        service("shop", "web-b", &[80]),
        vs("shop", "private", None, "  hosts: [web]\n  exportTo: [.]\n  http:\n  - route:\n    - destination: {host: web-a}\n"),
        vs(
            "team",
            "for-team",
            None,
            "  hosts: [web.shop.svc.cluster.local]\n  exportTo: [team]\n  http:\n  - route:\n    - destination: {host: web-b.shop.svc.cluster.local}\n",
        ),
    ]);
    assert_eq!(
        decide(&m, "shop/web", 80, &req("shop", "/")),
        "VirtualService shop/private #0 → shop/web-a:80 1"
    );
    assert_eq!(
        decide(&m, "shop/web", 80, &req("team", "/")),
        "VirtualService team/for-team #0 → shop/web-b:80 1"
    );
    assert_eq!(decide(&m, "shop/web", 80, &req("elsewhere", "/")), "service", "exported to neither");
}

#[test]
fn source_labels_and_namespace_match_the_client_pod() {
    let spec = "  hosts: [web]\n  http:\n  - match:\n    - sourceLabels: {app: productpage}\n    route:\n    - destination: {host: web-a}\n\
                \x20 - match:\n    - sourceNamespace: team\n    route:\n    - destination: {host: web-b}\n";
    let m = model(&[
        service("shop", "web", &[80]),
        service("shop", "web-a", &[80]),
        service("shop", "web-b", &[80]),
        vs("shop", "scoped", None, spec),
    ]);
    let pp = labels(&[("app", "productpage")]);
    let other = labels(&[("app", "ratings")]);
    assert_eq!(
        decide(&m, "shop/web", 80, &Req { labels: Some(&pp), ..req("shop", "/") }),
        "VirtualService shop/scoped #0 → shop/web-a:80 1"
    );
    assert_eq!(
        decide(&m, "shop/web", 80, &Req { labels: Some(&other), ..req("team", "/") }),
        "VirtualService shop/scoped #1 → shop/web-b:80 1"
    );
    // Every rule is for other clients: the resource does not decide, the Service does.
    assert_eq!(decide(&m, "shop/web", 80, &Req { labels: Some(&other), ..req("shop", "/") }), "service");
}

#[test]
fn delegate_rules_replace_the_root_rule_with_merged_matches() {
    let root = "  hosts: [web]\n  http:\n  - match:\n    - uri: {prefix: /api}\n    timeout: 3s\n    delegate: {name: api, namespace: team}\n";
    let delegate = "  http:\n  - match:\n    - uri: {prefix: /api/v2}\n    route:\n    - destination: {host: web-b.shop.svc.cluster.local}\n\
                    \x20 - route:\n    - destination: {host: web-a.shop.svc.cluster.local}\n";
    let m = model(&[
        service("shop", "web", &[80]),
        service("shop", "web-a", &[80]),
        service("shop", "web-b", &[80]),
        vs("shop", "root", None, root),
        vs("team", "api", None, delegate),
    ]);
    assert_eq!(
        decide(&m, "shop/web", 80, &req("shop", "/api/v2/x")),
        "VirtualService shop/root #0 → shop/web-b:80 1"
    );
    assert_eq!(
        decide(&m, "shop/web", 80, &req("shop", "/api/v1")),
        "VirtualService shop/root #1 → shop/web-a:80 1"
    );
    assert_eq!(decide(&m, "shop/web", 80, &req("shop", "/other")), "404", "the root's match still applies");
    let table = &m.port_routes("shop", "web", 80).unwrap().for_client("shop")[0];
    let rule = &table.entries().next().unwrap().0.rules[0];
    assert_eq!(
        rule.timeouts.request,
        Some(std::time::Duration::from_secs(3)),
        "unset fields come from the root rule"
    );
    assert_eq!(
        rule.origin.as_deref(),
        Some("http[0] (delegate team/api http[0])"),
        "the rule says where it was written"
    );

    // A missing delegate drops the root rule, and the status says why.
    let m = model(&[service("shop", "web", &[80]), vs("shop", "root", None, root)]);
    let status = m.virtual_service_status("shop/root").expect("status");
    assert!(status.problems.iter().any(|p| p.contains("team/api")), "{status:?}");
}

#[test]
fn retries_timeouts_and_faults_are_carried_by_the_rule() {
    let spec = "  hosts: [web]\n  http:\n  - match:\n    - headers: {end-user: {exact: jason}}\n    fault:\n      delay: {fixedDelay: 7s, percentage: {value: 100}}\n      abort: {httpStatus: 500, percentage: {value: 10}}\n    route:\n    - destination: {host: web}\n\
                \x20 - timeout: 2s\n    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: \"5xx,retriable-4xx,503,unavailable,deadline-exceeded,reset-before-request\"}\n    route:\n    - destination: {host: web}\n";
    let m = model(&[service("shop", "web", &[80]), vs("shop", "web", None, spec)]);
    let table = &m.port_routes("shop", "web", 80).unwrap().for_client("shop")[0];
    let route = &table.entries().next().unwrap().0;
    let fault = route.rules[0].fault.as_ref().expect("fault");
    assert_eq!(fault.delay.as_ref().map(|d| d.fixed), Some(std::time::Duration::from_secs(7)));
    let abort = fault.abort.as_ref().expect("abort");
    assert_eq!((abort.http_status, abort.fraction.0), (500, 0.1));
    // A rule without retries gets Istio's default: 2 on connect-failure, refused-stream,
    // unavailable, cancelled.
    let default = route.rules[0].retry_policy.as_ref().expect("Istio's default retries");
    assert_eq!(default.attempts, 2);
    assert!(default.retry_on.connect_failure && default.retry_on.refused_stream);
    assert!(
        default.retry_on.grpc_unavailable && default.retry_on.grpc_cancelled && !default.retry_on.status_5xx
    );
    let r = route.rules[1].retry_policy.as_ref().expect("retries");
    assert_eq!(r.attempts, 3);
    assert_eq!(r.per_try_timeout, Some(std::time::Duration::from_millis(500)));
    assert!(r.retry_on.status_5xx && r.retry_on.retriable_status_codes && r.retry_on.grpc_unavailable);
    assert!(r.retry_on.grpc_deadline_exceeded && r.retry_on.connect_failure && r.retry_on.refused_stream);
    assert_eq!(r.retriable_status_codes, [409, 503], "retriable-4xx is 409, then the listed code");
    assert_eq!(route.rules[1].timeouts.request, Some(std::time::Duration::from_secs(2)));
}

#[test]
fn tcp_and_tls_rules_choose_a_destination_per_connection() {
    let spec = "  hosts: [db, \"*.db.test\"]\n  tls:\n  - match:\n    - sniHosts: [a.db.test]\n    route:\n    - destination: {host: db-a}\n\
                \x20 tcp:\n  - match:\n    - sourceNamespace: team\n    route:\n    - destination: {host: db-b, port: {number: 5432}}\n      weight: 70\n    - destination: {host: db-a, port: {number: 5432}}\n      weight: 30\n";
    let m = model(&[
        service("shop", "db", &[5432]),
        service("shop", "db-a", &[5432]),
        service("shop", "db-b", &[5432]),
        vs("shop", "db", None, spec),
    ]);
    let chains = m.stream_routes("shop", "db", 5432).expect("stream rules for the port");
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let conn = |ns: &'static str, sni: Option<&'static str>| StreamConn {
        dst: ip,
        src: ip,
        sni,
        client: ClientInfo { namespace: ns, labels: None },
    };
    assert!(chains.needs_sni(&ClientInfo { namespace: "shop", labels: None }));
    let (_, rule) = chains.select(&conn("shop", Some("A.db.test."))).expect("the SNI names a.db.test");
    assert_eq!((rule.origin.as_str(), rule.backends[0].name.as_str()), ("tls[0]", "db-a"));
    assert!(chains.select(&conn("shop", Some("b.db.test"))).is_none(), "no rule: the Service decides");
    assert!(chains.select(&conn("shop", None)).is_none(), "no SNI read: tls rules cannot match");
    let (_, rule) = chains.select(&conn("team", None)).expect("tcp rule for team");
    assert_eq!(rule.origin, "tcp[0]");
    let weights: Vec<(&str, u32)> = rule.backends.iter().map(|b| (b.name.as_str(), b.weight)).collect();
    assert_eq!(weights, [("db-b", 70), ("db-a", 30)]);
}

#[test]
fn what_sluice_cannot_honour_is_rejected_with_its_path() {
    let one =
        |rule: &str| vs("shop", "v", None, &format!("  hosts: [web]\n  http:\n  - {}", rule.trim_start()));
    rejects(
        &one("corsPolicy: {allowOrigins: [{exact: a}]}\n    route:\n    - destination: {host: web}\n"),
        "spec.http[0].corsPolicy",
        "not supported",
    );
    rejects(
        &one("retries: {attempts: 2, retryOn: retriable-headers}\n    route:\n    - destination: {host: web}\n"),
        "spec.http[0].retries.retryOn",
        "retriable-headers",
    );
    rejects(
        &one("retries: {attempts: 2, retryOn: \"5xx,sometimes\"}\n    route:\n    - destination: {host: web}\n"),
        "spec.http[0].retries.retryOn",
        "\"sometimes\" is not a retry condition",
    );
    rejects(
        &one("fault: {delay: {exponentialDelay: 1s}}\n    route:\n    - destination: {host: web}\n"),
        "spec.http[0].fault.delay.exponentialDelay",
        "not supported",
    );
    rejects(
        &one("match:\n    - headers: {\"@request.auth.claims.group\": {exact: admin}}\n    route:\n    - destination: {host: web}\n"),
        "spec.http[0].match[0].headers",
        "JWT claims",
    );
    rejects(
        &one("route:\n    - destination: {host: web}\n      wieght: 10\n"),
        "spec.http[0].route[0]",
        "wieght",
    );
    rejects(
        &one("timeout: soon\n    route:\n    - destination: {host: web}\n"),
        "spec.http[0].timeout",
        "not a duration",
    );
    rejects(
        &vs("shop", "v", None, "  hosts: [10.0.0.1]\n  http:\n  - route:\n    - destination: {host: web}\n"),
        "spec.hosts[0]",
        "IP address",
    );
    rejects(
        &vs("shop", "v", None, "  hosts: [web]\n  exportTo: [\"~\", shop]\n  http:\n  - route:\n    - destination: {host: web}\n"),
        "spec.exportTo[0]",
        "only entry",
    );
    rejects(
        &vs("shop", "v", None, "  hosts: [web]\n  tls:\n  - route:\n    - destination: {host: web}\n"),
        "spec.tls[0].match",
        "sniHosts",
    );
    rejects(
        &vs("shop", "v", None, "  hosts: [web]\n  tls:\n  - match:\n    - sniHosts: [other.test]\n    route:\n    - destination: {host: web}\n"),
        "spec.tls[0].match[0].sniHosts[0]",
        "is not one of the VirtualService's hosts",
    );
}
