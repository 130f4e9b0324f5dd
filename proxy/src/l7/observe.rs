//! Turning one proxied request into a telemetry record: the request's facts are gathered while
//! it is routed and forwarded ([`Observation`]), and the record is emitted when the response
//! body ends, fails or is dropped ([`Observed`]), so that the duration, the byte counts and a
//! gRPC status in the trailers are the real ones.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::BoxError;
use crate::{
    discovery::{Service, WorkloadInfo},
    telemetry::{trace::SpanContext, Peer, Reporter, RequestRecord, ServiceRef, Telemetry},
};

/// One side of the request, owned.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub workload: Option<Arc<WorkloadInfo>>,
    pub principal: Option<Arc<str>>,
    pub addr: Option<SocketAddr>,
}

impl PeerInfo {
    fn as_peer(&self) -> Peer<'_> {
        Peer { workload: self.workload.as_deref(), principal: self.principal.as_deref(), addr: self.addr }
    }
}

/// Everything known about one request by the time its response starts.
pub struct Observation {
    pub telemetry: Arc<Telemetry>,
    pub reporter: Reporter,
    pub start: Instant,
    pub start_system: SystemTime,
    pub method: Method,
    pub uri: Uri,
    pub authority: String,
    pub grpc: bool,
    pub source: PeerInfo,
    pub destination: PeerInfo,
    /// The Service the request was for.
    pub service: Option<Arc<Service>>,
    pub upstream: Option<SocketAddr>,
    pub mtls: bool,
    pub access_log: bool,
    pub span: SpanContext,
    /// Request body bytes, counted by [`CountBody`].
    pub request_bytes: Arc<AtomicU64>,
    /// `x-sluice-error` of a response sluice made, "-" otherwise.
    pub flags: &'static str,
    pub status: u16,
    pub grpc_status: Option<u16>,
}

impl Observation {
    fn emit(mut self, response_bytes: u64, failed: bool) {
        let mut span = std::mem::take(&mut self.span);
        let export = span.take_export();
        let trace_hex = span.trace_id_hex();
        let flags = if failed && self.flags == "-" { "stream-reset" } else { self.flags };
        let rec = RequestRecord {
            reporter: self.reporter,
            start: self.start_system,
            duration: self.start.elapsed(),
            source: self.source.as_peer(),
            destination: self.destination.as_peer(),
            service: self.service.as_ref().map(|s| ServiceRef { namespace: &s.namespace, name: &s.name }),
            protocol: if self.grpc { "grpc" } else { "http" },
            method: &self.method,
            authority: &self.authority,
            path: self.uri.path_and_query().map_or("/", |p| p.as_str()),
            status: self.status,
            grpc_status: self.grpc_status,
            response_flags: flags,
            request_bytes: self.request_bytes.load(Ordering::Relaxed),
            response_bytes,
            upstream: self.upstream,
            mtls: self.mtls,
            trace_id: trace_hex.as_ref().map(|t| t.as_str()),
            request_id: span.request_id(),
            access_log: self.access_log,
        };
        self.telemetry.request(&rec);
        self.telemetry.end_span(export, &rec);
    }
}

/// The gRPC status in a header block (trailers-only responses and trailers).
pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

pin_project! {
    /// The response body, emitting the request's record when it ends.
    pub struct Observed<B: HttpBody> {
        #[pin]
        inner: B,
        obs: Option<Observation>,
        bytes: u64,
    }

    impl<B: HttpBody> PinnedDrop for Observed<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // hyper drops a body whose size hint says it is complete without polling it to
            // its end: that is a success. Otherwise the client went away or the stream was cut.
            let complete = this.inner.is_end_stream();
            if let Some(obs) = this.obs.take() {
                obs.emit(*this.bytes, !complete);
            }
        }
    }
}

impl<B: HttpBody> Observed<B> {
    pub fn new(inner: B, obs: Observation) -> Self {
        Self { inner, obs: Some(obs), bytes: 0 }
    }
}

impl<B> HttpBody for Observed<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let r = this.inner.as_mut().poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    if let (Some(obs), Some(code)) = (this.obs.as_mut(), grpc_status(trailers)) {
                        obs.grpc_status = Some(code);
                    }
                }
                // The last frame of a body of known length: hyper will not poll again.
                if this.inner.is_end_stream() {
                    if let Some(obs) = this.obs.take() {
                        obs.emit(*this.bytes, false);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(obs) = this.obs.take() {
                    obs.emit(*this.bytes, false);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(obs) = this.obs.take() {
                    obs.emit(*this.bytes, true);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Counts a request body's bytes into a shared counter.
    pub struct CountBody<B> {
        #[pin]
        inner: B,
        count: Arc<AtomicU64>,
    }
}

impl<B> CountBody<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B> HttpBody for CountBody<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r {
            if let Some(data) = frame.data_ref() {
                this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
