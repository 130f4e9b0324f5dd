//! The manifest directory's state: the last good objects of every file, and the rules that
//! turn them into a [`Model`].
//!
//! - A file that fails to read or parse keeps its previous good objects in force and is listed
//!   in `Model::errors`; it is logged once per distinct content, not on every rebuild.
//! - When two files define the same object, the file whose name sorts first wins and the other
//!   file gets an error; so does a Service that claims another Service's ClusterIP.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::manifest::{self, Format};
use super::model::{Object, ObjectKey};
use super::snapshot::{ManifestError, Model};

/// Whether a directory entry is a manifest: `*.yaml`, `*.yml` or `*.json`, and not a hidden
/// file or an editor's scratch file (`.x.yaml.swp`, `x.yaml~`, `.#x.yaml`, `#x.yaml#`).
pub(crate) fn is_manifest_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let scratch = name.starts_with('.') // hidden, `.#x.yaml` locks, `.x.yaml.swp`, `..data`
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'));
    !scratch && Format::from_path(Path::new(name)).is_some()
}

#[derive(Default)]
struct FileState {
    /// Hash of the bytes last read (good or bad), to skip a re-read that changed nothing.
    hash: u64,
    /// Objects of the last content that parsed; empty if none ever did.
    good: Vec<Object>,
    /// Why the current content is not in force.
    error: Option<String>,
}

/// An error worth one warning: the same file, content and reason are not logged again.
#[derive(PartialEq, Eq, Hash)]
struct Reported {
    file: OsString,
    hash: u64,
    reason: String,
}

pub(crate) struct Store {
    dir: PathBuf,
    /// By file name; the order decides which file wins a conflict.
    files: BTreeMap<OsString, FileState>,
    generation: u64,
    reported: HashSet<Reported>,
}

impl Store {
    pub fn new(dir: PathBuf) -> Store {
        Store { dir, files: BTreeMap::new(), generation: 0, reported: HashSet::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Re-reads the whole directory: new and changed files are parsed, files that are gone are
    /// dropped. Returns whether anything changed.
    pub fn scan(&mut self) -> io::Result<bool> {
        let mut present = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if is_manifest_name(&name) {
                present.push(name);
            }
        }
        let gone: Vec<OsString> = self.files.keys().filter(|k| !present.contains(k)).cloned().collect();
        let mut changed = false;
        for name in gone.iter().chain(present.iter()) {
            changed |= self.refresh(name);
        }
        Ok(changed)
    }

    /// Re-reads one file (by name, inside the directory). Returns whether anything changed.
    pub fn refresh(&mut self, name: &OsStr) -> bool {
        let path = self.dir.join(name);
        // `read` follows symlinks, so a ConfigMap-style `x.yaml -> ..data/x.yaml` works.
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if gone(&e) => {
                let removed = self.files.remove(name).is_some();
                if removed {
                    info!(file = %path.display(), "manifest file removed; its objects are withdrawn");
                }
                return removed;
            }
            Err(e) => return self.set_error(name, 0, format!("cannot read the file: {e}")),
        };
        let hash = hash_bytes(&bytes);
        if self.files.get(name).is_some_and(|s| s.hash == hash) {
            return false; // e.g. a touch, or our own earlier read of this content
        }
        let Some(format) = Format::from_path(&path) else {
            return false;
        };
        let parsed = match std::str::from_utf8(&bytes) {
            Ok(text) => manifest::parse(text, format).map_err(|e| e.to_string()),
            Err(e) => Err(format!("the file is not valid UTF-8: {e}")),
        };
        match parsed {
            Ok(objects) => {
                let state = self.files.entry(name.to_owned()).or_default();
                let recovered = state.error.is_some();
                info!(file = %path.display(), objects = objects.len(), recovered, "manifest applied");
                *state = FileState { hash, good: objects, error: None };
                true
            }
            Err(reason) => self.set_error(name, hash, reason),
        }
    }

    fn set_error(&mut self, name: &OsStr, hash: u64, reason: String) -> bool {
        let state = self.files.entry(name.to_owned()).or_default();
        if state.hash == hash && state.error.as_deref() == Some(reason.as_str()) {
            return false;
        }
        state.hash = hash;
        state.error = Some(reason);
        true // the objects stay; the error list changes
    }

    /// Builds the next snapshot (generation + 1), logging errors not logged before.
    pub fn build(&mut self) -> Model {
        self.generation += 1;
        let mut owners: HashMap<ObjectKey, &OsStr> = HashMap::new();
        let mut cluster_ips: HashMap<IpAddr, (ObjectKey, &OsStr)> = HashMap::new();
        let mut objects = Vec::new();
        let mut problems: Vec<(&OsStr, u64, String, bool)> = Vec::new();
        for (name, state) in &self.files {
            if let Some(reason) = &state.error {
                problems.push((name, state.hash, reason.clone(), true));
            }
            for object in &state.good {
                let key = object.key();
                if let Some(owner) = owners.get(&key) {
                    let reason = format!(
                        "{key} is also defined in {}, which sorts first and wins; this definition is ignored",
                        owner.to_string_lossy()
                    );
                    problems.push((name, state.hash, reason, false));
                    continue;
                }
                if let Object::Service(svc) = object {
                    // Every ClusterIP (one per family) must be free, or the Service is ignored.
                    let taken = svc
                        .cluster_ips
                        .iter()
                        .find_map(|ip| Some((ip, cluster_ips.get(&ip.to_canonical())?)));
                    if let Some((ip, (other, owner))) = taken {
                        let reason = format!(
                            "{key}: clusterIP {ip} is already taken by {other} (in {}); this Service is ignored",
                            owner.to_string_lossy()
                        );
                        problems.push((name, state.hash, reason, false));
                        continue;
                    }
                    for ip in &svc.cluster_ips {
                        cluster_ips.insert(ip.to_canonical(), (key.clone(), name));
                    }
                }
                owners.insert(key, name);
                objects.push(object.clone());
            }
        }

        let mut reported = HashSet::with_capacity(problems.len());
        let mut errors = Vec::with_capacity(problems.len());
        for (name, hash, reason, whole_file) in problems {
            let file = self.dir.join(name);
            let key = Reported { file: name.to_owned(), hash, reason };
            if !self.reported.contains(&key) {
                if whole_file {
                    warn!(file = %file.display(), reason = %key.reason,
                        "manifest rejected; its last good objects stay in force");
                } else {
                    warn!(file = %file.display(), reason = %key.reason, "manifest object ignored");
                }
            }
            errors.push(ManifestError { file, reason: key.reason.clone() });
            reported.insert(key);
        }
        self.reported = reported;
        Model::build(objects, errors, self.generation)
    }
}

/// A file that vanished between the event and the read, or a dangling symlink.
fn gone(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::IsADirectory)
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    // SipHash with fixed keys: stable within the process, which is all a change check needs.
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}
