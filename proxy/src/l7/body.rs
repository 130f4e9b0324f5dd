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

pin_project! {
    /// Passes a request body through unchanged while keeping a copy of it, up to a limit, for
    /// a second use once the body has ended (a mirrored request; later, a retry). The copy is
    /// delivered on a channel when the body ends; a body over the limit, failed or dropped
    /// early delivers nothing (the receiver sees the sender dropped).
    pub struct Tee<B> {
        #[pin]
        inner: B,
        rec: Option<Recorder>,
    }
}

struct Recorder {
    chunks: Vec<Bytes>,
    size: usize,
    limit: usize,
    done: tokio::sync::oneshot::Sender<Bytes>,
}

impl Recorder {
    fn finish(self) {
        let body = if self.chunks.len() == 1 {
            self.chunks.into_iter().next().unwrap_or_default()
        } else {
            let mut all = bytes::BytesMut::with_capacity(self.size);
            for c in &self.chunks {
                all.extend_from_slice(c);
            }
            all.freeze()
        };
        let _ = self.done.send(body);
    }
}

impl<B: Body<Data = Bytes>> Tee<B> {
    pub fn new(inner: B, limit: usize) -> (Self, tokio::sync::oneshot::Receiver<Bytes>) {
        let (done, rx) = tokio::sync::oneshot::channel();
        let rec = Recorder { chunks: Vec::new(), size: 0, limit, done };
        if inner.is_end_stream() {
            // Nobody will poll an empty body: the copy is complete now.
            rec.finish();
            return (Self { inner, rec: None }, rx);
        }
        (Self { inner, rec: Some(rec) }, rx)
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let r = this.inner.as_mut().poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(rec)) = (frame.data_ref(), this.rec.as_mut()) {
                    rec.size += data.len();
                    if rec.size > rec.limit {
                        *this.rec = None;
                    } else {
                        rec.chunks.push(data.clone());
                    }
                }
                // hyper stops polling a body whose size hint says it is complete.
                if this.inner.is_end_stream() {
                    if let Some(rec) = this.rec.take() {
                        rec.finish();
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(rec) = this.rec.take() {
                    rec.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => *this.rec = None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn tee_copies_small_bodies_and_gives_up_on_large_ones() {
        let frames = vec![Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from("ab"))), Ok(Frame::data(Bytes::from("cd")))];
        let (tee, copy) = Tee::new(StreamBody::new(futures_util::stream::iter(frames)), 10);
        assert_eq!(tee.collect().await.unwrap().to_bytes(), "abcd");
        assert_eq!(copy.await.unwrap(), "abcd");

        let (tee, copy) = Tee::new(Full::new(Bytes::from("0123456789abc")), 10);
        assert_eq!(tee.collect().await.unwrap().to_bytes().len(), 13);
        assert!(copy.await.is_err(), "over the limit: no copy");

        let (_tee, copy) = Tee::new(http_body_util::Empty::<Bytes>::new(), 10);
        assert_eq!(copy.await.unwrap(), "");
    }

    #[tokio::test]
    async fn deadline_fails_a_slow_body() {
        let slow = StreamBody::new(futures_util::stream::pending::<Result<Frame<Bytes>, std::convert::Infallible>>());
        let limit = Duration::from_millis(20);
        let body = Deadline::new(slow, tokio::time::Instant::now() + limit, limit);
        let err = body.collect().await.err().expect("the deadline fails the body");
        assert!(err.to_string().contains("request timeout"), "{err}");
    }
}
