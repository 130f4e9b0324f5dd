//! What runs in each pod: a stand-in for the container's image. Where the simulator knows the
//! application it behaves like it (Istio's Bookinfo, by image name); any other container gets
//! simpod's HTTP echo on each of its TCP container ports (it answers every request with JSON
//! describing it: method, path, headers, the peer it saw); a container without ports runs
//! nothing (a client pod: run commands in it with `ip netns exec <pod netns> ...`).
//!
//! Images are matched on their repository's last path segment, registry and tag ignored:
//!
//! | image | stand-in |
//! |---|---|
//! | `*/examples-bookinfo-productpage-v*` | productpage (calls details and reviews) |
//! | `*/examples-bookinfo-details-v*` | details |
//! | `*/examples-bookinfo-reviews-v1` | reviews without ratings |
//! | `*/examples-bookinfo-reviews-v2` | reviews with black stars from ratings (10 s timeout) |
//! | `*/examples-bookinfo-reviews-v3` | reviews with red stars from ratings (2.5 s timeout) |
//! | `*/examples-bookinfo-ratings-v*` | ratings |
//! | anything else | HTTP echo on every TCP container port |
//!
//! As the real images do, the Bookinfo stand-ins listen on 9080 whatever the pod spec says, read
//! `SERVICES_DOMAIN`, `DETAILS_HOSTNAME`, `REVIEWS_HOSTNAME`, `RATINGS_HOSTNAME`,
//! `RATINGS_SERVICE_PORT`, `ENABLE_RATINGS` and `STAR_COLOR` from the container's `env`, and
//! reach the other services by name: the playground resolves each name as cluster DNS would
//! (`name`, `name.namespace`, `name.namespace.svc[.cluster.local]`) to the Service's ClusterIP.

use std::net::Ipv4Addr;

use super::spec::{Container, PodPlan};

/// Port every Bookinfo application listens on.
pub const BOOKINFO_PORT: u16 = 9080;

/// What one container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    Bookinfo(Bookinfo),
    /// simpod's HTTP echo on each port.
    Echo {
        ports: Vec<u16>,
    },
    /// Nothing listens.
    Idle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookinfo {
    /// productpage, details, reviews or ratings.
    pub app: &'static str,
    pub version: String,
    pub ratings_enabled: bool,
    pub star_color: String,
    /// (flag, host the application calls, port) of each service it calls.
    pub calls: Vec<(&'static str, String, u16)>,
}

impl Behaviour {
    pub fn describe(&self) -> String {
        match self {
            Behaviour::Bookinfo(b) => format!("bookinfo {} {}", b.app, b.version),
            Behaviour::Echo { ports } => {
                format!("http echo on {}", ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", "))
            }
            Behaviour::Idle => "no server (no container ports)".into(),
        }
    }
}

/// The image's repository name: `docker.io/istio/examples-bookinfo-reviews-v2:1.20.2` →
/// `examples-bookinfo-reviews-v2`.
fn repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

/// The stand-in for `c`.
pub fn behaviour(c: &Container) -> Behaviour {
    if let Some(rest) = repository(&c.image).strip_prefix("examples-bookinfo-") {
        let (app, variant) = rest.split_once('-').unwrap_or((rest, ""));
        let version = if variant.starts_with('v') && variant[1..].starts_with(|ch: char| ch.is_ascii_digit())
        {
            variant.split('-').next().unwrap_or(variant).to_string()
        } else {
            "v1".to_string()
        };
        let env = |k: &str| c.env.get(k).cloned();
        let domain = env("SERVICES_DOMAIN").map(|d| format!(".{d}")).unwrap_or_default();
        let host =
            |var: &str, default: &str| format!("{}{domain}", env(var).unwrap_or_else(|| default.to_string()));
        let b = match app {
            "productpage" => Some(Bookinfo {
                app: "productpage",
                version,
                ratings_enabled: false,
                star_color: String::new(),
                calls: vec![
                    ("details", host("DETAILS_HOSTNAME", "details"), BOOKINFO_PORT),
                    ("reviews", host("REVIEWS_HOSTNAME", "reviews"), BOOKINFO_PORT),
                    ("ratings", host("RATINGS_HOSTNAME", "ratings"), BOOKINFO_PORT),
                ],
            }),
            "details" => Some(Bookinfo {
                app: "details",
                version,
                ratings_enabled: false,
                star_color: String::new(),
                calls: vec![],
            }),
            "ratings" => Some(Bookinfo {
                app: "ratings",
                version,
                ratings_enabled: false,
                star_color: String::new(),
                calls: vec![],
            }),
            "reviews" => {
                // What each image bakes in (its Dockerfile's ENV), unless the pod spec sets it.
                let (enabled, color) = match version.as_str() {
                    "v2" => (true, "black"),
                    "v3" => (true, "red"),
                    _ => (false, "black"),
                };
                let enabled = env("ENABLE_RATINGS").map_or(enabled, |v| v.eq_ignore_ascii_case("true"));
                let port = env("RATINGS_SERVICE_PORT").and_then(|p| p.parse().ok()).unwrap_or(BOOKINFO_PORT);
                Some(Bookinfo {
                    app: "reviews",
                    version,
                    ratings_enabled: enabled,
                    star_color: env("STAR_COLOR").unwrap_or_else(|| color.to_string()),
                    calls: vec![("ratings", host("RATINGS_HOSTNAME", "ratings"), port)],
                })
            }
            _ => None,
        };
        if let Some(b) = b {
            return Behaviour::Bookinfo(b);
        }
    }
    let mut ports: Vec<u16> = c.ports.iter().map(|(_, p)| *p).collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        Behaviour::Idle
    } else {
        Behaviour::Echo { ports }
    }
}

/// Resolves `host` as cluster DNS would for a pod in `namespace`: `name`, `name.ns`,
/// `name.ns.svc`, `name.ns.svc.cluster.local` (a trailing dot allowed). `None` for anything else.
pub fn dns_name(host: &str, namespace: &str) -> Option<(String, String)> {
    let h = host.trim_end_matches('.');
    let h = h.strip_suffix(".svc.cluster.local").or_else(|| h.strip_suffix(".svc")).unwrap_or(h);
    match h.split('.').collect::<Vec<_>>().as_slice() {
        [name] => Some((namespace.to_string(), name.to_string())),
        [name, ns] => Some((ns.to_string(), name.to_string())),
        _ => None,
    }
}

/// The command line (after the simpod binary) of each process a container's stand-in runs.
pub fn commands(
    pod: &PodPlan,
    b: &Behaviour,
    resolve: &dyn Fn(&str, &str) -> Option<Ipv4Addr>,
) -> Vec<Vec<String>> {
    match b {
        Behaviour::Idle => Vec::new(),
        Behaviour::Echo { ports } => ports
            .iter()
            .map(|p| {
                vec!["http-server".into(), "--port".into(), p.to_string(), "--name".into(), pod.name.clone()]
            })
            .collect(),
        Behaviour::Bookinfo(bi) => {
            let mut args: Vec<String> = vec![
                "bookinfo".into(),
                "--app".into(),
                bi.app.into(),
                "--port".into(),
                BOOKINFO_PORT.to_string(),
                "--pod".into(),
                pod.name.clone(),
                "--version".into(),
                bi.version.clone(),
            ];
            for (flag, host, port) in &bi.calls {
                let addr = dns_name(host, &pod.namespace)
                    .and_then(|(ns, name)| resolve(&ns, &name))
                    .map(|ip| format!("{ip}:{port}"))
                    .unwrap_or_default();
                args.push(format!("--{flag}"));
                args.push(format!("{host}:{port}@{addr}"));
            }
            if bi.ratings_enabled {
                args.push("--ratings-enabled".into());
            }
            if !bi.star_color.is_empty() {
                args.push("--star-color".into());
                args.push(bi.star_color.clone());
            }
            vec![args]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn container(image: &str, ports: &[u16], env: &[(&str, &str)]) -> Container {
        Container {
            name: "c".into(),
            image: image.into(),
            ports: ports.iter().map(|p| (None, *p)).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn bookinfo_images_are_recognised_by_name_and_version() {
        let b = |image: &str, env: &[(&str, &str)]| match behaviour(&container(image, &[9080], env)) {
            Behaviour::Bookinfo(b) => b,
            other => panic!("{image}: {other:?}"),
        };
        let r2 = b("docker.io/istio/examples-bookinfo-reviews-v2:1.20.2", &[]);
        assert_eq!(
            (r2.app, r2.version.as_str(), r2.ratings_enabled, r2.star_color.as_str()),
            ("reviews", "v2", true, "black")
        );
        assert_eq!(r2.calls, vec![("ratings", "ratings".to_string(), 9080)]);
        let r3 = b("istio/examples-bookinfo-reviews-v3", &[]);
        assert_eq!((r3.ratings_enabled, r3.star_color.as_str()), (true, "red"));
        let r1 = b("registry.local:5000/examples-bookinfo-reviews-v1@sha256:abc", &[]);
        assert!(!r1.ratings_enabled);
        let pp =
            b("examples-bookinfo-productpage-v1:1.20", &[("SERVICES_DOMAIN", "bookinfo.svc.cluster.local")]);
        assert_eq!(pp.calls[0], ("details", "details.bookinfo.svc.cluster.local".to_string(), 9080));
        let custom = b(
            "examples-bookinfo-reviews-v1",
            &[("ENABLE_RATINGS", "true"), ("STAR_COLOR", "blue"), ("RATINGS_HOSTNAME", "stars")],
        );
        assert_eq!((custom.ratings_enabled, custom.star_color.as_str()), (true, "blue"));
        assert_eq!(custom.calls[0].1, "stars");
        assert_eq!(b("examples-bookinfo-ratings-v2-mysql:1.20", &[]).version, "v2");
        assert_eq!(b("examples-bookinfo-productpage-v-flooded:1.20", &[]).version, "v1");
    }

    #[test]
    fn other_images_echo_on_their_ports_or_idle() {
        assert_eq!(
            behaviour(&container("nginx:1.27", &[8080, 80, 8080], &[])),
            Behaviour::Echo { ports: vec![80, 8080] }
        );
        assert_eq!(behaviour(&container("curlimages/curl", &[], &[])), Behaviour::Idle);
        assert_eq!(
            behaviour(&container("examples-bookinfo-unknown-v1", &[80], &[])),
            Behaviour::Echo { ports: vec![80] }
        );
    }

    #[test]
    fn service_names_resolve_like_cluster_dns() {
        assert_eq!(dns_name("details", "shop"), Some(("shop".into(), "details".into())));
        assert_eq!(dns_name("details.books", "shop"), Some(("books".into(), "details".into())));
        assert_eq!(
            dns_name("details.books.svc.cluster.local.", "shop"),
            Some(("books".into(), "details".into()))
        );
        assert_eq!(dns_name("details.books.svc", "shop"), Some(("books".into(), "details".into())));
        assert_eq!(dns_name("example.com.eu", "shop"), None);
    }
}
