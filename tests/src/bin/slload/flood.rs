//! `echo-serve` and `flood`: many idle TCP connections, as one misbehaving pod would open them.
//!
//! - `echo-serve`: accepts every connection (no limit of its own, one task each) and echoes
//!   what it reads; an idle connection costs it one socket and no thread.
//! - `flood`: attempts `--count` connections (at most `--concurrency` being set up at once),
//!   each proven end to end by a one-byte round trip (a connection the proxy accepted and then
//!   reset fails here), keeps the ones that work idle, and reports how many it holds; then holds
//!   them until stdin closes. It never stops early: every attempt is made. With `--upgrade HOST`
//!   each connection is proven by a WebSocket upgrade instead (a `101` to an HTTP/1.1 Upgrade
//!   request), and held as an upgraded connection.

use std::{net::SocketAddr, time::Duration};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::emit;

pub fn echo_serve(bind: &str, port: u16) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((bind, port)).await?;
        emit(json!({"event": "listening", "port": port}));
        loop {
            let (mut s, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    // Out of descriptors: wait for some to close rather than spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    })
}

pub fn flood(
    to: SocketAddr,
    count: usize,
    concurrency: usize,
    timeout: Duration,
    upgrade: Option<String>,
) -> std::io::Result<()> {
    let upgrade = upgrade.map(std::sync::Arc::<str>::from);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let started = std::time::Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..count {
            let permit = sem.clone().acquire_owned().await.expect("semaphore open");
            let upgrade = upgrade.clone();
            tasks.spawn(async move {
                let r = tokio::time::timeout(timeout, async {
                    let mut s = tokio::net::TcpStream::connect(to).await?;
                    if let Some(host) = upgrade {
                        switch_to_websocket(&mut s, &host).await?;
                        return Ok(s);
                    }
                    s.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    match s.read(&mut b).await? {
                        1 => Ok(s),
                        _ => Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "closed without an echo",
                        )),
                    }
                })
                .await
                .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")));
                drop(permit);
                r
            });
        }
        let (mut held, mut failed, mut first_error) = (Vec::new(), 0usize, None);
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        while let Some(r) = tasks.join_next().await {
            match r.expect("flood task") {
                Ok(s) => held.push(s),
                Err(e) => {
                    failed += 1;
                    *kinds.entry(format!("{:?}", e.kind())).or_default() += 1;
                    first_error.get_or_insert_with(|| format!("{:?}: {e}", e.kind()));
                }
            }
        }
        emit(json!({
            "event": "held",
            "attempted": count,
            "held": held.len(),
            "failed": failed,
            "errors": kinds,
            "first_error": first_error,
            "elapsed_ms": started.elapsed().as_millis() as u64,
        }));
        // Hold until told to let go (stdin closes).
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        drop(held);
        emit(json!({"event": "released"}));
        Ok(())
    })
}

/// Sends a WebSocket Upgrade request and reads the response head; a `101` is success.
async fn switch_to_websocket(s: &mut tokio::net::TcpStream, host: &str) -> std::io::Result<()> {
    let req = format!(
        "GET /flood HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::with_capacity(512);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || s.read(&mut b).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a response head"));
        }
        head.push(b[0]);
    }
    if head.starts_with(b"HTTP/1.1 101") {
        Ok(())
    } else {
        let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
        Err(std::io::Error::other(format!("not switched: {line}")))
    }
}
