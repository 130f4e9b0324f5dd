//! Foundation acceptance: real pod traffic through the eBPF redirect into one node proxy, in a
//! simulated node. Every test runs real processes in real network namespaces and cgroups, with
//! sluice's programs attached in the kernel.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context, Result};
use common::*;
use serde_json::Value;
use sluice_tests::{PodOpts, Signal, SluiceOpts};

/// 1. ClusterIP reaches a backend; the backend sees the client pod's IP; `sluice conns` lists
///    the open connection; the client's getpeername returns the ClusterIP.
///    6. The backends are themselves enrolled pods: one connection in, exactly one redirect
///    (sluice's upstream connection is not redirected again: no loop).
#[test]
fn clusterip_through_sluice_to_enrolled_backend() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let redirected_before = counter(&w.sluice, "redirected")?;

    let mut hold = w.client.simpod(["hold", "--to", &echo_vip().to_string()])?;
    let connected = hold.wait_for_json(T, |v| v["event"] == "connected")?;
    assert_eq!(connected["peer"], echo_vip().to_string(), "getpeername must return the ClusterIP: {connected}");
    assert!(via_sluice(&connected), "the connection should have gone to sluice's listener: {connected}");

    // While it is open, sluice lists it (the outbound side; the backend is on this node too,
    // so its inbound side is listed as well).
    let conns = w.sluice.wait_for("/conns", |v| v.as_array().is_some_and(|a| a.iter().any(|c| c["direction"] == "outbound")), T)?;
    let c = conns.as_array().unwrap().iter().find(|c| c["direction"] == "outbound").unwrap();
    assert_eq!(c["source_pod"], "shop/client", "{c}");
    assert_eq!(c["original_dst"], echo_vip().to_string(), "{c}");
    assert_eq!(c["service"], "shop/web", "{c}");
    assert_eq!(c["endpoint"], w.backends[0].addr(ECHO_PORT).to_string(), "{c}");
    assert!(c["source_addr"].as_str().unwrap().starts_with(&format!("{}:", w.client.ip())), "{c}");

    // The CLI shows the same connection to a human.
    let table = w.sluice.cli(&["conns"])?;
    let text = table.stdout.clone();
    assert!(text.contains("shop/client") && text.contains(&echo_vip().to_string()), "sluice conns:\n{text}");

    hold.send_line("hello through sluice")?;
    let echo = hold.wait_for_json(T, |v| v["event"] == "echo")?;
    assert_eq!(echo["data"], "hello through sluice");
    hold.close_stdin();
    hold.wait(T)?;

    // The backend saw the client pod's own IP as the source (socket made in the pod's netns).
    let got = w.client.run_simpod(["http-get", "--to", &http_vip().to_string()])?.json()?;
    expect_ok(&got)?;
    let peer = got["body"]["peer"].as_str().context("backend peer")?;
    assert!(peer.starts_with(&format!("{}:", w.client.ip())), "backend saw {peer}, expected the client pod {}", w.client.ip());

    // Two client connections, two redirects: sluice's own upstream sockets (to an enrolled
    // backend) were never redirected back into it.
    let redirected = counter(&w.sluice, "redirected")? - redirected_before;
    assert_eq!(redirected, 2, "expected exactly the two client connections to be redirected");
    assert_eq!(pod_total(&w.sluice, "client")?, 2, "two outbound connections from the client");
    assert_eq!(pod_total(&w.sluice, "web-0")?, 2, "and the same two arriving at the backend");
    Ok(())
}

/// 2. 300 connections to a Service with three backends: each gets at least 20 %.
#[test]
fn connections_spread_over_three_backends() -> Result<()> {
    let w = world(3, true, SluiceOpts::default())?;
    let out = w
        .client
        .run_simpod_timeout(["http-get", "--to", &http_vip().to_string(), "--count", "300"], Duration::from_secs(120))?;
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for line in out.json_lines()? {
        expect_ok(&line)?;
        *per_backend.entry(line["body"]["name"].as_str().unwrap_or("?").to_string()).or_default() += 1;
    }
    let total: usize = per_backend.values().sum();
    assert_eq!(total, 300, "{per_backend:?}");
    for b in &w.backends {
        let n = per_backend.get(b.name()).copied().unwrap_or(0);
        assert!(n >= 60, "backend {} got {n} of 300 (< 20 %): {per_backend:?}", b.name());
    }
    Ok(())
}

/// 3. A pod in a namespace that is not enrolled reaches a pod IP directly; sluice never sees it.
#[test]
fn non_enrolled_pod_is_never_touched() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    w.sim.write_namespace("plain", false)?;
    let outsider = w.node.add_pod("plain", "outsider", PodOpts::default())?;
    let target = w.node.add_pod("plain", "target", PodOpts::default())?;
    let _servers = start_servers(&target)?;
    let before = (
        counter(&w.sluice, "redirected")?,
        counter(&w.sluice, "fail_open_passthrough")?,
        counter(&w.sluice, "inbound_captured")?,
        connections_total(&w.sluice)?,
    );

    let r = tcp_exchange(&outsider, target.addr(ECHO_PORT), 4096)?;
    expect_ok(&r)?;
    assert_eq!(r["local"].as_str().unwrap().split(':').next(), Some(outsider.ip().to_string().as_str()), "{r}");
    assert_eq!(r["received"], 4096);

    let after = (
        counter(&w.sluice, "redirected")?,
        counter(&w.sluice, "fail_open_passthrough")?,
        counter(&w.sluice, "inbound_captured")?,
        connections_total(&w.sluice)?,
    );
    assert_eq!(before, after, "sluice must not have seen the outsider's connection");
    let pods = enrolled_pods(&w.sluice)?;
    assert!(!pods.iter().any(|p| p.starts_with("plain/")), "{pods:?}");
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// 4. The namespace annotation flipped on and off while a client loops: within 1 s new
///    connections go through / around sluice; no pod process restarts; connections already
///    open keep working across each flip.
#[test]
fn live_enrollment_flip() -> Result<()> {
    let w = world(1, false, SluiceOpts::default())?;
    let backend = w.backends[0].addr(ECHO_PORT);
    let sandbox = w.client.sandbox_pid();

    // A connection opened before enrollment (direct), kept open across the flip.
    let mut direct_hold = w.client.simpod(["hold", "--to", &backend.to_string()])?;
    let c = direct_hold.wait_for_json(T, |v| v["event"] == "connected")?;
    assert!(!via_sluice(&c), "{c}");

    let mut looper = w.client.simpod(["loop", "--to", &backend.to_string(), "--interval-ms", "20", "--count", "100000"])?;
    let loop_pid = looper.pid();
    looper.wait_for_json(T, |v| v["ok"] == true && !via_sluice(v))?;

    // Flip on.
    let on_at = now_ms();
    w.sim.write_namespace("shop", true)?;
    wait_enrolled(&w.sluice, &w.client)?;
    // Wait until the loop has run a full second past the flip, then judge every attempt.
    looper.wait_for_json(T, |v| v["ts_ms"].as_u64().is_some_and(|t| t > on_at + 1300))?;

    let mut via_hold = w.client.simpod(["hold", "--to", &backend.to_string()])?;
    let c = via_hold.wait_for_json(T, |v| v["event"] == "connected")?;
    assert!(via_sluice(&c), "a connection made after enrollment must go through sluice: {c}");
    direct_hold.send_line("still direct")?;
    assert_eq!(direct_hold.wait_for_json(T, |v| v["event"] == "echo")?["data"], "still direct");

    // Flip off.
    let off_at = now_ms();
    w.sim.write_namespace("shop", false)?;
    wait_released(&w.sluice, &w.client)?;
    looper.wait_for_json(T, |v| v["ts_ms"].as_u64().is_some_and(|t| t > off_at + 1300))?;
    via_hold.send_line("still via sluice")?;
    assert_eq!(via_hold.wait_for_json(T, |v| v["event"] == "echo")?["data"], "still via sluice");
    direct_hold.send_line("direct again")?;
    assert_eq!(direct_hold.wait_for_json(T, |v| v["event"] == "echo")?["data"], "direct again");

    // The same looping process ran through both flips: nothing in the pod was restarted.
    assert!(pid_alive(loop_pid) && pid_alive(sandbox), "a pod process was restarted");
    looper.kill(Signal::SIGKILL)?;
    let attempts = looper.json_lines();
    let judge = |from: u64, to: u64, want_via: bool| -> Result<usize> {
        let window: Vec<&Value> = attempts
            .iter()
            .filter(|a| a["ts_ms"].as_u64().is_some_and(|t| t >= from && t < to))
            .collect();
        ensure!(!window.is_empty(), "no attempts between {from} and {to}");
        for a in &window {
            ensure!(a["ok"] == true, "attempt failed during the flip test: {a}");
            ensure!(via_sluice(a) == want_via, "attempt {a} should {}have gone through sluice", if want_via { "" } else { "not " });
        }
        Ok(window.len())
    };
    // Everything from 1 s after each flip is on the new path; nothing failed at any time.
    let n_on = judge(on_at + 1000, off_at, true)?;
    let n_off = judge(off_at + 1000, u64::MAX, false)?;
    ensure!(attempts.iter().all(|a| a["ok"] == true), "some attempts failed: {:?}", attempts.iter().filter(|a| a["ok"] != true).collect::<Vec<_>>());
    // How fast did the flips take effect?
    let first_via = attempts.iter().find(|a| a["ts_ms"].as_u64().unwrap_or(0) >= on_at && via_sluice(a)).context("never redirected")?;
    let first_direct = attempts.iter().find(|a| a["ts_ms"].as_u64().unwrap_or(0) >= off_at && !via_sluice(a)).context("never released")?;
    eprintln!(
        "flip on took effect after {} ms, flip off after {} ms ({n_on} attempts via sluice, {n_off} direct after)",
        first_via["ts_ms"].as_u64().unwrap() - on_at,
        first_direct["ts_ms"].as_u64().unwrap() - off_at
    );
    Ok(())
}

/// 5a. sluice killed with SIGKILL in fail-open mode: connections to pod IPs succeed directly.
///     Restarted: traffic goes through it again, with no manual clean-up.
#[test]
fn fail_open_after_sigkill_and_restart() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let backend = w.backends[0].addr(ECHO_PORT);
    let r = tcp_exchange(&w.client, backend, 1000)?;
    expect_ok(&r)?;
    assert!(via_sluice(&r), "{r}");

    w.sluice.kill(Signal::SIGKILL)?;
    w.sluice.wait_exit(T)?;
    let r = tcp_exchange(&w.client, backend, 1000)?;
    expect_ok(&r).context("fail-open: with sluice dead, a pod-IP connection must still work")?;
    assert!(!via_sluice(&r), "sluice is dead; the connection must have gone directly: {r}");
    assert_eq!(r["received"], 1000);

    w.sluice.restart()?;
    w.sluice.wait_ready(T)?;
    wait_enrolled(&w.sluice, &w.client)?;
    let r = tcp_exchange(&w.client, backend, 1000)?;
    expect_ok(&r)?;
    assert!(via_sluice(&r), "after the restart traffic must go through sluice again: {r}");
    assert_eq!(pod_total(&w.sluice, "client")?, 1);
    Ok(())
}

/// 5b. With --fail-closed, a killed sluice means refused connections; a restart recovers.
#[test]
fn fail_closed_refuses_while_dead() -> Result<()> {
    let w = world(1, true, SluiceOpts::fail_closed())?;
    let backend = w.backends[0].addr(ECHO_PORT);
    let status = w.sluice.get_json("/status")?;
    assert_eq!(status["fail_mode"], "closed");
    // The cgroup programs are pinned (they must outlive sluice); the per-pod inbound
    // program is attached per network namespace and is not.
    let cgroup_programs: Vec<&Value> =
        status["programs"].as_array().unwrap().iter().filter(|p| p["name"] != "sluice_inbound").collect();
    assert!(cgroup_programs.len() == 5 && cgroup_programs.iter().all(|p| p["pinned"] == true), "{status}");

    w.sluice.kill(Signal::SIGKILL)?;
    w.sluice.wait_exit(T)?;
    let r = tcp_exchange(&w.client, backend, 100)?;
    assert_eq!(r["ok"], false, "fail-closed: the connection must be refused: {r}");
    assert!(r["error"].as_str().unwrap_or("").starts_with("ConnectionRefused"), "{r}");

    w.sluice.restart()?;
    w.sluice.wait_ready(T)?;
    wait_enrolled(&w.sluice, &w.client)?;
    let r = tcp_exchange(&w.client, backend, 100)?;
    expect_ok(&r)?;
    assert!(via_sluice(&r), "{r}");
    Ok(())
}

/// 7. 1 MiB and 100 MiB arrive byte-exact in both directions through sluice; the client
///    half-closes after sending and still receives the whole response.
#[test]
fn large_transfers_are_byte_exact_with_half_close() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    for size in [1u64 << 20, 100 << 20] {
        let started = Instant::now();
        let r = tcp_exchange(&w.client, echo_vip(), size)?;
        expect_ok(&r)?;
        assert!(via_sluice(&r), "{r}");
        assert_eq!(r["sent"], size);
        assert_eq!(r["received"], size, "{r}");
        assert_eq!(r["sha256_sent"], r["sha256_received"], "bytes changed on the way: {r}");
        eprintln!("{size} bytes each way through sluice in {:?}", started.elapsed());
    }
    Ok(())
}

/// A refused upstream is reflected to the client as a reset at once, never as a hang.
#[test]
fn refused_upstream_resets_client() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    // Nothing listens on port 9999 in the backend pod.
    let started = Instant::now();
    let r = tcp_exchange(&w.client, w.backends[0].addr(9999), 10)?;
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap_or("");
    assert!(err.starts_with("ConnectionReset") || err.starts_with("BrokenPipe"), "expected a reset, got {r}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    // And sluice keeps serving.
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 10)?)?;
    Ok(())
}

fn wait_log(w: &World, needles: &[&str]) -> Result<String> {
    let deadline = Instant::now() + T;
    loop {
        let log = w.sluice.log_contents();
        if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Ok(line.to_string());
        }
        if Instant::now() > deadline {
            bail!("no log line containing {needles:?}; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 8. Malformed manifests (bad YAML, a pod without podIP, an unknown kind) are reported with
///    the file and the problem; traffic keeps flowing on the previous state; a fix applies.
#[test]
fn malformed_manifests_keep_last_good_state() -> Result<()> {
    let w = world(2, true, SluiceOpts::default())?;
    let svc_file = "svc-shop-web.yaml";

    // Bad YAML in the Service's file: its previous content stays in force.
    let bad_yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop\nspec: [\n";
    // What the YAML parser says about it ("did not find expected ',' or '}' at line 4 column
    // 5, while parsing a flow mapping at line 3 column 11"): the log line must carry it.
    let yaml_error = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(bad_yaml)
        .expect_err("the test YAML must be invalid")
        .to_string();
    w.sim.write_file(svc_file, bad_yaml)?;
    let line = wait_log(&w, &[svc_file, "WARN"])?;
    eprintln!("bad YAML reported as: {line}");
    assert!(
        line.contains("invalid YAML") && line.contains(&yaml_error),
        "the log line lacks the YAML problem ({yaml_error}): {line}"
    );
    let status = w.sluice.wait_for("/status", |s| s["manifest_errors"].as_array().is_some_and(|e| !e.is_empty()), T)?;
    assert!(status["manifest_errors"][0]["file"].as_str().unwrap().ends_with(svc_file), "{status}");
    assert!(status["manifest_errors"][0]["reason"].as_str().unwrap_or("").contains(&yaml_error), "{status}");
    let r = w.client.run_simpod(["http-get", "--to", &http_vip().to_string(), "--count", "4"])?;
    for l in r.json_lines()? {
        expect_ok(&l).context("traffic must keep flowing on the previous state")?;
    }

    // A pod without podIP, and an unknown kind: each reported with its file.
    w.sim.write_file(
        "pod-shop-broken.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: broken, namespace: shop, uid: 0b0b0b0b-0000-4000-8000-000000000000}\nspec: {nodeName: x}\nstatus: {phase: Running}\n",
    )?;
    let line = wait_log(&w, &["pod-shop-broken.yaml", "podIP"])?;
    eprintln!("missing podIP reported as: {line}");
    w.sim.write_file("weird.yaml", "apiVersion: example.com/v1\nkind: Frobnicator\nmetadata: {name: x}\n")?;
    let line = wait_log(&w, &["weird.yaml", "Frobnicator"])?;
    eprintln!("unknown kind reported as: {line}");
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 100)?)?;

    // Fix the Service file, with only web-1 behind it now: the fix applies.
    let only = [&w.backends[1]];
    w.sim.write_service("shop", "web", CLUSTER_IP, &[("echo", ECHO_PORT, ECHO_PORT), ("http", HTTP_PORT, HTTP_TARGET_PORT)], &only)?;
    w.sluice.wait_for(
        "/status",
        |s| s["manifest_errors"].as_array().is_some_and(|e| e.iter().all(|e| !e["file"].as_str().unwrap_or("").ends_with(svc_file))),
        T,
    )?;
    let r = w.client.run_simpod(["http-get", "--to", &http_vip().to_string(), "--count", "6"])?;
    for l in r.json_lines()? {
        expect_ok(&l)?;
        assert_eq!(l["body"]["name"], "web-1", "after the fix only web-1 is behind the Service: {l}");
    }
    w.sim.remove_file("pod-shop-broken.yaml")?;
    w.sim.remove_file("weird.yaml")?;
    w.sluice.wait_for("/status", |s| s["manifest_errors"].as_array().is_some_and(|e| e.is_empty()), T)?;
    Ok(())
}

/// The CLI says something useful when sluice is not running.
#[test]
fn cli_reports_when_sluice_is_not_running() -> Result<()> {
    let bin = sluice_tests::sluice_bin()?;
    let out = std::process::Command::new(bin)
        .args(["status", "--admin", "/nonexistent/sluice-admin.sock"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Is sluice running"), "{err}");
    Ok(())
}

/// A hung sluice (stopped, its listeners still open) must not black-hole traffic: its heartbeat
/// goes stale and the kernel programs let connections through (fail-open) until it resumes.
#[test]
fn fail_open_when_sluice_hangs() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let backend = w.backends[0].addr(ECHO_PORT);
    expect_ok(&tcp_exchange(&w.client, backend, 10)?)?;

    w.sluice.kill(Signal::SIGSTOP)?;
    // Each attempt has a short timeout: while the heartbeat is still fresh a redirected
    // connection waits in the stopped listener's queue; once stale, connections go direct.
    let direct = sluice_tests::poll_until(Duration::from_secs(10), || {
        let out = w
            .client
            .run_simpod_timeout(["tcp-client", "--to", &backend.to_string(), "--send-bytes", "10", "--timeout-ms", "500"], T)
            .ok()?;
        let r = out.json().ok()?;
        (r["ok"] == true && !via_sluice(&r)).then_some(r)
    });
    w.sluice.kill(Signal::SIGCONT)?;
    let direct = direct.context("with sluice stopped, connections never went direct (heartbeat not honoured)")?;
    assert_eq!(direct["received"], 10);

    // Resumed: the heartbeat is fresh again and traffic goes through sluice.
    let back = sluice_tests::poll_until(Duration::from_secs(10), || {
        let r = tcp_exchange(&w.client, backend, 10).ok()?;
        (r["ok"] == true && via_sluice(&r)).then_some(r)
    });
    back.context("after SIGCONT traffic never returned to sluice")?;
    Ok(())
}

/// Pods that appear on a running node are enrolled; pods that go away are released, and their
/// listeners closed. Pods on other nodes are never enrolled here.
#[test]
fn pods_come_and_go_while_running() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let late = w.node.add_pod("shop", "late", PodOpts::default())?;
    let view = wait_enrolled(&w.sluice, &late)?;
    let entry = view.as_array().unwrap().iter().find(|p| p["name"] == "late").unwrap().clone();
    assert_eq!(entry["ip"], late.ip().to_string(), "{entry}");
    assert_eq!(entry["uid"], late.uid(), "{entry}");
    let r = tcp_exchange(&late, echo_vip(), 64)?;
    expect_ok(&r)?;
    assert!(via_sluice(&r), "{r}");

    // A pod of another node in the same enrolled namespace is not this sluice's business.
    let other = w.sim.add_node("n2")?;
    let elsewhere = other.add_pod("shop", "elsewhere", PodOpts::default())?;
    late.delete()?;
    wait_released(&w.sluice, &late)?;
    let pods = enrolled_pods(&w.sluice)?;
    assert!(!pods.contains(&"shop/elsewhere".to_string()), "a pod of node n2 was enrolled on n1: {pods:?}");
    drop(elsewhere);
    // The remaining pods are unaffected.
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 64)?)?;
    Ok(())
}

/// The kernel programs' aya-log lines arrive in sluice's own log (here at debug level, which
/// sluice's filter enables for the `sluice_ebpf` target at load time).
#[test]
fn kernel_log_lines_reach_sluice_log() -> Result<()> {
    let opts = SluiceOpts { env: vec![("SLUICE_LOG".into(), "info,sluice_ebpf=debug".into())], ..Default::default() };
    let w = world(1, true, opts)?;
    expect_ok(&tcp_exchange(&w.client, echo_vip(), 10)?)?;
    let line = wait_log(&w, &["sluice_ebpf", "10.96.0.10:9000", "redirected to sluice"])?;
    eprintln!("kernel line: {line}");
    Ok(())
}

/// A pod that holds 127.0.0.1:15001 itself cannot be enrolled: sluice says so clearly, keeps
/// serving the other pods, and leaves that pod's traffic alone (it is not redirected).
#[test]
fn pod_holding_the_capture_port_is_reported_not_broken() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    w.sim.write_namespace("squat", false)?;
    let squatter = w.node.add_pod("squat", "squatter", PodOpts::default())?;
    let mut server = squatter.simpod(["echo-server", "--port", "15001", "--bind", "127.0.0.1"])?;
    server.wait_listening(T)?;

    w.sim.write_namespace("squat", true)?;
    let line = wait_log(&w, &["cannot enroll pod", "squat/squatter", "15001"])?;
    eprintln!("reported as: {line}");
    assert!(!enrolled_pods(&w.sluice)?.contains(&"squat/squatter".to_string()));

    let r = tcp_exchange(&squatter, w.backends[0].addr(ECHO_PORT), 32)?;
    expect_ok(&r)?;
    assert!(!via_sluice(&r), "an unenrolled pod's traffic must not be redirected: {r}");
    let r = tcp_exchange(&w.client, echo_vip(), 32)?;
    expect_ok(&r)?;
    assert!(via_sluice(&r), "{r}");
    Ok(())
}
