//! Manifest parsing: each kind from realistic YAML, and each validation error.

use std::net::IpAddr;

use super::fixtures;
use crate::discovery::manifest::{parse, Format};
use crate::discovery::*;

fn one(yaml: &str) -> Object {
    let mut objects = parse(yaml, Format::Yaml).unwrap_or_else(|e| panic!("parse failed: {e}"));
    assert_eq!(objects.len(), 1);
    objects.remove(0)
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

#[test]
fn namespace_from_kubectl_output() {
    let Object::Namespace(ns) = one(fixtures::NAMESPACE) else { panic!() };
    assert_eq!(ns.name, "shop");
    assert!(ns.enrolled);
    assert_eq!(ns.labels["team"], "storefront");
    assert_eq!(ns.annotations["sluice.dev/mesh"], "enabled");
}

#[test]
fn namespace_enrollment_needs_exact_value() {
    let y = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  annotations:\n    sluice.dev/mesh: disabled\n";
    let Object::Namespace(ns) = one(y) else { panic!() };
    assert!(!ns.enrolled);
    let Object::Namespace(ns) = one(&fixtures::namespace("b", false)) else { panic!() };
    assert!(!ns.enrolled);
}

#[test]
fn pod_from_kubectl_output() {
    let Object::Pod(p) = one(fixtures::POD) else { panic!() };
    assert_eq!((p.namespace.as_str(), p.name.as_str()), ("shop", "web-7d9c6b5f4-x2x8q"));
    assert_eq!(p.uid, "3c1f2a9e-7b6d-4e2f-9a1b-5d4c3b2a1f00");
    assert_eq!(p.service_account, "web");
    assert_eq!(p.node_name.as_deref(), Some("node-1"));
    assert_eq!(p.ip, ip("10.244.1.10"));
    assert_eq!(p.phase, PodPhase::Running);
    assert_eq!(p.labels["app"], "web");
    assert!(!p.host_network);
}

#[test]
fn pod_defaults() {
    let y = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  uid: u1\nstatus:\n  podIP: fd00::5\n";
    let Object::Pod(p) = one(y) else { panic!() };
    assert_eq!(p.namespace, "default");
    assert_eq!(p.service_account, "default");
    assert_eq!(p.node_name, None);
    assert_eq!(p.phase, PodPhase::Running);
    assert_eq!(p.ip, ip("fd00::5"));
}

#[test]
fn service_from_kubectl_output() {
    let Object::Service(s) = one(fixtures::SERVICE) else { panic!() };
    assert_eq!(s.cluster_ip, Some(ip("10.96.0.10")));
    assert_eq!(s.selector["app"], "web");
    assert_eq!(s.ports.len(), 2);
    let http = &s.ports[0];
    assert_eq!(http.name.as_deref(), Some("http"));
    assert_eq!(http.port, 80);
    assert_eq!(http.target_port, TargetPort::Name("http".into()));
    assert_eq!(http.protocol, Protocol::Tcp);
    assert_eq!(http.app_protocol.as_deref(), Some("http"));
    assert_eq!(s.ports[1].target_port, TargetPort::Number(9091));
}

#[test]
fn service_defaults_and_headless() {
    let y = "apiVersion: v1\nkind: Service\nmetadata:\n  name: db\nspec:\n  clusterIP: None\n  ports:\n  - port: 5432\n";
    let Object::Service(s) = one(y) else { panic!() };
    assert_eq!(s.cluster_ip, None);
    assert_eq!(s.ports[0].name, None);
    assert_eq!(s.ports[0].target_port, TargetPort::Number(5432));
    assert_eq!(s.ports[0].protocol, Protocol::Tcp);
}

#[test]
fn endpoint_slice_from_kubectl_output() {
    let Object::EndpointSlice(s) = one(fixtures::ENDPOINT_SLICE) else { panic!() };
    assert_eq!(s.service_name, "web");
    assert_eq!(s.address_type, AddressType::IPv4);
    assert_eq!(s.ports[0].name.as_deref(), Some("http"));
    assert_eq!(s.ports[0].port, 8080);
    assert_eq!(s.endpoints.len(), 3);
    let e0 = &s.endpoints[0];
    assert!(e0.ready && e0.serving && !e0.terminating);
    assert_eq!(e0.node_name.as_deref(), Some("node-1"));
    assert_eq!(e0.target_ref, Some(PodRef { namespace: "shop".into(), name: "web-7d9c6b5f4-x2x8q".into() }));
    let e1 = &s.endpoints[1];
    assert!(!e1.ready && e1.serving && e1.terminating);
    // targetRef without a namespace means the slice's namespace.
    assert_eq!(e1.target_ref.as_ref().unwrap().namespace, "shop");
    // No conditions at all: ready and serving, not terminating.
    let e2 = &s.endpoints[2];
    assert!(e2.ready && e2.serving && !e2.terminating);
    assert_eq!(e2.target_ref, None);
}

#[test]
fn multi_document_file_with_empty_documents() {
    let text = format!("---\n# leading comment\n---\n{}\n---\n---\n", fixtures::all());
    let objects = parse(&text, Format::Yaml).unwrap();
    let kinds: Vec<Kind> = objects.iter().map(Object::kind).collect();
    assert_eq!(kinds, [Kind::Namespace, Kind::Pod, Kind::Service, Kind::EndpointSlice]);
    assert!(parse("", Format::Yaml).unwrap().is_empty());
    assert!(parse("# nothing here\n", Format::Yaml).unwrap().is_empty());
}

#[test]
fn list_kind() {
    let y = format!(
        "apiVersion: v1\nkind: List\nmetadata: {{}}\nitems:\n- {}\n- {}\n",
        "{apiVersion: v1, kind: Namespace, metadata: {name: a}}",
        "{apiVersion: v1, kind: Namespace, metadata: {name: b}}"
    );
    let objects = parse(&y, Format::Yaml).unwrap();
    assert_eq!(objects.len(), 2);
    let e = err("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {}}\n");
    assert_eq!(e, "document 1 (line 1) items[0]: missing required field `metadata.name`");
}

#[test]
fn json_file() {
    let j = r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"j","annotations":{"sluice.dev/mesh":"enabled"}}}"#;
    let objects = parse(j, Format::Json).unwrap();
    let Object::Namespace(ns) = &objects[0] else { panic!() };
    assert!(ns.enrolled);
    let e = parse("{\"apiVersion\": \"v1\",\n \"kind\": }", Format::Json).unwrap_err();
    assert!(matches!(e, ParseError::Json { line: 2, .. }), "{e}");
}

#[test]
fn bad_yaml_reports_line_and_column() {
    let text = format!("{}---\nkind: Pod\n  name: x\n", fixtures::namespace("a", true));
    let e = parse(&text, Format::Yaml).unwrap_err();
    assert!(matches!(e, ParseError::Yaml { document: 2, line: Some(9), .. }), "{e:?}");
    assert!(e.to_string().starts_with("invalid YAML in document 2: "), "{e}");
    assert!(e.to_string().contains("line 9 column"), "{e}");
}

#[test]
fn missing_envelope_fields() {
    assert_eq!(
        err("apiVersion: v1\nmetadata:\n  name: a\n"),
        "document 1 (line 1): missing required field `kind`"
    );
    assert_eq!(
        err("kind: Namespace\nmetadata:\n  name: a\n"),
        "document 1 (line 1) Namespace \"a\": missing required field `apiVersion`"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Service\nmetadata:\n  namespace: shop\n"),
        "document 1 (line 1): missing required field `metadata.name`"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Service\n"),
        "document 1 (line 1): missing required field `metadata.name`"
    );
    assert_eq!(
        err("- a\n- b\n"),
        "document 1 (line 1): expected a Kubernetes object (a mapping), found a list"
    );
}

#[test]
fn unknown_kind_and_version() {
    let text = format!(
        "{}---\napiVersion: x/v1\nkind: Foo\nmetadata:\n  name: f\n",
        fixtures::namespace("a", false)
    );
    assert_eq!(err(&text), "document 2 (line 5) Foo \"f\": unknown kind \"Foo\" (apiVersion x/v1)");
    let e = err("apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: s\n");
    assert!(e.contains("kind EndpointSlice is not served at apiVersion \"discovery.k8s.io/v1beta1\" (use \"discovery.k8s.io/v1\")"), "{e}");
}

#[test]
fn pod_errors() {
    let base = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: shop\n  uid: u\n";
    assert!(err(base).ends_with("Pod \"shop/p\": missing required field `status`"), "{}", err(base));
    let e = err(&format!("{base}status:\n  phase: Pending\n"));
    assert!(e.ends_with("missing required field `status.podIP`"), "{e}");
    let e = err(&format!("{base}status:\n  podIP: 10.0.0.300\n"));
    assert!(e.ends_with("status.podIP: \"10.0.0.300\" is not an IP address"), "{e}");
    let e = err(&format!("{base}status:\n  podIP: 10.0.0.3\n  phase: Sleeping\n"));
    assert!(e.contains("status.phase: \"Sleeping\" is not a pod phase"), "{e}");
    let e = err("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nstatus:\n  podIP: 10.0.0.3\n");
    assert!(e.ends_with("missing required field `metadata.uid`"), "{e}");
}

/// The Pod's spec is read as a view of the fields sluice uses: a container field kube-apiserver
/// accepts but k8s-openapi's PodSpec would not (a numeric Quantity) does not refuse the pod,
/// while a wrong type in a field sluice reads is reported with its path.
#[test]
fn pod_spec_fields_sluice_does_not_read_are_not_judged() {
    let pod = |spec: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: shop, uid: u}}\nspec:\n{spec}status:\n  podIP: 10.0.0.3\n")
    };
    let Object::Pod(p) = one(&pod("  containers:\n  - name: app\n    resources: {limits: {cpu: 1}}\n  serviceAccountName: api\n")) else {
        panic!()
    };
    assert_eq!(p.service_account, "api");
    let e = err(&pod("  hostNetwork: \"yes\"\n"));
    assert!(e.ends_with("spec.hostNetwork: invalid type: string \"yes\", expected a boolean"), "{e}");
}

#[test]
fn service_errors() {
    let svc = |spec: &str| format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n{spec}");
    let e = err(&svc("  clusterIP: 10.96.0.999\n"));
    assert!(
        e.ends_with(
            "spec.clusterIP: \"10.96.0.999\" is not an IP address (use \"None\" for a headless Service)"
        ),
        "{e}"
    );
    let e = err(&svc("  ports:\n  - port: 70000\n"));
    assert!(e.ends_with("spec.ports[0].port: port 70000 is out of range 1-65535"), "{e}");
    let e = err(&svc("  ports:\n  - port: 0\n"));
    assert!(e.ends_with("spec.ports[0].port: port 0 is out of range 1-65535"), "{e}");
    // k8s-openapi reads an absent port as 0: still reported as missing, not as out of range.
    let e = err(&svc("  ports:\n  - name: web\n"));
    assert!(e.ends_with("missing required field `spec.ports[0].port`"), "{e}");
    let e = err(&svc("  ports:\n  - port: \"80\"\n"));
    assert!(e.ends_with("spec.ports[0].port: invalid type: string \"80\", expected i32"), "{e}");
    let e = err(&svc("  ports:\n  - port: 80\n    targetPort: 65536\n"));
    assert!(e.ends_with("spec.ports[0].targetPort: port 65536 is out of range 1-65535"), "{e}");
    let e = err(&svc("  ports:\n  - port: 80\n    targetPort: \"8080\"\n"));
    assert!(e.contains("write a port number without quotes"), "{e}");
    let e = err(&svc("  ports:\n  - port: 80\n    protocol: HTTP\n"));
    assert!(e.ends_with("spec.ports[0].protocol: \"HTTP\" is not a protocol (TCP, UDP, SCTP)"), "{e}");
    let e = err(&svc("  ports:\n  - name: a\n    port: 80\n  - port: 81\n"));
    assert!(e.ends_with("spec.ports[1]: a port must have a name when a Service has several ports"), "{e}");
    let e = err(&svc("  ports:\n  - name: a\n    port: 80\n  - name: a\n    port: 81\n"));
    assert!(e.ends_with("spec.ports[1]: duplicate port name \"a\""), "{e}");
    let e = err("apiVersion: v1\nkind: Service\nmetadata:\n  name: 9web\n");
    assert!(e.contains("metadata.name: \"9web\" is not a valid name"), "{e}");
}

#[test]
fn endpoint_slice_errors() {
    let head = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n";
    let labelled = format!("{head}  labels:\n    kubernetes.io/service-name: web\n");
    let e = err(&format!("{head}addressType: IPv4\n"));
    assert!(e.ends_with("missing required field `metadata.labels[\"kubernetes.io/service-name\"]`"), "{e}");
    let e = err(&labelled);
    assert!(e.ends_with("missing required field `addressType`"), "{e}");
    let e = err(&format!("{labelled}addressType: FQDN\n"));
    assert!(e.contains("FQDN is not supported"), "{e}");
    let e = err(&format!("{labelled}addressType: IPv4\nendpoints:\n- addresses: [fd00::1]\n"));
    assert!(
        e.ends_with("endpoints[0].addresses[0]: fd00::1 does not match the slice's addressType IPv4"),
        "{e}"
    );
    let e = err(&format!("{labelled}addressType: IPv4\nendpoints:\n- addresses: []\n"));
    assert!(e.ends_with("endpoints[0].addresses: must list at least one address"), "{e}");
    let e = err(&format!("{labelled}addressType: IPv4\nports:\n- name: http\n"));
    assert!(e.ends_with("missing required field `ports[0].port`"), "{e}");
    let e = err(&format!("{labelled}addressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\n  conditions:\n    ready: \"yes\"\n"));
    assert!(e.ends_with("endpoints[0].conditions.ready: invalid type: string \"yes\", expected a boolean"), "{e}");
}

#[test]
fn labels_must_be_strings() {
    let e = err(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  annotations:\n    sluice.dev/mesh: true\n",
    );
    assert!(
        e.ends_with(
            "metadata.annotations[\"sluice.dev/mesh\"]: expected a string, found a boolean (quote it)"
        ),
        "{e}"
    );
}

#[test]
fn one_bad_document_rejects_the_file() {
    let text = format!("{}---\n{}", fixtures::namespace("good", true), "apiVersion: v1\nkind: Namespace\n");
    let e = parse(&text, Format::Yaml).unwrap_err();
    assert!(matches!(e, ParseError::Document { ref at, .. } if at.document == 2), "{e:?}");
}

#[test]
fn duplicate_object_in_one_file() {
    let text = format!("{}---\n{}", fixtures::namespace("a", true), fixtures::namespace("a", false));
    assert_eq!(
        err(&text),
        "Namespace \"a\" is defined twice in this file (document 1 (line 1) Namespace \"a\" and document 2 (line 7) Namespace \"a\")"
    );
}

#[test]
fn yaml_merge_keys() {
    let y = "x-labels: &l\n  app: web\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels:\n    <<: *l\n";
    let Object::Service(s) = one(y) else { panic!() };
    assert_eq!(s.labels["app"], "web");
}
