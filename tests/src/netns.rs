//! Named network namespaces (`ip netns`), and running code inside one.

use std::{
    fs,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};

use crate::util::run_cmd;

/// Where `ip netns add` pins namespaces (bind mounts of nsfs files).
pub const NETNS_RUN_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Creates a named netns. The first `ip netns add` on a machine turns /run/netns into a shared
/// bind mount of itself; two concurrent first calls (parallel test processes) can race there,
/// so creation is serialized across processes with a flock.
pub fn add(name: &str) -> Result<()> {
    let _lock = FileLock::exclusive(Path::new("/run/sluice-sim-netns.lock"))?;
    run_cmd("ip", &["netns", "add", name], None).map(|_| ())
}

/// Deletes a named netns (unmounts and unlinks its pin). The namespace itself dies when its
/// last user goes: the simulator kills processes first and keeps no fds open on it.
pub fn delete(name: &str) -> Result<()> {
    let path = netns_path(name);
    if !path.exists() {
        return Ok(());
    }
    if let Err(e) = run_cmd("ip", &["netns", "del", name], None) {
        // `ip` refuses in some odd states (e.g. a pin file that is not mounted): do its job.
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        fs::remove_file(&path)
            .map_err(|e2| anyhow!("{e:#}; then removing {}: {e2}", path.display()))?;
    }
    Ok(())
}

/// Names of all pinned network namespaces.
pub fn list() -> Vec<String> {
    fs::read_dir(NETNS_RUN_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The namespace's identity (nsfs inode), as `/proc/<pid>/ns/net` shows it: `net:[<inode>]`.
pub fn inode(name: &str) -> Result<u64> {
    let path = netns_path(name);
    Ok(fs::metadata(&path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// Opens the namespace (for setns). The fd keeps the namespace alive: close it promptly.
pub fn open(name: &str) -> Result<OwnedFd> {
    let path = netns_path(name);
    Ok(fs::File::open(&path)
        .with_context(|| format!("opening netns {}", path.display()))?
        .into())
}

/// Processes (other than this one) whose network namespace has inode `ino`.
pub fn pids_in(ino: u64) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = format!("net:[{ino}]");
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.to_string_lossy() == want)
                // A zombie already left its namespaces; only living processes hold them.
                && !is_zombie(*pid)
        })
        .collect()
}

pub(crate) fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Runs `f` on a fresh thread that has entered netns `name`. A network namespace is a
/// per-thread attribute, so this leaves the rest of the process (other tests) untouched; files
/// under /proc/sys/net opened on that thread belong to that namespace.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let fd = open(name)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into netns {name} (fd {})", fd.as_raw_fd()))?;
            drop(fd);
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread running in netns {name} panicked"))?
    })
}

/// Sets a sysctl under /proc/sys/net inside netns `name`.
pub fn sysctl(name: &str, key: &str, value: &str) -> Result<()> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    run_in(name, || {
        fs::write(&path, value)
            .with_context(|| format!("netns {name}: writing {} = {value}", path.display()))
    })
}

/// An exclusive flock, released when the file closes on drop.
struct FileLock(#[allow(dead_code)] fs::File);

impl FileLock {
    fn exclusive(path: &Path) -> Result<FileLock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // SAFETY: flock on an fd we own; blocks until granted.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("flock {}", path.display()));
        }
        Ok(FileLock(f))
    }
}
