//! The `sluice` binary: the node daemon (`sluice run`) and the node-local admin CLI.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice::{
    cli::{self, AdminEndpoint, Output},
    daemon::{self, RunArgs},
    discovery::{KubeConfig, SourceConfig},
    redirect::{self, FailMode},
};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Per-node service-mesh data plane: eBPF socket redirection into one shared proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Run(RunFlags),
    /// Version, node, attached programs, fail mode and counters.
    Status(AdminFlags),
    /// Enrolled pods on this node: IP, identity, certificate state, cgroup, listeners, connections.
    Pods(AdminFlags),
    /// Live connections: source pod, original destination, endpoint, mTLS peer identity, bytes, age.
    Conns(AdminFlags),
    /// Workload certificates of this node: identity, serial, validity, next renewal, issuer
    /// chain; identities still waiting for one; the trust bundle's roots.
    Certs(CertsFlags),
    /// Effective routes per Service port: rules in precedence order, weighted backends, and
    /// each endpoint's current peak-EWMA latency.
    Routes {
        /// Only this Service (`namespace/name`, or a name).
        service: Option<String>,
        #[command(flatten)]
        admin: AdminFlags,
    },
    /// A live stream of requests through this node's sluice as they complete: time, source →
    /// destination, method, authority, path, status, latency, protocol, mTLS. A request between
    /// two pods of this node shows twice: once per side (`out`: reporter=source, at the
    /// client's node; `in`: reporter=destination, at the server's).
    Tap(TapFlags),
    /// The busiest (source, destination, method, path) rows from the tap stream, live: count,
    /// requests per second (last 10 s), success rate, p50/p99 latency. Redraws in place on a
    /// terminal (q or Ctrl-C to quit); prints a table every refresh when piped.
    Top(TopFlags),
    /// Success rate, request rate and latency percentiles per pod or Service of this node over
    /// a window (up to 1m), outbound (reporter=source) and inbound (reporter=destination).
    Stat(StatFlags),
    /// The mesh CA: run the CA service, create a root, or sign a certificate with it by hand.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Remove what a stopped sluice left in the kernel for a node (fail-closed pins) and its admin socket.
    Cleanup {
        /// Node name sluice ran with.
        #[arg(long, env = "SLUICE_NODE")]
        node: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(Args)]
struct TapFilterFlags {
    /// Only requests from or to pods of this namespace.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Only requests from or to this pod (`namespace/name` or `name`).
    #[arg(long)]
    pod: Option<String>,
    /// Only requests to this Service (`namespace/name` or `name`).
    #[arg(long)]
    to: Option<String>,
    /// Only requests whose path starts with this prefix.
    #[arg(long)]
    path: Option<String>,
    /// Only requests with this method.
    #[arg(long)]
    method: Option<String>,
    /// Only one side's records: `source` (at the client's node) or `destination` (at the server's).
    #[arg(long, value_parser = ["source", "destination"])]
    reporter: Option<String>,
}

impl TapFilterFlags {
    fn filter(&self) -> sluice::admin::api::TapFilter {
        sluice::admin::api::TapFilter {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            to: self.to.clone(),
            path: self.path.clone(),
            method: self.method.clone(),
            reporter: self.reporter.clone(),
        }
    }
}

#[derive(Args)]
struct TapFlags {
    #[command(flatten)]
    filter: TapFilterFlags,
    /// Exit after this many requests.
    #[arg(long)]
    max: Option<u64>,
    /// Exit after this many seconds.
    #[arg(long, value_parser = positive_seconds)]
    duration: Option<Duration>,
    #[command(flatten)]
    admin: AdminFlags,
}

#[derive(Args)]
struct TopFlags {
    #[command(flatten)]
    filter: TapFilterFlags,
    /// Seconds between refreshes.
    #[arg(long, default_value = "1", value_parser = positive_seconds)]
    interval: Duration,
    /// Print the table once after this many seconds and exit (scripts, tests).
    #[arg(long, value_parser = positive_seconds)]
    once: Option<Duration>,
    #[command(flatten)]
    admin: AdminFlags,
}

#[derive(Args)]
struct StatFlags {
    /// pods (this node's pods) or services (the Services their requests were for).
    #[arg(default_value = "pods", value_parser = |s: &str| s.parse::<sluice::admin::api::StatKind>())]
    kind: sluice::admin::api::StatKind,
    /// Only this pod or Service (`namespace/name` or `name`).
    name: Option<String>,
    /// The window: 10s, 30s, 1m (at most 1m).
    #[arg(long, default_value = "1m")]
    window: String,
    #[command(flatten)]
    admin: AdminFlags,
}

/// Seconds (fractions allowed), more than zero.
fn positive_seconds(s: &str) -> Result<Duration, String> {
    match s.trim_end_matches('s').parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?}: a number of seconds above 0")),
    }
}

#[derive(Args)]
struct CertsFlags {
    #[command(subcommand)]
    action: Option<CertsAction>,
    #[command(flatten)]
    admin: AdminFlags,
}

#[derive(Subcommand)]
enum CertsAction {
    /// The trust bundle in force: its source, its roots in rotation order (the first is the
    /// one the CA signs under) with expiry, and how many of this node's certificates lead to
    /// each (a root rotation's progress).
    Bundle,
    /// Ask this node's CA for a certificate for SPIFFE_ID, as sluice would for a pod of that
    /// identity, without installing it: would this node get one? Exits non-zero on refusal.
    /// Served on the admin unix socket only: --node NAME or --admin PATH (without either, the
    /// only sluice socket under /run/sluice).
    Request {
        /// e.g. spiffe://cluster.local/ns/shop/sa/web
        #[arg(value_name = "SPIFFE_ID")]
        identity: String,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Run the CA service (a Deployment): sign workload certificates over Istio's certificate
    /// protocol (gRPC over TLS), only for identities with a pod on the calling node.
    Serve(Box<CaServeFlags>),
    /// Create a mesh root (ca.pem, ca-key.pem): for the CA service's --signing-cert/--signing-key
    /// (or to sign its intermediate), or for every node's embedded CA (--ca-dir; demo and small
    /// setups only: every node then holds the root key).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Sign a workload certificate directly with the root key (debugging, tests).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE ID, e.g. spiffe://cluster.local/ns/shop/sa/web
        #[arg(long)]
        identity: String,
        /// Output prefix: writes PREFIX.pem and PREFIX.key.pem.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 86400)]
        lifetime_s: i64,
        /// Make it already expired.
        #[arg(long)]
        expired: bool,
    },
}

#[derive(Args)]
struct CaServeFlags {
    /// gRPC over TLS (istio.v1.auth.IstioCertificateService).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// PEM certificate the CA signs with: an intermediate under an offline root, or the root
    /// itself for small setups.
    #[arg(long, env = "SLUICE_CA_SIGNING_CERT")]
    signing_cert: PathBuf,
    /// PEM (PKCS#8) private key of --signing-cert.
    #[arg(long, env = "SLUICE_CA_SIGNING_KEY")]
    signing_key: PathBuf,
    /// PEM certificates between the signing certificate and the root, if any.
    #[arg(long)]
    chain: Option<PathBuf>,
    /// PEM roots the mesh trusts (the nodes' --ca-trust-bundle); the root the signing chain
    /// leads to must be among them, first except during a rotation.
    #[arg(long)]
    trust_bundle: PathBuf,
    /// DNS name or IP of the CA's serving certificate, which it issues itself (repeatable)
    /// [default: sluice-ca.sluice-system.svc, sluice-ca.sluice-system.svc.cluster.local].
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// SPIFFE trust domain of the identities it signs.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The node agents' ServiceAccount (NAMESPACE/NAME): the only caller allowed.
    #[arg(long, default_value = "sluice-system/sluice")]
    node_service_account: String,
    /// The audience callers' tokens must have.
    #[arg(long, default_value = "sluice-ca")]
    audience: String,
    /// Longest validity issued, in seconds (a request asks for less or gets this).
    #[arg(long, default_value_t = 86400)]
    max_lifetime_s: u64,
    /// Certificates per second per calling node (a token bucket).
    #[arg(long, default_value_t = 50.0)]
    node_rate: f64,
    /// Bucket size of --node-rate: what a node may ask for at once.
    #[arg(long, default_value_t = 50)]
    node_burst: u32,
    /// GET /metrics (OpenMetrics) and GET /healthz/ready.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// The API server URL, used as is without credentials (kubectl proxy, tests). Without it:
    /// --kubeconfig, else KUBECONFIG / ~/.kube/config, else the in-cluster service account.
    #[arg(long, env = "SLUICE_KUBE_API")]
    kube_api: Option<String>,
    /// A kubeconfig file (its current context).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Args)]
struct RunFlags {
    /// This node's name (pods are served when their spec.nodeName matches). Also names the
    /// kernel-global objects of this instance (pins, admin socket).
    #[arg(long, env = "SLUICE_NODE")]
    node: String,
    /// Directory of Kubernetes-style YAML manifests (watched for changes); required with
    /// `--source manifests`.
    #[arg(long, env = "SLUICE_MANIFESTS")]
    manifests: Option<PathBuf>,
    // --- Discovery source (the manifest directory stays the default) ---
    /// Where the model comes from: a manifest directory, or the Kubernetes API (list/watch).
    #[arg(long, value_enum, env = "SLUICE_SOURCE", default_value_t = Source::Manifests)]
    source: Source,
    /// With `--source kubernetes`: the API server URL, used as is without credentials (kubectl
    /// proxy, tests). Without it: --kubeconfig, else KUBECONFIG / ~/.kube/config, else the
    /// in-cluster service account.
    #[arg(long, env = "SLUICE_KUBE_API")]
    kube_api: Option<String>,
    /// With `--source kubernetes`: a kubeconfig file (its current context).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The cgroup-v2 directory holding kubepods/ or kubepods.slice/ (on a node: the cgroup-v2 mount).
    #[arg(long, env = "SLUICE_CGROUP_ROOT")]
    cgroup_root: PathBuf,
    /// Refuse enrolled pods' connections while sluice is down, instead of letting them through.
    #[arg(long)]
    fail_closed: bool,
    /// Admin API address (node-local).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Readiness endpoint for the kubelet (GET /healthz/ready: 200 ready, 503 not); shared
    /// with a successor process during an upgrade (SO_REUSEPORT).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Prometheus metrics (GET /metrics, OpenMetrics text: Istio's standard metrics and
    /// sluice's own); shared with a successor process during an upgrade (SO_REUSEPORT).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Admin API unix socket [default: /run/sluice/<node>/admin.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// bpffs mount (fail-closed pins live under <bpffs>/sluice/<node>/).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Embedded CA (demo and small setups: this node holds the mesh root key): the directory
    /// holding the mesh root (ca.pem, ca-key.pem, see `sluice ca init`). Not read with
    /// --ca-addr [default: /var/lib/sluice/ca].
    #[arg(long, env = "SLUICE_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// A CA service, https://HOST:PORT (e.g. https://sluice-ca.sluice-system.svc:15012, or
    /// istiod): this node holds no signing key and sends CSRs there (Istio's certificate
    /// protocol). Without it, the embedded CA (--ca-dir).
    #[arg(long, env = "SLUICE_CA_ADDR")]
    ca_addr: Option<String>,
    /// With --ca-addr: PEM roots, the root the CA signs under now first (a ConfigMap). Verifies
    /// the CA service's certificate and is the mesh trust bundle peers are verified against;
    /// re-read when it changes.
    #[arg(long, env = "SLUICE_CA_TRUST_BUNDLE", requires = "ca_addr")]
    ca_trust_bundle: Option<PathBuf>,
    /// With --ca-addr: the projected ServiceAccount token (audience sluice-ca) sent as
    /// `authorization: Bearer`, re-read for every request (the kubelet rotates it).
    #[arg(long, env = "SLUICE_CA_TOKEN_FILE", default_value = sluice::identity::DEFAULT_TOKEN_FILE)]
    ca_token_file: PathBuf,
    /// With --ca-addr: the name (DNS name or IP) the CA's certificate must carry, when it is
    /// not the host of --ca-addr.
    #[arg(long, env = "SLUICE_CA_SERVER_NAME", requires = "ca_addr")]
    ca_server_name: Option<String>,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The DNS suffix of Services (`<name>.<namespace>.svc.<domain>`): how VirtualService hosts
    /// and destinations written as short names or FQDNs are matched to Services.
    #[arg(long, env = "SLUICE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Istio's root namespace: its PeerAuthentication without a selector is mesh-wide, and its
    /// AuthorizationPolicies and RequestAuthentications apply to every pod of the mesh.
    #[arg(long, env = "SLUICE_ROOT_NAMESPACE", default_value = sluice::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Lifetime of workload certificates in seconds (renewed at half of it).
    #[arg(long, default_value_t = 86400)]
    cert_lifetime_s: u64,
    /// On SIGTERM, seconds to let open connections finish before exiting.
    #[arg(long, default_value_t = 25)]
    drain_timeout_s: u64,
    /// Upstream connect timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// How traffic between two enrolled pods of this node travels: `in-process` (identity,
    /// peer authentication and authorization applied by this sluice, no TLS to itself) or
    /// `tunnel` (HBONE to the node's own tunnel port, as across nodes; the default for now).
    #[arg(long, env = "SLUICE_SAME_NODE", value_enum, default_value_t = sluice::same_node::SameNodeMode::Tunnel)]
    same_node: sluice::same_node::SameNodeMode,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    // --- L7 ---
    /// How long to wait for a client's first bytes to detect HTTP before treating the
    /// connection as opaque TCP (server-first protocols wait this long for their banner on
    /// ports that are neither pinned by appProtocol/port name nor in --opaque-ports).
    #[arg(long, default_value_t = 250)]
    detect_timeout_ms: u64,
    /// Destination ports never sniffed for HTTP (comma-separated) [default: 25,587,3306,4444,5432,6379,9300,11211].
    #[arg(long, value_delimiter = ',')]
    opaque_ports: Option<Vec<u16>>,
    /// Largest HTTP request head (request line and headers) in bytes; beyond it: 431.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// How requests are spread over a Service's endpoints.
    #[arg(long, value_enum, default_value_t = sluice::l7::LbPolicy::P2cEwma)]
    lb_policy: sluice::l7::LbPolicy,
    /// Peak-EWMA decay time constant in milliseconds (how long a slow response is remembered).
    #[arg(long, default_value_t = 1000)]
    ewma_decay_ms: u64,
    /// Per source pod: requests in flight through sluice (beyond: 503 overflow).
    #[arg(long, default_value_t = 2000)]
    pod_max_requests: u32,
    /// Per source pod: new connections per second sluice accepts (beyond, they wait in the
    /// pod's own accept queue). Size it well below what the node's sluice accepts in all.
    #[arg(long, default_value_t = 500)]
    pod_connection_rate: u32,
    /// Node-wide: connections proxied at once, outbound and inbound, two sockets each (beyond:
    /// reset) [default: the smaller of (RLIMIT_NOFILE - headroom) / 2, headroom = max(1024,
    /// RLIMIT_NOFILE / 8), and (cgroup memory limit - max(256 MiB, limit / 4)) / 64 KiB].
    #[arg(long)]
    max_connections: Option<u32>,
    /// Per source pod: connections open through sluice, and as many upstream and tunnel
    /// sockets dialled for it, idle pooled ones included (beyond: reset, or 503 overflow)
    /// [default: max-connections / 4].
    #[arg(long)]
    pod_max_connections: Option<u32>,
    /// Per destination pod: inbound connections (captured plaintext and HBONE streams) open at
    /// once (beyond: reset, or 503 to the tunnel) [default: max-connections / 4].
    #[arg(long)]
    pod_max_inbound_connections: Option<u32>,
    /// Per peer (its SPIFFE identity; its address for plaintext): inbound connections open at
    /// once, node-wide [default: max-connections / 2].
    #[arg(long)]
    peer_max_inbound_connections: Option<u32>,
    /// Opaque TCP connections (and tunnel streams) with no byte either way for this long are
    /// closed (0: never).
    #[arg(long, default_value_t = 3600)]
    tcp_idle_timeout_s: u64,
    // --- Telemetry ---
    /// Access log destination for namespaces annotated `sluice.dev/access-log: enabled`: a
    /// file, or `-` for stdout.
    #[arg(long, env = "SLUICE_ACCESS_LOG")]
    access_log: Option<PathBuf>,
    /// Access log records queued before new ones are dropped (and counted).
    #[arg(long, default_value_t = 16384)]
    access_log_queue: usize,
    /// OTLP/gRPC collector for spans, e.g. http://otel-collector:4317 (none: no export).
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of new traces sampled (0 to 1); a sampled flag in the request is honoured.
    #[arg(long, default_value_t = 0.01)]
    trace_sampling: f64,
    /// Most label sets Istio's metrics keep (request and TCP series together); records that
    /// would add one more are not counted (sluice_metric_series_dropped_total).
    #[arg(long, default_value_t = sluice::telemetry::metrics::DEFAULT_MAX_SERIES)]
    max_metric_series: usize,
    /// Most of those label sets one workload may hold (a series counts for its source
    /// workload, or its destination's when the source is outside the mesh); records that
    /// would add one more are not counted (sluice_metric_series_workload_dropped_total)
    /// [default: max-metric-series / 4].
    #[arg(long)]
    max_metric_series_per_workload: Option<usize>,
    /// Seconds a metric series stays after the last pod of its source and destination
    /// workloads left, so that scrapes still see its final counts.
    #[arg(
        long,
        env = "SLUICE_METRIC_SERIES_GRACE_S",
        default_value_t = sluice::telemetry::metrics::DEFAULT_SERIES_GRACE.as_secs()
    )]
    metric_series_grace_s: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    Manifests,
    Kubernetes,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct AdminFlags {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Admin API: http://HOST:PORT or a unix socket path [default: http://127.0.0.1:15000].
    #[arg(long, env = "SLUICE_ADMIN", global = true)]
    admin: Option<String>,
    /// Reach the sluice of node NAME through its unix socket /run/sluice/NAME/admin.sock.
    #[arg(long, conflicts_with = "admin", global = true)]
    node: Option<String>,
}

impl AdminFlags {
    fn endpoint(&self) -> AdminEndpoint {
        AdminEndpoint::from_flags(self.admin.as_deref(), self.node.as_deref())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(flags) => run(flags),
        Command::Status(a) => print(cli::status(&a.endpoint(), a.output)),
        Command::Pods(a) => print(cli::pods(&a.endpoint(), a.output)),
        Command::Conns(a) => print(cli::conns(&a.endpoint(), a.output)),
        Command::Certs(CertsFlags { action: None, admin: a }) => print(cli::certs(&a.endpoint(), a.output)),
        Command::Certs(CertsFlags { action: Some(CertsAction::Bundle), admin: a }) => {
            print(cli::cert_bundle(&a.endpoint(), a.output))
        }
        Command::Certs(CertsFlags { action: Some(CertsAction::Request { identity }), admin: a }) => {
            cli::privileged_endpoint(a.admin.as_deref(), a.node.as_deref())
                .and_then(|ep| cli::cert_request(&ep, &identity, a.output))
                .and_then(|(out, refused)| {
                    print!("{out}");
                    refused.map_or(Ok(()), |r| Err(anyhow::anyhow!(r)))
                })
        }
        Command::Routes { service, admin } => print(cli::routes(&admin.endpoint(), service.as_deref(), admin.output)),
        Command::Tap(f) => cli::tap(
            &f.admin.endpoint(),
            &cli::TapOptions { filter: f.filter.filter(), max: f.max, duration: f.duration },
            f.admin.output,
        ),
        Command::Top(f) => cli::top(
            &f.admin.endpoint(),
            &cli::TopOptions { filter: f.filter.filter(), interval: f.interval, once: f.once },
            f.admin.output,
        ),
        Command::Stat(f) => {
            print(cli::stat(&f.admin.endpoint(), f.kind, &f.window, f.name.as_deref(), f.admin.output))
        }
        Command::Ca(CaCommand::Serve(flags)) => ca_serve(*flags),
        Command::Ca(CaCommand::Init { dir, trust_domain, force }) => {
            sluice::identity::ca_init(&dir, &trust_domain, force).map_err(Into::into).map(|(c, k)| {
                println!("mesh root for {trust_domain}: {} (key {})", c.display(), k.display());
            })
        }
        Command::Ca(CaCommand::Issue { dir, identity, out, lifetime_s, expired }) => {
            sluice::ca_tool::issue(sluice::ca_tool::IssueArgs {
                ca_dir: &dir,
                identity: &identity,
                out: &out,
                lifetime: time::Duration::seconds(lifetime_s),
                expired,
            })
        }
        Command::Cleanup { node, bpffs } => cleanup(&node, &bpffs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print(out: Result<String>) -> Result<()> {
    print!("{}", out?);
    Ok(())
}

fn run(f: RunFlags) -> Result<()> {
    // Held to the end: dropping it flushes the lines still queued.
    let _log_writer = init_logging(f.log_format);
    let admin_socket = f.admin_socket.unwrap_or_else(|| cli::default_admin_socket(&f.node));
    // Before any source parses: every VirtualService host is resolved against it.
    sluice::discovery::istio::set_cluster_domain(&f.cluster_domain);
    let source = source_config(f.source, f.manifests, f.kube_api, f.kubeconfig)?;
    let ca = ca_config(f.ca_dir, f.ca_addr, f.ca_trust_bundle, f.ca_token_file, f.ca_server_name)?;
    let telemetry = sluice::telemetry::TelemetryConfig {
        node: f.node.clone(),
        trust_domain: f.trust_domain.clone(),
        access_log_path: f.access_log.clone(),
        access_log_queue: f.access_log_queue.max(1),
        otlp_endpoint: f.otlp_endpoint.clone(),
        trace_sampling: f.trace_sampling.clamp(0.0, 1.0),
        metric_series: sluice::telemetry::metrics::SeriesLimits {
            max_series: f.max_metric_series,
            grace: Duration::from_secs(f.metric_series_grace_s),
            max_series_per_workload: f.max_metric_series_per_workload.unwrap_or_else(|| {
                sluice::telemetry::metrics::default_series_per_workload(f.max_metric_series)
            }),
        },
    };
    let result = daemon::run(RunArgs {
        node: f.node,
        source,
        cgroup_root: f.cgroup_root,
        fail_mode: if f.fail_closed { FailMode::Closed } else { FailMode::Open },
        admin_addr: f.admin_addr,
        readiness_addr: f.readiness_addr,
        metrics_addr: f.metrics_addr,
        admin_socket,
        bpffs: f.bpffs,
        connect_timeout: Duration::from_millis(f.connect_timeout_ms),
        ca,
        trust_domain: f.trust_domain,
        root_namespace: f.root_namespace,
        cert_lifetime: Duration::from_secs(f.cert_lifetime_s),
        drain_timeout: Duration::from_secs(f.drain_timeout_s),
        admission: sluice::admission::AdmissionFlags {
            max_connections: f.max_connections,
            pod_max_connections: f.pod_max_connections,
            pod_max_inbound: f.pod_max_inbound_connections,
            peer_max_inbound: f.peer_max_inbound_connections,
        },
        same_node: f.same_node,
        tcp_idle_timeout: (f.tcp_idle_timeout_s > 0).then(|| Duration::from_secs(f.tcp_idle_timeout_s)),
        telemetry,
        l7: sluice::l7::L7Config {
            detect_timeout: Duration::from_millis(f.detect_timeout_ms),
            opaque_ports: f.opaque_ports.unwrap_or_else(|| sluice::l7::detect::DEFAULT_OPAQUE_PORTS.to_vec()),
            max_header_bytes: f.max_header_bytes,
            lb: f.lb_policy,
            ewma: sluice::l7::EwmaConfig {
                tau: Duration::from_millis(f.ewma_decay_ms.max(1)),
                ..Default::default()
            },
            pod_limits: sluice::l7::limits::PodLimits {
                max_requests: f.pod_max_requests.max(1),
                connection_rate: f.pod_connection_rate.max(1),
            },
            dns: Default::default(),
        },
    });
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "sluice failed to start");
    }
    result
}

fn ca_serve(f: CaServeFlags) -> Result<()> {
    // Held until the end: dropping it flushes and stops the log writer thread.
    let _log_writer = init_logging(f.log_format);
    let server_names = if f.server_names.is_empty() {
        sluice::ca_service::DEFAULT_SERVER_NAMES.iter().map(|n| n.to_string()).collect()
    } else {
        f.server_names
    };
    let result = sluice::ca_service::run(sluice::ca_service::CaServeConfig {
        listen: f.listen,
        files: sluice::ca_service::signer::SignerFiles {
            signing_cert: f.signing_cert,
            signing_key: f.signing_key,
            chain: f.chain,
            trust_bundle: f.trust_bundle,
        },
        server_names,
        trust_domain: f.trust_domain,
        node_service_account: f.node_service_account,
        audience: f.audience,
        max_lifetime: Duration::from_secs(f.max_lifetime_s),
        rate: sluice::ca_service::limits::RateConfig { rate: f.node_rate, burst: f.node_burst },
        metrics_addr: f.metrics_addr,
        kube: KubeConfig { api_url: f.kube_api, kubeconfig: f.kubeconfig, ..KubeConfig::default() },
    });
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "the CA service stopped");
    }
    result
}

/// `--source` and the flags that go with it.
fn source_config(
    source: Source,
    manifests: Option<PathBuf>,
    kube_api: Option<String>,
    kubeconfig: Option<PathBuf>,
) -> Result<SourceConfig> {
    match source {
        Source::Manifests => {
            if kube_api.is_some() || kubeconfig.is_some() {
                anyhow::bail!("--kube-api and --kubeconfig need --source kubernetes");
            }
            let dir = manifests.ok_or_else(|| anyhow::anyhow!("--manifests DIR is required with --source manifests (the default)"))?;
            Ok(SourceConfig::Manifests(dir))
        }
        Source::Kubernetes => {
            if let Some(dir) = manifests {
                tracing::warn!(dir = %dir.display(), "--manifests is ignored with --source kubernetes");
            }
            Ok(SourceConfig::Kubernetes(KubeConfig { api_url: kube_api, kubeconfig, ..KubeConfig::default() }))
        }
    }
}

/// The embedded CA (`--ca-dir`), or a CA service (`--ca-addr` and the flags that go with it).
fn ca_config(
    ca_dir: Option<PathBuf>,
    ca_addr: Option<String>,
    trust_bundle: Option<PathBuf>,
    token_file: PathBuf,
    server_name: Option<String>,
) -> Result<daemon::CaConfig> {
    match ca_addr {
        None => Ok(daemon::CaConfig::Embedded { dir: ca_dir.unwrap_or_else(|| PathBuf::from("/var/lib/sluice/ca")) }),
        Some(addr) => {
            if let Some(dir) = ca_dir {
                // The node holds no key with a CA service: say so rather than read it.
                tracing::warn!(dir = %dir.display(), "--ca-dir is not read with --ca-addr: this node holds no CA key (remove the mount)");
            }
            let trust_bundle = trust_bundle.ok_or_else(|| {
                anyhow::anyhow!(
                    "--ca-addr needs --ca-trust-bundle PATH: the PEM roots that verify the CA service and the mesh's peers"
                )
            })?;
            Ok(daemon::CaConfig::Remote { addr, trust_bundle, token_file, server_name })
        }
    }
}

fn cleanup(node: &str, bpffs: &std::path::Path) -> Result<()> {
    let removed = redirect::remove_pins(bpffs, node)?;
    let socket = cli::default_admin_socket(node);
    let _ = std::fs::remove_file(&socket);
    if let Some(dir) = socket.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    println!("removed {removed} pinned object(s) for node {node}");
    Ok(())
}

/// Logs go through a bounded queue to a writer thread ([`sluice::lograte::writer`]): a
/// data-path thread never waits on a full stderr pipe (a stalled log collector must not stall
/// every pod's traffic). When the queue is full a line is dropped, and counted
/// (`log_lines_dropped` in `/status`).
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = sluice::lograte::writer(std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}
