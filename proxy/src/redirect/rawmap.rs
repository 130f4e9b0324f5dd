//! The one map operation on the data path, done with a direct `bpf(2)` call: aya's HashMap
//! needs `&mut self` to remove, which would put a lock on every accepted connection, while
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` is atomic in the kernel and needs no user-space lock.

use std::{io, os::fd::RawFd};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
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

fn map_cmd(cmd: libc::c_long, attr: &MapElemAttr) -> io::Result<()> {
    // SAFETY: attr points at valid key/value buffers of the map's sizes for the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *const MapElemAttr, std::mem::size_of::<MapElemAttr>() as u32)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Inserts or replaces `key` → `value`.
pub fn update<K, V>(map_fd: RawFd, key: &K, value: &V) -> io::Result<()> {
    let attr = MapElemAttr {
        map_fd: map_fd as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags: 0,
    };
    map_cmd(BPF_MAP_UPDATE_ELEM, &attr)
}

/// Deletes `key`; a missing key is not an error.
pub fn delete<K>(map_fd: RawFd, key: &K) -> io::Result<()> {
    let attr = MapElemAttr { map_fd: map_fd as u32, _pad: 0, key: key as *const K as u64, value: 0, flags: 0 };
    match map_cmd(BPF_MAP_DELETE_ELEM, &attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
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
