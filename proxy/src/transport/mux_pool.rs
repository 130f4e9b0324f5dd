//! A pool of multiplexed (HTTP/2) connections per key, the common core of the HBONE tunnel pool
//! ([`super::client::HbonePool`]) and the upstream HTTP/2 pool (`l7::upstream`). Whatever the
//! traffic does, it holds:
//!
//! - **One handshake per key at a time** (single flight): a burst of first streams waits for
//!   one connection attempt instead of opening one each and keeping only the last. If that
//!   attempt fails, every waiter gets its error; the next stream tries again.
//! - **Streams up to the peer's limit**: a connection takes streams while it carries fewer
//!   than the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`; then the key gets another connection,
//!   up to `max_conns_per_key`. Past that, a stream queues on the least loaded connection (h2
//!   opens it when a slot frees) and the saturation is counted.
//! - **Idle expiry**: a connection with no stream for `idle_timeout` leaves the pool and closes.
//! - **Bounds with counters**: connections per key, keys in all and per owner (the source pod:
//!   past `max_keys`, or its owner's `max_keys_per_owner`, a stream gets a connection of its
//!   own that is not pooled and closes with it), waiters per handshake; every eviction is
//!   counted by its reason.
//!
//! The protocol side (dialling, reading the peer's limit, keepalive PINGs, driving the
//! connection) belongs to the caller: the pool sees a connection only as [`Multiplexed`], and
//! the caller's connection task asks [`MuxPool::until_retired`] when to close.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

/// What the pool needs to know about a connection. Both are called under the pool's lock,
/// which every checkout of every key takes: they must answer from what the connection already
/// knows, never wait for anything a connection's task may hold while it does I/O.
pub trait Multiplexed: Send + Sync + 'static {
    /// How many streams the peer lets this connection carry at once (its
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`, as last seen).
    fn max_streams(&self) -> usize;
    /// Whether it still takes new streams: open, and no GOAWAY received.
    fn takes_streams(&self) -> bool;
}

/// The pool's bounds.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Connections one key may hold (more are opened when the others are at the peer's
    /// stream limit).
    pub max_conns_per_key: usize,
    /// Keys pooled in all; a new key past this gets an unpooled connection.
    pub max_keys: usize,
    /// Keys pooled per owner (see [`MuxPool::with_owners`]), so that one source pod cannot
    /// take the pool from the others; past it, likewise unpooled.
    pub max_keys_per_owner: usize,
    /// Streams that may wait for one handshake; more are refused at once.
    pub max_waiters: usize,
}

/// What the pool did, for the admin API and metrics (monotonic counters).
#[derive(Debug, Default, Serialize)]
pub struct PoolStats {
    /// Connections made and pooled.
    pub connects: AtomicU64,
    /// Of those, made because every connection of the key was at the peer's stream limit.
    pub extra_connections: AtomicU64,
    /// Connections failed (each failure once, whoever waited for it).
    pub connect_errors: AtomicU64,
    /// Streams that waited for another stream's handshake instead of making their own.
    pub single_flight_waits: AtomicU64,
    /// Streams refused because `max_waiters` already waited for the key's handshake.
    pub waiters_rejected: AtomicU64,
    /// Streams queued on a full connection: the key had `max_conns_per_key` connections, all
    /// at the peer's limit.
    pub saturated: AtomicU64,
    /// Connections made outside the pool because it held `max_keys` keys, or the key's owner
    /// `max_keys_per_owner`.
    pub unpooled: AtomicU64,
    /// Evictions: no stream for the idle timeout.
    pub evicted_idle: AtomicU64,
    /// Evictions: a keepalive PING went unanswered.
    pub evicted_keepalive: AtomicU64,
    /// Evictions: a stream's open (CONNECT) got no answer in time.
    pub evicted_connect_timeout: AtomicU64,
    /// Evictions: the peer closed the connection, sent GOAWAY, or it failed.
    pub evicted_closed: AtomicU64,
    /// Evictions: idle, closed to make room for a new socket (the source pod, or the node, was
    /// at its connection bound).
    pub evicted_shed: AtomicU64,
}

impl PoolStats {
    /// Every counter with its name.
    pub fn snapshot(&self) -> [(&'static str, u64); 12] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("connects", v(&self.connects)),
            ("extra_connections", v(&self.extra_connections)),
            ("connect_errors", v(&self.connect_errors)),
            ("single_flight_waits", v(&self.single_flight_waits)),
            ("waiters_rejected", v(&self.waiters_rejected)),
            ("saturated", v(&self.saturated)),
            ("unpooled", v(&self.unpooled)),
            ("evicted_idle", v(&self.evicted_idle)),
            ("evicted_keepalive", v(&self.evicted_keepalive)),
            ("evicted_connect_timeout", v(&self.evicted_connect_timeout)),
            ("evicted_closed", v(&self.evicted_closed)),
            ("evicted_shed", v(&self.evicted_shed)),
        ]
    }

    fn count(&self, why: Eviction) {
        let c = match why {
            Eviction::Idle => &self.evicted_idle,
            Eviction::Keepalive => &self.evicted_keepalive,
            Eviction::ConnectTimeout => &self.evicted_connect_timeout,
            Eviction::Closed => &self.evicted_closed,
            Eviction::Shed => &self.evicted_shed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a connection leaves the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    Idle,
    Keepalive,
    ConnectTimeout,
    Closed,
    /// Idle, closed to make room ([`MuxPool::shed_idle`]).
    Shed,
}

/// Why [`MuxPool::until_retired`] says the connection should close now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// No stream for the idle timeout (it has been removed from the pool).
    Idle,
    /// Evicted earlier (or never pooled), and its last stream has ended.
    Evicted,
}

/// A connection in the pool, with its stream count.
pub struct Pooled<K, C> {
    conn: C,
    /// `None` for a connection that was never pooled (the pool was full).
    key: Option<K>,
    active: AtomicUsize,
    /// When a stream last ended, in nanoseconds since `epoch`.
    idle_since: AtomicU64,
    epoch: Instant,
    /// Out of the pool: takes no new stream, closes once its streams are done.
    evicted: AtomicBool,
    /// Wakes the connection's task to look again (a stream ended, it was evicted).
    wake: Notify,
}

impl<K, C> Pooled<K, C> {
    pub fn conn(&self) -> &C {
        &self.conn
    }

    /// Streams open on it (slots held).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    fn idle_deadline(&self, idle_timeout: Duration) -> Instant {
        self.epoch + Duration::from_nanos(self.idle_since.load(Ordering::Acquire)) + idle_timeout
    }

    fn take_slot(self: &Arc<Self>, queued: bool) -> Slot<K, C> {
        self.active.fetch_add(1, Ordering::AcqRel);
        Slot { pooled: self.clone(), queued }
    }
}

/// One stream's place on a pooled connection. The connection counts it as active until the
/// slot is dropped: hold it as long as either half of the stream is in use.
pub struct Slot<K, C> {
    pooled: Arc<Pooled<K, C>>,
    queued: bool,
}

impl<K, C> Slot<K, C> {
    pub fn conn(&self) -> &C {
        &self.pooled.conn
    }

    pub fn pooled(&self) -> &Arc<Pooled<K, C>> {
        &self.pooled
    }

    /// Taken on a connection that was already at the peer's limit (the key at its bound): the
    /// stream may wait inside h2 for another to end, so a slow answer says nothing about the
    /// peer's health.
    pub fn queued(&self) -> bool {
        self.queued
    }
}

impl<K, C> Drop for Slot<K, C> {
    fn drop(&mut self) {
        let p = &self.pooled;
        // The time first: the connection's task reads it once it sees no stream.
        let since = Instant::now().saturating_duration_since(p.epoch).as_nanos() as u64;
        p.idle_since.store(since, Ordering::Release);
        if p.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            p.wake.notify_one();
        }
    }
}

enum FlightState<E> {
    Connecting,
    Connected,
    Failed(Arc<E>),
    /// The stream that was connecting went away (its request was cancelled) without a result.
    Abandoned,
}

/// One handshake in progress for a key, and who waits for it.
struct Flight<E> {
    state: watch::Sender<FlightState<E>>,
    waiters: AtomicUsize,
}

struct Entry<K, C, E> {
    conns: Vec<Arc<Pooled<K, C>>>,
    flight: Option<Arc<Flight<E>>>,
}

impl<K, C, E> Default for Entry<K, C, E> {
    fn default() -> Self {
        Self { conns: Vec::new(), flight: None }
    }
}

/// What [`MuxPool::checkout`] gives a stream.
pub enum Checkout<'a, K: Hash + Eq + Clone, C, E> {
    /// A slot on a pooled connection.
    Ready(Slot<K, C>),
    /// No connection can take the stream: the caller connects and reports with
    /// [`Leader::finish`] or [`Leader::fail`]; others wait for that.
    Connect(Leader<'a, K, C, E>),
}

/// Why a stream got no slot.
#[derive(Debug)]
pub enum CheckoutError<E> {
    /// The handshake it waited for failed.
    Failed(Arc<E>),
    /// Too many streams already wait for the key's handshake.
    TooManyWaiters,
    /// The caller's admission refused to let this stream wait (a circuit breaker's
    /// `maxPendingRequests`).
    NotAdmitted,
}

/// The stream that makes the key's connection.
pub struct Leader<'a, K: Hash + Eq + Clone, C, E> {
    pool: &'a MuxPool<K, C, E>,
    /// `None`: the connection is not pooled (the pool is full).
    key: Option<K>,
    flight: Option<Arc<Flight<E>>>,
    extra: bool,
    done: bool,
}

impl<K: Hash + Eq + Clone, C: Multiplexed, E> Leader<'_, K, C, E> {
    /// Whether the connection will be pooled (else it serves this stream only).
    pub fn pooled(&self) -> bool {
        self.key.is_some()
    }

    /// The connection is up: it joins the pool, the waiters are woken, and the caller gets
    /// the first slot on it.
    pub fn finish(mut self, conn: C) -> Slot<K, C> {
        self.done = true;
        let pool = self.pool;
        let pooled = Arc::new(Pooled {
            conn,
            key: self.key.clone(),
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            epoch: pool.epoch,
            evicted: AtomicBool::new(self.key.is_none()),
            wake: Notify::new(),
        });
        let slot = pooled.take_slot(false);
        if let (Some(key), Some(flight)) = (&self.key, &self.flight) {
            let mut map = pool.lock();
            let entry = map.entry(key);
            entry.conns.push(pooled);
            if entry.flight.as_ref().is_some_and(|f| Arc::ptr_eq(f, flight)) {
                entry.flight = None;
            }
            pool.stats.connects.fetch_add(1, Ordering::Relaxed);
            if self.extra {
                pool.stats.extra_connections.fetch_add(1, Ordering::Relaxed);
            }
            drop(map);
            flight.state.send_replace(FlightState::Connected);
        }
        slot
    }

    /// The connection failed: every waiter gets `error` (shared), and the next stream of the
    /// key tries again.
    pub fn fail(mut self, error: E) -> Arc<E> {
        self.done = true;
        let error = Arc::new(error);
        self.pool.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
        self.end_flight(FlightState::Failed(error.clone()));
        error
    }

    fn end_flight(&self, outcome: FlightState<E>) {
        let (Some(key), Some(flight)) = (&self.key, &self.flight) else { return };
        let mut map = self.pool.lock();
        if let Some(entry) = map.get_mut(key) {
            if entry.flight.as_ref().is_some_and(|f| Arc::ptr_eq(f, flight)) {
                entry.flight = None;
            }
            if entry.conns.is_empty() && entry.flight.is_none() {
                map.remove(key);
            }
        }
        drop(map);
        flight.state.send_replace(outcome);
    }
}

impl<K: Hash + Eq + Clone, C, E> Drop for Leader<'_, K, C, E> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Cancelled mid-handshake: a waiter takes over (it finds no flight and starts one).
        let (Some(key), Some(flight)) = (&self.key, &self.flight) else { return };
        let mut map = self.pool.lock();
        if let Some(entry) = map.get_mut(key) {
            if entry.flight.as_ref().is_some_and(|f| Arc::ptr_eq(f, flight)) {
                entry.flight = None;
            }
            if entry.conns.is_empty() && entry.flight.is_none() {
                map.remove(key);
            }
        }
        drop(map);
        flight.state.send_replace(FlightState::Abandoned);
    }
}

/// Counts a waiter out when it stops waiting (woken or cancelled).
struct Waiting<E>(Arc<Flight<E>>);

impl<E> Drop for Waiting<E> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pool's keys, and how many each owner holds.
struct Keys<K, C, E> {
    map: HashMap<K, Entry<K, C, E>>,
    per_owner: HashMap<u32, usize>,
    owner: Option<fn(&K) -> u32>,
}

impl<K: Hash + Eq + Clone, C, E> Keys<K, C, E> {
    fn len(&self) -> usize {
        self.map.len()
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut Entry<K, C, E>> {
        self.map.get_mut(key)
    }

    /// Whether `key`'s owner may add a key.
    fn owner_has_room(&self, key: &K, max: usize) -> bool {
        self.owner.is_none_or(|owner| self.per_owner.get(&owner(key)).copied().unwrap_or(0) < max)
    }

    /// The entry of `key`, made (and counted to its owner) if there is none.
    fn entry(&mut self, key: &K) -> &mut Entry<K, C, E> {
        if !self.map.contains_key(key) {
            if let Some(owner) = self.owner {
                *self.per_owner.entry(owner(key)).or_default() += 1;
            }
        }
        self.map.entry(key.clone()).or_default()
    }

    fn remove(&mut self, key: &K) {
        if self.map.remove(key).is_some() {
            self.uncount(key);
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&K, &mut Entry<K, C, E>) -> bool) {
        let mut removed = Vec::new();
        self.map.retain(|k, e| {
            let kept = keep(k, e);
            if !kept {
                removed.push(k.clone());
            }
            kept
        });
        for k in &removed {
            self.uncount(k);
        }
    }

    fn uncount(&mut self, key: &K) {
        let Some(owner) = self.owner else { return };
        let o = owner(key);
        if let Some(n) = self.per_owner.get_mut(&o) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&o);
            }
        }
    }
}

/// Multiplexed connections per key. See the module docs.
pub struct MuxPool<K, C, E> {
    map: Mutex<Keys<K, C, E>>,
    limits: PoolLimits,
    pub stats: PoolStats,
    epoch: Instant,
}

impl<K, C, E> MuxPool<K, C, E> {
    fn lock(&self) -> MutexGuard<'_, Keys<K, C, E>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<K: Hash + Eq + Clone, C: Multiplexed, E> MuxPool<K, C, E> {
    pub fn new(limits: PoolLimits) -> Self {
        assert!(limits.max_conns_per_key > 0, "a key must be allowed one connection");
        let keys = Keys { map: HashMap::new(), per_owner: HashMap::new(), owner: None };
        Self { map: Mutex::new(keys), limits, stats: PoolStats::default(), epoch: Instant::now() }
    }

    /// A pool whose keys each belong to an owner (`owner(key)`, the source pod), each owner
    /// holding at most `max_keys_per_owner` of them.
    pub fn with_owners(limits: PoolLimits, owner: fn(&K) -> u32) -> Self {
        let pool = Self::new(limits);
        pool.lock().owner = Some(owner);
        pool
    }

    pub fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    /// A slot for one new stream of `key`: on a pooled connection with room, or after
    /// another stream's handshake for the key, or the order to connect.
    pub async fn checkout(&self, key: &K) -> Result<Checkout<'_, K, C, E>, CheckoutError<E>> {
        self.checkout_admitted(key, || Some(())).await
    }

    /// As [`MuxPool::checkout`]; a stream that would wait for another's handshake first asks
    /// `admit` for a permit, held while it waits (`None`: it does not wait, and fails).
    pub async fn checkout_admitted<P>(
        &self,
        key: &K,
        mut admit: impl FnMut() -> Option<P>,
    ) -> Result<Checkout<'_, K, C, E>, CheckoutError<E>> {
        loop {
            let (flight, mut state, permit) = {
                let mut map = self.lock();
                let at_bound = map.len() >= self.limits.max_keys
                    || !map.owner_has_room(key, self.limits.max_keys_per_owner);
                let entry = match map.get_mut(key) {
                    Some(entry) => entry,
                    None if at_bound => {
                        self.stats.unpooled.fetch_add(1, Ordering::Relaxed);
                        return Ok(Checkout::Connect(Leader {
                            pool: self,
                            key: None,
                            flight: None,
                            extra: false,
                            done: false,
                        }));
                    }
                    None => map.entry(key),
                };
                // Connections that stopped taking streams (GOAWAY, closed) leave now; their
                // tasks close them once their streams are done.
                entry.conns.retain(|c| {
                    let keep = c.conn.takes_streams();
                    if !keep {
                        c.evicted.store(true, Ordering::Release);
                        c.wake.notify_one();
                        self.stats.count(Eviction::Closed);
                    }
                    keep
                });
                // The oldest connection with room first: load concentrates on few
                // connections, and the extra ones go idle and close when the burst is over.
                if let Some(c) = entry.conns.iter().find(|c| c.active() < c.conn.max_streams()) {
                    return Ok(Checkout::Ready(c.take_slot(false)));
                }
                match &entry.flight {
                    Some(flight) => {
                        if flight.waiters.load(Ordering::Acquire) >= self.limits.max_waiters {
                            self.stats.waiters_rejected.fetch_add(1, Ordering::Relaxed);
                            return Err(CheckoutError::TooManyWaiters);
                        }
                        let Some(permit) = admit() else { return Err(CheckoutError::NotAdmitted) };
                        flight.waiters.fetch_add(1, Ordering::AcqRel);
                        self.stats.single_flight_waits.fetch_add(1, Ordering::Relaxed);
                        (flight.clone(), flight.state.subscribe(), permit)
                    }
                    None if entry.conns.len() < self.limits.max_conns_per_key => {
                        let flight = Arc::new(Flight {
                            state: watch::Sender::new(FlightState::Connecting),
                            waiters: AtomicUsize::new(0),
                        });
                        entry.flight = Some(flight.clone());
                        return Ok(Checkout::Connect(Leader {
                            pool: self,
                            key: Some(key.clone()),
                            flight: Some(flight),
                            extra: !entry.conns.is_empty(),
                            done: false,
                        }));
                    }
                    None => {
                        // Every connection of the key is at the peer's limit and the key may
                        // not have more: queue on the least loaded one.
                        self.stats.saturated.fetch_add(1, Ordering::Relaxed);
                        let least = entry
                            .conns
                            .iter()
                            .min_by_key(|c| c.active())
                            .expect("a key at its connection bound has connections");
                        return Ok(Checkout::Ready(least.take_slot(true)));
                    }
                }
            };
            let _waiting = (Waiting(flight), permit);
            let failed = match state.wait_for(|s| !matches!(s, FlightState::Connecting)).await {
                Ok(s) => match &*s {
                    FlightState::Failed(e) => Some(e.clone()),
                    _ => None,
                },
                // The flight is gone without a word: look again.
                Err(_) => None,
            };
            if let Some(e) = failed {
                return Err(CheckoutError::Failed(e));
            }
            // Connected (the new connection is in the pool) or abandoned: look again.
        }
    }

    /// Takes `conn` out of the pool (no new stream goes to it) and counts why, if it was
    /// still pooled. Its task closes it once its streams are done (or at once, for a dead
    /// peer). Returns whether it was pooled until now.
    pub fn evict(&self, conn: &Arc<Pooled<K, C>>, why: Eviction) -> bool {
        let removed = match &conn.key {
            Some(key) => {
                let mut map = self.lock();
                conn.evicted.store(true, Ordering::Release);
                Self::remove(&mut map, key, conn)
            }
            None => {
                conn.evicted.store(true, Ordering::Release);
                false
            }
        };
        if removed {
            self.stats.count(why);
        }
        conn.wake.notify_one();
        removed
    }

    fn remove(map: &mut Keys<K, C, E>, key: &K, conn: &Arc<Pooled<K, C>>) -> bool {
        let Some(entry) = map.get_mut(key) else { return false };
        let before = entry.conns.len();
        entry.conns.retain(|c| !Arc::ptr_eq(c, conn));
        let removed = entry.conns.len() != before;
        if entry.conns.is_empty() && entry.flight.is_none() {
            map.remove(key);
        }
        removed
    }

    /// Resolves when the connection's task should close it: it has had no stream for the
    /// idle timeout (it is then out of the pool, so no stream can start on it meanwhile), or
    /// it was evicted (or never pooled) and its last stream has ended.
    pub async fn until_retired(&self, conn: &Arc<Pooled<K, C>>) -> Retired {
        loop {
            // A notification sent between the checks below and the wait is kept as a permit.
            let woken = conn.wake.notified();
            if conn.active() > 0 {
                woken.await;
                continue;
            }
            if conn.is_evicted() {
                return Retired::Evicted;
            }
            let deadline = conn.idle_deadline(self.limits.idle_timeout);
            if Instant::now() >= deadline {
                if self.retire_if_idle(conn) {
                    return Retired::Idle;
                }
                continue;
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Removes `conn` if it is still idle past its deadline, under the lock that checkouts
    /// take, so no stream can be starting on it.
    fn retire_if_idle(&self, conn: &Arc<Pooled<K, C>>) -> bool {
        let Some(key) = &conn.key else { return false };
        let mut map = self.lock();
        if conn.active() > 0
            || conn.is_evicted()
            || Instant::now() < conn.idle_deadline(self.limits.idle_timeout)
        {
            return false;
        }
        conn.evicted.store(true, Ordering::Release);
        Self::remove(&mut map, key, conn);
        self.stats.count(Eviction::Idle);
        true
    }

    /// Evicts every pooled connection that no longer takes streams (periodic, off the data
    /// path; checkouts do the same for their key).
    pub fn sweep(&self) {
        let mut map = self.lock();
        map.retain(|_, entry| {
            entry.conns.retain(|c| {
                let keep = c.conn.takes_streams();
                if !keep {
                    c.evicted.store(true, Ordering::Release);
                    c.wake.notify_one();
                    self.stats.count(Eviction::Closed);
                }
                keep
            });
            !entry.conns.is_empty() || entry.flight.is_some()
        });
    }

    /// Evicts every pooled connection of a key matching `matches` that carries no stream,
    /// and hands each to `release` (which gives back its unit at once and says whether it
    /// held one); their tasks close them. Checkouts take streams under the same lock, so no
    /// stream can start on a connection being shed. Returns how many units were released.
    pub fn shed_idle(&self, matches: impl Fn(&K) -> bool, release: impl Fn(&C) -> bool) -> usize {
        let mut released = 0;
        let mut map = self.lock();
        map.retain(|key, entry| {
            if !matches(key) {
                return true;
            }
            entry.conns.retain(|c| {
                if c.active() > 0 {
                    return true;
                }
                c.evicted.store(true, Ordering::Release);
                c.wake.notify_one();
                self.stats.count(Eviction::Shed);
                released += usize::from(release(&c.conn));
                false
            });
            !entry.conns.is_empty() || entry.flight.is_some()
        });
        released
    }

    /// Pooled connections.
    pub fn len(&self) -> usize {
        self.lock().map.values().map(|e| e.conns.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys with a pooled connection or a handshake in progress.
    pub fn keys(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that is only a stream limit and an open/closed flag.
    struct Fake {
        max: AtomicUsize,
        open: AtomicBool,
    }

    impl Fake {
        fn new(max: usize) -> Self {
            Fake { max: AtomicUsize::new(max), open: AtomicBool::new(true) }
        }
    }

    impl Multiplexed for Fake {
        fn max_streams(&self) -> usize {
            self.max.load(Ordering::Relaxed)
        }
        fn takes_streams(&self) -> bool {
            self.open.load(Ordering::Relaxed)
        }
    }

    type Pool = MuxPool<u32, Fake, String>;

    fn limits() -> PoolLimits {
        PoolLimits {
            idle_timeout: Duration::from_secs(90),
            max_conns_per_key: 3,
            max_keys: 100,
            max_keys_per_owner: 100,
            max_waiters: 100,
        }
    }

    /// Polls `cond` every millisecond until it holds, for at most 5 s (on the paused clock both
    /// are virtual: nothing sleeps for real).
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn slot(pool: &Pool, key: u32, max: usize) -> Slot<u32, Fake> {
        match pool.checkout(&key).await.unwrap() {
            Checkout::Ready(s) => s,
            Checkout::Connect(leader) => leader.finish(Fake::new(max)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_first_streams_waits_for_one_handshake() {
        let pool = Arc::new(Pool::new(limits()));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let (go, gate) = watch::channel(false);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (pool, handshakes, mut gate) = (pool.clone(), handshakes.clone(), gate.clone());
                tokio::spawn(async move {
                    match pool.checkout(&7).await.unwrap() {
                        Checkout::Ready(s) => s.pooled().active(),
                        Checkout::Connect(leader) => {
                            handshakes.fetch_add(1, Ordering::SeqCst);
                            gate.wait_for(|open| *open).await.unwrap();
                            leader.finish(Fake::new(100)).pooled().active()
                        }
                    }
                })
            })
            .collect();
        until("19 waiters", || pool.stats.single_flight_waits.load(Ordering::Relaxed) == 19).await;
        go.send_replace(true);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(handshakes.load(Ordering::SeqCst), 1);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.stats.connects.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_handshake_fails_every_waiter_once_and_the_next_stream_tries_again() {
        let pool = Arc::new(Pool::new(limits()));
        let (go, gate) = watch::channel(false);
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (pool, mut gate) = (pool.clone(), gate.clone());
                tokio::spawn(async move {
                    match pool.checkout(&7).await {
                        Ok(Checkout::Connect(leader)) => {
                            gate.wait_for(|open| *open).await.unwrap();
                            Err(leader.fail("refused".to_string()).to_string())
                        }
                        Ok(Checkout::Ready(_)) => Ok(()),
                        Err(CheckoutError::Failed(e)) => Err(e.to_string()),
                        Err(e @ (CheckoutError::TooManyWaiters | CheckoutError::NotAdmitted)) => {
                            Err(format!("{e:?}"))
                        }
                    }
                })
            })
            .collect();
        until("9 waiters", || pool.stats.single_flight_waits.load(Ordering::Relaxed) == 9).await;
        go.send_replace(true);
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err("refused".to_string()));
        }
        assert_eq!(pool.stats.connect_errors.load(Ordering::Relaxed), 1);
        assert_eq!(pool.keys(), 0, "a failed key leaves nothing behind");
        assert!(
            matches!(pool.checkout(&7).await, Ok(Checkout::Connect(_))),
            "the next stream connects again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_leader_hands_the_handshake_to_a_waiter() {
        let pool = Arc::new(Pool::new(limits()));
        let Ok(Checkout::Connect(leader)) = pool.checkout(&1).await else { panic!("first stream connects") };
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move {
                match pool.checkout(&1).await.unwrap() {
                    Checkout::Connect(leader) => leader.finish(Fake::new(10)).pooled().active(),
                    Checkout::Ready(_) => panic!("nothing was connected"),
                }
            }
        });
        until("a waiter", || pool.stats.single_flight_waits.load(Ordering::Relaxed) == 1).await;
        drop(leader);
        assert_eq!(waiter.await.unwrap(), 1);
        assert_eq!(pool.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_bounded() {
        let pool = Arc::new(Pool::new(PoolLimits { max_waiters: 2, ..limits() }));
        let Ok(Checkout::Connect(leader)) = pool.checkout(&1).await else { panic!("first stream connects") };
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.checkout(&1).await.map(|_| ()).map_err(|_| ()) })
            })
            .collect();
        until("2 waiters", || pool.stats.single_flight_waits.load(Ordering::Relaxed) == 2).await;
        assert!(matches!(pool.checkout(&1).await, Err(CheckoutError::TooManyWaiters)));
        assert_eq!(pool.stats.waiters_rejected.load(Ordering::Relaxed), 1);
        let _first = leader.finish(Fake::new(10));
        for w in waiters {
            w.await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_can_be_refused_by_the_caller() {
        let pool = Arc::new(Pool::new(limits()));
        let Ok(Checkout::Connect(leader)) = pool.checkout(&1).await else { panic!("first stream connects") };
        // One permit to wait (a circuit breaker's maxPendingRequests of 1).
        let permits = Arc::new(AtomicUsize::new(1));
        let take = {
            let permits = permits.clone();
            move || {
                permits
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .ok()
                    .map(|_| ())
            }
        };
        let waiter = tokio::spawn({
            let (pool, take) = (pool.clone(), take.clone());
            async move { pool.checkout_admitted(&1, take).await.map(|_| ()).map_err(|_| ()) }
        });
        until("a waiter", || pool.stats.single_flight_waits.load(Ordering::Relaxed) == 1).await;
        assert!(matches!(pool.checkout_admitted(&1, take).await, Err(CheckoutError::NotAdmitted)));
        assert_eq!(
            pool.stats.single_flight_waits.load(Ordering::Relaxed),
            1,
            "the refused stream did not wait"
        );
        let _first = leader.finish(Fake::new(10));
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_at_the_peer_limit_gets_a_sibling_up_to_the_bound() {
        let pool = Pool::new(limits());
        // Each connection takes 2 streams; the key may hold 3 connections.
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(slot(&pool, 1, 2).await);
        }
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.stats.connects.load(Ordering::Relaxed), 3);
        assert_eq!(pool.stats.extra_connections.load(Ordering::Relaxed), 2);
        assert!(held.iter().all(|s| !s.queued()));
        // The seventh queues on the least loaded connection instead of a fourth one.
        let queued = slot(&pool, 1, 2).await;
        assert!(queued.queued());
        assert_eq!(pool.len(), 3);
        assert_eq!(pool.stats.saturated.load(Ordering::Relaxed), 1);
        // A stream that ends frees its connection's slot for the next one.
        let first = held.remove(0);
        let conn = first.pooled().clone();
        drop(first);
        drop(queued);
        let next = slot(&pool, 1, 2).await;
        assert!(Arc::ptr_eq(next.pooled(), &conn) && !next.queued());
        // A peer that lowers its limit (SETTINGS) is respected at the next checkout.
        conn.conn().max.store(1, Ordering::Relaxed);
        assert!(slot(&pool, 1, 2).await.queued());
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_key_bound_connections_are_not_pooled() {
        let pool = Pool::new(PoolLimits { max_keys: 2, ..limits() });
        let _a = slot(&pool, 1, 10).await;
        let _b = slot(&pool, 2, 10).await;
        let Ok(Checkout::Connect(leader)) = pool.checkout(&3).await else { panic!("connects") };
        assert!(!leader.pooled());
        let c = leader.finish(Fake::new(10));
        assert!(c.pooled().is_evicted());
        assert_eq!((pool.keys(), pool.len()), (2, 2));
        assert_eq!(pool.stats.unpooled.load(Ordering::Relaxed), 1);
        // Its task closes it as soon as its stream ends.
        let conn = c.pooled().clone();
        drop(c);
        assert_eq!(pool.until_retired(&conn).await, Retired::Evicted);
    }

    #[tokio::test(start_paused = true)]
    async fn one_owner_cannot_take_the_pools_keys() {
        // Keys 10..19 belong to owner 1, 20..29 to owner 2; 3 keys per owner.
        let pool = Pool::with_owners(PoolLimits { max_keys_per_owner: 3, ..limits() }, |k| k / 10);
        let mut mine = Vec::new();
        for k in [10, 11, 12] {
            mine.push(slot(&pool, k, 10).await);
        }
        let Ok(Checkout::Connect(leader)) = pool.checkout(&13).await else { panic!("connects") };
        assert!(!leader.pooled(), "owner 1's fourth key is not pooled");
        drop(leader);
        assert_eq!(pool.stats.unpooled.load(Ordering::Relaxed), 1);
        // Another owner still pools its keys.
        let _theirs = slot(&pool, 20, 10).await;
        assert_eq!(pool.keys(), 4);
        // A key that leaves gives its owner room again.
        let conn = mine[0].pooled().clone();
        drop(mine);
        assert!(pool.evict(&conn, Eviction::Closed));
        let Ok(Checkout::Connect(leader)) = pool.checkout(&13).await else { panic!("connects") };
        assert!(leader.pooled());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_retired_after_the_idle_timeout() {
        let pool = Arc::new(Pool::new(limits()));
        let s = slot(&pool, 1, 10).await;
        let conn = s.pooled().clone();
        let retired = tokio::spawn({
            let (pool, conn) = (pool.clone(), conn.clone());
            async move {
                let r = pool.until_retired(&conn).await;
                (r, Instant::now())
            }
        });
        let t0 = Instant::now();
        // Busy for 100 s: not idle, whatever the time.
        tokio::time::sleep(Duration::from_secs(100)).await;
        drop(s);
        let dropped = Instant::now();
        // A stream at 89 s of idleness resets the clock.
        tokio::time::sleep(Duration::from_secs(89)).await;
        drop(slot(&pool, 1, 10).await);
        let last = Instant::now();
        let (why, at) = retired.await.unwrap();
        assert_eq!(why, Retired::Idle);
        assert!(
            dropped > t0 && at >= last + Duration::from_secs(90) && at < last + Duration::from_secs(91),
            "{:?}",
            at - last
        );
        assert_eq!((pool.len(), pool.keys()), (0, 0));
        assert_eq!(pool.stats.evicted_idle.load(Ordering::Relaxed), 1);
        // The next stream makes a new connection.
        assert!(matches!(pool.checkout(&1).await, Ok(Checkout::Connect(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_connection_closes_when_its_last_stream_ends() {
        let pool = Pool::new(limits());
        let a = slot(&pool, 1, 10).await;
        let b = slot(&pool, 1, 10).await;
        let conn = a.pooled().clone();
        assert!(pool.evict(&conn, Eviction::ConnectTimeout));
        assert!(!pool.evict(&conn, Eviction::Keepalive), "counted once");
        assert_eq!(pool.stats.evicted_connect_timeout.load(Ordering::Relaxed), 1);
        assert_eq!(pool.stats.evicted_keepalive.load(Ordering::Relaxed), 0);
        // The next stream does not land on it.
        let Ok(Checkout::Connect(_)) = pool.checkout(&1).await else { panic!("evicted connection reused") };
        drop(a);
        let retired = pool.until_retired(&conn);
        tokio::pin!(retired);
        assert!(futures_util::poll!(retired.as_mut()).is_pending(), "one stream is still open");
        drop(b);
        assert_eq!(retired.await, Retired::Evicted);
    }

    #[tokio::test(start_paused = true)]
    async fn shedding_closes_only_idle_connections_of_matching_keys() {
        let pool = Pool::new(limits());
        let busy = slot(&pool, 1, 1).await;
        let idle = slot(&pool, 1, 1).await;
        let other = slot(&pool, 2, 1).await;
        let (idle_conn, other_conn) = (idle.pooled().clone(), other.pooled().clone());
        drop((idle, other));
        let released = AtomicUsize::new(0);
        let n = pool.shed_idle(
            |k| *k == 1,
            |_| {
                released.fetch_add(1, Ordering::Relaxed);
                true
            },
        );
        assert_eq!((n, released.load(Ordering::Relaxed)), (1, 1), "only key 1's idle connection");
        assert!(idle_conn.is_evicted() && !busy.pooled().is_evicted() && !other_conn.is_evicted());
        assert_eq!(pool.until_retired(&idle_conn).await, Retired::Evicted, "its task closes it");
        assert_eq!(pool.stats.evicted_shed.load(Ordering::Relaxed), 1);
        assert_eq!(pool.len(), 2);
        // Anyone's, now: key 2's idle one goes, the busy one stays.
        assert_eq!(pool.shed_idle(|_| true, |_| true), 1);
        assert_eq!((pool.len(), pool.keys()), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_stopped_taking_streams_is_replaced() {
        let pool = Pool::new(limits());
        let s = slot(&pool, 1, 10).await;
        s.conn().open.store(false, Ordering::Relaxed);
        assert!(matches!(pool.checkout(&1).await, Ok(Checkout::Connect(_))));
        assert!(s.pooled().is_evicted());
        assert_eq!(pool.stats.evicted_closed.load(Ordering::Relaxed), 1);
    }
}
