//! Parsing one manifest file into model objects.
//!
//! A file holds one or more YAML documents (`---`-separated; empty ones are skipped) or JSON
//! values; a document may be a `kind: List` whose `items` are objects. Every document is
//! validated, and one bad document rejects the whole file: applying half a file would leave a
//! model that matches neither the old nor the new intent.
//!
//! Kinds are dispatched through [`KINDS`], a registry of `(kind, apiVersion) → parser`, so a
//! new kind (sluice's CRDs, say) is one entry plus its parser.
//!
//! Before any parser sees the text, [`limits::check`] measures it (size, depth, nodes,
//! documents, alias expansion): a file over a limit is refused without being parsed.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde_yaml_ng::Value;
use thiserror::Error;

use super::fields::{NameRule, Node};
use super::istio;
use super::kinds;
use super::kinds_route;
use super::kinds_traffic;
use super::limits::{self, LimitError, Limits};
use super::model::{Kind, Labels, Object, ObjectKey};

/// The on-disk format of a manifest file, chosen by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// `.yaml`/`.yml` → YAML, `.json` → JSON (case-insensitive); anything else is not a manifest.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?;
        if ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml") {
            Some(Format::Yaml)
        } else if ext.eq_ignore_ascii_case("json") {
            Some(Format::Json)
        } else {
            None
        }
    }
}

/// Where in a file a problem is: the 1-based document number, the line it starts on when
/// known, the index inside a `List`, and the object once its kind and name are known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DocRef {
    pub document: usize,
    pub line: Option<usize>,
    pub item: Option<usize>,
    pub object: Option<String>,
}

impl fmt::Display for DocRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        if let Some(object) = &self.object {
            write!(f, " {object}")?;
        }
        Ok(())
    }
}

/// What is wrong with one document.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DocError {
    #[error("expected a Kubernetes object (a mapping), found {found}")]
    NotAnObject { found: &'static str },
    #[error("missing required field `{field}`")]
    Missing { field: String },
    #[error("unknown kind {kind:?} (apiVersion {api_version})")]
    UnknownKind { kind: String, api_version: String },
    #[error("kind {kind} is not served at apiVersion {api_version:?} (use {})", one_of(.expected))]
    UnsupportedVersion { kind: String, api_version: String, expected: &'static [&'static str] },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
fn one_of(versions: &[&str]) -> String {
    let quoted: Vec<String> = versions.iter().map(|v| format!("{v:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Why a whole file was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// Over a limit: refused before parsing.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// serde_yaml_ng's message ends with "at line L column C" (1-based, counted in the file).
    #[error("invalid YAML in document {document}: {message}")]
    Yaml { document: usize, message: String, line: Option<usize>, column: Option<usize> },
    #[error("invalid JSON: {message}")]
    Json { message: String, line: usize, column: usize },
    // Boxed: keeps `Result<_, ParseError>` small on the happy path.
    #[error("{at}: {error}")]
    Document { at: Box<DocRef>, error: DocError },
    #[error("{key} is defined twice in this file ({first} and {second})")]
    Duplicate { key: Box<ObjectKey>, first: Box<DocRef>, second: Box<DocRef> },
}

/// The metadata every kind shares, already validated.
pub(crate) struct Meta {
    pub name: String,
    /// "" for cluster-scoped kinds; "default" when a namespaced object does not say.
    pub namespace: String,
    pub uid: Option<String>,
    /// `metadata.creationTimestamp` as written (RFC 3339 from the API server); absent in most
    /// hand-written manifests. Routes use it for precedence.
    pub creation_timestamp: Option<String>,
    pub labels: Labels,
    pub annotations: Labels,
}

/// One registered kind.
pub(crate) struct KindSpec {
    pub kind: Kind,
    /// The apiVersions served, preferred first.
    pub api_versions: &'static [&'static str],
    pub namespaced: bool,
    pub name_rule: NameRule,
    /// Builds the object from validated metadata and the whole document.
    pub parse: fn(Meta, &Node<'_>) -> Result<Object, DocError>,
}

/// The registry. Order does not matter; lookups are by kind name.
pub(crate) const KINDS: &[KindSpec] = &[
    KindSpec {
        kind: Kind::Namespace,
        api_versions: &["v1"],
        namespaced: false,
        name_rule: NameRule::Dns1123Label,
        parse: kinds::namespace,
    },
    KindSpec {
        kind: Kind::Pod,
        api_versions: &["v1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: kinds::pod,
    },
    KindSpec {
        kind: Kind::Service,
        api_versions: &["v1"],
        namespaced: true,
        name_rule: NameRule::Dns1035Label,
        parse: kinds::service,
    },
    KindSpec {
        kind: Kind::EndpointSlice,
        api_versions: &["discovery.k8s.io/v1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: kinds::endpoint_slice,
    },
    KindSpec {
        kind: Kind::AuthorizationPolicy,
        // Istio serves both with the same schema; v1beta1 is what most existing policies say.
        api_versions: &["security.istio.io/v1", "security.istio.io/v1beta1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: istio::authorization_policy::parse,
    },
    KindSpec {
        kind: Kind::PeerAuthentication,
        api_versions: &["security.istio.io/v1", "security.istio.io/v1beta1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: istio::peer_authentication::parse,
    },
    KindSpec {
        kind: Kind::RequestAuthentication,
        api_versions: &["security.istio.io/v1", "security.istio.io/v1beta1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: istio::request_authentication::parse,
    },
    KindSpec {
        kind: Kind::HttpRoute,
        // Gateway API v1.0+ serves both with the same schema (v1beta1 is deprecated).
        api_versions: &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: kinds_route::http_route,
    },
    KindSpec {
        kind: Kind::GrpcRoute,
        api_versions: &["gateway.networking.k8s.io/v1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: kinds_route::grpc_route,
    },
    KindSpec {
        kind: Kind::TrafficPolicy,
        api_versions: &["sluice.dev/v1alpha1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: kinds_traffic::traffic_policy,
    },
    KindSpec {
        kind: Kind::ServiceEntry,
        // Istio serves both with the same schema (v1 since Istio 1.22).
        api_versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: kinds_traffic::service_entry,
    },
    KindSpec {
        kind: Kind::VirtualService,
        // Istio serves all three with the same schema (v1 since Istio 1.22).
        api_versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: super::istio::virtual_service::parse,
    },
    KindSpec {
        kind: Kind::DestinationRule,
        // Istio serves all three with the same schema (v1 since Istio 1.22).
        api_versions: &["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"],
        namespaced: true,
        name_rule: NameRule::Dns1123Subdomain,
        parse: super::istio::destination_rule::destination_rule,
    },
];

/// Parses a whole file within [`Limits::DEFAULT`]. Returns every object in document order, or
/// the first problem found.
pub fn parse(text: &str, format: Format) -> Result<Vec<Object>, ParseError> {
    parse_within(text, format, &Limits::DEFAULT)
}

/// Parses a whole file, refusing it unparsed if it exceeds `limits`.
pub fn parse_within(text: &str, format: Format, limits: &Limits) -> Result<Vec<Object>, ParseError> {
    limits::check(text, format, limits)?;
    let mut out = Parsed::default();
    match format {
        Format::Yaml => parse_yaml(text, &mut out)?,
        Format::Json => parse_json(text, &mut out)?,
    }
    Ok(out.objects)
}

#[derive(Default)]
struct Parsed {
    objects: Vec<Object>,
    /// Where each object was defined, to report a duplicate with both places.
    seen: HashMap<ObjectKey, DocRef>,
}

impl Parsed {
    fn push(&mut self, object: Object, at: DocRef) -> Result<(), ParseError> {
        let key = object.key();
        if let Some(first) = self.seen.get(&key) {
            let (first, second) = (Box::new(first.clone()), Box::new(at));
            return Err(ParseError::Duplicate { key: Box::new(key), first, second });
        }
        self.seen.insert(key, at);
        self.objects.push(object);
        Ok(())
    }
}

fn parse_yaml(text: &str, out: &mut Parsed) -> Result<(), ParseError> {
    let starts = document_start_lines(text);
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            // serde_yaml_ng's document iterator yields the same error forever after a syntax
            // error, so stop at the first one.
            Err(e) => {
                let loc = e.location();
                return Err(ParseError::Yaml {
                    document,
                    message: e.to_string(),
                    line: loc.as_ref().map(|l| l.line()),
                    column: loc.as_ref().map(|l| l.column()),
                });
            }
        };
        let at = DocRef { document, line: starts.get(i).copied(), ..DocRef::default() };
        parse_document(value, at, out)?;
    }
    Ok(())
}

fn parse_json(text: &str, out: &mut Parsed) -> Result<(), ParseError> {
    // A stream of JSON values is accepted, like `kubectl apply -f` does.
    let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    for (i, item) in stream.enumerate() {
        let json = item.map_err(|e| ParseError::Json {
            message: e.to_string(),
            line: e.line(),
            column: e.column(),
        })?;
        let at = DocRef { document: i + 1, ..DocRef::default() };
        // JSON maps onto YAML's data model without loss (numbers, strings, maps, lists).
        let value = serde_yaml_ng::to_value(json)
            .map_err(|e| doc_error(&at, DocError::Invalid { field: String::new(), reason: e.to_string() }))?;
        parse_document(value, at, out)?;
    }
    Ok(())
}

/// The line each YAML document starts on, for messages only: a document starts at its `---`
/// marker, or, for a first document without one, at its first content line. If this ever
/// disagrees with the parser, a message names the wrong line but the right document number.
fn document_start_lines(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut content_seen = false;
    for (i, line) in text.lines().enumerate() {
        let is_marker = line.starts_with("---") && line[3..].chars().next().is_none_or(|c| c.is_whitespace());
        if is_marker {
            starts.push(i + 1);
            content_seen = true;
        } else if !content_seen {
            let t = line.trim_start();
            if !t.is_empty() && !t.starts_with('#') && !t.starts_with('%') {
                starts.push(i + 1);
                content_seen = true;
            }
        }
    }
    starts
}

fn parse_document(mut value: Value, mut at: DocRef, out: &mut Parsed) -> Result<(), ParseError> {
    if value.is_null() {
        return Ok(()); // an empty document, e.g. a trailing `---`
    }
    // `<<: *anchor` merge keys, which the Kubernetes YAML decoder supports.
    value
        .apply_merge()
        .map_err(|e| doc_error(&at, DocError::Invalid { field: String::new(), reason: e.to_string() }))?;
    let root = Node::root(&value);
    let kind = root.get("kind").map(|n| n.as_str()).transpose().map_err(|e| doc_error(&at, e))?;
    if kind.is_some_and(|k| k == "List" || (k.ends_with("List") && root.get("items").is_some())) {
        let items = root.list("items").map_err(|e| doc_error(&at, e))?;
        for (i, item) in items.iter().enumerate() {
            // Field paths inside an item are relative to the item; the DocRef names the item.
            let item = &Node::root(item.value);
            let item_at = DocRef { item: Some(i), ..at.clone() };
            let object = parse_object(item, &item_at)?;
            out.push(object, item_at_with_name(item_at, item))?;
        }
        return Ok(());
    }
    let object = parse_object(&root, &at)?;
    at = item_at_with_name(at, &root);
    out.push(object, at)
}

fn doc_error(at: &DocRef, error: DocError) -> ParseError {
    ParseError::Document { at: Box::new(at.clone()), error }
}

fn item_at_with_name(mut at: DocRef, node: &Node<'_>) -> DocRef {
    at.object = object_label(node);
    at
}

/// `Service "shop/web"`, for messages, from whatever the document says (even if invalid).
fn object_label(node: &Node<'_>) -> Option<String> {
    let kind = node.get("kind")?.value.as_str()?;
    let meta = node.get("metadata")?;
    let name = meta.get("name")?.value.as_str()?;
    Some(match meta.get("namespace").and_then(|n| n.value.as_str().map(str::to_owned)) {
        Some(ns) => format!("{kind} \"{ns}/{name}\""),
        None => format!("{kind} {name:?}"),
    })
}

/// Validates the envelope (kind, apiVersion, metadata) and hands over to the kind's parser.
fn parse_object(node: &Node<'_>, at: &DocRef) -> Result<Object, ParseError> {
    check_and_parse(node).map_err(|e| doc_error(&item_at_with_name(at.clone(), node), e))
}

/// Parses one object that arrives as a JSON value rather than in a file: what the Kubernetes
/// API source gets from a list or a watch event. It goes through exactly the envelope checks and
/// kind parsers a manifest file goes through, so both sources yield the same objects (same
/// validation, same defaults). The error names the field; the caller names the object.
pub fn parse_json_object(json: serde_json::Value) -> Result<Object, DocError> {
    // JSON maps onto YAML's data model without loss (numbers, strings, maps, lists).
    let value = serde_yaml_ng::to_value(json)
        .map_err(|e| DocError::Invalid { field: String::new(), reason: e.to_string() })?;
    check_and_parse(&Node::root(&value))
}

fn check_and_parse(node: &Node<'_>) -> Result<Object, DocError> {
    node.expect_mapping()
        .map_err(|_| DocError::NotAnObject { found: super::fields::describe(node.value) })?;
    let kind = node.get("kind").ok_or_else(|| DocError::Missing { field: "kind".into() })?;
    let kind = kind.as_str()?;
    let api_version =
        node.get("apiVersion").ok_or_else(|| DocError::Missing { field: "apiVersion".into() })?;
    let api_version = api_version.as_str()?;
    let spec = KINDS.iter().find(|s| s.kind.as_str() == kind).ok_or_else(|| DocError::UnknownKind {
        kind: kind.to_owned(),
        api_version: api_version.to_owned(),
    })?;
    if !spec.api_versions.contains(&api_version) {
        return Err(DocError::UnsupportedVersion {
            kind: kind.to_owned(),
            api_version: api_version.to_owned(),
            expected: spec.api_versions,
        });
    }
    let meta = parse_meta(node, spec)?;
    (spec.parse)(meta, node)
}

fn parse_meta(node: &Node<'_>, spec: &KindSpec) -> Result<Meta, DocError> {
    let metadata = node.get("metadata").ok_or_else(|| DocError::Missing { field: "metadata.name".into() })?;
    metadata.expect_mapping()?;
    let name_node = metadata.require("name")?;
    let name = name_node.as_str()?;
    if let Some(reason) = spec.name_rule.check(name) {
        return Err(name_node.invalid(reason));
    }
    let namespace = if spec.namespaced {
        match metadata.opt_str("namespace")? {
            None => "default".to_owned(),
            Some(ns) => {
                if let Some(reason) = NameRule::Dns1123Label.check(ns) {
                    return Err(metadata.require("namespace")?.invalid(reason));
                }
                ns.to_owned()
            }
        }
    } else {
        String::new() // cluster-scoped: a stray metadata.namespace is ignored, as the API does
    };
    Ok(Meta {
        name: name.to_owned(),
        namespace,
        uid: metadata.opt_str("uid")?.map(str::to_owned),
        creation_timestamp: metadata.opt_str("creationTimestamp")?.map(str::to_owned),
        labels: metadata.string_map("labels")?,
        annotations: metadata.string_map("annotations")?,
    })
}
