//! What the admin API shows about the node's identities (`sluice certs`, `sluice status`): the
//! certificates held with their issuer chains up to the bundle root they lead to, the identities
//! still waiting for one, and the trust bundle with its roots' expiry.

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::ca::CaDescription;
use super::spiffe::SpiffeId;
use super::x509;

/// Where this node stands with one identity's certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// Held: its pods' traffic is mutual TLS.
    #[default]
    Ready,
    /// Asked for, not there yet (the CA is slow, down, or refuses): see `last_error`.
    Pending,
}

/// One identity as `sluice certs` shows it: a held certificate, or a pending request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    pub identity: SpiffeId,
    #[serde(default)]
    pub state: CertState,
    /// Serial number, lower-case hex (held certificates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// RFC 3339, UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// Held: when the next renewal (or re-issuance) attempt is due. Pending: the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_renewal: Option<String>,
    /// Consecutive failed attempts (renewals of a held certificate, or first issuance).
    #[serde(default)]
    pub renewal_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The issuers of a held certificate, from the leaf's issuer up to the root of the trust
    /// bundle it leads to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<ChainCertView>,
    /// The position in the trust bundle of the root the certificate leads to: 0 is the root
    /// the CA signs under now; another position means it is re-issued soon (root rotation);
    /// absent means no root of the bundle trusts it any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_index: Option<usize>,
}

/// A certificate of an issuer chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainCertView {
    pub subject: String,
    pub serial: String,
    pub not_after: String,
    /// A root of the trust bundle (the end of the chain).
    #[serde(default)]
    pub root: bool,
}

impl ChainCertView {
    pub(crate) fn of(cert: &CertificateDer<'_>, root: bool) -> ChainCertView {
        match x509::parse(cert) {
            Ok(c) => ChainCertView {
                subject: c.subject().to_string(),
                serial: x509::hex(c.raw_serial()),
                not_after: x509::rfc3339(c.validity().not_after.to_datetime()),
                root,
            },
            Err(e) => ChainCertView {
                subject: format!("(unparseable: {e})"),
                serial: String::new(),
                not_after: String::new(),
                root,
            },
        }
    }
}

/// The trust bundle in force (`GET /certs/bundle`, `sluice certs bundle`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundleView {
    #[serde(flatten)]
    pub ca: CaDescription,
    /// In rotation order: the first is the root the CA signs under now.
    pub roots: Vec<RootView>,
    /// Held certificates per root position (the rotation's progress: when every certificate is
    /// under the first root, the others can be retired).
    pub certificates_per_root: Vec<usize>,
    /// Held certificates that lead to no root of the bundle (re-issued at once).
    #[serde(default)]
    pub certificates_untrusted: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootView {
    pub subject: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// SHA-256 of the DER certificate, lower-case hex (what `openssl x509 -fingerprint -sha256`
    /// prints, without colons).
    pub sha256: String,
}

impl RootView {
    pub(crate) fn of(cert: &CertificateDer<'_>) -> RootView {
        let sha256 = x509::hex(ring_sha256(cert).as_ref());
        match x509::parse(cert) {
            Ok(c) => RootView {
                subject: c.subject().to_string(),
                serial: x509::hex(c.raw_serial()),
                not_before: x509::rfc3339(c.validity().not_before.to_datetime()),
                not_after: x509::rfc3339(c.validity().not_after.to_datetime()),
                sha256,
            },
            Err(e) => RootView {
                subject: format!("(unparseable: {e})"),
                serial: String::new(),
                not_before: String::new(),
                not_after: String::new(),
                sha256,
            },
        }
    }
}

fn ring_sha256(data: &[u8]) -> impl AsRef<[u8]> {
    ring::digest::digest(&ring::digest::SHA256, data)
}
