//! A simulated node: a network namespace with a bridge for its pods, an uplink into the fabric,
//! and a cgroup root laid out like a kubelet's.

use std::{
    ffi::OsStr,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::{atomic::AtomicU32, Arc},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    netns,
    pod::{self, Pod, PodOpts},
    process::{self, Output, Placement, SimProcess},
    sluice::{Sluice, SluiceOpts},
    util::ip_batch,
    SimShared, SimState,
};

/// Most nodes a sim may have (10.244.K.0/24 and 10.243.0.K per node).
const MAX_NODES: usize = 200;

/// A simulated node. Cheap to clone; all clones are the same node.
///
/// Node K (1-based): netns `<id>-<name>` with `lo` up, ip_forward on, bridge `sbr0`
/// 10.244.K.1/24 (the pods' gateway), uplink `up0` 10.243.0.K/24 in the fabric, a route to
/// every other node's 10.244.J.0/24 via 10.243.0.J; cgroup root
/// `<cg2>/sluice-sim/<id>/<name>` holding `kubepods/besteffort/` (pods) and `system/` (sluice).
///
/// In a dual-stack sim also: bridge `fd00:10:244:K::1/64`, uplink `fd00:10:243::K/64`, a route
/// to every other node's `fd00:10:244:J::/64` via `fd00:10:243::J`, IPv6 forwarding on, and
/// duplicate address detection off (an address is usable the moment it is added). K is written
/// in decimal digits inside the hextet (node 12 is `fd00:10:244:12::`), so the IPv6 address
/// reads like the IPv4 one.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

/// How the node's kubelet lays out pod cgroups (sluice must find pods under either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupDriver {
    /// `kubepods/besteffort/pod<uid>`, processes directly in the pod cgroup.
    #[default]
    Cgroupfs,
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_with_underscores>.slice`,
    /// processes in a container sub-cgroup `cri-containerd-<id>.scope`, as containerd with the
    /// systemd driver makes them.
    Systemd,
}

pub(crate) struct NodeInner {
    pub sim: Arc<SimShared>,
    pub short: String,
    pub full: String,
    pub index: u8,
    pub cgroup_root: PathBuf,
    pub driver: CgroupDriver,
    pub next_pod: AtomicU32,
    pub sluice_runs: AtomicU32,
}

pub(crate) fn fabric_netns(sim: &SimShared) -> String {
    format!("{}-fab", sim.id)
}

/// Creates the fabric (its netns and bridge `fbr0`) if the sim has none yet.
pub(crate) fn ensure_fabric(sim: &SimShared, state: &mut SimState) -> Result<String> {
    let fab = fabric_netns(sim);
    if !state.fabric {
        netns::add(&fab)?;
        state.fabric = true;
        ip_batch(
            Some(&fab),
            &[
                "link set lo up".into(),
                "link add fbr0 type bridge".into(),
                "link set fbr0 up".into(),
            ],
        )
        .context("setting up the fabric bridge")?;
    }
    Ok(fab)
}

pub(crate) fn pod_cidr(k: u8) -> String {
    format!("10.244.{k}.0/24")
}

pub(crate) fn uplink_ip(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 243, 0, k)
}

/// `n` written in decimal digits and read as hex: 12 → 0x12, so that `fd00:10:244:12::` is
/// node 12's prefix as `10.244.12.` is its IPv4 one. Unique for the numbers used here (< 10000).
pub(crate) fn decimal_hextet(n: u32) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("below 10000, so 4 decimal digits fit a hextet")
}

/// `fd00:10:244:K::/64`.
pub(crate) fn pod_cidr6(k: u8) -> String {
    format!("{}/64", pod_prefix6(k, 0))
}

/// `fd00:10:244:K::host`.
pub(crate) fn pod_prefix6(k: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, decimal_hextet(k.into()), 0, 0, 0, host)
}

pub(crate) fn uplink_ip6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x243, 0, 0, 0, 0, decimal_hextet(k.into()))
}

/// Turns duplicate address detection off in netns `ns`, for the addresses and interfaces
/// created after this: a dual-stack sim's addresses must be usable as soon as they are added,
/// not after a second of DAD (a tentative address cannot be bound or connected from). Both
/// `all` and `default` are needed: the kernel runs DAD if either asks for it.
pub(crate) fn disable_dad(ns: &str) -> Result<()> {
    netns::sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")?;
    netns::sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
}

pub(crate) fn create(sim: &Arc<SimShared>, name: &str, driver: CgroupDriver) -> Result<Node> {
    if name.is_empty()
        || name.len() > 20
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
        || name == "fab"
        || name == crate::control_plane::NAME
    {
        bail!("bad node name {name:?}: use 1-20 of [a-z0-9-], not starting with '-' (and not \"fab\" or \"cp\": the fabric's and the control plane's)");
    }
    // One node at a time: the index, the fabric and the routes on the other nodes depend on
    // the set of nodes.
    let mut state = sim.state();
    if state.nodes.iter().any(|n| n.short_name() == name) {
        bail!("node {name} already exists");
    }
    if state.nodes.len() >= MAX_NODES {
        bail!("at most {MAX_NODES} nodes");
    }
    let k = (state.nodes.len() + 1) as u8;
    let full = format!("{}-{name}", sim.id);
    let fab = ensure_fabric(sim, &mut state)?;

    netns::add(&full)?;
    let dual = sim.dual_stack;
    if dual {
        disable_dad(&full)?;
    }
    let mut cmds: Vec<String> = vec![
        "link set lo up".into(),
        "link add sbr0 type bridge".into(),
        format!("addr add 10.244.{k}.1/24 dev sbr0"),
    ];
    if dual {
        cmds.push(format!("addr add {}/64 dev sbr0 nodad", pod_prefix6(k, 1)));
    }
    cmds.push("link set sbr0 up".into());
    ip_batch(Some(&full), &cmds).context("setting up the node bridge")?;
    // The node routes between its pods' bridge and the fabric, like a real node.
    netns::sysctl(&full, "net.ipv4.ip_forward", "1")?;
    if dual {
        netns::sysctl(&full, "net.ipv6.conf.all.forwarding", "1")?;
    }

    // Uplink: created in the fabric netns with its peer moved straight into the node netns, so
    // names never collide in between.
    ip_batch(
        Some(&fab),
        &[
            format!("link add n{k} type veth peer name up0 netns {full}"),
            format!("link set n{k} master fbr0"),
            format!("link set n{k} up"),
        ],
    )
    .context("creating the node uplink")?;
    let mut cmds = vec![format!("addr add {}/24 dev up0", uplink_ip(k))];
    if dual {
        cmds.push(format!("addr add {}/64 dev up0 nodad", uplink_ip6(k)));
    }
    cmds.push("link set up0 up".into());
    for other in &state.nodes {
        let j = other.index();
        cmds.push(format!("route add {} via {}", pod_cidr(j), uplink_ip(j)));
        if dual {
            cmds.push(format!("route add {} via {}", pod_cidr6(j), uplink_ip6(j)));
        }
    }
    ip_batch(Some(&full), &cmds).context("configuring the node uplink")?;
    for other in &state.nodes {
        let mut cmds = vec![format!("route add {} via {}", pod_cidr(k), uplink_ip(k))];
        if dual {
            cmds.push(format!("route add {} via {}", pod_cidr6(k), uplink_ip6(k)));
        }
        ip_batch(Some(other.netns()), &cmds).with_context(|| {
            format!(
                "adding a route to node {name} on node {}",
                other.short_name()
            )
        })?;
    }
    // The control plane reaches the new node's pods too, as in a cluster.
    if let Some(cp) = &state.control_plane {
        cp.add_routes_to_node(k)
            .with_context(|| format!("adding a route to node {name} on the control plane"))?;
    }

    let cgroup_root = sim.cgroup_root.join(name);
    let qos_dir = match driver {
        CgroupDriver::Cgroupfs => "kubepods/besteffort",
        CgroupDriver::Systemd => "kubepods.slice/kubepods-besteffort.slice",
    };
    for sub in [qos_dir, "system"] {
        let d = cgroup_root.join(sub);
        fs::create_dir_all(&d).with_context(|| format!("creating cgroup {}", d.display()))?;
    }

    let node = Node {
        inner: Arc::new(NodeInner {
            sim: sim.clone(),
            short: name.to_string(),
            full,
            index: k,
            cgroup_root,
            driver,
            next_pod: AtomicU32::new(0),
            sluice_runs: AtomicU32::new(0),
        }),
    };
    state.nodes.push(node.clone());
    Ok(node)
}

impl Node {
    /// The node's name as sluice and the manifests know it: `<simid>-<name>`.
    pub fn name(&self) -> &str {
        &self.inner.full
    }

    /// The name given to [`crate::Sim::add_node`].
    pub fn short_name(&self) -> &str {
        &self.inner.short
    }

    /// K: 1-based position in the sim.
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    /// The node's network namespace (same as [`name`](Self::name)).
    pub fn netns(&self) -> &str {
        &self.inner.full
    }

    /// `<cg2>/sluice-sim/<id>/<name>`: what sluice gets as `--cgroup-root`.
    pub fn cgroup_root(&self) -> &Path {
        &self.inner.cgroup_root
    }

    /// `<root>/kubepods` (or `kubepods.slice`), the parent of all pod cgroups.
    pub fn kubepods_cgroup(&self) -> PathBuf {
        match self.inner.driver {
            CgroupDriver::Cgroupfs => self.inner.cgroup_root.join("kubepods"),
            CgroupDriver::Systemd => self.inner.cgroup_root.join("kubepods.slice"),
        }
    }

    pub fn cgroup_driver(&self) -> CgroupDriver {
        self.inner.driver
    }

    /// `<root>/system`, where node processes (sluice) run.
    pub fn system_cgroup(&self) -> PathBuf {
        self.inner.cgroup_root.join("system")
    }

    /// The pods' gateway, 10.244.K.1.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.inner.index, 1)
    }

    /// The node's address in the fabric, 10.243.0.K.
    pub fn uplink_ip(&self) -> Ipv4Addr {
        uplink_ip(self.inner.index)
    }

    /// `10.244.K.0/24`.
    pub fn pod_cidr(&self) -> String {
        pod_cidr(self.inner.index)
    }

    /// Whether the node (its sim) is dual-stack.
    pub fn is_dual_stack(&self) -> bool {
        self.inner.sim.dual_stack
    }

    /// The pods' IPv6 gateway, `fd00:10:244:K::1` (dual-stack sims only).
    pub fn bridge_ip6(&self) -> Result<Ipv6Addr> {
        self.ensure_dual_stack()?;
        Ok(pod_prefix6(self.inner.index, 1))
    }

    /// The node's IPv6 address in the fabric, `fd00:10:243::K` (dual-stack sims only).
    pub fn uplink_ip6(&self) -> Result<Ipv6Addr> {
        self.ensure_dual_stack()?;
        Ok(uplink_ip6(self.inner.index))
    }

    /// `fd00:10:244:K::/64` (dual-stack sims only).
    pub fn pod_cidr6(&self) -> Result<String> {
        self.ensure_dual_stack()?;
        Ok(pod_cidr6(self.inner.index))
    }

    fn ensure_dual_stack(&self) -> Result<()> {
        if !self.is_dual_stack() {
            bail!(
                "node {} has no IPv6 addresses: its sim is IPv4-only (create it with Sim::new_dual_stack())",
                self.inner.short
            );
        }
        Ok(())
    }

    /// Where this node's sluice listens for admin requests: `<sim tmp>/<name>-admin.sock`, or in
    /// a playground sluice's default, `/run/sluice/<node name>/admin.sock`, so that the CLI
    /// finds it with `--node <node name>` as on a real node.
    pub fn admin_socket_path(&self) -> PathBuf {
        match self.inner.sim.kind {
            crate::SimKind::Playground { .. } => PathBuf::from(crate::sweep::SLUICE_RUN_DIR)
                .join(&self.inner.full)
                .join("admin.sock"),
            crate::SimKind::Test => self
                .inner
                .sim
                .temp_dir
                .join(format!("{}-admin.sock", self.inner.short)),
        }
    }

    /// Creates a pod on this node: netns, veth into the node bridge, cgroup, sandbox process,
    /// manifest (see [`Pod`]).
    pub fn add_pod(&self, namespace: &str, name: &str, opts: PodOpts) -> Result<Pod> {
        self.inner.sim.ensure_live()?;
        pod::create(self, namespace, name, opts).with_context(|| {
            format!(
                "sim {}: adding pod {namespace}/{name} on node {}",
                self.inner.sim.id, self.inner.short
            )
        })
    }

    pub(crate) fn placement(&self, label: &str) -> Placement {
        Placement {
            netns: self.inner.full.clone(),
            cgroup: self.system_cgroup(),
            label: label.to_string(),
        }
    }

    /// A `Command` that runs in the node netns and the node's `system` cgroup (customize stdio,
    /// env, then spawn it yourself).
    pub fn command<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        process::command_in(&self.placement(&format!("{}-node", self.inner.short)), args)
    }

    /// Starts `args[0]` with `args[1..]` in the node netns and `system` cgroup.
    pub fn spawn<I, S>(&self, args: I) -> Result<SimProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.sim.ensure_live()?;
        let placement = self.placement(&format!("{}-node", self.inner.short));
        let cmd = process::command_in(&placement, args)?;
        SimProcess::spawn(&self.inner.sim, &placement, cmd)
    }

    /// Runs a program in the node netns to completion (60 s limit).
    pub fn run<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_timeout(args, Duration::from_secs(60))
    }

    pub fn run_timeout<I, S>(&self, args: I, timeout: Duration) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.sim.ensure_live()?;
        let placement = self.placement(&format!("{}-node", self.inner.short));
        let cmd = process::command_in(&placement, args)?;
        process::run_to_completion(&self.inner.sim, &placement, cmd, timeout)
    }

    /// Starts sluice for this node (see [`Sluice`]). Does not wait for readiness.
    pub fn start_sluice(&self, opts: SluiceOpts) -> Result<Sluice> {
        self.inner.sim.ensure_live()?;
        Sluice::start(self.clone(), opts)
    }

    pub(crate) fn sim(&self) -> &Arc<SimShared> {
        &self.inner.sim
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.full)
            .field("index", &self.inner.index)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_read_like_the_ipv4_ones() {
        assert_eq!(pod_prefix6(1, 1).to_string(), "fd00:10:244:1::1");
        assert_eq!(
            pod_prefix6(12, decimal_hextet(10 + 2)).to_string(),
            "fd00:10:244:12::12"
        );
        assert_eq!(
            pod_prefix6(200, decimal_hextet(254)).to_string(),
            "fd00:10:244:200::254"
        );
        assert_eq!(pod_cidr6(3), "fd00:10:244:3::/64");
        assert_eq!(uplink_ip6(7).to_string(), "fd00:10:243::7");
        // Distinct numbers stay distinct.
        let all: std::collections::BTreeSet<u16> = (0..10_000).map(decimal_hextet).collect();
        assert_eq!(all.len(), 10_000);
    }
}
