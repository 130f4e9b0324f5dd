//! Shared set-up for the end-to-end suites: a simulated node with a Service of echo + HTTP
//! backends in an enrolled namespace, a client pod, and sluice running.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sluice_tests::{Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts};

pub const T: Duration = Duration::from_secs(15);
pub const CLUSTER_IP: &str = "10.96.0.10";
pub const ECHO_PORT: u16 = 9000;
pub const HTTP_PORT: u16 = 80;
pub const HTTP_TARGET_PORT: u16 = 8080;

pub struct World {
    pub sim: Sim,
    pub node: Node,
    pub client: Pod,
    pub backends: Vec<Pod>,
    /// Keeps the backend servers alive for the test's duration.
    pub servers: Vec<SimProcess>,
    pub sluice: Sluice,
}

pub fn echo_vip() -> SocketAddr {
    format!("{CLUSTER_IP}:{ECHO_PORT}").parse().unwrap()
}

pub fn http_vip() -> SocketAddr {
    format!("{CLUSTER_IP}:{HTTP_PORT}").parse().unwrap()
}

/// Starts an echo server (9000) and an HTTP server (8080) in `pod` and waits for both.
pub fn start_servers(pod: &Pod) -> Result<Vec<SimProcess>> {
    let mut echo = pod.simpod(["echo-server", "--port", &ECHO_PORT.to_string()])?;
    echo.wait_listening(T).with_context(|| format!("echo server in {}", pod.name()))?;
    let mut http =
        pod.simpod(["http-server", "--port", &HTTP_TARGET_PORT.to_string(), "--name", pod.name()])?;
    http.wait_listening(T).with_context(|| format!("http server in {}", pod.name()))?;
    Ok(vec![echo, http])
}

/// Namespace "shop" (enrolled unless `enrolled` is false), `n_backends` backends behind
/// Service shop/web (ClusterIP 10.96.0.10, ports echo 9000→9000 and http 80→8080), a client pod
/// in "shop", and sluice running with every pod enrolled (when the namespace is).
pub fn world(n_backends: usize, enrolled: bool, opts: SluiceOpts) -> Result<World> {
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    sim.write_namespace("shop", enrolled)?;
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for i in 0..n_backends {
        let pod = node.add_pod("shop", &format!("web-{i}"), PodOpts::labels(&[("app", "web")]))?;
        servers.extend(start_servers(&pod)?);
        backends.push(pod);
    }
    let refs: Vec<&Pod> = backends.iter().collect();
    sim.write_service(
        "shop",
        "web",
        CLUSTER_IP,
        &[("echo", ECHO_PORT, ECHO_PORT), ("http", HTTP_PORT, HTTP_TARGET_PORT)],
        &refs,
    )?;
    let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    let sluice = node.start_sluice(opts)?;
    sluice.wait_ready(T)?;
    if enrolled {
        wait_enrolled(&sluice, &client)?;
        for b in &backends {
            wait_enrolled(&sluice, b)?;
        }
    }
    Ok(World { sim, node, client, backends, servers, sluice })
}

pub fn enrolled_pods(sluice: &Sluice) -> Result<Vec<String>> {
    let pods = sluice.get_json("/pods")?;
    Ok(pods
        .as_array()
        .context("/pods is not a list")?
        .iter()
        .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")))
        .collect())
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace(), pod.name())
}

pub fn wait_enrolled(sluice: &Sluice, pod: &Pod) -> Result<Value> {
    let key = pod_key(pod);
    sluice
        .wait_for("/pods", |v| has_pod(v, &key), T)
        .with_context(|| format!("waiting for {key} to be enrolled"))
}

pub fn wait_released(sluice: &Sluice, pod: &Pod) -> Result<Value> {
    let key = pod_key(pod);
    sluice
        .wait_for("/pods", |v| !has_pod(v, &key), T)
        .with_context(|| format!("waiting for {key} to be released"))
}

fn has_pod(v: &Value, key: &str) -> bool {
    v.as_array().is_some_and(|pods| {
        pods.iter().any(|p| {
            format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")) == key
        })
    })
}

/// One `simpod tcp-client` run: connect, send `bytes`, half-close, read everything back.
pub fn tcp_exchange(pod: &Pod, to: SocketAddr, bytes: u64) -> Result<Value> {
    let out = pod.run_simpod_timeout(
        ["tcp-client", "--to", &to.to_string(), "--send-bytes", &bytes.to_string(), "--timeout-ms", "60000"],
        Duration::from_secs(120),
    )?;
    out.json().with_context(|| format!("tcp-client output: {}", out.stderr))
}

/// Whether a connection went through sluice, judged from the client side: a redirected socket
/// is connected to the outbound listener on the pod's loopback, so its local address is
/// 127.0.0.1 (getpeername is rewritten to the dialled address; getsockname is not).
pub fn via_sluice(result: &Value) -> bool {
    result["local"].as_str().is_some_and(|l| l.starts_with("127.0.0.1:"))
}

pub fn counter(sluice: &Sluice, name: &str) -> Result<u64> {
    let status = sluice.get_json("/status")?;
    status["counters"][name].as_u64().with_context(|| format!("counter {name} missing in {status}"))
}

pub fn connections_total(sluice: &Sluice) -> Result<u64> {
    sluice.get_json("/status")?["connections_total"].as_u64().context("connections_total missing")
}

pub fn expect_ok(v: &Value) -> Result<()> {
    if v["ok"] != true {
        bail!("expected success, got {v}");
    }
    Ok(())
}

/// `connections_total` of one enrolled pod (by name) as `/pods` reports it.
pub fn pod_total(sluice: &Sluice, name: &str) -> Result<u64> {
    let pods = sluice.get_json("/pods")?;
    pods.as_array()
        .context("/pods is not a list")?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["connections_total"].as_u64())
        .with_context(|| format!("pod {name} not in /pods: {pods}"))
}
