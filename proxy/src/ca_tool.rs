//! `sluice ca issue`: an offline administration tool that signs a workload certificate directly
//! with the mesh root key (which must be at hand, so never on a node in production). For
//! debugging a peer with `openssl s_client`/`s_server`, and for tests that need certificates a
//! node would refuse to make (another identity, an expired one).

use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub struct IssueArgs<'a> {
    /// Directory holding `ca.pem` and `ca-key.pem` (as `sluice ca init` writes them).
    pub ca_dir: &'a Path,
    pub identity: &'a str,
    /// Output prefix: writes `<out>.pem` (certificate) and `<out>.key.pem` (key, mode 0600).
    pub out: &'a Path,
    pub lifetime: Duration,
    /// Issue a certificate whose validity ended an hour ago.
    pub expired: bool,
}

pub fn issue(a: IssueArgs<'_>) -> Result<()> {
    let ca_pem = std::fs::read_to_string(a.ca_dir.join("ca.pem"))
        .with_context(|| format!("reading {}/ca.pem (create a CA with `sluice ca init`)", a.ca_dir.display()))?;
    let ca_key_pem = std::fs::read_to_string(a.ca_dir.join("ca-key.pem"))
        .with_context(|| format!("reading {}/ca-key.pem", a.ca_dir.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parsing the CA certificate")?;

    let key = KeyPair::generate().context("generating a P-256 key")?;
    let mut params = CertificateParams::default();
    let now = OffsetDateTime::now_utc();
    let (from, until) = if a.expired {
        (now - Duration::hours(2), now - Duration::hours(1))
    } else {
        (now - Duration::minutes(1), now + a.lifetime)
    };
    params.not_before = from;
    params.not_after = until;
    params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sluice");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(a.identity.try_into().context("identity is not a valid URI")?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).context("signing")?;

    let cert_path = a.out.with_extension("pem");
    let key_path = a.out.with_extension("key.pem");
    std::fs::write(&cert_path, cert.pem()).with_context(|| format!("writing {}", cert_path.display()))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    println!("wrote {} and {}", cert_path.display(), key_path.display());
    Ok(())
}

fn rand_serial() -> [u8; 16] {
    let mut s = [0u8; 16];
    // getrandom(2) via libc: no extra dependency for 16 bytes.
    // SAFETY: the buffer is valid for its length.
    unsafe { libc::getrandom(s.as_mut_ptr().cast(), s.len(), 0) };
    s[0] &= 0x7f; // a positive serial
    s
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}
