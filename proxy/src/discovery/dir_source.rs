//! The manifest-directory source: loads a directory of manifests, then watches it (inotify via
//! `notify`) and publishes a new [`Model`] after every change.
//!
//! The work runs on a dedicated OS thread rather than a tokio task: it does blocking file I/O,
//! it must never compete with the data path's runtime, and it lets [`ManifestDir::spawn`] be
//! called from sync or async code alike. That thread never parses: the store hands each file to
//! a parse worker and waits at most the parse budget (see `parse_worker`), so one bad file can
//! delay the others by seconds at worst, never stop them.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::snapshot::Model;
use super::store::{is_manifest_name, Store, StoreOptions};
use super::DiscoveryError;

/// Quiet time after the last event before a rebuild: a burst of writes (an editor saving,
/// `kubectl`-style tooling writing several files) becomes one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Upper bound on the wait under a continuous stream of events, so changes still land
/// well within a second.
const MAX_DELAY: Duration = Duration::from_millis(250);

enum Msg {
    Fs(notify::Result<notify::Event>),
    /// An abandoned parse ended: files that waited for a parser thread can be parsed now.
    ParseThreadEnded,
    Stop,
}

/// Constructors for the manifest-directory source.
pub struct ManifestDir;

impl ManifestDir {
    /// Loads every manifest in `dir`, calls `publish` with the first snapshot (generation 1)
    /// before returning, then watches `dir` and calls `publish` with each new snapshot.
    ///
    /// `publish` runs on the source's own thread and should only hand the snapshot over
    /// (`ArcSwap::store`, `watch::Sender::send_replace`), never block. The initial load is
    /// blocking file I/O; it is small, but from async code prefer `spawn_blocking`.
    ///
    /// Errors if `dir` does not exist, is not a directory, or cannot be read or watched.
    /// Bad files are not errors here: they are reported in `Model::errors`.
    pub fn spawn<F>(dir: impl Into<PathBuf>, publish: F) -> Result<ManifestDirHandle, DiscoveryError>
    where
        F: Fn(Arc<Model>) + Send + 'static,
    {
        let dir = dir.into();
        check_dir(&dir)?;
        let (tx, rx) = mpsc::channel();
        // Watch before the first scan, so a change made during the scan is not lost: its event
        // waits in the channel and the thread re-reads the file (unchanged files are skipped).
        let fs_tx = tx.clone();
        let mut watcher = notify::recommended_watcher(move |res| {
            let _ = fs_tx.send(Msg::Fs(res));
        })
        .map_err(|source| DiscoveryError::Watch { dir: dir.clone(), source })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| DiscoveryError::Watch { dir: dir.clone(), source })?;

        let parse_tx = tx.clone();
        let mut store = Store::with_options(
            dir.clone(),
            StoreOptions::default(),
            Arc::new(move || {
                let _ = parse_tx.send(Msg::ParseThreadEnded);
            }),
        );
        store.scan().map_err(|source| DiscoveryError::Read { dir: dir.clone(), source })?;
        let model = Arc::new(store.build());
        info!(
            dir = %dir.display(),
            files = store.file_count(),
            pods = model.pods().count(),
            services = model.services().count(),
            errors = model.errors().len(),
            "manifest directory loaded"
        );
        publish(model);

        let thread = std::thread::Builder::new()
            .name("sluice-discovery".into())
            .spawn(move || run(store, rx, publish))
            .map_err(|source| DiscoveryError::Read { dir: dir.clone(), source })?;
        Ok(ManifestDirHandle { dir, stop: tx, watcher: Some(watcher), thread: Some(thread) })
    }

    /// [`ManifestDir::spawn`] publishing into a tokio `watch` channel, for async consumers:
    /// the receiver already holds the first snapshot when this returns.
    pub fn spawn_watch(
        dir: impl Into<PathBuf>,
    ) -> Result<(ManifestDirHandle, watch::Receiver<Arc<Model>>), DiscoveryError> {
        let (tx, rx) = watch::channel(Arc::new(Model::empty()));
        let handle = ManifestDir::spawn(dir, move |model| {
            tx.send_replace(model);
        })?;
        Ok((handle, rx))
    }

    /// Loads `dir` once, without watching (for validation tools and tests).
    pub fn load(dir: impl AsRef<Path>) -> Result<Model, DiscoveryError> {
        let dir = dir.as_ref();
        check_dir(dir)?;
        let mut store = Store::new(dir.to_owned());
        store.scan().map_err(|source| DiscoveryError::Read { dir: dir.to_owned(), source })?;
        Ok(store.build())
    }
}

fn check_dir(dir: &Path) -> Result<(), DiscoveryError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(DiscoveryError::NotADirectory { dir: dir.to_owned() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(DiscoveryError::DirNotFound { dir: dir.to_owned() })
        }
        Err(source) => Err(DiscoveryError::Read { dir: dir.to_owned(), source }),
    }
}

/// Keeps the source running; dropping it stops the watch and joins the thread.
pub struct ManifestDirHandle {
    dir: PathBuf,
    stop: Sender<Msg>,
    watcher: Option<RecommendedWatcher>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ManifestDirHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestDirHandle").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl ManifestDirHandle {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops watching and waits for the source thread to finish its current rebuild.
    pub fn shutdown(self) {
        drop(self)
    }
}

impl Drop for ManifestDirHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(Msg::Stop);
        drop(self.watcher.take());
        if let Some(thread) = self.thread.take() {
            // Dropped from inside `publish`? Joining ourselves would deadlock.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// What a batch of events asks for.
#[derive(Default)]
struct Batch {
    files: BTreeSet<OsString>,
    rescan: bool,
    /// Parse the files that waited for a parser thread.
    retry: bool,
}

impl Batch {
    fn add(&mut self, dir: &Path, res: notify::Result<notify::Event>) {
        let event = match res {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "watch error; rescanning the manifest directory");
                self.rescan = true;
                return;
            }
        };
        // Opening and reading (including our own reads) changes nothing.
        if let EventKind::Access(a) = event.kind {
            if a != AccessKind::Close(AccessMode::Write) {
                return;
            }
        }
        if event.need_rescan() {
            self.rescan = true; // the kernel queue overflowed: events were lost
        }
        for path in &event.paths {
            match path.file_name() {
                Some(name) if path != dir && is_manifest_name(name) => {
                    self.files.insert(name.to_owned());
                }
                // A ConfigMap volume swaps its `..data` symlink to update every file at once;
                // the file names themselves see no event.
                Some(name) if name.to_string_lossy().starts_with("..") => self.rescan = true,
                Some(_) if path != dir => {} // not a manifest: editor swap files, notes, ...
                _ => self.rescan = true,     // the directory itself changed
            }
        }
    }
}

fn run<F: Fn(Arc<Model>)>(mut store: Store, rx: Receiver<Msg>, publish: F) {
    let dir = store.dir().to_owned();
    let mut dir_missing = false;
    loop {
        let mut batch = Batch::default();
        match rx.recv() {
            Ok(Msg::Fs(res)) => batch.add(&dir, res),
            Ok(Msg::ParseThreadEnded) => batch.retry = true,
            Ok(Msg::Stop) | Err(_) => return,
        }
        let deadline = Instant::now() + MAX_DELAY;
        loop {
            let wait = DEBOUNCE.min(deadline.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(wait) {
                Ok(Msg::Fs(res)) => batch.add(&dir, res),
                Ok(Msg::ParseThreadEnded) => batch.retry = true,
                Err(RecvTimeoutError::Timeout) => break,
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }

        // If the directory itself went away, every file would look deleted; keep the last
        // model instead of withdrawing the whole mesh.
        if !dir.is_dir() {
            if !dir_missing {
                warn!(dir = %dir.display(), "manifest directory is gone; keeping the last model");
                dir_missing = true;
            }
            continue;
        }
        let mut changed = if batch.rescan || dir_missing {
            dir_missing = false;
            store.scan().unwrap_or_else(|e| {
                warn!(dir = %dir.display(), error = %e, "cannot rescan the manifest directory");
                false
            })
        } else {
            batch.files.iter().fold(false, |changed, name| store.refresh(name) | changed)
        };
        if batch.retry {
            changed |= store.retry_deferred();
        }
        if changed {
            let model = Arc::new(store.build());
            debug!(generation = model.generation(), errors = model.errors().len(), "publishing model");
            publish(model);
        }
    }
}
