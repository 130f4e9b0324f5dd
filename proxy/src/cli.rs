//! The node-local admin CLI: `sluice status`, `sluice pods`, `sluice conns`, `sluice certs`
//! (and `sluice certs request`).
//!
//! It talks to the admin API of the sluice on this node, over TCP (127.0.0.1:15000 by default,
//! reachable from the node's network namespace) or over the unix socket of a named node.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;

use crate::{
    admin::api::{ConnView, PodView, StatusView},
    identity::{CertRequestView, CertView},
};

/// Where the admin API is.
#[derive(Debug, Clone)]
pub enum AdminEndpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl AdminEndpoint {
    /// `--admin` takes `http://host:port`, `host:port`, or a path to a unix socket;
    /// `--node N` means `/run/sluice/N/admin.sock`.
    pub fn from_flags(admin: Option<&str>, node: Option<&str>) -> Self {
        if let Some(node) = node {
            return Self::Unix(default_admin_socket(node));
        }
        match admin {
            Some(a) if a.starts_with('/') || a.starts_with('.') => Self::Unix(PathBuf::from(a)),
            Some(a) => Self::Tcp(a.trim_start_matches("http://").trim_end_matches('/').to_string()),
            None => Self::Tcp(format!("127.0.0.1:{}", sluice_common::ADMIN_PORT)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Tcp(a) => format!("http://{a}"),
            Self::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

pub fn default_admin_socket(node: &str) -> PathBuf {
    PathBuf::from("/run/sluice").join(node).join("admin.sock")
}

/// GET `path` from the admin API and decode the JSON body.
pub fn get<T: DeserializeOwned>(ep: &AdminEndpoint, path: &str) -> Result<T> {
    let body = get_raw(ep, path)?;
    serde_json::from_slice(&body).with_context(|| format!("decoding {path} from {}", ep.describe()))
}

fn get_raw(ep: &AdminEndpoint, path: &str) -> Result<Vec<u8>> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let response = exchange(ep, &request)?;
    parse_response(&response).with_context(|| format!("GET {path} from {}", ep.describe()))
}

/// Sends one whole HTTP/1.1 request (`Connection: close`) and returns the raw response.
fn exchange(ep: &AdminEndpoint, request: &str) -> Result<Vec<u8>> {
    let not_running = |e: std::io::Error| {
        anyhow!(
            "cannot reach sluice's admin API at {} ({e}). Is sluice running on this node? \
             (inside the node's network namespace the default 127.0.0.1:15000 works; elsewhere use --node NAME or --admin PATH)",
            ep.describe()
        )
    };
    let mut response = Vec::new();
    match ep {
        AdminEndpoint::Tcp(addr) => {
            let mut s = TcpStream::connect(addr).map_err(not_running)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut response)?;
        }
        AdminEndpoint::Unix(p) => {
            let mut s = UnixStream::connect(p).map_err(not_running)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut response)?;
        }
    }
    Ok(response)
}

/// Minimal HTTP/1.1 response parsing: status line, headers, content-length or chunked body.
fn parse_response(raw: &[u8]) -> Result<Vec<u8>> {
    let (code, status_line, body) = split_response(raw)?;
    if code != 200 {
        bail!("admin API answered {status_line}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(body)
}

/// The status code, status line and (de-chunked) body of a response.
fn split_response(raw: &[u8]) -> Result<(u16, String, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response"))?;
    let head = std::str::from_utf8(&raw[..split]).context("response head is not UTF-8")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok((code, status_line.to_string(), body))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("bad chunked body"))?;
        let size = usize::from_str_radix(std::str::from_utf8(&body[..eol])?.split(';').next().unwrap_or("").trim(), 16)?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            bail!("truncated chunked body");
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn status(ep: &AdminEndpoint, out: Output) -> Result<String> {
    let s: StatusView = get(ep, "/status")?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&s)? + "\n");
    }
    let mut o = String::new();
    o += &format!("sluice {} on node {}\n", s.version, s.node);
    o += &format!("state:        {} (fail-{}), up {}s\n", if s.ready { "ready" } else { "starting" }, s.fail_mode, s.uptime_s);
    o += &format!("pods:         {} enrolled\n", s.pods_enrolled);
    o += &format!("connections:  {} open, {} total\n", s.connections_open, s.connections_total);
    o += "\nprograms:\n";
    o += &table(
        &["NAME", "ATTACH", "PROG ID", "LINK ID", "PINNED"],
        s.programs
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.attach_type.clone(),
                    p.id.to_string(),
                    p.link_id.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                    if p.pinned { "yes".into() } else { "no".into() },
                ]
            })
            .collect(),
    );
    o += "\ncounters (kernel programs and proxy):\n";
    o += &table(&["COUNTER", "VALUE"], s.counters.iter().map(|(k, v)| vec![k.clone(), v.to_string()]).collect());
    if !s.manifest_errors.is_empty() {
        o += "\nmanifest errors (last good state of these files stays in force):\n";
        o += &table(&["FILE", "PROBLEM"], s.manifest_errors.iter().map(|e| vec![e.file.clone(), e.reason.clone()]).collect());
    }
    Ok(o)
}

pub fn pods(ep: &AdminEndpoint, out: Output) -> Result<String> {
    let pods: Vec<PodView> = get(ep, "/pods")?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&pods)? + "\n");
    }
    if pods.is_empty() {
        return Ok("no enrolled pods on this node (is the namespace annotated sluice.dev/mesh=enabled?)\n".into());
    }
    Ok(table(
        &["POD", "IP", "IDENTITY", "CGROUP ID", "NETNS", "LISTENERS", "OPEN", "TOTAL"],
        pods.iter()
            .map(|p| {
                vec![
                    format!("{}/{}", p.namespace, p.name),
                    p.ip.to_string(),
                    p.identity.clone(),
                    p.cgroup_id.to_string(),
                    format!("net:[{}]", p.netns),
                    p.listeners.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
                    p.connections_open.to_string(),
                    p.connections_total.to_string(),
                ]
            })
            .collect(),
    ))
}

pub fn conns(ep: &AdminEndpoint, out: Output) -> Result<String> {
    let conns: Vec<ConnView> = get(ep, "/conns")?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&conns)? + "\n");
    }
    if conns.is_empty() {
        return Ok("no open connections\n".into());
    }
    Ok(table(
        &["ID", "DIR", "PROTO", "SOURCE POD", "SOURCE", "DESTINATION", "SERVICE", "ENDPOINT", "SECURITY", "PEER IDENTITY", "SENT", "RECEIVED", "AGE"],
        conns
            .iter()
            .map(|c| {
                vec![
                    c.id.to_string(),
                    match c.direction {
                        crate::conns::Direction::Outbound => "out".into(),
                        crate::conns::Direction::Inbound => "in".into(),
                    },
                    c.protocol.clone(),
                    c.source_pod.clone(),
                    c.source_addr.to_string(),
                    c.original_dst.to_string(),
                    c.service.clone().unwrap_or_else(|| "-".into()),
                    if c.protocol == "tcp" {
                        c.endpoint.to_string()
                    } else {
                        // HTTP: every request picks its own endpoint (see `sluice routes`).
                        format!("per request ({} so far)", c.requests)
                    },
                    c.security.clone(),
                    c.peer_identity.clone().unwrap_or_else(|| "-".into()),
                    human_bytes(c.bytes_sent),
                    human_bytes(c.bytes_received),
                    human_age(c.age_ms),
                ]
            })
            .collect(),
    ))
}

pub fn certs(ep: &AdminEndpoint, out: Output) -> Result<String> {
    let certs: Vec<CertView> = get(ep, "/certs")?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&certs)? + "\n");
    }
    if certs.is_empty() {
        return Ok("no workload certificates (no enrolled pods on this node)\n".into());
    }
    Ok(table(
        &["IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "NEXT RENEWAL", "FAILURES"],
        certs
            .iter()
            .map(|c| {
                vec![
                    c.identity.to_string(),
                    c.serial.clone(),
                    c.not_before.clone(),
                    c.not_after.clone(),
                    c.next_renewal.clone(),
                    match &c.last_error {
                        Some(e) => format!("{} ({e})", c.renewal_failures),
                        None => c.renewal_failures.to_string(),
                    },
                ]
            })
            .collect(),
    ))
}

/// `sluice certs request SPIFFE_ID`: asks the node's CA for a certificate for `identity` without
/// installing it. Returns what to print, and the refusal (the command then exits non-zero).
pub fn cert_request(ep: &AdminEndpoint, identity: &str, out: Output) -> Result<(String, Option<String>)> {
    let body = serde_json::to_string(&serde_json::json!({ "identity": identity }))?;
    let request = format!(
        "POST /certs/request HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = exchange(ep, &request)?;
    let (code, status_line, body) =
        split_response(&raw).with_context(|| format!("POST /certs/request to {}", ep.describe()))?;
    let view: CertRequestView = match serde_json::from_slice(&body) {
        Ok(v) => v,
        // Not a decision of the CA (a malformed identity, an older sluice): say what came back.
        Err(_) => bail!("admin API answered {status_line}: {}", String::from_utf8_lossy(&body).trim()),
    };
    let refusal = (code != 200 || !view.issued).then(|| match &view.reason {
        Some(reason) => format!("the CA refused: {reason}"),
        None => format!(
            "the CA refused a certificate for {} on node {} ({status_line})",
            view.identity, view.node
        ),
    });
    if out == Output::Json {
        return Ok((serde_json::to_string_pretty(&view)? + "\n", refusal));
    }
    if refusal.is_some() {
        return Ok((String::new(), refusal));
    }
    Ok((
        format!(
            "node {} would get a certificate for {}: serial {}, valid {} to {} (checked with the CA, not installed)\n",
            view.node,
            view.identity,
            view.serial.as_deref().unwrap_or("-"),
            view.not_before.as_deref().unwrap_or("-"),
            view.not_after.as_deref().unwrap_or("-"),
        ),
        None,
    ))
}

/// Left-aligned columns separated by two spaces, like kubectl.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l += c;
            } else {
                l += &format!("{c:<w$}  ", w = widths[i]);
            }
        }
        out += l.trim_end();
        out += "\n";
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn human_age(ms: u64) -> String {
    match ms {
        0..=9_999 => format!("{:.1}s", ms as f64 / 1000.0),
        10_000..=3_599_999 => format!("{}m{}s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{}h{}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], vec![vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }

    #[test]
    fn parses_chunked_and_plain_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), b"{}");
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"{}");
        let err = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nnope").unwrap_err().to_string();
        assert!(err.contains("404"), "{err}");
    }

    #[test]
    fn humanises() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_age(61_000), "1m1s");
    }
}

/// `sluice routes [SERVICE]`: each Service port's effective route table, its backends with
/// weights, and their endpoints with the current peak-EWMA latency.
pub fn routes(ep: &AdminEndpoint, service: Option<&str>, out: Output) -> Result<String> {
    use crate::admin::routes::{BackendView, ServiceRoutesView};
    let path = match service {
        Some(s) => format!("/routes?service={}", s.replace('/', "%2F")),
        None => "/routes".to_owned(),
    };
    let views: Vec<ServiceRoutesView> = get(ep, &path)?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&views)? + "\n");
    }
    if views.is_empty() {
        return Ok(match service {
            Some(s) => format!("no Service {s} in the model\n"),
            None => "no Services in the model\n".into(),
        });
    }
    let endpoints = |b: &BackendView| -> String {
        if let Some(why) = &b.invalid {
            return format!("INVALID: {why}");
        }
        if b.endpoints.is_empty() {
            return "no ready endpoints".into();
        }
        b.endpoints
            .iter()
            .map(|e| match e.ewma_ms {
                Some(ms) => format!("{} ewma={ms:.2}ms pending={} sent={}", e.address, e.pending, e.requests),
                None => format!("{} (no requests yet)", e.address),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut s = String::new();
    for v in &views {
        let port = match (&v.port_name, &v.app_protocol) {
            (Some(n), Some(a)) => format!("{} ({n}, {a})", v.port),
            (Some(n), None) => format!("{} ({n})", v.port),
            (None, Some(a)) => format!("{} ({a})", v.port),
            (None, None) => v.port.to_string(),
        };
        s.push_str(&format!("{} port {port}, ClusterIP {}\n", v.service, v.cluster_ip.as_deref().unwrap_or("None")));
        if v.tables.is_empty() {
            s.push_str(&format!("  no routes: every request → {} ({})\n", v.default_backend.backend, endpoints(&v.default_backend)));
        }
        for t in &v.tables {
            s.push_str(&format!("  routes for {}, in precedence order:\n", t.clients));
            let mut rows = Vec::new();
            for e in &t.entries {
                let mut extra = e.filters.clone();
                if let Some(ms) = e.request_timeout_ms {
                    extra.push(format!("timeout {ms}ms"));
                }
                if let Some(ms) = e.backend_request_timeout_ms {
                    extra.push(format!("backend timeout {ms}ms"));
                }
                let rule = match &e.rule_name {
                    Some(n) => format!("{} ({n})", e.rule),
                    None => e.rule.to_string(),
                };
                let backends = if e.backends.is_empty() { vec![None] } else { e.backends.iter().map(Some).collect() };
                for (i, b) in backends.into_iter().enumerate() {
                    let first = i == 0;
                    rows.push(vec![
                        if first { e.order.to_string() } else { String::new() },
                        if first { e.route.clone() } else { String::new() },
                        if first { rule.clone() } else { String::new() },
                        if first { e.matches.clone() } else { String::new() },
                        if first { extra.join(", ") } else { String::new() },
                        b.map_or("(none: 500)".into(), |b| format!("{} {:.0}%", b.backend, b.share_percent)),
                        b.map_or(String::new(), &endpoints),
                    ]);
                }
            }
            for line in table(&["#", "ROUTE", "RULE", "MATCH", "FILTERS", "BACKEND", "ENDPOINTS"], rows).lines() {
                s.push_str("    ");
                s.push_str(line);
                s.push('\n');
            }
        }
    }
    Ok(s)
}
