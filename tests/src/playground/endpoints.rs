//! The endpoint-slice controller's job: for each Service with a selector, the EndpointSlices
//! listing the pods it selects, with each Service port resolved to the port the pod listens on
//! (a named `targetPort` looked up among the pod's container ports, as kube-controller-manager
//! does: a pod without that port name is left out of that port's slice).

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde_json::{json, Value};

use super::spec::{PodPlan, ServicePlan, TargetPort};

/// A pod once placed: its plan, address, UID and node name.
pub struct PlacedEndpoint<'a> {
    pub plan: &'a PodPlan,
    pub ip: Ipv4Addr,
    pub uid: &'a str,
    pub node_name: &'a str,
}

/// The EndpointSlices of `svc` over `pods` (all ready: a stand-in serves once it listens, and
/// the playground waits for that before traffic). Pods that resolve the Service's ports to the
/// same numbers share a slice, as the controller groups them; slices are named
/// `<service>-<n>` in a stable order.
pub fn slices(svc: &ServicePlan, pods: &[PlacedEndpoint]) -> Vec<Value> {
    let Some(selector) = &svc.selector else { return Vec::new() };
    if selector.is_empty() {
        return Vec::new(); // an empty selector selects nothing for endpoints (as in Kubernetes)
    }
    // Resolved ports (None: this pod lacks the named port) → pods.
    let mut groups: BTreeMap<Vec<Option<u16>>, Vec<&PlacedEndpoint>> = BTreeMap::new();
    for p in pods {
        if p.plan.namespace != svc.namespace || !selector.iter().all(|(k, v)| p.plan.labels.get(k) == Some(v))
        {
            continue;
        }
        let resolved: Vec<Option<u16>> = svc
            .ports
            .iter()
            .map(|port| match &port.target {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => p.plan.named_port(name),
            })
            .collect();
        groups.entry(resolved).or_default().push(p);
    }
    groups
        .into_iter()
        .filter(|(resolved, _)| resolved.iter().any(Option::is_some) || svc.ports.is_empty())
        .enumerate()
        .map(|(i, (resolved, members))| {
            let ports: Vec<Value> = svc
                .ports
                .iter()
                .zip(&resolved)
                .filter_map(|(port, r)| {
                    let mut v = json!({"port": (*r)?, "protocol": "TCP"});
                    if let Some(n) = &port.name {
                        v["name"] = json!(n);
                    }
                    if let Some(ap) = &port.app_protocol {
                        v["appProtocol"] = json!(ap);
                    }
                    Some(v)
                })
                .collect();
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-{}", svc.name, i + 1),
                    "namespace": svc.namespace,
                    "labels": {
                        "kubernetes.io/service-name": svc.name,
                        "endpointslice.kubernetes.io/managed-by": "sluice-playground",
                    },
                },
                "addressType": "IPv4",
                "endpoints": members.iter().map(|p| json!({
                    "addresses": [p.ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "targetRef": {"kind": "Pod", "name": p.plan.name, "namespace": p.plan.namespace, "uid": p.uid},
                    "nodeName": p.node_name,
                })).collect::<Vec<_>>(),
                "ports": ports,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::playground::spec::{Container, ServicePort};

    fn pod(name: &str, labels: &[(&str, &str)], ports: &[(&str, u16)]) -> PodPlan {
        PodPlan {
            namespace: "shop".into(),
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            service_account: "default".into(),
            owner: None,
            generate_name: None,
            node: 0,
            containers: vec![Container {
                name: "c".into(),
                image: "x".into(),
                ports: ports.iter().map(|(n, p)| (Some(n.to_string()), *p)).collect(),
                env: Default::default(),
            }],
            origin: "Pod".into(),
        }
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_group_into_slices() {
        let a = pod("a", &[("app", "web")], &[("http", 8080)]);
        let b = pod("b", &[("app", "web")], &[("http", 9090)]);
        let c = pod("c", &[("app", "web")], &[("metrics", 9100)]);
        let other = pod("d", &[("app", "db")], &[("http", 8080)]);
        let svc = ServicePlan {
            namespace: "shop".into(),
            name: "web".into(),
            doc: Value::Null,
            cluster_ip: Some("10.96.0.10".parse().unwrap()),
            allocated: true,
            selector: Some([("app".to_string(), "web".to_string())].into()),
            ports: vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target: TargetPort::Name("http".into()),
                app_protocol: Some("http".into()),
            }],
        };
        let placed: Vec<PlacedEndpoint> = [&a, &b, &c, &other]
            .iter()
            .enumerate()
            .map(|(i, p)| PlacedEndpoint {
                plan: p,
                ip: Ipv4Addr::new(10, 244, 1, 10 + i as u8),
                uid: "u",
                node_name: "n1",
            })
            .collect();
        let s = slices(&svc, &placed);
        assert_eq!(s.len(), 2, "8080 and 9090; c has no port named http: {s:#?}");
        assert_eq!(
            s[0]["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}])
        );
        assert_eq!(s[0]["endpoints"][0]["addresses"], json!(["10.244.1.10"]));
        assert_eq!(s[1]["ports"][0]["port"], 9090);
        assert_eq!(s[1]["metadata"]["name"], "web-2");
        assert_eq!(s[0]["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        let no_selector = ServicePlan { selector: None, ..svc };
        assert!(slices(&no_selector, &placed).is_empty());
    }
}
