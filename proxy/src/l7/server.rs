//! Serving one captured HTTP connection: hyper's HTTP/1.1 or HTTP/2 server on the client's
//! connection (with the bytes detection read replayed first), every request handed to
//! [`super::proxy::handle`].
//!
//! On drain (SIGTERM, or an upgrade to a new sluice process) connections move to the new
//! process without a failed request: HTTP/2 gets GOAWAY (streams in flight finish; the client
//! opens a new connection, which the kernel steers to the new process). HTTP/1.1 has no such
//! signal, and closing an idle keep-alive connection races with a request the client may be
//! sending on it; so the next response on each connection says `Connection: close` (the client
//! reconnects cleanly), and only connections that stay idle for [`DRAIN_IDLE_GRACE`] are
//! closed by sluice.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use super::{detect::Protocol, io::Prefixed, proxy, upstream::Wire};
use crate::{
    conns::ConnEntry,
    l4::{DataPath, PodContext},
};

/// A client that opens a connection and sends no request head within this is dropped
/// (slowloris protection); also the HTTP/1.1 idle keep-alive limit between requests.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 windows: large enough for bulk transfers at LAN latency.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// How long an HTTP/1.1 connection may stay idle during a drain before sluice closes it.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(5);

/// What every request on one client connection shares.
pub struct ConnCtx {
    pub pod: Arc<PodContext>,
    pub dp: Arc<DataPath>,
    /// Where the client connected to (the Service ClusterIP:port, or a pod IP).
    pub orig: SocketAddr,
    /// The client's HTTP version, which upstream connections speak too.
    pub wire: Wire,
    pub entry: Arc<ConnEntry>,
    /// Draining: HTTP/1.1 responses carry `Connection: close`.
    pub closing: AtomicBool,
    /// The connection's admission permit and registry entry: held while anything of the
    /// connection lives, hyper's connection or the bridge of an upgraded one (which holds
    /// this context).
    pub held: (crate::admission::Permit, crate::conns::ConnGuard),
}

/// Whether the client has closed its side of an HTTP/1.1 connection. Such a client may have
/// half-closed after its request and still read the answer, so sluice keeps serving it; but a
/// client that was killed or gave up looks exactly the same until sluice writes, so an answer
/// sluice makes itself after this is not counted as a failure the client saw (see
/// `proxy::handle`). Each request carries it in its extensions.
#[derive(Debug, Clone, Default)]
pub struct ClientEof {
    /// hyper read the EOF.
    read: Arc<AtomicBool>,
    /// The client socket, to ask the kernel whether the FIN is queued (hyper may not have read
    /// it yet). HTTP/1.1 only: there the connection owns both the socket and every request's
    /// future, so the fd is open whenever a request asks.
    fd: Option<std::os::fd::RawFd>,
}

impl ClientEof {
    pub fn seen(&self) -> bool {
        if self.read.load(Ordering::Relaxed) {
            return true;
        }
        let Some(fd) = self.fd else { return false };
        let mut byte = 0u8;
        // SAFETY: `fd` is the open client socket (see the field); a one-byte peek does not
        // consume anything. 0 means the FIN is the next thing to read; a reset client is gone.
        let n =
            unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        n == 0
            || (n < 0
                && matches!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN)
                ))
    }
}

/// Serves the connection until it ends. `prefix` are the bytes detection already read.
pub async fn serve(client: TcpStream, prefix: Bytes, protocol: Protocol, ctx: Arc<ConnCtx>) {
    let eof = ClientEof {
        read: Arc::default(),
        fd: (protocol != Protocol::Http2).then(|| std::os::fd::AsRawFd::as_raw_fd(&client)),
    };
    let io = TokioIo::new(Counted {
        inner: Prefixed::new(prefix, client),
        entry: ctx.entry.clone(),
        eof: eof.clone(),
    });
    let mut draining = ctx.dp.draining.subscribe();
    let cfg = &ctx.dp.l7.cfg;
    let svc_ctx = ctx.clone();
    // Boxed: hyper's HTTP/2 server spawns a task per stream holding this future, and the
    // proxy's request future is large (moving it cost more than the rest of a gRPC call).
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(eof.clone());
        Box::pin(proxy::handle(req, svc_ctx.clone()))
    });
    let result = match protocol {
        Protocol::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .max_header_list_size(cfg.max_header_bytes as u32)
                .serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = until_draining(&mut draining) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        Protocol::Http1 | Protocol::Opaque => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(cfg.max_header_bytes.max(8192))
                // A client may half-close after its request and still wait for the response.
                .half_close(true)
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = until_draining(&mut draining) => {
                    ctx.closing.store(true, Ordering::Relaxed);
                    tokio::select! {
                        r = conn.as_mut() => r,
                        _ = tokio::time::sleep(DRAIN_IDLE_GRACE) => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    }
                }
            }
        }
    };
    if let Err(e) = result {
        // Malformed input is answered by hyper (400/431, or GOAWAY) before it gets here;
        // this is the end of that one client's connection, nobody else's.
        debug!(pod = %ctx.pod.key, dst = %ctx.orig, error = %e, "client connection ended with an error");
    }
}

async fn until_draining(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Counts the bytes of the client connection into its registry entry (`sluice conns`):
/// read = client → upstream ("sent"), written = upstream → client ("received").
/// It also notes the client's EOF ([`ClientEof`]).
struct Counted<T> {
    inner: T,
    entry: Arc<ConnEntry>,
    eof: ClientEof,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.entry.sent.fetch_add(n as u64, Ordering::Relaxed);
        } else if room && matches!(r, Poll::Ready(Ok(()))) {
            self.eof.read.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.entry.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.entry.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
