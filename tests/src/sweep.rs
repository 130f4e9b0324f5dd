//! Finding and removing what simulators left in the kernel: processes, cgroups, network
//! namespaces, pinned BPF objects and admin-socket directories. Every such object is named after
//! its sim id (`sl` + 6 hex digits), which is how leftovers of crashed or killed runs are
//! recognized.
//!
//! Whose a sim is decides whether a sweep may touch it ([`crate::registry`]): [`sweep`] removes
//! only sims whose owner process is gone (abandoned), never a live one (another test run's) or a
//! playground (`cargo xtask sim up`); [`sweep_all`] removes everything, for when a machine must
//! be cleared by hand.
//!
//! The same code tears down a live [`crate::Sim`] (filtered to its own id), so what `sweep`
//! checks is exactly what teardown removes.

use std::{
    collections::BTreeSet,
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    cgroup, netns,
    registry::{self, Disposition},
    util::{is_sim_id, poll_until, sim_id_of},
};

/// Where sluice puts each node's admin socket by default (`/run/sluice/<node>/admin.sock`); a
/// playground's nodes use it so that `sluice status --node <node>` works.
pub const SLUICE_RUN_DIR: &str = "/run/sluice";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LeftoverKind {
    Process,
    Cgroup,
    Netns,
    BpfPin,
    /// `/run/sluice/<simid>-<node>/`: a node's admin-socket directory.
    RunDir,
}

/// One kernel object that belongs to a simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub sim_id: String,
    pub kind: LeftoverKind,
    /// The pid, cgroup path, netns name or pin path.
    pub name: String,
    pub description: String,
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

/// What a sweep found and what it could not remove.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub found: Vec<Leftover>,
    pub errors: Vec<String>,
}

/// Every simulator object on this machine, from any sim (live ones included). Read-only.
pub fn leftovers() -> Vec<Leftover> {
    scan(&|_| true)
}

/// The objects of one sim. Empty after its teardown.
pub fn leftovers_of(sim_id: &str) -> Vec<Leftover> {
    scan(&|id| id == sim_id)
}

/// Removes everything of every sim (see [`leftovers`]), live ones and playgrounds included, and
/// describes what was found: for clearing a machine by hand (`cargo xtask sweep --all`), never
/// while other people's sims may run. Removal errors are printed to stderr; check [`leftovers`]
/// afterwards to be sure.
pub fn sweep_all() -> Vec<String> {
    let ids = sim_ids();
    let found = sweep_where(|_| true);
    for id in ids {
        registry::remove(&id);
    }
    remove_empty_parents();
    found
}

/// One sim a sweep looked at.
#[derive(Debug, Clone)]
pub struct SimSweep {
    pub id: String,
    /// Why it was removed or left alone.
    pub disposition: Disposition,
    /// Its kernel objects (as found before any removal).
    pub objects: Vec<Leftover>,
}

/// What [`sweep`] did.
#[derive(Debug, Default)]
pub struct SweepSummary {
    /// Abandoned sims, now removed.
    pub removed: Vec<SimSweep>,
    /// Live sims, playgrounds and unmarked sims, left alone.
    pub kept: Vec<SimSweep>,
    pub errors: Vec<String>,
}

/// Removes the sims that are provably abandoned: a test sim whose owner process is gone (see
/// [`crate::registry`]). Live sims (another run's, another engineer's), playgrounds and sims
/// without a marker are left alone and listed in [`SweepSummary::kept`]. This is what `cargo
/// xtask test` runs before and after the suite and what `cargo xtask sweep` runs.
pub fn sweep() -> SweepSummary {
    let summary = sweep_abandoned_where(|_| true);
    if summary.kept.is_empty() {
        remove_empty_parents();
    }
    summary
}

/// [`sweep`] limited to the sims whose id passes `filter` (so a test can check the rule on its
/// own sims while other tests' sims run).
pub fn sweep_abandoned_where(filter: impl Fn(&str) -> bool) -> SweepSummary {
    let mut summary = SweepSummary::default();
    for id in sim_ids().into_iter().filter(|id| filter(id)) {
        let disposition = registry::disposition(&id);
        if let Disposition::Abandoned { .. } = disposition {
            let report = sweep_report(&|s| s == id);
            summary.errors.extend(report.errors.iter().cloned());
            if report.errors.is_empty() {
                registry::remove(&id);
            }
            summary.removed.push(SimSweep { id, disposition, objects: report.found });
        } else {
            let objects = leftovers_of(&id);
            summary.kept.push(SimSweep { id, disposition, objects });
        }
    }
    for e in &summary.errors {
        eprintln!("sluice-sim sweep: {e}");
    }
    summary
}

/// With no sim left, the shared parents are empty: remove them too, so a swept machine looks
/// as it did before any run (rmdir refuses a non-empty directory, so this is safe).
fn remove_empty_parents() {
    if let Ok(parent) = cgroup::sim_cgroup_parent() {
        let _ = fs::remove_dir(parent);
    }
    for mount in bpffs_mounts() {
        let _ = fs::remove_dir(mount.join("sluice"));
    }
}

/// Every sim id with a kernel object or a marker on this machine.
pub fn sim_ids() -> Vec<String> {
    let mut ids: BTreeSet<String> = scan(&|_| true).into_iter().map(|l| l.sim_id).collect();
    ids.extend(registry::all().into_iter().map(|m| m.id));
    // A cgroup directory under sluice-sim/ that is not a sim id is swept with everything by
    // sweep_all, but no single-sim sweep names it.
    ids.into_iter().filter(|id| is_sim_id(id)).collect()
}

/// Removes everything of the sims whose id passes `filter`, whoever owns them, and their
/// markers (so a test can sweep its own deliberately leaked sim while other tests' sims keep
/// running; `cargo xtask sim down` removes a playground with it).
pub fn sweep_where(filter: impl Fn(&str) -> bool) -> Vec<String> {
    let ids: Vec<String> = sim_ids().into_iter().filter(|id| filter(id)).collect();
    let report = sweep_report(&filter);
    for e in &report.errors {
        eprintln!("sluice-sim sweep: {e}");
    }
    if report.errors.is_empty() {
        for id in ids {
            registry::remove(&id);
        }
    }
    report.found.iter().map(|l| l.description.clone()).collect()
}

/// Scans, then removes: kill processes (cgroup.kill, plus SIGKILL for any process found only
/// through its netns), wait for them to die, rmdir cgroups deepest first, delete the netns
/// pins, remove BPF pin directories.
pub fn sweep_report(filter: &dyn Fn(&str) -> bool) -> SweepReport {
    let found = scan(filter);
    let mut errors = Vec::new();
    let sim_cgroups: Vec<PathBuf> = sim_cgroup_dirs(filter)
        .into_iter()
        .map(|(_, p)| p)
        .collect();

    // Kill first, everywhere, before waiting anywhere: processes of one sim may talk to
    // another's, and cgroup.kill is asynchronous anyway.
    for cg in &sim_cgroups {
        let kill = cg.join("cgroup.kill");
        if kill.exists() {
            if let Err(e) = fs::write(&kill, "1") {
                errors.push(format!("writing {}: {e}", kill.display()));
            }
        }
    }
    let netns_pids: Vec<i32> = found
        .iter()
        .filter(|l| l.kind == LeftoverKind::Process)
        .filter_map(|l| l.name.parse().ok())
        .collect();
    for &pid in &netns_pids {
        // SAFETY: plain syscall; the pid may already be gone (ESRCH).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for cg in &sim_cgroups {
        if let Err(e) = cgroup::kill_tree(cg, Duration::from_secs(10)) {
            errors.push(format!("{e:#}"));
        }
    }
    let alive = poll_until(Duration::from_secs(10), || {
        let alive: Vec<i32> = netns_pids
            .iter()
            .copied()
            .filter(|&p| process_alive(p))
            .collect();
        alive.is_empty().then_some(())
    });
    if alive.is_none() {
        errors.push(format!("processes survived SIGKILL: {netns_pids:?}"));
    }

    for cg in &sim_cgroups {
        if let Err(e) = cgroup::remove_tree(cg) {
            errors.push(format!("{e:#}"));
        }
    }
    for l in found.iter().filter(|l| l.kind == LeftoverKind::Netns) {
        if let Err(e) = netns::delete(&l.name) {
            errors.push(format!("deleting netns {}: {e:#}", l.name));
        }
    }
    for l in found.iter().filter(|l| l.kind == LeftoverKind::BpfPin) {
        let p = Path::new(&l.name);
        let res = if p.is_dir() {
            fs::remove_dir_all(p)
        } else {
            fs::remove_file(p)
        };
        if let Err(e) = res {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("removing BPF pin {}: {e}", p.display()));
            }
        }
    }
    for l in found.iter().filter(|l| l.kind == LeftoverKind::RunDir) {
        if let Err(e) = fs::remove_dir_all(&l.name) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("removing {}: {e}", l.name));
            }
        }
    }
    SweepReport { found, errors }
}

fn process_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !netns::is_zombie(pid)
}

/// `(sim id, <cg2>/sluice-sim/<id>)` for each sim cgroup directory passing `filter`.
fn sim_cgroup_dirs(filter: &dyn Fn(&str) -> bool) -> Vec<(String, PathBuf)> {
    let Ok(parent) = cgroup::sim_cgroup_parent() else {
        return Vec::new();
    };
    let Ok(rd) = fs::read_dir(&parent) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        // Anything under sluice-sim/ is ours; a name that is not a sim id still gets swept.
        .filter(|(id, _)| filter(id))
        .collect();
    out.sort();
    out
}

/// Mount points of BPF filesystems (pins may be under any of them, usually /sys/fs/bpf).
fn bpffs_mounts() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut v: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "bpf").then(|| PathBuf::from(dir))
        })
        .collect();
    v.dedup();
    v
}

fn cmdline(pid: i32) -> String {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let s: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if s.is_empty() {
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string()
    } else {
        s.join(" ")
    }
}

fn scan(filter: &dyn Fn(&str) -> bool) -> Vec<Leftover> {
    let mut out = Vec::new();
    let mut seen_pids = BTreeSet::new();
    let mut process = |out: &mut Vec<Leftover>, sim_id: &str, pid: i32, place: String| {
        if seen_pids.insert(pid) && process_alive(pid) {
            out.push(Leftover {
                sim_id: sim_id.to_string(),
                kind: LeftoverKind::Process,
                name: pid.to_string(),
                description: format!("process {pid} ({}) {place}", cmdline(pid)),
            });
        }
    };

    for (id, dir) in sim_cgroup_dirs(filter) {
        let dirs = cgroup::dirs_deepest_first(&dir);
        out.push(Leftover {
            sim_id: id.clone(),
            kind: LeftoverKind::Cgroup,
            name: dir.display().to_string(),
            description: format!("cgroup {} ({} directories)", dir.display(), dirs.len()),
        });
        for d in &dirs {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    process(&mut out, &id, pid, format!("in cgroup {}", d.display()));
                }
            }
        }
    }

    let mut names: Vec<String> = netns::list();
    names.sort();
    for name in names {
        let Some(id) = sim_id_of(&name) else { continue };
        if !filter(id) {
            continue;
        }
        out.push(Leftover {
            sim_id: id.to_string(),
            kind: LeftoverKind::Netns,
            name: name.clone(),
            description: format!("network namespace {name}"),
        });
        if let Ok(ino) = netns::inode(&name) {
            for pid in netns::pids_in(ino) {
                process(&mut out, id, pid, format!("in netns {name}"));
            }
        }
    }

    if let Ok(rd) = fs::read_dir(SLUICE_RUN_DIR) {
        let mut dirs: Vec<(String, PathBuf)> = rd
            .flatten()
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .collect();
        dirs.sort();
        for (name, path) in dirs {
            let Some(id) = sim_id_of(&name) else { continue };
            if filter(id) {
                out.push(Leftover {
                    sim_id: id.to_string(),
                    kind: LeftoverKind::RunDir,
                    name: path.display().to_string(),
                    description: format!("admin socket directory {}", path.display()),
                });
            }
        }
    }

    for mnt in bpffs_mounts() {
        let dir = mnt.join("sluice");
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        let mut pins: Vec<(String, PathBuf)> = rd
            .flatten()
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .collect();
        pins.sort();
        for (name, path) in pins {
            let Some(id) = sim_id_of(&name) else { continue };
            if filter(id) {
                out.push(Leftover {
                    sim_id: id.to_string(),
                    kind: LeftoverKind::BpfPin,
                    name: path.display().to_string(),
                    description: format!("pinned BPF objects {}", path.display()),
                });
            }
        }
    }
    out
}
