//! Protocol detection on an accepted connection: HTTP/1.1, HTTP/2 with prior knowledge (h2c,
//! gRPC) or anything else (opaque TCP, including TLS from the application, which sluice passes
//! through untouched).
//!
//! A Service port can pin the protocol and skip sniffing: `appProtocol` (`http`, `http2`,
//! `kubernetes.io/h2c`, `grpc`, `tcp`, `tls`, `https`, ...) or, as in Istio, the port name's
//! prefix (`http-web`, `grpc-api`, `tcp-db`). Well-known server-first ports (SMTP, MySQL, ...)
//! are never sniffed: the client would wait for the server while sluice waits for the client.
//!
//! Sniffing reads (it does not peek: a peek cannot wait for *more* bytes) what the client sends
//! first, up to a short timeout, and hands those bytes on as a prefix to whichever path takes
//! the connection, so nothing is lost. A client that sends nothing within the timeout (a
//! server-first protocol on a port nobody pinned) goes opaque.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::discovery::ServicePort;

/// The HTTP/2 connection preface a prior-knowledge client sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token sluice recognises before deciding the bytes are not HTTP/1.
const MAX_METHOD: usize = 24;
/// Enough for any request line start and the whole HTTP/2 preface.
const SNIFF_BUF: usize = 4096;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2c",
            Protocol::Opaque => "tcp",
        }
    }
}

/// What configuration says before any byte is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// Nothing pinned: sniff, and fall back to opaque.
    Sniff,
    /// HTTP of some version (`appProtocol: http`): sniff the version; bytes that are not
    /// HTTP get an HTTP error, not a byte pipe.
    Http,
    /// HTTP/2 with prior knowledge (`http2`, `kubernetes.io/h2c`, `grpc`).
    Http2,
    /// Opaque TCP: no sniffing at all.
    Opaque,
}

/// Ports of server-first (or otherwise never-HTTP) protocols, not sniffed unless a Service
/// says otherwise: the same default as Linkerd's opaque ports (SMTP, submission, MySQL,
/// Galera, PostgreSQL, Redis, Elasticsearch transport, memcached).
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// The hint for a connection to `dst_port`, from the Service port it resolved to (if any).
pub fn hint(service_port: Option<&ServicePort>, dst_port: u16, opaque_ports: &[u16]) -> Hint {
    if let Some(p) = service_port {
        if let Some(h) = p.app_protocol.as_deref().and_then(from_app_protocol) {
            return h;
        }
        if let Some(h) = p.name.as_deref().and_then(from_port_name) {
            return h;
        }
    }
    if opaque_ports.contains(&dst_port) {
        Hint::Opaque
    } else {
        Hint::Sniff
    }
}

/// Kubernetes `appProtocol` values (IANA names, `kubernetes.io/*` and Istio's).
fn from_app_protocol(p: &str) -> Option<Hint> {
    Some(match p.to_ascii_lowercase().as_str() {
        "http" | "http1" | "http/1.1" => Hint::Http,
        "http2" | "h2c" | "kubernetes.io/h2c" | "grpc" | "grpc-web" => Hint::Http2,
        "tcp" | "tls" | "https" | "kubernetes.io/ws" | "kubernetes.io/wss" | "mongo" | "mysql" | "redis" => {
            // WebSocket (kubernetes.io/ws) starts as HTTP/1.1, but the value says the port
            // carries long-lived upgraded connections: pass them through as bytes.
            Hint::Opaque
        }
        _ => return None,
    })
}

/// Istio's port naming convention: `<protocol>[-<suffix>]`.
fn from_port_name(name: &str) -> Option<Hint> {
    let proto = name.split('-').next().unwrap_or(name);
    from_app_protocol(proto)
}

/// Reads what the client sends first and decides. Returns the protocol and the bytes read,
/// which the caller must send on before anything else.
pub async fn detect<S: AsyncRead + Unpin>(stream: &mut S, hint: Hint, timeout: Duration) -> (Protocol, Bytes) {
    match hint {
        Hint::Opaque => return (Protocol::Opaque, Bytes::new()),
        // Pinned to HTTP/2: the h2 server itself checks the preface (and answers anything
        // else with a connection error), so there is nothing to read here.
        Hint::Http2 => return (Protocol::Http2, Bytes::new()),
        Hint::Http | Hint::Sniff => {}
    }
    let mut buf = BytesMut::with_capacity(SNIFF_BUF);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify(&buf) {
            Verdict::Is(p) => return (p, buf.freeze()),
            Verdict::NotHttp => return (fallback(hint), buf.freeze()),
            Verdict::NeedMore if buf.len() >= SNIFF_BUF => return (fallback(hint), buf.freeze()),
            Verdict::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            // EOF or an error: whoever takes the connection next sees it too.
            Ok(Ok(0)) | Ok(Err(_)) => return (fallback(hint), buf.freeze()),
            Ok(Ok(_)) => {}
            // The client is waiting for the server (or is slow to speak).
            Err(_) => return (fallback(hint), buf.freeze()),
        }
    }
}

/// Where undecided bytes go: to HTTP/1 (whose parser answers 400) when the port is pinned to
/// HTTP, to h2 (which answers with GOAWAY) when pinned to HTTP/2, else through as bytes.
fn fallback(hint: Hint) -> Protocol {
    match hint {
        Hint::Http => Protocol::Http1,
        Hint::Http2 => Protocol::Http2,
        Hint::Sniff | Hint::Opaque => Protocol::Opaque,
    }
}

/// The sniffing decision on the bytes read so far, without a socket (for the micro-benchmarks):
/// `None` while more bytes are needed, `Some(Protocol::Opaque)` for bytes that are not HTTP.
pub fn classify_prefix(b: &[u8]) -> Option<Protocol> {
    match classify(b) {
        Verdict::Is(p) => Some(p),
        Verdict::NotHttp => Some(Protocol::Opaque),
        Verdict::NeedMore => None,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Is(Protocol),
    NotHttp,
    NeedMore,
}

/// HTTP methods recognised when sniffing (the IANA registry's, sorted): a request line must
/// start with one of them and a space. Restricting to registered methods keeps text protocols
/// that happen to start with an upper-case word (`HELLO x`, an inline Redis `SET k v`) opaque;
/// on a port pinned to HTTP, anything else still goes to the HTTP parser, which answers 400.
const METHODS: &[&[u8]] = &[
    b"ACL", b"BASELINE-CONTROL", b"BIND", b"CHECKIN", b"CHECKOUT", b"CONNECT", b"COPY", b"DELETE", b"GET",
    b"HEAD", b"LABEL", b"LINK", b"LOCK", b"M-SEARCH", b"MERGE", b"MKACTIVITY", b"MKCALENDAR", b"MKCOL",
    b"MKREDIRECTREF", b"MKWORKSPACE", b"MOVE", b"NOTIFY", b"OPTIONS", b"ORDERPATCH", b"PATCH", b"POST", b"PRI",
    b"PROPFIND", b"PROPPATCH", b"PURGE", b"PUT", b"QUERY", b"REBIND", b"REPORT", b"SEARCH", b"SUBSCRIBE",
    b"TRACE", b"UNBIND", b"UNCHECKOUT", b"UNLINK", b"UNLOCK", b"UNSUBSCRIBE", b"UPDATE", b"UPDATEREDIRECTREF",
    b"VERSION-CONTROL",
];

/// Decides from the first bytes. HTTP/2 needs the exact preface; HTTP/1 needs a registered
/// method followed by a space: the rest of the request line is the HTTP parser's business (a
/// malformed one gets 400 from it, not a pipe).
fn classify(b: &[u8]) -> Verdict {
    if b.is_empty() {
        return Verdict::NeedMore;
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if b.len() >= H2_PREFACE.len() { Verdict::Is(Protocol::Http2) } else { Verdict::NeedMore };
    }
    for (i, c) in b.iter().enumerate().take(MAX_METHOD + 1) {
        match c {
            b'A'..=b'Z' | b'-' | b'_' => {}
            b' ' if i > 0 => {
                return if METHODS.binary_search(&&b[..i]).is_ok() { Verdict::Is(Protocol::Http1) } else { Verdict::NotHttp }
            }
            _ => return Verdict::NotHttp,
        }
    }
    if b.len() > MAX_METHOD {
        Verdict::NotHttp
    } else if METHODS.iter().any(|m| m.starts_with(b)) {
        Verdict::NeedMore
    } else {
        Verdict::NotHttp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;
    use crate::discovery::{Protocol as L4, ServicePort, TargetPort};

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Verdict::Is(Protocol::Http1));
        assert_eq!(classify(b"POST /x"), Verdict::Is(Protocol::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Verdict::Is(Protocol::Http1));
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        // Unregistered upper-case words are not HTTP (an inline Redis command, a greeting).
        assert_eq!(classify(b"SET key value\r\n"), Verdict::NotHttp);
        assert_eq!(classify(b"HELLO world"), Verdict::NotHttp);
        assert_eq!(classify(b"XY"), Verdict::NotHttp);
        assert!(METHODS.windows(2).all(|w| w[0] < w[1]), "METHODS must stay sorted");
        assert_eq!(classify(H2_PREFACE), Verdict::Is(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), Verdict::NeedMore);
        // "PRI" followed by anything but the preface is an HTTP/1 method token.
        assert_eq!(classify(b"PRI / HTTP/1.1"), Verdict::Is(Protocol::Http1));
        // TLS ClientHello, binary, lower case, a space first, a too-long token.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), Verdict::NotHttp);
        assert_eq!(classify(b"\x00\x01binary"), Verdict::NotHttp);
        assert_eq!(classify(b"get / HTTP/1.1"), Verdict::NotHttp);
        assert_eq!(classify(b" GET /"), Verdict::NotHttp);
        assert_eq!(classify(&[b'A'; 40]), Verdict::NotHttp);
        assert_eq!(classify(b"HELLO\r\n"), Verdict::NotHttp);
    }

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            port: 80,
            target_port: TargetPort::Number(80),
            protocol: L4::Tcp,
            app_protocol: app.map(str::to_owned),
        }
    }

    #[test]
    fn hints_from_app_protocol_port_names_and_opaque_ports() {
        let op = DEFAULT_OPAQUE_PORTS;
        assert_eq!(hint(Some(&port(None, Some("http"))), 80, op), Hint::Http);
        assert_eq!(hint(Some(&port(None, Some("kubernetes.io/h2c"))), 80, op), Hint::Http2);
        assert_eq!(hint(Some(&port(None, Some("grpc"))), 80, op), Hint::Http2);
        assert_eq!(hint(Some(&port(None, Some("tcp"))), 80, op), Hint::Opaque);
        assert_eq!(hint(Some(&port(Some("grpc-api"), None)), 80, op), Hint::Http2);
        assert_eq!(hint(Some(&port(Some("tcp"), None)), 80, op), Hint::Opaque);
        assert_eq!(hint(Some(&port(Some("web"), None)), 80, op), Hint::Sniff);
        // appProtocol wins over the name.
        assert_eq!(hint(Some(&port(Some("http"), Some("tcp"))), 80, op), Hint::Opaque);
        assert_eq!(hint(None, 3306, op), Hint::Opaque);
        assert_eq!(hint(Some(&port(Some("db"), None)), 3306, op), Hint::Opaque);
        assert_eq!(hint(None, 8080, op), Hint::Sniff);
    }

    #[tokio::test]
    async fn silent_clients_go_opaque_after_the_timeout_and_bytes_are_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        let t = std::time::Instant::now();
        let (p, prefix) = detect(&mut s, Hint::Sniff, Duration::from_millis(50)).await;
        assert_eq!((p, prefix.len()), (Protocol::Opaque, 0));
        assert!(t.elapsed() >= Duration::from_millis(50));

        let mut c = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut c, b"GE").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tokio::io::AsyncWriteExt::write_all(&mut c, b"T / HTTP/1.1\r\n").await.unwrap();
            c
        });
        let (p, prefix) = detect(&mut s, Hint::Sniff, Duration::from_secs(5)).await;
        assert_eq!(p, Protocol::Http1);
        assert!(prefix.starts_with(b"GE"));
        drop(writer.await);
    }
}
