//! Acceptance (issue 14, point 7): Bookinfo as Istio's tasks configure it, in the playground.
//! The app is `deploy/examples/bookinfo/` (its Deployments, Services and ServiceAccounts, and a
//! `curl` client), built by the same code as `cargo xtask sim up`, with stand-ins that behave
//! like Bookinfo's applications (productpage → details, reviews; reviews v2/v3 → ratings; the
//! user's session sent on as `end-user`; productpage's 3 s timeout and one retry for reviews).
//! The configuration is `deploy/examples/bookinfo/istio/`, applied file by file as the tasks
//! apply it. Each behaviour is judged by counts over at least 2 000 requests.
//!
//! Every task runs: VirtualServices and DestinationRules, STRICT PeerAuthentication, L7
//! AuthorizationPolicies and RequestAuthentication, and the same routing tasks through sluice's
//! own API (Gateway API routes to the per-version Services).
//!
//! Two more clients: `visitor` (a mesh pod of bookinfo with the `default` ServiceAccount: another
//! identity) and `legacy/curl` (a pod outside the mesh, which reaches pods by IP: the playground
//! has no kube-proxy for clients sluice does not capture).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sluice_tests::{
    playground::{spec, Playground, PlaygroundOpts},
    workloads::{self, LoadSummary},
    Pod,
};

const NS: &str = "bookinfo";

/// Clients besides the example's `curl`.
const CLIENTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: visitor, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: visitor}}
  template:
    metadata: {labels: {app: visitor}}
    spec:
      containers: [{name: curl, image: docker.io/curlimages/curl:8.11.1, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: curl, namespace: legacy}
spec:
  selector: {matchLabels: {app: curl}}
  template:
    metadata: {labels: {app: curl}}
    spec:
      containers: [{name: curl, image: docker.io/curlimages/curl:8.11.1, command: [sleep, infinity]}]
"#;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/bookinfo")
}

struct Bookinfo {
    pg: Playground,
}

impl Bookinfo {
    /// The app on two nodes, every pod enrolled and holding its certificate.
    fn up() -> Result<Bookinfo> {
        let dir = examples();
        let mut sources = spec::read_paths(&[
            dir.join("00-namespace.yaml"),
            dir.join("10-bookinfo.yaml"),
            dir.join("15-curl.yaml"),
        ])?;
        sources.extend(spec::read_str("clients.yaml", CLIENTS)?);
        let pg = Playground::up(&sources, PlaygroundOpts { nodes: 2, ..PlaygroundOpts::default() })?;
        Ok(Bookinfo { pg })
    }

    /// Applies task files of `deploy/examples/bookinfo/istio/`, in order, as `kubectl apply -f`.
    fn apply(&self, files: &[&str]) -> Result<()> {
        for f in files {
            self.pg
                .apply_file(&examples().join("istio").join(f))
                .with_context(|| format!("applying istio/{f} as written"))?;
        }
        Ok(())
    }

    fn delete(&self, file: &str) -> Result<()> {
        let path = examples().join("istio").join(file);
        self.pg.delete(file, &std::fs::read_to_string(path)?)?;
        Ok(())
    }

    fn curl(&self) -> Result<&Pod> {
        self.pg.app_pod(NS, "curl")
    }

    fn visitor(&self) -> Result<&Pod> {
        self.pg.app_pod(NS, "visitor")
    }

    fn outsider(&self) -> Result<&Pod> {
        self.pg.app_pod("legacy", "curl")
    }

    fn productpage(&self) -> Result<SocketAddr> {
        self.pg.service_addr(NS, "productpage", 9080)
    }

    /// `n` product pages from `from` over `conns` connections, tallied by which reviews and
    /// ratings versions answered; `extra` adds arguments (headers, ...).
    fn pages(&self, from: &Pod, n: u64, conns: usize, extra: &[&str]) -> Result<LoadSummary> {
        let (count, conns) = (n.to_string(), conns.to_string());
        let mut args = vec![
            "--count",
            count.as_str(),
            "--connections",
            conns.as_str(),
            "--path",
            "/productpage",
            "--host",
            "productpage:9080",
            "--timeout-ms",
            "30000",
            "--tally-header",
            "x-bookinfo-reviews",
            "--tally-header",
            "x-bookinfo-ratings",
            "--tally-header",
            "x-bookinfo-details",
        ];
        args.extend_from_slice(extra);
        workloads::http_load(from, self.productpage()?, &args)
    }
}

/// `count` of `total` is `percent` % within ±`points` points: the window the issue sets for the
/// 90/10 and 80/20 splits. Each request picks its backend at random, so the caller sizes
/// `total` to make that window at least 4.5 binomial standard deviations wide (checked here, so
/// a window too tight to be stable fails as a test bug, not as a rare flake): 2 000 requests
/// for 10 % (±3 points = 4.5 σ), 4 000 for 20 % (4.7 σ).
fn share(what: &str, count: u64, total: u64, percent: f64, points: f64) -> Result<()> {
    let p = percent / 100.0;
    let sigma_points = (p * (1.0 - p) / total as f64).sqrt() * 100.0;
    ensure!(
        points >= 4.45 * sigma_points,
        "{what}: ±{points} points on {total} requests is only {:.1} σ; send more requests",
        points / sigma_points
    );
    within(what, count, total, percent, points)
}

/// A split the issue sets no window for (the 50/50 of reviews-50-v3): ±`points` points, or
/// 4.5 standard deviations of the binomial if that is wider (±3 points on 2 000 requests split
/// 50/50 is only 2.7 σ, and failed about once in 150 runs).
fn share_loose(what: &str, count: u64, total: u64, percent: f64, points: f64) -> Result<()> {
    let p = percent / 100.0;
    let sigma_points = (p * (1.0 - p) / total as f64).sqrt() * 100.0;
    within(what, count, total, percent, points.max(4.5 * sigma_points))
}

fn within(what: &str, count: u64, total: u64, percent: f64, points: f64) -> Result<()> {
    let got = count as f64 * 100.0 / total as f64;
    ensure!(
        (got - percent).abs() <= points,
        "{what}: {count} of {total} = {got:.1} %, expected {percent} % ± {points:.1} points"
    );
    eprintln!("{what}: {count} of {total} = {got:.1} % (expected {percent} % ± {points:.1})");
    Ok(())
}

fn reviews(l: &LoadSummary, version: &str) -> u64 {
    l.header_count("x-bookinfo-reviews", version)
}

fn ratings(l: &LoadSummary, version: &str) -> u64 {
    l.header_count("x-bookinfo-ratings", version)
}

fn all_ok(what: &str, l: &LoadSummary) -> Result<()> {
    ensure!(l.succeeded == l.requests && l.errors == 0, "{what}: not every page loaded: {l:?}");
    Ok(())
}

const JASON: &str = "cookie: session=jason";

/// All to v1: destination-rule-all and virtual-service-all-v1; every page shows reviews v1.
#[test]
fn request_routing_sends_everything_to_v1() -> Result<()> {
    let b = Bookinfo::up()?;
    b.apply(&["destination-rule-all.yaml", "virtual-service-all-v1.yaml"])?;
    let l = b.pages(b.curl()?, 2000, 20, &[])?;
    eprintln!("all-v1, 2000 pages: {:?}", l.by_header);
    all_ok("all-v1", &l)?;
    ensure!(reviews(&l, "v1") == 2000, "every page from reviews v1: {:?}", l.by_header);
    ensure!(
        ratings(&l, "none") == 2000 && l.header_count("x-bookinfo-details", "v1") == 2000,
        "{:?}",
        l.by_header
    );
    Ok(())
}

/// Traffic shifting: 90/10, then 80/20 between v1 and v2, within ±3 points.
#[test]
fn traffic_shifting_90_10_then_80_20() -> Result<()> {
    let b = Bookinfo::up()?;
    b.apply(&[
        "destination-rule-all.yaml",
        "virtual-service-all-v1.yaml",
        "virtual-service-reviews-90-10.yaml",
    ])?;
    let l = b.pages(b.curl()?, 2000, 20, &[])?;
    all_ok("90/10", &l)?;
    share("90/10: v1", reviews(&l, "v1"), 2000, 90.0, 3.0)?;
    share("90/10: v2", reviews(&l, "v2"), 2000, 10.0, 3.0)?;
    ensure!(reviews(&l, "v3") == 0, "{:?}", l.by_header);
    ensure!(ratings(&l, "v1") == reviews(&l, "v2"), "v2 pages show ratings: {:?}", l.by_header);

    b.apply(&["virtual-service-reviews-80-20.yaml"])?;
    let l = b.pages(b.curl()?, 4000, 20, &[])?;
    all_ok("80/20", &l)?;
    share("80/20: v1", reviews(&l, "v1"), 4000, 80.0, 3.0)?;
    share("80/20: v2", reviews(&l, "v2"), 4000, 20.0, 3.0)?;
    ensure!(reviews(&l, "v3") == 0, "{:?}", l.by_header);
    Ok(())
}

/// Routing by user: jason's pages from v2, everyone else's from v1.
#[test]
fn jason_is_routed_to_v2() -> Result<()> {
    let b = Bookinfo::up()?;
    b.apply(&[
        "destination-rule-all.yaml",
        "virtual-service-all-v1.yaml",
        "virtual-service-reviews-jason-v2.yaml",
    ])?;
    let jason = b.pages(b.curl()?, 1000, 20, &["--header", JASON])?;
    let others = b.pages(b.curl()?, 1000, 20, &["--header", "cookie: session=alice"])?;
    let anonymous = b.pages(b.visitor()?, 500, 10, &[])?;
    eprintln!(
        "jason: {:?}\nalice: {:?}\nanonymous: {:?}",
        jason.by_header, others.by_header, anonymous.by_header
    );
    for (what, l) in [("jason", &jason), ("alice", &others), ("anonymous", &anonymous)] {
        all_ok(what, l)?;
    }
    ensure!(
        reviews(&jason, "v2") == 1000 && ratings(&jason, "v1") == 1000,
        "jason → v2 with stars: {:?}",
        jason.by_header
    );
    ensure!(reviews(&others, "v1") == 1000, "alice → v1: {:?}", others.by_header);
    ensure!(reviews(&anonymous, "v1") == 500, "no user → v1: {:?}", anonymous.by_header);
    Ok(())
}

/// `n` GETs of ratings straight from the curl pod, with `extra` headers.
fn ratings_direct(b: &Bookinfo, n: u64, conns: usize, extra: &[&str]) -> Result<LoadSummary> {
    let (count, conns) = (n.to_string(), conns.to_string());
    let mut args = vec![
        "--count",
        count.as_str(),
        "--connections",
        conns.as_str(),
        "--path",
        "/ratings/0",
        "--host",
        "ratings:9080",
        "--timeout-ms",
        "30000",
    ];
    args.extend_from_slice(extra);
    workloads::http_load(b.curl()?, b.pg.service_addr(NS, "ratings", 9080)?, &args)
}

/// Fault injection, delay: ratings waits 7 s for jason only. jason's pages fail their reviews
/// after productpage's 3 s and one retry; everyone else's are untouched.
#[test]
fn ratings_delay_hits_jason_only() -> Result<()> {
    let b = Bookinfo::up()?;
    b.apply(&[
        "destination-rule-all.yaml",
        "virtual-service-all-v1.yaml",
        "virtual-service-reviews-jason-v2.yaml",
        "virtual-service-ratings-jason-delay.yaml",
    ])?;
    // The fault itself, seen from a client of ratings: 7 s for jason's requests, none for others.
    let delayed = ratings_direct(&b, 100, 100, &["--header", "end-user: jason"])?;
    let direct = ratings_direct(&b, 500, 10, &["--header", "end-user: alice"])?;
    let lat = |l: &LoadSummary| l.latency_ms.get("200").cloned();
    eprintln!("ratings for jason: {:?}\nratings for alice: {:?}", lat(&delayed), lat(&direct));
    all_ok("ratings for jason", &delayed)?;
    all_ok("ratings for alice", &direct)?;
    let min = lat(&delayed).and_then(|x| x.min).unwrap_or(0.0);
    ensure!(min >= 6900.0, "every request of jason waits 7 s: min {min} ms {:?}", lat(&delayed));
    let p99 = lat(&direct).and_then(|x| x.p99).unwrap_or(f64::MAX);
    ensure!(p99 < 2000.0, "nobody else waits: p99 {p99} ms");

    // The task as the product page shows it: jason's reviews are unavailable after ~6 s.
    let jason = b.pages(b.curl()?, 200, 100, &["--header", JASON])?;
    let others = b.pages(b.curl()?, 1200, 20, &["--header", "cookie: session=alice"])?;
    eprintln!(
        "jason pages: {:?} {:?}\nalice pages: {:?}",
        jason.by_header,
        jason.latency_ms.get("200"),
        others.by_header
    );
    all_ok("jason's pages", &jason)?;
    all_ok("alice's pages", &others)?;
    ensure!(reviews(&jason, "unavailable") == 200, "jason's reviews time out: {:?}", jason.by_header);
    let jmin = jason.latency_ms.get("200").and_then(|x| x.min).unwrap_or(0.0);
    ensure!(jmin >= 5900.0, "two 3 s tries before giving up: min {jmin} ms");
    ensure!(reviews(&others, "v1") == 1200, "{:?}", others.by_header);
    let op99 = others.latency_ms.get("200").and_then(|x| x.p99).unwrap_or(f64::MAX);
    ensure!(op99 < 2000.0, "others are not delayed: p99 {op99} ms");
    Ok(())
}

/// Fault injection, abort: ratings answers 500 to jason only; jason's page shows reviews v2
/// without stars ("Ratings service is currently unavailable").
#[test]
fn ratings_abort_hits_jason_only() -> Result<()> {
    let b = Bookinfo::up()?;
    b.apply(&[
        "destination-rule-all.yaml",
        "virtual-service-all-v1.yaml",
        "virtual-service-reviews-jason-v2.yaml",
        "virtual-service-ratings-jason-abort.yaml",
    ])?;
    let aborted = ratings_direct(&b, 500, 10, &["--header", "end-user: jason"])?;
    let direct = ratings_direct(&b, 500, 10, &["--header", "end-user: alice"])?;
    ensure!(aborted.status(500) == 500, "jason's requests to ratings are aborted: {:?}", aborted.by_status);
    ensure!(direct.status(200) == 500, "others' are not: {:?}", direct.by_status);

    let jason = b.pages(b.curl()?, 500, 20, &["--header", JASON])?;
    let others = b.pages(b.curl()?, 500, 20, &[])?;
    eprintln!("jason: {:?}\nothers: {:?}", jason.by_header, others.by_header);
    all_ok("jason's pages", &jason)?;
    all_ok("others' pages", &others)?;
    ensure!(
        reviews(&jason, "v2") == 500 && ratings(&jason, "unavailable") == 500,
        "jason sees v2 without ratings: {:?}",
        jason.by_header
    );
    ensure!(reviews(&others, "v1") == 500, "{:?}", others.by_header);
    // The page says it as Bookinfo does.
    let out = b.curl()?.run_simpod([
        "http-get",
        "--to",
        &b.productpage()?.to_string(),
        "--path",
        "/productpage",
        "--header",
        JASON,
    ])?;
    let page: Value = out.check()?.json()?;
    let rating = &page["body"]["reviews"]["reviews"][0]["rating"];
    ensure!(rating["error"] == "Ratings service is currently unavailable", "{page}");
    Ok(())
}

/// DestinationRule subsets: a subset selects its version's pods only; without the
/// DestinationRule a route to a subset has nowhere to go.
#[test]
fn destination_rule_subsets_select_their_pods() -> Result<()> {
    let b = Bookinfo::up()?;
    // No subsets yet: the route to reviews v3 fails (productpage shows reviews unavailable).
    b.apply(&["virtual-service-reviews-v3.yaml"])?;
    let l = b.pages(b.curl()?, 100, 10, &[])?;
    ensure!(reviews(&l, "unavailable") == 100, "a subset no DestinationRule defines: {:?}", l.by_header);

    b.apply(&["destination-rule-all.yaml"])?;
    let l = b.pages(b.curl()?, 1000, 20, &[])?;
    all_ok("v3", &l)?;
    ensure!(reviews(&l, "v3") == 1000 && ratings(&l, "v1") == 1000, "subset v3 only: {:?}", l.by_header);

    b.apply(&["virtual-service-reviews-50-v3.yaml"])?;
    let l = b.pages(b.curl()?, 2000, 20, &[])?;
    all_ok("50/50", &l)?;
    share_loose("50 v1 / 50 v3: v1", reviews(&l, "v1"), 2000, 50.0, 3.0)?;
    share_loose("50 v1 / 50 v3: v3", reviews(&l, "v3"), 2000, 50.0, 3.0)?;
    ensure!(reviews(&l, "v2") == 0, "{:?}", l.by_header);

    // `sluice routes` names the resource behind each piece: the VirtualService's rule and the
    // DestinationRule whose subsets it routes to.
    let out = b.pg.sluice(0).cli(&["routes", "bookinfo/reviews"])?;
    ensure!(out.success(), "sluice routes: {}", out.stderr);
    for needle in [
        "VirtualService bookinfo/reviews",
        "bookinfo/reviews:9080/v1 50%",
        "bookinfo/reviews:9080/v3 50%",
        "DestinationRule bookinfo/reviews (subsets v1, v2, v3) for clients in namespace bookinfo",
    ] {
        ensure!(out.stdout.contains(needle), "sluice routes lacks {needle:?}:\n{}", out.stdout);
    }
    Ok(())
}

/// PeerAuthentication STRICT: plaintext from outside the mesh is refused, mesh clients are
/// untouched, and deleting it lets plaintext in again.
#[test]
fn strict_peer_authentication_refuses_plaintext_only() -> Result<()> {
    let b = Bookinfo::up()?;
    let pod_ip = b.pg.app_pod(NS, "productpage")?.addr(9080);
    let plain = |n: u64| -> Result<LoadSummary> {
        workloads::http_load(
            b.outsider()?,
            pod_ip,
            &[
                "--count",
                &n.to_string(),
                "--connections",
                "10",
                "--path",
                "/productpage",
                "--timeout-ms",
                "5000",
            ],
        )
    };
    let before = plain(200)?;
    ensure!(before.succeeded == 200, "PERMISSIVE: plaintext gets in: {before:?}");

    b.apply(&["peer-authentication-strict.yaml"])?;
    let refused = plain(1000)?;
    let mesh = b.pages(b.curl()?, 1000, 20, &[])?;
    eprintln!(
        "STRICT: plaintext {:?} (first error {:?}); mesh {:?}",
        refused.by_status, refused.first_error, mesh.by_status
    );
    ensure!(refused.succeeded == 0, "every plaintext request refused: {refused:?}");
    all_ok("mesh clients under STRICT", &mesh)?;

    b.delete("peer-authentication-strict.yaml")?;
    let after = plain(200)?;
    ensure!(after.succeeded == 200, "PERMISSIVE again: {after:?}");
    Ok(())
}

/// L7 AuthorizationPolicy: only GET, only the page and the product API, only from curl's
/// identity; everything else is 403 "RBAC: access denied".
#[test]
fn l7_authorization_allows_get_on_given_paths_from_one_principal() -> Result<()> {
    let b = Bookinfo::up()?;
    b.apply(&["authorization-policy-productpage-get.yaml"])?;
    let to = b.productpage()?;
    let load = |from: &Pod, n: u64, extra: &[&str]| -> Result<LoadSummary> {
        let count = n.to_string();
        let mut args = vec!["--count", count.as_str(), "--connections", "10", "--host", "productpage:9080"];
        args.extend_from_slice(extra);
        workloads::http_load(from, to, &args)
    };
    let page = load(b.curl()?, 600, &["--path", "/productpage"])?;
    let api = load(b.curl()?, 400, &["--path", "/api/v1/products/0"])?;
    let post = load(b.curl()?, 400, &["--path", "/productpage", "--method", "POST"])?;
    let health = load(b.curl()?, 300, &["--path", "/health"])?;
    let visitor = load(b.visitor()?, 400, &["--path", "/productpage"])?;
    for (what, l, status) in [
        ("curl GET /productpage", &page, 200),
        ("curl GET /api/v1/products/0", &api, 200),
        ("curl POST /productpage", &post, 403),
        ("curl GET /health", &health, 403),
        ("visitor GET /productpage", &visitor, 403),
    ] {
        eprintln!("{what}: {:?}", l.by_status);
        ensure!(l.status(status) == l.requests, "{what}: every answer {status}: {:?}", l.by_status);
    }
    let out = b.visitor()?.run_simpod(["http-get", "--to", &to.to_string(), "--path", "/productpage"])?;
    let denied: Value = out.check()?.json()?;
    ensure!(denied["status"] == 403 && denied["body"] == "RBAC: access denied", "Istio's answer: {denied}");
    Ok(())
}

/// RequestAuthentication with the example's JWKS: a valid token or none gets in, an expired or
/// tampered one gets 401; with the require-JWT policy, none gets 403.
#[test]
fn request_authentication_with_valid_expired_and_missing_tokens() -> Result<()> {
    let b = Bookinfo::up()?;
    b.apply(&["request-authentication-jwt.yaml"])?;
    let token = |f: &str| -> Result<String> {
        Ok(std::fs::read_to_string(examples().join("istio/jwt").join(f))?.trim().to_string())
    };
    let valid = format!("authorization: Bearer {}", token("valid.jwt")?);
    let expired = format!("authorization: Bearer {}", token("expired.jwt")?);
    // The valid token with a character in the middle of its signature changed.
    let t = token("valid.jwt")?;
    let at = t.rfind('.').context("a JWT has three parts")? + (t.len() - t.rfind('.').unwrap_or(0)) / 2;
    let mut chars: Vec<char> = t.chars().collect();
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    let tampered = format!("authorization: Bearer {}", chars.into_iter().collect::<String>());
    let run = |n: u64, header: Option<&str>| -> Result<LoadSummary> {
        let mut extra = vec![];
        if let Some(h) = header {
            extra.extend(["--header", h]);
        }
        b.pages(b.curl()?, n, 10, &extra)
    };
    let (ok, old, bad, none) =
        (run(600, Some(&valid))?, run(400, Some(&expired))?, run(200, Some(&tampered))?, run(400, None)?);
    for (what, l, status) in
        [("valid", &ok, 200), ("expired", &old, 401), ("tampered", &bad, 401), ("missing", &none, 200)]
    {
        eprintln!("RequestAuthentication, {what} token: {:?}", l.by_status);
        ensure!(l.status(status) == l.requests, "{what} token: every answer {status}: {:?}", l.by_status);
    }

    b.apply(&["authorization-policy-require-jwt.yaml"])?;
    let (ok, old, none) = (run(200, Some(&valid))?, run(200, Some(&expired))?, run(400, None)?);
    for (what, l, status) in [("valid", &ok, 200), ("expired", &old, 401), ("missing", &none, 403)] {
        eprintln!("with require-jwt, {what} token: {:?}", l.by_status);
        ensure!(
            l.status(status) == l.requests,
            "require-jwt, {what} token: every answer {status}: {:?}",
            l.by_status
        );
    }
    Ok(())
}

/// The request-routing and traffic-shifting tasks through what sluice routes by today: a
/// Gateway API route on the `reviews` Service whose backends are the per-version Services
/// (`reviews-v1`, `reviews-v2`), the Service-level equivalent of a VirtualService to subsets.
/// Replaced as `kubectl apply` replaces an object of the same name.
fn reviews_route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: bookinfo}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 9080}}]\n  rules:\n{rules}"
    )
}

/// All to v1, then 80/20, then jason → v2, by Service routing (runs today, before the
/// VirtualService lands): every page from v1; 80/20 within ±3 points; jason's pages from v2
/// while everyone else's stay on v1.
#[test]
fn service_routing_all_to_v1_then_80_20_then_jason_to_v2() -> Result<()> {
    let b = Bookinfo::up()?;
    b.pg.apply("reviews-all-v1.yaml", &reviews_route("  - backendRefs: [{name: reviews-v1, port: 9080}]\n"))?;
    let l = b.pages(b.curl()?, 2000, 20, &[])?;
    eprintln!("all to v1 by Service, 2000 pages: {:?}", l.by_header);
    all_ok("all-v1", &l)?;
    ensure!(reviews(&l, "v1") == 2000, "every page from reviews v1: {:?}", l.by_header);
    ensure!(
        ratings(&l, "none") == 2000 && l.header_count("x-bookinfo-details", "v1") == 2000,
        "{:?}",
        l.by_header
    );

    b.pg.apply(
        "reviews-80-20.yaml",
        &reviews_route(
            "  - backendRefs:\n    - {name: reviews-v1, port: 9080, weight: 80}\n    - {name: reviews-v2, port: 9080, weight: 20}\n",
        ),
    )?;
    let l = b.pages(b.curl()?, 4000, 20, &[])?;
    all_ok("80/20", &l)?;
    share("80/20 by Service: v1", reviews(&l, "v1"), 4000, 80.0, 3.0)?;
    share("80/20 by Service: v2", reviews(&l, "v2"), 4000, 20.0, 3.0)?;
    ensure!(reviews(&l, "v3") == 0, "{:?}", l.by_header);
    ensure!(ratings(&l, "v1") == reviews(&l, "v2"), "v2 pages show ratings: {:?}", l.by_header);

    b.pg.apply(
        "reviews-jason-v2.yaml",
        &reviews_route(
            "  - matches: [{headers: [{name: end-user, value: jason}]}]\n    backendRefs: [{name: reviews-v2, port: 9080}]\n\
             \x20 - backendRefs: [{name: reviews-v1, port: 9080}]\n",
        ),
    )?;
    let jason = b.pages(b.curl()?, 1000, 20, &["--header", JASON])?;
    let others = b.pages(b.curl()?, 1000, 20, &["--header", "cookie: session=alice"])?;
    eprintln!("jason: {:?}\nalice: {:?}", jason.by_header, others.by_header);
    all_ok("jason", &jason)?;
    all_ok("alice", &others)?;
    ensure!(
        reviews(&jason, "v2") == 1000 && ratings(&jason, "v1") == 1000,
        "jason → v2 with stars: {:?}",
        jason.by_header
    );
    ensure!(reviews(&others, "v1") == 1000, "alice → v1: {:?}", others.by_header);
    Ok(())
}

/// The same canary as a Gateway API route (the example's 20-reviews-canary.httproute.yaml):
/// jason → v2, everyone else 90/10. sluice's own API, next to Istio's; this one needs nothing
/// new.
#[test]
fn gamma_canary_route_splits_as_the_istio_task_does() -> Result<()> {
    let b = Bookinfo::up()?;
    b.pg.apply_file(&examples().join("20-reviews-canary.httproute.yaml"))?;
    // The route matches `end-user: jason` on requests to reviews: productpage sends it from the
    // session.
    let jason = b.pages(b.curl()?, 500, 20, &["--header", JASON])?;
    let others = b.pages(b.curl()?, 2000, 20, &[])?;
    eprintln!("canary: jason {:?}\nothers {:?}", jason.by_header, others.by_header);
    all_ok("jason", &jason)?;
    all_ok("others", &others)?;
    ensure!(reviews(&jason, "v2") == 500, "jason's session → v2: {:?}", jason.by_header);
    share("canary: v1", reviews(&others, "v1"), 2000, 90.0, 3.0)?;
    share("canary: v2", reviews(&others, "v2"), 2000, 10.0, 3.0)?;
    ensure!(reviews(&others, "v3") == 0, "{:?}", others.by_header);
    Ok(())
}
