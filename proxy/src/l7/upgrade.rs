//! Upgraded connections: after a `101 Switching Protocols` (WebSocket) or a 2xx to CONNECT,
//! both sides of the exchange belong to the new protocol and sluice copies bytes.
//!
//! hyper's connection future ends as soon as it hands its socket over to the upgrade, so
//! whatever the connection held there (its admission permit, its `sluice conns` entry, its
//! share of a circuit breaker's `maxConnections`) would be given back while two descriptors
//! live on in the bridge: a pod could hold any number of sockets by answering its own
//! upgrades. So the bridge owns what the connection held (`hold`, dropped when it ends), and
//! runs under the idle timeout of byte-forwarded connections, like opaque TCP.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::idle::IdleTimeout;

/// How an upgraded connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Bridged {
    /// Both sides closed: (bytes client → upstream, bytes upstream → client).
    Closed(u64, u64),
    /// A side failed (reset, I/O error).
    Failed(String),
    /// Neither side sent a byte for the idle timeout (counted by the [`IdleTimeout`]).
    Idle,
    /// One side never completed its upgrade.
    NotUpgraded(String),
}

/// Waits for both sides to hand over their connections, then copies bytes both ways until
/// both are done or the connection is idle for the timeout. `sent` and `received` count the
/// bytes written to and read from the upstream side, and are what the idle timeout watches.
pub async fn bridge(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle: &IdleTimeout,
    sent: &AtomicU64,
    received: &AtomicU64,
) -> Bridged {
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => return Bridged::NotUpgraded(e.to_string()),
    };
    let mut c = TokioIo::new(c);
    let mut u = Counting { inner: TokioIo::new(u), written: sent, read: received };
    match idle.run(tokio::io::copy_bidirectional(&mut c, &mut u), sent, received).await {
        Some(Ok((up, down))) => Bridged::Closed(up, down),
        Some(Err(e)) => Bridged::Failed(e.to_string()),
        None => Bridged::Idle,
    }
}

/// Counts the bytes that go through a stream, both ways.
struct Counting<'a, T> {
    inner: T,
    written: &'a AtomicU64,
    read: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use http::{header, Request, Response, StatusCode};
    use http_body_util::Empty;
    use hyper::{body::Incoming, service::service_fn};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An HTTP/1.1 server on one end of an in-memory pipe that answers every upgrade with a
    /// 101 and hands the upgraded request to `on_upgrade`; the other end is returned.
    fn upgrading_server(on_upgrade: impl Fn(OnUpgrade) + Send + Sync + 'static) -> tokio::io::DuplexStream {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let on_upgrade = Arc::new(on_upgrade);
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                on_upgrade(hyper::upgrade::on(&mut req));
                async {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(StatusCode::SWITCHING_PROTOCOLS)
                            .header(header::UPGRADE, "websocket")
                            .header(header::CONNECTION, "upgrade")
                            .body(Empty::<bytes::Bytes>::new())
                            .unwrap(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(a), svc)
                .with_upgrades()
                .await;
        });
        b
    }

    /// A client that upgrades over `io` and returns its side of the upgraded connection.
    async fn upgrade_client(io: tokio::io::DuplexStream) -> TokioIo<hyper::upgrade::Upgraded> {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        let req = Request::builder()
            .uri("/chat")
            .header(header::HOST, "x")
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "upgrade")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        TokioIo::new(hyper::upgrade::on(resp).await.unwrap())
    }

    /// The bridge between a "client" side and an "upstream" side, each an upgraded server
    /// connection; returns the client's and the application's ends and the bridge's task.
    async fn bridged(
        idle: Arc<IdleTimeout>,
        counts: Arc<(AtomicU64, AtomicU64)>,
    ) -> (
        TokioIo<hyper::upgrade::Upgraded>,
        TokioIo<hyper::upgrade::Upgraded>,
        tokio::task::JoinHandle<Bridged>,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let tx2 = tx.clone();
        let client_io = upgrading_server(move |u| drop(tx.send(("client", u))));
        let upstream_io = upgrading_server(move |u| drop(tx2.send(("upstream", u))));
        let (client, app) = tokio::join!(upgrade_client(client_io), upgrade_client(upstream_io));
        let mut sides = vec![rx.recv().await.unwrap(), rx.recv().await.unwrap()];
        sides.sort_by_key(|(k, _)| *k);
        let (_, client_side) = sides.remove(0);
        let (_, upstream_side) = sides.remove(0);
        let task =
            tokio::spawn(
                async move { bridge(client_side, upstream_side, &idle, &counts.0, &counts.1).await },
            );
        (client, app, task)
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_are_counted() {
        let idle = Arc::new(IdleTimeout::new(None));
        let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let (mut client, mut app, task) = bridged(idle, counts.clone()).await;
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        app.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        app.write_all(b"back!!").await.unwrap();
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"back!!");
        assert_eq!(counts.0.load(Ordering::Relaxed), 5);
        assert_eq!(counts.1.load(Ordering::Relaxed), 6);
        drop(client);
        drop(app);
        assert!(matches!(task.await.unwrap(), Bridged::Closed(..) | Bridged::Failed(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_upgraded_connection_is_closed_by_the_idle_timeout() {
        let idle = Arc::new(IdleTimeout::new(Some(Duration::from_secs(8))));
        let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let (mut client, mut app, task) = bridged(idle.clone(), counts).await;
        // Chatty for a while: every 5 s a byte, 6 times (never 8 s of silence).
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            client.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            app.read_exact(&mut b).await.unwrap();
        }
        assert!(!task.is_finished());
        // Then silent: closed after the timeout, and both ends see it.
        assert_eq!(task.await.unwrap(), Bridged::Idle);
        assert_eq!(idle.closed.load(Ordering::Relaxed), 1);
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).await.unwrap_or(0), 0);
        assert_eq!(app.read(&mut b).await.unwrap_or(0), 0);
    }
}
