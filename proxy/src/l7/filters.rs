//! Route filters applied to a request head or a response head: header modifiers, URL rewrites
//! and redirects of the Gateway API, and a VirtualService's rewrites (Envoy's prefix and regex
//! rewrites), redirect and direct response. (RequestMirror is in [`super::mirror`]: it sends a
//! request.)

use http::{header, request, uri::PathAndQuery, HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Uri};

use super::{empty_body, full_body, upstream::Wire, Body};
use crate::discovery::{
    route::{DirectResponse, HeaderModifier, HttpRedirect, PathMatch, PathModifier, RedirectPort, RequestRedirect, RouteMatch, UrlRewrite},
    route_table::trim_prefix,
};

/// `set` replaces every value, `add` appends one, `remove` deletes (in that order, as Envoy
/// applies them; names never overlap within one filter, the parser checks).
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (name, value) in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// The request's host as the client addressed it: the URI authority (HTTP/2) or Host header.
pub fn request_host(parts: &request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
}

/// Sets the host the upstream sees: the Host header, and for HTTP/2 the URI authority.
pub fn set_host(parts: &mut request::Parts, host: &str, wire: Wire) {
    let Ok(value) = HeaderValue::from_str(host) else { return };
    if wire == Wire::Http1 || parts.headers.contains_key(header::HOST) {
        parts.headers.insert(header::HOST, value);
    }
    if parts.uri.authority().is_some() {
        let mut uri = parts.uri.clone().into_parts();
        if let Ok(a) = host.parse() {
            uri.authority = Some(a);
            if let Ok(u) = Uri::from_parts(uri) {
                parts.uri = u;
            }
        }
    }
}

/// The path after a path modifier. `ReplacePrefixMatch` replaces what the rule's PathPrefix
/// matched (element-wise, so `/foo` → `/bar` turns `/foo/x` into `/bar/x`).
pub fn modified_path(path: &str, modifier: &PathModifier, matched: &RouteMatch) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let Some(PathMatch::PathPrefix(prefix)) = &matched.path else {
                // The parser only allows ReplacePrefixMatch with PathPrefix matches.
                return path.to_owned();
            };
            let prefix = trim_prefix(prefix);
            let rest = if prefix == "/" { path.strip_prefix('/').map_or(path, |r| r) } else { path.strip_prefix(prefix).unwrap_or(path) };
            let replacement = trim_prefix(replacement);
            match (replacement == "/", rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (true, false) if rest.starts_with('/') => rest.to_owned(),
                (true, false) => format!("/{rest}"),
                (false, _) if rest.is_empty() || rest.starts_with('/') => format!("{replacement}{rest}"),
                (false, _) => format!("{replacement}/{rest}"),
            }
        }
        PathModifier::ReplacePrefix(replacement) => {
            // Envoy's prefix_rewrite: what the match's uri matched is replaced, as a string.
            let matched_len = match &matched.path {
                Some(PathMatch::Prefix(p)) | Some(PathMatch::PathPrefix(p)) => p.len().min(path.len()),
                Some(PathMatch::Exact(_)) | Some(PathMatch::RegularExpression(_)) => path.len(),
                // No uri: Envoy's route matches the prefix "/".
                None => usize::from(path.starts_with('/')),
            };
            match path.get(matched_len..) {
                Some(rest) => format!("{replacement}{rest}"),
                None => replacement.clone(),
            }
        }
        PathModifier::RegexReplace { pattern, replacement } => pattern.replace_all(path, replacement).into_owned(),
    }
}

fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).ok()?);
    Uri::from_parts(parts).ok()
}

/// URLRewrite: the host and/or path the upstream sees.
pub fn rewrite(parts: &mut request::Parts, rw: &UrlRewrite, matched: &RouteMatch, wire: Wire) {
    if let Some(host) = &rw.hostname {
        set_host(parts, host, wire);
    }
    if let Some(modifier) = &rw.path {
        let path = modified_path(parts.uri.path(), modifier, matched);
        if let Some(u) = with_path(&parts.uri, &path) {
            parts.uri = u;
        }
    }
}

/// RequestRedirect: the response sluice sends instead of forwarding. `service_port` is the
/// port the client dialled, which the Location keeps unless the filter says otherwise.
pub fn redirect(parts: &request::Parts, rd: &RequestRedirect, matched: &RouteMatch, service_port: u16) -> Response<Body> {
    let scheme = rd.scheme.clone().or_else(|| parts.uri.scheme_str().map(str::to_owned)).unwrap_or_else(|| "http".into());
    // Without its port: the port is decided below.
    let host = rd.hostname.clone().unwrap_or_else(|| strip_port(&request_host(parts).unwrap_or_default()).to_owned());
    // The spec: an explicit port; else the scheme's well-known port if the filter sets a
    // scheme; else the port the request came to. 80 for http and 443 for https are omitted.
    let port = rd.port.unwrap_or(match rd.scheme.as_deref() {
        Some("https") => 443,
        Some(_) => 80,
        None => service_port,
    });
    let default_port = matches!((scheme.as_str(), port), ("http", 80) | ("https", 443));
    let path = match &rd.path {
        Some(m) => modified_path(parts.uri.path(), m, matched),
        None => parts.uri.path().to_owned(),
    };
    let mut location = format!("{scheme}://{host}");
    if !default_port {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(&path);
    if let Some(q) = parts.uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = StatusCode::from_u16(rd.status_code).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A VirtualService `redirect`, with Envoy's rules for the Location: the request's host (with
/// its port) unless `authority` replaces it (without a port); an explicit port, or the port the
/// client dialled (`derivePort: FROM_REQUEST_PORT`), replaces the port; 80 for http and 443 for
/// https are left out.
pub fn istio_redirect(parts: &request::Parts, rd: &HttpRedirect, matched: &RouteMatch, service_port: u16) -> Response<Body> {
    let scheme = rd.scheme.clone().unwrap_or_else(|| "http".into());
    let port = match rd.port {
        RedirectPort::Explicit(p) => Some(p),
        RedirectPort::FromRequest => Some(service_port),
        RedirectPort::Unchanged => None,
    };
    let request_host = request_host(parts).unwrap_or_default();
    let mut authority = match (&rd.authority, port) {
        (Some(a), _) => a.clone(),
        (None, Some(_)) => strip_port(&request_host).to_owned(),
        (None, None) => {
            // A scheme change drops the other scheme's default port (Envoy's processRequestHost).
            match (scheme.as_str(), request_host.rsplit_once(':')) {
                ("https", Some((h, "80"))) | ("http", Some((h, "443"))) => h.to_owned(),
                _ => request_host.clone(),
            }
        }
    };
    if let Some(p) = port {
        if !matches!((scheme.as_str(), p), ("http", 80) | ("https", 443)) {
            authority = format!("{}:{p}", strip_port(&authority));
        }
    }
    let path = match &rd.path {
        Some(m) => modified_path(parts.uri.path(), m, matched),
        None => parts.uri.path().to_owned(),
    };
    let mut location = format!("{scheme}://{authority}{path}");
    // The query is kept unless the new path brings its own (Envoy's path_redirect).
    if let (Some(q), false) = (parts.uri.query(), path.contains('?')) {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = StatusCode::from_u16(rd.status_code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// A VirtualService `directResponse`: the status, and the body as `text/plain` when there is one.
pub fn direct_response(d: &DirectResponse) -> Response<Body> {
    let mut resp = match &d.body {
        Some(b) => {
            let mut r = Response::new(full_body(b.clone()));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        None => Response::new(empty_body()),
    };
    *resp.status_mut() = StatusCode::from_u16(d.status).unwrap_or(StatusCode::OK);
    resp
}

/// `host:port` → `host` (`[v6]:port` → `[v6]`).
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch { path: Some(PathMatch::PathPrefix(p.into())), ..RouteMatch::default() }
    }

    fn parts(uri: &str, host: &str) -> request::Parts {
        Request::builder().uri(uri).header("host", host).body(()).unwrap().into_parts().0
    }

    #[test]
    fn header_modifier_sets_adds_and_removes() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "old".parse().unwrap());
        h.insert("x-b", "1".parse().unwrap());
        h.insert("x-gone", "bye".parse().unwrap());
        modify_headers(
            &mut h,
            &HeaderModifier {
                set: vec![("x-a".into(), "new".into())],
                add: vec![("x-b".into(), "2".into())],
                remove: vec!["x-gone".into()],
            },
        );
        assert_eq!(h["x-a"], "new");
        assert_eq!(h.get_all("x-b").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn prefix_replacement_is_element_wise() {
        let r = |path: &str, pre: &str, with: &str| {
            modified_path(path, &PathModifier::ReplacePrefixMatch(with.into()), &prefix(pre))
        };
        assert_eq!(r("/foo/bar", "/foo", "/xyz"), "/xyz/bar");
        assert_eq!(r("/foo", "/foo", "/xyz"), "/xyz");
        assert_eq!(r("/foo/bar", "/foo/", "/xyz/"), "/xyz/bar");
        assert_eq!(r("/foo/bar", "/foo", "/"), "/bar");
        assert_eq!(r("/foo", "/foo", "/"), "/");
        assert_eq!(r("/bar", "/", "/v1"), "/v1/bar");
        assert_eq!(modified_path("/a/b", &PathModifier::ReplaceFullPath("/z".into()), &prefix("/a")), "/z");
    }

    #[test]
    fn rewrite_keeps_the_query() {
        let mut p = parts("/old/x?q=1", "reviews:9080");
        rewrite(
            &mut p,
            &UrlRewrite { hostname: Some("reviews.internal".into()), path: Some(PathModifier::ReplacePrefixMatch("/new".into())) },
            &prefix("/old"),
            Wire::Http1,
        );
        assert_eq!(p.uri, "/new/x?q=1");
        assert_eq!(p.headers["host"], "reviews.internal");
    }

    fn istio_prefix(p: &str) -> RouteMatch {
        RouteMatch { path: Some(PathMatch::Prefix(p.into())), ..RouteMatch::default() }
    }

    #[test]
    fn envoy_prefix_rewrite_replaces_what_the_match_matched() {
        let r = |path: &str, m: &RouteMatch, with: &str| modified_path(path, &PathModifier::ReplacePrefix(with.into()), m);
        // A string prefix, not element-wise.
        assert_eq!(r("/reviews/1", &istio_prefix("/reviews"), "/v2/reviews"), "/v2/reviews/1");
        assert_eq!(r("/reviewsX", &istio_prefix("/reviews"), "/r"), "/rX");
        // An exact or regex match: the whole path.
        assert_eq!(r("/a/b", &RouteMatch { path: Some(PathMatch::Exact("/a/b".into())), ..RouteMatch::default() }, "/z"), "/z");
        // No uri: the leading "/" (Istio's well-known surprise: "/x" with rewrite "/v1" is "/v1x").
        assert_eq!(r("/x", &RouteMatch::default(), "/v1"), "/v1x");
        assert_eq!(r("/x", &RouteMatch::default(), "/v1/"), "/v1/x");
    }

    #[test]
    fn regex_rewrite_replaces_every_match() {
        let m = PathModifier::RegexReplace {
            pattern: crate::discovery::route::Regex::unanchored("^/service/([^/]+)(/.*)$").unwrap(),
            replacement: "${2}/instance/${1}".into(),
        };
        assert_eq!(modified_path("/service/foo/v1/api", &m, &RouteMatch::default()), "/v1/api/instance/foo");
        let all = PathModifier::RegexReplace { pattern: crate::discovery::route::Regex::unanchored("o").unwrap(), replacement: "0".into() };
        assert_eq!(modified_path("/foo/boo", &all, &RouteMatch::default()), "/f00/b00");
    }

    #[test]
    fn istio_redirect_keeps_the_requests_port_unless_told() {
        let p = parts("/v1/x?q=1", "reviews:9080");
        let rd = |authority: Option<&str>, port: RedirectPort, scheme: Option<&str>| HttpRedirect {
            scheme: scheme.map(str::to_owned),
            authority: authority.map(str::to_owned),
            path: Some(PathModifier::ReplaceFullPath("/v2/x".into())),
            port,
            status_code: 301,
        };
        let loc = |r: &Response<Body>| r.headers()["location"].to_str().unwrap().to_owned();
        let m = RouteMatch::default();
        assert_eq!(loc(&istio_redirect(&p, &rd(None, RedirectPort::Unchanged, None), &m, 9080)), "http://reviews:9080/v2/x?q=1");
        // A new authority comes without the old port.
        assert_eq!(loc(&istio_redirect(&p, &rd(Some("new"), RedirectPort::Unchanged, None), &m, 9080)), "http://new/v2/x?q=1");
        assert_eq!(loc(&istio_redirect(&p, &rd(Some("new"), RedirectPort::Explicit(8443), Some("https")), &m, 9080)), "https://new:8443/v2/x?q=1");
        assert_eq!(loc(&istio_redirect(&p, &rd(None, RedirectPort::FromRequest, None), &m, 9080)), "http://reviews:9080/v2/x?q=1");
        assert_eq!(loc(&istio_redirect(&p, &rd(None, RedirectPort::Explicit(80), None), &m, 9080)), "http://reviews/v2/x?q=1");
        assert_eq!(istio_redirect(&p, &rd(None, RedirectPort::Unchanged, None), &m, 9080).status(), 301);
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("reviews:9080"), "reviews");
        assert_eq!(strip_port("reviews"), "reviews");
        assert_eq!(strip_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(strip_port("10.96.0.10:80"), "10.96.0.10");
    }

    #[test]
    fn redirect_location() {
        let p = parts("/old/x?q=1", "reviews:9080");
        let rd = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| RequestRedirect {
            scheme: scheme.map(str::to_owned),
            hostname: host.map(str::to_owned),
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            port,
            status_code: 301,
        };
        let loc = |r: &Response<Body>| r.headers()["location"].to_str().unwrap().to_owned();
        let r = redirect(&p, &rd(None, None, None), &prefix("/old"), 9080);
        assert_eq!(r.status(), 301);
        assert_eq!(loc(&r), "http://reviews:9080/new/x?q=1");
        assert_eq!(loc(&redirect(&p, &rd(Some("https"), Some("example.com"), None), &prefix("/old"), 9080)), "https://example.com/new/x?q=1");
        assert_eq!(loc(&redirect(&p, &rd(None, None, Some(80)), &prefix("/old"), 9080)), "http://reviews/new/x?q=1");
    }
}
