//! Running sluice on a simulated node and talking to its admin API.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{atomic::Ordering, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::{
    admin_client,
    node::Node,
    process::{self, Output, Signal},
    util::{poll_until, tail_file},
};

/// How sluice is started.
#[derive(Debug, Clone, Default)]
pub struct SluiceOpts {
    /// Pass `--fail-closed` (the default is fail-open).
    pub fail_closed: bool,
    /// Extra arguments appended to `sluice run ...`.
    pub args: Vec<OsString>,
    /// Extra environment (e.g. `RUST_LOG`); the rest is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// The binary to run instead of [`crate::sluice_bin()`] (`$SLUICE_BIN` or the target dir).
    pub bin: Option<PathBuf>,
    /// Certificates from the control plane's CA service instead of the embedded CA: `--ca-addr
    /// https://10.243.0.254:15012 --ca-trust-bundle <sim trust bundle> --ca-token-file <the
    /// node's token file>` and no `--ca-dir`. Needs [`crate::Sim::add_control_plane`]; the
    /// node's token file gets the node agent's token if it holds none yet
    /// ([`crate::ControlPlane::ensure_node_token`]), and the trust bundle the mesh root if it
    /// was not written.
    pub remote_ca: bool,
}

impl SluiceOpts {
    pub fn fail_closed() -> SluiceOpts {
        SluiceOpts {
            fail_closed: true,
            ..Default::default()
        }
    }

    /// Against the control plane's CA service (see [`SluiceOpts::remote_ca`]).
    pub fn remote_ca() -> SluiceOpts {
        SluiceOpts {
            remote_ca: true,
            ..Default::default()
        }
    }
}

/// A sluice process on one node: `sluice run --node <node> --manifests <dir> --cgroup-root
/// <node root> --admin-socket <sim tmp>/<node>-admin.sock`, in the node netns and the node's
/// `system` cgroup (never under kubepods, so its own sockets are never redirected), logging to
/// `<logs>/sluice-<node>-<n>.log` (n counts restarts). Dropping it kills it (SIGKILL).
pub struct Sluice {
    node: Node,
    opts: SluiceOpts,
    bin: PathBuf,
    admin_socket: PathBuf,
    run: Mutex<Run>,
}

struct Run {
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Run {
    fn status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }
}

/// Per-request timeout for admin API calls.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Sluice {
    pub(crate) fn start(node: Node, opts: SluiceOpts) -> Result<Sluice> {
        let bin = match &opts.bin {
            Some(b) => b.clone(),
            None => crate::sluice_bin()?,
        };
        let admin_socket = node.admin_socket_path();
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if admin_socket.as_os_str().len() > 107 {
            bail!(
                "admin socket path {} is too long for a unix socket; point TMPDIR at a shorter directory",
                admin_socket.display()
            );
        }
        let run = spawn(&node, &opts, &bin, &admin_socket)?;
        Ok(Sluice {
            node,
            opts,
            bin,
            admin_socket,
            run: Mutex::new(run),
        })
    }

    fn run(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn pid(&self) -> u32 {
        self.run().child.id()
    }

    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The log file of the current run.
    pub fn log_path(&self) -> PathBuf {
        self.run().log.clone()
    }

    /// Everything the current run has logged.
    pub fn log_contents(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.run().status()
    }

    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Polls `GET /status` (backoff from 10 ms) until it says `"ready": true`, and returns it.
    /// Fails with the log tail if sluice exits or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Value> {
        // Match the pid: during an upgrade the previous process of the node may still answer
        // on the same admin socket until this one has bound it.
        let pid = u64::from(self.pid());
        self.wait_for("/status", |v| v["ready"] == true && v["pid"].as_u64().is_none_or(|p| p == pid), timeout)
            .context("waiting for sluice to become ready")
    }

    /// `GET path` on the admin socket, parsed as JSON.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        admin_client::get_json(&self.admin_socket, path, ADMIN_TIMEOUT)
            .with_context(|| format!("sluice on {}: GET {path}", self.node.short_name()))
    }

    /// Polls `GET path` until `pred` holds for the response, and returns that response. Fails
    /// with the last response (or error) and the log tail if sluice exits or `timeout` passes.
    pub fn wait_for(
        &self,
        path: &str,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(10);
        let mut last: String = "no response yet".into();
        loop {
            if let Some(st) = self.exit_status() {
                bail!(
                    "sluice on {} exited ({st}) while waiting for GET {path}; last: {last}\nlog {}:\n{}",
                    self.node.short_name(),
                    self.log_path().display(),
                    tail_file(&self.log_path(), 40)
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match admin_client::get_json(
                &self.admin_socket,
                path,
                ADMIN_TIMEOUT.min(left.max(Duration::from_millis(100))),
            ) {
                Ok(v) if pred(&v) => return Ok(v),
                Ok(v) => last = format!("response {v}"),
                Err(e) => last = format!("error {e:#}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for GET {path} on {}'s sluice; last: {last}\nlog {}:\n{}",
                    self.node.short_name(),
                    self.log_path().display(),
                    tail_file(&self.log_path(), 40)
                );
            }
            std::thread::sleep(delay.min(deadline.saturating_duration_since(Instant::now())));
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Sends `signal` to sluice (no-op if it has exited).
    pub fn kill(&self, signal: Signal) -> Result<()> {
        let mut run = self.run();
        if run.status().is_some() {
            return Ok(());
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.child.id() as i32), signal)
            .with_context(|| format!("sending {signal} to sluice"))
    }

    /// Waits up to `timeout` for sluice to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        poll_until(timeout, || self.exit_status()).ok_or_else(|| {
            anyhow!(
                "sluice on {} still running after {timeout:?}",
                self.node.short_name()
            )
        })
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub fn stop(&self, grace: Duration) -> Result<ExitStatus> {
        self.kill(Signal::SIGTERM)?;
        match self.wait_exit(grace) {
            Ok(st) => Ok(st),
            Err(_) => {
                self.kill(Signal::SIGKILL)?;
                self.wait_exit(Duration::from_secs(10))
            }
        }
    }

    /// Stops sluice if it is running (SIGTERM, then SIGKILL after 10 s) and starts it again with
    /// the same options and a new log file. Does not wait for readiness.
    pub fn restart(&self) -> Result<()> {
        self.node.sim().ensure_live()?;
        if self.is_running() {
            self.stop(Duration::from_secs(10))?;
        }
        let new = spawn(&self.node, &self.opts, &self.bin, &self.admin_socket)?;
        *self.run() = new;
        Ok(())
    }

    /// Runs the sluice CLI against this instance: `sluice <args> --admin <socket>` in the node
    /// netns (e.g. `["status", "-o", "json"]`).
    pub fn cli<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Result<Output> {
        let mut all: Vec<OsString> = vec![self.bin.clone().into_os_string()];
        all.extend(process::os_args(args));
        all.push("--admin".into());
        all.push(self.admin_socket.clone().into_os_string());
        self.node.run_timeout(all, Duration::from_secs(30))
    }
}

/// The sim's mesh root CA (`<sim tmp>/ca`), created with `sluice ca init` on first use.
pub fn ensure_mesh_ca(sim_tmp: &Path, bin: &Path) -> Result<std::path::PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = sim_tmp.join("ca");
    if !dir.join("ca.pem").exists() {
        let out = std::process::Command::new(bin)
            .args(["ca", "init", "--dir"])
            .arg(&dir)
            .output()
            .with_context(|| format!("running {} ca init", bin.display()))?;
        if !out.status.success() {
            anyhow::bail!("sluice ca init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(dir)
}

fn spawn(node: &Node, opts: &SluiceOpts, bin: &Path, admin_socket: &Path) -> Result<Run> {
    let sim = node.sim();
    let n = node.inner.sluice_runs.fetch_add(1, Ordering::SeqCst) + 1;
    let log = sim
        .log_dir
        .join(format!("sluice-{}-{n}.log", node.short_name()));
    let mut args: Vec<OsString> = vec![
        bin.as_os_str().to_owned(),
        "run".into(),
        "--node".into(),
        node.name().into(),
        "--manifests".into(),
        sim.manifest_dir.clone().into_os_string(),
        "--cgroup-root".into(),
        node.cgroup_root().as_os_str().to_owned(),
        "--admin-socket".into(),
        admin_socket.as_os_str().to_owned(),
    ];
    if opts.fail_closed {
        args.push("--fail-closed".into());
    }
    if opts.remote_ca {
        let cp = sim.state().control_plane.clone().with_context(|| {
            format!(
                "sluice on {} with remote_ca needs the sim's control plane (Sim::add_control_plane)",
                node.short_name()
            )
        })?;
        let token = cp.ensure_node_token(node)?;
        let bundle = crate::sim_pki::ensure_trust_bundle(sim)?;
        args.extend([
            "--ca-addr".into(),
            cp.ca_url().into(),
            "--ca-trust-bundle".into(),
            bundle.into_os_string(),
            "--ca-token-file".into(),
            token.into_os_string(),
        ]);
    } else if opts.bin.is_none() {
        // Every node of a sim trusts one mesh root, like the nodes of a cluster.
        let ca_dir = ensure_mesh_ca(&sim.temp_dir, bin)?;
        args.push("--ca-dir".into());
        args.push(ca_dir.into_os_string());
    }
    args.extend(opts.args.iter().cloned());
    let placement = node.placement(&format!("sluice-{}", node.short_name()));
    let mut cmd = process::command_in(&placement, &args)?;
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log fd")?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", process::command_line(&cmd)))?;
    Ok(Run {
        child,
        log,
        status: None,
    })
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if self.node.sim().is_kept() {
            return;
        }
        let run = self.run.get_mut().unwrap_or_else(|e| e.into_inner());
        if run.status.is_none() {
            let _ = run.child.kill();
            let _ = run.child.wait();
        }
    }
}
