use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::*;

/// Calls `check` every 10 ms until it yields something or `limit` passes.
async fn poll<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn serial_of_peer(conn: &rustls::CommonState) -> String {
    x509::leaf_info(&conn.peer_certificates().expect("peer certificate")[0]).unwrap().serial_hex
}

fn only_cert(m: &CertManager) -> CertView {
    let mut certs = m.certs();
    assert_eq!(certs.len(), 1, "{certs:?}");
    certs.remove(0)
}

fn parse_time(s: &Option<String>) -> OffsetDateTime {
    let s = s.as_deref().expect("a time");
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renews_at_half_life_without_disturbing_sessions() {
    let root = root();
    let (m1, m2) = two_nodes(&root, Duration::from_secs(2)).await;
    let issued_at = Instant::now();
    let rt = tokio::runtime::Handle::current();
    let rotations = [m1.spawn_rotation(&rt), m2.spawn_rotation(&rt)];
    let first = only_cert(&m1);
    let next = parse_time(&first.next_renewal) - OffsetDateTime::now_utc();
    assert!(
        next > time::Duration::milliseconds(600) && next < time::Duration::milliseconds(1600),
        "{first:?}"
    );

    let client_cfg = m1.client_config(&id("web"), id("db")).unwrap();
    let server_cfg = m2.server_config(&id("db")).unwrap();
    let (c, s) = handshake(client_cfg.clone(), server_cfg.clone()).await;
    let (mut old_c, mut old_s) = (c.expect("client"), s.expect("server"));
    assert_eq!(Some(serial_of_peer(old_s.get_ref().1)), first.serial);
    exchange(&mut old_c, &mut old_s, b"before rotation").await;

    let renewed = poll(Duration::from_secs(5), || Some(only_cert(&m1)).filter(|v| v.serial != first.serial))
        .await
        .expect("renewed within 5 s");
    let took = issued_at.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took <= Duration::from_millis(1900),
        "renewed after {took:?}"
    );
    assert_eq!(renewed.renewal_failures, 0);
    assert!(parse_time(&renewed.not_after) > parse_time(&first.not_after));

    // A new handshake, through the very same configurations, presents the new certificate.
    assert!(Arc::ptr_eq(&client_cfg, &m1.client_config(&id("web"), id("db")).unwrap()), "no rebuild");
    let (c, s) = handshake(client_cfg.clone(), server_cfg.clone()).await;
    let (mut new_c, mut new_s) = (c.expect("client after rotation"), s.expect("server after rotation"));
    assert_eq!(Some(serial_of_peer(new_s.get_ref().1)), renewed.serial);
    exchange(&mut new_c, &mut new_s, b"after rotation").await;

    // The session from before keeps working, even once its certificates have expired.
    exchange(&mut old_c, &mut old_s, b"old session after rotation").await;
    let old_expiry = parse_time(&first.not_after);
    poll(Duration::from_secs(5), || (OffsetDateTime::now_utc() > old_expiry).then_some(())).await.unwrap();
    exchange(&mut old_c, &mut old_s, b"old session after its certificate expired").await;
    // And rotation went on: new connections still succeed.
    let (c, s) = handshake(client_cfg, server_cfg).await;
    assert!(c.is_ok() && s.is_ok(), "handshake after the first certificates expired: {c:?} {s:?}");

    for r in rotations {
        r.abort();
    }
}

/// An embedded CA that can be switched off: a CA outage.
struct FlakyCa {
    inner: EmbeddedCa,
    down: AtomicBool,
}

impl CertificateAuthority for FlakyCa {
    fn sign(&self, req: SignRequest) -> SignFuture<'_> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(CaError::Signing {
                identity: req.identity,
                reason: "CA unreachable (test)".into(),
            })));
        }
        self.inner.sign(req)
    }

    fn trust_bundle(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.inner.trust_bundle()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_renewals_retry_with_backoff_and_keep_the_current_certificate() {
    let root = root();
    let ca =
        Arc::new(FlakyCa { inner: embedded_ca(&root, "node-1", Duration::from_secs(2)), down: false.into() });
    let config =
        CertManagerConfig { retry_initial: Duration::from_millis(100), ..CertManagerConfig::default() };
    let m1 = Arc::new(CertManager::new("node-1", TD, ca.clone(), config).unwrap());
    m1.ensure(&id("web")).await.unwrap();
    let first = only_cert(&m1);
    ca.down.store(true, Ordering::SeqCst);
    let rotation = m1.spawn_rotation(&tokio::runtime::Handle::current());

    let failing = poll(Duration::from_secs(5), || Some(only_cert(&m1)).filter(|v| v.renewal_failures >= 2))
        .await
        .expect("two failed renewals");
    assert_eq!(failing.serial, first.serial, "the current certificate stays until a new one is in");
    assert!(
        failing.last_error.as_deref().unwrap_or_default().contains("CA unreachable (test)"),
        "{failing:?}"
    );
    assert!(m1.client_config(&id("web"), id("db")).is_ok(), "still usable while renewal fails");

    ca.down.store(false, Ordering::SeqCst);
    let renewed = poll(Duration::from_secs(5), || Some(only_cert(&m1)).filter(|v| v.serial != first.serial))
        .await
        .expect("renewed once the CA is back");
    assert_eq!(renewed.renewal_failures, 0);
    assert_eq!(renewed.last_error, None);
    rotation.abort();
}

#[tokio::test]
async fn cert_views_serialize_for_the_admin_api() {
    let root = root();
    let m = manager(&root, "node-1", Duration::from_secs(3600));
    m.ensure(&id("web")).await.unwrap();
    m.ensure(&id("api")).await.unwrap();
    let certs = m.certs();
    assert_eq!(certs.iter().map(|c| c.identity.clone()).collect::<Vec<_>>(), vec![id("api"), id("web")]);
    let json = serde_json::to_value(&certs).unwrap();
    let first = &json[0];
    assert_eq!(first["identity"], "spiffe://cluster.local/ns/shop/sa/api");
    assert!(first["serial"].as_str().unwrap().chars().all(|c| c.is_ascii_hexdigit()));
    assert!(first.get("last_error").is_none());
    let back: Vec<CertView> = serde_json::from_value(json).unwrap();
    assert_eq!(back, certs);
    // Renewal is planned at about half of the hour.
    let v = &certs[0];
    let to_renewal = parse_time(&v.next_renewal) - OffsetDateTime::now_utc();
    assert!(to_renewal > time::Duration::minutes(26) && to_renewal <= time::Duration::minutes(31), "{v:?}");
}
