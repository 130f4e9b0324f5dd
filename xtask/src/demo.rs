//! `cargo xtask demo`: a simulated node (real network namespaces, veths, cgroups and
//! processes) with a client and three web backends behind a Service in an enrolled namespace,
//! plus a pod in a namespace that is not enrolled. sluice runs for the node; real curl sends
//! traffic; then the CLI shows what sluice saw.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_tests::{Pod, PodOpts, Sim, SimProcess, SluiceOpts};

const T: Duration = Duration::from_secs(15);
const CLUSTER_IP: &str = "10.96.0.10";

pub fn run(keep: bool) -> Result<()> {
    let sim = Sim::new()?;
    let node = sim.add_node("node-1")?;
    step(&format!("simulated node {} (network namespace {})", node.name(), node.netns()));

    sim.write_namespace("shop", true)?;
    sim.write_namespace("legacy", false)?;
    let mut servers: Vec<SimProcess> = Vec::new();
    let mut backends: Vec<Pod> = Vec::new();
    for i in 0..3 {
        let pod = node.add_pod("shop", &format!("web-{i}"), PodOpts::labels(&[("app", "web")]))?;
        let mut http = pod.simpod(["http-server", "--port", "8080", "--name", pod.name()])?;
        http.wait_listening(T)?;
        servers.push(http);
        backends.push(pod);
    }
    let refs: Vec<&Pod> = backends.iter().collect();
    sim.write_service("shop", "web", CLUSTER_IP, &[("http", 80, 8080)], &refs)?;
    let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    let outsider = node.add_pod("legacy", "outsider", PodOpts::default())?;
    for p in backends.iter().chain([&client, &outsider]) {
        println!("  pod {:<16} {:<12} netns {}", format!("{}/{}", p.namespace(), p.name()), p.ip(), p.netns());
    }
    println!("  service shop/web  {CLUSTER_IP}:80 -> web-0..2:8080   (namespace shop is enrolled, legacy is not)");

    step("starting sluice for the node");
    let sluice = node.start_sluice(SluiceOpts::default())?;
    sluice.wait_ready(T)?;
    sluice.wait_for("/pods", |v| v.as_array().is_some_and(|p| p.len() == 4), T)?;

    step(&format!("shop/client: curl http://{CLUSTER_IP}/ six times (each a new connection)"));
    for _ in 0..6 {
        let out = client.run_timeout(["curl", "-sS", "--max-time", "5", &format!("http://{CLUSTER_IP}/")], T)?;
        if !out.success() {
            bail!("curl failed: {}", out.stderr.trim());
        }
        let body: serde_json::Value = serde_json::from_str(out.stdout.trim()).context("backend answer")?;
        println!("  answered by {:<6} which saw the client as {}", body["name"].as_str().unwrap_or("?"), body["peer"].as_str().unwrap_or("?"));
    }

    step("legacy/outsider (not enrolled): curl web-0's pod IP directly");
    let out = outsider.run_timeout(["curl", "-sS", "--max-time", "5", &format!("http://{}:8080/", backends[0].ip())], T)?;
    println!("  {}", out.stdout.trim());

    // A connection held open so that `sluice conns` has something to show.
    let mut held = client.spawn(["curl", "-sS", "--max-time", "60", "-o", "/dev/null", &format!("http://{CLUSTER_IP}/?delay_ms=30000")])?;
    sluice.wait_for("/conns", |v| v.as_array().is_some_and(|c| !c.is_empty()), T)?;

    for cmd in [["status"], ["pods"], ["conns"]] {
        step(&format!("sluice {}", cmd[0]));
        let out = sluice.cli(&cmd)?;
        print!("{}", indent(&out.stdout));
        if !out.success() {
            bail!("sluice {} failed: {}", cmd[0], out.stderr);
        }
    }
    let _ = held.kill(sluice_tests::Signal::SIGKILL);

    if keep {
        step("left running (--keep). Try:");
        println!("  ip netns exec {} {} status          # the CLI, from the node's network namespace", node.netns(), sluice_tests::sluice_bin()?.display());
        println!("  {} conns --admin {}", sluice_tests::sluice_bin()?.display(), sluice.admin_socket().display());
        println!("  ip netns exec {} curl -s http://{CLUSTER_IP}/", client.netns());
        println!("  sluice's log: {}", sluice.log_path().display());
        println!("  clean up with: cargo xtask sweep");
        // Handles dropped after keep() leave their processes running.
        sim.keep();
    } else {
        step("tearing down (use --keep to explore)");
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n== {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
