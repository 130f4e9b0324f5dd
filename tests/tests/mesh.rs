//! Identity and mutual TLS between nodes (issue 3): two simulated nodes, each with its own
//! sluice, one mesh root CA; traffic between enrolled pods travels as HBONE (HTTP/2 CONNECT in
//! mutual TLS 1.3 on port 15008) with per-pod SPIFFE identities.

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use common::*;
use serde_json::Value;
use sluice_tests::{Node, Pod, PodOpts, Signal, Sim, SimProcess, Sluice, SluiceOpts};

const VIP: &str = "10.96.0.20";
const TD: &str = "cluster.local";

struct Mesh {
    sim: Sim,
    n1: Node,
    n2: Node,
    client: Pod,
    backend: Pod,
    _servers: Vec<SimProcess>,
    s1: Sluice,
    s2: Sluice,
}

fn vip(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().unwrap()
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

/// Client (sa client-sa) on n1, backend (sa web-sa) on n2 behind Service shop/web, both in the
/// enrolled namespace "shop", a sluice on each node.
fn mesh(opts: SluiceOpts) -> Result<Mesh> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    sim.write_namespace("shop", true)?;
    let backend = n2.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]).service_account("web-sa"))?;
    let servers = start_servers(&backend)?;
    sim.write_service("shop", "web", VIP, &[("echo", ECHO_PORT, ECHO_PORT), ("http", HTTP_PORT, HTTP_TARGET_PORT)], &[&backend])?;
    let client = n1.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]).service_account("client-sa"))?;
    let s1 = n1.start_sluice(opts.clone())?;
    let s2 = n2.start_sluice(opts)?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &client)?;
    wait_enrolled(&s2, &backend)?;
    Ok(Mesh { sim, n1, n2, client, backend, _servers: servers, s1, s2 })
}

fn conns_matching(s: &Sluice, pred: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    Ok(s.get_json("/conns")?.as_array().context("conns")?.iter().filter(|c| pred(c)).cloned().collect())
}

/// A packet capture (tcpdump, immediate mode: every packet is in the file as soon as it is
/// seen) on the wire between node 1 and the rest of the cluster: node 1's uplink port (`n1`)
/// in the fabric namespace. (A capture on the fabric bridge itself would only see
/// frames addressed to the bridge, not those it forwards between nodes.)
struct Capture {
    child: std::process::Child,
    file: PathBuf,
}

impl Capture {
    fn start(sim: &Sim) -> Result<Capture> {
        let file = sim.temp_dir().join("fabric.pcap");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &format!("{}-fab", sim.id()), "tcpdump", "-i", "n1", "-U", "--immediate-mode", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (installed by cargo xtask setup)")?;
        // tcpdump says "listening on n1" once the capture runs: wait for that line.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + T;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains("listening on") => break,
                Ok(_) => continue,
                Err(_) => bail!("tcpdump did not start capturing"),
            }
        }
        Ok(Capture { child, file })
    }

    /// Stops the capture and returns the pcap file.
    fn stop(mut self) -> Result<PathBuf> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGINT)?;
        self.child.wait()?;
        Ok(self.file.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tshark_fields(pcap: &Path, fields: &[&str]) -> Result<Vec<String>> {
    let mut cmd = Command::new("tshark");
    // 15008 is not a port tshark knows as TLS: decode it as TLS explicitly.
    cmd.arg("-r").arg(pcap).args(["-d", "tcp.port==15008,tls", "-T", "fields", "-E", "separator=,"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output()?;
    ensure!(out.status.success(), "tshark -r failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

/// 1 + 2: a pod on node 1 calls a Service whose backend is on node 2: the answer arrives, the
/// wire between the nodes carries only TLS on 15008 (the marker never appears), and both sides
/// report the peer's SPIFFE ID; the backend sees the client pod's address.
#[test]
fn cross_node_traffic_is_mutual_tls_only() -> Result<()> {
    let m = mesh(SluiceOpts::default())?;
    let capture = Capture::start(&m.sim)?;
    let marker = format!("SLUICE-MARKER-{}", m.sim.id());

    let mut hold = m.client.simpod(["hold", "--to", &vip(ECHO_PORT).to_string()])?;
    hold.wait_for_json(T, |v| v["event"] == "connected")?;
    hold.send_line(&marker)?;
    assert_eq!(hold.wait_for_json(T, |v| v["event"] == "echo")?["data"], marker.as_str());

    // While the connection is open: the destination knows who called, by certificate.
    let inbound = m.s2.wait_for("/conns", |v| v.as_array().is_some_and(|a| a.iter().any(|c| c["direction"] == "inbound")), T)?;
    let inbound = inbound.as_array().unwrap().iter().find(|c| c["direction"] == "inbound").unwrap().clone();
    assert_eq!(inbound["peer_identity"], spiffe("shop", "client-sa"), "{inbound}");
    assert_eq!(inbound["security"], "mtls", "{inbound}");
    assert_eq!(inbound["source_pod"], "shop/client", "{inbound}");
    let outbound = conns_matching(&m.s1, |c| c["direction"] == "outbound")?;
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    assert_eq!(outbound[0]["peer_identity"], spiffe("shop", "web-sa"));
    assert_eq!(outbound[0]["security"], "mtls");
    let cli = m.s2.cli(&["conns"])?;
    assert!(cli.stdout.contains(&spiffe("shop", "client-sa")) && cli.stdout.contains("mtls"), "sluice conns:\n{}", cli.stdout);
    hold.close_stdin();
    hold.wait(T)?;

    // HTTP across the nodes; the application sees the client pod's own address.
    let got = m.client.run_simpod(["http-get", "--to", &vip(HTTP_PORT).to_string()])?.json()?;
    expect_ok(&got)?;
    assert!(got["body"]["peer"].as_str().unwrap().starts_with(&format!("{}:", m.client.ip())), "{got}");

    let pcap = capture.stop()?;
    let raw = std::fs::read(&pcap)?;
    ensure!(!raw.is_empty(), "empty capture");
    assert!(!raw.windows(marker.len()).any(|w| w == marker.as_bytes()), "the marker crossed the wire in clear text");
    // tab-separated: ports, payload length, protocol column, info column.
    let rows = tshark_fields(&pcap, &["tcp.srcport", "tcp.dstport", "tcp.len", "_ws.col.Protocol", "_ws.col.Info"])?;
    ensure!(!rows.is_empty(), "no TCP packets captured between the nodes");
    let mut app_data = 0;
    for r in &rows {
        let f: Vec<&str> = r.splitn(5, ',').collect();
        assert!(f[0] == "15008" || f[1] == "15008", "a packet between the nodes not on 15008: {r}");
        if f[2] != "0" {
            assert!(f[3].starts_with("TLS"), "a payload between the nodes that is not TLS: {r}");
        }
        if f.get(4).is_some_and(|i| i.contains("Application Data")) {
            app_data += 1;
        }
    }
    assert!(app_data > 0, "no TLS application data seen: {rows:?}");
    // Both client connections (the held one and the HTTP request) rode one pooled tunnel.
    let syns = tshark_fields(&pcap, &["tcp.flags.syn", "tcp.flags.ack"])?.iter().filter(|r| r.as_str() == "1,0").count();
    assert_eq!(syns, 1, "expected one tunnel connection between the nodes for two client connections");
    let streams = m.s2.get_json("/status")?["counters"]["hbone_streams_in"].as_u64().unwrap_or(0);
    assert_eq!(streams, 2, "two CONNECT streams over that one tunnel");
    eprintln!("{} packets between the nodes, all TCP on 15008, TLS application data present, marker absent", rows.len());
    Ok(())
}

/// 7 (end to end): each node holds certificates only for identities of its own pods.
#[test]
fn certificates_are_node_scoped() -> Result<()> {
    let m = mesh(SluiceOpts::default())?;
    let certs1 = m.s1.get_json("/certs")?;
    let certs2 = m.s2.get_json("/certs")?;
    let ids = |v: &Value| -> BTreeSet<String> {
        v.as_array().unwrap().iter().map(|c| c["identity"].as_str().unwrap_or("").to_string()).collect()
    };
    assert_eq!(ids(&certs1), BTreeSet::from([spiffe("shop", "client-sa")]), "{certs1}");
    assert_eq!(ids(&certs2), BTreeSet::from([spiffe("shop", "web-sa")]), "{certs2}");
    let table = m.s1.cli(&["certs"])?;
    assert!(table.stdout.contains(&spiffe("shop", "client-sa")), "{}", table.stdout);
    let pods = m.s1.get_json("/pods")?;
    assert_eq!(pods[0]["identity"], spiffe("shop", "client-sa"), "{pods}");
    Ok(())
}

/// `POST /certs/request` on a node's admin unix socket (where sluice serves it), with curl:
/// (HTTP status, body).
fn post_cert_request(sluice: &Sluice, identity: &str) -> Result<(u16, Value)> {
    let socket = sluice.admin_socket().display().to_string();
    let (code, body) = curl_cert_request(
        sluice.node(),
        identity,
        &["--unix-socket", &socket, "http://localhost/certs/request"],
    )?;
    Ok((code, serde_json::from_str(&body).with_context(|| format!("body: {body}"))?))
}

/// curl `POST /certs/request` with `target` (the URL, after any curl options): (status, body).
fn curl_cert_request(node: &Node, identity: &str, target: &[&str]) -> Result<(u16, String)> {
    let body = format!("{{\"identity\":\"{identity}\"}}");
    let mut args = vec![
        "curl",
        "-sS",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        &body,
        "-w",
        "\n%{http_code}",
    ];
    args.extend_from_slice(target);
    let out = node.run(args)?;
    ensure!(out.success(), "curl failed: {}", out.stderr);
    let (body, code) = out.stdout.trim_end().rsplit_once('\n').context("no status line from curl")?;
    Ok((code.parse()?, body.to_string()))
}

/// 7 (end to end, operator-facing): `sluice certs request` asks a node's CA for a certificate
/// without installing it. Node 1 refuses the identity of a pod on node 2, saying why and naming
/// the node; it grants its own pod's identity; nothing held changes and traffic keeps flowing.
#[test]
fn certificate_request_for_another_nodes_pod_is_refused() -> Result<()> {
    let m = mesh(SluiceOpts::default())?;
    let theirs = spiffe("shop", "web-sa"); // the backend, on node 2 only
    let ours = spiffe("shop", "client-sa"); // the client, on node 1
    let held1 = m.s1.get_json("/certs")?;
    let held2 = m.s2.get_json("/certs")?;

    // The CLI: refused, non-zero, with the CA's reason naming node 1.
    let out = m.s1.cli(&["certs", "request", &theirs])?;
    eprintln!("sluice certs request {theirs} on n1: exit {}, stderr: {}", out.status, out.stderr.trim());
    ensure!(!out.success(), "node 1 must refuse node 2's identity: {out:?}");
    for needle in ["not authorized", theirs.as_str(), m.n1.name(), "no pod with service account \"web-sa\""] {
        ensure!(out.stderr.contains(needle), "refusal does not mention {needle:?}: {}", out.stderr);
    }
    let json = m.s1.cli(&["certs", "request", &theirs, "-o", "json"])?;
    ensure!(!json.success(), "{json:?}");
    let view: Value = serde_json::from_str(&json.stdout).with_context(|| json.stdout.clone())?;
    assert_eq!(view["issued"], false, "{view}");
    assert_eq!(view["node"], m.n1.name(), "{view}");
    // The admin API itself: 403 with the reason.
    let (code, body) = post_cert_request(&m.s1, &theirs)?;
    assert_eq!(code, 403, "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains(m.n1.name())), "{body}");
    let log = m.s1.log_contents();
    ensure!(
        log.lines().any(|l| l.contains("certificate request refused")
            && l.contains(&theirs)
            && l.contains("not authorized")),
        "no log line with the refused identity and the reason:\n{log}"
    );

    // Its own pod's identity: granted, 200, a fresh certificate that is not installed.
    let out = m.s1.cli(&["certs", "request", &ours])?;
    eprintln!("sluice certs request {ours} on n1: {}", out.stdout.trim());
    ensure!(out.success(), "node 1 must get a certificate for its own pod: {out:?}");
    ensure!(out.stdout.contains(&ours) && out.stdout.contains("serial"), "{}", out.stdout);
    let (code, granted) = post_cert_request(&m.s1, &ours)?;
    assert_eq!(code, 200, "{granted}");
    assert_eq!(granted["issued"], true, "{granted}");
    assert_eq!(granted["installed"], false, "{granted}");
    let serial = granted["serial"].as_str().context("serial")?;
    assert_ne!(serial, held1[0]["serial"].as_str().unwrap_or(""), "a check issues a fresh certificate");
    // And the mirror image on node 2.
    assert_eq!(post_cert_request(&m.s2, &ours)?.0, 403);
    assert_eq!(post_cert_request(&m.s2, &theirs)?.0, 200);

    // Minting is never served on the TCP admin port (hostNetwork pods reach 127.0.0.1:15000 of
    // the node): 403 there, saying where it is served, for an identity the CA would grant.
    let (code, body) = curl_cert_request(&m.n1, &ours, &["http://127.0.0.1:15000/certs/request"])?;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("unix socket only"), "{body}");
    // The CLI refuses a TCP URL before asking anything, and says what to use.
    let out = m.s1.node().run([
        sluice_tests::sluice_bin()?.display().to_string().as_str(),
        "certs",
        "request",
        &ours,
        "--admin",
        "http://127.0.0.1:15000",
    ])?;
    ensure!(!out.success() && out.stderr.contains("--node NAME"), "{out:?}");
    // The socket itself is root's only.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(m.s1.admin_socket())?.permissions());
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    // Nothing held changed, and traffic keeps flowing across the nodes.
    assert_eq!(m.s1.get_json("/certs")?, held1, "a check must not install or replace a certificate");
    assert_eq!(m.s2.get_json("/certs")?, held2, "a check must not install or replace a certificate");
    expect_ok(&tcp_exchange(&m.client, vip(ECHO_PORT), 64)?)?;
    let got = m.client.run_simpod(["http-get", "--to", &vip(HTTP_PORT).to_string()])?.json()?;
    expect_ok(&got)?;
    Ok(())
}

fn write_namespace_mode(sim: &Sim, ns: &str, mode: &str) -> Result<()> {
    sim.write_file(
        &format!("ns-{ns}.yaml"),
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  annotations:\n    sluice.dev/mesh: enabled\n    sluice.dev/peer-authentication: {mode}\n"
        ),
    )?;
    Ok(())
}

/// 5: PERMISSIVE accepts plaintext from a pod outside the mesh (shown as plaintext); STRICT
/// refuses it, while mesh clients keep working.
#[test]
fn permissive_accepts_plaintext_strict_refuses_it() -> Result<()> {
    let m = mesh(SluiceOpts::default())?;
    m.sim.write_namespace("legacy", false)?;
    let known = m.s2.get_json("/status")?["model_pods"].as_u64().unwrap_or(0);
    let outsider = m.n1.add_pod("legacy", "outsider", PodOpts::default())?;
    // n2's sluice names the source pod from its model: let the new pod reach it first.
    m.s2.wait_for("/status", |s| s["model_pods"].as_u64().unwrap_or(0) > known, T)?;
    let direct = m.backend.addr(ECHO_PORT);

    let mut hold = outsider.simpod(["hold", "--to", &direct.to_string()])?;
    hold.wait_for_json(T, |v| v["event"] == "connected")?;
    hold.send_line("plain hello")?;
    assert_eq!(hold.wait_for_json(T, |v| v["event"] == "echo")?["data"], "plain hello");
    let seen = m.s2.wait_for("/conns", |v| v.as_array().is_some_and(|a| a.iter().any(|c| c["security"] == "plaintext")), T)?;
    let c = seen.as_array().unwrap().iter().find(|c| c["security"] == "plaintext").unwrap();
    assert_eq!(c["source_pod"], "legacy/outsider", "{c}");
    assert!(c["peer_identity"].is_null(), "{c}");
    hold.close_stdin();
    hold.wait(T)?;

    write_namespace_mode(&m.sim, "shop", "STRICT")?;
    let refused = sluice_tests::poll_until(Duration::from_secs(5), || {
        let r = tcp_exchange(&outsider, direct, 16).ok()?;
        (r["ok"] == false).then_some(r)
    })
    .context("plaintext was never refused under STRICT")?;
    let err = refused["error"].as_str().unwrap_or("");
    assert!(err.starts_with("ConnectionReset") || err.starts_with("UnexpectedEof") || err.starts_with("BrokenPipe"), "{refused}");
    // Mesh traffic is unaffected.
    let r = tcp_exchange(&m.client, vip(ECHO_PORT), 64)?;
    expect_ok(&r)?;
    let log = m.s2.log_contents();
    assert!(log.contains("STRICT"), "no log line about the STRICT refusal:\n{log}");
    Ok(())
}

fn write_deny_policy(sim: &Sim, from_ns: &str) -> Result<()> {
    sim.write_file(
        "authz-web.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-ns\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"{from_ns}\"]\n"
        ),
    )?;
    Ok(())
}

/// The pid of the process answering `node`'s admin API, which must be the one the test started.
fn live_pid(s: &Sluice) -> Result<u64> {
    ensure!(s.is_running(), "sluice on {} exited: {}", s.node().short_name(), s.log_contents());
    s.get_json("/status")?["pid"].as_u64().context("status has no pid")
}

/// Writes the DENY policy for `from_ns`, then tries `red` and `blue` in turn (no sleep longer
/// than 10 ms in between) until each shows the outcome the new policy asks for: `deny` is the
/// pod that must now be refused, `allow` the one that must now get through. Returns, per pod,
/// the time from the file write to the end of its first attempt showing the new outcome.
fn edit_policy_and_time(sim: &Sim, from_ns: &str, deny: &Pod, allow: &Pod) -> Result<(Duration, Duration)> {
    let written = Instant::now();
    write_deny_policy(sim, from_ns)?;
    let (mut denied, mut allowed): (Option<Duration>, Option<Duration>) = (None, None);
    let mut attempts = 0;
    while denied.is_none() || allowed.is_none() {
        ensure!(
            written.elapsed() < Duration::from_secs(10),
            "policy for {from_ns}: denied {denied:?}, allowed {allowed:?} after 10 s"
        );
        if denied.is_none() {
            let r = tcp_exchange(deny, vip(ECHO_PORT), 16)?;
            if r["ok"] == false {
                denied = Some(written.elapsed());
            }
        }
        if allowed.is_none() {
            let r = tcp_exchange(allow, vip(ECHO_PORT), 16)?;
            if r["ok"] == true {
                allowed = Some(written.elapsed());
            }
        }
        attempts += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let (denied, allowed) = (denied.unwrap(), allowed.unwrap());
    eprintln!(
        "DENY from {from_ns}: {}/{} refused after {denied:?}, {}/{} allowed after {allowed:?} ({attempts} rounds of attempts)",
        deny.namespace(), deny.name(), allow.namespace(), allow.name()
    );
    Ok((denied, allowed))
}

/// 6: a DENY policy for namespace X refuses X and lets Y through; editing it flips the outcome
/// within a second (both ways: the newly denied namespace is refused and the previously denied
/// one re-allowed, measured from the file write), with no sluice restarted on either node.
#[test]
fn deny_policy_by_source_namespace_applies_live() -> Result<()> {
    let m = mesh(SluiceOpts::default())?;
    m.sim.write_namespace("red", true)?;
    m.sim.write_namespace("blue", true)?;
    let red = m.n1.add_pod("red", "r", PodOpts::default())?;
    let blue = m.n1.add_pod("blue", "b", PodOpts::default())?;
    wait_enrolled(&m.s1, &red)?;
    wait_enrolled(&m.s1, &blue)?;
    let pids = (live_pid(&m.s1)?, live_pid(&m.s2)?);
    expect_ok(&tcp_exchange(&red, vip(ECHO_PORT), 16)?).context("red before any policy")?;
    expect_ok(&tcp_exchange(&blue, vip(ECHO_PORT), 16)?).context("blue before any policy")?;

    let limit = Duration::from_secs(1);
    let mut timings = Vec::new();
    // The policy appears (deny red), is edited (deny blue: red re-allowed), and edited back.
    for (from_ns, deny, allow) in [("red", &red, &blue), ("blue", &blue, &red), ("red", &red, &blue)] {
        let (denied, allowed) = edit_policy_and_time(&m.sim, from_ns, deny, allow)?;
        timings.push((from_ns, denied, allowed));
        ensure!(denied < limit, "denying {from_ns} took {denied:?} (limit {limit:?})");
        ensure!(allowed < limit, "re-allowing {} took {allowed:?} (limit {limit:?})", allow.namespace());
    }
    eprintln!("policy edits (from the file write): {timings:?}");
    let log = m.s2.log_contents();
    assert!(log.contains("denied by authorization policy") && log.contains("ns/red/"), "no deny log line:\n{log}");
    assert!(log.contains("ns/blue/"), "no deny log line for blue:\n{log}");
    let denied = m.s2.get_json("/status")?["counters"]["policy_denied"].as_u64().unwrap_or(0);
    assert!(denied >= 3, "policy_denied counter: {denied}");
    assert_eq!((live_pid(&m.s1)?, live_pid(&m.s2)?), pids, "a sluice process was restarted");
    Ok(())
}

/// 8: garbage on port 15008 (random bytes, TLS without a client certificate, plain HTTP/1.1)
/// is rejected without affecting an established tunnel.
#[test]
fn garbage_on_hbone_port_is_rejected_alone() -> Result<()> {
    let m = mesh(SluiceOpts::default())?;
    m.sim.write_namespace("legacy", false)?;
    let outsider = m.n1.add_pod("legacy", "outsider", PodOpts::default())?;
    let hbone = SocketAddr::new(m.backend.ip().into(), 15008);

    let mut tunnel = m.client.simpod(["hold", "--to", &vip(ECHO_PORT).to_string()])?;
    tunnel.wait_for_json(T, |v| v["event"] == "connected")?;
    tunnel.send_line("before")?;
    tunnel.wait_for_json(T, |v| v["event"] == "echo")?;
    let failed_before = m.s2.get_json("/status")?["counters"]["hbone_handshakes_failed"].as_u64().unwrap_or(0);

    let failed_at_least = |n: u64| {
        m.s2.wait_for(
            "/status",
            |s| s["counters"]["hbone_handshakes_failed"].as_u64().unwrap_or(0) >= failed_before + n,
            T,
        )
    };

    // Random bytes: the most they may get back is a TLS alert record (5-byte header + 2).
    let r = tcp_exchange(&outsider, hbone, 4096)?;
    assert!(r["received"].as_u64().unwrap_or(0) <= 7, "random bytes got more than a TLS alert back: {r}");
    failed_at_least(1)?;

    // A real TLS 1.3 client that trusts the mesh CA (so it verifies the server's certificate)
    // but has no certificate of its own: the server must refuse the handshake for that reason.
    let mesh_ca = m.sim.temp_dir().join("ca").join("ca.pem");
    let tls = outsider.run_timeout(
        [
            "sh",
            "-c",
            &format!(
                "echo | openssl s_client -connect {hbone} -tls1_3 -alpn h2 -CAfile {} -ign_eof 2>&1; true",
                mesh_ca.display()
            ),
        ],
        T,
    )?;
    eprintln!("openssl s_client without a client certificate:\n{}", tls.stdout);
    // The server's certificate verified against the mesh CA: the handshake got as far as the
    // client's (missing) certificate, and failed there, not on anything else.
    assert!(
        tls.stdout.contains("Verify return code: 0 (ok)"),
        "s_client did not verify the server:\n{}",
        tls.stdout
    );
    assert!(
        tls.stdout.contains("certificate required"),
        "the refusal must be the TLS 1.3 certificate_required alert (no client certificate):\n{}",
        tls.stdout
    );
    assert!(!tls.stdout.contains("HTTP/"), "{}", tls.stdout);
    failed_at_least(2)?;

    let http = outsider.run_simpod(["http-get", "--to", &hbone.to_string(), "--timeout-ms", "3000"])?;
    let http = http.json()?;
    assert_eq!(http["ok"], false, "plain HTTP/1.1 must not be served on 15008: {http}");
    let failed = failed_at_least(3)?;
    eprintln!("handshakes refused: {}", failed["counters"]["hbone_handshakes_failed"]);

    tunnel.send_line("after")?;
    assert_eq!(tunnel.wait_for_json(T, |v| v["event"] == "echo")?["data"], "after");
    expect_ok(&tcp_exchange(&m.client, vip(ECHO_PORT), 64)?)?;
    Ok(())
}

/// 4: with 20 s certificates, 60 s of requests over long-lived connections (and new ones) see
/// no failure across at least two renewals on each node, and the serials change, as seen both
/// on the admin API and through the `sluice certs -o json` CLI.
#[test]
fn certificate_rotation_drops_nothing() -> Result<()> {
    let opts = SluiceOpts { args: vec!["--cert-lifetime-s".into(), "20".into()], ..Default::default() };
    let m = mesh(opts)?;
    let serial = |s: &Sluice| -> Result<String> {
        let certs = s.get_json("/certs")?;
        Ok(certs[0]["serial"].as_str().unwrap_or("").to_string())
    };
    // The node's one certificate as the operator's CLI shows it: (identity, serial).
    let cli_serial = |s: &Sluice| -> Result<(String, String)> {
        let out = s.cli(&["certs", "-o", "json"])?;
        ensure!(out.success(), "sluice certs -o json: {out:?}");
        let certs: Value = serde_json::from_str(&out.stdout).with_context(|| out.stdout.clone())?;
        let certs = certs.as_array().context("sluice certs -o json is not a list")?;
        ensure!(certs.len() == 1, "expected one certificate on {}: {certs:?}", s.node().short_name());
        Ok((
            certs[0]["identity"].as_str().unwrap_or("").into(),
            certs[0]["serial"].as_str().unwrap_or("").into(),
        ))
    };
    let mut serials = BTreeSet::from([serial(&m.s1)?]);
    // Per node (n1, n2): the serials seen through the CLI.
    let mut cli_serials = [BTreeSet::new(), BTreeSet::new()];
    let expected_ids = [spiffe("shop", "client-sa"), spiffe("shop", "web-sa")];
    let mut hold = m.client.simpod(["hold", "--to", &vip(ECHO_PORT).to_string()])?;
    hold.wait_for_json(T, |v| v["event"] == "connected")?;
    let mut looper = m.client.simpod(["loop", "--to", &vip(ECHO_PORT).to_string(), "--interval-ms", "250", "--count", "100000"])?;

    let started = Instant::now();
    let mut echoes = 0;
    while started.elapsed() < Duration::from_secs(60) {
        let line = format!("ping-{echoes}");
        hold.send_line(&line)?;
        let got = hold.wait_for_json(T, |v| v["event"] == "echo" || v["event"] == "error" || v["event"] == "closed")?;
        ensure!(got["data"] == line.as_str(), "long-lived connection broke after {:?}: {got}", started.elapsed());
        echoes += 1;
        serials.insert(serial(&m.s1)?);
        for (i, s) in [&m.s1, &m.s2].into_iter().enumerate() {
            let (id, serial) = cli_serial(s)?;
            ensure!(id == expected_ids[i], "{}: sluice certs shows {id}", s.node().short_name());
            cli_serials[i].insert(serial);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    looper.kill(Signal::SIGKILL)?;
    let attempts = looper.json_lines();
    let failures: Vec<&Value> = attempts.iter().filter(|a| a["ok"] != true).collect();
    eprintln!("{echoes} echoes on one connection, {} new connections, serials seen: {serials:?}", attempts.len());
    ensure!(failures.is_empty(), "failed attempts during rotation: {failures:?}");
    ensure!(serials.len() >= 3, "expected at least two renewals in 60 s, saw serials {serials:?}");
    eprintln!("serials seen with sluice certs -o json: n1 {:?}, n2 {:?}", cli_serials[0], cli_serials[1]);
    for (i, seen) in cli_serials.iter().enumerate() {
        ensure!(
            seen.len() >= 3,
            "node {}: expected at least two renewals through the CLI in 60 s, saw {seen:?}",
            i + 1
        );
    }
    Ok(())
}

/// The `sluice ca issue` admin tool, for certificates a test (or an operator) needs by hand.
fn issue(ca_dir: &Path, out: &Path, identity: &str, extra: &[&str]) -> Result<(PathBuf, PathBuf)> {
    let bin = sluice_tests::sluice_bin()?;
    let o = Command::new(bin)
        .args(["ca", "issue", "--dir"])
        .arg(ca_dir)
        .args(["--identity", identity, "--out"])
        .arg(out)
        .args(extra)
        .output()?;
    ensure!(o.status.success(), "sluice ca issue: {}", String::from_utf8_lossy(&o.stderr));
    Ok((out.with_extension("pem"), out.with_extension("key.pem")))
}

/// 3: a server presenting the wrong identity, a certificate from another CA, or an expired
/// certificate is refused with a clear log line, and sluice keeps serving other traffic.
#[test]
fn impostor_servers_are_refused() -> Result<()> {
    let m = mesh(SluiceOpts::default())?;
    // A pod the model says is in the mesh (node n3, which runs no sluice), where the test runs
    // its own TLS server on 15008 instead of sluice.
    let n3 = m.sim.add_node("n3")?;
    let rogue = n3.add_pod("shop", "rogue", PodOpts::labels(&[("app", "rogue")]).service_account("rogue-sa"))?;
    m.sim.write_service("shop", "rogue", "10.96.0.30", &[("echo", ECHO_PORT, ECHO_PORT)], &[&rogue])?;
    // Until node 1's sluice has read both manifests, 10.96.0.30 is no Service to it.
    let has = |list: &serde_json::Value| {
        list.as_array().is_some_and(|a| a.iter().any(|o| o["namespace"] == "shop" && o["name"] == "rogue"))
    };
    m.s1.wait_for("/model", |v| has(&v["pods"]) && has(&v["services"]), T)
        .context("node 1's sluice never saw the rogue pod and Service")?;
    let mesh_ca = m.sim.temp_dir().join("ca");
    let other_ca = m.sim.temp_dir().join("other-ca");
    let bin = sluice_tests::sluice_bin()?;
    ensure!(Command::new(&bin).args(["ca", "init", "--dir"]).arg(&other_ca).status()?.success());
    let work = m.sim.temp_dir();

    let cases = [
        ("wrong identity", issue(&mesh_ca, &work.join("wrong"), &spiffe("shop", "someone-else"), &[])?, "expected"),
        ("another CA", issue(&other_ca, &work.join("foreign"), &spiffe("shop", "rogue-sa"), &[])?, "not issued by the mesh CA"),
        ("expired", issue(&mesh_ca, &work.join("expired"), &spiffe("shop", "rogue-sa"), &["--expired"])?, "expired"),
    ];
    for (what, (cert, key), needle) in cases {
        let mut server = rogue.spawn([
            "openssl", "s_server", "-accept", "15008", "-cert", cert.to_str().unwrap(), "-key", key.to_str().unwrap(),
            "-tls1_3", "-alpn", "h2", "-quiet",
        ])?;
        // s_server prints nothing when ready with -quiet: wait until the port answers.
        sluice_tests::poll_until(T, || {
            rogue.run_timeout(["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/15008"], T).ok()?.success().then_some(())
        })
        .context("openssl s_server did not start")?;
        let before = m.s1.log_contents().len();
        let r = tcp_exchange(&m.client, "10.96.0.30:9000".parse().unwrap(), 16)?;
        // Through or not, the client must not get its bytes back from anyone.
        ensure!(r["ok"] == false || r["received"] == 0, "{what}: the client got through: {r}");
        let deadline = Instant::now() + T;
        loop {
            let log = m.s1.log_contents();
            if log[before..].lines().any(|l| l.contains("tunnel failed") && l.contains(needle)) {
                break;
            }
            ensure!(Instant::now() < deadline, "{what}: no log line containing {needle:?}:\n{}", &log[before..]);
            std::thread::sleep(Duration::from_millis(20));
        }
        server.kill(Signal::SIGKILL)?;
        // The next case binds the same port: the killed server must be gone first, or the new
        // one fails to bind while the probe still reaches the old one.
        server.wait(T).with_context(|| format!("{what}: openssl s_server did not exit"))?;
        // The real backend keeps working.
        expect_ok(&tcp_exchange(&m.client, vip(ECHO_PORT), 16)?)?;
    }
    let _ = (&m.n2, &m.backend);
    Ok(())
}

/// The demo's stray 502s: requests still in flight when their clients were killed, whose
/// upstream then failed (the other node's sluice stopped). Nobody saw those answers, so they
/// are neither logged as answered nor counted as 502s; they are response code 0 with the
/// `downstream-closed` flag (Envoy's DC). A client that is still there and waits gets its 502,
/// counted as one.
#[test]
fn an_upstream_failure_after_the_client_left_is_not_a_502() -> Result<()> {
    let m = mesh(SluiceOpts::default())?;
    let url = format!("http://{}/?delay_ms=30000", vip(HTTP_PORT));
    let curl = |out: &str| -> Result<SimProcess> {
        m.client.spawn(["curl", "-sS", "--max-time", "60", "-o", "/dev/null", "-w", out, &url])
    };
    let mut gone = vec![curl("")?, curl("")?];
    let mut waiting = curl("%{http_code}")?;
    // All three are at the backend (one tunnel stream each on node 2).
    let deadline = Instant::now() + T;
    while conns_matching(&m.s2, |_| true)?.len() < 3 {
        ensure!(
            Instant::now() < deadline,
            "the held requests never reached node 2: {}",
            m.s2.get_json("/conns")?
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in &mut gone {
        c.kill(Signal::SIGKILL)?;
        c.wait(T)?;
    }
    // sluice's ends of the killed clients' connections have their FIN (CLOSE-WAIT in the
    // client pod's namespace); sluice keeps their requests going (a half-closed client may
    // still read), until the upstream fails: the other node's sluice dies.
    let deadline = Instant::now() + T;
    loop {
        let ss = m.client.run(["ss", "-Htn", "state", "close-wait", "sport", "= :15001"])?;
        if ss.stdout.lines().filter(|l| !l.trim().is_empty()).count() >= 2 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the killed clients' connections never reached CLOSE-WAIT: {ss:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.s2.kill(Signal::SIGKILL)?;
    let out = waiting.wait_output(T)?;
    assert_eq!(out.stdout.trim(), "502", "the waiting client sees the failure: {out:?}");

    // The two abandoned requests are logged as one line (the log is rate-limited per pod and
    // kind: the second is suppressed, and said so by the pod's next such line); the metrics
    // below count both.
    let deadline = Instant::now() + T;
    let log = loop {
        let log = m.s1.log_contents();
        if log.contains("request ended after the client had closed its connection")
            && log.contains("request answered by sluice")
        {
            break log;
        }
        ensure!(Instant::now() < deadline, "no log line for the abandoned requests or the 502:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let answered: Vec<&str> = log.lines().filter(|l| l.contains("request answered by sluice")).collect();
    assert_eq!(answered.len(), 1, "only the waiting client's 502 is an answer: {answered:#?}");
    let metrics = m.n1.run(["curl", "-s", "http://127.0.0.1:15020/metrics"])?;
    let count = |needle: &str| -> u64 {
        metrics
            .stdout
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{") && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(count("response_code=\"502\""), 1, "{}", metrics.stdout);
    assert_eq!(
        count("response_code=\"0\",grpc_response_status=\"\",response_flags=\"downstream-closed\""),
        2,
        "{}",
        metrics.stdout
    );
    Ok(())
}
