//! `hbone-client`: one HTTP/2 CONNECT stream inside mutual TLS 1.3, as a sluice (or a ztunnel)
//! opens it to a destination pod's port 15008, with a client certificate given on the command
//! line (e.g. from `sluice ca issue`). Prints the CONNECT answer; on 200, sends `--send-bytes`
//! and reads what comes back until the stream ends, like `tcp-client`.

use std::{future::poll_fn, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, RootCertStore,
};
use serde_json::{json, Value};

use crate::emit;

#[derive(clap::Args)]
pub struct Args {
    /// The destination pod's tunnel port (`IP:15008`).
    #[arg(long)]
    to: SocketAddr,
    /// The CONNECT target (`IP:port`).
    #[arg(long)]
    target: String,
    /// Client certificate chain and key (PEM).
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Trusted roots for the server's certificate (the mesh CA, PEM). The server's SPIFFE
    /// identity is not checked: this client probes what the server does.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long, default_value_t = 0)]
    send_bytes: u64,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

pub fn client(a: Args) -> bool {
    let mut v = json!({"to": a.to.to_string(), "target": a.target});
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(v, "runtime", e.to_string()),
    };
    let timeout = Duration::from_millis(a.timeout_ms);
    match rt.block_on(async { tokio::time::timeout(timeout, run(&a, &mut v)).await }) {
        Ok(Ok(())) => {
            v["ok"] = json!(true);
            emit(v);
            true
        }
        Ok(Err((stage, e))) => fail(v, stage, e),
        Err(_) => fail(v, "timeout", format!("no result within {timeout:?}")),
    }
}

fn fail(mut v: Value, stage: &str, error: String) -> bool {
    v["ok"] = json!(false);
    v["stage"] = json!(stage);
    v["error"] = json!(error);
    emit(v);
    false
}

type Failure = (&'static str, String);

fn config(a: &Args) -> Result<Arc<ClientConfig>, String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read(&a.ca)?) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&a.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(&read(&a.key)?).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

async fn run(a: &Args, v: &mut Value) -> Result<(), Failure> {
    let cfg = config(a).map_err(|e| ("config", e))?;
    let tcp = tokio::net::TcpStream::connect(a.to).await.map_err(|e| ("connect", e.to_string()))?;
    let name = ServerName::IpAddress(a.to.ip().into());
    let tls =
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| ("tls", e.to_string()))?;
    let (mut sender, conn) = h2::client::handshake(tls).await.map_err(|e| ("h2", e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(a.target.as_str())
        .body(())
        .map_err(|e| ("request", e.to_string()))?;
    let (response, mut send) =
        sender.send_request(req, false).map_err(|e| ("connect-request", e.to_string()))?;
    let response = response.await.map_err(|e| ("connect-response", e.to_string()))?;
    v["status"] = json!(response.status().as_u16());
    if response.status() != http::StatusCode::OK {
        return Ok(());
    }
    let mut body = response.into_body();
    if a.send_bytes > 0 {
        let data = Bytes::from(vec![b'x'; a.send_bytes as usize]);
        send.reserve_capacity(data.len());
        let mut rest = data;
        while !rest.is_empty() {
            let n = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n.min(rest.len()),
                Some(Err(e)) => return Err(("send", e.to_string())),
                None => return Err(("send", "stream closed".into())),
            };
            if n > 0 {
                send.send_data(rest.split_to(n), false).map_err(|e| ("send", e.to_string()))?;
            }
        }
    }
    send.send_data(Bytes::new(), true).map_err(|e| ("send", e.to_string()))?;
    let mut received = 0u64;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| ("receive", e.to_string()))?;
        received += chunk.len() as u64;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    v["sent"] = json!(a.send_bytes);
    v["received"] = json!(received);
    Ok(())
}

/// Verifies the server's chain against the mesh root but not its name: a mesh server's
/// certificate carries only a SPIFFE URI, which is not a TLS server name.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
