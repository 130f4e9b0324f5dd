//! The L7 data path: HTTP/1.1, HTTP/2 and gRPC handled per request inside the node proxy.
//!
//! A connection captured from an enrolled pod is sniffed ([`detect`]); HTTP goes to a hyper
//! server on that connection ([`server`]), where every HTTP/1.1 request and every HTTP/2 stream
//! is routed and balanced on its own ([`proxy`]): one gRPC connection is spread over all of a
//! Service's endpoints. Upstream connections are pooled per source pod and endpoint
//! ([`upstream`]) and, towards enrolled pods, run inside the HBONE tunnel. Anything else is
//! forwarded as bytes by the L4 path, with the bytes detection read replayed first.

pub mod balance;
pub mod body;
pub mod detect;
pub mod dns;
pub mod errors;
pub mod filters;
pub mod inbound;
pub mod io;
pub mod limits;
pub mod maglev;
pub mod mirror;
pub mod observe;
pub mod plan;
pub mod proxy;
pub mod server;
pub mod sni;
pub mod tls_origin;
pub mod upgrade;
pub mod upstream;

use std::{
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use serde::Serialize;

pub use balance::{Balancer, EwmaConfig, LbPolicy};
pub use detect::Protocol;
pub use upstream::Upstreams;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy handles, downstream and upstream.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn empty_body() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// L7 settings (`sluice run` flags).
#[derive(Debug, Clone)]
pub struct L7Config {
    /// How long to wait for a client's first bytes before treating the connection as opaque.
    pub detect_timeout: Duration,
    /// Destination ports never sniffed (server-first protocols).
    pub opaque_ports: Vec<u16>,
    /// Largest request head (request line and headers) accepted: HTTP/1.1 answers 431 beyond
    /// it, HTTP/2 refuses the stream with 431.
    pub max_header_bytes: usize,
    pub lb: LbPolicy,
    pub ewma: EwmaConfig,
    pub pod_limits: limits::PodLimits,
    /// Limits of the resolver for ServiceEntries with DNS resolution.
    pub dns: dns::DnsConfig,
}

impl Default for L7Config {
    fn default() -> Self {
        Self {
            detect_timeout: Duration::from_millis(250),
            opaque_ports: detect::DEFAULT_OPAQUE_PORTS.to_vec(),
            max_header_bytes: 64 * 1024,
            lb: LbPolicy::default(),
            ewma: EwmaConfig::default(),
            pod_limits: limits::PodLimits::default(),
            dns: dns::DnsConfig::default(),
        }
    }
}

/// Node-wide counters of the L7 path.
#[derive(Debug, Default, Serialize)]
pub struct L7Counters {
    pub detected_http1: AtomicU64,
    pub detected_http2: AtomicU64,
    pub detected_opaque: AtomicU64,
    pub requests: AtomicU64,
    /// Responses sluice generated itself (no route, no endpoint, upstream failure, timeout).
    pub local_replies: AtomicU64,
    pub upgrades: AtomicU64,
    pub mirrored: AtomicU64,
    /// Mirror copies not sent: the body was over the limit or failed.
    pub mirror_skipped: AtomicU64,
    pub mirror_failed: AtomicU64,
    /// Mirror copies not sent: too many mirrored requests in flight (per pod or node-wide).
    pub mirror_dropped: AtomicU64,
    /// Mirror copies given up after their deadline.
    pub mirror_timeouts: AtomicU64,
    /// Connections and requests refused by a REGISTRY_ONLY outbound policy.
    pub egress_refused: AtomicU64,
    /// Opaque connections a VirtualService tcp or tls rule sent somewhere.
    pub tcp_routed: AtomicU64,
    /// Opaque connections reset because their tcp/tls rule's destination is unknown.
    pub tcp_route_refused: AtomicU64,
    /// Connections to a port with tls rules whose ClientHello server name could not be read
    /// (not TLS, no SNI, over the size bound or the time limit): no tls rule matches them.
    pub tls_sni_unread: AtomicU64,
}

/// Shared state of the L7 path.
pub struct L7 {
    pub cfg: L7Config,
    pub balancer: Balancer,
    pub upstreams: Arc<Upstreams>,
    pub counters: L7Counters,
    pub limit_counters: limits::LimitCounters,
    /// Local rate limits per policy target.
    pub rate_limits: limits::Registry<String, crate::discovery::traffic::LocalRateLimit, limits::TokenBucket>,
    /// Retry budgets per destination.
    pub budgets: limits::Registry<String, crate::discovery::traffic::RetryBudget, limits::Budget>,
    /// Circuit-breaker counters per destination (their limits come with each request).
    pub breakers: limits::Registry<String, (), limits::Breaker>,
    /// TLS client configurations for origination, built on the control path.
    pub tls_origin: Arc<tls_origin::TlsOrigin>,
    /// The resolver for ServiceEntries with DNS resolution (bounded, TTL-aware).
    pub dns: dns::Dns,
    /// The bounds of mirrored requests in flight.
    pub mirror_gate: Arc<mirror::MirrorGate>,
}

impl L7 {
    /// The TLS settings to originate TLS to `sni` with the trust anchors of the policy `key`
    /// (PEM), or the system's roots. Only reads configurations the control path built.
    pub fn tls_target(&self, key: &str, sni: &str, ca_pem: Option<&str>) -> Result<upstream::TlsTarget, errors::ProxyError> {
        let config = self
            .tls_origin
            .config(key, ca_pem)
            .map_err(|e| errors::ProxyError::BadBackend(format!("TLS origination ({key}): {e}")))?;
        let server_name = rustls_pki_types::ServerName::try_from(sni.to_owned())
            .map_err(|e| errors::ProxyError::BadBackend(format!("TLS origination: {sni:?} is not a server name: {e}")))?;
        Ok(upstream::TlsTarget { config, server_name, sni: sni.into() })
    }

    /// Resolves a ServiceEntry host for a source pod (see [`dns`]).
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        who: dns::Asker<'_>,
    ) -> Result<Arc<[std::net::SocketAddr]>, dns::DnsError> {
        self.dns.resolve(host, port, who).await
    }
}

impl L7 {
    /// Shares the control path's TLS origination configurations (the daemon builds them).
    pub fn with_tls_origin(mut self, tls_origin: Arc<tls_origin::TlsOrigin>) -> Self {
        self.tls_origin = tls_origin;
        self
    }

    pub fn new(cfg: L7Config) -> Self {
        Self {
            balancer: Balancer::new(cfg.lb, cfg.ewma),
            upstreams: Arc::new(Upstreams::default()),
            counters: L7Counters::default(),
            limit_counters: Default::default(),
            rate_limits: Default::default(),
            budgets: Default::default(),
            breakers: Default::default(),
            tls_origin: Default::default(),
            dns: dns::Dns::from_system(cfg.dns.clone()),
            mirror_gate: Default::default(),
            cfg,
        }
    }
}
