//! `sluice stat`: rolling windows of request counts, successes and latencies, per pod and per
//! Service, for both directions.
//!
//! Keys:
//! - pods: `namespace/pod` of the pod on *this* node that the record is about: the source pod
//!   for `reporter=source` records (its outbound traffic), the destination pod for
//!   `reporter=destination` records (its inbound traffic);
//! - services: the Service the request was addressed to, `namespace/name`, outbound
//!   (`reporter=source`, what this node's clients sent to it) and inbound
//!   (`reporter=destination`, what this node's endpoints of it received).
//!
//! Each key and direction keeps a ring of one-second slots over the last [`MAX_WINDOW_S`]
//! seconds: requests, successes, and a latency histogram. A request is a success as Linkerd
//! counts it: an HTTP status below 500 (a response came: status 0, a reset stream, is a
//! failure) and a gRPC status absent or 0 (OK).
//!
//! The latency histogram is log-linear (HdrHistogram-like): exact below 32 µs, then 16 linear
//! sub-buckets per power of two, so a bucket is at most 1/16 of its lower bound wide and a
//! percentile read at the bucket's midpoint is within about 3 % of the true value. Values are
//! clamped at about 35 minutes.
//!
//! Data-path cost: a lock-free map lookup (an `ArcSwap` snapshot of the keys; a new key copies
//! the map once), then a short mutex per key and direction. Slots and histograms are allocated
//! once per key (a histogram on the slot's first request) and reused as the ring turns.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use super::{Reporter, RequestRecord, TelemetryConfig};

/// The longest window `sluice stat` can ask for, in seconds (the ring's length).
pub const MAX_WINDOW_S: u64 = 60;

const SLOTS: usize = MAX_WINDOW_S as usize;

/// Whether a request counts as a success (Linkerd's definition): a response with an HTTP status
/// below 500, and no gRPC status other than OK.
pub fn is_success(status: u16, grpc_status: Option<u16>) -> bool {
    status != 0 && status < 500 && grpc_status.is_none_or(|g| g == 0)
}

// --- Latency histogram ---------------------------------------------------------------------

/// Values below this are counted exactly (one bucket per microsecond).
const LINEAR: u64 = 32;
/// Sub-buckets per power of two above [`LINEAR`].
const SUB: u64 = 16;
/// Largest value kept apart (µs, ~35 min); larger values count in the last bucket.
const MAX_US: u64 = (1 << 31) - 1;
/// Number of buckets: 32 exact ones, then 16 per power of two from 2^5 to 2^30.
pub const BUCKETS: usize = (LINEAR + (31 - 5) * SUB) as usize;

fn bucket_of(us: u64) -> usize {
    let v = us.min(MAX_US);
    if v < LINEAR {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros() as u64; // ≥ 5
    let shift = msb - 4; // v >> shift is in [16, 32)
    (LINEAR + (shift - 1) * SUB + ((v >> shift) - SUB)) as usize
}

/// The lower bound and width (µs) of bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < LINEAR {
        return (i, 1);
    }
    let j = i - LINEAR;
    let shift = j / SUB + 1;
    ((j % SUB + SUB) << shift, 1 << shift)
}

/// A latency histogram in microseconds (see the module docs for its precision).
#[derive(Clone)]
pub struct LatencyHistogram {
    counts: Box<[u32; BUCKETS]>,
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { counts: Box::new([0; BUCKETS]), total: 0 }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram").field("total", &self.total).finish()
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, latency: Duration) {
        self.record_us(latency.as_micros().min(u64::MAX as u128) as u64);
    }

    pub fn record_us(&mut self, us: u64) {
        let b = &mut self.counts[bucket_of(us)];
        *b = b.saturating_add(1);
        self.total += 1;
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.total = 0;
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
    }

    /// The `q` quantile (0..=1) in milliseconds (the midpoint of its bucket); `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                let (lower, width) = bucket_range(i);
                return Some((lower as f64 + width as f64 / 2.0) / 1000.0);
            }
        }
        let (lower, width) = bucket_range(BUCKETS - 1);
        Some((lower as f64 + width as f64 / 2.0) / 1000.0)
    }

    pub fn percentiles(&self) -> LatencyView {
        LatencyView { p50: self.quantile_ms(0.5), p95: self.quantile_ms(0.95), p99: self.quantile_ms(0.99) }
    }
}

// --- The rings -----------------------------------------------------------------------------

#[derive(Default)]
struct Slot {
    /// The second (since [`Stats`] started) this slot holds.
    sec: u64,
    requests: u64,
    successes: u64,
    /// Allocated on the slot's first request, then reused.
    hist: Option<LatencyHistogram>,
}

struct Ring {
    slots: Vec<Slot>,
    /// The second of the latest request.
    last: u64,
}

impl Ring {
    fn new(now: u64) -> Ring {
        Ring { slots: (0..SLOTS).map(|_| Slot { sec: u64::MAX, ..Slot::default() }).collect(), last: now }
    }

    fn record(&mut self, sec: u64, success: bool, latency: Duration) {
        let slot = &mut self.slots[(sec % SLOTS as u64) as usize];
        if slot.sec != sec {
            slot.sec = sec;
            slot.requests = 0;
            slot.successes = 0;
            if let Some(h) = &mut slot.hist {
                h.clear();
            }
        }
        slot.requests += 1;
        slot.successes += u64::from(success);
        slot.hist.get_or_insert_with(LatencyHistogram::default).record(latency);
        self.last = self.last.max(sec);
    }

    /// Sums the slots of seconds `from..=to`.
    fn sum(&self, from: u64, to: u64) -> (u64, u64, LatencyHistogram) {
        let mut hist = LatencyHistogram::default();
        let (mut requests, mut successes) = (0, 0);
        for s in &self.slots {
            if s.sec != u64::MAX && s.sec >= from && s.sec <= to && s.requests > 0 {
                requests += s.requests;
                successes += s.successes;
                if let Some(h) = &s.hist {
                    hist.merge(h);
                }
            }
        }
        (requests, successes, hist)
    }
}

/// One key's rings: outbound (`reporter=source`) and inbound (`reporter=destination`).
struct Series {
    dirs: [Mutex<Ring>; 2],
}

impl Series {
    /// A new key's series, fresh at second `now` (not stale before its first request lands).
    fn new(now: u64) -> Series {
        Series { dirs: [Mutex::new(Ring::new(now)), Mutex::new(Ring::new(now))] }
    }

    fn record(&self, reporter: Reporter, sec: u64, success: bool, latency: Duration) {
        let i = match reporter {
            Reporter::Source => 0,
            Reporter::Destination => 1,
        };
        self.dirs[i].lock().unwrap_or_else(|e| e.into_inner()).record(sec, success, latency);
    }

    fn last(&self) -> u64 {
        self.dirs.iter().map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).last).max().unwrap_or(0)
    }
}

/// namespace → name → series. Looked up twice per request (pod, Service): foldhash
/// (hashbrown's default, seeded per process) instead of SipHash; the keys are names of pods
/// and Services from the API server, not a client's input.
type Index = hashbrown::HashMap<Arc<str>, hashbrown::HashMap<Arc<str>, Arc<Series>>>;

/// The series of one kind of key (pods or services).
struct Keyed {
    index: ArcSwap<Index>,
    /// Serializes writers of `index` (new keys, eviction).
    write: Mutex<()>,
}

impl Keyed {
    fn new() -> Keyed {
        Keyed { index: ArcSwap::from_pointee(Index::new()), write: Mutex::new(()) }
    }

    /// The series of a key, created on its first request. Creating one also drops the keys
    /// idle for the whole ring, so pods and Services that come and go do not accumulate.
    fn series(&self, namespace: &str, name: &str, now: u64) -> Arc<Series> {
        if let Some(s) = self.index.load().get(namespace).and_then(|m| m.get(name)) {
            return s.clone();
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.index.load_full();
        if let Some(s) = current.get(namespace).and_then(|m| m.get(name)) {
            return s.clone();
        }
        let mut next = without_stale(&current, now);
        let s = Arc::new(Series::new(now));
        next.entry(Arc::from(namespace)).or_default().insert(Arc::from(name), s.clone());
        self.index.store(Arc::new(next));
        s
    }

    /// Drops keys without a request in the whole ring (the view of them would be empty).
    fn evict(&self, now: u64) {
        let oldest = (now + 1).saturating_sub(SLOTS as u64);
        let current = self.index.load_full();
        if !current.values().flat_map(|m| m.values()).any(|s| s.last() < oldest) {
            return;
        }
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let next = without_stale(&self.index.load_full(), now);
        self.index.store(Arc::new(next));
    }
}

/// A copy of `index` without the keys idle for the whole ring at second `now`.
fn without_stale(index: &Index, now: u64) -> Index {
    let oldest = (now + 1).saturating_sub(SLOTS as u64);
    let mut next = Index::with_capacity(index.len());
    for (ns, names) in index {
        let kept: hashbrown::HashMap<_, _> =
            names.iter().filter(|(_, s)| s.last() >= oldest).map(|(k, v)| (k.clone(), v.clone())).collect();
        if !kept.is_empty() {
            next.insert(ns.clone(), kept);
        }
    }
    next
}

/// What `sluice stat` counts: the rolling windows of every pod on this node and every Service
/// its traffic was for.
pub struct Stats {
    epoch: Instant,
    pods: Keyed,
    services: Keyed,
}

impl Stats {
    pub fn new(_cfg: &TelemetryConfig) -> Stats {
        Stats { epoch: Instant::now(), pods: Keyed::new(), services: Keyed::new() }
    }

    pub fn on_request(&self, rec: &RequestRecord<'_>) {
        self.record_at(rec, Instant::now());
    }

    fn record_at(&self, rec: &RequestRecord<'_>, now: Instant) {
        let sec = now.saturating_duration_since(self.epoch).as_secs();
        let success = is_success(rec.status, rec.grpc_status);
        let local = match rec.reporter {
            Reporter::Source => rec.source.workload,
            Reporter::Destination => rec.destination.workload,
        };
        if let Some(w) = local {
            self.pods.series(&w.namespace, &w.pod, sec).record(rec.reporter, sec, success, rec.duration);
        }
        if let Some(svc) = rec.service {
            self.services.series(svc.namespace, svc.name, sec).record(
                rec.reporter,
                sec,
                success,
                rec.duration,
            );
        }
    }

    /// The rows of `kind` over the last `window` (1 s to [`MAX_WINDOW_S`]), only keys with
    /// requests in it; `name` keeps one key (`namespace/name`, or a name in any namespace).
    pub fn view(&self, kind: StatKind, window: Duration, name: Option<&str>) -> StatView {
        self.view_at(kind, window, name, Instant::now())
    }

    fn view_at(&self, kind: StatKind, window: Duration, name: Option<&str>, now: Instant) -> StatView {
        let window_s = window.as_secs().clamp(1, MAX_WINDOW_S);
        let since = now.saturating_duration_since(self.epoch);
        let now_sec = since.as_secs();
        let from = (now_sec + 1).saturating_sub(window_s);
        // The slots cover `window_s - 1` whole seconds and the current partial one; the rate
        // is over that time (and never over more than sluice has been up).
        let covered =
            ((window_s - 1) as f64 + since.subsec_nanos() as f64 / 1e9).min(since.as_secs_f64()).max(0.001);
        let keyed = match kind {
            StatKind::Pods => &self.pods,
            StatKind::Services => &self.services,
        };
        keyed.evict(now_sec);
        let (want_ns, want_name) = match name {
            Some(n) => match n.split_once('/') {
                Some((ns, n)) => (Some(ns), Some(n)),
                None => (None, Some(n)),
            },
            None => (None, None),
        };
        let index = keyed.index.load_full();
        let mut rows = Vec::new();
        for (ns, names) in index.iter() {
            if want_ns.is_some_and(|w| w != &**ns) {
                continue;
            }
            for (n, series) in names {
                if want_name.is_some_and(|w| w != &**n) {
                    continue;
                }
                let dir = |i: usize| {
                    let (requests, successes, hist) =
                        series.dirs[i].lock().unwrap_or_else(|e| e.into_inner()).sum(from, now_sec);
                    (requests > 0).then(|| DirectionStats {
                        requests,
                        successes,
                        failures: requests - successes,
                        success_rate: successes as f64 / requests as f64,
                        rps: requests as f64 / covered,
                        latency_ms: hist.percentiles(),
                    })
                };
                let (outbound, inbound) = (dir(0), dir(1));
                if outbound.is_none() && inbound.is_none() {
                    continue;
                }
                rows.push(StatRow {
                    name: format!("{ns}/{n}"),
                    namespace: ns.to_string(),
                    outbound,
                    inbound,
                });
            }
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        StatView { kind, window_s, rows }
    }
}

// --- The admin API's document (`GET /stat`) ------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatKind {
    Pods,
    Services,
}

impl StatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StatKind::Pods => "pods",
            StatKind::Services => "services",
        }
    }
}

impl std::str::FromStr for StatKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pods" | "pod" | "po" => Ok(StatKind::Pods),
            "services" | "service" | "svc" => Ok(StatKind::Services),
            other => Err(format!("unknown kind {other:?}: pods or services")),
        }
    }
}

/// `GET /stat?kind=pods|services&window=1m[&name=ns/name]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatView {
    pub kind: StatKind,
    /// The window the numbers are over, in seconds.
    pub window_s: u64,
    /// Keys with requests in the window, by name.
    pub rows: Vec<StatRow>,
}

/// One pod or Service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatRow {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    /// `reporter=source`: requests sent by the pod (pods), or sent to the Service by this
    /// node's pods (services). `null` without requests in the window.
    pub outbound: Option<DirectionStats>,
    /// `reporter=destination`: requests received by the pod (pods), or by this node's
    /// endpoints of the Service (services). `null` without requests in the window.
    pub inbound: Option<DirectionStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectionStats {
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    /// successes / requests (0 to 1).
    pub success_rate: f64,
    /// Requests per second over the window (or over sluice's uptime when shorter).
    pub rps: f64,
    pub latency_ms: LatencyView,
}

/// Latency percentiles in milliseconds (`null` without requests).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyView {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// Parses a window: `10s`, `1m`, `90` (seconds); 1 s to [`MAX_WINDOW_S`].
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.strip_suffix('s') {
        Some(n) => (n, 1),
        None => match s.strip_suffix('m') {
            Some(n) => (n, 60),
            None => (s, 1),
        },
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("bad window {s:?}: e.g. 10s, 30s, 1m"))?;
    let secs = n.saturating_mul(unit);
    if secs == 0 || secs > MAX_WINDOW_S {
        return Err(format!("window {s:?} out of range: 1s to {MAX_WINDOW_S}s"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http::Method;

    use super::*;
    use crate::telemetry::{Peer, ServiceRef, WorkloadInfo};

    fn workload(ns: &str, pod: &str) -> WorkloadInfo {
        WorkloadInfo {
            namespace: ns.into(),
            workload: pod.into(),
            pod: pod.into(),
            app: "unknown".into(),
            version: "unknown".into(),
            canonical_service: pod.into(),
            canonical_revision: "latest".into(),
            service_account: "default".into(),
        }
    }

    fn record<'a>(
        reporter: Reporter,
        src: &'a WorkloadInfo,
        dst: &'a WorkloadInfo,
        method: &'a Method,
        status: u16,
        ms: u64,
    ) -> RequestRecord<'a> {
        RequestRecord {
            reporter,
            start: SystemTime::now(),
            duration: Duration::from_millis(ms),
            source: Peer { workload: Some(src), principal: None, addr: None },
            destination: Peer { workload: Some(dst), principal: None, addr: None },
            service: Some(ServiceRef { namespace: "shop", name: "web" }),
            protocol: "http",
            method,
            authority: "web",
            path: "/",
            status,
            grpc_status: None,
            response_flags: "-",
            request_bytes: 0,
            response_bytes: 0,
            upstream: None,
            mtls: true,
            trace_id: None,
            request_id: None,
            access_log: false,
        }
    }

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev_end = 0;
        for i in 0..BUCKETS {
            let (lower, width) = bucket_range(i);
            assert_eq!(lower, prev_end, "bucket {i}");
            assert_eq!(bucket_of(lower), i);
            assert_eq!(bucket_of(lower + width - 1), i);
            if lower >= LINEAR {
                assert!(width * SUB <= lower, "bucket {i} too wide: {lower}+{width}");
            }
            prev_end = lower + width;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_are_within_five_percent() {
        let mut h = LatencyHistogram::default();
        // 1 ms .. 1000 ms, uniformly.
        for i in 1..=1000u64 {
            h.record(Duration::from_millis(i));
        }
        for (q, want) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0)] {
            let got = h.quantile_ms(q).unwrap();
            assert!((got - want).abs() / want <= 0.05, "q{q}: {got} vs {want}");
        }
        assert_eq!(LatencyHistogram::default().quantile_ms(0.5), None);
    }

    #[test]
    fn success_is_linkerds() {
        assert!(is_success(200, None));
        assert!(is_success(404, None));
        assert!(is_success(200, Some(0)));
        assert!(!is_success(503, None));
        assert!(!is_success(200, Some(14)));
        assert!(!is_success(0, None));
    }

    #[test]
    fn windows_count_by_key_and_direction() {
        let stats = Stats::new(&TelemetryConfig::default());
        let (client, web) = (workload("shop", "client"), workload("shop", "web-0"));
        let get = Method::GET;
        let t0 = stats.epoch;
        for i in 0..100u64 {
            let status = if i % 10 == 0 { 503 } else { 200 };
            let at = t0 + Duration::from_millis(i * 50); // 5 s
            stats.record_at(&record(Reporter::Source, &client, &web, &get, status, 10), at);
            stats.record_at(&record(Reporter::Destination, &client, &web, &get, status, 8), at);
        }
        let now = t0 + Duration::from_millis(5500);
        let pods = stats.view_at(StatKind::Pods, Duration::from_secs(60), None, now);
        assert_eq!(pods.rows.len(), 2, "{pods:?}");
        let c = &pods.rows[0];
        assert_eq!(c.name, "shop/client");
        let out = c.outbound.as_ref().unwrap();
        assert_eq!((out.requests, out.successes), (100, 90));
        assert!((out.rps - 100.0 / 5.5).abs() < 0.5, "{}", out.rps);
        assert!(c.inbound.is_none());
        let p50 = out.latency_ms.p50.unwrap();
        assert!((p50 - 10.0).abs() < 0.5, "{p50}");
        let w = &pods.rows[1];
        assert_eq!(w.name, "shop/web-0");
        assert!(w.outbound.is_none());
        assert_eq!(w.inbound.as_ref().unwrap().requests, 100);

        let svcs = stats.view_at(StatKind::Services, Duration::from_secs(60), Some("web"), now);
        assert_eq!(svcs.rows.len(), 1);
        assert_eq!(svcs.rows[0].outbound.as_ref().unwrap().requests, 100);
        assert_eq!(svcs.rows[0].inbound.as_ref().unwrap().requests, 100);
        // A 2 s window sees the last two seconds only (seconds 4 and 5: 20 requests).
        let short = stats.view_at(StatKind::Services, Duration::from_secs(2), Some("shop/web"), now);
        assert_eq!(short.rows[0].outbound.as_ref().unwrap().requests, 20);
        // Long after, a new key's first request drops the idle ones; and a view drops them too.
        let db = workload("data", "db-0");
        stats.record_at(
            &record(Reporter::Destination, &client, &db, &get, 200, 1),
            t0 + Duration::from_secs(200),
        );
        let pods = stats.pods.index.load();
        assert!(pods.get("shop").is_none() && pods.get("data").is_some_and(|m| m.len() == 1));
        assert!(stats.services.index.load().contains_key("shop"));
        let later =
            stats.view_at(StatKind::Services, Duration::from_secs(60), None, t0 + Duration::from_secs(300));
        assert!(later.rows.is_empty());
        assert!(stats.services.index.load().is_empty());
    }

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_window("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_window("45").unwrap(), Duration::from_secs(45));
        assert!(parse_window("2m").is_err());
        assert!(parse_window("0s").is_err());
        assert!(parse_window("x").is_err());
    }
}
