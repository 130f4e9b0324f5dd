//! Security policy at the destination: Istio's PeerAuthentication (`peer_auth`: may this pod be
//! reached in plaintext, on this port) and AuthorizationPolicy (`authz`: may this connection or
//! request reach it), and what an HTTP request contributes to the latter (`request`). The JWT
//! side (RequestAuthentication) is in `crate::jwt`.
//!
//! Policies in the root namespace (`--root-namespace`, `istio-system` by default) apply to the
//! whole mesh, as in Istio.

pub mod authz;
pub mod peer_auth;
pub mod request;

pub use authz::{authorize, policy_matches, Attributes, Decision, Request, Source};

/// Istio's default root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The body of an HTTP request denied by authorization, as Envoy's RBAC filter writes it (Istio
/// users and their tests look for it).
pub const DENIED_BODY: &str = "RBAC: access denied";

#[cfg(test)]
mod tests_l7;
