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
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use http::{HeaderMap, HeaderValue};
use opentelemetry::{
    trace::{SpanContext as OtelSpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Reporter, RequestRecord, TelemetryConfig};

/// Spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;
/// Spans per export call.
const BATCH: usize = 512;
/// Longest a finished span waits before it is exported.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// The trace context of one proxy hop while its request is in flight.
#[derive(Debug, Default)]
pub struct SpanContext {
    /// The trace id (32 hex digits), for access logs and tap.
    pub trace_id: Option<String>,
    /// `x-request-id` of the request.
    pub request_id: Option<String>,
    /// The span to export when the request ends (sampled traces only).
    pending: Mutex<Option<Pending>>,
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
        let request_id = match headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
            Some(id) => id.to_owned(),
            None => {
                let id = uuid_v4();
                if let Ok(v) = HeaderValue::from_str(&id) {
                    headers.insert("x-request-id", v);
                }
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
        let trace_hex = format!("{trace_id:032x}");
        let pending = (sampled && self.queue.is_some()).then(|| Pending {
            trace_id: TraceId::from_bytes(trace_id.to_be_bytes()),
            span_id: SpanId::from_bytes(span_id.to_be_bytes()),
            parent: incoming.and_then(|c| c.parent).map(|p| SpanId::from_bytes(p.to_be_bytes())),
            kind: match reporter {
                Reporter::Source => SpanKind::Client,
                Reporter::Destination => SpanKind::Server,
            },
        });
        SpanContext { trace_id: Some(trace_hex), request_id: Some(request_id), pending: Mutex::new(pending) }
    }

    /// Ends the span (if sampled) with what the request became, and queues it for export.
    pub fn end(&self, span: &SpanContext, rec: &RequestRecord<'_>) {
        let Some(p) = span.pending.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
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
    let has_b3 = headers.contains_key("x-b3-traceid") || headers.contains_key("b3");
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        if let Some(mut c) = parse_traceparent(tp) {
            c.b3 = has_b3;
            return Some(c);
        }
    }
    if let Some(b3) = headers.get("b3").and_then(|v| v.to_str().ok()) {
        if let Some(c) = parse_b3_single(b3) {
            return Some(c);
        }
    }
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let trace_id = get("x-b3-traceid").and_then(parse_trace_id)?;
    let parent = get("x-b3-spanid").and_then(|s| u64::from_str_radix(s, 16).ok()).filter(|s| *s != 0);
    let sampled = if get("x-b3-flags") == Some("1") {
        Some(true)
    } else {
        get("x-b3-sampled").and_then(|s| match s {
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
    let mut tp = String::with_capacity(55);
    let _ = write!(tp, "00-{trace_id:032x}-{span_id:016x}-{:02x}", u8::from(sampled));
    if let Ok(v) = HeaderValue::from_str(&tp) {
        headers.insert("traceparent", v);
    }
    if b3 {
        headers.remove("b3");
        let set = |h: &mut HeaderMap, k: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        set(headers, "x-b3-traceid", format!("{trace_id:032x}"));
        set(headers, "x-b3-spanid", format!("{span_id:016x}"));
        match parent {
            Some(p) => set(headers, "x-b3-parentspanid", format!("{p:016x}")),
            None => {
                headers.remove("x-b3-parentspanid");
            }
        }
        set(headers, "x-b3-sampled", if sampled { "1".into() } else { "0".into() });
        headers.remove("x-b3-flags");
    }
}

/// A random (version 4) UUID.
fn uuid_v4() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(x >> 4)] as char);
        out.push(HEX[usize::from(x & 0xf)] as char);
    }
    out
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
        assert_eq!(span.trace_id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
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
        assert_eq!(span.trace_id.as_deref(), Some("80f198ee56343ba864fe8b2a57d3eff7"));
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
        assert_eq!(span.trace_id.as_ref().unwrap().len(), 32);
        assert!(h["traceparent"].to_str().unwrap().starts_with(&format!("00-{}-", span.trace_id.unwrap())));
    }

    #[test]
    fn uuids_look_like_v4() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
