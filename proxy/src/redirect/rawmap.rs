//! The one map operation on the data path, done with a direct `bpf(2)` call: aya's HashMap
//! needs `&mut self` to remove, which would put a lock on every accepted connection, while
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` is atomic in the kernel and needs no user-space lock.

use std::{io, os::fd::RawFd};

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// `union bpf_attr` as used by the map element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Looks `key` up and deletes it in one step. `Ok(false)` when the key is absent.
pub fn lookup_and_delete<K, V>(map_fd: RawFd, key: &K, value: &mut V) -> io::Result<bool> {
    let attr = MapElemAttr {
        map_fd: map_fd as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *mut V as u64,
        flags: 0,
    };
    // SAFETY: attr points at valid key/value buffers of the sizes the map was created with
    // (the types are the shared repr(C) map types), and lives for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as u32,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(false)
    } else {
        Err(err)
    }
}
