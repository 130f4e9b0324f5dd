//! Telemetry acceptance (issue "Telemetry"): access logs and distributed tracing end to end.
//!
//! Two simulated nodes, a sluice on each, a client pod on node 1 and a backend pod on node 2
//! in the namespace `shop` (enrolled, `sluice.dev/access-log: enabled`), behind Service
//! shop/web (HTTP 80→8080, opaque TCP 9000 pinned with `appProtocol: tcp`, gRPC 50051). Every
//! request crosses both proxies: the source node's sluice reports it as `reporter=source` (and
//! makes the CLIENT span), the destination node's as `reporter=destination` (the SERVER span).
//!
//! - Access logs go to a file per node (`--access-log`); the tests read the JSON lines and the
//!   `access_log_written` / `access_log_dropped` counters of `/status`, and require that every
//!   request is either a line or counted as dropped, on both nodes.
//! - Spans go to a test OTLP/gRPC collector (`slotlp`) running inside each node's network
//!   namespace on 127.0.0.1:4317 (`--otlp-endpoint http://127.0.0.1:4317`); it prints one JSON
//!   line per span it received.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fs::{File, OpenOptions},
    io::{ErrorKind, Read},
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use common::{expect_ok, tcp_exchange, wait_enrolled, T};
use serde_json::Value;
use sluice_tests::{
    manifest,
    workloads::{self, start_grpc_server, start_http_server},
    Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts,
};

const VIP: &str = "10.96.0.40";
const QUIET_VIP: &str = "10.96.0.41";
const HTTP_PORT: u16 = 80;
const HTTP_TARGET_PORT: u16 = 8080;
const TCP_PORT: u16 = 9000;
const GRPC_PORT: u16 = 50051;
const OTLP_PORT: u16 = 4317;
const TD: &str = "cluster.local";
/// How long records may take to reach a log file or a collector (the span exporter flushes
/// every 500 ms).
const ARRIVAL: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

fn vip(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().unwrap()
}

fn quiet_vip(port: u16) -> SocketAddr {
    format!("{QUIET_VIP}:{port}").parse().unwrap()
}

/// What the world is built with.
#[derive(Default, Clone)]
struct Cfg {
    /// Access logs on both nodes, each to its own file.
    access_log: bool,
    /// `--access-log-queue N` on both nodes.
    access_log_queue: Option<usize>,
    /// Node 1's access log is a FIFO the test reads only when it wants to (a writer that cannot
    /// keep up: the queue fills and records are dropped).
    fifo_on_n1: bool,
    /// Start a collector on each node and export spans with this `--trace-sampling`.
    trace_sampling: Option<f64>,
    /// Also an enrolled namespace `quiet` without the access-log annotation: a client on node
    /// 1, a backend on node 2 behind quiet/api.
    quiet_namespace: bool,
}

#[allow(dead_code)] // the handles keep the sim, its processes and sluices alive
struct World {
    sim: Sim,
    n1: Node,
    n2: Node,
    client: Pod,
    backend: Pod,
    /// The client and backend of the namespace `quiet`.
    quiet: Option<(Pod, Pod)>,
    http_server: SimProcess,
    grpc_server: SimProcess,
    _servers: Vec<SimProcess>,
    /// The OTLP collectors of node 1 and node 2.
    otlp: Option<(SimProcess, SimProcess)>,
    /// Node 1's and node 2's access logs.
    logs: Option<(AccessLog, AccessLog)>,
    s1: Sluice,
    s2: Sluice,
}

fn ns_yaml(name: &str, access_log: bool) -> Result<String> {
    let mut ns = manifest::namespace(name, true);
    if access_log {
        ns = manifest::with_annotation(ns, manifest::ACCESS_LOG_ANNOTATION, "enabled");
    }
    manifest::to_yaml(&[ns])
}

/// Service `ns/name` at `ip` with HTTP 80→8080, opaque TCP 9000 (`appProtocol: tcp`) and gRPC
/// 50051 (`appProtocol: kubernetes.io/h2c`) on `backends`.
fn write_service(sim: &Sim, ns: &str, name: &str, ip: &str, backends: &[&Pod]) -> Result<()> {
    let node_names: Vec<String> = backends.iter().map(|p| p.node().name().to_string()).collect();
    let eps: Vec<manifest::Endpoint> = backends
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
    let docs = manifest::service(
        ns,
        name,
        ip,
        &[("http", HTTP_PORT, HTTP_TARGET_PORT), ("echo", TCP_PORT, TCP_PORT), ("rpc", GRPC_PORT, GRPC_PORT)],
        &eps,
    );
    let docs = manifest::with_app_protocol(docs, "echo", "tcp");
    let docs = manifest::with_app_protocol(docs, "rpc", "kubernetes.io/h2c");
    sim.write_file(&manifest::service_file_name(ns, name), manifest::to_yaml(&docs)?)?;
    Ok(())
}

/// The test OTLP collector binary, next to simpod.
fn slotlp_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("SLOTLP_BIN") {
        Some(p) => PathBuf::from(p),
        None => sluice_tests::simpod_bin()?.with_file_name("slotlp"),
    };
    ensure!(path.is_file(), "slotlp not found at {} (cargo build -p sluice-tests --bins)", path.display());
    Ok(path)
}

/// `slotlp --port 4317` in the node's network namespace (where that node's sluice exports).
fn start_collector(node: &Node) -> Result<SimProcess> {
    let args: Vec<OsString> = vec![slotlp_bin()?.into(), "--port".into(), OTLP_PORT.to_string().into()];
    let mut p = node.spawn(args)?;
    p.wait_listening(T).with_context(|| format!("slotlp on {}", node.short_name()))?;
    Ok(p)
}

fn world(cfg: Cfg) -> Result<World> {
    let sim = Sim::new()?;
    let n1 = sim.add_node("n1")?;
    let n2 = sim.add_node("n2")?;
    sim.write_file(&manifest::namespace_file_name("shop"), ns_yaml("shop", true)?)?;
    let backend =
        n2.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]).service_account("web-sa"))?;
    let http_server = start_http_server(&backend, HTTP_TARGET_PORT, "web-0", &[])?;
    let grpc_server = start_grpc_server(&backend, GRPC_PORT, "grpc-0")?;
    let mut echo = backend.simpod(["echo-server", "--port", &TCP_PORT.to_string()])?;
    echo.wait_listening(T)?;
    let mut servers = vec![echo];
    write_service(&sim, "shop", "web", VIP, &[&backend])?;
    let client =
        n1.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]).service_account("client-sa"))?;
    let quiet = if cfg.quiet_namespace {
        sim.write_file(&manifest::namespace_file_name("quiet"), ns_yaml("quiet", false)?)?;
        let qweb = n2.add_pod("quiet", "q-web", PodOpts::labels(&[("app", "q-web")]))?;
        servers.push(start_http_server(&qweb, HTTP_TARGET_PORT, "q-web", &[])?);
        let mut qecho = qweb.simpod(["echo-server", "--port", &TCP_PORT.to_string()])?;
        qecho.wait_listening(T)?;
        servers.push(qecho);
        write_service(&sim, "quiet", "api", QUIET_VIP, &[&qweb])?;
        let qclient = n1.add_pod("quiet", "q-client", PodOpts::labels(&[("app", "q-client")]))?;
        Some((qclient, qweb))
    } else {
        None
    };
    let otlp = match cfg.trace_sampling {
        Some(_) => Some((start_collector(&n1)?, start_collector(&n2)?)),
        None => None,
    };
    let mut logs = None;
    let mut args: [Vec<OsString>; 2] = Default::default();
    if cfg.access_log {
        let p1 = sim.temp_dir().join("access-n1.log");
        let p2 = sim.temp_dir().join("access-n2.log");
        // A FIFO must have its reader before sluice opens it for writing (or the open blocks).
        let l1 = if cfg.fifo_on_n1 { Some(AccessLog::fifo(&p1)?) } else { None };
        for (a, p) in args.iter_mut().zip([&p1, &p2]) {
            a.extend(["--access-log".into(), p.clone().into_os_string()]);
            if let Some(q) = cfg.access_log_queue {
                a.extend(["--access-log-queue".into(), q.to_string().into()]);
            }
        }
        logs = Some((l1, p1, p2));
    }
    if let Some(s) = cfg.trace_sampling {
        for a in args.iter_mut() {
            a.extend([
                "--otlp-endpoint".into(),
                format!("http://127.0.0.1:{OTLP_PORT}").into(),
                "--trace-sampling".into(),
                s.to_string().into(),
            ]);
        }
    }
    let [a1, a2] = args;
    let s1 = n1.start_sluice(SluiceOpts { args: a1, ..Default::default() })?;
    let s2 = n2.start_sluice(SluiceOpts { args: a2, ..Default::default() })?;
    s1.wait_ready(T)?;
    s2.wait_ready(T)?;
    wait_enrolled(&s1, &client)?;
    wait_enrolled(&s2, &backend)?;
    if let Some((qc, qw)) = &quiet {
        wait_enrolled(&s1, qc)?;
        wait_enrolled(&s2, qw)?;
    }
    // Both nodes know every Service before traffic starts.
    for s in [&s1, &s2] {
        s.wait_for(
            "/model",
            |m| {
                let text = m.to_string();
                text.contains(VIP) && (quiet.is_none() || text.contains(QUIET_VIP))
            },
            T,
        )
        .context("waiting for the Services in the model")?;
    }
    let logs = match logs {
        Some((l1, p1, p2)) => Some((
            match l1 {
                Some(l) => l,
                None => AccessLog::file(&p1)?,
            },
            AccessLog::file(&p2)?,
        )),
        None => None,
    };
    Ok(World {
        sim,
        n1,
        n2,
        client,
        backend,
        quiet,
        http_server,
        grpc_server,
        _servers: servers,
        otlp,
        logs,
        s1,
        s2,
    })
}

impl World {
    fn logs(&mut self) -> (&mut AccessLog, &mut AccessLog) {
        let (a, b) = self.logs.as_mut().expect("world built with access logs");
        (a, b)
    }

    fn collectors(&self) -> (&SimProcess, &SimProcess) {
        let (a, b) = self.otlp.as_ref().expect("world built with collectors");
        (a, b)
    }

    /// One `simpod http-get` from the client with extra headers; the result line (checked ok
    /// and 200), whose `body.headers` are the request headers the backend received.
    fn get(&self, path: &str, headers: &[&str]) -> Result<Value> {
        get_from(&self.client, vip(HTTP_PORT), path, headers)
    }

    /// Lines of both sluice logs that say something went wrong, for failure messages.
    fn sluice_complaints(&self) -> String {
        let mut out = String::new();
        for (n, s) in [("n1", &self.s1), ("n2", &self.s2)] {
            for l in s.log_contents().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(20) {
                out += &format!("[{n}] {l}\n");
            }
        }
        out
    }
}

fn get_from(pod: &Pod, to: SocketAddr, path: &str, headers: &[&str]) -> Result<Value> {
    let mut args = vec!["http-get".to_string(), "--to".into(), to.to_string(), "--path".into(), path.into()];
    for h in headers {
        args.push("--header".into());
        args.push(h.to_string());
    }
    let out = pod.run_simpod(&args)?;
    let v = out.json().with_context(|| format!("http-get: {}", out.stderr))?;
    expect_ok(&v)?;
    ensure!(v["status"] == 200, "expected 200 for {path}, got {v}");
    Ok(v)
}

/// Expectations gathered and reported together, so that one run shows everything that is
/// wrong rather than the first thing.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn finish(self) -> Result<()> {
        ensure!(self.0.is_empty(), "{} expectation(s) failed:\n- {}", self.0.len(), self.0.join("\n- "));
        Ok(())
    }
}

// ---------------------------------------------------------------- access log files

/// An access log file (or FIFO) read incrementally: complete lines parsed as JSON.
struct AccessLog {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
    lines: Vec<Value>,
}

impl AccessLog {
    /// A regular file sluice created (it opens it at startup, before it is ready).
    fn file(path: &Path) -> Result<AccessLog> {
        let file = File::open(path).with_context(|| format!("opening the access log {}", path.display()))?;
        Ok(AccessLog { path: path.to_owned(), file, pending: Vec::new(), lines: Vec::new() })
    }

    /// A FIFO at `path`, opened for reading without blocking (so sluice's open for writing
    /// finds a reader). Nothing is read until [`poll`](Self::poll).
    fn fifo(path: &Path) -> Result<AccessLog> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mkfifo {}", path.display()));
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("opening the FIFO {}", path.display()))?;
        Ok(AccessLog { path: path.to_owned(), file, pending: Vec::new(), lines: Vec::new() })
    }

    /// Reads what is there now; returns how many complete lines there are so far.
    fn poll(&mut self) -> Result<usize> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
            }
        }
        while let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line);
            let v: Value = serde_json::from_str(text.trim())
                .with_context(|| format!("{}: access log line is not JSON: {text}", self.path.display()))?;
            self.lines.push(v);
        }
        Ok(self.lines.len())
    }

    fn matching(&self, pred: impl Fn(&Value) -> bool) -> Vec<&Value> {
        self.lines.iter().filter(|l| pred(l)).collect()
    }
}

/// `(access_log_written, access_log_dropped)` from `/status`.
fn log_counters(s: &Sluice) -> Result<(u64, u64)> {
    let status = s.get_json("/status")?;
    let c = &status["counters"];
    let get = |name: &str| {
        c[name].as_u64().with_context(|| {
            format!("/status counters have no {name} (the access log counters must be readable): {c}")
        })
    };
    Ok((get("access_log_written")?, get("access_log_dropped")?))
}

/// Polls until every one of `expected` records is accounted for on this node: the file holds
/// as many lines as sluice says it wrote, and written + dropped == expected. Returns dropped.
fn wait_accounted(s: &Sluice, log: &mut AccessLog, expected: u64, what: &str) -> Result<u64> {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let lines = log.poll()? as u64;
        let (written, dropped) = log_counters(s)?;
        if lines == written && written + dropped == expected {
            return Ok(dropped);
        }
        ensure!(
            written + dropped <= expected && lines <= written,
            "{what}: more records than requests: {lines} lines in {}, written {written}, dropped {dropped}, {expected} expected",
            log.path.display()
        );
        if Instant::now() >= deadline {
            bail!(
                "{what}: after {ARRIVAL:?}, {lines} lines in {} (sluice says written {written}, dropped {dropped}); {expected} requests must each be a line or a drop",
                log.path.display()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Polls until a line satisfying `pred` is in the log.
fn wait_line(log: &mut AccessLog, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        log.poll()?;
        if let Some(l) = log.lines.iter().find(|l| pred(l)) {
            return Ok(l.clone());
        }
        if Instant::now() >= deadline {
            let tail: Vec<String> = log.lines.iter().rev().take(5).map(|l| l.to_string()).collect();
            bail!("{what}: no such line in {} after {ARRIVAL:?}; last lines: {tail:#?}", log.path.display());
        }
        std::thread::sleep(POLL);
    }
}

fn identity(ns: &str, sa: &str) -> String {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}")
}

/// A principal names the SPIFFE identity, with or without the `spiffe://` scheme.
fn is_principal(v: &Value, ns: &str, sa: &str) -> bool {
    let id = identity(ns, sa);
    v.as_str().is_some_and(|p| p == id || Some(p) == id.strip_prefix("spiffe://"))
}

fn is_hex(v: &Value, len: usize) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
    })
}

/// `2026-01-02T03:04:05.678Z`-like (RFC 3339, UTC or with an offset).
fn is_rfc3339(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let b = s.as_bytes();
    s.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s[..4].parse::<u32>().is_ok_and(|y| y >= 2024)
        && (s.ends_with('Z') || s[19..].contains(['+', '-']))
}

/// Checks one HTTP access-log line of a GET `path` from the client to the backend (as either
/// reporter); returns what is wrong, if anything.
fn http_line_problems(
    l: &Value,
    reporter: &str,
    path: &str,
    client_ip: &str,
    backend: SocketAddr,
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut check = |ok: bool, what: &str| {
        if !ok {
            bad.push(what.to_string());
        }
    };
    check(l["kind"] == "http", "kind http");
    check(l["reporter"] == reporter, "reporter");
    check(is_rfc3339(&l["time"]), "time (RFC 3339)");
    check(l["duration_ms"].as_f64().is_some_and(|d| (0.0..60_000.0).contains(&d)), "duration_ms");
    check(l["source"]["workload"] == "client", "source.workload");
    check(l["source"]["namespace"] == "shop", "source.namespace");
    check(l["source"]["pod"] == "client", "source.pod");
    check(is_principal(&l["source"]["principal"], "shop", "client-sa"), "source.principal");
    check(
        l["source"]["address"].as_str().is_some_and(|a| a.starts_with(&format!("{client_ip}:"))),
        "source.address (the client pod's IP)",
    );
    // A bare pod's workload is its app label; the pod keeps its own name.
    check(l["destination"]["workload"] == "web", "destination.workload");
    check(l["destination"]["namespace"] == "shop", "destination.namespace");
    check(l["destination"]["pod"] == "web-0", "destination.pod");
    check(is_principal(&l["destination"]["principal"], "shop", "web-sa"), "destination.principal");
    check(l["destination"]["address"] == backend.to_string(), "destination.address");
    check(l["destination_service"] == "web.shop.svc.cluster.local", "destination_service");
    check(l["protocol"] == "http", "protocol");
    check(l["method"] == "GET", "method");
    check(l["authority"] == format!("{VIP}:{HTTP_PORT}"), "authority");
    check(l["path"] == path, "path");
    check(l["status"] == 200, "status");
    check(l["response_flags"] == "-", "response_flags");
    check(l["bytes_received"] == 0, "bytes_received (a GET has no body)");
    check(l["bytes_sent"].as_u64().is_some_and(|b| b > 100), "bytes_sent (simpod's JSON answer)");
    check(l["upstream"] == backend.to_string(), "upstream");
    check(l["connection_security_policy"] == "mutual_tls", "connection_security_policy");
    check(is_hex(&l["trace_id"], 32), "trace_id (32 hex digits)");
    check(l["request_id"].as_str().is_some_and(|r| !r.is_empty()), "request_id");
    bad
}

/// Checks every line; each kind of problem is reported once, with how many lines have it and
/// the first such line.
fn check_http_lines(
    c: &mut Checks,
    lines: &[&Value],
    reporter: &str,
    path: &str,
    client_ip: &str,
    backend: SocketAddr,
) {
    let mut tally: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for l in lines {
        for p in http_line_problems(l, reporter, path, client_ip, backend) {
            tally.entry(p).or_insert_with(|| (0, l.to_string())).0 += 1;
        }
    }
    for (problem, (n, example)) in tally {
        c.check(false, || {
            format!("{n} of {} {reporter} lines have a wrong {problem}; first: {example}", lines.len())
        });
    }
}

// ---------------------------------------------------------------- access log tests

/// 10 000 HTTP/1.1 requests from node 1's client to node 2's backend (8 keep-alive
/// connections): node 1 writes a `reporter=source` line and node 2 a `reporter=destination`
/// line per request with every field, or counts it as dropped; both sides of one request
/// carry the same request id and trace id.
#[test]
fn access_log_10000_requests_both_reporters() -> Result<()> {
    const N: u64 = 10_000;
    let mut w = world(Cfg { access_log: true, ..Default::default() })?;
    let started = Instant::now();
    let load = workloads::http_load(
        &w.client,
        vip(HTTP_PORT),
        &["--count", &N.to_string(), "--connections", "8", "--path", "/al"],
    )?;
    ensure!(load.requests == N, "http-load sent {} requests, not {N}: {load:?}", load.requests);
    ensure!(
        load.succeeded == N,
        "not every request succeeded: {:?} {:?}\n{}",
        load.by_status,
        load.first_error,
        w.sluice_complaints()
    );
    let load_time = started.elapsed();
    let client_ip = w.client.ip().to_string();
    let backend = w.backend.addr(HTTP_TARGET_PORT);
    let (s1, s2) = (&w.s1, &w.s2);
    let (l1, l2) = w.logs.as_mut().unwrap();
    let d1 = wait_accounted(s1, l1, N, "node 1 (source)")?;
    let d2 = wait_accounted(s2, l2, N, "node 2 (destination)")?;
    eprintln!(
        "{N} requests in {load_time:?}: node 1 {} lines + {d1} dropped, node 2 {} lines + {d2} dropped",
        l1.lines.len(),
        l2.lines.len()
    );
    let src: Vec<&Value> = l1.matching(|_| true);
    let dst: Vec<&Value> = l2.matching(|_| true);
    let mut c = Checks::default();
    check_http_lines(&mut c, &src, "source", "/al", &client_ip, backend);
    check_http_lines(&mut c, &dst, "destination", "/al", &client_ip, backend);
    // One request, two lines: the same request id and trace id on both nodes.
    let by_id: BTreeMap<&str, &Value> =
        dst.iter().filter_map(|l| Some((l["request_id"].as_str()?, *l))).collect();
    c.check(by_id.len() == dst.len(), || {
        format!("{} distinct request ids among node 2's {} lines", by_id.len(), dst.len())
    });
    let ids: BTreeSet<&str> = src.iter().filter_map(|l| l["request_id"].as_str()).collect();
    c.check(ids.len() == src.len(), || {
        format!("{} distinct request ids among node 1's {} lines", ids.len(), src.len())
    });
    let (mut matched, mut other_trace, mut other_ids) = (0u64, Vec::new(), Vec::new());
    for l in &src {
        if let Some(d) = l["request_id"].as_str().and_then(|id| by_id.get(id)) {
            matched += 1;
            if d["trace_id"] != l["trace_id"] {
                other_trace.push(format!("{l} vs {d}"));
            }
            if d["source"]["principal"] != l["source"]["principal"]
                || d["destination"]["principal"] != l["destination"]["principal"]
            {
                other_ids.push(format!("{l} vs {d}"));
            }
        }
    }
    c.check(other_trace.is_empty(), || {
        format!(
            "{} requests have different trace ids on the two nodes, e.g. {}",
            other_trace.len(),
            other_trace[0]
        )
    });
    c.check(other_ids.is_empty(), || {
        format!(
            "{} requests name the identities differently on the two nodes, e.g. {}",
            other_ids.len(),
            other_ids[0]
        )
    });
    if d1 == 0 && d2 == 0 {
        c.check(matched == N, || {
            format!("only {matched} of {N} requests have a line on both nodes with the same request id")
        });
    }
    c.finish()
}

/// An opaque TCP connection (`appProtocol: tcp`) leaves a `kind=tcp` line on both nodes with
/// its byte counts; an enrolled namespace without the annotation leaves no line at all (HTTP or
/// TCP), on either node.
#[test]
fn access_log_tcp_connection_and_silent_namespace() -> Result<()> {
    let mut w = world(Cfg { access_log: true, quiet_namespace: true, ..Default::default() })?;
    let (qclient, _) = w.quiet.clone().unwrap();
    // The namespace without the annotation: HTTP and TCP through both proxies.
    for i in 0..5 {
        get_from(&qclient, quiet_vip(HTTP_PORT), &format!("/quiet-{i}"), &[])?;
    }
    let r = tcp_exchange(&qclient, quiet_vip(TCP_PORT), 777)?;
    expect_ok(&r)?;
    // The shop namespace: one opaque connection, 1234 bytes each way.
    let r = tcp_exchange(&w.client, vip(TCP_PORT), 1234)?;
    expect_ok(&r)?;
    ensure!(r["received"] == 1234, "echo incomplete: {r}");
    // A connection's line is written when it closes: wait until neither node tracks a
    // connection of these pods any more, then send a last request and wait for its lines; all
    // earlier records were queued before it.
    for s in [&w.s1, &w.s2] {
        s.wait_for(
            "/conns",
            |v| {
                v.as_array().is_some_and(|c| {
                    !c.iter().any(|c| {
                        c["original_dst"].as_str().is_some_and(|d| d.ends_with(&format!(":{TCP_PORT}")))
                    })
                })
            },
            T,
        )?;
    }
    w.get("/marker", &[])?;
    let client_ip = w.client.ip().to_string();
    let backend_http = w.backend.addr(HTTP_TARGET_PORT);
    let backend_echo = w.backend.addr(TCP_PORT);
    let mut c = Checks::default();
    let (l1, l2) = w.logs();
    for (log, reporter) in [(&mut *l1, "source"), (&mut *l2, "destination")] {
        let marker = wait_line(log, &format!("{reporter}: the marker request"), |l| l["path"] == "/marker")?;
        check_http_lines(&mut c, &[&marker], reporter, "/marker", &client_ip, backend_http);
        let tcp = wait_line(log, &format!("{reporter}: the shop TCP connection"), |l| l["kind"] == "tcp")?;
        for (ok, what) in [
            (tcp["reporter"] == reporter, "reporter"),
            (is_rfc3339(&tcp["time"]), "time"),
            (tcp["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "duration_ms"),
            (
                tcp["source"]["workload"] == "client" && tcp["source"]["namespace"] == "shop",
                "source workload",
            ),
            (is_principal(&tcp["source"]["principal"], "shop", "client-sa"), "source.principal"),
            (
                tcp["source"]["address"].as_str().is_some_and(|a| a.starts_with(&format!("{client_ip}:"))),
                "source.address",
            ),
            (
                tcp["destination"]["workload"] == "web" && tcp["destination"]["namespace"] == "shop",
                "destination workload",
            ),
            (is_principal(&tcp["destination"]["principal"], "shop", "web-sa"), "destination.principal"),
            (tcp["destination"]["address"] == backend_echo.to_string(), "destination.address"),
            (tcp["destination_service"] == "web.shop.svc.cluster.local", "destination_service"),
            (tcp["bytes_received"] == 1234, "bytes_received (client to server)"),
            (tcp["bytes_sent"] == 1234, "bytes_sent (server to client)"),
            (tcp["connection_security_policy"] == "mutual_tls", "connection_security_policy"),
            (tcp["response_flags"] == "-", "response_flags"),
            (tcp.get("method").is_none() && tcp.get("status").is_none(), "no HTTP fields"),
        ] {
            c.check(ok, || format!("{reporter} TCP line: wrong {what}: {tcp}"));
        }
        let tcp_lines = log.matching(|l| l["kind"] == "tcp");
        c.check(tcp_lines.len() == 1, || {
            format!("{reporter}: one TCP connection, {} TCP lines: {tcp_lines:?}", tcp_lines.len())
        });
        let quiet = log.matching(|l| {
            l["source"]["namespace"] == "quiet"
                || l["destination"]["namespace"] == "quiet"
                || l.to_string().contains(QUIET_VIP)
                || l["path"].as_str().is_some_and(|p| p.starts_with("/quiet"))
        });
        c.check(quiet.is_empty(), || {
            format!("{reporter}: the namespace without the annotation was logged: {quiet:?}")
        });
        // Exactly: the TCP connection and the marker.
        c.check(log.lines.len() == 2, || {
            format!("{reporter}: expected 2 lines (TCP + marker), got {:?}", log.lines)
        });
    }
    let (l1, l2) = w.logs.as_ref().unwrap();
    for (s, log, n) in [(&w.s1, l1, "n1"), (&w.s2, l2, "n2")] {
        let (written, dropped) = log_counters(s)?;
        c.check(written == log.lines.len() as u64 && dropped == 0, || {
            format!("{n}: written {written}, dropped {dropped}, {} lines", log.lines.len())
        });
    }
    c.finish()
}

/// `--access-log-queue 1` and a writer that cannot keep up (node 1 writes into a FIFO nobody
/// reads during the burst): records beyond the queue are dropped and counted, never waited
/// for; every request of a 2000-request burst over 16 connections is answered, and lines +
/// dropped == requests on both nodes. Once the reader catches up, logging resumes.
#[test]
fn access_log_tiny_queue_drops_are_counted_and_traffic_flows() -> Result<()> {
    const N: u64 = 2000;
    let mut w =
        world(Cfg { access_log: true, access_log_queue: Some(1), fifo_on_n1: true, ..Default::default() })?;
    let started = Instant::now();
    let load = workloads::http_load(
        &w.client,
        vip(HTTP_PORT),
        &["--count", &N.to_string(), "--connections", "16", "--path", "/burst"],
    )?;
    ensure!(load.requests == N, "http-load sent {} requests, not {N}", load.requests);
    ensure!(
        load.succeeded == N,
        "sluice stopped serving while its access log was stuck: {:?} {:?}\n{}",
        load.by_status,
        load.first_error,
        w.sluice_complaints()
    );
    let p99 = load.latency_ms.get("200").and_then(|l| l.p99);
    eprintln!("burst of {N} in {:?} (p99 {p99:?} ms)", started.elapsed());
    let (s1, s2) = (&w.s1, &w.s2);
    let (l1, l2) = w.logs.as_mut().unwrap();
    // Node 1's writer is blocked on the full FIFO: most records must have been dropped.
    let d1 = wait_accounted(s1, l1, N, "node 1 (FIFO, queue 1)")?;
    let d2 = wait_accounted(s2, l2, N, "node 2 (file, queue 1)")?;
    eprintln!(
        "node 1: {} lines + {d1} dropped; node 2: {} lines + {d2} dropped",
        l1.lines.len(),
        l2.lines.len()
    );
    ensure!(d1 > 0, "node 1's writer was blocked on a full FIFO, yet nothing was dropped");
    ensure!(
        l1.lines.iter().all(|l| l["path"] == "/burst" && l["reporter"] == "source"),
        "unexpected node 1 lines"
    );
    ensure!(
        l2.lines.iter().all(|l| l["path"] == "/burst" && l["reporter"] == "destination"),
        "unexpected node 2 lines"
    );
    // Still serving and still logging once the reader caught up.
    w.get("/after", &[])?;
    let (l1, l2) = w.logs();
    wait_line(l1, "node 1: the request after the burst", |l| l["path"] == "/after")?;
    wait_line(l2, "node 2: the request after the burst", |l| l["path"] == "/after")?;
    let (s1, s2) = (&w.s1, &w.s2);
    let (l1, l2) = w.logs.as_mut().unwrap();
    wait_accounted(s1, l1, N + 1, "node 1 after the burst")?;
    wait_accounted(s2, l2, N + 1, "node 2 after the burst")?;
    ensure!(w.s1.is_running() && w.s2.is_running(), "a sluice exited");
    Ok(())
}

// ---------------------------------------------------------------- tracing

/// The spans a collector has printed so far that satisfy `pred`.
fn spans(collector: &SimProcess, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    collector.json_lines().into_iter().filter(|v| v["event"] == "span" && pred(v)).collect()
}

/// Polls until the collector received exactly one span of `trace_id` (fails on more).
fn wait_span(collector: &SimProcess, trace_id: &str, what: &str) -> Result<Value> {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let found = spans(collector, |s| s["trace_id"] == trace_id);
        ensure!(
            found.len() <= 1,
            "{what}: {} spans of trace {trace_id} for one request: {found:#?}",
            found.len()
        );
        if let Some(s) = found.into_iter().next() {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: no span of trace {trace_id} after {ARRIVAL:?}; the collector printed: {:#?}",
                collector.stdout_lines().iter().rev().take(5).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Both hops of one request: node 1's CLIENT span and node 2's SERVER span, related as parent
/// and child (checked at once: the rest depends on it), with the right reporters, nodes and
/// request facts (gathered in `c`). Returns (n1 span, n2 span).
fn check_two_hops(
    w: &World,
    c: &mut Checks,
    trace_id: &str,
    client_parent: Option<&str>,
    method: &str,
    path: &str,
    upstream_port: u16,
) -> Result<(Value, Value)> {
    let (c1, c2) = w.collectors();
    let a = wait_span(c1, trace_id, "node 1's collector")?;
    let b = wait_span(c2, trace_id, "node 2's collector")?;
    let ctx = || format!("node 1 span: {a}\nnode 2 span: {b}\n{}", w.sluice_complaints());
    ensure!(a["kind"] == "CLIENT", "node 1's span is not CLIENT\n{}", ctx());
    ensure!(b["kind"] == "SERVER", "node 2's span is not SERVER\n{}", ctx());
    ensure!(is_hex(&a["span_id"], 16) && is_hex(&b["span_id"], 16), "bad span ids\n{}", ctx());
    ensure!(a["span_id"] != b["span_id"], "both hops have the same span id\n{}", ctx());
    match client_parent {
        Some(p) => ensure!(
            a["parent_span_id"] == p,
            "node 1's span is not a child of the client's span {p}\n{}",
            ctx()
        ),
        None => ensure!(a["parent_span_id"] == "", "node 1's span of a new trace has a parent\n{}", ctx()),
    }
    ensure!(b["parent_span_id"] == a["span_id"], "node 2's span is not a child of node 1's\n{}", ctx());
    for (s, node, reporter) in [(&a, &w.n1, "source"), (&b, &w.n2, "destination")] {
        let at = &s["attributes"];
        for (ok, what) in [
            (s["resource"]["service.name"] == "sluice", "resource service.name"),
            (s["resource"]["k8s.node.name"] == node.name(), "resource k8s.node.name"),
            (at["istio.reporter"] == reporter, "istio.reporter"),
            (at["http.request.method"] == method, "http.request.method"),
            (at["url.path"] == path, "url.path"),
            (
                at["source.workload"] == "client" && at["destination.workload"] == "web",
                "source/destination.workload",
            ),
            (is_principal(&at["source.principal"], "shop", "client-sa"), "source.principal"),
            (is_principal(&at["destination.principal"], "shop", "web-sa"), "destination.principal"),
            (at["destination.service"] == "web.shop.svc.cluster.local", "destination.service"),
            (at["upstream_address"] == w.backend.addr(upstream_port).to_string(), "upstream_address"),
            (at["guid:x-request-id"].as_str().is_some_and(|r| !r.is_empty()), "guid:x-request-id"),
            (at["response_flags"] == "-", "response_flags (a complete response)"),
            (
                s["start_ns"].as_u64().is_some_and(|t| t > 0)
                    && s["end_ns"].as_u64() >= s["start_ns"].as_u64(),
                "start/end",
            ),
        ] {
            c.check(ok, || format!("{reporter} span ({}): wrong {what}: {s}", node.short_name()));
        }
    }
    c.check(a["attributes"]["guid:x-request-id"] == b["attributes"]["guid:x-request-id"], || {
        format!("the two hops have different request ids\n{}", ctx())
    });
    // The server hop happens within the client hop (same clock; 1 ms of slack).
    let ns = |s: &Value, k: &str| s[k].as_u64().unwrap_or(0);
    let (a0, a1, b0, b1) = (ns(&a, "start_ns"), ns(&a, "end_ns"), ns(&b, "start_ns"), ns(&b, "end_ns"));
    c.check(b0 + 1_000_000 >= a0 && b1 <= a1 + 1_000_000, || {
        format!("node 2's span is not within node 1's\n{}", ctx())
    });
    Ok((a, b))
}

/// The HTTP facts of a span: status code and the span status that goes with it.
fn check_http_status(c: &mut Checks, spans: [&Value; 2], status: i64) {
    for s in spans {
        c.check(s["attributes"]["http.response.status_code"] == status, || {
            format!("http.response.status_code should be {status}: {s}")
        });
        c.check(s["status"]["code"] == "UNSET", || format!("span status of a {status} should be UNSET: {s}"));
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// With `--trace-sampling 1`: a request carrying a W3C `traceparent` yields node 1's CLIENT
/// span (child of the client's span) and node 2's SERVER span (child of node 1's), both with
/// the client's trace id; the backend receives `traceparent` naming node 2's span as parent,
/// `tracestate` untouched and the `x-request-id` the spans carry. A request without context
/// starts a trace (node 1's span is a root).
#[test]
fn trace_w3c_across_two_nodes() -> Result<()> {
    let w = world(Cfg { trace_sampling: Some(1.0), ..Default::default() })?;
    let mut c = Checks::default();
    let r = w.get(
        "/traced",
        &[&format!("traceparent: 00-{TRACE}-{CLIENT_SPAN}-01"), "tracestate: vendor=opaque"],
    )?;
    let (a, b) = check_two_hops(&w, &mut c, TRACE, Some(CLIENT_SPAN), "GET", "/traced", HTTP_TARGET_PORT)?;
    check_http_status(&mut c, [&a, &b], 200);
    let h = &r["body"]["headers"];
    let want = format!("00-{TRACE}-{}-01", b["span_id"].as_str().unwrap());
    c.check(h["traceparent"] == want.as_str(), || {
        format!("backend got traceparent {}, expected {want} (node 2's span as parent)", h["traceparent"])
    });
    c.check(h["tracestate"] == "vendor=opaque", || format!("tracestate not passed on: {h}"));
    c.check(
        h["x-request-id"].as_str().is_some_and(|id| !id.is_empty())
            && h["x-request-id"] == a["attributes"]["guid:x-request-id"],
        || {
            format!(
                "backend's x-request-id {} is not the spans' {}",
                h["x-request-id"], a["attributes"]["guid:x-request-id"]
            )
        },
    );

    // No context at all: node 1 starts a trace (a root span), node 2 continues it.
    let r = w.get("/fresh", &[])?;
    let tp = r["body"]["headers"]["traceparent"]
        .as_str()
        .context("backend got no traceparent for a new trace")?
        .to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    ensure!(parts.len() == 4 && parts[0] == "00" && parts[3] == "01", "bad traceparent {tp}");
    let (_, b) = check_two_hops(&w, &mut c, parts[1], None, "GET", "/fresh", HTTP_TARGET_PORT)?;
    c.check(parts[2] == b["span_id"], || {
        format!("backend's parent {} is not node 2's span {}", parts[2], b["span_id"])
    });
    c.finish()
}

/// With `--trace-sampling 0`: a request the client marked sampled (flags 01) is exported by
/// both nodes; one marked unsampled (flags 00) and one without context are not exported at all
/// (and the backend still gets the trace context, unsampled).
#[test]
fn trace_sampling_zero_follows_the_client_flag() -> Result<()> {
    let w = world(Cfg { trace_sampling: Some(0.0), ..Default::default() })?;
    let mut c = Checks::default();
    const UNSAMPLED: &str = "11111111111111111111111111111111";
    let r = w.get("/unsampled", &[&format!("traceparent: 00-{UNSAMPLED}-{CLIENT_SPAN}-00")])?;
    let tp = r["body"]["headers"]["traceparent"].as_str().unwrap_or_default().to_string();
    c.check(tp.starts_with(&format!("00-{UNSAMPLED}-")) && tp.ends_with("-00"), || {
        format!("unsampled context not propagated: {tp:?}")
    });
    let r = w.get("/no-context", &[])?;
    let fresh = r["body"]["headers"]["traceparent"].as_str().unwrap_or_default().to_string();
    ensure!(
        fresh.len() == 55 && fresh.ends_with("-00"),
        "a new trace at sampling 0 must be unsampled: {fresh:?}"
    );
    let fresh_id = fresh[3..35].to_string();
    // Sampled by the client: exported even though sluice samples nothing itself. Spans leave
    // each node in order, so once these are in, the earlier ones would have been too.
    w.get("/sampled", &[&format!("traceparent: 00-{TRACE}-{CLIENT_SPAN}-01")])?;
    check_two_hops(&w, &mut c, TRACE, Some(CLIENT_SPAN), "GET", "/sampled", HTTP_TARGET_PORT)?;
    let (c1, c2) = w.collectors();
    for (col, s, n) in [(c1, &w.s1, "n1"), (c2, &w.s2, "n2")] {
        let unwanted = spans(col, |sp| sp["trace_id"] != TRACE);
        c.check(unwanted.is_empty(), || {
            format!("{n} exported unsampled traces ({UNSAMPLED}, {fresh_id}): {unwanted:?}")
        });
        let st =
            s.wait_for("/status", |v| v["counters"]["spans_exported"].as_u64().is_some_and(|n| n >= 1), T)?;
        let counters = &st["counters"];
        c.check(counters["spans_exported"] == 1, || {
            format!("{n}: spans_exported {} (one sampled request)", counters["spans_exported"])
        });
        c.check(counters["spans_dropped"] == 0, || {
            format!("{n}: spans_dropped {}", counters["spans_dropped"])
        });
    }
    c.finish()
}

/// B3 multi-header context only (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled: 1`), sampling
/// 0: both nodes export spans with the B3 trace id (node 1's a child of the client's B3 span,
/// node 2's a child of node 1's), and the backend receives B3 headers that continue the trace
/// from node 2's span, as its `traceparent` does: `x-b3-spanid` = node 2's span (the parent of
/// whatever the backend does), `x-b3-parentspanid` = node 2's parent (node 1's span),
/// `x-b3-sampled: 1` (what Envoy sends an application).
#[test]
fn trace_b3_across_two_nodes() -> Result<()> {
    let w = world(Cfg { trace_sampling: Some(0.0), ..Default::default() })?;
    let mut c = Checks::default();
    const B3_TRACE: &str = "80f198ee56343ba864fe8b2a57d3eff7";
    const B3_SPAN: &str = "e457b5a2e4d86bd1";
    let r = w.get(
        "/b3",
        &[&format!("x-b3-traceid: {B3_TRACE}"), &format!("x-b3-spanid: {B3_SPAN}"), "x-b3-sampled: 1"],
    )?;
    let (a, b) = check_two_hops(&w, &mut c, B3_TRACE, Some(B3_SPAN), "GET", "/b3", HTTP_TARGET_PORT)?;
    check_http_status(&mut c, [&a, &b], 200);
    let h = &r["body"]["headers"];
    let (n1_span, n2_span) = (a["span_id"].as_str().unwrap(), b["span_id"].as_str().unwrap());
    for (name, want) in [
        ("x-b3-traceid", B3_TRACE.to_string()),
        ("x-b3-spanid", n2_span.to_string()),
        ("x-b3-parentspanid", n1_span.to_string()),
        ("x-b3-sampled", "1".to_string()),
        ("traceparent", format!("00-{B3_TRACE}-{n2_span}-01")),
    ] {
        c.check(h[name] == want.as_str(), || {
            format!(
                "backend's {name}: got {}, want {want} (client span {B3_SPAN}, node 1 span {n1_span}, node 2 span {n2_span}); backend headers: {h}",
                h[name]
            )
        });
    }
    c.finish()
}

/// gRPC across the nodes with `traceparent` metadata (sampled by the client, sampling 0): both
/// hops are exported with the call's gRPC status (`rpc.grpc.status_code` 0, then 5 for a call
/// the server fails with NOT_FOUND, which makes the span an error), and the server receives
/// node 2's span as parent and an `x-request-id`.
#[test]
fn trace_grpc_across_two_nodes() -> Result<()> {
    let w = world(Cfg { trace_sampling: Some(0.0), ..Default::default() })?;
    let mut c = Checks::default();
    const OK_TRACE: &str = "aaaaaaaaaaaaaaaa0000000000000001";
    const FAIL_TRACE: &str = "aaaaaaaaaaaaaaaa0000000000000002";
    for (trace, fail_code, code) in [(OK_TRACE, "0", 0i64), (FAIL_TRACE, "5", 5)] {
        let tp = format!("traceparent=00-{trace}-{CLIENT_SPAN}-01");
        let r = workloads::grpc_client(
            &w.client,
            vip(GRPC_PORT),
            1,
            1,
            &["--metadata", &tp, "--fail-code", fail_code],
        )?;
        let want_status = if code == 0 { "OK" } else { "NOT_FOUND" };
        ensure!(r.statuses.get(want_status) == Some(&1), "call with fail code {fail_code}: {r:?}");
        let (a, b) = check_two_hops(
            &w,
            &mut c,
            trace,
            Some(CLIENT_SPAN),
            "POST",
            "/sluice.test.Echo/Echo",
            GRPC_PORT,
        )?;
        for s in [&a, &b] {
            let at = &s["attributes"];
            c.check(at["rpc.grpc.status_code"] == code, || {
                format!("rpc.grpc.status_code should be {code}: {s}")
            });
            c.check(at["network.protocol.name"] == "grpc", || {
                format!("network.protocol.name should be grpc: {s}")
            });
            c.check(at["http.response.status_code"] == 200, || {
                format!("a gRPC call's HTTP status is 200: {s}")
            });
            let want = if code == 0 { "UNSET" } else { "ERROR" };
            c.check(s["status"]["code"] == want, || format!("span status should be {want}: {s}"));
        }
        // The server saw node 2's span as the parent.
        let want_tp = format!("00-{trace}-{}-01", b["span_id"].as_str().unwrap());
        let calls: Vec<Value> = w
            .grpc_server
            .json_lines()
            .into_iter()
            .filter(|v| {
                v["event"] == "call"
                    && v["metadata"]["traceparent"].as_str().is_some_and(|t| t.contains(trace))
            })
            .collect();
        ensure!(calls.len() == 1, "the gRPC server saw {} calls of trace {trace}: {calls:?}", calls.len());
        let md = &calls[0]["metadata"];
        c.check(md["traceparent"] == want_tp.as_str(), || {
            format!("server got traceparent {}, want {want_tp}", md["traceparent"])
        });
        c.check(md["x-request-id"] == a["attributes"]["guid:x-request-id"], || {
            format!(
                "server's x-request-id {} is not the spans' {}",
                md["x-request-id"], a["attributes"]["guid:x-request-id"]
            )
        });
    }
    c.finish()
}
