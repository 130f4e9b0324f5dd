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
pub mod errors;
pub mod filters;
pub mod io;
pub mod limits;
pub mod mirror;
pub mod proxy;
pub mod server;
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
}

impl Default for L7Config {
    fn default() -> Self {
        Self {
            detect_timeout: Duration::from_millis(250),
            opaque_ports: detect::DEFAULT_OPAQUE_PORTS.to_vec(),
            max_header_bytes: 64 * 1024,
            lb: LbPolicy::default(),
            ewma: EwmaConfig::default(),
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
}

/// Shared state of the L7 path.
pub struct L7 {
    pub cfg: L7Config,
    pub balancer: Balancer,
    pub upstreams: Arc<Upstreams>,
    pub counters: L7Counters,
}

impl L7 {
    pub fn new(cfg: L7Config) -> Self {
        Self {
            balancer: Balancer::new(cfg.lb, cfg.ewma),
            upstreams: Arc::new(Upstreams::default()),
            counters: L7Counters::default(),
            cfg,
        }
    }
}
