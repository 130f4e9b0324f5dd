//! `cargo xtask demo`: two simulated nodes (real network namespaces, veths, cgroups and
//! processes) with a client and three web backends behind a Service in an enrolled namespace,
//! spread over both nodes, plus a pod in a namespace that is not enrolled. sluice runs on each
//! node; real curl sends traffic (mutual TLS between the pods' identities, same node and
//! across), then an HTTPRoute splits one keep-alive connection's requests per request; then
//! the CLI shows what each sluice saw.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_tests::{Pod, PodOpts, Sim, SimProcess, SluiceOpts};

const T: Duration = Duration::from_secs(15);
const CLUSTER_IP: &str = "10.96.0.10";

pub fn run(keep: bool) -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("node-1")?;
    let n2 = sim.add_node("node-2")?;
    step(&format!("two simulated nodes: {} and {} (one mesh root CA)", n1.name(), n2.name()));

    sim.write_namespace("shop", true)?;
    sim.write_namespace("legacy", false)?;
    let mut servers: Vec<SimProcess> = Vec::new();
    let mut backends: Vec<Pod> = Vec::new();
    for (i, node) in [&n1, &n2, &n2].iter().enumerate() {
        let pod = node.add_pod("shop", &format!("web-{i}"), PodOpts::labels(&[("app", "web")]).service_account("web"))?;
        let mut http = pod.simpod(["http-server", "--port", "8080", "--name", pod.name()])?;
        http.wait_listening(T)?;
        servers.push(http);
        backends.push(pod);
    }
    let refs: Vec<&Pod> = backends.iter().collect();
    sim.write_service("shop", "web", CLUSTER_IP, &[("http", 80, 8080)], &refs)?;
    let client = n1.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]).service_account("client"))?;
    let outsider = n1.add_pod("legacy", "outsider", PodOpts::default())?;
    for p in backends.iter().chain([&client, &outsider]) {
        println!(
            "  pod {:<16} {:<12} on {:<6} netns {}",
            format!("{}/{}", p.namespace(), p.name()),
            p.ip(),
            p.node().short_name(),
            p.netns()
        );
    }
    println!("  service shop/web  {CLUSTER_IP}:80 -> web-0 (node-1), web-1, web-2 (node-2) :8080");
    println!("  namespace shop is enrolled (PERMISSIVE), legacy is not");

    step("starting sluice on both nodes");
    let s1 = n1.start_sluice(SluiceOpts::default())?;
    let s2 = n2.start_sluice(SluiceOpts::default())?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    s1.wait_for("/pods", |v| v.as_array().is_some_and(|p| p.len() == 2), T)?;
    s2.wait_for("/pods", |v| v.as_array().is_some_and(|p| p.len() == 2), T)?;

    step(&format!("shop/client: curl http://{CLUSTER_IP}/ six times (mTLS tunnels, same node and across)"));
    for _ in 0..6 {
        let out = client.run_timeout(["curl", "-sS", "--max-time", "5", &format!("http://{CLUSTER_IP}/")], T)?;
        if !out.success() {
            bail!("curl failed: {}", out.stderr.trim());
        }
        let body: serde_json::Value = serde_json::from_str(out.stdout.trim()).context("backend answer")?;
        println!(
            "  answered by {:<6} which saw the client as {}",
            body["name"].as_str().unwrap_or("?"),
            body["peer"].as_str().unwrap_or("?")
        );
    }

    step("L7: an HTTPRoute on shop/web (header x-canary: yes → web-2; everything else 80/20 stable/canary)");
    sim.write_service("shop", "web-stable", "10.96.0.11", &[("http", 80, 8080)], &[&backends[0], &backends[1]])?;
    sim.write_service("shop", "web-canary", "10.96.0.12", &[("http", 80, 8080)], &[&backends[2]])?;
    let generation = s1.get_json("/model")?["generation"].as_u64().unwrap_or(0);
    sim.write_file("route-web.yaml", CANARY_ROUTE)?;
    s1.wait_for("/model", |m| m["generation"].as_u64().unwrap_or(0) > generation && m["routes"].as_array().is_some_and(|r| !r.is_empty()), T)?;
    for (what, header) in [("100 requests on one keep-alive connection", None), ("20 requests with x-canary: yes", Some("x-canary: yes"))] {
        let count = if header.is_some() { "20" } else { "100" };
        let mut args = vec!["http-get", "--to", "10.96.0.10:80", "--count", count, "--keepalive"];
        if let Some(h) = header {
            args.extend(["--header", h]);
        }
        let out = client.run_simpod_timeout(&args, T)?;
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for line in out.json_lines()? {
            *by.entry(line["body"]["name"].as_str().unwrap_or("error").to_string()).or_default() += 1;
        }
        println!("  {what}: {by:?}");
    }
    step("node-1: sluice routes shop/web");
    let out = s1.cli(&["routes", "shop/web"])?;
    print!("{}", indent(&out.stdout));

    step("legacy/outsider (not in the mesh): plaintext curl to web-0's pod IP, captured and allowed (PERMISSIVE)");
    let out = outsider.run_timeout(["curl", "-sS", "--max-time", "5", &format!("http://{}:8080/", backends[0].ip())], T)?;
    println!("  {}", out.stdout.trim());

    // Connections held open so that `sluice conns` has something to show on both sides.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(client.spawn(["curl", "-sS", "--max-time", "60", "-o", "/dev/null", &format!("http://{CLUSTER_IP}/?delay_ms=30000")])?);
    }
    held.push(outsider.spawn(["curl", "-sS", "--max-time", "60", "-o", "/dev/null", &format!("http://{}:8080/?delay_ms=30000", backends[0].ip())])?);
    s2.wait_for("/conns", |v| v.as_array().is_some_and(|c| c.len() >= 2), T)?;
    s1.wait_for("/conns", |v| v.as_array().is_some_and(|c| c.len() >= 4), T)?;

    for (title, sluice, cmd) in [
        ("node-1: sluice status", &s1, &["status"][..]),
        ("node-1: sluice pods", &s1, &["pods"]),
        ("node-1: sluice certs", &s1, &["certs"]),
        ("node-2: sluice certs", &s2, &["certs"]),
        ("node-1: sluice conns", &s1, &["conns"]),
        ("node-2: sluice conns", &s2, &["conns"]),
        ("node-1: sluice stat services (what the client pod sent, last minute)", &s1, &["stat", "services"]),
        ("node-2: sluice stat pods (what its pods received)", &s2, &["stat", "pods"]),
    ] {
        step(title);
        let out = sluice.cli(cmd)?;
        print!("{}", indent(&out.stdout));
        if !out.success() {
            bail!("sluice {} failed: {}", cmd.join(" "), out.stderr);
        }
    }
    step("node-1: istio_requests_total from :15020/metrics (reporter=source)");
    let metrics = n1.run(["curl", "-s", "http://127.0.0.1:15020/metrics"])?;
    for line in metrics.stdout.lines().filter(|l| l.starts_with("istio_requests_total{")).take(4) {
        println!("  {line}");
    }
    for mut h in held {
        let _ = h.kill(sluice_tests::Signal::SIGKILL);
    }

    if keep {
        step("left running (--keep). Try:");
        let bin = sluice_tests::sluice_bin()?;
        println!("  ip netns exec {} {} conns          # the CLI, from node-1's network namespace", n1.netns(), bin.display());
        println!("  {} certs --admin {}", bin.display(), s2.admin_socket().display());
        println!("  ip netns exec {} curl -s http://{CLUSTER_IP}/", client.netns());
        println!("  logs: {} and {}", s1.log_path().display(), s2.log_path().display());
        // Handles dropped after keep() leave their processes running; as a playground, no
        // sweep (nor another engineer's test run) removes it, `cargo xtask sim down` does.
        let name = sim.keep("demo")?;
        println!("  clean up with: cargo xtask sim down {name}");
    } else {
        step("tearing down (use --keep to explore)");
    }
    Ok(())
}

/// The demo's canary route (Gateway API for meshes: the parentRef is the Service).
const CANARY_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web-canary
  namespace: shop
spec:
  parentRefs:
  - {group: "", kind: Service, name: web, port: 80}
  rules:
  - matches:
    - headers: [{name: x-canary, value: "yes"}]
    backendRefs: [{name: web-canary, port: 80}]
  - backendRefs:
    - {name: web-stable, port: 80, weight: 80}
    - {name: web-canary, port: 80, weight: 20}
"#;

fn step(what: &str) {
    println!("\n== {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
