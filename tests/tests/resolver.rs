//! Issue 7, acceptance 3: sluice finds pods on nodes laid out by either kubelet cgroup driver,
//! built as real cgroup trees with real processes (systemd: in container scopes below the pod
//! cgroup), including a pod started after its namespace was enrolled.

mod common;

use anyhow::{ensure, Result};
use common::*;
use sluice_tests::{CgroupDriver, PodOpts, Sim, SluiceOpts};

fn resolves_under(driver: CgroupDriver) -> Result<()> {
    let sim = Sim::new()?;
    let node = sim.add_node_with("n1", driver)?;
    sim.write_namespace("shop", true)?;
    let backend = node.add_pod("shop", "web-0", PodOpts::labels(&[("app", "web")]))?;
    let _servers = start_servers(&backend)?;
    sim.write_service("shop", "web", CLUSTER_IP, &[("echo", ECHO_PORT, ECHO_PORT)], &[&backend])?;
    let sluice = node.start_sluice(SluiceOpts::default())?;
    sluice.wait_ready(T)?;
    let pods = wait_enrolled(&sluice, &backend)?;
    let cgroup = pods[0]["cgroup_path"].as_str().unwrap_or("").to_string();
    ensure!(cgroup == backend.cgroup_path().display().to_string(), "{driver:?}: sluice found {cgroup}, the pod's cgroup is {}", backend.cgroup_path().display());

    // A pod started after its namespace was enrolled: enrolled as soon as its sandbox exists,
    // and its connections are redirected even from a process in a container sub-cgroup.
    let late = node.add_pod("shop", "late", PodOpts::default())?;
    wait_enrolled(&sluice, &late)?;
    let r = tcp_exchange(&late, echo_vip(), 128)?;
    expect_ok(&r)?;
    ensure!(via_sluice(&r), "{driver:?}: the late pod's connection was not redirected: {r}");
    eprintln!("{driver:?}: pods found at {cgroup} and {}", late.cgroup_path().display());
    Ok(())
}

#[test]
fn resolves_pods_with_the_cgroupfs_driver_layout() -> Result<()> {
    resolves_under(CgroupDriver::Cgroupfs)
}

#[test]
fn resolves_pods_with_the_systemd_driver_layout() -> Result<()> {
    resolves_under(CgroupDriver::Systemd)
}
