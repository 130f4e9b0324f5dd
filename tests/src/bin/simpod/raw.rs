//! `raw`: connect, send exactly the given bytes, read everything until EOF, reset or timeout.
//! For malformed HTTP/1.1 and HTTP/2 input, where no well-behaved client library would do.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{addr_str, connect, emit, err_str, hex};

/// At most this much of the received bytes is also reported as hex.
const HEX_LIMIT: usize = 64 * 1024;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_parser = crate::parse_sock_addr)]
    to: SocketAddr,
    /// Text to send; `\r`, `\n`, `\t`, `\0`, `\\` and `\xNN` are interpreted.
    #[arg(long, conflicts_with = "send_hex")]
    send: Option<String>,
    /// Bytes to send, as hex (whitespace and ':' between bytes are ignored).
    #[arg(long)]
    send_hex: Option<String>,
    /// Shut down the write side after sending (the peer reads EOF).
    #[arg(long)]
    half_close: bool,
    /// How long to wait after sending for the peer to close (then "ended": "timeout").
    #[arg(long, default_value_t = 3000)]
    read_timeout_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
}

/// Interprets `\r \n \t \0 \\ \xNN` in `s`; every other byte is taken as is.
pub fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let digits = b
                    .get(i + 2..i + 4)
                    .and_then(|d| std::str::from_utf8(d).ok())
                    .and_then(|d| u8::from_str_radix(d, 16).ok())
                    .ok_or_else(|| format!("bad \\x escape at byte {i} of {s:?}"))?;
                out.push(digits);
                i += 2;
            }
            _ => return Err(format!("bad escape at byte {i} of {s:?}")),
        }
        i += 2;
    }
    Ok(out)
}

pub fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b':').collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits in {s:?}"));
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("bad hex {:?} in {s:?}", String::from_utf8_lossy(p)))
        })
        .collect()
}

pub fn run(a: Args) -> bool {
    let payload = match (&a.send, &a.send_hex) {
        (Some(t), _) => unescape(t),
        (None, Some(h)) => unhex(h),
        (None, None) => Ok(Vec::new()),
    };
    let payload = match payload {
        Ok(p) => p,
        Err(e) => {
            emit(json!({"ok": false, "stage": "args", "error": e}));
            return false;
        }
    };
    let to = a.to.to_string();
    let s = match connect(a.to, Duration::from_millis(a.connect_timeout_ms)) {
        Ok(s) => s,
        Err(e) => {
            emit(json!({"ok": false, "to": to, "stage": "connect", "error": err_str(&e)}));
            return false;
        }
    };
    let (local, peer) = (addr_str(s.local_addr()), addr_str(s.peer_addr()));
    let started = Instant::now();
    // A peer may answer (and close, or reset) before it has read everything: record a failed
    // send, but still read what came back.
    let mut send_reset = false;
    let send_error = match (&s).write_all(&payload) {
        Ok(()) => {
            if a.half_close {
                let _ = s.shutdown(Shutdown::Write);
            }
            Value::Null
        }
        Err(e) => {
            send_reset = e.kind() == io::ErrorKind::ConnectionReset;
            json!(err_str(&e))
        }
    };

    let deadline = Instant::now() + Duration::from_millis(a.read_timeout_ms);
    let mut received = Vec::new();
    let mut first_byte_ms = Value::Null;
    let mut buf = vec![0u8; 64 * 1024];
    let mut error = Value::Null;
    let ended = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break "timeout";
        }
        if let Err(e) = s.set_read_timeout(Some(left)) {
            error = json!(err_str(&e));
            break "error";
        }
        match (&s).read(&mut buf) {
            // After a reset seen by the send, the socket reads as closed.
            Ok(0) if send_reset => break "reset",
            Ok(0) => break "eof",
            Ok(n) => {
                if received.is_empty() {
                    first_byte_ms = json!(started.elapsed().as_millis() as u64);
                }
                received.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                break "timeout"
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break "reset",
            Err(e) => {
                error = json!(err_str(&e));
                break "error";
            }
        }
    };
    let ok = send_error.is_null();
    emit(json!({
        "ok": ok,
        "to": to,
        "local": local,
        "peer": peer,
        "sent_len": payload.len(),
        "send_error": send_error,
        "received_len": received.len(),
        "received_text": String::from_utf8_lossy(&received),
        "received_hex": hex(&received[..received.len().min(HEX_LIMIT)]),
        "ended": ended,
        "error": error,
        "first_byte_ms": first_byte_ms,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }));
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            unescape(r"GET / HTTP/1.1\r\nA:\tb\x00\xff\\\0").unwrap(),
            b"GET / HTTP/1.1\r\nA:\tb\x00\xff\\\0".to_vec()
        );
        assert!(unescape(r"\q").is_err());
        assert!(unescape(r"\x4").is_err());
        assert_eq!(unhex("50 52:49\n2a").unwrap(), b"PRI*".to_vec());
        assert!(unhex("505").is_err());
    }
}
