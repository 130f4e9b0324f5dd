//! What a playground is made of, written to `<sim tmp>/playground.json` once it is up, for the
//! commands that come later from other processes (`cargo xtask sim list`, `sim apply`, `sim
//! down`): they find the playground by name in the registry, then read this.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Playground;
use crate::util;

pub const STATE_FILE: &str = "playground.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub sim_id: String,
    pub source: String,
    pub manifest_dir: PathBuf,
    pub log_dir: PathBuf,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub services: Vec<ServiceState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub short_name: String,
    /// The node's name as sluice knows it (`--node`), also its network namespace.
    pub name: String,
    pub admin_socket: PathBuf,
    pub sluice_log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub ip: String,
    pub node: String,
    pub netns: String,
    /// The pod's cgroup: a process must join it to be captured as the pod's (`sim exec`).
    #[serde(default)]
    pub cgroup: PathBuf,
    pub runs: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceState {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Option<String>,
    pub ports: Vec<u16>,
}

impl State {
    pub fn of(pg: &Playground) -> State {
        State {
            sim_id: pg.sim.id().to_string(),
            source: pg.opts.source.clone(),
            manifest_dir: pg.sim.manifest_dir().to_path_buf(),
            log_dir: pg.sim.log_dir().to_path_buf(),
            nodes: pg
                .nodes
                .iter()
                .zip(&pg.sluices)
                .map(|(n, s)| NodeState {
                    short_name: n.short_name().to_string(),
                    name: n.name().to_string(),
                    admin_socket: s.admin_socket().to_path_buf(),
                    sluice_log: s.log_path(),
                })
                .collect(),
            pods: pg
                .pods
                .iter()
                .map(|p| PodState {
                    namespace: p.plan.namespace.clone(),
                    name: p.plan.name.clone(),
                    ip: p.pod.ip().to_string(),
                    node: pg.nodes[p.plan.node].short_name().to_string(),
                    netns: p.pod.netns().to_string(),
                    cgroup: p.pod.cgroup_path().to_path_buf(),
                    runs: p
                        .behaviours
                        .iter()
                        .map(super::standin::Behaviour::describe)
                        .collect::<Vec<_>>()
                        .join("; "),
                })
                .collect(),
            services: pg
                .plan
                .services
                .iter()
                .map(|s| ServiceState {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    cluster_ip: s.cluster_ip.map(|ip| ip.to_string()),
                    ports: s.ports.iter().map(|p| p.port).collect(),
                })
                .collect(),
        }
    }

    /// The pod `namespace/name`, or `namespace/prefix` naming exactly one pod whose name is
    /// `prefix-...` (a Deployment's or StatefulSet's name: `bookinfo/curl`).
    pub fn find_pod(&self, which: &str) -> Result<&PodState> {
        let (ns, name) = which
            .split_once('/')
            .with_context(|| format!("{which:?}: name a pod as NAMESPACE/NAME (or NAMESPACE/DEPLOYMENT)"))?;
        if let Some(p) = self.pods.iter().find(|p| p.namespace == ns && p.name == name) {
            return Ok(p);
        }
        let prefix = format!("{name}-");
        let matching: Vec<&PodState> =
            self.pods.iter().filter(|p| p.namespace == ns && p.name.starts_with(&prefix)).collect();
        match matching.as_slice() {
            [one] => Ok(one),
            [] => bail!(
                "no pod {which} in this playground (pods: {})",
                self.pods
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            many => bail!(
                "{which} names {} pods ({}): name one",
                many.len(),
                many.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// A command running `args` inside pod `which` (see [`State::find_pod`]): in its cgroup and
    /// network namespace, so that sluice captures it as the pod.
    pub fn command_in_pod(&self, which: &str, args: &[String]) -> Result<std::process::Command> {
        let pod = self.find_pod(which)?;
        if pod.cgroup.as_os_str().is_empty() {
            bail!("the playground's state names no cgroup for {which} (made by an older build): recreate it");
        }
        crate::command_in_pod(&pod.netns, &pod.cgroup, args)
    }

    pub fn admin_sockets(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.admin_socket.clone()).collect()
    }
}

pub fn write(temp_dir: &Path, state: &State) -> Result<()> {
    let text = serde_json::to_string_pretty(state).context("encoding the playground state")?;
    util::write_atomic(temp_dir, STATE_FILE, text.as_bytes()).map(|_| ())
}

/// The state of the playground whose sim temp dir is `temp_dir`; `None` if it never came up.
pub fn read(temp_dir: &Path) -> Option<State> {
    let text = fs::read_to_string(temp_dir.join(STATE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}
