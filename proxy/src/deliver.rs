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

/// Prepares a pod's namespace for transparent delivery. Idempotent.
pub fn prepare_pod(netns: &PodNetns) -> io::Result<()> {
    netns.run(|| -> io::Result<()> {
        crate::sysctl::write_net("ipv4.tcp_fwmark_accept", "1")?;
        // Replies the kernel makes itself (a RST from a closed port, ICMP) must carry the
        // mark too, or a refused delivery would look like a timeout.
        crate::sysctl::write_net("ipv4.fwmark_reflect", "1")?;
        let mark = format!("{DELIVERY_MARK:#x}/{MARK_MASK:#x}");
        let rules = ip(&["-4", "rule", "show", "pref", &RULE_PREF.to_string()])?;
        if !rules.contains(&format!("lookup {TABLE}")) {
            ip(&["-4", "rule", "add", "pref", &RULE_PREF.to_string(), "fwmark", &mark, "lookup", &TABLE.to_string()])?;
        }
        ip(&["-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &TABLE.to_string()])?;
        Ok(())
    })?
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
    transparent: bool,
    client: IpAddr,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = netns.tcp_socket(target).await?;
    let sock = socket2::SockRef::from(&socket);
    let mut bound = false;
    if transparent && client.is_ipv4() == target.is_ipv4() {
        let spoof = sock
            .set_ip_transparent(true)
            .and_then(|_| sock.set_mark(DELIVERY_MARK))
            .and_then(|_| sock.bind(&SocketAddr::new(client, 0).into()));
        match spoof {
            Ok(()) => bound = true,
            Err(e) => warn!(%client, %target, error = %e, "cannot deliver with the client's address; using the pod's own"),
        }
    }
    if !bound {
        // Bind now (to the pod's own address) so the source port is known before the SYN.
        sock.bind(&SocketAddr::new(target.ip(), 0).into())?;
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
