//! Who is calling: the caller's bearer token, checked by the Kubernetes API server with a
//! TokenReview (`authentication.k8s.io/v1`) for the CA's audience.
//!
//! The CA never verifies tokens itself: the API server knows the signing keys, whether the
//! pod or node the token is bound to still exists, and its expiry. What it answers is cached
//! briefly ([`CachedReviewer`]), keyed by a SHA-256 of the token (the token itself is never
//! kept), and only when the review succeeded: a node restarting with 250 pods presents one
//! token 250 times within a second, and one review serves them all (single flight: concurrent
//! requests with the same token wait for the one review in progress). An entry lives
//! [`DEFAULT_REVIEW_CACHE_TTL`] at most and never past the token's own `exp`, so a revoked
//! token (its pod deleted) stops working within that time. The cache holds at most
//! [`DEFAULT_REVIEW_CACHE_ENTRIES`]; when full, reviews go uncached (counted).
//!
//! Calls to the API server are bounded too: at most [`MAX_CONCURRENT_REVIEWS`] at once, each
//! given up after a timeout (the caller then gets `UNAVAILABLE`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
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

/// The claim of a node-bound token naming its node (Kubernetes 1.32+ adds it to pod-bound
/// tokens too).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The claims of a pod-bound token (a projected ServiceAccount token).
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// How long a successful review is reused at most.
pub const DEFAULT_REVIEW_CACHE_TTL: Duration = Duration::from_secs(10);
/// Reviews cached at most (about one per node asking within the TTL).
pub const DEFAULT_REVIEW_CACHE_ENTRIES: usize = 4096;
/// TokenReview calls in flight at once.
pub const MAX_CONCURRENT_REVIEWS: usize = 32;
/// A TokenReview call (including the wait for one of the slots above) is abandoned after this.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Tokens longer than this are refused without a review (kubelet's are about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

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

/// One cached review (or the review in progress, which concurrent requests wait for).
#[derive(Default)]
struct Slot {
    cell: OnceCell<Cached>,
}

#[derive(Clone)]
struct Cached {
    reviewed: Reviewed,
    until: Instant,
}

impl Slot {
    fn fresh(&self, now: Instant) -> bool {
        self.cell.get().is_none_or(|c| c.until > now)
    }
}

/// Counters of the review cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub reviews: AtomicU64,
    /// Reviews made without the cache because it was full.
    pub uncached: AtomicU64,
}

/// A [`TokenReviewer`] that reuses successful reviews (see the module documentation).
pub struct CachedReviewer {
    inner: Arc<dyn TokenReviewer>,
    ttl: Duration,
    max_entries: usize,
    slots: Mutex<HashMap<[u8; 32], Arc<Slot>>>,
    pub stats: CacheStats,
}

impl CachedReviewer {
    pub fn new(inner: Arc<dyn TokenReviewer>, ttl: Duration, max_entries: usize) -> CachedReviewer {
        CachedReviewer {
            inner,
            ttl,
            max_entries,
            slots: Mutex::new(HashMap::new()),
            stats: CacheStats::default(),
        }
    }

    pub fn entries(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The slot for `key`, a new one if there is none or it expired; `None` if the cache is full.
    fn slot(&self, key: [u8; 32], now: Instant) -> Option<Arc<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(&key).filter(|s| s.fresh(now)) {
            return Some(slot.clone());
        }
        slots.remove(&key);
        if slots.len() >= self.max_entries {
            // Expired entries, and failed reviews nobody waits for, make room.
            slots.retain(|_, s| match s.cell.get() {
                Some(c) => c.until > now,
                None => Arc::strong_count(s) > 1,
            });
            if slots.len() >= self.max_entries {
                return None;
            }
        }
        let slot = Arc::new(Slot::default());
        slots.insert(key, slot.clone());
        Some(slot)
    }

    fn forget(&self, key: &[u8; 32], slot: &Arc<Slot>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.get(key).is_some_and(|s| Arc::ptr_eq(s, slot) && s.cell.get().is_none()) {
            slots.remove(key);
        }
    }

    async fn cached_review(&self, token: &str, audience: &str) -> Result<Reviewed, ReviewError> {
        let key = cache_key(token, audience);
        let Some(slot) = self.slot(key, Instant::now()) else {
            self.stats.uncached.fetch_add(1, Ordering::Relaxed);
            self.stats.reviews.fetch_add(1, Ordering::Relaxed);
            return self.inner.review(token, audience).await;
        };
        let mut reviewed_here = false;
        let result = slot
            .cell
            .get_or_try_init(|| async {
                reviewed_here = true;
                self.stats.reviews.fetch_add(1, Ordering::Relaxed);
                let reviewed = self.inner.review(token, audience).await?;
                let until = cache_until(token, Instant::now(), self.ttl);
                Ok::<_, ReviewError>(Cached { reviewed, until })
            })
            .await;
        match result {
            Ok(cached) => {
                if !reviewed_here {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                }
                Ok(cached.reviewed.clone())
            }
            Err(e) => {
                self.forget(&key, &slot);
                Err(e)
            }
        }
    }
}

impl TokenReviewer for CachedReviewer {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> ReviewFuture<'a> {
        Box::pin(self.cached_review(token, audience))
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

    #[tokio::test(start_paused = true)]
    async fn successful_reviews_are_reused_until_the_ttl() {
        let fake = Arc::new(FakeReviewer::with([("t1".to_string(), Ok(node_agent(Some("n1"), None)))]));
        let cache = CachedReviewer::new(fake.clone(), Duration::from_secs(10), 16);
        for _ in 0..3 {
            cache.review("t1", "sluice-ca").await.unwrap();
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 2);
        tokio::time::advance(Duration::from_secs(11)).await;
        cache.review("t1", "sluice-ca").await.unwrap();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "reviewed again after the TTL");
        // Another audience is another key (the fake refuses it).
        assert!(cache.review("t1", "other").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_not_cached() {
        let fake = Arc::new(FakeReviewer::default());
        let cache = CachedReviewer::new(fake.clone(), Duration::from_secs(10), 16);
        for _ in 0..3 {
            assert!(matches!(cache.review("bad", "sluice-ca").await, Err(ReviewError::Rejected(_))));
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
        assert_eq!(cache.entries(), 0, "a failed review leaves nothing behind");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_with_one_token_share_one_review() {
        let mut fake = FakeReviewer::with([("t1".to_string(), Ok(node_agent(Some("n1"), None)))]);
        fake.delay = Duration::from_millis(100);
        let fake = Arc::new(fake);
        let cache = Arc::new(CachedReviewer::new(fake.clone(), Duration::from_secs(10), 16));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.review("t1", "sluice-ca").await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_is_bounded() {
        let fake =
            Arc::new(FakeReviewer::with((0..4).map(|i| (format!("t{i}"), Ok(node_agent(Some("n1"), None))))));
        let cache = CachedReviewer::new(fake.clone(), Duration::from_secs(10), 2);
        for i in 0..4 {
            cache.review(&format!("t{i}"), "sluice-ca").await.unwrap();
        }
        assert_eq!(cache.entries(), 2);
        assert_eq!(cache.stats.uncached.load(Ordering::Relaxed), 2);
        // Once the entries expire, they make room.
        tokio::time::advance(Duration::from_secs(11)).await;
        cache.review("t3", "sluice-ca").await.unwrap();
        assert_eq!(cache.stats.uncached.load(Ordering::Relaxed), 2);
        assert!(cache.entries() <= 2);
    }
}
