//! What a certificate signing request must be for the CA service to sign it.
//!
//! The CSR only proves that the caller holds the private key: the CA writes every field of the
//! certificate itself (identity, lifetime, usages), and takes nothing from the CSR but its
//! public key. It still refuses a CSR that asks for more than the identity (a DNS, IP or email
//! name, a second URI, CA rights): such a request comes from a confused or hostile client, and
//! saying so is more useful than silently issuing something else.
//!
//! Accepted keys: ECDSA P-256 (what sluice's node agent and ztunnel send) or P-384, and RSA of
//! at least 2048 bits (istio-agent's default). Anything else is refused as too weak or unknown.
//!
//! What the CSR asks for is read from every attribute, not from the first extension request
//! a parser happens to return: the attributes are walked in DER, and a CSR with anything but
//! one single-valued `extensionRequest` (a second one, a second value, another attribute) or
//! with an extension twice is refused as malformed, since a second copy is exactly where a DNS
//! name or `CA:true` would hide from a check that reads the first. The subject must be empty:
//! the certificate's is, and a name asked for and silently dropped would hide a confused
//! client. Go's `pkix.Name{Organization: [""]}`, which istio-agent sends, has attributes
//! with empty values only and counts as empty.

use rcgen::SubjectPublicKeyInfo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::der_parser::oid::Oid;
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS9_EXTENSION_REQUEST,
};
use x509_parser::prelude::FromDer;

/// A CSR larger than this (PEM text) is refused unread. A P-256 CSR is about 500 bytes, an
/// RSA-4096 one about 1.7 KiB; nothing legitimate comes near.
pub const MAX_CSR_PEM_BYTES: usize = 8 * 1024;
/// The smallest RSA modulus accepted (NIST's floor since 2014).
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus accepted: verifying larger ones costs the CA CPU for nothing (ring
/// itself stops at 8192 bits).
pub const MAX_RSA_BITS: usize = 8192;

/// Why a CSR is refused. `kind` is the metric label; `detail` says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct CsrProblem {
    pub kind: CsrProblemKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrProblemKind {
    TooLarge,
    Unparseable,
    BadSignature,
    /// A DNS, IP, email or other name, or a second URI.
    ExtraNames,
    /// No URI SAN, or one that is not the identity asked for.
    WrongIdentity,
    IsCa,
    /// RSA below 2048 bits, or an algorithm or curve this CA does not sign for.
    WeakKey,
    /// Structure a CSR for this CA never has: two extension requests, an extension twice, an
    /// attribute other than the extension request.
    Malformed,
    /// A subject with a non-empty attribute.
    Subject,
}

impl CsrProblemKind {
    /// The `reason` label of `sluice_ca_requests_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            CsrProblemKind::TooLarge => "csr_too_large",
            CsrProblemKind::Unparseable => "csr_unparseable",
            CsrProblemKind::BadSignature => "csr_bad_signature",
            CsrProblemKind::ExtraNames => "csr_extra_names",
            CsrProblemKind::WrongIdentity => "csr_wrong_identity",
            CsrProblemKind::IsCa => "csr_is_ca",
            CsrProblemKind::WeakKey => "csr_weak_key",
            CsrProblemKind::Malformed => "csr_malformed",
            CsrProblemKind::Subject => "csr_subject",
        }
    }
}

fn problem(kind: CsrProblemKind, detail: impl Into<String>) -> CsrProblem {
    CsrProblem { kind, detail: detail.into() }
}

/// A CSR that has been decoded from PEM (not yet checked).
#[derive(Debug, Clone)]
pub struct CsrDer(Vec<u8>);

impl CsrDer {
    /// Decodes the request's `csr` field: one PEM `CERTIFICATE REQUEST`, at most
    /// [`MAX_CSR_PEM_BYTES`].
    pub fn from_pem(pem: &str) -> Result<CsrDer, CsrProblem> {
        if pem.len() > MAX_CSR_PEM_BYTES {
            return Err(problem(
                CsrProblemKind::TooLarge,
                format!("the CSR is {} bytes; at most {MAX_CSR_PEM_BYTES} are accepted", pem.len()),
            ));
        }
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            problem(
                CsrProblemKind::Unparseable,
                format!("the csr field is not a PEM CERTIFICATE REQUEST: {e}"),
            )
        })?;
        Ok(CsrDer(der.as_ref().to_vec()))
    }

    pub fn from_der(der: Vec<u8>) -> CsrDer {
        CsrDer(der)
    }

    fn parse(&self) -> Result<X509CertificationRequest<'_>, CsrProblem> {
        match X509CertificationRequest::from_der(&self.0) {
            Ok(([], csr)) => Ok(csr),
            Ok(_) => Err(problem(CsrProblemKind::Unparseable, "trailing bytes after the CSR")),
            Err(e) => Err(problem(CsrProblemKind::Unparseable, format!("not a PKCS#10 CSR: {e}"))),
        }
    }

    /// The CSR's only URI SAN: the identity a request without `ImpersonatedIdentity` asks for.
    /// Every other check is left to [`CsrDer::check`].
    pub fn sole_uri(&self) -> Result<String, CsrProblem> {
        let csr = self.parse()?;
        let extensions = requested_extensions(&csr)?;
        let names = requested_names(&extensions)?;
        let uris: Vec<&str> = names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        match uris.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(problem(
                CsrProblemKind::WrongIdentity,
                "the request names no identity: no ImpersonatedIdentity metadata and no URI SAN in the CSR",
            )),
            many => Err(problem(
                CsrProblemKind::ExtraNames,
                format!("the CSR carries {} URI SANs; exactly one (the SPIFFE ID) is allowed", many.len()),
            )),
        }
    }

    /// Checks everything (see the module documentation) for a certificate of `identity`, and
    /// returns the public key to certify.
    pub fn check(&self, identity: &str) -> Result<SubjectPublicKeyInfo, CsrProblem> {
        let csr = self.parse()?;
        let spki = &csr.certification_request_info.subject_pki;
        check_key(spki)?;
        // After the key check: a signature is only verified with a key worth verifying.
        csr.verify_signature().map_err(|e| {
            problem(
                CsrProblemKind::BadSignature,
                format!("its signature does not verify with its own public key: {e}"),
            )
        })?;

        check_subject(&csr)?;
        let extensions = requested_extensions(&csr)?;
        let mut uris = 0;
        for name in requested_names(&extensions)? {
            match name {
                GeneralName::URI(uri) if *uri == identity => uris += 1,
                GeneralName::URI(uri) => {
                    return Err(problem(
                        CsrProblemKind::WrongIdentity,
                        format!("the CSR asks for the URI {uri}, but the request is for {identity}"),
                    ))
                }
                other => {
                    return Err(problem(
                        CsrProblemKind::ExtraNames,
                        format!("the CSR asks for {other}; only the URI {identity} may be requested"),
                    ))
                }
            }
        }
        match uris {
            1 => {}
            0 => {
                return Err(problem(
                    CsrProblemKind::WrongIdentity,
                    format!("the CSR carries no URI SAN; it must carry exactly {identity}"),
                ))
            }
            n => {
                return Err(problem(
                    CsrProblemKind::ExtraNames,
                    format!("the CSR carries the URI {identity} {n} times; exactly once is allowed"),
                ))
            }
        }

        for ext in &extensions {
            let asks_ca = match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => bc.ca,
                ParsedExtension::KeyUsage(ku) => ku.key_cert_sign() || ku.crl_sign(),
                _ => false,
            };
            if asks_ca {
                return Err(problem(
                    CsrProblemKind::IsCa,
                    "the CSR asks for a CA certificate (basicConstraints CA:true or keyCertSign); \
                     workload certificates are never CAs",
                ));
            }
        }

        SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| {
            problem(CsrProblemKind::WeakKey, format!("its public key cannot be certified by this CA: {e}"))
        })
    }
}

/// Every subject alternative name among `extensions`.
fn requested_names<'e, 'a>(
    extensions: &'e [X509Extension<'a>],
) -> Result<Vec<&'e GeneralName<'a>>, CsrProblem> {
    let mut names = Vec::new();
    for ext in extensions {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => names.extend(san.general_names.iter()),
            ParsedExtension::ParseError { error } => {
                return Err(problem(
                    CsrProblemKind::Unparseable,
                    format!("an extension of the CSR cannot be parsed: {error}"),
                ))
            }
            _ => {}
        }
    }
    Ok(names)
}

/// The subject must carry nothing: no attribute with a value.
fn check_subject(csr: &X509CertificationRequest<'_>) -> Result<(), CsrProblem> {
    let subject = &csr.certification_request_info.subject;
    if subject.iter_attributes().all(|a| a.attr_value().data.is_empty()) {
        return Ok(());
    }
    Err(problem(
        CsrProblemKind::Subject,
        format!(
            "the CSR's subject is \"{subject}\"; workload certificates have an empty subject (the identity is \
             the URI SAN), so send an empty subject rather than have the CA drop it"
        ),
    ))
}

/// One DER element of `input`: its tag byte, its content, and what follows it. Definite
/// lengths only (DER), up to 4 length bytes, low tag numbers (all a CSR uses).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |len, b| (len << 8) | *b as usize), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID_TAG: u8 = 0x06;
/// `[0] IMPLICIT`, constructed: the attributes of a CertificationRequestInfo.
const ATTRIBUTES: u8 = 0xa0;

/// Every extension the CSR requests, from a walk of its attributes in DER rather than the
/// first extension request a parser returns (see the module documentation).
fn requested_extensions<'a>(
    csr: &X509CertificationRequest<'a>,
) -> Result<Vec<X509Extension<'a>>, CsrProblem> {
    let malformed = |detail: String| problem(CsrProblemKind::Malformed, detail);
    let bad_der = || malformed("its attributes are not valid DER".into());
    let raw: &'a [u8] = csr.certification_request_info.raw;
    let (SEQUENCE, info, _) = tlv(raw).ok_or_else(bad_der)? else { return Err(bad_der()) };
    // version, subject, subjectPKInfo: checked by the parser already.
    let (_, _, rest) = tlv(info).ok_or_else(bad_der)?;
    let (_, _, rest) = tlv(rest).ok_or_else(bad_der)?;
    let (_, _, rest) = tlv(rest).ok_or_else(bad_der)?;
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let (ATTRIBUTES, mut attributes, []) = tlv(rest).ok_or_else(bad_der)? else { return Err(bad_der()) };
    let mut extensions: Vec<X509Extension<'a>> = Vec::new();
    let mut requests = 0;
    while !attributes.is_empty() {
        let (SEQUENCE, attribute, next) = tlv(attributes).ok_or_else(bad_der)? else { return Err(bad_der()) };
        attributes = next;
        let (OID_TAG, oid, values) = tlv(attribute).ok_or_else(bad_der)? else { return Err(bad_der()) };
        let (SET, mut values, []) = tlv(values).ok_or_else(bad_der)? else { return Err(bad_der()) };
        if oid != OID_PKCS9_EXTENSION_REQUEST.as_bytes() {
            let name = Oid::new(oid.into()).to_id_string();
            return Err(malformed(format!(
                "the CSR carries the attribute {name}; only an extensionRequest is accepted"
            )));
        }
        requests += 1;
        if requests > 1 {
            return Err(malformed("the CSR carries two extensionRequest attributes; one is allowed".into()));
        }
        let mut count = 0;
        while !values.is_empty() {
            let (SEQUENCE, mut list, next) = tlv(values).ok_or_else(bad_der)? else { return Err(bad_der()) };
            values = next;
            count += 1;
            if count > 1 {
                return Err(malformed(
                    "its extensionRequest attribute has two values; one is allowed".into(),
                ));
            }
            while !list.is_empty() {
                let (_, _, next) = tlv(list).ok_or_else(bad_der)?;
                let element = &list[..list.len() - next.len()];
                list = next;
                match X509Extension::from_der(element) {
                    Ok(([], ext)) => extensions.push(ext),
                    _ => {
                        return Err(problem(
                            CsrProblemKind::Unparseable,
                            "an extension of the CSR cannot be parsed",
                        ))
                    }
                }
            }
        }
    }
    for (i, ext) in extensions.iter().enumerate() {
        if extensions[..i].iter().any(|earlier| earlier.oid == ext.oid) {
            return Err(malformed(format!(
                "the CSR requests the extension {} twice; each extension may appear once",
                ext.oid.to_id_string()
            )));
        }
    }
    Ok(extensions)
}

fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), CsrProblem> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => Ok(()),
            Some(c) => Err(problem(
                CsrProblemKind::WeakKey,
                format!("the key is on the elliptic curve {c}; only P-256 and P-384 are accepted"),
            )),
            None => Err(problem(
                CsrProblemKind::WeakKey,
                "the EC key names no curve; only P-256 and P-384 are accepted",
            )),
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => modulus_bits(rsa.modulus),
            _ => return Err(problem(CsrProblemKind::Unparseable, "the RSA public key cannot be parsed")),
        };
        if bits < MIN_RSA_BITS {
            return Err(problem(
                CsrProblemKind::WeakKey,
                format!(
                    "the key is RSA-{bits}; RSA keys need at least {MIN_RSA_BITS} bits (or use ECDSA P-256)"
                ),
            ));
        }
        if bits > MAX_RSA_BITS {
            return Err(problem(
                CsrProblemKind::WeakKey,
                format!("the key is RSA-{bits}; at most {MAX_RSA_BITS} bits are accepted"),
            ));
        }
        return Ok(());
    }
    Err(problem(
        CsrProblemKind::WeakKey,
        format!(
            "the key's algorithm is {alg}; only ECDSA P-256/P-384 and RSA (2048 bits or more) are accepted"
        ),
    ))
}

/// The bit length of a big-endian unsigned integer (DER may add a leading zero byte).
fn modulus_bits(modulus: &[u8]) -> usize {
    let digits = match modulus.iter().position(|b| *b != 0) {
        Some(first) => &modulus[first..],
        None => return 0,
    };
    digits.len() * 8 - digits[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, KeyPair,
        SanType, SigningKey, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };

    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    /// Made with `openssl req -new -newkey rsa:1024 -subj / -addext subjectAltName=URI:<WEB>`:
    /// ring (rcgen's backend) refuses to sign with RSA keys below 2048 bits.
    const RSA_1024_CSR: &str = include_str!("testdata/rsa1024.csr");
    /// The same with RSA-2048.
    const RSA_2048_CSR: &str = include_str!("testdata/rsa2048.csr");

    fn csr_with(sans: Vec<SanType>, key: &KeyPair, tweak: impl FnOnce(&mut CertificateParams)) -> CsrDer {
        let mut params = CertificateParams::default();
        // As a node agent sends it (rcgen's default subject has a CN).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        tweak(&mut params);
        CsrDer::from_pem(&params.serialize_request(key).unwrap().pem().unwrap()).unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn p256() -> KeyPair {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
    }

    fn kind(r: Result<SubjectPublicKeyInfo, CsrProblem>) -> CsrProblemKind {
        r.expect_err("must be refused").kind
    }

    #[test]
    fn a_p256_csr_for_exactly_the_identity_passes() {
        let key = p256();
        let csr = csr_with(vec![uri(WEB)], &key, |_| {});
        assert_eq!(csr.sole_uri().unwrap(), WEB);
        let spki = csr.check(WEB).expect("valid CSR");
        assert_eq!(rcgen::PublicKeyData::der_bytes(&spki), rcgen::PublicKeyData::der_bytes(&key));
    }

    #[test]
    fn p384_and_rsa_2048_pass() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        csr_with(vec![uri(WEB)], &key, |_| {}).check(WEB).expect("P-384 is accepted");
        CsrDer::from_pem(RSA_2048_CSR).unwrap().check(WEB).expect("RSA-2048 is accepted");
    }

    #[test]
    fn an_extra_dns_san_is_refused() {
        let csr =
            csr_with(vec![uri(WEB), SanType::DnsName("web.shop.svc".try_into().unwrap())], &p256(), |_| {});
        let err = csr.check(WEB).unwrap_err();
        assert_eq!(err.kind, CsrProblemKind::ExtraNames);
        assert!(err.detail.contains("web.shop.svc"), "{err}");
    }

    #[test]
    fn ip_and_email_sans_are_refused() {
        let ip = csr_with(vec![uri(WEB), SanType::IpAddress([10, 0, 0, 1].into())], &p256(), |_| {});
        assert_eq!(kind(ip.check(WEB)), CsrProblemKind::ExtraNames);
        let mail =
            csr_with(vec![uri(WEB), SanType::Rfc822Name("a@b.c".try_into().unwrap())], &p256(), |_| {});
        assert_eq!(kind(mail.check(WEB)), CsrProblemKind::ExtraNames);
    }

    #[test]
    fn two_uris_are_refused() {
        let other = "spiffe://cluster.local/ns/shop/sa/db";
        let csr = csr_with(vec![uri(WEB), uri(other)], &p256(), |_| {});
        assert_eq!(kind(csr.check(WEB)), CsrProblemKind::WrongIdentity);
        assert_eq!(csr.sole_uri().unwrap_err().kind, CsrProblemKind::ExtraNames);
        let twice = csr_with(vec![uri(WEB), uri(WEB)], &p256(), |_| {});
        assert_eq!(kind(twice.check(WEB)), CsrProblemKind::ExtraNames);
    }

    #[test]
    fn a_ca_csr_is_refused() {
        let csr = csr_with(vec![uri(WEB)], &p256(), |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        assert_eq!(kind(csr.check(WEB)), CsrProblemKind::IsCa);
        let signer =
            csr_with(vec![uri(WEB)], &p256(), |p| p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign]);
        assert_eq!(kind(signer.check(WEB)), CsrProblemKind::IsCa);
    }

    #[test]
    fn rsa_1024_is_refused_as_weak() {
        let err = CsrDer::from_pem(RSA_1024_CSR).unwrap().check(WEB).unwrap_err();
        assert_eq!(err.kind, CsrProblemKind::WeakKey);
        assert!(err.detail.contains("RSA-1024"), "{err}");
    }

    #[test]
    fn ed25519_is_refused() {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        assert_eq!(kind(csr_with(vec![uri(WEB)], &key, |_| {}).check(WEB)), CsrProblemKind::WeakKey);
    }

    #[test]
    fn another_identity_or_none_is_refused() {
        let csr = csr_with(vec![uri("spiffe://cluster.local/ns/shop/sa/db")], &p256(), |_| {});
        let err = csr.check(WEB).unwrap_err();
        assert_eq!(err.kind, CsrProblemKind::WrongIdentity);
        assert!(err.detail.contains("sa/db"), "{err}");
        let none = csr_with(vec![], &p256(), |_| {});
        assert_eq!(kind(none.check(WEB)), CsrProblemKind::WrongIdentity);
        assert_eq!(none.sole_uri().unwrap_err().kind, CsrProblemKind::WrongIdentity);
    }

    #[test]
    fn a_tampered_signature_is_refused() {
        let csr = csr_with(vec![uri(WEB)], &p256(), |_| {});
        let mut der = csr.0.clone();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let err = CsrDer::from_der(der).check(WEB).unwrap_err();
        assert!(matches!(err.kind, CsrProblemKind::BadSignature | CsrProblemKind::Unparseable), "{err:?}");
    }

    #[test]
    fn garbage_and_oversized_input_are_refused_unread() {
        assert_eq!(CsrDer::from_pem("hello").unwrap_err().kind, CsrProblemKind::Unparseable);
        let huge = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            "A".repeat(MAX_CSR_PEM_BYTES)
        );
        assert_eq!(CsrDer::from_pem(&huge).unwrap_err().kind, CsrProblemKind::TooLarge);
        let not_csr = CsrDer::from_der(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert_eq!(kind(not_csr.check(WEB)), CsrProblemKind::Unparseable);
    }

    /// A DER element: `tag`, definite length, `content`.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let len = content.len();
        let mut out = vec![tag];
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    /// The elements inside the DER element `input` (its content split into elements).
    fn elements(input: &[u8]) -> Vec<&[u8]> {
        let (_, mut content, _) = tlv(input).unwrap();
        let mut out = Vec::new();
        while !content.is_empty() {
            let (_, _, next) = tlv(content).unwrap();
            out.push(&content[..content.len() - next.len()]);
            content = next;
        }
        out
    }

    /// The attributes (each a DER `Attribute`) of `csr`.
    fn attributes_of(csr: &CsrDer) -> Vec<Vec<u8>> {
        let info = elements(&csr.0)[0];
        let attrs = *elements(info).last().unwrap();
        elements(attrs).into_iter().map(<[u8]>::to_vec).collect()
    }

    /// `base` with `attributes` in place of its own, signed again with `key`: a CSR whose
    /// signature is valid, built by hand where rcgen would not build it.
    fn with_attributes(base: &CsrDer, key: &KeyPair, attributes: &[Vec<u8>]) -> CsrDer {
        let parts = elements(&base.0);
        let (info, alg) = (parts[0], parts[1]);
        let fields = elements(info);
        let mut content: Vec<u8> = fields[..fields.len() - 1].concat();
        content.extend(der(ATTRIBUTES, &attributes.concat()));
        let info = der(SEQUENCE, &content);
        let mut signature = vec![0u8];
        signature.extend(key.sign(&info).unwrap());
        CsrDer::from_der(der(SEQUENCE, &[info, alg.to_vec(), der(0x03, &signature)].concat()))
    }

    #[test]
    fn a_rebuilt_csr_with_its_own_attributes_still_passes() {
        // The test's own tool: rebuilding changes nothing a check could see.
        let key = p256();
        let csr = csr_with(vec![uri(WEB)], &key, |_| {});
        let rebuilt = with_attributes(&csr, &key, &attributes_of(&csr));
        rebuilt.check(WEB).expect("the same CSR, signed again");
    }

    #[test]
    fn a_second_extension_request_is_refused() {
        // Finding 6: x509-parser's requested_extensions() returns the first extensionRequest
        // only, so a second one could carry a DNS name or CA:true past the checks.
        let key = p256();
        let good = csr_with(vec![uri(WEB)], &key, |_| {});
        let dns =
            csr_with(vec![uri(WEB), SanType::DnsName("web.shop.svc".try_into().unwrap())], &p256(), |_| {});
        let ca = csr_with(vec![uri(WEB)], &p256(), |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        for (what, second) in [("a DNS SAN", attributes_of(&dns)), ("CA:true", attributes_of(&ca))] {
            let attributes = [attributes_of(&good), second].concat();
            assert_eq!(attributes.len(), 2);
            let csr = with_attributes(&good, &key, &attributes);
            let err = csr.check(WEB).expect_err(what);
            assert_eq!(err.kind, CsrProblemKind::Malformed, "{what}: {err}");
            assert!(err.detail.contains("two extensionRequest"), "{err}");
            assert_eq!(csr.sole_uri().unwrap_err().kind, CsrProblemKind::Malformed, "{what}");
        }
    }

    #[test]
    fn an_extension_request_with_two_values_or_another_attribute_is_refused() {
        let key = p256();
        let good = csr_with(vec![uri(WEB)], &key, |_| {});
        let dns =
            csr_with(vec![uri(WEB), SanType::DnsName("web.shop.svc".try_into().unwrap())], &p256(), |_| {});
        // One extensionRequest whose SET holds two lists of extensions.
        let attribute = &attributes_of(&good)[0];
        let [oid, values] = elements(attribute)[..] else { panic!("an Attribute is an OID and a SET") };
        let second_list = elements(elements(&attributes_of(&dns)[0])[1])[0].to_vec();
        let two_values = der(SET, &[elements(values)[0].to_vec(), second_list].concat());
        let attribute = der(SEQUENCE, &[oid.to_vec(), two_values].concat());
        let err = with_attributes(&good, &key, &[attribute]).check(WEB).unwrap_err();
        assert_eq!(err.kind, CsrProblemKind::Malformed, "{err}");
        assert!(err.detail.contains("two values"), "{err}");
        // A challengePassword (1.2.840.113549.1.9.7) next to the extension request.
        let challenge = der(
            SEQUENCE,
            &[
                der(OID_TAG, &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x07]),
                der(SET, &der(0x0c, b"secret")),
            ]
            .concat(),
        );
        let err = with_attributes(&good, &key, &[attributes_of(&good)[0].clone(), challenge])
            .check(WEB)
            .unwrap_err();
        assert_eq!(err.kind, CsrProblemKind::Malformed, "{err}");
        assert!(err.detail.contains("1.2.840.113549.1.9.7"), "{err}");
    }

    #[test]
    fn an_extension_asked_twice_is_refused() {
        // A second subjectAltName (2.5.29.17) extension in the same request, with a DNS name.
        let dns_names = der(SEQUENCE, &der(0x82, b"web.shop.svc"));
        let csr = csr_with(vec![uri(WEB)], &p256(), |p| {
            p.custom_extensions = vec![CustomExtension::from_oid_content(&[2, 5, 29, 17], dns_names)];
        });
        let err = csr.check(WEB).unwrap_err();
        assert_eq!(err.kind, CsrProblemKind::Malformed, "{err}");
        assert!(err.detail.contains("2.5.29.17") && err.detail.contains("twice"), "{err}");
    }

    #[test]
    fn a_subject_is_refused_an_empty_one_passes() {
        let named = csr_with(vec![uri(WEB)], &p256(), |p| {
            p.distinguished_name.push(DnType::CommonName, "web.shop.svc");
        });
        let err = named.check(WEB).unwrap_err();
        assert_eq!(err.kind, CsrProblemKind::Subject, "{err}");
        assert!(err.detail.contains("web.shop.svc"), "{err}");
        // Go's pkix.Name{Organization: [""]} (istio-agent): attributes with empty values only.
        let empty_org = csr_with(vec![uri(WEB)], &p256(), |p| {
            p.distinguished_name.push(DnType::OrganizationName, "");
        });
        empty_org.check(WEB).expect("an organization with an empty value is an empty subject");
    }

    #[test]
    fn modulus_bits_ignores_leading_zeros() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x7f, 0x00]), 15);
        assert_eq!(modulus_bits(&[0x00, 0x00]), 0);
    }
}
