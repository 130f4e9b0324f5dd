//! Istio's RequestAuthentication (`security.istio.io` v1 and v1beta1): which JWTs the selected
//! pods accept, from which issuers, with which keys, read from where, and what to pass on to the
//! application. The data path (`jwt::authn`) applies it at the destination, before
//! authorization, to every HTTP request.
//!
//! An inline `jwks` is parsed here, so a bad key set rejects the resource with the reason; a
//! `jwksUri` (or, with neither, the issuer's OpenID discovery document) is fetched off the data
//! path by `jwt::jwks`. `targetRef`/`targetRefs` are rejected (sluice applies the resource to the
//! pods `selector` chooses).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::{invalid, istio_duration, nullable, spec, WorkloadSelector};
use crate::discovery::fields::Node;
use crate::discovery::manifest::{DocError, Meta};
use crate::discovery::model::{Labels, Object};
use crate::jwt::keys::KeySet;

/// The JWKS fetch timeout when a rule does not set one (Istio's default).
pub const DEFAULT_JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a rule's verification keys come from.
#[derive(Clone)]
pub enum JwksSource {
    /// `jwks`: the key set itself, parsed when the resource was (its text kept for equality).
    Inline { text: Arc<str>, keys: Arc<KeySet> },
    /// `jwksUri`: fetched and refreshed by `jwt::jwks`.
    Uri(String),
    /// Neither: the `jwks_uri` of the issuer's OpenID configuration
    /// (`<issuer>/.well-known/openid-configuration`), as Istio does.
    Discovery(String),
}

impl JwksSource {
    /// The URL the fetcher reads for this source (`None` for inline keys).
    pub fn fetch_url(&self) -> Option<&str> {
        match self {
            JwksSource::Inline { .. } => None,
            JwksSource::Uri(u) | JwksSource::Discovery(u) => Some(u),
        }
    }
}

impl PartialEq for JwksSource {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (JwksSource::Inline { text: a, .. }, JwksSource::Inline { text: b, .. }) => a == b,
            (JwksSource::Uri(a), JwksSource::Uri(b))
            | (JwksSource::Discovery(a), JwksSource::Discovery(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for JwksSource {}

impl fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksSource::Inline { keys, .. } => write!(f, "inline ({} keys)", keys.len()),
            JwksSource::Uri(u) => write!(f, "{u}"),
            JwksSource::Discovery(u) => write!(f, "{u} (OpenID discovery)"),
        }
    }
}

impl Serialize for JwksSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `fromHeaders[]`: a header carrying the token after `prefix` (e.g. `Bearer `).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JwtHeader {
    /// Lower-cased.
    pub name: String,
    pub prefix: String,
}

/// `outputClaimToHeaders[]`: a claim copied into a request header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// One entry of `jwtRules`: one issuer, as Envoy's jwt_authn calls a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    pub issuer: String,
    /// A token must carry one of these in `aud`; empty: `aud` is not checked.
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    /// Where the token is read. All three empty: `Authorization: Bearer <token>` and the
    /// `access_token` query parameter, Istio's default.
    pub from_headers: Vec<JwtHeader>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    /// Keep the token in the request passed to the application (default: removed from the
    /// header it came in).
    pub forward_original_token: bool,
    /// A header (lower-cased) that gets the token's payload, base64url as it came.
    pub output_payload_to_header: Option<String>,
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// For fetching `jwksUri`.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
}

impl JwtRule {
    /// The header locations this rule reads (the default: `authorization` with `Bearer `).
    pub fn header_locations(&self) -> impl Iterator<Item = (&str, &str)> {
        let default = self.uses_default_locations().then_some(("authorization", "Bearer "));
        default.into_iter().chain(self.from_headers.iter().map(|h| (h.name.as_str(), h.prefix.as_str())))
    }

    /// The query parameters this rule reads (the default: `access_token`).
    pub fn param_locations(&self) -> impl Iterator<Item = &str> {
        let default = self.uses_default_locations().then_some("access_token");
        default.into_iter().chain(self.from_params.iter().map(String::as_str))
    }

    fn uses_default_locations(&self) -> bool {
        self.from_headers.is_empty() && self.from_params.is_empty() && self.from_cookies.is_empty()
    }
}

mod duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// Istio's `security.istio.io` RequestAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestAuthentication {
    pub namespace: String,
    pub name: String,
    /// The pods it applies to (all these labels), in its namespace or, in the root namespace,
    /// in every namespace; empty: every pod.
    pub selector: Labels,
    pub rules: Vec<JwtRule>,
}

impl RequestAuthentication {
    pub fn selects(&self, pod_labels: &Labels) -> bool {
        self.selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default, deserialize_with = "nullable")]
    jwt_rules: Vec<Rule>,
    #[serde(default)]
    target_ref: Option<IgnoredAny>,
    #[serde(default)]
    target_refs: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    issuer: String,
    #[serde(default, deserialize_with = "nullable")]
    audiences: Vec<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    from_headers: Vec<Header>,
    #[serde(default, deserialize_with = "nullable")]
    from_params: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    from_cookies: Vec<String>,
    #[serde(default)]
    output_payload_to_header: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    output_claim_to_headers: Vec<ClaimHeader>,
    #[serde(default)]
    forward_original_token: Option<bool>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    #[serde(default)]
    name: String,
    #[serde(default)]
    prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimHeader {
    #[serde(default)]
    header: String,
    #[serde(default)]
    claim: String,
}

pub(crate) fn parse(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let spec: Spec = spec(doc)?.unwrap_or_default();
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        let field = if spec.target_ref.is_some() { "targetRef" } else { "targetRefs" };
        return Err(invalid(
            format!("spec.{field}"),
            "not supported: sluice applies RequestAuthentications to the pods chosen by spec.selector",
        ));
    }
    let mut rules = Vec::with_capacity(spec.jwt_rules.len());
    for (i, r) in spec.jwt_rules.into_iter().enumerate() {
        rules.push(jwt_rule(r, &format!("spec.jwtRules[{i}]"))?);
    }
    for (i, r) in rules.iter().enumerate() {
        if let Some(j) = rules[..i].iter().position(|q| q.issuer == r.issuer) {
            return Err(invalid(
                format!("spec.jwtRules[{i}].issuer"),
                format!("issuer {:?} is already the issuer of jwtRules[{j}]; one rule per issuer", r.issuer),
            ));
        }
    }
    Ok(Object::RequestAuthentication(Arc::new(RequestAuthentication {
        namespace: meta.namespace,
        name: meta.name,
        selector: spec.selector.map(|s| s.match_labels).unwrap_or_default(),
        rules,
    })))
}

fn jwt_rule(r: Rule, at: &str) -> Result<JwtRule, DocError> {
    if r.issuer.is_empty() {
        return Err(DocError::Missing { field: format!("{at}.issuer") });
    }
    let jwks = match (r.jwks.filter(|s| !s.is_empty()), r.jwks_uri.filter(|s| !s.is_empty())) {
        // Both: the inline set is used, as in Istio.
        (Some(text), _) => {
            let keys = KeySet::parse(&text).map_err(|e| invalid(format!("{at}.jwks"), e.to_string()))?;
            JwksSource::Inline { text: text.into(), keys: Arc::new(keys) }
        }
        (None, Some(uri)) => {
            check_url(&uri).map_err(|reason| invalid(format!("{at}.jwksUri"), reason))?;
            JwksSource::Uri(uri)
        }
        (None, None) => {
            let url = format!("{}/.well-known/openid-configuration", r.issuer.trim_end_matches('/'));
            check_url(&url).map_err(|reason| {
                invalid(
                    format!("{at}.issuer"),
                    format!("without jwks or jwksUri the keys come from the issuer's OpenID configuration, but {reason}"),
                )
            })?;
            JwksSource::Discovery(url)
        }
    };
    let mut from_headers = Vec::with_capacity(r.from_headers.len());
    for (i, h) in r.from_headers.into_iter().enumerate() {
        let name =
            header_name(&h.name).map_err(|reason| invalid(format!("{at}.fromHeaders[{i}].name"), reason))?;
        from_headers.push(JwtHeader { name, prefix: h.prefix.unwrap_or_default() });
    }
    for (i, p) in r.from_params.iter().enumerate() {
        if p.is_empty() {
            return Err(invalid(format!("{at}.fromParams[{i}]"), "must not be empty"));
        }
    }
    for (i, c) in r.from_cookies.iter().enumerate() {
        if c.is_empty() || c.bytes().any(|b| b <= b' ' || b == b'=' || b == b';') {
            return Err(invalid(format!("{at}.fromCookies[{i}]"), format!("{c:?} is not a cookie name")));
        }
    }
    let output_payload_to_header = match r.output_payload_to_header.filter(|s| !s.is_empty()) {
        None => None,
        Some(h) => {
            Some(header_name(&h).map_err(|reason| invalid(format!("{at}.outputPayloadToHeader"), reason))?)
        }
    };
    let mut output_claim_to_headers = Vec::with_capacity(r.output_claim_to_headers.len());
    for (i, c) in r.output_claim_to_headers.into_iter().enumerate() {
        let header = header_name(&c.header)
            .map_err(|reason| invalid(format!("{at}.outputClaimToHeaders[{i}].header"), reason))?;
        if c.claim.is_empty() {
            return Err(DocError::Missing { field: format!("{at}.outputClaimToHeaders[{i}].claim") });
        }
        output_claim_to_headers.push(ClaimToHeader { header, claim: c.claim });
    }
    let timeout = match r.timeout.filter(|s| !s.is_empty()) {
        None => DEFAULT_JWKS_TIMEOUT,
        Some(t) => istio_duration(&t).ok().filter(|d| !d.is_zero()).ok_or_else(|| {
            invalid(format!("{at}.timeout"), format!("{t:?} is not a positive duration like \"5s\""))
        })?,
    };
    Ok(JwtRule {
        issuer: r.issuer,
        audiences: r.audiences,
        jwks,
        from_headers,
        from_params: r.from_params,
        from_cookies: r.from_cookies,
        forward_original_token: r.forward_original_token.unwrap_or(false),
        output_payload_to_header,
        output_claim_to_headers,
        timeout,
    })
}

/// A header name as HTTP allows it, lower-cased.
fn header_name(name: &str) -> Result<String, String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|h| h.as_str().to_owned())
        .map_err(|_| format!("{name:?} is not a valid HTTP header name"))
}

/// An `http://` or `https://` URL with a host, as the fetcher reads it.
fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}
