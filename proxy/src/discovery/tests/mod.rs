//! Unit tests of the discovery module (`cargo test -p sluice --lib discovery`).

mod authz;
mod fixtures;
mod kube;
mod limits;
mod parse;
mod resolve;
mod routes;
mod store;
mod traffic;
mod watch;
