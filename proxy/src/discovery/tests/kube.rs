//! The Kubernetes source's store without a server: API objects (as kube's watcher hands them
//! over, as `ApiObject`s) become the same model objects as the same manifests in a file;
//! validation failures keep the last good version; relists replace; optional CRDs may be absent.
//! The list/watch protocol itself is tested end to end against the fake API server
//! (`tests/tests/kubernetes.rs`).

use serde_json::{json, Value};

use super::fixtures;
use crate::discovery::kube::resources::watches;
use crate::discovery::kube::store::KubeStore;
use crate::discovery::kube::ApiObject;
use crate::discovery::*;

/// The index of the watch labelled `label`.
fn watch(label: &str) -> usize {
    watches().iter().position(|w| w.label == label).unwrap_or_else(|| panic!("no watch {label}"))
}

fn store() -> KubeStore {
    KubeStore::new(&watches())
}

/// A manifest fixture as the API sends it in a list: JSON, without apiVersion and kind, and
/// through the source's `ApiObject` decoding (within the limits) and back.
fn api_item(yaml: &str) -> Value {
    let mut v: Value = serde_yaml_ng::from_str(yaml).unwrap();
    let map = v.as_object_mut().unwrap();
    map.remove("apiVersion");
    map.remove("kind");
    through_kube(v)
}

fn through_kube(v: Value) -> Value {
    obj(v).into_json()
}

/// A JSON object as the watcher hands it over.
fn obj(v: Value) -> ApiObject {
    let o = ApiObject::from_json(v).expect("the object decodes");
    assert!(o.refused().is_none(), "fixtures are within the limits: {:?}", o.refused());
    o
}

/// Completes the first list of every watch with nothing in it.
fn sync_all(s: &mut KubeStore) {
    for i in 0..watches().len() {
        s.init(i);
        s.init_done(i);
    }
    assert!(s.all_synced());
}

#[test]
fn api_objects_make_the_same_model_as_manifests() {
    let mut s = store();
    sync_all(&mut s);
    assert!(s.apply(watch("namespaces"), obj(api_item(fixtures::NAMESPACE))).changed());
    // node-1 is "another node" for this store: the same pod arrives through the other watch.
    assert!(s.apply(watch("pods (other nodes)"), obj(api_item(fixtures::POD))).changed());
    assert!(s.apply(watch("services"), obj(api_item(fixtures::SERVICE))).changed());
    assert!(s.apply(watch("endpointslices"), obj(api_item(fixtures::ENDPOINT_SLICE))).changed());
    let from_api = s.build();
    let from_file = Model::from_manifest(&fixtures::all(), Format::Yaml).unwrap();

    assert_eq!(from_api.generation(), 1);
    assert!(from_api.errors().is_empty(), "{:?}", from_api.errors());
    assert_eq!(from_api.namespace("shop"), from_file.namespace("shop"));
    assert_eq!(from_api.pod("shop", "web-7d9c6b5f4-x2x8q"), from_file.pod("shop", "web-7d9c6b5f4-x2x8q"));
    assert_eq!(from_api.service("shop", "web"), from_file.service("shop", "web"));
    assert_eq!(from_api.endpoint_slice("shop", "web-abcde"), from_file.endpoint_slice("shop", "web-abcde"));
    // And so the indexes the data path reads agree.
    let ip = "10.96.0.10".parse().unwrap();
    assert_eq!(from_api.service_for(ip, 80), from_file.service_for(ip, 80));
    let mut a = from_api.view();
    let mut b = from_file.view();
    a.generation = 0;
    b.generation = 0;
    assert_eq!(a, b);
}

#[test]
fn nothing_is_published_from_half_a_start() {
    let mut s = store();
    assert!(!s.all_synced());
    assert_eq!(s.pending().len(), watches().len());
    let optional = [
        "authorizationpolicies",
        "httproutes",
        "grpcroutes",
        "trafficpolicies",
        "serviceentries",
        "virtualservices",
        "peerauthentications",
        "requestauthentications",
        "destinationrules",
    ];
    for (i, w) in watches().iter().enumerate() {
        assert_eq!(w.optional, optional.contains(&w.label), "{}", w.label);
        if !w.optional {
            s.init(i);
            s.init_done(i);
        }
    }
    assert!(!s.all_synced());
    assert_eq!(s.pending(), optional);
    // The CRDs are not installed: that completes the start, with no policies, no routes, no
    // TrafficPolicies, no ServiceEntries and no Istio authentication resources.
    for label in optional {
        assert!(s.absent(watch(label)).changed(), "the first answer counts as synced");
    }
    assert!(s.all_synced());
    let p = watch("authorizationpolicies");
    assert!(!s.absent(p).changed(), "still absent: nothing new");
}

#[test]
fn a_pod_without_an_ip_is_not_in_the_model_yet() {
    let mut s = store();
    sync_all(&mut s);
    let local = watch("pods (this node)");
    let mut pending = api_item(&fixtures::pod("shop", "new", "node-1", "10.244.1.50"));
    pending["status"] =
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]});
    assert!(!s.apply(local, obj(pending.clone())).changed());
    let m = s.build();
    assert!(m.pod("shop", "new").is_none());
    assert!(m.errors().is_empty(), "an unstarted pod is not an error: {:?}", m.errors());

    let mut running = pending;
    running["status"] =
        json!({"phase": "Running", "podIP": "10.244.1.50", "podIPs": [{"ip": "10.244.1.50"}]});
    assert!(s.apply(local, obj(running)).changed());
    assert_eq!(s.build().pod("shop", "new").unwrap().ip.to_string(), "10.244.1.50");
}

#[test]
fn status_churn_that_sluice_ignores_changes_nothing() {
    let mut s = store();
    sync_all(&mut s);
    let local = watch("pods (this node)");
    let pod = api_item(fixtures::POD);
    assert!(s.apply(local, obj(pod.clone())).changed());
    let mut churned = pod;
    churned["metadata"]["resourceVersion"] = json!("99999");
    churned["status"]["conditions"][0]["lastTransitionTime"] = json!("2024-05-02T11:00:00Z");
    assert!(!s.apply(local, obj(churned)).changed(), "same distilled pod: no rebuild");
}

#[test]
fn an_invalid_version_keeps_the_last_good_one_and_is_reported() {
    let mut s = store();
    sync_all(&mut s);
    let svc = watch("services");
    assert!(s.apply(svc, obj(api_item(fixtures::SERVICE))).changed());
    let mut bad = api_item(fixtures::SERVICE);
    bad["spec"]["clusterIP"] = json!("10.96.0.999");
    assert!(s.apply(svc, obj(bad.clone())).changed());
    let m = s.build();
    assert_eq!(
        m.service("shop", "web").unwrap().cluster_ip.unwrap().to_string(),
        "10.96.0.10",
        "last good stays"
    );
    assert_eq!(m.errors().len(), 1);
    assert_eq!(m.errors()[0].file.to_str(), Some("kubernetes:Service/shop/web"));
    assert!(m.errors()[0].reason.contains("spec.clusterIP"), "{}", m.errors()[0].reason);
    assert!(!s.apply(svc, obj(bad)).changed(), "the same problem again is no change");

    // A brand-new object that is invalid: reported, not in the model.
    let mut new_bad = api_item(fixtures::SERVICE);
    new_bad["metadata"]["name"] = json!("other");
    new_bad["spec"]["ports"][0]["port"] = json!(0);
    s.apply(svc, obj(new_bad));
    let m = s.build();
    assert!(m.service("shop", "other").is_none());
    let sources: Vec<_> = m.errors().iter().map(|e| e.file.display().to_string()).collect();
    assert_eq!(sources, ["kubernetes:Service/shop/other", "kubernetes:Service/shop/web"]);

    // Fixed: the error goes, the new version is in force.
    let mut fixed = api_item(fixtures::SERVICE);
    fixed["spec"]["clusterIP"] = json!("10.96.0.11");
    // The API server keeps clusterIPs[0] equal to clusterIP.
    fixed["spec"]["clusterIPs"] = json!(["10.96.0.11"]);
    s.apply(svc, obj(fixed));
    s.delete(svc, &obj(json!({"metadata": {"name": "other", "namespace": "shop"}})));
    let m = s.build();
    assert!(m.errors().is_empty(), "{:?}", m.errors());
    assert_eq!(m.service("shop", "web").unwrap().cluster_ip.unwrap().to_string(), "10.96.0.11");
}

#[test]
fn cluster_scoped_objects_are_named_without_a_namespace() {
    let mut s = store();
    sync_all(&mut s);
    let mut ns = api_item(fixtures::NAMESPACE);
    ns["metadata"]["annotations"]["sluice.dev/peer-authentication"] = json!("STRICTER");
    s.apply(watch("namespaces"), obj(ns));
    let m = s.build();
    assert_eq!(m.errors()[0].file.to_str(), Some("kubernetes:Namespace/shop"));
}

#[test]
fn a_relist_replaces_the_watch_state_when_complete() {
    let mut s = store();
    sync_all(&mut s);
    let local = watch("pods (this node)");
    let remote = watch("pods (other nodes)");
    for name in ["a", "b", "c"] {
        s.apply(local, obj(through_kube(pod_json("shop", name, "node-1", "10.244.1.1"))));
    }
    s.apply(remote, obj(through_kube(pod_json("shop", "far", "node-2", "10.244.2.1"))));
    assert_eq!(s.build().pods().count(), 4);

    // 410 Gone → relist of the local pods: b was deleted and d created while we were away.
    s.init(local);
    s.init_apply(local, obj(through_kube(pod_json("shop", "a", "node-1", "10.244.1.1"))));
    s.init_apply(local, obj(through_kube(pod_json("shop", "c", "node-1", "10.244.1.3"))));
    // Mid-relist, the model is still the old one: never half a list.
    assert_eq!(names(&s.build()), ["a", "b", "c", "far"]);
    s.init_apply(local, obj(through_kube(pod_json("shop", "d", "node-1", "10.244.1.4"))));
    assert!(s.init_done(local).changed());
    let m = s.build();
    assert_eq!(names(&m), ["a", "c", "d", "far"], "the other watch's pods are untouched");
    assert_eq!(m.pod("shop", "c").unwrap().ip.to_string(), "10.244.1.3");

    // The same list again changes nothing.
    s.init(local);
    for (n, ip) in [("a", "10.244.1.1"), ("c", "10.244.1.3"), ("d", "10.244.1.4")] {
        s.init_apply(local, obj(through_kube(pod_json("shop", n, "node-1", ip))));
    }
    assert!(!s.init_done(local).changed());
}

#[test]
fn a_relist_keeps_the_last_good_version_of_an_object_that_became_invalid() {
    let mut s = store();
    sync_all(&mut s);
    let svc = watch("services");
    s.apply(svc, obj(api_item(fixtures::SERVICE)));
    let mut bad = api_item(fixtures::SERVICE);
    bad["spec"]["ports"] = json!([{"port": 80}, {"port": 81}]);
    s.init(svc);
    s.init_apply(svc, obj(bad));
    s.init_done(svc);
    let m = s.build();
    assert_eq!(m.service("shop", "web").unwrap().ports.len(), 2, "last good version");
    assert!(m.errors()[0].reason.contains("must have a name"), "{:?}", m.errors());
}

#[test]
fn a_crd_that_goes_away_takes_its_objects_with_it() {
    let mut s = store();
    sync_all(&mut s);
    let p = watch("authorizationpolicies");
    let policy: Value =
        serde_yaml_ng::from_str(&fixtures::policy("shop", "deny-all", "  action: DENY\n  rules:\n  - {}\n"))
            .unwrap();
    assert!(s.apply(p, obj(through_kube(policy))).changed());
    assert_eq!(s.build().authorization_policies("shop").len(), 1);
    assert!(s.absent(p).changed());
    assert!(s.build().authorization_policies("shop").is_empty());
    // Installed again: the relist brings them back.
    s.init(p);
    s.init_done(p);
    assert!(s.all_synced());
}

fn pod_json(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "resourceVersion": "1"},
        "spec": {"nodeName": node, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": ip},
    })
}

fn names(m: &Model) -> Vec<String> {
    let mut v: Vec<String> = m.pods().map(|p| p.name.clone()).collect();
    v.sort();
    v
}

/// What `spawn` says when it cannot get a first complete list: what it waited for, and why.
#[test]
fn spawn_fails_clearly_without_an_api_server() {
    for url in ["http://127.0.0.1:1", "https://127.0.0.1:1"] {
        let config = KubeConfig {
            api_url: Some(url.into()),
            sync_timeout: std::time::Duration::from_millis(1500),
            ..KubeConfig::default()
        };
        let err = KubeSource::spawn(config, "node-1", |_| panic!("nothing to publish")).unwrap_err();
        let KubeError::SyncTimeout { pending, last_error, .. } = &err else { panic!("{err}") };
        assert_eq!(pending.len(), watches().len(), "{err}");
        assert!(last_error.is_some(), "the connection error is named: {err}");
        assert!(err.to_string().contains(url), "{err}");
    }
    let bad = KubeConfig { api_url: Some("not a url".into()), ..KubeConfig::default() };
    assert!(matches!(KubeSource::spawn(bad, "node-1", |_| {}), Err(KubeError::BadUrl { .. })));
}

/// An AuthorizationPolicy as the API server sends it (custom resources: keys sorted, so
/// `annotations` comes before `name`), with `spec` as given (raw JSON text).
fn policy_text(name: &str, annotation: &str, spec: &str) -> String {
    format!(
        r#"{{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{{"annotations":{{"note":"{annotation}"}},"name":"{name}","namespace":"shop","resourceVersion":"7","uid":"u-{name}"}},"spec":{spec}}}"#
    )
}

fn nested(depth: usize) -> String {
    format!(r#"{{"x":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth))
}

/// What kube-client does with a list body: decode it whole. With `DynamicObject`, one object
/// nested past serde_json's 128 levels failed the whole list, forever (the watch never synced);
/// with `ApiObject` the list decodes, and the deep or oversized objects are refused by name.
#[test]
fn deep_and_oversized_objects_are_refused_by_name_and_the_list_goes_on() {
    use ::kube::api::DynamicObject;
    use ::kube::core::ObjectList;
    let good = policy_text("good", "n", r#"{"action":"DENY","rules":[{}]}"#);
    let deep = policy_text("deep", "n", &nested(1000));
    let big = policy_text("big", &"x".repeat(4 << 20), "{}");
    let many = policy_text("many", "n", &format!("[{}0]", "0,".repeat(300_000)));
    let list = format!(
        r#"{{"kind":"AuthorizationPolicyList","apiVersion":"security.istio.io/v1","metadata":{{"resourceVersion":"9"}},"items":[{good},{deep},{big},{many}]}}"#
    );
    assert!(serde_json::from_str::<ObjectList<DynamicObject>>(&list).is_err(), "the old way fails the list");

    let decoded: ObjectList<ApiObject> = serde_json::from_str(&list).expect("the list decodes");
    let outcome: Vec<(Option<String>, Option<String>, Option<String>)> = decoded
        .items
        .iter()
        .map(|o| {
            use ::kube::core::Resource;
            (o.meta().name.clone(), o.meta().resource_version.clone(), o.refused().map(|e| e.to_string()))
        })
        .collect();
    let seven = Some("7".to_owned());
    assert_eq!(
        outcome,
        [
            (Some("good".into()), seven.clone(), None),
            (Some("deep".into()), seven.clone(), Some("the object exceeds sluice's nesting limit: more than 100 levels deep".into())),
            (Some("big".into()), seven.clone(), Some("the object exceeds sluice's size limit: more than 3 MiB".into())),
            (
                Some("many".into()),
                seven.clone(),
                Some("the object exceeds sluice's node limit: more than 200000 keys, values and list items (YAML aliases count as what they expand to)".into())
            ),
        ]
    );
    // Nothing of a refused object is kept but what names it.
    assert_eq!(
        decoded.items[2].json()["metadata"],
        json!({"name": "big", "namespace": "shop", "resourceVersion": "7", "uid": "u-big"})
    );
    assert_eq!(decoded.items[2].json().get("spec"), None);
}

/// A watch event streams its object when `type` comes first, as kube-apiserver writes it, so a
/// deep object is refused by name there too; an ordinary object decodes in either order.
#[test]
fn watch_events_refuse_deep_objects_by_name() {
    use ::kube::core::{Resource, WatchEvent};
    let deep = policy_text("deep", "n", &nested(5000));
    let event: WatchEvent<ApiObject> =
        serde_json::from_str(&format!(r#"{{"type":"MODIFIED","object":{deep}}}"#))
            .expect("the event decodes");
    let WatchEvent::Modified(o) = event else { panic!("a MODIFIED event") };
    assert_eq!(o.meta().name.as_deref(), Some("deep"));
    assert!(o.refused().is_some_and(|e| e.to_string().contains("nesting limit")));

    let good = policy_text("good", "n", "{}");
    let event: WatchEvent<ApiObject> =
        serde_json::from_str(&format!(r#"{{"object":{good},"type":"ADDED"}}"#)).unwrap();
    let WatchEvent::Added(o) = event else { panic!("an ADDED event") };
    assert!(o.refused().is_none() && o.meta().name.as_deref() == Some("good"));
}

/// In the store, a refused object is an invalid version like any other: reported as
/// `kubernetes:<Kind>/<ns>/<name>` with the limit, its last good version kept; a pod too (it is
/// not mistaken for a pod without an IP).
#[test]
fn refused_objects_are_reported_and_their_last_good_version_kept() {
    let mut s = store();
    sync_all(&mut s);
    let ap = watch("authorizationpolicies");
    let decode = |text: &str| serde_json::from_str::<ApiObject>(text).unwrap();
    assert!(s.apply(ap, decode(&policy_text("p", "n", r#"{"action":"DENY","rules":[{}]}"#))).changed());
    assert!(s.apply(ap, decode(&policy_text("p", "n", &nested(300)))).changed());
    let pod = format!(
        r#"{{"metadata":{{"name":"web","namespace":"shop","uid":"u1"}},"spec":{{"nodeName":"node-1","x":{}}},"status":{{"podIP":"10.244.1.9"}}}}"#,
        nested(300)
    );
    assert!(s.apply(watch("pods (this node)"), decode(&pod)).changed());
    let m = s.build();
    let errors: Vec<(String, String)> =
        m.errors().iter().map(|e| (e.file.display().to_string(), e.reason.clone())).collect();
    let reason = "the object exceeds sluice's nesting limit: more than 100 levels deep".to_owned();
    assert_eq!(
        errors,
        [
            ("kubernetes:AuthorizationPolicy/shop/p".to_owned(), reason.clone()),
            ("kubernetes:Pod/shop/web".to_owned(), reason.clone()),
        ]
    );
    assert_eq!(m.authorization_policies("shop").len(), 1, "the last good version stays in force");
    // Fixed: the error goes.
    assert!(s.apply(ap, decode(&policy_text("p", "n", r#"{"action":"ALLOW"}"#))).changed());
    assert_eq!(s.build().errors().len(), 1);
}
