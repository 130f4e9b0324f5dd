//! Just enough HTTP/1.1 for a Kubernetes client: GET requests with keep-alive, POST requests
//! with a JSON body (Content-Length or chunked, bounded), responses with a Content-Length, and
//! chunked watch streams that can end cleanly (the terminating chunk) or be
//! cut (the connection closes mid-body, as when a load balancer or the API server drops it).
//!
//! Hand-rolled on tokio rather than on hyper because the tests need exactly that control over
//! the wire: when each watch event is written, and how a stream ends.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Longest request head accepted (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted: kube-apiserver's limit (3 MiB) for a JSON request body.
pub(crate) const MAX_BODY: usize = 3 * 1024 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: String,
    /// The path, percent-decoded.
    pub path: String,
    /// Query parameters, percent-decoded (`+` is a space, as in forms); the last one wins.
    pub query: BTreeMap<String, String>,
    /// The raw target as sent (for the request log).
    pub target: String,
    pub close: bool,
    /// The request body (empty for a GET).
    pub body: Vec<u8>,
}

/// Reads one request. `Ok(None)` when the client closed the connection between requests.
pub(crate) async fn read_request<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
) -> Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = r
            .read_until(b'\n', &mut head)
            .await
            .context("reading the request")?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            bail!("connection closed inside a request head");
        }
        if head.len() > MAX_HEAD {
            bail!("request head longer than {MAX_HEAD} bytes");
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                head.clear(); // stray empty line between requests (RFC 9112 allows skipping it)
                continue;
            }
            break;
        }
    }
    let text = String::from_utf8(head).context("request head is not UTF-8")?;
    let mut lines = text.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("malformed request line {request_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("unsupported protocol {version:?}");
    }
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.parse().context("bad Content-Length")?,
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "transfer-encoding" => {
                if !value.eq_ignore_ascii_case("chunked") {
                    bail!("unsupported Transfer-Encoding {value:?}");
                }
                chunked = true;
            }
            _ => {}
        }
    }
    // Read the body whatever the method (a GET may carry one too), so the next request parses.
    let body = if chunked {
        read_chunked_body(r).await?
    } else {
        if content_length > MAX_BODY {
            bail!("request body of {content_length} bytes is over the limit of {MAX_BODY}");
        }
        let mut body = vec![0u8; content_length];
        r.read_exact(&mut body)
            .await
            .context("reading the request body")?;
        body
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect();
    Ok(Some(Request {
        method: method.to_string(),
        path: percent_decode(path, false),
        query,
        target: target.to_string(),
        close,
        body,
    }))
}

/// A chunked request body (RFC 9112 section 7.1), at most [`MAX_BODY`] bytes; chunk extensions
/// and trailer fields are read and ignored.
async fn read_chunked_body<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = Vec::new();
        (&mut *r)
            .take(1024)
            .read_until(b'\n', &mut size_line)
            .await
            .context("reading a chunk size")?;
        let text = std::str::from_utf8(&size_line).context("chunk size is not UTF-8")?;
        let hex = text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16)
            .with_context(|| format!("bad chunk size line {text:?}"))?;
        if size == 0 {
            // Trailer fields, up to the empty line.
            loop {
                let mut line = Vec::new();
                (&mut *r)
                    .take(MAX_HEAD as u64)
                    .read_until(b'\n', &mut line)
                    .await
                    .context("reading the chunked trailer")?;
                if line.is_empty() {
                    bail!("connection closed inside a chunked trailer");
                }
                if line == b"\r\n" || line == b"\n" {
                    return Ok(body);
                }
            }
        }
        if body.len() + size > MAX_BODY {
            bail!("chunked request body over the limit of {MAX_BODY} bytes");
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])
            .await
            .context("reading a chunk")?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)
            .await
            .context("reading a chunk's end")?;
        if &crlf != b"\r\n" {
            bail!("a chunk does not end with CRLF");
        }
    }
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(decoded) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(decoded);
                i += 3;
                continue;
            }
        }
        out.push(if b == b'+' && plus_is_space { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Headers every response of a real API server carries (the values are made up).
fn common_headers(audit_id: &str) -> String {
    format!(
        "Audit-Id: {audit_id}\r\nCache-Control: no-cache, private\r\nContent-Type: application/json\r\n\
         X-Kubernetes-Pf-Flowschema-Uid: 5b0a5e3c-1f3e-4e0e-9d43-2c4e61f7a001\r\n\
         X-Kubernetes-Pf-Prioritylevel-Uid: 8c0d2a1b-6e5f-4a3b-8c7d-9e0f1a2b3c4d\r\n"
    )
}

/// A complete response with a JSON body.
pub(crate) async fn write_json<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: u16,
    body: &[u8],
    audit_id: &str,
) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\n{}Content-Length: {}\r\n\r\n",
        reason(status),
        common_headers(audit_id),
        body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await?;
    Ok(())
}

/// The head of a streamed (chunked) 200 response: a watch.
pub(crate) async fn write_stream_head<W: AsyncWrite + Unpin>(
    w: &mut W,
    audit_id: &str,
) -> Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\n{}Transfer-Encoding: chunked\r\n\r\n",
        common_headers(audit_id)
    );
    w.write_all(head.as_bytes()).await?;
    w.flush().await?;
    Ok(())
}

/// One chunk: a watch event is one JSON document and a newline, flushed at once so the client
/// sees it now (the API server flushes after every event too).
pub(crate) async fn write_chunk<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> Result<()> {
    w.write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    w.write_all(data).await?;
    w.write_all(b"\r\n").await?;
    w.flush().await?;
    Ok(())
}

/// The terminating chunk: the stream ended cleanly and the connection can carry more requests.
pub(crate) async fn write_last_chunk<W: AsyncWrite + Unpin>(w: &mut W) -> Result<()> {
    w.write_all(b"0\r\n\r\n").await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries_like_a_kubernetes_client_sends_them() {
        assert_eq!(
            percent_decode("spec.nodeName%3Dsl1-n1", true),
            "spec.nodeName=sl1-n1"
        );
        assert_eq!(
            percent_decode("spec.nodeName%21%3Dn1", true),
            "spec.nodeName!=n1"
        );
        assert_eq!(percent_decode("a+b%2", true), "a b%2");
        assert_eq!(percent_decode("/api/v1/pods", false), "/api/v1/pods");
    }

    #[tokio::test]
    async fn parses_requests_with_keep_alive() {
        let wire = b"GET /api/v1/pods?limit=500&fieldSelector=spec.nodeName%3Dn1 HTTP/1.1\r\nHost: x\r\n\r\n\
                     GET /version HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut r = BufReader::new(&wire[..]);
        let a = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(a.path, "/api/v1/pods");
        assert_eq!(a.query["fieldSelector"], "spec.nodeName=n1");
        assert_eq!(a.query["limit"], "500");
        assert!(!a.close);
        let b = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(b.path, "/version");
        assert!(b.close);
        assert!(read_request(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reads_post_bodies_with_a_length_or_in_chunks() {
        let wire = b"POST /apis/authentication.k8s.io/v1/tokenreviews HTTP/1.1\r\nContent-Type: application/json\r\n\
                     Content-Length: 7\r\n\r\n{\"a\":1}\
                     POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\n{\"b\r\n4\r\n\":2}\r\n0\r\nX-T: 1\r\n\r\n\
                     GET /version HTTP/1.1\r\n\r\n";
        let mut r = BufReader::new(&wire[..]);
        let a = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(a.method, "POST");
        assert_eq!(a.body, br#"{"a":1}"#);
        let b = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(b.body, br#"{"b":2}"#);
        let c = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(c.path, "/version");
        assert!(c.body.is_empty());
    }

    #[tokio::test]
    async fn refuses_bodies_over_the_limit() {
        let head = format!("POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        let mut r = BufReader::new(head.as_bytes());
        let err = read_request(&mut r).await.unwrap_err();
        assert!(format!("{err:#}").contains("over the limit"), "{err:#}");
        let chunked = format!(
            "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_BODY + 1
        );
        let mut r = BufReader::new(chunked.as_bytes());
        let err = read_request(&mut r).await.unwrap_err();
        assert!(format!("{err:#}").contains("over the limit"), "{err:#}");
    }
}
