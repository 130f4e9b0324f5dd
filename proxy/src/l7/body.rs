//! Body wrappers of the proxy path.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::BoxError;

pin_project! {
    /// A response body that must be finished by a deadline (a route's request timeout, which
    /// covers the whole response): past it, the body fails, and hyper resets the HTTP/2 stream
    /// or closes the HTTP/1.1 connection, since the status line has already gone out.
    pub struct Deadline<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: tokio::time::Sleep,
        limit: Duration,
    }
}

impl<B> Deadline<B> {
    pub fn new(inner: B, at: tokio::time::Instant, limit: Duration) -> Self {
        Self { inner, sleep: tokio::time::sleep_until(at), limit }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request timeout ({0:?}) exceeded while the response was streaming")]
pub struct BodyTimeout(pub Duration);

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if this.sleep.poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(*this.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Keeps `guard` alive until the body is finished or dropped (e.g. a connection-registry
    /// entry or an in-flight marker that must outlive the response headers).
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self { inner, guard: Some(guard) }
    }
}

impl<B, G> Body for Guarded<B, G>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = &r {
            this.guard.take();
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
