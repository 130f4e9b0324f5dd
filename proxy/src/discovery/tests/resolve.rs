//! Model lookups: service_for resolution, pods by node and IP, enrollment.

use std::net::{IpAddr, SocketAddr};

use super::fixtures;
use crate::discovery::*;

fn model(text: &str) -> Model {
    Model::from_manifest(text, Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn named_ports_resolve_through_slice_port_names() {
    let m = model(&fixtures::all());
    let t = m.service_for(ip("10.96.0.10"), 80).expect("service for :80");
    assert_eq!((t.namespace(), t.name()), ("shop", "web"));
    assert_eq!(t.port().name.as_deref(), Some("http"));
    // Port from the slice (8080), not the Service's targetPort name; the not-ready
    // (terminating) endpoint is left out; the endpoint without conditions is ready.
    assert_eq!(&t.endpoints()[..], addrs(&["10.244.1.10:8080", "10.244.2.12:8080"]));

    let t = m.service_for(ip("10.96.0.10"), 9090).expect("service for :9090");
    assert_eq!(t.port().name.as_deref(), Some("metrics"));
    assert_eq!(&t.endpoints()[..], addrs(&["10.244.1.10:9091", "10.244.2.12:9091"]));

    assert!(m.service_for(ip("10.96.0.10"), 8080).is_none());
    assert!(m.service_for(ip("10.96.0.11"), 80).is_none());
    // What a dual-stack socket reports for an IPv4 destination.
    assert!(m.service_for(ip("::ffff:10.96.0.10"), 80).is_some());
    assert_eq!(m.service_port("shop", "web", 9090).unwrap().port().port, 9090);
}

const UNNAMED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  clusterIP: 10.96.5.5
  ports:
  - port: 5432
    targetPort: 15432
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: data
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports:
- port: 15432
- name: other
  port: 1
endpoints:
- addresses: [10.244.1.20]
  conditions: {ready: true}
- addresses: [10.244.1.21]
  conditions: {ready: false, serving: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-2
  namespace: data
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports:
- name: ""
  port: 15432
endpoints:
- addresses: [10.244.2.20, 10.244.1.20]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-other-ns
  namespace: elsewhere
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports:
- port: 15432
endpoints:
- addresses: [10.244.9.9]
"#;

#[test]
fn unnamed_port_uses_unnamed_slice_port_across_slices() {
    let m = model(UNNAMED);
    let t = m.service_for(ip("10.96.5.5"), 5432).unwrap();
    // Two slices merged, the duplicate address de-duplicated, the not-ready one and the
    // other namespace's slice left out.
    assert_eq!(&t.endpoints()[..], addrs(&["10.244.1.20:15432", "10.244.2.20:15432"]));
}

#[test]
fn service_without_ready_endpoints_still_resolves() {
    let text = UNNAMED
        .replace(
            "- addresses: [10.244.2.20, 10.244.1.20]",
            "- addresses: [10.244.2.20]\n  conditions: {ready: false}",
        )
        .replace("conditions: {ready: true}", "conditions: {ready: false}");
    let m = model(&text);
    let t = m.service_for(ip("10.96.5.5"), 5432).unwrap();
    assert!(t.endpoints().is_empty());
}

#[test]
fn headless_and_udp_ports_are_not_indexed_by_cluster_ip() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  ports:
  - {port: 80}
"#;
    let m = model(text);
    assert_eq!(m.service_for(ip("10.96.0.53"), 53).unwrap().port().name.as_deref(), Some("dns-tcp"));
    assert!(m.service("default", "headless").is_some());
    assert!(m.service_port("default", "headless", 80).is_some());
}

#[test]
fn pods_by_node_ip_and_name() {
    let text = [
        fixtures::namespace("shop", true),
        fixtures::namespace("other", false),
        fixtures::pod("shop", "a", "node-1", "10.244.1.10"),
        fixtures::pod("shop", "b", "node-1", "10.244.1.11"),
        fixtures::pod("other", "c", "node-2", "10.244.2.10"),
        // A finished pod whose IP was handed to pod b.
        fixtures::pod("shop", "old", "node-1", "10.244.1.11").replace("Running", "Succeeded"),
    ]
    .join("---\n");
    let m = model(&text);
    let on1: Vec<&str> = m.pods_on_node("node-1").map(|p| p.name.as_str()).collect();
    assert_eq!(on1, ["a", "b", "old"]);
    assert_eq!(m.pods_on_node("node-9").count(), 0);
    assert_eq!(m.pod_by_ip(ip("10.244.1.11")).unwrap().name, "b");
    assert_eq!(m.pod_by_ip(ip("10.244.2.10")).unwrap().name, "c");
    assert!(m.pod_by_ip(ip("10.244.2.99")).is_none());
    assert_eq!(m.pod("shop", "a").unwrap().uid, "uid-a");
    assert!(m.pod("other", "a").is_none());
    assert!(m.is_enrolled("shop"));
    assert!(!m.is_enrolled("other"));
    assert!(!m.is_enrolled("missing"));
    assert_eq!(m.namespace("other").map(|n| n.enrolled), Some(false));
    assert_eq!(m.generation(), 0);
}

#[test]
fn empty_model() {
    let m = Model::empty();
    assert_eq!(m.generation(), 0);
    assert!(m.errors().is_empty());
    assert!(m.service_for(ip("10.96.0.10"), 80).is_none());
    assert_eq!(m.pods().count(), 0);
}
