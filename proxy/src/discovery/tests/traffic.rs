//! TrafficPolicy (sluice.dev/v1alpha1), Istio's ServiceEntry and the namespace outbound policy:
//! parsing with the CRD's defaults and validation rules, the model's lookups (the policy in force
//! for a target, the ServiceEntry behind an address or a host), the `GET /model` view, and the two
//! sources (manifests and API objects through the Kubernetes source's store) agreeing.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{json, Value};

use crate::discovery::kube::resources::watches;
use crate::discovery::kube::store::KubeStore;
use crate::discovery::kube::ApiObject;
use crate::discovery::manifest::{parse, Format};
use crate::discovery::route::{Fraction, RouteKind};
use crate::discovery::traffic::*;
use crate::discovery::*;

const BOOKINFO_POLICIES: &str = include_str!("../../../../deploy/examples/bookinfo/40-trafficpolicy.yaml");

/// The targetRefs line most tests use: the whole Service `web`.
const WEB: &str = "  targetRefs: [{group: \"\", kind: Service, name: web}]\n";

/// A TrafficPolicy `shop/p` with `spec` (YAML indented by two spaces).
fn tp(spec: &str) -> String {
    format!("apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: p\n  namespace: shop\nspec:\n{spec}")
}

/// A TrafficPolicy `shop/p` for the Service web with `rest` (indented by two spaces).
fn web_policy(rest: &str) -> String {
    tp(&format!("{WEB}{rest}"))
}

/// A ServiceEntry `shop/e` with `spec` (YAML indented by two spaces).
fn se(spec: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: e\n  namespace: shop\nspec:\n{spec}")
}

fn objects(yaml: &str) -> Vec<Object> {
    parse(yaml, Format::Yaml).unwrap_or_else(|e| panic!("parse failed: {e}\n{yaml}"))
}

fn policy(yaml: &str) -> TrafficPolicy {
    match objects(yaml).as_slice() {
        [Object::TrafficPolicy(p)] => (**p).clone(),
        other => panic!("not one TrafficPolicy: {other:?}"),
    }
}

fn entry(yaml: &str) -> ServiceEntry {
    match objects(yaml).as_slice() {
        [Object::ServiceEntry(e)] => (**e).clone(),
        other => panic!("not one ServiceEntry: {other:?}"),
    }
}

fn err(yaml: &str) -> String {
    match parse(yaml, Format::Yaml) {
        Ok(o) => panic!("expected an error, parsed {o:?}\nfrom:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `yaml` is rejected and that the message names `field` and says `reason`.
fn rejects(yaml: &str, field: &str, reason: &str) {
    let e = err(yaml);
    assert!(
        e.contains(&format!("{field}: {reason}")),
        "expected `{field}: {reason}…` in:\n  {e}\nfor:\n{yaml}"
    );
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn service(name: &str, section: Option<&str>) -> PolicyTarget {
    PolicyTarget::Service { name: name.into(), section_name: section.map(Into::into) }
}

// --- What parses, and to what ---

#[test]
fn bookinfo_policies_parse_to_the_expected_model() {
    let parsed = objects(BOOKINFO_POLICIES);
    let [Object::TrafficPolicy(reviews), Object::TrafficPolicy(chaos)] = parsed.as_slice() else {
        panic!("two TrafficPolicies expected: {parsed:?}")
    };
    let expected_reviews = TrafficPolicy {
        namespace: "bookinfo".into(),
        name: "reviews".into(),
        created: None,
        targets: vec![service("reviews", Some("http"))],
        timeouts: PolicyTimeouts { connect: Some(secs(2)), request: Some(secs(10)), idle: Some(secs(3600)) },
        retries: Some(RetryPolicy {
            attempts: 2,
            per_try_timeout: Some(secs(3)),
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                reset: true,
                gateway_error: true,
                ..RetryOn::default()
            },
            retriable_status_codes: vec![],
            retry_non_idempotent: false,
            backoff_base: ms(25),
            backoff_max: ms(250),
            budget: RetryBudget { percent: 20, min_per_second: 10 },
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: 5, // Istio's default, the policy does not say
            consecutive_gateway_errors: 5,
            consecutive_connect_failures: 0,
            interval: secs(10),
            base_ejection_time: secs(30),
            max_ejection_percent: 50,
            min_health_percent: 0,
            split_local_origin: false,
        }),
        circuit_breaker: Some(CircuitBreaker {
            max_connections: Some(1024),
            max_pending_requests: Some(256),
            max_requests: Some(1024),
            max_retries: Some(32),
            max_requests_per_connection: None,
        }),
        fault_injection: None,
        local_rate_limit: Some(LocalRateLimit {
            max_tokens: 200,
            tokens_per_fill: 100,
            fill_interval: secs(1),
            status: 429,
        }),
        tls: None,
    };
    assert_eq!(**reviews, expected_reviews);
    let expected_chaos = TrafficPolicy {
        namespace: "bookinfo".into(),
        name: "ratings-chaos".into(),
        created: None,
        targets: vec![service("ratings", None)],
        timeouts: PolicyTimeouts::default(),
        retries: None,
        outlier_detection: None,
        circuit_breaker: None,
        fault_injection: Some(FaultInjection {
            delay: Some(FaultDelay { fixed: secs(2), fraction: Fraction(0.1) }),
            abort: Some(FaultAbort { http_status: 503, grpc_status: None, fraction: Fraction(0.01) }),
            matches: vec![("end-user".into(), "jason".into())],
        }),
        local_rate_limit: None,
        tls: None,
    };
    assert_eq!(**chaos, expected_chaos);
}

#[test]
fn defaults_of_the_crd() {
    let p = policy(&tp(r#"  targetRefs:
  - {group: "", kind: Service, name: web, sectionName: http}
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: web-canary.v2}
  - {group: gateway.networking.k8s.io, kind: GRPCRoute, name: api}
  - {group: networking.istio.io, kind: ServiceEntry, name: payments}
  timeouts: {connect: 0s, request: 1m30s}
  retries: {}
  outlierDetection: {}
  circuitBreaker: {maxRequestsPerConnection: 0}
  faultInjection:
    abort: {grpcStatus: 14, percentage: 0.5}
  localRateLimit: {maxTokens: 1, tokensPerFill: 1, fillInterval: 100ms}
"#));
    assert_eq!(
        p.targets,
        [
            service("web", Some("http")),
            PolicyTarget::Route { name: "web-canary.v2".into(), grpc: false },
            PolicyTarget::Route { name: "api".into(), grpc: true },
            PolicyTarget::ServiceEntry { name: "payments".into() },
        ]
    );
    assert_eq!(
        p.timeouts,
        PolicyTimeouts { connect: None, request: Some(secs(90)), idle: None },
        "0s is none"
    );
    assert_eq!(
        p.retries,
        Some(RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                reset: true,
                ..RetryOn::default()
            },
            retriable_status_codes: vec![],
            retry_non_idempotent: false,
            backoff_base: ms(25),
            backoff_max: ms(250),
            budget: RetryBudget::default(),
        })
    );
    assert_eq!(RetryBudget::default(), RetryBudget { percent: 20, min_per_second: 10 });
    assert_eq!(
        p.outlier_detection,
        Some(OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            consecutive_connect_failures: 0,
            interval: secs(10),
            base_ejection_time: secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
            split_local_origin: false,
        })
    );
    assert_eq!(p.circuit_breaker, Some(CircuitBreaker::default()), "0 requests per connection: no limit");
    let fault = p.fault_injection.unwrap();
    assert_eq!(fault.delay, None);
    assert_eq!(
        fault.abort,
        Some(FaultAbort { http_status: 503, grpc_status: Some(14), fraction: Fraction(0.005) }),
        "HTTP 503 when only the gRPC status is given; fractions of a percent"
    );
    assert!(fault.matches.is_empty());
    assert_eq!(
        p.local_rate_limit,
        Some(LocalRateLimit { max_tokens: 1, tokens_per_fill: 1, fill_interval: ms(100), status: 429 })
    );
    assert_eq!(p.tls, None);

    // Only the policy's defaults: targets, nothing else.
    let p = policy(&web_policy(""));
    assert_eq!(p.timeouts, PolicyTimeouts::default());
    assert!(p.retries.is_none() && p.outlier_detection.is_none() && p.circuit_breaker.is_none());
    assert!(p.fault_injection.is_none() && p.local_rate_limit.is_none() && p.tls.is_none());

    // Backoff: the maximum defaults to ten times the base (Envoy's rule; 250ms for the default
    // base); an empty retryOn is an absent one.
    let r =
        policy(&web_policy("  retries: {retryOn: [], backoff: {baseInterval: 100ms}}\n")).retries.unwrap();
    assert_eq!((r.backoff_base, r.backoff_max), (ms(100), secs(1)));
    assert_eq!(
        r.retry_on,
        RetryOn { connect_failure: true, refused_stream: true, reset: true, ..RetryOn::default() }
    );
    let r = policy(&web_policy("  retries: {backoff: {maxInterval: 25ms}, attempts: 0}\n")).retries.unwrap();
    assert_eq!((r.attempts, r.backoff_base, r.backoff_max), (0, ms(25), ms(25)), "0 attempts disables");

    // Every retry condition sets its flag, and only those listed are set.
    let r = policy(&web_policy(
        "  retries:\n    retryOn: [5xx, retriable-status-codes, cancelled, deadline-exceeded, resource-exhausted, unavailable]\n    retriableStatusCodes: [409, 503]\n    retryNonIdempotent: true\n    perTryTimeout: 250ms\n    budget: {percent: 0}\n",
    ))
    .retries
    .unwrap();
    assert_eq!(
        r.retry_on,
        RetryOn {
            status_5xx: true,
            retriable_status_codes: true,
            grpc_cancelled: true,
            grpc_deadline_exceeded: true,
            grpc_resource_exhausted: true,
            grpc_unavailable: true,
            ..RetryOn::default()
        }
    );
    assert_eq!(r.retriable_status_codes, [409, 503]);
    assert!(r.retry_non_idempotent);
    assert_eq!(r.per_try_timeout, Some(ms(250)));
    assert_eq!(r.budget, RetryBudget { percent: 0, min_per_second: 10 });

    // A creation timestamp is kept (the oldest policy wins a conflict); v1alpha1 only.
    let mut yaml = web_policy("");
    yaml = yaml
        .replace("  namespace: shop\n", "  namespace: shop\n  creationTimestamp: \"2026-03-02T09:14:07Z\"\n");
    assert_eq!(policy(&yaml).created.as_deref(), Some("2026-03-02T09:14:07Z"));
    assert!(err(&web_policy("").replace("v1alpha1", "v1")).contains("use \"sluice.dev/v1alpha1\""));
}

#[test]
fn target_rules() {
    let t = "spec.targetRefs";
    assert!(err(&tp("  timeouts: {request: 1s}\n")).contains("missing required field `spec.targetRefs`"));
    rejects(&tp("  targetRefs: []\n"), t, "must name at least one target");
    let many: Vec<String> = (0..17).map(|i| format!("{{group: \"\", kind: Service, name: s{i}}}")).collect();
    rejects(
        &tp(&format!("  targetRefs: [{}]\n", many.join(", "))),
        t,
        "at most 16 entries are allowed, found 17",
    );
    rejects(
        &tp("  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: gw}]\n"),
        &format!("{t}[0]"),
        "Gateway (group \"gateway.networking.k8s.io\") is not a target sluice supports",
    );
    rejects(
        &tp("  targetRefs: [{group: \"\", kind: Pod, name: web}]\n"),
        &format!("{t}[0]"),
        "Pod (group \"\") is not a target sluice supports",
    );
    rejects(
        &tp("  targetRefs: [{group: networking.istio.io, kind: Service, name: web}]\n"),
        &format!("{t}[0]"),
        "Service (group \"networking.istio.io\") is not a target",
    );
    assert!(err(&tp("  targetRefs: [{kind: Service, name: web}]\n"))
        .contains("missing required field `spec.targetRefs[0].group`"));
    assert!(err(&tp("  targetRefs: [{group: \"\", name: web}]\n")).contains("`spec.targetRefs[0].kind`"));
    rejects(
        &tp("  targetRefs: [{group: \"\", kind: Service, name: web, namespace: other}]\n"),
        &format!("{t}[0].namespace"),
        "not supported: a TrafficPolicy targets objects in its own namespace (shop)",
    );
    rejects(
        &tp("  targetRefs: [{group: \"\", kind: Service, name: 1web}]\n"),
        &format!("{t}[0].name"),
        "\"1web\" is not a valid name",
    );
    rejects(
        &tp("  targetRefs: [{group: \"\", kind: Service, name: web, sectionName: Http}]\n"),
        &format!("{t}[0].sectionName"),
        "\"Http\" is not a valid name",
    );
    rejects(
        &tp("  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: rule-1}]\n"),
        &format!("{t}[0].sectionName"),
        "not supported for a HTTPRoute target",
    );
    rejects(
        &tp(
            "  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: e, sectionName: https}]\n",
        ),
        &format!("{t}[0].sectionName"),
        "not supported for a ServiceEntry target",
    );
    rejects(
        &tp("  targetRef: {group: \"\", kind: Service, name: web}\n"),
        "spec.targetRef",
        "use targetRefs (a list)",
    );
    // Several references to one target (the Gateway API's rules).
    rejects(
        &tp("  targetRefs: [{group: \"\", kind: Service, name: web}, {group: \"\", kind: Service, name: web}]\n"),
        &format!("{t}[1]"),
        "duplicate targetRef",
    );
    rejects(
        &tp("  targetRefs: [{group: \"\", kind: Service, name: web}, {group: \"\", kind: Service, name: web, sectionName: http}]\n"),
        &format!("{t}[1]"),
        "sectionName must be set on every targetRef when two or more name the same target",
    );
    rejects(
        &tp("  targetRefs: [{group: \"\", kind: Service, name: web, sectionName: http}, {group: \"\", kind: Service, name: web, sectionName: http}]\n"),
        &format!("{t}[1]"),
        "duplicate targetRef",
    );
    // Different ports of one Service, and an HTTPRoute and a GRPCRoute of the same name, are
    // different targets.
    let p = policy(&tp("  targetRefs: [{group: \"\", kind: Service, name: web, sectionName: http}, {group: \"\", kind: Service, name: web, sectionName: grpc}, {group: gateway.networking.k8s.io, kind: HTTPRoute, name: web}, {group: gateway.networking.k8s.io, kind: GRPCRoute, name: web}]\n"));
    assert_eq!(p.targets.len(), 4);
}

#[test]
fn unknown_fields_are_rejected_everywhere_in_spec() {
    rejects(
        &web_policy("  connectionPool: {}\n"),
        "spec.connectionPool",
        "unknown field (known: targetRefs,",
    );
    rejects(&web_policy("  timeouts: {request: 1s, stream: 1s}\n"), "spec.timeouts.stream", "unknown field");
    rejects(
        &web_policy("  retries: {attempts: 1, retryOnStatus: [503]}\n"),
        "spec.retries.retryOnStatus",
        "unknown field",
    );
    rejects(
        &web_policy("  retries: {backoff: {jitter: 1}}\n"),
        "spec.retries.backoff.jitter",
        "unknown field",
    );
    rejects(&web_policy("  retries: {budget: {ttl: 10s}}\n"), "spec.retries.budget.ttl", "unknown field");
    rejects(
        &web_policy("  outlierDetection: {splitExternalLocalOriginErrors: true}\n"),
        "spec.outlierDetection.splitExternalLocalOriginErrors",
        "unknown field",
    );
    rejects(
        &web_policy("  circuitBreaker: {maxStreams: 5}\n"),
        "spec.circuitBreaker.maxStreams",
        "unknown field",
    );
    rejects(
        &web_policy("  faultInjection: {delay: {fixedDelay: 1s, percentage: 1, exponentialDelay: 1s}}\n"),
        "spec.faultInjection.delay.exponentialDelay",
        "unknown field",
    );
    rejects(
        &web_policy("  faultInjection: {abort: {httpStatus: 500, percentage: 1, body: x}}\n"),
        "spec.faultInjection.abort.body",
        "unknown field",
    );
    rejects(&web_policy("  faultInjection: {abort: {httpStatus: 500, percentage: 1}, matches: [{name: a, value: b, regex: true}]}\n"), "spec.faultInjection.matches[0].regex", "unknown field");
    rejects(
        &web_policy(
            "  localRateLimit: {maxTokens: 1, tokensPerFill: 1, fillInterval: 1s, perConnection: true}\n",
        ),
        "spec.localRateLimit.perConnection",
        "unknown field",
    );
    rejects(
        &web_policy("  tls: {mode: SIMPLE, insecureSkipVerify: true}\n"),
        "spec.tls.insecureSkipVerify",
        "unknown field",
    );
    rejects(
        &web_policy("  tls: {mode: SIMPLE, credentialName: x}\n"),
        "spec.tls.credentialName",
        "not supported: sluice originates TLS without a client certificate",
    );
    // A status (what a controller would write) is not part of the spec and is ignored, as any
    // other top-level field besides spec.
    let yaml = format!("{}status:\n  conditions: []\n  observedGeneration: 3\n", web_policy(""));
    assert_eq!(policy(&yaml).targets, [service("web", None)]);
    // The spec must be there, and a mapping.
    assert!(err("apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\n")
        .contains("missing required field `spec`"));
    rejects(&tp("  - a\n"), "spec", "expected a mapping, found a list");
}

#[test]
fn timeout_and_retry_rules() {
    rejects(&web_policy("  timeouts: {idle: 1d}\n"), "spec.timeouts.idle", "\"1d\" is not a duration");
    rejects(
        &web_policy("  timeouts: {connect: 5}\n"),
        "spec.timeouts.connect",
        "expected a string, found a number",
    );
    let r = "spec.retries";
    rejects(&web_policy("  retries: {attempts: 11}\n"), &format!("{r}.attempts"), "11 is out of range 0-10");
    rejects(&web_policy("  retries: {attempts: -1}\n"), &format!("{r}.attempts"), "-1 is out of range 0-10");
    rejects(
        &web_policy("  retries: {retryOn: [connect-failure, 503]}\n"),
        &format!("{r}.retryOn[1]"),
        "expected a string, found a number",
    );
    rejects(
        &web_policy("  retries: {retryOn: [connect-failure, gateway-errors]}\n"),
        &format!("{r}.retryOn[1]"),
        "\"gateway-errors\" is not a retry condition (connect-failure, refused-stream, reset, 5xx",
    );
    rejects(
        &web_policy("  retries: {retriableStatusCodes: [503]}\n"),
        &format!("{r}.retriableStatusCodes"),
        "retriableStatusCodes needs retry-on retriable-status-codes",
    );
    rejects(
        &web_policy("  retries: {retryOn: [5xx, retriable-status-codes]}\n"),
        &format!("{r}.retryOn[1]"),
        "retry-on retriable-status-codes needs retriableStatusCodes",
    );
    let codes = |list: &str| {
        web_policy(&format!(
            "  retries: {{retryOn: [retriable-status-codes], retriableStatusCodes: {list}}}\n"
        ))
    };
    rejects(&codes("[399]"), &format!("{r}.retriableStatusCodes[0]"), "399 is out of range 400-599");
    rejects(&codes("[500, 600]"), &format!("{r}.retriableStatusCodes[1]"), "600 is out of range 400-599");
    rejects(&codes("[503, 409, 503]"), &format!("{r}.retriableStatusCodes[2]"), "duplicate status code 503");
    let seventeen: Vec<String> = (500..517).map(|c| c.to_string()).collect();
    rejects(
        &codes(&format!("[{}]", seventeen.join(", "))),
        &format!("{r}.retriableStatusCodes"),
        "at most 16 entries",
    );
    rejects(
        &web_policy("  retries: {perTryTimeout: soon}\n"),
        &format!("{r}.perTryTimeout"),
        "\"soon\" is not a duration",
    );
    rejects(
        &web_policy("  retries: {backoff: {baseInterval: 100ms, maxInterval: 50ms}}\n"),
        &format!("{r}.backoff.maxInterval"),
        "50ms is shorter than baseInterval (100ms)",
    );
    rejects(
        &web_policy("  retries: {backoff: {maxInterval: 10ms}}\n"),
        &format!("{r}.backoff.maxInterval"),
        "10ms is shorter than baseInterval (25ms)",
    );
    rejects(
        &web_policy("  retries: {backoff: {baseInterval: 0s}}\n"),
        &format!("{r}.backoff.baseInterval"),
        "must be longer than 0",
    );
    rejects(
        &web_policy("  retries: {budget: {percent: 101}}\n"),
        &format!("{r}.budget.percent"),
        "101 is out of range 0-100",
    );
    rejects(
        &web_policy("  retries: {budget: {minRetriesPerSecond: -1}}\n"),
        &format!("{r}.budget.minRetriesPerSecond"),
        "-1 is out of range",
    );
    rejects(
        &web_policy("  retries: {retryNonIdempotent: \"yes\"}\n"),
        &format!("{r}.retryNonIdempotent"),
        "expected true or false",
    );
}

#[test]
fn outlier_breaker_fault_and_rate_limit_rules() {
    let o = "spec.outlierDetection";
    rejects(
        &web_policy("  outlierDetection: {consecutive5xxErrors: 0}\n"),
        o,
        "outlierDetection ejects nothing: set consecutive5xxErrors, consecutiveGatewayErrors or consecutiveConnectFailures",
    );
    let od =
        policy(&web_policy("  outlierDetection: {consecutive5xxErrors: 0, consecutiveConnectFailures: 3}\n"))
            .outlier_detection
            .unwrap();
    assert_eq!((od.consecutive_5xx, od.consecutive_connect_failures), (0, 3));
    rejects(
        &web_policy("  outlierDetection: {interval: 0s}\n"),
        &format!("{o}.interval"),
        "must be longer than 0",
    );
    rejects(
        &web_policy("  outlierDetection: {baseEjectionTime: 0ms}\n"),
        &format!("{o}.baseEjectionTime"),
        "must be longer than 0",
    );
    rejects(
        &web_policy("  outlierDetection: {maxEjectionPercent: 101}\n"),
        &format!("{o}.maxEjectionPercent"),
        "101 is out of range 0-100",
    );
    rejects(
        &web_policy("  outlierDetection: {minHealthPercent: -5}\n"),
        &format!("{o}.minHealthPercent"),
        "-5 is out of range 0-100",
    );
    rejects(
        &web_policy("  outlierDetection: {consecutiveGatewayErrors: -1}\n"),
        &format!("{o}.consecutiveGatewayErrors"),
        "-1 is out of range 0-2147483647",
    );

    let c = "spec.circuitBreaker";
    rejects(
        &web_policy("  circuitBreaker: {maxConnections: 0}\n"),
        &format!("{c}.maxConnections"),
        "0 is out of range 1-2147483647",
    );
    rejects(
        &web_policy("  circuitBreaker: {maxPendingRequests: 0}\n"),
        &format!("{c}.maxPendingRequests"),
        "0 is out of range 1-",
    );
    rejects(
        &web_policy("  circuitBreaker: {maxRequests: 3000000000}\n"),
        &format!("{c}.maxRequests"),
        "3000000000 is out of range 1-2147483647",
    );
    rejects(
        &web_policy("  circuitBreaker: {maxRetries: -1}\n"),
        &format!("{c}.maxRetries"),
        "-1 is out of range 0-",
    );
    let cb = policy(&web_policy("  circuitBreaker: {maxRetries: 0, maxRequestsPerConnection: 1}\n"))
        .circuit_breaker
        .unwrap();
    assert_eq!((cb.max_retries, cb.max_requests_per_connection), (Some(0), Some(1)));

    let f = "spec.faultInjection";
    rejects(&web_policy("  faultInjection: {}\n"), f, "faultInjection needs a delay, an abort or both");
    rejects(
        &web_policy("  faultInjection: {matches: [{name: a, value: b}]}\n"),
        f,
        "faultInjection needs a delay, an abort or both",
    );
    assert!(err(&web_policy("  faultInjection: {delay: {percentage: 5}}\n"))
        .contains("missing required field `spec.faultInjection.delay.fixedDelay`"));
    assert!(err(&web_policy("  faultInjection: {delay: {fixedDelay: 1s}}\n"))
        .contains("`spec.faultInjection.delay.percentage`"));
    rejects(
        &web_policy("  faultInjection: {delay: {fixedDelay: 1s, percentage: 100.5}}\n"),
        &format!("{f}.delay.percentage"),
        "100.5 is out of range 0-100",
    );
    rejects(
        &web_policy("  faultInjection: {delay: {fixedDelay: 1s, percentage: -1}}\n"),
        &format!("{f}.delay.percentage"),
        "-1 is out of range 0-100",
    );
    rejects(
        &web_policy("  faultInjection: {delay: {fixedDelay: 1s, percentage: .nan}}\n"),
        &format!("{f}.delay.percentage"),
        "NaN is out of range 0-100",
    );
    rejects(
        &web_policy("  faultInjection: {delay: {fixedDelay: 1s, percentage: \"5\"}}\n"),
        &format!("{f}.delay.percentage"),
        "expected a number, found a string",
    );
    rejects(
        &web_policy("  faultInjection: {abort: {percentage: 5}}\n"),
        &format!("{f}.abort"),
        "set httpStatus, grpcStatus or both",
    );
    rejects(
        &web_policy("  faultInjection: {abort: {httpStatus: 199, percentage: 5}}\n"),
        &format!("{f}.abort.httpStatus"),
        "199 is out of range 200-599",
    );
    rejects(
        &web_policy("  faultInjection: {abort: {grpcStatus: 17, percentage: 5}}\n"),
        &format!("{f}.abort.grpcStatus"),
        "17 is out of range 0-16",
    );
    let abort = "    abort: {httpStatus: 500, percentage: 100}\n";
    rejects(
        &web_policy(&format!("  faultInjection:\n{abort}    matches: [{{name: \"x user\", value: a}}]\n")),
        &format!("{f}.matches[0].name"),
        "\"x user\" is not a valid header name",
    );
    let nine: Vec<String> = (0..9).map(|i| format!("{{name: h{i}, value: v}}")).collect();
    rejects(
        &web_policy(&format!("  faultInjection:\n{abort}    matches: [{}]\n", nine.join(", "))),
        &format!("{f}.matches"),
        "at most 8 entries are allowed, found 9",
    );
    rejects(
        &web_policy(&format!(
            "  faultInjection:\n{abort}    matches: [{{name: a, value: \"{}\"}}]\n",
            "v".repeat(4097)
        )),
        &format!("{f}.matches[0].value"),
        "at most 4096 characters are allowed, found 4097",
    );
    assert!(err(&web_policy(&format!("  faultInjection:\n{abort}    matches: [{{name: a}}]\n")))
        .contains("`spec.faultInjection.matches[0].value`"));
    let fi = policy(&web_policy(&format!("  faultInjection:\n{abort}    matches: [{{name: X-Chaos, value: \"On\"}}, {{name: b, value: \"\"}}]\n")))
        .fault_injection
        .unwrap();
    assert_eq!(
        fi.matches,
        [("x-chaos".to_owned(), "On".to_owned()), ("b".to_owned(), String::new())],
        "names lower-cased, values exact"
    );
    assert_eq!(fi.abort.unwrap().fraction, Fraction(1.0));

    let l = "spec.localRateLimit";
    assert!(err(&web_policy("  localRateLimit: {tokensPerFill: 1, fillInterval: 1s}\n"))
        .contains("`spec.localRateLimit.maxTokens`"));
    assert!(err(&web_policy("  localRateLimit: {maxTokens: 1, fillInterval: 1s}\n"))
        .contains("`spec.localRateLimit.tokensPerFill`"));
    assert!(err(&web_policy("  localRateLimit: {maxTokens: 1, tokensPerFill: 1}\n"))
        .contains("`spec.localRateLimit.fillInterval`"));
    rejects(
        &web_policy("  localRateLimit: {maxTokens: 0, tokensPerFill: 1, fillInterval: 1s}\n"),
        &format!("{l}.maxTokens"),
        "0 is out of range 1-",
    );
    rejects(
        &web_policy("  localRateLimit: {maxTokens: 1, tokensPerFill: 0, fillInterval: 1s}\n"),
        &format!("{l}.tokensPerFill"),
        "0 is out of range 1-",
    );
    rejects(
        &web_policy("  localRateLimit: {maxTokens: 1, tokensPerFill: 1, fillInterval: 0s}\n"),
        &format!("{l}.fillInterval"),
        "must be longer than 0",
    );
    rejects(
        &web_policy(
            "  localRateLimit: {maxTokens: 1, tokensPerFill: 1, fillInterval: 1s, statusCode: 200}\n",
        ),
        &format!("{l}.statusCode"),
        "200 is out of range 400-599",
    );
    let rl = policy(&web_policy(
        "  localRateLimit: {maxTokens: 10, tokensPerFill: 5, fillInterval: 1m, statusCode: 503}\n",
    ))
    .local_rate_limit
    .unwrap();
    assert_eq!(
        rl,
        LocalRateLimit { max_tokens: 10, tokens_per_fill: 5, fill_interval: secs(60), status: 503 }
    );
}

/// A self-signed CA certificate, PEM.
fn ca_pem(name: &str) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

/// `tls` with `ca` as a YAML literal block.
fn tls_policy(extra: &str, ca: &str) -> String {
    let block: String = ca.lines().map(|l| format!("      {l}\n")).collect();
    web_policy(&format!("  tls:\n    mode: SIMPLE\n{extra}    caCertificates: |\n{block}"))
}

#[test]
fn tls_rules() {
    let two = format!("{}{}", ca_pem("ca-1.example"), ca_pem("ca-2.example"));
    let p = policy(&tls_policy("    sni: api.example.com\n", &two));
    let tls = p.tls.unwrap();
    assert_eq!(tls.sni.as_deref(), Some("api.example.com"));
    let as_written: String = two.lines().map(|l| format!("{l}\n")).collect();
    assert_eq!(tls.ca_certificates.as_deref(), Some(as_written.as_str()));
    let p = policy(&web_policy("  tls: {mode: SIMPLE}\n"));
    assert_eq!(
        p.tls,
        Some(TlsOrigination { sni: None, ca_certificates: None }),
        "the system's roots, the host's name"
    );

    let t = "spec.tls";
    assert!(err(&web_policy("  tls: {sni: a.example}\n")).contains("missing required field `spec.tls.mode`"));
    rejects(
        &web_policy("  tls: {mode: MUTUAL}\n"),
        &format!("{t}.mode"),
        "mode MUTUAL is not supported: sluice originates TLS with server authentication only (SIMPLE)",
    );
    rejects(
        &web_policy("  tls: {mode: ISTIO_MUTUAL}\n"),
        &format!("{t}.mode"),
        "mode ISTIO_MUTUAL is not supported",
    );
    rejects(&web_policy("  tls: {mode: DISABLE}\n"), &format!("{t}.mode"), "mode DISABLE is not supported");
    rejects(
        &web_policy("  tls: {mode: simple}\n"),
        &format!("{t}.mode"),
        "\"simple\" is not a TLS mode (SIMPLE)",
    );
    rejects(
        &web_policy("  tls: {mode: SIMPLE, sni: \"*.example.com\"}\n"),
        &format!("{t}.sni"),
        "\"*.example.com\" is not a host name",
    );
    rejects(
        &web_policy("  tls: {mode: SIMPLE, sni: \"\"}\n"),
        &format!("{t}.sni"),
        "\"\" is not a host name",
    );

    let ca = format!("{t}.caCertificates");
    rejects(
        &tls_policy("", "not a certificate"),
        &ca,
        "no certificate found: expected PEM CERTIFICATE blocks",
    );
    let key_only = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
    rejects(&tls_policy("", &key_only), &ca, "no certificate found");
    rejects(
        &tls_policy("", "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n"),
        &ca,
        "invalid PEM in certificate 1: base64 decode error",
    );
    let good = ca_pem("ca.example");
    let truncated = good.replace("-----END CERTIFICATE-----", "");
    rejects(&tls_policy("", &truncated), &ca, "invalid PEM in certificate 1: missing section end marker");
    // Base64 that decodes to something that is not a certificate, after a good one.
    let junk = format!("{good}-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n");
    rejects(&tls_policy("", &junk), &ca, "certificate 2 is not a valid X.509 certificate");
}

// --- ServiceEntry ---

#[test]
fn service_entries_parse_with_istios_defaults() {
    let e = entry(&se(r#"  hosts: [API.Example.com, "*.Internal.example.com"]
  addresses: [192.0.2.10, 198.51.100.0/24, "2001:db8::/32"]
  ports:
  - {number: 443, name: https, protocol: tls}
  - {number: 80, name: http, protocol: HTTP, targetPort: 8080}
  - {number: 5432, name: pg}
  location: MESH_INTERNAL
  resolution: STATIC
  exportTo: ["."]
  endpoints:
  - address: 192.0.2.20
    ports: {https: 8443, http: 8081}
    labels: {zone: a}
  - address: "2001:DB8::20"
"#));
    assert_eq!(
        e,
        ServiceEntry {
            namespace: "shop".into(),
            name: "e".into(),
            hosts: vec!["api.example.com".into(), "*.internal.example.com".into()],
            addresses: vec![
                IpNet { addr: "192.0.2.10".parse().unwrap(), prefix: 32 },
                IpNet { addr: "198.51.100.0".parse().unwrap(), prefix: 24 },
                IpNet { addr: "2001:db8::".parse().unwrap(), prefix: 32 },
            ],
            ports: vec![
                ServiceEntryPort {
                    number: 443,
                    protocol: "TLS".into(),
                    name: "https".into(),
                    target_port: None
                },
                ServiceEntryPort {
                    number: 80,
                    protocol: "HTTP".into(),
                    name: "http".into(),
                    target_port: Some(8080)
                },
                ServiceEntryPort {
                    number: 5432,
                    protocol: String::new(),
                    name: "pg".into(),
                    target_port: None
                },
            ],
            location: EntryLocation::Internal,
            resolution: Resolution::Static,
            endpoints: vec![
                EntryEndpoint {
                    address: "192.0.2.20".into(),
                    ports: vec![("http".into(), 8081), ("https".into(), 8443)],
                },
                EntryEndpoint { address: "2001:db8::20".into(), ports: vec![] },
            ],
        }
    );
    // Istio's defaults: MESH_EXTERNAL, resolution NONE; v1beta1 is the same resource.
    let e = entry(
        &se("  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n")
            .replace("networking.istio.io/v1\n", "networking.istio.io/v1beta1\n"),
    );
    assert_eq!((e.location, e.resolution), (EntryLocation::External, Resolution::None));
    assert!(e.addresses.is_empty() && e.endpoints.is_empty());
    // DNS: endpoints may be host names (lower-cased).
    let e = entry(&se("  hosts: [\"*.example.com\"]\n  ports: [{number: 443, name: https}]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: Proxy.Example.NET}, {address: 203.0.113.5}]\n"));
    assert_eq!(e.resolution, Resolution::DnsRoundRobin);
    assert_eq!(
        e.endpoints.iter().map(|ep| ep.address.as_str()).collect::<Vec<_>>(),
        ["proxy.example.net", "203.0.113.5"]
    );
}

#[test]
fn service_entry_rules() {
    let port = "  ports: [{number: 443, name: https, protocol: HTTPS}]\n";
    let host = "  hosts: [api.example.com]\n";
    let with = |rest: &str| se(&format!("{host}{port}{rest}"));
    assert!(err(&se(port)).contains("missing required field `spec.hosts`"));
    assert!(err("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: e}\n")
        .contains("missing required field `spec`"));
    rejects(&se(&format!("  hosts: []\n{port}")), "spec.hosts", "must list at least one host");
    rejects(&se(&format!("  hosts: [\"*\"]\n{port}")), "spec.hosts[0]", "\"*\" is not allowed");
    rejects(
        &se(&format!("  hosts: [a.example.com, \"api.*.com\"]\n{port}")),
        "spec.hosts[1]",
        "\"api.*.com\" is not a host name",
    );
    rejects(
        &se(&format!("  hosts: [\"**.example.com\"]\n{port}")),
        "spec.hosts[0]",
        "\"**.example.com\" is not a host name",
    );
    rejects(
        &se(&format!("  hosts: [\"http://example.com\"]\n{port}")),
        "spec.hosts[0]",
        "\"http://example.com\" is not a host name",
    );
    assert!(err(&se(host)).contains("missing required field `spec.ports`"));
    rejects(
        &se(&format!("{host}  ports: [{{number: 0, name: x}}]\n")),
        "spec.ports[0].number",
        "port 0 is out of range 1-65535",
    );
    rejects(
        &se(&format!("{host}  ports: [{{number: 70000, name: x}}]\n")),
        "spec.ports[0].number",
        "port 70000 is out of range",
    );
    assert!(err(&se(&format!("{host}  ports: [{{number: 80}}]\n"))).contains("`spec.ports[0].name`"));
    assert!(err(&se(&format!("{host}  ports: [{{name: http}}]\n"))).contains("`spec.ports[0].number`"));
    rejects(
        &se(&format!("{host}  ports: [{{number: 80, name: HTTP}}]\n")),
        "spec.ports[0].name",
        "\"HTTP\" is not a valid name",
    );
    rejects(
        &se(&format!("{host}  ports: [{{number: 80, name: http}}, {{number: 81, name: http}}]\n")),
        "spec.ports[1].name",
        "duplicate port name \"http\"",
    );
    rejects(
        &se(&format!("{host}  ports: [{{number: 80, name: http}}, {{number: 80, name: web}}]\n")),
        "spec.ports[1].number",
        "duplicate port number 80",
    );
    rejects(
        &se(&format!("{host}  ports: [{{number: 80, name: http, protocol: QUIC}}]\n")),
        "spec.ports[0].protocol",
        "\"QUIC\" is not a protocol (HTTP, HTTPS,",
    );
    rejects(
        &se(&format!("{host}  ports: [{{number: 80, name: http, targetPort: 0}}]\n")),
        "spec.ports[0].targetPort",
        "port 0 is out of range",
    );
    rejects(
        &with("  location: EXTERNAL\n"),
        "spec.location",
        "\"EXTERNAL\" is not a location (MESH_EXTERNAL, MESH_INTERNAL)",
    );
    rejects(
        &with("  resolution: DYNAMIC_DNS\n"),
        "spec.resolution",
        "\"DYNAMIC_DNS\" is not a resolution (NONE, STATIC, DNS, DNS_ROUND_ROBIN)",
    );
    rejects(
        &with("  addresses: [192.0.2.300]\n"),
        "spec.addresses[0]",
        "\"192.0.2.300\" is not an IP address or a CIDR block",
    );
    rejects(
        &with("  addresses: [192.0.2.0/33]\n"),
        "spec.addresses[0]",
        "\"192.0.2.0/33\" is not an IP address or a CIDR block",
    );
    rejects(
        &with("  addresses: [192.0.2.0/]\n"),
        "spec.addresses[0]",
        "\"192.0.2.0/\" is not an IP address or a CIDR block",
    );
    rejects(
        &with("  addresses: [example.com]\n"),
        "spec.addresses[0]",
        "\"example.com\" is not an IP address or a CIDR block",
    );
    rejects(
        &with("  resolution: DNS\n  addresses: [192.0.2.0/24]\n"),
        "spec.addresses[0]",
        "CIDR blocks are allowed only with resolution NONE or STATIC",
    );
    let dns = entry(&with("  resolution: DNS\n  addresses: [192.0.2.7]\n"));
    assert_eq!(dns.addresses, [IpNet { addr: "192.0.2.7".parse().unwrap(), prefix: 32 }]);
    // Resolution and endpoints.
    rejects(&with("  resolution: STATIC\n"), "spec.endpoints", "resolution STATIC needs endpoints");
    rejects(
        &with("  resolution: STATIC\n  endpoints: []\n"),
        "spec.endpoints",
        "resolution STATIC needs at least one endpoint",
    );
    rejects(
        &with("  resolution: STATIC\n  endpoints: [{address: db.example.com}]\n"),
        "spec.endpoints[0].address",
        "\"db.example.com\" is not an IP address (resolution STATIC lists IP addresses",
    );
    rejects(
        &with("  endpoints: [{address: 192.0.2.1}]\n"),
        "spec.endpoints",
        "resolution NONE takes no endpoints",
    );
    rejects(
        &with("  resolution: DNS\n  endpoints: [{address: \"unix:///var/run/x.sock\"}]\n"),
        "spec.endpoints[0].address",
        "\"unix:///var/run/x.sock\" is neither an IP address nor a host name",
    );
    assert!(err(&with("  resolution: DNS\n  endpoints: [{ports: {https: 443}}]\n"))
        .contains("`spec.endpoints[0].address`"));
    rejects(
        &with("  resolution: STATIC\n  endpoints: [{address: 192.0.2.1, ports: {http: 80}}]\n"),
        "spec.endpoints[0].ports[\"http\"]",
        "\"http\" is not the name of a port in spec.ports",
    );
    rejects(
        &with("  resolution: STATIC\n  endpoints: [{address: 192.0.2.1, ports: {https: 0}}]\n"),
        "spec.endpoints[0].ports[\"https\"]",
        "port 0 is out of range",
    );
    rejects(
        &se(&format!("  hosts: [api.example.com, \"*.example.com\"]\n{port}  resolution: DNS\n")),
        "spec.hosts[1]",
        "a wildcard host cannot be resolved with DNS",
    );
    // What sluice does not do.
    rejects(&with("  workloadSelector: {labels: {app: db}}\n"), "spec.workloadSelector", "not supported");
    rejects(
        &with("  subjectAltNames: [spiffe://cluster.local/ns/a/sa/b]\n"),
        "spec.subjectAltNames",
        "not supported",
    );
    rejects(&with("  exportAll: true\n"), "spec.exportAll", "unknown field");
    // exportTo is accepted (and ignored): every entry is visible to every namespace.
    assert_eq!(entry(&with("  exportTo: [\"*\"]\n")).hosts, ["api.example.com"]);
}

// --- The namespace outbound policy ---

#[test]
fn namespace_outbound_policy_annotation() {
    let ns = |ann: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations:\n    sluice.dev/mesh: enabled\n{ann}")
    };
    let m = Model::from_manifest(&ns(""), Format::Yaml).unwrap();
    assert_eq!(m.namespace("shop").unwrap().outbound_policy, OutboundPolicy::AllowAny);
    assert_eq!(m.outbound_policy("shop"), OutboundPolicy::AllowAny);
    assert_eq!(m.outbound_policy("elsewhere"), OutboundPolicy::AllowAny, "a namespace with no manifest");
    for (value, want) in
        [("REGISTRY_ONLY", OutboundPolicy::RegistryOnly), ("ALLOW_ANY", OutboundPolicy::AllowAny)]
    {
        let m =
            Model::from_manifest(&ns(&format!("    {OUTBOUND_POLICY_ANNOTATION}: {value}\n")), Format::Yaml)
                .unwrap();
        assert_eq!(m.outbound_policy("shop"), want);
        assert_eq!(m.namespace("shop").unwrap().outbound_policy, want);
    }
    for bad in ["registry_only", "REGISTRY-ONLY", "\"\""] {
        let e = err(&ns(&format!("    sluice.dev/outbound-traffic-policy: {bad}\n")));
        assert!(
            e.contains("metadata.annotations[\"sluice.dev/outbound-traffic-policy\"]: ")
                && e.contains("is not an outbound traffic policy (ALLOW_ANY, REGISTRY_ONLY)"),
            "{e}"
        );
    }
}

// --- The model's lookups ---

/// A TrafficPolicy `ns/name` created at `created` (an RFC 3339 time, or none) with `targets`
/// (the YAML of the targetRefs list's items).
fn policy_doc(ns: &str, name: &str, created: Option<&str>, targets: &[&str]) -> String {
    let created = created.map(|c| format!("  creationTimestamp: \"{c}\"\n")).unwrap_or_default();
    let refs: Vec<String> = targets.iter().map(|t| format!("  - {t}\n")).collect();
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\n{created}spec:\n  targetRefs:\n{}",
        refs.concat()
    )
}

fn model(docs: &[String]) -> Model {
    Model::from_manifest(&docs.join("\n---\n"), Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn name(p: Option<&Arc<TrafficPolicy>>) -> Option<&str> {
    p.map(|p| p.name.as_str())
}

const SVC_WEB: &str = "{group: \"\", kind: Service, name: web}";
const SVC_WEB_HTTP: &str = "{group: \"\", kind: Service, name: web, sectionName: http}";

#[test]
fn the_oldest_policy_wins_and_a_port_policy_beats_a_service_policy() {
    let m = model(&[
        policy_doc("shop", "newest", None, &[SVC_WEB]),
        policy_doc("shop", "newest-port", None, &[SVC_WEB_HTTP]),
        policy_doc("shop", "b-whole", Some("2026-01-02T00:00:00Z"), &[SVC_WEB]),
        policy_doc("shop", "a-whole", Some("2026-01-02T00:00:00Z"), &[SVC_WEB]),
        policy_doc("shop", "later-port", Some("2026-02-01T00:00:00Z"), &[SVC_WEB_HTTP]),
        policy_doc(
            "shop",
            "z-port",
            Some("2026-03-01T00:00:00Z"),
            &[SVC_WEB_HTTP, "{group: \"\", kind: Service, name: web, sectionName: grpc}"],
        ),
        policy_doc("other", "elsewhere", Some("2020-01-01T00:00:00Z"), &[SVC_WEB]),
    ]);
    // Same time: the name decides; a whole-Service policy for an unnamed port or the Service.
    assert_eq!(name(m.traffic_policy_for_service("shop", "web", None)), Some("a-whole"));
    assert_eq!(name(m.traffic_policy_for_service("shop", "web", Some("metrics"))), Some("a-whole"));
    // A sectionName target beats a whole-Service one, even an older one; the oldest of those.
    assert_eq!(name(m.traffic_policy_for_service("shop", "web", Some("http"))), Some("later-port"));
    assert_eq!(name(m.traffic_policy_for_service("shop", "web", Some("grpc"))), Some("z-port"));
    // Namespaces do not mix.
    assert_eq!(name(m.traffic_policy_for_service("other", "web", Some("http"))), Some("elsewhere"));
    assert_eq!(m.traffic_policy_for_service("shop", "api", None), None);
    assert_eq!(m.traffic_policy_for_service("nowhere", "web", None), None);
    assert_eq!(m.traffic_policies().count(), 7, "every policy is in the model, in force or not");

    // Without timestamps (hand-written manifests) the name decides; a timestamp beats none.
    let m = model(&[policy_doc("shop", "b", None, &[SVC_WEB]), policy_doc("shop", "a", None, &[SVC_WEB])]);
    assert_eq!(name(m.traffic_policy_for_service("shop", "web", Some("http"))), Some("a"));
    let m = model(&[
        policy_doc("shop", "a", None, &[SVC_WEB]),
        policy_doc("shop", "b", Some("2030-01-01T00:00:00Z"), &[SVC_WEB]),
    ]);
    assert_eq!(name(m.traffic_policy_for_service("shop", "web", None)), Some("b"));
}

#[test]
fn route_and_service_entry_policies() {
    let http = "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: canary}";
    let grpc = "{group: gateway.networking.k8s.io, kind: GRPCRoute, name: canary}";
    let entry = "{group: networking.istio.io, kind: ServiceEntry, name: payments}";
    let m = model(&[
        policy_doc("shop", "routes", Some("2026-01-01T00:00:00Z"), &[http, entry]),
        policy_doc("shop", "older", Some("2025-01-01T00:00:00Z"), &[grpc, entry]),
        policy_doc("shop", "newer", Some("2027-01-01T00:00:00Z"), &[http]),
    ]);
    assert_eq!(name(m.traffic_policy_for_route(RouteKind::Http, "shop", "canary")), Some("routes"));
    assert_eq!(name(m.traffic_policy_for_route(RouteKind::Grpc, "shop", "canary")), Some("older"));
    assert_eq!(m.traffic_policy_for_route(RouteKind::Http, "other", "canary"), None);
    assert_eq!(name(m.traffic_policy_for_service_entry("shop", "payments")), Some("older"));
    assert_eq!(m.traffic_policy_for_service_entry("shop", "canary"), None);
    assert_eq!(m.traffic_policy_for_service("shop", "canary", None), None, "kinds do not mix");
    assert_eq!(name(m.traffic_policy("shop", "newer")), Some("newer"));
}

fn entry_doc(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn found(x: Option<(&Arc<ServiceEntry>, &ServiceEntryPort)>) -> Option<String> {
    x.map(|(e, p)| format!("{}/{}:{}", e.namespace, e.name, p.name))
}

#[test]
fn service_entry_for_addr_matches_addresses_blocks_and_static_endpoints() {
    let m = model(&[
        entry_doc(
            "shop",
            "vip",
            "  hosts: [db.example.com]\n  addresses: [192.0.2.10, \"2001:db8::10\"]\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n",
        ),
        entry_doc(
            "shop",
            "block",
            "  hosts: [partners.example.com]\n  addresses: [198.51.100.0/24, 192.0.3.0/24]\n  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 5432, name: pg}]\n",
        ),
        entry_doc(
            "shop",
            "static",
            "  hosts: [legacy.example.com]\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: [{address: 203.0.113.7}, {address: 203.0.113.8}]\n",
        ),
        entry_doc(
            "shop",
            "dns",
            "  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n  resolution: DNS\n  endpoints: [{address: 203.0.113.9}]\n",
        ),
        entry_doc(
            "aaa",
            "first",
            "  hosts: [first.example.com]\n  addresses: [198.51.100.128/25]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n",
        ),
    ]);
    // An address of the entry.
    assert_eq!(found(m.service_entry_for_addr(ip("192.0.2.10"), 5432)).as_deref(), Some("shop/vip:pg"));
    assert_eq!(found(m.service_entry_for_addr(ip("2001:db8::10"), 5432)).as_deref(), Some("shop/vip:pg"));
    assert_eq!(
        found(m.service_entry_for_addr(ip("::ffff:192.0.2.10"), 5432)).as_deref(),
        Some("shop/vip:pg"),
        "IPv4-mapped"
    );
    // An address inside another entry's CIDR block: both declare 5432, so the first in
    // namespace/name order wins (shop/block before shop/vip, shop/a-vip before shop/block).
    let m2 = model(&[
        entry_doc("shop", "vip", "  hosts: [db.example.com]\n  addresses: [192.0.2.10]\n  ports: [{number: 5432, name: pg}]\n"),
        entry_doc("shop", "block", "  hosts: [p.example.com]\n  addresses: [192.0.2.0/24]\n  ports: [{number: 5432, name: postgres}]\n"),
    ]);
    assert_eq!(
        found(m2.service_entry_for_addr(ip("192.0.2.10"), 5432)).as_deref(),
        Some("shop/block:postgres")
    );
    let m3 = model(&[
        entry_doc("shop", "a-vip", "  hosts: [db.example.com]\n  addresses: [192.0.2.10]\n  ports: [{number: 5432, name: pg}]\n"),
        entry_doc("shop", "block", "  hosts: [p.example.com]\n  addresses: [192.0.2.0/24]\n  ports: [{number: 5432, name: postgres}]\n"),
    ]);
    assert_eq!(found(m3.service_entry_for_addr(ip("192.0.2.10"), 5432)).as_deref(), Some("shop/a-vip:pg"));
    assert_eq!(
        found(m3.service_entry_for_addr(ip("192.0.2.11"), 5432)).as_deref(),
        Some("shop/block:postgres")
    );
    // A CIDR block, and the port must be declared.
    assert_eq!(found(m.service_entry_for_addr(ip("198.51.100.7"), 443)).as_deref(), Some("shop/block:https"));
    assert_eq!(
        found(m.service_entry_for_addr(ip("198.51.100.200"), 443)).as_deref(),
        Some("aaa/first:tls"),
        "aaa sorts first"
    );
    assert_eq!(
        found(m.service_entry_for_addr(ip("198.51.100.200"), 5432)).as_deref(),
        Some("shop/block:pg"),
        "first lacks the port"
    );
    assert_eq!(m.service_entry_for_addr(ip("198.51.100.7"), 80), None, "port mismatch");
    let block = m.service_entry("shop", "block").unwrap();
    assert_eq!(m.service_entry_for_addr(ip("192.0.3.10"), 443), Some((block, &block.ports[0])));
    assert_eq!(m.service_entry_for_addr(ip("192.0.2.10"), 443), None, "vip lacks the port");
    // STATIC endpoints; a DNS entry's endpoint addresses are not its addresses.
    assert_eq!(found(m.service_entry_for_addr(ip("203.0.113.8"), 8080)).as_deref(), Some("shop/static:http"));
    assert_eq!(m.service_entry_for_addr(ip("203.0.113.8"), 443), None);
    assert_eq!(m.service_entry_for_addr(ip("203.0.113.9"), 443), None);
    assert_eq!(m.service_entry_for_addr(ip("10.0.0.1"), 443), None);
    assert_eq!(m.service_entries().count(), 5);
}

#[test]
fn service_entry_for_host_matches_exact_then_wildcard_hosts() {
    let m = model(&[
        entry_doc("shop", "api", "  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n  resolution: DNS\n"),
        entry_doc("shop", "any", "  hosts: [\"*.example.com\"]\n  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http, protocol: HTTP}]\n"),
        entry_doc("shop", "eu", "  hosts: [\"*.eu.example.com\"]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n"),
        entry_doc("aaa", "dup", "  hosts: [api.example.com]\n  ports: [{number: 8443, name: alt, protocol: HTTPS}]\n  resolution: DNS\n"),
    ]);
    let at = |host: &str, port: u16| found(m.service_entry_for_host(host, port));
    assert_eq!(at("api.example.com", 443).as_deref(), Some("shop/api:https"));
    assert_eq!(at("API.Example.COM", 443).as_deref(), Some("shop/api:https"), "case-insensitive");
    assert_eq!(at("api.example.com:443", 443).as_deref(), Some("shop/api:https"), "with the port");
    assert_eq!(at("api.example.com.", 443).as_deref(), Some("shop/api:https"), "fully qualified");
    assert_eq!(at("api.example.com", 8443).as_deref(), Some("aaa/dup:alt"));
    // The exact host lacks port 80: the wildcard entry has it.
    assert_eq!(at("api.example.com", 80).as_deref(), Some("shop/any:http"), "port mismatch falls through");
    assert_eq!(at("www.example.com", 443).as_deref(), Some("shop/any:https"));
    assert_eq!(at("a.b.example.com", 80).as_deref(), Some("shop/any:http"), "any depth");
    assert_eq!(at("x.eu.example.com", 443).as_deref(), Some("shop/eu:tls"), "the most specific wildcard");
    assert_eq!(at("X.EU.example.com:443", 80).as_deref(), Some("shop/any:http"));
    assert_eq!(at("example.com", 443), None, "a wildcard does not match its apex");
    assert_eq!(at("api.example.org", 443), None);
    assert_eq!(at("www.example.com", 22), None, "port mismatch");
    assert_eq!(at("", 443), None);
    assert_eq!(at(&"a".repeat(300), 443), None);
    assert_eq!(at("[2001:db8::1]:443", 443), None);
}

// --- The view ---

#[test]
fn model_view_lists_traffic_policies_service_entries_and_outbound_policies() {
    let mut docs: Vec<String> = BOOKINFO_POLICIES.split("\n---\n").map(str::to_owned).collect();
    docs.push(
        policy_doc(
            "bookinfo",
            "egress",
            None,
            &[
                "{group: networking.istio.io, kind: ServiceEntry, name: payments}",
                "{group: gateway.networking.k8s.io, kind: GRPCRoute, name: ratings}",
            ],
        ) + "  tls: {mode: SIMPLE}\n  timeouts: {request: 5s}\n",
    );
    docs.push(entry_doc(
        "bookinfo",
        "payments",
        "  hosts: [pay.example.com]\n  addresses: [192.0.2.0/24, 192.0.2.1]\n  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}, {number: 9000, name: raw}]\n  resolution: DNS\n",
    ));
    docs.push(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n  annotations:\n    sluice.dev/outbound-traffic-policy: REGISTRY_ONLY\n".into(),
    );
    let m = model(&docs[..2]);
    assert_eq!(m.traffic_policies().count(), 2);
    let err = Model::from_manifest(&docs.join("\n---\n"), Format::Yaml).unwrap_err().to_string();
    assert!(err.contains("CIDR blocks are allowed only with resolution NONE or STATIC"), "{err}");
    let last = docs.len() - 2;
    docs[last] = docs[last].replace("192.0.2.0/24, ", "");
    let v = serde_json::to_value(model(&docs).view()).unwrap();
    assert_eq!(
        v["traffic_policies"],
        json!([
            {"namespace": "bookinfo", "name": "egress", "targets": ["ServiceEntry payments", "GRPCRoute ratings"],
             "features": ["timeouts", "tls"]},
            {"namespace": "bookinfo", "name": "ratings-chaos", "targets": ["Service ratings"], "features": ["faultInjection"]},
            {"namespace": "bookinfo", "name": "reviews", "targets": ["Service reviews:http"],
             "features": ["timeouts", "retries", "outlierDetection", "circuitBreaker", "localRateLimit"]},
        ])
    );
    assert_eq!(
        v["service_entries"],
        json!([{"namespace": "bookinfo", "name": "payments", "hosts": ["pay.example.com"], "addresses": ["192.0.2.1"],
                "ports": ["80/HTTP->443", "9000"], "location": "MESH_EXTERNAL", "resolution": "DNS"}])
    );
    assert_eq!(
        v["namespaces"],
        json!([{"name": "bookinfo", "enrolled": false, "peer_auth": "PERMISSIVE", "outbound_policy": "REGISTRY_ONLY"}])
    );
    let m = model(&[entry_doc("a", "b", "  hosts: [x.example]\n  addresses: [\"2001:db8::/48\", 10.0.0.0/8]\n  ports: [{number: 1, name: p}]\n")]);
    assert_eq!(
        serde_json::to_value(m.view()).unwrap()["service_entries"][0]["addresses"],
        json!(["2001:db8::/48", "10.0.0.0/8"])
    );
}

// --- The sources ---

/// Two files that define the same TrafficPolicy (or ServiceEntry): the first file wins, the
/// second is reported; a malformed policy file keeps its last good version.
#[test]
fn manifest_files_conflict_and_keep_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let write = |f: &str, text: &str| std::fs::write(dir.path().join(f), text).unwrap();
    let p = policy_doc("shop", "p", None, &[SVC_WEB]);
    let e = entry_doc("shop", "e", "  hosts: [a.example.com]\n  ports: [{number: 443, name: https}]\n");
    write("a.yaml", &format!("{p}---\n{e}"));
    write("b.yaml", &format!("{p}---\n{e}"));
    let mut store = crate::discovery::store::Store::new(dir.path().to_path_buf());
    store.scan().unwrap();
    let m = store.build();
    assert_eq!(m.traffic_policies().count(), 1);
    assert_eq!(m.service_entries().count(), 1);
    let reasons: Vec<&str> = m.errors().iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "TrafficPolicy \"shop/p\" is also defined in a.yaml, which sorts first and wins; this definition is ignored",
            "ServiceEntry \"shop/e\" is also defined in a.yaml, which sorts first and wins; this definition is ignored",
        ]
    );
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    write("a.yaml", &format!("{p}  retries: {{attempts: 99}}\n---\n{e}"));
    store.scan().unwrap();
    let m = store.build();
    assert_eq!(m.errors().len(), 1);
    assert!(
        m.errors()[0].reason.contains("spec.retries.attempts: 99 is out of range 0-10"),
        "{:?}",
        m.errors()
    );
    assert!(m.traffic_policy("shop", "p").unwrap().retries.is_none(), "the last good version stays");
}

/// API objects (custom resources keep apiVersion and kind in a list), through kube's
/// `ApiObject` as the Kubernetes source does, make the same model as the manifests.
#[test]
fn api_objects_make_the_same_model_as_manifests() {
    let watch = |label: &str| watches().iter().position(|w| w.label == label).unwrap();
    let mut s = KubeStore::new(&watches());
    for i in 0..watches().len() {
        s.init(i);
        s.init_done(i);
    }
    let api = |yaml: &str| {
        let mut v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        v["metadata"]["creationTimestamp"] = "2026-03-02T09:14:07Z".into();
        v["metadata"]["uid"] = "0f0e0d0c-0000-4000-8000-000000000001".into();
        v["metadata"]["resourceVersion"] = "42".into();
        v["metadata"]["generation"] = 1.into();
        v
    };
    let obj = |v: Value| ApiObject::from_json(v).expect("the source decodes the object");
    let entry_yaml = entry_doc(
        "bookinfo",
        "payments",
        "  hosts: [pay.example.com]\n  ports: [{number: 443, name: https, protocol: HTTPS}, {number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 192.0.2.9, ports: {https: 8443, http: 8080}}]\n",
    );
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n  annotations:\n    sluice.dev/mesh: enabled\n    sluice.dev/outbound-traffic-policy: REGISTRY_ONLY\n";
    let docs: Vec<&str> = BOOKINFO_POLICIES.split("\n---\n").collect();
    for doc in &docs {
        assert!(s.apply(watch("trafficpolicies"), obj(api(doc))).changed());
    }
    assert!(s.apply(watch("serviceentries"), obj(api(&entry_yaml))).changed());
    let mut ns: Value = serde_yaml_ng::from_str(namespace).unwrap();
    ns.as_object_mut().unwrap().remove("apiVersion");
    assert!(s.apply(watch("namespaces"), obj(ns)).changed());
    let mut bad = api(docs[0]);
    bad["metadata"]["name"] = "broken".into();
    bad["spec"]["tls"] = json!({"mode": "MUTUAL"});
    s.apply(watch("trafficpolicies"), obj(bad));
    let from_api = s.build();

    let from_file =
        model(&[docs[0].to_owned(), docs[1].to_owned(), entry_yaml.clone(), namespace.to_owned()]);
    let mut reviews = (**from_file.traffic_policy("bookinfo", "reviews").unwrap()).clone();
    reviews.created = Some("2026-03-02T09:14:07Z".into());
    assert_eq!(**from_api.traffic_policy("bookinfo", "reviews").unwrap(), reviews);
    assert_eq!(
        from_api.service_entry("bookinfo", "payments"),
        from_file.service_entry("bookinfo", "payments")
    );
    assert_eq!(from_api.namespace("bookinfo"), from_file.namespace("bookinfo"));
    assert_eq!(from_api.outbound_policy("bookinfo"), OutboundPolicy::RegistryOnly);
    let a = from_api.service_entry_for_addr(ip("192.0.2.9"), 443).map(|(e, p)| (e.name.clone(), p.clone()));
    let b = from_file.service_entry_for_addr(ip("192.0.2.9"), 443).map(|(e, p)| (e.name.clone(), p.clone()));
    assert_eq!(a, b);
    assert!(a.is_some());
    assert_eq!(
        name(from_api.traffic_policy_for_service("bookinfo", "reviews", Some("http"))),
        name(from_file.traffic_policy_for_service("bookinfo", "reviews", Some("http")))
    );
    let mut va = from_api.view();
    let mut vb = from_file.view();
    assert_eq!(va.errors.len(), 1);
    assert_eq!(va.errors[0].source, "kubernetes:TrafficPolicy/bookinfo/broken");
    assert!(va.errors[0].reason.contains("spec.tls.mode: mode MUTUAL is not supported"), "{:?}", va.errors);
    (va.generation, vb.generation) = (0, 0);
    va.errors.clear();
    vb.errors.clear();
    assert_eq!(va, vb);
}
