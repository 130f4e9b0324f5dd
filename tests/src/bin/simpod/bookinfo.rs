//! `bookinfo`: stand-ins for the four applications of Istio's Bookinfo sample, behaving as the
//! real ones do where a mesh can see it, so that Istio's tasks (traffic shifting, routing by
//! user, fault injection, authorization) play out on them as the tasks describe.
//!
//! The call graph and what travels along it:
//!
//! - **productpage** `GET /productpage` calls details (`GET /details/0`, 3 s timeout, one try)
//!   and reviews (`GET /reviews/0`, 3 s timeout, two tries: the real application's deliberate
//!   6 s that the fault-injection task relies on). The logged-in user comes from the session
//!   cookie (`session=<user>`, set by `POST /login` with form field `username`, cleared by
//!   `GET /logout`; the real application signs its Flask session, the stand-in does not) and is
//!   sent on as `end-user: <user>`. It also forwards the request headers the real application
//!   forwards: `x-request-id`, the B3 headers (`b3`, `x-b3-*`), W3C `traceparent`/`tracestate`,
//!   `x-ot-span-context`, the Datadog ones, `x-cloud-trace-context`, `grpc-trace-bin`, `sw8`,
//!   `user-agent`, `cookie`, `authorization` and `jwt`. `/api/v1/products[/0[/reviews|/ratings]]`
//!   and `/health` answer as the real API does.
//! - **details** `GET /details/<id>`: the book's details.
//! - **reviews** `GET /reviews/<id>`: two reviews; with ratings enabled (v2, v3) each carries
//!   the stars ratings gave, fetched with the same headers plus `end-user` (timeout 10 s for
//!   black stars, v2, and 2.5 s for red ones, v3, as in the real application), or
//!   `"Ratings service is currently unavailable"` when that call fails.
//! - **ratings** `GET /ratings/<id>`: the stars of both reviewers.
//!
//! The stand-ins add what a test needs to count: every answer carries `x-simpod-name` (the
//! pod) and `x-bookinfo-version`, and its JSON says `pod` and `version`; productpage's page is
//! JSON (not HTML) with what each call returned, and sums it up in `x-bookinfo-details`,
//! `x-bookinfo-reviews` (the reviews version that answered, or `unavailable`) and
//! `x-bookinfo-ratings` (the ratings version, `none` when reviews shows no ratings (v1),
//! `unavailable`, or `unknown` when reviews itself failed). Each service reports the propagated
//! headers it received (`received`), so a test can follow them through the graph.

use std::{
    io::{self, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::{json, Map, Value};

use crate::{emit, err_str, read_body, read_head, read_response, serve, Headers};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    Productpage,
    Details,
    Reviews,
    Ratings,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    app: App,
    #[arg(long, default_value_t = 9080)]
    port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    bind: String,
    /// The pod's name (the application's HOSTNAME), reported in every answer.
    #[arg(long)]
    pod: String,
    /// The version this image is (v1, v2, v3).
    #[arg(long, default_value = "v1")]
    version: String,
    /// Where details is: `HOST@ADDR`, the Host header the application sends and the address
    /// its name resolves to (`details:9080@10.96.0.11:9080`); `HOST@` when the name does not
    /// resolve (every call fails as a DNS failure would).
    #[arg(long, value_parser = parse_upstream)]
    details: Option<UpstreamAddr>,
    #[arg(long, value_parser = parse_upstream)]
    reviews: Option<UpstreamAddr>,
    #[arg(long, value_parser = parse_upstream)]
    ratings: Option<UpstreamAddr>,
    /// reviews: ask ratings for stars (the real image's ENABLE_RATINGS).
    #[arg(long)]
    ratings_enabled: bool,
    /// reviews: the stars' colour (STAR_COLOR); black waits 10 s for ratings, others 2.5 s.
    #[arg(long, default_value = "black")]
    star_color: String,
}

#[derive(Clone, Debug)]
pub struct UpstreamAddr {
    host: String,
    addr: Option<SocketAddr>,
}

fn parse_upstream(s: &str) -> Result<UpstreamAddr, String> {
    let (host, addr) = s.split_once('@').ok_or_else(|| format!("{s:?}: expected HOST@ADDR"))?;
    let addr = if addr.is_empty() { None } else { Some(crate::parse_sock_addr(addr)?) };
    Ok(UpstreamAddr { host: host.to_string(), addr })
}

/// Headers productpage forwards to details and reviews (besides `end-user`, which it sets from
/// the session).
const PRODUCTPAGE_FORWARDS: &[&str] = &[
    "x-request-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "sw8",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
];

/// Headers reviews forwards to ratings: the same, plus `end-user`.
const REVIEWS_FORWARDS: &[&str] = &[
    "x-request-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "sw8",
    "end-user",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
];

/// Idle keep-alive connections kept per upstream: enough for the concurrency tests use, and a
/// bound on what a burst can leave open.
const MAX_IDLE_PER_UPSTREAM: usize = 64;

/// A keep-alive HTTP/1.1 client for one upstream (as the real applications' HTTP clients pool
/// their connections).
struct Upstream {
    target: UpstreamAddr,
    idle: Mutex<Vec<BufReader<TcpStream>>>,
}

/// What an upstream call got: a response, or why there was none.
enum Reply {
    Response { status: u16, headers: Headers, body: Value },
    Failed(String),
}

impl Reply {
    fn ok_body(&self) -> Option<&Value> {
        match self {
            Reply::Response { status: 200, body, .. } => Some(body),
            _ => None,
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Reply::Response { status, .. } => Some(*status),
            Reply::Failed(_) => None,
        }
    }

    fn describe(&self) -> Value {
        match self {
            Reply::Response { status, headers, .. } => json!({
                "status": status,
                "x-sluice-error": header(headers, "x-sluice-error"),
            }),
            Reply::Failed(e) => json!({"error": e}),
        }
    }
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// A pooled connection is reusable if nothing is buffered and the peer has not closed it (a
/// non-blocking peek would block).
fn reusable(c: &BufReader<TcpStream>) -> bool {
    if !c.buffer().is_empty() {
        return false;
    }
    let s = c.get_ref();
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let idle = matches!(s.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).is_ok() && idle
}

impl Upstream {
    fn new(target: UpstreamAddr) -> Upstream {
        Upstream { target, idle: Mutex::new(Vec::new()) }
    }

    fn pooled(&self) -> Option<BufReader<TcpStream>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if reusable(&c) {
                return Some(c);
            }
        }
        None
    }

    fn put_back(&self, c: BufReader<TcpStream>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_PER_UPSTREAM {
            idle.push(c);
        }
    }

    /// `GET path` with `headers`, within `timeout` for connecting and for each read (as the
    /// real applications' clients time out). A pooled connection the server closed meanwhile
    /// is replaced once, transparently.
    fn get(&self, path: &str, headers: &[(String, String)], timeout: Duration) -> Reply {
        let Some(addr) = self.target.addr else {
            return Reply::Failed(format!("{}: name does not resolve", self.target.host));
        };
        let mut head =
            format!("GET {path} HTTP/1.1\r\nhost: {}\r\naccept: application/json\r\n", self.target.host);
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        for attempt in 0..2 {
            let (mut conn, reused) = match self.pooled() {
                Some(c) if attempt == 0 => (c, true),
                _ => match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        (BufReader::new(s), false)
                    }
                    Err(e) => return Reply::Failed(format!("connect {addr}: {}", err_str(&e))),
                },
            };
            let s = conn.get_ref();
            if s.set_read_timeout(Some(timeout)).is_err() || s.set_write_timeout(Some(timeout)).is_err() {
                continue;
            }
            let res = conn.get_mut().write_all(head.as_bytes()).and_then(|_| read_response(&mut conn, false));
            match res {
                Ok((status, resp_headers, body)) => {
                    let closes =
                        header(&resp_headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    if !closes {
                        self.put_back(conn);
                    }
                    let body = serde_json::from_slice(&body)
                        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body).into_owned()));
                    return Reply::Response { status, headers: resp_headers, body };
                }
                // The server closed a pooled connection just as it was reused: nothing was
                // answered, so the request is sent again on a new one.
                Err(e)
                    if reused
                        && matches!(
                            e.kind(),
                            io::ErrorKind::UnexpectedEof
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::BrokenPipe
                                | io::ErrorKind::ConnectionAborted
                        ) =>
                {
                    continue
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Reply::Failed(format!("timed out after {} ms", timeout.as_millis()))
                }
                Err(e) => return Reply::Failed(err_str(&e)),
            }
        }
        Reply::Failed("the pooled connection failed twice".into())
    }
}

struct Service {
    app: App,
    pod: String,
    version: String,
    details: Option<Upstream>,
    reviews: Option<Upstream>,
    ratings: Option<Upstream>,
    ratings_enabled: bool,
    star_color: String,
}

/// One parsed request.
struct Req {
    method: String,
    path: String,
    headers: Headers,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty())
    }

    /// The headers of `list` this request carries, to send on.
    fn forwarded(&self, list: &[&str]) -> Vec<(String, String)> {
        list.iter().filter_map(|h| self.header(h).map(|v| (h.to_string(), v.to_string()))).collect()
    }
}

/// An answer: status, extra headers, JSON body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn json(status: u16, body: Value) -> Answer {
        Answer { status, headers: Vec::new(), body }
    }
}

pub fn run(a: Args) -> bool {
    let upstream = |u: Option<UpstreamAddr>| u.map(Upstream::new);
    let service = std::sync::Arc::new(Service {
        app: a.app,
        pod: a.pod,
        version: a.version,
        details: upstream(a.details),
        reviews: upstream(a.reviews),
        ratings: upstream(a.ratings),
        ratings_enabled: a.ratings_enabled,
        star_color: a.star_color,
    });
    serve(&a.bind, a.port, move |s| connection(s, &service))
}

fn connection(s: TcpStream, svc: &Service) {
    let mut r = BufReader::new(s);
    loop {
        let (start, headers) = match read_head(&mut r) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => return,
        };
        let mut parts = start.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let version = parts.next().unwrap_or("HTTP/1.1").to_string();
        let Ok(body) = read_body(&mut r, &headers, false) else { return };
        let path = target.split_once('?').map_or(target.as_str(), |(p, _)| p).to_string();
        let req = Req { method, path, headers, body };
        let started = Instant::now();
        let answer = svc.handle(&req);
        emit(json!({
            "event": "request",
            "method": req.method,
            "path": target,
            "status": answer.status,
            "ms": started.elapsed().as_millis() as u64,
            "x-request-id": req.header("x-request-id"),
            "end-user": req.header("end-user"),
        }));
        let conn = header(&req.headers, "connection").map(|v| v.to_ascii_lowercase()).unwrap_or_default();
        let keep = if version == "HTTP/1.0" { conn.contains("keep-alive") } else { !conn.contains("close") };
        if write_answer(r.get_mut(), svc, &answer, keep).is_err() || !keep {
            let _ = r.get_ref().shutdown(Shutdown::Write);
            return;
        }
    }
}

fn write_answer(w: &mut TcpStream, svc: &Service, a: &Answer, keep: bool) -> io::Result<()> {
    let body = a.body.to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-simpod-name: {}\r\nx-bookinfo-version: {}\r\n",
        a.status,
        crate::reason(a.status),
        body.len(),
        svc.pod,
        svc.version
    );
    for (k, v) in &a.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !keep {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    // One write, as real servers do (two small writes stall on delayed ACKs).
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    w.write_all(&bytes)?;
    w.flush()
}

/// `/<prefix>/<id>` → id.
fn id_after<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix).filter(|id| !id.is_empty() && !id.contains('/'))
}

impl Service {
    fn handle(&self, req: &Req) -> Answer {
        if req.path == "/health" {
            return Answer::json(200, json!({"status": format!("{:?} is healthy", self.app)}));
        }
        match self.app {
            App::Productpage => self.productpage(req),
            App::Details => match (req.method.as_str(), id_after(&req.path, "/details/")) {
                ("GET", Some(id)) => Answer::json(200, self.details_of(id, req)),
                _ => self.not_found(req),
            },
            App::Reviews => match (req.method.as_str(), id_after(&req.path, "/reviews/")) {
                ("GET", Some(id)) => Answer::json(200, self.reviews_of(id, req)),
                _ => self.not_found(req),
            },
            App::Ratings => match (req.method.as_str(), id_after(&req.path, "/ratings/")) {
                ("GET", Some(id)) => Answer::json(
                    200,
                    json!({
                        "id": id.parse::<u64>().map(Value::from).unwrap_or_else(|_| json!(id)),
                        "ratings": {"Reviewer1": 5, "Reviewer2": 4},
                        "pod": self.pod,
                        "version": self.version,
                        "received": received(req, REVIEWS_FORWARDS),
                    }),
                ),
                _ => self.not_found(req),
            },
        }
    }

    fn not_found(&self, req: &Req) -> Answer {
        Answer::json(
            404,
            json!({"error": format!("{} {} is not served by {:?}", req.method, req.path, self.app)}),
        )
    }

    fn details_of(&self, id: &str, req: &Req) -> Value {
        json!({
            "id": id.parse::<u64>().map(Value::from).unwrap_or_else(|_| json!(id)),
            "author": "William Shakespeare",
            "year": 1595,
            "type": "paperback",
            "pages": 200,
            "publisher": "PublisherA",
            "language": "English",
            "ISBN-10": "1234567890",
            "ISBN-13": "123-1234567890",
            "pod": self.pod,
            "version": self.version,
            "received": received(req, PRODUCTPAGE_FORWARDS),
        })
    }

    fn reviews_of(&self, id: &str, req: &Req) -> Value {
        let mut ratings_reply = None;
        let stars = if self.ratings_enabled {
            let timeout = if self.star_color == "black" {
                Duration::from_secs(10)
            } else {
                Duration::from_millis(2500)
            };
            let reply = match &self.ratings {
                Some(up) => up.get(&format!("/ratings/{id}"), &req.forwarded(REVIEWS_FORWARDS), timeout),
                None => Reply::Failed("no ratings address given".into()),
            };
            let stars = reply.ok_body().and_then(|b| {
                let r = &b["ratings"];
                Some((r["Reviewer1"].as_i64(), r["Reviewer2"].as_i64()))
            });
            ratings_reply = Some(reply);
            Some(stars)
        } else {
            None
        };
        let rating = |n: Option<Option<i64>>| match n {
            None => Value::Null,
            Some(Some(s)) => json!({"stars": s, "color": self.star_color}),
            Some(None) => json!({"error": "Ratings service is currently unavailable"}),
        };
        let (r1, r2) = match stars {
            None => (None, None),
            Some(None) => (Some(None), Some(None)),
            Some(Some((a, b))) => (Some(a), Some(b)),
        };
        let mut reviews = vec![
            json!({"reviewer": "Reviewer1", "text": "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"}),
            json!({"reviewer": "Reviewer2", "text": "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare."}),
        ];
        if self.ratings_enabled {
            reviews[0]["rating"] = rating(Some(r1.flatten()));
            reviews[1]["rating"] = rating(Some(r2.flatten()));
        }
        let ratings = match &ratings_reply {
            None => json!(null),
            Some(reply) => {
                let mut d = reply.describe();
                if let Some(b) = reply.ok_body() {
                    d["version"] = b["version"].clone();
                    d["pod"] = b["pod"].clone();
                    d["received"] = b["received"].clone();
                }
                d
            }
        };
        json!({
            "id": id,
            "podname": self.pod,
            "clustername": null,
            "pod": self.pod,
            "version": self.version,
            "reviews": reviews,
            "ratings": ratings,
            "received": received(req, PRODUCTPAGE_FORWARDS.iter().chain(["end-user"].iter()).copied().collect::<Vec<_>>().as_slice()),
        })
    }

    fn productpage(&self, req: &Req) -> Answer {
        let user = req.cookie("session");
        let mut forward = req.forwarded(PRODUCTPAGE_FORWARDS);
        if let Some(u) = &user {
            forward.push(("end-user".into(), u.clone()));
        }
        let call = |up: &Option<Upstream>, path: &str, tries: u32| -> Reply {
            let Some(up) = up else { return Reply::Failed("no address given".into()) };
            let mut last = Reply::Failed("not tried".into());
            for _ in 0..tries {
                last = up.get(path, &forward, Duration::from_secs(3));
                if last.status() == Some(200) {
                    break;
                }
            }
            last
        };
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/login") => {
                let form = String::from_utf8_lossy(&req.body).into_owned();
                let name = form
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == "username")
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default();
                let mut a = Answer::json(302, json!({"user": name}));
                a.headers.push(("location".into(), "/productpage".into()));
                a.headers.push(("set-cookie".into(), format!("session={name}; Path=/; HttpOnly")));
                a
            }
            ("GET", "/logout") => {
                let mut a = Answer::json(302, json!({"user": null}));
                a.headers.push(("location".into(), "/productpage".into()));
                a.headers.push(("set-cookie".into(), "session=; Path=/; Max-Age=0".into()));
                a
            }
            ("GET", "/productpage") => {
                let details = call(&self.details, "/details/0", 1);
                let reviews = call(&self.reviews, "/reviews/0", 2);
                self.page(req, user, details, reviews)
            }
            ("GET", "/api/v1/products") => Answer::json(200, json!([PRODUCT.clone()])),
            ("GET", p) if p.starts_with("/api/v1/products/") => {
                let rest = &p["/api/v1/products/".len()..];
                let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
                let (reply, failure) = match what {
                    "" => (call(&self.details, &format!("/details/{id}"), 1), "product details"),
                    "reviews" => (call(&self.reviews, &format!("/reviews/{id}"), 2), "product reviews"),
                    "ratings" => (call(&self.ratings, &format!("/ratings/{id}"), 1), "product ratings"),
                    _ => return self.not_found(req),
                };
                match reply {
                    Reply::Response { status: 200, body, .. } => Answer::json(200, body),
                    other => Answer::json(
                        other.status().unwrap_or(500),
                        json!({"error": format!("Sorry, {failure} are currently unavailable for this book.")}),
                    ),
                }
            }
            _ => self.not_found(req),
        }
    }

    /// The product page: what details and reviews answered, as JSON, summed up in headers.
    fn page(&self, req: &Req, user: Option<String>, details: Reply, reviews: Reply) -> Answer {
        let details_summary = match details.ok_body() {
            Some(b) => b["version"].as_str().unwrap_or("?").to_string(),
            None => "unavailable".into(),
        };
        let (reviews_summary, ratings_summary) = match reviews.ok_body() {
            Some(b) => {
                let ratings = match &b["ratings"] {
                    Value::Null => "none".to_string(),
                    r if r["status"] == 200 => r["version"].as_str().unwrap_or("?").to_string(),
                    _ => "unavailable".to_string(),
                };
                (b["version"].as_str().unwrap_or("?").to_string(), ratings)
            }
            None => ("unavailable".to_string(), "unknown".to_string()),
        };
        let part = |reply: &Reply, failure: &str| match reply {
            Reply::Response { status: 200, body, .. } => body.clone(),
            other => {
                let mut d = other.describe();
                d["error"] = json!(format!("Sorry, {failure} are currently unavailable for this book."));
                if let Reply::Failed(e) = other {
                    d["cause"] = json!(e);
                }
                d
            }
        };
        let body = json!({
            "product": PRODUCT.clone(),
            "user": user,
            "productpage": {"pod": self.pod, "version": self.version, "received": received(req, PRODUCTPAGE_FORWARDS)},
            "details": part(&details, "product details"),
            "reviews": part(&reviews, "product reviews"),
        });
        let mut a = Answer::json(200, body);
        a.headers.push(("x-bookinfo-details".into(), details_summary));
        a.headers.push(("x-bookinfo-reviews".into(), reviews_summary));
        a.headers.push(("x-bookinfo-ratings".into(), ratings_summary));
        a
    }
}

/// The propagated headers a request arrived with.
fn received(req: &Req, list: &[&str]) -> Value {
    let mut m = Map::new();
    for h in list {
        if let Some(v) = req.header(h) {
            m.insert(h.to_string(), json!(v));
        }
    }
    Value::Object(m)
}

static PRODUCT: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
    json!({
        "id": 0,
        "title": "The Comedy of Errors",
        "descriptionHtml": "One of William Shakespeare's early plays, and one of his most farcical comedies.",
    })
});
