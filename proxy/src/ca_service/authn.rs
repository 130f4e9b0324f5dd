//! Who is calling: the caller's bearer token, checked by the Kubernetes API server with a
//! TokenReview (`authentication.k8s.io/v1`) for the CA's audience.
//!
//! The CA never trusts a token it has not had reviewed: the API server knows the signing keys,
//! whether the pod or node the token is bound to still exists, and its expiry. Reviews are
//! the one thing anybody who can reach the port could make the CA do without a credential, so
//! they are guarded:
//!
//! - before any review, the token's own claims, read without verification, may only reject
//!   (`claims`): it must look like a ServiceAccount JWT for the CA's audience, not expired, of
//!   the node agents' ServiceAccount. A tenant's token, a random string or an expired token
//!   never reaches the API server;
//! - a review costs its source address a token of [`PER_SOURCE_REVIEWS`] and the CA one of
//!   [`GLOBAL_REVIEWS`] (over either: `RESOURCE_EXHAUSTED`), in bounded tables;
//! - [`CachedReviewer`] keeps what the API server answered, keyed by a SHA-256 of audience and
//!   token (the token itself is never kept): a node agent's valid token for at most
//!   [`DEFAULT_REVIEW_CACHE_TTL`] and never past its `exp` (a node restarting with 250 pods
//!   presents one token 250 times within a second; one review serves them all, and concurrent
//!   requests wait for the one in progress), a rejected token for
//!   [`DEFAULT_FAILURE_CACHE_TTL`] (sending it again costs nothing). Valid reviews of any other
//!   user are not kept: they are refused at once and must not take room. The cache holds at
//!   most [`DEFAULT_REVIEW_CACHE_ENTRIES`]; expired entries leave through an index by expiry,
//!   never a scan, and when it is full of live entries reviews go uncached (counted).
//!
//! Calls to the API server are bounded too: at most [`MAX_CONCURRENT_REVIEWS`] at once, each
//! given up after a timeout (the caller then gets `UNAVAILABLE`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::kube::api::{Api, PostParams};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use super::limits::{RateConfig, RateLimiter};

/// The claim of a node-bound token naming its node (Kubernetes 1.32+ adds it to pod-bound
/// tokens too).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The claims of a pod-bound token (a projected ServiceAccount token).
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// How long a successful review is reused at most.
pub const DEFAULT_REVIEW_CACHE_TTL: Duration = Duration::from_secs(10);
/// How long a rejected token is answered from the cache.
pub const DEFAULT_FAILURE_CACHE_TTL: Duration = Duration::from_secs(5);
/// Reviews cached at most (about one per node asking within the TTL, and the rejections of the
/// last few seconds, which the rates below bound to a few hundred).
pub const DEFAULT_REVIEW_CACHE_ENTRIES: usize = 4096;
/// TokenReviews one source address may cause: a node agent needs one per token per
/// [`DEFAULT_REVIEW_CACHE_TTL`] (its token changes hourly), so this is ample for one and
/// keeps a source without a valid token from costing the API server more than a trickle.
pub const PER_SOURCE_REVIEWS: RateConfig = RateConfig { rate: 1.0, burst: 10 };
/// TokenReviews of the whole CA replica, whatever the sources.
pub const GLOBAL_REVIEWS: RateConfig = RateConfig { rate: 100.0, burst: 200 };
/// Source addresses with a review bucket at most.
pub const MAX_REVIEW_SOURCES: usize = 16 * 1024;
/// TokenReview calls in flight at once.
pub const MAX_CONCURRENT_REVIEWS: usize = 32;
/// A TokenReview call (including the wait for one of the slots above) is abandoned after this.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Tokens longer than this are refused without a review (kubelet's are about 1 KiB, and the
/// whole header list of a request is at most 8 KiB).
pub const MAX_TOKEN_BYTES: usize = 4 * 1024;

/// What the API server says about an authenticated token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reviewed {
    /// `system:serviceaccount:<namespace>:<name>` for a ServiceAccount token.
    pub username: String,
    /// The audiences the token is valid for, among those asked for.
    pub audiences: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Reviewed {
    /// The first value of an `extra` claim, if non-empty.
    pub fn claim(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(|v| v.first()).map(String::as_str).filter(|s| !s.is_empty())
    }

    /// `(namespace, name)` when the user is a ServiceAccount.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':').filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The API server says the token is not valid (expired, wrong audience, bad signature,
    /// bound object gone); its reason.
    #[error("{0}")]
    Rejected(String),
    /// The review could not be made (API server unreachable, slow, or the CA lacks the right).
    #[error("{0}")]
    Unavailable(String),
    /// Not made: the source, or the CA as a whole, is over its rate of reviews.
    #[error("too many token reviews {}; retry in {} ms", scope.describe(), retry_after.as_millis())]
    Throttled { retry_after: Duration, scope: ThrottleScope },
}

/// Whose review rate was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleScope {
    Source,
    Global,
}

impl ThrottleScope {
    fn describe(self) -> &'static str {
        match self {
            ThrottleScope::Source => "from this address",
            ThrottleScope::Global => "at this CA",
        }
    }
}

pub type ReviewFuture<'a> = Pin<Box<dyn Future<Output = Result<Reviewed, ReviewError>> + Send + 'a>>;

/// Checks a token for an audience. Behind a trait so that tests need no API server.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> ReviewFuture<'a>;
}

/// The `Bearer` token of a request's `authorization` metadata.
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// TokenReviews against the Kubernetes API server.
pub struct KubeTokenReviewer {
    api: Api<TokenReview>,
    slots: Semaphore,
    timeout: Duration,
}

impl KubeTokenReviewer {
    pub fn new(client: ::kube::Client) -> KubeTokenReviewer {
        KubeTokenReviewer {
            api: Api::all(client),
            slots: Semaphore::new(MAX_CONCURRENT_REVIEWS),
            timeout: REVIEW_TIMEOUT,
        }
    }

    async fn call(&self, token: &str, audience: &str) -> Result<Reviewed, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![audience.to_string()]),
            },
            ..TokenReview::default()
        };
        let made = tokio::time::timeout(self.timeout, async {
            // The semaphore is never closed; were it, the call would go ahead unbounded.
            let _slot = self.slots.acquire().await.ok();
            self.api.create(&PostParams::default(), &review).await
        })
        .await;
        let answer = match made {
            Err(_) => {
                return Err(ReviewError::Unavailable(format!(
                    "the TokenReview got no answer within {} s",
                    self.timeout.as_secs()
                )))
            }
            Ok(Err(::kube::Error::Api(status))) if status.code == 403 => {
                return Err(ReviewError::Unavailable(format!(
                    "the API server refused the TokenReview ({}): the CA's ServiceAccount needs `create` on \
                     tokenreviews.authentication.k8s.io",
                    status.message
                )))
            }
            Ok(Err(e)) => return Err(ReviewError::Unavailable(format!("TokenReview failed: {e}"))),
            Ok(Ok(answer)) => answer,
        };
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why =
                status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "the token is not valid".into());
            return Err(ReviewError::Rejected(why));
        }
        let user = status.user.unwrap_or_default();
        Ok(Reviewed {
            username: user.username.unwrap_or_default(),
            audiences: status.audiences.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        })
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> ReviewFuture<'a> {
        Box::pin(self.call(token, audience))
    }
}

/// A finished review, as kept: the caller's identity, or the API server's refusal.
#[derive(Clone, Debug)]
enum Outcome {
    Valid(Reviewed),
    Rejected(String),
}

impl Outcome {
    fn into_result(self) -> Result<Reviewed, ReviewError> {
        match self {
            Outcome::Valid(r) => Ok(r),
            Outcome::Rejected(why) => Err(ReviewError::Rejected(why)),
        }
    }
}

/// One cached review, or the review in progress that concurrent requests wait for.
#[derive(Default)]
struct Slot {
    cell: OnceCell<(Outcome, Instant)>,
}

impl Slot {
    /// Not finished yet, or finished and still valid at `now`.
    fn usable(&self, now: Instant) -> bool {
        self.cell.get().is_none_or(|(_, until)| *until > now)
    }
}

struct Entry {
    slot: Arc<Slot>,
    /// Its key in [`Cache::expiry`].
    expires: (Instant, u64),
}

/// The entries, and an index of them by expiry so that making room never scans the table.
#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], Entry>,
    expiry: BTreeMap<(Instant, u64), [u8; 32]>,
    seq: u64,
    /// Entries looked at while making room (what must stay O(1) per request).
    examined: u64,
}

impl Cache {
    fn remove(&mut self, key: &[u8; 32]) {
        if let Some(e) = self.entries.remove(key) {
            self.expiry.remove(&e.expires);
        }
    }

    fn insert(&mut self, key: [u8; 32], slot: Arc<Slot>, until: Instant) {
        self.remove(&key);
        self.seq += 1;
        let expires = (until, self.seq);
        self.expiry.insert(expires, key);
        self.entries.insert(key, Entry { slot, expires });
    }

    /// Moves `key`'s expiry to `until`, if it is still `slot`'s entry.
    fn expire_at(&mut self, key: &[u8; 32], slot: &Arc<Slot>, until: Instant) {
        if self.entries.get(key).is_some_and(|e| Arc::ptr_eq(&e.slot, slot)) {
            self.insert(*key, slot.clone(), until);
        }
    }

    /// Drops the entries that expired by `now`, oldest first: O(log n) each.
    fn drop_expired(&mut self, now: Instant) {
        while let Some((&(at, seq), key)) = self.expiry.first_key_value() {
            self.examined += 1;
            if at > now {
                break;
            }
            let key = *key;
            self.expiry.remove(&(at, seq));
            self.entries.remove(&key);
        }
    }
}

/// Counters of the review cache and its limits.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Requests answered from a cached review (valid or rejected).
    pub hits: AtomicU64,
    /// Reviews sent to the API server.
    pub reviews: AtomicU64,
    /// Reviews made without the cache because it was full.
    pub uncached: AtomicU64,
    /// Reviews not made because the source or the CA as a whole was over its review rate.
    pub throttled: AtomicU64,
}

/// How the review cache is bounded (see the module documentation).
#[derive(Debug, Clone)]
pub struct ReviewLimits {
    /// How long a successful review of a node agent's token is reused at most.
    pub ttl: Duration,
    /// How long a rejected token is answered from the cache.
    pub failure_ttl: Duration,
    pub max_entries: usize,
    /// Reviews a source address can cause.
    pub per_source: RateConfig,
    /// Reviews of the whole CA.
    pub global: RateConfig,
    /// Source addresses tracked at once.
    pub max_sources: usize,
    /// Only reviews naming this user are kept (`system:serviceaccount:<ns>:<name>` of the
    /// node agents): a tenant's valid token for the CA's audience is refused right after its
    /// review and must not take a place in the cache.
    pub cache_user: String,
}

impl ReviewLimits {
    pub fn for_node_account(namespace: &str, name: &str) -> ReviewLimits {
        ReviewLimits {
            ttl: DEFAULT_REVIEW_CACHE_TTL,
            failure_ttl: DEFAULT_FAILURE_CACHE_TTL,
            max_entries: DEFAULT_REVIEW_CACHE_ENTRIES,
            per_source: PER_SOURCE_REVIEWS,
            global: GLOBAL_REVIEWS,
            max_sources: MAX_REVIEW_SOURCES,
            cache_user: format!("system:serviceaccount:{namespace}:{name}"),
        }
    }
}

/// A [`TokenReviewer`] with a cache and rate limits in front (see the module documentation).
pub struct CachedReviewer {
    inner: Arc<dyn TokenReviewer>,
    limits: ReviewLimits,
    cache: Mutex<Cache>,
    per_source: RateLimiter<IpAddr>,
    global: RateLimiter<()>,
    pub stats: CacheStats,
}

impl CachedReviewer {
    pub fn new(inner: Arc<dyn TokenReviewer>, limits: ReviewLimits) -> CachedReviewer {
        CachedReviewer {
            inner,
            per_source: RateLimiter::new(limits.per_source, limits.max_sources),
            global: RateLimiter::new(limits.global, 1),
            limits,
            cache: Mutex::default(),
            stats: CacheStats::default(),
        }
    }

    pub fn entries(&self) -> usize {
        self.lock().entries.len()
    }

    /// Source addresses with a review bucket now.
    pub fn tracked_sources(&self) -> usize {
        self.per_source.tracked()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot for `key`: the one in the cache if usable, else a new one; `None` if the cache
    /// is full of entries that have not expired.
    fn slot(&self, key: [u8; 32], now: Instant) -> Option<Arc<Slot>> {
        let mut cache = self.lock();
        if let Some(e) = cache.entries.get(&key) {
            if e.slot.usable(now) {
                return Some(e.slot.clone());
            }
            cache.remove(&key);
        }
        if cache.entries.len() >= self.limits.max_entries {
            cache.drop_expired(now);
            if cache.entries.len() >= self.limits.max_entries {
                return None;
            }
        }
        let slot = Arc::new(Slot::default());
        // Until the review ends; a review never outlives its timeout by much.
        cache.insert(key, slot.clone(), now + REVIEW_TIMEOUT + Duration::from_secs(1));
        Some(slot)
    }

    /// A review may be sent for `source`: within its rate and the CA's.
    fn admit(&self, source: IpAddr) -> Result<(), ReviewError> {
        let now = std::time::Instant::now();
        let limited = |retry_after, scope| {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            Err(ReviewError::Throttled { retry_after, scope })
        };
        if let Err(wait) = self.per_source.check(&source, now) {
            return limited(wait, ThrottleScope::Source);
        }
        if let Err(wait) = self.global.check(&(), now) {
            return limited(wait, ThrottleScope::Global);
        }
        Ok(())
    }

    /// Reviews `token` for `audience`, asked from `source`: from the cache when possible, else
    /// (within the rates) from the API server.
    pub async fn review_from(
        &self,
        token: &str,
        audience: &str,
        source: IpAddr,
    ) -> Result<Reviewed, ReviewError> {
        let key = cache_key(token, audience);
        let Some(slot) = self.slot(key, Instant::now()) else {
            self.stats.uncached.fetch_add(1, Ordering::Relaxed);
            self.admit(source)?;
            self.stats.reviews.fetch_add(1, Ordering::Relaxed);
            return self.inner.review(token, audience).await;
        };
        let mut reviewed_here = false;
        let result = slot
            .cell
            .get_or_try_init(|| async {
                reviewed_here = true;
                self.admit(source)?;
                self.stats.reviews.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                match self.inner.review(token, audience).await {
                    Ok(r) => {
                        let until = cache_until(token, now, self.limits.ttl);
                        Ok((Outcome::Valid(r), until))
                    }
                    // The API server's word on this token: the same token gets it again.
                    Err(ReviewError::Rejected(why)) => {
                        Ok((Outcome::Rejected(why), now + self.limits.failure_ttl))
                    }
                    // Not about the token (the API server is down, or we are over a rate):
                    // whoever asks next tries again.
                    Err(e) => Err(e),
                }
            })
            .await;
        match result {
            Ok((outcome, until)) => {
                if reviewed_here {
                    let keep = match outcome {
                        Outcome::Valid(r) => r.username == self.limits.cache_user,
                        Outcome::Rejected(_) => true,
                    };
                    let mut cache = self.lock();
                    if keep {
                        cache.expire_at(&key, &slot, *until);
                    } else if cache.entries.get(&key).is_some_and(|e| Arc::ptr_eq(&e.slot, &slot)) {
                        cache.remove(&key);
                    }
                } else {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                }
                outcome.clone().into_result()
            }
            Err(e) => {
                let mut cache = self.lock();
                if cache
                    .entries
                    .get(&key)
                    .is_some_and(|e| Arc::ptr_eq(&e.slot, &slot) && e.slot.cell.get().is_none())
                {
                    cache.remove(&key);
                }
                Err(e)
            }
        }
    }
}

fn cache_key(token: &str, audience: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(audience.as_bytes());
    ctx.update(&[0]);
    ctx.update(token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// When a review made `now` stops being reused: after `ttl`, and never after the token's own
/// `exp` claim (read without verification: the API server has just verified it).
fn cache_until(token: &str, now: Instant, ttl: Duration) -> Instant {
    let by_ttl = now + ttl;
    let Some(exp) = token_expiry(token) else { return by_ttl };
    let unix_now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let left = (exp as f64 - unix_now).max(0.0);
    by_ttl.min(now + Duration::from_secs_f64(left))
}

/// The `exp` claim (Unix seconds) of a JWT, if it is one.
pub fn token_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?.get("exp")?.as_i64()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A reviewer answering from a table of tokens, counting its calls.
    #[derive(Default)]
    pub(crate) struct FakeReviewer {
        pub tokens: Mutex<HashMap<String, Result<Reviewed, ReviewError>>>,
        pub calls: AtomicUsize,
        /// Each review waits this long (to make concurrent requests overlap).
        pub delay: Duration,
    }

    impl FakeReviewer {
        pub fn with(
            tokens: impl IntoIterator<Item = (String, Result<Reviewed, ReviewError>)>,
        ) -> FakeReviewer {
            FakeReviewer { tokens: Mutex::new(tokens.into_iter().collect()), ..FakeReviewer::default() }
        }
    }

    impl TokenReviewer for FakeReviewer {
        fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> ReviewFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                let answer = self.tokens.lock().unwrap().get(token).cloned();
                let mut reviewed =
                    answer.unwrap_or_else(|| Err(ReviewError::Rejected("unknown token".into())))?;
                // As the API server does: the audiences in the answer are the intersection.
                if !reviewed.audiences.iter().any(|a| a == audience) {
                    return Err(ReviewError::Rejected(format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the target audiences [{audience:?}]]",
                        reviewed.audiences
                    )));
                }
                reviewed.audiences.retain(|a| a == audience);
                Ok(reviewed)
            })
        }
    }

    pub(crate) fn node_agent(node: Option<&str>, pod: Option<&str>) -> Reviewed {
        let mut extra = BTreeMap::new();
        if let Some(node) = node {
            extra.insert(NODE_NAME_EXTRA.to_string(), vec![node.to_string()]);
        }
        if let Some(pod) = pod {
            extra.insert(POD_NAME_EXTRA.to_string(), vec![pod.to_string()]);
            extra.insert(POD_UID_EXTRA.to_string(), vec![format!("uid-{pod}")]);
        }
        Reviewed {
            username: "system:serviceaccount:sluice-system:sluice".into(),
            audiences: vec!["sluice-ca".into()],
            extra,
        }
    }

    fn jwt(exp: i64) -> String {
        let enc =
            |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.sig",
            enc(serde_json::json!({"alg": "RS256"})),
            enc(serde_json::json!({"exp": exp, "sub": "x"}))
        )
    }

    fn unix_now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn bearer_tokens_are_read_from_the_metadata() {
        let mut md = MetadataMap::new();
        assert_eq!(bearer_token(&md), None);
        md.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&md), Some("abc.def"));
        md.insert("authorization", "bearer   xyz ".parse().unwrap());
        assert_eq!(bearer_token(&md), Some("xyz"));
        md.insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert_eq!(bearer_token(&md), None);
        md.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&md), None);
    }

    #[test]
    fn service_account_usernames_are_parsed() {
        let r = node_agent(Some("n1"), None);
        assert_eq!(r.service_account(), Some(("sluice-system", "sluice")));
        assert_eq!(r.claim(NODE_NAME_EXTRA), Some("n1"));
        let user = Reviewed { username: "alice".into(), ..Reviewed::default() };
        assert_eq!(user.service_account(), None);
        let odd = Reviewed { username: "system:serviceaccount:ns:".into(), ..Reviewed::default() };
        assert_eq!(odd.service_account(), None);
    }

    #[test]
    fn the_expiry_of_a_jwt_is_read() {
        assert_eq!(token_expiry(&jwt(1234)), Some(1234));
        assert_eq!(token_expiry("not-a-jwt"), None);
        assert_eq!(token_expiry("a.!!!.c"), None);
        let now = Instant::now();
        let ttl = Duration::from_secs(10);
        assert_eq!(cache_until("opaque", now, ttl), now + ttl);
        assert_eq!(cache_until(&jwt(unix_now() + 3600), now, ttl), now + ttl);
        let soon = cache_until(&jwt(unix_now() + 2), now, ttl);
        assert!(soon <= now + Duration::from_secs(2), "the token's expiry comes first");
        assert_eq!(cache_until(&jwt(unix_now() - 5), now, ttl), now, "an expired token is never reused");
    }

    const SRC: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 243, 0, 1));

    fn limits(max_entries: usize) -> ReviewLimits {
        ReviewLimits {
            max_entries,
            per_source: RateConfig { rate: 1000.0, burst: 1000 },
            global: RateConfig { rate: 1000.0, burst: 1000 },
            ..ReviewLimits::for_node_account("sluice-system", "sluice")
        }
    }

    fn cached(fake: &Arc<FakeReviewer>, limits: ReviewLimits) -> CachedReviewer {
        CachedReviewer::new(fake.clone(), limits)
    }

    #[tokio::test(start_paused = true)]
    async fn successful_reviews_are_reused_until_the_ttl() {
        let fake = Arc::new(FakeReviewer::with([("t1".to_string(), Ok(node_agent(Some("n1"), None)))]));
        let cache = cached(&fake, limits(16));
        for _ in 0..3 {
            cache.review_from("t1", "sluice-ca", SRC).await.unwrap();
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 2);
        tokio::time::advance(Duration::from_secs(11)).await;
        cache.review_from("t1", "sluice-ca", SRC).await.unwrap();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "reviewed again after the TTL");
        // Another audience is another key (the fake refuses it).
        assert!(cache.review_from("t1", "other", SRC).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_are_cached_briefly() {
        let fake = Arc::new(FakeReviewer::default());
        let cache = cached(&fake, limits(16));
        for _ in 0..3 {
            assert!(matches!(
                cache.review_from("bad", "sluice-ca", SRC).await,
                Err(ReviewError::Rejected(_))
            ));
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1, "the same bad token is answered from the cache");
        tokio::time::advance(DEFAULT_FAILURE_CACHE_TTL + Duration::from_millis(1)).await;
        assert!(cache.review_from("bad", "sluice-ca", SRC).await.is_err());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "and reviewed again once that expired");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_api_server_is_not_cached() {
        let fake = Arc::new(FakeReviewer::with([(
            "t".to_string(),
            Err(ReviewError::Unavailable("connection refused".into())),
        )]));
        let cache = cached(&fake, limits(16));
        for _ in 0..3 {
            assert!(matches!(
                cache.review_from("t", "sluice-ca", SRC).await,
                Err(ReviewError::Unavailable(_))
            ));
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
        assert_eq!(cache.entries(), 0, "nothing is left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_node_agents_reviews_are_kept() {
        // A tenant's own ServiceAccount token for the CA's audience is valid, and refused right
        // after: it must not take a place in the cache.
        let mut tenant = node_agent(Some("n1"), None);
        tenant.username = "system:serviceaccount:shop:web".into();
        let fake = Arc::new(FakeReviewer::with([("tenant".to_string(), Ok(tenant))]));
        let cache = cached(&fake, limits(16));
        let r = cache.review_from("tenant", "sluice-ca", SRC).await.unwrap();
        assert_eq!(r.service_account(), Some(("shop", "web")));
        assert_eq!(cache.entries(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_with_one_token_share_one_review() {
        let mut fake = FakeReviewer::with([("t1".to_string(), Ok(node_agent(Some("n1"), None)))]);
        fake.delay = Duration::from_millis(100);
        let fake = Arc::new(fake);
        let cache = Arc::new(cached(&fake, limits(16)));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.review_from("t1", "sluice-ca", SRC).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_is_bounded_and_expired_entries_make_room() {
        let fake =
            Arc::new(FakeReviewer::with((0..4).map(|i| (format!("t{i}"), Ok(node_agent(Some("n1"), None))))));
        let cache = cached(&fake, limits(2));
        for i in 0..4 {
            cache.review_from(&format!("t{i}"), "sluice-ca", SRC).await.unwrap();
        }
        assert_eq!(cache.entries(), 2);
        assert_eq!(cache.stats.uncached.load(Ordering::Relaxed), 2);
        // Once the entries expire, they make room.
        tokio::time::advance(Duration::from_secs(11)).await;
        cache.review_from("t3", "sluice-ca", SRC).await.unwrap();
        assert_eq!(cache.stats.uncached.load(Ordering::Relaxed), 2);
        assert!(cache.entries() <= 2);
        let c = cache.lock();
        assert_eq!(c.entries.len(), c.expiry.len(), "one expiry record per entry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cache_is_not_scanned() {
        // Finding: a full cache was scanned whole, under the lock, on every request. Fill it
        // with live entries, then make uncached requests: each looks at one entry (the oldest,
        // still live), whatever the size.
        let n = 5000;
        let fake = Arc::new(FakeReviewer::with(
            (0..n + 100).map(|i| (format!("t{i}"), Ok(node_agent(Some("n1"), None)))),
        ));
        // Rates that let all of them through (the buckets run on the real clock).
        let unlimited = RateConfig { rate: 1000.0, burst: 100_000 };
        let cache = cached(&fake, ReviewLimits { per_source: unlimited, global: unlimited, ..limits(n) });
        for i in 0..n {
            cache.review_from(&format!("t{i}"), "sluice-ca", SRC).await.unwrap();
        }
        assert_eq!(cache.entries(), n);
        let before = cache.lock().examined;
        for i in n..n + 100 {
            cache.review_from(&format!("t{i}"), "sluice-ca", SRC).await.unwrap();
        }
        assert_eq!(cache.stats.uncached.load(Ordering::Relaxed), 100);
        assert_eq!(cache.lock().examined - before, 100, "one entry looked at per request");
    }

    #[tokio::test(start_paused = true)]
    async fn reviews_are_rate_limited_by_source_and_globally() {
        let fake = Arc::new(FakeReviewer::default());
        let cache = cached(
            &fake,
            ReviewLimits {
                per_source: RateConfig { rate: 0.01, burst: 3 },
                global: RateConfig { rate: 0.01, burst: 5 },
                ..limits(64)
            },
        );
        let other: IpAddr = "10.243.0.2".parse().unwrap();
        for i in 0..3 {
            let r = cache.review_from(&format!("bad{i}"), "sluice-ca", SRC).await;
            assert!(matches!(r, Err(ReviewError::Rejected(_))), "{r:?}");
        }
        // A different token each time (so no cached rejection helps): the source's burst is spent.
        let r = cache.review_from("bad3", "sluice-ca", SRC).await;
        assert!(
            matches!(r, Err(ReviewError::Throttled { scope: ThrottleScope::Source, retry_after }) if retry_after > Duration::ZERO),
            "{r:?}"
        );
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "the API server saw only the source's share");
        // A known bad token is still answered, from the cache, at no cost.
        assert!(matches!(cache.review_from("bad0", "sluice-ca", SRC).await, Err(ReviewError::Rejected(_))));
        // Another source has its own share, until the CA's global one is spent.
        for i in 0..2 {
            assert!(matches!(
                cache.review_from(&format!("other{i}"), "sluice-ca", other).await,
                Err(ReviewError::Rejected(_))
            ));
        }
        let r = cache.review_from("other2", "sluice-ca", other).await;
        assert!(matches!(r, Err(ReviewError::Throttled { scope: ThrottleScope::Global, .. })), "{r:?}");
        assert_eq!(cache.stats.throttled.load(Ordering::Relaxed), 2);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 5);
    }
}
