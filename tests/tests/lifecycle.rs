//! Lifecycle (issue 7): SIGTERM drains, an upgrade (a new sluice process replacing the old one
//! on a node) loses nothing under load, and uninstalling leaves nothing behind.

mod common;

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::Value;
use sluice_tests::{Node, Pod, PodOpts, Signal, Sim, SimProcess, Sluice, SluiceOpts};

const VIP: &str = "10.96.0.40";

struct TwoNodes {
    sim: Sim,
    n1: Node,
    n2: Node,
    client: Pod,
    backend: Pod,
    _servers: Vec<SimProcess>,
    s1: Sluice,
    s2: Sluice,
}

/// Client on n1, backend on n2 (slload's keep-alive server on 8080 and simpod's HTTP server
/// on 8081, which can answer slowly), Service shop/web, sluice on both nodes.
fn two_nodes(opts: SluiceOpts) -> Result<TwoNodes> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    sim.write_namespace("shop", true)?;
    let backend = n2.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]))?;
    let slload = sluice_tests::bins::profile_dir()?.join("slload");
    let mut fast = backend.spawn([slload.to_str().unwrap(), "serve", "--port", "8080"])?;
    fast.wait_listening(T)?;
    let mut slow = backend.simpod(["http-server", "--port", "8081", "--name", "web-0"])?;
    slow.wait_listening(T)?;
    sim.write_service("shop", "web", VIP, &[("http", 80, 8080), ("slow", 81, 8081)], &[&backend])?;
    let client = n1.add_pod("shop", "client", PodOpts::default())?;
    let s1 = n1.start_sluice(opts.clone())?;
    let s2 = n2.start_sluice(opts)?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &client)?;
    wait_enrolled(&s2, &backend)?;
    Ok(TwoNodes { sim, n1, n2, client, backend, _servers: vec![fast, slow], s1, s2 })
}

fn vip(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().unwrap()
}

/// Replaces the sluice of `node`: start the new process next to `old`, wait until it is ready,
/// then SIGTERM the old one (it drains in the background; the returned thread ends when it has
/// exited).
fn replace(node: &Node, old: Sluice) -> Result<(Sluice, std::thread::JoinHandle<Result<()>>)> {
    let new = node.start_sluice(SluiceOpts::default())?;
    new.wait_ready(T)?;
    let drained = std::thread::spawn(move || -> Result<()> {
        old.kill(Signal::SIGTERM)?;
        let status = old.wait_exit(Duration::from_secs(60))?;
        ensure!(status.success(), "the old sluice exited with {status}; log:\n{}", old.log_contents());
        Ok(())
    });
    Ok((new, drained))
}

/// 4: ~1000 requests/s over keep-alive connections plus a stream of new connections, across
/// two nodes, while the sluice of each node in turn is replaced by a new process: zero failed
/// requests.
#[test]
fn upgrade_under_load_fails_no_request() -> Result<()> {
    let w = two_nodes(SluiceOpts::default())?;
    let slload = sluice_tests::bins::profile_dir()?.join("slload");
    let slload = slload.to_str().unwrap();
    let to = vip(80).to_string();
    let mut rate = w.client.spawn([slload, "rate", "--to", &to, "--rps", "1000", "--connections", "4", "--duration-ms", "9000", "--warmup-ms", "0"])?;
    let mut churn = w.client.spawn([slload, "churn", "--to", &to, "--connections", "2", "--duration-ms", "9000", "--warmup-ms", "0"])?;

    // Once traffic flows through both proxies, replace node 1's sluice, then node 2's. (HTTP
    // is proxied per request over pooled upstream connections, so node 2 sees few tunnel
    // streams: count requests on node 1.)
    w.s1.wait_for("/status", |s| s["counters"]["http_requests"].as_u64().unwrap_or(0) > 500, T)?;
    w.s2.wait_for("/status", |s| s["counters"]["hbone_streams_in"].as_u64().unwrap_or(0) > 0, T)?;
    let started = Instant::now();
    let (_s1_new, drained1) = replace(&w.n1, w.s1)?;
    // Let the new node-1 process carry traffic before the node-2 switch.
    _s1_new.wait_for("/status", |s| s["counters"]["http_requests"].as_u64().unwrap_or(0) > 200, T)?;
    let (_s2_new, drained2) = replace(&w.n2, w.s2)?;
    eprintln!("both nodes replaced within {:?}", started.elapsed());

    rate.wait(Duration::from_secs(60))?;
    churn.wait(Duration::from_secs(60))?;
    let rate_out = rate.json_lines().pop().context("rate summary")?;
    let churn_out = churn.json_lines().pop().context("churn summary")?;
    eprintln!("keep-alive load: {rate_out}");
    eprintln!("new connections: {churn_out}");
    drained1.join().expect("drain thread")?;
    drained2.join().expect("drain thread")?;
    for (what, out) in [("keep-alive", &rate_out), ("churn", &churn_out)] {
        ensure!(out["errors"] == 0, "{what}: requests failed during the upgrade: {out}");
        ensure!(out["ok"] == true, "{what}: {out}");
    }
    let completed = rate_out["completed"].as_u64().or(rate_out["count"].as_u64()).unwrap_or(0);
    ensure!(completed > 5000, "too few requests to mean anything: {rate_out}");
    // The new processes really carried the traffic: node 1's the client connections and their
    // requests, node 2's the tunnel streams opened after the old one sent GOAWAY.
    let s1 = _s1_new.get_json("/status")?;
    ensure!(s1["connections_total"].as_u64().unwrap_or(0) > 100, "node 1's new sluice carried no connections: {s1}");
    ensure!(s1["counters"]["http_requests"].as_u64().unwrap_or(0) > 1000, "node 1's new sluice carried few requests: {s1}");
    let s2 = _s2_new.get_json("/status")?;
    ensure!(s2["counters"]["hbone_streams_in"].as_u64().unwrap_or(0) > 0, "node 2's new sluice carried nothing: {s2}");
    eprintln!("requests sent during the upgrade: {completed} keep-alive, {} on new connections, 0 failed", churn_out["completed"].as_u64().or(churn_out["count"].as_u64()).unwrap_or(0));
    Ok(())
}

/// 5: SIGTERM with 50 slow requests in flight: all complete; new connections made during the
/// drain are not lost (sluice is marked gone at once, so they pass through: fail-open).
#[test]
fn sigterm_drains_in_flight_requests() -> Result<()> {
    let w = two_nodes(SluiceOpts::default())?;
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(w.client.simpod(["http-get", "--to", &vip(81).to_string(), "--path", "/?delay_ms=3000", "--timeout-ms", "20000"])?);
    }
    w.s1.wait_for("/status", |s| s["connections_open"].as_u64().unwrap_or(0) >= 50, T)?;

    w.s1.kill(Signal::SIGTERM)?;
    // During the drain: new connections to the backend's pod IP (fail-open; there is no
    // kube-proxy in the simulator for a ClusterIP without sluice).
    let mut during = 0;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline && w.s1.is_running() {
        let r = w.client.run_simpod(["http-get", "--to", &w.backend.addr(8081).to_string()])?.json()?;
        expect_ok(&r).context("a new connection during the drain was lost")?;
        during += 1;
    }
    ensure!(during > 0, "no connection attempted during the drain");
    for mut p in slow {
        p.wait(Duration::from_secs(30))?;
        let r = p.json_lines().pop().context("slow request output")?;
        expect_ok(&r).context("an in-flight request did not complete during the drain")?;
        assert_eq!(r["status"], 200, "{r}");
    }
    let status = w.s1.wait_exit(Duration::from_secs(30))?;
    assert!(status.success(), "sluice exited with {status}");
    let log = w.s1.log_contents();
    assert!(log.contains("draining") && log.contains("open_connections=50"), "{log}");
    eprintln!("50 in-flight requests completed; {during} new connections during the drain all succeeded");
    Ok(())
}

/// 6: uninstall. A fail-closed sluice is stopped (its pinned programs keep refusing traffic);
/// `sluice cleanup` removes every pin, the programs detach, and traffic flows directly.
#[test]
fn cleanup_after_uninstall_leaves_nothing() -> Result<()> {
    let w = two_nodes(SluiceOpts::fail_closed())?;
    let pins = Command::new("sh").arg("-c").arg(format!("ls -R /sys/fs/bpf/sluice/{}", w.n1.name())).output()?;
    let listing = String::from_utf8_lossy(&pins.stdout).to_string();
    ensure!(listing.contains("links") && listing.contains("maps-v"), "expected pinned links and maps:\n{listing}");

    w.s1.stop(Duration::from_secs(30))?;
    let refused = tcp_exchange(&w.client, w.backend.addr(8080), 10)?;
    ensure!(refused["ok"] == false, "fail-closed: with sluice stopped the connection must be refused: {refused}");

    let bin = sluice_tests::sluice_bin()?;
    let out = Command::new(&bin).args(["cleanup", "--node", w.n1.name()]).output()?;
    ensure!(out.status.success(), "sluice cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    ensure!(!std::path::Path::new(&format!("/sys/fs/bpf/sluice/{}", w.n1.name())).exists(), "pins left behind");

    // Nothing is attached any more: an enrolled pod's connection goes straight to the backend.
    let r = tcp_exchange(&w.client, w.backend.addr(8080), 10)?;
    let _ = (&w.sim, &w.n2, &w.s2);
    ensure!(r["local"].as_str().is_some_and(|l| l.starts_with(&format!("{}:", w.client.ip()))), "{r}");
    Ok(())
}

#[allow(dead_code)]
fn _unused(_: Value) {}
