//! The remote CA client against an in-process CA service (gRPC over TLS on loopback): what a
//! request carries, how the CA's statuses map to errors, the deadline, the checks of the chain
//! that comes back, and the verification of the CA's own certificate.

use std::collections::HashMap;
use std::time::Instant;

use rcgen::CertificateSigningRequestParams;
use tonic::Code;

use super::fake_ca::*;
use super::*;

/// Root → intermediate (signs workloads and the CA's serving certificate), like a CA service
/// under an offline root.
struct Setup {
    dir: tempfile::TempDir,
    root: Authority,
    intermediate: Arc<Authority>,
    bundle: Arc<TrustBundleFile>,
    token: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = Authority::root("test mesh root A");
    let intermediate = Arc::new(root.intermediate("test sluice-ca intermediate"));
    let bundle = TrustBundleFile::load(&fake_ca::write_bundle(dir.path(), &[&root])).expect("bundle loads");
    let token = write_token(dir.path(), "token-one");
    Setup { dir, root, intermediate, bundle, token }
}

async fn manager_of(ca: RemoteCa) -> Arc<CertManager> {
    Arc::new(CertManager::new("node-1", TD, Arc::new(ca), CertManagerConfig::default()).unwrap())
}

fn ca_error(e: IdentityError) -> CaError {
    match e {
        IdentityError::Ca(e) => e,
        other => panic!("not a CA error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_the_csr_token_and_identity_as_the_contract_says() {
    let s = setup();
    let fake = FakeCa::start(&s.intermediate, &["127.0.0.1"], s.intermediate.clone()).await;
    let m = manager_of(client(&fake.url(), &s.bundle, &s.token, None, Duration::from_secs(5)).unwrap()).await;

    m.ensure(&id("web")).await.expect("issued");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.authorization.as_deref(), Some("Bearer token-one"), "the token, trimmed, as a bearer");
    assert_eq!(r.impersonated.as_deref(), Some(id("web").to_string().as_str()));
    assert_eq!(r.validity, 3600, "the lifetime asked for, in seconds");
    assert!(r.grpc_timeout.is_some(), "a deadline travels with the call");
    // The CSR is PEM, for a P-256 key, naming the identity as its only SAN.
    assert!(r.csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{}", r.csr);
    let csr =
        CertificateSigningRequestParams::from_pem(&r.csr).expect("the CSR parses and its signature verifies");
    assert_eq!(
        csr.params.subject_alt_names,
        vec![rcgen::SanType::URI(id("web").to_string().as_str().try_into().unwrap())]
    );

    // The certificate held: the leaf and the intermediate; the root is the bundle's own.
    let view = m.certs().pop().unwrap();
    assert_eq!(view.state, CertState::Ready);
    assert_eq!(view.root_index, Some(0));
    let subjects: Vec<&str> = view.chain.iter().map(|c| c.subject.as_str()).collect();
    assert_eq!(subjects, ["CN=test sluice-ca intermediate", "CN=test mesh root A"], "{view:?}");
    assert!(view.chain[1].root && !view.chain[0].root);

    // The kubelet rotates the token: the next request sends the new one.
    write_token(s.dir.path(), "token-two");
    m.ensure(&id("api")).await.expect("issued");
    assert_eq!(fake.requests()[1].authorization.as_deref(), Some("Bearer token-two"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cas_statuses_become_errors_the_manager_acts_on() {
    let s = setup();
    let fake = FakeCa::start(&s.intermediate, &["127.0.0.1"], s.intermediate.clone()).await;
    let m = manager_of(client(&fake.url(), &s.bundle, &s.token, None, Duration::from_secs(5)).unwrap()).await;
    let why = "no running pod with service account shop/web is scheduled on node node-1";

    fake.script(Behaviour::Refuse(Code::PermissionDenied, why.into()));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::NotAuthorized { reason, .. } if reason == why), "{e:?}");
    assert!(e.is_refusal() && e.to_string().contains(why), "{e}");

    fake.script(Behaviour::Refuse(Code::InvalidArgument, "the CSR asks for the DNS name x".into()));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::InvalidCsr { reason, .. } if reason.contains("DNS name x")), "{e:?}");

    fake.script(Behaviour::Refuse(Code::Unauthenticated, "token expired".into()));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::Unauthenticated { reason, .. } if reason == "token expired"), "{e:?}");
    assert!(e.to_string().contains("--ca-token-file"), "says what to check: {e}");

    fake.script(Behaviour::RateLimit(1500));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::RateLimited { .. }), "{e:?}");
    assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));

    fake.script(Behaviour::Refuse(Code::Unavailable, "the pod watch has not synced yet".into()));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::Unreachable { reason, .. } if reason.contains("not synced")), "{e:?}");

    fake.script(Behaviour::Refuse(Code::Internal, "signing key unreadable".into()));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::Remote { code, .. } if code == "INTERNAL"), "{e:?}");

    // And with the CA answering again, the same identity is issued.
    m.ensure(&id("web")).await.expect("issued once the CA signs");
    let ca_counters: HashMap<&str, u64> = m.ca_counters().into_iter().collect();
    assert_eq!(ca_counters["ca_requests"], 7);
    assert_eq!(ca_counters["ca_issued"], 1);
    assert_eq!(ca_counters["ca_rate_limited"], 1);
    assert_eq!(ca_counters["ca_unreachable"], 1);
    assert_eq!(ca_counters["ca_refused"], 4);
}

/// Review finding 7: a `retry-after-ms` of 12 700 years from the wire comes out as a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_from_the_ca_is_capped() {
    let s = setup();
    let fake = FakeCa::start(&s.intermediate, &["127.0.0.1"], s.intermediate.clone()).await;
    let m = manager_of(client(&fake.url(), &s.bundle, &s.token, None, Duration::from_secs(5)).unwrap()).await;
    fake.script(Behaviour::RateLimit(400_000_000_000_000));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert_eq!(e.retry_after(), Some(crate::identity::remote_ca::MAX_RETRY_AFTER), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_ca_fails_at_the_call_deadline() {
    let s = setup();
    let fake = FakeCa::start(&s.intermediate, &["127.0.0.1"], s.intermediate.clone()).await;
    fake.set_default(Behaviour::Hang);
    let ca = client(&fake.url(), &s.bundle, &s.token, None, Duration::from_millis(300)).unwrap();
    let m = manager_of(ca).await;
    let started = Instant::now();
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    let took = started.elapsed();
    assert!(matches!(e, CaError::Unreachable { .. }), "{e:?}");
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_is_reported_as_such() {
    let s = setup();
    // A port nobody listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ca = client(&format!("https://127.0.0.1:{port}"), &s.bundle, &s.token, None, Duration::from_secs(2))
        .unwrap();
    let m = manager_of(ca).await;
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(
        matches!(&e, CaError::Unreachable { reason, .. } if reason.to_lowercase().contains("refused")),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_peers_would_refuse_are_never_installed() {
    let s = setup();
    let fake = FakeCa::start(&s.intermediate, &["127.0.0.1"], s.intermediate.clone()).await;
    let m = manager_of(client(&fake.url(), &s.bundle, &s.token, None, Duration::from_secs(5)).unwrap()).await;

    fake.script(Behaviour::SignAs(id("db").to_string()));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::BadResponse { reason, .. } if reason.contains("sa/db")), "{e:?}");

    fake.script(Behaviour::SignWithExtraDns);
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::BadResponse { reason, .. } if reason.contains("web.shop.svc")), "{e:?}");

    // A CA signing under a root the bundle does not hold (e.g. switched to the new root before
    // the nodes' bundle has it).
    let other = Authority::root("test mesh root B");
    fake.sign_with(Arc::new(other.intermediate("B intermediate")));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(
        matches!(&e, CaError::BadResponse { reason, .. } if reason.contains("test mesh root B") && reason.contains("not in the trust bundle")),
        "{e:?}"
    );
    // The same root signing directly (no intermediate): refused the same way.
    fake.sign_with(Arc::new(other));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(
        matches!(&e, CaError::BadResponse { reason, .. } if reason.contains("not in the trust bundle")),
        "{e:?}"
    );
    assert!(m.certs().is_empty(), "nothing installed: {:?}", m.certs());
    let bad = m.ca_counters().into_iter().find(|(n, _)| *n == "ca_bad_responses").unwrap().1;
    assert_eq!(bad, 4);
}

/// Review finding 13: a certificate valid longer than the node asked for (+ 5 min of margin) is
/// refused, the key dropped; one within the margin, or shorter, is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_valid_longer_than_asked_is_refused() {
    let s = setup();
    let fake = FakeCa::start(&s.intermediate, &["127.0.0.1"], s.intermediate.clone()).await;
    let m = manager_of(client(&fake.url(), &s.bundle, &s.token, None, Duration::from_secs(5)).unwrap()).await;
    let asked = fake_requested_lifetime();
    fake.script(Behaviour::SignFor(asked + 3600));
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(
        matches!(&e, CaError::BadResponse { reason, .. } if reason.contains("longer than the") && reason.contains("asked for")),
        "{e:?}"
    );
    assert!(m.certs().is_empty(), "nothing installed: {:?}", m.certs());
    fake.script(Behaviour::SignFor(asked + 60));
    m.ensure(&id("web")).await.expect("within the margin");
    fake.script(Behaviour::SignFor(600));
    m.ensure(&id("api")).await.expect("shorter than asked is the CA's right");
}

/// The lifetime the test client (`fake_ca::client`) asks for.
fn fake_requested_lifetime() -> i64 {
    3600
}

#[test]
fn the_lifetime_check_does_not_overflow() {
    use crate::identity::remote_ca::check_lifetime;
    let now = time::OffsetDateTime::now_utc();
    let far = time::OffsetDateTime::new_utc(time::Date::MAX, time::Time::MIDNIGHT);
    assert!(check_lifetime(far, now, Duration::from_secs(3600)).is_err());
    assert!(check_lifetime(far, now, Duration::MAX).is_ok());
    assert!(check_lifetime(now, now, Duration::ZERO).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cas_own_certificate_is_verified_against_the_bundle_and_name() {
    let s = setup();
    // The CA serves a certificate for its Service name; the node dials its IP.
    let fake = FakeCa::start(&s.intermediate, &["sluice-ca.sluice-system.svc"], s.intermediate.clone()).await;
    let m = manager_of(client(&fake.url(), &s.bundle, &s.token, None, Duration::from_secs(5)).unwrap()).await;
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(
        matches!(&e, CaError::Unreachable { reason, .. } if reason.contains("not valid for name") && reason.contains("--ca-server-name")),
        "the name does not match: {e:?}"
    );
    assert!(fake.requests().is_empty(), "no request reached a CA that was not verified");
    // --ca-server-name names what the certificate must carry.
    let named =
        client(&fake.url(), &s.bundle, &s.token, Some("sluice-ca.sluice-system.svc"), Duration::from_secs(5));
    manager_of(named.unwrap()).await.ensure(&id("web")).await.expect("verified by name");

    // A CA whose certificate another root issued is refused, whatever its name.
    let impostor_root = Authority::root("impostor");
    let impostor = FakeCa::start(&impostor_root, &["127.0.0.1"], s.intermediate.clone()).await;
    let m =
        manager_of(client(&impostor.url(), &s.bundle, &s.token, None, Duration::from_secs(5)).unwrap()).await;
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::Unreachable { reason, .. } if reason.contains("certificate")), "{e:?}");
    assert!(impostor.requests().is_empty(), "the token never went to an unverified server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_says_what_to_mount() {
    let s = setup();
    let fake = FakeCa::start(&s.intermediate, &["127.0.0.1"], s.intermediate.clone()).await;
    let missing = s.dir.path().join("no-token");
    let m = manager_of(client(&fake.url(), &s.bundle, &missing, None, Duration::from_secs(5)).unwrap()).await;
    let e = ca_error(m.ensure(&id("web")).await.unwrap_err());
    assert!(matches!(&e, CaError::Credential { .. }), "{e:?}");
    assert!(e.to_string().contains("projected ServiceAccount token"), "{e}");
    assert!(fake.requests().is_empty());
    let _ = &s.root;
}

#[tokio::test]
async fn the_ca_address_is_checked_at_start() {
    let s = setup();
    for (addr, why) in [
        ("http://ca:15012", "https"),
        ("https://ca", "port"),
        ("https://ca:15012/path", "path"),
        ("not a url", "URL"),
    ] {
        let e = client(addr, &s.bundle, &s.token, None, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains(why), "{addr}: {e}");
    }
    // IPv6 hosts are verified without their brackets.
    client("https://[::1]:15012", &s.bundle, &s.token, None, Duration::from_secs(1)).expect("IPv6 literal");
}
