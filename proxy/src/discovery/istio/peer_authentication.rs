//! Istio's PeerAuthentication (`security.istio.io` v1 and v1beta1): whether a pod accepts
//! plaintext, per workload, namespace or mesh, and per port. `policy::peer_auth` resolves the
//! mode in force for a pod and port with Istio's precedence.
//!
//! Istio's own validation applies: `portLevelMtls` needs a `selector` (a port means something
//! only for the pods a selector picks), and ports are 1-65535.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::{invalid, spec, PortValue, WorkloadSelector};
use crate::discovery::fields::Node;
use crate::discovery::manifest::{DocError, Meta};
use crate::discovery::model::{Labels, Object};

/// A PeerAuthentication's mode, as written (`UNSET` inherits from the level above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum MtlsMode {
    #[default]
    #[serde(rename = "UNSET")]
    Unset,
    #[serde(rename = "DISABLE")]
    Disable,
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    #[serde(rename = "STRICT")]
    Strict,
}

impl MtlsMode {
    fn parse(s: &str) -> Result<MtlsMode, String> {
        Ok(match s {
            "" | "UNSET" => MtlsMode::Unset,
            "DISABLE" => MtlsMode::Disable,
            "PERMISSIVE" => MtlsMode::Permissive,
            "STRICT" => MtlsMode::Strict,
            other => return Err(format!("{other:?} is not a mode (UNSET, DISABLE, PERMISSIVE, STRICT)")),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Istio's `security.istio.io` PeerAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339): among several at one level, the oldest wins.
    pub created: Option<String>,
    /// `spec.selector.matchLabels`; `None` (or no labels) for a namespace-wide policy, or a
    /// mesh-wide one in the root namespace.
    pub selector: Option<Labels>,
    /// `spec.mtls.mode`.
    pub mode: MtlsMode,
    /// `spec.portLevelMtls`: mode per workload (container) port, in port order.
    pub port_level: Vec<(u16, MtlsMode)>,
}

impl PeerAuthentication {
    /// Whether this policy names workloads (it has a selector) and selects a pod with these
    /// labels.
    pub fn selects(&self, pod_labels: &Labels) -> bool {
        self.selector.as_ref().is_some_and(|s| s.iter().all(|(k, v)| pod_labels.get(k) == Some(v)))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    mtls: Option<Mtls>,
    #[serde(default)]
    port_level_mtls: Option<BTreeMap<PortKey, Mtls>>,
    #[serde(default)]
    target_ref: Option<IgnoredAny>,
    #[serde(default)]
    target_refs: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    #[serde(default)]
    mode: Option<String>,
}

/// A map key of `portLevelMtls`: a number in YAML, a string in JSON (the API server's).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
enum PortKey {
    Number(i64),
    Text(String),
}

pub(crate) fn parse(meta: Meta, doc: &Node<'_>) -> Result<Object, DocError> {
    let spec: Spec = spec(doc)?.unwrap_or_default();
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        let field = if spec.target_ref.is_some() { "targetRef" } else { "targetRefs" };
        return Err(invalid(
            format!("spec.{field}"),
            "not supported: sluice applies PeerAuthentications to the pods chosen by spec.selector",
        ));
    }
    let selector = spec.selector.map(|s| s.match_labels).filter(|l| !l.is_empty());
    let mode = match spec.mtls.and_then(|m| m.mode) {
        None => MtlsMode::Unset,
        Some(m) => MtlsMode::parse(&m).map_err(|r| invalid("spec.mtls.mode", r))?,
    };
    let mut port_level = Vec::new();
    if let Some(ports) = spec.port_level_mtls.filter(|p| !p.is_empty()) {
        if selector.is_none() {
            return Err(invalid(
                "spec.portLevelMtls",
                "needs a selector: port-level modes apply to the ports of the workloads a selector picks (as in Istio)",
            ));
        }
        for (key, m) in ports {
            let (port, at) = match &key {
                PortKey::Number(n) => (PortValue::Number(*n).port(), format!("spec.portLevelMtls[{n}]")),
                PortKey::Text(s) => (PortValue::Text(s.clone()).port(), format!("spec.portLevelMtls[{s:?}]")),
            };
            let port = port.map_err(|r| invalid(at.clone(), r))?;
            let mode = MtlsMode::parse(m.mode.as_deref().unwrap_or(""))
                .map_err(|r| invalid(format!("{at}.mode"), r))?;
            if port_level.iter().any(|(p, _)| *p == port) {
                return Err(invalid(at, format!("port {port} is listed twice")));
            }
            port_level.push((port, mode));
        }
        port_level.sort_unstable_by_key(|(p, _)| *p);
    }
    Ok(Object::PeerAuthentication(Arc::new(PeerAuthentication {
        namespace: meta.namespace,
        name: meta.name,
        created: meta.creation_timestamp,
        selector,
        mode,
        port_level,
    })))
}
