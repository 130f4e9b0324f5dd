//! The CA's signing material and what it signs: workload certificates and the CA's own serving
//! certificate.
//!
//! The inputs are four PEM files, typically a Secret (`--signing-cert`, `--signing-key`,
//! `--chain`) and a ConfigMap (`--trust-bundle`). [`Signer::load`] refuses a set that does not
//! hold together, before anything is signed with it: the key must be the certificate's, the
//! certificate a CA that has not expired, and a certificate issued with them must verify (with
//! webpki, as peers will verify) against one of the bundle's roots through `--chain`. That root
//! ends every response (Istio's convention: the last element of `cert_chain` is the root).
//!
//! The bundle's order is the rotation state (see the README): its first root is the one the CA
//! should sign under. A signer under another root of the bundle still loads (during a rotation
//! the Secret and the ConfigMap change one after the other), with a warning and a metric.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::SpiffeId;

/// Workload certificates start this long before they are issued, so that a peer whose clock
/// is behind the CA's accepts them at once. Nodes and the CA are different machines here (the
/// embedded CA, on the node itself, backdates only 5 s).
pub const NOT_BEFORE_BACKDATE: Duration = Duration::from_secs(60);
/// Validity of the CA's own serving certificate; renewed at half of it.
pub const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A certificate valid less than this from now is not issued (the chain is about to end).
pub const MIN_VALIDITY: Duration = Duration::from_secs(60);
/// Input files larger than this are refused unread (a PEM bundle of 100 roots is ~200 KiB).
pub const MAX_INPUT_BYTES: u64 = 1024 * 1024;

/// Where the signing material lives.
#[derive(Debug, Clone)]
pub struct SignerFiles {
    pub signing_cert: PathBuf,
    pub signing_key: PathBuf,
    pub chain: Option<PathBuf>,
    pub trust_bundle: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignerError {
    #[error("reading {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{0}")]
    Chain(String),
}

/// The files' contents, as read: a reload compares them to find out whether anything changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerInputs {
    pub signing_cert: Vec<u8>,
    pub signing_key: Vec<u8>,
    pub chain: Vec<u8>,
    pub trust_bundle: Vec<u8>,
}

impl SignerInputs {
    pub fn read(files: &SignerFiles) -> Result<SignerInputs, SignerError> {
        Ok(SignerInputs {
            signing_cert: read_bounded(&files.signing_cert)?,
            signing_key: read_bounded(&files.signing_key)?,
            chain: files.chain.as_deref().map(read_bounded).transpose()?.unwrap_or_default(),
            trust_bundle: read_bounded(&files.trust_bundle)?,
        })
    }
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, SignerError> {
    use std::io::Read;
    let err = |reason: String| SignerError::Read { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_INPUT_BYTES + 1).read_to_end(&mut bytes).map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(err(format!("larger than {MAX_INPUT_BYTES} bytes")));
    }
    Ok(bytes)
}

/// What the logs, metrics and `--help`-level diagnostics say about a signer.
#[derive(Debug, Clone)]
pub struct SignerInfo {
    pub signing_subject: String,
    pub root_subject: String,
    /// The end of the shortest-lived certificate between the signing certificate and the root.
    pub not_after: OffsetDateTime,
    /// The position of the signer's root in the bundle (0: the first, as it should be).
    pub root_index: usize,
    pub bundle_len: usize,
}

/// A loaded, checked signing set.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The certificates between a leaf and the root, in order (the signing certificate first;
    /// none when the signing certificate is the root itself).
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    /// What follows the leaf in a response: the intermediates, then the root, as PEM.
    tail_pem: Vec<String>,
    info: SignerInfo,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("info", &self.info).finish_non_exhaustive()
    }
}

/// A workload certificate just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf, intermediates, root: the response's `cert_chain`.
    pub chain_pem: Vec<String>,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

impl Signer {
    pub fn load(inputs: &SignerInputs, files: &SignerFiles) -> Result<Signer, SignerError> {
        let invalid = |path: &Path, reason: String| SignerError::Invalid { path: path.to_path_buf(), reason };
        let now = OffsetDateTime::now_utc();

        let signing_cert =
            match certs(&inputs.signing_cert).map_err(|r| invalid(&files.signing_cert, r))?.as_slice() {
                [one] => one.clone(),
                other => {
                    return Err(invalid(
                        &files.signing_cert,
                        format!(
                    "holds {} certificates; it must hold exactly the signing certificate (put the others in \
                         --chain)",
                    other.len()
                ),
                    ))
                }
            };
        let parsed = parse(&signing_cert).map_err(|r| invalid(&files.signing_cert, r))?;
        if !parsed.is_ca() {
            return Err(invalid(
                &files.signing_cert,
                "is not a CA certificate (basicConstraints CA:true is missing)".into(),
            ));
        }
        let signing_not_after = parsed.validity().not_after.to_datetime();
        if signing_not_after <= now {
            return Err(invalid(&files.signing_cert, format!("expired at {}", rfc3339(signing_not_after))));
        }
        let signing_subject = parsed.subject().to_string();
        let signing_spki = parsed.public_key().raw.to_vec();
        drop(parsed);

        let key = signing_key(&inputs.signing_key).map_err(|r| invalid(&files.signing_key, r))?;
        if key.subject_public_key_info() != signing_spki {
            return Err(invalid(
                &files.signing_key,
                format!("is not the private key of {}", files.signing_cert.display()),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&signing_cert, key)
            .map_err(|e| invalid(&files.signing_cert, format!("cannot be used to sign: {e}")))?;

        let chain_path = files.chain.clone().unwrap_or_default();
        let chain = certs(&inputs.chain).map_err(|r| invalid(&chain_path, r))?;
        let bundle = certs(&inputs.trust_bundle).map_err(|r| invalid(&files.trust_bundle, r))?;
        if bundle.is_empty() {
            return Err(invalid(&files.trust_bundle, "holds no certificate".into()));
        }

        // A certificate issued by this set must verify against one of the roots, through the
        // chain: that root is the signer's.
        let mut intermediates = vec![signing_cert.clone()];
        intermediates.extend(chain.iter().filter(|c| !bundle.contains(c)).cloned());
        let probe = probe_leaf(&issuer)?;
        let root_index =
            bundle.iter().position(|root| verifies(&probe, &intermediates, root)).ok_or_else(|| {
                SignerError::Chain(format!(
                    "a certificate signed by {} does not lead to any root of the trust bundle {} through {}: \
                     the bundle must hold the root this signing certificate was issued under",
                    files.signing_cert.display(),
                    files.trust_bundle.display(),
                    if files.chain.is_some() { "the --chain certificates" } else { "no --chain" },
                ))
            })?;
        let root = bundle[root_index].clone();
        if intermediates[0] == root {
            // The signing certificate is the root itself (a small setup).
            intermediates.clear();
        }
        let mut not_after = signing_not_after;
        for cert in intermediates.iter().chain(std::iter::once(&root)) {
            if let Ok(c) = parse(cert) {
                not_after = not_after.min(c.validity().not_after.to_datetime());
            }
        }
        if not_after <= now {
            return Err(SignerError::Chain(format!(
                "the signing chain expired at {} (a certificate between the signing certificate and the root, or \
                 the root itself): nothing issued under it would verify",
                rfc3339(not_after)
            )));
        }
        let root_subject = parse(&root).map(|c| c.subject().to_string()).unwrap_or_default();
        let tail_pem = intermediates.iter().chain(std::iter::once(&root)).map(|c| pem(c)).collect();
        Ok(Signer {
            issuer,
            intermediates,
            root,
            tail_pem,
            info: SignerInfo {
                signing_subject,
                root_subject,
                not_after,
                root_index,
                bundle_len: bundle.len(),
            },
        })
    }

    pub fn info(&self) -> &SignerInfo {
        &self.info
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Issues an X.509-SVID for `identity` with `key`, valid `lifetime` (never past the signing
    /// chain). The caller has checked everything else.
    pub fn issue_workload(
        &self,
        identity: &SpiffeId,
        key: &SubjectPublicKeyInfo,
        lifetime: Duration,
    ) -> Result<Issued, String> {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        // The identity is the URI SAN; the subject stays empty (rcgen then marks the SAN
        // critical, as the X.509-SVID specification requires).
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string();
        params.subject_alt_names =
            vec![SanType::URI(uri.as_str().try_into().map_err(|e| format!("URI SAN {uri}: {e}"))?)];
        params.not_before = now - NOT_BEFORE_BACKDATE;
        // Never past the chain; and never at all once the chain is (nearly) over: a
        // certificate that ends before it starts, or within seconds, helps nobody.
        let wanted = time::Duration::try_from(lifetime).ok().and_then(|d| now.checked_add(d));
        params.not_after = wanted.map_or(self.info.not_after, ceil_to_second).min(self.info.not_after);
        if params.not_after <= now + MIN_VALIDITY {
            return Err(format!(
                "the signing chain expires at {}: nothing can be issued under it any more; replace the signing \
                 certificate (or its chain)",
                rfc3339(self.info.not_after)
            ));
        }
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = if is_rsa(key) {
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial_hex = params.serial_number.as_ref().map(|s| hex(s.as_ref())).unwrap_or_default();
        let not_after = params.not_after;
        let cert = params.signed_by(key, &self.issuer).map_err(|e| e.to_string())?;
        let mut chain_pem = Vec::with_capacity(1 + self.tail_pem.len());
        chain_pem.push(cert.pem());
        chain_pem.extend(self.tail_pem.iter().cloned());
        Ok(Issued { chain_pem, serial_hex, not_after })
    }

    /// Issues the CA's own serving certificate for `names` (DNS names or IP addresses), with a
    /// fresh P-256 key. Returns it with its end of validity.
    pub fn issue_serving(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Arc<CertifiedKey>, OffsetDateTime), String> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| format!("generating a key: {e}"))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = names.iter().map(|n| server_name_san(n)).collect::<Result<_, _>>()?;
        params.not_before = now - NOT_BEFORE_BACKDATE;
        params.not_after = (now + lifetime).min(self.info.not_after);
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let not_after = params.not_after;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| format!("signing: {e}"))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing =
            rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|e| format!("serving key: {e}"))?;
        Ok((Arc::new(CertifiedKey::new(chain, signing)), not_after))
    }
}

/// The CA's serving names: an IP address, or a DNS name.
fn server_name_san(name: &str) -> Result<SanType, String> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // The same syntax check a client makes of the name it verifies.
    rustls_pki_types::ServerName::try_from(name)
        .map_err(|_| format!("--server-name {name:?} is neither a DNS name nor an IP address"))?;
    Ok(SanType::DnsName(name.try_into().map_err(|e| format!("--server-name {name:?}: {e}"))?))
}

fn is_rsa(key: &SubjectPublicKeyInfo) -> bool {
    x509_parser::x509::SubjectPublicKeyInfo::from_der(&key.subject_public_key_info())
        .is_ok_and(|(_, spki)| spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION)
}

/// A throwaway certificate: whether what this signer issues verifies against a root.
fn probe_leaf(issuer: &Issuer<'static, KeyPair>) -> Result<CertificateDer<'static>, SignerError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| SignerError::Chain(format!("generating a probe key: {e}")))?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI("spiffe://probe.invalid/ns/probe/sa/probe".try_into().expect("valid URI"))];
    params.not_before = now - Duration::from_secs(60);
    params.not_after = now + Duration::from_secs(60);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params
        .signed_by(&key, issuer)
        .map(|c| c.der().clone())
        .map_err(|e| SignerError::Chain(format!("signing a probe certificate: {e}")))
}

/// Whether `leaf` verifies against `root` alone, through `intermediates` (client usage).
fn verifies(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'static>],
    root: &CertificateDer<'_>,
) -> bool {
    let Ok(anchor) = webpki::anchor_from_trusted_cert(root) else { return false };
    let Ok(ee) = webpki::EndEntityCert::try_from(leaf) else { return false };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .is_ok()
}

/// The signing key. ring signs with PKCS#8 keys only: other forms get a conversion hint.
fn signing_key(pem_bytes: &[u8]) -> Result<KeyPair, String> {
    match PrivateKeyDer::from_pem_slice(pem_bytes) {
        Ok(PrivateKeyDer::Pkcs8(pkcs8)) => KeyPair::try_from(&pkcs8)
            .map_err(|e| format!("a PKCS#8 key this CA cannot sign with (ECDSA P-256/P-384, RSA or Ed25519): {e}")),
        Ok(_) => Err("is a PKCS#1 or SEC1 key; convert it to PKCS#8: openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8".into()),
        Err(e) => Err(format!("not a PEM private key: {e}")),
    }
}

/// Every certificate of a PEM text (possibly none).
fn certs(pem_bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    for (i, cert) in certs.iter().enumerate() {
        parse(cert).map_err(|e| format!("certificate {} of the file: {e}", i + 1))?;
    }
    Ok(certs)
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der.as_ref()) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("cannot be parsed: {e}")),
    }
}

pub fn pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn ceil_to_second(t: OffsetDateTime) -> OffsetDateTime {
    if t.nanosecond() == 0 {
        return t;
    }
    t.replace_nanosecond(0).map_or(t, |whole| whole + Duration::from_secs(1))
}

/// A positive, unpredictable 128-bit serial (RFC 5280; unpredictable serials also defeat
/// chosen-prefix collisions on the CA's signature).
fn random_serial() -> Result<SerialNumber, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the operating system's random number generator failed".to_string())?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte to strip: the serial stays 16 bytes
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| format!("{t:?}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::BasicConstraints;

    use super::*;

    /// A root and an intermediate under it, written to a directory as a CA Deployment mounts
    /// them: `root.pem` (the bundle), `ca.pem`/`ca-key.pem` (signing), `chain.pem`.
    pub(crate) struct TestPki {
        pub dir: tempfile::TempDir,
        pub root: CertificateDer<'static>,
        pub root_issuer: Issuer<'static, KeyPair>,
    }

    pub(crate) fn ca_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::from_secs(3600);
        params.not_after = OffsetDateTime::now_utc() + Duration::from_secs(365 * 86400);
        params
    }

    pub(crate) fn new_root(cn: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = ca_params(cn).self_signed(&key).unwrap().der().clone();
        let issuer =
            Issuer::from_ca_cert_der(&der, KeyPair::from_pem(&key.serialize_pem()).unwrap()).unwrap();
        (der, issuer, key)
    }

    impl TestPki {
        /// A root signing directly (small setup) when `intermediate` is false.
        pub(crate) fn new(intermediate: bool) -> TestPki {
            let dir = tempfile::tempdir().unwrap();
            let (root, root_issuer, root_key) = new_root("test mesh root");
            std::fs::write(dir.path().join("root.pem"), pem(&root)).unwrap();
            if intermediate {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
                let mut params = ca_params("test sluice-ca intermediate");
                params.use_authority_key_identifier_extension = true;
                let cert = params.signed_by(&key, &root_issuer).unwrap();
                std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
                std::fs::write(dir.path().join("ca-key.pem"), key.serialize_pem()).unwrap();
            } else {
                std::fs::write(dir.path().join("ca.pem"), pem(&root)).unwrap();
                std::fs::write(dir.path().join("ca-key.pem"), root_key.serialize_pem()).unwrap();
            }
            std::fs::write(dir.path().join("chain.pem"), "").unwrap();
            TestPki { dir, root, root_issuer }
        }

        pub(crate) fn files(&self) -> SignerFiles {
            let p = |n: &str| self.dir.path().join(n);
            SignerFiles {
                signing_cert: p("ca.pem"),
                signing_key: p("ca-key.pem"),
                chain: Some(p("chain.pem")),
                trust_bundle: p("root.pem"),
            }
        }

        pub(crate) fn signer(&self) -> Result<Signer, SignerError> {
            let files = self.files();
            Signer::load(&SignerInputs::read(&files).unwrap(), &files)
        }
    }

    fn spki_of(key: &KeyPair) -> SubjectPublicKeyInfo {
        SubjectPublicKeyInfo::from_der(&key.subject_public_key_info()).unwrap()
    }

    fn chain_ders(issued: &Issued) -> Vec<CertificateDer<'static>> {
        issued
            .chain_pem
            .iter()
            .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap().into_owned())
            .collect()
    }

    #[test]
    fn an_intermediate_signs_and_the_response_ends_with_the_root() {
        let pki = TestPki::new(true);
        let signer = pki.signer().expect("a valid set loads");
        assert_eq!(signer.info().root_index, 0);
        let id = SpiffeId::new("cluster.local", "shop", "web");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let issued = signer.issue_workload(&id, &spki_of(&key), Duration::from_secs(3600)).unwrap();
        let ders = chain_ders(&issued);
        assert_eq!(ders.len(), 3, "leaf, intermediate, root");
        assert_eq!(ders[2], pki.root);
        assert!(verifies(&ders[0], &ders[1..2], &pki.root));
        let leaf = parse(&ders[0]).unwrap();
        assert!(!leaf.is_ca());
        assert!(leaf.subject().iter().next().is_none(), "empty subject");
        let lifetime = leaf.validity().not_after.to_datetime() - leaf.validity().not_before.to_datetime();
        assert_eq!(lifetime.whole_seconds(), 3600 + 60 + 1, "an hour, backdated a minute, rounded up");
    }

    #[test]
    fn a_root_can_sign_directly() {
        let pki = TestPki::new(false);
        let signer = pki.signer().expect("a root signing directly loads");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "web");
        let issued = signer.issue_workload(&id, &spki_of(&key), Duration::from_secs(600)).unwrap();
        let ders = chain_ders(&issued);
        assert_eq!(ders.len(), 2, "leaf, root");
        assert_eq!(ders[1], pki.root);
        assert!(verifies(&ders[0], &[], &pki.root));
    }

    #[test]
    fn a_set_that_does_not_hold_together_is_refused() {
        let pki = TestPki::new(true);
        let files = pki.files();
        // Another root in the bundle: the chain leads nowhere.
        let (other, _, _) = new_root("another root");
        std::fs::write(&files.trust_bundle, pem(&other)).unwrap();
        assert!(matches!(pki.signer(), Err(SignerError::Chain(_))), "{:?}", pki.signer());
        // Both roots: loads, but the signer's root is not the first (mid-rotation).
        std::fs::write(&files.trust_bundle, format!("{}{}", pem(&other), pem(&pki.root))).unwrap();
        assert_eq!(pki.signer().unwrap().info().root_index, 1);
        std::fs::write(&files.trust_bundle, pem(&pki.root)).unwrap();
        // A key that is not the certificate's.
        let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let good_key = std::fs::read(&files.signing_key).unwrap();
        std::fs::write(&files.signing_key, stranger.serialize_pem()).unwrap();
        let err = pki.signer().unwrap_err();
        assert!(err.to_string().contains("is not the private key"), "{err}");
        std::fs::write(&files.signing_key, good_key).unwrap();
        // A leaf as signing certificate.
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["x.example".into()])
            .unwrap()
            .signed_by(&leaf_key, &pki.root_issuer)
            .unwrap();
        std::fs::write(&files.signing_cert, leaf.pem()).unwrap();
        std::fs::write(&files.signing_key, leaf_key.serialize_pem()).unwrap();
        let err = pki.signer().unwrap_err();
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
    }

    #[test]
    fn a_chain_between_signing_cert_and_root_is_followed() {
        // root → mid → signing: the signing certificate needs --chain (mid) to reach the root.
        let pki = TestPki::new(false);
        let files = pki.files();
        let mid_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut mid_params = ca_params("mid");
        mid_params.use_authority_key_identifier_extension = true;
        let mid = mid_params.signed_by(&mid_key, &pki.root_issuer).unwrap();
        let mid_issuer = Issuer::from_ca_cert_der(mid.der(), mid_key).unwrap();
        let sign_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut sign_params = ca_params("signing");
        sign_params.use_authority_key_identifier_extension = true;
        let signing = sign_params.signed_by(&sign_key, &mid_issuer).unwrap();
        std::fs::write(&files.signing_cert, signing.pem()).unwrap();
        std::fs::write(&files.signing_key, sign_key.serialize_pem()).unwrap();
        assert!(matches!(pki.signer(), Err(SignerError::Chain(_))), "without the chain it leads nowhere");
        // The chain file may end with the root itself: it is not repeated.
        std::fs::write(files.chain.as_ref().unwrap(), format!("{}{}", mid.pem(), pem(&pki.root))).unwrap();
        let signer = pki.signer().expect("with the chain it loads");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let issued = signer
            .issue_workload(
                &SpiffeId::new("cluster.local", "a", "b"),
                &spki_of(&key),
                Duration::from_secs(60),
            )
            .unwrap();
        let ders = chain_ders(&issued);
        assert_eq!(ders.len(), 4, "leaf, signing, mid, root");
        assert_eq!(ders[3], pki.root);
    }

    #[test]
    fn the_lifetime_never_outlives_the_signing_chain() {
        let pki = TestPki::new(true);
        let files = pki.files();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params("short-lived intermediate");
        params.not_after = OffsetDateTime::now_utc() + Duration::from_secs(600);
        let cert = params.signed_by(&key, &pki.root_issuer).unwrap();
        std::fs::write(&files.signing_cert, cert.pem()).unwrap();
        std::fs::write(&files.signing_key, key.serialize_pem()).unwrap();
        let signer = pki.signer().unwrap();
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let issued = signer
            .issue_workload(
                &SpiffeId::new("cluster.local", "a", "b"),
                &spki_of(&leaf_key),
                Duration::from_secs(86400),
            )
            .unwrap();
        assert!(issued.not_after <= signer.info().not_after);
    }

    #[test]
    fn nothing_is_issued_once_the_chain_has_expired() {
        // Finding 13: with the chain over, not_after came out before not_before.
        let pki = TestPki::new(true);
        let mut signer = pki.signer().unwrap();
        signer.info.not_after = OffsetDateTime::now_utc() - Duration::from_secs(1);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let id = SpiffeId::new("cluster.local", "a", "b");
        let err = signer.issue_workload(&id, &spki_of(&key), Duration::from_secs(3600)).unwrap_err();
        assert!(err.contains("signing chain expires at"), "{err}");
        signer.info.not_after = OffsetDateTime::now_utc() + Duration::from_secs(30);
        assert!(
            signer.issue_workload(&id, &spki_of(&key), Duration::from_secs(3600)).is_err(),
            "nor seconds before"
        );
    }

    #[test]
    fn a_huge_lifetime_is_capped_by_the_chain_not_a_panic() {
        // Finding 13: `now + lifetime` overflowed and panicked for a huge --max-lifetime-s.
        let pki = TestPki::new(true);
        let signer = pki.signer().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let id = SpiffeId::new("cluster.local", "a", "b");
        let issued = signer.issue_workload(&id, &spki_of(&key), Duration::from_secs(u64::MAX)).unwrap();
        assert_eq!(issued.not_after, signer.info().not_after);
    }

    #[test]
    fn an_expired_root_is_refused_at_load() {
        // webpki does not check a trust anchor's validity, so the probe alone would pass.
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params("expired root");
        params.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
        params.not_after = OffsetDateTime::now_utc() - Duration::from_secs(60);
        let root = params.self_signed(&key).unwrap();
        let issuer = Issuer::from_ca_cert_der(root.der(), key).unwrap();
        let sign_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut sign_params = ca_params("signing");
        sign_params.use_authority_key_identifier_extension = true;
        let signing = sign_params.signed_by(&sign_key, &issuer).unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("root.pem"), root.pem()).unwrap();
        std::fs::write(p("ca.pem"), signing.pem()).unwrap();
        std::fs::write(p("ca-key.pem"), sign_key.serialize_pem()).unwrap();
        let files = SignerFiles {
            signing_cert: p("ca.pem"),
            signing_key: p("ca-key.pem"),
            chain: None,
            trust_bundle: p("root.pem"),
        };
        let err = Signer::load(&SignerInputs::read(&files).unwrap(), &files).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn the_serving_certificate_names_the_server_names() {
        let pki = TestPki::new(true);
        let signer = pki.signer().unwrap();
        let names = vec!["sluice-ca.sluice-system.svc".to_string(), "127.0.0.1".to_string()];
        let (key, not_after) = signer.issue_serving(&names, SERVING_LIFETIME).unwrap();
        assert_eq!(key.cert.len(), 2, "leaf and the intermediate");
        let leaf = parse(&key.cert[0]).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap().value.general_names.len();
        assert_eq!(sans, 2);
        assert!(not_after > OffsetDateTime::now_utc() + Duration::from_secs(3600));
        assert!(signer.issue_serving(&["not a name!".to_string()], SERVING_LIFETIME).is_err());
    }

    #[test]
    fn pkcs1_keys_get_a_conversion_hint() {
        let err =
            signing_key(b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n")
                .unwrap_err();
        assert!(err.contains("openssl pkcs8"), "{err}");
    }
}
