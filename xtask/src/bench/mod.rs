//! `cargo xtask bench`: sluice against a direct pod-to-pod connection, measured in the same
//! run, in the node simulator (see docs/benchmarks.md for the method and the latest figures).
//!
//! Sections (all but `instructions` by default; `--only` picks):
//! - `latency`: fixed-rate load (`--rps`, then `--high-rps`) over `--connections` keep-alive
//!   connections (HTTP/1.1, or unary gRPC calls over HTTP/2 for `grpc`), latency from each
//!   request's scheduled send time (no coordinated omission), then saturation (closed loop).
//!   sluice's CPU and RSS are read meanwhile.
//! - `scrape`: the same fixed-rate load (`http`, `mtls`, `grpc`) without and with a scrape of
//!   sluice's `/metrics` every 100 ms, in pairs; the change of the p99 (see `scrape.rs`).
//! - `bulk`: iperf3 on the same node and across two nodes (opaque TCP).
//! - `churn`: new connections per second (connect, one HTTP/1.1 request, close).
//! - `idle`: sluice's RSS with `--idle-connections` idle connections open through it.
//! - `micro`: the criterion benches of proxy/benches.
//! - `instructions` (`--instructions`): instructions per proxied request under callgrind.
//!
//! Scenarios alternate within each round (direct, l4, …, grpc-direct, grpc, then again) and
//! figures are medians over rounds, because these machines are noisy. Every run checks that it
//! took its scenario's path (the client's local address, sluice's detection and request
//! counters, node 2's tunnel). Results: `target/bench/results.{json,md}` and `latency.svg`.

mod callgrind;
mod measure;
mod micro;
mod report;
mod scrape;
mod world;

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use measure::Run;
use world::{Bins, World};

/// The paths compared. The order is the order of the tables and of the alternated runs within a
/// round (a baseline runs just before the scenarios compared with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// Client pod → server pod, namespace not enrolled: no sluice in the path (the baseline).
    Direct,
    /// Same node, enrolled client, server outside the mesh, Service port `appProtocol: tcp`:
    /// opaque TCP through sluice (HTTP/1.1 inside, not parsed).
    L4,
    /// Two nodes, enrolled client and server, Service port `appProtocol: tcp`: opaque bytes
    /// through both sluices and the mTLS (HBONE) tunnel.
    #[value(name = "mtls-l4")]
    MtlsL4,
    /// Same node, HTTP/1.1 through sluice's L7 path (`appProtocol: http`).
    Http,
    /// Two nodes, enrolled client and server: HTTP/1.1 through sluice's L7 path on node 1 and
    /// the mTLS (HBONE) tunnel to sluice on node 2 (`appProtocol: http`): full L7 with mTLS.
    Mtls,
    /// Same node, enrolled client and server: HTTP/1.1 through sluice's L7 path, handed over
    /// in-process to the destination side (no tunnel to itself; `--same-node in-process`).
    #[value(name = "mtls-same-node")]
    MtlsSameNode,
    /// The gRPC baseline: the gRPC backend without sluice (implied by `grpc`).
    #[value(skip)]
    GrpcDirect,
    /// Unary gRPC calls over HTTP/2 through sluice's L7 path (`appProtocol: grpc`), same node.
    Grpc,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::Direct,
        Scenario::L4,
        Scenario::MtlsL4,
        Scenario::Http,
        Scenario::Mtls,
        Scenario::MtlsSameNode,
        Scenario::GrpcDirect,
        Scenario::Grpc,
    ];

    /// What `--scenarios` takes (and its default): every scenario but the implied gRPC baseline.
    pub const REQUESTABLE: [Scenario; 7] = [
        Scenario::Direct,
        Scenario::L4,
        Scenario::MtlsL4,
        Scenario::Http,
        Scenario::Mtls,
        Scenario::MtlsSameNode,
        Scenario::Grpc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::L4 => "l4",
            Scenario::MtlsL4 => "mtls-l4",
            Scenario::Http => "http",
            Scenario::Mtls => "mtls",
            Scenario::MtlsSameNode => "mtls-same-node",
            Scenario::GrpcDirect => "grpc-direct",
            Scenario::Grpc => "grpc",
        }
    }

    /// A path without sluice, that others are compared with.
    pub fn is_baseline(self) -> bool {
        matches!(self, Scenario::Direct | Scenario::GrpcDirect)
    }

    /// The run this scenario is compared with (same load, no sluice).
    pub fn baseline(self) -> Scenario {
        match self {
            Scenario::Grpc | Scenario::GrpcDirect => Scenario::GrpcDirect,
            _ => Scenario::Direct,
        }
    }

    /// What slload speaks on this path (`--proto`).
    pub fn proto(self) -> &'static str {
        match self {
            Scenario::Grpc | Scenario::GrpcDirect => "grpc",
            _ => "http",
        }
    }

    /// Through the HBONE tunnel to node 2.
    pub fn via_tunnel(self) -> bool {
        matches!(self, Scenario::Mtls | Scenario::MtlsL4)
    }

    /// The detection counter of sluice on node 1 that a connection of this scenario raises
    /// (`None` for the baselines).
    pub fn detected_counter(self) -> Option<&'static str> {
        match self {
            Scenario::Direct | Scenario::GrpcDirect => None,
            Scenario::L4 | Scenario::MtlsL4 => Some("detected_opaque"),
            Scenario::Http | Scenario::Mtls | Scenario::MtlsSameNode => Some("detected_http1"),
            Scenario::Grpc => Some("detected_http2"),
        }
    }

    /// Why a scenario cannot run; `None` when it can. Depends on the sluice binary (see
    /// [`set_capabilities`]).
    pub fn not_available(self) -> Option<&'static str> {
        let tunnel = TUNNEL.load(std::sync::atomic::Ordering::Relaxed);
        let l7 = L7.load(std::sync::atomic::Ordering::Relaxed);
        match self {
            Scenario::Direct | Scenario::L4 => None,
            Scenario::MtlsL4 | Scenario::Mtls | Scenario::MtlsSameNode if !tunnel => {
                Some("needs the node-to-node mTLS (HBONE) tunnel (this sluice has no --ca-dir)")
            }
            Scenario::MtlsL4 => None,
            Scenario::Http | Scenario::Mtls | Scenario::MtlsSameNode | Scenario::GrpcDirect | Scenario::Grpc if !l7 => {
                Some("needs sluice's L7 (HTTP per request) path (this sluice has no --detect-timeout-ms)")
            }
            Scenario::Http | Scenario::Mtls | Scenario::MtlsSameNode | Scenario::GrpcDirect | Scenario::Grpc => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Scenario::Direct => "client pod → server pod IP, namespace not enrolled (no sluice)",
            Scenario::L4 => {
                "enrolled client → Service ClusterIP (appProtocol tcp) → sluice, opaque TCP → server outside the mesh, same node"
            }
            Scenario::MtlsL4 => {
                "enrolled client on node 1 → Service (appProtocol tcp) → sluice, opaque → mTLS (HBONE) tunnel → sluice on node 2 → enrolled server"
            }
            Scenario::Http => {
                "enrolled client → Service (appProtocol http) → sluice L7, HTTP/1.1 per request → server outside the mesh, same node"
            }
            Scenario::Mtls => {
                "enrolled client on node 1 → Service (appProtocol http) → sluice L7 → pooled upstream in the mTLS (HBONE) tunnel → sluice on node 2 → enrolled server"
            }
            Scenario::MtlsSameNode => {
                "enrolled client → Service (appProtocol http) → sluice L7 → handed over in-process (no tunnel) → sluice's destination side → enrolled server, same node"
            }
            Scenario::GrpcDirect => "gRPC client pod → gRPC server pod IP, no sluice (the gRPC baseline)",
            Scenario::Grpc => {
                "enrolled client → Service (appProtocol grpc) → sluice L7, unary gRPC over HTTP/2 per call → server outside the mesh, same node"
            }
        }
    }
}

/// Whether the sluice under test has the mTLS tunnel and the L7 path (decided from the binary
/// at run time).
static TUNNEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static L7: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_capabilities(tunnel: bool, l7: bool) {
    TUNNEL.store(tunnel, std::sync::atomic::Ordering::Relaxed);
    L7.store(l7, std::sync::atomic::Ordering::Relaxed);
}

/// Whether sluice's `/status` has the L7 counters the path checks read.
pub fn l7_available() -> bool {
    L7.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Section {
    Latency,
    Scrape,
    Bulk,
    Churn,
    Idle,
    Micro,
    Instructions,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A few seconds per scenario instead of the full run.
    #[arg(long)]
    pub quick: bool,
    /// Also count instructions per proxied request under valgrind's callgrind (adds minutes).
    #[arg(long)]
    pub instructions: bool,
    /// Measured seconds of each fixed-rate run [default: 30; --quick: 3].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests per second of the first fixed-rate level.
    #[arg(long, default_value_t = 1000)]
    pub rps: u32,
    /// Requests per second of the second fixed-rate level (0: skip it).
    #[arg(long, default_value_t = 5000)]
    pub high_rps: u32,
    /// Keep-alive connections of the fixed-rate runs.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Connections of the saturation (closed-loop) runs.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
    /// Connections made at the same time in the churn runs.
    #[arg(long, default_value_t = 4)]
    pub churn_connections: usize,
    /// Alternated rounds per scenario; figures are medians over rounds [default: 3; --quick: 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Idle connections held open through sluice for the memory figure [default: 10000;
    /// --quick: 1000].
    #[arg(long)]
    pub idle_connections: Option<usize>,
    /// Requests per callgrind window (N, then 2N) [default: 1000; --quick: 200].
    #[arg(long)]
    pub instructions_requests: Option<u64>,
    /// Scenarios to compare with `direct` (which always runs: it is the baseline; `grpc` also
    /// runs its own baseline, `grpc-direct`).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::REQUESTABLE.to_vec())]
    pub scenarios: Vec<Scenario>,
    /// Run only these sections.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
    /// Use the binaries already built ($SLUICE_BIN, $SIMPOD_BIN, $SLLOAD_BIN or
    /// target/release) instead of building them.
    #[arg(long)]
    pub no_build: bool,
    /// Where the results go [default: target/bench].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rewrite the results section of docs/benchmarks.md (and docs/benchmarks-latency.svg).
    #[arg(long)]
    pub update_docs: bool,
    /// The harness self-check (what `smoke()` runs): direct, l4, http, grpc-direct and grpc for
    /// about 2 s each with the binaries already built for this profile; fails only if the
    /// harness breaks.
    #[arg(long, hide = true)]
    pub smoke: bool,
}

/// Everything a run is parameterised by, resolved from the arguments.
#[derive(Debug, Clone)]
pub struct Config {
    pub quick: bool,
    pub profile: &'static str,
    pub build: bool,
    pub sections: Vec<Section>,
    /// What `--scenarios` asked for; resolved into `scenarios` and `unavailable` once the
    /// sluice binary is known.
    pub requested: Vec<Scenario>,
    pub scenarios: Vec<Scenario>,
    pub unavailable: Vec<Scenario>,
    pub rounds: usize,
    pub rate_levels: Vec<u32>,
    pub connections: usize,
    pub rate_duration: Duration,
    pub warmup: Duration,
    pub max_connections: usize,
    pub max_duration: Duration,
    pub bulk_seconds: u64,
    pub churn_connections: usize,
    pub churn_duration: Duration,
    pub idle_connections: usize,
    pub instr_n: u64,
    pub out_dir: PathBuf,
    pub update_docs: bool,
    pub command: String,
}

impl Config {
    pub fn from_args(a: &BenchArgs) -> Result<Config> {
        let q = a.quick;
        let pick = |full: f64, quick: f64| if q { quick } else { full };
        let mut sections: Vec<Section> = if a.only.is_empty() {
            let mut s = vec![Section::Latency, Section::Scrape, Section::Bulk, Section::Churn, Section::Idle];
            if !q {
                s.push(Section::Micro);
            }
            s
        } else {
            a.only.clone()
        };
        if a.instructions && !sections.contains(&Section::Instructions) {
            sections.push(Section::Instructions);
        }
        sections.sort();
        sections.dedup();
        let duration = a.duration.unwrap_or(pick(30.0, 3.0));
        if !(duration > 0.0)
            || a.rps == 0
            || a.connections == 0
            || a.max_connections == 0
            || a.churn_connections == 0
        {
            bail!("--duration, --rps and the connection counts must be positive");
        }
        let mut rate_levels = vec![a.rps];
        if a.high_rps > 0 {
            rate_levels.push(a.high_rps);
        }
        let out_dir = match &a.out {
            Some(p) => p.clone(),
            None => target_dir()?.join("bench"),
        };
        Ok(Config {
            quick: q,
            profile: "release",
            build: !a.no_build,
            sections,
            requested: a.scenarios.clone(),
            scenarios: Vec::new(),
            unavailable: Vec::new(),
            rounds: a.rounds.unwrap_or(if q { 1 } else { 3 }).max(1),
            rate_levels,
            connections: a.connections,
            rate_duration: Duration::from_secs_f64(duration),
            warmup: Duration::from_secs_f64(pick(2.0, 0.5)),
            max_connections: a.max_connections,
            max_duration: Duration::from_secs_f64(pick(10.0, 2.0)),
            bulk_seconds: pick(10.0, 2.0) as u64,
            churn_connections: a.churn_connections,
            churn_duration: Duration::from_secs_f64(pick(10.0, 2.0)),
            idle_connections: a.idle_connections.unwrap_or(if q { 1000 } else { 10_000 }),
            instr_n: a.instructions_requests.unwrap_or(if q { 200 } else { 1000 }).max(10),
            out_dir,
            update_docs: a.update_docs,
            command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        })
    }

    /// The harness self-check: direct, l4, http, grpc-direct and grpc for about 2 s each, with
    /// the binaries of the current profile (`cargo xtask` itself is a debug build, so
    /// `target/debug`, or `$SLUICE_BIN`, `$SIMPOD_BIN`, `$SLLOAD_BIN`), no build, no timing
    /// assertions. Single node, so it runs without the tunnel too.
    pub fn smoke() -> Result<Config> {
        let mut c = Config::from_args(&BenchArgs {
            quick: true,
            instructions: false,
            duration: Some(2.0),
            rps: 500,
            high_rps: 0,
            connections: 4,
            max_connections: 4,
            churn_connections: 2,
            rounds: Some(1),
            idle_connections: Some(100),
            instructions_requests: None,
            scenarios: vec![Scenario::L4, Scenario::Http, Scenario::Grpc],
            only: vec![Section::Latency, Section::Churn, Section::Idle],
            no_build: true,
            out: None,
            update_docs: false,
            smoke: true,
        })?;
        c.profile = profile_name()?;
        c.warmup = Duration::from_millis(300);
        c.max_duration = Duration::from_secs(1);
        c.churn_duration = Duration::from_secs(1);
        c.out_dir = target_dir()?.join("bench").join("smoke");
        c.command = "(smoke)".into();
        Ok(c)
    }

    /// Splits the requested scenarios into those this sluice can run and the others, and adds
    /// the baselines they are compared with.
    fn resolve_scenarios(&mut self) -> Result<()> {
        self.scenarios = vec![Scenario::Direct];
        self.unavailable.clear();
        for s in &self.requested {
            match s.not_available() {
                None => self.scenarios.extend([s.baseline(), *s]),
                Some(_) if !self.unavailable.contains(s) => self.unavailable.push(*s),
                Some(_) => {}
            }
        }
        self.scenarios.sort();
        self.scenarios.dedup();
        self.unavailable.sort();
        if !self.scenarios.iter().any(|s| !s.is_baseline())
            && self.sections.iter().any(|s| *s != Section::Micro)
        {
            bail!("no scenario to compare with direct is available (asked for {:?})", self.requested);
        }
        Ok(())
    }

    fn has(&self, s: Section) -> bool {
        self.sections.contains(&s)
    }

    /// Every scenario of a round, baselines included, in table order.
    fn compared(&self) -> impl Iterator<Item = Scenario> + '_ {
        self.scenarios.iter().copied()
    }

    /// The scenarios that go through sluice.
    fn proxied(&self) -> Vec<Scenario> {
        self.scenarios.iter().copied().filter(|s| !s.is_baseline()).collect()
    }
}

/// `<workspace>/target` (or `$CARGO_TARGET_DIR`): where this xtask binary was built.
pub(crate) fn target_dir() -> Result<PathBuf> {
    Ok(sluice_tests::bins::profile_dir()?.parent().context("target directory")?.to_path_buf())
}

fn profile_name() -> Result<&'static str> {
    let dir = sluice_tests::bins::profile_dir()?;
    Ok(if dir.file_name().is_some_and(|n| n == "release") { "release" } else { "debug" })
}

/// Everything measured, per section; turned into the report by `report`.
#[derive(Default)]
pub struct Results {
    pub meta: Value,
    /// (label, rps or None for saturation, runs per scenario)
    pub levels: Vec<(String, Option<u32>, BTreeMap<Scenario, Vec<Run>>)>,
    /// ("same node" | "across nodes", runs per scenario)
    pub bulk: Vec<(String, BTreeMap<Scenario, Vec<Run>>)>,
    pub churn: BTreeMap<Scenario, Vec<Run>>,
    pub rss_rest_kib: Option<u64>,
    pub idle: Option<Value>,
    pub instructions: Option<Value>,
    pub micro: Option<Value>,
    /// The `scrape` section: per request rate, the off/on pairs per scenario.
    pub scrape: Vec<scrape::Level>,
    /// What the report should say was left out, and why.
    pub notes: Vec<String>,
    pub errors: Vec<(String, String)>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.smoke {
        return smoke();
    }
    let cfg = Config::from_args(&args)?;
    let started = Instant::now();
    if cfg.build {
        crate::build(true)?;
    }
    let r = run_config(&cfg);
    eprintln!("bench: finished in {:.0} s", started.elapsed().as_secs_f64());
    r
}

/// `cargo xtask bench --quick`-like check that the harness works end to end (about 20 s):
/// fails only if the harness breaks, never on a figure.
pub fn smoke() -> Result<()> {
    let cfg = Config::smoke()?;
    run_config(&cfg)
}

fn run_config(cfg: &Config) -> Result<()> {
    let bins = Bins::locate(cfg.profile)?;
    set_capabilities(bins.sluice_takes_ca_dir(), bins.sluice_has_l7());
    let mut cfg = cfg.clone();
    cfg.resolve_scenarios()?;
    let cfg = &cfg;
    if cfg.has(Section::Bulk) || cfg.has(Section::Instructions) {
        let mut pkgs = Vec::new();
        if cfg.has(Section::Bulk) {
            pkgs.push("iperf3");
        }
        if cfg.has(Section::Instructions) {
            pkgs.push("valgrind");
        }
        crate::setup::ensure_apt_packages(&pkgs)?;
    }
    for s in &cfg.unavailable {
        eprintln!(
            "bench: scenario {} is not available yet ({})",
            s.name(),
            s.not_available().unwrap_or_default()
        );
    }
    raise_nofile();
    fs::create_dir_all(&cfg.out_dir).with_context(|| format!("creating {}", cfg.out_dir.display()))?;
    let started = Instant::now();
    let mut res = Results { meta: report::meta(cfg, &bins), ..Results::default() };

    // The scrape section needs sluice's metrics endpoint; without it, it is skipped with a note.
    let scrape = cfg.has(Section::Scrape) && bins.sluice_has_metrics();
    if cfg.has(Section::Scrape) && !scrape {
        let note =
            "scrape: skipped, this sluice has no metrics endpoint (`sluice run` takes no --metrics-addr)";
        eprintln!("bench: {note}");
        res.notes.push(note.to_string());
    }
    let needs_world =
        cfg.sections.iter().any(|s| !matches!(s, Section::Micro) && (*s != Section::Scrape || scrape));
    if needs_world {
        let opts = world::WorldOpts {
            cross_node: cfg.has(Section::Bulk) || cfg.scenarios.iter().any(|s| s.via_tunnel()),
            iperf: cfg.has(Section::Bulk),
            grpc: cfg.scenarios.contains(&Scenario::Grpc),
        };
        eprintln!(
            "bench: building the simulated cluster ({})",
            if opts.cross_node { "2 nodes" } else { "1 node" }
        );
        let mut world = World::build(&bins, opts)?;
        // Let the enrollment settle before the at-rest figure.
        std::thread::sleep(Duration::from_secs(1));
        res.rss_rest_kib = measure::rss_kib(world.sluice.pid()).ok();
        if cfg.has(Section::Latency) {
            section(&mut res, "latency", |res| latency(cfg, &world, res));
            check_world(&world)?;
        }
        if scrape {
            section(&mut res, "scrape", |res| scrape::run(cfg, &world, res));
            check_world(&world)?;
        }
        if cfg.has(Section::Bulk) {
            section(&mut res, "bulk", |res| bulk(cfg, &world, res));
            check_world(&world)?;
        }
        if cfg.has(Section::Churn) {
            section(&mut res, "churn", |res| churn(cfg, &world, res));
            check_world(&world)?;
        }
        if cfg.has(Section::Idle) {
            section(&mut res, "idle", |res| {
                res.idle = Some(idle(cfg, &world)?);
                Ok(())
            });
            check_world(&world)?;
        }
        if cfg.has(Section::Instructions) {
            section(&mut res, "instructions", |res| {
                eprintln!("bench: instructions per request under callgrind (N = {})", cfg.instr_n);
                let p = callgrind::Params {
                    n: cfg.instr_n,
                    interval_us: 10_000,
                    repeats: if cfg.quick { 1 } else { 2 },
                    out_dir: cfg.out_dir.clone(),
                };
                let (figures, failed) = callgrind::measure(&mut world, &cfg.scenarios, &p)?;
                res.instructions = Some(figures);
                res.errors.extend(failed);
                Ok(())
            });
        }
        if let Err(e) = world.teardown() {
            res.errors.push(("teardown".into(), format!("{e:#}")));
        }
    }
    if cfg.has(Section::Micro) {
        section(&mut res, "micro", |res| {
            eprintln!("bench: criterion micro-benchmarks");
            res.micro = Some(micro::run(&cfg.out_dir, cfg.quick)?);
            Ok(())
        });
    }
    res.meta["wall_s"] = json!(started.elapsed().as_secs_f64().round());
    let md = report::write(cfg, &res)?;
    println!("{md}");
    eprintln!("bench: results in {}", cfg.out_dir.display());
    if !res.errors.is_empty() {
        let list: Vec<String> = res.errors.iter().map(|(s, e)| format!("{s}: {e}")).collect();
        bail!("benchmark section(s) failed:\n  {}", list.join("\n  "));
    }
    Ok(())
}

/// Stops the run when the simulated cluster is gone or sluice died: nothing after would be
/// meaningful.
fn check_world(world: &World) -> Result<()> {
    if !std::path::Path::new("/run/netns").join(world.n1.netns()).exists() {
        bail!(
            "the simulated cluster {} was torn down from outside the benchmark (by `cargo xtask sweep --all`, or by hand)",
            world.sim.id()
        );
    }
    for (node, s) in [("n1", Some(&world.sluice)), ("n2", world.sluice2.as_ref())] {
        let Some(s) = s else { continue };
        if !s.is_running() {
            bail!(
                "sluice on {node} exited ({:?}); its log:\n{}",
                s.exit_status(),
                sluice_tests::tail_file(&s.log_path(), 30)
            );
        }
    }
    Ok(())
}

/// Runs one section; a failure is recorded (and reported at the end) so the other sections
/// still run and the report shows what was measured.
fn section(res: &mut Results, name: &str, f: impl FnOnce(&mut Results) -> Result<()>) {
    let t0 = Instant::now();
    if let Err(e) = f(res) {
        eprintln!("bench: section {name} failed: {e:#}");
        res.errors.push((name.to_string(), format!("{e:#}")));
    }
    eprintln!("bench: section {name}: {:.0} s", t0.elapsed().as_secs_f64());
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

/// Runs one measurement of one scenario; a failure is recorded under `what` and the section
/// goes on with the other scenarios (the report shows what was measured).
fn attempt(res: &mut Results, what: String, f: impl FnOnce() -> Result<Run>) -> Option<Run> {
    match f() {
        Ok(run) => Some(run),
        Err(e) => {
            eprintln!("bench: {what} failed: {e:#}");
            res.errors.push((what, format!("{e:#}")));
            None
        }
    }
}

fn latency(cfg: &Config, world: &World, res: &mut Results) -> Result<()> {
    let secs = (cfg.warmup + cfg.rate_duration).as_secs_f64();
    for &rps in &cfg.rate_levels {
        let mut runs: BTreeMap<Scenario, Vec<Run>> = BTreeMap::new();
        for round in 0..cfg.rounds {
            for s in cfg.compared() {
                eprintln!(
                    "bench: {rps} rps, {} connections, {} round {}/{}",
                    cfg.connections,
                    s.name(),
                    round + 1,
                    cfg.rounds
                );
                let extra = vec![
                    "--rps".into(),
                    rps.to_string(),
                    "--connections".into(),
                    cfg.connections.to_string(),
                    "--duration-ms".into(),
                    ms(cfg.rate_duration),
                    "--warmup-ms".into(),
                    ms(cfg.warmup),
                ];
                let what = format!("latency {rps} rps {} round {}", s.name(), round + 1);
                if let Some(run) = attempt(res, what, || {
                    measure::slload(world, world.route(s)?, round, "rate", &extra, secs)
                }) {
                    runs.entry(s).or_default().push(run);
                }
            }
        }
        res.levels.push((format!("{rps} rps"), Some(rps), runs));
    }
    let mut runs: BTreeMap<Scenario, Vec<Run>> = BTreeMap::new();
    for round in 0..cfg.rounds {
        for s in cfg.compared() {
            eprintln!(
                "bench: saturation, {} connections, {} round {}/{}",
                cfg.max_connections,
                s.name(),
                round + 1,
                cfg.rounds
            );
            let extra = vec![
                "--connections".into(),
                cfg.max_connections.to_string(),
                "--duration-ms".into(),
                ms(cfg.max_duration),
                "--warmup-ms".into(),
                ms(cfg.warmup),
            ];
            let secs = (cfg.warmup + cfg.max_duration).as_secs_f64();
            let what = format!("saturation {} round {}", s.name(), round + 1);
            if let Some(run) =
                attempt(res, what, || measure::slload(world, world.route(s)?, round, "max", &extra, secs))
            {
                runs.entry(s).or_default().push(run);
            }
        }
    }
    res.levels.push((format!("saturation ({} conns)", cfg.max_connections), None, runs));
    Ok(())
}

/// iperf3 (opaque TCP: every iperf port is `appProtocol: tcp`): direct and `l4` on the same
/// node; direct, `l4` and the tunnel across nodes. The tunnel's row is `mtls-l4` (or `mtls`
/// when only that one runs: the same opaque path for iperf3).
fn bulk(cfg: &Config, world: &World, res: &mut Results) -> Result<()> {
    let places: Vec<(&str, Vec<&world::Route>, bool)> = {
        let mut v =
            vec![("same node", vec![world.route(Scenario::Direct)?, world.route(Scenario::L4)?], false)];
        if let (Some(d), Some(l)) = (&world.direct_x, &world.l4_x) {
            let mut routes = vec![d, l];
            let tunnel = [Scenario::MtlsL4, Scenario::Mtls].into_iter().find(|s| cfg.scenarios.contains(s));
            if let Some(t) = tunnel {
                routes.push(world.route(t)?);
            }
            v.push(("across nodes", routes, true));
        }
        v
    };
    for (label, routes, cross) in places {
        let mut runs: BTreeMap<Scenario, Vec<Run>> = BTreeMap::new();
        for round in 0..cfg.rounds {
            for route in routes.iter().copied() {
                eprintln!(
                    "bench: iperf3 {label}, {} round {}/{}",
                    route.scenario.name(),
                    round + 1,
                    cfg.rounds
                );
                let what = format!("bulk {label} {} round {}", route.scenario.name(), round + 1);
                if let Some(run) =
                    attempt(res, what, || measure::iperf(world, route, round, cfg.bulk_seconds, cross))
                {
                    runs.entry(route.scenario).or_default().push(run);
                }
            }
        }
        res.bulk.push((label.to_string(), runs));
    }
    Ok(())
}

/// New connections per second, HTTP/1.1 scenarios only (slload has no gRPC churn mode: a
/// gRPC client keeps its connection).
fn churn(cfg: &Config, world: &World, res: &mut Results) -> Result<()> {
    for round in 0..cfg.rounds {
        for s in cfg.compared().filter(|s| s.proto() == "http") {
            eprintln!(
                "bench: churn, {} at a time, {} round {}/{}",
                cfg.churn_connections,
                s.name(),
                round + 1,
                cfg.rounds
            );
            let extra = vec![
                "--connections".into(),
                cfg.churn_connections.to_string(),
                "--duration-ms".into(),
                ms(cfg.churn_duration),
                "--warmup-ms".into(),
                ms(cfg.warmup),
            ];
            let secs = (cfg.warmup + cfg.churn_duration).as_secs_f64();
            let what = format!("churn {} round {}", s.name(), round + 1);
            if let Some(run) =
                attempt(res, what, || measure::slload(world, world.route(s)?, round, "churn", &extra, secs))
            {
                res.churn.entry(s).or_default().push(run);
            }
        }
    }
    Ok(())
}

/// sluice's RSS with N idle connections open through it (the `l4` path: opaque, one upstream
/// connection per client connection).
fn idle(cfg: &Config, world: &World) -> Result<Value> {
    let l4 = world.route(Scenario::L4)?;
    let pid = world.sluice.pid();
    // sluice holds two descriptors per proxied connection. Without CAP_SYS_RESOURCE (as in
    // some sandboxes) the hard RLIMIT_NOFILE cannot be raised, so hold as many as fit.
    let limit = nofile_limit(pid).unwrap_or(u64::MAX);
    let used = fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    let fit = (limit.saturating_sub(used + 100) / 2) as usize;
    let n = cfg.idle_connections.min(fit);
    if n < cfg.idle_connections {
        eprintln!(
            "bench: sluice's RLIMIT_NOFILE is {limit} (the hard limit could not be raised): holding {n} instead of {} idle connections, and extrapolating",
            cfg.idle_connections
        );
    }
    if n == 0 {
        bail!("sluice's RLIMIT_NOFILE ({limit}) leaves no room for idle connections");
    }
    eprintln!("bench: {n} idle connections through sluice");
    let before = measure::rss_kib(pid)?;
    let open_before = world.sluice.get_json("/status")?["connections_open"].as_u64().unwrap_or(0);
    let mut hold = l4.client.spawn([
        world.slload().to_string_lossy().as_ref(),
        "hold",
        "--to",
        &l4.addr.to_string(),
        "--count",
        &n.to_string(),
        "--timeout-ms",
        "5000",
    ])?;
    let held = hold.wait_for_json(Duration::from_secs(300), |v| v["event"] == "held")?;
    l4.check_path(held["locals"][0].as_str())?;
    if held["count"].as_u64() != Some(n as u64) {
        bail!("only {} of {n} connections could be opened through sluice: {held}", held["count"]);
    }
    // Let sluice settle (tasks parked, buffers released) before reading.
    std::thread::sleep(Duration::from_secs(2));
    let with = measure::rss_kib(pid)?;
    let open = world.sluice.get_json("/status")?["connections_open"].as_u64().unwrap_or(0);
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    hold.close_stdin();
    hold.wait(Duration::from_secs(60))?;
    // Connections close asynchronously in sluice.
    let _ = world.sluice.wait_for(
        "/status",
        |v| v["connections_open"].as_u64().is_some_and(|o| o <= open_before),
        Duration::from_secs(30),
    );
    std::thread::sleep(Duration::from_secs(1));
    let after = measure::rss_kib(pid)?;
    Ok(json!({
        "connections": n,
        "open_in_sluice": open,
        "sluice_fds": fds,
        "rss_before_kib": before,
        "rss_with_idle_kib": with,
        "rss_after_close_kib": after,
        "kib_per_connection": ((with as f64 - before as f64) / n as f64 * 100.0).round() / 100.0,
        "wanted": cfg.idle_connections,
        "nofile_limit": if limit == u64::MAX { None } else { Some(limit) },
        "rss_at_wanted_kib": (before as f64 + (with as f64 - before as f64) / n as f64 * cfg.idle_connections as f64).round(),
        "open_ms": held["elapsed_ms"],
    }))
}

/// The soft RLIMIT_NOFILE of a process (`/proc/<pid>/limits`).
fn nofile_limit(pid: u32) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Raises this process's RLIMIT_NOFILE (soft and hard) so that the processes it starts can
/// hold 10 000 connections (sluice needs two descriptors per proxied connection).
fn raise_nofile() {
    let want: libc::rlim_t = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a pointer to our own struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            let new = libc::rlimit { rlim_cur: want, rlim_max: want.max(lim.rlim_max) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
                // Without CAP_SYS_RESOURCE: at least up to the hard limit.
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}
