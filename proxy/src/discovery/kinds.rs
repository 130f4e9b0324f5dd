//! Parsers for the kinds in the registry (`manifest::KINDS`): core/v1 Namespace, Pod and
//! Service (a Namespace's annotations: enrollment, peer authentication, outbound traffic policy),
//! and discovery.k8s.io/v1 EndpointSlice. Each takes validated metadata and the whole document,
//! deserializes the fields sluice uses into k8s-openapi's types (errors name the field path:
//! `spec.ports[0].port: invalid type: string "80", expected i32`), ignores the rest
//! (managedFields, containers, ...), and checks on the typed values what the API server would
//! (ranges, one address per family, unique port names), applying the API's defaults. The Gateway API's routes have a module of
//! their own, `kinds_route`, TrafficPolicy and ServiceEntry theirs, `kinds_traffic`, and Istio's
//! security kinds (AuthorizationPolicy, PeerAuthentication, RequestAuthentication) theirs under
//! `istio/`, parsed with serde types.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{PodIP, PodStatus, ServicePort as K8sServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint as K8sEndpoint, EndpointPort as K8sEndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use super::fields::{check_port_name, NameRule, Node};
use super::manifest::{DocError, Meta};
use super::model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Namespace, Object, OwnerRef, PeerAuthMode, Pod,
    PodPhase, PodRef, Protocol, Service, ServicePort, TargetPort, MESH_ANNOTATION, MESH_ENABLED,
    PEER_AUTH_ANNOTATION, SERVICE_NAME_LABEL,
};
use super::traffic::{OutboundPolicy, OUTBOUND_POLICY_ANNOTATION};

pub(crate) fn namespace(meta: Meta, _doc: &Node<'_>) -> Result<Object, DocError> {
    let enrolled = meta.annotations.get(MESH_ANNOTATION).is_some_and(|v| v == MESH_ENABLED);
    let annotation = meta.annotations.get(PEER_AUTH_ANNOTATION).map(String::as_str);
    let peer_auth_annotated = annotation.is_some();
    let peer_auth = match annotation {
        None => PeerAuthMode::Permissive,
        Some("PERMISSIVE") => PeerAuthMode::Permissive,
        Some("STRICT") => PeerAuthMode::Strict,
        // A typo must not leave a namespace the operator meant to lock down open.
        Some(other) => {
            return Err(DocError::Invalid {
                field: format!("metadata.annotations[{PEER_AUTH_ANNOTATION:?}]"),
                reason: format!("{other:?} is not a peer authentication mode (STRICT, PERMISSIVE)"),
            })
        }
    };
    let outbound_policy = match meta.annotations.get(OUTBOUND_POLICY_ANNOTATION).map(String::as_str) {
        None | Some("ALLOW_ANY") => OutboundPolicy::AllowAny,
        Some("REGISTRY_ONLY") => OutboundPolicy::RegistryOnly,
        // A typo must not leave open a namespace the operator meant to restrict.
        Some(other) => {
            return Err(DocError::Invalid {
                field: format!("metadata.annotations[{OUTBOUND_POLICY_ANNOTATION:?}]"),
                reason: format!("{other:?} is not an outbound traffic policy (ALLOW_ANY, REGISTRY_ONLY)"),
            })
        }
    };
    Ok(Object::Namespace(Arc::new(Namespace {
        name: meta.name,
        labels: meta.labels,
        annotations: meta.annotations,
        enrolled,
        peer_auth,
        peer_auth_annotated,
        outbound_policy,
    })))
}

/// The parts of a Pod document sluice reads. `status` and `metadata.ownerReferences` are
/// k8s-openapi's types; `spec` is a view of the four fields sluice uses, not k8s-openapi's
/// PodSpec, because that would judge the containers too: its `Quantity` is a string while
/// kube-apiserver takes `cpu: 1`, so a manifest the API accepts would be refused over a field
/// sluice never reads. `metadata`'s other fields are read (and checked) by `manifest::Meta`.
#[derive(Deserialize)]
struct PodDocument {
    metadata: Option<PodMetadata>,
    spec: Option<PodSpecFields>,
    status: Option<PodStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodMetadata {
    owner_references: Option<Vec<OwnerReference>>,
    generate_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecFields {
    service_account_name: Option<String>,
    /// The deprecated alias of serviceAccountName, still honoured.
    service_account: Option<String>,
    node_name: Option<String>,
    host_network: Option<bool>,
}

/// "" is Kubernetes' zero value: the same as absent.
fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> DocError {
    DocError::Invalid { field: field.into(), reason: reason.into() }
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, DocError> {
    s.parse().map_err(|_| invalid(field, format!("{s:?} is not an IP address")))
}

/// A TCP/UDP port number, 1-65535.
fn port_number(field: &str, n: i32) -> Result<u16, DocError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("port {n} is out of range 1-65535")))
}

pub(crate) fn pod(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    // The uid names the pod's cgroup, which is how the node finds the pod's processes and
    // network namespace; a pod without one could never be enrolled.
    let uid = meta.uid.ok_or_else(|| DocError::Missing { field: "metadata.uid".into() })?;
    let PodDocument { metadata, spec, status } = doc.typed()?;
    let (service_account, node_name, host_network) = match spec {
        None => (None, None, false),
        Some(spec) => (
            non_empty(spec.service_account_name).or(non_empty(spec.service_account)),
            non_empty(spec.node_name),
            spec.host_network.unwrap_or(false),
        ),
    };
    let status = status.ok_or_else(|| DocError::Missing { field: "status".into() })?;
    let ip = match &status.pod_ip {
        None => return Err(DocError::Missing { field: "status.podIP".into() }),
        Some(s) => parse_ip("status.podIP", s)?,
    };
    let ips = pod_ips(status.pod_ips.unwrap_or_default(), ip)?;
    let phase = match status.phase.as_deref() {
        // A manifest that states a pod's IP describes a pod that exists; a hand-written one
        // often leaves the phase out.
        None => PodPhase::Running,
        Some("Pending") => PodPhase::Pending,
        Some("Running") => PodPhase::Running,
        Some("Succeeded") => PodPhase::Succeeded,
        Some("Failed") => PodPhase::Failed,
        Some("Unknown") => PodPhase::Unknown,
        Some(other) => {
            return Err(invalid(
                "status.phase",
                format!("{other:?} is not a pod phase (Pending, Running, Succeeded, Failed, Unknown)"),
            ))
        }
    };
    let (controller, generate_name) = match metadata {
        None => (None, None),
        Some(m) => {
            let raw = doc.get("metadata").map(|n| n.list("ownerReferences")).transpose()?.unwrap_or_default();
            (controller_ref(m.owner_references.unwrap_or_default(), &raw)?, non_empty(m.generate_name))
        }
    };
    Ok(Object::Pod(Arc::new(Pod {
        namespace: meta.namespace,
        name: meta.name,
        uid,
        labels: meta.labels,
        annotations: meta.annotations,
        service_account: service_account.unwrap_or_else(|| "default".to_owned()),
        node_name,
        ip,
        ips,
        host_network,
        phase,
        controller,
        generate_name,
    })))
}

/// The controller among `metadata.ownerReferences`: the reference with `controller: true`
/// (the API server allows at most one). Other references (plain owners, for garbage
/// collection) do not name the workload. `kind` and `name` are required, as the API requires
/// them; `apiVersion` and `uid` are not needed. k8s-openapi reads an absent `kind` or `name`
/// as "": `raw` (the same list, untyped) tells "missing" from "must not be empty".
fn controller_ref(refs: Vec<OwnerReference>, raw: &[Node<'_>]) -> Result<Option<OwnerRef>, DocError> {
    let mut found = None;
    for (i, r) in refs.into_iter().enumerate() {
        for (key, value) in [("kind", &r.kind), ("name", &r.name)] {
            let field = format!("metadata.ownerReferences[{i}].{key}");
            if !raw.get(i).is_some_and(|n| n.has(key)) {
                return Err(DocError::Missing { field });
            }
            if value.is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        if r.controller == Some(true) && found.is_none() {
            found = Some(OwnerRef { kind: r.kind, name: r.name });
        }
    }
    Ok(found)
}

/// `status.podIPs[].ip`, checked the way the API server guarantees them: the first is podIP,
/// and there is at most one address per family. Absent (a single-stack pod written by hand, or
/// an API server older than dual stack), the pod's addresses are just podIP.
fn pod_ips(listed: Vec<PodIP>, primary: IpAddr) -> Result<Vec<IpAddr>, DocError> {
    if listed.is_empty() {
        return Ok(vec![primary]);
    }
    let mut ips: Vec<IpAddr> = Vec::with_capacity(listed.len());
    for (i, entry) in listed.iter().enumerate() {
        if entry.ip.is_empty() {
            return Err(DocError::Missing { field: format!("status.podIPs[{i}].ip") });
        }
        let ip = parse_ip(&format!("status.podIPs[{i}].ip"), &entry.ip)?;
        if let Some(first) = ips.iter().find(|p| AddressType::of(**p) == AddressType::of(ip)) {
            return Err(invalid(
                format!("status.podIPs[{i}]"),
                format!(
                    "{ip} is a second {} address ({first} is the first); a pod has at most one address per family",
                    AddressType::of(ip)
                ),
            ));
        }
        ips.push(ip);
    }
    if ips[0] != primary {
        return Err(invalid(
            "status.podIPs[0]",
            format!("{} differs from status.podIP {primary}; the first of podIPs must be podIP", ips[0]),
        ));
    }
    Ok(ips)
}

pub(crate) fn service(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let (cluster_ips, ports, selector) = match doc.get("spec") {
        None => (Vec::new(), Vec::new(), Default::default()),
        Some(node) => {
            let spec: ServiceSpec = node.typed()?;
            let ports = service_ports(&node, spec.ports.unwrap_or_default())?;
            (cluster_ips(spec.cluster_ip, spec.cluster_ips.unwrap_or_default())?, ports, spec.selector.unwrap_or_default())
        }
    };
    Ok(Object::Service(Arc::new(Service {
        namespace: meta.namespace,
        name: meta.name,
        labels: meta.labels,
        cluster_ip: cluster_ips.first().copied(),
        cluster_ips,
        ports,
        selector,
    })))
}

/// What `spec.clusterIP` says.
enum ClusterIp {
    /// Absent or "": no address (yet).
    Unset,
    /// "None": a headless Service.
    Headless,
    Ip(IpAddr),
}

fn cluster_ip(value: Option<String>) -> Result<ClusterIp, DocError> {
    match value.as_deref() {
        None | Some("") => Ok(ClusterIp::Unset),
        Some("None") => Ok(ClusterIp::Headless),
        Some(s) => s.parse().map(ClusterIp::Ip).map_err(|_| {
            invalid("spec.clusterIP", format!("{s:?} is not an IP address (use \"None\" for a headless Service)"))
        }),
    }
}

/// `spec.clusterIPs`, with the API server's rules: at most one address per family, the first
/// equal to clusterIP when both are given, `["None"]` alone for a headless Service. Without
/// clusterIPs, clusterIP alone says it (a single-stack Service, or a manifest written by hand).
/// `spec.ipFamilies` and `spec.ipFamilyPolicy` are not read: they are how a Service asks for
/// its addresses, and clusterIPs is what it got.
fn cluster_ips(cluster_ip_field: Option<String>, listed: Vec<String>) -> Result<Vec<IpAddr>, DocError> {
    let primary = cluster_ip(cluster_ip_field)?;
    let field = |i: usize| format!("spec.clusterIPs[{i}]");
    if listed.is_empty() {
        return Ok(match primary {
            ClusterIp::Ip(ip) => vec![ip],
            ClusterIp::Unset | ClusterIp::Headless => Vec::new(),
        });
    }
    if let Some(i) = listed.iter().position(|s| s == "None") {
        if listed.len() > 1 {
            return Err(invalid(field(i), "\"None\" (headless) must be the only entry of clusterIPs"));
        }
        if let ClusterIp::Ip(ip) = primary {
            return Err(invalid(field(i), format!("the Service is headless here but spec.clusterIP is {ip}")));
        }
        return Ok(Vec::new());
    }
    let mut ips: Vec<IpAddr> = Vec::with_capacity(listed.len());
    for (i, s) in listed.iter().enumerate() {
        let ip: IpAddr = s.parse().map_err(|_| {
            invalid(field(i), format!("{s:?} is not an IP address (use [\"None\"] for a headless Service)"))
        })?;
        if let Some(first) = ips.iter().find(|p| AddressType::of(**p) == AddressType::of(ip)) {
            return Err(invalid(
                field(i),
                format!(
                    "{ip} is a second {} ClusterIP ({first} is the first); a Service has at most one per family",
                    AddressType::of(ip)
                ),
            ));
        }
        ips.push(ip);
    }
    match primary {
        ClusterIp::Ip(ip) if ip != ips[0] => Err(invalid(
            field(0),
            format!("{} differs from spec.clusterIP {ip}; the first of clusterIPs must be clusterIP", ips[0]),
        )),
        ClusterIp::Headless => {
            Err(invalid(field(0), "spec.clusterIP is \"None\" (headless) but clusterIPs lists addresses"))
        }
        _ => Ok(ips),
    }
}

/// `spec.ports`. `spec` is the raw node, only asked whether a port states its number:
/// k8s-openapi reads an absent `port` as 0, and "missing" is a different message than "0".
fn service_ports(spec: &Node<'_>, listed: Vec<K8sServicePort>) -> Result<Vec<ServicePort>, DocError> {
    let raw = spec.list("ports")?;
    let several = listed.len() > 1;
    let mut ports = Vec::with_capacity(listed.len());
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for (i, p) in listed.into_iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        let name = port_name(&at, p.name)?;
        // The API's rules: with several ports every port is named, and names and
        // (port, protocol) pairs are unique. Resolution to endpoints relies on the names.
        if several && name.is_none() {
            return Err(invalid(&at, "a port must have a name when a Service has several ports"));
        }
        if let Some(name) = &name {
            if !names.insert(name.clone()) {
                return Err(invalid(&at, format!("duplicate port name {name:?}")));
            }
        }
        if !raw.get(i).is_some_and(|n| n.has("port")) {
            return Err(DocError::Missing { field: format!("{at}.port") });
        }
        let port = port_number(&format!("{at}.port"), p.port)?;
        let protocol = protocol(&at, p.protocol)?;
        if !numbers.insert((port, protocol)) {
            return Err(invalid(&at, format!("duplicate port {port}/{protocol}")));
        }
        let target_port = match p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::String(s)) => match check_port_name(&s) {
                None => TargetPort::Name(s),
                Some(reason) => return Err(invalid(format!("{at}.targetPort"), reason)),
            },
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(&format!("{at}.targetPort"), n)?),
        };
        ports.push(ServicePort { name, port, target_port, protocol, app_protocol: non_empty(p.app_protocol) });
    }
    Ok(ports)
}

/// A port's optional name ("" is no name), which must be a DNS label.
fn port_name(at: &str, name: Option<String>) -> Result<Option<String>, DocError> {
    let Some(name) = non_empty(name) else {
        return Ok(None);
    };
    if let Some(reason) = NameRule::Dns1123Label.check(&name) {
        return Err(invalid(format!("{at}.name"), reason));
    }
    Ok(Some(name))
}

fn protocol(at: &str, value: Option<String>) -> Result<Protocol, DocError> {
    match value.as_deref() {
        None => Ok(Protocol::Tcp),
        Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(invalid(format!("{at}.protocol"), format!("{other:?} is not a protocol (TCP, UDP, SCTP)"))),
    }
}

/// The fields of an EndpointSlice document sluice reads, as k8s-openapi types (`metadata` is
/// read by `manifest::Meta`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceFields {
    address_type: Option<String>,
    ports: Option<Vec<K8sEndpointPort>>,
    endpoints: Option<Vec<K8sEndpoint>>,
}

pub(crate) fn endpoint_slice(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    // Without the label the slice belongs to no Service; in a manifest that is a mistake.
    let service_name = meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .cloned()
        .ok_or_else(|| DocError::Missing { field: format!("metadata.labels[{SERVICE_NAME_LABEL:?}]") })?;
    let slice: SliceFields = doc.typed()?;
    let address_type = match slice.address_type.as_deref() {
        None => return Err(DocError::Missing { field: "addressType".into() }),
        Some("IPv4") => AddressType::IPv4,
        Some("IPv6") => AddressType::IPv6,
        Some("FQDN") => return Err(invalid("addressType", "addressType FQDN is not supported (deprecated upstream)")),
        Some(other) => return Err(invalid("addressType", format!("{other:?} is not an address type (IPv4, IPv6)"))),
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.unwrap_or_default().into_iter().enumerate() {
        let at = format!("ports[{i}]");
        let number = p.port.ok_or_else(|| DocError::Missing { field: format!("{at}.port") })?;
        ports.push(EndpointPort {
            name: port_name(&at, p.name)?,
            port: port_number(&format!("{at}.port"), number)?,
            protocol: protocol(&at, p.protocol)?,
            app_protocol: non_empty(p.app_protocol),
        });
    }
    let raw = doc.list("endpoints")?;
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.unwrap_or_default().into_iter().enumerate() {
        let stated = raw.get(i).is_some_and(|n| n.has("addresses"));
        endpoints.push(endpoint(&format!("endpoints[{i}]"), e, stated, address_type, &meta.namespace)?);
    }
    Ok(Object::EndpointSlice(Arc::new(EndpointSlice {
        namespace: meta.namespace,
        name: meta.name,
        service_name,
        address_type,
        ports,
        endpoints,
    })))
}

/// One endpoint. `addresses_stated` tells an absent `addresses` (which k8s-openapi reads as
/// empty) from an empty one, for the message.
fn endpoint(
    at: &str,
    e: K8sEndpoint,
    addresses_stated: bool,
    family: AddressType,
    namespace: &str,
) -> Result<Endpoint, DocError> {
    if e.addresses.is_empty() {
        return Err(if addresses_stated {
            invalid(format!("{at}.addresses"), "must list at least one address")
        } else {
            DocError::Missing { field: format!("{at}.addresses") }
        });
    }
    let mut addresses = Vec::with_capacity(e.addresses.len());
    for (i, a) in e.addresses.iter().enumerate() {
        let field = format!("{at}.addresses[{i}]");
        let ip = parse_ip(&field, a)?;
        let matches = match family {
            AddressType::IPv4 => ip.is_ipv4(),
            AddressType::IPv6 => ip.is_ipv6(),
        };
        if !matches {
            return Err(invalid(field, format!("{ip} does not match the slice's addressType {family:?}")));
        }
        addresses.push(ip);
    }
    // Condition defaults per the EndpointSlice API: a nil ready or serving means true, a nil
    // terminating means false.
    let conditions = e.conditions.unwrap_or_default();
    let target_ref = match e.target_ref {
        Some(r) if r.kind.as_deref().is_none_or(|k| k.is_empty() || k == "Pod") => Some(PodRef {
            namespace: non_empty(r.namespace).unwrap_or_else(|| namespace.to_owned()),
            name: r.name.ok_or_else(|| DocError::Missing { field: format!("{at}.targetRef.name") })?,
        }),
        _ => None, // a reference to something other than a pod is of no use to the data path
    };
    Ok(Endpoint {
        addresses,
        ready: conditions.ready.unwrap_or(true),
        serving: conditions.serving.unwrap_or(true),
        terminating: conditions.terminating.unwrap_or(false),
        node_name: non_empty(e.node_name),
        target_ref,
    })
}
