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
    // kube-proxy in the simulator for a ClusterIP without sluice). One made in the instant
    // before sluice logs the drain may still reach it (and is served); every one after goes
    // straight to the backend: the kernel must stop redirecting to a process that is leaving.
    let (mut during, mut direct) = (0, 0);
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline && w.s1.is_running() {
        let drain_logged = w.s1.log_contents().contains("stopping: draining");
        let r = w.client.run_simpod(["http-get", "--to", &w.backend.addr(8081).to_string()])?.json()?;
        expect_ok(&r).context("a new connection during the drain was lost")?;
        if drain_logged {
            ensure!(!via_sluice(&r), "a connection made after sluice logged its drain was still redirected to it: {r}");
            direct += 1;
        }
        during += 1;
    }
    ensure!(direct > 0, "no connection attempted after sluice logged its drain ({during} before)");
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
    eprintln!("50 in-flight requests completed; {during} new connections during the drain all succeeded ({direct} straight to the backend)");
    Ok(())
}

/// The cgroup programs sluice attaches to the node's kubepods cgroup.
const CGROUP_ATTACH_TYPES: [&str; 5] = [
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_inet4_getpeername",
    "cgroup_inet6_getpeername",
    "cgroup_sock_ops",
];

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool (a Debian package, installed by cargo xtask setup)")?;
    ensure!(out.status.success(), "bpftool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stdout)))
}

/// The sluice programs attached to `node`'s kubepods cgroup or any cgroup below it (the pods'),
/// as `bpftool -j cgroup tree <kubepods>` lists them: "attach_type name" per program.
fn sluice_cgroup_programs(node: &Node) -> Result<Vec<String>> {
    let kubepods = node.kubepods_cgroup();
    let tree = bpftool_json(&["cgroup", "tree", kubepods.to_str().context("cgroup path")?])?;
    let mut found = Vec::new();
    for cgroup in tree.as_array().context("bpftool cgroup tree: not a list")? {
        ensure!(cgroup.get("error").is_none(), "bpftool cgroup tree {}: {cgroup}", kubepods.display());
        for p in cgroup["programs"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or("");
            if name.starts_with("sluice") {
                found.push(format!("{} {name}", p["attach_type"].as_str().unwrap_or("?")));
            }
        }
    }
    Ok(found)
}

/// The sk_lookup programs attached in `pod`'s network namespace. sk_lookup attaches only
/// through a netns bpf_link, which `bpftool -j link show` lists with the namespace's inode
/// (`bpftool net show`, run inside the namespace, does not list sk_lookup in bpftool 7.1).
fn sk_lookup_links(pod: &Pod) -> Result<Vec<Value>> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(format!("/run/netns/{}", pod.netns()))
        .with_context(|| format!("network namespace of {}", pod.name()))?
        .ino();
    let links = bpftool_json(&["link", "show"])?;
    Ok(links
        .as_array()
        .context("bpftool link show: not a list")?
        .iter()
        .filter(|l| {
            l["type"] == "netns" && l["attach_type"] == "sk_lookup" && l["netns_ino"].as_u64() == Some(ino)
        })
        .cloned()
        .collect())
}

/// Before a stop: every cgroup program is attached to the node's kubepods cgroup, and the
/// inbound sk_lookup program in the pod's network namespace, so that the checks after it can fail.
fn expect_attached(node: &Node, pod: &Pod) -> Result<()> {
    let programs = sluice_cgroup_programs(node)?;
    for t in CGROUP_ATTACH_TYPES {
        ensure!(
            programs.iter().any(|p| p.starts_with(&format!("{t} "))),
            "{t} is not attached to {}: {programs:?}",
            node.kubepods_cgroup().display()
        );
    }
    let links = sk_lookup_links(pod)?;
    ensure!(
        links.len() == 1,
        "expected sluice's sk_lookup link in {}'s network namespace: {links:?}",
        pod.name()
    );
    eprintln!("attached before the stop: {programs:?}; sk_lookup in {}: {links:?}", pod.name());
    Ok(())
}

/// Waits (the kernel releases a link once its last reference, fd or pin, is gone) until no
/// sluice program is attached to the node's pods' cgroups or in the pod's network namespace.
fn expect_nothing_attached(node: &Node, pod: &Pod) -> Result<()> {
    let mut last = (Vec::new(), Vec::new());
    let clean = sluice_tests::poll_until(T, || {
        last = (sluice_cgroup_programs(node).ok()?, sk_lookup_links(pod).ok()?);
        (last.0.is_empty() && last.1.is_empty()).then_some(())
    });
    ensure!(
        clean.is_some(),
        "still attached: cgroup programs {:?} under {}; sk_lookup links in {}: {:?}",
        last.0,
        node.kubepods_cgroup().display(),
        pod.name(),
        last.1
    );
    Ok(())
}

/// After sluice is gone, an enrolled pod's connection goes straight to the backend: its local
/// address is the pod's own (a redirected one is connected to sluice's listener on loopback).
fn expect_direct(client: &Pod, backend: &Pod) -> Result<()> {
    let r = tcp_exchange(client, backend.addr(8080), 10)?;
    expect_ok(&r)?;
    ensure!(
        r["local"].as_str().is_some_and(|l| l.starts_with(&format!("{}:", client.ip()))),
        "not direct: {r}"
    );
    Ok(())
}

/// 6: uninstall. A fail-closed sluice is stopped (its pinned programs keep refusing traffic);
/// `sluice cleanup` removes every pin, the programs detach from the pods' cgroup (checked with
/// bpftool), nothing stays in the pod's network namespace, and traffic flows directly.
#[test]
fn cleanup_after_uninstall_leaves_nothing() -> Result<()> {
    let w = two_nodes(SluiceOpts::fail_closed())?;
    let pins = Command::new("sh").arg("-c").arg(format!("ls -R /sys/fs/bpf/sluice/{}", w.n1.name())).output()?;
    let listing = String::from_utf8_lossy(&pins.stdout).to_string();
    ensure!(listing.contains("links") && listing.contains("maps-v"), "expected pinned links and maps:\n{listing}");
    expect_attached(&w.n1, &w.client)?;

    w.s1.stop(Duration::from_secs(30))?;
    let refused = tcp_exchange(&w.client, w.backend.addr(8080), 10)?;
    ensure!(refused["ok"] == false, "fail-closed: with sluice stopped the connection must be refused: {refused}");
    // The pinned links keep the cgroup programs attached until the clean-up.
    let pinned = sluice_cgroup_programs(&w.n1)?;
    ensure!(
        pinned.len() == CGROUP_ATTACH_TYPES.len(),
        "fail-closed: the pinned programs must stay attached: {pinned:?}"
    );

    let bin = sluice_tests::sluice_bin()?;
    let out = Command::new(&bin).args(["cleanup", "--node", w.n1.name()]).output()?;
    ensure!(out.status.success(), "sluice cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    ensure!(!std::path::Path::new(&format!("/sys/fs/bpf/sluice/{}", w.n1.name())).exists(), "pins left behind");

    // Nothing is attached any more: an enrolled pod's connection goes straight to the backend.
    expect_nothing_attached(&w.n1, &w.client)?;
    expect_direct(&w.client, &w.backend)?;
    let _ = (&w.sim, &w.n2, &w.s2);
    Ok(())
}

/// 6, fail-open: a sluice stopped with SIGTERM leaves no program attached to the pods' cgroup
/// or in the pod's network namespace (only its maps stay pinned, for the next process, until
/// `sluice cleanup`), and traffic flows directly.
#[test]
fn fail_open_stop_leaves_nothing_attached() -> Result<()> {
    let w = two_nodes(SluiceOpts::default())?;
    expect_attached(&w.n1, &w.client)?;
    let via = tcp_exchange(&w.client, w.backend.addr(8080), 10)?;
    ensure!(via_sluice(&via), "with sluice running the connection goes through it: {via}");

    w.s1.kill(Signal::SIGTERM)?;
    let status = w.s1.wait_exit(Duration::from_secs(30))?;
    ensure!(status.success(), "sluice exited with {status}");
    expect_nothing_attached(&w.n1, &w.client)?;
    expect_direct(&w.client, &w.backend)?;

    let bin = sluice_tests::sluice_bin()?;
    let out = Command::new(&bin).args(["cleanup", "--node", w.n1.name()]).output()?;
    ensure!(out.status.success(), "sluice cleanup failed: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(
        !std::path::Path::new(&format!("/sys/fs/bpf/sluice/{}", w.n1.name())).exists(),
        "pins left behind"
    );
    expect_direct(&w.client, &w.backend)?;
    let _ = (&w.sim, &w.n2, &w.s2);
    Ok(())
}

#[allow(dead_code)]
fn _unused(_: Value) {}

