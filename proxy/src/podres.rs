//! Finding a pod on this node from what the kernel shows: its cgroup from its UID (laid out by
//! the kubelet's cgroup driver), and its network namespace from a process in that cgroup.
//!
//! This is the only way sluice finds pods, on a real node and in the simulator alike.

use std::{
    fs::File,
    io,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PodResError {
    #[error("no cgroup v2 hierarchy is mounted (looked for fstype cgroup2 in /proc/mounts); sluice needs cgroup v2")]
    NoCgroup2,
    #[error("no kubepods cgroup under {0} (looked for kubepods/ and kubepods.slice/); is --cgroup-root the cgroup-v2 directory that holds the pods?")]
    NoKubepods(PathBuf),
    #[error("the kubelet keeps pods in cgroup v1 ({0}) on this hybrid host; sluice's socket hooks need the pods in cgroup v2 (run the kubelet with the unified hierarchy)")]
    PodsInCgroupV1(PathBuf),
    #[error("pod {uid}: no cgroup found under {root}")]
    CgroupNotFound { uid: String, root: PathBuf },
    #[error("pod cgroup {0} has no processes yet (sandbox not started)")]
    NoProcesses(PathBuf),
    #[error("pod cgroup {0}: its processes share sluice's own network namespace (hostNetwork pods are never enrolled)")]
    HostNetwork(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PodResError + '_ {
    move |source| PodResError::Io { path: path.to_path_buf(), source }
}

/// Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, PodResError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(io_err(Path::new("/proc/mounts")))?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or(PodResError::NoCgroup2)
}

/// The cgroup v2 id (the inode number of its directory), as `bpf_get_current_cgroup_id` sees it.
pub fn cgroup_id(path: &Path) -> Result<u64, PodResError> {
    Ok(std::fs::metadata(path).map_err(io_err(path))?.ino())
}

/// The cgroup-v2 directory of the calling process.
pub fn own_cgroup() -> Result<PathBuf, PodResError> {
    let mount = cgroup2_mount()?;
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(io_err(Path::new("/proc/self/cgroup")))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(PodResError::NoCgroup2)?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Which kubelet cgroup driver laid out the pods under `root`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods/[besteffort|burstable/]pod<uid>`
    Cgroupfs,
    /// `kubepods.slice/[kubepods-<qos>.slice/]kubepods-[<qos>-]pod<uid_with_underscores>.slice`
    Systemd,
}

/// The parent cgroup of all pods under `root` (where sluice attaches its programs), and the
/// driver layout found there.
pub fn kubepods(root: &Path) -> Result<(PathBuf, CgroupDriver), PodResError> {
    let cgroupfs = root.join("kubepods");
    if cgroupfs.is_dir() {
        return Ok((cgroupfs, CgroupDriver::Cgroupfs));
    }
    let systemd = root.join("kubepods.slice");
    if systemd.is_dir() {
        return Ok((systemd, CgroupDriver::Systemd));
    }
    if let Some(v1) = kubepods_in_cgroup_v1() {
        return Err(PodResError::PodsInCgroupV1(v1));
    }
    Err(PodResError::NoKubepods(root.to_path_buf()))
}

/// A `kubepods` tree in a cgroup v1 hierarchy (hybrid hosts whose kubelet uses v1).
fn kubepods_in_cgroup_v1() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup").then(|| PathBuf::from(dir))
        })
        .flat_map(|d| [d.join("kubepods"), d.join("kubepods.slice")])
        .find(|p| p.is_dir())
}

/// The cgroup directory of the pod with `uid`, if its sandbox exists on this node.
pub fn pod_cgroup(kubepods: &Path, driver: CgroupDriver, uid: &str) -> Result<PathBuf, PodResError> {
    let candidates: Vec<PathBuf> = match driver {
        CgroupDriver::Cgroupfs => {
            let leaf = format!("pod{uid}");
            vec![
                kubepods.join(&leaf),
                kubepods.join("besteffort").join(&leaf),
                kubepods.join("burstable").join(&leaf),
            ]
        }
        CgroupDriver::Systemd => {
            let u = uid.replace('-', "_");
            vec![
                kubepods.join(format!("kubepods-pod{u}.slice")),
                kubepods.join("kubepods-besteffort.slice").join(format!("kubepods-besteffort-pod{u}.slice")),
                kubepods.join("kubepods-burstable.slice").join(format!("kubepods-burstable-pod{u}.slice")),
            ]
        }
    };
    candidates
        .into_iter()
        .find(|p| p.is_dir())
        .ok_or_else(|| PodResError::CgroupNotFound { uid: uid.to_string(), root: kubepods.to_path_buf() })
}

/// Process ids in `cgroup` and its descendants (containers sit in sub-cgroups on real nodes).
pub fn pids_in(cgroup: &Path) -> Result<Vec<i32>, PodResError> {
    let mut pids = Vec::new();
    let mut stack = vec![cgroup.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let procs = dir.join("cgroup.procs");
        match std::fs::read_to_string(&procs) {
            Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
            // The cgroup went away while we looked: it simply has no processes.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(PodResError::Io { path: procs, source: e }),
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(entries.flatten().filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false)).map(|e| e.path()));
        }
    }
    Ok(pids)
}

/// An open handle on a pod's network namespace. Holding the fd keeps the namespace usable
/// even if the process it was found through exits.
#[derive(Debug)]
pub struct NetnsHandle {
    pub fd: OwnedFd,
    /// Inode of the namespace (its identity, as `ip netns identify` / `lsns` show it).
    pub inode: u64,
    /// The process it was found through.
    pub pid: i32,
}

/// The network namespace of the processes in `cgroup`.
pub fn pod_netns(cgroup: &Path) -> Result<NetnsHandle, PodResError> {
    let own = std::fs::metadata("/proc/self/ns/net").map_err(io_err(Path::new("/proc/self/ns/net")))?.ino();
    for pid in pids_in(cgroup)? {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        // A process may exit between listing and opening: try the next one.
        let Ok(file) = File::open(&path) else { continue };
        let inode = file.metadata().map_err(io_err(&path))?.ino();
        if inode == own {
            return Err(PodResError::HostNetwork(cgroup.to_path_buf()));
        }
        return Ok(NetnsHandle { fd: file.into(), inode, pid });
    }
    Err(PodResError::NoProcesses(cgroup.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_pods_in_both_driver_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let kp = dir.path().join("kubepods");
        std::fs::create_dir_all(kp.join("burstable/podabc-1")).unwrap();
        let (found, driver) = kubepods(dir.path()).unwrap();
        assert_eq!(driver, CgroupDriver::Cgroupfs);
        assert_eq!(pod_cgroup(&found, driver, "abc-1").unwrap(), kp.join("burstable/podabc-1"));
        assert!(matches!(pod_cgroup(&found, driver, "zzz"), Err(PodResError::CgroupNotFound { .. })));

        let dir = tempfile::tempdir().unwrap();
        let ks = dir.path().join("kubepods.slice");
        let pod = ks.join("kubepods-besteffort.slice/kubepods-besteffort-podabc_1.slice");
        std::fs::create_dir_all(&pod).unwrap();
        let (found, driver) = kubepods(dir.path()).unwrap();
        assert_eq!(driver, CgroupDriver::Systemd);
        assert_eq!(pod_cgroup(&found, driver, "abc-1").unwrap(), pod);
    }

    #[test]
    fn missing_kubepods_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = kubepods(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no kubepods cgroup"), "{err}");
    }
}

/// The IPv6 link-local addresses of the calling thread's network namespace (run it on a pod's
/// netns worker), loopback excluded; tentative ones (duplicate address detection running)
/// included, since capture must cover an address from the moment it is usable.
pub fn link_local_addrs() -> std::io::Result<Vec<std::net::Ipv6Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    let mut out: Vec<std::net::Ipv6Addr> = addrs
        .filter(|a| !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK))
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in6().map(|v6| v6.ip())))
        .filter(|ip| ip.segments()[0] & 0xffc0 == 0xfe80)
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
