//! The write half of a socket: a queue bounded in bytes between the socket's task and the HTTP
//! response body that actix-http writes to the connection.
//!
//! actix-ws's own `Session` hands each message to a 32-slot channel, and its response body
//! copies every message it finds there into one buffer before actix-http copies that into its
//! write buffer. The bound is in messages, not bytes: a dashboard that reads slowly while
//! megabyte-sized `state_batch` frames are sent to it pins 32 of them plus two copies, each its
//! own. Here the bound is in bytes ([`Writer::text`] waits while more than the configured bytes
//! are queued), a frame's payload is never copied into a per-socket buffer when it is large (it
//! is handed to actix-http in slices of the same shared allocation, so a batch rendered once for
//! a hundred dashboards stays one allocation), and small frames are gathered into chunks of at
//! most [`CHUNK`] bytes, which keeps actix-http's write buffer within 32 KiB (see
//! `h1_write_buffer_size` in `startup.rs`).
//!
//! When the connection negotiated `permessage-deflate`, text of at least the configured size is
//! compressed here ([`deflate`](super::deflate)); a [`SharedFrame`] is compressed once for every
//! socket it goes to. Reading is [`reader`](super::reader)'s.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use actix_web::web::{Bytes, BytesMut};
use actix_ws::CloseReason;
use bytestring::ByteString;
use futures_util::Stream;

use super::deflate::{self, SharedFrame};

/// The largest chunk handed to actix-http at once. Payloads above it are passed as slices of
/// their own allocation; smaller frames are copied together into one chunk.
pub const CHUNK: usize = 4096;

const OP_TEXT: u8 = 0x1;
/// RSV1 on a data frame: its payload is compressed (RFC 7692 §6).
const RSV1: u8 = 0x40;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The socket is closed or its peer is gone: nothing more can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

struct Frame {
    /// The header's first byte but FIN: the opcode and RSV1.
    first: u8,
    payload: Bytes,
}

impl Frame {
    /// Passed on in slices of its own allocation rather than copied into a chunk.
    fn large(&self) -> bool {
        self.payload.len() > CHUNK
    }

    /// The most bytes it takes in a chunk: its header, and its payload unless large.
    fn room(&self) -> usize {
        HEADER_MAX + if self.large() { 0 } else { self.payload.len() }
    }
}

#[derive(Default)]
struct Inner {
    frames: VecDeque<Frame>,
    /// The rest of a large payload being handed over in slices (its header already went).
    rest: Bytes,
    /// Payload bytes queued (including `rest`), not yet taken by actix-http.
    queued: usize,
    /// No more frames will be queued: the body ends once the queue is empty.
    closing: bool,
    /// A close frame was queued: no frame may follow it.
    sealed: bool,
    /// The body was dropped (the connection is gone): writing fails.
    gone: bool,
    body: Option<Waker>,
    writer: Option<Waker>,
}

struct Shared {
    inner: Mutex<Inner>,
    limit: usize,
    /// With `permessage-deflate` negotiated: the smallest text compressed.
    deflate_min: Option<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the queue consistent (every update is a
        // single push or pop), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The socket task's handle. Dropping it ends the response body after what is queued.
pub struct Writer {
    shared: Arc<Shared>,
}

/// The response body: the frames queued by the [`Writer`], encoded.
pub struct Body {
    shared: Arc<Shared>,
}

/// A writer and the body it feeds. `limit` is the most payload bytes queued before
/// [`Writer::text`] waits (one frame is always accepted when the queue is under it, however
/// large). `deflate_min`: the connection negotiated `permessage-deflate`, and text of at least
/// this many bytes is sent compressed.
pub fn channel(limit: usize, deflate_min: Option<usize>) -> (Writer, Body) {
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner::default()),
        limit: limit.max(1),
        deflate_min,
    });
    (
        Writer {
            shared: shared.clone(),
        },
        Body { shared },
    )
}

impl Writer {
    /// Queues a text frame, first waiting until the queue is under its byte limit; compressed
    /// when the connection negotiated it and the text is large enough. Gives the payload bytes
    /// queued.
    pub async fn text(&mut self, text: ByteString) -> Result<usize, Closed> {
        if self.compresses(text.len()) {
            if let Some(z) = deflate::deflate_text(&text).await {
                return self.push(OP_TEXT | RSV1, z).await;
            }
        }
        self.push(OP_TEXT, text.into_bytes()).await
    }

    /// Queues a frame shared with other sockets: as [`Writer::text`], but its compressed form
    /// is made once for all of them.
    pub async fn shared(&mut self, frame: &SharedFrame) -> Result<usize, Closed> {
        if self.compresses(frame.text().len()) {
            if let Some(z) = frame.deflated().await {
                return self.push(OP_TEXT | RSV1, z.clone()).await;
            }
        }
        self.push(OP_TEXT, frame.text().clone().into_bytes()).await
    }

    /// The connection negotiated `permessage-deflate`.
    pub fn deflates(&self) -> bool {
        self.shared.deflate_min.is_some()
    }

    fn compresses(&self, len: usize) -> bool {
        self.shared.deflate_min.is_some_and(|min| len >= min)
    }

    pub async fn ping(&mut self, payload: &[u8]) -> Result<(), Closed> {
        self.push(OP_PING, Bytes::copy_from_slice(payload))
            .await
            .map(drop)
    }

    pub async fn pong(&mut self, payload: &[u8]) -> Result<(), Closed> {
        self.push(OP_PONG, Bytes::copy_from_slice(payload))
            .await
            .map(drop)
    }

    /// Queues a close frame, the last: nothing can be queued after it. The body ends when the
    /// writer is dropped, so that the connection stays open for the peer's answer.
    pub async fn close(&mut self, reason: Option<CloseReason>) -> Result<(), Closed> {
        let mut payload = BytesMut::new();
        if let Some(reason) = reason {
            payload.extend_from_slice(&u16::from(reason.code).to_be_bytes());
            if let Some(text) = &reason.description {
                payload.extend_from_slice(text.as_bytes());
            }
        }
        let result = self.push(OP_CLOSE, payload.freeze()).await.map(drop);
        self.shared.lock().sealed = true;
        result
    }

    /// Payload bytes queued and not yet taken by the connection.
    pub fn queued(&self) -> usize {
        self.shared.lock().queued
    }

    async fn push(&mut self, first: u8, payload: Bytes) -> Result<usize, Closed> {
        let shared = &self.shared;
        poll_fn(|cx| {
            let mut inner = shared.lock();
            if inner.gone || inner.closing || inner.sealed {
                return Poll::Ready(Err(Closed));
            }
            if inner.queued >= shared.limit {
                inner.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            inner.queued += payload.len();
            inner.frames.push_back(Frame {
                first,
                payload: payload.clone(),
            });
            if let Some(w) = inner.body.take() {
                w.wake();
            }
            Poll::Ready(Ok(payload.len()))
        })
        .await
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.closing = true;
        if let Some(w) = inner.body.take() {
            w.wake();
        }
    }
}

/// Writes a server frame's header (final fragment, unmasked) for a payload of `len` bytes;
/// `first`: the opcode and RSV1.
fn put_header(buf: &mut BytesMut, first: u8, len: usize) {
    buf.extend_from_slice(&[0x80 | first]);
    if len < 126 {
        buf.extend_from_slice(&[len as u8]);
    } else if let Ok(short) = u16::try_from(len) {
        buf.extend_from_slice(&[126]);
        buf.extend_from_slice(&short.to_be_bytes());
    } else {
        buf.extend_from_slice(&[127]);
        buf.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

const HEADER_MAX: usize = 10;

impl Inner {
    /// The next chunk for the connection, if anything is queued.
    fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.rest.is_empty() {
            let n = self.rest.len().min(CHUNK);
            self.queued -= n;
            return Some(self.rest.split_to(n));
        }
        if self.frames.is_empty() {
            return None;
        }
        // Size the chunk for the small frames that fit, so nothing is reallocated.
        let mut size = 0;
        for f in &self.frames {
            if size > 0 && size + f.room() > CHUNK {
                break;
            }
            size += f.room();
            if f.large() {
                break;
            }
        }
        let mut buf = BytesMut::with_capacity(size);
        while let Some(f) = self.frames.front() {
            let large = f.large();
            if !buf.is_empty() && buf.len() + f.room() > CHUNK {
                break;
            }
            let Some(f) = self.frames.pop_front() else {
                break;
            };
            put_header(&mut buf, f.first, f.payload.len());
            if large {
                // The payload follows in slices of its own (possibly shared) allocation.
                self.rest = f.payload;
                break;
            }
            buf.extend_from_slice(&f.payload);
            self.queued -= f.payload.len();
        }
        Some(buf.freeze())
    }
}

impl Stream for Body {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let shared = &self.shared;
        let mut inner = shared.lock();
        match inner.next_chunk() {
            Some(chunk) => {
                // Let the writer go on once the queue is under its limit again.
                if inner.queued < shared.limit {
                    if let Some(w) = inner.writer.take() {
                        w.wake();
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            None if inner.closing => Poll::Ready(None),
            None => {
                inner.body = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.gone = true;
        inner.frames.clear();
        inner.rest = Bytes::new();
        inner.queued = 0;
        if let Some(w) = inner.writer.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Encoder;
    use actix_http::ws::{Codec, Message};
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn drain(body: &mut Body) -> (Vec<u8>, Vec<usize>, bool) {
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(flag);
        let mut cx = Context::from_waker(&waker);
        let (mut out, mut sizes) = (Vec::new(), Vec::new());
        loop {
            match Pin::new(&mut *body).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    sizes.push(chunk.len());
                    out.extend_from_slice(&chunk);
                }
                Poll::Ready(None) => return (out, sizes, true),
                Poll::Ready(Some(Err(_))) | Poll::Pending => return (out, sizes, false),
            }
        }
    }

    fn encoded(messages: Vec<Message>) -> Vec<u8> {
        let mut codec = Codec::new();
        let mut buf = BytesMut::new();
        for m in messages {
            if let Err(e) = codec.encode(m, &mut buf) {
                panic!("encode: {e}");
            }
        }
        buf.to_vec()
    }

    fn accepted<T>(p: Poll<Result<T, Closed>>) -> bool {
        matches!(p, Poll::Ready(Ok(_)))
    }

    fn now<F: std::future::Future>(f: F) -> Poll<F::Output> {
        let waker = Waker::from(Arc::new(Flag(false.into())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        f.as_mut().poll(&mut cx)
    }

    #[test]
    fn frames_match_actix_codec_for_every_length_class() {
        let (mut w, mut body) = channel(usize::MAX, None);
        let texts: Vec<String> = [0usize, 1, 125, 126, 4000, 4096, 4097, 65535, 65536, 200_000]
            .iter()
            .map(|&n| "x".repeat(n))
            .collect();
        let mut expected = Vec::new();
        for t in &texts {
            assert!(accepted(now(w.text(ByteString::from(t.clone())))));
            expected.push(Message::Text(t.clone().into()));
        }
        assert_eq!(now(w.ping(b"p")), Poll::Ready(Ok(())));
        assert_eq!(now(w.pong(b"q")), Poll::Ready(Ok(())));
        let reason = CloseReason {
            code: actix_ws::CloseCode::Away,
            description: Some("bye".into()),
        };
        assert_eq!(now(w.close(Some(reason.clone()))), Poll::Ready(Ok(())));
        expected.push(Message::Ping(Bytes::from_static(b"p")));
        expected.push(Message::Pong(Bytes::from_static(b"q")));
        expected.push(Message::Close(Some(reason)));
        assert_eq!(
            now(w.text(ByteString::from_static("after"))),
            Poll::Ready(Err(Closed)),
            "nothing follows a close frame"
        );
        let (out, sizes, ended) = drain(&mut body);
        assert!(!ended, "the body stays open for the peer's answer");
        assert_eq!(out, encoded(expected));
        assert!(sizes.iter().all(|&s| s <= CHUNK + HEADER_MAX), "{sizes:?}");
        assert_eq!(w.queued(), 0);
        drop(w);
        assert_eq!(
            drain(&mut body),
            (Vec::new(), Vec::new(), true),
            "ended with the writer"
        );
    }

    #[test]
    fn writer_waits_while_the_queue_is_over_its_byte_limit() {
        let (mut w, mut body) = channel(10_000, None);
        let big = ByteString::from("a".repeat(50_000));
        // One frame is accepted however large, as the queue is under the limit.
        assert!(accepted(now(w.text(big.clone()))));
        assert_eq!(w.queued(), 50_000);
        // The next waits.
        assert!(now(w.text(ByteString::from_static("x"))).is_pending());
        // The connection takes the first slices: still over the limit.
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..3 {
            assert!(matches!(
                Pin::new(&mut body).poll_next(&mut cx),
                Poll::Ready(Some(Ok(_)))
            ));
        }
        assert!(now(w.text(ByteString::from_static("x"))).is_pending());
        let (out, _, ended) = drain(&mut body);
        assert!(!ended);
        assert!(!out.is_empty());
        assert_eq!(w.queued(), 0);
        assert!(accepted(now(w.text(ByteString::from_static("x")))));
    }

    #[test]
    fn large_payloads_are_passed_on_without_copying() {
        let (mut w, mut body) = channel(usize::MAX, None);
        let big = ByteString::from("z".repeat(3 * CHUNK + 5));
        let base = big.as_ptr();
        assert!(accepted(now(w.text(big))));
        let waker = Waker::from(Arc::new(Flag(false.into())));
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Some(Ok(header))) = Pin::new(&mut body).poll_next(&mut cx) else {
            panic!("header chunk expected");
        };
        assert_eq!(header.len(), 4);
        let Poll::Ready(Some(Ok(slice))) = Pin::new(&mut body).poll_next(&mut cx) else {
            panic!("payload chunk expected");
        };
        assert_eq!(
            slice.as_ptr(),
            base,
            "the first slice shares the frame's allocation"
        );
        assert_eq!(slice.len(), CHUNK);
    }

    #[test]
    fn a_dropped_body_fails_the_writer_and_a_dropped_writer_ends_the_body() {
        let (mut w, body) = channel(10, None);
        assert!(accepted(now(
            w.text(ByteString::from_static("0123456789ab"))
        )));
        let pending = w.text(ByteString::from_static("x"));
        drop(body);
        assert_eq!(now(pending), Poll::Ready(Err(Closed)));

        let (w, mut body) = channel(10, None);
        drop(w);
        let (_, _, ended) = drain(&mut body);
        assert!(ended);
    }

    /// The frames in `wire` as (first header byte, payload).
    fn frames_of(mut wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while wire.len() >= 2 {
            let (first, len7) = (wire[0], (wire[1] & 0x7F) as usize);
            let (len, at) = match len7 {
                126 => (u16::from_be_bytes([wire[2], wire[3]]) as usize, 4),
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&wire[2..10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                n => (n, 2),
            };
            out.push((first, wire[at..at + len].to_vec()));
            wire = &wire[at + len..];
        }
        out
    }

    #[test]
    fn text_from_the_configured_size_goes_compressed_with_rsv1() {
        let (mut w, mut body) = channel(usize::MAX, Some(1024));
        let big: String = (0..200)
            .map(|i| format!("{{\"id\":{i},\"x\":1}},"))
            .collect();
        let small = "y".repeat(1023);
        let queued = now(w.text(ByteString::from(big.clone())));
        assert!(
            matches!(queued, Poll::Ready(Ok(n)) if n < big.len() / 2),
            "{queued:?}"
        );
        assert!(accepted(now(w.text(ByteString::from(small.clone())))));
        let frames = frames_of(&drain(&mut body).0);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0, 0xC1, "FIN, RSV1, text");
        assert_eq!(
            deflate::inflate(&frames[0].1, usize::MAX).as_deref(),
            Ok(big.as_bytes())
        );
        assert_eq!(frames[1], (0x81, small.into_bytes()));
    }

    #[test]
    fn a_shared_frame_goes_compressed_once_and_plain_where_not_negotiated() {
        let text: String = (0..500).map(|i| format!("{{\"id\":{i}}},")).collect();
        let frame = SharedFrame::new(ByteString::from(text.clone()));
        let (mut a, mut body_a) = channel(usize::MAX, Some(1024));
        let (mut b, mut body_b) = channel(usize::MAX, Some(1024));
        let (mut c, mut body_c) = channel(usize::MAX, None);
        for w in [&mut a, &mut b, &mut c] {
            assert!(accepted(now(w.shared(&frame))));
        }
        let (fa, fb, fc) = (
            frames_of(&drain(&mut body_a).0),
            frames_of(&drain(&mut body_b).0),
            frames_of(&drain(&mut body_c).0),
        );
        assert_eq!(fa, fb);
        assert_eq!(fa[0].0, 0xC1);
        assert_eq!(fc, vec![(0x81, text.into_bytes())]);
        let z = now(frame.deflated());
        assert!(matches!(z, Poll::Ready(Some(z)) if z.as_ref() == fa[0].1.as_slice()));
    }
}
