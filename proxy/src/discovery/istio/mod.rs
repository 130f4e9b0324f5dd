//! Istio's own kinds, parsed with serde types that mirror Istio's published schemas
//! (camelCase, `serde_path_to_error` for the field path of an error) and distilled into
//! sluice's model: one routing and policy engine, several APIs.

pub mod destination_rule;

/// The cluster's DNS domain, as Istio assumes by default: a short host `reviews` in namespace
/// `prod` is `reviews.prod.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Istio's root namespace (`meshConfig.rootNamespace`, `istio-system` by default): its
/// configuration applies to every namespace that may see it.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// `name.namespace.svc.cluster.local`.
pub fn service_fqdn(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
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
