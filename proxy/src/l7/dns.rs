//! DNS for ServiceEntries with `resolution: DNS`: sluice resolves the entry's host (for a
//! wildcard entry, the request's Host header) when it sends a request there.
//!
//! The host can come from a client, so every resource a lookup takes is bounded:
//! - each lookup has a deadline ([`DnsConfig::lookup_timeout`]) and runs on the data runtime as
//!   a task of its own (hickory's resolver, reading /etc/resolv.conf at start: no blocking
//!   thread per lookup, unlike getaddrinfo);
//! - one lookup per host at a time: concurrent requests for a host wait for the same answer;
//! - at most [`DnsConfig::max_in_flight`] hosts are looked up at once; beyond that the request
//!   fails at once (503) and `dns_lookups_refused` counts it;
//! - answers are cached for the record's TTL, clamped to [`DnsConfig::min_ttl`] ..
//!   [`DnsConfig::max_ttl`]; failures for `min_ttl`; at most [`DnsConfig::max_entries`] hosts
//!   (expired entries go first, then those that expire soonest; `dns_cache_evictions`).
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
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            lookup_timeout: Duration::from_secs(5),
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            max_entries: 1024,
            max_in_flight: 64,
        }
    }
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
    /// Entries dropped to stay within `max_entries`.
    pub cache_evictions: AtomicU64,
    /// Refreshes that failed while the previous answer was served again.
    pub stale_served: AtomicU64,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    #[error("DNS lookup of {host} failed: {reason}")]
    Failed { host: String, reason: String },
    #[error("DNS lookup of {host} timed out after {after:?}")]
    Timeout { host: String, after: Duration },
    #[error("DNS lookup of {host} not started: {limit} lookups are already running")]
    TooManyLookups { host: String, limit: usize },
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
    entries: HashMap<Arc<str>, Entry>,
    in_flight: usize,
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

    /// The addresses of `host` with `port`: from the cache, from a lookup in flight, or from a
    /// new lookup (each bounded, see the module documentation).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Arc<[SocketAddr]>, DnsError> {
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, port)].as_slice()));
        }
        let ips = self.lookup(host).await?;
        Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
    }

    async fn lookup(&self, host: &str) -> Answer {
        let inner = &self.inner;
        let key: Arc<str> = Arc::from(host.trim_end_matches('.').to_ascii_lowercase());
        // The lock is released at the end of this block, before any await.
        let rx = 'locked: {
            let mut cache = inner.cache.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let stale = match cache.entries.get(&key) {
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
            if cache.in_flight >= inner.cfg.max_in_flight {
                inner.counters.lookups_refused.fetch_add(1, Ordering::Relaxed);
                return Err(DnsError::TooManyLookups {
                    host: key.to_string(),
                    limit: inner.cfg.max_in_flight,
                });
            }
            if !cache.entries.contains_key(&key) {
                inner.make_room(&mut cache, now);
            }
            let (tx, rx) = watch::channel(None);
            cache.entries.insert(key.clone(), Entry::Pending { rx: rx.clone(), stale });
            cache.in_flight += 1;
            inner.counters.lookups.fetch_add(1, Ordering::Relaxed);
            // A task of its own, which also settles the cache: the lookup is shared, so the
            // request that started it going away must not cancel it for the others.
            let task = inner.clone();
            tokio::spawn(async move {
                let outcome = query(task.resolver.clone(), &key, task.cfg.lookup_timeout).await;
                let answer = task.settle(&key, outcome);
                let _ = tx.send(Some(answer));
            });
            rx
        };
        wait(rx).await
    }

    /// Hosts in the cache (lookups in flight included).
    pub fn len(&self) -> usize {
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner()).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Records the outcome of the lookup of `key` in the cache and returns what callers get.
    fn settle(&self, key: &Arc<str>, outcome: Result<(Arc<[IpAddr]>, Instant), DnsError>) -> Answer {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.in_flight = cache.in_flight.saturating_sub(1);
        let stale = match cache.entries.remove(key) {
            Some(Entry::Pending { stale, .. }) => stale,
            _ => None,
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
        cache.entries.insert(key.clone(), Entry::Done { answer: answer.clone(), expires });
        answer
    }

    /// Frees a place for one more host: expired answers first, then those expiring soonest.
    /// Lookups in flight are never dropped (they are bounded by `max_in_flight`).
    fn make_room(&self, cache: &mut Cache, now: Instant) {
        if cache.entries.len() < self.cfg.max_entries {
            return;
        }
        let before = cache.entries.len();
        cache.entries.retain(|_, e| !matches!(e, Entry::Done { expires, .. } if *expires <= now));
        while cache.entries.len() >= self.cfg.max_entries {
            let soonest = cache
                .entries
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Done { expires, .. } => Some((*expires, k.clone())),
                    Entry::Pending { .. } => None,
                })
                .min();
            match soonest {
                Some((_, k)) => {
                    cache.entries.remove(&k);
                }
                None => break,
            }
        }
        let evicted = before - cache.entries.len();
        self.counters.cache_evictions.fetch_add(evicted as u64, Ordering::Relaxed);
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
