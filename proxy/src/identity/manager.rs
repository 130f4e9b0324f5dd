//! [`CertManager`]: the certificates and private keys of the identities that have a pod on this
//! node, in memory only, renewed at about half of their life by a rotation task.
//!
//! Renewal swaps the certificate under the TLS configurations (their resolvers read the
//! current one per handshake), so nothing is rebuilt and established connections, which keep
//! the keys they negotiated, are untouched. The old certificate stays in use until its
//! replacement is in; a failed renewal is retried with exponential backoff.
//!
//! First issuance never blocks its caller: [`CertManager::request`] starts one background
//! fetch per identity (single-flight: every pod of that identity waits for the same one),
//! retried with backoff until it succeeds or [`CertManager::retain`] drops the identity, and
//! returns at once. A slow or refusing CA for one identity delays no other identity, and no
//! enrollment: the enroller asks again on a later reconcile (it is woken through
//! [`CertManager::on_issued`] when a certificate comes in).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::ca::{CertificateAuthority, SignRequest};
use super::spiffe::{check_trust_domain, SpiffeId};
use super::tls::TlsCache;
use super::verify::{self, SharedBundle, TrustBundle};
use super::{x509, IdentityError};

/// Tuning of the manager (the certificate lifetime itself is the CA's policy, see
/// [`EmbeddedCaConfig::leaf_lifetime`](super::EmbeddedCaConfig)).
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// First retry delay after a failed renewal; doubles per failure up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long one signing may take before it counts as failed (a remote CA may hang).
    pub sign_timeout: Duration,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        CertManagerConfig {
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            sign_timeout: Duration::from_secs(30),
        }
    }
}

/// One certificate as the admin API shows it (`sluice certs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    pub identity: SpiffeId,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// RFC 3339, UTC.
    pub not_before: String,
    pub not_after: String,
    /// When the next renewal attempt is due (a retry time after a failure).
    pub next_renewal: String,
    /// Consecutive failed renewals (0 when the last one succeeded).
    #[serde(default)]
    pub renewal_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
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
    /// Wakes the rotation task when the schedule changed.
    wake: Arc<Notify>,
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
            wake: Arc::new(Notify::new()),
        })
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
        fetches.insert(id.clone(), Fetch { failures: 0, last_error: None, task: Some(task.abort_handle()) });
        CertStatus::Pending { failures: 0, last_error: None }
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
                    let failures = {
                        let mut fetches = self.fetches.lock().unwrap_or_else(PoisonError::into_inner);
                        let Some(f) = fetches.get_mut(&id) else { return };
                        f.failures += 1;
                        f.last_error = Some(e.to_string());
                        f.failures
                    };
                    let retry = self.backoff(failures);
                    warn!(identity = %id, error = %e, attempt = failures, retry_in_ms = retry.as_millis() as u64,
                        "no certificate yet; pods of this identity wait to be enrolled");
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
        let delay = self.renewal_delay(issued.not_after);
        let (serial, not_after) = (issued.serial.clone(), issued.not_after);
        let slot = Slot {
            cert: ArcSwap::from_pointee(issued),
            sched: Mutex::new(Schedule {
                due: Instant::now() + delay,
                due_wall: OffsetDateTime::now_utc() + delay,
                in_flight: false,
                failures: 0,
                last_error: None,
            }),
        };
        {
            let mut slots = self.store.write();
            if slots.contains_key(id) {
                return;
            }
            slots.insert(id.clone(), Arc::new(slot));
        }
        info!(identity = %id, serial = %serial, not_after = %x509::rfc3339(not_after),
            renew_in_s = delay.as_secs_f64(), "certificate issued");
        self.wake.notify_one();
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

    /// The certificates held, sorted by identity.
    pub fn certs(&self) -> Vec<CertView> {
        let mut out: Vec<CertView> = self
            .store
            .read()
            .iter()
            .map(|(id, slot)| {
                let cert = slot.cert.load();
                let sched = slot.sched.lock().unwrap_or_else(PoisonError::into_inner);
                CertView {
                    identity: id.clone(),
                    serial: cert.serial.clone(),
                    not_before: x509::rfc3339(cert.not_before),
                    not_after: x509::rfc3339(cert.not_after),
                    next_renewal: x509::rfc3339(sched.due_wall),
                    renewal_failures: sched.failures,
                    last_error: sched.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Starts the rotation task on `rt`. It renews each certificate when due and retries
    /// failures; it ends by itself once the manager is dropped (or abort the handle).
    pub fn spawn_rotation(self: &Arc<Self>, rt: &tokio::runtime::Handle) -> JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        rt.spawn(rotation_loop(weak, wake))
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
        self.refresh_bundle()?;
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
    fn refresh_bundle(&self) -> Result<(), IdentityError> {
        let certs = self.ca.trust_bundle();
        if certs == self.bundle.load().certs {
            return Ok(());
        }
        let bundle = TrustBundle::new(certs).map_err(IdentityError::TrustBundle)?;
        info!(roots = bundle.certs.len(), "trust bundle changed");
        self.bundle.store(Arc::new(bundle));
        Ok(())
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

    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        self.config.retry_initial.saturating_mul(1 << exp).min(self.config.retry_max)
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
                        let delay = self.renewal_delay(issued.not_after);
                        sched.due = Instant::now() + delay;
                        sched.due_wall = OffsetDateTime::now_utc() + delay;
                        sched.failures = 0;
                        sched.last_error = None;
                        info!(identity = %id, serial = %issued.serial, previous_serial = %slot.cert.load().serial,
                            not_after = %x509::rfc3339(issued.not_after), renew_in_s = delay.as_secs_f64(),
                            "certificate renewed");
                        slot.cert.store(Arc::new(issued));
                    }
                    Err(e) => {
                        sched.failures += 1;
                        let retry = self.backoff(sched.failures);
                        sched.due = Instant::now() + retry;
                        sched.due_wall = OffsetDateTime::now_utc() + retry;
                        sched.last_error = Some(e.to_string());
                        let not_after = slot.cert.load().not_after;
                        if not_after <= OffsetDateTime::now_utc() {
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

async fn rotation_loop(weak: Weak<CertManager>, wake: Arc<Notify>) {
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
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = wake.notified() => {}
        }
    }
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
