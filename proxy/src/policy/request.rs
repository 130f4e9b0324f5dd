//! What authorization reads from an HTTP request: its path as policies compare it, its host,
//! and the original client address (`remote.ip`).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// The path policies are matched against: the request target without its query (and
/// fragment), with percent-encoded unreserved characters decoded and dot segments removed
/// (RFC 3986 §6.2.2.2 and §5.2.4), which is Istio's default normalization (`BASE`). So
/// `/public/../admin` and `/%61dmin` are `/admin` to a policy, and a DENY on `/admin` cannot be
/// walked around. Encoded slashes and backslashes (`%2F`, `%5C`) are left as they are, as in
/// Istio's default. The request sent on is not rewritten.
pub fn normalize_path(target: &str) -> Cow<'_, str> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let decoded = decode_unreserved(path);
    let needs_dots = decoded.split('/').any(|s| s == "." || s == "..");
    if !needs_dots && decoded.starts_with('/') {
        return decoded;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                // Never above the root (the first, empty, segment).
                if out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut joined = out.join("/");
    if !joined.starts_with('/') {
        joined.insert(0, '/');
    }
    Cow::Owned(joined)
}

/// Decodes `%XX` where XX is an unreserved character (ALPHA, DIGIT, `-`, `.`, `_`, `~`).
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                    i += 3;
                    continue;
                }
            }
        }
        // Copy one UTF-8 character.
        let ch = path[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    Cow::Owned(out)
}

/// `host:port` → `host` (`[::1]:80` → `[::1]`); a host without a port is returned as it is.
pub fn host_without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// `remote.ip` of an HTTP request, Istio's "original client IP": the last address of the last
/// X-Forwarded-For header, i.e. the client as the nearest proxy saw it (Envoy's behaviour with
/// no trusted hops, which is what a sidecar's inbound listener has). `None` when the request has
/// no such header or its last entry is not an address; the connection's peer is then the remote
/// address. A client that talks to the pod directly can write this header itself: a policy that
/// must not be fooled by it uses `ipBlocks` (the peer) instead, as Istio advises.
pub fn remote_ip(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().last()?.to_str().ok()?;
    let entry = last.rsplit(',').next()?.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_for_matching() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b?x=1", "/a/b"),
            ("/a/b#frag", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/public/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a/%2E%2E/admin?q", "/admin"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%5Cb", "/a%5Cb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/x%", "/x%"),
            ("/x%4", "/x%4"),
            ("/ünï", "/ünï"),
            ("*", "/*"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    #[test]
    fn hosts_without_ports() {
        assert_eq!(host_without_port("web.shop:8080"), "web.shop");
        assert_eq!(host_without_port("web.shop"), "web.shop");
        assert_eq!(host_without_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(host_without_port("[fd00::1]"), "[fd00::1]");
        assert_eq!(host_without_port("10.0.0.1:80"), "10.0.0.1");
    }

    #[test]
    fn remote_ip_is_the_last_forwarded_address() {
        let mut h = HeaderMap::new();
        assert_eq!(remote_ip(&h), None);
        h.append("x-forwarded-for", "203.0.113.9, 198.51.100.7".parse().unwrap());
        assert_eq!(remote_ip(&h), Some("198.51.100.7".parse().unwrap()));
        h.append("x-forwarded-for", "192.0.2.1:5555".parse().unwrap());
        assert_eq!(remote_ip(&h), Some("192.0.2.1".parse().unwrap()));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "2001:db8::1".parse().unwrap());
        assert_eq!(remote_ip(&h), Some("2001:db8::1".parse().unwrap()));
        h.insert("x-forwarded-for", "unknown".parse().unwrap());
        assert_eq!(remote_ip(&h), None);
        h.insert("x-forwarded-for", "::ffff:10.1.2.3".parse().unwrap());
        assert_eq!(remote_ip(&h), Some("10.1.2.3".parse().unwrap()));
    }
}
