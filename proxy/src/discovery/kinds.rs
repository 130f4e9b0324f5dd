//! Parsers for the kinds in the registry (`manifest::KINDS`): core/v1 Namespace, Pod and
//! Service (a Namespace's annotations: enrollment, peer authentication, outbound traffic policy),
//! and discovery.k8s.io/v1 EndpointSlice. Each takes validated metadata and the whole document,
//! reads the fields sluice uses and ignores the rest (status.conditions, managedFields,
//! containers, ...), applying the API's defaults. The Gateway API's routes have a module of
//! their own, `kinds_route`, TrafficPolicy and ServiceEntry theirs, `kinds_traffic`, and Istio's
//! security kinds (AuthorizationPolicy, PeerAuthentication, RequestAuthentication) theirs under
//! `istio/`, parsed with serde types.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

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

pub(crate) fn pod(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    // The uid names the pod's cgroup, which is how the node finds the pod's processes and
    // network namespace; a pod without one could never be enrolled.
    let uid = meta.uid.ok_or_else(|| DocError::Missing { field: "metadata.uid".into() })?;
    let (service_account, node_name, host_network) = match doc.get("spec") {
        None => (None, None, false),
        Some(spec) => {
            spec.expect_mapping()?;
            let sa = match spec.opt_str("serviceAccountName")? {
                Some(sa) => Some(sa),
                None => spec.opt_str("serviceAccount")?, // deprecated alias, still honoured
            };
            let node = spec.opt_str("nodeName")?;
            (sa, node, spec.opt_bool("hostNetwork")?.unwrap_or(false))
        }
    };
    let status = doc.require("status")?;
    let ip = status.require("podIP")?.as_ip()?;
    let ips = pod_ips(&status, ip)?;
    let phase = match status.get("phase") {
        // A manifest that states a pod's IP describes a pod that exists; a hand-written one
        // often leaves the phase out.
        None => PodPhase::Running,
        Some(n) => match n.as_str()? {
            "Pending" => PodPhase::Pending,
            "Running" => PodPhase::Running,
            "Succeeded" => PodPhase::Succeeded,
            "Failed" => PodPhase::Failed,
            "Unknown" => PodPhase::Unknown,
            other => {
                return Err(n.invalid(format!(
                    "{other:?} is not a pod phase (Pending, Running, Succeeded, Failed, Unknown)"
                )))
            }
        },
    };
    let (controller, generate_name) = match doc.get("metadata") {
        None => (None, None),
        Some(metadata) => (controller_ref(&metadata)?, metadata.opt_str("generateName")?.map(str::to_owned)),
    };
    Ok(Object::Pod(Arc::new(Pod {
        namespace: meta.namespace,
        name: meta.name,
        uid,
        labels: meta.labels,
        annotations: meta.annotations,
        service_account: service_account.unwrap_or("default").to_owned(),
        node_name: node_name.map(str::to_owned),
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
/// them; `apiVersion` and `uid` are not needed and not read.
fn controller_ref(metadata: &Node<'_>) -> Result<Option<OwnerRef>, DocError> {
    let mut found = None;
    for r in metadata.list("ownerReferences")? {
        r.expect_mapping()?;
        let (kind, name) = (required_str(&r, "kind")?, required_str(&r, "name")?);
        if r.opt_bool("controller")? == Some(true) && found.is_none() {
            found = Some(OwnerRef { kind: kind.to_owned(), name: name.to_owned() });
        }
    }
    Ok(found)
}

/// A string field that must be present and not empty.
fn required_str<'a>(node: &Node<'a>, key: &str) -> Result<&'a str, DocError> {
    let field = node.require(key)?;
    match field.as_str()? {
        "" => Err(field.invalid("must not be empty")),
        s => Ok(s),
    }
}

/// `status.podIPs[].ip`, checked the way the API server guarantees them: the first is podIP,
/// and there is at most one address per family. Absent (a single-stack pod written by hand, or
/// an API server older than dual stack), the pod's addresses are just podIP.
fn pod_ips(status: &Node<'_>, primary: IpAddr) -> Result<Vec<IpAddr>, DocError> {
    let nodes = status.list("podIPs")?;
    if nodes.is_empty() {
        return Ok(vec![primary]);
    }
    let mut ips: Vec<IpAddr> = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let ip = node.require("ip")?.as_ip()?;
        if let Some(first) = ips.iter().find(|p| AddressType::of(**p) == AddressType::of(ip)) {
            return Err(node.invalid(format!(
                "{ip} is a second {} address ({first} is the first); a pod has at most one address per family",
                AddressType::of(ip)
            )));
        }
        ips.push(ip);
    }
    if ips[0] != primary {
        return Err(nodes[0].invalid(format!(
            "{} differs from status.podIP {primary}; the first of podIPs must be podIP",
            ips[0]
        )));
    }
    Ok(ips)
}

pub(crate) fn service(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let (cluster_ips, ports, selector) = match doc.get("spec") {
        None => (Vec::new(), Vec::new(), Default::default()),
        Some(spec) => {
            spec.expect_mapping()?;
            (cluster_ips(&spec)?, service_ports(&spec)?, spec.string_map("selector")?)
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

fn cluster_ip(spec: &Node<'_>) -> Result<ClusterIp, DocError> {
    let Some(node) = spec.get("clusterIP") else {
        return Ok(ClusterIp::Unset);
    };
    match node.as_str()? {
        "" => Ok(ClusterIp::Unset),
        "None" => Ok(ClusterIp::Headless),
        s => s.parse().map(ClusterIp::Ip).map_err(|_| {
            node.invalid(format!("{s:?} is not an IP address (use \"None\" for a headless Service)"))
        }),
    }
}

/// `spec.clusterIPs`, with the API server's rules: at most one address per family, the first
/// equal to clusterIP when both are given, `["None"]` alone for a headless Service. Without
/// clusterIPs, clusterIP alone says it (a single-stack Service, or a manifest written by hand).
/// `spec.ipFamilies` and `spec.ipFamilyPolicy` are not read: they are how a Service asks for
/// its addresses, and clusterIPs is what it got.
fn cluster_ips(spec: &Node<'_>) -> Result<Vec<IpAddr>, DocError> {
    let primary = cluster_ip(spec)?;
    let nodes = spec.str_list("clusterIPs")?;
    if nodes.is_empty() {
        return Ok(match primary {
            ClusterIp::Ip(ip) => vec![ip],
            ClusterIp::Unset | ClusterIp::Headless => Vec::new(),
        });
    }
    if let Some((node, _)) = nodes.iter().find(|(_, s)| *s == "None") {
        if nodes.len() > 1 {
            return Err(node.invalid("\"None\" (headless) must be the only entry of clusterIPs"));
        }
        if let ClusterIp::Ip(ip) = primary {
            return Err(node.invalid(format!("the Service is headless here but spec.clusterIP is {ip}")));
        }
        return Ok(Vec::new());
    }
    let mut ips: Vec<IpAddr> = Vec::with_capacity(nodes.len());
    for (node, s) in &nodes {
        let ip: IpAddr = s.parse().map_err(|_| {
            node.invalid(format!("{s:?} is not an IP address (use [\"None\"] for a headless Service)"))
        })?;
        if let Some(first) = ips.iter().find(|p| AddressType::of(**p) == AddressType::of(ip)) {
            return Err(node.invalid(format!(
                "{ip} is a second {} ClusterIP ({first} is the first); a Service has at most one per family",
                AddressType::of(ip)
            )));
        }
        ips.push(ip);
    }
    match primary {
        ClusterIp::Ip(ip) if ip != ips[0] => Err(nodes[0].0.invalid(format!(
            "{} differs from spec.clusterIP {ip}; the first of clusterIPs must be clusterIP",
            ips[0]
        ))),
        ClusterIp::Headless => {
            Err(nodes[0].0.invalid("spec.clusterIP is \"None\" (headless) but clusterIPs lists addresses"))
        }
        _ => Ok(ips),
    }
}

fn service_ports(spec: &Node<'_>) -> Result<Vec<ServicePort>, DocError> {
    let nodes = spec.list("ports")?;
    let mut ports = Vec::with_capacity(nodes.len());
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for node in &nodes {
        let name = port_name(node)?;
        // The API's rules: with several ports every port is named, and names and
        // (port, protocol) pairs are unique. Resolution to endpoints relies on the names.
        if nodes.len() > 1 && name.is_none() {
            return Err(node.invalid("a port must have a name when a Service has several ports"));
        }
        if let Some(name) = &name {
            if !names.insert(name.clone()) {
                return Err(node.invalid(format!("duplicate port name {name:?}")));
            }
        }
        let port = node.require("port")?.as_port()?;
        let protocol = protocol(node)?;
        if !numbers.insert((port, protocol)) {
            return Err(node.invalid(format!("duplicate port {port}/{protocol}")));
        }
        let target_port = match node.get("targetPort") {
            None => TargetPort::Number(port),
            Some(t) => match t.value.as_str() {
                Some(s) => match check_port_name(s) {
                    None => TargetPort::Name(s.to_owned()),
                    Some(reason) => return Err(t.invalid(reason)),
                },
                None => TargetPort::Number(t.as_port()?),
            },
        };
        ports.push(ServicePort {
            name,
            port,
            target_port,
            protocol,
            app_protocol: node.opt_str("appProtocol")?.map(str::to_owned),
        });
    }
    Ok(ports)
}

/// A port's optional name ("" is no name), which must be a DNS label.
fn port_name(node: &Node<'_>) -> Result<Option<String>, DocError> {
    let Some(name) = node.opt_str("name")? else {
        return Ok(None);
    };
    if let Some(reason) = NameRule::Dns1123Label.check(name) {
        return Err(node.require("name")?.invalid(reason));
    }
    Ok(Some(name.to_owned()))
}

fn protocol(node: &Node<'_>) -> Result<Protocol, DocError> {
    let Some(p) = node.get("protocol") else {
        return Ok(Protocol::Tcp);
    };
    match p.as_str()? {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(p.invalid(format!("{other:?} is not a protocol (TCP, UDP, SCTP)"))),
    }
}

pub(crate) fn endpoint_slice(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    // Without the label the slice belongs to no Service; in a manifest that is a mistake.
    let service_name = meta
        .labels
        .get(SERVICE_NAME_LABEL)
        .cloned()
        .ok_or_else(|| DocError::Missing { field: format!("metadata.labels[{SERVICE_NAME_LABEL:?}]") })?;
    let at = doc.require("addressType")?;
    let address_type = match at.as_str()? {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        "FQDN" => return Err(at.invalid("addressType FQDN is not supported (deprecated upstream)")),
        other => return Err(at.invalid(format!("{other:?} is not an address type (IPv4, IPv6)"))),
    };
    let mut ports = Vec::new();
    for node in doc.list("ports")? {
        ports.push(EndpointPort {
            name: port_name(&node)?,
            port: node.require("port")?.as_port()?,
            protocol: protocol(&node)?,
            app_protocol: node.opt_str("appProtocol")?.map(str::to_owned),
        });
    }
    let mut endpoints = Vec::new();
    for node in doc.list("endpoints")? {
        endpoints.push(endpoint(&node, address_type, &meta.namespace)?);
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

fn endpoint(node: &Node<'_>, family: AddressType, namespace: &str) -> Result<Endpoint, DocError> {
    let addrs = node.list("addresses")?;
    if addrs.is_empty() {
        return Err(match node.get("addresses") {
            None => DocError::Missing { field: node.child_path("addresses") },
            Some(list) => list.invalid("must list at least one address"),
        });
    }
    let mut addresses = Vec::with_capacity(addrs.len());
    for a in &addrs {
        let ip = a.as_ip()?;
        let matches = match family {
            AddressType::IPv4 => ip.is_ipv4(),
            AddressType::IPv6 => ip.is_ipv6(),
        };
        if !matches {
            return Err(a.invalid(format!("{ip} does not match the slice's addressType {family:?}")));
        }
        addresses.push(ip);
    }
    // Condition defaults per the EndpointSlice API: a nil ready or serving means true, a nil
    // terminating means false.
    let (ready, serving, terminating) = match node.get("conditions") {
        None => (true, true, false),
        Some(c) => {
            c.expect_mapping()?;
            (
                c.opt_bool("ready")?.unwrap_or(true),
                c.opt_bool("serving")?.unwrap_or(true),
                c.opt_bool("terminating")?.unwrap_or(false),
            )
        }
    };
    let target_ref = match node.get("targetRef") {
        Some(r) if r.opt_str("kind")?.is_none_or(|k| k == "Pod") => Some(PodRef {
            namespace: r.opt_str("namespace")?.unwrap_or(namespace).to_owned(),
            name: r.require("name")?.as_str()?.to_owned(),
        }),
        _ => None, // a reference to something other than a pod is of no use to the data path
    };
    Ok(Endpoint {
        addresses,
        ready,
        serving,
        terminating,
        node_name: node.opt_str("nodeName")?.map(str::to_owned),
        target_ref,
    })
}
