//! Running the load in a pod and reading sluice's resource use from /proc.

use std::{
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

use super::{
    world::{Route, World},
    Scenario,
};

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
    /// sluice's CPU seconds during the run (node n1's sluice; n2's too for cross-node runs).
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

/// `slload <mode> --to <route> <args…>`; checks the path the connections took.
pub fn slload(
    world: &World,
    route: &Route,
    round: usize,
    mode: &str,
    extra: &[String],
    expected_s: f64,
) -> Result<Run> {
    let mut args = vec![
        world.slload().to_string_lossy().into_owned(),
        mode.to_string(),
        "--to".into(),
        route.http.to_string(),
    ];
    args.extend(extra.iter().cloned());
    let timeout = Duration::from_secs_f64(expected_s * 2.0 + 60.0);
    let streams = tunnel_streams(world, route)?;
    let run = measured(world, route, round, args, timeout, route.scenario == Scenario::Mtls, last_json)?;
    route.check_path(run.out["locals"][0].as_str())?;
    check_tunnel(world, route, streams)?;
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
    let args: Vec<String> = [
        "iperf3",
        "-c",
        &route.iperf.ip().to_string(),
        "-p",
        &route.iperf.port().to_string(),
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
    let streams = tunnel_streams(world, route)?;
    let cross = cross || route.scenario == Scenario::Mtls;
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
        check_tunnel(world, route, streams)?;
        Ok(run)
    })
}

/// HBONE streams node 2's sluice has accepted so far (for `mtls` routes).
fn tunnel_streams(world: &World, route: &Route) -> Result<Option<u64>> {
    if route.scenario != Scenario::Mtls {
        return Ok(None);
    }
    let s = world.sluice2.as_ref().context("mtls needs sluice on node 2")?;
    Ok(s.get_json("/status")?["counters"]["hbone_streams_in"].as_u64())
}

/// An `mtls` run must have gone through the tunnel: node 2's sluice counted new streams.
fn check_tunnel(world: &World, route: &Route, before: Option<u64>) -> Result<()> {
    if let Some(before) = before {
        let after = tunnel_streams(world, route)?.unwrap_or(0);
        if after <= before {
            bail!("mtls: node 2's sluice accepted no HBONE stream (hbone_streams_in stayed at {before}): the connections did not take the tunnel");
        }
    }
    Ok(())
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
