//! `cargo xtask bench` (being written).
use anyhow::{bail, Result};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A few seconds per scenario instead of the full run.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(_args: BenchArgs) -> Result<()> {
    bail!("benchmarks are not written yet")
}
