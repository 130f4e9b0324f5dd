//! The Kubernetes source's state: per watch, per object, the last good parse and the current
//! problem, and the rules that turn them into a [`Model`].
//!
//! - Every object goes through the manifest parsers ([`manifest::parse_json_object`]), so an
//!   API object and the same object in a manifest file become the same model object. One that
//!   [`ApiObject`] refused (over a limit) is an invalid version like any other.
//! - An object whose latest version fails validation keeps its last good version in force and
//!   is listed in `Model::errors` as `kubernetes:<Kind>/<namespace>/<name>`; each distinct
//!   problem is logged once.
//! - A relist (after `410 Gone`, or the first list) is buffered and swapped in whole at its end:
//!   objects missing from it were deleted while we were not watching. Until then the previous
//!   state stays in force, so no snapshot is ever built from half a list.
//! - A change that leaves the distilled object equal (a pod's conditions, a container restart
//!   count, managedFields) changes nothing and triggers no rebuild: on a busy cluster most pod
//!   updates are of that sort.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use serde_json::Value;
use tracing::{debug, info, warn};

use super::object::ApiObject;
use super::resources::WatchSpec;
use crate::discovery::limits::COUNTERS;
use crate::discovery::manifest;
use crate::discovery::model::{Kind, Object};
use crate::discovery::snapshot::{ManifestError, Model};

/// `(namespace, name)`; the namespace is "" for cluster-scoped kinds.
pub(crate) type ObjKey = (String, String);

#[derive(Debug, Clone, Default)]
struct Entry {
    /// The last version that passed validation; `None` if none ever did.
    good: Option<Object>,
    /// Why the latest version is not in force.
    error: Option<String>,
}

/// One watch (a resource with a selector) and what it has seen.
struct Stream {
    spec: WatchSpec,
    objects: BTreeMap<ObjKey, Entry>,
    /// Between `Init` and `InitDone`: the relist being collected.
    relist: Option<BTreeMap<ObjKey, Entry>>,
    /// A complete list has been seen at least once (or the resource is known not to exist).
    synced: bool,
    /// The API server does not serve the resource (an optional CRD that is not installed).
    absent: bool,
}

/// What applying one watch event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The model changes (an object, or the error list).
    Changed,
    Unchanged,
}

impl Applied {
    fn from(changed: bool) -> Applied {
        if changed {
            Applied::Changed
        } else {
            Applied::Unchanged
        }
    }

    pub fn changed(self) -> bool {
        self == Applied::Changed
    }
}

pub(crate) struct KubeStore {
    streams: Vec<Stream>,
    generation: u64,
    /// Problems already logged, by (source, reason): logged again only once they went away and
    /// came back.
    reported: HashSet<(String, String)>,
}

impl KubeStore {
    pub fn new(specs: &[WatchSpec]) -> KubeStore {
        KubeStore {
            streams: specs
                .iter()
                .map(|spec| Stream {
                    spec: spec.clone(),
                    objects: BTreeMap::new(),
                    relist: None,
                    synced: false,
                    absent: false,
                })
                .collect(),
            generation: 0,
            reported: HashSet::new(),
        }
    }

    pub fn all_synced(&self) -> bool {
        self.streams.iter().all(|s| s.synced)
    }

    /// Labels of the watches that have not completed a list yet (for the start-up timeout).
    pub fn pending(&self) -> Vec<&'static str> {
        self.streams.iter().filter(|s| !s.synced).map(|s| s.spec.label).collect()
    }

    pub fn object_count(&self) -> usize {
        self.streams.iter().map(|s| s.objects.len()).sum()
    }

    /// An added or modified object (outside a relist).
    pub fn apply(&mut self, watch: usize, object: ApiObject) -> Applied {
        let stream = &mut self.streams[watch];
        let Some(key) = object_key(object.json(), &stream.spec) else {
            warn!(watch = stream.spec.label, "object without metadata.name ignored");
            return Applied::Unchanged;
        };
        let old = stream.objects.get(&key);
        match update(old, object, &stream.spec) {
            None => Applied::from(stream.objects.remove(&key).is_some()),
            Some(entry) => {
                let changed = old.is_none_or(|o| !same(o, &entry));
                stream.objects.insert(key, entry);
                Applied::from(changed)
            }
        }
    }

    /// A deleted object. The object in a DELETED event is its last state; only its key matters.
    pub fn delete(&mut self, watch: usize, object: &ApiObject) -> Applied {
        let stream = &mut self.streams[watch];
        let Some(key) = object_key(object.json(), &stream.spec) else {
            return Applied::Unchanged;
        };
        Applied::from(stream.objects.remove(&key).is_some())
    }

    /// A (re)list starts: collect it aside until [`KubeStore::init_done`].
    pub fn init(&mut self, watch: usize) {
        self.streams[watch].relist = Some(BTreeMap::new());
    }

    /// One object of the list in progress.
    pub fn init_apply(&mut self, watch: usize, object: ApiObject) {
        let stream = &mut self.streams[watch];
        let Some(key) = object_key(object.json(), &stream.spec) else {
            warn!(watch = stream.spec.label, "listed object without metadata.name ignored");
            return;
        };
        // The previous state of the object carries its last good version across the relist.
        let old = stream.objects.get(&key);
        if let Some(entry) = update(old, object, &stream.spec) {
            stream.relist.get_or_insert_with(BTreeMap::new).insert(key, entry);
        }
    }

    /// The list is complete: it replaces what the watch knew. Objects it does not list were
    /// deleted while the watch was not looking.
    pub fn init_done(&mut self, watch: usize) -> Applied {
        let stream = &mut self.streams[watch];
        let relisted = stream.relist.take().unwrap_or_default();
        let first = !stream.synced;
        let was_absent = stream.absent;
        stream.synced = true;
        stream.absent = false;
        if was_absent {
            info!(watch = stream.spec.label, "the API server serves this resource now");
        }
        let changed = stream.objects.len() != relisted.len()
            || stream.objects.iter().zip(&relisted).any(|((ka, a), (kb, b))| ka != kb || !same(a, b));
        let deleted = stream.objects.keys().filter(|k| !relisted.contains_key(*k)).count();
        if first {
            debug!(watch = stream.spec.label, objects = relisted.len(), "initial list complete");
        } else {
            info!(watch = stream.spec.label, objects = relisted.len(), deleted, changed, "relist complete");
        }
        stream.objects = relisted;
        Applied::from(changed || first)
    }

    /// The API server does not serve the resource (404 on the list). For an optional resource
    /// this counts as synced and empty: the model goes on without it, and if the resource
    /// existed before (its CRD was deleted), its objects went with it.
    pub fn absent(&mut self, watch: usize) -> Applied {
        let stream = &mut self.streams[watch];
        stream.relist = None;
        let first = !stream.synced;
        stream.synced = true;
        if !stream.absent {
            stream.absent = true;
            warn!(
                watch = stream.spec.label,
                "the API server does not serve {} ({}); carrying on without them (they are picked up once the CRD is installed)",
                stream.spec.resource.plural,
                stream.spec.resource.api_version,
            );
        }
        let had = !stream.objects.is_empty();
        stream.objects.clear();
        Applied::from(had || first)
    }

    /// Builds the next snapshot (generation + 1), logging problems not logged before.
    pub fn build(&mut self) -> Model {
        self.generation += 1;
        let mut objects = Vec::with_capacity(self.object_count());
        let mut errors = Vec::new();
        for stream in &self.streams {
            for (key, entry) in &stream.objects {
                if let Some(good) = &entry.good {
                    objects.push(good.clone());
                }
                if let Some(reason) = &entry.error {
                    errors.push(ManifestError {
                        file: source_name(stream.spec.kind, key),
                        reason: reason.clone(),
                    });
                }
            }
        }
        errors.sort_by(|a, b| a.file.cmp(&b.file));
        let mut reported = HashSet::with_capacity(errors.len());
        for e in &errors {
            let key = (e.file.display().to_string(), e.reason.clone());
            if !self.reported.contains(&key) {
                warn!(object = %key.0, reason = %key.1, "Kubernetes object rejected; its last good version (if any) stays in force");
            }
            reported.insert(key);
        }
        self.reported = reported;
        Model::build(objects, errors, self.generation)
    }
}

/// How an object is named in `Model::errors` and the admin API: `kubernetes:Pod/shop/web-1`,
/// `kubernetes:Namespace/shop`.
pub(crate) fn source_name(kind: Kind, (namespace, name): &ObjKey) -> PathBuf {
    if namespace.is_empty() {
        PathBuf::from(format!("kubernetes:{kind}/{name}"))
    } else {
        PathBuf::from(format!("kubernetes:{kind}/{namespace}/{name}"))
    }
}

fn object_key(object: &Value, spec: &WatchSpec) -> Option<ObjKey> {
    let meta = object.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_owned();
    let namespace = if spec.namespaced {
        meta.get("namespace").and_then(Value::as_str).unwrap_or("default").to_owned()
    } else {
        String::new()
    };
    Some((namespace, name))
}

/// Whether two entries would give the same model.
fn same(a: &Entry, b: &Entry) -> bool {
    a.good == b.good && a.error == b.error
}

/// The entry for a new version of an object, given the previous one. `None` when the object is
/// not (or no longer) part of the model at all.
fn update(old: Option<&Entry>, object: ApiObject, spec: &WatchSpec) -> Option<Entry> {
    if let Some(refused) = object.refused() {
        COUNTERS.count_refused();
        return Some(Entry { good: old.and_then(|o| o.good.clone()), error: Some(refused.to_string()) });
    }
    let mut object = object.into_json();
    // A pod gets its IP only once its sandbox runs: until then it cannot be addressed, enrolled
    // or matched to an endpoint, so it is simply not in the model yet. That is the normal life
    // of a pod, not an invalid object, so it is not reported.
    if spec.kind == Kind::Pod && !has_pod_ip(&object) {
        return None;
    }
    // List items of built-in kinds come without apiVersion and kind (the list says them once);
    // the parsers need them, and the watch already says what they are.
    if let Some(map) = object.as_object_mut() {
        map.insert("apiVersion".into(), Value::String(spec.resource.api_version.clone()));
        map.insert("kind".into(), Value::String(spec.resource.kind.clone()));
    }
    match manifest::parse_json_object(object) {
        Ok(parsed) => Some(Entry { good: Some(parsed), error: None }),
        Err(e) => Some(Entry { good: old.and_then(|o| o.good.clone()), error: Some(e.to_string()) }),
    }
}

fn has_pod_ip(pod: &Value) -> bool {
    pod.pointer("/status/podIP").and_then(Value::as_str).is_some_and(|ip| !ip.is_empty())
}
