//! Small certificate helpers shared by the CA, the manager and the verifiers: reading the SPIFFE
//! ID, serial and validity out of a DER certificate, random serials, RFC 3339 times.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::spiffe::{SpiffeError, SpiffeId};

/// Why a certificate does not name exactly one workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeafIdError {
    #[error("certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("certificate carries no SPIFFE ID (no spiffe:// URI subject alternative name)")]
    Missing,
    #[error("certificate carries {0} SPIFFE IDs; an X.509-SVID has exactly one")]
    Several(usize),
    #[error("certificate carries an invalid SPIFFE ID: {0}")]
    Invalid(SpiffeError),
}

/// What the manager and the admin API need from an issued leaf.
#[derive(Debug, Clone)]
pub(crate) struct LeafInfo {
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SubjectPublicKeyInfo, DER: compared with the key the node generated.
    pub spki: Vec<u8>,
}

pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, LeafIdError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(LeafIdError::Malformed("trailing bytes after the certificate".into())),
        Err(e) => Err(LeafIdError::Malformed(e.to_string())),
    }
}

pub(crate) fn leaf_info(der: &[u8]) -> Result<LeafInfo, LeafIdError> {
    let cert = parse(der)?;
    Ok(LeafInfo {
        serial_hex: hex(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        spki: cert.public_key().raw.to_vec(),
    })
}

/// The workload SPIFFE ID a certificate names (its one `spiffe://` URI SAN).
pub(crate) fn spiffe_id(der: &[u8]) -> Result<SpiffeId, LeafIdError> {
    spiffe_id_of_cert(&parse(der)?)
}

fn spiffe_id_of_cert(cert: &X509Certificate<'_>) -> Result<SpiffeId, LeafIdError> {
    let uris = spiffe_uris(cert)?;
    match uris.as_slice() {
        [] => Err(LeafIdError::Missing),
        [one] => one.parse().map_err(LeafIdError::Invalid),
        many => Err(LeafIdError::Several(many.len())),
    }
}

/// Every `spiffe://` URI SAN of a certificate.
pub(crate) fn spiffe_uris<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, LeafIdError> {
    let san = cert.subject_alternative_name().map_err(|e| LeafIdError::Malformed(e.to_string()))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Lower-case hex without separators (what `openssl x509 -serial` prints, lower-cased).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    // Formatting a valid UTC time as RFC 3339 only fails for years outside 0..=9999, which
    // X.509 cannot encode; fall back to the Debug form rather than panic.
    t.format(&Rfc3339).unwrap_or_else(|_| format!("{t:?}"))
}

pub(crate) fn unix_rfc3339(secs: u64) -> String {
    match OffsetDateTime::from_unix_timestamp(secs as i64) {
        Ok(t) => rfc3339(t),
        Err(_) => format!("{secs} (unix time)"),
    }
}

/// 16 random bytes with the top bit clear: a positive 128-bit serial, as RFC 5280 asks
/// (unpredictable serials also defeat chosen-prefix collision attacks on the CA signature).
pub(crate) fn random_serial() -> Result<rcgen::SerialNumber, String> {
    let mut bytes = [0u8; 16];
    random_fill(&mut bytes)?;
    bytes[0] &= 0x7f;
    // A leading zero byte would be stripped when encoded; keep the serial 16 bytes long.
    bytes[0] |= 0x01;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// The ring CSPRNG, reached through rustls so that no extra dependency is needed.
pub(crate) fn random_fill(buf: &mut [u8]) -> Result<(), String> {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| "the operating system's random number generator failed".to_string())
}
