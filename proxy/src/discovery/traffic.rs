//! Traffic control objects: sluice's own `TrafficPolicy` (sluice.dev/v1alpha1, the CRD in
//! deploy/crds/) and Istio's `ServiceEntry` (networking.istio.io), distilled at parse time to
//! what the data path acts on.
//!
//! A TrafficPolicy attaches, Gateway API style ("direct policy attachment"), to Services (all
//! ports, or one named port via `sectionName`), to HTTPRoutes (the requests its rules match) or
//! to ServiceEntries (external destinations) in its own namespace. When several policies target
//! the same thing, the oldest wins (then `namespace/name`), and a policy on an HTTPRoute wins
//! over one on the Service for the requests that route matches, field group by field group
//! (e.g. the route's `localRateLimit` with the Service's `retries`).

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use super::route::Fraction;

/// What a TrafficPolicy targets (`spec.targetRefs[]`), always in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind")]
pub enum PolicyTarget {
    /// `group: ""`, `kind: Service`; `section_name` = one port name of the Service.
    Service { name: String, section_name: Option<String> },
    /// `group: gateway.networking.k8s.io`, `kind: HTTPRoute` (or GRPCRoute).
    #[serde(rename = "HTTPRoute")]
    Route { name: String, grpc: bool },
    /// `group: networking.istio.io`, `kind: ServiceEntry`.
    ServiceEntry { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339 text); the oldest policy wins a conflict.
    pub created: Option<String>,
    pub targets: Vec<PolicyTarget>,
    pub timeouts: PolicyTimeouts,
    pub retries: Option<RetryPolicy>,
    pub outlier_detection: Option<OutlierDetection>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub fault_injection: Option<FaultInjection>,
    pub local_rate_limit: Option<LocalRateLimit>,
    /// TLS origination towards the target (meant for ServiceEntries: the application speaks
    /// plain HTTP, sluice opens TLS to the external host).
    pub tls: Option<TlsOrigination>,
}

/// `spec.timeouts`. `None`: not set ("0s" also means none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PolicyTimeouts {
    #[serde(with = "opt_ms")]
    pub connect: Option<Duration>,
    #[serde(with = "opt_ms")]
    pub request: Option<Duration>,
    #[serde(with = "opt_ms")]
    pub idle: Option<Duration>,
}

/// `spec.retries.retryOn` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RetryOn {
    /// The endpoint could not be connected to (the request never left sluice).
    pub connect_failure: bool,
    /// HTTP/2 REFUSED_STREAM (the endpoint did not process it).
    pub refused_stream: bool,
    /// The connection or stream was reset before any response header.
    pub reset: bool,
    /// Any 5xx response.
    pub status_5xx: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    /// The codes in `retriableStatusCodes`.
    pub retriable_status_codes: bool,
    /// gRPC statuses (from `grpc-status`): CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
    /// UNAVAILABLE, INTERNAL (the last from a VirtualService's `internal`).
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
    pub grpc_internal: bool,
    /// A response carrying `x-envoy-ratelimited` (VirtualService `envoy-ratelimited`).
    pub envoy_ratelimited: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first try; 0 disables retrying.
    pub attempts: u32,
    #[serde(with = "opt_ms")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    pub retriable_status_codes: Vec<u16>,
    /// Status-based retries of non-idempotent methods (connect failures and refused streams
    /// are always safe to retry).
    pub retry_non_idempotent: bool,
    /// Exponential backoff with full jitter: try n waits up to `min(base × 2^(n-1), max)`.
    #[serde(with = "ms")]
    pub backoff_base: Duration,
    #[serde(with = "ms")]
    pub backoff_max: Duration,
    pub budget: RetryBudget,
}

/// Retries may add at most `percent` % of the requests of the last 10 s, plus
/// `min_per_second` retries per second in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryBudget {
    pub percent: u32,
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    /// Linkerd's defaults: 20 %, 10 per second.
    fn default() -> Self {
        Self { percent: 20, min_per_second: 10 }
    }
}

/// Passive health checking. The parser fills in Istio's defaults for what a policy leaves out
/// (in parentheses below).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// 0 disables each trigger. 5xx responses in a row (5); connection failures count as 5xx
    /// here, as in Istio (its `splitExternalLocalOriginErrors: false`).
    pub consecutive_5xx: u32,
    /// 502, 503, 504 and connection failures in a row (0: off).
    pub consecutive_gateway_errors: u32,
    /// Failed connection attempts in a row, also for opaque TCP (0: off).
    pub consecutive_connect_failures: u32,
    /// How often ejections are evaluated (10 s).
    #[serde(with = "ms")]
    pub interval: Duration,
    /// The first ejection's length (30 s).
    #[serde(with = "ms")]
    pub base_ejection_time: Duration,
    /// At most this share of the endpoints is ejected at once (10, Istio's default).
    pub max_ejection_percent: u32,
    /// Ejection pauses when fewer endpoints than this share are healthy (0).
    pub min_health_percent: u32,
    /// Connection failures (errors of sluice's own making, "local origin") count only towards
    /// `consecutive_connect_failures`, not as 5xx or gateway errors (Istio's
    /// `splitExternalLocalOriginErrors`; false by default, as in Istio).
    pub split_local_origin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CircuitBreaker {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
    /// 0 or `None`: no limit.
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
    /// Header name (lower-case) and exact value; all must be present. Empty: every request.
    pub matches: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FaultDelay {
    #[serde(with = "ms")]
    pub fixed: Duration,
    /// Share of requests, 0.0..=1.0.
    pub fraction: Fraction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FaultAbort {
    /// For HTTP requests (default 503 when only `grpc_status` is given).
    pub http_status: u16,
    /// For gRPC requests (default: derived from the HTTP status, as gRPC does: 503 → 14).
    pub grpc_status: Option<u16>,
    pub fraction: Fraction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LocalRateLimit {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    #[serde(with = "ms")]
    pub fill_interval: Duration,
    /// Default 429.
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsOrigination {
    /// SNI and the name the certificate must have; default: the ServiceEntry host the request
    /// matched (or its first host).
    pub sni: Option<String>,
    /// PEM trust anchors; `None`: the system's roots.
    pub ca_certificates: Option<String>,
}

/// Istio's ServiceEntry (networking.istio.io v1 / v1beta1): an external (or otherwise
/// unregistered) destination that enrolled pods may reach when their namespace's outbound
/// policy is REGISTRY_ONLY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    pub namespace: String,
    pub name: String,
    /// Lower-case host names (`api.example.com`, `*.example.com`).
    pub hosts: Vec<String>,
    /// Virtual IPs / CIDRs applications connect to (`spec.addresses`).
    pub addresses: Vec<IpNet>,
    pub ports: Vec<ServiceEntryPort>,
    pub location: EntryLocation,
    pub resolution: Resolution,
    pub endpoints: Vec<EntryEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEntryPort {
    pub number: u16,
    /// Upper-case (HTTP, HTTPS, HTTP2, GRPC, TCP, TLS, ...); empty when the entry does not say
    /// (Istio then detects the protocol, as sluice does for a Service port without appProtocol).
    pub protocol: String,
    pub name: String,
    /// The port endpoints listen on (default: `number`).
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EntryLocation {
    #[serde(rename = "MESH_EXTERNAL")]
    External,
    #[serde(rename = "MESH_INTERNAL")]
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Resolution {
    /// Forward to the address the application connected to.
    #[serde(rename = "NONE")]
    None,
    /// `endpoints` list IP addresses.
    #[serde(rename = "STATIC")]
    Static,
    /// `endpoints` (or the hosts) are resolved with DNS when connecting.
    #[serde(rename = "DNS")]
    Dns,
    #[serde(rename = "DNS_ROUND_ROBIN")]
    DnsRoundRobin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryEndpoint {
    /// An IP address (STATIC) or a host name (DNS).
    pub address: String,
    /// Port name → port number, overriding the entry port's target port.
    pub ports: Vec<(String, u16)>,
}

/// An address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Whether this is one address (a /32 or /128) rather than a block.
    pub fn is_host(&self) -> bool {
        self.prefix == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    /// `192.0.2.7` for one address, `192.0.2.0/24` for a block.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

impl fmt::Display for PolicyTarget {
    /// `Service web`, `Service web:http` (one port), `HTTPRoute r`, `GRPCRoute r`,
    /// `ServiceEntry e`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyTarget::Service { name, section_name: None } => write!(f, "Service {name}"),
            PolicyTarget::Service { name, section_name: Some(port) } => write!(f, "Service {name}:{port}"),
            PolicyTarget::Route { name, grpc: false } => write!(f, "HTTPRoute {name}"),
            PolicyTarget::Route { name, grpc: true } => write!(f, "GRPCRoute {name}"),
            PolicyTarget::ServiceEntry { name } => write!(f, "ServiceEntry {name}"),
        }
    }
}

impl OutboundPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundPolicy::AllowAny => "ALLOW_ANY",
            OutboundPolicy::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

impl fmt::Display for OutboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::None => "NONE",
            Resolution::Static => "STATIC",
            Resolution::Dns => "DNS",
            Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
        }
    }
}

/// A namespace's outbound traffic policy (annotation `sluice.dev/outbound-traffic-policy`,
/// named after Istio's `meshConfig.outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum OutboundPolicy {
    /// Any destination is allowed (the default, as in Istio).
    #[default]
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    /// Only Services, mesh pods and ServiceEntries: anything else is refused.
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}

/// The namespace annotation that sets [`OutboundPolicy`].
pub const OUTBOUND_POLICY_ANNOTATION: &str = "sluice.dev/outbound-traffic-policy";

mod ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

mod opt_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let net = IpNet { addr: "192.0.2.0".parse().unwrap(), prefix: 24 };
        assert!(net.contains("192.0.2.77".parse().unwrap()));
        assert!(!net.contains("192.0.3.1".parse().unwrap()));
        assert!(net.contains("::ffff:192.0.2.1".parse().unwrap()));
        let host = IpNet { addr: "10.1.2.3".parse().unwrap(), prefix: 32 };
        assert!(host.contains("10.1.2.3".parse().unwrap()) && !host.contains("10.1.2.4".parse().unwrap()));
        let all = IpNet { addr: "0.0.0.0".parse().unwrap(), prefix: 0 };
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6 = IpNet { addr: "2001:db8::".parse().unwrap(), prefix: 32 };
        assert!(v6.contains("2001:db8:1::1".parse().unwrap()));
    }
}
