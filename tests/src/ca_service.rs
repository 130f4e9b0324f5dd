//! Running the CA service (`sluice ca serve`) on the simulated control plane.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    control_plane::{ControlPlane, CA_METRICS_PORT, CA_PORT, CONTROL_PLANE_IP6},
    http_probe::HttpReply,
    pki::CaFiles,
    process::{self, Signal},
    sim_pki,
    util::{poll_until, tail_file},
};

/// How the CA service is started.
#[derive(Debug, Clone, Default)]
pub struct CaOpts {
    /// The CA certificate and key to sign with, written into the control plane's signing
    /// volume before the start. `None`: keep what the volume holds, or, if it is empty, an
    /// intermediate under the sim's mesh root ([`ControlPlane::default_signing`]).
    pub signing: Option<CaFiles>,
    /// With `signing`: the certificates between it and the root, nearest first.
    pub chain: Vec<CaFiles>,
    /// Extra arguments appended to `sluice ca serve ...` (e.g. `--node-rate 5`).
    pub args: Vec<OsString>,
    /// Extra environment (e.g. `SLUICE_LOG`); the rest is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// The binary to run instead of [`crate::sluice_bin()`].
    pub bin: Option<PathBuf>,
}

/// `sluice ca serve` on the control plane, in its netns and cgroup, logging to
/// `<logs>/sluice-ca-<n>.log` (n counts restarts). Dropping it kills it (SIGKILL).
///
/// Its command line follows the CA service's flags: `--listen 0.0.0.0:15012`, the signing
/// volume's `--signing-cert`, `--signing-key` (and `--chain` when the volume has one), the
/// sim's `--trust-bundle`, `--server-name 10.243.0.254` (and the IPv6 address in a dual-stack
/// sim: nodes dial the CA by address), `--kube-api http://10.243.0.254:6443` (the fake API
/// server) and `--metrics-addr 0.0.0.0:15014`; trust domain, node ServiceAccount, audience,
/// lifetime cap and rates are the CA's defaults (`cluster.local`, `sluice-system/sluice`,
/// `sluice-ca`, ...) unless [`CaOpts::args`] sets them.
pub struct CaService {
    cp: ControlPlane,
    opts: CaOpts,
    bin: PathBuf,
    run: Mutex<Run>,
}

struct Run {
    child: Child,
    log: PathBuf,
    args: Vec<OsString>,
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

/// Per-request timeout of the readiness and metrics probes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl CaService {
    pub(crate) fn start(cp: ControlPlane, opts: CaOpts) -> Result<CaService> {
        let bin = match &opts.bin {
            Some(b) => b.clone(),
            None => crate::sluice_bin()?,
        };
        let run = spawn(&cp, &opts, &bin)?;
        Ok(CaService { cp, opts, bin, run: Mutex::new(run) })
    }

    fn run(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    pub fn pid(&self) -> u32 {
        self.run().child.id()
    }

    /// The arguments of the current run (after the program).
    pub fn args(&self) -> Vec<OsString> {
        self.run().args.clone()
    }

    /// `https://10.243.0.254:15012`.
    pub fn url(&self) -> String {
        self.cp.ca_url()
    }

    pub fn log_path(&self) -> PathBuf {
        self.run().log.clone()
    }

    /// Everything the current run has logged.
    pub fn log_contents(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.run().status()
    }

    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// `GET path` on the CA's metrics port, from the control plane's namespace.
    pub fn get(&self, path: &str) -> Result<HttpReply> {
        self.cp.http_get(self.cp.ca_metrics_addr(), path, PROBE_TIMEOUT)
    }

    /// The CA's `/metrics` page (must answer 200).
    pub fn metrics(&self) -> Result<String> {
        let r = self.get("/metrics")?;
        if r.status != 200 {
            bail!("GET /metrics on the CA answered {}: {}", r.status, r.text());
        }
        Ok(r.text())
    }

    /// Polls `GET /healthz/ready` (backoff from 10 ms) until it answers 200. Fails with the log
    /// tail if the CA exits or `timeout` passes.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(10);
        let mut last = String::from("no answer yet");
        loop {
            if let Some(st) = self.exit_status() {
                bail!(
                    "the CA service exited ({st}) while waiting for it to be ready; last: {last}\nlog {}:\n{}",
                    self.log_path().display(),
                    tail_file(&self.log_path(), 40)
                );
            }
            match self.get("/healthz/ready") {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("{} {}", r.status, r.text().trim()),
                Err(e) => last = format!("{e:#}"),
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "the CA service was not ready after {timeout:?}; last: {last}\nlog {}:\n{}",
                    self.log_path().display(),
                    tail_file(&self.log_path(), 40)
                );
            }
            std::thread::sleep(delay.min(deadline - now));
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// Sends `signal` (no-op if it has exited).
    pub fn kill(&self, signal: Signal) -> Result<()> {
        let mut run = self.run();
        if run.status().is_some() {
            return Ok(());
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.child.id() as i32), signal)
            .with_context(|| format!("sending {signal} to the CA service"))
    }

    /// SIGHUP: the CA re-reads its signing files and trust bundle.
    pub fn reload(&self) -> Result<()> {
        self.kill(Signal::SIGHUP)
    }

    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        poll_until(timeout, || self.exit_status())
            .ok_or_else(|| anyhow!("the CA service still runs after {timeout:?}"))
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

    /// Stops the CA if it runs (SIGTERM, then SIGKILL after 10 s) and starts it again with the
    /// same options (the signing volume as it is now) and a new log file. Does not wait for
    /// readiness.
    pub fn restart(&self) -> Result<()> {
        self.cp.sim().ensure_live()?;
        if self.is_running() {
            self.stop(Duration::from_secs(10))?;
        }
        let new = spawn(&self.cp, &self.opts, &self.bin)?;
        *self.run() = new;
        Ok(())
    }
}

fn spawn(cp: &ControlPlane, opts: &CaOpts, bin: &Path) -> Result<Run> {
    let sim = cp.sim();
    let n = cp.next_ca_run();
    let log = sim.log_dir.join(format!("sluice-ca-{n}.log"));
    let (cert, key) = cp.signing_paths();
    let bundle = sim_pki::ensure_trust_bundle(sim)?;
    let mut args: Vec<OsString> = vec![
        "ca".into(),
        "serve".into(),
        "--listen".into(),
        format!("0.0.0.0:{CA_PORT}").into(),
        "--signing-cert".into(),
        cert.into_os_string(),
        "--signing-key".into(),
        key.into_os_string(),
    ];
    if let Some(chain) = cp.chain_path()? {
        args.push("--chain".into());
        args.push(chain.into_os_string());
    }
    args.extend([
        "--trust-bundle".into(),
        bundle.into_os_string(),
        "--server-name".into(),
        cp.ip().to_string().into(),
    ]);
    if sim.dual_stack {
        args.push("--server-name".into());
        args.push(CONTROL_PLANE_IP6.to_string().into());
    }
    args.extend([
        "--kube-api".into(),
        cp.api_url().into(),
        "--metrics-addr".into(),
        format!("0.0.0.0:{CA_METRICS_PORT}").into(),
    ]);
    args.extend(opts.args.iter().cloned());

    let placement = cp.placement("sluice-ca");
    let mut cmd = process::command_in(
        &placement,
        std::iter::once(bin.as_os_str().to_owned()).chain(args.iter().cloned()),
    )?;
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log fd")?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", process::command_line(&cmd)))?;
    Ok(Run { child, log, args, status: None })
}

impl Drop for CaService {
    fn drop(&mut self) {
        if self.cp.sim().is_kept() {
            return;
        }
        let run = self.run.get_mut().unwrap_or_else(|e| e.into_inner());
        if run.status.is_none() {
            let _ = run.child.kill();
            let _ = run.child.wait();
        }
    }
}
