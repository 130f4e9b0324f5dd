//! No pod can take down its node's mesh (issue #12, review follow-up): the paths the first round
//! left open. Upgraded connections (WebSocket, CONNECT) stay within the connection bounds and
//! in `sluice conns`; RequestMirror is bounded and never loops; unauthenticated connections to
//! the HBONE port wait in a bucket of their own; the HBONE server's limits hold as h2 says; an
//! idle opaque connection is closed end to end.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sluice_tests::{workloads, Pod, PodOpts, Sim, SimProcess, SluiceOpts};

use common::{counter, start_servers, wait_enrolled, T};

fn slload() -> Result<String> {
    Ok(sluice_tests::simpod_bin()?.with_file_name("slload").to_string_lossy().into_owned())
}

fn opts(args: &[&str]) -> SluiceOpts {
    SluiceOpts { args: args.iter().map(|a| (*a).into()).collect(), ..Default::default() }
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn delta(before: &Value, after: &Value, k: &str) -> u64 {
    after["counters"][k].as_u64().unwrap_or(0).saturating_sub(before["counters"][k].as_u64().unwrap_or(0))
}

/// 1. A pod flooding WebSocket upgrades to its own server (which answers 101 to every one)
///    holds no more than `--pod-max-connections`: an upgraded connection keeps its admission
///    permit for as long as it lives (on both sides), the excess is refused and counted, and
///    `sluice conns` lists every upgraded connection. Before, each upgrade gave its permit
///    back at the 101 and the pod could hold as many as it liked, invisible to `sluice conns`.
#[test]
fn an_upgrade_flood_is_held_to_the_pods_connection_bound() -> Result<()> {
    const BOUND: u64 = 40;
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    sim.write_namespace("shop", true)?;
    let ws = node.add_pod("shop", "ws", PodOpts::labels(&[("app", "ws")]))?;
    let hog = node.add_pod("shop", "hog", PodOpts::labels(&[("app", "hog")]).service_account("hog"))?;
    let mut server = ws.simpod(["ws-echo-server", "--port", "8080"])?;
    server.wait_listening(T)?;
    sim.write_service("shop", "ws", "10.96.5.10", &[("http", 80, 8080)], &[&ws])?;
    let sluice = node.start_sluice(opts(&[
        "--pod-max-connections",
        &BOUND.to_string(),
        "--pod-connection-rate",
        "5000",
    ]))?;
    sluice.wait_ready(T)?;
    wait_enrolled(&sluice, &ws)?;
    wait_enrolled(&sluice, &hog)?;
    let before = sluice.get_json("/status")?;

    let mut flood = hog.spawn([
        slload()?.as_str(),
        "flood",
        "--to",
        "10.96.5.10:80",
        "--count",
        "200",
        // One upgrade after another (8 at a time): each attempt comes after earlier ones have
        // switched protocols, so a permit given back at the 101 would be taken again.
        "--concurrency",
        "8",
        "--timeout-ms",
        "5000",
        "--upgrade",
        "ws.shop",
    ])?;
    let held = flood.wait_for_json(Duration::from_secs(60), |l| l["event"] == "held")?;
    let during = sluice.get_json("/status")?;
    let conns = sluice.get_json("/conns")?;
    let list = conns.as_array().context("/conns is not a list")?;
    let outbound = list
        .iter()
        .filter(|c| {
            c["direction"] == "outbound" && c["source_pod"] == "shop/hog" && c["requests"].as_u64() >= Some(1)
        })
        .count() as u64;
    let inbound = list
        .iter()
        .filter(|c| c["direction"] == "inbound" && c["original_dst"] == ws.addr(8080).to_string())
        .count() as u64;
    eprintln!(
        "upgrade flood: {held}; pod_overflow +{}, http_upgrades +{}, connections_admitted {}; sluice conns: {outbound} outbound from the hog, {inbound} inbound to ws",
        delta(&before, &during, "pod_overflow"),
        delta(&before, &during, "http_upgrades"),
        during["counters"]["connections_admitted"],
    );
    ensure!(
        held["held"].as_u64() == Some(BOUND),
        "the hog holds exactly its bound of upgraded connections: {held}"
    );
    ensure!(
        delta(&before, &during, "pod_overflow") >= 200 - BOUND,
        "every refused upgrade is counted: {}",
        delta(&before, &during, "pod_overflow")
    );
    ensure!(delta(&before, &during, "http_upgrades") == BOUND, "only the admitted ones upgraded");
    ensure!(outbound == BOUND, "sluice conns lists the hog's upgraded connections: {outbound}");
    ensure!(inbound == BOUND, "and their destination side: {inbound}");
    // Both sides of each upgraded connection hold their permit while it lives.
    ensure!(
        during["counters"]["connections_admitted"].as_u64() >= Some(2 * BOUND),
        "admitted: {}",
        during["counters"]["connections_admitted"]
    );

    // Once the hog lets go, everything is given back.
    flood.close_stdin();
    flood.wait_for_json(T, |l| l["event"] == "released")?;
    // (Pooled tunnel connections between the two pods stay, and count node-wide.)
    sluice.wait_for("/status", |s| s["counters"]["connections_admitted"].as_u64() < Some(10), T)?;
    let ws_dst = ws.addr(8080).to_string();
    sluice.wait_for(
        "/conns",
        |c| {
            c.as_array().is_some_and(|l| {
                l.iter().all(|c| c["source_pod"] != "shop/hog" && c["original_dst"] != ws_dst.as_str())
            })
        },
        T,
    )?;
    drop(server);
    Ok(())
}

/// 2. `--tcp-idle-timeout-s 2`: an opaque connection that sends nothing is closed after about
///    2 s (the server and the client both see it) and counted; one that talks every 500 ms
///    for 5 s is not.
#[test]
fn a_silent_opaque_connection_is_closed_by_the_idle_timeout_and_a_chatty_one_is_not() -> Result<()> {
    let w = common::world(1, true, opts(&["--tcp-idle-timeout-s", "2"]))?;
    let mut servers = w.servers;
    let echo = &mut servers[0];
    let before = counter(&w.sluice, "tcp_idle_closed")?;

    let mut silent = w.client.simpod(["hold", "--to", &common::echo_vip().to_string()])?;
    silent.wait_for_json(T, |v| v["event"] == "connected")?;
    let silent_peer = echo.wait_for_json(T, |v| v["event"] == "accepted")?["peer"].clone();
    let accepted_at = Instant::now();

    let mut chatty = w.client.simpod(["hold", "--to", &common::echo_vip().to_string()])?;
    chatty.wait_for_json(T, |v| v["event"] == "connected")?;
    let chatty_peer = echo.wait_for_json(T, |v| v["event"] == "accepted")?["peer"].clone();
    ensure!(silent_peer != chatty_peer, "two connections: {silent_peer} {chatty_peer}");

    let mut silent_closed = None;
    for i in 0..10 {
        let next = Instant::now() + Duration::from_millis(500);
        chatty.send_line(&format!("line {i}"))?;
        let echoed = chatty.wait_for_json(T, |v| v["event"] != "connected")?;
        ensure!(echoed["event"] == "echo", "the chatty connection must stay open (line {i}): {echoed}");
        // Until the next line is due, watch the server's side of the silent connection end.
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            let line = match echo.next_line(left) {
                Ok(Some(l)) => l,
                Ok(None) => anyhow::bail!("the echo server exited"),
                Err(_) => break, // nothing more before the next line is due
            };
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            if v["event"] == "closed" {
                ensure!(v["peer"] == silent_peer, "the chatty connection was closed: {v}");
                silent_closed.get_or_insert(accepted_at.elapsed());
            }
        }
    }
    let closed_after = silent_closed.context("the silent connection was never closed at the server")?;
    // The client's side is closed too: its next line meets the closed connection.
    silent.send_line("too late")?;
    let late = silent.wait_for_json(T, |v| v["event"] != "connected")?;
    ensure!(late["ok"] == false, "the silent client must find its connection closed: {late}");
    chatty.close_stdin();
    chatty.wait_for_json(T, |v| v["event"] == "done")?;
    let closed = counter(&w.sluice, "tcp_idle_closed")? - before;
    eprintln!(
        "silent connection closed after {closed_after:?}; client saw {late}; tcp_idle_closed +{closed}"
    );
    ensure!(
        closed_after >= Duration::from_millis(1500) && closed_after <= Duration::from_secs(5),
        "closed after {closed_after:?}, expected about 2 s"
    );
    // The source side and the destination side (the tunnel stream) each watch it.
    ensure!((1..=2).contains(&closed), "tcp_idle_closed +{closed}");
    Ok(())
}

/// A certificate for `identity` signed by the sim's mesh root (`sluice ca issue`).
fn issue(sim: &Sim, identity: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_dir = sim.temp_dir().join("ca");
    let out = sim.temp_dir().join("hbone-probe");
    let o = Command::new(sluice_tests::sluice_bin()?)
        .args(["ca", "issue", "--dir"])
        .arg(&ca_dir)
        .args(["--identity", identity, "--out"])
        .arg(&out)
        .output()?;
    ensure!(o.status.success(), "sluice ca issue: {}", String::from_utf8_lossy(&o.stderr));
    Ok((out.with_extension("pem"), out.with_extension("key.pem"), ca_dir.join("ca.pem")))
}

fn hbone_probe(
    from: &Pod,
    to: SocketAddr,
    target: SocketAddr,
    creds: &(PathBuf, PathBuf, PathBuf),
    extra: &[&str],
) -> Result<Value> {
    let p = |p: &Path| p.to_string_lossy().into_owned();
    let mut args: Vec<String> = [
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
        "--timeout-ms",
        "20000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = from.run_simpod_timeout(&args, Duration::from_secs(40))?;
    out.json().with_context(|| format!("hbone-client: {}", out.stderr))
}

/// 3. The HBONE server's own limits, as a client sees them: 100 concurrent streams per
///    connection (the 101st waits, as h2 says, and is answered once a stream ends), a CONNECT
///    whose header list is over 16 KiB is refused (431), and a client that completes TLS but
///    never sends the HTTP/2 preface is closed after the 3 s handshake deadline.
#[test]
fn the_hbone_servers_stream_header_and_preface_limits_hold() -> Result<()> {
    let w = common::world(1, true, SluiceOpts::default())?;
    let web = &w.backends[0];
    let creds = issue(&w.sim, "spiffe://cluster.local/ns/shop/sa/default")?;
    let (to, echo) = (web.addr(15008), web.addr(common::ECHO_PORT));

    let s = hbone_probe(&w.client, to, echo, &creds, &["--streams", "101"])?;
    eprintln!("101 streams on one connection: {s}");
    ensure!(s["ok"] == true, "{s}");
    ensure!(s["max_concurrent_streams"] == 100, "the server's SETTINGS_MAX_CONCURRENT_STREAMS: {s}");
    ensure!(s["answered_while_open"] == 100, "100 streams are served at once: {s}");
    ensure!(s["waiting"] == serde_json::json!([100]), "the 101st waits: {s}");
    ensure!(
        s["answered_after_one_ended"] == serde_json::json!([100]),
        "and is served once a stream ends: {s}"
    );
    ensure!(s["statuses"]["200"] == 101, "{s}");

    let small = hbone_probe(&w.client, to, echo, &creds, &["--header-bytes", "8000"])?;
    ensure!(small["status"] == 200, "a CONNECT with 8 KB of headers is served: {small}");
    let big = hbone_probe(&w.client, to, echo, &creds, &["--header-bytes", "20000"])?;
    eprintln!("CONNECT with a 20 KB header: {big}");
    ensure!(big["status"] == 431, "a CONNECT header list over 16 KiB is refused with 431: {big}");

    let failed = counter(&w.sluice, "hbone_handshakes_failed")?;
    let quiet = hbone_probe(&w.client, to, echo, &creds, &["--no-preface"])?;
    eprintln!("TLS without an HTTP/2 preface: {quiet}");
    let after = quiet["closed_after_ms"].as_u64().unwrap_or(0);
    ensure!((2500..=4500).contains(&after), "closed after the 3 s deadline: {quiet}");
    ensure!(counter(&w.sluice, "hbone_handshakes_failed")? > failed, "and counted");
    Ok(())
}

/// `slload rate` from `pod`: 200 requests/s over 4 keep-alive connections for `ms`.
fn rate(pod: &Pod, to: &str, ms: u64) -> Result<Value> {
    let out = pod.run_timeout(
        [
            &slload()?,
            "rate",
            "--to",
            to,
            "--rps",
            "200",
            "--connections",
            "4",
            "--duration-ms",
            &ms.to_string(),
            "--warmup-ms",
            "500",
        ],
        Duration::from_secs(60),
    )?;
    out.json().with_context(|| format!("slload rate: {}", out.stderr))
}

fn errors(v: &Value) -> u64 {
    v["errors"].as_u64().unwrap_or(u64::MAX) + v["unsent"].as_u64().unwrap_or(0)
}

/// 4. A pod outside the mesh holding 3 000 TCP connections to an enrolled pod's :15008 that
///    never start TLS (reopening each one sluice closes) does not stop other pods' mesh
///    traffic: it holds at most its handshake bucket, each connection at most the 3 s
///    deadline, and is counted; other pods' requests (through tunnels, including a tunnel made
///    to the stalled pod during the stall) see no error. Before, every stalled connection took
///    a node-wide connection permit for up to 10 s: with `--max-connections 1500` the stall
///    held them all and every other new connection of the node was reset.
#[test]
fn stalled_connections_to_15008_do_not_stop_other_pods() -> Result<()> {
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    sim.write_namespace("shop", true)?;
    sim.write_namespace("plain", false)?;
    let slload = slload()?;
    let victim = node.add_pod("shop", "victim", PodOpts::labels(&[("app", "victim")]))?;
    let quiet =
        node.add_pod("shop", "quiet", PodOpts::labels(&[("app", "quiet")]).service_account("quiet"))?;
    let fresh =
        node.add_pod("shop", "fresh", PodOpts::labels(&[("app", "fresh")]).service_account("fresh"))?;
    let backend = node.add_pod("shop", "quiet-be", PodOpts::labels(&[("app", "quiet-be")]))?;
    let outsider = node.add_pod("plain", "outsider", PodOpts::default())?;
    let mut servers: Vec<SimProcess> = start_servers(&victim)?;
    let mut be = backend.spawn([slload.as_str(), "serve", "--port", "8080", "--threads", "1"])?;
    be.wait_listening(T)?;
    servers.push(be);
    sim.write_service("shop", "quiet", "10.96.3.10", &[("http", 80, 8080)], &[&backend])?;
    sim.write_service("shop", "victim", "10.96.3.20", &[("tcp-echo", 9000, 9000)], &[&victim])?;
    let sluice = node.start_sluice(opts(&["--max-connections", "1500"]))?;
    sluice.wait_ready(T)?;
    for p in [&victim, &quiet, &fresh, &backend] {
        wait_enrolled(&sluice, p)?;
    }
    let alone = rate(&quiet, "10.96.3.10:80", 2000)?;
    ensure!(errors(&alone) == 0, "the quiet pod alone: {alone}");
    let before = sluice.get_json("/status")?;
    let fds_before = fds(sluice.pid())?;

    let mut stall = outsider.simpod([
        "hbone-stall",
        "--to",
        &victim.addr(15008).to_string(),
        "--connections",
        "3000",
        "--duration-ms",
        "9000",
        "--reconnect-delay-ms",
        "10",
    ])?;
    // The stall is on: the victim's port has as many unauthenticated connections as it lets in.
    let held = sluice.wait_for(
        "/status",
        |s| {
            s["counters"]["hbone_handshakes_refused_source"].as_u64()
                > before["counters"]["hbone_handshakes_refused_source"].as_u64()
        },
        T,
    )?;
    let fds_during = fds(sluice.pid())?;
    let during = rate(&quiet, "10.96.3.10:80", 4000)?;
    // A pod that never talked to the victim makes its first tunnel to it now, past the stall.
    let fresh_tunnel = common::tcp_exchange(&fresh, "10.96.3.20:9000".parse()?, 1000)?;
    let stalled = stall.wait_for_json(Duration::from_secs(60), |v| v.get("opened").is_some())?;
    let after = sluice.get_json("/status")?;
    eprintln!(
        "stall: {stalled}\nsluice: handshakes in progress {} (at the first refusal), fds {fds_before} → {fds_during}; refused by source +{}, node +{}; handshakes failed +{}; refused_node_limit +{}\nquiet pod alone {alone}\nduring the stall {during}\nfresh pod's first tunnel to the victim: {fresh_tunnel}",
        held["counters"]["hbone_handshakes_in_progress"],
        delta(&before, &after, "hbone_handshakes_refused_source"),
        delta(&before, &after, "hbone_handshakes_refused_node"),
        delta(&before, &after, "hbone_handshakes_failed"),
        delta(&before, &after, "refused_node_limit"),
    );
    ensure!(errors(&during) == 0, "the quiet pod saw errors during the stall: {during}");
    ensure!(fresh_tunnel["ok"] == true, "a new tunnel to the stalled pod works: {fresh_tunnel}");
    ensure!(delta(&before, &after, "refused_node_limit") == 0, "no connection was refused node-wide");
    ensure!(
        delta(&before, &after, "hbone_handshakes_refused_source") > 0,
        "the stall is refused and counted"
    );
    ensure!(delta(&before, &after, "hbone_handshakes_failed") > 0, "its timed-out handshakes are counted");
    // What the stall held: its bucket (plus what the kernel's accept queue keeps), each
    // connection for the handshake deadline at most.
    ensure!(fds_during < fds_before + 300, "sluice's descriptors went from {fds_before} to {fds_during}");
    ensure!(
        stalled["lifetime_ms"]["max"].as_u64().is_some_and(|ms| ms < 4500),
        "no stalled connection outlived the 3 s deadline by much: {stalled}"
    );
    ensure!(
        stalled["long_lived"].as_u64() > Some(0),
        "the admitted ones were held until the deadline: {stalled}"
    );
    drop(servers);
    Ok(())
}

/// 5. RequestMirror to a backend that never answers: the client's requests are not slowed,
///    at most 32 mirrored requests of the pod are in flight (the rest are dropped and counted),
///    each is given up after its 10 s deadline, and sluice holds nothing afterwards. A mirror
///    whose backend is sluice's own port is refused by the loop guard.
#[test]
fn mirrors_to_a_backend_that_never_answers_stay_bounded() -> Result<()> {
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    sim.write_namespace("shop", true)?;
    let web = node.add_pod("shop", "web", PodOpts::labels(&[("app", "web")]))?;
    let sink = node.add_pod("shop", "sink", PodOpts::labels(&[("app", "sink")]))?;
    let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    let servers = start_servers(&web)?;
    // Answers after 10 minutes: never, as far as a mirror is concerned.
    let mut blackhole =
        sink.simpod(["http-server", "--port", "8080", "--name", "sink", "--delay-ms", "600000"])?;
    blackhole.wait_listening(T)?;
    sim.write_service("shop", "web", "10.96.0.10", &[("http", 80, 8080)], &[&web])?;
    sim.write_service("shop", "sink", "10.96.7.10", &[("http", 80, 8080)], &[&sink])?;
    sim.write_service("shop", "loop", "10.96.7.20", &[("http", 80, 15006)], &[&web])?;
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /mirrored}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: sink, port: 80}}
    backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /looped}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: loop, port: 80}}
    backendRefs: [{name: web, port: 80}]
"#;
    sim.write_file("route-web.yaml", route)?;
    let sluice = node.start_sluice(SluiceOpts::default())?;
    sluice.wait_ready(T)?;
    for p in [&web, &sink, &client] {
        wait_enrolled(&sluice, p)?;
    }
    let model = sluice.get_json("/model")?;
    ensure!(
        model["errors"].as_array().is_some_and(|e| e.is_empty()),
        "manifests rejected: {}",
        model["errors"]
    );
    let before = sluice.get_json("/status")?;
    let fds_before = fds(sluice.pid())?;

    let started = Instant::now();
    let load = workloads::http_load(
        &client,
        "10.96.0.10:80".parse()?,
        &["--path", "/mirrored/x", "--connections", "4", "--count", "300"],
    )?;
    let took = started.elapsed();
    let during = sluice.get_json("/status")?;
    let fds_during = fds(sluice.pid())?;
    eprintln!(
        "300 mirrored requests in {took:?}: {load:?}; mirrors in flight {}, dropped +{}, sent +{}; sluice fds {fds_before} → {fds_during}",
        during["counters"]["http_mirrors_in_flight"],
        delta(&before, &during, "http_mirror_dropped"),
        delta(&before, &during, "http_mirrored"),
    );
    ensure!(
        load.errors == 0 && load.status(200) == 300,
        "the client is served whatever the mirror does: {load:?}"
    );
    ensure!(took < Duration::from_secs(9), "the client is not slowed by the mirror: {took:?}");
    let in_flight = during["counters"]["http_mirrors_in_flight"].as_u64().unwrap_or(u64::MAX);
    ensure!(in_flight <= 32, "at most 32 mirrors of the pod in flight: {in_flight}");
    ensure!(delta(&before, &during, "http_mirror_dropped") >= 300 - 32, "the others are dropped and counted");

    // Each is given up after its deadline; nothing is left.
    let after = sluice.wait_for(
        "/status",
        |s| s["counters"]["http_mirrors_in_flight"].as_u64() == Some(0),
        Duration::from_secs(30),
    )?;
    let timeouts = delta(&before, &after, "http_mirror_timeouts");
    ensure!(timeouts >= 1 && timeouts <= 32, "the mirrors in flight timed out: {timeouts}");
    ensure!(after["counters"]["http_mirror_body_bytes"] == 0, "{}", after["counters"]);

    // A mirror to sluice's own port is refused by the loop guard; the request is served.
    let refused = counter(&sluice, "self_connection_refused")?;
    let looped =
        workloads::http_load(&client, "10.96.0.10:80".parse()?, &["--path", "/looped", "--count", "1"])?;
    ensure!(looped.errors == 0 && looped.status(200) == 1, "{looped:?}");
    sluice.wait_for("/status", |s| s["counters"]["self_connection_refused"].as_u64() > Some(refused), T)?;
    drop(servers);
    drop(blackhole);
    Ok(())
}
