//! Network sysctls of the *calling thread's* network namespace (call it on a pod's netns
//! worker). Where `/proc/sys` is mounted read-only (inside a container), the same file is
//! reached through the host's procfs, `/proc/1/root/proc/sys` (hostPID): net sysctls apply to
//! the namespace of the thread that writes them whichever procfs mount the path goes through.

use std::{io, path::PathBuf};

pub fn write_net(key: &str, value: &str) -> io::Result<()> {
    let rel = format!("sys/net/{}", key.replace('.', "/"));
    let primary = PathBuf::from("/proc").join(&rel);
    match std::fs::write(&primary, value) {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) || e.kind() == io::ErrorKind::PermissionDenied => {
            let host = PathBuf::from("/proc/1/root/proc").join(&rel);
            std::fs::write(&host, value).map_err(|e2| {
                io::Error::new(e2.kind(), format!("net.{key}: {} is read-only ({e}) and {} failed: {e2}", primary.display(), host.display()))
            })
        }
        r => r.map_err(|e| io::Error::new(e.kind(), format!("net.{key}: {e}"))),
    }
}
