//! Resilience and traffic control acceptance: retries (with budgets), outlier ejection, circuit
//! breaking, fault injection, local rate limits, per-pod limits (a noisy neighbour), REGISTRY_ONLY
//! egress with ServiceEntries and TLS origination, live TrafficPolicy edits, and the gRPC
//! statuses of sluice's own answers.
//!
//! Backends are simpod HTTP servers whose failures the test controls (`--fail-percent`: a share
//! of requests answered 503, `--fail-file`: every request answered with the status in a file
//! while it exists, `--delay-ms`: slow); each prints one `{"event":"request"}` line per request
//! it receives, so attempts are counted where they land. Clients (simpod `http-load`, curl,
//! slgrpc, slload) run in enrolled pods; sluice sits in between. The "internet" of the egress
//! tests is a pod of a namespace outside the mesh with extra addresses (192.0.2.0/24) that no
//! manifest lists, routed to it by the node.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use common::{wait_enrolled, T};
use serde_json::{json, Value};
use sluice_tests::{
    manifest, poll_until,
    workloads::{self, http_load, start_http_server, start_https_server, LoadRequest, LoadSummary},
    Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts,
};

const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 50051;

/// A simulated node with sluice and an enrolled namespace `shop` holding a client pod.
struct World {
    sim: Sim,
    node: Node,
    client: Pod,
    sluice: Sluice,
    /// Backend servers by pod name.
    servers: BTreeMap<String, SimProcess>,
    /// Other processes kept alive for the test.
    others: Vec<SimProcess>,
    _lock: File,
}

/// The noisy-neighbour test measures latency while it loads the machine (2 cores): it runs
/// alone among this file's tests, which nextest runs two at a time in separate processes. It
/// holds an exclusive `flock` on this test executable, every other test a shared one.
fn suite_lock(exclusive: bool) -> Result<File> {
    let exe = std::env::current_exe().context("finding the test executable")?;
    let f = File::open(&exe).with_context(|| format!("opening {}", exe.display()))?;
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: flock on a descriptor we own; the lock goes with it.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        bail!("flock {}: {}", exe.display(), std::io::Error::last_os_error());
    }
    Ok(f)
}

impl World {
    fn new() -> Result<World> {
        World::with(SluiceOpts::default(), false)
    }

    /// `registry_only`: `shop` carries `sluice.dev/outbound-traffic-policy: REGISTRY_ONLY`.
    fn with(opts: SluiceOpts, registry_only: bool) -> Result<World> {
        World::locked(opts, registry_only, suite_lock(false)?)
    }

    fn locked(opts: SluiceOpts, registry_only: bool, lock: File) -> Result<World> {
        let sim = Sim::new()?;
        let node = sim.add_node("n1")?;
        let mut ns = manifest::namespace("shop", true);
        if registry_only {
            ns["metadata"]["annotations"]["sluice.dev/outbound-traffic-policy"] = json!("REGISTRY_ONLY");
        }
        sim.write_file(&manifest::namespace_file_name("shop"), manifest::to_yaml(&[ns])?)?;
        let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
        let sluice = node.start_sluice(opts)?;
        sluice.wait_ready(T)?;
        wait_enrolled(&sluice, &client)?;
        Ok(World { sim, node, client, sluice, servers: BTreeMap::new(), others: Vec::new(), _lock: lock })
    }

    /// Backend pods `<prefix>-0..n` in `shop` (labels app=<prefix>), each running simpod's HTTP
    /// server on 8080 named after the pod, with `extra(i)` arguments (failures, delay).
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

    /// A Service `shop/<name>` at `ip:port` → `target_port` on `endpoints`, port named "http"
    /// with `appProtocol`; returns once sluice has loaded it.
    fn service(
        &self,
        name: &str,
        ip: &str,
        port: u16,
        target_port: u16,
        app_protocol: &str,
        endpoints: &[&Pod],
    ) -> Result<()> {
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
            manifest::service("shop", name, ip, &[("http", port, target_port)], &eps),
            "http",
            app_protocol,
        );
        self.apply_ok(&manifest::service_file_name("shop", name), &manifest::to_yaml(&docs)?)?;
        Ok(())
    }

    fn generation(&self) -> Result<u64> {
        self.sluice.get_json("/model")?["generation"].as_u64().context("model generation")
    }

    /// Writes a manifest and waits until sluice's model has moved past the generation it had.
    fn apply(&self, file: &str, yaml: &str) -> Result<Value> {
        let before = self.generation()?;
        self.sim.write_file(file, yaml)?;
        self.sluice.wait_for("/model", |m| m["generation"].as_u64().unwrap_or(0) > before, T)
    }

    /// Removes a manifest and waits until sluice's model has moved past the generation it had.
    fn remove(&self, file: &str) -> Result<Value> {
        let before = self.generation()?;
        self.sim.remove_file(file)?;
        self.sluice.wait_for("/model", |m| m["generation"].as_u64().unwrap_or(0) > before, T)
    }

    /// As [`World::apply`], and the model must have no errors.
    fn apply_ok(&self, file: &str, yaml: &str) -> Result<Value> {
        let model = self.apply(file, yaml)?;
        ensure!(
            model["errors"].as_array().is_some_and(|e| e.is_empty()),
            "{file} rejected: {}",
            model["errors"]
        );
        Ok(model)
    }

    /// A TrafficPolicy `shop/<name>` in `tp-<name>.yaml`, targeting `targets` (YAML flow
    /// mappings), with `spec` (YAML lines of the spec, indented by two spaces). Must be valid.
    fn policy(&self, name: &str, targets: &[&str], spec: &str) -> Result<Value> {
        self.apply_ok(&format!("tp-{name}.yaml"), &policy_yaml(name, targets, spec))
    }

    /// Every `{"event":"request"}` the backend `name` has printed, once its output has been
    /// quiet for 300 ms (the lines of requests already answered may still be in the pipe).
    fn requests_seen(&mut self, name: &str) -> Result<Vec<Value>> {
        let p = self.servers.get_mut(name).with_context(|| format!("no backend {name}"))?;
        while let Ok(Some(_)) = p.next_line(Duration::from_millis(300)) {}
        Ok(p.json_lines().into_iter().filter(|l| l["event"] == "request").collect())
    }

    /// curl from the client pod.
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

    /// sluice's log lines about requests it answered itself, ejections, and problems.
    fn sluice_log_excerpt(&self) -> String {
        self.sluice
            .log_contents()
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("answered by sluice")
                    || l.contains("ejected")
            })
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn policy_yaml(name: &str, targets: &[&str], spec: &str) -> String {
    let mut y = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  targetRefs:\n"
    );
    for t in targets {
        y += &format!("  - {t}\n");
    }
    y + spec
}

/// The targetRef of Service `shop/<name>`.
fn svc(name: &str) -> String {
    format!("{{group: \"\", kind: Service, name: {name}}}")
}

struct Curl {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Curl {
    fn parse(raw: &str) -> Result<Curl> {
        let mut rest = raw;
        loop {
            let (head, body) = rest.split_once("\r\n\r\n").context("no header block in curl output")?;
            let mut lines = head.lines();
            let status: u16 = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
                .context("status line")?;
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

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

// ------------------------------------------------------------------------------ retries

/// 1. One of three backends fails half its requests with 503; a retry policy (3 attempts on
///    503) makes the client see at least 99 % success, each retry going to an endpoint not
///    tried yet. The same with an HTTPRoute rule's `retry` (codes [503], 3 attempts).
#[test]
fn retries_hide_a_backend_failing_half_its_requests() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("web", 3, |i| {
        if i == 2 {
            vec!["--fail-percent".into(), "50".into(), "--fail-status".into(), "503".into()]
        } else {
            vec![]
        }
    })?;
    w.service("web", "10.96.2.10", 80, HTTP_PORT, "http", &pods.iter().collect::<Vec<_>>())?;
    let vip = addr("10.96.2.10", 80);

    // Without retries: the failures show (web-2 gets about a third of the requests).
    let bare = http_load(&w.client, vip, &["--count", "300", "--connections", "4"])?;
    ensure!(bare.ok && bare.status(503) >= 15, "without retries 503s must reach the client: {bare:?}");

    w.policy(
        "web",
        &[&svc("web")],
        "  retries:\n    attempts: 3\n    retryOn: [retriable-status-codes]\n    retriableStatusCodes: [503]\n    backoff: {baseInterval: 5ms}\n",
    )?;
    let before = w.counters()?;
    let fails_before = w.requests_seen("web-2")?.iter().filter(|r| r["status"] == 503).count();
    let s = http_load(&w.client, vip, &["--count", "1000", "--connections", "4"])?;
    let after = w.counters()?;
    let fails = w.requests_seen("web-2")?.iter().filter(|r| r["status"] == 503).count() - fails_before;
    let retries = delta(&before, &after, "http_retries");
    eprintln!(
        "retry policy, 1 of 3 backends failing 50 %: {} of {} succeeded ({:.2} %), by status {:?}, by backend {:?}; web-2 answered 503 {fails} times; http_retries +{retries}; without retries: {:?}",
        s.succeeded, s.requests, pct(s.succeeded, s.requests), s.by_status, s.by_name, bare.by_status
    );
    ensure!(s.ok && s.requests == 1000, "{s:?}");
    ensure!(s.succeeded >= 990, "retries must give >= 99 % success: {s:?}\n{}", w.sluice_log_excerpt());
    ensure!(fails >= 50, "web-2 should have failed about 1 in 6 first tries, saw {fails}");
    ensure!(
        retries >= fails as i64 - (1000 - s.succeeded as i64),
        "each 503 must have been retried: {retries} retries for {fails} failures"
    );

    // The Gateway API's HTTPRoute retry instead of the policy.
    let model = w.remove("tp-web.yaml")?;
    ensure!(
        model["traffic_policies"].as_array().is_some_and(|p| p.is_empty()),
        "{}",
        model["traffic_policies"]
    );
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  parentRefs:\n  - {group: \"\", kind: Service, name: web, port: 80}\n  rules:\n  - backendRefs: [{name: web, port: 80}]\n    retry: {codes: [503], attempts: 3, backoff: 5ms}\n";
    let model = w.apply_ok("route-web.yaml", route)?;
    ensure!(model["routes"].as_array().is_some_and(|r| r.len() == 1), "{}", model["routes"]);
    let before = w.counters()?;
    let r = http_load(&w.client, vip, &["--count", "600", "--connections", "4"])?;
    let after = w.counters()?;
    eprintln!(
        "HTTPRoute retry: {} of {} succeeded ({:.2} %), by backend {:?}; http_retries +{}",
        r.succeeded,
        r.requests,
        pct(r.succeeded, r.requests),
        r.by_name,
        delta(&before, &after, "http_retries")
    );
    ensure!(r.ok && r.succeeded >= 594, "HTTPRoute retry must give >= 99 % success: {r:?}");
    ensure!(delta(&before, &after, "http_retries") > 0, "the route's retries must have been used");
    Ok(())
}

/// 1b. A single backend failing half its requests: with 3 retries (4 tries) the expected
///     success is 1 - 0.5^4 = 93.75 %, and the backend sees about 1.875 attempts per request.
///     A POST is not retried on a status (not idempotent).
#[test]
fn retries_of_a_single_half_failing_backend() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("one", 1, |_| vec!["--fail-percent".into(), "50".into()])?;
    w.service("one", "10.96.2.20", 80, HTTP_PORT, "http", &[&pods[0]])?;
    w.policy(
        "one",
        &[&svc("one")],
        "  retries:\n    attempts: 3\n    retryOn: [gateway-error]\n    backoff: {baseInterval: 2ms}\n    budget: {percent: 100, minRetriesPerSecond: 100}\n",
    )?;
    let s = http_load(&w.client, addr("10.96.2.20", 80), &["--count", "1000", "--connections", "4"])?;
    let attempts = w.requests_seen("one-0")?.len();
    let rate = pct(s.succeeded, s.requests);
    eprintln!(
        "single backend failing 50 %, 3 retries: {} of {} succeeded ({rate:.2} %, expected 93.75 %), {attempts} attempts at the backend ({:.3} per request, expected 1.875)",
        s.succeeded,
        s.requests,
        attempts as f64 / s.requests as f64
    );
    ensure!(s.ok && s.requests == 1000, "{s:?}");
    ensure!((89.0..=98.0).contains(&rate), "success {rate:.2} % is not about 93.75 %: {s:?}");
    ensure!((1700..=2050).contains(&attempts), "{attempts} attempts for 1000 requests (expected about 1875)");

    // POST: a status is not retried (the backend sees exactly one attempt per request).
    let before = w.requests_seen("one-0")?.len();
    let mut args = vec![
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-X",
        "POST",
        "-d",
        "x=1",
        "-o",
        "/dev/null",
        "-w",
        "\\nCODE=%{http_code}\\n",
    ];
    args.extend(std::iter::repeat_n("http://10.96.2.20/post", 40));
    let out = w.client.run_timeout(&args, Duration::from_secs(60))?;
    let codes: Vec<&str> = out.stdout.lines().filter_map(|l| l.strip_prefix("CODE=")).collect();
    let posts = w.requests_seen("one-0")?.len() - before;
    let failed = codes.iter().filter(|c| **c == "503").count();
    eprintln!("40 POSTs: {failed} answered 503, backend saw {posts} attempts");
    ensure!(codes.len() == 40, "curl: {} {}", out.stdout, out.stderr);
    ensure!(
        posts == 40,
        "a POST must not be retried on a 503: the backend saw {posts} attempts for 40 POSTs"
    );
    ensure!(failed >= 8, "about half the POSTs should have failed, {failed} did");
    Ok(())
}

/// 1c. The retry budget (20 %, 1 retry per second minimum) against a backend failing every
///     request: sluice's attempts stay within 1.2 × the client's requests + 10 (the minimum
///     over the budget's 10 s window), and the exhausted budget is counted.
#[test]
fn retry_budget_caps_attempts_against_a_failing_backend() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("down", 1, |_| vec!["--fail-percent".into(), "100".into()])?;
    w.service("down", "10.96.2.30", 80, HTTP_PORT, "http", &[&pods[0]])?;
    w.policy(
        "down",
        &[&svc("down")],
        "  retries:\n    attempts: 3\n    retryOn: [5xx]\n    backoff: {baseInterval: 1ms, maxInterval: 2ms}\n    budget: {percent: 20, minRetriesPerSecond: 1}\n",
    )?;
    let before = w.counters()?;
    let s = http_load(
        &w.client,
        addr("10.96.2.30", 80),
        &["--rps", "150", "--duration-ms", "3400", "--connections", "4"],
    )?;
    let after = w.counters()?;
    let attempts = w.requests_seen("down-0")?.len() as u64;
    let bound = s.requests * 12 / 10 + 10;
    let exhausted = delta(&before, &after, "http_retry_budget_exhausted");
    eprintln!(
        "budget 20 % + 1/s, backend failing 100 %: {} client requests over {:.0} ms, {attempts} attempts at the backend (ratio {:.3}, bound {bound}); http_retries +{}, http_retry_budget_exhausted +{exhausted}",
        s.requests,
        s.elapsed_ms,
        attempts as f64 / s.requests as f64,
        delta(&before, &after, "http_retries")
    );
    ensure!(
        s.ok && s.requests >= 480 && s.status(503) == s.requests,
        "every request must fail with 503: {s:?}"
    );
    ensure!(
        attempts <= bound,
        "{attempts} attempts for {} requests exceed the budget's bound {bound}",
        s.requests
    );
    ensure!(
        attempts > s.requests + s.requests / 10,
        "retries should have used the budget: {attempts} attempts for {} requests",
        s.requests
    );
    ensure!(exhausted > 0, "http_retry_budget_exhausted must count the retries refused");
    Ok(())
}

// ------------------------------------------------------------------------------ outlier detection

/// 2. Of three backends, one starts answering 500 to everything: after 3 consecutive errors it
///    is ejected and gets no request for its ejection time (2 s), then it is taken back (it is
///    healthy again by then) and serves again.
#[test]
fn failing_endpoint_is_ejected_then_taken_back() -> Result<()> {
    let mut w = World::new()?;
    let fail_file: PathBuf = w.sim.temp_dir().join("web-2-fails");
    let ff = fail_file.display().to_string();
    let pods =
        w.http_backends("web", 3, |i| if i == 2 { vec!["--fail-file".into(), ff.clone()] } else { vec![] })?;
    w.service("web", "10.96.2.40", 80, HTTP_PORT, "http", &pods.iter().collect::<Vec<_>>())?;
    w.policy(
        "web",
        &[&svc("web")],
        "  outlierDetection:\n    consecutive5xxErrors: 3\n    interval: 1s\n    baseEjectionTime: 2s\n    maxEjectionPercent: 50\n",
    )?;
    // 100 requests/s for 7 s over two keep-alive connections.
    let mut load = w.client.simpod([
        "http-load",
        "--to",
        "10.96.2.40:80",
        "--rps",
        "100",
        "--duration-ms",
        "7000",
        "--connections",
        "2",
    ])?;
    // web-2 serves before it fails.
    let web2 = w.servers.get_mut("web-2").context("web-2")?;
    let mut served = 0;
    web2.wait_for_json(T, |l| {
        served += usize::from(l["event"] == "request");
        served >= 5
    })?;
    let failing_from = wall_ms();
    std::fs::write(&fail_file, "500")?;
    let ejected_at = poll_until(Duration::from_secs(5), || {
        w.sluice
            .log_contents()
            .lines()
            .any(|l| l.contains("endpoint ejected by outlier detection"))
            .then(wall_ms)
    })
    .with_context(|| format!("no ejection logged within 5 s\n{}", w.sluice_log_excerpt()))?;
    // Healthy again; still ejected until its time is up.
    std::fs::remove_file(&fail_file)?;
    let healthy_from = wall_ms();
    let out = load.wait_output(Duration::from_secs(30))?;
    let summary: LoadSummary = serde_json::from_value(out.json()?)?;
    let seen = w.requests_seen("web-2")?;
    let ts = |r: &Value| r["ts_ms"].as_u64().unwrap_or(0);
    let failures: Vec<u64> = seen.iter().filter(|r| r["failed"] == "fail-file").map(ts).collect();
    let last_failure = *failures.iter().max().context("web-2 never failed")?;
    let first_failure = *failures.iter().min().unwrap_or(&0);
    let back = seen.iter().map(ts).filter(|t| *t > last_failure).min();
    let after_back = seen.iter().filter(|r| ts(r) > last_failure).count();
    let log_line = w
        .sluice
        .log_contents()
        .lines()
        .find(|l| l.contains("endpoint ejected by outlier detection"))
        .unwrap_or("")
        .to_string();
    eprintln!(
        "ejection timeline (ms from failing on): first 500 +{}, last 500 +{} ({} failures), ejection logged by +{}, healthy again +{}, first request after the last failure +{}; {after_back} requests served after that; client saw {:?}\n{log_line}",
        first_failure.saturating_sub(failing_from),
        last_failure.saturating_sub(failing_from),
        failures.len(),
        ejected_at.saturating_sub(failing_from),
        healthy_from.saturating_sub(failing_from),
        back.map_or(-1, |b| b.saturating_sub(failing_from) as i64),
        summary.by_status
    );
    ensure!(log_line.contains("ejected_for_ms=2000"), "the ejection should last 2 s: {log_line}");
    ensure!(
        (3..=5).contains(&failures.len()),
        "ejected after 3 consecutive errors (a couple more may have been in flight): {} failures",
        failures.len()
    );
    ensure!(
        summary.status(500) == failures.len() as u64,
        "the client saw the backend's 500s and nothing else failing: {summary:?}"
    );
    let back = back.context("web-2 never served again after its ejection")?;
    ensure!(
        back - last_failure >= 1_900,
        "web-2 got a request {} ms after its last failure, while ejected for 2 s",
        back - last_failure
    );
    ensure!(
        back - last_failure <= 3_500,
        "web-2 should be taken back soon after 2 s, was {} ms",
        back - last_failure
    );
    ensure!(after_back >= 20, "web-2 must serve its share again once taken back: {after_back} requests");
    ensure!(
        seen.iter().filter(|r| ts(r) > last_failure).all(|r| r["status"] == 200),
        "after the ejection web-2 answers 200"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ circuit breaker

/// 3. `maxRequests: 10` to a backend taking 500 ms, 50 requests at once: 10 are served, the
///    other 40 get 503 overflow (`x-sluice-overflow: maxRequests`) at once, well under 500 ms.
#[test]
fn circuit_breaker_fails_the_excess_fast() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("slow", 1, |_| vec!["--delay-ms".into(), "500".into()])?;
    w.service("slow", "10.96.2.50", 80, HTTP_PORT, "http", &[&pods[0]])?;
    w.policy("slow", &[&svc("slow")], "  circuitBreaker:\n    maxRequests: 10\n")?;
    let before = w.counters()?;
    let s = http_load(&w.client, addr("10.96.2.50", 80), &["--count", "50", "--connections", "50"])?;
    let after = w.counters()?;
    let overflow = s.flag("overflow");
    let lat = |k: &str| s.latency_ms.get(k).and_then(|l| l.max).unwrap_or(f64::NAN);
    let min200 = s.latency_ms.get("200").and_then(|l| l.min).unwrap_or(f64::NAN);
    eprintln!(
        "maxRequests 10, 50 concurrent requests to a 500 ms backend: {:?}, overflow {:?}; 503 latency max {:.1} ms (p50 {:?}), 200 latency {min200:.1}..{:.1} ms; http_overflow +{}",
        s.by_status,
        s.by_overflow,
        lat("503"),
        s.latency_ms.get("503").and_then(|l| l.p50),
        lat("200"),
        delta(&before, &after, "http_overflow")
    );
    ensure!(s.ok && s.requests == 50, "{s:?}");
    ensure!((10..=12).contains(&s.status(200)), "10 requests fit the limit: {s:?}");
    ensure!(
        s.status(503) == 50 - s.status(200) && overflow == s.status(503),
        "the rest are 503 overflow: {s:?}"
    );
    ensure!(s.by_overflow.get("maxRequests") == Some(&overflow), "x-sluice-overflow names the limit: {s:?}");
    ensure!(lat("503") < 250.0, "overflow must be answered at once (max {:.1} ms)", lat("503"));
    ensure!(min200 >= 490.0, "the served requests took the backend's 500 ms: {s:?}");
    ensure!(delta(&before, &after, "http_overflow") >= overflow as i64, "http_overflow must count them");
    // Slots are released: the next request is served.
    ensure!(w.curl(&["http://10.96.2.50/"])?.status == 200);
    Ok(())
}

/// Per source pod limits (`--pod-max-requests 5`, `--pod-max-connections 10`): a pod's requests
/// beyond 5 in flight get 503 overflow (`per-pod request limit`) at once while another pod's
/// requests to the same backend go through; a pod's 11th open connection is reset.
#[test]
fn per_pod_limits_on_requests_and_connections() -> Result<()> {
    let opts = SluiceOpts {
        args: ["--pod-max-requests", "5", "--pod-max-connections", "10"].map(Into::into).to_vec(),
        ..Default::default()
    };
    let mut w = World::with(opts, false)?;
    let other = w.node.add_pod("shop", "other", PodOpts::labels(&[("app", "other")]))?;
    wait_enrolled(&w.sluice, &other)?;
    let pods = w.http_backends("slow", 1, |_| vec!["--delay-ms".into(), "400".into()])?;
    w.service("slow", "10.96.2.110", 80, HTTP_PORT, "http", &[&pods[0]])?;
    let before = w.counters()?;
    let mut busy =
        w.client.simpod(["http-load", "--to", "10.96.2.110:80", "--count", "10", "--connections", "10"])?;
    let calm = http_load(&other, addr("10.96.2.110", 80), &["--count", "4", "--connections", "4"])?;
    let busy: LoadSummary = serde_json::from_value(busy.wait_output(Duration::from_secs(30))?.json()?)?;
    let after = w.counters()?;
    let overflow_ms = busy.latency_ms.get("503").and_then(|l| l.max).unwrap_or(f64::NAN);
    eprintln!(
        "per-pod requests (max 5): busy pod {:?} {:?} (503 max {overflow_ms:.1} ms), other pod at the same time {:?}; pod_overflow +{}",
        busy.by_status,
        busy.by_overflow,
        calm.by_status,
        delta(&before, &after, "pod_overflow")
    );
    ensure!(
        busy.status(200) == 5 && busy.by_overflow.get("per-pod request limit") == Some(&5),
        "5 in flight, 5 refused: {busy:?}"
    );
    ensure!(overflow_ms < 200.0, "the per-pod overflow is answered at once ({overflow_ms:.1} ms)");
    ensure!(calm.succeeded == 4, "another pod is not limited by the busy one: {calm:?}");

    // Connections: 10 held open, the next ones reset (once the busy pod's are all closed).
    let fast = w.http_backends("fast", 1, |_| vec![])?;
    w.service("fast", "10.96.2.111", 80, HTTP_PORT, "http", &[&fast[0]])?;
    w.sluice.wait_for(
        "/pods",
        |p| {
            p.as_array()
                .is_some_and(|a| a.iter().any(|p| p["name"] == "client" && p["connections_open"] == 0))
        },
        T,
    )?;
    let slload = slload_bin()?;
    let mut hold = w.client.spawn([
        slload.to_str().context("slload path")?,
        "hold",
        "--to",
        "10.96.2.111:80",
        "--count",
        "12",
    ])?;
    let held = hold.wait_for_json(Duration::from_secs(30), |l| l["event"] == "held")?;
    let after_hold = w.counters()?;
    hold.close_stdin();
    eprintln!(
        "per-pod connections (max 10): {held}; pod_overflow +{}",
        delta(&after, &after_hold, "pod_overflow")
    );
    ensure!(
        held["count"] == 10 && held["failed"].as_u64().unwrap_or(0) >= 1,
        "10 connections held, the 11th refused: {held}"
    );
    ensure!(delta(&after, &after_hold, "pod_overflow") >= 1, "pod_overflow counts the reset connections");
    Ok(())
}

// ------------------------------------------------------------------------------ fault injection

/// 4. Abort 30 % (503) and delay 100 ms for 50 %, over 2000 requests: the observed rates are
///    within 5 points, the delays are measured on the requests (≥ 100 ms, close to it), aborts
///    say `fault-injected` and are answered at once.
#[test]
fn fault_injection_rates_and_delays() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("web", 2, |_| vec![])?;
    w.service("web", "10.96.2.60", 80, HTTP_PORT, "http", &pods.iter().collect::<Vec<_>>())?;
    w.policy(
        "chaos",
        &[&svc("web")],
        "  faultInjection:\n    abort: {httpStatus: 503, percentage: 30}\n    delay: {fixedDelay: 100ms, percentage: 50}\n",
    )?;
    let before = w.counters()?;
    let args = ["--count", "2000", "--connections", "20", "--each", "--seq-header", "x-load-seq"];
    let s = http_load(&w.client, addr("10.96.2.60", 80), &args)?;
    let after = w.counters()?;
    ensure!(s.ok && s.requests == 2000 && s.each.len() == 2000, "{:?}", s.by_status);
    // When each request reached its backend (sluice delays a request before forwarding it), so
    // that a delayed request is told from one that was slow for other reasons.
    let mut arrived: HashMap<u64, f64> = HashMap::new();
    for b in ["web-0", "web-1"] {
        for r in w.requests_seen(b)? {
            let id = r["headers"]["x-load-seq"].as_str().and_then(|v| v.parse::<u64>().ok());
            if let (Some(id), Some(us)) = (id, r["ts_us"].as_u64()) {
                arrived.insert(id, us as f64 / 1000.0);
            }
        }
    }
    let aborted: Vec<&LoadRequest> = s.each.iter().filter(|r| r.status == Some(503)).collect();
    ensure!(
        aborted.iter().all(|r| r.flag.as_deref() == Some("fault-injected")),
        "every 503 must be an injected abort"
    );
    ensure!(
        aborted.iter().all(|r| !arrived.contains_key(&r.id)),
        "an aborted request never reaches a backend"
    );
    ensure!(s.status(200) + aborted.len() as u64 == 2000, "only 200s and aborts: {:?}", s.by_status);
    let served: Vec<&LoadRequest> = s.each.iter().filter(|r| r.status == Some(200)).collect();
    ensure!(served.iter().all(|r| arrived.contains_key(&r.id)), "every served request was seen by a backend");
    // From the client's send to the backend's receipt: 100 ms more when delayed. (A request
    // that was not delayed but stalled that long on a busy machine counts as delayed: rare, and
    // the comparison with sluice's own count below allows for it.)
    let forward = |r: &LoadRequest| arrived[&r.id] - r.sent_unix_ms;
    let (delayed, prompt): (Vec<&LoadRequest>, Vec<&LoadRequest>) =
        served.iter().copied().partition(|r| forward(r) >= 95.0);
    let sorted = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        v
    };
    let delayed_fwd = sorted(delayed.iter().map(|r| forward(r)).collect());
    let prompt_fwd = sorted(prompt.iter().map(|r| forward(r)).collect());
    let delayed_rt = sorted(delayed.iter().map(|r| r.elapsed_ms).collect());
    let prompt_rt = sorted(prompt.iter().map(|r| r.elapsed_ms).collect());
    let abort_rt = sorted(aborted.iter().map(|r| r.elapsed_ms).collect());
    let p = |v: &[f64], q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    let abort_rate = pct(aborted.len() as u64, 2000);
    let delay_rate = pct(delayed.len() as u64, served.len() as u64);
    let counted_delays = delta(&before, &after, "http_faults_delayed");
    eprintln!(
        "2000 requests, abort 30 %, delay 100 ms 50 %: aborted {} ({abort_rate:.1} %), of the {} served {} delayed ({delay_rate:.1} %; http_faults_delayed +{counted_delays}, http_faults_aborted +{}); send→backend: delayed p50 {:.1} ms (min {:.1}, p99 {:.1}), undelayed p50 {:.1} ms (p99 {:.1}); round trip: delayed p50 {:.1} ms p99 {:.1} ms, undelayed p50 {:.1} ms p99 {:.1} ms, aborts p50 {:.1} ms p99 {:.1} ms; {:.0} ms in all",
        aborted.len(),
        served.len(),
        delayed.len(),
        delta(&before, &after, "http_faults_aborted"),
        p(&delayed_fwd, 0.5),
        p(&delayed_fwd, 0.0),
        p(&delayed_fwd, 0.99),
        p(&prompt_fwd, 0.5),
        p(&prompt_fwd, 0.99),
        p(&delayed_rt, 0.5),
        p(&delayed_rt, 0.99),
        p(&prompt_rt, 0.5),
        p(&prompt_rt, 0.99),
        p(&abort_rt, 0.5),
        p(&abort_rt, 0.99),
        s.elapsed_ms
    );
    ensure!((25.0..=35.0).contains(&abort_rate), "abort rate {abort_rate:.1} % is not 30 ± 5 %");
    ensure!((45.0..=55.0).contains(&delay_rate), "delay rate {delay_rate:.1} % is not 50 ± 5 %");
    ensure!(
        delta(&before, &after, "http_faults_aborted") == aborted.len() as i64,
        "http_faults_aborted must count the aborts"
    );
    ensure!(
        (counted_delays - delayed.len() as i64).abs() <= 20,
        "delays measured ({}) and counted ({counted_delays}) disagree",
        delayed.len()
    );
    ensure!(
        (100.0..125.0).contains(&p(&delayed_fwd, 0.5)),
        "a delay of 100 ms should hold a request about 100 ms: p50 {:.1}",
        p(&delayed_fwd, 0.5)
    );
    ensure!(p(&delayed_rt, 0.5) >= 100.0, "the client waits for the delay");
    ensure!(p(&prompt_rt, 0.5) < 30.0 && p(&abort_rt, 0.5) < 30.0, "undelayed requests and aborts are fast");
    Ok(())
}

// ------------------------------------------------------------------------------ rate limit

/// 5. A local rate limit of 100 requests/s (10 tokens every 100 ms) against a client sending
///    300/s for 4 s: about 100/s succeed, the rest get 429 with `retry-after` and
///    `x-sluice-error: rate-limited`. The policy targets one port of the Service (sectionName).
#[test]
fn local_rate_limit_holds_a_client_to_the_rate() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("web", 1, |_| vec![])?;
    w.service("web", "10.96.2.70", 80, HTTP_PORT, "http", &[&pods[0]])?;
    w.policy(
        "limit",
        &["{group: \"\", kind: Service, name: web, sectionName: http}"],
        "  localRateLimit: {maxTokens: 10, tokensPerFill: 10, fillInterval: 100ms}\n",
    )?;
    let before = w.counters()?;
    let s = http_load(
        &w.client,
        addr("10.96.2.70", 80),
        &["--rps", "300", "--duration-ms", "4000", "--connections", "6", "--each"],
    )?;
    let after = w.counters()?;
    ensure!(s.ok, "{s:?}");
    let limited = s.status(429);
    // Steady state: after the first second (which also spends the initial burst), over the
    // time the client actually took to send (it may lag behind its schedule on a busy machine).
    let last_send = s.each.iter().map(|r| r.start_ms).fold(0.0, f64::max);
    let steady_ok = s.each.iter().filter(|r| r.start_ms >= 1000.0 && r.status == Some(200)).count() as f64
        / ((last_send - 1000.0) / 1000.0).max(0.1);
    let offered = s.requests as f64 / (last_send / 1000.0).max(0.1);
    eprintln!(
        "rate limit 100/s, client at 300/s for 4 s: {} requests ({offered:.0}/s offered), {} ok ({:.1}/s over the run, {steady_ok:.1}/s after the first second), {limited} got 429 ({} with retry-after); http_rate_limited +{}",
        s.requests,
        s.succeeded,
        s.succeeded as f64 / 4.0,
        s.with_retry_after,
        delta(&before, &after, "http_rate_limited")
    );
    ensure!(offered >= 280.0, "the client must have offered about 300/s: {offered:.0}/s");
    ensure!((90.0..=112.0).contains(&steady_ok), "{steady_ok:.1} requests/s succeeded, expected about 100");
    ensure!(s.succeeded + limited == s.requests, "only 200 and 429: {:?}", s.by_status);
    ensure!(
        s.flag("rate-limited") == limited && s.with_retry_after == limited,
        "every 429 says rate-limited and retry-after: {s:?}"
    );
    ensure!(
        s.each.iter().filter(|r| r.status == Some(429)).all(|r| r.retry_after.as_deref() == Some("1")),
        "retry-after is the next fill, rounded up to 1 s"
    );
    ensure!(
        delta(&before, &after, "http_rate_limited") == limited as i64,
        "http_rate_limited must count them"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ egress

/// The "internet": a pod of the namespace `internet`, which is not in the mesh, with addresses
/// no manifest lists, routed to it by the node: 192.0.2.10 and .11 (HTTP on 8080, echo on
/// 9000), .20 (HTTPS on 443, certificate for secure.internet.test) and .30 (HTTPS on 443,
/// certificate for evil.internet.test, which the TLS policies do not trust).
struct Internet {
    pod: Pod,
    servers: BTreeMap<&'static str, SimProcess>,
    /// The PEM certificate of the .20 server.
    trusted_pem: String,
}

fn internet(w: &World) -> Result<Internet> {
    w.sim.write_namespace("internet", false)?;
    let pod = w.node.add_pod("internet", "inet", PodOpts::labels(&[("app", "inet")]))?;
    // In the model before anything else is applied (apply() waits for the next generation).
    w.sluice.wait_for(
        "/model",
        |m| m["pods"].as_array().is_some_and(|a| a.iter().any(|p| p["name"] == "inet")),
        T,
    )?;
    for ip in ["192.0.2.10", "192.0.2.11", "192.0.2.20", "192.0.2.30"] {
        pod.run(["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?.check()?;
    }
    // The node's netns goes with the sim, and the route with it.
    w.node.run(["ip", "route", "add", "192.0.2.0/24", "via", &pod.ip().to_string()])?.check()?;
    let mut servers = BTreeMap::new();
    servers.insert("plain", start_http_server(&pod, HTTP_PORT, "internet-plain", &[])?);
    let mut echo = pod.simpod(["echo-server", "--port", "9000"])?;
    echo.wait_listening(T)?;
    servers.insert("echo", echo);
    let trusted = w.sim.temp_dir().join("internet-secure.pem");
    let evil = w.sim.temp_dir().join("internet-evil.pem");
    servers.insert(
        "secure",
        start_https_server(
            &pod,
            443,
            &trusted,
            "internet-secure",
            &["--bind", "192.0.2.20", "--san", "secure.internet.test"],
        )?,
    );
    servers.insert(
        "evil",
        start_https_server(
            &pod,
            443,
            &evil,
            "internet-evil",
            &["--bind", "192.0.2.30", "--san", "evil.internet.test"],
        )?,
    );
    let trusted_pem = std::fs::read_to_string(&trusted)?;
    Ok(Internet { pod, servers, trusted_pem })
}

fn service_entry(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

/// 6a. From a REGISTRY_ONLY namespace, an undeclared external address is refused (HTTP: 502
///     `egress-blocked`; opaque TCP: reset) and counted (`egress_refused`), while Services and
///     pods stay reachable; once a ServiceEntry declares it (by address, or for HTTP by host),
///     it works. Another namespace (ALLOW_ANY by default) reaches anything.
#[test]
fn registry_only_refuses_undeclared_destinations_until_declared() -> Result<()> {
    let mut w = World::with(SluiceOpts::default(), true)?;
    let pods = w.http_backends("web", 1, |_| vec![])?;
    w.service("web", "10.96.2.90", 80, HTTP_PORT, "http", &[&pods[0]])?;
    let inet = internet(&w)?;
    let c0 = w.counters()?;

    // Refused: HTTP and opaque TCP to an address nothing declares.
    let http = w.curl(&["http://192.0.2.10:8080/x"])?;
    ensure!(
        http.status == 502 && http.flag() == "egress-blocked",
        "undeclared HTTP: {} {:?} {}",
        http.status,
        http.headers,
        http.body
    );
    let tcp =
        workloads::raw(&w.client, addr("192.0.2.10", 9000), "hello\\n", &["--read-timeout-ms", "3000"])?;
    ensure!(tcp.ended == "reset" && tcp.received_len == 0, "undeclared TCP must be reset: {tcp:?}");
    let c1 = w.counters()?;
    ensure!(
        delta(&c0, &c1, "egress_refused") == 2,
        "both refusals counted: {}",
        delta(&c0, &c1, "egress_refused")
    );
    // A Service and a pod (even outside the mesh) are registered.
    ensure!(w.curl(&["http://10.96.2.90/"])?.status == 200, "a Service must stay reachable");
    let pod_ip = w.curl(&[&format!("http://{}:8080/", inet.pod.ip())])?;
    ensure!(
        pod_ip.status == 200 && pod_ip.json()?["name"] == "internet-plain",
        "a pod IP is registered: {}",
        pod_ip.status
    );

    // Declared by address (HTTP and TCP ports), and by host (HTTP only).
    let entries = [
        service_entry(
            "plain",
            json!({"hosts": ["plain.internet.test"], "addresses": ["192.0.2.10"], "location": "MESH_EXTERNAL", "resolution": "NONE",
                   "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}, {"number": 9000, "name": "echo", "protocol": "TCP"}]}),
        ),
        service_entry(
            "api",
            json!({"hosts": ["api.internet.test"], "resolution": "NONE", "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"}]}),
        ),
    ];
    w.apply_ok("se-internet.yaml", &manifest::to_yaml(&entries)?)?;
    let ok = w.curl(&["http://192.0.2.10:8080/x"])?;
    ensure!(
        ok.status == 200 && ok.json()?["name"] == "internet-plain",
        "declared HTTP: {} {}",
        ok.status,
        ok.body
    );
    ensure!(
        ok.json()?["peer"].as_str().is_some_and(|p| p.starts_with(&format!("{}:", w.client.ip()))),
        "the external server sees the client pod's address: {}",
        ok.body
    );
    let echo = common::tcp_exchange(&w.client, addr("192.0.2.10", 9000), 10_000)?;
    ensure!(echo["ok"] == true && echo["sha256_sent"] == echo["sha256_received"], "declared TCP: {echo}");
    let by_host = w.curl(&["-H", "Host: api.internet.test", "http://192.0.2.11:8080/y"])?;
    ensure!(by_host.status == 200, "HTTP with a declared Host: {} {}", by_host.status, by_host.body);
    let other_host = w.curl(&["-H", "Host: other.internet.test", "http://192.0.2.11:8080/y"])?;
    ensure!(
        other_host.status == 502 && other_host.flag() == "egress-blocked",
        "undeclared Host: {}",
        other_host.status
    );
    let tcp11 =
        workloads::raw(&w.client, addr("192.0.2.11", 9000), "hello\\n", &["--read-timeout-ms", "3000"])?;
    ensure!(tcp11.ended == "reset", "a host does not declare opaque TCP to an address: {tcp11:?}");
    let c2 = w.counters()?;
    ensure!(
        delta(&c1, &c2, "egress_refused") == 2,
        "two more refusals: {}",
        delta(&c1, &c2, "egress_refused")
    );

    // ALLOW_ANY (the default) elsewhere.
    w.sim.write_namespace("open", true)?;
    let open = w.node.add_pod("open", "client", PodOpts::default())?;
    wait_enrolled(&w.sluice, &open)?;
    let free = common::tcp_exchange(&open, addr("192.0.2.11", 9000), 1000)?;
    ensure!(
        free["ok"] == true && common::via_sluice(&free),
        "ALLOW_ANY reaches anything, through sluice: {free}"
    );
    eprintln!(
        "egress: refused HTTP {} {}, TCP {}; egress_refused {} -> {} -> {}; declared: HTTP {}, TCP ok, by host {}, other host {}",
        http.status,
        http.flag(),
        tcp.ended,
        c0["egress_refused"],
        c1["egress_refused"],
        c2["egress_refused"],
        ok.status,
        by_host.status,
        other_host.status
    );
    drop(inet);
    Ok(())
}

/// 6b. TLS origination: the application sends plain HTTP to a ServiceEntry's port 80, sluice
///     connects to the endpoint's 443 with TLS (SNI = the entry's host), verifying the server
///     against the policy's caCertificates; the external server sees TLS with that SNI and the
///     request. An external server whose certificate is not trusted is refused (502
///     `upstream-tls-failure`).
#[test]
fn tls_origination_to_a_service_entry() -> Result<()> {
    let w = World::with(SluiceOpts::default(), true)?;
    let mut inet = internet(&w)?;
    let docs = [
        service_entry(
            "secure",
            json!({"hosts": ["secure.internet.test"], "addresses": ["192.0.2.20"], "resolution": "NONE",
                   "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443}]}),
        ),
        // STATIC: the application dials a virtual address, sluice connects to the endpoint.
        service_entry(
            "evil",
            json!({"hosts": ["evil.internet.test"], "addresses": ["192.0.2.31"], "resolution": "STATIC",
                   "endpoints": [{"address": "192.0.2.30"}],
                   "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443}]}),
        ),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "secure-tls", "namespace": "shop"},
               "spec": {"targetRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "secure"}],
                        "tls": {"mode": "SIMPLE", "caCertificates": inet.trusted_pem}}}),
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "TrafficPolicy", "metadata": {"name": "evil-tls", "namespace": "shop"},
               "spec": {"targetRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "evil"}],
                        "tls": {"mode": "SIMPLE", "caCertificates": inet.trusted_pem}}}),
    ];
    w.apply_ok("egress-tls.yaml", &manifest::to_yaml(&docs)?)?;
    let c0 = w.counters()?;
    let r = w.curl(&["http://192.0.2.20/orders?id=7"])?;
    ensure!(
        r.status == 200,
        "TLS origination: {} {:?} {}\n{}",
        r.status,
        r.headers,
        r.body,
        w.sluice_log_excerpt()
    );
    let body = r.json()?;
    ensure!(
        body["name"] == "internet-secure" && body["tls"] == true,
        "answered over TLS by the external server: {body}"
    );
    ensure!(body["sni"] == "secure.internet.test", "SNI is the entry's host: {body}");
    ensure!(
        body["path"] == "/orders?id=7" && body["method"] == "GET",
        "the application's request arrived: {body}"
    );
    let accepted = inet
        .servers
        .get_mut("secure")
        .context("secure")?
        .wait_for_json(T, |l| l["event"] == "tls_accepted")?;
    // The Host header matches too (the same entry, by host).
    let by_host = w.curl(&["-H", "Host: secure.internet.test", "http://192.0.2.20/h"])?;
    ensure!(by_host.status == 200 && by_host.json()?["sni"] == "secure.internet.test", "{}", by_host.body);
    let c1 = w.counters()?;
    ensure!(delta(&c0, &c1, "upstream_tls_originated") >= 1, "upstream_tls_originated must count: {c1}");

    // Not trusted: refused, never sent in plain text.
    let bad = w.curl(&["http://192.0.2.31/secret"])?;
    ensure!(
        bad.status == 502 && bad.flag() == "upstream-tls-failure",
        "untrusted server: {} {:?} {}",
        bad.status,
        bad.headers,
        bad.body
    );
    let evil = inet.servers.get_mut("evil").context("evil")?;
    let refused = evil.wait_for_json(T, |l| l["event"] == "tls_error" || l["event"] == "request")?;
    ensure!(refused["event"] == "tls_error", "the untrusted server must not get the request: {refused}");
    eprintln!(
        "TLS origination: {} with sni {} ({}), upstream_tls_originated +{}; untrusted: {} {} (server saw: {})",
        r.status,
        body["sni"],
        accepted["version"],
        delta(&c0, &c1, "upstream_tls_originated"),
        bad.status,
        bad.flag(),
        refused["error"]
    );
    Ok(())
}

// ------------------------------------------------------------------------------ live edits

/// A TrafficPolicy edit applies live; an invalid policy is reported with its file and the
/// reason, and the rest keep working (a file that turns invalid keeps its last good content).
#[test]
fn traffic_policy_edits_apply_live_and_invalid_ones_are_reported() -> Result<()> {
    let mut w = World::new()?;
    let pods = w.http_backends("web", 1, |_| vec![])?;
    w.service("web", "10.96.2.80", 80, HTTP_PORT, "http", &[&pods[0]])?;
    let vip = addr("10.96.2.80", 80);
    let chaos = |h: &[&str]| -> Result<LoadSummary> {
        let mut args = vec!["--count", "20", "--connections", "2"];
        for x in h {
            args.extend(["--header", x]);
        }
        http_load(&w.client, vip, &args)
    };
    w.policy("web", &[&svc("web")], "  faultInjection:\n    abort: {httpStatus: 503, percentage: 100}\n")?;
    let all = chaos(&[])?;
    ensure!(all.flag("fault-injected") == 20, "abort 100 %: {all:?}");

    // Edit: only requests with x-chaos: on.
    let matched = "  faultInjection:\n    abort: {httpStatus: 503, percentage: 100}\n    matches: [{name: X-Chaos, value: \"on\"}]\n";
    w.policy("web", &[&svc("web")], matched)?;
    ensure!(chaos(&[])?.succeeded == 20, "without the header nothing is aborted");
    ensure!(chaos(&["x-chaos: on"])?.flag("fault-injected") == 20, "with the header everything is");

    // Another file with an invalid policy: reported (file and reason), the valid one applies.
    let model = w.apply(
        "tp-bad.yaml",
        &policy_yaml("bad", &[&svc("web")], "  retries: {attempts: 3, jitter: 5ms}\n"),
    )?;
    let errors = model["errors"].to_string();
    ensure!(
        errors.contains("tp-bad.yaml") && errors.contains("jitter"),
        "the invalid policy must be reported with its file and reason: {errors}"
    );
    ensure!(
        chaos(&["x-chaos: on"])?.flag("fault-injected") == 20 && chaos(&[])?.succeeded == 20,
        "the valid policy keeps applying"
    );
    let status = w.sluice.get_json("/status")?;
    ensure!(status.to_string().contains("tp-bad.yaml"), "sluice status lists the error: {status}");

    // The valid file turns invalid: reported, its last good content stays in force.
    let model =
        w.apply("tp-web.yaml", &policy_yaml("web", &[&svc("web")], "  circuitBreaker: {maxRequests: 0}\n"))?;
    let errors = model["errors"].to_string();
    ensure!(errors.contains("tp-web.yaml") && errors.contains("maxRequests"), "{errors}");
    ensure!(chaos(&["x-chaos: on"])?.flag("fault-injected") == 20, "the last good version stays in force");

    // The bad file removed and the policy fixed: no errors left, the fix applies at once.
    w.remove("tp-bad.yaml")?;
    w.policy("web", &[&svc("web")], "  timeouts: {request: 5s}\n")?;
    let fixed = chaos(&["x-chaos: on"])?;
    ensure!(fixed.succeeded == 20, "the fixed policy applies: {fixed:?}");
    eprintln!("live edits: abort all -> abort on x-chaos -> invalid files reported ({errors}) -> fixed");
    Ok(())
}

// ------------------------------------------------------------------------------ gRPC

/// gRPC clients get gRPC statuses: a local rate limit gives RESOURCE_EXHAUSTED, a fault abort
/// the configured grpcStatus, or UNAVAILABLE for an HTTP 503 abort.
#[test]
fn grpc_rate_limit_and_fault_abort_give_grpc_statuses() -> Result<()> {
    let mut w = World::new()?;
    let pod = w.node.add_pod("shop", "grpc-0", PodOpts::labels(&[("app", "grpc")]))?;
    w.others.push(workloads::start_grpc_server(&pod, GRPC_PORT, "grpc-0")?);
    wait_enrolled(&w.sluice, &pod)?;
    w.service("grpc", "10.96.2.100", GRPC_PORT, GRPC_PORT, "grpc", &[&pod])?;
    let to = addr("10.96.2.100", GRPC_PORT);

    w.policy(
        "grpc",
        &[&svc("grpc")],
        "  localRateLimit: {maxTokens: 5, tokensPerFill: 1, fillInterval: 60s}\n",
    )?;
    let s = workloads::grpc_client(&w.client, to, 20, 1, &[])?;
    ensure!(
        s.statuses.get("OK") == Some(&5) && s.statuses.get("RESOURCE_EXHAUSTED") == Some(&15),
        "rate limit: {s:?}"
    );
    let out =
        workloads::run_slgrpc(&w.client, ["client", "--to", &to.to_string(), "--calls", "1", "--each"])?;
    let line = out.json_lines()?.into_iter().find(|l| l["seq"].is_number()).context("per-call line")?;
    ensure!(
        line["message"].as_str().is_some_and(|m| m.contains("rate-limited")),
        "grpc-message says why: {line}"
    );

    w.policy("grpc", &[&svc("grpc")], "  faultInjection:\n    abort: {grpcStatus: 10, percentage: 100}\n")?;
    let aborted = workloads::grpc_client(&w.client, to, 10, 2, &[])?;
    ensure!(aborted.statuses.get("ABORTED") == Some(&10), "abort with grpcStatus 10: {aborted:?}");

    w.policy("grpc", &[&svc("grpc")], "  faultInjection:\n    abort: {httpStatus: 503, percentage: 100}\n")?;
    let unavailable = workloads::grpc_client(&w.client, to, 10, 2, &[])?;
    ensure!(unavailable.statuses.get("UNAVAILABLE") == Some(&10), "abort with HTTP 503: {unavailable:?}");
    eprintln!(
        "gRPC: rate limit {:?}; abort grpcStatus 10 {:?}; abort 503 {:?}",
        s.statuses, aborted.statuses, unavailable.statuses
    );
    Ok(())
}

// ------------------------------------------------------------------------------ noisy neighbour

fn slload_bin() -> Result<PathBuf> {
    Ok(sluice_tests::simpod_bin()?.with_file_name("slload"))
}

/// Runs `slload rate` from `pod` and returns its result.
fn slload_rate(pod: &Pod, to: SocketAddr, rps: u32, duration_ms: u64) -> Result<Value> {
    let bin = slload_bin()?;
    let out = pod.run_timeout(
        [
            bin.to_str().context("slload path")?,
            "rate",
            "--to",
            &to.to_string(),
            "--rps",
            &rps.to_string(),
            "--connections",
            "4",
            "--duration-ms",
            &duration_ms.to_string(),
            "--warmup-ms",
            "500",
        ],
        Duration::from_secs(60),
    )?;
    let v = out.json().with_context(|| format!("slload rate: {}", out.stderr))?;
    ensure!(v["ok"] == true, "slload rate failed: {v}");
    Ok(v)
}

/// 7. A noisy pod opening connections as fast as it can (3 processes × 8 connect/request/close
///    loops, to another Service) does not push another pod's keep-alive request p99 (200
///    requests/s, measured by `slload rate` from the scheduled send times) past twice its value
///    without the noise. The per-pod connection rate is what an operator sizes to the node: well
///    below what the node's sluice accepts in all, to leave room for the other pods. This debug
///    build on a 2-core machine accepts about 1000 connections/s in all (a release build on a
///    real node, several times that), so the test sets 150/s;
///    `SLUICE_TEST_POD_CONNECTION_RATE=N` overrides it (to tune it). It runs alone (nextest
///    override in .config/nextest.toml): other suites' load on the same 2 cores would be noise.
#[test]
fn noisy_neighbour_does_not_double_another_pods_p99() -> Result<()> {
    let rate: Option<String> = Some(std::env::var("SLUICE_TEST_POD_CONNECTION_RATE").unwrap_or_else(|_| "150".into()));
    let mut opts = SluiceOpts::default();
    if let Some(r) = &rate {
        opts.args.extend(["--pod-connection-rate".into(), r.into()]);
    }
    let mut w = World::locked(opts, false, suite_lock(true)?)?;
    let quiet = w.node.add_pod("shop", "quiet", PodOpts::labels(&[("app", "quiet")]))?;
    let noisy = w.node.add_pod("shop", "noisy", PodOpts::labels(&[("app", "noisy")]))?;
    let slload = slload_bin()?;
    let slload = slload.to_str().context("slload path")?;
    let mut backends = Vec::new();
    for name in ["quiet-be", "noise-be"] {
        let pod = w.node.add_pod("shop", name, PodOpts::labels(&[("app", name)]))?;
        let mut p = pod.spawn([slload, "serve", "--port", "8080", "--threads", "1"])?;
        p.wait_listening(T)?;
        w.others.push(p);
        backends.push(pod);
    }
    for p in [&quiet, &noisy, &backends[0], &backends[1]] {
        wait_enrolled(&w.sluice, p)?;
    }
    w.service("quiet", "10.96.3.10", 80, 8080, "http", &[&backends[0]])?;
    w.service("noise", "10.96.3.11", 80, 8080, "http", &[&backends[1]])?;
    let quiet_vip = addr("10.96.3.10", 80);

    let alone = slload_rate(&quiet, quiet_vip, 200, 4000)?;
    let before = w.counters()?;
    let noisy_total = |w: &World| -> u64 {
        w.sluice
            .get_json("/pods")
            .ok()
            .and_then(|p| {
                p.as_array().and_then(|a| {
                    a.iter().find(|p| p["name"] == "noisy").and_then(|p| p["connections_total"].as_u64())
                })
            })
            .unwrap_or(0)
    };
    let mut noise = Vec::new();
    for _ in 0..3 {
        noise.push(noisy.spawn([
            slload,
            "churn",
            "--to",
            "10.96.3.11:80",
            "--connections",
            "8",
            "--duration-ms",
            "7000",
            "--warmup-ms",
            "0",
        ])?);
    }
    // The noise is under way once sluice has seen a few hundred of its connections.
    poll_until(Duration::from_secs(10), || (noisy_total(&w) > 300).then_some(()))
        .context("the noisy pod's connections never reached sluice")?;
    let started = Instant::now();
    let loud = slload_rate(&quiet, quiet_vip, 200, 4000)?;
    let measured = started.elapsed();
    let mut churn = Vec::new();
    for mut p in noise {
        churn.push(p.wait_output(Duration::from_secs(30))?.json()?);
    }
    let after = w.counters()?;
    // Alone again: how much the machine itself (other work on it) moved the figures.
    let again = slload_rate(&quiet, quiet_vip, 200, 2000)?;
    let p99 = |v: &Value| v["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN);
    let p50 = |v: &Value| v["latency"]["p50_us"].as_f64().unwrap_or(f64::NAN);
    let conns: f64 = churn.iter().map(|c| c["conns_per_s"].as_f64().unwrap_or(0.0)).sum();
    let churn_errors: u64 = churn.iter().map(|c| c["errors"].as_u64().unwrap_or(0)).sum();
    eprintln!(
        "noisy neighbour (--pod-connection-rate {}): quiet pod at 200 req/s: alone p50 {:.0} µs p99 {:.0} µs; with noise p50 {:.0} µs p99 {:.0} µs (x{:.2}) over {measured:?}; alone again p50 {:.0} µs p99 {:.0} µs; noise {conns:.0} connections/s ({churn_errors} errors, first {:?}); pod_accept_paused +{}, pod_overflow +{}",
        rate.as_deref().unwrap_or("default 2000"),
        p50(&alone),
        p99(&alone),
        p50(&loud),
        p99(&loud),
        p99(&loud) / p99(&alone),
        p50(&again),
        p99(&again),
        churn.iter().find_map(|c| c["first_error"].as_str()),
        delta(&before, &after, "pod_accept_paused"),
        delta(&before, &after, "pod_overflow")
    );
    ensure!(
        p99(&loud) <= 2.0 * p99(&alone),
        "the noisy pod pushed the quiet pod's p99 from {:.0} µs to {:.0} µs (> 2x)",
        p99(&alone),
        p99(&loud)
    );
    Ok(())
}
