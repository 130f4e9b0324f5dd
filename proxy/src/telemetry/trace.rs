//! Trace context propagation and spans (to be implemented).

use http::HeaderMap;

use super::{Reporter, RequestRecord, TelemetryConfig};

/// The trace context of one proxy hop while its request is in flight.
#[derive(Debug, Default)]
pub struct SpanContext {
    /// The trace id (32 hex digits), for access logs and tap.
    pub trace_id: Option<String>,
    /// `x-request-id` of the request.
    pub request_id: Option<String>,
}

pub struct Tracer {}

impl Tracer {
    pub fn new(_cfg: &TelemetryConfig) -> Tracer {
        Tracer {}
    }

    pub fn start(&self, _reporter: Reporter, _headers: &mut HeaderMap) -> SpanContext {
        SpanContext::default()
    }

    /// Ends the span (if sampled) with what the request became.
    pub fn end(&self, _span: &SpanContext, _rec: &RequestRecord<'_>) {}
}
