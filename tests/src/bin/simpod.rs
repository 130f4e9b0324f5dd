//! simpod: the workload helper run inside simulated pods. Every subcommand prints JSON lines on
//! stdout (one object per event or result), so tests parse results instead of scraping text and
//! wait for `{"event":"listening"}` instead of sleeping.
//!
//! Plain threads and blocking sockets: one thread per connection is plenty for tests, and keeps
//! the byte-level behaviour (half-close, EOF, resets) obvious.
//!
//! The workloads of the L7 tests live in modules next to this file: `raw` (exact bytes out,
//! everything back), `ws` (WebSocket echo), `tls` (TLS echo with a self-signed certificate),
//! `banner` (a server-first protocol), `load` (concurrent or fixed-rate HTTP/1.1 requests with
//! a tally by status and by sluice's error headers). The HTTP server can fail on purpose
//! (`--fail-percent`, `--fail-file`) for the resilience tests, and `tls` also has an HTTPS
//! variant of it (`https-server`). `bookinfo` stands in for the applications of Istio's Bookinfo
//! sample in the playground.

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

// This file is the crate root, so its modules are found next to it unless told otherwise.
#[path = "simpod/banner.rs"]
mod banner;
#[path = "simpod/bookinfo.rs"]
mod bookinfo;
#[path = "simpod/hbone.rs"]
mod hbone;
#[path = "simpod/load.rs"]
mod load;
#[path = "simpod/raw.rs"]
mod raw;
#[path = "simpod/tls.rs"]
mod tls;
#[path = "simpod/ws.rs"]
mod ws;

#[derive(Parser)]
#[command(name = "simpod", about = "Workload helper for the sluice node simulator (JSON lines on stdout)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo: echo every byte until the client's EOF, then half-close and close.
    EchoServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
    },
    /// HTTP/1.1 keep-alive server answering every request with JSON describing it.
    /// Query parameters: `status=NNN` sets the response status, `delay_ms=N` delays the answer.
    /// Prints one `{"event":"request"}` line per request, with the status it answered.
    HttpServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        #[command(flatten)]
        behaviour: HttpBehaviourArgs,
    },
    /// Connect, send N pattern bytes, half-close, read to EOF; print hashes of both directions.
    TcpClient {
        #[arg(long, value_parser = parse_sock_addr)]
        to: SocketAddr,
        #[arg(long, default_value_t = 0)]
        send_bytes: u64,
        /// Connect timeout, and the longest a single read or write may block.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// N HTTP GETs (one keep-alive connection with --keepalive, else one connection each).
    HttpGet {
        #[arg(long, value_parser = parse_sock_addr)]
        to: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        keepalive: bool,
        /// Host header (default: the --to address).
        #[arg(long)]
        host: Option<String>,
        /// Extra request header `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Hold one connection open: send each stdin line, print each echoed line.
    Hold {
        #[arg(long, value_parser = parse_sock_addr)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
    /// N short connections, each sending "ping\n" and reading the echo (exit 0 even when some
    /// attempts fail: each line says how it went).
    Loop {
        #[arg(long, value_parser = parse_sock_addr)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 10)]
        count: u64,
    },
    /// Send exact bytes (e.g. malformed HTTP/1.1 or HTTP/2), then read until EOF, reset or
    /// timeout, and print what came back.
    Raw(raw::Args),
    /// WebSocket echo server (text and binary messages).
    WsEchoServer(ws::ServerArgs),
    /// WebSocket client: N binary messages of pattern bytes, each echo checked byte for byte.
    WsClient(ws::ClientArgs),
    /// TLS echo server with a fresh self-signed certificate (PEM written to --cert-out).
    TlsEchoServer(tls::ServerArgs),
    /// TLS client: trust only --ca, send N pattern bytes, close_notify, read the echo to EOF.
    TlsClient(tls::ClientArgs),
    /// HTTPS (HTTP/1.1 over TLS) version of http-server, with a fresh self-signed certificate
    /// (PEM written to --cert-out); its answers also say the SNI it saw.
    HttpsServer(tls::HttpsServerArgs),
    /// HTTP/1.1 load: N requests over C keep-alive connections (closed loop), or a fixed rate
    /// for a duration (open loop); a summary tallied by status and by sluice's error headers.
    HttpLoad(load::Args),
    /// Server-first protocol: writes `BANNER\r\n` on accept, then echoes lines until EOF.
    BannerServer(banner::ServerArgs),
    /// Reads the banner without sending first, then sends `QUIT\r\n` and reads its echo.
    BannerClient(banner::ClientArgs),
    /// One HBONE stream (HTTP/2 CONNECT in mutual TLS) to a pod's port 15008.
    HboneClient(hbone::Args),
    /// Many TCP connections to a pod's port 15008 that never start TLS.
    HboneStall(hbone::StallArgs),
    /// A stand-in for one of Bookinfo's applications (productpage, details, reviews, ratings):
    /// its call graph, timeouts and header propagation (see bookinfo.rs).
    Bookinfo(bookinfo::Args),
}

/// Prints one JSON line. Write errors are ignored: if the reader went away (a kept demo whose
/// test process exited), a server must keep serving rather than die on EPIPE.
fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn err_str(e: &io::Error) -> String {
    format!("{:?}: {e}", e.kind())
}

fn addr_str(r: io::Result<SocketAddr>) -> Value {
    r.map(|a| json!(a.to_string())).unwrap_or(Value::Null)
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ok = match cli.cmd {
        Cmd::EchoServer { port, bind } => serve(&bind, port, echo_conn),
        Cmd::HttpServer { port, bind, behaviour } => {
            let behaviour = Arc::new(HttpBehaviour::new(behaviour));
            serve(&bind, port, move |s| http_conn(s, &behaviour))
        }
        Cmd::TcpClient { to, send_bytes, timeout_ms } => {
            tcp_client(to, send_bytes, Duration::from_millis(timeout_ms))
        }
        Cmd::HttpGet { to, path, count, keepalive, host, headers, timeout_ms } => {
            http_get(to, &path, count, keepalive, host, &headers, Duration::from_millis(timeout_ms))
        }
        Cmd::Hold { to, timeout_ms } => hold(to, Duration::from_millis(timeout_ms)),
        Cmd::Loop { to, interval_ms, count } => run_loop(to, Duration::from_millis(interval_ms), count),
        Cmd::Raw(a) => raw::run(a),
        Cmd::WsEchoServer(a) => ws::server(a),
        Cmd::WsClient(a) => ws::client(a),
        Cmd::TlsEchoServer(a) => tls::server(a),
        Cmd::TlsClient(a) => tls::client(a),
        Cmd::HttpsServer(a) => tls::https_server(a),
        Cmd::HttpLoad(a) => load::run(a),
        Cmd::BannerServer(a) => banner::server(a),
        Cmd::BannerClient(a) => banner::client(a),
        Cmd::HboneClient(a) => hbone::client(a),
        Cmd::HboneStall(a) => hbone::stall(a),
        Cmd::Bookinfo(a) => bookinfo::run(a),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------- servers

/// A socket address as `--to` takes it: `10.0.0.1:80`, `[fd00::1]:80`, or a link-local IPv6
/// address with its interface, by name or index: `[fe80::1%eth0]:80`, `[fe80::1%2]:80` (the
/// standard library only parses the index).
pub(crate) fn parse_sock_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let bad = || format!("{s:?} is not a socket address (10.0.0.1:80, [fd00::1]:80, [fe80::1%eth0]:80)");
    let (host, port) = s.strip_prefix('[').and_then(|r| r.split_once("]:")).ok_or_else(bad)?;
    let (ip, zone) = host.split_once('%').ok_or_else(bad)?;
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let scope = nix::net::if_::if_nametoindex(zone)
        .map_err(|e| format!("{s:?}: no interface {zone:?} here ({e})"))?;
    Ok(SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, scope)))
}

/// Where `--bind HOST --port PORT` listens: HOST is an IPv4 or IPv6 address (`::` takes both
/// families), optionally with an interface for a link-local one (`fe80::1%eth0`).
fn bind_addr(host: &str, port: u16) -> Result<SocketAddr, String> {
    if host.contains(':') {
        parse_sock_addr(&format!("[{host}]:{port}"))
    } else {
        parse_sock_addr(&format!("{host}:{port}"))
    }
}

fn serve(bind: &str, port: u16, handler: impl Fn(TcpStream) + Send + Clone + 'static) -> bool {
    let addr = match bind_addr(bind, port) {
        Ok(a) => a,
        Err(e) => {
            emit(json!({"event": "error", "error": e}));
            return false;
        }
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            emit(json!({"event": "error", "error": err_str(&e)}));
            return false;
        }
    };
    emit(json!({"event": "listening", "addr": addr_str(listener.local_addr())}));
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let h = handler.clone();
                thread::spawn(move || h(stream));
            }
            // E.g. EMFILE under load, or an aborted connection: keep accepting.
            Err(e) => emit(json!({"event": "accept_error", "error": err_str(&e)})),
        }
    }
    true
}

fn echo_conn(mut s: TcpStream) {
    let peer = addr_str(s.peer_addr());
    let local = addr_str(s.local_addr());
    emit(json!({"event": "accepted", "peer": peer, "local": local}));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    let res = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = s.write_all(&buf[..n]) {
                    break Err(e);
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    // Client's EOF: finish our direction too, then close.
    let _ = s.shutdown(Shutdown::Write);
    let error = res.err().map(|e| err_str(&e));
    emit(json!({"event": "closed", "peer": peer, "bytes": total, "error": error}));
}

/// A parsed HTTP/1.x request head.
struct Request {
    method: String,
    target: String,
    version: String,
    headers: Headers,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn keep_alive(&self) -> bool {
        let conn = self.header("connection").map(|v| v.to_ascii_lowercase()).unwrap_or_default();
        if self.version == "HTTP/1.0" {
            conn.contains("keep-alive")
        } else {
            !conn.contains("close")
        }
    }

    fn query(&self, key: &str) -> Option<&str> {
        let q = self.target.split_once('?')?.1;
        q.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// Reads one line ending in CRLF (or LF); `None` at a clean EOF before any byte.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = r.take(64 * 1024).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "line too long or truncated"));
    }
    Ok(Some(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string()))
}

type Headers = Vec<(String, String)>;

/// Reads a head (start line + headers); `None` at EOF before it starts.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<(String, Headers)>> {
    let start = loop {
        match read_line(r)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue, // tolerate stray CRLF between messages
            Some(l) => break l,
        }
    };
    let mut headers = Vec::new();
    loop {
        let line =
            read_line(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in headers"))?;
        if line.is_empty() {
            return Ok(Some((start, headers)));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
}

/// Reads a message body framed by content-length or chunked encoding.
fn read_body(r: &mut impl BufRead, headers: &Headers, until_eof: bool) -> io::Result<Vec<u8>> {
    let get = |n: &str| {
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.to_ascii_lowercase())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let line = read_line(r)?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in chunked body"))?;
            let size =
                usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {line:?}"))
                })?;
            if size == 0 {
                // Trailers until the empty line.
                while read_line(r)?.is_some_and(|l| !l.is_empty()) {}
                return Ok(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            read_line(r)?; // CRLF after the chunk
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad content-length {len:?}")))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if until_eof {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        302 => "Found",
        401 => "Unauthorized",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// How the HTTP servers (http-server, https-server) answer.
#[derive(clap::Args)]
struct HttpBehaviourArgs {
    #[arg(long)]
    name: String,
    /// Delay every response by N ms (a consistently slow backend), before any `delay_ms`.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Answer this share of the requests (percent, 0-100) with --fail-status instead, chosen
    /// at random from a sequence seeded by --fail-seed (the same decisions in every run).
    #[arg(long, default_value_t = 0.0)]
    fail_percent: f64,
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    #[arg(long, default_value_t = 1)]
    fail_seed: u64,
    /// While this file exists, answer every request with the status written in it (e.g. 500):
    /// a test flips the backend to failing and back by writing and removing the file.
    #[arg(long)]
    fail_file: Option<PathBuf>,
}

struct HttpBehaviour {
    name: String,
    delay: Duration,
    fail_percent: f64,
    fail_status: u16,
    fail_file: Option<PathBuf>,
    /// xorshift64* state of the --fail-percent decisions.
    rng: Mutex<u64>,
}

impl HttpBehaviour {
    fn new(a: HttpBehaviourArgs) -> HttpBehaviour {
        HttpBehaviour {
            name: a.name,
            delay: Duration::from_millis(a.delay_ms),
            fail_percent: a.fail_percent.clamp(0.0, 100.0),
            fail_status: a.fail_status,
            fail_file: a.fail_file,
            // A zero state would stay zero.
            rng: Mutex::new(a.fail_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
        }
    }

    /// Uniform in [0, 100).
    fn roll(&self) -> f64 {
        let mut x = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 11) as f64 / (1u64 << 53) as f64 * 100.0
    }

    /// The status to answer and why it is not 200 (`None`: the request's own choice).
    fn status(&self, req: &Request) -> (u16, Option<&'static str>) {
        if let Some(path) = &self.fail_file {
            if let Ok(text) = std::fs::read_to_string(path) {
                return (text.trim().parse().unwrap_or(500), Some("fail-file"));
            }
        }
        if self.fail_percent > 0.0 && self.roll() < self.fail_percent {
            return (self.fail_status, Some("fail-percent"));
        }
        (req.query("status").and_then(|v| v.parse::<u16>().ok()).unwrap_or(200), None)
    }
}

fn http_conn(s: TcpStream, behaviour: &HttpBehaviour) {
    let peer = addr_str(s.peer_addr());
    let mut r = BufReader::new(s);
    if http_exchanges(&mut r, &peer, behaviour, &Map::new()) {
        let _ = r.get_ref().shutdown(Shutdown::Write);
    }
}

/// Serves HTTP/1.1 requests on one connection (plain or TLS) until the client's EOF, an error,
/// or a request that asked to close; `extra` goes into every request event and answer (e.g. the
/// SNI of a TLS connection). Returns true when the server should finish its direction (the
/// request asked to close).
fn http_exchanges<S: Read + Write>(
    r: &mut BufReader<S>,
    peer: &Value,
    srv: &HttpBehaviour,
    extra: &Map<String, Value>,
) -> bool {
    let name = srv.name.as_str();
    loop {
        let (start, headers) = match read_head(r) {
            Ok(Some(h)) => h,
            Ok(None) => return false,
            Err(e) => {
                emit(json!({"event": "request_error", "peer": peer, "error": err_str(&e)}));
                return false;
            }
        };
        let mut parts = start.split_whitespace();
        let req = Request {
            method: parts.next().unwrap_or_default().to_string(),
            target: parts.next().unwrap_or_default().to_string(),
            version: parts.next().unwrap_or("HTTP/1.1").to_string(),
            headers,
        };
        // curl and others wait (about a second) for this before sending a large body.
        if req.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            && r.get_mut()
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .and_then(|_| r.get_mut().flush())
                .is_err()
        {
            return false;
        }
        let body = match read_body(r, &req.headers, false) {
            Ok(b) => b,
            Err(e) => {
                emit(json!({"event": "request_error", "peer": peer, "error": err_str(&e)}));
                return false;
            }
        };
        let query = req.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let body_sha256 = hex(&Sha256::digest(&body));
        let mut hdrs = Map::new();
        for (k, v) in &req.headers {
            let k = k.to_ascii_lowercase();
            let merged = match hdrs.get(&k).and_then(|x| x.as_str()) {
                Some(prev) => format!("{prev}, {v}"),
                None => v.clone(),
            };
            hdrs.insert(k, json!(merged));
        }
        let (status, failed) = srv.status(&req);
        let mut event = json!({
            "event": "request",
            "ts_ms": now_ms() as u64,
            "ts_us": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0),
            "peer": peer,
            "method": req.method,
            "path": req.target,
            "version": req.version,
            "query": query,
            "headers": hdrs,
            "raw_headers": req.headers,
            "body_bytes": body.len(),
            "body_sha256": body_sha256,
            "status": status,
            "failed": failed,
        });
        for (k, v) in extra {
            event[k] = v.clone();
        }
        emit(event);
        if !srv.delay.is_zero() {
            thread::sleep(srv.delay);
        }
        if let Some(ms) = req.query("delay_ms").and_then(|v| v.parse::<u64>().ok()) {
            // A deliberately slow backend (for timeout tests), not a readiness wait.
            thread::sleep(Duration::from_millis(ms));
        }
        let mut resp_body = json!({
            "name": name,
            "peer": peer,
            "method": req.method,
            "path": req.target,
            "query": query,
            "headers": hdrs,
            "body_bytes": body.len(),
            "body_sha256": body_sha256,
        });
        for (k, v) in extra {
            resp_body[k] = v.clone();
        }
        let resp_body = resp_body.to_string();
        let keep = req.keep_alive();
        let head = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-simpod-name: {name}\r\n{}\r\n",
            reason(status),
            resp_body.len(),
            if keep { "" } else { "connection: close\r\n" }
        );
        // One write for head and body, as real servers do: two small writes on a Nagle socket
        // stall on the peer's delayed ACK (40 ms) once a connection is long-lived.
        let mut response = head.into_bytes();
        response.extend_from_slice(resp_body.as_bytes());
        if r.get_mut().write_all(&response).and_then(|_| r.get_mut().flush()).is_err() {
            return false;
        }
        if !keep {
            return true;
        }
    }
}

// ---------------------------------------------------------------- clients

/// The deterministic byte pattern clients send (xorshift64*), so both ends can be compared by
/// hash without storing the data.
struct Pattern(u64);

impl Pattern {
    fn new() -> Pattern {
        Pattern(0x9E37_79B9_7F4A_7C15)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn connect(to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

fn fail(mut fields: Value, stage: &str, e: &io::Error) -> bool {
    fields["ok"] = json!(false);
    fields["stage"] = json!(stage);
    fields["error"] = json!(err_str(e));
    emit(fields);
    false
}

fn tcp_client(to: SocketAddr, send_bytes: u64, timeout: Duration) -> bool {
    let started = Instant::now();
    let s = match connect(to, timeout) {
        Ok(s) => s,
        Err(e) => return fail(json!({"to": to.to_string()}), "connect", &e),
    };
    let (local, peer) = (addr_str(s.local_addr()), addr_str(s.peer_addr()));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(e) => return fail(json!({"to": to.to_string()}), "connect", &e),
    };
    // Write on a thread while this one reads: an echo peer sends back while we send, and with
    // both directions in flight neither side's buffers can fill up and deadlock.
    let writer = thread::spawn(move || -> io::Result<String> {
        let mut pattern = Pattern::new();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = send_bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            w.write_all(&buf[..n])?;
            hash.update(&buf[..n]);
            left -= n as u64;
        }
        w.shutdown(Shutdown::Write)?;
        Ok(hex(&hash.finalize()))
    });
    let mut r = s;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut received: u64 = 0;
    let read_res = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hash.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let base = json!({"to": to.to_string(), "local": local, "peer": peer, "received": received});
    if let Err(e) = read_res {
        // Unblock the writer (it may be stuck on a full send buffer) before joining it.
        let _ = r.shutdown(Shutdown::Both);
        let _ = writer.join();
        return fail(base, "read", &e);
    }
    let sha_sent = match writer.join() {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return fail(base, "write", &e),
        Err(_) => return fail(base, "write", &io::Error::other("writer thread panicked")),
    };
    emit(json!({
        "ok": true,
        "local": local,
        "peer": peer,
        "sent": send_bytes,
        "received": received,
        "sha256_sent": sha_sent,
        "sha256_received": hex(&hash.finalize()),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }));
    true
}

/// An HTTP response read from a connection.
fn read_response(r: &mut BufReader<TcpStream>, request_closes: bool) -> io::Result<(u16, Headers, Vec<u8>)> {
    let (start, headers) = read_head(r)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"))?;
    let status: u16 =
        start.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {start:?}"))
        })?;
    let closes = request_closes
        || headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"));
    let body = if status == 204 || status == 304 { Vec::new() } else { read_body(r, &headers, closes)? };
    Ok((status, headers, body))
}

#[allow(clippy::too_many_arguments)]
fn http_get(
    to: SocketAddr,
    path: &str,
    count: u32,
    keepalive: bool,
    host: Option<String>,
    extra: &[String],
    timeout: Duration,
) -> bool {
    let host = host.unwrap_or_else(|| to.to_string());
    let mut extra_headers = String::new();
    for h in extra {
        extra_headers.push_str(h.trim());
        extra_headers.push_str("\r\n");
    }
    let mut conn: Option<(BufReader<TcpStream>, Value, Value)> = None;
    let mut all_ok = true;
    for seq in 0..count {
        let started = Instant::now();
        if conn.is_none() {
            match connect(to, timeout) {
                Ok(s) => {
                    let (l, p) = (addr_str(s.local_addr()), addr_str(s.peer_addr()));
                    conn = Some((BufReader::new(s), l, p));
                }
                Err(e) => {
                    all_ok = fail(json!({"seq": seq, "to": to.to_string()}), "connect", &e) && all_ok;
                    continue;
                }
            }
        }
        let (r, local, peer) = conn.as_mut().expect("connected above");
        let (local, peer) = (local.clone(), peer.clone());
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: simpod\r\naccept: */*\r\n{extra_headers}{}\r\n",
            if keepalive { "" } else { "connection: close\r\n" }
        );
        let res = r.get_mut().write_all(req.as_bytes()).and_then(|_| read_response(r, !keepalive));
        match res {
            Ok((status, headers, body)) => {
                let server_closes = headers
                    .iter()
                    .any(|(k, v)| k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"));
                let hmap: BTreeMap<String, String> =
                    headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
                let body_v = serde_json::from_slice::<Value>(&body)
                    .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body).into_owned()));
                emit(json!({
                    "seq": seq,
                    "ok": true,
                    "status": status,
                    "headers": hmap,
                    "body": body_v,
                    "local": local,
                    "peer": peer,
                    "elapsed_ms": started.elapsed().as_millis() as u64,
                }));
                if !keepalive || server_closes {
                    conn = None;
                }
            }
            Err(e) => {
                all_ok = fail(
                    json!({"seq": seq, "to": to.to_string(), "local": local, "peer": peer}),
                    "request",
                    &e,
                ) && all_ok;
                conn = None;
            }
        }
    }
    all_ok
}

fn hold(to: SocketAddr, timeout: Duration) -> bool {
    let s = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => return fail(json!({"event": "error", "to": to.to_string()}), "connect", &e),
    };
    // Idle time between stdin lines is unbounded; only the echo of a sent line is timed.
    let _ = s.set_read_timeout(Some(timeout));
    emit(json!({"event": "connected", "local": addr_str(s.local_addr()), "peer": addr_str(s.peer_addr())}));
    let Ok(mut w) = s.try_clone() else {
        return false;
    };
    let mut r = BufReader::new(s);
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if let Err(e) = w.write_all(format!("{line}\n").as_bytes()) {
            return fail(json!({"event": "error"}), "write", &e);
        }
        let mut echoed = String::new();
        match r.read_line(&mut echoed) {
            Ok(0) => {
                emit(
                    json!({"event": "closed", "ok": false, "error": "UnexpectedEof: connection closed by peer"}),
                );
                return false;
            }
            Ok(_) => emit(json!({"event": "echo", "data": echoed.trim_end_matches(['\n', '\r'])})),
            Err(e) => return fail(json!({"event": "error"}), "read", &e),
        }
    }
    let _ = w.shutdown(Shutdown::Write);
    emit(json!({"event": "done"}));
    true
}

fn ping_once(to: SocketAddr) -> Result<(Value, Value), (io::Error, Value, Value)> {
    let timeout = Duration::from_secs(1);
    let s = connect(to, timeout).map_err(|e| (e, Value::Null, Value::Null))?;
    let (local, peer) = (addr_str(s.local_addr()), addr_str(s.peer_addr()));
    let res = (|| {
        let mut w = &s;
        w.write_all(b"ping\n")?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        if line != "ping\n" {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected reply {line:?}")));
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok((local, peer)),
        Err(e) => Err((e, local, peer)),
    }
}

/// Always succeeds: failed attempts are data (e.g. during a sluice restart), reported per line.
fn run_loop(to: SocketAddr, interval: Duration, count: u64) -> bool {
    for seq in 0..count {
        let started = Instant::now();
        let ts = now_ms();
        let line = match ping_once(to) {
            Ok((local, peer)) => {
                json!({"seq": seq, "ts_ms": ts, "ok": true, "error": null, "local": local, "peer": peer})
            }
            Err((e, local, peer)) => {
                json!({"seq": seq, "ts_ms": ts, "ok": false, "error": err_str(&e), "local": local, "peer": peer})
            }
        };
        emit(line);
        if seq + 1 < count {
            // The pacing interval between attempts (measured from the attempt's start).
            thread::sleep(interval.saturating_sub(started.elapsed()));
        }
    }
    true
}
