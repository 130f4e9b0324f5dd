//! The mesh root on disk: `ca_init` creates it (`sluice ca init`), [`MeshRoot::load`] reads it
//! for the embedded CA.

use std::fs::{self, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tracing::{info, warn};

use super::ca::CaError;
use super::spiffe::check_trust_domain;
use super::x509;
use super::NOT_BEFORE_SKEW;

/// File names inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The root's subject common name.
pub const ROOT_COMMON_NAME: &str = "sluice mesh root";
/// How long a root made by `ca init` is valid.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Creates a self-signed mesh root in `dir` (created if missing): `ca.pem` (mode 0644) and
/// `ca-key.pem` (PKCS#8, mode 0600). ECDSA P-256, CA:true, valid 10 years, subject
/// "sluice mesh root", URI SAN `spiffe://<trust_domain>`. Refuses to replace either file
/// unless `force`. Returns the paths of the certificate and the key.
pub fn ca_init(dir: &Path, trust_domain: &str, force: bool) -> Result<(PathBuf, PathBuf), CaError> {
    check_trust_domain(trust_domain)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !force {
        for path in [&cert_path, &key_path] {
            if path.symlink_metadata().is_ok() {
                return Err(CaError::AlreadyExists { path: path.clone() });
            }
        }
    }
    fs::create_dir_all(dir).map_err(|source| CaError::Io { action: "creating", path: dir.into(), source })?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Config(format!("generating the root key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ROOT_COMMON_NAME);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - NOT_BEFORE_SKEW;
    params.not_after = now + ROOT_LIFETIME;
    params.serial_number = Some(x509::random_serial().map_err(CaError::Config)?);
    // Unconstrained path length: a production setup signs an intermediate for its CA service
    // with this root (see ca.rs).
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let td_uri = format!("spiffe://{trust_domain}");
    params.subject_alt_names = vec![SanType::URI(
        td_uri.as_str().try_into().map_err(|e| CaError::Config(format!("trust domain URI {td_uri}: {e}")))?,
    )];
    let cert =
        params.self_signed(&key).map_err(|e| CaError::Config(format!("self-signing the root: {e}")))?;

    // Key first: a cert without its key is useless, a key without a cert can be re-run with --force.
    write_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
    info!(dir = %dir.display(), trust_domain, "created the mesh root");
    Ok((cert_path, key_path))
}

/// Writes through a temporary file and a rename, so a crash never leaves a half-written key
/// under the real name, and sets the mode before any byte of the key is written.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |action: &'static str, path: PathBuf| move |source| CaError::Io { action, path, source };
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("creating", tmp.clone()))?;
    // The umask can only remove bits from `mode`; set it exactly anyway (0644 for the cert even
    // under a strict umask, so that other tools can read the public root).
    f.set_permissions(Permissions::from_mode(mode)).map_err(io("setting permissions on", tmp.clone()))?;
    let written = f.write_all(contents).and_then(|()| f.sync_all());
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(CaError::Io { action: "writing", path: tmp, source });
    }
    fs::rename(&tmp, path).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        CaError::Io { action: "renaming into place", path: path.to_path_buf(), source }
    })
}

/// A loaded mesh root: what the embedded CA signs with.
pub(crate) struct MeshRoot {
    pub cert: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
    /// The trust domain named by the root's `spiffe://<td>` URI SAN, if it has one.
    pub trust_domain: Option<String>,
    pub not_after: OffsetDateTime,
}

impl MeshRoot {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<MeshRoot, CaError> {
        let bad = |path: &Path, reason: String| CaError::BadRoot { path: path.to_path_buf(), reason };
        let cert_pem = fs::read(cert_path).map_err(|source| CaError::Io {
            action: "reading",
            path: cert_path.into(),
            source,
        })?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(cert_path, format!("not a PEM certificate file: {e}")))?;
        let cert = match <[_; 1]>::try_from(certs) {
            Ok([cert]) => cert,
            Err(certs) => {
                return Err(bad(
                    cert_path,
                    format!("holds {} certificates; the embedded CA expects exactly the root", certs.len()),
                ))
            }
        };

        let key_meta = fs::metadata(key_path).map_err(|source| CaError::Io {
            action: "reading",
            path: key_path.into(),
            source,
        })?;
        if key_meta.permissions().mode() & 0o077 != 0 {
            warn!(path = %key_path.display(), mode = format!("{:o}", key_meta.permissions().mode() & 0o777),
                "the mesh root key is readable by other users; it should be mode 0600");
        }
        let key_pem = fs::read_to_string(key_path).map_err(|source| CaError::Io {
            action: "reading",
            path: key_path.into(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            bad(key_path, format!("not a PKCS#8 PEM private key this build can sign with: {e}"))
        })?;

        let parsed = x509::parse(&cert).map_err(|e| bad(cert_path, e.to_string()))?;
        if !parsed.is_ca() {
            return Err(bad(
                cert_path,
                "is not a CA certificate (basicConstraints CA:true is missing)".into(),
            ));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad(key_path, format!("is not the private key of {}", cert_path.display())));
        }
        let not_after = parsed.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(bad(cert_path, format!("expired at {}", x509::rfc3339(not_after))));
        }
        let uris = x509::spiffe_uris(&parsed).map_err(|e| bad(cert_path, e.to_string()))?;
        // A root names its trust domain as `spiffe://<td>` (no path); anything else is not ours to interpret.
        let trust_domain = uris
            .iter()
            .filter_map(|u| u.strip_prefix("spiffe://"))
            .find(|td| !td.contains('/'))
            .map(str::to_string);
        drop(parsed);

        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| bad(cert_path, format!("cannot be used as an issuer: {e}")))?;
        Ok(MeshRoot { cert, issuer, trust_domain, not_after })
    }
}
