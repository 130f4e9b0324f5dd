//! The node-local admin API: JSON over HTTP/1.1 on 127.0.0.1:15000 and on a unix socket
//! (`/run/sluice/<node>/admin.sock`) so that it can be reached from outside the node's
//! network namespace. It runs on its own single-threaded runtime, away from the data path,
//! and only reads shared state.
//!
//! Two levels of access. The TCP port is reachable by every process in the node's network
//! namespace, hostNetwork pods included: it serves the read-only GETs only. Whatever changes
//! state or mints something (today `POST /certs/request`, which has the CA sign a certificate)
//! is served on the unix socket only, which is created 0600 and whose peers are checked
//! (`SO_PEERCRED`: root or sluice's own user).

use std::{
    convert::Infallible,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, warn};

use super::api::{ManifestErrorView, ProgramView, StatusView};
use crate::{
    conns::ConnRegistry,
    discovery::{self, Model},
    enroll,
    identity::{CertManager, CertRequestView, IdentityError, SpiffeId},
    inbound::Inbound,
    l4::DataPath,
    redirect::Redirector,
};

pub struct AdminState {
    pub node: String,
    pub started: Instant,
    pub ready: AtomicBool,
    pub redirector: Arc<Redirector>,
    pub model: Arc<ArcSwap<Model>>,
    pub conns: Arc<ConnRegistry>,
    pub pods: enroll::PodsView,
    pub pod_problems: enroll::ProblemsView,
    pub certs: Arc<CertManager>,
    pub inbound: Arc<Inbound>,
    pub data: Arc<DataPath>,
}

impl AdminState {
    /// Kernel counters and the proxy's own, in one flat map.
    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        let mut all: std::collections::BTreeMap<String, u64> =
            self.redirector.counters().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let c = &self.inbound.counters;
        let t = &self.inbound.tunnel_stats;
        for (name, value) in [
            ("hbone_streams_in", &c.tunnel_streams),
            ("hbone_handshakes_failed", &t.handshakes_failed),
            ("hbone_streams_rejected", &t.streams_rejected),
            ("plaintext_accepted", &c.plaintext_accepted),
            ("same_node_in", &c.same_node_in),
            ("same_node_handoffs", &self.data.same_node.handoffs),
            ("plaintext_refused_strict", &c.plaintext_refused_strict),
            ("policy_denied", &c.policy_denied),
            ("delivery_failed", &c.delivery_failed),
            ("outbound_waited_for_certificate", &self.certs.no_certificate.waited),
            ("outbound_refused_no_certificate", &self.certs.no_certificate.refused),
        ] {
            all.insert(name.to_string(), value.load(Ordering::Relaxed));
        }
        let sec = &self.inbound.security;
        for (name, value) in [
            ("http_denied", &sec.counters.http_denied),
            ("jwt_rejected", &sec.counters.jwt_rejected),
            ("jwt_verified", &sec.counters.jwt_verified),
            ("policy_audited", &sec.counters.policy_audited),
            ("inbound_sniffed", &sec.counters.inbound_sniffed),
            ("jwks_fetches_ok", &sec.jwks.counters.jwks_fetches_ok),
            ("jwks_fetches_failed", &sec.jwks.counters.jwks_fetches_failed),
            ("jwks_urls_refused", &sec.jwks.counters.jwks_urls_refused),
        ] {
            all.insert(name.to_string(), value.load(Ordering::Relaxed));
        }
        for (name, value) in self.certs.ca_counters() {
            all.insert(name.to_string(), value);
        }
        let gate = &t.gate;
        for (name, value) in [
            ("hbone_handshakes_refused_source", &gate.refused_source),
            ("hbone_handshakes_refused_node", &gate.refused_node),
            ("hbone_tunnels_refused_identity", &gate.refused_identity),
        ] {
            all.insert(name.to_string(), value.load(Ordering::Relaxed));
        }
        all.insert("hbone_handshakes_in_progress".to_string(), u64::from(gate.handshakes()));
        all.insert("hbone_tunnels_in".to_string(), u64::from(gate.tunnels()));
        all.insert("hbone_pooled_connections".to_string(), self.data.pool.len() as u64);
        let l7 = &self.data.l7.counters;
        let up = &self.data.l7.upstreams.counters;
        for (name, value) in [
            ("detected_http1", &l7.detected_http1),
            ("detected_http2", &l7.detected_http2),
            ("detected_opaque", &l7.detected_opaque),
            ("http_requests", &l7.requests),
            ("http_local_replies", &l7.local_replies),
            ("http_upgrades", &l7.upgrades),
            ("upstream_connects", &up.connects),
            ("upstream_connect_errors", &up.connect_errors),
            ("upstream_reused", &up.reused),
            ("upstream_retried_on_fresh_connection", &up.retried_on_fresh_connection),
            ("upstream_tls_originated", &up.tls_originated),
            ("http_mirrored", &l7.mirrored),
            ("http_mirror_skipped", &l7.mirror_skipped),
            ("http_mirror_failed", &l7.mirror_failed),
            ("http_mirror_dropped", &l7.mirror_dropped),
            ("http_mirror_timeouts", &l7.mirror_timeouts),
            ("egress_refused", &l7.egress_refused),
            ("tcp_routed", &l7.tcp_routed),
            ("tcp_route_refused", &l7.tcp_route_refused),
            ("tls_sni_unread", &l7.tls_sni_unread),
        ] {
            all.insert(name.to_string(), value.load(Ordering::Relaxed));
        }
        let lc = &self.data.l7.limit_counters;
        for (name, value) in [
            ("http_retries", &lc.retries),
            ("http_retry_budget_exhausted", &lc.retry_budget_exhausted),
            ("http_rate_limited", &lc.rate_limited),
            ("http_faults_delayed", &lc.faults_delayed),
            ("http_faults_aborted", &lc.faults_aborted),
            ("pod_overflow", &lc.pod_overflow),
            ("pod_accept_paused", &lc.pod_accept_paused),
        ] {
            all.insert(name.to_string(), value.load(Ordering::Relaxed));
        }
        let tel = &self.data.telemetry;
        all.insert("access_log_written".to_string(), tel.access_log.written());
        all.insert("access_log_dropped".to_string(), tel.access_log.dropped());
        all.insert("spans_exported".to_string(), tel.trace.exported.load(Ordering::Relaxed));
        all.insert("spans_dropped".to_string(), tel.trace.dropped.load(Ordering::Relaxed));
        let overflow: u64 =
            self.data.l7.breakers.snapshot().iter().map(|(_, _, b)| b.overflows.load(Ordering::Relaxed)).sum();
        all.insert("http_overflow".to_string(), overflow);
        let (idle_h1, h2) = self.data.l7.upstreams.sizes();
        all.insert("upstream_idle_http1".to_string(), idle_h1 as u64);
        all.insert("upstream_http2".to_string(), h2 as u64);
        // The multiplexed pools: single flight, bounds hit, evictions by reason.
        for (name, value) in self.data.pool.stats().snapshot() {
            all.insert(format!("hbone_pool_{name}"), value);
        }
        for (name, value) in self.data.l7.upstreams.h2_stats().snapshot() {
            all.insert(format!("upstream_h2_pool_{name}"), value);
        }
        let balancer = &self.data.l7.balancer;
        let (states, overflow) = balancer.state_stats();
        all.insert("balancer_endpoint_states".to_string(), states as u64);
        all.insert("balancer_state_overflow".to_string(), overflow);
        all.insert("balancer_state_evicted".to_string(), balancer.state_evictions());
        let ejected = balancer.ejected(std::time::Instant::now());
        all.insert("balancer_ejected_endpoints".to_string(), ejected as u64);
        all.insert("hbone_fallback_plaintext".to_string(), self.data.tunnel_fallbacks.load(Ordering::Relaxed));
        all.insert("hbone_fallback_refused_strict".to_string(), self.data.tunnel_fallbacks_refused.load(Ordering::Relaxed));
        all.insert("self_connection_refused".to_string(), self.data.loop_guard.refused.load(Ordering::Relaxed));
        all.insert("http_mirrors_in_flight".to_string(), u64::from(self.data.l7.mirror_gate.in_flight()));
        all.insert("http_mirror_body_bytes".to_string(), self.data.l7.mirror_gate.body_bytes());
        all.insert("log_lines_suppressed".to_string(), crate::lograte::shared().suppressed());
        all.insert("log_lines_dropped".to_string(), crate::lograte::dropped_lines());
        let adm = &self.data.admission;
        all.insert("connections_admitted".to_string(), u64::from(adm.open()));
        all.insert("sockets_admitted".to_string(), u64::from(adm.sockets()));
        for (name, value) in [
            ("refused_node_limit", &adm.counters.refused_node_limit),
            ("refused_pod_limit", &adm.counters.refused_pod_limit),
            ("dials_refused", &adm.counters.dials_refused),
            ("idle_shed", &adm.counters.idle_shed),
            ("refused_destination_pod_limit", &adm.counters.refused_destination_pod_limit),
            ("refused_peer_limit", &adm.counters.refused_peer_limit),
            ("tcp_idle_closed", &self.data.idle.closed),
        ] {
            all.insert(name.to_string(), value.load(Ordering::Relaxed));
        }
        let dns = self.data.l7.dns.counters();
        for (name, value) in [
            ("dns_lookups", &dns.lookups),
            ("dns_cache_hits", &dns.cache_hits),
            ("dns_coalesced", &dns.coalesced),
            ("dns_failures", &dns.failures),
            ("dns_timeouts", &dns.timeouts),
            ("dns_lookups_refused", &dns.lookups_refused),
            ("dns_lookups_refused_pod", &dns.lookups_refused_pod),
            ("dns_lookups_refused_service_entry", &dns.lookups_refused_service_entry),
            ("dns_cache_evictions", &dns.cache_evictions),
            ("dns_cache_evictions_pod", &dns.cache_evictions_pod),
            ("dns_cache_evictions_service_entry", &dns.cache_evictions_service_entry),
            ("dns_invalid_hosts", &dns.invalid_hosts),
            ("dns_stale_served", &dns.stale_served),
        ] {
            all.insert(name.to_string(), value.load(Ordering::Relaxed));
        }
        all.insert("dns_cache_entries".to_string(), self.data.l7.dns.len() as u64);
        let tap = &self.data.telemetry.tap;
        all.insert("tap_subscribers".to_string(), tap.subscribers() as u64);
        all.insert("tap_events".to_string(), tap.events());
        all.insert("tap_dropped".to_string(), tap.dropped());
        for (name, value) in discovery::limits::COUNTERS.snapshot() {
            all.insert(name.to_string(), value);
        }
        for (listener, event, value) in super::listener_limits::COUNTERS.snapshot() {
            all.insert(format!("{listener}_connections_{event}"), value);
        }
        all
    }

    fn status(&self) -> StatusView {
        let model = self.model.load();
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            node: self.node.clone(),
            ready: self.ready.load(Ordering::Acquire),
            fail_mode: format!("{:?}", self.redirector.fail_mode()).to_lowercase(),
            uptime_s: self.started.elapsed().as_secs(),
            programs: self
                .redirector
                .programs()
                .iter()
                .map(|p| ProgramView {
                    name: p.name.to_string(),
                    attach_type: p.attach_type.to_string(),
                    id: p.id,
                    link_id: p.link_id,
                    pinned: p.pinned,
                })
                .collect(),
            counters: self.counters(),
            pods_enrolled: self.pods.read().unwrap_or_else(|p| p.into_inner()).len(),
            connections_open: self.conns.open_count(),
            connections_total: self.conns.total(),
            manifest_errors: model
                .errors()
                .iter()
                .map(|e| ManifestErrorView { file: e.file.display().to_string(), reason: e.reason.clone() })
                .collect(),
            model_generation: model.generation(),
            model_pods: model.pods().count(),
            limits: Some(self.data.admission.config),
            pod_problems: self.pod_problems.read().unwrap_or_else(|p| p.into_inner()).clone(),
            ca: Some({
                let certs = self.certs.certs();
                let held = certs.iter().filter(|c| c.state == crate::identity::CertState::Ready).count();
                crate::admin::api::CaStatusView {
                    description: self.certs.ca_description(),
                    trust_bundle_roots: self.certs.bundle_view().roots.len(),
                    certificates_held: held,
                    certificates_pending: certs.len() - held,
                }
            }),
        }
    }
}

/// What a connection to the admin API may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The read-only GETs (the TCP port; a unix-socket peer that is not root or sluice's user).
    ReadOnly,
    /// Everything, including the endpoints that change state or mint something.
    Privileged,
}

impl Access {
    /// The access of a unix-socket peer with user id `uid`.
    pub fn of_peer_uid(uid: u32) -> Access {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let own = unsafe { libc::geteuid() };
        if uid == 0 || uid == own {
            Access::Privileged
        } else {
            Access::ReadOnly
        }
    }
}

/// Binds the admin unix socket at `path` (replacing a stale one), readable and writable by
/// its owner only. Between the bind and the chmod another user could connect; such a peer is
/// still only [`Access::ReadOnly`] (its credentials are checked per connection).
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the admin API on TCP (`tcp`, or `addr` once it can be bound) and on `unix` until the
/// process exits.
pub async fn serve(
    state: Arc<AdminState>,
    tcp: Option<std::net::TcpListener>,
    addr: std::net::SocketAddr,
    unix: Option<(UnixListener, PathBuf)>,
) {
    if let Some((unix, path)) = unix {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                match unix.accept().await {
                    Ok((stream, _)) => {
                        let access = match stream.peer_cred() {
                            Ok(cred) => Access::of_peer_uid(cred.uid()),
                            Err(e) => {
                                debug!(error = %e, "admin socket peer without credentials; read-only");
                                Access::ReadOnly
                            }
                        };
                        spawn_conn(stream, state.clone(), access, None)
                    }
                    Err(e) => {
                        warn!(socket = %path.display(), error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    let tcp = match tcp {
        Some(l) => l,
        None => loop {
            // The previous process releases the port when it exits.
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            if let Ok(l) = std::net::TcpListener::bind(addr) {
                tracing::info!(%addr, "admin port taken over");
                break l;
            }
        },
    };
    let tcp = match tcp.set_nonblocking(true).and_then(|_| TcpListener::from_std(tcp)) {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "admin API not served on TCP");
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    // Bounded, with deadlines: hostNetwork pods reach this port too.
    use super::listener_limits::{self as limits, Gate};
    let gate = Gate::new(limits::ADMIN, &limits::COUNTERS.admin);
    loop {
        match tcp.accept().await {
            Ok((stream, peer)) => match gate.admit(peer) {
                Some(ticket) => {
                    spawn_conn(stream, state.clone(), Access::ReadOnly, Some((gate.clone(), ticket)))
                }
                None => limits::reset(stream),
            },
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one connection; a TCP one under its listener's bounds (`gate`).
fn spawn_conn<I>(
    io: I,
    state: Arc<AdminState>,
    access: Access,
    gate: Option<(Arc<super::listener_limits::Gate>, super::listener_limits::Ticket)>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            async move {
                if let Some(refused) = refusal(access, req.method(), req.uri().path()) {
                    return Ok::<_, Infallible>(refused.map(BodyExt::boxed_unsync));
                }
                if req.method() == Method::POST && req.uri().path() == "/certs/request" {
                    return Ok::<_, Infallible>(cert_request(&state, req).await.map(BodyExt::boxed_unsync));
                }
                if req.method() == Method::GET && req.uri().path() == "/tap" {
                    return Ok::<_, Infallible>(tap(&state, &req));
                }
                Ok::<_, Infallible>(route(&state, req).map(BodyExt::boxed_unsync))
            }
        });
        let Some((gate, ticket)) = gate else {
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(io), svc).await {
                debug!(error = %e, "admin connection ended with an error");
            }
            return;
        };
        let builder = gate.http1();
        gate.serve(ticket, io, |io| async move {
            let r = builder.serve_connection(TokioIo::new(io), svc).await;
            if let Err(e) = &r {
                debug!(error = %e, "admin connection ended with an error");
            }
            r
        })
        .await;
    });
}

/// The endpoints that change state or mint something: unix socket, privileged peers only.
fn privileged(method: &Method, path: &str) -> bool {
    *method == Method::POST && path == "/certs/request"
}

/// The answer to a privileged request on a connection without [`Access::Privileged`] (403,
/// saying where it is served); `None` when the request may go on.
fn refusal(access: Access, method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
    if access == Access::Privileged || !privileged(method, path) {
        return None;
    }
    if let Some(suppressed) = crate::lograte::shared().allow("admin-forbidden", "tcp") {
        warn!(%method, path, suppressed, "privileged admin request refused: it is served on the admin unix socket to root only");
    }
    Some(text(
        StatusCode::FORBIDDEN,
        &format!(
            "{method} {path} is served on sluice's admin unix socket only (/run/sluice/<node>/admin.sock, \
             to root): this port is read-only. Use `sluice certs request --node NAME SPIFFE_ID`.\n"
        ),
    ))
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported (and POST /certs/request on the unix socket)\n",
        );
    }
    match req.uri().path() {
        "/status" => json(&state.status()),
        "/pods" => json(&enroll::pods_snapshot(&state.pods, &state.certs)),
        "/conns" => json(&state.conns.snapshot()),
        "/certs" => json(&state.certs.certs()),
        "/certs/bundle" => json(&state.certs.bundle_view()),
        "/model" => json(&state.model.load().view()),
        "/jwks" => json(&state.inbound.security.jwks.view()),
        "/routes" => {
            let only = req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "service").map(|(_, v)| v.into_owned())
            });
            json(&super::routes::view(&state.model.load(), &state.data.l7.balancer, only.as_deref()))
        }
        "/stat" => stat(state, req.uri().query().unwrap_or("")),
        "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        other => text(StatusCode::NOT_FOUND, &format!("no such endpoint {other}; try /status, /pods, /conns, /certs, /certs/bundle, /model, /routes, /stat, /tap, /ready\n")),
    }
}

/// `GET /stat?kind=pods|services&window=1m[&name=ns/name]`: the rolling windows of `sluice stat`
/// ([`crate::telemetry::stats::StatView`]).
fn stat(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    use crate::telemetry::stats::{parse_window, StatKind};
    let mut kind = StatKind::Pods;
    let mut window = std::time::Duration::from_secs(60);
    let mut name = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let parsed = match &*k {
            "kind" => v.parse().map(|k| kind = k),
            "window" => parse_window(&v).map(|w| window = w),
            "name" => {
                name = Some(v.into_owned()).filter(|n| !n.is_empty());
                Ok(())
            }
            other => Err(format!("unknown parameter {other:?}: kind, window, name")),
        };
        if let Err(e) = parsed {
            return text(StatusCode::BAD_REQUEST, &format!("{e}\n"));
        }
    }
    json(&state.data.telemetry.stats.view(kind, window, name.as_deref()))
}

/// Idle time after which the tap stream sends a heartbeat line.
const TAP_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);
/// Events written in one chunk at most.
const TAP_BATCH: usize = 256;

/// `GET /tap?namespace=..&pod=..&to=..&path=..&method=..&reporter=..`: a chunked stream of JSON
/// lines ([`crate::telemetry::tap::TapMessage`]) until the client goes away: `subscribed` first,
/// then one `request` line per matching request, `dropped` when this subscriber lost events,
/// and a `heartbeat` after 5 idle seconds.
fn tap(state: &AdminState, req: &Request<Incoming>) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
    use crate::telemetry::tap::{TapEvent, TapFilter, TapMessage};
    use hyper::body::Frame;

    #[derive(serde::Serialize)]
    struct RequestLine<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(flatten)]
        event: &'a TapEvent,
    }
    fn push_line<T: serde::Serialize>(buf: &mut Vec<u8>, value: &T) {
        if serde_json::to_writer(&mut *buf, value).is_ok() {
            buf.push(b'\n');
        }
    }

    let filter = match TapFilter::from_query(req.uri().query().unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")).map(BodyExt::boxed_unsync),
    };
    let sub = state.data.telemetry.tap.subscribe(filter);
    debug!(filter = ?sub.filter(), "tap subscriber");
    let mut first = Vec::new();
    push_line(&mut first, &TapMessage::Subscribed { filter: sub.filter().clone() });
    // (subscription, first line still to send, drops already reported)
    let stream = futures_util::stream::unfold((sub, Some(first), 0u64), |(mut sub, first, reported)| async move {
        if let Some(first) = first {
            return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(first))), (sub, None, reported)));
        }
        let mut buf = Vec::new();
        match tokio::time::timeout(TAP_HEARTBEAT, sub.recv()).await {
            Ok(Some(ev)) => {
                push_line(&mut buf, &RequestLine { kind: "request", event: &ev });
                for _ in 1..TAP_BATCH {
                    let Some(ev) = sub.try_recv() else { break };
                    push_line(&mut buf, &RequestLine { kind: "request", event: &ev });
                }
            }
            Ok(None) => return None,
            Err(_) => push_line(&mut buf, &TapMessage::Heartbeat),
        }
        let dropped = sub.dropped();
        if dropped > reported {
            push_line(&mut buf, &TapMessage::Dropped { dropped });
        }
        Some((Ok(Frame::data(Bytes::from(buf))), (sub, None, dropped)))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .header("cache-control", "no-cache")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("static response parts are valid")
}

/// `POST /certs/request` with `{"identity":"spiffe://..."}`: asks this node's CA for a certificate
/// for that identity as renewal would, without installing it (a check: "would this node get a
/// certificate for X?"). 200 with the serial and validity, 403 with the CA's refusal.
async fn cert_request(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    #[derive(serde::Deserialize)]
    struct Body {
        identity: String,
    }
    let body = match http_body_util::Limited::new(req.into_body(), 16 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("reading the request body: {e}\n")),
    };
    let id: SpiffeId = match serde_json::from_slice::<Body>(&body) {
        Ok(b) => match b.identity.parse() {
            Ok(id) => id,
            Err(e) => {
                return text(StatusCode::BAD_REQUEST, &format!("invalid identity {:?}: {e}\n", b.identity))
            }
        },
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"identity\":\"spiffe://...\"}}: {e}\n"),
            )
        }
    };
    match state.certs.check_issuance(&id).await {
        Ok(view) => {
            tracing::info!(identity = %id, serial = view.serial.as_deref().unwrap_or(""),
                "certificate request granted by the CA (checked, not installed)");
            json(&view)
        }
        Err(e) => {
            // 403 only for the CA's decision; not getting one is the CA's (or the link's) failure.
            let status = match &e {
                IdentityError::Ca(ca) if ca.is_refusal() => StatusCode::FORBIDDEN,
                IdentityError::Ca(crate::identity::CaError::Unauthenticated { .. }) => StatusCode::FORBIDDEN,
                IdentityError::Ca(crate::identity::CaError::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
                IdentityError::Ca(crate::identity::CaError::Unreachable { .. }) | IdentityError::CaTimeout { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            let reason = e.to_string();
            warn!(identity = %id, node = %state.node, %reason, "certificate request refused");
            let view = CertRequestView {
                identity: id.to_string(),
                node: state.node.clone(),
                issued: false,
                installed: false,
                serial: None,
                not_before: None,
                not_after: None,
                reason: Some(reason),
            };
            let mut resp = json(&view);
            *resp.status_mut() = status;
            resp
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("serialising: {e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_endpoints_need_privileged_access() {
        let post = Method::POST;
        // The TCP port (and an unprivileged socket peer): read-only.
        let refused = refusal(Access::ReadOnly, &post, "/certs/request").expect("refused");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refusal(Access::ReadOnly, &Method::GET, "/certs").is_none());
        assert!(refusal(Access::ReadOnly, &Method::GET, "/status").is_none());
        // The socket, to root or sluice's own user.
        assert!(refusal(Access::Privileged, &post, "/certs/request").is_none());
        assert_eq!(Access::of_peer_uid(0), Access::Privileged);
        // SAFETY: no preconditions.
        let own = unsafe { libc::geteuid() };
        assert_eq!(Access::of_peer_uid(own), Access::Privileged);
        let other = if own == 0 { 65534 } else { own + 1 };
        assert_eq!(Access::of_peer_uid(other), Access::ReadOnly);
    }

    #[tokio::test]
    async fn the_socket_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-1").join("admin.sock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"stale").unwrap();
        let _listener = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        // SAFETY: no preconditions.
        assert_eq!(stream.peer_cred().unwrap().uid(), unsafe { libc::geteuid() });
    }
}
