//! Istio's certificate protocol, `istio.v1.auth.IstioCertificateService`, written by hand with
//! prost from the published interface (no protoc, no build script). sluice's CA service
//! (`sluice ca serve`) answers it, and sluice's node agent calls it, so the node agent can also
//! use istiod or cert-manager's istio-csr as its CA, and the CA service can sign for ztunnel.
//!
//! ```proto
//! package istio.v1.auth;
//! import "google/protobuf/struct.proto";
//! message IstioCertificateRequest {
//!   string csr = 1;                        // PEM-encoded PKCS#10
//!   int64 validity_duration = 3;           // seconds
//!   google.protobuf.Struct metadata = 4;   // e.g. {"ImpersonatedIdentity": "spiffe://..."}
//! }
//! message IstioCertificateResponse {
//!   repeated string cert_chain = 1;        // PEM, leaf first; the last element is the root
//! }
//! service IstioCertificateService {
//!   rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse);
//! }
//! ```
//!
//! Authentication is out of band: the caller's credential travels as `authorization: Bearer
//! <token>` metadata (a projected ServiceAccount token, audience `sluice-ca`).

/// The gRPC method path.
pub const CREATE_CERTIFICATE_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// The `metadata` field naming the identity a node agent asks for on a pod's behalf, as
/// ztunnel sends it to istiod.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity in seconds (the CA may shorten it).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM certificates, leaf first; by Istio's convention the last one is the root.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

impl IstioCertificateRequest {
    /// A request for `identity` on a pod's behalf.
    pub fn impersonating(csr_pem: String, validity_s: i64, identity: &str) -> Self {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(identity.to_string())) },
        );
        Self { csr: csr_pem, validity_duration: validity_s, metadata: Some(prost_types::Struct { fields }) }
    }

    /// The `ImpersonatedIdentity` the request carries, if it is a string.
    pub fn impersonated_identity(&self) -> Option<&str> {
        match self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?.kind.as_ref()? {
            prost_types::value::Kind::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn the_wire_format_matches_the_published_field_numbers() {
        let req = IstioCertificateRequest::impersonating("PEM".into(), 3600, "spiffe://cluster.local/ns/a/sa/b");
        let bytes = req.encode_to_vec();
        // csr: field 1, length-delimited → tag byte 0x0a; validity_duration: field 3, varint →
        // 0x18; metadata: field 4, length-delimited → 0x22.
        assert_eq!(bytes[0], 0x0a);
        assert!(bytes.windows(3).any(|w| w == [0x18, 0x90, 0x1c]), "3600 as field 3: {bytes:02x?}");
        assert!(bytes.contains(&0x22));
        let back = IstioCertificateRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.impersonated_identity(), Some("spiffe://cluster.local/ns/a/sa/b"));
        let resp = IstioCertificateResponse { cert_chain: vec!["a".into(), "b".into()] };
        assert_eq!(resp.encode_to_vec(), [0x0a, 1, b'a', 0x0a, 1, b'b']);
    }
}
