//! Upstream HTTP connections, pooled per (source pod, endpoint, HTTP version).
//!
//! The source pod is part of the key because every upstream socket is made in the source pod's
//! network namespace (the backend sees the pod's own IP) and, towards an enrolled pod, runs
//! inside an HBONE stream authenticated as the source pod's identity. An endpoint that is an
//! enrolled pod (on any node) is reached through its tunnel port: the upstream connection is
//! one CONNECT stream of the pooled mTLS tunnel connection, so many upstream connections share
//! one TLS session and are multiplexed over it.
//!
//! HTTP/1.1: a stack of idle connections per key, each used by one request at a time; a
//! connection goes back to the stack once its response body has been read to the end.
//! HTTP/2: one connection per key, shared by every concurrent request.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Method, Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, info};

use super::{io::TunnelIo, Body};
use crate::{
    identity::SpiffeId,
    l4::{self, DataPath, PodContext},
    transport::{
        client::{CONNECTION_WINDOW, STREAM_WINDOW},
        TunnelError, TunnelWatch,
    },
};

/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE_PER_KEY: usize = 64;
/// An idle connection older than this is closed. Below the 5 s keep-alive timeout of Node.js
/// servers, so sluice closes first and never sends a request on a connection the server is
/// closing (the classic keep-alive race behind sporadic 502s in meshes).
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Which HTTP version an upstream connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    Http2,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    src_pod: u32,
    endpoint: SocketAddr,
    wire: Wire,
}

/// Why an upstream request got no response.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("connecting to {endpoint}: {source}")]
    Connect { endpoint: SocketAddr, source: io::Error },
    #[error("tunnel to {endpoint}: {source}")]
    Tunnel { endpoint: SocketAddr, source: TunnelError },
    #[error("HTTP handshake with {endpoint}: {source}")]
    Handshake { endpoint: SocketAddr, source: hyper::Error },
    #[error("{endpoint}: {source}")]
    Request { endpoint: SocketAddr, source: hyper::Error },
}

impl UpstreamError {
    /// The endpoint never got the request (safe to try another one).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. } | UpstreamError::Tunnel { .. } | UpstreamError::Handshake { .. })
    }
}

/// Where one request goes and on whose behalf.
pub struct Dial<'a> {
    pub pod: &'a Arc<PodContext>,
    pub dp: &'a DataPath,
    pub endpoint: SocketAddr,
    /// The endpoint's mesh identity when it is an enrolled pod (reached through HBONE).
    pub mesh_peer: Option<SpiffeId>,
    pub wire: Wire,
}

/// Counters for the admin API.
#[derive(Debug, Default, Serialize)]
pub struct UpstreamCounters {
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub reused: AtomicU64,
    pub retried_on_fresh_connection: AtomicU64,
}

#[derive(Default)]
pub struct Upstreams {
    h1: Mutex<HashMap<Key, Vec<IdleH1>>>,
    h2: Mutex<HashMap<Key, PooledH2>>,
    pub counters: UpstreamCounters,
}

struct IdleH1 {
    sender: http1::SendRequest<Body>,
    since: Instant,
    tunnel: Option<TunnelWatch>,
}

#[derive(Clone)]
struct PooledH2 {
    sender: http2::SendRequest<Body>,
    tunnel: Option<TunnelWatch>,
}

/// Whether a connection may take more requests: open, and not inside a tunnel whose far end
/// is draining (then it is retired, and the next request opens a new tunnel stream, to the
/// destination's new sluice process during an upgrade).
fn reusable(tunnel: &Option<TunnelWatch>) -> bool {
    tunnel.as_ref().is_none_or(|t| !t.is_closing())
}

impl Upstreams {
    /// Sends `req` to the endpoint, on a pooled connection when one is ready. Returns the
    /// response head and when the request was handed to a ready connection (so the latency the
    /// balancer learns excludes connection set-up: a TCP and TLS handshake is not the
    /// endpoint being slow).
    pub async fn send(self: &Arc<Self>, d: &Dial<'_>, req: Request<Body>) -> Result<(Response<Incoming>, Instant), UpstreamError> {
        match d.wire {
            Wire::Http1 => self.send_h1(d, req).await,
            Wire::Http2 => self.send_h2(d, req).await,
        }
    }

    async fn send_h1(self: &Arc<Self>, d: &Dial<'_>, req: Request<Body>) -> Result<(Response<Incoming>, Instant), UpstreamError> {
        let key = Key { src_pod: d.pod.pod_id, endpoint: d.endpoint, wire: Wire::Http1 };
        let (mut sender, mut tunnel, reused) = match self.checkout_h1(&key) {
            Some((s, t)) => (s, t, true),
            None => {
                let (s, t) = self.connect_h1(d, false).await?;
                (s, t, false)
            }
        };
        // A request with no body on a reused connection can be sent again if the connection
        // turns out to be closing (the server's FIN crossed our request): keep a copy.
        let replay = (reused && is_replayable(&req)).then(|| copy_head(&req));
        let mut dispatched = Instant::now();
        let result = sender.try_send_request(req).await;
        let result = match result {
            Ok(resp) => Ok(resp),
            Err(mut e) => {
                let message = e.take_message();
                let err = e.into_error();
                let again = message.or_else(|| {
                    replay.filter(|_| err.is_incomplete_message() || err.is_canceled() || err.is_closed())
                });
                match again {
                    Some(req) if reused => {
                        self.counters.retried_on_fresh_connection.fetch_add(1, Ordering::Relaxed);
                        debug!(endpoint = %d.endpoint, error = %err, "pooled connection was closing; sending on a new one");
                        (sender, tunnel) = self.connect_h1(d, false).await?;
                        dispatched = Instant::now();
                        sender.send_request(req).await
                    }
                    _ => Err(err),
                }
            }
        };
        let resp = result.map_err(|source| UpstreamError::Request { endpoint: d.endpoint, source })?;
        // Back to the pool once the response body has been read and the connection can take
        // the next request.
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.checkin_h1(key, sender, tunnel);
            }
        });
        Ok((resp, dispatched))
    }

    fn checkout_h1(&self, key: &Key) -> Option<(http1::SendRequest<Body>, Option<TunnelWatch>)> {
        let mut pools = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pools.get_mut(key)?;
        while let Some(c) = idle.pop() {
            if c.sender.is_ready() && c.since.elapsed() < IDLE_TIMEOUT && reusable(&c.tunnel) {
                self.counters.reused.fetch_add(1, Ordering::Relaxed);
                return Some((c.sender, c.tunnel));
            }
        }
        None
    }

    fn checkin_h1(&self, key: Key, sender: http1::SendRequest<Body>, tunnel: Option<TunnelWatch>) {
        if !reusable(&tunnel) {
            return; // dropped: the connection (a stream of a draining tunnel) closes now
        }
        let mut pools = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        let idle = pools.entry(key).or_default();
        if idle.len() < MAX_IDLE_PER_KEY {
            idle.push(IdleH1 { sender, since: Instant::now(), tunnel });
        }
    }

    /// A new HTTP/1.1 connection; `upgrades` keeps it usable after a 101 or a CONNECT.
    async fn connect_h1(
        &self,
        d: &Dial<'_>,
        upgrades: bool,
    ) -> Result<(http1::SendRequest<Body>, Option<TunnelWatch>), UpstreamError> {
        let (io, tunnel) = self.dial(d).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Handshake { endpoint: d.endpoint, source })?;
        let endpoint = d.endpoint;
        if upgrades {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(%endpoint, error = %e, "upstream connection ended");
                }
            });
        } else {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%endpoint, error = %e, "upstream connection ended");
                }
            });
        }
        Ok((sender, tunnel))
    }

    async fn send_h2(&self, d: &Dial<'_>, req: Request<Body>) -> Result<(Response<Incoming>, Instant), UpstreamError> {
        let key = Key { src_pod: d.pod.pod_id, endpoint: d.endpoint, wire: Wire::Http2 };
        let pooled = self
            .h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|c| !c.sender.is_closed() && reusable(&c.tunnel))
            .map(|c| c.sender.clone());
        let (mut sender, reused) = match pooled {
            Some(s) => (s, true),
            None => (self.connect_h2(d, &key).await?, false),
        };
        if reused {
            self.counters.reused.fetch_add(1, Ordering::Relaxed);
        }
        let dispatched = Instant::now();
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, dispatched)),
            Err(mut e) => match e.take_message() {
                // The connection went away before the request was written (GOAWAY, reset):
                // one more try on a fresh connection.
                Some(req) if reused => {
                    self.counters.retried_on_fresh_connection.fetch_add(1, Ordering::Relaxed);
                    let mut fresh = self.connect_h2(d, &key).await?;
                    let dispatched = Instant::now();
                    let resp = fresh
                        .send_request(req)
                        .await
                        .map_err(|source| UpstreamError::Request { endpoint: d.endpoint, source })?;
                    Ok((resp, dispatched))
                }
                _ => Err(UpstreamError::Request { endpoint: d.endpoint, source: e.into_error() }),
            },
        }
    }

    async fn connect_h2(&self, d: &Dial<'_>, key: &Key) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let (io, tunnel) = self.dial(d).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            // Notice a dead peer on an idle connection instead of failing the next request.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Handshake { endpoint: d.endpoint, source })?;
        let endpoint = d.endpoint;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), PooledH2 { sender: sender.clone(), tunnel });
        Ok(sender)
    }

    /// Sends a request that asks to leave HTTP (an Upgrade, e.g. WebSocket, or CONNECT) on a
    /// connection of its own, which then belongs to the upgraded stream.
    pub async fn send_upgrade(&self, d: &Dial<'_>, req: Request<Body>) -> Result<(Response<Incoming>, Instant), UpstreamError> {
        let (mut sender, _) = self.connect_h1(d, true).await?;
        let dispatched = Instant::now();
        let resp = sender.send_request(req).await.map_err(|source| UpstreamError::Request { endpoint: d.endpoint, source })?;
        Ok((resp, dispatched))
    }

    /// Opens the byte stream to the endpoint: through the HBONE tunnel for an enrolled pod
    /// (plaintext if nothing serves its tunnel port, as the L4 path does), else plain TCP from
    /// the source pod's namespace.
    async fn dial(&self, d: &Dial<'_>) -> Result<(UpstreamIo, Option<TunnelWatch>), UpstreamError> {
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        let result = self.dial_inner(d).await;
        if result.is_err() {
            self.counters.connect_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn dial_inner(&self, d: &Dial<'_>) -> Result<(UpstreamIo, Option<TunnelWatch>), UpstreamError> {
        if let Some(peer) = &d.mesh_peer {
            match l4::open_tunnel(d.pod, d.dp, peer, d.endpoint).await {
                Ok((send, recv, watch)) => return Ok((UpstreamIo::Tunnel(TunnelIo::new(send, recv)), Some(watch))),
                Err(e) if e.is_unreachable() => {
                    d.dp.tunnel_fallbacks.fetch_add(1, Ordering::Relaxed);
                    info!(pod = %d.pod.key, endpoint = %d.endpoint, peer = %peer, error = %e, "no tunnel endpoint at the destination; sending plaintext");
                }
                Err(source) => return Err(UpstreamError::Tunnel { endpoint: d.endpoint, source }),
            }
        }
        let tcp = l4::connect(&d.pod.netns, d.endpoint, d.dp.connect_timeout)
            .await
            .map_err(|source| UpstreamError::Connect { endpoint: d.endpoint, source })?;
        Ok((UpstreamIo::Tcp(tcp), None))
    }

    /// Closes idle connections past their time and forgets closed HTTP/2 connections
    /// (periodically, off the request path).
    pub fn reap(&self) {
        let mut h1 = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        h1.retain(|_, idle| {
            idle.retain(|c| c.sender.is_ready() && c.since.elapsed() < IDLE_TIMEOUT && reusable(&c.tunnel));
            !idle.is_empty()
        });
        drop(h1);
        self.h2.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, c| !c.sender.is_closed() && reusable(&c.tunnel));
    }

    /// (idle HTTP/1.1 connections, HTTP/2 connections) held, for the admin view.
    pub fn sizes(&self) -> (usize, usize) {
        let h1 = self.h1.lock().unwrap_or_else(|p| p.into_inner()).values().map(Vec::len).sum();
        let h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner()).len();
        (h1, h2)
    }
}

/// Safe to send twice: an idempotent method and no body.
fn is_replayable(req: &Request<Body>) -> bool {
    use http_body::Body as _;
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
        && req.body().is_end_stream()
}

fn copy_head(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(super::empty_body());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The byte stream under an upstream HTTP connection.
pub enum UpstreamIo {
    Tcp(TcpStream),
    Tunnel(TunnelIo),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Tunnel(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
