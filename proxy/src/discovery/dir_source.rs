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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::limits::COUNTERS;
use super::snapshot::Model;
use super::store::{is_manifest_name, Store, StoreOptions};
use super::DiscoveryError;

/// Quiet time after the last event before a rebuild: a burst of writes (an editor saving,
/// `kubectl`-style tooling writing several files) becomes one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Upper bound on the wait under a continuous stream of events, so changes still land
/// well within a second.
const MAX_DELAY: Duration = Duration::from_millis(250);

/// File events waiting for the watch loop, at most. While the loop waits on a parse (up to the
/// parse budget) a writer can produce events much faster than that; beyond this many they are
/// dropped and the loop rescans the whole directory instead, which loses nothing.
const EVENT_QUEUE: usize = 4096;

enum Msg {
    Fs(notify::Result<notify::Event>),
    /// Look at the [`Signals`].
    Wake,
}

/// What the watch loop is told besides file events. Flags rather than messages, so that
/// neither a full queue nor a stop from the loop's own thread (dropped inside `publish`) can
/// block or lose them: the sender sets the flag and tries a [`Msg::Wake`].
#[derive(Default)]
struct Signals {
    stop: AtomicBool,
    /// Events were dropped (the queue was full): rescan.
    overflowed: AtomicBool,
    /// An abandoned parse ended: files that waited for a parser thread can be parsed now.
    parse_thread_ended: AtomicBool,
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
        ManifestDir::spawn_with(dir.into(), StoreOptions::default(), EVENT_QUEUE, publish)
    }

    /// [`ManifestDir::spawn`] with other store options and event queue length (tests).
    pub(crate) fn spawn_with<F>(
        dir: PathBuf,
        options: StoreOptions,
        queue: usize,
        publish: F,
    ) -> Result<ManifestDirHandle, DiscoveryError>
    where
        F: Fn(Arc<Model>) + Send + 'static,
    {
        check_dir(&dir)?;
        let (tx, rx) = mpsc::sync_channel(queue);
        let signals = Arc::new(Signals::default());
        // Watch before the first scan, so a change made during the scan is not lost: its event
        // waits in the channel and the thread re-reads the file (unchanged files are skipped).
        let (fs_tx, fs_signals) = (tx.clone(), signals.clone());
        let mut watcher = notify::recommended_watcher(move |res| {
            if let Err(TrySendError::Full(_)) = fs_tx.try_send(Msg::Fs(res)) {
                fs_signals.overflowed.store(true, Ordering::SeqCst);
            }
        })
        .map_err(|source| DiscoveryError::Watch { dir: dir.clone(), source })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| DiscoveryError::Watch { dir: dir.clone(), source })?;

        let (parse_tx, parse_signals) = (tx.clone(), signals.clone());
        let mut store = Store::with_options(
            dir.clone(),
            options,
            Arc::new(move || {
                parse_signals.parse_thread_ended.store(true, Ordering::SeqCst);
                let _ = parse_tx.try_send(Msg::Wake);
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

        let loop_signals = signals.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-discovery".into())
            .spawn(move || run(store, rx, &loop_signals, publish))
            .map_err(|source| DiscoveryError::Read { dir: dir.clone(), source })?;
        Ok(ManifestDirHandle { dir, wake: tx, signals, watcher: Some(watcher), thread: Some(thread) })
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
    wake: SyncSender<Msg>,
    signals: Arc<Signals>,
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
        self.signals.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.try_send(Msg::Wake); // a full queue wakes the loop anyway
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

fn run<F: Fn(Arc<Model>)>(mut store: Store, rx: Receiver<Msg>, signals: &Signals, publish: F) {
    let dir = store.dir().to_owned();
    let mut dir_missing = false;
    loop {
        let mut batch = Batch::default();
        match rx.recv() {
            Ok(Msg::Fs(res)) => batch.add(&dir, res),
            Ok(Msg::Wake) => {}
            Err(_) => return,
        }
        let deadline = Instant::now() + MAX_DELAY;
        loop {
            if signals.stop.load(Ordering::SeqCst) {
                return;
            }
            let wait = DEBOUNCE.min(deadline.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(wait) {
                Ok(Msg::Fs(res)) => batch.add(&dir, res),
                Ok(Msg::Wake) => {}
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        if signals.overflowed.swap(false, Ordering::SeqCst) {
            COUNTERS.count_watch_overflow();
            warn!(dir = %dir.display(), queue = EVENT_QUEUE, "more file events than the queue holds; rescanning the manifest directory");
            batch.rescan = true;
        }
        batch.retry |= signals.parse_thread_ended.swap(false, Ordering::SeqCst);

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
