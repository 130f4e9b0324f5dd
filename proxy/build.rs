//! Builds the kernel-side programs (`ebpf/sluice-ebpf`) with the nightly toolchain and
//! bpf-linker, and hands the object file to the `sluice` crate, which embeds it. Set
//! `SLUICE_BPF_OBJECT=/path/to/object` to embed a prebuilt object instead.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("sluice.bpf.o");
    let ebpf_dir = manifest_dir.join("../ebpf/sluice-ebpf");
    let common_dir = manifest_dir.join("../ebpf/sluice-common");

    println!("cargo:rerun-if-env-changed=SLUICE_BPF_OBJECT");
    if let Ok(prebuilt) = env::var("SLUICE_BPF_OBJECT") {
        println!("cargo:rerun-if-changed={prebuilt}");
        std::fs::copy(&prebuilt, &out)
            .unwrap_or_else(|e| panic!("SLUICE_BPF_OBJECT={prebuilt}: {e}"));
        return;
    }
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let target_dir = ebpf_dir.join("target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir);
    scrub_outer_cargo_env(&mut cmd);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo` to build the eBPF programs ({e}); run `cargo xtask setup`")
    });
    if !status.success() {
        panic!(
            "building the eBPF programs in {} failed; `cargo xtask setup` installs what they need \
             (nightly with rust-src, bpf-linker for LLVM 22)",
            ebpf_dir.display()
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/sluice-ebpf");
    copy(&object, &out);
}

/// The nested cargo must not inherit the outer build's toolchain, flags or target settings.
fn scrub_outer_cargo_env(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || matches!(key, "RUSTFLAGS" | "RUSTUP_TOOLCHAIN" | "CARGO" | "TARGET" | "HOST" | "OUT_DIR");
        if outer {
            cmd.env_remove(key);
        }
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}
