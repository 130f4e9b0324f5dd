//! The node simulator: real Linux nodes in miniature, built from network namespaces, veth
//! pairs, bridges and cgroup-v2 directories, so that sluice runs against the real kernel path
//! without a cluster or a container engine.
//!
//! ```text
//!   fabric netns <id>-fab: bridge fbr0
//!      │ n1 ─ up0 10.243.0.1            │ n2 ─ up0 10.243.0.2
//!   node netns <id>-n1                  node netns <id>-n2       (sluice runs here, in
//!      bridge sbr0 10.244.1.1/24           bridge sbr0 10.244.2.1/24   <root>/system)
//!      │ vp0 ─ eth0 10.244.1.10            │ vp0 ─ eth0 10.244.2.10
//!   pod netns <id>-n1-web               pod netns <id>-n2-db
//!      cgroup <cg2>/sluice-sim/<id>/n1/kubepods/besteffort/pod<uid> (+ a sandbox process)
//! ```
//!
//! A dual-stack sim ([`Sim::new_dual_stack`]) gives every node, uplink and pod an IPv6 address
//! next to its IPv4 one, written so that it reads like the IPv4 address (see [`Node`], [`Pod`]):
//!
//! ```text
//!   node K: bridge sbr0 fd00:10:244:K::1/64, uplink up0 fd00:10:243::K/64
//!   pod i on node K: eth0 fd00:10:244:K::(10+i)/64, default route via fd00:10:244:K::1
//! ```
//!
//! A sim may also have a control-plane node ([`Sim::add_control_plane`]): a namespace on the
//! fabric at 10.243.0.254 running the fake API server (which then holds every pod of the sim and
//! reviews the nodes' ServiceAccount tokens) and, on demand, the CA service `sluice ca serve`
//! ([`ControlPlane::start_ca`]); nodes use it with [`SluiceOpts::remote_ca`]. See
//! [`control_plane`].
//!
//! Everything is named after the sim id (`sl` + 6 hex digits) and torn down when the [`Sim`] is
//! dropped, also on panic; [`sweep()`] removes what a killed run left behind.
//!
//! ```no_run
//! use std::time::Duration;
//! use sluice_tests::{PodOpts, Sim, SluiceOpts};
//! # fn main() -> anyhow::Result<()> {
//! let t = Duration::from_secs(10);
//! let sim = Sim::new()?;
//! let node = sim.add_node("n1")?;
//! let web = node.add_pod("shop", "web", PodOpts::labels(&[("app", "web")]))?;
//! let client = node.add_pod("shop", "client", PodOpts::default())?;
//! sim.write_namespace("shop", true)?;
//! sim.write_service("shop", "web", "10.96.0.10", &[("http", 80, 8080)], &[&web])?;
//! let mut server = web.simpod(["http-server", "--port", "8080", "--name", "web"])?;
//! server.wait_listening(t)?;
//! let sluice = node.start_sluice(SluiceOpts::default())?;
//! sluice.wait_ready(t)?;
//! sluice.wait_for("/pods", |v| v.as_array().is_some_and(|p| p.len() == 2), t)?;
//! let out = client.run_simpod(["http-get", "--to", "10.96.0.10:80"])?;
//! assert_eq!(out.check()?.json()?["body"]["name"], "web");
//! # Ok(()) }
//! ```
//!
//! Processes started through the simulator log to `<tmp>/sluice-sim-<id>/logs/`; set
//! `SLUICE_SIM_KEEP=1` to keep that directory after teardown. The tails of the logs are printed
//! before every teardown: a test that returns `Err` has already dropped its simulator when the
//! harness learns it failed, so "only on failure" cannot be decided here. nextest shows a test's
//! output only when it fails (or when its profile asks), so passing tests stay quiet.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Child,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use anyhow::{anyhow, bail, Context, Result};

pub mod admin_client;
pub mod bins;
pub mod ca_client;
mod ca_service;
pub mod cgroup;
pub mod control_plane;
pub mod fake_apiserver;
pub mod http_probe;
pub mod manifest;
pub mod netns;
mod node;
pub mod pki;
pub mod playground;
mod pod;
mod process;
pub mod projected;
pub mod registry;
mod sim_pki;
mod sluice;
pub mod sweep;
mod util;
pub mod workloads;

pub use bins::{simpod_bin, sluice_bin};
pub use ca_service::{CaOpts, CaService};
pub use control_plane::{AgentPod, ControlPlane};
pub use fake_apiserver::TokenSpec;
pub use pki::{CaFiles, CertInfo};
pub use node::{CgroupDriver, Node};
pub use pod::{Pod, PodOpts};
pub use process::{command_in_pod, DetachedProcess, Output, PodProcess, Signal, SimProcess};
pub use sluice::{Sluice, SluiceOpts};
pub use registry::SimKind;
pub use sweep::{
    leftovers, leftovers_of, sweep, sweep_abandoned_where, sweep_all, sweep_where, Leftover,
    LeftoverKind, SweepSummary,
};
pub use util::{poll_until, tail_file};

/// Environment variable: keep the sim's temp dir (manifests, logs) after teardown.
pub const KEEP_ENV: &str = "SLUICE_SIM_KEEP";

/// State shared by the [`Sim`] and every handle derived from it (nodes, pods, processes).
pub(crate) struct SimShared {
    pub id: String,
    pub temp_dir: PathBuf,
    pub manifest_dir: PathBuf,
    pub log_dir: PathBuf,
    /// `<cg2>/sluice-sim/<id>`.
    pub cgroup_root: PathBuf,
    /// Nodes and pods get IPv6 addresses too.
    pub dual_stack: bool,
    /// Test sim or playground (see [`registry`]).
    pub kind: SimKind,
    kept: AtomicBool,
    torn_down: AtomicBool,
    log_seq: AtomicU64,
    state: Mutex<SimState>,
}

#[derive(Default)]
pub(crate) struct SimState {
    pub nodes: Vec<Node>,
    pub fabric: bool,
    /// (namespace, name) of every pod, which must be unique across the sim as in a cluster.
    pub pod_names: BTreeSet<(String, String)>,
    /// Every pod created and not deleted (mirrored into the control plane's API server).
    pub pods: Vec<Pod>,
    /// The control-plane node, once added.
    pub control_plane: Option<ControlPlane>,
    /// Sandbox processes, reaped at teardown.
    pub sandboxes: Vec<Child>,
}

impl SimShared {
    pub(crate) fn state(&self) -> MutexGuard<'_, SimState> {
        // A panic elsewhere (in a test) must not make teardown impossible.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_kept(&self) -> bool {
        self.kept.load(Ordering::SeqCst)
    }

    pub(crate) fn ensure_live(&self) -> Result<()> {
        if self.torn_down.load(Ordering::SeqCst) {
            bail!("sim {} was already torn down", self.id);
        }
        Ok(())
    }

    /// Fresh `(stdout, stderr)` log paths for a process: `<logs>/<label>-<n>-<program>.*`.
    pub(crate) fn log_paths(&self, label: &str, program: &str) -> (PathBuf, PathBuf) {
        let n = self.log_seq.fetch_add(1, Ordering::SeqCst);
        let base = format!("{label}-{n}-{program}");
        (
            self.log_dir.join(format!("{base}.stdout")),
            self.log_dir.join(format!("{base}.stderr")),
        )
    }

    /// Writes a file into the manifest directory atomically.
    pub(crate) fn write_manifest(&self, name: &str, contents: &[u8]) -> Result<PathBuf> {
        if name.contains('/') || name.starts_with('.') || name.is_empty() {
            bail!("bad manifest file name {name:?}");
        }
        util::write_atomic(&self.manifest_dir, name, contents)
    }
}

/// How a [`Sim`] is built.
#[derive(Debug, Clone)]
pub struct SimOpts {
    /// Every node and pod gets an IPv6 address besides its IPv4 one (IPv4 stays the primary:
    /// `status.podIP`), the nodes route IPv6 between their pods, and duplicate address
    /// detection is off so that the addresses are usable at once. Off by default: a sim is
    /// IPv4-only unless a test asks.
    pub dual_stack: bool,
    /// Whose the sim is (see [`registry`]): a test sim (the default) lives as long as this
    /// process and any sweep may remove it once the process is gone; a playground is kept until
    /// `cargo xtask sim down NAME`, and its nodes' sluice use the default admin sockets
    /// (`/run/sluice/<node>/admin.sock`) so that `sluice ... --node <node>` works.
    pub kind: SimKind,
}

impl Default for SimOpts {
    fn default() -> SimOpts {
        SimOpts {
            dual_stack: false,
            kind: SimKind::Test,
        }
    }
}

/// One simulated cluster: nodes joined by a fabric, pods on them, a manifest directory.
pub struct Sim {
    shared: Arc<SimShared>,
}

impl Sim {
    /// Creates an empty IPv4-only sim with a fresh id, its cgroup directory and its temp dir
    /// (`<tmp>/sluice-sim-<id>/{manifests,logs}`). Needs root.
    pub fn new() -> Result<Sim> {
        Sim::with_opts(SimOpts::default())
    }

    /// A sim whose nodes and pods have an IPv4 and an IPv6 address (see [`SimOpts::dual_stack`]).
    pub fn new_dual_stack() -> Result<Sim> {
        Sim::with_opts(SimOpts {
            dual_stack: true,
            ..SimOpts::default()
        })
    }

    pub fn with_opts(opts: SimOpts) -> Result<Sim> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the node simulator needs root (network namespaces, cgroups, veths)");
        }
        let parent = cgroup::sim_cgroup_parent()?;
        // Claim an id atomically, twice: first the marker that says whose the sim is (before
        // any kernel object exists, so a sweep never finds an object without its owner), then
        // the cgroup directory (mkdir fails if a sim of an older build has that id).
        let mut claimed = None;
        for _ in 0..32 {
            let id = format!("sl{}", util::hex(&util::random_bytes(3)?));
            if netns::list()
                .iter()
                .any(|n| util::sim_id_of(n) == Some(id.as_str()))
            {
                continue; // an unswept leftover uses this id: pick another
            }
            let temp_dir = std::env::temp_dir().join(format!("sluice-sim-{id}"));
            let marker = registry::Marker::new(&id, opts.kind.clone(), &temp_dir)?;
            if !registry::claim(&marker)? {
                continue;
            }
            // A sweep may remove the (empty) parent between these two calls: try again then.
            let made = (0..3).find_map(|_| {
                if let Err(e) = fs::create_dir_all(&parent) {
                    return Some(Err(e));
                }
                match fs::create_dir(parent.join(&id)) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    other => Some(other),
                }
            });
            match made {
                Some(Ok(())) => {
                    claimed = Some((id, temp_dir));
                    break;
                }
                Some(Err(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    registry::remove(&id);
                    continue;
                }
                Some(Err(e)) => {
                    registry::remove(&id);
                    return Err(e)
                        .with_context(|| format!("creating {}", parent.join(&id).display()));
                }
                None => {
                    registry::remove(&id);
                    bail!("{} keeps disappearing (a sweep running in a loop?)", parent.display());
                }
            }
        }
        let (id, temp_dir) = claimed
            .ok_or_else(|| anyhow!("could not find a free sim id under {}", parent.display()))?;
        if let SimKind::Playground { name } = &opts.kind {
            registry::release_stale_name(name);
            if let Err(e) = registry::claim_name(name, &id) {
                let _ = fs::remove_dir(parent.join(&id));
                registry::remove(&id);
                return Err(e);
            }
        }
        let sim = Sim {
            shared: Arc::new(SimShared {
                manifest_dir: temp_dir.join("manifests"),
                log_dir: temp_dir.join("logs"),
                temp_dir,
                cgroup_root: parent.join(&id),
                dual_stack: opts.dual_stack,
                kind: opts.kind,
                id,
                kept: AtomicBool::new(false),
                torn_down: AtomicBool::new(false),
                log_seq: AtomicU64::new(0),
                state: Mutex::new(SimState::default()),
            }),
        };
        // From here on, a failure drops `sim`, which removes what was created.
        for d in [&sim.shared.manifest_dir, &sim.shared.log_dir] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(sim)
    }

    /// `sl` + 6 hex digits; prefix of every kernel object of this sim.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Whether nodes and pods have IPv6 addresses too ([`Sim::new_dual_stack`]).
    pub fn is_dual_stack(&self) -> bool {
        self.shared.dual_stack
    }

    /// The directory of manifests that sluice's `--manifests` points at.
    pub fn manifest_dir(&self) -> &Path {
        &self.shared.manifest_dir
    }

    /// Logs of every process started through the sim.
    pub fn log_dir(&self) -> &Path {
        &self.shared.log_dir
    }

    /// The sim's temp dir (manifests, logs, admin sockets).
    pub fn temp_dir(&self) -> &Path {
        &self.shared.temp_dir
    }

    /// `<cg2>/sluice-sim/<id>`, the parent of every node's cgroup root.
    pub fn cgroup_root(&self) -> &Path {
        &self.shared.cgroup_root
    }

    /// Adds node number K (1-based, in order of creation); see [`Node`] for its layout.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        self.add_node_with(name, CgroupDriver::Cgroupfs)
    }

    /// A node whose pod cgroups follow `driver`'s layout.
    pub fn add_node_with(&self, name: &str, driver: CgroupDriver) -> Result<Node> {
        self.shared.ensure_live()?;
        node::create(&self.shared, name, driver)
            .with_context(|| format!("sim {}: adding node {name}", self.shared.id))
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.shared.state().nodes.clone()
    }

    /// Every pod created and not deleted, in order of creation.
    pub fn pods(&self) -> Vec<Pod> {
        self.shared.state().pods.clone()
    }

    /// Adds the control-plane node (see [`ControlPlane`]): a namespace on the fabric at
    /// 10.243.0.254 with the fake API server on port 6443, where [`ControlPlane::start_ca`]
    /// runs the CA service. From now on every pod of the sim is also an object of that API
    /// server (pods already made are applied now). At most one per sim.
    pub fn add_control_plane(&self) -> Result<ControlPlane> {
        self.shared.ensure_live()?;
        control_plane::create(&self.shared)
            .with_context(|| format!("sim {}: adding the control plane", self.shared.id))
    }

    /// The control plane, if one was added.
    pub fn control_plane(&self) -> Option<ControlPlane> {
        self.shared.state().control_plane.clone()
    }

    /// The sim's mesh root (`<sim tmp>/ca`, made with `sluice ca init` on first use): what
    /// nodes with the embedded CA sign with (`--ca-dir`), the first root of the trust bundle
    /// unless the test writes another, and the parent of the CA service's default intermediate.
    pub fn mesh_root(&self) -> Result<CaFiles> {
        sim_pki::mesh_root(&self.shared)
    }

    /// Another root, made with `sluice ca init --dir <sim tmp>/pki/<name>` (as an operator
    /// makes the next root for a rotation); made once per name.
    pub fn make_root(&self, name: &str) -> Result<CaFiles> {
        let dir = sim_pki::pki_dir(&self.shared, name)?;
        pki::sluice_root(&sluice_bin()?, &dir, "cluster.local")
    }

    /// An intermediate CA under `parent` in `<sim tmp>/pki/<name>` (see [`pki::intermediate`]):
    /// what an offline root signs for the CA service. Made once per name.
    pub fn make_intermediate(&self, parent: &CaFiles, name: &str) -> Result<CaFiles> {
        let dir = sim_pki::pki_dir(&self.shared, name)?;
        pki::intermediate(parent, &dir, name, "cluster.local")
    }

    /// `<sim tmp>/trust-bundle/bundle.pem`: the mesh trust bundle nodes with a remote CA get
    /// as `--ca-trust-bundle` and the CA service as `--trust-bundle` (one ConfigMap, mounted by
    /// both). Written with the mesh root alone when a CA or such a node first starts, unless
    /// the test wrote it before.
    pub fn trust_bundle_path(&self) -> PathBuf {
        sim_pki::trust_bundle_path(&self.shared)
    }

    /// Rewrites the trust bundle with `roots` in order (the first is the root the CA signs
    /// under now): `[A]`, `[A, B]`, `[B, A]`, `[B]` through a root rotation. Atomic for
    /// readers, as the kubelet updates a ConfigMap volume.
    pub fn write_trust_bundle(&self, roots: &[&CaFiles]) -> Result<PathBuf> {
        sim_pki::write_trust_bundle(&self.shared, roots)
    }

    /// Writes `ns-<name>.yaml`: a Namespace, annotated `sluice.dev/mesh: enabled` if `enrolled`.
    pub fn write_namespace(&self, name: &str, enrolled: bool) -> Result<PathBuf> {
        let yaml = manifest::to_yaml(&[manifest::namespace(name, enrolled)])?;
        self.shared
            .write_manifest(&manifest::namespace_file_name(name), yaml.as_bytes())
    }

    /// Writes `svc-<ns>-<name>.yaml`: a ClusterIP Service with `ports` (name, port, targetPort)
    /// and an EndpointSlice listing `endpoints` (ready), as the endpoint-slice controller would.
    pub fn write_service(
        &self,
        namespace: &str,
        name: &str,
        cluster_ip: &str,
        ports: &[(&str, u16, u16)],
        endpoints: &[&Pod],
    ) -> Result<PathBuf> {
        cluster_ip.parse::<std::net::IpAddr>().with_context(|| {
            format!("service {namespace}/{name}: bad cluster IP {cluster_ip:?}")
        })?;
        let node_names: Vec<String> = endpoints
            .iter()
            .map(|p| p.node().name().to_string())
            .collect();
        let eps: Vec<manifest::Endpoint> = endpoints
            .iter()
            .zip(&node_names)
            .map(|(p, node_name)| manifest::Endpoint {
                ip: p.ip(),
                pod_name: p.name(),
                pod_namespace: p.namespace(),
                pod_uid: p.uid(),
                node_name,
                labels: p.labels(),
            })
            .collect();
        let yaml = manifest::to_yaml(&manifest::service(namespace, name, cluster_ip, ports, &eps))?;
        self.shared.write_manifest(
            &manifest::service_file_name(namespace, name),
            yaml.as_bytes(),
        )
    }

    /// Writes `svc-<ns>-<name>.yaml` for a Service with one ClusterIP per family in
    /// `cluster_ips`, primary first: `&["10.96.0.10", "fd00:10:96::10"]` is a dual-stack
    /// Service (`clusterIPs` both, `ipFamilyPolicy: RequireDualStack`), `&["fd00:10:96::10"]` an
    /// IPv6-only one. Each family gets its EndpointSlice (`<name>-sim` IPv4, `<name>-sim-v6`
    /// IPv6) listing the `endpoints`' addresses of that family, so every endpoint needs an
    /// address of each family the Service has (pods of a [`Sim::new_dual_stack`] sim do).
    pub fn write_service_ips(
        &self,
        namespace: &str,
        name: &str,
        cluster_ips: &[&str],
        ports: &[(&str, u16, u16)],
        endpoints: &[&Pod],
    ) -> Result<PathBuf> {
        let ips = cluster_ips
            .iter()
            .map(|ip| {
                ip.parse::<std::net::IpAddr>()
                    .with_context(|| format!("service {namespace}/{name}: bad cluster IP {ip:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let node_names: Vec<String> = endpoints
            .iter()
            .map(|p| p.node().name().to_string())
            .collect();
        let eps: Vec<manifest::DualStackEndpoint> = endpoints
            .iter()
            .zip(&node_names)
            .map(|(p, node_name)| manifest::DualStackEndpoint {
                endpoint: manifest::Endpoint {
                    ip: p.ip(),
                    pod_name: p.name(),
                    pod_namespace: p.namespace(),
                    pod_uid: p.uid(),
                    node_name,
                    labels: p.labels(),
                },
                ip6: p.ip6().ok(),
            })
            .collect();
        let docs = manifest::service_families(namespace, name, &ips, ports, &eps)?;
        self.shared.write_manifest(
            &manifest::service_file_name(namespace, name),
            manifest::to_yaml(&docs)?.as_bytes(),
        )
    }

    /// Writes a raw manifest file (atomically) into the manifest directory.
    pub fn write_file(&self, name: &str, contents: impl AsRef<[u8]>) -> Result<PathBuf> {
        self.shared.write_manifest(name, contents.as_ref())
    }

    /// Removes a manifest file (a missing file is not an error).
    pub fn remove_file(&self, name: &str) -> Result<()> {
        let p = self.shared.manifest_dir.join(name);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", p.display()))
            }
            _ => Ok(()),
        }
    }

    /// Disables teardown and makes the sim a playground (see [`registry`]): the nodes, pods,
    /// sluice instances and processes stay as they are (handles dropped later leave their
    /// processes running), no sweep removes them, and `cargo xtask sim down <name>` does. A sim
    /// made as a playground keeps its name; another one takes `name`, or `name-2`, `name-3`...
    /// if that is taken. Returns the name. Prints how to look around and how to clean up.
    pub fn keep(&self, name: &str) -> Result<String> {
        let name = match registry::read(self.id()).map(|m| m.kind) {
            Some(SimKind::Playground { name }) => name,
            _ => self.become_playground(name)?,
        };
        self.shared.kept.store(true, Ordering::SeqCst);
        let nodes = self.nodes();
        let mut msg = format!(
            "sluice-sim: keeping sim {} as playground {name:?} (nothing will be torn down)\n",
            self.id()
        );
        for n in &nodes {
            msg += &format!(
                "  node {}: netns {} (ip netns exec {} bash), cgroup {}\n",
                n.short_name(),
                n.netns(),
                n.netns(),
                n.cgroup_root().display()
            );
        }
        if let Some(cp) = self.control_plane() {
            msg += &format!(
                "  control plane: netns {} (ip netns exec {} bash), API server {}, CA service {}\n",
                cp.netns(),
                cp.netns(),
                cp.api_url(),
                cp.ca_url()
            );
        }
        msg += &format!(
            "  manifests: {}\n  logs: {}\n",
            self.manifest_dir().display(),
            self.log_dir().display()
        );
        msg += &format!("  clean up with: cargo xtask sim down {name}");
        eprintln!("{msg}");
        Ok(name)
    }

    /// Claims a playground name (`base`, else `base-2`, ...) and rewrites the marker.
    fn become_playground(&self, base: &str) -> Result<String> {
        let mut last = None;
        for n in 1..=20 {
            let name = if n == 1 { base.to_string() } else { format!("{base}-{n}") };
            registry::release_stale_name(&name);
            match registry::claim_name(&name, self.id()) {
                Ok(()) => {
                    let mut marker = registry::read(self.id()).with_context(|| {
                        format!("sim {} has no marker in {}", self.id(), registry::REGISTRY_DIR)
                    })?;
                    marker.kind = SimKind::Playground { name: name.clone() };
                    registry::update(&marker)?;
                    return Ok(name);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no free playground name")))
    }

    /// Tears everything down now (Drop does the same); returns what could not be removed.
    pub fn teardown(&self) -> Result<()> {
        if self.shared.is_kept() || self.shared.torn_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let id = self.shared.id.clone();
        // The API server runs in this process with its socket in the control plane's
        // namespace: close it first (it also breaks the control plane's reference cycle).
        let control_plane = self.shared.state().control_plane.take();
        if let Some(cp) = control_plane {
            cp.shutdown();
        }
        self.shared.state().pods.clear();
        let report = sweep::sweep_report(&|sim| sim == id);
        // The sandboxes are children of this process: reap them (they were killed above).
        let sandboxes = std::mem::take(&mut self.shared.state().sandboxes);
        for mut child in sandboxes {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The marker goes last, and only once every object is gone: a sim that could not be
        // removed keeps its owner on record, so a later sweep knows it is abandoned.
        if report.errors.is_empty() {
            registry::remove(&id);
        }
        let mut errors = report.errors;
        if std::env::var(KEEP_ENV).is_ok_and(|v| v == "1") {
            eprintln!(
                "sluice-sim {id}: {KEEP_ENV}=1, keeping {}",
                self.shared.temp_dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.shared.temp_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("removing {}: {e}", self.shared.temp_dir.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(
                "sim {id} teardown incomplete:\n  {}",
                errors.join("\n  ")
            ))
        }
    }
}

impl Sim {
    /// When a test fails, its output is all CI shows: print the tails of the logs before the
    /// temp dir goes (sluice logs first, then non-empty stderr of other processes).
    fn dump_logs(&self) {
        let Ok(rd) = fs::read_dir(&self.shared.log_dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        let is_sluice = |p: &PathBuf| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("sluice-"))
        };
        let sluice_logs = files.iter().filter(|p| is_sluice(p)).take(6);
        let stderrs = files
            .iter()
            .filter(|p| !is_sluice(p) && p.extension().is_some_and(|e| e == "stderr"))
            .filter(|p| p.metadata().is_ok_and(|m| m.len() > 0))
            .take(8);
        let mut out = String::new();
        for (p, lines) in sluice_logs.map(|p| (p, 40)).chain(stderrs.map(|p| (p, 10))) {
            out += &format!(
                "--- {} (last {lines} lines)\n{}\n",
                p.display(),
                tail_file(p, lines)
            );
        }
        if out.is_empty() {
            return; // no sluice ran and no process wrote to stderr
        }
        eprint!(
            "sluice-sim {}: teardown; log tails (all logs in {}, removed now unless {KEEP_ENV}=1):\n{out}",
            self.id(),
            self.log_dir().display()
        );
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if !self.shared.is_kept() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.dump_logs()));
        }
        // Never panic in drop (a panic while a failed test unwinds would abort the process).
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.teardown()));
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("sluice-sim: {e:#}"),
            Err(_) => eprintln!("sluice-sim {}: teardown panicked", self.shared.id),
        }
    }
}
