//! Configuration into a running playground, object by object as `kubectl apply` does: each
//! object is one file in sluice's manifest directory, named after its kind, namespace and name
//! (`obj-virtualservice-bookinfo-reviews.yaml`), so applying an object of the same name replaces
//! the one in force and deleting removes it. An apply is over once every node's sluice has built
//! a model with the new file, and it fails with sluice's own reason if sluice rejects it.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::spec::{read_str, Source};
use crate::{admin_client, manifest, util};

/// How long each node's sluice may take to take a file in (it watches the directory).
const APPLY_TIMEOUT: Duration = Duration::from_secs(20);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Kinds that make pods or addresses: built once, by `sim up`, not applied later.
const BUILT_KINDS: &[&str] = &[
    "Namespace",
    "ServiceAccount",
    "Service",
    "Pod",
    "Deployment",
    "ReplicaSet",
    "StatefulSet",
    "DaemonSet",
];

/// The file an object lives in: `obj-<kind>-<namespace>-<name>.yaml` (lowercase; cluster-scoped
/// objects have no namespace part).
pub fn object_file(src: &Source) -> String {
    let kind = src.kind().to_ascii_lowercase();
    let ns = src.doc["metadata"]["namespace"].as_str().filter(|n| !n.is_empty());
    let ns = match (kind.as_str(), ns) {
        ("namespace", _) => None,
        (_, Some(ns)) => Some(ns.to_string()),
        (_, None) => Some("default".to_string()),
    };
    let clean = |s: &str| {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
            .collect::<String>()
    };
    match ns {
        Some(ns) => format!("obj-{}-{}-{}.yaml", clean(&kind), clean(&ns), clean(src.name())),
        None => format!("obj-{}-{}.yaml", clean(&kind), clean(src.name())),
    }
}

/// Where a playground's sluice instances are, for watching them take a change.
pub struct Target<'a> {
    pub manifest_dir: &'a Path,
    pub admin_sockets: &'a [PathBuf],
}

fn status(socket: &Path) -> Result<Value> {
    admin_client::get_json(socket, "/status", ADMIN_TIMEOUT)
        .with_context(|| format!("asking sluice at {} for its status", socket.display()))
}

fn generation(v: &Value) -> u64 {
    v["model_generation"].as_u64().unwrap_or(0)
}

/// sluice's complaint about `file`, if it has one.
fn error_for(v: &Value, file: &str) -> Option<String> {
    v["manifest_errors"]
        .as_array()?
        .iter()
        .find(|e| e["file"].as_str().is_some_and(|f| Path::new(f).file_name().is_some_and(|n| n == file)))
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
}

/// Writes (or, with `None`, removes) one file and waits until every node's sluice built a model
/// after it; then returns sluice's complaint about that file, if any.
fn change_file(t: &Target, file: &str, contents: Option<&[u8]>) -> Result<Option<String>> {
    let path = t.manifest_dir.join(file);
    let current = fs::read(&path).ok();
    if current.as_deref() == contents {
        return Ok(t.admin_sockets.first().map(|s| status(s)).transpose()?.and_then(|v| error_for(&v, file)));
    }
    let before: Vec<u64> =
        t.admin_sockets.iter().map(|s| status(s).map(|v| generation(&v))).collect::<Result<_>>()?;
    match contents {
        Some(bytes) => {
            util::write_atomic(t.manifest_dir, file, bytes)?;
        }
        None => fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?,
    }
    let mut complaint = None;
    for (socket, before) in t.admin_sockets.iter().zip(before) {
        let mut last = String::from("no answer yet");
        let seen = util::poll_until(APPLY_TIMEOUT, || match status(socket) {
            Ok(v) if generation(&v) > before => Some(v),
            Ok(v) => {
                last = format!("model generation still {}", generation(&v));
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        })
        .with_context(|| {
            format!("sluice at {} did not take {file} in within {APPLY_TIMEOUT:?} ({last})", socket.display())
        })?;
        complaint = complaint.or_else(|| error_for(&seen, file));
    }
    Ok(complaint)
}

/// Applies every object of `yaml` (named `file` in messages), one file per object; fails on the
/// first one sluice rejects, with its reason (that object's previous version, if any, is put
/// back, as the API server keeps an object when an update is refused).
pub fn apply(t: &Target, file: &str, yaml: &str) -> Result<Vec<String>> {
    let sources = read_str(file, yaml)?;
    if sources.is_empty() {
        bail!("{file} holds no object");
    }
    for s in &sources {
        if BUILT_KINDS.contains(&s.kind()) {
            bail!(
                "{}: a playground builds its {} once, at `sim up`; apply configuration (routes, Istio resources, policies) to a running one",
                s.origin(),
                s.kind()
            );
        }
    }
    let mut applied = Vec::new();
    for s in &sources {
        let name = object_file(s);
        let text = manifest::to_yaml(std::slice::from_ref(&s.doc))?;
        let previous = fs::read(t.manifest_dir.join(&name)).ok();
        if let Some(reason) = change_file(t, &name, Some(text.as_bytes()))? {
            // As the API server refuses an invalid object and keeps the one it had.
            let _ = change_file(t, &name, previous.as_deref());
            bail!("sluice rejected {}: {reason}", s.origin());
        }
        applied.push(name);
    }
    Ok(applied)
}

/// Deletes every object of `yaml` that is in force (as `kubectl delete -f`); returns the files
/// removed.
pub fn delete(t: &Target, file: &str, yaml: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for s in read_str(file, yaml)? {
        let name = object_file(&s);
        if t.manifest_dir.join(&name).exists() {
            change_file(t, &name, None)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_filed_by_kind_namespace_and_name() {
        let s = read_str(
            "a.yaml",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\n---\n\
             apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        )
        .unwrap();
        assert_eq!(object_file(&s[0]), "obj-virtualservice-bookinfo-reviews.yaml");
        assert_eq!(object_file(&s[1]), "obj-peerauthentication-default-default.yaml");
        assert_eq!(object_file(&s[2]), "obj-namespace-shop.yaml");
    }
}
