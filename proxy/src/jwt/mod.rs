//! JWT request authentication (Istio's RequestAuthentication), applied at the destination.
//!
//! - `keys`: JSON Web Key Sets, each key bound to the algorithms it may verify.
//! - `validate`: one token against its issuer's rule and keys (signature, `exp`/`nbf`, `aud`).
//! - `jwks`: the key sets behind `jwksUri` (and OpenID discovery), fetched off the data path,
//!   cached, refreshed, bounded; a failed refresh keeps the last good set.
//! - `authn`: a request's tokens, found where the rules say, validated, and the request
//!   rewritten for the application (token removed, payload or claims in headers); what it
//!   yields is `request.auth.*` for authorization.

pub mod authn;
pub mod jwks;
pub mod keys;
pub mod validate;

#[cfg(test)]
mod tests;
