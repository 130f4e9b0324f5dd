//! Tests of the node simulator itself (no sluice): the network it builds carries real traffic,
//! processes land in the right netns and cgroup, the control plane serves the API to the nodes
//! and runs the CA service, and nothing survives teardown or a sweep. Needs root (network
//! namespaces, cgroups), and the sluice binary for `sluice ca init` (the sim's roots).
//!
//! Tests in this file run in parallel threads of one process, so none of them calls the global
//! `sweep()`: it would tear down the other tests' live sims. They use `sweep_where` /
//! `leftovers_of` on their own sim id, which run the same code.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::PathBuf,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use sluice_tests::{
    http_probe, leftovers_of, pki, sweep_where, CaOpts, LeftoverKind, PodOpts, Signal, Sim,
    SluiceOpts,
};

const T: Duration = Duration::from_secs(10);
const MIB: u64 = 1024 * 1024;

/// Runs tcp-client in `from` against `to` and checks a byte-exact echo round trip.
fn echo_round_trip(
    from: &sluice_tests::Pod,
    to: std::net::SocketAddr,
    bytes: u64,
) -> Result<Value> {
    let out = from.run_simpod([
        "tcp-client",
        "--to",
        &to.to_string(),
        "--send-bytes",
        &bytes.to_string(),
    ])?;
    out.check()?;
    let r = out.json()?;
    ensure!(r["ok"] == true, "client failed: {r}");
    ensure!(
        r["sent"] == bytes && r["received"] == bytes,
        "byte counts: {r}"
    );
    ensure!(
        r["sha256_sent"] == r["sha256_received"],
        "echoed bytes differ: {r}"
    );
    ensure!(r["peer"] == to.to_string(), "peer {} != {to}", r["peer"]);
    let local_ip = r["local"]
        .as_str()
        .unwrap_or_default()
        .rsplit_once(':')
        .map(|(ip, _)| ip)
        .unwrap_or_default();
    ensure!(
        local_ip == from.ip().to_string(),
        "client address {local_ip} is not the pod IP {}",
        from.ip()
    );
    Ok(r)
}

fn pid_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn cgroup_of(pid: u32) -> Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
        .context("no cgroup v2 line")
}

fn netns_of(pid: u32) -> Result<u64> {
    Ok(fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

#[test]
fn two_pods_on_one_node_exchange_a_mebibyte() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let server = n1.add_pod("demo", "server", PodOpts::labels(&[("app", "echo")]))?;
    let client = n1.add_pod("demo", "client", PodOpts::default())?;
    assert_eq!(server.ip().to_string(), "10.244.1.10");
    assert_eq!(client.ip().to_string(), "10.244.1.11");

    let mut echo = server.simpod(["echo-server", "--port", "7000"])?;
    echo.wait_listening(T)?;
    echo_round_trip(&client, server.addr(7000), MIB)?;
    // The server saw the client's own pod address: nothing NATs on the way.
    let accepted = echo.wait_for_json(T, |v| v["event"] == "accepted")?;
    assert_eq!(
        accepted["peer"]
            .as_str()
            .unwrap()
            .split(':')
            .next()
            .unwrap(),
        client.ip().to_string()
    );
    Ok(())
}

#[test]
fn pods_reach_each_other_across_nodes() -> Result<()> {
    let sim = Sim::new()?;
    let nodes = [
        sim.add_node("n1")?,
        sim.add_node("n2")?,
        sim.add_node("n3")?,
    ];
    let pods = nodes
        .iter()
        .map(|n| n.add_pod("demo", &format!("p-{}", n.short_name()), PodOpts::default()))
        .collect::<Result<Vec<_>>>()?;
    assert_eq!(pods[1].ip().to_string(), "10.244.2.10");
    let mut servers = Vec::new();
    for p in &pods {
        let mut s = p.simpod(["echo-server", "--port", "7000"])?;
        s.wait_listening(T)?;
        servers.push(s);
    }
    // 1 → 2 (routes added when n2 joined), 3 → 1 and 1 → 3 (routes added to existing nodes
    // when n3 joined), 2 → 3.
    for (a, b) in [(0, 1), (2, 0), (0, 2), (1, 2)] {
        echo_round_trip(&pods[a], pods[b].addr(7000), 64 * 1024)
            .with_context(|| format!("{} -> {}", pods[a].name(), pods[b].name()))?;
    }
    Ok(())
}

#[test]
fn processes_are_placed_in_the_pod_netns_and_cgroup() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let pod = n1.add_pod(
        "shop",
        "web",
        PodOpts::labels(&[("app", "web")]).service_account("web-sa"),
    )?;

    let pod_ns = fs::metadata(format!("/run/netns/{}", pod.netns()))?.ino();
    let rel = |p: &std::path::Path| -> String {
        format!(
            "/{}",
            p.strip_prefix(sluice_tests::cgroup::cgroup2_mount().unwrap())
                .unwrap()
                .display()
        )
    };
    assert!(pod
        .cgroup_path()
        .ends_with(format!("kubepods/besteffort/pod{}", pod.uid())));

    // The sandbox is what sluice finds the pod's netns through.
    let procs = fs::read_to_string(pod.cgroup_path().join("cgroup.procs"))?;
    assert!(
        procs.lines().any(|l| l == pod.sandbox_pid().to_string()),
        "sandbox not in {procs}"
    );
    assert_eq!(netns_of(pod.sandbox_pid())?, pod_ns);

    let mut p = pod.spawn(["sleep", "60"])?;
    assert_eq!(cgroup_of(p.pid())?, rel(pod.cgroup_path()));
    assert_eq!(netns_of(p.pid())?, pod_ns);
    p.kill(Signal::SIGKILL)?;
    assert!(!p.wait(T)?.success());

    let mut q = n1.spawn(["sleep", "60"])?;
    assert_eq!(cgroup_of(q.pid())?, rel(&n1.system_cgroup()));
    assert_eq!(
        netns_of(q.pid())?,
        fs::metadata(format!("/run/netns/{}", n1.netns()))?.ino()
    );
    q.kill(Signal::SIGTERM)?;

    // The pod network as the brief fixes it.
    let out = pod.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
    assert!(
        out.check()?.stdout.contains("10.244.1.10/24"),
        "{}",
        out.stdout
    );
    let out = pod.run(["ip", "route", "show", "default"])?;
    assert!(
        out.check()?.stdout.contains("via 10.244.1.1"),
        "{}",
        out.stdout
    );

    // The manifest, as a Kubernetes client would read it.
    let yaml = fs::read_to_string(sim.manifest_dir().join("pod-shop-web.yaml"))?;
    let m: Value = serde_yaml_ng::from_str(&yaml)?;
    assert_eq!(m["kind"], "Pod");
    assert_eq!(m["metadata"]["uid"], pod.uid());
    assert_eq!(m["metadata"]["labels"]["app"], "web");
    assert_eq!(m["spec"]["nodeName"], n1.name());
    assert_eq!(m["spec"]["serviceAccountName"], "web-sa");
    assert_eq!(m["status"]["podIP"], "10.244.1.10");
    assert_eq!(m["status"]["phase"], "Running");

    sim.write_namespace("shop", true)?;
    sim.write_service("shop", "web", "10.96.0.10", &[("http", 80, 8080)], &[&pod])?;
    let ns: Value = serde_yaml_ng::from_str(&fs::read_to_string(
        sim.manifest_dir().join("ns-shop.yaml"),
    )?)?;
    assert_eq!(ns["metadata"]["annotations"]["sluice.dev/mesh"], "enabled");
    let svc = fs::read_to_string(sim.manifest_dir().join("svc-shop-web.yaml"))?;
    assert!(
        svc.contains("EndpointSlice") && svc.contains("10.244.1.10"),
        "{svc}"
    );

    // Deleting the pod takes everything of it, and only it.
    pod.delete()?;
    assert!(!sim.manifest_dir().join("pod-shop-web.yaml").exists());
    assert!(!pod.cgroup_path().exists());
    assert!(!std::path::Path::new(&format!("/run/netns/{}", pod.netns())).exists());
    assert!(!pid_alive(pod.sandbox_pid()));
    assert!(pod.spawn(["true"]).is_err());
    Ok(())
}

#[test]
fn http_server_and_client_speak_keepalive() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let server = n1.add_pod("demo", "api", PodOpts::default())?;
    let client = n1.add_pod("demo", "cli", PodOpts::default())?;
    let mut srv = server.simpod(["http-server", "--port", "8080", "--name", "api-1"])?;
    srv.wait_listening(T)?;
    let out = client.run_simpod([
        "http-get",
        "--to",
        &server.addr(8080).to_string(),
        "--path",
        "/hello?x=1",
        "--count",
        "3",
        "--keepalive",
        "--header",
        "x-test: yes",
    ])?;
    let lines = out.check()?.json_lines()?;
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["body"]["name"], "api-1");
        assert_eq!(l["body"]["path"], "/hello?x=1");
        assert_eq!(l["body"]["headers"]["x-test"], "yes");
        // One connection for all three requests.
        assert_eq!(l["local"], lines[0]["local"]);
        assert_eq!(l["body"]["peer"], lines[0]["local"]);
    }
    let out = client.run_simpod([
        "http-get",
        "--to",
        &server.addr(8080).to_string(),
        "--path",
        "/?status=503",
    ])?;
    assert_eq!(out.check()?.json()?["status"], 503);
    Ok(())
}

#[test]
fn hold_and_loop_clients() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let server = n1.add_pod("demo", "echo", PodOpts::default())?;
    let client = n1.add_pod("demo", "cli", PodOpts::default())?;
    let mut echo = server.simpod(["echo-server", "--port", "7000"])?;
    echo.wait_listening(T)?;

    let mut hold = client.simpod(["hold", "--to", &server.addr(7000).to_string()])?;
    let c = hold.wait_for_json(T, |v| v["event"] == "connected")?;
    assert_eq!(c["peer"], server.addr(7000).to_string());
    hold.send_line("hello")?;
    assert_eq!(
        hold.wait_for_json(T, |v| v["event"] == "echo")?["data"],
        "hello"
    );
    hold.close_stdin();
    assert!(hold.wait(T)?.success());

    let out = client.run_simpod([
        "loop",
        "--to",
        &server.addr(7000).to_string(),
        "--interval-ms",
        "10",
        "--count",
        "3",
    ])?;
    let lines = out.check()?.json_lines()?;
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["ok"] == true), "{lines:?}");

    // Nothing listens on 7001: the error names the io::ErrorKind.
    let out = client.run_simpod(["tcp-client", "--to", &server.addr(7001).to_string()])?;
    assert!(!out.success());
    let r = out.json()?;
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("ConnectionRefused"),
        "{r}"
    );
    Ok(())
}

/// The address part of `ip:port` / `[ip]:port` as simpod prints it (an IPv6 one without its
/// brackets, with its `%scope` if it has one).
fn host_of(addr: &Value) -> String {
    let s = addr.as_str().unwrap_or_default();
    let host = s.rsplit_once(':').map_or(s, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

#[test]
fn dual_stack_pods_speak_ipv6_across_nodes_and_over_link_local() -> Result<()> {
    let sim = Sim::new_dual_stack()?;
    assert!(sim.is_dual_stack());
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    let client = n1.add_pod("demo", "client", PodOpts::default())?;
    let neighbour = n1.add_pod("demo", "neighbour", PodOpts::default())?;
    let server = n2.add_pod("demo", "server", PodOpts::default())?;
    assert_eq!(n1.bridge_ip6()?.to_string(), "fd00:10:244:1::1");
    assert_eq!(n2.uplink_ip6()?.to_string(), "fd00:10:243::2");
    assert_eq!(n2.pod_cidr6()?, "fd00:10:244:2::/64");
    assert_eq!(client.ip6()?.to_string(), "fd00:10:244:1::10");
    assert_eq!(neighbour.ip6()?.to_string(), "fd00:10:244:1::11");
    assert_eq!(server.ip6()?.to_string(), "fd00:10:244:2::10");
    assert_eq!(server.addr6(8080)?.to_string(), "[fd00:10:244:2::10]:8080");

    // The pod manifest lists both addresses, IPv4 first.
    let manifest = fs::read_to_string(sim.manifest_dir().join(server.manifest_file()))?;
    let doc: Value = serde_yaml_ng::from_str(&manifest)?;
    assert_eq!(doc["status"]["podIP"], "10.244.2.10", "{manifest}");
    assert_eq!(
        doc["status"]["podIPs"],
        serde_json::json!([{"ip": "10.244.2.10"}, {"ip": "fd00:10:244:2::10"}]),
        "{manifest}"
    );
    assert_eq!(
        server.ips(),
        [server.ip().into(), std::net::IpAddr::from(server.ip6()?)]
    );

    // One server on both families (`::` is a dual-stack socket).
    let mut srv = server.simpod([
        "http-server",
        "--port",
        "8080",
        "--bind",
        "::",
        "--name",
        "srv",
    ])?;
    srv.wait_listening(T)?;
    // Across nodes over IPv6, no NAT: the server sees the client's own IPv6 address. The
    // addresses are usable at once (no DAD), so the first attempt must work.
    let out = client.run_simpod([
        "http-get",
        "--to",
        &server.addr6(8080)?.to_string(),
        "--count",
        "2",
        "--keepalive",
    ])?;
    let lines = out.check()?.json_lines()?;
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["body"]["name"], "srv");
        assert_eq!(host_of(&l["local"]), client.ip6()?.to_string(), "{l}");
        assert_eq!(
            host_of(&l["body"]["peer"]),
            client.ip6()?.to_string(),
            "{l}"
        );
    }
    // IPv4 still works in a dual-stack sim, to the same socket.
    let out = client.run_simpod(["http-get", "--to", &server.addr(8080).to_string()])?;
    let r = out.check()?.json()?;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(
        host_of(&r["body"]["peer"]),
        format!("::ffff:{}", client.ip()),
        "{r}"
    );

    // Within one node over link-local, scoped to the client's eth0.
    let ll = neighbour.link_local()?;
    assert!(ll.is_unicast_link_local(), "{ll}");
    let client_ll = client.link_local()?;
    assert_ne!(ll, client_ll);
    let mut near = neighbour.simpod([
        "http-server",
        "--port",
        "8081",
        "--bind",
        "::",
        "--name",
        "near",
    ])?;
    near.wait_listening(T)?;
    let out = client.run_simpod(["http-get", "--to", &format!("[{ll}%eth0]:8081")])?;
    let r = out.check()?.json()?;
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"]["name"], "near");
    let peer = host_of(&r["body"]["peer"]);
    assert!(
        peer.starts_with(&format!("{client_ll}%")),
        "the server sees the client's link-local address: {r}"
    );
    // Link-local never leaves the link: the server on the other node is not reachable so.
    let far_ll = server.link_local()?;
    let out = client.run_simpod([
        "tcp-client",
        "--to",
        &format!("[{far_ll}%eth0]:8080"),
        "--timeout-ms",
        "1500",
    ])?;
    assert!(!out.success(), "{}", out.stdout);
    // A name simpod cannot resolve is a clear error, not a panic.
    let out = client.run_simpod(["tcp-client", "--to", &format!("[{ll}%nosuch0]:8081")])?;
    assert!(!out.success());
    assert!(
        out.stderr.contains("no interface \"nosuch0\""),
        "{}",
        out.stderr
    );

    // The IPv6 set-up lives in the sim's namespaces: teardown takes all of it.
    let (id, temp) = (sim.id().to_string(), sim.temp_dir().to_path_buf());
    drop((srv, near, client, neighbour, server, n1, n2));
    sim.teardown()?;
    let left = leftovers_of(&id);
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(!temp.exists(), "{} still exists", temp.display());
    Ok(())
}

#[test]
fn ipv4_only_sims_have_link_local_but_no_global_ipv6() -> Result<()> {
    let sim = Sim::new()?;
    assert!(!sim.is_dual_stack());
    let n1 = sim.add_node("n1")?;
    let pod = n1.add_pod("demo", "p", PodOpts::default())?;
    let e = pod.ip6().unwrap_err().to_string();
    assert!(
        e.contains("its sim is IPv4-only (create it with Sim::new_dual_stack())"),
        "{e}"
    );
    assert!(pod.addr6(80).is_err());
    assert!(n1.bridge_ip6().is_err());
    assert_eq!(pod.ips(), [std::net::IpAddr::from(pod.ip())]);
    let manifest = fs::read_to_string(sim.manifest_dir().join(pod.manifest_file()))?;
    let doc: Value = serde_yaml_ng::from_str(&manifest)?;
    assert_eq!(
        doc["status"]["podIPs"],
        serde_json::json!([{"ip": pod.ip().to_string()}])
    );
    // The kernel's link-local address, once DAD is done with it (about a second here).
    assert!(pod.link_local()?.is_unicast_link_local());
    // A dual-stack Service needs IPv6 endpoints.
    let e = sim
        .write_service_ips(
            "demo",
            "web",
            &["10.96.0.10", "fd00:10:96::10"],
            &[("http", 80, 8080)],
            &[&pod],
        )
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("endpoint demo/p has no IPv6 address"),
        "{e:#}"
    );
    Ok(())
}

#[test]
fn sluice_on_a_dual_stack_node_shows_both_families_in_its_model() -> Result<()> {
    let sim = Sim::new_dual_stack()?;
    let n1 = sim.add_node("n1")?;
    let web = n1.add_pod("shop", "web", PodOpts::labels(&[("app", "web")]))?;
    let client = n1.add_pod("shop", "client", PodOpts::default())?;
    sim.write_namespace("shop", true)?;
    sim.write_service_ips(
        "shop",
        "web",
        &["10.96.0.10", "fd00:10:96::10"],
        &[("http", 80, 8080)],
        &[&web],
    )?;
    let sluice = n1.start_sluice(SluiceOpts::default())?;
    sluice.wait_ready(T)?;
    let m = sluice.wait_for(
        "/model",
        |m| {
            m["pods"].as_array().is_some_and(|p| p.len() == 2)
                && m["services"].as_array().is_some_and(|s| s.len() == 1)
                && m["endpoint_slices"]
                    .as_array()
                    .is_some_and(|s| s.len() == 2)
        },
        T,
    )?;
    assert_eq!(m["errors"], serde_json::json!([]), "{m}");
    for pod in [&web, &client] {
        let v = m["pods"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == pod.name()))
            .with_context(|| format!("pod {} in {m}", pod.name()))?;
        assert_eq!(v["ip"], pod.ip().to_string(), "{v}");
        assert_eq!(
            v["ips"],
            serde_json::json!([pod.ip().to_string(), pod.ip6()?.to_string()]),
            "{v}"
        );
    }
    let svc = &m["services"][0];
    assert_eq!(svc["cluster_ip"], "10.96.0.10", "{svc}");
    assert_eq!(
        svc["cluster_ips"],
        serde_json::json!(["10.96.0.10", "fd00:10:96::10"]),
        "{svc}"
    );
    let slices = m["endpoint_slices"].as_array().context("slices")?;
    let slice = |family: &str| {
        slices
            .iter()
            .find(|s| s["address_type"] == family)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        slice("IPv4")["ready_addresses"],
        serde_json::json!([web.ip().to_string()]),
        "{m}"
    );
    assert_eq!(
        slice("IPv6")["ready_addresses"],
        serde_json::json!([web.ip6()?.to_string()]),
        "{m}"
    );
    // Both pods are enrolled as on an IPv4-only node.
    sluice.wait_for("/pods", |v| v.as_array().is_some_and(|p| p.len() == 2), T)?;
    Ok(())
}

/// A stand-in for sluice (perl is always on Debian): serves the admin API on the unix socket and
/// reports where it runs, so the `Sluice` handle is checked without the real daemon.
const FAKE_SLUICE: &str = r#"#!/usr/bin/perl
use strict; use warnings; use IO::Socket::UNIX; use Socket;
my %a; for (my $i = 0; $i < @ARGV; $i++) { $a{$ARGV[$i]} = $ARGV[$i + 1] if $ARGV[$i] =~ /^--/ }
my $sock = $a{'--admin-socket'}; unlink $sock;
my $srv = IO::Socket::UNIX->new(Type => SOCK_STREAM, Local => $sock, Listen => 16) or die "listen $sock: $!";
print STDERR "fake sluice listening on $sock\n";
my $ns = readlink("/proc/self/ns/net");
open(my $f, "<", "/proc/self/cgroup") or die; my $cg = ""; while (<$f>) { $cg = $1 if /^0::(.*)$/ }
my $args = join(" ", @ARGV);
while (my $c = $srv->accept) {
  my $req = ""; while (my $l = <$c>) { $req .= $l; last if $l eq "\r\n" }
  my ($path) = $req =~ /^GET (\S+)/;
  my $body = qq({"ready":true,"node":"$a{'--node'}","netns":"$ns","cgroup":"$cg","path":"$path","args":"$args"});
  print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    sprintf("%x\r\n%s\r\n0\r\n\r\n", length($body), $body);
  close $c;
}
"#;

#[test]
fn sluice_handle_runs_the_daemon_in_the_node() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let fake = sim.temp_dir().join("fake-sluice");
    fs::write(&fake, FAKE_SLUICE)?;
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755))?;
    let sluice = n1.start_sluice(SluiceOpts {
        bin: Some(fake),
        fail_closed: true,
        ..Default::default()
    })?;

    let st = sluice.wait_ready(T)?;
    assert_eq!(st["node"], n1.name());
    assert_eq!(st["path"], "/status");
    let node_ns = fs::metadata(format!("/run/netns/{}", n1.netns()))?.ino();
    assert_eq!(st["netns"], format!("net:[{node_ns}]"));
    assert_eq!(st["cgroup"], format!("/sluice-sim/{}/n1/system", sim.id()));
    let args = st["args"].as_str().unwrap();
    assert!(args.starts_with("run --node "), "{args}");
    assert!(
        args.contains(&format!("--manifests {}", sim.manifest_dir().display())),
        "{args}"
    );
    assert!(
        args.contains(&format!("--cgroup-root {}", n1.cgroup_root().display())),
        "{args}"
    );
    assert!(args.ends_with("--fail-closed"), "{args}");
    assert_eq!(sluice.get_json("/pods")?["path"], "/pods");
    assert!(sluice.log_contents().contains("fake sluice listening"));

    sluice.kill(Signal::SIGKILL)?;
    sluice.wait_exit(T)?;
    let err = format!("{:#}", sluice.wait_ready(T).unwrap_err());
    assert!(err.contains("exited"), "{err}");

    sluice.restart()?;
    sluice.wait_ready(T)?;
    assert!(
        sluice.log_path().ends_with("sluice-n1-2.log"),
        "{}",
        sluice.log_path().display()
    );
    Ok(())
}

#[test]
fn teardown_after_a_panic_leaves_nothing() {
    let mut seen: Option<(String, PathBuf, Vec<u32>)> = None;
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let sim = Sim::new().unwrap();
        let n1 = sim.add_node("n1").unwrap();
        let n2 = sim.add_node("n2").unwrap();
        let a = n1.add_pod("demo", "a", PodOpts::default()).unwrap();
        let b = n2.add_pod("demo", "b", PodOpts::default()).unwrap();
        // Grandchildren this process holds no handle on: only the cgroup kill reaches them.
        let _sh = a
            .spawn(["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
            .unwrap();
        let mut echo = b.simpod(["echo-server", "--port", "7000"]).unwrap();
        echo.wait_listening(T).unwrap();
        // sh forks its sleeps on its own time: wait for all six processes (two sandboxes, sh,
        // two sleeps, echo-server), or take what is there after T and let the check below fail.
        let tree = || {
            sluice_tests::cgroup::pids_in_tree(sim.cgroup_root())
                .into_iter()
                .map(|p| p as u32)
                .collect::<Vec<_>>()
        };
        let pids = sluice_tests::poll_until(T, || Some(tree()).filter(|p| p.len() >= 6))
            .unwrap_or_else(tree);
        seen = Some((sim.id().to_string(), sim.temp_dir().to_path_buf(), pids));
        panic!("deliberate panic inside a test body");
    }));
    assert!(res.is_err());
    let (id, temp, pids) = seen.expect("the body ran up to the panic");
    assert!(
        pids.len() >= 6,
        "sandboxes, sh, two sleeps, echo-server: {pids:?}"
    );
    let left = leftovers_of(&id);
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(!temp.exists(), "{} still exists", temp.display());
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} survived");
    }
    assert!(!sluice_tests::netns::list()
        .iter()
        .any(|n| n.starts_with(&id)));
    assert!(!sluice_tests::cgroup::sim_cgroup_parent()
        .unwrap()
        .join(&id)
        .exists());
}

#[test]
fn sweep_removes_a_leaked_sim() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let pod = n1.add_pod("demo", "leaky", PodOpts::default())?;
    let sandbox = pod.sandbox_pid();
    let id = sim.id().to_string();
    let temp = sim.temp_dir().to_path_buf();
    // The handle holding the process goes too: as if the test process had been killed.
    let sleeper = pod.spawn(["sleep", "1000"])?;
    let sleeper_pid = sleeper.pid();
    std::mem::forget(sleeper);
    std::mem::forget(sim);

    let found = leftovers_of(&id);
    let count = |k| found.iter().filter(|l| l.kind == k).count();
    assert_eq!(
        count(LeftoverKind::Netns),
        3,
        "fabric, node, pod: {found:#?}"
    );
    assert_eq!(count(LeftoverKind::Cgroup), 1, "{found:#?}");
    assert!(
        count(LeftoverKind::Process) >= 2,
        "sandbox and sleep: {found:#?}"
    );

    let swept = sweep_where(|s| s == id);
    assert_eq!(swept.len(), found.len(), "{swept:#?}");
    assert!(
        swept.iter().any(|d| d.contains(&format!("{id}-n1-leaky"))),
        "{swept:#?}"
    );
    assert!(leftovers_of(&id).is_empty(), "{:#?}", leftovers_of(&id));
    assert!(!pid_alive(sandbox));
    // Both were children of this process, whose handles were forgotten: reap them here.
    for pid in [sandbox, sleeper_pid] {
        nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None)?;
    }
    // Sweep leaves temp dirs alone (they may hold logs someone kept on purpose).
    fs::remove_dir_all(temp)?;
    Ok(())
}

/// A stand-in for `sluice ca serve` (perl): serves HTTP on its `--metrics-addr`, answering every
/// GET with where it runs and its arguments, and logs SIGHUP, so the `CaService` handle and the
/// control plane's plumbing are checked without the real CA service.
const FAKE_CA: &str = r#"#!/usr/bin/perl
use strict; use warnings; use IO::Socket::INET;
my %a; for (my $i = 0; $i < @ARGV; $i++) { $a{$ARGV[$i]} = $ARGV[$i + 1] if $ARGV[$i] =~ /^--/ }
my ($host, $port) = $a{'--metrics-addr'} =~ /^(.*):(\d+)$/ or die "no --metrics-addr";
$SIG{HUP} = sub { print STDERR "fake ca: SIGHUP\n" };
my $srv = IO::Socket::INET->new(LocalAddr => $host, LocalPort => $port, Listen => 16, ReuseAddr => 1)
  or die "listen $host:$port: $!";
print STDERR "fake ca listening on $host:$port\n";
my $ns = readlink("/proc/self/ns/net");
open(my $f, "<", "/proc/self/cgroup") or die; my $cg = ""; while (<$f>) { $cg = $1 if /^0::(.*)$/ }
my $args = join(" ", @ARGV);
while (1) {
  my $c = $srv->accept or next;
  my $req = ""; while (my $l = <$c>) { $req .= $l; last if $l eq "\r\n" }
  my ($path) = $req =~ /^GET (\S+)/;
  my $body = qq({"path":"$path","netns":"$ns","cgroup":"$cg","args":"$args"});
  print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ", length($body), "\r\n\r\n", $body;
  close $c;
}
"#;

fn write_script(sim: &Sim, name: &str, text: &str) -> Result<PathBuf> {
    let path = sim.temp_dir().join(name);
    fs::write(&path, text)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

fn netns_inode(name: &str) -> Result<u64> {
    Ok(fs::metadata(format!("/run/netns/{name}"))?.ino())
}

/// The control plane is a namespace on the fabric: every node reaches its API server (nodes
/// added before and after it), it reaches every node's pods, and every pod of the sim is an
/// object of its API server, with node, ServiceAccount, phase and IP, until deleted.
#[test]
fn control_plane_serves_the_api_to_the_nodes_and_mirrors_the_pods() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let web = n1.add_pod(
        "shop",
        "web",
        PodOpts::labels(&[("app", "web")]).service_account("web"),
    )?;
    let cp = sim.add_control_plane()?;
    assert!(sim.add_control_plane().is_err(), "one control plane per sim");
    assert!(sim.add_node("cp").is_err(), "a node may not take the control plane's name");
    let n2 = sim.add_node("n2")?;
    let db = n2.add_pod("shop", "db", PodOpts::default().service_account("db"))?;
    assert_eq!(cp.netns(), format!("{}-cp", sim.id()));
    assert_eq!(cp.api_url(), "http://10.243.0.254:6443");
    assert_eq!(cp.ca_url(), "https://10.243.0.254:15012");

    // From both nodes' namespaces, over the fabric.
    for n in [&n1, &n2] {
        let r = http_probe::get_in(n.netns(), cp.api_addr(), "/version", T)?;
        ensure!(r.status == 200, "GET /version from {}: {r:?}", n.short_name());
        assert_eq!(r.json()?["gitVersion"], "v1.35.1");
    }
    // The control plane reaches pods on both nodes, without NAT.
    let mut servers = Vec::new();
    for p in [&web, &db] {
        let mut s = p.simpod(["http-server", "--port", "8080", "--name", p.name()])?;
        s.wait_listening(T)?;
        servers.push(s);
        let r = cp.http_get(p.addr(8080), "/", T)?;
        assert_eq!(r.status, 200);
        let body = r.json()?;
        assert_eq!(body["name"], p.name());
        assert!(
            body["peer"].as_str().unwrap().starts_with("10.243.0.254:"),
            "{body}"
        );
    }

    // Both pods are API objects: the one made before the control plane too.
    for (p, node) in [(&web, &n1), (&db, &n2)] {
        let o = cp.api().get("Pod", "shop", p.name()).context("mirrored")?;
        assert_eq!(o["metadata"]["uid"], p.uid());
        assert_eq!(o["spec"]["nodeName"], node.name());
        assert_eq!(o["spec"]["serviceAccountName"], p.service_account());
        assert_eq!(o["status"]["phase"], "Running");
        assert_eq!(o["status"]["podIP"], p.ip().to_string());
    }
    // A cluster-wide watch's view, per node, as the CA lists it.
    let target = format!(
        "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
        n2.name()
    );
    let list = http_probe::get_in(n1.netns(), cp.api_addr(), &target, T)?.json()?;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db"]);
    assert_eq!(sim.pods().len(), 2);

    db.delete()?;
    assert!(cp.api().get("Pod", "shop", "db").is_none(), "deleted with the pod");
    assert_eq!(sim.pods().len(), 1);

    // Teardown takes the control plane with the rest, even while a handle on it is held.
    let id = sim.id().to_string();
    drop(servers);
    drop(sim);
    assert!(leftovers_of(&id).is_empty(), "{:#?}", leftovers_of(&id));
    drop(cp);
    Ok(())
}

/// Each node's token file is a projected-token volume: a token of the DaemonSet's
/// ServiceAccount for `sluice-ca`, bound to the node agent's pod (an API object on that node)
/// and carrying the node, which a TokenReview from the node authenticates; rotation writes a new
/// one in the same place, and the test can expire or replace it.
#[test]
fn node_tokens_are_projected_bound_and_reviewed() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    let cp = sim.add_control_plane()?;
    let review = |token: &str| -> Result<Value> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": ["sluice-ca"]},
        });
        let r = http_probe::post_json_in(
            cp.netns(),
            cp.api_addr(),
            "/apis/authentication.k8s.io/v1/tokenreviews",
            &body,
            T,
        )?;
        ensure!(r.status == 201, "{r:?}");
        Ok(r.json()?["status"].clone())
    };

    let path = cp.ensure_node_token(&n1)?;
    assert_eq!(
        path,
        sim.temp_dir().join("nodes/n1/sluice-ca/token"),
        "the node's token volume"
    );
    assert_eq!(fs::read_link(&path)?, PathBuf::from("..data/token"));
    let token = fs::read_to_string(&path)?;
    assert_eq!(Some(token.clone()), cp.node_token(&n1));
    assert_eq!(cp.ensure_node_token(&n1)?, path);
    assert_eq!(fs::read_to_string(&path)?, token, "ensure does not rotate");

    let agent = cp.node_agent_pod(&n1)?;
    let pod = cp
        .api()
        .get("Pod", "sluice-system", &agent.name)
        .context("the agent's pod object")?;
    assert_eq!(pod["spec"]["nodeName"], n1.name());
    assert_eq!(pod["spec"]["hostNetwork"], true);
    assert_eq!(pod["spec"]["serviceAccountName"], "sluice");
    assert_eq!(pod["status"]["podIP"], n1.uplink_ip().to_string());
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "DaemonSet");

    let st = review(&token)?;
    assert_eq!(st["authenticated"], true, "{st}");
    assert_eq!(
        st["user"]["username"],
        "system:serviceaccount:sluice-system:sluice"
    );
    let extra = &st["user"]["extra"];
    assert_eq!(extra["authentication.kubernetes.io/node-name"], json!([n1.name()]));
    assert_eq!(extra["authentication.kubernetes.io/pod-name"], json!([agent.name]));
    assert_eq!(extra["authentication.kubernetes.io/pod-uid"], json!([agent.uid]));

    // The kubelet's rotation: same path, new token; the old one stays valid until it expires.
    let rotated = cp.rotate_node_token(&n1)?;
    assert_ne!(rotated, token);
    assert_eq!(fs::read_to_string(&path)?, rotated);
    assert_eq!(review(&token)?["authenticated"], true);
    assert!(cp.api().expire_token(&rotated));
    assert_eq!(
        review(&rotated)?["error"],
        "[invalid bearer token, service account token has expired]"
    );

    // What impostor tests write: node 2's token in node 1's file, another ServiceAccount's.
    let n2_spec = cp.node_agent_token_spec(&n2)?;
    let stolen = cp.write_node_token(&n1, n2_spec.clone())?;
    assert_eq!(
        review(&stolen)?["user"]["extra"]["authentication.kubernetes.io/node-name"],
        json!([n2.name()])
    );
    assert_ne!(
        cp.node_agent_pod(&n2)?.name,
        agent.name,
        "one agent pod per node"
    );
    let mut other_sa = n2_spec;
    other_sa.service_account = ("shop".into(), "web".into());
    let web_token = cp.write_node_token(&n1, other_sa)?;
    assert_eq!(
        review(&web_token)?["user"]["username"],
        "system:serviceaccount:shop:web"
    );
    assert_eq!(cp.api().token_review_count(), 5);
    Ok(())
}

/// The CA service's handle: `sluice ca serve` with the contract's flags, in the control
/// plane's netns and cgroup, signing with an intermediate under the sim's mesh root, ready when
/// `/healthz/ready` answers; reload, kill, restart; a signing chain when there is one.
#[test]
fn ca_service_runs_on_the_control_plane_with_its_signing_files() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let cp = sim.add_control_plane()?;
    let fake = write_script(&sim, "fake-ca", FAKE_CA)?;
    let ca = cp.start_ca(CaOpts {
        bin: Some(fake.clone()),
        args: vec!["--node-rate".into(), "5".into()],
        ..CaOpts::default()
    })?;
    ca.wait_ready(T)?;
    let st = ca.get("/healthz/ready")?.json()?;
    assert_eq!(st["path"], "/healthz/ready");
    assert_eq!(st["netns"], format!("net:[{}]", netns_inode(cp.netns())?));
    assert_eq!(st["cgroup"], format!("/sluice-sim/{}/cp/system", sim.id()));
    let (cert, key) = cp.signing_paths();
    let bundle = sim.trust_bundle_path();
    let want = format!(
        "ca serve --listen 0.0.0.0:15012 --signing-cert {} --signing-key {} --trust-bundle {} \
         --server-name 10.243.0.254 --kube-api http://10.243.0.254:6443 --metrics-addr 0.0.0.0:15014 \
         --node-rate 5",
        cert.display(),
        key.display(),
        bundle.display()
    );
    assert_eq!(st["args"], want.as_str());
    assert!(ca.log_path().ends_with("sluice-ca-1.log"));

    // Signing: an intermediate under the mesh root, its key beside it; the bundle is the root.
    let root = sim.mesh_root()?;
    let signing = pki::cert_info(&fs::read_to_string(&cert)?)?;
    assert!(signing.is_ca);
    assert_eq!(signing.subject, "CN=sluice-ca, O=sluice");
    assert_eq!(signing.issuer, root.info()?.subject);
    assert_eq!(fs::read_to_string(&key)?, cp.default_signing()?.key_pem()?);
    assert_eq!(fs::read_to_string(&bundle)?, pki::bundle_pem(&[&root])?);
    assert_eq!(fs::read_link(&cert)?, PathBuf::from("..data/signing-cert.pem"));

    ca.reload()?;
    sluice_tests::poll_until(T, || ca.log_contents().contains("fake ca: SIGHUP").then_some(()))
        .context("the CA got SIGHUP")?;

    // A node reaches the CA's address (the stand-in serves no gRPC: the port is closed, which
    // is a refusal, not a timeout), and the client trusts the sim's bundle.
    let client = cp.ca_client(&n1)?;
    assert_eq!(client.netns.as_deref(), Some(n1.netns()));
    assert_eq!(client.roots_pem, pki::bundle_pem(&[&sim.mesh_root()?])?);
    let call = sluice_tests::ca_client::CaCall::for_identity("spiffe://cluster.local/ns/a/sa/b", None)?;
    let err = format!("{:#}", client.create_certificate(&call, T).unwrap_err());
    assert!(err.contains("Connection refused"), "{err}");

    ca.kill(Signal::SIGKILL)?;
    ca.wait_exit(T)?;
    let err = format!("{:#}", ca.wait_ready(T).unwrap_err());
    assert!(err.contains("exited"), "{err}");

    // A deeper hierarchy: root B → mid (path length 1) → the CA's intermediate. The chain is
    // passed from the next start on.
    let root_b = sim.make_root("root-b")?;
    let mid = pki::intermediate_ca(
        &root_b,
        &sim.temp_dir().join("pki/mid-b"),
        "mid-b",
        "cluster.local",
        1,
    )?;
    let ca_b = sim.make_intermediate(&mid, "ca-b")?;
    cp.set_signing(&ca_b, &[&mid])?;
    assert_eq!(pki::cert_info(&fs::read_to_string(&cert)?)?.subject, "CN=ca-b, O=sluice");
    ca.restart()?;
    ca.wait_ready(T)?;
    assert!(ca.log_path().ends_with("sluice-ca-2.log"));
    let chain = cp.chain_path()?.context("a chain file")?;
    let args = ca.get("/")?.json()?["args"].as_str().unwrap().to_string();
    assert!(
        args.contains(&format!("--signing-key {} --chain {} --trust-bundle", key.display(), chain.display())),
        "{args}"
    );
    assert_eq!(fs::read_to_string(&chain)?, pki::bundle_pem(&[&mid])?);
    // Back to no chain: the file goes (the next start passes no --chain).
    cp.set_signing(&cp.default_signing()?, &[])?;
    assert!(cp.chain_path()?.is_none());
    assert!(!chain.exists());

    let pid = ca.pid();
    let id = sim.id().to_string();
    drop(ca);
    drop(sim);
    assert!(!pid_alive(pid));
    assert!(leftovers_of(&id).is_empty(), "{:#?}", leftovers_of(&id));
    Ok(())
}

/// A node's sluice with `remote_ca` gets the CA service's address, the sim's trust bundle and
/// its own token file instead of `--ca-dir`; the trust bundle is rewritten in rotation order.
#[test]
fn sluice_with_a_remote_ca_gets_the_ca_flags_and_its_token() -> Result<()> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let fake = write_script(&sim, "fake-sluice", FAKE_SLUICE)?;
    let opts = SluiceOpts {
        bin: Some(fake),
        remote_ca: true,
        ..SluiceOpts::default()
    };
    let err = format!("{:#}", n1.start_sluice(opts.clone()).err().context("needs a control plane")?);
    assert!(err.contains("add_control_plane"), "{err}");

    let cp = sim.add_control_plane()?;
    let sluice = n1.start_sluice(opts)?;
    let st = sluice.wait_ready(T)?;
    let args = st["args"].as_str().unwrap();
    let token = cp.node_token_path(&n1);
    let bundle = sim.trust_bundle_path();
    assert!(
        args.contains(&format!(
            "--ca-addr https://10.243.0.254:15012 --ca-trust-bundle {} --ca-token-file {}",
            bundle.display(),
            token.display()
        )),
        "{args}"
    );
    assert!(!args.contains("--ca-dir"), "{args}");
    assert_eq!(fs::read_to_string(&token)?, cp.node_token(&n1).unwrap());

    // The rotation's bundles: [A], [A, B], [B, A], [B].
    let a = sim.mesh_root()?;
    let b = sim.make_root("root-b")?;
    assert_ne!(a.info()?.serial, b.info()?.serial);
    assert_eq!(fs::read_to_string(&bundle)?, pki::bundle_pem(&[&a])?);
    for roots in [vec![&a, &b], vec![&b, &a], vec![&b]] {
        sim.write_trust_bundle(&roots)?;
        let pem = fs::read_to_string(&bundle)?;
        assert_eq!(pem, pki::bundle_pem(&roots)?);
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), roots.len());
    }
    Ok(())
}

/// In a dual-stack sim the control plane has an IPv6 address too, reaches pods over IPv6, the
/// pods' API objects list both addresses, and the CA's certificate names both addresses.
#[test]
fn dual_stack_control_plane_speaks_both_families() -> Result<()> {
    let sim = Sim::new_dual_stack()?;
    let n1 = sim.add_node("n1")?;
    let cp = sim.add_control_plane()?;
    let web = n1.add_pod("shop", "web", PodOpts::default())?;
    assert_eq!(cp.ip6()?.to_string(), "fd00:10:243::254");
    let mut server = web.simpod([
        "http-server",
        "--port",
        "8080",
        "--bind",
        "::",
        "--name",
        "web",
    ])?;
    server.wait_listening(T)?;
    let r = cp.http_get(web.addr6(8080)?, "/", T)?;
    assert_eq!(r.status, 200);
    assert!(
        r.json()?["peer"]
            .as_str()
            .unwrap()
            .starts_with("[fd00:10:243::254]:"),
        "{}",
        r.text()
    );
    let o = cp.api().get("Pod", "shop", "web").context("mirrored")?;
    assert_eq!(
        o["status"]["podIPs"],
        json!([{"ip": web.ip().to_string()}, {"ip": web.ip6()?.to_string()}])
    );
    let fake = write_script(&sim, "fake-ca", FAKE_CA)?;
    let ca = cp.start_ca(CaOpts {
        bin: Some(fake),
        ..CaOpts::default()
    })?;
    let args: Vec<String> = ca
        .args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let joined = args.join(" ");
    assert!(
        joined.contains("--server-name 10.243.0.254 --server-name fd00:10:243::254"),
        "{joined}"
    );
    ca.wait_ready(T)?;
    Ok(())
}
