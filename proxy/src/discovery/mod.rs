//! Discovery: the in-memory model of namespaces, pods, services, endpoints, authorization
//! policies, Gateway API mesh routes (HTTPRoute, GRPCRoute), sluice's TrafficPolicies and Istio's
//! ServiceEntries, fed by sources.
//!
//! Data flows one way: a source (the manifest directory, or the Kubernetes API) parses objects, builds an immutable [`Model`] snapshot with every index precomputed, and
//! publishes it as `Arc<Model>`. Consumers swap whole snapshots (`arc_swap::ArcSwap<Model>`
//! for the data path, a `tokio::sync::watch` channel for control-plane tasks) and never see a
//! half-applied change.
//!
//! Wiring in the daemon:
//! ```ignore
//! let snapshot = Arc::new(ArcSwap::from_pointee(Model::empty()));
//! let (models_tx, models_rx) = tokio::sync::watch::channel(Arc::new(Model::empty()));
//! let s = snapshot.clone();
//! let _source = ManifestDir::spawn(&args.manifests, move |model| {
//!     s.store(model.clone());          // data path: snapshot.load().service_for(ip, port)
//!     models_tx.send_replace(model);   // control plane: diff enrollment on changed()
//! })?;                                 // returns after the first model was published
//! ```
//!
//! Layout: `model` (object types), `route` (the route types), `traffic` (TrafficPolicy,
//! ServiceEntry, the namespace outbound policy), `snapshot` (the `Model` and its indexes,
//! including the routes attached to each Service port, the TrafficPolicy in force for each
//! target and the ServiceEntries by address and host), `manifest` (file parsing and the kind
//! registry), `kinds` (one parser per kind), `kinds_route` (HTTPRoute, GRPCRoute) and
//! `kinds_traffic` (TrafficPolicy, ServiceEntry), `fields` (field access with error paths),
//! `limits` (what a file or object may cost, checked before parsing), `parse_worker` (parses
//! bounded in time), `store` (per-file state and conflict rules), `dir_source` (the watcher), `kube` (the
//! Kubernetes API source: list/watch into the same parsers; routes, TrafficPolicies and
//! ServiceEntries are watched there too), `view` (the model as `GET /model` shows it).
//! [`SourceConfig`] picks the source; the manifest directory is the default.

mod dir_source;
mod fields;
pub mod istio;
mod kinds;
mod kinds_route;
mod kinds_traffic;
pub mod kube;
pub mod limits;
pub mod manifest;
mod model;
mod parse_worker;
pub mod route;
pub mod route_table;
pub mod traffic;
mod workload;
mod snapshot;
mod store;
mod view;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

pub use self::kube::{KubeConfig, KubeError, KubeSource, KubeSourceHandle};
pub use dir_source::{ManifestDir, ManifestDirHandle};
pub use manifest::{DocError, DocRef, Format, ParseError};
pub use model::{
    AddressType, AuthorizationPolicy, AuthzAction, AuthzOperation, AuthzRule, AuthzSource, Endpoint,
    EndpointPort, EndpointSlice, Kind, Labels, Namespace, Object, ObjectKey, OwnerRef, PeerAuthMode, Pod,
    PodPhase, PodRef, Protocol, Service, ServicePort, StringMatch, TargetPort, MESH_ANNOTATION, MESH_ENABLED,
    PEER_AUTH_ANNOTATION, SERVICE_NAME_LABEL,
};
pub use workload::{workload_name, WorkloadInfo, UNKNOWN_WORKLOAD};
pub use snapshot::{ManifestError, Model, ServiceTarget};
pub use view::{
    AuthorizationPolicyView, EndpointSliceView, ErrorView, ModelView, NamespaceView, PodView, RouteView,
    ServiceEntryView, ServicePortView, ServiceView, TrafficPolicyView, VirtualServiceView,
};

/// Why a source could not start. (Problems inside manifest files are not errors of the
/// source: they are reported in [`Model::errors`] and logged.)
#[derive(Debug, Error)]
pub enum DiscoveryError {
    #[error("manifest directory {} does not exist", dir.display())]
    DirNotFound { dir: PathBuf },
    #[error("manifest directory {} is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    Read { dir: PathBuf, source: std::io::Error },
    #[error("cannot watch manifest directory {}: {source}", dir.display())]
    Watch { dir: PathBuf, source: notify::Error },
    #[error(transparent)]
    Kube(#[from] KubeError),
}

/// Where the model comes from (`sluice run --source`).
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A directory of manifests, watched for changes: the embedded default, no cluster needed.
    Manifests(PathBuf),
    /// The Kubernetes API (list/watch), for the pods of this node and what they talk to.
    Kubernetes(KubeConfig),
}

impl SourceConfig {
    /// Starts the source for node `node`: `publish` gets the first complete model before this
    /// returns, then every new one (on the source's own thread; it must not block).
    pub fn spawn<F>(&self, node: &str, publish: F) -> Result<SourceHandle, DiscoveryError>
    where
        F: Fn(Arc<Model>) + Send + 'static,
    {
        Ok(match self {
            SourceConfig::Manifests(dir) => SourceHandle::Manifests(ManifestDir::spawn(dir.clone(), publish)?),
            SourceConfig::Kubernetes(config) => {
                SourceHandle::Kubernetes(KubeSource::spawn(config.clone(), node, publish)?)
            }
        })
    }

    /// For logs and errors: the directory, or the API server.
    pub fn describe(&self) -> String {
        match self {
            SourceConfig::Manifests(dir) => format!("manifest directory {}", dir.display()),
            SourceConfig::Kubernetes(config) => format!("Kubernetes API ({})", config.describe()),
        }
    }
}

/// Keeps a source running; dropping it stops the source.
#[derive(Debug)]
pub enum SourceHandle {
    Manifests(ManifestDirHandle),
    Kubernetes(KubeSourceHandle),
}
