//! The manifest directory's state: the last good objects of every file, and the rules that
//! turn them into a [`Model`].
//!
//! - A file that fails to read or parse keeps its previous good objects in force and is listed
//!   in `Model::errors`; it is logged once per distinct content, not on every rebuild.
//! - When two files define the same object, the file whose name sorts first wins and the other
//!   file gets an error; so does a Service that claims another Service's ClusterIP.
//! - Reading is bounded: only regular files (a FIFO would block the reader forever, a device
//!   never end), refused from their size before being read if over the limit. Parsing runs on
//!   a [`ParseWorker`] within [`PARSE_BUDGET`], after the [`limits`](super::limits) pre-check; a
//!   file whose parse had to wait (too many abandoned parses running) is parsed again by
//!   [`Store::retry_deferred`].

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::limits::{self, Limits, COUNTERS, MAX_ABANDONED_PARSES, PARSE_BUDGET};
use super::manifest::{self, Format, ParseError};
use super::model::{Object, ObjectKey};
use super::parse_worker::{Outcome, ParseWorker};
use super::snapshot::{ManifestError, Model};

/// A file's objects, or why it has none.
pub(crate) type Parsed = Result<Vec<Object>, String>;

/// Turns a file's bytes into objects (run on the parse worker).
pub(crate) type ParseFn = Arc<dyn Fn(&[u8], Format, &Limits) -> Parsed + Send + Sync>;

/// How a store reads and parses: the defaults, or tighter ones in tests.
pub(crate) struct StoreOptions {
    pub limits: Limits,
    /// How long one file's parse may take before it is abandoned.
    pub budget: Duration,
    /// Abandoned parses allowed to run at once.
    pub max_abandoned: usize,
    pub parse: ParseFn,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            limits: Limits::DEFAULT,
            budget: PARSE_BUDGET,
            max_abandoned: MAX_ABANDONED_PARSES,
            parse: Arc::new(parse_file),
        }
    }
}

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
    /// The current content waits for a parser thread (it is not the one `hash` names).
    deferred: bool,
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
    limits: Limits,
    parse: ParseFn,
    parser: ParseWorker<Parsed>,
    /// Files whose parse was put off because too many abandoned parses were running.
    deferred: BTreeSet<OsString>,
}

impl Store {
    /// A store with the default options, for a directory nobody watches (abandoned parses
    /// ending need not wake anyone).
    pub fn new(dir: PathBuf) -> Store {
        Store::with_options(dir, StoreOptions::default(), Arc::new(|| {}))
    }

    /// `on_parse_thread_ended` runs (on that thread) when an abandoned parse ends: time to call
    /// [`Store::retry_deferred`].
    pub fn with_options(
        dir: PathBuf,
        options: StoreOptions,
        on_parse_thread_ended: Arc<dyn Fn() + Send + Sync>,
    ) -> Store {
        Store {
            dir,
            files: BTreeMap::new(),
            generation: 0,
            reported: HashSet::new(),
            limits: options.limits,
            parse: options.parse,
            parser: ParseWorker::new(options.budget, options.max_abandoned, on_parse_thread_ended),
            deferred: BTreeSet::new(),
        }
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
        let Some(format) = Format::from_path(&path) else {
            return false;
        };
        // `open` follows symlinks, so a ConfigMap-style `x.yaml -> ..data/x.yaml` works.
        let bytes = match read_bounded(&path, &self.limits) {
            Ok(FileRead::Content(bytes)) => bytes,
            Ok(FileRead::Gone) => {
                self.deferred.remove(name);
                let removed = self.files.remove(name).is_some();
                if removed {
                    info!(file = %path.display(), "manifest file removed; its objects are withdrawn");
                }
                return removed;
            }
            Ok(FileRead::Refused { fingerprint, reason }) => {
                self.deferred.remove(name);
                return self.set_error(name, fingerprint, reason);
            }
            Err(e) => return self.set_error(name, 0, format!("cannot read the file: {e}")),
        };
        let hash = hash_bytes(&bytes);
        if self.files.get(name).is_some_and(|s| s.hash == hash && !s.deferred) {
            return false; // e.g. a touch, or our own earlier read of this content
        }
        self.deferred.remove(name);
        let (limits, parse) = (self.limits, self.parse.clone());
        match self.parser.run(move || parse(&bytes, format, &limits)) {
            Outcome::Done(Ok(objects)) => {
                let state = self.files.entry(name.to_owned()).or_default();
                let recovered = state.error.is_some();
                info!(file = %path.display(), objects = objects.len(), recovered, "manifest applied");
                *state = FileState { hash, good: objects, error: None, deferred: false };
                true
            }
            Outcome::Done(Err(reason)) | Outcome::Failed(reason) => self.set_error(name, hash, reason),
            // Not this content's fault: the next event for the file parses it again.
            Outcome::Unavailable(reason) => self.set_error(name, 0, reason),
            Outcome::TimedOut(budget) => self.set_error(
                name,
                hash,
                format!(
                    "parsing took longer than {} s and was abandoned (this content is not parsed again)",
                    budget.as_secs_f64()
                ),
            ),
            Outcome::Busy(running) => {
                self.deferred.insert(name.to_owned());
                let state = self.files.entry(name.to_owned()).or_default();
                let reason = format!(
                    "not parsed yet: {running} earlier parses that ran over their time budget are still running; \
                     it is parsed as soon as one ends"
                );
                let changed = !state.deferred || state.error.as_deref() != Some(reason.as_str());
                state.deferred = true;
                state.error = Some(reason);
                changed
            }
        }
    }

    /// Parses again the files that had to wait for a parser thread. Returns whether anything
    /// changed.
    pub fn retry_deferred(&mut self) -> bool {
        let waiting: Vec<OsString> = self.deferred.iter().cloned().collect();
        waiting.iter().fold(false, |changed, name| self.refresh(name) | changed)
    }

    fn set_error(&mut self, name: &OsStr, hash: u64, reason: String) -> bool {
        let state = self.files.entry(name.to_owned()).or_default();
        if state.hash == hash && !state.deferred && state.error.as_deref() == Some(reason.as_str()) {
            return false;
        }
        state.hash = hash;
        state.deferred = false;
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

/// What reading a manifest file gave.
enum FileRead {
    Content(Vec<u8>),
    /// Vanished between the event and the read, a dangling symlink, or a directory.
    Gone,
    /// Not read at all: `fingerprint` stands for its content in the change check.
    Refused {
        fingerprint: u64,
        reason: String,
    },
}

/// Reads a manifest file without ever blocking or reading more than the limit: only regular
/// files (opened non-blocking, so a FIFO cannot hang the open either), refused from their size
/// before any byte is read.
fn read_bounded(path: &Path, limits: &Limits) -> io::Result<FileRead> {
    let refuse = |meta: &std::fs::Metadata, reason: String| {
        let fingerprint = hash_bytes(
            &[meta.len(), meta.mtime() as u64, meta.mtime_nsec() as u64, meta.ino()]
                .map(u64::to_le_bytes)
                .concat(),
        );
        FileRead::Refused { fingerprint, reason }
    };
    let file = match File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path) {
        Ok(f) => f,
        Err(e) if gone(&e) => return Ok(FileRead::Gone),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Ok(FileRead::Gone);
    }
    if !meta.is_file() {
        let reason =
            "not a regular file (a FIFO, socket or device): sluice reads only regular files".to_owned();
        return Ok(refuse(&meta, reason));
    }
    if let Err(e) = limits::check_file_size(meta.len(), limits) {
        COUNTERS.count_refused();
        return Ok(refuse(&meta, e.to_string()));
    }
    // A regular file: reads may block now (a few filesystems would answer EAGAIN otherwise).
    // SAFETY: fcntl on a descriptor this function owns.
    unsafe {
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One more byte than the limit: a file that grew since its size was read is caught too.
    file.take(limits.file_bytes as u64 + 1).read_to_end(&mut bytes)?;
    if let Err(e) = limits::check_file_size(bytes.len() as u64, limits) {
        COUNTERS.count_refused();
        return Ok(refuse(&meta, e.to_string()));
    }
    Ok(FileRead::Content(bytes))
}

/// The parse of one file's bytes, as the worker thread runs it.
pub(crate) fn parse_file(bytes: &[u8], format: Format, limits: &Limits) -> Parsed {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("the file is not valid UTF-8: {e}"))?;
    manifest::parse_within(text, format, limits).map_err(|e| {
        if matches!(e, ParseError::Limit(_)) {
            COUNTERS.count_refused();
        }
        e.to_string()
    })
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
