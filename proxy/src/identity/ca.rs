//! The certificate authority interface.
//!
//! A node never sends a private key anywhere: [`CertManager`](super::CertManager) generates a
//! key pair per identity, sends a PKCS#10 CSR in a [`SignRequest`] naming the node and the
//! identity, and gets back a chain. The CA decides whether that node may hold that identity
//! (node-scoped authorization) and writes the certificate's contents itself; the CSR only
//! proves possession of the key.
//!
//! # Implementations
//!
//! - [`EmbeddedCa`](super::EmbeddedCa) (this issue, the demo and tests): the mesh root's cert
//!   and key are files on the node, and the node's own sluice signs for pods scheduled on that
//!   node. Simple, needs no cluster service, but every node holds the root key: a compromised
//!   node could mint any identity.
//! - [`RemoteCa`](super::RemoteCa) (`sluice run --ca-addr`, production): sends the CSR to a CA
//!   service over gRPC+TLS (`IstioCertificateService/CreateCertificate`, as ztunnel calls
//!   istiod), authenticating with the node's projected ServiceAccount token; the CA service looks
//!   the pod → node mapping up itself and refuses identities with no pod on the calling node.
//!   The node holds no signing key. Its trust bundle comes from a file (a ConfigMap) that may
//!   change at any time: [`CertificateAuthority::bundle_updates`] tells the manager, which
//!   re-issues what no longer leads to the bundle's first root.
//!
//! # Keeping the root key off the nodes (production)
//!
//! Production deployments must not use the embedded CA with the real root: the root key stays
//! offline (an HSM or a cloud KMS), and signs an intermediate for the CA service only. The CA
//! service (a small Deployment on control-plane nodes, or istiod/cert-manager/SPIRE behind an
//! adapter) holds the intermediate key in a Secret readable only by itself, or in a KMS it
//! calls. Nodes get only the trust bundle (the root certificate, public) and use the remote
//! CA; a node compromise then exposes only the short-lived keys of the pods on that node,
//! which is the same blast radius as the pods themselves. Rotating the intermediate is
//! transparent to nodes because they trust the root; rotating the root means serving a bundle
//! with both roots until every leaf was reissued.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use std::time::Duration;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::spiffe::{SpiffeError, SpiffeId};

/// A request for a workload certificate.
#[derive(Debug, Clone)]
pub struct SignRequest {
    /// The node asking (a remote CA checks this against the caller's own credential).
    pub node: String,
    /// The identity asked for; the CA writes it as the certificate's only URI SAN.
    pub identity: SpiffeId,
    /// PKCS#10 CSR, DER, signed with the new private key (which never leaves the node).
    pub csr_der: Vec<u8>,
}

/// The future a CA returns: the chain, leaf first, then any intermediates (never the root,
/// which peers already hold in their trust bundle).
pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<CertificateDer<'static>>, CaError>> + Send + 'a>>;

/// A certificate authority for workload certificates. See the module documentation for the
/// embedded and remote implementations.
pub trait CertificateAuthority: Send + Sync {
    /// Signs the CSR for `req.identity` if `req.node` may hold that identity.
    fn sign(&self, req: SignRequest) -> SignFuture<'_>;

    /// The roots that peers' chains must lead to, in rotation order: the first is the root the
    /// CA signs under now, the others are only trusted. Read after every signing and whenever
    /// [`Self::bundle_updates`] says it changed, so the verifiers follow a rotation.
    fn trust_bundle(&self) -> Vec<CertificateDer<'static>>;

    /// Changes whenever the trust bundle may have changed (a generation counter), for a CA
    /// whose bundle changes on its own (a file, re-read). `None`: only signing changes it.
    fn bundle_updates(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// What this CA is and where its trust bundle comes from, for `sluice status`.
    fn describe(&self) -> CaDescription {
        CaDescription { mode: "custom".into(), trust_bundle_source: "the CA".into(), ..CaDescription::default() }
    }

    /// The CA client's own counters (requests, refusals, ...), for `sluice status`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// What `sluice status` says about the node's CA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaDescription {
    /// `embedded` or `remote`.
    pub mode: String,
    /// The remote CA's address (remote mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Where the trust bundle comes from (a file path, or "the embedded CA's root").
    pub trust_bundle_source: String,
    /// When the bundle was last (re)loaded from its source, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_loaded: Option<String>,
    /// Why the last reload of the bundle failed (the last good bundle stays in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_error: Option<String>,
}

#[derive(Debug, Error)]
pub enum CaError {
    /// The node may not hold this identity (no pod of it scheduled there, another node's
    /// request, or another trust domain).
    #[error("node {node:?} is not authorized to obtain a certificate for {identity}: {reason}")]
    NotAuthorized { node: String, identity: SpiffeId, reason: String },
    #[error("refused the certificate signing request for {identity}: {reason}")]
    InvalidCsr { identity: SpiffeId, reason: String },
    #[error(
        "the certificate signing request for {identity} asks for the subject alternative name {requested}; \
         only the URI {identity} may be requested"
    )]
    SanMismatch { identity: SpiffeId, requested: String },
    #[error("signing the certificate for {identity} failed: {reason}")]
    Signing { identity: SpiffeId, reason: String },
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("mesh root {}: {reason}", path.display())]
    BadRoot { path: PathBuf, reason: String },
    #[error(
        "{} already exists; refusing to replace the mesh root (pass --force to overwrite it; every node \
         must then be given the new root, and certificates issued by the old one stop being trusted)",
        path.display()
    )]
    AlreadyExists { path: PathBuf },
    #[error("invalid trust domain: {0}")]
    TrustDomain(#[from] SpiffeError),
    #[error("invalid CA configuration: {0}")]
    Config(String),
    /// The remote CA could not be reached, or answered that it cannot serve yet (gRPC
    /// UNAVAILABLE, a deadline): retried with backoff.
    #[error("the CA at {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The remote CA did not accept this node's credential (gRPC UNAUTHENTICATED).
    #[error(
        "the CA at {addr} did not accept this node's token ({reason}); check the projected \
         ServiceAccount token (audience sluice-ca) mounted at --ca-token-file"
    )]
    Unauthenticated { addr: String, reason: String },
    /// The remote CA limits this node's rate (gRPC RESOURCE_EXHAUSTED); `retry_after` is what
    /// its `retry-after-ms` metadata asked for.
    #[error("the CA at {addr} limits this node's rate: {reason}")]
    RateLimited { addr: String, retry_after: Option<Duration>, reason: String },
    /// The node's credential for the remote CA cannot be read.
    #[error("reading the CA token {}: {reason}", path.display())]
    Credential { path: PathBuf, reason: String },
    /// The remote CA answered with a chain this node must not use.
    #[error("the CA at {addr} returned an unusable certificate for {identity}: {reason}")]
    BadResponse { addr: String, identity: SpiffeId, reason: String },
    /// Any other gRPC failure of the remote CA.
    #[error("the CA at {addr} failed: {code}: {reason}")]
    Remote { addr: String, code: String, reason: String },
}

impl CaError {
    /// How long the CA asked this node to wait before asking again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CaError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A refusal of the request itself (asking again unchanged gets the same answer), as
    /// opposed to a failure to get an answer.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            CaError::NotAuthorized { .. } | CaError::InvalidCsr { .. } | CaError::SanMismatch { .. }
        )
    }
}
