//! DNS for ServiceEntries with `resolution: DNS`: sluice resolves the entry's host (for a
//! wildcard entry, the request's Host header) when it sends a request there.
//!
//! The host can come from a client, so every resource a lookup takes is bounded:
//! - each lookup has a deadline ([`DnsConfig::lookup_timeout`]) and runs on the data runtime as
//!   a task of its own (hickory's resolver, reading /etc/resolv.conf at start: no blocking
//!   thread per lookup, unlike getaddrinfo);
//! - one lookup per host at a time: concurrent requests for a host wait for the same answer;
//! - the host must be a DNS name (letters, digits and `-` in labels of at most 63 characters,
//!   at most 253 in all); anything else fails at once without a lookup (`dns_invalid_hosts`),
//!   so a Host header cannot put arbitrary bytes (or 64 KiB of them) into the cache;
//! - at most [`DnsConfig::max_in_flight`] hosts are looked up at once on the node, at most
//!   [`DnsConfig::pod_max_in_flight`] for one source pod and
//!   [`DnsConfig::service_entry_max_in_flight`] for one ServiceEntry; beyond that the request
//!   fails at once (503) and `dns_lookups_refused`, `dns_lookups_refused_pod` or
//!   `dns_lookups_refused_service_entry` counts it;
//! - answers are cached for the record's TTL, clamped to [`DnsConfig::min_ttl`] ..
//!   [`DnsConfig::max_ttl`]; failures for `min_ttl`; at most [`DnsConfig::max_entries`] hosts,
//!   [`DnsConfig::pod_max_entries`] of them for the pod whose request first looked a host up and
//!   [`DnsConfig::service_entry_max_entries`] for its ServiceEntry. A pod (or ServiceEntry) at
//!   its share makes room among its own entries (`dns_cache_evictions_pod`,
//!   `dns_cache_evictions_service_entry`); a full cache drops expired entries, then the
//!   soonest-expiring entry of the pod holding the most (`dns_cache_evictions`).
//!
//! The shares are what keeps one pod from taking everyone's DNS: a pod resolving random hosts
//! under a wildcard ServiceEntry whose server never answers holds at most its share of the
//! lookups in flight, and a pod flooding the cache with new hosts evicts its own entries, never
//! those of a pod within its share.
//!
//! When a refresh fails, the last good answer is served for another `min_ttl` (a resolver's
//! hiccup does not take a working external service down).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hickory_resolver::{
    config::{ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
    Resolver, TokioResolver,
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, warn};

/// Limits of the ServiceEntry resolver.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// A lookup (all of its tries) that takes longer fails.
    pub lookup_timeout: Duration,
    /// Shortest time an answer is reused, whatever its TTL (and how long a failure is).
    pub min_ttl: Duration,
    /// Longest time an answer is reused, whatever its TTL.
    pub max_ttl: Duration,
    /// Hosts kept in the cache.
    pub max_entries: usize,
    /// Hosts looked up at the same time.
    pub max_in_flight: usize,
    /// Lookups one source pod's requests may have started and not finished.
    pub pod_max_in_flight: usize,
    /// Cache entries charged to one source pod (the pod whose request looked the host up).
    pub pod_max_entries: usize,
    /// Lookups in flight for the hosts of one ServiceEntry.
    pub service_entry_max_in_flight: usize,
    /// Cache entries for the hosts of one ServiceEntry.
    pub service_entry_max_entries: usize,
}

impl Default for DnsConfig {
    /// A quarter of the node's lookups and cache per source pod, as for connections
    /// (`admission`), and a half per ServiceEntry (many pods may use one entry).
    fn default() -> Self {
        DnsConfig {
            lookup_timeout: Duration::from_secs(5),
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            max_entries: 1024,
            max_in_flight: 64,
            pod_max_in_flight: 16,
            pod_max_entries: 256,
            service_entry_max_in_flight: 32,
            service_entry_max_entries: 512,
        }
    }
}

/// Who a lookup is for: the lookups in flight and the cache entries are counted against both.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    /// The source pod, "namespace/name".
    pub pod: &'a str,
    /// The ServiceEntry whose host is resolved, "namespace/name".
    pub service_entry: &'a str,
}

/// What the resolver did (`sluice status`, `/metrics`).
#[derive(Debug, Default, Serialize)]
pub struct DnsCounters {
    /// Lookups sent to the resolver.
    pub lookups: AtomicU64,
    /// Requests answered from the cache.
    pub cache_hits: AtomicU64,
    /// Requests that waited for a lookup another request had started.
    pub coalesced: AtomicU64,
    pub failures: AtomicU64,
    pub timeouts: AtomicU64,
    /// Requests failed because `max_in_flight` lookups were running.
    pub lookups_refused: AtomicU64,
    /// Requests failed because their source pod had `pod_max_in_flight` lookups running.
    pub lookups_refused_pod: AtomicU64,
    /// Requests failed because their ServiceEntry had `service_entry_max_in_flight` running.
    pub lookups_refused_service_entry: AtomicU64,
    /// Entries dropped to stay within `max_entries`.
    pub cache_evictions: AtomicU64,
    /// Entries a pod at `pod_max_entries` dropped to make room for its next host.
    pub cache_evictions_pod: AtomicU64,
    /// Entries dropped to keep a ServiceEntry within `service_entry_max_entries`.
    pub cache_evictions_service_entry: AtomicU64,
    /// Requests whose host is not a DNS name (not looked up).
    pub invalid_hosts: AtomicU64,
    /// Refreshes that failed while the previous answer was served again.
    pub stale_served: AtomicU64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    #[error("DNS lookup of {host} failed: {reason}")]
    Failed { host: String, reason: String },
    #[error("DNS lookup of {host} timed out after {after:?}")]
    Timeout { host: String, after: Duration },
    #[error("DNS lookup of {host} not started: {limit} lookups are already running {scope}")]
    TooManyLookups { host: String, limit: usize, scope: String },
    #[error("{host:?} is not a DNS name: {reason}")]
    InvalidHost { host: String, reason: &'static str },
    #[error("DNS resolver unavailable: {0}")]
    NoResolver(String),
}

type Answer = Result<Arc<[IpAddr]>, DnsError>;

enum Entry {
    Done {
        answer: Answer,
        expires: Instant,
    },
    /// A lookup is running; its answer is published on the channel. `stale` is the previous
    /// answer, served again if the lookup fails.
    Pending {
        rx: watch::Receiver<Option<Answer>>,
        stale: Option<Arc<[IpAddr]>>,
    },
}

/// A pod and a ServiceEntry, owned: what a cache entry or a lookup in flight is charged to.
#[derive(Debug, Clone)]
struct Owner {
    pod: Arc<str>,
    service_entry: Arc<str>,
}

impl Owner {
    fn of(who: Asker<'_>) -> Owner {
        Owner { pod: who.pod.into(), service_entry: who.service_entry.into() }
    }
}

/// A cached host: its entry and who it is charged to (the asker whose request first looked it
/// up; a refresh by someone else does not move the charge).
struct Slot {
    entry: Entry,
    owner: Owner,
}

/// What one pod or ServiceEntry holds.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    entries: usize,
    in_flight: usize,
}

pub struct Dns {
    inner: Arc<Inner>,
}

struct Inner {
    resolver: Result<TokioResolver, String>,
    cfg: DnsConfig,
    cache: Mutex<Cache>,
    counters: DnsCounters,
}

#[derive(Default)]
struct Cache {
    slots: HashMap<Arc<str>, Slot>,
    in_flight: usize,
    /// Usage by source pod and by ServiceEntry; a key goes when its usage is back to zero, so
    /// these hold at most one key per slot.
    pods: HashMap<Arc<str>, Usage>,
    service_entries: HashMap<Arc<str>, Usage>,
}

impl Cache {
    fn pod(&self, pod: &str) -> Usage {
        self.pods.get(pod).copied().unwrap_or_default()
    }

    fn service_entry(&self, entry: &str) -> Usage {
        self.service_entries.get(entry).copied().unwrap_or_default()
    }

    /// Adds `entries` cache entries and `in_flight` lookups (either may be negative) to the
    /// usage of `owner`'s pod and ServiceEntry.
    fn charge(&mut self, owner: &Owner, entries: isize, in_flight: isize) {
        for (map, key) in [(&mut self.pods, &owner.pod), (&mut self.service_entries, &owner.service_entry)] {
            let usage = map.entry(key.clone()).or_default();
            usage.entries = usage.entries.saturating_add_signed(entries);
            usage.in_flight = usage.in_flight.saturating_add_signed(in_flight);
            if usage.entries == 0 && usage.in_flight == 0 {
                map.remove(key);
            }
        }
    }

    /// Drops the answered entry that expires soonest among those `pick` selects (an expired
    /// one, if any). Lookups in flight are never dropped (they are bounded by the in-flight
    /// limits). Returns whether one was dropped.
    fn evict_soonest(&mut self, pick: impl Fn(&Owner) -> bool) -> bool {
        let soonest = self
            .slots
            .iter()
            .filter(|(_, slot)| pick(&slot.owner))
            .filter_map(|(k, slot)| match slot.entry {
                Entry::Done { expires, .. } => Some((expires, k.clone())),
                Entry::Pending { .. } => None,
            })
            .min();
        match soonest {
            Some((_, key)) => {
                self.remove(&key);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, key: &str) -> Option<Slot> {
        let slot = self.slots.remove(key)?;
        self.charge(&slot.owner, -1, 0);
        Some(slot)
    }

    /// The pod holding the most entries.
    fn heaviest_pod(&self) -> Option<Arc<str>> {
        self.pods.iter().max_by_key(|(_, usage)| usage.entries).map(|(pod, _)| pod.clone())
    }
}

impl Dns {
    /// A resolver configured from /etc/resolv.conf (read now, on the control path). If that
    /// fails, every lookup fails with the reason (and it is logged once).
    pub fn from_system(cfg: DnsConfig) -> Dns {
        let resolver = TokioResolver::builder_tokio().map_err(|e| e.to_string()).and_then(|mut b| {
            tune(b.options_mut(), &cfg);
            b.build().map_err(|e| e.to_string())
        });
        if let Err(e) = &resolver {
            warn!(error = %e, "cannot read the system's DNS configuration; ServiceEntries with DNS resolution will fail");
        }
        Dns::with_resolver(resolver, cfg)
    }

    /// A resolver asking the given servers (tests).
    pub fn with_config(config: ResolverConfig, cfg: DnsConfig) -> Dns {
        let mut b = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
        tune(b.options_mut(), &cfg);
        Dns::with_resolver(b.build().map_err(|e| e.to_string()), cfg)
    }

    fn with_resolver(resolver: Result<TokioResolver, String>, cfg: DnsConfig) -> Dns {
        Dns {
            inner: Arc::new(Inner {
                resolver,
                cfg,
                cache: Mutex::default(),
                counters: DnsCounters::default(),
            }),
        }
    }

    pub fn counters(&self) -> &DnsCounters {
        &self.inner.counters
    }

    /// The addresses of `host` with `port`, for `who`: from the cache, from a lookup in
    /// flight, or from a new lookup (each bounded, see the module documentation).
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        who: Asker<'_>,
    ) -> Result<Arc<[SocketAddr]>, DnsError> {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, port)].as_slice()));
        }
        let ips = self.lookup(host, who).await?;
        Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
    }

    async fn lookup(&self, host: &str, who: Asker<'_>) -> Answer {
        let inner = &self.inner;
        let key: Arc<str> = match dns_name(host) {
            Ok(name) => name.into(),
            Err(reason) => {
                inner.counters.invalid_hosts.fetch_add(1, Ordering::Relaxed);
                return Err(DnsError::InvalidHost { host: shorten(host), reason });
            }
        };
        // The lock is released at the end of this block, before any await.
        let rx = 'locked: {
            let mut cache = inner.cache.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let stale = match cache.slots.get(&key).map(|slot| &slot.entry) {
                Some(Entry::Done { answer, expires }) if *expires > now => {
                    inner.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return answer.clone();
                }
                Some(Entry::Done { answer, .. }) => answer.as_ref().ok().cloned(),
                Some(Entry::Pending { rx, .. }) => {
                    // Someone else's lookup of this host: wait for its answer.
                    inner.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                    break 'locked rx.clone();
                }
                None => None,
            };
            inner.admit_lookup(&cache, &key, who)?;
            let asker = Owner::of(who);
            let owner = match cache.slots.get(&key) {
                Some(slot) => slot.owner.clone(),
                None => {
                    inner.make_room(&mut cache, who);
                    cache.charge(&asker, 1, 0);
                    asker.clone()
                }
            };
            let (tx, rx) = watch::channel(None);
            cache.slots.insert(key.clone(), Slot { entry: Entry::Pending { rx: rx.clone(), stale }, owner });
            cache.in_flight += 1;
            cache.charge(&asker, 0, 1);
            inner.counters.lookups.fetch_add(1, Ordering::Relaxed);
            // A task of its own, which also settles the cache: the lookup is shared, so the
            // request that started it going away must not cancel it for the others.
            let task = inner.clone();
            tokio::spawn(async move {
                let outcome = query(task.resolver.clone(), &key, task.cfg.lookup_timeout).await;
                let answer = task.settle(&key, &asker, outcome);
                let _ = tx.send(Some(answer));
            });
            rx
        };
        wait(rx).await
    }

    /// Hosts in the cache (lookups in flight included).
    pub fn len(&self) -> usize {
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner()).slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Whether `who` may start one more lookup: the node's, its pod's and its ServiceEntry's
    /// lookups in flight are each under their limit. Refusals are counted by scope.
    fn admit_lookup(&self, cache: &Cache, key: &str, who: Asker<'_>) -> Result<(), DnsError> {
        let cfg = &self.cfg;
        let refused = |counter: &AtomicU64, limit: usize, scope: String| {
            counter.fetch_add(1, Ordering::Relaxed);
            Err(DnsError::TooManyLookups { host: key.to_string(), limit, scope })
        };
        let c = &self.counters;
        if cache.in_flight >= cfg.max_in_flight {
            return refused(&c.lookups_refused, cfg.max_in_flight, "on this node".into());
        }
        if cache.pod(who.pod).in_flight >= cfg.pod_max_in_flight {
            return refused(&c.lookups_refused_pod, cfg.pod_max_in_flight, format!("for pod {}", who.pod));
        }
        if cache.service_entry(who.service_entry).in_flight >= cfg.service_entry_max_in_flight {
            let scope = format!("for ServiceEntry {}", who.service_entry);
            return refused(&c.lookups_refused_service_entry, cfg.service_entry_max_in_flight, scope);
        }
        Ok(())
    }

    /// Records the outcome of the lookup of `key`, which `asker` started, in the cache and
    /// returns what callers get.
    fn settle(
        &self,
        key: &Arc<str>,
        asker: &Owner,
        outcome: Result<(Arc<[IpAddr]>, Instant), DnsError>,
    ) -> Answer {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.in_flight = cache.in_flight.saturating_sub(1);
        cache.charge(asker, 0, -1);
        // The slot is there: pending slots are never evicted.
        let (stale, owner) = match cache.slots.remove(key) {
            Some(Slot { entry: Entry::Pending { stale, .. }, owner }) => (stale, owner),
            Some(Slot { owner, .. }) => (None, owner),
            None => {
                cache.charge(asker, 1, 0);
                (None, asker.clone())
            }
        };
        let (answer, expires) = match outcome {
            Ok((ips, valid_until)) => {
                let ttl =
                    valid_until.saturating_duration_since(now).clamp(self.cfg.min_ttl, self.cfg.max_ttl);
                (Ok(ips), now + ttl)
            }
            Err(e) => {
                match &e {
                    DnsError::Timeout { .. } => self.counters.timeouts.fetch_add(1, Ordering::Relaxed),
                    _ => self.counters.failures.fetch_add(1, Ordering::Relaxed),
                };
                match stale {
                    Some(ips) => {
                        self.counters.stale_served.fetch_add(1, Ordering::Relaxed);
                        debug!(host = %key, error = %e, "DNS refresh failed; serving the previous answer");
                        (Ok(ips), now + self.cfg.min_ttl)
                    }
                    None => (Err(e), now + self.cfg.min_ttl),
                }
            }
        };
        cache
            .slots
            .insert(key.clone(), Slot { entry: Entry::Done { answer: answer.clone(), expires }, owner });
        answer
    }

    /// Frees a place for one more host charged to `who`: first within its pod's and its
    /// ServiceEntry's shares (among their own entries), then node-wide: expired answers, then
    /// the soonest-expiring answer of the pod that holds the most. A pod within its share
    /// therefore never loses an entry to another pod's new hosts unless it holds the most.
    fn make_room(&self, cache: &mut Cache, who: Asker<'_>) {
        let (cfg, c) = (&self.cfg, &self.counters);
        if cache.pod(who.pod).entries >= cfg.pod_max_entries && cache.evict_soonest(|o| &*o.pod == who.pod) {
            c.cache_evictions_pod.fetch_add(1, Ordering::Relaxed);
        }
        if cache.service_entry(who.service_entry).entries >= cfg.service_entry_max_entries
            && cache.evict_soonest(|o| &*o.service_entry == who.service_entry)
        {
            c.cache_evictions_service_entry.fetch_add(1, Ordering::Relaxed);
        }
        if cache.slots.len() < cfg.max_entries {
            return;
        }
        let now = Instant::now();
        let expired: Vec<Arc<str>> = cache
            .slots
            .iter()
            .filter(|(_, slot)| matches!(slot.entry, Entry::Done { expires, .. } if expires <= now))
            .map(|(k, _)| k.clone())
            .collect();
        let mut evicted = expired.len();
        for key in expired {
            cache.remove(&key);
        }
        while cache.slots.len() >= cfg.max_entries {
            let Some(heaviest) = cache.heaviest_pod() else { break };
            if !cache.evict_soonest(|o| o.pod == heaviest) {
                break;
            }
            evicted += 1;
        }
        c.cache_evictions.fetch_add(evicted as u64, Ordering::Relaxed);
    }
}

/// `host` as the name sluice looks up: lower case, without the root's trailing dot. It must be
/// a host name as DNS knows it (RFC 1123): labels of letters, digits and `-` (not first or
/// last), 1 to 63 characters each, 253 in all, the last not all digits (that would be an
/// address written oddly, such as `127.1`, which no resolver should be asked about).
fn dns_name(host: &str) -> Result<String, &'static str> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("an empty label");
        }
        if label.len() > 63 {
            return Err("a label longer than 63 characters");
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err("characters other than letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label that starts or ends with '-'");
        }
    }
    if name.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err("an all-numeric last label");
    }
    Ok(name.to_ascii_lowercase())
}

/// A host for an error message: at most 64 characters of it.
fn shorten(host: &str) -> String {
    match host.char_indices().nth(64) {
        Some((end, _)) => format!("{}…", &host[..end]),
        None => host.to_string(),
    }
}

/// sluice's cache is the only one (one TTL policy, one bound); the resolver's own attempts
/// stay inside the lookup deadline.
fn tune(opts: &mut ResolverOpts, cfg: &DnsConfig) {
    opts.cache_size = 0;
    opts.attempts = 2;
    opts.timeout = cfg.lookup_timeout / 2;
}

/// One lookup with its deadline: the addresses and until when they are valid (the TTL).
async fn query(
    resolver: Result<TokioResolver, String>,
    host: &str,
    after: Duration,
) -> Result<(Arc<[IpAddr]>, Instant), DnsError> {
    let resolver = resolver.map_err(DnsError::NoResolver)?;
    // An absolute name: the host is the entry's (or the request's) full name, never one to
    // complete with the node's search domains.
    let name = format!("{host}.");
    match tokio::time::timeout(after, resolver.lookup_ip(name.as_str())).await {
        Err(_) => Err(DnsError::Timeout { host: host.to_string(), after }),
        Ok(Err(e)) => Err(DnsError::Failed { host: host.to_string(), reason: e.to_string() }),
        Ok(Ok(lookup)) => {
            let ips: Arc<[IpAddr]> = lookup.iter().collect();
            if ips.is_empty() {
                return Err(DnsError::Failed { host: host.to_string(), reason: "no addresses".into() });
            }
            Ok((ips, lookup.valid_until()))
        }
    }
}

/// Waits for the answer of a lookup another request started.
async fn wait(mut rx: watch::Receiver<Option<Answer>>) -> Answer {
    match rx.wait_for(Option::is_some).await {
        Ok(answer) => answer.clone().expect("waited for Some"),
        // The lookup task ended without an answer (it panicked, or the runtime is stopping).
        Err(_) => {
            Err(DnsError::Failed { host: String::new(), reason: "the lookup ended without an answer".into() })
        }
    }
}

#[cfg(test)]
#[path = "dns_tests.rs"]
mod tests;
