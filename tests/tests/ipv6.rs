//! IPv6 holds the same as IPv4 (issue #12, point 4): inbound capture, STRICT and
//! AuthorizationPolicy apply to a pod's IPv6 addresses, global and link-local; HBONE works over
//! IPv6 between the pods of a dual-stack cluster, through dual-stack Services; link-local
//! destinations are left alone.
//!
//! A dual-stack sim: two nodes, every pod with an IPv4 and an IPv6 address (and the link-local
//! one of its eth0). Namespace `shop` is in the mesh (web on n1, client on n2); `legacy` is not
//! (an outsider on each node).

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sluice_tests::{poll_until, Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts};

use common::{counter, wait_enrolled, T};

const ECHO: u16 = 9000;
const HTTP: u16 = 8080;
const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:10:96::10";

struct World {
    sim: Sim,
    _n1: Node,
    _n2: Node,
    web: Pod,
    client: Pod,
    near: Pod,
    far: Pod,
    echo: SimProcess,
    _http: SimProcess,
    s1: Sluice,
    s2: Sluice,
}

fn world() -> Result<World> {
    let sim = Sim::new_dual_stack()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    sim.write_namespace("shop", true)?;
    sim.write_namespace("legacy", false)?;
    let web = n1.add_pod("shop", "web", PodOpts::labels(&[("app", "web")]))?;
    let client = n2.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    let near = n1.add_pod("legacy", "near", PodOpts::default())?;
    let far = n2.add_pod("legacy", "far", PodOpts::default())?;
    // Both servers take both families ([::] without IPV6_V6ONLY).
    let mut echo = web.simpod(["echo-server", "--port", &ECHO.to_string(), "--bind", "::"])?;
    echo.wait_listening(T)?;
    let mut http =
        web.simpod(["http-server", "--port", &HTTP.to_string(), "--bind", "::", "--name", "web"])?;
    http.wait_listening(T)?;
    sim.write_service_ips(
        "shop",
        "web",
        &[VIP4, VIP6],
        &[("tcp-echo", ECHO, ECHO), ("http", 80, HTTP)],
        &[&web],
    )?;
    let s1 = n1.start_sluice(SluiceOpts::default())?;
    let s2 = n2.start_sluice(SluiceOpts::default())?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &web)?;
    wait_enrolled(&s2, &client)?;
    // Each sluice names source pods from its model: every pod must be in both.
    for s in [&s1, &s2] {
        s.wait_for("/status", |v| v["model_pods"].as_u64() == Some(4), T)?;
    }
    Ok(World { sim, _n1: n1, _n2: n2, web, client, near, far, echo, _http: http, s1, s2 })
}

/// `simpod tcp-client` to an address given as text (so a link-local one can carry `%eth0`).
fn exchange(pod: &Pod, to: &str) -> Result<Value> {
    let out = pod.run_simpod_timeout(
        ["tcp-client", "--to", to, "--send-bytes", "64", "--timeout-ms", "5000"],
        Duration::from_secs(20),
    )?;
    out.json().with_context(|| format!("tcp-client {to}: {}", out.stderr))
}

fn refused(r: &Value) -> bool {
    r["ok"] == false
        && r["error"].as_str().is_some_and(|e| {
            e.starts_with("ConnectionReset") || e.starts_with("UnexpectedEof") || e.starts_with("BrokenPipe")
        })
}

fn write_namespace_mode(sim: &Sim, mode: &str) -> Result<()> {
    sim.write_file(
        "ns-shop.yaml",
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations:\n    sluice.dev/mesh: enabled\n    sluice.dev/peer-authentication: {mode}\n"
        ),
    )?;
    Ok(())
}

/// The address the echo server saw as its peer for its latest connection.
fn last_peer(echo: &SimProcess) -> String {
    echo.json_lines()
        .iter()
        .rev()
        .find(|l| l["event"] == "accepted")
        .and_then(|l| l["peer"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Plaintext to each of web's IPv6 addresses (global, and link-local from the same link) is
/// captured: accepted and seen as plaintext under PERMISSIVE, refused under STRICT exactly as
/// over IPv4, and an AuthorizationPolicy that admits only mesh identities refuses it too.
#[test]
fn strict_and_authorization_hold_over_ipv6_global_and_link_local() -> Result<()> {
    let w = world()?;
    let v4 = w.web.addr(ECHO).to_string();
    let v6 = w.web.addr6(ECHO)?.to_string();
    let ll = format!("[{}%eth0]:{ECHO}", w.web.link_local()?);
    let targets: [(&str, &Pod, &str); 3] =
        [("IPv4", &w.far, &v4), ("IPv6", &w.far, &v6), ("link-local", &w.near, &ll)];

    // PERMISSIVE: accepted through sluice (captured, counted, shown as plaintext).
    for (what, from, to) in targets {
        let before = counter(&w.s1, "plaintext_accepted")?;
        let r = exchange(from, to)?;
        ensure!(
            r["ok"] == true && r["sha256_sent"] == r["sha256_received"],
            "{what} plaintext under PERMISSIVE: {r}"
        );
        ensure!(
            counter(&w.s1, "plaintext_accepted")? == before + 1,
            "{what}: the connection must have gone through sluice's capture"
        );
    }

    // STRICT: every family refused, each refusal counted.
    write_namespace_mode(&w.sim, "STRICT")?;
    for (what, from, to) in targets {
        let before = counter(&w.s1, "plaintext_refused_strict")?;
        let r = poll_until(Duration::from_secs(5), || exchange(from, to).ok().filter(refused))
            .with_context(|| format!("{what} plaintext to {to} was never refused under STRICT"))?;
        ensure!(counter(&w.s1, "plaintext_refused_strict")? > before, "{what}: refusal not counted: {r}");
    }
    // The mesh client still gets through, over IPv6 too (HBONE to web's IPv6 address).
    for to in [&v4, &v6] {
        let r = exchange(&w.client, to)?;
        ensure!(r["ok"] == true, "mesh client to {to} under STRICT: {r}");
    }

    // Back to PERMISSIVE, with a policy that allows only the mesh's own namespace: plaintext
    // has no identity, so it is denied on every address.
    write_namespace_mode(&w.sim, "PERMISSIVE")?;
    // (Wait until PERMISSIVE is in force, so that a refusal below can only be the policy's.)
    poll_until(Duration::from_secs(5), || exchange(&w.far, &v4).ok().filter(|r| r["ok"] == true))
        .context("plaintext never accepted again after going back to PERMISSIVE")?;
    w.sim.write_file(
        "authz-web.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: mesh-only\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {app: web}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [\"shop\"]\n",
    )?;
    for (what, from, to) in targets {
        let before = counter(&w.s1, "policy_denied")?;
        let r = poll_until(Duration::from_secs(5), || exchange(from, to).ok().filter(refused))
            .with_context(|| format!("{what} plaintext to {to} was never denied by the policy"))?;
        ensure!(counter(&w.s1, "policy_denied")? > before, "{what}: denial not counted: {r}");
    }
    for to in [&v4, &v6] {
        let r = exchange(&w.client, to)?;
        ensure!(r["ok"] == true, "the policy allows the mesh client to {to}: {r}");
    }
    let log = w.s1.log_contents();
    ensure!(log.contains("denied by authorization policy"), "no log line for the denials:\n{log}");
    Ok(())
}

/// HBONE over IPv6 between nodes: the client on n2 reaches web on n1 through the dual-stack
/// Service's IPv6 ClusterIP and web's IPv6 address; the tunnel runs to web's IPv6 tunnel port,
/// the application sees the client's own IPv6 address, and the IPv4 ClusterIP keeps IPv4.
#[test]
fn hbone_over_ipv6_between_nodes() -> Result<()> {
    let w = world()?;
    let client6 = w.client.ip6()?.to_string();
    let streams = |s: &Sluice| counter(s, "hbone_streams_in");

    for (to, family_addr) in [
        (format!("[{VIP6}]:{ECHO}"), format!("[{client6}]:")),
        (w.web.addr6(ECHO)?.to_string(), format!("[{client6}]:")),
        // (A [::] server sees an IPv4 client as IPv4-mapped.)
        (format!("{VIP4}:{ECHO}"), format!("[::ffff:{}]:", w.client.ip())),
    ] {
        let before = streams(&w.s1)?;
        let r = exchange(&w.client, &to)?;
        ensure!(r["ok"] == true && r["sha256_sent"] == r["sha256_received"], "client → {to}: {r}");
        ensure!(streams(&w.s1)? > before, "client → {to} must arrive as an HBONE stream on n1");
        let peer = poll_until(T, || Some(last_peer(&w.echo)).filter(|p| p.starts_with(&family_addr)));
        ensure!(
            peer.is_some(),
            "web must see the client's own address ({family_addr}…) for {to}, saw {}",
            last_peer(&w.echo)
        );
    }
    // The tunnel itself is IPv6: n2's sluice dialled web's IPv6 tunnel port.
    let tunnel = format!("addr=[{}]:15008", w.web.ip6()?);
    ensure!(w.s2.log_contents().contains(&tunnel), "no tunnel to {tunnel} in n2's log");
    // And it is mutual TLS with both identities, as over IPv4.
    let conns = w.s1.get_json("/conns")?;
    ensure!(
        conns
            .as_array()
            .is_some_and(|a| a.iter().all(|c| c["security"] == "mtls"
                && c["peer_identity"] == "spiffe://cluster.local/ns/shop/sa/default")),
        "inbound connections on n1: {conns}"
    );

    // HTTP per request over the IPv6 ClusterIP (the L7 path on both sides).
    let out = w.client.run_timeout(
        ["curl", "-sS", "-g", "--max-time", "5", &format!("http://[{VIP6}]/ipv6")],
        Duration::from_secs(20),
    )?;
    ensure!(out.success(), "curl over the IPv6 ClusterIP: {} {}", out.stdout, out.stderr);
    let body: Value = serde_json::from_str(&out.stdout).with_context(|| format!("body: {}", out.stdout))?;
    ensure!(
        body["peer"].as_str().is_some_and(|p| p.starts_with(&format!("[{client6}]:"))),
        "the HTTP server sees the client's IPv6 address: {body}"
    );
    Ok(())
}

/// A mesh pod dialling an IPv6 link-local address: the hook cannot see the scope the address
/// needs, so the connection is left alone (not captured, not broken) and counted.
#[test]
fn link_local_destinations_pass_through() -> Result<()> {
    let w = world()?;
    let mut server = w.near.simpod(["echo-server", "--port", "9100", "--bind", "::"])?;
    server.wait_listening(T)?;
    // web (enrolled, n1) dials the outsider on its own link.
    let to = format!("[{}%eth0]:9100", w.near.link_local()?);
    let status = |s: &Sluice| -> Result<u64> {
        s.get_json("/status")?["counters"]["link_local_passed_through"].as_u64().context("counter missing")
    };
    let before = status(&w.s1)?;
    let r = exchange(&w.web, &to)?;
    ensure!(r["ok"] == true && r["sha256_sent"] == r["sha256_received"], "link-local from a mesh pod: {r}");
    ensure!(
        r["local"].as_str().is_some_and(|l| l.starts_with("[fe80::")),
        "the connection went straight to the link, not through sluice's [::1]:15001: {r}"
    );
    ensure!(status(&w.s1)? == before + 1, "the pass-through is counted");
    drop(server);
    Ok(())
}
