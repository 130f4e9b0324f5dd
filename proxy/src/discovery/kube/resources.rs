//! What the Kubernetes source watches: one entry per watch, each feeding one kind of the model.
//!
//! Pods are watched twice, with complementary field selectors, so every pod arrives through
//! exactly one watch:
//!
//! - `spec.nodeName=<this node>`: the pods sluice serves (enrollment, certificates, policy
//!   selection by labels). This is the watch that matters for the node; it is small, lists
//!   fast, and its relists never depend on the size of the cluster.
//! - `spec.nodeName!=<this node>`: every other pod, because the data path maps a destination
//!   pod IP to its mesh identity (namespace, service account) to open the HBONE tunnel with the
//!   right expectations, and the inbound side maps a plaintext client IP to a pod. The API
//!   cannot project fields (a metadata-only watch has no `status.podIP`), so this watch carries
//!   whole pods: its cost is O(pods in the cluster) on the wire at every (re)list and every pod
//!   update anywhere, which the API server's watch cache serves without touching etcd. sluice
//!   keeps only the distilled [`Pod`](crate::discovery::Pod) (a few hundred bytes each), and a
//!   pod update that changes none of its fields (most are status conditions) does not rebuild
//!   the model. Unscheduled pods match this selector too; they have no IP yet and are skipped.
//!
//! Istio's AuthorizationPolicy, PeerAuthentication, RequestAuthentication, ServiceEntry,
//! VirtualService and DestinationRule, the Gateway API's HTTPRoute and GRPCRoute and sluice's own
//! TrafficPolicy are CRDs: a cluster without Istio's (or the Gateway API's, or sluice's) CRDs does
//! not serve them, and sluice then carries on without them (policies, routes, TrafficPolicies,
//! ServiceEntries, DestinationRules), see [`WatchSpec::optional`]. Routes, VirtualServices,
//! DestinationRules, TrafficPolicies and ServiceEntries are watched cluster-wide: a consumer route in any namespace may name a Service
//! a local pod talks to, and a local pod may call any Service or external host.

use ::kube::core::ApiResource;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::discovery::model::Kind;

/// Which pods a watch selects, relative to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeSelector {
    All,
    ThisNode,
    OtherNodes,
}

#[derive(Debug, Clone)]
pub(crate) struct WatchSpec {
    /// For logs and errors: `pods (this node)`, `services`, ...
    pub label: &'static str,
    pub resource: ApiResource,
    pub kind: Kind,
    pub namespaced: bool,
    pub nodes: NodeSelector,
    /// A 404 on the list means "not installed", not an error: carry on without it.
    pub optional: bool,
}

impl WatchSpec {
    /// The field selector for this watch on `node`.
    pub fn field_selector(&self, node: &str) -> Option<String> {
        match self.nodes {
            NodeSelector::All => None,
            NodeSelector::ThisNode => Some(format!("spec.nodeName={node}")),
            NodeSelector::OtherNodes => Some(format!("spec.nodeName!={node}")),
        }
    }
}

/// The group/version sluice reads AuthorizationPolicies at. v1 is served by Istio 1.22 and
/// later, with the same schema as v1beta1.
pub(crate) fn authorization_policy_resource() -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    }
}

/// Istio's other security kinds (PeerAuthentication, RequestAuthentication), read at
/// `security.istio.io/v1` like AuthorizationPolicy.
pub(crate) fn istio_security_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The group/version sluice reads the Gateway API's routes at (Gateway API v1.1 and later serve
/// both HTTPRoute and GRPCRoute at v1). `kind` is `HTTPRoute` or `GRPCRoute`.
pub(crate) fn gateway_route_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The group/version sluice reads its own TrafficPolicies at (deploy/crds/).
pub(crate) fn traffic_policy_resource() -> ApiResource {
    ApiResource {
        group: "sluice.dev".into(),
        version: "v1alpha1".into(),
        api_version: "sluice.dev/v1alpha1".into(),
        kind: "TrafficPolicy".into(),
        plural: "trafficpolicies".into(),
    }
}

/// The group/version sluice reads Istio's ServiceEntries at. v1 is served by Istio 1.22 and
/// later, with the same schema as v1beta1.
pub(crate) fn service_entry_resource() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "ServiceEntry".into(),
        plural: "serviceentries".into(),
    }
}

/// The group/version sluice reads Istio's VirtualServices at (v1, Istio 1.22 and later; the
/// same schema as v1beta1 and v1alpha3).
pub(crate) fn virtual_service_resource() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "VirtualService".into(),
        plural: "virtualservices".into(),
    }
}

/// The group/version sluice reads Istio's DestinationRules at. v1 is served by Istio 1.22 and
/// later, with the same schema as v1beta1 and v1alpha3.
pub(crate) fn destination_rule_resource() -> ApiResource {
    ApiResource {
        group: "networking.istio.io".into(),
        version: "v1".into(),
        api_version: "networking.istio.io/v1".into(),
        kind: "DestinationRule".into(),
        plural: "destinationrules".into(),
    }
}

/// Every watch, in the order their objects are fed to the model.
pub(crate) fn watches() -> Vec<WatchSpec> {
    let spec = |label, resource, kind, namespaced, nodes, optional| WatchSpec {
        label,
        resource,
        kind,
        namespaced,
        nodes,
        optional,
    };
    use NodeSelector::*;
    vec![
        spec("namespaces", ApiResource::erase::<Namespace>(&()), Kind::Namespace, false, All, false),
        spec("pods (this node)", ApiResource::erase::<Pod>(&()), Kind::Pod, true, ThisNode, false),
        spec("pods (other nodes)", ApiResource::erase::<Pod>(&()), Kind::Pod, true, OtherNodes, false),
        spec("services", ApiResource::erase::<Service>(&()), Kind::Service, true, All, false),
        spec(
            "endpointslices",
            ApiResource::erase::<EndpointSlice>(&()),
            Kind::EndpointSlice,
            true,
            All,
            false,
        ),
        spec(
            "authorizationpolicies",
            authorization_policy_resource(),
            Kind::AuthorizationPolicy,
            true,
            All,
            true,
        ),
        spec(
            "httproutes",
            gateway_route_resource("HTTPRoute", "httproutes"),
            Kind::HttpRoute,
            true,
            All,
            true,
        ),
        spec(
            "grpcroutes",
            gateway_route_resource("GRPCRoute", "grpcroutes"),
            Kind::GrpcRoute,
            true,
            All,
            true,
        ),
        spec("trafficpolicies", traffic_policy_resource(), Kind::TrafficPolicy, true, All, true),
        spec("serviceentries", service_entry_resource(), Kind::ServiceEntry, true, All, true),
        spec("virtualservices", virtual_service_resource(), Kind::VirtualService, true, All, true),
        spec(
            "peerauthentications",
            istio_security_resource("PeerAuthentication", "peerauthentications"),
            Kind::PeerAuthentication,
            true,
            All,
            true,
        ),
        spec(
            "requestauthentications",
            istio_security_resource("RequestAuthentication", "requestauthentications"),
            Kind::RequestAuthentication,
            true,
            All,
            true,
        ),
        spec("destinationrules", destination_rule_resource(), Kind::DestinationRule, true, All, true),
    ]
}
