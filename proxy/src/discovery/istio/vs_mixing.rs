//! Which resource routes a client's requests when several name one Service port: the Gateway
//! API's routes (HTTPRoute, GRPCRoute) and VirtualServices, ordered per client namespace as
//! Istio's sidecars order them. Istio never merges them for sidecars: the first resource that
//! has a rule for the client decides (for HTTP: its match, or 404), the others are not
//! consulted. Sources, in istio/istio:
//!
//! - `pilot/pkg/model/virtualservice.go`, `SelectVirtualServices`: a sidecar's VirtualServices
//!   are those exported only to its namespace (`exportTo: [.]` in that namespace), then those
//!   exported to it by name from other namespaces, then the public ones; within each group the
//!   Gateway API's routes in the client's own namespace (`UseGatewaySemantics` and
//!   `c.Namespace == configNamespace`) come first, the rest by creation time (oldest first,
//!   then name, then namespace: `sortMergedVirtualServicesByCreationTime`). HTTPRoutes are
//!   converted to such VirtualServices, the routes of one namespace for one host merged into one
//!   with the oldest route's timestamp (`pilot/pkg/config/kube/gateway/route_collections.go`).
//! - `pilot/pkg/networking/core/route/route.go`, `BuildSidecarVirtualHostWrapper`: each
//!   resource builds a virtual host for the Services its hosts name, unless it has no route for
//!   this client (`sourceLabels`, `sourceNamespace` and `port` are applied per client, and a
//!   resource left with no route builds none); `pilot/pkg/networking/core/httproute.go` then
//!   drops every later virtual host for a host already taken ("duplicate domain").
//! - istio/istio#36621: "There is no merging for mesh" (two VirtualServices for one host: only
//!   the older applies to sidecars).
//!
//! So for a client in namespace C calling a Service of namespace S:
//! 1. VirtualServices of C exported to C only, oldest first;
//! 2. VirtualServices of other namespaces exported to C by name, oldest first;
//! 3. the Gateway API routes of C (consumer routes; when C is S, the producer routes), then
//!    every public VirtualService and (for C other than S) the producer routes, oldest first.
//!
//! Consumer routes of another namespace never apply (GAMMA). What is left after a resource
//! that always decides for the client is shadowed: never consulted, listed by the admin view.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::vs_compile::{Candidate, StreamRoute};
use crate::discovery::route::{ClientInfo, Route};
use crate::discovery::route_table::{Chain, PortRoutes, RouteTable};

/// One resource in a chain: its table, and what orders it.
#[derive(Clone)]
struct Link<T> {
    item: T,
    created: Option<String>,
    name: String,
    namespace: String,
    label: String,
    /// Whether it decides for every client it is consulted for (no rule is client-scoped).
    always_decides: bool,
}

fn age<T>(a: &Link<T>, b: &Link<T>) -> Ordering {
    // A resource without a timestamp (a hand-written manifest) counts as the newest.
    let created = match (&a.created, &b.created) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    created.then_with(|| a.name.cmp(&b.name)).then_with(|| a.namespace.cmp(&b.namespace))
}

/// The ordered links for clients of `client` (`None`: a namespace with nothing of its own).
fn order<T: Clone>(
    client: Option<&str>,
    svc_namespace: &str,
    vs: &[(Link<T>, &Candidate)],
    own_gateway: Option<&Link<T>>,
    producer: Option<&Link<T>>,
) -> (Vec<Link<T>>, Vec<String>) {
    let mut private: Vec<Link<T>> = Vec::new();
    let mut exported: Vec<Link<T>> = Vec::new();
    let mut public: Vec<Link<T>> = Vec::new();
    for (link, c) in vs {
        let e = &c.vs.export_to;
        if e.none {
            continue;
        }
        if e.public {
            public.push(link.clone());
        } else if let Some(ns) = client.filter(|ns| e.namespaces.iter().any(|n| n == ns)) {
            if c.vs.namespace == ns {
                private.push(link.clone());
            } else {
                exported.push(link.clone());
            }
        }
    }
    if client != Some(svc_namespace) {
        public.extend(producer.cloned());
    }
    private.sort_by(age);
    exported.sort_by(age);
    public.sort_by(age);
    let mut all = private;
    all.extend(exported);
    all.extend(own_gateway.cloned());
    all.extend(public);
    // Everything after a resource that always decides is never consulted.
    let mut kept = Vec::new();
    let mut shadowed = Vec::new();
    let mut decided = false;
    for l in all {
        if decided {
            shadowed.push(l.label.clone());
        } else {
            decided = l.always_decides;
            kept.push(l);
        }
    }
    (kept, shadowed)
}

/// Which client namespaces need a chain of their own: the Service's, each with consumer routes,
/// and each a non-public VirtualService is exported to.
fn audiences<'a>(svc_namespace: &'a str, consumers: impl Iterator<Item = &'a str>, vs: &'a [Candidate]) -> BTreeSet<&'a str> {
    let mut out: BTreeSet<&str> = BTreeSet::new();
    out.insert(svc_namespace);
    out.extend(consumers);
    for c in vs {
        if !c.vs.export_to.public && !c.vs.export_to.none {
            out.extend(c.vs.export_to.namespaces.iter().map(String::as_str));
        }
    }
    out
}

fn table_link(table: Arc<RouteTable>, route: &Route, label: String) -> Link<Arc<RouteTable>> {
    Link {
        always_decides: !table.is_empty() && !client_scoped(&table),
        item: table,
        created: route.created.clone(),
        name: route.name.clone(),
        namespace: route.namespace.clone(),
        label,
    }
}

fn client_scoped(t: &RouteTable) -> bool {
    t.entries().all(|(_, _, m)| m.source.is_some())
}

/// The HTTP tables of one Service port: the Gateway API routes attached to it (producer routes
/// in `svc_namespace`, consumer routes elsewhere) and the VirtualServices naming it.
pub fn http_routes(svc_namespace: &str, gateway: &[Arc<Route>], vs: &[Candidate]) -> PortRoutes {
    let vs: Vec<Candidate> = vs.iter().filter(|c| c.http.is_some()).cloned().collect();
    if vs.is_empty() {
        return PortRoutes::build(svc_namespace, gateway);
    }
    let (producer, consumer): (Vec<_>, Vec<_>) = gateway.iter().cloned().partition(|r| r.namespace == svc_namespace);
    let gateway_link = |routes: &[Arc<Route>]| -> Option<Link<Arc<RouteTable>>> {
        // The oldest route stands for the group, as Istio's merged VirtualService does.
        let oldest = routes.iter().min_by(|a, b| route_age(a, b))?;
        let t = Arc::new(RouteTable::build(routes));
        let label = if routes.len() == 1 {
            format!("{} {}", oldest.kind, oldest.key())
        } else {
            format!("{} {} (and {} more)", oldest.kind, oldest.key(), routes.len() - 1)
        };
        Some(table_link(t, oldest, label))
    };
    let producer_link = gateway_link(&producer);
    let mut consumer_by_ns: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
    for r in consumer {
        consumer_by_ns.entry(r.namespace.clone()).or_default().push(r);
    }
    let consumer_links: HashMap<&str, Link<Arc<RouteTable>>> =
        consumer_by_ns.iter().filter_map(|(ns, rs)| Some((ns.as_str(), gateway_link(rs)?))).collect();
    let vs_links: Vec<(Link<Arc<RouteTable>>, &Candidate)> = vs
        .iter()
        .map(|c| {
            let route = c.http.as_ref().expect("filtered above");
            let t = Arc::new(RouteTable::build(std::slice::from_ref(route)));
            (table_link(t, route, format!("VirtualService {}", c.vs.key())), c)
        })
        .collect();
    let chain = |client: Option<&str>| -> Chain {
        let own = match client {
            Some(ns) if ns == svc_namespace => producer_link.as_ref(),
            Some(ns) => consumer_links.get(ns),
            None => None,
        };
        let (links, shadowed) = order(client, svc_namespace, &vs_links, own, producer_link.as_ref());
        Chain { tables: links.into_iter().map(|l| l.item).collect(), shadowed }
    };
    let default = chain(None);
    let by_client = audiences(svc_namespace, consumer_links.keys().copied(), &vs)
        .into_iter()
        .map(|ns| (ns.to_owned(), chain(Some(ns))))
        .collect();
    PortRoutes::from_chains(default, by_client)
}

fn route_age(a: &Route, b: &Route) -> Ordering {
    match (&a.created, &b.created) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
    .then_with(|| a.name.cmp(&b.name))
}

/// The tcp/tls resources of one port, per client namespace, in the same order.
#[derive(Debug, Default)]
pub struct StreamChains {
    default: StreamChain,
    by_client: HashMap<String, StreamChain>,
}

/// The resources a client's connections consult, in order.
#[derive(Debug, Default, Clone)]
pub struct StreamChain {
    pub routes: Vec<Arc<StreamRoute>>,
    pub shadowed: Vec<String>,
}

impl StreamChains {
    pub fn for_client(&self, client_namespace: &str) -> &[Arc<StreamRoute>] {
        &self.by_client.get(client_namespace).unwrap_or(&self.default).routes
    }

    /// The rule that takes a connection and the resource it belongs to: the first resource
    /// with a rule for the client decides (`None`: the Service's own endpoints).
    pub fn select<'a>(
        &'a self,
        conn: &super::vs_compile::StreamConn<'_>,
    ) -> Option<(&'a Arc<StreamRoute>, &'a super::vs_compile::StreamRule)> {
        for r in self.for_client(conn.client.namespace) {
            if !r.for_client(&conn.client) {
                continue;
            }
            return r.select(conn).map(|rule| (r, rule));
        }
        None
    }

    /// Whether a client of `client` would need the ClientHello's server name to decide.
    pub fn needs_sni(&self, client: &ClientInfo<'_>) -> bool {
        self.for_client(client.namespace).iter().find(|r| r.for_client(client)).is_some_and(|r| r.needs_sni())
    }

    pub fn audiences(&self) -> Vec<(Option<&str>, &StreamChain)> {
        let mut v: Vec<(Option<&str>, &StreamChain)> = vec![(None, &self.default)];
        let mut named: Vec<_> = self.by_client.iter().map(|(k, c)| (Some(k.as_str()), c)).collect();
        named.sort_by_key(|(k, _)| *k);
        v.extend(named);
        v
    }
}

/// The tcp/tls chains of one port from the VirtualServices naming it.
pub fn stream_routes(svc_namespace: &str, vs: &[Candidate]) -> Option<StreamChains> {
    let vs: Vec<Candidate> = vs.iter().filter(|c| c.stream.is_some()).cloned().collect();
    if vs.is_empty() {
        return None;
    }
    let links: Vec<(Link<Arc<StreamRoute>>, &Candidate)> = vs
        .iter()
        .map(|c| {
            let r = c.stream.clone().expect("filtered above");
            let always = r.rules.iter().any(|rule| rule.matches.is_empty() || rule.matches.iter().any(|m| m.source.is_none()));
            let link = Link {
                created: r.created.clone(),
                name: r.name.clone(),
                namespace: r.namespace.clone(),
                label: format!("VirtualService {}", c.vs.key()),
                always_decides: always,
                item: r,
            };
            (link, c)
        })
        .collect();
    let chain = |client: Option<&str>| -> StreamChain {
        let (l, shadowed) = order(client, svc_namespace, &links, None, None);
        StreamChain { routes: l.into_iter().map(|l| l.item).collect(), shadowed }
    };
    let default = chain(None);
    let by_client =
        audiences(svc_namespace, std::iter::empty(), &vs).into_iter().map(|ns| (ns.to_owned(), chain(Some(ns)))).collect();
    Some(StreamChains { default, by_client })
}
