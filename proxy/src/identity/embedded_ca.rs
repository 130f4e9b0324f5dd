//! The embedded CA: the mesh root's files on the node, signing only for identities that have a
//! pod scheduled on this node. See ca.rs for why production keeps the root elsewhere.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, PublicKeyData,
    SanType, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tracing::{debug, info, warn};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use super::ca::{CaDescription, CaError, CertificateAuthority, SignFuture, SignRequest};
use super::root::MeshRoot;
use super::spiffe::{check_trust_domain, SpiffeId};
use super::{x509, DEFAULT_CERT_LIFETIME, NOT_BEFORE_SKEW};
use crate::discovery::{Model, PodPhase};

/// Decides whether `node` may hold `identity`. Called for every signing, so it must reflect
/// the current state (read a snapshot, do not capture one).
pub type Authorizer = Arc<dyn Fn(&str, &SpiffeId) -> bool + Send + Sync>;

/// The standard authorizer: `identity` is allowed on `node` while the current discovery model
/// has a pod of that namespace and service account scheduled on `node` that has not finished
/// (a Succeeded or Failed pod runs nothing that needs a certificate). The trust domain is
/// checked by the CA itself.
pub fn model_authorizer(model: Arc<ArcSwap<Model>>) -> Authorizer {
    Arc::new(move |node: &str, id: &SpiffeId| {
        model.load().pods_on_node(node).any(|p| {
            p.namespace == id.namespace
                && p.service_account == id.service_account
                && !matches!(p.phase, PodPhase::Succeeded | PodPhase::Failed)
        })
    })
}

/// What an embedded CA serves and how.
#[derive(Debug, Clone)]
pub struct EmbeddedCaConfig {
    /// The node this sluice runs on: the only node it signs for.
    pub node: String,
    pub trust_domain: String,
    /// Validity of issued certificates (default 24 h). Renewal happens at about half of it.
    pub leaf_lifetime: Duration,
}

impl EmbeddedCaConfig {
    pub fn new(node: impl Into<String>, trust_domain: impl Into<String>) -> EmbeddedCaConfig {
        EmbeddedCaConfig {
            node: node.into(),
            trust_domain: trust_domain.into(),
            leaf_lifetime: DEFAULT_CERT_LIFETIME,
        }
    }
}

pub struct EmbeddedCa {
    root: MeshRoot,
    config: EmbeddedCaConfig,
    authorize: Authorizer,
}

impl std::fmt::Debug for EmbeddedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedCa").field("config", &self.config).finish_non_exhaustive()
    }
}

impl EmbeddedCa {
    /// Loads the root from `cert_path`/`key_path` (as written by [`ca_init`](super::ca_init)).
    /// Refuses a root whose `spiffe://` SAN names another trust domain than configured: the
    /// certificates it would issue could not be verified by peers configured like this node.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        config: EmbeddedCaConfig,
        authorize: Authorizer,
    ) -> Result<EmbeddedCa, CaError> {
        check_trust_domain(&config.trust_domain)?;
        if config.leaf_lifetime < Duration::from_secs(1) {
            return Err(CaError::Config(format!(
                "certificate lifetime {:?} is too short (at least 1 s)",
                config.leaf_lifetime
            )));
        }
        let root = MeshRoot::load(cert_path, key_path)?;
        if let Some(td) = root.trust_domain.as_deref().filter(|td| *td != config.trust_domain) {
            return Err(CaError::BadRoot {
                path: cert_path.into(),
                reason: format!(
                    "is the root of trust domain {td:?}, but this node is configured for {:?} \
                     (use --trust-domain {td}, or create a root for {:?})",
                    config.trust_domain, config.trust_domain
                ),
            });
        }
        info!(
            node = %config.node, trust_domain = %config.trust_domain,
            root_not_after = %x509::rfc3339(root.not_after),
            leaf_lifetime_s = config.leaf_lifetime.as_secs_f64(),
            "embedded CA (demo and small setups: this node holds the mesh root key)"
        );
        Ok(EmbeddedCa { root, config, authorize })
    }

    pub fn config(&self) -> &EmbeddedCaConfig {
        &self.config
    }

    /// The whole decision and signing, synchronously (an ECDSA signature is microseconds).
    fn sign_now(&self, req: &SignRequest) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let id = &req.identity;
        let refuse = |reason: String| {
            warn!(node = %req.node, identity = %id, %reason, "refused to issue a certificate");
            CaError::NotAuthorized { node: req.node.clone(), identity: id.clone(), reason }
        };
        if req.node != self.config.node {
            return Err(refuse(format!(
                "this embedded CA signs only for its own node {:?}",
                self.config.node
            )));
        }
        if id.trust_domain != self.config.trust_domain {
            return Err(refuse(format!("the mesh trust domain is {:?}", self.config.trust_domain)));
        }
        if !(self.authorize)(&req.node, id) {
            return Err(refuse(format!(
                "no pod with service account {:?} in namespace {:?} is scheduled on node {:?}",
                id.service_account, id.namespace, req.node
            )));
        }

        let public_key = check_csr(id, &req.csr_der)?;
        let signing = |reason: String| CaError::Signing { identity: id.clone(), reason };
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        // X.509-SVID: the identity is the URI SAN; the subject stays empty (rcgen then marks
        // the SAN critical, as the SVID spec requires for an empty subject).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string().as_str().try_into().map_err(|e| signing(format!("URI SAN: {e}")))?,
        )];
        // Backdated so that a peer whose clock is a little behind still accepts it at once.
        params.not_before = now - NOT_BEFORE_SKEW;
        // X.509 times have whole seconds: round up, so a certificate lives at least the
        // configured lifetime (truncating would cut up to half of a 2 s test lifetime).
        // Never outlive the root: a chain is only as valid as its shortest-lived link.
        params.not_after = ceil_to_second(now + self.config.leaf_lifetime).min(self.root.not_after);
        params.serial_number = Some(x509::random_serial().map_err(signing)?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&public_key, &self.root.issuer).map_err(|e| signing(e.to_string()))?;
        let der = cert.der().clone();
        if let Ok(info) = x509::leaf_info(&der) {
            debug!(node = %req.node, identity = %id, serial = %info.serial_hex,
                not_after = %x509::rfc3339(info.not_after), "issued certificate");
        }
        Ok(vec![der])
    }
}

impl CertificateAuthority for EmbeddedCa {
    fn sign(&self, req: SignRequest) -> SignFuture<'_> {
        Box::pin(std::future::ready(self.sign_now(&req)))
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.cert.clone()]
    }

    fn describe(&self) -> CaDescription {
        CaDescription {
            mode: "embedded".into(),
            address: None,
            trust_bundle_source: "the embedded CA's root (--ca-dir; this node holds the mesh root key)".into(),
            trust_bundle_loaded: None,
            trust_bundle_error: None,
        }
    }
}

fn ceil_to_second(t: OffsetDateTime) -> OffsetDateTime {
    if t.nanosecond() == 0 {
        return t;
    }
    t.replace_nanosecond(0).map_or(t, |whole| whole + Duration::from_secs(1))
}

/// The public key of a CSR whose signature verifies.
struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Checks that the CSR is well formed, signed by the key it carries (proof of possession),
/// for an ECDSA P-256 key, and asks for no name other than `id`. Returns its public key.
fn check_csr(id: &SpiffeId, der: &[u8]) -> Result<CsrKey, CaError> {
    let invalid = |reason: String| CaError::InvalidCsr { identity: id.clone(), reason };
    let csr = match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => csr,
        Ok(_) => return Err(invalid("trailing bytes after the CSR".into())),
        Err(e) => return Err(invalid(format!("not a PKCS#10 CSR: {e}"))),
    };
    csr.verify_signature()
        .map_err(|e| invalid(format!("its signature does not verify with its own public key: {e}")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let is_p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).is_some_and(|c| c == OID_EC_P256);
    if !is_p256 {
        return Err(invalid(format!("the key is {}, not ECDSA P-256", spki.algorithm.algorithm)));
    }
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            let ParsedExtension::SubjectAlternativeName(san) = ext else { continue };
            for name in &san.general_names {
                let matches = matches!(name, GeneralName::URI(uri) if *uri == id.to_string());
                if !matches {
                    return Err(CaError::SanMismatch { identity: id.clone(), requested: name.to_string() });
                }
            }
        }
    }
    Ok(CsrKey { raw: spki.subject_public_key.data.to_vec(), alg: &PKCS_ECDSA_P256_SHA256 })
}
