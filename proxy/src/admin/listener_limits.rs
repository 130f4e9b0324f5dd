//! Bounds on the node's own HTTP listeners: readiness (`0.0.0.0:15021`) and metrics
//! (`0.0.0.0:15020`), which every pod of the cluster can reach, and the admin API's TCP port
//! (`127.0.0.1:15000`, reachable by hostNetwork pods). Without them, any pod could hold as
//! many idle connections as it liked (a descriptor and a task each, forever) and keep the
//! kubelet's probe and Prometheus's scrape from being answered.
//!
//! Per listener: a cap on open connections, a smaller cap per source (an IPv4 address or an
//! IPv6 /64), a deadline for each request's headers (hyper's `header_read_timeout`, which also
//! closes a keep-alive connection that sends no next request), and an idle timeout (no byte
//! either way, e.g. a client that stopped reading its response). A connection over a cap is
//! reset at accept; everything is counted.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{admission::PeerKey, idle::IdleTimeout};

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Of those, from one source (an IPv4 address, an IPv6 /64).
    pub max_per_source: usize,
    /// A request's headers must be in within this (and a kept-alive connection's next request
    /// must start within it).
    pub header_read_timeout: Duration,
    /// No byte either way for this long closes the connection.
    pub idle_timeout: Duration,
}

/// The kubelet probes once every few seconds, one connection at a time, from the node.
pub const READINESS: ListenerLimits = ListenerLimits {
    max_connections: 256,
    max_per_source: 16,
    header_read_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(10),
};

/// Prometheus scrapes with one connection per target (two during a scraper's restart); a
/// scrape must be answered within its timeout (10 s by default) anyway.
pub const METRICS: ListenerLimits = ListenerLimits {
    max_connections: 256,
    max_per_source: 16,
    header_read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
};

/// The CLI on the node. `sluice tap` streams (with a heartbeat every 5 s, so it is never idle
/// for long while its reader keeps up).
pub const ADMIN: ListenerLimits = ListenerLimits {
    max_connections: 64,
    max_per_source: 64,
    header_read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
};

/// What one listener did.
#[derive(Debug, Default, Serialize)]
pub struct ListenerCounters {
    pub accepted: AtomicU64,
    /// Reset at accept: the listener's cap or the source's was reached.
    pub refused: AtomicU64,
    /// Closed for sending no (complete) request in time, or for moving no byte.
    pub timed_out: AtomicU64,
}

/// The counters of the node's listeners, for `sluice status` and `/metrics`.
#[derive(Debug, Default)]
pub struct NodeListeners {
    pub readiness: ListenerCounters,
    pub metrics: ListenerCounters,
    pub admin: ListenerCounters,
}

pub static COUNTERS: NodeListeners = NodeListeners {
    readiness: ListenerCounters::new(),
    metrics: ListenerCounters::new(),
    admin: ListenerCounters::new(),
};

impl ListenerCounters {
    pub const fn new() -> Self {
        ListenerCounters {
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        }
    }
}

impl NodeListeners {
    /// `(listener, event, count)` for every counter.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        for (name, c) in [("readiness", &self.readiness), ("metrics", &self.metrics), ("admin", &self.admin)]
        {
            for (event, v) in
                [("accepted", &c.accepted), ("refused", &c.refused), ("timed_out", &c.timed_out)]
            {
                out.push((name, event, v.load(Ordering::Relaxed)));
            }
        }
        out
    }
}

/// Admission to one listener.
pub struct Gate {
    limits: ListenerLimits,
    counters: &'static ListenerCounters,
    open: AtomicUsize,
    per_source: Mutex<HashMap<PeerKey, usize>>,
    idle: IdleTimeout,
}

/// One admitted connection's place; dropping it gives it back.
pub struct Ticket {
    gate: Arc<Gate>,
    source: PeerKey,
}

impl Gate {
    pub fn new(limits: ListenerLimits, counters: &'static ListenerCounters) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            counters,
            open: AtomicUsize::new(0),
            per_source: Mutex::default(),
            idle: IdleTimeout::new(Some(limits.idle_timeout)),
        })
    }

    /// A place for a connection from `peer`, or `None` (counted): the caller resets it.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Option<Ticket> {
        let source = PeerKey::of_unknown_addr(peer.ip());
        let mut per_source = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_source.get(&source).copied().unwrap_or(0);
        if n >= self.limits.max_per_source || self.open.load(Ordering::Acquire) >= self.limits.max_connections
        {
            drop(per_source);
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        per_source.insert(source.clone(), n + 1);
        self.open.fetch_add(1, Ordering::AcqRel);
        drop(per_source);
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Ticket { gate: self.clone(), source })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// An HTTP/1.1 server builder with the listener's header deadline.
    pub fn http1(&self) -> http1::Builder {
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new()).header_read_timeout(self.limits.header_read_timeout);
        b
    }

    /// Serves one admitted connection: `serve` gets the stream (metered) and runs until the
    /// connection ends, or is dropped after the idle timeout. Holds `ticket` until then.
    pub async fn serve<I, F, Fut, E>(&self, ticket: Ticket, io: I, serve: F)
    where
        I: AsyncRead + AsyncWrite + Unpin,
        F: FnOnce(Metered<I>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: IsTimeout,
    {
        let moved = Arc::new(AtomicU64::new(0));
        let io = Metered { io, moved: moved.clone() };
        match self.idle.run(serve(io), &moved, &moved).await {
            None => {
                self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(e)) if e.is_timeout() => {
                self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
        }
        drop(ticket);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut per_source = self.gate.per_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per_source.remove(&self.source);
            }
        }
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An error that can say it was a timeout (hyper's header read timeout).
pub trait IsTimeout {
    fn is_timeout(&self) -> bool;
}

impl IsTimeout for hyper::Error {
    fn is_timeout(&self) -> bool {
        hyper::Error::is_timeout(self)
    }
}

/// A stream that counts the bytes moved either way (for the idle timeout).
pub struct Metered<I> {
    io: I,
    moved: Arc<AtomicU64>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Metered<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Metered<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.moved.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Closes `stream` with a reset (a refused connection costs no FIN handshake and no TIME_WAIT).
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> &'static ListenerCounters {
        Box::leak(Box::new(ListenerCounters::new()))
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_source_and_in_all() {
        let limits = ListenerLimits { max_connections: 5, max_per_source: 2, ..READINESS };
        let c = counters();
        let gate = Gate::new(limits, c);
        let a: Vec<Ticket> = (0..2).map(|_| gate.admit(addr("10.0.0.1:1000")).unwrap()).collect();
        assert!(gate.admit(addr("10.0.0.1:1001")).is_none(), "the source's cap");
        // An IPv6 source is its /64: rotating addresses does not help.
        let b: Vec<Ticket> =
            (1..=2).map(|i| gate.admit(format!("[2001:db8::{i}]:80").parse().unwrap()).unwrap()).collect();
        assert!(gate.admit(addr("[2001:db8::99]:80")).is_none());
        let c1 = gate.admit(addr("10.0.0.3:1")).unwrap();
        assert!(gate.admit(addr("10.0.0.4:1")).is_none(), "the listener's cap");
        assert_eq!((c.accepted.load(Ordering::Relaxed), c.refused.load(Ordering::Relaxed)), (5, 3));
        drop((a, b, c1));
        assert_eq!(gate.open(), 0);
        assert!(gate.per_source.lock().unwrap().is_empty(), "sources without connections are forgotten");
    }

    async fn server(limits: ListenerLimits, c: &'static ListenerCounters) -> SocketAddr {
        use http_body_util::Full;
        use hyper::{service::service_fn, Request, Response};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let gate = Gate::new(limits, c);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                let Some(ticket) = gate.admit(peer) else {
                    reset(stream);
                    continue;
                };
                let gate = gate.clone();
                tokio::spawn(async move {
                    let builder = gate.http1();
                    gate.serve(ticket, stream, |io| {
                        // `/hang` is never answered: nothing moves.
                        let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                            if req.uri().path() == "/hang" {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        });
                        builder.serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                    })
                    .await;
                });
            }
        });
        at
    }

    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 256];
        loop {
            match tokio::time::timeout(within, s.read(&mut b)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn silent_and_stalled_connections_are_closed_and_others_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = ListenerLimits {
            max_connections: 4,
            max_per_source: 4,
            // Long enough that the five connections below are all accepted before the first
            // deadline, whatever the machine's load.
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(3),
        };
        let c = counters();
        let at = server(limits, c).await;
        // Two silent connections, one that sends half a header and stops, one whose request is
        // never answered: every place is taken.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(tokio::net::TcpStream::connect(at).await.unwrap());
        }
        held[2].write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        held[3].write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        // A fifth is refused while they are held.
        let mut fifth = tokio::net::TcpStream::connect(at).await.unwrap();
        assert!(closed_within(&mut fifth, Duration::from_secs(5)).await, "refused at once");
        // The header deadline closes the first three, the idle timeout the fourth.
        for s in &mut held {
            assert!(closed_within(s, Duration::from_secs(10)).await, "closed");
        }
        assert_eq!(c.timed_out.load(Ordering::Relaxed), 4);
        assert_eq!(c.refused.load(Ordering::Relaxed), 1);
        // The places are back: a real request is answered.
        let mut ok = tokio::net::TcpStream::connect(at).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), ok.read_to_string(&mut out)).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
}
