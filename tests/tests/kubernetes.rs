//! The Kubernetes API source (issue 7, acceptance 1), end to end: sluice runs on a simulated
//! node with `--source kubernetes --kube-api http://127.0.0.1:PORT`, against the fake API server
//! of `sluice_tests::fake_apiserver`, which speaks the real list/watch protocol. After each
//! scripted change, sluice's model (`GET /model`) and its enrolled pods (`GET /pods`) must match.
//!
//! The fake server runs in this test process; its listening socket is created inside the node's
//! network namespace (a socket belongs to the namespace it was made in), so sluice reaches it on
//! the node's loopback while the test scripts it directly. The pods are real simulated pods
//! (netns, cgroup, sandbox process): the API only says they exist, sluice finds them on the node.

mod common;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::{json, Value};
use sluice_tests::{
    fake_apiserver::{
        objects::{self, EndpointSpec},
        FakeApiServer, Resource,
    },
    Node, PodOpts, Sim, Sluice, SluiceOpts,
};

const VIP: &str = "10.96.0.10";

fn vip(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().unwrap()
}

fn start_sluice(node: &Node, api: &FakeApiServer) -> Result<Sluice> {
    node.start_sluice(SluiceOpts {
        args: ["--source", "kubernetes", "--kube-api", &api.url()].iter().map(Into::into).collect(),
        env: vec![("SLUICE_LOG".into(), "info,sluice::discovery=debug".into())],
        ..SluiceOpts::default()
    })
}

/// Polls `GET /model` until `pred` holds; the error names `what`.
fn wait_model(s: &Sluice, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    s.wait_for("/model", pred, T).with_context(|| format!("waiting for the model: {what}"))
}

fn keys(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|o| match o["namespace"].as_str() {
                    Some(ns) => format!("{ns}/{}", o["name"].as_str().unwrap_or("")),
                    None => o["name"].as_str().unwrap_or("").to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn find<'a>(list: &'a Value, ns: &str, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|o| o["namespace"] == ns && o["name"] == name)
}

/// `GET /model`'s routes as `Kind namespace/name`.
fn route_keys(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
                    format!("{} {}/{}", s("kind"), s("namespace"), s("name"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The spec of the TrafficPolicy `shop/web`: timeouts and retries for web's HTTP port, and
/// `extra` fields.
fn web_traffic_policy(extra: Value) -> Value {
    let mut spec = json!({
        "targetRefs": [{"group": "", "kind": "Service", "name": "web", "sectionName": "http"}],
        "timeouts": {"request": "10s"},
        "retries": {"attempts": 3, "retryOn": ["connect-failure", "gateway-error"]},
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    spec
}

fn find_route<'a>(model: &'a Value, kind: &str, ns: &str, name: &str) -> Option<&'a Value> {
    model["routes"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == kind && r["namespace"] == ns && r["name"] == name)
}

/// The spec of the HTTPRoute `shop/web-http`: every request to web:80 split between `backends`
/// (`(Service, weight)`, each on port 80).
fn web_http_route(backends: &[(&str, u32)]) -> Value {
    let backends: Vec<Value> = backends
        .iter()
        .map(|(name, weight)| json!({"group": "", "kind": "Service", "name": name, "port": HTTP_PORT, "weight": weight}))
        .collect();
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": HTTP_PORT}],
        "hostnames": ["web.shop.svc.cluster.local"],
        "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": backends,
            "timeouts": {"request": "10s"},
        }],
    })
}

fn ready_addresses(model: &Value, ns: &str, slice: &str) -> Vec<String> {
    find(&model["endpoint_slices"], ns, slice)
        .and_then(|s| s["ready_addresses"].as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// Waits until sluice watches everything: one watch per resource, two for pods.
fn wait_all_watching(api: &FakeApiServer) -> Result<()> {
    for r in Resource::ALL {
        let want = if r == Resource::Pods { 2 } else { 1 };
        api.wait_stats(r, T, "sluice's watch", |s| s.open_watches == want)?;
    }
    Ok(())
}

fn traffic_through_sluice(client: &sluice_tests::Pod) -> Result<()> {
    let r = tcp_exchange(client, vip(ECHO_PORT), 2048)?;
    expect_ok(&r)?;
    ensure!(via_sluice(&r), "the connection should have gone through sluice: {r}");
    Ok(())
}

/// Every scripted change of the acceptance list, in one cluster: start (synced before ready),
/// a namespace annotated (its pods enrolled), a pod added and deleted, endpoints changing, a
/// policy added and an invalid one fixed, Gateway API routes (an HTTPRoute and a GRPCRoute)
/// created, changed and deleted, TrafficPolicies and a ServiceEntry created, changed and
/// deleted (and an invalid policy reported), a namespace's outbound policy set, a bookmark that
/// saves a relist, a 410 Gone that forces one, a dropped connection; traffic flows through
/// sluice before and after.
#[test]
fn model_follows_the_api_server() -> Result<()> {
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    let api = FakeApiServer::start_in_netns(node.netns())?;

    // --- The cluster before sluice starts ---
    for ns in ["default", "kube-system", "shop"] {
        api.apply(objects::namespace(ns, &[]))?;
    }
    let web0 = node.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]).service_account("web-sa"))?;
    let mut servers = start_servers(&web0)?;
    let client =
        node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]).service_account("client-sa"))?;
    api.apply(objects::sim_pod(&web0))?;
    api.apply(objects::sim_pod(&client))?;
    // A pod on another node: it reaches sluice through the second pod watch (IP → identity).
    api.apply(objects::pod(&objects::PodSpec {
        namespace: "kube-system",
        name: "coredns-6f6b679f8f-kq2xz",
        uid: None,
        node: Some("other-node"),
        ip: Some("10.244.9.10".parse()?),
        labels: [("k8s-app".to_string(), "kube-dns".to_string())].into(),
        service_account: "coredns",
    }))?;
    // Not scheduled and not started: no IP, so not in the model (and not an error).
    api.apply(objects::pod(&objects::PodSpec {
        namespace: "shop",
        name: "batch-pending",
        uid: None,
        node: None,
        ip: None,
        labels: Default::default(),
        service_account: "default",
    }))?;
    let ports = [("echo", ECHO_PORT, ECHO_PORT), ("http", HTTP_PORT, HTTP_TARGET_PORT)];
    let slice_ports = [("echo", ECHO_PORT), ("http", HTTP_TARGET_PORT)];
    api.apply(objects::service("shop", "web", VIP, &ports, &[("app", "web")]))?;
    api.apply(objects::endpoint_slice("shop", "web-abc12", "web", &slice_ports, &[EndpointSpec::of(&web0)]))?;
    api.apply(objects::service(
        "kube-system",
        "kube-dns",
        "10.96.0.53",
        &[("dns-tcp", 53, 53)],
        &[("k8s-app", "kube-dns")],
    ))?;
    // A policy sluice cannot enforce (CUSTOM: an external authorizer): reported, not applied.
    api.apply(objects::authorization_policy(
        "shop",
        "strict-web",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "CUSTOM", "provider": {"name": "ext-authz"},
               "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}),
    ))?;
    // A mesh route on web's HTTP port (GAMMA: the Service is the parent).
    api.apply(objects::http_route("shop", "web-http", web_http_route(&[("web", 1)])))?;
    // A TrafficPolicy for web's HTTP port.
    api.apply(objects::traffic_policy("shop", "web", web_traffic_policy(json!({}))))?;

    // --- sluice starts: its first model is complete before it says ready ---
    let sluice = start_sluice(&node, &api)?;
    sluice.wait_ready(T)?;
    let m = sluice.get_json("/model")?;
    assert_eq!(keys(&m["namespaces"]), set(&["default", "kube-system", "shop"]), "{m}");
    assert_eq!(
        keys(&m["pods"]),
        set(&["kube-system/coredns-6f6b679f8f-kq2xz", "shop/client", "shop/web-0"]),
        "every pod with an IP, of every node: {m}"
    );
    let w = find(&m["pods"], "shop", "web-0").context("web-0")?;
    assert_eq!(w["uid"], web0.uid());
    assert_eq!(w["ip"], web0.ip().to_string());
    assert_eq!(w["node"], node.name());
    assert_eq!(w["service_account"], "web-sa");
    assert_eq!(find(&m["pods"], "kube-system", "coredns-6f6b679f8f-kq2xz").unwrap()["node"], "other-node");
    assert_eq!(keys(&m["services"]), set(&["kube-system/kube-dns", "shop/web"]));
    let svc = find(&m["services"], "shop", "web").unwrap();
    assert_eq!(svc["cluster_ip"], VIP);
    assert_eq!(svc["ports"].as_array().map(Vec::len), Some(2));
    assert_eq!(ready_addresses(&m, "shop", "web-abc12"), [web0.ip().to_string()]);
    assert_eq!(m["authorization_policies"], json!([]));
    assert_eq!(
        m["routes"],
        json!([{"kind": "HTTPRoute", "namespace": "shop", "name": "web-http", "parents": ["shop/web:80"],
                "hostnames": ["web.shop.svc.cluster.local"], "rules": 1, "backends": ["shop/web:80=1"]}]),
    );
    assert_eq!(
        m["traffic_policies"],
        json!([{"namespace": "shop", "name": "web", "targets": ["Service web:http"], "features": ["timeouts", "retries"]}]),
    );
    assert_eq!(m["service_entries"], json!([]));
    assert!(
        m["namespaces"].as_array().unwrap().iter().all(|n| n["outbound_policy"] == "ALLOW_ANY"),
        "the default outbound policy: {m}"
    );
    let errors = m["errors"].as_array().context("errors")?;
    assert_eq!(errors.len(), 1, "{m}");
    assert_eq!(errors[0]["source"], "kubernetes:AuthorizationPolicy/shop/strict-web");
    assert!(errors[0]["reason"].as_str().unwrap().contains("CUSTOM"), "{}", errors[0]);
    assert!(m["namespaces"].as_array().unwrap().iter().all(|n| n["enrolled"] == false));
    assert_eq!(enrolled_pods(&sluice)?, Vec::<String>::new(), "nothing is enrolled yet");
    // Two pod watches, this node's and the others', so every pod comes exactly once.
    let selectors = api.stats(Resource::Pods).field_selectors;
    assert_eq!(
        selectors,
        set(&[&format!("spec.nodeName={}", node.name()), &format!("spec.nodeName!={}", node.name())]),
    );
    let generation = m["generation"].as_u64().context("generation")?;

    // --- The namespace is annotated: its pods join the mesh, traffic goes through sluice ---
    let mut shop = api.get("Namespace", "", "shop").context("namespace shop")?;
    objects::annotate(&mut shop, "sluice.dev/mesh", Some("enabled"));
    api.apply(shop)?;
    let m = wait_model(&sluice, "shop enrolled", |m| {
        m["namespaces"]
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["name"] == "shop" && n["enrolled"] == true))
    })?;
    assert!(m["generation"].as_u64().unwrap() > generation);
    wait_enrolled(&sluice, &client)?;
    wait_enrolled(&sluice, &web0)?;
    traffic_through_sluice(&client)?;

    // --- A pod is added (and the endpoint-slice controller adds it to the slice) ---
    let web1 = node.add_pod("shop", "web-1", PodOpts::labels(&[("app", "web")]).service_account("web-sa"))?;
    servers.extend(start_servers(&web1)?);
    api.apply(objects::sim_pod(&web1))?;
    api.apply(objects::endpoint_slice(
        "shop",
        "web-abc12",
        "web",
        &slice_ports,
        &[EndpointSpec::of(&web0), EndpointSpec::of(&web1)],
    ))?;
    let both = vec![web0.ip().to_string(), web1.ip().to_string()];
    wait_model(&sluice, "web-1 and its endpoint", |m| {
        find(&m["pods"], "shop", "web-1").is_some() && ready_addresses(m, "shop", "web-abc12") == both
    })?;
    wait_enrolled(&sluice, &web1)?;

    // --- Endpoints change: web-1 stops being ready, then the pod is deleted ---
    let mut not_ready = EndpointSpec::of(&web1);
    not_ready.ready = false;
    api.apply(objects::endpoint_slice(
        "shop",
        "web-abc12",
        "web",
        &slice_ports,
        &[EndpointSpec::of(&web0), not_ready],
    ))?;
    wait_model(&sluice, "web-1 not ready", |m| {
        ready_addresses(m, "shop", "web-abc12") == [web0.ip().to_string()]
    })?;
    api.apply(objects::endpoint_slice("shop", "web-abc12", "web", &slice_ports, &[EndpointSpec::of(&web0)]))?;
    api.delete("Pod", "shop", "web-1")?;
    wait_model(&sluice, "web-1 gone", |m| find(&m["pods"], "shop", "web-1").is_none())?;
    wait_released(&sluice, &web1)?;
    web1.delete()?;

    // --- A policy is added, and the invalid one is fixed ---
    api.apply(objects::authorization_policy(
        "shop",
        "allow-client",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client-sa"]}}]}]}),
    ))?;
    api.apply(objects::authorization_policy(
        "shop",
        "strict-web",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"notNamespaces": ["shop"]}}]}]}),
    ))?;
    let m = wait_model(&sluice, "both policies, no errors", |m| {
        keys(&m["authorization_policies"]) == set(&["shop/allow-client", "shop/strict-web"])
            && m["errors"] == json!([])
    })?;
    assert_eq!(find(&m["authorization_policies"], "shop", "strict-web").unwrap()["action"], "DENY");
    traffic_through_sluice(&client).context("the client is allowed by allow-client")?;

    // --- Routes: a GRPCRoute and an invalid HTTPRoute are created ---
    api.apply(objects::grpc_route(
        "shop",
        "web-grpc",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
               "rules": [{"matches": [{"method": {"service": "echo.v1.Echo", "method": "Say"}}],
                          "backendRefs": [{"name": "web", "port": ECHO_PORT}]}]}),
    ))?;
    api.apply(objects::http_route(
        "shop",
        "broken",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": HTTP_PORT}],
               "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/v(1"}}],
                          "backendRefs": [{"name": "web", "port": HTTP_PORT}]}]}),
    ))?;
    let m = wait_model(&sluice, "the GRPCRoute, and the invalid HTTPRoute reported", |m| {
        route_keys(&m["routes"]) == set(&["GRPCRoute shop/web-grpc", "HTTPRoute shop/web-http"])
            && m["errors"].as_array().is_some_and(|e| e.len() == 1)
    })?;
    let grpc = find_route(&m, "GRPCRoute", "shop", "web-grpc").context("web-grpc")?;
    assert_eq!(grpc["parents"], json!(["shop/web"]), "every port of web: {grpc}");
    assert_eq!(grpc["backends"], json!([format!("shop/web:{ECHO_PORT}=1")]));
    assert_eq!(m["errors"][0]["source"], "kubernetes:HTTPRoute/shop/broken");
    let reason = m["errors"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("spec.rules[0].matches[0].path.value: invalid regular expression"), "{reason}");

    // --- The HTTPRoute changes (a canary takes 10 %), then the others go ---
    api.apply(objects::http_route("shop", "web-http", web_http_route(&[("web", 90), ("web-canary", 10)])))?;
    wait_model(&sluice, "the canary weights", |m| {
        find_route(m, "HTTPRoute", "shop", "web-http")
            .is_some_and(|r| r["backends"] == json!(["shop/web:80=90", "shop/web-canary:80=10"]))
    })?;
    api.delete("GRPCRoute", "shop", "web-grpc")?;
    api.delete("HTTPRoute", "shop", "broken")?;
    wait_model(&sluice, "only the HTTPRoute left, no errors", |m| {
        route_keys(&m["routes"]) == set(&["HTTPRoute shop/web-http"]) && m["errors"] == json!([])
    })?;

    // --- TrafficPolicies and a ServiceEntry: created (and an invalid policy reported) ---
    let payments = |ports: Value| {
        objects::service_entry(
            "shop",
            "payments",
            json!({"hosts": ["pay.example.com", "*.pay.example.com"], "addresses": ["192.0.2.0/24"],
                   "ports": ports, "location": "MESH_EXTERNAL", "resolution": "NONE", "exportTo": ["."]}),
        )
    };
    api.apply(payments(json!([{"number": 443, "name": "https", "protocol": "HTTPS"}])))?;
    api.apply(objects::traffic_policy(
        "shop",
        "egress",
        json!({"targetRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "payments"}],
               "tls": {"mode": "SIMPLE", "sni": "pay.example.com"}}),
    ))?;
    api.apply(objects::traffic_policy(
        "shop",
        "broken",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "web"}], "tls": {"mode": "MUTUAL"}}),
    ))?;
    api.apply(objects::traffic_policy(
        "shop",
        "web",
        web_traffic_policy(json!({"outlierDetection": {"consecutiveGatewayErrors": 3}})),
    ))?;
    let m = wait_model(&sluice, "the ServiceEntry, the policies, the invalid one reported", |m| {
        keys(&m["traffic_policies"]) == set(&["shop/egress", "shop/web"])
            && keys(&m["service_entries"]) == set(&["shop/payments"])
            && find(&m["traffic_policies"], "shop", "web")
                .is_some_and(|p| p["features"] == json!(["timeouts", "retries", "outlierDetection"]))
            && m["errors"].as_array().is_some_and(|e| e.len() == 1)
    })?;
    assert_eq!(
        find(&m["traffic_policies"], "shop", "egress").unwrap(),
        &json!({"namespace": "shop", "name": "egress", "targets": ["ServiceEntry payments"], "features": ["tls"]}),
    );
    assert_eq!(
        m["service_entries"],
        json!([{"namespace": "shop", "name": "payments", "hosts": ["pay.example.com", "*.pay.example.com"],
                "addresses": ["192.0.2.0/24"], "ports": ["443/HTTPS"], "location": "MESH_EXTERNAL", "resolution": "NONE"}]),
    );
    assert_eq!(m["errors"][0]["source"], "kubernetes:TrafficPolicy/shop/broken");
    let reason = m["errors"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("spec.tls.mode: mode MUTUAL is not supported"), "{reason}");

    // --- ... changed (a port, a namespace's outbound policy), then deleted ---
    api.apply(payments(json!([{"number": 443, "name": "https", "protocol": "HTTPS"},
                              {"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 443}])))?;
    let mut default_ns = api.get("Namespace", "", "default").context("namespace default")?;
    objects::annotate(&mut default_ns, "sluice.dev/outbound-traffic-policy", Some("REGISTRY_ONLY"));
    api.apply(default_ns)?;
    wait_model(&sluice, "the second ServiceEntry port and the outbound policy", |m| {
        find(&m["service_entries"], "shop", "payments")
            .is_some_and(|e| e["ports"] == json!(["443/HTTPS", "80/HTTP->443"]))
            && m["namespaces"].as_array().is_some_and(|a| {
                a.iter().any(|n| n["name"] == "default" && n["outbound_policy"] == "REGISTRY_ONLY")
            })
    })?;
    api.delete("TrafficPolicy", "shop", "broken")?;
    api.delete("TrafficPolicy", "shop", "egress")?;
    api.delete("ServiceEntry", "shop", "payments")?;
    wait_model(&sluice, "only the web TrafficPolicy left, no ServiceEntry, no errors", |m| {
        keys(&m["traffic_policies"]) == set(&["shop/web"])
            && m["service_entries"] == json!([])
            && m["errors"] == json!([])
    })?;

    // --- A bookmark saves a relist: history is compacted past everything the pod watches saw
    //     as events, the connections drop, and they resume from the bookmark ---
    wait_all_watching(&api)?;
    let before = api.stats(Resource::Pods);
    assert_eq!(api.bookmark(Resource::Pods), 2, "both pod watches asked for bookmarks");
    api.compact(Resource::Pods);
    let cut = api.drop_watches();
    assert_eq!(
        cut, 14,
        "namespaces, pods ×2, services, endpointslices, authorizationpolicies, httproutes, grpcroutes, trafficpolicies, serviceentries, virtualservices, peerauthentications, requestauthentications, destinationrules"
    );
    // Made while disconnected: they must arrive from the history on resume.
    api.apply(objects::pod(&objects::PodSpec {
        namespace: "kube-system",
        name: "metrics-server-5d4f8c7b9-x2mzq",
        uid: None,
        node: Some("other-node"),
        ip: Some("10.244.9.11".parse()?),
        labels: [("k8s-app".to_string(), "metrics-server".to_string())].into(),
        service_account: "metrics-server",
    }))?;
    let mut kube_system = api.get("Namespace", "", "kube-system").context("namespace kube-system")?;
    objects::annotate(&mut kube_system, "sluice.dev/peer-authentication", Some("STRICT"));
    api.apply(kube_system)?;
    wait_model(&sluice, "the changes made while disconnected", |m| {
        find(&m["pods"], "kube-system", "metrics-server-5d4f8c7b9-x2mzq").is_some()
            && m["namespaces"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n["name"] == "kube-system" && n["peer_auth"] == "STRICT"))
    })?;
    let after = api.stats(Resource::Pods);
    assert!(after.watches >= before.watches + 2, "both pod watches resumed: {before:?} → {after:?}");
    assert_eq!(
        (after.lists, after.gone),
        (before.lists, before.gone),
        "resumed from the bookmark, no 410, no relist"
    );

    // --- 410 Gone forces a relist: the slice is replaced while the watch is behind ---
    let slices_before = api.stats(Resource::EndpointSlices);
    let expired = api.expire(Resource::EndpointSlices, |unseen| {
        unseen.delete("EndpointSlice", "shop", "web-abc12")?;
        unseen.apply(objects::endpoint_slice(
            "shop",
            "web-x7p2k",
            "web",
            &slice_ports,
            &[EndpointSpec::of(&web0)],
        ))?;
        Ok(())
    })?;
    assert_eq!(expired, 1);
    let m = wait_model(&sluice, "the relisted slices", |m| {
        keys(&m["endpoint_slices"]) == set(&["shop/web-x7p2k"])
    })?;
    assert_eq!(ready_addresses(&m, "shop", "web-x7p2k"), [web0.ip().to_string()]);
    let slices_after = api.stats(Resource::EndpointSlices);
    assert!(slices_after.lists > slices_before.lists, "a relist: {slices_before:?} → {slices_after:?}");
    assert!(sluice.log_contents().contains("410 Gone"), "the relist is explained in the log");

    // --- A dropped connection: the change made meanwhile arrives on resume, without a relist ---
    wait_all_watching(&api)?;
    let services_before = api.stats(Resource::Services);
    assert_eq!(api.drop_watches(), 14);
    let with_metrics =
        [("echo", ECHO_PORT, ECHO_PORT), ("http", HTTP_PORT, HTTP_TARGET_PORT), ("metrics", 9090, 9090)];
    api.apply(objects::service("shop", "web", VIP, &with_metrics, &[("app", "web")]))?;
    wait_model(&sluice, "the third service port", |m| {
        find(&m["services"], "shop", "web").and_then(|s| s["ports"].as_array()).is_some_and(|p| p.len() == 3)
    })?;
    let services_after = api.stats(Resource::Services);
    assert_eq!(services_after.lists, services_before.lists, "resumed, not relisted");
    assert!(services_after.watches > services_before.watches);

    // --- Everything still flows, and the model is the API's ---
    traffic_through_sluice(&client)?;
    let m = sluice.get_json("/model")?;
    assert_eq!(
        keys(&m["pods"]),
        set(&[
            "kube-system/coredns-6f6b679f8f-kq2xz",
            "kube-system/metrics-server-5d4f8c7b9-x2mzq",
            "shop/client",
            "shop/web-0"
        ])
    );
    let mut enrolled = enrolled_pods(&sluice)?;
    enrolled.sort();
    assert_eq!(enrolled, ["shop/client", "shop/web-0"]);
    assert_eq!(route_keys(&m["routes"]), set(&["HTTPRoute shop/web-http"]));
    assert_eq!(keys(&m["traffic_policies"]), set(&["shop/web"]));
    drop(servers);
    Ok(())
}

/// Without Istio's CRDs the API server does not serve AuthorizationPolicies, PeerAuthentications,
/// RequestAuthentications or ServiceEntries, without the Gateway API's it serves no HTTPRoutes
/// or GRPCRoutes, and without sluice's no TrafficPolicies: sluice says so once per resource, runs without them, and picks them up once
/// the CRDs are installed.
#[test]
fn runs_without_the_optional_crds() -> Result<()> {
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    let api = FakeApiServer::start_in_netns(node.netns())?;
    for crd in Resource::CRDS {
        api.set_installed(crd, false);
    }
    api.apply(objects::namespace("shop", &[("sluice.dev/mesh", "enabled")]))?;
    let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    api.apply(objects::sim_pod(&client))?;

    let sluice = start_sluice(&node, &api)?;
    sluice.wait_ready(T)?;
    wait_enrolled(&sluice, &client)?;
    let m = sluice.get_json("/model")?;
    assert_eq!(m["authorization_policies"], json!([]));
    assert_eq!(m["routes"], json!([]));
    assert_eq!(m["traffic_policies"], json!([]));
    assert_eq!(m["service_entries"], json!([]));
    assert_eq!(m["virtual_services"], json!([]));
    assert_eq!(m["destination_rules"], json!([]));
    assert_eq!(m["errors"], json!([]), "a missing CRD is not an object error");
    // It keeps asking (with backoff), and says it only once per resource.
    for crd in Resource::CRDS {
        api.wait_stats(crd, T, "a second list attempt", |s| s.lists >= 2)?;
    }
    for plural in [
        "authorizationpolicies",
        "httproutes",
        "grpcroutes",
        "trafficpolicies",
        "serviceentries",
        "virtualservices",
        "peerauthentications",
        "requestauthentications",
        "destinationrules",
    ] {
        let said = sluice.log_contents().matches(&format!("does not serve {plural}")).count();
        assert_eq!(said, 1, "{plural} logged once:\n{}", sluice.log_contents());
    }

    for crd in Resource::CRDS {
        api.set_installed(crd, true);
    }
    api.apply(objects::authorization_policy("shop", "deny-all", json!({"action": "DENY", "rules": [{}]})))?;
    api.apply(objects::istio_security("PeerAuthentication", "istio-system", "default", json!({"mtls": {"mode": "STRICT"}})))?;
    api.apply(objects::istio_security(
        "RequestAuthentication",
        "shop",
        "jwt",
        json!({"jwtRules": [{"issuer": "https://issuer.test", "jwksUri": "https://issuer.test/keys"}]}),
    ))?;
    let api_parent = json!([{"group": "", "kind": "Service", "name": "api"}]);
    api.apply(objects::grpc_route("shop", "api", json!({"parentRefs": api_parent, "rules": [{}]})))?;
    api.apply(objects::http_route("shop", "api", json!({"parentRefs": api_parent})))?;
    api.apply(objects::traffic_policy(
        "shop",
        "api",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "api"}], "timeouts": {"request": "2s"}}),
    ))?;
    api.apply(objects::service_entry(
        "shop",
        "api",
        json!({"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
               "resolution": "DNS"}),
    ))?;
    api.apply(objects::virtual_service(
        "shop",
        "api",
        json!({"hosts": ["api"], "http": [{"route": [{"destination": {"host": "api"}}]}]}),
    ))?;
    api.apply(objects::destination_rule(
        "shop",
        "api",
        json!({"host": "api", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}),
    ))?;
    // The retries come at the backoff's pace (doubling from 0.8 s, with jitter).
    sluice.wait_for(
        "/model",
        |m| {
            keys(&m["authorization_policies"]) == set(&["shop/deny-all"])
                && route_keys(&m["routes"]) == set(&["GRPCRoute shop/api", "HTTPRoute shop/api"])
                && keys(&m["traffic_policies"]) == set(&["shop/api"])
                && keys(&m["service_entries"]) == set(&["shop/api"])
                && keys(&m["virtual_services"]) == set(&["shop/api"])
                && keys(&m["peer_authentications"]) == set(&["istio-system/default"])
                && keys(&m["request_authentications"]) == set(&["shop/jwt"])
                && keys(&m["destination_rules"]) == set(&["shop/api"])
        },
        Duration::from_secs(40),
    )?;
    assert_eq!(
        sluice.log_contents().matches("serves this resource now").count(),
        9,
        "{}",
        sluice.log_contents()
    );
    Ok(())
}

/// `spec` with a list nested `depth` levels deep.
fn deep_spec(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    json!({"x": v})
}

/// The reason `GET /model` gives for `source`, if it lists it.
fn model_error(m: &Value, source: &str) -> Option<String> {
    m["errors"].as_array()?.iter().find(|e| e["source"] == source).map(|e| e["reason"].as_str().unwrap_or("").to_string())
}

/// Objects that once wedged the Kubernetes source (issue 12, point 3). Istio's CRDs keep `spec`
/// open, so whoever may create a policy may nest it arbitrarily deep: past serde_json's 128
/// levels such an object failed every list of its resource (sluice never synced, so it never
/// became ready), and in a watch event it vanished behind an anonymous error. Now deep and
/// oversized objects are refused by kind, namespace and name, like invalid ones, and the watch
/// goes on: later objects apply, and a fix or a deletion clears the error.
#[test]
fn deep_and_oversized_objects_are_refused_by_name() -> Result<()> {
    let sim = Sim::new()?;
    let node = sim.add_node("n1")?;
    let api = FakeApiServer::start_in_netns(node.netns())?;
    api.apply(objects::namespace("shop", &[("sluice.dev/mesh", "enabled")]))?;
    let client = node.add_pod("shop", "client", PodOpts::labels(&[("app", "client")]))?;
    api.apply(objects::sim_pod(&client))?;
    api.apply(objects::authorization_policy("shop", "deep", deep_spec(1000)))?;

    // In the first list: sluice still syncs, and names the object.
    let sluice = start_sluice(&node, &api)?;
    sluice.wait_ready(T)?;
    wait_enrolled(&sluice, &client)?;
    let nesting = "the object exceeds sluice's nesting limit: more than 100 levels deep";
    let m = sluice.get_json("/model")?;
    assert_eq!(model_error(&m, "kubernetes:AuthorizationPolicy/shop/deep").as_deref(), Some(nesting), "{m}");

    // In watch events: a deep ServiceEntry, and a TrafficPolicy with a 4 MiB annotation.
    api.apply(objects::service_entry("shop", "deep-entry", deep_spec(500)))?;
    let mut big = objects::traffic_policy(
        "shop",
        "big",
        json!({"targetRefs": [{"group": "", "kind": "Service", "name": "web"}], "timeouts": {"request": "2s"}}),
    );
    objects::annotate(&mut big, "example.com/blob", Some(&"x".repeat(4 << 20)));
    api.apply(big)?;
    let m = wait_model(&sluice, "the deep and the oversized object reported", |m| {
        model_error(m, "kubernetes:ServiceEntry/shop/deep-entry").is_some()
            && model_error(m, "kubernetes:TrafficPolicy/shop/big").is_some()
    })?;
    assert_eq!(model_error(&m, "kubernetes:ServiceEntry/shop/deep-entry").as_deref(), Some(nesting));
    assert_eq!(
        model_error(&m, "kubernetes:TrafficPolicy/shop/big").as_deref(),
        Some("the object exceeds sluice's size limit: more than 3 MiB")
    );
    let status = sluice.get_json("/status")?;
    assert_eq!(status["manifest_errors"].as_array().map(Vec::len), Some(3), "{status}");
    assert!(status["counters"]["discovery_limit_refused"].as_u64().is_some_and(|n| n >= 3), "{status}");

    // Later objects still apply: a namespace and its pod.
    api.apply(objects::namespace("later", &[("sluice.dev/mesh", "enabled")]))?;
    let late = node.add_pod("later", "late", PodOpts::default())?;
    api.apply(objects::sim_pod(&late))?;
    wait_enrolled(&sluice, &late)?;
    traffic_through_sluice_to(&client, &late)?;

    // A fix and deletions clear the errors.
    api.apply(objects::authorization_policy(
        "shop",
        "deep",
        json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["elsewhere"]}}]}]}),
    ))?;
    api.delete("ServiceEntry", "shop", "deep-entry")?;
    api.delete("TrafficPolicy", "shop", "big")?;
    wait_model(&sluice, "the errors cleared, the fixed policy in force", |m| {
        m["errors"] == json!([]) && keys(&m["authorization_policies"]) == set(&["shop/deep"])
    })?;
    Ok(())
}

/// A connection from `client` to an echo server in `server`, through sluice.
fn traffic_through_sluice_to(client: &sluice_tests::Pod, server: &sluice_tests::Pod) -> Result<()> {
    let mut echo = server.simpod(["echo-server", "--port", &ECHO_PORT.to_string()])?;
    echo.wait_listening(T)?;
    let r = tcp_exchange(client, server.addr(ECHO_PORT), 256)?;
    expect_ok(&r)?;
    ensure!(via_sluice(&r), "the connection should have gone through sluice: {r}");
    Ok(())
}
