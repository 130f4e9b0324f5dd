//! The CA's own view of the cluster's pods: which (namespace, ServiceAccount) has a pod
//! scheduled on which node, from its own list/watch of every pod.
//!
//! A pod counts for its node from the moment it is scheduled (`spec.nodeName` set) until it has
//! finished (phase `Succeeded` or `Failed`) or is gone: a `Pending` pod needs its certificate
//! before its containers start talking, and a pod being deleted still runs until it is removed
//! (its connections drain with their certificates). The index also keeps every pod by name,
//! for callers whose token is bound to a pod rather than a node.
//!
//! The watch reuses the Kubernetes source's pieces: kube-runtime's `watcher` (paginated list,
//! bookmarks, resume, relist after `410 Gone`, backoff) and [`ApiObject`], which refuses an
//! object over the manifest limits without building it. Each pod is distilled to a
//! [`PodRecord`] (a few short strings) as it arrives, so memory is proportional to the number
//! of pods, which the API server bounds. A relist is collected aside and swapped in whole.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

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

/// What the CA keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    pub service_account: String,
    /// Phase `Succeeded` or `Failed`.
    pub finished: bool,
}

impl PodRecord {
    /// Whether this pod may hold its identity on its node now.
    pub fn active(&self) -> bool {
        self.node.is_some() && !self.finished
    }

    /// Distills a Pod object. `None` if it has no name or namespace (never from an API server).
    pub fn from_json(pod: &Value) -> Option<PodRecord> {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let meta = pod.get("metadata");
        let spec = pod.get("spec");
        Some(PodRecord {
            namespace: s(meta.and_then(|m| m.get("namespace")))?,
            name: s(meta.and_then(|m| m.get("name")))?,
            uid: s(meta.and_then(|m| m.get("uid"))).unwrap_or_default(),
            node: s(spec.and_then(|m| m.get("nodeName"))),
            // The API server fills it in ("default"); an object written by hand may not.
            service_account: s(spec.and_then(|m| m.get("serviceAccountName")))
                .unwrap_or_else(|| "default".to_string()),
            finished: matches!(
                pod.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            ),
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
        let Some(node) = pod.node.as_ref().filter(|_| pod.active()) else { return };
        let identity = (pod.namespace.clone(), pod.service_account.clone());
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
}

impl Default for PodStore {
    fn default() -> Self {
        PodStore {
            index: RwLock::default(),
            synced: AtomicBool::new(false),
            synced_tx: watch::channel(false).0,
        }
    }
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
/// the watcher's backoff; the last complete view stays in force meanwhile).
pub async fn watch_pods(client: ::kube::Client, store: Arc<PodStore>) {
    let api = Api::<ApiObject>::all_with(client, &::kube::core::ApiResource::erase::<Pod>(&()));
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut relist: Option<Vec<PodRecord>> = None;
    let mut last_error: Option<String> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                let message = e.to_string();
                if last_error.as_deref() == Some(message.as_str()) {
                    debug!(error = %message, "pod watch failed again; retrying with backoff");
                } else {
                    warn!(error = %message, "pod watch failed; retrying with backoff, the last view of pods stays in force");
                    last_error = Some(message);
                }
                continue;
            }
        };
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
pub(crate) use tests::pod as test_pod;

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
    fn the_service_account_defaults_and_changes_are_followed() {
        let p = PodRecord::from_json(
            &json!({"metadata": {"namespace": "a", "name": "p"}, "spec": {"nodeName": "n"}}),
        )
        .unwrap();
        assert_eq!(p.service_account, "default");
        assert!(p.active());
        let mut index = PodIndex::from_pods([p]);
        assert!(index.on_node("n", "a", "default"));
        index.apply(pod("a", "p", "other", Some("n"), "Running"));
        assert!(!index.on_node("n", "a", "default") && index.on_node("n", "a", "other"));
        assert!(PodRecord::from_json(&json!({"metadata": {"name": "p"}})).is_none());
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
