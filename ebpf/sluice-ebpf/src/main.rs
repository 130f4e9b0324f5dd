//! sluice's kernel side.
//!
//! Attached (by the sluice daemon) to the cgroup under which a node's pods live:
//!
//! * `connect4`/`connect6`: a TCP connect() from an enrolled pod's cgroup is rewritten to
//!   sluice's outbound listener on the loopback of the pod's own network namespace
//!   (127.0.0.1:15001 or [::1]:15001); the original destination is remembered by socket cookie.
//! * `sockops`: when such a connection is established, its original destination is copied to a
//!   map keyed by the client's local address, which is what sluice sees as the peer on accept.
//!   When the socket closes, the cookie entry is removed.
//! * `getpeername4`/`getpeername6`: the application sees the address it dialled, not sluice's.
//!
//! Fail-open: if sluice's heartbeat is stale or its listener is missing in the pod's network
//! namespace, connect() passes through unchanged, unless fail-closed mode is configured, in
//! which case the connection is still sent to the (absent) listener and is refused.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_ktime_get_boot_ns,
        generated::{bpf_sk_lookup_tcp, bpf_sk_release},
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::{debug, warn};
use sluice_common::{
    config, counter, AddrKey, ConnKey, OrigDst, PodEntry, SockKey, AF_INET, AF_INET6,
    MAX_CGROUP_DEPTH, OUTBOUND_PORT, RESERVED_PORTS,
};

/// Allow the socket operation (the only return value we use: a rewrite or a pass-through).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// `BPF_F_CURRENT_NETNS`: look sockets up in the network namespace of the program's socket.
const CURRENT_NETNS: u64 = u64::MAX;
/// Address words in network byte order, as the contexts hold them.
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
const V6_LAST_WORD_ONE: u32 = u32::from_ne_bytes([0, 0, 0, 1]);
const OUTBOUND_PORT_BE: u32 = OUTBOUND_PORT.to_be() as u32;

// Every map except the log buffer is pinned (under <bpffs>/sluice/<node>/maps-v<layout>/) and
// reused by the next sluice process of the node: during an upgrade, whichever process accepts
// a redirected connection finds its original destination in the same maps.
#[map]
static CONFIG: Array<u64> = Array::pinned(config::LEN, 0);

/// Enrolled pod cgroups: cgroup v2 id → pod. Maintained by sluice.
#[map]
static ENROLLED: HashMap<u64, PodEntry> = HashMap::pinned(16384, 0);

/// Original destination per redirected client socket (cookie). LRU so that a burst of
/// sockets never makes redirection fail; entries are also removed when the socket closes.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Original destination per established redirected connection, keyed as sluice's listener
/// sees the client. sluice removes an entry when it accepts the connection.
#[map]
static ORIG_BY_TUPLE: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(65536, 0);

/// sluice's inbound (plaintext capture) listener of each enrolled pod, keyed by each of the
/// pod's addresses (IPv4, IPv6, IPv6 link-local). A socket leaves the map by itself when it is
/// closed, so a dead sluice captures nothing: plaintext then reaches the application directly.
#[map]
static INBOUND: SockHash<AddrKey> = SockHash::pinned(65536, 0);

/// Source (address, port) of sluice's own connections delivering to applications, which must
/// not be captured again.
#[map]
static DELIVERING: LruHashMap<SockKey, u8> = LruHashMap::pinned(65536, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);

#[inline(always)]
fn count(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race with us.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn config_value(slot: u32) -> u64 {
    CONFIG.get(slot).copied().unwrap_or(0)
}

/// The enrolled pod owning the current task, looking at its own cgroup and its ancestors
/// (on a real node a container's cgroup sits below its pod's cgroup).
#[inline(always)]
fn enrolled_pod() -> Option<(PodEntry, u64)> {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if own == config_value(config::SELF_CGROUP) {
        return None;
    }
    if let Some(entry) = unsafe { ENROLLED.get(&own) } {
        return Some((*entry, own));
    }
    let mut level: i32 = 1;
    while level <= MAX_CGROUP_DEPTH as i32 {
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == own {
            break;
        }
        if let Some(entry) = unsafe { ENROLLED.get(&ancestor) } {
            return Some((*entry, own));
        }
        level += 1;
    }
    None
}

/// sluice is alive: its heartbeat is fresh. (Whether its listener exists in this pod's network
/// namespace is checked separately, per family.)
#[inline(always)]
fn heartbeat_fresh() -> bool {
    let beat = config_value(config::HEARTBEAT_NS);
    let stale_after = config_value(config::STALE_AFTER_NS);
    if beat == 0 {
        return false;
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    now < beat || now - beat <= stale_after
}

/// Is there a listening socket on `tuple`'s destination in the socket's own network namespace?
#[inline(always)]
fn listener_present(ctx: &SockAddrContext, tuple: &mut bpf_sock_tuple, size: u32) -> bool {
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            tuple as *mut bpf_sock_tuple,
            size,
            CURRENT_NETNS,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk as *mut _) };
    true
}

#[inline(always)]
fn is_reserved_port(port: u16) -> bool {
    let mut i = 0;
    while i < RESERVED_PORTS.len() {
        if RESERVED_PORTS[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn is_tcp(ctx: &SockAddrContext) -> bool {
    let sa = unsafe { &*ctx.sock_addr };
    sa.type_ == SOCK_STREAM && (sa.protocol == IPPROTO_TCP || sa.protocol == 0)
}

/// What to do with a connect() from an enrolled pod.
enum Verdict {
    Redirect,
    PassThrough,
}

#[inline(always)]
fn decide(listener_up: bool) -> Verdict {
    if listener_up && heartbeat_fresh() {
        count(counter::REDIRECTED);
        Verdict::Redirect
    } else if config_value(config::FAIL_CLOSED) != 0 {
        // Send it to the listener that is not there: connect() fails with ECONNREFUSED.
        count(counter::FAIL_CLOSED);
        Verdict::Redirect
    } else {
        count(counter::FAIL_OPEN);
        Verdict::PassThrough
    }
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &OrigDst) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(&cookie, orig, 0).is_err() {
        count(counter::MAP_ERRORS);
        warn!(ctx, "sluice: cannot record original destination, passing through");
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    if !is_tcp(&ctx) {
        return ALLOW;
    }
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip4; // network byte order
    let port = u16::from_be(sa.user_port as u16);
    if ip.to_ne_bytes()[0] == 127 || is_reserved_port(port) {
        return ALLOW;
    }
    let Some((pod, cgroup_id)) = enrolled_pod() else {
        return ALLOW;
    };
    let loopback = LOOPBACK4;
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // Writing a Copy field of a union is safe; only reads need unsafe.
    tuple.__bindgen_anon_1.ipv4.daddr = loopback;
    tuple.__bindgen_anon_1.ipv4.dport = OUTBOUND_PORT.to_be();
    let size = core::mem::size_of::<[u32; 3]>() as u32; // struct ipv4 part of bpf_sock_tuple
    let listener_up = listener_present(&ctx, &mut tuple, size);
    match decide(listener_up) {
        Verdict::PassThrough => ALLOW,
        Verdict::Redirect => {
            let orig = OrigDst {
                addr: [ip, 0, 0, 0],
                port,
                family: AF_INET,
                pod_id: pod.pod_id,
                cgroup_id,
            };
            if listener_up && !remember(&ctx, &orig) {
                return ALLOW;
            }
            debug!(&ctx, "pod {} (cgroup {}): connect to {:i}:{} redirected to sluice", pod.pod_id, cgroup_id, u32::from_be(ip), port);
            sa.user_ip4 = loopback;
            sa.user_port = OUTBOUND_PORT_BE;
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    if !is_tcp(&ctx) {
        return ALLOW;
    }
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let port = u16::from_be(sa.user_port as u16);
    let mapped_v4 = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX;
    let v6_loopback = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == V6_LAST_WORD_ONE;
    if v6_loopback || (mapped_v4 && ip[3].to_ne_bytes()[0] == 127) || is_reserved_port(port) {
        return ALLOW;
    }
    // Unspecified address (::) means "this host": leave it alone like loopback.
    if ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 0 {
        return ALLOW;
    }
    // Link-local (fe80::/10): only meaningful with the scope id (interface) the application
    // gave, which this hook cannot see; sluice could not dial it. Leave it alone (the
    // destination pod's own capture still applies its policy).
    let first = ip[0].to_ne_bytes();
    if first[0] == 0xfe && first[1] & 0xc0 == 0x80 {
        if enrolled_pod().is_some() {
            count(counter::LINK_LOCAL_PASSED);
        }
        return ALLOW;
    }
    let Some((pod, cgroup_id)) = enrolled_pod() else {
        return ALLOW;
    };
    // An IPv4-mapped destination on a dual-stack socket goes to ::ffff:127.0.0.1, which reaches
    // the IPv4 listener; a real IPv6 destination goes to [::1].
    let target: [u32; 4] = if mapped_v4 {
        [0, 0, V4_MAPPED_PREFIX, LOOPBACK4]
    } else {
        [0, 0, 0, V6_LAST_WORD_ONE]
    };
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if mapped_v4 {
        tuple.__bindgen_anon_1.ipv4.daddr = target[3];
        tuple.__bindgen_anon_1.ipv4.dport = OUTBOUND_PORT.to_be();
        core::mem::size_of::<[u32; 3]>() as u32
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = target;
        tuple.__bindgen_anon_1.ipv6.dport = OUTBOUND_PORT.to_be();
        core::mem::size_of::<[u32; 9]>() as u32
    };
    let listener_up = listener_present(&ctx, &mut tuple, size);
    match decide(listener_up) {
        Verdict::PassThrough => ALLOW,
        Verdict::Redirect => {
            let orig = if mapped_v4 {
                OrigDst { addr: [ip[3], 0, 0, 0], port, family: AF_INET, pod_id: pod.pod_id, cgroup_id }
            } else {
                OrigDst { addr: ip, port, family: AF_INET6, pod_id: pod.pod_id, cgroup_id }
            };
            if listener_up && !remember(&ctx, &orig) {
                return ALLOW;
            }
            sa.user_ip6[0] = target[0];
            sa.user_ip6[1] = target[1];
            sa.user_ip6[2] = target[2];
            sa.user_ip6[3] = target[3];
            sa.user_port = OUTBOUND_PORT_BE;
            ALLOW
        }
    }
}

#[inline(always)]
fn original_for(ctx: &SockAddrContext) -> Option<OrigDst> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != OUTBOUND_PORT {
        return ALLOW;
    }
    if let Some(orig) = original_for(&ctx) {
        if orig.family == AF_INET {
            sa.user_ip4 = orig.addr[0];
            sa.user_port = u32::from(orig.port.to_be());
            count(counter::PEERNAME_REWRITTEN);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != OUTBOUND_PORT {
        return ALLOW;
    }
    if let Some(orig) = original_for(&ctx) {
        let addr = if orig.family == AF_INET {
            // The socket is IPv6 (dual-stack): answer with the IPv4-mapped form.
            [0, 0, V4_MAPPED_PREFIX, orig.addr[0]]
        } else {
            orig.addr
        };
        sa.user_ip6[0] = addr[0];
        sa.user_ip6[1] = addr[1];
        sa.user_ip6[2] = addr[2];
        sa.user_ip6[3] = addr[3];
        sa.user_port = u32::from(orig.port.to_be());
        count(counter::PEERNAME_REWRITTEN);
    }
    ALLOW
}

#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => {
            // arg 1 is the new TCP state.
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let _ = ORIG_BY_COOKIE.remove(&cookie);
            }
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    // Only sockets that connect4/6 redirected have a cookie entry.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    // remote_port holds the big-endian port; on little-endian kernels it is shifted into the
    // upper half of the word. Accept either layout.
    let remote = ctx.remote_port();
    if remote != OUTBOUND_PORT_BE && remote >> 16 != OUTBOUND_PORT_BE {
        return;
    }
    let family = ctx.family() as u16;
    let mut key = ConnKey {
        pod_id: orig.pod_id,
        port: ctx.local_port() as u16,
        family,
        addr: [0; 4],
    };
    if family == AF_INET {
        key.addr[0] = ctx.local_ip4();
    } else {
        let ip6 = ctx.local_ip6();
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX {
            // A dual-stack socket talking IPv4: sluice's IPv4 listener sees a plain IPv4 peer.
            key.family = AF_INET;
            key.addr[0] = ip6[3];
        } else {
            key.addr = ip6;
        }
    }
    if ORIG_BY_TUPLE.insert(&key, &orig, 0).is_err() {
        count(counter::MAP_ERRORS);
        return;
    }
    count(counter::TUPLE_RECORDED);
    // Ask for state changes so the cookie entry is dropped when the socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

const SK_PASS: u32 = 1;

/// An IPv6 address from a program context, one 32-bit load per word: the verifier accepts
/// only loads of the field's own size from context structures, so the compiler must not merge
/// them into wider ones.
#[inline(always)]
fn ctx_words(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reads of four valid, aligned u32 fields of the context.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}
/// Loopback is always ifindex 1 in a network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Attached to each enrolled pod's network namespace: a TCP connection arriving from outside
/// the pod for one of the pod's own ports is given to sluice's inbound listener instead of the
/// application's, so that policy applies to plaintext from non-mesh clients. Connections that
/// arrive on loopback (sluice delivering to the application, or the pod talking to itself) and
/// connections to sluice's own ports (HBONE 15008) take the normal path.
#[sk_lookup]
pub fn sluice_inbound(ctx: SkLookupContext) -> u32 {
    let l = unsafe { &*ctx.lookup };
    let v4 = l.family == u32::from(AF_INET);
    if l.protocol != IPPROTO_TCP || !(v4 || l.family == u32::from(AF_INET6)) || l.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    if is_reserved_port(l.local_port as u16) {
        return SK_PASS;
    }
    let (remote, local) = if v4 {
        ([l.remote_ip4, 0, 0, 0], [l.local_ip4, 0, 0, 0])
    } else {
        (ctx_words(&l.remote_ip6), ctx_words(&l.local_ip6))
    };
    let family = if v4 { AF_INET } else { AF_INET6 };
    // sluice delivering a connection it accepted for this pod: its SYN looks like one from the
    // client (same source address), so it is recognised by its exact source address and port.
    let delivering = SockKey { addr: remote, port: u16::from_be(l.remote_port), family };
    if unsafe { DELIVERING.get(&delivering) }.is_some() {
        return SK_PASS;
    }
    // A hung sluice still has its listener in INBOUND: honour the heartbeat, as connect4 does
    // (fail-open lets the connection reach the application).
    if !heartbeat_fresh() && config_value(config::FAIL_CLOSED) == 0 {
        return SK_PASS;
    }
    let key = AddrKey { addr: local, family: u32::from(family) };
    if INBOUND.redirect_sk_lookup(&ctx, key, 0).is_ok() {
        count(counter::INBOUND_CAPTURED);
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
