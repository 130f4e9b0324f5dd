//! Delivering a connection to an application in an enrolled pod, after sluice accepted it on
//! the pod's behalf (from the HBONE tunnel, or captured plaintext), **with the client's own IP
//! as the source** so that the application, its logs and its own policies see who called.
//!
//! How, without iptables: sluice's delivery socket is transparent (`IP_TRANSPARENT`) and bound
//! to the client's IP, and carries a packet mark. Inside the pod's namespace, once per pod:
//! - `net.ipv4.tcp_fwmark_accept = 1`: the application's accepted socket inherits the mark of
//!   the SYN it accepted, so every packet it sends back carries the mark too;
//!   `net.ipv4.fwmark_reflect = 1` does the same for the kernel's own replies (RST, ICMP);
//! - `ip rule fwmark MARK lookup TABLE` + `ip route local 0.0.0.0/0 dev lo table TABLE`: marked
//!   packets are delivered locally, i.e. back to sluice's transparent socket, instead of being
//!   routed out of the pod towards the client's real address.
//! Marks do not cross network namespaces (veth scrubs them), so traffic from outside the pod is
//! never affected.
//!
//! IPv6 the same way (`IPV6_TRANSPARENT`, `ip -6 rule`/`route`, `net.ipv6.fwmark_reflect`;
//! `tcp_fwmark_accept` covers both families). Link-local addresses are the exception: a
//! connection to or from one is delivered from the pod's own link-local address, as spoofing a
//! scoped address through the local route would need the scope on both ends.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::{netns::PodNetns, redirect::Redirector};

/// Packet mark of sluice's delivery connections (and the replies to them).
pub const DELIVERY_MARK: u32 = 0x5a1;
const MARK_MASK: u32 = 0xfff;
/// Routing table holding the `local` route for marked packets.
const TABLE: u32 = 151;
const RULE_PREF: u32 = 32000;

/// Which families a pod's namespace delivers with the client's own address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transparent {
    pub v4: bool,
    pub v6: bool,
}

impl Transparent {
    fn for_family(self, ip: IpAddr) -> bool {
        if ip.is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }
}

/// Prepares a pod's namespace for transparent delivery, per family. Idempotent. IPv4 is
/// required (an error is returned); IPv6 is set up when the pod has IPv6 (`Err` in the second
/// value says why not, for the log).
pub fn prepare_pod(netns: &PodNetns) -> io::Result<(Transparent, Option<String>)> {
    netns.run(|| -> io::Result<(Transparent, Option<String>)> {
        crate::sysctl::write_net("ipv4.tcp_fwmark_accept", "1")?;
        // Replies the kernel makes itself (a RST from a closed port, ICMP) must carry the
        // mark too, or a refused delivery would look like a timeout.
        crate::sysctl::write_net("ipv4.fwmark_reflect", "1")?;
        route_marked("-4", "0.0.0.0/0")?;
        let v6 = crate::sysctl::write_net("ipv6.fwmark_reflect", "1").and_then(|()| route_marked("-6", "::/0"));
        let why_not_v6 = v6.err().map(|e| e.to_string());
        Ok((Transparent { v4: true, v6: why_not_v6.is_none() }, why_not_v6))
    })?
}

/// `ip rule fwmark MARK lookup TABLE` + `ip route local DEFAULT dev lo table TABLE` for one family.
fn route_marked(family: &str, default: &str) -> io::Result<()> {
    let mark = format!("{DELIVERY_MARK:#x}/{MARK_MASK:#x}");
    let rules = ip(&[family, "rule", "show", "pref", &RULE_PREF.to_string()])?;
    if !rules.contains(&format!("lookup {TABLE}")) {
        ip(&[family, "rule", "add", "pref", &RULE_PREF.to_string(), "fwmark", &mark, "lookup", &TABLE.to_string()])?;
    }
    ip(&[family, "route", "replace", "local", default, "dev", "lo", "table", &TABLE.to_string()])?;
    Ok(())
}

/// IPv6 link-local (fe80::/10).
pub fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

fn ip(args: &[&str]) -> io::Result<String> {
    // The child inherits the calling thread's network namespace: this runs on the pod's
    // netns worker thread.
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(e.kind(), format!("running `ip` (iproute2 is needed on the node): {e}"))
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Connects to `target` (an address of the pod itself) from inside the pod's namespace,
/// appearing to come from `client` when the pod was prepared for it; otherwise from the pod's
/// own address.
pub async fn connect(
    redirector: &Redirector,
    netns: &Arc<PodNetns>,
    transparent: Transparent,
    client: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let client = client.to_canonical();
    let socket = netns.tcp_socket(target).await?;
    let sock = socket2::SockRef::from(&socket);
    let mut bound = false;
    if transparent.for_family(target.ip())
        && client.is_ipv4() == target.is_ipv4()
        && !is_link_local(client)
        && !is_link_local(target.ip())
    {
        let spoof = set_transparent(&sock, target.is_ipv6())
            .and_then(|_| sock.set_mark(DELIVERY_MARK))
            .and_then(|_| sock.bind(&SocketAddr::new(client, 0).into()));
        match spoof {
            Ok(()) => bound = true,
            Err(e) => warn!(%client, %target, error = %e, "cannot deliver with the client's address; using the pod's own"),
        }
    }
    if !bound {
        // Bind now (to the pod's own address, with its scope when link-local) so the source
        // port is known before the SYN.
        let own = match target {
            SocketAddr::V6(t) => SocketAddr::V6(std::net::SocketAddrV6::new(*t.ip(), 0, 0, t.scope_id())),
            SocketAddr::V4(t) => SocketAddr::new((*t.ip()).into(), 0),
        };
        sock.bind(&own.into())?;
    }
    let source = sock.local_addr()?.as_socket().ok_or_else(|| io::Error::other("delivery socket has no address"))?;
    // Our SYN must not be captured by the pod's inbound hook and handed back to us.
    redirector.delivery_started(source);
    let result = tokio::time::timeout(timeout, socket.connect(target)).await;
    redirector.delivery_done(source);
    match result {
        Ok(r) => r,
        Err(_) => {
            debug!(%target, "delivery connect timed out");
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer from {target} within {timeout:?}")))
        }
    }
}

/// `IP_TRANSPARENT` or, on an IPv6 socket, `IPV6_TRANSPARENT`: the socket may bind a
/// non-local address (the client's).
fn set_transparent(sock: &socket2::SockRef<'_>, v6: bool) -> io::Result<()> {
    if !v6 {
        return sock.set_ip_transparent(true);
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to an int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&**sock),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
