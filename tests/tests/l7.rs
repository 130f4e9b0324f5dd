//! L7 acceptance: per-request balancing of HTTP/1.1 keep-alive and gRPC (HTTP/2) connections,
//! Gateway API routes (matches, weights, filters, timeouts), P2C over peak-EWMA, and sluice's
//! own error responses. Real clients (simpod's HTTP client, curl, a tonic gRPC client) in
//! enrolled pods, real backends, sluice in between.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use common::{expect_ok, wait_enrolled, T};
use serde_json::{json, Value};
use sluice_tests::{
    manifest,
    workloads::{grpc_client, start_grpc_server_with, start_http_server},
    Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts,
};

const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 50051;

/// A simulated node with sluice and an enrolled namespace `shop` holding a client pod.
struct L7World {
    sim: Sim,
    node: Node,
    client: Pod,
    sluice: Sluice,
    servers: Vec<SimProcess>,
}

impl L7World {
    fn new() -> Result<L7World> {
        L7World::with(SluiceOpts::default())
    }

    fn with(opts: SluiceOpts) -> Result<L7World> {
        let sim = Sim::new()?;
        let node = sim.add_node("n1")?;
        sim.write_namespace("shop", true)?;
        let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
        let sluice = node.start_sluice(opts)?;
        sluice.wait_ready(T)?;
        wait_enrolled(&sluice, &client)?;
        Ok(L7World { sim, node, client, sluice, servers: Vec::new() })
    }

    /// Backend pods `<prefix>-0..n` in `shop` (labels app=<prefix>), each running simpod's HTTP
    /// server on 8080 named after the pod (`extra` args per pod index, e.g. a delay).
    fn http_backends(&mut self, prefix: &str, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Result<Vec<Pod>> {
        let mut pods = Vec::new();
        for i in 0..n {
            let name = format!("{prefix}-{i}");
            let pod = self.node.add_pod("shop", &name, PodOpts::labels(&[("app", prefix)]))?;
            let args = extra(i);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.servers.push(start_http_server(&pod, HTTP_PORT, &name, &args)?);
            wait_enrolled(&self.sluice, &pod)?;
            pods.push(pod);
        }
        Ok(pods)
    }

    /// A Service `shop/<name>` at `ip:port` → `target_port` on `endpoints`, with `appProtocol`;
    /// returns once sluice has loaded it.
    fn service(&self, name: &str, ip: &str, port: u16, target_port: u16, app_protocol: Option<&str>, endpoints: &[&Pod]) -> Result<()> {
        let before = self.generation()?;
        let node_names: Vec<String> = endpoints.iter().map(|p| p.node().name().to_string()).collect();
        let eps: Vec<manifest::Endpoint> = endpoints
            .iter()
            .zip(&node_names)
            .map(|(p, node_name)| manifest::Endpoint {
                ip: p.ip(),
                pod_name: p.name(),
                pod_namespace: p.namespace(),
                pod_uid: p.uid(),
                node_name,
                labels: p.labels(),
            })
            .collect();
        let mut docs = manifest::service("shop", name, ip, &[("http", port, target_port)], &eps);
        if let Some(app) = app_protocol {
            docs[0]["spec"]["ports"][0]["appProtocol"] = json!(app);
            docs[1]["ports"][0]["appProtocol"] = json!(app);
        }
        self.sim.write_file(&manifest::service_file_name("shop", name), manifest::to_yaml(&docs)?)?;
        self.wait_model(before)?;
        Ok(())
    }

    /// sluice's log lines about requests it answered itself or problems it saw.
    fn sluice_complaints(&self) -> String {
        self.sluice
            .log_contents()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("answered by sluice"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until sluice's model has `generation` above `after` and no manifest errors
    /// naming `file` (what was just written is in force).
    fn wait_model(&self, after: u64) -> Result<Value> {
        self.sluice.wait_for("/model", |m| m["generation"].as_u64().unwrap_or(0) > after, T)
    }

    fn generation(&self) -> Result<u64> {
        self.sluice.get_json("/model")?["generation"].as_u64().context("model generation")
    }

    /// Writes a manifest and waits until sluice has loaded it.
    fn apply(&self, file: &str, yaml: &str) -> Result<Value> {
        let before = self.generation()?;
        self.sim.write_file(file, yaml)?;
        self.wait_model(before)
    }

    /// `simpod http-get` from the client: `count` requests, one keep-alive connection.
    fn get(&self, to: SocketAddr, path: &str, count: u32, headers: &[&str]) -> Result<Vec<Value>> {
        let mut args = vec![
            "http-get".to_string(),
            "--to".into(),
            to.to_string(),
            "--path".into(),
            path.into(),
            "--count".into(),
            count.to_string(),
            "--keepalive".into(),
        ];
        for h in headers {
            args.push("--header".into());
            args.push(h.to_string());
        }
        let out = self.client.run_simpod_timeout(&args, Duration::from_secs(120))?;
        let lines = out.json_lines()?;
        ensure!(lines.len() == count as usize, "expected {count} results, got {}: {}", lines.len(), out.stderr);
        Ok(lines)
    }

    /// curl from the client pod: (status, response headers lower-cased, body).
    fn curl(&self, args: &[&str]) -> Result<Curl> {
        let mut all = vec!["curl", "-sS", "--max-time", "10", "-D", "-", "-o", "-"];
        all.extend(args);
        let out = self.client.run_timeout(&all, Duration::from_secs(20))?;
        ensure!(out.success(), "curl {args:?} failed: {} {}", out.stdout, out.stderr);
        Curl::parse(&out.stdout)
    }
}

struct Curl {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Curl {
    fn parse(raw: &str) -> Result<Curl> {
        // With redirects not followed there is one head; skip a 100 Continue if any.
        let mut rest = raw;
        loop {
            let (head, body) = rest.split_once("\r\n\r\n").context("no header block in curl output")?;
            let mut lines = head.lines();
            let status: u16 = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).context("status line")?;
            if status == 100 {
                rest = body;
                continue;
            }
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            return Ok(Curl { status, headers, body: body.to_string() });
        }
    }

    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("response body is not JSON: {}", self.body))
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

fn count_by_backend(lines: &[Value]) -> Result<BTreeMap<String, usize>> {
    let mut by = BTreeMap::new();
    for l in lines {
        expect_ok(l)?;
        ensure!(l["status"] == 200, "unexpected status: {l}");
        *by.entry(l["body"]["name"].as_str().unwrap_or("?").to_string()).or_default() += 1;
    }
    Ok(by)
}

fn one_connection(lines: &[Value]) -> Result<()> {
    let locals: std::collections::BTreeSet<&str> = lines.iter().filter_map(|l| l["local"].as_str()).collect();
    ensure!(locals.len() == 1, "expected one client connection, saw {locals:?}");
    Ok(())
}

/// 2. One HTTP/1.1 keep-alive connection with 300 requests: each of 3 backends gets at least
///    20 % (connection-level balancing would give one backend everything).
#[test]
fn keepalive_requests_are_balanced_per_request() -> Result<()> {
    // Round robin: what is tested is that each request of one keep-alive connection is
    // balanced on its own, whatever the policy. The default policy weighs latency, so on a
    // loaded machine one slow answer would legitimately steer most of a 300-request run away
    // from a backend (its own behaviour is tested by `slow_endpoint_gets_few_requests`).
    let mut w = L7World::with(SluiceOpts { args: vec!["--lb-policy".into(), "round-robin".into()], ..Default::default() })?;
    let pods = w.http_backends("web", 3, |_| vec![])?;
    w.service("web", "10.96.1.10", 80, HTTP_PORT, Some("http"), &pods.iter().collect::<Vec<_>>())?;
    let lines = w.get(addr("10.96.1.10", 80), "/", 300, &[])?;
    one_connection(&lines)?;
    let by = count_by_backend(&lines)?;
    for p in &pods {
        let n = by.get(p.name()).copied().unwrap_or(0);
        ensure!(n >= 60, "{} served {n} of 300 (< 20 %): {by:?}", p.name());
    }
    // Each backend saw the client pod's own IP (upstream sockets are made in its namespace).
    let peer = lines[0]["body"]["peer"].as_str().unwrap_or("");
    ensure!(peer.starts_with(&format!("{}:", w.client.ip())), "backend saw {peer}");
    let status = w.sluice.get_json("/status")?;
    ensure!(status["counters"]["http_requests"].as_u64().unwrap_or(0) >= 300, "{status}");
    eprintln!("300 keep-alive requests over one connection: {by:?}");
    Ok(())
}

fn grpc_backends(w: &mut L7World, node: &Node, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Result<Vec<Pod>> {
    let mut pods = Vec::new();
    for i in 0..n {
        let name = format!("grpc-{}-{i}", node.short_name());
        let pod = node.add_pod("shop", &name, PodOpts::labels(&[("app", "grpc")]))?;
        let args = extra(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        w.servers.push(start_grpc_server_with(&pod, GRPC_PORT, &name, &args)?);
        pods.push(pod);
    }
    Ok(pods)
}

/// 1. One HTTP/2 connection carrying 1000 gRPC calls to a Service with 3 backends: each
///    backend serves between 25 % and 42 %.
#[test]
fn grpc_calls_on_one_connection_are_spread_over_all_backends() -> Result<()> {
    let mut w = L7World::new()?;
    let node = w.node.clone();
    let pods = grpc_backends(&mut w, &node, 3, |_| vec![])?;
    for p in &pods {
        wait_enrolled(&w.sluice, p)?;
    }
    w.service("grpc", "10.96.1.11", GRPC_PORT, GRPC_PORT, Some("grpc"), &pods.iter().collect::<Vec<_>>())?;
    let s = grpc_client(&w.client, addr("10.96.1.11", GRPC_PORT), 1000, 8, &[])?;
    ensure!(s.ok && s.succeeded == 1000, "gRPC calls failed: {s:?}\n{}", w.sluice_complaints());
    ensure!(s.connections == 1, "the client must have used one connection: {s:?}");
    for p in &pods {
        let n = s.by_server.get(p.name()).copied().unwrap_or(0);
        ensure!((250..=420).contains(&n), "{} served {n} of 1000 (outside 25-42 %): {:?}", p.name(), s.by_server);
    }
    let status = w.sluice.get_json("/status")?;
    ensure!(status["counters"]["detected_http2"].as_u64().unwrap_or(0) >= 1, "{status}");
    eprintln!("1000 gRPC calls over one HTTP/2 connection: {:?} (p50 {:?} ms, p99 {:?} ms)", s.by_server, s.p50_ms, s.p99_ms);
    Ok(())
}

/// Between nodes, gRPC backends that are enrolled pods on another node: every call travels
/// inside the mTLS tunnel, and the upstream HTTP/2 connections (one per endpoint) are streams
/// of one tunnel connection per destination: a handful of tunnel streams for 600 calls.
#[test]
fn grpc_across_nodes_is_multiplexed_inside_the_tunnel() -> Result<()> {
    let mut w = L7World::new()?;
    let n2 = w.sim.add_node("n2")?;
    let s2 = n2.start_sluice(SluiceOpts::default())?;
    s2.wait_ready(T)?;
    let pods = grpc_backends(&mut w, &n2, 2, |_| vec![])?;
    for p in &pods {
        wait_enrolled(&s2, p)?;
    }
    w.service("grpc", "10.96.1.12", GRPC_PORT, GRPC_PORT, Some("grpc"), &pods.iter().collect::<Vec<_>>())?;
    s2.wait_for("/model", |m| m["services"].as_array().is_some_and(|a| !a.is_empty()), T)?;
    let s = grpc_client(&w.client, addr("10.96.1.12", GRPC_PORT), 600, 8, &[])?;
    ensure!(s.ok && s.succeeded == 600, "gRPC calls failed: {s:?}");
    for p in &pods {
        ensure!(s.by_server.get(p.name()).copied().unwrap_or(0) >= 150, "{:?}", s.by_server);
    }
    // The backends saw the client pod's IP: delivered by node 2's sluice with the source kept.
    ensure!(s.peers.keys().all(|p| p.starts_with(&format!("{}:", w.client.ip()))), "peers: {:?}", s.peers);
    let streams = s2.get_json("/status")?["counters"]["hbone_streams_in"].as_u64().unwrap_or(0);
    ensure!((2..=8).contains(&streams), "expected one tunnel stream per upstream connection, saw {streams}");
    let conns = s2.get_json("/conns")?;
    ensure!(
        conns.as_array().is_some_and(|a| a.iter().any(|c| c["security"] == "mtls" && c["peer_identity"].as_str().is_some_and(|p| p.ends_with("/ns/shop/sa/default")))),
        "node 2 should list mTLS connections from the client's identity: {conns}"
    );
    eprintln!("600 gRPC calls across nodes: {:?}, {streams} tunnel streams", s.by_server);
    Ok(())
}

fn route_yaml(name: &str, parent: &str, port: u16, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: {parent}\n    port: {port}\n  rules:\n{rules}"
    )
}

/// 3. Canary: weights 90/10 between reviews-v1 and reviews-v2: over 2000 requests v2 serves
///    10 % ± 3 %. A header match (`x-user: test`) and a cookie regex (`user=test-user`, as in
///    Istio's Bookinfo) send every matching request to v2 while the rest keep the split.
#[test]
fn canary_weights_header_and_cookie_matches() -> Result<()> {
    let mut w = L7World::new()?;
    let v1 = w.http_backends("reviews-v1", 2, |_| vec![])?;
    let v2 = w.http_backends("reviews-v2", 1, |_| vec![])?;
    let all: Vec<&Pod> = v1.iter().chain(&v2).collect();
    w.service("reviews", "10.96.1.20", 9080, HTTP_PORT, Some("http"), &all)?;
    w.service("reviews-v1", "10.96.1.21", 9080, HTTP_PORT, Some("http"), &v1.iter().collect::<Vec<_>>())?;
    w.service("reviews-v2", "10.96.1.22", 9080, HTTP_PORT, Some("http"), &v2.iter().collect::<Vec<_>>())?;
    let rules = r#"  - matches:
    - headers:
      - name: x-user
        value: test
    - headers:
      - name: cookie
        type: RegularExpression
        value: "^(.*?;\\s*)?(user=test-user)(;.*)?$"
    backendRefs:
    - name: reviews-v2
      port: 9080
  - backendRefs:
    - name: reviews-v1
      port: 9080
      weight: 90
    - name: reviews-v2
      port: 9080
      weight: 10
"#;
    let model = w.apply("route-reviews.yaml", &route_yaml("reviews", "reviews", 9080, rules))?;
    ensure!(model["errors"].as_array().is_some_and(|e| e.is_empty()), "route rejected: {}", model["errors"]);
    let vip = addr("10.96.1.20", 9080);

    let lines = w.get(vip, "/reviews/1", 2000, &[])?;
    let by = count_by_backend(&lines)?;
    let v2_count = by.get("reviews-v2-0").copied().unwrap_or(0);
    ensure!((140..=260).contains(&v2_count), "v2 served {v2_count} of 2000 (expected 10 % ± 3 %): {by:?}");
    ensure!(by.keys().all(|k| k.starts_with("reviews-v")), "{by:?}");

    let lines = w.get(vip, "/reviews/1", 200, &["x-user: test"])?;
    let by_header = count_by_backend(&lines)?;
    ensure!(by_header.get("reviews-v2-0") == Some(&200), "header match: {by_header:?}");
    let lines = w.get(vip, "/reviews/1", 200, &["Cookie: session=abc; user=test-user; theme=dark"])?;
    let by_cookie = count_by_backend(&lines)?;
    ensure!(by_cookie.get("reviews-v2-0") == Some(&200), "cookie match: {by_cookie:?}");
    // A near miss of the cookie is just traffic: split again.
    let lines = w.get(vip, "/reviews/1", 200, &["Cookie: user=test-user2"])?;
    let by_other = count_by_backend(&lines)?;
    ensure!(by_other.get("reviews-v2-0").copied().unwrap_or(0) < 60, "non-matching cookie: {by_other:?}");

    // The CLI shows the table: both rules, the 90/10 weights, endpoints with their EWMA.
    let out = w.sluice.cli(&["routes", "shop/reviews"])?;
    ensure!(out.success(), "sluice routes: {}", out.stderr);
    for needle in ["HTTPRoute shop/reviews", "header x-user=test", "shop/reviews-v1:9080 90%", "shop/reviews-v2:9080 10%", "ewma="] {
        ensure!(out.stdout.contains(needle), "sluice routes lacks {needle:?}:\n{}", out.stdout);
    }
    eprintln!("canary over 2000 requests: {by:?}; header: {by_header:?}; cookie: {by_cookie:?}\n{}", out.stdout);
    Ok(())
}

/// 4. P2C over peak-EWMA: of 3 backends, the one that answers 50 ms slower gets under 10 % of
///    the requests at steady state.
#[test]
fn slow_endpoint_gets_few_requests() -> Result<()> {
    let mut w = L7World::new()?;
    let pods = w.http_backends("web", 3, |i| if i == 2 { vec!["--delay-ms".into(), "50".into()] } else { vec![] })?;
    w.service("web", "10.96.1.30", 80, HTTP_PORT, Some("http"), &pods.iter().collect::<Vec<_>>())?;
    let vip = addr("10.96.1.30", 80);
    // Warm-up: every endpoint gets measured.
    w.get(vip, "/", 50, &[])?;
    // Steady state: four clients at once, 250 requests each.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(w.client.simpod(["http-get", "--to", &vip.to_string(), "--count", "250", "--keepalive"])?);
    }
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for mut c in clients {
        c.wait(Duration::from_secs(120))?;
        for (k, v) in count_by_backend(&c.json_lines())? {
            *by.entry(k).or_default() += v;
        }
    }
    let total: usize = by.values().sum();
    ensure!(total == 1000, "{by:?}");
    let slow = by.get("web-2").copied().unwrap_or(0);
    ensure!(slow < 100, "the slow endpoint got {slow} of {total} (should be < 10 %): {by:?}");
    let routes = w.sluice.get_json("/routes?service=shop/web")?;
    eprintln!("with web-2 50 ms slower: {by:?}\n{}", serde_json::to_string(&routes[0]["default_backend"]).unwrap_or_default());
    Ok(())
}

/// 5. Path, method, query and header matches, header modifiers, redirect, rewrite and mirror,
///    each verified by what the backend receives (simpod's HTTP server answers with the request
///    it saw: method, path, headers).
#[test]
fn matches_and_filters_as_the_backend_sees_them() -> Result<()> {
    let mut w = L7World::new()?;
    let a = w.http_backends("web-a", 1, |_| vec![])?;
    let b = w.http_backends("web-b", 1, |_| vec![])?;
    let mirror = w.http_backends("mirror", 1, |_| vec![])?;
    let all: Vec<&Pod> = a.iter().chain(&b).collect();
    w.service("web", "10.96.1.40", 80, HTTP_PORT, Some("http"), &all)?;
    w.service("web-a", "10.96.1.41", 80, HTTP_PORT, Some("http"), &[&a[0]])?;
    w.service("web-b", "10.96.1.42", 80, HTTP_PORT, Some("http"), &[&b[0]])?;
    w.service("mirror", "10.96.1.43", 80, HTTP_PORT, Some("http"), &[&mirror[0]])?;
    let rules = r#"  - matches:
    - path: {type: Exact, value: /exact}
    backendRefs: [{name: web-b, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /api}
      method: POST
    backendRefs: [{name: web-b, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /api}
    backendRefs: [{name: web-a, port: 80}]
  - matches:
    - queryParams:
      - {name: version, value: "2"}
    backendRefs: [{name: web-b, port: 80}]
  - matches:
    - path: {type: RegularExpression, value: "/v[0-9]+/items"}
    backendRefs: [{name: web-b, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /headers}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: set-by-route}]
        add: [{name: x-add, value: added}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-route, value: headers}]
        remove: [x-simpod-name]
    backendRefs: [{name: web-a, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /old}
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        statusCode: 301
  - matches:
    - path: {type: PathPrefix, value: /rewrite}
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: rewritten.shop
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /inner}
    backendRefs: [{name: web-a, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /mirrored}
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: mirror, port: 80}
    backendRefs: [{name: web-a, port: 80}]
  - matches:
    - headers: [{name: x-env, value: staging}]
    backendRefs: [{name: web-b, port: 80}]
"#;
    let model = w.apply("route-web.yaml", &route_yaml("web", "web", 80, rules))?;
    ensure!(model["errors"].as_array().is_some_and(|e| e.is_empty()), "route rejected: {}", model["errors"]);
    let base = "http://10.96.1.40";
    let name = |c: &Curl| -> Result<String> { Ok(c.json()?["name"].as_str().unwrap_or("").to_string()) };

    // Path (exact, prefix, regex), method, query, header.
    ensure!(name(&w.curl(&[&format!("{base}/exact")])?)? == "web-b-0", "exact path");
    ensure!(name(&w.curl(&[&format!("{base}/api/x")])?)? == "web-a-0", "prefix without method");
    ensure!(name(&w.curl(&["-X", "POST", "-d", "x=1", &format!("{base}/api/x")])?)? == "web-b-0", "prefix + POST");
    ensure!(name(&w.curl(&[&format!("{base}/q?version=2")])?)? == "web-b-0", "query match");
    ensure!(name(&w.curl(&[&format!("{base}/v12/items")])?)? == "web-b-0", "regex path");
    ensure!(name(&w.curl(&["-H", "x-env: staging", &format!("{base}/anything")])?)? == "web-b-0", "header match");
    // Nothing matches: 404 from sluice, said so in the header.
    let miss = w.curl(&[&format!("{base}/nowhere")])?;
    ensure!(miss.status == 404 && miss.headers.get("x-sluice-error").map(String::as_str) == Some("no-route"), "no match: {} {:?}", miss.status, miss.headers);

    // Header modifiers: what the backend received, and what the client got back.
    let h = w.curl(&["-H", "x-remove: secret", "-H", "x-add: original", "-H", "x-set: client", &format!("{base}/headers")])?;
    let seen = h.json()?;
    ensure!(seen["headers"]["x-set"] == "set-by-route", "set: {seen}");
    ensure!(seen["headers"]["x-add"] == "original, added", "add: {seen}");
    ensure!(seen["headers"].get("x-remove").is_none(), "remove: {seen}");
    ensure!(h.headers.get("x-route").map(String::as_str) == Some("headers"), "response add: {:?}", h.headers);
    ensure!(!h.headers.contains_key("x-simpod-name"), "response remove: {:?}", h.headers);

    // Redirect: answered by sluice, the backend never sees it.
    let r = w.curl(&[&format!("{base}/old/page?x=1")])?;
    ensure!(r.status == 301, "redirect status {}", r.status);
    ensure!(r.headers.get("location").map(String::as_str) == Some("http://10.96.1.40/new/page?x=1"), "location: {:?}", r.headers);

    // Rewrite: host and path as the backend sees them.
    let rw = w.curl(&[&format!("{base}/rewrite/deep/path?q=1")])?.json()?;
    ensure!(rw["path"] == "/inner/deep/path?q=1", "rewritten path: {rw}");
    ensure!(rw["headers"]["host"] == "rewritten.shop", "rewritten host: {rw}");

    // Mirror: the primary answers; the mirror backend gets a copy (host with -shadow), body too.
    let primary = w.curl(&["-X", "POST", "--data-binary", "mirror-me", &format!("{base}/mirrored/1")])?.json()?;
    ensure!(primary["name"] == "web-a-0", "primary: {primary}");
    // The servers were started in order: web-a-0, web-b-0, mirror-0.
    let mirror_proc = &mut w.servers[2];
    let copy = mirror_proc.wait_for_json(T, |l| l["event"] == "request" && l["path"] == "/mirrored/1")?;
    ensure!(copy["headers"]["host"].as_str().is_some_and(|h| h.contains("-shadow")), "mirror host: {copy}");
    ensure!(copy["body_bytes"] == 9, "mirror body: {copy}");
    ensure!(copy["method"] == "POST", "{copy}");
    Ok(())
}

/// 6. `timeouts.request: 200ms` against a backend that takes 1 s: the client gets 504 after
///    about 200 ms, and sluice says why.
#[test]
fn request_timeout_gives_504() -> Result<()> {
    let mut w = L7World::new()?;
    let pods = w.http_backends("slow", 1, |_| vec![])?;
    w.service("slow", "10.96.1.50", 80, HTTP_PORT, Some("http"), &[&pods[0]])?;
    let rules = "  - timeouts:\n      request: 200ms\n    backendRefs: [{name: slow, port: 80}]\n";
    let model = w.apply("route-slow.yaml", &route_yaml("slow", "slow", 80, rules))?;
    ensure!(model["errors"].as_array().is_some_and(|e| e.is_empty()), "route rejected: {}", model["errors"]);
    let started = Instant::now();
    let r = w.curl(&["http://10.96.1.50/?delay_ms=1000"])?;
    let took = started.elapsed();
    ensure!(r.status == 504, "expected 504, got {} {}", r.status, r.body);
    ensure!(r.headers.get("x-sluice-error").map(String::as_str) == Some("request-timeout"), "{:?}", r.headers);
    ensure!(took >= Duration::from_millis(190) && took < Duration::from_millis(900), "504 after {took:?}, expected about 200 ms");
    // A fast request on the same route still works.
    let ok = w.curl(&["http://10.96.1.50/"])?;
    ensure!(ok.status == 200, "{}", ok.status);
    eprintln!("504 after {took:?}");
    Ok(())
}

/// Invalid routes are reported and leave the rest working; fixing the file applies it live.
#[test]
fn invalid_route_is_reported_and_fixing_it_applies_live() -> Result<()> {
    let mut w = L7World::new()?;
    let a = w.http_backends("web-a", 1, |_| vec![])?;
    let b = w.http_backends("web-b", 1, |_| vec![])?;
    w.service("web", "10.96.1.60", 80, HTTP_PORT, Some("http"), &[&a[0]])?;
    w.service("web-b", "10.96.1.61", 80, HTTP_PORT, Some("http"), &[&b[0]])?;
    let bad = route_yaml("web", "web", 80, "  - matches:\n    - path: {type: RegularExpression, value: \"/(unclosed\"}\n    backendRefs: [{name: web-b, port: 80}]\n");
    let model = w.apply("route-web.yaml", &bad)?;
    let errors = model["errors"].to_string();
    ensure!(errors.contains("route-web.yaml") && errors.contains("regex"), "the bad route should be reported: {errors}");
    // Without a valid route the Service's own endpoints serve.
    ensure!(w.curl(&["http://10.96.1.60/x"])?.json()?["name"] == "web-a-0");
    let good = route_yaml("web", "web", 80, "  - backendRefs: [{name: web-b, port: 80}]\n");
    let model = w.apply("route-web.yaml", &good)?;
    ensure!(model["errors"].as_array().is_some_and(|e| e.is_empty()), "{}", model["errors"]);
    ensure!(w.curl(&["http://10.96.1.60/x"])?.json()?["name"] == "web-b-0", "the fixed route must apply");
    Ok(())
}

/// Errors sluice returns to gRPC clients are gRPC statuses: a Service without ready endpoints
/// gives UNAVAILABLE, with sluice's reason in grpc-message.
#[test]
fn grpc_clients_get_grpc_statuses_from_sluice() -> Result<()> {
    let w = L7World::new()?;
    w.service("empty", "10.96.1.70", GRPC_PORT, GRPC_PORT, Some("grpc"), &[])?;
    let s = grpc_client(&w.client, addr("10.96.1.70", GRPC_PORT), 5, 1, &[])?;
    ensure!(!s.ok && s.statuses.get("UNAVAILABLE") == Some(&5), "expected UNAVAILABLE: {s:?}");
    let out = sluice_tests::workloads::run_slgrpc(&w.client, ["client", "--to", "10.96.1.70:50051", "--calls", "1", "--each"])?;
    let line = out.json_lines()?.into_iter().find(|l| l["seq"].is_number()).context("per-call line")?;
    ensure!(line["message"].as_str().is_some_and(|m| m.contains("no-healthy-upstream")), "{line}");
    Ok(())
}
