//! The unary part of the `sluice.test.Echo` gRPC service, written by hand with prost (no
//! protoc, no build script), for the binaries that include this file with
//! `#[path = "../grpc_proto.rs"] mod grpc_proto;` (slload's gRPC load mode and backend). The
//! messages are wire-compatible with those of slgrpc (tests/src/bin/slgrpc.rs), which also
//! serves `Count`:
//!
//! ```proto
//! package sluice.test;
//! service Echo { rpc Echo(EchoRequest) returns (EchoReply); }
//! message EchoRequest { string message = 1; bytes payload = 2; int32 fail_code = 3; uint32 delay_ms = 4; }
//! message EchoReply { string message = 1; string server = 2; bytes payload = 3; string peer = 4;
//!                     map<string, string> metadata = 5; }
//! ```
//!
//! Not part of the `sluice_tests` library (binaries only).

use std::collections::BTreeMap;

/// The method path of `Echo.Echo` (what a GRPCRoute matches as service `sluice.test.Echo`,
/// method `Echo`).
pub const ECHO_PATH: &str = "/sluice.test.Echo/Echo";

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    /// Non-zero: answer with this gRPC status code instead of a reply.
    #[prost(int32, tag = "3")]
    pub fail_code: i32,
    /// Sleep this long before answering.
    #[prost(uint32, tag = "4")]
    pub delay_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    /// The server's name.
    #[prost(string, tag = "2")]
    pub server: String,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    /// The TCP peer the server saw.
    #[prost(string, tag = "4")]
    pub peer: String,
    /// The request metadata the server received.
    #[prost(btree_map = "string, string", tag = "5")]
    pub metadata: BTreeMap<String, String>,
}
