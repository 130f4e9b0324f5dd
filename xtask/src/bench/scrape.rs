//! The `scrape` section: does a Prometheus scrape of sluice's metrics endpoint every 100 ms
//! change the request latency? (The telemetry goal: the p99 moves by at most 5 %.)
//!
//! For `http`, `mtls` and `grpc` (those this run has), at `--rps` (and `--high-rps` in the full
//! run), each round is one fixed-rate run cut into 1 s windows on the monotonic clock, each
//! drawn "on" or "off" by a hash of its index and a seed new for every run (taking them in
//! turn put every 2 s periodic activity of the system on the same side for a whole bench run,
//! which moved Δp99 by ±40 % with a sign that changed from run to run): in "on"
//! windows `slload scrape` fetches `http://127.0.0.1:15020/metrics` every 100 ms on a fixed
//! schedule (none in the last tenth of a window, so each ends inside it), in odd windows
//! nothing scrapes, and the load generator keeps one latency histogram per parity. "On" and
//! "off" are thus measured in the same run, on the same connections, interleaved second by
//! second: the machine's drift and noise (which moved the p99 of two back-to-back 30 s runs by
//! ±25 % on the 2-core machine, more than the effect measured) hit both alike. Scrapes come
//! from node 1's network namespace and `system` cgroup (where the harness starts every
//! node-side process; never a pod), over one keep-alive connection, every body read to its
//! `# EOF`, and from node 2's too for `mtls` (both sluices are on that path). A round is valid
//! only if every scraper made at least 90 % of the scrapes its windows allow and every answer
//! was a 200 ending with `# EOF`; an invalid round is recorded as an error of its scenario and
//! the others go on.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sluice_tests::{Node, SimProcess};

use super::{
    measure::{self, Run},
    ms,
    world::World,
    Config, Results, Scenario,
};

/// Prometheus's scrape interval under test.
pub const INTERVAL_MS: u64 = 100;
/// sluice's metrics endpoint (`--metrics-addr`, by default 0.0.0.0:15020) as seen from the node.
pub const URL: &str = "http://127.0.0.1:15020/metrics";
/// The scenarios measured (the L7 paths, whose requests the metrics count).
pub const SCENARIOS: [Scenario; 3] = [Scenario::Http, Scenario::Mtls, Scenario::Grpc];
/// Ticks at the start and end of a run that a scraper may count differently from the run.
const EDGE_TICKS: f64 = 2.0;
/// A scraper must make at least this share of the scrapes the run's duration allows.
pub const MIN_SHARE: f64 = 0.9;
/// Windows of this length are drawn "on" (scrapes) or "off" (none).
pub const WINDOW_MS: u64 = 1000;
/// The same for `--quick`'s 3 s runs, so that they still have both kinds of window.
pub const QUICK_WINDOW_MS: u64 = 300;

/// The window length of this run.
pub fn window_ms(cfg: &Config) -> u64 {
    if cfg.quick {
        QUICK_WINDOW_MS
    } else {
        WINDOW_MS
    }
}
/// How long node 1's sluice keeps an idle pooled L7 upstream connection (4 s), and a margin.
/// Runs through the tunnel wait this long after the previous one, so that each opens new
/// tunnel streams: node 2's part of the path check counts new streams, and its byte counts do
/// not cover requests served at L7 on a reused stream.
const POOL_IDLE: Duration = Duration::from_millis(4500);
/// Rounds this section takes at least (not in `--quick`): a single round's Δp99 scatters by
/// tens of percent either way on the 2-core machine (a handful of VM stalls make its p99), so
/// the median needs more rounds than the other sections' figures.
pub const MIN_ROUNDS: usize = 5;
/// The goal: the p99 with scrapes at most this many percent above the p99 without.
pub const MAX_DELTA_P99_PCT: f64 = 5.0;

/// One round of one scenario: one run, its requests split by whether their window had scrapes.
#[derive(Debug, Clone)]
pub struct Pair {
    pub round: usize,
    /// The run with the latency of the requests scheduled in windows without scrapes in place
    /// of its overall latency (the rest of its output, and its CPU, are the whole run's).
    pub off: Run,
    /// The same for windows with scrapes.
    pub on: Run,
    /// What each scraper reported: (node, `slload scrape`'s summary line).
    pub scrapers: Vec<(String, Value)>,
    /// Scrapes the load's duration allows at one per interval.
    pub expected_scrapes: f64,
    /// The length of its "on" and "off" windows.
    pub window_ms: u64,
}

impl Pair {
    pub fn to_json(&self) -> Value {
        json!({
            "round": self.round,
            "window_ms": self.window_ms,
            "expected_scrapes": self.expected_scrapes,
            "off": self.off.to_json(),
            "on": self.on.to_json(),
            "scrapers": self.scrapers.iter().map(|(n, v)| json!({"node": n, "out": v})).collect::<Vec<_>>(),
        })
    }
}

/// The pairs of one request rate.
#[derive(Debug, Clone)]
pub struct Level {
    pub rps: u32,
    pub pairs: BTreeMap<Scenario, Vec<Pair>>,
}

/// The scenarios this run measures scrapes on, and the others with why not.
pub fn scenarios(cfg: &Config) -> (Vec<Scenario>, Vec<(Scenario, String)>) {
    let mut run = Vec::new();
    let mut not = Vec::new();
    for s in SCENARIOS {
        if cfg.scenarios.contains(&s) {
            run.push(s);
        } else if let Some(why) = s.not_available() {
            not.push((s, why.to_string()));
        } else {
            not.push((s, "not among --scenarios".to_string()));
        }
    }
    (run, not)
}

/// The request rates: `--rps`, and `--high-rps` in the full run.
pub fn levels(cfg: &Config) -> Vec<u32> {
    if cfg.quick {
        cfg.rate_levels.iter().copied().take(1).collect()
    } else {
        cfg.rate_levels.clone()
    }
}

pub fn run(cfg: &Config, world: &World, res: &mut Results) -> Result<()> {
    let (measured, skipped) = scenarios(cfg);
    for (s, why) in &skipped {
        res.notes.push(format!("scrape: `{}` not measured ({why})", s.name()));
    }
    if measured.is_empty() {
        bail!("none of the scrape scenarios (http, mtls, grpc) can run here");
    }
    // When the last run through the tunnel ended.
    let mut tunnel_used: Option<Instant> = None;
    let rounds = if cfg.quick { cfg.rounds } else { cfg.rounds.max(MIN_ROUNDS) };
    for rps in levels(cfg) {
        let mut pairs: BTreeMap<Scenario, Vec<Pair>> = BTreeMap::new();
        for round in 0..rounds {
            for &s in &measured {
                eprintln!(
                    "bench: scrape, {rps} rps, {} round {}/{} (scrapes in random {} ms windows)",
                    s.name(),
                    round + 1,
                    rounds,
                    window_ms(cfg),
                );
                match pair(cfg, world, s, rps, round, &mut tunnel_used) {
                    Ok(p) => pairs.entry(s).or_default().push(p),
                    Err(e) => {
                        let what = format!("scrape {rps} rps {} round {}", s.name(), round + 1);
                        eprintln!("bench: {what} failed: {e:#}");
                        res.errors.push((what, format!("{e:#}")));
                    }
                }
            }
        }
        res.scrape.push(Level { rps, pairs });
    }
    Ok(())
}

/// The nodes whose sluice is on the scenario's path: node 1, and node 2 through the tunnel.
fn scraped_nodes(world: &World, s: Scenario) -> Result<Vec<&Node>> {
    let mut nodes = vec![&world.n1];
    if s.via_tunnel() {
        nodes.push(world.n2.as_ref().with_context(|| format!("{} needs node 2", s.name()))?);
    }
    Ok(nodes)
}

fn pair(
    cfg: &Config,
    world: &World,
    s: Scenario,
    rps: u32,
    round: usize,
    tunnel_used: &mut Option<Instant>,
) -> Result<Pair> {
    let route = world.route(s)?;
    let nodes = scraped_nodes(world, s)?;
    let window_ms = window_ms(cfg);
    // Which windows scrape is drawn anew for every run (see `slload rate --window-seed`).
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let extra = vec![
        "--rps".into(),
        rps.to_string(),
        "--connections".into(),
        cfg.connections.to_string(),
        "--duration-ms".into(),
        ms(cfg.rate_duration),
        "--warmup-ms".into(),
        ms(cfg.warmup),
        "--split-window-ms".into(),
        window_ms.to_string(),
        "--window-seed".into(),
        seed.to_string(),
    ];
    let secs = (cfg.warmup + cfg.rate_duration).as_secs_f64();
    let ticks = (secs * 1000.0 / INTERVAL_MS as f64).floor();
    if s.via_tunnel() {
        // Each run starts on new tunnel streams (see POOL_IDLE).
        if let Some(t) = *tunnel_used {
            std::thread::sleep(POOL_IDLE.saturating_sub(t.elapsed()));
        }
    }
    let _mark = TunnelMark(s.via_tunnel().then_some(&mut *tunnel_used));
    let mut procs = start_scrapers(world, &nodes, secs, seed, window_ms)?;
    let run = measure::slload(world, route, round, "rate", &extra, secs);
    // Collected whatever the load did: the scrapers stop either way.
    let outs = stop_scrapers(&mut procs);
    let run = run.context("the load run")?;
    let scrapers = outs?;
    let expected_scrapes = check_scrapers(&scrapers, ticks)?;
    let part = |parity: &str| -> Result<Run> {
        let latency = run.out["split"][parity].clone();
        if latency["count"].as_f64().unwrap_or(0.0) == 0.0 {
            bail!("slload recorded no request in the {parity} windows: {}", run.out["split"]);
        }
        let mut r = run.clone();
        r.out["latency"] = latency;
        Ok(r)
    };
    Ok(Pair { round, off: part("odd")?, on: part("even")?, scrapers, expected_scrapes, window_ms })
}

/// Records, when dropped, that a run through the tunnel just ended (whether it succeeded or not).
struct TunnelMark<'a>(Option<&'a mut Option<Instant>>);

impl Drop for TunnelMark<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.0.as_mut() {
            **t = Some(Instant::now());
        }
    }
}

/// Starts one `slload scrape` per node, in the node's network namespace and `system` cgroup,
/// and waits until each has its connection (and so is scraping on its schedule). Each stops on
/// its own after twice the load's time and a minute, should the harness not stop it.
fn start_scrapers(
    world: &World,
    nodes: &[&Node],
    load_secs: f64,
    seed: u64,
    window_ms: u64,
) -> Result<Vec<(String, SimProcess)>> {
    let cap_ms = ((load_secs * 2.0 + 60.0) * 1000.0) as u64;
    let mut procs = Vec::new();
    for node in nodes {
        let mut p = node.spawn([
            world.slload().to_string_lossy().as_ref(),
            "scrape",
            "--url",
            URL,
            "--interval-ms",
            &INTERVAL_MS.to_string(),
            "--even-windows-ms",
            &window_ms.to_string(),
            "--window-seed",
            &seed.to_string(),
            "--duration-ms",
            &cap_ms.to_string(),
            "--until-stdin-eof",
            // It stands for a Prometheus elsewhere: its own CPU must not count against sluice.
            "--sched-idle",
        ])?;
        p.wait_for_json(Duration::from_secs(15), |v| v["event"] == "started")
            .with_context(|| format!("starting the scraper of {URL} on {}", node.short_name()))?;
        procs.push((node.short_name().to_string(), p));
    }
    Ok(procs)
}

/// Closes the scrapers' stdin (each finishes the scrape in flight) and reads their summaries.
fn stop_scrapers(procs: &mut [(String, SimProcess)]) -> Result<Vec<(String, Value)>> {
    // Tell them all first, so that they stop at the same time.
    for (_, p) in procs.iter_mut() {
        p.close_stdin();
    }
    let mut outs = Vec::new();
    for (node, p) in procs.iter_mut() {
        let out = p.wait_output(Duration::from_secs(30))?;
        let summary = out
            .stdout
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["mode"] == "scrape")
            .with_context(|| {
                format!(
                    "the scraper on {node} printed no summary (exit {}): {}",
                    out.status,
                    out.stderr.trim()
                )
            })?;
        outs.push((node.clone(), summary));
    }
    Ok(outs)
}

/// A round counts only if every scraper kept (nearly) to its schedule in its "on" windows and
/// every scrape was a complete 200. `ticks`: the run's scrape ticks, "on" and "off". Returns
/// the fewest scrapes the "on" windows allowed a scraper.
fn check_scrapers(scrapers: &[(String, Value)], ticks: f64) -> Result<f64> {
    let mut fewest = f64::INFINITY;
    for (node, v) in scrapers {
        let n = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let made = n("scrapes");
        // The ticks in "off" windows (or too late in an "on" one) were skipped by design; the
        // scraper starts just before the load and stops just after, so its first and last
        // ticks may fall outside the run's count.
        let expected = (ticks - n("skipped_ticks") - EDGE_TICKS).max(0.0);
        fewest = fewest.min(expected);
        if made < MIN_SHARE * expected {
            bail!(
                "the scraper on {node} made {made} scrapes, fewer than {:.0} % of the {expected} the run allows at one per {INTERVAL_MS} ms ({} ticks dropped; scrape time p99 {} µs)",
                MIN_SHARE * 100.0,
                v["dropped_ticks"],
                v["scrape_time"]["p99_us"]
            );
        }
        if n("errors") > 0.0 || n("non_200") > 0.0 || n("missing_eof") > 0.0 || n("ok_200") < made {
            bail!(
                "the scraper on {node}: {} of {made} scrapes failed, {} answered other than 200 (first: {}), {} lacked `# EOF` (first error: {})",
                v["errors"],
                v["non_200"],
                v["first_bad_status"],
                v["missing_eof"],
                v["first_error"]
            );
        }
    }
    Ok(fewest)
}
