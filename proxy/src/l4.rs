//! The outbound data path: accept on a pod's outbound listener, find where the connection was
//! going, detect its protocol, and hand HTTP to the L7 path ([`crate::l7`]); anything else is
//! forwarded here at L4: pick an endpoint, connect from inside the pod's network namespace, and
//! forward bytes both ways with backpressure, half-close and reset propagation.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpListener, TcpStream,
    },
};
use tracing::{debug, info, warn};

use crate::{
    conns::{ConnRegistry, Direction, NewConn, PodStats},
    discovery::{traffic::OutboundPolicy, Model},
    identity::{CertManager, SpiffeId},
    l7::{self, detect, server::ConnCtx, upstream::Wire, Protocol, L7},
    lograte,
    netns::PodNetns,
    redirect::Redirector,
    routing::{self, RoundRobin},
    transport::{pump, HbonePool, PoolKey, TunnelError},
};

/// Per-direction copy buffer. Allocated only once a connection has data to move, so idle
/// connections cost no buffer memory.
const COPY_BUF: usize = 16 * 1024;

/// Everything the data path knows about the pod a listener belongs to.
pub struct PodContext {
    pub pod_id: u32,
    /// "namespace/name"
    pub key: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub ip: IpAddr,
    /// Every address of the pod: its cluster addresses (IPv4 and IPv6 in a dual-stack cluster)
    /// and its IPv6 link-local ones.
    pub ips: Vec<IpAddr>,
    /// The pod's SPIFFE identity.
    pub identity: SpiffeId,
    pub identity_str: Arc<str>,
    pub netns: Arc<PodNetns>,
    pub stats: Arc<PodStats>,
    /// Which families the pod's namespace delivers with the client's source address.
    pub transparent: crate::deliver::Transparent,
    /// This pod's share of the node proxy (accept rate, connections, requests in flight).
    pub limiter: Arc<l7::limits::PodLimiter>,
    /// What telemetry labels say about this pod.
    pub workload: Arc<crate::discovery::WorkloadInfo>,
    /// The pod's connection counts for admission (outbound from it, inbound to it).
    pub slots: Arc<crate::admission::PodSlots>,
}

/// Shared state of the data path (read-mostly; the control path swaps `model`).
pub struct DataPath {
    pub redirector: Arc<Redirector>,
    pub model: Arc<ArcSwap<Model>>,
    pub conns: Arc<ConnRegistry>,
    pub balancer: RoundRobin,
    pub connect_timeout: Duration,
    pub identity: Arc<CertManager>,
    pub trust_domain: String,
    /// Istio's root namespace (mesh-wide PeerAuthentication: DISABLE means no tunnel).
    pub root_namespace: Arc<str>,
    pub pool: HbonePool,
    /// Connections sent plaintext because the destination had no tunnel endpoint.
    pub tunnel_fallbacks: AtomicU64,
    /// Connections refused instead of sent plaintext: the destination had no tunnel endpoint
    /// and requires mutual TLS (STRICT).
    pub tunnel_fallbacks_refused: AtomicU64,
    /// HTTP: detection, balancing, upstream pools.
    pub l7: L7,
    /// Set when sluice starts draining: HTTP connections close gracefully (HTTP/1.1 after the
    /// response in flight, HTTP/2 with GOAWAY).
    pub draining: tokio::sync::watch::Sender<bool>,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Refuses connections to sluice's own listeners.
    pub loop_guard: Arc<crate::loopguard::LoopGuard>,
    /// Connection bounds (node-wide, per pod, per peer).
    pub admission: Arc<crate::admission::Admission>,
    /// Opaque TCP with no bytes either way for this long is closed.
    pub idle: Arc<crate::idle::IdleTimeout>,
    /// This node's pods that take connections from its other pods in-process.
    pub same_node: crate::same_node::SameNode,
}

/// Accepts connections on one of a pod's outbound listeners until the task is aborted
/// (the pod is released). Connections already accepted live on independently.
pub async fn serve_listener(listener: TcpListener, pod: Arc<PodContext>, dp: Arc<DataPath>) {
    loop {
        // One pod must not take the node proxy from the others: past its connection rate,
        // stop accepting from its listener for a moment. The excess waits in the kernel's
        // accept queue of this pod's own listener (and beyond that, the pod's SYNs are
        // dropped and retried): the pod slows itself down, nobody else does.
        if let Err(wait) = pod.limiter.accept() {
            dp.l7.limit_counters.pod_accept_paused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
            continue;
        }
        match listener.accept().await {
            Ok((stream, peer)) => {
                let permit = match dp.admission.outbound(&pod.slots) {
                    Ok(p) => p,
                    Err(refusal) => {
                        if refusal == crate::admission::Refusal::SourcePod {
                            dp.l7.limit_counters.pod_overflow.fetch_add(1, Ordering::Relaxed);
                        }
                        debug!(pod = %pod.key, %peer, limit = refusal.as_str(), "connection limit reached; resetting");
                        let _ = dp.redirector.take_original(pod.pod_id, peer);
                        reset(&stream);
                        continue;
                    }
                };
                let pod = pod.clone();
                let dp = dp.clone();
                tokio::spawn(handle(stream, peer, pod, dp, permit));
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the listener stays.
                if let Some(suppressed) = lograte::shared().allow("accept-failed", &pod.key) {
                    warn!(pod = %pod.key, error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one accepted connection; `permit`, its place within the connection bounds, is held
/// until the connection is done (an upgraded HTTP connection's bridge holds it past hyper).
async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    dp: Arc<DataPath>,
    permit: crate::admission::Permit,
) {
    let Some(orig) = dp.redirector.take_original(pod.pod_id, peer) else {
        // Someone connected to 15001 directly, not through the redirect: nothing to forward to.
        debug!(pod = %pod.key, %peer, "connection without a recorded original destination; closing");
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let hint = {
        let model = dp.model.load();
        let port = model.service_for(orig.addr.ip(), orig.addr.port()).map(|t| t.port());
        detect::hint(port, orig.addr.port(), &dp.l7.cfg.opaque_ports)
    };
    let (protocol, prefix) = detect::detect(&mut client, hint, dp.l7.cfg.detect_timeout).await;
    let counters = &dp.l7.counters;
    match protocol {
        Protocol::Http1 => counters.detected_http1.fetch_add(1, Ordering::Relaxed),
        Protocol::Http2 => counters.detected_http2.fetch_add(1, Ordering::Relaxed),
        Protocol::Opaque => counters.detected_opaque.fetch_add(1, Ordering::Relaxed),
    };
    if protocol == Protocol::Opaque {
        forward_opaque(client, prefix, peer, orig.addr, pod, dp).await;
        drop(permit);
        return;
    }
    let service = routing::resolve(&dp.model.load(), orig.addr).service;
    let guard = dp.conns.open(
        &pod.stats,
        NewConn {
            direction: Direction::Outbound,
            peer_identity: None,
            mtls: false,
            same_node: false,
            source_pod: pod.key.clone(),
            source_addr: SocketAddr::new(pod.ip, peer.port()),
            original_dst: orig.addr,
            service,
            endpoint: orig.addr,
            protocol: protocol.as_str(),
        },
    );
    let wire = if protocol == Protocol::Http2 { Wire::Http2 } else { Wire::Http1 };
    debug!(pod = %pod.key, dst = %orig.addr, protocol = protocol.as_str(), id = guard.entry.id, "serving HTTP");
    let ctx = Arc::new(ConnCtx {
        pod,
        dp,
        orig: orig.addr,
        wire,
        entry: guard.entry.clone(),
        closing: Default::default(),
        held: (permit, guard),
    });
    l7::server::serve(client, prefix, protocol, ctx).await;
}

/// Opaque TCP: one endpoint for the whole connection (round robin over a Service's ready
/// endpoints, or the destination a VirtualService tcp/tls rule chose), bytes forwarded as they
/// come, starting with what detection (and a ClientHello read for SNI) read.
async fn forward_opaque(
    mut client: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    orig: SocketAddr,
    pod: Arc<PodContext>,
    dp: Arc<DataPath>,
) {
    let (routed, prefix) = crate::stream_routes::route(&mut client, prefix, orig, &pod, &dp).await;
    let model = dp.model.load();
    let target = match routed {
        crate::stream_routes::Routed::Default => routing::resolve(&model, orig),
        crate::stream_routes::Routed::To(t) => t,
        crate::stream_routes::Routed::Refused(_) => {
            reset(&client);
            return;
        }
    };
    if target.service.is_none() && !registered(&model, orig) && model.outbound_policy(&pod.namespace) == OutboundPolicy::RegistryOnly {
        dp.l7.counters.egress_refused.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = lograte::shared().allow("egress-refused", &pod.key) {
            warn!(pod = %pod.key, dst = %orig, suppressed, "connection refused: the namespace's outbound policy is REGISTRY_ONLY and no Service or ServiceEntry declares the destination");
        }
        reset(&client);
        return;
    }
    let Some(endpoint) = dp.balancer.pick(&target) else {
        if let Some(suppressed) = lograte::shared().allow("no-endpoints", &pod.key) {
            warn!(pod = %pod.key, dst = %orig, service = ?target.service, suppressed, "no ready endpoints; resetting connection");
        }
        reset(&client);
        return;
    };
    if let Err(refused) = dp.loop_guard.check_upstream(&model, endpoint) {
        dp.loop_guard.refused(&pod.key, refused, crate::loopguard::Via::Outbound);
        reset(&client);
        return;
    }
    // An endpoint that is an enrolled pod (on any node) is reached through its HBONE port,
    // with mutual TLS carrying both pods' identities.
    let mesh_peer = mesh_identity(&model, endpoint, &dp);
    let observed = OpaqueConn {
        dest_workload: model.workload_by_ip(endpoint.ip()).cloned(),
        dest_principal: mesh_peer.as_ref().map(|p| Arc::from(p.to_string())),
        service: model.service_for(orig.ip(), orig.port()).map(|t| t.service().clone()),
        access_log: crate::telemetry::access_log_wanted(&model, &[&pod.namespace]),
        endpoint,
        start: std::time::SystemTime::now(),
        started: std::time::Instant::now(),
    };
    drop(model);

    if let Some(peer_id) = mesh_peer {
        // A pod enrolled before its identity's certificate came: the tunnel needs it. Wait for
        // it as for a slow connect, then refuse; never send plaintext to a mesh peer instead.
        if !dp.identity.await_certificate(&pod.identity, dp.connect_timeout).await {
            debug!(pod = %pod.key, dst = %orig, peer = %peer_id, identity = %pod.identity,
                "no certificate for the pod's identity yet; resetting (see `sluice certs`)");
            reset(&client);
            return;
        }
        if let Some((dest, inbound)) = dp.same_node.lookup(endpoint.ip()) {
            hand_off_opaque(client, prefix, peer, orig, &target, endpoint, &peer_id, &pod, &dp, &dest, &inbound, &observed).await;
            return;
        }
        match open_tunnel(&pod, &dp, &peer_id, endpoint, None).await {
            Ok(stream) => {
                let guard = dp.conns.open(&pod.stats, new_conn(&pod, peer, orig, &target, endpoint, Some(&peer_id), false));
                debug!(pod = %pod.key, dst = %orig, %endpoint, peer = %peer_id, id = guard.entry.id, "forwarding through tunnel");
                observed.report(&dp, &pod, &guard.entry, true, true);
                // `stream.slot`, the stream's place in its tunnel's count, drops at the end of
                // this arm: after the pump is done with both halves.
                let (sent, received) = (&guard.entry.sent, &guard.entry.received);
                let pumped = pump::tcp_h2(client, prefix, stream.send, stream.recv, sent, received);
                dp.idle.run(pumped, sent, received).await;
                observed.report(&dp, &pod, &guard.entry, true, false);
                return;
            }
            // Nobody serves the mesh at the destination (its node's sluice is down, has not
            // enrolled the pod, or has no certificate for it yet): for a PERMISSIVE
            // destination, like fail-open, do not black-hole the connection; go plaintext.
            // A STRICT one never gets plaintext (see `plaintext_fallback`). TLS and identity
            // failures never fall back.
            Err(e) if e.is_unreachable() => {
                if let Err(refused) = fallback_allowed(&dp, endpoint) {
                    refuse_fallback(&dp, &pod.key, endpoint, &peer_id, refused, &e);
                    reset(&client);
                    return;
                }
                dp.tunnel_fallbacks.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = lograte::shared().allow("tunnel-fallback", &pod.key) {
                    info!(pod = %pod.key, dst = %orig, %endpoint, peer = %peer_id, error = %e, suppressed, "no tunnel endpoint at the destination; sending plaintext");
                }
            }
            // Counted by admission; one line per connection would be the pod's to fill.
            Err(e) if e.refusal().is_some() => {
                debug!(pod = %pod.key, dst = %orig, %endpoint, error = %e, "no socket left for a new tunnel; resetting client");
                reset(&client);
                return;
            }
            Err(e) => {
                // Keyed by the failure too: each distinct TLS or identity problem of a pod is
                // logged (within the global rate), repeats of one are not.
                if let Some(suppressed) = lograte::shared().allow("tunnel-failed", &format!("{} {e}", pod.key)) {
                    warn!(pod = %pod.key, dst = %orig, %endpoint, peer = %peer_id, error = %e, suppressed, "tunnel failed; resetting client");
                }
                reset(&client);
                return;
            }
        }
    }
    // The upstream socket's unit, on the pod's behalf (its idle pooled connections make room
    // first), held as long as the socket.
    let _unit = match dp.admission.dial(&pod.slots, pod.pod_id) {
        Ok(unit) => unit,
        Err(refusal) => {
            debug!(pod = %pod.key, dst = %orig, %endpoint, limit = refusal.as_str(), "no socket left for the upstream connection; resetting client");
            reset(&client);
            return;
        }
    };
    let mut upstream = match connect(&pod.netns, endpoint, dp.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            // We already accepted the client, so the closest to "refused" we can say is a reset.
            if let Some(suppressed) = lograte::shared().allow("connect-failed", &pod.key) {
                info!(pod = %pod.key, dst = %orig, %endpoint, error = %e, suppressed, "upstream connect failed; resetting client");
            }
            reset(&client);
            return;
        }
    };
    let guard = dp.conns.open(&pod.stats, new_conn(&pod, peer, orig, &target, endpoint, None, false));
    if !prefix.is_empty() {
        if let Err(e) = upstream.write_all(&prefix).await {
            debug!(pod = %pod.key, %endpoint, error = %e, "upstream closed before the first bytes");
            reset(&client);
            return;
        }
        guard.entry.sent.fetch_add(prefix.len() as u64, Ordering::Relaxed);
    }
    debug!(pod = %pod.key, dst = %orig, %endpoint, id = guard.entry.id, "forwarding");
    observed.report(&dp, &pod, &guard.entry, false, true);
    let (sent, received) = (&guard.entry.sent, &guard.entry.received);
    dp.idle.run(forward(client, upstream, sent, received), sent, received).await;
    observed.report(&dp, &pod, &guard.entry, false, false);
}

/// An opaque connection to a pod of this node: the destination side accepts it in-process
/// (peer authentication counts the hand-off as mutual TLS; authorization with the source pod's
/// identity) and the bytes go from the client's socket straight to the application's, without
/// TLS or HTTP/2 framing. Both sides keep their registry entries and telemetry.
#[allow(clippy::too_many_arguments)]
async fn hand_off_opaque(
    client: TcpStream,
    prefix: Bytes,
    peer: SocketAddr,
    orig: SocketAddr,
    target: &routing::Target,
    endpoint: SocketAddr,
    peer_id: &SpiffeId,
    pod: &Arc<PodContext>,
    dp: &DataPath,
    dest: &Arc<PodContext>,
    inbound: &crate::inbound::Inbound,
    observed: &OpaqueConn,
) {
    let source_addr = SocketAddr::new(pod.ip, peer.port());
    let accepted = match crate::inbound::accept_local(inbound, dest, pod, source_addr, endpoint, false).await {
        Ok(a) => a,
        Err(refused) => {
            debug!(pod = %pod.key, dst = %orig, %endpoint, peer = %peer_id, reason = %refused, "same-node connection refused at the destination; resetting client");
            reset(&client);
            return;
        }
    };
    dp.same_node.handed_off();
    let guard = dp.conns.open(&pod.stats, new_conn(pod, peer, orig, target, endpoint, Some(peer_id), true));
    debug!(pod = %pod.key, dst = %orig, %endpoint, peer = %peer_id, id = guard.entry.id, "forwarding in-process to a pod of this node");
    observed.report(dp, pod, &guard.entry, true, true);
    let out = &guard.entry;
    crate::inbound::serve_local_opaque(inbound, dest, pod, accepted, source_addr, endpoint, |mut app, dest_entry| async move {
        if !prefix.is_empty() {
            if app.write_all(&prefix).await.is_err() {
                reset(&client);
                return;
            }
            out.sent.fetch_add(prefix.len() as u64, Ordering::Relaxed);
            dest_entry.sent.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        }
        // The idle timeout watches the source's counters; the destination's follow them.
        let (sent, received) = (&out.sent, &out.received);
        let (up, down) = ([sent, &dest_entry.sent], [received, &dest_entry.received]);
        dp.idle.run(forward_counted(client, app, Counted(&up), Counted(&down)), sent, received).await;
    })
    .await;
    observed.report(dp, pod, &guard.entry, true, false);
}

/// What TCP telemetry says about one opaque outbound connection.
struct OpaqueConn {
    dest_workload: Option<Arc<crate::discovery::WorkloadInfo>>,
    dest_principal: Option<Arc<str>>,
    service: Option<Arc<crate::discovery::Service>>,
    access_log: bool,
    endpoint: SocketAddr,
    start: std::time::SystemTime,
    started: std::time::Instant,
}

impl OpaqueConn {
    /// `opened`: the connection just opened; else it just closed (bytes final).
    fn report(&self, dp: &DataPath, pod: &PodContext, entry: &crate::conns::ConnEntry, mtls: bool, opened: bool) {
        use crate::telemetry::{ConnRecord, Peer, Reporter, ServiceRef};
        let rec = ConnRecord {
            reporter: Reporter::Source,
            start: self.start,
            duration: self.started.elapsed(),
            source: Peer { workload: Some(&pod.workload), principal: Some(&pod.identity_str), addr: Some(entry.source_addr) },
            destination: Peer {
                workload: self.dest_workload.as_deref(),
                principal: self.dest_principal.as_deref(),
                addr: Some(self.endpoint),
            },
            service: self.service.as_ref().map(|s| ServiceRef { namespace: &s.namespace, name: &s.name }),
            // Istio's direction: sent = server → client, received = client → server.
            sent: entry.received.load(Ordering::Relaxed),
            received: entry.sent.load(Ordering::Relaxed),
            mtls,
            response_flags: "-",
            access_log: self.access_log,
        };
        if opened {
            dp.telemetry.connection_opened(&rec);
        } else {
            dp.telemetry.connection_closed(&rec);
        }
    }
}

/// A destination the registry knows besides Services: a pod, or a ServiceEntry address.
fn registered(model: &Model, dst: SocketAddr) -> bool {
    model.pod_by_ip(dst.ip()).is_some() || model.service_entry_for_addr(dst.ip(), dst.port()).is_some()
}

/// Whether a connection to the mesh pod at `endpoint`, whose tunnel port refused, may go
/// plaintext (asked of the current model: the destination's peer authentication).
pub fn fallback_allowed(
    dp: &DataPath,
    endpoint: SocketAddr,
) -> Result<(), crate::plaintext_fallback::Refused> {
    let model = dp.model.load();
    match model.pod_by_ip(endpoint.ip()) {
        Some(dest) => crate::plaintext_fallback::check(&model, &dp.root_namespace, dest, endpoint.port()),
        // Gone from the model since the tunnel was chosen: it is no mesh pod any more, so
        // nothing says it requires mutual TLS.
        None => Ok(()),
    }
}

/// Counts and logs (rate-limited per source pod) a fallback to plaintext refused.
pub fn refuse_fallback(
    dp: &DataPath,
    pod_key: &str,
    endpoint: SocketAddr,
    peer: &SpiffeId,
    refused: crate::plaintext_fallback::Refused,
    error: &TunnelError,
) {
    dp.tunnel_fallbacks_refused.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = lograte::shared().allow("tunnel-fallback-refused", pod_key) {
        warn!(pod = %pod_key, %endpoint, %peer, mode = refused.mode.as_str(), %error, suppressed,
            "no tunnel endpoint at the destination and it requires mutual TLS; refusing instead of sending plaintext");
    }
}

/// The mesh identity of `endpoint` if it is an enrolled pod (reached through its HBONE port),
/// unless its peer authentication for that port is DISABLE: then, as Istio's sidecars do, the
/// connection goes in plaintext (and arrives without a principal).
pub fn mesh_identity(model: &Model, endpoint: SocketAddr, dp: &DataPath) -> Option<SpiffeId> {
    tunnel_identity(model, &dp.root_namespace, &dp.trust_domain, endpoint)
}

/// [`mesh_identity`] with its settings spelled out.
pub fn tunnel_identity(
    model: &Model,
    root_namespace: &str,
    trust_domain: &str,
    endpoint: SocketAddr,
) -> Option<SpiffeId> {
    model
        .pod_by_ip(endpoint.ip())
        .filter(|p| !p.host_network && model.is_enrolled(&p.namespace))
        .filter(|p| {
            crate::policy::peer_auth::effective(model, root_namespace, p, endpoint.port()).mode
                != crate::discovery::PeerAuthMode::Disable
        })
        .map(|p| SpiffeId::for_pod(trust_domain, p))
}

fn new_conn(
    pod: &PodContext,
    peer: SocketAddr,
    original_dst: SocketAddr,
    target: &routing::Target,
    endpoint: SocketAddr,
    mesh_peer: Option<&SpiffeId>,
    same_node: bool,
) -> NewConn {
    NewConn {
        direction: Direction::Outbound,
        peer_identity: mesh_peer.map(|id| Arc::from(id.to_string())),
        mtls: mesh_peer.is_some(),
        same_node,
        source_pod: pod.key.clone(),
        source_addr: SocketAddr::new(pod.ip, peer.port()),
        original_dst,
        service: target.service.clone(),
        endpoint,
        protocol: "tcp",
    }
}

pub(crate) async fn open_tunnel(
    pod: &PodContext,
    dp: &DataPath,
    peer_id: &SpiffeId,
    endpoint: SocketAddr,
    l7: Option<&'static str>,
) -> Result<crate::transport::TunnelStream, TunnelError> {
    let tls = dp
        .identity
        .client_config(&pod.identity, peer_id.clone())
        .map_err(|e| TunnelError::Config(format!("no client certificate for {}: {e}", pod.identity)))?;
    let key = PoolKey {
        src_pod: pod.pod_id,
        src_identity: pod.identity_str.clone(),
        dst_identity: peer_id.to_string().into(),
        dst: endpoint.ip(),
    };
    // A new tunnel's socket takes a unit on the pod's behalf; a pooled one has it already.
    let unit = || dp.admission.dial(&pod.slots, pod.pod_id);
    dp.pool.open(&key, &pod.netns, tls, endpoint, dp.connect_timeout, l7, unit).await
}

pub(crate) async fn connect(netns: &PodNetns, endpoint: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = netns.tcp_socket(endpoint).await?;
    match tokio::time::timeout(timeout, socket.connect(endpoint)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
    }
}

/// Copies both directions until both are done. EOF on one side becomes a FIN (shutdown of the
/// write half) on the other, so half-closed connections keep working; a reset on one side
/// becomes a reset on the other.
pub async fn forward(client: TcpStream, upstream: TcpStream, sent: &AtomicU64, received: &AtomicU64) {
    forward_counted(client, upstream, sent, received).await
}

/// Where one direction's byte count goes: a counter, or several ([`Counted`]).
pub trait Tally {
    fn add(&self, n: u64);
}

impl Tally for &AtomicU64 {
    fn add(&self, n: u64) {
        self.fetch_add(n, Ordering::Relaxed);
    }
}

/// One direction counted into several counters (both sides' registry entries of a same-node
/// connection).
pub struct Counted<'a>(pub &'a [&'a AtomicU64]);

impl Tally for Counted<'_> {
    fn add(&self, n: u64) {
        for c in self.0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// [`forward`], counting into any [`Tally`].
pub async fn forward_counted(client: TcpStream, upstream: TcpStream, sent: impl Tally, received: impl Tally) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = pump(cr, uw, sent);
    let down = pump(ur, cw, received);
    // If either direction fails, try_join drops the other: both sockets close, and the one
    // `pump` marked with linger 0 closes with a RST.
    let _ = tokio::try_join!(up, down);
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, counter: impl Tally) -> io::Result<()> {
    // Wait for data before allocating the buffer (idle connections hold none).
    if let Err(e) = from.readable().await {
        set_linger_zero(to.as_ref());
        return Err(e);
    }
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                // Half-close: pass the FIN on and keep the other direction running.
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) => {
                set_linger_zero(to.as_ref());
                return Err(e);
            }
        };
        if let Err(e) = to.write_all(&buf[..n]).await {
            // The receiving side is gone (reset or closed): reset the sending side too.
            set_linger_zero(from.as_ref());
            return Err(e);
        }
        counter.add(n as u64);
    }
}

/// Closes with a RST instead of a FIN once the socket is dropped.
fn set_linger_zero(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn reset(stream: &TcpStream) {
    set_linger_zero(stream);
}
