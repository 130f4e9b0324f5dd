//! A tiny blocking HTTP/1.1 client whose socket lives in a simulated network namespace, for
//! probing what runs there from the test process: the control plane's `/healthz/ready` and
//! `/metrics`, or the fake API server as a node sees it.
//!
//! The socket is created on a thread that entered the namespace (a socket belongs to the
//! namespace it was made in), so the request travels the simulated network: from a node's
//! namespace to the control plane it crosses the fabric as that node's traffic would.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::netns;

/// Largest response read (a `/metrics` page, an API list).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// A response: status, headers (names lowercased), body.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!("response body is not JSON: {}", self.text().chars().take(200).collect::<String>())
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr`, from network namespace `ns`.
pub fn get_in(ns: &str, addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpReply> {
    request_in(ns, addr, "GET", path, None, timeout)
}

/// `POST path` with a JSON body on `addr`, from network namespace `ns`.
pub fn post_json_in(
    ns: &str,
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<HttpReply> {
    let body = serde_json::to_vec(body).context("encoding the body")?;
    request_in(ns, addr, "POST", path, Some(&body), timeout)
}

/// One request on a fresh connection (`Connection: close`), from network namespace `ns`.
pub fn request_in(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpReply> {
    let stream = netns::run_in(ns, || {
        TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr} from netns {ns}"))
    })?;
    exchange(stream, addr, method, path, body, timeout)
        .with_context(|| format!("{method} http://{addr}{path} from netns {ns}"))
}

fn exchange(
    mut stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpReply> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        req += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len());
    }
    req += "\r\n";
    stream.write_all(req.as_bytes())?;
    if let Some(b) = body {
        stream.write_all(b)?;
    }
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE as u64 + 1).read_to_end(&mut raw).context("reading the response")?;
    if raw.len() > MAX_RESPONSE {
        bail!("response over {MAX_RESPONSE} bytes");
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpReply> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of the response head")?;
    let head = std::str::from_utf8(&raw[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(rest)? } else { rest.to_vec() };
    Ok(HttpReply { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").context("truncated chunked body")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nready").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.text(), "ready");
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "not ready");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
