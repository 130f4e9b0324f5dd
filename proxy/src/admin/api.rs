//! The admin API's JSON documents, shared by the server and the CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::{
    conns::ConnView,
    enroll::{PodProblem, PodView},
    telemetry::{
        stats::{DirectionStats, LatencyView, StatKind, StatRow, StatView},
        tap::{TapEvent, TapFilter, TapMessage, TapPeer},
    },
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    /// Process id (during an upgrade two sluice processes of a node exist for a while).
    #[serde(default)]
    pub pid: u32,
    pub node: String,
    pub ready: bool,
    pub fail_mode: String,
    pub uptime_s: u64,
    pub programs: Vec<ProgramView>,
    pub counters: BTreeMap<String, u64>,
    pub pods_enrolled: usize,
    pub connections_open: usize,
    pub connections_total: u64,
    pub manifest_errors: Vec<ManifestErrorView>,
    /// Generation of the configuration model in force, and how many pods it knows (any node).
    #[serde(default)]
    pub model_generation: u64,
    #[serde(default)]
    pub model_pods: usize,
    /// The connection bounds in force (derived from RLIMIT_NOFILE unless set by flags).
    #[serde(default)]
    pub limits: Option<crate::admission::AdmissionConfig>,
    /// Pods of the node sluice does not (fully) protect, and why.
    #[serde(default)]
    pub pod_problems: Vec<PodProblem>,
    /// The node's CA, its trust bundle, and where the node's certificates stand.
    #[serde(default)]
    pub ca: Option<CaStatusView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaStatusView {
    #[serde(flatten)]
    pub description: crate::identity::CaDescription,
    /// Roots in the trust bundle in force.
    pub trust_bundle_roots: usize,
    pub certificates_held: usize,
    /// Identities still waiting for their first certificate.
    pub certificates_pending: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramView {
    pub name: String,
    pub attach_type: String,
    pub id: u32,
    pub link_id: Option<u32>,
    pub pinned: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestErrorView {
    pub file: String,
    pub reason: String,
}
