//! Metrics for Prometheus: `GET /metrics` on `--metrics-addr` (`0.0.0.0:15020`, Istio's
//! metrics port) in the node's network namespace, OpenMetrics text. It serves Istio's standard
//! metrics ([`crate::telemetry::metrics`], recorded by the data path) and sluice's own
//! (`sluice_*`), which are read at scrape time from what the node already keeps: kernel
//! counters, enrolled pods, eBPF map occupancy, certificates, upstream pools, the admin
//! counters. It runs on a thread of its own (and that thread's blocking pool, where the text
//! is encoded, one scrape at a time) at the `SCHED_IDLE` CPU priority: a scrape uses only CPU
//! time that nothing else on the node wants, so it never delays a request in the data path nor
//! the heartbeat on the admin thread (the benchmark's `scrape` section measures this), and it
//! takes the series lists' read locks only long enough to copy them. On a saturated node a
//! scrape is therefore slower, never the requests.
//!
//! Upgrades: as the readiness endpoint (see `health.rs`), both processes bind the port with
//! `SO_REUSEPORT` while they overlap, and the old one closes its listener as soon as a newer
//! process has taken over the node, and in any case when it starts draining: from then on
//! Prometheus scrapes the newest process (its counters restart from zero, which `rate()`
//! treats as a counter reset).

use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{atomic::Ordering, Arc, Mutex, PoisonError},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body::{Body, Frame, SizeHint};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info, warn};

use super::{
    listener_limits::{self, Gate},
    server::AdminState,
};

/// The scrape path.
pub const METRICS_PATH: &str = "/metrics";
/// OpenMetrics 1.0 text, what Prometheus asks for first.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How often the listener checks whether a newer sluice process took over the node.
const SUCCESSOR_CHECK_EVERY: Duration = Duration::from_millis(250);

/// The eBPF maps whose occupancy is reported (all hashes; the arrays are always full).
const MAPS: [&str; 5] = [
    sluice_common::names::MAP_ENROLLED,
    sluice_common::names::MAP_ORIG_BY_COOKIE,
    sluice_common::names::MAP_ORIG_BY_TUPLE,
    sluice_common::names::MAP_INBOUND,
    sluice_common::names::MAP_DELIVERING,
];

/// Binds `addr` with `SO_REUSEPORT` (an upgraded sluice binds it while this one still runs).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating the metrics socket")?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    socket.listen(128).with_context(|| format!("listening on {addr}"))?;
    Ok(socket.into())
}

/// Everything a scrape encodes: Istio's metrics and sluice's own.
pub struct Scrape {
    registry: Registry,
    /// One scrape at a time: a large scrape's text is built in memory.
    gate: tokio::sync::Semaphore,
}

impl Scrape {
    fn with(registry: Registry) -> Scrape {
        Scrape { registry, gate: tokio::sync::Semaphore::new(1) }
    }

    /// `bpffs` and `node` locate the node's pinned maps.
    pub fn new(admin: Arc<AdminState>, bpffs: &Path, node: &str) -> Scrape {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(IstioMetrics(admin.clone())));
        let maps_dir = crate::redirect::pin_dir(bpffs, node)
            .join(format!("maps-v{}", sluice_common::MAP_LAYOUT_VERSION));
        registry.register_collector(Box::new(SluiceMetrics { admin, maps: BpfMaps::new(maps_dir) }));
        Scrape::with(registry)
    }

    /// The OpenMetrics text of one scrape.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(64 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a collector's own error can get here; the text so far is still useful.
            warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Starts the metrics thread (see the module's comment) serving `listener`.
pub fn start_thread(
    listener: std::net::TcpListener,
    scrape: Arc<Scrape>,
    superseded: Arc<dyn Fn() -> bool + Send + Sync>,
    closed: watch::Receiver<Option<&'static str>>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("sluice-metrics".into()).spawn(move || {
        // Before the runtime starts any blocking-pool thread: those inherit the policy.
        if let Err(e) = idle_cpu_priority() {
            warn!(error = %e, "cannot lower the metrics thread to SCHED_IDLE; scrapes compete with the data path for CPU");
        }
        rt.block_on(serve(listener, scrape, superseded, closed));
    })?;
    Ok(())
}

/// Puts the calling thread in the `SCHED_IDLE` class (no privilege needed to lower a thread's
/// own priority).
fn idle_cpu_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param we own.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Serves `GET /metrics` on `listener` until `closed` says so (the daemon closes readiness when
/// it starts draining; metrics follow), the sender is dropped, or `superseded()` turns true (a
/// newer sluice process took over the node); then closes the listener.
pub async fn serve(
    listener: std::net::TcpListener,
    scrape: Arc<Scrape>,
    superseded: Arc<dyn Fn() -> bool + Send + Sync>,
    mut closed: watch::Receiver<Option<&'static str>>,
) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "metrics endpoint not served");
            return;
        }
    };
    // Any pod can reach this port: bounded connections, per source too, with deadlines.
    let gate = Gate::new(listener_limits::METRICS, &listener_limits::COUNTERS.metrics);
    let mut check = tokio::time::interval(SUCCESSOR_CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let why = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => spawn_conn(stream, peer, &gate, scrape.clone()),
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            changed = closed.changed() => match changed {
                Ok(()) => match *closed.borrow() {
                    Some(why) => break why,
                    None => continue,
                },
                Err(_) => break "stopping",
            },
            _ = check.tick() => {
                if superseded() {
                    break "a newer sluice process took over the node";
                }
            }
        }
    };
    // Answer the scrapes already queued on this listener rather than resetting them.
    while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
        spawn_conn(stream, peer, &gate, scrape.clone());
    }
    drop(listener);
    info!(%addr, reason = why, "metrics listener closed; scrapes now reach the newest sluice of the node, if any");
}

fn spawn_conn(stream: tokio::net::TcpStream, peer: SocketAddr, gate: &Arc<Gate>, scrape: Arc<Scrape>) {
    let Some(ticket) = gate.admit(peer) else {
        debug!(%peer, "metrics connection refused: too many open");
        listener_limits::reset(stream);
        return;
    };
    let gate = gate.clone();
    let _ = stream.set_nodelay(true);
    tokio::spawn(async move {
        let svc = service_fn(move |req: Request<Incoming>| {
            let scrape = scrape.clone();
            async move {
                if req.method() != Method::GET || req.uri().path() != METRICS_PATH {
                    return Ok::<_, Infallible>(answer(req.method(), req.uri().path(), None));
                }
                // Encoding is synchronous and grows with the number of series: it runs on the
                // blocking pool, so that this thread keeps accepting and answering other paths.
                let _turn = scrape.gate.acquire().await;
                let text = {
                    let scrape = scrape.clone();
                    tokio::task::spawn_blocking(move || scrape.render()).await.ok()
                };
                Ok(answer(req.method(), req.uri().path(), text))
            }
        });
        let builder: http1::Builder = gate.http1();
        gate.serve(ticket, stream, |io| async move {
            let r = builder.serve_connection(TokioIo::new(io), svc).await;
            if let Err(e) = &r {
                debug!(error = %e, "metrics connection ended with an error");
            }
            r
        })
        .await;
    });
}

/// The largest piece of a response written in one system call.
///
/// The node's kernel may not preempt a task inside a system call (`PREEMPT_NONE`, common on
/// servers and VMs), and the scheduler prefers to wake data-path threads on a CPU that runs
/// only `SCHED_IDLE` work. A 180 KB body written in one `write()` (whose loopback or veth
/// delivery runs in the same call) would hold that CPU for tens of microseconds while a
/// woken data-path thread waits; in pieces, each call is short.
const WRITE_PIECE: usize = 16 * 1024;

/// A response body handed to hyper [`WRITE_PIECE`] bytes at a time, yielding to the runtime
/// between pieces so that hyper writes each one before asking for the next. Its exact size is
/// known, so the response still carries a `Content-Length`.
struct PiecewiseBody {
    rest: Bytes,
    /// Whether the next poll must yield first (set after each piece).
    yield_next: bool,
}

impl PiecewiseBody {
    fn new(body: Bytes) -> Self {
        PiecewiseBody { rest: body, yield_next: false }
    }
}

impl Body for PiecewiseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        if self.yield_next {
            // Pending with ourselves woken: hyper flushes what it holds, then polls again.
            self.yield_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = self.rest.len().min(WRITE_PIECE);
        let piece = self.rest.split_to(n);
        self.yield_next = true;
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// The response to one request; `text` is the scrape for `GET /metrics`.
fn answer(method: &Method, path: &str, text: Option<String>) -> Response<PiecewiseBody> {
    let (status, content_type, body) = match (method, path) {
        (&Method::GET, METRICS_PATH) => match text {
            Some(text) => (StatusCode::OK, CONTENT_TYPE, text),
            None => {
                (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding the metrics failed\n".to_string())
            }
        },
        (&Method::HEAD, METRICS_PATH) => (StatusCode::OK, CONTENT_TYPE, String::new()),
        (_, METRICS_PATH) => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".to_string()),
        (_, other) => {
            (StatusCode::NOT_FOUND, "text/plain", format!("no such endpoint {other}; try {METRICS_PATH}\n"))
        }
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-sluice-pid", std::process::id().to_string())
        .body(PiecewiseBody::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Istio's standard metrics, as the data path recorded them.
struct IstioMetrics(Arc<AdminState>);

impl fmt::Debug for IstioMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IstioMetrics")
    }
}

impl Collector for IstioMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.0.data.telemetry.metrics.encode_families(&mut encoder)
    }
}

/// sluice's own metrics, read at scrape time.
struct SluiceMetrics {
    admin: Arc<AdminState>,
    maps: BpfMaps,
}

impl fmt::Debug for SluiceMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SluiceMetrics")
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, u64>(&value, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> fmt::Result {
    encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)
}

/// A family with one label: `(label value, value)` rows.
fn labelled<
    V: prometheus_client::encoding::EncodeGaugeValue + prometheus_client::encoding::EncodeCounterValue,
>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    label: &str,
    rows: &[(&str, V)],
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (value_label, value) in rows {
        let labels = [(label, *value_label)];
        let mut m = family.encode_family(&labels)?;
        match metric_type {
            MetricType::Counter => m.encode_counter::<NoLabelSet, V, u64>(value, None)?,
            _ => m.encode_gauge(value)?,
        }
    }
    Ok(())
}

impl Collector for SluiceMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let admin = &self.admin;
        let dp = &admin.data;
        let relaxed = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

        {
            let mut family =
                e.encode_descriptor("sluice_build", "The running sluice.", None, MetricType::Info)?;
            family.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        }
        gauge(
            &mut e,
            "sluice_ready",
            "1 while sluice is ready (its model enforced, the node's pods enrolled).",
            u64::from(admin.ready.load(Ordering::Acquire)),
        )?;
        gauge(
            &mut e,
            "sluice_uptime_seconds",
            "Seconds since this sluice process started.",
            admin.started.elapsed().as_secs_f64(),
        )?;

        // Kernel: redirect counters (per-CPU, summed) and map occupancy.
        let kernel = admin.redirector.counters();
        let rows: Vec<(&str, u64)> = kernel.iter().map(|(k, v)| (*k, *v)).collect();
        labelled(
            &mut e,
            "sluice_kernel_events",
            "Events counted by the eBPF programs (summed over CPUs).",
            MetricType::Counter,
            "event",
            &rows,
        )?;
        let maps = self.maps.occupancy();
        let entries: Vec<(&str, u64)> = maps.iter().map(|m| (m.name, m.entries)).collect();
        let capacity: Vec<(&str, u64)> = maps.iter().map(|m| (m.name, m.capacity)).collect();
        labelled(
            &mut e,
            "sluice_bpf_map_entries",
            "Entries in the node's pinned eBPF hash maps (counted at scrape time).",
            MetricType::Gauge,
            "map",
            &entries,
        )?;
        labelled(
            &mut e,
            "sluice_bpf_map_capacity",
            "Maximum entries of the node's pinned eBPF hash maps.",
            MetricType::Gauge,
            "map",
            &capacity,
        )?;

        // Pods and connections.
        let enrolled = admin.pods.read().unwrap_or_else(PoisonError::into_inner).len();
        gauge(
            &mut e,
            "sluice_enrolled_pods",
            "Pods of this node whose connections sluice captures.",
            enrolled as u64,
        )?;
        gauge(
            &mut e,
            "sluice_connections_open",
            "Connections open through sluice (both directions).",
            admin.conns.open_count() as u64,
        )?;

        // Certificates: held ones (by identity), identities still waiting for theirs, the CA
        // client, the trust bundle.
        let certs = admin.certs.certs();
        let held: Vec<&crate::identity::CertView> =
            certs.iter().filter(|c| c.state == crate::identity::CertState::Ready).collect();
        {
            let mut family = e.encode_descriptor(
                "sluice_certificate_expiry_timestamp_seconds",
                "When each workload certificate held by this node expires (Unix time).",
                None,
                MetricType::Gauge,
            )?;
            for c in &held {
                let identity = c.identity.to_string();
                let labels = [("identity", identity.as_str())];
                let expiry = c.not_after.as_deref().and_then(rfc3339_unix).unwrap_or(0);
                family.encode_family(&labels)?.encode_gauge(&expiry)?;
            }
        }
        {
            let mut family = e.encode_descriptor(
                "sluice_certificate_renewal_failures",
                "Consecutive failed renewals of each workload certificate (0 after a success).",
                None,
                MetricType::Gauge,
            )?;
            for c in &held {
                let identity = c.identity.to_string();
                let labels = [("identity", identity.as_str())];
                family.encode_family(&labels)?.encode_gauge(&u64::from(c.renewal_failures))?;
            }
        }
        gauge(
            &mut e,
            "sluice_certificates_pending",
            "Identities of this node's pods still waiting for their first certificate.",
            (certs.len() - held.len()) as u64,
        )?;
        let no_cert = &admin.certs.no_certificate;
        labelled(
            &mut e,
            "sluice_connections_without_certificate",
            "Connections that needed their pod's certificate before it was issued: waited for it, \
             or refused at the end of the wait.",
            MetricType::Counter,
            "outcome",
            &[
                ("waited", no_cert.waited.load(Ordering::Relaxed)),
                ("refused", no_cert.refused.load(Ordering::Relaxed)),
            ],
        )?;
        let ca = admin.certs.ca_counters();
        if !ca.is_empty() {
            let by_result: Vec<(&str, u64)> =
                ca.iter().map(|(name, v)| (name.strip_prefix("ca_").unwrap_or(name), *v)).collect();
            labelled(
                &mut e,
                "sluice_ca_client_events",
                "The remote CA client: requests sent, their outcomes, and requests that waited for a slot.",
                MetricType::Counter,
                "event",
                &by_result,
            )?;
        }
        {
            let bundle = admin.certs.bundle_view();
            let mut family = e.encode_descriptor(
                "sluice_trust_bundle_root_expiry_timestamp_seconds",
                "When each root of the mesh trust bundle expires (Unix time); position 0 is the root the CA signs under.",
                None,
                MetricType::Gauge,
            )?;
            for (i, root) in bundle.roots.iter().enumerate() {
                let position = i.to_string();
                let labels = [("position", position.as_str()), ("sha256", root.sha256.as_str())];
                family.encode_family(&labels)?.encode_gauge(&rfc3339_unix(&root.not_after).unwrap_or(0))?;
            }
        }

        // Admission.
        labelled(
            &mut e,
            "sluice_admitted",
            "What admission counts as open now: proxied connections, and the sockets held for traffic (client, upstream, tunnel, delivery).",
            MetricType::Gauge,
            "kind",
            &[("connections", u64::from(dp.admission.open())), ("sockets", u64::from(dp.admission.sockets()))],
        )?;
        labelled(
            &mut e,
            "sluice_admission_limit",
            "The bounds in force (connections; sockets node-wide).",
            MetricType::Gauge,
            "limit",
            &[
                ("max_connections", u64::from(dp.admission.config.max_connections)),
                ("max_sockets", u64::from(dp.admission.config.max_sockets)),
                ("pod_max_connections", u64::from(dp.admission.config.pod_max_connections)),
                ("pod_max_inbound", u64::from(dp.admission.config.pod_max_inbound)),
                ("peer_max_inbound", u64::from(dp.admission.config.peer_max_inbound)),
            ],
        )?;

        {
            let mut family = e.encode_descriptor(
                "sluice_node_listener_connections",
                "Connections to the node's own listeners (readiness, metrics, admin TCP): accepted, refused at a connection cap, closed for a missing request or no progress.",
                None,
                MetricType::Counter,
            )?;
            for (listener, event, value) in listener_limits::COUNTERS.snapshot() {
                let labels = [("listener", listener), ("event", event)];
                family.encode_family(&labels)?.encode_counter::<NoLabelSet, u64, u64>(&value, None)?;
            }
        }

        // Upstream pools.
        let (idle_h1, h2) = dp.l7.upstreams.sizes();
        labelled(
            &mut e,
            "sluice_upstream_connections",
            "Upstream connections held: idle pooled HTTP/1.1, HTTP/2, pooled HBONE tunnels.",
            MetricType::Gauge,
            "kind",
            &[("http1_idle", idle_h1 as u64), ("http2", h2 as u64), ("hbone", dp.pool.len() as u64)],
        )?;
        for (name, help, stats) in [
            (
                "sluice_hbone_pool_events",
                "HBONE tunnel pool: connections made, single-flight waits, bounds hit, evictions by reason.",
                dp.pool.stats(),
            ),
            (
                "sluice_upstream_h2_pool_events",
                "Upstream HTTP/2 pool: connections made, single-flight waits, bounds hit, evictions by reason.",
                dp.l7.upstreams.h2_stats(),
            ),
        ] {
            labelled(&mut e, name, help, MetricType::Counter, "event", &stats.snapshot())?;
        }
        let (states, state_overflow) = dp.l7.balancer.state_stats();
        gauge(
            &mut e,
            "sluice_balancer_endpoint_states",
            "Endpoints the balancer keeps load state for.",
            states as u64,
        )?;
        counter(
            &mut e,
            "sluice_balancer_state_overflow",
            "New addresses balanced without kept state because the state map was full.",
            state_overflow,
        )?;
        counter(
            &mut e,
            "sluice_balancer_state_evicted",
            "Idle states of addresses outside the model evicted to make room for new addresses.",
            dp.l7.balancer.state_evictions(),
        )?;

        // Telemetry itself.
        counter(
            &mut e,
            "sluice_access_log_dropped",
            "Access log records dropped because the writer's queue was full.",
            dp.telemetry.access_log.dropped(),
        )?;
        let istio = &dp.telemetry.metrics;
        let (req_series, tcp_series) = istio.series();
        labelled(
            &mut e,
            "sluice_metric_series",
            "Label sets kept for Istio's metrics (request metrics, TCP metrics).",
            MetricType::Gauge,
            "kind",
            &[("requests", req_series as u64), ("tcp", tcp_series as u64)],
        )?;
        gauge(
            &mut e,
            "sluice_metric_series_limit",
            "Most label sets Istio's metrics keep, request and TCP together (--max-metric-series).",
            istio.limits().max_series as u64,
        )?;
        counter(
            &mut e,
            "sluice_metric_series_dropped",
            "Records not counted in Istio's metrics because their new label set would have exceeded --max-metric-series.",
            istio.dropped(),
        )?;
        gauge(
            &mut e,
            "sluice_metric_series_workload_limit",
            "Most label sets one workload may hold in Istio's metrics (--max-metric-series-per-workload).",
            istio.limits().max_series_per_workload as u64,
        )?;
        counter(
            &mut e,
            "sluice_metric_series_workload_dropped",
            "Records not counted in Istio's metrics because their workload held --max-metric-series-per-workload label sets.",
            istio.workload_dropped(),
        )?;
        counter(
            &mut e,
            "sluice_metric_series_expired",
            "Istio metric series removed after their workloads left (--metric-series-grace-s).",
            istio.expired(),
        )?;

        // The admin API's counters (`sluice status`), as counters.
        let l7 = &dp.l7.counters;
        labelled(
            &mut e,
            "sluice_connections_detected",
            "Outbound connections by the protocol detection found.",
            MetricType::Counter,
            "protocol",
            &[
                ("http1", relaxed(&l7.detected_http1)),
                ("http2", relaxed(&l7.detected_http2)),
                ("opaque", relaxed(&l7.detected_opaque)),
            ],
        )?;
        let inbound = &admin.inbound.counters;
        let tunnel = &admin.inbound.tunnel_stats;
        let up = &dp.l7.upstreams.counters;
        let lc = &dp.l7.limit_counters;
        let overflow: u64 =
            dp.l7.breakers.snapshot().iter().map(|(_, _, b)| b.overflows.load(Ordering::Relaxed)).sum();
        let counters: [(&str, &str, u64); 46] = [
            (
                "sluice_http_requests",
                "HTTP requests received from enrolled pods (outbound).",
                relaxed(&l7.requests),
            ),
            (
                "sluice_http_local_replies",
                "Responses sluice made itself (no route, no endpoint, upstream failure, timeout, ...).",
                relaxed(&l7.local_replies),
            ),
            (
                "sluice_http_upgrades",
                "HTTP upgrades (WebSocket) and CONNECT passed through.",
                relaxed(&l7.upgrades),
            ),
            ("sluice_http_retries", "Requests sent again (retries).", relaxed(&lc.retries)),
            (
                "sluice_http_retry_budget_exhausted",
                "Retries not made because the retry budget was spent.",
                relaxed(&lc.retry_budget_exhausted),
            ),
            ("sluice_http_overflow", "Requests refused by a circuit breaker (503 overflow).", overflow),
            (
                "sluice_http_rate_limited",
                "Requests refused by a local rate limit (429).",
                relaxed(&lc.rate_limited),
            ),
            (
                "sluice_http_faults_delayed",
                "Requests delayed by fault injection.",
                relaxed(&lc.faults_delayed),
            ),
            (
                "sluice_http_faults_aborted",
                "Requests aborted by fault injection.",
                relaxed(&lc.faults_aborted),
            ),
            ("sluice_http_mirrored", "Requests mirrored.", relaxed(&l7.mirrored)),
            (
                "sluice_http_mirror_skipped",
                "Mirror copies not sent (body over the limit).",
                relaxed(&l7.mirror_skipped),
            ),
            ("sluice_http_mirror_failed", "Mirror copies that failed.", relaxed(&l7.mirror_failed)),
            (
                "sluice_http_mirror_dropped",
                "Mirror copies not sent: too many mirrored requests in flight (per pod or node-wide).",
                relaxed(&l7.mirror_dropped),
            ),
            (
                "sluice_http_mirror_timeouts",
                "Mirror copies given up after their deadline.",
                relaxed(&l7.mirror_timeouts),
            ),
            (
                "sluice_egress_refused",
                "Connections and requests refused by a REGISTRY_ONLY outbound policy.",
                relaxed(&l7.egress_refused),
            ),
            (
                "sluice_pod_overflow",
                "Connections or requests refused by a per-pod limit.",
                relaxed(&lc.pod_overflow),
            ),
            (
                "sluice_pod_accept_paused",
                "Times a pod's listener was paused by its connection rate limit.",
                relaxed(&lc.pod_accept_paused),
            ),
            ("sluice_upstream_connects", "Upstream connections opened.", relaxed(&up.connects)),
            (
                "sluice_upstream_connect_errors",
                "Upstream connections that failed to open.",
                relaxed(&up.connect_errors),
            ),
            ("sluice_upstream_reused", "Requests sent on a pooled upstream connection.", relaxed(&up.reused)),
            (
                "sluice_upstream_retried_on_fresh_connection",
                "Requests sent again on a fresh connection after a pooled one closed under them.",
                relaxed(&up.retried_on_fresh_connection),
            ),
            (
                "sluice_upstream_tls_originated",
                "Upstream TLS connections originated to external services.",
                relaxed(&up.tls_originated),
            ),
            (
                "sluice_hbone_fallback_plaintext",
                "Connections sent plaintext because the destination had no tunnel endpoint.",
                relaxed(&dp.tunnel_fallbacks),
            ),
            (
                "sluice_hbone_fallback_refused_strict",
                "Connections refused instead of sent plaintext: the destination had no tunnel endpoint and requires mutual TLS (STRICT).",
                relaxed(&dp.tunnel_fallbacks_refused),
            ),
            (
                "sluice_refused_node_limit",
                "Connections refused by the node-wide connection limit (--max-connections).",
                relaxed(&dp.admission.counters.refused_node_limit),
            ),
            (
                "sluice_refused_pod_limit",
                "Client connections and upstream or tunnel sockets refused by a source pod's limit (--pod-max-connections).",
                relaxed(&dp.admission.counters.refused_pod_limit),
            ),
            (
                "sluice_dials_refused",
                "Upstream or tunnel connections not opened because a connection limit was reached.",
                relaxed(&dp.admission.counters.dials_refused),
            ),
            (
                "sluice_idle_shed",
                "Idle pooled connections closed to make room for a new socket at a connection limit.",
                relaxed(&dp.admission.counters.idle_shed),
            ),
            (
                "sluice_refused_destination_pod_limit",
                "Inbound connections refused by the per-destination-pod limit.",
                relaxed(&dp.admission.counters.refused_destination_pod_limit),
            ),
            (
                "sluice_refused_peer_limit",
                "Inbound connections refused by the per-peer limit.",
                relaxed(&dp.admission.counters.refused_peer_limit),
            ),
            (
                "sluice_tcp_idle_closed",
                "Opaque TCP connections and tunnel streams closed by the idle timeout.",
                relaxed(&dp.idle.closed),
            ),
            (
                "sluice_self_connection_refused",
                "Connections refused because they would have reached one of sluice's own listeners (a loop).",
                relaxed(&dp.loop_guard.refused),
            ),
            (
                "sluice_log_lines_suppressed",
                "Log lines of per-connection refusals not written by the log rate limit (per source and global).",
                crate::lograte::shared().suppressed(),
            ),
            (
                "sluice_log_lines_dropped",
                "Log lines dropped because the log writer's queue was full (stderr did not keep up).",
                crate::lograte::dropped_lines(),
            ),
            (
                "sluice_hbone_streams_in",
                "HBONE streams received for this node's pods.",
                relaxed(&inbound.tunnel_streams),
            ),
            (
                "sluice_hbone_handshakes_failed",
                "Inbound mTLS handshakes that failed.",
                relaxed(&tunnel.handshakes_failed),
            ),
            (
                "sluice_hbone_handshakes_refused_source",
                "Inbound tunnel connections refused before TLS: too many handshakes in progress from their source.",
                relaxed(&tunnel.gate.refused_source),
            ),
            (
                "sluice_hbone_handshakes_refused_node",
                "Inbound tunnel connections refused before TLS: too many handshakes in progress node-wide.",
                relaxed(&tunnel.gate.refused_node),
            ),
            (
                "sluice_hbone_tunnels_refused_identity",
                "Authenticated tunnel connections refused: the identity holds its bound of tunnel connections.",
                relaxed(&tunnel.gate.refused_identity),
            ),
            (
                "sluice_hbone_streams_rejected",
                "Inbound HBONE streams rejected before delivery.",
                relaxed(&tunnel.streams_rejected),
            ),
            (
                "sluice_same_node_handoffs",
                "Connections between two pods of this node handed over in-process (no tunnel, no TLS).",
                relaxed(&dp.same_node.handoffs),
            ),
            (
                "sluice_same_node_in",
                "Connections from a pod of this node that reached the destination side in-process (no tunnel), refused ones included.",
                relaxed(&inbound.same_node_in),
            ),
            (
                "sluice_plaintext_accepted",
                "Plaintext connections accepted for this node's pods (PERMISSIVE).",
                relaxed(&inbound.plaintext_accepted),
            ),
            (
                "sluice_plaintext_refused_strict",
                "Plaintext connections refused because the namespace is STRICT.",
                relaxed(&inbound.plaintext_refused_strict),
            ),
            (
                "sluice_policy_denied",
                "Connections denied by an authorization policy.",
                relaxed(&inbound.policy_denied),
            ),
            (
                "sluice_delivery_failed",
                "Connections that could not be delivered to the application.",
                relaxed(&inbound.delivery_failed),
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut e, name, help, value)?;
        }
        Ok(())
    }
}

/// The node's pinned eBPF maps, opened on first use (they are created by whichever sluice
/// process of the node came first and outlive it).
struct BpfMaps {
    dir: PathBuf,
    open: Mutex<Vec<(&'static str, aya::maps::MapData, u32, u32)>>,
}

struct MapOccupancy {
    name: &'static str,
    entries: u64,
    capacity: u64,
}

impl BpfMaps {
    fn new(dir: PathBuf) -> BpfMaps {
        BpfMaps { dir, open: Mutex::new(Vec::new()) }
    }

    fn occupancy(&self) -> Vec<MapOccupancy> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        for name in MAPS {
            if open.iter().any(|(n, ..)| *n == name) {
                continue;
            }
            let path = self.dir.join(name);
            match aya::maps::MapData::from_pin(&path).and_then(|m| m.info().map(|i| (m, i))) {
                Ok((map, info)) => open.push((name, map, info.key_size(), info.max_entries())),
                Err(e) => debug!(path = %path.display(), error = %e, "eBPF map not counted"),
            }
        }
        open.iter()
            .map(|(name, map, key_size, max)| MapOccupancy {
                name,
                entries: count_keys(map.fd().as_fd().as_raw_fd(), *key_size as usize, *max),
                capacity: u64::from(*max),
            })
            .collect()
    }
}

/// Counts a hash map's keys with `BPF_MAP_GET_NEXT_KEY`, at most `max` (a key deleted under
/// the walk makes the kernel start over, so a busy map could otherwise be walked for ever).
fn count_keys(fd: std::os::fd::RawFd, key_size: usize, max: u32) -> u64 {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let mut cur = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n: u64 = 0;
    while n < u64::from(max) {
        let attr = Attr {
            map_fd: fd as u32,
            _pad: 0,
            key: if n == 0 { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: key and next_key point at buffers of the map's key size that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const Attr,
                std::mem::size_of::<Attr>() as u32,
            )
        };
        if rc != 0 {
            break; // ENOENT: past the last key
        }
        n += 1;
        std::mem::swap(&mut cur, &mut next);
    }
    n
}

/// `YYYY-MM-DDTHH:MM:SS[.frac]Z` (how certificate times are shown) → Unix seconds.
fn rfc3339_unix(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || !s.ends_with('Z')
    {
        return None;
    }
    let month = time::Month::try_from(u8::try_from(num(5..7)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(num(0..4)?).ok()?,
        month,
        u8::try_from(num(8..10)?).ok()?,
    )
    .ok()?;
    let time = time::Time::from_hms(
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(14..16)?).ok()?,
        u8::try_from(num(17..19)?).ok()?,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, time).assume_utc().unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_times_parse() {
        assert_eq!(rfc3339_unix("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_unix("2026-11-30T16:03:13Z"), Some(1_796_054_593));
        assert_eq!(rfc3339_unix("2026-11-30T16:03:13.5Z"), Some(1_796_054_593));
        assert_eq!(rfc3339_unix("garbage"), None);
        assert_eq!(rfc3339_unix("2026-13-30T16:03:13Z"), None);
    }

    #[tokio::test]
    async fn serves_shares_the_port_and_closes() {
        // No AdminState here: the HTTP side is checked with an empty registry.
        let scrape = Arc::new(Scrape::with(Registry::default()));
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        drop(bind(addr).expect("SO_REUSEPORT lets a successor bind the port"));
        let (close, closed) = watch::channel(None);
        let server = tokio::spawn(serve(first, scrape, Arc::new(|| false), closed));
        let out = get(addr, METRICS_PATH).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains(CONTENT_TYPE) && out.ends_with("# EOF\n"), "{out}");
        assert!(get(addr, "/other").await.unwrap().starts_with("HTTP/1.1 404"));
        close.send_replace(Some("draining"));
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("closes").unwrap();
        assert!(get(addr, METRICS_PATH).await.is_err(), "the listener must be closed");
    }

    #[tokio::test]
    async fn large_bodies_go_out_in_pieces_with_their_length() {
        // 5.5 pieces of text, each line numbered, so a lost or repeated piece shows.
        let text: String = (0..).map(|i| format!("line {i:08}\n")).take_while({
            let mut len = 0;
            move |l: &String| {
                len += l.len();
                len <= WRITE_PIECE * 11 / 2
            }
        }).collect();
        // The body hands out at most one piece per poll and yields between pieces.
        let mut body = std::pin::pin!(PiecewiseBody::new(Bytes::from(text.clone())));
        assert_eq!(body.size_hint().exact(), Some(text.len() as u64));
        let (mut pieces, mut pendings) = (Vec::new(), 0);
        std::future::poll_fn(|cx| loop {
            match body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => pieces.push(f.into_data().expect("data frame")),
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Ready(Some(Err(e))) => match e {},
                Poll::Pending => pendings += 1,
            }
        })
        .await;
        assert_eq!(pieces.len(), 6);
        assert_eq!(pendings, 5, "one yield between each two pieces");
        assert!(pieces.iter().all(|p| p.len() <= WRITE_PIECE));
        assert_eq!(pieces.concat(), text.as_bytes());

        // Through hyper and a real connection: a Content-Length response, byte-exact.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = text.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = service_fn(move |req: Request<Incoming>| {
                let text = served.clone();
                async move { Ok::<_, Infallible>(answer(req.method(), req.uri().path(), Some(text))) }
            });
            http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await.unwrap();
        });
        let out = get(addr, METRICS_PATH).await.unwrap();
        let (head, got) = out.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.to_ascii_lowercase().contains(&format!("content-length: {}", text.len())), "{head}");
        assert!(got == text, "body differs: {} bytes received, {} sent", got.len(), text.len());
    }

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }
}
