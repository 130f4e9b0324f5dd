//! HBONE server: accepts mutual-TLS connections on a pod's `IP:15008`, requires a client
//! certificate from the mesh CA, and hands every HTTP/2 CONNECT stream to a handler together
//! with the client's verified SPIFFE identity. Anything else (garbage, TLS without a client
//! certificate, plain HTTP/1.1) fails the handshake of that connection only.
//!
//! Until its client is authenticated a connection is held in the handshake bucket of
//! [`super::gate`] (per source address and node-wide), not against the node's connection
//! limit; after the mutual-TLS handshake it takes its admission permit and its place within
//! its identity's bound. TLS and the HTTP/2 preface get [`HANDSHAKE_TIMEOUT`] together.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use http::{Method, Response, StatusCode};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{
    client::{CONNECTION_WINDOW, STREAM_WINDOW},
    gate::{self, TunnelGate},
};
use crate::lograte;

/// TLS and the HTTP/2 preface must be done within this (a peer that connects and stalls holds
/// a descriptor only this long). A real handshake takes milliseconds (one round trip and two
/// signatures); 3 s leaves room for a loaded node and a lost packet or two.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Streams one tunnel connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS;
/// a client opens another connection beyond it). Every stream is a delivery socket, so this
/// bounds what one connection can make sluice hold; admission bounds the sum per peer and pod.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Largest header list of a CONNECT request (SETTINGS_MAX_HEADER_LIST_SIZE). A CONNECT carries
/// an authority and a header or two: h2's default (16 MiB) would let a peer make sluice buffer
/// megabytes per stream.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// One CONNECT stream, authenticated.
pub struct TunnelRequest {
    /// The tunnel's TCP peer (the source pod's IP).
    pub peer: SocketAddr,
    /// The client's SPIFFE ID, from its verified certificate.
    pub peer_identity: Arc<str>,
    /// The CONNECT target (`:authority`).
    pub target: SocketAddr,
    /// The stream carries HTTP (`x-sluice-l7`: `http/1.1` or `h2c`) from a sluice's L7 path.
    pub l7: Option<crate::l7::Protocol>,
    pub body: RecvStream,
    pub respond: SendResponse<Bytes>,
}

/// Counters of tunnels refused before any stream (bad TLS, no client cert, not HTTP/2...),
/// and the node-wide "draining" signal: when set, every tunnel sends GOAWAY (its open streams
/// finish; clients open new tunnels, to the next sluice process during an upgrade).
#[derive(Debug)]
pub struct ServerStats {
    pub handshakes_failed: AtomicU64,
    pub streams_rejected: AtomicU64,
    pub draining: tokio::sync::watch::Sender<bool>,
    /// The bounds before and after authentication (node-wide, shared by every pod's server).
    pub gate: Arc<TunnelGate>,
}

impl Default for ServerStats {
    fn default() -> Self {
        Self {
            handshakes_failed: AtomicU64::new(0),
            streams_rejected: AtomicU64::new(0),
            draining: tokio::sync::watch::channel(false).0,
            gate: Arc::default(),
        }
    }
}

/// Serves `listener` until the task is aborted. `tls` gives the current server configuration
/// for the pod's identity; `identity_of` reads the SPIFFE ID from the verified peer.
pub async fn serve<H, F>(
    listener: TcpListener,
    pod: Arc<str>,
    tls: Arc<rustls::ServerConfig>,
    identity_of: fn(&rustls::CommonState) -> Option<String>,
    stats: Arc<ServerStats>,
    admission: Arc<crate::admission::Admission>,
    handler: H,
) where
    H: Fn(TunnelRequest) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                if let Some(suppressed) = lograte::shared().allow("accept-failed", &pod) {
                    warn!(%pod, error = %e, suppressed, "HBONE accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Not authenticated yet: the connection waits in the handshake bucket (per source and
        // node-wide), not against the node's connection limit.
        let handshake = match stats.gate.handshake(peer.ip()) {
            Ok(h) => h,
            Err(refusal) => {
                if let Some(suppressed) = lograte::shared().allow("hbone-handshake-refused", &lograte::source_of_ip(peer.ip())) {
                    warn!(%pod, %peer, limit = refusal.as_str(), suppressed, "HBONE connection refused: too many handshakes in progress");
                }
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let pod = pod.clone();
        let stats = stats.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            let failed = |what: &str, identity: Option<&str>, error: Option<String>| {
                stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = lograte::shared().allow("hbone-handshake-failed", &lograte::source_of_ip(peer.ip())) {
                    warn!(%pod, %peer, peer_identity = identity, error, suppressed, "HBONE: {what}");
                }
            };
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return failed("TLS handshake refused", None, Some(e.to_string())),
                Err(_) => return failed("TLS handshake timed out", None, None),
            };
            let Some(peer_identity) = identity_of(tls.get_ref().1) else {
                return failed("client certificate carries no SPIFFE ID; closing", None, None);
            };
            let peer_identity: Arc<str> = peer_identity.into();
            // Authenticated: out of the handshake bucket, into the node's connection limit and
            // the identity's bound of tunnel connections.
            drop(handshake);
            let _permit = match admission.node_only() {
                Ok(p) => p,
                Err(refusal) => {
                    if let Some(suppressed) = lograte::shared().allow("hbone-tunnel-refused", &peer_identity) {
                        warn!(%pod, %peer, peer_identity = %peer_identity, limit = refusal.as_str(), suppressed, "HBONE connection refused: connection limit reached");
                    }
                    return;
                }
            };
            let max = gate::tunnels_per_identity(&admission.config);
            let _place = match stats.gate.tunnel(&peer_identity, max) {
                Ok(p) => p,
                Err(refusal) => {
                    if let Some(suppressed) = lograte::shared().allow("hbone-tunnel-refused", &peer_identity) {
                        warn!(%pod, %peer, peer_identity = %peer_identity, limit = refusal.as_str(), max, suppressed, "HBONE connection refused: the identity holds its bound of tunnel connections");
                    }
                    return;
                }
            };
            let handshake = h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .max_header_list_size(MAX_HEADER_LIST_SIZE)
                .handshake::<_, Bytes>(tls);
            let mut conn = match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return failed("not an HTTP/2 client", Some(&peer_identity), Some(e.to_string())),
                Err(_) => return failed("no HTTP/2 preface within the handshake timeout", Some(&peer_identity), None),
            };
            debug!(%pod, %peer, peer_identity = %peer_identity, "HBONE tunnel accepted");
            let mut draining = stats.draining.subscribe();
            let mut goaway_sent = false;
            loop {
                let next = if goaway_sent {
                    // Keep serving the streams already open until the peer is done.
                    conn.accept().await
                } else {
                    tokio::select! {
                        next = conn.accept() => next,
                        _ = until_draining(&mut draining) => {
                            debug!(%pod, %peer, "draining: GOAWAY");
                            conn.graceful_shutdown();
                            goaway_sent = true;
                            continue;
                        }
                    }
                };
                let Some(next) = next else { break };
                let (request, mut respond) = match next {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(%pod, %peer, error = %e, "HBONE tunnel ended");
                        break;
                    }
                };
                if request.method() != Method::CONNECT {
                    stats.streams_rejected.fetch_add(1, Ordering::Relaxed);
                    reply(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
                    continue;
                }
                let target = request.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
                let Some(target) = target else {
                    stats.streams_rejected.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = lograte::shared().allow("hbone-bad-connect", &peer_identity) {
                        warn!(%pod, %peer, uri = %request.uri(), suppressed, "HBONE: CONNECT without an ip:port authority");
                    }
                    reply(&mut respond, StatusCode::BAD_REQUEST);
                    continue;
                };
                let l7 = match request.headers().get(super::client::L7_HEADER).map(|v| v.as_bytes()) {
                    Some(b"http/1.1") => Some(crate::l7::Protocol::Http1),
                    Some(b"h2c") => Some(crate::l7::Protocol::Http2),
                    _ => None,
                };
                let req = TunnelRequest {
                    peer,
                    peer_identity: peer_identity.clone(),
                    target,
                    l7,
                    body: request.into_body(),
                    respond,
                };
                tokio::spawn(handler(req));
            }
        });
    }
}

/// Resolves once the node starts draining (never, if the signal's sender is gone).
async fn until_draining(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let draining = *rx.borrow_and_update();
        if draining {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Answers a stream with a status and no body.
pub fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder().status(status).body(()).expect("status-only response is valid");
    let _ = respond.send_response(response, true);
}
