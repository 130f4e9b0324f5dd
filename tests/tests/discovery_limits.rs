//! Discovery cannot be wedged (issue 12, point 3), end to end: sluice runs on a simulated node
//! and files that once froze its model are dropped into the manifest directory. Each must be
//! refused with its name and the reason (log, `sluice status`, `GET /model`), and every later
//! change must still apply: new pods, namespace edits, the bad file's removal or fix.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use common::*;
use serde_json::Value;
use sluice_tests::{manifest, PodOpts, Sluice, SluiceOpts};

/// The first log line that contains every needle (polled, with a deadline).
fn wait_log(sluice: &Sluice, needles: &[&str]) -> Result<String> {
    let deadline = Instant::now() + T;
    loop {
        let log = sluice.log_contents();
        if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Ok(line.to_string());
        }
        if Instant::now() > deadline {
            bail!("no log line containing {needles:?}; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Seconds since midnight (UTC) of a log line's leading RFC 3339 timestamp
/// (`2026-03-02T09:14:07.123456Z ...`).
fn log_time_of_day(line: &str) -> Option<f64> {
    let time = line.split_once('T')?.1.split_once('Z')?.0;
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

fn time_of_day(t: SystemTime) -> f64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since.as_secs() % 86_400) as f64 + f64::from(since.subsec_nanos()) / 1e9
}

fn count_log(sluice: &Sluice, needles: &[&str]) -> usize {
    sluice.log_contents().lines().filter(|l| needles.iter().all(|n| l.contains(n))).count()
}

/// The reason given for `file` in a list of errors (`manifest_errors` of `/status`, keyed by
/// `file`, or `errors` of `/model`, keyed by `source`).
fn reason_for(errors: &Value, key: &str, file: &str) -> Option<String> {
    errors
        .as_array()?
        .iter()
        .find(|e| e[key].as_str().is_some_and(|f| f.ends_with(&format!("/{file}"))))
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
}

fn status_reason(sluice: &Sluice, file: &str) -> Result<String> {
    let status = sluice
        .wait_for("/status", |s| reason_for(&s["manifest_errors"], "file", file).is_some(), T)
        .with_context(|| format!("waiting for {file} in sluice status"))?;
    Ok(reason_for(&status["manifest_errors"], "file", file).unwrap_or_default())
}

fn model_reason(sluice: &Sluice, file: &str) -> Result<String> {
    let model = sluice.get_json("/model")?;
    reason_for(&model["errors"], "source", file)
        .with_context(|| format!("{file} not in the model's errors: {model}"))
}

/// `shop`'s peer authentication becomes STRICT: a namespace edit, seen in `GET /model`.
fn edit_namespace(w: &World) -> Result<()> {
    let strict = manifest::with_annotation(
        manifest::namespace("shop", true),
        "sluice.dev/peer-authentication",
        "STRICT",
    );
    w.sim.write_file(&manifest::namespace_file_name("shop"), manifest::to_yaml(&[strict])?)?;
    w.sluice
        .wait_for(
            "/model",
            |m| {
                m["namespaces"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n["name"] == "shop" && n["peer_auth"] == "STRICT"))
            },
            T,
        )
        .context("the namespace edit made after the bad file must apply")?;
    Ok(())
}

/// The 400 KB file of nested brackets that kept sluice's discovery thread at 100 % CPU (for
/// about ten minutes, with nothing logged and no later change applied) is refused in
/// milliseconds; a new pod, a namespace edit and the file's removal all apply afterwards.
#[test]
fn nested_bracket_file_is_refused_and_discovery_goes_on() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let file = "pod-shop-evil.yaml";
    let evil = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: evil\n  namespace: shop\nspec: {}",
        "[".repeat(400 * 1024)
    );
    let (written, written_at) = (Instant::now(), SystemTime::now());
    w.sim.write_file(file, &evil)?;
    let line = wait_log(&w.sluice, &[file, "manifest rejected"])?;
    let seen = written.elapsed();
    // From the write to sluice's log line (its own timestamp), which includes the watcher's
    // 50 ms debounce; and to when this test saw it.
    let logged = log_time_of_day(&line).map_or(f64::NAN, |t| (t - time_of_day(written_at)) * 1000.0);
    eprintln!("the 400 KB nested-bracket file was refused {logged:.1} ms after it was written (seen after {seen:?}):\n{line}");
    assert!(line.contains("WARN"), "{line}");
    let expected =
        "document 1 (line 1) exceeds sluice's nesting limit: more than 100 levels deep (at line 6)";
    assert!(line.contains(expected), "the log line must name the reason: {line}");
    assert_eq!(status_reason(&w.sluice, file)?, expected);
    assert_eq!(model_reason(&w.sluice, file)?, expected);
    assert!(counter(&w.sluice, "discovery_limit_refused")? >= 1);

    // Later changes apply: a new pod is enrolled, a namespace edit takes effect.
    let late = w.node.add_pod("shop", "late", PodOpts::default())?;
    wait_enrolled(&w.sluice, &late)?;
    edit_namespace(&w)?;
    expect_ok(&tcp_exchange(&late, echo_vip(), 64)?).context("traffic from the new pod")?;

    // Deleting the bad file clears its error; it was logged once, not on every rebuild.
    w.sim.remove_file(file)?;
    w.sluice.wait_for("/status", |s| s["manifest_errors"].as_array().is_some_and(|e| e.is_empty()), T)?;
    assert_eq!(count_log(&w.sluice, &[file, "manifest rejected"]), 1, "one log line per change of the file");
    Ok(())
}

/// A flat file over the 8 MiB file limit is refused from its size, unread; a document over the
/// 3 MiB document limit is refused too; fixing the file applies it.
#[test]
fn huge_flat_files_are_refused_and_a_fix_applies() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let file = "ns-huge.yaml";
    // A Namespace with a 9 MiB annotation: one level deep, valid YAML, just too big.
    let huge = |bytes: usize| {
        let ns = manifest::with_annotation(
            manifest::namespace("huge", true),
            "example.com/blob",
            &"x".repeat(bytes),
        );
        manifest::to_yaml(&[ns])
    };
    let written = Instant::now();
    w.sim.write_file(file, huge(9 << 20)?)?;
    let line = wait_log(&w.sluice, &[file, "manifest rejected", "size limit"])?;
    eprintln!("the 9 MiB file was refused {:?} after it was written:\n{line}", written.elapsed());
    let reason = status_reason(&w.sluice, file)?;
    assert!(
        reason.starts_with("the file exceeds sluice's size limit:") && reason.ends_with("more than 8 MiB"),
        "{reason}"
    );
    assert_eq!(model_reason(&w.sluice, file)?, reason);

    // Under the file limit but one document over 3 MiB.
    w.sim.write_file(file, huge(4 << 20)?)?;
    wait_log(&w.sluice, &[file, "manifest rejected", "more than 3 MiB"])?;
    let reason = status_reason(&w.sluice, file)?;
    assert!(
        reason.starts_with("document 1 (line 1) exceeds sluice's size limit: more than 3 MiB (at line "),
        "{reason}"
    );

    // Other changes apply meanwhile, and the fix applies.
    edit_namespace(&w)?;
    w.sim.write_file(file, manifest::to_yaml(&[manifest::namespace("huge", true)])?)?;
    w.sluice.wait_for(
        "/model",
        |m| {
            m["errors"].as_array().is_some_and(|e| e.is_empty())
                && m["namespaces"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n["name"] == "huge" && n["enrolled"] == true))
        },
        T,
    )?;
    assert!(counter(&w.sluice, "discovery_limit_refused")? >= 2);
    Ok(())
}
