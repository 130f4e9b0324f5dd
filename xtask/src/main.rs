//! `cargo xtask …`: the project's tasks. The README's two commands are `cargo xtask demo` and
//! `cargo xtask test`; both run `setup` first, which installs whatever is missing.

mod bench;
mod demo;
mod failures;
mod setup;

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
        /// Leave the simulated node and sluice running to explore.
        #[arg(long)]
        keep: bool,
    },
    /// Remove every leftover of simulated nodes (namespaces, cgroups, pins, processes).
    Sweep,
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
        Task::Bench(args) => setup::run().and_then(|_| bench::run(args)),
        Task::Sweep => {
            report_sweep("sweep");
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
    // Leftovers from an earlier, killed run would make names collide or confuse the leak check.
    report_sweep("before the suite");
    // nextest writes its reports under cargo's target directory, the one xtask was built in.
    let junit = bench::target_dir()?.join("nextest/default/junit.xml");
    let _ = std::fs::remove_file(&junit);
    let mut cmd = cargo();
    cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]).args(extra);
    // A failure should show its message, not pages of frames (CI logs keep the head and the
    // tail); SLUICE_TEST_BACKTRACE=1 brings backtraces back.
    if std::env::var_os("SLUICE_TEST_BACKTRACE").is_none() {
        cmd.env("RUST_BACKTRACE", "0").env("RUST_LIB_BACKTRACE", "0");
    }
    let status = cmd.status()?;
    // Every test tears its simulator down; this check proves it (and cleans up if not).
    let leaked = report_sweep("after the suite");
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

/// Removes simulator leftovers and says what they were. Returns how many there were.
fn report_sweep(when: &str) -> usize {
    let found = sluice_tests::sweep();
    for f in &found {
        eprintln!("xtask: leftover {when}: {f}");
    }
    found.len()
}
