//! The simulated control-plane node: a network namespace on the fabric, with no pods and no
//! sluice of its own, where the cluster's API server (the fake one) and, on demand, the CA
//! service (`sluice ca serve`) run, reachable from every node as they would be in a cluster.
//!
//! ```text
//!   fabric netns <id>-fab: bridge fbr0
//!      │ n1 ─ up0 10.243.0.1   │ n2 ─ up0 10.243.0.2   │ cp0 ─ up0 10.243.0.254
//!   node netns <id>-n1         node netns <id>-n2       control-plane netns <id>-cp
//!                                                          fake API server  :6443 (http)
//!                                                          sluice ca serve  :15012 (gRPC+TLS)
//!                                                                           :15014 (/metrics,
//!                                                                                   /healthz/ready)
//! ```
//!
//! The control plane routes to every node's pod network (10.244.K.0/24), and in a dual-stack
//! sim also has `fd00:10:243::254`. Its processes run in the cgroup
//! `<cg2>/sluice-sim/<id>/cp/system`, so teardown and `sweep` find them like a node's.
//!
//! With a control plane every pod the sim creates is also applied to the fake API server (and
//! removed when the pod is deleted) with its node, ServiceAccount, `Running` phase and IPs, so
//! the CA's watch of pods sees what the nodes serve. The nodes' sluice keeps reading the
//! manifest directory (`--source manifests`).
//!
//! What the nodes and the CA read is laid out like the volumes of the real manifests
//! (`deploy/`), written atomically as the kubelet writes them (see [`crate::projected`]):
//!
//! - the trust bundle (a ConfigMap): `<sim tmp>/trust-bundle/bundle.pem`, see
//!   [`crate::Sim::write_trust_bundle`];
//! - each node's projected ServiceAccount token: `<sim tmp>/nodes/<node>/sluice-ca/token`,
//!   minted by the fake API server for the sluice DaemonSet's ServiceAccount with audience
//!   `sluice-ca`, bound to the node agent's pod and carrying its node (as a kubelet-projected
//!   token does on Kubernetes 1.30+), see [`ControlPlane::write_node_token`];
//! - the CA's signing Secret: `<sim tmp>/control-plane/signing/{signing-cert,signing-key,chain}.pem`,
//!   see [`ControlPlane::set_signing`].

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{atomic::AtomicU32, Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    ca_client::CaClient,
    ca_service::{CaOpts, CaService},
    fake_apiserver::{objects, FakeApiServer, TokenSpec},
    http_probe::{self, HttpReply},
    netns,
    node::{self, disable_dad, Node},
    pki::{self, CaFiles},
    pod::Pod,
    process::{self, Output, Placement, SimProcess},
    projected::ProjectedDir,
    sim_pki,
    util::{self, ip_batch},
    SimShared,
};

/// The control plane's name: its netns is `<id>-cp`, its cgroup `<sim cgroup>/cp`. No node
/// may take it.
pub(crate) const NAME: &str = "cp";
/// The control plane's address in the fabric (node addresses are 10.243.0.1 to .200).
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 243, 0, 254);
/// Its IPv6 address in a dual-stack sim (254 in decimal digits, as node K's is `::K`).
pub const CONTROL_PLANE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x243, 0, 0, 0, 0, 0x254);
/// The fake API server's port (kube-apiserver's usual one; plain HTTP here).
pub const API_PORT: u16 = 6443;
/// The CA service's gRPC port (`--listen`), Istio's.
pub const CA_PORT: u16 = 15012;
/// The CA service's `/metrics` and `/healthz/ready` port (`--metrics-addr`).
pub const CA_METRICS_PORT: u16 = 15014;
/// The ServiceAccount of the sluice DaemonSet (what the CA accepts as a node agent).
pub const NODE_SERVICE_ACCOUNT: (&str, &str) = ("sluice-system", "sluice");
/// The audience of the node agents' tokens (`--audience` of the CA).
pub const CA_AUDIENCE: &str = "sluice-ca";
/// Lifetime of the node tokens the sim writes (the DaemonSet's `expirationSeconds`).
pub const NODE_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// File names in the CA's signing volume.
pub const SIGNING_CERT_FILE: &str = "signing-cert.pem";
pub const SIGNING_KEY_FILE: &str = "signing-key.pem";
pub const CHAIN_FILE: &str = "chain.pem";

/// The sim's control-plane node. Cheap to clone; all clones are the same control plane.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    sim: Arc<SimShared>,
    netns: String,
    /// `<sim cgroup>/cp/system`: where the CA service runs.
    cgroup: PathBuf,
    api: FakeApiServer,
    /// The CA's signing Secret, as mounted.
    signing: ProjectedDir,
    /// Counts CA runs, for log names.
    ca_runs: AtomicU32,
    /// Serializes changes to the agent pods, tokens and signing files.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The sluice DaemonSet's pod object of each node (by node name), once registered.
    agents: BTreeMap<String, AgentPod>,
    /// The token each node's token file holds now (by node name).
    tokens: BTreeMap<String, String>,
}

/// The API object of the sluice DaemonSet's pod on a node (it has no simulated pod: sluice
/// runs in the node's namespace, as a host-network pod does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

pub(crate) fn create(sim: &Arc<SimShared>) -> Result<ControlPlane> {
    let mut state = sim.state();
    if state.control_plane.is_some() {
        bail!("sim {} already has a control plane", sim.id);
    }
    let fab = node::ensure_fabric(sim, &mut state)?;
    let ns = format!("{}-{NAME}", sim.id);
    netns::add(&ns)?;
    let dual = sim.dual_stack;
    if dual {
        disable_dad(&ns)?;
    }
    ip_batch(Some(&ns), &["link set lo up".into()])?;
    ip_batch(
        Some(&fab),
        &[
            format!("link add cp0 type veth peer name up0 netns {ns}"),
            "link set cp0 master fbr0".into(),
            "link set cp0 up".into(),
        ],
    )
    .context("creating the control plane's uplink")?;
    let mut cmds = vec![format!("addr add {CONTROL_PLANE_IP}/24 dev up0")];
    if dual {
        cmds.push(format!("addr add {CONTROL_PLANE_IP6}/64 dev up0 nodad"));
    }
    cmds.push("link set up0 up".into());
    ip_batch(Some(&ns), &cmds).context("configuring the control plane's uplink")?;

    let cgroup = sim.cgroup_root.join(NAME).join("system");
    fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    let api = FakeApiServer::start_in_netns_at(&ns, SocketAddr::new(CONTROL_PLANE_IP.into(), API_PORT))?;
    let signing = ProjectedDir::new(sim.temp_dir.join("control-plane").join("signing"))?;
    let cp = ControlPlane {
        inner: Arc::new(Inner {
            sim: sim.clone(),
            netns: ns,
            cgroup,
            api,
            signing,
            ca_runs: AtomicU32::new(0),
            state: Mutex::new(State::default()),
        }),
    };
    for n in &state.nodes {
        cp.add_routes_to_node(n.index())?;
    }
    state.control_plane = Some(cp.clone());
    // Pods made before the control plane; a pod made from now on applies itself (applying
    // twice is harmless: the second is a MODIFIED with the same content).
    let pods = state.pods.clone();
    drop(state);
    for p in &pods {
        cp.mirror_pod(p)?;
    }
    Ok(cp)
}

impl ControlPlane {
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn sim(&self) -> &Arc<SimShared> {
        &self.inner.sim
    }

    /// The control plane's network namespace, `<id>-cp`.
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// 10.243.0.254.
    pub fn ip(&self) -> Ipv4Addr {
        CONTROL_PLANE_IP
    }

    /// `fd00:10:243::254` (dual-stack sims only).
    pub fn ip6(&self) -> Result<Ipv6Addr> {
        if !self.inner.sim.dual_stack {
            bail!("the control plane has no IPv6 address: its sim is IPv4-only");
        }
        Ok(CONTROL_PLANE_IP6)
    }

    /// `<cg2>/sluice-sim/<id>/cp/system`, where the CA service runs.
    pub fn cgroup(&self) -> &Path {
        &self.inner.cgroup
    }

    /// The cluster's API server, scripted by the test (objects, tokens, watches).
    pub fn api(&self) -> &FakeApiServer {
        &self.inner.api
    }

    /// `10.243.0.254:6443`.
    pub fn api_addr(&self) -> SocketAddr {
        self.inner.api.addr()
    }

    /// `http://10.243.0.254:6443`: what `--kube-api` gets, on a node or the control plane.
    pub fn api_url(&self) -> String {
        self.inner.api.url()
    }

    /// `10.243.0.254:15012`, where the CA service serves.
    pub fn ca_addr(&self) -> SocketAddr {
        SocketAddr::new(CONTROL_PLANE_IP.into(), CA_PORT)
    }

    /// `https://10.243.0.254:15012`: what a node's `--ca-addr` gets.
    pub fn ca_url(&self) -> String {
        format!("https://{}", self.ca_addr())
    }

    /// `10.243.0.254:15014`: the CA's `/metrics` and `/healthz/ready`.
    pub fn ca_metrics_addr(&self) -> SocketAddr {
        SocketAddr::new(CONTROL_PLANE_IP.into(), CA_METRICS_PORT)
    }

    /// `GET path` on `addr` from inside the control plane's namespace.
    pub fn http_get(&self, addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpReply> {
        http_probe::get_in(&self.inner.netns, addr, path, timeout)
    }

    pub(crate) fn placement(&self, label: &str) -> Placement {
        Placement {
            netns: self.inner.netns.clone(),
            cgroup: self.inner.cgroup.clone(),
            label: label.to_string(),
        }
    }

    /// A `Command` that runs in the control plane's netns and cgroup.
    pub fn command<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::command_in(&self.placement(NAME), args)
    }

    /// Starts `args[0]` with `args[1..]` on the control plane.
    pub fn spawn<I, S>(&self, args: I) -> Result<SimProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.sim.ensure_live()?;
        let placement = self.placement(NAME);
        let cmd = process::command_in(&placement, args)?;
        SimProcess::spawn(&self.inner.sim, &placement, cmd)
    }

    /// Runs a program on the control plane to completion (60 s limit).
    pub fn run<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.sim.ensure_live()?;
        let placement = self.placement(NAME);
        let cmd = process::command_in(&placement, args)?;
        process::run_to_completion(&self.inner.sim, &placement, cmd, Duration::from_secs(60))
    }

    /// Routes from the control plane to node K's pod network, via the node's uplink.
    pub(crate) fn add_routes_to_node(&self, k: u8) -> Result<()> {
        let mut cmds = vec![format!("route add {} via {}", node::pod_cidr(k), node::uplink_ip(k))];
        if self.inner.sim.dual_stack {
            cmds.push(format!("route add {} via {}", node::pod_cidr6(k), node::uplink_ip6(k)));
        }
        ip_batch(Some(&self.inner.netns), &cmds)
    }

    /// Applies `pod`'s API object (node, ServiceAccount, Running, IPs) to the fake API server.
    pub(crate) fn mirror_pod(&self, pod: &Pod) -> Result<()> {
        self.inner.api.apply(objects::sim_pod(pod)).map(|_| ()).with_context(|| {
            format!("applying pod {}/{} to the control plane's API server", pod.namespace(), pod.name())
        })
    }

    /// Removes a pod's API object (one already gone, e.g. deleted by the test through the API,
    /// is not an error).
    pub(crate) fn unmirror_pod(&self, namespace: &str, name: &str) {
        let _ = self.inner.api.delete("Pod", namespace, name);
    }

    /// The sluice DaemonSet's pod on `node` in the API (`sluice-system/sluice-<5 chars>`,
    /// host network, ServiceAccount `sluice`, Running), registered on first use: what the node
    /// agent's projected token is bound to.
    pub fn node_agent_pod(&self, node: &Node) -> Result<AgentPod> {
        let mut st = self.state();
        if let Some(a) = st.agents.get(node.name()) {
            return Ok(a.clone());
        }
        let name = format!("sluice-{}", random_suffix()?);
        let stored = self.inner.api.apply(objects::node_agent_pod(&name, node.name(), node.uplink_ip()))?;
        let uid = stored["metadata"]["uid"]
            .as_str()
            .ok_or_else(|| anyhow!("the stored pod has no uid: {stored}"))?
            .to_string();
        let agent = AgentPod { namespace: NODE_SERVICE_ACCOUNT.0.to_string(), name, uid };
        st.agents.insert(node.name().to_string(), agent.clone());
        Ok(agent)
    }

    /// What the kubelet projects into the node agent's pod on `node`: a token of
    /// `sluice-system/sluice` for audience `sluice-ca`, valid an hour, bound to the agent's pod
    /// and carrying `node`. Tests derive the bad ones from it (another node, ServiceAccount or
    /// audience; no binding; expired with [`FakeApiServer::expire_token`]).
    pub fn node_agent_token_spec(&self, node: &Node) -> Result<TokenSpec> {
        let agent = self.node_agent_pod(node)?;
        Ok(TokenSpec::new(NODE_SERVICE_ACCOUNT.0, NODE_SERVICE_ACCOUNT.1)
            .audiences(&[CA_AUDIENCE])
            .expires_in(NODE_TOKEN_LIFETIME)
            .node(node.name())
            .pod(&agent.namespace, &agent.name, &agent.uid))
    }

    /// `<sim tmp>/nodes/<node>/sluice-ca/token`: what the node's sluice gets as
    /// `--ca-token-file` (re-read for every request, as the kubelet rotates it).
    pub fn node_token_path(&self, node: &Node) -> PathBuf {
        self.node_token_dir(node).join("token")
    }

    fn node_token_dir(&self, node: &Node) -> PathBuf {
        self.inner.sim.temp_dir.join("nodes").join(node.short_name()).join("sluice-ca")
    }

    /// Mints a token for `spec` and writes it into `node`'s token file (atomically, as the
    /// kubelet rotates a projected token: the old token stays valid until it expires). Returns
    /// the token.
    pub fn write_node_token(&self, node: &Node, spec: TokenSpec) -> Result<String> {
        let token = self.inner.api.mint_token(spec)?;
        let mut st = self.state();
        ProjectedDir::new(self.node_token_dir(node))?
            .write(&[("token", token.as_bytes())], 0o400)
            .with_context(|| format!("writing node {}'s token", node.short_name()))?;
        st.tokens.insert(node.name().to_string(), token.clone());
        Ok(token)
    }

    /// A fresh token of the node agent's kind ([`Self::node_agent_token_spec`]) in `node`'s
    /// token file: the kubelet's rotation.
    pub fn rotate_node_token(&self, node: &Node) -> Result<String> {
        let spec = self.node_agent_token_spec(node)?;
        self.write_node_token(node, spec)
    }

    /// The token `node`'s token file holds, if one was written.
    pub fn node_token(&self, node: &Node) -> Option<String> {
        self.state().tokens.get(node.name()).cloned()
    }

    /// The path of `node`'s token file, written with the node agent's token if it holds none
    /// yet.
    pub fn ensure_node_token(&self, node: &Node) -> Result<PathBuf> {
        if self.node_token(node).is_none() {
            self.rotate_node_token(node)?;
        }
        Ok(self.node_token_path(node))
    }

    /// The CA's signing volume (`<sim tmp>/control-plane/signing`).
    pub fn signing_dir(&self) -> &Path {
        self.inner.signing.dir()
    }

    /// `(signing-cert.pem, signing-key.pem)` paths in the signing volume.
    pub fn signing_paths(&self) -> (PathBuf, PathBuf) {
        (self.inner.signing.path(SIGNING_CERT_FILE), self.inner.signing.path(SIGNING_KEY_FILE))
    }

    /// The chain file's path if the signing volume holds a chain.
    pub fn chain_path(&self) -> Result<Option<PathBuf>> {
        Ok(self.inner.signing.names()?.contains(CHAIN_FILE).then(|| self.inner.signing.path(CHAIN_FILE)))
    }

    /// Replaces the CA's signing Secret (atomically, as the kubelet updates a Secret volume):
    /// the certificate and key the CA signs with, and `chain` (certificates between it and the
    /// root, nearest first; empty when the root signed it). A running CA picks it up as it
    /// re-reads its files (or on [`CaService::reload`]); a chain added after the CA started is
    /// passed only from its next start on (`--chain` is given when the file exists at start).
    pub fn set_signing(&self, signing: &CaFiles, chain: &[&CaFiles]) -> Result<()> {
        let cert = signing.cert_pem()?;
        let key = signing.key_pem()?;
        let chain_pem = pki::bundle_pem(chain)?;
        let mut files: Vec<(&str, &[u8])> =
            vec![(SIGNING_CERT_FILE, cert.as_bytes()), (SIGNING_KEY_FILE, key.as_bytes())];
        if !chain.is_empty() {
            files.push((CHAIN_FILE, chain_pem.as_bytes()));
        }
        let _st = self.state();
        self.inner.signing.write(&files, 0o400)
    }

    /// The signing CA a control plane starts with: an intermediate `sluice-ca` under the sim's
    /// mesh root (made once, in `<sim tmp>/pki/sluice-ca`), as production runs the CA service
    /// under an offline root.
    pub fn default_signing(&self) -> Result<CaFiles> {
        let root = sim_pki::mesh_root(&self.inner.sim)?;
        pki::intermediate(
            &root,
            &sim_pki::pki_dir(&self.inner.sim, "sluice-ca")?,
            "sluice-ca",
            "cluster.local",
        )
    }

    /// A client of the CA service calling from `node`'s network namespace (as that node's
    /// sluice would), verifying the CA's certificate for `10.243.0.254` against the sim's trust
    /// bundle as it is now. Send it any token and CSR (see [`crate::ca_client`]).
    pub fn ca_client(&self, node: &Node) -> Result<CaClient> {
        let bundle = sim_pki::ensure_trust_bundle(&self.inner.sim)?;
        Ok(CaClient {
            netns: Some(node.netns().to_string()),
            addr: self.ca_addr(),
            server_name: CONTROL_PLANE_IP.to_string(),
            roots_pem: fs::read_to_string(&bundle)
                .with_context(|| format!("reading {}", bundle.display()))?,
        })
    }

    /// Starts `sluice ca serve` on the control plane (see [`CaService`]). Does not wait for
    /// readiness. One CA at a time: a second would not get the port.
    pub fn start_ca(&self, opts: CaOpts) -> Result<CaService> {
        self.inner.sim.ensure_live()?;
        match &opts.signing {
            Some(s) => {
                let chain: Vec<&CaFiles> = opts.chain.iter().collect();
                self.set_signing(s, &chain)?;
            }
            None if self.inner.signing.names()?.is_empty() => {
                let s = self.default_signing()?;
                self.set_signing(&s, &[])?;
            }
            None => {}
        }
        sim_pki::ensure_trust_bundle(&self.inner.sim)?;
        CaService::start(self.clone(), opts)
    }

    /// 1 for the first CA run, then 2, ... (log file names).
    pub(crate) fn next_ca_run(&self) -> u32 {
        self.inner.ca_runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    /// Stops the fake API server (teardown): every later request is refused.
    pub(crate) fn shutdown(&self) {
        self.inner.api.shutdown();
    }
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("netns", &self.inner.netns)
            .field("api", &self.inner.api.addr())
            .finish()
    }
}

/// Five characters of a controller's generated name suffix (`[b-df-hj-np-tv-z2-9]`, as
/// Kubernetes' `utilrand.String` picks them: no vowels, no 0/1/3).
fn random_suffix() -> Result<String> {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    Ok(util::random_bytes(5)?.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect())
}
