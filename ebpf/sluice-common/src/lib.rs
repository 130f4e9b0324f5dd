//! Types shared by the kernel programs (`sluice-ebpf`) and user space (`sluice`).
//!
//! Everything here is `#[repr(C)]`, padding-free and `Copy`, because the bytes are exchanged
//! through BPF maps: the kernel side and user space must agree on them to the byte.
//!
//! Address conventions: IPv4 and IPv6 addresses are stored as they appear in the kernel's
//! `bpf_sock_addr` / `bpf_sock_ops` contexts, i.e. **network byte order** in `u32` words
//! (an IPv4 address lives in `addr[0]`, the other words are zero). Ports are stored in
//! **host byte order**.
#![no_std]

/// Outbound capture listener, opened by sluice inside every enrolled pod's network namespace.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture (reserved, Istio convention).
pub const INBOUND_PORT: u16 = 15006;
/// HBONE tunnel (reserved, Istio convention).
pub const HBONE_PORT: u16 = 15008;
/// Admin API (node-local).
pub const ADMIN_PORT: u16 = 15000;
/// Prometheus metrics.
pub const METRICS_PORT: u16 = 15020;
/// Readiness.
pub const READY_PORT: u16 = 15021;

/// Ports that are never redirected: traffic to sluice's own ports must never loop back into it.
pub const RESERVED_PORTS: [u16; 6] = [
    ADMIN_PORT,
    OUTBOUND_PORT,
    INBOUND_PORT,
    HBONE_PORT,
    METRICS_PORT,
    READY_PORT,
];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Version of the layout of the pinned maps (their names, key/value types and sizes). Bump it
/// whenever any of them changes: a process with another layout then makes maps of its own
/// instead of reusing incompatible ones.
pub const MAP_LAYOUT_VERSION: u32 = 2;

/// How many cgroup levels above a socket's own cgroup the programs look for an enrolled pod
/// cgroup (containers live in sub-cgroups of their pod's cgroup on a real node).
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Value of the `ENROLLED` map, keyed by the pod's cgroup v2 id (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// sluice's own number for the pod (stable while the pod stays enrolled).
    pub pod_id: u32,
    /// Reserved for per-pod flags; zero today.
    pub flags: u32,
}

/// Original destination of a redirected connection, recorded by `connect4/6`.
///
/// Stored in `ORIG_BY_COOKIE` (key: the client socket's cookie, read by `getpeername4/6`)
/// and copied into `ORIG_BY_TUPLE` once the connection is established (read by sluice
/// when it accepts the connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Destination address the application dialled (network byte order words).
    pub addr: [u32; 4],
    /// Destination port the application dialled (host byte order).
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family of `addr` (an IPv4-mapped IPv6 destination is
    /// stored as `AF_INET`).
    pub family: u16,
    /// The enrolled pod the connecting socket belongs to.
    pub pod_id: u32,
    /// The cgroup id of the task that called connect().
    pub cgroup_id: u64,
}

/// Key of `ORIG_BY_TUPLE`: identifies a redirected connection as sluice's listener sees it,
/// i.e. by the client's local address and port, within one pod (one network namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub pod_id: u32,
    /// Client's local port (host byte order).
    pub port: u16,
    /// Family of the client's socket (`AF_INET` or `AF_INET6`).
    pub family: u16,
    /// Client's local address (network byte order words; IPv4 in `addr[0]`).
    pub addr: [u32; 4],
}

/// Key of `INBOUND`: one address of an enrolled pod (IPv4 in `addr[0]`, network byte order
/// words like everywhere here).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u32; 4],
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}

/// Key of `DELIVERING`: the source address and port of one of sluice's delivery connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
}

/// Slots of the `CONFIG` array (each a `u64`, written by user space one at a time so that a
/// program never sees a torn value).
pub mod config {
    /// `CLOCK_BOOTTIME` nanoseconds of sluice's last heartbeat.
    pub const HEARTBEAT_NS: u32 = 0;
    /// 1 = fail closed (redirect even when sluice is gone, so connect() is refused).
    pub const FAIL_CLOSED: u32 = 1;
    /// cgroup v2 id of sluice's own cgroup: never redirected.
    pub const SELF_CGROUP: u32 = 2;
    /// A heartbeat older than this many nanoseconds means sluice is not alive.
    pub const STALE_AFTER_NS: u32 = 3;
    /// pid of the sluice process that currently owns the node (the newest to start). A process
    /// that stops marks sluice dead only if it is still the owner: not when a successor took over.
    pub const OWNER_PID: u32 = 4;
    pub const LEN: u32 = 5;
}

/// Slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// connect() calls redirected to sluice.
    pub const REDIRECTED: u32 = 0;
    /// connect() from an enrolled pod passed through because sluice was not alive.
    pub const FAIL_OPEN: u32 = 1;
    /// connect() from an enrolled pod sent to the closed listener because sluice was not
    /// alive and the node is in fail-closed mode.
    pub const FAIL_CLOSED: u32 = 2;
    /// getpeername() answers rewritten back to the original destination.
    pub const PEERNAME_REWRITTEN: u32 = 3;
    /// Established redirected connections recorded for sluice (sock_ops).
    pub const TUPLE_RECORDED: u32 = 4;
    /// A map insert failed (map full or similar): the connection was passed through.
    pub const MAP_ERRORS: u32 = 5;
    /// Inbound connections (from outside a pod) handed to sluice's inbound listener.
    pub const INBOUND_CAPTURED: u32 = 6;
    /// connect() to an IPv6 link-local destination left alone (the scope id a link-local
    /// address needs is not visible to the program, so sluice could not dial it).
    pub const LINK_LOCAL_PASSED: u32 = 7;
    pub const LEN: u32 = 8;
}

/// Names of the maps and programs in the object file, used by the loader.
pub mod names {
    pub const MAP_CONFIG: &str = "CONFIG";
    pub const MAP_ENROLLED: &str = "ENROLLED";
    pub const MAP_ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const MAP_ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    pub const MAP_COUNTERS: &str = "COUNTERS";
    pub const MAP_INBOUND: &str = "INBOUND";
    pub const MAP_DELIVERING: &str = "DELIVERING";
    pub const PROG_CONNECT4: &str = "sluice_connect4";
    pub const PROG_CONNECT6: &str = "sluice_connect6";
    pub const PROG_GETPEERNAME4: &str = "sluice_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "sluice_getpeername6";
    pub const PROG_SOCKOPS: &str = "sluice_sockops";
    pub const PROG_INBOUND: &str = "sluice_inbound";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are repr(C), Copy, contain only integers and have no padding
    // (checked by the size assertions below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::SockKey {}
}

// No padding anywhere: the kernel and user space see identical bytes.
const _: () = assert!(core::mem::size_of::<PodEntry>() == 8);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 24);
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);
const _: () = assert!(core::mem::size_of::<SockKey>() == 20);
