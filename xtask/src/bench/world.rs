//! The simulated cluster the benchmarks run in.
//!
//! ```text
//! node n1                                        node n2 (cross-node bulk, mtls)
//!   bench-direct (not enrolled): client, server    bench-direct/server-x
//!   bench-mesh (enrolled):       client            bench-mesh/server-x
//!   Services: bench-direct/server 10.96.0.20, bench-direct/server-x 10.96.0.21,
//!             bench-mesh/server-x 10.96.0.22
//! ```
//!
//! - `direct`: bench-direct/client dials the server pod's IP (no kube-proxy in the simulator,
//!   and no sluice: the namespace is not enrolled).
//! - `l4`: bench-mesh/client dials the Service of the *same* server (outside the mesh), so the
//!   connection is redirected into sluice, resolved to the endpoint and forwarded as opaque
//!   TCP; a destination outside the mesh gets plaintext, no tunnel.
//! - `mtls`: bench-mesh/client dials the Service of the enrolled server on n2: sluice on n1
//!   carries it in the HBONE tunnel (mutual TLS) to sluice on n2, which delivers it.
//!
//! Every server pod runs `slload serve` (HTTP, 1 KiB bodies) on 8080 and, for bulk runs,
//! `iperf3 -s` on 5201. sluice runs on every node, as in a mesh.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sluice_tests::{Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts};

use super::Scenario;

pub const T: Duration = Duration::from_secs(30);
const MESH_NS: &str = "bench-mesh";
const DIRECT_NS: &str = "bench-direct";
/// Services of the servers outside the mesh (on n1, on n2) and of the enrolled one on n2.
const VIP_PLAIN: &str = "10.96.0.20";
const VIP_PLAIN_X: &str = "10.96.0.21";
const VIP_MESH_X: &str = "10.96.0.22";
pub const HTTP_PORT: u16 = 8080;
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

    /// Whether `sluice run` takes `--ca-dir` (the mesh CA, with mTLS). The simulator passes it
    /// only when it runs its default binary, so an older sluice is run as an explicit binary.
    pub fn sluice_takes_ca_dir(&self) -> bool {
        Command::new(&self.sluice)
            .args(["run", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--ca-dir"))
            .unwrap_or(false)
    }

    pub fn sluice_opts(&self) -> SluiceOpts {
        if self.sluice_takes_ca_dir() {
            SluiceOpts::default()
        } else {
            SluiceOpts { bin: Some(self.sluice.clone()), ..SluiceOpts::default() }
        }
    }
}

/// One way from a client pod to a server.
#[derive(Clone)]
pub struct Route {
    pub scenario: Scenario,
    pub client: Pod,
    pub http: SocketAddr,
    pub iperf: SocketAddr,
}

impl Route {
    /// Checks from the client's local address that the connection took the expected path: a
    /// redirected socket is connected to sluice's listener on the pod's loopback.
    pub fn check_path(&self, local: Option<&str>) -> Result<()> {
        let local = local.unwrap_or("");
        let via_sluice = local.starts_with("127.0.0.1:");
        match self.scenario {
            Scenario::Direct if via_sluice || !local.starts_with(&format!("{}:", self.client.ip())) => {
                bail!("direct: the client's connection went through sluice or elsewhere (local address {local:?})")
            }
            s if s != Scenario::Direct && !via_sluice => {
                bail!(
                    "{}: the client's connection did not go through sluice (local address {local:?})",
                    s.name()
                )
            }
            _ => Ok(()),
        }
    }
}

pub struct World {
    pub servers: Vec<SimProcess>,
    pub sluice: Sluice,
    pub sluice2: Option<Sluice>,
    pub direct: Route,
    pub l4: Route,
    pub direct_x: Option<Route>,
    pub l4_x: Option<Route>,
    pub mtls: Option<Route>,
    pub mesh_client: Pod,
    /// The enrolled server on n2 (the `mtls` destination).
    pub mesh_server_x: Option<Pod>,
    pub n1: Node,
    pub n2: Option<Node>,
    pub bins: Bins,
    /// Last: dropping the sim tears everything down.
    pub sim: Sim,
}

fn start_servers(pod: &Pod, bins: &Bins, iperf: bool) -> Result<Vec<SimProcess>> {
    let mut out = Vec::new();
    let mut http = pod.spawn([
        bins.slload.to_string_lossy().as_ref(),
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
    if iperf {
        let mut s = pod.spawn(["iperf3", "-s", "--forceflush", "-p", &IPERF_PORT.to_string()])?;
        s.wait_for_line(T, |l| l.contains("Server listening"))
            .with_context(|| format!("iperf3 -s in {}", pod.name()))?;
        out.push(s);
    }
    Ok(out)
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
    pub fn build(bins: &Bins, cross_node: bool, iperf: bool) -> Result<World> {
        let sim = Sim::new()?;
        let n1 = sim.add_node("n1")?;
        let n2 = if cross_node { Some(sim.add_node("n2")?) } else { None };
        sim.write_namespace(DIRECT_NS, false)?;
        sim.write_namespace(MESH_NS, true)?;
        let labels = |app| PodOpts::labels(&[("app", app)]);
        let dclient = n1.add_pod(DIRECT_NS, "client", labels("client"))?;
        let dserver = n1.add_pod(DIRECT_NS, "server", labels("server"))?;
        let mclient = n1.add_pod(MESH_NS, "client", labels("client"))?;
        let mut servers = start_servers(&dserver, bins, iperf)?;
        let ports = [("http", HTTP_PORT, HTTP_PORT), ("iperf", IPERF_PORT, IPERF_PORT)];
        // The server outside the mesh behind a Service: what `l4` dials.
        sim.write_service(DIRECT_NS, "server", VIP_PLAIN, &ports, &[&dserver])?;
        let mut x = None;
        if let Some(n2) = &n2 {
            let dx = n2.add_pod(DIRECT_NS, "server-x", labels("server-x"))?;
            let mx = n2.add_pod(MESH_NS, "server-x", labels("server-x"))?;
            for p in [&dx, &mx] {
                servers.extend(start_servers(p, bins, iperf)?);
            }
            sim.write_service(DIRECT_NS, "server-x", VIP_PLAIN_X, &ports, &[&dx])?;
            sim.write_service(MESH_NS, "server-x", VIP_MESH_X, &ports, &[&mx])?;
            x = Some((dx, mx));
        }
        let opts = bins.sluice_opts();
        let sluice = n1.start_sluice(opts.clone())?;
        sluice.wait_ready(T)?;
        wait_enrolled(&sluice, &[&mclient], T)?;
        let sluice2 = match (&n2, &x) {
            (Some(n2), Some((_, mx))) => {
                let s = n2.start_sluice(opts)?;
                s.wait_ready(T)?;
                wait_enrolled(&s, &[mx], T)?;
                Some(s)
            }
            _ => None,
        };
        let vip = |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().expect("literal") };
        let route = |scenario, client: &Pod, ip: &str| Route {
            scenario,
            client: client.clone(),
            http: vip(ip, HTTP_PORT),
            iperf: vip(ip, IPERF_PORT),
        };
        let direct = Route {
            scenario: Scenario::Direct,
            client: dclient.clone(),
            http: dserver.addr(HTTP_PORT),
            iperf: dserver.addr(IPERF_PORT),
        };
        let l4 = route(Scenario::L4, &mclient, VIP_PLAIN);
        let (direct_x, l4_x, mtls) = match &x {
            Some((dx, _)) => (
                Some(Route {
                    scenario: Scenario::Direct,
                    client: dclient.clone(),
                    http: dx.addr(HTTP_PORT),
                    iperf: dx.addr(IPERF_PORT),
                }),
                Some(route(Scenario::L4, &mclient, VIP_PLAIN_X)),
                Some(route(Scenario::Mtls, &mclient, VIP_MESH_X)),
            ),
            None => (None, None, None),
        };
        Ok(World {
            servers,
            sluice,
            sluice2,
            direct,
            l4,
            direct_x,
            l4_x,
            mtls,
            mesh_client: mclient,
            mesh_server_x: x.as_ref().map(|(_, mx)| mx.clone()),
            n1,
            n2,
            bins: bins.clone(),
            sim,
        })
    }

    pub fn route(&self, s: Scenario) -> Result<&Route> {
        match s {
            Scenario::Direct => Ok(&self.direct),
            Scenario::L4 => Ok(&self.l4),
            Scenario::Mtls => self.mtls.as_ref().context("the mtls route needs the second node"),
            other => bail!("scenario {} has no route yet", other.name()),
        }
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
