//! Readiness on port 15021 (the Kubernetes issue): `GET /healthz/ready` in the node's network
//! namespace answers 200 when sluice is ready, and during an upgrade (a new process started
//! beside the old one, then the old one stopped) the probe keeps answering 200 from the new
//! process while the old one drains.

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::*;
use sluice_tests::{Node, Signal, Sluice, SluiceOpts};

/// One probe as the kubelet sends it (to the node's address, port 15021), with curl in the
/// node's network namespace: `Some((status, pid of the answering sluice))`, or `None` when
/// nothing listens (connection refused).
fn probe(node: &Node) -> Result<Option<(u16, u32)>> {
    let url = format!("http://{}:15021/healthz/ready", node.uplink_ip());
    let out = node.run(["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-D", "-", &url])?;
    if out.status.code() == Some(7) {
        return Ok(None); // couldn't connect
    }
    ensure!(out.success(), "curl {url}: {} {}", out.status, out.stderr);
    let mut lines = out.stdout.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line: {}", out.stdout))?;
    let pid = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("x-sluice-pid"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .with_context(|| format!("no x-sluice-pid header: {}", out.stdout))?;
    Ok(Some((status, pid)))
}

/// `n` probes in a row, each of which must be answered 200 by `s`.
fn expect_ready_from(node: &Node, s: &Sluice, n: usize, when: &str) -> Result<()> {
    for i in 0..n {
        match probe(node)? {
            Some((200, pid)) if pid == s.pid() => {}
            other => bail!("{when}: probe {i} answered {other:?}, expected 200 from pid {}", s.pid()),
        }
    }
    Ok(())
}

/// Waits until `s` has logged `needle`.
fn wait_log(s: &Sluice, needle: &str) -> Result<String> {
    sluice_tests::poll_until(T, || s.log_contents().lines().find(|l| l.contains(needle)).map(str::to_string))
        .with_context(|| format!("no log line containing {needle:?}:\n{}", s.log_contents()))
}

/// A connection through `s` that stays open (so that a SIGTERM'd sluice keeps draining).
fn hold_connection(w: &World) -> Result<sluice_tests::SimProcess> {
    let mut hold = w.client.simpod(["hold", "--to", &echo_vip().to_string()])?;
    hold.wait_for_json(T, |v| v["event"] == "connected")?;
    hold.send_line("hello")?;
    hold.wait_for_json(T, |v| v["event"] == "echo")?;
    Ok(hold)
}

#[test]
fn readiness_probe_follows_the_newest_sluice_through_an_upgrade() -> Result<()> {
    let w = world(1, true, SluiceOpts::default())?;
    let node = &w.node;
    let old = &w.sluice;
    expect_ready_from(node, old, 5, "one sluice, ready")?;

    // The upgrade: a connection keeps the old process draining for a while.
    let mut hold = hold_connection(&w)?;
    let new = node.start_sluice(SluiceOpts::default())?;
    new.wait_ready(T)?;
    // The old process leaves the port to the new one as soon as it sees it took over the node.
    let closed = wait_log(old, "readiness listener closed")?;
    ensure!(closed.contains("newer sluice"), "{closed}");
    expect_ready_from(node, &new, 20, "new sluice ready, old one still running")?;

    old.kill(Signal::SIGTERM)?;
    wait_log(old, "stopping: draining")?;
    expect_ready_from(node, &new, 20, "while the old sluice drains")?;
    ensure!(old.is_running(), "the old sluice must still be draining (a connection is open)");
    hold.close_stdin();
    hold.wait(T)?;
    let status = old.wait_exit(Duration::from_secs(30))?;
    ensure!(status.success(), "the old sluice exited with {status}");
    expect_ready_from(node, &new, 5, "after the old sluice exited")?;

    // The last sluice of the node stopping: never ready again, and its listener closes as soon
    // as it starts draining (probes are refused), while it still drains.
    let mut hold = hold_connection(&w)?;
    new.kill(Signal::SIGTERM)?;
    let mut answers = Vec::new();
    let refused = sluice_tests::poll_until(T, || match probe(node) {
        Ok(None) => Some(()),
        other => {
            answers.push(format!("{other:?}"));
            None
        }
    });
    ensure!(refused.is_some(), "the draining sluice kept its readiness listener: {answers:?}");
    ensure!(!answers.iter().any(|a| a.contains("(200,")), "a draining sluice answered ready: {answers:?}");
    ensure!(new.is_running(), "the sluice must still be draining (a connection is open)");
    wait_log(&new, "stopping: draining")?;
    hold.close_stdin();
    hold.wait(T)?;
    new.wait_exit(Duration::from_secs(30))?;
    ensure!(probe(node)?.is_none(), "nothing listens on 15021 once sluice is gone");
    Ok(())
}
