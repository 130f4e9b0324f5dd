//! Per-node issuance rate: a token bucket per calling node, so that one node restarting with
//! hundreds of pods (or a compromised node asking in a loop) cannot starve the others. The same
//! bounded table of buckets, keyed by source address, limits the TokenReviews a source can
//! cause before anyone knows which node it is (`authn`).
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second; every authenticated
//! request of the node takes one, refused or not (what it costs the CA is the TokenReview and
//! the checks, whatever the outcome). Over it, the caller is told how long until the next token
//! (`retry-after-ms`).
//!
//! The table is bounded: nodes come and go, and a bucket that has refilled completely is the
//! same as no bucket, so such buckets are dropped whenever the table is full. If every bucket
//! is still refilling (more nodes than the bound asking at once), the one untouched longest is
//! dropped, which at worst gives that node a full bucket early; that is counted.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Nodes tracked at once. Far above any cluster's node count (Kubernetes supports 5 000).
pub const DEFAULT_MAX_NODES: usize = 16 * 1024;
/// The slowest `--node-rate` accepted (one certificate per 100 s): below it a wait would be
/// longer than anything a node waits for anyway.
pub const MIN_RATE: f64 = 0.01;
/// The fastest rate, and the largest burst, accepted (beyond, a limit is no limit).
pub const MAX_RATE: f64 = 1_000_000.0;
pub const MAX_BURST: u32 = 1_000_000;
/// The longest wait a refusal announces (what the node agent caps `retry-after-ms` at).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct RateConfig {
    /// Tokens per second (`--node-rate`).
    pub rate: f64,
    /// Bucket size (`--node-burst`).
    pub burst: u32,
}

impl RateConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate.is_finite() && (MIN_RATE..=MAX_RATE).contains(&self.rate)) {
            return Err(format!(
                "--node-rate must be between {MIN_RATE} and {MAX_RATE} per second (got {})",
                self.rate
            ));
        }
        if !(1..=MAX_BURST).contains(&self.burst) {
            return Err(format!("--node-burst must be between 1 and {MAX_BURST} (got {})", self.burst));
        }
        Ok(())
    }
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refilled(&self, config: &RateConfig, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * config.rate).min(config.burst as f64)
    }
}

/// Token buckets by key (a node's name, a source address), in a bounded table.
pub struct RateLimiter<K> {
    config: RateConfig,
    max_nodes: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
    /// Buckets dropped while still refilling because the table was full.
    evictions: AtomicU64,
}

/// The per-node limiter of certificate requests.
pub type NodeRateLimiter = RateLimiter<String>;

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(config: RateConfig, max_nodes: usize) -> RateLimiter<K> {
        RateLimiter {
            config,
            max_nodes: max_nodes.max(1),
            buckets: Mutex::new(HashMap::new()),
            evictions: AtomicU64::new(0),
        }
    }

    /// Takes a token for `key`; `Err(wait)` when its bucket is empty, with the time until the
    /// next token (at most [`MAX_RETRY_AFTER`]).
    pub fn check<Q>(&self, key: &Q, now: Instant) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= self.max_nodes {
            self.make_room(&mut buckets, now);
        }
        let config = self.config;
        let bucket = match buckets.get_mut(key) {
            Some(b) => b,
            None => buckets
                .entry(key.to_owned())
                .or_insert_with(|| Bucket { tokens: config.burst as f64, updated: now }),
        };
        let tokens = bucket.refilled(&config, now);
        bucket.updated = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            Ok(())
        } else {
            bucket.tokens = tokens;
            let wait = Duration::try_from_secs_f64((1.0 - tokens) / config.rate).unwrap_or(MAX_RETRY_AFTER);
            Err(wait.min(MAX_RETRY_AFTER))
        }
    }

    fn make_room(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let config = self.config;
        buckets.retain(|_, b| b.refilled(&config, now) < config.burst as f64);
        if buckets.len() < self.max_nodes {
            return;
        }
        let oldest = buckets.iter().min_by_key(|(_, b)| b.updated).map(|(node, _)| node.clone());
        if let Some(node) = oldest {
            buckets.remove(&node);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Nodes with a bucket now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32, max_nodes: usize) -> NodeRateLimiter {
        NodeRateLimiter::new(RateConfig { rate, burst }, max_nodes)
    }

    #[test]
    fn a_node_gets_its_burst_then_the_rate() {
        let l = limiter(10.0, 5, 100);
        let t0 = Instant::now();
        for _ in 0..5 {
            l.check("n1", t0).expect("within the burst");
        }
        let wait = l.check("n1", t0).expect_err("burst used up");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "one token takes 100 ms at 10/s: {wait:?}");
        // 250 ms later: two tokens and a half.
        let t1 = t0 + Duration::from_millis(250);
        l.check("n1", t1).unwrap();
        l.check("n1", t1).unwrap();
        let wait = l.check("n1", t1).expect_err("half a token left");
        assert!((wait.as_secs_f64() - 0.05).abs() < 1e-6, "{wait:?}");
        // Never more than the burst, however long the node was quiet.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..5 {
            l.check("n1", t2).unwrap();
        }
        assert!(l.check("n1", t2).is_err());
    }

    #[test]
    fn one_node_cannot_use_another_nodes_tokens() {
        let l = limiter(1.0, 2, 100);
        let t = Instant::now();
        l.check("busy", t).unwrap();
        l.check("busy", t).unwrap();
        assert!(l.check("busy", t).is_err());
        l.check("quiet", t).expect("a node of its own");
        l.check("quiet", t).unwrap();
    }

    #[test]
    fn the_table_is_bounded_and_drops_refilled_buckets_first() {
        let l = limiter(1.0, 2, 3);
        let t0 = Instant::now();
        l.check("a", t0).unwrap();
        l.check("b", t0 + Duration::from_secs(1)).unwrap();
        l.check("c", t0 + Duration::from_millis(1200)).unwrap();
        assert_eq!(l.tracked(), 3);
        // At t0+1.5 s, a (one token used at t0) has refilled; b and c have not: a goes.
        l.check("d", t0 + Duration::from_millis(1500)).unwrap();
        assert_eq!(l.tracked(), 3);
        assert_eq!(l.evictions(), 0, "dropping a full bucket loses nothing");
        // Now nothing has refilled: the bucket untouched longest (b) is evicted and counted.
        l.check("e", t0 + Duration::from_millis(1600)).unwrap();
        assert_eq!(l.tracked(), 3);
        assert_eq!(l.evictions(), 1);
        let buckets = l.buckets.lock().unwrap();
        assert!(!buckets.contains_key("b") && buckets.contains_key("c"));
    }

    #[test]
    fn flags_are_validated() {
        assert!(RateConfig { rate: 0.0, burst: 1 }.validate().is_err());
        assert!(RateConfig { rate: f64::NAN, burst: 1 }.validate().is_err());
        assert!(RateConfig { rate: 1.0, burst: 0 }.validate().is_err());
        assert!(RateConfig { rate: 0.5, burst: 1 }.validate().is_ok());
        // Finding 13: a tiny rate made the wait overflow Duration and panicked per request.
        assert!(RateConfig { rate: 1e-300, burst: 1 }.validate().is_err());
        assert!(RateConfig { rate: 1e12, burst: 1 }.validate().is_err());
        assert!(RateConfig { rate: 1.0, burst: u32::MAX }.validate().is_err());
        assert!(RateConfig { rate: MIN_RATE, burst: MAX_BURST }.validate().is_ok());
    }

    #[test]
    fn the_wait_is_bounded_whatever_the_rate() {
        // Built without validation, as a test or a future caller could: no panic, a capped wait.
        let l = limiter(1e-300, 1, 10);
        let t = Instant::now();
        l.check("n1", t).unwrap();
        assert_eq!(l.check("n1", t), Err(MAX_RETRY_AFTER));
    }

    #[test]
    fn any_key_type_works() {
        let l: RateLimiter<std::net::IpAddr> = RateLimiter::new(RateConfig { rate: 1.0, burst: 1 }, 10);
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t = Instant::now();
        l.check(&a, t).unwrap();
        assert!(l.check(&a, t).is_err());
        l.check(&b, t).expect("another source has its own bucket");
    }
}
