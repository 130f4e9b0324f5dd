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
//! - A remote CA (to come) implements the same trait by sending the CSR to a CA service over
//!   mTLS/gRPC, the way ztunnel calls istiod's `IstioCertificateService/CreateCertificate`:
//!   the node authenticates with its own credential (a projected service-account token of the
//!   sluice DaemonSet, bound to the node), and the CA service looks up the pod → node mapping
//!   itself and refuses identities with no pod on the calling node. `sign` is already async
//!   and boxed, and the trust bundle is read through the trait, so the manager, the rustls
//!   glue and the data path do not change when it arrives.
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

use rustls_pki_types::CertificateDer;
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

    /// The roots that peers' chains must lead to. Read after every signing, so a CA may
    /// change it (root rotation) and the verifiers follow.
    fn trust_bundle(&self) -> Vec<CertificateDer<'static>>;
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
}
