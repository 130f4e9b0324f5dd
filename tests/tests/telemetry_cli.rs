//! Telemetry CLI acceptance (issue "Telemetry and the node-local CLI", criteria 4 and 5):
//! `sluice tap` shows a request within 1 s of it happening and filters correctly; `sluice stat`
//! agrees with the clients' own counts within 2 %; `sluice top` runs in a real terminal (tmux)
//! and piped, and shows the expected rows.
//!
//! One node, namespace `shop` enrolled: a client pod, `web-0` behind Service shop/web and
//! `api-0` behind Service shop/api (simpod HTTP servers). Both backends are on the client's
//! node, so every request is reported twice: by the client's side (reporter=source) and by the
//! server's (reporter=destination).

mod common;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};
use common::{wait_enrolled, T};
use serde_json::Value;
use sluice_tests::{
    poll_until, workloads::start_http_server, Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts,
};

const HTTP_PORT: u16 = 8080;
const WEB_IP: &str = "10.96.3.10";
const API_IP: &str = "10.96.3.20";

struct World {
    sim: Sim,
    node: Node,
    client: Pod,
    sluice: Sluice,
    _servers: Vec<SimProcess>,
}

fn web() -> SocketAddr {
    format!("{WEB_IP}:80").parse().unwrap()
}

fn api() -> SocketAddr {
    format!("{API_IP}:80").parse().unwrap()
}

impl World {
    fn new() -> Result<World> {
        let sim = Sim::new()?;
        let node = sim.add_node("n1")?;
        sim.write_namespace("shop", true)?;
        let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
        let web_pod = node.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]))?;
        let api_pod = node.add_pod("shop", "api-0", PodOpts::labels(&[("app", "api")]))?;
        let servers = vec![
            start_http_server(&web_pod, HTTP_PORT, "web-0", &[])?,
            start_http_server(&api_pod, HTTP_PORT, "api-0", &[])?,
        ];
        sim.write_service("shop", "web", WEB_IP, &[("http", 80, HTTP_PORT)], &[&web_pod])?;
        sim.write_service("shop", "api", API_IP, &[("http", 80, HTTP_PORT)], &[&api_pod])?;
        let sluice = node.start_sluice(SluiceOpts::default())?;
        sluice.wait_ready(T)?;
        for p in [&client, &web_pod, &api_pod] {
            wait_enrolled(&sluice, p)?;
        }
        Ok(World { sim, node, client, sluice, _servers: servers })
    }

    /// `sluice <args> --admin <socket>` started in the background in the node namespace.
    fn spawn_cli(&self, args: &[&str]) -> Result<SimProcess> {
        let mut all: Vec<OsString> = vec![sluice_tests::sluice_bin()?.into_os_string()];
        all.extend(args.iter().map(OsString::from));
        all.push("--admin".into());
        all.push(self.sluice.admin_socket().as_os_str().to_owned());
        self.node.spawn(all)
    }

    /// Waits until sluice counts `n` tap subscribers.
    fn wait_subscribers(&self, n: u64) -> Result<()> {
        self.sluice
            .wait_for("/status", |s| s["counters"]["tap_subscribers"].as_u64() == Some(n), T)
            .with_context(|| format!("waiting for {n} tap subscribers"))?;
        Ok(())
    }

    /// `simpod http-get` from the client, `count` requests on one keep-alive connection;
    /// returns the statuses the client got.
    fn get(&self, to: SocketAddr, path: &str, count: u32) -> Result<Vec<u16>> {
        let args = [
            "http-get",
            "--to",
            &to.to_string(),
            "--path",
            path,
            "--count",
            &count.to_string(),
            "--keepalive",
        ];
        let out = self.client.run_simpod_timeout(args, Duration::from_secs(120))?;
        let lines = out.json_lines()?;
        ensure!(
            lines.len() == count as usize,
            "expected {count} results, got {}: {}",
            lines.len(),
            out.stderr
        );
        lines
            .iter()
            .map(|l| {
                ensure!(l["ok"] == true, "request failed: {l}");
                l["status"].as_u64().map(|s| s as u16).context("no status")
            })
            .collect()
    }

    /// `curl -X METHOD` from the client; returns the status.
    fn curl(&self, method: &str, url: &str) -> Result<u16> {
        let out = self.client.run_timeout(
            ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, url],
            Duration::from_secs(20),
        )?;
        ensure!(out.success(), "curl -X {method} {url}: {} {}", out.stdout, out.stderr);
        out.stdout.trim().parse().with_context(|| format!("curl printed {:?}", out.stdout))
    }
}

/// The tap `request` lines a process printed whose path starts with `prefix`.
fn requests(lines: &[Value], prefix: &str) -> Vec<Value> {
    lines
        .iter()
        .filter(|v| v["type"] == "request" && v["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
        .cloned()
        .collect()
}

/// Reads `tap`'s JSON lines until `done` holds for the request lines seen, or `timeout`.
fn read_until(
    tap: &mut SimProcess,
    timeout: Duration,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tap.next_json(left) {
            Ok(Some(v)) if v["type"] == "request" => seen.push(v),
            Ok(Some(_)) => {}
            Ok(None) => bail!("tap exited: {}", tap.stderr_contents()),
            Err(e) => bail!("{e:#}; request lines so far: {seen:#?}"),
        }
    }
    Ok(seen)
}

fn check_event(v: &Value, method: &str, service: &str, dst_pod: &str, status: u16) -> Result<()> {
    ensure!(v["method"] == method, "method: {v}");
    ensure!(v["service"] == service, "service: {v}");
    ensure!(v["status"] == status, "status: {v}");
    ensure!(v["source"]["name"] == "shop/client", "source: {v}");
    ensure!(v["destination"]["name"] == dst_pod, "destination: {v}");
    ensure!(v["mtls"] == true, "mtls: {v}");
    ensure!(v["protocol"] == "http", "protocol: {v}");
    ensure!(v["response_flags"] == "-", "response_flags: {v}");
    ensure!(v["latency_ms"].as_f64().is_some_and(|l| l > 0.0), "latency: {v}");
    ensure!(v["reporter"] == "source" || v["reporter"] == "destination", "reporter: {v}");
    ensure!(v["time"].as_str().is_some_and(|t| t.len() == 24 && t.ends_with('Z')), "time: {v}");
    Ok(())
}

fn unix_ms(rfc3339: &str) -> Option<f64> {
    // 2024-05-01T12:00:00.123Z; only the time of day matters within one test run.
    let t = rfc3339.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = t.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(((h * 60.0 + m) * 60.0 + s) * 1000.0)
}

fn now_ms_of_day() -> f64 {
    let d = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
    (d.as_millis() % 86_400_000) as f64
}

/// Criterion 4 (tap): a tap on Service shop/web shows each request to it, from both sides,
/// within 1 s of the client sending it, with the right fields, and nothing to shop/api; other
/// filters (path prefix with method, pod with reporter) keep exactly what they say; the human
/// output carries the same facts.
#[test]
fn tap_shows_filtered_requests_within_a_second() -> Result<()> {
    let w = World::new()?;
    let mut to_web = w.spawn_cli(&["tap", "--to", "shop/web", "-o", "json"])?;
    to_web.wait_for_json(T, |v| v["type"] == "subscribed").context("tap --to shop/web")?;
    let mut post_ok = w.spawn_cli(&["tap", "--path", "/api/ok", "--method", "POST", "-o", "json"])?;
    post_ok.wait_for_json(T, |v| v["type"] == "subscribed")?;
    let mut api_in =
        w.spawn_cli(&["tap", "--pod", "shop/api-0", "--reporter", "destination", "-o", "json"])?;
    api_in.wait_for_json(T, |v| v["type"] == "subscribed")?;
    w.wait_subscribers(3)?;

    // Latency: the client is started in the background and the tap lines are waited for at
    // once; measured from before the client process starts (so it includes its start-up).
    let mut arrivals = Vec::new();
    let mut pipeline = Vec::new();
    for i in 0..5 {
        let path = format!("/web/{i}");
        // A request to shop/api first: the web tap must not show it.
        w.get(api(), &format!("/api/ok/{i}"), 1)?;
        let sent = Instant::now();
        let mut client = w.client.simpod(["http-get", "--to", &web().to_string(), "--path", &path])?;
        let lines = read_until(&mut to_web, Duration::from_secs(5), |seen| requests(seen, &path).len() == 2)?;
        let arrived = sent.elapsed();
        let arrived_wall = now_ms_of_day();
        let out = client.wait_output(T)?;
        ensure!(out.json()?["status"] == 200, "client: {}", out.stdout);
        ensure!(lines.len() == 2, "the web tap showed more than this request: {lines:#?}");
        for v in &lines {
            check_event(v, "GET", "shop/web", "shop/web-0", 200)?;
            ensure!(v["path"] == path.as_str(), "path: {v}");
            // From the request's end at sluice (its start plus its latency) to now.
            let end = unix_ms(v["time"].as_str().unwrap()).unwrap() + v["latency_ms"].as_f64().unwrap();
            pipeline.push(arrived_wall - end);
        }
        let reporters: Vec<&str> = lines.iter().filter_map(|v| v["reporter"].as_str()).collect();
        ensure!(reporters.contains(&"source") && reporters.contains(&"destination"), "{reporters:?}");
        arrivals.push(arrived);
    }
    let worst = arrivals.iter().max().copied().unwrap_or_default();
    eprintln!(
        "tap latency, client start to tap line: {:?} (worst {worst:?}); request end at sluice to the test reading the line: {:?} ms",
        arrivals,
        pipeline.iter().map(|p| p.round() as i64).collect::<Vec<_>>()
    );
    ensure!(worst < Duration::from_secs(1), "a request took {worst:?} to show in tap");

    // Filters: GETs to /api/ok (not POST), POSTs to /api/ok/p* (yes), a POST to /api/other
    // (wrong path), then markers that every tap shows last.
    w.get(api(), "/api/ok/get", 3)?;
    for p in ["/api/ok/p1", "/api/ok/p2"] {
        ensure!(w.curl("POST", &format!("http://{API_IP}{p}"))? == 200);
    }
    ensure!(w.curl("POST", &format!("http://{API_IP}/api/other"))? == 200);
    ensure!(w.curl("POST", &format!("http://{API_IP}/api/ok/end"))? == 200);
    w.get(web(), "/web/end", 1)?;

    let seen = read_until(&mut to_web, T, |s| requests(s, "/web/end").len() == 2)?;
    ensure!(seen.iter().all(|v| v["path"] == "/web/end"), "web tap showed other requests: {seen:#?}");
    for v in &seen {
        check_event(v, "GET", "shop/web", "shop/web-0", 200)?;
    }

    let seen = read_until(&mut post_ok, T, |s| requests(s, "/api/ok/end").len() == 2)?;
    let paths: BTreeMap<String, usize> = seen.iter().fold(BTreeMap::new(), |mut m, v| {
        *m.entry(v["path"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        m
    });
    let want: BTreeMap<String, usize> = [("/api/ok/end", 2), ("/api/ok/p1", 2), ("/api/ok/p2", 2)]
        .iter()
        .map(|(p, n)| (p.to_string(), *n))
        .collect();
    ensure!(paths == want, "POST /api/ok tap: {paths:?}, expected {want:?}: {seen:#?}");
    for v in &seen {
        check_event(v, "POST", "shop/api", "shop/api-0", 200)?;
    }

    // Every request to api-0 (5 + 3 GETs, 4 POSTs), from the server's side only.
    let seen = read_until(&mut api_in, T, |s| !requests(s, "/api/ok/end").is_empty())?;
    ensure!(seen.len() == 12, "pod api-0 reporter=destination tap: {} lines: {seen:#?}", seen.len());
    for v in &seen {
        ensure!(v["reporter"] == "destination" && v["destination"]["name"] == "shop/api-0", "{v}");
        ensure!(v["source"]["name"] == "shop/client" && v["mtls"] == true, "{v}");
    }

    // People's output: one line per request with its facts; --max ends it.
    let mut human = w.spawn_cli(&["tap", "--to", "web", "--reporter", "source", "--max", "1"])?;
    w.wait_subscribers(4)?;
    w.get(web(), "/web/human", 1)?;
    let out = human.wait_output(T)?;
    ensure!(out.success(), "sluice tap --max 1: {} {}", out.stdout, out.stderr);
    let line = out.stdout.lines().next().unwrap_or_default();
    for part in ["out shop/client -> shop/web-0", "svc=shop/web", "GET", "/web/human", " 200 ", "http mtls"] {
        ensure!(line.contains(part), "tap line {line:?} lacks {part:?}");
    }
    ensure!(out.stdout.lines().count() == 1, "--max 1 printed {}", out.stdout);
    ensure!(out.stderr.contains("tapping to=web reporter=source"), "stderr: {}", out.stderr);

    // --duration ends a quiet tap too.
    let out = w.sluice.cli(&["tap", "--duration", "0.5", "-o", "json"])?;
    ensure!(out.success(), "sluice tap --duration: {} {}", out.stdout, out.stderr);
    ensure!(out.json_lines()?.iter().any(|v| v["type"] == "subscribed"), "{}", out.stdout);

    // Subscribers leave when their client goes away.
    drop((to_web, post_ok, api_in, human));
    w.wait_subscribers(0)?;
    Ok(())
}

fn stat_json(w: &World, args: &[&str]) -> Result<Value> {
    let out = w.sluice.cli(args)?;
    ensure!(out.success(), "sluice {args:?}: {} {}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).with_context(|| format!("sluice {args:?} printed {}", out.stdout))
}

fn row<'a>(view: &'a Value, name: &str) -> Result<&'a Value> {
    view["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name))
        .with_context(|| format!("no row {name} in {view:#}"))
}

/// Checks one direction of a stat row against what the clients counted: requests within 2 %,
/// success rate within 2 points, plausible latency percentiles.
fn check_direction(d: &Value, requests: usize, successes: usize, what: &str) -> Result<()> {
    let got = d["requests"].as_u64().with_context(|| format!("{what}: no requests in {d}"))? as f64;
    let want = requests as f64;
    ensure!((got - want).abs() <= want * 0.02, "{what}: {got} requests, the clients sent {want}: {d}");
    let rate = d["success_rate"].as_f64().context("success_rate")?;
    let want_rate = successes as f64 / requests as f64;
    ensure!(
        (rate - want_rate).abs() <= 0.02,
        "{what}: success rate {rate}, the clients saw {want_rate}: {d}"
    );
    let (p50, p95, p99) = (
        d["latency_ms"]["p50"].as_f64().context("p50")?,
        d["latency_ms"]["p95"].as_f64().context("p95")?,
        d["latency_ms"]["p99"].as_f64().context("p99")?,
    );
    ensure!(p50 > 0.0 && p50 <= p95 && p95 <= p99 && p99 < 5000.0, "{what}: latency {p50}/{p95}/{p99}");
    ensure!(d["rps"].as_f64().is_some_and(|r| r > 0.0), "{what}: rps {d}");
    Ok(())
}

/// Criterion 4 (stat): after a known mix of requests (some answered 503 by the backend),
/// `sluice stat services` and `sluice stat pods` agree with the clients' own counts within 2 %
/// in both directions, with the success rate the clients saw.
#[test]
fn stat_agrees_with_the_clients_counts() -> Result<()> {
    let w = World::new()?;
    let mut statuses = Vec::new();
    statuses.extend(w.get(web(), "/ok", 180)?);
    statuses.extend(w.get(web(), "/fail?status=503", 20)?);
    let web_ok = statuses.iter().filter(|s| **s < 500).count();
    ensure!(statuses.len() == 200 && web_ok == 180, "statuses: {statuses:?}");
    let api_statuses = w.get(api(), "/", 50)?;
    let api_ok = api_statuses.iter().filter(|s| **s < 500).count();

    // The last records are emitted as the responses end: wait for them rather than sleep.
    let args = ["stat", "services", "-o", "json", "--window", "60s"];
    let mut view = Value::Null;
    poll_until(T, || {
        view = stat_json(&w, &args).ok()?;
        let n =
            |name, dir: &str| row(&view, name).ok().and_then(|r| r[dir]["requests"].as_u64()).unwrap_or(0);
        (n("shop/web", "outbound") >= 196
            && n("shop/web", "inbound") >= 196
            && n("shop/api", "inbound") >= 49)
            .then_some(())
    })
    .with_context(|| format!("stat never caught up: {view:#}"))?;
    let view = stat_json(&w, &args)?;
    ensure!(view["kind"] == "services" && view["window_s"] == 60, "{view}");
    let web_row = row(&view, "shop/web")?;
    check_direction(&web_row["outbound"], 200, web_ok, "service shop/web outbound")?;
    check_direction(&web_row["inbound"], 200, web_ok, "service shop/web inbound")?;
    let api_row = row(&view, "shop/api")?;
    check_direction(&api_row["outbound"], 50, api_ok, "service shop/api outbound")?;
    check_direction(&api_row["inbound"], 50, api_ok, "service shop/api inbound")?;

    let pods = stat_json(&w, &["stat", "pods", "-o", "json", "--window", "1m"])?;
    let client = row(&pods, "shop/client")?;
    check_direction(&client["outbound"], 250, web_ok + api_ok, "pod shop/client outbound")?;
    ensure!(client["inbound"].is_null(), "the client received nothing: {client}");
    check_direction(&row(&pods, "shop/web-0")?["inbound"], 200, web_ok, "pod shop/web-0 inbound")?;
    check_direction(&row(&pods, "shop/api-0")?["inbound"], 50, api_ok, "pod shop/api-0 inbound")?;

    // One name; and the table people read.
    let one = stat_json(&w, &["stat", "services", "web", "-o", "json"])?;
    ensure!(one["rows"].as_array().is_some_and(|r| r.len() == 1 && r[0]["name"] == "shop/web"), "{one:#}");
    let out = w.sluice.cli(&["stat", "pods", "--window", "30s"])?;
    ensure!(out.success(), "{} {}", out.stdout, out.stderr);
    ensure!(
        out.stdout.contains("POD") && out.stdout.contains("SUCCESS") && out.stdout.contains("P99"),
        "{}",
        out.stdout
    );
    let client_line =
        out.stdout.lines().find(|l| l.starts_with("shop/client")).context("no shop/client row")?;
    ensure!(client_line.contains("outbound") && client_line.contains("250"), "{client_line}");
    let bad = w.sluice.cli(&["stat", "pods", "--window", "5m"])?;
    ensure!(!bad.success() && bad.stderr.contains("window"), "a 5m window must be refused: {}", bad.stderr);
    eprintln!("sluice stat pods:\n{}", out.stdout);
    Ok(())
}

/// A private tmux server (its own socket, in the sim's temp dir) killed on drop, also when the
/// test fails.
struct Tmux {
    socket: std::path::PathBuf,
    session: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Result<String> {
        let out =
            Command::new("tmux").arg("-S").arg(&self.socket).args(args).output().context("running tmux")?;
        ensure!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn pane(&self) -> Result<String> {
        self.cmd(&["capture-pane", "-p", "-t", &self.session])
    }

    /// Polls the pane until `pred` holds; fails with the last screen.
    fn wait_pane(&self, what: &str, mut pred: impl FnMut(&str) -> bool) -> Result<String> {
        let mut last = String::new();
        let found = poll_until(T, || {
            last = self.pane().ok()?;
            pred(&last).then(|| last.clone())
        });
        found.with_context(|| format!("waiting for {what}; the screen:\n{last}"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-S").arg(&self.socket).arg("kill-server").output();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn top_row<'a>(screen: &'a str, path: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.split_whitespace().nth(3) == Some(path))
}

/// Criterion 5: `sluice top` in a real terminal (tmux, 200x50): the header and one row per
/// (source, destination, method, path) with the counts sent, busiest first; `q` quits and
/// gives the terminal back.
#[test]
fn top_runs_in_a_terminal() -> Result<()> {
    let w = World::new()?;
    let which = Command::new("tmux").arg("-V").output();
    ensure!(which.is_ok_and(|o| o.status.success()), "tmux is missing: run cargo xtask setup");
    let tmux = Tmux { socket: w.sim.temp_dir().join("tmux.sock"), session: "top".into() };
    let bin = sluice_tests::sluice_bin()?;
    // Twice: the first run is quit with q, the second (started with Enter, once the first's
    // end has been seen) with Ctrl-C; each says how it ended.
    let top = format!(
        "ip netns exec {} {} top --admin {} 2>>{}",
        w.node.netns(),
        bin.display(),
        w.sluice.admin_socket().display(),
        w.sim.log_dir().join("top-tty.stderr").display(),
    );
    let shell = format!("{top}; echo \"top exited: $?\"; read _; {top}; echo \"top ended: $?\"; sleep 60");
    tmux.cmd(&["new-session", "-d", "-s", &tmux.session, "-x", "200", "-y", "50", &shell])?;
    tmux.wait_pane("top's first screen", |s| s.contains("sluice top") && s.contains("waiting for requests"))?;
    w.wait_subscribers(1)?;

    w.get(web(), "/top/web", 30)?;
    w.get(api(), "/top/api", 10)?;
    w.get(web(), "/top/fail?status=500", 5)?;
    let screen = tmux.wait_pane("the rows of the requests sent", |s| {
        let count = |p| top_row(s, p).and_then(|l| l.split_whitespace().nth(4)).map(str::to_string);
        count("/top/web").as_deref() == Some("30")
            && count("/top/api").as_deref() == Some("10")
            && count("/top/fail").as_deref() == Some("5")
    })?;
    eprintln!("sluice top in tmux:\n{screen}");
    let header = screen.lines().find(|l| l.starts_with("SOURCE")).context("no header row")?;
    let cols: Vec<&str> = header.split_whitespace().collect();
    ensure!(
        cols == ["SOURCE", "DESTINATION", "METHOD", "PATH", "COUNT", "RPS", "SUCCESS", "P50", "P99"],
        "{header}"
    );
    let web_row: Vec<&str> = top_row(&screen, "/top/web").unwrap().split_whitespace().collect();
    ensure!(web_row[..5] == ["shop/client", "shop/web-0", "GET", "/top/web", "30"], "{web_row:?}");
    ensure!(web_row[6] == "100.00%", "{web_row:?}");
    ensure!(web_row[5].parse::<f64>().is_ok_and(|r| r > 0.0), "rps: {web_row:?}");
    ensure!(web_row[7].ends_with('s') && web_row[8].ends_with('s'), "latencies: {web_row:?}");
    let fail_row: Vec<&str> = top_row(&screen, "/top/fail").unwrap().split_whitespace().collect();
    ensure!(fail_row[1] == "shop/web-0" && fail_row[6] == "0.00%", "{fail_row:?}");
    let api_row: Vec<&str> = top_row(&screen, "/top/api").unwrap().split_whitespace().collect();
    ensure!(api_row[1] == "shop/api-0", "{api_row:?}");
    // Busiest first.
    let pos = |p: &str| screen.lines().position(|l| top_row(l, p).is_some());
    ensure!(pos("/top/web") < pos("/top/api") && pos("/top/api") < pos("/top/fail"), "order:\n{screen}");

    tmux.cmd(&["send-keys", "-t", &tmux.session, "q"])?;
    let after = tmux.wait_pane("top to quit on q", |s| s.contains("top exited:"))?;
    ensure!(after.contains("top exited: 0"), "{after}");
    ensure!(!after.contains("SOURCE"), "the table should be gone with the alternate screen:\n{after}");

    // The second run: Ctrl-C also leaves the terminal as it was.
    w.wait_subscribers(0)?;
    tmux.cmd(&["send-keys", "-t", &tmux.session, "Enter"])?;
    tmux.wait_pane("the second top", |s| s.contains("waiting for requests"))?;
    w.wait_subscribers(1)?;
    tmux.cmd(&["send-keys", "-t", &tmux.session, "C-c"])?;
    let after = tmux.wait_pane("top to quit on Ctrl-C", |s| s.contains("top ended:"))?;
    ensure!(after.contains("top exited: 0") && after.contains("top ended: 0"), "{after}");
    ensure!(!after.contains("SOURCE") && !after.contains("^C"), "{after}");
    w.wait_subscribers(0)?;
    Ok(())
}

/// `sluice top` piped: `--once N` prints the table once after N seconds (and `-o json` the same
/// snapshot as JSON), then exits.
#[test]
fn top_piped_prints_the_table() -> Result<()> {
    let w = World::new()?;
    let mut plain = w.spawn_cli(&["top", "--once", "4"])?;
    let mut json = w.spawn_cli(&["top", "--once", "4", "-o", "json"])?;
    w.wait_subscribers(2)?;
    w.get(web(), "/piped", 12)?;
    w.get(api(), "/piped-api?x=1", 3)?;
    let out = plain.wait_output(T)?;
    ensure!(out.success(), "sluice top --once: {} {}", out.stdout, out.stderr);
    eprintln!("sluice top --once 4:\n{}", out.stdout);
    ensure!(!out.stdout.contains('\x1b'), "no terminal codes when piped: {:?}", out.stdout);
    let lines: Vec<&str> = out.stdout.lines().collect();
    ensure!(lines.first().is_some_and(|l| l.starts_with("# ")), "{}", out.stdout);
    ensure!(lines.get(1).is_some_and(|l| l.starts_with("SOURCE")), "{}", out.stdout);
    let row: Vec<&str> =
        top_row(&out.stdout, "/piped").context("no /piped row")?.split_whitespace().collect();
    ensure!(row[..5] == ["shop/client", "shop/web-0", "GET", "/piped", "12"], "{row:?}");
    let row: Vec<&str> =
        top_row(&out.stdout, "/piped-api").context("no /piped-api row")?.split_whitespace().collect();
    ensure!(row[..5] == ["shop/client", "shop/api-0", "GET", "/piped-api", "3"], "{row:?}");

    let out = json.wait_output(T)?;
    ensure!(out.success(), "sluice top --once -o json: {} {}", out.stdout, out.stderr);
    let snap = out.json()?;
    let rows = snap["rows"].as_array().context("rows")?;
    ensure!(rows.len() == 2, "{snap:#}");
    ensure!(
        rows[0]["path"] == "/piped" && rows[0]["count"] == 12 && rows[0]["success_rate"] == 1.0,
        "{snap:#}"
    );
    let (p50, p99) = (rows[0]["p50_ms"].as_f64().unwrap_or(-1.0), rows[0]["p99_ms"].as_f64().unwrap_or(-1.0));
    ensure!(p50 > 0.0 && p50 <= p99, "{snap:#}");
    ensure!(snap["events"] == 30, "both sides of 15 requests: {snap:#}");
    Ok(())
}
