//! Dual stack: pods with an IPv4 and an IPv6 address (`status.podIPs`), Services with a
//! ClusterIP per family (`spec.clusterIPs`) and an EndpointSlice per family, and the indexes
//! the data path reads: each ClusterIP leads to the endpoints of its own family, every address
//! of a pod finds the pod.

use std::fs;
use std::net::{IpAddr, SocketAddr};

use serde_json::json;

use crate::discovery::kube::resources::watches;
use crate::discovery::kube::store::KubeStore;
use crate::discovery::manifest::parse;
use crate::discovery::*;

/// A dual-stack pod as `kubectl get pod -o yaml` shows it on an IPv4-primary cluster.
const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  uid: 7e57d0a1-0000-4000-8000-000000000001
  labels: {app: web}
spec:
  containers:
  - {image: "nginx:1.27", name: nginx}
  nodeName: node-1
  serviceAccountName: web
status:
  hostIP: 172.18.0.2
  hostIPs:
  - ip: 172.18.0.2
  - ip: fc00:f853:ccd:e793::2
  phase: Running
  podIP: 10.244.1.10
  podIPs:
  - ip: 10.244.1.10
  - ip: fd00:10:244:1::a
"#;

/// A second pod, IPv6-primary (podIP is the IPv6 address).
const POD_V6_PRIMARY: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: 7e57d0a1-0000-4000-8000-000000000002, labels: {app: web}}
spec: {nodeName: node-2}
status:
  podIP: fd00:10:244:2::a
  podIPs:
  - ip: fd00:10:244:2::a
  - ip: 10.244.2.10
"#;

/// A dual-stack Service as the API server stores it (PreferDualStack on a dual-stack cluster),
/// with one EndpointSlice per family, as the endpoint-slice controller makes them.
const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  clusterIPs:
  - 10.96.0.20
  - fd00:10:96::20
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: PreferDualStack
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  selector: {app: web}
  type: ClusterIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4abc
  namespace: shop
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: [10.244.1.10]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: web-0, namespace: shop}
- addresses: [10.244.2.10]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: web-1, namespace: shop}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6xyz
  namespace: shop
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv6
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: ["fd00:10:244:1::a"]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: web-0, namespace: shop}
- addresses: ["fd00:10:244:2::a"]
  conditions: {ready: false}
  targetRef: {kind: Pod, name: web-1, namespace: shop}
"#;

/// A single-stack IPv4 Service (no clusterIPs, as a hand-written manifest has it).
const LEGACY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  ports:
  - {name: http, port: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: legacy-1
  namespace: shop
  labels: {kubernetes.io/service-name: legacy}
addressType: IPv4
ports:
- {name: http, port: 8080}
endpoints:
- addresses: [10.244.1.30]
"#;

/// A single-stack IPv6 Service whose ClusterIP is given only in clusterIPs.
const V6_ONLY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: six, namespace: shop}
spec:
  clusterIPs: ["fd00:10:96::60"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {name: http, port: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: six-1
  namespace: shop
  labels: {kubernetes.io/service-name: six}
addressType: IPv6
ports:
- {name: http, port: 8080}
endpoints:
- addresses: ["fd00:10:244:1::3c"]
"#;

fn model(docs: &[&str]) -> Model {
    Model::from_manifest(&docs.join("---\n"), Format::Yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn one(yaml: &str) -> Object {
    let mut objs = parse(yaml, Format::Yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(objs.len(), 1);
    objs.remove(0)
}

fn err(yaml: &str) -> String {
    match parse(yaml, Format::Yaml) {
        Ok(o) => panic!("expected an error, parsed {o:?}"),
        Err(e) => e.to_string(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn a_dual_stack_pod_has_both_addresses_primary_first() {
    let Object::Pod(p) = one(POD) else { panic!() };
    assert_eq!(p.ip, ip("10.244.1.10"));
    assert_eq!(p.ips, ips(&["10.244.1.10", "fd00:10:244:1::a"]));
    let Object::Pod(p) = one(POD_V6_PRIMARY) else { panic!() };
    assert_eq!(p.ip, ip("fd00:10:244:2::a"));
    assert_eq!(p.ips, ips(&["fd00:10:244:2::a", "10.244.2.10"]));
}

#[test]
fn a_pod_without_pod_ips_has_its_pod_ip() {
    let y = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, uid: u}\nstatus:\n  podIP: 10.0.0.3\n";
    let Object::Pod(p) = one(y) else { panic!() };
    assert_eq!(p.ips, [p.ip]);
    // An empty list is the same as none (Kubernetes cannot tell them apart either).
    let Object::Pod(p) = one(&format!("{y}  podIPs: []\n")) else { panic!() };
    assert_eq!(p.ips, ips(&["10.0.0.3"]));
}

#[test]
fn pod_ips_are_checked_as_the_api_server_does() {
    let pod = |status: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: shop, uid: u}}\nstatus:\n{status}"
        )
    };
    let e = err(&pod("  podIP: 10.0.0.3\n  podIPs:\n  - ip: fd00::3\n  - ip: 10.0.0.3\n"));
    assert!(
        e.ends_with(
            "status.podIPs[0]: fd00::3 differs from status.podIP 10.0.0.3; the first of podIPs must be podIP"
        ),
        "{e}"
    );
    let e = err(&pod("  podIP: 10.0.0.3\n  podIPs:\n  - ip: 10.0.0.3\n  - ip: 10.0.0.4\n"));
    assert!(
        e.ends_with(
            "status.podIPs[1]: 10.0.0.4 is a second IPv4 address (10.0.0.3 is the first); a pod has at most one address per family"
        ),
        "{e}"
    );
    let e = err(&pod("  podIP: fd00::3\n  podIPs:\n  - ip: fd00::3\n  - ip: 10.0.0.3\n  - ip: fd00::4\n"));
    assert!(e.contains("status.podIPs[2]: fd00::4 is a second IPv6 address (fd00::3 is the first)"), "{e}");
    let e = err(&pod("  podIP: 10.0.0.3\n  podIPs:\n  - ip: 10.0.0.3\n  - ip: fd00::zz\n"));
    assert!(e.ends_with("status.podIPs[1].ip: \"fd00::zz\" is not an IP address"), "{e}");
    let e = err(&pod("  podIP: 10.0.0.3\n  podIPs:\n  - 10.0.0.3\n"));
    assert!(e.ends_with("status.podIPs[0]: invalid type: string \"10.0.0.3\", expected PodIP"), "{e}");
    let e = err(&pod("  podIP: 10.0.0.3\n  podIPs: 10.0.0.3\n"));
    assert!(e.ends_with("status.podIPs: invalid type: string \"10.0.0.3\", expected a sequence"), "{e}");
}

#[test]
fn a_dual_stack_service_has_both_cluster_ips_primary_first() {
    let objs = parse(SERVICE, Format::Yaml).unwrap();
    let Object::Service(s) = &objs[0] else { panic!() };
    assert_eq!(s.cluster_ip, Some(ip("10.96.0.20")));
    assert_eq!(s.cluster_ips, ips(&["10.96.0.20", "fd00:10:96::20"]));
    // The IPv6 slice parses with its family.
    let Object::EndpointSlice(v6) = &objs[2] else { panic!() };
    assert_eq!(v6.address_type, AddressType::IPv6);
    assert_eq!(v6.endpoints[0].addresses, ips(&["fd00:10:244:1::a"]));
}

#[test]
fn cluster_ips_default_from_cluster_ip_and_the_other_way_round() {
    let Object::Service(s) = &parse(LEGACY, Format::Yaml).unwrap()[0] else { panic!() };
    assert_eq!(s.cluster_ips, ips(&["10.96.0.30"]));
    let Object::Service(s) = &parse(V6_ONLY, Format::Yaml).unwrap()[0] else { panic!() };
    assert_eq!(s.cluster_ip, Some(ip("fd00:10:96::60")));
    assert_eq!(s.cluster_ips, ips(&["fd00:10:96::60"]));
    let svc = |spec: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: db}}\nspec:\n{spec}");
    for headless in
        ["  clusterIP: None\n", "  clusterIP: None\n  clusterIPs: [None]\n", "  clusterIPs: [None]\n"]
    {
        let Object::Service(s) = one(&svc(headless)) else { panic!() };
        assert_eq!((s.cluster_ip, s.cluster_ips.as_slice()), (None, &[][..]), "{headless}");
    }
    let Object::Service(s) = one(&svc("  type: ExternalName\n  externalName: db.example.com\n")) else {
        panic!()
    };
    assert!(s.cluster_ips.is_empty());
}

#[test]
fn cluster_ips_are_checked_as_the_api_server_does() {
    let svc = |spec: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n{spec}");
    let e = err(&svc("  clusterIP: 10.96.0.20\n  clusterIPs: [\"fd00:10:96::20\", 10.96.0.20]\n"));
    assert!(
        e.ends_with(
            "spec.clusterIPs[0]: fd00:10:96::20 differs from spec.clusterIP 10.96.0.20; the first of clusterIPs must be clusterIP"
        ),
        "{e}"
    );
    let e = err(&svc("  clusterIPs: [10.96.0.20, 10.96.0.21]\n"));
    assert!(
        e.ends_with(
            "spec.clusterIPs[1]: 10.96.0.21 is a second IPv4 ClusterIP (10.96.0.20 is the first); a Service has at most one per family"
        ),
        "{e}"
    );
    let e = err(&svc("  clusterIPs: [10.96.0.20, None]\n"));
    assert!(
        e.ends_with("spec.clusterIPs[1]: \"None\" (headless) must be the only entry of clusterIPs"),
        "{e}"
    );
    let e = err(&svc("  clusterIP: 10.96.0.20\n  clusterIPs: [None]\n"));
    assert!(
        e.ends_with("spec.clusterIPs[0]: the Service is headless here but spec.clusterIP is 10.96.0.20"),
        "{e}"
    );
    let e = err(&svc("  clusterIP: None\n  clusterIPs: [10.96.0.20]\n"));
    assert!(
        e.ends_with(
            "spec.clusterIPs[0]: spec.clusterIP is \"None\" (headless) but clusterIPs lists addresses"
        ),
        "{e}"
    );
    let e = err(&svc("  clusterIPs: [10.96.0.20, \"fd00::zz\"]\n"));
    assert!(
        e.ends_with(
            "spec.clusterIPs[1]: \"fd00::zz\" is not an IP address (use [\"None\"] for a headless Service)"
        ),
        "{e}"
    );
}

#[test]
fn each_cluster_ip_leads_to_the_endpoints_of_its_family() {
    let m = model(&[POD, POD_V6_PRIMARY, SERVICE]);
    let v4 = m.service_for(ip("10.96.0.20"), 80).expect("IPv4 ClusterIP");
    assert_eq!((v4.namespace(), v4.name()), ("shop", "web"));
    assert_eq!(&v4.endpoints()[..], addrs(&["10.244.1.10:8080", "10.244.2.10:8080"]));
    let v6 = m.service_for(ip("fd00:10:96::20"), 80).expect("IPv6 ClusterIP");
    assert_eq!((v6.namespace(), v6.name()), ("shop", "web"));
    // web-1's IPv6 endpoint is not ready; kube-proxy would not send there either.
    assert_eq!(&v6.endpoints()[..], addrs(&["[fd00:10:244:1::a]:8080"]));
    // A dual-stack socket's view of the IPv4 ClusterIP is the IPv4 ClusterIP.
    assert_eq!(m.service_for(ip("::ffff:10.96.0.20"), 80), Some(v4));
    assert!(m.service_for(ip("fd00:10:96::20"), 8080).is_none());
    assert!(m.service_for(ip("fd00:10:96::21"), 80).is_none());
}

#[test]
fn a_cluster_ip_whose_family_has_no_endpoints_has_none() {
    // The IPv6 slice is missing (its controller has not written it yet): kube-proxy would drop
    // the connection to the IPv6 ClusterIP, and so does the model rather than switch families.
    let service_only: String = SERVICE.split("---").take(2).collect::<Vec<_>>().join("---");
    let m = model(&[&service_only]);
    assert_eq!(m.service_for(ip("10.96.0.20"), 80).unwrap().endpoints().len(), 2);
    assert!(m.service_for(ip("fd00:10:96::20"), 80).unwrap().endpoints().is_empty());
}

#[test]
fn a_service_by_name_has_both_families_and_prefers_the_one_asked_for() {
    let m = model(&[SERVICE, LEGACY, V6_ONLY]);
    let web = m.service_port("shop", "web", 80).unwrap();
    assert_eq!(
        &web.endpoints()[..],
        addrs(&["10.244.1.10:8080", "10.244.2.10:8080", "[fd00:10:244:1::a]:8080"])
    );
    assert_eq!(&web.endpoints_of(AddressType::IPv4)[..], addrs(&["10.244.1.10:8080", "10.244.2.10:8080"]));
    assert_eq!(&web.endpoints_of(AddressType::IPv6)[..], addrs(&["[fd00:10:244:1::a]:8080"]));
    assert_eq!(web.endpoints_preferring(AddressType::IPv6), web.endpoints_of(AddressType::IPv6));
    assert_eq!(web.endpoints_preferring(AddressType::IPv4), web.endpoints_of(AddressType::IPv4));
    // A single-stack backend serves a request of the other family with what it has.
    let legacy = m.service_port("shop", "legacy", 80).unwrap();
    assert!(legacy.endpoints_of(AddressType::IPv6).is_empty());
    assert_eq!(&legacy.endpoints_preferring(AddressType::IPv6)[..], addrs(&["10.244.1.30:8080"]));
    let six = m.service_port("shop", "six", 80).unwrap();
    assert_eq!(&six.endpoints_preferring(AddressType::IPv4)[..], addrs(&["[fd00:10:244:1::3c]:8080"]));
    assert_eq!(&m.service_for(ip("fd00:10:96::60"), 80).unwrap().endpoints()[..], &six.endpoints()[..]);
    // Found by ClusterIP, the family lists are there too.
    let v6 = m.service_for(ip("fd00:10:96::20"), 80).unwrap();
    assert_eq!(v6.endpoints_of(AddressType::IPv4), web.endpoints_of(AddressType::IPv4));
}

#[test]
fn every_address_of_a_pod_finds_it() {
    let m = model(&[POD, POD_V6_PRIMARY, SERVICE]);
    for (addr, name) in [
        ("10.244.1.10", "web-0"),
        ("fd00:10:244:1::a", "web-0"),
        ("::ffff:10.244.1.10", "web-0"),
        ("fd00:10:244:2::a", "web-1"),
        ("10.244.2.10", "web-1"),
    ] {
        assert_eq!(m.pod_by_ip(ip(addr)).map(|p| p.name.as_str()), Some(name), "{addr}");
        let w = m.workload_by_ip(ip(addr)).unwrap_or_else(|| panic!("workload of {addr}"));
        assert_eq!(w, m.workload_by_ip(m.pod_by_ip(ip(addr)).unwrap().ip).unwrap(), "{addr}");
    }
    // One workload record per pod, shared by its addresses.
    assert!(std::sync::Arc::ptr_eq(
        m.workload_by_ip(ip("10.244.1.10")).unwrap(),
        m.workload_by_ip(ip("fd00:10:244:1::a")).unwrap()
    ));
    assert!(m.pod_by_ip(ip("fd00:10:244:1::b")).is_none());
    let svc = |a: &str| m.service_of_endpoint(a.parse().unwrap()).map(|(ns, n)| format!("{ns}/{n}"));
    assert_eq!(svc("[fd00:10:244:1::a]:8080").as_deref(), Some("shop/web"));
    assert_eq!(svc("10.244.1.10:8080").as_deref(), Some("shop/web"));
    assert_eq!(svc("[fd00:10:244:2::a]:8080"), None, "not ready");
}

#[test]
fn a_reused_ipv6_address_belongs_to_the_live_pod() {
    let done = POD
        .replace("name: web-0", "name: web-old")
        .replace("000000000001", "000000000009")
        .replace("10.244.1.10", "10.244.1.99")
        .replace("phase: Running", "phase: Succeeded");
    // web-old once had web-0's IPv6 address; whichever order they come in, web-0 has it now.
    for docs in [[done.as_str(), POD], [POD, done.as_str()]] {
        let m = model(&docs);
        assert_eq!(m.pod_by_ip(ip("fd00:10:244:1::a")).unwrap().name, "web-0");
        assert_eq!(m.pod_by_ip(ip("10.244.1.99")).unwrap().name, "web-old");
    }
}

#[test]
fn the_admin_view_shows_every_address() {
    let m = model(&[POD, SERVICE]);
    let v = serde_json::to_value(m.view()).unwrap();
    assert_eq!(v["pods"][0]["ip"], "10.244.1.10");
    assert_eq!(v["pods"][0]["ips"], json!(["10.244.1.10", "fd00:10:244:1::a"]));
    assert_eq!(v["services"][0]["cluster_ip"], "10.96.0.20");
    assert_eq!(v["services"][0]["cluster_ips"], json!(["10.96.0.20", "fd00:10:96::20"]));
    assert_eq!(v["endpoint_slices"][0]["address_type"], "IPv4");
    assert_eq!(v["endpoint_slices"][1]["address_type"], "IPv6");
    assert_eq!(v["endpoint_slices"][1]["ready_addresses"], json!(["fd00:10:244:1::a"]));
}

#[test]
fn every_cluster_ip_of_a_service_must_be_free() {
    let svc = |name: &str, ips: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIPs: [{ips}]\n  ports:\n  - port: 80\n")
    };
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("1.yaml"), svc("first", "10.96.0.10, \"fd00:10:96::10\"")).unwrap();
    // Its IPv4 ClusterIP is free, its IPv6 one is first's: the whole Service is ignored...
    fs::write(dir.path().join("2.yaml"), svc("second", "10.96.0.11, \"fd00:10:96::10\"")).unwrap();
    // ...and does not claim its free address, which a later Service may have.
    fs::write(dir.path().join("3.yaml"), svc("third", "10.96.0.11")).unwrap();
    let m = ManifestDir::load(dir.path()).unwrap();
    assert_eq!(m.service_for(ip("fd00:10:96::10"), 80).unwrap().name(), "first");
    assert_eq!(m.service_for(ip("10.96.0.11"), 80).unwrap().name(), "third");
    assert!(m.service("default", "second").is_none());
    assert_eq!(m.errors().len(), 1, "{:?}", m.errors());
    assert!(
        m.errors()[0]
            .reason
            .contains("clusterIP fd00:10:96::10 is already taken by Service \"default/first\""),
        "{:?}",
        m.errors()
    );
}

#[test]
fn the_kubernetes_source_passes_pod_ips_and_cluster_ips_through() {
    let specs = watches();
    let at = |label: &str| specs.iter().position(|w| w.label == label).unwrap();
    let mut s = KubeStore::new(&specs);
    for i in 0..specs.len() {
        s.init(i);
        s.init_done(i);
    }
    // As list items come: JSON, without apiVersion and kind, decoded within the limits.
    let item = |yaml: &str| {
        let mut v: serde_json::Value = serde_yaml_ng::from_str(yaml).unwrap();
        let map = v.as_object_mut().unwrap();
        map.remove("apiVersion");
        map.remove("kind");
        crate::discovery::kube::ApiObject::from_json(v).expect("the object decodes")
    };
    assert!(s.apply(at("pods (other nodes)"), item(POD)).changed());
    let service = SERVICE.split("---").next().unwrap();
    assert!(s.apply(at("services"), item(service)).changed());
    let m = s.build();
    assert!(m.errors().is_empty(), "{:?}", m.errors());
    assert_eq!(m.pod("shop", "web-0").unwrap().ips, ips(&["10.244.1.10", "fd00:10:244:1::a"]));
    assert_eq!(m.service("shop", "web").unwrap().cluster_ips, ips(&["10.96.0.20", "fd00:10:96::20"]));
    assert_eq!(m.pod_by_ip(ip("fd00:10:244:1::a")).unwrap().name, "web-0");
}
