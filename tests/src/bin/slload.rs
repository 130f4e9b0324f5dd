//! slload: the load generator (and its backend) of `cargo xtask bench`. It runs inside simulated
//! pods; every subcommand prints JSON on stdout.
//!
//! - `serve`: an HTTP/1.1 keep-alive server answering every request with a fixed-size body
//!   (1 KiB by default), no logging per request, so that it is never the bottleneck.
//! - `grpc-serve`: the same for gRPC: a plaintext HTTP/2 (h2c) server of the unary
//!   `sluice.test.Echo/Echo` method (tests/src/grpc_proto.rs, wire-compatible with slgrpc's)
//!   answering every call with a fixed-size payload, no logging per call.
//! - `rate`: fixed-rate load without coordinated omission: each of `--connections` keep-alive
//!   connections has its own schedule (requests evenly spaced, connections offset from each
//!   other), and every request's latency is measured from the time it was *scheduled* to be
//!   sent, not from when it was sent. A response that comes late delays the next send on that
//!   connection, and that wait counts in the next request's latency, as a real client's
//!   requests would have waited (the correction wrk2 and Istio's fortio runs make).
//! - `max`: closed-loop saturation: each connection sends the next request as soon as the
//!   previous answer is in; reports requests/s and latency.
//! - `churn`: new connections per second: connect, one request (`Connection: close`), read to
//!   EOF, close; reports connections/s and connect/total latency.
//! - `hold`: opens N connections (one request each, so the whole path is established), keeps
//!   them idle until stdin closes.
//! - `seq`: one keep-alive connection; for each number N read from stdin, sends N requests at
//!   a low, fixed rate and says when done (for instruction counts under callgrind).
//! - `scrape`: a Prometheus-like scraper: `GET <url>` every `--interval-ms` on a fixed schedule
//!   (a tick missed while a scrape was in flight is sent at once, further missed ticks are
//!   dropped, as Prometheus's ticker does) over one keep-alive HTTP/1.1 connection, reading
//!   every body to its end and checking that it ends with OpenMetrics' `# EOF`; reports scrapes
//!   made, errors, non-200 answers, body bytes and scrape times.
//!
//! `rate`, `max` and `seq` speak HTTP/1.1 by default; with `--proto grpc` every request is a
//! unary gRPC call (`--payload-bytes` of payload, 1 KiB by default) over HTTP/2, one tonic
//! channel (one HTTP/2 connection) per connection and one call at a time on each, so the
//! scheduling, the latency measurement and the output are the same as for HTTP/1.1. Each
//! connection's channel runs on a current-thread tokio runtime owned by that connection's
//! thread: the thread sleeps with `clock_nanosleep` and then drives the call to completion.
//!
//! Timing: scheduling uses `clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)` with the thread's
//! timer slack set to 1 ns (the default 50 µs slack would add up to 50 µs to every send);
//! latencies go into HdrHistograms (3 significant digits, 1 ns .. 1 h).

use std::{
    io::{self, BufRead, Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    sync::Arc,
    thread,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

#[path = "../grpc_proto.rs"]
mod grpc_proto;
#[path = "slload/flood.rs"]
mod flood;

use grpc_proto::{EchoReply, EchoRequest, ECHO_PATH};

#[derive(Parser)]
#[command(name = "slload", about = "Benchmark load generator and backend for sluice (JSON on stdout)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// What the load speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    /// HTTP/1.1 keep-alive GET requests.
    Http,
    /// Unary gRPC calls (`sluice.test.Echo/Echo`) over HTTP/2 with prior knowledge.
    Grpc,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// Where to send requests (ip:port).
    #[arg(long)]
    to: SocketAddr,
    /// HTTP/1.1 requests or unary gRPC calls (`rate`, `max` and `seq` only).
    #[arg(long, value_enum, default_value_t = Proto::Http)]
    proto: Proto,
    /// gRPC: bytes of payload in every request message.
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header.
    #[arg(long, default_value = "bench")]
    host: String,
    /// Connect timeout, and the longest one read or write may block.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/1.1 keep-alive server with a fixed-size response body.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Response body size in bytes.
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Plaintext HTTP/2 gRPC server of `sluice.test.Echo/Echo` with a fixed-size reply payload.
    GrpcServe {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Reply payload size in bytes.
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Fixed-rate load over keep-alive connections; latency from each request's scheduled time.
    Rate {
        #[command(flatten)]
        target: Target,
        /// Requests per second, in total over all connections.
        #[arg(long)]
        rps: f64,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Measured time (after the warm-up).
        #[arg(long, default_value_t = 30_000)]
        duration_ms: u64,
        /// Requests scheduled in this first part of the run are sent but not recorded.
        #[arg(long, default_value_t = 1_000)]
        warmup_ms: u64,
        /// Also report latency separately for requests scheduled in even and in odd windows of
        /// this length on the monotonic clock (`slload scrape --even-windows-ms` scrapes only
        /// in even ones: an A/B comparison inside one run).
        #[arg(long)]
        split_window_ms: Option<u64>,
        /// With `--split-window-ms`: which windows are "even" is drawn from this seed (the same
        /// for the scraper), not taken in turn, so that nothing periodic in the system can
        /// fall always on one side.
        #[arg(long, default_value_t = 0)]
        window_seed: u64,
    },
    /// Closed-loop saturation: as many requests as the path answers.
    Max {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1_000)]
        warmup_ms: u64,
    },
    /// New connections per second: connect, one request with `Connection: close`, close.
    Churn {
        #[command(flatten)]
        target: Target,
        /// Connections being made at the same time.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1_000)]
        warmup_ms: u64,
    },
    /// Open N connections (one request each) and hold them idle until stdin closes.
    Hold {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        count: usize,
    },
    /// TCP echo server for any number of idle connections (one task each).
    EchoServe {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
    },
    /// Attempt N TCP connections (each proven by a one-byte echo), hold the ones that work
    /// until stdin closes; never stops early.
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Connections being set up at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Longest one attempt may take.
        #[arg(long, default_value_t = 3_000)]
        timeout_ms: u64,
        /// Instead of the one-byte echo, ask each connection to switch to WebSocket (an
        /// HTTP/1.1 Upgrade request with this Host) and require a `101 Switching Protocols`.
        #[arg(long)]
        upgrade: Option<String>,
    },
    /// One keep-alive connection; per stdin line N, send N requests spaced --interval-us apart.
    Seq {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 10_000)]
        interval_us: u64,
    },
    /// Scrape an OpenMetrics endpoint on a fixed schedule over one keep-alive connection.
    Scrape {
        /// What to scrape, `http://host:port/path` (e.g. `http://127.0.0.1:15020/metrics`).
        #[arg(long)]
        url: String,
        /// Time between scheduled scrapes.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// How long to scrape (with `--until-stdin-eof`: at most this long).
        #[arg(long, default_value_t = 30_000)]
        duration_ms: u64,
        /// Also stop (after the scrape in flight) as soon as stdin is closed.
        #[arg(long)]
        until_stdin_eof: bool,
        /// Connect timeout, and the longest one read or write may block.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Scrape only in even windows of this length on the monotonic clock (ticks in odd
        /// windows, or too close to a window's end for a scrape to finish in it, are skipped).
        #[arg(long)]
        even_windows_ms: Option<u64>,
        /// See `rate --window-seed`.
        #[arg(long, default_value_t = 0)]
        window_seed: u64,
        /// Run in the `SCHED_IDLE` CPU class: the scraper stands for a Prometheus on another
        /// machine, so its own CPU time must not take turns from the load it observes.
        #[arg(long)]
        sched_idle: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_nofile();
    let res = match cli.cmd {
        Cmd::Serve { port, bind, body_bytes, threads } => serve(&bind, port, body_bytes, threads),
        Cmd::GrpcServe { port, bind, body_bytes, threads } => grpc_serve(&bind, port, body_bytes, threads),
        Cmd::Rate { target, rps, connections, duration_ms, warmup_ms, split_window_ms, window_seed } => {
            let window_ns = split_window_ms.map(|ms| Windows::new(ms, window_seed));
            match target.proto {
                Proto::Http => rate::<H1>(&target, rps, connections, duration_ms, warmup_ms, window_ns),
                Proto::Grpc => rate::<GrpcConn>(&target, rps, connections, duration_ms, warmup_ms, window_ns),
            }
        }
        Cmd::Max { target, connections, duration_ms, warmup_ms } => match target.proto {
            Proto::Http => max::<H1>(&target, connections, duration_ms, warmup_ms),
            Proto::Grpc => max::<GrpcConn>(&target, connections, duration_ms, warmup_ms),
        },
        Cmd::Churn { target, connections, duration_ms, warmup_ms } => {
            http_only(&target).and_then(|_| churn(&target, connections, duration_ms, warmup_ms))
        }
        Cmd::Hold { target, count } => http_only(&target).and_then(|_| hold(&target, count)),
        Cmd::EchoServe { port, bind } => flood::echo_serve(&bind, port),
        Cmd::Flood { to, count, concurrency, timeout_ms, upgrade } => {
            flood::flood(to, count, concurrency, Duration::from_millis(timeout_ms), upgrade)
        }
        Cmd::Seq { target, interval_us } => match target.proto {
            Proto::Http => seq::<H1>(&target, interval_us),
            Proto::Grpc => seq::<GrpcConn>(&target, interval_us),
        },
        Cmd::Scrape { url, interval_ms, duration_ms, until_stdin_eof, timeout_ms, even_windows_ms, window_seed, sched_idle } => {
            if sched_idle {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: pid 0 is this process; `param` is a valid sched_param we own.
                if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                    eprintln!("slload: cannot enter SCHED_IDLE: {}", io::Error::last_os_error());
                    return ExitCode::FAILURE;
                }
            }
            let windows = even_windows_ms.map(|ms| Windows::new(ms, window_seed));
            scrape(&url, interval_ms, duration_ms, until_stdin_eof, timeout_ms, windows)
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emit(json!({"ok": false, "error": format!("{:?}: {e}", e.kind())}));
            ExitCode::FAILURE
        }
    }
}

/// Windows of `ns` on the monotonic clock, each "even" (0) or "odd" (1) by a hash of its index
/// and `seed`: about half of each, in an order no periodic activity can follow.
#[derive(Clone, Copy)]
struct Windows {
    ns: u64,
    seed: u64,
}

impl Windows {
    /// Windows of `ms` milliseconds (at least one).
    fn new(ms: u64, seed: u64) -> Windows {
        Windows { ns: ms.max(1) * 1_000_000, seed }
    }

    fn parity(&self, t: u64) -> usize {
        // splitmix64's finaliser.
        let mut z = (t / self.ns) ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) & 1) as usize
    }
}

fn http_only(t: &Target) -> io::Result<()> {
    match t.proto {
        Proto::Http => Ok(()),
        Proto::Grpc => Err(io::Error::new(io::ErrorKind::Unsupported, "this mode speaks HTTP/1.1 only")),
    }
}

fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

// ---------------------------------------------------------------- clock and limits

fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_until_ns(t: u64) {
    let ts = libc::timespec {
        tv_sec: (t / 1_000_000_000) as libc::time_t,
        tv_nsec: (t % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: a valid timespec; no remaining-time pointer is needed with TIMER_ABSTIME.
        let r = unsafe {
            libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &ts, std::ptr::null_mut())
        };
        if r != libc::EINTR {
            return;
        }
    }
}

/// Wake-ups as close to the deadline as the kernel's hrtimers allow.
fn precise_timers() {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Soft RLIMIT_NOFILE up to the hard limit (10 000 held connections need more than 1024).
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a pointer to our own struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

// ---------------------------------------------------------------- histograms

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 10.0).round() / 100.0
}

/// Percentiles of a latency histogram (ns) in µs.
fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    let q = |p: f64| us(h.value_at_quantile(p));
    let spectrum: Vec<Value> = [0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0]
        .iter()
        .map(|p| json!([p, if *p == 100.0 { us(h.max()) } else { q(p / 100.0) }]))
        .collect();
    json!({
        "count": h.len(),
        "min_us": us(h.min()),
        "mean_us": (h.mean() / 10.0).round() / 100.0,
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "p9999_us": q(0.9999),
        "max_us": us(h.max()),
        "spectrum": spectrum,
    })
}

// ---------------------------------------------------------------- HTTP/1.1 client side

fn request_bytes(t: &Target, close: bool) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: slload\r\n{}\r\n",
        t.path,
        t.host,
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A client connection with its own read buffer; response bodies are read and discarded.
struct HttpConn {
    s: TcpStream,
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    local: SocketAddr,
}

impl HttpConn {
    fn connect(to: SocketAddr, timeout: Duration) -> io::Result<HttpConn> {
        let s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let local = s.local_addr()?;
        Ok(HttpConn { s, buf: vec![0; 16 * 1024], lo: 0, hi: 0, local })
    }

    /// Reads more bytes into the buffer; 0 at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.hi == self.buf.len() {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
            if self.hi == self.buf.len() {
                if self.buf.len() >= 1 << 20 {
                    return Err(invalid("response head larger than 1 MiB"));
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        loop {
            match self.s.read(&mut self.buf[self.hi..]) {
                Ok(n) => {
                    self.hi += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn eof() -> io::Error {
        io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the response ended")
    }

    /// Index one past the next CRLF (from `lo`), reading as needed.
    fn line_end(&mut self) -> io::Result<usize> {
        let mut from = self.lo;
        loop {
            if let Some(p) = self.buf[from..self.hi].windows(2).position(|w| w == b"\r\n") {
                return Ok(from + p + 2);
            }
            from = self.hi.saturating_sub(1).max(self.lo);
            let before = self.lo;
            if self.fill()? == 0 {
                return Err(Self::eof());
            }
            // fill() may have moved the data to the front of the buffer.
            from = from - before + self.lo;
        }
    }

    fn skip(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let take = n.min(self.hi - self.lo);
            self.lo += take;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            if self.fill()? == 0 {
                return Err(Self::eof());
            }
        }
    }

    /// Reads one response; returns (status, whether the server closes the connection).
    fn read_response(&mut self) -> io::Result<(u16, bool)> {
        // Status line.
        let end = self.line_end()?;
        let line = &self.buf[self.lo..end - 2];
        let status: u16 = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {:?}", String::from_utf8_lossy(line))))?;
        self.lo = end;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            let end = self.line_end()?;
            let line = &self.buf[self.lo..end - 2];
            if line.is_empty() {
                self.lo = end;
                break;
            }
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let name = &line[..colon];
                let value = String::from_utf8_lossy(&line[colon + 1..]).trim().to_ascii_lowercase();
                if name.eq_ignore_ascii_case(b"content-length") {
                    length = Some(value.parse::<usize>().map_err(|_| invalid("bad content-length"))?);
                } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    chunked = value.contains("chunked");
                } else if name.eq_ignore_ascii_case(b"connection") {
                    close = value.contains("close");
                }
            }
            self.lo = end;
        }
        if chunked {
            loop {
                let end = self.line_end()?;
                let line = String::from_utf8_lossy(&self.buf[self.lo..end - 2]).into_owned();
                self.lo = end;
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    loop {
                        let end = self.line_end()?;
                        let empty = end - self.lo == 2;
                        self.lo = end;
                        if empty {
                            break;
                        }
                    }
                    break;
                }
                self.skip(size + 2)?;
            }
        } else if let Some(n) = length {
            self.skip(n)?;
        } else if status != 204 && status != 304 && !(100..200).contains(&status) {
            // Delimited by EOF.
            while self.fill()? > 0 {
                self.lo = self.hi;
            }
            close = true;
        }
        Ok((status, close))
    }

    fn exchange(&mut self, req: &[u8]) -> io::Result<(u16, bool)> {
        self.s.write_all(req)?;
        self.read_response()
    }

    /// Waits for the server to close (so that this side's close is the passive one and leaves
    /// no TIME_WAIT socket holding an ephemeral port).
    fn drain_to_eof(&mut self) -> io::Result<()> {
        self.lo = self.hi;
        while self.fill()? > 0 {
            self.lo = self.hi;
        }
        Ok(())
    }
}

fn check_status(status: u16) -> io::Result<()> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(invalid(format!("HTTP status {status}")))
    }
}

// ---------------------------------------------------------------- one request at a time

/// A client connection of the load modes: one request (HTTP/1.1) or call (gRPC) at a time.
trait LoadConn: Sized + Send + 'static {
    fn open(t: &Target) -> io::Result<Self>;
    /// One request and its whole response; `Ok(true)` when the server closes the connection
    /// after it.
    fn request(&mut self) -> io::Result<bool>;
    fn local(&self) -> String;
}

/// HTTP/1.1: a keep-alive connection and the request it sends.
struct H1 {
    conn: HttpConn,
    req: Vec<u8>,
}

impl LoadConn for H1 {
    fn open(t: &Target) -> io::Result<H1> {
        Ok(H1 {
            conn: HttpConn::connect(t.to, Duration::from_millis(t.timeout_ms))?,
            req: request_bytes(t, false),
        })
    }

    fn request(&mut self) -> io::Result<bool> {
        let (status, close) = self.conn.exchange(&self.req)?;
        check_status(status)?;
        Ok(close)
    }

    fn local(&self) -> String {
        self.conn.local.to_string()
    }
}

// ---------------------------------------------------------------- gRPC client side

/// One tonic channel (one HTTP/2 connection, made by our connector so that its local address
/// is known) on a current-thread runtime that only runs while a call is being made.
struct GrpcConn {
    rt: tokio::runtime::Runtime,
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
    req: EchoRequest,
    timeout: Duration,
    local: String,
}

impl LoadConn for GrpcConn {
    fn open(t: &Target) -> io::Result<GrpcConn> {
        use hyper_util::rt::TokioIo;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let timeout = Duration::from_millis(t.timeout_ms);
        let local = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let to = t.to;
        let connector = {
            let local = local.clone();
            tower::service_fn(move |_: http::Uri| {
                let local = local.clone();
                async move {
                    let s = tokio::net::TcpStream::connect(to).await?;
                    s.set_nodelay(true)?;
                    *local.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.local_addr()?);
                    Ok::<_, io::Error>(TokioIo::new(s))
                }
            })
        };
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{to}"))
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(timeout);
        let channel = rt
            .block_on(async { tokio::time::timeout(timeout, ep.connect_with_connector(connector)).await })
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("gRPC connect to {to}")))?
            .map_err(|e| {
                io::Error::new(io::ErrorKind::ConnectionRefused, format!("gRPC connect to {to}: {e:?}"))
            })?;
        let local =
            local.lock().unwrap_or_else(|p| p.into_inner()).map(|a| a.to_string()).unwrap_or_default();
        let req = EchoRequest {
            message: "slload".into(),
            payload: vec![b'x'; t.payload_bytes],
            ..Default::default()
        };
        Ok(GrpcConn { rt, grpc: tonic::client::Grpc::new(channel), req, timeout, local })
    }

    fn request(&mut self) -> io::Result<bool> {
        use tonic_prost::ProstCodec;
        let GrpcConn { rt, grpc, req, timeout, .. } = self;
        let call = tonic::Request::new(req.clone());
        let res = rt.block_on(async {
            tokio::time::timeout(*timeout, async {
                grpc.ready()
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
                grpc.unary(
                    call,
                    http::uri::PathAndQuery::from_static(ECHO_PATH),
                    ProstCodec::<EchoRequest, EchoReply>::default(),
                )
                .await
            })
            .await
        });
        match res {
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "gRPC call timed out")),
            Ok(Err(st)) => Err(io::Error::other(format!("gRPC status {:?}: {}", st.code(), st.message()))),
            Ok(Ok(reply)) if reply.get_ref().payload.is_empty() => Err(invalid("gRPC reply without payload")),
            Ok(Ok(_)) => Ok(false),
        }
    }

    fn local(&self) -> String {
        self.local.clone()
    }
}

// ---------------------------------------------------------------- rate (open loop)

struct RateWorker {
    /// From the scheduled send time to the end of the response (what a user sees).
    latency: Histogram<u64>,
    /// From the actual send to the end of the response.
    service: Histogram<u64>,
    /// How late the generator sent relative to the schedule.
    lag: Histogram<u64>,
    /// `latency` of the requests scheduled in even and in odd windows (with `--split-window-ms`).
    split: Option<[Histogram<u64>; 2]>,
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    /// Scheduled requests never sent because the run fell too far behind.
    unsent: u64,
    last_done: u64,
}

#[allow(clippy::too_many_arguments)]
fn rate_worker<C: LoadConn>(
    conn: C,
    target: Target,
    interval_ns: f64,
    offset_ns: f64,
    start: u64,
    record_from: u64,
    end: u64,
    window_ns: Option<Windows>,
) -> RateWorker {
    precise_timers();
    let give_up = end + (end - start).max(5_000_000_000);
    let mut w = RateWorker {
        latency: new_hist(),
        service: new_hist(),
        lag: new_hist(),
        split: window_ns.map(|_| [new_hist(), new_hist()]),
        completed: 0,
        errors: 0,
        first_error: None,
        unsent: 0,
        last_done: start,
    };
    let mut conn = Some(conn);
    let mut k: u64 = 0;
    loop {
        let sched = start + (offset_ns + k as f64 * interval_ns) as u64;
        if sched >= end {
            break;
        }
        k += 1;
        let now = mono_ns();
        if now > give_up {
            w.unsent += ((end - sched) as f64 / interval_ns).ceil() as u64;
            break;
        }
        if now < sched {
            sleep_until_ns(sched);
        }
        let sent = mono_ns();
        let res = match conn.as_mut() {
            Some(c) => c.request(),
            None => C::open(&target).and_then(|c| conn.insert(c).request()),
        };
        let done = mono_ns();
        match res {
            Ok(close) => {
                w.completed += 1;
                w.last_done = done;
                if sched >= record_from {
                    w.latency.saturating_record(done - sched);
                    w.service.saturating_record(done - sent);
                    w.lag.saturating_record(sent.saturating_sub(sched).max(1));
                    if let (Some(split), Some(win)) = (w.split.as_mut(), window_ns) {
                        split[win.parity(sched)].saturating_record(done - sched);
                    }
                }
                if close {
                    conn = None;
                }
            }
            Err(e) => {
                w.errors += 1;
                w.first_error.get_or_insert_with(|| format!("{:?}: {e}", e.kind()));
                conn = None;
            }
        }
    }
    w
}

fn connect_all<C: LoadConn>(target: &Target, n: usize) -> io::Result<Vec<C>> {
    (0..n).map(|_| C::open(target)).collect()
}

fn locals<C: LoadConn>(conns: &[C]) -> Vec<String> {
    conns.iter().map(C::local).collect()
}

fn rate<C: LoadConn>(
    target: &Target,
    rps: f64,
    connections: usize,
    duration_ms: u64,
    warmup_ms: u64,
    window_ns: Option<Windows>,
) -> io::Result<()> {
    if !(rps > 0.0) || connections == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "--rps and --connections must be positive"));
    }
    let conns = connect_all::<C>(target, connections)?;
    let local = locals(&conns);
    let interval_ns = connections as f64 * 1e9 / rps;
    let start = mono_ns() + 20_000_000;
    let record_from = start + warmup_ms * 1_000_000;
    let end = record_from + duration_ms * 1_000_000;
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let t = target.clone();
            let offset = i as f64 * interval_ns / connections as f64;
            thread::spawn(move || rate_worker(c, t, interval_ns, offset, start, record_from, end, window_ns))
        })
        .collect();
    let mut latency = new_hist();
    let mut service = new_hist();
    let mut lag = new_hist();
    let mut split = [new_hist(), new_hist()];
    let (mut completed, mut errors, mut unsent, mut last_done) = (0, 0, 0, end);
    let mut first_error = None;
    for h in handles {
        let w = h.join().map_err(|_| io::Error::other("worker panicked"))?;
        if let Some([even, odd]) = &w.split {
            split[0].add(even).expect("same bounds");
            split[1].add(odd).expect("same bounds");
        }
        latency.add(&w.latency).expect("same bounds");
        service.add(&w.service).expect("same bounds");
        lag.add(&w.lag).expect("same bounds");
        completed += w.completed;
        errors += w.errors;
        unsent += w.unsent;
        last_done = last_done.max(w.last_done);
        first_error = first_error.or(w.first_error);
    }
    let measured_s = (last_done - record_from) as f64 / 1e9;
    emit(json!({
        "ok": errors == 0 && unsent == 0,
        "mode": "rate",
        "proto": format!("{:?}", target.proto).to_lowercase(),
        "to": target.to.to_string(),
        "target_rps": rps,
        "connections": connections,
        "duration_ms": duration_ms,
        "warmup_ms": warmup_ms,
        "recorded": latency.len(),
        "completed": completed,
        "errors": errors,
        "first_error": first_error,
        "unsent": unsent,
        "achieved_rps": (latency.len() as f64 / measured_s * 10.0).round() / 10.0,
        "latency": summary(&latency),
        "service_time": summary(&service),
        "send_lag": summary(&lag),
        "split": window_ns.map(|w| json!({
            "window_ms": w.ns / 1_000_000,
            "window_seed": w.seed,
            "even": summary(&split[0]),
            "odd": summary(&split[1]),
        })),
        "locals": local,
    }));
    Ok(())
}

// ---------------------------------------------------------------- max (closed loop)

fn max<C: LoadConn>(target: &Target, connections: usize, duration_ms: u64, warmup_ms: u64) -> io::Result<()> {
    let conns = connect_all::<C>(target, connections)?;
    let local = locals(&conns);
    let start = mono_ns() + 20_000_000;
    let record_from = start + warmup_ms * 1_000_000;
    let end = record_from + duration_ms * 1_000_000;
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let t = target.clone();
            thread::spawn(move || {
                let mut h = new_hist();
                let (mut errors, mut first_error, mut total) = (0u64, None, 0u64);
                sleep_until_ns(start);
                loop {
                    let sent = mono_ns();
                    if sent >= end {
                        break;
                    }
                    match c.request() {
                        Ok(close) => {
                            let done = mono_ns();
                            total += 1;
                            if sent >= record_from && done <= end {
                                h.saturating_record(done - sent);
                            }
                            if close {
                                match C::open(&t) {
                                    Ok(n) => c = n,
                                    Err(_) => break,
                                }
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{:?}: {e}", e.kind()));
                            match C::open(&t) {
                                Ok(n) => c = n,
                                Err(_) => break,
                            }
                        }
                    }
                }
                (h, errors, first_error, total)
            })
        })
        .collect();
    let mut latency = new_hist();
    let (mut errors, mut first_error, mut total) = (0, None, 0);
    for h in handles {
        let (hist, e, fe, t) = h.join().map_err(|_| io::Error::other("worker panicked"))?;
        latency.add(&hist).expect("same bounds");
        errors += e;
        total += t;
        first_error = first_error.or(fe);
    }
    emit(json!({
        "ok": errors == 0 && !latency.is_empty(),
        "mode": "max",
        "proto": format!("{:?}", target.proto).to_lowercase(),
        "to": target.to.to_string(),
        "connections": connections,
        "duration_ms": duration_ms,
        "completed": latency.len(),
        "total": total,
        "errors": errors,
        "first_error": first_error,
        "achieved_rps": (latency.len() as f64 / (duration_ms as f64 / 1e3) * 10.0).round() / 10.0,
        "latency": summary(&latency),
        "locals": local,
    }));
    Ok(())
}

// ---------------------------------------------------------------- churn

fn churn(target: &Target, connections: usize, duration_ms: u64, warmup_ms: u64) -> io::Result<()> {
    // One probe connection first: fail fast (and report the path) if nothing answers.
    let timeout = Duration::from_millis(target.timeout_ms);
    let mut probe = HttpConn::connect(target.to, timeout)?;
    let local = probe.local.to_string();
    let (status, _) = probe.exchange(&request_bytes(target, true))?;
    check_status(status)?;
    probe.drain_to_eof()?;
    drop(probe);

    let start = mono_ns() + 20_000_000;
    let record_from = start + warmup_ms * 1_000_000;
    let end = record_from + duration_ms * 1_000_000;
    let handles: Vec<_> = (0..connections)
        .map(|_| {
            let t = target.clone();
            thread::spawn(move || {
                let req = request_bytes(&t, true);
                let timeout = Duration::from_millis(t.timeout_ms);
                let (mut connect_h, mut total_h) = (new_hist(), new_hist());
                let (mut errors, mut first_error, mut total) = (0u64, None::<String>, 0u64);
                sleep_until_ns(start);
                loop {
                    let t0 = mono_ns();
                    if t0 >= end {
                        break;
                    }
                    let res = HttpConn::connect(t.to, timeout).and_then(|mut c| {
                        let t1 = mono_ns();
                        let (status, _) = c.exchange(&req)?;
                        check_status(status)?;
                        c.drain_to_eof()?;
                        Ok(t1)
                    });
                    let done = mono_ns();
                    match res {
                        Ok(t1) => {
                            total += 1;
                            if t0 >= record_from && done <= end {
                                connect_h.saturating_record((t1 - t0).max(1));
                                total_h.saturating_record(done - t0);
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{:?}: {e}", e.kind()));
                            // E.g. out of ephemeral ports: do not spin.
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                (connect_h, total_h, errors, first_error, total)
            })
        })
        .collect();
    let (mut connect_h, mut total_h) = (new_hist(), new_hist());
    let (mut errors, mut first_error, mut total) = (0, None, 1);
    for h in handles {
        let (c, t, e, fe, n) = h.join().map_err(|_| io::Error::other("worker panicked"))?;
        connect_h.add(&c).expect("same bounds");
        total_h.add(&t).expect("same bounds");
        errors += e;
        total += n;
        first_error = first_error.or(fe);
    }
    emit(json!({
        "ok": errors == 0 && !total_h.is_empty(),
        "mode": "churn",
        "to": target.to.to_string(),
        "connections": connections,
        "duration_ms": duration_ms,
        "completed": total_h.len(),
        "total": total,
        "errors": errors,
        "first_error": first_error,
        "conns_per_s": (total_h.len() as f64 / (duration_ms as f64 / 1e3) * 10.0).round() / 10.0,
        "connect": summary(&connect_h),
        "latency": summary(&total_h),
        "locals": [local],
    }));
    Ok(())
}

// ---------------------------------------------------------------- hold

fn hold(target: &Target, count: usize) -> io::Result<()> {
    let timeout = Duration::from_millis(target.timeout_ms);
    let req = request_bytes(target, false);
    let started = mono_ns();
    let mut held = Vec::with_capacity(count);
    let (mut failed, mut consecutive, mut first_error) = (0usize, 0usize, None);
    // A path that stopped accepting (e.g. a proxy out of descriptors) fails each attempt only
    // after the timeout: give up after a few in a row.
    while held.len() < count && consecutive < 5 {
        match HttpConn::connect(target.to, timeout).and_then(|mut c| {
            let (status, _) = c.exchange(&req)?;
            check_status(status)?;
            // The buffer is not needed while idle: keep only the socket's memory in play.
            c.buf = Vec::new();
            Ok(c)
        }) {
            Ok(c) => {
                held.push(c);
                consecutive = 0;
            }
            Err(e) => {
                failed += 1;
                consecutive += 1;
                first_error.get_or_insert_with(|| format!("{:?}: {e}", e.kind()));
            }
        }
    }
    emit(json!({
        "event": "held",
        "ok": held.len() == count,
        "count": held.len(),
        "failed": failed,
        "first_error": first_error,
        "elapsed_ms": (mono_ns() - started) / 1_000_000,
        "locals": held.iter().take(2).map(|c| c.local.to_string()).collect::<Vec<_>>(),
    }));
    // Idle until told to let go.
    let mut sink = String::new();
    let _ = io::stdin().read_to_string(&mut sink);
    drop(held);
    emit(json!({"event": "released"}));
    Ok(())
}

// ---------------------------------------------------------------- seq

fn seq<C: LoadConn>(target: &Target, interval_us: u64) -> io::Result<()> {
    precise_timers();
    let mut c = C::open(target)?;
    emit(json!({"event": "connected", "local": c.local()}));
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let Ok(n) = line.trim().parse::<u64>() else { continue };
        let start = mono_ns();
        let mut errors = 0u64;
        for k in 0..n {
            sleep_until_ns(start + k * interval_us * 1000);
            match c.request() {
                Ok(false) => {}
                Ok(true) => c = C::open(target)?,
                Err(_) => {
                    errors += 1;
                    c = C::open(target)?;
                }
            }
        }
        emit(
            json!({"event": "done", "count": n, "errors": errors, "elapsed_ms": (mono_ns() - start) / 1_000_000}),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- scrape

/// `http://host:port/path` → (address, Host header, path).
fn parse_http_url(url: &str) -> io::Result<(SocketAddr, String, String)> {
    use std::net::ToSocketAddrs;
    let bad =
        || io::Error::new(io::ErrorKind::InvalidInput, format!("not an http://host:port/path URL: {url}"));
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad());
    }
    let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port.to_socket_addrs()?.next().ok_or_else(bad)?;
    Ok((addr, authority.to_string(), path.to_string()))
}

impl HttpConn {
    /// Moves `n` bytes of the response into `out`, reading as needed.
    fn take_into(&mut self, mut n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let take = n.min(self.hi - self.lo);
            out.extend_from_slice(&self.buf[self.lo..self.lo + take]);
            self.lo += take;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            if self.fill()? == 0 {
                return Err(Self::eof());
            }
        }
    }

    /// Reads one response with its body (de-chunked) into `body`; returns (status, whether the
    /// server closes the connection).
    fn read_response_body(&mut self, body: &mut Vec<u8>) -> io::Result<(u16, bool)> {
        body.clear();
        let end = self.line_end()?;
        let line = &self.buf[self.lo..end - 2];
        let status: u16 = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {:?}", String::from_utf8_lossy(line))))?;
        self.lo = end;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            let end = self.line_end()?;
            let line = &self.buf[self.lo..end - 2];
            if line.is_empty() {
                self.lo = end;
                break;
            }
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let name = &line[..colon];
                let value = String::from_utf8_lossy(&line[colon + 1..]).trim().to_ascii_lowercase();
                if name.eq_ignore_ascii_case(b"content-length") {
                    length = Some(value.parse::<usize>().map_err(|_| invalid("bad content-length"))?);
                } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    chunked = value.contains("chunked");
                } else if name.eq_ignore_ascii_case(b"connection") {
                    close = value.contains("close");
                }
            }
            self.lo = end;
        }
        if chunked {
            loop {
                let end = self.line_end()?;
                let line = String::from_utf8_lossy(&self.buf[self.lo..end - 2]).into_owned();
                self.lo = end;
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    loop {
                        let end = self.line_end()?;
                        let empty = end - self.lo == 2;
                        self.lo = end;
                        if empty {
                            break;
                        }
                    }
                    break;
                }
                self.take_into(size, body)?;
                self.skip(2)?;
            }
        } else if let Some(n) = length {
            self.take_into(n, body)?;
        } else if status != 204 && status != 304 && !(100..200).contains(&status) {
            // Delimited by EOF.
            loop {
                body.extend_from_slice(&self.buf[self.lo..self.hi]);
                self.lo = self.hi;
                if self.fill()? == 0 {
                    break;
                }
            }
            close = true;
        }
        Ok((status, close))
    }
}

/// Whether an OpenMetrics text ends with its `# EOF` line.
fn ends_with_eof(body: &[u8]) -> bool {
    let mut end = body.len();
    while end > 0 && body[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    let body = &body[..end];
    body.ends_with(b"# EOF") && (body.len() == 5 || body[body.len() - 6] == b'\n')
}

fn scrape(
    url: &str,
    interval_ms: u64,
    duration_ms: u64,
    until_stdin_eof: bool,
    timeout_ms: u64,
    windows: Option<Windows>,
) -> io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    if interval_ms == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "--interval-ms must be positive"));
    }
    precise_timers();
    let (to, host, path) = parse_http_url(url)?;
    let timeout = Duration::from_millis(timeout_ms);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: slload-scrape\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n"
    )
    .into_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    if until_stdin_eof {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut sink = [0u8; 256];
            let mut stdin = io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            stop.store(true, Ordering::SeqCst);
        });
    }
    // Fail fast (before saying "started") when nothing listens.
    let mut conn = Some(HttpConn::connect(to, timeout)?);
    let local = conn.as_ref().map(|c| c.local.to_string()).unwrap_or_default();
    let mut connects = 1u64;
    emit(json!({"event": "started", "url": url, "local": local}));

    let interval = interval_ms * 1_000_000;
    let start = mono_ns();
    let end = start + duration_ms * 1_000_000;
    let (mut time_h, mut lag_h) = (new_hist(), new_hist());
    let (mut made, mut ok200, mut errors, mut non_200, mut missing_eof, mut dropped) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut bytes_sum, mut bytes_min, mut bytes_max, mut bytes_last) = (0u64, u64::MAX, 0u64, 0u64);
    let mut first_error: Option<String> = None;
    let mut first_bad_status: Option<u16> = None;
    let mut body = Vec::with_capacity(64 * 1024);
    // A scrape must end inside its even window: none starts in the window's last tenth.
    let in_even_window = |t: u64| windows.is_none_or(|w| w.parity(t) == 0 && t % w.ns < w.ns - w.ns / 10);
    let mut skipped = 0u64;
    let mut k: u64 = 0;
    loop {
        let sched = start + k * interval;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if sched >= end {
            // Ran for the whole --duration-ms.
            sleep_until_ns(end);
            break;
        }
        if !in_even_window(sched) {
            skipped += 1;
            k += 1;
            if mono_ns() < sched {
                sleep_until_ns(sched);
            }
            continue;
        }
        if mono_ns() < sched {
            sleep_until_ns(sched);
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
        let sent = mono_ns();
        made += 1;
        lag_h.saturating_record(sent.saturating_sub(sched).max(1));
        let res = match conn.as_mut() {
            Some(c) => Ok(c),
            None => HttpConn::connect(to, timeout).map(|c| {
                connects += 1;
                conn.insert(c)
            }),
        }
        .and_then(|c| {
            c.s.write_all(&req)?;
            c.read_response_body(&mut body)
        });
        let done = mono_ns();
        match res {
            Ok((status, close)) => {
                time_h.saturating_record((done - sent).max(1));
                if status != 200 {
                    non_200 += 1;
                    first_bad_status.get_or_insert(status);
                } else {
                    ok200 += 1;
                    let n = body.len() as u64;
                    bytes_sum += n;
                    bytes_min = bytes_min.min(n);
                    bytes_max = bytes_max.max(n);
                    bytes_last = n;
                    if !ends_with_eof(&body) {
                        missing_eof += 1;
                    }
                }
                if close {
                    conn = None;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{:?}: {e}", e.kind()));
                conn = None;
            }
        }
        // The next tick; ticks missed by more than one interval are dropped, not sent in a burst.
        k += 1;
        let now = mono_ns();
        let behind = now.saturating_sub(start) / interval;
        if behind > k {
            dropped += behind - k;
            k = behind;
        }
    }
    let elapsed_ms = (mono_ns() - start) / 1_000_000;
    let mean_bytes = if ok200 > 0 { Some(bytes_sum as f64 / ok200 as f64) } else { None };
    emit(json!({
        "ok": made > 0 && errors == 0 && non_200 == 0 && missing_eof == 0,
        "mode": "scrape",
        "url": url,
        "to": to.to_string(),
        "interval_ms": interval_ms,
        "duration_ms": duration_ms,
        "elapsed_ms": elapsed_ms,
        "stopped_by_stdin": stop.load(Ordering::SeqCst),
        "scrapes": made,
        "ok_200": ok200,
        "errors": errors,
        "non_200": non_200,
        "first_bad_status": first_bad_status,
        "missing_eof": missing_eof,
        "dropped_ticks": dropped,
        "even_windows_ms": windows.map(|w| w.ns / 1_000_000),
        "window_seed": windows.map(|w| w.seed),
        "skipped_ticks": skipped,
        "connects": connects,
        "first_error": first_error,
        "bytes": {
            "mean": mean_bytes.map(|m| m.round()),
            "min": (ok200 > 0).then_some(bytes_min),
            "max": (ok200 > 0).then_some(bytes_max),
            "last": bytes_last,
        },
        "scrape_time": summary(&time_h),
        "send_lag": summary(&lag_h),
        "locals": [local],
    }));
    Ok(())
}

// ---------------------------------------------------------------- serve

fn serve(bind: &str, port: u16, body_bytes: usize, threads: usize) -> io::Result<()> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    let bind = bind.to_string();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((bind.as_str(), port)).await?;
        emit(json!({"event": "listening", "addr": listener.local_addr()?.to_string(), "body_bytes": body_bytes}));
        let body = vec![b'x'; body_bytes];
        let head = |close: bool| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {body_bytes}\r\n{}\r\n",
                if close { "connection: close\r\n" } else { "" }
            )
        };
        let keep: Arc<[u8]> = [head(false).as_bytes(), &body].concat().into();
        let close: Arc<[u8]> = [head(true).as_bytes(), &body].concat().into();
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(serve_conn(s, keep.clone(), close.clone()));
                }
                Err(e) => {
                    // EMFILE and the like: keep serving the connections already open.
                    emit(json!({"event": "accept_error", "error": e.to_string()}));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

async fn serve_conn(mut s: tokio::net::TcpStream, keep: Arc<[u8]>, close: Arc<[u8]>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut out: Vec<u8> = Vec::new();
    loop {
        // Answer every complete request in the buffer (pipelining works too).
        let mut closing = false;
        let mut consumed = 0;
        while let Some(p) = buf[consumed..].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = &buf[consumed..consumed + p + 4];
            let (body_len, wants_close) = request_meta(head);
            let total = p + 4 + body_len;
            if buf.len() - consumed < total {
                break;
            }
            consumed += total;
            if wants_close {
                out.extend_from_slice(&close);
                closing = true;
                break;
            }
            out.extend_from_slice(&keep);
        }
        buf.drain(..consumed);
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if closing {
            let _ = s.shutdown().await;
            return;
        }
        if buf.len() > 1 << 20 {
            return;
        }
        buf.reserve(2048);
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// (content-length of the request body, whether the client asked to close).
fn request_meta(head: &[u8]) -> (usize, bool) {
    let (mut len, mut close, mut keep_alive) = (0, false, false);
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let name = &line[..colon];
        let value = String::from_utf8_lossy(&line[colon + 1..]).trim().to_ascii_lowercase();
        if name.eq_ignore_ascii_case(b"content-length") {
            len = value.parse().unwrap_or(0);
        } else if name.eq_ignore_ascii_case(b"connection") {
            close = value.contains("close");
            keep_alive = value.contains("keep-alive");
        }
    }
    // HTTP/1.0 closes unless asked otherwise.
    let first_line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    if first_line.windows(8).any(|w| w == b"HTTP/1.0") && !keep_alive {
        close = true;
    }
    (len, close)
}

// ---------------------------------------------------------------- grpc-serve

/// `sluice.test.Echo/Echo` answering every call with the same reply (a `body_bytes` payload),
/// as a plain `Service<http::Request>`: tonic's server-side `Grpc` does the framing and the
/// codec. Any other method gets UNIMPLEMENTED.
#[derive(Clone)]
struct GrpcBench {
    reply: Arc<EchoReply>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for GrpcBench {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let reply = self.reply.clone();
        Box::pin(async move {
            if req.uri().path() != ECHO_PATH {
                let st = tonic::Status::unimplemented(format!("no method {}", req.uri().path()));
                return Ok(st.into_http());
            }
            let svc = tower::service_fn(move |_: tonic::Request<EchoRequest>| {
                let reply = reply.clone();
                async move { Ok::<_, tonic::Status>(tonic::Response::new(EchoReply::clone(&reply))) }
            });
            Ok(tonic::server::Grpc::new(tonic_prost::ProstCodec::<EchoReply, EchoRequest>::default())
                .unary(svc, req)
                .await)
        })
    }
}

fn grpc_serve(bind: &str, port: u16, body_bytes: usize, threads: usize) -> io::Result<()> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    let bind = bind.to_string();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((bind.as_str(), port)).await?;
        emit(json!({"event": "listening", "addr": listener.local_addr()?.to_string(), "proto": "grpc", "body_bytes": body_bytes}));
        let reply = EchoReply { message: "slload".into(), payload: vec![b'x'; body_bytes], ..Default::default() };
        let svc = GrpcBench { reply: Arc::new(reply) };
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .serve_with_incoming(svc, incoming)
            .await
            .map_err(|e| io::Error::other(format!("gRPC server: {e}")))
    })
}
