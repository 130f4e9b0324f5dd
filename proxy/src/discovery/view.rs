//! [`ModelView`]: the model as the admin API shows it (`GET /model`).
//!
//! A flat, sorted summary of what discovery knows, whichever source fed it: operators compare it
//! with `kubectl get`, and the end-to-end tests compare it with what they told the (fake) API
//! server or wrote into the manifest directory. Sorted by namespace and name so that two views
//! of the same model are byte-for-byte equal.

use std::net::IpAddr;

use serde::Serialize;

use super::model::{AddressType, PeerAuthMode, Protocol, TargetPort};
use super::route::{BackendRef, ParentRef, RouteKind};
use super::snapshot::Model;
use super::traffic::{EntryLocation, OutboundPolicy, Resolution, ServiceEntryPort, TrafficPolicy};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelView {
    /// Counts up with every snapshot the source publishes.
    pub generation: u64,
    /// Objects (manifest files, or API objects named `kubernetes:<Kind>/<ns>/<name>`) that are
    /// not in force, or not in their latest version, and why.
    pub errors: Vec<ErrorView>,
    pub namespaces: Vec<NamespaceView>,
    pub pods: Vec<PodView>,
    pub services: Vec<ServiceView>,
    pub endpoint_slices: Vec<EndpointSliceView>,
    pub authorization_policies: Vec<AuthorizationPolicyView>,
    /// HTTPRoutes and GRPCRoutes, attached to a Service of the model or not.
    pub routes: Vec<RouteView>,
    /// sluice.dev TrafficPolicies, in force or not (a newer policy for the same target is not).
    pub traffic_policies: Vec<TrafficPolicyView>,
    /// Istio ServiceEntries.
    pub service_entries: Vec<ServiceEntryView>,
    /// Istio DestinationRules as parsed (in force or not: see which applies to a client in
    /// the README's "DestinationRule"), and the counts of their resolved index.
    pub destination_rules: Vec<crate::discovery::istio::destination_rule::DestinationRule>,
    pub destination_rule_index: crate::discovery::istio::destination_rule::DrIndexStats,
    /// Istio VirtualServices, with what they apply to in this model.
    pub virtual_services: Vec<VirtualServiceView>,
    /// Istio PeerAuthentications (absent from the JSON when there are none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer_authentications: Vec<PeerAuthenticationView>,
    /// Istio RequestAuthentications (absent from the JSON when there are none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_authentications: Vec<RequestAuthenticationView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualServiceView {
    pub namespace: String,
    pub name: String,
    /// As written (empty: a delegate).
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    /// `*` (every namespace), `~` (none) or the namespaces named.
    pub export_to: Vec<String>,
    /// How many http, tcp and tls rules it has.
    pub http: usize,
    pub tcp: usize,
    pub tls: usize,
    /// What its hosts name in this model: `Service ns/name`, `ServiceEntry ns/name`.
    pub applies_to: Vec<String>,
    /// Rules that cannot apply (a missing delegate, ...), and why.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthenticationView {
    pub namespace: String,
    pub name: String,
    pub selector: Option<super::model::Labels>,
    pub mode: super::model::MtlsMode,
    /// `port=MODE`, by port.
    pub port_level: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestAuthenticationView {
    pub namespace: String,
    pub name: String,
    pub selector: super::model::Labels,
    /// `issuer (keys: <where>)` per rule.
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorView {
    /// A manifest file's path, or `kubernetes:<Kind>/<namespace>/<name>`.
    pub source: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceView {
    pub name: String,
    pub enrolled: bool,
    pub peer_auth: PeerAuthMode,
    pub outbound_policy: OutboundPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The primary address (status.podIP).
    pub ip: IpAddr,
    /// Every address (status.podIPs), the primary first.
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub service_account: String,
    pub phase: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// The primary ClusterIP (spec.clusterIP).
    pub cluster_ip: Option<IpAddr>,
    /// Every ClusterIP (spec.clusterIPs), the primary first.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePortView {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSliceView {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub address_type: AddressType,
    /// Addresses of the ready endpoints, sorted.
    pub ready_addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicyView {
    pub namespace: String,
    pub name: String,
    pub action: super::model::AuthzAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteView {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    /// The Services it attaches to: `namespace/name`, or `namespace/name:port` for one port.
    pub parents: Vec<String>,
    pub hostnames: Vec<String>,
    /// How many rules it has.
    pub rules: usize,
    /// Every rule's backends in order, as `namespace/name:port=weight`.
    pub backends: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrafficPolicyView {
    pub namespace: String,
    pub name: String,
    /// `Service web`, `Service web:http` (one port), `HTTPRoute r`, `GRPCRoute r`,
    /// `ServiceEntry e`, in the policy's order.
    pub targets: Vec<String>,
    /// The field groups the policy sets, named as in its spec: `timeouts`, `retries`,
    /// `outlierDetection`, `circuitBreaker`, `faultInjection`, `localRateLimit`, `tls`.
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEntryView {
    pub namespace: String,
    pub name: String,
    pub hosts: Vec<String>,
    /// `192.0.2.10`, `192.0.2.0/24`.
    pub addresses: Vec<String>,
    /// `number/PROTOCOL` (`80/HTTP`), with `->targetPort` when the entry sets one
    /// (`80/HTTP->8080`); just the number when the protocol is not said.
    pub ports: Vec<String>,
    pub location: EntryLocation,
    pub resolution: Resolution,
}

fn features(p: &TrafficPolicy) -> Vec<String> {
    let t = &p.timeouts;
    [
        ("timeouts", t.connect.is_some() || t.request.is_some() || t.idle.is_some()),
        ("retries", p.retries.is_some()),
        ("outlierDetection", p.outlier_detection.is_some()),
        ("circuitBreaker", p.circuit_breaker.is_some()),
        ("faultInjection", p.fault_injection.is_some()),
        ("localRateLimit", p.local_rate_limit.is_some()),
        ("tls", p.tls.is_some()),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(name, _)| name.to_owned())
    .collect()
}

fn entry_port_label(p: &ServiceEntryPort) -> String {
    let mut s = p.number.to_string();
    if !p.protocol.is_empty() {
        s = format!("{s}/{}", p.protocol);
    }
    if let Some(target) = p.target_port {
        s = format!("{s}->{target}");
    }
    s
}

fn parent_label(p: &ParentRef) -> String {
    match p.port {
        Some(port) => format!("{}/{}:{port}", p.namespace, p.name),
        None => format!("{}/{}", p.namespace, p.name),
    }
}

fn backend_label(b: &BackendRef) -> String {
    match b.port {
        Some(port) => format!("{}/{}:{port}={}", b.namespace, b.name, b.weight),
        None => format!("{}/{}={}", b.namespace, b.name, b.weight),
    }
}

impl Model {
    /// The summary `GET /model` serves.
    pub fn view(&self) -> ModelView {
        let mut namespaces: Vec<NamespaceView> = self
            .namespaces()
            .map(|n| NamespaceView {
                name: n.name.clone(),
                enrolled: n.enrolled,
                peer_auth: n.peer_auth,
                outbound_policy: n.outbound_policy,
            })
            .collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));

        let mut pods: Vec<PodView> = self
            .pods()
            .map(|p| PodView {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                ip: p.ip,
                ips: p.ips.clone(),
                node: p.node_name.clone(),
                service_account: p.service_account.clone(),
                phase: p.phase.as_str().to_owned(),
            })
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        let mut services: Vec<ServiceView> = self
            .services()
            .map(|s| ServiceView {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                cluster_ip: s.cluster_ip,
                cluster_ips: s.cluster_ips.clone(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePortView {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: p.protocol,
                        target_port: p.target_port.clone(),
                    })
                    .collect(),
            })
            .collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        let mut endpoint_slices: Vec<EndpointSliceView> = self
            .endpoint_slices()
            .map(|s| {
                let mut ready: Vec<IpAddr> = s
                    .endpoints
                    .iter()
                    .filter(|e| e.ready)
                    .flat_map(|e| e.addresses.iter().copied())
                    .collect();
                ready.sort_unstable();
                ready.dedup();
                EndpointSliceView {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    service: s.service_name.clone(),
                    address_type: s.address_type,
                    ready_addresses: ready,
                }
            })
            .collect();
        endpoint_slices.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        let mut authorization_policies: Vec<AuthorizationPolicyView> = self
            .all_authorization_policies()
            .map(|p| AuthorizationPolicyView {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                action: p.action,
            })
            .collect();
        authorization_policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        let mut routes: Vec<RouteView> = self
            .routes()
            .map(|r| RouteView {
                kind: r.kind,
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                parents: r.parents.iter().map(parent_label).collect(),
                hostnames: r.hostnames.clone(),
                rules: r.rules.len(),
                backends: r.rules.iter().flat_map(|rule| rule.backends.iter().map(backend_label)).collect(),
            })
            .collect();
        routes.sort_by(|a, b| (&a.namespace, &a.name, a.kind).cmp(&(&b.namespace, &b.name, b.kind)));

        let mut traffic_policies: Vec<TrafficPolicyView> = self
            .traffic_policies()
            .map(|p| TrafficPolicyView {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                targets: p.targets.iter().map(ToString::to_string).collect(),
                features: features(p),
            })
            .collect();
        traffic_policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        let mut service_entries: Vec<ServiceEntryView> = self
            .service_entries()
            .map(|e| ServiceEntryView {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                hosts: e.hosts.clone(),
                addresses: e.addresses.iter().map(ToString::to_string).collect(),
                ports: e.ports.iter().map(entry_port_label).collect(),
                location: e.location,
                resolution: e.resolution,
            })
            .collect();
        service_entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        let mut virtual_services: Vec<VirtualServiceView> = self
            .virtual_services()
            .map(|v| {
                let status = self.virtual_service_status(&v.key()).cloned().unwrap_or_default();
                VirtualServiceView {
                    namespace: v.namespace.clone(),
                    name: v.name.clone(),
                    hosts: v.hosts.clone(),
                    gateways: v.gateways.clone(),
                    export_to: if v.export_to.none {
                        vec!["~".into()]
                    } else if v.export_to.public {
                        vec!["*".into()]
                    } else {
                        v.export_to.namespaces.clone()
                    },
                    http: v.http.len(),
                    tcp: v.tcp.len(),
                    tls: v.tls.len(),
                    applies_to: status.targets,
                    problems: status.problems,
                }
            })
            .collect();
        virtual_services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut peer_authentications: Vec<PeerAuthenticationView> = self
            .all_peer_authentications()
            .map(|p| PeerAuthenticationView {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                selector: p.selector.clone(),
                mode: p.mode,
                port_level: p.port_level.iter().map(|(port, m)| format!("{port}={m}")).collect(),
            })
            .collect();
        peer_authentications.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut request_authentications: Vec<RequestAuthenticationView> = self
            .all_request_authentications()
            .map(|r| RequestAuthenticationView {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                selector: r.selector.clone(),
                rules: r.rules.iter().map(|j| format!("{} (keys: {})", j.issuer, j.jwks)).collect(),
            })
            .collect();
        request_authentications.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

        ModelView {
            generation: self.generation(),
            errors: self
                .errors()
                .iter()
                .map(|e| ErrorView { source: e.file.display().to_string(), reason: e.reason.clone() })
                .collect(),
            namespaces,
            pods,
            services,
            endpoint_slices,
            authorization_policies,
            routes,
            traffic_policies,
            service_entries,
            destination_rules: {
                let mut rules: Vec<_> = self.destination_rules().map(|r| (**r).clone()).collect();
                rules.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                rules
            },
            destination_rule_index: self.destination_rule_index().stats,
            virtual_services,
            peer_authentications,
            request_authentications,
        }
    }
}
