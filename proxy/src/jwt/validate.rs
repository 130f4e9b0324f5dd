//! Validating one JWT (RFC 7519, compact JWS) against the RequestAuthentication rule of its
//! issuer, as Envoy's jwt_authn filter does for Istio: the issuer picks the rule, the rule's key
//! set must hold a key for the token's `kid` and `alg` whose signature verifies, `exp` and
//! `nbf` hold within 60 s of clock skew (Envoy's default, which Istio keeps; both are optional),
//! and when the rule lists audiences, one of the token's `aud` values must be among them.
//!
//! The reasons are Envoy's texts, which Istio users see in the 401's body and know.

use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::keys::KeySet;

/// The longest token sluice reads: far above real ones (a few KB with many claims), far below
/// the request head limit.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Clock skew allowed on `exp` and `nbf`, in seconds (Envoy's default).
pub const CLOCK_SKEW_S: u64 = 60;

/// Why a token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("Jwt is too large ({0} bytes; sluice's limit is {MAX_TOKEN_BYTES})")]
    TooLarge(usize),
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    Malformed,
    #[error("Jwt header is an invalid JSON or uses an unsupported alg")]
    BadHeader,
    #[error("Jwt payload is an invalid JSON")]
    BadPayload,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwks remote fetch is failed ({0})")]
    NoKeys(Arc<str>),
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    UnknownKey,
    #[error("Jwt verification fails")]
    BadSignature,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
}

/// A token that passed: what `request.auth.*` and the output headers are made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// `<iss>/<sub>`: `request.auth.principal` and what `requestPrincipals` match.
    pub principal: String,
    /// `aud`, as a list whether the token had one string or several.
    pub audiences: Vec<String>,
    /// `azp`: `request.auth.presenter`.
    pub presenter: Option<String>,
    /// Every claim, for `request.auth.claims[...]` and `outputClaimToHeaders`.
    pub claims: Map<String, Value>,
    /// The payload as it came (base64url), for `outputPayloadToHeader`.
    pub payload: String,
}

/// The token's issuer (`iss`), read without verifying anything: it only picks the rule (and
/// so the keys) the token must then verify against.
pub fn issuer(token: &str) -> Result<String, JwtError> {
    let (_, payload, _) = split(token)?;
    let claims = decode_payload(payload)?;
    match claims.get("iss") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(JwtError::UnknownIssuer),
    }
}

/// Verifies `token` with `keys` for a rule accepting `audiences` (empty: any), at `now`
/// (seconds since the epoch).
pub fn verify(token: &str, keys: &KeySet, audiences: &[String], now: u64) -> Result<Verified, JwtError> {
    let (header, payload, _) = split(token)?;
    let header = decode_header(header)?;
    let alg = header.alg;
    if !matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::EdDSA
    ) {
        return Err(JwtError::BadHeader);
    }
    // Only the signature is checked by the library; the claims are checked below with our own
    // clock and Envoy's semantics (exp optional, aud only when the rule lists audiences).
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let mut found_key = false;
    let mut verified = false;
    for key in keys.candidates(header.kid.as_deref(), alg) {
        found_key = true;
        match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
            Ok(_) => {
                verified = true;
                break;
            }
            Err(e) => match e.kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidKeyFormat
                | ErrorKind::InvalidAlgorithm => continue,
                ErrorKind::Base64(_) | ErrorKind::InvalidToken | ErrorKind::Utf8(_) => {
                    return Err(JwtError::Malformed)
                }
                ErrorKind::Json(_) => return Err(JwtError::BadPayload),
                _ => continue,
            },
        }
    }
    if !found_key {
        return Err(JwtError::UnknownKey);
    }
    if !verified {
        return Err(JwtError::BadSignature);
    }
    let claims = decode_payload(payload)?;
    check_time(&claims, now)?;
    let token_audiences = string_or_list(claims.get("aud"));
    if !audiences.is_empty() && !token_audiences.iter().any(|a| audiences.contains(a)) {
        return Err(JwtError::AudienceNotAllowed);
    }
    let text = |k: &str| match claims.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let principal = format!("{}/{}", text("iss").unwrap_or_default(), text("sub").unwrap_or_default());
    Ok(Verified {
        principal,
        audiences: token_audiences,
        presenter: text("azp"),
        payload: payload.to_owned(),
        claims,
    })
}

fn split(token: &str) -> Result<(&str, &str, &str), JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge(token.len()));
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() && !s.is_empty() => Ok((h, p, s)),
        _ => Err(JwtError::Malformed),
    }
}

fn decode_header(header: &str) -> Result<jsonwebtoken::Header, JwtError> {
    let bytes = b64(header)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::BadHeader)
}

fn decode_payload(payload: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = b64(payload)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::BadPayload),
    }
}

fn b64(part: &str) -> Result<Vec<u8>, JwtError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).map_err(|_| JwtError::Malformed)
}

/// `exp` and `nbf` are NumericDate (seconds, possibly fractional); either may be absent.
fn check_time(claims: &Map<String, Value>, now: u64) -> Result<(), JwtError> {
    let seconds = |k: &str| -> Result<Option<f64>, JwtError> {
        match claims.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(JwtError::BadPayload),
            Some(_) => Err(JwtError::BadPayload),
        }
    };
    let now = now as f64;
    let skew = CLOCK_SKEW_S as f64;
    if let Some(exp) = seconds("exp")? {
        if now > exp + skew {
            return Err(JwtError::Expired);
        }
    }
    if let Some(nbf) = seconds("nbf")? {
        if now + skew < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    Ok(())
}

/// A claim that is a string or a list of strings, as a list (other types: nothing).
pub fn string_or_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}
