//! `sluice tap` (and `sluice top`, built on it): the live stream of requests.
//!
//! A subscriber registers a [`TapFilter`] and gets a bounded channel of [`TapEvent`]s. With
//! nobody subscribed, [`Tap::on_request`] is one relaxed atomic load: no event is built. With
//! subscribers, an event is built once per request that some filter matches and shared
//! (`Arc`) between them; a subscriber whose channel is full loses the event, and the loss is
//! counted for it (the stream reports it).
//!
//! The admin API serves a subscription as `GET /tap?namespace=..&pod=..&to=..&path=..&method=..
//! &reporter=..`: a chunked stream of JSON lines ([`TapMessage`]) until the client goes away.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Peer, Reporter, RequestRecord, TelemetryConfig};

/// Events queued per subscriber before new ones are dropped (and counted).
pub const CHANNEL_CAPACITY: usize = 1024;

/// Which requests a subscriber wants; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapFilter {
    /// The source's or the destination's namespace (or the Service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The source or destination pod: `namespace/name` or `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The destination Service: `namespace/name` or `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A prefix of the request's path (with its query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The request method (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `source` (outbound, at the client's node) or `destination` (inbound, at the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporter: Option<String>,
}

impl TapFilter {
    /// From the query string of `GET /tap`; unknown parameters and bad values are errors.
    pub fn from_query(query: &str) -> Result<TapFilter, String> {
        let mut f = TapFilter::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let v = v.into_owned();
            if v.is_empty() {
                continue;
            }
            let slot = match &*k {
                "namespace" => &mut f.namespace,
                "pod" => &mut f.pod,
                "to" => &mut f.to,
                "path" => &mut f.path,
                "method" => &mut f.method,
                "reporter" => &mut f.reporter,
                other => {
                    return Err(format!(
                        "unknown tap filter {other:?}: namespace, pod, to, path, method, reporter"
                    ))
                }
            };
            *slot = Some(v);
        }
        if let Some(r) = &f.reporter {
            if r != "source" && r != "destination" {
                return Err(format!("reporter {r:?}: source or destination"));
            }
        }
        Ok(f)
    }

    /// The query string for `GET /tap` (empty without filters).
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("to", &self.to),
            ("path", &self.path),
            ("method", &self.method),
            ("reporter", &self.reporter),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        q.finish()
    }

    fn compile(&self) -> Matcher {
        let split = |s: &Option<String>| {
            s.as_ref().map(|s| match s.split_once('/') {
                Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
                None => (None, s.clone()),
            })
        };
        Matcher {
            namespace: self.namespace.clone(),
            pod: split(&self.pod),
            to: split(&self.to),
            path: self.path.clone(),
            method: self.method.clone(),
            reporter: match self.reporter.as_deref() {
                Some("source") => Some(Reporter::Source),
                Some("destination") => Some(Reporter::Destination),
                _ => None,
            },
        }
    }
}

/// A filter ready to test records against without allocating.
#[derive(Debug)]
struct Matcher {
    namespace: Option<String>,
    pod: Option<(Option<String>, String)>,
    to: Option<(Option<String>, String)>,
    path: Option<String>,
    method: Option<String>,
    reporter: Option<Reporter>,
}

impl Matcher {
    fn matches(&self, rec: &RequestRecord<'_>) -> bool {
        if self.reporter.is_some_and(|r| r != rec.reporter) {
            return false;
        }
        if let Some(m) = &self.method {
            if !rec.method.as_str().eq_ignore_ascii_case(m) {
                return false;
            }
        }
        if let Some(p) = &self.path {
            if !rec.path.starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some((ns, name)) = &self.to {
            let Some(svc) = rec.service else { return false };
            if svc.name != name || ns.as_ref().is_some_and(|ns| ns != svc.namespace) {
                return false;
            }
        }
        if let Some((ns, name)) = &self.pod {
            let is = |p: &Peer<'_>| {
                p.workload
                    .is_some_and(|w| &*w.pod == name && ns.as_ref().is_none_or(|ns| **ns == *w.namespace))
            };
            if !is(&rec.source) && !is(&rec.destination) {
                return false;
            }
        }
        if let Some(ns) = &self.namespace {
            let of = |p: &Peer<'_>| p.workload.is_some_and(|w| *w.namespace == **ns);
            if !of(&rec.source) && !of(&rec.destination) && rec.service.is_none_or(|s| s.namespace != ns) {
                return false;
            }
        }
        true
    }
}

/// One side of a tapped request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TapPeer {
    /// `namespace/pod` when the address is a known pod, else the address, else "-".
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// SPIFFE ID without `spiffe://` when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl TapPeer {
    fn of(p: &Peer<'_>) -> TapPeer {
        let addr = p.addr.map(|a| a.to_string());
        TapPeer {
            name: match (p.workload, &addr) {
                (Some(w), _) => format!("{}/{}", w.namespace, w.pod),
                (None, Some(a)) => a.clone(),
                (None, None) => "-".into(),
            },
            namespace: p.workload.map(|w| w.namespace.to_string()),
            pod: p.workload.map(|w| w.pod.to_string()),
            workload: p.workload.map(|w| w.workload.to_string()),
            addr,
            identity: p.principal.map(str::to_string),
        }
    }
}

/// One completed request as tap shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TapEvent {
    /// When the request started (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// "source" (this node is the client's) or "destination" (the server's).
    pub reporter: String,
    pub source: TapPeer,
    pub destination: TapPeer,
    /// The Service the request was for (`namespace/name`).
    pub service: Option<String>,
    pub method: String,
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// The status the client got (0: none, the stream was reset).
    pub status: u16,
    pub grpc_status: Option<u16>,
    /// From the request's start to the end of its response.
    pub latency_ms: f64,
    /// "http" or "grpc".
    pub protocol: String,
    /// The hop between the two sluices was mutual TLS.
    pub mtls: bool,
    /// "-" or sluice's reason for a response it made or a stream it cut.
    pub response_flags: String,
    /// The endpoint the request went to.
    pub upstream: Option<String>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl TapEvent {
    pub fn of(rec: &RequestRecord<'_>) -> TapEvent {
        TapEvent {
            time: rfc3339_millis(rec.start),
            reporter: rec.reporter.as_str().to_string(),
            source: TapPeer::of(&rec.source),
            destination: TapPeer::of(&rec.destination),
            service: rec.service.map(|s| format!("{}/{}", s.namespace, s.name)),
            method: rec.method.as_str().to_string(),
            authority: rec.authority.to_string(),
            path: rec.path.to_string(),
            status: rec.status,
            grpc_status: rec.grpc_status,
            latency_ms: rec.duration.as_secs_f64() * 1000.0,
            protocol: rec.protocol.to_string(),
            mtls: rec.mtls,
            response_flags: rec.response_flags.to_string(),
            upstream: rec.upstream.map(|a| a.to_string()),
            request_bytes: rec.request_bytes,
            response_bytes: rec.response_bytes,
            trace_id: rec.trace_id.map(str::to_string),
        }
    }

    /// A success as `sluice stat` counts them.
    pub fn success(&self) -> bool {
        super::stats::is_success(self.status, self.grpc_status)
    }
}

/// One line of the `GET /tap` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TapMessage {
    /// First line: the subscription is in place (requests completing from now on are seen).
    Subscribed { filter: TapFilter },
    /// A request.
    Request(Box<TapEvent>),
    /// Events this subscriber lost so far because it did not keep up (cumulative).
    Dropped { dropped: u64 },
    /// Sent after a few idle seconds (a client can tell a quiet stream from a dead one).
    Heartbeat,
}

/// `2024-05-01T12:00:00.123Z`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

struct Subscriber {
    id: u64,
    matcher: Matcher,
    tx: mpsc::Sender<Arc<TapEvent>>,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Shared {
    /// Subscribers registered: the data path's only check when nobody taps.
    active: AtomicUsize,
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
    next_id: AtomicU64,
    events: AtomicU64,
    dropped: AtomicU64,
}

/// The live request stream.
pub struct Tap {
    shared: Arc<Shared>,
}

impl Tap {
    pub fn new(_cfg: &TelemetryConfig) -> Tap {
        Tap { shared: Arc::default() }
    }

    pub fn on_request(&self, rec: &RequestRecord<'_>) {
        if self.shared.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.publish(rec);
    }

    #[cold]
    fn publish(&self, rec: &RequestRecord<'_>) {
        let subs = self.shared.subscribers.read().unwrap_or_else(|e| e.into_inner());
        let mut event: Option<Arc<TapEvent>> = None;
        for s in subs.iter() {
            if !s.matcher.matches(rec) {
                continue;
            }
            let ev = event.get_or_insert_with(|| Arc::new(TapEvent::of(rec))).clone();
            match s.tx.try_send(ev) {
                Ok(()) => {
                    self.shared.events.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                }
                // Unsubscribing (the subscription is being dropped).
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// Registers a subscriber; it stays until the [`Subscription`] is dropped.
    pub fn subscribe(&self, filter: TapFilter) -> Subscription {
        self.subscribe_with(filter, CHANNEL_CAPACITY)
    }

    fn subscribe_with(&self, filter: TapFilter, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let sub = Arc::new(Subscriber {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            matcher: filter.compile(),
            tx,
            dropped: AtomicU64::new(0),
        });
        {
            let mut subs = self.shared.subscribers.write().unwrap_or_else(|e| e.into_inner());
            subs.push(sub.clone());
            self.shared.active.store(subs.len(), Ordering::Relaxed);
        }
        Subscription { shared: self.shared.clone(), sub, rx, filter }
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Events delivered to subscribers since start.
    pub fn events(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }

    /// Events dropped because a subscriber's channel was full, since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// One subscriber's end of the stream.
pub struct Subscription {
    shared: Arc<Shared>,
    sub: Arc<Subscriber>,
    rx: mpsc::Receiver<Arc<TapEvent>>,
    filter: TapFilter,
}

impl Subscription {
    /// The next event (`None` never happens while subscribed).
    pub async fn recv(&mut self) -> Option<Arc<TapEvent>> {
        self.rx.recv().await
    }

    /// An event already queued.
    pub fn try_recv(&mut self) -> Option<Arc<TapEvent>> {
        self.rx.try_recv().ok()
    }

    /// Events this subscriber lost so far.
    pub fn dropped(&self) -> u64 {
        self.sub.dropped.load(Ordering::Relaxed)
    }

    pub fn filter(&self) -> &TapFilter {
        &self.filter
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = self.shared.subscribers.write().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| s.id != self.sub.id);
        self.shared.active.store(subs.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Method;

    use super::*;
    use crate::telemetry::{ServiceRef, WorkloadInfo};

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
        src: &'a WorkloadInfo,
        dst: &'a WorkloadInfo,
        svc: (&'a str, &'a str),
        method: &'a Method,
        path: &'a str,
    ) -> RequestRecord<'a> {
        RequestRecord {
            reporter: Reporter::Source,
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            duration: Duration::from_micros(1500),
            source: Peer {
                workload: Some(src),
                principal: Some("cluster.local/ns/shop/sa/default"),
                addr: None,
            },
            destination: Peer {
                workload: Some(dst),
                principal: None,
                addr: Some("10.244.1.10:8080".parse().unwrap()),
            },
            service: Some(ServiceRef { namespace: svc.0, name: svc.1 }),
            protocol: "http",
            method,
            authority: "web.shop",
            path,
            status: 200,
            grpc_status: None,
            response_flags: "-",
            request_bytes: 0,
            response_bytes: 12,
            upstream: Some("10.244.1.10:8080".parse().unwrap()),
            mtls: true,
            trace_id: None,
            request_id: None,
            access_log: false,
        }
    }

    fn filter(q: &str) -> TapFilter {
        TapFilter::from_query(q).unwrap()
    }

    #[test]
    fn filters_match_what_they_say() {
        let (client, web, db) =
            (workload("shop", "client"), workload("shop", "web-0"), workload("data", "db-0"));
        let (get, post) = (Method::GET, Method::POST);
        let r = record(&client, &web, ("shop", "web"), &get, "/api/items?x=1");
        let m = |q: &str| filter(q).compile().matches(&r);
        assert!(m(""));
        assert!(m("to=shop%2Fweb") && m("to=web") && !m("to=other/web") && !m("to=db"));
        assert!(m("pod=client") && m("pod=shop/web-0") && !m("pod=data/web-0") && !m("pod=db-0"));
        assert!(m("namespace=shop") && !m("namespace=data"));
        assert!(m("path=/api") && m("path=/api/items?x") && !m("path=/apx"));
        assert!(m("method=get") && m("method=GET") && !m("method=POST"));
        assert!(m("reporter=source") && !m("reporter=destination"));
        assert!(m("to=web&method=GET&path=/api") && !m("to=web&method=POST"));
        let r2 = record(&client, &db, ("data", "db"), &post, "/");
        assert!(filter("namespace=data").compile().matches(&r2));
        assert!(TapFilter::from_query("color=red").is_err());
        assert!(TapFilter::from_query("reporter=both").is_err());
        let f = filter("to=shop%2Fweb&path=%2Fa+b&method=GET");
        assert_eq!(f.to.as_deref(), Some("shop/web"));
        assert_eq!(filter(&f.to_query()), f);
    }

    #[test]
    fn nothing_is_built_without_subscribers_and_full_channels_count_drops() {
        let tap = Tap::new(&TelemetryConfig::default());
        let (client, web) = (workload("shop", "client"), workload("shop", "web-0"));
        let get = Method::GET;
        let r = record(&client, &web, ("shop", "web"), &get, "/");
        tap.on_request(&r);
        assert_eq!((tap.subscribers(), tap.events()), (0, 0));

        let mut all = tap.subscribe_with(TapFilter::default(), 2);
        let mut none = tap.subscribe(filter("to=db"));
        assert_eq!(tap.subscribers(), 2);
        for _ in 0..5 {
            tap.on_request(&r);
        }
        assert_eq!(all.dropped(), 3);
        assert_eq!(tap.dropped(), 3);
        let ev = all.try_recv().unwrap();
        assert!(all.try_recv().is_some() && all.try_recv().is_none());
        assert!(none.try_recv().is_none());
        assert_eq!(ev.time, "2023-11-14T22:13:20.123Z");
        assert_eq!(ev.source.name, "shop/client");
        assert_eq!(ev.destination.name, "shop/web-0");
        assert_eq!(ev.service.as_deref(), Some("shop/web"));
        assert_eq!(ev.latency_ms, 1.5);
        assert!(ev.mtls && ev.success());
        drop(all);
        assert_eq!(tap.subscribers(), 1);
        drop(none);
        assert_eq!(tap.subscribers(), 0);
    }

    #[test]
    fn stream_lines_round_trip() {
        let (client, web) = (workload("shop", "client"), workload("shop", "web-0"));
        let get = Method::GET;
        let ev = TapEvent::of(&record(&client, &web, ("shop", "web"), &get, "/"));
        for msg in [
            TapMessage::Subscribed { filter: filter("to=web") },
            TapMessage::Request(Box::new(ev)),
            TapMessage::Dropped { dropped: 3 },
            TapMessage::Heartbeat,
        ] {
            let line = serde_json::to_string(&msg).unwrap();
            assert!(line.starts_with("{\"type\":"), "{line}");
            assert_eq!(serde_json::from_str::<TapMessage>(&line).unwrap(), msg);
        }
    }
}
