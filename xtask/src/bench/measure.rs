//! Running the load in a pod and reading sluice's resource use from /proc.

use std::{
    collections::HashMap,
    fs,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use sluice_tests::Sluice;

use super::world::{Route, World};

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let sticks: u64 = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks + sticks) as f64 / hz)
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// Samples VmRSS every 100 ms until finished; returns the largest value seen.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u64>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::spawn(move || {
            let mut max = 0;
            while !s.load(Ordering::Relaxed) {
                if let Ok(v) = rss_kib(pid) {
                    max = max.max(v);
                }
                thread::sleep(Duration::from_millis(100));
            }
            max.max(rss_kib(pid).unwrap_or(0))
        });
        RssSampler { stop, handle }
    }

    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

/// One measured run of one scenario.
#[derive(Debug, Clone)]
pub struct Run {
    pub round: usize,
    /// What the load tool printed (slload's JSON, or a summary of iperf3's).
    pub out: Value,
    /// sluice's CPU seconds during the run (node n1's sluice; n2's too for runs through the
    /// tunnel and bulk across nodes).
    pub sluice_cpu_s: f64,
    pub wall_s: f64,
    /// Largest sluice RSS seen during the run.
    pub sluice_rss_max_kib: u64,
}

impl Run {
    pub fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "wall_s": self.wall_s,
            "sluice_cpu_s": self.sluice_cpu_s,
            "sluice_rss_max_kib": self.sluice_rss_max_kib,
            "out": self.out,
        })
    }

    /// A number inside the tool's output, e.g. `f("latency.p50_us")`.
    pub fn f(&self, path: &str) -> Option<f64> {
        path.split('.').try_fold(&self.out, |v, k| v.get(k)).and_then(Value::as_f64)
    }
}

fn sluice_pids(world: &World, cross: bool) -> Vec<u32> {
    let mut pids = vec![world.sluice.pid()];
    if cross {
        if let Some(s) = &world.sluice2 {
            pids.push(s.pid());
        }
    }
    pids
}

/// Runs a command in the route's client pod and measures sluice around it.
fn measured(
    world: &World,
    route: &Route,
    round: usize,
    args: Vec<String>,
    timeout: Duration,
    cross: bool,
    parse: impl Fn(&str) -> Result<Value>,
) -> Result<Run> {
    let pids = sluice_pids(world, cross);
    let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
    let sampler = RssSampler::start(world.sluice.pid());
    let t0 = Instant::now();
    let out = route.client.run_timeout(&args, timeout);
    let wall_s = t0.elapsed().as_secs_f64();
    let rss = sampler.finish();
    let cpu1: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<Result<f64>>()?;
    let out = out?;
    if !out.success() {
        bail!(
            "{} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            out.stdout.trim(),
            out.stderr.trim()
        );
    }
    let value = parse(&out.stdout).with_context(|| format!("output of {}", args.join(" ")))?;
    Ok(Run { round, out: value, sluice_cpu_s: cpu1 - cpu0, wall_s, sluice_rss_max_kib: rss })
}

fn last_json(stdout: &str) -> Result<Value> {
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line")?;
    Ok(serde_json::from_str(line)?)
}

/// `slload <mode> --to <route> --proto <http|grpc> <args…>`; checks the path the connections
/// took.
pub fn slload(
    world: &World,
    route: &Route,
    round: usize,
    mode: &str,
    extra: &[String],
    expected_s: f64,
) -> Result<Run> {
    let mut args = vec![world.slload().to_string_lossy().into_owned(), mode.to_string()];
    args.extend(route.slload_target());
    args.extend(extra.iter().cloned());
    let timeout = Duration::from_secs_f64(expected_s * 2.0 + 60.0);
    let probe = PathProbe::before(&world.sluice, world.sluice2.as_ref(), route)?;
    let run = measured(world, route, round, args, timeout, route.scenario.via_tunnel(), last_json)?;
    route.check_path(run.out["locals"][0].as_str())?;
    // Requests answered: every one of them went through sluice (warm-up included).
    let answered = run.f("total").or_else(|| run.f("completed")).map(|n| n as u64);
    probe.check(&world.sluice, world.sluice2.as_ref(), route, false, answered)?;
    if run.f("completed").or_else(|| run.f("latency.count")) == Some(0.0) {
        bail!(
            "{} {mode}: no request succeeded ({} errors; first: {})",
            route.scenario.name(),
            run.out["errors"],
            run.out["first_error"]
        );
    }
    if run.out["ok"] != true {
        eprintln!(
            "bench: {} {mode} round {round}: errors={} unsent={} first error: {}",
            route.scenario.name(),
            run.out["errors"],
            run.out["unsent"],
            run.out["first_error"]
        );
    }
    Ok(run)
}

/// `iperf3 -c` from the route's client to its iperf server; the summary in Gbit/s.
pub fn iperf(world: &World, route: &Route, round: usize, seconds: u64, cross: bool) -> Result<Run> {
    let omit = if seconds >= 5 { 1 } else { 0 };
    let to =
        route.iperf.with_context(|| format!("the {} route has no iperf3 server", route.scenario.name()))?;
    let args: Vec<String> = [
        "iperf3",
        "-c",
        &to.ip().to_string(),
        "-p",
        &to.port().to_string(),
        "-t",
        &seconds.to_string(),
        "-O",
        &omit.to_string(),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let timeout = Duration::from_secs(seconds + 60);
    let probe = PathProbe::before(&world.sluice, world.sluice2.as_ref(), route)?;
    let cross = cross || route.scenario.via_tunnel();
    measured(world, route, round, args, timeout, cross, |stdout| {
        let v: Value = serde_json::from_str(stdout)?;
        if let Some(e) = v.get("error") {
            bail!("iperf3: {e}");
        }
        let bps = |k: &str| v["end"][k]["bits_per_second"].as_f64();
        let recv = bps("sum_received").context("end.sum_received.bits_per_second")?;
        let local = v["start"]["connected"][0]["local_host"].as_str().unwrap_or_default().to_string();
        let local_port = v["start"]["connected"][0]["local_port"].as_u64().unwrap_or(0);
        Ok(json!({
            "gbit_s": (recv / 1e7).round() / 100.0,
            "sent_gbit_s": bps("sum_sent").map(|b| (b / 1e7).round() / 100.0),
            "retransmits": v["end"]["sum_sent"]["retransmits"],
            "seconds": seconds,
            "locals": [format!("{local}:{local_port}")],
        }))
    })
    .and_then(|run| {
        route.check_path(run.out["locals"][0].as_str())?;
        // The iperf3 port is `appProtocol: tcp` on every route: opaque, whatever the scenario.
        probe.check(&world.sluice, world.sluice2.as_ref(), route, true, None)?;
        Ok(run)
    })
}

fn counters(s: &Sluice) -> Result<Value> {
    let status = s.get_json("/status")?;
    if !status["counters"].is_object() {
        bail!("sluice's /status has no counters: {status}");
    }
    Ok(status["counters"].clone())
}

/// Bytes node 2's sluice delivered so far to the application (peer → app) per open inbound
/// mTLS connection (HBONE stream), by connection id.
fn delivered(s: &Sluice) -> Result<HashMap<u64, u64>> {
    let conns = s.get_json("/conns")?;
    Ok(conns
        .as_array()
        .context("/conns is not a list")?
        .iter()
        .filter(|c| c["direction"] == "inbound" && c["security"] == "mtls")
        .filter_map(|c| Some((c["id"].as_u64()?, c["bytes_sent"].as_u64()?)))
        .collect())
}

/// sluice's counters before a run, to check after it that the run took its scenario's path:
/// - node 1's detection counters: a new connection classified as the scenario's protocol
///   (`detected_opaque` for `l4`, `mtls-l4` and every iperf3 run, `detected_http1` for `http`
///   and `mtls`, `detected_http2` for `grpc`) and none as another one; `http_requests` must
///   not move on an opaque path and must grow by at least the requests answered on an L7 one;
/// - through the tunnel (`mtls`, `mtls-l4`): node 2's sluice accepted new HBONE streams, or
///   (L7 upstream connections are pooled, and a run may reuse the previous run's streams)
///   delivered more bytes on its open inbound mTLS streams; and node 1 sent nothing in
///   plaintext for want of a tunnel endpoint.
///
/// Baselines are checked by the client's local address only ([`Route::check_path`]). With a
/// sluice without the L7 counters, only the tunnel is checked.
pub struct PathProbe {
    n1: Option<Value>,
    n2_streams: Option<u64>,
    n2_delivered: HashMap<u64, u64>,
}

impl PathProbe {
    pub fn before(n1: &Sluice, n2: Option<&Sluice>, route: &Route) -> Result<PathProbe> {
        let s = route.scenario;
        let n1 = if !s.is_baseline() && super::l7_available() { Some(counters(n1)?) } else { None };
        let (mut n2_streams, mut n2_delivered) = (None, HashMap::new());
        if s.via_tunnel() {
            let n2 = n2.with_context(|| format!("{} needs sluice on node 2", s.name()))?;
            n2_streams = Some(counters(n2)?["hbone_streams_in"].as_u64().unwrap_or(0));
            n2_delivered = delivered(n2)?;
        }
        Ok(PathProbe { n1, n2_streams, n2_delivered })
    }

    /// `opaque`: the run used an opaque port (iperf3); `answered`: requests the client got an
    /// answer to, when known.
    pub fn check(
        self,
        n1: &Sluice,
        n2: Option<&Sluice>,
        route: &Route,
        opaque: bool,
        answered: Option<u64>,
    ) -> Result<()> {
        let s = route.scenario;
        let name = s.name();
        if let Some(before) = &self.n1 {
            let after = counters(n1)?;
            let d = |k: &str| after[k].as_u64().unwrap_or(0).saturating_sub(before[k].as_u64().unwrap_or(0));
            let expect =
                if opaque { "detected_opaque" } else { s.detected_counter().expect("not a baseline") };
            if d(expect) == 0 {
                bail!(
                    "{name}: sluice on n1 classified no new connection as {expect} (counters now: {after})"
                );
            }
            for other in ["detected_opaque", "detected_http1", "detected_http2"] {
                if other != expect && d(other) > 0 {
                    bail!(
                        "{name}: sluice on n1 classified {} connection(s) as {other}, expected {expect} only: the Service port's appProtocol did not take effect",
                        d(other)
                    );
                }
            }
            let requests = d("http_requests");
            if expect == "detected_opaque" && requests > 0 {
                bail!("{name}: sluice on n1 handled {requests} HTTP request(s) on what should be an opaque path");
            }
            if expect != "detected_opaque" && requests < answered.unwrap_or(1).max(1) {
                bail!(
                    "{name}: sluice on n1 counted {requests} HTTP request(s), the client got {} answers: not every request went through the L7 path",
                    answered.unwrap_or(1)
                );
            }
            if (s.via_tunnel() || s == super::Scenario::MtlsSameNode) && d("hbone_fallback_plaintext") > 0 {
                bail!(
                    "{name}: sluice on n1 sent {} connection(s) in plaintext (no tunnel endpoint)",
                    d("hbone_fallback_plaintext")
                );
            }
        }
        if let Some(streams_before) = self.n2_streams {
            let n2 = n2.with_context(|| format!("{name} needs sluice on node 2"))?;
            let streams = counters(n2)?["hbone_streams_in"].as_u64().unwrap_or(0);
            let grew = delivered(n2)?
                .iter()
                .any(|(id, bytes)| *bytes > self.n2_delivered.get(id).copied().unwrap_or(0));
            if streams <= streams_before && !grew {
                bail!("{name}: node 2's sluice accepted no HBONE stream (hbone_streams_in stayed at {streams_before}) and delivered nothing more on its open ones: the requests did not take the tunnel");
            }
        }
        Ok(())
    }
}

/// Median of the values (NaN-free); `None` when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}
