//! Discovery: the in-memory model of namespaces, pods, services, endpoints and authorization
//! policies, fed by sources.
//!
//! Data flows one way: a source (today the manifest directory; later the Kubernetes API)
//! parses objects, builds an immutable [`Model`] snapshot with every index precomputed, and
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
//! Layout: `model` (object types), `snapshot` (the `Model` and its indexes), `manifest` (file
//! parsing and the kind registry), `kinds` (one parser per kind), `fields` (field access with
//! error paths), `store` (per-file state and conflict rules), `dir_source` (the watcher).

mod dir_source;
mod fields;
mod kinds;
pub mod manifest;
mod model;
mod snapshot;
mod store;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use thiserror::Error;

pub use dir_source::{ManifestDir, ManifestDirHandle};
pub use manifest::{DocError, DocRef, Format, ParseError};
pub use model::{
    AddressType, AuthorizationPolicy, AuthzAction, AuthzOperation, AuthzRule, AuthzSource, Endpoint,
    EndpointPort, EndpointSlice, Kind, Labels, Namespace, Object, ObjectKey, PeerAuthMode, Pod, PodPhase,
    PodRef, Protocol, Service, ServicePort, StringMatch, TargetPort, MESH_ANNOTATION, MESH_ENABLED,
    PEER_AUTH_ANNOTATION, SERVICE_NAME_LABEL,
};
pub use snapshot::{ManifestError, Model, ServiceTarget};

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
}
