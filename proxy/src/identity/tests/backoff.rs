//! Retries against an unreachable or rate-limiting CA, on a paused clock: exponential backoff
//! with jitter, capped low so issuance resumes within seconds once the CA is back, never sooner
//! than the CA's `retry-after`; and the bounded wait of a pod's first connections for its
//! first certificate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use tokio::time::Instant;

use super::*;
use crate::identity::manager::backoff_delay;

/// An embedded CA (signing for any identity) behind a script of failures, recording when each
/// identity asked (on tokio's clock, which the tests pause).
struct ScriptedCa {
    inner: EmbeddedCa,
    /// Failures to answer before signing, per identity (`default` for the others).
    script: Mutex<HashMap<SpiffeId, VecDeque<CaError>>>,
    down: std::sync::atomic::AtomicBool,
    calls: Mutex<HashMap<SpiffeId, Vec<Instant>>>,
}

fn unreachable(_: &SpiffeId) -> CaError {
    CaError::Unreachable { addr: "https://ca.test:15012".into(), reason: "connection refused".into() }
}

fn rate_limited(after: Duration) -> CaError {
    CaError::RateLimited {
        addr: "https://ca.test:15012".into(),
        retry_after: Some(after),
        reason: "over the node's rate".into(),
    }
}

impl ScriptedCa {
    fn new(root: &Root) -> Arc<ScriptedCa> {
        let config = EmbeddedCaConfig::new("node-1", TD);
        let inner =
            EmbeddedCa::load(&root.cert, &root.key, config, Arc::new(|_: &str, _: &SpiffeId| true)).unwrap();
        Arc::new(ScriptedCa { inner, script: Mutex::default(), down: false.into(), calls: Mutex::default() })
    }

    fn calls(&self, id: &SpiffeId) -> Vec<Instant> {
        self.calls.lock().unwrap().get(id).cloned().unwrap_or_default()
    }
}

impl CertificateAuthority for ScriptedCa {
    fn sign(&self, req: SignRequest) -> SignFuture<'_> {
        self.calls.lock().unwrap().entry(req.identity.clone()).or_default().push(Instant::now());
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(unreachable(&req.identity))));
        }
        let scripted = self.script.lock().unwrap().get_mut(&req.identity).and_then(VecDeque::pop_front);
        if let Some(e) = scripted {
            return Box::pin(std::future::ready(Err(e)));
        }
        self.inner.sign(req)
    }

    fn trust_bundle(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.inner.trust_bundle()
    }
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Yields (on the paused clock) until `check` holds, at most `limit` of paused time.
async fn until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

#[test]
fn the_delay_doubles_is_jittered_capped_and_honors_retry_after() {
    let (initial, max) = (Duration::from_millis(500), Duration::from_secs(10));
    for failures in 1..=12u32 {
        let ceiling = (initial * 2u32.pow(failures - 1)).min(max);
        assert_eq!(
            backoff_delay(initial, max, failures, None, 0.0, 0.0),
            ceiling / 2,
            "{failures}: half at least"
        );
        assert_eq!(backoff_delay(initial, max, failures, None, 1.0, 0.0), ceiling, "{failures}: all at most");
    }
    assert_eq!(backoff_delay(initial, max, 40, None, 1.0, 0.0), max, "no overflow");
    let after = Duration::from_secs(3);
    // A retry-after longer than the backoff wins, stretched by up to a half.
    assert_eq!(backoff_delay(initial, max, 1, Some(after), 1.0, 0.0), after);
    assert_eq!(backoff_delay(initial, max, 1, Some(after), 1.0, 1.0), after + after / 2);
    // A shorter one does not shorten the backoff.
    assert_eq!(backoff_delay(initial, max, 6, Some(Duration::from_millis(10)), 1.0, 1.0), max);
}

#[tokio::test(start_paused = true)]
async fn first_issuance_backs_off_with_jitter_and_waits_out_retry_after() {
    let root = root();
    let ca = ScriptedCa::new(&root);
    ca.script.lock().unwrap().insert(
        id("web"),
        VecDeque::from([
            unreachable(&id("web")),
            unreachable(&id("web")),
            rate_limited(Duration::from_secs(3)),
        ]),
    );
    let m = Arc::new(CertManager::new("node-1", TD, ca.clone(), CertManagerConfig::default()).unwrap());
    let rt = tokio::runtime::Handle::current();
    assert!(matches!(m.request(&id("web"), &rt), CertStatus::Pending { .. }));
    assert!(until(Duration::from_secs(60), || m.has_certificate(&id("web"))).await);
    let g = gaps(&ca.calls(&id("web")));
    assert_eq!(g.len(), 3, "{g:?}");
    let within =
        |d: Duration, lo: u64, hi: u64| d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi);
    assert!(within(g[0], 250, 500), "after the 1st failure: {g:?}");
    assert!(within(g[1], 500, 1000), "after the 2nd: {g:?}");
    // The 3rd failure's own backoff is 1-2 s; the CA asked for 3 s.
    assert!(within(g[2], 3000, 4500), "after the rate limit: {g:?}");
}

/// Review finding 7: a CA answering `retry-after-ms: 400000000000000` (12 700 years) made the
/// clock arithmetic panic; days were obeyed. It is capped at a minute, wherever it comes from.
#[test]
fn a_huge_retry_after_is_capped_at_a_minute() {
    use crate::identity::remote_ca::{parse_retry_after, MAX_RETRY_AFTER};
    assert_eq!(MAX_RETRY_AFTER, Duration::from_secs(60));
    assert_eq!(parse_retry_after("400000000000000"), Some(MAX_RETRY_AFTER));
    assert_eq!(parse_retry_after(&u64::MAX.to_string()), Some(MAX_RETRY_AFTER));
    assert_eq!(parse_retry_after(" 1500 "), Some(Duration::from_millis(1500)));
    assert_eq!(parse_retry_after("soon"), None);
    let (initial, max) = (Duration::from_millis(500), Duration::from_secs(10));
    // Passed straight to the backoff (any CA implementation): capped, stretched by at most half.
    assert_eq!(backoff_delay(initial, max, 1, Some(Duration::MAX), 0.0, 0.0), MAX_RETRY_AFTER);
    assert_eq!(backoff_delay(initial, max, u32::MAX, Some(Duration::MAX), 1.0, 1.0), MAX_RETRY_AFTER * 3 / 2);
    assert_eq!(
        backoff_delay(initial, max, 1, Some(Duration::from_secs(3 * 86_400)), 0.0, 0.0),
        MAX_RETRY_AFTER
    );
}

/// The same through the manager: an identity told to wait 12 700 years is asked for again
/// within 90 s (60 s stretched by its jitter), and nothing panics on the way.
#[tokio::test(start_paused = true)]
async fn a_ca_asking_for_ages_is_asked_again_within_the_cap() {
    let root = root();
    let ca = ScriptedCa::new(&root);
    ca.script.lock().unwrap().insert(id("web"), VecDeque::from([rate_limited(Duration::MAX)]));
    let m = Arc::new(CertManager::new("node-1", TD, ca.clone(), CertManagerConfig::default()).unwrap());
    let rt = tokio::runtime::Handle::current();
    m.request(&id("web"), &rt);
    assert!(until(Duration::from_secs(120), || m.has_certificate(&id("web"))).await);
    let g = gaps(&ca.calls(&id("web")));
    assert_eq!(g.len(), 1, "{g:?}");
    assert!(g[0] >= Duration::from_secs(60) && g[0] <= Duration::from_secs(90), "{g:?}");
}

#[tokio::test(start_paused = true)]
async fn issuance_resumes_within_seconds_once_the_ca_is_back() {
    let root = root();
    let ca = ScriptedCa::new(&root);
    ca.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let m = Arc::new(CertManager::new("node-1", TD, ca.clone(), CertManagerConfig::default()).unwrap());
    let rt = tokio::runtime::Handle::current();
    m.request(&id("web"), &rt);
    // Two minutes of outage.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let g = gaps(&ca.calls(&id("web")));
    assert!(g.len() >= 12, "kept trying: {g:?}");
    assert!(g.iter().all(|d| *d <= Duration::from_secs(10)), "never more than 10 s apart: {g:?}");
    assert!(g.iter().rev().take(4).all(|d| *d >= Duration::from_secs(5)), "backed off to the cap: {g:?}");
    // Jitter: the capped delays are not all the same.
    let last: HashSet<Duration> = g.iter().rev().take(6).copied().collect();
    assert!(last.len() > 1, "{g:?}");
    let pending = m.certs();
    assert_eq!(pending[0].state, CertState::Pending);
    assert!(pending[0].last_error.as_deref().unwrap_or_default().contains("unreachable"), "{pending:?}");

    ca.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let back = Instant::now();
    assert!(until(Duration::from_secs(30), || m.has_certificate(&id("web"))).await);
    assert!(back.elapsed() <= Duration::from_secs(10), "issued {:?} after the CA came back", back.elapsed());
}

#[tokio::test(start_paused = true)]
async fn identities_turned_away_together_come_back_spread_out() {
    let root = root();
    let ca = ScriptedCa::new(&root);
    let ids: Vec<SpiffeId> = (0..30).map(|i| SpiffeId::new(TD, "shop", &format!("sa-{i}"))).collect();
    for id in &ids {
        ca.script.lock().unwrap().insert(id.clone(), VecDeque::from([rate_limited(Duration::from_secs(1))]));
    }
    let m = Arc::new(CertManager::new("node-1", TD, ca.clone(), CertManagerConfig::default()).unwrap());
    let rt = tokio::runtime::Handle::current();
    for id in &ids {
        m.request(id, &rt);
    }
    assert!(until(Duration::from_secs(30), || ids.iter().all(|id| m.has_certificate(id))).await);
    let second: Vec<Duration> = ids.iter().map(|id| gaps(&ca.calls(id))[0]).collect();
    assert!(
        second.iter().all(|g| *g >= Duration::from_secs(1) && *g <= Duration::from_millis(1500)),
        "{second:?}"
    );
    let distinct: HashSet<Duration> = second.iter().copied().collect();
    assert!(distinct.len() >= 20, "spread, not a herd: {} distinct retry times of 30", distinct.len());
}

#[tokio::test(start_paused = true)]
async fn first_connections_wait_for_the_certificate_then_are_refused() {
    let root = root();
    let ca = ScriptedCa::new(&root);
    // api's CA never answers in time; web's answers after two failures (~0.75 s).
    ca.script
        .lock()
        .unwrap()
        .insert(id("web"), VecDeque::from([unreachable(&id("web")), unreachable(&id("web"))]));
    let m = Arc::new(CertManager::new("node-1", TD, ca.clone(), CertManagerConfig::default()).unwrap());
    ca.script.lock().unwrap().insert(id("api"), (0..100).map(|_| unreachable(&id("api"))).collect());
    let rt = tokio::runtime::Handle::current();
    m.request(&id("web"), &rt);
    m.request(&id("api"), &rt);
    let limit = Duration::from_secs(5);
    let started = Instant::now();
    let (web_id, api_id) = (id("web"), id("api"));
    let (web, api) = tokio::join!(m.await_certificate(&web_id, limit), m.await_certificate(&api_id, limit));
    assert!(web, "web's certificate came within the wait");
    assert!(!api, "api's did not: refused");
    let took = started.elapsed();
    assert!(
        took >= limit && took < limit + Duration::from_millis(100),
        "refused at the end of the wait: {took:?}"
    );
    assert_eq!(m.no_certificate.waited.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(m.no_certificate.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Held: no wait, nothing counted.
    assert!(m.await_certificate(&id("web"), limit).await);
    assert_eq!(m.no_certificate.waited.load(std::sync::atomic::Ordering::Relaxed), 2);
}
