//! WebSocket echo server and client (tungstenite, blocking sockets).

use std::{
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::{Duration, Instant},
};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tungstenite::{
    client::IntoClientRequest,
    handshake::server::{Request, Response},
    http::{HeaderMap, HeaderName, HeaderValue},
    Bytes, Message,
};

use crate::{addr_str, emit, err_str, hex, serve, Pattern};

#[derive(clap::Args)]
pub struct ServerArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    bind: String,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    /// `ws://host:port/path?query`; the TCP connection goes to host:port.
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1)]
    messages: u64,
    /// Bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Send text messages (pattern bytes mapped to 'a'..='z') instead of binary ones.
    #[arg(long)]
    text: bool,
    /// Extra handshake header `Name: value` (repeatable; replaces one of the same name).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Connect timeout, and the longest a single read or write may block.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

fn header_map(h: &HeaderMap) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in h {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        let merged = match m.get(k.as_str()).and_then(|x| x.as_str()) {
            Some(prev) => format!("{prev}, {v}"),
            None => v,
        };
        m.insert(k.as_str().to_string(), json!(merged));
    }
    m
}

pub fn server(a: ServerArgs) -> bool {
    serve(&a.bind, a.port, ws_conn)
}

fn ws_conn(s: TcpStream) {
    let peer = addr_str(s.peer_addr());
    let local = addr_str(s.local_addr());
    let mut seen = (String::new(), Map::new());
    // The callback's error type (an HTTP response) is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    let accepted = tungstenite::accept_hdr(s, |req: &Request, resp: Response| {
        seen = (req.uri().to_string(), header_map(req.headers()));
        Ok(resp)
    });
    let mut ws = match accepted {
        Ok(ws) => ws,
        Err(e) => {
            emit(json!({"event": "ws_handshake_error", "peer": peer, "error": e.to_string()}));
            return;
        }
    };
    emit(json!({
        "event": "ws_connected",
        "peer": peer,
        "local": local,
        "path": seen.0,
        "headers": seen.1,
    }));
    let (mut messages, mut bytes) = (0u64, 0u64);
    let error = loop {
        match ws.read() {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                messages += 1;
                bytes += m.len() as u64;
                if let Err(e) = ws.send(m) {
                    break Some(e.to_string());
                }
            }
            // Pings are answered by tungstenite; a Close is answered too, and the next read
            // then reports the closed connection.
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break None,
            Err(e) => break Some(e.to_string()),
        }
    };
    emit(json!({
        "event": "ws_closed",
        "peer": peer,
        "messages": messages,
        "bytes": bytes,
        "error": error,
    }));
}

/// (host:port to connect to, rest) from `ws://host:port/rest`.
fn ws_target(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| format!("only ws:// URLs are supported: {url:?}"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("no host in {url:?}"));
    }
    // host, host:port, [v6], [v6]:port
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    Ok(if has_port { authority.to_string() } else { format!("{authority}:80") })
}

pub fn client(a: ClientArgs) -> bool {
    let started = Instant::now();
    let timeout = Duration::from_millis(a.timeout_ms);
    let base = json!({"url": a.url});
    let failed = |mut v: Value, stage: &str, e: String| {
        v["ok"] = json!(false);
        v["stage"] = json!(stage);
        v["error"] = json!(e);
        emit(v);
        false
    };
    let target = match ws_target(&a.url) {
        Ok(t) => t,
        Err(e) => return failed(base, "args", e),
    };
    let addr: SocketAddr = match target.to_socket_addrs().map(|mut i| i.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) => return failed(base, "resolve", format!("{target} has no address")),
        Err(e) => return failed(base, "resolve", err_str(&e)),
    };
    let mut req = match a.url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return failed(base, "args", e.to_string()),
    };
    for h in &a.headers {
        let parsed = h.split_once(':').and_then(|(k, v)| {
            Some((HeaderName::try_from(k.trim()).ok()?, HeaderValue::try_from(v.trim()).ok()?))
        });
        match parsed {
            Some((k, v)) => {
                req.headers_mut().insert(k, v);
            }
            None => return failed(base, "args", format!("bad header {h:?}")),
        }
    }
    let s = match crate::connect(addr, timeout) {
        Ok(s) => s,
        Err(e) => return failed(base, "connect", err_str(&e)),
    };
    let (local, peer) = (addr_str(s.local_addr()), addr_str(s.peer_addr()));
    let mut v = json!({"url": a.url, "local": local, "peer": peer});
    let (mut ws, resp) = match tungstenite::client(req, s) {
        Ok(x) => x,
        Err(e) => return failed(v, "handshake", e.to_string()),
    };
    v["status"] = json!(resp.status().as_u16());
    v["response_headers"] = json!(header_map(resp.headers()));

    let mut pattern = Pattern::new();
    let (mut sha_sent, mut sha_received) = (Sha256::new(), Sha256::new());
    let (mut sent, mut received, mut bytes_sent, mut bytes_received, mut mismatches) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut buf = vec![0u8; a.size];
    let mut error = None;
    'messages: for _ in 0..a.messages {
        pattern.fill(&mut buf);
        let msg = if a.text {
            for b in buf.iter_mut() {
                *b = b'a' + *b % 26;
            }
            Message::text(String::from_utf8(buf.clone()).expect("ASCII"))
        } else {
            Message::Binary(Bytes::copy_from_slice(&buf))
        };
        sha_sent.update(&buf);
        if let Err(e) = ws.send(msg) {
            error = Some(("send", e.to_string()));
            break;
        }
        sent += 1;
        bytes_sent += buf.len() as u64;
        let echo = loop {
            match ws.read() {
                Ok(Message::Binary(b)) => break b,
                Ok(Message::Text(t)) => break Bytes::copy_from_slice(t.as_bytes()),
                Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => {
                    error = Some(("read", "closed by the server".to_string()));
                    break 'messages;
                }
                Ok(_) => {}
                Err(e) => {
                    error = Some(("read", e.to_string()));
                    break 'messages;
                }
            }
        };
        received += 1;
        bytes_received += echo.len() as u64;
        sha_received.update(&echo);
        if echo[..] != buf[..] {
            mismatches += 1;
        }
    }
    // A clean close: our Close frame, the server's answer, then EOF.
    let mut close_clean = false;
    if error.is_none() {
        match ws.close(None) {
            Ok(()) => loop {
                match ws.read() {
                    Ok(_) => {}
                    Err(tungstenite::Error::ConnectionClosed) => {
                        close_clean = true;
                        break;
                    }
                    Err(e) => {
                        error = Some(("close", e.to_string()));
                        break;
                    }
                }
            },
            Err(e) => error = Some(("close", e.to_string())),
        }
    }
    let ok = error.is_none() && mismatches == 0 && received == a.messages;
    v["ok"] = json!(ok);
    v["messages_sent"] = json!(sent);
    v["messages_received"] = json!(received);
    v["bytes_sent"] = json!(bytes_sent);
    v["bytes_received"] = json!(bytes_received);
    v["mismatches"] = json!(mismatches);
    v["sha256_sent"] = json!(hex(&sha_sent.finalize()));
    v["sha256_received"] = json!(hex(&sha_received.finalize()));
    v["close_clean"] = json!(close_clean);
    v["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
    if let Some((stage, e)) = error {
        v["stage"] = json!(stage);
        v["error"] = json!(e);
    }
    emit(v);
    ok
}

#[cfg(test)]
mod tests {
    use super::ws_target;

    #[test]
    fn targets() {
        assert_eq!(ws_target("ws://10.0.0.1:8080/chat").unwrap(), "10.0.0.1:8080");
        assert_eq!(ws_target("ws://example.test?x=1").unwrap(), "example.test:80");
        assert_eq!(ws_target("ws://[::1]:9/").unwrap(), "[::1]:9");
        assert_eq!(ws_target("ws://[::1]/").unwrap(), "[::1]:80");
        assert!(ws_target("wss://x/").is_err());
        assert!(ws_target("ws:///x").is_err());
    }
}
