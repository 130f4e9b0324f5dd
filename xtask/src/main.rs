//! `cargo xtask …`: the project's tasks. The README's two commands are `cargo xtask demo` and
//! `cargo xtask test`; both run `setup` first, which installs whatever is missing. `cargo xtask
//! sim up DIR` builds a playground from the user's own manifests.

mod bench;
mod demo;
mod failures;
mod setup;
mod sim;

use std::process::Command;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what sluice needs (apt packages, nightly rust-src, bpf-linker, cargo-nextest).
    Setup,
    /// Build sluice (debug by default) including its eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the whole test suite: unit tests and the end-to-end suites in the node simulator.
    Test {
        /// Extra arguments for cargo nextest (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Start a simulated node, send traffic through sluice and show what the CLI says.
    Demo {
        /// Leave the simulated node and sluice running to explore (as playground "demo").
        #[arg(long)]
        keep: bool,
    },
    /// The playground: a simulated cluster from your own manifests (`sim up DIR`, `sim down`).
    Sim {
        #[command(subcommand)]
        cmd: sim::SimCmd,
    },
    /// Remove the leftovers of simulators whose owner process is gone (namespaces, cgroups,
    /// pins, processes); live ones and playgrounds stay.
    Sweep {
        /// Remove every simulator, live ones and playgrounds included (only when nobody else
        /// uses this machine's simulators).
        #[arg(long)]
        all: bool,
    },
    /// Benchmarks against a direct connection (release builds); see docs/benchmarks.md.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Build { release } => setup::run().and_then(|_| build(release)),
        Task::Test { args } => setup::run().and_then(|_| test(&args)),
        Task::Demo { keep } => setup::run().and_then(|_| build(false)).and_then(|_| demo::run(keep)),
        Task::Sim { cmd } => match cmd {
            // Only `up` needs the binaries; the other commands work on what runs.
            sim::SimCmd::Up { .. } => setup::run().and_then(|_| build(false)).and_then(|_| sim::run(cmd)),
            other => sim::run(other),
        },
        Task::Bench(args) => setup::run().and_then(|_| bench::run(args)),
        Task::Sweep { all: false } => {
            report_sweep("sweep", None);
            Ok(())
        }
        Task::Sweep { all: true } => {
            for f in sluice_tests::sweep_all() {
                eprintln!("xtask: removed {f}");
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "sluice", "--package", "sluice-tests", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    setup::run_cmd(&mut cmd, "cargo build")
}

fn test(extra: &[String]) -> Result<()> {
    build(false)?;
    // Leftovers of earlier, killed runs (their owners are gone) would confuse the leak check.
    // Other runs' live simulators and playgrounds are left alone.
    report_sweep("before the suite", None);
    // nextest writes its reports under cargo's target directory, the one xtask was built in.
    let junit = bench::target_dir()?.join("nextest/default/junit.xml");
    let _ = std::fs::remove_file(&junit);
    // Every sim the suite makes records this run, so that afterwards its own leaks are told
    // apart from another run's leftovers.
    let me = sluice_tests::registry::OwnerProcess::current()?;
    let run = format!("xtask-test-{}-{}", me.pid, me.start_ticks);
    let mut cmd = cargo();
    cmd.env(sluice_tests::registry::RUN_ENV, &run);
    cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]).args(extra);
    // A failure should show its message, not pages of frames (CI logs keep the head and the
    // tail); SLUICE_TEST_BACKTRACE=1 brings backtraces back.
    if std::env::var_os("SLUICE_TEST_BACKTRACE").is_none() {
        cmd.env("RUST_BACKTRACE", "0").env("RUST_LIB_BACKTRACE", "0");
    }
    let status = cmd.status()?;
    // Every test tears its simulator down; this check proves it (and cleans up if not).
    let leaked = report_sweep("after the suite", Some(&run));
    if !status.success() {
        let failed = failures::read(&junit);
        for f in &failed {
            eprintln!("xtask: FAILED {}", f.test);
            for line in &f.message {
                eprintln!("xtask:     {line}");
            }
        }
        bail!("{} test(s) failed ({status}); each one's whole output is above", failed.len());
    }
    if leaked > 0 {
        bail!("the suite left {leaked} simulator object(s) behind (listed above); a test does not clean up");
    }
    Ok(())
}

/// Removes the simulators whose owner is gone and says what they were; says which ones it left
/// (live or playgrounds) and why. Returns how many objects belonged to sims of test run `run`
/// (this suite's own leaks).
fn report_sweep(when: &str, run: Option<&str>) -> usize {
    let summary = sluice_tests::sweep();
    let mut own = 0;
    for s in &summary.removed {
        let ours = match (&s.disposition, run) {
            (sluice_tests::registry::Disposition::Abandoned { marker }, Some(run)) => marker.run.as_deref() == Some(run),
            _ => false,
        };
        let whose = if ours { "left by this suite" } else { "abandoned" };
        eprintln!("xtask: {when}: removed sim {} ({whose}; {})", s.id, s.disposition.describe());
        for o in &s.objects {
            eprintln!("xtask:     {o}");
        }
        if ours {
            own += s.objects.len().max(1);
        }
    }
    for s in &summary.kept {
        eprintln!("xtask: {when}: left sim {} alone: {}", s.id, s.disposition.describe());
    }
    own
}
