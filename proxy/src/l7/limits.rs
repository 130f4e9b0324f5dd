//! Node-local limits of the request path: local rate limits (token buckets), retry budgets,
//! circuit breakers per destination, and per-source-pod limits (the shared proxy's
//! noisy-neighbour guard). All per sluice instance, i.e. per node, like Envoy's local limits.
//!
//! State lives in small registries keyed by what the limit protects ("ns/name:port" of a
//! destination, a policy's key) and is created on first use; the configuration travels with each
//! request (from the model snapshot), so a policy edit applies at once: a bucket or budget whose
//! configuration changed is replaced.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::discovery::traffic::{CircuitBreaker, LocalRateLimit, RetryBudget};

/// A registry of per-key state that is rebuilt when its configuration changes.
pub struct Registry<K, C, S> {
    map: RwLock<HashMap<K, (C, Arc<S>)>>,
}

impl<K: Eq + Hash + Clone, C: PartialEq + Clone, S> Default for Registry<K, C, S> {
    fn default() -> Self {
        Self { map: RwLock::default() }
    }
}

impl<K: Eq + Hash + Clone, C: PartialEq + Clone, S> Registry<K, C, S> {
    /// The state for `key` under configuration `cfg`, made with `new` if absent or if the
    /// configuration changed.
    pub fn get(&self, key: &K, cfg: &C, new: impl FnOnce(&C) -> S) -> Arc<S> {
        if let Some((c, s)) = self.map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
            if c == cfg {
                return s.clone();
            }
        }
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((c, s)) if c == cfg => s.clone(),
            _ => {
                let s = Arc::new(new(cfg));
                map.insert(key.clone(), (cfg.clone(), s.clone()));
                s
            }
        }
    }

    pub fn snapshot(&self) -> Vec<(K, C, Arc<S>)> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, (c, s))| (k.clone(), c.clone(), s.clone()))
            .collect()
    }

    /// Forgets keys `keep` says no to (control path, after a model change).
    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).retain(|k, _| keep(k));
    }
}

/// Envoy's local rate limit: `max_tokens` in the bucket, `tokens_per_fill` added every
/// `fill_interval`.
pub struct TokenBucket {
    cfg: LocalRateLimit,
    state: Mutex<(u32, Instant)>,
}

impl TokenBucket {
    pub fn new(cfg: &LocalRateLimit) -> Self {
        Self { cfg: *cfg, state: Mutex::new((cfg.max_tokens, Instant::now())) }
    }

    /// Takes a token; `Err(wait)` is how long until the next fill when there is none.
    pub fn try_take(&self) -> Result<(), Duration> {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let interval = self.cfg.fill_interval.max(Duration::from_millis(1));
        let fills = (now.saturating_duration_since(s.1).as_nanos() / interval.as_nanos()) as u64;
        if fills > 0 {
            let added = fills.saturating_mul(u64::from(self.cfg.tokens_per_fill));
            s.0 = (u64::from(s.0) + added).min(u64::from(self.cfg.max_tokens)) as u32;
            s.1 += interval * fills.min(u32::MAX as u64) as u32;
        }
        if s.0 > 0 {
            s.0 -= 1;
            Ok(())
        } else {
            Err((s.1 + interval).saturating_duration_since(now))
        }
    }
}

/// Retries may add at most `percent` % of the requests of the last [`BUDGET_WINDOW`] seconds
/// plus `min_per_second` per second: so retries cannot multiply an outage.
pub struct Budget {
    cfg: RetryBudget,
    window: Mutex<Window>,
}

/// The budget's memory, in seconds.
pub const BUDGET_WINDOW: usize = 10;

struct Window {
    /// (second, requests, retries) per slot.
    slots: [(u64, u64, u64); BUDGET_WINDOW],
    origin: Instant,
}

impl Budget {
    pub fn new(cfg: &RetryBudget) -> Self {
        Self { cfg: *cfg, window: Mutex::new(Window { slots: [(0, 0, 0); BUDGET_WINDOW], origin: Instant::now() }) }
    }

    /// Records one request (a first try).
    pub fn deposit(&self) {
        self.at(Instant::now(), |slot| slot.1 += 1);
    }

    /// Whether one more retry fits; if so it is recorded.
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(Instant::now())
    }

    fn withdraw_at(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let sec = now.saturating_duration_since(w.origin).as_secs();
        let (requests, retries) = w
            .slots
            .iter()
            .filter(|s| s.0 + BUDGET_WINDOW as u64 > sec && s.0 <= sec)
            .fold((0u64, 0u64), |(a, b), s| (a + s.1, b + s.2));
        let allowed = u64::from(self.cfg.min_per_second) * BUDGET_WINDOW as u64
            + requests * u64::from(self.cfg.percent) / 100;
        if retries >= allowed {
            return false;
        }
        let slot = slot_for(&mut w, sec);
        slot.2 += 1;
        true
    }

    fn at(&self, now: Instant, f: impl FnOnce(&mut (u64, u64, u64))) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let sec = now.saturating_duration_since(w.origin).as_secs();
        f(slot_for(&mut w, sec));
    }
}

fn slot_for(w: &mut Window, sec: u64) -> &mut (u64, u64, u64) {
    let slot = &mut w.slots[(sec % BUDGET_WINDOW as u64) as usize];
    if slot.0 != sec {
        *slot = (sec, 0, 0);
    }
    slot
}

/// In-flight counts towards one destination, checked against a [`CircuitBreaker`].
#[derive(Default)]
pub struct Breaker {
    pub requests: AtomicU32,
    pub pending: AtomicU32,
    pub retries: AtomicU32,
    pub connections: AtomicU32,
    pub overflows: AtomicU64,
}

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Requests,
    Pending,
    Connections,
    Retries,
    PodRequests,
    /// The source pod's sockets (`--pod-max-connections`): no new upstream connection for it.
    PodConnections,
    /// The node's sockets (`--max-connections`).
    NodeConnections,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Requests => "maxRequests",
            Overflow::Pending => "maxPendingRequests",
            Overflow::Connections => "maxConnections",
            Overflow::Retries => "maxRetries",
            Overflow::PodRequests => "per-pod request limit",
            Overflow::PodConnections => "per-pod connection limit",
            Overflow::NodeConnections => "node connection limit",
        }
    }
}

/// Holds one unit of a counter while alive.
pub struct Slot<'a>(&'a AtomicU32);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An owned slot (for state that outlives a borrow, e.g. held in a response body).
pub struct OwnedSlot<T: AsRef<AtomicU32>>(pub T);

impl<T: AsRef<AtomicU32>> Drop for OwnedSlot<T> {
    fn drop(&mut self) {
        self.0.as_ref().fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes one unit of `counter` if it stays within `limit` (`None`: unlimited).
pub fn acquire(counter: &AtomicU32, limit: Option<u32>) -> Option<Slot<'_>> {
    match limit {
        None => {
            counter.fetch_add(1, Ordering::Relaxed);
            Some(Slot(counter))
        }
        Some(max) => counter
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(counter)),
    }
}

impl Breaker {
    /// A request may start (`maxRequests`).
    pub fn request<'a>(&'a self, cfg: &CircuitBreaker) -> Result<Slot<'a>, Overflow> {
        acquire(&self.requests, cfg.max_requests).ok_or_else(|| self.overflow(Overflow::Requests))
    }

    /// A retry may start (`maxRetries`).
    pub fn retry<'a>(&'a self, cfg: &CircuitBreaker) -> Result<Slot<'a>, Overflow> {
        acquire(&self.retries, cfg.max_retries).ok_or_else(|| self.overflow(Overflow::Retries))
    }

    fn overflow(&self, o: Overflow) -> Overflow {
        self.overflows.fetch_add(1, Ordering::Relaxed);
        o
    }
}

/// Node-wide limits per source pod: one pod must not starve the others sharing the proxy.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PodLimits {
    /// Requests in flight from one pod; beyond, 503 overflow.
    pub max_requests: u32,
    /// New connections per second accepted from one pod (beyond it sluice stops accepting from
    /// that pod's listener for a moment: the excess waits in the kernel's accept queue).
    pub connection_rate: u32,
}

impl Default for PodLimits {
    fn default() -> Self {
        Self { max_requests: 2000, connection_rate: 500 }
    }
}

/// The per-pod limiter: the accept-rate bucket and the requests in flight.
pub struct PodLimiter {
    pub limits: PodLimits,
    accept: TokenBucket,
    pub requests: AtomicU32,
}

impl PodLimiter {
    pub fn new(limits: &PodLimits) -> Self {
        let rate = limits.connection_rate.max(1);
        // Refilled every 10 ms, one second's worth of burst.
        let accept = TokenBucket::new(&LocalRateLimit {
            max_tokens: rate,
            tokens_per_fill: (rate / 100).max(1),
            fill_interval: Duration::from_millis(10),
            status: 429,
        });
        Self { limits: *limits, accept, requests: AtomicU32::new(0) }
    }

    /// May one more connection be accepted now? `Err(wait)`: not for `wait`.
    pub fn accept(&self) -> Result<(), Duration> {
        self.accept.try_take()
    }

    /// One more request in flight from this pod, within its limit.
    pub fn request(&self) -> Option<Slot<'_>> {
        acquire(&self.requests, Some(self.limits.max_requests))
    }
}

/// Counters of the limits, for the admin view.
#[derive(Debug, Default, Serialize)]
pub struct LimitCounters {
    pub rate_limited: AtomicU64,
    pub overflow: AtomicU64,
    pub retries: AtomicU64,
    pub retry_budget_exhausted: AtomicU64,
    pub faults_delayed: AtomicU64,
    pub faults_aborted: AtomicU64,
    pub pod_overflow: AtomicU64,
    pub pod_accept_paused: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(max: u32, per_fill: u32, ms: u64) -> LocalRateLimit {
        LocalRateLimit { max_tokens: max, tokens_per_fill: per_fill, fill_interval: Duration::from_millis(ms), status: 429 }
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_fill_rate() {
        let b = TokenBucket::new(&rl(10, 5, 100));
        let t0 = b.state.lock().unwrap().1;
        let ok = (0..20).filter(|_| b.try_take_at(t0).is_ok()).count();
        assert_eq!(ok, 10, "the burst");
        let wait = b.try_take_at(t0 + Duration::from_millis(30)).unwrap_err();
        assert_eq!(wait, Duration::from_millis(70));
        // 1 s later: 10 fills of 5, capped at 10.
        let later = t0 + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| b.try_take_at(later).is_ok()).count(), 10);
        // Steady state: 5 per 100 ms = 50 per second.
        let mut ok = 0;
        for ms in (0..1000).step_by(10) {
            ok += (0..3).filter(|_| b.try_take_at(later + Duration::from_millis(ms + 1)).is_ok()).count();
        }
        // Nine fills in the 991 ms sampled after the burst.
        assert_eq!(ok, 45);
    }

    #[test]
    fn budget_caps_retries_at_a_share_of_requests_plus_a_floor() {
        let b = Budget::new(&RetryBudget { percent: 20, min_per_second: 1 });
        let t0 = b.window.lock().unwrap().origin;
        for _ in 0..1000 {
            b.at(t0, |s| s.1 += 1);
        }
        let granted = (0..1000).filter(|_| b.withdraw_at(t0)).count();
        // 20 % of 1000 + 1/s over the 10 s window.
        assert_eq!(granted, 210);
        // After the window has passed, the old requests no longer count.
        let later = t0 + Duration::from_secs(BUDGET_WINDOW as u64 + 1);
        assert_eq!((0..100).filter(|_| b.withdraw_at(later)).count(), 10);
    }

    #[test]
    fn breaker_counts_and_releases() {
        let br = Breaker::default();
        let cfg = CircuitBreaker { max_requests: Some(2), ..Default::default() };
        let a = br.request(&cfg).unwrap();
        let _b = br.request(&cfg).unwrap();
        assert_eq!(br.request(&cfg).err(), Some(Overflow::Requests));
        drop(a);
        assert!(br.request(&cfg).is_ok());
        assert_eq!(br.overflows.load(Ordering::Relaxed), 1);
        let unlimited = CircuitBreaker::default();
        let slots: Vec<_> = (0..100).map(|_| br.request(&unlimited).unwrap()).collect();
        assert_eq!(br.requests.load(Ordering::Relaxed), 101);
        drop(slots);
    }

    #[test]
    fn registry_rebuilds_on_config_change() {
        let r: Registry<String, LocalRateLimit, TokenBucket> = Registry::default();
        let k = "a".to_string();
        let b1 = r.get(&k, &rl(1, 1, 1000), TokenBucket::new);
        assert!(b1.try_take().is_ok() && b1.try_take().is_err());
        let same = r.get(&k, &rl(1, 1, 1000), TokenBucket::new);
        assert!(Arc::ptr_eq(&b1, &same));
        let changed = r.get(&k, &rl(5, 1, 1000), TokenBucket::new);
        assert!(!Arc::ptr_eq(&b1, &changed) && changed.try_take().is_ok());
    }
}
