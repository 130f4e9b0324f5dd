//! Starting programs inside a (pod or node) network namespace and cgroup, and the handle on
//! such a process.

use std::{
    ffi::{OsStr, OsString},
    fs,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::{CommandExt, ExitStatusExt},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::{netns, util::poll_until, SimShared};

pub use nix::sys::signal::Signal;

/// Where a process is placed: a named netns and a cgroup-v2 directory.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub netns: String,
    pub cgroup: PathBuf,
    /// Used in log file names and error messages, e.g. `n1-web` or `n1-node`.
    pub label: String,
}

/// A `Command` that runs `args` inside a pod from outside the sim's process (`cargo xtask sim
/// exec`): it joins the pod's cgroup, so that sluice captures its connections as the pod's, and
/// enters the pod's network namespace. `ip netns exec` alone enters the namespace only, and a
/// process outside the pod's cgroup is not captured (a ClusterIP then refuses the connection).
pub fn command_in_pod<I, S>(netns: &str, cgroup: &Path, args: I) -> Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let placement =
        Placement { netns: netns.to_string(), cgroup: cgroup.to_path_buf(), label: netns.to_string() };
    command_in(&placement, args)
}

/// Builds a `Command` that, between fork and exec, joins the placement's cgroup and enters its
/// netns. The fds are opened here, in the parent, because only async-signal-safe calls are
/// allowed after fork in a multithreaded process (no allocation, no path lookups by std): the
/// child does two syscalls on inherited fds. Both fds are O_CLOEXEC, so the program never sees
/// them, and they close when the `Command` is dropped (no netns stays pinned by this process).
pub(crate) fn command_in<I, S>(placement: &Placement, args: I) -> Result<Command>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut args = args.into_iter().map(|a| a.as_ref().to_os_string());
    let program = args.next().ok_or_else(|| anyhow!("empty command line"))?;
    let ns_fd: OwnedFd = netns::open(&placement.netns)?;
    let procs = placement.cgroup.join("cgroup.procs");
    let cg_fd: OwnedFd = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))?
        .into();
    let mut cmd = Command::new(&program);
    cmd.args(args);
    // SAFETY: the closure only makes raw syscalls on fds owned by the closure (kept alive by the
    // Command), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // Cgroup first: from here on every descendant is accounted to (and killable via)
            // the pod's cgroup. Writing "0" means "the writing process".
            if libc::write(cg_fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn program_base(cmd: &Command) -> String {
    let p = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy();
    // simpod's subcommand makes log names readable: simpod-echo-server.
    match (p.as_ref(), cmd.get_args().next()) {
        ("simpod", Some(sub)) => format!("simpod-{}", sub.to_string_lossy()),
        _ => p.into_owned(),
    }
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        }
    })
    .collect()
}

/// A running program inside the simulator. Its stdout is read line by line (and also copied to
/// `<logs>/<label>-<n>-<program>.stdout`); its stderr goes to the matching `.stderr` file; its
/// stdin is a pipe (see [`SimProcess::send_line`]). Dropping the handle kills the process
/// (SIGKILL) and reaps it, unless the simulator was kept ([`crate::Sim::keep`]).
pub struct SimProcess {
    description: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    all_lines: Arc<Mutex<Vec<String>>>,
    /// Set by the stdout reader thread at EOF (every line is in `all_lines` then).
    stdout_done: Arc<(Mutex<bool>, std::sync::Condvar)>,
    stdout_eof: bool,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
    sim: Arc<SimShared>,
}

/// The handle type for processes in pods (and nodes).
pub type PodProcess = SimProcess;

/// The result of a process run to completion.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Every stdout line parsed as JSON.
    pub fn json_lines(&self) -> Result<Vec<Value>> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("stdout line is not JSON: {l}"))
            })
            .collect()
    }

    /// The last JSON line of stdout (simpod prints its result last).
    pub fn json(&self) -> Result<Value> {
        self.json_lines()?
            .pop()
            .ok_or_else(|| anyhow!("no JSON on stdout; stderr: {}", self.stderr.trim()))
    }

    /// Fails (with stdout and stderr in the message) unless the exit status is 0.
    pub fn check(&self) -> Result<&Self> {
        if !self.status.success() {
            bail!(
                "exit {}\nstdout:\n{}\nstderr:\n{}",
                self.status,
                self.stdout.trim(),
                self.stderr.trim()
            );
        }
        Ok(self)
    }
}

impl SimProcess {
    pub(crate) fn spawn(
        sim: &Arc<SimShared>,
        placement: &Placement,
        mut cmd: Command,
    ) -> Result<SimProcess> {
        let (stdout_path, stderr_path) = sim.log_paths(&placement.label, &program_base(&cmd));
        let description = format!("[{}] {}", placement.label, command_line(&cmd));
        let stderr = fs::File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {description}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        let all_lines = Arc::new(Mutex::new(Vec::new()));
        let mut copy = fs::File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;
        let all = all_lines.clone();
        let stdout_done = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let done = stdout_done.clone();
        // A thread per process drains stdout: the process never blocks on a full pipe, and the
        // test reads lines with timeouts from the channel. It ends at EOF.
        std::thread::Builder::new()
            .name(format!("stdout-{}", child.id()))
            .spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let _ = copy.write_all(&buf);
                            let line = String::from_utf8_lossy(&buf)
                                .trim_end_matches(['\n', '\r'])
                                .to_string();
                            all.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(line.clone());
                            let _ = tx.send(line);
                        }
                    }
                }
                *done.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
                done.1.notify_all();
            })
            .context("starting stdout reader thread")?;
        Ok(SimProcess {
            description,
            child,
            stdin,
            lines: rx,
            all_lines,
            stdout_done,
            stdout_eof: false,
            stdout_path,
            stderr_path,
            status: None,
            sim: sim.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line; `Ok(None)` once stdout is closed. Fails after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<String>> {
        if self.stdout_eof {
            return Ok(None);
        }
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(Some(line)),
            Err(RecvTimeoutError::Disconnected) => {
                self.stdout_eof = true;
                Ok(None)
            }
            Err(RecvTimeoutError::Timeout) => Err(anyhow!(
                "no stdout line within {timeout:?} from {}{}",
                self.description,
                self.context()
            )),
        }
    }

    /// Reads stdout lines until one satisfies `pred` (earlier lines are consumed but still
    /// listed by [`stdout_lines`](Self::stdout_lines)).
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Ok(Some(line)) if pred(&line) => return Ok(line),
                Ok(Some(_)) => {}
                Ok(None) => bail!(
                    "{} closed stdout before the expected line{}",
                    self.description,
                    self.context()
                ),
                Err(e) => return Err(e.context(format!("waiting {timeout:?} for a matching line"))),
            }
        }
    }

    /// Like [`wait_for_line`](Self::wait_for_line) for JSON lines (non-JSON lines are skipped).
    pub fn wait_for_json(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let mut found = None;
        self.wait_for_line(timeout, |l| match serde_json::from_str::<Value>(l) {
            Ok(v) if pred(&v) => {
                found = Some(v);
                true
            }
            _ => false,
        })?;
        Ok(found.expect("set when the predicate matched"))
    }

    /// The next stdout line parsed as JSON; `Ok(None)` at EOF.
    pub fn next_json(&mut self, timeout: Duration) -> Result<Option<Value>> {
        match self.next_line(timeout)? {
            None => Ok(None),
            Some(l) => Ok(Some(
                serde_json::from_str(&l).with_context(|| format!("not JSON: {l}"))?,
            )),
        }
    }

    /// Waits for simpod's `{"event":"listening"}` line: the server socket is bound and listening.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<Value> {
        self.wait_for_json(timeout, |v| v["event"] == "listening")
    }

    /// Every stdout line seen so far (including consumed ones).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.all_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every stdout line seen so far that parses as JSON.
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn stderr_contents(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Writes `line` and a newline to the process's stdin.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stdin of {} already closed", self.description))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .with_context(|| format!("writing to stdin of {}", self.description))
    }

    /// Closes stdin (the program sees EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The exit status, if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.description))?;
            if self.status.is_some() {
                self.await_stdout(Duration::from_secs(5));
            }
        }
        Ok(self.status)
    }

    /// After the process exited: waits (up to `limit`: a child it left behind may hold the
    /// pipe open) until the reader thread has taken every line, so that `json_lines` and
    /// `stdout_lines` see the whole output, not what the thread had copied so far.
    fn await_stdout(&self, limit: Duration) {
        let (lock, cv) = &*self.stdout_done;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = cv.wait_timeout_while(guard, limit, |done| !*done);
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut err = None;
        let st = poll_until(timeout, || match self.try_status() {
            Ok(s) => s,
            Err(e) => {
                err = Some(e);
                Some(ExitStatus::from_raw(-1))
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        st.ok_or_else(|| {
            anyhow!(
                "{} still running after {timeout:?}{}",
                self.description,
                self.context()
            )
        })
    }

    /// Waits for exit and returns everything the process printed.
    pub fn wait_output(&mut self, timeout: Duration) -> Result<Output> {
        self.close_stdin();
        let status = self.wait(timeout)?;
        // The stdout thread may still be forwarding the last lines: drain until EOF (a child
        // of the process could hold the pipe open, so bound the wait).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.stdout_eof && Instant::now() < deadline {
            let _ = self.next_line(deadline.saturating_duration_since(Instant::now()));
        }
        let mut stdout = self.stdout_lines().join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        Ok(Output {
            status,
            stdout,
            stderr: self.stderr_contents(),
        })
    }

    /// Sends `signal` to the process (not to its children).
    pub fn kill(&mut self, signal: Signal) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .with_context(|| format!("sending {signal} to {}", self.description))
    }

    fn context(&self) -> String {
        let status = match self.status {
            Some(s) => format!("\nexited: {s}"),
            None => String::new(),
        };
        format!(
            "{status}\nstdout (last lines):\n{}\nstderr (last lines):\n{}",
            crate::util::tail_str(&self.stdout_lines().join("\n"), 20),
            crate::util::tail_str(&self.stderr_contents(), 20)
        )
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        if self.sim.is_kept() || self.status.is_some() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process started through the simulator that nothing in this process reads from: stdout and
/// stderr go to log files, stdin is closed, and it keeps running when this process exits (the
/// playground's workloads and sluice instances outlive `cargo xtask sim up`). Teardown or a
/// sweep kills it with its cgroup; the sim reaps it if it is still its child then.
#[derive(Debug, Clone)]
pub struct DetachedProcess {
    pub pid: u32,
    pub description: String,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl DetachedProcess {
    pub(crate) fn spawn(sim: &Arc<SimShared>, placement: &Placement, mut cmd: Command) -> Result<DetachedProcess> {
        let (stdout_path, stderr_path) = sim.log_paths(&placement.label, &program_base(&cmd));
        let description = format!("[{}] {}", placement.label, command_line(&cmd));
        let out = fs::File::create(&stdout_path).with_context(|| format!("creating {}", stdout_path.display()))?;
        let err = fs::File::create(&stderr_path).with_context(|| format!("creating {}", stderr_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().with_context(|| format!("spawning {description}"))?;
        let pid = child.id();
        sim.state().sandboxes.push(child);
        Ok(DetachedProcess { pid, description, stdout_path, stderr_path })
    }

    /// Whether it still runs (not exited, not a zombie waiting to be reaped).
    pub fn is_running(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists() && !netns::is_zombie(self.pid as i32)
    }

    /// Every JSON line it printed so far.
    pub fn json_lines(&self) -> Vec<Value> {
        fs::read_to_string(&self.stdout_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for simpod's `{"event":"listening"}` line (read from its stdout file), failing at
    /// once if the process exits first.
    pub fn wait_listening(&self, timeout: Duration) -> Result<Value> {
        let mut exited = false;
        let found = poll_until(timeout, || {
            if let Some(v) = self.json_lines().into_iter().find(|v| v["event"] == "listening") {
                return Some(Some(v));
            }
            if !self.is_running() {
                exited = true;
                return Some(None);
            }
            None
        });
        match found.flatten() {
            Some(v) => Ok(v),
            None => bail!(
                "{} {} before it listened\nstdout:\n{}\nstderr:\n{}",
                self.description,
                if exited { "exited".to_string() } else { format!("printed no listening line within {timeout:?}") },
                crate::util::tail_file(&self.stdout_path, 20),
                crate::util::tail_file(&self.stderr_path, 20)
            ),
        }
    }
}

/// Runs a command to completion with stdout and stderr in log files.
pub(crate) fn run_to_completion(
    sim: &Arc<SimShared>,
    placement: &Placement,
    mut cmd: Command,
    timeout: Duration,
) -> Result<Output> {
    let (stdout_path, stderr_path) = sim.log_paths(&placement.label, &program_base(&cmd));
    let description = format!("[{}] {}", placement.label, command_line(&cmd));
    let out = fs::File::create(&stdout_path)
        .with_context(|| format!("creating {}", stdout_path.display()))?;
    let err = fs::File::create(&stderr_path)
        .with_context(|| format!("creating {}", stderr_path.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {description}"))?;
    let status = poll_until(timeout, || child.try_wait().ok().flatten());
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout: read(&stdout_path),
            stderr: read(&stderr_path),
        }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{description} did not finish within {timeout:?} (killed)\nstdout:\n{}\nstderr:\n{}",
                crate::util::tail_str(&read(&stdout_path), 20),
                crate::util::tail_str(&read(&stderr_path), 20)
            )
        }
    }
}

/// Collects command-line arguments given as anything string-like.
pub(crate) fn os_args<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect()
}
