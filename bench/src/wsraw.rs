//! A small WebSocket client that speaks `permessage-deflate` (RFC 7692), which tungstenite does
//! not: the benchmark's batch dashboards use it as browsers would, and the gateway's tests
//! (`tests/gateway/compression.rs`, which includes this file) check the extension on the wire
//! with it. Client side only: frames it sends are masked; pings are answered.

use std::io;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a compressed message ends with before it is sent (RFC 7692 §7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The offer the client makes (what Chromium sends).
pub const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A message from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text message: its payload (inflated when asked to), and whether it came compressed.
    Text {
        data: Vec<u8>,
        compressed: bool,
    },
    Binary,
    Close(Option<u16>),
}

pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the unread bytes of `buf` start.
    at: usize,
    /// The server accepted `permessage-deflate`.
    pub deflate: bool,
    /// The server's `Sec-WebSocket-Extensions` answer, if any.
    pub extensions: Option<String>,
    /// A fragmented message being put together: (text, compressed, payload).
    partial: Option<(bool, bool, Vec<u8>)>,
}

impl RawWs {
    /// The opening handshake over `stream` for `path` on `host`, offering compression when
    /// `offer_deflate`.
    pub async fn connect(
        stream: TcpStream,
        host: &str,
        path: &str,
        offer_deflate: bool,
    ) -> io::Result<RawWs> {
        let offer = if offer_deflate { OFFER } else { "" };
        RawWs::connect_offering(stream, host, path, offer).await
    }

    /// [`RawWs::connect`] with this `Sec-WebSocket-Extensions` offer (none if empty).
    pub async fn connect_offering(
        mut stream: TcpStream,
        host: &str,
        path: &str,
        offer: &str,
    ) -> io::Result<RawWs> {
        let offer = if offer.is_empty() {
            String::new()
        } else {
            format!("Sec-WebSocket-Extensions: {offer}\r\n")
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(4096);
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 * 1024 || stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::other("no handshake response"));
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(io::Error::other(format!("handshake refused: {head}")));
        }
        let extensions = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        });
        let deflate = extensions
            .as_deref()
            .is_some_and(|e| e.starts_with("permessage-deflate"));
        Ok(RawWs {
            stream,
            buf,
            at: end,
            deflate,
            extensions,
            partial: None,
        })
    }

    /// Sends a text message, compressed when `compress` (and negotiated).
    pub async fn send_text(&mut self, text: &[u8], compress: bool) -> io::Result<()> {
        if compress && self.deflate {
            let z = deflate(text);
            self.send_frame(0x80 | 0x40 | 0x1, &z).await
        } else {
            self.send_frame(0x81, text).await
        }
    }

    /// Sends one frame as it is: `first` is the header's first byte (FIN, RSV1, opcode).
    pub async fn send_frame(&mut self, first: u8, payload: &[u8]) -> io::Result<()> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = Vec::with_capacity(payload.len() + 14);
        out.push(first);
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
        self.stream.write_all(&out).await
    }

    /// Writes bytes as they are (a frame's header alone, say): for the gateway's tests.
    #[allow(dead_code)]
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Sends a close frame.
    pub async fn close(&mut self) -> io::Result<()> {
        self.send_frame(0x88, &1000u16.to_be_bytes()).await
    }

    /// The next message: pings are answered and pongs skipped. A compressed text message is
    /// inflated when `inflate`, or given as it came.
    pub async fn next(&mut self, inflate_text: bool) -> io::Result<Incoming> {
        loop {
            let Some((first, payload)) = self.frame().await? else {
                return Err(io::ErrorKind::UnexpectedEof.into());
            };
            let (fin, rsv1, opcode) = (first & 0x80 != 0, first & 0x40 != 0, first & 0x0F);
            match opcode {
                0x9 => self.send_frame(0x8A, &payload).await?,
                0xA => {}
                0x8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Ok(Incoming::Close(code));
                }
                0x0..=0x2 => {
                    let (text, compressed, data) = match (opcode, self.partial.take()) {
                        (0x0, Some((t, c, mut data))) => {
                            data.extend_from_slice(&payload);
                            (t, c, data)
                        }
                        (0x1 | 0x2, None) => (opcode == 0x1, rsv1, payload),
                        _ => return Err(io::Error::other("bad fragment sequence")),
                    };
                    if !fin {
                        self.partial = Some((text, compressed, data));
                        continue;
                    }
                    if compressed && !self.deflate {
                        return Err(io::Error::other("compressed frame without the extension"));
                    }
                    if !text {
                        return Ok(Incoming::Binary);
                    }
                    let data = if compressed && inflate_text {
                        inflate(&data)?
                    } else {
                        data
                    };
                    return Ok(Incoming::Text { data, compressed });
                }
                other => return Err(io::Error::other(format!("opcode {other}"))),
            }
        }
    }

    /// The next whole frame: (first header byte, payload), or `None` at the end of the stream.
    async fn frame(&mut self) -> io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            if let Some((first, start, len)) = header(&self.buf[self.at..]) {
                if self.buf.len() - self.at >= start + len {
                    let from = self.at + start;
                    let payload = self.buf[from..from + len].to_vec();
                    self.at = from + len;
                    if self.at == self.buf.len() {
                        self.buf.clear();
                        self.at = 0;
                    }
                    return Ok(Some((first, payload)));
                }
                self.buf.reserve(start + len - (self.buf.len() - self.at));
            }
            if self.at > 0 && self.at * 2 >= self.buf.len() {
                self.buf.drain(..self.at);
                self.at = 0;
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// A server frame's header: (first byte, header length, payload length), once all of it is in.
fn header(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (&first, &second) = (b.first()?, b.get(1)?);
    match second & 0x7F {
        126 => Some((
            first,
            4,
            u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize,
        )),
        127 => {
            let bytes: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            Some((first, 10, u64::from_be_bytes(bytes) as usize))
        }
        n => Some((first, 2, n as usize)),
    }
}

/// One message compressed on its own (no context takeover), without the final tail.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::fast(), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    loop {
        let used = c.total_in() as usize;
        let _ = c.compress_vec(&data[used..], &mut out, FlushCompress::Sync);
        if c.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

/// One compressed message inflated (no context takeover).
pub fn inflate(data: &[u8]) -> io::Result<Vec<u8>> {
    inflate_prefix(data, usize::MAX)
}

/// The first `max` bytes (or all) of a compressed message, inflating no more than that.
pub fn inflate_prefix(data: &[u8], max: usize) -> io::Result<Vec<u8>> {
    let mut input = Vec::with_capacity(data.len() + TAIL.len());
    input.extend_from_slice(data);
    input.extend_from_slice(&TAIL);
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(data.len().saturating_mul(8).clamp(64, max.max(64)));
    loop {
        let used = d.total_in() as usize;
        let produced = d.total_out();
        let status = d
            .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
            .map_err(io::Error::other)?;
        if out.len() >= max {
            out.truncate(max);
            return Ok(out);
        }
        if status == Status::StreamEnd
            || (d.total_in() as usize == input.len() && out.len() < out.capacity())
        {
            return Ok(out);
        }
        if out.len() < out.capacity() && d.total_in() as usize == used && d.total_out() == produced
        {
            return Err(io::Error::other("truncated deflate stream"));
        }
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(64).min(max - out.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_gateway_compresses_inflates_whole_or_in_part() {
        let text: String = (0..20_000)
            .map(|i| {
                format!(
                    "{{\"type\":\"source_state_event\",\"tracker_id\":{i},\"alt\":{}}},",
                    i * 7
                )
            })
            .collect();
        let z = fleetgate::ws::deflate::deflate(text.as_bytes()).unwrap_or_default();
        assert!(!z.is_empty());
        assert_eq!(inflate(&z).ok(), Some(text.clone().into_bytes()));
        assert_eq!(
            inflate_prefix(&z, 64).ok(),
            Some(text.as_bytes()[..64].to_vec())
        );
        // And what this client compresses, the gateway inflates.
        let back = fleetgate::ws::deflate::inflate(&deflate(text.as_bytes()), usize::MAX);
        assert_eq!(back.ok(), Some(text.into_bytes()));
    }
}
