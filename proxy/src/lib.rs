//! sluice: a per-node service-mesh data plane.
//!
//! Data flows one way: discovery sources → [`discovery::Model`] snapshots → enrollment
//! ([`enroll`]) and the data path ([`l4`]). See DESIGN.md for the request path.

pub mod admin;
pub mod cli;
pub mod conns;
pub mod daemon;
pub mod discovery;
pub mod enroll;
pub mod l4;
pub mod netns;
pub mod podres;
pub mod redirect;
pub mod routing;
