//! Instructions per proxied request, counted by valgrind's callgrind (repeatable on a noisy
//! machine, unlike time).
//!
//! sluice runs under `valgrind --tool=callgrind` from the start (a wrapper script is its
//! binary). valgrind 3.19 does not know `BPF_LINK_CREATE` (it warns "unhandled eBPF command 28")
//! but passes the syscall through, so the programs load and attach as usual. The counters
//! are driven with `callgrind_control` (vgdb) around the measured requests:
//!
//! 1. one keep-alive connection from the enrolled client through sluice (`slload seq`), a
//!    warm-up batch;
//! 2. `callgrind_control --zero`, N requests at a low fixed rate, `--dump` → total(N);
//! 3. `--zero`, 2N requests at the same rate, `--dump` → total(2N);
//! 4. per request = (total(2N) − total(N)) / N. Connection set-up is in neither window; what
//!    sluice does in the background (heartbeat, timers) is in both, in proportion to time: it
//!    is measured separately over an idle window as long as N requests take, and reported
//!    both as instructions/s and as the corrected per-request figure.
//!
//! The 2N dump is the profile: `callgrind_annotate --inclusive=yes` lists where the
//! instructions go.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sluice_tests::SluiceOpts;

use super::world::{wait_enrolled, World};

pub struct Params {
    pub n: u64,
    pub interval_us: u64,
    pub repeats: usize,
    pub out_dir: PathBuf,
}

fn control(arg: &str, pid: u32) -> Result<()> {
    let out = Command::new("callgrind_control")
        .args([arg, &pid.to_string()])
        .output()
        .context("running callgrind_control (valgrind installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("OK") {
        bail!("callgrind_control {arg} {pid}: {}{}", text.trim(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The highest-numbered dump `<base>.<pid>.<k>` and its total instruction count.
fn latest_dump(dir: &Path, pid: u32) -> Result<(PathBuf, u64)> {
    let prefix = format!("callgrind.out.{pid}.");
    let mut best: Option<(u32, PathBuf)> = None;
    for e in fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(k) = name.strip_prefix(&prefix).and_then(|k| k.parse::<u32>().ok()) {
            if best.as_ref().is_none_or(|(b, _)| k > *b) {
                best = Some((k, e.path()));
            }
        }
    }
    let (_, path) = best.with_context(|| format!("no callgrind dump {prefix}* in {}", dir.display()))?;
    let text = fs::read_to_string(&path)?;
    let total = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no totals in {}", path.display()))?;
    Ok((path, total))
}

/// zero → `f` → dump; returns the dump and its total.
fn window(pid: u32, dir: &Path, f: impl FnOnce() -> Result<()>) -> Result<(PathBuf, u64)> {
    control("--zero", pid)?;
    f()?;
    control("--dump", pid)?;
    // The dump is written by the guest shortly after the command is acknowledged.
    let mut last = None;
    for _ in 0..100 {
        match latest_dump(dir, pid) {
            Ok(d) if last.as_ref().is_some_and(|(p, _): &(PathBuf, u64)| *p == d.0) => return Ok(d),
            Ok(d) => last = Some(d),
            Err(_) => {}
        }
        thread::sleep(Duration::from_millis(100));
    }
    last.context("callgrind wrote no dump")
}

/// Replaces n1's sluice with one under callgrind and measures the `l4` scenario.
pub fn measure(world: &mut World, p: &Params) -> Result<Value> {
    let dir = p.out_dir.join("callgrind");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    // The wrapper keeps the simulator's way of starting sluice (`<bin> run --node …`).
    let wrapper = world.sim.temp_dir().join("sluice-callgrind.sh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={}/callgrind.out.%p --dump-instr=no --collect-jumps=no --vgdb=yes {} \"$@\"\n",
            dir.display(),
            world.bins.sluice.display()
        ),
    )?;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
    let mut opts = SluiceOpts { bin: Some(wrapper), ..SluiceOpts::default() };
    if world.bins.sluice_takes_ca_dir() {
        let ca = world.sim.temp_dir().join("ca-callgrind");
        let out = Command::new(&world.bins.sluice).args(["ca", "init", "--dir"]).arg(&ca).output()?;
        if !out.status.success() {
            bail!("sluice ca init: {}", String::from_utf8_lossy(&out.stderr));
        }
        opts.args = vec!["--ca-dir".into(), ca.into_os_string()];
    }
    world.sluice.stop(Duration::from_secs(10)).context("stopping the native sluice")?;
    let sluice = world.n1.start_sluice(opts)?;
    let slow = Duration::from_secs(180);
    sluice.wait_ready(slow).context("sluice under callgrind")?;
    wait_enrolled(&sluice, &[&world.mesh_client], slow)?;
    let pid = sluice.pid();

    let mut client = world.mesh_client.spawn([
        world.slload().to_string_lossy().as_ref(),
        "seq",
        "--to",
        &world.l4.http.to_string(),
        "--interval-us",
        &p.interval_us.to_string(),
        "--timeout-ms",
        "60000",
    ])?;
    let connected = client.wait_for_json(slow, |v| v["event"] == "connected")?;
    world.l4.check_path(connected["local"].as_str())?;
    let batch_timeout = |n: u64| Duration::from_micros(n * p.interval_us) * 3 + Duration::from_secs(120);
    let mut send = |n: u64| -> Result<()> {
        client.send_line(&n.to_string())?;
        let done = client.wait_for_json(batch_timeout(n), |v| v["event"] == "done")?;
        if done["errors"].as_u64() != Some(0) {
            bail!("slload seq: {done}");
        }
        Ok(())
    };
    // Warm-up: lazily initialised state, first-use allocations, buffer growth.
    send(p.n.min(200))?;
    let mut rounds = Vec::new();
    let mut profile_dump = None;
    for _ in 0..p.repeats.max(1) {
        let (_, t1) = window(pid, &dir, || send(p.n))?;
        let (d2, t2) = window(pid, &dir, || send(2 * p.n))?;
        let (_, idle) = window(pid, &dir, || {
            thread::sleep(Duration::from_micros(p.n * p.interval_us));
            Ok(())
        })?;
        let per_request = (t2 as f64 - t1 as f64) / p.n as f64;
        let corrected = (t2 as f64 - t1 as f64 - idle as f64) / p.n as f64;
        rounds.push(json!({
            "total_n": t1, "total_2n": t2, "idle_window": idle,
            "per_request": per_request.round(), "per_request_minus_idle": corrected.round(),
        }));
        profile_dump = Some(d2);
    }
    client.close_stdin();
    let _ = client.wait(Duration::from_secs(30));
    // Graceful stop: callgrind writes its final dump.
    let _ = sluice.stop(Duration::from_secs(60));

    let profile = match &profile_dump {
        Some(d) => annotate(d, 2 * p.n, &p.out_dir)?,
        None => Value::Null,
    };
    let med = |k: &str| super::measure::median(rounds.iter().filter_map(|r| r[k].as_f64()).collect());
    let idle_per_s = super::measure::median(
        rounds
            .iter()
            .filter_map(|r| r["idle_window"].as_f64())
            .map(|i| i / (p.n as f64 * p.interval_us as f64 / 1e6))
            .collect(),
    );
    Ok(json!({
        "scenario": "l4",
        "n": p.n,
        "interval_us": p.interval_us,
        "rate_rps": 1e6 / p.interval_us as f64,
        "per_request": med("per_request"),
        "per_request_minus_idle": med("per_request_minus_idle"),
        "idle_instructions_per_s": idle_per_s.map(f64::round),
        "rounds": rounds,
        "profile": profile,
    }))
}

/// Self and inclusive cost per function of one callgrind dump (`--dump-instr=no`, so a cost
/// line is `<line> <Ir>`). Parsed here rather than with callgrind_annotate, which (3.19)
/// counts the cost of calls still active at a mid-run dump (`calls=0` lines) as the caller's
/// own.
struct Profile {
    total: u64,
    /// name → (self, inclusive, object)
    funcs: std::collections::HashMap<String, (u64, u64, String)>,
}

fn parse_dump(path: &Path) -> Result<Profile> {
    use std::collections::HashMap;
    let text = fs::read_to_string(path)?;
    let mut names: HashMap<(char, String), String> = HashMap::new();
    // "(id) name" defines a compressed name, "(id)" refers to it.
    let mut resolve = |kind: char, v: &str| -> String {
        let v = v.trim();
        if let Some(rest) = v.strip_prefix('(') {
            if let Some((id, name)) = rest.split_once(')') {
                let name = name.trim();
                if name.is_empty() {
                    return names.get(&(kind, id.to_string())).cloned().unwrap_or_else(|| format!("({id})"));
                }
                names.insert((kind, id.to_string()), name.to_string());
                return name.to_string();
            }
        }
        v.to_string()
    };
    let mut funcs: HashMap<String, (u64, u64, String)> = HashMap::new();
    let (mut total, mut ob, mut func) = (0u64, String::new(), String::new());
    let mut call_pending = false;
    let mut callee = String::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("ob=") {
            ob = resolve('o', v);
        } else if let Some(v) = line.strip_prefix("cob=") {
            resolve('o', v);
        } else if let Some(v) = line.strip_prefix("fn=") {
            func = resolve('f', v);
            funcs.entry(func.clone()).or_insert_with(|| (0, 0, ob.clone()));
        } else if let Some(v) = line.strip_prefix("cfn=") {
            callee = resolve('f', v);
        } else if let Some(v) = line.strip_prefix("fl=").or_else(|| line.strip_prefix("fi=")).or_else(|| line.strip_prefix("fe=")) {
            resolve('l', v);
        } else if let Some(v) = line.strip_prefix("cfi=").or_else(|| line.strip_prefix("cfl=")) {
            resolve('l', v);
        } else if line.starts_with("calls=") {
            call_pending = true;
        } else if let Some(v) = line.strip_prefix("summary:").or_else(|| line.strip_prefix("totals:")) {
            total = total.max(v.trim().parse().unwrap_or(0));
        } else if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*') {
            let ir: u64 = line.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
            let e = funcs.entry(func.clone()).or_insert_with(|| (0, 0, ob.clone()));
            if call_pending {
                // A call's inclusive cost: the caller's inclusive only (not for self-recursion).
                if callee != func {
                    e.1 += ir;
                }
                call_pending = false;
            } else {
                e.0 += ir;
                e.1 += ir;
            }
        }
    }
    Ok(Profile { total, funcs })
}

/// What a function belongs to, for the breakdown by component.
fn component(name: &str, object: &str) -> &'static str {
    let has = |p: &str| name.starts_with(p) || name.contains(&format!("<{p}")) || name.contains(&format!(" {p}"));
    if has("sluice") {
        "sluice"
    } else if has("tokio::") || has("mio::") {
        "tokio + mio (runtime, I/O driver)"
    } else if has("tracing") || has("arc_swap") || has("aya") || has("hyper") || has("socket2") {
        "other crates"
    } else if has("alloc::") || has("core::") || has("std::") || name.contains("__rust") || name.contains("__rdl") {
        "Rust std/core/alloc"
    } else if object.contains("libc.so") {
        "libc (syscall wrappers, malloc, memcpy)"
    } else if object.contains("ld-linux") {
        "dynamic loader"
    } else {
        "other"
    }
}

/// The top functions of a dump by self and by inclusive cost, per request, and the self cost
/// by component; the callgrind_annotate listing goes to `callgrind-profile.txt` as well.
fn annotate(dump: &Path, requests: u64, out_dir: &Path) -> Result<Value> {
    let prof = parse_dump(dump)?;
    let per = |ir: u64| (ir as f64 / requests as f64).round();
    let mut by_self: Vec<(&String, &(u64, u64, String))> = prof.funcs.iter().collect();
    by_self.sort_by(|a, b| b.1 .0.cmp(&a.1 .0));
    let mut by_incl: Vec<(&String, &(u64, u64, String))> = prof.funcs.iter().collect();
    by_incl.sort_by(|a, b| b.1 .1.cmp(&a.1 .1));
    // Frames that contain (nearly) everything (thread start, the runtime's worker loop) say
    // nothing about where the time goes.
    let wrapper = |incl: u64| prof.total > 0 && incl as f64 > 0.9 * prof.total as f64;
    let row = |(name, (s, i, ob)): (&String, &(u64, u64, String))| {
        json!({"function": name, "self": s, "inclusive": i, "self_per_request": per(*s), "inclusive_per_request": per(*i), "object": ob})
    };
    let exclusive: Vec<Value> = by_self.iter().take(30).map(|x| row(*x)).collect();
    let inclusive: Vec<Value> = by_incl.iter().filter(|(_, (_, i, _))| !wrapper(*i)).take(40).map(|x| row(*x)).collect();
    let mut comps: std::collections::BTreeMap<&str, u64> = Default::default();
    for (name, (s, _, ob)) in &prof.funcs {
        *comps.entry(component(name, ob)).or_default() += s;
    }
    let mut comps: Vec<(&str, u64)> = comps.into_iter().collect();
    comps.sort_by(|a, b| b.1.cmp(&a.1));
    let components: Vec<Value> = comps
        .iter()
        .map(|(c, s)| json!({"component": c, "self_per_request": per(*s), "pct": (*s as f64 * 1000.0 / prof.total.max(1) as f64).round() / 10.0}))
        .collect();

    let mut text = format!("Profile of {} ({} requests, {} instructions in all)\n\n", dump.display(), requests, prof.total);
    text += "== by self cost\n  self/request  inclusive/request  function\n";
    for (name, (s, i, _)) in by_self.iter().take(60) {
        text += &format!("{:>14} {:>18}  {name}\n", per(*s), per(*i));
    }
    text += "\n== by inclusive cost\n  self/request  inclusive/request  function\n";
    for (name, (s, i, _)) in by_incl.iter().take(120) {
        text += &format!("{:>14} {:>18}  {name}\n", per(*s), per(*i));
    }
    text += "\n== self cost by component\n";
    for (c, s) in &comps {
        text += &format!("{:>14}  {c}\n", per(*s));
    }
    let annotated = Command::new("callgrind_annotate").args(["--inclusive=yes"]).arg(dump).output();
    if let Ok(a) = annotated {
        text += &format!("\n== callgrind_annotate --inclusive=yes\n{}", String::from_utf8_lossy(&a.stdout));
    }
    fs::write(out_dir.join("callgrind-profile.txt"), text)?;
    Ok(json!({"total": prof.total, "requests": requests, "exclusive": exclusive, "inclusive": inclusive, "components": components}))
}
