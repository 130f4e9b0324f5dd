//! [`RemoteCa`]: the node agent's client of a CA service (`sluice ca serve`, istiod, istio-csr),
//! speaking Istio's certificate protocol (`IstioCertificateService/CreateCertificate`) over
//! gRPC+TLS. The node holds no signing key; it holds the trust bundle (a file) and a projected
//! ServiceAccount token (a file the kubelet rotates).
//!
//! One request per signing: the token is read from its file (so a rotated token is used at
//! once), the CSR goes as PEM with the identity as its only SAN, the identity as
//! `ImpersonatedIdentity` metadata (as ztunnel sends it to istiod), the wanted lifetime as
//! `validity_duration`, the token as `authorization: Bearer`. The answer is checked before the
//! manager sees it: the leaf must name exactly the identity asked for and its chain must lead to
//! a root of the bundle (a certificate peers would refuse is never installed). gRPC statuses
//! become [`CaError`]s the manager can act on: unreachable and rate-limited (with the CA's
//! `retry-after-ms`) are retried, refusals carry the CA's reason.
//!
//! The CA's own serving certificate is verified against the same bundle (the CA service issues
//! it under its signing chain) and the URL's host, or `--ca-server-name`. Every handshake uses
//! the bundle in force, so a bundle change applies to the next connection.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tracing::{debug, info};
use x509_parser::extensions::GeneralName;

use super::bundle_file::TrustBundleFile;
use super::ca::{CaDescription, CaError, CertificateAuthority, SignFuture, SignRequest};
use super::istio_ca::{IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH};
use super::spiffe::SpiffeId;
use super::verify::{self, TrustBundle};
use super::x509;

/// Where the DaemonSet mounts the projected ServiceAccount token for the CA.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/sluice-ca/token";
/// The metadata key of the CA's rate-limit answer (milliseconds to wait).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// The longest `retry-after-ms` obeyed: a CA (or whoever answers in its name) must not be able
/// to park an identity for days, nor overflow the clock arithmetic with a huge value; past
/// this the node's own backoff applies.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The delay a `retry-after-ms` value asks for, capped at [`MAX_RETRY_AFTER`]; `None` if it is
/// not a number of milliseconds.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let ms = value.trim().parse::<u64>().ok()?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER))
}

/// A token file larger than this is refused (a JWT is a few KB).
const MAX_TOKEN_BYTES: u64 = 64 * 1024;
/// A CA answer larger than this is refused (a chain is a few KB).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// At most this many certificates in a chain (leaf, intermediates, root).
const MAX_CHAIN: usize = 16;

/// How the node reaches its CA.
#[derive(Debug, Clone)]
pub struct RemoteCaConfig {
    /// `https://HOST:PORT` (`--ca-addr`).
    pub addr: String,
    /// The name the CA's certificate must carry, when it is not the URL's host.
    pub server_name: Option<String>,
    /// The projected ServiceAccount token, read for every request.
    pub token_file: PathBuf,
    /// The node this sluice runs on (for messages: the CA finds the node from the token).
    pub node: String,
    /// The validity asked for (the CA may shorten it).
    pub requested_lifetime: Duration,
    /// Deadline of one call, from sending to the answer.
    pub call_timeout: Duration,
    /// TCP connect and TLS handshake deadline.
    pub connect_timeout: Duration,
    /// Calls in flight at once; the others wait their turn (a node restart with hundreds of
    /// identities must not open hundreds of streams to the CA at once).
    pub max_in_flight: usize,
}

impl RemoteCaConfig {
    pub fn new(addr: impl Into<String>, node: impl Into<String>) -> RemoteCaConfig {
        RemoteCaConfig {
            addr: addr.into(),
            server_name: None,
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            node: node.into(),
            requested_lifetime: super::DEFAULT_CERT_LIFETIME,
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_in_flight: 16,
        }
    }
}

/// What the remote CA client did, for `sluice status`.
#[derive(Debug, Default)]
pub struct RemoteCaCounters {
    pub requests: AtomicU64,
    pub issued: AtomicU64,
    pub refused: AtomicU64,
    pub unreachable: AtomicU64,
    pub rate_limited: AtomicU64,
    pub bad_responses: AtomicU64,
    /// Requests that waited for one of the `max_in_flight` slots.
    pub queued: AtomicU64,
}

pub struct RemoteCa {
    config: RemoteCaConfig,
    bundle: Arc<TrustBundleFile>,
    channel: Channel,
    in_flight: tokio::sync::Semaphore,
    pub counters: RemoteCaCounters,
}

impl fmt::Debug for RemoteCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteCa").field("addr", &self.config.addr).finish_non_exhaustive()
    }
}

impl RemoteCa {
    /// A client of the CA at `config.addr`, trusting `bundle`. Connects lazily (a CA that is down
    /// at start delays certificates, not the node). Must be called inside a tokio runtime (the
    /// gRPC channel's worker task starts on it).
    pub fn new(config: RemoteCaConfig, bundle: Arc<TrustBundleFile>) -> Result<RemoteCa, CaError> {
        let bad = |reason: String| CaError::Config(format!("--ca-addr {}: {reason}", config.addr));
        let uri: http::Uri = config.addr.parse().map_err(|e| bad(format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must be https://HOST:PORT (the CA is reached over TLS)".into()));
        }
        let host = uri.host().ok_or_else(|| bad("has no host".into()))?;
        if uri.port_u16().is_none() {
            return Err(bad("has no port (the CA service listens on 15012)".into()));
        }
        if !matches!(uri.path(), "" | "/") {
            return Err(bad("must not have a path".into()));
        }
        // IPv6 hosts come bracketed in URLs, not in certificates.
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']').to_string());
        ServerName::try_from(name.clone()).map_err(|e| {
            CaError::Config(format!("{name:?} is not a DNS name or IP address to verify the CA against: {e}"))
        })?;
        let tls = ClientTlsConfig::new()
            .domain_name(name.clone())
            .assume_http2(true)
            .timeout(config.connect_timeout);
        let verifier = Arc::new(CaServerVerifier { bundle: bundle.clone() });
        let endpoint = Endpoint::from_shared(config.addr.clone())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .tls_config_with_verifier(tls, verifier)
            .map_err(|e| bad(format!("TLS configuration: {e}")))?;
        let channel = endpoint.connect_lazy();
        info!(addr = %config.addr, server_name = %name, token_file = %config.token_file.display(),
            trust_bundle = %bundle.path().display(), "remote CA: this node holds no signing key");
        let in_flight = tokio::sync::Semaphore::new(config.max_in_flight.max(1));
        Ok(RemoteCa { config, bundle, channel, in_flight, counters: RemoteCaCounters::default() })
    }

    pub fn bundle(&self) -> &Arc<TrustBundleFile> {
        &self.bundle
    }

    async fn sign_remote(&self, req: SignRequest) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let permit = match self.in_flight.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                self.in_flight.acquire().await.map_err(|_| self.unreachable("the client is shutting down"))?
            }
        };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.call(&req).await;
        drop(permit);
        let counter = match &result {
            Ok(_) => &self.counters.issued,
            Err(CaError::Unreachable { .. }) => &self.counters.unreachable,
            Err(CaError::RateLimited { .. }) => &self.counters.rate_limited,
            Err(CaError::BadResponse { .. }) => &self.counters.bad_responses,
            Err(_) => &self.counters.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn call(&self, req: &SignRequest) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let token = read_token(&self.config.token_file).await?;
        let csr_pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", req.csr_der.clone()));
        let validity = i64::try_from(self.config.requested_lifetime.as_secs()).unwrap_or(i64::MAX);
        let mut request = tonic::Request::new(IstioCertificateRequest::impersonating(
            csr_pem,
            validity,
            &req.identity.to_string(),
        ));
        request.set_timeout(self.config.call_timeout);
        let bearer = format!("Bearer {token}").parse().map_err(|_| CaError::Credential {
            path: self.config.token_file.clone(),
            reason: "holds characters that cannot travel in a header (is it a token?)".into(),
        })?;
        request.metadata_mut().insert("authorization", bearer);

        let call = async {
            let mut grpc =
                tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES);
            grpc.ready().await.map_err(|e| self.unreachable(&error_chain(&e)))?;
            let codec =
                tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
            grpc.unary(request, http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH), codec)
                .await
                .map_err(|status| self.status_error(&req.identity, status))
        };
        // The grpc-timeout header tells the CA; this bounds the wait here whatever it does.
        let response = match tokio::time::timeout(self.config.call_timeout, call).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(self.unreachable(&format!("no answer within {:?}", self.config.call_timeout)));
            }
        };
        let chain = self.checked_chain(&req.identity, response.into_inner())?;
        debug!(identity = %req.identity, certificates = chain.len(), "the CA issued a certificate");
        Ok(chain)
    }

    fn unreachable(&self, reason: &str) -> CaError {
        CaError::Unreachable { addr: self.config.addr.clone(), reason: reason.to_string() }
    }

    /// A gRPC status as the manager understands it (codes as the contract assigns them).
    fn status_error(&self, identity: &SpiffeId, status: Status) -> CaError {
        let addr = self.config.addr.clone();
        let reason = status_reason(&status);
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                let hint = if reason.contains("invalid peer certificate") {
                    " (the CA's certificate must lead to a root of --ca-trust-bundle and name the --ca-addr \
                     host, or --ca-server-name)"
                } else {
                    ""
                };
                CaError::Unreachable { addr, reason: format!("{reason}{hint}") }
            }
            Code::Unauthenticated => CaError::Unauthenticated { addr, reason },
            Code::PermissionDenied => {
                CaError::NotAuthorized { node: self.config.node.clone(), identity: identity.clone(), reason }
            }
            Code::InvalidArgument => CaError::InvalidCsr { identity: identity.clone(), reason },
            Code::ResourceExhausted => {
                let retry_after = status
                    .metadata()
                    .get(RETRY_AFTER_MS)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                CaError::RateLimited { addr, retry_after, reason }
            }
            code => CaError::Remote { addr, code: code_name(code), reason },
        }
    }

    /// The chain from the CA's answer, checked: PEM, exactly the identity, leads to the bundle.
    /// Returns the leaf and intermediates (the root, which peers hold already, is left out).
    fn checked_chain(
        &self,
        identity: &SpiffeId,
        response: IstioCertificateResponse,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let bad = |reason: String| CaError::BadResponse {
            addr: self.config.addr.clone(),
            identity: identity.clone(),
            reason,
        };
        let mut chain: Vec<CertificateDer<'static>> = Vec::new();
        for (i, pem) in response.cert_chain.iter().enumerate() {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(cert.map_err(|e| bad(format!("cert_chain[{i}] is not PEM: {e}")))?);
                if chain.len() > MAX_CHAIN {
                    return Err(bad(format!("more than {MAX_CHAIN} certificates")));
                }
            }
        }
        let leaf = chain.first().ok_or_else(|| bad("an empty certificate chain".into()))?;
        check_leaf_names(leaf, identity).map_err(bad)?;
        let info = x509::leaf_info(leaf).map_err(|e| bad(e.to_string()))?;
        check_lifetime(info.not_after, time::OffsetDateTime::now_utc(), self.config.requested_lifetime)
            .map_err(bad)?;

        // Istio's convention: the last certificate is the root. Peers hold the roots already, so
        // it is not sent; but it must be one of ours, or nobody would accept the leaf.
        let bundle = self.bundle.current();
        if chain.len() > 1 {
            let last = chain.last().expect("non-empty");
            let parsed = x509::parse(last).map_err(|e| bad(format!("its last certificate: {e}")))?;
            let self_issued = parsed.subject().as_raw() == parsed.issuer().as_raw();
            let subject = parsed.subject().to_string();
            drop(parsed);
            if self_issued {
                if !bundle.certs.contains(last) {
                    return Err(bad(format!(
                        "its chain ends at the root \"{subject}\", which is not in the trust bundle {} \
                         (add the CA's root to the bundle before the CA signs under it)",
                        self.bundle.path().display()
                    )));
                }
                chain.pop();
            }
        }
        let trust = TrustBundle::new(bundle.certs.clone()).map_err(bad)?;
        let algs = self.bundle.provider().signature_verification_algorithms;
        match verify::check_own_chain(&trust, &algs, &chain) {
            Ok(got) if got == *identity => Ok(chain),
            Ok(got) => Err(bad(format!("a certificate for {got}"))),
            Err(e) => Err(bad(e.to_string())),
        }
    }
}

impl CertificateAuthority for RemoteCa {
    fn sign(&self, req: SignRequest) -> SignFuture<'_> {
        Box::pin(self.sign_remote(req))
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.bundle.certs()
    }

    fn bundle_updates(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.bundle.subscribe())
    }

    fn describe(&self) -> CaDescription {
        let (loaded, error) = self.bundle.status();
        CaDescription {
            mode: "remote".into(),
            address: Some(self.config.addr.clone()),
            trust_bundle_source: self.bundle.path().display().to_string(),
            trust_bundle_loaded: loaded.map(x509::rfc3339),
            trust_bundle_error: error,
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        [
            ("ca_requests", &c.requests),
            ("ca_issued", &c.issued),
            ("ca_refused", &c.refused),
            ("ca_unreachable", &c.unreachable),
            ("ca_rate_limited", &c.rate_limited),
            ("ca_bad_responses", &c.bad_responses),
            ("ca_requests_queued", &c.queued),
        ]
        .into_iter()
        .map(|(name, v)| (name, v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// How much longer than asked a certificate may be valid: clock skew between the node and
/// the CA, and a CA rounding its validity up. Beyond that the CA does not honour the node's
/// lifetime, and the key is dropped rather than used.
pub const LIFETIME_MARGIN: Duration = Duration::from_secs(300);

/// Refuses a certificate valid longer than `requested` (+ [`LIFETIME_MARGIN`]) from `now`: a
/// node's keys are to be short-lived (what a compromised node exposes is bounded by that),
/// and a CA that signs for longer than asked is misconfigured (`--max-lifetime-s`, istiod's
/// `MAX_WORKLOAD_CERT_TTL`) or not the one we think. Refusing, not shortening the use: a key
/// never installed never leaks later, and the error says what to fix.
pub fn check_lifetime(
    not_after: time::OffsetDateTime,
    now: time::OffsetDateTime,
    requested: Duration,
) -> Result<(), String> {
    let allowed = requested.saturating_add(LIFETIME_MARGIN);
    let allowed = time::Duration::try_from(allowed).unwrap_or(time::Duration::MAX);
    let latest = now
        .checked_add(allowed)
        .unwrap_or(time::OffsetDateTime::new_utc(time::Date::MAX, time::Time::MIDNIGHT));
    if not_after > latest {
        return Err(format!(
            "a certificate valid until {}, longer than the {} s asked for (+{} s of margin); the node does not \
             use keys that outlive their lifetime: lower the CA's maximum lifetime, or raise the node's requested \
             lifetime",
            x509::rfc3339(not_after),
            requested.as_secs(),
            LIFETIME_MARGIN.as_secs()
        ));
    }
    Ok(())
}

/// The leaf must be a workload certificate naming exactly `identity`: one SAN, that URI.
fn check_leaf_names(leaf: &CertificateDer<'_>, identity: &SpiffeId) -> Result<(), String> {
    let cert = x509::parse(leaf).map_err(|e| e.to_string())?;
    if cert.is_ca() {
        return Err("the leaf is a CA certificate".into());
    }
    let san = cert.subject_alternative_name().map_err(|e| format!("its subjectAltName: {e}"))?;
    let names: Vec<&GeneralName<'_>> =
        san.map(|s| s.value.general_names.iter().collect()).unwrap_or_default();
    let want = identity.to_string();
    match names.as_slice() {
        [GeneralName::URI(uri)] if *uri == want => Ok(()),
        [] => Err(format!("the leaf carries no subject alternative name; expected exactly {want}")),
        other => Err(format!(
            "the leaf names {}; expected exactly {want}",
            other.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The token, trimmed; a missing or empty file is an error the operator can act on.
async fn read_token(path: &std::path::Path) -> Result<String, CaError> {
    use tokio::io::AsyncReadExt;
    let fail = |reason: String| CaError::Credential { path: path.to_path_buf(), reason };
    let file = tokio::fs::File::open(path).await.map_err(|e| {
        fail(format!(
            "{e} (the DaemonSet mounts a projected ServiceAccount token with audience sluice-ca there; \
             or pass --ca-token-file)"
        ))
    })?;
    let mut raw = Vec::new();
    file.take(MAX_TOKEN_BYTES + 1).read_to_end(&mut raw).await.map_err(|e| fail(e.to_string()))?;
    if raw.len() as u64 > MAX_TOKEN_BYTES {
        return Err(fail(format!("larger than {MAX_TOKEN_BYTES} bytes; not a token")));
    }
    let token = String::from_utf8(raw).map_err(|_| fail("not text; not a token".into()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(fail("empty".into()));
    }
    Ok(token.to_string())
}

/// An error's text with its sources' ("tcp connect error: Connection refused"): transport
/// errors hide the cause in the sources, and repeat themselves at several levels.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    with_sources(e.to_string(), e.source())
}

fn with_sources(first: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut push = |text: String| {
        // "transport error" says nothing the levels below do not say better.
        if text.is_empty() || text == "transport error" || parts.iter().any(|p| p.contains(&text)) {
            return;
        }
        parts.retain(|p| !text.contains(p.as_str()));
        parts.push(text);
    };
    push(first);
    while let Some(s) = source {
        push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

/// The status's message with its transport cause, if it has one.
fn status_reason(status: &Status) -> String {
    let reason = with_sources(status.message().to_string(), std::error::Error::source(status));
    if reason.is_empty() {
        format!("{} (no message)", code_name(status.code()))
    } else {
        reason
    }
}

fn code_name(code: Code) -> String {
    let name = match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    };
    name.to_string()
}

/// Verifies the CA service's own certificate: chain to the bundle in force, and the name.
struct CaServerVerifier {
    bundle: Arc<TrustBundleFile>,
}

impl fmt::Debug for CaServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaServerVerifier").field("bundle", &self.bundle.path()).finish()
    }
}

impl ServerCertVerifier for CaServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.bundle.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.bundle.current().server_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.bundle.current().server_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle.provider().signature_verification_algorithms.supported_schemes()
    }
}
