//! Every way the CA service says no: the gRPC status code the contract assigns, the metric
//! label, and a message that tells an operator what to do about it.

use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use super::csr::CsrProblem;

/// The metadata key carrying the wait before retrying, with `RESOURCE_EXHAUSTED`.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    // --- UNAVAILABLE: try again later, nothing is wrong with the request ---
    #[error(
        "the CA is starting: its list of the cluster's pods is not complete yet; retry in a few seconds"
    )]
    NotReady,
    #[error("the CA could not check the caller's token with the Kubernetes API server: {0}")]
    ReviewUnavailable(String),
    #[error(
        "the CA's watch of the cluster's pods has been failing for {failing_s} s: it does not sign from a view \
         that may be out of date; retry later"
    )]
    WatchStale { failing_s: u64 },
    #[error("the CA cannot sign: {0}")]
    SigningUnavailable(String),

    // --- UNAUTHENTICATED ---
    #[error(
        "no credential: send the node agent's projected ServiceAccount token (audience {audience}) as \
         `authorization: Bearer <token>`"
    )]
    MissingToken { audience: String },
    #[error("the token was rejected by the Kubernetes API server: {0}")]
    TokenRejected(String),
    #[error(
        "the token is not meant for this CA: its audiences are {got:?}, the CA accepts only {audience:?} \
         (set audience {audience} on the projected token volume)"
    )]
    WrongAudience { audience: String, got: Vec<String> },

    // --- PERMISSION_DENIED ---
    #[error(
        "the token is {user}'s; only the node agents' ServiceAccount {expected} may ask for certificates"
    )]
    NotNodeAccount { user: String, expected: String },
    #[error("cannot tell which node the caller runs on: {0}")]
    CallerNodeUnknown(String),
    #[error("{identity} is outside this CA's trust domain {trust_domain:?} (node {node})")]
    WrongTrustDomain { identity: String, trust_domain: String, node: String },
    #[error(
        "no running pod with service account {namespace}/{service_account} is scheduled on node {node} \
         (the caller's node, from its token); that service account's pods run on other nodes only"
    )]
    NoPodOnNode { namespace: String, service_account: String, node: String },
    #[error(
        "no running or pending pod in the cluster runs as service account {namespace}/{service_account} \
         (asked by node {node})"
    )]
    NoPodAnywhere { namespace: String, service_account: String, node: String },

    // --- INVALID_ARGUMENT ---
    #[error("the requested identity {identity:?} is not a workload SPIFFE ID: {reason}")]
    BadIdentity { identity: String, reason: String },
    #[error("refused the certificate signing request for {identity}: {problem}")]
    BadCsr { identity: String, problem: CsrProblem },

    // --- RESOURCE_EXHAUSTED ---
    #[error(
        "node {node} asks for certificates faster than its share ({rate}/s, bursts of {burst}); retry in \
         {} ms", retry_after.as_millis()
    )]
    RateLimited { node: String, rate: f64, burst: u32, retry_after: Duration },
    #[error("the CA is handling {limit} requests already; retry in {} ms", retry_after.as_millis())]
    Busy { limit: usize, retry_after: Duration },
    #[error(
        "this address has {limit} requests in progress at the CA already; retry in {} ms",
        retry_after.as_millis()
    )]
    SourceBusy { limit: usize, retry_after: Duration },
    #[error("{reason}")]
    ReviewRateLimited { reason: String, retry_after: Duration },

    // --- DEADLINE_EXCEEDED ---
    #[error("the request was not complete and answered within {} s", .0.as_secs())]
    Deadline(Duration),

    // --- INTERNAL ---
    #[error("signing the certificate for {identity} failed: {reason}")]
    Signing { identity: String, reason: String },
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Refusal::NotReady
            | Refusal::ReviewUnavailable(_)
            | Refusal::WatchStale { .. }
            | Refusal::SigningUnavailable(_) => Code::Unavailable,
            Refusal::MissingToken { .. } | Refusal::TokenRejected(_) | Refusal::WrongAudience { .. } => {
                Code::Unauthenticated
            }
            Refusal::NotNodeAccount { .. }
            | Refusal::CallerNodeUnknown(_)
            | Refusal::WrongTrustDomain { .. }
            | Refusal::NoPodOnNode { .. }
            | Refusal::NoPodAnywhere { .. } => Code::PermissionDenied,
            Refusal::BadIdentity { .. } | Refusal::BadCsr { .. } => Code::InvalidArgument,
            Refusal::RateLimited { .. }
            | Refusal::Busy { .. }
            | Refusal::SourceBusy { .. }
            | Refusal::ReviewRateLimited { .. } => Code::ResourceExhausted,
            Refusal::Deadline(_) => Code::DeadlineExceeded,
            Refusal::Signing { .. } => Code::Internal,
        }
    }

    /// The `reason` label of `sluice_ca_requests_refused_total` (a closed set).
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NotReady => "not_ready",
            Refusal::ReviewUnavailable(_) => "token_review_unavailable",
            Refusal::WatchStale { .. } => "pod_watch_failing",
            Refusal::SigningUnavailable(_) => "signing_unavailable",
            Refusal::MissingToken { .. } => "missing_token",
            Refusal::TokenRejected(_) => "token_rejected",
            Refusal::WrongAudience { .. } => "wrong_audience",
            Refusal::NotNodeAccount { .. } => "not_node_service_account",
            Refusal::CallerNodeUnknown(_) => "caller_node_unknown",
            Refusal::WrongTrustDomain { .. } => "wrong_trust_domain",
            Refusal::NoPodOnNode { .. } => "no_pod_on_node",
            Refusal::NoPodAnywhere { .. } => "no_pod_anywhere",
            Refusal::BadIdentity { .. } => "bad_identity",
            Refusal::BadCsr { problem, .. } => problem.kind.label(),
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::Busy { .. } => "busy",
            Refusal::SourceBusy { .. } => "source_busy",
            Refusal::ReviewRateLimited { .. } => "review_rate_limited",
            Refusal::Deadline(_) => "deadline_exceeded",
            Refusal::Signing { .. } => "signing_failed",
        }
    }

    /// The wait a caller should respect before asking again, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::RateLimited { retry_after, .. }
            | Refusal::Busy { retry_after, .. }
            | Refusal::SourceBusy { retry_after, .. }
            | Refusal::ReviewRateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    pub fn to_status(&self) -> Status {
        let mut metadata = MetadataMap::new();
        if let Some(wait) = self.retry_after() {
            // At least 1 ms: "0" would read as "retry at once".
            let ms = wait.as_millis().max(1).to_string();
            if let Ok(value) = MetadataValue::try_from(ms.as_str()) {
                metadata.insert(RETRY_AFTER_MS, value);
            }
        }
        Status::with_metadata(self.code(), self.to_string(), metadata)
    }
}

/// Every label [`Refusal::label`] can return, so that the metric shows zeros from the start.
pub const ALL_LABELS: &[&str] = &[
    "not_ready",
    "token_review_unavailable",
    "pod_watch_failing",
    "signing_unavailable",
    "missing_token",
    "token_rejected",
    "wrong_audience",
    "not_node_service_account",
    "caller_node_unknown",
    "wrong_trust_domain",
    "no_pod_on_node",
    "no_pod_anywhere",
    "bad_identity",
    "csr_too_large",
    "csr_unparseable",
    "csr_bad_signature",
    "csr_extra_names",
    "csr_wrong_identity",
    "csr_is_ca",
    "csr_weak_key",
    "csr_malformed",
    "csr_subject",
    "rate_limited",
    "busy",
    "source_busy",
    "review_rate_limited",
    "deadline_exceeded",
    "signing_failed",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_carry_the_wait() {
        let r = Refusal::RateLimited {
            node: "n1".into(),
            rate: 50.0,
            burst: 50,
            retry_after: Duration::from_millis(20),
        };
        let status = r.to_status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get(RETRY_AFTER_MS).unwrap(), "20");
        assert!(status.message().contains("node n1"), "{}", status.message());
        let sub_ms = Refusal::Busy { limit: 1, retry_after: Duration::from_micros(10) };
        assert_eq!(sub_ms.to_status().metadata().get(RETRY_AFTER_MS).unwrap(), "1");
        assert!(Refusal::NotReady.to_status().metadata().get(RETRY_AFTER_MS).is_none());
    }

    #[test]
    fn every_label_is_listed() {
        use super::super::csr::{CsrProblem, CsrProblemKind};
        let csr = |kind| Refusal::BadCsr {
            identity: "x".into(),
            problem: CsrProblem { kind, detail: String::new() },
        };
        let d = Duration::from_millis(1);
        let all = [
            Refusal::NotReady,
            Refusal::ReviewUnavailable(String::new()),
            Refusal::WatchStale { failing_s: 60 },
            Refusal::SigningUnavailable(String::new()),
            Refusal::MissingToken { audience: String::new() },
            Refusal::TokenRejected(String::new()),
            Refusal::WrongAudience { audience: String::new(), got: vec![] },
            Refusal::NotNodeAccount { user: String::new(), expected: String::new() },
            Refusal::CallerNodeUnknown(String::new()),
            Refusal::WrongTrustDomain {
                identity: String::new(),
                trust_domain: String::new(),
                node: String::new(),
            },
            Refusal::NoPodOnNode {
                namespace: String::new(),
                service_account: String::new(),
                node: String::new(),
            },
            Refusal::NoPodAnywhere {
                namespace: String::new(),
                service_account: String::new(),
                node: String::new(),
            },
            Refusal::BadIdentity { identity: String::new(), reason: String::new() },
            csr(CsrProblemKind::TooLarge),
            csr(CsrProblemKind::Unparseable),
            csr(CsrProblemKind::BadSignature),
            csr(CsrProblemKind::ExtraNames),
            csr(CsrProblemKind::WrongIdentity),
            csr(CsrProblemKind::IsCa),
            csr(CsrProblemKind::WeakKey),
            csr(CsrProblemKind::Malformed),
            csr(CsrProblemKind::Subject),
            Refusal::RateLimited { node: String::new(), rate: 1.0, burst: 1, retry_after: d },
            Refusal::Busy { limit: 1, retry_after: d },
            Refusal::SourceBusy { limit: 1, retry_after: d },
            Refusal::ReviewRateLimited { reason: String::new(), retry_after: d },
            Refusal::Deadline(d),
            Refusal::Signing { identity: String::new(), reason: String::new() },
        ];
        let labels: Vec<&str> = all.iter().map(Refusal::label).collect();
        assert_eq!(labels, ALL_LABELS, "ALL_LABELS lists every label, in order, once");
    }

    #[test]
    fn the_message_names_the_identity_and_node() {
        let r = Refusal::NoPodOnNode {
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "n1".into(),
        };
        assert_eq!(r.code(), Code::PermissionDenied);
        assert!(r
            .to_string()
            .starts_with("no running pod with service account shop/web is scheduled on node n1"));
    }
}
