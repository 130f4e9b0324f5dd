//! Telemetry: what every proxied request and connection leaves behind. The data path produces
//! one [`RequestRecord`] per HTTP request (at the source node's sluice, `reporter=source`,
//! and at the destination node's, `reporter=destination`) and one [`ConnRecord`] per TCP
//! connection, and hands them to [`Telemetry`], which feeds the consumers:
//!
//! - `metrics`: Istio's standard metrics and sluice's own, served on :15020 (`/metrics`);
//! - `access_log`: one JSON line per request and connection, for namespaces that ask for it,
//!   written by a thread of its own through a bounded queue (drops are counted, the data path
//!   never waits);
//! - `tap` and `stats`: the live request stream of `sluice tap` / `sluice top` (nothing is
//!   built when nobody taps) and the rolling windows of `sluice stat`;
//! - `trace`: W3C trace context and B3 propagation, `x-request-id`, a span per proxy hop,
//!   exported with OTLP.
//!
//! Records borrow what the data path already has (pod contexts, model objects); consumers copy
//! only what they keep.

pub mod access_log;
pub mod metrics;
pub mod stats;
pub mod tap;
pub mod trace;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};


use http::{HeaderMap, Method};

pub use crate::discovery::WorkloadInfo;

/// Which side of a request a record is from (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client's node (outbound).
    Source,
    /// The server's node (inbound).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// One side of a request or connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The pod's workload; `None` outside the mesh's knowledge (an external address).
    pub workload: Option<&'a WorkloadInfo>,
    /// The SPIFFE ID (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`, as Istio's principal labels
    /// write it) when known.
    pub principal: Option<&'a str>,
    pub addr: Option<SocketAddr>,
}

/// The Service a request was for.
#[derive(Debug, Clone, Copy)]
pub struct ServiceRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// One completed HTTP request (its response finished, failed or was cut).
#[derive(Debug)]
pub struct RequestRecord<'a> {
    pub reporter: Reporter,
    pub start: SystemTime,
    pub duration: Duration,
    pub source: Peer<'a>,
    pub destination: Peer<'a>,
    /// The Service the request was addressed to (what the client dialled).
    pub service: Option<ServiceRef<'a>>,
    /// "http" or "grpc" (Istio's `request_protocol`).
    pub protocol: &'static str,
    pub method: &'a Method,
    pub authority: &'a str,
    pub path: &'a str,
    /// The status the client got (0: no response, the stream was reset).
    pub status: u16,
    /// gRPC status from the response headers or trailers.
    pub grpc_status: Option<u16>,
    /// "-" or sluice's reason for a response it made or a stream it cut (`x-sluice-error`).
    pub response_flags: &'a str,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub upstream: Option<SocketAddr>,
    /// The hop between the two sluices was mutual TLS.
    pub mtls: bool,
    pub trace_id: Option<&'a str>,
    pub request_id: Option<&'a str>,
    /// The source's or the destination's namespace asked for access logs
    /// (annotation `sluice.dev/access-log: enabled`).
    pub access_log: bool,
}

/// One closed TCP connection (opaque, or carried through an HBONE stream).
#[derive(Debug)]
pub struct ConnRecord<'a> {
    pub reporter: Reporter,
    pub start: SystemTime,
    pub duration: Duration,
    pub source: Peer<'a>,
    pub destination: Peer<'a>,
    pub service: Option<ServiceRef<'a>>,
    /// Bytes the server sent to the client (`istio_tcp_sent_bytes_total`).
    pub sent: u64,
    /// Bytes the client sent to the server (`istio_tcp_received_bytes_total`).
    pub received: u64,
    pub mtls: bool,
    /// "-" or why the connection was refused or reset.
    pub response_flags: &'a str,
    pub access_log: bool,
}

/// The namespace annotation that turns on access logs for requests from and to its pods.
pub const ACCESS_LOG_ANNOTATION: &str = "sluice.dev/access-log";

/// Telemetry settings (`sluice run` flags).
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    pub node: String,
    pub trust_domain: String,
    /// Where access log lines go: a file path, or "-" for stdout. `None`: nowhere.
    pub access_log_path: Option<std::path::PathBuf>,
    /// Records queued for the access log writer before new ones are dropped (and counted).
    pub access_log_queue: usize,
    /// OTLP collector (gRPC endpoint, e.g. `http://collector:4317`). `None`: no export.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled (0.0..=1.0); an incoming sampled flag is honoured.
    pub trace_sampling: f64,
    /// The cap on Istio metric series and the expiry of departed workloads' series.
    pub metric_series: metrics::SeriesLimits,
}

/// The consumers of telemetry records.
pub struct Telemetry {
    pub metrics: metrics::Metrics,
    pub access_log: access_log::AccessLog,
    pub tap: tap::Tap,
    pub stats: stats::Stats,
    pub trace: trace::Tracer,
}

impl Telemetry {
    pub fn new(cfg: &TelemetryConfig) -> Telemetry {
        Telemetry {
            metrics: metrics::Metrics::new(cfg),
            access_log: access_log::AccessLog::new(cfg),
            tap: tap::Tap::new(cfg),
            stats: stats::Stats::new(cfg),
            trace: trace::Tracer::new(cfg),
        }
    }

    /// A request completed.
    pub fn request(&self, rec: &RequestRecord<'_>) {
        self.metrics.on_request(rec);
        self.stats.on_request(rec);
        self.tap.on_request(rec);
        if rec.access_log {
            self.access_log.on_request(rec);
        }
    }

    /// A TCP connection opened (`istio_tcp_connections_opened_total`).
    pub fn connection_opened(&self, rec: &ConnRecord<'_>) {
        self.metrics.on_connection_opened(rec);
    }

    /// A TCP connection closed.
    pub fn connection_closed(&self, rec: &ConnRecord<'_>) {
        self.metrics.on_connection_closed(rec);
        if rec.access_log {
            self.access_log.on_connection(rec);
        }
    }

    /// Starts the span of this proxy hop for a request about to be forwarded: continues the
    /// trace in `headers` (W3C `traceparent`/`tracestate` or B3) or starts one, creates
    /// `x-request-id` when missing, and rewrites the propagation headers so the next hop is a
    /// child of this one. The returned context says the trace id (for access logs) and holds
    /// the span when the trace is sampled.
    pub fn start_span(&self, reporter: Reporter, headers: &mut HeaderMap) -> trace::SpanContext {
        self.trace.start(reporter, headers)
    }

    /// Ends a span with what the request became.
    pub fn end_span(&self, span: trace::SpanContext, rec: &RequestRecord<'_>) {
        self.trace.end(span, rec);
    }
}

/// Whether requests between pods of these namespaces are access-logged.
pub fn access_log_wanted(model: &crate::discovery::Model, namespaces: &[&str]) -> bool {
    namespaces.iter().any(|ns| {
        model.namespace(ns).is_some_and(|n| n.annotations.get(ACCESS_LOG_ANNOTATION).is_some_and(|v| v == "enabled"))
    })
}

/// Shared by the data path.
pub type SharedTelemetry = Arc<Telemetry>;
