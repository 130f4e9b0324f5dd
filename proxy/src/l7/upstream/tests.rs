//! The upstream HTTP/2 pool against real HTTP/2 servers over in-memory connections, on tokio's
//! paused clock: single flight, the server's stream limit, a stream counted until both its
//! request and response bodies are done, hyper's keepalive evicting from the pool, idle expiry.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicBool, AtomicUsize},
};

use http_body_util::BodyExt;
use tokio::{
    io::DuplexStream,
    sync::{oneshot, watch},
    time::Instant as TokioInstant,
};

use super::*;

const ENDPOINT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7)), 8080);

fn key() -> Key {
    Key { src_pod: 1, endpoint: ENDPOINT, wire: Wire::Http2, tls: None }
}

/// How one test server connection behaves.
#[derive(Clone, Default)]
struct ServerCfg {
    /// Its `SETTINGS_MAX_CONCURRENT_STREAMS`.
    max_streams: Option<u32>,
    /// Sends the response head and keeps the response body open (else a complete response).
    hold_body: bool,
    /// Starts (sends its SETTINGS) only once this opens.
    start: Option<watch::Receiver<bool>>,
}

/// HTTP/2 servers: each dial makes an in-memory connection served by an h2 server task.
struct Servers {
    dials: AtomicUsize,
    next: Mutex<VecDeque<ServerCfg>>,
    frozen: watch::Sender<bool>,
    /// Set to make the next dials fail with "connection refused".
    refuse: AtomicBool,
}

impl Servers {
    fn new() -> Arc<Self> {
        Arc::new(Servers {
            dials: AtomicUsize::new(0),
            next: Mutex::default(),
            frozen: watch::channel(false).0,
            refuse: AtomicBool::new(false),
        })
    }

    fn then(&self, cfg: ServerCfg) {
        self.next.lock().unwrap().push_back(cfg);
    }

    fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }

    fn dial(&self) -> Result<(UpstreamIo, Option<TunnelWatch>, Option<Arc<Lease>>), UpstreamError> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        if self.refuse.load(Ordering::SeqCst) {
            return Err(UpstreamError::Connect {
                endpoint: ENDPOINT,
                source: io::ErrorKind::ConnectionRefused.into(),
            });
        }
        let cfg = self.next.lock().unwrap().pop_front().unwrap_or_default();
        let (client, server) = tokio::io::duplex(64 << 10);
        tokio::spawn(serve(server, cfg, self.frozen.subscribe()));
        Ok((UpstreamIo::mem(client), None, None))
    }
}

async fn serve(io: DuplexStream, cfg: ServerCfg, mut frozen: watch::Receiver<bool>) {
    if let Some(mut start) = cfg.start.clone() {
        let _ = start.wait_for(|open| *open).await;
    }
    let mut builder = h2::server::Builder::new();
    if let Some(max) = cfg.max_streams {
        builder.max_concurrent_streams(max);
    }
    let Ok(mut conn) = builder.handshake::<_, bytes::Bytes>(io).await else { return };
    // Request bodies and open response bodies are kept (dropping them would reset the stream).
    let mut held = Vec::new();
    let freeze = async move {
        let _ = frozen.wait_for(|f| *f).await;
    };
    tokio::pin!(freeze);
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, mut respond))) => {
                    let send = respond.send_response(http::Response::new(()), !cfg.hold_body).unwrap();
                    held.push((request.into_body(), send));
                }
                _ => return,
            },
            () = &mut freeze => break,
        }
    }
    // Black-holed: the connection stays, nothing is read or answered.
    std::future::pending::<()>().await;
    drop((conn, held));
}

fn get() -> Request<Body> {
    Request::builder().uri("http://svc.test/").body(crate::l7::empty_body()).unwrap()
}

async fn send(
    pool: &Upstreams,
    servers: &Arc<Servers>,
    req: Request<Body>,
) -> Result<Response<UpstreamBody>, SendError> {
    let dial = || std::future::ready(servers.dial());
    pool.send_h2_via(&key(), ENDPOINT, req, dial, || Some(())).await.map(|(resp, _)| resp)
}

fn stat(pool: &Upstreams, name: &str) -> u64 {
    pool.h2_stats().snapshot().into_iter().find(|(n, _)| *n == name).unwrap().1
}

/// Polls `cond` every millisecond until it holds, for at most 5 s (on the paused clock both are
/// virtual: nothing sleeps for real).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = TokioInstant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(TokioInstant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_requests_share_one_handshake() {
    let pool = Arc::new(Upstreams::default());
    let servers = Servers::new();
    let (open_gate, gate) = watch::channel(false);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (pool, servers, gate) = (pool.clone(), servers.clone(), gate.clone());
            tokio::spawn(async move {
                let dial = || {
                    let (servers, mut gate) = (servers.clone(), gate.clone());
                    async move {
                        gate.wait_for(|open| *open).await.unwrap();
                        servers.dial()
                    }
                };
                let result = pool.send_h2_via(&key(), ENDPOINT, get(), dial, || Some(())).await;
                result.map(|(resp, _)| resp.status()).map_err(|e| e.error.to_string())
            })
        })
        .collect();
    until("9 waiters", || stat(&pool, "single_flight_waits") == 9).await;
    open_gate.send_replace(true);
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(http::StatusCode::OK));
    }
    assert_eq!(servers.dials(), 1, "one handshake for the burst");
    assert_eq!(pool.sizes().1, 1);
    assert_eq!(pool.counters.reused.load(Ordering::Relaxed), 9);
}

#[tokio::test(start_paused = true)]
async fn a_failed_connect_fails_every_waiting_request_with_the_request_back() {
    let pool = Arc::new(Upstreams::default());
    let servers = Servers::new();
    servers.refuse.store(true, Ordering::SeqCst);
    let (open_gate, gate) = watch::channel(false);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (pool, servers, gate) = (pool.clone(), servers.clone(), gate.clone());
            tokio::spawn(async move {
                let dial = || {
                    let (servers, mut gate) = (servers.clone(), gate.clone());
                    async move {
                        gate.wait_for(|open| *open).await.unwrap();
                        servers.dial()
                    }
                };
                pool.send_h2_via(&key(), ENDPOINT, get(), dial, || Some(())).await.err().expect("refused")
            })
        })
        .collect();
    until("9 waiters", || stat(&pool, "single_flight_waits") == 9).await;
    open_gate.send_replace(true);
    for t in tasks {
        let SendError { error, request } = t.await.unwrap();
        // Never sent: the proxy may retry it on another endpoint, as a connect failure.
        assert!(error.is_connect() && request.is_some(), "{error}");
        assert!(
            matches!(error, UpstreamError::Connect { ref source, .. } if source.kind() == io::ErrorKind::ConnectionRefused)
        );
    }
    assert_eq!(servers.dials(), 1);
    assert_eq!(stat(&pool, "connect_errors"), 1);
    servers.refuse.store(false, Ordering::SeqCst);
    assert_eq!(
        send(&pool, &servers, get()).await.ok().unwrap().status(),
        http::StatusCode::OK,
        "the next request connects again"
    );
    assert_eq!(servers.dials(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_connection_at_the_server_stream_limit_gets_another() {
    let pool = Upstreams::default();
    let servers = Servers::new();
    servers.then(ServerCfg { max_streams: Some(1), hold_body: true, start: None });
    servers.then(ServerCfg { max_streams: Some(1), hold_body: true, start: None });
    let a = send(&pool, &servers, get()).await.ok().unwrap();
    let b = send(&pool, &servers, get()).await.ok().unwrap();
    assert_eq!(servers.dials(), 2, "the first connection was at the server's limit of 1 stream");
    let (ca, cb) = (a.body().slot.clone().unwrap(), b.body().slot.clone().unwrap());
    assert!(!Arc::ptr_eq(ca.pooled(), cb.pooled()));
    assert_eq!((pool.sizes().1, stat(&pool, "extra_connections")), (2, 1));
    drop((ca, cb));
    // The response bodies hold the streams; once one is gone, its connection takes the next.
    let conn_a = a.body().slot.as_ref().unwrap().pooled().clone();
    drop(a);
    assert_eq!(conn_a.active(), 0);
    let c = send(&pool, &servers, get()).await.ok().unwrap();
    assert!(Arc::ptr_eq(c.body().slot.as_ref().unwrap().pooled(), &conn_a));
    assert_eq!(servers.dials(), 2);
    drop((b, c));
}

/// Lets every task that can run, run: the paused clock only moves once the runtime is idle.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_server_limit_that_arrives_after_the_first_request_is_seen_by_the_next() {
    // The server's SETTINGS come after the first request went out (a real network's round
    // trip): the second request must still see the limit of 1 and get its own connection.
    let pool = Arc::new(Upstreams::default());
    let servers = Servers::new();
    let (start, started) = watch::channel(false);
    servers.then(ServerCfg { max_streams: Some(1), hold_body: true, start: Some(started) });
    let first = tokio::spawn({
        let (pool, servers) = (pool.clone(), servers.clone());
        async move { send(&pool, &servers, get()).await.ok().unwrap() }
    });
    until("the first request on its connection", || pool.sizes().1 == 1).await;
    settle().await;
    start.send_replace(true);
    let a = first.await.unwrap();
    // Queued behind the first request, it would wait as long as that one's body stays open.
    let b = tokio::time::timeout(Duration::from_secs(5), send(&pool, &servers, get()))
        .await
        .expect("the second request queued behind the server's limit")
        .ok()
        .unwrap();
    assert_eq!(servers.dials(), 2);
    assert!(!Arc::ptr_eq(a.body().slot.as_ref().unwrap().pooled(), b.body().slot.as_ref().unwrap().pooled()));
}

/// A request body that stays open until told to end.
struct OpenBody(oneshot::Receiver<()>);

impl hyper::body::Body for OpenBody {
    type Data = bytes::Bytes;
    type Error = crate::l7::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        Pin::new(&mut self.0).poll(cx).map(|_| None)
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_counts_until_both_its_bodies_are_done() {
    let pool = Upstreams::default();
    let servers = Servers::new();
    let (end_request, open) = oneshot::channel();
    let req = Request::builder().method("POST").uri("http://svc.test/").body(OpenBody(open).boxed()).unwrap();
    // The server answers at once, completely, while the request body is still being sent.
    let resp = send(&pool, &servers, req).await.ok().unwrap();
    let conn = resp.body().slot.as_ref().unwrap().pooled().clone();
    let body = resp.into_body().collect().await.unwrap();
    assert!(body.to_bytes().is_empty());
    assert_eq!(conn.active(), 1, "the request body is still on its way");
    end_request.send(()).unwrap();
    until("the request body to end", || conn.active() == 0).await;
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_keepalive_evicts_the_connection_from_the_pool() {
    let pool = Upstreams::default();
    let servers = Servers::new();
    drop(send(&pool, &servers, get()).await.ok().unwrap());
    assert_eq!(pool.sizes().1, 1);
    servers.frozen.send_replace(true);
    // hyper PINGs an idle connection after 30 s of silence and gives up 10 s later; the pool
    // must forget it then, not only see it closed.
    tokio::time::sleep(Duration::from_secs(39)).await;
    assert_eq!(pool.sizes().1, 1);
    until("the keepalive eviction", || pool.sizes().1 == 0).await;
    assert_eq!(stat(&pool, "evicted_keepalive"), 1);
    assert_eq!(stat(&pool, "evicted_closed"), 0);
    servers.frozen.send_replace(false);
    drop(send(&pool, &servers, get()).await.ok().unwrap());
    assert_eq!(servers.dials(), 2, "the next request makes a new connection");
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_closes_after_a_minute() {
    let pool = Upstreams::default();
    let servers = Servers::new();
    drop(send(&pool, &servers, get()).await.ok().unwrap());
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(pool.sizes().1, 1, "keepalive PINGs do not count as use, and are answered");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pool.sizes().1, 0);
    assert_eq!(stat(&pool, "evicted_idle"), 1);
    assert_eq!(stat(&pool, "evicted_keepalive"), 0);
}

#[tokio::test(start_paused = true)]
async fn the_pool_reads_a_stream_limit_without_waiting_for_the_connections_poll() {
    let pool = Upstreams::default();
    let servers = Servers::new();
    servers.then(ServerCfg { max_streams: Some(7), hold_body: true, start: None });
    let a = send(&pool, &servers, get()).await.ok().unwrap();
    settle().await;
    let conn = a.body().slot.as_ref().unwrap().pooled().clone();
    assert_eq!(conn.conn().max_streams(), 7);
    // The connection's task in the middle of a poll holds hyper's connection. The pool asks
    // under its node-wide lock: it must get an answer at once (the last one seen), not wait.
    let polling = conn.conn().connection.lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let asker = {
        let conn = conn.clone();
        std::thread::spawn(move || tx.send(conn.conn().max_streams()).unwrap())
    };
    let answer = rx.recv_timeout(Duration::from_secs(5));
    drop(polling);
    asker.join().unwrap();
    assert_eq!(answer, Ok(7), "answered while the connection was being polled");
}

#[tokio::test(start_paused = true)]
async fn shedding_closes_idle_connections_and_gives_their_units_back() {
    use crate::admission::{Admission, AdmissionConfig, PodSlots};
    let admission = Arc::new(Admission::new(AdmissionConfig::new(100, 100, 100, 100)));
    let slots = Arc::new(PodSlots::default());
    let pool = Upstreams::default();
    let servers = Servers::new();
    // Dials as production does: the socket's unit inside the stream and beside it.
    let dial = || {
        let unit = Lease::new(admission.dial(&slots, 1).unwrap());
        let (io, watch, _) = servers.dial().unwrap();
        let io = UpstreamIo { _unit: Some(unit.clone()), ..io };
        std::future::ready(Ok((io, watch, Some(unit))))
    };
    let busy = pool.send_h2_via(&key(), ENDPOINT, get(), dial, || Some(())).await.ok().unwrap().0;
    assert_eq!(admission.sockets(), 1);
    // Another pod's connections are not touched; a busy connection is not either.
    assert_eq!(pool.shed_idle(Shed::Pod(2)), 0);
    assert_eq!(pool.shed_idle(Shed::Pod(1)), 0);
    let conn = busy.body().slot.as_ref().unwrap().pooled().clone();
    drop(busy);
    until("the request's stream to end", || conn.active() == 0).await;
    assert_eq!(pool.shed_idle(Shed::Pod(1)), 1);
    assert_eq!(admission.sockets(), 0, "the unit is back at once");
    assert_eq!(pool.sizes().1, 0);
    assert_eq!(stat(&pool, "evicted_shed"), 1);
}
