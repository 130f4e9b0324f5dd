//! A server-first protocol (like SMTP, MySQL or SSH): the server speaks before the client does,
//! so a proxy that waits for client bytes (to sniff a protocol) before connecting upstream
//! would stall it.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{addr_str, connect, emit, err_str, fail, serve};

#[derive(clap::Args)]
pub struct ServerArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "0.0.0.0")]
    bind: String,
    /// The first line, sent as soon as a connection is accepted (CRLF appended).
    #[arg(long)]
    banner: String,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long, value_parser = crate::parse_sock_addr)]
    to: SocketAddr,
    /// Connect timeout, and the longest to wait for the banner and for the echo.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

pub fn server(a: ServerArgs) -> bool {
    let banner = a.banner;
    serve(&a.bind, a.port, move |s| banner_conn(s, &banner))
}

fn banner_conn(s: TcpStream, banner: &str) {
    let peer = addr_str(s.peer_addr());
    emit(json!({"event": "accepted", "peer": peer, "local": addr_str(s.local_addr())}));
    let res = (|| -> io::Result<u64> {
        let mut w = &s;
        w.write_all(format!("{banner}\r\n").as_bytes())?;
        let mut r = BufReader::new(&s);
        let mut lines = 0;
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                return Ok(lines);
            }
            w.write_all(&line)?;
            lines += 1;
        }
    })();
    let _ = s.shutdown(Shutdown::Write);
    let (lines, error) = match res {
        Ok(n) => (n, None),
        Err(e) => (0, Some(err_str(&e))),
    };
    emit(json!({"event": "closed", "peer": peer, "lines": lines, "error": error}));
}

fn read_crlf_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 || !line.ends_with(b"\n") {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a full line"));
    }
    Ok(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string())
}

pub fn client(a: ClientArgs) -> bool {
    let timeout = Duration::from_millis(a.timeout_ms);
    let to = a.to.to_string();
    let s = match connect(a.to, timeout) {
        Ok(s) => s,
        Err(e) => return fail(json!({"to": to}), "connect", &e),
    };
    let connected = Instant::now();
    let (local, peer) = (addr_str(s.local_addr()), addr_str(s.peer_addr()));
    let mut r = BufReader::new(&s);
    let base = json!({"to": to, "local": local, "peer": peer});
    // Nothing is sent before the banner arrives.
    let banner = match read_crlf_line(&mut r) {
        Ok(b) => b,
        Err(e) => return fail(base, "banner", &e),
    };
    let banner_ms = connected.elapsed().as_secs_f64() * 1000.0;
    if let Err(e) = (&s).write_all(b"QUIT\r\n") {
        return fail(base, "write", &e);
    }
    let echo = match read_crlf_line(&mut r) {
        Ok(l) => l,
        Err(e) => return fail(base, "echo", &e),
    };
    let _ = s.shutdown(Shutdown::Write);
    let ok = echo == "QUIT";
    emit(json!({
        "ok": ok,
        "to": to,
        "local": local,
        "peer": peer,
        "banner": banner,
        "banner_ms": (banner_ms * 1000.0).round() / 1000.0,
        "echo": echo,
    }));
    ok
}
