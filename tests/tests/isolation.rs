//! No pod can take down its node's mesh (issue #12): sluice never connects to its own listeners,
//! whatever leads there; every resource traffic can grow is bounded and counted.
//!
//! One node, namespace `shop` enrolled (PERMISSIVE), a web pod (HTTP 8080, echo 9000), a mesh
//! client, and an outsider pod in a namespace outside the mesh.

mod common;

use std::{net::SocketAddr, path::Path, path::PathBuf, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use sluice_tests::{manifest, workloads, Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts};

use common::{counter, start_servers, wait_enrolled, T};

const WEB_VIP: &str = "10.96.0.10";
/// Services whose target port is one of sluice's own (a misconfiguration, or an attack).
const LOOP_HTTP_VIP: &str = "10.96.0.20";
const LOOP_TCP_VIP: &str = "10.96.0.21";
const LOOP_HBONE_VIP: &str = "10.96.0.22";
/// A ServiceEntry address whose endpoint is the node's metrics port.
const METRICS_ENTRY_IP: &str = "192.0.2.50";

struct World {
    sim: Sim,
    _node: Node,
    web: Pod,
    client: Pod,
    outsider: Pod,
    _servers: Vec<SimProcess>,
    sluice: Sluice,
}

fn world() -> Result<World> {
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    sim.write_namespace("shop", true)?;
    sim.write_namespace("plain", false)?;
    let web = node.add_pod("shop", "web", PodOpts::labels(&[("app", "web")]))?;
    let servers = start_servers(&web)?;
    let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    let outsider = node.add_pod("plain", "outsider", PodOpts::default())?;
    sim.write_service("shop", "web", WEB_VIP, &[("http", 80, 8080), ("tcp-echo", 9000, 9000)], &[&web])?;
    sim.write_service("shop", "loop-http", LOOP_HTTP_VIP, &[("http", 80, 15006)], &[&web])?;
    sim.write_service("shop", "loop-tcp", LOOP_TCP_VIP, &[("tcp-loop", 9100, 15006)], &[&web])?;
    sim.write_service("shop", "loop-hbone", LOOP_HBONE_VIP, &[("http", 80, 15008)], &[&web])?;
    let entry = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "node-metrics", "namespace": "shop"},
        "spec": {"hosts": ["metrics.loop.test"], "addresses": [METRICS_ENTRY_IP], "resolution": "STATIC",
                 "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 15020}],
                 "endpoints": [{"address": node.bridge_ip().to_string()}]}
    });
    sim.write_file("se-node-metrics.yaml", manifest::to_yaml(&[entry])?)?;
    let sluice = node.start_sluice(SluiceOpts::default())?;
    sluice.wait_ready(T)?;
    wait_enrolled(&sluice, &web)?;
    wait_enrolled(&sluice, &client)?;
    let model = sluice.get_json("/model")?;
    ensure!(
        model["errors"].as_array().is_some_and(|e| e.is_empty()),
        "manifests rejected: {}",
        model["errors"]
    );
    Ok(World { sim, _node: node, web, client, outsider, _servers: servers, sluice })
}

/// (open file descriptors, resident memory in KiB) of a process.
fn usage(pid: u32) -> Result<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok((fds, rss))
}

fn curl(pod: &Pod, url: &str) -> Result<(u16, String, String)> {
    let out = pod.run_timeout(
        ["curl", "-s", "--max-time", "5", "-D", "-", "-o", "/dev/null", "-w", "%{http_code}", url],
        Duration::from_secs(15),
    )?;
    let code = out.stdout.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    let flag = out
        .stdout
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-sluice-error:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    Ok((code, flag, out.stderr))
}

/// A certificate for `identity` signed by the sim's mesh root (`sluice ca issue`).
fn issue(sim: &Sim, identity: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_dir = sim.temp_dir().join("ca");
    let out = sim.temp_dir().join("hbone-client");
    let o = Command::new(sluice_tests::sluice_bin()?)
        .args(["ca", "issue", "--dir"])
        .arg(&ca_dir)
        .args(["--identity", identity, "--out"])
        .arg(&out)
        .output()?;
    ensure!(o.status.success(), "sluice ca issue: {}", String::from_utf8_lossy(&o.stderr));
    Ok((out.with_extension("pem"), out.with_extension("key.pem"), ca_dir.join("ca.pem")))
}

fn hbone(
    from: &Pod,
    to: SocketAddr,
    target: SocketAddr,
    creds: &(PathBuf, PathBuf, PathBuf),
) -> Result<Value> {
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let out = from.run_simpod_timeout(
        [
            "hbone-client",
            "--to",
            &to.to_string(),
            "--target",
            &target.to_string(),
            "--cert",
            &p(&creds.0),
            "--key",
            &p(&creds.1),
            "--ca",
            &p(&creds.2),
            "--send-bytes",
            "10",
            "--timeout-ms",
            "5000",
        ],
        Duration::from_secs(20),
    )?;
    out.json().with_context(|| format!("hbone-client: {}", out.stderr))
}

fn refused(s: &Sluice) -> Result<u64> {
    counter(s, "self_connection_refused")
}

/// 1. The three loops of the report, and every other way to make sluice dial itself, are refused
///    and counted; the refusal is logged once per source (rate-limited); sluice keeps serving.
#[test]
fn connections_to_sluices_own_listeners_are_refused() -> Result<()> {
    let w = world()?;
    let pid = w.sluice.pid();
    let (fds_before, _) = usage(pid)?;
    let mut expected = refused(&w.sluice)?;

    // a) A pod outside the mesh dials the web pod's inbound capture port directly. Before the
    //    fix sluice delivered it to <pod IP>:15006 from inside the pod, i.e. to itself, forever.
    for from in [&w.outsider, &w.client] {
        let url = format!("http://{}:15006/", w.web.ip());
        let (code, _, _) = curl(from, &url)?;
        ensure!(code == 0, "{} → {url} must not be answered (got HTTP {code})", from.name());
        expected += 1;
        w.sluice.wait_for(
            "/status",
            |s| s["counters"]["self_connection_refused"].as_u64() >= Some(expected),
            T,
        )?;
    }

    // b) Through HBONE with a valid mesh certificate: CONNECT <pod IP>:15006 on :15008.
    let creds = issue(&w.sim, "spiffe://cluster.local/ns/shop/sa/default")?;
    let r = hbone(&w.client, w.web.addr(15008), w.web.addr(15006), &creds)?;
    ensure!(r["ok"] == true && r["status"] == 400, "CONNECT to sluice's own port must be refused: {r}");
    let r = hbone(&w.client, w.web.addr(15008), w.web.addr(15008), &creds)?;
    ensure!(r["status"] == 400, "CONNECT to the tunnel port itself must be refused: {r}");
    expected += 2;
    // The same client still gets a real stream to the application.
    let ok = hbone(&w.client, w.web.addr(15008), w.web.addr(9000), &creds)?;
    ensure!(ok["status"] == 200 && ok["received"] == 10, "a real CONNECT still works: {ok}");

    // c) A Service whose targetPort is sluice's: HTTP (L7) gets 502 self-connection; opaque TCP
    //    is reset; the same for the tunnel port.
    for vip in [LOOP_HTTP_VIP, LOOP_HBONE_VIP] {
        let (code, flag, _) = curl(&w.client, &format!("http://{vip}/"))?;
        ensure!(code == 502 && flag == "self-connection", "Service {vip}: HTTP {code} {flag:?}");
        expected += 1;
    }
    // (The reset may come before the client even sends: count either as refused.)
    let out = w.client.run_simpod_timeout(
        ["raw", "--to", &format!("{LOOP_TCP_VIP}:9100"), "--send", "hello\\n", "--read-timeout-ms", "3000"],
        Duration::from_secs(20),
    )?;
    let tcp = out.json()?;
    ensure!(
        tcp["received_len"].as_u64().unwrap_or(0) == 0
            && (tcp["ended"] == "reset" || tcp["error"].as_str().is_some_and(|e| e.contains("reset"))),
        "opaque TCP to a looping Service must be reset: {tcp}"
    );
    expected += 1;

    // d) A ServiceEntry endpoint on the node's metrics port.
    let (code, flag, _) = curl(&w.client, &format!("http://{METRICS_ENTRY_IP}/metrics"))?;
    ensure!(
        code == 502 && flag == "self-connection",
        "ServiceEntry to the node's :15020: HTTP {code} {flag:?}"
    );
    expected += 1;

    w.sluice.wait_for(
        "/status",
        |s| s["counters"]["self_connection_refused"].as_u64() >= Some(expected),
        T,
    )?;
    ensure!(
        refused(&w.sluice)? == expected,
        "every refusal counted once: {} != {expected}",
        refused(&w.sluice)?
    );

    // Logged once per source, whatever the rate: 20 more from the outsider add no line.
    let outsider_lines = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("refused a connection to sluice's own listener")
                    && l.contains(&w.outsider.ip().to_string())
            })
            .count()
    };
    let before = outsider_lines(&w.sluice.log_contents());
    ensure!(before == 1, "one log line for the outsider so far, got {before}");
    for _ in 0..20 {
        let _ = curl(&w.outsider, &format!("http://{}:15006/", w.web.ip()))?;
    }
    expected += 20;
    w.sluice.wait_for(
        "/status",
        |s| s["counters"]["self_connection_refused"].as_u64() >= Some(expected),
        T,
    )?;
    ensure!(outsider_lines(&w.sluice.log_contents()) == 1, "the refusals are rate-limited in the log");

    // Nothing piled up, and the mesh still works.
    let (fds_after, _) = usage(pid)?;
    ensure!(fds_after <= fds_before + 16, "descriptors grew from {fds_before} to {fds_after}");
    let (code, _, err) = curl(&w.client, &format!("http://{WEB_VIP}/"))?;
    ensure!(code == 200, "the web Service must still answer: {code} {err}");
    eprintln!("refused {expected} self-connections; sluice fds {fds_before} → {fds_after}");
    Ok(())
}

/// 1 (cont.). The curl of the report in a loop for 30 s: sluice's descriptors and memory stay
/// where they started, and another pod is served throughout without an error.
#[test]
fn a_self_connection_loop_for_30s_leaves_sluice_flat() -> Result<()> {
    let w = world()?;
    let pid = w.sluice.pid();
    // Warm up the path the quiet pod uses, then take the baseline.
    let warm = workloads::http_load(&w.client, format!("{WEB_VIP}:80").parse()?, &["--count", "200"])?;
    ensure!(warm.errors == 0, "warm-up: {warm:?}");
    let (fds0, rss0) = usage(pid)?;
    let url = format!("http://{}:15006/", w.web.ip());
    let mut attacker = w.outsider.spawn([
        "bash",
        "-c",
        &format!("end=$((SECONDS+30)); n=0; while [ $SECONDS -lt $end ]; do curl -s -m 2 -o /dev/null {url}; n=$((n+1)); done; echo attempts=$n"),
    ])?;
    let quiet = workloads::http_load(
        &w.client,
        format!("{WEB_VIP}:80").parse()?,
        &["--rps", "50", "--duration-ms", "30000", "--connections", "2"],
    )?;
    let out = attacker.wait_output(Duration::from_secs(60))?;
    let attempts: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("attempts="))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("attacker output: {out:?}"))?;
    let (fds1, rss1) = usage(pid)?;
    let refused = refused(&w.sluice)?;
    eprintln!(
        "30 s of curl {url}: {attempts} attempts, {refused} refused; sluice fds {fds0} → {fds1}, RSS {rss0} → {rss1} KiB; quiet pod {} requests, {} errors, statuses {:?}",
        quiet.requests, quiet.errors, quiet.by_status
    );
    ensure!(attempts >= 100, "the attacker loop ran too few times to mean anything: {attempts}");
    ensure!(refused >= attempts, "every attempt refused: {refused} < {attempts}");
    ensure!(
        quiet.errors == 0 && quiet.status(200) == quiet.requests,
        "the quiet pod must be served throughout: {quiet:?}"
    );
    ensure!(fds1 <= fds0 + 16, "descriptors grew from {fds0} to {fds1}");
    ensure!(rss1 <= rss0 + 16 * 1024, "RSS grew from {rss0} to {rss1} KiB");
    Ok(())
}

fn slload() -> Result<String> {
    Ok(sluice_tests::simpod_bin()?.with_file_name("slload").to_string_lossy().into_owned())
}

/// `slload rate` from `pod`: 200 requests/s over 4 keep-alive connections for `ms`.
fn rate(pod: &Pod, to: &str, ms: u64) -> Result<Value> {
    let out = pod.run_timeout(
        [&slload()?, "rate", "--to", to, "--rps", "200", "--connections", "4", "--duration-ms", &ms.to_string(), "--warmup-ms", "500"],
        Duration::from_secs(60),
    )?;
    out.json().with_context(|| format!("slload rate: {}", out.stderr))
}

fn p99(v: &Value) -> f64 {
    v["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN)
}

fn errors(v: &Value) -> u64 {
    v["errors"].as_u64().unwrap_or(u64::MAX) + v["unsent"].as_u64().unwrap_or(0)
}

/// One flood: `attacker` attempts 10 000 connections to `to` while `quiet` keeps sending 200
/// requests/s to its own Service; returns (what the attacker holds, quiet during the storm,
/// quiet while the attacker holds everything it got, sluice's descriptors then).
fn flood(sluice: &Sluice, attacker: &Pod, to: SocketAddr, quiet: &Pod, quiet_vip: &str) -> Result<(Value, Value, Value, usize)> {
    let mut hog = attacker.spawn([
        slload()?.as_str(),
        "flood",
        "--to",
        &to.to_string(),
        "--count",
        "10000",
        "--concurrency",
        "256",
        "--timeout-ms",
        "3000",
    ])?;
    let storm = rate(quiet, quiet_vip, 6000)?;
    let held = hog.wait_for_json(Duration::from_secs(180), |l| l["event"] == "held")?;
    let (fds, _) = usage(sluice.pid())?;
    let during = rate(quiet, quiet_vip, 4000)?;
    hog.close_stdin();
    hog.wait_for_json(Duration::from_secs(30), |l| l["event"] == "released")?;
    // Every admitted connection is given back once the attacker lets go.
    sluice.wait_for("/status", |s| s["counters"]["connections_admitted"].as_u64().is_some_and(|n| n < 50), T)?;
    Ok((held, storm, during, fds))
}

/// 2. One pod holding 10 000 connections, outbound and then inbound, takes no more than its
///    share of the node proxy: sluice admits what the defaults (derived from its RLIMIT_NOFILE)
///    allow that pod, resets the rest and counts them, keeps its descriptors well inside its
///    limit, and another pod's requests see no error and a p99 within 2x of its quiet value.
#[test]
fn one_pod_with_10000_connections_leaves_the_others_served() -> Result<()> {
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    sim.write_namespace("shop", true)?;
    sim.write_namespace("plain", false)?;
    let slload = slload()?;
    let hog = node.add_pod("shop", "hog", PodOpts::labels(&[("app", "hog")]).service_account("hog"))?;
    let quiet = node.add_pod("shop", "quiet", PodOpts::labels(&[("app", "quiet")]).service_account("quiet"))?;
    let backend = node.add_pod("shop", "quiet-be", PodOpts::labels(&[("app", "quiet-be")]))?;
    let victim = node.add_pod("shop", "victim", PodOpts::labels(&[("app", "victim")]))?;
    let sink = node.add_pod("plain", "sink", PodOpts::default())?;
    let outsider = node.add_pod("plain", "outsider", PodOpts::default())?;
    let mut servers = Vec::new();
    for (pod, args) in [
        (&backend, vec![slload.as_str(), "serve", "--port", "8080", "--threads", "1"]),
        (&victim, vec![slload.as_str(), "echo-serve", "--port", "9000"]),
        (&sink, vec![slload.as_str(), "echo-serve", "--port", "9000"]),
    ] {
        let mut p = pod.spawn(args)?;
        p.wait_listening(T)?;
        servers.push(p);
    }
    sim.write_service("shop", "quiet", "10.96.3.10", &[("http", 80, 8080)], &[&backend])?;
    // The rate per pod is about CPU, not descriptors (the noisy-neighbour test covers it): high
    // here so that 10 000 attempts take seconds, not minutes. Every other limit is the default.
    let sluice =
        node.start_sluice(SluiceOpts { args: vec!["--pod-connection-rate".into(), "5000".into()], ..Default::default() })?;
    sluice.wait_ready(T)?;
    for p in [&hog, &quiet, &backend, &victim] {
        wait_enrolled(&sluice, p)?;
    }
    let status = sluice.get_json("/status")?;
    let limits = status["limits"].clone();
    let nofile: usize = std::fs::read_to_string(format!("/proc/{}/limits", sluice.pid()))?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .context("sluice's RLIMIT_NOFILE")?;
    let cap = |k: &str| limits[k].as_u64().unwrap_or(0);
    ensure!(
        cap("pod_max_connections") * 2 < nofile as u64 && cap("max_connections") * 2 < nofile as u64,
        "the defaults must fit in what the process can hold: {limits} with RLIMIT_NOFILE {nofile}"
    );

    let alone = rate(&quiet, "10.96.3.10:80", 4000)?;
    ensure!(errors(&alone) == 0, "the quiet pod alone: {alone}");

    // Outbound: the hog's connections to a server outside the mesh (opaque TCP, 2 descriptors
    // each in sluice).
    let c0 = status["counters"].clone();
    let (out_held, out_storm, out_during, out_fds) = flood(&sluice, &hog, sink.addr(9000), &quiet, "10.96.3.10:80")?;
    let c1 = sluice.get_json("/status")?["counters"].clone();
    // Inbound: plaintext from outside the mesh to one enrolled pod (captured on 15006).
    let (in_held, in_storm, in_during, in_fds) = flood(&sluice, &outsider, victim.addr(9000), &quiet, "10.96.3.10:80")?;
    let c2 = sluice.get_json("/status")?["counters"].clone();
    let delta = |a: &Value, b: &Value, k: &str| b[k].as_u64().unwrap_or(0).saturating_sub(a[k].as_u64().unwrap_or(0));
    eprintln!(
        "limits {limits} (RLIMIT_NOFILE {nofile}); quiet pod alone: p99 {:.0} µs\n\
         outbound: hog held {} of 10000 ({} failed: {}), in {} ms; sluice fds {out_fds}; pod_overflow +{}; quiet during the storm p99 {:.0} µs errors {}, while held p99 {:.0} µs (x{:.2}) errors {}\n\
         inbound: outsider held {} of 10000 ({} failed: {}), in {} ms; sluice fds {in_fds}; refused_destination_pod_limit +{}, refused_peer_limit +{}; quiet during the storm p99 {:.0} µs errors {}, while held p99 {:.0} µs (x{:.2}) errors {}",
        p99(&alone),
        out_held["held"], out_held["failed"], out_held["errors"], out_held["elapsed_ms"],
        delta(&c0, &c1, "pod_overflow"),
        p99(&out_storm), errors(&out_storm), p99(&out_during), p99(&out_during) / p99(&alone), errors(&out_during),
        in_held["held"], in_held["failed"], in_held["errors"], in_held["elapsed_ms"],
        delta(&c1, &c2, "refused_destination_pod_limit"), delta(&c1, &c2, "refused_peer_limit"),
        p99(&in_storm), errors(&in_storm), p99(&in_during), p99(&in_during) / p99(&alone), errors(&in_during),
    );
    let held = |v: &Value| v["held"].as_u64().unwrap_or(0);
    ensure!(
        held(&out_held) <= cap("pod_max_connections") && held(&out_held) >= cap("pod_max_connections") * 9 / 10,
        "the hog holds its share (pod_max_connections {}), no more: {out_held}",
        cap("pod_max_connections")
    );
    ensure!(delta(&c0, &c1, "pod_overflow") > 0, "the refused connections are counted");
    ensure!(
        held(&in_held) <= cap("pod_max_inbound") && held(&in_held) >= cap("pod_max_inbound") * 9 / 10,
        "the victim takes its share of inbound (pod_max_inbound {}), no more: {in_held}",
        cap("pod_max_inbound")
    );
    ensure!(delta(&c1, &c2, "refused_destination_pod_limit") > 0, "the refused inbound connections are counted");
    for fds in [out_fds, in_fds] {
        ensure!(fds + 1024 < nofile, "sluice kept headroom: {fds} descriptors of {nofile}");
    }
    for (what, v) in [("outbound storm", &out_storm), ("outbound hold", &out_during), ("inbound storm", &in_storm), ("inbound hold", &in_during)] {
        ensure!(errors(v) == 0, "the quiet pod saw errors during the {what}: {v}");
    }
    for (what, v) in [("outbound", &out_during), ("inbound", &in_during)] {
        ensure!(
            p99(v) <= 2.0 * p99(&alone),
            "{what}: the quiet pod's p99 went from {:.0} µs to {:.0} µs (> 2x) while the flood held its connections",
            p99(&alone),
            p99(v)
        );
    }
    drop(servers);
    Ok(())
}
