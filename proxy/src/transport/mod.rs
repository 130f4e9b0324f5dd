//! The mesh transport between sluice instances: HBONE, i.e. HTTP/2 CONNECT streams inside
//! mutual TLS 1.3 on port 15008, compatible in shape with Istio ambient's ztunnel.
pub mod client;
pub mod gate;
pub mod mux_pool;
pub mod pump;
pub mod server;

pub use client::{HbonePool, PoolKey, TunnelError, TunnelStream, TunnelWatch, HBONE_PORT};
pub use server::{ServerStats, TunnelRequest};
