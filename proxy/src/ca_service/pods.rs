//! The CA's own view of the cluster's pods: which (namespace, ServiceAccount) has a pod
//! scheduled on which node, from its own list/watch of every pod.
//!
//! A pod counts for its node from the moment it is scheduled (`spec.nodeName` set) until it has
//! finished (phase `Succeeded` or `Failed`) or is gone: a `Pending` pod needs its certificate
//! before its containers start talking, and a pod being deleted still runs until it is removed
//! (its connections drain with their certificates). The index also keeps every pod by name,
//! for callers whose token is bound to a pod rather than a node.
//!
//! Only pods that a node agent could ever serve hold an identity on their node (see
//! [`PodRecord::holds_identity`]): not a mirror pod (the kubelet creates those from static
//! manifests in any namespace, without the API server's admission, and they name no
//! ServiceAccount), not a pod without a `serviceAccountName` (the API server fills it in for
//! every other pod; an empty one is never taken to mean `default`), and not a host-network pod
//! (sluice never enrolls one: its traffic is the node's). Otherwise every node would hold the
//! identities of the DaemonSets' and static pods' accounts that run everywhere, the node
//! agent's own among them.
//!
//! The watch reuses the Kubernetes source's pieces: kube-runtime's `watcher` (paginated list,
//! bookmarks, resume, relist after `410 Gone`, backoff) and [`ApiObject`], which refuses an
//! object over the manifest limits without building it. Each pod is distilled to a
//! [`PodRecord`] (a few short strings) as it arrives, so memory is proportional to the number
//! of pods, which the API server bounds. A relist is collected aside and swapped in whole.
//!
//! A view that stops being followed is not trusted forever: once the watch has failed for
//! [`STALE_AFTER`] without a success in between, the store says so ([`PodStore::readiness`]) and
//! the CA refuses (`UNAVAILABLE`) rather than sign from pods that may have moved or gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ::kube::api::Api;
use ::kube::runtime::watcher::{self, watcher, Event};
use ::kube::runtime::WatchStreamExt;
use ::kube::Resource;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::discovery::kube::ApiObject;

/// `(namespace, name)` of a pod, or `(namespace, serviceAccount)` of an identity.
type Pair = (String, String);

/// A watch failing for this long, with no success in between, makes the CA unready.
pub const STALE_AFTER: Duration = Duration::from_secs(60);
/// The annotation the kubelet puts on the API object of a static pod (a "mirror pod").
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the CA keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    /// `spec.serviceAccountName`; `None` when missing or empty (a mirror pod, or an object
    /// written without admission): such a pod holds no identity, never `default`'s.
    pub service_account: Option<String>,
    /// Phase `Succeeded` or `Failed`.
    pub finished: bool,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// Annotated `kubernetes.io/config.mirror`: the kubelet's copy of a static pod.
    pub mirror: bool,
    /// Its controller (the owner reference with `controller: true`) is a DaemonSet.
    pub daemonset_owned: bool,
}

impl PodRecord {
    /// Whether this pod is on a node now: scheduled and not finished.
    pub fn active(&self) -> bool {
        self.node.is_some() && !self.finished
    }

    /// Whether this pod's identity may be signed for its node (see the module documentation).
    pub fn holds_identity(&self) -> bool {
        self.active() && !self.mirror && !self.host_network && self.service_account.is_some()
    }

    /// Distills a Pod object. `None` if it has no name or namespace (never from an API server).
    pub fn from_json(pod: &Value) -> Option<PodRecord> {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let meta = pod.get("metadata");
        let spec = pod.get("spec");
        let daemonset_owned =
            meta.and_then(|m| m.get("ownerReferences")).and_then(Value::as_array).is_some_and(|owners| {
                owners.iter().any(|o| {
                    o.get("controller").and_then(Value::as_bool) == Some(true)
                        && o.get("kind").and_then(Value::as_str) == Some("DaemonSet")
                })
            });
        Some(PodRecord {
            namespace: s(meta.and_then(|m| m.get("namespace")))?,
            name: s(meta.and_then(|m| m.get("name")))?,
            uid: s(meta.and_then(|m| m.get("uid"))).unwrap_or_default(),
            node: s(spec.and_then(|m| m.get("nodeName"))),
            service_account: s(spec.and_then(|m| m.get("serviceAccountName"))),
            finished: matches!(
                pod.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            ),
            host_network: spec.and_then(|m| m.get("hostNetwork")).and_then(Value::as_bool) == Some(true),
            mirror: meta.and_then(|m| m.get("annotations")).and_then(|a| a.get(MIRROR_ANNOTATION)).is_some(),
            daemonset_owned,
        })
    }
}

/// Pods by name, and active identities by node.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<Pair, PodRecord>,
    /// node → (namespace, serviceAccount) → active pods.
    by_node: HashMap<String, HashMap<Pair, u32>>,
    /// (namespace, serviceAccount) → active pods on any node.
    by_identity: HashMap<Pair, u32>,
}

impl PodIndex {
    pub fn from_pods(pods: impl IntoIterator<Item = PodRecord>) -> PodIndex {
        let mut index = PodIndex::default();
        for pod in pods {
            index.apply(pod);
        }
        index
    }

    /// Adds or updates a pod.
    pub fn apply(&mut self, pod: PodRecord) {
        let key = (pod.namespace.clone(), pod.name.clone());
        if let Some(old) = self.pods.remove(&key) {
            self.count(&old, false);
        }
        self.count(&pod, true);
        self.pods.insert(key, pod);
    }

    pub fn remove(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.pods.remove(&(namespace.to_string(), name.to_string())) {
            self.count(&old, false);
        }
    }

    fn count(&mut self, pod: &PodRecord, add: bool) {
        if !pod.holds_identity() {
            return;
        }
        let (Some(node), Some(service_account)) = (&pod.node, &pod.service_account) else { return };
        let identity = (pod.namespace.clone(), service_account.clone());
        fn bump<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K, add: bool) {
            if add {
                *map.entry(key).or_default() += 1;
            } else if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        if add {
            bump(self.by_node.entry(node.clone()).or_default(), identity.clone(), true);
        } else if let Some(on_node) = self.by_node.get_mut(node) {
            bump(on_node, identity.clone(), false);
            if on_node.is_empty() {
                self.by_node.remove(node);
            }
        }
        bump(&mut self.by_identity, identity, add);
    }

    /// An active pod of `namespace`/`service_account` is scheduled on `node`.
    pub fn on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.by_node
            .get(node)
            .is_some_and(|ids| ids.contains_key(&(namespace.to_string(), service_account.to_string())))
    }

    /// An active pod of `namespace`/`service_account` is scheduled on some node.
    pub fn anywhere(&self, namespace: &str, service_account: &str) -> bool {
        self.by_identity.contains_key(&(namespace.to_string(), service_account.to_string()))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodRecord> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// The index shared by the watch (writer) and the request handlers (readers), and whether the
/// first complete list is in.
pub struct PodStore {
    index: RwLock<PodIndex>,
    synced: AtomicBool,
    synced_tx: watch::Sender<bool>,
    /// Since when the watch has been failing, with no success in between.
    failing_since: Mutex<Option<Instant>>,
}

impl Default for PodStore {
    fn default() -> Self {
        PodStore {
            index: RwLock::default(),
            synced: AtomicBool::new(false),
            synced_tx: watch::channel(false).0,
            failing_since: Mutex::new(None),
        }
    }
}

/// Whether the CA may decide from the store now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// The first complete list is not in yet.
    NotSynced,
    /// The watch has been failing for this long (at least [`STALE_AFTER`]).
    Stale(Duration),
}

impl PodStore {
    /// A store already synced with `pods` (tests, and anything that is not a watch).
    pub fn with_pods(pods: impl IntoIterator<Item = PodRecord>) -> PodStore {
        let store = PodStore::default();
        store.replace(PodIndex::from_pods(pods));
        store
    }

    /// Reads the index. Held only for a lookup: the watch waits for readers, never the reverse.
    pub fn read<T>(&self, f: impl FnOnce(&PodIndex) -> T) -> T {
        f(&self.index.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn write(&self, f: impl FnOnce(&mut PodIndex)) {
        f(&mut self.index.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// Swaps in a complete list; the store is synced from then on.
    pub fn replace(&self, index: PodIndex) {
        self.write(|current| *current = index);
        if !self.synced.swap(true, Ordering::SeqCst) {
            self.synced_tx.send_replace(true);
        }
    }

    pub fn apply(&self, pod: PodRecord) {
        self.write(|index| index.apply(pod));
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.write(|index| index.remove(namespace, name));
    }

    /// The first complete list of pods is in.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// The watch failed at `now` (the first failure of a run is the one that counts).
    pub fn watch_failed(&self, now: Instant) {
        self.failing_since.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(now);
    }

    /// The watch delivered something: it is being followed again.
    pub fn watch_succeeded(&self) {
        *self.failing_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Synced, and not failing for [`STALE_AFTER`] or more at `now`.
    pub fn readiness(&self, now: Instant) -> Readiness {
        if !self.synced() {
            return Readiness::NotSynced;
        }
        match *self.failing_since.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(since) if now.saturating_duration_since(since) >= STALE_AFTER => {
                Readiness::Stale(now.saturating_duration_since(since))
            }
            _ => Readiness::Ready,
        }
    }

    /// Resolves once the store is synced.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced_tx.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn len(&self) -> usize {
        self.read(PodIndex::len)
    }

    pub fn is_empty(&self) -> bool {
        self.read(PodIndex::is_empty)
    }
}

/// Lists and watches every pod of the cluster into `store`, forever (errors are retried with
/// the watcher's backoff; the last complete view stays in force meanwhile, for at most
/// [`STALE_AFTER`] of failures in a row: then the store is no longer ready).
pub async fn watch_pods(client: ::kube::Client, store: Arc<PodStore>) {
    let api = Api::<ApiObject>::all_with(client, &::kube::core::ApiResource::erase::<Pod>(&()));
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut relist: Option<Vec<PodRecord>> = None;
    let mut last_error: Option<String> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                store.watch_failed(Instant::now());
                let message = e.to_string();
                if last_error.as_deref() == Some(message.as_str()) {
                    debug!(error = %message, "pod watch failed again; retrying with backoff");
                } else {
                    warn!(error = %message, stale_after_s = STALE_AFTER.as_secs(),
                        "pod watch failed; retrying with backoff, the last view of pods stays in force until the \
                         watch has failed for stale_after_s, then the CA refuses (UNAVAILABLE) until it recovers");
                    last_error = Some(message);
                }
                continue;
            }
        };
        store.watch_succeeded();
        if !matches!(event, Event::Init | Event::InitApply(_)) && last_error.take().is_some() {
            info!("pod watch recovered");
        }
        match event {
            Event::Init => relist = Some(Vec::new()),
            Event::InitApply(obj) => {
                if let (Some(list), Some(pod)) = (relist.as_mut(), record(&obj)) {
                    list.push(pod);
                }
            }
            Event::InitDone => {
                let pods = relist.take().unwrap_or_default();
                let first = !store.synced();
                store.replace(PodIndex::from_pods(pods));
                if first {
                    info!(pods = store.len(), "pod watch synced; the CA is ready");
                } else {
                    debug!(pods = store.len(), "pods relisted");
                }
            }
            Event::Apply(obj) => {
                if let Some(pod) = record(&obj) {
                    store.apply(pod);
                }
            }
            Event::Delete(obj) => {
                let meta = obj.meta();
                if let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) {
                    store.remove(ns, name);
                }
            }
        }
    }
}

/// The record of a watched pod; `None` (logged) for one the decoder refused: its last good
/// version, if any, stays in the index.
fn record(obj: &ApiObject) -> Option<PodRecord> {
    if let Some(refused) = obj.refused() {
        let meta = obj.meta();
        warn!(
            namespace = meta.namespace.as_deref().unwrap_or(""), pod = meta.name.as_deref().unwrap_or(""),
            reason = %refused, "pod object over the size or nesting limits; ignored"
        );
        return None;
    }
    PodRecord::from_json(obj.json())
}

#[cfg(test)]
pub(crate) use tests::{agent_pod as test_agent_pod, pod as test_pod};

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    pub(crate) fn pod(ns: &str, name: &str, sa: &str, node: Option<&str>, phase: &str) -> PodRecord {
        PodRecord::from_json(&json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "serviceAccountName": sa},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    /// A node agent's pod: the sluice DaemonSet's, host network, as the API server has it.
    pub(crate) fn agent_pod(ns: &str, name: &str, node: &str) -> PodRecord {
        PodRecord::from_json(&json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "sluice",
                    "uid": "ds-uid", "controller": true}]},
            "spec": {"nodeName": node, "serviceAccountName": "sluice", "hostNetwork": true},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    #[test]
    fn pods_count_from_scheduling_until_they_finish() {
        let mut index = PodIndex::default();
        index.apply(pod("shop", "web-1", "web", None, "Pending"));
        assert!(!index.anywhere("shop", "web"), "unscheduled pods hold no identity anywhere");
        index.apply(pod("shop", "web-1", "web", Some("n1"), "Pending"));
        assert!(index.on_node("n1", "shop", "web"), "scheduled and pending counts");
        index.apply(pod("shop", "web-1", "web", Some("n1"), "Running"));
        assert!(index.on_node("n1", "shop", "web"));
        assert!(!index.on_node("n2", "shop", "web"));
        index.apply(pod("shop", "web-1", "web", Some("n1"), "Succeeded"));
        assert!(!index.on_node("n1", "shop", "web"), "a finished pod holds nothing");
        assert!(!index.anywhere("shop", "web"));
        assert!(index.pod("shop", "web-1").is_some(), "but it is still known by name");
        index.remove("shop", "web-1");
        assert!(index.is_empty());
        assert!(index.by_node.is_empty() && index.by_identity.is_empty(), "no empty entries are left behind");
    }

    #[test]
    fn several_pods_of_one_identity_are_counted() {
        let mut index = PodIndex::from_pods([
            pod("shop", "web-1", "web", Some("n1"), "Running"),
            pod("shop", "web-2", "web", Some("n1"), "Running"),
            pod("shop", "web-3", "web", Some("n2"), "Running"),
        ]);
        index.remove("shop", "web-1");
        assert!(index.on_node("n1", "shop", "web"), "web-2 is still there");
        index.apply(pod("shop", "web-2", "web", Some("n1"), "Failed"));
        assert!(!index.on_node("n1", "shop", "web"));
        assert!(index.anywhere("shop", "web"), "web-3 on n2");
        index.remove("shop", "web-3");
        assert!(!index.anywhere("shop", "web"));
    }

    #[test]
    fn a_pod_without_a_service_account_holds_no_identity_and_changes_are_followed() {
        // No serviceAccountName: never taken for "default" (finding: a node got
        // ns/<any>/sa/default through the mirror pods the kubelet may create anywhere).
        let p = PodRecord::from_json(
            &json!({"metadata": {"namespace": "a", "name": "p"}, "spec": {"nodeName": "n"}}),
        )
        .unwrap();
        assert_eq!(p.service_account, None);
        assert!(p.active() && !p.holds_identity());
        let mut index = PodIndex::from_pods([p]);
        assert!(!index.on_node("n", "a", "default") && !index.anywhere("a", "default"));
        let empty = PodRecord::from_json(&json!({"metadata": {"namespace": "a", "name": "q"},
            "spec": {"nodeName": "n", "serviceAccountName": ""}}))
        .unwrap();
        index.apply(empty);
        assert!(!index.anywhere("a", "default"), "an empty serviceAccountName is none either");
        index.apply(pod("a", "p", "other", Some("n"), "Running"));
        assert!(index.on_node("n", "a", "other"));
        index.apply(pod("a", "p", "third", Some("n"), "Running"));
        assert!(!index.on_node("n", "a", "other") && index.on_node("n", "a", "third"));
        assert!(PodRecord::from_json(&json!({"metadata": {"name": "p"}})).is_none());
    }

    #[test]
    fn mirror_and_host_network_pods_hold_no_identity() {
        let mirror = PodRecord::from_json(&json!({
            "metadata": {"namespace": "shop", "name": "static-web-n1",
                "annotations": {MIRROR_ANNOTATION: "3f2a"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "web"},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        assert!(mirror.mirror && !mirror.holds_identity());
        let agent = agent_pod("sluice-system", "sluice-a", "n1");
        assert!(agent.host_network && agent.daemonset_owned && !agent.holds_identity());
        let index = PodIndex::from_pods([mirror, agent]);
        assert!(!index.anywhere("shop", "web"), "a static pod's identity is nobody's to sign");
        assert!(
            !index.anywhere("sluice-system", "sluice"),
            "the DaemonSet's own pods (host network, on every node) give no node their identity"
        );
        assert!(index.pod("sluice-system", "sluice-a").is_some(), "but a bound token still finds its pod");
        let owned_by_replicaset = PodRecord::from_json(&json!({
            "metadata": {"namespace": "a", "name": "p", "ownerReferences": [
                {"kind": "ReplicaSet", "name": "x", "controller": true},
                {"kind": "DaemonSet", "name": "y", "controller": false}]},
            "spec": {"nodeName": "n", "serviceAccountName": "sa"}
        }))
        .unwrap();
        assert!(!owned_by_replicaset.daemonset_owned, "only the controller counts");
    }

    #[test]
    fn a_failing_watch_makes_the_store_stale_after_a_while() {
        let store = PodStore::with_pods([pod("a", "p", "sa", Some("n"), "Running")]);
        let t0 = Instant::now();
        assert_eq!(store.readiness(t0), Readiness::Ready);
        store.watch_failed(t0);
        store.watch_failed(t0 + Duration::from_secs(30));
        assert_eq!(
            store.readiness(t0 + Duration::from_secs(59)),
            Readiness::Ready,
            "a short outage is ridden out"
        );
        assert_eq!(
            store.readiness(t0 + Duration::from_secs(61)),
            Readiness::Stale(Duration::from_secs(61)),
            "counted from the first failure of the run"
        );
        store.watch_succeeded();
        assert_eq!(store.readiness(t0 + Duration::from_secs(62)), Readiness::Ready);
        assert_eq!(PodStore::default().readiness(t0), Readiness::NotSynced);
    }

    #[tokio::test]
    async fn the_store_is_synced_by_its_first_complete_list() {
        let store = Arc::new(PodStore::default());
        assert!(!store.synced());
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait_synced().await }
        });
        store.replace(PodIndex::from_pods([pod("a", "p", "sa", Some("n"), "Running")]));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(store.synced());
        assert!(store.read(|i| i.on_node("n", "a", "sa")));
    }
}
