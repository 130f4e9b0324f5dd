//! The gRPC side: `istio.v1.auth.IstioCertificateService/CreateCertificate` over HTTP/2 and
//! TLS, and the request handler that runs the checks in order.
//!
//! The server is hyper's HTTP/2 server over rustls, with tonic's `server::Grpc` and the prost
//! codec for the one method (tonic's own transport would add a router and its TLS acceptor,
//! which cannot renew its certificate in place).
//!
//! Everything a caller without a token can make the CA hold is bounded ([`ServerLimits`]):
//!
//! - connections, over all sources and per source address (`admission`); beyond either, the
//!   connection is closed at accept, counted and logged (rate-limited);
//! - TLS and the HTTP/2 preface together within [`HANDSHAKE_TIMEOUT`] (the preface is read
//!   here, before hyper, so that a client that completes TLS and then says nothing does not
//!   keep its slot);
//! - an open connection closes (GOAWAY, then the streams in progress finish) once it has had
//!   no stream for [`IDLE_TIMEOUT`], and at the latest after [`MAX_CONNECTION_AGE`];
//! - per connection, [`MAX_STREAMS_PER_CONNECTION`] streams, [`MAX_HEADER_LIST_BYTES`] of
//!   headers, [`WINDOW_BYTES`] of flow-control window, [`MAX_MESSAGE_BYTES`] per message;
//! - request streams in progress, over all sources and per source: the slot is taken when the
//!   stream's headers arrive, before its body is read (beyond: `RESOURCE_EXHAUSTED` with
//!   `retry-after-ms` at once);
//! - one deadline, [`REQUEST_DEADLINE`], over each stream from its headers to its answer,
//!   including the wait for its body (beyond: `DEADLINE_EXCEEDED`).
//!
//! Order of the checks (each refusal has its own code and reason, see `refusal.rs`): ready →
//! token (its claims, then a TokenReview) → caller and node → the node's rate → identity → a
//! pod of it on the node → CSR → sign. The rate is taken as soon as the node is known, so a
//! node's refused requests cost it tokens too: the CA's work per node is bounded whatever the
//! node sends. Verifying the CSR and signing run on blocking threads, at most
//! [`SIGNING_THREADS`] at once: an RSA signature takes milliseconds, which the two async
//! worker threads must not spend.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tonic::metadata::MetadataMap;
use tonic::server::{Grpc, UnaryService};
use tonic::Status;
use tracing::{debug, info, warn};

use super::admission::{Admission, AdmissionLimits, StreamRefused};
use super::authn::{bearer_token, CachedReviewer, ReviewError, MAX_TOKEN_BYTES};
use super::claims::{self, ClaimProblem};
use super::csr::CsrDer;
use super::limits::{NodeRateLimiter, RateConfig};
use super::metrics::CaMetrics;
use super::pods::{PodStore, Readiness};
use super::policy::{authorize, identify_caller, PolicyConfig};
use super::refusal::Refusal;
use super::reload::SigningState;
use super::signer::{rfc3339, Issued};
use crate::identity::istio_ca::{
    IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH, IMPERSONATED_IDENTITY,
};
use crate::identity::SpiffeId;
use crate::l7::io::Prefixed;
use crate::lograte;

/// Connections served at once, over all sources.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections one source address may hold (a node agent needs one).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// TLS and the HTTP/2 preface must be done within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no stream in progress for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A connection is closed after this long in any case (istiod's default too): a node's
/// connection moves to another replica from time to time, and no slot is held forever.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// Concurrent streams per connection (a node agent keeps at most 16 in flight).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Request headers per stream (a projected token is about 1 KiB).
pub const MAX_HEADER_LIST_BYTES: u32 = 8 * 1024;
/// HTTP/2 flow-control window, per stream and per connection: what a caller can make the CA
/// buffer before it reads (a request is at most [`MAX_MESSAGE_BYTES`]).
pub const WINDOW_BYTES: u32 = 64 * 1024;
/// A request message: the CSR (at most 8 KiB) and a little metadata.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Requests being handled at once, over every connection.
pub const MAX_IN_FLIGHT: usize = 512;
/// Requests of one source address being handled at once (a node agent keeps at most 16).
pub const MAX_IN_FLIGHT_PER_SOURCE: usize = 32;
/// From a stream's headers to its answer, whatever it waits for (its body, a TokenReview, a
/// signing thread). Above the node agent's own 10 s call deadline, below nothing that matters.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(15);
/// What a caller refused as `busy` is told to wait.
pub const BUSY_RETRY_AFTER: Duration = Duration::from_millis(200);
/// The shortest certificate the CA issues, whatever is asked.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest `--max-lifetime-s` accepted (a year and a day).
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// CSR verifications and signatures at once, on blocking threads.
pub const SIGNING_THREADS: usize = 4;

/// The HTTP/2 client preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The bounds of the gRPC server (the constants above; tests shorten the timeouts).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub admission: AdmissionLimits,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connection_age: Duration,
    pub request_deadline: Duration,
    /// How long open connections may finish after the server is told to stop.
    pub drain: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            admission: AdmissionLimits {
                max_connections: MAX_CONNECTIONS,
                max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
                max_streams: MAX_IN_FLIGHT,
                max_streams_per_source: MAX_IN_FLIGHT_PER_SOURCE,
            },
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connection_age: MAX_CONNECTION_AGE,
            request_deadline: REQUEST_DEADLINE,
            drain: super::DRAIN,
        }
    }
}

/// The rules the handler applies.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub policy: PolicyConfig,
    /// `--max-lifetime-s`.
    pub max_lifetime: Duration,
    pub rate: RateConfig,
}

/// The CA: everything a request needs.
pub struct CaService {
    config: ServiceConfig,
    signing: Arc<SigningState>,
    reviewer: Arc<CachedReviewer>,
    pods: Arc<PodStore>,
    limiter: NodeRateLimiter,
    metrics: Arc<CaMetrics>,
    signing_slots: Arc<Semaphore>,
}

/// Who asked for what, for the one log line per request.
#[derive(Default)]
struct Asked {
    node: Option<String>,
    user: Option<String>,
    identity: Option<String>,
}

impl CaService {
    pub fn new(
        config: ServiceConfig,
        signing: Arc<SigningState>,
        reviewer: Arc<CachedReviewer>,
        pods: Arc<PodStore>,
        metrics: Arc<CaMetrics>,
    ) -> CaService {
        let limiter = NodeRateLimiter::new(config.rate, super::limits::DEFAULT_MAX_NODES);
        CaService {
            config,
            signing,
            reviewer,
            pods,
            limiter,
            metrics,
            signing_slots: Arc::new(Semaphore::new(SIGNING_THREADS)),
        }
    }

    pub fn limiter(&self) -> &NodeRateLimiter {
        &self.limiter
    }

    pub fn pods(&self) -> &Arc<PodStore> {
        &self.pods
    }

    pub fn metrics(&self) -> &Arc<CaMetrics> {
        &self.metrics
    }

    /// Whether the CA can decide and sign now: its pod view is complete and followed, and its
    /// signing chain has not expired. The readiness probe answers the same.
    pub fn readiness(&self) -> Result<(), Refusal> {
        match self.pods.readiness(Instant::now()) {
            Readiness::Ready => {}
            Readiness::NotSynced => return Err(Refusal::NotReady),
            Readiness::Stale(failing) => return Err(Refusal::WatchStale { failing_s: failing.as_secs() }),
        }
        let not_after = self.signing.signer().info().not_after;
        if not_after <= OffsetDateTime::now_utc() + MIN_LIFETIME {
            return Err(Refusal::SigningUnavailable(format!(
                "its signing chain expires at {} (or has expired): replace the signing certificate (or its chain)",
                rfc3339(not_after)
            )));
        }
        Ok(())
    }

    /// Handles one `CreateCertificate`, records it and logs it.
    pub async fn create_certificate(
        &self,
        metadata: &MetadataMap,
        request: &IstioCertificateRequest,
        peer: SocketAddr,
    ) -> Result<IstioCertificateResponse, Status> {
        let started = Instant::now();
        let mut asked = Asked::default();
        let outcome = self.decide_and_sign(metadata, request, peer, &mut asked).await;
        let took = started.elapsed();
        match outcome {
            Ok(issued) => {
                self.metrics.issued(took);
                info!(
                    node = asked.node.as_deref().unwrap_or("-"), caller = asked.user.as_deref().unwrap_or("-"),
                    identity = ?asked.identity.as_deref().unwrap_or("-"), %peer, serial = %issued.serial_hex,
                    not_after = %rfc3339(issued.not_after), ms = took.as_millis() as u64, "issued a certificate"
                );
                Ok(IstioCertificateResponse { cert_chain: issued.chain_pem })
            }
            Err(refusal) => Err(self.refused(&refusal, &asked, peer, took)),
        }
    }

    /// Counts and logs a refusal (at most one line per reason and source address per period:
    /// the request rate is the caller's to choose), and returns its status.
    fn refused(&self, refusal: &Refusal, asked: &Asked, peer: SocketAddr, took: Duration) -> Status {
        self.metrics.refused(refusal, took);
        let reason = refusal.label();
        if let Some(suppressed) = lograte::shared().allow(reason, &lograte::source_of_ip(peer.ip())) {
            let code = format!("{:?}", refusal.code());
            let (node, user) = (asked.node.as_deref().unwrap_or("-"), asked.user.as_deref().unwrap_or("-"));
            // Node-supplied text (the identity asked for, CSR contents in the message) is
            // logged escaped.
            let (identity, message) = (asked.identity.as_deref().unwrap_or("-"), refusal.to_string());
            // Back-pressure is expected (a node restarting asks for everything at once);
            // every other refusal is something an operator may have to act on.
            if refusal.retry_after().is_some() || refusal.code() == tonic::Code::Unavailable {
                info!(%node, caller = %user, ?identity, %peer, %code, %reason, ?message, suppressed, "refused a certificate request");
            } else {
                warn!(%node, caller = %user, ?identity, %peer, %code, %reason, ?message, suppressed, "refused a certificate request");
            }
        }
        refusal.to_status()
    }

    async fn decide_and_sign(
        &self,
        metadata: &MetadataMap,
        request: &IstioCertificateRequest,
        peer: SocketAddr,
        asked: &mut Asked,
    ) -> Result<Issued, Refusal> {
        self.readiness()?;
        let policy = &self.config.policy;

        let token = bearer_token(metadata)
            .ok_or_else(|| Refusal::MissingToken { audience: policy.audience.clone() })?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::TokenRejected(format!("the token is longer than {MAX_TOKEN_BYTES} bytes")));
        }
        self.check_claims(token)?;
        let reviewed =
            self.reviewer.review_from(token, &policy.audience, peer.ip()).await.map_err(|e| match e {
                ReviewError::Rejected(why) => Refusal::TokenRejected(why),
                ReviewError::Unavailable(why) => Refusal::ReviewUnavailable(why),
                e @ ReviewError::Throttled { retry_after, .. } => {
                    Refusal::ReviewRateLimited { reason: e.to_string(), retry_after }
                }
            })?;
        asked.user = Some(reviewed.username.clone());
        let caller = self.pods.read(|pods| identify_caller(&reviewed, policy, pods))?;
        asked.node = Some(caller.node.clone());

        self.limiter.check(caller.node.as_str(), Instant::now()).map_err(|retry_after| {
            Refusal::RateLimited {
                node: caller.node.clone(),
                rate: self.config.rate.rate,
                burst: self.config.rate.burst,
                retry_after,
            }
        })?;

        let csr = CsrDer::from_pem(&request.csr);
        let requested = match request.impersonated_identity() {
            Some(id) => id.to_string(),
            None if request
                .metadata
                .as_ref()
                .is_some_and(|m| m.fields.contains_key(IMPERSONATED_IDENTITY)) =>
            {
                return Err(Refusal::BadIdentity {
                    identity: String::new(),
                    reason: format!("the {IMPERSONATED_IDENTITY} metadata field must be a string"),
                })
            }
            // Without ImpersonatedIdentity, the CSR names the identity (as istio-agent asks).
            None => csr
                .as_ref()
                .map_err(Clone::clone)
                .and_then(CsrDer::sole_uri)
                .map_err(|problem| Refusal::BadCsr { identity: "(none named)".into(), problem })?,
        };
        asked.identity = Some(requested.clone());
        let identity: SpiffeId = requested.parse().map_err(|e: crate::identity::SpiffeError| {
            Refusal::BadIdentity { identity: requested.clone(), reason: e.to_string() }
        })?;
        let identity_uri = identity.to_string();

        self.pods.read(|pods| authorize(&caller, &identity, policy, pods))?;

        let lifetime = lifetime(request.validity_duration, self.config.max_lifetime);
        let signer = self.signing.signer();
        // The request's deadline bounds this wait too.
        let _slot = self.signing_slots.acquire().await.map_err(|_| Refusal::Signing {
            identity: identity_uri.clone(),
            reason: "the CA is stopping".into(),
        })?;
        off_runtime(move || {
            let key = csr
                .and_then(|csr| csr.check(&identity_uri))
                .map_err(|problem| Refusal::BadCsr { identity: identity_uri.clone(), problem })?;
            signer
                .issue_workload(&identity, &key, lifetime)
                .map_err(|reason| Refusal::Signing { identity: identity_uri, reason })
        })
        .await
    }

    /// The token's own claims, before any review (see `claims`).
    fn check_claims(&self, token: &str) -> Result<(), Refusal> {
        let policy = &self.config.policy;
        let (ns, name) = &policy.node_service_account;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        claims::check(token, &policy.audience, (ns, name), now).map_err(|problem| match problem {
            ClaimProblem::NotServiceAccountToken(why) => {
                Refusal::TokenRejected(format!("not a Kubernetes ServiceAccount token: {why}"))
            }
            ClaimProblem::WrongAudience(got) => Refusal::WrongAudience { audience: policy.audience.clone(), got },
            ClaimProblem::Expired(ago) => Refusal::TokenRejected(format!(
                "the token expired {ago} s ago (by its exp claim); the kubelet renews a projected token before \
                 it expires: read the token file again for each request"
            )),
            ClaimProblem::WrongSubject(subject) => Refusal::NotNodeAccount {
                user: format!("subject {subject:?} (by its claims)"),
                expected: format!("{ns}/{name}"),
            },
        })
    }
}

/// Runs `work` on a blocking thread (CPU-bound: verifying a CSR's signature, signing), so that
/// the async worker threads keep serving other connections meanwhile.
pub async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(Refusal::Signing { identity: String::new(), reason: format!("the signing thread failed: {e}") })
    })
}

/// The validity to issue: what was asked (0 or less: the maximum), at most the maximum, at
/// least [`MIN_LIFETIME`].
pub fn lifetime(requested_s: i64, max: Duration) -> Duration {
    let asked = u64::try_from(requested_s).ok().filter(|s| *s > 0).map(Duration::from_secs).unwrap_or(max);
    asked.min(max).max(MIN_LIFETIME)
}

/// tonic's view of the one method.
#[derive(Clone)]
struct CreateCertificate {
    service: Arc<CaService>,
    peer: SocketAddr,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<tonic::Response<IstioCertificateResponse>, Status>> + Send>>;

impl UnaryService<IstioCertificateRequest> for CreateCertificate {
    type Response = IstioCertificateResponse;
    type Future = ResponseFuture;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let (service, peer) = (self.service.clone(), self.peer);
        Box::pin(async move {
            let (metadata, _, message) = request.into_parts();
            service.create_certificate(&metadata, &message, peer).await.map(tonic::Response::new)
        })
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Streams in progress on one connection, and when the last one ended.
struct Activity {
    started: Instant,
    active: AtomicUsize,
    /// Milliseconds after `started` when a stream last ended.
    last_ms: AtomicU64,
}

/// Counts a stream as in progress until dropped.
struct ActiveStream(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            started: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> ActiveStream {
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveStream(self.clone())
    }

    /// When the connection will have been idle for `idle` (None while a stream runs).
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.started + Duration::from_millis(self.last_ms.load(Ordering::SeqCst)) + idle)
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(ms, Ordering::SeqCst);
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves gRPC over TLS on `listener` until `shutdown` turns true; then stops accepting, sends
/// GOAWAY on every connection, and returns once they have finished (or after `limits.drain`).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<CaService>,
    limits: ServerLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let admission = Admission::new(limits.admission);
    service.metrics.set_admission(admission.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    if let Some(suppressed) = lograte::shared().allow("ca-accept-failed", "-") {
                        warn!(error = %e, suppressed, "CA accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let permit = match admission.connection(peer.ip()) {
            Ok(p) => p,
            Err(refused) => {
                service.metrics.connection_refused(refused.label());
                if let Some(suppressed) =
                    lograte::shared().allow("ca-connection-refused", &lograte::source_of_ip(peer.ip()))
                {
                    warn!(%peer, reason = refused.label(), limit = limits.admission.max_connections,
                        per_source = limits.admission.max_connections_per_source, suppressed,
                        "connection refused: too many connections");
                }
                continue;
            }
        };
        let (acceptor, service, admission, shutdown) =
            (acceptor.clone(), service.clone(), admission.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let Some(io) = handshake(&acceptor, tcp, peer, &limits, &service).await else { return };
            serve_connection(io, peer, service, admission, limits, shutdown).await;
        });
    }
    drop(listener);
    // Every connection holds a permit until it ends.
    if tokio::time::timeout(limits.drain, admission.all_closed()).await.is_err() {
        info!(
            after_s = limits.drain.as_secs(),
            "connections still open after the drain period; stopping anyway"
        );
    }
}

type Io = Prefixed<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// TLS, then the HTTP/2 preface, within the handshake timeout. `None` (counted, logged at
/// debug, rate-limited) if either fails.
async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    limits: &ServerLimits,
    service: &CaService,
) -> Option<Io> {
    let work = async {
        let mut tls = acceptor.accept(tcp).await.map_err(|e| ("tls", e.to_string()))?;
        let mut preface = [0u8; PREFACE.len()];
        tls.read_exact(&mut preface)
            .await
            .map_err(|e| ("preface", format!("reading the HTTP/2 preface: {e}")))?;
        if &preface != PREFACE {
            return Err(("preface", "not HTTP/2 (no client preface)".to_string()));
        }
        Ok(Prefixed::new(Bytes::from_static(PREFACE), tls))
    };
    let failure = match tokio::time::timeout(limits.handshake_timeout, work).await {
        Ok(Ok(io)) => return Some(io),
        Ok(Err(failure)) => failure,
        Err(_) => {
            ("timeout", format!("no TLS handshake and HTTP/2 preface within {:?}", limits.handshake_timeout))
        }
    };
    service.metrics.handshake_failed(failure.0);
    if let Some(suppressed) =
        lograte::shared().allow("ca-handshake-failed", &lograte::source_of_ip(peer.ip()))
    {
        debug!(%peer, reason = failure.0, error = %failure.1, suppressed, "CA connection closed before its first request");
    }
    None
}

/// HTTP/2 on one connection until it ends, goes idle, grows old, or the server stops.
async fn serve_connection(
    io: Io,
    peer: SocketAddr,
    service: Arc<CaService>,
    admission: Arc<Admission>,
    limits: ServerLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = Activity::new();
    let svc = {
        let (service, activity) = (service.clone(), activity.clone());
        service_fn(move |req: Request<Incoming>| {
            let (service, admission) = (service.clone(), admission.clone());
            let _active = activity.begin();
            async move {
                let _active = _active;
                Ok::<_, std::convert::Infallible>(
                    answer(req, service, admission, peer, limits.request_deadline).await,
                )
            }
        })
    };
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .initial_stream_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .max_send_buf_size(WINDOW_BYTES as usize)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let closes_at = activity.started + limits.max_connection_age;
    // Set once GOAWAY is sent: the streams in progress get until then to finish.
    let mut closing: Option<Instant> = None;
    let ended = loop {
        let wake = closing.unwrap_or_else(|| {
            let idle_at =
                activity.idle_at(limits.idle_timeout).unwrap_or(Instant::now() + limits.idle_timeout);
            idle_at.min(closes_at)
        });
        tokio::select! {
            ended = conn.as_mut() => break Some(ended),
            _ = stopped(&mut shutdown), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + limits.drain);
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                if closing.is_some_and(|deadline| now >= deadline) {
                    debug!(%peer, "CA connection closed with streams still open after GOAWAY");
                    break None;
                }
                if closing.is_some() {
                    continue;
                }
                let why = if now >= closes_at {
                    "max_age"
                } else if activity.idle_at(limits.idle_timeout).is_some_and(|at| now >= at) {
                    "idle"
                } else {
                    continue;
                };
                service.metrics.connection_closed(why);
                debug!(%peer, reason = why, "closing the CA connection (GOAWAY)");
                conn.as_mut().graceful_shutdown();
                closing = Some(now + limits.request_deadline + Duration::from_secs(1));
            }
        }
    };
    if let Some(Err(e)) = ended {
        debug!(%peer, error = %e, "CA connection ended with an error");
    }
}

/// One request stream: admitted when its headers arrive, answered within the deadline.
async fn answer(
    req: Request<Incoming>,
    service: Arc<CaService>,
    admission: Arc<Admission>,
    peer: SocketAddr,
    deadline: Duration,
) -> http::Response<tonic::body::Body> {
    let started = Instant::now();
    if req.uri().path() != CREATE_CERTIFICATE_PATH {
        service.metrics.unknown_method();
        if let Some(suppressed) =
            lograte::shared().allow("ca-unknown-method", &lograte::source_of_ip(peer.ip()))
        {
            info!(%peer, path = ?req.uri().path(), suppressed, "request for a method this CA does not serve");
        }
        let status = Status::unimplemented(format!("this server answers only {CREATE_CERTIFICATE_PATH}"));
        return status.into_http();
    }
    let _slot = match admission.stream(peer.ip()) {
        Ok(slot) => slot,
        Err(refused) => {
            let limits = admission.limits();
            let refusal = match refused {
                StreamRefused::Limit => {
                    Refusal::Busy { limit: limits.max_streams, retry_after: BUSY_RETRY_AFTER }
                }
                StreamRefused::SourceLimit => Refusal::SourceBusy {
                    limit: limits.max_streams_per_source,
                    retry_after: BUSY_RETRY_AFTER,
                },
            };
            return service.refused(&refusal, &Asked::default(), peer, started.elapsed()).into_http();
        }
    };
    let method = CreateCertificate { service: service.clone(), peer };
    let mut grpc =
        Grpc::new(tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default())
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
    match tokio::time::timeout(deadline, grpc.unary(method, req)).await {
        Ok(response) => response,
        Err(_) => {
            let refusal = Refusal::Deadline(deadline);
            service.refused(&refusal, &Asked::default(), peer, started.elapsed()).into_http()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifetime_is_capped_and_floored() {
        let max = Duration::from_secs(86400);
        assert_eq!(lifetime(3600, max), Duration::from_secs(3600));
        assert_eq!(lifetime(10 * 86400, max), max);
        assert_eq!(lifetime(0, max), max);
        assert_eq!(lifetime(-5, max), max);
        assert_eq!(lifetime(10, max), MIN_LIFETIME);
    }
}
