//! Kubernetes-style manifests the simulator writes into the manifest directory that sluice
//! watches (its embedded discovery source). Shapes follow the real API objects so the same
//! discovery code parses what the Kubernetes API source yields.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The namespace annotation that enrolls a namespace in the mesh.
pub const MESH_ANNOTATION: &str = "sluice.dev/mesh";

/// The namespace annotation that turns on access logs for requests from and to its pods
/// (value `enabled`).
pub const ACCESS_LOG_ANNOTATION: &str = "sluice.dev/access-log";

/// What a pod manifest needs to say about a pod.
pub struct PodManifest<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub node_name: &'a str,
    pub service_account: &'a str,
    pub ip: Ipv4Addr,
    /// The controller written into `metadata.ownerReferences`.
    pub owner: Option<&'a Owner>,
    /// `metadata.generateName`.
    pub generate_name: Option<&'a str>,
    /// The pod's IPv6 address in a dual-stack sim (listed after `ip` in `status.podIPs`).
    pub ip6: Option<Ipv6Addr>,
}

/// A pod's controller (a StatefulSet, a Job, an operator's resource...), as the controller
/// writes itself into the pods it creates: the one owner reference with `controller: true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

impl Owner {
    /// The owner reference, with the apiVersion of the built-in kinds and a UID that is the
    /// same for every pod of one owner (as a real controller's is).
    pub fn reference(&self, namespace: &str) -> Value {
        let api_version = match self.kind.as_str() {
            "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Deployment" => "apps/v1",
            "Job" | "CronJob" => "batch/v1",
            "ReplicationController" => "v1",
            _ => "example.com/v1",
        };
        json!({
            "apiVersion": api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": stable_uid(&format!("{namespace}/{}/{}", self.kind, self.name)),
            "controller": true,
            "blockOwnerDeletion": true,
        })
    }
}

/// A UUID-shaped identifier derived from `key`.
fn stable_uid(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let h: String = Sha256::digest(key.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

pub fn pod_file_name(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

pub fn namespace_file_name(name: &str) -> String {
    format!("ns-{name}.yaml")
}

pub fn service_file_name(namespace: &str, name: &str) -> String {
    format!("svc-{namespace}-{name}.yaml")
}

pub fn pod(p: &PodManifest) -> Value {
    let mut metadata = json!({
        "name": p.name,
        "namespace": p.namespace,
        "uid": p.uid,
        "labels": p.labels,
    });
    if let Some(owner) = p.owner {
        metadata["ownerReferences"] = json!([owner.reference(p.namespace)]);
    }
    if let Some(prefix) = p.generate_name {
        metadata["generateName"] = json!(prefix);
    }
    let mut pod_ips = vec![json!({"ip": p.ip.to_string()})];
    pod_ips.extend(p.ip6.map(|ip| json!({"ip": ip.to_string()})));
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": p.node_name,
            "serviceAccountName": p.service_account,
        },
        "status": {
            "podIP": p.ip.to_string(),
            "podIPs": pod_ips,
            "phase": "Running",
        },
    })
}

pub fn namespace(name: &str, enrolled: bool) -> Value {
    let mut metadata = json!({
        "name": name,
        "labels": {"kubernetes.io/metadata.name": name},
    });
    if enrolled {
        metadata["annotations"] = json!({ MESH_ANNOTATION: "enabled" });
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
}

/// Adds (or replaces) `metadata.annotations[key] = value` on a manifest document, e.g.
/// `with_annotation(namespace("shop", true), ACCESS_LOG_ANNOTATION, "enabled")`.
pub fn with_annotation(mut doc: Value, key: &str, value: &str) -> Value {
    if !doc["metadata"]["annotations"].is_object() {
        doc["metadata"]["annotations"] = json!({});
    }
    doc["metadata"]["annotations"][key] = json!(value);
    doc
}

/// A backend of a Service, as an EndpointSlice lists it.
pub struct Endpoint<'a> {
    pub ip: Ipv4Addr,
    pub pod_name: &'a str,
    pub pod_namespace: &'a str,
    pub pod_uid: &'a str,
    pub node_name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// A backend of a Service with an IPv6 address too, for [`service_families`]: the IPv4
/// EndpointSlice lists `endpoint.ip`, the IPv6 one `ip6`.
pub struct DualStackEndpoint<'a> {
    pub endpoint: Endpoint<'a>,
    pub ip6: Option<Ipv6Addr>,
}

/// A ClusterIP Service and the EndpointSlice the endpoint-slice controller would derive from it.
/// Ports are `(name, port, targetPort)`. The slice lists target ports (what endpoints listen
/// on), as the real controller does. The selector is the set of labels all endpoints share
/// (informational: sluice takes endpoints from the slice).
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, u16)],
    endpoints: &[Endpoint],
) -> Vec<Value> {
    let spec = json!({
        "type": "ClusterIP",
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "ports": service_ports(ports),
    });
    let rows: Vec<(String, &Endpoint)> = endpoints.iter().map(|e| (e.ip.to_string(), e)).collect();
    vec![
        service_doc(namespace, name, spec, endpoints.iter()),
        slice_doc(
            namespace,
            name,
            &format!("{name}-sim"),
            "IPv4",
            ports,
            &rows,
        ),
    ]
}

/// A Service with one ClusterIP per family in `cluster_ips` (the first is the primary,
/// `spec.clusterIP`; two make a dual-stack Service, `ipFamilyPolicy: RequireDualStack`) and one
/// EndpointSlice per family, as the endpoint-slice controller makes them: `<name>-sim` (IPv4)
/// and `<name>-sim-v6` (IPv6), each listing the endpoints' addresses of its family.
pub fn service_families(
    namespace: &str,
    name: &str,
    cluster_ips: &[IpAddr],
    ports: &[(&str, u16, u16)],
    endpoints: &[DualStackEndpoint],
) -> Result<Vec<Value>> {
    let family = |ip: &IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let families: Vec<&str> = cluster_ips.iter().map(family).collect();
    match families.as_slice() {
        [_] => {}
        [a, b] if a != b => {}
        _ => bail!(
            "service {namespace}/{name}: give one ClusterIP, or two of different families (got {cluster_ips:?})"
        ),
    }
    let spec = json!({
        "type": "ClusterIP",
        "clusterIP": cluster_ips[0].to_string(),
        "clusterIPs": cluster_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ipFamilies": families,
        "ipFamilyPolicy": if families.len() == 2 { "RequireDualStack" } else { "SingleStack" },
        "ports": service_ports(ports),
    });
    let mut docs = vec![service_doc(
        namespace,
        name,
        spec,
        endpoints.iter().map(|e| &e.endpoint),
    )];
    for family in families {
        let mut rows = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let ip = match (family, e.ip6) {
                ("IPv4", _) => e.endpoint.ip.to_string(),
                (_, Some(ip6)) => ip6.to_string(),
                (_, None) => bail!(
                    "service {namespace}/{name}: endpoint {}/{} has no IPv6 address (is its sim dual-stack?)",
                    e.endpoint.pod_namespace,
                    e.endpoint.pod_name
                ),
            };
            rows.push((ip, &e.endpoint));
        }
        let slice_name = if family == "IPv4" {
            format!("{name}-sim")
        } else {
            format!("{name}-sim-v6")
        };
        docs.push(slice_doc(
            namespace,
            name,
            &slice_name,
            family,
            ports,
            &rows,
        ));
    }
    Ok(docs)
}

fn service_ports(ports: &[(&str, u16, u16)]) -> Vec<Value> {
    ports
        .iter()
        .map(|(n, port, target)| json!({"name": n, "port": port, "targetPort": target, "protocol": "TCP"}))
        .collect()
}

/// The Service document around `spec`, with the labels every endpoint shares as its selector.
fn service_doc<'a>(
    namespace: &str,
    name: &str,
    mut spec: Value,
    endpoints: impl Iterator<Item = &'a Endpoint<'a>>,
) -> Value {
    let mut common: Option<BTreeMap<String, String>> = None;
    for e in endpoints {
        common = Some(match common {
            None => e.labels.clone(),
            Some(c) => c
                .into_iter()
                .filter(|(k, v)| e.labels.get(k) == Some(v))
                .collect(),
        });
    }
    if let Some(sel) = common.filter(|c| !c.is_empty()) {
        spec["selector"] = json!(sel);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// One EndpointSlice of Service `service`: `rows` are (address, endpoint), all ready.
fn slice_doc(
    namespace: &str,
    service: &str,
    slice_name: &str,
    address_type: &str,
    ports: &[(&str, u16, u16)],
    rows: &[(String, &Endpoint)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "sluice-sim",
            },
        },
        "addressType": address_type,
        "endpoints": rows.iter().map(|(ip, e)| json!({
            "addresses": [ip],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "targetRef": {"kind": "Pod", "name": e.pod_name, "namespace": e.pod_namespace, "uid": e.pod_uid},
            "nodeName": e.node_name,
        })).collect::<Vec<_>>(),
        "ports": ports.iter().map(|(n, _, target)| json!({"name": n, "port": target, "protocol": "TCP"})).collect::<Vec<_>>(),
    })
}

/// Sets `appProtocol` on the port named `port_name` of a Service and its EndpointSlice, as
/// [`service`] renders them (the documents are returned for chaining). Ports of other names
/// are left alone; a name no port has changes nothing.
pub fn with_app_protocol(mut docs: Vec<Value>, port_name: &str, app_protocol: &str) -> Vec<Value> {
    for doc in &mut docs {
        let ports = match doc["kind"].as_str() {
            Some("Service") => doc["spec"]["ports"].as_array_mut(),
            Some("EndpointSlice") => doc["ports"].as_array_mut(),
            _ => None,
        };
        for p in ports.into_iter().flatten() {
            if p["name"] == port_name {
                p["appProtocol"] = json!(app_protocol);
            }
        }
    }
    docs
}

/// Renders documents as (multi-document) YAML.
pub fn to_yaml(docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml_ng::to_string(d).context("rendering YAML")?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn service_yaml_round_trips() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let ep = Endpoint {
            ip: "10.244.1.10".parse().unwrap(),
            pod_name: "web-1",
            pod_namespace: "shop",
            pod_uid: "u1",
            node_name: "sl000000-n1",
            labels: &labels,
        };
        let yaml = to_yaml(&service(
            "shop",
            "web",
            "10.96.0.10",
            &[("http", 80, 8080)],
            &[ep],
        ))
        .unwrap();
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(docs[0]["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(docs[0]["spec"]["selector"]["app"], "web");
        assert_eq!(docs[1]["kind"], "EndpointSlice");
        assert_eq!(
            docs[1]["metadata"]["labels"]["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(docs[1]["endpoints"][0]["addresses"][0], "10.244.1.10");
        assert_eq!(docs[1]["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(docs[1]["ports"][0]["port"], 8080);
    }

    fn endpoint<'a>(
        labels: &'a BTreeMap<String, String>,
        ip6: Option<&str>,
    ) -> DualStackEndpoint<'a> {
        DualStackEndpoint {
            endpoint: Endpoint {
                ip: "10.244.1.10".parse().unwrap(),
                pod_name: "web-1",
                pod_namespace: "shop",
                pod_uid: "u1",
                node_name: "sl000000-n1",
                labels,
            },
            ip6: ip6.map(|s| s.parse().unwrap()),
        }
    }

    #[test]
    fn dual_stack_service_has_both_cluster_ips_and_a_slice_per_family() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let ips: Vec<IpAddr> = vec![
            "10.96.0.10".parse().unwrap(),
            "fd00:10:96::10".parse().unwrap(),
        ];
        let docs = service_families(
            "shop",
            "web",
            &ips,
            &[("http", 80, 8080)],
            &[endpoint(&labels, Some("fd00:10:244:1::10"))],
        )
        .unwrap();
        assert_eq!(docs.len(), 3);
        let spec = &docs[0]["spec"];
        assert_eq!(spec["clusterIP"], "10.96.0.10");
        assert_eq!(spec["clusterIPs"], json!(["10.96.0.10", "fd00:10:96::10"]));
        assert_eq!(spec["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(spec["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(spec["selector"]["app"], "web");
        assert_eq!(
            (&docs[1]["metadata"]["name"], &docs[1]["addressType"]),
            (&json!("web-sim"), &json!("IPv4"))
        );
        assert_eq!(docs[1]["endpoints"][0]["addresses"], json!(["10.244.1.10"]));
        assert_eq!(
            (&docs[2]["metadata"]["name"], &docs[2]["addressType"]),
            (&json!("web-sim-v6"), &json!("IPv6"))
        );
        assert_eq!(
            docs[2]["endpoints"][0]["addresses"],
            json!(["fd00:10:244:1::10"])
        );
        assert_eq!(docs[2]["endpoints"][0]["targetRef"]["name"], "web-1");
        assert_eq!(docs[2]["ports"][0]["port"], 8080);

        // IPv6 only: one slice, of that family.
        let six = service_families(
            "shop",
            "six",
            &ips[1..],
            &[],
            &[endpoint(&labels, Some("fd00::1"))],
        )
        .unwrap();
        assert_eq!(six[0]["spec"]["ipFamilyPolicy"], "SingleStack");
        assert_eq!(six.len(), 2);
        assert_eq!(six[1]["addressType"], "IPv6");
    }

    #[test]
    fn dual_stack_service_refuses_what_the_api_server_would() {
        let labels = BTreeMap::new();
        let v4: IpAddr = "10.96.0.10".parse().unwrap();
        let v6: IpAddr = "fd00:10:96::10".parse().unwrap();
        let e = service_families("shop", "web", &[v4, v4], &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("two of different families"), "{e}");
        assert!(service_families("shop", "web", &[], &[], &[]).is_err());
        assert!(service_families("shop", "web", &[v4, v6, v6], &[], &[]).is_err());
        let e = service_families("shop", "web", &[v4, v6], &[], &[endpoint(&labels, None)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoint shop/web-1 has no IPv6 address"), "{e}");
    }

    #[test]
    fn pod_ips_list_the_ipv6_address_after_the_primary() {
        let labels = BTreeMap::new();
        let mut p = PodManifest {
            namespace: "shop",
            name: "web-1",
            uid: "u1",
            labels: &labels,
            node_name: "n1",
            service_account: "default",
            ip: "10.244.1.10".parse().unwrap(),
            owner: None,
            generate_name: None,
            ip6: None,
        };
        assert_eq!(pod(&p)["status"]["podIPs"], json!([{"ip": "10.244.1.10"}]));
        p.ip6 = Some("fd00:10:244:1::10".parse().unwrap());
        let doc = pod(&p);
        assert_eq!(doc["status"]["podIP"], "10.244.1.10");
        assert_eq!(
            doc["status"]["podIPs"],
            json!([{"ip": "10.244.1.10"}, {"ip": "fd00:10:244:1::10"}])
        );
    }

    #[test]
    fn app_protocol_on_the_named_port_of_service_and_slice() {
        let ports = [("a", 80, 8080), ("b", 81, 8081)];
        let docs = with_app_protocol(
            service("shop", "web", "10.96.0.10", &ports, &[]),
            "b",
            "kubernetes.io/h2c",
        );
        assert_eq!(
            docs[0]["spec"]["ports"][1]["appProtocol"],
            "kubernetes.io/h2c"
        );
        assert_eq!(docs[1]["ports"][1]["appProtocol"], "kubernetes.io/h2c");
        assert!(docs[0]["spec"]["ports"][0].get("appProtocol").is_none());
        assert!(docs[1]["ports"][0].get("appProtocol").is_none());
    }

    #[test]
    fn annotations_are_added_next_to_the_mesh_one() {
        let ns = with_annotation(namespace("a", true), ACCESS_LOG_ANNOTATION, "enabled");
        assert_eq!(ns["metadata"]["annotations"][MESH_ANNOTATION], "enabled");
        assert_eq!(
            ns["metadata"]["annotations"][ACCESS_LOG_ANNOTATION],
            "enabled"
        );
        let ns = with_annotation(namespace("b", false), ACCESS_LOG_ANNOTATION, "enabled");
        assert_eq!(ns["metadata"]["annotations"].as_object().unwrap().len(), 1);
    }

    #[test]
    fn pods_name_their_controller() {
        let labels = BTreeMap::new();
        let owner = Owner { kind: "StatefulSet".into(), name: "db".into() };
        let manifest = |name, owner, generate_name| PodManifest {
            namespace: "shop",
            name,
            uid: "u",
            labels: &labels,
            node_name: "n1",
            service_account: "default",
            ip: "10.244.1.10".parse().unwrap(),
            owner,
            generate_name,
            ip6: None,
        };
        let a = pod(&manifest("db-0", Some(&owner), None));
        let b = pod(&manifest("db-1", Some(&owner), None));
        let r = &a["metadata"]["ownerReferences"][0];
        assert_eq!(r["kind"], "StatefulSet");
        assert_eq!(r["name"], "db");
        assert_eq!(r["apiVersion"], "apps/v1");
        assert_eq!(r["controller"], true);
        assert_eq!(r["uid"], b["metadata"]["ownerReferences"][0]["uid"], "one owner, one UID");
        assert!(a["metadata"].get("generateName").is_none());
        let job = Owner { kind: "Job".into(), name: "report-28901234".into() };
        let p = pod(&manifest("report-28901234-x7k2p", Some(&job), Some("report-28901234-")));
        assert_eq!(p["metadata"]["ownerReferences"][0]["apiVersion"], "batch/v1");
        assert_ne!(p["metadata"]["ownerReferences"][0]["uid"], r["uid"]);
        assert_eq!(p["metadata"]["generateName"], "report-28901234-");
        let bare = pod(&manifest("tmp", None, None));
        assert!(bare["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn namespace_annotation_only_when_enrolled() {
        assert_eq!(
            namespace("a", true)["metadata"]["annotations"][MESH_ANNOTATION],
            "enabled"
        );
        assert!(namespace("a", false)["metadata"]
            .get("annotations")
            .is_none());
    }
}
