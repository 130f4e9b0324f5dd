//! RequestMirror: a copy of a request sent to another backend, fire and forget. The mirror's
//! response is read and dropped; its failures never touch the client's request. The copy
//! carries the request as the rule's filters left it, with `-shadow` appended to the host (as
//! Envoy does), so the mirror's logs tell copies from real traffic.

use std::sync::{atomic::Ordering, Arc};

use bytes::Bytes;
use http::{header, request, HeaderValue, Request};
use http_body_util::BodyExt;
use tracing::debug;

use super::{
    filters::{request_host, set_host},
    full_body,
    server::ConnCtx,
    upstream::Dial,
};
use crate::{discovery::Model, l4};

/// Request bodies larger than this are not mirrored (the copy is held in memory).
pub const BODY_LIMIT: usize = 1 << 20;

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
        let key = super::plan::balance_key(&backend.namespace, &backend.name, t.port().port);
        ctx.dp.l7.balancer.pick(key, t.endpoints_preferring(crate::discovery::AddressType::of(ctx.orig.ip())))
    });
    let Some((endpoint, inflight)) = picked else {
        ctx.dp.l7.counters.mirror_failed.fetch_add(1, Ordering::Relaxed);
        debug!(backend = %format!("{}/{}", backend.namespace, backend.name), "mirror backend has no ready endpoints");
        return None;
    };
    Some(MirrorTarget { endpoint, mesh_peer: l4::mesh_identity(model, endpoint, &ctx.dp.trust_domain), inflight })
}

/// Sends a copy of the request (`head` as the filters left it, `body` once the client's body
/// is complete) to every target.
pub fn spawn(ctx: &Arc<ConnCtx>, targets: Vec<MirrorTarget>, head: &request::Parts, body: tokio::sync::oneshot::Receiver<Bytes>) {
    let mut head = clone_head(head);
    if let Some(host) = request_host(&head) {
        let shadow = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => format!("{name}-shadow:{port}"),
            _ => format!("{host}-shadow"),
        };
        set_host(&mut head, &shadow, ctx.wire);
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let counters = &ctx.dp.l7.counters;
        let Ok(body) = body.await else {
            // Too large, or the client's body failed: nothing consistent to mirror.
            counters.mirror_skipped.fetch_add(targets.len() as u64, Ordering::Relaxed);
            return;
        };
        if !body.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&body.len().to_string()) {
                head.headers.insert(header::CONTENT_LENGTH, v);
            }
        }
        for t in targets {
            let req = Request::from_parts(clone_head(&head), full_body(body.clone()));
            let dial = Dial {
                pod: &ctx.pod,
                dp: &ctx.dp,
                endpoint: t.endpoint,
                mesh_peer: t.mesh_peer,
                wire: ctx.wire,
                breaker: None,
                tls: None,
                connect_timeout: ctx.dp.connect_timeout,
            };
            match ctx.dp.l7.upstreams.send(&dial, req).await {
                Ok((resp, dispatched)) => {
                    t.inflight.complete(dispatched);
                    counters.mirrored.fetch_add(1, Ordering::Relaxed);
                    let _ = resp.into_body().collect().await;
                }
                Err(e) => {
                    t.inflight.failed();
                    counters.mirror_failed.fetch_add(1, Ordering::Relaxed);
                    debug!(endpoint = %t.endpoint, error = %e.error, "mirrored request failed");
                }
            }
        }
    });
}

fn clone_head(head: &request::Parts) -> request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = head.method.clone();
    *r.uri_mut() = head.uri.clone();
    *r.version_mut() = head.version;
    *r.headers_mut() = head.headers.clone();
    r.into_parts().0
}
