//! Peer certificate verification for the mesh: the chain must lead to the trust bundle, and
//! the leaf's SPIFFE ID decides who the peer is. Server names (SNI, the IP we dialled) play no
//! part: HBONE dials pod IPs, and the identity expected for that pod comes from discovery.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use thiserror::Error;
use tracing::debug;
use webpki::{EndEntityCert, KeyUsage};

use super::spiffe::SpiffeId;
use super::x509::{self, LeafIdError};

/// Why a peer's certificate was refused. Carried as `rustls::Error::Other`, whose text is this
/// message ("other error: peer presented …, expected …"; `InvalidCertificate(Other(..))` would
/// print it through Debug), and callers can downcast to classify.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    #[error("peer presented {presented}, expected {expected}")]
    // Boxed: keeps the error (returned on every handshake's verification path) small.
    WrongIdentity { presented: Box<SpiffeId>, expected: Box<SpiffeId> },
    #[error("peer presented {presented}, which is outside the mesh trust domain {trust_domain:?}")]
    ForeignTrustDomain { presented: Box<SpiffeId>, trust_domain: String },
    #[error("certificate not issued by the mesh CA (its chain does not lead to the trust bundle: {detail})")]
    NotIssuedByMeshCa { detail: String },
    #[error("certificate expired at {not_after}")]
    Expired { not_after: String },
    #[error("certificate not valid before {not_before} (is a clock wrong?)")]
    NotYetValid { not_before: String },
    #[error("certificate is not valid for {usage} (extended key usage)")]
    WrongUsage { usage: &'static str },
    #[error("peer presented a CA certificate instead of a workload certificate")]
    CaAsLeaf,
    #[error(transparent)]
    Identity(#[from] LeafIdError),
    #[error("certificate refused: {0}")]
    Other(String),
}

impl From<VerifyError> for rustls::Error {
    fn from(e: VerifyError) -> rustls::Error {
        rustls::Error::Other(OtherError(Arc::new(e)))
    }
}

/// The roots peers must chain to, with their parsed trust anchors (parsed once per bundle,
/// not per handshake).
pub(crate) struct TrustBundle {
    pub certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Result<TrustBundle, String> {
        if certs.is_empty() {
            return Err("the CA's trust bundle is empty".into());
        }
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("trust bundle certificate #{i} is not usable as a root: {e:?}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle { certs, anchors })
    }

    /// The position of the root `chain` (leaf first) leads to, checked at `at` (chosen inside
    /// the leaf's validity by the caller: which root issued a certificate does not depend on
    /// whether it has expired). `None`: no root of the bundle.
    pub fn root_of(
        &self,
        algs: &WebPkiSupportedAlgorithms,
        chain: &[CertificateDer<'_>],
        at: UnixTime,
    ) -> Option<usize> {
        let (leaf, intermediates) = chain.split_first()?;
        let ee = EndEntityCert::try_from(leaf).ok()?;
        self.anchors.iter().position(|anchor| {
            ee.verify_for_usage(
                algs.all,
                std::slice::from_ref(anchor),
                intermediates,
                at,
                KeyUsage::client_auth(),
                None,
                None,
            )
            .is_ok()
        })
    }
}

pub(crate) type SharedBundle = Arc<ArcSwap<TrustBundle>>;

#[derive(Clone, Copy)]
enum Usage {
    Server,
    Client,
}

/// Validates `end_entity` (+ `intermediates`) against the bundle at `now` for `usage`, and
/// returns the SPIFFE ID it names. The chain is checked first: an unverified certificate's
/// claims about identity are not worth reporting.
fn verify_chain(
    bundle: &TrustBundle,
    algs: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, VerifyError> {
    let ee = EndEntityCert::try_from(end_entity)
        .map_err(|e| VerifyError::Identity(LeafIdError::Malformed(format!("{e:?}"))))?;
    let key_usage = match usage {
        Usage::Server => KeyUsage::server_auth(),
        Usage::Client => KeyUsage::client_auth(),
    };
    ee.verify_for_usage(algs.all, &bundle.anchors, intermediates, now, key_usage, None, None)
        .map_err(|e| chain_error(e, usage))?;
    Ok(x509::spiffe_id(end_entity)?)
}

/// Checks a chain this node was just issued, as its peers will: valid now for both server and
/// client authentication against the bundle. Returns the SPIFFE ID it names.
pub(crate) fn check_own_chain(
    bundle: &TrustBundle,
    algs: &WebPkiSupportedAlgorithms,
    chain: &[CertificateDer<'static>],
) -> Result<SpiffeId, VerifyError> {
    let (leaf, intermediates) =
        chain.split_first().ok_or_else(|| VerifyError::Other("empty certificate chain".into()))?;
    let now = UnixTime::now();
    verify_chain(bundle, algs, leaf, intermediates, now, Usage::Server)?;
    verify_chain(bundle, algs, leaf, intermediates, now, Usage::Client)
}

// The deprecated variants are still produced by some paths of webpki 0.103; match them too.
#[allow(deprecated)]
fn chain_error(e: webpki::Error, usage: Usage) -> VerifyError {
    use webpki::Error as W;
    match e {
        W::CertExpired { not_after, .. } => {
            VerifyError::Expired { not_after: x509::unix_rfc3339(not_after.as_secs()) }
        }
        W::CertNotValidYet { not_before, .. } => {
            VerifyError::NotYetValid { not_before: x509::unix_rfc3339(not_before.as_secs()) }
        }
        // Another CA with the same subject name as ours (every `sluice ca init` root is
        // "sluice mesh root") gets as far as the signature check, hence the signature errors.
        W::UnknownIssuer
        | W::InvalidSignatureForPublicKey
        | W::SignatureAlgorithmMismatch
        | W::UnsupportedSignatureAlgorithm
        | W::UnsupportedSignatureAlgorithmForPublicKey
        | W::UnsupportedSignatureAlgorithmContext(_)
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            VerifyError::NotIssuedByMeshCa { detail: format!("{e:?}") }
        }
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => VerifyError::WrongUsage {
            usage: match usage {
                Usage::Server => "server authentication",
                Usage::Client => "client authentication",
            },
        },
        W::CaUsedAsEndEntity => VerifyError::CaAsLeaf,
        other => VerifyError::Other(format!("{other:?}")),
    }
}

/// Client side: the server must chain to the bundle and be exactly `expected`.
pub(crate) struct MeshServerVerifier {
    bundle: SharedBundle,
    algs: WebPkiSupportedAlgorithms,
    expected: SpiffeId,
}

impl MeshServerVerifier {
    pub fn new(
        bundle: SharedBundle,
        algs: WebPkiSupportedAlgorithms,
        expected: SpiffeId,
    ) -> MeshServerVerifier {
        MeshServerVerifier { bundle, algs, expected }
    }
}

impl fmt::Debug for MeshServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerVerifier").field("expected", &self.expected.to_string()).finish()
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result =
            verify_chain(&self.bundle.load(), &self.algs, end_entity, intermediates, now, Usage::Server)
                .and_then(|presented| {
                    if presented == self.expected {
                        Ok(())
                    } else {
                        Err(VerifyError::WrongIdentity {
                            presented: Box::new(presented),
                            expected: Box::new(self.expected.clone()),
                        })
                    }
                });
        match result {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                debug!(expected = %self.expected, error = %e, "refused the server's certificate");
                Err(e.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: a client certificate is required, must chain to the bundle, and may be any
/// SPIFFE ID of the trust domain (authorization policy decides what that identity may do).
pub(crate) struct MeshClientVerifier {
    bundle: SharedBundle,
    algs: WebPkiSupportedAlgorithms,
    trust_domain: String,
}

impl MeshClientVerifier {
    pub fn new(
        bundle: SharedBundle,
        algs: WebPkiSupportedAlgorithms,
        trust_domain: String,
    ) -> MeshClientVerifier {
        MeshClientVerifier { bundle, algs, trust_domain }
    }
}

impl fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClientVerifier").field("trust_domain", &self.trust_domain).finish()
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    // No CA hints: every mesh client holds exactly one certificate per connection (its
    // resolver ignores hints), and the bundle may change under a live config.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let result =
            verify_chain(&self.bundle.load(), &self.algs, end_entity, intermediates, now, Usage::Client)
                .and_then(|presented| {
                    if presented.trust_domain == self.trust_domain {
                        Ok(())
                    } else {
                        Err(VerifyError::ForeignTrustDomain {
                            presented: Box::new(presented),
                            trust_domain: self.trust_domain.clone(),
                        })
                    }
                });
        match result {
            Ok(()) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                debug!(error = %e, "refused the client's certificate");
                Err(e.into())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
