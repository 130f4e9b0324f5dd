//! The simulator's test PKI: mesh roots made by the real `sluice ca init` (what an operator runs),
//! intermediates for the CA service signed under them (what an offline root would sign), and
//! trust bundles.
//!
//! Files follow sluice's CA directory layout (`<dir>/ca.pem`, `<dir>/ca-key.pem` with mode
//! 0600), so `sluice ca issue --dir` works on any of them.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::OffsetDateTime;

/// File names inside a CA directory (as `sluice ca init` writes them).
pub const CERT_FILE: &str = "ca.pem";
pub const KEY_FILE: &str = "ca-key.pem";

/// How long an intermediate made here is valid (at most until its parent expires).
pub const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// A CA certificate and its private key on disk (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject as OpenSSL prints it, e.g. `CN=sluice mesh root`.
    pub subject: String,
    pub issuer: String,
    pub not_after: SystemTime,
    pub is_ca: bool,
    /// URI SANs (`spiffe://...`).
    pub uris: Vec<String>,
    /// Serial number, lowercase hex.
    pub serial: String,
}

impl CaFiles {
    /// The CA in directory `dir` (`ca.pem`, `ca-key.pem`); not checked.
    pub fn in_dir(dir: &Path) -> CaFiles {
        CaFiles { cert: dir.join(CERT_FILE), key: dir.join(KEY_FILE) }
    }

    pub fn cert_pem(&self) -> Result<String> {
        fs::read_to_string(&self.cert).with_context(|| format!("reading {}", self.cert.display()))
    }

    pub fn key_pem(&self) -> Result<String> {
        fs::read_to_string(&self.key).with_context(|| format!("reading {}", self.key.display()))
    }

    pub fn info(&self) -> Result<CertInfo> {
        cert_info(&self.cert_pem()?)
    }
}

/// Parses the first certificate of `pem`.
pub fn cert_info(pem: &str) -> Result<CertInfo> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let cert = pem.parse_x509().context("parsing the certificate")?;
    let uris = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let not_after = cert.validity().not_after.timestamp();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64),
        is_ca: cert.is_ca(),
        uris,
        serial: cert.raw_serial_as_string().replace(':', ""),
    })
}

/// A mesh root made with sluice's own tool: `sluice ca init --dir <dir> --trust-domain <td>`
/// (self-signed ECDSA P-256, CA:true, subject `sluice mesh root`, URI SAN `spiffe://<td>`).
/// Reuses the root already in `dir`.
pub fn sluice_root(sluice_bin: &Path, dir: &Path, trust_domain: &str) -> Result<CaFiles> {
    let files = CaFiles::in_dir(dir);
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    let out = Command::new(sluice_bin)
        .args(["ca", "init", "--dir"])
        .arg(dir)
        .args(["--trust-domain", trust_domain])
        .output()
        .with_context(|| format!("running {} ca init", sluice_bin.display()))?;
    if !out.status.success() {
        bail!(
            "sluice ca init --dir {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(files)
}

/// An intermediate CA signed by `parent`, in `dir` (made once; reused if there): ECDSA P-256,
/// CA:true with path length 0 (it signs workload certificates only), key usage keyCertSign and
/// cRLSign, subject `CN=<common_name>, O=sluice`, URI SAN `spiffe://<trust_domain>`, valid
/// [`INTERMEDIATE_LIFETIME`] or until `parent` expires, whichever is first. What an offline
/// root signs for the CA service.
pub fn intermediate(parent: &CaFiles, dir: &Path, common_name: &str, trust_domain: &str) -> Result<CaFiles> {
    intermediate_ca(parent, dir, common_name, trust_domain, 0)
}

/// [`intermediate`] allowing `path_len` more CAs below it: a level of a deeper hierarchy
/// (root → `path_len` 1 → the CA service's intermediate), whose signing chain is then not
/// empty.
pub fn intermediate_ca(
    parent: &CaFiles,
    dir: &Path,
    common_name: &str,
    trust_domain: &str,
    path_len: u8,
) -> Result<CaFiles> {
    let files = CaFiles::in_dir(dir);
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    let parent_pem = parent.cert_pem()?;
    let parent_key =
        KeyPair::from_pem(&parent.key_pem()?).with_context(|| format!("parsing {}", parent.key.display()))?;
    let parent_not_after = OffsetDateTime::from(parent.info()?.not_after);
    let issuer = Issuer::from_ca_cert_pem(&parent_pem, parent_key)
        .with_context(|| format!("using {} as an issuer", parent.cert.display()))?;

    let key = KeyPair::generate().context("generating a P-256 key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "sluice");
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = (now + INTERMEDIATE_LIFETIME).min(parent_not_after);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&crate::util::random_bytes(16)?));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let uri = format!("spiffe://{trust_domain}");
    params.subject_alt_names =
        vec![SanType::URI(uri.as_str().try_into().with_context(|| format!("trust domain URI {uri}"))?)];
    let cert = params.signed_by(&key, &issuer).context("signing the intermediate")?;

    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

/// The PEM of a trust bundle: each root's certificate, in order (the first is the one the CA
/// signs under now; see the rotation procedure in the README).
pub fn bundle_pem(roots: &[&CaFiles]) -> Result<String> {
    let mut out = String::new();
    for r in roots {
        let pem = r.cert_pem()?;
        out.push_str(pem.trim_end());
        out.push('\n');
    }
    Ok(out)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed root like `sluice ca init` makes, without the binary (unit tests run
    /// without sluice built).
    fn root(dir: &Path) -> CaFiles {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "test root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(30);
        let cert = params.self_signed(&key).unwrap();
        fs::create_dir_all(dir).unwrap();
        let files = CaFiles::in_dir(dir);
        write_file(&files.key, key.serialize_pem().as_bytes(), 0o600).unwrap();
        write_file(&files.cert, cert.pem().as_bytes(), 0o644).unwrap();
        files
    }

    #[test]
    fn intermediates_chain_to_their_root_and_expire_with_it() {
        let tmp = std::env::temp_dir()
            .join(format!("sluice-pki-test-{}", crate::util::hex(&crate::util::random_bytes(4).unwrap())));
        let r = root(&tmp.join("root"));
        let i = intermediate(&r, &tmp.join("int"), "sluice-ca", "cluster.local").unwrap();
        let ri = r.info().unwrap();
        let ii = i.info().unwrap();
        assert_eq!(ii.subject, "CN=sluice-ca, O=sluice");
        assert_eq!(ii.issuer, ri.subject);
        assert!(ii.is_ca);
        assert_eq!(ii.uris, ["spiffe://cluster.local"]);
        assert!(ii.not_after <= ri.not_after, "an intermediate never outlives its root");
        // The signature verifies against the root's key.
        let root_der = x509_parser::pem::parse_x509_pem(r.cert_pem().unwrap().as_bytes()).unwrap().1;
        let int_der = x509_parser::pem::parse_x509_pem(i.cert_pem().unwrap().as_bytes()).unwrap().1;
        let root_cert = root_der.parse_x509().unwrap();
        let int_cert = int_der.parse_x509().unwrap();
        int_cert.verify_signature(Some(root_cert.public_key())).expect("signed by the root");
        // Made once: a second call returns the same files untouched.
        let again = intermediate(&r, &tmp.join("int"), "other", "cluster.local").unwrap();
        assert_eq!(again.info().unwrap().serial, ii.serial);
        assert_eq!(
            bundle_pem(&[&r, &i]).unwrap(),
            format!("{}\n{}\n", r.cert_pem().unwrap().trim_end(), i.cert_pem().unwrap().trim_end())
        );
        fs::remove_dir_all(&tmp).unwrap();
    }
}
