use std::os::unix::fs::PermissionsExt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn csr(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().der().to_vec()
}

fn uri(id: &SpiffeId) -> SanType {
    SanType::URI(id.to_string().as_str().try_into().unwrap())
}

fn request(node: &str, identity: SpiffeId) -> SignRequest {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr_der = csr(&key, vec![uri(&identity)]);
    SignRequest { node: node.into(), identity, csr_der }
}

#[tokio::test]
async fn signs_an_identity_with_a_pod_on_its_node() {
    let root = root();
    let ca = embedded_ca(&root, "node-1", Duration::from_secs(3600));
    let before = OffsetDateTime::now_utc();
    let chain = ca.sign(request("node-1", id("web"))).await.expect("web has a pod on node-1");
    assert_eq!(chain.len(), 1, "the embedded CA signs directly with the root");

    let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
    // The URI SAN is the SPIFFE ID, and the only name.
    let san = cert.subject_alternative_name().unwrap().expect("SAN present");
    assert_eq!(san.value.general_names, vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]);
    assert!(san.critical, "SAN must be critical with an empty subject");
    assert!(cert.subject().iter_attributes().next().is_none(), "empty subject");
    // Not a CA; digitalSignature; serverAuth + clientAuth.
    assert!(!cert.is_ca());
    assert!(cert.basic_constraints().unwrap().is_some(), "explicit CA:false");
    let ku = cert.key_usage().unwrap().expect("key usage").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().expect("EKU").value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    // ECDSA P-256 key, signed by the root.
    assert_eq!(cert.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
    let root_pem = read(&root.cert);
    let root_der = rustls_pki_types::CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap();
    let (_, root_cert) = X509Certificate::from_der(&root_der).unwrap();
    cert.verify_signature(Some(root_cert.public_key())).expect("signed by the mesh root");
    assert_eq!(cert.issuer(), root_cert.subject());
    // Short validity, backdated a few seconds; a random 16-byte serial.
    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    assert!(nb < before && nb > before - Duration::from_secs(30), "not_before {nb} vs {before}");
    let lifetime = na - before;
    assert!(
        lifetime >= time::Duration::seconds(3599) && lifetime <= time::Duration::seconds(3602),
        "{lifetime}"
    );
    assert_eq!(cert.raw_serial().len(), 16);
    let again = ca.sign(request("node-1", id("web"))).await.unwrap();
    let (_, cert2) = X509Certificate::from_der(&again[0]).unwrap();
    assert_ne!(cert.raw_serial(), cert2.raw_serial(), "serials are random");

    assert_eq!(ca.trust_bundle(), vec![root_der]);
}

#[tokio::test]
async fn refuses_identities_without_a_pod_on_its_node() {
    let root = root();
    let ca = embedded_ca(&root, "node-1", DAY);

    // db runs on node-2 only.
    let err = ca.sign(request("node-1", id("db"))).await.unwrap_err();
    assert!(matches!(err, CaError::NotAuthorized { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("node \"node-1\"") && msg.contains("spiffe://cluster.local/ns/shop/sa/db"), "{msg}");
    assert!(
        msg.contains("no pod with service account \"db\" in namespace \"shop\" is scheduled on node"),
        "{msg}"
    );

    // An identity no pod has at all.
    let err = ca.sign(request("node-1", id("nobody"))).await.unwrap_err();
    assert!(matches!(err, CaError::NotAuthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("spiffe://cluster.local/ns/shop/sa/nobody"), "{err}");

    // A finished pod needs no certificate.
    let err = ca.sign(request("node-1", id("migrate"))).await.unwrap_err();
    assert!(matches!(err, CaError::NotAuthorized { .. }), "{err:?}");

    // Another node asking this node's CA, even for an identity that has a pod on node-1.
    let err = ca.sign(request("node-2", id("web"))).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CaError::NotAuthorized { .. }), "{err:?}");
    assert!(
        msg.contains("node \"node-2\"") && msg.contains("signs only for its own node \"node-1\""),
        "{msg}"
    );

    // Another trust domain.
    let foreign = SpiffeId::new("evil.example", "shop", "web");
    let err = ca.sign(request("node-1", foreign)).await.unwrap_err();
    assert!(err.to_string().contains("the mesh trust domain is \"cluster.local\""), "{err}");
}

#[tokio::test]
async fn authorization_follows_the_current_model() {
    let root = root();
    let model = model();
    let ca = EmbeddedCa::load(
        &root.cert,
        &root.key,
        EmbeddedCaConfig::new("node-2", TD),
        model_authorizer(model.clone()),
    )
    .unwrap();
    assert!(ca.sign(request("node-2", id("db"))).await.is_ok());
    // db leaves node-2: the very next request is refused.
    model.store(Arc::new(crate::discovery::Model::empty()));
    let err = ca.sign(request("node-2", id("db"))).await.unwrap_err();
    assert!(matches!(err, CaError::NotAuthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn the_manager_gets_certificates_only_for_its_pods() {
    let root = root();
    let m1 = manager(&root, "node-1", DAY);
    m1.ensure(&id("web")).await.expect("web is on node-1");
    let err = m1.ensure(&id("db")).await.unwrap_err();
    assert!(matches!(err, IdentityError::Ca(CaError::NotAuthorized { .. })), "{err:?}");
    assert!(err.to_string().contains("spiffe://cluster.local/ns/shop/sa/db"), "{err}");
    let certs = m1.certs();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].identity, id("web"));
}

#[tokio::test]
async fn checking_an_identity_installs_nothing() {
    let root = root();
    let m1 = manager(&root, "node-1", DAY);
    let granted = m1.check_issuance(&id("web")).await.expect("web is on node-1");
    assert!(granted.issued && !granted.installed, "{granted:?}");
    assert_eq!(granted.node, "node-1");
    assert!(granted.serial.as_deref().is_some_and(|s| !s.is_empty()), "{granted:?}");
    let err = m1.check_issuance(&id("db")).await.unwrap_err();
    assert!(matches!(err, IdentityError::Ca(CaError::NotAuthorized { .. })), "{err:?}");
    assert!(err.to_string().contains("node-1") && err.to_string().contains("sa/db"), "{err}");
    assert!(m1.certs().is_empty(), "a check must not install a certificate: {:?}", m1.certs());
}

#[tokio::test]
async fn refuses_a_csr_asking_for_another_name() {
    let root = root();
    let ca = embedded_ca(&root, "node-1", DAY);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();

    // web asks, but the CSR names api (which also has a pod on node-1).
    let req =
        SignRequest { node: "node-1".into(), identity: id("web"), csr_der: csr(&key, vec![uri(&id("api"))]) };
    let err = ca.sign(req).await.unwrap_err();
    assert!(matches!(err, CaError::SanMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("spiffe://cluster.local/ns/shop/sa/api") && msg.contains("only the URI"), "{msg}");

    // A DNS name next to the right URI.
    let sans = vec![uri(&id("web")), SanType::DnsName("web.shop.svc".try_into().unwrap())];
    let req = SignRequest { node: "node-1".into(), identity: id("web"), csr_der: csr(&key, sans) };
    let err = ca.sign(req).await.unwrap_err();
    assert!(matches!(err, CaError::SanMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("web.shop.svc"), "{err}");

    // No SAN at all is fine: the CA writes it.
    let req = SignRequest { node: "node-1".into(), identity: id("web"), csr_der: csr(&key, vec![]) };
    let chain = ca.sign(req).await.expect("CSR without SAN");
    assert_eq!(x509::spiffe_id(&chain[0]).unwrap(), id("web"));
}

#[tokio::test]
async fn refuses_a_csr_that_does_not_verify_or_has_the_wrong_key_type() {
    let root = root();
    let ca = embedded_ca(&root, "node-1", DAY);

    let mut req = request("node-1", id("web"));
    let last = req.csr_der.len() - 1;
    req.csr_der[last] ^= 0x01; // corrupt the signature
    let err = ca.sign(req).await.unwrap_err();
    assert!(matches!(err, CaError::InvalidCsr { .. }), "{err:?}");
    assert!(err.to_string().contains("signature does not verify"), "{err}");

    let req = SignRequest { node: "node-1".into(), identity: id("web"), csr_der: b"not a csr".to_vec() };
    let err = ca.sign(req).await.unwrap_err();
    assert!(err.to_string().contains("not a PKCS#10 CSR"), "{err}");

    let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let req =
        SignRequest { node: "node-1".into(), identity: id("web"), csr_der: csr(&ed, vec![uri(&id("web"))]) };
    let err = ca.sign(req).await.unwrap_err();
    assert!(err.to_string().contains("not ECDSA P-256"), "{err}");
}

#[test]
fn ca_init_writes_a_root_with_private_key_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mesh-ca");
    let (cert, key) = ca_init(&target, "example.org", false).unwrap();
    assert_eq!(cert, target.join("ca.pem"));
    assert_eq!(key, target.join("ca-key.pem"));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777, 0o644);
    assert!(read(&key).starts_with("-----BEGIN PRIVATE KEY-----"));
    let leftovers: Vec<_> = std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");

    let der = rustls_pki_types::CertificateDer::from_pem_slice(read(&cert).as_bytes()).unwrap();
    let (_, root) = X509Certificate::from_der(&der).unwrap();
    assert!(root.is_ca());
    assert_eq!(root.subject().to_string(), "CN=sluice mesh root");
    assert_eq!(root.subject(), root.issuer(), "self-signed");
    root.verify_signature(None).expect("self-signature verifies");
    let ku = root.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let san = root.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::URI("spiffe://example.org")]);
    let days = (root.validity().not_after.to_datetime() - OffsetDateTime::now_utc()).whole_days();
    assert!((3649..=3650).contains(&days), "valid for {days} days, not 10 years");
    assert_eq!(root.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
    assert!(root
        .extensions()
        .iter()
        .any(|e| matches!(e.parsed_extension(), ParsedExtension::SubjectKeyIdentifier(_))));
}

#[test]
fn ca_init_refuses_to_overwrite_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca_init(dir.path(), TD, false).unwrap();
    let (cert_before, key_before) = (read(&cert), read(&key));

    let err = ca_init(dir.path(), TD, false).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err:?}");
    assert!(
        err.to_string().contains("ca.pem already exists") && err.to_string().contains("--force"),
        "{err}"
    );
    assert_eq!((read(&cert), read(&key)), (cert_before.clone(), key_before.clone()), "files untouched");

    // Only the key left over (say, an interrupted run) still counts as existing.
    std::fs::remove_file(&cert).unwrap();
    let err = ca_init(dir.path(), TD, false).unwrap_err();
    assert!(err.to_string().contains("ca-key.pem already exists"), "{err}");

    // --force replaces both, and keeps the key private even if its mode was loosened.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    ca_init(dir.path(), TD, true).unwrap();
    assert_ne!(read(&cert), cert_before);
    assert_ne!(read(&key), key_before);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

    let err = ca_init(dir.path(), "Bad/Domain", true).unwrap_err();
    assert!(matches!(err, CaError::TrustDomain(_)), "{err:?}");
}

#[test]
fn loading_refuses_a_root_of_another_trust_domain_or_a_foreign_key() {
    let a = root();
    let other = tempfile::tempdir().unwrap();
    let (_, other_key) = ca_init(other.path(), "other.example", false).unwrap();

    let err = EmbeddedCa::load(
        &a.cert,
        &a.key,
        EmbeddedCaConfig::new("node-1", "prod.example"),
        model_authorizer(model()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("trust domain \"cluster.local\"")
            && err.to_string().contains("prod.example"),
        "{err}"
    );

    let err =
        EmbeddedCa::load(&a.cert, &other_key, EmbeddedCaConfig::new("node-1", TD), model_authorizer(model()))
            .unwrap_err();
    assert!(err.to_string().contains("is not the private key of"), "{err}");

    let missing = a.dir.path().join("nope.pem");
    let err =
        EmbeddedCa::load(&missing, &a.key, EmbeddedCaConfig::new("node-1", TD), model_authorizer(model()))
            .unwrap_err();
    assert!(err.to_string().contains("nope.pem") && err.to_string().contains("reading"), "{err}");

    let mut short = EmbeddedCaConfig::new("node-1", TD);
    short.leaf_lifetime = Duration::from_millis(10);
    let err = EmbeddedCa::load(&a.cert, &a.key, short, model_authorizer(model())).unwrap_err();
    assert!(err.to_string().contains("too short"), "{err}");
}
