//! Istio's DestinationRule, end to end: consistent hashing (a header's requests stay on one
//! endpoint, and few keys move when an endpoint goes), the hash cookie (set when missing, then
//! honoured), connectionPool limits answered with 503 overflow (and a sluice TrafficPolicy on
//! the same Service winning over the rule), outlierDetection ejecting a failing endpoint, and
//! the TLS modes (SIMPLE origination towards a server outside the mesh with the rule's trust
//! anchors, refused with others; ISTIO_MUTUAL and DISABLE towards a mesh Service, which the
//! HBONE tunnel carries either way).
//!
//! Subsets are reached through a VirtualService destination. Backends are simpod HTTP servers
//! that name themselves in `x-simpod-name`; clients (simpod `http-load`, curl) run in an
//! enrolled pod of `shop`; sluice sits in between.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use common::{wait_enrolled, T};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_tests::{
    manifest, poll_until,
    workloads::{http_load, start_http_server, start_https_server, LoadSummary},
    Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts,
};

const HTTP_PORT: u16 = 8080;

/// A simulated node with sluice and an enrolled namespace `shop` holding a client pod.
struct World {
    sim: Sim,
    node: Node,
    client: Pod,
    sluice: Sluice,
    /// Backend servers by pod name.
    servers: BTreeMap<String, SimProcess>,
}

impl World {
    fn new() -> Result<World> {
        let sim = Sim::new()?;
        let node = sim.add_node("n1")?;
        sim.write_namespace("shop", true)?;
        let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
        let sluice = node.start_sluice(SluiceOpts::default())?;
        sluice.wait_ready(T)?;
        wait_enrolled(&sluice, &client)?;
        Ok(World { sim, node, client, sluice, servers: BTreeMap::new() })
    }

    /// Backend pods `<prefix>-0..n` in `shop` (labels app=<prefix>), each running simpod's HTTP
    /// server on 8080 named after the pod, with `extra(i)` arguments.
    fn http_backends(
        &mut self,
        prefix: &str,
        n: usize,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> Result<Vec<Pod>> {
        let mut pods = Vec::new();
        for i in 0..n {
            let name = format!("{prefix}-{i}");
            let pod = self.node.add_pod("shop", &name, PodOpts::labels(&[("app", prefix)]))?;
            let args = extra(i);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.servers.insert(name.clone(), start_http_server(&pod, HTTP_PORT, &name, &args)?);
            wait_enrolled(&self.sluice, &pod)?;
            pods.push(pod);
        }
        Ok(pods)
    }

    /// A Service `<ns>/<name>` at `ip:80` → `target_port` on `endpoints`, port "http" with
    /// `appProtocol: http`; returns once sluice has loaded it.
    fn service(&self, ns: &str, name: &str, ip: &str, target_port: u16, endpoints: &[&Pod]) -> Result<()> {
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
        let docs = manifest::with_app_protocol(
            manifest::service(ns, name, ip, &[("http", 80, target_port)], &eps),
            "http",
            "http",
        );
        self.apply_ok(&manifest::service_file_name(ns, name), &manifest::to_yaml(&docs)?)?;
        Ok(())
    }

    fn generation(&self) -> Result<u64> {
        self.sluice.get_json("/model")?["generation"].as_u64().context("model generation")
    }

    /// Writes a manifest, waits until sluice's model has moved past the generation it had, and
    /// requires a model without errors.
    fn apply_ok(&self, file: &str, yaml: &str) -> Result<Value> {
        let before = self.generation()?;
        self.sim.write_file(file, yaml)?;
        let model = self.sluice.wait_for("/model", |m| m["generation"].as_u64().unwrap_or(0) > before, T)?;
        ensure!(
            model["errors"].as_array().is_some_and(|e| e.is_empty()),
            "{file} rejected: {}",
            model["errors"]
        );
        Ok(model)
    }

    /// The DestinationRule `<ns>/<name>` for `host` with `spec` (besides `host`), in
    /// `dr-<name>.yaml`.
    fn rule(&self, ns: &str, name: &str, host: &str, mut spec: Value) -> Result<Value> {
        spec["host"] = json!(host);
        let doc = json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                         "metadata": {"name": name, "namespace": ns}, "spec": spec});
        self.apply_ok(&format!("dr-{name}.yaml"), &manifest::to_yaml(&[doc])?)
    }

    /// curl from the client pod: status, headers (lower-cased names), body.
    fn curl(&self, args: &[&str]) -> Result<Curl> {
        let mut all = vec!["curl", "-sS", "--max-time", "10", "-D", "-", "-o", "-"];
        all.extend(args);
        let out = self.client.run_timeout(&all, Duration::from_secs(20))?;
        ensure!(out.success(), "curl {args:?} failed: {} {}", out.stdout, out.stderr);
        Curl::parse(&out.stdout)
    }

    fn counters(&self) -> Result<Value> {
        Ok(self.sluice.get_json("/status")?["counters"].clone())
    }

    fn log_excerpt(&self) -> String {
        self.sluice
            .log_contents()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("ejected"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

struct Curl {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Curl {
    fn parse(raw: &str) -> Result<Curl> {
        let (head, body) = raw.split_once("\r\n\r\n").context("no header block in curl output")?;
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .context("status line")?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Curl { status, headers, body: body.to_string() })
    }

    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("response body is not JSON: {}", self.body))
    }

    fn flag(&self) -> &str {
        self.headers.get("x-sluice-error").map_or("", String::as_str)
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

fn delta(before: &Value, after: &Value, name: &str) -> i64 {
    after[name].as_i64().unwrap_or(0) - before[name].as_i64().unwrap_or(0)
}

/// Which backend answered each request of an `http-load --each --seq-header` run, by the
/// request's number (its hash key).
fn backend_by_key(s: &LoadSummary) -> Result<BTreeMap<u64, String>> {
    ensure!(s.ok && s.succeeded == s.requests, "every request must succeed: {s:?}");
    s.each.iter().map(|r| Ok((r.id, r.name.clone().context("an answer without x-simpod-name")?))).collect()
}

// ------------------------------------------------------------------------------ subsets

/// Subsets through a VirtualService: `subset: v1` reaches only the pods labelled version=v1,
/// `subset: v2` only version=v2; a subset's own trafficPolicy (here consistent hashing) applies
/// to it alone; a subset no rule defines is 503 `no-cluster`.
#[test]
fn virtual_service_subsets_reach_their_pods_with_their_policy() -> Result<()> {
    let mut w = World::new()?;
    let mut pods = Vec::new();
    for (name, version) in [("web-v1-0", "v1"), ("web-v1-1", "v1"), ("web-v1-2", "v1"), ("web-v2-0", "v2")] {
        let pod = w.node.add_pod("shop", name, PodOpts::labels(&[("app", "web"), ("version", version)]))?;
        w.servers.insert(name.to_string(), start_http_server(&pod, HTTP_PORT, name, &[])?);
        wait_enrolled(&w.sluice, &pod)?;
        pods.push(pod);
    }
    w.service("shop", "web", "10.96.3.80", HTTP_PORT, &pods.iter().collect::<Vec<_>>())?;
    w.rule(
        "shop",
        "web",
        "web",
        json!({"subsets": [
            {"name": "v1", "labels": {"version": "v1"},
             "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}},
            {"name": "v2", "labels": {"version": "v2"}},
        ]}),
    )?;
    let vs = |canary_subset: &str| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"hosts": ["web"], "http": [
                   {"match": [{"headers": {"x-canary": {"exact": "yes"}}}],
                    "route": [{"destination": {"host": "web", "subset": canary_subset}}]},
                   {"route": [{"destination": {"host": "web", "subset": "v1"}}]}]}})
    };
    w.apply_ok("vs-web.yaml", &manifest::to_yaml(&[vs("v2")])?)?;
    let vip = addr("10.96.3.80", 80);
    let v1 = http_load(
        &w.client,
        vip,
        &["--count", "300", "--connections", "4", "--seq-header", "x-user", "--each"],
    )?;
    let v1_keys = backend_by_key(&v1)?;
    let v1_again = backend_by_key(&http_load(
        &w.client,
        vip,
        &["--count", "300", "--connections", "4", "--seq-header", "x-user", "--each"],
    )?)?;
    let canary =
        http_load(&w.client, vip, &["--count", "100", "--connections", "2", "--header", "x-canary: yes"])?;
    eprintln!("subsets: v1 {:?}; canary {:?}", v1.by_name, canary.by_name);
    ensure!(
        v1.by_name.keys().all(|n| n.starts_with("web-v1-")) && v1.by_name.len() == 3,
        "subset v1 reaches the three v1 pods only: {:?}",
        v1.by_name
    );
    ensure!(v1_keys == v1_again, "subset v1's consistent hash keeps each x-user on its pod");
    ensure!(
        canary.succeeded == 100 && canary.by_name.keys().collect::<Vec<_>>() == ["web-v2-0"],
        "subset v2 reaches web-v2-0 only: {:?}",
        canary.by_name
    );

    w.apply_ok("vs-web.yaml", &manifest::to_yaml(&[vs("v9")])?)?;
    let missing = w.curl(&["-H", "x-canary: yes", "http://10.96.3.80/"])?;
    ensure!(
        missing.status == 503 && missing.flag() == "no-cluster",
        "a subset the rule does not define: {} {:?} {}",
        missing.status,
        missing.headers,
        missing.body
    );
    ensure!(w.curl(&["http://10.96.3.80/"])?.status == 200, "the other rule still works");
    Ok(())
}

// ------------------------------------------------------------------------------ load balancing

/// `consistentHash.httpHeaderName`: 400 keys over 4 endpoints, sent twice, land where they
/// landed the first time, spread over all four; once one endpoint leaves the Service, its keys
/// move and almost none of the others' do (Maglev: about 1/N of the keys move).
#[test]
fn consistent_hash_by_header_is_sticky_and_moves_few_keys_when_an_endpoint_goes() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("web", 4, |_| vec![])?;
    let refs: Vec<&Pod> = pods.iter().collect();
    w.service("shop", "web", "10.96.3.10", HTTP_PORT, &refs)?;
    let vip = addr("10.96.3.10", 80);
    let run = |w: &World| -> Result<BTreeMap<u64, String>> {
        let s = http_load(
            &w.client,
            vip,
            &["--count", "400", "--connections", "4", "--seq-header", "x-user", "--each"],
        )?;
        backend_by_key(&s)
    };

    // Without a rule, the node's balancer spreads one key's requests (not sticky).
    let free = (run(&w)?, run(&w)?);
    let free_same = free.0.iter().filter(|(k, v)| free.1.get(k) == Some(v)).count();

    w.rule(
        "shop",
        "web",
        "web",
        json!({"trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}}),
    )?;
    let first = run(&w)?;
    let second = run(&w)?;
    let same = first.iter().filter(|(k, v)| second.get(k) == Some(v)).count();
    let mut spread: BTreeMap<&str, usize> = BTreeMap::new();
    for name in first.values() {
        *spread.entry(name).or_default() += 1;
    }

    // web-3 leaves the Service.
    w.service("shop", "web", "10.96.3.10", HTTP_PORT, &refs[..3])?;
    let after = run(&w)?;
    let of_gone = first.values().filter(|n| *n == "web-3").count();
    let moved_others =
        first.iter().filter(|(k, n)| *n != "web-3" && after.get(k).is_some_and(|a| a != *n)).count();
    let moved = first.iter().filter(|(k, n)| after.get(k).is_some_and(|a| a != *n)).count();
    eprintln!(
        "consistent hash over 4 endpoints, 400 keys: {same}/400 on the same endpoint the second time (without the rule: {free_same}/400), spread {spread:?}; web-3 removed: {moved} keys moved ({:.1} %, ideal 25 %), {of_gone} were web-3's, {moved_others} of the others' moved",
        moved as f64 / 4.0
    );
    ensure!(free_same < 300, "without the rule the keys are not sticky ({free_same}/400 stayed)");
    ensure!(same == 400, "every key must land on the same endpoint again: {same}/400");
    ensure!(spread.len() == 4 && spread.values().all(|c| *c >= 60), "keys spread over all four: {spread:?}");
    ensure!(after.values().all(|n| n != "web-3"), "no key goes to the removed endpoint");
    ensure!(moved >= of_gone, "the removed endpoint's keys all moved");
    ensure!(
        moved_others * 100 <= 400 * 2,
        "at most 2 % of the remaining endpoints' keys may move: {moved_others} of 400"
    );
    Ok(())
}

/// `consistentHash.httpCookie` with a ttl: a request without the cookie gets one (`Set-Cookie`
/// with its Max-Age and path) and every request carrying a cookie value stays on one endpoint;
/// different values spread over the endpoints. Then `useSourceIp` (one client pod, one
/// endpoint) and `httpQueryParameterName` (one endpoint per value).
#[test]
fn hash_cookie_source_ip_and_query_parameter_keys() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("web", 4, |_| vec![])?;
    w.service("shop", "web", "10.96.3.20", HTTP_PORT, &pods.iter().collect::<Vec<_>>())?;
    w.rule(
        "shop",
        "web",
        "web",
        json!({"trafficPolicy": {"loadBalancer": {"consistentHash": {"httpCookie": {"name": "session", "path": "/", "ttl": "60s"}}}}}),
    )?;
    let r = w.curl(&["http://10.96.3.20/"])?;
    ensure!(r.status == 200, "{} {:?} {}", r.status, r.headers, r.body);
    let set = r.headers.get("set-cookie").context("a request without the cookie gets one")?.clone();
    ensure!(
        set.starts_with("session=") && set.contains("Max-Age=60") && set.contains("Path=/"),
        "Set-Cookie: {set}"
    );
    let value = set.split(';').next().unwrap_or_default().to_string();
    let first = r.headers.get("x-simpod-name").cloned().unwrap_or_default();
    // The cookie keeps the client on the endpoint that answered when it was set.
    let cookie_header = format!("Cookie: {value}");
    let s = http_load(
        &w.client,
        addr("10.96.3.20", 80),
        &["--count", "40", "--connections", "2", "--header", &cookie_header],
    )?;
    ensure!(s.ok && s.succeeded == 40, "{s:?}");
    ensure!(
        s.by_name.len() == 1 && s.by_name.contains_key(&first),
        "every request with {value} must go to {first}: {:?}",
        s.by_name
    );
    let again = w.curl(&["-H", &cookie_header, "http://10.96.3.20/"])?;
    ensure!(!again.headers.contains_key("set-cookie"), "a request with the cookie gets no new one");
    // Other cookie values: each sticks to one endpoint, and together they use several.
    let mut used = BTreeSet::new();
    for i in 0..16 {
        let h = format!("Cookie: other=1; session=\"client-{i}\"");
        let s = http_load(&w.client, addr("10.96.3.20", 80), &["--count", "10", "--header", &h])?;
        ensure!(s.ok && s.succeeded == 10 && s.by_name.len() == 1, "cookie client-{i}: {:?}", s.by_name);
        used.extend(s.by_name.keys().cloned());
    }
    eprintln!("hash cookie: set {set:?} on {first}, 40 requests with it all went there; 16 other values used {used:?}");
    ensure!(used.len() >= 2, "16 cookie values must not all hash to one endpoint: {used:?}");

    // useSourceIp: every request of this client pod goes to one endpoint.
    let lb = |ch: Value| json!({"trafficPolicy": {"loadBalancer": {"consistentHash": ch}}});
    w.rule("shop", "web", "web", lb(json!({"useSourceIp": true})))?;
    let s = http_load(&w.client, addr("10.96.3.20", 80), &["--count", "40", "--connections", "4"])?;
    ensure!(s.ok && s.succeeded == 40 && s.by_name.len() == 1, "useSourceIp: {:?}", s.by_name);
    // httpQueryParameterName: one endpoint per value of the parameter.
    w.rule("shop", "web", "web", lb(json!({"httpQueryParameterName": "user"})))?;
    let mut by_query = BTreeSet::new();
    for i in 0..16 {
        let path = format!("/cart?user=u{i}&x=1");
        let s = http_load(&w.client, addr("10.96.3.20", 80), &["--count", "10", "--path", &path])?;
        ensure!(s.ok && s.succeeded == 10 && s.by_name.len() == 1, "user=u{i}: {:?}", s.by_name);
        by_query.extend(s.by_name.keys().cloned());
    }
    eprintln!(
        "useSourceIp: one endpoint for the client; httpQueryParameterName: 16 values used {by_query:?}"
    );
    ensure!(by_query.len() >= 2, "16 parameter values must not all hash to one endpoint: {by_query:?}");
    Ok(())
}

// ------------------------------------------------------------------------------ connection pool

/// `connectionPool.tcp.maxConnections: 2` to a backend taking 500 ms, 10 requests at once: 2
/// are served, the other 8 get 503 overflow (`x-sluice-overflow: maxConnections`) at once;
/// `http.http2MaxRequests: 5` lets 5 through (`maxRequests`); a sluice TrafficPolicy's
/// `circuitBreaker` on the same Service wins over the rule's pool.
#[test]
fn connection_pool_limits_answer_the_excess_with_503() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("slow", 1, |_| vec!["--delay-ms".into(), "500".into()])?;
    w.service("shop", "slow", "10.96.3.30", HTTP_PORT, &[&pods[0]])?;
    let vip = addr("10.96.3.30", 80);
    let burst = |w: &World| http_load(&w.client, vip, &["--count", "10", "--connections", "10"]);

    w.rule(
        "shop",
        "slow",
        "slow",
        json!({"trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 2}}}}),
    )?;
    let c0 = w.counters()?;
    let conns = burst(&w)?;
    let c1 = w.counters()?;
    let fast = conns.latency_ms.get("503").and_then(|l| l.max).unwrap_or(f64::NAN);
    eprintln!(
        "maxConnections 2, 10 concurrent: {:?} overflow {:?}, 503 max {fast:.1} ms, http_overflow +{}",
        conns.by_status,
        conns.by_overflow,
        delta(&c0, &c1, "http_overflow")
    );
    ensure!(conns.ok && conns.status(200) == 2, "two connections serve two requests: {conns:?}");
    ensure!(conns.by_overflow.get("maxConnections") == Some(&8), "the other 8 overflow: {conns:?}");
    ensure!(fast < 250.0, "overflow is answered at once, not after the backend's 500 ms: {fast:.1} ms");

    w.rule(
        "shop",
        "slow",
        "slow",
        json!({"trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 5}}}}),
    )?;
    let reqs = burst(&w)?;
    eprintln!("http2MaxRequests 5, 10 concurrent: {:?} overflow {:?}", reqs.by_status, reqs.by_overflow);
    ensure!(reqs.ok && reqs.status(200) == 5, "five in flight: {reqs:?}");
    ensure!(reqs.by_overflow.get("maxRequests") == Some(&5), "the other 5 overflow maxRequests: {reqs:?}");

    // A TrafficPolicy with its own circuit breaker on the same Service wins.
    let tp = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: slow\n  namespace: shop\nspec:\n  targetRefs:\n  - {group: \"\", kind: Service, name: slow}\n  circuitBreaker:\n    maxRequests: 8\n";
    w.apply_ok("tp-slow.yaml", tp)?;
    let tp_wins = burst(&w)?;
    eprintln!(
        "and a TrafficPolicy maxRequests 8: {:?} overflow {:?}",
        tp_wins.by_status, tp_wins.by_overflow
    );
    ensure!(tp_wins.ok && tp_wins.status(200) == 8, "the TrafficPolicy's limit applies: {tp_wins:?}");
    Ok(())
}

// ------------------------------------------------------------------------------ outlier detection

/// `outlierDetection` on the existing detector: an endpoint answering 500 is ejected after
/// `consecutive5xxErrors`, for `baseEjectionTime`, and gets no request while ejected.
#[test]
fn outlier_detection_ejects_a_failing_endpoint() -> Result<()> {
    let mut w = World::new()?;
    let fail_file = w.sim.temp_dir().join("web-2-fails");
    let ff = fail_file.display().to_string();
    let pods =
        w.http_backends("web", 3, |i| if i == 2 { vec!["--fail-file".into(), ff.clone()] } else { vec![] })?;
    w.service("shop", "web", "10.96.3.40", HTTP_PORT, &pods.iter().collect::<Vec<_>>())?;
    w.rule(
        "shop",
        "web",
        "web",
        json!({"trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "30s", "maxEjectionPercent": 50}}}),
    )?;
    let vip = addr("10.96.3.40", 80);
    std::fs::write(&fail_file, "500")?;
    // Until web-2 has failed 3 times in a row and is ejected.
    let failing = http_load(&w.client, vip, &["--count", "60", "--connections", "1"])?;
    let line = poll_until(Duration::from_secs(5), || {
        w.sluice
            .log_contents()
            .lines()
            .find(|l| l.contains("endpoint ejected by outlier detection"))
            .map(str::to_string)
    })
    .with_context(|| format!("no ejection logged\n{}", w.log_excerpt()))?;
    let ejected = http_load(&w.client, vip, &["--count", "100", "--connections", "2"])?;
    eprintln!(
        "outlier detection: while failing {:?} by backend {:?}; ejected: {:?} by backend {:?}\n{line}",
        failing.by_status, failing.by_name, ejected.by_status, ejected.by_name
    );
    ensure!(failing.status(500) == 3, "three 500s eject web-2: {failing:?}");
    ensure!(line.contains("ejected_for_ms=30000"), "ejected for baseEjectionTime: {line}");
    ensure!(
        ejected.succeeded == 100 && !ejected.by_name.contains_key("web-2"),
        "no request reaches the ejected endpoint: {ejected:?}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ TLS

/// A server outside the mesh (namespace `ext`, not enrolled) serving HTTPS on 443 with a
/// certificate for `secure.ext.svc.cluster.local`, behind Service ext/secure (10.96.3.50:80 →
/// 443); its certificate is written to `cert`.
fn external_https(w: &World, cert: &Path) -> Result<(Pod, SimProcess)> {
    w.sim.write_namespace("ext", false)?;
    let pod = w.node.add_pod("ext", "secure", PodOpts::labels(&[("app", "secure")]))?;
    let server =
        start_https_server(&pod, 443, cert, "ext-secure", &["--san", "secure.ext.svc.cluster.local"])?;
    w.service("ext", "secure", "10.96.3.50", 443, &[&pod])?;
    Ok((pod, server))
}

/// `tls.mode: SIMPLE` with `caCertificates` (a file on the node): sluice originates TLS with the
/// destination's name as SNI and verifies the server against the file; with another file's
/// anchors the handshake fails (502 `upstream-tls-failure`) and nothing is sent in plain text.
/// ISTIO_MUTUAL and DISABLE towards a mesh Service leave its requests on the HBONE tunnel.
#[test]
fn tls_modes_simple_origination_and_mesh_destinations() -> Result<()> {
    let mut w = World::new()?;
    let cert = w.sim.temp_dir().join("ext-secure.pem");
    let (_pod, _server) = external_https(&w, &cert)?;
    // Another certificate, from a server that is never dialled: untrusted anchors.
    let other_cert = w.sim.temp_dir().join("other.pem");
    let other_pod = w.node.add_pod("ext", "other", PodOpts::labels(&[("app", "other")]))?;
    let _other = start_https_server(&other_pod, 443, &other_cert, "other", &["--san", "other.test"])?;

    let host = "secure.ext.svc.cluster.local";
    w.rule(
        "shop",
        "secure",
        host,
        json!({"trafficPolicy": {"tls": {"mode": "SIMPLE", "caCertificates": cert.display().to_string()}}}),
    )?;
    let c0 = w.counters()?;
    let r = w.curl(&["http://10.96.3.50/orders?id=7"])?;
    let c1 = w.counters()?;
    ensure!(
        r.status == 200,
        "SIMPLE origination: {} {:?} {}\n{}",
        r.status,
        r.headers,
        r.body,
        w.log_excerpt()
    );
    let body = r.json()?;
    ensure!(body["tls"] == true && body["sni"] == host, "over TLS with the host as SNI: {body}");
    ensure!(body["path"] == "/orders?id=7", "the application's request arrived: {body}");
    ensure!(delta(&c0, &c1, "upstream_tls_originated") >= 1, "upstream_tls_originated counts it");

    w.rule(
        "shop",
        "secure",
        host,
        json!({"trafficPolicy": {"tls": {"mode": "SIMPLE", "caCertificates": other_cert.display().to_string()}}}),
    )?;
    let bad = w.curl(&["http://10.96.3.50/secret"])?;
    ensure!(
        bad.status == 502 && bad.flag() == "upstream-tls-failure",
        "an untrusted server: {} {:?} {}",
        bad.status,
        bad.headers,
        bad.body
    );
    eprintln!(
        "TLS SIMPLE: {} sni {} upstream_tls_originated +{}; with other anchors: {} {}",
        r.status,
        body["sni"],
        delta(&c0, &c1, "upstream_tls_originated"),
        bad.status,
        bad.flag()
    );

    // subjectAltNames: the certificate must carry one of them, whatever the SNI.
    let san_rule = |san: &str| {
        json!({"trafficPolicy": {"tls": {"mode": "SIMPLE", "caCertificates": cert.display().to_string(),
                                          "sni": "front.example.test", "subjectAltNames": [san]}}})
    };
    w.rule("shop", "secure", host, san_rule(host))?;
    let by_san = w.curl(&["http://10.96.3.50/"])?;
    ensure!(
        by_san.status == 200 && by_san.json()?["sni"] == "front.example.test",
        "verified by subjectAltNames, SNI as set: {} {}",
        by_san.status,
        by_san.body
    );
    w.rule("shop", "secure", host, san_rule("someone-else.test"))?;
    let wrong_san = w.curl(&["http://10.96.3.50/"])?;
    ensure!(
        wrong_san.status == 502 && wrong_san.flag() == "upstream-tls-failure",
        "a certificate without the subjectAltName: {} {}",
        wrong_san.status,
        wrong_san.body
    );

    // A mesh Service: the tunnel is the mTLS (ISTIO_MUTUAL), and DISABLE does not turn it off.
    let pods = w.http_backends("web", 1, |_| vec![])?;
    w.service("shop", "web", "10.96.3.60", HTTP_PORT, &[&pods[0]])?;
    for mode in ["ISTIO_MUTUAL", "DISABLE"] {
        w.rule("shop", "web", "web", json!({"trafficPolicy": {"tls": {"mode": mode}}}))?;
        let before = w.counters()?;
        let r = w.curl(&["http://10.96.3.60/"])?;
        let after = w.counters()?;
        ensure!(
            r.status == 200 && r.headers.get("x-simpod-name").is_some_and(|n| n == "web-0"),
            "{mode}: {}",
            r.status
        );
        ensure!(
            delta(&before, &after, "upstream_tls_originated") == 0,
            "{mode} towards a mesh pod originates no TLS of its own"
        );
    }
    Ok(())
}

/// A CA and a client certificate it issued, as PEM files in `dir`: (ca, client cert, client
/// key, the client certificate's SHA-256 as hex).
fn client_pki(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.pem(), ca_key)?;
    let key = KeyPair::generate()?;
    let client = CertificateParams::new(vec!["client.shop.test".to_string()])?.signed_by(&key, &issuer)?;
    let paths = (dir.join("client-ca.pem"), dir.join("client.pem"), dir.join("client-key.pem"));
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, client.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    let fingerprint = Sha256::digest(client.der().as_ref()).iter().map(|b| format!("{b:02x}")).collect();
    Ok((paths.0, paths.1, paths.2, fingerprint))
}

/// `tls.mode: MUTUAL`: sluice presents the client certificate and key named by the rule (files on
/// the node) to a server that requires one; without it (SIMPLE) the server refuses the handshake.
#[test]
fn tls_mutual_presents_the_rules_client_certificate() -> Result<()> {
    let w = World::new()?;
    let (client_ca, client_cert, client_key, fingerprint) = client_pki(w.sim.temp_dir())?;
    w.sim.write_namespace("ext", false)?;
    let pod = w.node.add_pod("ext", "strict", PodOpts::labels(&[("app", "strict")]))?;
    let cert = w.sim.temp_dir().join("ext-strict.pem");
    let ca_arg = client_ca.display().to_string();
    let _server = start_https_server(
        &pod,
        443,
        &cert,
        "ext-strict",
        &["--san", "strict.ext.svc.cluster.local", "--client-ca", &ca_arg],
    )?;
    w.service("ext", "strict", "10.96.3.70", 443, &[&pod])?;
    let host = "strict.ext.svc.cluster.local";
    let tls = |mode: &str| {
        let mut t = json!({"mode": mode, "caCertificates": cert.display().to_string()});
        if mode == "MUTUAL" {
            t["clientCertificate"] = json!(client_cert.display().to_string());
            t["privateKey"] = json!(client_key.display().to_string());
        }
        json!({"trafficPolicy": {"tls": t}})
    };
    w.rule("shop", "strict", host, tls("SIMPLE"))?;
    let refused = w.curl(&["http://10.96.3.70/"])?;
    // (With TLS 1.3 the server's refusal may come after the client's handshake is done, as
    // a reset of the first read: a 502 either way, never an answer.)
    ensure!(
        refused.status == 502 && refused.flag().starts_with("upstream-"),
        "without a client certificate: {} {:?} {}",
        refused.status,
        refused.headers,
        refused.body
    );
    w.rule("shop", "strict", host, tls("MUTUAL"))?;
    let r = w.curl(&["http://10.96.3.70/mtls"])?;
    ensure!(r.status == 200, "MUTUAL: {} {:?} {}\n{}", r.status, r.headers, r.body, w.log_excerpt());
    let body = r.json()?;
    eprintln!(
        "TLS MUTUAL: without a client certificate {} {}; with the rule's: {} client cert {}",
        refused.status,
        refused.flag(),
        r.status,
        body["client_cert_sha256"]
    );
    ensure!(
        body["tls"] == true && body["client_cert_sha256"] == fingerprint.as_str(),
        "the server saw the rule's client certificate: {body}"
    );
    Ok(())
}
