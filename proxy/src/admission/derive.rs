//! How the node-wide connection cap is chosen: from what the process may hold in descriptors
//! (`RLIMIT_NOFILE`) and in memory (its cgroup's memory limit), the smaller winning, unless a
//! flag sets it lower.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Descriptors kept out of the per-connection budget: at least this many...
const MIN_HEADROOM: u64 = 1024;
/// ...or this share of the limit (1/8), whichever is more.
const HEADROOM_SHARE: u64 = 8;

/// What one proxied connection costs in memory, kernel and user space together, when it is
/// moving data: two sockets with their kernel state and queued bytes, two 16 KiB copy buffers
/// (or the TLS and HTTP/2 state of a tunnel stream), its task and registry entry. Measured in
/// the `isolation_r2` suite (sluice's cgroup `memory.current` per connection, active and
/// idle); rounded up.
pub const CONNECTION_MEMORY: u64 = 64 * 1024;
/// Memory kept out of the per-connection budget: at least this much...
const MIN_MEMORY_RESERVE: u64 = 256 << 20;
/// ...or this share of the limit (1/4), whichever is more. It covers what does not grow with
/// connections: the model, metric series and a scrape's text, certificates, parses, pools'
/// bookkeeping, the runtime.
const MEMORY_RESERVE_SHARE: u64 = 4;
/// A cgroup v1 `memory.limit_in_bytes` at or above this means "no limit" (the kernel reports
/// `PAGE_COUNTER_MAX` pages, about 2^63 bytes).
const V1_UNLIMITED: u64 = 1 << 62;

/// Which resource set the node-wide cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoundBy {
    /// `RLIMIT_NOFILE`: two descriptors per connection, plus headroom.
    Descriptors,
    /// The cgroup's memory limit divided by [`CONNECTION_MEMORY`], minus a reserve.
    Memory,
    /// `--max-connections`, below both.
    Flag,
}

/// How the node-wide cap was derived, for the log and `sluice status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Derivation {
    /// `RLIMIT_NOFILE` in force (after raising the soft limit to the hard one).
    pub nofile: u64,
    /// Descriptors kept for what is not a proxied connection (listeners, maps, logs, admin).
    pub fd_headroom: u64,
    /// Connections the descriptors allow.
    pub fd_cap: u32,
    /// The cgroup's memory limit in bytes (`None`: no limit found).
    pub memory_max: Option<u64>,
    /// Memory kept out of the per-connection budget.
    pub memory_reserve: u64,
    /// What one connection is counted as costing.
    pub connection_memory: u64,
    /// Connections the memory allows (`None`: no limit).
    pub memory_cap: Option<u32>,
    pub bound_by: BoundBy,
}

/// The connections that `nofile` descriptors allow, and the headroom kept.
pub fn fd_cap(nofile: u64) -> (u32, u64) {
    let headroom = MIN_HEADROOM.max(nofile / HEADROOM_SHARE);
    ((nofile.saturating_sub(headroom) / 2).clamp(1, u64::from(u32::MAX)) as u32, headroom)
}

/// The connections that a memory limit of `max` bytes allows, and the reserve kept.
pub fn memory_cap(max: u64) -> (u32, u64) {
    let reserve = MIN_MEMORY_RESERVE.max(max / MEMORY_RESERVE_SHARE);
    ((max.saturating_sub(reserve) / CONNECTION_MEMORY).clamp(1, u64::from(u32::MAX)) as u32, reserve)
}

/// The node-wide cap in connections and how it was reached. `flag` wins when it is lower.
pub fn node_cap(nofile: u64, memory_max: Option<u64>, flag: Option<u32>) -> (u32, Derivation) {
    let (fd, fd_headroom) = fd_cap(nofile);
    let (mem, memory_reserve) = match memory_max {
        Some(max) => {
            let (cap, reserve) = memory_cap(max);
            (Some(cap), reserve)
        }
        None => (None, 0),
    };
    let fits = mem.map_or(fd, |m| m.min(fd));
    let mut bound_by = if mem.is_some_and(|m| m < fd) { BoundBy::Memory } else { BoundBy::Descriptors };
    let cap = match flag {
        Some(n) if n < fits => {
            bound_by = BoundBy::Flag;
            n.max(1)
        }
        _ => fits,
    };
    let d = Derivation {
        nofile,
        fd_headroom,
        fd_cap: fd,
        memory_max,
        memory_reserve,
        connection_memory: CONNECTION_MEMORY,
        memory_cap: mem,
        bound_by,
    };
    (cap, d)
}

/// The memory limit that applies to this process: the smallest `memory.max` of its cgroup v2
/// and the cgroups above it (a parent's limit holds for its children too), or, on a host whose
/// memory controller is on cgroup v1, its v1 `memory.limit_in_bytes`. `None` when there is
/// none (every level says `max`) or it cannot be read.
pub fn own_memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    memory_limit(&cgroups, &mounts, Path::new("/"))
}

/// [`own_memory_limit`] from the text of `/proc/self/cgroup` and `/proc/mounts`, with paths
/// resolved under `root` (a directory standing for `/` in tests).
pub fn memory_limit(proc_cgroup: &str, proc_mounts: &str, root: &Path) -> Option<u64> {
    let mounts: Vec<(&str, &str, &str)> = proc_mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some((dir, fstype, opts))
        })
        .collect();
    let under = |dir: &str, rel: &str| -> PathBuf {
        root.join(dir.trim_start_matches('/')).join(rel.trim_start_matches('/'))
    };
    // cgroup v2: the `0::<path>` line, under the cgroup2 mount.
    let v2 = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).and_then(|rel| {
        let (mount, _, _) = mounts.iter().find(|(_, fstype, _)| *fstype == "cgroup2")?;
        let top = under(mount, "");
        let mut dir = under(mount, rel);
        let mut smallest: Option<u64> = None;
        // Up to the mount itself; the root cgroup has no memory.max, and a parent whose memory
        // controller is off has none either.
        loop {
            if let Ok(text) = std::fs::read_to_string(dir.join("memory.max")) {
                if let Ok(n) = text.trim().parse::<u64>() {
                    smallest = Some(smallest.map_or(n, |s| s.min(n)));
                }
            }
            if dir == top || !dir.pop() || !dir.starts_with(&top) {
                break;
            }
        }
        smallest
    });
    if v2.is_some() {
        return v2;
    }
    // cgroup v1 (hybrid hosts): the `N:memory:<path>` line, under the mount with the memory
    // controller. Its limit already includes the hierarchy's (hierarchical accounting).
    let rel = proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers.split(',').any(|c| c == "memory").then_some(path)
    })?;
    let (mount, _, _) = mounts
        .iter()
        .find(|(_, fstype, opts)| *fstype == "cgroup" && opts.split(',').any(|o| o == "memory"))?;
    let text = std::fs::read_to_string(under(mount, rel).join("memory.limit_in_bytes")).ok()?;
    text.trim().parse::<u64>().ok().filter(|n| *n < V1_UNLIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smaller_of_descriptors_and_memory_wins() {
        // 1 GiB (the DaemonSet's limit) and a container's usual 1 048 576 descriptors: memory
        // decides, 768 MiB at 64 KiB a connection.
        let (cap, d) = node_cap(1 << 20, Some(1 << 30), None);
        assert_eq!(d.bound_by, BoundBy::Memory);
        assert_eq!(cap, ((1u64 << 30) - (256 << 20)) as u32 / CONNECTION_MEMORY as u32);
        assert_eq!(cap, 12_288);
        assert_eq!(d.fd_cap, ((1 << 20) - (1 << 17)) / 2);
        // 20 000 descriptors and 8 GiB: descriptors decide.
        let (cap, d) = node_cap(20_000, Some(8 << 30), None);
        assert_eq!((cap, d.bound_by), (8_750, BoundBy::Descriptors));
        assert_eq!(d.memory_reserve, 2 << 30, "a quarter of a large limit is kept");
        // No memory limit: descriptors only.
        let (cap, d) = node_cap(20_000, None, None);
        assert_eq!((cap, d.bound_by, d.memory_cap), (8_750, BoundBy::Descriptors, None));
        // A flag below both wins; above, it is not taken (the caller warns).
        assert_eq!(node_cap(20_000, None, Some(100)).1.bound_by, BoundBy::Flag);
        assert_eq!(node_cap(20_000, None, Some(100)).0, 100);
        assert_eq!(node_cap(20_000, None, Some(1_000_000)).0, 8_750);
        // Tiny limits still admit one.
        assert_eq!(fd_cap(100).0, 1);
        assert_eq!(memory_cap(1 << 20).0, 1);
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-memlimit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn cgroup_v2_takes_the_smallest_limit_up_the_tree() {
        let root = tempdir("v2");
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\nproc /proc proc rw 0 0\n";
        write(&root, "sys/fs/cgroup/kube/sluice/memory.max", "max\n");
        write(&root, "sys/fs/cgroup/kube/memory.max", "1073741824\n");
        write(&root, "sys/fs/cgroup/memory.max", "536870912\n");
        // The mount's own file counts too (a container's cgroup namespace shows its own cgroup
        // as the root).
        assert_eq!(memory_limit("0::/kube/sluice\n", mounts, &root), Some(512 << 20));
        write(&root, "sys/fs/cgroup/memory.max", "max\n");
        assert_eq!(memory_limit("0::/kube/sluice\n", mounts, &root), Some(1 << 30));
        write(&root, "sys/fs/cgroup/kube/memory.max", "max\n");
        assert_eq!(memory_limit("0::/kube/sluice\n", mounts, &root), None, "max everywhere");
        // Hybrid host: the v2 tree has no memory files, the v1 memory controller has a limit.
        let hybrid = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n";
        let cgroups = "4:memory:/pods/sluice\n0::/\n";
        write(&root, "sys/fs/cgroup/memory/pods/sluice/memory.limit_in_bytes", "805306368\n");
        assert_eq!(memory_limit(cgroups, hybrid, &root), Some(768 << 20));
        write(&root, "sys/fs/cgroup/memory/pods/sluice/memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(memory_limit(cgroups, hybrid, &root), None, "v1's 'unlimited'");
        let _ = std::fs::remove_dir_all(&root);
    }
}
