//! The read half of a socket: client frames parsed (by actix-http's frame parser), fragmented
//! messages put together, and compressed messages inflated when the connection negotiated
//! `permessage-deflate` (see [`deflate`](super::deflate)).
//!
//! actix-ws's message stream did this before compression: its parser refuses a frame with the
//! RSV1 bit set, which marks a compressed message. Here that bit is taken off the first frame
//! of a data message (and remembered) before the frame is parsed.

use std::future::Future;
use std::task::{Context, Poll};

use actix_http::ws::{OpCode, Parser, ProtocolError};
use actix_web::web::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::{Stream, StreamExt};

use super::deflate::{self, InflateError};

const RSV1: u8 = 0x40;
/// The most buffer capacity kept while waiting for the client's next bytes.
const IDLE_BUF: usize = 1024;
const RSV_ALL: u8 = 0x70;
/// Frames read a second, any kind (a burst of as many allowed): past that the reader stops
/// reading until the budget refills, and the client's frames wait in its own buffers. Messages
/// have their own limit (`websocket.messages_per_second`), but frames that make no message (a
/// stream of empty continuations, `X` heartbeats, pings) did not: a client sending millions of
/// them a second kept a core busy for as long as it liked. No client needs more than a few
/// frames a second; a message fragmented into a thousand frames takes a second longer.
const FRAMES_PER_SECOND: f64 = 1000.0;

/// A whole message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(ByteString),
    /// A compressed text message, not yet inflated: the caller decides whether it is worth
    /// inflating (a client over its message rate is not) and calls [`inflate_text`].
    Compressed(Bytes),
    Binary,
    Ping(Bytes),
    Pong,
    Close,
}

/// Why reading stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// A frame, a message or an inflated message over the size limit (close 1009).
    TooLarge,
    /// Not valid UTF-8 in a text message (close 1007).
    InvalidText,
    /// Anything else that breaks RFC 6455 (close 1002).
    Protocol(String),
}

/// A message being put together from its frames.
struct Partial {
    text: bool,
    compressed: bool,
    data: BytesMut,
}

pub struct Reader<S> {
    payload: S,
    buf: BytesMut,
    max: usize,
    deflate: bool,
    /// The frame at the front of `buf` had RSV1 set (a compressed message), taken off.
    front_compressed: bool,
    partial: Option<Partial>,
    ended: bool,
    /// The frame budget (see [`FRAMES_PER_SECOND`]): frames left, and when it was counted.
    frames_left: f64,
    counted: std::time::Instant,
    /// Set while the budget is spent: nothing is read until it fires.
    throttled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// When bytes last came from the peer (a message in many slow pieces is not idleness).
    received_at: std::time::Instant,
}

impl<S, E> Reader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    /// Reads from `payload` messages of at most `max` bytes (compressed and inflated alike);
    /// `deflate`: the connection negotiated `permessage-deflate`.
    pub fn new(payload: S, max: usize, deflate: bool) -> Reader<S> {
        Reader {
            payload,
            buf: BytesMut::new(),
            max,
            deflate,
            front_compressed: false,
            partial: None,
            ended: false,
            frames_left: FRAMES_PER_SECOND,
            counted: std::time::Instant::now(),
            throttled: None,
            received_at: std::time::Instant::now(),
        }
    }

    /// When bytes last came from the peer, whole messages or not.
    pub fn received_at(&self) -> std::time::Instant {
        self.received_at
    }

    /// Counts a frame read; once the budget is spent, sets the wait before the next one.
    fn count_frame(&mut self) {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.counted).as_secs_f64() * FRAMES_PER_SECOND;
        self.frames_left = (self.frames_left + refill).min(FRAMES_PER_SECOND) - 1.0;
        self.counted = now;
        if self.frames_left < 0.0 {
            let wait = std::time::Duration::from_secs_f64(-self.frames_left / FRAMES_PER_SECOND);
            self.throttled = Some(Box::pin(tokio::time::sleep(wait)));
        }
    }

    /// The largest message accepted, compressed or inflated.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The next message; `None` once the peer is gone.
    pub async fn recv(&mut self) -> Option<Result<Message, ReadError>> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, ReadError>>> {
        loop {
            if let Some(wait) = self.throttled.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.throttled = None;
            }
            match self.next_frame() {
                Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
                Ok(Some(frame)) => {
                    self.count_frame();
                    match self.take(frame) {
                        Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                        Ok(None) => continue,
                        Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
                    }
                }
                Ok(None) if self.ended => return Poll::Ready(None),
                Ok(None) => {}
            }
            match self.payload.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    self.received_at = std::time::Instant::now();
                    self.buf.extend_from_slice(&bytes);
                }
                Poll::Ready(Some(Err(_)) | None) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    // An idle socket keeps no buffer: a large message read earlier would
                    // otherwise pin its allocation for the life of the connection.
                    if self.buf.is_empty() && self.buf.capacity() > IDLE_BUF {
                        self.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Reads nothing more after an error.
    fn fail(&mut self, e: ReadError) -> ReadError {
        self.ended = true;
        self.buf.clear();
        self.partial = None;
        e
    }

    /// The next whole frame in the buffer: (final, opcode, compressed, payload).
    fn next_frame(&mut self) -> Result<Option<(bool, OpCode, bool, BytesMut)>, ReadError> {
        let Some(&first) = self.buf.first() else {
            return Ok(None);
        };
        if first & RSV1 != 0 && first & RSV_ALL == RSV1 {
            let opcode = first & 0x0F;
            // Only the first frame of a data message may carry it (RFC 7692 §6.1).
            let starts_message = (opcode == 0x1 || opcode == 0x2) && self.partial.is_none();
            if !(self.deflate && starts_message) {
                return Err(ReadError::Protocol("reserved bit set".into()));
            }
            self.buf[0] = first & !RSV1;
            self.front_compressed = true;
        }
        // Refuse a frame by its declared length, before buffering it: the parser only checks
        // the length once the whole frame is in.
        if let Some(len) = declared_len(&self.buf) {
            let so_far = match (first & 0x0F, &self.partial) {
                (0x0, Some(p)) => p.data.len(),
                _ => 0,
            };
            if len > self.max.saturating_sub(so_far) {
                return Err(ReadError::TooLarge);
            }
        }
        let parsed = Parser::parse(&mut self.buf, true, self.max).map_err(|e| match e {
            ProtocolError::Overflow => ReadError::TooLarge,
            e => ReadError::Protocol(e.to_string()),
        })?;
        let Some((fin, opcode, data)) = parsed else {
            return Ok(None);
        };
        let compressed = std::mem::take(&mut self.front_compressed);
        Ok(Some((fin, opcode, compressed, data.unwrap_or_default())))
    }

    /// Takes one frame: a message when it completes one.
    fn take(
        &mut self,
        (fin, opcode, compressed, data): (bool, OpCode, bool, BytesMut),
    ) -> Result<Option<Message>, ReadError> {
        let control = |what: Message| {
            if fin {
                Ok(Some(what))
            } else {
                Err(ReadError::Protocol("fragmented control frame".into()))
            }
        };
        match opcode {
            OpCode::Ping => control(Message::Ping(data.freeze())),
            OpCode::Pong => control(Message::Pong),
            OpCode::Close => {
                Parser::try_parse_close_payload(&data)
                    .map_err(|e| ReadError::Protocol(format!("close frame: {e}")))?;
                control(Message::Close)
            }
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol(
                        "new message inside a fragmented one".into(),
                    ));
                }
                let partial = Partial {
                    text: opcode == OpCode::Text,
                    compressed,
                    data,
                };
                if fin {
                    self.complete(partial).map(Some)
                } else {
                    self.partial = Some(partial);
                    Ok(None)
                }
            }
            OpCode::Continue => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(ReadError::Protocol("continuation without a message".into()));
                };
                // Within the limit: `next_frame` checked the frame's declared length against
                // what the message already holds.
                partial.data.extend_from_slice(&data);
                if !fin {
                    return Ok(None);
                }
                match self.partial.take() {
                    Some(p) => self.complete(p).map(Some),
                    None => Ok(None),
                }
            }
            OpCode::Bad => Err(ReadError::Protocol("bad opcode".into())),
        }
    }

    fn complete(&self, p: Partial) -> Result<Message, ReadError> {
        if !p.text {
            return Ok(Message::Binary);
        }
        if p.compressed {
            return Ok(Message::Compressed(p.data.freeze()));
        }
        ByteString::try_from(p.data.freeze())
            .map(Message::Text)
            .map_err(|_| ReadError::InvalidText)
    }
}

/// A compressed text message inflated (to at most `max` bytes) and checked to be UTF-8.
pub fn inflate_text(data: &[u8], max: usize) -> Result<ByteString, ReadError> {
    let text = match deflate::inflate(data, max) {
        Ok(d) => Bytes::from(d),
        Err(InflateError::TooLarge) => return Err(ReadError::TooLarge),
        Err(InflateError::Invalid) => {
            return Err(ReadError::Protocol("invalid compressed data".into()))
        }
    };
    ByteString::try_from(text).map_err(|_| ReadError::InvalidText)
}

/// The payload length a frame's header declares, once the header's length bytes are in.
fn declared_len(b: &[u8]) -> Option<usize> {
    let len7 = *b.get(1)? & 0x7F;
    let len = match len7 {
        126 => u64::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?])),
        127 => u64::from_be_bytes(b.get(2..10)?.try_into().ok()?),
        n => u64::from(n),
    };
    Some(usize::try_from(len).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A client frame: `first` is the header's first byte (FIN, RSV1, opcode), masked.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Every message read from `chunks` until the reader ends or fails.
    fn read(chunks: Vec<Vec<u8>>, max: usize, deflate: bool) -> Vec<Result<Message, String>> {
        let stream =
            futures_util::stream::iter(chunks.into_iter().map(|c| Ok::<_, ()>(Bytes::from(c))));
        let mut r = Reader::new(stream, max, deflate);
        let mut out = Vec::new();
        while let Some(Some(m)) = r.recv().now_or_never() {
            let m = match m {
                Ok(Message::Compressed(z)) => inflate_text(&z, max).map(Message::Text),
                other => other,
            };
            let failed = m.is_err();
            out.push(m.map_err(|e| format!("{e:?}")));
            if failed {
                break;
            }
        }
        out
    }

    fn text(s: &str) -> Result<Message, String> {
        Ok(Message::Text(ByteString::from(s.to_owned())))
    }

    const MSG: &str = r#"{"action":"subscribe","hash":"00000000000000000000000000000000","requests":[{"type":"state","trackers":[1,2,3,4,5,6,7,8,9]}]}"#;

    #[test]
    fn plain_and_compressed_messages_read_alike() {
        let z = deflate::deflate(MSG.as_bytes()).unwrap_or_default();
        let got = read(
            vec![frame(0x81, MSG.as_bytes()), frame(0xC1, &z)],
            1024,
            true,
        );
        assert_eq!(got, vec![text(MSG), text(MSG)]);
    }

    #[test]
    fn a_compressed_message_read_a_byte_at_a_time() {
        let z = deflate::deflate(MSG.as_bytes()).unwrap_or_default();
        let bytes = [frame(0xC1, &z), frame(0x81, b"x")].concat();
        let chunks = bytes.iter().map(|b| vec![*b]).collect();
        assert_eq!(read(chunks, 1024, true), vec![text(MSG), text("x")]);
    }

    #[test]
    fn a_fragmented_compressed_message_with_a_ping_inside() {
        let z = deflate::deflate(MSG.as_bytes()).unwrap_or_default();
        let (a, b) = z.split_at(z.len() / 2);
        let chunks = vec![frame(0x41, a), frame(0x89, b"hi"), frame(0x80, b)];
        assert_eq!(
            read(chunks, 1024, true),
            vec![Ok(Message::Ping(Bytes::from_static(b"hi"))), text(MSG)]
        );
    }

    #[test]
    fn the_compression_bit_is_refused_where_it_does_not_belong() {
        let z = deflate::deflate(MSG.as_bytes()).unwrap_or_default();
        // Not negotiated.
        let got = read(vec![frame(0xC1, &z)], 1024, false);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e.contains("Protocol")),
            "{got:?}"
        );
        // On a continuation frame.
        let got = read(vec![frame(0x01, b"ab"), frame(0xC0, b"cd")], 1024, true);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e.contains("Protocol")),
            "{got:?}"
        );
        // On a control frame.
        let got = read(vec![frame(0xC9, b"")], 1024, true);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e.contains("Protocol")),
            "{got:?}"
        );
        // Not a deflate stream.
        let got = read(vec![frame(0xC1, &[0xff; 8])], 1024, true);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e.contains("Protocol")),
            "{got:?}"
        );
    }

    #[test]
    fn limits_hold_for_frames_messages_and_what_they_inflate_to() {
        let big = "a".repeat(2000);
        let got = read(vec![frame(0x81, big.as_bytes())], 1024, true);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e == "TooLarge"),
            "{got:?}"
        );
        let half = "a".repeat(600);
        let got = read(
            vec![frame(0x01, half.as_bytes()), frame(0x80, half.as_bytes())],
            1024,
            true,
        );
        assert!(
            matches!(got.as_slice(), [Err(e)] if e == "TooLarge"),
            "{got:?}"
        );
        // A few dozen bytes that inflate to 2,000.
        let z = deflate::deflate(big.as_bytes()).unwrap_or_default();
        assert!(z.len() < 100);
        let got = read(vec![frame(0xC1, &z)], 1024, true);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e == "TooLarge"),
            "{got:?}"
        );
        // Nothing is read after an error.
        let got = read(vec![frame(0xC1, &z), frame(0x81, b"x")], 1024, true);
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn text_must_be_utf8_once_inflated() {
        let bad = [b'a', 0xff, 0xfe, b'b'];
        let got = read(vec![frame(0x81, &bad)], 1024, true);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e == "InvalidText"),
            "{got:?}"
        );
        let got = read(vec![frame(0x82, &bad), frame(0x88, b"")], 1024, true);
        assert_eq!(got, vec![Ok(Message::Binary), Ok(Message::Close)]);
    }

    /// Past its frame budget the reader waits before it reads on, though frames are there;
    /// then it goes on at the budget's rate.
    #[tokio::test]
    async fn frames_past_the_budget_wait() {
        let n = FRAMES_PER_SECOND as usize;
        let empty: Vec<u8> = frame(0x81, b"");
        let chunks = vec![Ok::<_, ()>(Bytes::from(empty.repeat(3 * n)))];
        let mut r = Reader::new(futures_util::stream::iter(chunks), 1024, false);
        // The burst at once (and what refilled while it was read), then a wait.
        let mut read = 0;
        while let Some(m) = r.recv().now_or_never() {
            assert!(matches!(m, Some(Ok(Message::Text(_)))), "{m:?}");
            read += 1;
        }
        assert!((n..2 * n).contains(&read), "{read} frames before the wait");
        let m = tokio::time::timeout(std::time::Duration::from_secs(1), r.recv()).await;
        assert!(matches!(m, Ok(Some(Ok(Message::Text(_))))), "{m:?}");
    }

    #[test]
    fn an_idle_reader_lets_go_of_its_buffer() {
        let big = "b".repeat(100_000);
        let chunks = vec![Ok::<_, ()>(Bytes::from(frame(0x81, big.as_bytes())))];
        let stream = futures_util::stream::iter(chunks).chain(futures_util::stream::pending());
        let mut r = Reader::new(stream, 200_000, false);
        let first = r.recv().now_or_never();
        assert!(matches!(first, Some(Some(Ok(Message::Text(ref t)))) if t.len() == 100_000));
        assert!(r.recv().now_or_never().is_none(), "nothing more to read");
        assert_eq!(r.buf.capacity(), 0);
    }

    #[test]
    fn a_frame_is_refused_by_its_declared_length_before_it_is_buffered() {
        // A terabyte declared, a few bytes sent: refused at once.
        let mut head = vec![0x81, 0x80 | 127];
        head.extend_from_slice(&(1u64 << 40).to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4, b'x']);
        let got = read(vec![head], 1024, false);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e == "TooLarge"),
            "{got:?}"
        );
        // A continuation that would take the message past the limit, before it arrives.
        let first = frame(0x01, &[b'a'; 600]);
        let mut next = frame(0x80, &[b'b'; 600]);
        next.truncate(10);
        let got = read(vec![first, next], 1024, false);
        assert!(
            matches!(got.as_slice(), [Err(e)] if e == "TooLarge"),
            "{got:?}"
        );
    }

    #[test]
    fn close_frames_are_checked() {
        let ok = [&1000u16.to_be_bytes()[..], b"bye"].concat();
        assert_eq!(
            read(vec![frame(0x88, &ok)], 1024, false),
            vec![Ok(Message::Close)]
        );
        assert_eq!(
            read(vec![frame(0x88, b"")], 1024, false),
            vec![Ok(Message::Close)]
        );
        let bad_reason = [&1000u16.to_be_bytes()[..], &[0xff, 0xfe]].concat();
        for bad in [vec![0x03], 999u16.to_be_bytes().to_vec(), bad_reason] {
            let got = read(vec![frame(0x88, &bad)], 1024, false);
            assert!(
                matches!(got.as_slice(), [Err(e)] if e.contains("Protocol")),
                "{got:?}"
            );
        }
    }

    #[test]
    fn a_compressed_message_is_handed_over_as_it_came() {
        let z = deflate::deflate(MSG.as_bytes()).unwrap_or_default();
        let stream = futures_util::stream::iter([Ok::<_, ()>(Bytes::from(frame(0xC1, &z)))]);
        let mut r = Reader::new(stream, 1024, true);
        let got = r.recv().now_or_never();
        assert!(matches!(got, Some(Some(Ok(Message::Compressed(ref b)))) if b[..] == z[..]));
        assert_eq!(inflate_text(&z, 1024), Ok(ByteString::from(MSG)));
        assert!(matches!(inflate_text(&z, 10), Err(ReadError::TooLarge)));
    }
}
