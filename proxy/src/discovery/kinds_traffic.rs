//! Parsers for sluice's own `TrafficPolicy` (sluice.dev/v1alpha1, the CRD in
//! deploy/crds/trafficpolicies.sluice.dev.yaml) and Istio's `ServiceEntry` (networking.istio.io
//! v1 and v1beta1), distilled into the types of [`traffic`](super::traffic).
//!
//! As for routes (`kinds_route`), the API server applies a CRD's defaults and validation before
//! an object is stored and a manifest file has had neither, so both are applied here, with errors
//! that name the field: both sources yield the same model.
//!
//! **TrafficPolicy** is strict: every field of `spec`, at every depth, must be one sluice
//! implements, or the policy is rejected (as AuthorizationPolicy is). A policy that says more than
//! sluice does must not be half applied. Defaults (the CRD's descriptions say the same):
//!
//! - `retries` (when the block is present): `attempts` 2, `retryOn` connect-failure,
//!   refused-stream and reset, no `perTryTimeout`, backoff 25 ms base and 10 × base (250 ms)
//!   max as Envoy, budget 20 % plus 10 retries per second (Linkerd's).
//! - `outlierDetection` (when present): Istio's defaults: 5 consecutive 5xx (connection failures
//!   count as 5xx), gateway-error and connect-failure triggers off, interval 10 s, base ejection
//!   time 30 s, at most 10 % of the endpoints ejected (Istio's default), min health 0 %.
//! - `faultInjection.abort.httpStatus` 503; `localRateLimit.statusCode` 429.
//! - "0s" for an optional timeout means none; `circuitBreaker.maxRequestsPerConnection: 0` too.
//!
//! **ServiceEntry** follows Istio's validation: hosts are DNS names (a wildcard only as the
//! leading label, never `*` alone), lower-cased; addresses are IPs or CIDR blocks (blocks only
//! with resolution NONE or STATIC); ports have unique names and numbers; STATIC needs endpoints
//! with IP addresses, NONE takes none, DNS without endpoints needs hosts without wildcards.
//! `location` defaults to MESH_EXTERNAL and `resolution` to NONE (proto3's zero values).
//! `exportTo` is accepted and ignored: sluice makes every ServiceEntry visible to every
//! namespace. `workloadSelector` and `subjectAltNames` are rejected: sluice neither selects
//! workloads for an entry nor verifies endpoint identities that way. Endpoint fields other than
//! `address` and `ports` (labels, network, locality, weight, serviceAccount) are ignored.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::fields::{NameRule, Node};
use super::kinds_route::{bounded_list, duration, header_name, int_in, Names};
use super::manifest::{DocError, Meta};
use super::model::Object;
use super::route::Fraction;
use super::traffic::{
    CircuitBreaker, EntryEndpoint, EntryLocation, FaultAbort, FaultDelay, FaultInjection, IpNet,
    LocalRateLimit, OutlierDetection, PolicyTarget, PolicyTimeouts, Resolution, RetryBudget, RetryOn,
    RetryPolicy, ServiceEntry, ServiceEntryPort, TlsOrigination, TrafficPolicy,
};

// The CRD's limits.
const MAX_TARGET_REFS: usize = 16;
const MAX_RETRY_ON: usize = 16;
const MAX_STATUS_CODES: usize = 16;
const MAX_ATTEMPTS: i64 = 10;
const MAX_FAULT_MATCHES: usize = 8;
const MAX_HEADER_VALUE_LEN: usize = 4096;
/// `format: int32`.
const INT32_MAX: i64 = i32::MAX as i64;

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

/// `spec` of a TrafficPolicy.
const SPEC_FIELDS: &[&str] = &[
    "targetRefs",
    "timeouts",
    "retries",
    "outlierDetection",
    "circuitBreaker",
    "faultInjection",
    "localRateLimit",
    "tls",
];

pub(crate) const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
pub(crate) const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// The default maximum backoff is this many times the base (Envoy's rule: 250 ms by default).
pub(crate) const DEFAULT_BACKOFF_MAX_FACTOR: u32 = 10;
pub(crate) const DEFAULT_OUTLIER: OutlierDetection = OutlierDetection {
    consecutive_5xx: 5,
    consecutive_gateway_errors: 0,
    consecutive_connect_failures: 0,
    interval: Duration::from_secs(10),
    base_ejection_time: Duration::from_secs(30),
    max_ejection_percent: 10,
    min_health_percent: 0,
    split_local_origin: false,
};
pub(crate) const DEFAULT_ABORT_STATUS: u16 = 503;
pub(crate) const DEFAULT_RATE_LIMIT_STATUS: u16 = 429;

/// `retryOn` when a `retries` block does not say: the failures where the request certainly
/// did not reach the application, or was not processed by it.
pub(crate) fn default_retry_on() -> RetryOn {
    RetryOn { connect_failure: true, refused_stream: true, reset: true, ..RetryOn::default() }
}

// --- TrafficPolicy ---

pub(crate) fn traffic_policy(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let spec = doc.require("spec")?;
    spec.only_fields(SPEC_FIELDS, |field| match field {
        "targetRef" => Some("use targetRefs (a list)".into()),
        _ => None,
    })?;
    let policy = TrafficPolicy {
        targets: target_refs(&spec, &meta.namespace)?,
        timeouts: spec.get("timeouts").map(|n| timeouts(&n)).transpose()?.unwrap_or_default(),
        retries: spec.get("retries").map(|n| retries(&n)).transpose()?,
        outlier_detection: spec.get("outlierDetection").map(|n| outlier_detection(&n)).transpose()?,
        circuit_breaker: spec.get("circuitBreaker").map(|n| circuit_breaker(&n)).transpose()?,
        fault_injection: spec.get("faultInjection").map(|n| fault_injection(&n)).transpose()?,
        local_rate_limit: spec.get("localRateLimit").map(|n| local_rate_limit(&n)).transpose()?,
        tls: spec.get("tls").map(|n| tls(&n)).transpose()?,
        namespace: meta.namespace,
        name: meta.name,
        created: meta.creation_timestamp,
    };
    Ok(Object::TrafficPolicy(Arc::new(policy)))
}

fn target_refs(spec: &Node<'_>, namespace: &str) -> Result<Vec<PolicyTarget>, DocError> {
    let nodes = bounded_list(spec, "targetRefs", MAX_TARGET_REFS)?;
    if nodes.is_empty() {
        return Err(match spec.get("targetRefs") {
            None => DocError::Missing { field: spec.child_path("targetRefs") },
            Some(n) => n.invalid("must name at least one target"),
        });
    }
    let mut out: Vec<PolicyTarget> = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let target = target_ref(node, namespace)?;
        // The Gateway API's rules for several references to one target (as in its policies'
        // CRDs): all with a sectionName or none, and no two alike.
        for other in out.iter().filter(|o| same_object(o, &target)) {
            if section_name(other).is_some() != section_name(&target).is_some() {
                return Err(node.invalid(
                    "sectionName must be set on every targetRef when two or more name the same target",
                ));
            }
            if *other == target {
                return Err(node.invalid("duplicate targetRef: the same target is named twice"));
            }
        }
        out.push(target);
    }
    Ok(out)
}

fn target_ref(node: &Node<'_>, namespace: &str) -> Result<PolicyTarget, DocError> {
    node.only_fields(&["group", "kind", "name", "sectionName"], |field| {
        (field == "namespace").then(|| {
            format!("not supported: a TrafficPolicy targets objects in its own namespace ({namespace})")
        })
    })?;
    let group = node.require("group")?.as_str()?;
    let kind = node.require("kind")?.as_str()?;
    let name_node = node.require("name")?;
    let name = name_node.as_str()?;
    let section = node.get("sectionName");
    let check_name = |rule: NameRule| match rule.check(name) {
        None => Ok(name.to_owned()),
        Some(reason) => Err(name_node.invalid(reason)),
    };
    let no_section = || match &section {
        None => Ok(()),
        Some(s) => Err(s.invalid(format!(
            "not supported for a {kind} target (a sectionName names a port of a Service target)"
        ))),
    };
    Ok(match (group, kind) {
        ("", "Service") => {
            let section_name = match &section {
                None => None,
                Some(s) => {
                    let port = s.as_str()?;
                    if let Some(reason) = NameRule::Dns1123Label.check(port) {
                        return Err(s.invalid(format!("{reason}; it names a port of the Service")));
                    }
                    Some(port.to_owned())
                }
            };
            PolicyTarget::Service { name: check_name(NameRule::Dns1035Label)?, section_name }
        }
        (GATEWAY_GROUP, "HTTPRoute" | "GRPCRoute") => {
            no_section()?;
            PolicyTarget::Route { name: check_name(NameRule::Dns1123Subdomain)?, grpc: kind == "GRPCRoute" }
        }
        (ISTIO_NETWORKING_GROUP, "ServiceEntry") => {
            no_section()?;
            PolicyTarget::ServiceEntry { name: check_name(NameRule::Dns1123Subdomain)? }
        }
        _ => {
            return Err(node.invalid(format!(
                "{kind} (group {group:?}) is not a target sluice supports (a Service in group \"\", an HTTPRoute or GRPCRoute in group {GATEWAY_GROUP}, a ServiceEntry in group {ISTIO_NETWORKING_GROUP})"
            )))
        }
    })
}

/// Whether two targets name the same object (whatever their sectionName).
fn same_object(a: &PolicyTarget, b: &PolicyTarget) -> bool {
    match (a, b) {
        (PolicyTarget::Service { name: x, .. }, PolicyTarget::Service { name: y, .. }) => x == y,
        (PolicyTarget::Route { name: x, grpc: g }, PolicyTarget::Route { name: y, grpc: h }) => {
            x == y && g == h
        }
        (PolicyTarget::ServiceEntry { name: x }, PolicyTarget::ServiceEntry { name: y }) => x == y,
        _ => false,
    }
}

fn section_name(t: &PolicyTarget) -> Option<&str> {
    match t {
        PolicyTarget::Service { section_name, .. } => section_name.as_deref(),
        _ => None,
    }
}

/// An optional duration where "0s" means none.
fn optional_duration(node: &Node<'_>, key: &str) -> Result<Option<Duration>, DocError> {
    Ok(duration(node, key)?.filter(|d| !d.is_zero()))
}

/// A duration that must be longer than zero, `default` when absent.
fn positive_duration(node: &Node<'_>, key: &str, default: Duration) -> Result<Duration, DocError> {
    match duration(node, key)? {
        None => Ok(default),
        Some(d) if d.is_zero() => Err(node.require(key)?.invalid("must be longer than 0")),
        Some(d) => Ok(d),
    }
}

/// A required duration that must be longer than zero.
fn required_positive_duration(node: &Node<'_>, key: &str) -> Result<Duration, DocError> {
    let d = duration(node, key)?.ok_or_else(|| DocError::Missing { field: node.child_path(key) })?;
    if d.is_zero() {
        return Err(node.require(key)?.invalid("must be longer than 0"));
    }
    Ok(d)
}

/// An optional integer field in `min..=max`, `default` when absent.
fn u32_or(node: &Node<'_>, key: &str, min: i64, max: i64, default: u32) -> Result<u32, DocError> {
    Ok(node.get(key).map(|n| int_in(&n, min, max)).transpose()?.map_or(default, |n| n as u32))
}

fn opt_u32(node: &Node<'_>, key: &str, min: i64) -> Result<Option<u32>, DocError> {
    Ok(node.get(key).map(|n| int_in(&n, min, INT32_MAX)).transpose()?.map(|n| n as u32))
}

/// A share of requests, 0 to 100 with fractions (`0.5`), as a fraction of 1.
fn percentage(node: &Node<'_>) -> Result<Fraction, DocError> {
    let p = node.as_f64()?;
    if !(0.0..=100.0).contains(&p) {
        return Err(node.invalid(format!("{p} is out of range 0-100")));
    }
    Ok(Fraction(p / 100.0))
}

fn timeouts(node: &Node<'_>) -> Result<PolicyTimeouts, DocError> {
    node.only_fields(&["connect", "request", "idle"], |_| None)?;
    Ok(PolicyTimeouts {
        connect: optional_duration(node, "connect")?,
        request: optional_duration(node, "request")?,
        idle: optional_duration(node, "idle")?,
    })
}

fn retries(node: &Node<'_>) -> Result<RetryPolicy, DocError> {
    node.only_fields(
        &[
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retriableStatusCodes",
            "retryNonIdempotent",
            "backoff",
            "budget",
        ],
        |_| None,
    )?;
    let attempts = u32_or(node, "attempts", 0, MAX_ATTEMPTS, DEFAULT_RETRY_ATTEMPTS)?;
    // An empty list is an absent one (as everywhere in the API): the default.
    let on_nodes = bounded_list(node, "retryOn", MAX_RETRY_ON)?;
    let mut retry_on = if on_nodes.is_empty() { default_retry_on() } else { RetryOn::default() };
    for n in &on_nodes {
        let flag = match n.as_str()? {
            "connect-failure" => &mut retry_on.connect_failure,
            "refused-stream" => &mut retry_on.refused_stream,
            "reset" => &mut retry_on.reset,
            "5xx" => &mut retry_on.status_5xx,
            "gateway-error" => &mut retry_on.gateway_error,
            "retriable-status-codes" => &mut retry_on.retriable_status_codes,
            "cancelled" => &mut retry_on.grpc_cancelled,
            "deadline-exceeded" => &mut retry_on.grpc_deadline_exceeded,
            "resource-exhausted" => &mut retry_on.grpc_resource_exhausted,
            "unavailable" => &mut retry_on.grpc_unavailable,
            other => {
                return Err(n.invalid(format!(
                    "{other:?} is not a retry condition (connect-failure, refused-stream, reset, 5xx, gateway-error, retriable-status-codes, cancelled, deadline-exceeded, resource-exhausted, unavailable)"
                )))
            }
        };
        *flag = true;
    }
    let mut codes: Vec<u16> = Vec::new();
    for n in bounded_list(node, "retriableStatusCodes", MAX_STATUS_CODES)? {
        let code = int_in(&n, 400, 599)? as u16;
        if codes.contains(&code) {
            return Err(n.invalid(format!("duplicate status code {code}")));
        }
        codes.push(code);
    }
    if !codes.is_empty() && !retry_on.retriable_status_codes {
        return Err(DocError::Invalid {
            field: node.child_path("retriableStatusCodes"),
            reason: "retriableStatusCodes needs retry-on retriable-status-codes (add it to retryOn)".into(),
        });
    }
    if codes.is_empty() && retry_on.retriable_status_codes {
        let at = on_nodes.iter().find(|n| n.value.as_str() == Some("retriable-status-codes"));
        return Err(at.unwrap_or(node).invalid(
            "retry-on retriable-status-codes needs retriableStatusCodes (the HTTP statuses to retry)",
        ));
    }
    let (backoff_base, backoff_max) = match node.get("backoff") {
        None => (DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_BASE * DEFAULT_BACKOFF_MAX_FACTOR),
        Some(b) => {
            b.only_fields(&["baseInterval", "maxInterval"], |_| None)?;
            let base = positive_duration(&b, "baseInterval", DEFAULT_BACKOFF_BASE)?;
            let max = duration(&b, "maxInterval")?.unwrap_or(base * DEFAULT_BACKOFF_MAX_FACTOR);
            if max < base {
                return Err(b.require("maxInterval")?.invalid(format!(
                    "{max:?} is shorter than baseInterval ({base:?}); it must be at least as long"
                )));
            }
            (base, max)
        }
    };
    let budget = match node.get("budget") {
        None => RetryBudget::default(),
        Some(b) => {
            b.only_fields(&["percent", "minRetriesPerSecond"], |_| None)?;
            let d = RetryBudget::default();
            RetryBudget {
                percent: u32_or(&b, "percent", 0, 100, d.percent)?,
                min_per_second: u32_or(&b, "minRetriesPerSecond", 0, INT32_MAX, d.min_per_second)?,
            }
        }
    };
    Ok(RetryPolicy {
        attempts,
        per_try_timeout: optional_duration(node, "perTryTimeout")?,
        retry_on,
        retriable_status_codes: codes,
        retry_non_idempotent: node.opt_bool("retryNonIdempotent")?.unwrap_or(false),
        backoff_base,
        backoff_max,
        budget,
    })
}

fn outlier_detection(node: &Node<'_>) -> Result<OutlierDetection, DocError> {
    node.only_fields(
        &[
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveConnectFailures",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
        ],
        |_| None,
    )?;
    let d = DEFAULT_OUTLIER;
    let od = OutlierDetection {
        consecutive_5xx: u32_or(node, "consecutive5xxErrors", 0, INT32_MAX, d.consecutive_5xx)?,
        consecutive_gateway_errors: u32_or(
            node,
            "consecutiveGatewayErrors",
            0,
            INT32_MAX,
            d.consecutive_gateway_errors,
        )?,
        consecutive_connect_failures: u32_or(
            node,
            "consecutiveConnectFailures",
            0,
            INT32_MAX,
            d.consecutive_connect_failures,
        )?,
        interval: positive_duration(node, "interval", d.interval)?,
        base_ejection_time: positive_duration(node, "baseEjectionTime", d.base_ejection_time)?,
        max_ejection_percent: u32_or(node, "maxEjectionPercent", 0, 100, d.max_ejection_percent)?,
        min_health_percent: u32_or(node, "minHealthPercent", 0, 100, d.min_health_percent)?,
        split_local_origin: false,
    };
    if od.consecutive_5xx == 0 && od.consecutive_gateway_errors == 0 && od.consecutive_connect_failures == 0 {
        return Err(node.invalid(
            "outlierDetection ejects nothing: set consecutive5xxErrors, consecutiveGatewayErrors or consecutiveConnectFailures",
        ));
    }
    Ok(od)
}

fn circuit_breaker(node: &Node<'_>) -> Result<CircuitBreaker, DocError> {
    node.only_fields(
        &["maxConnections", "maxPendingRequests", "maxRequests", "maxRetries", "maxRequestsPerConnection"],
        |_| None,
    )?;
    Ok(CircuitBreaker {
        max_connections: opt_u32(node, "maxConnections", 1)?,
        max_pending_requests: opt_u32(node, "maxPendingRequests", 1)?,
        max_requests: opt_u32(node, "maxRequests", 1)?,
        max_retries: opt_u32(node, "maxRetries", 0)?,
        // 0 is "no limit", as absent.
        max_requests_per_connection: opt_u32(node, "maxRequestsPerConnection", 0)?.filter(|n| *n != 0),
    })
}

fn fault_injection(node: &Node<'_>) -> Result<FaultInjection, DocError> {
    node.only_fields(&["delay", "abort", "matches"], |_| None)?;
    let delay = match node.get("delay") {
        None => None,
        Some(d) => {
            d.only_fields(&["fixedDelay", "percentage"], |_| None)?;
            let fixed = duration(&d, "fixedDelay")?
                .ok_or_else(|| DocError::Missing { field: d.child_path("fixedDelay") })?;
            Some(FaultDelay { fixed, fraction: percentage(&d.require("percentage")?)? })
        }
    };
    let abort = match node.get("abort") {
        None => None,
        Some(a) => {
            a.only_fields(&["httpStatus", "grpcStatus", "percentage"], |_| None)?;
            let http = a.get("httpStatus").map(|n| int_in(&n, 200, 599)).transpose()?;
            let grpc = a.get("grpcStatus").map(|n| int_in(&n, 0, 16)).transpose()?;
            if http.is_none() && grpc.is_none() {
                return Err(a.invalid("set httpStatus, grpcStatus or both (what an aborted request gets)"));
            }
            Some(FaultAbort {
                http_status: http.map_or(DEFAULT_ABORT_STATUS, |s| s as u16),
                grpc_status: grpc.map(|s| s as u16),
                fraction: percentage(&a.require("percentage")?)?,
            })
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err(node.invalid("faultInjection needs a delay, an abort or both"));
    }
    let mut matches = Vec::new();
    for m in bounded_list(node, "matches", MAX_FAULT_MATCHES)? {
        m.only_fields(&["name", "value"], |_| None)?;
        let name = header_name(&m.require("name")?, Names::Header)?;
        let value_node = m.require("value")?;
        let value = value_node.as_str()?;
        if value.len() > MAX_HEADER_VALUE_LEN {
            return Err(value_node.invalid(format!(
                "at most {MAX_HEADER_VALUE_LEN} characters are allowed, found {}",
                value.len()
            )));
        }
        matches.push((name, value.to_owned()));
    }
    Ok(FaultInjection { delay, abort, matches })
}

fn local_rate_limit(node: &Node<'_>) -> Result<LocalRateLimit, DocError> {
    node.only_fields(&["maxTokens", "tokensPerFill", "fillInterval", "statusCode"], |_| None)?;
    Ok(LocalRateLimit {
        max_tokens: int_in(&node.require("maxTokens")?, 1, INT32_MAX)? as u32,
        tokens_per_fill: int_in(&node.require("tokensPerFill")?, 1, INT32_MAX)? as u32,
        fill_interval: required_positive_duration(node, "fillInterval")?,
        status: u32_or(node, "statusCode", 400, 599, DEFAULT_RATE_LIMIT_STATUS.into())? as u16,
    })
}

fn tls(node: &Node<'_>) -> Result<TlsOrigination, DocError> {
    node.only_fields(&["mode", "sni", "caCertificates"], |field| match field {
        "clientCertificate" | "privateKey" | "credentialName" => {
            Some("not supported: sluice originates TLS without a client certificate (mode SIMPLE)".into())
        }
        "subjectAltNames" => {
            Some("not supported: the server certificate must carry the sni name (or the host)".into())
        }
        _ => None,
    })?;
    let mode = node.require("mode")?;
    match mode.as_str()? {
        "SIMPLE" => {}
        m @ ("MUTUAL" | "ISTIO_MUTUAL") => {
            return Err(mode.invalid(format!(
                "mode {m} is not supported: sluice originates TLS with server authentication only (SIMPLE), without a client certificate"
            )))
        }
        "DISABLE" => return Err(mode.invalid("mode DISABLE is not supported: remove tls to send plain text")),
        other => return Err(mode.invalid(format!("{other:?} is not a TLS mode (SIMPLE)"))),
    }
    let sni = match node.get("sni") {
        None => None,
        Some(n) => {
            let s = n.as_str()?;
            if NameRule::Dns1123Subdomain.check(s).is_some() {
                return Err(n.invalid(format!(
                    "{s:?} is not a host name (lower-case DNS labels separated by '.', no wildcard)"
                )));
            }
            Some(s.to_owned())
        }
    };
    let ca_certificates = match node.get("caCertificates") {
        None => None,
        Some(n) => {
            let pem = n.as_str()?;
            check_ca_certificates(pem).map_err(|reason| n.invalid(reason))?;
            Some(pem.to_owned())
        }
    };
    Ok(TlsOrigination { sni, ca_certificates })
}

/// PEM text with at least one CERTIFICATE block, each of which must be an X.509 certificate
/// usable as a trust anchor (what the data path will make of it). Other blocks are skipped.
fn check_ca_certificates(pem: &str) -> Result<(), String> {
    let mut count = 0;
    for (i, item) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        let der = item.map_err(|e| format!("invalid PEM in certificate {}: {e}", i + 1))?;
        webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| format!("certificate {} is not a valid X.509 certificate ({e})", i + 1))?;
        count += 1;
    }
    if count == 0 {
        return Err(
            "no certificate found: expected PEM CERTIFICATE blocks (-----BEGIN CERTIFICATE-----)".into()
        );
    }
    Ok(())
}

// --- ServiceEntry ---

/// Istio's port protocols (`protocol.Parse`), upper-case.
const PROTOCOLS: &[&str] = &[
    "HTTP",
    "HTTPS",
    "HTTP2",
    "GRPC",
    "GRPC-WEB",
    "HTTP_PROXY",
    "TCP",
    "TLS",
    "UDP",
    "MONGO",
    "MYSQL",
    "REDIS",
];

pub(crate) fn service_entry(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let spec = doc.require("spec")?;
    spec.only_fields(
        &["hosts", "addresses", "ports", "location", "resolution", "endpoints", "exportTo"],
        |field| match field {
            "workloadSelector" => Some(
                "not supported: sluice takes a ServiceEntry's endpoints from spec.endpoints only (it selects no pods or WorkloadEntries)"
                    .into(),
            ),
            "subjectAltNames" => Some(
                "not supported: sluice does not verify ServiceEntry endpoints by subject alternative names; for TLS origination, a TrafficPolicy's tls.sni names the identity the server must have"
                    .into(),
            ),
            _ => None,
        },
    )?;
    let location = match spec.get("location") {
        None => EntryLocation::External,
        Some(n) => match n.as_str()? {
            "MESH_EXTERNAL" | "" => EntryLocation::External,
            "MESH_INTERNAL" => EntryLocation::Internal,
            other => {
                return Err(n.invalid(format!("{other:?} is not a location (MESH_EXTERNAL, MESH_INTERNAL)")))
            }
        },
    };
    let resolution = match spec.get("resolution") {
        None => Resolution::None,
        Some(n) => match n.as_str()? {
            "NONE" | "" => Resolution::None,
            "STATIC" => Resolution::Static,
            "DNS" => Resolution::Dns,
            "DNS_ROUND_ROBIN" => Resolution::DnsRoundRobin,
            other => {
                return Err(
                    n.invalid(format!("{other:?} is not a resolution (NONE, STATIC, DNS, DNS_ROUND_ROBIN)"))
                )
            }
        },
    };
    let hosts = entry_hosts(&spec)?;
    let addresses = entry_addresses(&spec, resolution)?;
    let ports = entry_ports(&spec)?;
    let endpoints = entry_endpoints(&spec, resolution, &ports)?;
    if endpoints.is_empty() && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
        // Every host is resolved: a wildcard cannot be.
        if let Some(i) = hosts.iter().position(|h| h.starts_with("*.")) {
            return Err(DocError::Invalid {
                field: format!("{}[{i}]", spec.child_path("hosts")),
                reason: "a wildcard host cannot be resolved with DNS: list endpoints, or use resolution NONE"
                    .into(),
            });
        }
    }
    Ok(Object::ServiceEntry(Arc::new(ServiceEntry {
        namespace: meta.namespace,
        name: meta.name,
        hosts,
        addresses,
        ports,
        location,
        resolution,
        endpoints,
    })))
}

/// A list that must have at least one element.
fn non_empty_list<'a>(node: &Node<'a>, key: &str, what: &str) -> Result<Vec<Node<'a>>, DocError> {
    let items = node.list(key)?;
    if items.is_empty() {
        return Err(match node.get(key) {
            None => DocError::Missing { field: node.child_path(key) },
            Some(n) => n.invalid(format!("must list at least one {what}")),
        });
    }
    Ok(items)
}

fn entry_hosts(spec: &Node<'_>) -> Result<Vec<String>, DocError> {
    let mut out: Vec<String> = Vec::new();
    for n in non_empty_list(spec, "hosts", "host")? {
        let s = n.as_str()?;
        let host = s.to_ascii_lowercase();
        if host == "*" {
            return Err(n.invalid(
                "\"*\" is not allowed: a ServiceEntry names its hosts (a wildcard only as the leading label, as in \"*.example.com\")",
            ));
        }
        let bare = host.strip_prefix("*.").unwrap_or(&host);
        if NameRule::Dns1123Subdomain.check(bare).is_some() {
            return Err(n.invalid(format!(
                "{s:?} is not a host name (DNS labels separated by '.', a wildcard only as the leading label, as in \"*.example.com\")"
            )));
        }
        if !out.contains(&host) {
            out.push(host);
        }
    }
    Ok(out)
}

fn entry_addresses(spec: &Node<'_>, resolution: Resolution) -> Result<Vec<IpNet>, DocError> {
    let mut out = Vec::new();
    for (n, s) in spec.str_list("addresses")? {
        let net = parse_ip_net(s).ok_or_else(|| {
            n.invalid(format!("{s:?} is not an IP address or a CIDR block (e.g. 192.0.2.10, 192.0.2.0/24)"))
        })?;
        if !net.is_host() && matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
            return Err(n.invalid("CIDR blocks are allowed only with resolution NONE or STATIC"));
        }
        out.push(net);
    }
    Ok(out)
}

/// `192.0.2.1` (a /32), `2001:db8::1` (a /128) or a CIDR block `192.0.2.0/24`.
fn parse_ip_net(s: &str) -> Option<IpNet> {
    let (addr, prefix) = match s.split_once('/') {
        None => (s, None),
        Some((a, p)) => (a, Some(p)),
    };
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse().ok()?
        }
        Some(_) => return None,
    };
    (prefix <= max).then_some(IpNet { addr, prefix })
}

fn entry_ports(spec: &Node<'_>) -> Result<Vec<ServiceEntryPort>, DocError> {
    let mut out: Vec<ServiceEntryPort> = Vec::new();
    for n in non_empty_list(spec, "ports", "port")? {
        n.expect_mapping()?;
        let number_node = n.require("number")?;
        let number = number_node.as_port()?;
        let name_node = n.require("name")?;
        let name = name_node.as_str()?;
        if let Some(reason) = NameRule::Dns1123Label.check(name) {
            return Err(name_node.invalid(reason));
        }
        if out.iter().any(|p| p.name == name) {
            return Err(name_node.invalid(format!("duplicate port name {name:?}")));
        }
        if out.iter().any(|p| p.number == number) {
            return Err(number_node.invalid(format!("duplicate port number {number}")));
        }
        // Absent (or ""): not said, detected as for a Service port without appProtocol (Istio
        // sniffs such ports too).
        let protocol = match n.get("protocol") {
            None => String::new(),
            Some(p) => {
                let s = p.as_str()?;
                let upper = s.to_ascii_uppercase();
                if !upper.is_empty() && !PROTOCOLS.contains(&upper.as_str()) {
                    return Err(p.invalid(format!("{s:?} is not a protocol ({})", PROTOCOLS.join(", "))));
                }
                upper
            }
        };
        let target_port = n.get("targetPort").map(|t| t.as_port()).transpose()?;
        out.push(ServiceEntryPort { number, protocol, name: name.to_owned(), target_port });
    }
    Ok(out)
}

fn entry_endpoints(
    spec: &Node<'_>,
    resolution: Resolution,
    ports: &[ServiceEntryPort],
) -> Result<Vec<EntryEndpoint>, DocError> {
    let nodes = spec.list("endpoints")?;
    match resolution {
        Resolution::None if !nodes.is_empty() => {
            return Err(spec.require("endpoints")?.invalid(
                "resolution NONE takes no endpoints (connections go to the address the application dialled); use resolution STATIC to list endpoints",
            ))
        }
        Resolution::Static if nodes.is_empty() => {
            return Err(match spec.get("endpoints") {
                None => DocError::Invalid {
                    field: spec.child_path("endpoints"),
                    reason: "resolution STATIC needs endpoints (their IP addresses)".into(),
                },
                Some(n) => n.invalid("resolution STATIC needs at least one endpoint"),
            })
        }
        _ => {}
    }
    let mut out = Vec::with_capacity(nodes.len());
    for n in &nodes {
        n.expect_mapping()?;
        let address_node = n.require("address")?;
        let a = address_node.as_str()?;
        let address = match (a.parse::<IpAddr>(), resolution) {
            (Ok(ip), _) => ip.to_string(),
            (Err(_), Resolution::Static) => {
                return Err(address_node.invalid(format!(
                    "{a:?} is not an IP address (resolution STATIC lists IP addresses; use resolution DNS for host names)"
                )))
            }
            (Err(_), _) => {
                let host = a.to_ascii_lowercase();
                if NameRule::Dns1123Subdomain.check(&host).is_some() {
                    return Err(address_node.invalid(format!(
                        "{a:?} is neither an IP address nor a host name (DNS labels separated by '.')"
                    )));
                }
                host
            }
        };
        let mut endpoint_ports: Vec<(String, u16)> = Vec::new();
        if let Some(map_node) = n.get("ports") {
            for (k, v) in map_node.expect_mapping()? {
                let Some(name) = k.as_str() else {
                    return Err(map_node.invalid("expected port names as keys"));
                };
                let port_node = Node { value: v, path: format!("{}[{name:?}]", map_node.path) };
                if !ports.iter().any(|p| p.name == name) {
                    return Err(
                        port_node.invalid(format!("{name:?} is not the name of a port in spec.ports"))
                    );
                }
                endpoint_ports.push((name.to_owned(), port_node.as_port()?));
            }
        }
        // Map order is not significant (and differs between YAML and the API's JSON).
        endpoint_ports.sort();
        out.push(EntryEndpoint { address, ports: endpoint_ports });
    }
    Ok(out)
}
