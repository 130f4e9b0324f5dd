//! bpffs pins. Only fail-closed mode pins anything: its links must outlive the process so that
//! connections keep being refused while sluice is down. Fail-open mode pins nothing, so a dead
//! sluice leaves nothing in the kernel.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn pin_dir(bpffs: &Path, node: &str) -> PathBuf {
    bpffs.join("sluice").join(node)
}

/// Removes a node's pins (unpinning a link detaches its program once nothing else holds it).
/// Missing pins are not an error.
pub fn remove_pins(bpffs: &Path, node: &str) -> io::Result<usize> {
    let dir = pin_dir(bpffs, node);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        std::fs::remove_file(entry?.path())?;
        removed += 1;
    }
    std::fs::remove_dir(&dir)?;
    // Leave <bpffs>/sluice itself if other nodes still use it.
    let _ = std::fs::remove_dir(bpffs.join("sluice"));
    Ok(removed)
}

/// Makes sure `path` is a bpffs mount, mounting one if the directory exists but nothing is
/// mounted there (common on hosts where systemd did not mount it).
pub fn ensure_bpffs(path: &Path) -> Result<(), String> {
    if is_bpffs(path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let target = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let fstype = CString::new("bpf").unwrap();
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(format!(
            "{} is not a bpffs mount and mounting one failed ({}); mount it with `mount -t bpf bpf {}`",
            path.display(),
            io::Error::last_os_error(),
            path.display()
        ));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid path string and st is a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}
