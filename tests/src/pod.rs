//! A simulated pod: its own network namespace wired to the node bridge, a cgroup where the
//! kubelet's cgroupfs driver would put it, a sandbox process, and a Pod manifest.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::node::{disable_dad, pod_prefix6, CgroupDriver};
use crate::{
    cgroup, manifest, netns,
    node::Node,
    process::{self, DetachedProcess, Output, Placement, SimProcess},
    util::{ip_batch, poll_until, run_cmd, short_hash, uuid_v4},
};

/// Most pods per node: 10.244.K.10 ..= 10.244.K.254 for the first 245, then 10.244.K.2 ..=
/// 10.244.K.9 (.1 is the node's bridge), so that a node can hold the 250 pods of a burst test.
const MAX_PODS: u32 = 253;
/// Pods numbered from 0 get host number 10 + index up to this many, then the low numbers.
const HIGH_HOSTS: u32 = 245;

/// The host part of pod `index`'s address on its node (see [`MAX_PODS`]).
fn host_number(index: u32) -> u32 {
    if index < HIGH_HOSTS {
        10 + index
    } else {
        2 + (index - HIGH_HOSTS)
    }
}
/// Longest netns name we create (the kernel allows 255; keep `ip netns list` readable).
const MAX_NETNS_NAME: usize = 64;

/// What a pod is created with.
#[derive(Debug, Clone, Default)]
pub struct PodOpts {
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName`; "default" when unset.
    pub service_account: Option<String>,
    /// The controller in `metadata.ownerReferences`; none: a bare pod.
    pub owner: Option<manifest::Owner>,
    /// `metadata.generateName` (what a controller that names its pods randomly sets).
    pub generate_name: Option<String>,
}

impl PodOpts {
    /// `PodOpts::labels(&[("app", "web")])`.
    pub fn labels(labels: &[(&str, &str)]) -> PodOpts {
        PodOpts {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..PodOpts::default()
        }
    }

    pub fn service_account(mut self, sa: &str) -> PodOpts {
        self.service_account = Some(sa.to_string());
        self
    }

    /// A pod created by a controller: `owner("StatefulSet", "db")` for `db-0`,
    /// `owner("Job", "report-28901234")` for a CronJob's pod.
    pub fn owner(mut self, kind: &str, name: &str) -> PodOpts {
        self.owner = Some(manifest::Owner {
            kind: kind.to_string(),
            name: name.to_string(),
        });
        self
    }

    /// `metadata.generateName`, e.g. `"report-28901234-"`.
    pub fn generate_name(mut self, prefix: &str) -> PodOpts {
        self.generate_name = Some(prefix.to_string());
        self
    }
}

/// A simulated pod. Cheap to clone.
///
/// Pod i (0-based) on node K: netns `<id>-<node>-<pod>`, `eth0` 10.244.K.(10+i)/24 (the 246th
/// to 253rd pods of a node: 10.244.K.2 to .9) with a
/// default route via 10.244.K.1, `lo` up; node-side veth `vp<i>` on the node bridge; cgroup
/// `<node root>/kubepods/besteffort/pod<uid>` holding a sandbox process (`sleep infinity`, the
/// pause container's stand-in: sluice finds the pod's netns through it); manifest
/// `pod-<ns>-<name>.yaml`.
///
/// In a dual-stack sim `eth0` also has `fd00:10:244:K::(10+i)/64` (10+i in decimal digits, so
/// pod 10.244.1.12 is fd00:10:244:1::12) with a default route via `fd00:10:244:K::1`, and the
/// manifest lists both addresses in `status.podIPs` (IPv4 first, the primary). Every pod's
/// `eth0` has an IPv6 link-local address as well, dual-stack sim or not ([`Pod::link_local`]).
#[derive(Clone)]
pub struct Pod {
    inner: Arc<PodInner>,
}

struct PodInner {
    node: Node,
    namespace: String,
    name: String,
    uid: String,
    ip: Ipv4Addr,
    /// The IPv6 address in a dual-stack sim.
    ip6: Option<Ipv6Addr>,
    index: u32,
    netns: String,
    cgroup: PathBuf,
    /// Where the pod's processes run: the pod cgroup itself (cgroupfs driver) or a container
    /// scope below it (systemd driver).
    proc_cgroup: PathBuf,
    sandbox_pid: u32,
    labels: BTreeMap<String, String>,
    service_account: String,
    owner: Option<manifest::Owner>,
    generate_name: Option<String>,
    deleted: AtomicBool,
}

/// Kubernetes object names: DNS-1123 subdomain (lowercase alphanumerics, '-', '.'), ≤ 63 here
/// because they also go into file and netns names.
fn check_k8s_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if !ok {
        bail!("bad {what} name {s:?}: use lowercase alphanumerics, '-' and '.', at most 63");
    }
    Ok(())
}

fn netns_name(node: &Node, pod: &str, index: u32, taken: impl Fn(&str) -> bool) -> String {
    let base = format!("{}-{pod}", node.name());
    let name = if base.len() > MAX_NETNS_NAME {
        format!("{}-{}", &base[..MAX_NETNS_NAME - 9], short_hash(&base))
    } else {
        base
    };
    // The same pod name in two namespaces on one node: disambiguate by index.
    if taken(&name) {
        format!("{name}-{index}")
    } else {
        name
    }
}

pub(crate) fn create(node: &Node, namespace: &str, name: &str, opts: PodOpts) -> Result<Pod> {
    check_k8s_name("namespace", namespace)?;
    check_k8s_name("pod", name)?;
    let sim = node.sim().clone();
    {
        let mut state = sim.state();
        if !state
            .pod_names
            .insert((namespace.to_string(), name.to_string()))
        {
            bail!("pod {namespace}/{name} already exists in this sim");
        }
    }
    let index = node.inner.next_pod.fetch_add(1, Ordering::SeqCst);
    if index >= MAX_PODS {
        bail!("at most {MAX_PODS} pods per node");
    }
    let k = node.index();
    let host = host_number(index);
    let ip = Ipv4Addr::new(10, 244, k, host as u8);
    let ip6 = sim
        .dual_stack
        .then(|| pod_prefix6(k, crate::node::decimal_hextet(host)));
    let uid = uuid_v4()?;
    let netns = netns_name(node, name, index, |n| netns::netns_path(n).exists());
    let veth = format!("vp{index}");

    netns::add(&netns)?;
    if ip6.is_some() {
        // Before eth0 exists: its link-local address must not go through DAD either.
        disable_dad(&netns)?;
    }
    // Created from the node side with the peer placed straight into the pod netns as eth0, so
    // the many eth0s never meet in one namespace.
    ip_batch(
        Some(node.netns()),
        &[
            format!("link add {veth} type veth peer name eth0 netns {netns}"),
            format!("link set {veth} master sbr0"),
            format!("link set {veth} up"),
        ],
    )
    .context("creating the pod veth")?;
    let mut cmds = vec![
        "link set lo up".into(),
        format!("addr add {ip}/24 dev eth0"),
    ];
    if let Some(ip6) = ip6 {
        cmds.push(format!("addr add {ip6}/64 dev eth0 nodad"));
    }
    cmds.push("link set eth0 up".into());
    cmds.push(format!("route add default via {}", node.bridge_ip()));
    if ip6.is_some() {
        cmds.push(format!("route add default via {}", node.bridge_ip6()?));
    }
    ip_batch(Some(&netns), &cmds).context("configuring the pod network")?;

    let (cgroup, proc_cgroup) = match node.cgroup_driver() {
        CgroupDriver::Cgroupfs => {
            let c = node
                .kubepods_cgroup()
                .join("besteffort")
                .join(format!("pod{uid}"));
            (c.clone(), c)
        }
        CgroupDriver::Systemd => {
            let c = node
                .kubepods_cgroup()
                .join("kubepods-besteffort.slice")
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                ));
            // Processes live one level down, in a container scope, as on a real node.
            let scope = c.join(format!(
                "cri-containerd-{}.scope",
                &uid.replace('-', "")[..12]
            ));
            (c, scope)
        }
    };
    fs::create_dir_all(&proc_cgroup)
        .with_context(|| format!("creating cgroup {}", proc_cgroup.display()))?;

    // The sandbox holds the pod's netns and cgroup for the pod's lifetime, like the pause
    // container: sluice discovers the pod's netns only via processes in the pod's cgroup.
    let label = format!("{}-{name}", node.short_name());
    let placement = Placement {
        netns: netns.clone(),
        cgroup: proc_cgroup.clone(),
        label,
    };
    let mut cmd = process::command_in(&placement, ["sleep", "infinity"])?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd
        .spawn()
        .context("starting the pod sandbox (sleep infinity)")?;
    let sandbox_pid = child.id();
    sim.state().sandboxes.push(child);

    let pod = Pod {
        inner: Arc::new(PodInner {
            node: node.clone(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid,
            ip,
            ip6,
            index,
            netns,
            cgroup,
            proc_cgroup,
            sandbox_pid,
            labels: opts.labels,
            service_account: opts
                .service_account
                .unwrap_or_else(|| "default".to_string()),
            owner: opts.owner,
            generate_name: opts.generate_name,
            deleted: AtomicBool::new(false),
        }),
    };
    // Last: once the manifest exists the pod is complete (sandbox running in its cgroup).
    pod.write_manifest()?;
    let control_plane = {
        let mut state = sim.state();
        state.pods.push(pod.clone());
        state.control_plane.clone()
    };
    if let Some(cp) = control_plane {
        cp.mirror_pod(&pod)?;
    }
    Ok(pod)
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The pod's UID (UUID v4), also in its cgroup name `pod<uid>`.
    pub fn uid(&self) -> &str {
        &self.inner.uid
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip
    }

    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.inner.ip, port))
    }

    /// The pod's IPv6 address, `fd00:10:244:K::(10+i)`; an error in an IPv4-only sim.
    pub fn ip6(&self) -> Result<Ipv6Addr> {
        self.inner.ip6.with_context(|| {
            format!(
                "pod {}/{} has no IPv6 address: its sim is IPv4-only (create it with Sim::new_dual_stack())",
                self.inner.namespace, self.inner.name
            )
        })
    }

    /// `[ip6]:port` of this pod; an error in an IPv4-only sim.
    pub fn addr6(&self, port: u16) -> Result<SocketAddr> {
        Ok(SocketAddr::V6(SocketAddrV6::new(self.ip6()?, port, 0, 0)))
    }

    /// Every address of the pod as its manifest lists them (`status.podIPs`): the IPv4 address,
    /// then the IPv6 one in a dual-stack sim.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips = vec![IpAddr::V4(self.inner.ip)];
        ips.extend(self.inner.ip6.map(IpAddr::V6));
        ips
    }

    /// The IPv6 link-local address (`fe80::…`) of the pod's `eth0`, which the kernel gives every
    /// veth, also in IPv4-only sims. Waits (up to 10 s) until the address is usable: outside a
    /// dual-stack sim it is tentative for about a second, while the kernel checks that no other
    /// host on the link has it. To reach it from another pod of the node, scope it to that
    /// pod's interface: `[fe80::…%eth0]:port`.
    pub fn link_local(&self) -> Result<Ipv6Addr> {
        self.ensure_live()?;
        let netns = &self.inner.netns;
        let mut last = String::from("no answer yet");
        let found = poll_until(Duration::from_secs(10), || {
            match usable_link_local(netns) {
                Ok(Some(ip)) => return Some(ip),
                Ok(None) => last = "no usable (non-tentative) fe80:: address on eth0 yet".into(),
                Err(e) => last = format!("{e:#}"),
            }
            None
        });
        found.with_context(|| {
            format!(
                "pod {}/{}: no link-local address on eth0 within 10 s ({last})",
                self.inner.namespace, self.inner.name
            )
        })
    }

    /// Position on its node (0-based): the IP's last octet is 10 + index (for the first 245).
    pub fn index(&self) -> u32 {
        self.inner.index
    }

    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// `<node root>/kubepods/besteffort/pod<uid>`.
    pub fn cgroup_path(&self) -> &Path {
        &self.inner.cgroup
    }

    pub fn sandbox_pid(&self) -> u32 {
        self.inner.sandbox_pid
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.inner.labels
    }

    pub fn service_account(&self) -> &str {
        &self.inner.service_account
    }

    /// The controller its manifest names, if any.
    pub fn owner(&self) -> Option<&manifest::Owner> {
        self.inner.owner.as_ref()
    }

    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// `pod-<ns>-<name>.yaml`.
    pub fn manifest_file(&self) -> String {
        manifest::pod_file_name(&self.inner.namespace, &self.inner.name)
    }

    /// (Re)writes the pod's manifest.
    pub fn write_manifest(&self) -> Result<PathBuf> {
        let i = &self.inner;
        let doc = manifest::pod(&manifest::PodManifest {
            namespace: &i.namespace,
            name: &i.name,
            uid: &i.uid,
            labels: &i.labels,
            node_name: i.node.name(),
            service_account: &i.service_account,
            ip: i.ip,
            owner: i.owner.as_ref(),
            generate_name: i.generate_name.as_deref(),
            ip6: i.ip6,
        });
        let yaml = manifest::to_yaml(&[doc])?;
        i.node
            .sim()
            .write_manifest(&self.manifest_file(), yaml.as_bytes())
    }

    fn placement(&self) -> Placement {
        Placement {
            netns: self.inner.netns.clone(),
            cgroup: self.inner.proc_cgroup.clone(),
            label: format!("{}-{}", self.inner.node.short_name(), self.inner.name),
        }
    }

    fn ensure_live(&self) -> Result<()> {
        self.inner.node.sim().ensure_live()?;
        if self.inner.deleted.load(Ordering::SeqCst) {
            bail!(
                "pod {}/{} was deleted",
                self.inner.namespace,
                self.inner.name
            );
        }
        Ok(())
    }

    /// A `Command` that runs in the pod's netns and cgroup (customize, then spawn it yourself).
    pub fn command<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ensure_live()?;
        process::command_in(&self.placement(), args)
    }

    /// Starts `args[0]` with `args[1..]` inside the pod (netns and cgroup).
    pub fn spawn<I, S>(&self, args: I) -> Result<SimProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ensure_live()?;
        let placement = self.placement();
        let cmd = process::command_in(&placement, args)?;
        SimProcess::spawn(self.inner.node.sim(), &placement, cmd)
    }

    /// Runs a program inside the pod to completion (60 s limit).
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
        self.ensure_live()?;
        let placement = self.placement();
        let cmd = process::command_in(&placement, args)?;
        process::run_to_completion(self.inner.node.sim(), &placement, cmd, timeout)
    }

    /// Starts the simpod helper with `args` (e.g. `["echo-server", "--port", "7000"]`).
    pub fn simpod<I, S>(&self, args: I) -> Result<SimProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all = vec![crate::simpod_bin()?.into_os_string()];
        all.extend(process::os_args(args));
        self.spawn(all)
    }

    /// Starts `args[0]` with `args[1..]` inside the pod, detached from this process (output to
    /// log files; it outlives this process, see [`DetachedProcess`]).
    pub fn spawn_detached<I, S>(&self, args: I) -> Result<DetachedProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ensure_live()?;
        let placement = self.placement();
        let cmd = process::command_in(&placement, args)?;
        DetachedProcess::spawn(self.inner.node.sim(), &placement, cmd)
    }

    /// Runs the simpod helper to completion (60 s limit).
    pub fn run_simpod<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_simpod_timeout(args, Duration::from_secs(60))
    }

    pub fn run_simpod_timeout<I, S>(&self, args: I, timeout: Duration) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all = vec![crate::simpod_bin()?.into_os_string()];
        all.extend(process::os_args(args));
        self.run_timeout(all, timeout)
    }

    /// Deletes the pod as the kubelet would: manifest first (the API object goes, from the
    /// control plane's API server too), then every process in its cgroup, the cgroup, and the
    /// netns (which takes the veth pair with it).
    pub fn delete(&self) -> Result<()> {
        if self.inner.deleted.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let sim = self.inner.node.sim();
        let file = sim.manifest_dir.join(self.manifest_file());
        if let Err(e) = fs::remove_file(&file) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e).with_context(|| format!("removing {}", file.display()));
            }
        }
        let control_plane = sim.state().control_plane.clone();
        if let Some(cp) = control_plane {
            cp.unmirror_pod(&self.inner.namespace, &self.inner.name);
        }
        cgroup::kill_tree(&self.inner.cgroup, Duration::from_secs(10))?;
        {
            let mut state = sim.state();
            if let Some(pos) = state
                .sandboxes
                .iter()
                .position(|c| c.id() == self.inner.sandbox_pid)
            {
                let mut child = state.sandboxes.remove(pos);
                let _ = child.wait();
            }
            state
                .pod_names
                .remove(&(self.inner.namespace.clone(), self.inner.name.clone()));
            state.pods.retain(|p| !Arc::ptr_eq(&p.inner, &self.inner));
        }
        cgroup::remove_tree(&self.inner.cgroup)?;
        netns::delete(&self.inner.netns)
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("namespace", &self.inner.namespace)
            .field("name", &self.inner.name)
            .field("ip", &self.inner.ip)
            .field("ip6", &self.inner.ip6)
            .field("netns", &self.inner.netns)
            .finish()
    }
}

/// The link-local address of `eth0` in `netns` once it is usable: not tentative (DAD still
/// running) and not failed (DAD found a duplicate).
fn usable_link_local(netns: &str) -> Result<Option<Ipv6Addr>> {
    let out = run_cmd(
        "ip",
        &[
            "-n", netns, "-j", "-6", "addr", "show", "dev", "eth0", "scope", "link",
        ],
        None,
    )?;
    let links: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("parsing `ip -j addr` output {out:?}"))?;
    let addrs = links
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().into_iter().flatten());
    for a in addrs {
        let flag = |f: &str| a[f].as_bool().unwrap_or(false);
        if flag("tentative") || flag("dadfailed") {
            continue;
        }
        if let Some(ip) = a["local"].as_str().and_then(|s| s.parse::<Ipv6Addr>().ok()) {
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_addresses_never_collide_and_skip_the_gateway() {
        let hosts: std::collections::BTreeSet<u32> = (0..MAX_PODS).map(host_number).collect();
        assert_eq!(hosts.len(), MAX_PODS as usize);
        assert_eq!(host_number(0), 10);
        assert_eq!(host_number(244), 254);
        assert_eq!(host_number(245), 2);
        assert_eq!(host_number(MAX_PODS - 1), 9);
        assert!(!hosts.contains(&1) && !hosts.contains(&0) && !hosts.contains(&255));
    }
}
