//! Responses sluice makes itself when it cannot get one from a backend: well-formed HTTP with
//! the status a client (and a retrying library) expects, a short reason in the `x-sluice-error`
//! header, and for gRPC clients a trailers-only response with the matching `grpc-status`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::{full_body, limits::Overflow, upstream::UpstreamError, Body};

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
    /// A VirtualService destination that names no Service, ServiceEntry or subset sluice knows:
    /// 503, as Envoy answers for a cluster Istio did not generate (`NC`).
    #[error("{0}")]
    NoCluster(String),
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
    /// The upstream answered outside HTTP's rules in a way sluice must not pass on (e.g. a
    /// `101 Switching Protocols` the client did not ask for).
    #[error("the upstream broke the protocol: {0}")]
    UpstreamProtocol(String),
    /// A local rate limit (TrafficPolicy `localRateLimit`) said no.
    #[error("local rate limit reached")]
    RateLimited { status: u16, retry_after: Duration },
    /// Fault injection (TrafficPolicy `faultInjection.abort`).
    #[error("fault injected")]
    FaultAbort { http: u16, grpc: Option<u16> },
    /// A circuit breaker or a per-pod limit: sluice fails fast instead of queueing.
    #[error("overflow: {} reached", .0.as_str())]
    Overflow(Overflow),
    /// The client's namespace is REGISTRY_ONLY and the destination is not registered.
    #[error("egress to {0} is not allowed: the namespace's outbound policy is REGISTRY_ONLY and no Service or ServiceEntry declares it{note}", note = host_note(.1))]
    EgressBlocked(std::net::SocketAddr, Option<String>),
    /// The chosen endpoint is one of sluice's own listeners: connecting would loop.
    #[error("refused: {0}")]
    SelfConnection(crate::loopguard::SelfTarget),
    /// The destination is a mesh pod and the client pod's identity has no certificate yet
    /// (the CA has not answered): the request is not sent rather than sent without mTLS.
    #[error("no certificate for this pod's identity {0} yet (the CA has not issued it; see `sluice certs`)")]
    NoCertificate(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NoEndpoints(_) | ProxyError::NoCertificate(_) | ProxyError::NoCluster(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Upstream(UpstreamError::Overflow(_)) | ProxyError::Overflow(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(_)
            | ProxyError::EgressBlocked(..)
            | ProxyError::SelfConnection(_)
            | ProxyError::UpstreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::RateLimited { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
            }
            ProxyError::FaultAbort { http, .. } => StatusCode::from_u16(*http).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            ProxyError::RequestTimeout(_) | ProxyError::BackendTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// A short machine-friendly reason (Envoy calls these response flags).
    pub fn flag(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no-route",
            ProxyError::BadBackend(_) => "invalid-backend",
            ProxyError::NoCluster(_) => "no-cluster",
            ProxyError::NoEndpoints(_) => "no-healthy-upstream",
            ProxyError::Upstream(UpstreamError::Overflow(_)) | ProxyError::Overflow(_) => "overflow",
            ProxyError::Upstream(UpstreamError::Tls { .. }) => "upstream-tls-failure",
            ProxyError::Upstream(e) if e.is_connect() => "upstream-connect-failure",
            ProxyError::Upstream(_) => "upstream-reset",
            ProxyError::UpstreamProtocol(_) => "upstream-protocol-error",
            ProxyError::RequestTimeout(_) => "request-timeout",
            ProxyError::BackendTimeout(_) => "backend-timeout",
            ProxyError::Unsupported(_) => "unsupported",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::FaultAbort { .. } => "fault-injected",
            ProxyError::EgressBlocked(..) => "egress-blocked",
            ProxyError::SelfConnection(_) => "self-connection",
            ProxyError::NoCertificate(_) => "no-certificate",
        }
    }

    /// The gRPC status a gRPC client should see (codes from grpc/doc/statuscodes.md).
    fn grpc_status(&self) -> u16 {
        match self {
            ProxyError::NoRoute | ProxyError::Unsupported(_) => 12, // UNIMPLEMENTED
            ProxyError::BadBackend(_) => 13,                       // INTERNAL
            ProxyError::NoEndpoints(_)
            | ProxyError::NoCluster(_)
            | ProxyError::Upstream(_)
            | ProxyError::UpstreamProtocol(_)
            | ProxyError::NoCertificate(_) => 14, // UNAVAILABLE
            ProxyError::RequestTimeout(_) | ProxyError::BackendTimeout(_) => 4, // DEADLINE_EXCEEDED
            ProxyError::RateLimited { .. } => 8,                                 // RESOURCE_EXHAUSTED
            ProxyError::Overflow(_) => 14,
            ProxyError::EgressBlocked(..) | ProxyError::SelfConnection(_) => 7, // PERMISSION_DENIED
            ProxyError::FaultAbort { grpc: Some(code), .. } => *code,
            ProxyError::FaultAbort { http, .. } => grpc_status_of_http(*http),
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
        match &self {
            ProxyError::RateLimited { retry_after, .. } => {
                // Whole seconds, rounded up (RFC 9110 §10.2.3).
                let secs = retry_after.as_millis().div_ceil(1000).max(1);
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
            }
            ProxyError::Overflow(o) | ProxyError::Upstream(UpstreamError::Overflow(o)) => {
                // Says it was sluice's limit, not the backend, and which one.
                if let Ok(v) = HeaderValue::from_str(o.as_str()) {
                    resp.headers_mut().insert(OVERFLOW_HEADER, v);
                }
            }
            _ => {}
        }
        resp
    }
}

fn host_note(host: &Option<String>) -> String {
    host.as_ref().map(|h| format!(" (host {h})")).unwrap_or_default()
}

/// Set on overflow responses: the limit that was reached.
pub const OVERFLOW_HEADER: &str = "x-sluice-overflow";

/// The gRPC status gRPC's HTTP mapping gives an HTTP status (grpc/doc/http-grpc-status-mapping.md).
fn grpc_status_of_http(status: u16) -> u16 {
    match status {
        400 => 13, // INTERNAL
        401 => 16, // UNAUTHENTICATED
        403 => 7,  // PERMISSION_DENIED
        404 => 12, // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,    // UNKNOWN
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
