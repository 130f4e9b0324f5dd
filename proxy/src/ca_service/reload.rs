//! The signing material in force, and its reload without a restart.
//!
//! Every [`RELOAD_CHECK_EVERY`], and at once on SIGHUP, the files are read again and compared
//! with what is loaded; when they changed, the new set is checked as at start
//! ([`Signer::load`]) and swapped in, and the serving certificate is reissued under it. Reading
//! four small files every two seconds costs nothing and needs no file-event plumbing, which
//! Secret and ConfigMap volumes make awkward (the kubelet swaps a symlinked directory). A set
//! that does not hold together (the kubelet updates the Secret and the ConfigMap at different
//! times; someone put the wrong key in) is refused with the reason, once per distinct reason,
//! and the previous set keeps signing. The serving certificate is also renewed at half of its
//! life.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tracing::{error, info, warn};

use super::serving::ServingCert;
use super::signer::{rfc3339, Signer, SignerError, SignerFiles, SignerInputs};

/// How often the files are compared with what is loaded.
pub const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(2);

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
    /// The files changed, but the new set was refused (the old one stays).
    Refused(String),
}

pub struct SigningState {
    files: SignerFiles,
    signer: ArcSwap<Signer>,
    inputs: Mutex<SignerInputs>,
    serving: Arc<ServingCert>,
    /// The last refusal logged (repeats are not logged again).
    last_refusal: Mutex<Option<String>>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl SigningState {
    /// Loads the files and issues the serving certificate; any problem is fatal at start.
    pub fn load(
        files: SignerFiles,
        server_names: Vec<String>,
        serving_lifetime: Duration,
    ) -> Result<SigningState, SignerError> {
        let inputs = SignerInputs::read(&files)?;
        let signer = Signer::load(&inputs, &files)?;
        let serving = ServingCert::issue(&signer, server_names, serving_lifetime)
            .map_err(|e| SignerError::Chain(format!("issuing the CA's serving certificate: {e}")))?;
        log_loaded(&signer, "signing material loaded");
        Ok(SigningState {
            files,
            signer: ArcSwap::from_pointee(signer),
            inputs: Mutex::new(inputs),
            serving: Arc::new(serving),
            last_refusal: Mutex::new(None),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        })
    }

    pub fn signer(&self) -> Arc<Signer> {
        self.signer.load_full()
    }

    pub fn serving(&self) -> Arc<ServingCert> {
        self.serving.clone()
    }

    /// Re-reads the files and swaps in a changed, valid set.
    pub fn check(&self) -> Reload {
        let outcome = self.try_reload();
        match &outcome {
            Reload::Refused(reason) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                let mut last = self.last_refusal.lock().unwrap_or_else(|e| e.into_inner());
                if last.as_deref() != Some(reason.as_str()) {
                    error!(reason = %reason, "the signing files changed but are refused; the previous ones keep signing");
                    *last = Some(reason.clone());
                }
            }
            Reload::Reloaded => {
                self.reloads.fetch_add(1, Ordering::Relaxed);
                *self.last_refusal.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Reload::Unchanged => {}
        }
        outcome
    }

    fn try_reload(&self) -> Reload {
        let inputs = match SignerInputs::read(&self.files) {
            Ok(inputs) => inputs,
            Err(e) => return Reload::Refused(e.to_string()),
        };
        if *self.inputs.lock().unwrap_or_else(|e| e.into_inner()) == inputs {
            return Reload::Unchanged;
        }
        let signer = match Signer::load(&inputs, &self.files) {
            Ok(signer) => signer,
            Err(e) => return Reload::Refused(e.to_string()),
        };
        if let Err(e) = self.serving.renew(&signer) {
            return Reload::Refused(format!("issuing the serving certificate with the new files: {e}"));
        }
        log_loaded(&signer, "signing material reloaded");
        self.signer.store(Arc::new(signer));
        *self.inputs.lock().unwrap_or_else(|e| e.into_inner()) = inputs;
        Reload::Reloaded
    }

    /// Renews the serving certificate if it is past half of its life.
    pub fn renew_serving_if_due(&self) {
        if !self.serving.due(OffsetDateTime::now_utc()) {
            return;
        }
        match self.serving.renew(&self.signer()) {
            Ok(not_after) => {
                info!(names = ?self.serving.names(), not_after = %rfc3339(not_after), "renewed the CA's serving certificate")
            }
            Err(e) => warn!(error = %e, "renewing the CA's serving certificate failed; retrying"),
        }
    }

    /// Checks for changes every [`RELOAD_CHECK_EVERY`] and on SIGHUP, forever.
    pub async fn run(self: Arc<Self>) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; the signing files are still re-read every 2 s");
                None
            }
        };
        let mut tick = tokio::time::interval(RELOAD_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    info!("SIGHUP: re-reading the signing files");
                }
            }
            let state = self.clone();
            // File reads and signature checks: off the runtime's worker threads.
            let _ = tokio::task::spawn_blocking(move || {
                state.check();
                state.renew_serving_if_due();
            })
            .await;
        }
    }
}

fn log_loaded(signer: &Signer, what: &str) {
    let info = signer.info();
    info!(
        signing = %info.signing_subject, root = %info.root_subject, root_index = info.root_index,
        bundle_roots = info.bundle_len, not_after = %rfc3339(info.not_after), "{what}"
    );
    if info.root_index != 0 {
        warn!(
            root = %info.root_subject, root_index = info.root_index,
            "the CA signs under a root that is not the first of the trust bundle: nodes re-issue every \
             certificate not under the first root, so put this root first (or finish the rotation)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::signer::tests::{new_root, TestPki};
    use super::super::signer::{pem, SERVING_LIFETIME};
    use super::*;

    #[test]
    fn changed_files_are_swapped_in_and_bad_ones_refused() {
        let pki = TestPki::new(false);
        let state = SigningState::load(pki.files(), vec!["sluice-ca".into()], SERVING_LIFETIME).unwrap();
        assert_eq!(state.check(), Reload::Unchanged);
        let first_serving = state.serving().current();

        // A new root, signing directly, with a bundle of [new, old]: the rotation's step 2.
        let (new_root_der, _, new_key) = new_root("second root");
        let files = pki.files();
        std::fs::write(&files.signing_cert, pem(&new_root_der)).unwrap();
        // The key arrives later than the certificate: refused, the old set keeps signing.
        assert!(matches!(state.check(), Reload::Refused(ref r) if r.contains("not the private key")));
        assert_eq!(state.signer().root(), &pki.root);
        std::fs::write(&files.signing_key, new_key.serialize_pem()).unwrap();
        // Still refused: the bundle does not hold the new root yet.
        assert!(matches!(state.check(), Reload::Refused(_)));
        std::fs::write(&files.trust_bundle, format!("{}{}", pem(&new_root_der), pem(&pki.root))).unwrap();
        assert_eq!(state.check(), Reload::Reloaded);
        assert_eq!(state.signer().root(), &new_root_der);
        assert_eq!(state.signer().info().root_index, 0);
        assert!(!Arc::ptr_eq(&first_serving, &state.serving().current()), "serving cert reissued");
        assert_eq!(state.check(), Reload::Unchanged);
        assert_eq!(state.reloads.load(Ordering::Relaxed), 1);
        assert_eq!(state.reload_failures.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_missing_file_is_refused_and_the_old_set_stays() {
        let pki = TestPki::new(true);
        let state = SigningState::load(pki.files(), vec!["sluice-ca".into()], SERVING_LIFETIME).unwrap();
        std::fs::remove_file(pki.files().signing_key).unwrap();
        assert!(matches!(state.check(), Reload::Refused(ref r) if r.contains("ca-key.pem")));
        assert_eq!(state.signer().root(), &pki.root);
    }

    #[test]
    fn the_serving_certificate_is_renewed_at_half_life() {
        let pki = TestPki::new(true);
        let state =
            SigningState::load(pki.files(), vec!["sluice-ca".into()], Duration::from_secs(3600)).unwrap();
        let serving = state.serving();
        let now = OffsetDateTime::now_utc();
        assert!(!serving.due(now));
        assert!(serving.due(now + Duration::from_secs(1900)));
    }
}
