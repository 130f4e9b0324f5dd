//! Istio's `DestinationRule` (networking.istio.io v1, v1beta1, v1alpha3): what happens to
//! traffic once a route chose its destination host, distilled into the settings sluice's data
//! path already has (balancer, circuit breaker, outlier detection, connect timeout, TLS
//! origination) plus what is new to it (subsets, consistent hashing).
//!
//! Parsing mirrors Istio's schema with serde types (`deny_unknown_fields`: a field Istio does
//! not have is an error with its path). Fields Istio has and sluice does not implement are
//! read, then reject the resource with the field's path and the reason; nothing is silently
//! ignored.
//!
//! Semantics, as Istio documents them:
//! - `host`: a short name is a Service of the rule's namespace; an FQDN
//!   (`reviews.prod.svc.cluster.local`), a wildcard (`*.prod.svc.cluster.local`, `*`) or a
//!   ServiceEntry host is taken as written. An exact host beats a wildcard, a longer wildcard a
//!   shorter one.
//! - Which rule applies to a client: a rule of the client's own namespace (one whose
//!   `workloadSelector` selects the client first), else one of the destination's namespace
//!   exported to the client, else one of the root namespace exported to it; among rules of
//!   the same standing, the oldest (then namespace/name). Rules are not merged.
//! - Merging `trafficPolicy`: the top level, replaced by the top level's `portLevelSettings`
//!   for the destination port; then a subset's policy overrides it field by field
//!   (`loadBalancer`, `connectionPool`, `outlierDetection`, `tls`); a subset's own
//!   `portLevelSettings` for the port replace all four (port-level settings do not inherit:
//!   fields they leave out take their defaults).
//!
//! The [`DrIndex`] resolves every (rule, destination Service, port, subset) once per model
//! snapshot, on the control path: the subset's endpoints (filtered by the pods' labels), the
//! merged policy, and for consistent hashing the Maglev tables of each address family.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{exported_to, parse_duration, resolve_host, service_fqdn, ROOT_NAMESPACE};
use crate::discovery::fields::Node;
use crate::discovery::manifest::{DocError, Meta};
use crate::discovery::model::{AddressType, Labels, Object};
use crate::discovery::traffic::OutlierDetection;
use crate::discovery::Model;
use crate::l7::maglev::Maglev;

/// Subsets per rule, and port-level settings per policy: Istio sets no limit; these keep one
/// object's cost bounded (the index resolves every subset for every port of every Service a
/// rule names).
pub const MAX_SUBSETS: usize = 64;
pub const MAX_PORT_LEVEL_SETTINGS: usize = 64;
/// Maglev slots built per model snapshot, for all consistent-hash destinations together
/// (16 MiB of 2-byte slots: 128 tables of the default size; destinations with the same
/// endpoints share one). Sets beyond it hash by rendezvous instead (same stickiness, O(N) per
/// request), counted in [`DrIndexStats::tables_over_budget`].
pub const MAX_TABLE_SLOTS: usize = 8 << 20;

// ---------------------------------------------------------------------------------------------
// The model

/// A parsed DestinationRule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp`: the oldest rule wins among rules of equal standing.
    pub created: Option<String>,
    /// `spec.host`, resolved ([`resolve_host`]) and lower-cased.
    pub host: String,
    pub traffic_policy: Option<TrafficPolicySpec>,
    pub subsets: Vec<Subset>,
    /// `spec.exportTo` as written (empty: every namespace).
    pub export_to: Vec<String>,
    /// `spec.workloadSelector.matchLabels`: the rule applies only to these clients of its own
    /// namespace.
    pub workload_selector: Option<Labels>,
}

/// A `trafficPolicy`: settings for every port, and per port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrafficPolicySpec {
    pub base: PolicyLevel,
    /// `portLevelSettings`: port number → settings that replace `base` for that port.
    pub port_level: Vec<(u16, PolicyLevel)>,
}

impl TrafficPolicySpec {
    fn port(&self, port: Option<u16>) -> Option<&PolicyLevel> {
        let port = port?;
        self.port_level.iter().find(|(p, _)| *p == port).map(|(_, l)| l)
    }

    /// The settings for `port`: its port-level settings, else the base.
    fn for_port(&self, port: Option<u16>) -> PolicyLevel {
        self.port(port).unwrap_or(&self.base).clone()
    }
}

/// The four settings of one level of a traffic policy; `None`: not set at this level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyLevel {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "policy", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancer {
    /// `UNSPECIFIED`: the node's `--lb-policy`.
    Default,
    RoundRobin,
    /// `LEAST_REQUEST` (and the deprecated `LEAST_CONN`): sluice's power of two choices over
    /// peak-EWMA latency × (requests in flight + 1).
    LeastRequest,
    Random,
    /// No balancing: the request goes to the address the client dialled.
    Passthrough,
    ConsistentHash(ConsistentHash),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsistentHash {
    pub key: HashKey,
    /// `maglev.tableSize`; `None`: [`crate::l7::maglev::DEFAULT_TABLE_SIZE`].
    pub table_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "camelCase")]
pub enum HashKey {
    /// `httpHeaderName`, lower-cased.
    Header { name: String },
    /// `httpCookie`: with a `ttl`, sluice sets the cookie when a request has none (a `ttl` of
    /// 0 makes a session cookie).
    Cookie {
        name: String,
        path: Option<String>,
        #[serde(with = "opt_secs")]
        ttl: Option<Duration>,
    },
    /// `useSourceIp`: the client pod's address.
    SourceIp,
    /// `httpQueryParameterName`.
    QueryParameter { name: String },
}

/// `connectionPool`, as sluice's circuit breaker and connection settings take it. `None`:
/// not set (unlimited, or sluice's default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`.
    pub max_connections: Option<u32>,
    /// `tcp.connectTimeout`.
    #[serde(with = "opt_secs")]
    pub connect_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight (Envoy's max_requests, HTTP/1.1 too).
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`.
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries in flight.
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`: an idle upstream HTTP connection closes after this (sluice's own
    /// idle timeouts stay the upper bound).
    #[serde(with = "opt_secs")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// `tls`: TLS that sluice originates towards the destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ClientTls {
    pub mode: TlsMode,
    /// PEM files on the node (sluice's filesystem): trust anchors (`None`: the system's
    /// roots), and for MUTUAL the client certificate chain and its key.
    pub ca_certificates: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// SNI; `None`: the request's host (for a Service, its name as the client used it).
    pub sni: Option<String>,
    /// Names the server's certificate must carry one of (instead of the SNI). For
    /// ISTIO_MUTUAL, SPIFFE IDs.
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicySpec>,
}

/// What a subset selects (the contract with VirtualService routing): the pod labels its
/// endpoints must carry, and its merged traffic policy (top level, then the subset's own; no
/// port-level settings, see [`DrIndex::destination`] for a port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetSel {
    pub labels: Labels,
    pub policy: PolicyLevel,
    /// `namespace/name` of the rule that defines it.
    pub rule: String,
}

/// The subset `subset` of Service `service_ns/service_name`, as the DestinationRule that
/// applies to clients of the Service's own namespace defines it. An error says why not (no
/// rule, no such subset).
pub fn resolve_subset(
    model: &Model,
    service_ns: &str,
    service_name: &str,
    subset: &str,
) -> Result<SubsetSel, String> {
    let index = model.destination_rule_index();
    let applied = index
        .services
        .get(service_ns)
        .and_then(|m| m.get(service_name))
        .and_then(|list| select(list, service_ns, None, service_ns))
        .ok_or_else(|| {
            format!("no DestinationRule defines subsets of Service {service_ns}/{service_name}")
        })?;
    let rule = &applied.rule;
    let s = rule.subsets.iter().find(|s| s.name == subset).ok_or_else(|| unknown_subset(rule, subset))?;
    Ok(SubsetSel {
        labels: s.labels.clone(),
        policy: merge(rule.traffic_policy.as_ref(), s.traffic_policy.as_ref(), None),
        rule: format!("{}/{}", rule.namespace, rule.name),
    })
}

fn unknown_subset(rule: &DestinationRule, subset: &str) -> String {
    let known: Vec<&str> = rule.subsets.iter().map(|s| s.name.as_str()).collect();
    format!(
        "DestinationRule {}/{} has no subset {subset:?} (it has: {})",
        rule.namespace,
        rule.name,
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )
}

/// The effective settings for `port` of a destination: the top level (or its port-level
/// settings), overridden by the subset's fields, or replaced by the subset's port-level
/// settings. This is Istio's merge.
pub fn merge(
    top: Option<&TrafficPolicySpec>,
    subset: Option<&TrafficPolicySpec>,
    port: Option<u16>,
) -> PolicyLevel {
    let mut p = top.map(|t| t.for_port(port)).unwrap_or_default();
    if let Some(s) = subset {
        if let Some(level) = s.port(port) {
            return level.clone();
        }
        let b = &s.base;
        if b.load_balancer.is_some() {
            p.load_balancer = b.load_balancer.clone();
        }
        if b.connection_pool.is_some() {
            p.connection_pool = b.connection_pool.clone();
        }
        if b.outlier_detection.is_some() {
            p.outlier_detection = b.outlier_detection;
        }
        if b.tls.is_some() {
            p.tls = b.tls.clone();
        }
    }
    p
}

// ---------------------------------------------------------------------------------------------
// The index

/// One destination as resolved for one rule, port and subset.
#[derive(Debug)]
pub struct Resolved {
    /// `namespace/name` of the rule.
    pub rule: Arc<str>,
    pub subset: Option<String>,
    pub policy: PolicyLevel,
    ipv4: Arc<[SocketAddr]>,
    ipv6: Arc<[SocketAddr]>,
    maglev_v4: Option<Arc<Maglev>>,
    maglev_v6: Option<Arc<Maglev>>,
}

impl Resolved {
    /// The destination's ready endpoints of `family` if it has any, else of the other family
    /// (a route's backend prefers the family the client dialled), with the Maglev table built
    /// over exactly that list when the policy hashes.
    pub fn endpoints_preferring(&self, family: AddressType) -> (&Arc<[SocketAddr]>, Option<&Arc<Maglev>>) {
        let pick = |f: AddressType| match f {
            AddressType::IPv4 => (&self.ipv4, self.maglev_v4.as_ref()),
            AddressType::IPv6 => (&self.ipv6, self.maglev_v6.as_ref()),
        };
        let preferred = pick(family);
        if preferred.0.is_empty() {
            pick(family.other())
        } else {
            preferred
        }
    }

    /// The endpoints of exactly one family (a ClusterIP leads to its own family only).
    pub fn endpoints_of(&self, family: AddressType) -> (&Arc<[SocketAddr]>, Option<&Arc<Maglev>>) {
        match family {
            AddressType::IPv4 => (&self.ipv4, self.maglev_v4.as_ref()),
            AddressType::IPv6 => (&self.ipv6, self.maglev_v6.as_ref()),
        }
    }
}

#[derive(Debug)]
struct PortDest {
    base: Arc<Resolved>,
    /// In the order of the rule's subsets.
    subsets: Box<[Arc<Resolved>]>,
}

/// A rule as it applies to one destination (a Service or a ServiceEntry).
#[derive(Debug)]
struct Applied {
    rule: Arc<DestinationRule>,
    /// 0 for an exact host; a wildcard ranks after, the longer its suffix the sooner.
    specificity: u32,
    /// The rule's place in (oldest, namespace, name) order.
    rank: u32,
    ports: Box<[(u16, PortDest)]>,
}

/// Counts of the index, for the admin view.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DrIndexStats {
    pub destinations: usize,
    pub maglev_tables: usize,
    pub maglev_slots: usize,
    /// Consistent-hash endpoint sets hashed by rendezvous because the table budget
    /// ([`MAX_TABLE_SLOTS`]) was spent.
    pub tables_over_budget: usize,
}

/// Every DestinationRule resolved against the Services and ServiceEntries of one snapshot.
#[derive(Debug, Default)]
pub struct DrIndex {
    services: HashMap<String, HashMap<String, Box<[Applied]>>>,
    entries: HashMap<String, HashMap<String, Box<[Applied]>>>,
    /// Some rule has a workloadSelector (only then does a lookup need the client's labels).
    selectors: bool,
    pub stats: DrIndexStats,
}

/// Who is asking: the client pod's namespace and, when a rule has a workloadSelector, its
/// labels.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub namespace: &'a str,
    pub labels: Option<&'a Labels>,
}

impl DrIndex {
    /// Whether lookups need the client's labels (some rule has a workloadSelector).
    pub fn needs_labels(&self) -> bool {
        self.selectors
    }

    /// The destination Service `svc_ns/svc_name` port `port` (subset `subset`) as the rule that
    /// applies to `client` resolves it. `None`: no rule applies (and no subset was asked for).
    /// An error: a subset was asked for that the rule in force does not define (or no rule).
    pub fn destination(
        &self,
        client: Client<'_>,
        svc_ns: &str,
        svc_name: &str,
        port: u16,
        subset: Option<&str>,
    ) -> Option<Result<&Arc<Resolved>, String>> {
        let found = self
            .services
            .get(svc_ns)
            .and_then(|m| m.get(svc_name))
            .and_then(|list| select(list, client.namespace, client.labels, svc_ns));
        lookup(found, port, subset, || format!("Service {svc_ns}/{svc_name}"))
    }

    /// Which DestinationRule is in force for Service `svc_ns/svc_name`, per audience, for
    /// `sluice routes`: `(clients, "namespace/name", subset names)`. The audiences are the
    /// Service's own namespace, each namespace that has a rule for it, and every other
    /// namespace; a rule with a workloadSelector is listed for the pods it selects. Audiences
    /// no rule applies to are left out.
    pub fn in_force(&self, svc_ns: &str, svc_name: &str) -> Vec<(String, String, Vec<String>)> {
        let Some(list) = self.services.get(svc_ns).and_then(|m| m.get(svc_name)) else {
            return Vec::new();
        };
        let describe = |a: &Applied| {
            let r = &a.rule;
            (format!("{}/{}", r.namespace, r.name), r.subsets.iter().map(|s| s.name.clone()).collect::<Vec<_>>())
        };
        let mut out = Vec::new();
        for a in list.iter().filter(|a| a.rule.workload_selector.is_some()) {
            let labels = a.rule.workload_selector.iter().flatten().map(|(k, v)| format!("{k}={v}"));
            let clients = format!("pods of {} labelled {}", a.rule.namespace, labels.collect::<Vec<_>>().join(","));
            let (rule, subsets) = describe(a);
            out.push((clients, rule, subsets));
        }
        let mut namespaces: Vec<&str> = vec![svc_ns];
        namespaces.extend(list.iter().map(|a| a.rule.namespace.as_str()).filter(|n| *n != ROOT_NAMESPACE));
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in &namespaces {
            if let Some(a) = select(list, ns, None, svc_ns) {
                let (rule, subsets) = describe(a);
                out.push((format!("clients in namespace {ns}"), rule, subsets));
            }
        }
        // A namespace no rule lives in (Kubernetes names cannot contain '/').
        if let Some(a) = select(list, "/other", None, svc_ns) {
            let (rule, subsets) = describe(a);
            out.push(("clients in other namespaces".to_owned(), rule, subsets));
        }
        out
    }

    /// The same for a ServiceEntry (policy only: subsets of ServiceEntry hosts are not
    /// supported, their endpoints carry no pod labels sluice reads).
    pub fn service_entry(
        &self,
        client: Client<'_>,
        entry_ns: &str,
        entry_name: &str,
        port: u16,
    ) -> Option<&Arc<Resolved>> {
        let list = self.entries.get(entry_ns)?.get(entry_name)?;
        let applied = select(list, client.namespace, client.labels, entry_ns)?;
        applied.ports.iter().find(|(p, _)| *p == port).map(|(_, d)| &d.base)
    }

    /// Builds the index of `model`'s rules (control path, once per snapshot).
    pub fn build(model: &Model) -> DrIndex {
        let mut rules: Vec<Arc<DestinationRule>> = model.destination_rules().cloned().collect();
        rules.sort_by(|a, b| rule_precedence(a, b));
        let mut index =
            DrIndex { selectors: rules.iter().any(|r| r.workload_selector.is_some()), ..Default::default() };
        if rules.is_empty() {
            return index;
        }
        let mut tables = Tables::default();
        let mut services_out: HashMap<String, HashMap<String, Vec<Applied>>> = HashMap::new();
        let mut entries_out: HashMap<String, HashMap<String, Vec<Applied>>> = HashMap::new();
        // Services by FQDN, for exact hosts; wildcards scan them all.
        let mut services: Vec<(String, &Arc<crate::discovery::Service>)> =
            model.services().map(|s| (service_fqdn(&s.namespace, &s.name), s)).collect();
        services.sort_by(|a, b| a.0.cmp(&b.0));
        for (rank, rule) in rules.iter().enumerate() {
            for (fqdn, svc) in &services {
                let Some(specificity) = host_match(&rule.host, fqdn) else { continue };
                let mut ports: Vec<u16> = svc.ports.iter().map(|p| p.port).collect();
                ports.sort_unstable();
                ports.dedup();
                let ports = ports
                    .into_iter()
                    .map(|port| {
                        (port, resolve_port(model, rule, &svc.namespace, &svc.name, port, &mut tables))
                    })
                    .collect();
                index.stats.destinations += 1;
                services_out
                    .entry(svc.namespace.clone())
                    .or_default()
                    .entry(svc.name.clone())
                    .or_default()
                    .push(Applied { rule: rule.clone(), specificity, rank: rank as u32, ports });
            }
            for entry in model.service_entries() {
                let Some(specificity) =
                    entry.hosts.iter().filter_map(|h| entry_host_match(&rule.host, h)).min()
                else {
                    continue;
                };
                let ports = entry
                    .ports
                    .iter()
                    .map(|p| {
                        let base = Arc::new(Resolved {
                            rule: format!("{}/{}", rule.namespace, rule.name).into(),
                            subset: None,
                            policy: merge(rule.traffic_policy.as_ref(), None, Some(p.number)),
                            ipv4: Arc::from([]),
                            ipv6: Arc::from([]),
                            maglev_v4: None,
                            maglev_v6: None,
                        });
                        (p.number, PortDest { base, subsets: Box::from([]) })
                    })
                    .collect();
                index.stats.destinations += 1;
                entries_out
                    .entry(entry.namespace.clone())
                    .or_default()
                    .entry(entry.name.clone())
                    .or_default()
                    .push(Applied { rule: rule.clone(), specificity, rank: rank as u32, ports });
            }
        }
        let boxed = |m: HashMap<String, HashMap<String, Vec<Applied>>>| {
            m.into_iter()
                .map(|(ns, by)| (ns, by.into_iter().map(|(n, v)| (n, v.into_boxed_slice())).collect()))
                .collect()
        };
        index.services = boxed(services_out);
        index.entries = boxed(entries_out);
        index.stats.maglev_tables = tables.built.len();
        index.stats.maglev_slots = tables.slots;
        index.stats.tables_over_budget = tables.over_budget;
        index
    }
}

fn lookup<'a>(
    found: Option<&'a Applied>,
    port: u16,
    subset: Option<&str>,
    what: impl Fn() -> String,
) -> Option<Result<&'a Arc<Resolved>, String>> {
    let Some(applied) = found else {
        return subset.map(|s| Err(format!("no DestinationRule for {} defines subset {s:?}", what())));
    };
    let dest = applied.ports.iter().find(|(p, _)| *p == port).map(|(_, d)| d);
    match (dest, subset) {
        (None, None) => None,
        (None, Some(_)) => Some(Err(format!("{} has no port {port}", what()))),
        (Some(d), None) => Some(Ok(&d.base)),
        (Some(d), Some(s)) => Some(
            applied
                .rule
                .subsets
                .iter()
                .position(|x| x.name == s)
                .map(|i| &d.subsets[i])
                .ok_or_else(|| unknown_subset(&applied.rule, s)),
        ),
    }
}

/// The rule in force for a client of namespace `client_ns` among the rules naming a
/// destination of namespace `dest_ns` (see the module docs).
fn select<'a>(
    list: &'a [Applied],
    client_ns: &str,
    labels: Option<&Labels>,
    dest_ns: &str,
) -> Option<&'a Applied> {
    list.iter()
        .filter_map(|a| {
            let r = &a.rule;
            let standing = if r.namespace == client_ns {
                match &r.workload_selector {
                    None => 1,
                    Some(sel) if labels.is_some_and(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v))) => 0,
                    Some(_) => return None,
                }
            } else if r.workload_selector.is_some() || !exported_to(&r.export_to, &r.namespace, client_ns) {
                return None;
            } else if r.namespace == dest_ns {
                2
            } else if r.namespace == ROOT_NAMESPACE {
                3
            } else {
                return None;
            };
            Some(((standing, a.specificity, a.rank), a))
        })
        .min_by_key(|(k, _)| *k)
        .map(|(_, a)| a)
}

/// How a rule's host matches a Service FQDN: `Some(0)` exact, `Some(n)` a wildcard (the longer
/// its suffix the smaller `n`), `None` no match.
fn host_match(rule_host: &str, fqdn: &str) -> Option<u32> {
    if rule_host == fqdn {
        return Some(0);
    }
    if rule_host == "*" {
        return Some(u32::MAX);
    }
    let suffix = rule_host.strip_prefix('*')?; // ".prod.svc.cluster.local"
    fqdn.ends_with(suffix).then(|| u32::MAX - suffix.len() as u32)
}

/// As [`host_match`] for a ServiceEntry host (which may itself be a wildcard: it then matches
/// a rule with the same wildcard).
fn entry_host_match(rule_host: &str, entry_host: &str) -> Option<u32> {
    if rule_host == entry_host {
        return Some(0);
    }
    if entry_host.starts_with('*') {
        return None;
    }
    host_match(rule_host, entry_host)
}

/// The Maglev tables of one snapshot, shared between destinations with the same endpoints.
#[derive(Default)]
struct Tables {
    built: HashMap<(Arc<[SocketAddr]>, u32), Arc<Maglev>>,
    slots: usize,
    over_budget: usize,
}

impl Tables {
    fn get(&mut self, endpoints: &Arc<[SocketAddr]>, size: Option<u32>) -> Option<Arc<Maglev>> {
        if endpoints.is_empty() {
            return None;
        }
        let size = size.unwrap_or(crate::l7::maglev::DEFAULT_TABLE_SIZE);
        if endpoints.len() > crate::l7::maglev::MAX_TABLE_ENDPOINTS {
            self.over_budget += 1;
            return None;
        }
        if let Some(t) = self.built.get(&(endpoints.clone(), size)) {
            return Some(t.clone());
        }
        if self.slots + size as usize > MAX_TABLE_SLOTS {
            self.over_budget += 1;
            return None;
        }
        self.slots += size as usize;
        let t = Arc::new(Maglev::build(endpoints.clone(), size));
        self.built.insert((endpoints.clone(), size), t.clone());
        Some(t)
    }
}

fn resolve_port(
    model: &Model,
    rule: &DestinationRule,
    ns: &str,
    name: &str,
    port: u16,
    tables: &mut Tables,
) -> PortDest {
    let target = model.service_port(ns, name, port);
    let empty: Arc<[SocketAddr]> = Arc::from([]);
    let (all4, all6) = match target {
        Some(t) => (t.endpoints_of(AddressType::IPv4).clone(), t.endpoints_of(AddressType::IPv6).clone()),
        None => (empty.clone(), empty),
    };
    let key: Arc<str> = format!("{}/{}", rule.namespace, rule.name).into();
    let mut make = |subset: Option<&Subset>| {
        let policy =
            merge(rule.traffic_policy.as_ref(), subset.and_then(|s| s.traffic_policy.as_ref()), Some(port));
        let (ipv4, ipv6) = match subset {
            Some(s) if !s.labels.is_empty() => {
                (filter_by_labels(model, &all4, &s.labels), filter_by_labels(model, &all6, &s.labels))
            }
            _ => (all4.clone(), all6.clone()),
        };
        let hash_size = match &policy.load_balancer {
            Some(LoadBalancer::ConsistentHash(ch)) => Some(ch.table_size),
            _ => None,
        };
        let (maglev_v4, maglev_v6) = match hash_size {
            Some(size) => (tables.get(&ipv4, size), tables.get(&ipv6, size)),
            None => (None, None),
        };
        Arc::new(Resolved {
            rule: key.clone(),
            subset: subset.map(|s| s.name.clone()),
            policy,
            ipv4,
            ipv6,
            maglev_v4,
            maglev_v6,
        })
    };
    let base = make(None);
    let subsets = rule.subsets.iter().map(|s| make(Some(s))).collect();
    PortDest { base, subsets }
}

/// The endpoints whose pod carries every label of `labels` (an endpoint whose pod the model
/// does not know carries none).
fn filter_by_labels(model: &Model, endpoints: &Arc<[SocketAddr]>, labels: &Labels) -> Arc<[SocketAddr]> {
    endpoints
        .iter()
        .copied()
        .filter(|e| {
            model
                .pod_by_ip(e.ip())
                .is_some_and(|pod| labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
        })
        .collect()
}

fn rule_precedence(a: &DestinationRule, b: &DestinationRule) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let created = match (&a.created, &b.created) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    created.then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
}

// ---------------------------------------------------------------------------------------------
// Parsing: Istio's schema as serde types

/// Parses a DestinationRule document (`manifest::KINDS`).
pub(crate) fn destination_rule(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let spec = doc.require("spec")?;
    let wire: SpecW = serde_path_to_error::deserialize(spec.value).map_err(|e| {
        let inner = e.path().to_string();
        let field =
            if inner == "." || inner.is_empty() { "spec".to_string() } else { format!("spec.{inner}") };
        DocError::Invalid { field, reason: e.into_inner().to_string() }
    })?;
    let rule = convert(meta, wire)?;
    Ok(Object::DestinationRule(Arc::new(rule)))
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> DocError {
    DocError::Invalid { field: field.into(), reason: reason.into() }
}

/// `null` is as good as absent (Kubernetes treats both alike).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SpecW {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicyW>,
    #[serde(default, deserialize_with = "nullable")]
    subsets: Vec<SubsetW>,
    #[serde(default, deserialize_with = "nullable")]
    export_to: Vec<String>,
    #[serde(default)]
    workload_selector: Option<WorkloadSelectorW>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSelectorW {
    #[serde(default, deserialize_with = "nullable")]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SubsetW {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicyW>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TrafficPolicyW {
    #[serde(default)]
    load_balancer: Option<LoadBalancerW>,
    #[serde(default)]
    connection_pool: Option<ConnectionPoolW>,
    #[serde(default)]
    outlier_detection: Option<OutlierW>,
    #[serde(default)]
    tls: Option<TlsW>,
    #[serde(default, deserialize_with = "nullable")]
    port_level_settings: Vec<PortLevelW>,
    #[serde(default)]
    proxy_protocol: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    tunnel: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortLevelW {
    #[serde(default)]
    port: Option<PortSelectorW>,
    #[serde(default)]
    load_balancer: Option<LoadBalancerW>,
    #[serde(default)]
    connection_pool: Option<ConnectionPoolW>,
    #[serde(default)]
    outlier_detection: Option<OutlierW>,
    #[serde(default)]
    tls: Option<TlsW>,
}

/// The four settings of a level, as read (from a trafficPolicy or a port-level entry).
struct LevelW {
    load_balancer: Option<LoadBalancerW>,
    connection_pool: Option<ConnectionPoolW>,
    outlier_detection: Option<OutlierW>,
    tls: Option<TlsW>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortSelectorW {
    #[serde(default)]
    number: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadBalancerW {
    #[serde(default)]
    simple: Option<String>,
    #[serde(default)]
    consistent_hash: Option<ConsistentHashW>,
    #[serde(default)]
    locality_lb_setting: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    warmup_duration_secs: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    warmup: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConsistentHashW {
    #[serde(default)]
    http_header_name: Option<String>,
    #[serde(default)]
    http_cookie: Option<CookieW>,
    #[serde(default)]
    use_source_ip: Option<bool>,
    #[serde(default)]
    http_query_parameter_name: Option<String>,
    #[serde(default)]
    ring_hash: Option<RingHashW>,
    #[serde(default)]
    maglev: Option<MaglevW>,
    #[serde(default)]
    minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CookieW {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    attributes: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RingHashW {
    #[serde(default)]
    minimum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MaglevW {
    #[serde(default)]
    table_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConnectionPoolW {
    #[serde(default)]
    tcp: Option<TcpW>,
    #[serde(default)]
    http: Option<HttpW>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TcpW {
    #[serde(default)]
    max_connections: Option<i64>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(default)]
    tcp_keepalive: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    max_connection_duration: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    idle_timeout: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpW {
    #[serde(default)]
    http1_max_pending_requests: Option<i64>,
    #[serde(default)]
    http2_max_requests: Option<i64>,
    #[serde(default)]
    max_requests_per_connection: Option<i64>,
    #[serde(default)]
    max_retries: Option<i64>,
    #[serde(default)]
    idle_timeout: Option<String>,
    #[serde(default)]
    h2_upgrade_policy: Option<String>,
    #[serde(default)]
    use_client_protocol: Option<bool>,
    #[serde(default)]
    max_concurrent_streams: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OutlierW {
    #[serde(default)]
    consecutive_errors: Option<i64>,
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<i64>,
    #[serde(default)]
    consecutive_gateway_errors: Option<i64>,
    #[serde(default)]
    consecutive_local_origin_failures: Option<i64>,
    #[serde(default)]
    split_external_local_origin_errors: Option<bool>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<i64>,
    #[serde(default)]
    min_health_percent: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TlsW {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    client_certificate: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    ca_certificates: Option<String>,
    #[serde(default)]
    credential_name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    insecure_skip_verify: Option<bool>,
    #[serde(default)]
    ca_crl: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Conversion and Istio's validation

fn convert(meta: Meta, w: SpecW) -> Result<DestinationRule, DocError> {
    let host =
        w.host.filter(|h| !h.is_empty()).ok_or_else(|| DocError::Missing { field: "spec.host".into() })?;
    check_host(&host).map_err(|r| invalid("spec.host", r))?;
    let top_policy = w.traffic_policy.map(|t| traffic_policy(t, "spec.trafficPolicy")).transpose()?;
    if w.subsets.len() > MAX_SUBSETS {
        return Err(invalid("spec.subsets", format!("at most {MAX_SUBSETS} subsets")));
    }
    let mut subsets: Vec<Subset> = Vec::with_capacity(w.subsets.len());
    for (i, s) in w.subsets.into_iter().enumerate() {
        let path = format!("spec.subsets[{i}]");
        let name = s
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| DocError::Missing { field: format!("{path}.name") })?;
        if let Some(reason) = crate::discovery::fields::NameRule::Dns1123Label.check(&name) {
            return Err(invalid(format!("{path}.name"), reason));
        }
        if subsets.iter().any(|x| x.name == name) {
            return Err(invalid(format!("{path}.name"), format!("subset {name:?} is defined twice")));
        }
        let traffic_policy =
            s.traffic_policy.map(|t| traffic_policy(t, &format!("{path}.trafficPolicy"))).transpose()?;
        subsets.push(Subset { name, labels: s.labels, traffic_policy });
    }
    for (i, e) in w.export_to.iter().enumerate() {
        let ok = matches!(e.as_str(), "*" | "." | "~")
            || crate::discovery::fields::NameRule::Dns1123Label.check(e).is_none();
        if !ok {
            return Err(invalid(
                format!("spec.exportTo[{i}]"),
                format!("{e:?} is not \".\", \"*\", \"~\" or a namespace name"),
            ));
        }
    }
    let workload_selector = w.workload_selector.map(|s| s.match_labels);
    Ok(DestinationRule {
        host: resolve_host(&host, &meta.namespace),
        namespace: meta.namespace,
        name: meta.name,
        created: meta.creation_timestamp,
        traffic_policy: top_policy,
        subsets,
        export_to: w.export_to,
        workload_selector,
    })
}

/// Istio's host rules: a DNS name, a wildcard only as the whole first label.
fn check_host(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    let rest = host.strip_prefix("*.").unwrap_or(host);
    let ok = !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host name (a short Service name, an FQDN, or a wildcard \"*.suffix\")"
        ))
    }
}

fn traffic_policy(t: TrafficPolicyW, path: &str) -> Result<TrafficPolicySpec, DocError> {
    if t.proxy_protocol.is_some() {
        return Err(invalid(
            format!("{path}.proxyProtocol"),
            "not supported: sluice does not send the PROXY protocol header (the destination sees the client pod's own address instead)",
        ));
    }
    if t.tunnel.is_some() {
        return Err(invalid(
            format!("{path}.tunnel"),
            "not supported: sluice does not tunnel to a destination through a proxy",
        ));
    }
    let base = level(
        LevelW {
            load_balancer: t.load_balancer,
            connection_pool: t.connection_pool,
            outlier_detection: t.outlier_detection,
            tls: t.tls,
        },
        path,
    )?;
    if t.port_level_settings.len() > MAX_PORT_LEVEL_SETTINGS {
        return Err(invalid(
            format!("{path}.portLevelSettings"),
            format!("at most {MAX_PORT_LEVEL_SETTINGS} entries"),
        ));
    }
    let mut port_level: Vec<(u16, PolicyLevel)> = Vec::new();
    for (i, p) in t.port_level_settings.into_iter().enumerate() {
        let at = format!("{path}.portLevelSettings[{i}]");
        let number = p
            .port
            .and_then(|p| p.number)
            .ok_or_else(|| DocError::Missing { field: format!("{at}.port.number") })?;
        let port = u16::try_from(number).ok().filter(|n| *n > 0).ok_or_else(|| {
            invalid(format!("{at}.port.number"), format!("{number} is not a port number (1-65535)"))
        })?;
        if port_level.iter().any(|(q, _)| *q == port) {
            return Err(invalid(format!("{at}.port.number"), format!("port {port} has settings twice")));
        }
        let l = LevelW {
            load_balancer: p.load_balancer,
            connection_pool: p.connection_pool,
            outlier_detection: p.outlier_detection,
            tls: p.tls,
        };
        port_level.push((port, level(l, &at)?));
    }
    Ok(TrafficPolicySpec { base, port_level })
}

fn level(l: LevelW, path: &str) -> Result<PolicyLevel, DocError> {
    Ok(PolicyLevel {
        load_balancer: l
            .load_balancer
            .map(|lb| load_balancer(lb, &format!("{path}.loadBalancer")))
            .transpose()?,
        connection_pool: l
            .connection_pool
            .map(|c| connection_pool(c, &format!("{path}.connectionPool")))
            .transpose()?,
        outlier_detection: l
            .outlier_detection
            .map(|o| outlier(o, &format!("{path}.outlierDetection")))
            .transpose()?,
        tls: l.tls.map(|t| tls(t, &format!("{path}.tls"))).transpose()?,
    })
}

fn load_balancer(lb: LoadBalancerW, path: &str) -> Result<LoadBalancer, DocError> {
    if lb.locality_lb_setting.is_some() {
        return Err(invalid(
            format!("{path}.localityLbSetting"),
            "not supported: sluice has no locality (region/zone) information about endpoints; it balances over all of them",
        ));
    }
    if lb.warmup_duration_secs.is_some() || lb.warmup.is_some() {
        let field = if lb.warmup.is_some() { "warmup" } else { "warmupDurationSecs" };
        return Err(invalid(
            format!("{path}.{field}"),
            "not supported: sluice's balancer gives a new endpoint one probe request, then weighs it by its measured latency; it has no slow-start ramp",
        ));
    }
    match (lb.simple, lb.consistent_hash) {
        (Some(_), Some(_)) => Err(invalid(path.to_string(), "set either simple or consistentHash, not both")),
        (None, None) => Ok(LoadBalancer::Default),
        (Some(s), None) => match s.as_str() {
            "UNSPECIFIED" | "" => Ok(LoadBalancer::Default),
            "ROUND_ROBIN" => Ok(LoadBalancer::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" => Ok(LoadBalancer::LeastRequest),
            "RANDOM" => Ok(LoadBalancer::Random),
            "PASSTHROUGH" => Ok(LoadBalancer::Passthrough),
            other => Err(invalid(
                format!("{path}.simple"),
                format!("{other:?} is not one of UNSPECIFIED, ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM, PASSTHROUGH"),
            )),
        },
        (None, Some(ch)) => consistent_hash(ch, &format!("{path}.consistentHash")).map(LoadBalancer::ConsistentHash),
    }
}

fn consistent_hash(ch: ConsistentHashW, path: &str) -> Result<ConsistentHash, DocError> {
    let mut keys = Vec::new();
    if let Some(h) = ch.http_header_name {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(invalid(format!("{path}.httpHeaderName"), format!("{h:?} is not a header name")));
        }
        keys.push(HashKey::Header { name: h.to_ascii_lowercase() });
    }
    if let Some(c) = ch.http_cookie {
        let at = format!("{path}.httpCookie");
        if c.attributes.is_some() {
            return Err(invalid(
                format!("{at}.attributes"),
                "not supported: sluice sets its cookie with Path, Max-Age and HttpOnly only",
            ));
        }
        let name = c
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| DocError::Missing { field: format!("{at}.name") })?;
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
            return Err(invalid(format!("{at}.name"), format!("{name:?} is not a cookie name")));
        }
        if let Some(p) = &c.path {
            if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_control() || b == b';') {
                return Err(invalid(format!("{at}.path"), format!("{p:?} is not a cookie path")));
            }
        }
        let ttl =
            c.ttl.map(|t| parse_duration(&t).map_err(|r| invalid(format!("{at}.ttl"), r))).transpose()?;
        keys.push(HashKey::Cookie { name, path: c.path, ttl });
    }
    if ch.use_source_ip == Some(true) {
        keys.push(HashKey::SourceIp);
    }
    if let Some(q) = ch.http_query_parameter_name {
        if q.is_empty() {
            return Err(invalid(format!("{path}.httpQueryParameterName"), "must not be empty"));
        }
        keys.push(HashKey::QueryParameter { name: q });
    }
    let key = match keys.len() {
        1 => keys.pop().expect("one"),
        0 => {
            return Err(invalid(
                path.to_string(),
                "needs one hash key: httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
            ))
        }
        _ => {
            return Err(invalid(
                path.to_string(),
                "set only one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName",
            ))
        }
    };
    if ch.ring_hash.is_some() && ch.maglev.is_some() {
        return Err(invalid(path.to_string(), "set either ringHash or maglev, not both"));
    }
    // The ring's size is a property of the algorithm sluice does not use: consistent hashing is
    // always a Maglev table here (accepted, see the README).
    let _ = (ch.ring_hash.and_then(|r| r.minimum_ring_size), ch.minimum_ring_size);
    let table_size = match ch.maglev.and_then(|m| m.table_size) {
        None | Some(0) => None,
        Some(n) if Maglev::valid_size(n) => Some(n as u32),
        Some(n) => {
            return Err(invalid(
                format!("{path}.maglev.tableSize"),
                format!(
                    "{n} is not a prime number up to {} (sluice's largest table)",
                    crate::l7::maglev::MAX_TABLE_SIZE
                ),
            ))
        }
    };
    Ok(ConsistentHash { key, table_size })
}

/// A count in an Istio int32/uint32 field where 0 means "not set" (proto3's zero value).
fn count(v: Option<i64>, path: &str) -> Result<Option<u32>, DocError> {
    match v {
        None | Some(0) => Ok(None),
        Some(n) if (1..=i64::from(i32::MAX)).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(invalid(path.to_string(), format!("{n} is not a count (1-{})", i32::MAX))),
    }
}

fn duration_field(v: Option<String>, path: &str) -> Result<Option<Duration>, DocError> {
    v.map(|s| parse_duration(&s).map_err(|r| invalid(path.to_string(), r))).transpose()
}

fn connection_pool(c: ConnectionPoolW, path: &str) -> Result<ConnectionPool, DocError> {
    let mut pool = ConnectionPool::default();
    if let Some(tcp) = c.tcp {
        let at = format!("{path}.tcp");
        if tcp.tcp_keepalive.is_some() {
            return Err(invalid(
                format!("{at}.tcpKeepalive"),
                "not supported per destination: sluice sets TCP keepalive on every socket itself (60 s idle, then 4 probes 15 s apart)",
            ));
        }
        if tcp.max_connection_duration.is_some() {
            return Err(invalid(
                format!("{at}.maxConnectionDuration"),
                "not supported: sluice does not close connections by age",
            ));
        }
        if tcp.idle_timeout.is_some() {
            return Err(invalid(
                format!("{at}.idleTimeout"),
                "not supported per destination: opaque TCP connections close after --tcp-idle-timeout-s without a byte (node-wide)",
            ));
        }
        pool.max_connections = count(tcp.max_connections, &format!("{at}.maxConnections"))?;
        pool.connect_timeout =
            duration_field(tcp.connect_timeout, &format!("{at}.connectTimeout"))?.filter(|d| !d.is_zero());
    }
    if let Some(http) = c.http {
        let at = format!("{path}.http");
        if http.max_concurrent_streams.is_some() {
            return Err(invalid(
                format!("{at}.maxConcurrentStreams"),
                "not supported: sluice follows the server's own SETTINGS_MAX_CONCURRENT_STREAMS on each upstream HTTP/2 connection",
            ));
        }
        match http.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT") | Some("DO_NOT_UPGRADE") => {}
            Some("UPGRADE") => {
                return Err(invalid(
                    format!("{at}.h2UpgradePolicy"),
                    "UPGRADE is not supported: sluice keeps the client's HTTP version upstream (HTTP/1.1 stays HTTP/1.1)",
                ))
            }
            Some(other) => {
                return Err(invalid(format!("{at}.h2UpgradePolicy"), format!("{other:?} is not one of DEFAULT, DO_NOT_UPGRADE, UPGRADE")))
            }
        }
        // useClientProtocol: sluice always keeps the client's protocol, whatever it says.
        let _ = http.use_client_protocol;
        pool.max_pending_requests =
            count(http.http1_max_pending_requests, &format!("{at}.http1MaxPendingRequests"))?;
        pool.max_requests = count(http.http2_max_requests, &format!("{at}.http2MaxRequests"))?;
        pool.max_requests_per_connection =
            count(http.max_requests_per_connection, &format!("{at}.maxRequestsPerConnection"))?;
        pool.max_retries = count(http.max_retries, &format!("{at}.maxRetries"))?;
        pool.idle_timeout =
            duration_field(http.idle_timeout, &format!("{at}.idleTimeout"))?.filter(|d| !d.is_zero());
    }
    Ok(pool)
}

fn outlier(o: OutlierW, path: &str) -> Result<OutlierDetection, DocError> {
    let d = crate::discovery::kinds_traffic::DEFAULT_OUTLIER;
    let nonneg = |v: Option<i64>, field: &str, max: i64| -> Result<Option<u32>, DocError> {
        match v {
            None => Ok(None),
            Some(n) if (0..=max).contains(&n) => Ok(Some(n as u32)),
            Some(n) => Err(invalid(format!("{path}.{field}"), format!("{n} is out of range (0-{max})"))),
        }
    };
    let i32max = i64::from(i32::MAX);
    let split = o.split_external_local_origin_errors.unwrap_or(false);
    let consecutive_5xx = nonneg(o.consecutive_5xx_errors, "consecutive5xxErrors", i32max)?;
    // The deprecated `consecutiveErrors` counts 502, 503 and 504, as Istio maps it.
    let gateway = match nonneg(o.consecutive_gateway_errors, "consecutiveGatewayErrors", i32max)? {
        Some(g) => Some(g),
        None => nonneg(o.consecutive_errors, "consecutiveErrors", i32max)?,
    };
    let local = nonneg(o.consecutive_local_origin_failures, "consecutiveLocalOriginFailures", i32max)?;
    if local.is_some() && !split {
        return Err(invalid(
            format!("{path}.consecutiveLocalOriginFailures"),
            "only takes effect with splitExternalLocalOriginErrors: true (as in Istio)",
        ));
    }
    let interval = duration_field(o.interval, &format!("{path}.interval"))?;
    let base = duration_field(o.base_ejection_time, &format!("{path}.baseEjectionTime"))?;
    if interval.is_some_and(|i| i.is_zero()) {
        return Err(invalid(format!("{path}.interval"), "must be longer than 0"));
    }
    if base.is_some_and(|b| b.is_zero()) {
        return Err(invalid(format!("{path}.baseEjectionTime"), "must be longer than 0"));
    }
    Ok(OutlierDetection {
        consecutive_5xx: consecutive_5xx.unwrap_or(d.consecutive_5xx),
        consecutive_gateway_errors: gateway.unwrap_or(0),
        // Istio's (Envoy's) default for local-origin failures when they are split out: 5.
        consecutive_connect_failures: if split { local.unwrap_or(5) } else { 0 },
        interval: interval.unwrap_or(d.interval),
        base_ejection_time: base.unwrap_or(d.base_ejection_time),
        max_ejection_percent: nonneg(o.max_ejection_percent, "maxEjectionPercent", 100)?
            .unwrap_or(d.max_ejection_percent),
        min_health_percent: nonneg(o.min_health_percent, "minHealthPercent", 100)?
            .unwrap_or(d.min_health_percent),
        split_local_origin: split,
    })
}

fn tls(t: TlsW, path: &str) -> Result<ClientTls, DocError> {
    let mode = match t.mode.as_deref() {
        None | Some("DISABLE") => TlsMode::Disable,
        Some("SIMPLE") => TlsMode::Simple,
        Some("MUTUAL") => TlsMode::Mutual,
        Some("ISTIO_MUTUAL") => TlsMode::IstioMutual,
        Some(other) => {
            return Err(invalid(
                format!("{path}.mode"),
                format!("{other:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
            ))
        }
    };
    if t.credential_name.is_some() {
        return Err(invalid(
            format!("{path}.credentialName"),
            "not supported: sluice reads no Secrets (its role has no access to them); mount the Secret into sluice's DaemonSet and name the files with caCertificates, clientCertificate and privateKey",
        ));
    }
    if t.ca_crl.is_some() {
        return Err(invalid(
            format!("{path}.caCrl"),
            "not supported: sluice does not check certificate revocation lists",
        ));
    }
    let file = |v: Option<String>, field: &str| -> Result<Option<PathBuf>, DocError> {
        match v.filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(p) if p.starts_with('/') => Ok(Some(PathBuf::from(p))),
            Some(p) => Err(invalid(
                format!("{path}.{field}"),
                format!("{p:?} is not an absolute path of a file on the node"),
            )),
        }
    };
    let ca_certificates = file(t.ca_certificates, "caCertificates")?;
    let client_certificate = file(t.client_certificate, "clientCertificate")?;
    let private_key = file(t.private_key, "privateKey")?;
    let insecure_skip_verify = t.insecure_skip_verify.unwrap_or(false);
    match mode {
        TlsMode::Mutual => {
            if client_certificate.is_none() {
                return Err(DocError::Missing { field: format!("{path}.clientCertificate") });
            }
            if private_key.is_none() {
                return Err(DocError::Missing { field: format!("{path}.privateKey") });
            }
        }
        TlsMode::Simple | TlsMode::Disable | TlsMode::IstioMutual => {
            let field = if client_certificate.is_some() {
                Some("clientCertificate")
            } else if private_key.is_some() {
                Some("privateKey")
            } else {
                None
            };
            if let Some(field) = field {
                return Err(invalid(format!("{path}.{field}"), "only for mode MUTUAL"));
            }
        }
    }
    if mode == TlsMode::IstioMutual {
        if ca_certificates.is_some() {
            return Err(invalid(
                format!("{path}.caCertificates"),
                "must be empty with ISTIO_MUTUAL (the mesh's trust bundle is used)",
            ));
        }
        if insecure_skip_verify {
            return Err(invalid(
                format!("{path}.insecureSkipVerify"),
                "not with ISTIO_MUTUAL: mesh identities are always verified",
            ));
        }
        if let Some((i, s)) =
            t.subject_alt_names.iter().enumerate().find(|(_, s)| !s.starts_with("spiffe://"))
        {
            return Err(invalid(
                format!("{path}.subjectAltNames[{i}]"),
                format!("{s:?}: with ISTIO_MUTUAL the server's identity is a SPIFFE ID (spiffe://...)"),
            ));
        }
        if t.subject_alt_names.len() > 1 {
            return Err(invalid(
                format!("{path}.subjectAltNames"),
                "with ISTIO_MUTUAL sluice verifies exactly one server identity: name one",
            ));
        }
    }
    if insecure_skip_verify && (ca_certificates.is_some() || !t.subject_alt_names.is_empty()) {
        return Err(invalid(
            format!("{path}.insecureSkipVerify"),
            "contradicts caCertificates and subjectAltNames, which ask for verification",
        ));
    }
    if let Some(sni) = &t.sni {
        if check_host(sni).is_err() || sni.starts_with('*') {
            return Err(invalid(format!("{path}.sni"), format!("{sni:?} is not a server name")));
        }
    }
    Ok(ClientTls {
        mode,
        ca_certificates,
        client_certificate,
        private_key,
        sni: t.sni.filter(|s| !s.is_empty()),
        subject_alt_names: t.subject_alt_names,
        insecure_skip_verify,
    })
}

#[cfg(test)]
#[path = "destination_rule_tests.rs"]
mod tests;

mod opt_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}
