//! sluice: a per-node service-mesh data plane.
//!
//! Data flows one way: discovery sources → [`discovery::Model`] snapshots → enrollment
//! ([`enroll`]) and the data path ([`l4`]). See DESIGN.md for the request path.

pub mod admin;
pub mod admission;
pub mod ca_service;
pub mod ca_tool;
pub mod cli;
pub mod conns;
pub mod daemon;
pub mod deliver;
pub mod discovery;
pub mod enroll;
pub mod identity;
pub mod idle;
pub mod inbound;
pub mod jwt;
pub mod keyed;
pub mod l4;
pub mod l7;
pub mod lograte;
pub mod loopguard;
pub mod netns;
pub mod plaintext_fallback;
pub mod podres;
pub mod policy;
pub mod redirect;
pub mod routing;
pub mod same_node;
pub mod stream_routes;
pub mod sysctl;
pub mod telemetry;
pub mod transport;
