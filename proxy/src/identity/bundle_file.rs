//! The mesh trust bundle read from a file (`--ca-trust-bundle`, mounted from a ConfigMap).
//!
//! Loaded at start (a node that cannot read it does not start: it could verify nothing), then
//! re-read every couple of seconds by a thread of its own. A change is published through a
//! watch channel (a generation counter) so the certificate manager re-checks its certificates
//! and the verifiers switch at once, without waiting for a signing. A file that cannot be read
//! or parsed keeps the last good bundle in force; the error is logged once per distinct
//! problem and shown by `sluice status` until a good file comes back.
//!
//! The order of the roots is the rotation state (see README, "Rotating the root"): the first
//! root is the one the CA signs under now, the others are only trusted.
//!
//! Polling rather than inotify: kubelet updates a ConfigMap volume by swapping a symlink of
//! the directory, which inotify on the file's path does not see; reading a few KB every two
//! seconds costs nothing and sees every kind of update.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{info, warn};

use super::x509;

/// How often the file is read again.
pub const BUNDLE_POLL: Duration = Duration::from_secs(2);
/// A bundle file larger than this is refused unread (a bundle is a few roots: kilobytes).
pub const MAX_BUNDLE_BYTES: u64 = 1024 * 1024;
/// At most this many roots (a rotation needs two; a few more for merged meshes).
pub const MAX_BUNDLE_ROOTS: usize = 64;

/// A parsed, usable bundle.
pub(crate) struct LoadedBundle {
    pub certs: Vec<CertificateDer<'static>>,
    /// Verifies the remote CA's own serving certificate against these roots (with its name).
    pub server_verifier: Arc<WebPkiServerVerifier>,
}

#[derive(Default)]
struct FileStatus {
    /// The bytes last read (good or bad): only a change is parsed and logged again.
    last_bytes: Option<Vec<u8>>,
    /// When the bundle in force was loaded.
    loaded_at: Option<OffsetDateTime>,
    /// Why the file last read is not in force (None: it is).
    error: Option<String>,
}

pub struct TrustBundleFile {
    path: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: ArcSwap<LoadedBundle>,
    status: Mutex<FileStatus>,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for TrustBundleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundleFile").field("path", &self.path).finish_non_exhaustive()
    }
}

/// What a reload found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The file holds what was read last time.
    Unchanged,
    /// A new bundle is in force.
    Changed { roots: usize },
    /// The file is unusable; the last good bundle stays.
    Kept { error: String },
}

impl TrustBundleFile {
    /// Loads `path`; fails if it is unreadable or holds no usable root.
    pub fn load(path: &Path) -> Result<Arc<TrustBundleFile>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let bytes = read_bounded(path)?;
        let loaded = parse(&bytes, &provider).map_err(|e| format!("{}: {e}", path.display()))?;
        info!(path = %path.display(), roots = loaded.certs.len(), first_root = %describe_first(&loaded.certs),
            "trust bundle loaded");
        Ok(Arc::new(TrustBundleFile {
            path: path.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee(loaded),
            status: Mutex::new(FileStatus {
                last_bytes: Some(bytes),
                loaded_at: Some(OffsetDateTime::now_utc()),
                error: None,
            }),
            changes: watch::channel(0).0,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The roots in force, in rotation order.
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().certs.clone()
    }

    pub(crate) fn current(&self) -> Arc<LoadedBundle> {
        self.current.load_full()
    }

    pub(crate) fn provider(&self) -> &Arc<rustls::crypto::CryptoProvider> {
        &self.provider
    }

    /// A receiver that changes whenever a new bundle is in force.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// (when the bundle in force was loaded, why the file is not in force now).
    pub fn status(&self) -> (Option<OffsetDateTime>, Option<String>) {
        let s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        (s.loaded_at, s.error.clone())
    }

    /// Reads the file again and puts it in force if it changed and is usable.
    pub fn reload(&self) -> Reload {
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = match read_bounded(&self.path) {
            Ok(b) => b,
            Err(e) => {
                // Logged once per distinct problem (it is read every two seconds).
                if status.error.as_deref() != Some(e.as_str()) {
                    warn!(path = %self.path.display(), error = %e,
                        "cannot read the trust bundle; keeping the last good one");
                    status.error = Some(e.clone());
                }
                status.last_bytes = None;
                return Reload::Kept { error: e };
            }
        };
        if status.last_bytes.as_deref() == Some(bytes.as_slice()) {
            return match &status.error {
                Some(e) => Reload::Kept { error: e.clone() },
                None => Reload::Unchanged,
            };
        }
        status.last_bytes = Some(bytes.clone());
        match parse(&bytes, &self.provider) {
            Ok(loaded) => {
                status.error = None;
                if loaded.certs == self.current.load().certs {
                    // Same roots, other bytes (comments, whitespace).
                    return Reload::Unchanged;
                }
                let roots = loaded.certs.len();
                info!(path = %self.path.display(), roots, first_root = %describe_first(&loaded.certs),
                    "trust bundle changed");
                self.current.store(Arc::new(loaded));
                status.loaded_at = Some(OffsetDateTime::now_utc());
                drop(status);
                self.changes.send_modify(|g| *g += 1);
                Reload::Changed { roots }
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e,
                    "the trust bundle file is not usable; keeping the last good one");
                status.error = Some(e.clone());
                Reload::Kept { error: e }
            }
        }
    }

    /// Re-reads the file every `every` on a thread of its own, until the bundle is dropped.
    pub fn spawn_poller(self: &Arc<Self>, every: Duration) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak: Weak<TrustBundleFile> = Arc::downgrade(self);
        std::thread::Builder::new().name("sluice-bundle".into()).spawn(move || loop {
            std::thread::sleep(every);
            let Some(bundle) = weak.upgrade() else { return };
            bundle.reload();
        })
    }
}

/// Reads at most [`MAX_BUNDLE_BYTES`] of a regular file.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("reading {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_BUNDLE_BYTES {
        return Err(format!(
            "{} is {} bytes; a trust bundle holds root certificates only (at most {MAX_BUNDLE_BYTES} bytes)",
            path.display(),
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(bytes)
}

/// The roots of a PEM bundle: at least one, each a CA certificate usable as a trust anchor.
pub(crate) fn parse(
    bytes: &[u8],
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<LoadedBundle, String> {
    // A key in the bundle means someone mounted the wrong Secret on the nodes: refuse loudly.
    if bytes.windows(b"PRIVATE KEY-----".len()).any(|w| w == b"PRIVATE KEY-----") {
        return Err("holds a private key; the trust bundle must hold only public root certificates \
                    (and no node may hold a CA key)"
            .into());
    }
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate (expected PEM root certificates, the current one first)".into());
    }
    if certs.len() > MAX_BUNDLE_ROOTS {
        return Err(format!("holds {} certificates; at most {MAX_BUNDLE_ROOTS} roots", certs.len()));
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        let parsed = x509::parse(cert).map_err(|e| format!("certificate #{}: {e}", i + 1))?;
        if !parsed.is_ca() {
            return Err(format!(
                "certificate #{} ({}) is not a CA certificate; the bundle holds roots only",
                i + 1,
                parsed.subject()
            ));
        }
        drop(parsed);
        roots
            .add(cert.clone())
            .map_err(|e| format!("certificate #{} is not usable as a root: {e}", i + 1))?;
    }
    let server_verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("building a verifier from the bundle: {e}"))?;
    Ok(LoadedBundle { certs, server_verifier })
}

fn describe_first(certs: &[CertificateDer<'static>]) -> String {
    certs.first().and_then(|c| x509::parse(c).ok().map(|p| p.subject().to_string())).unwrap_or_default()
}
