//! The server name (SNI) of a TLS ClientHello, read from an opaque connection without
//! terminating it, for a VirtualService's `tls` rules (TLS passthrough routed by SNI, as
//! Envoy's `tls_inspector` does for Istio's sidecars).
//!
//! The parser is small and strict about bounds: it reads at most [`MAX_HELLO_BYTES`] from the
//! client (a ClientHello, even with post-quantum key shares, is a few KiB; it may span several
//! records, which are reassembled), gives up after [`SNI_TIMEOUT`], and every byte read is
//! handed back to be sent upstream first, so the TLS session itself is untouched. A client that
//! does not speak TLS, or sends no server name, gets no SNI: the `tls` rules do not match it.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most bytes read while looking for the server name.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;
/// How long the client has to send its ClientHello (TLS clients send it right after connecting;
/// this bounds one that sends nothing, which then gets no SNI).
pub const SNI_TIMEOUT: Duration = Duration::from_secs(5);

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming this server (lower-case, without a trailing dot).
    Sni(String),
    /// A complete ClientHello without a server name.
    NoSni,
    /// Not a TLS ClientHello.
    NotTls,
    /// More bytes are needed.
    NeedMore,
}

/// Parses what a client sent first.
pub fn parse(buf: &[u8]) -> Hello {
    // Reassemble the handshake messages carried by the leading handshake records.
    let mut hs: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else { return if hs.is_empty() && at < buf.len() && buf[at] != 0x16 { Hello::NotTls } else { Hello::NeedMore } };
        // Content type 22 (handshake), legacy version 3.x, length within the record limit.
        if header[0] != 0x16 || header[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 + 2048 {
            return Hello::NotTls;
        }
        let Some(body) = buf.get(at + 5..at + 5 + len) else {
            // Part of a record: parse what is there if the message might already be whole.
            hs.extend_from_slice(&buf[at + 5..]);
            return match client_hello(&hs) {
                Hello::NeedMore if buf.len() >= MAX_HELLO_BYTES => Hello::NotTls,
                other => other,
            };
        };
        hs.extend_from_slice(body);
        at += 5 + len;
        match client_hello(&hs) {
            Hello::NeedMore if at >= buf.len() => return if buf.len() >= MAX_HELLO_BYTES { Hello::NotTls } else { Hello::NeedMore },
            Hello::NeedMore => continue,
            other => return other,
        }
    }
}

/// The handshake bytes: a ClientHello message, maybe incomplete.
fn client_hello(hs: &[u8]) -> Hello {
    let Some(&[kind, a, b, c]) = hs.get(..4).map(|s| <&[u8; 4]>::try_from(s).unwrap()) else { return Hello::NeedMore };
    if kind != 1 {
        return Hello::NotTls;
    }
    let len = (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c);
    if len > MAX_HELLO_BYTES {
        return Hello::NotTls;
    }
    let Some(msg) = hs.get(4..4 + len) else { return Hello::NeedMore };
    match server_name(msg) {
        Some(Ok(name)) => Hello::Sni(name),
        Some(Err(())) => Hello::NotTls,
        None => Hello::NoSni,
    }
}

/// A cursor over a complete ClientHello body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ()> {
        if self.0.len() < n {
            return Err(());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<usize, ()> {
        Ok(usize::from(self.take(1)?[0]))
    }

    fn u16(&mut self) -> Result<usize, ()> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

/// The `server_name` extension's host name: `None` when there is none, `Err` when the message
/// is malformed.
fn server_name(msg: &[u8]) -> Option<Result<String, ()>> {
    let parsed = (|| -> Result<Option<String>, ()> {
        let mut c = Cursor(msg);
        c.take(2)?; // legacy_version
        c.take(32)?; // random
        let n = c.u8()?;
        c.take(n)?; // legacy_session_id
        let n = c.u16()?;
        c.take(n)?; // cipher_suites
        let n = c.u8()?;
        c.take(n)?; // legacy_compression_methods
        if c.0.is_empty() {
            return Ok(None); // no extensions at all
        }
        let n = c.u16()?;
        let mut ext = Cursor(c.take(n)?);
        while !ext.0.is_empty() {
            let kind = ext.u16()?;
            let n = ext.u16()?;
            let data = ext.take(n)?;
            if kind != 0 {
                continue;
            }
            let mut list = Cursor(data);
            let n = list.u16()?;
            let mut names = Cursor(list.take(n)?);
            while !names.0.is_empty() {
                let name_type = names.u8()?;
                let n = names.u16()?;
                let name = names.take(n)?;
                if name_type == 0 {
                    let name = std::str::from_utf8(name).map_err(|_| ())?;
                    if name.is_empty() || name.len() > 253 {
                        return Err(());
                    }
                    return Ok(Some(name.trim_end_matches('.').to_ascii_lowercase()));
                }
            }
            return Ok(None);
        }
        Ok(None)
    })();
    match parsed {
        Ok(Some(name)) => Some(Ok(name)),
        Ok(None) => None,
        Err(()) => Some(Err(())),
    }
}

/// Reads the client's first bytes (after `prefix`, what protocol detection already read) until
/// the ClientHello's server name is known, within [`MAX_HELLO_BYTES`] and `timeout`. Returns the
/// verdict (`NeedMore` when the time or the bound ran out, or the client closed) and every byte
/// read, which must be sent upstream first.
pub async fn read_sni<S: AsyncRead + Unpin>(stream: &mut S, prefix: Bytes, timeout: Duration) -> (Hello, Bytes) {
    let mut buf = BytesMut::with_capacity(prefix.len().max(2048));
    buf.extend_from_slice(&prefix);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match parse(&buf) {
            Hello::NeedMore if buf.len() < MAX_HELLO_BYTES => {}
            verdict => return (verdict, buf.freeze()),
        }
        let room = MAX_HELLO_BYTES - buf.len();
        let mut chunk = vec![0u8; room.min(4096)];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return (Hello::NeedMore, buf.freeze()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it for `name` (or without SNI for `None`), in records of
    /// at most `record` bytes.
    fn hello(name: Option<&str>, record: usize) -> Vec<u8> {
        use std::sync::Arc;
        let mut roots = rustls::RootCertStore::empty();
        let _ = &mut roots;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut config = config;
        config.enable_sni = name.is_some();
        config.max_fragment_size = Some(record);
        let server = rustls_pki_types::ServerName::try_from(name.unwrap_or("no-sni.example").to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let h = hello(Some("Reviews.Bookinfo.svc.cluster.local"), 16 * 1024);
        assert_eq!(parse(&h), Hello::Sni("reviews.bookinfo.svc.cluster.local".into()));
        // Any shorter prefix needs more, never a wrong verdict.
        for cut in [0, 1, 4, 5, 6, 40, h.len() - 1] {
            assert_eq!(parse(&h[..cut]), Hello::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn a_hello_split_over_small_records_is_reassembled() {
        let h = hello(Some("a.example.com"), 64);
        assert!(h.len() > 5 + 64, "several records");
        assert_eq!(parse(&h), Hello::Sni("a.example.com".into()));
    }

    #[test]
    fn no_server_name_and_not_tls() {
        assert_eq!(parse(&hello(None, 16 * 1024)), Hello::NoSni);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(&[0x16, 3, 1, 0, 0]), Hello::NotTls, "an empty record");
        // A handshake message that is not a ClientHello.
        assert_eq!(parse(&[0x16, 3, 3, 0, 4, 2, 0, 0, 0]), Hello::NotTls);
        // Garbage inside a ClientHello of plausible length is refused, not read past.
        let mut bad = vec![0x16, 3, 1, 0, 8, 1, 0, 0, 4];
        bad.extend_from_slice(&[3, 3, 0, 0]);
        assert_eq!(parse(&bad), Hello::NotTls);
    }

    #[test]
    fn the_read_is_bounded() {
        // A record header announcing a huge ClientHello that never completes.
        let mut claim = vec![0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0x3f, 0xf0];
        claim.resize(MAX_HELLO_BYTES + 100, 0);
        assert_ne!(parse(&claim), Hello::NeedMore, "past the bound there is no waiting for more");
    }

    #[tokio::test]
    async fn reading_stops_at_the_timeout_and_returns_what_was_read() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, &[0x16, 3, 1]).await.unwrap();
        let start = tokio::time::Instant::now();
        let (v, read) = read_sni(&mut server, Bytes::new(), Duration::from_millis(50)).await;
        assert_eq!(v, Hello::NeedMore);
        assert_eq!(&read[..], &[0x16, 3, 1]);
        assert!(start.elapsed() >= Duration::from_millis(50));
        drop(client);
        let h = hello(Some("x.example"), 16 * 1024);
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        tokio::io::AsyncWriteExt::write_all(&mut client, &h[10..]).await.unwrap();
        let (v, read) = read_sni(&mut server, Bytes::copy_from_slice(&h[..10]), Duration::from_secs(5)).await;
        assert_eq!(v, Hello::Sni("x.example".into()));
        assert_eq!(&read[..], &h[..], "every byte is handed back");
    }
}
