//! HBONE client: HTTP/2 CONNECT streams inside mutual TLS 1.3 to a destination pod's
//! `IP:15008`, one tunnel connection per (source pod, source identity, destination identity,
//! destination address), each carrying many streams.
//!
//! The tunnel's TCP socket is made in the *source pod's* network namespace, so the tunnel
//! itself comes from the pod's IP (NetworkPolicy on the pod IP keeps working); that is why the
//! source pod is part of the pool key, on top of the identities and the address.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use h2::{client::SendRequest, RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio_rustls::TlsConnector;
use tracing::{debug, info};

use crate::netns::PodNetns;

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
}

impl TunnelError {
    /// Whether the destination actively said no (authorization), rather than failing.
    pub fn is_refusal(&self) -> bool {
        matches!(self, TunnelError::Refused { .. })
    }

    /// Whether nothing listens on the destination's tunnel port (its node's sluice is not
    /// serving that pod): the TCP connection itself was refused.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, TunnelError::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused)
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
        let mut sender = self.0.clone();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(sender.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
    }
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

#[derive(Default)]
pub struct HbonePool {
    conns: Mutex<HashMap<PoolKey, SendRequest<Bytes>>>,
}

impl HbonePool {
    /// Opens a tunnel stream to `target` through the destination's HBONE port, reusing a pooled
    /// connection when there is a live one.
    pub async fn open(
        &self,
        key: &PoolKey,
        netns: &PodNetns,
        tls: Arc<rustls::ClientConfig>,
        target: SocketAddr,
        timeout: Duration,
        l7: Option<&'static str>,
    ) -> Result<(SendStream<Bytes>, RecvStream, TunnelWatch), TunnelError> {
        let hbone = SocketAddr::new(key.dst, HBONE_PORT);
        let pooled = self.conns.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned();
        let mut sender = match pooled {
            Some(s) => match s.ready().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%hbone, error = %e, "pooled tunnel is gone; reconnecting");
                    self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
                    self.connect(key, netns, tls, timeout).await?
                }
            },
            None => self.connect(key, netns, tls, timeout).await?,
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
        let watch = TunnelWatch(sender.clone());
        let (response, send) =
            sender.send_request(request, false).map_err(|source| TunnelError::H2 { addr: hbone, source })?;
        let response = tokio::time::timeout(timeout, response)
            .await
            .map_err(|_| TunnelError::Connect {
                addr: hbone,
                source: io::Error::new(io::ErrorKind::TimedOut, "no answer to CONNECT"),
            })?
            .map_err(|source| TunnelError::H2 { addr: hbone, source })?;
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused { addr: hbone, target, status: response.status() });
        }
        Ok((send, response.into_body(), watch))
    }

    async fn connect(
        &self,
        key: &PoolKey,
        netns: &PodNetns,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<SendRequest<Bytes>, TunnelError> {
        let addr = SocketAddr::new(key.dst, HBONE_PORT);
        let connect = async {
            let socket = netns.tcp_socket(addr).await?;
            socket.connect(addr).await
        };
        let tcp = tokio::time::timeout(timeout, connect)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))))
            .map_err(|source| TunnelError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        // Identity is checked by the verifier against the expected SPIFFE ID; the name only
        // has to be well-formed, and HBONE dials an IP.
        let name = ServerName::IpAddress(key.dst.into());
        let tls = tokio::time::timeout(timeout, TlsConnector::from(tls).connect(name, tcp))
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")))
            .map_err(|source| TunnelError::Tls { addr, source })?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| TunnelError::H2 { addr, source })?;
        let dst_identity = key.dst_identity.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, peer = %dst_identity, error = %e, "tunnel connection ended");
            }
        });
        info!(%addr, src = %key.src_identity, dst = %key.dst_identity, "tunnel established");
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), sender.clone());
        sender.ready().await.map_err(|source| TunnelError::H2 { addr, source })
    }

    /// Number of pooled tunnel connections (for the admin view).
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
