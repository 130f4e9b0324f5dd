//! Opaque TCP idle timeout and TCP keepalive: a connection nobody uses, or whose peer vanished,
//! must not hold its descriptors (and its admission slot) forever.
//!
//! - **Keepalive** on every socket sluice proxies with (set on the listeners, from which
//!   accepted sockets inherit it, and on every socket sluice creates): a peer that disappeared
//!   without a FIN or RST (a node that died, a black-holed path) is found within about
//!   [`KEEPALIVE_IDLE`] + [`KEEPALIVE_PROBES`] × [`KEEPALIVE_INTERVAL`] of silence.
//! - **Idle timeout** for byte-forwarded connections (opaque TCP and tunnel streams): no byte in
//!   either direction for the timeout closes both sides (Envoy's `idle_timeout`, 1 h by
//!   default). HTTP connections have their own timeouts (the L7 server's).

use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use socket2::{SockRef, TcpKeepalive};

pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub const KEEPALIVE_PROBES: u32 = 4;

/// Turns TCP keepalive on with sluice's timings.
pub fn set_keepalive(sock: SockRef<'_>) -> std::io::Result<()> {
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    sock.set_tcp_keepalive(&ka)
}

/// The idle timeout of byte-forwarded connections, and how many it closed.
#[derive(Debug, Default)]
pub struct IdleTimeout {
    pub timeout: Option<Duration>,
    pub closed: AtomicU64,
}

impl IdleTimeout {
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout, closed: AtomicU64::new(0) }
    }

    /// Runs `forward` (which moves bytes and counts them in `a` and `b`) to its end, or until
    /// neither count moved for the timeout; then `forward` is dropped, which closes its sockets.
    /// Returns `None` when it was cut for idleness.
    pub async fn run<F: Future>(&self, forward: F, a: &AtomicU64, b: &AtomicU64) -> Option<F::Output> {
        let Some(timeout) = self.timeout else {
            return Some(forward.await);
        };
        // Checked eight times per timeout: a connection is closed after between 1 and 1⅛
        // timeouts of silence, at the cost of one timer wake-up per connection per check.
        let check = (timeout / 8).max(Duration::from_millis(10));
        let watch = async {
            let mut last = (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed));
            let mut quiet = Duration::ZERO;
            loop {
                tokio::time::sleep(check).await;
                let now = (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed));
                if now == last {
                    quiet += check;
                    if quiet >= timeout {
                        return;
                    }
                } else {
                    last = now;
                    quiet = Duration::ZERO;
                }
            }
        };
        tokio::select! {
            out = forward => Some(out),
            _ = watch => {
                self.closed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_cut_after_the_timeout() {
        let idle = IdleTimeout::new(Some(Duration::from_secs(80)));
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        let started = tokio::time::Instant::now();
        let out = idle.run(std::future::pending::<()>(), &a, &b).await;
        assert!(out.is_none());
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(80) && took <= Duration::from_secs(90), "{took:?}");
        assert_eq!(idle.closed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_a_connection_open() {
        let idle = IdleTimeout::new(Some(Duration::from_secs(80)));
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        // Bytes every 50 s for 5 minutes, then done: never 80 s of silence.
        let forward = async {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                b.fetch_add(1, Ordering::Relaxed);
            }
            "done"
        };
        assert_eq!(idle.run(forward, &a, &b).await, Some("done"));
        assert_eq!(idle.closed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeout_means_never() {
        let idle = IdleTimeout::new(None);
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        let forward = async {
            tokio::time::sleep(Duration::from_secs(100_000)).await;
            1
        };
        assert_eq!(idle.run(forward, &a, &b).await, Some(1));
    }

    #[test]
    fn keepalive_is_set_with_sluices_timings() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        set_keepalive(SockRef::from(&s)).unwrap();
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(s.keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(s.keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }
}
