//! Distributed tracing at each proxy hop.
//!
//! Propagation: the incoming trace context is read from W3C `traceparent` (with `tracestate`
//! passed on untouched) or, failing that, B3 (`x-b3-traceid`, `x-b3-spanid`,
//! `x-b3-parentspanid`, `x-b3-sampled`, `x-b3-flags`, or the single `b3` header). sluice makes
//! a span for its hop, a child of the incoming one, and rewrites the headers so the next hop
//! (the destination's sluice, then the application) is a child of sluice's span: `traceparent`
//! always, and the B3 headers when the request came with B3. A request without any context
//! starts a new trace. `x-request-id` is created when missing (the first proxy does it).
//!
//! Sampling: an incoming sampled flag is honoured (both ways); a new trace is sampled with
//! probability `--trace-sampling`. Unsampled requests cost a few header operations.
//!
//! Export: finished spans go to a bounded queue and from there, in batches, to an OTLP/gRPC
//! collector through `opentelemetry-otlp`'s exporter, on the data runtime but off the request
//! path; spans that do not fit the queue are dropped and counted.

use std::{
    borrow::Cow,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    trace::{SpanContext as OtelSpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Reporter, RequestRecord, TelemetryConfig};

// The propagation headers, parsed once (a `&str` key is parsed and checked on every lookup).
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
/// Spans per export call.
const BATCH: usize = 512;
/// Longest a finished span waits before it is exported.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// The trace context of one proxy hop while its request is in flight.
///
/// Built on every proxied request, so it holds no text made for it: the trace id stays a
/// number (its hex form, for access logs and tap, is made only when asked for), and the
/// request id is the header value itself (shared with the request, not copied).
#[derive(Debug, Default)]
pub struct SpanContext {
    trace_id: Option<u128>,
    request_id: Option<HeaderValue>,
    /// The span to export when the request ends (sampled traces only).
    pending: Option<Pending>,
}

impl SpanContext {
    /// The trace id as 32 hex digits (access logs, tap).
    pub fn trace_id_hex(&self) -> Option<TraceHex> {
        self.trace_id.map(TraceHex::new)
    }

    /// The span to end and export, taken out (so the ids can still be read while it is
    /// ended); an empty context when the trace is not sampled.
    pub fn take_export(&mut self) -> SpanContext {
        SpanContext { pending: self.pending.take(), ..SpanContext::default() }
    }

    /// `x-request-id` of the request.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_ref().and_then(|v| v.to_str().ok())
    }
}

/// A trace id as 32 lowercase hex digits, on the stack.
#[derive(Clone, Copy)]
pub struct TraceHex([u8; 32]);

impl TraceHex {
    fn new(id: u128) -> TraceHex {
        let mut b = [0u8; 32];
        hex_into(&mut b, id);
        TraceHex(b)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Writes the low `out.len()` hex digits of `v` (lowercase, zero-padded) into `out`: the
/// formatting machinery of `format!` costs several hundred instructions per id, and ids are
/// written on every request.
fn hex_into(out: &mut [u8], v: u128) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = v;
    for b in out.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[derive(Debug, Clone)]
struct Pending {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    kind: SpanKind,
}

/// What a request carried.
#[derive(Debug, PartialEq, Eq)]
struct Incoming {
    trace_id: u128,
    parent: Option<u64>,
    /// `None`: the request did not say (B3 may defer the decision).
    sampled: Option<bool>,
    b3: bool,
}

pub struct Tracer {
    sampling: f64,
    queue: Option<mpsc::Sender<SpanData>>,
    pub dropped: AtomicU64,
    pub exported: std::sync::Arc<AtomicU64>,
    node: String,
}

impl Tracer {
    /// Starts the exporter task when an OTLP endpoint is configured (call inside the data
    /// runtime).
    pub fn new(cfg: &TelemetryConfig) -> Tracer {
        let exported = std::sync::Arc::new(AtomicU64::new(0));
        let queue = cfg.otlp_endpoint.as_ref().and_then(|endpoint| {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(5))
                .build();
            match (exporter, tokio::runtime::Handle::try_current()) {
                (Ok(mut exporter), Ok(rt)) => {
                    exporter.set_resource(
                        &opentelemetry_sdk::Resource::builder_empty()
                            .with_attributes([
                                KeyValue::new("service.name", "sluice"),
                                KeyValue::new("k8s.node.name", cfg.node.clone()),
                            ])
                            .build(),
                    );
                    let (tx, rx) = mpsc::channel(QUEUE);
                    rt.spawn(export_loop(exporter, rx, exported.clone()));
                    Some(tx)
                }
                (Err(e), _) => {
                    warn!(%endpoint, error = %e, "cannot create the OTLP exporter; spans are not exported");
                    None
                }
                (_, Err(_)) => None,
            }
        });
        Tracer {
            sampling: cfg.trace_sampling,
            queue,
            dropped: AtomicU64::new(0),
            exported,
            node: cfg.node.clone(),
        }
    }

    /// See [`super::Telemetry::start_span`].
    pub fn start(&self, reporter: Reporter, headers: &mut HeaderMap) -> SpanContext {
        // An id that is not text is replaced, as a missing one is made.
        let request_id = match headers.get(X_REQUEST_ID).filter(|v| v.to_str().is_ok()) {
            Some(id) => id.clone(),
            None => {
                let id = uuid_v4();
                headers.insert(X_REQUEST_ID, id.clone());
                id
            }
        };
        let incoming = read_context(headers);
        let trace_id = incoming.as_ref().map_or_else(|| fastrand::u128(1..), |c| c.trace_id);
        let sampled = match incoming.as_ref().and_then(|c| c.sampled) {
            Some(s) => s,
            None => self.queue.is_some() && fastrand::f64() < self.sampling,
        };
        let span_id = fastrand::u64(1..);
        write_context(headers, trace_id, span_id, incoming.as_ref().and_then(|c| c.parent), sampled, incoming.as_ref().is_some_and(|c| c.b3));
        let pending = (sampled && self.queue.is_some()).then(|| Pending {
            trace_id: TraceId::from_bytes(trace_id.to_be_bytes()),
            span_id: SpanId::from_bytes(span_id.to_be_bytes()),
            parent: incoming.and_then(|c| c.parent).map(|p| SpanId::from_bytes(p.to_be_bytes())),
            kind: match reporter {
                Reporter::Source => SpanKind::Client,
                Reporter::Destination => SpanKind::Server,
            },
        });
        SpanContext { trace_id: Some(trace_id), request_id: Some(request_id), pending }
    }

    /// Ends the span (if sampled) with what the request became, and queues it for export.
    pub fn end(&self, span: SpanContext, rec: &RequestRecord<'_>) {
        let Some(p) = span.pending else { return };
        let Some(queue) = &self.queue else { return };
        let mut attributes = vec![
            KeyValue::new("http.request.method", rec.method.as_str().to_owned()),
            KeyValue::new("url.path", rec.path.to_owned()),
            KeyValue::new("server.address", rec.authority.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(rec.status)),
            KeyValue::new("network.protocol.name", rec.protocol),
            KeyValue::new("istio.reporter", rec.reporter.as_str()),
            KeyValue::new("response_flags", rec.response_flags.to_owned()),
            KeyValue::new("node_id", self.node.clone()),
            KeyValue::new("mtls", rec.mtls),
        ];
        if let Some(req_id) = rec.request_id {
            attributes.push(KeyValue::new("guid:x-request-id", req_id.to_owned()));
        }
        if let Some(g) = rec.grpc_status {
            attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(g)));
        }
        if let Some(up) = rec.upstream {
            attributes.push(KeyValue::new("upstream_address", up.to_string()));
        }
        for (key, peer) in [("source", &rec.source), ("destination", &rec.destination)] {
            if let Some(w) = peer.workload {
                attributes.push(KeyValue::new(format!("{key}.workload"), w.workload.to_string()));
                attributes.push(KeyValue::new(format!("{key}.namespace"), w.namespace.to_string()));
            }
            if let Some(p) = peer.principal {
                attributes.push(KeyValue::new(format!("{key}.principal"), p.to_owned()));
            }
        }
        if let Some(s) = rec.service {
            attributes.push(KeyValue::new("destination.service", format!("{}.{}.svc.cluster.local", s.name, s.namespace)));
        }
        let failed = rec.status >= 500 || rec.status == 0 || rec.grpc_status.is_some_and(|g| g != 0);
        let data = SpanData {
            span_context: OtelSpanContext::new(p.trace_id, p.span_id, TraceFlags::SAMPLED, false, TraceState::default()),
            parent_span_id: p.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: p.parent.is_some(),
            span_kind: p.kind,
            name: Cow::Owned(format!("{} {}", rec.method, rec.path.split('?').next().unwrap_or(rec.path))),
            start_time: rec.start,
            end_time: rec.start + rec.duration,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if failed { Status::error(rec.response_flags.to_owned()) } else { Status::Unset },
            instrumentation_scope: InstrumentationScope::builder("sluice").build(),
        };
        if queue.try_send(data).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn export_loop(exporter: opentelemetry_otlp::SpanExporter, mut rx: mpsc::Receiver<SpanData>, exported: std::sync::Arc<AtomicU64>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => {
                        batch.push(s);
                        if batch.len() >= BATCH {
                            break;
                        }
                    }
                    None => {
                        if !batch.is_empty() {
                            let _ = exporter.export(std::mem::take(&mut batch)).await;
                        }
                        return;
                    }
                },
                _ = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        match exporter.export(std::mem::take(&mut batch)).await {
            Ok(()) => {
                exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => debug!(error = %e, spans = n, "OTLP export failed; spans dropped"),
        }
    }
}

/// W3C trace context first, then B3. A request that carries B3 headers gets them rewritten
/// even when its context came from `traceparent` (as after a first sluice hop, which writes
/// both), so the application sees consistent ids in whichever format it reads.
fn read_context(headers: &HeaderMap) -> Option<Incoming> {
    let has_b3 = headers.contains_key(X_B3_TRACEID) || headers.contains_key(B3);
    if let Some(tp) = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
        if let Some(mut c) = parse_traceparent(tp) {
            c.b3 = has_b3;
            return Some(c);
        }
    }
    if !has_b3 {
        // Neither B3 form is there: nothing more to read.
        return None;
    }
    if let Some(b3) = headers.get(B3).and_then(|v| v.to_str().ok()) {
        if let Some(c) = parse_b3_single(b3) {
            return Some(c);
        }
    }
    let get = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let trace_id = get(X_B3_TRACEID).and_then(parse_trace_id)?;
    let parent = get(X_B3_SPANID).and_then(|s| u64::from_str_radix(s, 16).ok()).filter(|s| *s != 0);
    let sampled = if get(X_B3_FLAGS) == Some("1") {
        Some(true)
    } else {
        get(X_B3_SAMPLED).and_then(|s| match s {
            "1" | "true" | "d" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        })
    };
    Some(Incoming { trace_id, parent, sampled, b3: true })
}

/// `version-traceid-parentid-flags` (version 00; later versions are read the same way).
fn parse_traceparent(v: &str) -> Option<Incoming> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let parent = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Incoming { trace_id, parent: Some(parent), sampled: Some(flags & 1 == 1), b3: false })
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]` or just `b3: 0` (deny).
fn parse_b3_single(v: &str) -> Option<Incoming> {
    let mut parts = v.trim().split('-');
    let trace_id = parse_trace_id(parts.next()?)?;
    let parent = u64::from_str_radix(parts.next()?, 16).ok().filter(|s| *s != 0)?;
    let sampled = match parts.next() {
        Some("1") | Some("d") => Some(true),
        Some("0") => Some(false),
        _ => None,
    };
    Some(Incoming { trace_id, parent: Some(parent), sampled, b3: true })
}

/// B3 trace ids are 64 or 128 bits.
fn parse_trace_id(s: &str) -> Option<u128> {
    if s.len() != 16 && s.len() != 32 {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|t| *t != 0)
}

/// Makes the next hop a child of `span_id`.
fn write_context(headers: &mut HeaderMap, trace_id: u128, span_id: u64, parent: Option<u64>, sampled: bool, b3: bool) {
    // `00-{trace:32}-{span:16}-{flags:2}`
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut tp[3..35], trace_id);
    hex_into(&mut tp[36..52], u128::from(span_id));
    hex_into(&mut tp[53..55], u128::from(u8::from(sampled)));
    headers.insert(TRACEPARENT, hex_value(&tp));
    if b3 {
        headers.remove(B3);
        let mut t = [0u8; 32];
        hex_into(&mut t, trace_id);
        headers.insert(X_B3_TRACEID, hex_value(&t));
        let mut sp = [0u8; 16];
        hex_into(&mut sp, u128::from(span_id));
        headers.insert(X_B3_SPANID, hex_value(&sp));
        match parent {
            Some(p) => {
                hex_into(&mut sp, u128::from(p));
                headers.insert(X_B3_PARENTSPANID, hex_value(&sp));
            }
            None => {
                headers.remove(X_B3_PARENTSPANID);
            }
        }
        headers.insert(X_B3_SAMPLED, HeaderValue::from_static(if sampled { "1" } else { "0" }));
        headers.remove(X_B3_FLAGS);
    }
}

/// A header value of hex digits and dashes (always valid).
fn hex_value(b: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(b).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A random (version 4) UUID, as a header value.
fn uuid_v4() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[usize::from(x >> 4)];
        out[o + 1] = HEX[usize::from(x & 0xf)];
        o += 2;
    }
    hex_value(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TelemetryConfig {
        TelemetryConfig { trace_sampling: 1.0, ..Default::default() }
    }

    #[test]
    fn traceparent_is_continued_with_a_new_parent() {
        let t = Tracer::new(&cfg());
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        h.insert("tracestate", "vendor=x".parse().unwrap());
        let span = t.start(Reporter::Source, &mut h);
        assert_eq!(span.trace_id_hex().unwrap().as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp = h["traceparent"].to_str().unwrap();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"), "{tp}");
        assert!(!tp.contains("00f067aa0ba902b7"), "the next hop's parent is sluice's span: {tp}");
        assert_eq!(h["tracestate"], "vendor=x");
        assert_eq!(h["x-request-id"].to_str().unwrap().len(), 36);
        assert!(h.get("x-b3-traceid").is_none());
    }

    #[test]
    fn b3_headers_are_continued_and_the_sampling_decision_kept() {
        let t = Tracer::new(&cfg());
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7".parse().unwrap());
        h.insert("x-b3-spanid", "e457b5a2e4d86bd1".parse().unwrap());
        h.insert("x-b3-sampled", "0".parse().unwrap());
        h.insert("x-request-id", "keep-me".parse().unwrap());
        let span = t.start(Reporter::Destination, &mut h);
        assert_eq!(span.trace_id_hex().unwrap().as_str(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(h["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(h["x-b3-parentspanid"], "e457b5a2e4d86bd1");
        assert_ne!(h["x-b3-spanid"], "e457b5a2e4d86bd1");
        assert_eq!(h["x-b3-sampled"], "0");
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
        assert_eq!(h["x-request-id"], "keep-me");
        // 64-bit B3 trace ids widen to 128 bits.
        assert_eq!(parse_trace_id("a3ce929d0e0e4736"), Some(0xa3ce929d0e0e4736));
        assert_eq!(parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1").unwrap().sampled, Some(true));
    }

    #[test]
    fn malformed_contexts_start_a_new_trace() {
        assert!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none());
        assert!(parse_traceparent("garbage").is_none());
        let t = Tracer::new(&cfg());
        let mut h = HeaderMap::new();
        h.insert("traceparent", "garbage".parse().unwrap());
        let span = t.start(Reporter::Source, &mut h);
        let trace = span.trace_id_hex().unwrap();
        assert_eq!(trace.as_str().len(), 32);
        assert!(h["traceparent"].to_str().unwrap().starts_with(&format!("00-{}-", trace.as_str())));
    }

    #[test]
    fn uuids_look_like_v4() {
        let u = uuid_v4();
        let u = u.to_str().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
