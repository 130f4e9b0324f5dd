//! RequestMirror: a copy of a request sent to another backend, fire and forget. The mirror's
//! response is read and dropped; its failures never touch the client's request. The copy
//! carries the request as the rule's filters left it, with `-shadow` appended to the host (as
//! Envoy does), so the mirror's logs tell copies from real traffic.
//!
//! A mirror outlives the request it copies, so what mirrors hold is bounded on its own: at
//! most [`MAX_PER_POD`] mirrored requests in flight per source pod and [`MAX_IN_FLIGHT`]
//! node-wide, whose bodies hold at most [`MAX_BODY_BYTES`] node-wide (a request beyond any of
//! these is not mirrored, counted `http_mirror_dropped`); each copy gets [`ATTEMPT_TIMEOUT`]
//! from when its body is complete to its response's end (counted `http_mirror_timeouts`); the
//! response is read up to [`RESPONSE_DRAIN_LIMIT`] (so that a small one leaves its pooled
//! connection reusable) and dropped beyond; and a mirror backend is checked by the loop guard
//! like any other destination.

use std::{
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, request, HeaderValue, Request};
use http_body::Body as _;
use http_body_util::BodyExt;
use tracing::debug;

use super::{
    body::Tee,
    filters::{request_host, set_host},
    full_body,
    server::ConnCtx,
    upstream::{Dial, Wire},
    Body,
};
use crate::{
    discovery::Model,
    keyed::KeyedCounts,
    l4::{self, DataPath, PodContext},
};

/// Request bodies larger than this are not mirrored (the copy is held in memory).
pub const BODY_LIMIT: usize = 1 << 20;
/// Mirrored requests in flight (waiting for their body, sending, or reading the answer) per
/// source pod...
pub const MAX_PER_POD: u32 = 32;
/// ...and node-wide.
pub const MAX_IN_FLIGHT: u32 = 256;
/// Bytes of request bodies held for mirrors in flight, node-wide (a body of unknown length
/// counts as [`BODY_LIMIT`] until it is complete).
pub const MAX_BODY_BYTES: u64 = 64 << 20;
/// One copy, from its body being complete to the end of its response: a mirror backend that
/// never answers, or streams forever, holds its task and connection no longer than this.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Response bytes read from a mirror before its response is dropped (which closes its
/// connection rather than returning it to the pool).
pub const RESPONSE_DRAIN_LIMIT: usize = 64 * 1024;

/// The bounds of mirrors in flight (node-wide, shared by every pod).
#[derive(Default)]
pub struct MirrorGate {
    in_flight: AtomicU32,
    body_bytes: AtomicU64,
    per_pod: KeyedCounts<u32>,
}

/// One mirrored request's place within the bounds; given back when the mirror is done.
struct MirrorPermit {
    gate: Arc<MirrorGate>,
    pod: u32,
    bytes: u64,
}

impl MirrorGate {
    /// A place for a mirror of pod `pod` whose body holds at most `bytes`.
    fn admit(self: &Arc<Self>, pod: u32, bytes: u64) -> Option<MirrorPermit> {
        let within = |counter: &AtomicU32, max: u32| {
            counter.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
        };
        if !within(&self.in_flight, MAX_IN_FLIGHT) {
            return None;
        }
        if !self.per_pod.take(&pod, MAX_PER_POD) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let reserved = self
            .body_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n + bytes <= MAX_BODY_BYTES).then_some(n + bytes))
            .is_ok();
        if !reserved {
            self.per_pod.give(&pod);
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(MirrorPermit { gate: self.clone(), pod, bytes })
    }

    /// Mirrored requests in flight node-wide.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Body bytes held for mirrors in flight.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes.load(Ordering::Relaxed)
    }
}

impl MirrorPermit {
    /// The body turned out to hold `bytes`: give back the rest of the reservation.
    fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.gate.body_bytes.fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
        }
    }
}

impl Drop for MirrorPermit {
    fn drop(&mut self) {
        self.gate.body_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.gate.per_pod.give(&self.pod);
        self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One mirror destination, resolved when the request was routed.
pub struct MirrorTarget {
    endpoint: std::net::SocketAddr,
    mesh_peer: Option<crate::identity::SpiffeId>,
    inflight: super::balance::InFlight,
}

/// Resolves a mirror filter's backend to an endpoint, or `None` (counted) if it has none or
/// this request is not in the filter's fraction.
pub fn resolve(ctx: &ConnCtx, model: &Model, mirror: &crate::discovery::route::RequestMirror) -> Option<MirrorTarget> {
    if fastrand::f64() >= mirror.fraction.0 {
        return None;
    }
    let backend = &mirror.backend;
    let target = backend
        .port
        .filter(|_| backend.invalid.is_none())
        .and_then(|port| model.service_port(&backend.namespace, &backend.name, port));
    let picked = target.and_then(|t| {
        let endpoints = t.endpoints_preferring(crate::discovery::AddressType::of(ctx.orig.ip()));
        match &backend.subset {
            None => {
                let key = super::plan::balance_key(&backend.namespace, &backend.name, t.port().port);
                ctx.dp.l7.balancer.pick(key, endpoints)
            }
            // A VirtualService mirror to a DestinationRule subset: that subset's endpoints.
            Some(subset) => {
                let eps = super::plan::subset_endpoints(model, &backend.namespace, &backend.name, subset, endpoints).ok()?;
                let key = super::plan::balance_key(&backend.namespace, &format!("{}|{subset}", backend.name), t.port().port);
                ctx.dp.l7.balancer.pick(key, &eps)
            }
        }
    });
    let Some((endpoint, inflight)) = picked else {
        ctx.dp.l7.counters.mirror_failed.fetch_add(1, Ordering::Relaxed);
        debug!(backend = %format!("{}/{}", backend.namespace, backend.name), "mirror backend has no ready endpoints");
        return None;
    };
    // A mirror is a connection sluice makes on the client's behalf like any other: never to
    // one of sluice's own listeners.
    if let Err(target) = ctx.dp.loop_guard.check_upstream(model, endpoint) {
        ctx.dp.loop_guard.refused(&ctx.pod.key, target, crate::loopguard::Via::Request);
        inflight.failed();
        return None;
    }
    Some(MirrorTarget { endpoint, mesh_peer: l4::mesh_identity(model, endpoint, &ctx.dp), inflight })
}

/// Mirrors the request to every target, if the bounds allow: returns the body to send
/// upstream (the client's, copied on its way when the request is mirrored).
pub fn start(ctx: &ConnCtx, targets: Vec<MirrorTarget>, head: &request::Parts, body: Body) -> Body {
    let counters = &ctx.dp.l7.counters;
    // What the copy will hold: the exact length when the body says it, else the most it may.
    let hint = body.size_hint();
    let bytes = if body.is_end_stream() { 0 } else { hint.exact().unwrap_or(BODY_LIMIT as u64) };
    if bytes > BODY_LIMIT as u64 {
        counters.mirror_skipped.fetch_add(targets.len() as u64, Ordering::Relaxed);
        return body;
    }
    let Some(permit) = ctx.dp.l7.mirror_gate.admit(ctx.pod.pod_id, bytes.min(BODY_LIMIT as u64)) else {
        counters.mirror_dropped.fetch_add(targets.len() as u64, Ordering::Relaxed);
        debug!(pod = %ctx.pod.key, "mirror not sent: too many mirrored requests in flight");
        return body;
    };
    let (tee, copy) = Tee::new(body, BODY_LIMIT);
    let mut head = clone_head(head);
    if let Some(host) = request_host(&head) {
        let shadow = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => format!("{name}-shadow:{port}"),
            _ => format!("{host}-shadow"),
        };
        set_host(&mut head, &shadow, ctx.wire);
    }
    tokio::spawn(run(ctx.pod.clone(), ctx.dp.clone(), ctx.wire, targets, head, copy, permit));
    tee.boxed()
}

/// Sends a copy of the request (`head` as the filters left it, `body` once the client's body
/// is complete) to every target, each within [`ATTEMPT_TIMEOUT`].
async fn run(
    pod: Arc<PodContext>,
    dp: Arc<DataPath>,
    wire: Wire,
    targets: Vec<MirrorTarget>,
    mut head: request::Parts,
    body: tokio::sync::oneshot::Receiver<Bytes>,
    mut permit: MirrorPermit,
) {
    let counters = &dp.l7.counters;
    let Ok(body) = body.await else {
        // Too large, or the client's body failed: nothing consistent to mirror.
        counters.mirror_skipped.fetch_add(targets.len() as u64, Ordering::Relaxed);
        return;
    };
    permit.shrink_to(body.len() as u64);
    if !body.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&body.len().to_string()) {
            head.headers.insert(header::CONTENT_LENGTH, v);
        }
    }
    for t in targets {
        let req = Request::from_parts(clone_head(&head), full_body(body.clone()));
        let dial = Dial {
            pod: &pod,
            dp: &dp,
            endpoint: t.endpoint,
            mesh_peer: t.mesh_peer,
            wire,
            breaker: None,
            tls: None,
            istio_mutual: None,
            connect_timeout: dp.connect_timeout,
            idle_timeout: None,
        };
        let attempt = async {
            match dp.l7.upstreams.send(&dial, req).await {
                Ok((resp, dispatched)) => {
                    t.inflight.complete(dispatched);
                    counters.mirrored.fetch_add(1, Ordering::Relaxed);
                    drain(resp.into_body(), RESPONSE_DRAIN_LIMIT).await;
                }
                Err(e) => {
                    t.inflight.failed();
                    counters.mirror_failed.fetch_add(1, Ordering::Relaxed);
                    debug!(endpoint = %t.endpoint, error = %e.error, "mirrored request failed");
                }
            }
        };
        if tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await.is_err() {
            counters.mirror_timeouts.fetch_add(1, Ordering::Relaxed);
            debug!(endpoint = %t.endpoint, timeout_s = ATTEMPT_TIMEOUT.as_secs(), "mirrored request timed out");
        }
    }
    drop(permit);
}

/// Reads a response body frame by frame and drops it, up to `limit` bytes (a body read to its
/// end returns its HTTP/1.1 connection to the pool; a longer one is dropped, closing it).
async fn drain<B: hyper::body::Body + Unpin>(mut body: B, limit: usize) {
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return };
        if let Some(data) = frame.data_ref() {
            read += bytes::Buf::remaining(data);
            if read > limit {
                return;
            }
        }
    }
}

fn clone_head(head: &request::Parts) -> request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = head.method.clone();
    *r.uri_mut() = head.uri.clone();
    *r.version_mut() = head.version;
    *r.headers_mut() = head.headers.clone();
    r.into_parts().0
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use hyper::body::Frame;

    use super::*;

    #[test]
    fn mirrors_in_flight_are_bounded_per_pod_and_node_wide() {
        let gate = Arc::new(MirrorGate::default());
        let pod_a: Vec<MirrorPermit> = (0..MAX_PER_POD).map(|_| gate.admit(1, 0).unwrap()).collect();
        assert!(gate.admit(1, 0).is_none(), "a pod holds at most its share");
        // Other pods fill the node, up to the node-wide bound.
        let mut others = Vec::new();
        let mut pod = 2;
        while let Some(p) = gate.admit(pod, 0) {
            others.push(p);
            if others.len() % MAX_PER_POD as usize == 0 {
                pod += 1;
            }
        }
        assert_eq!(gate.in_flight(), MAX_IN_FLIGHT);
        assert!(gate.admit(999, 0).is_none());
        drop(pod_a);
        drop(others);
        assert_eq!(gate.in_flight(), 0);
        assert_eq!(gate.per_pod.len(), 0);
    }

    #[test]
    fn mirror_bodies_are_bounded_in_bytes_and_a_known_size_gives_the_rest_back() {
        let gate = Arc::new(MirrorGate::default());
        let per = BODY_LIMIT as u64;
        // Unknown lengths count as the limit: 64 of them fill the budget.
        let held: Vec<MirrorPermit> =
            (0..(MAX_BODY_BYTES / per)).map(|i| gate.admit(i as u32, per).unwrap()).collect();
        assert!(gate.admit(500, 1).is_none());
        assert_eq!(gate.in_flight() as u64, MAX_BODY_BYTES / per, "a refusal gives its places back");
        // Once a body turns out small, the rest of its reservation is free again.
        let mut held = held;
        held[0].shrink_to(10);
        assert!(gate.admit(501, per - 10).is_some());
        drop(held);
        assert_eq!(gate.body_bytes(), 0);
    }

    /// A body that never ends: a frame of 16 KiB at every poll.
    struct Endless(u64);

    impl hyper::body::Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0 += 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![0u8; 16 * 1024])))))
        }
    }

    #[tokio::test]
    async fn an_endless_mirror_response_is_read_up_to_the_limit_then_dropped() {
        let mut body = Endless(0);
        drain(&mut body, RESPONSE_DRAIN_LIMIT).await;
        // 64 KiB in 16 KiB frames: the fifth frame goes over and ends the read.
        assert_eq!(body.0, (RESPONSE_DRAIN_LIMIT / (16 * 1024)) as u64 + 1);
    }
}
