//! `hbone-client`: one HTTP/2 CONNECT stream inside mutual TLS 1.3, as a sluice (or a ztunnel)
//! opens it to a destination pod's port 15008, with a client certificate given on the command
//! line (e.g. from `sluice ca issue`). Prints the CONNECT answer; on 200, sends `--send-bytes`
//! and reads what comes back until the stream ends, like `tcp-client`.
//!
//! Probes of the server's limits: `--streams N` opens N streams on one connection and shows
//! which are answered while the first ones stay open; `--header-bytes N` pads the CONNECT's
//! header list; `--no-preface` completes TLS and then sends nothing. `hbone-stall` holds many
//! TCP connections to the port without a byte of TLS.

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
    /// Open this many CONNECT streams on the one connection, none of them ended by the client,
    /// and report the server's stream limit and which streams are answered within
    /// `--answer-wait-ms`; then end the first stream and report whether the ones left waiting
    /// are answered once it is gone.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    #[arg(long, default_value_t = 1_000)]
    answer_wait_ms: u64,
    /// Add an `x-pad` header of this many bytes to the CONNECT request.
    #[arg(long, default_value_t = 0)]
    header_bytes: usize,
    /// Complete the TLS handshake, then send nothing (no HTTP/2 preface); report how long until
    /// the server closes the connection.
    #[arg(long)]
    no_preface: bool,
}

#[derive(clap::Args)]
pub struct StallArgs {
    /// The port to stall (`IP:15008`).
    #[arg(long)]
    to: SocketAddr,
    /// TCP connections kept open at once (each reopened when the server closes it).
    #[arg(long)]
    connections: usize,
    #[arg(long)]
    duration_ms: u64,
    /// Pause before reopening a connection the server closed.
    #[arg(long, default_value_t = 10)]
    reconnect_delay_ms: u64,
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
    let mut tls =
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| ("tls", e.to_string()))?;
    if a.no_preface {
        let started = std::time::Instant::now();
        let mut b = [0u8; 1024];
        let how = loop {
            match tokio::io::AsyncReadExt::read(&mut tls, &mut b).await {
                Ok(0) => break "eof".to_string(),
                Ok(_) => continue,
                Err(e) => break format!("{:?}", e.kind()),
            }
        };
        v["closed_by_server"] = json!(how);
        v["closed_after_ms"] = json!(started.elapsed().as_millis() as u64);
        return Ok(());
    }
    let (mut sender, conn) = h2::client::handshake(tls).await.map_err(|e| ("h2", e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    if a.streams > 1 {
        return many_streams(a, v, sender).await;
    }
    let req = connect_request(a)?;
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

fn connect_request(a: &Args) -> Result<http::Request<()>, Failure> {
    let mut b = http::Request::builder().method(http::Method::CONNECT).uri(a.target.as_str());
    if a.header_bytes > 0 {
        b = b.header("x-pad", "p".repeat(a.header_bytes));
    }
    b.body(()).map_err(|e| ("request", e.to_string()))
}

/// `--streams N`: N streams on one connection, kept open; which are answered, and when.
async fn many_streams(a: &Args, v: &mut Value, sender: h2::client::SendRequest<Bytes>) -> Result<(), Failure> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u16)>();
    let mut sender = sender.ready().await.map_err(|e| ("ready", e.to_string()))?;
    // The first stream alone: its answer comes after the server's SETTINGS, so the server's
    // stream limit is known before the others are opened.
    let (first, mut first_send) =
        sender.send_request(connect_request(a)?, false).map_err(|e| ("connect-request", e.to_string()))?;
    let first = first.await.map_err(|e| ("connect-response", e.to_string()))?;
    v["max_concurrent_streams"] = json!(sender.current_max_send_streams());
    let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
    *statuses.entry(first.status().as_u16()).or_default() += 1;
    let mut held = Vec::new();
    for i in 1..a.streams {
        sender = sender.ready().await.map_err(|e| ("ready", e.to_string()))?;
        let (resp, send) =
            sender.send_request(connect_request(a)?, false).map_err(|e| ("connect-request", e.to_string()))?;
        held.push(send);
        let tx = tx.clone();
        tokio::spawn(async move {
            let status = resp.await.map(|r| r.status().as_u16()).unwrap_or(0);
            let _ = tx.send((i, status));
        });
    }
    let mut answered = Vec::new();
    let wait = tokio::time::sleep(Duration::from_millis(a.answer_wait_ms));
    tokio::pin!(wait);
    loop {
        tokio::select! {
            Some((i, status)) = rx.recv() => {
                *statuses.entry(status).or_default() += 1;
                answered.push(i);
            }
            _ = &mut wait => break,
        }
    }
    v["answered_while_open"] = json!(answered.len() + 1);
    let waiting: Vec<usize> = (1..a.streams).filter(|i| !answered.contains(i)).collect();
    v["waiting"] = json!(waiting);
    // End the first stream on both sides; the streams left waiting may open now.
    first_send.send_data(Bytes::new(), true).map_err(|e| ("send", e.to_string()))?;
    let mut body = first.into_body();
    while let Some(chunk) = body.data().await {
        if let Ok(c) = chunk {
            let _ = body.flow_control().release_capacity(c.len());
        }
    }
    let mut later = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_millis(a.answer_wait_ms.max(1000) * 5));
    tokio::pin!(deadline);
    while later.len() < waiting.len() {
        tokio::select! {
            Some((i, status)) = rx.recv() => {
                *statuses.entry(status).or_default() += 1;
                later.push(i);
            }
            _ = &mut deadline => break,
        }
    }
    v["answered_after_one_ended"] = json!(later);
    v["statuses"] = json!(statuses);
    drop(held);
    Ok(())
}

/// `hbone-stall`: holds `--connections` TCP connections to the port without sending a byte,
/// reopening each one the server closes, for `--duration-ms`. Prints how many were opened, how
/// the server ended them, and how long they stayed open.
pub fn stall(a: StallArgs) -> bool {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(json!({"to": a.to.to_string()}), "runtime", e.to_string()),
    };
    let v = rt.block_on(async {
        let until = tokio::time::Instant::now() + Duration::from_millis(a.duration_ms);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..a.connections {
            let (to, delay) = (a.to, Duration::from_millis(a.reconnect_delay_ms));
            tasks.spawn(async move {
                // (opened, connect errors, closed by EOF, closed by reset, lifetimes in ms of those closed)
                let mut tally = (0u64, 0u64, 0u64, 0u64, Vec::new());
                while tokio::time::Instant::now() < until {
                    let mut s = match tokio::time::timeout_at(until, tokio::net::TcpStream::connect(to)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(_)) => {
                            tally.1 += 1;
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                        Err(_) => break,
                    };
                    tally.0 += 1;
                    let opened = std::time::Instant::now();
                    let mut b = [0u8; 256];
                    let ended = loop {
                        match tokio::time::timeout_at(until, tokio::io::AsyncReadExt::read(&mut s, &mut b)).await {
                            Ok(Ok(0)) => break Some(true),
                            Ok(Ok(_)) => continue,
                            Ok(Err(_)) => break Some(false),
                            Err(_) => break None,
                        }
                    };
                    match ended {
                        Some(eof) => {
                            if eof {
                                tally.2 += 1;
                            } else {
                                tally.3 += 1;
                            }
                            tally.4.push(opened.elapsed().as_millis() as u64);
                            tokio::time::sleep(delay).await;
                        }
                        None => break,
                    }
                }
                tally
            });
        }
        let (mut opened, mut connect_errors, mut eof, mut reset, mut lifetimes) = (0, 0, 0, 0, Vec::new());
        while let Some(t) = tasks.join_next().await {
            let t = t.expect("stall task");
            opened += t.0;
            connect_errors += t.1;
            eof += t.2;
            reset += t.3;
            lifetimes.extend(t.4);
        }
        lifetimes.sort_unstable();
        let pct = |p: usize| lifetimes.get(lifetimes.len().saturating_sub(1) * p / 100).copied();
        json!({
            "to": a.to.to_string(),
            "opened": opened,
            "connect_errors": connect_errors,
            "closed_eof": eof,
            "closed_reset": reset,
            "lifetime_ms": {"min": lifetimes.first(), "p50": pct(50), "max": lifetimes.last()},
            "long_lived": lifetimes.iter().filter(|ms| **ms >= 1000).count(),
        })
    });
    emit(v);
    true
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
