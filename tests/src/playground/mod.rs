//! The playground: a simulated cluster built from a directory of a user's own manifests, with
//! sluice on every node and a stand-in workload in every pod. `cargo xtask sim up DIR` runs it
//! and leaves it running; the Bookinfo acceptance tests (`tests/tests/bookinfo.rs`) drive the
//! same code from a test.
//!
//! ```text
//!   user's YAML ──spec::plan──▶ namespaces, pods (named as their controllers name them, spread
//!                               over node-1..node-N), Services (+ClusterIPs), EndpointSlices,
//!                               everything else as written (one object per file)
//!                ──Playground::up──▶ a Sim: nodes, pods, manifests, stand-ins (standin.rs),
//!                               sluice on every node, all enrolled pods holding certificates
//! ```
//!
//! Changes after `up` go through [`Playground::apply`] / [`Playground::delete`] (`cargo xtask
//! sim apply`), object by object as `kubectl apply` does; see [`apply`].

pub mod apply;
pub mod endpoints;
pub mod spec;
pub mod standin;
pub mod state;

use std::{
    collections::BTreeSet,
    ffi::OsString,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{manifest, DetachedProcess, Node, Pod, PodOpts, Sim, SimKind, SimOpts, Sluice, SluiceOpts};
use spec::{Plan, PodPlan, Source};
use standin::Behaviour;

/// How long a stand-in may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long sluice may take to be ready, enroll every pod and hold their certificates (every
/// node signs its pods' certificates at start; on a 2-core machine with tens of pods that takes
/// a few seconds).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// How a playground is built.
#[derive(Debug, Clone)]
pub struct PlaygroundOpts {
    /// Simulated nodes (1 to [`spec::MAX_NODES`]).
    pub nodes: usize,
    /// A test's sim (removed with the test) or a playground kept for `sim down`.
    pub kind: SimKind,
    /// Extra arguments for every node's `sluice run`.
    pub sluice_args: Vec<OsString>,
    /// Where the manifests came from (for the summary).
    pub source: String,
}

impl Default for PlaygroundOpts {
    fn default() -> PlaygroundOpts {
        PlaygroundOpts { nodes: 2, kind: SimKind::Test, sluice_args: Vec::new(), source: String::new() }
    }
}

/// A pod of the playground and what runs in it.
pub struct PlaygroundPod {
    pub plan: PodPlan,
    pub pod: Pod,
    /// One per container.
    pub behaviours: Vec<Behaviour>,
    pub processes: Vec<DetachedProcess>,
}

/// A running playground. Dropping it tears a test's sim down; [`Playground::keep`] leaves it
/// running.
pub struct Playground {
    // Field order is drop order: sluice handles before the sim.
    sluices: Vec<Sluice>,
    pods: Vec<PlaygroundPod>,
    nodes: Vec<Node>,
    plan: Plan,
    opts: PlaygroundOpts,
    sim: Sim,
}

impl Playground {
    /// Builds a playground from the manifests in `dir` (not its subdirectories).
    pub fn from_dir(dir: &Path, mut opts: PlaygroundOpts) -> Result<Playground> {
        let sources = spec::read_dir(dir)?;
        if opts.source.is_empty() {
            opts.source = dir.display().to_string();
        }
        Playground::up(&sources, opts)
    }

    /// Builds a playground from documents already read (see [`spec::read_str`]).
    pub fn up(sources: &[Source], opts: PlaygroundOpts) -> Result<Playground> {
        let plan = spec::plan(sources, opts.nodes, &mut spec::RandomSuffixes)?;
        let sim = Sim::with_opts(SimOpts { dual_stack: false, kind: opts.kind.clone() })?;
        // From here a failure drops `sim`, which removes everything made so far.
        let nodes =
            (1..=plan.nodes).map(|k| sim.add_node(&format!("node-{k}"))).collect::<Result<Vec<_>>>()?;
        for ns in &plan.namespaces {
            sim.write_file(
                &manifest::namespace_file_name(&ns.name),
                manifest::to_yaml(std::slice::from_ref(&ns.doc))?,
            )?;
        }
        let mut pods = Vec::with_capacity(plan.pods.len());
        for p in &plan.pods {
            let opts = PodOpts {
                labels: p.labels.clone(),
                service_account: Some(p.service_account.clone()),
                owner: p.owner.clone(),
                generate_name: p.generate_name.clone(),
            };
            let pod = nodes[p.node].add_pod(&p.namespace, &p.name, opts).with_context(|| p.origin.clone())?;
            pods.push(PlaygroundPod {
                behaviours: p.containers.iter().map(standin::behaviour).collect(),
                plan: p.clone(),
                pod,
                processes: Vec::new(),
            });
        }
        for svc in &plan.services {
            let placed: Vec<endpoints::PlacedEndpoint> = pods
                .iter()
                .map(|p| endpoints::PlacedEndpoint {
                    plan: &p.plan,
                    ip: p.pod.ip(),
                    uid: p.pod.uid(),
                    node_name: p.pod.node().name(),
                })
                .collect();
            let mut docs = vec![svc.doc.clone()];
            docs.extend(endpoints::slices(svc, &placed));
            sim.write_file(
                &manifest::service_file_name(&svc.namespace, &svc.name),
                manifest::to_yaml(&docs)?,
            )?;
        }
        for pt in &plan.passthrough {
            sim.write_file(&pt.file_name, manifest::to_yaml(std::slice::from_ref(&pt.doc))?)?;
        }
        start_stand_ins(&plan, &mut pods)?;
        let sluices = nodes
            .iter()
            .map(|n| n.start_sluice(SluiceOpts { args: opts.sluice_args.clone(), ..SluiceOpts::default() }))
            .collect::<Result<Vec<_>>>()?;
        let pg = Playground { sluices, pods, nodes, plan, opts, sim };
        pg.wait_ready()?;
        pg.write_state()?;
        Ok(pg)
    }

    /// Every sluice ready, every pod of an enrolled namespace enrolled on its node with its
    /// certificate, and every node's model holding every pod.
    fn wait_ready(&self) -> Result<()> {
        let total = self.pods.len() as u64;
        for (i, s) in self.sluices.iter().enumerate() {
            s.wait_ready(READY_TIMEOUT)?;
            let expected: BTreeSet<String> = self
                .pods
                .iter()
                .filter(|p| p.plan.node == i)
                .filter(|p| self.plan.namespace(&p.plan.namespace).is_some_and(|n| n.enrolled))
                .map(|p| format!("{}/{}", p.plan.namespace, p.plan.name))
                .collect();
            s.wait_for(
                "/pods",
                |v| {
                    let ready: BTreeSet<String> = v
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|p| p["certificate"] == "ready")
                        .map(|p| {
                            format!(
                                "{}/{}",
                                p["namespace"].as_str().unwrap_or(""),
                                p["name"].as_str().unwrap_or("")
                            )
                        })
                        .collect();
                    expected.is_subset(&ready)
                },
                READY_TIMEOUT,
            )
            .with_context(|| {
                format!("waiting for {} to enroll {expected:?} with certificates", self.nodes[i].short_name())
            })?;
            s.wait_for("/status", |v| v["model_pods"].as_u64().is_some_and(|n| n >= total), READY_TIMEOUT)?;
        }
        Ok(())
    }

    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// sluice of node `i` (0-based).
    pub fn sluice(&self, i: usize) -> &Sluice {
        &self.sluices[i]
    }

    pub fn sluices(&self) -> &[Sluice] {
        &self.sluices
    }

    pub fn pods(&self) -> &[PlaygroundPod] {
        &self.pods
    }

    /// The pods of `namespace` whose label `key` is `value` (e.g. `app=reviews`).
    pub fn pods_labelled(&self, namespace: &str, key: &str, value: &str) -> Vec<&Pod> {
        self.pods
            .iter()
            .filter(|p| {
                p.plan.namespace == namespace && p.plan.labels.get(key).map(String::as_str) == Some(value)
            })
            .map(|p| &p.pod)
            .collect()
    }

    /// The first pod of `namespace` labelled `app=<app>`.
    pub fn app_pod(&self, namespace: &str, app: &str) -> Result<&Pod> {
        self.pods_labelled(namespace, "app", app)
            .into_iter()
            .next()
            .with_context(|| format!("no pod labelled app={app} in namespace {namespace}"))
    }

    /// `ClusterIP:port` of Service `namespace/name`.
    pub fn service_addr(&self, namespace: &str, name: &str, port: u16) -> Result<SocketAddr> {
        let ip: Ipv4Addr = self
            .plan
            .service(namespace, name)
            .and_then(|s| s.cluster_ip)
            .with_context(|| format!("no Service {namespace}/{name} with a ClusterIP"))?;
        Ok(SocketAddr::from((ip, port)))
    }

    fn target_sockets(&self) -> Vec<PathBuf> {
        self.sluices.iter().map(|s| s.admin_socket().to_path_buf()).collect()
    }

    /// Applies the objects of `yaml` (named `file` in messages) and waits until every node's
    /// sluice took them in; fails with sluice's reason if it rejects one. See [`apply::apply`].
    pub fn apply(&self, file: &str, yaml: &str) -> Result<Vec<String>> {
        let sockets = self.target_sockets();
        apply::apply(
            &apply::Target { manifest_dir: self.sim.manifest_dir(), admin_sockets: &sockets },
            file,
            yaml,
        )
    }

    /// [`Playground::apply`] of a file.
    pub fn apply_file(&self, path: &Path) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.apply(&name, &text)
    }

    /// Deletes the objects of `yaml` that are in force, and waits until every node's sluice
    /// dropped them.
    pub fn delete(&self, file: &str, yaml: &str) -> Result<Vec<String>> {
        let sockets = self.target_sockets();
        apply::delete(
            &apply::Target { manifest_dir: self.sim.manifest_dir(), admin_sockets: &sockets },
            file,
            yaml,
        )
    }

    /// What sluice (node-1's) rejects among the manifests: `(file, reason)`.
    pub fn manifest_errors(&self) -> Result<Vec<(String, String)>> {
        let st = self.sluices[0].get_json("/status")?;
        Ok(st["manifest_errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (e["file"].as_str().unwrap_or("").to_string(), e["reason"].as_str().unwrap_or("").to_string())
            })
            .collect())
    }

    fn write_state(&self) -> Result<()> {
        let st = state::State::of(self);
        state::write(self.sim.temp_dir(), &st)
    }

    /// What was built and how to use it: the nodes and the CLI commands for each, the pods and
    /// what runs in them, the Services, the configuration passed to sluice, what sluice
    /// rejected, and what was not simulated.
    pub fn summary(&self) -> Result<String> {
        let bin = crate::sluice_bin()?;
        let mut out = String::new();
        let name = match &self.opts.kind {
            SimKind::Playground { name } => format!("playground {name}"),
            SimKind::Test => "playground (test)".into(),
        };
        out += &format!(
            "{name}: sim {}, {} node(s), from {}\n",
            self.sim.id(),
            self.nodes.len(),
            self.opts.source
        );
        out += "\nnodes (sluice runs on each; the CLI works against each):\n";
        for (n, s) in self.nodes.iter().zip(&self.sluices) {
            out += &format!("  {}  {}\n", n.short_name(), n.name());
            out += &format!("    {} status --node {}\n", bin.display(), n.name());
            out += &format!(
                "    {} routes --node {}      # also: pods, conns, certs, tap, top, stat\n",
                bin.display(),
                n.name()
            );
            out += &format!("    log: {}\n", s.log_path().display());
        }
        out += "\nnamespaces:\n";
        for ns in &self.plan.namespaces {
            out += &format!(
                "  {:<20} {}: {}\n",
                ns.name,
                if ns.enrolled { "in the mesh" } else { "not in the mesh" },
                ns.why
            );
        }
        out += "\npods:\n";
        for p in &self.pods {
            out += &format!(
                "  {:<45} {:<15} {:<7} {}\n",
                format!("{}/{}", p.plan.namespace, p.plan.name),
                p.pod.ip(),
                self.nodes[p.plan.node].short_name(),
                p.behaviours.iter().map(Behaviour::describe).collect::<Vec<_>>().join("; ")
            );
        }
        out += "\nservices:\n";
        for s in &self.plan.services {
            let ip = s.cluster_ip.map_or("None (headless)".to_string(), |ip| ip.to_string());
            let ports: Vec<String> = s.ports.iter().map(|p| p.port.to_string()).collect();
            out += &format!("  {:<30} {ip}:{}\n", format!("{}/{}", s.namespace, s.name), ports.join(","));
        }
        if !self.plan.passthrough.is_empty() {
            out += "\nconfiguration passed to sluice as written:\n";
            for p in &self.plan.passthrough {
                out += &format!("  {}\n", p.origin);
            }
        }
        let errors = self.manifest_errors()?;
        if !errors.is_empty() {
            out += "\nsluice rejects (see `sluice status`):\n";
            for (file, reason) in errors {
                let file =
                    Path::new(&file).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or(file);
                let origin = self
                    .plan
                    .passthrough
                    .iter()
                    .find(|p| p.file_name == file)
                    .map_or(file.clone(), |p| p.origin.clone());
                out += &format!("  {origin}: {reason}\n");
            }
        }
        if !self.plan.ignored.is_empty() {
            out += "\nnot simulated:\n";
            for (origin, why) in &self.plan.ignored {
                out += &format!("  {origin}: {why}\n");
            }
        }
        if let Some(client) = self.pods.iter().find(|p| p.behaviours.iter().all(|b| *b == Behaviour::Idle)) {
            // Bookinfo's front page first: that is what its tasks look at.
            let svc = self
                .plan
                .services
                .iter()
                .filter(|s| s.cluster_ip.is_some() && !s.ports.is_empty())
                .min_by_key(|s| s.name != "productpage");
            if let Some(svc) = svc {
                let path = if svc.name == "productpage" { "/productpage" } else { "/" };
                let name = match &self.opts.kind {
                    SimKind::Playground { name } => format!("--name {name} "),
                    SimKind::Test => String::new(),
                };
                out += &format!(
                    "\ntry, from pod {ns}/{pod} (in its cgroup and network namespace, so sluice captures it):\n  \
                     cargo xtask sim exec {name}{ns}/{pod} -- curl -s http://{ip}:{port}{path}\n",
                    ns = client.plan.namespace,
                    pod = client.plan.name,
                    ip = svc.cluster_ip.map(|i| i.to_string()).unwrap_or_default(),
                    port = svc.ports[0].port,
                );
            }
        }
        out += &format!(
            "\nmanifests sluice reads (live): {}\nlogs: {}\n",
            self.sim.manifest_dir().display(),
            self.sim.log_dir().display()
        );
        Ok(out)
    }

    /// Leaves everything running as a playground named `name` (see [`Sim::keep`]); returns the
    /// name it got.
    pub fn keep(&self, name: &str) -> Result<String> {
        if !matches!(&self.opts.kind, SimKind::Playground { .. }) {
            bail!("this playground was built as a test's sim; build it with SimKind::Playground to keep it");
        }
        self.sim.keep(name)
    }
}

/// Removes playground `name` whoever made it and whatever state it is in (also when the `sim
/// up` that made it was killed half-way): every object of its sim, its temp dir, its marker and
/// its name. Returns the objects removed.
pub fn down(name: &str) -> Result<Vec<String>> {
    let Some(id) = crate::registry::playground_id(name) else {
        crate::registry::release_stale_name(name);
        bail!("no playground named {name:?} (`cargo xtask sim list` shows them)");
    };
    let marker = crate::registry::read(&id);
    let found = crate::sweep_where(|s| s == id);
    let left = crate::leftovers_of(&id);
    if !left.is_empty() {
        bail!(
            "playground {name} (sim {id}): could not remove everything:\n  {}",
            left.iter().map(|l| l.description.clone()).collect::<Vec<_>>().join("\n  ")
        );
    }
    if let Some(m) = &marker {
        if let Err(e) = std::fs::remove_dir_all(&m.temp_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                bail!("removing {}: {e}", m.temp_dir.display());
            }
        }
    }
    crate::registry::remove(&id);
    crate::registry::release_stale_name(name);
    Ok(found)
}

/// Starts each pod's stand-ins and waits until they listen. Two containers of a pod asking for
/// the same port get one server (a pod has one network namespace).
fn start_stand_ins(plan: &Plan, pods: &mut [PlaygroundPod]) -> Result<()> {
    let simpod = crate::simpod_bin()?;
    let resolve = |ns: &str, name: &str| plan.service(ns, name).and_then(|s| s.cluster_ip);
    for p in pods.iter_mut() {
        let mut bound: BTreeSet<u16> = BTreeSet::new();
        for b in &p.behaviours {
            let b = match b {
                Behaviour::Echo { ports } => Behaviour::Echo {
                    ports: ports.iter().copied().filter(|port| !bound.contains(port)).collect(),
                },
                Behaviour::Bookinfo(_) if bound.contains(&standin::BOOKINFO_PORT) => Behaviour::Idle,
                other => other.clone(),
            };
            match &b {
                Behaviour::Echo { ports } => bound.extend(ports.iter().copied()),
                Behaviour::Bookinfo(_) => {
                    bound.insert(standin::BOOKINFO_PORT);
                }
                Behaviour::Idle => {}
            }
            for args in standin::commands(&p.plan, &b, &resolve) {
                let mut all: Vec<OsString> = vec![simpod.clone().into_os_string()];
                all.extend(args.into_iter().map(OsString::from));
                p.processes.push(p.pod.spawn_detached(all)?);
            }
        }
    }
    for p in pods.iter() {
        for proc in &p.processes {
            proc.wait_listening(LISTEN_TIMEOUT)
                .with_context(|| format!("the stand-in of pod {}/{}", p.plan.namespace, p.plan.name))?;
        }
    }
    Ok(())
}
