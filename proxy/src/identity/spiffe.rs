//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`,
//! the form Istio and ztunnel use, so that identities interoperate with them.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::discovery::Pod;

/// The trust domain when none is configured (Kubernetes' default cluster domain, as in Istio).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec caps a trust domain at 255 bytes (it must fit a DNS name).
const MAX_TRUST_DOMAIN: usize = 255;
/// The SPIFFE spec caps a whole ID at 2048 bytes.
const MAX_ID: usize = 2048;

/// A workload identity. Fields are not validated on construction from a pod (Kubernetes has
/// already validated namespace and service account names); [`FromStr`] validates everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpiffeError {
    #[error("{input:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    Scheme { input: String },
    #[error(
        "{input:?}: invalid trust domain {trust_domain:?} (lowercase letters, digits, '.', '-' and '_', \
         at most 255 characters)"
    )]
    TrustDomain { input: String, trust_domain: String },
    #[error("{input:?}: a workload SPIFFE ID has the path /ns/<namespace>/sa/<service account>")]
    Path { input: String },
    #[error(
        "{input:?}: invalid path segment {segment:?} (letters, digits, '.', '-' and '_'; not '.' or '..')"
    )]
    Segment { input: String, segment: String },
    #[error("{input:?} is longer than the 2048 bytes a SPIFFE ID may have")]
    TooLong { input: String },
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The identity a pod runs as: its namespace and service account in `trust_domain`.
    pub fn for_pod(trust_domain: &str, pod: &Pod) -> SpiffeId {
        SpiffeId::new(trust_domain, pod.namespace.as_str(), pod.service_account.as_str())
    }

    /// `spiffe://<trust domain>`: the ID of the trust domain itself (what the mesh root carries).
    pub fn trust_domain_uri(&self) -> String {
        format!("{SCHEME}{}", self.trust_domain)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(input: &str) -> Result<SpiffeId, SpiffeError> {
        if input.len() > MAX_ID {
            return Err(SpiffeError::TooLong { input: input.to_string() });
        }
        let rest =
            input.strip_prefix(SCHEME).ok_or_else(|| SpiffeError::Scheme { input: input.to_string() })?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        check_trust_domain_of(input, trust_domain)?;
        let segments: Vec<&str> = path.strip_prefix('/').unwrap_or_default().split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = segments[..] else {
            return Err(SpiffeError::Path { input: input.to_string() });
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(SpiffeError::Path { input: input.to_string() });
        }
        for segment in [namespace, service_account] {
            check_segment(input, segment)?;
        }
        Ok(SpiffeId::new(trust_domain, namespace, service_account))
    }
}

/// Validates a trust domain name as the SPIFFE spec defines it (used for configuration and
/// `sluice ca init --trust-domain`).
pub fn check_trust_domain(trust_domain: &str) -> Result<(), SpiffeError> {
    check_trust_domain_of(trust_domain, trust_domain)
}

fn check_trust_domain_of(input: &str, td: &str) -> Result<(), SpiffeError> {
    let valid = !td.is_empty()
        && td.len() <= MAX_TRUST_DOMAIN
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(SpiffeError::TrustDomain { input: input.to_string(), trust_domain: td.to_string() })
    }
}

fn check_segment(input: &str, segment: &str) -> Result<(), SpiffeError> {
    let valid = !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(SpiffeError::Segment { input: input.to_string(), segment: segment.to_string() })
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SpiffeId, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(de::Error::custom)
    }
}
