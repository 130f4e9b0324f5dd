//! An in-process CA service for the remote CA client's tests: Istio's certificate protocol over
//! gRPC+TLS on loopback (hyper + tonic's server codec), answering from a test PKI with a
//! scripted behaviour, and recording what each request carried.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tonic::{Code, Status};

use super::*;
use crate::identity::istio_ca::{IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH};

/// A CA certificate with its key: a root, or an intermediate under one.
pub(super) struct Authority {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub issuer: Issuer<'static, KeyPair>,
    /// The PEM certificates above it, up to and including the root (empty for a root).
    pub above: Vec<String>,
}

impl Authority {
    /// A self-signed root named `name`.
    pub fn root(name: &str) -> Authority {
        let key = KeyPair::generate().expect("key");
        let mut params = ca_params(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-sign");
        let pem = cert.pem();
        let der = cert.der().clone();
        Authority { issuer: Issuer::new(params, key), pem, der, above: Vec::new() }
    }

    /// An intermediate named `name` under `self`.
    pub fn intermediate(&self, name: &str) -> Authority {
        let key = KeyPair::generate().expect("key");
        let mut params = ca_params(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params.signed_by(&key, &self.issuer).expect("sign intermediate");
        let mut above = vec![self.pem.clone()];
        above.extend(self.above.iter().cloned());
        Authority { pem: cert.pem(), der: cert.der().clone(), issuer: Issuer::new(params, key), above }
    }

    /// A TLS server certificate for `names` (DNS names or IPs), with its chain (without the
    /// root) and key, for rustls.
    pub fn server_cert(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("DNS name")),
            })
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        let cert = params.signed_by(&key, &self.issuer).expect("sign server cert");
        let mut chain = vec![cert.der().clone()];
        if !self.above.is_empty() {
            chain.push(self.der.clone());
        }
        (chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// What a CA signing with `self` returns after the leaf: itself (unless a root) and the
    /// certificates above it, root last.
    fn chain_after_leaf(&self) -> Vec<String> {
        if self.above.is_empty() {
            return vec![self.pem.clone()];
        }
        let mut out = vec![self.pem.clone()];
        out.extend(self.above.iter().cloned());
        out
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
    params
}

/// What the fake CA does with the next request.
#[derive(Debug, Clone)]
pub(super) enum Behaviour {
    /// Signs what the CSR asks for with the current signer.
    Sign,
    /// Signs, but for this URI instead of the one asked for.
    SignAs(String),
    /// Signs, adding a DNS name to the leaf.
    SignWithExtraDns,
    Refuse(Code, String),
    /// RESOURCE_EXHAUSTED with `retry-after-ms`.
    RateLimit(u64),
    /// Never answers.
    Hang,
    /// Signs, valid for this many seconds whatever was asked.
    SignFor(i64),
}

/// What one request carried.
#[derive(Debug, Clone)]
pub(super) struct Recorded {
    pub authorization: Option<String>,
    pub grpc_timeout: Option<String>,
    pub csr: String,
    pub impersonated: Option<String>,
    pub validity: i64,
}

pub(super) struct FakeCa {
    pub addr: SocketAddr,
    /// Scripted answers, one per request; when empty, `default`.
    script: Mutex<VecDeque<Behaviour>>,
    default: Mutex<Behaviour>,
    signer: Mutex<Arc<Authority>>,
    requests: Mutex<Vec<Recorded>>,
}

impl FakeCa {
    /// Serves on 127.0.0.1 with a certificate for `names` issued by `tls_issuer`, signing
    /// workload certificates with `signer`.
    pub async fn start(tls_issuer: &Authority, names: &[&str], signer: Arc<Authority>) -> Arc<FakeCa> {
        let (chain, key) = tls_issuer.server_cert(names);
        let mut tls =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ca = Arc::new(FakeCa {
            addr: listener.local_addr().unwrap(),
            script: Mutex::default(),
            default: Mutex::new(Behaviour::Sign),
            signer: Mutex::new(signer),
            requests: Mutex::default(),
        });
        let server = ca.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                let ca = server.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let ca = ca.clone();
                        async move { Ok::<_, Infallible>(ca.serve(req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        ca
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn set_default(&self, b: Behaviour) {
        *self.default.lock().unwrap() = b;
    }

    pub fn script(&self, b: Behaviour) {
        self.script.lock().unwrap().push_back(b);
    }

    pub fn sign_with(&self, signer: Arc<Authority>) {
        *self.signer.lock().unwrap() = signer;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    async fn serve(
        self: Arc<Self>,
        req: http::Request<hyper::body::Incoming>,
    ) -> http::Response<tonic::body::Body> {
        if req.uri().path() != CREATE_CERTIFICATE_PATH {
            let mut resp = http::Response::new(tonic::body::Body::default());
            *resp.status_mut() = http::StatusCode::NOT_FOUND;
            return resp;
        }
        let grpc_timeout =
            req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
            IstioCertificateResponse,
            IstioCertificateRequest,
        >::default());
        grpc.unary(Handler { ca: self, grpc_timeout }, req).await
    }

    fn answer(&self, req: tonic::Request<IstioCertificateRequest>, grpc_timeout: Option<String>) -> Answer {
        let authorization =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        let msg = req.into_inner();
        self.requests.lock().unwrap().push(Recorded {
            authorization,
            grpc_timeout,
            csr: msg.csr.clone(),
            impersonated: msg.impersonated_identity().map(str::to_string),
            validity: msg.validity_duration,
        });
        let behaviour =
            self.script.lock().unwrap().pop_front().unwrap_or_else(|| self.default.lock().unwrap().clone());
        let sans = |asked: Vec<SanType>| -> Vec<SanType> {
            match &behaviour {
                Behaviour::SignAs(uri) => vec![SanType::URI(uri.as_str().try_into().unwrap())],
                Behaviour::SignWithExtraDns => {
                    let mut s = asked;
                    s.push(SanType::DnsName("web.shop.svc".try_into().unwrap()));
                    s
                }
                _ => asked,
            }
        };
        match &behaviour {
            Behaviour::Refuse(code, message) => Answer::Now(Err(Status::new(*code, message.clone()))),
            Behaviour::RateLimit(ms) => {
                let mut s =
                    Status::resource_exhausted("node node-1 is over its rate of 50 certificates per second");
                s.metadata_mut().insert("retry-after-ms", ms.to_string().parse().unwrap());
                Answer::Now(Err(s))
            }
            Behaviour::Hang => Answer::Never,
            Behaviour::Sign | Behaviour::SignAs(_) | Behaviour::SignWithExtraDns | Behaviour::SignFor(_) => {
                let signer = self.signer.lock().unwrap().clone();
                let mut csr = CertificateSigningRequestParams::from_pem(&msg.csr).expect("CSR parses");
                let now = OffsetDateTime::now_utc();
                csr.params.subject_alt_names = sans(std::mem::take(&mut csr.params.subject_alt_names));
                csr.params.distinguished_name = DistinguishedName::new();
                csr.params.not_before = now - time::Duration::seconds(5);
                let lifetime = match &behaviour {
                    Behaviour::SignFor(secs) => *secs,
                    _ => msg.validity_duration.clamp(1, 86400),
                };
                csr.params.not_after = now + time::Duration::seconds(lifetime);
                csr.params.is_ca = IsCa::ExplicitNoCa;
                csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                csr.params.extended_key_usages =
                    vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
                let leaf = csr.signed_by(&signer.issuer).expect("sign leaf");
                let mut cert_chain = vec![leaf.pem()];
                cert_chain.extend(signer.chain_after_leaf());
                Answer::Now(Ok(tonic::Response::new(IstioCertificateResponse { cert_chain })))
            }
        }
    }
}

enum Answer {
    Now(Result<tonic::Response<IstioCertificateResponse>, Status>),
    Never,
}

struct Handler {
    ca: Arc<FakeCa>,
    grpc_timeout: Option<String>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<tonic::Response<IstioCertificateResponse>, Status>> + Send>>;

impl tonic::server::UnaryService<IstioCertificateRequest> for Handler {
    type Response = IstioCertificateResponse;
    type Future = ResponseFuture;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        match self.ca.answer(request, self.grpc_timeout.take()) {
            Answer::Now(r) => Box::pin(std::future::ready(r)),
            Answer::Never => Box::pin(std::future::pending()),
        }
    }
}

/// A bundle file with `roots` (PEM), in a temp dir kept alive by the caller.
pub(super) fn write_bundle(dir: &std::path::Path, roots: &[&Authority]) -> PathBuf {
    let path = dir.join("roots.pem");
    let pem: String = roots.iter().map(|r| r.pem.clone()).collect();
    // Through a rename, as kubelet's atomic writer swaps a ConfigMap's files.
    let tmp = dir.join(".roots.pem.tmp");
    std::fs::write(&tmp, pem).expect("write bundle");
    std::fs::rename(&tmp, &path).expect("rename bundle");
    path
}

pub(super) fn write_token(dir: &std::path::Path, token: &str) -> PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).expect("write token");
    path
}

/// A remote CA client of `fake` (by its IP; the certificate names `server_name` or the IP).
pub(super) fn client(
    url: &str,
    bundle: &Arc<TrustBundleFile>,
    token: &std::path::Path,
    server_name: Option<&str>,
    call_timeout: Duration,
) -> Result<RemoteCa, CaError> {
    let config = RemoteCaConfig {
        server_name: server_name.map(str::to_string),
        token_file: token.to_path_buf(),
        requested_lifetime: Duration::from_secs(3600),
        call_timeout,
        connect_timeout: Duration::from_secs(2),
        ..RemoteCaConfig::new(url, "node-1")
    };
    RemoteCa::new(config, bundle.clone())
}
