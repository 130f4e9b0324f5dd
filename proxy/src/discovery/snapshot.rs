//! [`Model`]: one immutable snapshot of everything discovery knows.
//!
//! A snapshot is built on the control path whenever a source changes and is then only read.
//! Every index the data path needs is computed here, once per snapshot, so that lookups are a
//! hash probe with no allocation: `service_for` (ClusterIP:port → Service port and its ready
//! endpoints), `pod_by_ip`, the authorization policies of a namespace in name order, the
//! routes attached to a Service port in precedence order, the TrafficPolicy in force for a
//! Service port, a route or a ServiceEntry, and the ServiceEntry behind an address or a host.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::istio::destination_rule::{DestinationRule, DrIndex};
use super::manifest::{self, Format, ParseError};
use super::model::{
    AddressType, AuthorizationPolicy, EndpointSlice, Namespace, Object, PeerAuthMode, PeerAuthentication, Pod,
    PodPhase, Protocol, RequestAuthentication, Service, ServicePort,
};
use super::istio::virtual_service::VirtualService;
use super::istio::vs_compile::{self, VsIndex, VsStatus};
use super::istio::vs_mixing::{self, StreamChains};
use super::route::{Route, RouteKind};
use super::route_table::PortRoutes;
use super::traffic::{
    IpNet, OutboundPolicy, PolicyTarget, Resolution, ServiceEntry, ServiceEntryPort, TrafficPolicy,
};
use super::workload::WorkloadInfo;

/// A manifest file that is (partly) not in force, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ManifestError {
    pub file: PathBuf,
    pub reason: String,
}

/// A Service port as the data path needs it: the Service, which of its ports, and the ready
/// endpoints for that port. Cloning is cheap (reference counts only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTarget {
    service: Arc<Service>,
    port_index: usize,
    /// What [`ServiceTarget::endpoints`] hands out: one family's endpoints for a target found
    /// by a ClusterIP, both families' for one found by name.
    endpoints: Arc<[SocketAddr]>,
    /// The ready endpoints of each family (shared with `endpoints` where they are the same).
    ipv4: Arc<[SocketAddr]>,
    ipv6: Arc<[SocketAddr]>,
}

impl ServiceTarget {
    /// The target of Service port `port_index` with the ready endpoints `all` (sorted, so the
    /// IPv4 endpoints come first).
    fn new(service: Arc<Service>, port_index: usize, all: Vec<SocketAddr>) -> ServiceTarget {
        let split = all.partition_point(|a| a.is_ipv4());
        let all: Arc<[SocketAddr]> = all.into();
        // A single-stack Service's endpoints are all of one family: share the list.
        let (ipv4, ipv6) = match split {
            0 => (Arc::from([]), all.clone()),
            n if n == all.len() => (all.clone(), Arc::from([])),
            n => (Arc::from(&all[..n]), Arc::from(&all[n..])),
        };
        ServiceTarget { service, port_index, endpoints: all, ipv4, ipv6 }
    }

    /// The same Service port as reached through a ClusterIP of `family`: its endpoints are
    /// that family's only, as kube-proxy programs each family of a dual-stack Service apart.
    fn for_family(&self, family: AddressType) -> ServiceTarget {
        ServiceTarget { endpoints: self.endpoints_of(family).clone(), ..self.clone() }
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    pub fn namespace(&self) -> &str {
        &self.service.namespace
    }

    pub fn name(&self) -> &str {
        &self.service.name
    }

    pub fn port(&self) -> &ServicePort {
        &self.service.ports[self.port_index]
    }

    /// Ready endpoints, as `pod IP : port the EndpointSlice names`, sorted and de-duplicated
    /// (an endpoint can sit in two slices while the controller moves it). For a target found by
    /// a ClusterIP ([`Model::service_for`]) only those of the ClusterIP's family; for one found
    /// by name ([`Model::service_port`]) those of both families (IPv4 first).
    pub fn endpoints(&self) -> &Arc<[SocketAddr]> {
        &self.endpoints
    }

    /// The ready endpoints of one family, whichever way the target was found.
    pub fn endpoints_of(&self, family: AddressType) -> &Arc<[SocketAddr]> {
        match family {
            AddressType::IPv4 => &self.ipv4,
            AddressType::IPv6 => &self.ipv6,
        }
    }

    /// The ready endpoints of `family` if there are any, else those of the other family: for a
    /// route's backend Service, which the route (not the client) chose and which may have only
    /// one family.
    pub fn endpoints_preferring(&self, family: AddressType) -> &Arc<[SocketAddr]> {
        let preferred = self.endpoints_of(family);
        if preferred.is_empty() {
            self.endpoints_of(family.other())
        } else {
            preferred
        }
    }
}

type ByName<T> = HashMap<String, Arc<T>>;
/// namespace → name → object: nested so a lookup by `(&str, &str)` needs no owned key.
type ByNsName<T> = HashMap<String, ByName<T>>;
/// A Service's ports that have routes, ascending, each with its routes in precedence order.
type RoutesByPort = Box<[(u16, Box<[Arc<Route>]>)]>;
/// Service namespace → Service name → its ports' routes.
type AttachedRoutes = HashMap<String, HashMap<String, RoutesByPort>>;
/// namespace → target name → the TrafficPolicy in force for it.
type PolicyByTarget = HashMap<String, HashMap<String, Arc<TrafficPolicy>>>;
/// ServiceEntries in precedence order, each with its rank (its place in namespace/name order).
type RankedEntries = Box<[(u32, Arc<ServiceEntry>)]>;

/// The TrafficPolicies in force for one Service: for the whole Service, and per port name.
#[derive(Debug, Default)]
struct ServicePolicies {
    whole: Option<Arc<TrafficPolicy>>,
    by_port: Vec<(String, Arc<TrafficPolicy>)>,
}

/// An immutable snapshot. Share it as `Arc<Model>`; swap whole snapshots, never mutate one.
#[derive(Debug, Default)]
pub struct Model {
    generation: u64,
    errors: Vec<ManifestError>,
    namespaces: ByName<Namespace>,
    pods: ByNsName<Pod>,
    services: ByNsName<Service>,
    endpoint_slices: ByNsName<EndpointSlice>,
    authorization_policies: ByNsName<AuthorizationPolicy>,
    http_routes: ByNsName<Route>,
    grpc_routes: ByNsName<Route>,
    // Indexes, derived from the maps above when the snapshot is built.
    targets: HashMap<String, HashMap<String, Box<[ServiceTarget]>>>,
    by_cluster_addr: HashMap<SocketAddr, ServiceTarget>,
    pods_by_node: HashMap<String, Vec<Arc<Pod>>>,
    pods_by_ip: HashMap<IpAddr, Arc<Pod>>,
    /// Telemetry's view of each pod by IP (workload, app, version, ...).
    workloads_by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    /// Ready endpoint address → the Services whose ports resolve to it (for the destination
    /// side's `destination_service` when the request does not name one).
    services_by_endpoint: HashMap<SocketAddr, Vec<(Arc<str>, Arc<str>)>>,
    /// namespace → its AuthorizationPolicies, sorted by name.
    policies_by_ns: HashMap<String, Box<[Arc<AuthorizationPolicy>]>>,
    peer_authentications: ByNsName<PeerAuthentication>,
    /// namespace → its PeerAuthentications, oldest first (Istio's tie-break), then by name.
    peer_auth_by_ns: HashMap<String, Box<[Arc<PeerAuthentication>]>>,
    request_authentications: ByNsName<RequestAuthentication>,
    /// namespace → its RequestAuthentications, sorted by name.
    request_auth_by_ns: HashMap<String, Box<[Arc<RequestAuthentication>]>>,
    /// The routes of both kinds attached to each Service port, in precedence order.
    attached_routes: AttachedRoutes,
    /// The same and the VirtualServices naming each Service port, compiled into the tables the
    /// data path matches requests against (per client namespace, see `istio::vs_mixing`).
    route_tables: HashMap<String, HashMap<String, Box<[(u16, PortRoutes)]>>>,
    /// VirtualServices' tcp and tls rules per Service port.
    stream_tables: HashMap<String, HashMap<String, Box<[(u16, StreamChains)]>>>,
    /// The same two for ServiceEntry ports (VirtualServices whose hosts are an entry's).
    entry_route_tables: HashMap<String, HashMap<String, Box<[(u16, PortRoutes)]>>>,
    entry_stream_tables: HashMap<String, HashMap<String, Box<[(u16, StreamChains)]>>>,
    virtual_services: ByNsName<VirtualService>,
    /// What each VirtualService names in this snapshot, and its rules that could not apply.
    vs_status: std::collections::BTreeMap<String, VsStatus>,
    traffic_policies: ByNsName<TrafficPolicy>,
    service_entries: ByNsName<ServiceEntry>,
    /// namespace → Service name → the TrafficPolicies in force for it.
    service_policies: HashMap<String, HashMap<String, ServicePolicies>>,
    http_route_policies: PolicyByTarget,
    grpc_route_policies: PolicyByTarget,
    entry_policies: PolicyByTarget,
    /// Single addresses (`spec.addresses` /32 and /128, and the endpoint IPs of STATIC
    /// entries) → the entries that claim them, by rank.
    entries_by_ip: HashMap<IpAddr, RankedEntries>,
    /// CIDR blocks of `spec.addresses`, by rank.
    entries_by_cidr: Box<[(IpNet, u32, Arc<ServiceEntry>)]>,
    /// Exact host → entries, by rank.
    entries_by_host: HashMap<String, Box<[Arc<ServiceEntry>]>>,
    /// `*.suffix` host → entries by `suffix`, by rank.
    entries_by_wildcard: HashMap<String, Box<[Arc<ServiceEntry>]>>,
    destination_rules: ByNsName<DestinationRule>,
    /// Every DestinationRule resolved against the Services and ServiceEntries above.
    dr_index: DrIndex,
}

impl Model {
    /// The model before any source has spoken: generation 0, no objects.
    pub fn empty() -> Model {
        Model::default()
    }

    /// Builds a snapshot. When two objects share a kind, namespace and name, the first one
    /// wins (a source resolves such conflicts, and reports them, before calling this).
    pub fn build(
        objects: impl IntoIterator<Item = Object>,
        errors: Vec<ManifestError>,
        generation: u64,
    ) -> Model {
        let mut m = Model { generation, errors, ..Model::default() };
        for object in objects {
            match object {
                Object::Namespace(o) => {
                    m.namespaces.entry(o.name.clone()).or_insert(o);
                }
                Object::Pod(o) => insert(&mut m.pods, o, |p| (&p.namespace, &p.name)),
                Object::Service(o) => insert(&mut m.services, o, |s| (&s.namespace, &s.name)),
                Object::EndpointSlice(o) => insert(&mut m.endpoint_slices, o, |s| (&s.namespace, &s.name)),
                Object::AuthorizationPolicy(o) => {
                    insert(&mut m.authorization_policies, o, |p| (&p.namespace, &p.name))
                }
                Object::Route(o) => {
                    let map = match o.kind {
                        RouteKind::Http => &mut m.http_routes,
                        RouteKind::Grpc => &mut m.grpc_routes,
                        // VirtualServices are objects of their own, compiled into routes here.
                        RouteKind::VirtualService => continue,
                    };
                    insert(map, o, |r| (&r.namespace, &r.name))
                }
                Object::TrafficPolicy(o) => insert(&mut m.traffic_policies, o, |p| (&p.namespace, &p.name)),
                Object::ServiceEntry(o) => insert(&mut m.service_entries, o, |e| (&e.namespace, &e.name)),
                Object::VirtualService(o) => insert(&mut m.virtual_services, o, |v| (&v.namespace, &v.name)),
                Object::PeerAuthentication(o) => {
                    insert(&mut m.peer_authentications, o, |p| (&p.namespace, &p.name))
                }
                Object::RequestAuthentication(o) => {
                    insert(&mut m.request_authentications, o, |r| (&r.namespace, &r.name))
                }
                Object::DestinationRule(o) => insert(&mut m.destination_rules, o, |r| (&r.namespace, &r.name)),
            }
        }
        m.index_services();
        m.index_pods();
        m.index_policies();
        m.index_routes();
        m.index_traffic_policies();
        m.index_service_entries();
        let vs = vs_compile::compile(
            m.services.values().flat_map(|n| n.values()),
            m.service_entries.values().flat_map(|n| n.values()),
            m.virtual_services.values().flat_map(|n| n.values()),
        );
        m.compile_route_tables(vs);
        m.dr_index = DrIndex::build(&m);
        m
    }

    /// Every DestinationRule, in force or not, in no particular order.
    pub fn destination_rules(&self) -> impl Iterator<Item = &Arc<DestinationRule>> {
        self.destination_rules.values().flat_map(|m| m.values())
    }

    pub fn destination_rule(&self, namespace: &str, name: &str) -> Option<&Arc<DestinationRule>> {
        self.destination_rules.get(namespace)?.get(name)
    }

    /// The DestinationRules resolved per destination, subset and port (see
    /// [`DrIndex::destination`]).
    pub fn destination_rule_index(&self) -> &DrIndex {
        &self.dr_index
    }

    /// For every target, the TrafficPolicy in force: the oldest of those naming it (see
    /// [`policy_precedence`]). Targets need not exist in this snapshot.
    fn index_traffic_policies(&mut self) {
        let mut policies: Vec<Arc<TrafficPolicy>> = self.traffic_policies().cloned().collect();
        policies.sort_by(|a, b| policy_precedence(a, b));
        for p in &policies {
            for t in &p.targets {
                let ns = p.namespace.clone();
                let first = |map: &mut PolicyByTarget, name: &str| {
                    map.entry(ns.clone()).or_default().entry(name.to_owned()).or_insert_with(|| p.clone());
                };
                match t {
                    PolicyTarget::Service { name, section_name } => {
                        let svc = self
                            .service_policies
                            .entry(ns.clone())
                            .or_default()
                            .entry(name.clone())
                            .or_default();
                        match section_name {
                            None => {
                                svc.whole.get_or_insert_with(|| p.clone());
                            }
                            Some(port) => {
                                if !svc.by_port.iter().any(|(n, _)| n == port) {
                                    svc.by_port.push((port.clone(), p.clone()));
                                }
                            }
                        }
                    }
                    PolicyTarget::Route { name, grpc: false } => first(&mut self.http_route_policies, name),
                    PolicyTarget::Route { name, grpc: true } => first(&mut self.grpc_route_policies, name),
                    PolicyTarget::ServiceEntry { name } => first(&mut self.entry_policies, name),
                }
            }
        }
    }

    /// The ServiceEntry indexes by address and host. An entry's rank is its place in
    /// namespace/name order; every list is in rank order, so the first match wins.
    fn index_service_entries(&mut self) {
        let mut entries: Vec<Arc<ServiceEntry>> = self.service_entries().cloned().collect();
        entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut by_ip: HashMap<IpAddr, Vec<(u32, Arc<ServiceEntry>)>> = HashMap::new();
        let mut cidrs = Vec::new();
        let mut by_host: HashMap<String, Vec<Arc<ServiceEntry>>> = HashMap::new();
        let mut by_wildcard: HashMap<String, Vec<Arc<ServiceEntry>>> = HashMap::new();
        for (rank, e) in entries.into_iter().enumerate() {
            let rank = rank as u32;
            let mut claim = |ip: IpAddr| {
                let list = by_ip.entry(ip.to_canonical()).or_default();
                if list.last().is_none_or(|(r, _)| *r != rank) {
                    list.push((rank, e.clone()));
                }
            };
            for net in &e.addresses {
                if net.is_host() {
                    claim(net.addr);
                } else {
                    cidrs.push((*net, rank, e.clone()));
                }
            }
            if matches!(e.resolution, Resolution::Static | Resolution::None) {
                for ep in &e.endpoints {
                    if let Ok(ip) = ep.address.parse::<IpAddr>() {
                        claim(ip);
                    }
                }
            }
            for host in &e.hosts {
                match host.strip_prefix("*.") {
                    Some(suffix) => by_wildcard.entry(suffix.to_owned()).or_default().push(e.clone()),
                    None => by_host.entry(host.clone()).or_default().push(e.clone()),
                }
            }
        }
        self.entries_by_ip = by_ip.into_iter().map(|(ip, v)| (ip, v.into())).collect();
        self.entries_by_cidr = cidrs.into();
        self.entries_by_host = by_host.into_iter().map(|(h, v)| (h, v.into())).collect();
        self.entries_by_wildcard = by_wildcard.into_iter().map(|(h, v)| (h, v.into())).collect();
    }

    /// Attaches every route to the ports of the Services its parentRefs name. Only Services in
    /// this snapshot get routes: a route whose Service is not known yet waits in the model and
    /// attaches in the first snapshot that has the Service.
    fn index_routes(&mut self) {
        // Each route once per Service, however many of its parentRefs name it.
        let mut by_service: HashMap<(&str, &str), Vec<&Arc<Route>>> = HashMap::new();
        for route in self.routes() {
            for (i, p) in route.parents.iter().enumerate() {
                let first =
                    route.parents[..i].iter().all(|q| (&q.namespace, &q.name) != (&p.namespace, &p.name));
                if first {
                    by_service.entry((&p.namespace, &p.name)).or_default().push(route);
                }
            }
        }
        let mut attached = AttachedRoutes::new();
        for ((ns, name), routes) in by_service {
            let Some(svc) = self.service(ns, name) else {
                continue;
            };
            let mut ports: Vec<u16> = svc.ports.iter().map(|p| p.port).collect();
            ports.sort_unstable();
            ports.dedup(); // the same number for TCP and UDP is one port to a route
            let per_port: RoutesByPort = ports
                .into_iter()
                .filter_map(|port| {
                    let mut list: Vec<Arc<Route>> = routes
                        .iter()
                        .filter(|r| {
                            r.parents.iter().any(|p| {
                                p.namespace == ns && p.name == name && p.port.is_none_or(|q| q == port)
                            })
                        })
                        .map(|r| Arc::clone(r))
                        .collect();
                    list.sort_by(|a, b| route_precedence(a, b));
                    (!list.is_empty()).then(|| (port, list.into()))
                })
                .collect();
            attached.entry(ns.to_owned()).or_default().insert(name.to_owned(), per_port);
        }
        self.attached_routes = attached;
    }

    fn index_policies(&mut self) {
        for (ns, by_name) in &self.authorization_policies {
            let mut list: Vec<Arc<AuthorizationPolicy>> = by_name.values().cloned().collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            self.policies_by_ns.insert(ns.clone(), list.into());
        }
        for (ns, by_name) in &self.peer_authentications {
            let mut list: Vec<Arc<PeerAuthentication>> = by_name.values().cloned().collect();
            list.sort_by(|a, b| oldest_first(&a.created, &b.created).then_with(|| a.name.cmp(&b.name)));
            self.peer_auth_by_ns.insert(ns.clone(), list.into());
        }
        for (ns, by_name) in &self.request_authentications {
            let mut list: Vec<Arc<RequestAuthentication>> = by_name.values().cloned().collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            self.request_auth_by_ns.insert(ns.clone(), list.into());
        }
    }

    /// A snapshot of one manifest text, for tests and tools (generation 0, no errors).
    pub fn from_manifest(text: &str, format: Format) -> Result<Model, ParseError> {
        Ok(Model::build(manifest::parse(text, format)?, Vec::new(), 0))
    }

    fn index_services(&mut self) {
        // Slices grouped by the Service they belong to, in name order so that endpoint lists
        // come out the same whatever the hash order.
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for s in self.endpoint_slices.values().flat_map(|m| m.values()) {
            slices.entry((s.namespace.as_str(), s.service_name.as_str())).or_default().push(s);
        }
        let mut services: Vec<&Arc<Service>> = self.services.values().flat_map(|m| m.values()).collect();
        // Deterministic winner if two Services claim one ClusterIP:port.
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for svc in services {
            let svc_slices = slices.get(&(svc.namespace.as_str(), svc.name.as_str()));
            let targets: Box<[ServiceTarget]> = (0..svc.ports.len())
                .map(|i| {
                    let slices = svc_slices.map_or(&[][..], |v| v);
                    ServiceTarget::new(svc.clone(), i, ready_endpoints(&svc.ports[i], slices))
                })
                .collect();
            // Each ClusterIP leads to the endpoints of its own family.
            for ip in &svc.cluster_ips {
                let ip = ip.to_canonical();
                let family = AddressType::of(ip);
                // Only TCP reaches the proxy; indexing UDP too would let a UDP port shadow
                // the TCP port with the same number.
                for t in targets.iter().filter(|t| t.port().protocol == Protocol::Tcp) {
                    self.by_cluster_addr
                        .entry(SocketAddr::new(ip, t.port().port))
                        .or_insert_with(|| t.for_family(family));
                }
            }
            self.targets.entry(svc.namespace.clone()).or_default().insert(svc.name.clone(), targets);
        }
    }

    fn index_pods(&mut self) {
        let mut pods: Vec<&Arc<Pod>> = self.pods.values().flat_map(|m| m.values()).collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for pod in pods {
            if let Some(node) = &pod.node_name {
                self.pods_by_node.entry(node.clone()).or_default().push(pod.clone());
            }
            if pod.host_network {
                continue; // shares the node's IP with every other host-network pod
            }
            // Kubernetes reuses the IP of a finished pod, so two pods may share one; the live
            // one is the one traffic is for. Every address of a dual-stack pod is its own.
            for ip in &pod.ips {
                let ip = ip.to_canonical();
                match self.pods_by_ip.get(&ip) {
                    Some(have) if ip_rank(have.phase) <= ip_rank(pod.phase) => {}
                    _ => {
                        self.pods_by_ip.insert(ip, pod.clone());
                    }
                }
            }
        }
        // One WorkloadInfo per pod, shared by its addresses.
        let mut infos: HashMap<*const Pod, Arc<WorkloadInfo>> = HashMap::new();
        self.workloads_by_ip = self
            .pods_by_ip
            .iter()
            .map(|(ip, pod)| {
                let info = infos.entry(Arc::as_ptr(pod)).or_insert_with(|| Arc::new(WorkloadInfo::of(pod)));
                (*ip, info.clone())
            })
            .collect();
        let mut by_endpoint: HashMap<SocketAddr, Vec<(Arc<str>, Arc<str>)>> = HashMap::new();
        for (ns, by_name) in &self.targets {
            for (name, ports) in by_name {
                for t in ports.iter() {
                    for ep in t.endpoints().iter() {
                        let list = by_endpoint.entry(*ep).or_default();
                        if !list.iter().any(|(n, s)| **n == **ns && **s == **name) {
                            list.push((ns.as_str().into(), name.as_str().into()));
                        }
                    }
                }
            }
        }
        self.services_by_endpoint = by_endpoint;
    }

    /// Telemetry's view of the pod that owns `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.workloads_by_ip.get(&ip.to_canonical())
    }

    /// The Service (namespace, name) an endpoint belongs to, when exactly one Service has it.
    pub fn service_of_endpoint(&self, endpoint: SocketAddr) -> Option<(&Arc<str>, &Arc<str>)> {
        match self
            .services_by_endpoint
            .get(&SocketAddr::new(endpoint.ip().to_canonical(), endpoint.port()))?
            .as_slice()
        {
            [(ns, name)] => Some((ns, name)),
            _ => None,
        }
    }

    /// Counts up by one with every snapshot a source publishes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Files (or objects in them) that are not in force, sorted by file.
    pub fn errors(&self) -> &[ManifestError] {
        &self.errors
    }

    /// The Service port behind a ClusterIP:port, with its ready endpoints of the ClusterIP's
    /// family (a dual-stack Service's IPv6 ClusterIP leads to its IPv6 endpoints). An
    /// IPv4-mapped IPv6 address (what a dual-stack socket reports) matches the IPv4 ClusterIP.
    pub fn service_for(&self, ip: IpAddr, port: u16) -> Option<&ServiceTarget> {
        self.by_cluster_addr.get(&SocketAddr::new(ip.to_canonical(), port))
    }

    /// The Service port `port` of Service `namespace/name` (for routes that name a backend
    /// Service), with the endpoints of both families (pick one with
    /// [`ServiceTarget::endpoints_preferring`]); also works for headless Services.
    pub fn service_port(&self, namespace: &str, name: &str, port: u16) -> Option<&ServiceTarget> {
        self.targets.get(namespace)?.get(name)?.iter().find(|t| t.port().port == port)
    }

    /// The pod that owns `ip` (any of its `status.podIPs`) on any node (host-network pods
    /// excluded). Prefers a running pod over a finished one that once had the same IP.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.pods_by_ip.get(&ip.to_canonical())
    }

    /// Pods scheduled on `node`, in namespace/name order, whatever their phase.
    pub fn pods_on_node<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Arc<Pod>> + 'a {
        self.pods_by_node.get(node).into_iter().flatten()
    }

    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        self.namespaces.get(name)
    }

    /// Whether pods of `namespace` belong to the mesh. A namespace with no manifest is not.
    pub fn is_enrolled(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(|n| n.enrolled)
    }

    /// The namespace's peer authentication mode; PERMISSIVE for a namespace with no manifest.
    pub fn peer_auth_mode(&self, namespace: &str) -> PeerAuthMode {
        self.namespaces.get(namespace).map_or(PeerAuthMode::Permissive, |n| n.peer_auth)
    }

    /// The namespace's outbound traffic policy; ALLOW_ANY for a namespace with no manifest.
    pub fn outbound_policy(&self, namespace: &str) -> OutboundPolicy {
        self.namespaces.get(namespace).map_or(OutboundPolicy::AllowAny, |n| n.outbound_policy)
    }

    /// Every TrafficPolicy, in force or not, in no particular order.
    pub fn traffic_policies(&self) -> impl Iterator<Item = &Arc<TrafficPolicy>> {
        self.traffic_policies.values().flat_map(|m| m.values())
    }

    pub fn traffic_policy(&self, namespace: &str, name: &str) -> Option<&Arc<TrafficPolicy>> {
        self.traffic_policies.get(namespace)?.get(name)
    }

    /// The TrafficPolicy in force for Service `namespace/name`, on the port named `port_name`
    /// (`None`: a Service port without a name, or the Service as a whole). A policy whose
    /// targetRef names that port (sectionName) beats one for the whole Service; among several of
    /// the same sort, the oldest wins (creation time, then name; no timestamp counts as newest).
    pub fn traffic_policy_for_service(
        &self,
        namespace: &str,
        name: &str,
        port_name: Option<&str>,
    ) -> Option<&Arc<TrafficPolicy>> {
        let svc = self.service_policies.get(namespace)?.get(name)?;
        if let Some(port) = port_name {
            if let Some((_, p)) = svc.by_port.iter().find(|(n, _)| n == port) {
                return Some(p);
            }
        }
        svc.whole.as_ref()
    }

    /// The TrafficPolicy in force for the HTTPRoute or GRPCRoute `namespace/name` (the oldest
    /// that targets it).
    pub fn traffic_policy_for_route(
        &self,
        kind: RouteKind,
        namespace: &str,
        name: &str,
    ) -> Option<&Arc<TrafficPolicy>> {
        let map = match kind {
            RouteKind::Http => &self.http_route_policies,
            RouteKind::Grpc => &self.grpc_route_policies,
            // A TrafficPolicy targets Gateway API routes only.
            RouteKind::VirtualService => return None,
        };
        map.get(namespace)?.get(name)
    }

    /// The TrafficPolicy in force for the ServiceEntry `namespace/name` (the oldest that targets
    /// it).
    pub fn traffic_policy_for_service_entry(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<&Arc<TrafficPolicy>> {
        self.entry_policies.get(namespace)?.get(name)
    }

    /// Every ServiceEntry, in no particular order.
    pub fn service_entries(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.service_entries.values().flat_map(|m| m.values())
    }

    pub fn service_entry(&self, namespace: &str, name: &str) -> Option<&Arc<ServiceEntry>> {
        self.service_entries.get(namespace)?.get(name)
    }

    /// The ServiceEntry (and its port) for a connection to `ip:port`: among the entries that
    /// declare `port` and whose `addresses` contain `ip` (an address or a CIDR block) or, with
    /// resolution STATIC (or NONE), whose endpoints have the address `ip`, the first in
    /// namespace/name order. An IPv4-mapped IPv6 address matches the IPv4 address.
    pub fn service_entry_for_addr(
        &self,
        ip: IpAddr,
        port: u16,
    ) -> Option<(&Arc<ServiceEntry>, &ServiceEntryPort)> {
        let ip = ip.to_canonical();
        let mut best: Option<(u32, &Arc<ServiceEntry>, &ServiceEntryPort)> = None;
        if let Some(list) = self.entries_by_ip.get(&ip) {
            best = list.iter().find_map(|(rank, e)| entry_port(e, port).map(|p| (*rank, e, p)));
        }
        for (net, rank, e) in self.entries_by_cidr.iter() {
            if best.is_some_and(|(b, ..)| b <= *rank) {
                break; // the rest rank lower
            }
            if net.contains(ip) {
                if let Some(p) = entry_port(e, port) {
                    best = Some((*rank, e, p));
                    break;
                }
            }
        }
        best.map(|(_, e, p)| (e, p))
    }

    /// The ServiceEntry (and its port) for a request or connection to `host` (an HTTP Host or
    /// authority, or a TLS SNI; a `:port` suffix and a trailing '.' are ignored, case does not
    /// matter) on `port`: an entry with that exact host, else one with the most specific wildcard
    /// host (`*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`),
    /// that declares `port`; among several, the first in namespace/name order.
    pub fn service_entry_for_host(
        &self,
        host: &str,
        port: u16,
    ) -> Option<(&Arc<ServiceEntry>, &ServiceEntryPort)> {
        let host = strip_port(host);
        let host = host.strip_suffix('.').unwrap_or(host);
        // Lower-cased on the stack: host names are at most 253 bytes.
        let mut buf = [0u8; 253];
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower = buf.get_mut(..host.len())?;
            lower.copy_from_slice(host.as_bytes());
            lower.make_ascii_lowercase();
            std::str::from_utf8(lower).ok()?
        } else {
            host
        };
        if let Some(found) = self.entries_by_host.get(host).and_then(|l| first_with_port(l, port)) {
            return Some(found);
        }
        let mut rest = host;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(found) = self.entries_by_wildcard.get(suffix).and_then(|l| first_with_port(l, port)) {
                return Some(found);
            }
            rest = suffix;
        }
        None
    }

    /// The AuthorizationPolicies of `namespace`, sorted by name (empty if it has none).
    pub fn authorization_policies(&self, namespace: &str) -> &[Arc<AuthorizationPolicy>] {
        self.policies_by_ns.get(namespace).map_or(&[], |v| v)
    }

    /// The PeerAuthentications of `namespace`, oldest first (no timestamp: newest), then by name.
    pub fn peer_authentications(&self, namespace: &str) -> &[Arc<PeerAuthentication>] {
        self.peer_auth_by_ns.get(namespace).map_or(&[], |v| v)
    }

    pub fn peer_authentication(&self, namespace: &str, name: &str) -> Option<&Arc<PeerAuthentication>> {
        self.peer_authentications.get(namespace)?.get(name)
    }

    /// Every PeerAuthentication, by namespace in no particular order.
    pub fn all_peer_authentications(&self) -> impl Iterator<Item = &Arc<PeerAuthentication>> {
        self.peer_auth_by_ns.values().flat_map(|v| v.iter())
    }

    /// The RequestAuthentications of `namespace`, sorted by name.
    pub fn request_authentications(&self, namespace: &str) -> &[Arc<RequestAuthentication>] {
        self.request_auth_by_ns.get(namespace).map_or(&[], |v| v)
    }

    pub fn request_authentication(&self, namespace: &str, name: &str) -> Option<&Arc<RequestAuthentication>> {
        self.request_authentications.get(namespace)?.get(name)
    }

    /// Every RequestAuthentication, by namespace in no particular order.
    pub fn all_request_authentications(&self) -> impl Iterator<Item = &Arc<RequestAuthentication>> {
        self.request_auth_by_ns.values().flat_map(|v| v.iter())
    }

    pub fn authorization_policy(&self, namespace: &str, name: &str) -> Option<&Arc<AuthorizationPolicy>> {
        self.authorization_policies.get(namespace)?.get(name)
    }

    /// Every AuthorizationPolicy, by namespace in no particular order, by name within one.
    pub fn all_authorization_policies(&self) -> impl Iterator<Item = &Arc<AuthorizationPolicy>> {
        self.policies_by_ns.values().flat_map(|v| v.iter())
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<Pod>> {
        self.pods.get(namespace)?.get(name)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.services.get(namespace)?.get(name)
    }

    pub fn endpoint_slice(&self, namespace: &str, name: &str) -> Option<&Arc<EndpointSlice>> {
        self.endpoint_slices.get(namespace)?.get(name)
    }

    /// Iterators over every object of a kind, in no particular order.
    pub fn namespaces(&self) -> impl Iterator<Item = &Arc<Namespace>> {
        self.namespaces.values()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods.values().flat_map(|m| m.values())
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values().flat_map(|m| m.values())
    }

    pub fn endpoint_slices(&self) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.endpoint_slices.values().flat_map(|m| m.values())
    }

    /// Every HTTPRoute and GRPCRoute, attached or not, in no particular order.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.http_routes.values().chain(self.grpc_routes.values()).flat_map(|m| m.values())
    }

    pub fn route(&self, kind: RouteKind, namespace: &str, name: &str) -> Option<&Arc<Route>> {
        let map = match kind {
            RouteKind::Http => &self.http_routes,
            RouteKind::Grpc => &self.grpc_routes,
            RouteKind::VirtualService => return None,
        };
        map.get(namespace)?.get(name)
    }

    /// The routes (both kinds; producer routes of the Service's namespace and consumer routes of
    /// others alike) whose parentRefs name Service `svc_namespace/svc_name` for every port or
    /// for `port`, which must be a port of the Service. Sorted by precedence: oldest first (a
    /// route without a creation timestamp counts as the newest), then namespace, name and kind.
    /// Which of them apply to a given client is the caller's to decide (GEP-1426).
    /// The compiled route tables of a Service port (`None` when no route attaches to it).
    pub fn port_routes(&self, svc_namespace: &str, svc_name: &str, port: u16) -> Option<&PortRoutes> {
        let ports = self.route_tables.get(svc_namespace)?.get(svc_name)?;
        ports.iter().find(|(p, _)| *p == port).map(|(_, t)| t)
    }

    /// The route tables of every Service port with Gateway API routes or VirtualServices, and
    /// of every ServiceEntry port with VirtualServices.
    fn compile_route_tables(&mut self, vs: VsIndex) {
        type Tables<T> = HashMap<String, HashMap<String, Box<[(u16, T)]>>>;
        let mut tables: Tables<PortRoutes> = HashMap::new();
        let mut streams: Tables<StreamChains> = HashMap::new();
        let mut names: Vec<(&String, &String)> =
            self.attached_routes.iter().flat_map(|(ns, m)| m.keys().map(move |n| (ns, n))).collect();
        names.extend(vs.services.iter().flat_map(|(ns, m)| m.keys().map(move |n| (ns, n))));
        names.sort();
        names.dedup();
        for (ns, name) in names {
            let gateway: &[(u16, Box<[Arc<Route>]>)] =
                self.attached_routes.get(ns).and_then(|m| m.get(name)).map_or(&[], |p| p);
            let candidates: &[(u16, Vec<vs_compile::Candidate>)] =
                vs.services.get(ns).and_then(|m| m.get(name)).map_or(&[], |p| p.as_slice());
            let mut ports: Vec<u16> = gateway.iter().map(|(p, _)| *p).chain(candidates.iter().map(|(p, _)| *p)).collect();
            ports.sort_unstable();
            ports.dedup();
            let mut http = Vec::new();
            let mut stream = Vec::new();
            for port in ports {
                let routes = gateway.iter().find(|(p, _)| *p == port).map_or(&[][..], |(_, r)| r);
                let cands = candidates.iter().find(|(p, _)| *p == port).map_or(&[][..], |(_, c)| c.as_slice());
                let table = vs_mixing::http_routes(ns, routes, cands);
                if !table.is_empty() {
                    http.push((port, table));
                }
                if let Some(s) = vs_mixing::stream_routes(ns, cands) {
                    stream.push((port, s));
                }
            }
            if !http.is_empty() {
                tables.entry(ns.clone()).or_default().insert(name.clone(), http.into());
            }
            if !stream.is_empty() {
                streams.entry(ns.clone()).or_default().insert(name.clone(), stream.into());
            }
        }
        let mut entry_tables: Tables<PortRoutes> = HashMap::new();
        let mut entry_streams: Tables<StreamChains> = HashMap::new();
        for (ns, by_name) in &vs.entries {
            for (name, ports) in by_name {
                let mut http = Vec::new();
                let mut stream = Vec::new();
                for (port, cands) in ports {
                    let table = vs_mixing::http_routes(ns, &[], cands);
                    if !table.is_empty() {
                        http.push((*port, table));
                    }
                    if let Some(s) = vs_mixing::stream_routes(ns, cands) {
                        stream.push((*port, s));
                    }
                }
                if !http.is_empty() {
                    entry_tables.entry(ns.clone()).or_default().insert(name.clone(), http.into());
                }
                if !stream.is_empty() {
                    entry_streams.entry(ns.clone()).or_default().insert(name.clone(), stream.into());
                }
            }
        }
        self.route_tables = tables;
        self.stream_tables = streams;
        self.entry_route_tables = entry_tables;
        self.entry_stream_tables = entry_streams;
        self.vs_status = vs.status;
    }

    /// The VirtualServices' tcp/tls rules for a Service port (`None`: none).
    pub fn stream_routes(&self, svc_namespace: &str, svc_name: &str, port: u16) -> Option<&StreamChains> {
        let ports = self.stream_tables.get(svc_namespace)?.get(svc_name)?;
        ports.iter().find(|(p, _)| *p == port).map(|(_, t)| t)
    }

    /// The route tables of a ServiceEntry port (VirtualServices whose hosts are the entry's).
    pub fn entry_port_routes(&self, namespace: &str, name: &str, port: u16) -> Option<&PortRoutes> {
        let ports = self.entry_route_tables.get(namespace)?.get(name)?;
        ports.iter().find(|(p, _)| *p == port).map(|(_, t)| t)
    }

    /// The tcp/tls rules of a ServiceEntry port.
    pub fn entry_stream_routes(&self, namespace: &str, name: &str, port: u16) -> Option<&StreamChains> {
        let ports = self.entry_stream_tables.get(namespace)?.get(name)?;
        ports.iter().find(|(p, _)| *p == port).map(|(_, t)| t)
    }

    /// Every VirtualService, in force or not, in no particular order.
    pub fn virtual_services(&self) -> impl Iterator<Item = &Arc<VirtualService>> {
        self.virtual_services.values().flat_map(|m| m.values())
    }

    pub fn virtual_service(&self, namespace: &str, name: &str) -> Option<&Arc<VirtualService>> {
        self.virtual_services.get(namespace)?.get(name)
    }

    /// What the VirtualService `namespace/name` applies to, and its rules that cannot apply.
    pub fn virtual_service_status(&self, key: &str) -> Option<&VsStatus> {
        self.vs_status.get(key)
    }

    pub fn attached_routes(&self, svc_namespace: &str, svc_name: &str, port: u16) -> &[Arc<Route>] {
        let Some(ports) = self.attached_routes.get(svc_namespace).and_then(|m| m.get(svc_name)) else {
            return &[];
        };
        ports.iter().find(|(p, _)| *p == port).map_or(&[], |(_, routes)| routes)
    }
}

/// The Gateway API's tie-break between routes: the oldest wins (no timestamp: newest), then
/// `namespace/name` in alphabetical order; the kind last, so that the order is total.
fn route_precedence(a: &Route, b: &Route) -> Ordering {
    let created = match (&a.created, &b.created) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    created.then_with(|| (&a.namespace, &a.name, a.kind).cmp(&(&b.namespace, &b.name, b.kind)))
}

/// Creation timestamps, oldest first; no timestamp counts as the newest.
fn oldest_first(a: &Option<String>, b: &Option<String>) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// Which of two TrafficPolicies naming the same target is in force: the oldest (no timestamp:
/// newest), then `namespace/name` in alphabetical order.
fn policy_precedence(a: &TrafficPolicy, b: &TrafficPolicy) -> Ordering {
    let created = match (&a.created, &b.created) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    created.then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
}

fn entry_port(entry: &ServiceEntry, port: u16) -> Option<&ServiceEntryPort> {
    entry.ports.iter().find(|p| p.number == port)
}

fn first_with_port(
    entries: &[Arc<ServiceEntry>],
    port: u16,
) -> Option<(&Arc<ServiceEntry>, &ServiceEntryPort)> {
    entries.iter().find_map(|e| entry_port(e, port).map(|p| (e, p)))
}

/// `host` without a `:port` suffix (`example.com:8080`, `[2001:db8::1]:443`).
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn insert<T>(map: &mut ByNsName<T>, object: Arc<T>, key: impl Fn(&T) -> (&String, &String)) {
    let (ns, name) = key(&object);
    let by_name = map.entry(ns.clone()).or_default();
    if !by_name.contains_key(name) {
        by_name.insert(name.clone(), object);
    }
}

/// Lower is preferred when two pods claim one IP.
fn ip_rank(phase: PodPhase) -> u8 {
    match phase {
        PodPhase::Running => 0,
        PodPhase::Pending => 1,
        PodPhase::Unknown => 2,
        PodPhase::Succeeded | PodPhase::Failed => 3,
    }
}

/// Resolves a Service port to ready endpoint addresses the way kube-proxy does: the slice port
/// with the same name (both unnamed for a single unnamed port) and protocol gives the port
/// number; the Service's targetPort is not consulted, because the slice already resolved it
/// (a named targetPort can map to a different number on each pod).
fn ready_endpoints(port: &ServicePort, slices: &[&EndpointSlice]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices {
        let Some(sp) = slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol) else {
            continue;
        };
        for ep in slice.endpoints.iter().filter(|e| e.ready) {
            out.extend(ep.addresses.iter().map(|ip| SocketAddr::new(*ip, sp.port)));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
