//! L7 protocol handling end to end: what sluice sniffs (HTTP/1.1, h2c, anything else), what a
//! Service port pins (`appProtocol`, Istio-style port names, default opaque ports), and that
//! everything that is not HTTP goes through byte for byte: WebSocket, an opaque binary
//! protocol, TLS from the application (passthrough), and server-first protocols. Bad input
//! (malformed HTTP/1.1, oversized heads, invalid HTTP/2) is answered for that client only.
//!
//! Every test builds its own simulated node: an enrolled namespace `shop` with a client pod and
//! a backend pod `be` running every server, one Service `shop/be` (ClusterIP 10.96.0.20) whose
//! ports reach those servers pinned and unpinned, and sluice. "Through sluice" is checked from
//! the client (its socket is connected to the outbound listener on the pod's loopback, so its
//! local address is 127.0.0.1) and from sluice (detection counters, `/conns`).

mod common;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{ensure, Context, Result};
use common::{via_sluice, wait_enrolled, T};
use serde_json::Value;
use sluice_tests::{manifest, workloads, Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts};

const VIP: &str = "10.96.0.20";

// Service ports of shop/be. Names are chosen so that only the `*-pinned` ports (appProtocol)
// and `tcp-banner` (Istio name prefix) pin a protocol: e.g. a port named "tls" would pin.
/// HTTP server (8080), sniffed.
const WEB: u16 = 80;
/// HTTP server (8080), `appProtocol: http`.
const WEB_PINNED: u16 = 8088;
/// TCP echo (9000), sniffed.
const ECHO: u16 = 9000;
/// TCP echo (9000), `appProtocol: tcp`.
const ECHO_PINNED: u16 = 9001;
/// WebSocket echo (8081), sniffed.
const WS: u16 = 8081;
/// WebSocket echo (8081), `appProtocol: kubernetes.io/ws`.
const WS_PINNED: u16 = 8082;
/// TLS echo (8443), sniffed.
const TLS: u16 = 8443;
/// TLS echo (8443), `appProtocol: tls`.
const TLS_PINNED: u16 = 8444;
/// h2c server (slgrpc, 50051), sniffed.
const H2: u16 = 50051;
/// h2c server (50051), `appProtocol: kubernetes.io/h2c`.
const H2_PINNED: u16 = 50052;
/// Server-first banner (2525), sniffed.
const BANNER: u16 = 2525;
/// Banner (2525), `appProtocol: tcp`.
const BANNER_PINNED: u16 = 2526;
/// Banner (2525), port named `tcp-banner`.
const BANNER_NAMED: u16 = 2527;
/// Banner listening on 3306 (MySQL's port, opaque by default), port name "db".
const MYSQL: u16 = 3306;

/// (name, port, targetPort, appProtocol)
const PORTS: &[(&str, u16, u16, Option<&str>)] = &[
    ("web", WEB, 8080, None),
    ("webapp", WEB_PINNED, 8080, Some("http")),
    ("echo", ECHO, 9000, None),
    ("echo-pinned", ECHO_PINNED, 9000, Some("tcp")),
    ("ws", WS, 8081, None),
    ("ws-pinned", WS_PINNED, 8081, Some("kubernetes.io/ws")),
    ("secure", TLS, 8443, None),
    ("secure-pinned", TLS_PINNED, 8443, Some("tls")),
    ("rpc", H2, 50051, None),
    ("rpc-pinned", H2_PINNED, 50051, Some("kubernetes.io/h2c")),
    ("banner", BANNER, 2525, None),
    ("banner-pinned", BANNER_PINNED, 2525, Some("tcp")),
    ("tcp-banner", BANNER_NAMED, 2525, None),
    ("db", MYSQL, 3306, None),
];

/// sluice's default detect timeout.
const DETECT_TIMEOUT_MS: f64 = 250.0;
/// A banner on a port that is not sniffed must come well before the detect timeout.
const NO_SNIFF_BANNER_MS: f64 = 150.0;
/// The TLS certificate's name (simpod's default).
const TLS_NAME: &str = "tls-backend.test";
/// The backend server names.
const HTTP_NAME: &str = "be";
const GRPC_NAME: &str = "grpc-be";

fn vip(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().unwrap()
}

struct World {
    sim: Sim,
    #[allow(dead_code)]
    node: Node,
    client: Pod,
    backend: Pod,
    http: SimProcess,
    ws: SimProcess,
    tls: SimProcess,
    grpc: SimProcess,
    /// Echo and banner servers: kept alive, never inspected.
    _others: Vec<SimProcess>,
    /// The TLS backend's self-signed certificate (the only CA the TLS client trusts).
    cert: PathBuf,
    sluice: Sluice,
}

impl World {
    fn new() -> Result<World> {
        World::with(SluiceOpts::default())
    }

    fn with(opts: SluiceOpts) -> Result<World> {
        let sim = Sim::new()?;
        let node = sim.add_node("n1")?;
        sim.write_namespace("shop", true)?;
        let backend = node.add_pod("shop", "be", PodOpts::labels(&[("app", "be")]))?;
        let http = workloads::start_http_server(&backend, 8080, HTTP_NAME, &[])?;
        let ws = workloads::start_ws_echo_server(&backend, 8081)?;
        let cert = sim.temp_dir().join("tls-backend.pem");
        let tls = workloads::start_tls_echo_server(&backend, 8443, &cert, &["--alpn", "h2,http/1.1"])?;
        let grpc = workloads::start_grpc_server(&backend, 50051, GRPC_NAME)?;
        let mut echo = backend.simpod(["echo-server", "--port", "9000"])?;
        echo.wait_listening(T)?;
        let others = vec![
            echo,
            workloads::start_banner_server(&backend, 2525, "220 banner.test ESMTP ready")?,
            workloads::start_banner_server(&backend, 3306, "mysql-ish greeting")?,
        ];

        let node_name = backend.node().name().to_string();
        let ep = manifest::Endpoint {
            ip: backend.ip(),
            pod_name: backend.name(),
            pod_namespace: backend.namespace(),
            pod_uid: backend.uid(),
            node_name: &node_name,
            labels: backend.labels(),
        };
        let plain: Vec<(&str, u16, u16)> = PORTS.iter().map(|(n, p, t, _)| (*n, *p, *t)).collect();
        let mut docs = manifest::service("shop", "be", VIP, &plain, &[ep]);
        for (name, _, _, app) in PORTS {
            if let Some(app) = app {
                docs = manifest::with_app_protocol(docs, name, app);
            }
        }
        sim.write_file(&manifest::service_file_name("shop", "be"), manifest::to_yaml(&docs)?)?;

        let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
        let sluice = node.start_sluice(opts)?;
        sluice.wait_ready(T)?;
        wait_enrolled(&sluice, &client)?;
        wait_enrolled(&sluice, &backend)?;
        Ok(World { sim, node, client, backend, http, ws, tls, grpc, _others: others, cert, sluice })
    }

    fn counters(&self) -> Result<Value> {
        let status = self.sluice.get_json("/status")?;
        ensure!(status["counters"].is_object(), "no counters in /status: {status}");
        Ok(status["counters"].clone())
    }

    /// Outbound `/conns` entries of the client to `dst`.
    fn conns_to(&self, dst: SocketAddr) -> Result<Vec<Value>> {
        let conns = self.sluice.get_json("/conns")?;
        Ok(conns
            .as_array()
            .context("/conns is not a list")?
            .iter()
            .filter(|c| {
                c["direction"] == "outbound"
                    && c["source_pod"] == "shop/client"
                    && c["original_dst"] == dst.to_string()
            })
            .cloned()
            .collect())
    }

    /// Waits until `/conns` lists an outbound connection to `dst` for which `pred` holds.
    fn wait_conn(&self, dst: SocketAddr, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let dst_s = dst.to_string();
        let conns = self.sluice.wait_for(
            "/conns",
            |v| {
                v.as_array().is_some_and(|a| {
                    a.iter().any(|c| c["direction"] == "outbound" && c["original_dst"] == dst_s && pred(c))
                })
            },
            T,
        )?;
        Ok(conns
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["direction"] == "outbound" && c["original_dst"] == dst_s && pred(c))
            .unwrap()
            .clone())
    }

    /// `simpod raw` from the client, with a generous read timeout (a test asserts "timeout"
    /// never happens where sluice must close).
    fn raw(&self, port: u16, send: &str, extra: &[&str]) -> Result<workloads::RawResult> {
        let mut args = extra.to_vec();
        if !extra.contains(&"--read-timeout-ms") {
            args.extend(["--read-timeout-ms", "5000"]);
        }
        workloads::raw(&self.client, vip(port), send, &args)
    }

    fn raw_hex(&self, port: u16, hex: &str, extra: &[&str]) -> Result<workloads::RawResult> {
        let mut args = vec![
            "raw".to_string(),
            "--to".into(),
            vip(port).to_string(),
            "--send-hex".into(),
            hex.into(),
            "--read-timeout-ms".into(),
            "5000".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = self.client.run_simpod(&args)?;
        let v = out.json().with_context(|| format!("simpod raw: {}", out.stderr))?;
        serde_json::from_value(v.clone()).with_context(|| format!("simpod raw result {v}"))
    }

    /// `simpod banner-client` to `port` (3 s limit).
    fn banner(&self, port: u16) -> Result<Value> {
        let out = self.client.run_simpod([
            "banner-client",
            "--to",
            &vip(port).to_string(),
            "--timeout-ms",
            "3000",
        ])?;
        let r = out.json().with_context(|| format!("banner-client: {}", out.stderr))?;
        ensure!(
            out.success() && r["ok"] == true,
            "banner-client to port {port} failed: {r}\n{}",
            self.log_tail()
        );
        Ok(r)
    }

    /// The sluice log (for failure messages).
    fn log_tail(&self) -> String {
        let log = self.sluice.log_contents();
        let lines: Vec<&str> = log.lines().collect();
        format!("sluice log (last 30 lines):\n{}", lines[lines.len().saturating_sub(30)..].join("\n"))
    }

    /// sluice is the same process as before and still answers its admin API.
    fn assert_sluice_up(&self, pid: u32) -> Result<()> {
        ensure!(
            self.sluice.is_running(),
            "sluice exited: {:?}\n{}",
            self.sluice.exit_status(),
            self.log_tail()
        );
        ensure!(self.sluice.pid() == pid, "sluice was restarted ({pid} → {})", self.sluice.pid());
        let status = self.sluice.get_json("/status")?;
        ensure!(status["ready"] == true, "sluice not ready: {status}");
        ensure!(status["pid"].as_u64() == Some(u64::from(pid)), "another sluice answers /status: {status}");
        Ok(())
    }
}

fn delta(before: &Value, after: &Value, name: &str) -> i64 {
    let get = |v: &Value| v[name].as_i64().unwrap_or_else(|| panic!("counter {name} missing in {v}"));
    get(after) - get(before)
}

/// Asserts the change of each named counter between two `/status` snapshots.
fn assert_deltas(before: &Value, after: &Value, expected: &[(&str, i64)]) {
    let got: Vec<(&str, i64)> = expected.iter().map(|(n, _)| (*n, delta(before, after, n))).collect();
    assert_eq!(got, expected.to_vec(), "counter changes (before {before}, after {after})");
}

fn ip_of(addr: &Value) -> String {
    addr.as_str().and_then(|a| a.rsplit_once(':')).map(|(ip, _)| ip.to_string()).unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
}

/// A connection the peer closed (EOF or reset), as opposed to one left hanging.
fn closed(r: &workloads::RawResult) -> bool {
    r.ended == "eof" || r.ended == "reset"
}

// ---------------------------------------------------------------- long-lived clients

/// A keep-alive HTTP/1.1 client in a pod: one TCP connection, one GET per `get` call, the
/// response read by Content-Length or chunked framing. Python's standard library, since no
/// simpod client keeps a connection open between requests on command.
const KEEPALIVE_PY: &str = r#"
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rb")
def local():
    return "%s:%d" % s.getsockname()[:2]
print(json.dumps({"event": "connected", "local": local()}), flush=True)
for line in sys.stdin:
    path = line.strip()
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: keepalive.test\r\nUser-Agent: keepalive\r\n\r\n" % path).encode())
        status = f.readline().decode("latin-1").strip()
        headers = {}
        while True:
            h = f.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                n = int(f.readline().split(b";")[0].strip(), 16)
                if n == 0:
                    while f.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += f.read(n)
                f.readline()
        else:
            body = f.read(int(headers.get("content-length", "0")))
        print(json.dumps({"event": "response", "path": path, "status_line": status, "headers": headers,
                          "body": body.decode("utf-8", "replace"), "local": local()}), flush=True)
    except Exception as e:
        print(json.dumps({"event": "error", "path": path, "error": repr(e)}), flush=True)
        sys.exit(1)
"#;

struct KeepAlive {
    proc: SimProcess,
    /// The client's local address on its one connection.
    local: String,
}

impl KeepAlive {
    fn start(pod: &Pod, to: SocketAddr) -> Result<KeepAlive> {
        let python =
            if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
        let mut proc =
            pod.spawn([python, "-u", "-c", KEEPALIVE_PY, &to.ip().to_string(), &to.port().to_string()])?;
        let ev = proc.wait_for_json(T, |v| v["event"] == "connected")?;
        let local = ev["local"].as_str().context("local address")?.to_string();
        Ok(KeepAlive { proc, local })
    }

    /// One GET on the same connection: must be a 200 from the backend.
    fn get_ok(&mut self, path: &str) -> Result<Value> {
        self.proc.send_line(path)?;
        let r = self.proc.wait_for_json(T, |v| v["path"] == path)?;
        ensure!(r["event"] == "response", "keep-alive request {path} failed: {r}");
        ensure!(
            r["status_line"].as_str().is_some_and(|s| s.starts_with("HTTP/1.1 200")),
            "keep-alive {path}: {r}"
        );
        ensure!(
            r["local"] == self.local.as_str(),
            "the keep-alive connection was replaced: {r}, first {}",
            self.local
        );
        let body: Value = serde_json::from_str(r["body"].as_str().unwrap_or(""))
            .with_context(|| format!("keep-alive {path}: body is not the backend's JSON: {r}"))?;
        ensure!(
            body["name"] == HTTP_NAME && body["path"] == path,
            "keep-alive {path}: unexpected body {body}"
        );
        Ok(r)
    }
}

/// simpod `hold`: one long opaque TCP connection to the echo port, a line echoed on demand.
struct Hold {
    proc: SimProcess,
    n: u32,
}

impl Hold {
    fn start(pod: &Pod, to: SocketAddr) -> Result<Hold> {
        let mut proc = pod.simpod(["hold", "--to", &to.to_string()])?;
        let c = proc.wait_for_json(T, |v| v["event"] == "connected")?;
        ensure!(via_sluice(&c), "the held connection did not go through sluice: {c}");
        Ok(Hold { proc, n: 0 })
    }

    fn echo_ok(&mut self) -> Result<()> {
        self.n += 1;
        let line = format!("still here {}", self.n);
        self.proc.send_line(&line)?;
        let ev = self.proc.wait_for_json(T, |v| v["event"] != "connected")?;
        ensure!(ev["event"] == "echo" && ev["data"] == line.as_str(), "held connection broke: {ev}");
        Ok(())
    }
}

// ---------------------------------------------------------------- HTTP/2 frames

const H2_PREFACE_HEX: &str = "505249202a20485454502f322e300d0a0d0a534d0d0a0d0a";
const H2_GOAWAY: u8 = 0x7;
const H2_SETTINGS: u8 = 0x4;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Splits bytes into HTTP/2 frames; fails on bytes that are not frames.
fn h2_frames(mut b: &[u8]) -> Result<Vec<Frame>> {
    let mut frames = Vec::new();
    while !b.is_empty() {
        ensure!(b.len() >= 9, "truncated frame header {}", hex(b));
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        ensure!(b.len() >= 9 + len, "truncated frame of {len} bytes: {}", hex(b));
        frames.push(Frame {
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
            payload: b[9..9 + len].to_vec(),
        });
        b = &b[9 + len..];
    }
    Ok(frames)
}

/// The error code of the first GOAWAY frame.
fn goaway_code(frames: &[Frame]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.kind == H2_GOAWAY && f.payload.len() >= 8)
        .map(|f| u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]]))
}

// ---------------------------------------------------------------- detection

/// curl (HTTP/1.1) to an unpinned port: sniffed as HTTP/1.1, proxied per request; a keep-alive
/// connection is listed by `/conns` as "http/1.1" with its request count.
#[test]
fn curl_http11_is_sniffed_and_proxied() -> Result<()> {
    let w = World::new()?;
    let before = w.counters()?;
    let headers = w.sim.temp_dir().join("curl-headers.txt");
    let url = format!("http://{VIP}/curl/path?x=1");
    let out = w.client.run([
        "curl",
        "-sS",
        "--http1.1",
        "--max-time",
        "10",
        "-H",
        "X-Curl-Test: yes",
        "-D",
        headers.to_str().unwrap(),
        "-w",
        r"\n%{json}\n",
        &url,
    ])?;
    out.check()?;
    let lines = out.json_lines()?;
    ensure!(lines.len() == 2, "curl printed {lines:?}");
    let (body, info) = (&lines[0], &lines[1]);
    assert_eq!(info["http_code"], 200, "{info}");
    assert_eq!(info["http_version"], "1.1", "{info}");
    assert_eq!(info["local_ip"], "127.0.0.1", "curl's socket is not on sluice's listener: {info}");
    assert_eq!(info["remote_ip"], VIP, "getpeername must show the ClusterIP: {info}");
    assert_eq!(body["name"], HTTP_NAME, "{body}");
    assert_eq!(body["path"], "/curl/path?x=1", "{body}");
    assert_eq!(body["headers"]["x-curl-test"], "yes", "{body}");
    assert_eq!(
        ip_of(&body["peer"]),
        w.client.ip().to_string(),
        "the backend must see the client pod: {body}"
    );
    let head = std::fs::read_to_string(&headers)?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("x-simpod-name: be"), "the backend's own header: {head}");
    assert!(!head.to_ascii_lowercase().contains("x-sluice-error"), "{head}");

    let after = w.counters()?;
    assert_deltas(
        &before,
        &after,
        &[
            ("detected_http1", 1),
            ("detected_http2", 0),
            ("detected_opaque", 0),
            ("http_requests", 1),
            ("http_local_replies", 0),
        ],
    );

    // One keep-alive connection, three requests: one "http/1.1" connection in /conns.
    let mut ka = KeepAlive::start(&w.client, vip(WEB))?;
    assert!(ka.local.starts_with("127.0.0.1:"), "keep-alive client not through sluice: {}", ka.local);
    for i in 0..3 {
        ka.get_ok(&format!("/ka/{i}"))?;
    }
    let c = w.wait_conn(vip(WEB), |c| c["requests"] == 3)?;
    assert_eq!(c["protocol"], "http/1.1", "{c}");
    assert_eq!(c["service"], "shop/be", "{c}");
    assert_eq!(w.conns_to(vip(WEB))?.len(), 1, "one client connection");
    let after_ka = w.counters()?;
    assert_deltas(&after, &after_ka, &[("detected_http1", 1), ("http_requests", 3)]);
    Ok(())
}

/// nghttp (h2c with prior knowledge) to an unpinned port: sniffed as HTTP/2, the request reaches
/// the backend over HTTP/2 and its answer comes back; `/conns` lists an open gRPC stream's
/// connection as "h2c".
#[test]
fn nghttp_h2c_is_sniffed_and_answered_by_the_backend() -> Result<()> {
    let mut w = World::new()?;
    let before = w.counters()?;
    let url = format!("http://{VIP}:{H2}/hello/h2c?q=1");
    let out =
        w.client.run_timeout(["nghttp", "-v", "--timeout=10", &url], Duration::from_secs(30)).with_context(
            || "running nghttp (Debian package nghttp2-client; cargo xtask setup installs it)".to_string(),
        )?;
    let text = &out.stdout;
    ensure!(out.success(), "nghttp failed ({}):\n{text}\n{}", out.status, out.stderr);
    // nghttp spoke HTTP/2 from the first byte and got the backend's response headers.
    assert!(text.contains("send SETTINGS frame"), "{text}");
    assert!(text.contains("send HEADERS frame"), "{text}");
    let recv = |h: &str| text.lines().any(|l| l.contains("] recv (stream_id=") && l.ends_with(h));
    assert!(recv(":status: 200"), "{text}");
    assert!(recv(&format!("x-slgrpc-server: {GRPC_NAME}")), "the backend's own header: {text}");
    assert!(!text.contains("x-sluice-error"), "{text}");
    let ev = w.grpc.wait_for_json(T, |v| v["event"] == "unknown_method")?;
    assert_eq!(ev["method"], "/hello/h2c", "the backend got the request: {ev}");

    let after = w.counters()?;
    assert_deltas(
        &before,
        &after,
        &[
            ("detected_http1", 0),
            ("detected_http2", 1),
            ("detected_opaque", 0),
            ("http_requests", 1),
            ("http_local_replies", 0),
        ],
    );

    // A server stream over h2c stays open long enough to be seen in /conns.
    let mut args = vec![workloads::slgrpc_bin()?.into_os_string()];
    for a in ["stream", "--to", &vip(H2).to_string(), "--n", "15", "--interval-ms", "100"] {
        args.push(a.into());
    }
    let mut stream = w.client.spawn(args)?;
    stream.wait_for_json(T, |v| v["event"] == "item")?;
    let c = w.wait_conn(vip(H2), |c| c["protocol"] == "h2c")?;
    assert_eq!(c["requests"], 1, "{c}");
    assert_eq!(c["service"], "shop/be", "{c}");
    let done = stream.wait_output(T)?;
    let last = done.json()?;
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["received"], 15, "{last}");
    Ok(())
}

/// An `appProtocol: tcp` port is never parsed: an HTTP request with odd casing and spacing
/// arrives at a raw echo backend exactly as sent. The same bytes on an unpinned port are HTTP
/// to sluice (and the echo backend is no HTTP server: sluice answers 502).
#[test]
fn pinned_tcp_port_is_never_parsed() -> Result<()> {
    let w = World::new()?;
    let request = r"GET /Raw?q=1 HTTP/1.1\r\nhOsT: echo.test\r\nX-WeIrD-CaSe:   spaced  value \r\nx-dup: 1\r\nX-Dup: 2\r\nconnection: Keep-Alive\r\n\r\n";
    let sent = "GET /Raw?q=1 HTTP/1.1\r\nhOsT: echo.test\r\nX-WeIrD-CaSe:   spaced  value \r\nx-dup: 1\r\nX-Dup: 2\r\nconnection: Keep-Alive\r\n\r\n";

    let before = w.counters()?;
    let r = w.raw(ECHO_PINNED, request, &["--half-close"])?;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.ended, "eof", "{r:?}");
    assert!(r.local.as_deref().is_some_and(|l| l.starts_with("127.0.0.1:")), "not through sluice: {r:?}");
    assert_eq!(r.received_text, sent, "the pinned port must deliver the request byte for byte");
    assert_eq!(r.received_hex, hex(sent.as_bytes()));
    let after = w.counters()?;
    assert_deltas(
        &before,
        &after,
        &[("detected_http1", 0), ("detected_http2", 0), ("detected_opaque", 1), ("http_requests", 0)],
    );

    // Contrast: sniffed as HTTP on the unpinned port, so what reaches the echo backend is
    // sluice's re-encoding, and the answer is sluice's (the echo is no HTTP response).
    let r = w.raw(ECHO, request, &["--half-close"])?;
    assert_ne!(r.received_text, sent, "{r:?}");
    assert!(r.received_text.starts_with("HTTP/1.1 502"), "{r:?}");
    assert!(r.received_text.to_ascii_lowercase().contains("x-sluice-error: "), "{r:?}");
    let after2 = w.counters()?;
    assert_deltas(&after, &after2, &[("detected_http1", 1), ("detected_opaque", 0), ("http_requests", 1)]);
    Ok(())
}

// ---------------------------------------------------------------- byte-exact passthrough

/// 7. WebSocket through sluice on a sniffed port: the Upgrade is proxied as HTTP/1.1 (101 with
///    its Upgrade header, as RFC 9110 §7.8 requires), then 20 × 70 000-byte messages echo byte
///    for byte over the upgraded connection.
#[test]
fn websocket_echo_through_sluice_is_byte_exact() -> Result<()> {
    let mut w = World::new()?;
    let before = w.counters()?;
    // The handshake as bytes: the backend's 101 must reach the client with its Upgrade and
    // Connection headers (hop-by-hop in general, but they are what a 101 is about).
    let handshake = r"GET /handshake HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let r = w.raw(WS, handshake, &["--half-close", "--read-timeout-ms", "2000"])?;
    let head = r.received_text.split("\r\n\r\n").next().unwrap_or("").to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{r:?}");
    assert!(head.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    let ev = w.ws.wait_for_json(T, |v| v["event"] == "ws_connected" && v["path"] == "/handshake")?;
    assert_eq!(ev["headers"]["upgrade"], "websocket", "the backend got the Upgrade request: {ev}");
    assert!(
        head.contains("\r\nupgrade: websocket") && head.contains("\r\nconnection: upgrade"),
        "the 101 lost its Upgrade/Connection headers in sluice (the backend sends them: the same \
         handshake passes on the opaque kubernetes.io/ws port):\n{head}"
    );

    let url = format!("ws://{VIP}:{WS}/chat?room=1");
    let out = w.client.run_simpod([
        "ws-client",
        "--url",
        &url,
        "--messages",
        "20",
        "--size",
        "70000",
        "--header",
        "x-ws-test: 1",
    ])?;
    let r = out.json()?;
    assert_eq!(r["ok"], true, "{r}\n{}", w.log_tail());
    assert_eq!(r["status"], 101, "{r}");
    assert_eq!(r["messages_received"], 20, "{r}");
    assert_eq!(r["bytes_received"], 20 * 70_000, "{r}");
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(r["sha256_sent"], r["sha256_received"], "{r}");
    assert_eq!(r["close_clean"], true, "{r}");
    assert!(via_sluice(&r), "not through sluice: {r}");
    assert_eq!(r["peer"], vip(WS).to_string(), "{r}");
    let ev = w.ws.wait_for_json(T, |v| v["event"] == "ws_connected" && v["path"] == "/chat?room=1")?;
    assert_eq!(ev["headers"]["x-ws-test"], "1", "{ev}");
    assert_eq!(ev["headers"]["upgrade"], "websocket", "{ev}");
    assert_eq!(ip_of(&ev["peer"]), w.client.ip().to_string(), "{ev}");
    let closed = w.ws.wait_for_json(T, |v| v["event"] == "ws_closed" && v["messages"] != 0)?;
    assert_eq!(closed["messages"], 20, "{closed}");
    assert_eq!(closed["error"], Value::Null, "{closed}");
    let after = w.counters()?;
    assert_deltas(
        &before,
        &after,
        &[("detected_http1", 2), ("detected_opaque", 0), ("http_requests", 2), ("http_upgrades", 2)],
    );
    Ok(())
}

/// 7. WebSocket on an `appProtocol: kubernetes.io/ws` port: never parsed, the whole connection
///    (handshake included) is forwarded as bytes, and 5 × 100 000-byte messages echo exactly.
#[test]
fn websocket_on_a_kubernetes_io_ws_port_is_opaque() -> Result<()> {
    let mut w = World::new()?;
    let before = w.counters()?;
    let url = format!("ws://{VIP}:{WS_PINNED}/pinned");
    let r =
        w.client.run_simpod(["ws-client", "--url", &url, "--messages", "5", "--size", "100000"])?.json()?;
    assert_eq!(r["ok"], true, "{r}\n{}", w.log_tail());
    assert_eq!(r["status"], 101, "{r}");
    assert_eq!(r["messages_received"], 5, "{r}");
    assert_eq!(r["sha256_sent"], r["sha256_received"], "{r}");
    assert!(via_sluice(&r), "not through sluice: {r}");
    let ev = w.ws.wait_for_json(T, |v| v["event"] == "ws_connected")?;
    assert_eq!(ev["path"], "/pinned", "{ev}");
    assert_eq!(ip_of(&ev["peer"]), w.client.ip().to_string(), "{ev}");
    let after = w.counters()?;
    assert_deltas(
        &before,
        &after,
        &[("detected_http1", 0), ("detected_opaque", 1), ("http_requests", 0), ("http_upgrades", 0)],
    );
    Ok(())
}

/// 7. An opaque binary protocol on an unpinned port: 1 MiB of binary, and short payloads that
///    start like text (but are not HTTP), all echoed byte for byte; `/conns` says "tcp".
#[test]
fn opaque_binary_protocol_is_byte_exact() -> Result<()> {
    let w = World::new()?;
    let before = w.counters()?;
    let r = common::tcp_exchange(&w.client, vip(ECHO), 1 << 20)?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["received"], 1 << 20, "{r}");
    assert_eq!(r["sha256_sent"], r["sha256_received"], "{r}");
    assert!(via_sluice(&r), "not through sluice: {r}");

    // NUL first, a TLS-like record, a text line that is no HTTP method, bytes past 0x7f,
    // and an embedded HTTP request line after a binary byte.
    let payloads = [
        "00ff0102030405feedfacecafebabe00000000ffffffff",
        "16030100050100000100",
        "48454c4c4f0d0a776f726c6400017f80ff", // "HELLO\r\nworld" + binary: no space after the token
        "01474554202f20485454502f312e310d0a0d0a", // "\x01GET / HTTP/1.1\r\n\r\n"
    ];
    for p in payloads {
        let r = w.raw_hex(ECHO, p, &["--half-close"])?;
        assert!(r.ok && r.ended == "eof", "{r:?}");
        assert_eq!(r.received_hex, p, "echo of {p} through sluice");
    }
    let after = w.counters()?;
    assert_deltas(
        &before,
        &after,
        &[("detected_http1", 0), ("detected_http2", 0), ("detected_opaque", 5), ("http_requests", 0)],
    );

    let mut hold = Hold::start(&w.client, vip(ECHO))?;
    hold.echo_ok()?;
    let c = w.wait_conn(vip(ECHO), |_| true)?;
    assert_eq!(c["protocol"], "tcp", "{c}");
    assert_eq!(c["requests"], 0, "{c}");
    assert_eq!(c["endpoint"], w.backend.addr(9000).to_string(), "{c}");
    Ok(())
}

/// simpod `tls-client` to `port`: trusts only the backend's certificate, checks its name,
/// offers ALPN h2.
fn tls_client(w: &World, port: u16, bytes: u64) -> Result<Value> {
    let out = w.client.run_simpod([
        "tls-client",
        "--to",
        &vip(port).to_string(),
        "--server-name",
        TLS_NAME,
        "--ca",
        w.cert.to_str().unwrap(),
        "--send-bytes",
        &bytes.to_string(),
        "--alpn",
        "h2",
    ])?;
    out.json()
}

/// 7. TLS from the application to a TLS backend passes through untouched: the client trusts
///    only the backend's self-signed certificate and checks its name, ALPN is negotiated with
///    the backend, and 1 MiB echoes byte for byte. sluice counts it opaque.
#[test]
fn tls_client_to_tls_backend_passes_through() -> Result<()> {
    let mut w = World::new()?;
    let before = w.counters()?;
    let r = tls_client(&w, TLS, 1 << 20)?;
    assert_eq!(r["ok"], true, "{r}\n{}", w.log_tail());
    assert_eq!(r["echo_exact"], true, "{r}");
    assert_eq!(r["sent"], 1 << 20, "{r}");
    assert_eq!(r["received"], 1 << 20, "{r}");
    assert_eq!(r["sha256_sent"], r["sha256_received"], "{r}");
    assert_eq!(r["close_notify"], true, "the backend's close_notify came through: {r}");
    assert_eq!(r["version"], "TLSv1_3", "{r}");
    assert_eq!(r["alpn"], "h2", "ALPN negotiated with the backend itself: {r}");
    assert!(via_sluice(&r), "not through sluice: {r}");
    assert_eq!(r["peer"], vip(TLS).to_string(), "{r}");
    let ev = w.tls.wait_for_json(T, |v| v["event"] == "tls_accepted")?;
    assert_eq!(ev["sni"], TLS_NAME, "{ev}");
    assert_eq!(ip_of(&ev["peer"]), w.client.ip().to_string(), "{ev}");
    let after = w.counters()?;
    assert_deltas(
        &before,
        &after,
        &[("detected_http1", 0), ("detected_http2", 0), ("detected_opaque", 1), ("http_requests", 0)],
    );

    // The same through an `appProtocol: tls` port.
    let r = tls_client(&w, TLS_PINNED, 64 * 1024)?;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["echo_exact"], true, "{r}");
    assert!(via_sluice(&r), "not through sluice: {r}");
    let after2 = w.counters()?;
    assert_deltas(&after, &after2, &[("detected_opaque", 1), ("http_requests", 0)]);
    Ok(())
}

// ---------------------------------------------------------------- bad input

/// 8. Malformed HTTP/1.1 (bad request line, bad header line, garbage on an `appProtocol: http`
///    port) gets 400, a head over --max-header-bytes gets 431, each for that client only: a
///    keep-alive HTTP client and a long opaque connection keep working on their connections,
///    nothing malformed reaches the backend, and sluice stays up.
#[test]
fn malformed_http1_gets_400_or_431_for_that_client_only() -> Result<()> {
    let mut w = World::new()?;
    let pid = w.sluice.pid();
    let mut ka = KeepAlive::start(&w.client, vip(WEB))?;
    let mut hold = Hold::start(&w.client, vip(ECHO))?;
    ka.get_ok("/before")?;
    hold.echo_ok()?;

    let bad: &[(&str, u16, String, &str)] = &[
        (
            "bad request line",
            WEB,
            r"GET /bad-line has spaces HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        (
            "bad header line",
            WEB,
            r"GET /bad-header HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n".into(),
            "HTTP/1.1 400",
        ),
        ("bad version", WEB, r"GET /bad-version HTTP/9.Z\r\nHost: x\r\n\r\n".into(), "HTTP/1.1 400"),
        ("binary on an http port", WEB_PINNED, r"\x00\x01\x02binary\r\n\r\n".into(), "HTTP/1.1 400"),
        (
            "100 KB header",
            WEB,
            format!(r"GET /too-big HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000)),
            "HTTP/1.1 431",
        ),
    ];
    for (what, port, send, want) in bad {
        let r = w.raw(*port, send, &[])?;
        assert!(
            r.received_text.starts_with(want),
            "{what}: expected {want}, got {:?} (ended {}, {} bytes)\n{}",
            &r.received_text[..r.received_text.len().min(300)],
            r.ended,
            r.received_len,
            w.log_tail()
        );
        assert!(closed(&r), "{what}: sluice must close that connection, it {}: {r:?}", r.ended);
        assert!(
            r.local.as_deref().is_some_and(|l| l.starts_with("127.0.0.1:")),
            "{what}: not through sluice"
        );
        eprintln!("{what}: {:?}", r.received_text.lines().next().unwrap_or(""));
        // Everyone else carries on, on the same connections.
        ka.get_ok(&format!("/after/{}", what.replace(' ', "-")))?;
        hold.echo_ok()?;
    }

    // A large head under the limit is fine.
    let big = format!(
        r"GET /big-but-ok HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(32 * 1024)
    );
    let r = w.raw(WEB, &big, &[])?;
    assert!(
        r.received_text.starts_with("HTTP/1.1 200"),
        "32 KiB header: {:?}",
        r.received_text.lines().next()
    );
    ka.get_ok("/after/big-but-ok")?;

    // The backend saw the good requests only.
    w.http.wait_for_json(T, |v| v["event"] == "request" && v["path"] == "/after/big-but-ok")?;
    let paths: Vec<String> = w
        .http
        .json_lines()
        .iter()
        .filter(|v| v["event"] == "request")
        .map(|v| v["path"].as_str().unwrap_or("").to_string())
        .collect();
    for p in ["/bad-line", "/bad-header", "/bad-version", "/too-big"] {
        assert!(!paths.iter().any(|x| x.starts_with(p)), "{p} reached the backend: {paths:?}");
    }
    assert!(paths.iter().any(|x| x == "/big-but-ok"), "{paths:?}");
    w.assert_sluice_up(pid)?;
    Ok(())
}

/// 8. Invalid HTTP/2: a valid preface followed by a malformed frame gets GOAWAY with an error
///    code; an invalid preface on an `appProtocol: kubernetes.io/h2c` port ends that connection
///    (RFC 9113 §3.4 lets the GOAWAY be omitted there), and a near-preface on an unpinned port
///    (sniffed as HTTP/1.1) gets 400; none of it reaches the backend. A gRPC stream, a
///    keep-alive HTTP/1.1 client and a long opaque connection run meanwhile, unaffected; sluice
///    stays up.
#[test]
fn invalid_http2_gets_goaway_for_that_client_only() -> Result<()> {
    let w = World::new()?;
    let pid = w.sluice.pid();
    let mut ka = KeepAlive::start(&w.client, vip(WEB))?;
    let mut hold = Hold::start(&w.client, vip(ECHO))?;
    ka.get_ok("/before")?;
    hold.echo_ok()?;
    // An HTTP/2 client in flight the whole time: 30 items, 100 ms apart.
    let mut args = vec![workloads::slgrpc_bin()?.into_os_string()];
    for a in ["stream", "--to", &vip(H2).to_string(), "--n", "30", "--interval-ms", "100"] {
        args.push(a.into());
    }
    let mut stream = w.client.spawn(args)?;
    stream.wait_for_json(T, |v| v["event"] == "item")?;

    // Valid preface, empty SETTINGS, then a SETTINGS frame of 3 bytes (must be a multiple of 6:
    // FRAME_SIZE_ERROR).
    let bad_frame = format!("{H2_PREFACE_HEX}000000040000000000000003040000000000000000");
    let r = w.raw_hex(H2, &bad_frame, &[])?;
    assert!(closed(&r), "sluice must close the connection after GOAWAY, it {}: {r:?}", r.ended);
    let frames = h2_frames(&unhex(&r.received_hex)).with_context(|| format!("{r:?}"))?;
    let code = goaway_code(&frames);
    eprintln!(
        "bad frame: frames {:?}, GOAWAY code {code:?}",
        frames.iter().map(|f| f.kind).collect::<Vec<_>>()
    );
    assert!(
        code.is_some_and(|c| c != 0),
        "expected GOAWAY with an error code, got {frames:?}\n{}",
        w.log_tail()
    );
    assert!(frames.iter().all(|f| f.stream == 0), "connection-level frames only: {frames:?}");
    ka.get_ok("/after/bad-frame")?;
    hold.echo_ok()?;

    // Garbage instead of the preface on a port pinned to h2c.
    let r = w.raw_hex(H2_PINNED, "0000000000000000000000000000000000000000000000000000000000", &[])?;
    assert!(closed(&r), "invalid preface on the h2c port: sluice must close, it {}: {r:?}", r.ended);
    let frames = h2_frames(&unhex(&r.received_hex)).with_context(|| format!("not HTTP/2 frames: {r:?}"))?;
    eprintln!(
        "invalid preface (pinned h2c): frames {:?}, GOAWAY {:?}",
        frames.iter().map(|f| (f.kind, f.flags)).collect::<Vec<_>>(),
        goaway_code(&frames)
    );
    assert!(frames.iter().all(|f| f.kind == H2_SETTINGS || f.kind == H2_GOAWAY), "{frames:?}");
    ka.get_ok("/after/bad-preface-pinned")?;
    hold.echo_ok()?;

    // Almost the preface, on the unpinned port ("PRI * HTTP/2.0" then not "SM").
    let r = w.raw(H2, r"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", &[])?;
    assert!(closed(&r), "near-preface: sluice must close, it {}: {r:?}", r.ended);
    assert!(r.received_text.starts_with("HTTP/1.1 400"), "near-preface: {r:?}");
    eprintln!("near-preface (unpinned): {} bytes back: {:?}", r.received_len, r.received_text);
    ka.get_ok("/after/bad-preface")?;
    hold.echo_ok()?;

    // None of it reached the backend; the stream finished with every item.
    let done = stream.wait_output(T)?;
    let last = done.json()?;
    assert_eq!(last["ok"], true, "the gRPC stream was disturbed: {last}");
    assert_eq!(last["received"], 30, "{last}");
    let events: Vec<Value> = w
        .grpc
        .json_lines()
        .into_iter()
        .filter(|v| v["event"] == "call" || v["event"] == "unknown_method")
        .collect();
    assert!(
        events.len() == 1 && events[0]["method"] == "/sluice.test.Echo/Count",
        "bad input reached the h2 backend (only the stream's call should be there): {events:?}"
    );
    w.assert_sluice_up(pid)?;
    Ok(())
}

/// A port pinned to HTTP/2 (`kubernetes.io/h2c`) speaks HTTP/2 only: nghttp works there, and
/// an HTTP/1.1 request is an invalid preface (the connection ends without an HTTP/1.1
/// response), not an HTTP/1.1 exchange.
#[test]
fn h2c_pinned_port_is_http2_only() -> Result<()> {
    let mut w = World::new()?;
    let before = w.counters()?;
    let url = format!("http://{VIP}:{H2_PINNED}/pinned/h2c");
    let out = w.client.run_timeout(["nghttp", "-v", "--timeout=10", &url], Duration::from_secs(30))?;
    ensure!(out.success(), "nghttp failed ({}):\n{}\n{}", out.status, out.stdout, out.stderr);
    assert!(out.stdout.contains(&format!("x-slgrpc-server: {GRPC_NAME}")), "{}", out.stdout);
    let ev = w.grpc.wait_for_json(T, |v| v["event"] == "unknown_method")?;
    assert_eq!(ev["method"], "/pinned/h2c", "{ev}");
    let after = w.counters()?;
    assert_deltas(&before, &after, &[("detected_http1", 0), ("detected_http2", 1), ("http_requests", 1)]);

    let r =
        w.raw(H2_PINNED, r"GET /h1-on-h2c HTTP/1.1\r\nHost: x\r\n\r\n", &["--read-timeout-ms", "2000"])?;
    eprintln!("HTTP/1.1 on the h2c port: ended {}, got {:?}", r.ended, r.received_text);
    let after2 = w.counters()?;
    assert!(
        !r.received_text.starts_with("HTTP/1.1"),
        "an HTTP/1.1 request on a kubernetes.io/h2c port was served as HTTP/1.1: {:?} (counter changes: \
         detected_http1 {}, detected_http2 {})\n{}",
        r.received_text,
        delta(&after, &after2, "detected_http1"),
        delta(&after, &after2, "detected_http2"),
        w.log_tail()
    );
    assert!(closed(&r), "sluice must close the connection, it {}: {r:?}", r.ended);
    assert_deltas(&after, &after2, &[("detected_http1", 0), ("detected_http2", 1)]);
    Ok(())
}

// ---------------------------------------------------------------- server-first

/// 9. A server-first protocol works through sluice. On an unpinned port sluice waits the detect
///    timeout for the client's first bytes, then forwards as opaque: the banner arrives after
///    about 250 ms. Where nothing is sniffed (`appProtocol: tcp`, a `tcp-` port name, MySQL's
///    3306) it arrives at once.
#[test]
fn server_first_protocol_works_through_sluice() -> Result<()> {
    let w = World::new()?;
    // Warm up the path to the backend (tunnel, certificates) so the timings below measure
    // detection, not the first connection's setup.
    common::expect_ok(&common::tcp_exchange(&w.client, vip(ECHO_PINNED), 16)?)?;
    let before = w.counters()?;

    let sniffed = w.banner(BANNER)?;
    assert_eq!(sniffed["banner"], "220 banner.test ESMTP ready", "{sniffed}");
    assert_eq!(sniffed["echo"], "QUIT", "{sniffed}");
    assert!(via_sluice(&sniffed), "not through sluice: {sniffed}");
    let sniffed_ms = sniffed["banner_ms"].as_f64().context("banner_ms")?;

    let mut figures = vec![("unpinned 2525", sniffed_ms)];
    for (what, port, banner) in [
        ("appProtocol tcp 2526", BANNER_PINNED, "220 banner.test ESMTP ready"),
        ("port name tcp-banner 2527", BANNER_NAMED, "220 banner.test ESMTP ready"),
        ("default opaque 3306", MYSQL, "mysql-ish greeting"),
    ] {
        let r = w.banner(port)?;
        assert_eq!(r["banner"], banner, "{r}");
        assert_eq!(r["echo"], "QUIT", "{r}");
        assert!(via_sluice(&r), "not through sluice: {r}");
        figures.push((what, r["banner_ms"].as_f64().context("banner_ms")?));
    }
    eprintln!("banner_ms: {figures:?}");
    assert!(
        (DETECT_TIMEOUT_MS - 50.0..2000.0).contains(&sniffed_ms),
        "unpinned: the banner should come after about the detect timeout: {figures:?}"
    );
    for (what, ms) in &figures[1..] {
        assert!(*ms < NO_SNIFF_BANNER_MS, "{what}: the banner waited for detection ({ms} ms): {figures:?}");
    }
    let after = w.counters()?;
    assert_deltas(&before, &after, &[("detected_http1", 0), ("detected_http2", 0), ("detected_opaque", 4)]);
    Ok(())
}

/// `sluice run --detect-timeout-ms` sets how long a silent client is waited for.
#[test]
fn detect_timeout_flag_sets_the_wait_for_silent_clients() -> Result<()> {
    let opts = SluiceOpts { args: vec!["--detect-timeout-ms".into(), "700".into()], ..Default::default() };
    let w = World::with(opts)?;
    common::expect_ok(&common::tcp_exchange(&w.client, vip(ECHO_PINNED), 16)?)?;
    let sniffed = w.banner(BANNER)?;
    let sniffed_ms = sniffed["banner_ms"].as_f64().context("banner_ms")?;
    let pinned = w.banner(BANNER_PINNED)?;
    let pinned_ms = pinned["banner_ms"].as_f64().context("banner_ms")?;
    eprintln!("--detect-timeout-ms 700: banner_ms unpinned {sniffed_ms}, pinned {pinned_ms}");
    assert!((650.0..3000.0).contains(&sniffed_ms), "unpinned banner after {sniffed_ms} ms");
    assert!(pinned_ms < NO_SNIFF_BANNER_MS, "pinned banner after {pinned_ms} ms");
    Ok(())
}
