//! A fake Kubernetes API server for tests: a real HTTP/1.1 server that speaks the list/watch
//! protocol the way kube-apiserver does, for the resources sluice watches (Namespaces, Pods,
//! Services, discovery.k8s.io/v1 EndpointSlices, security.istio.io AuthorizationPolicies,
//! PeerAuthentications and RequestAuthentications,
//! gateway.networking.k8s.io HTTPRoutes and GRPCRoutes, sluice.dev TrafficPolicies and
//! networking.istio.io ServiceEntries), and that a test scripts: add, modify and delete objects,
//! emit bookmarks, expire history so that the next watch gets `410 Gone` and must relist, cut
//! every watch connection.
//!
//! What it implements, as the real server does:
//!
//! - One global, increasing `resourceVersion` (etcd's revision) stamped on every change; lists
//!   carry the revision they were taken at in `metadata.resourceVersion`.
//! - LIST with `limit`/`continue` pagination, `fieldSelector` (`=`, `==`, `!=`, on the field
//!   labels the real server supports for each resource, e.g. `spec.nodeName` for pods; other
//!   fields are a 400 as there) and `labelSelector` (`k=v`, `k!=v`, `k`, `!k`). Items of the
//!   built-in kinds come without `apiVersion`/`kind`, as from the real server.
//! - WATCH (`watch=true`/`1`) from `resourceVersion`: the changes after it, then live changes,
//!   as newline-delimited JSON events in a chunked response (ADDED, MODIFIED, DELETED; with
//!   selectors, an object that starts or stops matching is ADDED or DELETED). Without a
//!   resourceVersion (or "0"), the current objects first, as ADDED. `allowWatchBookmarks`
//!   enables BOOKMARK events; `timeoutSeconds` ends the stream cleanly. A resourceVersion older
//!   than the retained history gets an ERROR event carrying a 410 (Expired) Status in a 200
//!   response, which is what kube-apiserver sends.
//! - Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>`; a resource
//!   that is "not installed" (a CRD) is a 404 and is missing from discovery.
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: reviews of ServiceAccount tokens the
//!   test minted ([`FakeApiServer::mint_token`]), bound to a node and/or a pod, answered as the
//!   real ServiceAccount token authenticator answers them (see [`tokens`]). The caller itself is
//!   not authenticated or authorized (no RBAC here): `deploy/ca.yaml` is checked for the
//!   permission by `tests/tests/deploy.rs` instead.
//!
//! Objects are stored as given (JSON shaped like real objects, see [`objects`]) with the fields
//! the server owns filled in: `resourceVersion`, `uid`, `creationTimestamp`.
//!
//! The server runs on a tokio runtime of its own (one worker thread) in the test process; the
//! test calls its methods directly. [`FakeApiServer::start_in_netns`] binds the listening socket
//! inside a network namespace (a socket belongs to the namespace it was created in, whichever
//! thread uses it later), so a sluice running in a simulated node's namespace reaches it at
//! `http://127.0.0.1:<port>` while the test scripts it from the outside.

mod http;
pub mod objects;
pub mod tokens;

pub use tokens::{TokenReviewRecord, TokenSpec};

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpStream,
    sync::mpsc,
};

use crate::{netns, util};

/// The resources the fake server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Namespaces,
    Pods,
    Services,
    EndpointSlices,
    AuthorizationPolicies,
    HttpRoutes,
    GrpcRoutes,
    TrafficPolicies,
    ServiceEntries,
    VirtualServices,
    PeerAuthentications,
    RequestAuthentications,
    DestinationRules,
}

struct Info {
    group: &'static str,
    /// Versions served, preferred first (all with the same schema here).
    versions: &'static [&'static str],
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Built-in kinds are listed without apiVersion/kind per item; custom resources with.
    builtin: bool,
    /// Field labels the real server accepts in a fieldSelector (besides metadata.name and,
    /// for namespaced kinds, metadata.namespace).
    field_labels: &'static [&'static str],
    short_names: &'static [&'static str],
}

impl Resource {
    pub const ALL: [Resource; 13] = [
        Resource::Namespaces,
        Resource::Pods,
        Resource::Services,
        Resource::EndpointSlices,
        Resource::AuthorizationPolicies,
        Resource::HttpRoutes,
        Resource::GrpcRoutes,
        Resource::TrafficPolicies,
        Resource::ServiceEntries,
        Resource::VirtualServices,
        Resource::PeerAuthentications,
        Resource::RequestAuthentications,
        Resource::DestinationRules,
    ];

    /// The custom resources: a cluster may not have their CRDs installed.
    pub const CRDS: [Resource; 9] = [
        Resource::AuthorizationPolicies,
        Resource::HttpRoutes,
        Resource::GrpcRoutes,
        Resource::TrafficPolicies,
        Resource::ServiceEntries,
        Resource::VirtualServices,
        Resource::PeerAuthentications,
        Resource::RequestAuthentications,
        Resource::DestinationRules,
    ];

    fn info(self) -> &'static Info {
        match self {
            Resource::Namespaces => &Info {
                group: "",
                versions: &["v1"],
                plural: "namespaces",
                singular: "namespace",
                kind: "Namespace",
                namespaced: false,
                builtin: true,
                field_labels: &["status.phase"],
                short_names: &["ns"],
            },
            Resource::Pods => &Info {
                group: "",
                versions: &["v1"],
                plural: "pods",
                singular: "pod",
                kind: "Pod",
                namespaced: true,
                builtin: true,
                field_labels: &[
                    "spec.nodeName",
                    "spec.restartPolicy",
                    "spec.schedulerName",
                    "spec.serviceAccountName",
                    "spec.hostNetwork",
                    "status.phase",
                    "status.podIP",
                    "status.nominatedNodeName",
                ],
                short_names: &["po"],
            },
            Resource::Services => &Info {
                group: "",
                versions: &["v1"],
                plural: "services",
                singular: "service",
                kind: "Service",
                namespaced: true,
                builtin: true,
                field_labels: &["spec.clusterIP", "spec.type"],
                short_names: &["svc"],
            },
            Resource::EndpointSlices => &Info {
                group: "discovery.k8s.io",
                versions: &["v1"],
                plural: "endpointslices",
                singular: "endpointslice",
                kind: "EndpointSlice",
                namespaced: true,
                builtin: true,
                field_labels: &[],
                short_names: &[],
            },
            Resource::AuthorizationPolicies => &Info {
                group: "security.istio.io",
                versions: &["v1", "v1beta1"],
                plural: "authorizationpolicies",
                singular: "authorizationpolicy",
                kind: "AuthorizationPolicy",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &["ap"],
            },
            Resource::PeerAuthentications => &Info {
                group: "security.istio.io",
                versions: &["v1", "v1beta1"],
                plural: "peerauthentications",
                singular: "peerauthentication",
                kind: "PeerAuthentication",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &["pa"],
            },
            Resource::RequestAuthentications => &Info {
                group: "security.istio.io",
                versions: &["v1", "v1beta1"],
                plural: "requestauthentications",
                singular: "requestauthentication",
                kind: "RequestAuthentication",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &["ra"],
            },
            // The Gateway API's standard channel (v1.1 and later): HTTPRoute is still served at
            // the deprecated v1beta1 too; GRPCRoute only at v1.
            Resource::HttpRoutes => &Info {
                group: "gateway.networking.k8s.io",
                versions: &["v1", "v1beta1"],
                plural: "httproutes",
                singular: "httproute",
                kind: "HTTPRoute",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &[],
            },
            Resource::GrpcRoutes => &Info {
                group: "gateway.networking.k8s.io",
                versions: &["v1"],
                plural: "grpcroutes",
                singular: "grpcroute",
                kind: "GRPCRoute",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &[],
            },
            // sluice's own CRD (deploy/crds/).
            Resource::TrafficPolicies => &Info {
                group: "sluice.dev",
                versions: &["v1alpha1"],
                plural: "trafficpolicies",
                singular: "trafficpolicy",
                kind: "TrafficPolicy",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &["tp"],
            },
            // Istio 1.22 and later serve ServiceEntry at v1 and the older v1beta1 (and
            // v1alpha3, which sluice does not read).
            Resource::ServiceEntries => &Info {
                group: "networking.istio.io",
                versions: &["v1", "v1beta1"],
                plural: "serviceentries",
                singular: "serviceentry",
                kind: "ServiceEntry",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &["se"],
            },
            // Istio serves VirtualService at v1, v1beta1 and v1alpha3 with one schema.
            Resource::VirtualServices => &Info {
                group: "networking.istio.io",
                versions: &["v1", "v1beta1", "v1alpha3"],
                plural: "virtualservices",
                singular: "virtualservice",
                kind: "VirtualService",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &["vs"],
            },
            // Istio serves DestinationRule at v1, v1beta1 and v1alpha3 with one schema.
            Resource::DestinationRules => &Info {
                group: "networking.istio.io",
                versions: &["v1", "v1beta1", "v1alpha3"],
                plural: "destinationrules",
                singular: "destinationrule",
                kind: "DestinationRule",
                namespaced: true,
                builtin: false,
                field_labels: &[],
                short_names: &["dr"],
            },
        }
    }

    /// The resource that serves objects of `kind`.
    pub fn of_kind(kind: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.info().kind == kind)
    }

    pub fn kind(self) -> &'static str {
        self.info().kind
    }

    fn api_version(self, version: &str) -> String {
        match self.info().group {
            "" => version.to_string(),
            g => format!("{g}/{version}"),
        }
    }
}

/// Counters per resource, to check what a client did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// LIST requests (each page counts; so do 404s of a resource that is not installed).
    pub lists: u64,
    /// WATCH requests.
    pub watches: u64,
    /// Watches open right now.
    pub open_watches: usize,
    /// Watches answered or ended with 410 Gone.
    pub gone: u64,
    /// BOOKMARK events sent.
    pub bookmarks: u64,
    /// Field selectors seen on LIST and WATCH requests.
    pub field_selectors: BTreeSet<String>,
}

/// What a watch connection is told to write next.
enum Frame {
    /// A watch event (`{"type": ..., "object": ...}`).
    Event(Value),
    /// An ERROR event with a 410 Status, then the clean end of the stream.
    Gone(Value),
    /// Close the connection without finishing the response.
    Cut,
}

struct OpenWatch {
    id: u64,
    resource: Resource,
    version: String,
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Frame>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

struct Change {
    rv: u64,
    kind: ChangeType,
    /// The new state (for a deletion: the last state, stamped with the deletion's revision).
    object: Value,
    /// The state before (to tell whether a filtered watch sees an ADDED, MODIFIED or DELETED).
    prev: Option<Value>,
}

#[derive(Default)]
struct Res {
    installed: bool,
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    /// Watching from a resourceVersion older than this is answered 410 Gone.
    compacted: u64,
    stats: Stats,
}

struct State {
    rv: u64,
    res: BTreeMap<Resource, Res>,
    watches: Vec<OpenWatch>,
    next_watch: u64,
    /// Every request's method and target, in order.
    requests: Vec<String>,
    /// Minted ServiceAccount tokens and the reviews of them.
    tokens: tokens::Tokens,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take the server down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake API server. Dropping it stops it and closes every connection.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// Taken by [`FakeApiServer::shutdown`] (or on drop).
    rt: Mutex<Option<tokio::runtime::Runtime>>,
}

impl FakeApiServer {
    /// Serves on `listener` (already bound).
    pub fn start(listener: std::net::TcpListener) -> Result<FakeApiServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .context("starting the fake API server's runtime")?;
        let mut res = BTreeMap::new();
        for r in Resource::ALL {
            res.insert(
                r,
                Res {
                    installed: true,
                    ..Res::default()
                },
            );
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                res,
                watches: Vec::new(),
                next_watch: 1,
                requests: Vec::new(),
                tokens: tokens::Tokens::default(),
            }),
        });
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let s = shared.clone();
        rt.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_connection(s.clone(), stream));
                    }
                    Err(e) => {
                        eprintln!("fake-apiserver: accept failed: {e}");
                        return;
                    }
                }
            }
        });
        Ok(FakeApiServer {
            shared,
            addr,
            rt: Mutex::new(Some(rt)),
        })
    }

    /// Binds `addr` inside network namespace `netns` and serves there (a control-plane node's
    /// API server, reachable from the other nodes at that address).
    pub fn start_in_netns_at(netns: &str, addr: SocketAddr) -> Result<FakeApiServer> {
        let listener = netns::run_in(netns, || {
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the fake API server to {addr} in netns {netns}"))
        })?;
        FakeApiServer::start(listener)
    }

    /// Stops serving now: closes the listener and every connection (also done on drop). Every
    /// later request is refused.
    pub fn shutdown(&self) {
        let rt = self.rt.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(rt) = rt {
            rt.shutdown_background();
        }
    }

    /// Binds 127.0.0.1 (a free port) inside network namespace `netns` and serves there.
    pub fn start_in_netns(netns: &str) -> Result<FakeApiServer> {
        let listener = netns::run_in(netns, || {
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the fake API server")
        })?;
        FakeApiServer::start(listener)
    }

    /// Binds 127.0.0.1 (a free port) in this process's network namespace.
    pub fn start_local() -> Result<FakeApiServer> {
        FakeApiServer::start(std::net::TcpListener::bind("127.0.0.1:0")?)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`: what `sluice run --kube-api` gets.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current resourceVersion (the last change's).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Creates or replaces an object (by kind, namespace and name): open watches get ADDED or
    /// MODIFIED. Returns the object as stored (with resourceVersion, uid, creationTimestamp).
    pub fn apply(&self, object: Value) -> Result<Value> {
        let mut st = self.shared.lock();
        apply_locked(&mut st, object, true)
    }

    /// Deletes an object: open watches get DELETED. Errors if there is no such object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let mut st = self.shared.lock();
        delete_locked(&mut st, kind, namespace, name, true)
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = Resource::of_kind(kind)?;
        let ns = if r.info().namespaced { namespace } else { "" };
        self.shared.lock().res[&r]
            .objects
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch of `resource` that
    /// asked for bookmarks (`allowWatchBookmarks=true`). Returns how many were sent.
    pub fn bookmark(&self, resource: Resource) -> usize {
        let mut st = self.shared.lock();
        let rv = st.rv;
        let mut sent = 0;
        for w in st
            .watches
            .iter()
            .filter(|w| w.resource == resource && w.bookmarks)
        {
            let object = bookmark_object(resource, &w.version, rv);
            if w.tx
                .send(Frame::Event(json!({"type": "BOOKMARK", "object": object})))
                .is_ok()
            {
                sent += 1;
            }
        }
        st.res
            .get_mut(&resource)
            .expect("every resource has state")
            .stats
            .bookmarks += sent as u64;
        sent
    }

    /// Forgets the history of `resource` up to now, as etcd compaction does: a watch that later
    /// resumes from an older resourceVersion gets 410 Gone. Open watches are not affected.
    pub fn compact(&self, resource: Resource) {
        let mut st = self.shared.lock();
        let rv = st.rv;
        let res = st.res.get_mut(&resource).expect("every resource has state");
        res.history.clear();
        res.compacted = rv;
    }

    /// History expires while clients are behind: `changes` are applied without any open watch
    /// seeing them, the history of `resource` is compacted past them, and every open watch of
    /// `resource` gets an ERROR event with a 410 (Expired) Status and ends. A client learns of
    /// `changes` only by relisting. Returns how many watches were expired.
    pub fn expire(
        &self,
        resource: Resource,
        changes: impl FnOnce(&mut Unseen<'_>) -> Result<()>,
    ) -> Result<usize> {
        let mut st = self.shared.lock();
        changes(&mut Unseen {
            state: &mut st,
            resource,
        })?;
        let rv = st.rv;
        let res = st.res.get_mut(&resource).expect("every resource has state");
        res.history.clear();
        res.compacted = rv;
        let mut expired = 0;
        let watches = std::mem::take(&mut st.watches);
        for w in watches {
            if w.resource == resource {
                let status = gone_status(rv.saturating_sub(1), rv);
                let _ = w.tx.send(Frame::Gone(status));
                expired += 1;
            } else {
                st.watches.push(w);
            }
        }
        st.res
            .get_mut(&resource)
            .expect("every resource has state")
            .stats
            .gone += expired as u64;
        Ok(expired)
    }

    /// Cuts every open watch connection (no end of the response, the socket just closes), as a
    /// restarting API server or an idle-timeout in a load balancer does. Returns how many.
    pub fn drop_watches(&self) -> usize {
        let mut st = self.shared.lock();
        let watches = std::mem::take(&mut st.watches);
        let n = watches.len();
        for w in watches {
            let _ = w.tx.send(Frame::Cut);
        }
        n
    }

    /// Installs or removes a resource (for a CRD: whether it is installed). A resource that is
    /// not installed answers 404 and is absent from discovery; removing one ends its watches.
    pub fn set_installed(&self, resource: Resource, installed: bool) {
        let mut st = self.shared.lock();
        st.res
            .get_mut(&resource)
            .expect("every resource has state")
            .installed = installed;
        if !installed {
            let watches = std::mem::take(&mut st.watches);
            for w in watches {
                if w.resource == resource {
                    let _ = w.tx.send(Frame::Cut);
                } else {
                    st.watches.push(w);
                }
            }
        }
    }

    pub fn stats(&self, resource: Resource) -> Stats {
        let st = self.shared.lock();
        let mut stats = st.res[&resource].stats.clone();
        stats.open_watches = st.watches.iter().filter(|w| w.resource == resource).count();
        stats
    }

    /// Every request so far, as `GET /api/v1/pods?watch=true&...` or
    /// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Mints a ServiceAccount token as the kubelet projects one: an opaque random string that a
    /// TokenReview authenticates as `spec` says (see [`tokens`]).
    pub fn mint_token(&self, spec: TokenSpec) -> Result<String> {
        self.shared.lock().tokens.mint(spec)
    }

    /// Makes `token` expired (past the review's leeway), as if its lifetime had passed. False if
    /// the server does not know it.
    pub fn expire_token(&self, token: &str) -> bool {
        self.shared.lock().tokens.expire(token)
    }

    /// Forgets `token`: reviews no longer recognize it. False if it was unknown.
    pub fn revoke_token(&self, token: &str) -> bool {
        self.shared.lock().tokens.revoke(token)
    }

    /// The latest reviews (at most [`tokens::MAX_REVIEWS_KEPT`]), oldest first.
    pub fn token_reviews(&self) -> Vec<TokenReviewRecord> {
        self.shared.lock().tokens.reviews()
    }

    /// How many TokenReviews were answered (also those no longer kept).
    pub fn token_review_count(&self) -> u64 {
        self.shared.lock().tokens.review_count()
    }

    /// Waits until `pred` holds for the stats of `resource` (polling, up to `timeout`).
    pub fn wait_stats(
        &self,
        resource: Resource,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Stats) -> bool,
    ) -> Result<Stats> {
        util::poll_until(timeout, || {
            let s = self.stats(resource);
            pred(&s).then_some(s)
        })
        .ok_or_else(|| anyhow!("fake API server: timed out after {timeout:?} waiting for {what}; {resource:?} stats: {:?}", self.stats(resource)))
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Closes the listener and every connection with it.
        self.shutdown();
    }
}

/// Changes made inside [`FakeApiServer::expire`]: stored, but never sent to a watch. Only
/// objects of the expiring resource: a change that no watch ever sees must be one that only a
/// relist can reveal.
pub struct Unseen<'a> {
    state: &'a mut State,
    resource: Resource,
}

impl Unseen<'_> {
    pub fn apply(&mut self, object: Value) -> Result<Value> {
        self.check(object["kind"].as_str().unwrap_or_default())?;
        apply_locked(self.state, object, false)
    }

    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        self.check(kind)?;
        delete_locked(self.state, kind, namespace, name, false)
    }

    fn check(&self, kind: &str) -> Result<()> {
        if Resource::of_kind(kind) != Some(self.resource) {
            bail!(
                "an unseen change must be to {} (the expiring resource), not to a {kind}",
                self.resource.info().plural
            );
        }
        Ok(())
    }
}

fn apply_locked(st: &mut State, mut object: Value, notify: bool) -> Result<Value> {
    let kind = object["kind"]
        .as_str()
        .ok_or_else(|| anyhow!("object without kind: {object}"))?;
    let resource = Resource::of_kind(kind)
        .ok_or_else(|| anyhow!("the fake API server does not serve kind {kind}"))?;
    let info = resource.info();
    let name = object["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("object without metadata.name"))?
        .to_string();
    let namespace = if info.namespaced {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        object["metadata"]["namespace"] = json!(ns);
        ns
    } else {
        String::new()
    };
    if !st.res[&resource].installed {
        bail!("{} are not served (not installed)", info.plural);
    }
    st.rv += 1;
    let rv = st.rv;
    let key = (namespace, name);
    let prev = st.res[&resource].objects.get(&key).cloned();
    let meta = object["metadata"]
        .as_object_mut()
        .ok_or_else(|| anyhow!("metadata is not an object"))?;
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    let keep = |field: &str| {
        prev.as_ref()
            .and_then(|p| p["metadata"].get(field))
            .cloned()
    };
    // The server owns these: kept from the stored object, else assigned now.
    let uid = match keep("uid").or_else(|| meta.get("uid").cloned()) {
        Some(u) => u,
        None => json!(util::uuid_v4()?),
    };
    meta.insert("uid".into(), uid);
    let created = keep("creationTimestamp")
        .or_else(|| meta.get("creationTimestamp").cloned())
        .unwrap_or_else(|| json!(rfc3339(SystemTime::now())));
    meta.insert("creationTimestamp".into(), created);
    if let Some(generation) = keep("generation").and_then(|g| g.as_i64()) {
        let spec_changed = prev
            .as_ref()
            .is_some_and(|p| p.get("spec") != object.get("spec"));
        object["metadata"]["generation"] = json!(if spec_changed {
            generation + 1
        } else {
            generation
        });
    } else if !info.builtin || resource == Resource::EndpointSlices {
        object["metadata"]["generation"] = json!(1);
    }
    let kind = if prev.is_some() {
        ChangeType::Modified
    } else {
        ChangeType::Added
    };
    record(
        st,
        resource,
        Change {
            rv,
            kind,
            object: object.clone(),
            prev,
        },
        notify,
    );
    st.res
        .get_mut(&resource)
        .expect("every resource has state")
        .objects
        .insert(key, object.clone());
    Ok(object)
}

fn delete_locked(
    st: &mut State,
    kind: &str,
    namespace: &str,
    name: &str,
    notify: bool,
) -> Result<()> {
    let resource = Resource::of_kind(kind)
        .ok_or_else(|| anyhow!("the fake API server does not serve kind {kind}"))?;
    let ns = if resource.info().namespaced {
        namespace
    } else {
        ""
    };
    let key = (ns.to_string(), name.to_string());
    let Some(mut last) = st
        .res
        .get_mut(&resource)
        .expect("every resource has state")
        .objects
        .remove(&key)
    else {
        bail!("{kind} {ns}/{name} does not exist");
    };
    st.rv += 1;
    let rv = st.rv;
    // A DELETED event carries the object's last state at the deletion's revision.
    last["metadata"]["resourceVersion"] = json!(rv.to_string());
    let prev = Some(last.clone());
    record(
        st,
        resource,
        Change {
            rv,
            kind: ChangeType::Deleted,
            object: last,
            prev,
        },
        notify,
    );
    Ok(())
}

/// Appends a change to the history and, if `notify`, sends it to every open watch it concerns.
fn record(st: &mut State, resource: Resource, change: Change, notify: bool) {
    if notify {
        for w in st.watches.iter().filter(|w| w.resource == resource) {
            if let Some(event) = event_for(w.resource, &w.version, &w.filter, &change) {
                let _ = w.tx.send(Frame::Event(event));
            }
        }
    }
    st.res
        .get_mut(&resource)
        .expect("every resource has state")
        .history
        .push(change);
}

/// The event a watch with `filter` sees for `change`, if any.
fn event_for(resource: Resource, version: &str, filter: &Filter, change: &Change) -> Option<Value> {
    let before = change.prev.as_ref().is_some_and(|p| filter.matches(p));
    let now = filter.matches(&change.object);
    let kind = match change.kind {
        ChangeType::Deleted => before.then_some("DELETED")?,
        _ => match (before, now) {
            (true, true) => "MODIFIED",
            (false, true) => "ADDED",
            // Stopped matching: for this watch the object is gone.
            (true, false) => "DELETED",
            (false, false) => return None,
        },
    };
    Some(json!({"type": kind, "object": with_version(resource, version, change.object.clone())}))
}

/// The object as served at `version` (custom resources carry the version they were read at).
fn with_version(resource: Resource, version: &str, mut object: Value) -> Value {
    object["apiVersion"] = json!(resource.api_version(version));
    object["kind"] = json!(resource.info().kind);
    object
}

fn bookmark_object(resource: Resource, version: &str, rv: u64) -> Value {
    // What kube-apiserver sends: an empty object of the kind with only the resourceVersion.
    let mut object = json!({
        "kind": resource.info().kind,
        "apiVersion": resource.api_version(version),
        "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null},
    });
    if resource == Resource::Pods {
        object["spec"] = json!({"containers": null});
        object["status"] = json!({});
    }
    object
}

fn gone_status(requested: u64, current: u64) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {requested} ({current})"),
        "reason": "Expired",
        "code": 410,
    })
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code,
    })
}

/// A namespace restriction (from the path) plus field and label selectors.
#[derive(Debug, Clone, Default)]
struct Filter {
    namespace: Option<String>,
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

impl Filter {
    fn parse(
        resource: Resource,
        namespace: Option<String>,
        query: &BTreeMap<String, String>,
    ) -> Result<Filter, Value> {
        let info = resource.info();
        let mut fields = Vec::new();
        if let Some(sel) = query.get("fieldSelector").filter(|s| !s.is_empty()) {
            for term in sel.split(',') {
                let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                    (k, false, v)
                } else if let Some((k, v)) = term.split_once("==") {
                    (k, true, v)
                } else if let Some((k, v)) = term.split_once('=') {
                    (k, true, v)
                } else {
                    return Err(status(
                        400,
                        "BadRequest",
                        format!("invalid field selector: {term:?}"),
                    ));
                };
                let key = key.trim();
                let supported = key == "metadata.name"
                    || (info.namespaced && key == "metadata.namespace")
                    || info.field_labels.contains(&key);
                if !supported {
                    return Err(status(
                        400,
                        "BadRequest",
                        format!("field label not supported: {key}"),
                    ));
                }
                fields.push((key.to_string(), eq, value.trim().to_string()));
            }
        }
        let mut labels = Vec::new();
        if let Some(sel) = query.get("labelSelector").filter(|s| !s.is_empty()) {
            for term in sel.split(',') {
                let term = term.trim();
                let req = if let Some((k, v)) = term.split_once("!=") {
                    LabelReq::Ne(k.trim().into(), v.trim().into())
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    LabelReq::Eq(k.trim().into(), v.trim().into())
                } else if let Some(k) = term.strip_prefix('!') {
                    LabelReq::NotExists(k.trim().into())
                } else if !term.contains(' ') && !term.contains('(') {
                    LabelReq::Exists(term.into())
                } else {
                    return Err(status(
                        400,
                        "BadRequest",
                        format!("unsupported label selector {term:?} (fake API server)"),
                    ));
                };
                labels.push(req);
            }
        }
        Ok(Filter {
            namespace,
            fields,
            labels,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if object["metadata"]["namespace"].as_str() != Some(ns) {
                return false;
            }
        }
        let field_ok = self.fields.iter().all(|(path, eq, want)| {
            let got = path
                .split('.')
                .try_fold(object, |v, k| v.get(k))
                .map(field_value)
                .unwrap_or_default();
            (got == *want) == *eq
        });
        let labels = &object["metadata"]["labels"];
        let label_ok = self.labels.iter().all(|req| match req {
            LabelReq::Eq(k, v) => labels[k].as_str() == Some(v),
            LabelReq::Ne(k, v) => labels[k].as_str() != Some(v),
            LabelReq::Exists(k) => labels.get(k).is_some(),
            LabelReq::NotExists(k) => labels.get(k).is_none(),
        });
        field_ok && label_ok
    }
}

/// A field as a field selector compares it: strings as they are, other scalars as text.
fn field_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// What a request path names.
enum Route {
    /// `/apis/authentication.k8s.io/v1/tokenreviews` (create only).
    TokenReviews,
    Version,
    CoreVersions,
    Groups,
    ResourceList {
        group: String,
        version: String,
    },
    Collection {
        resource: Resource,
        version: String,
        namespace: Option<String>,
    },
    Object {
        resource: Resource,
        version: String,
        namespace: Option<String>,
        name: String,
    },
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        Resource::ALL.into_iter().find(|r| {
            let i = r.info();
            i.group == group && i.plural == plural && i.versions.contains(&version)
        })
    };
    if group == AUTHENTICATION_GROUP && version == "v1" && rest == ["tokenreviews"] {
        return Some(Route::TokenReviews);
    }
    let v = version.to_string();
    match rest {
        [] => Some(Route::ResourceList {
            group: group.into(),
            version: v,
        }),
        ["namespaces", ns, plural] if find(plural).is_some_and(|r| r.info().namespaced) => {
            Some(Route::Collection {
                resource: find(plural)?,
                version: v,
                namespace: Some(ns.to_string()),
            })
        }
        ["namespaces", ns, plural, name] if find(plural).is_some_and(|r| r.info().namespaced) => {
            Some(Route::Object {
                resource: find(plural)?,
                version: v,
                namespace: Some(ns.to_string()),
                name: name.to_string(),
            })
        }
        [plural] => Some(Route::Collection {
            resource: find(plural)?,
            version: v,
            namespace: None,
        }),
        [plural, name] => {
            let r = find(plural)?;
            (!r.info().namespaced).then(|| Route::Object {
                resource: r,
                version: v,
                namespace: None,
                name: name.to_string(),
            })
        }
        _ => None,
    }
}

/// What handling a request produced.
enum Reply {
    Json(u16, Value),
    Watch {
        id: u64,
        initial: Vec<Frame>,
        rx: mpsc::UnboundedReceiver<Frame>,
        timeout: Option<Duration>,
    },
}

/// The API group of TokenReview.
const AUTHENTICATION_GROUP: &str = "authentication.k8s.io";

fn handle(shared: &Shared, req: &http::Request) -> Reply {
    let mut st = shared.lock();
    st.requests.push(format!("{} {}", req.method, req.target));
    let route = route(&req.path);
    if matches!(route, Some(Route::TokenReviews)) {
        return token_review(&mut st, req);
    }
    if req.method != "GET" {
        return Reply::Json(
            405,
            status(
                405,
                "MethodNotAllowed",
                format!(
                    "the fake API server only serves GET here (and POST on tokenreviews), not {}",
                    req.method
                ),
            ),
        );
    }
    let not_found = || {
        Reply::Json(
            404,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        )
    };
    let Some(route) = route else {
        return not_found();
    };
    match route {
        Route::TokenReviews => unreachable!("answered above"),
        Route::Version => Reply::Json(
            200,
            json!({
                "major": "1", "minor": "35", "emulationMajor": "1", "emulationMinor": "35",
                "minCompatibilityMajor": "1", "minCompatibilityMinor": "34",
                "gitVersion": "v1.35.1", "gitCommit": "8c3d3c7e1f1f0ae8e7c1a6d1d1c2b3a4f5e6d7c8", "gitTreeState": "clean",
                "buildDate": "2026-02-10T12:00:00Z", "goVersion": "go1.25.6", "compiler": "gc", "platform": "linux/amd64",
            }),
        ),
        Route::CoreVersions => Reply::Json(
            200,
            json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "10.0.0.1:6443"}],
            }),
        ),
        Route::Groups => {
            // A group's versions are those of its installed resources, preferred first.
            let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            groups.insert(AUTHENTICATION_GROUP, vec!["v1"]);
            for r in Resource::ALL {
                let i = r.info();
                if !i.group.is_empty() && st.res[&r].installed {
                    let versions = groups.entry(i.group).or_default();
                    for v in i.versions {
                        if !versions.contains(v) {
                            versions.push(v);
                        }
                    }
                }
            }
            let groups: Vec<Value> = groups
                .iter()
                .map(|(group, versions)| {
                    let versions: Vec<Value> = versions
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                        .collect();
                    json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            Reply::Json(
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            )
        }
        Route::ResourceList { group, version }
            if group == AUTHENTICATION_GROUP && version == "v1" =>
        {
            Reply::Json(
                200,
                json!({
                    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "authentication.k8s.io/v1",
                    "resources": [{"name": "tokenreviews", "singularName": "tokenreview", "namespaced": false,
                                   "kind": "TokenReview", "verbs": ["create"]}],
                }),
            )
        }
        Route::ResourceList { group, version } => {
            let resources: Vec<Value> = Resource::ALL
                .into_iter()
                .filter(|r| r.info().group == group && r.info().versions.contains(&version.as_str()) && st.res[r].installed)
                .map(|r| {
                    let i = r.info();
                    json!({
                        "name": i.plural, "singularName": i.singular, "namespaced": i.namespaced, "kind": i.kind,
                        "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                        "shortNames": i.short_names,
                    })
                })
                .collect();
            if resources.is_empty() {
                return not_found();
            }
            let gv = if group.is_empty() {
                version
            } else {
                format!("{group}/{version}")
            };
            Reply::Json(
                200,
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
            )
        }
        Route::Object {
            resource,
            version,
            namespace,
            name,
        } => {
            if !st.res[&resource].installed {
                return not_found();
            }
            let key = (namespace.unwrap_or_default(), name.clone());
            match st.res[&resource].objects.get(&key) {
                Some(o) => Reply::Json(200, with_version(resource, &version, o.clone())),
                None => Reply::Json(
                    404,
                    status(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", resource.info().plural),
                    ),
                ),
            }
        }
        Route::Collection {
            resource,
            version,
            namespace,
        } => {
            let watch = req
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1");
            let res = st.res.get_mut(&resource).expect("every resource has state");
            if !res.installed {
                // Still an attempt worth counting: a client retrying a missing CRD shows here.
                if watch {
                    res.stats.watches += 1;
                } else {
                    res.stats.lists += 1;
                }
                return not_found();
            }
            let filter = match Filter::parse(resource, namespace, &req.query) {
                Ok(f) => f,
                Err(s) => return Reply::Json(400, s),
            };
            if let Some(fs) = req.query.get("fieldSelector") {
                st.res
                    .get_mut(&resource)
                    .expect("every resource has state")
                    .stats
                    .field_selectors
                    .insert(fs.clone());
            }
            if watch {
                start_watch(&mut st, resource, version, filter, &req.query)
            } else {
                list(&mut st, resource, &version, &filter, &req.query)
            }
        }
    }
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: 201 with the review's status, as
/// kube-apiserver answers (the request's spec echoed back, token included).
fn token_review(st: &mut State, req: &http::Request) -> Reply {
    if req.method != "POST" {
        return Reply::Json(
            405,
            status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ),
        );
    }
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return Reply::Json(
                400,
                status(
                    400,
                    "BadRequest",
                    format!("the body of the request is not a JSON TokenReview: {e}"),
                ),
            )
        }
    };
    if body["apiVersion"] != "authentication.k8s.io/v1" || body["kind"] != "TokenReview" {
        return Reply::Json(
            400,
            status(
                400,
                "BadRequest",
                format!(
                    "expected apiVersion authentication.k8s.io/v1 and kind TokenReview, got {} {}",
                    body["apiVersion"], body["kind"]
                ),
            ),
        );
    }
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    if spec["token"].as_str().is_none_or(str::is_empty) {
        return Reply::Json(
            400,
            status(
                400,
                "BadRequest",
                "token is required for TokenReview in authentication",
            ),
        );
    }
    let State { tokens, res, .. } = st;
    let pods = &res[&Resource::Pods].objects;
    let pod_uid = |ns: &str, name: &str| {
        pods.get(&(ns.to_string(), name.to_string()))
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
    };
    match tokens.review(&spec, pod_uid) {
        Ok(review_status) => Reply::Json(
            201,
            json!({
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null},
                "spec": spec,
                "status": review_status,
            }),
        ),
        Err(e) => Reply::Json(
            500,
            status(500, "InternalError", format!("reviewing the token: {e:#}")),
        ),
    }
}

fn list(
    st: &mut State,
    resource: Resource,
    version: &str,
    filter: &Filter,
    query: &BTreeMap<String, String>,
) -> Reply {
    let info = resource.info();
    let res = st.res.get_mut(&resource).expect("every resource has state");
    res.stats.lists += 1;
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    // A continue token: the revision of the first page and the last key returned, hex-encoded.
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => (st.rv, None),
        Some(token) => match decode_continue(token) {
            Some((rv, key)) if rv >= res.compacted => (rv, Some(key)),
            Some(_) => {
                return Reply::Json(410, status(410, "Expired", "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."));
            }
            None => return Reply::Json(400, status(400, "BadRequest", "invalid continue token")),
        },
    };
    let matching: Vec<(&(String, String), &Value)> = res
        .objects
        .iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
        .filter(|(_, o)| filter.matches(o))
        .collect();
    let take = limit.unwrap_or(usize::MAX).min(matching.len());
    let remaining = matching.len() - take;
    let items: Vec<Value> = matching[..take]
        .iter()
        .map(|(_, o)| {
            let mut o = with_version(resource, version, (*o).clone());
            if info.builtin {
                let m = o.as_object_mut().expect("stored objects are objects");
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if remaining > 0 {
        let last = matching[take - 1].0;
        metadata["continue"] = json!(encode_continue(list_rv, last));
        metadata["remainingItemCount"] = json!(remaining);
    }
    Reply::Json(
        200,
        json!({
            "kind": format!("{}List", info.kind),
            "apiVersion": resource.api_version(version),
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn encode_continue(rv: u64, (ns, name): &(String, String)) -> String {
    util::hex(format!("{rv}\n{ns}\n{name}").as_bytes())
}

fn decode_continue(token: &str) -> Option<(u64, (String, String))> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '\n');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, (parts.next()?.to_string(), parts.next()?.to_string())))
}

fn start_watch(
    st: &mut State,
    resource: Resource,
    version: String,
    filter: Filter,
    query: &BTreeMap<String, String>,
) -> Reply {
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let current = st.rv;
    let res = st.res.get_mut(&resource).expect("every resource has state");
    res.stats.watches += 1;
    let mut initial = Vec::new();
    match query.get("resourceVersion").map(String::as_str) {
        // "Start at most recent": the current state as ADDED events, then changes.
        None | Some("") | Some("0") => {
            for o in res.objects.values().filter(|o| filter.matches(o)) {
                initial.push(Frame::Event(
                    json!({"type": "ADDED", "object": with_version(resource, &version, o.clone())}),
                ));
            }
        }
        Some(rv) => {
            let Ok(from) = rv.parse::<u64>() else {
                return Reply::Json(
                    400,
                    status(
                        400,
                        "BadRequest",
                        format!("invalid resource version: {rv:?}"),
                    ),
                );
            };
            if from < res.compacted {
                // kube-apiserver answers 200 and an ERROR event, then ends the watch.
                res.stats.gone += 1;
                let (_tx, rx) = mpsc::unbounded_channel();
                return Reply::Watch {
                    id: 0,
                    initial: vec![Frame::Gone(gone_status(from, current))],
                    rx,
                    timeout,
                };
            }
            for change in res.history.iter().filter(|c| c.rv > from) {
                if let Some(e) = event_for(resource, &version, &filter, change) {
                    initial.push(Frame::Event(e));
                }
            }
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let id = st.next_watch;
    st.next_watch += 1;
    st.watches.push(OpenWatch {
        id,
        resource,
        version,
        filter,
        bookmarks,
        tx,
    });
    Reply::Watch {
        id,
        initial,
        rx,
        timeout,
    }
}

/// How a watch response ended.
enum WatchEnd {
    /// Finished (terminating chunk written): the connection may carry more requests.
    Clean,
    /// Cut, or the client went away: close the connection.
    Closed,
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let req = match http::read_request(&mut reader).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                eprintln!("fake-apiserver: bad request: {e:#}");
                return;
            }
        };
        let audit_id = util::uuid_v4().unwrap_or_default();
        let reply = handle(&shared, &req);
        let ok = match reply {
            Reply::Json(code, body) => {
                let body = serde_json::to_vec(&body).expect("JSON values serialize");
                http::write_json(&mut write, code, &body, &audit_id)
                    .await
                    .is_ok()
            }
            Reply::Watch {
                id,
                initial,
                rx,
                timeout,
            } => {
                let end =
                    serve_watch(&mut reader, &mut write, &audit_id, initial, rx, timeout).await;
                shared.lock().watches.retain(|w| w.id != id);
                matches!(end, WatchEnd::Clean)
            }
        };
        if !ok || req.close {
            return; // dropping both halves closes the socket
        }
    }
}

async fn serve_watch(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    audit_id: &str,
    initial: Vec<Frame>,
    mut rx: mpsc::UnboundedReceiver<Frame>,
    timeout: Option<Duration>,
) -> WatchEnd {
    if http::write_stream_head(write, audit_id).await.is_err() {
        return WatchEnd::Closed;
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut initial = initial.into_iter();
    loop {
        let frame = match initial.next() {
            Some(f) => f,
            None => tokio::select! {
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => Frame::Cut,
                },
                _ = sleep_until_opt(deadline) => {
                    // timeoutSeconds: the server ends the watch cleanly.
                    return finish(write).await;
                }
                // The client sends nothing during a watch: readable means it closed (or sent
                // garbage); either way this watch is over.
                _ = reader.fill_buf() => return WatchEnd::Closed,
            },
        };
        let line = match frame {
            Frame::Event(v) => v,
            Frame::Gone(status) => {
                let line = watch_line(&json!({"type": "ERROR", "object": status}));
                if http::write_chunk(write, &line).await.is_err() {
                    return WatchEnd::Closed;
                }
                return finish(write).await;
            }
            Frame::Cut => return WatchEnd::Closed,
        };
        if http::write_chunk(write, &watch_line(&line)).await.is_err() {
            return WatchEnd::Closed;
        }
    }
}

/// A watch event line as kube-apiserver writes it: `type` before `object` (the field order of
/// Go's `metav1.WatchEvent`; a `serde_json::Map` would sort `object` first). Clients rely on it
/// to decode the object as it streams instead of buffering it first.
fn watch_line(event: &Value) -> Vec<u8> {
    let mut line = br#"{"type":"#.to_vec();
    serde_json::to_writer(&mut line, &event["type"]).expect("JSON values serialize");
    line.extend_from_slice(br#","object":"#);
    serde_json::to_writer(&mut line, &event["object"]).expect("JSON values serialize");
    line.extend_from_slice(b"}\n");
    line
}

async fn finish(write: &mut tokio::net::tcp::OwnedWriteHalf) -> WatchEnd {
    match http::write_last_chunk(write).await {
        Ok(()) => WatchEnd::Clean,
        Err(_) => WatchEnd::Closed,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// RFC 3339 in UTC with seconds, as the API writes timestamps.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
