//! `http-load`: HTTP/1.1 requests from several keep-alive connections at once, either N requests
//! as fast as the answers come (closed loop) or a fixed rate for a duration (open loop), with a
//! tally of what came back: statuses, sluice's `x-sluice-error` / `x-sluice-overflow` reasons,
//! `retry-after`, the answering backend (`x-simpod-name`) and latency per status. With `--each`,
//! one line per request too (its start and latency), so a test can look at rates and delays;
//! with `--seq-header NAME` every request carries its number in that header, so a test can find
//! it again at the backend (and tell, say, how long it took to get there). `--tally-header NAME`
//! also tallies the answers by a response header of the test's choosing (say, which version of
//! a service answered), and `--method` sends something other than GET.
//!
//! Every connection is opened before the first request is sent, and all start together: with
//! `--connections 50 --count 50` the 50 requests are in flight at the same moment.

use std::{
    collections::BTreeMap,
    io::{BufReader, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Barrier,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};

use crate::{connect, emit, err_str, read_response};

#[derive(clap::Args, Clone)]
pub struct Args {
    #[arg(long, value_parser = crate::parse_sock_addr)]
    to: SocketAddr,
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header (default: the --to address).
    #[arg(long)]
    host: Option<String>,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// The request method (sent without a body).
    #[arg(long, default_value = "GET")]
    method: String,
    /// Tally the answers by the value of this response header too (repeatable): the summary's
    /// `by_header[NAME][VALUE]`, with `(none)` for answers without it.
    #[arg(long = "tally-header")]
    tally_headers: Vec<String>,
    /// Keep-alive connections, each with one request at a time.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Closed loop: this many requests in total, each connection sending its next one as soon
    /// as its previous answer is in.
    #[arg(long, conflicts_with = "rps")]
    count: Option<u64>,
    /// Open loop: this many requests per second in total for --duration-ms, each connection on
    /// its own evenly spaced schedule (an answer that comes late delays that connection's next
    /// send).
    #[arg(long)]
    rps: Option<f64>,
    #[arg(long, default_value_t = 1_000)]
    duration_ms: u64,
    /// Also print one line per request (after the run, in order of start).
    #[arg(long)]
    each: bool,
    /// Send each request's number (its `id` in the --each lines) in this header.
    #[arg(long)]
    seq_header: Option<String>,
    /// Connect timeout, and the longest one request may take.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

/// What one request got.
struct Record {
    /// The request's number (sent in --seq-header).
    id: u64,
    conn: usize,
    /// Wall-clock send time, in ms since the Unix epoch.
    sent_unix_ms: f64,
    /// Since the run started (all connections open), in ms.
    start_ms: f64,
    elapsed_ms: f64,
    status: Option<u16>,
    error: Option<String>,
    flag: Option<String>,
    overflow: Option<String>,
    retry_after: Option<String>,
    name: Option<String>,
    /// The values of the --tally-header headers, in that order.
    tallied: Vec<Option<String>>,
}

impl Record {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "sent_unix_ms": round3(self.sent_unix_ms),
            "conn": self.conn,
            "start_ms": round3(self.start_ms),
            "elapsed_ms": round3(self.elapsed_ms),
            "status": self.status,
            "error": self.error,
            "flag": self.flag,
            "overflow": self.overflow,
            "retry_after": self.retry_after,
            "name": self.name,
            "tallied": self.tallied,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Percentiles (ms) of a set of latencies.
fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({"count": 0});
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| round3(v[((v.len() - 1) as f64 * q).round() as usize]);
    json!({
        "count": v.len(),
        "min": round3(v[0]),
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": round3(v[v.len() - 1]),
    })
}

struct Conn {
    r: BufReader<TcpStream>,
}

fn open(a: &Args) -> Result<Conn, String> {
    connect(a.to, Duration::from_millis(a.timeout_ms))
        .map(|s| Conn { r: BufReader::new(s) })
        .map_err(|e| err_str(&e))
}

fn request_bytes(a: &Args, id: u64) -> Vec<u8> {
    let host = a.host.clone().unwrap_or_else(|| a.to.to_string());
    let mut extra = String::new();
    for h in &a.headers {
        extra.push_str(h.trim());
        extra.push_str("\r\n");
    }
    if let Some(name) = &a.seq_header {
        extra.push_str(&format!("{name}: {id}\r\n"));
    }
    // A method that may carry a body says it has none, so the server does not wait for one.
    let length = if a.method == "GET" || a.method == "HEAD" { "" } else { "content-length: 0\r\n" };
    format!(
        "{} {} HTTP/1.1\r\nhost: {host}\r\nuser-agent: simpod-load\r\naccept: */*\r\n{length}{extra}\r\n",
        a.method, a.path
    )
    .into_bytes()
}

/// Request number `id` on `conn` (opened first if needed); the connection is dropped after an
/// error or when the server closes it.
fn one(a: &Args, id: u64, conn: &mut Option<Conn>, index: usize, base: Instant) -> Record {
    let req = request_bytes(a, id);
    let started = Instant::now();
    let mut rec = Record {
        id,
        sent_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e3),
        conn: index,
        start_ms: started.duration_since(base).as_secs_f64() * 1e3,
        elapsed_ms: 0.0,
        status: None,
        error: None,
        flag: None,
        overflow: None,
        retry_after: None,
        name: None,
        tallied: Vec::new(),
    };
    if conn.is_none() {
        match open(a) {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                rec.error = Some(format!("connect: {e}"));
                rec.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
                return rec;
            }
        }
    }
    let c = conn.as_mut().expect("opened above");
    let res = c.r.get_mut().write_all(&req).and_then(|_| read_response(&mut c.r, false));
    rec.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    match res {
        Ok((status, headers, _body)) => {
            rec.status = Some(status);
            let get =
                |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
            rec.flag = get("x-sluice-error");
            rec.overflow = get("x-sluice-overflow");
            rec.retry_after = get("retry-after");
            rec.name = get("x-simpod-name");
            rec.tallied = a.tally_headers.iter().map(|h| get(h)).collect();
            if get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                *conn = None;
            }
        }
        Err(e) => {
            rec.error = Some(err_str(&e));
            *conn = None;
        }
    }
    rec
}

pub fn run(a: Args) -> bool {
    if a.connections == 0 || (a.count.is_none() && a.rps.is_none()) || a.rps.is_some_and(|r| r <= 0.0) {
        emit(
            json!({"ok": false, "stage": "args", "error": "give --count N or --rps R (> 0), and --connections >= 1"}),
        );
        return false;
    }
    let next = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(a.connections + 1));
    let base = Instant::now();
    let workers: Vec<_> = (0..a.connections)
        .map(|i| {
            let (a, next, barrier) = (a.clone(), next.clone(), barrier.clone());
            thread::spawn(move || {
                // Open first; a failure here is retried by the first request.
                let mut conn = open(&a).ok();
                barrier.wait();
                let t0 = Instant::now();
                let mut out = Vec::new();
                match (a.count, a.rps) {
                    (Some(count), _) => loop {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        if id >= count {
                            break;
                        }
                        out.push(one(&a, id, &mut conn, i, base));
                    },
                    (None, Some(rps)) => {
                        let interval = a.connections as f64 / rps;
                        let offset = interval * i as f64 / a.connections as f64;
                        let end = a.duration_ms as f64 / 1e3;
                        let mut k = 0u64;
                        loop {
                            let at = offset + k as f64 * interval;
                            if at >= end {
                                break;
                            }
                            k += 1;
                            let wait = Duration::from_secs_f64(at).saturating_sub(t0.elapsed());
                            if !wait.is_zero() {
                                thread::sleep(wait);
                            }
                            // Numbered across connections in order of schedule.
                            let id = i as u64 + (k - 1) * a.connections as u64;
                            out.push(one(&a, id, &mut conn, i, base));
                        }
                    }
                    (None, None) => {}
                }
                out
            })
        })
        .collect();
    barrier.wait();
    let run_start = base.elapsed().as_secs_f64() * 1e3;
    let mut all: Vec<Record> = Vec::new();
    for w in workers {
        match w.join() {
            Ok(recs) => all.extend(recs),
            Err(_) => {
                emit(json!({"ok": false, "stage": "run", "error": "a worker panicked"}));
                return false;
            }
        }
    }
    let elapsed_ms = base.elapsed().as_secs_f64() * 1e3 - run_start;
    all.sort_by(|x, y| x.start_ms.total_cmp(&y.start_ms));
    for r in &mut all {
        r.start_ms -= run_start;
    }
    if a.each {
        for (seq, r) in all.iter().enumerate() {
            let mut v = r.json();
            v["seq"] = json!(seq);
            emit(v);
        }
    }
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_flag: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_overflow: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_header: BTreeMap<String, BTreeMap<String, u64>> =
        a.tally_headers.iter().map(|h| (h.clone(), BTreeMap::new())).collect();
    let mut latencies: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut first_error = None;
    let (mut errors, mut with_retry_after, mut ok_count) = (0u64, 0u64, 0u64);
    for r in &all {
        let key = match (r.status, &r.error) {
            (Some(s), _) => s.to_string(),
            (None, e) => {
                errors += 1;
                first_error = first_error.or_else(|| e.clone());
                "error".to_string()
            }
        };
        if r.status.is_some_and(|s| (200..300).contains(&s)) {
            ok_count += 1;
        }
        *by_status.entry(key.clone()).or_default() += 1;
        if let Some(f) = &r.flag {
            *by_flag.entry(f.clone()).or_default() += 1;
        }
        if let Some(o) = &r.overflow {
            *by_overflow.entry(o.clone()).or_default() += 1;
        }
        if let Some(n) = &r.name {
            *by_name.entry(n.clone()).or_default() += 1;
        }
        for (h, v) in a.tally_headers.iter().zip(&r.tallied) {
            let value = v.clone().unwrap_or_else(|| "(none)".into());
            *by_header.entry(h.clone()).or_default().entry(value).or_default() += 1;
        }
        if r.retry_after.is_some() {
            with_retry_after += 1;
        }
        latencies.entry(key).or_default().push(r.elapsed_ms);
    }
    let latency: BTreeMap<String, Value> = latencies.into_iter().map(|(k, v)| (k, percentiles(v))).collect();
    emit(json!({
        "ok": errors == 0,
        "requests": all.len(),
        "succeeded": ok_count,
        "errors": errors,
        "first_error": first_error,
        "by_status": by_status,
        "by_flag": by_flag,
        "by_overflow": by_overflow,
        "by_name": by_name,
        "by_header": by_header,
        "with_retry_after": with_retry_after,
        "latency_ms": latency,
        "elapsed_ms": round3(elapsed_ms),
        "succeeded_per_s": round3(ok_count as f64 / (elapsed_ms / 1e3).max(1e-9)),
    }));
    // Failed statuses are data here: only transport errors make the exit status non-zero.
    errors == 0
}
