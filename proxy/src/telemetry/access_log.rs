//! Access logs: one JSON line per HTTP request and per TCP connection, for namespaces
//! annotated `sluice.dev/access-log: enabled` (the client's or the server's), written by a
//! thread of their own. The data path copies the record into a bounded queue and moves on; a
//! record that does not fit is dropped and counted (`sluice_access_log_dropped_total`), never
//! waited for.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
        Arc,
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tracing::warn;

use super::{ConnRecord, Peer, RequestRecord, TelemetryConfig};
use crate::discovery::WorkloadInfo;

pub struct AccessLog {
    queue: Option<SyncSender<Entry>>,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
}

/// One line, owned, on its way to the writer.
struct Entry {
    kind: &'static str,
    reporter: &'static str,
    start: SystemTime,
    duration: Duration,
    source: Side,
    destination: Side,
    service: Option<String>,
    http: Option<HttpFields>,
    /// Request and response bytes (TCP: received from the client, sent by the server).
    bytes_in: u64,
    bytes_out: u64,
    mtls: bool,
    flags: String,
}

struct HttpFields {
    protocol: &'static str,
    method: String,
    authority: String,
    path: String,
    status: u16,
    grpc_status: Option<u16>,
    upstream: Option<SocketAddr>,
    trace_id: Option<String>,
    request_id: Option<String>,
}

struct Side {
    workload: Option<Arc<WorkloadInfo>>,
    principal: Option<String>,
    addr: Option<SocketAddr>,
}

impl Side {
    fn of(p: &Peer<'_>) -> Side {
        Side {
            workload: p.workload.map(|w| Arc::new(w.clone())),
            principal: p.principal.map(str::to_owned),
            addr: p.addr,
        }
    }
}

impl AccessLog {
    /// Starts the writer thread when a destination is configured.
    pub fn new(cfg: &TelemetryConfig) -> AccessLog {
        let written = Arc::new(AtomicU64::new(0));
        let queue = cfg.access_log_path.as_ref().and_then(|path| match open(path) {
            Ok(out) => {
                let (tx, rx) = mpsc::sync_channel(cfg.access_log_queue.max(1));
                let counter = written.clone();
                let spawned = std::thread::Builder::new()
                    .name("sluice-access-log".into())
                    .spawn(move || writer(rx, out, counter));
                match spawned {
                    Ok(_) => Some(tx),
                    Err(e) => {
                        warn!(error = %e, "cannot start the access log writer; access logs are off");
                        None
                    }
                }
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot open the access log; access logs are off");
                None
            }
        });
        AccessLog { queue, dropped: AtomicU64::new(0), written }
    }

    /// Records lost because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn on_request(&self, rec: &RequestRecord<'_>) {
        let Some(queue) = &self.queue else { return };
        self.send(
            queue,
            Entry {
                kind: "http",
                reporter: rec.reporter.as_str(),
                start: rec.start,
                duration: rec.duration,
                source: Side::of(&rec.source),
                destination: Side::of(&rec.destination),
                service: rec.service.map(|s| format!("{}.{}.svc.cluster.local", s.name, s.namespace)),
                http: Some(HttpFields {
                    protocol: rec.protocol,
                    method: rec.method.as_str().to_owned(),
                    authority: rec.authority.to_owned(),
                    path: rec.path.to_owned(),
                    status: rec.status,
                    grpc_status: rec.grpc_status,
                    upstream: rec.upstream,
                    trace_id: rec.trace_id.map(str::to_owned),
                    request_id: rec.request_id.map(str::to_owned),
                }),
                bytes_in: rec.request_bytes,
                bytes_out: rec.response_bytes,
                mtls: rec.mtls,
                flags: rec.response_flags.to_owned(),
            },
        );
    }

    pub fn on_connection(&self, rec: &ConnRecord<'_>) {
        let Some(queue) = &self.queue else { return };
        self.send(
            queue,
            Entry {
                kind: "tcp",
                reporter: rec.reporter.as_str(),
                start: rec.start,
                duration: rec.duration,
                source: Side::of(&rec.source),
                destination: Side::of(&rec.destination),
                service: rec.service.map(|s| format!("{}.{}.svc.cluster.local", s.name, s.namespace)),
                http: None,
                bytes_in: rec.received,
                bytes_out: rec.sent,
                mtls: rec.mtls,
                flags: rec.response_flags.to_owned(),
            },
        );
    }

    fn send(&self, queue: &SyncSender<Entry>, entry: Entry) {
        match queue.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn open(path: &Path) -> io::Result<Box<dyn Write + Send>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(io::stdout()));
    }
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    Ok(Box::new(file))
}

/// Drains the queue into the output, flushing whenever the queue runs dry.
fn writer(rx: mpsc::Receiver<Entry>, out: Box<dyn Write + Send>, written: Arc<AtomicU64>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(1024);
    loop {
        let entry = match rx.try_recv() {
            Ok(e) => e,
            Err(mpsc::TryRecvError::Empty) => {
                let _ = out.flush();
                match rx.recv() {
                    Ok(e) => e,
                    Err(_) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        line.clear();
        if serde_json::to_writer(&mut line, &Line::of(&entry)).is_ok() {
            line.push(b'\n');
            if out.write_all(&line).is_ok() {
                written.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let _ = out.flush();
}

/// The JSON shape of one line (stable: tools parse it).
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    kind: &'a str,
    reporter: &'a str,
    duration_ms: f64,
    source: SideView<'a>,
    destination: SideView<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination_service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<u16>,
    response_flags: &'a str,
    bytes_received: u64,
    bytes_sent: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    connection_security_policy: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Serialize)]
struct SideView<'a> {
    workload: Option<&'a str>,
    namespace: Option<&'a str>,
    pod: Option<&'a str>,
    principal: Option<&'a str>,
    address: Option<String>,
}

impl<'a> SideView<'a> {
    fn of(s: &'a Side) -> Self {
        SideView {
            workload: s.workload.as_ref().map(|w| &*w.workload),
            namespace: s.workload.as_ref().map(|w| &*w.namespace),
            pod: s.workload.as_ref().map(|w| &*w.pod),
            principal: s.principal.as_deref(),
            address: s.addr.map(|a| a.to_string()),
        }
    }
}

impl<'a> Line<'a> {
    fn of(e: &'a Entry) -> Self {
        let h = e.http.as_ref();
        Line {
            time: rfc3339(e.start),
            kind: e.kind,
            reporter: e.reporter,
            duration_ms: e.duration.as_secs_f64() * 1e3,
            source: SideView::of(&e.source),
            destination: SideView::of(&e.destination),
            destination_service: e.service.as_deref(),
            protocol: h.map(|h| h.protocol),
            method: h.map(|h| h.method.as_str()),
            authority: h.map(|h| h.authority.as_str()),
            path: h.map(|h| h.path.as_str()),
            status: h.map(|h| h.status),
            grpc_status: h.and_then(|h| h.grpc_status),
            response_flags: &e.flags,
            bytes_received: e.bytes_in,
            bytes_sent: e.bytes_out,
            upstream: h.and_then(|h| h.upstream).map(|u| u.to_string()),
            connection_security_policy: if e.mtls { "mutual_tls" } else { "none" },
            trace_id: h.and_then(|h| h.trace_id.as_deref()),
            request_id: h.and_then(|h| h.request_id.as_deref()),
        }
    }
}

/// `2026-11-30T15:52:07.123Z`.
fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
