//! Admin API: the server (daemon side) and the documents it serves (shared with the CLI), and
//! the kubelet's readiness endpoint (`health`).
pub mod api;
pub mod health;
pub mod listener_limits;
pub mod metrics_server;
pub mod routes;
pub mod server;
