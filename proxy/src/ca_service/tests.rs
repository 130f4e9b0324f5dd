//! In-process end to end: the real gRPC server on loopback with a test PKI and a fake token
//! reviewer, called with tonic's client over TLS (verifying the CA's serving certificate
//! against the bundle), as a node agent would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Code, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::authn::tests::{node_agent, FakeReviewer};
use super::authn::{CachedReviewer, ReviewError, ReviewLimits, Reviewed};
use super::claims::tests::{jwt, node_agent_claims};
use super::limits::RateConfig;
use super::metrics::CaMetrics;
use super::pods::{test_agent_pod as agent_pod, test_pod as pod, PodIndex, PodStore};
use super::policy::PolicyConfig;
use super::refusal::RETRY_AFTER_MS;
use super::reload::{Reload, SigningState};
use super::server::{self, CaService, ServerLimits, ServiceConfig};
use super::signer::tests::{new_root, TestPki};
use super::signer::{pem, SERVING_LIFETIME};
use crate::identity::istio_ca::{IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH};

const SERVER_NAME: &str = "sluice-ca.sluice-system.svc";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

fn cluster() -> Vec<super::pods::PodRecord> {
    vec![
        pod("shop", "web-1", "web", Some("n1"), "Running"),
        pod("shop", "db-1", "db", Some("n2"), "Running"),
        pod("shop", "migrate-1", "migrate", Some("n1"), "Succeeded"),
        agent_pod("sluice-system", "sluice-a", "n1"),
        agent_pod("sluice-system", "sluice-b", "n2"),
    ]
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A token named `name`: a JWT whose claims are a node agent's (audience, subject, an hour
/// left), so that it passes the CA's look at its claims and reaches the (fake) TokenReview,
/// which answers by name. `tweak` changes the claims.
fn token_with(name: &str, tweak: impl FnOnce(&mut serde_json::Value)) -> String {
    // One expiry for the whole run: the same name is the same token (the fake API server
    // knows tokens by their text).
    static EXP: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let mut claims = node_agent_claims(*EXP.get_or_init(|| unix_now() + 3600));
    claims["jti"] = serde_json::json!(name);
    tweak(&mut claims);
    jwt(claims)
}

fn token(name: &str) -> String {
    token_with(name, |_| {})
}

fn tokens() -> Vec<(String, Result<Reviewed, ReviewError>)> {
    let mut web = node_agent(Some("n1"), None);
    web.username = "system:serviceaccount:shop:web".into();
    vec![
        (token("n1"), Ok(node_agent(Some("n1"), Some("sluice-a")))),
        (token("n2"), Ok(node_agent(Some("n2"), Some("sluice-b")))),
        (token("bound-to-sluice-b"), Ok(node_agent(None, Some("sluice-b")))),
        (token("node-only"), Ok(node_agent(Some("n1"), None))),
        // Claims of the node agents' account, but the API server says it is another (a forged
        // token: the review is what counts).
        (token("forged"), Ok(web)),
        (token("expired"), Err(ReviewError::Rejected("[invalid bearer token, token has expired]".into()))),
        (token("api-down"), Err(ReviewError::Unavailable("TokenReview failed: connection refused".into()))),
    ]
}

struct Harness {
    addr: SocketAddr,
    pki: TestPki,
    signing: Arc<SigningState>,
    service: Arc<CaService>,
    metrics: Arc<CaMetrics>,
    fake: Arc<FakeReviewer>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

async fn start(pods: PodStore, rate: RateConfig) -> Harness {
    start_with(pods, rate, ServerLimits::default(), generous_reviews()).await
}

/// Review rates no test here runs into, unless it means to.
fn generous_reviews() -> ReviewLimits {
    ReviewLimits {
        per_source: RateConfig { rate: 1000.0, burst: 1000 },
        global: RateConfig { rate: 1000.0, burst: 1000 },
        ..ReviewLimits::for_node_account("sluice-system", "sluice")
    }
}

async fn start_with(
    pods: PodStore,
    rate: RateConfig,
    limits: ServerLimits,
    reviews: ReviewLimits,
) -> Harness {
    let pki = TestPki::new(true);
    let signing = Arc::new(
        SigningState::load(pki.files(), vec![SERVER_NAME.into(), "127.0.0.1".into()], SERVING_LIFETIME)
            .unwrap(),
    );
    let config = ServiceConfig {
        policy: PolicyConfig {
            trust_domain: "cluster.local".into(),
            node_service_account: ("sluice-system".into(), "sluice".into()),
            audience: "sluice-ca".into(),
        },
        max_lifetime: Duration::from_secs(86400),
        rate,
    };
    let metrics = Arc::new(CaMetrics::default());
    let fake = Arc::new(FakeReviewer::with(tokens()));
    let reviewer = Arc::new(CachedReviewer::new(fake.clone(), reviews));
    let service =
        Arc::new(CaService::new(config, signing.clone(), reviewer, Arc::new(pods), metrics.clone()));
    let tls = Arc::new(super::serving::server_config(signing.serving()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(server::serve(listener, tls, service.clone(), limits, stop_rx));
    Harness { addr, pki, signing, service, metrics, fake, stop, server }
}

fn generous() -> RateConfig {
    RateConfig { rate: 1000.0, burst: 1000 }
}

async fn channel(addr: SocketAddr, root: &CertificateDer<'_>) -> Channel {
    let tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(root))).domain_name(SERVER_NAME);
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("TLS to the CA, verified against the bundle")
}

async fn call_path(
    channel: &Channel,
    path: &'static str,
    token: Option<&str>,
    request: IstioCertificateRequest,
) -> Result<IstioCertificateResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let mut request = tonic::Request::new(request);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let codec = tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
    grpc.unary(request, PathAndQuery::from_static(path), codec).await.map(tonic::Response::into_inner)
}

async fn call(
    channel: &Channel,
    token: Option<&str>,
    request: IstioCertificateRequest,
) -> Result<IstioCertificateResponse, Status> {
    call_path(channel, CREATE_CERTIFICATE_PATH, token, request).await
}

fn csr(sans: &[&str], dns: Option<&str>) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    // A node agent's subject is empty (rcgen's default has a CN, which the CA refuses).
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans.iter().map(|s| SanType::URI((*s).try_into().unwrap())).collect();
    if let Some(dns) = dns {
        params.subject_alt_names.push(SanType::DnsName(dns.try_into().unwrap()));
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn ask(identity: &str) -> IstioCertificateRequest {
    IstioCertificateRequest::impersonating(csr(&[identity], None), 3600, identity)
}

fn ders(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain.iter().map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap().into_owned()).collect()
}

/// Verifies the chain with webpki against `root` alone, as a peer would (client and server
/// usage), and returns the leaf's subject alternative names.
fn verify(chain: &[String], root: &CertificateDer<'_>) -> Vec<String> {
    let ders = ders(chain);
    assert_eq!(ders.last().unwrap(), root, "the last element is the root");
    let anchor = webpki::anchor_from_trusted_cert(root).unwrap();
    let ee = webpki::EndEntityCert::try_from(&ders[0]).unwrap();
    let intermediates = &ders[1..ders.len() - 1];
    for usage in [webpki::KeyUsage::client_auth(), webpki::KeyUsage::server_auth()] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&anchor),
            intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .expect("the chain verifies against the bundle");
    }
    let (_, leaf) = X509Certificate::from_der(&ders[0]).unwrap();
    assert!(!leaf.is_ca());
    leaf.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            other => format!("{other}"),
        })
        .collect()
}

fn assert_refused(result: Result<IstioCertificateResponse, Status>, code: Code, says: &str) -> Status {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{:?} should say {says:?}", status.message());
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_a_chain_that_verifies_and_carries_exactly_the_identity() {
    let h = start(PodStore::with_pods(cluster()), generous()).await;
    let ch = channel(h.addr, &h.pki.root).await;

    let resp = call(&ch, Some(&token("n1")), ask(WEB)).await.expect("web runs on n1");
    assert_eq!(resp.cert_chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(verify(&resp.cert_chain, &h.pki.root), vec![format!("URI:{WEB}")]);
    let leaf = ders(&resp.cert_chain).remove(0);
    let (_, leaf) = X509Certificate::from_der(&leaf).unwrap();
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!((3660..=3661).contains(&life), "asked 3600 s, backdated 60 s: {life}");

    // Without ImpersonatedIdentity, the CSR's URI names the identity (istio-agent's way).
    let plain = IstioCertificateRequest { csr: csr(&[DB], None), validity_duration: 0, metadata: None };
    let resp = call(&ch, Some(&token("bound-to-sluice-b")), plain)
        .await
        .expect("node from the bound pod: n2 runs db");
    assert_eq!(verify(&resp.cert_chain, &h.pki.root), vec![format!("URI:{DB}")]);
    assert_eq!(h.metrics.issued_total(), 2);
    h.stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), h.server).await.expect("the server drains").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_code_and_reason() {
    let h = start(PodStore::with_pods(cluster()), generous()).await;
    let ch = channel(h.addr, &h.pki.root).await;
    let n1 = token("n1");

    // An impostor: node 1's token asking for node 2's pod identity.
    assert_refused(
        call(&ch, Some(&n1), ask(DB)).await,
        Code::PermissionDenied,
        "no running pod with service account shop/db is scheduled on node n1",
    );
    // Refused on their own claims, without a TokenReview: another account's token (a tenant
    // can mint one for the CA's audience), another audience, an expired one, not a JWT.
    let tenant = token_with("tenant", |c| c["sub"] = "system:serviceaccount:shop:web".into());
    assert_refused(
        call(&ch, Some(&tenant), ask(WEB)).await,
        Code::PermissionDenied,
        "system:serviceaccount:shop:web",
    );
    let other_audience =
        token_with("aud", |c| c["aud"] = serde_json::json!(["https://kubernetes.default.svc"]));
    assert_refused(
        call(&ch, Some(&other_audience), ask(WEB)).await,
        Code::Unauthenticated,
        "its audiences are",
    );
    let old = token_with("old", |c| c["exp"] = (unix_now() - 10).into());
    assert_refused(call(&ch, Some(&old), ask(WEB)).await, Code::Unauthenticated, "expired");
    assert_refused(call(&ch, Some("opaque"), ask(WEB)).await, Code::Unauthenticated, "not a JWT");
    assert_eq!(
        h.fake.calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the impostor's token was reviewed"
    );
    // Past the claims, the review decides: a forged token, a rejected one, the API server down.
    assert_refused(
        call(&ch, Some(&token("forged")), ask(WEB)).await,
        Code::PermissionDenied,
        "ServiceAccount shop/web",
    );
    assert_refused(
        call(&ch, Some(&token("expired")), ask(WEB)).await,
        Code::Unauthenticated,
        "token has expired",
    );
    assert_refused(
        call(&ch, Some(&token("api-down")), ask(WEB)).await,
        Code::Unavailable,
        "connection refused",
    );
    assert_refused(call(&ch, None, ask(WEB)).await, Code::Unauthenticated, "authorization: Bearer");
    assert_refused(
        call(&ch, Some(&token("node-only")), ask(WEB)).await,
        Code::PermissionDenied,
        "not bound to a pod",
    );
    let extra_dns = IstioCertificateRequest::impersonating(csr(&[WEB], Some("web.shop.svc")), 3600, WEB);
    assert_refused(call(&ch, Some(&n1), extra_dns).await, Code::InvalidArgument, "web.shop.svc");
    let ghost = "spiffe://cluster.local/ns/shop/sa/ghost";
    assert_refused(
        call(&ch, Some(&n1), ask(ghost)).await,
        Code::PermissionDenied,
        "no running or pending pod",
    );
    assert_refused(
        call(&ch, Some(&n1), ask("spiffe://cluster.local/ns/shop/sa/migrate")).await,
        Code::PermissionDenied,
        "service account shop/migrate",
    );
    let mismatch = IstioCertificateRequest::impersonating(csr(&[DB], None), 3600, WEB);
    assert_refused(call(&ch, Some(&n1), mismatch).await, Code::InvalidArgument, "asks for the URI");
    let huge = IstioCertificateRequest::impersonating("x".repeat(10 * 1024), 3600, WEB);
    assert_refused(call(&ch, Some(&n1), huge).await, Code::InvalidArgument, "at most 8192");
    assert_refused(
        call(&ch, Some(&n1), ask("spiffe://other.td/ns/shop/sa/web")).await,
        Code::PermissionDenied,
        "trust domain",
    );
    assert_refused(
        call(&ch, Some(&n1), ask("not-spiffe")).await,
        Code::InvalidArgument,
        "not a workload SPIFFE ID",
    );
    let other = call_path(&ch, "/istio.v1.auth.IstioCertificateService/Other", Some(&n1), ask(WEB)).await;
    assert_eq!(other.unwrap_err().code(), Code::Unimplemented);
    assert_eq!(h.metrics.unknown_methods_total(), 1, "counted");

    for (reason, n) in [
        ("no_pod_on_node", 1),
        ("not_node_service_account", 2),
        ("wrong_audience", 1),
        ("token_rejected", 3),
        ("missing_token", 1),
        ("token_review_unavailable", 1),
        ("caller_node_unknown", 1),
        ("csr_extra_names", 1),
        ("no_pod_anywhere", 2),
        ("csr_wrong_identity", 1),
        ("csr_too_large", 1),
        ("wrong_trust_domain", 1),
        ("bad_identity", 1),
    ] {
        assert_eq!(h.metrics.refused_total(reason), n, "{reason}");
    }
    assert_eq!(h.metrics.issued_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_until_the_pod_watch_has_synced() {
    let h = start(PodStore::default(), generous()).await;
    let ch = channel(h.addr, &h.pki.root).await;
    assert_refused(call(&ch, Some(&token("n1")), ask(WEB)).await, Code::Unavailable, "not complete yet");
    h.service.pods().replace(PodIndex::from_pods(cluster()));
    call(&ch, Some(&token("n1")), ask(WEB)).await.expect("ready once synced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_has_its_own_rate() {
    // One token every 20 s: however slow this machine, no token comes back during the test.
    let h = start(PodStore::with_pods(cluster()), RateConfig { rate: 0.05, burst: 2 }).await;
    let ch = channel(h.addr, &h.pki.root).await;
    call(&ch, Some(&token("n1")), ask(WEB)).await.unwrap();
    call(&ch, Some(&token("n1")), ask(WEB)).await.unwrap();
    let status =
        assert_refused(call(&ch, Some(&token("n1")), ask(WEB)).await, Code::ResourceExhausted, "node n1");
    let wait: u64 = status.metadata().get(RETRY_AFTER_MS).unwrap().to_str().unwrap().parse().unwrap();
    assert!((10_000..=20_000).contains(&wait), "a token every 20 s: {wait} ms");
    // Refused requests cost tokens too: an impostor cannot probe faster than its rate.
    assert_refused(call(&ch, Some(&token("n1")), ask(DB)).await, Code::ResourceExhausted, "node n1");
    call(&ch, Some(&token("n2")), ask(DB)).await.expect("n2 has a bucket of its own");
    assert_eq!(h.metrics.refused_total("rate_limited"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarting_with_250_pods_gets_its_burst_and_one_token_review() {
    let mut pods = cluster();
    pods.extend((0..250).map(|i| pod("shop", &format!("p-{i}"), &format!("sa-{i}"), Some("n1"), "Pending")));
    // One token per 100 s after the burst: nothing refills while the test runs.
    let h = start(PodStore::with_pods(pods), RateConfig { rate: 0.01, burst: 50 }).await;
    let ch = channel(h.addr, &h.pki.root).await;
    let n1 = token("n1");
    let calls: Vec<_> = (0..250)
        .map(|i| {
            let (ch, n1) = (ch.clone(), n1.clone());
            let request = ask(&format!("spiffe://cluster.local/ns/shop/sa/sa-{i}"));
            tokio::spawn(async move { call(&ch, Some(&n1), request).await })
        })
        .collect();
    let (mut issued, mut limited) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => issued += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.metadata().get(RETRY_AFTER_MS).is_some());
                limited += 1;
            }
        }
    }
    assert_eq!((issued, limited), (50, 200), "the burst, then the rate");
    assert_eq!(
        h.fake.calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one TokenReview for the whole burst"
    );
    // Another node is not held up by n1's burst.
    call(&ch, Some(&token("n2")), ask(DB)).await.expect("n2 has its own bucket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_is_picked_up_without_a_restart() {
    let h = start(PodStore::with_pods(cluster()), generous()).await;
    // Rotation step 2: the CA signs under a new root, the bundle is [new, old].
    let (new_root_der, _, new_key) = new_root("second mesh root");
    let files = h.pki.files();
    std::fs::write(&files.signing_cert, pem(&new_root_der)).unwrap();
    std::fs::write(&files.signing_key, new_key.serialize_pem()).unwrap();
    std::fs::write(&files.trust_bundle, format!("{}{}", pem(&new_root_der), pem(&h.pki.root))).unwrap();
    assert_eq!(h.signing.check(), Reload::Reloaded);

    // A node that trusts only the new root reaches the CA (its serving certificate moved too)
    // and gets a chain under the new root.
    let ch = channel(h.addr, &new_root_der).await;
    let resp = call(&ch, Some(&token("n1")), ask(WEB)).await.unwrap();
    assert_eq!(resp.cert_chain.len(), 2, "leaf and the root that signs directly");
    assert_eq!(verify(&resp.cert_chain, &new_root_der), vec![format!("URI:{WEB}")]);
}

/// A few lines of kube-apiserver: the pod list and watch and TokenReviews, enough to run the
/// CA's real Kubernetes paths (kube-client, the watcher, the TokenReview request) in-process.
mod apiserver {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
    use hyper::body::{Frame, Incoming};
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use serde_json::{json, Value};

    #[derive(Default)]
    pub struct Api {
        pub watches: AtomicUsize,
        pub reviews: Mutex<Vec<Value>>,
    }

    pub fn pod(name: &str, sa: &str, node: &str, phase: &str, rv: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "resourceVersion": rv},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": phase}
        })
    }

    fn body(text: String) -> BoxBody<Bytes, Infallible> {
        Full::new(Bytes::from(text)).boxed()
    }

    async fn answer(
        api: Arc<Api>,
        req: Request<Incoming>,
    ) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let reply = |text: String| {
            Ok(Response::builder().header("content-type", "application/json").body(body(text)).unwrap())
        };
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let sent: Value =
                serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
            api.reviews.lock().unwrap().push(sent.clone());
            let status = if sent["spec"]["token"] == "good" {
                json!({"authenticated": true, "audiences": sent["spec"]["audiences"], "user": {
                    "username": "system:serviceaccount:sluice-system:sluice",
                    "extra": {"authentication.kubernetes.io/node-name": ["n1"]}}})
            } else {
                json!({"authenticated": false, "error": "[invalid bearer token, token has expired]"})
            };
            return reply(
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status})
                    .to_string(),
            );
        }
        assert_eq!(path, "/api/v1/pods", "unexpected request {path}?{query}");
        if !query.contains("watch=true") {
            let items =
                vec![pod("web-1", "web", "n1", "Running", "5"), pod("db-1", "db", "n2", "Running", "6")];
            return reply(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"}, "items": items}).to_string());
        }
        if api.watches.fetch_add(1, Ordering::SeqCst) == 0 {
            let events = [
                json!({"type": "ADDED", "object": pod("api-1", "api", "n1", "Pending", "11")}),
                json!({"type": "DELETED", "object": pod("web-1", "web", "n1", "Running", "12")}),
            ];
            return reply(events.iter().map(|e| format!("{e}\n")).collect());
        }
        // Later watches stay open with nothing to say.
        let quiet = futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>();
        Ok(Response::new(StreamBody::new(quiet).boxed()))
    }

    /// Serves on loopback until the runtime ends; returns the URL.
    pub async fn start(api: Arc<Api>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let api = api.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(api.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        url
    }
}

/// Polls `cond` until it holds, for at most 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_watch_and_token_reviews_speak_to_the_api_server() {
    let api = Arc::new(apiserver::Api::default());
    let url = apiserver::start(api.clone()).await;
    let config = crate::discovery::KubeConfig { api_url: Some(url), ..Default::default() };
    let client = crate::discovery::kube::client(&config).await.unwrap();

    let store = Arc::new(PodStore::default());
    let watch = tokio::spawn(super::pods::watch_pods(client.clone(), store.clone()));
    tokio::time::timeout(Duration::from_secs(10), store.wait_synced())
        .await
        .expect("the first list syncs the store");
    eventually("the watch's events", || {
        store.read(|p| {
            p.on_node("n1", "shop", "api") && !p.anywhere("shop", "web") && p.on_node("n2", "shop", "db")
        })
    })
    .await;
    watch.abort();

    let reviewer = super::authn::KubeTokenReviewer::new(client);
    use super::authn::TokenReviewer;
    let ok = reviewer.review("good", "sluice-ca").await.expect("a valid token");
    assert_eq!(ok.service_account(), Some(("sluice-system", "sluice")));
    assert_eq!(ok.claim(super::authn::NODE_NAME_EXTRA), Some("n1"));
    assert_eq!(ok.audiences, vec!["sluice-ca".to_string()]);
    let expired = reviewer.review("old", "sluice-ca").await.unwrap_err();
    assert_eq!(expired, ReviewError::Rejected("[invalid bearer token, token has expired]".into()));
    let sent = api.reviews.lock().unwrap()[0].clone();
    assert_eq!(sent["spec"], serde_json::json!({"token": "good", "audiences": ["sluice-ca"]}));
    assert_eq!(sent["kind"], "TokenReview");
}

/// TLS to the CA as a raw stream (ALPN h2), for tests that speak below gRPC.
async fn tls_connect(
    addr: SocketAddr,
    root: &CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("TLS to the CA")
}

/// Reads until the peer closes (end of stream or reset), for at most 10 s.
async fn closed_by_peer(io: &mut (impl tokio::io::AsyncRead + Unpin)) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf))
            .await
            .expect("the CA closes the connection")
        {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

fn with_limits(tweak: impl FnOnce(&mut ServerLimits)) -> ServerLimits {
    let mut limits = ServerLimits::default();
    tweak(&mut limits);
    limits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_never_ends_holds_its_slot_only_until_the_deadline() {
    // Finding 2: tonic's unary handler waits for the end of the body; a stream of headers that
    // never ends held memory and (after it) an in-flight slot forever.
    let deadline = Duration::from_secs(2);
    let limits = with_limits(|l| {
        l.admission.max_streams_per_source = 2;
        l.request_deadline = deadline;
    });
    let h = start_with(PodStore::with_pods(cluster()), generous(), limits, generous_reviews()).await;
    let (mut send, conn) = h2::client::handshake(tls_connect(h.addr, &h.pki.root).await).await.unwrap();
    tokio::spawn(conn);
    let started = std::time::Instant::now();
    let mut open = Vec::new();
    for _ in 0..2 {
        let request = http::Request::post(format!("https://{SERVER_NAME}{CREATE_CERTIFICATE_PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {}", token("n1")))
            .body(())
            .unwrap();
        send = send.ready().await.unwrap();
        // The body stays open: nothing is ever sent on it.
        open.push(send.send_request(request, false).unwrap());
    }
    // The slots are taken when the headers arrive, not when a body ends: a third request from
    // this address is turned away at once, with a wait to respect.
    eventually("both streams admitted", || h.metrics.open_streams() == 2).await;
    let ch = channel(h.addr, &h.pki.root).await;
    let status = assert_refused(
        call(&ch, Some(&token("n1")), ask(WEB)).await,
        Code::ResourceExhausted,
        "requests in progress",
    );
    assert!(status.metadata().get(RETRY_AFTER_MS).is_some());
    assert_eq!(h.metrics.refused_total("source_busy"), 1);
    // Both stalled streams are answered DEADLINE_EXCEEDED at the deadline, and free their slots.
    for (response, _body) in open {
        let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
        assert_eq!(
            response.headers().get("grpc-status").map(|v| v.to_str().unwrap()),
            Some("4"),
            "{response:?}"
        );
    }
    let took = started.elapsed();
    assert!(took >= deadline && took < deadline + Duration::from_secs(5), "answered after {took:?}");
    assert_eq!(h.metrics.refused_total("deadline_exceeded"), 2);
    eventually("the slots freed", || h.metrics.open_streams() == 0).await;
    call(&ch, Some(&token("n1")), ask(WEB)).await.expect("served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_tls_and_preface_in_time_is_closed() {
    // Finding 2: the handshake timeout covered TLS only; a client that completed TLS and then
    // sent nothing kept its connection slot forever.
    let limits = with_limits(|l| l.handshake_timeout = Duration::from_millis(500));
    let h = start_with(PodStore::with_pods(cluster()), generous(), limits, generous_reviews()).await;
    let started = std::time::Instant::now();
    let mut quiet = tls_connect(h.addr, &h.pki.root).await;
    closed_by_peer(&mut quiet).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not before the timeout: {:?}",
        started.elapsed()
    );
    eventually("the timeout counted", || h.metrics.handshake_failures_total("timeout") == 1).await;
    // Nor TCP alone.
    let mut bare = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    closed_by_peer(&mut bare).await;
    eventually("counted too", || h.metrics.handshake_failures_total("timeout") == 2).await;
    // HTTP/1.1 after TLS is not the HTTP/2 preface: closed at once.
    let mut http1 = tls_connect(h.addr, &h.pki.root).await;
    tokio::io::AsyncWriteExt::write_all(&mut http1, b"GET / HTTP/1.1\r\nhost: ca\r\n\r\n").await.unwrap();
    closed_by_peer(&mut http1).await;
    eventually("a wrong preface counted", || h.metrics.handshake_failures_total("preface") == 1).await;
    eventually("no connection left", || h.metrics.open_connections() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_gets_its_share_of_connections() {
    let limits = with_limits(|l| l.admission.max_connections_per_source = 1);
    let h = start_with(PodStore::with_pods(cluster()), generous(), limits, generous_reviews()).await;
    let _first = tls_connect(h.addr, &h.pki.root).await;
    eventually("the first connection held", || h.metrics.open_connections() == 1).await;
    let mut second = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    closed_by_peer(&mut second).await;
    assert_eq!(h.metrics.connections_refused_total("source_limit"), 1);
    assert_eq!(h.metrics.open_connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_the_client_comes_back() {
    // Findings 2 and 10: a node's connection no longer holds a slot forever; its client
    // reconnects on the next request.
    let limits = with_limits(|l| l.idle_timeout = Duration::from_millis(300));
    let h = start_with(PodStore::with_pods(cluster()), generous(), limits, generous_reviews()).await;
    let ch = channel(h.addr, &h.pki.root).await;
    call(&ch, Some(&token("n1")), ask(WEB)).await.unwrap();
    eventually("closed as idle", || h.metrics.connections_closed_total("idle") == 1).await;
    eventually("the connection gone", || h.metrics.open_connections() == 0).await;
    call(&ch, Some(&token("n1")), ask(WEB)).await.expect("the client reconnects");
    assert_eq!(h.metrics.issued_total(), 2);
    assert_eq!(h.metrics.connections_closed_total("max_age"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_at_its_maximum_age() {
    let limits = with_limits(|l| l.max_connection_age = Duration::from_millis(500));
    let h = start_with(PodStore::with_pods(cluster()), generous(), limits, generous_reviews()).await;
    let ch = channel(h.addr, &h.pki.root).await;
    call(&ch, Some(&token("n1")), ask(WEB)).await.unwrap();
    eventually("closed for its age", || h.metrics.connections_closed_total("max_age") == 1).await;
    eventually("the connection gone", || h.metrics.open_connections() == 0).await;
    call(&ch, Some(&token("n1")), ask(WEB)).await.expect("the client reconnects");
    assert_eq!(h.metrics.connections_closed_total("idle"), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn signing_runs_on_a_blocking_thread() {
    // Finding 11: an RSA signature takes milliseconds the async worker threads must not spend.
    let here = std::thread::current().id();
    let there = server::off_runtime(|| Ok(std::thread::current().id())).await.unwrap();
    assert_ne!(here, there);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pod_view_or_an_expired_chain_makes_the_ca_refuse() {
    // Finding 9: a failing watch left the CA signing from an old view forever.
    let h = start(PodStore::with_pods(cluster()), generous()).await;
    let ch = channel(h.addr, &h.pki.root).await;
    call(&ch, Some(&token("n1")), ask(WEB)).await.unwrap();
    h.service
        .pods()
        .watch_failed(std::time::Instant::now() - super::pods::STALE_AFTER - Duration::from_secs(1));
    assert_refused(call(&ch, Some(&token("n1")), ask(WEB)).await, Code::Unavailable, "has been failing for");
    assert!(h.service.readiness().is_err(), "and the readiness probe says so");
    h.service.pods().watch_succeeded();
    call(&ch, Some(&token("n1")), ask(WEB)).await.expect("ready again once the watch recovers");
    assert_eq!(h.metrics.refused_total("pod_watch_failing"), 1);
}
