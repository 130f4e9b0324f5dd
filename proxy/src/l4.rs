//! The L4 data path: accept on a pod's outbound listener, find where the connection was going,
//! pick an endpoint, connect from inside the pod's network namespace, and forward bytes both
//! ways with backpressure, half-close and reset propagation.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
};
use tracing::{debug, info, warn};

use crate::{
    conns::{ConnRegistry, Direction, NewConn, PodStats},
    discovery::Model,
    identity::{CertManager, SpiffeId},
    netns::PodNetns,
    redirect::Redirector,
    routing::{self, RoundRobin},
    transport::{pump, HbonePool, PoolKey, TunnelError},
};

/// Per-direction copy buffer. Allocated only once a connection has data to move, so idle
/// connections cost no buffer memory.
const COPY_BUF: usize = 16 * 1024;

/// Everything the data path knows about the pod a listener belongs to.
pub struct PodContext {
    pub pod_id: u32,
    /// "namespace/name"
    pub key: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub ip: IpAddr,
    /// The pod's SPIFFE identity.
    pub identity: SpiffeId,
    pub identity_str: Arc<str>,
    pub netns: Arc<PodNetns>,
    pub stats: Arc<PodStats>,
    /// Whether the pod's namespace is prepared for delivery with the client's source address.
    pub transparent: bool,
}

/// Shared state of the data path (read-mostly; the control path swaps `model`).
pub struct DataPath {
    pub redirector: Arc<Redirector>,
    pub model: Arc<ArcSwap<Model>>,
    pub conns: Arc<ConnRegistry>,
    pub balancer: RoundRobin,
    pub connect_timeout: Duration,
    pub identity: Arc<CertManager>,
    pub trust_domain: String,
    pub pool: HbonePool,
    /// Connections sent plaintext because the destination had no tunnel endpoint.
    pub tunnel_fallbacks: AtomicU64,
}

/// Accepts connections on one of a pod's outbound listeners until the task is aborted
/// (the pod is released). Connections already accepted live on independently.
pub async fn serve_listener(listener: TcpListener, pod: Arc<PodContext>, dp: Arc<DataPath>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                let dp = dp.clone();
                tokio::spawn(async move { handle(stream, peer, pod, dp).await });
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the listener stays.
                warn!(pod = %pod.key, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, dp: Arc<DataPath>) {
    let Some(orig) = dp.redirector.take_original(pod.pod_id, peer) else {
        // Someone connected to 15001 directly, not through the redirect: nothing to forward to.
        debug!(pod = %pod.key, %peer, "connection without a recorded original destination; closing");
        reset(&client);
        return;
    };
    let model = dp.model.load();
    let target = routing::resolve(&model, orig.addr);
    let Some(endpoint) = dp.balancer.pick(&target) else {
        warn!(pod = %pod.key, dst = %orig.addr, service = ?target.service, "no ready endpoints; resetting connection");
        reset(&client);
        return;
    };
    // An endpoint that is an enrolled pod (on any node) is reached through its HBONE port,
    // with mutual TLS carrying both pods' identities.
    let mesh_peer = model
        .pod_by_ip(endpoint.ip())
        .filter(|p| !p.host_network && model.is_enrolled(&p.namespace))
        .map(|p| SpiffeId::for_pod(&dp.trust_domain, p));
    drop(model);

    let _ = client.set_nodelay(true);
    if let Some(peer_id) = mesh_peer {
        match open_tunnel(&pod, &dp, &peer_id, endpoint).await {
            Ok((send, recv)) => {
                let guard = dp.conns.open(&pod.stats, new_conn(&pod, peer, orig.addr, &target, endpoint, Some(&peer_id)));
                debug!(pod = %pod.key, dst = %orig.addr, %endpoint, peer = %peer_id, id = guard.entry.id, "forwarding through tunnel");
                pump::tcp_h2(client, send, recv, &guard.entry.sent, &guard.entry.received).await;
                return;
            }
            // Nobody serves the mesh at the destination (its node's sluice is down, or has not
            // enrolled the pod yet): like fail-open, do not black-hole the connection; go
            // plaintext. (A STRICT destination still refuses it; TLS and identity failures
            // never fall back.)
            Err(e) if e.is_unreachable() => {
                dp.tunnel_fallbacks.fetch_add(1, Ordering::Relaxed);
                info!(pod = %pod.key, dst = %orig.addr, %endpoint, peer = %peer_id, error = %e, "no tunnel endpoint at the destination; sending plaintext");
            }
            Err(e) => {
                warn!(pod = %pod.key, dst = %orig.addr, %endpoint, peer = %peer_id, error = %e, "tunnel failed; resetting client");
                reset(&client);
                return;
            }
        }
    }
    let upstream = match connect(&pod.netns, endpoint, dp.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            // We already accepted the client, so the closest to "refused" we can say is a reset.
            info!(pod = %pod.key, dst = %orig.addr, %endpoint, error = %e, "upstream connect failed; resetting client");
            reset(&client);
            return;
        }
    };
    let guard = dp.conns.open(&pod.stats, new_conn(&pod, peer, orig.addr, &target, endpoint, None));
    debug!(pod = %pod.key, dst = %orig.addr, %endpoint, id = guard.entry.id, "forwarding");
    forward(client, upstream, &guard.entry.sent, &guard.entry.received).await;
}

fn new_conn(
    pod: &PodContext,
    peer: SocketAddr,
    original_dst: SocketAddr,
    target: &routing::Target,
    endpoint: SocketAddr,
    mesh_peer: Option<&SpiffeId>,
) -> NewConn {
    NewConn {
        direction: Direction::Outbound,
        peer_identity: mesh_peer.map(|id| Arc::from(id.to_string())),
        mtls: mesh_peer.is_some(),
        source_pod: pod.key.clone(),
        source_addr: SocketAddr::new(pod.ip, peer.port()),
        original_dst,
        service: target.service.clone(),
        endpoint,
    }
}

async fn open_tunnel(
    pod: &PodContext,
    dp: &DataPath,
    peer_id: &SpiffeId,
    endpoint: SocketAddr,
) -> Result<(h2::SendStream<bytes::Bytes>, h2::RecvStream), TunnelError> {
    let tls = dp
        .identity
        .client_config(&pod.identity, peer_id.clone())
        .map_err(|e| TunnelError::Config(format!("no client certificate for {}: {e}", pod.identity)))?;
    let key = PoolKey {
        src_pod: pod.pod_id,
        src_identity: pod.identity_str.clone(),
        dst_identity: peer_id.to_string().into(),
        dst: endpoint.ip(),
    };
    dp.pool.open(&key, &pod.netns, tls, endpoint, dp.connect_timeout).await
}

async fn connect(netns: &PodNetns, endpoint: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = netns.tcp_socket(endpoint).await?;
    match tokio::time::timeout(timeout, socket.connect(endpoint)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
    }
}

/// Copies both directions until both are done. EOF on one side becomes a FIN (shutdown of the
/// write half) on the other, so half-closed connections keep working; a reset on one side
/// becomes a reset on the other.
pub async fn forward(client: TcpStream, upstream: TcpStream, sent: &AtomicU64, received: &AtomicU64) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, sent);
    let down = pump(ur, cw, received);
    // If either direction fails, try_join drops the other: both sockets close, and the one
    // `pump` marked with linger 0 closes with a RST.
    let _ = tokio::try_join!(up, down);
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, counter: &AtomicU64) -> io::Result<()> {
    // Wait for data before allocating the buffer (idle connections hold none).
    if let Err(e) = from.readable().await {
        set_linger_zero(to.as_ref());
        return Err(e);
    }
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                // Half-close: pass the FIN on and keep the other direction running.
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) => {
                set_linger_zero(to.as_ref());
                return Err(e);
            }
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            // The receiving side is gone (reset or closed): reset the sending side too.
            set_linger_zero(from.as_ref());
            return Err(e);
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Closes with a RST instead of a FIN once the socket is dropped.
fn set_linger_zero(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn reset(stream: &TcpStream) {
    set_linger_zero(stream);
}
