//! `cargo xtask sim`: the playground. `sim up DIR` builds a simulated cluster from a directory of
//! the user's own manifests (see `sluice_tests::playground`) and leaves it running; `sim apply`
//! and `sim delete` change its configuration object by object, as `kubectl apply -f` and
//! `kubectl delete -f` do; `sim list` shows what runs; `sim down` removes a playground, also one
//! whose `sim up` crashed half-way. No test run and no sweep removes a playground (see
//! `sluice_tests::registry`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use sluice_tests::{
    playground::{self, apply, state, Playground, PlaygroundOpts},
    registry::{self, Disposition, SimKind},
};

#[derive(Subcommand)]
pub enum SimCmd {
    /// Build a simulated cluster from a directory of your manifests (Deployments, Services,
    /// routes, Istio resources...) and leave it running, sluice on every node.
    Up {
        /// Directories (their *.yaml, *.yml and *.json files, not their subdirectories) and
        /// files, read in the order given, as `kubectl apply -f` reads them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Simulated nodes; pods are spread over them.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// The playground's name (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Apply configuration files to a running playground (routes, Istio resources, policies),
    /// object by object as `kubectl apply -f` does; waits until every node's sluice took them.
    Apply {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Which playground (needed when several run).
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete the objects of configuration files from a running playground (`kubectl delete -f`).
    Delete {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Run a command inside a pod of a playground, as the pod: in its cgroup (so sluice
    /// captures its connections) and its network namespace. POD is NAMESPACE/NAME or
    /// NAMESPACE/DEPLOYMENT (e.g. `bookinfo/curl`). Exits with the command's status.
    Exec {
        /// Which playground (needed when several run).
        #[arg(long)]
        name: Option<String>,
        pod: String,
        /// The command and its arguments, after `--`.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Show the playgrounds (and any other simulator on the machine, with whose it is).
    List,
    /// Remove a playground (the only one when NAME is not given).
    Down {
        name: Option<String>,
        /// Remove every playground.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
}

pub fn run(cmd: SimCmd) -> Result<()> {
    match cmd {
        SimCmd::Up { paths, nodes, name } => up(&paths, nodes, name),
        SimCmd::Apply { files, name } => change(&files, name, true),
        SimCmd::Delete { files, name } => change(&files, name, false),
        SimCmd::Exec { name, pod, command } => exec(name, &pod, &command),
        SimCmd::List => list(),
        SimCmd::Down { name, all } => down(name, all),
    }
}

/// `bookinfo` from `deploy/examples/bookinfo/` (or a file in it): lowercase, [a-z0-9-].
fn default_name(path: &Path) -> String {
    let dir = if path.is_file() { path.parent().unwrap_or(path) } else { path };
    let base = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "playground".into());
    let mut name: String = base
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_string();
    name.truncate(40);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        "playground".into()
    } else {
        name
    }
}

fn up(paths: &[PathBuf], nodes: usize, name: Option<String>) -> Result<()> {
    let name = name.unwrap_or_else(|| default_name(&paths[0]));
    registry::check_playground_name(&name)?;
    // Read and plan first: a mistake in the manifests is reported before anything is built.
    let sources = playground::spec::read_paths(paths)?;
    playground::spec::plan(&sources, nodes, &mut playground::spec::RandomSuffixes)?;
    let source = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ");
    eprintln!("xtask: building playground {name} from {source} on {nodes} node(s)...");
    let opts = PlaygroundOpts {
        nodes,
        kind: SimKind::Playground { name: name.clone() },
        source,
        ..PlaygroundOpts::default()
    };
    let pg = Playground::up(&sources, opts).with_context(|| {
        format!("building playground {name} (what was built is removed; if this process was killed instead, `cargo xtask sim down {name}` removes it)")
    })?;
    print!("{}", pg.summary()?);
    let kept = pg.keep(&name)?;
    println!("\nchange its configuration:  cargo xtask sim apply --name {kept} FILE...   (and sim delete)");
    println!("remove it:                 cargo xtask sim down {kept}");
    Ok(())
}

/// The sim id and state of playground `name`, or of the only playground.
fn find(name: Option<String>) -> Result<(String, registry::Marker)> {
    let playgrounds: Vec<registry::Marker> =
        registry::all().into_iter().filter(|m| m.playground_name().is_some()).collect();
    let marker = match name {
        Some(n) => match registry::playground_id(&n).and_then(|id| registry::read(&id)) {
            Some(m) => m,
            None => {
                registry::release_stale_name(&n);
                bail!("no playground named {n:?} (`cargo xtask sim list` shows them)")
            }
        },
        None => match playgrounds.as_slice() {
            [one] => one.clone(),
            [] => bail!("no playground runs (start one with `cargo xtask sim up DIR`)"),
            many => bail!(
                "several playgrounds run ({}): name one",
                many.iter().filter_map(|m| m.playground_name()).collect::<Vec<_>>().join(", ")
            ),
        },
    };
    let name = marker.playground_name().unwrap_or_default().to_string();
    Ok((name, marker))
}

fn change(files: &[PathBuf], name: Option<String>, applying: bool) -> Result<()> {
    let (name, marker) = find(name)?;
    let st = state::read(&marker.temp_dir).with_context(|| {
        format!("playground {name} never finished coming up: remove it with `cargo xtask sim down {name}`")
    })?;
    let sockets = st.admin_sockets();
    let target = apply::Target { manifest_dir: &st.manifest_dir, admin_sockets: &sockets };
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let file = f.display().to_string();
        let done = if applying {
            apply::apply(&target, &file, &text)?
        } else {
            apply::delete(&target, &file, &text)?
        };
        for obj in done {
            println!("{} {obj} ({name})", if applying { "applied" } else { "deleted" });
        }
    }
    Ok(())
}

fn exec(name: Option<String>, pod: &str, command: &[String]) -> Result<()> {
    let (name, marker) = find(name)?;
    let st = state::read(&marker.temp_dir).with_context(|| {
        format!("playground {name} never finished coming up: remove it with `cargo xtask sim down {name}`")
    })?;
    let mut cmd = st.command_in_pod(pod, command)?;
    let status = cmd.status().with_context(|| format!("running {command:?} in {pod} ({name})"))?;
    if !status.success() {
        // The command's own status, as `kubectl exec` passes it on.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn list() -> Result<()> {
    // `sim list | head` ends quietly when the reader goes away, as Unix tools do, instead of
    // panicking in println! (Rust ignores SIGPIPE by default).
    // SAFETY: setting a signal's disposition to its default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let mut any = false;
    for id in sluice_tests::sweep::sim_ids() {
        any = true;
        let disposition = registry::disposition(&id);
        let Disposition::Playground { name } = &disposition else {
            println!("sim {id}: {}", disposition.describe());
            continue;
        };
        let marker = registry::read(&id);
        let st = marker.as_ref().and_then(|m| state::read(&m.temp_dir));
        match st {
            None => println!(
                "playground {name} (sim {id}): incomplete, `sim up` did not finish; remove it with `cargo xtask sim down {name}`"
            ),
            Some(st) => {
                println!("playground {name} (sim {id}) from {}: {} pod(s)", st.source, st.pods.len());
                for n in &st.nodes {
                    let health = match sluice_tests::admin_client::get_json(
                        &n.admin_socket,
                        "/status",
                        std::time::Duration::from_secs(2),
                    ) {
                        Ok(v) if v["ready"] == true => "sluice ready".to_string(),
                        Ok(_) => "sluice not ready".to_string(),
                        Err(e) => format!("sluice not answering ({e:#})"),
                    };
                    println!("  {} ({}): {health}; sluice status --node {}", n.short_name, n.name, n.name);
                }
                for s in &st.services {
                    println!(
                        "  service {}/{} {}:{}",
                        s.namespace,
                        s.name,
                        s.cluster_ip.as_deref().unwrap_or("None"),
                        s.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
                    );
                }
            }
        }
    }
    if !any {
        println!("no simulator runs on this machine");
    }
    Ok(())
}

fn down(name: Option<String>, all: bool) -> Result<()> {
    let targets: Vec<(String, registry::Marker)> = if all {
        registry::all()
            .into_iter()
            .filter_map(|m| Some((m.playground_name()?.to_string(), m.clone())))
            .collect()
    } else {
        vec![find(name)?]
    };
    if targets.is_empty() {
        println!("no playground to remove");
    }
    for (name, marker) in targets {
        let found = playground::down(&name)?;
        println!("removed playground {name} (sim {}: {} object(s))", marker.id, found.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_come_from_the_directory() {
        let dir = std::env::temp_dir().join(format!("My App_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(default_name(&dir), format!("my-app-{}", std::process::id()));
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(default_name(Path::new("/nonexistent/x")), "playground");
    }
}
