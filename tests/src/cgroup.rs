//! cgroup v2 helpers: finding the hierarchy, killing everything in a subtree, removing it.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, Context, Result};

use crate::util::poll_until;

/// Directory under the cgroup-v2 mount that holds one directory per simulator instance.
pub const SIM_CGROUP_DIR: &str = "sluice-sim";

/// Mount point of the cgroup v2 hierarchy, from /proc/mounts. On hybrid hosts (like these
/// machines) it is `/sys/fs/cgroup/unified`, on unified ones `/sys/fs/cgroup`: never assume.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| {
            anyhow!("no cgroup v2 hierarchy mounted (no fstype cgroup2 in /proc/mounts)")
        })
}

/// `<cg2>/sluice-sim`: the parent of every simulator's cgroups.
pub fn sim_cgroup_parent() -> Result<PathBuf> {
    Ok(cgroup2_mount()?.join(SIM_CGROUP_DIR))
}

/// Process ids in `cgroup` and all its descendants. A cgroup that vanished has none.
pub fn pids_in_tree(cgroup: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for dir in dirs_deepest_first(cgroup) {
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids
}

/// `root` and every directory below it, children before parents (the order rmdir needs).
pub fn dirs_deepest_first(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    if root.is_dir() {
        walk(root, &mut out);
    }
    out
}

/// Whether any process lives in the subtree (`populated` in cgroup.events covers descendants).
/// Exited-but-unreaped processes (zombies) do not count, so waiting on this never depends on
/// who reaps them.
pub fn populated(cgroup: &Path) -> bool {
    match fs::read_to_string(cgroup.join("cgroup.events")) {
        Ok(text) => text.lines().any(|l| l.trim() == "populated 1"),
        // No cgroup.events (very old kernel) or the cgroup is gone: fall back to listing.
        Err(_) => !pids_in_tree(cgroup).is_empty(),
    }
}

/// Kills every process in the subtree and waits until it is empty. `cgroup.kill` (Linux 5.14+)
/// kills the whole subtree atomically, so a process that forks meanwhile cannot escape; without
/// it, SIGKILL every listed pid until none is left.
pub fn kill_tree(cgroup: &Path, timeout: Duration) -> Result<()> {
    if !cgroup.is_dir() {
        return Ok(());
    }
    let kill_file = cgroup.join("cgroup.kill");
    let have_kill = kill_file.exists();
    if have_kill {
        fs::write(&kill_file, "1").with_context(|| format!("writing {}", kill_file.display()))?;
    }
    let emptied = poll_until(timeout, || {
        if !have_kill {
            for pid in pids_in_tree(cgroup) {
                // SAFETY: plain syscall; ESRCH (already gone) is fine.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        (!populated(cgroup)).then_some(())
    });
    emptied.ok_or_else(|| {
        anyhow!(
            "processes still alive in {} after {timeout:?}: {:?}",
            cgroup.display(),
            pids_in_tree(cgroup)
        )
    })
}

/// Removes the subtree, deepest first. cgroup directories are removed with rmdir (their
/// interface files go with them); a missing directory is not an error.
pub fn remove_tree(cgroup: &Path) -> Result<()> {
    let mut first_err = None;
    for dir in dirs_deepest_first(cgroup) {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(anyhow!(e).context(format!("rmdir {}", dir.display())));
                }
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Moves process `pid` into `cgroup`.
pub fn move_pid(cgroup: &Path, pid: u32) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, pid.to_string())
        .with_context(|| format!("moving pid {pid} into {}", procs.display()))
}
