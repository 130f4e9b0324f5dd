use std::collections::HashSet;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::super::verify::MeshServerVerifier;
use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that verifies servers like `trusting`'s configs do (its bundle, `expected`), but
/// presents `cert` (or nothing): to put a foreign or expired client certificate in front of a
/// mesh server.
fn client_with(
    trusting: &CertManager,
    expected: SpiffeId,
    cert: Option<Arc<CertifiedKey>>,
) -> Arc<rustls::ClientConfig> {
    let verifier = Arc::new(MeshServerVerifier::new(
        trusting.bundle.clone(),
        provider().signature_verification_algorithms,
        expected,
    ));
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(cfg)
}

/// A certificate for `identity` signed by `root` that expired an hour ago (second precision,
/// as X.509 stores it).
fn expired_cert(root: &Root, identity: &SpiffeId) -> (Arc<CertifiedKey>, OffsetDateTime) {
    let issuer =
        Issuer::from_ca_cert_pem(&read(&root.cert), KeyPair::from_pem(&read(&root.key)).unwrap()).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().as_str().try_into().unwrap())];
    params.not_before = now - Duration::from_secs(7200);
    params.not_after = now - Duration::from_secs(3600);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = CertifiedKey::from_der(vec![cert.der().clone()], key_der, &provider()).unwrap();
    (Arc::new(certified), params.not_after)
}

#[tokio::test]
async fn mutual_tls_between_two_nodes_carries_both_identities() {
    let root = root();
    let (m1, m2) = two_nodes(&root, DAY).await;
    let (c, s) =
        handshake(m1.client_config(&id("web"), id("db")).unwrap(), m2.server_config(&id("db")).unwrap())
            .await;
    let (mut c, mut s) = (c.expect("client handshake"), s.expect("server handshake"));

    assert_eq!(peer_identity(c.get_ref().1), Some(id("db")), "client sees the server's identity");
    assert_eq!(peer_identity(s.get_ref().1), Some(id("web")), "server sees the client's identity");
    assert_eq!(c.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN_H2));
    exchange(&mut c, &mut s, b"hello through the mesh").await;
}

#[tokio::test]
async fn configs_are_cached_and_follow_the_identities_held() {
    let root = root();
    let (m1, m2) = two_nodes(&root, DAY).await;
    m1.ensure(&id("api")).await.unwrap();

    let a = m1.client_config(&id("web"), id("db")).unwrap();
    assert!(
        Arc::ptr_eq(&a, &m1.client_config(&id("web"), id("db")).unwrap()),
        "cached per (source, expected)"
    );
    assert!(!Arc::ptr_eq(&a, &m1.client_config(&id("web"), id("api")).unwrap()));
    assert!(!Arc::ptr_eq(&a, &m1.client_config(&id("api"), id("db")).unwrap()));
    let s = m2.server_config(&id("db")).unwrap();
    assert!(Arc::ptr_eq(&s, &m2.server_config(&id("db")).unwrap()), "cached per local identity");

    // Same-node traffic follows the same rules: web → api on node-1.
    let (c, s) =
        handshake(m1.client_config(&id("web"), id("api")).unwrap(), m1.server_config(&id("api")).unwrap())
            .await;
    assert_eq!(peer_identity(s.expect("server").get_ref().1), Some(id("web")));
    assert_eq!(peer_identity(c.expect("client").get_ref().1), Some(id("api")));

    // Nothing for identities this node does not hold.
    let err = m1.client_config(&id("db"), id("web")).unwrap_err();
    assert!(matches!(err, IdentityError::NoCertificate { .. }), "{err:?}");
    assert!(err.to_string().contains("no certificate for spiffe://cluster.local/ns/shop/sa/db"), "{err}");
    assert!(m1.server_config(&id("db")).is_err());

    // web's pod leaves: its key and configurations go; api stays.
    m1.retain(&HashSet::from([id("api")]));
    assert!(matches!(m1.client_config(&id("web"), id("db")), Err(IdentityError::NoCertificate { .. })));
    assert!(m1.server_config(&id("api")).is_ok());
    assert_eq!(m1.certs().iter().map(|c| c.identity.clone()).collect::<Vec<_>>(), vec![id("api")]);
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused() {
    let root = root();
    let (m1, m2) = two_nodes(&root, DAY).await;
    // web expects api behind this address, but db answers (a stale endpoint, or an impostor).
    let (c, s) =
        handshake(m1.client_config(&id("web"), id("api")).unwrap(), m2.server_config(&id("db")).unwrap())
            .await;
    let err = c.expect_err("client must refuse");
    assert_eq!(
        verify_error(&err),
        Some(&VerifyError::WrongIdentity { presented: Box::new(id("db")), expected: Box::new(id("api")) })
    );
    assert!(
        err.to_string()
            .contains("peer presented spiffe://cluster.local/ns/shop/sa/db, expected spiffe://cluster.local/ns/shop/sa/api"),
        "{err}"
    );
    assert!(s.is_err(), "the server sees the client's alert");
}

#[tokio::test]
async fn certificates_from_another_ca_are_refused_both_ways() {
    // Both roots are "sluice mesh root" of cluster.local: only the key differs.
    let good = root();
    let evil = root();
    let (m1, m2) = two_nodes(&good, DAY).await;
    let (e1, e2) = two_nodes(&evil, DAY).await;

    // The right identity, from the wrong CA, as a server.
    let (c, _) =
        handshake(m1.client_config(&id("web"), id("db")).unwrap(), e2.server_config(&id("db")).unwrap())
            .await;
    let err = c.expect_err("client must refuse");
    assert!(matches!(verify_error(&err), Some(VerifyError::NotIssuedByMeshCa { .. })), "{err:?}");
    assert!(err.to_string().contains("certificate not issued by the mesh CA"), "{err}");

    // ... and as a client (which itself trusts the real server).
    let impostor = client_with(&m1, id("db"), e1.store.current(&id("web")));
    let (c, s) = handshake(impostor, m2.server_config(&id("db")).unwrap()).await;
    assert!(c.is_ok(), "TLS 1.3 clients finish before the server judges their certificate");
    let err = s.expect_err("server must refuse");
    assert!(matches!(verify_error(&err), Some(VerifyError::NotIssuedByMeshCa { .. })), "{err:?}");
    assert!(err.to_string().contains("certificate not issued by the mesh CA"), "{err}");
}

#[tokio::test]
async fn expired_certificates_are_refused_with_their_expiry() {
    let root = root();
    let (m1, m2) = two_nodes(&root, DAY).await;
    let (expired, not_after) = expired_cert(&root, &id("db"));
    let want = format!("certificate expired at {}", x509::rfc3339(not_after));

    // An expired server.
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(expired.clone())));
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    let (c, _) = handshake(m1.client_config(&id("web"), id("db")).unwrap(), Arc::new(server)).await;
    let err = c.expect_err("client must refuse");
    assert!(matches!(verify_error(&err), Some(VerifyError::Expired { .. })), "{err:?}");
    assert!(err.to_string().contains(&want), "{err} (wanted {want})");

    // An expired client.
    let (expired_web, not_after) = expired_cert(&root, &id("web"));
    let (_, s) =
        handshake(client_with(&m1, id("db"), Some(expired_web)), m2.server_config(&id("db")).unwrap()).await;
    let err = s.expect_err("server must refuse");
    assert!(
        err.to_string().contains(&format!("certificate expired at {}", x509::rfc3339(not_after))),
        "{err}"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let root = root();
    let (m1, m2) = two_nodes(&root, DAY).await;
    let (_, s) = handshake(client_with(&m1, id("db"), None), m2.server_config(&id("db")).unwrap()).await;
    let err = s.expect_err("server must refuse");
    assert_eq!(tls_error(&err), &rustls::Error::NoCertificatesPresented);
    assert!(err.to_string().contains("peer sent no certificates"), "{err}");
}

#[tokio::test]
async fn a_client_of_another_trust_domain_is_refused() {
    // Signed by the mesh root, but naming another trust domain (as with a root shared by two
    // meshes): the chain verifies, the identity does not belong here.
    let root = root();
    let (_, m2) = two_nodes(&root, DAY).await;
    let issuer =
        Issuer::from_ca_cert_pem(&read(&root.cert), KeyPair::from_pem(&read(&root.key)).unwrap()).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let foreign = SpiffeId::new("other.example", "shop", "web");
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(foreign.to_string().as_str().try_into().unwrap())];
    params.not_before = OffsetDateTime::now_utc() - Duration::from_secs(60);
    params.not_after = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = Arc::new(CertifiedKey::from_der(vec![cert.der().clone()], key_der, &provider()).unwrap());

    let (_, s) =
        handshake(client_with(&m2, id("db"), Some(certified)), m2.server_config(&id("db")).unwrap()).await;
    let err = s.expect_err("server must refuse");
    assert!(err.to_string().contains("outside the mesh trust domain \"cluster.local\""), "{err}");
}
