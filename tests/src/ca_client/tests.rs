//! The client against an in-process CA stand-in over TLS (no root, no simulator): the wire
//! format, the token and metadata it sends, the statuses it reports.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rcgen::{CertificateSigningRequestParams, Issuer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{body::Body, transport::server::Connected, Code, Status};

use super::*;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A CA stand-in: token "good" gets the CSR signed (chain: leaf, root) unless the CSR's
/// identity differs from ImpersonatedIdentity; "busy" gets RESOURCE_EXHAUSTED with
/// retry-after-ms; anything else UNAUTHENTICATED.
#[derive(Clone)]
struct StandIn {
    issuer: Arc<Issuer<'static, KeyPair>>,
    root_pem: Arc<str>,
}

impl tower::Service<http::Request<Body>> for StandIn {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if req.uri().path() != CREATE_CERTIFICATE_PATH {
                return Ok(Status::unimplemented(req.uri().path().to_string()).into_http());
            }
            let svc = tower::service_fn(move |r| {
                let this = this.clone();
                async move { this.create(r) }
            });
            Ok(tonic::server::Grpc::new(
                ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default(),
            )
            .unary(svc, req)
            .await)
        })
    }
}

impl StandIn {
    fn create(
        &self,
        r: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, Status> {
        let auth = r.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        match auth.as_deref() {
            Some("Bearer good") => {}
            Some("Bearer busy") => {
                let mut st = Status::resource_exhausted("node n1 is over its rate of 5/s");
                st.metadata_mut().insert("retry-after-ms", "200".parse().unwrap());
                return Err(st);
            }
            _ => return Err(Status::unauthenticated("no valid token")),
        }
        let req = r.into_inner();
        let want = match req.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) {
            Some(prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(s)) }) => s.clone(),
            _ => return Err(Status::invalid_argument("no ImpersonatedIdentity")),
        };
        let csr = CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let sans: Vec<String> = csr.params.subject_alt_names.iter().map(|s| format!("{s:?}")).collect();
        if sans.len() != 1 || !sans[0].contains(&want) {
            return Err(Status::invalid_argument(format!(
                "the CSR must carry exactly the URI SAN {want}: {sans:?}"
            )));
        }
        let leaf = csr.signed_by(&self.issuer).map_err(|e| Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf.pem(), self.root_pem.to_string()],
        }))
    }
}

/// A server-side TLS stream tonic can serve on.
struct Tls(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for Tls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Starts the stand-in on 127.0.0.1 with a serving certificate for 127.0.0.1 under a fresh
/// root; returns its address, the root's PEM and the runtime serving it.
fn stand_in() -> (SocketAddr, String, tokio::runtime::Runtime) {
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.distinguished_name.push(DnType::CommonName, "test root");
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = Issuer::new(root, root_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::from_pem_slice(server_key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Tls>>(4);
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(Tls(tls))).await;
                }
            });
        }
    });
    let svc = StandIn { issuer: Arc::new(issuer), root_pem: root_cert.pem().into() };
    rt.spawn(tonic::transport::Server::builder().serve_with_incoming(svc, ReceiverStream::new(rx)));
    (addr, root_cert.pem(), rt)
}

const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const T: Duration = Duration::from_secs(10);

#[test]
fn issues_refuses_and_reports_the_rate_limit() {
    let (addr, root_pem, _rt) = stand_in();
    let client = CaClient { netns: None, addr, server_name: "127.0.0.1".into(), roots_pem: root_pem.clone() };

    let ok = client.create_certificate(&CaCall::for_identity(ID, Some("good".into())).unwrap(), T).unwrap();
    assert_eq!(ok.code, Code::Ok, "{ok:?}");
    assert_eq!(ok.cert_chain.len(), 2);
    assert_eq!(ok.cert_chain[1], root_pem);
    let leaf = ok.leaf().unwrap();
    assert_eq!(leaf.uris, [ID]);
    assert_eq!(leaf.issuer, "CN=test root");

    let no_token = client.create_certificate(&CaCall::for_identity(ID, None).unwrap(), T).unwrap();
    assert_eq!(no_token.code, Code::Unauthenticated);
    assert_eq!(no_token.message, "no valid token");
    assert!(no_token.leaf().is_err());

    let busy = client.create_certificate(&CaCall::for_identity(ID, Some("busy".into())).unwrap(), T).unwrap();
    assert_eq!(busy.code, Code::ResourceExhausted);
    assert_eq!(busy.retry_after_ms, Some(200));

    // A CSR a node agent would never send: the identity and a DNS name.
    let mut spec = CsrSpec::new(ID);
    spec.dns_names.push("evil.example".into());
    let call =
        CaCall { csr: spec.build().unwrap().pem, ..CaCall::for_identity(ID, Some("good".into())).unwrap() };
    let extra = client.create_certificate(&call, T).unwrap();
    assert_eq!(extra.code, Code::InvalidArgument, "{extra:?}");
    assert!(extra.message.contains("exactly the URI SAN"), "{extra:?}");

    // TLS is verified: another root, or another name, fails below gRPC.
    let other_root = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let wrong = CaClient { roots_pem: p.self_signed(&other_root).unwrap().pem(), ..client.clone() };
    let err =
        wrong.create_certificate(&CaCall::for_identity(ID, Some("good".into())).unwrap(), T).unwrap_err();
    assert!(format!("{err:#}").contains("TLS with the CA"), "{err:#}");
    let wrong_name = CaClient { server_name: "sluice-ca.sluice-system.svc".into(), ..client };
    assert!(wrong_name
        .create_certificate(&CaCall::for_identity(ID, Some("good".into())).unwrap(), T)
        .is_err());
}

#[test]
fn csrs_carry_what_the_spec_says() {
    let mut spec = CsrSpec::new(ID);
    spec.dns_names.push("web.shop.svc".into());
    spec.is_ca = true;
    let csr = spec.build().unwrap();
    let parsed = CertificateSigningRequestParams::from_pem(&csr.pem).unwrap();
    assert_eq!(parsed.params.subject_alt_names.len(), 2);
    assert!(matches!(parsed.params.is_ca, IsCa::Ca(_)));
    let plain = CertificateSigningRequestParams::from_pem(&CsrSpec::new(ID).build().unwrap().pem).unwrap();
    assert_eq!(plain.params.subject_alt_names.len(), 1);
    assert!(matches!(plain.params.is_ca, IsCa::NoCa));
}
