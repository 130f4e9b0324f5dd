//! The node-local admin CLI: `sluice status`, `sluice pods`, `sluice conns`, `sluice certs`
//! (and `sluice certs request`), `sluice routes`, and the telemetry commands `sluice tap`,
//! `sluice top` and `sluice stat`.
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
    admin::api::{ConnView, PodView, StatKind, StatView, StatusView, TapEvent, TapFilter, TapMessage},
    identity::{CertRequestView, CertState, CertView, TrustBundleView},
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

/// Where each node's sluice puts its admin socket: `<RUN_DIR>/<node>/admin.sock`.
pub const RUN_DIR: &str = "/run/sluice";

pub fn default_admin_socket(node: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(node).join(ADMIN_SOCKET_NAME)
}

const ADMIN_SOCKET_NAME: &str = "admin.sock";

/// The endpoint for a command that changes state or mints something (`sluice certs request`):
/// sluice serves those on its admin unix socket only (root-only), never on the TCP port, which
/// hostNetwork pods can reach. `--node NAME` and `--admin PATH` name the socket; a URL is
/// refused with what to use instead; with neither, the only sluice socket under `/run/sluice`
/// is used (several, or none, is an error that lists them and asks for `--node`).
pub fn privileged_endpoint(admin: Option<&str>, node: Option<&str>) -> Result<AdminEndpoint> {
    privileged_endpoint_in(std::path::Path::new(RUN_DIR), admin, node)
}

fn privileged_endpoint_in(
    run_dir: &std::path::Path,
    admin: Option<&str>,
    node: Option<&str>,
) -> Result<AdminEndpoint> {
    if let Some(node) = node {
        return Ok(AdminEndpoint::Unix(run_dir.join(node).join(ADMIN_SOCKET_NAME)));
    }
    if let Some(admin) = admin {
        return match AdminEndpoint::from_flags(Some(admin), None) {
            unix @ AdminEndpoint::Unix(_) => Ok(unix),
            tcp @ AdminEndpoint::Tcp(_) => bail!(
                "this command is served on sluice's admin unix socket only, not on {} (the TCP admin \
                 port is read-only, as pods with hostNetwork can reach it): use --node NAME \
                 ({}/NAME/{ADMIN_SOCKET_NAME}) or --admin /path/to/{ADMIN_SOCKET_NAME}",
                tcp.describe(),
                run_dir.display()
            ),
        };
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(run_dir)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.path().join(ADMIN_SOCKET_NAME))
                .filter(|p| {
                    std::fs::symlink_metadata(p)
                        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.len() {
        1 => Ok(AdminEndpoint::Unix(found.remove(0))),
        0 => bail!(
            "this command is served on sluice's admin unix socket only (the TCP admin port is \
             read-only), and there is no sluice socket under {}: is sluice running on this node? \
             Use --node NAME or --admin /path/to/{ADMIN_SOCKET_NAME}",
            run_dir.display()
        ),
        _ => bail!(
            "this command is served on sluice's admin unix socket only, and {} holds several: {}; \
             choose one with --node NAME",
            run_dir.display(),
            found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
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

/// The connection bounds in force and what set the node-wide one.
fn limits_line(l: &crate::admission::AdmissionConfig) -> String {
    use crate::admission::BoundBy;
    let why = match &l.derivation {
        Some(d) => {
            let memory = match (d.memory_max, d.memory_cap) {
                (Some(max), Some(cap)) => format!(
                    "memory {} MiB: {cap} at {} KiB each after {} MiB kept back",
                    max >> 20,
                    d.connection_memory >> 10,
                    d.memory_reserve >> 20
                ),
                _ => "memory: no limit".to_string(),
            };
            let by = match d.bound_by {
                BoundBy::Descriptors => "descriptors",
                BoundBy::Memory => "memory",
                BoundBy::Flag => "--max-connections",
            };
            format!(", set by {by} (RLIMIT_NOFILE {}: {}; {memory})", d.nofile, d.fd_cap)
        }
        None => String::new(),
    };
    format!(
        "limits:       {} connections ({} sockets) node-wide{why}; per pod {} outbound, {} inbound; per peer {}\n",
        l.max_connections, l.max_sockets, l.pod_max_connections, l.pod_max_inbound, l.peer_max_inbound
    )
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
    if let Some(ca) = &s.ca {
        let d = &ca.description;
        o += &match (d.mode.as_str(), &d.address) {
            ("remote", Some(addr)) => format!("ca:           remote {addr} (this node holds no signing key)\n"),
            ("embedded", _) => "ca:           embedded (demo and small setups: this node holds the mesh root key)\n".into(),
            (mode, _) => format!("ca:           {mode}\n"),
        };
        o += &format!("trust bundle: {} root(s) from {}", ca.trust_bundle_roots, d.trust_bundle_source);
        if let Some(loaded) = &d.trust_bundle_loaded {
            o += &format!(", loaded {loaded}");
        }
        o += "\n";
        if let Some(e) = &d.trust_bundle_error {
            o += &format!("              RELOAD FAILED, the last good bundle stays in force: {e}\n");
        }
        o += &format!("certificates: {} held, {} pending\n", ca.certificates_held, ca.certificates_pending);
    }
    if let Some(l) = &s.limits {
        o += &limits_line(l);
    }
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
    o += &pod_problems(&s.pod_problems);
    Ok(o)
}

/// The pods sluice does not (fully) protect, as a table after a blank line ("" if none).
fn pod_problems(problems: &[crate::admin::api::PodProblem]) -> String {
    if problems.is_empty() {
        return String::new();
    }
    let rows = problems
        .iter()
        .map(|p| vec![p.pod.clone(), if p.enrolled { "yes" } else { "no" }.into(), p.reason.clone()])
        .collect();
    "\npods not (fully) protected:\n".to_string() + &table(&["POD", "ENROLLED", "PROBLEM"], rows)
}

pub fn pods(ep: &AdminEndpoint, out: Output) -> Result<String> {
    let pods: Vec<PodView> = get(ep, "/pods")?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&pods)? + "\n");
    }
    // Pods that should be enrolled but are not (or not fully protected) are listed below.
    let problems = get::<StatusView>(ep, "/status").map(|s| pod_problems(&s.pod_problems)).unwrap_or_default();
    if pods.is_empty() {
        return Ok("no enrolled pods on this node (is the namespace annotated sluice.dev/mesh=enabled?)\n".to_string()
            + &problems);
    }
    Ok(table(
        &["POD", "IP", "IDENTITY", "CERTIFICATE", "CGROUP ID", "NETNS", "LISTENERS", "OPEN", "TOTAL"],
        pods.iter()
            .map(|p| {
                vec![
                    format!("{}/{}", p.namespace, p.name),
                    p.ip.to_string(),
                    p.identity.clone(),
                    p.certificate.clone(),
                    p.cgroup_id.to_string(),
                    format!("net:[{}]", p.netns),
                    p.listeners.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
                    p.connections_open.to_string(),
                    p.connections_total.to_string(),
                ]
            })
            .collect(),
    ) + &problems)
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

/// `sluice certs`: the certificates held (with their issuer chains up to the bundle root they
/// lead to), the identities still waiting for theirs, and the trust bundle's roots. With
/// `-o json`, the list of identities (held and pending) as `GET /certs` has it; the bundle is
/// `sluice certs bundle -o json`.
pub fn certs(ep: &AdminEndpoint, out: Output) -> Result<String> {
    let certs: Vec<CertView> = get(ep, "/certs")?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&certs)? + "\n");
    }
    // An older sluice has no /certs/bundle: show what there is.
    let bundle: Option<TrustBundleView> = get(ep, "/certs/bundle").ok();
    Ok(render_certs(&certs, bundle.as_ref()))
}

pub fn render_certs(certs: &[CertView], bundle: Option<&TrustBundleView>) -> String {
    let (held, pending): (Vec<&CertView>, Vec<&CertView>) = certs.iter().partition(|c| c.state == CertState::Ready);
    let mut o = String::new();
    if held.is_empty() && pending.is_empty() {
        o += "no workload certificates (no enrolled pods on this node)\n";
    }
    if !held.is_empty() {
        o += &table(
            &["IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "NEXT RENEWAL", "FAILURES", "ISSUER CHAIN"],
            held.iter()
                .map(|c| {
                    vec![
                        c.identity.to_string(),
                        c.serial.clone().unwrap_or_default(),
                        c.not_before.clone().unwrap_or_default(),
                        c.not_after.clone().unwrap_or_default(),
                        c.next_renewal.clone().unwrap_or_default(),
                        match &c.last_error {
                            Some(e) => format!("{} ({e})", c.renewal_failures),
                            None => c.renewal_failures.to_string(),
                        },
                        issuer_chain(c),
                    ]
                })
                .collect(),
        );
    }
    if !pending.is_empty() {
        if !held.is_empty() {
            o += "\n";
        }
        o += "pending (no certificate yet: these pods' connections to mesh pods are refused, their \
              inbound traffic is plaintext under their namespace's peer authentication):\n";
        o += &table(
            &["IDENTITY", "ATTEMPTS FAILED", "NEXT ATTEMPT", "LAST ERROR"],
            pending
                .iter()
                .map(|c| {
                    vec![
                        c.identity.to_string(),
                        c.renewal_failures.to_string(),
                        c.next_renewal.clone().unwrap_or_else(|| "in flight".into()),
                        c.last_error.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect(),
        );
    }
    if let Some(b) = bundle {
        o += "\n";
        o += &render_bundle(b);
    }
    o
}

/// "CN=intermediate (serial 1a2b3c4d…) ← CN=root [bundle #1]", from the leaf's issuer up.
fn issuer_chain(c: &CertView) -> String {
    let mut parts: Vec<String> = c
        .chain
        .iter()
        .map(|link| {
            let short: String = link.serial.chars().take(8).collect();
            let subject = if link.subject.is_empty() { "(empty subject)" } else { link.subject.as_str() };
            if link.root {
                let position = c.root_index.map(|i| format!(" [bundle #{}]", i + 1)).unwrap_or_default();
                format!("{subject} ({short}){position}")
            } else {
                format!("{subject} ({short})")
            }
        })
        .collect();
    if c.root_index.is_none() {
        parts.push("NO ROOT OF THE TRUST BUNDLE (re-issuing)".into());
    }
    parts.join(" <- ")
}

/// The trust bundle: where it comes from, its roots in rotation order, and how many of the
/// node's certificates lead to each.
pub fn render_bundle(b: &TrustBundleView) -> String {
    let mut o = format!("trust bundle ({} CA): {}", b.ca.mode, b.ca.trust_bundle_source);
    if let Some(loaded) = &b.ca.trust_bundle_loaded {
        o += &format!(", loaded {loaded}");
    }
    o += "\n";
    if let Some(e) = &b.ca.trust_bundle_error {
        o += &format!("  the file's current content is NOT in force (the last good bundle is): {e}\n");
    }
    o += &table(
        &["#", "ROLE", "SUBJECT", "SERIAL", "NOT AFTER", "SHA-256", "CERTIFICATES"],
        b.roots
            .iter()
            .enumerate()
            .map(|(i, r)| {
                vec![
                    (i + 1).to_string(),
                    if i == 0 { "signing".into() } else { "trusted only".into() },
                    r.subject.clone(),
                    r.serial.clone(),
                    r.not_after.clone(),
                    r.sha256.chars().take(16).collect::<String>() + "…",
                    b.certificates_per_root.get(i).copied().unwrap_or(0).to_string(),
                ]
            })
            .collect(),
    );
    if b.certificates_untrusted > 0 {
        o += &format!(
            "{} certificate(s) lead to no root of the bundle: peers refuse them; they are being re-issued\n",
            b.certificates_untrusted
        );
    }
    if b.roots.len() > 1 {
        let others: usize = b.certificates_per_root.iter().skip(1).sum();
        o += &if others == 0 && b.certificates_untrusted == 0 {
            "every certificate of this node is under the first root: the others can be retired once \
             every node shows the same\n"
                .to_string()
        } else {
            format!("{others} certificate(s) are still under another root than the first (re-issued within ~30 s)\n")
        };
    }
    o
}

/// `sluice certs bundle`: the trust bundle alone.
pub fn cert_bundle(ep: &AdminEndpoint, out: Output) -> Result<String> {
    let bundle: TrustBundleView = get(ep, "/certs/bundle")?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&bundle)? + "\n");
    }
    Ok(render_bundle(&bundle))
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
    fn certs_show_chains_pending_identities_and_the_bundle() {
        use crate::identity::{CaDescription, ChainCertView, RootView, SpiffeId};
        let chain = |subject: &str, serial: &str, root: bool| ChainCertView {
            subject: subject.into(),
            serial: serial.into(),
            not_after: "2030-01-01T00:00:00Z".into(),
            root,
        };
        let held = CertView {
            identity: SpiffeId::new("cluster.local", "shop", "web"),
            state: CertState::Ready,
            serial: Some("0a0b".into()),
            not_before: Some("2025-01-01T00:00:00Z".into()),
            not_after: Some("2025-01-02T00:00:00Z".into()),
            next_renewal: Some("2025-01-01T12:00:00Z".into()),
            renewal_failures: 0,
            last_error: None,
            chain: vec![chain("CN=sluice-ca B", "1122334455", false), chain("CN=root B", "99887766", true)],
            root_index: Some(1),
        };
        let pending = CertView {
            identity: SpiffeId::new("cluster.local", "shop", "api"),
            state: CertState::Pending,
            serial: None,
            not_before: None,
            not_after: None,
            next_renewal: Some("2025-01-01T00:00:05Z".into()),
            renewal_failures: 3,
            last_error: Some("the CA at https://ca:15012 is unreachable: connection refused".into()),
            chain: Vec::new(),
            root_index: None,
        };
        let root = |subject: &str| RootView {
            subject: subject.into(),
            serial: "01".into(),
            not_before: "2025-01-01T00:00:00Z".into(),
            not_after: "2035-01-01T00:00:00Z".into(),
            sha256: "ab".repeat(32),
        };
        let bundle = TrustBundleView {
            ca: CaDescription {
                mode: "remote".into(),
                address: Some("https://ca:15012".into()),
                trust_bundle_source: "/etc/sluice/trust/roots.pem".into(),
                trust_bundle_loaded: Some("2025-01-01T00:00:00Z".into()),
                trust_bundle_error: Some("holds no certificate".into()),
            },
            roots: vec![root("CN=root A"), root("CN=root B")],
            certificates_per_root: vec![0, 1],
            certificates_untrusted: 0,
        };
        let out = render_certs(&[pending, held], Some(&bundle));
        assert!(out.contains("CN=sluice-ca B (11223344) <- CN=root B (99887766) [bundle #2]"), "{out}");
        assert!(out.contains("pending") && out.contains("spiffe://cluster.local/ns/shop/sa/api"), "{out}");
        assert!(out.contains("connection refused"), "{out}");
        assert!(out.contains("NOT in force") && out.contains("holds no certificate"), "{out}");
        assert!(out.contains("signing") && out.contains("trusted only"), "{out}");
        assert!(out.contains("1 certificate(s) are still under another root"), "{out}");
        // The web row comes before the pending section, which has its own header.
        assert!(out.find("sa/web").unwrap() < out.find("ATTEMPTS FAILED").unwrap(), "{out}");
    }

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
    fn privileged_commands_use_the_unix_socket() {
        let run = tempfile::tempdir().unwrap();
        let sock = |node: &str| run.path().join(node).join("admin.sock");
        // --node and a socket path are taken as they are.
        let ep = privileged_endpoint_in(run.path(), None, Some("n1")).unwrap();
        assert!(matches!(&ep, AdminEndpoint::Unix(p) if *p == sock("n1")), "{ep:?}");
        let ep = privileged_endpoint_in(run.path(), Some("/tmp/x.sock"), None).unwrap();
        assert!(matches!(&ep, AdminEndpoint::Unix(p) if p.as_os_str() == "/tmp/x.sock"), "{ep:?}");
        // A URL is refused, saying why and what to use.
        let err =
            privileged_endpoint_in(run.path(), Some("http://127.0.0.1:15000"), None).unwrap_err().to_string();
        assert!(
            err.contains("unix socket only, not on http://127.0.0.1:15000") && err.contains("--node NAME"),
            "{err}"
        );
        // Neither: no socket yet, then the only one, then several.
        let err = privileged_endpoint_in(run.path(), None, None).unwrap_err().to_string();
        assert!(err.contains("no sluice socket under") && err.contains("--node NAME"), "{err}");
        let bind = |node: &str| {
            std::fs::create_dir_all(run.path().join(node)).unwrap();
            std::os::unix::net::UnixListener::bind(sock(node)).unwrap()
        };
        let _n1 = bind("n1");
        std::fs::create_dir_all(run.path().join("stale")).unwrap(); // no socket in it
        let ep = privileged_endpoint_in(run.path(), None, None).unwrap();
        assert!(matches!(&ep, AdminEndpoint::Unix(p) if *p == sock("n1")), "{ep:?}");
        let _n2 = bind("n2");
        let err = privileged_endpoint_in(run.path(), None, None).unwrap_err().to_string();
        assert!(
            err.contains("holds several") && err.contains("n1/admin.sock") && err.contains("n2/admin.sock"),
            "{err}"
        );
    }

    #[test]
    fn humanises() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(1536), "1.5KiB");
        assert_eq!(human_age(61_000), "1m1s");
    }
}

/// `sluice routes [SERVICE]`: each Service port's effective route tables per audience, each
/// rule with the resource (kind/namespace/name) and place in it that produced it, its backends
/// with weights, and their endpoints with the current peak-EWMA latency; the resources
/// shadowed for an audience; VirtualServices' tcp/tls rules.
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
        if v.kind == "Service" {
            s.push_str(&format!("{} port {port}, ClusterIP {}\n", v.service, v.cluster_ip.as_deref().unwrap_or("None")));
        } else {
            s.push_str(&format!("{} {} port {port}\n", v.kind, v.service));
        }
        for d in &v.destination_rules {
            let subsets = if d.subsets.is_empty() { String::new() } else { format!(" (subsets {})", d.subsets.join(", ")) };
            s.push_str(&format!("  DestinationRule {}{subsets} for {}\n", d.rule, d.clients));
        }
        if v.tables.is_empty() && v.kind == "Service" {
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
                if let Some(f) = &e.fault {
                    extra.push(format!("fault {f}"));
                }
                if let Some(r) = &e.retries {
                    extra.push(r.clone());
                }
                let place = e.origin.clone().unwrap_or_else(|| e.rule.to_string());
                let rule = match &e.rule_name {
                    Some(n) => format!("{place} ({n})"),
                    None => place,
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
            for sh in &t.shadowed {
                s.push_str(&format!("    not applied to these clients: {sh} (an earlier resource for this host decides)\n"));
            }
        }
        for t in &v.streams {
            s.push_str(&format!("  tcp/tls rules for {}, first match wins:\n", t.clients));
            let mut rows = Vec::new();
            for r in &t.rules {
                for (i, b) in r.backends.iter().enumerate() {
                    let first = i == 0;
                    rows.push(vec![
                        if first { r.order.to_string() } else { String::new() },
                        if first { r.route.clone() } else { String::new() },
                        if first { r.rule.clone() } else { String::new() },
                        if first { r.matches.clone() } else { String::new() },
                        format!("{} {:.0}%", b.backend, b.share_percent),
                        endpoints(b),
                    ]);
                }
            }
            for line in table(&["#", "ROUTE", "RULE", "MATCH", "BACKEND", "ENDPOINTS"], rows).lines() {
                s.push_str("    ");
                s.push_str(line);
                s.push('\n');
            }
            for sh in &t.shadowed {
                s.push_str(&format!("    not applied to these clients: {sh} (an earlier resource for this host decides)\n"));
            }
        }
    }
    Ok(s)
}

// --- Streaming commands: `sluice tap` and `sluice top`; and `sluice stat` -------------------

/// What the streaming commands wait for: lines of the admin API's stream, its end, and (`top`
/// in a terminal) key presses.
enum Input {
    Line(String),
    /// The stream ended: cleanly (`None`) or with an error.
    Closed(Option<String>),
    Key(u8),
}

/// The longest the tap stream may stay silent (the server sends a heartbeat every 5 s).
const STREAM_IDLE: Duration = Duration::from_secs(30);

/// GETs `path` and reads the response body line by line on a thread of its own, sending each
/// line to `tx` and then [`Input::Closed`]. Fails when the admin API cannot be reached or
/// answers anything but 200.
fn stream_lines(ep: &AdminEndpoint, path: &str, tx: std::sync::mpsc::Sender<Input>) -> Result<()> {
    use std::io::BufRead;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let not_running = |e: std::io::Error| {
        anyhow!(
            "cannot reach sluice's admin API at {} ({e}). Is sluice running on this node? \
             (inside the node's network namespace the default 127.0.0.1:15000 works; elsewhere use --node NAME or --admin PATH)",
            ep.describe()
        )
    };
    let stream: Box<dyn Read + Send> = match ep {
        AdminEndpoint::Tcp(addr) => {
            let mut s = TcpStream::connect(addr).map_err(not_running)?;
            s.set_read_timeout(Some(STREAM_IDLE))?;
            s.write_all(request.as_bytes())?;
            Box::new(s)
        }
        AdminEndpoint::Unix(p) => {
            let mut s = UnixStream::connect(p).map_err(not_running)?;
            s.set_read_timeout(Some(STREAM_IDLE))?;
            s.write_all(request.as_bytes())?;
            Box::new(s)
        }
    };
    let mut r = std::io::BufReader::new(stream);
    let what = || format!("GET {path} from {}", ep.describe());
    let mut status_line = String::new();
    r.read_line(&mut status_line).with_context(what)?;
    let status_line = status_line.trim_end().to_string();
    let code: u16 = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut chunked = false;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).with_context(what)? == 0 {
            bail!("{}: incomplete HTTP response", what());
        }
        let l = l.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
    }
    if code != 200 {
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        let body = if chunked { dechunk(&rest).unwrap_or(rest) } else { rest };
        bail!("admin API answered {status_line}: {}", String::from_utf8_lossy(&body).trim());
    }
    std::thread::Builder::new()
        .name("admin-stream".into())
        .spawn(move || {
            let end = read_body_lines(&mut r, chunked, |line| tx.send(Input::Line(line)).is_ok());
            let _ = tx.send(Input::Closed(end.err().map(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("the admin API sent nothing for {}s", STREAM_IDLE.as_secs())
                }
                _ => e.to_string(),
            })));
        })
        .context("starting the stream reader thread")?;
    Ok(())
}

/// Reads a response body (chunked or not) and hands each complete line to `line` until the
/// body ends or `line` returns false.
fn read_body_lines<R: std::io::BufRead>(r: &mut R, chunked: bool, mut line: impl FnMut(String) -> bool) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    if !chunked {
        loop {
            let mut l = String::new();
            if r.read_line(&mut l)? == 0 {
                return Ok(());
            }
            if !line(l.trim_end_matches(['\r', '\n']).to_string()) {
                return Ok(());
            }
        }
    }
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let mut size_line = String::new();
        if r.read_line(&mut size_line)? == 0 {
            return Err(bad("the chunked body ended early"));
        }
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            if !pending.is_empty() {
                line(String::from_utf8_lossy(&pending).trim_end_matches('\r').to_string());
            }
            return Ok(());
        }
        let start = pending.len();
        pending.resize(start + size, 0);
        r.read_exact(&mut pending[start..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let rest = pending.split_off(pos + 1);
            let l = String::from_utf8_lossy(&pending[..pos]).trim_end_matches('\r').to_string();
            pending = rest;
            if !line(l) {
                return Ok(());
            }
        }
    }
}

fn tap_path(filter: &TapFilter) -> String {
    let q = filter.to_query();
    if q.is_empty() {
        "/tap".into()
    } else {
        format!("/tap?{q}")
    }
}

fn describe_filter(f: &TapFilter) -> String {
    let parts: Vec<String> = [
        ("namespace", &f.namespace),
        ("pod", &f.pod),
        ("to", &f.to),
        ("path", &f.path),
        ("method", &f.method),
        ("reporter", &f.reporter),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
    .collect();
    if parts.is_empty() {
        "every request".into()
    } else {
        parts.join(" ")
    }
}

/// `12.3ms`, `0.45ms`, `1.20s`.
fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0}ms")
    } else if ms >= 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.2}ms")
    }
}

fn fmt_opt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".into(), fmt_ms)
}

fn fmt_rate(r: f64) -> String {
    format!("{:.2}%", r * 100.0)
}

/// One tap line for people: time, side, source → destination, request, answer.
fn format_tap_event(ev: &TapEvent) -> String {
    let time = ev.time.split_once('T').map_or(ev.time.as_str(), |(_, t)| t.trim_end_matches('Z'));
    let dir = if ev.reporter == "source" { "out" } else { "in " };
    let svc = ev.service.as_ref().map(|s| format!(" svc={s}")).unwrap_or_default();
    let grpc = ev.grpc_status.map(|g| format!(" grpc-status={g}")).unwrap_or_default();
    let flags = if ev.response_flags == "-" { String::new() } else { format!(" flags={}", ev.response_flags) };
    format!(
        "{time} {dir} {} -> {}{svc} {} {}{} {}{grpc} {} {} {}{flags}",
        ev.source.name,
        ev.destination.name,
        ev.method,
        ev.authority,
        ev.path,
        if ev.status == 0 { "reset".to_string() } else { ev.status.to_string() },
        fmt_ms(ev.latency_ms),
        ev.protocol,
        if ev.mtls { "mtls" } else { "plaintext" },
    )
}

/// Writes to stdout; `false` once stdout is gone (a closed pipe ends the command quietly).
fn emit(s: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes()).and_then(|_| out.flush()).is_ok()
}

/// How `sluice tap` runs.
#[derive(Debug, Clone, Default)]
pub struct TapOptions {
    pub filter: TapFilter,
    /// Stop after this many requests.
    pub max: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// `sluice tap`: prints requests as they complete until Ctrl-C, `--max` or `--duration`.
/// JSON output passes the admin API's lines through (`subscribed`, `request`, `dropped`).
pub fn tap(ep: &AdminEndpoint, opts: &TapOptions, out: Output) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    stream_lines(ep, &tap_path(&opts.filter), tx)?;
    let deadline = opts.duration.map(|d| std::time::Instant::now() + d);
    let mut seen = 0u64;
    while opts.max.is_none_or(|m| seen < m) {
        let msg = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(std::time::Instant::now())) {
                Ok(m) => m,
                Err(_) => break,
            },
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
        };
        let line = match msg {
            Input::Line(l) => l,
            Input::Closed(None) => bail!("sluice ended the tap stream"),
            Input::Closed(Some(e)) => bail!("tap stream from {}: {e}", ep.describe()),
            Input::Key(_) => continue,
        };
        let Ok(msg) = serde_json::from_str::<TapMessage>(&line) else { continue };
        let printed = match (&msg, out) {
            (TapMessage::Heartbeat, _) => true,
            (TapMessage::Request(_), Output::Json) => {
                seen += 1;
                emit(&format!("{line}\n"))
            }
            (_, Output::Json) => emit(&format!("{line}\n")),
            (TapMessage::Request(ev), Output::Table) => {
                seen += 1;
                emit(&(format_tap_event(ev) + "\n"))
            }
            (TapMessage::Subscribed { filter }, Output::Table) => {
                eprintln!("tapping {} on {} (Ctrl-C to stop)", describe_filter(filter), ep.describe());
                true
            }
            (TapMessage::Dropped { dropped }, Output::Table) => {
                eprintln!("({dropped} requests not shown so far: this tap could not keep up)");
                true
            }
        };
        if !printed {
            break;
        }
    }
    Ok(())
}

/// Requests per second in `sluice top` are over this many recent seconds.
const TOP_RPS_WINDOW: u64 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct TopKey {
    source: String,
    destination: String,
    method: String,
    path: String,
}

#[derive(Default)]
struct TopSide {
    count: u64,
    successes: u64,
    hist: crate::telemetry::stats::LatencyHistogram,
    /// (second since start, requests) for the recent seconds.
    recent: std::collections::VecDeque<(u64, u64)>,
}

/// `sluice top`'s aggregation of the tap stream: rows keyed by (source, destination, method,
/// path without the query). Each request may be reported twice (by the client's side and by
/// the server's, when both are on this node): a row counts each side apart and shows the side
/// that saw more (the client's on a tie), so a request is counted once whichever sides this
/// node sees.
struct TopTable {
    started: std::time::Instant,
    rows: std::collections::HashMap<TopKey, [TopSide; 2]>,
    events: u64,
}

/// One row of `sluice top`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopRowView {
    pub source: String,
    pub destination: String,
    pub method: String,
    pub path: String,
    pub count: u64,
    pub rps: f64,
    pub success_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The side the numbers are from: "source" or "destination".
    pub reporter: String,
}

/// What `sluice top -o json` prints every refresh.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopSnapshot {
    pub time: String,
    /// Tap events seen since start (both sides).
    pub events: u64,
    pub rows: Vec<TopRowView>,
}

impl TopTable {
    fn new() -> TopTable {
        TopTable { started: std::time::Instant::now(), rows: Default::default(), events: 0 }
    }

    fn add(&mut self, ev: &TapEvent) {
        self.events += 1;
        let sec = self.started.elapsed().as_secs();
        let key = TopKey {
            source: ev.source.name.clone(),
            destination: ev.destination.name.clone(),
            method: ev.method.clone(),
            path: ev.path.split_once('?').map_or(ev.path.as_str(), |(p, _)| p).to_string(),
        };
        let side = &mut self.rows.entry(key).or_default()[usize::from(ev.reporter != "source")];
        side.count += 1;
        side.successes += u64::from(ev.success());
        side.hist.record_us((ev.latency_ms * 1000.0).round() as u64);
        match side.recent.back_mut() {
            Some((s, n)) if *s == sec => *n += 1,
            _ => side.recent.push_back((sec, 1)),
        }
        while side.recent.front().is_some_and(|(s, _)| s + TOP_RPS_WINDOW <= sec) {
            side.recent.pop_front();
        }
    }

    fn snapshot(&self) -> TopSnapshot {
        let elapsed = self.started.elapsed();
        let sec = elapsed.as_secs();
        let covered =
            ((TOP_RPS_WINDOW - 1) as f64 + elapsed.subsec_nanos() as f64 / 1e9).min(elapsed.as_secs_f64()).max(0.001);
        let mut rows: Vec<TopRowView> = self
            .rows
            .iter()
            .map(|(k, sides)| {
                let i = if sides[1].count > sides[0].count { 1 } else { 0 };
                let s = &sides[i];
                let recent: u64 =
                    s.recent.iter().filter(|(at, _)| at + TOP_RPS_WINDOW > sec).map(|(_, n)| n).sum();
                TopRowView {
                    source: k.source.clone(),
                    destination: k.destination.clone(),
                    method: k.method.clone(),
                    path: k.path.clone(),
                    count: s.count,
                    rps: recent as f64 / covered,
                    success_rate: if s.count == 0 { 0.0 } else { s.successes as f64 / s.count as f64 },
                    p50_ms: s.hist.quantile_ms(0.5),
                    p99_ms: s.hist.quantile_ms(0.99),
                    reporter: if i == 0 { "source" } else { "destination" }.into(),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.count.cmp(&a.count).then_with(|| (&a.source, &a.destination, &a.path).cmp(&(&b.source, &b.destination, &b.path)))
        });
        TopSnapshot {
            time: crate::telemetry::tap::rfc3339_millis(std::time::SystemTime::now()),
            events: self.events,
            rows,
        }
    }
}

fn top_table(snap: &TopSnapshot, max_rows: usize) -> String {
    table(
        &["SOURCE", "DESTINATION", "METHOD", "PATH", "COUNT", "RPS", "SUCCESS", "P50", "P99"],
        snap.rows
            .iter()
            .take(max_rows)
            .map(|r| {
                vec![
                    r.source.clone(),
                    r.destination.clone(),
                    r.method.clone(),
                    r.path.clone(),
                    r.count.to_string(),
                    format!("{:.1}", r.rps),
                    fmt_rate(r.success_rate),
                    fmt_opt_ms(r.p50_ms),
                    fmt_opt_ms(r.p99_ms),
                ]
            })
            .collect(),
    )
}

/// How `sluice top` runs.
#[derive(Debug, Clone)]
pub struct TopOptions {
    pub filter: TapFilter,
    /// Time between refreshes.
    pub interval: Duration,
    /// Print the table once after this long and exit.
    pub once: Option<Duration>,
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// The terminal while `sluice top` draws in it: the alternate screen, no cursor, and (when
/// stdin is a terminal) keys read one by one without echo. Restored on drop.
struct Screen {
    saved: Option<libc::termios>,
}

impl Screen {
    fn enter() -> Screen {
        use std::os::fd::AsRawFd;
        let fd = std::io::stdin().as_raw_fd();
        let mut saved = None;
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            // SAFETY: tcgetattr/tcsetattr on stdin's fd with a termios we own.
            unsafe {
                let mut t: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(fd, &mut t) == 0 {
                    saved = Some(t);
                    t.c_lflag &= !(libc::ICANON | libc::ECHO);
                    t.c_cc[libc::VMIN] = 1;
                    t.c_cc[libc::VTIME] = 0;
                    libc::tcsetattr(fd, libc::TCSANOW, &t);
                }
            }
        }
        emit("\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J");
        Screen { saved }
    }

    /// (rows, columns) of the terminal.
    fn size() -> (usize, usize) {
        use std::os::fd::AsRawFd;
        // SAFETY: TIOCGWINSZ fills a winsize we own.
        unsafe {
            let mut ws: libc::winsize = std::mem::zeroed();
            if libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_row > 0 {
                return (usize::from(ws.ws_row), usize::from(ws.ws_col.max(20)));
            }
        }
        (24, 80)
    }

    fn draw(&self, lines: &[String]) {
        let (rows, cols) = Screen::size();
        // Home, each row cut to the width and cleared to its end, then the rest cleared; no
        // newline after the last row (it would scroll a full screen).
        let cut: Vec<String> = lines.iter().take(rows).map(|l| l.chars().take(cols).collect()).collect();
        emit(&format!("\x1b[H{}\x1b[K\x1b[J", cut.join("\x1b[K\n")));
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        emit("\x1b[?25h\x1b[?1049l");
        if let Some(t) = &self.saved {
            use std::os::fd::AsRawFd;
            // SAFETY: restores the settings read in `enter`.
            unsafe {
                libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, t);
            }
        }
    }
}

/// `sluice top`: subscribes to the tap stream and shows the busiest (source, destination,
/// method, path) rows, refreshed every `interval`: redrawn in place on a terminal (until q or
/// Ctrl-C), printed as plain tables (or JSON lines) otherwise; with `once`, printed once after
/// that long.
pub fn top(ep: &AdminEndpoint, opts: &TopOptions, out: Output) -> Result<()> {
    use std::time::Instant;
    let interactive = opts.once.is_none() && out == Output::Table && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (tx, rx) = std::sync::mpsc::channel();
    stream_lines(ep, &tap_path(&opts.filter), tx.clone())?;
    let mut table_state = TopTable::new();
    let started = Instant::now();
    let deadline = opts.once.map(|d| started + d);
    let interval = opts.interval.max(Duration::from_millis(100));
    let mut next = started + if interactive { Duration::ZERO } else { interval };
    let screen = if interactive {
        for sig in [nix::sys::signal::Signal::SIGINT, nix::sys::signal::Signal::SIGTERM] {
            let action = nix::sys::signal::SigAction::new(
                nix::sys::signal::SigHandler::Handler(on_interrupt),
                nix::sys::signal::SaFlags::empty(),
                nix::sys::signal::SigSet::empty(),
            );
            // SAFETY: the handler only stores to an atomic.
            unsafe { nix::sys::signal::sigaction(sig, &action) }.context("installing the Ctrl-C handler")?;
        }
        let screen = Screen::enter();
        if screen.saved.is_some() {
            std::thread::Builder::new()
                .name("keys".into())
                .spawn(move || {
                    let mut b = [0u8; 1];
                    while let Ok(1) = std::io::stdin().read(&mut b) {
                        if tx.send(Input::Key(b[0])).is_err() {
                            break;
                        }
                    }
                })
                .context("starting the key reader thread")?;
        }
        Some(screen)
    } else {
        drop(tx);
        None
    };
    let filter_text = describe_filter(&opts.filter);
    loop {
        let now = Instant::now();
        if let Some(screen) = &screen {
            if now >= next {
                let snap = table_state.snapshot();
                let (rows, _) = Screen::size();
                let mut lines = vec![
                    format!(
                        "sluice top  {}  {}  {} requests seen  (q or Ctrl-C to quit)",
                        ep.describe(),
                        filter_text,
                        snap.events
                    ),
                    String::new(),
                ];
                if snap.rows.is_empty() {
                    lines.extend(top_table(&snap, 0).lines().map(str::to_string));
                    lines.push("(waiting for requests)".into());
                } else {
                    lines.extend(top_table(&snap, rows.saturating_sub(3)).lines().map(str::to_string));
                }
                screen.draw(&lines);
                next = now + interval;
            }
        } else if deadline.is_none() && now >= next {
            if !print_top(&table_state.snapshot(), out) {
                return Ok(());
            }
            next = now + interval;
        }
        if let Some(d) = deadline {
            if now >= d {
                print_top(&table_state.snapshot(), out);
                return Ok(());
            }
        }
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let until = deadline.map_or(next, |d| d.min(next));
        let wait = until.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
        match rx.recv_timeout(wait) {
            Ok(Input::Line(l)) => {
                if let Ok(TapMessage::Request(ev)) = serde_json::from_str::<TapMessage>(&l) {
                    table_state.add(&ev);
                }
            }
            Ok(Input::Key(b'q' | b'Q')) => return Ok(()),
            Ok(Input::Key(_)) => {}
            Ok(Input::Closed(e)) => {
                drop(screen);
                match e {
                    None => bail!("sluice ended the tap stream"),
                    Some(e) => bail!("tap stream from {}: {e}", ep.describe()),
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("the tap stream reader stopped"),
        }
    }
}

/// One refresh of `sluice top` when not drawing in a terminal; `false` once stdout is gone.
fn print_top(snap: &TopSnapshot, out: Output) -> bool {
    match out {
        Output::Json => emit(&(serde_json::to_string(snap).unwrap_or_default() + "\n")),
        Output::Table => {
            let body = if snap.rows.is_empty() { "no requests seen\n".to_string() } else { top_table(snap, usize::MAX) };
            emit(&format!("# {} ({} requests seen)\n{body}\n", snap.time, snap.events))
        }
    }
}

/// `sluice stat pods|services [NAME] --window W`: requests, success rate, rate and latency
/// percentiles per pod or Service, outbound and inbound, over the window.
pub fn stat(ep: &AdminEndpoint, kind: StatKind, window: &str, name: Option<&str>, out: Output) -> Result<String> {
    let w = crate::telemetry::stats::parse_window(window).map_err(|e| anyhow!(e))?;
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("kind", kind.as_str());
    q.append_pair("window", &format!("{}s", w.as_secs()));
    if let Some(n) = name {
        q.append_pair("name", n);
    }
    let view: StatView = get(ep, &format!("/stat?{}", q.finish()))?;
    if out == Output::Json {
        return Ok(serde_json::to_string_pretty(&view)? + "\n");
    }
    if view.rows.is_empty() {
        return Ok(format!("no requests in the last {}s{}\n", view.window_s, name.map(|n| format!(" for {n}")).unwrap_or_default()));
    }
    let mut rows = Vec::new();
    for r in &view.rows {
        for (dir, s) in [("outbound", &r.outbound), ("inbound", &r.inbound)] {
            if let Some(s) = s {
                rows.push(vec![
                    r.name.clone(),
                    dir.to_string(),
                    s.requests.to_string(),
                    fmt_rate(s.success_rate),
                    format!("{:.2}", s.rps),
                    fmt_opt_ms(s.latency_ms.p50),
                    fmt_opt_ms(s.latency_ms.p95),
                    fmt_opt_ms(s.latency_ms.p99),
                ]);
            }
        }
    }
    let first = match view.kind {
        StatKind::Pods => "POD",
        StatKind::Services => "SERVICE",
    };
    Ok(format!(
        "last {}s:\n{}",
        view.window_s,
        table(&[first, "DIRECTION", "REQUESTS", "SUCCESS", "RPS", "P50", "P95", "P99"], rows)
    ))
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    #[test]
    fn chunked_lines_are_reassembled() {
        let body = b"5\r\n{\"a\":\r\n4\r\n1}\n{\r\n6\r\n}\n\n{}\n\r\n0\r\n\r\n";
        let mut lines = Vec::new();
        read_body_lines(&mut &body[..], true, |l| {
            lines.push(l);
            true
        })
        .unwrap();
        assert_eq!(lines, vec!["{\"a\":1}", "{}", "", "{}"]);
        let mut r = &b"3\r\nab"[..];
        assert!(read_body_lines(&mut r, true, |_| true).is_err());
    }

    #[test]
    fn top_counts_each_request_once() {
        let ev = |reporter: &str, path: &str, status: u16, ms: f64| TapEvent {
            time: "2024-01-01T00:00:00.000Z".into(),
            reporter: reporter.into(),
            source: crate::admin::api::TapPeer { name: "shop/client".into(), ..Default::default() },
            destination: crate::admin::api::TapPeer { name: "shop/web-0".into(), ..Default::default() },
            service: Some("shop/web".into()),
            method: "GET".into(),
            authority: "web".into(),
            path: path.into(),
            status,
            grpc_status: None,
            latency_ms: ms,
            protocol: "http".into(),
            mtls: true,
            response_flags: "-".into(),
            upstream: None,
            request_bytes: 0,
            response_bytes: 0,
            trace_id: None,
        };
        let mut t = TopTable::new();
        for i in 0..10 {
            let status = if i < 2 { 503 } else { 200 };
            t.add(&ev("source", &format!("/a?i={i}"), status, 10.0));
            t.add(&ev("destination", &format!("/a?i={i}"), status, 8.0));
        }
        t.add(&ev("destination", "/b", 200, 1.0));
        let snap = t.snapshot();
        assert_eq!(snap.events, 21);
        assert_eq!(snap.rows.len(), 2);
        let a = &snap.rows[0];
        assert_eq!((a.path.as_str(), a.count, a.reporter.as_str()), ("/a", 10, "source"));
        assert!((a.success_rate - 0.8).abs() < 1e-9);
        assert!((a.p50_ms.unwrap() - 10.0).abs() < 0.5);
        assert!(a.rps > 0.0);
        assert_eq!((snap.rows[1].path.as_str(), snap.rows[1].count), ("/b", 1));
        let text = top_table(&snap, 10);
        assert!(text.starts_with("SOURCE"), "{text}");
        assert!(text.contains("shop/client  shop/web-0   GET     /a"), "{text}");
    }
}
