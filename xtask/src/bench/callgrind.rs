//! Instructions per proxied request, counted by valgrind's callgrind (repeatable on a noisy
//! machine, unlike time).
//!
//! sluice runs under `valgrind --tool=callgrind` from the start (a wrapper script is its
//! binary). valgrind 3.19 does not know `BPF_LINK_CREATE` (it warns "unhandled eBPF command 28")
//! but passes the syscall through, so the programs load and attach as usual. The counters
//! are driven with `callgrind_control` (vgdb) around the measured requests:
//!
//! 1. one keep-alive connection from the enrolled client through sluice (`slload seq`: HTTP/1.1,
//!    or one HTTP/2 connection with unary gRPC calls for `grpc`), a warm-up batch;
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
use sluice_tests::{Sluice, SluiceOpts};

use super::{
    measure::PathProbe,
    world::{wait_enrolled, World},
    Scenario,
};

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
        bail!(
            "callgrind_control {arg} {pid}: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The highest dump number `k` of `callgrind.out.<pid>.<k>` in `dir`.
fn dump_index(dir: &Path, pid: u32) -> Option<u32> {
    let prefix = format!("callgrind.out.{pid}.");
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix(&prefix).and_then(|k| k.parse().ok()))
        .max()
}

fn dump_total(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// zero → `f` → dump, for every pid; returns each pid's new dump and its total.
fn window(pids: &[u32], dir: &Path, f: impl FnOnce() -> Result<()>) -> Result<Vec<(PathBuf, u64)>> {
    let before: Vec<Option<u32>> = pids.iter().map(|p| dump_index(dir, *p)).collect();
    for pid in pids {
        control("--zero", *pid)?;
    }
    f()?;
    for pid in pids {
        control("--dump", *pid)?;
    }
    let mut out = Vec::new();
    for (pid, before) in pids.iter().zip(before) {
        // The guest writes the dump shortly after acknowledging the command.
        let found = sluice_tests::poll_until(Duration::from_secs(60), || {
            let k = dump_index(dir, *pid).filter(|k| Some(*k) > before)?;
            let path = dir.join(format!("callgrind.out.{pid}.{k}"));
            dump_total(&path).map(|t| (path, t))
        });
        out.push(found.with_context(|| format!("callgrind wrote no new dump for pid {pid}"))?);
    }
    Ok(out)
}

/// Starts sluice on `node` under callgrind (replacing `native`, which is stopped).
fn start_under_callgrind(
    world: &World,
    node: &sluice_tests::Node,
    native: &Sluice,
    dir: &Path,
    enrolled: &[&sluice_tests::Pod],
) -> Result<Sluice> {
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
    let mut opts = SluiceOpts { bin: Some(wrapper), args: world.bins.sluice_args(), env: world.bins.sluice_opts().env, ..SluiceOpts::default() };
    if world.bins.sluice_takes_ca_dir() {
        // The simulator passes its mesh CA only to its default binary: pass the same one.
        let ca = world.sim.temp_dir().join("ca");
        if !ca.join("ca.pem").exists() {
            let out = Command::new(&world.bins.sluice).args(["ca", "init", "--dir"]).arg(&ca).output()?;
            if !out.status.success() {
                bail!("sluice ca init: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        opts.args.extend(["--ca-dir".into(), ca.into_os_string()]);
    }
    native.stop(Duration::from_secs(10)).context("stopping the native sluice")?;
    let sluice = node.start_sluice(opts)?;
    let slow = Duration::from_secs(180);
    sluice.wait_ready(slow).context("sluice under callgrind")?;
    wait_enrolled(&sluice, enrolled, slow)?;
    Ok(sluice)
}

/// Replaces the sluices with ones under callgrind and measures every proxied scenario. Returns
/// the figures per scenario and the scenarios that failed (with why).
pub fn measure(
    world: &mut World,
    scenarios: &[Scenario],
    p: &Params,
) -> Result<(Value, Vec<(String, String)>)> {
    let dir = p.out_dir.join("callgrind");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let proxied: Vec<Scenario> = scenarios.iter().copied().filter(|s| !s.is_baseline()).collect();
    let tunnel = proxied.iter().any(|s| s.via_tunnel());
    let cg1 = start_under_callgrind(world, &world.n1, &world.sluice, &dir, &[&world.mesh_client, &world.mesh_server_local])?;
    let cg2 = match (tunnel, &world.n2, &world.sluice2, &world.mesh_server_x) {
        (true, Some(n2), Some(native), Some(mx)) => {
            Some(start_under_callgrind(world, n2, native, &dir, &[mx])?)
        }
        (true, ..) => bail!("mtls needs the second node"),
        _ => None,
    };
    let mut results = json!({});
    let mut failed = Vec::new();
    for s in proxied {
        let route = world.route(s)?.clone();
        // (node, pid) of every sluice the scenario's requests pass through.
        let mut nodes = vec![("n1", cg1.pid())];
        if s.via_tunnel() {
            nodes.push(("n2", cg2.as_ref().expect("started for the tunnel").pid()));
        }
        let pids: Vec<u32> = nodes.iter().map(|(_, p)| *p).collect();
        eprintln!("bench: callgrind, {}: N = {}", s.name(), p.n);
        match measure_route(world, &route, (&cg1, cg2.as_ref()), &nodes, &pids, &dir, p) {
            Ok(v) => results[s.name()] = v,
            // The other scenarios are still worth measuring.
            Err(e) => {
                eprintln!("bench: callgrind, {}: {e:#}", s.name());
                failed.push((format!("instructions {}", s.name()), format!("{e:#}")));
            }
        }
    }
    // Graceful stops: callgrind writes its final dumps.
    let _ = cg1.stop(Duration::from_secs(60));
    if let Some(c) = cg2 {
        let _ = c.stop(Duration::from_secs(60));
    }
    Ok((results, failed))
}

fn measure_route(
    world: &World,
    route: &super::world::Route,
    (sl1, sl2): (&Sluice, Option<&Sluice>),
    nodes: &[(&str, u32)],
    pids: &[u32],
    dir: &Path,
    p: &Params,
) -> Result<Value> {
    let slow = Duration::from_secs(180);
    let probe = PathProbe::before(sl1, sl2, route)?;
    let mut args = vec![world.slload().to_string_lossy().into_owned(), "seq".into()];
    args.extend(route.slload_target());
    args.extend(["--interval-us".into(), p.interval_us.to_string(), "--timeout-ms".into(), "60000".into()]);
    let mut client = route.client.spawn(&args)?;
    let connected = client.wait_for_json(slow, |v| v["event"] == "connected")?;
    route.check_path(connected["local"].as_str())?;
    let mut answered = 0u64;
    let batch_timeout = |n: u64| Duration::from_micros(n * p.interval_us) * 3 + Duration::from_secs(120);
    let mut send = |n: u64| -> Result<()> {
        client.send_line(&n.to_string())?;
        let done = client.wait_for_json(batch_timeout(n), |v| v["event"] == "done")?;
        if done["errors"].as_u64() != Some(0) {
            bail!("slload seq: {done}");
        }
        answered += n;
        Ok(())
    };
    // Warm-up: lazily initialised state, first-use allocations, buffer growth, the tunnel.
    send(p.n.min(200))?;
    let sum = |w: &[(PathBuf, u64)]| w.iter().map(|(_, t)| *t as f64).sum::<f64>();
    let mut rounds = Vec::new();
    let mut profile_dumps = Vec::new();
    for _ in 0..p.repeats.max(1) {
        let w1 = window(pids, dir, || send(p.n))?;
        let w2 = window(pids, dir, || send(2 * p.n))?;
        let idle = window(pids, dir, || {
            thread::sleep(Duration::from_micros(p.n * p.interval_us));
            Ok(())
        })?;
        let (t1, t2, ti) = (sum(&w1), sum(&w2), sum(&idle));
        let per_node: Vec<Value> = nodes
            .iter()
            .enumerate()
            .map(|(i, (node, _))| {
                json!({"node": node, "per_request": ((w2[i].1 as f64 - w1[i].1 as f64) / p.n as f64).round()})
            })
            .collect();
        rounds.push(json!({
            "total_n": t1, "total_2n": t2, "idle_window": ti,
            "per_request": ((t2 - t1) / p.n as f64).round(),
            "per_request_minus_idle": ((t2 - t1 - ti) / p.n as f64).round(),
            "per_node": per_node,
        }));
        profile_dumps = w2.into_iter().map(|(d, _)| d).collect();
    }
    client.close_stdin();
    let _ = client.wait(Duration::from_secs(30));
    probe.check(sl1, sl2, route, false, Some(answered))?;
    let mut profiles = Vec::new();
    for ((node, _), dump) in nodes.iter().zip(&profile_dumps) {
        let name = format!("callgrind-profile-{}-{node}.txt", route.scenario.name());
        let mut prof = annotate(dump, 2 * p.n, &p.out_dir.join(&name))?;
        prof["node"] = json!(node);
        prof["file"] = json!(name);
        profiles.push(prof);
    }
    let med = |k: &str| super::measure::median(rounds.iter().filter_map(|r| r[k].as_f64()).collect());
    let window_s = p.n as f64 * p.interval_us as f64 / 1e6;
    let idle_per_s = super::measure::median(
        rounds.iter().filter_map(|r| r["idle_window"].as_f64()).map(|i| i / window_s).collect(),
    );
    Ok(json!({
        "scenario": route.scenario.name(),
        "nodes": nodes.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "n": p.n,
        "interval_us": p.interval_us,
        "rate_rps": 1e6 / p.interval_us as f64,
        "per_request": med("per_request"),
        "per_request_minus_idle": med("per_request_minus_idle"),
        "idle_instructions_per_s": idle_per_s.map(f64::round),
        "rounds": rounds,
        "profiles": profiles,
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
        } else if let Some(v) =
            line.strip_prefix("fl=").or_else(|| line.strip_prefix("fi=")).or_else(|| line.strip_prefix("fe="))
        {
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
    let has =
        |p: &str| name.starts_with(p) || name.contains(&format!("<{p}")) || name.contains(&format!(" {p}"));
    if has("sluice") {
        "sluice"
    } else if has("rustls")
        || has("ring::")
        || name.starts_with("ring_core")
        || name.contains("aesni")
        || name.contains("gcm")
        || name.contains("ghash")
        || name.contains("chacha")
        || name.contains("sha256")
        || has("webpki")
    {
        "TLS (rustls, ring: records, AES-GCM)"
    } else if has("h2::") {
        "h2 (HTTP/2 framing: HBONE tunnel, h2c and gRPC)"
    } else if has("hyper") || has("http::") || has("httparse") || has("bytes::") || has("http_body") {
        "hyper, http, httparse, bytes (HTTP/1.1 and HTTP/2 proxying)"
    } else if has("tokio::") || has("mio::") {
        "tokio + mio (runtime, I/O driver)"
    } else if has("tracing") || has("arc_swap") || has("aya") || has("socket2") {
        "other crates"
    } else if has("alloc::")
        || has("core::")
        || has("std::")
        || name.contains("__rust")
        || name.contains("__rdl")
    {
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
fn annotate(dump: &Path, requests: u64, out_file: &Path) -> Result<Value> {
    let prof = parse_dump(dump)?;
    let per = |ir: u64| (ir as f64 / requests as f64).round();
    let mut by_self: Vec<(&String, &(u64, u64, String))> = prof.funcs.iter().collect();
    by_self.sort_by(|a, b| b.1 .0.cmp(&a.1 .0));
    let mut by_incl: Vec<(&String, &(u64, u64, String))> = prof.funcs.iter().collect();
    by_incl.sort_by(|a, b| b.1 .1.cmp(&a.1 .1));
    // Frames that contain (nearly) everything (thread start, the runtime's worker loop) say
    // nothing about where the time goes.
    let wrapper = |incl: u64| prof.total > 0 && incl as f64 > 0.9 * prof.total as f64;
    let row = |(name, (s, i, ob)): (&String, &(u64, u64, String))| json!({"function": name, "self": s, "inclusive": i, "self_per_request": per(*s), "inclusive_per_request": per(*i), "object": ob});
    let exclusive: Vec<Value> = by_self.iter().take(30).map(|x| row(*x)).collect();
    let inclusive: Vec<Value> =
        by_incl.iter().filter(|(_, (_, i, _))| !wrapper(*i)).take(40).map(|x| row(*x)).collect();
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

    let mut text = format!(
        "Profile of {} ({} requests, {} instructions in all)\n\n",
        dump.display(),
        requests,
        prof.total
    );
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
    fs::write(out_file, text)?;
    Ok(
        json!({"total": prof.total, "requests": requests, "exclusive": exclusive, "inclusive": inclusive, "components": components}),
    )
}
