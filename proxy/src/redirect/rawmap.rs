//! The map operations on the data path, done with direct `bpf(2)` calls: aya's HashMap needs
//! `&mut self` to remove, which would put a lock on every accepted connection, while
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` is atomic in the kernel and needs no user-space lock.
//!
//! The kernel reads exactly the map's key size from the key pointer and writes exactly its
//! value size to the value pointer, whatever Rust type they came from. [`RawMap`] therefore
//! checks, once when it takes the map, that the kernel's key and value sizes (from
//! `BPF_OBJ_GET_INFO_BY_FD`) are those of `K` and `V`: a map of another layout (an old pinned
//! map, a renamed map in the object) is an error at start, never memory corruption later.

use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd, RawFd},
};

use aya::{maps::MapData, Pod};

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

/// The map's layout is not `K` → `V`.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading the map's info from the kernel: {0}")]
    Info(String),
    #[error(
        "the kernel's map has {kernel_key}-byte keys and {kernel_value}-byte values, sluice expects \
         {key} and {value} (a map of another sluice version? `sluice cleanup --node NAME` removes stale pins)"
    )]
    Sizes { kernel_key: u32, kernel_value: u32, key: usize, value: usize },
}

/// A BPF hash map with keys `K` and values `V`, used through raw `bpf(2)` calls. Owns the map
/// (its fd stays open as long as this lives). Lock-free: every call is one system call, and the
/// kernel makes each atomic.
pub struct RawMap<K, V> {
    map: MapData,
    _layout: PhantomData<fn(K, V)>,
}

impl<K: Pod, V: Pod> RawMap<K, V> {
    /// Takes `map` after checking that its key and value sizes are those of `K` and `V`.
    pub fn new(map: MapData) -> Result<Self, LayoutError> {
        let info = map.info().map_err(|e| LayoutError::Info(e.to_string()))?;
        check_layout::<K, V>(info.key_size(), info.value_size())?;
        Ok(RawMap { map, _layout: PhantomData })
    }

    fn fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }

    /// Inserts or replaces `key` → `value`.
    pub fn update(&self, key: &K, value: &V) -> io::Result<()> {
        let attr = MapElemAttr {
            map_fd: self.fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: value as *const V as u64,
            flags: 0,
        };
        // SAFETY: `new` checked that the map's key and value sizes are those of K and V, so the
        // kernel reads only inside `key` and `value`, which outlive the call.
        unsafe { map_cmd(BPF_MAP_UPDATE_ELEM, &attr) }
    }

    /// Deletes `key`; a missing key is not an error.
    pub fn delete(&self, key: &K) -> io::Result<()> {
        let attr = MapElemAttr {
            map_fd: self.fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: 0,
            flags: 0,
        };
        // SAFETY: the key size was checked in `new`; delete reads only the key.
        match unsafe { map_cmd(BPF_MAP_DELETE_ELEM, &attr) } {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Looks `key` up and deletes it in one step. `Ok(None)` when the key is absent.
    pub fn lookup_and_delete(&self, key: &K) -> io::Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::uninit();
        let attr = MapElemAttr {
            map_fd: self.fd() as u32,
            _pad: 0,
            key: key as *const K as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the sizes were checked in `new`: the kernel reads size_of::<K>() bytes of
        // `key` and, on success, writes exactly size_of::<V>() bytes into `value`.
        match unsafe { map_cmd(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr) } {
            // SAFETY: the kernel filled all of `value`, and V is Pod (any bytes are a valid V).
            Ok(()) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn check_layout<K, V>(kernel_key: u32, kernel_value: u32) -> Result<(), LayoutError> {
    let (key, value) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    if kernel_key as usize != key || kernel_value as usize != value {
        return Err(LayoutError::Sizes { kernel_key, kernel_value, key, value });
    }
    Ok(())
}

/// # Safety
/// `attr.key` (and `attr.value` for commands that use it) must point at live buffers of at
/// least the map's key (value) size for the duration of the call.
unsafe fn map_cmd(cmd: libc::c_long, attr: &MapElemAttr) -> io::Result<()> {
    // SAFETY: the caller guarantees the buffers; attr itself is a valid bpf_attr prefix.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};

    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

    /// `union bpf_attr` for BPF_MAP_CREATE (the fields up to map_flags).
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    /// A fresh LRU hash map with the given sizes, or None where this process may not create
    /// BPF maps (the unit tests normally run as root, as the end-to-end suite does).
    fn lru_map(key_size: u32, value_size: u32) -> Option<MapData> {
        let attr = CreateAttr {
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size,
            value_size,
            max_entries: 16,
            map_flags: 0,
        };
        // SAFETY: attr is a valid, zero-padded bpf_attr prefix for BPF_MAP_CREATE.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                &attr as *const CreateAttr,
                std::mem::size_of::<CreateAttr>() as u32,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "BPF_MAP_CREATE: {e}");
            eprintln!("skipping: creating BPF maps needs CAP_BPF ({e})");
            return None;
        }
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Some(MapData::from_fd(fd).expect("MapData from a fresh map fd"))
    }

    #[test]
    fn layout_check_compares_both_sizes() {
        assert!(check_layout::<u64, u8>(8, 1).is_ok());
        let err = check_layout::<u64, u8>(8, 4).unwrap_err();
        assert!(err.to_string().contains("8-byte keys and 4-byte values, sluice expects 8 and 1"), "{err}");
        assert!(check_layout::<u32, u8>(8, 1).is_err());
    }

    #[test]
    fn a_map_of_another_layout_is_refused() {
        // 16-byte keys and 8-byte values where u64 → u8 is expected: unchecked, the kernel
        // would read 8 bytes past each key and write 7 past each value.
        let Some(map) = lru_map(16, 8) else { return };
        let err = RawMap::<u64, u8>::new(map).err().expect("a 16/8 map is not a u64 → u8 map");
        assert!(
            matches!(err, LayoutError::Sizes { kernel_key: 16, kernel_value: 8, key: 8, value: 1 }),
            "{err}"
        );
    }

    #[test]
    fn operations_on_a_map_of_the_right_layout() {
        let Some(map) = lru_map(8, 8) else { return };
        let map = RawMap::<u64, u64>::new(map).expect("an 8/8 map is a u64 → u64 map");
        assert_eq!(map.lookup_and_delete(&7).unwrap(), None);
        map.update(&7, &42).unwrap();
        assert_eq!(map.lookup_and_delete(&7).unwrap(), Some(42));
        assert_eq!(map.lookup_and_delete(&7).unwrap(), None, "the lookup deleted it");
        map.update(&8, &1).unwrap();
        map.delete(&8).unwrap();
        map.delete(&8).unwrap(); // absent: not an error
        assert_eq!(map.lookup_and_delete(&8).unwrap(), None);
    }
}
