//! The PKI of one sim: its mesh root, the other roots and intermediates a test makes, and the
//! trust bundle every node and the CA service read.

use std::{path::PathBuf, sync::Mutex};

use anyhow::{bail, Result};

use crate::{
    pki::{self, CaFiles},
    projected::ProjectedDir,
    SimShared,
};

/// The trust bundle's file name in its volume (the ConfigMap key of `deploy/`).
pub const BUNDLE_FILE: &str = "bundle.pem";

/// Serializes writes of trust bundles (a volume takes one writer at a time).
static BUNDLE_LOCK: Mutex<()> = Mutex::new(());

/// The sim's mesh root, `<sim tmp>/ca` (made with `sluice ca init` on first use): what
/// `--ca-dir` gets with the embedded CA, and the root the default CA intermediate is under.
pub(crate) fn mesh_root(sim: &SimShared) -> Result<CaFiles> {
    let dir = crate::sluice::ensure_mesh_ca(&sim.temp_dir, &crate::sluice_bin()?)?;
    Ok(CaFiles::in_dir(&dir))
}

/// `<sim tmp>/pki/<name>`, for a root or intermediate the test makes.
pub(crate) fn pki_dir(sim: &SimShared, name: &str) -> Result<PathBuf> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        bail!("bad CA name {name:?}: use letters, digits, '-' and '_'");
    }
    Ok(sim.temp_dir.join("pki").join(name))
}

fn bundle_volume(sim: &SimShared) -> Result<ProjectedDir> {
    ProjectedDir::new(sim.temp_dir.join("trust-bundle"))
}

/// `<sim tmp>/trust-bundle/bundle.pem`.
pub(crate) fn trust_bundle_path(sim: &SimShared) -> PathBuf {
    sim.temp_dir.join("trust-bundle").join(BUNDLE_FILE)
}

/// Writes the trust bundle: `roots`' certificates in order.
pub(crate) fn write_trust_bundle(sim: &SimShared, roots: &[&CaFiles]) -> Result<PathBuf> {
    let _g = BUNDLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    write_locked(sim, roots)
}

fn write_locked(sim: &SimShared, roots: &[&CaFiles]) -> Result<PathBuf> {
    if roots.is_empty() {
        bail!("a trust bundle needs at least one root");
    }
    let pem = pki::bundle_pem(roots)?;
    bundle_volume(sim)?.write(&[(BUNDLE_FILE, pem.as_bytes())], 0o644)?;
    Ok(trust_bundle_path(sim))
}

/// The trust bundle's path, written with the mesh root alone if nothing was written yet.
pub(crate) fn ensure_trust_bundle(sim: &SimShared) -> Result<PathBuf> {
    let root = mesh_root(sim)?;
    let _g = BUNDLE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if bundle_volume(sim)?.names()?.is_empty() {
        write_locked(sim, &[&root])?;
    }
    Ok(trust_bundle_path(sim))
}
