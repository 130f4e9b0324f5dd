//! HBONE client: HTTP/2 CONNECT streams inside mutual TLS 1.3 to a destination pod's
//! `IP:15008`, pooled per (source pod, source identity, destination identity, destination
//! address), each tunnel connection carrying many streams.
//!
//! The tunnel's TCP socket is made in the *source pod's* network namespace, so the tunnel
//! itself comes from the pod's IP (NetworkPolicy on the pod IP keeps working); that is why the
//! source pod is part of the pool key, on top of the identities and the address.
//!
//! Pooling ([`super::mux_pool`]): one handshake per key at a time, a further tunnel when the
//! open ones are at the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`, idle tunnels closed. Each
//! tunnel's task drives its h2 connection and keeps it honest: a PING every
//! `keepalive_interval` that must be answered within `keepalive_timeout`, or the tunnel is
//! evicted and closed (a black-holed peer would otherwise hold every new stream for the whole
//! connect timeout until TCP gives up, about 15 minutes). A CONNECT that gets no answer in time
//! evicts its tunnel at once, so the next stream makes a fresh one.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use h2::{
    client::{Connection, SendRequest},
    Ping, PingPong, RecvStream, SendStream,
};
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::Notify,
};
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use super::mux_pool::{
    Checkout, CheckoutError, Eviction, Multiplexed, MuxPool, PoolLimits, PoolStats, Pooled, Slot,
};
use crate::{
    admission::{Lease, Permit, Refusal, Shed},
    netns::PodNetns,
};

pub const HBONE_PORT: u16 = sluice_common::HBONE_PORT;
/// CONNECT header of a stream that carries HTTP (`http/1.1` or `h2c`) between two sluices.
pub const L7_HEADER: &str = "x-sluice-l7";

/// HTTP/2 windows sized for bulk transfers through the tunnel (the defaults, 64 KiB, would cap
/// a stream at 64 KiB per round trip).
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

#[derive(Debug, Error)]
pub enum TunnelError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("{addr} refused the tunnel to {target}: HTTP {status}")]
    Refused { addr: SocketAddr, target: SocketAddr, status: StatusCode },
    #[error("no TLS configuration for this identity pair: {0}")]
    Config(String),
    /// The failure of a tunnel handshake this stream waited for (or made for others too).
    #[error(transparent)]
    Shared(Arc<TunnelError>),
    #[error("too many streams already wait for the tunnel to {addr} to come up")]
    Busy { addr: SocketAddr },
    /// No socket may be opened for a new tunnel: the source pod, or the node, is at its
    /// connection bound.
    #[error("no new tunnel to {addr}: {refusal}")]
    NoSocket { addr: SocketAddr, refusal: Refusal },
}

impl TunnelError {
    /// Whether the destination actively said no (authorization), rather than failing.
    pub fn is_refusal(&self) -> bool {
        match self {
            TunnelError::Refused { .. } => true,
            TunnelError::Shared(e) => e.is_refusal(),
            _ => false,
        }
    }

    /// The admission bound that kept a new tunnel from being opened, if that is what failed.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            TunnelError::NoSocket { refusal, .. } => Some(*refusal),
            TunnelError::Shared(e) => e.refusal(),
            _ => None,
        }
    }

    /// Whether nothing listens on the destination's tunnel port (its node's sluice is not
    /// serving that pod): the TCP connection itself was refused.
    pub fn is_unreachable(&self) -> bool {
        match self {
            TunnelError::Connect { source, .. } => source.kind() == io::ErrorKind::ConnectionRefused,
            TunnelError::Shared(e) => e.is_unreachable(),
            _ => false,
        }
    }
}

/// Tells whether the tunnel connection a stream rides on still takes new streams. After the
/// destination's sluice sent GOAWAY (it is draining: an upgrade, a shutdown) the streams in
/// flight finish, but a long-lived connection inside one (a pooled upstream HTTP connection)
/// must be retired after its current request, or the old process would carry it until its
/// drain timeout and then cut it.
#[derive(Clone)]
pub struct TunnelWatch(SendRequest<Bytes>);

impl TunnelWatch {
    /// The tunnel got GOAWAY or is gone.
    pub fn is_closing(&self) -> bool {
        closing(&self.0)
    }
}

fn closing(sender: &SendRequest<Bytes>) -> bool {
    let mut sender = sender.clone();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(sender.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
}

impl std::fmt::Debug for TunnelWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelWatch")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_pod: u32,
    pub src_identity: Arc<str>,
    pub dst_identity: Arc<str>,
    pub dst: IpAddr,
}

/// One pooled tunnel connection, as the pool sees it.
pub struct TunnelConn {
    sender: SendRequest<Bytes>,
    /// Asks the tunnel's task for a PING now (a CONNECT went unanswered).
    probe: Notify,
    /// The tunnel socket's admission unit (given back when the task closes the socket, or at
    /// once when the pool closes the tunnel to make room).
    unit: Option<Arc<Lease>>,
}

impl Multiplexed for TunnelConn {
    fn max_streams(&self) -> usize {
        self.sender.current_max_send_streams()
    }

    fn takes_streams(&self) -> bool {
        !closing(&self.sender)
    }
}

/// A stream's place in its tunnel's count of open streams.
pub type TunnelSlot = Slot<PoolKey, TunnelConn>;

/// One CONNECT stream through a tunnel.
pub struct TunnelStream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub watch: TunnelWatch,
    /// Counts the stream against its tunnel's (and the peer's) stream limit: keep it as long
    /// as either half is in use.
    pub slot: TunnelSlot,
}

/// Timing and bounds of the tunnel pool.
#[derive(Debug, Clone, Copy)]
pub struct TunnelPoolConfig {
    pub limits: PoolLimits,
    /// A PING this often on every tunnel, idle or not.
    pub keepalive_interval: Duration,
    /// A PING unanswered for this long evicts and closes the tunnel.
    pub keepalive_timeout: Duration,
}

impl Default for TunnelPoolConfig {
    fn default() -> Self {
        Self {
            limits: PoolLimits {
                // A tunnel costs a TCP and an mTLS handshake with certificate checks: kept
                // longer than an upstream HTTP/2 connection. Keepalive PINGs make sure an idle
                // one is alive when the next stream comes.
                idle_timeout: Duration::from_secs(90),
                max_conns_per_key: 8,
                max_keys: 8192,
                // A quarter per source pod, as its share of the node's connections.
                max_keys_per_owner: 2048,
                max_waiters: 4096,
            },
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

type Pool = MuxPool<PoolKey, TunnelConn, TunnelError>;

pub struct HbonePool {
    pool: Arc<Pool>,
    cfg: TunnelPoolConfig,
}

impl Default for HbonePool {
    fn default() -> Self {
        Self::new(TunnelPoolConfig::default())
    }
}

impl HbonePool {
    pub fn new(cfg: TunnelPoolConfig) -> Self {
        Self { pool: Arc::new(MuxPool::with_owners(cfg.limits, |k: &PoolKey| k.src_pod)), cfg }
    }

    /// Opens a tunnel stream to `target` through the destination's HBONE port, reusing a pooled
    /// connection when one has room. A new tunnel's socket first takes its admission unit from
    /// `unit` (on the source pod's behalf).
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        &self,
        key: &PoolKey,
        netns: &PodNetns,
        tls: Arc<rustls::ClientConfig>,
        target: SocketAddr,
        timeout: Duration,
        l7: Option<&'static str>,
        unit: impl FnOnce() -> Result<Permit, Refusal>,
    ) -> Result<TunnelStream, TunnelError> {
        let dial = || async move {
            let addr = SocketAddr::new(key.dst, HBONE_PORT);
            let permit = unit().map_err(|refusal| TunnelError::NoSocket { addr, refusal })?;
            let io = dial_tls(netns, tls, key.dst, timeout).await?;
            Ok((io, Some(Lease::new(permit))))
        };
        self.open_with(key, target, timeout, l7, dial).await
    }

    /// As [`HbonePool::open`], with `dial` making the byte stream under a new tunnel, with its
    /// admission unit (TCP from the pod's namespace and TLS, in production; tests dial in
    /// memory).
    pub async fn open_with<F, Fut, Io>(
        &self,
        key: &PoolKey,
        target: SocketAddr,
        timeout: Duration,
        l7: Option<&'static str>,
        dial: F,
    ) -> Result<TunnelStream, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Io, Option<Arc<Lease>>), TunnelError>>,
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let hbone = SocketAddr::new(key.dst, HBONE_PORT);
        let slot = match self.pool.checkout(key).await {
            Ok(Checkout::Ready(slot)) => slot,
            Ok(Checkout::Connect(leader)) => match self.connect(key, timeout, dial).await {
                Ok((conn, driver)) => {
                    let slot = leader.finish(conn);
                    tokio::spawn(driver.run(slot.pooled().clone(), self.pool.clone(), self.cfg));
                    slot
                }
                Err(e) => return Err(TunnelError::Shared(leader.fail(e))),
            },
            Err(CheckoutError::Failed(e)) => return Err(TunnelError::Shared(e)),
            Err(CheckoutError::TooManyWaiters | CheckoutError::NotAdmitted) => {
                return Err(TunnelError::Busy { addr: hbone })
            }
        };
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .expect("CONNECT request parts are valid");
        if let Some(proto) = l7 {
            // The stream carries one HTTP connection of the source sluice: the destination's
            // sluice serves it as HTTP too (per-request telemetry on that side).
            request.headers_mut().insert(L7_HEADER, http::HeaderValue::from_static(proto));
        }
        let mut sender = slot.conn().sender.clone();
        let watch = TunnelWatch(sender.clone());
        let (response, send) =
            sender.send_request(request, false).map_err(|source| TunnelError::H2 { addr: hbone, source })?;
        let response = match tokio::time::timeout(timeout, response).await {
            Ok(r) => r.map_err(|source| TunnelError::H2 { addr: hbone, source })?,
            Err(_) => {
                // No answer: the next stream must not queue on this tunnel too. It stays up
                // for its other streams, and an immediate PING closes it if the peer is gone.
                // (A stream that queued behind the peer's stream limit says nothing about the
                // peer.)
                if !slot.queued() {
                    if self.pool.evict(slot.pooled(), Eviction::ConnectTimeout) {
                        info!(%hbone, %target, "no answer to CONNECT; tunnel evicted");
                    }
                    slot.conn().probe.notify_one();
                }
                return Err(TunnelError::Connect {
                    addr: hbone,
                    source: io::Error::new(io::ErrorKind::TimedOut, "no answer to CONNECT"),
                });
            }
        };
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused { addr: hbone, target, status: response.status() });
        }
        Ok(TunnelStream { send, recv: response.into_body(), watch, slot })
    }

    /// A new tunnel over what `dial` returns. It is ready once the peer answered a first PING:
    /// its SETTINGS come before that answer, so its stream limit is known before any stream is
    /// counted against it (h2 assumes no limit until then, and a burst would queue inside h2
    /// instead of opening a second tunnel).
    async fn connect<F, Fut, Io>(
        &self,
        key: &PoolKey,
        timeout: Duration,
        dial: F,
    ) -> Result<(TunnelConn, Driver<Io>), TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Io, Option<Arc<Lease>>), TunnelError>>,
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = SocketAddr::new(key.dst, HBONE_PORT);
        // The unit is dropped with the handshake's future if it fails: its socket is closed.
        let (io, unit) = dial().await?;
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|source| TunnelError::H2 { addr, source })?;
        let mut ping = connection.ping_pong().expect("a new connection has its PingPong");
        let mut connection = Box::pin(connection);
        let settled = async {
            tokio::select! {
                r = ping.ping(Ping::opaque()) => r.map(|_| ()),
                r = connection.as_mut() => Err(r.err().unwrap_or_else(|| h2::Error::from(h2::Reason::NO_ERROR))),
            }
        };
        match tokio::time::timeout(timeout, settled).await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(TunnelError::H2 { addr, source }),
            Err(_) => {
                return Err(TunnelError::Connect {
                    addr,
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the tunnel's HTTP/2 handshake got no answer",
                    ),
                })
            }
        }
        info!(%addr, src = %key.src_identity, dst = %key.dst_identity, "tunnel established");
        let driver = Driver { connection, ping, addr, peer: key.dst_identity.clone() };
        Ok((TunnelConn { sender, probe: Notify::new(), unit }, driver))
    }

    /// The pool's counters.
    pub fn stats(&self) -> &PoolStats {
        &self.pool.stats
    }

    /// Evicts tunnels that no longer take streams (GOAWAY); periodic, off the data path.
    pub fn sweep(&self) {
        self.pool.sweep();
    }

    /// Closes the idle tunnels (no stream) of `scope`'s source pod, or of every pod, giving
    /// their sockets' units back at once. Returns how many units it gave back.
    pub fn shed_idle(&self, scope: Shed) -> usize {
        let matches = |k: &PoolKey| scope == Shed::Any || scope == Shed::Pod(k.src_pod);
        self.pool.shed_idle(matches, |c| c.unit.as_ref().is_some_and(|u| u.revoke()))
    }

    /// Number of pooled tunnel connections (for the admin view).
    pub fn len(&self) -> usize {
        self.pool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The task of one tunnel connection: drives it, PINGs it, and closes it when it is idle, its
/// peer stops answering, or it was evicted and its last stream ended.
struct Driver<Io> {
    connection: Pin<Box<Connection<Io, Bytes>>>,
    ping: PingPong,
    addr: SocketAddr,
    peer: Arc<str>,
}

impl<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static> Driver<Io> {
    async fn run(self, pooled: Arc<Pooled<PoolKey, TunnelConn>>, pool: Arc<Pool>, cfg: TunnelPoolConfig) {
        let Driver { mut connection, mut ping, addr, peer } = self;
        tokio::select! {
            result = connection.as_mut() => {
                pool.evict(&pooled, Eviction::Closed);
                match result {
                    Ok(()) => debug!(%addr, %peer, "tunnel connection ended"),
                    Err(e) => debug!(%addr, %peer, error = %e, "tunnel connection ended"),
                }
            }
            why = pool.until_retired(&pooled) => {
                debug!(%addr, %peer, reason = ?why, "closing tunnel");
            }
            () = keepalive(&mut ping, &pooled.conn().probe, &cfg) => {
                pool.evict(&pooled, Eviction::Keepalive);
                info!(%addr, %peer, timeout_ms = cfg.keepalive_timeout.as_millis() as u64, "tunnel peer did not answer a PING; tunnel closed");
            }
        }
        // Dropping the connection closes the socket; streams still on it fail. Its unit goes
        // with it (streams may keep the pooled entry a moment longer, not the socket).
        drop(connection);
        if let Some(unit) = &pooled.conn().unit {
            unit.revoke();
        }
    }
}

/// Returns when a PING went unanswered for `keepalive_timeout`. PINGs go every
/// `keepalive_interval`, and at once when `probe` is notified.
async fn keepalive(ping: &mut PingPong, probe: &Notify, cfg: &TunnelPoolConfig) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.keepalive_interval) => {}
            _ = probe.notified() => {}
        }
        match tokio::time::timeout(cfg.keepalive_timeout, ping.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection failed: its own branch ends the task.
            Ok(Err(_)) => std::future::pending::<()>().await,
            Err(_) => return,
        }
    }
}

/// TCP from the source pod's network namespace to the destination's tunnel port, then TLS.
async fn dial_tls(
    netns: &PodNetns,
    tls: Arc<rustls::ClientConfig>,
    dst: IpAddr,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, TunnelError> {
    let addr = SocketAddr::new(dst, HBONE_PORT);
    let connect = async {
        let socket = netns.tcp_socket(addr).await?;
        socket.connect(addr).await
    };
    let tcp = tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))
        })
        .map_err(|source| TunnelError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    // Identity is checked by the verifier against the expected SPIFFE ID; the name only has to
    // be well-formed, and HBONE dials an IP.
    let name = ServerName::IpAddress(dst.into());
    tokio::time::timeout(timeout, TlsConnector::from(tls).connect(name, tcp))
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")))
        .map_err(|source| TunnelError::Tls { addr, source })
}

#[cfg(test)]
mod tests;
