//! Istio-compatible metrics on :15020 (issue "Telemetry and the node-local CLI"): after a known
//! mix of requests across two nodes (HTTP 200 and 503, gRPC OK and UNAVAILABLE, opaque TCP),
//! each node's `GET /metrics` shows exactly those counts with Istio's labels, on the source
//! reporter (the client's node) and the destination reporter (the server's node); every
//! histogram's count equals its counter; the text is OpenMetrics that the Prometheus client
//! library's parser accepts (Python `prometheus_client`, installed by `cargo xtask setup`).
//! Workload labels name the pods' controllers (ownerReferences), never pods, and the series of
//! workloads whose pods are all gone leave `/metrics` after the grace period.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};
use common::{expect_ok, tcp_exchange, wait_enrolled, T};
use serde::Deserialize;
use serde_json::json;
use sluice_tests::{
    manifest,
    workloads::{grpc_client, start_grpc_server, start_http_server},
    Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts,
};

const HTTP_VIP: &str = "10.96.3.10";
const GRPC_VIP: &str = "10.96.3.11";
const ECHO_VIP: &str = "10.96.3.12";
const DB_VIP: &str = "10.96.3.13";
const HTTP_PORT: u16 = 80;
const HTTP_TARGET: u16 = 8080;
const GRPC_PORT: u16 = 50051;
const ECHO_PORT: u16 = 9000;
const METRICS_URL: &str = "http://127.0.0.1:15020/metrics";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Istio's standard labels of request metrics, in the order sluice writes them.
const REQUEST_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// The client on n1; an HTTP server, a gRPC server and an echo server on n2, each behind its
/// own Service (appProtocol http, grpc, tcp); a sluice on each node.
struct World {
    _sim: Sim,
    n1: Node,
    n2: Node,
    client: Pod,
    _servers: Vec<SimProcess>,
    _s1: Sluice,
    _s2: Sluice,
}

fn world() -> Result<World> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    sim.write_namespace("shop", true)?;
    let labels = |app: &str, version: &'static str| PodOpts::labels(&[("app", app), ("version", version)]);
    let client = n1.add_pod("shop", "client", labels("client", "v1").service_account("client"))?;
    let web = n2.add_pod("shop", "web-0", labels("web", "v2").service_account("web"))?;
    let grpc = n2.add_pod("shop", "grpc-0", labels("grpc", "v3").service_account("grpc"))?;
    let echo = n2.add_pod("shop", "echo-0", labels("echo", "v4").service_account("echo"))?;
    let mut servers = vec![
        start_http_server(&web, HTTP_TARGET, "web-0", &[])?,
        start_grpc_server(&grpc, GRPC_PORT, "grpc-0")?,
    ];
    let mut e = echo.simpod(["echo-server", "--port", &ECHO_PORT.to_string()])?;
    e.wait_listening(T).context("echo server")?;
    servers.push(e);
    for (name, vip, port, target, app_protocol, pod) in [
        ("web", HTTP_VIP, HTTP_PORT, HTTP_TARGET, "http", &web),
        ("grpc", GRPC_VIP, GRPC_PORT, GRPC_PORT, "grpc", &grpc),
        ("echo", ECHO_VIP, ECHO_PORT, ECHO_PORT, "tcp", &echo),
    ] {
        write_service(&sim, name, vip, port, target, app_protocol, &[pod])?;
    }
    let s1 = n1.start_sluice(SluiceOpts::default())?;
    let s2 = n2.start_sluice(SluiceOpts::default())?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &client)?;
    for p in [&web, &grpc, &echo] {
        wait_enrolled(&s2, p)?;
    }
    for s in [&s1, &s2] {
        s.wait_for("/model", |m| m["services"].as_array().is_some_and(|a| a.len() >= 3), T)?;
    }
    Ok(World { _sim: sim, n1, n2, client, _servers: servers, _s1: s1, _s2: s2 })
}

/// A Service `shop/<name>` with one port of `app_protocol` and `pods` as its endpoints.
fn write_service(
    sim: &Sim,
    name: &str,
    vip: &str,
    port: u16,
    target: u16,
    app_protocol: &str,
    pods: &[&Pod],
) -> Result<()> {
    let eps: Vec<manifest::Endpoint> = pods
        .iter()
        .map(|pod| manifest::Endpoint {
            ip: pod.ip(),
            pod_name: pod.name(),
            pod_namespace: pod.namespace(),
            pod_uid: pod.uid(),
            node_name: pod.node().name(),
            labels: pod.labels(),
        })
        .collect();
    let docs = manifest::with_app_protocol(
        manifest::service("shop", name, vip, &[("main", port, target)], &eps),
        "main",
        app_protocol,
    );
    sim.write_file(&manifest::service_file_name("shop", name), manifest::to_yaml(&docs)?)?;
    Ok(())
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

/// One sample as the Prometheus client library parsed it.
#[derive(Debug, Clone, Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The Python side: parse stdin with prometheus_client's OpenMetrics parser (which validates
/// the format: metadata, histogram buckets and counts, `# EOF`), print the samples as JSON.
const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;

fn parse_openmetrics(text: &str) -> Result<Vec<Sample>> {
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running python3")?;
    child.stdin.take().context("python3 stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'prometheus_client'") {
        bail!("the Python package prometheus-client is missing: run `cargo xtask setup`");
    }
    ensure!(
        out.status.success(),
        "prometheus_client's OpenMetrics parser rejected the scrape: {stderr}\n{text}"
    );
    serde_json::from_slice(&out.stdout).context("parser output")
}

/// `GET :15020/metrics` from inside the node's network namespace: (content type, text, samples).
fn scrape(node: &Node) -> Result<(String, String, Vec<Sample>)> {
    let out = node.run_timeout(
        ["curl", "-sS", "--max-time", "10", "-w", "\n%{content_type}", METRICS_URL],
        Duration::from_secs(20),
    )?;
    ensure!(out.success(), "curl {METRICS_URL} on {}: {}", node.short_name(), out.stderr);
    let (text, content_type) = out.stdout.rsplit_once('\n').context("curl output")?;
    let samples = parse_openmetrics(text)?;
    Ok((content_type.to_string(), text.to_string(), samples))
}

fn matching<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The value of the one sample `name` with (at least) `labels`.
fn one(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let m = matching(samples, name, labels);
    if m.len() != 1 {
        let all: Vec<String> =
            matching(samples, name, &[]).iter().map(|s| format!("{:?} {}", s.labels, s.value)).collect();
        bail!(
            "expected one {name} sample with {labels:?}, found {}; all {name} samples:\n{}",
            m.len(),
            all.join("\n")
        );
    }
    Ok(m[0].value)
}

fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(samples, name, labels).iter().map(|s| s.value).sum()
}

/// Polls both nodes' metrics until `done(n1 samples, n2 samples)`, returns the last scrapes.
type Scraped = (String, String, Vec<Sample>);

fn scrape_until(w: &World, done: impl Fn(&[Sample], &[Sample]) -> bool) -> Result<(Scraped, Scraped)> {
    let deadline = Instant::now() + T;
    loop {
        let a = scrape(&w.n1)?;
        let b = scrape(&w.n2)?;
        if done(&a.2, &b.2) {
            return Ok((a, b));
        }
        if Instant::now() > deadline {
            let show = |s: &[Sample]| {
                s.iter()
                    .filter(|s| s.name.starts_with("istio_requests_total") || s.name.starts_with("istio_tcp"))
                    .map(|s| format!("{} {:?} {}", s.name, s.labels, s.value))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            bail!(
                "metrics did not reach the expected counts in {T:?}\nn1:\n{}\nn2:\n{}",
                show(&a.2),
                show(&b.2)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The full label set Istio gives a request from the client to `dst` (workload, app, version,
/// service account) through Service `svc`.
fn request_labels(
    reporter: &str,
    dst: (&str, &str, &str, &str),
    svc: &str,
    protocol: &str,
    code: &str,
    grpc: &str,
) -> Vec<(&'static str, String)> {
    let (workload, app, version, sa) = dst;
    vec![
        ("reporter", reporter.into()),
        ("source_workload", "client".into()),
        ("source_canonical_service", "client".into()),
        ("source_canonical_revision", "v1".into()),
        ("source_workload_namespace", "shop".into()),
        ("source_principal", spiffe("client")),
        ("source_app", "client".into()),
        ("source_version", "v1".into()),
        ("source_cluster", "Kubernetes".into()),
        ("destination_workload", workload.into()),
        ("destination_workload_namespace", "shop".into()),
        ("destination_principal", spiffe(sa)),
        ("destination_app", app.into()),
        ("destination_version", version.into()),
        ("destination_service", format!("{svc}.shop.svc.cluster.local")),
        ("destination_canonical_service", app.into()),
        ("destination_canonical_revision", version.into()),
        ("destination_service_name", svc.into()),
        ("destination_service_namespace", "shop".into()),
        ("destination_cluster", "Kubernetes".into()),
        ("request_protocol", protocol.into()),
        ("response_code", code.into()),
        ("grpc_response_status", grpc.into()),
        ("response_flags", "-".into()),
        ("connection_security_policy", if reporter == "source" { "unknown" } else { "mutual_tls" }.into()),
    ]
}

fn as_refs<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Every `istio_requests_total` series has its three histograms with exactly its labels, each
/// with `_count` and the `+Inf` bucket equal to the counter.
fn histograms_match_counters(samples: &[Sample]) -> Result<()> {
    for s in samples.iter().filter(|s| s.name == "istio_requests_total") {
        for h in ["istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"] {
            let count = samples
                .iter()
                .filter(|x| x.name == format!("{h}_count") && x.labels == s.labels)
                .collect::<Vec<_>>();
            ensure!(
                count.len() == 1 && count[0].value == s.value,
                "{h}_count {count:?} != istio_requests_total {} for {:?}",
                s.value,
                s.labels
            );
            let mut inf = s.labels.clone();
            inf.insert("le".into(), "+Inf".into());
            let bucket = samples
                .iter()
                .filter(|x| x.name == format!("{h}_bucket") && x.labels == inf)
                .collect::<Vec<_>>();
            ensure!(
                bucket.len() == 1 && bucket[0].value == s.value,
                "{h}_bucket{{le=+Inf}} {bucket:?} != {} for {:?}",
                s.value,
                s.labels
            );
        }
    }
    Ok(())
}

/// 37 GET 200, 5 GET 503, 11 gRPC OK and 4 gRPC UNAVAILABLE from the client on n1 to backends
/// on n2: node 1 reports them as reporter=source, node 2 as reporter=destination, with the
/// same counts and Istio's labels.
#[test]
fn request_metrics_on_both_reporters() -> Result<()> {
    let w = world()?;
    let http = addr(HTTP_VIP, HTTP_PORT);
    let get = |path: &str, count: u32| -> Result<Vec<serde_json::Value>> {
        let out = w.client.run_simpod_timeout(
            [
                "http-get",
                "--to",
                &http.to_string(),
                "--path",
                path,
                "--count",
                &count.to_string(),
                "--keepalive",
            ],
            Duration::from_secs(120),
        )?;
        let lines = out.json_lines()?;
        ensure!(lines.len() == count as usize, "expected {count} results: {}", out.stderr);
        Ok(lines)
    };
    let ok = get("/items/1", 37)?;
    ensure!(ok.iter().all(|l| l["ok"] == true && l["status"] == 200), "{ok:?}");
    let failed = get("/items/2?status=503", 5)?;
    ensure!(failed.iter().all(|l| l["ok"] == true && l["status"] == 503), "{failed:?}");
    let grpc_ok = grpc_client(&w.client, addr(GRPC_VIP, GRPC_PORT), 11, 2, &[])?;
    ensure!(grpc_ok.ok && grpc_ok.succeeded == 11, "{grpc_ok:?}");
    let grpc_err = grpc_client(&w.client, addr(GRPC_VIP, GRPC_PORT), 4, 2, &["--fail-code", "14"])?;
    ensure!(grpc_err.statuses.get("UNAVAILABLE") == Some(&4), "{grpc_err:?}");

    let requests = |s: &[Sample], reporter: &str| sum(s, "istio_requests_total", &[("reporter", reporter)]);
    let ((ct1, text1, m1), (ct2, _, m2)) =
        scrape_until(&w, |a, b| requests(a, "source") >= 57.0 && requests(b, "destination") >= 57.0)?;
    ensure!(ct1 == OPENMETRICS && ct2 == OPENMETRICS, "content types {ct1:?} {ct2:?}");
    ensure!(text1.ends_with("# EOF\n"), "no # EOF");

    // Bare pods: their workload is their app label (never the pod name).
    let web = ("web", "web", "v2", "web");
    let grpc = ("grpc", "grpc", "v3", "grpc");
    let expected = [
        (web, "web", "http", "200", "", 37.0),
        (web, "web", "http", "503", "", 5.0),
        (grpc, "grpc", "grpc", "200", "0", 11.0),
        (grpc, "grpc", "grpc", "200", "14", 4.0),
    ];
    for (node, samples, reporter, other) in
        [("n1", &m1, "source", "destination"), ("n2", &m2, "destination", "source")]
    {
        for (dst, svc, protocol, code, status, count) in expected {
            let labels = request_labels(reporter, dst, svc, protocol, code, status);
            let v = one(samples, "istio_requests_total", &as_refs(&labels))
                .with_context(|| format!("on {node}"))?;
            ensure!(v == count, "{node}: istio_requests_total{{{labels:?}}} = {v}, expected {count}");
        }
        // Exactly those: no other request series on this node, none from the other side.
        let series = matching(samples, "istio_requests_total", &[]);
        ensure!(series.len() == 4, "{node}: expected 4 request series, found {series:#?}");
        ensure!(
            requests(samples, reporter) == 57.0 && requests(samples, other) == 0.0,
            "{node}: {series:#?}"
        );
        for s in &series {
            let keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            let want: BTreeSet<&str> = REQUEST_LABELS.into_iter().collect();
            ensure!(keys.iter().copied().collect::<BTreeSet<_>>() == want, "{node}: labels {keys:?}");
        }
        histograms_match_counters(samples).with_context(|| format!("on {node}"))?;
        // GETs have no body: all 37 in the first request-size bucket; responses have one.
        let get_ok = request_labels(reporter, web, "web", "http", "200", "");
        let mut first = as_refs(&get_ok);
        first.push(("le", "0.5"));
        ensure!(one(samples, "istio_request_bytes_bucket", &first)? == 37.0, "{node}: request sizes");
        ensure!(
            one(samples, "istio_response_bytes_sum", &as_refs(&get_ok))? > 37.0 * 50.0,
            "{node}: response sizes"
        );
        let d = one(samples, "istio_request_duration_milliseconds_sum", &as_refs(&get_ok))?;
        ensure!(d > 0.0 && d < 37.0 * 5000.0, "{node}: duration sum {d} ms");
    }

    // sluice's own metrics next to Istio's.
    ensure!(one(&m1, "sluice_http_requests_total", &[])? == 57.0, "sluice_http_requests_total on n1");
    ensure!(
        one(&m1, "sluice_enrolled_pods", &[])? == 1.0 && one(&m2, "sluice_enrolled_pods", &[])? == 3.0,
        "enrolled pods"
    );
    ensure!(one(&m1, "sluice_kernel_events_total", &[("event", "redirected")])? >= 4.0, "redirects on n1");
    ensure!(one(&m1, "sluice_upstream_connections", &[("kind", "hbone")])? >= 1.0, "HBONE pool on n1");
    ensure!(one(&m1, "sluice_bpf_map_entries", &[("map", "ENROLLED")])? == 1.0, "ENROLLED entries on n1");
    ensure!(one(&m2, "sluice_bpf_map_entries", &[("map", "ENROLLED")])? == 3.0, "ENROLLED entries on n2");
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs_f64();
    let expiry = one(&m1, "sluice_certificate_expiry_timestamp_seconds", &[("identity", &spiffe("client"))])?;
    ensure!(expiry > now && expiry < now + 2.0 * 86400.0, "client certificate expiry {expiry} (now {now})");
    ensure!(one(&m1, "sluice_access_log_dropped_total", &[])? == 0.0, "access log drops");
    eprintln!(
        "n1: {} samples; n2: {} samples; 57 requests on each reporter: {}",
        m1.len(),
        m2.len(),
        json!({"source": requests(&m1, "source"), "destination": requests(&m2, "destination")})
    );
    Ok(())
}

/// Opaque TCP through a Service with appProtocol tcp: connections opened and closed, and the
/// bytes sent and echoed, on both reporters; no HTTP labels on TCP metrics.
#[test]
fn tcp_metrics_on_both_reporters() -> Result<()> {
    let w = world()?;
    let mut total = 0u64;
    for bytes in [1000u64, 3000] {
        let r = tcp_exchange(&w.client, addr(ECHO_VIP, ECHO_PORT), bytes)?;
        expect_ok(&r)?;
        ensure!(r["received"] == bytes, "{r}");
        total += bytes;
    }
    let closed = |s: &[Sample], reporter: &str| {
        sum(s, "istio_tcp_connections_closed_total", &[("reporter", reporter)])
    };
    let ((_, _, m1), (_, _, m2)) =
        scrape_until(&w, |a, b| closed(a, "source") >= 2.0 && closed(b, "destination") >= 2.0)?;
    let total = total.to_string();
    for (node, samples, reporter, policy) in
        [("n1", &m1, "source", "unknown"), ("n2", &m2, "destination", "mutual_tls")]
    {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "shop"),
            ("source_principal", &spiffe("client")),
            ("source_app", "client"),
            ("source_cluster", "Kubernetes"),
            ("destination_workload", "echo"),
            ("destination_workload_namespace", "shop"),
            ("destination_principal", &spiffe("echo")),
            ("destination_app", "echo"),
            ("destination_version", "v4"),
            ("destination_service", "echo.shop.svc.cluster.local"),
            ("destination_service_name", "echo"),
            ("destination_service_namespace", "shop"),
            ("destination_canonical_service", "echo"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", policy),
        ]
        .map(|(k, v)| (k, v.to_string()));
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for (name, want) in [
            ("istio_tcp_connections_opened_total", "2"),
            ("istio_tcp_connections_closed_total", "2"),
            ("istio_tcp_sent_bytes_total", total.as_str()),
            ("istio_tcp_received_bytes_total", total.as_str()),
        ] {
            let v = one(samples, name, &labels).with_context(|| format!("on {node}"))?;
            ensure!(v.to_string() == want, "{node}: {name} = {v}, expected {want}");
            let all = matching(samples, name, &[]);
            ensure!(all.len() == 1, "{node}: one {name} series expected: {all:#?}");
            let keys: BTreeSet<&str> = all[0].labels.keys().map(String::as_str).collect();
            let want_keys: BTreeSet<&str> = REQUEST_LABELS
                .into_iter()
                .filter(|k| *k != "response_code" && *k != "grpc_response_status")
                .collect();
            ensure!(keys == want_keys, "{node}: {name} labels {keys:?}");
        }
        ensure!(
            matching(samples, "istio_requests_total", &[]).is_empty(),
            "{node}: no request metrics for opaque TCP"
        );
    }
    ensure!(
        one(&m1, "sluice_connections_detected_total", &[("protocol", "opaque")])? == 2.0,
        "opaque connections on n1"
    );
    ensure!(one(&m2, "sluice_hbone_streams_in_total", &[])? >= 2.0, "HBONE streams on n2");
    Ok(())
}

/// Pods made by controllers, across two nodes: a CronJob's pod on n1 (Job
/// `report-28901234`, pod `report-28901234-x7k2p`, app label `reporting`) and a bare client
/// call Service `db`, whose endpoints are a StatefulSet's pods `db-0` and `db-1` on n2 (app label
/// `postgres`). On both reporters the workloads are `report` (the CronJob), `client` (a bare
/// pod's app label) and `db` (the StatefulSet): one series per workload pair, never a pod
/// name in any label. Then the CronJob's and the StatefulSet's pods go: the series from
/// `report` to `db` leaves `/metrics` on both nodes, not before the grace period (3 s here,
/// `--metric-series-grace-s`), while `client` → `db` stays (one of its workloads is alive).
#[test]
fn workloads_are_their_controllers_and_departed_series_expire() -> Result<()> {
    const GRACE_S: u64 = 3;
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    sim.write_namespace("shop", true)?;
    let client = n1.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    let job = n1.add_pod(
        "shop",
        "report-28901234-x7k2p",
        PodOpts::labels(&[("app", "reporting")])
            .owner("Job", "report-28901234")
            .generate_name("report-28901234-"),
    )?;
    let db0 =
        n2.add_pod("shop", "db-0", PodOpts::labels(&[("app", "postgres")]).owner("StatefulSet", "db"))?;
    let db1 =
        n2.add_pod("shop", "db-1", PodOpts::labels(&[("app", "postgres")]).owner("StatefulSet", "db"))?;
    let _servers = [
        start_http_server(&db0, HTTP_TARGET, "db-0", &[])?,
        start_http_server(&db1, HTTP_TARGET, "db-1", &[])?,
    ];
    write_service(&sim, "db", DB_VIP, HTTP_PORT, HTTP_TARGET, "http", &[&db0, &db1])?;
    let opts = || SluiceOpts {
        args: vec!["--metric-series-grace-s".into(), GRACE_S.to_string().into()],
        ..Default::default()
    };
    let s1 = n1.start_sluice(opts())?;
    let s2 = n2.start_sluice(opts())?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    for p in [&client, &job] {
        wait_enrolled(&s1, p)?;
    }
    for p in [&db0, &db1] {
        wait_enrolled(&s2, p)?;
    }
    for s in [&s1, &s2] {
        s.wait_for("/model", |m| m["services"].as_array().is_some_and(|a| !a.is_empty()), T)?;
    }
    let w = World { _sim: sim, n1, n2, client, _servers: Vec::new(), _s1: s1, _s2: s2 };

    let db = addr(DB_VIP, HTTP_PORT);
    let get = |from: &Pod, count: u32| -> Result<Vec<serde_json::Value>> {
        let out = from.run_simpod_timeout(
            [
                "http-get",
                "--to",
                &db.to_string(),
                "--path",
                "/rows",
                "--count",
                &count.to_string(),
                "--keepalive",
            ],
            Duration::from_secs(120),
        )?;
        let lines = out.json_lines()?;
        ensure!(lines.len() == count as usize, "expected {count} results: {}", out.stderr);
        ensure!(lines.iter().all(|l| l["ok"] == true && l["status"] == 200), "{lines:?}");
        Ok(lines)
    };
    let answers = get(&job, 20)?;
    get(&w.client, 10)?;
    // Both StatefulSet pods answered: two pods, one workload.
    let served_by: BTreeSet<&str> = answers.iter().filter_map(|l| l["body"]["name"].as_str()).collect();
    ensure!(served_by.len() == 2, "the job's requests were balanced over db-0 and db-1: {served_by:?}");
    let requests = |s: &[Sample], reporter: &str| sum(s, "istio_requests_total", &[("reporter", reporter)]);
    let ((_, _, m1), (_, _, m2)) =
        scrape_until(&w, |a, b| requests(a, "source") >= 30.0 && requests(b, "destination") >= 30.0)?;
    let pod_names = ["report-28901234-x7k2p", "report-28901234", "db-0", "db-1"];
    for (node, samples, reporter) in [("n1", &m1, "source"), ("n2", &m2, "destination")] {
        let pair = |src: &'static str, dst: &'static str| {
            [("reporter", reporter), ("source_workload", src), ("destination_workload", dst)]
        };
        ensure!(one(samples, "istio_requests_total", &pair("report", "db"))? == 20.0, "{node}: report → db");
        ensure!(one(samples, "istio_requests_total", &pair("client", "db"))? == 10.0, "{node}: client → db");
        let series = matching(samples, "istio_requests_total", &[]);
        ensure!(series.len() == 2, "{node}: one series per workload pair: {series:#?}");
        let report = matching(samples, "istio_requests_total", &pair("report", "db"));
        for (k, v) in [
            ("source_app", "reporting"),
            ("source_canonical_service", "reporting"),
            ("destination_app", "postgres"),
            ("destination_canonical_service", "postgres"),
            ("destination_service_name", "db"),
        ] {
            ensure!(
                report[0].labels.get(k).map(String::as_str) == Some(v),
                "{node}: {k} in {:?}",
                report[0].labels
            );
        }
        for s in samples.iter().filter(|s| s.name.starts_with("istio_")) {
            if let Some((k, v)) = s.labels.iter().find(|(_, v)| pod_names.contains(&v.as_str())) {
                bail!("{node}: {} carries the pod name {k}={v:?}: {:?}", s.name, s.labels);
            }
        }
        ensure!(
            one(samples, "sluice_metric_series_expired_total", &[])? == 0.0,
            "{node}: nothing expired yet"
        );
        ensure!(one(samples, "sluice_metric_series_dropped_total", &[])? == 0.0, "{node}: nothing dropped");
        ensure!(one(samples, "sluice_metric_series_limit", &[])? == 5000.0, "{node}: the default cap");
    }

    // The CronJob's and the StatefulSet's pods go; the client stays.
    let deleted = Instant::now();
    for p in [&job, &db0, &db1] {
        p.delete()?;
    }
    let report_series = |s: &[Sample]| {
        s.iter()
            .filter(|s| {
                s.name.starts_with("istio_") && s.labels.get("source_workload").is_some_and(|w| w == "report")
            })
            .count()
    };
    let deadline = deleted + T + Duration::from_secs(GRACE_S);
    let (m1, m2) = loop {
        let (_, _, a) = scrape(&w.n1)?;
        let (_, _, b) = scrape(&w.n2)?;
        if report_series(&a) == 0 && report_series(&b) == 0 {
            break (a, b);
        }
        ensure!(
            Instant::now() < deadline,
            "the series of departed workloads are still there {:?} after their pods were deleted (grace {GRACE_S} s): n1 {} and n2 {} samples",
            deleted.elapsed(),
            report_series(&a),
            report_series(&b)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let gone_after = deleted.elapsed();
    ensure!(
        gone_after >= Duration::from_secs(GRACE_S),
        "the series left {gone_after:?} after the pods were deleted, before the {GRACE_S} s grace period"
    );
    for (node, samples, reporter) in [("n1", &m1, "source"), ("n2", &m2, "destination")] {
        let client_db =
            [("reporter", reporter), ("source_workload", "client"), ("destination_workload", "db")];
        ensure!(one(samples, "istio_requests_total", &client_db)? == 10.0, "{node}: client → db stays");
        ensure!(
            matching(samples, "istio_requests_total", &[]).len() == 1,
            "{node}: only client → db is left"
        );
        ensure!(
            one(samples, "sluice_metric_series", &[("kind", "requests")])? == 1.0,
            "{node}: series gauge"
        );
        ensure!(one(samples, "sluice_metric_series_expired_total", &[])? >= 1.0, "{node}: expiry counted");
    }
    eprintln!("report → db left /metrics {gone_after:?} after its pods were deleted (grace {GRACE_S} s)");
    Ok(())
}
