//! The CA service's metrics and readiness, on `--metrics-addr` (`0.0.0.0:15014`, istiod's
//! monitoring port): `GET /metrics` (OpenMetrics text) and `GET /healthz/ready` (200 once the
//! pod watch has its first complete list, 503 before: the Deployment's readinessProbe, so that
//! the Service sends nodes only to replicas that can decide).
//!
//! Counted as requests happen: certificates issued, refusals by reason (every reason of
//! [`Refusal::label`], shown from zero), request latency by outcome, and what happens below
//! the requests: connections refused at their caps, handshakes that failed or timed out,
//! connections closed idle or old, requests for methods the CA does not serve. Read at scrape
//! time: open connections and requests, the pods indexed, nodes rate-tracked, the token-review
//! cache and its limits, the signing chain's and the serving certificate's expiry, the
//! position of the signer's root in the bundle, reloads.
//!
//! This server is reachable by whatever can reach the pod (the kubelet's probes, Prometheus),
//! so it is bounded too: at most [`MAX_METRICS_CONNECTIONS`] at once (more are closed at
//! accept), request headers within [`METRICS_HEADER_TIMEOUT`], a connection within 30 s.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::admission::Admission;
use super::refusal::{Refusal, ALL_LABELS};
use crate::admin::metrics_server::{CONTENT_TYPE, METRICS_PATH};

pub const READY_PATH: &str = "/healthz/ready";
/// Connections the metrics server serves at once (probes and scrapers need a few).
pub const MAX_METRICS_CONNECTIONS: usize = 32;
/// A metrics client must have sent its request headers within this.
pub const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

type Label = [(&'static str, &'static str); 1];

fn new_histogram() -> Histogram {
    // 1 ms to ~16 s: a signature is ~1 ms, a TokenReview tens of ms, its timeout 5 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// What the request path records.
pub struct CaMetrics {
    issued: Counter,
    refused: Family<Label, Counter>,
    duration: Family<Label, Histogram, fn() -> Histogram>,
    connections_refused: Family<Label, Counter>,
    handshake_failures: Family<Label, Counter>,
    connections_closed: Family<Label, Counter>,
    unknown_methods: Counter,
    /// The gRPC server's connections and streams, once it serves.
    admission: Mutex<Option<Arc<Admission>>>,
}

impl Default for CaMetrics {
    fn default() -> Self {
        let metrics = CaMetrics {
            issued: Counter::default(),
            refused: Family::default(),
            duration: Family::new_with_constructor(new_histogram),
            connections_refused: Family::default(),
            handshake_failures: Family::default(),
            connections_closed: Family::default(),
            unknown_methods: Counter::default(),
            admission: Mutex::default(),
        };
        for reason in ALL_LABELS {
            let _ = metrics.refused.get_or_create(&[("reason", reason)]);
        }
        for reason in ["limit", "source_limit"] {
            let _ = metrics.connections_refused.get_or_create(&[("reason", reason)]);
        }
        for reason in ["tls", "preface", "timeout"] {
            let _ = metrics.handshake_failures.get_or_create(&[("reason", reason)]);
        }
        for reason in ["idle", "max_age"] {
            let _ = metrics.connections_closed.get_or_create(&[("reason", reason)]);
        }
        metrics
    }
}

impl CaMetrics {
    pub fn issued(&self, took: Duration) {
        self.issued.inc();
        self.duration.get_or_create(&[("outcome", "issued")]).observe(took.as_secs_f64());
    }

    pub fn refused(&self, refusal: &Refusal, took: Duration) {
        self.refused.get_or_create(&[("reason", refusal.label())]).inc();
        self.duration.get_or_create(&[("outcome", "refused")]).observe(took.as_secs_f64());
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn unknown_method(&self) {
        self.unknown_methods.inc();
    }

    pub fn set_admission(&self, admission: Arc<Admission>) {
        *self.admission.lock().unwrap_or_else(|e| e.into_inner()) = Some(admission);
    }

    fn admission(&self) -> Option<Arc<Admission>> {
        self.admission.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// gRPC connections open now (0 before the server runs).
    pub fn open_connections(&self) -> usize {
        self.admission().map_or(0, |a| a.open_connections())
    }

    /// Request streams being handled now.
    pub fn open_streams(&self) -> usize {
        self.admission().map_or(0, |a| a.open_streams())
    }

    pub fn issued_total(&self) -> u64 {
        self.issued.get()
    }

    pub fn connections_refused_total(&self, reason: &'static str) -> u64 {
        self.connections_refused.get_or_create(&[("reason", reason)]).get()
    }

    pub fn handshake_failures_total(&self, reason: &'static str) -> u64 {
        self.handshake_failures.get_or_create(&[("reason", reason)]).get()
    }

    pub fn connections_closed_total(&self, reason: &'static str) -> u64 {
        self.connections_closed.get_or_create(&[("reason", reason)]).get()
    }

    pub fn unknown_methods_total(&self) -> u64 {
        self.unknown_methods.get()
    }

    pub fn refused_total(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&[("reason", reason)]).get()
    }
}

/// Values read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub ready: bool,
    pub pods: usize,
    pub rate_tracked_nodes: usize,
    pub rate_table_evictions: u64,
    pub token_reviews: u64,
    pub token_review_cache_hits: u64,
    pub token_review_cache_entries: usize,
    pub token_reviews_uncached: u64,
    pub token_reviews_throttled: u64,
    pub review_sources: usize,
    pub signing_chain_not_after: i64,
    pub serving_cert_not_after: i64,
    pub signing_root_index: usize,
    pub reloads: u64,
    pub reload_failures: u64,
}

pub type GaugeSource = Arc<dyn Fn() -> Gauges + Send + Sync>;

struct Counts {
    metrics: Arc<CaMetrics>,
}

impl fmt::Debug for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaCounts")
    }
}

impl Collector for Counts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let e = encoder.encode_descriptor(
            "sluice_ca_certificates_issued",
            "Workload certificates issued.",
            None,
            MetricType::Counter,
        )?;
        m.issued.encode(e)?;
        let e = encoder.encode_descriptor(
            "sluice_ca_requests_refused",
            "Certificate requests refused, by reason (rate_limited: over the caller node's rate).",
            None,
            MetricType::Counter,
        )?;
        m.refused.encode(e)?;
        let e = encoder.encode_descriptor(
            "sluice_ca_request_duration_seconds",
            "Time to answer a certificate request, by outcome (issued or refused).",
            None,
            MetricType::Histogram,
        )?;
        m.duration.encode(e)?;
        let e = encoder.encode_descriptor(
            "sluice_ca_connections_refused",
            "Connections closed at accept: limit (all connections taken) or source_limit (the source's share).",
            None,
            MetricType::Counter,
        )?;
        m.connections_refused.encode(e)?;
        let e = encoder.encode_descriptor(
            "sluice_ca_handshake_failures",
            "Connections closed before their first request: tls (handshake failed), preface (not HTTP/2), \
             timeout (neither within 10 s).",
            None,
            MetricType::Counter,
        )?;
        m.handshake_failures.encode(e)?;
        let e = encoder.encode_descriptor(
            "sluice_ca_connections_closed",
            "Connections the CA closed (GOAWAY): idle (no stream for 120 s) or max_age (30 min).",
            None,
            MetricType::Counter,
        )?;
        m.connections_closed.encode(e)?;
        let e = encoder.encode_descriptor(
            "sluice_ca_unknown_method_requests",
            "Requests for a method other than CreateCertificate (answered UNIMPLEMENTED).",
            None,
            MetricType::Counter,
        )?;
        m.unknown_methods.encode(e)?;
        let admission = m.admission();
        let (conns, streams, sources) =
            admission.map_or((0, 0, 0), |a| (a.open_connections(), a.open_streams(), a.sources_tracked()));
        gauge(&mut encoder, "sluice_ca_connections", "gRPC connections open now.", conns as i64)?;
        gauge(&mut encoder, "sluice_ca_requests_in_progress", "Requests being handled now.", streams as i64)?;
        gauge(
            &mut encoder,
            "sluice_ca_connection_sources",
            "Source addresses with a connection open now.",
            sources as i64,
        )
    }
}

struct State(GaugeSource);

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaState")
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, u64>(&value, None)
}

impl Collector for State {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let g = (self.0)();
        gauge(
            &mut e,
            "sluice_ca_ready",
            "1 once the pod watch has its first complete list.",
            g.ready as i64,
        )?;
        gauge(&mut e, "sluice_ca_pods", "Pods in the CA's index (every pod of the cluster).", g.pods as i64)?;
        gauge(
            &mut e,
            "sluice_ca_rate_limited_nodes",
            "Nodes with a rate bucket now.",
            g.rate_tracked_nodes as i64,
        )?;
        counter(
            &mut e,
            "sluice_ca_rate_table_evictions",
            "Rate buckets dropped before they refilled because the node table was full.",
            g.rate_table_evictions,
        )?;
        counter(&mut e, "sluice_ca_token_reviews", "TokenReviews sent to the API server.", g.token_reviews)?;
        counter(
            &mut e,
            "sluice_ca_token_review_cache_hits",
            "Requests answered from a cached TokenReview.",
            g.token_review_cache_hits,
        )?;
        counter(
            &mut e,
            "sluice_ca_token_reviews_uncached",
            "TokenReviews not cached because the cache was full.",
            g.token_reviews_uncached,
        )?;
        counter(
            &mut e,
            "sluice_ca_token_reviews_throttled",
            "TokenReviews not made because the source or the CA was over its review rate.",
            g.token_reviews_throttled,
        )?;
        gauge(
            &mut e,
            "sluice_ca_token_review_sources",
            "Source addresses with a TokenReview rate bucket now.",
            g.review_sources as i64,
        )?;
        gauge(
            &mut e,
            "sluice_ca_token_review_cache_entries",
            "TokenReviews cached now.",
            g.token_review_cache_entries as i64,
        )?;
        gauge(
            &mut e,
            "sluice_ca_signing_chain_expiry_timestamp_seconds",
            "When the first certificate of the signing chain (signing certificate, --chain, root) expires.",
            g.signing_chain_not_after,
        )?;
        gauge(
            &mut e,
            "sluice_ca_serving_cert_expiry_timestamp_seconds",
            "When the CA's own serving certificate expires (renewed at half-life).",
            g.serving_cert_not_after,
        )?;
        gauge(
            &mut e,
            "sluice_ca_signing_root_index",
            "Position in the trust bundle of the root the CA signs under (0 = first, as it should be).",
            g.signing_root_index as i64,
        )?;
        counter(&mut e, "sluice_ca_signing_reloads", "Signing files reloaded after a change.", g.reloads)?;
        counter(
            &mut e,
            "sluice_ca_signing_reload_failures",
            "Checks that found changed signing files that were refused (the previous ones stay).",
            g.reload_failures,
        )
    }
}

/// Whether the CA is ready, and if not, why (for `/healthz/ready`).
pub type ReadySource = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Everything a scrape encodes.
pub struct Scrape {
    registry: Registry,
    ready: ReadySource,
}

impl Scrape {
    pub fn new(metrics: Arc<CaMetrics>, gauges: GaugeSource, ready: ReadySource) -> Scrape {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Counts { metrics }));
        registry.register_collector(Box::new(State(gauges)));
        Scrape { registry, ready }
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "encoding the CA's metrics failed");
        }
        out
    }
}

/// Serves `/metrics` and `/healthz/ready` on `listener`, forever, at most `max_connections`
/// at once.
pub async fn serve(listener: TcpListener, scrape: Arc<Scrape>, max_connections: usize) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(suppressed) =
                crate::lograte::shared().allow("ca-metrics-refused", &crate::lograte::source_of_ip(peer.ip()))
            {
                warn!(%peer, limit = max_connections, suppressed, "metrics connection refused: too many connections");
            }
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: Request<Incoming>| {
                let scrape = scrape.clone();
                async move { Ok::<_, Infallible>(answer(&scrape, req.method(), req.uri().path())) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            // A scraper that connects and stalls holds its socket no longer than this.
            match tokio::time::timeout(Duration::from_secs(30), conn).await {
                Ok(Err(e)) => debug!(error = %e, "metrics connection ended with an error"),
                Err(_) => debug!("metrics connection timed out"),
                Ok(Ok(())) => {}
            }
        });
    }
}

pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn answer(scrape: &Scrape, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&Method::GET, METRICS_PATH) => (StatusCode::OK, CONTENT_TYPE, scrape.render()),
        (&Method::GET, READY_PATH) => match (scrape.ready)() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        (_, METRICS_PATH | READY_PATH) => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into()),
        (_, other) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such endpoint {other}; try {METRICS_PATH} or {READY_PATH}\n"),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn every_reason_shows_from_zero_and_counts() {
        let metrics = Arc::new(CaMetrics::default());
        let ready = Arc::new(AtomicBool::new(false));
        let scrape = Scrape::new(
            metrics.clone(),
            Arc::new(|| Gauges { pods: 3, ..Gauges::default() }),
            Arc::new({
                let ready = ready.clone();
                move || {
                    if ready.load(Ordering::SeqCst) {
                        Ok(())
                    } else {
                        Err("the pod watch has not synced".into())
                    }
                }
            }),
        );
        let text = scrape.render();
        for reason in ALL_LABELS {
            assert!(
                text.contains(&format!("sluice_ca_requests_refused_total{{reason=\"{reason}\"}} 0")),
                "{reason}"
            );
        }
        assert!(text.contains("sluice_ca_pods 3"), "{text}");
        metrics.refused(&Refusal::NotReady, Duration::from_millis(1));
        metrics.issued(Duration::from_millis(2));
        let text = scrape.render();
        assert!(text.contains("sluice_ca_requests_refused_total{reason=\"not_ready\"} 1"));
        assert!(text.contains("sluice_ca_certificates_issued_total 1"));
        assert!(text.contains("sluice_ca_request_duration_seconds_count{outcome=\"issued\"} 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));

        assert_eq!(answer(&scrape, &Method::GET, READY_PATH).status(), StatusCode::SERVICE_UNAVAILABLE);
        ready.store(true, Ordering::SeqCst);
        assert_eq!(answer(&scrape, &Method::GET, READY_PATH).status(), StatusCode::OK);
        assert_eq!(answer(&scrape, &Method::GET, "/x").status(), StatusCode::NOT_FOUND);
        assert_eq!(answer(&scrape, &Method::POST, METRICS_PATH).status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_metrics_server_serves_a_bounded_number_of_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let scrape = Arc::new(Scrape::new(
            Arc::new(CaMetrics::default()),
            Arc::new(Gauges::default),
            Arc::new(|| Ok(())),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, scrape, 1));
        let within = Duration::from_secs(10);
        // A client that connects and says nothing holds the one slot...
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        first.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: ca\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(within, first.read(&mut buf)).await.unwrap().unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        // ...so the next is closed at accept (read: end of stream, no answer)...
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let n = tokio::time::timeout(within, second.read(&mut buf)).await.expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // ...until the first one leaves.
        drop(first);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n").await.unwrap();
            let mut got = Vec::new();
            let _ = tokio::time::timeout(within, c.read_to_end(&mut got)).await;
            if got.starts_with(b"HTTP/1.1 200") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the slot was never freed");
            tokio::task::yield_now().await;
        }
    }
}
