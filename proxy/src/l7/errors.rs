//! Responses sluice makes itself when it cannot get one from a backend: well-formed HTTP with
//! the status a client (and a retrying library) expects, a short reason in the `x-sluice-error`
//! header, and for gRPC clients a trailers-only response with the matching `grpc-status`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::{full_body, upstream::UpstreamError, Body};

/// The header that carries the reason of a response sluice generated.
pub const ERROR_HEADER: &str = "x-sluice-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Routes are attached to the Service but none matches the request.
    #[error("no route matches the request")]
    NoRoute,
    /// The matched rule sends the request nowhere valid (no backends, all weights 0, or an
    /// unresolvable backendRef): the Gateway API says 500.
    #[error("{0}")]
    BadBackend(String),
    #[error("no ready endpoints for {0}")]
    NoEndpoints(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("request timeout ({0:?}) exceeded")]
    RequestTimeout(Duration),
    #[error("backend request timeout ({0:?}) exceeded")]
    BackendTimeout(Duration),
    #[error("{0}")]
    Unsupported(&'static str),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NoEndpoints(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::RequestTimeout(_) | ProxyError::BackendTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// A short machine-friendly reason (Envoy calls these response flags).
    pub fn flag(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no-route",
            ProxyError::BadBackend(_) => "invalid-backend",
            ProxyError::NoEndpoints(_) => "no-healthy-upstream",
            ProxyError::Upstream(e) if e.is_connect() => "upstream-connect-failure",
            ProxyError::Upstream(_) => "upstream-reset",
            ProxyError::RequestTimeout(_) => "request-timeout",
            ProxyError::BackendTimeout(_) => "backend-timeout",
            ProxyError::Unsupported(_) => "unsupported",
        }
    }

    /// The gRPC status a gRPC client should see (codes from grpc/doc/statuscodes.md).
    fn grpc_status(&self) -> u16 {
        match self {
            ProxyError::NoRoute | ProxyError::Unsupported(_) => 12, // UNIMPLEMENTED
            ProxyError::BadBackend(_) => 13,                       // INTERNAL
            ProxyError::NoEndpoints(_) | ProxyError::Upstream(_) => 14, // UNAVAILABLE
            ProxyError::RequestTimeout(_) | ProxyError::BackendTimeout(_) => 4, // DEADLINE_EXCEEDED
        }
    }

    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let reason = format!("{}: {}", self.flag(), self);
        let mut resp = if grpc {
            // Trailers-only: HTTP 200, the status in the (only) header block, no body.
            let mut r = Response::new(super::empty_body());
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&reason)) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(full_body(Bytes::from(format!("{reason}\n"))));
            *r.status_mut() = self.status();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        };
        if let Ok(v) = HeaderValue::from_str(self.flag()) {
            resp.headers_mut().insert(ERROR_HEADER, v);
        }
        resp
    }
}

/// gRPC's percent-encoding of `grpc-message` (RFC 3986 unreserved and printable ASCII pass,
/// everything else as %XX).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_grpc_forms() {
        let r = ProxyError::RequestTimeout(Duration::from_millis(200)).into_response(false);
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.headers()[ERROR_HEADER], "request-timeout");

        let r = ProxyError::NoEndpoints("shop/web:80".into()).into_response(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert!(r.headers()["grpc-message"].to_str().unwrap().contains("no-healthy-upstream"));
        assert_eq!(percent_encode("a%b\né"), "a%25b%0A%C3%A9");
    }
}
