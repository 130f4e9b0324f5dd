//! Same-node traffic without TLS to itself (issue 15, point 2): when source and destination pods
//! are on the same node, one sluice holds both ends and hands the connection over in-process
//! (identity from the capture, peer authentication counted as mutual TLS, authorization at L4
//! and per request) instead of opening an mTLS tunnel to its own tunnel port. What must hold:
//! no tunnel stream is opened (counters, `sluice conns` says `same-node`), a policy denying the
//! source's principal still denies (L4 and L7), plaintext from outside the mesh is still
//! refused under STRICT, `--same-node tunnel` restores the tunnel, and traffic across nodes
//! still tunnels.

mod common;

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::{json, Value};
use sluice_tests::{poll_until, Pod, PodOpts, Sim, Sluice, SluiceOpts};

/// sluice with the hand-off on (`--same-node in-process`; the default is still `tunnel`).
fn in_process() -> SluiceOpts {
    SluiceOpts { args: vec!["--same-node".into(), "in-process".into()], ..SluiceOpts::default() }
}

/// How long a manifest edit may take to show.
const APPLY: Duration = Duration::from_secs(10);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/default";
const INTRUDER_SA: &str = "intruder-sa";

/// Polls `what` until `pred` holds for its result, for [`APPLY`].
fn until(what: &str, mut f: impl FnMut() -> Result<Value>, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    poll_until(APPLY, || {
        last = f().unwrap_or_else(|e| json!({"harness_error": e.to_string()}));
        pred(&last).then(|| last.clone())
    })
    .with_context(|| format!("{what}: never happened; last result {last}"))
}

fn http_get(pod: &Pod, to: SocketAddr, path: &str) -> Result<Value> {
    let out = pod.run_simpod(["http-get", "--to", &to.to_string(), "--path", path])?;
    out.json().with_context(|| format!("http-get output: {}", out.stderr))
}

fn status(v: &Value) -> u64 {
    v["status"].as_u64().unwrap_or(0)
}

fn refused(r: &Value) -> bool {
    r["ok"] == false || r["received"] == 0
}

fn write_strict(sim: &Sim) -> Result<()> {
    sim.write_file(
        "pa-mesh.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls: {mode: STRICT}\n",
    )?;
    Ok(())
}

/// A pod in a namespace outside the mesh, known to the model (plaintext clients are named
/// from it).
fn outsider(w: &World) -> Result<Pod> {
    w.sim.write_namespace("legacy", false)?;
    let known = w.sluice.get_json("/status")?["model_pods"].as_u64().unwrap_or(0);
    let pod = w.node.add_pod("legacy", "outsider", PodOpts::default())?;
    w.sluice.wait_for("/status", |s| s["model_pods"].as_u64().unwrap_or(0) > known, T)?;
    Ok(pod)
}

/// Holds one echo connection open from `pod` to the echo Service and returns what `/conns`
/// says about it (both directions) while it is open.
fn held_conns(sluice: &Sluice, pod: &Pod) -> Result<Vec<Value>> {
    let mut hold = pod.simpod(["hold", "--to", &echo_vip().to_string()])?;
    hold.wait_for_json(T, |v| v["event"] == "connected")?;
    hold.send_line("ping")?;
    hold.wait_for_json(T, |v| v["event"] == "echo")?;
    let conns = sluice.wait_for(
        "/conns",
        |v| {
            v.as_array()
                .is_some_and(|a| a.iter().any(|c| c["direction"] == "inbound" && c["protocol"] == "tcp"))
        },
        T,
    )?;
    hold.close_stdin();
    hold.wait(T)?;
    Ok(conns.as_array().cloned().unwrap_or_default())
}

/// A mesh pod reaches a STRICT pod of its node (opaque TCP and HTTP) without a tunnel: no
/// HBONE stream is accepted, the hand-off counters move, `sluice conns` names the client's
/// SPIFFE ID with `security: same-node` on both sides; a plaintext client outside the mesh is
/// still refused by STRICT.
#[test]
fn same_node_strict_pod_is_reached_without_a_tunnel() -> Result<()> {
    let w = world(1, true, in_process())?;
    let out = outsider(&w)?;
    write_strict(&w.sim)?;
    let echo = w.backends[0].addr(ECHO_PORT);
    until("STRICT refuses plaintext from outside the mesh", || tcp_exchange(&out, echo, 16), refused)?;
    let refused_strict = counter(&w.sluice, "plaintext_refused_strict")?;
    ensure!(refused_strict >= 1, "plaintext_refused_strict {refused_strict}");

    let r = tcp_exchange(&w.client, echo_vip(), 4096)?;
    expect_ok(&r).context("opaque TCP to a STRICT pod of the node")?;
    ensure!(r["sha256_sent"] == r["sha256_received"], "{r}");
    let got = http_get(&w.client, http_vip(), "/same-node")?;
    ensure!(status(&got) == 200 && got["body"]["path"] == "/same-node", "{got}");
    // The application saw the client's own address, as through a tunnel.
    ensure!(
        got["body"]["peer"].as_str().is_some_and(|p| p.starts_with(&format!("{}:", w.client.ip()))),
        "the backend must see the client pod's address: {got}"
    );

    ensure!(counter(&w.sluice, "hbone_streams_in")? == 0, "a tunnel stream was opened to the node itself");
    ensure!(counter(&w.sluice, "same_node_handoffs")? >= 2, "{}", w.sluice.get_json("/status")?["counters"]);
    ensure!(counter(&w.sluice, "same_node_in")? >= 2, "{}", w.sluice.get_json("/status")?["counters"]);

    let conns = held_conns(&w.sluice, &w.client)?;
    let inbound = conns
        .iter()
        .find(|c| c["direction"] == "inbound" && c["protocol"] == "tcp")
        .context("no inbound conn")?;
    ensure!(inbound["security"] == "same-node", "{inbound}");
    ensure!(inbound["peer_identity"] == CLIENT_ID, "{inbound}");
    let outbound = conns
        .iter()
        .find(|c| c["direction"] == "outbound" && c["protocol"] == "tcp")
        .context("no outbound conn")?;
    ensure!(outbound["security"] == "same-node", "{outbound}");
    ensure!(outbound["peer_identity"] == "spiffe://cluster.local/ns/shop/sa/default", "{outbound}");
    // The hand-off counted the bytes on both sides.
    ensure!(inbound["bytes_sent"].as_u64().unwrap_or(0) >= 5, "{inbound}");

    // The plaintext client is still refused after all that.
    ensure!(refused(&tcp_exchange(&out, echo, 16)?), "plaintext after the hand-offs");
    Ok(())
}

/// A DENY for the intruder's principal holds in-process: its TCP is refused at the hand-off
/// (L4) and its HTTP answered 403 per request (L7); an ALLOW-side L7 rule (a path the intruder
/// may not GET) is enforced per request too. The client's principal is unaffected.
#[test]
fn policy_denying_the_source_principal_still_denies_in_process() -> Result<()> {
    let w = world(1, true, in_process())?;
    let intruder = w.node.add_pod(
        "shop",
        "intruder",
        PodOpts::labels(&[("app", "intruder")]).service_account(INTRUDER_SA),
    )?;
    wait_enrolled(&w.sluice, &intruder)?;
    write_strict(&w.sim)?;
    w.sim.write_file(
        "deny-intruder.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-intruder\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/{INTRUDER_SA}\"]\n"
        ),
    )?;
    let denied_before = counter(&w.sluice, "policy_denied")?;
    until("the intruder's TCP is refused (L4)", || tcp_exchange(&intruder, echo_vip(), 16), refused)?;
    ensure!(counter(&w.sluice, "policy_denied")? > denied_before, "policy_denied did not move");
    let r = until(
        "the intruder's HTTP is refused (L7)",
        || http_get(&intruder, http_vip(), "/"),
        |r| status(r) == 403,
    )?;
    ensure!(r["body"] == "RBAC: access denied", "{r}");
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 64)?).context("the client's TCP")?;
    ensure!(status(&http_get(&w.client, http_vip(), "/")?) == 200, "the client's HTTP");

    // L7 rule: the client may not GET /admin.
    w.sim.write_file(
        "deny-admin.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-admin\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {app: web}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/default\"]\n    to:\n    - operation:\n        paths: [\"/admin\"]\n",
    )?;
    until(
        "the client's GET /admin is refused (L7)",
        || http_get(&w.client, http_vip(), "/admin"),
        |r| status(r) == 403,
    )?;
    ensure!(status(&http_get(&w.client, http_vip(), "/items")?) == 200, "other paths still pass");
    ensure!(counter(&w.sluice, "http_denied")? >= 2, "{}", w.sluice.get_json("/status")?["counters"]);
    ensure!(counter(&w.sluice, "hbone_streams_in")? == 0, "a tunnel stream was opened to the node itself");
    ensure!(counter(&w.sluice, "same_node_handoffs")? >= 1, "no hand-off");
    Ok(())
}

/// `--same-node tunnel` (the default for now): a tunnel to the node's own port, as before.
#[test]
fn same_node_tunnel_mode_keeps_the_tunnel() -> Result<()> {
    let opts = SluiceOpts { args: vec!["--same-node".into(), "tunnel".into()], ..SluiceOpts::default() };
    let w = world(1, true, opts)?;
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 64)?)?;
    ensure!(status(&http_get(&w.client, http_vip(), "/")?) == 200, "HTTP through the tunnel");
    ensure!(counter(&w.sluice, "hbone_streams_in")? >= 2, "{}", w.sluice.get_json("/status")?["counters"]);
    ensure!(counter(&w.sluice, "same_node_handoffs")? == 0, "handed off despite --same-node tunnel");
    let conns = held_conns(&w.sluice, &w.client)?;
    let inbound = conns
        .iter()
        .find(|c| c["direction"] == "inbound" && c["protocol"] == "tcp")
        .context("no inbound conn")?;
    ensure!(inbound["security"] == "mtls", "{inbound}");
    Ok(())
}

/// Across nodes nothing changes: the client on n1 reaches the backend on n2 through the tunnel
/// (n2 accepts HBONE streams, reports `mtls`), and n1 hands nothing over in-process.
#[test]
fn cross_node_traffic_still_tunnels() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    sim.write_namespace("shop", true)?;
    let backend = n2.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]))?;
    let _servers = start_servers(&backend)?;
    sim.write_service(
        "shop",
        "web",
        CLUSTER_IP,
        &[("echo", ECHO_PORT, ECHO_PORT), ("http", HTTP_PORT, HTTP_TARGET_PORT)],
        &[&backend],
    )?;
    let client = n1.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    let s1 = n1.start_sluice(in_process())?;
    let s2 = n2.start_sluice(in_process())?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &client)?;
    wait_enrolled(&s2, &backend)?;
    write_strict(&sim)?;
    // The model on n1 must know the backend as a mesh pod (it does once it is enrolled on n2).
    expect_ok(&tcp_exchange(&client, echo_vip(), 256)?).context("TCP across nodes")?;
    ensure!(status(&http_get(&client, http_vip(), "/")?) == 200, "HTTP across nodes");
    ensure!(counter(&s2, "hbone_streams_in")? >= 2, "{}", s2.get_json("/status")?["counters"]);
    ensure!(counter(&s1, "same_node_handoffs")? == 0, "n1 handed a cross-node connection over in-process");
    ensure!(counter(&s2, "same_node_in")? == 0, "n2 took a connection in-process");
    let conns = held_conns(&s2, &client)?;
    let inbound = conns
        .iter()
        .find(|c| c["direction"] == "inbound" && c["protocol"] == "tcp")
        .context("no inbound conn")?;
    ensure!(inbound["security"] == "mtls" && inbound["peer_identity"] == CLIENT_ID, "{inbound}");
    Ok(())
}
