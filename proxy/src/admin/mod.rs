//! Admin API: the server (daemon side) and the documents it serves (shared with the CLI).
pub mod api;
pub mod routes;
pub mod server;
