//! bpffs pins, per node: `<bpffs>/sluice/<node>/`
//! - `maps-v<layout>/`: the maps, shared by consecutive sluice processes of the node (so an
//!   upgrade hands over without losing redirected connections);
//! - `links/`: in fail-closed mode only, the program attachments, which must outlive the
//!   process so that connections keep being refused while sluice is down. In fail-open mode a
//!   dead sluice's programs detach with it.
//! `sluice cleanup` removes the whole node directory.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn pin_dir(bpffs: &Path, node: &str) -> PathBuf {
    bpffs.join("sluice").join(node)
}

pub fn links_dir(bpffs: &Path, node: &str) -> PathBuf {
    pin_dir(bpffs, node).join("links")
}

pub fn maps_dir(bpffs: &Path, node: &str) -> PathBuf {
    pin_dir(bpffs, node).join(format!("maps-v{}", sluice_common::MAP_LAYOUT_VERSION))
}

/// Removes everything pinned for a node (uninstall). Unpinning a link detaches its program
/// once nothing else holds it; unpinned maps live on only while a process holds them.
/// Returns how many pinned objects were removed; a missing directory is not an error.
pub fn remove_pins(bpffs: &Path, node: &str) -> io::Result<usize> {
    let dir = pin_dir(bpffs, node);
    let removed = count_files(&dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    }
    // Leave <bpffs>/sluice itself if other nodes still use it.
    let _ = std::fs::remove_dir(bpffs.join("sluice"));
    Ok(removed)
}

/// Removes the link pins a previous fail-closed process left (its programs detach), and map
/// directories of other layouts (a process still using them keeps its own references).
pub fn remove_stale(bpffs: &Path, node: &str) -> io::Result<()> {
    let dir = pin_dir(bpffs, node);
    let current = maps_dir(bpffs, node);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path == current {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 })
        .sum()
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
