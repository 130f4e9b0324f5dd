//! One object from the API server as the watcher hands it over: its JSON, or why it was refused.
//!
//! With kube's `DynamicObject`, serde_json would build whatever the API server sends, up to its
//! recursion limit of 128 levels; past that, kube-client fails the whole list (the watch then
//! never syncs, and sluice never starts) or drops the watch event with an anonymous error. A CRD
//! that keeps unknown fields (Istio's keep `spec` open) lets anyone who may create one such
//! object do that to every node. [`ApiObject`] builds the JSON itself within [`Limits`] (the
//! manifest directory's): past the depth limit, or beyond the node or size limit, it skips the
//! rest without building it (serde_json skips iteratively, at any depth) and keeps only the
//! object's name, namespace, resourceVersion and uid. The object is then reported by name like
//! any other invalid object, and the list or watch goes on.
//!
//! A watch event's object streams through this decoder because kube-apiserver writes `type`
//! before `object`; in the other order serde would buffer the object first, within serde_json's
//! 128 levels (an ordinary object still decodes; a too-deep one would fail the event as before).

use std::borrow::Cow;
use std::fmt;

use ::kube::core::{ApiResource, DynamicResourceScope, Resource};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::discovery::limits::{Exceeded, LimitError, Limits};

/// An object of a watched resource (any kind: the watch's `ApiResource` says which).
#[derive(Debug, Clone)]
pub(crate) struct ApiObject {
    /// Name, namespace and resourceVersion (what the watcher and the store need).
    metadata: ObjectMeta,
    /// The whole object; only its metadata when refused.
    json: Value,
    refused: Option<LimitError>,
}

impl ApiObject {
    /// Builds an object from a JSON value already in memory (tests), through the same limits.
    #[cfg(test)]
    pub fn from_json(value: Value) -> Result<ApiObject, serde_json::Error> {
        ApiObject::deserialize(value)
    }

    pub fn json(&self) -> &Value {
        &self.json
    }

    pub fn into_json(self) -> Value {
        self.json
    }

    /// Why the object was not built, if it was not.
    pub fn refused(&self) -> Option<&LimitError> {
        self.refused.as_ref()
    }
}

impl<'de> Deserialize<'de> for ApiObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut budget = Budget { limits: Limits::DEFAULT, nodes: 0, bytes: 0, exceeded: None };
        let json = Bounded { budget: &mut budget, depth: 0, part: Part::Root }.deserialize(deserializer)?;
        let refused = budget.exceeded.map(|exceeded| LimitError { exceeded, at: None });
        let meta = json.get("metadata");
        let field = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str).map(str::to_owned);
        let metadata = ObjectMeta {
            name: field("name"),
            namespace: field("namespace"),
            resource_version: field("resourceVersion"),
            uid: field("uid"),
            ..ObjectMeta::default()
        };
        Ok(ApiObject { metadata, json, refused })
    }
}

impl Resource for ApiObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What one object has used of its limits so far.
struct Budget {
    limits: Limits,
    nodes: usize,
    /// About the object's size as compact JSON.
    bytes: usize,
    exceeded: Option<Exceeded>,
}

impl Budget {
    /// Counts one node of about `bytes` bytes; false once over a limit (then nothing more is
    /// built).
    fn count(&mut self, bytes: usize) -> bool {
        self.nodes += 1;
        self.bytes += bytes;
        if self.exceeded.is_none() {
            if self.nodes > self.limits.nodes {
                self.exceeded = Some(Exceeded::Nodes { limit: self.limits.nodes });
            } else if self.bytes > self.limits.document_bytes {
                self.exceeded = Some(Exceeded::DocumentBytes { limit: self.limits.document_bytes });
            }
        }
        self.exceeded.is_none()
    }
}

/// Which part of the object a value is: once over a limit, only what names the object is kept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The object itself.
    Root,
    /// Its `metadata`.
    Metadata,
    /// `metadata.name`, `namespace`, `resourceVersion` or `uid`: kept if it is a string, even
    /// over a limit (the API server caps them at a few hundred bytes).
    Name,
    /// Anything else: skipped once over a limit.
    Other,
}

/// Builds a JSON value within the budget; `depth` collections enclose it.
struct Bounded<'b> {
    budget: &'b mut Budget,
    depth: usize,
    part: Part,
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Bounded<'_> {
    /// Counts a scalar; whether to keep it.
    fn scalar(&mut self, bytes: usize) -> bool {
        self.budget.count(bytes) || (self.part == Part::Name && self.budget.exceeded.is_some())
    }

    /// Counts a collection nested one level deeper than `depth`; whether to build it.
    fn collection(&mut self) -> bool {
        if self.depth + 1 > self.budget.limits.depth && self.budget.exceeded.is_none() {
            self.budget.exceeded = Some(Exceeded::Depth { limit: self.budget.limits.depth });
        }
        self.budget.count(2) && self.depth + 1 <= self.budget.limits.depth
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<Value, E> {
        Ok(if self.scalar(5) && self.part != Part::Name { Value::Bool(v) } else { Value::Null })
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<Value, E> {
        Ok(if self.scalar(8) && self.part != Part::Name { Value::Number(v.into()) } else { Value::Null })
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<Value, E> {
        Ok(if self.scalar(8) && self.part != Part::Name { Value::Number(v.into()) } else { Value::Null })
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<Value, E> {
        let keep = self.scalar(8) && self.part != Part::Name;
        Ok(Number::from_f64(v).filter(|_| keep).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<Value, E> {
        // Checked before copying: an oversized string is never allocated here.
        Ok(if self.scalar(v.len() + 3) { Value::String(v.to_owned()) } else { Value::Null })
    }

    fn visit_string<E: de::Error>(mut self, v: String) -> Result<Value, E> {
        Ok(if self.scalar(v.len() + 3) { Value::String(v) } else { Value::Null })
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.count(4);
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        if self.part != Part::Name && self.collection() {
            while self.budget.exceeded.is_none() {
                let item = Bounded { budget: &mut *self.budget, depth: self.depth + 1, part: Part::Other };
                match seq.next_element_seed(item)? {
                    Some(item) => items.push(item),
                    None => return Ok(Value::Array(items)),
                }
            }
        }
        // Over a limit: the rest is skipped, not built (serde_json skips at any depth).
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(if self.budget.exceeded.is_none() { Value::Array(items) } else { Value::Null })
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        let build = self.part != Part::Name && self.collection();
        // The object and its metadata are walked even over a limit, for the object's name.
        if !build && !matches!(self.part, Part::Root | Part::Metadata) {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Value::Null);
        }
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let part = match (self.part, key.as_str()) {
                (Part::Root, "metadata") => Part::Metadata,
                (Part::Metadata, "name" | "namespace" | "resourceVersion" | "uid") => Part::Name,
                _ => Part::Other,
            };
            // A key is a node too (as the manifest pre-check counts it).
            if !self.budget.count(key.len() + 4) && part == Part::Other {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value =
                map.next_value_seed(Bounded { budget: &mut *self.budget, depth: self.depth + 1, part })?;
            if self.budget.exceeded.is_none() || part != Part::Other {
                fields.insert(key, value);
            }
        }
        Ok(Value::Object(fields))
    }
}
