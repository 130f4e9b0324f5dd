//! Bound ServiceAccount tokens and `TokenReview` (`authentication.k8s.io/v1`), as
//! kube-apiserver answers a review of a projected token.
//!
//! A test mints a token ([`super::FakeApiServer::mint_token`]): an opaque random string the
//! server remembers with its ServiceAccount, audiences, expiry and what it is bound to (a node,
//! a pod, or both, like a kubelet-projected token on Kubernetes 1.30 and later, which names the
//! pod and the node it runs on). A review then decides as the real ServiceAccount token
//! authenticator does, in its order:
//!
//! 1. an unknown token: not authenticated (`invalid bearer token`);
//! 2. no audience in common with `spec.audiences` (which defaults to the API server's own
//!    audience): not authenticated, `token audiences ["a"] is invalid for the target audiences
//!    ["b"]`;
//! 3. expired (more than a minute ago: the authenticator allows go-jose's default leeway of one
//!    minute): `service account token has expired`;
//! 4. bound to a pod that is no longer in the store, or to a pod of that name with another
//!    UID (deleted and re-created): `service account token has been invalidated`.
//!
//! Otherwise the caller is authenticated as `system:serviceaccount:<ns>:<name>` with the
//! ServiceAccount groups, and `extra` carries `authentication.kubernetes.io/credential-id` and
//! the binding: `.../node-name` and `.../node-uid` for a node, `.../pod-name` and `.../pod-uid`
//! for a pod. The errors are aggregated as kube-apiserver's union authenticator writes them
//! (`[invalid bearer token, <reason>]`). Neither the ServiceAccount nor the node is looked up
//! (the fake server stores neither kind); the pod is.
//!
//! As on the real server, `status.authenticated` and `status.audiences` are left out when they
//! are false or empty (Go's `omitempty`), and `status.user` is `{}` for an unauthenticated
//! token: a client must read a missing `authenticated` as false.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, SystemTime},
};

use anyhow::Result;
use serde_json::{json, Value};

use crate::util;

/// The audience a review without `spec.audiences` checks against: the API server's own
/// (`--api-audiences`, by default the issuer), as on a kubeadm cluster.
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// How far past its expiry a token is still accepted (go-jose's `jwt.DefaultLeeway`, which the
/// ServiceAccount token validator uses).
pub const EXPIRY_LEEWAY: Duration = Duration::from_secs(60);

/// Most token reviews kept for [`super::FakeApiServer::token_reviews`] (the oldest go first;
/// [`super::FakeApiServer::token_review_count`] counts all).
pub const MAX_REVIEWS_KEPT: usize = 4096;

/// What a minted token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    /// (namespace, name) of the ServiceAccount.
    pub service_account: (String, String),
    /// The token's audiences (`aud`); a projected token has one, e.g. `sluice-ca`.
    pub audiences: Vec<String>,
    /// Lifetime from now (a projected token's `expirationSeconds`). A review accepts it for
    /// [`EXPIRY_LEEWAY`] more.
    pub expires_in: Duration,
    /// The node it is bound to or carries: `authentication.kubernetes.io/node-name`.
    pub node: Option<String>,
    /// (namespace, name, uid) of the pod it is bound to: `authentication.kubernetes.io/pod-name`
    /// and `pod-uid`. The pod must exist in the fake server with that UID for a review to
    /// succeed, as a bound token dies with its pod.
    pub pod: Option<(String, String, String)>,
}

impl TokenSpec {
    /// A token of ServiceAccount `namespace/name` for audience `sluice-ca`, valid one hour,
    /// bound to nothing.
    pub fn new(namespace: &str, name: &str) -> TokenSpec {
        TokenSpec {
            service_account: (namespace.to_string(), name.to_string()),
            audiences: vec!["sluice-ca".to_string()],
            expires_in: Duration::from_secs(3600),
            node: None,
            pod: None,
        }
    }

    /// Carries node `name` (node-bound, or pod-bound with the pod's node).
    pub fn node(mut self, name: &str) -> TokenSpec {
        self.node = Some(name.to_string());
        self
    }

    /// Bound to pod `namespace/name` with `uid`.
    pub fn pod(mut self, namespace: &str, name: &str, uid: &str) -> TokenSpec {
        self.pod = Some((namespace.to_string(), name.to_string(), uid.to_string()));
        self
    }

    /// Replaces the audiences.
    pub fn audiences(mut self, audiences: &[&str]) -> TokenSpec {
        self.audiences = audiences.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn expires_in(mut self, d: Duration) -> TokenSpec {
        self.expires_in = d;
        self
    }

    /// `system:serviceaccount:<ns>:<name>`.
    pub fn username(&self) -> String {
        let (ns, name) = &self.service_account;
        format!("system:serviceaccount:{ns}:{name}")
    }
}

/// One review the server answered: the request's `spec` (token included, as the server echoes
/// it) and the `status` it answered with.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenReviewRecord {
    pub spec: Value,
    pub status: Value,
}

impl TokenReviewRecord {
    pub fn authenticated(&self) -> bool {
        self.status["authenticated"] == true
    }

    /// `status.user.username`, if authenticated.
    pub fn username(&self) -> Option<&str> {
        self.status["user"]["username"].as_str()
    }

    /// `status.error`, if any.
    pub fn error(&self) -> Option<&str> {
        self.status["error"].as_str()
    }
}

struct Minted {
    spec: TokenSpec,
    expires_at: SystemTime,
    /// The JWT ID a real token carries (`credential-id` is `JTI=<id>`).
    jti: String,
}

/// Every minted token, stable made-up UIDs for ServiceAccounts and nodes (objects the fake
/// server does not store), and the log of reviews.
#[derive(Default)]
pub(crate) struct Tokens {
    minted: BTreeMap<String, Minted>,
    service_account_uids: BTreeMap<(String, String), String>,
    node_uids: BTreeMap<String, String>,
    reviews: VecDeque<TokenReviewRecord>,
    review_count: u64,
}

impl Tokens {
    pub fn mint(&mut self, spec: TokenSpec) -> Result<String> {
        let expires_at = SystemTime::now() + spec.expires_in;
        let jti = util::uuid_v4()?;
        let token = jwt_shaped(&spec, expires_at, &jti)?;
        let minted = Minted { expires_at, jti, spec };
        self.minted.insert(token.clone(), minted);
        Ok(token)
    }

    /// Moves the token's expiry past the leeway: the next review finds it expired.
    pub fn expire(&mut self, token: &str) -> bool {
        match self.minted.get_mut(token) {
            Some(m) => {
                m.expires_at = SystemTime::now() - EXPIRY_LEEWAY - Duration::from_secs(1);
                true
            }
            None => false,
        }
    }

    /// Forgets the token: the next review does not know it.
    pub fn revoke(&mut self, token: &str) -> bool {
        self.minted.remove(token).is_some()
    }

    pub fn reviews(&self) -> Vec<TokenReviewRecord> {
        self.reviews.iter().cloned().collect()
    }

    pub fn review_count(&self) -> u64 {
        self.review_count
    }

    /// Answers a review of `spec` (the request's `spec`), with `pod_uid` giving the UID of a
    /// stored pod. Returns the response's `status` and records the review.
    pub fn review(&mut self, spec: &Value, pod_uid: impl Fn(&str, &str) -> Option<String>) -> Result<Value> {
        let status = self.decide(spec, pod_uid)?;
        self.review_count += 1;
        if self.reviews.len() == MAX_REVIEWS_KEPT {
            self.reviews.pop_front();
        }
        self.reviews.push_back(TokenReviewRecord { spec: spec.clone(), status: status.clone() });
        Ok(status)
    }

    fn decide(&mut self, spec: &Value, pod_uid: impl Fn(&str, &str) -> Option<String>) -> Result<Value> {
        let token = spec["token"].as_str().unwrap_or_default();
        let mut wanted: Vec<String> = spec["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        if wanted.is_empty() {
            wanted.push(API_SERVER_AUDIENCE.to_string());
        }
        let refused = |reason: String| json!({"user": {}, "error": reason});
        let Some(m) = self.minted.get(token) else {
            return Ok(refused("invalid bearer token".into()));
        };
        let common: Vec<String> = m.spec.audiences.iter().filter(|a| wanted.contains(a)).cloned().collect();
        if common.is_empty() {
            return Ok(refused(format!(
                "[invalid bearer token, token audiences {} is invalid for the target audiences {}]",
                go_quoted(&m.spec.audiences),
                go_quoted(&wanted)
            )));
        }
        if SystemTime::now() > m.expires_at + EXPIRY_LEEWAY {
            return Ok(refused("[invalid bearer token, service account token has expired]".into()));
        }
        if let Some((ns, name, uid)) = &m.spec.pod {
            if pod_uid(ns, name).as_deref() != Some(uid.as_str()) {
                return Ok(refused(
                    "[invalid bearer token, service account token has been invalidated]".into(),
                ));
            }
        }
        let spec = m.spec.clone();
        let jti = m.jti.clone();
        let (ns, name) = &spec.service_account;
        let sa_uid = stable_uid(&mut self.service_account_uids, (ns.clone(), name.clone()))?;
        let mut extra = BTreeMap::new();
        extra.insert("authentication.kubernetes.io/credential-id", json!([format!("JTI={jti}")]));
        if let Some(node) = &spec.node {
            let node_uid = stable_uid(&mut self.node_uids, node.clone())?;
            extra.insert("authentication.kubernetes.io/node-name", json!([node]));
            extra.insert("authentication.kubernetes.io/node-uid", json!([node_uid]));
        }
        if let Some((_, pod, uid)) = &spec.pod {
            extra.insert("authentication.kubernetes.io/pod-name", json!([pod]));
            extra.insert("authentication.kubernetes.io/pod-uid", json!([uid]));
        }
        Ok(json!({
            "authenticated": true,
            "user": {
                "username": spec.username(),
                "uid": sa_uid,
                "groups": [
                    "system:serviceaccounts",
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated",
                ],
                "extra": extra,
            },
            "audiences": common,
        }))
    }
}

fn stable_uid<K: Ord>(map: &mut BTreeMap<K, String>, key: K) -> Result<String> {
    if let Some(u) = map.get(&key) {
        return Ok(u.clone());
    }
    let u = util::uuid_v4()?;
    map.insert(key, u.clone());
    Ok(u)
}

/// A string list as Go's `%q` prints a `[]string`: `["a" "b"]`.
fn go_quoted(items: &[String]) -> String {
    let quoted: Vec<String> =
        items.iter().map(|s| serde_json::to_string(s).expect("strings serialize")).collect();
    format!("[{}]", quoted.join(" "))
}

/// A token shaped as kube-apiserver's: a JWT whose claims say what `spec` says (`aud`, `exp`,
/// `sub`, the `kubernetes.io` binding), so that a client reading the unverified claims (the CA
/// turns away what could not pass a review before asking for one) sees what it would see on a
/// real cluster. The signature is random bytes: only this server's memory of the token makes
/// a review succeed, as only the real server's keys do.
fn jwt_shaped(spec: &TokenSpec, expires_at: SystemTime, jti: &str) -> Result<String> {
    let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (ns, name) = &spec.service_account;
    let mut binding = json!({"namespace": ns, "serviceaccount": {"name": name}});
    if let Some(node) = &spec.node {
        binding["node"] = json!({"name": node});
    }
    if let Some((_, pod, uid)) = &spec.pod {
        binding["pod"] = json!({"name": pod, "uid": uid});
    }
    let claims = json!({
        "aud": spec.audiences, "exp": unix(expires_at), "iat": unix(SystemTime::now()),
        "iss": "https://kubernetes.default.svc.cluster.local", "jti": jti,
        "sub": spec.username(), "kubernetes.io": binding,
    });
    let header = json!({"alg": "RS256", "kid": "fake-apiserver"});
    Ok(format!(
        "{}.{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes()),
        base64url(&util::random_bytes(32)?)
    ))
}

/// Unpadded base64url (RFC 4648 section 5), as JWTs use.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(t: &mut Tokens, token: &str, audiences: &[&str]) -> Value {
        t.review(&json!({"token": token, "audiences": audiences}), |ns, name| {
            (ns == "sluice-system" && name == "sluice-abcde").then(|| "uid-1".into())
        })
        .unwrap()
    }

    #[test]
    fn a_token_is_a_jwt_whose_claims_say_what_it_was_minted_for() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        let mut t = Tokens::default();
        let tok = t.mint(TokenSpec::new("sluice-system", "sluice").node("n1")).unwrap();
        let parts: Vec<&str> = tok.split('.').collect();
        assert_eq!(parts.len(), 3, "{tok}");
        assert!(tok.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{tok}");
        let other = t.mint(TokenSpec::new("sluice-system", "sluice").node("n1")).unwrap();
        assert_ne!(tok, other, "two tokens of one spec differ");
    }

    #[test]
    fn a_pod_bound_token_with_node_info_authenticates_as_its_service_account() {
        let mut t = Tokens::default();
        let tok = t
            .mint(TokenSpec::new("sluice-system", "sluice").node("n1").pod(
                "sluice-system",
                "sluice-abcde",
                "uid-1",
            ))
            .unwrap();
        let st = review(&mut t, &tok, &["sluice-ca"]);
        assert_eq!(st["authenticated"], true);
        assert_eq!(st["user"]["username"], "system:serviceaccount:sluice-system:sluice");
        assert_eq!(
            st["user"]["groups"],
            json!(["system:serviceaccounts", "system:serviceaccounts:sluice-system", "system:authenticated"])
        );
        let extra = &st["user"]["extra"];
        assert_eq!(extra["authentication.kubernetes.io/node-name"], json!(["n1"]));
        assert_eq!(extra["authentication.kubernetes.io/pod-name"], json!(["sluice-abcde"]));
        assert_eq!(extra["authentication.kubernetes.io/pod-uid"], json!(["uid-1"]));
        assert!(extra["authentication.kubernetes.io/credential-id"][0].as_str().unwrap().starts_with("JTI="));
        assert_eq!(st["audiences"], json!(["sluice-ca"]));
        // The same ServiceAccount and node keep their UIDs across reviews.
        let again = review(&mut t, &tok, &["other", "sluice-ca"]);
        assert_eq!(again["user"]["uid"], st["user"]["uid"]);
        assert_eq!(
            again["user"]["extra"]["authentication.kubernetes.io/node-uid"],
            extra["authentication.kubernetes.io/node-uid"]
        );
        assert_eq!(t.review_count(), 2);
    }

    #[test]
    fn refusals_say_why_as_kube_apiserver_does() {
        let mut t = Tokens::default();
        let unknown = review(&mut t, "nope", &["sluice-ca"]);
        assert!(unknown.get("authenticated").is_none(), "omitempty: {unknown}");
        assert_eq!(unknown["user"], json!({}));
        assert_eq!(unknown["error"], "invalid bearer token");

        let other_aud = t.mint(TokenSpec::new("sluice-system", "sluice").audiences(&["istio-ca"])).unwrap();
        assert_eq!(
            review(&mut t, &other_aud, &["sluice-ca"])["error"],
            r#"[invalid bearer token, token audiences ["istio-ca"] is invalid for the target audiences ["sluice-ca"]]"#
        );
        // No audiences in the review: the API server's own.
        let st = review(&mut t, &other_aud, &[]);
        assert!(st["error"]
            .as_str()
            .unwrap()
            .contains(r#"for the target audiences ["https://kubernetes.default.svc.cluster.local"]"#));

        let tok = t.mint(TokenSpec::new("sluice-system", "sluice")).unwrap();
        assert_eq!(review(&mut t, &tok, &["sluice-ca"])["authenticated"], true);
        assert!(t.expire(&tok));
        assert_eq!(
            review(&mut t, &tok, &["sluice-ca"])["error"],
            "[invalid bearer token, service account token has expired]"
        );
        // Zero lifetime is still inside the leeway.
        let fresh = t.mint(TokenSpec::new("sluice-system", "sluice").expires_in(Duration::ZERO)).unwrap();
        assert_eq!(review(&mut t, &fresh, &["sluice-ca"])["authenticated"], true);
        assert!(t.revoke(&fresh));
        assert_eq!(review(&mut t, &fresh, &["sluice-ca"])["error"], "invalid bearer token");

        // A token bound to a pod that is gone, or was re-created under another UID.
        let stale = t
            .mint(TokenSpec::new("sluice-system", "sluice").pod("sluice-system", "sluice-abcde", "uid-2"))
            .unwrap();
        assert_eq!(
            review(&mut t, &stale, &["sluice-ca"])["error"],
            "[invalid bearer token, service account token has been invalidated]"
        );
        let gone =
            t.mint(TokenSpec::new("sluice-system", "sluice").pod("sluice-system", "gone", "u")).unwrap();
        assert!(review(&mut t, &gone, &["sluice-ca"])["error"].as_str().unwrap().contains("invalidated"));
    }

    #[test]
    fn the_review_log_is_bounded() {
        let mut t = Tokens::default();
        for _ in 0..MAX_REVIEWS_KEPT + 10 {
            review(&mut t, "x", &["sluice-ca"]);
        }
        assert_eq!(t.reviews().len(), MAX_REVIEWS_KEPT);
        assert_eq!(t.review_count(), MAX_REVIEWS_KEPT as u64 + 10);
    }
}
