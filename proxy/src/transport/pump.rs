//! Moving bytes between a TCP connection and an HTTP/2 CONNECT stream (one HBONE tunnel
//! stream), with HTTP/2 flow control as backpressure. A FIN on the TCP side becomes END_STREAM
//! and the other way round (half-close works through the tunnel); a TCP reset becomes
//! RST_STREAM and the other way round.

use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
};

const READ_CHUNK: usize = 16 * 1024;

/// Copies both ways until both directions are finished or one fails.
/// `to_stream` counts TCP → tunnel bytes, `from_stream` tunnel → TCP bytes.
/// `prefix` is sent first: bytes already read from `tcp` (by protocol detection).
pub async fn tcp_h2(
    tcp: TcpStream,
    prefix: Bytes,
    send: SendStream<Bytes>,
    recv: RecvStream,
    to_stream: &AtomicU64,
    from_stream: &AtomicU64,
) {
    let (r, w) = tcp.into_split();
    let _ = tokio::try_join!(tcp_to_h2(r, prefix, send, to_stream), h2_to_tcp(recv, w, from_stream));
}

/// Sends `data` as DATA frames as fast as flow control allows.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed")),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false).map_err(h2_io)?;
    }
    Ok(())
}

async fn tcp_to_h2(
    mut r: OwnedReadHalf,
    prefix: Bytes,
    mut send: SendStream<Bytes>,
    counter: &AtomicU64,
) -> io::Result<()> {
    if !prefix.is_empty() {
        let n = prefix.len();
        send_all(&mut send, prefix).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Wait for data before allocating (idle tunnels hold no buffers).
    if let Err(e) = r.readable().await {
        send.send_reset(Reason::CANCEL);
        return Err(e);
    }
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        let n = match r.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                send.send_reset(Reason::CANCEL);
                return Err(e);
            }
        };
        if n == 0 {
            // Half-close: END_STREAM, the other direction keeps going.
            return send.send_data(Bytes::new(), true).map_err(h2_io);
        }
        send_all(&mut send, buf.split().freeze()).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn h2_to_tcp(mut recv: RecvStream, mut w: OwnedWriteHalf, counter: &AtomicU64) -> io::Result<()> {
    loop {
        match recv.data().await {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                if let Err(e) = w.write_all(&chunk).await {
                    return Err(e);
                }
                // Only now does the peer get window to send more: backpressure end to end.
                let _ = recv.flow_control().release_capacity(n);
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            Some(Err(e)) => {
                // RST_STREAM (or the tunnel died): reset the TCP side too.
                reset(w.as_ref());
                return Err(h2_io(e));
            }
            None => {
                let _ = w.shutdown().await;
                return Ok(());
            }
        }
    }
}

pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("tunnel I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED) => io::ErrorKind::ConnectionReset,
        Some(Reason::REFUSED_STREAM) => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}
