//! Live enrollment: keeps the set of pods whose traffic sluice captures equal to "pods on this
//! node, in a namespace annotated `sluice.dev/mesh: enabled`, whose sandbox exists".
//!
//! Enrolling a pod: find its cgroup and network namespace, open its listeners inside that
//! namespace, start accepting, and only then add its cgroup to the kernel's `ENROLLED` map (so
//! the kernel never redirects to a listener that is not there yet). Releasing does it in the
//! opposite order. Connections already open are never touched: they hold their own sockets.
//!
//! A pod is enrolled at once, whether or not its identity's certificate is there yet (it is
//! fetched in the background): its inbound capture, and with it its namespace's peer
//! authentication and the AuthorizationPolicies, must hold from the start. Until the
//! certificate is in, the pod has no HBONE listener (mesh peers find the tunnel port closed and
//! send plaintext, which the capture accepts or refuses by peer authentication), and its
//! outbound connections that need its identity wait for the certificate up to the connect
//! timeout, then are refused (`l4`, `l7::proxy`). The HBONE listener opens on the reconcile
//! that follows the certificate's arrival (the manager wakes the control loop).
//!
//! Runs on the control thread; the only data-path effect is spawning/aborting accept tasks.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{atomic::Ordering, Arc, RwLock},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sluice_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{
    conns::PodStats,
    deliver,
    discovery::{Model, Pod},
    identity::{self, CertManager, CertStatus, SpiffeId},
    inbound::{self, Inbound},
    l4::{self, DataPath, PodContext},
    netns::PodNetns,
    podres::{self, CgroupDriver, PodResError},
    redirect::{CaptureOwner, RedirectError, Redirector},
    transport::server as hbone_server,
};

/// What the admin API shows for one enrolled pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: IpAddr,
    pub cgroup_id: u64,
    pub cgroup_path: PathBuf,
    /// Inode of the pod's network namespace.
    pub netns: u64,
    pub listeners: Vec<SocketAddr>,
    pub identity: String,
    /// `ready`, or `pending: <why>` while the identity's certificate is not there yet (no
    /// HBONE listener, outbound to mesh pods refused).
    #[serde(default)]
    pub certificate: String,
    /// Whether the application sees mesh clients' own addresses (transparent delivery).
    pub source_ip_preserved: bool,
    pub connections_open: u64,
    pub connections_total: u64,
}

/// A pod of the node that sluice does not protect (fully), and why: shown by `sluice status`
/// (and `sluice pods`), so that it is never silently unprotected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodProblem {
    /// "namespace/name".
    pub pod: String,
    /// Enrolled, with this problem (an address not captured), or not enrolled at all.
    pub enrolled: bool,
    pub reason: String,
}

/// The current problems, as the admin API reads them.
pub type ProblemsView = Arc<RwLock<Vec<PodProblem>>>;

/// How often the link-local addresses of an enrolled pod are read again: an address that
/// appears later (an interface added, IPv6 enabled late, an address added by a pod with
/// NET_ADMIN) is captured within this time; one that went is released.
const ADDRESSES_EVERY: Duration = Duration::from_secs(5);

struct EnrolledPod {
    ctx: Arc<PodContext>,
    namespace: String,
    name: String,
    uid: String,
    cgroup_id: u64,
    cgroup_path: PathBuf,
    listeners: Vec<SocketAddr>,
    /// Addresses whose plaintext the kernel steers to our inbound listeners.
    captured: Vec<IpAddr>,
    /// What the kernel's `INBOUND` entries of this pod are registered for.
    owner: CaptureOwner,
    /// The IPv6 inbound listener (a duplicate of its descriptor), to capture link-local
    /// addresses that appear after enrollment; dropped when the pod stops accepting.
    inbound_v6: Option<std::net::TcpListener>,
    /// Link-local addresses seen but not captured (held by another pod), with the reason.
    uncaptured: std::collections::BTreeMap<Ipv6Addr, String>,
    addresses_checked: Instant,
    tasks: Vec<JoinHandle<()>>,
    /// The tunnel port's addresses, served once the identity's certificate is there.
    hbone_addrs: Vec<SocketAddr>,
    hbone: Hbone,
    /// The inbound-capture program's attachment to the pod's namespace (dropping detaches).
    _inbound_link: Option<aya::programs::links::FdLink>,
}

/// Where a pod's HBONE listener stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hbone {
    Serving,
    /// Its identity's certificate is not there yet.
    AwaitingCertificate,
    /// Opening it failed; tried again after this.
    RetryAt(Instant),
}

pub struct Enroller {
    node: String,
    kubepods: PathBuf,
    driver: CgroupDriver,
    redirector: Arc<Redirector>,
    data_rt: tokio::runtime::Handle,
    dp: Arc<DataPath>,
    inbound: Arc<Inbound>,
    identity: Arc<CertManager>,
    trust_domain: String,
    /// Enrolled pods by UID.
    enrolled: HashMap<String, EnrolledPod>,
    /// Pods we are waiting for (sandbox not there yet), so we say so once, not every tick.
    waiting: HashSet<String>,
    /// Enrolled pods waiting for their identity's certificate (fetched in the background), so
    /// we say so once.
    awaiting_certificate: HashSet<String>,
    /// Pods whose enrollment failed for a reason that will not fix itself within a tick
    /// (e.g. the pod holds port 15001), with when we may try again.
    retry_after: HashMap<String, Instant>,
    /// Why those pods are not enrolled, by UID.
    failed: HashMap<String, PodProblem>,
    view: PodsView,
    problems: ProblemsView,
}

/// How long to wait before retrying a pod whose enrollment failed (not merely "not yet").
const FAILED_RETRY: Duration = Duration::from_secs(5);

/// How long a pod's listeners keep accepting after the kernel stopped sending connections to
/// them (pod released, or sluice stopping). A connect() that passed the redirect hook just
/// before is still completing its handshake with our listener, or sits in its accept queue:
/// closing the listener at once would reset it. On loopback and veth the handshake takes
/// microseconds, so half a second is ample even on a loaded node.
pub const LISTENER_LINGER: Duration = Duration::from_millis(500);

/// The enrolled pods as the admin API reads them: static facts plus the live counters.
pub type PodsView = Arc<RwLock<Vec<(PodView, Arc<PodStats>, SpiffeId)>>>;

/// The enrolled pods with their current connection counts and certificate state.
pub fn pods_snapshot(view: &PodsView, certs: &CertManager) -> Vec<PodView> {
    view.read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(v, stats, identity)| PodView {
            connections_open: stats.open.load(Ordering::Relaxed),
            connections_total: stats.total.load(Ordering::Relaxed),
            certificate: certificate_state(&certs.status_of(identity)),
            ..v.clone()
        })
        .collect()
}

/// `ready`, or `pending: <why>`.
fn certificate_state(status: &CertStatus) -> String {
    match status {
        CertStatus::Ready => "ready".into(),
        CertStatus::Pending { failures: 0, .. } => "pending: asked the CA".into(),
        CertStatus::Pending { failures, last_error } => format!(
            "pending: {failures} attempt(s) failed, the last with: {}",
            last_error.as_deref().unwrap_or("?")
        ),
    }
}

impl Enroller {
    pub fn new(
        node: String,
        kubepods: PathBuf,
        driver: CgroupDriver,
        redirector: Arc<Redirector>,
        data_rt: tokio::runtime::Handle,
        dp: Arc<DataPath>,
        inbound: Arc<Inbound>,
    ) -> Self {
        let identity = dp.identity.clone();
        let trust_domain = dp.trust_domain.clone();
        Self {
            node,
            kubepods,
            driver,
            redirector,
            data_rt,
            dp,
            inbound,
            identity,
            trust_domain,
            enrolled: HashMap::new(),
            waiting: HashSet::new(),
            awaiting_certificate: HashSet::new(),
            retry_after: HashMap::new(),
            failed: HashMap::new(),
            view: Arc::new(RwLock::new(Vec::new())),
            problems: Arc::default(),
        }
    }

    /// Shared read-only view of the enrolled pods, for the admin API.
    pub fn view(&self) -> PodsView {
        self.view.clone()
    }

    /// Shared read-only view of the pods sluice does not fully protect, for the admin API.
    pub fn problems_view(&self) -> ProblemsView {
        self.problems.clone()
    }

    /// Brings the enrolled set in line with `model` and with what exists on the node.
    pub fn reconcile(&mut self, model: &Model) {
        let node = self.node.clone();
        let desired: HashMap<&str, &Arc<Pod>> = model
            .pods_on_node(&node)
            .filter(|p| model.is_enrolled(&p.namespace))
            .filter(|p| {
                // A hostNetwork pod shares the node's network namespace: there is no pod
                // namespace to capture in, and capturing the node's would capture everything.
                if p.host_network && self.waiting.insert(p.uid.clone()) {
                    info!(pod = %format!("{}/{}", p.namespace, p.name), "hostNetwork pods are never enrolled");
                }
                !p.host_network
            })
            .map(|p| (p.uid.as_str(), p))
            .collect();

        // Release pods that left the mesh, left the node, or whose sandbox is gone.
        let gone: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(uid, e)| !desired.contains_key(uid.as_str()) || !e.cgroup_path.is_dir())
            .map(|(uid, _)| uid.clone())
            .collect();
        let mut changed = !gone.is_empty();
        for uid in gone {
            if let Some(pod) = self.enrolled.remove(&uid) {
                self.release(pod);
            }
        }
        self.waiting.retain(|uid| desired.contains_key(uid.as_str()) || model.pods_on_node(&node).any(|p| p.host_network && &p.uid == uid));
        self.retry_after.retain(|uid, _| desired.contains_key(uid.as_str()));
        let failures = self.failed.len();
        self.failed.retain(|uid, _| desired.contains_key(uid.as_str()));
        changed |= failures != self.failed.len();
        self.awaiting_certificate.retain(|uid| desired.contains_key(uid.as_str()));
        // Certificates are kept for the identities of every pod that should be enrolled (also
        // those still waiting, whose fetch must go on); the others are dropped, their fetches
        // cancelled.
        let wanted: HashSet<SpiffeId> =
            desired.values().map(|p| SpiffeId::for_pod(&self.trust_domain, p)).collect();
        self.identity.retain(&wanted);

        let now = Instant::now();
        // Pods enrolled before their certificate was there: open their tunnel port if it is now.
        let without_tunnel: Vec<String> =
            self.enrolled.iter().filter(|(_, e)| e.hbone != Hbone::Serving).map(|(uid, _)| uid.clone()).collect();
        for uid in without_tunnel {
            if let Some(mut e) = self.enrolled.remove(&uid) {
                changed |= self.start_hbone(&mut e, now);
                self.enrolled.insert(uid, e);
            }
        }
        for (uid, pod) in desired {
            if self.enrolled.contains_key(uid) || self.retry_after.get(uid).is_some_and(|t| *t > now) {
                continue;
            }
            match self.enroll(pod) {
                Ok(e) => {
                    changed = true;
                    self.waiting.remove(uid);
                    self.retry_after.remove(uid);
                    self.failed.remove(uid);
                    let certificate = if e.hbone == Hbone::Serving { "ready" } else { "pending" };
                    info!(pod = %format!("{}/{}", pod.namespace, pod.name), ip = %pod.ip, cgroup_id = e.cgroup_id, certificate, "pod enrolled");
                    self.enrolled.insert(uid.to_string(), e);
                }
                Err(EnrollError::NotYet(reason)) => {
                    if self.waiting.insert(uid.to_string()) {
                        info!(pod = %format!("{}/{}", pod.namespace, pod.name), %reason, "waiting for pod sandbox");
                    }
                }
                Err(EnrollError::Failed(reason)) => {
                    self.retry_after.insert(uid.to_string(), now + FAILED_RETRY);
                    if self.waiting.insert(uid.to_string()) {
                        warn!(pod = %format!("{}/{}", pod.namespace, pod.name), %reason, retry_in_s = FAILED_RETRY.as_secs(), "cannot enroll pod");
                    }
                    let problem =
                        PodProblem { pod: format!("{}/{}", pod.namespace, pod.name), enrolled: false, reason };
                    changed |= self.failed.get(uid).is_none_or(|p| p.reason != problem.reason);
                    self.failed.insert(uid.to_string(), problem);
                }
            }
        }
        changed |= self.refresh_addresses();
        if changed {
            self.publish_view();
        }
    }

    /// Reads the link-local addresses of the enrolled pods due for it again, captures the new
    /// ones and releases those that went (control path; one `getifaddrs` per pod every
    /// [`ADDRESSES_EVERY`], on the pod's namespace thread). Returns whether a pod's problems
    /// changed.
    fn refresh_addresses(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        for pod in self.enrolled.values_mut() {
            if now.saturating_duration_since(pod.addresses_checked) < ADDRESSES_EVERY {
                continue;
            }
            pod.addresses_checked = now;
            match pod.ctx.netns.run(podres::link_local_addrs) {
                Ok(Ok(found)) => changed |= sync_link_local(&self.redirector, pod, &found),
                Ok(Err(e)) | Err(e) => {
                    debug!(pod = %pod.ctx.key, error = %e, "cannot list the pod's link-local addresses")
                }
            }
        }
        changed
    }

    /// Whether an enrolled pod still waits for its identity's certificate (no tunnel port yet).
    pub fn awaiting_certificates(&self) -> bool {
        self.enrolled.values().any(|e| e.hbone == Hbone::AwaitingCertificate)
    }

    /// Whether any desired pod is still waiting (the caller re-runs reconcile on a timer).
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty() || self.enrolled.values().any(|e| e.hbone != Hbone::Serving)
    }

    /// Opens `pod`'s HBONE listeners if its identity's certificate is there (and a previous
    /// failure's retry time has passed). Returns whether it did.
    fn start_hbone(&mut self, pod: &mut EnrolledPod, now: Instant) -> bool {
        if let Hbone::RetryAt(t) = pod.hbone {
            if t > now {
                return false;
            }
        }
        let identity = pod.ctx.identity.clone();
        let status = self.identity.request(&identity, &self.data_rt);
        if let CertStatus::Pending { failures, last_error } = status {
            pod.hbone = Hbone::AwaitingCertificate;
            if self.awaiting_certificate.insert(pod.uid.clone()) {
                let reason = match last_error {
                    Some(e) => format!("{failures} attempt(s) failed, the last with: {e}"),
                    None => "asked the CA".into(),
                };
                // Debug: this is every first pod of an identity for a few milliseconds; the
                // manager warns when an attempt fails.
                debug!(pod = %pod.ctx.key, identity = %identity, %reason,
                    "enrolled without its certificate yet: no tunnel port (mesh peers send plaintext only if the \
                     namespace is PERMISSIVE, and refuse under STRICT), outbound connections to mesh pods wait for it and are \
                     refused after the connect timeout");
            }
            return false;
        }
        match self.open_hbone(&pod.ctx, &pod.hbone_addrs) {
            Ok(tasks) => {
                pod.tasks.extend(tasks);
                pod.listeners.extend(pod.hbone_addrs.iter().copied());
                pod.hbone = Hbone::Serving;
                if self.awaiting_certificate.remove(&pod.uid) {
                    debug!(pod = %pod.ctx.key, identity = %identity, "certificate in: the pod's tunnel port is open");
                }
                true
            }
            Err(reason) => {
                pod.hbone = Hbone::RetryAt(now + FAILED_RETRY);
                warn!(pod = %pod.ctx.key, %reason, retry_in_s = FAILED_RETRY.as_secs(),
                    "cannot open the pod's tunnel port; retrying (peers send plaintext to it meanwhile only if its \
                     namespace is PERMISSIVE)");
                false
            }
        }
    }

    /// Listens on the pod's tunnel port (its cluster addresses) and serves HBONE with its
    /// identity's certificate.
    fn open_hbone(&self, ctx: &Arc<PodContext>, addrs: &[SocketAddr]) -> Result<Vec<JoinHandle<()>>, String> {
        let server_tls = self
            .identity
            .server_config(&ctx.identity)
            .map_err(|e| format!("TLS server configuration for {}: {e}", ctx.identity))?;
        let results = ctx.netns.listen(addrs).map_err(|e| format!("netns worker: {e}"))?;
        let mut listeners = Vec::new();
        for (addr, result) in addrs.iter().zip(results) {
            let std_listener = result.map_err(|e| {
                format!("cannot listen on {addr} in the pod's network namespace: {e} (is the port taken by the pod?)")
            })?;
            listeners.push((*addr, std_listener));
        }
        let mut tasks = Vec::new();
        for (addr, std_listener) in listeners {
            let _guard = self.data_rt.enter();
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tasks.iter().for_each(JoinHandle::abort);
                    return Err(format!("listener {addr}: {e}"));
                }
            };
            let ctx = ctx.clone();
            let inbound = self.inbound.clone();
            tasks.push(self.data_rt.spawn(hbone_server::serve(
                listener,
                ctx.key.clone(),
                server_tls.clone(),
                |c| identity::peer_identity(c).map(|id| id.to_string()),
                self.inbound.tunnel_stats.clone(),
                self.inbound.admission.clone(),
                move |req| inbound::handle_tunnel(req, ctx.clone(), inbound.clone()),
            )));
        }
        // Serving the mesh here: this node's other pods reach it in-process.
        self.dp.same_node.insert(ctx);
        Ok(tasks)
    }

    fn enroll(&mut self, pod: &Pod) -> Result<EnrolledPod, EnrollError> {
        // The pod's certificate is fetched in the background (one fetch per identity, never
        // waited for here: a slow CA must not hold up the enrollment of other pods). The pod
        // is enrolled now either way; its tunnel port opens once the certificate is in.
        let identity = SpiffeId::for_pod(&self.trust_domain, pod);
        let certificate_ready = self.identity.request(&identity, &self.data_rt) == CertStatus::Ready;
        let cgroup_path = podres::pod_cgroup(&self.kubepods, self.driver, &pod.uid).map_err(EnrollError::from)?;
        let cgroup_id = podres::cgroup_id(&cgroup_path).map_err(EnrollError::from)?;
        let netns_handle = podres::pod_netns(&cgroup_path).map_err(EnrollError::from)?;
        let netns_fd = netns_handle
            .fd
            .try_clone()
            .map_err(|e| EnrollError::Failed(format!("duplicating the netns fd: {e}")))?;
        let key: Arc<str> = format!("{}/{}", pod.namespace, pod.name).into();
        let netns = PodNetns::spawn(netns_handle, &pod.name)
            .map_err(|e| EnrollError::Failed(format!("cannot enter network namespace: {e}")))?;

        // Listeners are SO_REUSEPORT so the next sluice process can open its own next to ours;
        // with tcp_migrate_req, connections still queued on ours when we close them move to
        // the successor's instead of being reset.
        if let Err(e) = netns.run(|| crate::sysctl::write_net("ipv4.tcp_migrate_req", "1")) .and_then(|r| r) {
            debug!(pod = %key, error = %e, "cannot enable tcp_migrate_req (kernel < 5.14?); an upgrade may reset queued connections");
        }
        let transparent = match deliver::prepare_pod(&netns) {
            Ok((t, why_not_v6)) => {
                if let Some(why) = why_not_v6.filter(|_| pod.ips.iter().any(IpAddr::is_ipv6)) {
                    warn!(pod = %key, reason = %why, "IPv6 delivery cannot preserve the client's address; applications will see the pod's own address for IPv6 mesh clients");
                }
                t
            }
            Err(e) => {
                warn!(pod = %key, error = %e, "cannot prepare source-address-preserving delivery; applications will see the pod's own address for mesh clients");
                deliver::Transparent::default()
            }
        };

        // The pod's addresses: its cluster addresses (both families in a dual-stack cluster)
        // and the IPv6 link-local ones of its interfaces, which any pod on the same link can
        // reach and which must be under the same policy.
        let link_local = netns
            .run(crate::podres::link_local_addrs)
            .map_err(|e| EnrollError::Failed(format!("netns worker: {e}")))?
            .unwrap_or_else(|e| {
                debug!(pod = %key, error = %e, "cannot list the pod's link-local addresses");
                Vec::new()
            });
        let mut pod_ips: Vec<IpAddr> = pod.ips.clone();
        if !pod_ips.contains(&pod.ip) {
            pod_ips.insert(0, pod.ip);
        }
        pod_ips.extend(link_local.iter().copied().map(IpAddr::V6));
        let has_v6 = pod_ips.iter().any(IpAddr::is_ipv6);

        let outbound = [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), OUTBOUND_PORT),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), OUTBOUND_PORT),
        ];
        // The tunnel port on each cluster address (mesh peers dial those, never link-local).
        let hbone_addrs: Vec<SocketAddr> =
            pod_ips.iter().filter(|ip| !deliver::is_link_local(**ip)).map(|ip| SocketAddr::new(*ip, HBONE_PORT)).collect();
        // Captured plaintext: the IPv4 listener on the pod's address, as before; one IPv6
        // listener on [::] takes every IPv6 address of the pod (sk_lookup hands it connections
        // whatever the address it is bound to).
        let inbound_v4 = pod_ips.iter().find(|ip| ip.is_ipv4()).map(|ip| SocketAddr::new(*ip, INBOUND_PORT));
        let inbound_v6 = has_v6.then(|| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), INBOUND_PORT));
        let mut addrs = outbound.to_vec();
        addrs.extend(inbound_v4.into_iter().chain(inbound_v6));
        let results = netns
            .listen(&addrs)
            .map_err(|e| EnrollError::Failed(format!("netns worker: {e}")))?;
        let mut listeners = Vec::new();
        for (addr, result) in addrs.iter().zip(results) {
            match result {
                Ok(l) => listeners.push((*addr, l)),
                // IPv6 may be disabled in the pod; everything else is required.
                Err(e) if addr.is_ipv6() && addr.port() == OUTBOUND_PORT && !has_v6 => {
                    debug!(pod = %key, error = %e, "no IPv6 outbound listener")
                }
                Err(e) => {
                    return Err(EnrollError::Failed(format!(
                        "cannot listen on {addr} in the pod's network namespace: {e} (is the port taken by the pod?)"
                    )))
                }
            }
        }

        // The pod's number in the kernel maps comes from its cgroup id, so that every sluice
        // process of this node (old and new, during an upgrade) uses the same one.
        let pod_id = (cgroup_id as u32).max(1);
        let ctx = Arc::new(PodContext {
            pod_id,
            key: key.clone(),
            namespace: pod.namespace.as_str().into(),
            name: pod.name.as_str().into(),
            ip: pod.ip,
            ips: pod_ips.clone(),
            identity_str: identity.to_string().into(),
            identity: identity.clone(),
            netns: netns.clone(),
            stats: Arc::new(PodStats::default()),
            transparent,
            limiter: Arc::new(crate::l7::limits::PodLimiter::new(&self.dp.l7.cfg.pod_limits)),
            workload: Arc::new(crate::discovery::WorkloadInfo::of(pod)),
            // The same counts as before if the pod was enrolled before and its connections
            // still hold them.
            slots: self.dp.admission.pod_slots(&pod.uid),
        });
        let mut tasks = Vec::new();
        let mut bound = Vec::new();
        let mut captured = Vec::new();
        let mut inbound_v6 = None;
        let owner = CaptureOwner { uid: pod.uid.as_str().into(), pod: key.clone() };
        let cleanup = |redirector: &Redirector, tasks: &[JoinHandle<()>], captured: &[IpAddr]| {
            tasks.iter().for_each(JoinHandle::abort);
            captured.iter().for_each(|ip| {
                redirector.unregister_inbound(*ip, &owner);
            });
        };
        for (addr, std_listener) in listeners {
            let is_inbound = addr.port() == INBOUND_PORT;
            if is_inbound {
                // The kernel hands captured plaintext for each of the pod's addresses of this
                // family to this socket: register it before capture starts. A pod whose
                // plaintext cannot be captured is not enrolled at all: its policy would
                // silently not hold.
                // An address another enrolled pod holds (link-local addresses are unique per link
                // only) refuses the enrollment: taking it over would end that pod's capture.
                for ip in pod_ips.iter().filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
                    if let Err(e) = self.redirector.register_inbound(*ip, &std_listener, &owner) {
                        cleanup(&self.redirector, &tasks, &captured);
                        return Err(EnrollError::Failed(match e {
                            RedirectError::AddressTaken { .. } => format!("not enrolled: {e}"),
                            e => format!(
                                "cannot register the inbound listener for {ip}: {e} (plaintext to it would bypass policy)"
                            ),
                        }));
                    }
                    captured.push(*ip);
                }
                if addr.is_ipv6() {
                    inbound_v6 = std_listener.try_clone().ok();
                }
            }
            let _guard = self.data_rt.enter();
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    cleanup(&self.redirector, &tasks, &captured);
                    return Err(EnrollError::Failed(format!("listener {addr}: {e}")));
                }
            };
            let task = if is_inbound {
                self.data_rt.spawn(inbound::serve_plaintext(listener, ctx.clone(), self.inbound.clone()))
            } else {
                self.data_rt.spawn(l4::serve_listener(listener, ctx.clone(), self.dp.clone()))
            };
            tasks.push(task);
            bound.push(addr);
        }
        let inbound_link = match self.redirector.attach_inbound(std::os::fd::AsFd::as_fd(&netns_fd)) {
            Ok(link) => link,
            Err(e) => {
                cleanup(&self.redirector, &tasks, &captured);
                return Err(EnrollError::Failed(format!(
                    "cannot attach inbound capture: {e} (plaintext to this pod would bypass policy)"
                )));
            }
        };
        // The tunnel port, when the certificate is already there (the normal case after the
        // first pod of an identity); else on a later reconcile. A tunnel port that cannot be
        // opened (the pod holds 15008 itself, say) does not undo the enrollment: the capture
        // and the pod's policy stay in force, and it is retried as a later opening is
        // (`start_hbone`); meanwhile peers treat the pod as one without a tunnel port.
        let hbone = if certificate_ready {
            match self.open_hbone(&ctx, &hbone_addrs) {
                Ok(hbone_tasks) => {
                    tasks.extend(hbone_tasks);
                    bound.extend(hbone_addrs.iter().copied());
                    Hbone::Serving
                }
                Err(reason) => {
                    warn!(pod = %ctx.key, %reason, retry_in_s = FAILED_RETRY.as_secs(),
                        "cannot open the pod's tunnel port; enrolled without it, retrying (peers send plaintext to \
                         it only if its namespace is PERMISSIVE)");
                    Hbone::RetryAt(Instant::now() + FAILED_RETRY)
                }
            }
        } else {
            Hbone::AwaitingCertificate
        };
        if let Err(e) = self.redirector.enroll(cgroup_id, pod_id) {
            cleanup(&self.redirector, &tasks, &captured);
            return Err(EnrollError::Failed(e.to_string()));
        }
        let mut enrolled = EnrolledPod {
            ctx,
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            cgroup_id,
            cgroup_path,
            listeners: bound,
            captured,
            owner,
            inbound_v6,
            uncaptured: Default::default(),
            addresses_checked: Instant::now(),
            tasks,
            hbone_addrs,
            hbone,
            _inbound_link: Some(inbound_link),
        };
        if enrolled.hbone == Hbone::AwaitingCertificate {
            // Says so once, and opens the port if the certificate arrived meanwhile.
            self.start_hbone(&mut enrolled, Instant::now());
        }
        Ok(enrolled)
    }

    fn release(&mut self, pod: EnrolledPod) {
        self.awaiting_certificate.remove(&pod.uid);
        self.dp.same_node.remove(&pod.ctx);
        if let Err(e) = self.redirector.release(pod.cgroup_id) {
            warn!(pod = %pod.ctx.key, error = %e, "cannot remove pod from the eBPF enrollment map");
        }
        for ip in &pod.captured {
            self.redirector.unregister_inbound(*ip, &pod.owner);
        }
        // Closing the listeners (after the linger); accepted connections keep running in their
        // own tasks.
        self.retire_listeners(pod.tasks);
        info!(pod = %pod.ctx.key, open_connections = pod.ctx.stats.open.load(Ordering::Relaxed), "pod released");
    }

    /// Stops accepting on every pod's listeners (graceful stop), leaving the kernel state
    /// (enrollment, inbound capture) for a successor process or for fail-open/closed.
    /// Connections already accepted carry on. Returns when the listeners close; the caller
    /// must keep the data runtime up until then.
    ///
    /// With a successor, they close at once: its listeners share our ports (SO_REUSEPORT),
    /// so ours would keep taking new connections for a process that is leaving, and
    /// `tcp_migrate_req` moves whatever is queued on ours to its. Without one, the caller has
    /// already told the kernel to stop redirecting here, and they linger for
    /// [`LISTENER_LINGER`] to take in connections already on their way.
    pub fn stop_accepting(&mut self, successor: bool) -> Instant {
        // (The duplicates of the inbound listeners would keep them open past their tasks.)
        self.enrolled.values_mut().for_each(|p| p.inbound_v6 = None);
        let tasks: Vec<JoinHandle<()>> = self.enrolled.values_mut().flat_map(|p| p.tasks.drain(..)).collect();
        if successor {
            tasks.iter().for_each(JoinHandle::abort);
            return Instant::now();
        }
        self.retire_listeners(tasks);
        Instant::now() + LISTENER_LINGER
    }

    /// Closes listeners the kernel no longer sends connections to, after [`LISTENER_LINGER`],
    /// so that connections already on their way are accepted and served instead of reset.
    fn retire_listeners(&self, tasks: Vec<JoinHandle<()>>) {
        if tasks.is_empty() {
            return;
        }
        self.data_rt.spawn(async move {
            tokio::time::sleep(LISTENER_LINGER).await;
            tasks.iter().for_each(JoinHandle::abort);
        });
    }

    /// Releases everything.
    pub fn release_all(&mut self) {
        let pods: Vec<EnrolledPod> = self.enrolled.drain().map(|(_, p)| p).collect();
        for pod in pods {
            self.release(pod);
        }
        self.publish_view();
    }

    pub fn publish_view(&self) {
        let mut pods: Vec<(PodView, Arc<PodStats>, SpiffeId)> = self
            .enrolled
            .values()
            .map(|e| (PodView {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                uid: e.uid.clone(),
                ip: e.ctx.ip,
                cgroup_id: e.cgroup_id,
                cgroup_path: e.cgroup_path.clone(),
                netns: e.ctx.netns.inode(),
                listeners: e.listeners.clone(),
                identity: e.ctx.identity_str.to_string(),
                certificate: String::new(),
                source_ip_preserved: e.ctx.transparent.v4,
                connections_open: 0,
                connections_total: 0,
            }, e.ctx.stats.clone(), e.ctx.identity.clone()))
            .collect();
        pods.sort_by(|(a, _, _), (b, _, _)| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = pods;
        let mut problems: Vec<PodProblem> = self.failed.values().cloned().collect();
        for pod in self.enrolled.values() {
            problems.extend(pod.uncaptured.iter().map(|(ip, reason)| PodProblem {
                pod: pod.ctx.key.to_string(),
                enrolled: true,
                reason: format!("link-local address {ip} not captured: {reason}"),
            }));
        }
        problems.sort_by(|a, b| (&a.pod, &a.reason).cmp(&(&b.pod, &b.reason)));
        *self.problems.write().unwrap_or_else(|p| p.into_inner()) = problems;
    }
}

/// Brings the captured link-local addresses of an enrolled pod in line with those its
/// interfaces have now (`found`). A new address is registered for the pod's IPv6 inbound
/// listener, unless another pod holds it (then it stays uncaptured, logged once and shown,
/// and is tried again at the next check); an address that went is released. Returns whether
/// the pod's problems changed.
fn sync_link_local(redirector: &Redirector, pod: &mut EnrolledPod, found: &[Ipv6Addr]) -> bool {
    let before = pod.uncaptured.clone();
    pod.uncaptured.retain(|ip, _| found.contains(ip));
    let gone: Vec<IpAddr> = pod
        .captured
        .iter()
        .copied()
        .filter(|ip| matches!(ip, IpAddr::V6(v6) if deliver::is_link_local(*ip) && !found.contains(v6)))
        .collect();
    for ip in gone {
        redirector.unregister_inbound(ip, &pod.owner);
        pod.captured.retain(|c| *c != ip);
        info!(pod = %pod.ctx.key, %ip, "link-local address gone; no longer captured");
    }
    let new: Vec<Ipv6Addr> =
        found.iter().copied().filter(|ip| !pod.captured.contains(&IpAddr::V6(*ip))).collect();
    for ip in new {
        let registered = match &pod.inbound_v6 {
            Some(listener) => {
                redirector.register_inbound(IpAddr::V6(ip), listener, &pod.owner).map_err(|e| e.to_string())
            }
            None => Err("the pod had no IPv6 inbound listener when it was enrolled (enroll it again)".into()),
        };
        match registered {
            Ok(()) => {
                pod.captured.push(IpAddr::V6(ip));
                pod.uncaptured.remove(&ip);
                info!(pod = %pod.ctx.key, %ip, "new link-local address captured");
            }
            Err(reason) => {
                if pod.uncaptured.get(&ip) != Some(&reason) {
                    warn!(pod = %pod.ctx.key, %ip, %reason, "new link-local address not captured: plaintext to it reaches the application without policy");
                }
                pod.uncaptured.insert(ip, reason);
            }
        }
    }
    before != pod.uncaptured
}

enum EnrollError {
    /// The pod is not there yet (no cgroup, no process): try again on the next tick.
    NotYet(String),
    Failed(String),
}

impl From<PodResError> for EnrollError {
    fn from(e: PodResError) -> Self {
        match e {
            PodResError::CgroupNotFound { .. } | PodResError::NoProcesses(_) => EnrollError::NotYet(e.to_string()),
            other => EnrollError::Failed(other.to_string()),
        }
    }
}
