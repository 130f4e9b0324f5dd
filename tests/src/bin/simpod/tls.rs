//! TLS echo server (self-signed certificate made at start) and client (rustls, ring provider),
//! and an HTTPS server (simpod's HTTP server behind TLS, for TLS origination tests).

use std::{
    fs,
    io::{self, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{addr_str, emit, err_str, hex, http_exchanges, serve, HttpBehaviour, HttpBehaviourArgs, Pattern};

/// The certificate's DNS name; clients use it as --server-name.
const DEFAULT_NAME: &str = "tls-backend.test";

#[derive(clap::Args)]
pub struct ServerArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    bind: String,
    /// Where to write the certificate (PEM) for clients to trust; written before listening.
    #[arg(long)]
    cert_out: PathBuf,
    /// Extra subject alternative names (DNS names or IPs; repeatable). The certificate always
    /// names tls-backend.test and every address of the pod's interfaces.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// ALPN protocols to offer, comma-separated (e.g. h2,http/1.1); none by default.
    #[arg(long, value_delimiter = ',')]
    alpn: Vec<String>,
}

#[derive(clap::Args)]
pub struct HttpsServerArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    bind: String,
    /// Where to write the certificate (PEM) for clients to trust; written before listening.
    #[arg(long)]
    cert_out: PathBuf,
    /// Extra subject alternative names (DNS names or IPs; repeatable), as for tls-echo-server.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Require a client certificate issued by a certificate of this PEM file (mutual TLS); the
    /// answers then carry `client_cert_sha256`, the client certificate's fingerprint.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    #[command(flatten)]
    behaviour: HttpBehaviourArgs,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long, value_parser = crate::parse_sock_addr)]
    to: SocketAddr,
    /// SNI and the name the certificate must carry (a DNS name or an IP).
    #[arg(long, default_value = DEFAULT_NAME)]
    server_name: String,
    /// PEM file of the only certificates trusted (the server's --cert-out).
    #[arg(long)]
    ca: PathBuf,
    #[arg(long, default_value_t = 0)]
    send_bytes: u64,
    /// ALPN protocols to offer, comma-separated; none by default.
    #[arg(long, value_delimiter = ',')]
    alpn: Vec<String>,
    /// Connect timeout, and the longest the exchange may make no progress.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every address of this network namespace's interfaces (the pod IP and loopback).
fn local_ips() -> Vec<IpAddr> {
    let mut ips = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(addr) = a.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                ips.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                ips.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    ips.sort();
    ips.dedup();
    ips
}

fn write_atomic(path: &Path, contents: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp-simpod");
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
}

fn alpn_list(v: &[String]) -> Vec<Vec<u8>> {
    v.iter().filter(|p| !p.is_empty()).map(|p| p.as_bytes().to_vec()).collect()
}

fn server_config(a: &ServerArgs) -> Result<(Arc<ServerConfig>, Vec<String>), String> {
    make_server_config(&a.cert_out, &a.sans, &a.alpn, None)
}

fn make_server_config(
    cert_out: &Path,
    extra_sans: &[String],
    alpn: &[String],
    client_ca: Option<&Path>,
) -> Result<(Arc<ServerConfig>, Vec<String>), String> {
    let mut sans = vec![DEFAULT_NAME.to_string()];
    sans.extend(local_ips().iter().map(|ip| ip.to_string()));
    sans.extend(extra_sans.iter().cloned());
    sans.dedup();
    let mut params = rcgen::CertificateParams::new(sans.clone()).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, DEFAULT_NAME);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    write_atomic(cert_out, &cert.pem())
        .map_err(|e| format!("writing {}: {}", cert_out.display(), err_str(&e)))?;
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let pem = fs::read(path).map_err(|e| format!("reading {}: {}", path.display(), err_str(&e)))?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(vec![cert.der().clone()], key).map_err(|e| e.to_string())?;
    config.alpn_protocols = alpn_list(alpn);
    Ok((Arc::new(config), sans))
}

pub fn server(a: ServerArgs) -> bool {
    let (config, sans) = match server_config(&a) {
        Ok(c) => c,
        Err(e) => {
            emit(json!({"event": "error", "stage": "certificate", "error": e}));
            return false;
        }
    };
    emit(json!({"event": "certificate", "path": a.cert_out.display().to_string(), "sans": sans}));
    serve(&a.bind, a.port, move |s| tls_conn(s, config.clone()))
}

pub fn https_server(a: HttpsServerArgs) -> bool {
    let (config, sans) = match make_server_config(&a.cert_out, &a.sans, &[], a.client_ca.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            emit(json!({"event": "error", "stage": "certificate", "error": e}));
            return false;
        }
    };
    emit(json!({"event": "certificate", "path": a.cert_out.display().to_string(), "sans": sans}));
    let behaviour = Arc::new(HttpBehaviour::new(a.behaviour));
    serve(&a.bind, a.port, move |s| https_conn(s, config.clone(), &behaviour))
}

/// One HTTPS connection: the handshake (a failure is printed as `tls_error`, e.g. a client that
/// does not trust the certificate), then HTTP/1.1 requests answered as http-server does, each
/// answer and request event also carrying the SNI the client sent.
fn https_conn(s: TcpStream, config: Arc<ServerConfig>, behaviour: &HttpBehaviour) {
    let peer = addr_str(s.peer_addr());
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let conn = match ServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => {
            emit(json!({"event": "tls_error", "peer": peer, "stage": "setup", "error": e.to_string()}));
            return;
        }
    };
    let mut tls = StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            emit(json!({"event": "tls_error", "peer": peer, "stage": "handshake", "error": err_str(&e)}));
            return;
        }
    }
    let (version, _, alpn) = version_and_cipher(&tls.conn);
    let sni = tls.conn.server_name().map(str::to_owned);
    emit(json!({"event": "tls_accepted", "peer": peer, "sni": sni, "version": version, "alpn": alpn}));
    let mut extra = serde_json::Map::new();
    extra.insert("tls".into(), json!(true));
    extra.insert("sni".into(), json!(sni));
    extra.insert("tls_version".into(), version);
    if let Some(cert) = tls.conn.peer_certificates().and_then(|c| c.first()) {
        extra.insert("client_cert_sha256".into(), json!(hex(&Sha256::digest(cert.as_ref()))));
    }
    let mut r = BufReader::new(tls);
    http_exchanges(&mut r, &peer, behaviour, &extra);
    let tls = r.get_mut();
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let _ = tls.sock.shutdown(Shutdown::Write);
}

fn version_and_cipher(c: &rustls::CommonState) -> (Value, Value, Value) {
    (
        c.protocol_version().map(|v| json!(format!("{v:?}"))).unwrap_or(Value::Null),
        c.negotiated_cipher_suite().map(|s| json!(format!("{:?}", s.suite()))).unwrap_or(Value::Null),
        c.alpn_protocol().map(|p| json!(String::from_utf8_lossy(p))).unwrap_or(Value::Null),
    )
}

fn tls_conn(s: TcpStream, config: Arc<ServerConfig>) {
    let peer = addr_str(s.peer_addr());
    let conn = match ServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => {
            emit(json!({"event": "tls_error", "peer": peer, "stage": "setup", "error": e.to_string()}));
            return;
        }
    };
    let mut tls = StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            emit(json!({"event": "tls_error", "peer": peer, "stage": "handshake", "error": err_str(&e)}));
            return;
        }
    }
    let (version, cipher, alpn) = version_and_cipher(&tls.conn);
    emit(json!({
        "event": "tls_accepted",
        "peer": peer,
        "sni": tls.conn.server_name(),
        "version": version,
        "cipher": cipher,
        "alpn": alpn,
    }));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    // Ok(true): the client's close_notify; Ok(false): TCP EOF without it.
    let res = loop {
        match tls.read(&mut buf) {
            Ok(0) => break Ok(true),
            Ok(n) => {
                if let Err(e) = tls.write_all(&buf[..n]).and_then(|_| tls.flush()) {
                    break Err(e);
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(false),
            Err(e) => break Err(e),
        }
    };
    // Finish our direction as the client did: close_notify, then FIN.
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let _ = tls.sock.shutdown(Shutdown::Write);
    let (clean, error) = match res {
        Ok(clean) => (clean, None),
        Err(e) => (false, Some(err_str(&e))),
    };
    emit(json!({"event": "closed", "peer": peer, "bytes": total, "close_notify": clean, "error": error}));
}

/// What the client's exchange produced.
struct Exchange {
    sent: u64,
    received: u64,
    sha256_sent: String,
    sha256_received: String,
    /// The server's close_notify arrived (vs a bare TCP EOF).
    close_notify: bool,
}

/// Waits until `fd` is readable (or writable too, if `write`); false on timeout.
fn wait_io(fd: i32, write: bool, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN | if write { libc::POLLOUT } else { 0 }, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Sends `send_bytes` pattern bytes and reads the echo at the same time, on a non-blocking
/// socket (one rustls connection cannot be shared by a reader and a writer thread, and an echo
/// peer deadlocks a client that writes everything before reading). After the last byte:
/// close_notify, then shutdown(SHUT_WR); done at the server's close_notify or EOF.
fn exchange(
    conn: &mut ClientConnection,
    sock: &mut TcpStream,
    send_bytes: u64,
    idle: Duration,
) -> Result<Exchange, (&'static str, String)> {
    let io_err = |stage: &'static str| move |e: io::Error| (stage, err_str(&e));
    sock.set_nonblocking(true).map_err(io_err("connect"))?;
    let fd = sock.as_raw_fd();
    let mut pattern = Pattern::new();
    let (mut sha_sent, mut sha_received) = (Sha256::new(), Sha256::new());
    let mut chunk = vec![0u8; 0];
    let mut chunk_off = 0;
    let mut generated: u64 = 0;
    let mut received: u64 = 0;
    let mut close_sent = false;
    let mut write_shut = false;
    let mut plain = vec![0u8; 64 * 1024];
    let stage = |c: &ClientConnection| {
        if c.is_handshaking() {
            "handshake"
        } else {
            "data"
        }
    };
    loop {
        // Hand plaintext to rustls until its buffer is full.
        loop {
            if chunk_off == chunk.len() {
                if generated == send_bytes {
                    break;
                }
                let n = (send_bytes - generated).min(16 * 1024) as usize;
                chunk.resize(n, 0);
                pattern.fill(&mut chunk);
                sha_sent.update(&chunk);
                generated += n as u64;
                chunk_off = 0;
            }
            match conn.writer().write(&chunk[chunk_off..]) {
                Ok(0) => break,
                Ok(n) => chunk_off += n,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(io_err("write")(e)),
            }
        }
        // close_notify only once the handshake is done: sent earlier it would abort it (and
        // every byte accepted above is then on its way, buffered plaintext first).
        if !close_sent && !conn.is_handshaking() && generated == send_bytes && chunk_off == chunk.len() {
            conn.send_close_notify();
            close_sent = true;
        }
        while conn.wants_write() {
            match conn.write_tls(sock) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(io_err(stage(conn))(e)),
            }
        }
        if close_sent && !conn.wants_write() && !write_shut {
            sock.shutdown(Shutdown::Write).map_err(io_err("shutdown"))?;
            write_shut = true;
        }
        if !wait_io(fd, conn.wants_write(), idle).map_err(io_err("poll"))? {
            return Err((stage(conn), format!("no progress for {idle:?}")));
        }
        // Read what arrived, decrypt, drain the plaintext.
        loop {
            let eof = match conn.read_tls(sock) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(io_err(stage(conn))(e)),
            };
            if let Err(e) = conn.process_new_packets() {
                // Tell the server why (e.g. a certificate alert), best effort.
                let _ = conn.write_tls(sock);
                return Err((stage(conn), e.to_string()));
            }
            loop {
                match conn.reader().read(&mut plain) {
                    Ok(0) => {
                        return Ok(Exchange {
                            sent: generated,
                            received,
                            sha256_sent: hex(&sha_sent.finalize()),
                            sha256_received: hex(&sha_received.finalize()),
                            close_notify: true,
                        })
                    }
                    Ok(n) => {
                        sha_received.update(&plain[..n]);
                        received += n as u64;
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        if conn.is_handshaking() {
                            return Err(("handshake", "connection closed by the server".into()));
                        }
                        return Ok(Exchange {
                            sent: generated,
                            received,
                            sha256_sent: hex(&sha_sent.finalize()),
                            sha256_received: hex(&sha_received.finalize()),
                            close_notify: false,
                        });
                    }
                    Err(e) => return Err(io_err("read")(e)),
                }
            }
            if eof {
                return Err((stage(conn), "connection closed by the server".into()));
            }
        }
    }
}

fn client_config(a: &ClientArgs) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(&a.ca).map_err(|e| format!("reading {}: {e}", a.ca.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("reading {}: {e}", a.ca.display()))?;
        roots.add(c).map_err(|e| e.to_string())?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn_list(&a.alpn);
    Ok(Arc::new(config))
}

pub fn client(a: ClientArgs) -> bool {
    let started = Instant::now();
    let timeout = Duration::from_millis(a.timeout_ms);
    let mut v = json!({"to": a.to.to_string(), "server_name": a.server_name});
    let failed = |stage: &str, e: String, v: &mut Value| {
        v["ok"] = json!(false);
        v["stage"] = json!(stage);
        v["error"] = json!(e);
        emit(v.take());
        false
    };
    let config = match client_config(&a) {
        Ok(c) => c,
        Err(e) => return failed("config", e, &mut v),
    };
    let name = match ServerName::try_from(a.server_name.clone()) {
        Ok(n) => n,
        Err(e) => return failed("config", e.to_string(), &mut v),
    };
    let mut conn = match ClientConnection::new(config, name) {
        Ok(c) => c,
        Err(e) => return failed("config", e.to_string(), &mut v),
    };
    let mut sock = match crate::connect(a.to, timeout) {
        Ok(s) => s,
        Err(e) => return failed("connect", err_str(&e), &mut v),
    };
    v["local"] = addr_str(sock.local_addr());
    v["peer"] = addr_str(sock.peer_addr());
    let res = exchange(&mut conn, &mut sock, a.send_bytes, timeout);
    let (version, cipher, alpn) = version_and_cipher(&conn);
    v["version"] = version;
    v["cipher"] = cipher;
    v["alpn"] = alpn;
    match res {
        Ok(x) => {
            v["ok"] = json!(true);
            v["echo_exact"] = json!(x.sent == x.received && x.sha256_sent == x.sha256_received);
            v["sent"] = json!(x.sent);
            v["received"] = json!(x.received);
            v["sha256_sent"] = json!(x.sha256_sent);
            v["sha256_received"] = json!(x.sha256_received);
            v["close_notify"] = json!(x.close_notify);
            v["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
            emit(v);
            true
        }
        Err((stage, e)) => failed(stage, e, &mut v),
    }
}
