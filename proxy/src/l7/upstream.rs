//! Upstream HTTP connections, pooled per (source pod, endpoint, HTTP version, TLS origination).
//!
//! The source pod is part of the key because every upstream socket is made in the source pod's
//! network namespace (the backend sees the pod's own IP) and, towards an enrolled pod, runs
//! inside an HBONE stream authenticated as the source pod's identity. An endpoint that is an
//! enrolled pod (on any node) is reached through its tunnel port: the upstream connection is
//! one CONNECT stream of the pooled mTLS tunnel connection, so many upstream connections share
//! one TLS session and are multiplexed over it. An external destination with TLS origination
//! (a TrafficPolicy `tls` on its ServiceEntry) gets a TLS connection sluice opens itself.
//!
//! HTTP/1.1: a stack of idle connections per key, each used by one request at a time; a
//! connection goes back to the stack once its response body has been read to the end.
//! HTTP/2: connections shared by every concurrent request of the key, in the multiplexed pool
//! ([`crate::transport::mux_pool`]): one handshake per key at a time, another connection when
//! the open ones are at the peer's stream limit, closed after a minute without requests, and
//! evicted as soon as hyper's keepalive PING goes unanswered.

use std::{
    future::Future,
    hash::BuildHasher as _,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
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
use rustls_pki_types::ServerName;
use serde::Serialize;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, info};

use super::{
    io::TunnelIo,
    limits::{acquire, Breaker, Overflow},
    Body,
};
use crate::{
    admission::{Lease, Refusal, Shed},
    discovery::traffic::CircuitBreaker,
    identity::SpiffeId,
    l4::{self, DataPath, PodContext},
    transport::{
        client::{TunnelSlot, CONNECTION_WINDOW, STREAM_WINDOW},
        mux_pool::{
            Checkout, CheckoutError, Eviction, Multiplexed, MuxPool, PoolLimits, PoolStats, Pooled, Slot,
        },
        TunnelError, TunnelWatch,
    },
};

/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE_PER_KEY: usize = 64;
/// An idle connection older than this is closed. Below the 5 s keep-alive timeout of Node.js
/// servers, so sluice closes first and never sends a request on a connection the server is
/// closing (the classic keep-alive race behind sporadic 502s in meshes).
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Bounds of the HTTP/2 pool. Idle connections close after a minute: below the 75 s after
/// which nginx closes idle HTTP/2 connections, the most common shorter server-side timeout, so
/// that sluice rarely sends on a connection its server is closing.
const H2_LIMITS: PoolLimits = PoolLimits {
    idle_timeout: Duration::from_secs(60),
    max_conns_per_key: 8,
    max_keys: 8192,
    // A quarter per source pod, as its share of the node's connections.
    max_keys_per_owner: 2048,
    max_waiters: 4096,
};
/// hyper's HTTP/2 keepalive: a PING after this long without a frame from the peer, idle or
/// not, and the connection ends if it goes unanswered for [`H2_KEEPALIVE_TIMEOUT`].
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The TLS server name when sluice originates TLS, and the identity of the client
    /// configuration (its address): a connection made under other trust anchors, another
    /// client certificate or other subjectAltNames (a policy or DestinationRule edited a moment
    /// ago) is not reused. A pooled connection holds its configuration alive, so the address
    /// cannot be reused by another configuration while the connection is in the pool.
    tls: Option<(Arc<str>, usize)>,
}

/// Why an upstream request got no response.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("connecting to {endpoint}: {source}")]
    Connect { endpoint: SocketAddr, source: io::Error },
    #[error("tunnel to {endpoint}: {source}")]
    Tunnel { endpoint: SocketAddr, source: TunnelError },
    #[error("TLS with {endpoint} ({server_name}): {source}")]
    Tls { endpoint: SocketAddr, server_name: Arc<str>, source: io::Error },
    #[error("HTTP handshake with {endpoint}: {source}")]
    Handshake { endpoint: SocketAddr, source: hyper::Error },
    #[error("{endpoint}: {source}")]
    Request { endpoint: SocketAddr, source: hyper::Error },
    #[error("circuit breaker: {} reached", .0.as_str())]
    Overflow(Overflow),
    /// The failure of a connection attempt this request waited for (or made for others too).
    #[error(transparent)]
    Shared(Arc<UpstreamError>),
    #[error("too many requests already wait for a connection to {endpoint}")]
    Busy { endpoint: SocketAddr },
    /// The destination is a mesh pod whose tunnel port refused, and its peer authentication
    /// requires mutual TLS: the request is not sent plaintext instead (see `plaintext_fallback`).
    #[error("{endpoint} requires mutual TLS ({}) and its tunnel port refused ({reason}); not sent as plaintext", .mode.as_str())]
    StrictNoTunnel { endpoint: SocketAddr, mode: crate::discovery::PeerAuthMode, reason: String },
}

impl UpstreamError {
    /// The endpoint never got the request (safe to try another one).
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::Tunnel { .. }
            | UpstreamError::Handshake { .. }
            | UpstreamError::Busy { .. }
            | UpstreamError::StrictNoTunnel { .. } => true,
            UpstreamError::Shared(e) => e.is_connect(),
            UpstreamError::Tls { .. } | UpstreamError::Request { .. } | UpstreamError::Overflow(_) => false,
        }
    }

    /// The error a request gets from a connection attempt it shared. Kinds that the error
    /// replies tell apart (a circuit breaker's overflow, TLS, connect) are copied as they are;
    /// the rest are wrapped.
    fn shared(e: Arc<UpstreamError>) -> UpstreamError {
        let copy = |s: &io::Error| io::Error::new(s.kind(), s.to_string());
        match &*e {
            UpstreamError::Overflow(o) => UpstreamError::Overflow(*o),
            UpstreamError::Connect { endpoint, source } => {
                UpstreamError::Connect { endpoint: *endpoint, source: copy(source) }
            }
            UpstreamError::Tls { endpoint, server_name, source } => UpstreamError::Tls {
                endpoint: *endpoint,
                server_name: server_name.clone(),
                source: copy(source),
            },
            UpstreamError::Busy { endpoint } => UpstreamError::Busy { endpoint: *endpoint },
            UpstreamError::StrictNoTunnel { endpoint, mode, reason } => {
                UpstreamError::StrictNoTunnel { endpoint: *endpoint, mode: *mode, reason: reason.clone() }
            }
            _ => UpstreamError::Shared(e),
        }
    }

    /// HTTP/2 REFUSED_STREAM: the endpoint did not process the request.
    pub fn is_refused_stream(&self) -> bool {
        let UpstreamError::Request { source, .. } = self else { return false };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(c) = cause {
            if let Some(h2) = c.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            cause = c.source();
        }
        false
    }
}

/// A failed send, with the request back when it never left sluice (so that it can be sent to
/// another endpoint as it is, body included).
pub struct SendError {
    pub error: UpstreamError,
    pub request: Option<Request<Body>>,
}

impl From<UpstreamError> for SendError {
    fn from(error: UpstreamError) -> Self {
        SendError { error, request: None }
    }
}

/// TLS that sluice originates towards an external destination.
#[derive(Clone)]
pub struct TlsTarget {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub sni: Arc<str>,
}

/// Where one request goes and on whose behalf.
pub struct Dial<'a> {
    pub pod: &'a Arc<PodContext>,
    pub dp: &'a DataPath,
    pub endpoint: SocketAddr,
    /// The endpoint's mesh identity when it is an enrolled pod (reached through HBONE).
    pub mesh_peer: Option<SpiffeId>,
    pub wire: Wire,
    /// The destination's circuit breaker and its limits (connections, pending requests).
    pub breaker: Option<(Arc<Breaker>, CircuitBreaker)>,
    pub tls: Option<TlsTarget>,
    /// A DestinationRule's ISTIO_MUTUAL towards a destination outside the mesh: mTLS with the
    /// source pod's own certificate, the server verified as this SPIFFE ID (towards an
    /// enrolled pod the HBONE tunnel is that already).
    pub istio_mutual: Option<IstioMutual>,
    pub connect_timeout: Duration,
    /// An idle pooled HTTP/1.1 connection is not reused after this (a DestinationRule's
    /// `http.idleTimeout`, when shorter than sluice's own).
    pub idle_timeout: Option<Duration>,
}

/// ISTIO_MUTUAL origination towards a destination outside the mesh.
#[derive(Debug, Clone)]
pub struct IstioMutual {
    pub server: SpiffeId,
    /// The SNI sent (Istio sends the destination's host).
    pub sni: Arc<str>,
}

/// Counters for the admin API.
#[derive(Debug, Default, Serialize)]
pub struct UpstreamCounters {
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub reused: AtomicU64,
    pub retried_on_fresh_connection: AtomicU64,
    pub tls_originated: AtomicU64,
}

/// Shards of the HTTP/1.1 idle pool: a checkout and a checkin per request each take one
/// shard's lock, so requests to different endpoints (or from different pods) rarely meet.
const H1_SHARDS: usize = 16;

/// One shard of the idle HTTP/1.1 connections, by key. foldhash (hashbrown's default, seeded
/// per process) rather than SipHash: a key is a pod index, an endpoint address and a TLS
/// configuration, none of them a client's choice.
type H1Shard = Mutex<hashbrown::HashMap<Key, Vec<IdleH1>>>;

pub struct Upstreams {
    h1: [H1Shard; H1_SHARDS],
    /// Which shard a key is in.
    h1_shard_hash: hashbrown::DefaultHashBuilder,
    h2: Arc<H2Pool>,
    pub counters: UpstreamCounters,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            h1: std::array::from_fn(|_| Mutex::default()),
            h1_shard_hash: hashbrown::DefaultHashBuilder::default(),
            h2: Arc::new(MuxPool::with_owners(H2_LIMITS, |k: &Key| k.src_pod)),
            counters: UpstreamCounters::default(),
        }
    }
}

/// An HTTP/1.1 connection and what decides whether it may be reused.
struct H1Conn {
    sender: http1::SendRequest<Body>,
    tunnel: Option<TunnelWatch>,
    /// Requests sent on it so far (for `maxRequestsPerConnection`).
    requests: u32,
    /// Its socket's admission unit (`None` inside a tunnel: the tunnel holds the unit).
    unit: Option<Arc<Lease>>,
    /// How long it may sit idle in the pool (at most [`IDLE_TIMEOUT`]).
    idle_timeout: Duration,
}

struct IdleH1 {
    conn: H1Conn,
    since: Instant,
}

/// A pooled HTTP/2 connection, as the pool sees it.
struct H2Conn {
    sender: http2::SendRequest<StreamBody>,
    tunnel: Option<TunnelWatch>,
    /// hyper's connection (its request dispatcher), polled by the connection's task; `None`
    /// once that task is done with it. The pool reads the peer's current stream limit from it,
    /// the only place hyper has it: a copy kept by the task alone would be stale, as nothing
    /// wakes the dispatcher when the peer's SETTINGS arrive after the first request went out.
    connection: Mutex<Option<Pin<Box<H2Connection>>>>,
    /// The peer's stream limit as last read, for when the task is polling the connection (the
    /// pool asks under its node-wide lock, which must never wait for a connection's poll).
    max_streams_seen: AtomicUsize,
    /// Its socket's admission unit (`None` inside a tunnel: the tunnel holds the unit).
    unit: Option<Arc<Lease>>,
}

impl H2Conn {
    /// Reads the peer's stream limit from hyper's connection and remembers it.
    fn read_max_streams(&self, connection: &Option<Pin<Box<H2Connection>>>) -> usize {
        let n = connection.as_ref().map_or(0, |c| c.current_max_send_streams());
        self.max_streams_seen.store(n, Ordering::Relaxed);
        n
    }
}

impl Multiplexed for H2Conn {
    fn max_streams(&self) -> usize {
        // Read live when the connection's task is not in the middle of a poll (almost always);
        // else the value the task published after its last poll, never older than that poll.
        match self.connection.try_lock() {
            Ok(connection) => self.read_max_streams(&connection),
            Err(std::sync::TryLockError::Poisoned(p)) => self.read_max_streams(&p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => self.max_streams_seen.load(Ordering::Relaxed),
        }
    }

    fn takes_streams(&self) -> bool {
        !self.sender.is_closed() && reusable(&self.tunnel)
    }
}

type H2Pool = MuxPool<Key, H2Conn, UpstreamError>;
/// A request's place on its HTTP/2 connection, shared by the request body (while hyper sends
/// it) and the response body: the stream counts as open until both are gone.
type H2Slot = Arc<Slot<Key, H2Conn>>;

/// Whether a connection may take more requests: open, and not inside a tunnel whose far end
/// is draining (then it is retired, and the next request opens a new tunnel stream, to the
/// destination's new sluice process during an upgrade).
fn reusable(tunnel: &Option<TunnelWatch>) -> bool {
    tunnel.as_ref().is_none_or(|t| !t.is_closing())
}

/// A connection's share of its destination's `maxConnections`, released when its socket closes
/// (held by the socket: an upgraded connection keeps it as long as the bridge runs).
struct ConnSlot(Option<Arc<Breaker>>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Upstreams {
    /// Sends `req` to the endpoint, on a pooled connection when one is ready. Returns the
    /// response head and when the request was handed to a ready connection (so the latency the
    /// balancer learns excludes connection set-up: a TCP and TLS handshake is not the
    /// endpoint being slow).
    pub async fn send(
        self: &Arc<Self>,
        d: &Dial<'_>,
        req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, Instant), SendError> {
        match d.wire {
            Wire::Http1 => self.send_h1(d, req).await,
            Wire::Http2 => self.send_h2(d, req).await,
        }
    }

    fn key(d: &Dial<'_>, wire: Wire) -> Key {
        let tls = match (&d.tls, &d.istio_mutual) {
            (Some(t), _) => Some((t.sni.clone(), Arc::as_ptr(&t.config) as usize)),
            // Its own pool entries: the same SNI over plain TLS is another connection.
            (None, Some(m)) => Some((format!("istio-mutual:{}:{}", m.server, m.sni).into(), 0)),
            (None, None) => None,
        };
        Key { src_pod: d.pod.pod_id, endpoint: d.endpoint, wire, tls }
    }

    async fn send_h1(
        self: &Arc<Self>,
        d: &Dial<'_>,
        req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, Instant), SendError> {
        let key = Self::key(d, Wire::Http1);
        let (mut conn, reused) = match self.checkout_ready_h1(&key).await {
            Some(c) => (c, true),
            // Boxed, here and below: a new connection (dial, tunnel, TLS, handshake) is a large
            // future, and unboxed it would be part of every request's future, which is moved
            // (copied) whole when the request's task is boxed.
            None => match Box::pin(self.connect_h1(d)).await {
                Ok(c) => (c, false),
                Err(error) => return Err(SendError { error, request: Some(req) }),
            },
        };
        // A request with no body on a reused connection can be sent again if the connection
        // turns out to be closing (the server's FIN crossed our request): keep a copy.
        let replay = (reused && is_replayable(&req)).then(|| copy_head(&req));
        let mut dispatched = Instant::now();
        conn.requests += 1;
        let result = conn.sender.try_send_request(req).await;
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
                        conn = match Box::pin(self.connect_h1(d)).await {
                            Ok(c) => c,
                            Err(error) => return Err(SendError { error, request: Some(req) }),
                        };
                        conn.requests += 1;
                        dispatched = Instant::now();
                        conn.sender.send_request(req).await
                    }
                    Some(req) => {
                        // Never written to the connection: the caller may send it elsewhere.
                        return Err(SendError {
                            error: UpstreamError::Request { endpoint: d.endpoint, source: err },
                            request: Some(req),
                        });
                    }
                    None => Err(err),
                }
            }
        };
        let resp = result.map_err(|source| UpstreamError::Request { endpoint: d.endpoint, source })?;
        // Back to the pool once the response body has been read to its end (the body does it:
        // no task per request). A body dropped before its end leaves the connection unusable:
        // it is not returned, and closes.
        let max_per_conn =
            d.breaker.as_ref().and_then(|(_, cfg)| cfg.max_requests_per_connection).filter(|n| *n > 0);
        let checkin = max_per_conn.is_none_or(|max| conn.requests < max).then(|| Checkin {
            pool: self.clone(),
            key,
            conn,
        });
        Ok((resp.map(|b| UpstreamBody { inner: b, checkin, slot: None }), dispatched))
    }

    /// An idle connection for `key`. A connection is checked in as soon as its response body
    /// ended; hyper may take a moment more to be ready for the next request, so wait for that
    /// here (briefly), outside the pool's lock.
    async fn checkout_ready_h1(&self, key: &Key) -> Option<H1Conn> {
        loop {
            let mut conn = self.checkout_h1(key)?;
            if conn.sender.ready().await.is_ok() {
                self.counters.reused.fetch_add(1, Ordering::Relaxed);
                return Some(conn);
            }
        }
    }

    fn h1_shard(&self, key: &Key) -> &H1Shard {
        &self.h1[self.h1_shard_hash.hash_one(key) as usize % H1_SHARDS]
    }

    fn checkout_h1(&self, key: &Key) -> Option<H1Conn> {
        let mut pools = self.h1_shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let idle = pools.get_mut(key)?;
        while let Some(c) = idle.pop() {
            if !c.conn.sender.is_closed() && c.since.elapsed() < c.conn.idle_timeout && reusable(&c.conn.tunnel) {
                return Some(c.conn);
            }
        }
        None
    }

    fn checkin_h1(&self, key: Key, conn: H1Conn) {
        if !reusable(&conn.tunnel) {
            return; // dropped: the connection (a stream of a draining tunnel) closes now
        }
        let mut pools = self.h1_shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        let idle = pools.entry(key).or_default();
        if idle.len() < MAX_IDLE_PER_KEY {
            idle.push(IdleH1 { conn, since: Instant::now() });
        }
    }

    /// A new HTTP/1.1 connection (an upgrade gets one of its own: `send_upgrade`).
    async fn connect_h1(&self, d: &Dial<'_>) -> Result<H1Conn, UpstreamError> {
        let (io, tunnel, unit) = self.dial(d).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Handshake { endpoint: d.endpoint, source })?;
        let endpoint = d.endpoint;
        // The socket (with its unit and its breaker slot) lives in `conn`, and after an upgrade
        // in the upgraded stream.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%endpoint, error = %e, "upstream connection ended");
            }
        });
        let idle_timeout = d.idle_timeout.map_or(IDLE_TIMEOUT, |t| t.min(IDLE_TIMEOUT));
        Ok(H1Conn { sender, tunnel, requests: 0, unit, idle_timeout })
    }

    async fn send_h2(
        &self,
        d: &Dial<'_>,
        req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, Instant), SendError> {
        let key = Self::key(d, Wire::Http2);
        // A request waiting for another's connection attempt is pending, as one making its
        // own is (`dial` counts that one): the destination's `maxPendingRequests` applies.
        let admit = || match &d.breaker {
            None => Some(None),
            Some((b, cfg)) => match acquire(&b.pending, cfg.max_pending_requests) {
                Some(pending) => Some(Some(pending)),
                None => {
                    b.overflows.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
        };
        self.send_h2_via(&key, d.endpoint, req, || self.dial(d), admit).await
    }

    /// The HTTP/2 send, with `dial` opening the byte stream of a new connection (the source
    /// pod's socket, a tunnel stream or TLS in production; memory in tests).
    async fn send_h2_via<F, Fut, P>(
        &self,
        key: &Key,
        endpoint: SocketAddr,
        req: Request<Body>,
        dial: F,
        mut admit: impl FnMut() -> Option<P>,
    ) -> Result<(Response<UpstreamBody>, Instant), SendError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(UpstreamIo, Option<TunnelWatch>, Option<Arc<Lease>>), UpstreamError>>,
    {
        let (slot, reused) = match self.h2_slot(key, endpoint, &dial, &mut admit).await {
            Ok(s) => s,
            Err(error) => return Err(SendError { error, request: Some(req) }),
        };
        if reused {
            self.counters.reused.fetch_add(1, Ordering::Relaxed);
        }
        let dispatched = Instant::now();
        let mut sender = slot.conn().sender.clone();
        match sender.try_send_request(req.map(|b| StreamBody { inner: b, _slot: slot.clone() })).await {
            Ok(resp) => Ok((resp.map(|b| UpstreamBody::h2(b, slot)), dispatched)),
            Err(mut e) => match e.take_message().map(|r| r.map(|b| b.inner)) {
                // The connection went away before the request was written (GOAWAY, reset): it
                // leaves the pool, and the request gets one more try on another connection.
                Some(req) if reused => {
                    self.h2.evict(slot.pooled(), Eviction::Closed);
                    drop(slot);
                    self.counters.retried_on_fresh_connection.fetch_add(1, Ordering::Relaxed);
                    let (slot, _) = match self.h2_slot(key, endpoint, &dial, &mut admit).await {
                        Ok(s) => s,
                        Err(error) => return Err(SendError { error, request: Some(req) }),
                    };
                    let dispatched = Instant::now();
                    let mut sender = slot.conn().sender.clone();
                    let resp = sender
                        .send_request(req.map(|b| StreamBody { inner: b, _slot: slot.clone() }))
                        .await
                        .map_err(|source| UpstreamError::Request { endpoint, source })?;
                    Ok((resp.map(|b| UpstreamBody::h2(b, slot)), dispatched))
                }
                request => Err(SendError {
                    error: UpstreamError::Request { endpoint, source: e.into_error() },
                    request,
                }),
            },
        }
    }

    /// A place for one request on a pooled HTTP/2 connection of `key`, connecting (once for
    /// all the requests that arrive meanwhile) when none has room. `true` if the connection
    /// was already there.
    async fn h2_slot<F, Fut, P>(
        &self,
        key: &Key,
        endpoint: SocketAddr,
        dial: &F,
        admit: &mut impl FnMut() -> Option<P>,
    ) -> Result<(H2Slot, bool), UpstreamError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(UpstreamIo, Option<TunnelWatch>, Option<Arc<Lease>>), UpstreamError>>,
    {
        match self.h2.checkout_admitted(key, admit).await {
            Ok(Checkout::Ready(slot)) => Ok((Arc::new(slot), true)),
            // Boxed: see `send_h1`.
            Ok(Checkout::Connect(leader)) => match Box::pin(connect_h2(endpoint, dial)).await {
                Ok((conn, task)) => {
                    let slot = leader.finish(conn);
                    tokio::spawn(task.run(slot.pooled().clone(), self.h2.clone()));
                    Ok((Arc::new(slot), false))
                }
                Err(e) => Err(UpstreamError::shared(leader.fail(e))),
            },
            Err(CheckoutError::Failed(e)) => Err(UpstreamError::shared(e)),
            Err(CheckoutError::TooManyWaiters) => Err(UpstreamError::Busy { endpoint }),
            Err(CheckoutError::NotAdmitted) => Err(UpstreamError::Overflow(Overflow::Pending)),
        }
    }

    /// Sends a request that asks to leave HTTP (an Upgrade, e.g. WebSocket, or CONNECT) on a
    /// connection of its own, which then belongs to the upgraded stream. The socket carries its
    /// admission unit and its share of the destination's `maxConnections` ([`UpstreamIo`]), so
    /// both count for as long as the upgraded connection lives, not only until hyper hands it
    /// over to the bridge.
    pub async fn send_upgrade(
        &self,
        d: &Dial<'_>,
        req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, Instant), SendError> {
        let (io, _tunnel, _unit) = match self.dial(d).await {
            Ok(c) => c,
            Err(error) => return Err(SendError { error, request: Some(req) }),
        };
        let handshake = http1::Builder::new().handshake(TokioIo::new(io)).await;
        let (mut sender, conn) = match handshake {
            Ok(c) => c,
            Err(source) => {
                let error = UpstreamError::Handshake { endpoint: d.endpoint, source };
                return Err(SendError { error, request: Some(req) });
            }
        };
        let endpoint = d.endpoint;
        tokio::spawn(async move {
            // Ends when the connection is handed over to the upgrade (or closes).
            if let Err(e) = conn.with_upgrades().await {
                debug!(%endpoint, error = %e, "upstream connection ended");
            }
        });
        let dispatched = Instant::now();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Request { endpoint: d.endpoint, source })?;
        Ok((resp.map(|b| UpstreamBody { inner: b, checkin: None, slot: None }), dispatched))
    }

    /// Opens the byte stream to the endpoint: through the HBONE tunnel for an enrolled pod
    /// (plaintext if nothing serves its tunnel port, as the L4 path does), TLS that sluice
    /// originates for an external destination that asks for it, else plain TCP from the source
    /// pod's namespace. Counted against the destination's `maxPendingRequests` while it
    /// connects and `maxConnections` while it is open.
    /// The socket's admission unit comes with it (`None` for a tunnel stream, whose tunnel
    /// holds one), also inside the returned stream, so that it is held as long as the socket.
    async fn dial(
        &self,
        d: &Dial<'_>,
    ) -> Result<(UpstreamIo, Option<TunnelWatch>, Option<Arc<Lease>>), UpstreamError> {
        let (pending, slot) = match &d.breaker {
            None => (None, ConnSlot(None)),
            Some((b, cfg)) => {
                let pending = acquire(&b.pending, cfg.max_pending_requests).ok_or_else(|| {
                    b.overflows.fetch_add(1, Ordering::Relaxed);
                    UpstreamError::Overflow(Overflow::Pending)
                })?;
                let ok = b
                    .connections
                    .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                        cfg.max_connections.is_none_or(|max| n < max).then_some(n + 1)
                    })
                    .is_ok();
                if !ok {
                    b.overflows.fetch_add(1, Ordering::Relaxed);
                    return Err(UpstreamError::Overflow(Overflow::Connections));
                }
                (Some(pending), ConnSlot(Some(b.clone())))
            }
        };
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        let result = self.dial_inner(d).await;
        drop(pending);
        match result {
            Ok((stream, watch, unit)) => {
                Ok((UpstreamIo { stream, _unit: unit.clone(), _breaker: slot }, watch, unit))
            }
            Err(e) => {
                self.counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    async fn dial_inner(
        &self,
        d: &Dial<'_>,
    ) -> Result<(Stream, Option<TunnelWatch>, Option<Arc<Lease>>), UpstreamError> {
        if let Some(peer) = &d.mesh_peer {
            // A pod of this node, with no TLS of sluice's own inside: handed over in-process.
            if d.tls.is_none() {
                if let Some((dest, inbound)) = d.dp.same_node.lookup(d.endpoint.ip()) {
                    return hand_off(d, peer, dest, inbound).await;
                }
            }
            let hint = match d.wire {
                Wire::Http1 => "http/1.1",
                Wire::Http2 => "h2c",
            };
            match l4::open_tunnel(d.pod, d.dp, peer, d.endpoint, Some(hint)).await {
                Ok(t) => {
                    let io = TunnelIo::new(t.send, t.recv);
                    let Some(tls) = &d.tls else {
                        return Ok((Stream::Tunnel { io, _slot: t.slot }, Some(t.watch), None));
                    };
                    let tls = self.tls_handshake(d, tls, io).await?;
                    return Ok((Stream::TlsTunnel { tls: Box::new(tls), _slot: t.slot }, Some(t.watch), None));
                }
                // Plaintext only to a destination that accepts it (see `plaintext_fallback`).
                Err(e) if e.is_unreachable() => {
                    if let Err(refused) = l4::fallback_allowed(d.dp, d.endpoint) {
                        l4::refuse_fallback(d.dp, &d.pod.key, d.endpoint, peer, refused, &e);
                        return Err(UpstreamError::StrictNoTunnel {
                            endpoint: d.endpoint,
                            mode: refused.mode,
                            reason: e.to_string(),
                        });
                    }
                    d.dp.tunnel_fallbacks.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = crate::lograte::shared().allow("tunnel-fallback", &d.pod.key) {
                        info!(pod = %d.pod.key, endpoint = %d.endpoint, peer = %peer, error = %e, suppressed, "no tunnel endpoint at the destination; sending plaintext");
                    }
                }
                Err(e) if e.refusal().is_some() => {
                    return Err(UpstreamError::Overflow(e.refusal().map(overflow_of).expect("checked")))
                }
                Err(source) => return Err(UpstreamError::Tunnel { endpoint: d.endpoint, source }),
            }
        }
        // The socket's unit, on the source pod's behalf, before the socket exists.
        let unit =
            d.dp.admission
                .dial(&d.pod.slots, d.pod.pod_id)
                .map_err(|r| UpstreamError::Overflow(overflow_of(r)))?;
        let unit = Some(Lease::new(unit));
        let tcp = l4::connect(&d.pod.netns, d.endpoint, d.connect_timeout)
            .await
            .map_err(|source| UpstreamError::Connect { endpoint: d.endpoint, source })?;
        let istio;
        let tls = match (&d.tls, &d.istio_mutual) {
            (Some(tls), _) => tls,
            (None, Some(m)) => {
                istio = istio_mutual_target(d, m)?;
                &istio
            }
            (None, None) => return Ok((Stream::Tcp(tcp), None, unit)),
        };
        let stream = self.tls_handshake(d, tls, tcp).await?;
        Ok((Stream::Tls(Box::new(stream)), None, unit))
    }

    /// Originates TLS over `io` within the connect timeout.
    async fn tls_handshake<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        d: &Dial<'_>,
        tls: &TlsTarget,
        io: IO,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, UpstreamError> {
        let handshake = tokio_rustls::TlsConnector::from(tls.config.clone()).connect(tls.server_name.clone(), io);
        let stream = tokio::time::timeout(d.connect_timeout, handshake)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")))
            .map_err(|source| UpstreamError::Tls { endpoint: d.endpoint, server_name: tls.sni.clone(), source })?;
        self.counters.tls_originated.fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// Closes idle HTTP/1.1 connections past their time and evicts HTTP/2 connections that
    /// no longer take requests (periodically, off the request path; idle HTTP/2 connections
    /// close on their own).
    pub fn reap(&self) {
        for shard in &self.h1 {
            let mut h1 = shard.lock().unwrap_or_else(|p| p.into_inner());
            h1.retain(|_, idle| {
                idle.retain(|c| {
                    c.conn.sender.is_ready() && c.since.elapsed() < c.conn.idle_timeout && reusable(&c.conn.tunnel)
                });
                !idle.is_empty()
            });
        }
        self.h2.sweep();
    }

    /// Closes the idle connections (HTTP/1.1 in the idle stacks, HTTP/2 without a request) of
    /// `scope`'s source pod, or of every pod, giving their sockets' units back at once.
    /// Returns how many units it gave back.
    pub fn shed_idle(&self, scope: Shed) -> usize {
        let matches = |k: &Key| scope == Shed::Any || scope == Shed::Pod(k.src_pod);
        let mut released = 0;
        for shard in &self.h1 {
            let mut h1 = shard.lock().unwrap_or_else(|p| p.into_inner());
            h1.retain(|key, idle| {
                if !matches(key) {
                    return true;
                }
                // Those inside a tunnel give back no unit, but their tunnel may go idle with them.
                released += idle.drain(..).filter(|c| c.conn.unit.as_ref().is_some_and(|u| u.revoke())).count();
                false
            });
        }
        released + self.h2.shed_idle(matches, |c| c.unit.as_ref().is_some_and(|u| u.revoke()))
    }

    /// (idle HTTP/1.1 connections, HTTP/2 connections) held, for the admin view.
    pub fn sizes(&self) -> (usize, usize) {
        let h1 = self
            .h1
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()).values().map(Vec::len).sum::<usize>())
            .sum();
        (h1, self.h2.len())
    }

    /// What the HTTP/2 pool did (single flight, evictions, bounds hit).
    pub fn h2_stats(&self) -> &PoolStats {
        &self.h2.stats
    }
}

/// The client configuration of ISTIO_MUTUAL towards a destination outside the mesh: the mesh
/// configuration of (source identity, expected server), with Istio's ALPN for the HTTP version
/// (what a sidecar's inbound listener selects on). Built per new connection, not per request.
fn istio_mutual_target(d: &Dial<'_>, m: &IstioMutual) -> Result<TlsTarget, UpstreamError> {
    let tls_error = |e: String| UpstreamError::Tls {
        endpoint: d.endpoint,
        server_name: m.sni.clone(),
        source: io::Error::other(e),
    };
    let base = d.dp.identity.client_config(&d.pod.identity, m.server.clone()).map_err(|e| tls_error(e.to_string()))?;
    let mut config = (*base).clone();
    config.alpn_protocols = vec![match d.wire {
        Wire::Http1 => b"istio-http/1.1".to_vec(),
        Wire::Http2 => b"istio-h2".to_vec(),
    }];
    let server_name = ServerName::try_from(m.sni.to_string()).map_err(|e| tls_error(e.to_string()))?;
    Ok(TlsTarget { config: Arc::new(config), server_name, sni: m.sni.clone() })
}

/// A new HTTP/2 connection over what `dial` opens, and the task that is to drive it.
async fn connect_h2<F, Fut>(endpoint: SocketAddr, dial: &F) -> Result<(H2Conn, H2Task), UpstreamError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(UpstreamIo, Option<TunnelWatch>, Option<Arc<Lease>>), UpstreamError>>,
{
    let (io, tunnel, unit) = dial().await?;
    let heard = Arc::new(HeardAt::new());
    let io = Heard { io, at: heard.clone() };
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Notice a dead peer on an idle pooled connection too, not at the next request.
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Handshake { endpoint, source })?;
    let max_streams_seen = AtomicUsize::new(conn.current_max_send_streams());
    let connection = Mutex::new(Some(Box::pin(conn)));
    Ok((H2Conn { sender, tunnel, connection, max_streams_seen, unit }, H2Task { endpoint, heard }))
}

type H2Connection = http2::Connection<TokioIo<Heard<UpstreamIo>>, StreamBody, TokioExecutor>;

/// The task of one upstream HTTP/2 connection: drives it, and ends it when the pool retires
/// it.
struct H2Task {
    endpoint: SocketAddr,
    heard: Arc<HeardAt>,
}

impl H2Task {
    async fn run(self, pooled: Arc<Pooled<Key, H2Conn>>, pool: Arc<H2Pool>) {
        let H2Task { endpoint, heard } = self;
        let conn = pooled.conn();
        let connection = &conn.connection;
        let driven = std::future::poll_fn(|cx| {
            let mut c = connection.lock().unwrap_or_else(|p| p.into_inner());
            let r = match c.as_mut() {
                Some(c) => c.as_mut().poll(cx),
                None => Poll::Ready(Ok(())),
            };
            // Published for the pool while this task holds the connection.
            conn.read_max_streams(&c);
            r
        });
        tokio::select! {
            result = driven => {
                // hyper ends a connection whose keepalive PING went unanswered as if it had
                // closed normally; a peer silent for the keepalive timeout tells it apart from
                // one that closed (a FIN, a GOAWAY, a reset are all heard).
                let why = if heard.silent_for() >= H2_KEEPALIVE_TIMEOUT { Eviction::Keepalive } else { Eviction::Closed };
                pool.evict(&pooled, why);
                match result {
                    Ok(()) => debug!(%endpoint, reason = ?why, "upstream HTTP/2 connection ended"),
                    Err(e) => debug!(%endpoint, reason = ?why, error = %e, "upstream HTTP/2 connection ended"),
                }
            }
            why = pool.until_retired(&pooled) => {
                debug!(%endpoint, reason = ?why, "closing upstream HTTP/2 connection");
            }
        }
        // Dropping hyper's dispatcher (with the last sender) closes the connection; the socket,
        // its unit and its breaker slot go when hyper's own connection task ends.
        let closed = connection.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(closed);
    }
}

/// When a connection's peer was last heard from (any read: data, end of stream, error).
struct HeardAt {
    epoch: tokio::time::Instant,
    nanos: AtomicU64,
}

impl HeardAt {
    fn new() -> Self {
        Self { epoch: tokio::time::Instant::now(), nanos: AtomicU64::new(0) }
    }

    fn mark(&self) {
        let ns = tokio::time::Instant::now().saturating_duration_since(self.epoch).as_nanos() as u64;
        self.nanos.store(ns, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let at = self.epoch + Duration::from_nanos(self.nanos.load(Ordering::Relaxed));
        tokio::time::Instant::now().saturating_duration_since(at)
    }
}

/// A byte stream that notes when it was last read from.
struct Heard<T> {
    io: T,
    at: Arc<HeardAt>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_ready() {
            self.at.mark();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A request body on its way to an HTTP/2 connection; it holds the request's slot until
/// hyper has sent it to its end (or dropped it).
struct StreamBody {
    inner: Body,
    _slot: H2Slot,
}

impl hyper::body::Body for StreamBody {
    type Data = bytes::Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, super::BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A pooled HTTP/1.1 connection to return when its response body ends.
struct Checkin {
    pool: Arc<Upstreams>,
    key: Key,
    conn: H1Conn,
}

pin_project_lite::pin_project! {
    /// An upstream response body; for a pooled HTTP/1.1 connection it returns the connection
    /// to the pool when it reaches its end; on HTTP/2 it holds the request's stream slot.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        checkin: Option<Checkin>,
        slot: Option<H2Slot>,
    }
}

impl UpstreamBody {
    fn h2(inner: Incoming, slot: H2Slot) -> Self {
        UpstreamBody { inner, checkin: None, slot: Some(slot) }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let r = this.inner.as_mut().poll_frame(cx);
        let ended = match &r {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some(c) = this.checkin.take() {
                c.pool.checkin_h1(c.key, c.conn);
            }
        } else if let Poll::Ready(Some(Err(_))) = &r {
            this.checkin.take();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Safe to send twice: an idempotent method and no body.
fn is_replayable(req: &Request<Body>) -> bool {
    use http_body::Body as _;
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) && req.body().is_end_stream()
}

fn copy_head(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(super::empty_body());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The Overflow a request gets when admission refused its upstream socket.
/// Bytes an in-memory same-node pipe holds per direction before the writer waits (its bound;
/// the pipe's buffer grows to this only as data waits in it).
const LOCAL_PIPE: usize = 64 * 1024;

/// HTTP to a pod of this node: the destination side accepts it in-process (the source pod's
/// identity, the destination's bounds) and serves it per request over an in-memory pipe, as it
/// serves a tunnel stream marked HTTP, so the destination's JWT and authorization checks and
/// its `reporter=destination` telemetry stay; no TLS, no HTTP/2 framing of a tunnel. No socket
/// on the source's side, so no admission unit here (the destination's permit covers the
/// application's socket).
async fn hand_off(
    d: &Dial<'_>,
    peer: &SpiffeId,
    dest: Arc<PodContext>,
    inbound: Arc<crate::inbound::Inbound>,
) -> Result<(Stream, Option<TunnelWatch>, Option<Arc<Lease>>), UpstreamError> {
    use crate::inbound::LocalRefused;
    let source_addr = SocketAddr::new(d.pod.ip, 0);
    let accepted = crate::inbound::accept_local(&inbound, &dest, d.pod, source_addr, d.endpoint, true)
        .await
        .map_err(|refused| match refused {
            LocalRefused::Limit(r) => UpstreamError::Overflow(overflow_of(r)),
            LocalRefused::Delivery(source) => UpstreamError::Connect { endpoint: d.endpoint, source },
            other => UpstreamError::Connect { endpoint: d.endpoint, source: io::Error::other(other.to_string()) },
        })?;
    d.dp.same_node.handed_off();
    debug!(pod = %d.pod.key, endpoint = %d.endpoint, %peer, "HTTP handed over in-process to a pod of this node");
    let (near, far) = tokio::io::duplex(LOCAL_PIPE);
    let protocol = match d.wire {
        Wire::Http1 => crate::l7::Protocol::Http1,
        Wire::Http2 => crate::l7::Protocol::Http2,
    };
    let (source, endpoint) = (d.pod.clone(), d.endpoint);
    tokio::spawn(async move {
        crate::inbound::serve_local_l7(inbound, dest, &source, accepted, far, protocol, source_addr, endpoint).await;
    });
    Ok((Stream::Local(near), None, None))
}

fn overflow_of(refusal: Refusal) -> Overflow {
    match refusal {
        Refusal::Node => Overflow::NodeConnections,
        _ => Overflow::PodConnections,
    }
}

/// The byte stream under an upstream HTTP connection, holding what the socket holds: its
/// admission unit and its share of the destination's `maxConnections`, for as long as it is
/// open (through an upgrade too, where it moves into the upgraded stream).
pub struct UpstreamIo {
    stream: Stream,
    _unit: Option<Arc<Lease>>,
    _breaker: ConnSlot,
}

impl UpstreamIo {
    /// In-memory, for tests of the pools.
    #[cfg(test)]
    fn mem(io: tokio::io::DuplexStream) -> Self {
        UpstreamIo { stream: Stream::Mem(io), _unit: None, _breaker: ConnSlot(None) }
    }
}

enum Stream {
    Tcp(TcpStream),
    /// A stream of an HBONE tunnel, with its place in the tunnel's stream count.
    Tunnel {
        io: TunnelIo,
        _slot: TunnelSlot,
    },
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// An in-memory pipe to this node's destination side (a same-node hand-off).
    Local(tokio::io::DuplexStream),
    /// TLS that sluice originates inside an HBONE stream (a DestinationRule's SIMPLE or
    /// MUTUAL towards an enrolled pod that serves TLS itself).
    TlsTunnel {
        tls: Box<tokio_rustls::client::TlsStream<TunnelIo>>,
        _slot: TunnelSlot,
    },
    #[cfg(test)]
    Mem(tokio::io::DuplexStream),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tunnel { io: s, .. } => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsTunnel { tls: s, .. } => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(test)]
            Stream::Mem(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tunnel { io: s, .. } => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsTunnel { tls: s, .. } => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(test)]
            Stream::Mem(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tunnel { io: s, .. } => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Local(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::TlsTunnel { tls: s, .. } => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            #[cfg(test)]
            Stream::Mem(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tunnel { io: s, .. } => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Local(s) => s.is_write_vectored(),
            Stream::TlsTunnel { tls: s, .. } => s.is_write_vectored(),
            #[cfg(test)]
            Stream::Mem(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tunnel { io: s, .. } => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Local(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsTunnel { tls: s, .. } => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(test)]
            Stream::Mem(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tunnel { io: s, .. } => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Local(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsTunnel { tls: s, .. } => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(test)]
            Stream::Mem(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests;
