//! The Kubernetes API source: list/watch of Namespaces, Pods, Services, EndpointSlices, Istio
//! AuthorizationPolicies and ServiceEntries, the Gateway API's HTTPRoutes and GRPCRoutes and
//! sluice's TrafficPolicies, publishing complete [`Model`] snapshots with the same contract as
//! the manifest directory
//! ([`ManifestDir`](super::ManifestDir)).
//!
//! - **Same model as the manifest directory.** Every API object arrives as JSON and is parsed
//!   by the manifest parsers (`manifest::parse_json_object`): one validation, one set of
//!   defaults. An object that fails validation is reported like a bad manifest file, as
//!   `kubernetes:<Kind>/<namespace>/<name>` in `Model::errors`, and its last good version
//!   stays in force (see `store`).
//! - **Same limits as the manifest directory.** Objects are decoded as [`ApiObject`]s, which
//!   refuse an object nested too deep or too large without building it, keeping its name: it
//!   is reported like an invalid object and the list or watch goes on (see `object`).
//! - **Reflector semantics from kube-runtime's `watcher`**, not re-implemented: a paginated
//!   initial LIST, then a WATCH from the list's resourceVersion with `allowWatchBookmarks`
//!   (a BOOKMARK moves the resume point forward, so a reconnect after a quiet period does not
//!   fall out of the API server's history window), a clean end of the watch (its
//!   `timeoutSeconds`) or a dropped connection resumes from the last resourceVersion seen, and
//!   `410 Gone` (history expired) starts over with a relist. Errors back off exponentially
//!   (client-go's parameters: 0.8 s doubling to 30 s, with jitter).
//! - **Per-object state, one rebuild per burst.** The per-object store is sluice's own (it
//!   holds the distilled objects and their validation state, not whole API objects, which is
//!   all kube's `reflector` store would add). A change marks the model dirty; the snapshot is
//!   rebuilt after 50 ms of quiet (at most 250 ms after the first change), as the manifest
//!   directory does. A relist is swapped in whole when complete, never half-applied.
//! - **Synced before serving.** [`KubeSource::spawn`] returns once every watch has completed
//!   its first list and the first model has been published, or fails after
//!   [`KubeConfig::sync_timeout`] naming what it was still waiting for: enrolling pods from a
//!   partial view could release pods the API has not been asked about yet.
//! - **Optional CRDs.** If the API server does not serve `security.istio.io/v1`
//!   AuthorizationPolicies or `networking.istio.io/v1` ServiceEntries (Istio's CRDs are not
//!   installed), `gateway.networking.k8s.io/v1` HTTPRoutes or GRPCRoutes (the Gateway API's CRDs
//!   are not installed), or `sluice.dev/v1alpha1` TrafficPolicies (sluice's CRD is not
//!   installed), that is logged once per resource and the model goes on without them; the watch
//!   keeps retrying at the backoff's slowest pace and picks them up once the CRD exists.
//!
//! The source runs on a thread of its own with a single-threaded tokio runtime: it never
//! competes with the data path, and [`KubeSource::spawn`] works from sync code like
//! `ManifestDir::spawn`. See `resources` for what is watched, including why pods are watched
//! twice (this node, and every other node for IP → identity).

pub(crate) mod object;
pub(crate) mod resources;
pub(crate) mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ::kube::api::Api;
use ::kube::runtime::watcher::{self, watcher, Event};
use ::kube::runtime::WatchStreamExt;
use futures_util::stream::{self, StreamExt};
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::snapshot::Model;
pub(crate) use object::ApiObject;
use resources::WatchSpec;
use store::KubeStore;

pub(crate) use resources::watches;

/// Quiet time after the last change before a rebuild (as the manifest directory).
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Upper bound on the wait under a continuous stream of changes.
const MAX_DELAY: Duration = Duration::from_millis(250);

/// How to reach the API server, in order of precedence: an explicit URL, a kubeconfig file,
/// then what the environment says (`KUBECONFIG` or `~/.kube/config`, else the in-cluster
/// service account that a DaemonSet pod has).
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// `--kube-api URL`: used as is, without credentials. For `kubectl proxy`
    /// (`http://127.0.0.1:8001`) and tests; a real cluster goes through the service account.
    pub api_url: Option<String>,
    /// `--kubeconfig PATH`: its current context.
    pub kubeconfig: Option<PathBuf>,
    /// How long [`KubeSource::spawn`] waits for the first complete list of everything.
    pub sync_timeout: Duration,
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig { api_url: None, kubeconfig: None, sync_timeout: Duration::from_secs(60) }
    }
}

impl KubeConfig {
    /// Where the configuration comes from, for logs and errors.
    pub fn describe(&self) -> String {
        match (&self.api_url, &self.kubeconfig) {
            (Some(url), _) => url.clone(),
            (None, Some(path)) => format!("kubeconfig {}", path.display()),
            (None, None) => "the in-cluster or default kubeconfig configuration".into(),
        }
    }
}

/// Why the Kubernetes source could not start. (Objects that fail validation are not errors of
/// the source: they are reported in `Model::errors`.)
#[derive(Debug, Error)]
pub enum KubeError {
    #[error("invalid Kubernetes API URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot load kubeconfig {}: {source}", path.display())]
    Kubeconfig { path: PathBuf, source: ::kube::config::KubeconfigError },
    #[error("no Kubernetes API configuration (use --kube-api or --kubeconfig outside a cluster): {0}")]
    Infer(#[from] ::kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[source] ::kube::Error),
    #[error("cannot start the Kubernetes source thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(
        "no complete list from the Kubernetes API ({endpoint}) within {waited:?}: still waiting for {}{}",
        pending.join(", "),
        last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
    )]
    SyncTimeout { endpoint: String, waited: Duration, pending: Vec<String>, last_error: Option<String> },
    #[error("the Kubernetes source stopped before publishing its first model")]
    Stopped,
}

/// Constructors for the Kubernetes API source.
pub struct KubeSource;

impl KubeSource {
    /// Connects to the API server, lists and watches what the model needs for node
    /// `node_name`, calls `publish` with the first complete snapshot (generation 1) before
    /// returning, then with each new snapshot.
    ///
    /// `publish` runs on the source's own thread and should only hand the snapshot over
    /// (`ArcSwap::store`, `watch::Sender::send_replace`), never block. This call blocks until
    /// the first snapshot (up to [`KubeConfig::sync_timeout`]).
    pub fn spawn<F>(
        config: KubeConfig,
        node_name: impl Into<String>,
        publish: F,
    ) -> Result<KubeSourceHandle, KubeError>
    where
        F: Fn(Arc<Model>) + Send + 'static,
    {
        let node = node_name.into();
        let endpoint = config.describe();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("sluice-kube".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(KubeError::Thread(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    // The client spawns its connection tasks: it must be built on this runtime.
                    let client = match client(&config).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let source = Source::new(node, config, publish, ready_tx);
                    source.run(client, stop_rx).await;
                });
            })
            .map_err(KubeError::Thread)?;
        let handle = KubeSourceHandle { endpoint, stop: Some(stop_tx), thread: Some(thread) };
        // The thread enforces the sync timeout itself, so this wait ends.
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(KubeError::Stopped),
        }
    }
}

/// Keeps the source running; dropping it stops the watches and joins the thread.
pub struct KubeSourceHandle {
    endpoint: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KubeSourceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSourceHandle").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl KubeSourceHandle {
    /// The API server this source talks to (as configured).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Stops the watches and waits for the source thread to finish.
    pub fn shutdown(self) {
        drop(self)
    }
}

impl Drop for KubeSourceHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Dropped from inside `publish`? Joining ourselves would deadlock.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

pub(crate) async fn client(config: &KubeConfig) -> Result<::kube::Client, KubeError> {
    let cfg = if let Some(url) = &config.api_url {
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| KubeError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if uri.scheme().is_none() || uri.host().is_none() {
            return Err(KubeError::BadUrl {
                url: url.clone(),
                reason: "expected http(s)://HOST[:PORT]".into(),
            });
        }
        ::kube::Config::new(uri)
    } else if let Some(path) = &config.kubeconfig {
        let err = |source| KubeError::Kubeconfig { path: path.clone(), source };
        let kubeconfig = ::kube::config::Kubeconfig::read_from(path).map_err(err)?;
        ::kube::Config::from_custom_kubeconfig(kubeconfig, &::kube::config::KubeConfigOptions::default())
            .await
            .map_err(err)?
    } else {
        ::kube::Config::infer().await?
    };
    info!(api = %cfg.cluster_url, "Kubernetes API source: connecting");
    ::kube::Client::try_from(cfg).map_err(KubeError::Client)
}

/// The source's loop state.
struct Source<F> {
    node: String,
    config: KubeConfig,
    specs: Vec<WatchSpec>,
    store: KubeStore,
    publish: F,
    /// Until the first model is out: whom to tell.
    ready: Option<std::sync::mpsc::Sender<Result<(), KubeError>>>,
    /// Per watch: the last error logged at warn level (repeats go to debug).
    last_error: Vec<Option<String>>,
    /// First and latest change since the last published model.
    dirty: Option<(Instant, Instant)>,
}

impl<F: Fn(Arc<Model>)> Source<F> {
    fn new(
        node: String,
        config: KubeConfig,
        publish: F,
        ready: std::sync::mpsc::Sender<Result<(), KubeError>>,
    ) -> Self {
        let specs = watches();
        Source {
            store: KubeStore::new(&specs),
            last_error: vec![None; specs.len()],
            specs,
            node,
            config,
            publish,
            ready: Some(ready),
            dirty: None,
        }
    }

    async fn run(mut self, client: ::kube::Client, mut stop: oneshot::Receiver<()>) {
        let mut events = stream::select_all(self.specs.iter().enumerate().map(|(i, spec)| {
            let api = Api::<ApiObject>::all_with(client.clone(), &spec.resource);
            // Defaults: ListWatch with pages of 500, bookmarks on, 290 s watch timeout.
            let mut cfg = watcher::Config::default();
            if let Some(fields) = spec.field_selector(&self.node) {
                cfg = cfg.fields(&fields);
            }
            watcher(api, cfg).default_backoff().map(move |event| (i, event)).boxed()
        }));
        let sync_deadline = Instant::now() + self.config.sync_timeout;
        loop {
            let publish_at = self.dirty.map(|(first, last)| (last + DEBOUNCE).min(first + MAX_DELAY));
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                _ = &mut stop => return,
                Some((i, event)) = events.next() => self.handle(i, event),
                _ = tokio::time::sleep_until(publish_at.unwrap_or(far)), if publish_at.is_some() && self.ready.is_none() => {
                    self.publish_model();
                }
                _ = tokio::time::sleep_until(sync_deadline), if self.ready.is_some() => {
                    let error = KubeError::SyncTimeout {
                        endpoint: self.config.describe(),
                        waited: self.config.sync_timeout,
                        pending: self.store.pending().into_iter().map(str::to_owned).collect(),
                        last_error: self.last_error.iter().flatten().last().cloned(),
                    };
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(Err(error));
                    }
                    return;
                }
            }
            if self.ready.is_some() && self.store.all_synced() {
                self.publish_model();
                let model_objects = self.store.object_count();
                info!(node = %self.node, objects = model_objects, "Kubernetes API source synced");
                if let Some(ready) = self.ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
        }
    }

    fn publish_model(&mut self) {
        self.dirty = None;
        let model = Arc::new(self.store.build());
        debug!(generation = model.generation(), errors = model.errors().len(), "publishing model");
        (self.publish)(model);
    }

    fn handle(&mut self, i: usize, event: Result<Event<ApiObject>, watcher::Error>) {
        let changed = match event {
            Ok(event) => {
                // `Init` comes before every list attempt, failed ones included: only a
                // completed list or a watch event shows the watch works again.
                if !matches!(event, Event::Init | Event::InitApply(_)) {
                    self.recovered(i);
                }
                match event {
                    Event::Init => {
                        self.store.init(i);
                        false
                    }
                    Event::InitApply(obj) => {
                        self.store.init_apply(i, obj);
                        false
                    }
                    Event::InitDone => self.store.init_done(i).changed(),
                    Event::Apply(obj) => self.store.apply(i, obj).changed(),
                    Event::Delete(obj) => self.store.delete(i, &obj).changed(),
                }
            }
            Err(e) => self.failed(i, e),
        };
        if changed {
            let now = Instant::now();
            self.dirty = Some(self.dirty.map_or((now, now), |(first, _)| (first, now)));
        }
    }

    /// A watch error. The watcher recovers by itself on the next poll (after the backoff);
    /// this decides what to log and whether the model changes. Returns whether it does.
    fn failed(&mut self, i: usize, error: watcher::Error) -> bool {
        let spec = &self.specs[i];
        match &error {
            watcher::Error::InitialListFailed(::kube::Error::Api(status))
                if status.code == 404 && spec.optional =>
            {
                return self.store.absent(i).changed();
            }
            watcher::Error::WatchError(status) if status.code == 410 => {
                // Expected now and then (history compacted while the watch was away): the
                // watcher relists, and the relist replaces what this watch knew.
                info!(watch = spec.label, message = %status.message, "watch history expired (410 Gone); relisting");
                return false;
            }
            _ => {}
        }
        let message = error.to_string();
        if self.last_error[i].as_deref() == Some(message.as_str()) {
            debug!(watch = spec.label, error = %message, "Kubernetes watch failed again; retrying with backoff");
        } else {
            warn!(watch = spec.label, error = %message, "Kubernetes watch failed; retrying with backoff, the last model stays in force");
            self.last_error[i] = Some(message);
        }
        false
    }

    fn recovered(&mut self, i: usize) {
        if self.last_error[i].take().is_some() {
            info!(watch = self.specs[i].label, "Kubernetes watch recovered");
        }
    }
}
