//! The tunnel pool against real HTTP/2 peers over in-memory connections, on tokio's paused
//! clock: single flight, the peer's stream limit, keepalive and CONNECT-timeout eviction, idle
//! expiry.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
};

use tokio::{io::DuplexStream, sync::watch, task::JoinHandle, time::Instant};

use super::*;

fn key() -> PoolKey {
    PoolKey {
        src_pod: 1,
        src_identity: "spiffe://cluster.local/ns/a/sa/a".into(),
        dst_identity: "spiffe://cluster.local/ns/b/sa/b".into(),
        dst: [10, 0, 0, 2].into(),
    }
}

const TARGET: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)), 8080);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How one test peer connection behaves.
#[derive(Clone, Copy)]
struct PeerCfg {
    /// Its `SETTINGS_MAX_CONCURRENT_STREAMS`.
    max_streams: Option<u32>,
    /// Answers CONNECT with 200 (else never answers).
    answer: bool,
}

impl Default for PeerCfg {
    fn default() -> Self {
        PeerCfg { max_streams: None, answer: true }
    }
}

/// HBONE peers: each dial makes an in-memory connection served by an h2 server task.
#[derive(Default)]
struct Peers {
    dials: AtomicUsize,
    /// Behaviour of the next connections, in order (then the default).
    next: Mutex<VecDeque<PeerCfg>>,
    /// Once true, every peer stops reading its connection (no PING answer, nothing).
    frozen: Mutex<Option<watch::Sender<bool>>>,
    servers: Mutex<Vec<JoinHandle<()>>>,
}

impl Peers {
    fn new() -> Arc<Self> {
        let peers = Arc::new(Peers::default());
        *peers.frozen.lock().unwrap() = Some(watch::channel(false).0);
        peers
    }

    fn then(&self, cfg: PeerCfg) {
        self.next.lock().unwrap().push_back(cfg);
    }

    fn freeze(&self) {
        self.frozen.lock().unwrap().as_ref().unwrap().send_replace(true);
    }

    fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }

    /// Whether the server of the `n`th connection has seen it end.
    fn ended(&self, n: usize) -> bool {
        self.servers.lock().unwrap()[n].is_finished()
    }

    fn dial(&self) -> impl Future<Output = Result<(DuplexStream, Option<Arc<Lease>>), TunnelError>> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        let cfg = self.next.lock().unwrap().pop_front().unwrap_or_default();
        let (client, server) = tokio::io::duplex(64 << 10);
        let frozen = self.frozen.lock().unwrap().as_ref().unwrap().subscribe();
        self.servers.lock().unwrap().push(tokio::spawn(serve(server, cfg, frozen)));
        std::future::ready(Ok((client, None)))
    }
}

async fn serve(io: DuplexStream, cfg: PeerCfg, mut frozen: watch::Receiver<bool>) {
    let mut builder = h2::server::Builder::new();
    if let Some(max) = cfg.max_streams {
        builder.max_concurrent_streams(max);
    }
    let Ok(mut conn) = builder.handshake::<_, Bytes>(io).await else { return };
    // Streams stay open (dropping their handles would reset them).
    let mut held = Vec::new();
    let freeze = async move {
        let _ = frozen.wait_for(|f| *f).await;
    };
    tokio::pin!(freeze);
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, mut respond))) => {
                    if cfg.answer {
                        let send = respond.send_response(http::Response::new(()), false).unwrap();
                        held.push((request.into_body(), Some(send), None));
                    } else {
                        held.push((request.into_body(), None, Some(respond)));
                    }
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

async fn open(pool: &HbonePool, peers: &Arc<Peers>) -> Result<TunnelStream, TunnelError> {
    pool.open_with(&key(), TARGET, CONNECT_TIMEOUT, None, || peers.dial()).await
}

/// Polls `cond` every millisecond until it holds, for at most 5 s (on the paused clock both are
/// virtual: nothing sleeps for real).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn stat(pool: &HbonePool, name: &str) -> u64 {
    pool.stats().snapshot().into_iter().find(|(n, _)| *n == name).unwrap().1
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_streams_share_one_handshake() {
    let pool = Arc::new(HbonePool::default());
    let peers = Peers::new();
    let (open_gate, gate) = watch::channel(false);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (pool, peers, mut gate) = (pool.clone(), peers.clone(), gate.clone());
            tokio::spawn(async move {
                let dial = || async move {
                    gate.wait_for(|open| *open).await.unwrap();
                    peers.dial().await
                };
                pool.open_with(&key(), TARGET, CONNECT_TIMEOUT, None, dial)
                    .await
                    .map(|s| s.slot.pooled().clone())
            })
        })
        .collect();
    until("9 waiters", || stat(&pool, "single_flight_waits") == 9).await;
    open_gate.send_replace(true);
    let mut tunnels = Vec::new();
    for t in tasks {
        tunnels.push(t.await.unwrap().expect("every stream opens"));
    }
    assert_eq!(peers.dials(), 1, "one handshake for the burst");
    assert!(tunnels.iter().all(|t| Arc::ptr_eq(t, &tunnels[0])));
    assert_eq!(pool.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_handshake_fails_every_waiter_and_the_next_stream_tries_again() {
    let pool = Arc::new(HbonePool::default());
    let dials = Arc::new(AtomicUsize::new(0));
    let (open_gate, gate) = watch::channel(false);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (pool, dials, mut gate) = (pool.clone(), dials.clone(), gate.clone());
            tokio::spawn(async move {
                let dial = || async move {
                    dials.fetch_add(1, Ordering::SeqCst);
                    gate.wait_for(|open| *open).await.unwrap();
                    Err::<(DuplexStream, Option<Arc<Lease>>), _>(TunnelError::Connect {
                        addr: SocketAddr::new(key().dst, HBONE_PORT),
                        source: io::ErrorKind::ConnectionRefused.into(),
                    })
                };
                pool.open_with(&key(), TARGET, CONNECT_TIMEOUT, None, dial).await.err().expect("refused")
            })
        })
        .collect();
    until("9 waiters", || stat(&pool, "single_flight_waits") == 9).await;
    open_gate.send_replace(true);
    for t in tasks {
        let e = t.await.unwrap();
        // Every waiter can still tell that nothing listens there (the L4 path falls back to
        // plaintext on that).
        assert!(e.is_unreachable(), "{e}");
    }
    assert_eq!(dials.load(Ordering::SeqCst), 1);
    assert_eq!(stat(&pool, "connect_errors"), 1);
    assert!(pool.is_empty());
    let peers = Peers::new();
    open(&pool, &peers).await.expect("the next stream connects again");
    assert_eq!(peers.dials(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_at_the_peer_stream_limit_gets_a_sibling() {
    let pool = HbonePool::new(TunnelPoolConfig {
        limits: PoolLimits { max_conns_per_key: 2, ..TunnelPoolConfig::default().limits },
        ..TunnelPoolConfig::default()
    });
    let peers = Peers::new();
    peers.then(PeerCfg { max_streams: Some(1), answer: true });
    peers.then(PeerCfg { max_streams: Some(1), answer: true });
    let a = open(&pool, &peers).await.unwrap();
    let b = open(&pool, &peers).await.unwrap();
    assert_eq!(peers.dials(), 2, "the first tunnel was at the peer's limit of 1 stream");
    assert!(!Arc::ptr_eq(a.slot.pooled(), b.slot.pooled()));
    assert_eq!((pool.len(), stat(&pool, "extra_connections")), (2, 1));
    // Both at their limit and the key at its bound: the next stream queues inside h2 on one
    // of them, and goes out when a stream there ends.
    let queued = tokio::spawn({
        let pool = Arc::new(pool);
        let peers = peers.clone();
        async move {
            let s = open(&pool, &peers).await.map(|s| s.slot.queued());
            (s, pool)
        }
    });
    until("a saturated checkout", || {
        peers.dials() == 2 && a.slot.pooled().active() + b.slot.pooled().active() == 3
    })
    .await;
    drop(a);
    drop(b);
    let (queued_ok, pool) = queued.await.unwrap();
    assert!(queued_ok.expect("the queued stream opens once a slot frees"));
    assert_eq!(peers.dials(), 2);
    assert_eq!(stat(&pool, "saturated"), 1);
    assert_eq!(stat(&pool, "evicted_connect_timeout"), 0);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_ping_evicts_and_closes_the_tunnel() {
    let pool = HbonePool::default();
    let peers = Peers::new();
    let mut held = open(&pool, &peers).await.unwrap();
    let t0 = Instant::now();
    peers.freeze();
    // The stream on it fails once the PING (after 30 s) has gone unanswered for 10 s.
    let ended = held.recv.data().await;
    assert!(matches!(ended, Some(Err(_))), "{ended:?}");
    let after = t0.elapsed();
    assert!(after >= Duration::from_secs(39) && after <= Duration::from_secs(41), "{after:?}");
    assert_eq!(stat(&pool, "evicted_keepalive"), 1);
    assert!(pool.is_empty(), "evicted from the pool, not just closed");
    assert!(held.watch.is_closing());
    // The next stream makes a new tunnel (to a peer that answers again).
    let fresh = Peers::new();
    open(&pool, &fresh).await.unwrap();
    assert_eq!(fresh.dials(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_connect_timeout_evicts_the_tunnel() {
    let pool = HbonePool::default();
    let peers = Peers::new();
    peers.then(PeerCfg { max_streams: None, answer: false });
    let t0 = Instant::now();
    let e = open(&pool, &peers).await.err().expect("no answer to CONNECT");
    assert!(
        matches!(&e, TunnelError::Connect { source, .. } if source.kind() == io::ErrorKind::TimedOut),
        "{e}"
    );
    assert_eq!(t0.elapsed(), CONNECT_TIMEOUT);
    assert_eq!(stat(&pool, "evicted_connect_timeout"), 1);
    assert!(pool.is_empty());
    // The next stream does not queue on it: a new tunnel, which answers.
    let s = open(&pool, &peers).await.expect("a fresh tunnel");
    assert_eq!(peers.dials(), 2);
    // The evicted tunnel had no stream left: it closes (its peer sees the end).
    until("the evicted tunnel to close", || peers.ended(0)).await;
    drop(s);
}

#[tokio::test(start_paused = true)]
async fn an_idle_tunnel_closes_after_the_idle_timeout() {
    let pool = HbonePool::default();
    let peers = Peers::new();
    drop(open(&pool, &peers).await.unwrap());
    tokio::time::sleep(Duration::from_secs(89)).await;
    assert_eq!(pool.len(), 1, "still pooled before 90 s (keepalive PINGs do not count as use)");
    // Used at 89 s: the idle clock starts again.
    drop(open(&pool, &peers).await.unwrap());
    tokio::time::sleep(Duration::from_secs(89)).await;
    assert_eq!((pool.len(), peers.dials()), (1, 1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pool.is_empty());
    assert_eq!(stat(&pool, "evicted_idle"), 1);
    until("the idle tunnel to close", || peers.ended(0)).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_learns_the_peer_limit_before_it_counts_streams() {
    // Three concurrent first streams to a peer that takes one stream per connection: the
    // tunnel's first PING round trip brings the peer's SETTINGS, so the waiters see a full
    // tunnel and open their own instead of queueing inside h2.
    let pool = Arc::new(HbonePool::default());
    let peers = Peers::new();
    for _ in 0..3 {
        peers.then(PeerCfg { max_streams: Some(1), answer: true });
    }
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (pool, peers) = (pool.clone(), peers.clone());
            tokio::spawn(async move { open(&pool, &peers).await.map(|s| (s.slot.queued(), s)) })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        let (queued, s) = t.await.unwrap().expect("opens");
        assert!(!queued);
        streams.push(s);
    }
    assert_eq!((peers.dials(), pool.len()), (3, 3));
    assert!(streams.iter().all(|s| s.slot.pooled().active() == 1));
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_holds_its_sockets_unit_until_it_closes_or_is_shed() {
    use crate::admission::{Admission, AdmissionConfig, PodSlots};
    let admission = Arc::new(Admission::new(AdmissionConfig::new(100, 100, 100, 100)));
    let slots = Arc::new(PodSlots::default());
    let pool = HbonePool::default();
    let peers = Peers::new();
    let dial = || async {
        let unit = Lease::new(admission.dial(&slots, 1).unwrap());
        let (io, _) = peers.dial().await?;
        Ok((io, Some(unit)))
    };
    let s = pool.open_with(&key(), TARGET, CONNECT_TIMEOUT, None, dial).await.unwrap();
    assert_eq!(admission.sockets(), 1);
    assert_eq!(pool.shed_idle(Shed::Pod(1)), 0, "a tunnel with a stream is not idle");
    drop(s);
    assert_eq!(pool.shed_idle(Shed::Pod(2)), 0, "another pod's tunnels are left alone");
    assert_eq!(admission.sockets(), 1, "an idle pooled tunnel still holds its socket");
    assert_eq!(pool.shed_idle(Shed::Pod(1)), 1);
    assert_eq!((admission.sockets(), slots.dialled.load(Ordering::Relaxed)), (0, 0));
    assert_eq!(stat(&pool, "evicted_shed"), 1);
    until("the shed tunnel to close", || peers.ended(0)).await;

    // A tunnel that closes by itself (idle timeout) gives its unit back when its socket goes.
    let dial = || async {
        let unit = Lease::new(admission.dial(&slots, 1).unwrap());
        let (io, _) = peers.dial().await?;
        Ok((io, Some(unit)))
    };
    drop(pool.open_with(&key(), TARGET, CONNECT_TIMEOUT, None, dial).await.unwrap());
    assert_eq!(admission.sockets(), 1);
    tokio::time::sleep(Duration::from_secs(91)).await;
    until("the idle tunnel to close", || peers.ended(1)).await;
    assert_eq!(admission.sockets(), 0);
}
