//! Identity: per-workload SPIFFE certificates for the pods on this node, the CA that signs
//! them, and the rustls configurations the mesh transport uses.
//!
//! Every enrolled pod runs as `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`
//! ([`SpiffeId`]). [`CertManager`] holds one ECDSA P-256 key (memory only) and short-lived
//! certificate per identity with a pod on this node, obtained from a [`CertificateAuthority`]
//! by CSR, and renewed at about half of its life. The data path sees only
//! [`CertManager::client_config`], [`CertManager::server_config`],
//! [`CertManager::await_certificate`] and [`peer_identity`]; how a certificate is obtained (a
//! CA service through [`RemoteCa`] in production, the [`EmbeddedCa`] for the demo and small
//! setups; see `ca.rs`) is invisible to it.
//!
//! Wiring in the daemon:
//! ```ignore
//! // production: the node holds no key
//! let bundle = TrustBundleFile::load(&args.ca_trust_bundle)?;      // re-read every 2 s
//! bundle.spawn_poller(BUNDLE_POLL)?;
//! let ca = RemoteCa::new(RemoteCaConfig::new(&args.ca_addr, &args.node), bundle)?;
//! // or the demo: EmbeddedCa::load(&cert, &key, EmbeddedCaConfig::new(..), model_authorizer(model))?
//! let certs = Arc::new(CertManager::new(&args.node, &args.trust_domain, Arc::new(ca),
//!                                       CertManagerConfig::default())?);
//! let _rotation = certs.spawn_rotation(data_rt.handle());        // renewals, bundle changes
//! certs.on_issued(move || wake_the_enroller());
//! // enrollment: certs.request(&id, data_rt.handle()) starts the fetch; the pod is enrolled at
//! //             once and its HBONE listener opens when it returns CertStatus::Ready;
//! //             certs.retain(&ids_of_the_node's_mesh_pods) on every reconcile;
//! // data path:  certs.await_certificate(&id, connect_timeout) before a tunnel;
//! // admin API:  certs.certs(), certs.bundle_view() for `sluice certs`.
//! ```
//!
//! Layout: `spiffe` (IDs), `ca` (the CA trait and its errors), `root` (`ca init`, loading the
//! root), `embedded_ca`, `remote_ca` (the CA service's client), `bundle_file` (the trust
//! bundle from a file), `manager` (certificates, renewal, re-issuance on a root change),
//! `view` (what `sluice certs` shows), `verify` (peer verification), `tls` (rustls
//! configurations), `x509` (certificate field helpers).

mod bundle_file;
mod ca;
mod embedded_ca;
pub mod istio_ca;
mod manager;
mod remote_ca;
mod root;
mod spiffe;
mod tls;
mod verify;
mod view;
mod x509;

#[cfg(test)]
mod tests;

use std::time::Duration;

use thiserror::Error;

pub use bundle_file::{Reload, TrustBundleFile, BUNDLE_POLL};
pub use ca::{CaDescription, CaError, CertificateAuthority, SignFuture, SignRequest};
pub use embedded_ca::{model_authorizer, Authorizer, EmbeddedCa, EmbeddedCaConfig};
pub use manager::{CertManager, CertManagerConfig, CertRequestView, CertStatus, NoCertificateCounters};
pub use remote_ca::{RemoteCa, RemoteCaConfig, RemoteCaCounters, DEFAULT_TOKEN_FILE, RETRY_AFTER_MS};
pub use root::{ca_init, CA_CERT_FILE, CA_KEY_FILE, ROOT_COMMON_NAME, ROOT_LIFETIME};
pub use spiffe::{check_trust_domain, SpiffeError, SpiffeId, DEFAULT_TRUST_DOMAIN};
pub use tls::{peer_identity, ALPN_H2};
pub use verify::VerifyError;
pub use view::{CertState, CertView, ChainCertView, RootView, TrustBundleView};
pub use x509::LeafIdError;

/// Default validity of workload certificates.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How far back certificates' notBefore is set, so that peers whose clocks lag a little
/// accept a certificate the moment it is issued.
pub(crate) const NOT_BEFORE_SKEW: Duration = Duration::from_secs(5);

/// Errors of the manager and the TLS glue.
#[derive(Debug, Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(
        "no certificate for {identity} on this node (it has no enrolled pod here, or its certificate \
         has not been issued yet)"
    )]
    NoCertificate { identity: SpiffeId },
    #[error("the CA did not answer within {after:?} when asked for {identity}")]
    CaTimeout { identity: SpiffeId, after: Duration },
    #[error("the CA returned an unusable certificate for {identity}: {reason}")]
    BadCaResponse { identity: SpiffeId, reason: String },
    #[error("generating a key pair: {0}")]
    Key(String),
    #[error("building the certificate signing request for {identity}: {reason}")]
    Csr { identity: SpiffeId, reason: String },
    #[error("trust bundle: {0}")]
    TrustBundle(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid identity configuration: {0}")]
    Config(String),
}

impl IdentityError {
    /// How long the CA asked this node to wait before asking again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            IdentityError::Ca(e) => e.retry_after(),
            _ => None,
        }
    }
}
