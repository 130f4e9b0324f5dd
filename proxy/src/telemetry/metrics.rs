//! Istio's standard metrics, as Istio's docs define them (names, labels, "unknown" where a
//! value is not known, Envoy's default histogram buckets), kept per label set and encoded at
//! scrape time by `admin::metrics_server` (`GET /metrics` on :15020), next to sluice's own.
//!
//! | metric | type | from |
//! |---|---|---|
//! | `istio_requests_total` | counter | every [`RequestRecord`] |
//! | `istio_request_duration_milliseconds` | histogram | its duration |
//! | `istio_request_bytes`, `istio_response_bytes` | histograms | its body sizes |
//! | `istio_tcp_connections_opened_total`, `..._closed_total` | counters | [`ConnRecord`]s |
//! | `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total` | counters | a closed connection's bytes |
//!
//! Labels, in Istio's order: `reporter`, `source_workload`, `source_canonical_service`,
//! `source_canonical_revision`, `source_workload_namespace`, `source_principal`, `source_app`,
//! `source_version`, `source_cluster`, `destination_workload`, `destination_workload_namespace`,
//! `destination_principal`, `destination_app`, `destination_version`, `destination_service`,
//! `destination_canonical_service`, `destination_canonical_revision`,
//! `destination_service_name`, `destination_service_namespace`, `destination_cluster`,
//! `request_protocol`, `response_code`, `grpc_response_status`, `response_flags`,
//! `connection_security_policy`. TCP metrics carry `request_protocol="tcp"` and no
//! `response_code` / `grpc_response_status`, as Istio's do. As in Istio's stats filter:
//!
//! - principals are set only when the hop was mutual TLS (the certificates' SPIFFE IDs),
//!   otherwise "unknown";
//! - `connection_security_policy` is "unknown" on the source reporter, "mutual_tls" or "none"
//!   on the destination reporter;
//! - an unknown peer (not a pod of the model) is `workload="unknown"`, `app="unknown"`,
//!   `canonical_revision="latest"`, `cluster="unknown"`, with its namespace taken from its
//!   principal when there is one; a known pod's cluster is [`CLUSTER_ID`];
//! - `destination_service` is the Service host `name.namespace.svc.cluster.local`; without a
//!   Service it is "unknown" on the source reporter (an external address) and the destination
//!   workload's canonical service on the destination reporter;
//! - `grpc_response_status` is the gRPC status number (0 to 16) for gRPC, empty for plain
//!   HTTP, "other" for a number gRPC does not define; `response_code` is the HTTP status when
//!   IANA registered it, "0" when no response was sent, and otherwise its class ("4xx" for
//!   499) or "other" (600 to 999, which HTTP does not define) (see [`StatusLabel`]);
//! - `response_flags` is "-" or sluice's reason (the `x-sluice-error` vocabulary, a small
//!   fixed set).
//!
//! Cardinality: no label carries a path, an address or a pod name (workloads are named after
//! their controller, `discovery::workload`), and codes come from small fixed sets, so the
//! series are bounded by workload pairs × Services × codes. Three bounds keep that true over
//! time and against surprises ([`SeriesLimits`]): a series whose workloads have all left the
//! model expires after a grace period ([`Metrics::expire`], run by [`expire_series`] on the
//! control path), a hard cap on the number of series refuses new ones beyond it, and each
//! workload may hold only a share of that cap (counted, never blocking): one workload
//! answering itself with every status there is cannot take the series of the others.
//!
//! The data path builds no label set per request: a record is turned into a borrowed view of
//! its labels (`&str`s into the record and the model's [`WorkloadInfo`]s), hashed once and
//! looked up under a read lock; only the first request of a new label set allocates its owned
//! key (`Arc<str>` values). Recording is then a few relaxed atomic additions (histograms are
//! arrays of atomic bucket counters, not mutexes). Scrapes copy the series list under the read
//! lock and encode outside it.

use std::{
    cmp::Ordering as CmpOrdering,
    collections::HashSet,
    fmt,
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, PoisonError, RwLock,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use hashbrown::{Equivalent, HashMap};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabel, EncodeLabelSet, LabelSetEncoder, NoLabelSet},
    metrics::MetricType,
};
use tracing::{debug, warn};

use super::{ConnRecord, Peer, Reporter, RequestRecord, SharedTelemetry, TelemetryConfig, WorkloadInfo};
use crate::discovery::{workload_name, Model};

/// The cluster label of workloads sluice knows (Istio's default cluster id).
pub const CLUSTER_ID: &str = "Kubernetes";
const UNKNOWN: &str = "unknown";
const LATEST: &str = "latest";

/// Default of `--max-metric-series`.
pub const DEFAULT_MAX_SERIES: usize = 5_000;
/// Default of `--metric-series-grace-s`.
pub const DEFAULT_SERIES_GRACE: Duration = Duration::from_secs(300);

/// The default share of `--max-metric-series` one workload may hold: a quarter, as for
/// connections (`admission`), so that no single workload can take every series.
pub fn default_series_per_workload(max_series: usize) -> usize {
    (max_series / 4).max(1)
}

/// The bounds on the series of Istio's metrics (`sluice run` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesLimits {
    /// Most label sets kept, request and TCP series together. A record that would add one more
    /// is not counted in Istio's metrics (it is in `sluice_metric_series_dropped_total`).
    pub max_series: usize,
    /// How long a series stays once no pod of its source or destination workload is left in
    /// the model, so that the scrapes in between still see its final counts.
    pub grace: Duration,
    /// Most series charged to one workload (`--max-metric-series-per-workload`): a series is
    /// charged to its source workload, or to its destination workload when the source is not
    /// a pod of the model (a client outside the mesh). Beyond it, records of new label sets of
    /// that workload are not counted (`sluice_metric_series_workload_dropped_total`).
    pub max_series_per_workload: usize,
}

impl Default for SeriesLimits {
    fn default() -> Self {
        SeriesLimits {
            max_series: DEFAULT_MAX_SERIES,
            grace: DEFAULT_SERIES_GRACE,
            max_series_per_workload: default_series_per_workload(DEFAULT_MAX_SERIES),
        }
    }
}

impl SeriesLimits {
    /// How often [`expire_series`] looks: a quarter of the grace period, between 250 ms and
    /// 15 s. A series is marked at the first sweep after its workloads left and removed at the
    /// first sweep after the mark is `grace` old: at most two intervals late.
    pub fn sweep_interval(&self) -> Duration {
        (self.grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(15))
    }
}

/// Envoy's default histogram buckets, which Istio's standard histograms use: milliseconds for
/// `istio_request_duration_milliseconds`, bytes for `istio_request_bytes` and
/// `istio_response_bytes`.
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];
const SLOTS: usize = BUCKETS.len() + 1;

/// `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Security {
    Unknown,
    MutualTls,
    None,
}

impl Security {
    fn as_str(self) -> &'static str {
        match self {
            Security::Unknown => "unknown",
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
        }
    }
}

/// A status as a label value: its number when dashboards may look for it, a bucket otherwise,
/// so that a server answering with every number there is makes a handful of series, not a
/// thousand. The classes keep Istio's dashboards right: they select errors with
/// `response_code=~"5.*"`, which "5xx" still matches; "other" matches no class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum StatusLabel {
    Code(u16),
    /// `Class(4)` is "4xx".
    Class(u8),
    Other,
}

impl StatusLabel {
    /// `response_code`: 0 (no response) and the statuses IANA registered as themselves, other
    /// numbers of 100 to 599 as their class, anything else "other".
    fn http(status: u16) -> StatusLabel {
        match status {
            0 => StatusLabel::Code(0),
            s if is_registered_status(s) => StatusLabel::Code(s),
            100..=599 => StatusLabel::Class((status / 100) as u8),
            _ => StatusLabel::Other,
        }
    }

    /// `grpc_response_status`: the codes gRPC defines (OK = 0 to UNAUTHENTICATED = 16).
    fn grpc(status: u16) -> StatusLabel {
        if status <= 16 {
            StatusLabel::Code(status)
        } else {
            StatusLabel::Other
        }
    }
}

/// The HTTP status codes of IANA's registry (RFC 9110 and the later RFCs it lists), without
/// those marked unused (306, 418).
fn is_registered_status(status: u16) -> bool {
    matches!(
        status,
        100..=103
            | 200..=208
            | 226
            | 300..=305
            | 307
            | 308
            | 400..=417
            | 421..=426
            | 428
            | 429
            | 431
            | 451
            | 500..=508
            | 510
            | 511
    )
}

impl prometheus_client::encoding::EncodeLabelValue for StatusLabel {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> fmt::Result {
        match self {
            StatusLabel::Code(c) => fmt::Write::write_str(encoder, itoa(*c, &mut [0u8; 5])),
            StatusLabel::Class(c) => fmt::Write::write_fmt(encoder, format_args!("{c}xx")),
            StatusLabel::Other => fmt::Write::write_str(encoder, "other"),
        }
    }
}

/// One side's labels, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SideView<'a> {
    workload: &'a str,
    canonical_service: &'a str,
    canonical_revision: &'a str,
    namespace: &'a str,
    principal: &'a str,
    app: &'a str,
    version: &'a str,
    cluster: &'a str,
}

impl<'a> SideView<'a> {
    fn of(peer: &Peer<'a>, mtls: bool) -> SideView<'a> {
        let principal = match peer.principal {
            Some(p) if mtls && !p.is_empty() => p,
            _ => UNKNOWN,
        };
        match peer.workload {
            Some(w) => SideView::known(w, principal),
            None => SideView {
                workload: UNKNOWN,
                canonical_service: UNKNOWN,
                canonical_revision: LATEST,
                namespace: principal_namespace(principal).unwrap_or(UNKNOWN),
                principal,
                app: UNKNOWN,
                version: UNKNOWN,
                cluster: UNKNOWN,
            },
        }
    }

    fn known(w: &'a WorkloadInfo, principal: &'a str) -> SideView<'a> {
        SideView {
            workload: &w.workload,
            canonical_service: &w.canonical_service,
            canonical_revision: &w.canonical_revision,
            namespace: &w.namespace,
            principal,
            app: &w.app,
            version: &w.version,
            cluster: CLUSTER_ID,
        }
    }
}

/// `<trust domain>/ns/<namespace>/sa/<account>` → the namespace (what Istio does for a peer
/// it has no metadata about).
fn principal_namespace(principal: &str) -> Option<&str> {
    let rest = &principal[principal.find("/ns/")? + 4..];
    let ns = rest.split('/').next()?;
    (!ns.is_empty()).then_some(ns)
}

/// A label set, borrowed from a record: what the data path hashes and looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LabelsView<'a> {
    reporter: Reporter,
    source: SideView<'a>,
    destination: SideView<'a>,
    service_name: &'a str,
    service_namespace: &'a str,
    /// `destination_service` is `name.namespace.svc.cluster.local` (else the name label).
    service_fqdn: bool,
    /// "http", "grpc" or "tcp".
    protocol: &'a str,
    /// HTTP status (0: none); unused for TCP.
    response_code: StatusLabel,
    /// gRPC status; `None`: empty label (plain HTTP, or a gRPC response without status).
    grpc_status: Option<StatusLabel>,
    response_flags: &'a str,
    security: Security,
}

impl<'a> LabelsView<'a> {
    fn common(
        reporter: Reporter,
        source: &Peer<'a>,
        destination: &Peer<'a>,
        service: Option<super::ServiceRef<'a>>,
        mtls: bool,
        protocol: &'a str,
        response_flags: &'a str,
    ) -> LabelsView<'a> {
        let source = SideView::of(source, mtls);
        let destination = SideView::of(destination, mtls);
        let (service_name, service_namespace, service_fqdn) = match service {
            Some(s) => (s.name, s.namespace, true),
            // Istio's fallbacks: the server side names its own canonical service, the client
            // side knows nothing (an external address), both give the destination's namespace.
            None if reporter == Reporter::Destination => {
                (destination.canonical_service, destination.namespace, false)
            }
            None => (UNKNOWN, destination.namespace, false),
        };
        let security = match (reporter, mtls) {
            (Reporter::Source, _) => Security::Unknown,
            (Reporter::Destination, true) => Security::MutualTls,
            (Reporter::Destination, false) => Security::None,
        };
        LabelsView {
            reporter,
            source,
            destination,
            service_name,
            service_namespace,
            service_fqdn,
            protocol,
            response_code: StatusLabel::Code(0),
            grpc_status: None,
            response_flags: if response_flags.is_empty() { "-" } else { response_flags },
            security,
        }
    }

    fn request(rec: &'a RequestRecord<'_>) -> LabelsView<'a> {
        let mut v = LabelsView::common(
            rec.reporter,
            &rec.source,
            &rec.destination,
            rec.service,
            rec.mtls,
            rec.protocol,
            rec.response_flags,
        );
        v.response_code = StatusLabel::http(rec.status);
        v.grpc_status = if rec.protocol == "grpc" { rec.grpc_status.map(StatusLabel::grpc) } else { None };
        v
    }

    /// The workload a new series is charged to: the source, or the destination when the
    /// source is not a pod of the model (then the destination is: sluice reports only for its
    /// own pods). `None` if neither is.
    fn charged_workload(&self) -> Option<(&'a str, &'a str)> {
        [self.source, self.destination]
            .into_iter()
            .find(|side| side.cluster == CLUSTER_ID)
            .map(|side| (side.namespace, side.workload))
    }

    fn connection(rec: &'a ConnRecord<'_>) -> LabelsView<'a> {
        LabelsView::common(
            rec.reporter,
            &rec.source,
            &rec.destination,
            rec.service,
            rec.mtls,
            "tcp",
            rec.response_flags,
        )
    }

    /// Orders series for a readable scrape (grouped by destination service, then source).
    fn sort_key(self) -> impl Ord + 'a {
        (
            self.service_namespace,
            self.service_name,
            self.reporter == Reporter::Destination,
            self.source,
            self.destination,
            self.protocol,
            self.response_code,
            self.grpc_status,
            self.response_flags,
            self.security,
        )
    }
}

/// One side's labels, owned.
#[derive(Debug)]
struct Side {
    workload: Arc<str>,
    canonical_service: Arc<str>,
    canonical_revision: Arc<str>,
    namespace: Arc<str>,
    principal: Arc<str>,
    app: Arc<str>,
    version: Arc<str>,
    cluster: Arc<str>,
}

impl Side {
    fn own(v: &SideView<'_>) -> Side {
        Side {
            workload: v.workload.into(),
            canonical_service: v.canonical_service.into(),
            canonical_revision: v.canonical_revision.into(),
            namespace: v.namespace.into(),
            principal: v.principal.into(),
            app: v.app.into(),
            version: v.version.into(),
            cluster: v.cluster.into(),
        }
    }

    /// A pod of the model (a peer sluice knew nothing about has the cluster "unknown").
    fn is_pod(&self) -> bool {
        &*self.cluster == CLUSTER_ID
    }

    fn view(&self) -> SideView<'_> {
        SideView {
            workload: &self.workload,
            canonical_service: &self.canonical_service,
            canonical_revision: &self.canonical_revision,
            namespace: &self.namespace,
            principal: &self.principal,
            app: &self.app,
            version: &self.version,
            cluster: &self.cluster,
        }
    }
}

/// A label set, owned: the key of one series. Hashes and compares as its view, so that a
/// [`LabelsView`] finds it without being converted.
#[derive(Debug)]
struct Key {
    reporter: Reporter,
    source: Side,
    destination: Side,
    service_name: Arc<str>,
    service_namespace: Arc<str>,
    service_fqdn: bool,
    /// `destination_service`, spelled out once.
    service_host: Arc<str>,
    protocol: Arc<str>,
    response_code: StatusLabel,
    grpc_status: Option<StatusLabel>,
    response_flags: Arc<str>,
    security: Security,
}

impl Key {
    fn own(v: &LabelsView<'_>) -> Key {
        let service_host: Arc<str> = if v.service_fqdn {
            // The same domain VirtualService hosts are qualified with (`--cluster-domain`).
            let domain = crate::discovery::istio::cluster_domain();
            format!("{}.{}.svc.{domain}", v.service_name, v.service_namespace).into()
        } else {
            v.service_name.into()
        };
        Key {
            reporter: v.reporter,
            source: Side::own(&v.source),
            destination: Side::own(&v.destination),
            service_name: v.service_name.into(),
            service_namespace: v.service_namespace.into(),
            service_fqdn: v.service_fqdn,
            service_host,
            protocol: v.protocol.into(),
            response_code: v.response_code,
            grpc_status: v.grpc_status,
            response_flags: v.response_flags.into(),
            security: v.security,
        }
    }

    /// Whether the source or the destination is a workload with a pod in the model.
    fn is_live(&self, live: &LiveWorkloads) -> bool {
        [&self.source, &self.destination]
            .into_iter()
            .any(|s| s.is_pod() && live.contains(&s.namespace, &s.workload))
    }

    fn view(&self) -> LabelsView<'_> {
        LabelsView {
            reporter: self.reporter,
            source: self.source.view(),
            destination: self.destination.view(),
            service_name: &self.service_name,
            service_namespace: &self.service_namespace,
            service_fqdn: self.service_fqdn,
            protocol: &self.protocol,
            response_code: self.response_code,
            grpc_status: self.grpc_status,
            response_flags: &self.response_flags,
            security: self.security,
        }
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.view() == other.view()
    }
}

impl Eq for Key {}

impl Equivalent<Arc<Key>> for LabelsView<'_> {
    fn equivalent(&self, key: &Arc<Key>) -> bool {
        *self == key.view()
    }
}

/// A small integer as text, without allocating (label values are written at encode time).
fn itoa(mut n: u16, buf: &mut [u8; 5]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

impl EncodeLabelSet for Key {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        let s = &self.source;
        let d = &self.destination;
        let strs: [(&str, &str); 20] = [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &s.workload),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("source_workload_namespace", &s.namespace),
            ("source_principal", &s.principal),
            ("source_app", &s.app),
            ("source_version", &s.version),
            ("source_cluster", &s.cluster),
            ("destination_workload", &d.workload),
            ("destination_workload_namespace", &d.namespace),
            ("destination_principal", &d.principal),
            ("destination_app", &d.app),
            ("destination_version", &d.version),
            ("destination_service", &self.service_host),
            ("destination_canonical_service", &d.canonical_service),
            ("destination_canonical_revision", &d.canonical_revision),
            ("destination_service_name", &self.service_name),
            ("destination_service_namespace", &self.service_namespace),
            ("destination_cluster", &d.cluster),
        ];
        for label in strs {
            label.encode(encoder.encode_label())?;
        }
        ("request_protocol", &*self.protocol).encode(encoder.encode_label())?;
        if &*self.protocol != "tcp" {
            ("response_code", self.response_code).encode(encoder.encode_label())?;
            match self.grpc_status {
                Some(c) => ("grpc_response_status", c).encode(encoder.encode_label())?,
                None => ("grpc_response_status", "").encode(encoder.encode_label())?,
            }
        }
        ("response_flags", &*self.response_flags).encode(encoder.encode_label())?;
        ("connection_security_policy", self.security.as_str()).encode(encoder.encode_label())
    }
}

/// A histogram over [`BUCKETS`]: one atomic counter per bucket and the sum, in `unit`s of the
/// observed quantity (so that the sum stays an integer).
#[derive(Debug)]
struct Histogram {
    counts: [AtomicU64; SLOTS],
    sum: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: [const { AtomicU64::new(0) }; SLOTS], sum: AtomicU64::new(0) }
    }
}

/// What a scrape reads of a histogram: non-cumulative bucket counts (the last is +Inf), their
/// total, and the sum.
struct HistogramSnapshot {
    buckets: [(f64, u64); SLOTS],
    count: u64,
    sum: u64,
}

impl Histogram {
    /// Records `value` (compared with the bucket bounds) adding `sum_units` to the sum.
    fn observe(&self, value: f64, sum_units: u64) {
        let slot = BUCKETS.partition_point(|b| *b < value);
        self.counts[slot].fetch_add(1, Relaxed);
        self.sum.fetch_add(sum_units, Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [(f64::INFINITY, 0u64); SLOTS];
        let mut count = 0;
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Relaxed);
            buckets[i] = (BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n);
            count += n;
        }
        // `_count` is the buckets' total, so it always equals the +Inf bucket.
        HistogramSnapshot { buckets, count, sum: self.sum.load(Relaxed) }
    }
}

/// The series of one request label set. `istio_requests_total` is the duration histogram's
/// count: the counter and the histogram can never disagree.
#[derive(Debug, Default)]
struct RequestSeries {
    /// Sum in microseconds.
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// One counter of a [`TcpSeries`].
type TcpField = fn(&TcpSeries) -> &AtomicU64;

#[derive(Debug, Default)]
struct TcpSeries {
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// Series by label set.
#[derive(Debug)]
struct Store<V> {
    map: RwLock<HashMap<Arc<Key>, Arc<V>>>,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Store { map: RwLock::new(HashMap::new()) }
    }
}

/// Why a record's new series was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `max_series` series exist.
    Cap,
    /// The workload it is charged to holds `max_series_per_workload`.
    Workload,
}

impl<V: Default> Store<V> {
    /// Runs `f` on the series of `labels`, creating it on first use if `admit()` allows one
    /// more series (else `f` does not run and the refusal is returned).
    fn with(
        &self,
        labels: &LabelsView<'_>,
        admit: impl FnOnce() -> Result<(), Refusal>,
        f: impl FnOnce(&V),
    ) -> Result<(), Refusal> {
        {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(series) = map.get(labels) {
                f(series);
                return Ok(());
            }
        }
        let series = {
            let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
            match map.get(labels) {
                Some(s) => s.clone(),
                None => {
                    admit()?;
                    let s = Arc::new(V::default());
                    map.insert(Arc::new(Key::own(labels)), s.clone());
                    s
                }
            }
        };
        f(&series);
        Ok(())
    }

    /// The series, copied out of the lock, in a stable order.
    fn snapshot(&self) -> Vec<(Arc<Key>, Arc<V>)> {
        let mut all: Vec<(Arc<Key>, Arc<V>)> = {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        all.sort_by(|a, b| cmp_keys(&a.0, &b.0));
        all
    }

    /// The label sets, copied out of the lock (unordered).
    fn keys(&self) -> Vec<Arc<Key>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect()
    }

    /// Removes these series; returns those that were there.
    fn remove(&self, keys: Vec<Arc<Key>>) -> Vec<Arc<Key>> {
        if keys.is_empty() {
            return keys;
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        keys.into_iter().filter(|k| map.remove(k).is_some()).collect()
    }

    fn len(&self) -> usize {
        self.map.read().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// The workloads that have at least one pod in the model, by namespace: what keeps a series.
#[derive(Debug, Default)]
pub struct LiveWorkloads {
    by_namespace: std::collections::HashMap<String, HashSet<String>>,
}

impl LiveWorkloads {
    /// Every pod of the model counts, on any node and in any phase (a completed Job's pod
    /// still names its workload until it is deleted).
    pub fn of(model: &Model) -> LiveWorkloads {
        let mut live = LiveWorkloads::default();
        for pod in model.pods() {
            live.insert(&pod.namespace, workload_name(pod));
        }
        live
    }

    pub fn insert(&mut self, namespace: &str, workload: String) {
        match self.by_namespace.get_mut(namespace) {
            Some(names) => {
                names.insert(workload);
            }
            None => {
                self.by_namespace.insert(namespace.to_owned(), HashSet::from([workload]));
            }
        }
    }

    pub fn contains(&self, namespace: &str, workload: &str) -> bool {
        self.by_namespace.get(namespace).is_some_and(|names| names.contains(workload))
    }
}

/// The expiry's memory: the series found without a live workload, and since when. Only
/// [`Metrics::expire`] touches it (one control-path task), never the data path.
#[derive(Debug, Default)]
struct Orphans {
    requests: std::collections::HashMap<Arc<Key>, Instant>,
    tcp: std::collections::HashMap<Arc<Key>, Instant>,
}

/// One store's part of [`Metrics::expire`]: marks the series without a live workload, clears
/// the marks of those whose workload came back, removes those marked for `grace` or longer
/// and returns them.
fn expire_store<V: Default>(
    store: &Store<V>,
    orphans: &mut std::collections::HashMap<Arc<Key>, Instant>,
    live: &LiveWorkloads,
    grace: Duration,
    now: Instant,
) -> Vec<Arc<Key>> {
    let mut due = Vec::new();
    // Decided outside the store's lock: the data path only waits for the removal itself.
    for key in store.keys() {
        if key.is_live(live) {
            orphans.remove(&key);
            continue;
        }
        let since = *orphans.entry(key.clone()).or_insert(now);
        if now.saturating_duration_since(since) >= grace {
            due.push(key);
        }
    }
    for key in &due {
        orphans.remove(key);
    }
    store.remove(due)
}

fn cmp_keys(a: &Key, b: &Key) -> CmpOrdering {
    a.view().sort_key().cmp(&b.view().sort_key())
}

/// Series counts by namespace, then workload name.
type SeriesByWorkload = std::collections::HashMap<Arc<str>, std::collections::HashMap<Arc<str>, usize>>;

/// Istio's standard metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: Store<RequestSeries>,
    tcp: Store<TcpSeries>,
    limits: SeriesLimits,
    /// Series in both stores: what the cap is checked against when one is added.
    count: AtomicUsize,
    /// Records not counted because their new series would have exceeded the cap.
    dropped: AtomicU64,
    /// Series removed because their workloads left.
    expired: AtomicU64,
    /// The cap's warning was logged and the store has not gone below the cap since.
    warned: AtomicBool,
    /// Series charged to each workload, by namespace and workload name (see
    /// [`SeriesLimits::max_series_per_workload`]). Locked only to make or expire a series.
    per_workload: Mutex<SeriesByWorkload>,
    /// Records not counted because their workload held its share of series.
    workload_dropped: AtomicU64,
    /// The share's warning was logged and no series expired since.
    warned_workload: AtomicBool,
    orphans: Mutex<Orphans>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::with_limits(SeriesLimits::default())
    }
}

impl Metrics {
    pub fn new(cfg: &TelemetryConfig) -> Metrics {
        Metrics::with_limits(cfg.metric_series)
    }

    pub fn with_limits(limits: SeriesLimits) -> Metrics {
        Metrics {
            requests: Store::default(),
            tcp: Store::default(),
            limits,
            count: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            per_workload: Mutex::default(),
            workload_dropped: AtomicU64::new(0),
            warned_workload: AtomicBool::new(false),
            orphans: Mutex::default(),
        }
    }

    /// Takes one of the `max_series` places for a new series of `labels`, and one of its
    /// workload's share. Runs only when a record brings a label set not seen yet, under the
    /// store's write lock (so: an atomic and a small map, no I/O).
    fn admit(&self, labels: &LabelsView<'_>) -> Result<(), Refusal> {
        let charged = labels.charged_workload();
        let mut per_workload = self.per_workload.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((namespace, workload)) = charged {
            let held = per_workload.get(namespace).and_then(|w| w.get(workload)).copied().unwrap_or(0);
            if held >= self.limits.max_series_per_workload {
                return Err(Refusal::Workload);
            }
        }
        let max = self.limits.max_series;
        if self.count.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1)).is_err() {
            return Err(Refusal::Cap);
        }
        if let Some((namespace, workload)) = charged {
            *per_workload.entry(namespace.into()).or_default().entry(workload.into()).or_default() += 1;
        }
        Ok(())
    }

    /// Gives back the places of expired series.
    fn release(&self, keys: &[Arc<Key>]) {
        let mut per_workload = self.per_workload.lock().unwrap_or_else(PoisonError::into_inner);
        for key in keys {
            let Some((namespace, workload)) = key.view().charged_workload() else { continue };
            let Some(workloads) = per_workload.get_mut(namespace) else { continue };
            if let Some(held) = workloads.get_mut(workload) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    workloads.remove(workload);
                }
            }
            if workloads.is_empty() {
                per_workload.remove(namespace);
            }
        }
    }

    /// A record was not counted: its new series would have exceeded the cap or its workload's
    /// share. Warns once per episode (until expiry frees places again).
    fn refused(&self, why: Refusal, labels: &LabelsView<'_>) {
        match why {
            Refusal::Cap => {
                self.dropped.fetch_add(1, Relaxed);
                if !self.warned.swap(true, Relaxed) {
                    warn!(
                        max_series = self.limits.max_series,
                        "Istio metrics reached --max-metric-series: records of new label sets are not counted (sluice_metric_series_dropped_total) until series of departed workloads expire"
                    );
                }
            }
            Refusal::Workload => {
                self.workload_dropped.fetch_add(1, Relaxed);
                if !self.warned_workload.swap(true, Relaxed) {
                    let (namespace, workload) = labels.charged_workload().unwrap_or_default();
                    warn!(
                        namespace,
                        workload,
                        max_series_per_workload = self.limits.max_series_per_workload,
                        "a workload reached --max-metric-series-per-workload: its records of new label sets are not counted (sluice_metric_series_workload_dropped_total)"
                    );
                }
            }
        }
    }

    /// A request completed: counted, its duration and body sizes observed.
    pub fn on_request(&self, rec: &RequestRecord<'_>) {
        let labels = LabelsView::request(rec);
        let ms = rec.duration.as_secs_f64() * 1e3;
        let us = u64::try_from(rec.duration.as_micros()).unwrap_or(u64::MAX);
        let kept = self.requests.with(
            &labels,
            || self.admit(&labels),
            |s| {
                s.duration.observe(ms, us);
                s.request_bytes.observe(rec.request_bytes as f64, rec.request_bytes);
                s.response_bytes.observe(rec.response_bytes as f64, rec.response_bytes);
            },
        );
        if let Err(why) = kept {
            self.refused(why, &labels);
        }
    }

    pub fn on_connection_opened(&self, rec: &ConnRecord<'_>) {
        let labels = LabelsView::connection(rec);
        let kept = self.tcp.with(
            &labels,
            || self.admit(&labels),
            |s| {
                s.opened.fetch_add(1, Relaxed);
            },
        );
        if let Err(why) = kept {
            self.refused(why, &labels);
        }
    }

    /// A connection closed: counted, with its bytes (reported once, at close).
    pub fn on_connection_closed(&self, rec: &ConnRecord<'_>) {
        let labels = LabelsView::connection(rec);
        let kept = self.tcp.with(
            &labels,
            || self.admit(&labels),
            |s| {
                s.closed.fetch_add(1, Relaxed);
                s.sent.fetch_add(rec.sent, Relaxed);
                s.received.fetch_add(rec.received, Relaxed);
            },
        );
        if let Err(why) = kept {
            self.refused(why, &labels);
        }
    }

    /// Removes the series none of whose workloads (source, destination) has been in `live`
    /// for the grace period, as of `now`; returns how many. A series is marked the first time
    /// it is found without a live workload and removed once that mark is `grace` old; a
    /// workload that comes back clears the marks of its series. Called on the control path
    /// (by [`expire_series`]), never by the data path; the data path waits at most for the
    /// removal under the store's write lock.
    pub fn expire(&self, live: &LiveWorkloads, now: Instant) -> usize {
        let mut orphans = self.orphans.lock().unwrap_or_else(PoisonError::into_inner);
        let grace = self.limits.grace;
        let mut gone = expire_store(&self.requests, &mut orphans.requests, live, grace, now);
        gone.extend(expire_store(&self.tcp, &mut orphans.tcp, live, grace, now));
        let removed = gone.len();
        if removed > 0 {
            self.release(&gone);
            self.count.fetch_sub(removed, Relaxed);
            self.expired.fetch_add(removed as u64, Relaxed);
            self.warned_workload.store(false, Relaxed);
        }
        if self.count.load(Relaxed) < self.limits.max_series {
            self.warned.store(false, Relaxed);
        }
        removed
    }

    /// Number of series kept (request label sets, TCP label sets).
    pub fn series(&self) -> (usize, usize) {
        (self.requests.len(), self.tcp.len())
    }

    /// The bounds in force.
    pub fn limits(&self) -> SeriesLimits {
        self.limits
    }

    /// Records not counted because the series cap was reached.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Records not counted because their workload held its share of the series.
    pub fn workload_dropped(&self) -> u64 {
        self.workload_dropped.load(Relaxed)
    }

    /// Series removed because their workloads left the model.
    pub fn expired(&self) -> u64 {
        self.expired.load(Relaxed)
    }

    /// Writes every Istio metric family (OpenMetrics, through prometheus-client's encoder).
    pub fn encode_families(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let requests: Vec<_> = self
            .requests
            .snapshot()
            .into_iter()
            .map(|(k, s)| (k, s.duration.snapshot(), s.request_bytes.snapshot(), s.response_bytes.snapshot()))
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "istio_requests",
                "Requests handled by the proxy (reporter=source at the client's node, destination at the server's).",
                None,
                MetricType::Counter,
            )?;
            for (key, duration, _, _) in &requests {
                family
                    .encode_family(key.as_ref())?
                    .encode_counter::<NoLabelSet, u64, u64>(&duration.count, None)?;
            }
        }
        // (name, help, which histogram of a series, unit of its sum: microseconds for durations)
        let histograms = [
            ("istio_request_duration_milliseconds", "Duration of requests, in milliseconds.", 0, 1e3),
            ("istio_request_bytes", "HTTP request body sizes, in bytes.", 1, 1.0),
            ("istio_response_bytes", "HTTP response body sizes, in bytes.", 2, 1.0),
        ];
        for (name, help, which, per_unit) in histograms {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (key, d, req, resp) in &requests {
                let h = [d, req, resp][which];
                family.encode_family(key.as_ref())?.encode_histogram::<NoLabelSet>(
                    h.sum as f64 / per_unit,
                    h.count,
                    &h.buckets,
                    None,
                )?;
            }
        }

        let tcp = self.tcp.snapshot();
        let counters: [(&str, &str, TcpField); 4] = [
            ("istio_tcp_connections_opened", "TCP connections opened.", |s| &s.opened),
            ("istio_tcp_connections_closed", "TCP connections closed.", |s| &s.closed),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent to the client (server to client) on TCP connections, counted when they close.",
                |s| &s.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the client (client to server) on TCP connections, counted when they close.",
                |s| &s.received,
            ),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (key, series) in &tcp {
                let v = value(series).load(Relaxed);
                family.encode_family(key.as_ref())?.encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
            }
        }
        Ok(())
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.encode_families(&mut encoder)
    }
}

/// Expires the series of departed workloads for as long as sluice runs: every
/// [`SeriesLimits::sweep_interval`], against the workloads of the current model (recomputed
/// when the model changes). A control-path task: it takes no lock the data path holds for
/// longer than the removal of the expired series.
pub async fn expire_series(telemetry: SharedTelemetry, model: Arc<ArcSwap<Model>>) {
    let metrics = &telemetry.metrics;
    let mut tick = tokio::time::interval(metrics.limits.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<(u64, LiveWorkloads)> = None;
    loop {
        tick.tick().await;
        let current = model.load();
        let generation = current.generation();
        if seen.as_ref().is_none_or(|(g, _)| *g != generation) {
            seen = Some((generation, LiveWorkloads::of(&current)));
        }
        let Some((_, live)) = &seen else { continue };
        let removed = metrics.expire(live, Instant::now());
        if removed > 0 {
            debug!(removed, "metric series of departed workloads expired");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        time::{Duration, SystemTime},
    };

    use http::Method;
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::telemetry::ServiceRef;

    fn workload(ns: &str, name: &str, app: &str) -> WorkloadInfo {
        WorkloadInfo {
            namespace: ns.into(),
            workload: name.into(),
            pod: format!("{name}-abc").into(),
            app: app.into(),
            version: "v1".into(),
            canonical_service: app.into(),
            canonical_revision: "v1".into(),
            service_account: "default".into(),
        }
    }

    struct Req<'a> {
        reporter: Reporter,
        status: u16,
        grpc: Option<u16>,
        mtls: bool,
        service: Option<ServiceRef<'a>>,
        dst: Option<&'a WorkloadInfo>,
        ms: u64,
    }

    fn record(m: &Metrics, src: &WorkloadInfo, r: Req<'_>) {
        let method = Method::GET;
        let addr: SocketAddr = "10.0.0.1:1234".parse().unwrap();
        let rec = RequestRecord {
            reporter: r.reporter,
            start: SystemTime::now(),
            duration: Duration::from_millis(r.ms),
            source: Peer {
                workload: Some(src),
                principal: Some("spiffe://cluster.local/ns/shop/sa/client"),
                addr: Some(addr),
            },
            destination: Peer {
                workload: r.dst,
                principal: r.dst.map(|_| "spiffe://cluster.local/ns/shop/sa/web"),
                addr: Some(addr),
            },
            service: r.service,
            protocol: if r.grpc.is_some() { "grpc" } else { "http" },
            method: &method,
            authority: "web",
            path: "/x?y=z",
            status: r.status,
            grpc_status: r.grpc,
            response_flags: "-",
            request_bytes: 10,
            response_bytes: 700,
            upstream: Some(addr),
            mtls: r.mtls,
            trace_id: None,
            request_id: None,
            access_log: false,
        };
        m.on_request(&rec);
    }

    /// Scrapes metrics the test keeps using.
    #[derive(Debug)]
    struct Shared(Arc<Metrics>);

    impl Collector for Shared {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            self.0.encode_families(&mut encoder)
        }
    }

    fn scrape_ref(m: &Arc<Metrics>) -> String {
        let mut out = String::new();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Shared(m.clone())));
        encode(&mut out, &registry).unwrap();
        out
    }

    fn scrape(m: Metrics) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(m));
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn requests_are_counted_per_label_set_with_istio_labels() {
        let m = Metrics::default();
        let client = workload("shop", "client", "client");
        let web = workload("shop", "web", "web");
        let svc = Some(ServiceRef { namespace: "shop", name: "web" });
        for i in 0..5 {
            record(
                &m,
                &client,
                Req {
                    reporter: Reporter::Source,
                    status: 200,
                    grpc: None,
                    mtls: true,
                    service: svc,
                    dst: Some(&web),
                    ms: i,
                },
            );
        }
        record(
            &m,
            &client,
            Req {
                reporter: Reporter::Source,
                status: 503,
                grpc: None,
                mtls: true,
                service: svc,
                dst: Some(&web),
                ms: 3,
            },
        );
        record(
            &m,
            &client,
            Req {
                reporter: Reporter::Destination,
                status: 200,
                grpc: Some(14),
                mtls: true,
                service: svc,
                dst: Some(&web),
                ms: 3,
            },
        );
        // An external destination: no service, no workload, plaintext.
        record(
            &m,
            &client,
            Req {
                reporter: Reporter::Source,
                status: 200,
                grpc: None,
                mtls: false,
                service: None,
                dst: None,
                ms: 3000,
            },
        );
        assert_eq!(m.series(), (4, 0));
        let text = scrape(m);
        let line = |needle: &[&str]| -> Vec<String> {
            text.lines().filter(|l| needle.iter().all(|n| l.contains(n))).map(str::to_string).collect()
        };
        let ok = line(&[
            "istio_requests_total{",
            "response_code=\"200\"",
            "reporter=\"source\"",
            "destination_service=\"web.shop.svc.cluster.local\"",
        ]);
        assert_eq!(ok.len(), 1, "{text}");
        assert!(ok[0].ends_with(" 5"), "{}", ok[0]);
        for l in [
            "source_workload=\"client\"",
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"",
            "destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\"",
            "source_cluster=\"Kubernetes\"",
            "destination_service_name=\"web\"",
            "destination_service_namespace=\"shop\"",
            "request_protocol=\"http\"",
            "grpc_response_status=\"\"",
            "connection_security_policy=\"unknown\"",
            "response_flags=\"-\"",
        ] {
            assert!(ok[0].contains(l), "{l} missing in {}", ok[0]);
        }
        let grpc = line(&["istio_requests_total{", "reporter=\"destination\""]);
        assert!(
            grpc[0].contains("grpc_response_status=\"14\"") && grpc[0].contains("request_protocol=\"grpc\"")
        );
        assert!(grpc[0].contains("connection_security_policy=\"mutual_tls\""), "{}", grpc[0]);
        let ext = line(&["istio_requests_total{", "destination_service=\"unknown\""]);
        assert_eq!(ext.len(), 1, "{text}");
        for l in [
            "destination_workload=\"unknown\"",
            "source_principal=\"unknown\"",
            "destination_canonical_revision=\"latest\"",
            "destination_cluster=\"unknown\"",
        ] {
            assert!(ext[0].contains(l), "{l} missing in {}", ext[0]);
        }
        // Histograms: the count equals the counter, buckets are cumulative, sums are right.
        let count = line(&[
            "istio_request_duration_milliseconds_count{",
            "response_code=\"200\"",
            "reporter=\"source\"",
            "web.shop",
        ]);
        assert!(count[0].ends_with(" 5"), "{count:?}");
        let sum = line(&[
            "istio_request_duration_milliseconds_sum{",
            "response_code=\"200\"",
            "reporter=\"source\"",
            "web.shop",
        ]);
        assert!(sum[0].ends_with(" 10.0"), "{sum:?}"); // 0+1+2+3+4 ms
        let le1 = line(&[
            "istio_request_duration_milliseconds_bucket{",
            "response_code=\"200\"",
            "reporter=\"source\"",
            "web.shop",
            "le=\"1.0\"",
        ]);
        assert!(le1[0].ends_with(" 2"), "{le1:?}"); // 0 and 1 ms
        let inf = line(&["istio_response_bytes_bucket{", "le=\"+Inf\"", "response_code=\"503\""]);
        assert!(inf[0].ends_with(" 1"), "{inf:?}");
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("/x?y=z") && !text.contains("10.0.0.1"), "no paths or addresses in labels");
    }

    #[test]
    fn tcp_connections_carry_bytes_and_no_http_labels() {
        let m = Metrics::default();
        let client = workload("shop", "client", "client");
        let echo = workload("shop", "echo", "echo");
        let rec = |reporter, sent, received| ConnRecord {
            reporter,
            start: SystemTime::now(),
            duration: Duration::from_millis(5),
            source: Peer {
                workload: Some(&client),
                principal: Some("spiffe://cluster.local/ns/shop/sa/client"),
                addr: None,
            },
            destination: Peer {
                workload: Some(&echo),
                principal: Some("spiffe://cluster.local/ns/shop/sa/echo"),
                addr: None,
            },
            service: Some(ServiceRef { namespace: "shop", name: "echo" }),
            sent,
            received,
            mtls: true,
            response_flags: "-",
            access_log: false,
        };
        m.on_connection_opened(&rec(Reporter::Destination, 0, 0));
        m.on_connection_closed(&rec(Reporter::Destination, 300, 100));
        m.on_connection_opened(&rec(Reporter::Destination, 0, 0));
        m.on_connection_closed(&rec(Reporter::Destination, 30, 10));
        let text = scrape(m);
        let sent: Vec<&str> = text.lines().filter(|l| l.starts_with("istio_tcp_sent_bytes_total{")).collect();
        assert_eq!(sent.len(), 1, "{text}");
        assert!(sent[0].ends_with(" 330") && sent[0].contains("request_protocol=\"tcp\""), "{}", sent[0]);
        assert!(
            !sent[0].contains("response_code") && !sent[0].contains("grpc_response_status"),
            "{}",
            sent[0]
        );
        assert!(sent[0].contains("connection_security_policy=\"mutual_tls\""));
        assert!(text
            .lines()
            .any(|l| l.starts_with("istio_tcp_received_bytes_total{") && l.ends_with(" 110")));
        assert!(text
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{") && l.ends_with(" 2")));
        assert!(text
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{") && l.ends_with(" 2")));
    }

    fn ok_to(m: &Metrics, src: &WorkloadInfo, dst: Option<&WorkloadInfo>, status: u16) {
        record(
            m,
            src,
            Req {
                reporter: Reporter::Source,
                status,
                grpc: None,
                mtls: true,
                service: Some(ServiceRef { namespace: "shop", name: "web" }),
                dst,
                ms: 1,
            },
        );
    }

    fn live(workloads: &[&str]) -> LiveWorkloads {
        let mut live = LiveWorkloads::default();
        for w in workloads {
            live.insert("shop", w.to_string());
        }
        live
    }

    /// `istio_requests_total` of the series from `src` to `dst` (0 when there is none).
    fn requests_between(text: &str, src: &str, dst: &str) -> u64 {
        let (s, d) = (format!("source_workload=\"{src}\""), format!("destination_workload=\"{dst}\""));
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&s) && l.contains(&d))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    #[test]
    fn series_of_departed_workloads_expire_after_the_grace_period() {
        let grace = Duration::from_secs(60);
        let m = Arc::new(Metrics::with_limits(SeriesLimits {
            max_series: 100,
            grace,
            max_series_per_workload: 100,
        }));
        let [client, web, db, batch] = ["client", "web", "db", "batch"].map(|w| workload("shop", w, w));
        ok_to(&m, &client, Some(&web), 200);
        ok_to(&m, &client, Some(&db), 200);
        ok_to(&m, &batch, Some(&db), 200);
        ok_to(&m, &batch, Some(&web), 200);
        // From db to an address outside the mesh: only one side is a workload.
        ok_to(&m, &db, None, 200);
        assert_eq!(m.series(), (5, 0));
        let t0 = Instant::now();
        assert_eq!(m.expire(&live(&["client", "web", "db", "batch"]), t0), 0);

        // db and batch leave; client and web stay.
        let after = live(&["client", "web"]);
        assert_eq!(m.expire(&after, t0 + Duration::from_secs(1)), 0, "marked, not removed");
        assert_eq!(m.expire(&after, t0 + Duration::from_secs(60)), 0, "grace counts from the mark");
        // A late record of a marked series still counts until the series goes.
        ok_to(&m, &batch, Some(&db), 200);
        assert_eq!(m.expire(&after, t0 + Duration::from_secs(61)), 2, "batch → db and db → outside");
        assert_eq!((m.series(), m.expired()), ((3, 0), 2));
        let text = scrape_ref(&m);
        assert_eq!(requests_between(&text, "batch", "db"), 0, "{text}");
        assert_eq!(requests_between(&text, "db", "unknown"), 0, "{text}");
        // Series with one live side stay, however long the other side is gone.
        assert_eq!(requests_between(&text, "client", "db"), 1, "{text}");
        assert_eq!(requests_between(&text, "batch", "web"), 1, "{text}");
        assert_eq!(m.expire(&after, t0 + Duration::from_secs(3600)), 0);

        // A workload that comes back within the grace period keeps its series.
        let t1 = t0 + Duration::from_secs(4000);
        let without_web = live(&["client"]);
        let only_db = live(&["db"]);
        assert_eq!(m.expire(&only_db, t1), 0, "client → db stays; client → web and batch → web marked");
        assert_eq!(m.expire(&live(&["client", "web"]), t1 + Duration::from_secs(30)), 0, "marks cleared");
        assert_eq!(m.expire(&without_web, t1 + Duration::from_secs(61)), 0, "marked again, from now");
        assert_eq!(m.expire(&without_web, t1 + Duration::from_secs(120)), 0);
        assert_eq!(m.expire(&without_web, t1 + Duration::from_secs(121)), 1, "batch → web");
        assert_eq!(m.series(), (2, 0));

        // A series that went and comes back starts from zero (a counter reset to Prometheus).
        ok_to(&m, &batch, Some(&db), 200);
        assert_eq!(requests_between(&scrape_ref(&m), "batch", "db"), 1);
        assert_eq!(m.expired(), 3);
    }

    #[test]
    fn tcp_series_expire_like_request_series() {
        let m = Metrics::with_limits(SeriesLimits {
            max_series: 100,
            grace: Duration::ZERO,
            max_series_per_workload: 100,
        });
        let [job, db] = ["job", "db"].map(|w| workload("shop", w, w));
        let rec = ConnRecord {
            reporter: Reporter::Destination,
            start: SystemTime::now(),
            duration: Duration::from_millis(5),
            source: Peer { workload: Some(&job), principal: None, addr: None },
            destination: Peer { workload: Some(&db), principal: None, addr: None },
            service: None,
            sent: 1,
            received: 2,
            mtls: false,
            response_flags: "-",
            access_log: false,
        };
        m.on_connection_opened(&rec);
        m.on_connection_closed(&rec);
        assert_eq!(m.series(), (0, 1));
        let t0 = Instant::now();
        assert_eq!(m.expire(&live(&["db"]), t0), 0);
        assert_eq!(
            m.expire(&live(&[]), t0),
            1,
            "a zero grace removes at the first sweep that finds it orphaned"
        );
        assert_eq!(m.series(), (0, 0));
    }

    #[test]
    fn the_series_cap_refuses_new_label_sets_and_counts_them() {
        let m = Arc::new(Metrics::with_limits(SeriesLimits {
            max_series: 3,
            grace: Duration::ZERO,
            max_series_per_workload: 100,
        }));
        let [client, web, gone] = ["client", "web", "gone"].map(|w| workload("shop", w, w));
        for status in [200, 201, 202] {
            ok_to(&m, &client, Some(&web), status);
        }
        assert_eq!((m.series(), m.dropped()), ((3, 0), 0));
        // A fourth label set is refused and counted, every time it comes.
        ok_to(&m, &client, Some(&web), 203);
        ok_to(&m, &client, Some(&web), 203);
        assert_eq!((m.series(), m.dropped()), ((3, 0), 2));
        // Label sets already kept are still counted.
        ok_to(&m, &client, Some(&web), 200);
        assert_eq!(m.dropped(), 2);
        let text = scrape_ref(&m);
        assert!(!text.contains("response_code=\"203\""), "{text}");
        assert_eq!(requests_between(&text, "client", "web"), 4);
        // TCP series share the cap.
        let rec = ConnRecord {
            reporter: Reporter::Source,
            start: SystemTime::now(),
            duration: Duration::from_millis(5),
            source: Peer { workload: Some(&client), principal: None, addr: None },
            destination: Peer { workload: Some(&gone), principal: None, addr: None },
            service: None,
            sent: 1,
            received: 2,
            mtls: false,
            response_flags: "-",
            access_log: false,
        };
        m.on_connection_opened(&rec);
        assert_eq!((m.series(), m.dropped()), ((3, 0), 3));

        // Expiry frees places: then new label sets are kept again.
        ok_to(&m, &gone, None, 200); // refused: the cap is still full
        assert_eq!(m.dropped(), 4);
        assert_eq!(m.expire(&live(&["client"]), Instant::now()), 0, "every series has client");
        assert_eq!(m.expire(&live(&["gone"]), Instant::now()), 3, "client and web left");
        m.on_connection_opened(&rec);
        ok_to(&m, &gone, None, 200);
        assert_eq!((m.series(), m.dropped()), ((1, 1), 4));
    }

    fn call(m: &Metrics, src: &WorkloadInfo, dst: &WorkloadInfo, status: u16, grpc: Option<u16>) {
        record(
            m,
            src,
            Req {
                reporter: Reporter::Source,
                status,
                grpc,
                mtls: true,
                service: Some(ServiceRef { namespace: &dst.namespace, name: &dst.workload }),
                dst: Some(dst),
                ms: 1,
            },
        );
    }

    #[test]
    fn statuses_outside_the_standard_sets_are_bucketed() {
        let m = Arc::new(Metrics::default());
        let [client, web] = ["client", "web"].map(|w| workload("shop", w, w));
        for (status, grpc) in [
            (200, None),
            (299, None),
            (499, None),
            (599, None),
            (999, None),
            (0, None),
            (200, Some(14)),
            (200, Some(17)),
            (200, Some(u16::MAX)),
        ] {
            call(&m, &client, &web, status, grpc);
        }
        // 200, 2xx, 4xx, 5xx, other and 0 over HTTP; 14 and "other" (17 and 65535) over gRPC.
        assert_eq!(m.series(), (8, 0));
        let text = scrape_ref(&m);
        let http = |code: &str| {
            text.lines().any(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("response_code=\"{code}\""))
                    && l.contains("request_protocol=\"http\"")
            })
        };
        for code in ["200", "2xx", "4xx", "5xx", "other", "0"] {
            assert!(http(code), "response_code {code} missing:\n{text}");
        }
        for code in ["299", "499", "599", "999"] {
            assert!(!text.contains(&format!("response_code=\"{code}\"")), "{code} is not a label value");
        }
        for grpc in ["14", "other"] {
            assert!(
                text.contains(&format!("grpc_response_status=\"{grpc}\"")),
                "gRPC {grpc} missing:\n{text}"
            );
        }
        // The registry, its unused entries, and the classes around them.
        for (status, label) in [
            (103, StatusLabel::Code(103)),
            (226, StatusLabel::Code(226)),
            (306, StatusLabel::Class(3)),
            (418, StatusLabel::Class(4)),
            (429, StatusLabel::Code(429)),
            (509, StatusLabel::Class(5)),
            (511, StatusLabel::Code(511)),
            (99, StatusLabel::Other),
            (600, StatusLabel::Other),
        ] {
            assert_eq!(StatusLabel::http(status), label, "{status}");
        }
        assert_eq!(
            (StatusLabel::grpc(16), StatusLabel::grpc(17)),
            (StatusLabel::Code(16), StatusLabel::Other)
        );
    }

    /// One workload talking to its own server, which answers with every HTTP status and gRPC
    /// status there is: its series are bounded (buckets, then its share of the cap), the
    /// refusals are counted, and another workload's new series are all kept.
    #[test]
    fn ten_thousand_statuses_from_one_workload_leave_room_for_the_others() {
        let limits = SeriesLimits { max_series: 400, grace: Duration::ZERO, max_series_per_workload: 100 };
        let m = Arc::new(Metrics::with_limits(limits));
        let [evil, evil_server] = ["evil", "evil-server"].map(|w| workload("tenant", w, w));
        let unbounded = Metrics::with_limits(SeriesLimits {
            max_series: 1_000_000,
            max_series_per_workload: 1_000_000,
            ..limits
        });
        for i in 0..10_000u32 {
            let status = 100 + (i % 900) as u16;
            // Plain HTTP first, then gRPC with statuses 0 to 19 as well.
            let grpc = (i >= 5_000).then_some(((i / 900 + i) % 20) as u16);
            call(&m, &evil, &evil_server, status, grpc);
            call(&unbounded, &evil, &evil_server, status, grpc);
        }
        // The buckets alone: each HTTP status label (registered codes, 5 classes, "other") once
        // over HTTP and at most with each of the 18 gRPC labels.
        let status_labels = (100..=599).filter(|s| is_registered_status(*s)).count() + 6;
        let (alone, _) = unbounded.series();
        assert!(alone <= status_labels * 19, "{alone} series from buckets alone");
        assert!(alone > 100, "{alone}: the share below must be what bounds the rest");
        assert_eq!(m.series(), (100, 0), "the workload's share");
        assert_eq!(m.workload_dropped() as usize, 10_000 - count_kept(&m));
        assert_eq!(m.dropped(), 0, "the node-wide cap was never reached");

        // Another workload's new series are all kept.
        let [client, web] = ["client", "web"].map(|w| workload("shop", w, w));
        for status in [200, 201, 404, 503] {
            call(&m, &client, &web, status, None);
        }
        assert_eq!(m.series(), (104, 0));
        let text = scrape_ref(&m);
        assert_eq!(requests_between(&text, "client", "web"), 4);

        // A series from outside the mesh is charged to the destination workload.
        let rec_from_outside = |status| RequestRecord {
            reporter: Reporter::Destination,
            start: SystemTime::now(),
            duration: Duration::from_millis(1),
            source: Peer { workload: None, principal: None, addr: None },
            destination: Peer { workload: Some(&evil_server), principal: None, addr: None },
            service: None,
            protocol: "http",
            method: &Method::GET,
            authority: "x",
            path: "/",
            status,
            grpc_status: None,
            response_flags: "-",
            request_bytes: 0,
            response_bytes: 0,
            upstream: None,
            mtls: false,
            trace_id: None,
            request_id: None,
            access_log: false,
        };
        for status in [200, 404] {
            m.on_request(&rec_from_outside(status));
        }
        assert_eq!(m.series(), (106, 0), "evil-server's own share is untouched by evil's");

        // The tenant's workloads leave: expiry (no grace here) gives their shares back.
        assert_eq!(m.expire(&live(&["client", "web"]), Instant::now()), 102);
        let dropped = m.workload_dropped();
        for status in [200, 404] {
            call(&m, &evil, &evil_server, status, None);
        }
        assert_eq!((m.series(), m.workload_dropped()), ((6, 0), dropped));
    }

    /// Requests counted in Istio's metrics (every series' `istio_requests_total`).
    fn count_kept(m: &Arc<Metrics>) -> usize {
        scrape_ref(m)
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<usize>().unwrap())
            .sum()
    }

    #[test]
    fn live_workloads_come_from_every_pod_of_the_model_by_owner() {
        let pod = |name: &str, ns: &str, node: &str, ip: &str, meta: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: u-{name}\n{meta}spec:\n  nodeName: {node}\nstatus:\n  podIP: {ip}\n"
            )
        };
        let sts = "  ownerReferences:\n  - kind: StatefulSet\n    name: db\n    controller: true\n";
        let job = "  ownerReferences:\n  - kind: Job\n    name: report-28901234\n    controller: true\n";
        let text = [
            pod("db-0", "shop", "n1", "10.0.0.1", sts),
            pod("db-1", "shop", "n2", "10.0.0.2", sts),
            pod("report-28901234-x7k2p", "shop", "n2", "10.0.0.3", job),
            pod("toolbox", "ops", "n1", "10.0.0.4", "  labels:\n    app: toolbox\n"),
        ]
        .join("---\n");
        let model = Model::from_manifest(&text, crate::discovery::Format::Yaml).unwrap();
        let live = LiveWorkloads::of(&model);
        assert!(
            live.contains("shop", "db") && live.contains("shop", "report") && live.contains("ops", "toolbox")
        );
        for (ns, name) in [("shop", "db-0"), ("shop", "report-28901234"), ("ops", "db"), ("shop", "toolbox")]
        {
            assert!(!live.contains(ns, name), "{ns}/{name}");
        }
    }

    #[test]
    fn the_sweep_interval_follows_the_grace_period() {
        let every = |s| {
            SeriesLimits { max_series: 1, grace: Duration::from_secs(s), max_series_per_workload: 1 }
                .sweep_interval()
        };
        assert_eq!(every(300), Duration::from_secs(15));
        assert_eq!(every(20), Duration::from_secs(5));
        assert_eq!(every(0), Duration::from_millis(250));
    }

    #[test]
    fn helpers() {
        assert_eq!(principal_namespace("spiffe://cluster.local/ns/shop/sa/web"), Some("shop"));
        assert_eq!(principal_namespace("unknown"), None);
        assert_eq!(itoa(0, &mut [0; 5]), "0");
        assert_eq!(itoa(503, &mut [0; 5]), "503");
        assert_eq!(itoa(u16::MAX, &mut [0; 5]), "65535");
        let h = Histogram::default();
        for v in [0.0, 0.5, 0.6, 1e9] {
            h.observe(v, 1);
        }
        let s = h.snapshot();
        assert_eq!((s.buckets[0].1, s.buckets[1].1, s.buckets[SLOTS - 1].1, s.count, s.sum), (2, 1, 1, 4, 4));
    }
}
