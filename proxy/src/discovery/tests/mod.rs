//! Unit tests of the discovery module (`cargo test -p sluice --lib discovery`).

mod authz;
mod dual_stack;
mod fixtures;
mod istio_as_written;
mod istio_authn;
mod kube;
mod limits;
mod limits_libyaml;
mod parse;
mod parse_worker;
mod resolve;
mod routes;
mod store;
mod store_limits;
mod traffic;
mod virtual_service;
mod watch;
