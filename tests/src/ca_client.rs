//! A client of the CA service's gRPC API (Istio's `IstioCertificateService/CreateCertificate`)
//! for tests: it sends whatever a test wants (a token of any kind or none, any identity, CSRs a
//! node agent would never make: extra SANs, CA:true, another key) from a simulated node's
//! network namespace, so the request reaches the CA as that node's traffic would, and reports
//! the gRPC status the CA answered (code, message, `retry-after-ms`) or the chain it issued.
//!
//! One TLS connection per call, verified against the trust bundle the test gives (the CA's
//! serving certificate must chain to it and name the server name). Failures below gRPC
//! (connection refused, TLS) are errors; every gRPC answer is a [`CaAnswer`].
//!
//! The messages are written by hand with prost from the published interface, like the node
//! agent's (`proxy/src/identity/istio_ca.rs`; this crate does not depend on sluice).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, SanType};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
use tonic::{metadata::MetadataValue, transport::Endpoint};
use tonic_prost::ProstCodec;

use crate::{
    netns,
    pki::{self, CertInfo},
};

/// The gRPC method path.
pub const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata field naming the identity asked for on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// A PKCS#10 request and its private key.
pub struct Csr {
    pub pem: String,
    pub key: KeyPair,
}

/// What goes into a CSR. [`CsrSpec::new`] is what a node agent sends: exactly one URI SAN, the
/// identity; an empty subject; an ECDSA P-256 key; not a CA.
pub struct CsrSpec {
    /// URI SANs (a node agent sends exactly one: the SPIFFE ID).
    pub uris: Vec<String>,
    /// DNS SANs (a node agent sends none).
    pub dns_names: Vec<String>,
    /// Ask for CA:true.
    pub is_ca: bool,
    /// An organization in the subject (a node agent's subject is empty; the CA refuses any other).
    pub organization: Option<String>,
    /// The key to sign the request with (e.g. an RSA-1024 key made with openssl and read with
    /// `KeyPair::from_pem`); `None`: a fresh ECDSA P-256 key.
    pub key: Option<KeyPair>,
}

impl CsrSpec {
    pub fn new(identity: &str) -> CsrSpec {
        CsrSpec {
            uris: vec![identity.to_string()],
            dns_names: Vec::new(),
            is_ca: false,
            organization: None,
            key: None,
        }
    }

    pub fn build(self) -> Result<Csr> {
        let key = match self.key {
            Some(k) => k,
            None => KeyPair::generate().context("generating a P-256 key")?,
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(o) = &self.organization {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        params.distinguished_name = dn;
        for u in &self.uris {
            params
                .subject_alt_names
                .push(SanType::URI(u.as_str().try_into().with_context(|| format!("URI SAN {u:?}"))?));
        }
        for d in &self.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(d.as_str().try_into().with_context(|| format!("DNS SAN {d:?}"))?));
        }
        if self.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let pem =
            params.serialize_request(&key).context("signing the CSR")?.pem().context("encoding the CSR")?;
        Ok(Csr { pem, key })
    }
}

/// One CreateCertificate call.
#[derive(Debug, Clone)]
pub struct CaCall {
    /// The CSR (PEM).
    pub csr: String,
    /// The `ImpersonatedIdentity` metadata; `None` sends no metadata.
    pub impersonated_identity: Option<String>,
    /// `validity_duration`, seconds.
    pub validity_s: i64,
    /// Sent as `authorization: Bearer <token>`; `None` sends no credential.
    pub token: Option<String>,
}

impl CaCall {
    /// What a node agent sends for a pod of `identity`: a CSR for exactly that identity, the
    /// identity as `ImpersonatedIdentity`, a day's validity, the node's token.
    pub fn for_identity(identity: &str, token: Option<String>) -> Result<CaCall> {
        Ok(CaCall {
            csr: CsrSpec::new(identity).build()?.pem,
            impersonated_identity: Some(identity.to_string()),
            validity_s: 86_400,
            token,
        })
    }
}

/// What the CA answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaAnswer {
    pub code: tonic::Code,
    /// The status message (empty on success).
    pub message: String,
    /// The `retry-after-ms` metadata of a RESOURCE_EXHAUSTED answer.
    pub retry_after_ms: Option<u64>,
    /// The issued chain, leaf first, root last (empty on a refusal).
    pub cert_chain: Vec<String>,
}

impl CaAnswer {
    pub fn is_ok(&self) -> bool {
        self.code == tonic::Code::Ok
    }

    /// The leaf certificate's fields. Fails on a refusal.
    pub fn leaf(&self) -> Result<CertInfo> {
        let leaf = self
            .cert_chain
            .first()
            .ok_or_else(|| anyhow!("no certificate: {:?} {}", self.code, self.message))?;
        pki::cert_info(leaf)
    }
}

/// Where and how to reach a CA service.
#[derive(Debug, Clone)]
pub struct CaClient {
    /// The network namespace to call from (`None`: the test process's own).
    pub netns: Option<String>,
    pub addr: SocketAddr,
    /// The name the CA's certificate must carry (an IP address or a DNS name).
    pub server_name: String,
    /// PEM roots its certificate must chain to.
    pub roots_pem: String,
}

impl CaClient {
    /// One call on a fresh connection, within `timeout`.
    pub fn create_certificate(&self, call: &CaCall, timeout: Duration) -> Result<CaAnswer> {
        let addr = self.addr;
        let tcp = match &self.netns {
            Some(ns) => netns::run_in(ns, || {
                std::net::TcpStream::connect_timeout(&addr, timeout)
                    .with_context(|| format!("connecting to the CA at {addr} from netns {ns}"))
            })?,
            None => std::net::TcpStream::connect_timeout(&addr, timeout)
                .with_context(|| format!("connecting to the CA at {addr}"))?,
        };
        tcp.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for the CA call")?;
        rt.block_on(async {
            tokio::time::timeout(timeout, self.call_on(tcp, call))
                .await
                .map_err(|_| anyhow!("no answer from the CA at {addr} within {timeout:?}"))?
        })
    }

    async fn call_on(&self, tcp: std::net::TcpStream, call: &CaCall) -> Result<CaAnswer> {
        let tcp = tokio::net::TcpStream::from_std(tcp)?;
        let name = ServerName::try_from(self.server_name.clone())
            .with_context(|| format!("bad server name {:?}", self.server_name))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls_config()?)
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with the CA at {} as {:?}", self.addr, self.server_name))?;
        // tonic dials through a connector: hand it this one connection.
        let slot = Arc::new(Mutex::new(Some(tls)));
        let connector = tower::service_fn(move |_: http::Uri| {
            let stream = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            async move { stream.map(TokioIo::new).ok_or_else(|| std::io::Error::other("one connection per call")) }
        });
        let origin = format!("http://{}", self.addr);
        let channel = Endpoint::from_shared(origin)?
            .connect_with_connector(connector)
            .await
            .context("HTTP/2 with the CA")?;
        let mut metadata = None;
        if let Some(id) = &call.impersonated_identity {
            let mut fields = std::collections::BTreeMap::new();
            fields.insert(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.clone())) },
            );
            metadata = Some(prost_types::Struct { fields });
        }
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: call.csr.clone(),
            validity_duration: call.validity_s,
            metadata,
        });
        if let Some(t) = &call.token {
            let v = MetadataValue::try_from(format!("Bearer {t}"))
                .context("the token is not a valid header value")?;
            req.metadata_mut().insert("authorization", v);
        }
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.context("the gRPC channel")?;
        let res = grpc
            .unary(
                req,
                PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
                ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default(),
            )
            .await;
        Ok(match res {
            Ok(resp) => CaAnswer {
                code: tonic::Code::Ok,
                message: String::new(),
                retry_after_ms: None,
                cert_chain: resp.into_inner().cert_chain,
            },
            Err(st) => CaAnswer {
                code: st.code(),
                message: st.message().to_string(),
                retry_after_ms: st
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
                cert_chain: Vec::new(),
            },
        })
    }

    fn tls_config(&self) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.roots_pem.as_bytes()) {
            roots.add(c.context("a root of the trust bundle")?).context("adding a root")?;
        }
        if roots.is_empty() {
            bail!("no root certificate in the trust bundle given to the CA client");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

#[cfg(test)]
mod tests;
