//! `sluice run`: wires the node daemon together.
//!
//! Threads: the data path runs on a multi-threaded tokio runtime; the control path (discovery
//! updates → enrollment) runs on the main thread; the admin API, the heartbeat and the eBPF log
//! reader share one single-threaded runtime of their own. The control path hands the data path
//! immutable model snapshots through an `ArcSwap` and never waits on it.

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, mpsc, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use crate::{
    admin::{
        health, metrics_server,
        server::{self, AdminState},
    },
    conns::ConnRegistry,
    discovery::{self, Model},
    enroll::Enroller,
    identity::{
        self, CertManager, CertManagerConfig, CertificateAuthority, EmbeddedCa, EmbeddedCaConfig, RemoteCa,
        RemoteCaConfig, TrustBundleFile,
    },
    inbound::Inbound,
    l4::DataPath,
    podres,
    redirect::{FailMode, RedirectConfig, Redirector},
    routing::RoundRobin,
    transport::{HbonePool, ServerStats},
};

#[derive(Debug, Clone)]
pub struct RunArgs {
    pub node: String,
    /// Where the model comes from: the manifest directory (default) or the Kubernetes API.
    pub source: discovery::SourceConfig,
    pub cgroup_root: PathBuf,
    pub fail_mode: FailMode,
    pub admin_addr: std::net::SocketAddr,
    /// The kubelet's readiness endpoint (`GET /healthz/ready`), default 0.0.0.0:15021.
    pub readiness_addr: std::net::SocketAddr,
    /// Prometheus metrics (`GET /metrics`, OpenMetrics), default 0.0.0.0:15020.
    pub metrics_addr: std::net::SocketAddr,
    pub admin_socket: PathBuf,
    pub bpffs: PathBuf,
    pub connect_timeout: Duration,
    /// Who signs the workload certificates of this node's pods.
    pub ca: CaConfig,
    pub trust_domain: String,
    /// Istio's root namespace (`--root-namespace`): mesh-wide security policies live there.
    pub root_namespace: String,
    /// Lifetime of workload certificates (renewed at half of it).
    pub cert_lifetime: Duration,
    /// On SIGTERM, how long open connections may take to finish before sluice exits.
    pub drain_timeout: Duration,
    pub l7: crate::l7::L7Config,
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Connection bounds given on the command line (the rest derive from RLIMIT_NOFILE).
    pub admission: crate::admission::AdmissionFlags,
    /// Opaque TCP with no bytes either way for this long is closed (`None`: never).
    pub tcp_idle_timeout: Option<Duration>,
    /// How traffic between two pods of this node travels (`--same-node`).
    pub same_node: crate::same_node::SameNodeMode,
}

/// The node's CA.
#[derive(Debug, Clone)]
pub enum CaConfig {
    /// The embedded CA (`--ca-dir`: `ca.pem`, `ca-key.pem`): for the demo, the simulator and
    /// small setups; this node holds the mesh root key.
    Embedded { dir: PathBuf },
    /// A CA service (`--ca-addr`): this node holds no key, only the trust bundle and its token.
    Remote {
        addr: String,
        /// PEM roots, the current one first: verifies the CA and is the mesh trust bundle.
        trust_bundle: PathBuf,
        /// The projected ServiceAccount token (audience sluice-ca), read for every request.
        token_file: PathBuf,
        /// The name the CA's certificate must carry, when it is not the URL's host.
        server_name: Option<String>,
    },
}

enum Control {
    Model(Arc<Model>),
    /// Something enrollment waits for is there (a pod's certificate): reconcile now.
    Reconcile,
    /// SIGHUP: read the system's trust roots again.
    ReloadTrustRoots,
    Shutdown(&'static str),
}

/// How often the heartbeat the kernel programs check is refreshed (they treat 3 s of
/// silence as "sluice is gone").
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);
/// Re-check pods on the node this often (sandboxes appearing, pods dying).
const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// Re-read the node's addresses this often (for the loop guard: sluice's node ports on them).
const NODE_ADDRS_EVERY: Duration = Duration::from_secs(5);

/// The node's addresses as the loop guard sees them (sluice runs in the node's namespace).
fn refresh_node_addrs(guard: &crate::loopguard::LoopGuard) {
    match crate::loopguard::node_addresses() {
        Ok(addrs) => guard.set_node_addrs(addrs),
        Err(e) => warn!(error = %e, "cannot list the node's addresses; the loop guard keeps the previous list"),
    }
}

/// How long start-up waits for the first certificates of the node's pods before reporting
/// ready anyway.
const FIRST_CERTIFICATES_WAIT: Duration = Duration::from_secs(10);

pub fn run(args: RunArgs) -> Result<()> {
    let nofile = crate::admission::raise_fd_limit();
    let memory_max = crate::admission::own_memory_limit();
    let started = Instant::now();
    let (limits, warnings) = crate::admission::AdmissionConfig::derive(nofile, memory_max, args.admission);
    for w in warnings {
        warn!("{w}");
    }
    let derivation = limits.derivation.expect("derived limits say how");
    info!(
        nofile,
        memory_max_mib = memory_max.map(|m| m >> 20),
        fd_cap = derivation.fd_cap,
        memory_cap = derivation.memory_cap,
        connection_memory_kib = derivation.connection_memory >> 10,
        bound_by = ?derivation.bound_by,
        max_connections = limits.max_connections,
        max_sockets = limits.max_sockets,
        pod_max_connections = limits.pod_max_connections,
        pod_max_inbound_connections = limits.pod_max_inbound,
        peer_max_inbound_connections = limits.peer_max_inbound,
        "connection limits"
    );
    let admission = Arc::new(crate::admission::Admission::new(limits));
    let idle = Arc::new(crate::idle::IdleTimeout::new(args.tcp_idle_timeout));

    // Preflight: everything that can be wrong with the host is reported before touching it.
    let (kubepods, driver) = podres::kubepods(&args.cgroup_root).context("locating the pods' cgroup")?;
    let own_cgroup = podres::own_cgroup().context("finding sluice's own cgroup")?;
    if own_cgroup.starts_with(&kubepods) {
        bail!(
            "sluice runs inside the pods' cgroup ({}); it must run in a cgroup outside {} so that its own connections are never redirected",
            own_cgroup.display(),
            kubepods.display()
        );
    }
    let self_cgroup_id = podres::cgroup_id(&own_cgroup)?;

    // TLS origination's trust anchors are built on the control path, never by a request: the
    // system's roots now (and periodically), a policy's own with the model that brings it.
    let tls_origin = Arc::new(crate::l7::tls_origin::TlsOrigin::default());
    tls_origin.load_system_roots();

    // Discovery: the first model is complete before anything is enrolled.
    let model = Arc::new(ArcSwap::from_pointee(Model::default()));
    // RequestAuthentications' key sets: the URLs a model names are known to the cache before
    // the data path sees that model; fetching runs on a task of its own.
    let jwks = crate::jwt::jwks::Jwks::new(model.clone(), tls_origin.clone());
    let (control_tx, control_rx) = mpsc::channel::<Control>();
    let _source = {
        let model = model.clone();
        let tx = control_tx.clone();
        let tls_origin = tls_origin.clone();
        let jwks = jwks.clone();
        args.source
            .spawn(&args.node, move |m: Arc<Model>| {
                tls_origin.sync(&m);
                jwks.sync(&m);
                model.store(m.clone());
                let _ = tx.send(Control::Model(m));
            })
            .with_context(|| format!("loading the model from the {}", args.source.describe()))?
    };

    let (redirector, logger) = Redirector::load_and_attach(&RedirectConfig {
        node: args.node.clone(),
        attach_cgroup: kubepods.clone(),
        self_cgroup_id,
        fail_mode: args.fail_mode,
        bpffs: args.bpffs.clone(),
    })
    .context("loading and attaching the eBPF programs (sluice needs root, cgroup v2 and a kernel with BPF cgroup hooks, 5.8 or newer)")?;
    let redirector = Arc::new(redirector);

    let data_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("sluice-data")
        .enable_all()
        .build()
        .context("starting the data-path runtime")?;

    // Identities: the CA signs only for pods scheduled on this node.
    let (ca, trust_bundle) = load_ca(&args, &model, data_rt.handle())?;
    let certs = Arc::new(
        CertManager::new(&args.node, &args.trust_domain, ca, CertManagerConfig::default())
            .context("starting the certificate manager")?,
    );

    let conns = Arc::new(ConnRegistry::default());
    let loop_guard = Arc::new(crate::loopguard::LoopGuard::new(&[
        args.admin_addr.port(),
        args.metrics_addr.port(),
        args.readiness_addr.port(),
    ]));
    refresh_node_addrs(&loop_guard);
    let telemetry = {
        let _rt = data_rt.enter(); // exporters and writers start their tasks here
        Arc::new(crate::telemetry::Telemetry::new(&args.telemetry))
    };
    let dp = Arc::new(DataPath {
        redirector: redirector.clone(),
        model: model.clone(),
        conns: conns.clone(),
        balancer: RoundRobin::default(),
        connect_timeout: args.connect_timeout,
        identity: certs.clone(),
        trust_domain: args.trust_domain.clone(),
        root_namespace: args.root_namespace.as_str().into(),
        pool: HbonePool::default(),
        tunnel_fallbacks: Default::default(),
        tunnel_fallbacks_refused: Default::default(),
        l7: crate::l7::L7::new(args.l7.clone()).with_tls_origin(tls_origin.clone()),
        draining: tokio::sync::watch::channel(false).0,
        telemetry: telemetry.clone(),
        loop_guard: loop_guard.clone(),
        admission: admission.clone(),
        idle: idle.clone(),
        same_node: crate::same_node::SameNode::new(args.same_node),
    });
    data_rt.spawn(reap_upstreams(dp.clone()));
    // At a connection bound, idle pooled connections make room before anything is refused.
    admission.set_shedder({
        let dp = Arc::downgrade(&dp);
        move |scope| dp.upgrade().map_or(0, |dp| dp.l7.upstreams.shed_idle(scope) + dp.pool.shed_idle(scope))
    });
    certs.spawn_rotation(data_rt.handle());
    {
        let tx = control_tx.clone();
        certs.on_issued(move || {
            let _ = tx.send(Control::Reconcile);
        });
    }
    let inbound_stats = Arc::new(ServerStats::default());
    let inbound = Arc::new(Inbound {
        redirector: redirector.clone(),
        model: model.clone(),
        conns: conns.clone(),
        counters: Default::default(),
        tunnel_stats: inbound_stats.clone(),
        connect_timeout: args.connect_timeout,
        telemetry: telemetry.clone(),
        loop_guard: loop_guard.clone(),
        admission: admission.clone(),
        idle: idle.clone(),
        security: Arc::new(crate::inbound::Security {
            root_namespace: args.root_namespace.as_str().into(),
            jwks: jwks.clone(),
            counters: Default::default(),
            detect_timeout: args.l7.detect_timeout,
            opaque_ports: args.l7.opaque_ports.clone(),
        }),
    });
    dp.same_node.set_inbound(inbound.clone());
    data_rt.spawn(jwks.clone().run());
    let mut enroller = Enroller::new(
        args.node.clone(),
        kubepods.clone(),
        driver,
        redirector.clone(),
        data_rt.handle().clone(),
        dp.clone(),
        inbound.clone(),
    );

    let admin = Arc::new(AdminState {
        node: args.node.clone(),
        started,
        ready: Default::default(),
        redirector: redirector.clone(),
        model: model.clone(),
        conns: conns.clone(),
        pods: enroller.view(),
        pod_problems: enroller.problems_view(),
        certs: certs.clone(),
        inbound,
        data: dp,
    });
    let requeue = control_tx.clone();
    let readiness = start_admin_thread(&args, admin.clone(), redirector.clone(), logger, control_tx)?;

    enroller.reconcile(&model.load());
    // Ready means the node's pods are enrolled (during an upgrade, the previous process leaves
    // once this one is ready). Certificates come in the background: wait for the first ones,
    // within a bound (a CA that does not answer must not keep the node from ever being ready).
    let first_certs_by = Instant::now() + FIRST_CERTIFICATES_WAIT;
    while enroller.awaiting_certificates() && Instant::now() < first_certs_by {
        match control_rx.recv_timeout(RECONCILE_EVERY) {
            Ok(Control::Model(m)) => enroller.reconcile(&m),
            Ok(Control::Shutdown(why)) => {
                // Handled by the main loop below, like any stop.
                let _ = requeue.send(Control::Shutdown(why));
                break;
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => enroller.reconcile(&model.load()),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if enroller.awaiting_certificates() {
        warn!(waited_s = FIRST_CERTIFICATES_WAIT.as_secs(), "ready while some pods still wait for their certificates (the CA is slow or refuses); they are enrolled, and their tunnel port opens once it answers (see `sluice certs`)");
    }
    admin.ready.store(true, Ordering::Release);
    info!(
        node = %args.node,
        kubepods = %kubepods.display(),
        fail_mode = ?args.fail_mode,
        admin = %args.admin_addr,
        readiness = %args.readiness_addr,
        metrics = %args.metrics_addr,
        admin_socket = %args.admin_socket.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "sluice ready"
    );

    let mut addrs_refreshed = Instant::now();
    let mut roots_loaded = Instant::now();
    let reason = loop {
        if roots_loaded.elapsed() >= crate::l7::tls_origin::SYSTEM_ROOTS_RELOAD {
            tls_origin.load_system_roots();
            roots_loaded = Instant::now();
        }
        match control_rx.recv_timeout(RECONCILE_EVERY) {
            Ok(Control::Model(m)) => enroller.reconcile(&m),
            Ok(Control::Reconcile) => enroller.reconcile(&model.load()),
            Ok(Control::ReloadTrustRoots) => {
                tls_origin.load_system_roots();
                roots_loaded = Instant::now();
                // The mesh trust bundle too (the certificate manager follows its change).
                if let Some(bundle) = &trust_bundle {
                    info!(path = %bundle.path().display(), result = ?bundle.reload(), "SIGHUP: trust bundle re-read");
                }
            }
            Ok(Control::Shutdown(why)) => break why,
            Err(mpsc::RecvTimeoutError::Timeout) => enroller.reconcile(&model.load()),
            Err(mpsc::RecvTimeoutError::Disconnected) => break "control channel closed",
        }
        if addrs_refreshed.elapsed() >= NODE_ADDRS_EVERY {
            refresh_node_addrs(&loop_guard);
            addrs_refreshed = Instant::now();
        }
    };

    // Graceful stop: not ready; new connections go to a successor process if one took over
    // (its listeners share our ports and queued connections migrate to them), else pass
    // through (fail-open) or are refused (fail-closed); open connections finish first.
    admin.ready.store(false, Ordering::Release);
    // Probes of the readiness port now reach a successor, if any (or are refused).
    readiness.close("draining");
    // (mark_dead declines when a newer process of the node owns the maps: that is a successor.)
    let successor = !redirector.mark_dead();
    let listeners_close_at = enroller.stop_accepting(successor);
    // Tunnels from other nodes: GOAWAY, so their next streams open new tunnels (to the
    // successor, if there is one).
    inbound_stats.draining.send_replace(true);
    // Client HTTP connections: HTTP/1.1 closes after the response in flight, HTTP/2 GOAWAY.
    admin.data.draining.send_replace(true);
    let open = conns.open_count();
    info!(reason, successor, open_connections = open, drain_timeout_s = args.drain_timeout.as_secs(), "stopping: draining");
    let deadline = Instant::now() + args.drain_timeout;
    let mut last_report = Instant::now();
    // Until the listeners close, a connection already on its way may still arrive.
    while (conns.open_count() > 0 || Instant::now() < listeners_close_at) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        if last_report.elapsed() >= Duration::from_secs(1) {
            info!(open_connections = conns.open_count(), "draining");
            last_report = Instant::now();
        }
    }
    let left = conns.open_count();
    if left > 0 {
        warn!(open_connections = left, "drain timeout reached; closing the remaining connections");
    }
    if !successor {
        // The successor, if any, has bound the socket path to itself by now.
        let _ = std::fs::remove_file(&args.admin_socket);
    }
    drop(enroller);
    data_rt.shutdown_timeout(Duration::from_millis(200));
    info!("stopped");
    Ok(())
}

/// The node's CA, and the trust bundle file it reads (remote CA only: SIGHUP re-reads it too).
type LoadedCa = (Arc<dyn CertificateAuthority>, Option<Arc<TrustBundleFile>>);

/// The node's CA: the embedded one, or a client of the CA service.
fn load_ca(args: &RunArgs, model: &Arc<ArcSwap<Model>>, rt: &tokio::runtime::Handle) -> Result<LoadedCa> {
    match &args.ca {
        CaConfig::Embedded { dir } => {
            let ca = EmbeddedCa::load(
                &dir.join(identity::CA_CERT_FILE),
                &dir.join(identity::CA_KEY_FILE),
                EmbeddedCaConfig {
                    leaf_lifetime: args.cert_lifetime,
                    ..EmbeddedCaConfig::new(&args.node, &args.trust_domain)
                },
                identity::model_authorizer(model.clone()),
            )
            .with_context(|| {
                format!(
                    "loading the embedded CA's mesh root from {} (create one with `sluice ca init --dir {}`, the \
                     same on every node; or use a CA service with --ca-addr, so that nodes hold no key)",
                    dir.display(),
                    dir.display()
                )
            })?;
            Ok((Arc::new(ca), None))
        }
        CaConfig::Remote { addr, trust_bundle, token_file, server_name } => {
            let bundle = TrustBundleFile::load(trust_bundle)
                .map_err(|e| anyhow::anyhow!(e))
                .context("loading the mesh trust bundle (--ca-trust-bundle)")?;
            bundle.spawn_poller(identity::BUNDLE_POLL).context("starting the trust bundle reader")?;
            if let Err(e) = std::fs::metadata(token_file) {
                warn!(path = %token_file.display(), error = %e,
                    "cannot read the CA token (--ca-token-file); certificate requests fail until it is there");
            }
            let config = RemoteCaConfig {
                server_name: server_name.clone(),
                token_file: token_file.clone(),
                requested_lifetime: args.cert_lifetime,
                ..RemoteCaConfig::new(addr.clone(), args.node.clone())
            };
            let ca = {
                let _rt = rt.enter(); // the gRPC channel's worker starts on the data runtime
                RemoteCa::new(config, bundle.clone()).context("configuring the CA client (--ca-addr)")?
            };
            Ok((Arc::new(ca), Some(bundle)))
        }
    }
}

/// The admin API, the readiness endpoint, the heartbeat, the eBPF log reader and signal
/// handling, on one small runtime. Returns the handle that closes the readiness listener.
fn start_admin_thread(
    args: &RunArgs,
    admin: Arc<AdminState>,
    redirector: Arc<Redirector>,
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    control: mpsc::Sender<Control>,
) -> Result<health::Readiness> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    // During an upgrade the previous process still holds the admin port until it exits; the
    // unix socket is taken over at once, the TCP port as soon as it is free. Any other bind
    // error is a start-up error.
    let tcp = match std::net::TcpListener::bind(args.admin_addr) {
        Ok(l) => Some(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            warn!(addr = %args.admin_addr, "admin port busy (a previous sluice still draining?); will take it over when free");
            None
        }
        Err(e) => return Err(e).with_context(|| format!("binding the admin API on {}", args.admin_addr)),
    };
    let unix = {
        let path = args.admin_socket.clone();
        let _g = rt.enter();
        let l = server::bind_unix(&path)
            .with_context(|| format!("binding the admin socket {}", path.display()))?;
        (l, path)
    };
    // Readiness (15021): shared with a successor during an upgrade (SO_REUSEPORT); see health.rs.
    let readiness_listener = health::bind(args.readiness_addr).with_context(|| {
        format!("binding the readiness endpoint on {} (--readiness-addr)", args.readiness_addr)
    })?;
    let (readiness, readiness_closed) = health::channel();
    // Metrics (15020): shared with a successor the same way, closed with readiness.
    let metrics_listener = metrics_server::bind(args.metrics_addr)
        .with_context(|| format!("binding the metrics endpoint on {} (--metrics-addr)", args.metrics_addr))?;
    let scrape = Arc::new(metrics_server::Scrape::new(admin.clone(), &args.bpffs, &args.node));
    let metrics_closed = readiness_closed.clone();
    let probe = health::Probe {
        ready: {
            let admin = admin.clone();
            Arc::new(move || admin.ready.load(Ordering::Acquire))
        },
        superseded: {
            let redirector = redirector.clone();
            Arc::new(move || !redirector.is_owner())
        },
    };
    metrics_server::start_thread(metrics_listener, scrape, probe.superseded.clone(), metrics_closed)
        .context("starting the metrics thread")?;
    let admin_addr = args.admin_addr;
    std::thread::Builder::new()
        .name("sluice-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                tokio::spawn(heartbeat(redirector));
                tokio::spawn(crate::telemetry::metrics::expire_series(
                    admin.data.telemetry.clone(),
                    admin.model.clone(),
                ));
                tokio::spawn(forward_ebpf_logs(logger));
                tokio::spawn(signals(control));
                tokio::spawn(health::serve(readiness_listener, probe, readiness_closed));
                server::serve(admin, tcp, admin_addr, Some(unix)).await;
            })
        })
        .context("starting the admin thread")?;
    Ok(readiness)
}

/// Closes idle HTTP/1.1 upstream connections past their time and evicts pooled connections
/// that stopped taking streams (GOAWAY); forgets the balancer state of endpoints that left
/// every Service (at a model change) and of other addresses once idle; forgets round-robin
/// positions of backends that are gone.
async fn reap_upstreams(dp: Arc<crate::l4::DataPath>) {
    use crate::l7::plan::balance_key;
    use std::{collections::HashSet, net::SocketAddr};
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut generation = u64::MAX;
    // Every Service endpoint of the current model: their balancer state is kept while they
    // are there; any other address's state expires once idle.
    let mut live: HashSet<SocketAddr> = HashSet::new();
    loop {
        tick.tick().await;
        dp.l7.upstreams.reap();
        dp.pool.sweep();
        let model = dp.model.load();
        if model.generation() != generation {
            generation = model.generation();
            live = model
                .services()
                .flat_map(|s| {
                    s.ports
                        .iter()
                        .filter_map(|p| model.service_port(&s.namespace, &s.name, p.port))
                        .flat_map(|t| t.endpoints().iter().copied())
                        .collect::<Vec<_>>()
                })
                .collect();
            let backends: HashSet<u64> = model
                .services()
                .flat_map(|s| {
                    s.ports.iter().map(|p| balance_key(&s.namespace, &s.name, p.port)).collect::<Vec<_>>()
                })
                .chain(model.service_entries().flat_map(|e| {
                    e.ports.iter().map(|p| balance_key(&e.namespace, &e.name, p.number)).collect::<Vec<_>>()
                }))
                .collect();
            // Endpoints that left the model are forgotten now (with their ejections); the
            // others always find room in the balancer's state.
            dp.l7.balancer.set_model_endpoints(live.clone());
            dp.l7.balancer.retain_backends(|k| backends.contains(&k));
        }
        dp.l7.balancer.expire_idle(|a| live.contains(a), std::time::Instant::now());
    }
}

async fn heartbeat(redirector: Arc<Redirector>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        redirector.heartbeat();
    }
}

/// Moves the kernel programs' aya-log records into tracing (through the `log` bridge).
async fn forward_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger,
    // and always reports the same fd.
    let registered = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the eBPF log buffer; kernel-side log lines will be lost");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                error!(error = %e, "eBPF log buffer polling failed");
                return;
            }
        }
    }
}

async fn signals(control: mpsc::Sender<Control>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        warn!("cannot install signal handlers; stop sluice with SIGKILL");
        return;
    };
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                info!("SIGHUP: reloading the system's trust roots");
                let _ = control.send(Control::ReloadTrustRoots);
            }
        }
    };
    let _ = control.send(Control::Shutdown(why));
}

