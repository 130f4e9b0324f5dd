//! The key sets behind `jwksUri` (and, for a rule with neither `jwks` nor `jwksUri`, behind the
//! issuer's OpenID configuration), fetched off the data path and cached.
//!
//! The control path tells the cache which URLs the model uses ([`Jwks::sync`], on every model);
//! a task of its own ([`Jwks::run`]) fetches each new URL at once, refreshes it every
//! [`REFRESH`] (Istio's default), and retries a failure after 1 s, doubling up to 60 s. A
//! failed refresh keeps the last good set, so a key server's hiccup rejects no valid token; a
//! URL never fetched yet has no keys, and a token for it gets a 401 naming why. A request that
//! arrives while a URL's first fetch runs waits for it, up to the rule's `timeout`, rather than
//! failing at once right after a RequestAuthentication was applied.
//!
//! Bounds: [`MAX_URLS`] URLs (further ones are not fetched and counted), [`MAX_IN_FLIGHT`]
//! fetches at once, the rule's `timeout` per fetch (connect, request and body together), and
//! [`super::keys::MAX_JWKS_BYTES`] per answer (read no further). The data path only reads
//! (`ArcSwap` loads under a read lock held for a hash probe).
//!
//! Where the URL's host names a Service of the model (`name.ns.svc.cluster.local`, `name.ns.svc`,
//! `name.ns`, or a ClusterIP), sluice connects to one of its ready endpoints itself: it runs in
//! the node's network namespace, where cluster DNS and ClusterIPs may not be reachable. Any
//! other host is resolved with the system resolver.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use super::keys::{KeySet, MAX_JWKS_BYTES};
use crate::discovery::{JwksSource, Model};

/// How often a key set is fetched again (Istio's default, `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// The most URLs the cache fetches; the model's further ones are refused (and counted).
pub const MAX_URLS: usize = 256;
/// Fetches running at once.
pub const MAX_IN_FLIGHT: usize = 8;
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What a URL's keys are looked up by, with what the URL is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Want {
    url: String,
    /// The URL is an OpenID configuration whose `jwks_uri` holds the keys.
    discovery: bool,
}

struct Slot {
    want: Want,
    timeout: Mutex<Duration>,
    keys: ArcSwapOption<KeySet>,
    /// Why the last fetch failed (cleared by a success).
    error: ArcSwapOption<String>,
    state: Mutex<SlotState>,
    /// Bumped after every fetch, so that a request can wait for the first one.
    fetched: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug)]
struct SlotState {
    next: Instant,
    failures: u32,
    running: bool,
    last_success: Option<SystemTime>,
}

/// Counters on `/status`.
#[derive(Debug, Default, Serialize)]
pub struct JwksCounters {
    pub jwks_fetches_ok: AtomicU64,
    pub jwks_fetches_failed: AtomicU64,
    /// URLs of the model beyond [`MAX_URLS`], not fetched.
    pub jwks_urls_refused: AtomicU64,
}

/// One URL as `GET /jwks` shows it.
#[derive(Debug, Serialize)]
pub struct JwksView {
    pub url: String,
    pub discovery: bool,
    pub keys: Option<usize>,
    pub skipped_keys: Vec<String>,
    pub last_success_unix: Option<u64>,
    pub error: Option<String>,
    pub failures: u32,
}

/// The cache of fetched key sets.
pub struct Jwks {
    slots: RwLock<HashMap<String, Arc<Slot>>>,
    wake: Notify,
    in_flight: Arc<Semaphore>,
    pub counters: JwksCounters,
    model: Arc<ArcSwap<Model>>,
    tls: Arc<crate::l7::tls_origin::TlsOrigin>,
}

impl Jwks {
    pub fn new(model: Arc<ArcSwap<Model>>, tls: Arc<crate::l7::tls_origin::TlsOrigin>) -> Arc<Jwks> {
        Arc::new(Jwks {
            slots: RwLock::default(),
            wake: Notify::new(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            counters: JwksCounters::default(),
            model,
            tls,
        })
    }

    /// The keys for `source` (data path). An inline set is returned as it is; a fetched one
    /// from the cache, waiting up to `wait` for a first fetch still under way.
    pub async fn keys(&self, source: &JwksSource, wait: Duration) -> Result<Arc<KeySet>, Arc<str>> {
        let url = match source {
            JwksSource::Inline { keys, .. } => return Ok(keys.clone()),
            JwksSource::Uri(u) | JwksSource::Discovery(u) => u,
        };
        let Some(slot) = self.slots.read().expect("jwks lock").get(url).cloned() else {
            return Err(format!("{url} is not fetched: more than {MAX_URLS} key set URLs in the mesh").into());
        };
        if let Some(keys) = slot.keys.load_full() {
            return Ok(keys);
        }
        let mut fetched = slot.fetched.subscribe();
        if *fetched.borrow_and_update() == 0 {
            // First fetch still to come or under way: wait for it, briefly.
            let _ = tokio::time::timeout(wait, fetched.changed()).await;
            if let Some(keys) = slot.keys.load_full() {
                return Ok(keys);
            }
        }
        Err(match slot.error.load_full() {
            Some(e) => format!("{url}: {e}").into(),
            None => format!("{url}: not fetched yet").into(),
        })
    }

    /// Makes the cache fetch exactly the URLs `model` uses (control path).
    pub fn sync(&self, model: &Model) {
        let mut wanted: HashMap<Want, Duration> = HashMap::new();
        let mut refused = 0u64;
        for ra in model.all_request_authentications() {
            for rule in &ra.rules {
                let want = match &rule.jwks {
                    JwksSource::Inline { .. } => continue,
                    JwksSource::Uri(u) => Want { url: u.clone(), discovery: false },
                    JwksSource::Discovery(u) => Want { url: u.clone(), discovery: true },
                };
                if !wanted.contains_key(&want) && wanted.len() >= MAX_URLS {
                    refused += 1;
                    continue;
                }
                // The longest timeout asked for a URL is the one used.
                let t = wanted.entry(want).or_insert(rule.timeout);
                *t = (*t).max(rule.timeout);
            }
        }
        if refused > 0 {
            self.counters.jwks_urls_refused.fetch_add(refused, Ordering::Relaxed);
            warn!(refused, limit = MAX_URLS, "RequestAuthentications name more key set URLs than sluice fetches; tokens for the others are rejected");
        }
        let mut added = false;
        {
            let mut slots = self.slots.write().expect("jwks lock");
            slots.retain(|url, slot| wanted.keys().any(|w| &w.url == url && *w == slot.want));
            for (want, timeout) in wanted {
                match slots.get(&want.url) {
                    Some(slot) => *slot.timeout.lock().expect("slot lock") = timeout,
                    None => {
                        added = true;
                        slots.insert(
                            want.url.clone(),
                            Arc::new(Slot {
                                want,
                                timeout: Mutex::new(timeout),
                                keys: ArcSwapOption::empty(),
                                error: ArcSwapOption::empty(),
                                state: Mutex::new(SlotState {
                                    next: Instant::now(),
                                    failures: 0,
                                    running: false,
                                    last_success: None,
                                }),
                                fetched: tokio::sync::watch::channel(0).0,
                            }),
                        );
                    }
                }
            }
        }
        if added {
            self.wake.notify_one();
        }
    }

    /// Fetches what is due, forever (spawn it once, on a runtime).
    pub async fn run(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let mut next_due = now + REFRESH;
            let slots: Vec<Arc<Slot>> = self.slots.read().expect("jwks lock").values().cloned().collect();
            for slot in slots {
                let due = {
                    let mut st = slot.state.lock().expect("slot lock");
                    if st.running {
                        false
                    } else if st.next <= now {
                        st.running = true;
                        true
                    } else {
                        next_due = next_due.min(st.next);
                        false
                    }
                };
                if due {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let Ok(_permit) = this.in_flight.clone().acquire_owned().await else { return };
                        this.refresh(&slot).await;
                        this.wake.notify_one();
                    });
                }
            }
            let sleep = next_due.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    async fn refresh(&self, slot: &Slot) {
        let timeout = *slot.timeout.lock().expect("slot lock");
        let result = tokio::time::timeout(timeout, self.fetch(&slot.want))
            .await
            .unwrap_or_else(|_| Err(format!("no complete answer within {} ms", timeout.as_millis())));
        let mut st = slot.state.lock().expect("slot lock");
        st.running = false;
        match result {
            Ok(keys) => {
                self.counters.jwks_fetches_ok.fetch_add(1, Ordering::Relaxed);
                let changed = slot.keys.load().as_ref().is_none_or(|old| old.len() != keys.len());
                if changed || st.failures > 0 {
                    info!(url = %slot.want.url, keys = keys.len(), skipped = ?keys.skipped, "JWKS fetched");
                }
                slot.keys.store(Some(Arc::new(keys)));
                slot.error.store(None);
                st.failures = 0;
                st.last_success = Some(SystemTime::now());
                st.next = Instant::now() + REFRESH;
            }
            Err(e) => {
                self.counters.jwks_fetches_failed.fetch_add(1, Ordering::Relaxed);
                st.failures += 1;
                let delay =
                    RETRY_FIRST.saturating_mul(1 << st.failures.min(7).saturating_sub(1)).min(RETRY_MAX);
                st.next = Instant::now() + delay;
                // Logged the first time and when the reason changes, not at every retry.
                let same = slot.error.load().as_deref().is_some_and(|old| *old == e);
                if !same {
                    let kept = slot.keys.load().is_some();
                    warn!(url = %slot.want.url, error = %e, keeping_last_good_keys = kept, retry_in_ms = delay.as_millis() as u64, "JWKS fetch failed");
                }
                slot.error.store(Some(Arc::new(e)));
            }
        }
        drop(st);
        slot.fetched.send_modify(|n| *n += 1);
    }

    async fn fetch(&self, want: &Want) -> Result<KeySet, String> {
        let body = self.get(&want.url).await?;
        let text = if want.discovery {
            #[derive(serde::Deserialize)]
            struct OpenId {
                jwks_uri: String,
            }
            let doc: OpenId = serde_json::from_slice(&body)
                .map_err(|e| format!("the OpenID configuration has no usable jwks_uri: {e}"))?;
            self.get(&doc.jwks_uri).await.map_err(|e| format!("jwks_uri {}: {e}", doc.jwks_uri))?
        } else {
            body
        };
        let text = std::str::from_utf8(&text).map_err(|_| "the key set is not UTF-8".to_string())?;
        KeySet::parse(text).map_err(|e| e.to_string())
    }

    /// GET `url`, 200 only, at most [`MAX_JWKS_BYTES`] of body.
    async fn get(&self, url: &str) -> Result<Bytes, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
        };
        let host =
            uri.host().ok_or_else(|| format!("{url:?} has no host"))?.trim_matches(['[', ']']).to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = self.resolve(&host, port).await?;
        let tcp =
            tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = uri.authority().map_or(host.as_str(), |a| a.as_str()).to_owned();
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "sluice-jwks")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        if https {
            let config = self.tls.config("jwks", None)?;
            let name =
                rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            exchange(TokioIo::new(tls), req, url).await
        } else {
            exchange(TokioIo::new(tcp), req, url).await
        }
    }

    /// Where to connect for `host:port`: a Service of the model by name or ClusterIP (one of its
    /// ready endpoints), an address as written, or the system resolver's first answer.
    async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        let model = self.model.load();
        if let Ok(ip) = host.parse::<IpAddr>() {
            if let Some(t) = model.service_for(ip, port) {
                return pick(t.endpoints())
                    .ok_or_else(|| format!("Service {}/{} has no ready endpoint", t.namespace(), t.name()));
            }
            return Ok(SocketAddr::new(ip, port));
        }
        let mut labels = host.trim_end_matches('.').split('.');
        if let (Some(name), Some(ns)) = (labels.next(), labels.next()) {
            let rest: Vec<&str> = labels.collect();
            if rest.is_empty() || rest[0] == "svc" {
                if let Some(t) = model.service_port(ns, name, port) {
                    return pick(t.endpoints())
                        .ok_or_else(|| format!("Service {ns}/{name} has no ready endpoint"));
                }
            }
        }
        drop(model);
        let mut addrs =
            tokio::net::lookup_host((host, port)).await.map_err(|e| format!("resolving {host}: {e}"))?;
        addrs.next().ok_or_else(|| format!("{host} has no address"))
    }

    /// Makes every URL due now (tests: a refresh without waiting [`REFRESH`]).
    #[cfg(test)]
    pub(crate) fn refresh_all_now(&self) {
        for slot in self.slots.read().expect("jwks lock").values() {
            slot.state.lock().expect("slot lock").next = Instant::now();
        }
        self.wake.notify_one();
    }

    /// Every URL with its state, for the admin API.
    pub fn view(&self) -> Vec<JwksView> {
        let mut out: Vec<JwksView> = self
            .slots
            .read()
            .expect("jwks lock")
            .values()
            .map(|s| {
                let st = s.state.lock().expect("slot lock");
                let keys = s.keys.load();
                JwksView {
                    url: s.want.url.clone(),
                    discovery: s.want.discovery,
                    keys: keys.as_ref().map(|k| k.len()),
                    skipped_keys: keys.as_ref().map(|k| k.skipped.clone()).unwrap_or_default(),
                    last_success_unix: st
                        .last_success
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    error: s.error.load().as_deref().cloned(),
                    failures: st.failures,
                }
            })
            .collect();
        out.sort_by(|a, b| a.url.cmp(&b.url));
        out
    }
}

fn pick(endpoints: &[SocketAddr]) -> Option<SocketAddr> {
    if endpoints.is_empty() {
        None
    } else {
        Some(endpoints[fastrand::usize(..endpoints.len())])
    }
}

/// One request on a fresh connection, the connection driven alongside it (and dropped with it:
/// nothing outlives the fetch's deadline). 200 only, at most [`MAX_JWKS_BYTES`] of body.
async fn exchange<T>(io: TokioIo<T>, req: http::Request<Empty<Bytes>>, url: &str) -> Result<Bytes, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    let work = async move {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("{url} answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading {url}: {e} (at most {MAX_JWKS_BYTES} bytes are read)"))?;
        Ok(body.to_bytes())
    };
    tokio::pin!(work, conn);
    tokio::select! {
        r = &mut work => r,
        c = &mut conn => match c {
            Err(e) => Err(format!("{url}: {e}")),
            // The connection ended first; the answer may still be complete in the buffers.
            Ok(()) => work.await,
        },
    }
}
