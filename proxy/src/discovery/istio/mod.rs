//! Istio's kinds, parsed with serde types that mirror Istio's published schema (camelCase,
//! unknown fields refused) and distilled into sluice's own model, so that the data path keeps
//! one implementation whatever API a rule was written in.
//!
//! - `virtual_service`: `VirtualService` (networking.istio.io v1, v1beta1, v1alpha3), parsed and
//!   validated.
//! - `vs_compile`: a VirtualService compiled, per Service (or ServiceEntry) port its hosts name,
//!   into the [`Route`](super::route::Route) tables the data path matches requests against,
//!   with delegation resolved; `vs_mixing` decides which resource applies to which client when
//!   several name one host (Istio's sidecar rules, HTTPRoutes included).
//! - `destination_rule`: `DestinationRule` (subsets, load balancing, connection pools, outlier
//!   detection, TLS origination), resolved per destination in an index per snapshot.
//! - `subset`: the `resolve_subset` contract with VirtualService destinations (re-exported from
//!   `destination_rule`).
//! - `authorization_policy`: `security.istio.io` AuthorizationPolicy (L4 and L7 rules).
//! - `peer_authentication`: `security.istio.io` PeerAuthentication (mTLS modes).
//! - `request_authentication`: `security.istio.io` RequestAuthentication (JWT rules).
//!
//! A field sluice does not know is an error naming its path rather than something silently
//! ignored (`serde_path_to_error`); sluice's own semantic checks run on the typed value
//! afterwards and name their field the same way.
//!
//! Host names: a short name (`reviews`) is `reviews.<namespace>.svc.<cluster domain>`, as Istio
//! resolves it; the cluster domain is `--cluster-domain` (default `cluster.local`), set once at
//! start ([`set_cluster_domain`]).

pub(crate) mod authorization_policy;
pub(crate) mod peer_authentication;
pub(crate) mod request_authentication;
pub mod destination_rule;
pub mod subset;
pub mod virtual_service;
pub mod vs_compile;
pub mod vs_mixing;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::fields::Node;
use super::manifest::DocError;
use super::traffic::IpNet;

static CLUSTER_DOMAIN: OnceLock<String> = OnceLock::new();

/// The DNS suffix of Services (`<name>.<namespace>.svc.<domain>`), `cluster.local` unless
/// [`set_cluster_domain`] said otherwise.
pub fn cluster_domain() -> &'static str {
    CLUSTER_DOMAIN.get().map_or("cluster.local", String::as_str)
}

/// Sets the cluster domain, once, before any source parses (a second call is ignored and
/// reported as `false`: a model must not mix two domains).
pub fn set_cluster_domain(domain: &str) -> bool {
    CLUSTER_DOMAIN.set(domain.trim_end_matches('.').to_ascii_lowercase()).is_ok()
}

/// A field that may be written as `null` (or left out): both mean its default, as the API
/// server treats them.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Deserializes `value` (a document's `spec`) into `T`, naming the field of the first error
/// (`spec.http[0].route[1].weight: invalid type: ...`).
pub(crate) fn from_spec<T: serde::de::DeserializeOwned>(value: &serde_yaml_ng::Value) -> Result<T, DocError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "spec".to_owned() } else { format!("spec.{path}") };
        DocError::Invalid { field, reason: e.into_inner().to_string() }
    })
}

/// Deserializes the document's `spec` into `T`; `None` when the document has no spec (or
/// `spec: null`). Errors name the field path from the document's root ([`Node::typed`]).
pub(crate) fn spec<T: DeserializeOwned>(doc: &Node<'_>) -> Result<Option<T>, DocError> {
    doc.get("spec").map(|spec| spec.typed()).transpose()
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

/// An error at `field`.
pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> DocError {
    DocError::Invalid { field: field.into(), reason: reason.into() }
}

/// Parses a duration as Istio's API accepts it (Go's `time.ParseDuration`, which the CRD's
/// CEL rules use): decimal numbers with units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`, e.g. `7s`,
/// `0.5s`, `1m30s`, `250ms`. Negative durations are refused.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like \"7s\", \"0.5s\", \"250ms\" or \"1m30s\"");
    let text = s.strip_prefix('+').unwrap_or(s);
    if text.starts_with('-') {
        return Err(format!("{s:?}: a duration must not be negative"));
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total_ns: f64 = 0.0;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(bad());
        }
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3_600e9,
            "m" => 60e9,
            "s" => 1e9,
            "ms" => 1e6,
            "us" | "µs" | "μs" => 1e3,
            "ns" => 1.0,
            _ => return Err(bad()),
        };
        total_ns += value * scale;
        rest = tail;
    }
    // Beyond about 292 years Go's Duration overflows; so does any sensible configuration.
    if !total_ns.is_finite() || total_ns > 9.2e18 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(Duration::from_nanos(total_ns.round() as u64))
}

/// Istio's `Percent` (`{value: 12.5}`), a share of requests in 0..=100.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Percent {
    #[serde(default)]
    pub value: f64,
}

/// A percentage as a fraction in 0.0..=1.0, or the reason it is not one.
pub(crate) fn fraction_of(p: f64) -> Result<f64, String> {
    if !(0.0..=100.0).contains(&p) || p.is_nan() {
        return Err(format!("{p} is not a percentage (0 to 100)"));
    }
    Ok(p / 100.0)
}

/// Istio's root namespace (`meshConfig.rootNamespace`, `istio-system` by default): its
/// configuration applies to every namespace that may see it.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// `name.namespace.svc.<cluster domain>`.
pub fn service_fqdn(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.{}", cluster_domain())
}

/// A host as Istio resolves it in a resource of `namespace`: a name without a dot is a short
/// Service name in that namespace; anything else (an FQDN, a wildcard, a ServiceEntry host) is
/// taken as written. Lower-cased.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    let host = host.to_ascii_lowercase();
    if host.contains('.') || host == "*" {
        host
    } else {
        service_fqdn(namespace, &host)
    }
}

/// Whether `exportTo` (as written) makes a resource of namespace `own` visible to `client`:
/// empty or `*` is every namespace, `.` its own, `~` none, anything else a namespace name.
pub fn exported_to(export_to: &[String], own: &str, client: &str) -> bool {
    export_to.is_empty()
        || export_to.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => own == client,
            "~" => false,
            ns => ns == client,
        })
}

/// Parses an Istio duration (protobuf's `Duration` as Istio's CRDs accept it): one or more
/// `<number><unit>` parts, the number possibly with a fraction, units `h`, `m`, `s`, `ms`,
/// `us`/`µs`, `ns` (`30s`, `1.5s`, `1m30s`, `100ms`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration like \"100ms\", \"1.5s\", \"30s\" or \"1m\"");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let number: f64 = rest[..end].parse().map_err(|_| bad())?;
        rest = &rest[end..];
        let (unit, len) =
            [("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("ns", 1e-9), ("h", 3600.0), ("m", 60.0), ("s", 1.0)]
                .iter()
                .find(|(u, _)| rest.starts_with(u))
                .map(|(u, f)| (*f, u.len()))
                .ok_or_else(bad)?;
        total += number * unit;
        rest = &rest[len..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_go_duration("7s"), Ok(ms(7000)));
        assert_eq!(parse_go_duration("0.5s"), Ok(ms(500)));
        assert_eq!(parse_go_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_go_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_go_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_go_duration("1.5h"), Ok(ms(5_400_000)));
        assert_eq!(parse_go_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "7", "s", "1d", "-1s", "1..5s", ".s", "1s2", "abc"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn percentages() {
        assert_eq!(fraction_of(10.0), Ok(0.1));
        assert_eq!(fraction_of(0.0), Ok(0.0));
        assert!(fraction_of(100.5).is_err());
        assert!(fraction_of(-1.0).is_err());
        assert!(fraction_of(f64::NAN).is_err());
    }
}

#[cfg(test)]
mod destination_rule_helpers {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hosts_resolve_as_istio_resolves_them() {
        assert_eq!(resolve_host("reviews", "prod"), "reviews.prod.svc.cluster.local");
        assert_eq!(resolve_host("Reviews.Prod.svc.cluster.local", "x"), "reviews.prod.svc.cluster.local");
        assert_eq!(resolve_host("reviews.prod", "x"), "reviews.prod", "a dotted name is taken as written");
        assert_eq!(resolve_host("*.prod.svc.cluster.local", "x"), "*.prod.svc.cluster.local");
        assert_eq!(resolve_host("*", "x"), "*");
    }

    #[test]
    fn export_to() {
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(exported_to(&[], "a", "b"));
        assert!(exported_to(&e(&["*"]), "a", "b"));
        assert!(exported_to(&e(&["."]), "a", "a") && !exported_to(&e(&["."]), "a", "b"));
        assert!(!exported_to(&e(&["~"]), "a", "a"));
        assert!(exported_to(&e(&[".", "c"]), "a", "c") && !exported_to(&e(&[".", "c"]), "a", "b"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "10", "s", "1x", "-1s", "1e3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
