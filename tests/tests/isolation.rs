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
    node: Node,
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
    Ok(World { sim, node, web, client, outsider, _servers: servers, sluice })
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
