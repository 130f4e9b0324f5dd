//! Capture registration cannot be stolen (issue #12 follow-up, finding 10): the kernel's
//! `INBOUND` map is keyed by address alone, and link-local addresses are unique per link only,
//! so a pod given another pod's link-local address (a pod with NET_ADMIN can add one) must not
//! take that pod's capture over, and releasing it must not end the other's. Link-local
//! addresses that appear after enrollment are captured too.
//!
//! One dual-stack node: namespace `shop` in the mesh (web: echo 9000 on `[::]`), `tenant` (the
//! intruder; joins the mesh during the test) and `plain` (near, outside the mesh, on the same
//! link as web).

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use sluice_tests::{manifest, poll_until, Node, Pod, PodOpts, Sim, SimProcess, Sluice, SluiceOpts};

use common::{counter, wait_enrolled, wait_released, T};

const ECHO: u16 = 9000;

struct World {
    sim: Sim,
    _node: Node,
    web: Pod,
    intruder: Pod,
    near: Pod,
    _echo: SimProcess,
    sluice: Sluice,
}

fn world() -> Result<World> {
    let sim = Sim::new_dual_stack()?;
    let node = sim.add_node("n1")?;
    sim.write_namespace("shop", true)?;
    sim.write_namespace("tenant", false)?;
    sim.write_namespace("plain", false)?;
    let web = node.add_pod("shop", "web", PodOpts::labels(&[("app", "web")]))?;
    let mut echo = web.simpod(["echo-server", "--port", &ECHO.to_string(), "--bind", "::"])?;
    echo.wait_listening(T)?;
    let intruder = node.add_pod("tenant", "intruder", PodOpts::default())?;
    let near = node.add_pod("plain", "near", PodOpts::default())?;
    let sluice = node.start_sluice(SluiceOpts::default())?;
    sluice.wait_ready(T)?;
    wait_enrolled(&sluice, &web)?;
    Ok(World { sim, _node: node, web, intruder, near, _echo: echo, sluice })
}

/// Runs `ip ARGS` in `pod`'s network namespace.
fn ip(pod: &Pod, args: &[&str]) -> Result<()> {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    let out = pod.run_timeout(&all, Duration::from_secs(20))?;
    ensure!(out.success(), "{all:?} in {}: {} {}", pod.name(), out.stdout, out.stderr);
    Ok(())
}

/// `simpod tcp-client` to an address given as text (a link-local one carries `%eth0`).
fn exchange(pod: &Pod, to: &str) -> Result<Value> {
    let out = pod.run_simpod_timeout(
        ["tcp-client", "--to", to, "--send-bytes", "64", "--timeout-ms", "5000"],
        Duration::from_secs(20),
    )?;
    out.json().with_context(|| format!("tcp-client {to}: {}", out.stderr))
}

fn refused(r: &Value) -> bool {
    r["ok"] == false
        && r["error"].as_str().is_some_and(|e| {
            e.starts_with("ConnectionReset") || e.starts_with("UnexpectedEof") || e.starts_with("BrokenPipe")
        })
}

fn write_shop_mode(sim: &Sim, mode: &str) -> Result<()> {
    let ns =
        manifest::with_annotation(manifest::namespace("shop", true), "sluice.dev/peer-authentication", mode);
    sim.write_file(&manifest::namespace_file_name("shop"), manifest::to_yaml(&[ns])?)?;
    Ok(())
}

/// Plaintext from `near` to `to` under STRICT is refused by web's capture (the refusal is
/// counted by sluice, so it went through the capture and not merely nowhere).
fn strict_refuses(w: &World, to: &str, what: &str) -> Result<()> {
    let before = counter(&w.sluice, "plaintext_refused_strict")?;
    let r = poll_until(Duration::from_secs(10), || exchange(&w.near, to).ok().filter(refused))
        .with_context(|| format!("{what}: plaintext to {to} was never refused under STRICT"))?;
    ensure!(
        counter(&w.sluice, "plaintext_refused_strict")? > before,
        "{what}: the refusal of {to} is not sluice's: {r}"
    );
    Ok(())
}

/// The problems `/status` reports for `pod` ("namespace/name").
fn problems_of(sluice: &Sluice, pod: &str) -> Result<Vec<Value>> {
    let status = sluice.get_json("/status")?;
    Ok(status["pod_problems"]
        .as_array()
        .with_context(|| format!("pod_problems missing in {status}"))?
        .iter()
        .filter(|p| p["pod"] == pod)
        .cloned()
        .collect())
}

/// A second pod given the first pod's link-local address (on an interface of its own, so
/// that the first pod still answers for it on the link) is refused enrollment, with the reason
/// in `sluice status`, `sluice pods` and the log, and the first pod's capture still holds. Once
/// the address is gone the second pod is enrolled; releasing it leaves the first pod's capture.
#[test]
fn a_pod_given_another_pods_link_local_address_is_refused_and_the_first_keeps_its_capture() -> Result<()> {
    let w = world()?;
    let web_ll = w.web.link_local()?.to_string();
    let to_web = format!("[{web_ll}%eth0]:{ECHO}");

    ip(&w.intruder, &["link", "add", "sl0", "type", "veth", "peer", "name", "sl1"])?;
    ip(&w.intruder, &["addr", "add", &format!("{web_ll}/64"), "dev", "sl0", "nodad"])?;
    ip(&w.intruder, &["link", "set", "sl1", "up"])?;
    ip(&w.intruder, &["link", "set", "sl0", "up"])?;
    w.sim.write_namespace("tenant", true)?;

    // Refused, and said so.
    let problem = poll_until(T, || problems_of(&w.sluice, "tenant/intruder").ok()?.into_iter().next())
        .context("the intruder's enrollment was never reported as refused")?;
    let reason = problem["reason"].as_str().unwrap_or_default();
    ensure!(
        problem["enrolled"] == false && reason.contains(&web_ll) && reason.contains("shop/web"),
        "the problem names the address and its holder: {problem}"
    );
    let pods = w.sluice.get_json("/pods")?;
    ensure!(!pods.to_string().contains("intruder"), "the intruder must not be enrolled: {pods}");
    let out = w.sluice.cli(&["pods"])?;
    ensure!(
        out.stdout.contains("tenant/intruder") && out.stdout.contains(&web_ll),
        "`sluice pods` shows why the intruder is not enrolled:\n{}",
        out.stdout
    );
    ensure!(
        w.sluice.log_contents().contains("cannot enroll pod"),
        "no log line for the refusal:\n{}",
        w.sluice.log_contents()
    );

    // web's link-local address is still captured: through sluice under PERMISSIVE...
    let before = counter(&w.sluice, "plaintext_accepted")?;
    let r = exchange(&w.near, &to_web)?;
    ensure!(r["ok"] == true && r["sha256_sent"] == r["sha256_received"], "near → web over link-local: {r}");
    ensure!(
        counter(&w.sluice, "plaintext_accepted")? == before + 1,
        "web's link-local plaintext went around sluice"
    );
    // ... and refused under STRICT.
    write_shop_mode(&w.sim, "STRICT")?;
    strict_refuses(&w, &to_web, "with the intruder refused")?;

    // The address goes: the intruder is enrolled at its next attempt, its problem cleared.
    ip(&w.intruder, &["addr", "del", &format!("{web_ll}/64"), "dev", "sl0"])?;
    wait_enrolled(&w.sluice, &w.intruder)?;
    ensure!(problems_of(&w.sluice, "tenant/intruder")?.is_empty(), "the problem is cleared once enrolled");
    strict_refuses(&w, &to_web, "with the intruder enrolled")?;
    // Releasing the intruder removes its own entries only.
    w.sim.write_namespace("tenant", false)?;
    wait_released(&w.sluice, &w.intruder)?;
    strict_refuses(&w, &to_web, "after the intruder's release")?;
    Ok(())
}

/// An address added to an enrolled pod's interface is captured within the re-read interval
/// (5 s): plaintext to it is refused under STRICT; once removed, it is released.
#[test]
fn a_link_local_address_added_after_enrollment_is_captured() -> Result<()> {
    let w = world()?;
    write_shop_mode(&w.sim, "STRICT")?;
    let web_ll = w.web.link_local()?.to_string();
    // STRICT is in force once web's own link-local address refuses plaintext.
    strict_refuses(&w, &format!("[{web_ll}%eth0]:{ECHO}"), "web's own link-local address")?;

    let added = "fe80::5:1";
    ip(&w.web, &["addr", "add", &format!("{added}/64"), "dev", "eth0", "nodad"])?;
    strict_refuses(&w, &format!("[{added}%eth0]:{ECHO}"), "the added address")?;
    let log = w.sluice.log_contents();
    ensure!(log.contains("new link-local address captured"), "no log line for the new address:\n{log}");

    ip(&w.web, &["addr", "del", &format!("{added}/64"), "dev", "eth0"])?;
    poll_until(Duration::from_secs(10), || {
        w.sluice.log_contents().contains("link-local address gone; no longer captured").then_some(())
    })
    .context("the removed address was never released")?;
    Ok(())
}
