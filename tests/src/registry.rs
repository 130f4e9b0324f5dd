//! Who owns each simulator, so that a sweep removes only what is provably abandoned.
//!
//! Every sim claims its id by publishing a marker, `/run/sluice-sim/<id>.json`, *before* it
//! creates any kernel object, and its teardown removes the marker *after* the last object is
//! gone. The marker says what kind of sim it is and which process owns it:
//!
//! - a **test** sim (the default: a test, the demo, a benchmark) belongs to the process that
//!   made it, named by pid *and* start time (so a recycled pid is never mistaken for the owner).
//!   While that process lives the sim is live; once it is gone the sim is abandoned and any sweep
//!   may remove it.
//! - a **playground** (`cargo xtask sim up`, `cargo xtask demo --keep`) outlives its maker on
//!   purpose: no sweep removes it, only `cargo xtask sim down NAME`, also when `sim up` crashed
//!   half-way (the marker is there from the start). Its name is claimed atomically too
//!   (`/run/sluice-sim/name-<name>`), so two playgrounds never share one.
//!
//! A test sim also records the run it belongs to (`$SLUICE_SIM_RUN`, which `cargo xtask test`
//! sets for the suite), so the check after a suite can tell a leak of its own from a leftover of
//! someone else's crashed run.
//!
//! `/run` is a tmpfs: markers vanish at reboot, as the namespaces, cgroups and pins they describe
//! do. A sim without a marker was made by an older build; it is never called abandoned (nothing
//! proves it is), only `cargo xtask sweep --all` removes it.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::{hex, is_sim_id, random_bytes};

/// Where markers live (a tmpfs: nothing survives a reboot, like the objects they describe).
pub const REGISTRY_DIR: &str = "/run/sluice-sim";

/// Environment variable naming the test run a sim belongs to (`cargo xtask test` sets it).
pub const RUN_ENV: &str = "SLUICE_SIM_RUN";

/// What a sim is for, which decides who may remove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SimKind {
    /// Lives as long as its owner process; abandoned once the owner is gone.
    Test,
    /// Kept on purpose until `cargo xtask sim down NAME`.
    Playground { name: String },
}

/// The process that made a sim: pid plus its start time in clock ticks since boot
/// (`/proc/<pid>/stat` field 22), which together name one process for the machine's uptime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerProcess {
    pub pid: u32,
    pub start_ticks: u64,
    /// Its command line when the marker was written (for people reading `sim list`).
    pub command: String,
}

impl OwnerProcess {
    /// This process.
    pub fn current() -> Result<OwnerProcess> {
        let pid = std::process::id();
        let start_ticks =
            start_ticks(pid).with_context(|| format!("reading the start time of this process ({pid})"))?;
        let command = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        Ok(OwnerProcess { pid, start_ticks, command })
    }

    /// Whether this very process still runs (same pid, same start time, not a zombie).
    pub fn is_alive(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks) && !crate::netns::is_zombie(self.pid as i32)
    }
}

/// `/proc/<pid>/stat` field 22 (starttime). The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")" come field 3 (state) onwards: starttime is field 22, the 20th of those.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// One sim's marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub id: String,
    #[serde(flatten)]
    pub kind: SimKind,
    pub owner: OwnerProcess,
    /// `$SLUICE_SIM_RUN` of the owner, if set.
    #[serde(default)]
    pub run: Option<String>,
    /// The sim's temp dir (manifests, logs, sockets).
    pub temp_dir: PathBuf,
    pub created_unix_s: u64,
}

impl Marker {
    /// A marker for a new sim owned by this process.
    pub fn new(id: &str, kind: SimKind, temp_dir: &Path) -> Result<Marker> {
        Ok(Marker {
            id: id.to_string(),
            kind,
            owner: OwnerProcess::current()?,
            run: std::env::var(RUN_ENV).ok().filter(|r| !r.is_empty()),
            temp_dir: temp_dir.to_path_buf(),
            created_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        })
    }

    pub fn playground_name(&self) -> Option<&str> {
        match &self.kind {
            SimKind::Playground { name } => Some(name),
            SimKind::Test => None,
        }
    }
}

/// What a sweep may do with a sim, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Its owner process runs: hands off.
    Live { owner: OwnerProcess },
    /// Kept on purpose: only `sim down` removes it.
    Playground { name: String },
    /// Its owner is gone: any sweep may remove it.
    Abandoned { marker: Box<Marker> },
    /// No marker (an older build made it, or it is being created by one): not provably
    /// abandoned; only `sweep --all` removes it.
    Unmarked,
}

impl Disposition {
    pub fn describe(&self) -> String {
        match self {
            Disposition::Live { owner } => {
                format!("live: owner process {} runs ({})", owner.pid, owner.command)
            }
            Disposition::Playground { name } => {
                format!("playground {name:?} (remove it with `cargo xtask sim down {name}`)")
            }
            Disposition::Abandoned { marker } => format!(
                "abandoned: owner process {} ({}) is gone{}",
                marker.owner.pid,
                marker.owner.command,
                marker.run.as_deref().map(|r| format!(", run {r}")).unwrap_or_default()
            ),
            Disposition::Unmarked => {
                "no owner marker (made by an older build?): `cargo xtask sweep --all` removes it".into()
            }
        }
    }
}

fn dir() -> PathBuf {
    PathBuf::from(REGISTRY_DIR)
}

fn marker_path(id: &str) -> PathBuf {
    dir().join(format!("{id}.json"))
}

fn name_path(name: &str) -> PathBuf {
    dir().join(format!("name-{name}"))
}

/// Publishes `marker` for its id, atomically and exclusively: the complete file appears at once
/// (written aside, then hard-linked into place, which fails if the name exists). Returns
/// `Ok(false)` when the id is already claimed.
pub fn claim(marker: &Marker) -> Result<bool> {
    let d = dir();
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let tmp = d.join(format!(".{}.{}.tmp", marker.id, hex(&random_bytes(4)?)));
    write_file(&tmp, marker)?;
    let res = fs::hard_link(&tmp, marker_path(&marker.id));
    let _ = fs::remove_file(&tmp);
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("publishing {}", marker_path(&marker.id).display())),
    }
}

/// Replaces the marker of `marker.id` (same id, e.g. a sim that becomes a playground).
pub fn update(marker: &Marker) -> Result<()> {
    let d = dir();
    let tmp = d.join(format!(".{}.{}.tmp", marker.id, hex(&random_bytes(4)?)));
    write_file(&tmp, marker)?;
    fs::rename(&tmp, marker_path(&marker.id))
        .with_context(|| format!("replacing {}", marker_path(&marker.id).display()))
}

fn write_file(path: &Path, marker: &Marker) -> Result<()> {
    let text = serde_json::to_string_pretty(marker).context("encoding the sim marker")?;
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The marker of sim `id`, if it has a readable one.
pub fn read(id: &str) -> Option<Marker> {
    let text = fs::read_to_string(marker_path(id)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Every readable marker, by id.
pub fn all() -> Vec<Marker> {
    let Ok(rd) = fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut out: Vec<Marker> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
        .filter(|id| is_sim_id(id))
        .filter_map(|id| read(&id))
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Removes the marker of `id` (and its playground name claim). A missing one is fine.
pub fn remove(id: &str) {
    if let Some(name) = read(id).and_then(|m| m.playground_name().map(str::to_string)) {
        if fs::read_to_string(name_path(&name)).is_ok_and(|owner| owner.trim() == id) {
            let _ = fs::remove_file(name_path(&name));
        }
    }
    let _ = fs::remove_file(marker_path(id));
}

/// What a sweep may do with sim `id`.
pub fn disposition(id: &str) -> Disposition {
    match read(id) {
        None => Disposition::Unmarked,
        Some(m) => match &m.kind {
            SimKind::Playground { name } => Disposition::Playground { name: name.clone() },
            SimKind::Test if m.owner.is_alive() => Disposition::Live { owner: m.owner.clone() },
            SimKind::Test => Disposition::Abandoned { marker: Box::new(m) },
        },
    }
}

/// A playground name: what `sim up --name` and `sim down NAME` take.
pub fn check_playground_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("bad playground name {name:?}: use 1-40 of [a-z0-9-], not starting or ending with '-'");
    }
    Ok(())
}

/// Claims playground name `name` for sim `id`; fails if another playground holds it.
pub fn claim_name(name: &str, id: &str) -> Result<()> {
    check_playground_name(name)?;
    let d = dir();
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let path = name_path(name);
    let tmp = d.join(format!(".name-{name}.{}.tmp", hex(&random_bytes(4)?)));
    fs::write(&tmp, format!("{id}\n")).with_context(|| format!("writing {}", tmp.display()))?;
    let res = fs::hard_link(&tmp, &path);
    let _ = fs::remove_file(&tmp);
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "a playground named {name:?} exists already (sim {}): remove it with `cargo xtask sim down {name}`, or choose another --name",
                holder.trim()
            )
        }
        Err(e) => Err(e).with_context(|| format!("claiming {}", path.display())),
    }
}

/// The sim id holding playground name `name`, if any.
pub fn playground_id(name: &str) -> Option<String> {
    let id = fs::read_to_string(name_path(name)).ok()?.trim().to_string();
    is_sim_id(&id).then_some(id)
}

/// Playground names whose claim points at no marker any more (a `sim up` that crashed between
/// the two writes, or a marker removed by hand): such names are free again.
pub fn release_stale_name(name: &str) {
    if let Some(id) = playground_id(name) {
        if read(&id).is_none() {
            let _ = fs::remove_file(name_path(name));
        }
    } else if name_path(name).exists() {
        // Unreadable or empty: written by a claim that never finished.
        let _ = fs::remove_file(name_path(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        assert_eq!(parse_start_ticks("garbage"), None);
        let me = OwnerProcess::current().unwrap();
        assert!(me.is_alive());
        let mut other = me.clone();
        other.start_ticks += 1;
        assert!(!other.is_alive(), "a recycled pid is not the owner");
    }

    #[test]
    fn markers_round_trip_with_their_kind() {
        let m = Marker::new("sl00ff00", SimKind::Playground { name: "demo".into() }, Path::new("/tmp/x"))
            .unwrap();
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"kind\":\"playground\""), "{text}");
        assert!(text.contains("\"name\":\"demo\""), "{text}");
        let back: Marker = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        let t = Marker::new("sl00ff01", SimKind::Test, Path::new("/tmp/y")).unwrap();
        let back: Marker = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.kind, SimKind::Test);
    }

    #[test]
    fn playground_names() {
        assert!(check_playground_name("bookinfo").is_ok());
        assert!(check_playground_name("my-app-2").is_ok());
        for bad in ["", "-a", "a-", "Big", "a_b", "a/b", &"x".repeat(41)] {
            assert!(check_playground_name(bad).is_err(), "{bad:?}");
        }
    }
}
