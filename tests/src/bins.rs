//! Locating the binaries the simulator runs: `sluice` (the daemon under test) and `simpod`
//! (the workload helper of this crate).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The cargo output directory of the running executable's profile: `target/debug/deps/x`
/// (a test) and `target/debug/x` (a binary such as xtask) both give `target/debug`.
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the current executable")?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", dir.display()))?;
    }
    Ok(dir.to_path_buf())
}

fn locate(env: &str, name: &str, how_to_build: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => profile_dir()?.join(name),
    };
    if !is_executable(&path) {
        bail!(
            "{name} binary not found at {} (set {env} to its path, or {how_to_build})",
            path.display()
        );
    }
    Ok(path)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The sluice binary: `$SLUICE_BIN`, else `<target>/<profile>/sluice`.
pub fn sluice_bin() -> Result<PathBuf> {
    locate(
        "SLUICE_BIN",
        "sluice",
        "build it with cargo build -p sluice",
    )
}

/// The simpod binary: `$SIMPOD_BIN`, else `<target>/<profile>/simpod` (cargo builds it before
/// running this crate's tests; other users build it with `cargo build -p sluice-tests`).
pub fn simpod_bin() -> Result<PathBuf> {
    locate(
        "SIMPOD_BIN",
        "simpod",
        "build it with cargo build -p sluice-tests --bin simpod",
    )
}
