//! Reading fields out of a parsed manifest document, with errors that name the field path
//! (`spec.ports[1].port: ...`). [`Node::typed`] deserializes a node into a serde type (a
//! k8s-openapi type, an Istio kind's) through `serde_path_to_error`, so its errors carry the
//! path from the document's root; the hand-walking accessors remain for the kinds not yet
//! moved to serde types (the Gateway API routes, TrafficPolicy, ServiceEntry).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::manifest::DocError;

/// A value inside a document, with the path that leads to it.
pub(crate) struct Node<'a> {
    pub value: &'a Value,
    pub path: String,
}

impl<'a> Node<'a> {
    pub fn root(value: &'a Value) -> Self {
        Node { value, path: String::new() }
    }

    pub fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The field `key` of this mapping; `None` when absent or `null` (Kubernetes treats both
    /// alike) or when this node is not a mapping (reported by whoever asked for a mapping).
    pub fn get(&self, key: &str) -> Option<Node<'a>> {
        match self.value.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Node { value, path: self.child_path(key) }),
        }
    }

    /// Whether `key` is present and not `null` (Kubernetes treats both alike). For the
    /// required scalars of k8s-openapi types, which default to zero when absent: the API's
    /// "missing" and "invalid" are different messages.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Deserializes this node into `T` (a k8s-openapi type, or a view holding some), naming
    /// the field of the first error from the document's root
    /// (`spec.ports[0].port: invalid type: string "80", expected i32`).
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, DocError> {
        serde_path_to_error::deserialize(self.value).map_err(|e| {
            let path = e.path().to_string();
            let field = match path.as_str() {
                "." => self.path.clone(),
                p if self.path.is_empty() => p.to_owned(),
                p if p.starts_with('[') => format!("{}{p}", self.path),
                p => format!("{}.{p}", self.path),
            };
            DocError::Invalid { field, reason: e.into_inner().to_string() }
        })
    }

    /// Like [`Node::get`], but an absent field is an error.
    pub fn require(&self, key: &str) -> Result<Node<'a>, DocError> {
        self.get(key).ok_or_else(|| DocError::Missing { field: self.child_path(key) })
    }

    pub fn invalid(&self, reason: impl Into<String>) -> DocError {
        DocError::Invalid { field: self.path.clone(), reason: reason.into() }
    }

    fn expected(&self, what: &str) -> DocError {
        self.invalid(format!("expected {what}, found {}", describe(self.value)))
    }

    pub fn expect_mapping(&self) -> Result<&'a serde_yaml_ng::Mapping, DocError> {
        self.value.as_mapping().ok_or_else(|| self.expected("a mapping"))
    }

    pub fn as_str(&self) -> Result<&'a str, DocError> {
        self.value.as_str().ok_or_else(|| self.expected("a string"))
    }

    pub fn as_bool(&self) -> Result<bool, DocError> {
        self.value.as_bool().ok_or_else(|| self.expected("true or false"))
    }

    pub fn as_i64(&self) -> Result<i64, DocError> {
        self.value.as_i64().ok_or_else(|| self.expected("an integer"))
    }

    /// A number, integer or not (`10`, `0.5`).
    pub fn as_f64(&self) -> Result<f64, DocError> {
        self.value.as_f64().ok_or_else(|| self.expected("a number"))
    }

    /// A TCP/UDP port number, 1-65535.
    pub fn as_port(&self) -> Result<u16, DocError> {
        let n = self.as_i64()?;
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.invalid(format!("port {n} is out of range 1-65535")))
    }

    /// An optional string field; "" counts as absent (Kubernetes' zero value).
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, DocError> {
        match self.get(key) {
            None => Ok(None),
            Some(n) => n.as_str().map(|s| (!s.is_empty()).then_some(s)),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, DocError> {
        self.get(key).map(|n| n.as_bool()).transpose()
    }

    /// The elements of the list `key`; an absent list is empty.
    pub fn list(&self, key: &str) -> Result<Vec<Node<'a>>, DocError> {
        let Some(node) = self.get(key) else {
            return Ok(Vec::new());
        };
        let seq = node.value.as_sequence().ok_or_else(|| node.expected("a list"))?;
        Ok(seq
            .iter()
            .enumerate()
            .map(|(i, value)| Node { value, path: format!("{}[{i}]", node.path) })
            .collect())
    }

    /// The strings of the list `key`; an absent list is empty.
    pub fn str_list(&self, key: &str) -> Result<Vec<(Node<'a>, &'a str)>, DocError> {
        self.list(key)?.into_iter().map(|n| n.as_str().map(|s| (n, s))).collect()
    }

    /// Fails on the first field of this mapping (in document order) that is not in `known`.
    /// `explain` gives the reason for a field it knows about (one sluice cannot enforce, say);
    /// any other field is "unknown". A field that is null or an empty list is absent, as
    /// everywhere else, and not checked.
    pub fn only_fields(
        &self,
        known: &[&str],
        explain: impl Fn(&str) -> Option<String>,
    ) -> Result<(), DocError> {
        for (k, v) in self.expect_mapping()? {
            let Some(k) = k.as_str() else {
                return Err(self.expected("string keys"));
            };
            let absent = v.is_null() || v.as_sequence().is_some_and(|s| s.is_empty());
            if absent || known.contains(&k) {
                continue;
            }
            let reason = explain(k).unwrap_or_else(|| format!("unknown field (known: {})", known.join(", ")));
            return Err(DocError::Invalid { field: self.child_path(k), reason });
        }
        Ok(())
    }

    /// A `map[string]string` field (labels, annotations, selector). Values must be strings, as
    /// the API server insists: `enabled: true` is a boolean, and a silent conversion would hide
    /// the mistake.
    pub fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>, DocError> {
        let Some(node) = self.get(key) else {
            return Ok(BTreeMap::new());
        };
        let map = node.expect_mapping()?;
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let k = k.as_str().ok_or_else(|| node.expected("string keys"))?;
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => {
                    return Err(DocError::Invalid {
                        field: format!("{}[{k:?}]", node.path),
                        reason: format!("expected a string, found {} (quote it)", describe(other)),
                    })
                }
            };
            out.insert(k.to_owned(), v);
        }
        Ok(out)
    }
}

/// "a string", "a list", ... for error messages.
pub(crate) fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Which naming rule an object's name must follow (the API server's, so that a manifest that
/// works here also works in a cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameRule {
    /// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters (Namespace).
    Dns1123Label,
    /// RFC 1035 label: like a 1123 label, but starting with a letter (Service).
    Dns1035Label,
    /// RFC 1123 subdomain: dot-separated 1123 labels, at most 253 characters (Pod, slice).
    Dns1123Subdomain,
}

impl NameRule {
    /// `None` if `name` is valid, else why not.
    pub fn check(self, name: &str) -> Option<String> {
        let ok = match self {
            NameRule::Dns1123Label => is_dns_label(name),
            NameRule::Dns1035Label => {
                is_dns_label(name) && name.starts_with(|c: char| c.is_ascii_lowercase())
            }
            NameRule::Dns1123Subdomain => name.len() <= 253 && name.split('.').all(is_dns_label),
        };
        (!ok).then(|| {
            let rule = match self {
                NameRule::Dns1123Label => {
                    "lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
                }
                NameRule::Dns1035Label => {
                    "lower-case letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters"
                }
                NameRule::Dns1123Subdomain => {
                    "lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
                }
            };
            format!("{name:?} is not a valid name ({rule})")
        })
    }
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// IANA service name, the rule for named target ports: at most 15 characters of lower-case
/// letters, digits and '-', at least one letter, no leading/trailing/double '-'.
pub(crate) fn check_port_name(name: &str) -> Option<String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--");
    (!ok).then(|| {
        let hint = if name.parse::<u32>().is_ok() { "; write a port number without quotes" } else { "" };
        format!(
            "{name:?} is not a valid port name (at most 15 lower-case letters, digits and '-', with at least one letter{hint})"
        )
    })
}
