//! No plaintext to a STRICT destination (issue 13, review finding 4). When a mesh pod's tunnel
//! port (15008) refuses, sluice used to send the connection plaintext; for a STRICT
//! destination that wrote the first bytes (or a whole HTTP request) before the destination's
//! capture reset it, and if the destination's node had no sluice running, straight into its
//! application. Now a STRICT destination is refused at the source (a reset; HTTP: 503
//! `x-sluice-error: strict-no-tunnel`), counted as `hbone_fallback_refused_strict`; only a
//! PERMISSIVE destination still gets the plaintext fallback.

mod common;

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::Value;
use sluice_tests::{CaOpts, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts};

fn write_namespace_mode(sim: &Sim, ns: &str, mode: &str) -> Result<()> {
    sim.write_file(
        &format!("ns-{ns}.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  annotations:\n    sluice.dev/mesh: enabled\n    sluice.dev/peer-authentication: {mode}\n"
        ),
    )?;
    Ok(())
}

/// Waits until `s`'s model has `ns`'s peer authentication at `mode`.
fn wait_mode(s: &Sluice, ns: &str, mode: &str) -> Result<()> {
    s.wait_for(
        "/model",
        |v| {
            v["namespaces"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n["name"] == ns && n["peer_auth"] == mode))
        },
        T,
    )
    .with_context(|| format!("{ns} never became {mode} in the model"))?;
    Ok(())
}

/// Waits until `s`'s model holds at least `n` pods (a pod added on another node reaches each
/// node's model through discovery).
fn wait_model_pods(s: &Sluice, n: u64) -> Result<()> {
    s.wait_for("/status", |v| v["model_pods"].as_u64().unwrap_or(0) >= n, T)?;
    Ok(())
}

/// What the destination's application saw: connections its echo server accepted and requests
/// its HTTP server answered.
fn app_saw(servers: &[SimProcess]) -> usize {
    servers
        .iter()
        .flat_map(|s| s.json_lines())
        .filter(|v| v["event"] == "accepted" || v["event"] == "request")
        .count()
}

/// Waits until the application logged a connection or request: its stdout is read by a
/// thread of the test process, so a line the server wrote before answering may not have been
/// read yet when the client has its answer.
fn app_sees(servers: &[SimProcess]) -> Result<()> {
    sluice_tests::poll_until(T, || (app_saw(servers) >= 1).then_some(())).context("no connection logged")
}

/// curl from `pod`: (status, `x-sluice-error` header if any).
fn http_status(pod: &Pod, to: SocketAddr) -> Result<(u16, Option<String>)> {
    let url = format!("http://{to}/");
    let out = pod.run_timeout(["curl", "-sS", "--max-time", "10", "-D", "-", "-o", "/dev/null", &url], T)?;
    ensure!(out.success(), "curl {url}: {} {}", out.stdout, out.stderr);
    let mut lines = out.stdout.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line: {}", out.stdout))?;
    let flag = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-sluice-error"))
        .map(|(_, v)| v.trim().to_string());
    Ok((status, flag))
}

/// The L4 and the HTTP attempt from `client` to `dest`, both refused by `s1`: a reset and a 503
/// naming the reason, each counted once.
fn expect_refused(s1: &Sluice, client: &Pod, dest: &Pod) -> Result<()> {
    let refused_before = counter(s1, "hbone_fallback_refused_strict")?;
    let plaintext_before = counter(s1, "hbone_fallback_plaintext")?;
    let r = tcp_exchange(client, dest.addr(ECHO_PORT), 64)?;
    ensure!(r["ok"] == false, "a STRICT destination without a tunnel port was reached: {r}");
    let err = r["error"].as_str().unwrap_or("");
    ensure!(
        err.starts_with("ConnectionReset")
            || err.starts_with("UnexpectedEof")
            || err.starts_with("BrokenPipe"),
        "expected a reset: {r}"
    );
    ensure!(counter(s1, "hbone_fallback_refused_strict")? == refused_before + 1, "L4 refusal not counted");
    let (status, flag) = http_status(client, dest.addr(HTTP_TARGET_PORT))?;
    ensure!(status == 503 && flag.as_deref() == Some("strict-no-tunnel"), "HTTP: {status} {flag:?}");
    // One request, one refusal: a retry policy may ask again, but nothing is sent plaintext.
    ensure!(counter(s1, "hbone_fallback_refused_strict")? > refused_before + 1, "HTTP refusal not counted");
    ensure!(counter(s1, "hbone_fallback_plaintext")? == plaintext_before, "something went plaintext");
    let log = s1.log_contents();
    ensure!(
        log.contains("requires mutual TLS; refusing instead of sending plaintext"),
        "no log line:\n{log}"
    );
    Ok(())
}

/// The destination's node runs no sluice (stopped): its pod's inbound capture is gone, so
/// plaintext would reach its application. STRICT: refused at the source, the application gets
/// zero bytes; back to PERMISSIVE: the fallback carries the connection (fail-open), counted.
#[test]
fn no_plaintext_to_a_strict_pod_whose_node_has_no_sluice() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    write_namespace_mode(&sim, "shop", "STRICT")?;
    let dest = n2.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]).service_account("web-sa"))?;
    let servers = start_servers(&dest)?;
    let client = n1.add_pod("shop", "client", PodOpts::default().service_account("client-sa"))?;
    let s1 = n1.start_sluice(SluiceOpts::default())?;
    let s2 = n2.start_sluice(SluiceOpts::default())?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &client)?;
    wait_enrolled(&s2, &dest)?;
    wait_mode(&s1, "shop", "STRICT")?;
    // Through the tunnel while n2's sluice runs.
    expect_ok(&tcp_exchange(&client, dest.addr(ECHO_PORT), 64)?)?;
    let seen_with_sluice = app_saw(&servers);
    ensure!(seen_with_sluice == 1, "the echo server saw the tunnelled connection once: {seen_with_sluice}");

    s2.stop(Duration::from_secs(10))?;
    expect_refused(&s1, &client, &dest)?;
    ensure!(
        app_saw(&servers) == seen_with_sluice,
        "the STRICT pod's application received a plaintext connection"
    );

    // PERMISSIVE keeps the fallback: a destination whose node's sluice is down is still served.
    write_namespace_mode(&sim, "shop", "PERMISSIVE")?;
    wait_mode(&s1, "shop", "PERMISSIVE")?;
    let plaintext_before = counter(&s1, "hbone_fallback_plaintext")?;
    let r = tcp_exchange(&client, dest.addr(ECHO_PORT), 64)?;
    expect_ok(&r)?;
    ensure!(counter(&s1, "hbone_fallback_plaintext")? == plaintext_before + 1, "fallback not counted");
    ensure!(
        app_saw(&servers) == seen_with_sluice + 1,
        "the plaintext fallback did not reach the application"
    );
    // The refusals are in node 1's metrics too, as in its status.
    let refused = counter(&s1, "hbone_fallback_refused_strict")?;
    let out = n1.run_timeout(["curl", "-sS", "--max-time", "10", "http://127.0.0.1:15020/metrics"], T)?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("sluice_hbone_fallback_refused_strict"))
        .with_context(|| format!("no refusal metric: {}", out.stdout))?;
    ensure!(line.ends_with(&format!(" {refused}")), "metric {line} vs status {refused}");
    Ok(())
}

/// A STRICT pod whose certificate has not come (the CA is down) has no tunnel port; its node's
/// sluice runs, so its capture would reset plaintext, but only after the first bytes or the
/// whole request were written to it. Now nothing is sent: the source refuses, the destination
/// counts no plaintext refusal, its application sees nothing.
#[test]
fn no_plaintext_to_a_strict_pod_without_a_certificate() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    let cp = sim.add_control_plane()?;
    let ca = cp.start_ca(CaOpts::default())?;
    ca.wait_ready(T)?;
    write_namespace_mode(&sim, "shop", "STRICT")?;
    let client = n1.add_pod("shop", "client", PodOpts::default().service_account("client-sa"))?;
    let s1 = n1.start_sluice(SluiceOpts::remote_ca())?;
    let s2 = n2.start_sluice(SluiceOpts::remote_ca())?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &client)?;
    wait_mode(&s1, "shop", "STRICT")?;
    let known = s1.get_json("/status")?["model_pods"].as_u64().unwrap_or(0);

    ca.stop(Duration::from_secs(10))?;
    let late = n2.add_pod("shop", "late", PodOpts::default().service_account("late-sa"))?;
    let servers = start_servers(&late)?;
    wait_enrolled(&s2, &late)?;
    let id = "spiffe://cluster.local/ns/shop/sa/late-sa";
    let pending = s2.wait_for(
        "/certs",
        |v| v.as_array().is_some_and(|a| a.iter().any(|c| c["identity"] == id && c["state"] == "pending")),
        T,
    )?;
    eprintln!("the destination's identity while the CA is down: {pending}");
    wait_model_pods(&s1, known + 1)?;
    let refused_at_dest = counter(&s2, "plaintext_refused_strict")?;

    expect_refused(&s1, &client, &late)?;
    ensure!(app_saw(&servers) == 0, "the STRICT pod's application received bytes");
    // Nothing reached the destination's capture either: no plaintext was sent.
    ensure!(
        counter(&s2, "plaintext_refused_strict")? == refused_at_dest,
        "plaintext reached the destination's capture"
    );

    // Once the CA is back, the same connection goes through the tunnel.
    ca.restart()?;
    ca.wait_ready(T)?;
    let through = sluice_tests::poll_until(Duration::from_secs(20), || {
        let r: Value = tcp_exchange(&client, late.addr(ECHO_PORT), 64).ok()?;
        (r["ok"] == true).then_some(r)
    })
    .context("never reached the pod through its tunnel after the CA came back")?;
    eprintln!("after the CA came back: {through}");
    app_sees(&servers).context("the application never saw the tunnelled connection")?;
    Ok(())
}

/// Review finding 12: a pod whose tunnel port cannot be opened at its first enrollment (here
/// the pod itself holds 15008 on its address) used to have its whole enrollment undone,
/// capture included, and retried from scratch. Now it is enrolled (capture and policy in
/// force) without a tunnel port, which is retried: a STRICT peer is refused meanwhile, and the
/// tunnel opens once the port is free.
#[test]
fn a_taken_tunnel_port_keeps_the_enrollment_and_is_retried() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    write_namespace_mode(&sim, "shop", "STRICT")?;
    let first = n2.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]).service_account("web-sa"))?;
    let second = n2.add_pod("shop", "web-1", PodOpts::labels(&[("app", "web")]).service_account("web-sa"))?;
    let client = n1.add_pod("shop", "client", PodOpts::default().service_account("client-sa"))?;
    let s1 = n1.start_sluice(SluiceOpts::default())?;
    let s2 = n2.start_sluice(SluiceOpts::default())?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &client)?;
    wait_enrolled(&s2, &first)?;
    wait_enrolled(&s2, &second)?;
    wait_mode(&s1, "shop", "STRICT")?;
    let id = "spiffe://cluster.local/ns/shop/sa/web-sa";
    s2.wait_for(
        "/certs",
        |v| v.as_array().is_some_and(|a| a.iter().any(|c| c["identity"] == id && c["state"] == "ready")),
        T,
    )?;
    // web-1 leaves the node's view, takes 15008 on its own address, and comes back: its
    // identity's certificate is held (web-0's), so its enrollment opens the tunnel port at once.
    sim.remove_file(&second.manifest_file())?;
    wait_released(&s2, &second)?;
    let tunnel_port = second.addr(15008);
    // sluice's own listener there closes after its linger: bind once it has.
    let mut squatter = sluice_tests::poll_until(T, || {
        let mut p = second
            .simpod(["echo-server", "--port", "15008", "--bind", &tunnel_port.ip().to_string()])
            .ok()?;
        p.wait_listening(Duration::from_secs(2)).ok().map(|_| p)
    })
    .context("the tunnel port of the released pod was never free")?;
    let servers = start_servers(&second)?;
    second.write_manifest()?;
    wait_enrolled(&s2, &second).context("the pod was not enrolled while its tunnel port was taken")?;
    let log = s2.log_contents();
    ensure!(log.contains("cannot open the pod's tunnel port; enrolled without it"), "no log line:\n{log}");

    // Meanwhile a peer is refused (the squatter answers on 15008, so the peer's TLS fails: that
    // never falls back either), and nothing goes plaintext.
    let plaintext_before = counter(&s1, "hbone_fallback_plaintext")?;
    let r = tcp_exchange(&client, second.addr(ECHO_PORT), 64)?;
    ensure!(r["ok"] == false, "reached a pod with no tunnel of its own: {r}");
    ensure!(counter(&s1, "hbone_fallback_plaintext")? == plaintext_before, "something went plaintext");
    ensure!(app_saw(&servers) == 0, "the application received bytes without mutual TLS");

    // The port freed, the retry opens the tunnel.
    squatter.kill(nix::sys::signal::Signal::SIGKILL)?;
    squatter.wait(T)?;
    let through = sluice_tests::poll_until(Duration::from_secs(20), || {
        let r: Value = tcp_exchange(&client, second.addr(ECHO_PORT), 64).ok()?;
        (r["ok"] == true).then_some(r)
    })
    .context("the tunnel port never opened after it was freed")?;
    eprintln!("through the tunnel once the port was free: {through}");
    // Under STRICT with no plaintext fallback, a success is the tunnel.
    app_sees(&servers).context("the application never saw the tunnelled connection")?;
    Ok(())
}
