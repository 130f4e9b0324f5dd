//! The objects of the model: plain Rust structs distilled from Kubernetes objects.
//!
//! Only the fields sluice acts on are kept; everything else in a manifest (managedFields,
//! status.conditions, container specs, ...) is dropped at parse time, so a snapshot stays small
//! and cheap to rebuild. Objects are shared behind `Arc` between snapshots: rebuilding the
//! model after one file changed re-uses every other file's objects without copying them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::istio::virtual_service::VirtualService;
use super::istio::destination_rule::DestinationRule;
use super::route::{Route, RouteKind};
use super::traffic::{OutboundPolicy, ServiceEntry, TrafficPolicy};

pub use super::istio::authorization_policy::{
    AuthorizationPolicy, AuthzAction, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource, ConditionKey,
    ConditionValues,
};
pub use super::istio::peer_authentication::{MtlsMode, PeerAuthentication};
pub use super::istio::request_authentication::{JwksSource, JwtRule, RequestAuthentication};

/// Labels and annotations. A `BTreeMap` keeps them in a stable order for logs and the admin API.
pub type Labels = BTreeMap<String, String>;

/// The namespace annotation that enrolls a namespace in the mesh...
pub const MESH_ANNOTATION: &str = "sluice.dev/mesh";
/// ...when it has exactly this value.
pub const MESH_ENABLED: &str = "enabled";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The namespace annotation that sets the namespace's [`PeerAuthMode`] (`STRICT` or
/// `PERMISSIVE`; absent means PERMISSIVE).
pub const PEER_AUTH_ANNOTATION: &str = "sluice.dev/peer-authentication";

/// Whether an enrolled pod accepts plaintext from clients outside the mesh: the mode in force
/// for a pod and port, from Istio's PeerAuthentications or the namespace annotation
/// [`PEER_AUTH_ANNOTATION`] (see `policy::peer_auth` for how they combine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum PeerAuthMode {
    /// Mutual TLS from mesh clients, plaintext from everyone else. The default, as in Istio.
    #[default]
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    /// Mutual TLS only: plaintext connections are refused.
    #[serde(rename = "STRICT")]
    Strict,
    /// No mutual TLS towards this pod: plaintext is accepted, and mesh clients send plaintext
    /// too (they do not tunnel to it), as Istio's sidecars do for a DISABLE destination.
    #[serde(rename = "DISABLE")]
    Disable,
}

impl PeerAuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerAuthMode::Permissive => "PERMISSIVE",
            PeerAuthMode::Strict => "STRICT",
            PeerAuthMode::Disable => "DISABLE",
        }
    }

    /// Whether a plaintext connection (no client certificate) may be accepted.
    pub fn accepts_plaintext(self) -> bool {
        self != PeerAuthMode::Strict
    }
}

impl fmt::Display for PeerAuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
    /// `annotations["sluice.dev/mesh"] == "enabled"`, computed once at parse time.
    pub enrolled: bool,
    /// `annotations["sluice.dev/peer-authentication"]`, PERMISSIVE when absent.
    pub peer_auth: PeerAuthMode,
    /// Whether that annotation is there at all (absent, the namespace has no say of its own:
    /// the mesh-wide PeerAuthentication applies).
    pub peer_auth_annotated: bool,
    /// `annotations["sluice.dev/outbound-traffic-policy"]`, ALLOW_ANY when absent.
    pub outbound_policy: OutboundPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
            PodPhase::Unknown => "Unknown",
        }
    }

    /// A pod in a terminal phase has stopped for good; its IP may already belong to another pod.
    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

impl fmt::Display for PodPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// metadata.uid: names the pod's cgroup (`kubepods/<qos>/pod<uid>`), hence required.
    pub uid: String,
    pub labels: Labels,
    pub annotations: Labels,
    /// spec.serviceAccountName (or the deprecated spec.serviceAccount), else "default".
    pub service_account: String,
    /// spec.nodeName; `None` for a pod not scheduled yet.
    pub node_name: Option<String>,
    /// status.podIP: the pod's primary address, the first of `ips`.
    pub ip: IpAddr,
    /// status.podIPs: every address of the pod, at most one per family, the primary first
    /// (`[ip]` when the manifest does not list them). A dual-stack pod has an IPv4 and an IPv6
    /// address; link-local addresses are never listed (they are not unique across links).
    pub ips: Vec<IpAddr>,
    /// spec.hostNetwork: such a pod shares its node's IP, so it is left out of `pod_by_ip`.
    pub host_network: bool,
    pub phase: PodPhase,
    /// The controller among metadata.ownerReferences (the one with `controller: true`; the API
    /// allows at most one): what telemetry names the pod's workload after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<OwnerRef>,
    /// metadata.generateName: the prefix the API server completed into the pod's name, when
    /// the name was generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
}

/// An owner reference: the kind and name of the object that controls a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Service port's targetPort: a number, or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// `None` when the manifest has no name (or ""); only a single-port Service may omit it.
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to `port` when absent, as Kubernetes does. Informational: the port endpoints
    /// listen on is what the EndpointSlice says.
    pub target_port: TargetPort,
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// spec.clusterIP: the primary ClusterIP, the first of `cluster_ips`; `None` for a headless
    /// Service ("None") or one without an address.
    pub cluster_ip: Option<IpAddr>,
    /// spec.clusterIPs: one ClusterIP per family the Service has, the primary first (taken from
    /// clusterIP when the manifest does not list them); empty for a headless Service. A
    /// connection to one of them goes to the ready endpoints of the same family.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: Labels,
}

/// An address family: an EndpointSlice's `addressType`, and the family of a pod IP or a
/// ClusterIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum AddressType {
    IPv4,
    IPv6,
}

impl AddressType {
    /// The family of `ip`. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack
    /// socket reports for an IPv4 peer) is IPv4, as it is everywhere in the model's lookups.
    pub fn of(ip: IpAddr) -> AddressType {
        match ip.to_canonical() {
            IpAddr::V4(_) => AddressType::IPv4,
            IpAddr::V6(_) => AddressType::IPv6,
        }
    }

    /// `IPv4` or `IPv6`, as the Kubernetes API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
        }
    }

    /// The other family.
    pub fn other(self) -> AddressType {
        match self {
            AddressType::IPv4 => AddressType::IPv6,
            AddressType::IPv6 => AddressType::IPv4,
        }
    }
}

impl fmt::Display for AddressType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

/// `namespace/name` of the pod behind an endpoint (targetRef of kind Pod).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// conditions.ready; absent means ready (Kubernetes API semantics).
    pub ready: bool,
    /// conditions.serving; absent means serving.
    pub serving: bool,
    /// conditions.terminating; absent means not terminating.
    pub terminating: bool,
    pub node_name: Option<String>,
    pub target_ref: Option<PodRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service_name: String,
    pub address_type: AddressType,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

/// One value of a `principals` or `namespaces` list, matched the way Istio matches it: `*` is
/// any (non-empty) value, `abc*` a prefix, `*abc` a suffix, anything else exact.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    /// Parses a value as written in a policy. Fails on an empty value and on a `*` anywhere
    /// but at one end (Istio would take such a `*` literally, which never matches an
    /// identity and so is always a mistake).
    pub fn parse(s: &str) -> Result<StringMatch, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s == "*" {
            return Ok(StringMatch::Any);
        }
        let inner = s.strip_prefix('*').or_else(|| s.strip_suffix('*')).unwrap_or(s);
        if inner.contains('*') {
            return Err(format!(
                "{s:?}: a wildcard '*' may only stand alone, at the start or at the end (as in Istio)"
            ));
        }
        Ok(if s.starts_with('*') {
            StringMatch::Suffix(inner.to_owned())
        } else if s.ends_with('*') {
            StringMatch::Prefix(inner.to_owned())
        } else {
            StringMatch::Exact(s.to_owned())
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Any => !value.is_empty(),
            StringMatch::Exact(v) => value == v,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for StringMatch {
    /// The form a policy writes (`*`, `abc*`, `*abc`, `abc`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Any => f.write_str("*"),
            StringMatch::Exact(v) => f.write_str(v),
            StringMatch::Prefix(v) => write!(f, "{v}*"),
            StringMatch::Suffix(v) => write!(f, "*{v}"),
        }
    }
}

impl Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The kinds the model knows. Adding a kind means: a variant here and in [`Object`], a parser
/// registered in `manifest::KINDS`, and a map in `Model` (see `snapshot.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    AuthorizationPolicy,
    HttpRoute,
    GrpcRoute,
    TrafficPolicy,
    ServiceEntry,
    VirtualService,
    PeerAuthentication,
    RequestAuthentication,
    DestinationRule,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::VirtualService => "VirtualService",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::DestinationRule => "DestinationRule",
        }
    }
}

impl From<RouteKind> for Kind {
    fn from(kind: RouteKind) -> Kind {
        match kind {
            RouteKind::Http => Kind::HttpRoute,
            RouteKind::Grpc => Kind::GrpcRoute,
            RouteKind::VirtualService => Kind::VirtualService,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of an object across files: two definitions with the same key conflict.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    /// Empty for cluster-scoped kinds (Namespace).
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {:?}", self.kind, self.name)
        } else {
            write!(f, "{} \"{}/{}\"", self.kind, self.namespace, self.name)
        }
    }
}

/// One parsed object, as a manifest file yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    /// An HTTPRoute or a GRPCRoute: its kind (part of the key) is [`Route::kind`].
    Route(Arc<Route>),
    TrafficPolicy(Arc<TrafficPolicy>),
    ServiceEntry(Arc<ServiceEntry>),
    VirtualService(Arc<VirtualService>),
    PeerAuthentication(Arc<PeerAuthentication>),
    RequestAuthentication(Arc<RequestAuthentication>),
    DestinationRule(Arc<DestinationRule>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::Route(o) => o.kind.into(),
            Object::TrafficPolicy(_) => Kind::TrafficPolicy,
            Object::ServiceEntry(_) => Kind::ServiceEntry,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::RequestAuthentication(_) => Kind::RequestAuthentication,
            Object::DestinationRule(_) => Kind::DestinationRule,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let (namespace, name) = match self {
            Object::Namespace(o) => ("", o.name.as_str()),
            Object::Pod(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::Service(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::EndpointSlice(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::AuthorizationPolicy(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::Route(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::TrafficPolicy(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::ServiceEntry(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::VirtualService(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::PeerAuthentication(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::RequestAuthentication(o) => (o.namespace.as_str(), o.name.as_str()),
            Object::DestinationRule(o) => (o.namespace.as_str(), o.name.as_str()),
        };
        ObjectKey { kind: self.kind(), namespace: namespace.to_owned(), name: name.to_owned() }
    }
}
