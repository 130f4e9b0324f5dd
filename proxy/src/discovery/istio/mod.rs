//! Istio's kinds, parsed with serde types that mirror Istio's published schema (camelCase
//! fields, `deny_unknown_fields`), so that a field sluice does not know is an error naming its
//! path rather than something silently ignored. `serde_path_to_error` gives the path
//! (`spec.rules[0].from[0].source.ipBlocks[1]`); sluice's own semantic checks (a wildcard in
//! the middle of a principal, a port out of range, a field it cannot enforce) run on the typed
//! value afterwards and name their field the same way.
//!
//! - `authorization_policy`: `security.istio.io` AuthorizationPolicy (L4 and L7 rules).
//! - `peer_authentication`: `security.istio.io` PeerAuthentication (mTLS modes).
//! - `request_authentication`: `security.istio.io` RequestAuthentication (JWT rules).

pub(crate) mod authorization_policy;
pub(crate) mod peer_authentication;
pub(crate) mod request_authentication;

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::de::{DeserializeOwned, Deserializer};
use serde::Deserialize;

use super::fields::Node;
use super::manifest::DocError;
use super::traffic::IpNet;

/// Deserializes the document's `spec` into `T`; `None` when the document has no spec (or
/// `spec: null`). Errors name the field path from the document's root.
pub(crate) fn spec<T: DeserializeOwned>(doc: &Node<'_>) -> Result<Option<T>, DocError> {
    let Some(spec) = doc.get("spec") else {
        return Ok(None);
    };
    serde_path_to_error::deserialize(spec.value).map(Some).map_err(|e| {
        let path = e.path().to_string();
        let field = match path.as_str() {
            "." => spec.path.clone(),
            p if p.starts_with('[') => format!("{}{p}", spec.path),
            p => format!("{}.{p}", spec.path),
        };
        DocError::Invalid { field, reason: e.into_inner().to_string() }
    })
}

/// For `#[serde(deserialize_with)]` on lists and maps: an explicit `null` is the empty value,
/// as Kubernetes treats it (serde's `default` alone only covers an absent field).
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A label selector as Istio writes it (`WorkloadSelector`): only `matchLabels`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

/// `10.0.0.1` or `10.0.0.0/8` (IPv4 or IPv6), as Istio's ipBlocks and conditions write them.
pub(crate) fn parse_ip_net(s: &str) -> Result<IpNet, String> {
    let bad = || format!("{s:?} is not an IP address or CIDR block (e.g. 10.0.0.1 or 10.0.0.0/8)");
    let (addr, prefix) = match s.split_once('/') {
        None => (s, None),
        Some((a, p)) => (a, Some(p)),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().map_err(|_| bad())?
        }
        Some(_) => return Err(bad()),
    };
    if prefix > max {
        return Err(bad());
    }
    Ok(IpNet { addr: addr.to_canonical(), prefix })
}

/// A port as Istio's schema writes it in policies: a string (`"8080"`); a plain integer is
/// accepted too.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum PortValue {
    Number(i64),
    Text(String),
}

impl PortValue {
    pub fn port(&self) -> Result<u16, String> {
        match self {
            PortValue::Number(n) => u16::try_from(*n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {n} is out of range 1-65535")),
            PortValue::Text(s) => s
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{s:?} is not a port number (1-65535)")),
        }
    }
}

/// An error at `path` (a field path such as `spec.rules[0].when[1].values[0]`).
pub(crate) fn invalid(path: impl Into<String>, reason: impl Into<String>) -> DocError {
    DocError::Invalid { field: path.into(), reason: reason.into() }
}

/// A duration as Istio's schema writes one: protobuf's JSON form (`"5s"`, `"0.5s"`), or the
/// Gateway API form sluice reads elsewhere (`"500ms"`, `"1m30s"`).
pub(crate) fn istio_duration(s: &str) -> Result<std::time::Duration, String> {
    if let Some(seconds) = s.strip_suffix('s').filter(|n| !n.is_empty() && !n.ends_with('m')) {
        if let Ok(n) = seconds.parse::<f64>() {
            if n.is_finite() && n >= 0.0 && n < 1e9 {
                return Ok(std::time::Duration::from_secs_f64(n));
            }
        }
    }
    super::route::parse_duration(s)
}
