//! Readiness for the kubelet: `GET /healthz/ready` on `--readiness-addr` (`0.0.0.0:15021`,
//! Istio's readiness port) in the node's network namespace answers 200 while sluice is ready and
//! 503 otherwise (starting: before the first model is enforced and the node's pods enrolled).
//! It runs on the admin runtime thread, next to the admin API, away from the data path.
//!
//! Upgrades: the new process starts while the old one still runs on the node, and both bind
//! the port with `SO_REUSEPORT`, so the kernel spreads probes over both. Kubernetes probes the
//! *new* pod through that shared port and stops the old pod only once the new one is ready, so
//! the old process leaves the port to the new one: it closes its listener as soon as a newer
//! process has taken over the node (the owner entry of the node's pinned maps names another
//! process), and in any case when it starts draining. From then on every probe reaches the
//! newest process, which answers 503 until it is ready. (A probe that arrives before the new
//! process has loaded its programs can still be answered by the old one.)

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info, warn};

use super::listener_limits::{self, Gate};

/// The readiness path, as the DaemonSet's readinessProbe asks for it.
pub const READY_PATH: &str = "/healthz/ready";

/// How often the listener checks whether a newer sluice process took over the node.
const SUCCESSOR_CHECK_EVERY: Duration = Duration::from_millis(250);

/// What the readiness server asks: is sluice ready, and has a newer process taken over?
#[derive(Clone)]
pub struct Probe {
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    pub superseded: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// Closes the readiness listener (the daemon calls it when draining starts).
pub struct Readiness {
    close: watch::Sender<Option<&'static str>>,
}

impl Readiness {
    /// Closes the listener now, so that probes reach a successor (or are refused). Idempotent.
    pub fn close(&self, why: &'static str) {
        self.close.send_if_modified(|w| {
            if w.is_none() {
                *w = Some(why);
                true
            } else {
                false
            }
        });
    }
}

/// The handle for the daemon and the receiver for [`serve`].
pub fn channel() -> (Readiness, watch::Receiver<Option<&'static str>>) {
    let (close, closed) = watch::channel(None);
    (Readiness { close }, closed)
}

/// Binds `addr` with `SO_REUSEPORT` (so that an upgraded sluice can bind it while this one
/// still runs, and the reverse).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating the readiness socket")?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    socket.listen(128).with_context(|| format!("listening on {addr}"))?;
    Ok(socket.into())
}

/// Serves readiness on `listener` until [`Readiness::close`] is called, the handle is dropped,
/// or a newer sluice process takes over the node; then closes the listener.
pub async fn serve(
    listener: std::net::TcpListener,
    probe: Probe,
    mut closed: watch::Receiver<Option<&'static str>>,
) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "readiness endpoint not served");
            return;
        }
    };
    // Any pod can reach this port: bounded connections, per source too, with deadlines.
    let gate = Gate::new(listener_limits::READINESS, &listener_limits::COUNTERS.readiness);
    let mut check = tokio::time::interval(SUCCESSOR_CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let why = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => spawn_conn(stream, peer, &gate, probe.clone()),
                Err(e) => {
                    warn!(error = %e, "readiness accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            changed = closed.changed() => match changed {
                Ok(()) => match *closed.borrow() {
                    Some(why) => break why,
                    None => continue,
                },
                Err(_) => break "stopping",
            },
            _ = check.tick() => {
                if (probe.superseded)() {
                    break "a newer sluice process took over the node";
                }
            }
        }
    };
    // Answer the probes already queued on this listener rather than resetting them.
    while let Some(Ok((stream, peer))) = listener.accept().now_or_never() {
        spawn_conn(stream, peer, &gate, probe.clone());
    }
    drop(listener);
    info!(%addr, reason = why, "readiness listener closed; probes now reach the newest sluice of the node, if any");
}

fn spawn_conn(stream: tokio::net::TcpStream, peer: SocketAddr, gate: &Arc<Gate>, probe: Probe) {
    let Some(ticket) = gate.admit(peer) else {
        debug!(%peer, "readiness connection refused: too many open");
        listener_limits::reset(stream);
        return;
    };
    let gate = gate.clone();
    tokio::spawn(async move {
        let svc = service_fn(move |req: Request<Incoming>| {
            let ready = (probe.ready)();
            async move { Ok::<_, Infallible>(answer(req.method(), req.uri().path(), ready)) }
        });
        let builder: http1::Builder = gate.http1();
        gate.serve(ticket, stream, |io| async move {
            let r = builder.serve_connection(TokioIo::new(io), svc).await;
            if let Err(e) = &r {
                debug!(error = %e, "readiness connection ended with an error");
            }
            r
        })
        .await;
    });
}

/// The response to one request; the header `x-sluice-pid` says which process answered.
fn answer(method: &Method, path: &str, ready: bool) -> Response<Full<Bytes>> {
    let (status, body) = match (method, path) {
        (&Method::GET | &Method::HEAD, READY_PATH) if ready => (StatusCode::OK, "ready\n".to_string()),
        (&Method::GET | &Method::HEAD, READY_PATH) => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
        }
        (_, READY_PATH) => (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_string()),
        (_, other) => (StatusCode::NOT_FOUND, format!("no such endpoint {other}; try {READY_PATH}\n")),
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("x-sluice-pid", std::process::id().to_string())
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_by_readiness() {
        assert_eq!(answer(&Method::GET, READY_PATH, true).status(), StatusCode::OK);
        assert_eq!(answer(&Method::GET, READY_PATH, false).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer(&Method::POST, READY_PATH, true).status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer(&Method::GET, "/other", true).status(), StatusCode::NOT_FOUND);
        let pid =
            answer(&Method::GET, READY_PATH, true).headers()["x-sluice-pid"].to_str().unwrap().to_string();
        assert_eq!(pid, std::process::id().to_string());
    }

    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {READY_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn follows_readiness_shares_the_port_and_closes() {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let superseded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = {
            let (r, s) = (ready.clone(), superseded.clone());
            Probe {
                ready: Arc::new(move || r.load(std::sync::atomic::Ordering::SeqCst)),
                superseded: Arc::new(move || s.load(std::sync::atomic::Ordering::SeqCst)),
            }
        };
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        // A second process (here: a second socket) can bind the same port meanwhile.
        let second = bind(addr).expect("SO_REUSEPORT lets a successor bind the port");
        drop(second);
        let (handle, closed) = channel();
        let server = tokio::spawn(serve(first, probe, closed));
        assert!(get(addr).await.unwrap().starts_with("HTTP/1.1 503"));
        ready.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(get(addr).await.unwrap().starts_with("HTTP/1.1 200"));
        handle.close("draining");
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("closes").unwrap();
        assert!(get(addr).await.is_err(), "the listener must be closed");

        // A newer process taking over the node closes it too.
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (_handle, closed) = channel();
        let probe = Probe { ready: Arc::new(|| true), superseded: Arc::new(|| true) };
        tokio::time::timeout(Duration::from_secs(5), serve(l, probe, closed))
            .await
            .expect("closes when superseded");
    }
}
