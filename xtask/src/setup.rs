//! `cargo xtask setup`: installs what building and testing sluice needs on a fresh Debian
//! machine of this project's kind. Every step checks first and does nothing when already done,
//! so running it before every demo or test costs a second.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the simulator and tests use.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against LLVM 22 (nightly rustc's LLVM major).
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // The node simulator: network namespaces, veths, bridges, routes.
    "iproute2",
    // Real clients in the demo and tests.
    "curl",
    // The mesh tests: a packet capture between simulated nodes, and a hand-run TLS peer.
    "tcpdump",
    "tshark",
    "openssl",
    // The uninstall tests: what is attached to the pods' cgroups and network namespaces.
    "bpftool",
    // L7 tests and benchmarks: HTTP/2 clients (nghttp, h2load) and an HTTP/1.1 load generator.
    "nghttp2-client",
    "wrk",
    // The telemetry CLI tests: `sluice top` driven in a real terminal.
    "tmux",
    // The deploy/ validation (its PyPI packages below) and a JWKS server in a pod
    // (`python3 -m http.server`, the RequestAuthentication tests).
    "python3",
    "python3-pip",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    ensure_root()?;
    ensure_apt_packages(APT_PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_nextest()?;
    ensure_python_packages()?;
    Ok(())
}

/// Python tools the deploy/ validation test runs (Kubernetes schemas, CRD schemas).
fn ensure_python_packages() -> Result<()> {
    let present = Command::new("python3")
        .args(["-c", "import kubernetes_validate, jsonschema, prometheus_client.openmetrics.parser"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    // prometheus-client: its OpenMetrics parser checks what sluice serves on :15020.
    eprintln!("setup: installing kubernetes-validate, jsonschema and prometheus-client (PyPI)");
    run_cmd(
        Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "kubernetes-validate==1.37.0",
            "jsonschema>=4.18",
            "prometheus-client==0.26.0",
        ]),
        "pip install kubernetes-validate jsonschema prometheus-client",
    )
}

fn ensure_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("sluice's setup, demo and tests need root (BPF, cgroups, network namespaces); run as root");
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn ensure_apt_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    // A fresh machine's package lists may be empty or old.
    run_cmd(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

fn ensure_nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain (eBPF programs build with nightly)");
        run_cmd(
            Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]),
            "rustup toolchain install nightly",
        )?;
    }
    let components = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly (build-std for bpfel-unknown-none)");
        run_cmd(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup component add rust-src",
        )?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    if current.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a minute or two)");
    run_cmd(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        "cargo install bpf-linker",
    )
}

fn ensure_nextest() -> Result<()> {
    let ok = Command::new("cargo")
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("setup: installing cargo-nextest");
    run_cmd(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]), "cargo install cargo-nextest")
}

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

pub fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("{what}: cannot start"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
