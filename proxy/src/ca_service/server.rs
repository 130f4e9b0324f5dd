//! The gRPC side: `istio.v1.auth.IstioCertificateService/CreateCertificate` over HTTP/2 and
//! TLS, and the request handler that runs the checks in order.
//!
//! The server is hyper's HTTP/2 server over rustls, with tonic's `server::Grpc` and the prost
//! codec for the one method (tonic's own transport would add a router and its TLS acceptor,
//! which cannot renew its certificate in place). Bounds: connections at once
//! ([`MAX_CONNECTIONS`], beyond: closed at accept), TLS plus the HTTP/2 preface within
//! [`HANDSHAKE_TIMEOUT`], streams per connection, header list size, message size (a CSR of a
//! few KiB at most), and requests in progress ([`MAX_IN_FLIGHT`], beyond: `RESOURCE_EXHAUSTED`
//! with `retry-after-ms`).
//!
//! Order of the checks (each refusal has its own code and reason, see `refusal.rs`): ready →
//! token → caller and node → the node's rate → identity → a pod of it on the node → CSR →
//! sign. The rate is taken as soon as the node is known, so a node's refused requests cost it
//! tokens too: the CA's work per node is bounded whatever the node sends.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tonic::metadata::MetadataMap;
use tonic::server::{Grpc, UnaryService};
use tonic::Status;
use tracing::{debug, info, warn};

use super::authn::{bearer_token, ReviewError, TokenReviewer, MAX_TOKEN_BYTES};
use super::csr::CsrDer;
use super::limits::{NodeRateLimiter, RateConfig};
use super::metrics::CaMetrics;
use super::pods::PodStore;
use super::policy::{authorize, identify_caller, PolicyConfig};
use super::refusal::Refusal;
use super::reload::SigningState;
use super::signer::{rfc3339, Issued};
use crate::identity::istio_ca::{
    IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH, IMPERSONATED_IDENTITY,
};
use crate::identity::SpiffeId;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// TLS and the HTTP/2 preface must be done within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent streams per connection (a node's burst beyond it waits in its own client).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Request headers per stream (a projected token is about 1 KiB).
pub const MAX_HEADER_LIST_BYTES: u32 = 32 * 1024;
/// A request message: the CSR (at most 8 KiB) and a little metadata.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Requests being handled at once, over every connection.
pub const MAX_IN_FLIGHT: usize = 1024;
/// What a caller refused as `busy` is told to wait.
pub const BUSY_RETRY_AFTER: Duration = Duration::from_millis(200);
/// The shortest certificate the CA issues, whatever is asked.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);

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
    reviewer: Arc<dyn TokenReviewer>,
    pods: Arc<PodStore>,
    limiter: NodeRateLimiter,
    metrics: Arc<CaMetrics>,
    in_flight: Semaphore,
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
        reviewer: Arc<dyn TokenReviewer>,
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
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    pub fn limiter(&self) -> &NodeRateLimiter {
        &self.limiter
    }

    pub fn pods(&self) -> &Arc<PodStore> {
        &self.pods
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
        let outcome = self.decide_and_sign(metadata, request, &mut asked).await;
        let took = started.elapsed();
        let (node, user, identity) = (
            asked.node.as_deref().unwrap_or("-"),
            asked.user.as_deref().unwrap_or("-"),
            asked.identity.as_deref().unwrap_or("-"),
        );
        match outcome {
            Ok(issued) => {
                self.metrics.issued(took);
                info!(
                    %node, caller = %user, %identity, %peer, serial = %issued.serial_hex,
                    not_after = %rfc3339(issued.not_after), ms = took.as_millis() as u64, "issued a certificate"
                );
                Ok(IstioCertificateResponse { cert_chain: issued.chain_pem })
            }
            Err(refusal) => {
                self.metrics.refused(&refusal, took);
                let code = format!("{:?}", refusal.code());
                let reason = refusal.label();
                // Back-pressure is expected (a node restarting asks for everything at once);
                // every other refusal is something an operator may have to act on.
                if refusal.retry_after().is_some() || refusal == Refusal::NotReady {
                    info!(%node, caller = %user, %identity, %peer, %code, %reason, message = %refusal, "refused a certificate request");
                } else {
                    warn!(%node, caller = %user, %identity, %peer, %code, %reason, message = %refusal, "refused a certificate request");
                }
                Err(refusal.to_status())
            }
        }
    }

    async fn decide_and_sign(
        &self,
        metadata: &MetadataMap,
        request: &IstioCertificateRequest,
        asked: &mut Asked,
    ) -> Result<Issued, Refusal> {
        let _slot = self
            .in_flight
            .try_acquire()
            .map_err(|_| Refusal::Busy { limit: MAX_IN_FLIGHT, retry_after: BUSY_RETRY_AFTER })?;
        if !self.pods.synced() {
            return Err(Refusal::NotReady);
        }
        let policy = &self.config.policy;

        let token = bearer_token(metadata)
            .ok_or_else(|| Refusal::MissingToken { audience: policy.audience.clone() })?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::TokenRejected(format!("the token is longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let reviewed = self.reviewer.review(token, &policy.audience).await.map_err(|e| match e {
            ReviewError::Rejected(why) => Refusal::TokenRejected(why),
            ReviewError::Unavailable(why) => Refusal::ReviewUnavailable(why),
        })?;
        asked.user = Some(reviewed.username.clone());
        let caller = self.pods.read(|pods| identify_caller(&reviewed, policy, pods))?;
        asked.node = Some(caller.node.clone());

        self.limiter.check(&caller.node, Instant::now()).map_err(|retry_after| Refusal::RateLimited {
            node: caller.node.clone(),
            rate: self.config.rate.rate,
            burst: self.config.rate.burst,
            retry_after,
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

        let key = csr
            .and_then(|csr| csr.check(&identity_uri))
            .map_err(|problem| Refusal::BadCsr { identity: identity_uri.clone(), problem })?;
        let lifetime = lifetime(request.validity_duration, self.config.max_lifetime);
        self.signing
            .signer()
            .issue_workload(&identity, &key, lifetime)
            .map_err(|reason| Refusal::Signing { identity: identity_uri, reason })
    }
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

/// Serves gRPC over TLS on `listener` until `shutdown` turns true; then stops accepting, sends
/// GOAWAY on every connection, and returns once they have finished (or after `drain`).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<CaService>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "CA accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%peer, limit = MAX_CONNECTIONS, "connection refused: too many connections");
            continue;
        };
        let (acceptor, service, mut shutdown) = (acceptor.clone(), service.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let svc = service_fn(move |req: Request<Incoming>| {
                let method = CreateCertificate { service: service.clone(), peer };
                async move {
                    if req.uri().path() != CREATE_CERTIFICATE_PATH {
                        let status = Status::unimplemented(format!(
                            "unknown method {}; this server answers {CREATE_CERTIFICATE_PATH}",
                            req.uri().path()
                        ));
                        return Ok::<_, std::convert::Infallible>(status.into_http());
                    }
                    let mut grpc = Grpc::new(tonic_prost::ProstCodec::<
                        IstioCertificateResponse,
                        IstioCertificateRequest,
                    >::default())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES);
                    Ok(grpc.unary(method, req).await)
                }
            });
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .max_header_list_size(MAX_HEADER_LIST_BYTES)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), svc);
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => Some(ended),
                _ = stopped(&mut shutdown) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                debug!(%peer, error = %e, "CA connection ended with an error");
            }
        });
    }
    drop(listener);
    // Every connection holds a permit until it ends.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, connections.acquire_many(all)).await.is_err() {
        info!(after_s = drain.as_secs(), "connections still open after the drain period; stopping anyway");
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
