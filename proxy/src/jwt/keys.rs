//! A JSON Web Key Set (RFC 7517) of verification keys, as RequestAuthentication's inline `jwks`
//! or a `jwksUri` answer carries it.
//!
//! Each key is bound to the algorithms its type and curve allow (RSA: RS256/384/512 and
//! PS256/384/512; EC P-256: ES256; EC P-384: ES384; OKP Ed25519: EdDSA), narrowed to its `alg`
//! when it names one, so a token can never pick an algorithm its key was not made for. Keys
//! sluice cannot use are skipped and named (an encryption key, a symmetric `oct` key, which a
//! published key set must not hold, P-521, which the verifier lacks); a set with no usable key
//! is an error, since it could verify nothing.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use thiserror::Error;

/// The largest key set sluice reads, inline or fetched (real ones are a few KB).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// The most keys one set may hold (providers publish a handful, current and next).
pub const MAX_KEYS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JwksError {
    #[error("the key set is {size} bytes, more than sluice's limit of {MAX_JWKS_BYTES}")]
    TooLarge { size: usize },
    #[error("not a JSON Web Key Set: {0}")]
    Malformed(String),
    #[error("the key set has {count} keys, more than sluice's limit of {MAX_KEYS}")]
    TooManyKeys { count: usize },
    #[error("no usable verification key in the key set ({0})")]
    NoUsableKey(String),
}

/// One verification key and what it may verify.
pub struct Key {
    pub kid: Option<String>,
    pub algorithms: &'static [Algorithm],
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("algorithms", &self.algorithms).finish()
    }
}

/// A parsed key set. Immutable; shared behind `Arc` by every request that uses it.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<Key>,
    /// Keys that were skipped, and why (for logs and `GET /model`).
    pub skipped: Vec<String>,
}

const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

impl KeySet {
    /// Parses a key set from its JSON text.
    pub fn parse(text: &str) -> Result<KeySet, JwksError> {
        if text.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge { size: text.len() });
        }
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_str(text).map_err(|e| JwksError::Malformed(e.to_string()))?;
        if set.keys.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys { count: set.keys.len() });
        }
        let mut keys = Vec::with_capacity(set.keys.len());
        let mut skipped = Vec::new();
        for (i, raw) in set.keys.into_iter().enumerate() {
            let kid = raw.get("kid").and_then(|v| v.as_str()).map(str::to_owned);
            let name = || kid.as_deref().map_or_else(|| format!("keys[{i}]"), |k| format!("key {k:?}"));
            let jwk: Jwk = match serde_json::from_value(raw) {
                Ok(j) => j,
                Err(e) => {
                    skipped.push(format!("{}: {e}", name()));
                    continue;
                }
            };
            match key(&jwk) {
                Ok(algorithms) => match DecodingKey::from_jwk(&jwk) {
                    Ok(key) => keys.push(Key { kid: jwk.common.key_id.clone(), algorithms, key }),
                    Err(e) => skipped.push(format!("{}: {e}", name())),
                },
                Err(why) => skipped.push(format!("{}: {why}", name())),
            }
        }
        if keys.is_empty() {
            let why = if skipped.is_empty() { "it is empty".to_owned() } else { skipped.join("; ") };
            return Err(JwksError::NoUsableKey(why));
        }
        Ok(KeySet { keys, skipped })
    }

    /// The keys that may verify a token with header `kid` and `alg`: with a `kid`, the key(s)
    /// of that id; without one, every key of a matching algorithm (RFC 7515 lets a token omit
    /// it when the set makes the choice clear; Envoy tries each key).
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys
            .iter()
            .filter(move |k| k.algorithms.contains(&alg) && kid.is_none_or(|id| k.kid.as_deref() == Some(id)))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The algorithms a key may verify, or why sluice cannot use it.
fn key(jwk: &Jwk) -> Result<&'static [Algorithm], String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (use: enc)".into());
    }
    let by_type: &'static [Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => RSA,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            EllipticCurve::P521 => return Err("curve P-521 (ES512) is not supported".into()),
            _ => return Err("kty EC with a curve other than P-256, P-384".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => return Err("an OKP key other than Ed25519".into()),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (oct) key: a published key set holds public keys only".into())
        }
        _ => return Err("an unknown key type".into()),
    };
    let Some(alg) = jwk.common.key_algorithm else {
        return Ok(by_type);
    };
    let named: Algorithm = match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        other => return Err(format!("alg {other} is not a signature algorithm sluice verifies")),
    };
    // The one algorithm the key names, as a 'static slice of the type's list.
    by_type
        .iter()
        .position(|a| *a == named)
        .map(|i| &by_type[i..=i])
        .ok_or_else(|| format!("alg {alg} does not fit the key's type"))
}
