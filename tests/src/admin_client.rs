//! A minimal HTTP/1.1 client over a unix socket, for sluice's admin API. Deliberately tiny:
//! one GET with `Connection: close`, body framed by content-length, chunked encoding, or EOF.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` on the unix socket.
pub fn get(socket: &Path, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to admin socket {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .with_context(|| format!("sending GET {path}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(resp) = parse_response(&buf, false)? {
            return Ok(resp);
        }
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("reading the response to GET {path}"))?;
        if n == 0 {
            return parse_response(&buf, true)?.ok_or_else(|| {
                anyhow!("connection closed before a complete response to GET {path}")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `GET path`, requiring a 2xx JSON response.
pub fn get_json(socket: &Path, path: &str, timeout: Duration) -> Result<Value> {
    let resp = get(socket, path, timeout)?;
    if !(200..300).contains(&resp.status) {
        bail!(
            "GET {path}: HTTP {}: {}",
            resp.status,
            resp.body_str().trim()
        );
    }
    serde_json::from_slice(&resp.body)
        .with_context(|| format!("GET {path}: body is not JSON: {}", resp.body_str()))
}

/// Parses a complete response from `buf`, or returns `None` if more bytes are needed. At `eof`,
/// a response without framing takes the rest of the bytes as its body.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if eof && !buf.is_empty() {
            bail!(
                "truncated response head: {:?}",
                String::from_utf8_lossy(buf)
            );
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let rest = &buf[head_end + 4..];
    let body = if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        match decode_chunked(rest)? {
            Some(b) => b,
            None if eof => bail!("truncated chunked body"),
            None => return Ok(None),
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .with_context(|| format!("bad content-length {len:?}"))?;
        if rest.len() < len {
            if eof {
                bail!("truncated body: {} of {len} bytes", rest.len());
            }
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(HttpResponse {
        status,
        headers,
        body,
    }))
}

/// Decodes a chunked body; `None` until the terminating zero-size chunk (and the blank line
/// after optional trailers) has arrived.
fn decode_chunked(mut data: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return Ok(None);
        };
        let size_str = std::str::from_utf8(&data[..line_end]).context("chunk size is not UTF-8")?;
        let size_hex = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_str:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            return Ok(find(data, b"\r\n").map(|_| body));
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: application/json\r\n\r\n{\"a\":true}\n";
        let resp = parse_response(r, false).unwrap().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, b"{\"a\":true}\n");
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert!(parse_response(&r[..r.len() - 1], false).unwrap().is_none());
        assert!(parse_response(&r[..r.len() - 1], true).is_err());
    }

    #[test]
    fn chunked() {
        let r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n5;x=y\r\n:true\r\n1\r\n}\r\n0\r\n\r\n";
        let resp = parse_response(r, false).unwrap().unwrap();
        assert_eq!(resp.body, b"{\"a\":true}");
        assert!(parse_response(&r[..r.len() - 2], false).unwrap().is_none());
    }

    #[test]
    fn until_eof() {
        let r = b"HTTP/1.0 200 OK\r\n\r\nhello";
        assert!(parse_response(r, false).unwrap().is_none());
        assert_eq!(parse_response(r, true).unwrap().unwrap().body, b"hello");
    }

    #[test]
    fn against_a_unix_socket_server() {
        let dir = std::env::temp_dir().join(format!("sluice-admin-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("a.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while find(&req, b"\r\n\r\n").is_none() {
                let n = s.read(&mut b).unwrap();
                req.extend_from_slice(&b[..n]);
            }
            assert!(req.starts_with(b"GET /status HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"ready\": true}")
                .unwrap();
        });
        let v = get_json(&sock, "/status", Duration::from_secs(5)).unwrap();
        assert_eq!(v["ready"], true);
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
