//! Istio's VirtualService on the data path, in the shapes of Istio's Bookinfo tasks (our own
//! manifests of the same shape): a 90/10 split and a header match to v2, a delay and an abort
//! injected for one user, a weighted `tcp` route and a `tls` route chosen by the ClientHello's
//! server name on an opaque port. Real clients (simpod) in an enrolled pod, real backends,
//! sluice in between; every figure is checked against what the backends saw.
//!
//! Subsets belong to DestinationRules (another branch): the weighted routes here go to two
//! Services (`reviews-v1`, `reviews-v2`) rather than to subsets of one.

mod common;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{ensure, Context, Result};
use common::{counter, expect_ok, wait_enrolled, T};
use serde_json::Value;
use sluice_tests::{
    manifest,
    workloads::{grpc_client, start_grpc_server, start_http_server, start_tls_echo_server},
    Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts,
};

const HTTP_PORT: u16 = 8080;

/// A node with sluice and an enrolled namespace `shop` holding the client pod
/// (`app=productpage`, as Bookinfo's caller of reviews and ratings).
struct World {
    sim: Sim,
    node: Node,
    client: Pod,
    sluice: Sluice,
    servers: Vec<SimProcess>,
}

impl World {
    fn new() -> Result<World> {
        let sim = Sim::new()?;
        let node = sim.add_node("n1")?;
        sim.write_namespace("shop", true)?;
        let client = node.add_pod("shop", "productpage", PodOpts::labels(&[("app", "productpage")]))?;
        let sluice = node.start_sluice(SluiceOpts::default())?;
        sluice.wait_ready(T)?;
        wait_enrolled(&sluice, &client)?;
        Ok(World { sim, node, client, sluice, servers: Vec::new() })
    }

    /// A backend pod `shop/<name>` (labels app=<app>, version=<version>).
    fn pod(&self, name: &str, app: &str, version: &str) -> Result<Pod> {
        let pod = self.node.add_pod("shop", name, PodOpts::labels(&[("app", app), ("version", version)]))?;
        wait_enrolled(&self.sluice, &pod)?;
        Ok(pod)
    }

    /// A backend pod running simpod's HTTP server on 8080, answering with its own name.
    fn http_pod(&mut self, name: &str, app: &str, version: &str) -> Result<Pod> {
        self.http_pod_with(name, app, version, &[])
    }

    /// As [`World::http_pod`], with extra server arguments (e.g. a failure rate); the server
    /// process is the last of `servers`.
    fn http_pod_with(&mut self, name: &str, app: &str, version: &str, extra: &[&str]) -> Result<Pod> {
        let pod = self.pod(name, app, version)?;
        self.servers.push(start_http_server(&pod, HTTP_PORT, name, extra)?);
        Ok(pod)
    }

    /// A Service `shop/<name>` at `ip:port` → `target_port` on `endpoints`, its port named
    /// `port_name` with `appProtocol`; returns once sluice has loaded it.
    fn service(
        &self,
        name: &str,
        ip: &str,
        port: (&str, u16, u16),
        app_protocol: &str,
        endpoints: &[&Pod],
    ) -> Result<()> {
        let node_names: Vec<String> = endpoints.iter().map(|p| p.node().name().to_string()).collect();
        let eps: Vec<manifest::Endpoint> = endpoints
            .iter()
            .zip(&node_names)
            .map(|(p, node_name)| manifest::Endpoint {
                ip: p.ip(),
                pod_name: p.name(),
                pod_namespace: p.namespace(),
                pod_uid: p.uid(),
                node_name,
                labels: p.labels(),
            })
            .collect();
        let docs = manifest::service("shop", name, ip, &[port], &eps);
        let docs = manifest::with_app_protocol(docs, port.0, app_protocol);
        let before = self.generation()?;
        self.sim.write_file(&manifest::service_file_name("shop", name), manifest::to_yaml(&docs)?)?;
        self.sluice.wait_for("/model", |m| m["generation"].as_u64().unwrap_or(0) > before, T)?;
        Ok(())
    }

    fn generation(&self) -> Result<u64> {
        self.sluice.get_json("/model")?["generation"].as_u64().context("model generation")
    }

    /// Writes a VirtualService manifest and waits until sluice has loaded it without errors
    /// (a rejected resource would leave the test measuring the default route).
    fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        let before = self.generation()?;
        self.sim.write_file(file, yaml)?;
        let model = self.sluice.wait_for("/model", |m| m["generation"].as_u64().unwrap_or(0) > before, T)?;
        ensure!(
            model["errors"].as_array().is_some_and(|e| e.is_empty()),
            "{file} rejected: {}",
            model["errors"]
        );
        Ok(())
    }

    /// `simpod http-get`: `count` requests, one keep-alive connection (or one connection per
    /// request with `keepalive` false).
    fn get(&self, to: SocketAddr, count: u32, keepalive: bool, headers: &[&str]) -> Result<Vec<Value>> {
        self.get_from(&self.client, to, count, keepalive, headers)
    }

    /// As [`World::get`], from another client pod.
    fn get_from(
        &self,
        client: &Pod,
        to: SocketAddr,
        count: u32,
        keepalive: bool,
        headers: &[&str],
    ) -> Result<Vec<Value>> {
        let mut args =
            vec!["http-get".to_string(), "--to".into(), to.to_string(), "--path".into(), "/".into()];
        args.extend(["--count".into(), count.to_string()]);
        if keepalive {
            args.push("--keepalive".into());
        }
        for h in headers {
            args.extend(["--header".to_string(), h.to_string()]);
        }
        let out = client.run_simpod_timeout(&args, Duration::from_secs(180))?;
        let lines = out.json_lines()?;
        ensure!(
            lines.len() == count as usize,
            "expected {count} results, got {}: {}",
            lines.len(),
            out.stderr
        );
        Ok(lines)
    }

    /// One GET of `path` (with `headers`) from the client: the result line.
    fn get_path(&self, to: SocketAddr, path: &str, headers: &[&str]) -> Result<Value> {
        let mut args =
            vec!["http-get".to_string(), "--to".into(), to.to_string(), "--path".into(), path.into()];
        for h in headers {
            args.extend(["--header".to_string(), h.to_string()]);
        }
        let out = self.client.run_simpod_timeout(&args, Duration::from_secs(30))?;
        let line = out.json().with_context(|| format!("http-get output: {} {}", out.stdout, out.stderr))?;
        expect_ok(&line)?;
        Ok(line)
    }

    /// `sluice routes shop/<service>`, which must succeed.
    fn routes_cli(&self, service: &str) -> Result<String> {
        let out = self.sluice.cli(&["routes", &format!("shop/{service}")])?;
        ensure!(out.success(), "sluice routes: {}", out.stderr);
        Ok(out.stdout)
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// Successful answers counted by the name of the backend that gave them.
fn count_by_backend(lines: &[Value]) -> Result<BTreeMap<String, usize>> {
    let mut by = BTreeMap::new();
    for l in lines {
        expect_ok(l)?;
        ensure!(l["status"] == 200, "unexpected status: {l}");
        *by.entry(l["body"]["name"].as_str().unwrap_or("?").to_string()).or_default() += 1;
    }
    Ok(by)
}

fn virtual_service(name: &str, spec: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n{spec}")
}

/// reviews (all versions), reviews-v1 and reviews-v2 as three Services on 9080.
fn reviews(w: &mut World) -> Result<SocketAddr> {
    let v1 = w.http_pod("reviews-v1", "reviews", "v1")?;
    let v2 = w.http_pod("reviews-v2", "reviews", "v2")?;
    w.service("reviews", "10.96.2.10", ("http", 9080, HTTP_PORT), "http", &[&v1, &v2])?;
    w.service("reviews-v1", "10.96.2.11", ("http", 9080, HTTP_PORT), "http", &[&v1])?;
    w.service("reviews-v2", "10.96.2.12", ("http", 9080, HTTP_PORT), "http", &[&v2])?;
    Ok(addr("10.96.2.10", 9080))
}

/// Bookinfo's "request routing" and "traffic shifting": the user `jason` (header
/// `end-user: jason`) always gets v2; everyone else is split 90/10. Over 2 000 requests v2
/// serves 10 % ± 3 points; all of jason's go to v2; `sluice routes` names the VirtualService
/// and the rule that produced each entry.
#[test]
fn weights_90_10_and_a_header_match_to_v2() -> Result<()> {
    let mut w = World::new()?;
    let vip = reviews(&mut w)?;
    let spec = r#"  hosts:
  - reviews
  http:
  - name: jason
    match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews-v2
  - name: split
    route:
    - destination:
        host: reviews-v1.shop.svc.cluster.local
      weight: 90
    - destination:
        host: reviews-v2
        port:
          number: 9080
      weight: 10
"#;
    w.apply("vs-reviews.yaml", &virtual_service("reviews", spec))?;

    let by = count_by_backend(&w.get(vip, 2000, true, &[])?)?;
    let v2 = by.get("reviews-v2").copied().unwrap_or(0);
    ensure!((140..=260).contains(&v2), "v2 served {v2} of 2000 (expected 10 % ± 3 points): {by:?}");
    ensure!(by.keys().all(|k| k == "reviews-v1" || k == "reviews-v2"), "{by:?}");

    let jason = count_by_backend(&w.get(vip, 200, true, &["end-user: jason"])?)?;
    ensure!(jason.get("reviews-v2") == Some(&200), "jason's requests: {jason:?}");
    // A near miss is not jason: split again (exact match, case-sensitive value).
    let other = count_by_backend(&w.get(vip, 200, true, &["end-user: Jason"])?)?;
    ensure!(other.get("reviews-v1").copied().unwrap_or(0) > 140, "end-user: Jason: {other:?}");

    let out = w.routes_cli("reviews")?;
    for needle in [
        "VirtualService shop/reviews",
        "jason",
        "split",
        "shop/reviews-v1:9080 90%",
        "shop/reviews-v2:9080 10%",
    ] {
        ensure!(out.contains(needle), "sluice routes lacks {needle:?}:\n{out}");
    }
    eprintln!("2000 requests: {by:?}; end-user jason: {jason:?}; end-user Jason: {other:?}\n{out}");
    Ok(())
}

/// Bookinfo's "fault injection": for `end-user: jason` only, first a fixed delay of 1 s, then
/// (the VirtualService changed live) an abort with 500; other users are untouched.
#[test]
fn delay_then_abort_for_one_user() -> Result<()> {
    let mut w = World::new()?;
    let v1 = w.http_pod("ratings-v1", "ratings", "v1")?;
    w.service("ratings", "10.96.2.20", ("http", 9080, HTTP_PORT), "http", &[&v1])?;
    let vip = addr("10.96.2.20", 9080);
    let fault = |f: &str| {
        virtual_service(
            "ratings",
            &format!(
                "  hosts:\n  - ratings\n  http:\n  - match:\n    - headers:\n        end-user:\n          exact: jason\n    fault:\n{f}    route:\n    - destination:\n        host: ratings\n  - route:\n    - destination:\n        host: ratings\n"
            ),
        )
    };

    w.apply(
        "vs-ratings.yaml",
        &fault("      delay:\n        fixedDelay: 1s\n        percentage:\n          value: 100\n"),
    )?;
    let delayed = w.get(vip, 3, true, &["end-user: jason"])?;
    let others = w.get(vip, 20, true, &["end-user: alice"])?;
    let elapsed = |lines: &[Value]| -> Vec<u64> {
        lines.iter().map(|l| l["elapsed_ms"].as_u64().unwrap_or(0)).collect()
    };
    count_by_backend(&delayed)?;
    count_by_backend(&others)?;
    let (d, o) = (elapsed(&delayed), elapsed(&others));
    ensure!(d.iter().all(|ms| (1000..3000).contains(ms)), "jason's requests should take 1 s more: {d:?} ms");
    ensure!(o.iter().all(|ms| *ms < 500), "alice's requests should not be delayed: {o:?} ms");
    ensure!(counter(&w.sluice, "http_faults_delayed")? == 3, "http_faults_delayed should be 3");

    w.apply(
        "vs-ratings.yaml",
        &fault("      abort:\n        httpStatus: 500\n        percentage:\n          value: 100\n"),
    )?;
    let aborted = w.get(vip, 50, true, &["end-user: jason"])?;
    for l in &aborted {
        expect_ok(l)?;
        ensure!(l["status"] == 500, "jason should get 500: {l}");
        ensure!(l["body"]["name"].is_null(), "an aborted request must not reach the backend: {l}");
    }
    let fine = count_by_backend(&w.get(vip, 50, true, &["end-user: alice"])?)?;
    ensure!(fine.get("ratings-v1") == Some(&50), "alice: {fine:?}");
    ensure!(counter(&w.sluice, "http_faults_aborted")? == 50, "http_faults_aborted should be 50");
    let out = w.routes_cli("ratings")?;
    ensure!(out.contains("VirtualService shop/ratings") && out.contains("fault"), "sluice routes:\n{out}");
    eprintln!("delayed: {d:?} ms; others: max {} ms; aborted: 50 × 500\n{out}", o.iter().max().unwrap_or(&0));
    Ok(())
}

/// A `tcp` route with weights 80/20 on an opaque port (`appProtocol: tcp`), over 2 000
/// connections: each goes to one destination, chosen by weight. The payload is HTTP only so
/// the backend can say who it is; sluice does not parse it (one connection per request).
#[test]
fn tcp_route_splits_connections_by_weight() -> Result<()> {
    let mut w = World::new()?;
    let a = w.http_pod("db-a", "db", "a")?;
    let b = w.http_pod("db-b", "db", "b")?;
    w.service("db", "10.96.2.30", ("tcp-db", 3306, HTTP_PORT), "tcp", &[&a, &b])?;
    w.service("db-a", "10.96.2.31", ("tcp-db", 3306, HTTP_PORT), "tcp", &[&a])?;
    w.service("db-b", "10.96.2.32", ("tcp-db", 3306, HTTP_PORT), "tcp", &[&b])?;
    let spec = r#"  hosts:
  - db.shop.svc.cluster.local
  tcp:
  - match:
    - port: 3306
    route:
    - destination:
        host: db-a
        port:
          number: 3306
      weight: 80
    - destination:
        host: db-b
        port:
          number: 3306
      weight: 20
"#;
    w.apply("vs-db.yaml", &virtual_service("db", spec))?;
    let before = counter(&w.sluice, "tcp_routed")?;
    let n = 2000;
    let by = count_by_backend(&w.get(addr("10.96.2.30", 3306), n, false, &[])?)?;
    let b_count = by.get("db-b").copied().unwrap_or(0);
    // 20 % of 2000 connections: ± 4 points is 4.5 standard deviations (0.89 points).
    ensure!(
        (320..=480).contains(&b_count),
        "db-b got {b_count} of {n} connections (expected 20 % ± 4 points): {by:?}"
    );
    ensure!(by.keys().all(|k| k == "db-a" || k == "db-b"), "{by:?}");
    let routed = counter(&w.sluice, "tcp_routed")? - before;
    ensure!(routed == u64::from(n), "tcp_routed grew by {routed}, expected {n}");
    let out = w.routes_cli("db")?;
    ensure!(out.contains("VirtualService shop/db"), "sluice routes:\n{out}");
    eprintln!("{n} connections: {by:?}\n{out}");
    Ok(())
}

/// A `tcp` route to a DestinationRule subset on an opaque port: the subset is the one the rule
/// in force *for the client* defines, as for HTTP. `shop`'s rule says subset `pick` is
/// version b; namespace `team` has its own rule for the same Service saying version a, which
/// wins for `team`'s clients (a rule of the client's namespace comes first).
#[test]
fn tcp_route_to_a_subset_as_the_clients_rule_defines_it() -> Result<()> {
    let mut w = World::new()?;
    let a = w.http_pod("db-a", "db", "a")?;
    let b = w.http_pod("db-b", "db", "b")?;
    w.service("db", "10.96.2.30", ("tcp-db", 3306, HTTP_PORT), "tcp", &[&a, &b])?;
    w.sim.write_namespace("team", true)?;
    let teammate = w.node.add_pod("team", "teammate", PodOpts::labels(&[("app", "teammate")]))?;
    wait_enrolled(&w.sluice, &teammate)?;
    let rule = |ns: &str, version: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: db, namespace: {ns}}}\n\
             spec:\n  host: db.shop.svc.cluster.local\n  subsets:\n  - name: pick\n    labels: {{version: {version}}}\n"
        )
    };
    w.apply("dr-db-shop.yaml", &rule("shop", "b"))?;
    w.apply("dr-db-team.yaml", &rule("team", "a"))?;
    let spec = "  hosts:\n  - db.shop.svc.cluster.local\n  tcp:\n  - route:\n    - destination:\n        host: db\n        subset: pick\n        port: {number: 3306}\n";
    w.apply("vs-db.yaml", &virtual_service("db", spec))?;
    let vip = addr("10.96.2.30", 3306);
    let shop = count_by_backend(&w.get(vip, 100, false, &[])?)?;
    let team = count_by_backend(&w.get_from(&teammate, vip, 100, false, &[])?)?;
    eprintln!("subset pick: shop's clients {shop:?}, team's clients {team:?}");
    ensure!(shop.get("db-b") == Some(&100) && shop.len() == 1, "shop's rule: version b only: {shop:?}");
    ensure!(team.get("db-a") == Some(&100) && team.len() == 1, "team's own rule: version a only: {team:?}");
    let out = w.routes_cli("db")?;
    for needle in ["DestinationRule shop/db (subsets pick) for clients in namespace shop", "DestinationRule team/db (subsets pick) for clients in namespace team"] {
        ensure!(out.contains(needle), "sluice routes lacks {needle:?}:\n{out}");
    }
    Ok(())
}

/// Bookinfo-style TLS passthrough: one Service port carries TLS for two names; a `tls` route
/// sends each connection to the backend for the ClientHello's server name. Each backend has
/// its own self-signed certificate and the client trusts only the one it expects, so a
/// connection routed to the wrong backend fails its handshake.
#[test]
fn tls_route_by_sni_on_an_opaque_port() -> Result<()> {
    let w = World::new()?;
    let a = w.pod("tls-a", "secure", "a")?;
    let b = w.pod("tls-b", "secure", "b")?;
    let cert = |n: &str| -> PathBuf { w.sim.temp_dir().join(format!("{n}.pem")) };
    let _servers = [
        start_tls_echo_server(&a, 8443, &cert("a"), &["--san", "a.secure.test"])?,
        start_tls_echo_server(&b, 8443, &cert("b"), &["--san", "b.secure.test"])?,
    ];
    w.service("secure", "10.96.2.40", ("tls", 443, 8443), "tls", &[&a, &b])?;
    w.service("secure-a", "10.96.2.41", ("tls", 443, 8443), "tls", &[&a])?;
    w.service("secure-b", "10.96.2.42", ("tls", 443, 8443), "tls", &[&b])?;
    let spec = r#"  hosts:
  - secure
  - "*.secure.test"
  tls:
  - match:
    - port: 443
      sniHosts:
      - a.secure.test
    route:
    - destination:
        host: secure-a
  - match:
    - sniHosts:
      - b.secure.test
    route:
    - destination:
        host: secure-b
        port:
          number: 443
"#;
    w.apply("vs-secure.yaml", &virtual_service("secure", spec))?;
    let vip = addr("10.96.2.40", 443);
    let tls = |name: &str, ca: &str| -> Result<Value> {
        let out = w.client.run_simpod_timeout(
            [
                "tls-client",
                "--to",
                &vip.to_string(),
                "--server-name",
                name,
                "--ca",
                &cert(ca).display().to_string(),
                "--send-bytes",
                "4096",
            ],
            Duration::from_secs(30),
        )?;
        out.json().with_context(|| format!("tls-client output: {} {}", out.stdout, out.stderr))
    };
    let before = counter(&w.sluice, "tcp_routed")?;
    // Both sides by name, several times each (the Service alone would round-robin them).
    for _ in 0..6 {
        let ra = tls("a.secure.test", "a")?;
        ensure!(ra["ok"] == true, "SNI a.secure.test should reach tls-a: {ra}");
        let rb = tls("b.secure.test", "b")?;
        ensure!(rb["ok"] == true, "SNI b.secure.test should reach tls-b: {rb}");
    }
    // The check can fail: b's name with only a's certificate trusted does not handshake.
    let wrong = tls("b.secure.test", "a")?;
    ensure!(wrong["ok"] != true, "b.secure.test must not reach tls-a: {wrong}");
    let routed = counter(&w.sluice, "tcp_routed")? - before;
    ensure!(routed == 13, "tcp_routed grew by {routed}, expected 13");
    ensure!(counter(&w.sluice, "tls_sni_unread")? == 0, "every ClientHello should have been read");
    let out = w.routes_cli("secure")?;
    ensure!(
        out.contains("VirtualService shop/secure") && out.contains("a.secure.test"),
        "sluice routes:\n{out}"
    );
    eprintln!("tls by SNI: 12 handshakes to the right backend, the crossed one refused: {wrong}\n{out}");
    Ok(())
}

/// Requests a server process has answered (its `request` events).
fn served(server: &SimProcess) -> usize {
    server.json_lines().iter().filter(|l| l["event"] == "request").count()
}

/// Retries as the rule sets them (`retryOn: 503`, to another endpoint): with one of two
/// endpoints answering 503 to everything, every request succeeds; with `attempts: 0` the
/// failures reach the client.
#[test]
fn retries_on_503_go_to_the_other_endpoint() -> Result<()> {
    let mut w = World::new()?;
    let good = w.http_pod("details-v1", "details", "v1")?;
    let bad =
        w.http_pod_with("details-bad", "details", "v1", &["--fail-percent", "100", "--fail-status", "503"])?;
    let bad_server = w.servers.len() - 1;
    w.service("details", "10.96.2.50", ("http", 9080, HTTP_PORT), "http", &[&good, &bad])?;
    let vip = addr("10.96.2.50", 9080);
    let retries = |r: &str| {
        virtual_service("details", &format!("  hosts:\n  - details\n  http:\n  - retries:\n{r}    route:\n    - destination:\n        host: details\n"))
    };

    w.apply("vs-details.yaml", &retries("      attempts: 2\n      retryOn: \"503\"\n"))?;
    let before = counter(&w.sluice, "http_retries")?;
    let by = count_by_backend(&w.get(vip, 200, true, &[])?)?;
    ensure!(by.get("details-v1") == Some(&200), "every request should end at details-v1: {by:?}");
    let retried = counter(&w.sluice, "http_retries")? - before;
    let bad_saw = served(&w.servers[bad_server]);
    ensure!(bad_saw > 0, "the failing endpoint was never tried: the test would prove nothing");
    ensure!(
        retried as usize == bad_saw,
        "each 503 should have been retried once: {retried} retries, {bad_saw} 503s"
    );

    w.apply("vs-details.yaml", &retries("      attempts: 0\n"))?;
    let lines = w.get(vip, 200, true, &[])?;
    let failed = lines.iter().filter(|l| l["status"] == 503).count();
    ensure!(failed > 0, "without retries some of 200 requests should get the 503");
    ensure!(lines.iter().all(|l| l["status"] == 200 || l["status"] == 503), "only 200 and 503 expected");
    eprintln!(
        "retryOn 503: 200/200 ok, {retried} retries after {bad_saw} 503s; attempts 0: {failed}/200 got 503"
    );
    Ok(())
}

/// `mirror` with `mirrorPercentage: 25`: the client's answers all come from the route's
/// destination; a quarter (± 5 points over 2 000 requests) is copied to the mirror, which
/// sees them with `-shadow` appended to the host.
#[test]
fn mirror_percentage_copies_a_share_of_the_requests() -> Result<()> {
    let mut w = World::new()?;
    let v1 = w.http_pod("ratings-v1", "ratings", "v1")?;
    let v2 = w.http_pod("ratings-v2", "ratings", "v2")?;
    let mirror_server = w.servers.len() - 1;
    w.service("ratings", "10.96.2.60", ("http", 9080, HTTP_PORT), "http", &[&v1])?;
    w.service("ratings-v2", "10.96.2.61", ("http", 9080, HTTP_PORT), "http", &[&v2])?;
    let spec = r#"  hosts:
  - ratings
  http:
  - route:
    - destination:
        host: ratings
    mirror:
      host: ratings-v2
    mirrorPercentage:
      value: 25
"#;
    w.apply("vs-ratings.yaml", &virtual_service("ratings", spec))?;
    let n = 2000;
    let by = count_by_backend(&w.get(addr("10.96.2.60", 9080), n, true, &[])?)?;
    ensure!(by.get("ratings-v1") == Some(&(n as usize)), "answers come from ratings-v1 only: {by:?}");
    // Mirrors are sent in the background and counted once answered: wait until the mirror
    // has answered as many as sluice counts (an answer is logged before sluice reads it).
    let deadline = std::time::Instant::now() + T;
    let mirrored = loop {
        let counted = counter(&w.sluice, "http_mirrored")? as usize;
        if counted > 0 && served(&w.servers[mirror_server]) == counted {
            break counted;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the mirror answered {} and sluice counted {counted}",
            served(&w.servers[mirror_server])
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // 25 % of 2000: ± 5 points is 5 standard deviations (0.97 points).
    ensure!((400..=600).contains(&mirrored), "{mirrored} of {n} mirrored (expected 25 % ± 5 points)");
    for lost in ["http_mirror_failed", "http_mirror_dropped", "http_mirror_skipped"] {
        ensure!(counter(&w.sluice, lost)? == 0, "{lost} should be 0");
    }
    let seen = w.servers[mirror_server].json_lines();
    let host = seen
        .iter()
        .find(|l| l["event"] == "request")
        .map(|l| l["headers"]["host"].clone())
        .unwrap_or_default();
    ensure!(
        host.as_str().is_some_and(|h| h.contains("-shadow")),
        "the mirror's host should carry -shadow: {host}"
    );
    eprintln!("{n} requests, {mirrored} mirrored (host {host})");
    Ok(())
}

/// How a VirtualService and an HTTPRoute for one Service mix (as Istio's sidecars order them),
/// with `sourceLabels` checked against the real client pod: the VirtualService (older, public,
/// its only rule for `app: productpage`) decides for productpage in another namespace; for
/// another pod there it has no rule, so the Service's HTTPRoute decides; in the Service's own
/// namespace the HTTPRoute comes first and the VirtualService is shadowed.
#[test]
fn source_labels_and_an_httproute_for_the_same_service() -> Result<()> {
    let mut w = World::new()?;
    let vip = reviews(&mut w)?;
    w.sim.write_namespace("front", true)?;
    let front_pp = w.node.add_pod("front", "productpage", PodOpts::labels(&[("app", "productpage")]))?;
    let front_tester = w.node.add_pod("front", "tester", PodOpts::labels(&[("app", "tester")]))?;
    wait_enrolled(&w.sluice, &front_pp)?;
    wait_enrolled(&w.sluice, &front_tester)?;
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews-route
  namespace: shop
  creationTimestamp: "2026-02-01T00:00:00Z"
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  rules:
  - backendRefs:
    - name: reviews-v1
      port: 9080
"#;
    let vs = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
  creationTimestamp: "2026-01-01T00:00:00Z"
spec:
  hosts:
  - reviews
  http:
  - match:
    - sourceLabels:
        app: productpage
    route:
    - destination:
        host: reviews-v2
"#;
    w.apply("route-reviews.yaml", route)?;
    w.apply("vs-reviews.yaml", vs)?;
    let from = |pod: &Pod| -> Result<BTreeMap<String, usize>> {
        count_by_backend(&w.get_from(pod, vip, 20, true, &[])?)
    };
    let front = from(&front_pp)?;
    ensure!(
        front.get("reviews-v2") == Some(&20),
        "front/productpage should get the VirtualService's v2: {front:?}"
    );
    let tester = from(&front_tester)?;
    ensure!(
        tester.get("reviews-v1") == Some(&20),
        "front/tester has no VirtualService rule: the HTTPRoute decides: {tester:?}"
    );
    let own = from(&w.client)?;
    ensure!(own.get("reviews-v1") == Some(&20), "in shop the HTTPRoute comes first: {own:?}");
    let out = w.routes_cli("reviews")?;
    for needle in [
        "VirtualService shop/reviews",
        "HTTPRoute shop/reviews-route",
        "not applied to these clients: VirtualService shop/reviews",
    ] {
        ensure!(out.contains(needle), "sluice routes lacks {needle:?}:\n{out}");
    }
    eprintln!("front/productpage: {front:?}; front/tester: {tester:?}; shop/productpage: {own:?}\n{out}");
    Ok(())
}

/// Rule actions and per-rule modifiers as the client and the backend see them: a redirect, a
/// regex rewrite (`\1` groups), a prefix rewrite with request and response headers, an
/// authority rewrite, and a direct response; a method match and a query match.
#[test]
fn rewrites_redirects_headers_and_direct_responses() -> Result<()> {
    let mut w = World::new()?;
    let web = w.http_pod("web-v1", "web", "v1")?;
    w.service("web", "10.96.2.70", ("http", 80, HTTP_PORT), "http", &[&web])?;
    let spec = r#"  hosts:
  - web
  http:
  - match:
    - uri:
        prefix: /old
    redirect:
      uri: /new
      redirectCode: 302
  - match:
    - uri:
        regex: /v1/([a-z]+)/([0-9]+)
    rewrite:
      uriRegexRewrite:
        match: /v1/([a-z]+)/([0-9]+)
        rewrite: /api/\2/\1
    route:
    - destination:
        host: web
  - match:
    - uri:
        prefix: /p/
      method:
        exact: GET
      queryParams:
        debug:
          exact: "1"
    rewrite:
      uri: /q/
      authority: internal.web
    headers:
      request:
        set:
          x-routed-by: vs
        remove:
        - x-secret
      response:
        add:
          x-served: web
    route:
    - destination:
        host: web
  - match:
    - uri:
        exact: /tea
    directResponse:
      status: 418
      body:
        string: short and stout
  - route:
    - destination:
        host: web
"#;
    w.apply("vs-web.yaml", &virtual_service("web", spec))?;
    let vip = addr("10.96.2.70", 80);

    let r = w.get_path(vip, "/old/page", &[])?;
    ensure!(r["status"] == 302, "redirect: {r}");
    let location = r["headers"]["location"].as_str().unwrap_or_default();
    ensure!(location.ends_with("/new"), "location should end in /new: {r}");

    let r = w.get_path(vip, "/v1/books/42", &[])?;
    ensure!(r["status"] == 200 && r["body"]["path"] == "/api/42/books", "regex rewrite: {r}");

    let r = w.get_path(vip, "/p/x?debug=1", &["x-secret: s3cret"])?;
    ensure!(r["status"] == 200, "{r}");
    let seen = &r["body"];
    ensure!(seen["path"] == "/q/x?debug=1", "prefix rewrite: {seen}");
    ensure!(seen["headers"]["host"] == "internal.web", "authority rewrite: {seen}");
    ensure!(
        seen["headers"]["x-routed-by"] == "vs" && seen["headers"]["x-secret"].is_null(),
        "request headers: {seen}"
    );
    ensure!(r["headers"]["x-served"] == "web", "response header: {r}");
    // The same path without the query parameter is not that rule's: the catch-all, unchanged.
    let r = w.get_path(vip, "/p/x", &["x-secret: s3cret"])?;
    ensure!(r["body"]["path"] == "/p/x" && r["body"]["headers"]["x-secret"] == "s3cret", "catch-all: {r}");

    let r = w.get_path(vip, "/tea", &[])?;
    ensure!(r["status"] == 418 && r["body"] == "short and stout", "direct response: {r}");
    eprintln!(
        "redirect, regex rewrite, prefix + authority rewrite with headers, direct response: as written"
    );
    Ok(())
}

/// gRPC through a VirtualService: `retryOn` names gRPC statuses (retried on `unavailable`, not
/// on `cancelled`, whatever the HTTP status 200 says), and `fault.abort.grpcStatus` answers
/// the gRPC client with that status without reaching the server.
#[test]
fn grpc_retry_conditions_and_grpc_status_aborts() -> Result<()> {
    let mut w = World::new()?;
    let pods = [w.pod("grpc-0", "grpc", "v1")?, w.pod("grpc-1", "grpc", "v1")?];
    for (i, p) in pods.iter().enumerate() {
        w.servers.push(start_grpc_server(p, 50051, &format!("grpc-{i}"))?);
    }
    w.service("grpc", "10.96.2.80", ("grpc", 50051, 50051), "kubernetes.io/h2c", &[&pods[0], &pods[1]])?;
    let to = addr("10.96.2.80", 50051);
    let vs = |rule: &str| {
        virtual_service(
            "grpc",
            &format!(
                "  hosts:\n  - grpc\n  http:\n  - {}    route:\n    - destination:\n        host: grpc\n",
                rule.trim_start()
            ),
        )
    };
    let calls = 10u64;
    // Every call fails with UNAVAILABLE (14) at the server (the client asks for it).
    let failing = ["--fail-code", "14"];

    w.apply("vs-grpc.yaml", &vs("retries:\n      attempts: 2\n      retryOn: unavailable\n"))?;
    let before = counter(&w.sluice, "http_retries")?;
    let s = grpc_client(&w.client, to, calls, 1, &failing)?;
    ensure!(s.statuses.get("UNAVAILABLE") == Some(&calls), "{s:?}");
    let on_unavailable = counter(&w.sluice, "http_retries")? - before;
    ensure!(
        on_unavailable == 2 * calls,
        "retryOn unavailable: {on_unavailable} retries for {calls} calls (expected 2 each)"
    );

    w.apply("vs-grpc.yaml", &vs("retries:\n      attempts: 2\n      retryOn: cancelled,5xx\n"))?;
    let before = counter(&w.sluice, "http_retries")?;
    let s = grpc_client(&w.client, to, calls, 1, &failing)?;
    ensure!(s.statuses.get("UNAVAILABLE") == Some(&calls), "{s:?}");
    let on_other = counter(&w.sluice, "http_retries")? - before;
    ensure!(on_other == 0, "retryOn cancelled,5xx must not retry UNAVAILABLE: {on_other} retries");

    w.apply("vs-grpc.yaml", &vs("fault:\n      abort:\n        grpcStatus: RESOURCE_EXHAUSTED\n        percentage:\n          value: 100\n"))?;
    let s = grpc_client(&w.client, to, calls, 1, &[])?;
    ensure!(s.statuses.get("RESOURCE_EXHAUSTED") == Some(&calls), "abort grpcStatus: {s:?}");
    ensure!(s.by_server.is_empty(), "an aborted call must not reach a server: {s:?}");
    eprintln!("gRPC: retryOn unavailable → {on_unavailable} retries for {calls} calls; retryOn cancelled,5xx → {on_other}; abort → {:?}", s.statuses);
    Ok(())
}

/// A VirtualService whose host is a ServiceEntry's (`api.ext.test`, STATIC endpoints): the
/// client dials the entry's address; a header match sends it to a Service instead, the rest
/// goes to the entry's endpoint.
#[test]
fn a_service_entry_host_routed_by_a_virtual_service() -> Result<()> {
    let mut w = World::new()?;
    let ext = w.http_pod("ext-v1", "ext", "v1")?;
    let v2 = w.http_pod("ext-v2", "ext", "v2")?;
    w.service("ext-v2", "10.96.2.91", ("http", 8080, HTTP_PORT), "http", &[&v2])?;
    let entry = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: ext
  namespace: shop
spec:
  hosts:
  - api.ext.test
  addresses:
  - 192.0.2.50
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - number: 8080
    name: http
    protocol: HTTP
  endpoints:
  - address: {}
"#,
        ext.ip()
    );
    w.apply("se-ext.yaml", &entry)?;
    let spec = r#"  hosts:
  - api.ext.test
  http:
  - match:
    - headers:
        x-version:
          exact: v2
    route:
    - destination:
        host: ext-v2
        port:
          number: 8080
  - route:
    - destination:
        host: api.ext.test
"#;
    w.apply("vs-ext.yaml", &virtual_service("ext", spec))?;
    let to = addr("192.0.2.50", 8080);
    let plain = count_by_backend(&w.get(to, 50, true, &[])?)?;
    ensure!(plain.get("ext-v1") == Some(&50), "the entry's endpoint: {plain:?}");
    let v2s = count_by_backend(&w.get(to, 50, true, &["x-version: v2"])?)?;
    ensure!(v2s.get("ext-v2") == Some(&50), "the header match's Service: {v2s:?}");
    eprintln!("ServiceEntry api.ext.test: {plain:?}; with x-version v2: {v2s:?}");
    Ok(())
}
