//! The simulated cluster the benchmarks run in.
//!
//! ```text
//! node n1                                        node n2 (cross-node bulk, mtls, mtls-l4)
//!   bench-direct (not enrolled): client, server    bench-direct/server-x
//!   bench-mesh (enrolled):       client            bench-mesh/server-x
//!   Services (appProtocol of each port in brackets):
//!     bench-direct/server        10.96.0.20  8080 [tcp], 5201 [tcp]      → server    (l4)
//!     bench-direct/server-l7     10.96.0.23  8080 [http], 50051 [grpc]   → server    (http, grpc)
//!     bench-direct/server-x      10.96.0.21  8080 [tcp], 5201 [tcp]      → server-x  (bulk)
//!     bench-mesh/server-x        10.96.0.22  8080 [http], 5201 [tcp]     → server-x  (mtls)
//!     bench-mesh/server-x-tcp    10.96.0.24  8080 [tcp], 5201 [tcp]      → server-x  (mtls-l4)
//! ```
//!
//! - `direct` (and `grpc-direct`): bench-direct/client dials the server pod's IP (no
//!   kube-proxy in the simulator, and no sluice: the namespace is not enrolled).
//! - `l4`: bench-mesh/client dials a Service of the *same* server (outside the mesh) whose port
//!   is pinned to `appProtocol: tcp`, so the connection is redirected into sluice, resolved to
//!   the endpoint and forwarded as opaque TCP, without sniffing; a destination outside the mesh
//!   gets plaintext, no tunnel.
//! - `http`, `grpc`: the same server through a Service whose ports are pinned to `http` and
//!   `grpc`: sluice's L7 path, every request routed and balanced on its own.
//! - `mtls`: bench-mesh/client dials the Service (`appProtocol: http`) of the enrolled server
//!   on n2: sluice on n1 handles the requests at L7 and sends them on pooled upstream
//!   connections inside the HBONE tunnel (mutual TLS) to sluice on n2, which delivers them.
//!   `mtls-l4`: the same server through a Service pinned to `tcp`: opaque bytes in the tunnel.
//!
//! Every server pod runs `slload serve` (HTTP, 1 KiB bodies) on 8080, `slload grpc-serve`
//! (1 KiB reply payloads) on 50051 when a gRPC scenario runs and, for bulk runs, `iperf3 -s` on
//! 5201. sluice runs on every node, as in a mesh.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sluice_tests::{manifest, Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts};

use super::Scenario;

pub const T: Duration = Duration::from_secs(30);
const MESH_NS: &str = "bench-mesh";
const DIRECT_NS: &str = "bench-direct";
/// The Services (see the module docs).
const VIP_PLAIN: &str = "10.96.0.20";
const VIP_L7: &str = "10.96.0.23";
const VIP_PLAIN_X: &str = "10.96.0.21";
const VIP_MESH_X: &str = "10.96.0.22";
const VIP_MESH_X_TCP: &str = "10.96.0.24";
const VIP_MESH_LOCAL: &str = "10.96.0.25";
pub const HTTP_PORT: u16 = 8080;
pub const GRPC_PORT: u16 = 50051;
pub const IPERF_PORT: u16 = 5201;

/// The binaries a run uses.
#[derive(Debug, Clone)]
pub struct Bins {
    pub sluice: PathBuf,
    pub simpod: PathBuf,
    pub slload: PathBuf,
}

impl Bins {
    /// `$SLUICE_BIN`, `$SIMPOD_BIN`, `$SLLOAD_BIN`, else `<target>/<profile>/…`. Exports the
    /// first two so that the simulator library uses the same ones.
    pub fn locate(profile: &str) -> Result<Bins> {
        let dir = sluice_tests::bins::profile_dir()?.parent().context("the target directory")?.join(profile);
        let pick = |env: &str, name: &str| -> Result<PathBuf> {
            let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| dir.join(name));
            if !p.is_file() {
                bail!("{name} not found at {} (build it, or set {env})", p.display());
            }
            Ok(p)
        };
        let bins = Bins {
            sluice: pick("SLUICE_BIN", "sluice")?,
            simpod: pick("SIMPOD_BIN", "simpod")?,
            slload: pick("SLLOAD_BIN", "slload")?,
        };
        // SAFETY (edition 2021: safe fn): single-threaded at this point of the run.
        std::env::set_var("SLUICE_BIN", &bins.sluice);
        std::env::set_var("SIMPOD_BIN", &bins.simpod);
        Ok(bins)
    }

    fn run_help(&self) -> String {
        Command::new(&self.sluice)
            .args(["run", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Whether `sluice run` takes `--ca-dir` (the mesh CA, with mTLS). The simulator passes it
    /// only when it runs its default binary, so an older sluice is run as an explicit binary.
    pub fn sluice_takes_ca_dir(&self) -> bool {
        self.run_help().contains("--ca-dir")
    }

    /// Whether this sluice has the L7 (HTTP per request) path: it takes `--detect-timeout-ms`.
    pub fn sluice_has_l7(&self) -> bool {
        self.run_help().contains("--detect-timeout-ms")
    }

    /// Whether this sluice serves OpenMetrics on `--metrics-addr` (the `scrape` section).
    pub fn sluice_has_metrics(&self) -> bool {
        self.run_help().contains("--metrics-addr")
    }

    /// Flags of `sluice run` for every sluice of the benchmark: the per-pod accept-rate limit
    /// (`--pod-connection-rate`, 2000 new connections/s by default) is raised out of reach,
    /// so that the churn figures measure the data path rather than that policy (with the
    /// default, every proxied scenario reads 2 000 connections/s: all the benchmark's
    /// connections come from one client pod).
    pub fn sluice_args(&self) -> Vec<std::ffi::OsString> {
        if self.run_help().contains("--pod-connection-rate") {
            vec!["--pod-connection-rate".into(), "1000000".into()]
        } else {
            Vec::new()
        }
    }

    pub fn sluice_opts(&self) -> SluiceOpts {
        let args = self.sluice_args();
        // `mtls-same-node` measures the in-process hand-off unless the environment says
        // otherwise (`SLUICE_SAME_NODE=tunnel`: the same path through a tunnel to the node
        // itself). A sluice without the flag ignores the variable.
        let same_node = std::env::var_os("SLUICE_SAME_NODE").unwrap_or_else(|| "in-process".into());
        let env = vec![("SLUICE_SAME_NODE".into(), same_node)];
        if self.sluice_takes_ca_dir() {
            SluiceOpts { args, env, ..SluiceOpts::default() }
        } else {
            SluiceOpts { bin: Some(self.sluice.clone()), args, env, ..SluiceOpts::default() }
        }
    }
}

/// One way from a client pod to a server.
#[derive(Clone)]
pub struct Route {
    pub scenario: Scenario,
    pub client: Pod,
    /// Where slload sends its requests (HTTP/1.1, or gRPC for the gRPC scenarios).
    pub addr: SocketAddr,
    /// iperf3's server on the same path (its port is always opaque TCP); not for gRPC routes.
    pub iperf: Option<SocketAddr>,
}

impl Route {
    /// `--to <addr> --proto <http|grpc>`: where and how slload sends its load on this route.
    pub fn slload_target(&self) -> Vec<String> {
        vec!["--to".into(), self.addr.to_string(), "--proto".into(), self.scenario.proto().into()]
    }

    /// Checks from the client's local address that the connection took the expected path: a
    /// redirected socket is connected to sluice's listener on the pod's loopback.
    pub fn check_path(&self, local: Option<&str>) -> Result<()> {
        let local = local.unwrap_or("");
        let via_sluice = local.starts_with("127.0.0.1:");
        let name = self.scenario.name();
        if self.scenario.is_baseline() {
            if via_sluice || !local.starts_with(&format!("{}:", self.client.ip())) {
                bail!("{name}: the client's connection went through sluice or elsewhere (local address {local:?})");
            }
        } else if !via_sluice {
            bail!("{name}: the client's connection did not go through sluice (local address {local:?})");
        }
        Ok(())
    }
}

pub struct World {
    pub servers: Vec<SimProcess>,
    pub sluice: Sluice,
    pub sluice2: Option<Sluice>,
    /// The route of every scenario this world can run.
    pub routes: Vec<Route>,
    /// Bulk across nodes: direct and opaque through sluice to the server outside the mesh on
    /// n2 (the tunnel's bulk figure is on the `mtls-l4`/`mtls` route).
    pub direct_x: Option<Route>,
    pub l4_x: Option<Route>,
    pub mesh_client: Pod,
    /// The enrolled server on n2 (the `mtls` destination).
    pub mesh_server_x: Option<Pod>,
    /// The enrolled server on n1 (the `mtls-same-node` destination).
    pub mesh_server_local: Pod,
    pub n1: Node,
    pub n2: Option<Node>,
    pub bins: Bins,
    /// Last: dropping the sim tears everything down.
    pub sim: Sim,
}

/// What the simulated cluster needs.
#[derive(Debug, Clone, Copy)]
pub struct WorldOpts {
    /// Node n2 and its servers (bulk across nodes, `mtls`, `mtls-l4`).
    pub cross_node: bool,
    /// iperf3 servers (bulk).
    pub iperf: bool,
    /// gRPC backends (`grpc`, `grpc-direct`).
    pub grpc: bool,
}

fn start_servers(pod: &Pod, bins: &Bins, iperf: bool, grpc: bool) -> Result<Vec<SimProcess>> {
    let mut out = Vec::new();
    let slload = bins.slload.to_string_lossy();
    let mut http = pod.spawn([
        slload.as_ref(),
        "serve",
        "--port",
        &HTTP_PORT.to_string(),
        "--body-bytes",
        "1024",
        "--threads",
        "2",
    ])?;
    http.wait_listening(T).with_context(|| format!("slload serve in {}", pod.name()))?;
    out.push(http);
    if grpc {
        let mut g = pod.spawn([
            slload.as_ref(),
            "grpc-serve",
            "--port",
            &GRPC_PORT.to_string(),
            "--body-bytes",
            "1024",
            "--threads",
            "2",
        ])?;
        g.wait_listening(T).with_context(|| format!("slload grpc-serve in {}", pod.name()))?;
        out.push(g);
    }
    if iperf {
        let mut s = pod.spawn(["iperf3", "-s", "--forceflush", "-p", &IPERF_PORT.to_string()])?;
        s.wait_for_line(T, |l| l.contains("Server listening"))
            .with_context(|| format!("iperf3 -s in {}", pod.name()))?;
        out.push(s);
    }
    Ok(out)
}

/// Writes a Service with one endpoint, `pod`; ports are `(name, port = targetPort,
/// appProtocol)`.
fn write_service(
    sim: &Sim,
    namespace: &str,
    name: &str,
    vip: &str,
    ports: &[(&str, u16, &str)],
    pod: &Pod,
) -> Result<()> {
    let node_name = pod.node().name().to_string();
    let ep = manifest::Endpoint {
        ip: pod.ip(),
        pod_name: pod.name(),
        pod_namespace: pod.namespace(),
        pod_uid: pod.uid(),
        node_name: &node_name,
        labels: pod.labels(),
    };
    let plain: Vec<(&str, u16, u16)> = ports.iter().map(|(n, p, _)| (*n, *p, *p)).collect();
    let mut docs = manifest::service(namespace, name, vip, &plain, &[ep]);
    for (port, _, app) in ports {
        docs = manifest::with_app_protocol(docs, port, app);
    }
    sim.write_file(&manifest::service_file_name(namespace, name), manifest::to_yaml(&docs)?)
        .with_context(|| format!("writing Service {namespace}/{name}"))?;
    Ok(())
}

fn has_pod(v: &Value, ns: &str, name: &str) -> bool {
    v.as_array().is_some_and(|pods| pods.iter().any(|p| p["namespace"] == ns && p["name"] == name))
}

pub fn wait_enrolled(sluice: &Sluice, pods: &[&Pod], timeout: Duration) -> Result<()> {
    sluice
        .wait_for("/pods", |v| pods.iter().all(|p| has_pod(v, p.namespace(), p.name())), timeout)
        .with_context(|| format!("waiting for {} pod(s) to be enrolled", pods.len()))?;
    Ok(())
}

impl World {
    pub fn build(bins: &Bins, opts: WorldOpts) -> Result<World> {
        let sim = Sim::new()?;
        let n1 = sim.add_node("n1")?;
        let n2 = if opts.cross_node { Some(sim.add_node("n2")?) } else { None };
        sim.write_namespace(DIRECT_NS, false)?;
        sim.write_namespace(MESH_NS, true)?;
        let labels = |app| PodOpts::labels(&[("app", app)]);
        let dclient = n1.add_pod(DIRECT_NS, "client", labels("client"))?;
        let dserver = n1.add_pod(DIRECT_NS, "server", labels("server"))?;
        let mclient = n1.add_pod(MESH_NS, "client", labels("client"))?;
        let mut servers = start_servers(&dserver, bins, opts.iperf, opts.grpc)?;
        // The enrolled server on n1 (`mtls-same-node`): HTTP only.
        let mlocal = n1.add_pod(MESH_NS, "server-local", labels("server-local"))?;
        servers.extend(start_servers(&mlocal, bins, false, false)?);
        write_service(&sim, MESH_NS, "server-local", VIP_MESH_LOCAL, &[("http", HTTP_PORT, "http")], &mlocal)?;
        let opaque = [("tcp", HTTP_PORT, "tcp"), ("iperf", IPERF_PORT, "tcp")];
        // The server outside the mesh behind Services: opaque (`l4`) and L7 (`http`, `grpc`).
        write_service(&sim, DIRECT_NS, "server", VIP_PLAIN, &opaque, &dserver)?;
        write_service(
            &sim,
            DIRECT_NS,
            "server-l7",
            VIP_L7,
            &[("http", HTTP_PORT, "http"), ("grpc", GRPC_PORT, "grpc")],
            &dserver,
        )?;
        let mut x = None;
        if let Some(n2) = &n2 {
            let dx = n2.add_pod(DIRECT_NS, "server-x", labels("server-x"))?;
            let mx = n2.add_pod(MESH_NS, "server-x", labels("server-x"))?;
            for p in [&dx, &mx] {
                servers.extend(start_servers(p, bins, opts.iperf, false)?);
            }
            write_service(&sim, DIRECT_NS, "server-x", VIP_PLAIN_X, &opaque, &dx)?;
            write_service(
                &sim,
                MESH_NS,
                "server-x",
                VIP_MESH_X,
                &[("http", HTTP_PORT, "http"), ("iperf", IPERF_PORT, "tcp")],
                &mx,
            )?;
            write_service(&sim, MESH_NS, "server-x-tcp", VIP_MESH_X_TCP, &opaque, &mx)?;
            x = Some((dx, mx));
        }
        let sluice_opts = bins.sluice_opts();
        let sluice = n1.start_sluice(sluice_opts.clone())?;
        sluice.wait_ready(T)?;
        wait_enrolled(&sluice, &[&mclient, &mlocal], T)?;
        let sluice2 = match (&n2, &x) {
            (Some(n2), Some((_, mx))) => {
                let s = n2.start_sluice(sluice_opts)?;
                s.wait_ready(T)?;
                wait_enrolled(&s, &[mx], T)?;
                Some(s)
            }
            _ => None,
        };
        let vip = |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().expect("literal") };
        let via = |scenario, ip: &str, port: u16, iperf: bool| Route {
            scenario,
            client: mclient.clone(),
            addr: vip(ip, port),
            iperf: iperf.then(|| vip(ip, IPERF_PORT)),
        };
        let direct = |scenario, pod: &Pod, port: u16, iperf: bool| Route {
            scenario,
            client: dclient.clone(),
            addr: pod.addr(port),
            iperf: iperf.then(|| pod.addr(IPERF_PORT)),
        };
        let mut routes = vec![
            direct(Scenario::Direct, &dserver, HTTP_PORT, true),
            via(Scenario::L4, VIP_PLAIN, HTTP_PORT, true),
            via(Scenario::Http, VIP_L7, HTTP_PORT, false),
            via(Scenario::MtlsSameNode, VIP_MESH_LOCAL, HTTP_PORT, false),
            direct(Scenario::GrpcDirect, &dserver, GRPC_PORT, false),
            via(Scenario::Grpc, VIP_L7, GRPC_PORT, false),
        ];
        let (mut direct_x, mut l4_x) = (None, None);
        if let Some((dx, _)) = &x {
            routes.push(via(Scenario::MtlsL4, VIP_MESH_X_TCP, HTTP_PORT, true));
            routes.push(via(Scenario::Mtls, VIP_MESH_X, HTTP_PORT, true));
            direct_x = Some(direct(Scenario::Direct, dx, HTTP_PORT, true));
            l4_x = Some(via(Scenario::L4, VIP_PLAIN_X, HTTP_PORT, true));
        }
        Ok(World {
            servers,
            sluice,
            sluice2,
            routes,
            direct_x,
            l4_x,
            mesh_client: mclient,
            mesh_server_x: x.as_ref().map(|(_, mx)| mx.clone()),
            mesh_server_local: mlocal,
            n1,
            n2,
            bins: bins.clone(),
            sim,
        })
    }

    pub fn route(&self, s: Scenario) -> Result<&Route> {
        self.routes.iter().find(|r| r.scenario == s).with_context(|| match s {
            Scenario::Mtls | Scenario::MtlsL4 => format!("the {} route needs the second node", s.name()),
            _ => format!("scenario {} has no route", s.name()),
        })
    }

    pub fn slload(&self) -> &Path {
        &self.bins.slload
    }

    /// Tears the simulator down now and reports what could not be removed.
    pub fn teardown(self) -> Result<()> {
        let World { servers, sluice, sluice2, sim, .. } = self;
        drop(servers);
        drop(sluice);
        drop(sluice2);
        sim.teardown()
    }
}
