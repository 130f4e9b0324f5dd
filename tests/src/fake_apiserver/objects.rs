//! Kubernetes objects as a real API server returns them (`kubectl get -o json` of a v1.35
//! cluster: a Deployment's pod, a ClusterIP Service, the EndpointSlice the controller made for
//! it, kubectl-applied namespaces, Istio policies and ServiceEntries, Gateway API routes with the
//! status a mesh controller wrote, sluice TrafficPolicies), with the fields sluice ignores left
//! in:
//! managedFields, ownerReferences, container specs and statuses, conditions, projected token
//! volumes. The fake API server adds what the server owns (resourceVersion, uid,
//! creationTimestamp, generation) when an object is applied.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::{json, Value};

use crate::Pod;

/// A timestamp in the API's format (RFC 3339, seconds, UTC).
const T0: &str = "2026-03-02T09:14:07Z";

fn managed(manager: &str, operation: &str, api_version: &str, fields: Value) -> Value {
    json!({
        "apiVersion": api_version,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
        "manager": manager,
        "operation": operation,
        "time": T0,
    })
}

/// A Namespace with `annotations` (e.g. `sluice.dev/mesh: enabled`), as `kubectl apply` leaves it.
pub fn namespace(name: &str, annotations: &[(&str, &str)]) -> Value {
    let mut ann: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ann.insert(
        "kubectl.kubernetes.io/last-applied-configuration".into(),
        format!("{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"annotations\":{{}},\"name\":\"{name}\"}}}}\n"),
    );
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "annotations": ann,
            "labels": {"kubernetes.io/metadata.name": name},
            "managedFields": [managed("kubectl-client-side-apply", "Update", "v1", json!({
                "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                               "f:labels": {".": {}, "f:kubernetes.io/metadata.name": {}}}
            }))],
            "name": name,
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

/// Sets (or with `None` removes) one annotation of an object.
pub fn annotate(object: &mut Value, key: &str, value: Option<&str>) {
    let meta = &mut object["metadata"];
    if !meta["annotations"].is_object() {
        meta["annotations"] = json!({});
    }
    let ann = meta["annotations"]
        .as_object_mut()
        .expect("annotations is an object");
    match value {
        Some(v) => {
            ann.insert(key.to_string(), Value::String(v.to_string()));
        }
        None => {
            ann.remove(key);
        }
    }
}

/// What a pod object says about a pod.
#[derive(Debug, Clone)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// `None`: the API server assigns one.
    pub uid: Option<&'a str>,
    pub node: Option<&'a str>,
    /// `None`: not started yet (Pending, no IP).
    pub ip: Option<Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
    pub service_account: &'a str,
}

/// A pod of a Deployment (ReplicaSet-owned), Running with `ip` on `node`, or Pending without.
pub fn pod(p: &PodSpec) -> Value {
    let hash = "7d9c6b5f4";
    let app = p
        .labels
        .get("app")
        .cloned()
        .unwrap_or_else(|| p.name.to_string());
    let mut labels = p.labels.clone();
    labels.insert("pod-template-hash".into(), hash.into());
    let mut spec = json!({
        "containers": [{
            "image": format!("registry.example/{app}:1.4.2"),
            "imagePullPolicy": "IfNotPresent",
            "name": app,
            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
            "readinessProbe": {"failureThreshold": 3, "httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                               "periodSeconds": 10, "successThreshold": 1, "timeoutSeconds": 1},
            "resources": {"limits": {"memory": "128Mi"}, "requests": {"cpu": "50m", "memory": "64Mi"}},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "volumeMounts": [{"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "name": "kube-api-access-x7k2p", "readOnly": true}],
        }],
        "dnsPolicy": "ClusterFirst",
        "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "restartPolicy": "Always",
        "schedulerName": "default-scheduler",
        "securityContext": {},
        "serviceAccount": p.service_account,
        "serviceAccountName": p.service_account,
        "terminationGracePeriodSeconds": 30,
        "tolerations": [
            {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
            {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300},
        ],
        "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
            {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}, "path": "namespace"}]}},
        ]}}],
    });
    if let Some(node) = p.node {
        spec["nodeName"] = json!(node);
    }
    let status = match p.ip {
        Some(ip) => json!({
            "conditions": [
                {"lastProbeTime": null, "lastTransitionTime": T0, "status": "True", "type": "PodReadyToStartContainers"},
                {"lastProbeTime": null, "lastTransitionTime": T0, "status": "True", "type": "Initialized"},
                {"lastProbeTime": null, "lastTransitionTime": T0, "status": "True", "type": "Ready"},
                {"lastProbeTime": null, "lastTransitionTime": T0, "status": "True", "type": "ContainersReady"},
                {"lastProbeTime": null, "lastTransitionTime": T0, "status": "True", "type": "PodScheduled"},
            ],
            "containerStatuses": [{
                "containerID": "containerd://4f1c0e0b9d8a7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b",
                "image": format!("registry.example/{app}:1.4.2"),
                "imageID": "registry.example/app@sha256:0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1c",
                "lastState": {},
                "name": app,
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": T0}},
            }],
            "hostIP": "10.0.0.11",
            "hostIPs": [{"ip": "10.0.0.11"}],
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "qosClass": "Burstable",
            "startTime": T0,
        }),
        None => json!({
            "conditions": [{"lastProbeTime": null, "lastTransitionTime": T0, "status": "True", "type": "PodScheduled"}],
            "phase": "Pending",
            "qosClass": "Burstable",
        }),
    };
    let mut metadata = json!({
        "generateName": format!("{app}-{hash}-"),
        "labels": labels,
        "managedFields": [
            managed("kube-controller-manager", "Update", "v1", json!({"f:metadata": {"f:generateName": {}, "f:labels": {}, "f:ownerReferences": {}}, "f:spec": {"f:containers": {}}})),
            managed("kubelet", "Update", "v1", json!({"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:podIP": {}, "f:podIPs": {}}})),
        ],
        "name": p.name,
        "namespace": p.namespace,
        "ownerReferences": [{"apiVersion": "apps/v1", "blockOwnerDeletion": true, "controller": true, "kind": "ReplicaSet",
                             "name": format!("{app}-{hash}"), "uid": "0c6e8a51-3f7e-4b7c-9a0e-7d1f2c3b4a59"}],
    });
    if let Some(uid) = p.uid {
        metadata["uid"] = json!(uid);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status})
}

/// The pod object of a simulated pod (its name, UID, node, IP, labels, service account), Running;
/// in a dual-stack sim `status.podIPs` lists its IPv6 address after the IPv4 one.
pub fn sim_pod(pod: &Pod) -> Value {
    let mut object = self::pod(&PodSpec {
        namespace: pod.namespace(),
        name: pod.name(),
        uid: Some(pod.uid()),
        node: Some(pod.node().name()),
        ip: Some(pod.ip()),
        labels: pod.labels().clone(),
        service_account: pod.service_account(),
    });
    if let Ok(ip6) = pod.ip6() {
        object["status"]["podIPs"] = json!([{"ip": pod.ip().to_string()}, {"ip": ip6.to_string()}]);
    }
    object
}

/// The pod of the sluice DaemonSet (`sluice-system`, ServiceAccount `sluice`) on `node`:
/// host network, so its IP is the node's `host_ip`; owned by the DaemonSet, labelled as the
/// DaemonSet controller labels its pods; Running.
pub fn node_agent_pod(name: &str, node: &str, host_ip: Ipv4Addr) -> Value {
    let mut object = pod(&PodSpec {
        namespace: "sluice-system",
        name,
        uid: None,
        node: Some(node),
        ip: Some(host_ip),
        labels: BTreeMap::new(),
        service_account: "sluice",
    });
    object["metadata"]["generateName"] = json!("sluice-");
    object["metadata"]["labels"] = json!({
        "app.kubernetes.io/name": "sluice",
        "app.kubernetes.io/part-of": "sluice",
        "app.kubernetes.io/component": "node-proxy",
        "controller-revision-hash": "6d8f9b7c5d",
        "pod-template-generation": "1",
    });
    object["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "blockOwnerDeletion": true, "controller": true, "kind": "DaemonSet",
        "name": "sluice", "uid": "9a1c3e5f-7b2d-4e6f-8a0b-1c2d3e4f5a6b",
    }]);
    object["spec"]["hostNetwork"] = json!(true);
    object["spec"]["dnsPolicy"] = json!("ClusterFirstWithHostNet");
    object["spec"]["containers"][0]["name"] = json!("sluice");
    object["spec"]["containers"][0]["image"] = json!("sluice:0.1.0");
    object["spec"]["containers"][0]
        .as_object_mut()
        .expect("a container is an object")
        .remove("ports");
    object["status"]["hostIP"] = json!(host_ip.to_string());
    object["status"]["hostIPs"] = json!([{"ip": host_ip.to_string()}]);
    object
}

/// A ClusterIP Service; ports are `(name, port, targetPort)`.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, u16)],
    selector: &[(&str, &str)],
) -> Value {
    let selector: BTreeMap<&str, &str> = selector.iter().copied().collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"{namespace}\"}}}}\n")},
            "managedFields": [managed("kubectl-client-side-apply", "Update", "v1", json!({
                "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {}, "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}
            }))],
            "name": name,
            "namespace": namespace,
        },
        "spec": {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": ports.iter().map(|(n, port, target)| json!({"name": n, "port": port, "protocol": "TCP", "targetPort": target})).collect::<Vec<_>>(),
            "selector": selector,
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
        "status": {"loadBalancer": {}},
    })
}

/// One endpoint of a slice: a pod's address and readiness.
#[derive(Debug, Clone)]
pub struct EndpointSpec<'a> {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub node: &'a str,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
}

impl<'a> EndpointSpec<'a> {
    /// A ready endpoint for a simulated pod.
    pub fn of(pod: &'a Pod) -> EndpointSpec<'a> {
        EndpointSpec {
            ip: pod.ip(),
            ready: true,
            node: pod.node().name(),
            pod_name: pod.name(),
            pod_uid: pod.uid(),
        }
    }
}

/// The EndpointSlice the endpoint-slice controller keeps for Service `service`: ports are
/// `(name, target port)`, the port the endpoints listen on.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[EndpointSpec],
) -> Value {
    json!({
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": endpoints.iter().map(|e| json!({
            "addresses": [e.ip.to_string()],
            "conditions": {"ready": e.ready, "serving": e.ready, "terminating": !e.ready},
            "nodeName": e.node,
            "targetRef": {"kind": "Pod", "name": e.pod_name, "namespace": namespace, "uid": e.pod_uid},
        })).collect::<Vec<_>>(),
        "kind": "EndpointSlice",
        "metadata": {
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": T0},
            "generateName": format!("{service}-"),
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "managedFields": [managed("kube-controller-manager", "Update", "discovery.k8s.io/v1", json!({
                "f:addressType": {}, "f:endpoints": {}, "f:metadata": {"f:labels": {}, "f:ownerReferences": {}}, "f:ports": {}
            }))],
            "name": name,
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "blockOwnerDeletion": true, "controller": true, "kind": "Service",
                                 "name": service, "uid": "4e1d7c2a-9b3f-4c8e-a6d5-0f1e2d3c4b5a"}],
        },
        "ports": ports.iter().map(|(n, port)| json!({"name": n, "port": port, "protocol": "TCP"})).collect::<Vec<_>>(),
    })
}

/// An Istio AuthorizationPolicy (security.istio.io/v1) with `spec`.
/// A `security.istio.io/v1` object of `kind` (PeerAuthentication, RequestAuthentication), as
/// kubectl would apply it.
pub fn istio_security(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    let mut v = authorization_policy(namespace, name, spec);
    v["kind"] = json!(kind);
    v
}

pub fn authorization_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}\n"},
            "managedFields": [managed("kubectl-client-side-apply", "Update", "security.istio.io/v1", json!({"f:spec": {}}))],
            "name": name,
            "namespace": namespace,
        },
        "spec": spec,
    })
}

/// An HTTPRoute (gateway.networking.k8s.io/v1) with `spec`, as `kubectl apply` leaves it once a
/// mesh controller has accepted it (see [`gateway_route`]).
pub fn http_route(namespace: &str, name: &str, spec: Value) -> Value {
    gateway_route("HTTPRoute", namespace, name, spec)
}

/// A GRPCRoute (gateway.networking.k8s.io/v1) with `spec`, as [`http_route`].
pub fn grpc_route(namespace: &str, name: &str, spec: Value) -> Value {
    gateway_route("GRPCRoute", namespace, name, spec)
}

/// A Gateway API route of `kind` with `spec`, kubectl-applied, and `status.parents` as a mesh
/// controller (Istio's, in a cluster that runs both) writes it: one entry per parentRef,
/// Accepted and ResolvedRefs. sluice writes no status and reads none.
pub fn gateway_route(kind: &str, namespace: &str, name: &str, spec: Value) -> Value {
    let parents: Vec<Value> = spec["parentRefs"]
        .as_array()
        .map(|refs| {
            refs.iter()
                .map(|parent| {
                    let condition = |kind: &str, message: &str| {
                        json!({"lastTransitionTime": T0, "message": message, "observedGeneration": 1,
                               "reason": kind, "status": "True", "type": kind})
                    };
                    json!({
                        "conditions": [
                            condition("Accepted", "Route was valid"),
                            condition("ResolvedRefs", "All references resolved"),
                        ],
                        "controllerName": "istio.io/mesh-controller",
                        "parentRef": parent,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let last_applied = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {"annotations": {}, "name": name, "namespace": namespace},
        "spec": spec,
    });
    let mut status_update = managed(
        "pilot-discovery",
        "Update",
        "gateway.networking.k8s.io/v1",
        json!({"f:status": {".": {}, "f:parents": {}}}),
    );
    status_update["subresource"] = json!("status");
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": kind,
        "metadata": {
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{last_applied}\n")},
            "managedFields": [
                managed("kubectl-client-side-apply", "Update", "gateway.networking.k8s.io/v1", json!({
                    "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                    "f:spec": {".": {}, "f:parentRefs": {}, "f:rules": {}},
                })),
                status_update,
            ],
            "name": name,
            "namespace": namespace,
        },
        "spec": spec,
        "status": {"parents": parents},
    })
}

/// A sluice TrafficPolicy (sluice.dev/v1alpha1) with `spec`, as `kubectl apply` leaves it.
pub fn traffic_policy(namespace: &str, name: &str, spec: Value) -> Value {
    kubectl_applied(
        "sluice.dev/v1alpha1",
        "TrafficPolicy",
        namespace,
        name,
        spec,
    )
}

/// An Istio ServiceEntry (networking.istio.io/v1) with `spec`, as `kubectl apply` leaves it.
pub fn service_entry(namespace: &str, name: &str, spec: Value) -> Value {
    kubectl_applied(
        "networking.istio.io/v1",
        "ServiceEntry",
        namespace,
        name,
        spec,
    )
}

/// An Istio VirtualService (networking.istio.io/v1) with `spec`.
pub fn virtual_service(namespace: &str, name: &str, spec: Value) -> Value {
    kubectl_applied("networking.istio.io/v1", "VirtualService", namespace, name, spec)
}

/// An Istio DestinationRule as `kubectl apply` leaves it.
pub fn destination_rule(namespace: &str, name: &str, spec: Value) -> Value {
    kubectl_applied("networking.istio.io/v1", "DestinationRule", namespace, name, spec)
}

/// A namespaced custom resource with `spec`, kubectl-applied (client side): the
/// last-applied-configuration annotation and its managedFields entry.
fn kubectl_applied(
    api_version: &str,
    kind: &str,
    namespace: &str,
    name: &str,
    spec: Value,
) -> Value {
    let last_applied = json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"annotations": {}, "name": name, "namespace": namespace},
        "spec": spec,
    });
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{last_applied}\n")},
            "managedFields": [managed("kubectl-client-side-apply", "Update", api_version, json!({
                "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                "f:spec": {".": {}},
            }))],
            "name": name,
            "namespace": namespace,
        },
        "spec": spec,
    })
}
