//! Typed helpers for the workloads of the L7 tests: starting simpod's servers and slgrpc inside
//! pods (each returns once the server printed `{"event":"listening"}`), and running clients
//! whose result line is parsed into a struct.
//!
//! ```no_run
//! # use sluice_tests::{workloads, PodOpts, Sim};
//! # fn main() -> anyhow::Result<()> {
//! let sim = Sim::new()?;
//! let n1 = sim.add_node("n1")?;
//! let (srv, cli) = (n1.add_pod("demo", "srv", PodOpts::default())?, n1.add_pod("demo", "cli", PodOpts::default())?);
//! let _grpc = workloads::start_grpc_server(&srv, 9090, "grpc-1")?;
//! let r = workloads::grpc_client(&cli, srv.addr(9090), 100, 8, &[])?;
//! assert!(r.ok && r.connections == 1 && r.by_server["grpc-1"] == 100);
//! # Ok(()) }
//! ```

use std::{
    collections::BTreeMap,
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::{Output, Pod, SimProcess};

/// How long a server may take to print its listening line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The slgrpc binary: `$SLGRPC_BIN`, else next to simpod (cargo builds both for this crate's
/// tests; other users build them with `cargo build -p sluice-tests --bins`).
pub fn slgrpc_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("SLGRPC_BIN") {
        Some(p) => PathBuf::from(p),
        None => crate::simpod_bin()?.with_file_name("slgrpc"),
    };
    if !path.is_file() {
        bail!(
            "slgrpc binary not found at {} (set SLGRPC_BIN, or build it with cargo build -p sluice-tests --bin slgrpc)",
            path.display()
        );
    }
    Ok(path)
}

fn started(mut p: SimProcess) -> Result<SimProcess> {
    p.wait_listening(LISTEN_TIMEOUT)?;
    Ok(p)
}

fn with_extra(base: Vec<String>, extra: &[&str]) -> Vec<String> {
    base.into_iter().chain(extra.iter().map(|s| s.to_string())).collect()
}

/// `simpod http-server --port P --name NAME [extra...]` (e.g. `["--delay-ms", "200"]`).
pub fn start_http_server(pod: &Pod, port: u16, name: &str, extra: &[&str]) -> Result<SimProcess> {
    let args = vec!["http-server".into(), "--port".into(), port.to_string(), "--name".into(), name.into()];
    started(pod.simpod(with_extra(args, extra))?)
}

/// `simpod ws-echo-server --port P`.
pub fn start_ws_echo_server(pod: &Pod, port: u16) -> Result<SimProcess> {
    started(pod.simpod(["ws-echo-server", "--port", &port.to_string()])?)
}

/// `simpod tls-echo-server --port P --cert-out PATH [extra...]`; the certificate is in `cert_out`
/// once this returns.
pub fn start_tls_echo_server(pod: &Pod, port: u16, cert_out: &Path, extra: &[&str]) -> Result<SimProcess> {
    let args = vec![
        "tls-echo-server".into(),
        "--port".into(),
        port.to_string(),
        "--cert-out".into(),
        cert_out.display().to_string(),
    ];
    started(pod.simpod(with_extra(args, extra))?)
}

/// `simpod https-server --port P --cert-out PATH --name NAME [extra...]` (e.g. `["--san",
/// "api.example.test", "--bind", "192.0.2.20"]`): simpod's HTTP server behind TLS with a fresh
/// self-signed certificate, in `cert_out` once this returns; its answers carry the SNI it saw.
pub fn start_https_server(
    pod: &Pod,
    port: u16,
    cert_out: &Path,
    name: &str,
    extra: &[&str],
) -> Result<SimProcess> {
    let args = vec![
        "https-server".into(),
        "--port".into(),
        port.to_string(),
        "--cert-out".into(),
        cert_out.display().to_string(),
        "--name".into(),
        name.into(),
    ];
    started(pod.simpod(with_extra(args, extra))?)
}

/// `simpod banner-server --port P --banner TEXT`.
pub fn start_banner_server(pod: &Pod, port: u16, banner: &str) -> Result<SimProcess> {
    started(pod.simpod(["banner-server", "--port", &port.to_string(), "--banner", banner])?)
}

/// `slgrpc server --port P --name NAME`.
pub fn start_grpc_server(pod: &Pod, port: u16, name: &str) -> Result<SimProcess> {
    start_grpc_server_with(pod, port, name, &[])
}

/// `slgrpc server --port P --name NAME [extra...]` (e.g. `["--delay-ms", "50"]`).
pub fn start_grpc_server_with(pod: &Pod, port: u16, name: &str, extra: &[&str]) -> Result<SimProcess> {
    let mut args: Vec<OsString> = vec![slgrpc_bin()?.into_os_string()];
    args.extend(
        ["server", "--port", &port.to_string(), "--name", name].iter().chain(extra).map(OsString::from),
    );
    started(pod.spawn(args)?)
}

/// Runs slgrpc in `pod` to completion (60 s limit), whatever its exit status.
pub fn run_slgrpc<I, S>(pod: &Pod, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut all = vec![slgrpc_bin()?.into_os_string()];
    all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
    pod.run_timeout(all, RUN_TIMEOUT)
}

/// The summary line of `slgrpc client`.
#[derive(Debug, Clone, Deserialize)]
pub struct GrpcSummary {
    /// Every call returned OK with the message and payload sent.
    pub ok: bool,
    pub calls: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// OK replies whose message or payload differed from the request.
    pub mismatches: u64,
    /// Calls per answering server (from the reply, or the x-slgrpc-server trailer of an error).
    pub by_server: BTreeMap<String, u64>,
    /// Calls per gRPC status name ("OK", "UNAVAILABLE", ...).
    pub statuses: BTreeMap<String, u64>,
    /// Successful calls per client address the server saw.
    pub peers: BTreeMap<String, u64>,
    /// TCP connections the client's channel established.
    pub connections: u64,
    pub connect_attempts: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub elapsed_ms: u64,
}

/// `slgrpc client --to ADDR --calls N --concurrency C [extra...]` (e.g. `["--metadata",
/// "x-a=1", "--fail-code", "14", "--deadline-ms", "500"]`). A run whose calls failed is not an
/// error here: look at the summary.
pub fn grpc_client(
    pod: &Pod,
    to: SocketAddr,
    calls: u64,
    concurrency: usize,
    extra: &[&str],
) -> Result<GrpcSummary> {
    let args = with_extra(
        vec![
            "client".into(),
            "--to".into(),
            to.to_string(),
            "--calls".into(),
            calls.to_string(),
            "--concurrency".into(),
            concurrency.to_string(),
        ],
        extra,
    );
    let out = run_slgrpc(pod, &args)?;
    parse_last(&out, "slgrpc client")
}

/// One request of `simpod http-load --each`.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadRequest {
    /// Position in order of start.
    pub seq: u64,
    /// The request's number, sent in the `--seq-header` header if any.
    pub id: u64,
    /// Wall-clock send time (ms since the Unix epoch).
    pub sent_unix_ms: f64,
    pub conn: usize,
    /// When it was sent, since all connections were open (ms).
    pub start_ms: f64,
    pub elapsed_ms: f64,
    /// `None` when the request failed at the transport (see `error`).
    pub status: Option<u16>,
    pub error: Option<String>,
    /// `x-sluice-error` of the answer.
    pub flag: Option<String>,
    /// `x-sluice-overflow` of the answer.
    pub overflow: Option<String>,
    pub retry_after: Option<String>,
    /// `x-simpod-name`: the backend that answered.
    pub name: Option<String>,
    /// The values of the `--tally-header` headers, in that order.
    #[serde(default)]
    pub tallied: Vec<Option<String>>,
}

/// Latency percentiles (ms) of the requests that got one status.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadLatency {
    pub count: u64,
    pub min: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// The summary of `simpod http-load`, and its per-request lines when run with `--each`.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadSummary {
    /// No transport error (statuses are data).
    pub ok: bool,
    pub requests: u64,
    /// 2xx answers.
    pub succeeded: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Requests per status ("200", "503", ..., "error").
    pub by_status: BTreeMap<String, u64>,
    /// Requests per `x-sluice-error` value.
    pub by_flag: BTreeMap<String, u64>,
    /// Requests per `x-sluice-overflow` value.
    pub by_overflow: BTreeMap<String, u64>,
    /// Requests per answering backend (`x-simpod-name`).
    pub by_name: BTreeMap<String, u64>,
    /// Per `--tally-header NAME`: requests per value of that response header (`(none)`: absent).
    #[serde(default)]
    pub by_header: BTreeMap<String, BTreeMap<String, u64>>,
    pub with_retry_after: u64,
    /// Per status (as in `by_status`).
    pub latency_ms: BTreeMap<String, LoadLatency>,
    pub elapsed_ms: f64,
    pub succeeded_per_s: f64,
    #[serde(skip)]
    pub each: Vec<LoadRequest>,
}

impl LoadSummary {
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status.to_string()).copied().unwrap_or(0)
    }

    pub fn flag(&self, flag: &str) -> u64 {
        self.by_flag.get(flag).copied().unwrap_or(0)
    }

    /// How many answers had `value` in response header `header` (tallied with `--tally-header`).
    pub fn header_count(&self, header: &str, value: &str) -> u64 {
        self.by_header.get(header).and_then(|m| m.get(value)).copied().unwrap_or(0)
    }
}

/// Runs `simpod http-load --to ADDR [args...]` in `pod` (e.g. `["--count", "1000",
/// "--connections", "4"]` or `["--rps", "300", "--duration-ms", "4000", "--each"]`) and parses
/// its summary (and per-request lines). Non-2xx answers are data, not errors.
pub fn http_load(pod: &Pod, to: SocketAddr, args: &[&str]) -> Result<LoadSummary> {
    let all = with_extra(vec!["http-load".into(), "--to".into(), to.to_string()], args);
    let out = pod.run_simpod_timeout(&all, Duration::from_secs(180))?;
    let lines = out.json_lines().with_context(|| format!("simpod http-load: {}", out.stderr.trim()))?;
    let Some((last, each)) = lines.split_last() else {
        bail!("simpod http-load printed nothing: exit {}, stderr: {}", out.status, out.stderr.trim());
    };
    if last.get("requests").is_none() {
        bail!("simpod http-load failed: {last}");
    }
    let mut summary: LoadSummary = serde_json::from_value(last.clone())
        .with_context(|| format!("simpod http-load: unexpected summary {last}"))?;
    summary.each = each
        .iter()
        .map(|v| {
            serde_json::from_value(v.clone())
                .with_context(|| format!("simpod http-load: unexpected line {v}"))
        })
        .collect::<Result<_>>()?;
    Ok(summary)
}

/// The result line of `simpod raw`.
#[derive(Debug, Clone, Deserialize)]
pub struct RawResult {
    /// Connected and sent every byte.
    pub ok: bool,
    pub local: Option<String>,
    pub peer: Option<String>,
    pub sent_len: u64,
    pub send_error: Option<String>,
    pub received_len: u64,
    /// The received bytes, lossily decoded as UTF-8.
    pub received_text: String,
    /// The first 64 KiB received, as hex.
    pub received_hex: String,
    /// "eof", "reset", "timeout" or "error".
    pub ended: String,
    pub error: Option<String>,
    pub first_byte_ms: Option<u64>,
    pub elapsed_ms: u64,
}

/// `simpod raw --to ADDR --send TEXT [extra...]` (TEXT with `\r\n`-style escapes; extra e.g.
/// `["--half-close", "--read-timeout-ms", "1000"]`).
pub fn raw(pod: &Pod, to: SocketAddr, send: &str, extra: &[&str]) -> Result<RawResult> {
    let args =
        with_extra(vec!["raw".into(), "--to".into(), to.to_string(), "--send".into(), send.into()], extra);
    let out = pod.run_simpod_timeout(&args, RUN_TIMEOUT)?;
    parse_last(&out, "simpod raw")
}

fn parse_last<T: serde::de::DeserializeOwned>(out: &Output, what: &str) -> Result<T> {
    let v: Value =
        out.json().with_context(|| format!("{what}: exit {}, stderr: {}", out.status, out.stderr.trim()))?;
    if v.get("stage").is_some() && v.get("calls").is_none() && v.get("received_len").is_none() {
        // Failed before it could produce a result (bad arguments, connect failure).
        bail!("{what} failed: {v}");
    }
    serde_json::from_value(v.clone()).with_context(|| format!("{what}: unexpected result {v}"))
}
