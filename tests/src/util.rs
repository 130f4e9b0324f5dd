//! Small helpers shared by the simulator modules: randomness, atomic writes, polling, running
//! `ip`, reading log tails.

use std::{
    ffi::OsStr,
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// `n` random bytes from the kernel. The simulator needs only a little randomness (ids, UIDs),
/// so reading /dev/urandom avoids pulling in a RNG crate.
pub(crate) fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random UUID in version-4 format, like the UIDs the API server gives pods.
pub(crate) fn uuid_v4() -> Result<String> {
    let mut b = random_bytes(16)?;
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = hex(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Short stable hash used to shorten over-long names while keeping them unique.
pub(crate) fn short_hash(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(s.as_bytes())[..4])
}

/// Writes `contents` to `dir/name` so that a concurrent reader sees either the old file or the
/// whole new one: write a hidden temp file in the same directory (same filesystem), fsync it,
/// then rename over the target (rename is atomic within a filesystem).
pub(crate) fn write_atomic(dir: &Path, name: &str, contents: &[u8]) -> Result<PathBuf> {
    let target = dir.join(name);
    // Hidden and not ending in .yaml, so a manifest watcher that filters by extension or skips
    // dot-files never picks up the temp file.
    let tmp = dir.join(format!(".{name}.{}.tmp", hex(&random_bytes(4)?)));
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, &target)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", target.display()));
    }
    Ok(target)
}

/// Polls `f` with exponential backoff (from 10 ms, capped at 250 ms) until it returns
/// `Some`, or fails after `timeout`. Readiness is always observed, never assumed after a sleep.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(delay.min(deadline - now));
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Runs a helper command to completion; a failure reports the command line and its stderr.
pub(crate) fn run_cmd<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stdin: Option<&str>,
) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = format!(
        "{program} {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning `{line}` (is {program} installed?)"))?;
    if let Some(input) = stdin {
        // Batches are small; writing before reading cannot fill the pipes.
        let mut si = child.stdin.take().expect("stdin piped");
        si.write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of `{line}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !out.status.success() {
        let input = stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default();
        bail!(
            "`{line}` failed ({}): {}{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip [-n NETNS] -batch -` with one command per line: one process per netns configuration step
/// instead of one per command, and the first failing line is named in the error.
pub(crate) fn ip_batch(netns: Option<&str>, cmds: &[String]) -> Result<()> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let input = cmds.join("\n") + "\n";
    run_cmd("ip", &args, Some(&input)).map(|_| ())
}

/// The last `lines` lines of a (log) file, for error messages.
pub fn tail_file(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => tail_str(&String::from_utf8_lossy(&bytes), lines),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

pub(crate) fn tail_str(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// True if `s` is a sim id: `sl` + 6 lowercase hex digits.
pub(crate) fn is_sim_id(s: &str) -> bool {
    s.len() == 8
        && s.starts_with("sl")
        && s[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The sim id prefix of a kernel object name (`sl1a2b3c-...`), if it has one.
pub(crate) fn sim_id_of(name: &str) -> Option<&str> {
    let (id, rest) = name.split_at_checked(8)?;
    (is_sim_id(id) && rest.starts_with('-')).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_has_v4_shape() {
        let u = uuid_v4().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
    }

    #[test]
    fn sim_ids() {
        assert!(is_sim_id("sl0a9fff"));
        assert!(!is_sim_id("sl0a9ffg"));
        assert!(!is_sim_id("xl0a9fff"));
        assert_eq!(sim_id_of("sl0a9fff-n1-pod"), Some("sl0a9fff"));
        assert_eq!(sim_id_of("sl0a9fff"), None);
        assert_eq!(sim_id_of("sl0a9fffx-n1"), None);
        assert_eq!(sim_id_of("é"), None);
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = std::env::temp_dir().join(format!(
            "sluice-util-test-{}",
            hex(&random_bytes(4).unwrap())
        ));
        fs::create_dir_all(&dir).unwrap();
        write_atomic(&dir, "a.yaml", b"one").unwrap();
        write_atomic(&dir, "a.yaml", b"two").unwrap();
        assert_eq!(fs::read_to_string(dir.join("a.yaml")).unwrap(), "two");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left behind"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
