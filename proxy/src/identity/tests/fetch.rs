//! First issuance for enrollment: asynchronous, single-flight per identity, and independent
//! per identity (a CA that hangs for one identity delays no other).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::*;

/// An embedded CA that holds back its answer for one identity until released, and counts the
/// signing requests per identity.
struct GatedCa {
    inner: EmbeddedCa,
    held: SpiffeId,
    gate: tokio::sync::Semaphore,
    calls: Mutex<HashMap<SpiffeId, usize>>,
}

impl GatedCa {
    fn calls(&self, id: &SpiffeId) -> usize {
        self.calls.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

impl CertificateAuthority for GatedCa {
    fn sign(&self, req: SignRequest) -> SignFuture<'_> {
        *self.calls.lock().unwrap().entry(req.identity.clone()).or_default() += 1;
        Box::pin(async move {
            if req.identity == self.held {
                let _pass = self.gate.acquire().await.expect("gate open");
            }
            self.inner.sign(req).await
        })
    }

    fn trust_bundle(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.inner.trust_bundle()
    }
}

/// Calls `check` every 10 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

fn gated_manager(root: &Root, config: CertManagerConfig) -> (Arc<CertManager>, Arc<GatedCa>) {
    let ca = Arc::new(GatedCa {
        inner: embedded_ca(root, "node-1", Duration::from_secs(3600)),
        held: id("web"),
        gate: tokio::sync::Semaphore::new(0),
        calls: Mutex::default(),
    });
    (Arc::new(CertManager::new("node-1", TD, ca.clone(), config).unwrap()), ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_ca_for_one_identity_delays_no_other_and_is_asked_once() {
    let root = root();
    let (m, ca) = gated_manager(&root, CertManagerConfig::default());
    let issued = Arc::new(AtomicUsize::new(0));
    m.on_issued({
        let issued = issued.clone();
        move || {
            issued.fetch_add(1, Ordering::SeqCst);
        }
    });
    let rt = tokio::runtime::Handle::current();

    // Asking never waits for the CA, even for the identity whose answer is held back.
    let asked = Instant::now();
    assert_eq!(m.request(&id("web"), &rt), CertStatus::Pending { failures: 0, last_error: None });
    assert_eq!(m.request(&id("api"), &rt), CertStatus::Pending { failures: 0, last_error: None });
    assert!(asked.elapsed() < Duration::from_millis(500), "request blocked for {:?}", asked.elapsed());

    // api's certificate comes while web's CA still hangs.
    assert!(eventually(Duration::from_secs(5), || m.request(&id("api"), &rt) == CertStatus::Ready).await);
    assert!(m.server_config(&id("api")).is_ok());
    assert!(matches!(m.request(&id("web"), &rt), CertStatus::Pending { .. }));
    assert!(m.server_config(&id("web")).is_err(), "no certificate for web yet");
    assert_eq!(issued.load(Ordering::SeqCst), 1, "the hook ran for api");

    // Every further request for web (another pod of it) shares the one in flight.
    for _ in 0..5 {
        assert!(matches!(m.request(&id("web"), &rt), CertStatus::Pending { .. }));
    }
    assert_eq!(ca.calls(&id("web")), 1, "one signing request for web however often it was asked");

    ca.gate.add_permits(1);
    assert!(eventually(Duration::from_secs(5), || m.request(&id("web"), &rt) == CertStatus::Ready).await);
    assert_eq!(ca.calls(&id("web")), 1);
    assert_eq!(ca.calls(&id("api")), 1);
    assert_eq!(issued.load(Ordering::SeqCst), 2);
    assert_eq!(m.certs().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_identity_retries_with_backoff_until_dropped() {
    let root = root();
    let config =
        CertManagerConfig { retry_initial: Duration::from_millis(20), ..CertManagerConfig::default() };
    let (m, ca) = gated_manager(&root, config);
    let rt = tokio::runtime::Handle::current();
    // db runs on node-2: node-1's CA refuses it, and the fetch says why.
    assert!(matches!(m.request(&id("db"), &rt), CertStatus::Pending { .. }));
    assert!(
        eventually(Duration::from_secs(5), || matches!(
            m.request(&id("db"), &rt),
            CertStatus::Pending { failures, last_error: Some(e) } if failures >= 2 && e.contains("not authorized")
        ))
        .await,
        "{:?}",
        m.request(&id("db"), &rt)
    );
    // `sluice certs` shows it pending, with why and when the next attempt is.
    let views = m.certs();
    assert_eq!(views.len(), 1, "{views:?}");
    assert_eq!(views[0].state, CertState::Pending);
    assert!(views[0].serial.is_none() && views[0].renewal_failures >= 2, "{views:?}");
    assert!(views[0].next_renewal.is_some(), "the next attempt is shown: {views:?}");
    assert!(views[0].last_error.as_deref().unwrap_or_default().contains("not authorized"), "{views:?}");

    // The last pod of db is gone: its fetch stops.
    m.retain(&HashSet::new());
    let after_retain = ca.calls(&id("db"));
    // (The backoff is at most 20 ms × 2^n here; half a second covers several retries.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        ca.calls(&id("db")) <= after_retain + 1,
        "the fetch went on after retain: {} → {}",
        after_retain,
        ca.calls(&id("db"))
    );
    // Asking again starts afresh.
    assert_eq!(m.request(&id("db"), &rt), CertStatus::Pending { failures: 0, last_error: None });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_fetched_for_a_dropped_identity_is_not_installed() {
    let root = root();
    let (m, ca) = gated_manager(&root, CertManagerConfig::default());
    let rt = tokio::runtime::Handle::current();
    assert!(matches!(m.request(&id("web"), &rt), CertStatus::Pending { .. }));
    assert!(eventually(Duration::from_secs(5), || ca.calls(&id("web")) == 1).await);
    m.retain(&HashSet::from([id("api")]));
    ca.gate.add_permits(1);
    // The aborted fetch never installs web (nor shows it pending).
    assert!(m.certs().iter().all(|c| c.identity != id("web")), "{:?}", m.certs());
    assert_eq!(m.request(&id("api"), &rt), CertStatus::Pending { failures: 0, last_error: None });
    assert!(eventually(Duration::from_secs(5), || m.request(&id("api"), &rt) == CertStatus::Ready).await);
    assert_eq!(m.certs().iter().map(|c| c.identity.clone()).collect::<Vec<_>>(), vec![id("api")]);
}
