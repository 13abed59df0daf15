//! WebSocket compression, the `permessage-deflate` extension (RFC 7692).
//!
//! A client that offers it (every browser does) gets messages of at least
//! `websocket.compression_min_bytes` compressed; smaller ones go as they are, which the extension
//! allows message by message. Both directions are negotiated without context takeover
//! (`server_no_context_takeover; client_no_context_takeover`): every message is compressed on
//! its own, so
//!
//! - a socket keeps no compressor or decompressor between messages (an idle socket costs no
//!   more), and
//! - a frame rendered once for many sockets (a `state_batch`, see [`SharedFrame`]) is also
//!   compressed once and the same compressed bytes go to every socket that negotiated the
//!   extension: a 100,000-tracker batch of ~40 MB a second per dashboard goes out as a few MB.
//!
//! Client messages arrive compressed when the client chooses (browsers compress theirs); they
//! are inflated with the same size limit as an uncompressed message (`max_frame_bytes`), so a
//! small compressed frame cannot expand past it.

use std::cell::RefCell;
use std::sync::Arc;

use actix_web::web::Bytes;
use bytestring::ByteString;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::sync::OnceCell;

/// What the server answers to an accepted offer: no context takeover either way.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The answer to an offer that named `server_max_window_bits=15`: a server accepts that
/// parameter by sending it back (RFC 7692 §7.1.2.1).
pub const RESPONSE_WINDOW_15: &str = "permessage-deflate; server_no_context_takeover; \
    client_no_context_takeover; server_max_window_bits=15";

/// The tail every compressed message ends with before it is sent (RFC 7692 §7.2.1): removed by
/// the sender, appended again by the receiver.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The answer to the client's `Sec-WebSocket-Extensions` offers, if one of them is a
/// `permessage-deflate` the server can accept: the first such offer whose parameters it
/// understands and can honour. The only one it cannot is `server_max_window_bits` below 15 (the
/// compressor always uses the full 32 KiB window); an offer with unknown, repeated or malformed
/// parameters is declined (RFC 7692 §5), and the client then gets uncompressed messages.
pub fn accept<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    headers
        .into_iter()
        .flat_map(|h| h.split(','))
        .find_map(acceptable_offer)
}

fn acceptable_offer(offer: &str) -> Option<&'static str> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return None;
    }
    let mut seen = [false; 4];
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let bits = || {
            value
                .and_then(|v| v.parse::<u8>().ok())
                .filter(|b| (8..=15).contains(b))
        };
        let (index, ok) = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => (0, value.is_none()),
            "client_no_context_takeover" => (1, value.is_none()),
            // The window the server may use: anything below the full one is declined.
            "server_max_window_bits" => (2, bits() == Some(15)),
            // The client can take a limit on its own window; without a value it only says so.
            "client_max_window_bits" => (3, value.is_none() || bits().is_some()),
            _ => return None,
        };
        if !ok || seen[index] {
            return None;
        }
        seen[index] = true;
    }
    Some(if seen[2] {
        RESPONSE_WINDOW_15
    } else {
        RESPONSE
    })
}

thread_local! {
    /// One compressor per thread, reset for every message: its state (hash tables and window,
    /// a few hundred KiB) is allocated once, not per socket or per message.
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::fast(), false));
}

/// `data` compressed as one message (without the final [`TAIL`]), or `None` when that is not
/// smaller than `data` itself (then it goes uncompressed).
pub fn deflate(data: &[u8]) -> Option<Bytes> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        let base = c.total_in();
        let mut out: Vec<u8> = Vec::with_capacity(data.len() / 4 + 64);
        loop {
            let consumed = (c.total_in() - base) as usize;
            let status = c.compress_vec(&data[consumed..], &mut out, FlushCompress::Sync);
            let done = (c.total_in() - base) as usize == data.len()
                && out.len() < out.capacity()
                && matches!(status, Ok(Status::Ok | Status::BufError));
            if status.is_err() {
                return None;
            }
            if done {
                break;
            }
            if out.len() >= data.len() {
                return None;
            }
            out.reserve(out.capacity().max(64));
        }
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < data.len()).then(|| Bytes::from(out))
    })
}

/// Text from this size on is compressed on a blocking thread, not on the worker thread that
/// runs the socket: a 40 MB batch takes tens of milliseconds, for which every other socket of
/// that worker would wait.
pub const OFF_THREAD: usize = 64 * 1024;

/// [`deflate`], on a blocking thread when `text` is large (see [`OFF_THREAD`]).
pub async fn deflate_text(text: &ByteString) -> Option<Bytes> {
    if text.len() < OFF_THREAD {
        return deflate(text.as_bytes());
    }
    let text = text.clone();
    actix_web::rt::task::spawn_blocking(move || deflate(text.as_bytes()))
        .await
        .ok()
        .flatten()
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit.
    TooLarge,
    /// It is not a valid deflate stream.
    Invalid,
}

/// A compressed message inflated, refused as soon as it grows past `max` bytes.
pub fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    let mut input = Vec::with_capacity(data.len() + TAIL.len());
    input.extend_from_slice(data);
    input.extend_from_slice(&TAIL);
    let mut d = Decompress::new(false);
    let mut out: Vec<u8> = Vec::with_capacity(
        data.len()
            .saturating_mul(4)
            .max(64)
            .min(max.saturating_add(1)),
    );
    loop {
        let used = d.total_in() as usize;
        let produced = d.total_out();
        let status = d
            .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Invalid)?;
        if out.len() > max {
            return Err(InflateError::TooLarge);
        }
        let done = d.total_in() as usize == input.len() && out.len() < out.capacity();
        if status == Status::StreamEnd || done {
            return Ok(out);
        }
        if out.len() == out.capacity() {
            // One byte past the limit is enough to know it is too large.
            out.reserve_exact(
                out.capacity()
                    .max(64)
                    .min(max.saturating_add(1) - out.len()),
            );
        } else if d.total_in() as usize == used && d.total_out() == produced {
            // No progress with input left and room to spare: not a stream that can end.
            return Err(InflateError::Invalid);
        }
    }
}

/// A frame rendered once and queued for many sockets (a batch), with its compressed form made
/// by the first socket that needs it and shared by the rest.
#[derive(Clone)]
pub struct SharedFrame(Arc<Shared>);

struct Shared {
    text: ByteString,
    deflated: OnceCell<Option<Bytes>>,
}

impl SharedFrame {
    pub fn new(text: ByteString) -> SharedFrame {
        SharedFrame(Arc::new(Shared {
            text,
            deflated: OnceCell::new(),
        }))
    }

    pub fn text(&self) -> &ByteString {
        &self.0.text
    }

    /// The text compressed (see [`deflate_text`]), made once: the sockets that ask while it is
    /// being made wait for it.
    pub async fn deflated(&self) -> Option<&Bytes> {
        self.0
            .deflated
            .get_or_init(|| deflate_text(&self.0.text))
            .await
            .as_ref()
    }
}

impl From<ByteString> for SharedFrame {
    fn from(text: ByteString) -> SharedFrame {
        SharedFrame::new(text)
    }
}

impl std::fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SharedFrame").field(&self.0.text).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_accepted_only_when_they_can_be_honoured() {
        for ok in [
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=10; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits=15; client_no_context_takeover",
            "x-webkit-deflate-frame, permessage-deflate",
            "permessage-deflate; server_max_window_bits=10, permessage-deflate",
            "Permessage-Deflate; Client_Max_Window_Bits=\"12\"",
        ] {
            assert!(accept([ok]).is_some(), "{ok}");
        }
        for no in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown_param",
            "permessage-deflatex",
        ] {
            assert_eq!(accept([no]), None, "{no:?}");
        }
        assert_eq!(accept(["foo", "permessage-deflate"]), Some(RESPONSE));
        // A window the server was asked to keep to is named in the answer.
        assert_eq!(
            accept(["permessage-deflate; server_max_window_bits=15"]),
            Some(RESPONSE_WINDOW_15)
        );
        assert_eq!(
            accept(["permessage-deflate; server_max_window_bits=9, permessage-deflate"]),
            Some(RESPONSE)
        );
    }

    #[test]
    fn a_message_survives_deflate_and_inflate() {
        let text: String = (0..2000)
            .map(|i| format!("{{\"type\":\"source_state_event\",\"id\":{i}}},"))
            .collect();
        let z = deflate(text.as_bytes()).unwrap_or_default();
        assert!(
            !z.is_empty() && z.len() < text.len() / 4,
            "{} bytes",
            z.len()
        );
        assert_eq!(inflate(&z, text.len()), Ok(text.clone().into_bytes()));
        // The compressor is reset between messages: the same input gives the same bytes.
        assert_eq!(deflate(text.as_bytes()).unwrap_or_default(), z);
        // One byte less room is refused, and early: not by inflating it all.
        assert_eq!(inflate(&z, text.len() - 1), Err(InflateError::TooLarge));
    }

    #[test]
    fn incompressible_or_tiny_messages_stay_as_they_are() {
        assert_eq!(deflate(b"x"), None);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(deflate(&noise), None);
    }

    #[test]
    fn a_bomb_is_refused_at_the_limit() {
        // Ten megabytes in a frame that fits the default limit.
        let zeros = vec![b'0'; 10_000_000];
        let z = deflate(&zeros).unwrap_or_default();
        assert!(!z.is_empty() && z.len() < 262_144, "{}", z.len());
        assert_eq!(inflate(&z, 262_144), Err(InflateError::TooLarge));
    }

    #[test]
    fn garbage_is_invalid() {
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff], 1024),
            Err(InflateError::Invalid)
        );
    }

    #[actix_web::test]
    async fn a_shared_frame_is_compressed_once_on_or_off_the_worker_thread() {
        for n in [1000, OFF_THREAD] {
            let f = SharedFrame::new(ByteString::from("abc".repeat(n)));
            let g = f.clone();
            let a = f.deflated().await.map(|b| b.as_ptr());
            let b = g.deflated().await.map(|b| b.as_ptr());
            assert!(a.is_some());
            assert_eq!(a, b);
        }
    }
}
