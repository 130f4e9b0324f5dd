//! slgrpc: the gRPC workload of the L7 tests, run inside simulated pods. Every subcommand
//! prints JSON lines on stdout, like simpod: servers print `{"event":"listening"}` once bound
//! and one `{"event":"call"}` per call; clients print a result with `"ok"` last and exit 0 on
//! success.
//!
//! The service, written by hand with prost (no protoc, no build script):
//!
//! ```proto
//! package sluice.test;
//! service Echo {
//!   rpc Echo(EchoRequest) returns (EchoReply);
//!   rpc Count(CountRequest) returns (stream CountReply);
//! }
//! message EchoRequest { string message = 1; bytes payload = 2; int32 fail_code = 3; uint32 delay_ms = 4; }
//! message EchoReply { string message = 1; string server = 2; bytes payload = 3; string peer = 4;
//!                     map<string, string> metadata = 5; }
//! message CountRequest { uint32 n = 1; uint32 interval_ms = 2; }
//! message CountReply { uint32 i = 1; string server = 2; }
//! ```
//!
//! The server speaks plaintext HTTP/2 only (h2c with prior knowledge). Its answers, errors
//! included, carry the metadata `x-slgrpc-server: <name>`. The client makes every call over
//! one tonic `Channel`, whose connector counts the TCP connections it opens, so a test can
//! prove that N calls shared one connection.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    io::{self, Write},
    net::SocketAddr,
    pin::Pin,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpStream, sync::Semaphore, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    body::Body,
    metadata::{KeyAndValueRef, MetadataKey, MetadataMap, MetadataValue},
    transport::{server::TcpIncoming, Channel, Endpoint, Server},
    Code, Status,
};
use tonic_prost::ProstCodec;

const ECHO_PATH: &str = "/sluice.test.Echo/Echo";
const COUNT_PATH: &str = "/sluice.test.Echo/Count";
/// Metadata naming the server on every answer (headers of a success, trailers of an error).
const SERVER_KEY: &str = "x-slgrpc-server";

// ---------------------------------------------------------------- messages

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    /// Non-zero: answer with this gRPC status code instead of a reply.
    #[prost(int32, tag = "3")]
    pub fail_code: i32,
    /// Sleep this long before answering (added to the server's --delay-ms).
    #[prost(uint32, tag = "4")]
    pub delay_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    /// The server's --name.
    #[prost(string, tag = "2")]
    pub server: String,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    /// The TCP peer the server saw.
    #[prost(string, tag = "4")]
    pub peer: String,
    /// The request metadata the server received.
    #[prost(btree_map = "string, string", tag = "5")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CountRequest {
    #[prost(uint32, tag = "1")]
    pub n: u32,
    /// Pause between replies.
    #[prost(uint32, tag = "2")]
    pub interval_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CountReply {
    #[prost(uint32, tag = "1")]
    pub i: u32,
    #[prost(string, tag = "2")]
    pub server: String,
}

// ---------------------------------------------------------------- command line

#[derive(Parser)]
#[command(
    name = "slgrpc",
    about = "gRPC workload (sluice.test.Echo) for the sluice node simulator (JSON lines on stdout)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Plaintext HTTP/2 gRPC server of sluice.test.Echo.
    Server {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Delay every Echo answer by N ms (a consistently slow backend).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// N unary Echo calls over one HTTP/2 connection, at most C in flight; one summary line.
    Client {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value_t = 1)]
        calls: u64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value = "hello")]
        message: String,
        /// Pattern bytes sent as the payload; the echo must match.
        #[arg(long, default_value_t = 0)]
        payload_bytes: usize,
        /// Ask the server to fail every call with this gRPC code.
        #[arg(long, default_value_t = 0)]
        fail_code: i32,
        /// Ask the server to sleep this long in every call.
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        /// Also print one line per call.
        #[arg(long)]
        each: bool,
    },
    /// One server-streaming Count call; prints every item, then the result.
    Stream {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value_t = 5)]
        n: u32,
        #[arg(long, default_value_t = 20)]
        interval_ms: u32,
    },
}

#[derive(Args)]
struct ConnArgs {
    /// The server (ip:port): the only address the client connects to.
    #[arg(long)]
    to: SocketAddr,
    /// The :authority of the requests (default: the --to address).
    #[arg(long)]
    authority: Option<String>,
    /// Request metadata `key=value` (repeatable).
    #[arg(long = "metadata", value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
    /// Per-call deadline: sent as grpc-timeout, and enforced by the client.
    #[arg(long)]
    deadline_ms: Option<u64>,
    #[arg(long, default_value_t = 5_000)]
    connect_timeout_ms: u64,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected key=value, got {s:?}"))?;
    MetadataKey::<tonic::metadata::Ascii>::from_bytes(k.as_bytes())
        .map_err(|e| format!("bad metadata key {k:?}: {e}"))?;
    MetadataValue::<tonic::metadata::Ascii>::try_from(v)
        .map_err(|e| format!("bad metadata value {v:?}: {e}"))?;
    Ok((k.to_string(), v.to_string()))
}

/// Prints one JSON line (write errors ignored, as in simpod).
fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            emit(json!({"ok": false, "stage": "runtime", "error": e.to_string()}));
            return ExitCode::FAILURE;
        }
    };
    let ok = rt.block_on(async {
        match cli.cmd {
            Cmd::Server { port, name, bind, delay_ms } => {
                server(&bind, port, name, Duration::from_millis(delay_ms)).await
            }
            Cmd::Client { conn, calls, concurrency, message, payload_bytes, fail_code, delay_ms, each } => {
                let call = CallSpec {
                    message,
                    payload: pattern(payload_bytes),
                    fail_code,
                    delay_ms,
                    metadata: conn.metadata.clone(),
                    deadline: conn.deadline_ms.map(Duration::from_millis),
                };
                client(&conn, calls, concurrency.max(1), Arc::new(call), each).await
            }
            Cmd::Stream { conn, n, interval_ms } => stream(&conn, n, interval_ms).await,
        }
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Deterministic payload bytes (xorshift64*, as simpod's pattern).
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------- server

fn metadata_json(m: &MetadataMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for kv in m.iter() {
        let (k, v) = match kv {
            KeyAndValueRef::Ascii(k, v) => (
                k.as_str().to_string(),
                v.to_str()
                    .map(str::to_string)
                    .unwrap_or_else(|_| String::from_utf8_lossy(v.as_encoded_bytes()).into()),
            ),
            // Binary values as the base64 they travel in.
            KeyAndValueRef::Binary(k, v) => {
                (k.as_str().to_string(), String::from_utf8_lossy(v.as_encoded_bytes()).into_owned())
            }
        };
        out.entry(k)
            .and_modify(|prev| {
                prev.push_str(", ");
                prev.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

/// sluice.test.Echo as a plain `Service<http::Request>`: tonic's server-side `Grpc` does the
/// framing and codec, this only dispatches on the path.
#[derive(Clone)]
struct EchoService {
    name: Arc<str>,
    delay: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<Body>> for EchoService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let method = req.uri().path().to_string();
            let authority = req.uri().authority().map(|a| a.to_string());
            let resp = match method.as_str() {
                ECHO_PATH => {
                    let svc = tower::service_fn(move |r| {
                        let (this, authority) = (this.clone(), authority.clone());
                        async move { this.echo(r, authority).await }
                    });
                    tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default())
                        .unary(svc, req)
                        .await
                }
                COUNT_PATH => {
                    let svc = tower::service_fn(move |r| {
                        let (this, authority) = (this.clone(), authority.clone());
                        async move { this.count(r, authority) }
                    });
                    tonic::server::Grpc::new(ProstCodec::<CountReply, CountRequest>::default())
                        .server_streaming(svc, req)
                        .await
                }
                _ => {
                    emit(json!({"event": "unknown_method", "method": method, "authority": authority}));
                    this.status(Code::Unimplemented, format!("no method {method}")).into_http()
                }
            };
            Ok(resp)
        })
    }
}

impl EchoService {
    fn status(&self, code: Code, message: String) -> Status {
        let mut md = MetadataMap::new();
        if let Ok(v) = MetadataValue::try_from(&*self.name) {
            md.insert(SERVER_KEY, v);
        }
        Status::with_metadata(code, message, md)
    }

    fn call_event(&self, method: &str, peer: &str, authority: &Option<String>, md: &MetadataMap) {
        emit(json!({
            "event": "call",
            "method": method,
            "peer": peer,
            "authority": authority,
            "metadata": metadata_json(md),
        }));
    }

    async fn echo(
        &self,
        r: tonic::Request<EchoRequest>,
        authority: Option<String>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let peer = r.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        self.call_event(ECHO_PATH, &peer, &authority, r.metadata());
        let metadata = metadata_json(r.metadata());
        let req = r.into_inner();
        let delay = self.delay + Duration::from_millis(req.delay_ms.into());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if req.fail_code != 0 {
            let code = Code::from_i32(req.fail_code);
            return Err(self.status(code, format!("{} fails as asked ({})", self.name, code_name(code))));
        }
        let mut resp = tonic::Response::new(EchoReply {
            message: req.message,
            server: self.name.to_string(),
            payload: req.payload,
            peer,
            metadata,
        });
        if let Ok(v) = MetadataValue::try_from(&*self.name) {
            resp.metadata_mut().insert(SERVER_KEY, v);
        }
        Ok(resp)
    }

    fn count(
        &self,
        r: tonic::Request<CountRequest>,
        authority: Option<String>,
    ) -> Result<tonic::Response<ReceiverStream<Result<CountReply, Status>>>, Status> {
        let peer = r.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        self.call_event(COUNT_PATH, &peer, &authority, r.metadata());
        let req = r.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let server = self.name.to_string();
        let interval = Duration::from_millis(req.interval_ms.into());
        tokio::spawn(async move {
            for i in 0..req.n {
                if i > 0 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let reply = CountReply { i, server: server.clone() };
                if tx.send(Ok(reply)).await.is_err() {
                    break; // the call went away
                }
            }
        });
        let mut resp = tonic::Response::new(ReceiverStream::new(rx));
        if let Ok(v) = MetadataValue::try_from(&*self.name) {
            resp.metadata_mut().insert(SERVER_KEY, v);
        }
        Ok(resp)
    }
}

async fn server(bind: &str, port: u16, name: String, delay: Duration) -> bool {
    let listener = match tokio::net::TcpListener::bind((bind, port)).await {
        Ok(l) => l,
        Err(e) => {
            emit(json!({"event": "error", "stage": "bind", "error": e.to_string()}));
            return false;
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).ok();
    emit(json!({"event": "listening", "addr": addr, "name": name}));
    let svc = EchoService { name: name.into(), delay };
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    match Server::builder().serve_with_incoming(svc, incoming).await {
        Ok(()) => true,
        Err(e) => {
            emit(json!({"event": "error", "stage": "serve", "error": e.to_string()}));
            false
        }
    }
}

// ---------------------------------------------------------------- clients

/// TCP connections the channel opened (successful and attempted).
#[derive(Default)]
struct ConnectCount {
    attempts: AtomicU64,
    established: AtomicU64,
}

/// One `Channel` (one HTTP/2 connection, re-established only if it breaks) whose connector
/// dials `--to` and counts.
fn channel(c: &ConnArgs) -> Result<(Channel, Arc<ConnectCount>), String> {
    let counts = Arc::new(ConnectCount::default());
    let to = c.to;
    let connector = {
        let counts = counts.clone();
        tower::service_fn(move |_: http::Uri| {
            let counts = counts.clone();
            async move {
                counts.attempts.fetch_add(1, Ordering::SeqCst);
                let s = TcpStream::connect(to).await?;
                s.set_nodelay(true)?;
                counts.established.fetch_add(1, Ordering::SeqCst);
                Ok::<_, io::Error>(TokioIo::new(s))
            }
        })
    };
    let mut ep = Endpoint::from_shared(format!("http://{to}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_millis(c.connect_timeout_ms));
    if let Some(a) = &c.authority {
        let origin = format!("http://{a}").parse().map_err(|e| format!("bad --authority {a:?}: {e}"))?;
        ep = ep.origin(origin);
    }
    Ok((ep.connect_with_connector_lazy(connector), counts))
}

fn add_metadata(md: &mut MetadataMap, kvs: &[(String, String)]) {
    for (k, v) in kvs {
        // Validated by parse_kv.
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(k.as_bytes()), MetadataValue::try_from(v.as_str())) {
            md.append(k, v);
        }
    }
}

/// What every Echo call sends.
struct CallSpec {
    message: String,
    payload: Vec<u8>,
    fail_code: i32,
    delay_ms: u32,
    metadata: Vec<(String, String)>,
    deadline: Option<Duration>,
}

struct CallResult {
    seq: u64,
    code: Code,
    message: String,
    server: Option<String>,
    /// The client address the server saw.
    peer: Option<String>,
    /// A reply whose message or payload differs from what was sent.
    mismatch: bool,
    ms: f64,
}

fn server_of(md: &MetadataMap) -> Option<String> {
    md.get(SERVER_KEY).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Runs `fut` under the client-side deadline (the server also got it as grpc-timeout). As in
/// grpc-go, a call that fails once its deadline has passed reports DEADLINE_EXCEEDED whatever
/// ended it (tonic's server, for one, answers an expired grpc-timeout with CANCELLED).
async fn with_deadline<T>(
    deadline: Option<Duration>,
    fut: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let Some(d) = deadline else {
        return fut.await;
    };
    let started = Instant::now();
    match tokio::time::timeout(d, fut).await {
        Err(_) => Err(Status::deadline_exceeded("client-side deadline")),
        Ok(Err(st)) if started.elapsed() >= d && st.code() != Code::DeadlineExceeded => {
            Err(Status::with_metadata(
                Code::DeadlineExceeded,
                format!("deadline passed; the call ended with {}: {}", code_name(st.code()), st.message()),
                st.metadata().clone(),
            ))
        }
        Ok(r) => r,
    }
}

async fn echo_call(ch: Channel, seq: u64, spec: Arc<CallSpec>) -> CallResult {
    let started = Instant::now();
    let mut req = tonic::Request::new(EchoRequest {
        message: spec.message.clone(),
        payload: spec.payload.clone(),
        fail_code: spec.fail_code,
        delay_ms: spec.delay_ms,
    });
    add_metadata(req.metadata_mut(), &spec.metadata);
    if let Some(d) = spec.deadline {
        req.set_timeout(d);
    }
    let mut grpc = tonic::client::Grpc::new(ch);
    let res = with_deadline(spec.deadline, async {
        grpc.ready().await.map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        grpc.unary(req, PathAndQuery::from_static(ECHO_PATH), ProstCodec::<EchoRequest, EchoReply>::default())
            .await
    })
    .await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match res {
        Ok(resp) => {
            let reply = resp.into_inner();
            let mismatch = reply.message != spec.message || reply.payload != spec.payload;
            CallResult {
                seq,
                code: Code::Ok,
                message: reply.message,
                server: Some(reply.server),
                peer: Some(reply.peer),
                mismatch,
                ms,
            }
        }
        Err(st) => CallResult {
            seq,
            code: st.code(),
            message: st.message().to_string(),
            server: server_of(st.metadata()),
            peer: None,
            mismatch: false,
            ms,
        },
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The q-quantile (nearest rank) of sorted values.
fn quantile(sorted: &[f64], q: f64) -> Value {
    if sorted.is_empty() {
        return Value::Null;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    json!(round3(sorted[rank - 1]))
}

async fn client(conn: &ConnArgs, calls: u64, concurrency: usize, spec: Arc<CallSpec>, each: bool) -> bool {
    let started = Instant::now();
    let (ch, counts) = match channel(conn) {
        Ok(x) => x,
        Err(e) => {
            emit(json!({"ok": false, "stage": "args", "error": e}));
            return false;
        }
    };
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    let mut results = Vec::with_capacity(calls as usize);
    let mut record = |r: CallResult| {
        if each {
            emit(json!({
                "seq": r.seq,
                "ok": r.code == Code::Ok && !r.mismatch,
                "status": code_name(r.code),
                "server": r.server,
                "peer": r.peer,
                "message": r.message,
                "mismatch": r.mismatch,
                "ms": round3(r.ms),
            }));
        }
        results.push(r);
    };
    for seq in 0..calls {
        let permit = sem.clone().acquire_owned().await.expect("never closed");
        let (ch, spec) = (ch.clone(), spec.clone());
        set.spawn(async move {
            let r = echo_call(ch, seq, spec).await;
            drop(permit);
            r
        });
        // Collect what finished, so memory stays flat and --each lines come as calls end.
        while let Some(done) = set.try_join_next() {
            record(done.expect("call task panicked"));
        }
    }
    while let Some(done) = set.join_next().await {
        record(done.expect("call task panicked"));
    }

    let mut statuses: BTreeMap<&str, u64> = BTreeMap::new();
    let mut by_server: BTreeMap<String, u64> = BTreeMap::new();
    let mut peers: BTreeMap<String, u64> = BTreeMap::new();
    let (mut succeeded, mut mismatches) = (0u64, 0u64);
    let mut ms: Vec<f64> = Vec::with_capacity(results.len());
    for r in &results {
        *statuses.entry(code_name(r.code)).or_default() += 1;
        if let Some(s) = &r.server {
            *by_server.entry(s.clone()).or_default() += 1;
        }
        if let Some(p) = &r.peer {
            *peers.entry(p.clone()).or_default() += 1;
        }
        if r.code == Code::Ok {
            if r.mismatch {
                mismatches += 1;
            } else {
                succeeded += 1;
            }
        }
        ms.push(r.ms);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let ok = succeeded == calls;
    emit(json!({
        "ok": ok,
        "to": conn.to.to_string(),
        "calls": calls,
        "succeeded": succeeded,
        "failed": calls - succeeded,
        "mismatches": mismatches,
        "by_server": by_server,
        "statuses": statuses,
        "peers": peers,
        "connections": counts.established.load(Ordering::SeqCst),
        "connect_attempts": counts.attempts.load(Ordering::SeqCst),
        "p50_ms": quantile(&ms, 0.50),
        "p99_ms": quantile(&ms, 0.99),
        "max_ms": ms.last().map(|m| round3(*m)),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }));
    ok
}

async fn stream(conn: &ConnArgs, n: u32, interval_ms: u32) -> bool {
    let started = Instant::now();
    let (ch, counts) = match channel(conn) {
        Ok(x) => x,
        Err(e) => {
            emit(json!({"ok": false, "stage": "args", "error": e}));
            return false;
        }
    };
    let mut req = tonic::Request::new(CountRequest { n, interval_ms });
    add_metadata(req.metadata_mut(), &conn.metadata);
    if let Some(d) = conn.deadline_ms {
        req.set_timeout(Duration::from_millis(d));
    }
    let mut items: Vec<u32> = Vec::new();
    let mut servers: Vec<String> = Vec::new();
    let res = with_deadline(conn.deadline_ms.map(Duration::from_millis), async {
        let mut grpc = tonic::client::Grpc::new(ch);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let resp = grpc
            .server_streaming(
                req,
                PathAndQuery::from_static(COUNT_PATH),
                ProstCodec::<CountRequest, CountReply>::default(),
            )
            .await?;
        let mut s = resp.into_inner();
        while let Some(item) = s.message().await? {
            emit(json!({"event": "item", "i": item.i, "server": item.server, "ms": round3(started.elapsed().as_secs_f64() * 1000.0)}));
            items.push(item.i);
            if !servers.contains(&item.server) {
                servers.push(item.server);
            }
        }
        Ok(())
    })
    .await;
    let (code, message) = match &res {
        Ok(()) => (Code::Ok, String::new()),
        Err(st) => (st.code(), st.message().to_string()),
    };
    let in_order = items.iter().copied().eq(0..n);
    let ok = code == Code::Ok && in_order;
    emit(json!({
        "ok": ok,
        "to": conn.to.to_string(),
        "expected": n,
        "received": items.len(),
        "in_order": in_order,
        "status": code_name(code),
        "message": message,
        "servers": servers,
        "connections": counts.established.load(Ordering::SeqCst),
        "connect_attempts": counts.attempts.load(Ordering::SeqCst),
        "elapsed_ms": started.elapsed().as_millis() as u64,
    }));
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn messages_round_trip_and_quantiles() {
        let r = EchoReply {
            message: "m".into(),
            server: "s".into(),
            payload: pattern(33),
            peer: "10.0.0.1:5".into(),
            metadata: [("k".to_string(), "v".to_string())].into(),
        };
        assert_eq!(EchoReply::decode(&r.encode_to_vec()[..]).unwrap(), r);
        assert_eq!(pattern(33).len(), 33);
        assert_eq!(pattern(8)[..], pattern(16)[..8]);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), json!(50.0));
        assert_eq!(quantile(&v, 0.99), json!(99.0));
        assert_eq!(quantile(&[], 0.5), Value::Null);
        assert!(parse_kv("a=b").is_ok() && parse_kv("A B=c").is_err() && parse_kv("x").is_err());
    }
}
