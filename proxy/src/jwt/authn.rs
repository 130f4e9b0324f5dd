//! RequestAuthentication applied to one HTTP request at the destination, before authorization
//! (Envoy's jwt_authn filter ahead of RBAC, as Istio configures them).
//!
//! The rules that apply to a pod are those of the RequestAuthentications of its namespace and
//! of the root namespace whose selector matches it. Each rule reads its token where it says
//! (`fromHeaders`, `fromParams`, `fromCookies`; by default `Authorization: Bearer` and the
//! `access_token` query parameter). Then:
//!
//! - no token anywhere: the request goes on without `request.auth.*` (Istio's "allow missing":
//!   an AuthorizationPolicy asking for `requestPrincipals` is what refuses it, with a 403);
//! - every token found must be valid for the rule of its issuer (among the rules that read it
//!   where it was found), else the request gets a 401 with the reason. sluice checks every
//!   token rather than letting one valid token excuse an invalid one next to it;
//! - the first valid token, in rule order, is the request's `request.auth.*`.
//!
//! For the application: a token is removed from the header it came in unless its rule says
//! `forwardOriginalToken` (a query parameter is left, as Envoy does); `outputPayloadToHeader`
//! gets the payload (base64url, as the token carried it) and `outputClaimToHeaders` the claims.
//! Those output headers are removed from every request first, whatever it carries, so that a
//! client cannot forge them by sending them itself.

use http::header::{HeaderName, HeaderValue};
use http::request::Parts;
use serde_json::Value;

use super::jwks::Jwks;
use super::validate::{self, JwtError, Verified};
use crate::discovery::{JwtRule, Model, Pod};

/// The JWT rules that apply to `pod`: the root namespace's RequestAuthentications (mesh-wide),
/// then its namespace's, each by name, then in their order.
pub fn rules_for<'m>(model: &'m Model, root_namespace: &str, pod: &Pod) -> Vec<&'m JwtRule> {
    let root =
        if pod.namespace == root_namespace { &[][..] } else { model.request_authentications(root_namespace) };
    root.iter()
        .chain(model.request_authentications(&pod.namespace))
        .filter(|ra| ra.selects(&pod.labels))
        .flat_map(|ra| ra.rules.iter())
        .collect()
}

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location<'r> {
    Header(&'r str),
    Param,
    Cookie,
}

struct Found<'r> {
    token: String,
    location: Location<'r>,
    /// The rules (indexes into `rules`) that read the place it was found.
    readers: Vec<usize>,
}

/// Authenticates the request whose head is `parts` with `rules` (see the module documentation);
/// rewrites the head for the application. `Ok(None)`: no token; `Err`: 401 with the reason.
pub async fn authenticate(
    parts: &mut Parts,
    rules: &[&JwtRule],
    jwks: &Jwks,
    now: u64,
) -> Result<Option<Verified>, JwtError> {
    if rules.is_empty() {
        return Ok(None);
    }
    let found = find_tokens(parts, rules);
    // Output headers only ever come from sluice.
    for rule in rules {
        if let Some(h) = &rule.output_payload_to_header {
            parts.headers.remove(h.as_str());
        }
        for c in &rule.output_claim_to_headers {
            parts.headers.remove(c.header.as_str());
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    let mut first: Option<Verified> = None;
    let mut outputs: Vec<(&JwtRule, Location<'_>, Verified)> = Vec::with_capacity(found.len());
    for f in &found {
        let iss = validate::issuer(&f.token)?;
        let rule =
            f.readers.iter().map(|&i| rules[i]).find(|r| r.issuer == iss).ok_or(JwtError::UnknownIssuer)?;
        let keys = jwks.keys(&rule.jwks, rule.timeout).await.map_err(JwtError::NoKeys)?;
        let verified = validate::verify(&f.token, &keys, &rule.audiences, now)?;
        outputs.push((rule, f.location, verified));
    }
    for (rule, location, verified) in outputs {
        if let (false, Location::Header(name)) = (rule.forward_original_token, location) {
            parts.headers.remove(name);
        }
        if let Some(h) = &rule.output_payload_to_header {
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(h.as_bytes()), HeaderValue::from_str(&verified.payload))
            {
                parts.headers.insert(name, value);
            }
        }
        for c in &rule.output_claim_to_headers {
            let text = match verified.claims.get(&c.claim) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => continue,
            };
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(c.header.as_bytes()), HeaderValue::from_str(&text))
            {
                parts.headers.insert(name, value);
            }
        }
        if first.is_none() {
            first = Some(verified);
        }
    }
    Ok(first)
}

/// Every distinct token at the places the rules read, with who reads each place.
fn find_tokens<'r>(parts: &Parts, rules: &[&'r JwtRule]) -> Vec<Found<'r>> {
    let mut found: Vec<Found<'r>> = Vec::new();
    let mut add = |token: &str, location: Location<'r>, rule: usize| {
        let token = token.trim();
        if token.is_empty() {
            return;
        }
        match found.iter_mut().find(|f| f.token == token) {
            Some(f) => {
                if !f.readers.contains(&rule) {
                    f.readers.push(rule);
                }
            }
            None => found.push(Found { token: token.to_owned(), location, readers: vec![rule] }),
        }
    };
    for (i, rule) in rules.iter().enumerate() {
        for (name, prefix) in rule.header_locations() {
            for value in parts.headers.get_all(name) {
                let Ok(value) = value.to_str() else { continue };
                if let Some(token) = strip_prefix_ignore_case(value, prefix) {
                    add(token, Location::Header(name), i);
                }
            }
        }
        if let Some(query) = parts.uri.query() {
            for want in rule.param_locations() {
                for (k, v) in form_urlencoded::parse(query.as_bytes()) {
                    if k == want {
                        add(&v, Location::Param, i);
                    }
                }
            }
        }
        if !rule.from_cookies.is_empty() {
            for header in parts.headers.get_all(http::header::COOKIE) {
                let Ok(header) = header.to_str() else { continue };
                for pair in header.split(';') {
                    if let Some((k, v)) = pair.trim().split_once('=') {
                        if rule.from_cookies.iter().any(|c| c == k) {
                            add(v, Location::Cookie, i);
                        }
                    }
                }
            }
        }
    }
    found
}

/// `Bearer abc` with prefix `Bearer ` → `abc` (the scheme is case-insensitive, RFC 9110 §11.1).
fn strip_prefix_ignore_case<'v>(value: &'v str, prefix: &str) -> Option<&'v str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &value[prefix.len()..])
}
