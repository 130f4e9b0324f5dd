//! The trust bundle from a file and root rotation: a bad file keeps the last good bundle, a
//! change reaches the verifiers without a signing, and the certificates that do not lead to the
//! bundle's first root are re-issued (spread over the rotation window) until they do, while
//! sessions established before keep working.

use std::time::Instant;

use time::OffsetDateTime;

use super::fake_ca::*;
use super::*;

/// Calls `check` every 10 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

fn fast_rotation() -> CertManagerConfig {
    CertManagerConfig {
        rotation_spread: Duration::from_millis(800),
        untrusted_spread: Duration::from_millis(200),
        misrooted_retry: Duration::from_millis(100),
        misrooted_max: Duration::from_millis(400),
        ..CertManagerConfig::default()
    }
}

fn remote_manager(
    node: &str,
    fake: &FakeCa,
    bundle: &Arc<TrustBundleFile>,
    token: &Path,
    config: CertManagerConfig,
) -> Arc<CertManager> {
    let ca = client(&fake.url(), bundle, token, None, Duration::from_secs(5)).unwrap();
    Arc::new(CertManager::new(node, TD, Arc::new(ca), config).unwrap())
}

/// The root subject each certificate of `m` leads to, if it is the bundle's first root.
fn roots_of(m: &CertManager) -> Vec<(Option<usize>, String)> {
    m.certs()
        .iter()
        .map(|c| (c.root_index, c.chain.last().map(|r| r.subject.clone()).unwrap_or_default()))
        .collect()
}

fn all_under(m: &CertManager, root: &str) -> bool {
    let roots = roots_of(m);
    !roots.is_empty() && roots.iter().all(|(i, subject)| *i == Some(0) && subject == root)
}

#[tokio::test]
async fn a_bad_bundle_file_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Authority::root("root A"), Authority::root("root B"));
    let path = write_bundle(dir.path(), &[&a]);
    let bundle = TrustBundleFile::load(&path).unwrap();
    assert_eq!(bundle.reload(), Reload::Unchanged);

    let leaf_pem = {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap().self_signed(&key).unwrap().pem()
    };
    let key_pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
    for (content, why) in [
        ("garbage".to_string(), "no certificate"),
        (String::new(), "no certificate"),
        (format!("{}{key_pem}", a.pem), "private key"),
        (leaf_pem, "not a CA certificate"),
        ("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".to_string(), "PEM"),
    ] {
        std::fs::write(&path, &content).unwrap();
        match bundle.reload() {
            Reload::Kept { error } => assert!(error.contains(why), "{why}: {error}"),
            other => panic!("{why}: {other:?}"),
        }
        assert_eq!(bundle.certs(), vec![a.der.clone()], "the last good bundle stays in force");
        assert!(bundle.status().1.is_some_and(|e| e.contains(why)));
        // Read again unchanged: still reported, not re-parsed.
        assert!(matches!(bundle.reload(), Reload::Kept { .. }));
    }
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(bundle.reload(), Reload::Kept { error } if error.contains("opening")));

    write_bundle(dir.path(), &[&b, &a]);
    assert_eq!(bundle.reload(), Reload::Changed { roots: 2 });
    assert_eq!(bundle.certs(), vec![b.der.clone(), a.der.clone()], "in the file's order");
    assert_eq!(bundle.status().1, None);

    // The poller sees a change on its own.
    let _poller = bundle.spawn_poller(Duration::from_millis(20)).unwrap();
    let mut changes = bundle.subscribe();
    write_bundle(dir.path(), &[&b]);
    tokio::time::timeout(Duration::from_secs(5), changes.changed()).await.expect("change seen").unwrap();
    assert_eq!(bundle.certs(), vec![b.der.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_change_reaches_the_verifiers_without_a_signing() {
    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let (a, b) = (Authority::root("root A"), Authority::root("root B"));
    let (ia, ib) = (Arc::new(a.intermediate("A signing")), Arc::new(b.intermediate("B signing")));
    // Node 1 trusts A only; node 2's CA already signs under B, and node 2 trusts both.
    let bundle1 = TrustBundleFile::load(&write_bundle(dir1.path(), &[&a])).unwrap();
    let bundle2 = TrustBundleFile::load(&write_bundle(dir2.path(), &[&b, &a])).unwrap();
    let token = write_token(dir1.path(), "t");
    let ca1 = FakeCa::start(&ia, &["127.0.0.1"], ia.clone()).await;
    let ca2 = FakeCa::start(&ib, &["127.0.0.1"], ib.clone()).await;
    let m1 = remote_manager("node-1", &ca1, &bundle1, &token, fast_rotation());
    let m2 = remote_manager("node-2", &ca2, &bundle2, &token, fast_rotation());
    let rotation = m1.spawn_rotation(&tokio::runtime::Handle::current());
    m1.ensure(&id("web")).await.unwrap();
    m2.ensure(&id("db")).await.unwrap();

    let server = m1.server_config(&id("web")).unwrap();
    let (c, s) = handshake(m2.client_config(&id("db"), id("web")).unwrap(), server.clone()).await;
    // (TLS 1.3: the client is done before the server has checked its certificate.)
    let _ = c;
    assert!(s.is_err(), "node 1 does not trust B yet");
    let refused = s.unwrap_err();
    assert!(matches!(verify_error(&refused), Some(VerifyError::NotIssuedByMeshCa { .. })), "{refused:?}");

    write_bundle(dir1.path(), &[&a, &b]);
    assert_eq!(bundle1.reload(), Reload::Changed { roots: 2 });
    assert!(eventually(Duration::from_secs(5), || m1.bundle_view().roots.len() == 2).await);
    // The same (cached) server configuration now accepts B, with no signing in between.
    assert!(Arc::ptr_eq(&server, &m1.server_config(&id("web")).unwrap()));
    let (c, s) = handshake(m2.client_config(&id("db"), id("web")).unwrap(), server).await;
    assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    assert_eq!(ca1.requests().len(), 1, "no signing was needed");
    // A is still node 1's first root: its certificate stays, nothing is re-issued.
    let web = m1.certs().pop().unwrap();
    assert_eq!(web.root_index, Some(0));
    assert_eq!(m1.bundle_view().certificates_per_root, vec![1, 0]);
    rotation.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_reissues_under_the_new_root_and_keeps_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Authority::root("root A"), Authority::root("root B"));
    let (ia, ib) = (Arc::new(a.intermediate("A signing")), Arc::new(b.intermediate("B signing")));
    let bundle = TrustBundleFile::load(&write_bundle(dir.path(), &[&a])).unwrap();
    let token = write_token(dir.path(), "t");
    // One CA service (its serving certificate under A, trusted throughout steps 1 and 2).
    let ca = FakeCa::start(&ia, &["127.0.0.1"], ia.clone()).await;
    let m1 = remote_manager("node-1", &ca, &bundle, &token, fast_rotation());
    let m2 = remote_manager("node-2", &ca, &bundle, &token, fast_rotation());
    let rt = tokio::runtime::Handle::current();
    let rotations = [m1.spawn_rotation(&rt), m2.spawn_rotation(&rt)];
    for identity in ["web", "api"] {
        m1.ensure(&id(identity)).await.unwrap();
    }
    m2.ensure(&id("db")).await.unwrap();
    assert!(all_under(&m1, "CN=root A") && all_under(&m2, "CN=root A"));
    let (c, s) =
        handshake(m1.client_config(&id("web"), id("db")).unwrap(), m2.server_config(&id("db")).unwrap())
            .await;
    let (mut old_c, mut old_s) = (c.unwrap(), s.unwrap());
    exchange(&mut old_c, &mut old_s, b"before the rotation").await;

    // Step 1: both roots trusted, A first. Nothing is re-issued.
    write_bundle(dir.path(), &[&a, &b]);
    bundle.reload();
    assert!(
        eventually(Duration::from_secs(5), || m1.bundle_view().roots.len() == 2
            && m2.bundle_view().roots.len() == 2)
        .await
    );
    assert!(all_under(&m1, "CN=root A"), "{:?}", m1.certs());
    let requests_after_step1 = ca.requests().len();

    // Step 2: the CA signs under B, the bundle says so: [B, A]. Every certificate is re-issued
    // under B within the rotation window.
    ca.sign_with(ib.clone());
    write_bundle(dir.path(), &[&b, &a]);
    let changed_at = Instant::now();
    bundle.reload();
    assert!(
        eventually(Duration::from_secs(5), || all_under(&m1, "CN=root B") && all_under(&m2, "CN=root B"))
            .await,
        "{:?} {:?}",
        m1.certs(),
        m2.certs()
    );
    let took = changed_at.elapsed();
    assert!(
        took < Duration::from_millis(800) + Duration::from_secs(2),
        "re-issued within the window: {took:?}"
    );
    assert_eq!(ca.requests().len(), requests_after_step1 + 3, "one re-issuance per identity");
    assert_eq!(m1.bundle_view().certificates_per_root, vec![2, 0], "the rotation's progress");
    // The session from before is untouched, and new handshakes work under B.
    exchange(&mut old_c, &mut old_s, b"during the rotation").await;
    let (c, s) =
        handshake(m1.client_config(&id("web"), id("db")).unwrap(), m2.server_config(&id("db")).unwrap())
            .await;
    assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");

    // Step 3: A retired.
    write_bundle(dir.path(), &[&b]);
    bundle.reload();
    assert!(eventually(Duration::from_secs(5), || m1.bundle_view().roots.len() == 1).await);
    assert_eq!(m1.bundle_view().certificates_per_root, vec![2]);
    assert_eq!(m1.bundle_view().certificates_untrusted, 0);
    let (c, s) =
        handshake(m1.client_config(&id("web"), id("db")).unwrap(), m2.server_config(&id("db")).unwrap())
            .await;
    assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    exchange(&mut old_c, &mut old_s, b"after the rotation").await;
    for r in rotations {
        r.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reissues_until_the_ca_signs_under_the_first_root() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Authority::root("root A"), Authority::root("root B"));
    let (ia, ib) = (Arc::new(a.intermediate("A signing")), Arc::new(b.intermediate("B signing")));
    let bundle = TrustBundleFile::load(&write_bundle(dir.path(), &[&a])).unwrap();
    let token = write_token(dir.path(), "t");
    let ca = FakeCa::start(&ia, &["127.0.0.1"], ia.clone()).await;
    let m = remote_manager("node-1", &ca, &bundle, &token, fast_rotation());
    let rotation = m.spawn_rotation(&tokio::runtime::Handle::current());
    m.ensure(&id("web")).await.unwrap();

    // The bundle moves to B first, but the CA still signs under A.
    write_bundle(dir.path(), &[&b, &a]);
    bundle.reload();
    assert!(
        eventually(Duration::from_secs(5), || ca.requests().len() >= 3).await,
        "asked again and again: {} requests",
        ca.requests().len()
    );
    let web = m.certs().pop().unwrap();
    assert_eq!(web.root_index, Some(1), "{web:?}");
    assert!(web.last_error.as_deref().unwrap_or_default().contains("not its first root"), "{web:?}");

    // Once the CA signs under B, the next attempt lands under B and stays.
    ca.sign_with(ib);
    assert!(eventually(Duration::from_secs(5), || all_under(&m, "CN=root B")).await, "{:?}", m.certs());
    let web = m.certs().pop().unwrap();
    assert_eq!(web.last_error, None);
    // Renewal is back at half-life (an hour's certificate: half an hour away).
    let next = OffsetDateTime::parse(
        web.next_renewal.as_deref().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(next - OffsetDateTime::now_utc() > time::Duration::minutes(20), "{web:?}");
    rotation.abort();
}

/// Review finding 8: a bundle whose first root the CA never signs under made every identity
/// ask again every ≤ 60 s forever. After `misrooted_attempts` answers in a row under another
/// root, the node stops asking early, renews at the normal time, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_reasking_a_ca_that_never_signs_under_the_first_root() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Authority::root("root A"), Authority::root("root B"));
    let ia = Arc::new(a.intermediate("A signing"));
    let bundle = TrustBundleFile::load(&write_bundle(dir.path(), &[&a])).unwrap();
    let token = write_token(dir.path(), "t");
    let ca = FakeCa::start(&ia, &["127.0.0.1"], ia.clone()).await;
    let config = CertManagerConfig { misrooted_attempts: 3, ..fast_rotation() };
    let m = remote_manager("node-1", &ca, &bundle, &token, config);
    let rotation = m.spawn_rotation(&tokio::runtime::Handle::current());
    m.ensure(&id("web")).await.unwrap();

    // B first, but the CA only ever signs under A.
    write_bundle(dir.path(), &[&b, &a]);
    bundle.reload();
    let gave_up = || {
        m.certs()
            .pop()
            .is_some_and(|c| c.last_error.as_deref().unwrap_or_default().contains("not asking again"))
    };
    assert!(eventually(Duration::from_secs(10), gave_up).await, "{:?}", m.certs());
    // The first issuance, then 3 + 1 answers under A.
    assert_eq!(ca.requests().len(), 5);
    let web = m.certs().pop().unwrap();
    assert!(web.last_error.as_deref().unwrap().contains("4 times in a row under root #2"), "{web:?}");
    let next = OffsetDateTime::parse(
        web.next_renewal.as_deref().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(next - OffsetDateTime::now_utc() > time::Duration::minutes(20), "back to half-life: {web:?}");
    // Nothing more for several times the longest re-asking delay (400 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ca.requests().len(), 5, "asked again after giving up");

    // A new bundle starts asking early again.
    write_bundle(dir.path(), &[&b, &a, &Authority::root("root C")]);
    bundle.reload();
    assert!(eventually(Duration::from_secs(5), || ca.requests().len() > 5).await, "a new bundle re-asks");
    rotation.abort();
}
