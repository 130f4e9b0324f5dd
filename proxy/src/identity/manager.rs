//! [`CertManager`]: the certificates and private keys of the identities that have a pod on this
//! node, in memory only, renewed at about half of their life by a rotation task.
//!
//! Renewal swaps the certificate under the TLS configurations (their resolvers read the
//! current one per handshake), so nothing is rebuilt and established connections, which keep
//! the keys they negotiated, are untouched. The old certificate stays in use until its
//! replacement is in; a failed renewal is retried with exponential backoff and jitter, never
//! sooner than the CA's `retry-after` when it gave one.
//!
//! Root rotation: the trust bundle's first root is the one the CA signs under now. When the
//! bundle changes (the CA says so through [`CertificateAuthority::bundle_updates`]), the
//! verifiers use the new bundle for the next handshake, and every certificate that does not
//! lead to the first root is re-issued at a random time within
//! [`CertManagerConfig::rotation_spread`] (so that a node's hundreds of identities do not ask at
//! once), and asked for again, with backoff, until it does.
//!
//! First issuance never blocks its caller: [`CertManager::request`] starts one background
//! fetch per identity (single-flight: every pod of that identity waits for the same one),
//! retried with backoff until it succeeds or [`CertManager::retain`] drops the identity, and
//! returns at once. A slow or refusing CA for one identity delays no other identity, and no
//! enrollment: the enroller asks again on a later reconcile (it is woken through
//! [`CertManager::on_issued`] when a certificate comes in).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::ca::{CaDescription, CertificateAuthority, SignRequest};
use super::spiffe::{check_trust_domain, SpiffeId};
use super::tls::TlsCache;
use super::verify::{self, SharedBundle, TrustBundle};
use super::view::{CertState, CertView, ChainCertView, RootView, TrustBundleView};
use super::{x509, IdentityError};

/// Tuning of the manager (the certificate lifetime itself is the CA's policy, see
/// [`EmbeddedCaConfig::leaf_lifetime`](super::EmbeddedCaConfig)).
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// Retry delay after a first failure; doubles per failure up to `retry_max`. Each delay is
    /// drawn between half of that and all of it (jitter), and is never shorter than the CA's
    /// `retry-after`.
    pub retry_initial: Duration,
    /// Capped low, so that issuance resumes within seconds once an unreachable CA is back.
    pub retry_max: Duration,
    /// How long one signing may take before it counts as failed (a remote CA may hang).
    pub sign_timeout: Duration,
    /// When the trust bundle's first root changes, the certificates under another root are
    /// re-issued at random times within this (a node's identities do not all ask at once).
    pub rotation_spread: Duration,
    /// Certificates that no root of the bundle trusts any more (peers refuse them) are
    /// re-issued within this.
    pub untrusted_spread: Duration,
    /// A certificate issued under another root than the bundle's first (the CA does not sign
    /// under the new root yet) is asked for again after this, doubling up to `misrooted_max`.
    pub misrooted_retry: Duration,
    pub misrooted_max: Duration,
    /// After this many answers in a row under another root than the bundle's first, stop
    /// asking again early: the CA evidently does not sign under that root (a wrong bundle, or
    /// a bundle someone reordered), and re-issuing every identity every minute forever would
    /// only load the CA. The certificate then renews at its normal time; `sluice certs` says
    /// why. A new bundle starts the count again.
    pub misrooted_attempts: u32,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        CertManagerConfig {
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(10),
            sign_timeout: Duration::from_secs(30),
            rotation_spread: Duration::from_secs(30),
            untrusted_spread: Duration::from_secs(5),
            misrooted_retry: Duration::from_secs(5),
            misrooted_max: Duration::from_secs(60),
            misrooted_attempts: 5,
        }
    }
}

/// The delay before attempt `failures + 1`: exponential from `initial` up to `max`, drawn
/// between half of that and all of it (`r0` in 0..1), and at least the CA's `retry_after`,
/// itself stretched by up to half (`r1` in 0..1) so that the identities a rate limit turned
/// away together do not come back together.
pub(crate) fn backoff_delay(
    initial: Duration,
    max: Duration,
    failures: u32,
    retry_after: Option<Duration>,
    r0: f64,
    r1: f64,
) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let ceiling = initial.saturating_mul(1 << exp).min(max);
    let jittered = (ceiling / 2).saturating_add(half_scaled(ceiling, r0)).min(ceiling);
    match retry_after {
        // Whatever a CA implementation passes in, never more than the cap of `retry-after-ms`.
        Some(after) => {
            let after = after.min(super::remote_ca::MAX_RETRY_AFTER);
            jittered.max(after.saturating_add(half_scaled(after, r1)))
        }
        None => jittered,
    }
}

/// `d` × `r` / 2 for `r` in 0..1 (clamped), without the panics of `mul_f64` on odd inputs.
fn half_scaled(d: Duration, r: f64) -> Duration {
    let r = if r.is_finite() { r.clamp(0.0, 1.0) } else { 0.0 };
    Duration::try_from_secs_f64(d.as_secs_f64() * r / 2.0).unwrap_or(Duration::ZERO)
}

/// The longest delay any schedule is set to: far beyond any certificate's renewal, and small
/// enough that adding it to a clock reading can never overflow.
const MAX_SCHEDULE_DELAY: Duration = Duration::from_secs(400 * 24 * 3600);

/// `Instant::now()` plus `delay` (capped at [`MAX_SCHEDULE_DELAY`]), never panicking.
fn instant_in(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay.min(MAX_SCHEDULE_DELAY)).unwrap_or(now)
}

/// The wall-clock time `delay` (capped at [`MAX_SCHEDULE_DELAY`]) from now, never panicking.
fn wall_in(delay: Duration) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.checked_add(time::Duration::try_from(delay.min(MAX_SCHEDULE_DELAY)).unwrap_or(time::Duration::ZERO))
        .unwrap_or(now)
}

/// Connections that needed a pod's identity before its certificate was there.
#[derive(Debug, Default)]
pub struct NoCertificateCounters {
    /// Waited for the certificate (bounded by the connect timeout).
    pub waited: AtomicU64,
    /// Still none at the end of the wait: refused (reset, or a 503 for HTTP).
    pub refused: AtomicU64,
}

/// The answer to "would this node get a certificate for this identity?" (`POST /certs/request`
/// on the admin API, `sluice certs request`): what the CA issued for a fresh key, which was then
/// thrown away, or why it refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRequestView {
    pub identity: String,
    /// The node that asked (this sluice's node).
    pub node: String,
    pub issued: bool,
    /// Always false: a checked certificate is never installed or served.
    #[serde(default)]
    pub installed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// The CA's refusal (or the failure) when `issued` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where this node stands with an identity's certificate ([`CertManager::request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertStatus {
    /// Held: TLS configurations for it can be built now.
    Ready,
    /// Being fetched in the background; `failures` attempts failed so far, the last one with
    /// `last_error`.
    Pending { failures: u32, last_error: Option<String> },
}

/// A first issuance in progress (one per identity).
struct Fetch {
    failures: u32,
    last_error: Option<String>,
    /// When the next attempt is due, after a failure (for `sluice certs`).
    next_attempt: Option<OffsetDateTime>,
    /// Cancels the fetch when the identity is dropped before its certificate came.
    task: Option<tokio::task::AbortHandle>,
}

/// Called (from a data-runtime task) whenever a first certificate was installed.
type IssuedHook = Arc<dyn Fn() + Send + Sync>;

/// An issued certificate with its key, ready for rustls.
pub(super) struct Issued {
    pub key: Arc<CertifiedKey>,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

struct Schedule {
    due: Instant,
    /// `due` as wall-clock time, for display.
    due_wall: OffsetDateTime,
    in_flight: bool,
    failures: u32,
    last_error: Option<String>,
    /// The position in the trust bundle of the root the certificate leads to (None: none).
    root_index: Option<usize>,
    /// Consecutive issuances under another root than the bundle's first.
    misrooted: u32,
}

impl Schedule {
    fn set_due(&mut self, delay: Duration) {
        self.due = instant_in(delay);
        self.due_wall = wall_in(delay);
    }

    /// Brings the next attempt forward to within `delay`, never later than planned.
    fn due_within(&mut self, delay: Duration) -> bool {
        let at = instant_in(delay);
        if at < self.due {
            self.set_due(delay);
            return true;
        }
        false
    }
}

/// One identity: its current certificate (swapped whole on renewal) and renewal state.
pub(super) struct Slot {
    cert: ArcSwap<Issued>,
    sched: Mutex<Schedule>,
}

/// The identities held, shared with the TLS resolvers.
#[derive(Default)]
pub(super) struct Store {
    slots: RwLock<HashMap<SpiffeId, Arc<Slot>>>,
}

impl Store {
    /// The current certificate and key of `id`, for a handshake starting now.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.read().get(id).map(|s| s.cert.load().key.clone())
    }

    pub fn contains(&self, id: &SpiffeId) -> bool {
        self.read().contains_key(id)
    }

    fn get(&self, id: &SpiffeId) -> Option<Arc<Slot>> {
        self.read().get(id).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SpiffeId, Arc<Slot>>> {
        self.slots.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SpiffeId, Arc<Slot>>> {
        self.slots.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// When nothing is due, the rotation task still wakes this often (it is woken at once when
/// an identity is added, so this only bounds how long a dropped manager's task lingers).
const IDLE_WAKE: Duration = Duration::from_secs(60);

pub struct CertManager {
    pub(super) node: String,
    pub(super) trust_domain: String,
    ca: Arc<dyn CertificateAuthority>,
    config: CertManagerConfig,
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) store: Arc<Store>,
    pub(super) bundle: SharedBundle,
    pub(super) tls: TlsCache,
    /// First issuances in progress, by identity (single-flight). Lock order: `fetches`, then
    /// `store`.
    fetches: Mutex<HashMap<SpiffeId, Fetch>>,
    on_issued: Mutex<Option<IssuedHook>>,
    /// Bumped whenever a first certificate is installed (for [`Self::await_certificate`]).
    installed: watch::Sender<u64>,
    /// Wakes the rotation task when the schedule changed.
    wake: Arc<Notify>,
    pub no_certificate: NoCertificateCounters,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("node", &self.node)
            .field("trust_domain", &self.trust_domain)
            .field("identities", &self.store.read().len())
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager for `node`, obtaining certificates from `ca`. Fails if the trust domain is
    /// invalid or the CA's trust bundle is unusable.
    pub fn new(
        node: impl Into<String>,
        trust_domain: impl Into<String>,
        ca: Arc<dyn CertificateAuthority>,
        config: CertManagerConfig,
    ) -> Result<CertManager, IdentityError> {
        let trust_domain = trust_domain.into();
        check_trust_domain(&trust_domain).map_err(|e| IdentityError::Config(e.to_string()))?;
        let bundle = TrustBundle::new(ca.trust_bundle()).map_err(IdentityError::TrustBundle)?;
        Ok(CertManager {
            node: node.into(),
            trust_domain,
            ca,
            config,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            store: Arc::default(),
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
            tls: TlsCache::default(),
            fetches: Mutex::default(),
            on_issued: Mutex::default(),
            installed: watch::channel(0).0,
            wake: Arc::new(Notify::new()),
            no_certificate: NoCertificateCounters::default(),
        })
    }

    /// What the CA is and where the trust bundle comes from.
    pub fn ca_description(&self) -> CaDescription {
        self.ca.describe()
    }

    /// The CA client's own counters.
    pub fn ca_counters(&self) -> Vec<(&'static str, u64)> {
        self.ca.counters()
    }

    /// Whether this node holds a certificate for `id` now.
    pub fn has_certificate(&self, id: &SpiffeId) -> bool {
        self.store.contains(id)
    }

    /// Waits up to `limit` for `id`'s certificate (a pod's first connections race its first
    /// issuance). Returns whether it is there; a wait and a refusal are counted.
    pub async fn await_certificate(&self, id: &SpiffeId, limit: Duration) -> bool {
        if self.store.contains(id) {
            return true;
        }
        self.no_certificate.waited.fetch_add(1, Ordering::Relaxed);
        // Subscribed before the check: an installation after it is seen by `changed`.
        let mut installed = self.installed.subscribe();
        let deadline = Instant::now() + limit;
        loop {
            if self.store.contains(id) {
                return true;
            }
            match tokio::time::timeout_at(deadline, installed.changed()).await {
                Ok(Ok(())) => continue,
                _ => break,
            }
        }
        if self.store.contains(id) {
            return true;
        }
        self.no_certificate.refused.fetch_add(1, Ordering::Relaxed);
        false
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Where this node stands with `id`'s certificate, starting a background fetch on `rt` if
    /// there is none: never waits for the CA (enrollment calls it on the control thread). One
    /// fetch per identity however many callers ask, retried with backoff until the certificate
    /// is in or [`Self::retain`] drops the identity.
    pub fn request(self: &Arc<Self>, id: &SpiffeId, rt: &tokio::runtime::Handle) -> CertStatus {
        if self.store.contains(id) {
            return CertStatus::Ready;
        }
        let mut fetches = self.fetches.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked again under the lock: a fetch installs its certificate holding it.
        if self.store.contains(id) {
            return CertStatus::Ready;
        }
        if let Some(f) = fetches.get(id) {
            return CertStatus::Pending { failures: f.failures, last_error: f.last_error.clone() };
        }
        debug!(identity = %id, "fetching a certificate");
        let task = rt.spawn(self.clone().fetch(id.clone()));
        fetches.insert(
            id.clone(),
            Fetch { failures: 0, last_error: None, next_attempt: None, task: Some(task.abort_handle()) },
        );
        CertStatus::Pending { failures: 0, last_error: None }
    }

    /// Where this node stands with `id`'s certificate, without starting anything (views).
    pub fn status_of(&self, id: &SpiffeId) -> CertStatus {
        if self.store.contains(id) {
            return CertStatus::Ready;
        }
        match self.fetches.lock().unwrap_or_else(PoisonError::into_inner).get(id) {
            Some(f) => CertStatus::Pending { failures: f.failures, last_error: f.last_error.clone() },
            None => CertStatus::Pending { failures: 0, last_error: None },
        }
    }

    /// Calls `hook` each time a first certificate is installed (the daemon re-runs enrollment
    /// then, so that a pod waiting for it is enrolled at once rather than at the next tick).
    pub fn on_issued(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.on_issued.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(hook));
    }

    /// The background first issuance of `id` ([`Self::request`]).
    async fn fetch(self: Arc<Self>, id: SpiffeId) {
        loop {
            match self.issue(&id).await {
                Ok(issued) => {
                    {
                        let mut fetches = self.fetches.lock().unwrap_or_else(PoisonError::into_inner);
                        if fetches.remove(&id).is_none() {
                            debug!(identity = %id, "identity dropped while its certificate was fetched; discarding it");
                            return;
                        }
                        self.install(&id, issued);
                    }
                    let hook = self.on_issued.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    if let Some(hook) = hook {
                        hook();
                    }
                    return;
                }
                Err(e) => {
                    let (failures, retry, loud) = {
                        let mut fetches = self.fetches.lock().unwrap_or_else(PoisonError::into_inner);
                        let Some(f) = fetches.get_mut(&id) else { return };
                        f.failures += 1;
                        let text = e.to_string();
                        let loud = worth_a_warning(f.failures, f.last_error.as_deref(), &text);
                        f.last_error = Some(text);
                        let retry = self.backoff(f.failures, e.retry_after());
                        f.next_attempt = Some(wall_in(retry));
                        (f.failures, retry, loud)
                    };
                    if loud {
                        warn!(identity = %id, error = %e, attempt = failures, retry_in_ms = retry.as_millis() as u64,
                            "no certificate yet; the pods of this identity cannot reach mesh peers until it is in");
                    } else {
                        debug!(identity = %id, error = %e, attempt = failures, retry_in_ms = retry.as_millis() as u64,
                            "no certificate yet");
                    }
                    tokio::time::sleep(retry).await;
                }
            }
        }
    }

    /// Makes sure this node holds a certificate for `id`, asking the CA now if it does not,
    /// and waits for the answer (one attempt; the CA's refusal is the error). For callers that
    /// can wait (tools, tests); enrollment uses [`Self::request`], which never blocks.
    pub async fn ensure(&self, id: &SpiffeId) -> Result<(), IdentityError> {
        if self.store.contains(id) {
            return Ok(());
        }
        let issued = self.issue(id).await?;
        self.install(id, issued);
        Ok(())
    }

    /// Holds `issued` as `id`'s certificate and schedules its renewal, unless `id` already has
    /// one (a concurrent [`Self::ensure`]): the first stays.
    fn install(&self, id: &SpiffeId, issued: Issued) {
        let (serial, not_after) = (issued.serial.clone(), issued.not_after);
        let root_index = self.root_index(&issued);
        let mut sched = Schedule {
            due: Instant::now(),
            due_wall: OffsetDateTime::now_utc(),
            in_flight: false,
            failures: 0,
            last_error: None,
            root_index,
            misrooted: 0,
        };
        self.plan_after_issuance(id, &mut sched, &issued);
        let renew_in = sched.due.saturating_duration_since(Instant::now());
        let slot = Slot { cert: ArcSwap::from_pointee(issued), sched: Mutex::new(sched) };
        {
            let mut slots = self.store.write();
            if slots.contains_key(id) {
                return;
            }
            slots.insert(id.clone(), Arc::new(slot));
        }
        info!(identity = %id, serial = %serial, not_after = %x509::rfc3339(not_after),
            renew_in_s = renew_in.as_secs_f64(), "certificate issued");
        self.installed.send_modify(|n| *n += 1);
        self.wake.notify_one();
    }

    /// Schedules the next renewal of a certificate just issued: at about half-life if it leads
    /// to the bundle's first root, else soon (the CA does not sign under the new root yet),
    /// with backoff.
    fn plan_after_issuance(&self, id: &SpiffeId, sched: &mut Schedule, issued: &Issued) {
        sched.root_index = self.root_index(issued);
        let renewal = self.renewal_delay(issued.not_after);
        if sched.root_index == Some(0) {
            sched.misrooted = 0;
            sched.set_due(renewal);
            return;
        }
        sched.misrooted = sched.misrooted.saturating_add(1);
        let bundle = self.bundle.load();
        let first = bundle.certs.first().map(|c| ChainCertView::of(c, true).subject).unwrap_or_default();
        let under = match sched.root_index {
            Some(i) => format!("root #{} of the trust bundle, not its first root \"{first}\"", i + 1),
            None => "no root of the trust bundle".to_string(),
        };
        if sched.misrooted > self.config.misrooted_attempts {
            // Asked often enough: the CA does not sign under the first root. Renew at the
            // normal time only; a new bundle starts asking early again.
            sched.set_due(renewal);
            let why = format!(
                "issued {} times in a row under {under}; not asking again before the normal renewal at {}: make \
                 the CA sign under the bundle's first root, or put the CA's root first in the bundle",
                sched.misrooted,
                x509::rfc3339(sched.due_wall)
            );
            if sched.misrooted == self.config.misrooted_attempts.saturating_add(1) {
                warn!(identity = %id, serial = %issued.serial, "{why}");
            } else {
                debug!(identity = %id, serial = %issued.serial, "{why}");
            }
            sched.last_error = Some(why);
            return;
        }
        let retry = backoff_delay(
            self.config.misrooted_retry,
            self.config.misrooted_max,
            sched.misrooted,
            None,
            fastrand::f64(),
            0.0,
        );
        let why = match sched.root_index {
            Some(_) => {
                format!("issued under {under} (is the CA signing under the new root yet?); asking again")
            }
            None => format!("issued under {under}; asking again"),
        };
        warn!(identity = %id, serial = %issued.serial, retry_in_s = retry.as_secs_f64(), "{why}");
        sched.last_error = Some(why);
        sched.set_due(retry.min(renewal));
    }

    /// The position in the bundle of the root `issued` leads to.
    fn root_index(&self, issued: &Issued) -> Option<usize> {
        self.bundle.load().root_of(
            &self.provider.signature_verification_algorithms,
            &issued.key.cert,
            check_time(issued.not_before, issued.not_after),
        )
    }

    /// Asks the CA for a certificate for `id` exactly as renewal would (fresh key, CSR, the
    /// same checks of the answer) but keeps nothing: the key and certificate are dropped, the
    /// identities held and served do not change. Answers "would this node get a certificate for
    /// `id`?"; a refusal comes back as [`IdentityError::Ca`].
    pub async fn check_issuance(&self, id: &SpiffeId) -> Result<CertRequestView, IdentityError> {
        let issued = self.issue(id).await?;
        Ok(CertRequestView {
            identity: id.to_string(),
            node: self.node.clone(),
            issued: true,
            installed: false,
            serial: Some(issued.serial.clone()),
            not_before: Some(x509::rfc3339(issued.not_before)),
            not_after: Some(x509::rfc3339(issued.not_after)),
            reason: None,
        })
    }

    /// Drops every identity not in `ids` (no pod of it is left on this node), with its key and
    /// the TLS configurations built for it, and cancels the fetches of such identities. Cheap
    /// when nothing is to go (read locks only), so it may be called on every reconcile.
    pub fn retain(&self, ids: &HashSet<SpiffeId>) {
        {
            let mut fetches = self.fetches.lock().unwrap_or_else(PoisonError::into_inner);
            fetches.retain(|id, f| {
                let keep = ids.contains(id);
                if !keep {
                    debug!(identity = %id, "no pod of this identity is left; its certificate fetch is cancelled");
                    if let Some(task) = f.task.take() {
                        task.abort();
                    }
                }
                keep
            });
        }
        if self.store.read().keys().all(|id| ids.contains(id)) {
            return;
        }
        let removed: Vec<SpiffeId> = {
            let mut slots = self.store.write();
            let gone: Vec<SpiffeId> = slots.keys().filter(|id| !ids.contains(*id)).cloned().collect();
            for id in &gone {
                slots.remove(id);
            }
            gone
        };
        if removed.is_empty() {
            return;
        }
        self.tls.forget(&removed);
        for id in removed {
            info!(identity = %id, "certificate dropped: no pod of this identity is left on the node");
        }
    }

    /// The identities of this node, sorted: the certificates held, and the identities still
    /// waiting for their first one.
    pub fn certs(&self) -> Vec<CertView> {
        let bundle = self.bundle.load();
        let mut out: Vec<CertView> = self
            .store
            .read()
            .iter()
            .map(|(id, slot)| {
                let cert = slot.cert.load();
                let sched = slot.sched.lock().unwrap_or_else(PoisonError::into_inner);
                let mut chain: Vec<ChainCertView> =
                    cert.key.cert.iter().skip(1).map(|c| ChainCertView::of(c, false)).collect();
                if let Some(root) = sched.root_index.and_then(|i| bundle.certs.get(i)) {
                    chain.push(ChainCertView::of(root, true));
                }
                CertView {
                    identity: id.clone(),
                    state: CertState::Ready,
                    serial: Some(cert.serial.clone()),
                    not_before: Some(x509::rfc3339(cert.not_before)),
                    not_after: Some(x509::rfc3339(cert.not_after)),
                    next_renewal: Some(x509::rfc3339(sched.due_wall)),
                    renewal_failures: sched.failures,
                    last_error: sched.last_error.clone(),
                    chain,
                    root_index: sched.root_index,
                }
            })
            .collect();
        let held: HashSet<SpiffeId> = out.iter().map(|c| c.identity.clone()).collect();
        out.extend(
            self.fetches
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|(id, _)| !held.contains(*id))
                .map(|(id, f)| CertView {
                    identity: id.clone(),
                    state: CertState::Pending,
                    serial: None,
                    not_before: None,
                    not_after: None,
                    next_renewal: f.next_attempt.map(x509::rfc3339),
                    renewal_failures: f.failures,
                    last_error: f.last_error.clone(),
                    chain: Vec::new(),
                    root_index: None,
                }),
        );
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// The trust bundle in force, its roots, and how many certificates lead to each.
    pub fn bundle_view(&self) -> TrustBundleView {
        let bundle = self.bundle.load();
        let mut per_root = vec![0; bundle.certs.len()];
        let mut untrusted = 0;
        for slot in self.store.read().values() {
            match slot.sched.lock().unwrap_or_else(PoisonError::into_inner).root_index {
                Some(i) if i < per_root.len() => per_root[i] += 1,
                _ => untrusted += 1,
            }
        }
        TrustBundleView {
            ca: self.ca.describe(),
            roots: bundle.certs.iter().map(RootView::of).collect(),
            certificates_per_root: per_root,
            certificates_untrusted: untrusted,
        }
    }

    /// Starts the rotation task on `rt`. It renews each certificate when due and retries
    /// failures; it ends by itself once the manager is dropped (or abort the handle).
    pub fn spawn_rotation(self: &Arc<Self>, rt: &tokio::runtime::Handle) -> JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        let bundle_updates = self.ca.bundle_updates();
        rt.spawn(rotation_loop(weak, wake, bundle_updates))
    }

    /// A new key pair and CSR for `id`, signed by the CA, checked, ready for rustls.
    async fn issue(&self, id: &SpiffeId) -> Result<Issued, IdentityError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Key(e.to_string()))?;
        let csr = csr_for(id, &key)?;
        let req = SignRequest { node: self.node.clone(), identity: id.clone(), csr_der: csr };
        let chain = match tokio::time::timeout(self.config.sign_timeout, self.ca.sign(req)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(IdentityError::CaTimeout {
                    identity: id.clone(),
                    after: self.config.sign_timeout,
                })
            }
        };

        // Check what came back before using it: a certificate peers would refuse is better
        // reported here, once, than as handshake failures on every connection.
        let bad = |reason: String| IdentityError::BadCaResponse { identity: id.clone(), reason };
        let leaf = chain.first().ok_or_else(|| bad("an empty certificate chain".into()))?;
        let info = x509::leaf_info(leaf).map_err(|e| bad(e.to_string()))?;
        if info.spki != key.subject_public_key_info() {
            return Err(bad("a certificate for another public key than the one in the CSR".into()));
        }
        if self.refresh_bundle()? {
            self.reassess_roots();
        }
        match verify::check_own_chain(
            &self.bundle.load(),
            &self.provider.signature_verification_algorithms,
            &chain,
        ) {
            Ok(got) if got == *id => {}
            Ok(got) => return Err(bad(format!("a certificate for {got}"))),
            Err(e) => return Err(bad(e.to_string())),
        }
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified =
            CertifiedKey::from_der(chain, key_der, &self.provider).map_err(|e| bad(e.to_string()))?;
        Ok(Issued {
            key: Arc::new(certified),
            serial: info.serial_hex,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Follows the CA's trust bundle (a CA rotating its root publishes both roots for a while).
    /// Returns whether it changed.
    fn refresh_bundle(&self) -> Result<bool, IdentityError> {
        let certs = self.ca.trust_bundle();
        if certs == self.bundle.load().certs {
            return Ok(false);
        }
        let bundle = TrustBundle::new(certs).map_err(IdentityError::TrustBundle)?;
        info!(roots = bundle.certs.len(), "trust bundle changed; new handshakes verify peers against it");
        self.bundle.store(Arc::new(bundle));
        Ok(true)
    }

    /// The trust bundle may have changed: take it, then re-check which root each certificate
    /// leads to and plan the re-issuance of those not under the first root. Public for the
    /// daemon's SIGHUP and for tests; the rotation task calls it on every bundle update.
    pub fn bundle_changed(&self) {
        match self.refresh_bundle() {
            Ok(true) => self.reassess_roots(),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "the CA's new trust bundle is unusable; keeping the previous one"),
        }
    }

    /// Which root every certificate leads to now; those not under the bundle's first root are
    /// re-issued at a random time within `rotation_spread` (`untrusted_spread` for those no
    /// root trusts any more).
    fn reassess_roots(&self) {
        let bundle = self.bundle.load();
        let algs = &self.provider.signature_verification_algorithms;
        let (mut rotating, mut untrusted) = (0usize, 0usize);
        for slot in self.store.read().values() {
            let cert = slot.cert.load();
            let root = bundle.root_of(algs, &cert.key.cert, check_time(cert.not_before, cert.not_after));
            let mut sched = slot.sched.lock().unwrap_or_else(PoisonError::into_inner);
            sched.root_index = root;
            let spread = match root {
                Some(0) => {
                    // Under the first root now (e.g. the bundle was put back): a retry planned
                    // for a certificate under another root is not needed any more.
                    if sched.misrooted > 0 && !sched.in_flight {
                        sched.misrooted = 0;
                        sched.last_error = None;
                        sched.set_due(self.renewal_delay(cert.not_after));
                    }
                    continue;
                }
                Some(_) => {
                    rotating += 1;
                    self.config.rotation_spread
                }
                None => {
                    untrusted += 1;
                    self.config.untrusted_spread
                }
            };
            sched.misrooted = 0;
            // A renewal in flight re-checks its result against this bundle when it lands.
            if !sched.in_flight {
                sched.due_within(spread.mul_f64(fastrand::f64()));
            }
        }
        if rotating + untrusted > 0 {
            info!(
                under_another_root = rotating,
                untrusted,
                spread_s = self.config.rotation_spread.as_secs_f64(),
                first_root = %bundle.certs.first().map(|c| ChainCertView::of(c, true).subject).unwrap_or_default(),
                "certificates that do not lead to the trust bundle's first root are re-issued"
            );
            self.wake.notify_one();
        }
    }

    /// Half of the remaining validity, minus up to a tenth of that half at random, so that
    /// identities issued together (at node start) do not all go back to the CA at once.
    fn renewal_delay(&self, not_after: OffsetDateTime) -> Duration {
        let remaining = Duration::try_from(not_after - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO);
        let half = remaining / 2;
        let mut r = [0u8; 1];
        let fraction = if x509::random_fill(&mut r).is_ok() { f64::from(r[0]) / 255.0 } else { 0.0 };
        half.saturating_sub(half.mul_f64(0.1 * fraction))
    }

    fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        backoff_delay(
            self.config.retry_initial,
            self.config.retry_max,
            failures,
            retry_after,
            fastrand::f64(),
            fastrand::f64(),
        )
    }

    /// Marks the due identities in flight and returns them, with the next due time of the rest.
    fn take_due(&self, now: Instant) -> (Vec<(SpiffeId, Arc<Slot>)>, Option<Instant>) {
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (id, slot) in self.store.read().iter() {
            let mut sched = slot.sched.lock().unwrap_or_else(PoisonError::into_inner);
            if sched.in_flight {
                continue;
            }
            if sched.due <= now {
                sched.in_flight = true;
                due.push((id.clone(), slot.clone()));
            } else {
                next = Some(next.map_or(sched.due, |n| n.min(sched.due)));
            }
        }
        (due, next)
    }

    async fn renew(self: Arc<Self>, id: SpiffeId, slot: Arc<Slot>) {
        debug!(identity = %id, "renewing certificate");
        let result = self.issue(&id).await;
        let still_held = self.store.get(&id).is_some_and(|s| Arc::ptr_eq(&s, &slot));
        {
            let mut sched = slot.sched.lock().unwrap_or_else(PoisonError::into_inner);
            sched.in_flight = false;
            if !still_held {
                debug!(identity = %id, "identity left the node during renewal; discarding the result");
            } else {
                match result {
                    Ok(issued) => {
                        sched.failures = 0;
                        sched.last_error = None;
                        self.plan_after_issuance(&id, &mut sched, &issued);
                        let renew_in = sched.due.saturating_duration_since(Instant::now());
                        info!(identity = %id, serial = %issued.serial, previous_serial = %slot.cert.load().serial,
                            not_after = %x509::rfc3339(issued.not_after), renew_in_s = renew_in.as_secs_f64(),
                            "certificate renewed");
                        slot.cert.store(Arc::new(issued));
                    }
                    Err(e) => {
                        sched.failures += 1;
                        let retry = self.backoff(sched.failures, e.retry_after());
                        sched.set_due(retry);
                        let text = e.to_string();
                        let loud = worth_a_warning(sched.failures, sched.last_error.as_deref(), &text);
                        sched.last_error = Some(text);
                        let not_after = slot.cert.load().not_after;
                        if !loud {
                            debug!(identity = %id, error = %e, attempt = sched.failures,
                                retry_in_ms = retry.as_millis() as u64, "certificate renewal failed");
                        } else if not_after <= OffsetDateTime::now_utc() {
                            error!(identity = %id, error = %e, attempt = sched.failures,
                                retry_in_ms = retry.as_millis() as u64, expired_at = %x509::rfc3339(not_after),
                                "certificate expired and cannot be renewed; peers refuse this identity until the CA answers");
                        } else {
                            warn!(identity = %id, error = %e, attempt = sched.failures,
                                retry_in_ms = retry.as_millis() as u64, valid_until = %x509::rfc3339(not_after),
                                "certificate renewal failed; the current certificate stays in use");
                        }
                    }
                }
            }
        }
        self.wake.notify_one();
    }
}

async fn rotation_loop(
    weak: Weak<CertManager>,
    wake: Arc<Notify>,
    mut bundle_updates: Option<watch::Receiver<u64>>,
) {
    loop {
        let next = {
            let Some(manager) = weak.upgrade() else { return };
            let (due, next) = manager.take_due(Instant::now());
            // Concurrently: one slow answer from a remote CA must not delay the others.
            for (id, slot) in due {
                tokio::spawn(manager.clone().renew(id, slot));
            }
            next
        };
        let deadline = next.unwrap_or_else(|| Instant::now() + IDLE_WAKE);
        let bundle_changed = async {
            match bundle_updates.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = wake.notified() => {}
            changed = bundle_changed => {
                if !changed {
                    bundle_updates = None;
                } else if let Some(manager) = weak.upgrade() {
                    manager.bundle_changed();
                }
            }
        }
    }
}

/// Whether a failed attempt is logged as a warning: the first, one in ten, and any whose error
/// differs from the previous one. With a CA down, hundreds of identities retrying every few
/// seconds would otherwise fill the log with the same line.
fn worth_a_warning(failures: u32, previous: Option<&str>, error: &str) -> bool {
    failures == 1 || failures % 10 == 0 || previous != Some(error)
}

/// A time inside `[not_before, not_after]`, as close to now as possible: which root issued a
/// certificate is checked there (an expired certificate still has an issuer).
fn check_time(not_before: OffsetDateTime, not_after: OffsetDateTime) -> UnixTime {
    let now = OffsetDateTime::now_utc();
    let at = now.clamp(not_before, not_after.max(not_before));
    UnixTime::since_unix_epoch(Duration::from_secs(at.unix_timestamp().max(0) as u64))
}

/// A PKCS#10 request for `id`, signed with `key`. It names the identity as its URI SAN so
/// that any CA (not only ours) knows what is asked for; the subject stays empty.
fn csr_for(id: &SpiffeId, key: &KeyPair) -> Result<Vec<u8>, IdentityError> {
    let csr_error = |reason: String| IdentityError::Csr { identity: id.clone(), reason };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(id.to_string().as_str().try_into().map_err(|e| csr_error(format!("{e}")))?)];
    let csr = params.serialize_request(key).map_err(|e| csr_error(e.to_string()))?;
    Ok(csr.der().to_vec())
}
