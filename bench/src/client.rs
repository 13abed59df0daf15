//! The dashboards: one task per WebSocket client (tokio-tungstenite over a real loopback TCP
//! socket, optionally bound to its own 127.0.0.x source address), subscribing the way Navixy
//! clients do and timing everything on the bench clock.
//!
//! Each received state is checked and timed: `tracker_id` and `gps.alt` (the writer's batch
//! number) are read straight from the frame bytes; per tracker, batch numbers must never go
//! backwards; commit → receipt latency is recorded into the histogram of the measurement window
//! the batch belongs to; at the end every client compares the last state it holds for each
//! tracker with the last one written.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use memchr::memmem::Finder;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::stats::{now_ns, Histogram};
use crate::writer::Tape;
use crate::wsraw::{self, Incoming, RawWs};

/// Most tracker ids in one subscribe message: the gateway's default limit (10,000 ids; its
/// 256 KiB frame limit holds them).
const IDS_PER_MESSAGE: usize = 10_000;

const STATE_PREFIX: &[u8] = br#"{"type":"event","event":"state","#;
const BATCH_PREFIX: &[u8] = br#"{"type":"event","event":"state_batch","#;
const RESPONSE_PREFIX: &[u8] = br#"{"type":"response""#;
const ERROR_PREFIX: &[u8] = br#"{"type":"error""#;

static TRACKER_ID: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"tracker_id\":"));
static ALT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"alt\":"));
static NORMAL: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"normal\""));

/// What a client subscribes to.
#[derive(Debug, Clone)]
pub enum Sub {
    /// `state` events for trackers `lo..lo + count`.
    State {
        lo: i64,
        count: usize,
        format: &'static str,
    },
    /// One `state_batch` request with target `all` for a fleet of `fleet` trackers.
    Batch {
        rate: &'static str,
        format: &'static str,
        fleet: i64,
    },
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub sub: Sub,
    /// Source address to bind before connecting (127.0.0.x), to get past the ~28k ephemeral
    /// ports of one address pair.
    pub source: Option<Ipv4Addr>,
    /// Stops reading (for good) when the `slow` signal fires.
    pub slow: bool,
    /// Records latency and checks the final states (false for the slow client).
    pub record: bool,
    /// Reads every item of a batch (true) or only counts and times batch frames (false).
    pub parse_batches: bool,
    /// Offers `permessage-deflate` (through [`RawWs`], as tungstenite has no compression).
    pub deflate: bool,
}

/// A client's socket: tungstenite, or the small client that speaks compression.
enum Conn {
    Plain(Box<WebSocketStream<TcpStream>>),
    Deflate(Box<RawWs>),
}

/// What a read gave.
enum Got {
    /// A text message as it came: compressed or not.
    Text(Vec<u8>, bool),
    Other,
    Closed,
    Failed(String),
}

impl Conn {
    async fn send(&mut self, text: String) -> bool {
        match self {
            Conn::Plain(ws) => ws.send(Message::Text(text)).await.is_ok(),
            Conn::Deflate(ws) => ws.send_text(text.as_bytes(), false).await.is_ok(),
        }
    }

    async fn next(&mut self) -> Got {
        match self {
            Conn::Plain(ws) => match ws.next().await {
                Some(Ok(Message::Text(t))) => Got::Text(t.into_bytes(), false),
                Some(Ok(Message::Close(_))) | None => Got::Closed,
                Some(Ok(_)) => Got::Other, // ping (answered by tungstenite), pong, binary
                Some(Err(e)) => Got::Failed(e.to_string()),
            },
            Conn::Deflate(ws) => match ws.next(false).await {
                Ok(Incoming::Text { data, compressed }) => Got::Text(data, compressed),
                Ok(Incoming::Binary) => Got::Other,
                Ok(Incoming::Close(_)) => Got::Closed,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Got::Closed,
                Err(e) => Got::Failed(e.to_string()),
            },
        }
    }

    async fn close(&mut self) {
        let _ = match self {
            Conn::Plain(ws) => SinkExt::close(ws.as_mut()).await.map_err(drop),
            Conn::Deflate(ws) => ws.close().await.map_err(drop),
        };
    }
}

/// Signals from the orchestrator.
#[derive(Clone)]
pub struct Control {
    /// Subscribe once this is true (clients connect first, then wait).
    pub go: watch::Receiver<bool>,
    /// Slow clients stop reading once this is true.
    pub slow: watch::Receiver<bool>,
    /// Every client checks its final states, closes and ends once this is true.
    pub stop: watch::Receiver<bool>,
}

/// Error counters, by kind.
#[derive(Default)]
pub struct Errors {
    pub connect: AtomicU64,
    pub handshake: AtomicU64,
    pub subscribe: AtomicU64,
    pub order: AtomicU64,
    pub parse: AtomicU64,
    pub unexpected_tracker: AtomicU64,
    pub closed: AtomicU64,
}

impl Errors {
    /// Adds `v` to the counter named `kind` (as [`Errors::snapshot`] names them); false for a
    /// name it does not know.
    pub fn add(&self, kind: &str, v: u64) -> bool {
        let counter = match kind {
            "connect" => &self.connect,
            "handshake" => &self.handshake,
            "subscribe" => &self.subscribe,
            "order" => &self.order,
            "parse" => &self.parse,
            "unexpected_tracker" => &self.unexpected_tracker,
            "closed" => &self.closed,
            _ => return false,
        };
        counter.fetch_add(v, Ordering::Relaxed);
        true
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for (k, v) in [
            ("connect", &self.connect),
            ("handshake", &self.handshake),
            ("subscribe", &self.subscribe),
            ("order", &self.order),
            ("parse", &self.parse),
            ("unexpected_tracker", &self.unexpected_tracker),
            ("closed", &self.closed),
        ] {
            let v = v.load(Ordering::Relaxed);
            if v > 0 {
                m.insert(k, v);
            }
        }
        m
    }
}

/// What all clients of a scenario share: counters, latency histograms (one per window).
pub struct Board {
    pub tape: Arc<Tape>,
    pub connected: AtomicUsize,
    /// Clients whose subscription succeeded (response and initial states received).
    pub subscribed: AtomicUsize,
    /// Clients that got as far as they will: subscribed, or failed before.
    pub settled: AtomicUsize,
    pub done: AtomicUsize,
    pub state_frames: AtomicU64,
    pub batch_frames: AtomicU64,
    pub batch_entries: AtomicU64,
    pub other_frames: AtomicU64,
    pub bytes: AtomicU64,
    pub duplicates: AtomicU64,
    pub hist: [Histogram; 2],
    /// States received (by recording clients) of the batches of each window.
    pub window_states: [AtomicU64; 2],
    deferred: Mutex<Vec<(u32, u64)>>,
    /// Per client: first subscribe message sent → (last) response received.
    pub subscribe_ns: Mutex<Vec<u64>>,
    /// Per client: first subscribe message sent → every initial state (or the first batch).
    pub initial_ns: Mutex<Vec<u64>>,
    /// Per client: when the (last) response arrived, on the bench clock.
    pub answered_at: Mutex<Vec<u64>>,
    pub errors: Errors,
    pub first_error: Mutex<Option<String>>,
    /// Final check: trackers whose last written state never arrived, and trackers checked.
    pub stale: AtomicU64,
    pub checked: AtomicU64,
    /// Bench-clock bounds of the batch-period window `[start, end]`.
    pub period_window: [AtomicU64; 2],
    /// Per batch client: (batches received in the window, largest gap between them in ns).
    pub periods: Mutex<Vec<(usize, u64)>>,
    /// Entries of the first batch each batch client received.
    pub first_batch_entries: Mutex<Vec<u64>>,
    /// Log every timed receipt as (batch, receipt time) instead of timing it: a worker process
    /// has no commit times, and hands its log to the parent (`worker.rs`).
    log_receipts: bool,
    pub receipts: Mutex<Vec<(u32, u64)>>,
}

impl Board {
    pub fn new(tape: Arc<Tape>) -> Arc<Board> {
        Board::build(tape, false)
    }

    /// A board that logs receipts for another process to time (see `log_receipts`).
    pub fn logging(tape: Arc<Tape>) -> Arc<Board> {
        Board::build(tape, true)
    }

    fn build(tape: Arc<Tape>, log_receipts: bool) -> Arc<Board> {
        Arc::new(Board {
            tape,
            connected: AtomicUsize::new(0),
            subscribed: AtomicUsize::new(0),
            settled: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            state_frames: AtomicU64::new(0),
            batch_frames: AtomicU64::new(0),
            batch_entries: AtomicU64::new(0),
            other_frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            hist: [Histogram::default(), Histogram::default()],
            window_states: [AtomicU64::new(0), AtomicU64::new(0)],
            deferred: Mutex::new(Vec::new()),
            subscribe_ns: Mutex::new(Vec::new()),
            initial_ns: Mutex::new(Vec::new()),
            answered_at: Mutex::new(Vec::new()),
            errors: Errors::default(),
            first_error: Mutex::new(None),
            stale: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            period_window: [AtomicU64::new(0), AtomicU64::new(u64::MAX)],
            periods: Mutex::new(Vec::new()),
            first_batch_entries: Mutex::new(Vec::new()),
            log_receipts,
            receipts: Mutex::new(Vec::new()),
        })
    }

    pub fn note_error(&self, what: &str) {
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(what.chars().take(300).collect());
        }
    }

    /// Times a received state of batch `seq` (deferred if its commit time is not known yet:
    /// the event beat the writer's COMMIT reply to the bench).
    pub fn time(&self, seq: u32, at: u64) {
        if self.log_receipts {
            self.receipts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((seq, at));
            return;
        }
        let Some(w) = self.tape.window_of(seq) else {
            return;
        };
        self.window_states[w].fetch_add(1, Ordering::Relaxed);
        match self.tape.commit_ns(seq) {
            Some(c) => self.hist[w].record_ns(at.saturating_sub(c)),
            None => self
                .deferred
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((seq, at)),
        }
    }

    /// Records the deferred receipts (call after the writers stopped).
    pub fn resolve_deferred(&self) {
        let deferred =
            std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        for (seq, at) in deferred {
            if let (Some(w), Some(c)) = (self.tape.window_of(seq), self.tape.commit_ns(seq)) {
                self.hist[w].record_ns(at.saturating_sub(c));
            }
        }
    }

    /// Frames of any kind received so far.
    pub fn frames(&self) -> u64 {
        self.state_frames.load(Ordering::Relaxed)
            + self.batch_frames.load(Ordering::Relaxed)
            + self.other_frames.load(Ordering::Relaxed)
    }
}

/// Reads an unsigned or negative decimal integer at the start of `b`.
fn parse_int(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    let mut v: i64 = 0;
    let mut n = 0;
    for &c in digits.iter().take(19) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v * 10 + i64::from(c - b'0');
        n += 1;
    }
    (n > 0).then_some(if neg { -v } else { v })
}

/// Finds the next `"tracker_id":N … "alt":M` pair at or after `from`: (id, alt, end offset).
pub fn next_state(frame: &[u8], from: usize) -> Option<(i64, i64, usize)> {
    let rest = frame.get(from..)?;
    let t = TRACKER_ID.find(rest)? + TRACKER_ID.needle().len();
    let id = parse_int(&rest[t..])?;
    let a = t + ALT.find(&rest[t..])? + ALT.needle().len();
    let alt = parse_int(&rest[a..])?;
    Some((id, alt, from + a))
}

/// Per-tracker bookkeeping of one client.
struct Track {
    lo: i64,
    last: Vec<u32>,
}

impl Track {
    fn see(&mut self, board: &Board, id: i64, alt: i64, at: u64, record: bool) {
        let Some(i) = usize::try_from(id - self.lo)
            .ok()
            .filter(|i| *i < self.last.len())
        else {
            board
                .errors
                .unexpected_tracker
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let seq = u32::try_from(alt).unwrap_or(0);
        let last = self.last[i];
        if seq < last {
            board.errors.order.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if seq == last && seq != 0 {
            board.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        self.last[i] = seq;
        if record && seq != 0 {
            board.time(seq, at);
        }
    }

    /// Trackers whose last written state is not the last one received.
    fn stale(&self, tape: &Tape) -> u64 {
        self.last
            .iter()
            .enumerate()
            .filter(|(i, seen)| {
                let want = tape.last_seq(self.lo + *i as i64);
                want != 0 && **seen != want
            })
            .count() as u64
    }
}

fn subscribe_messages(sub: &Sub, hash: &str) -> Vec<String> {
    match sub {
        Sub::State { lo, count, format } => {
            let ids: Vec<i64> = (*lo..*lo + *count as i64).collect();
            ids.chunks(IDS_PER_MESSAGE)
                .map(|chunk| {
                    let list: Vec<String> = chunk.iter().map(i64::to_string).collect();
                    format!(
                        r#"{{"action":"subscribe","hash":"{hash}","requests":[{{"type":"state","trackers":[{}],"format":"{format}"}}]}}"#,
                        list.join(",")
                    )
                })
                .collect()
        }
        Sub::Batch { rate, format, .. } => vec![format!(
            r#"{{"action":"subscribe","hash":"{hash}","requests":[{{"type":"state_batch","target":{{"type":"all"}},"rate_limit":"{rate}","format":"{format}"}}]}}"#
        )],
    }
}

async fn connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(src) = source {
        socket.bind(SocketAddr::from((src, 0)))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects with up to three attempts (a full accept queue or a SYN retry is not a failure of
/// the gateway's).
async fn connect_retrying(addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<TcpStream, String> {
    let mut last = String::new();
    for attempt in 0..3u64 {
        match tokio::time::timeout(Duration::from_secs(15), connect(addr, source)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "connect timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
    }
    Err(last)
}

/// One dashboard, from connect to close. `gate` bounds how many clients connect and subscribe
/// at once; the permit is released once this client's initial states have arrived.
pub async fn run(
    spec: Spec,
    addr: SocketAddr,
    hash: Arc<str>,
    board: Arc<Board>,
    mut ctl: Control,
    gate: Option<Arc<Semaphore>>,
) {
    let mut permit: Option<OwnedSemaphorePermit> = match gate {
        Some(g) => g.acquire_owned().await.ok(),
        None => None,
    };
    let stream = match connect_retrying(addr, spec.source).await {
        Ok(s) => s,
        Err(e) => {
            board.errors.connect.fetch_add(1, Ordering::Relaxed);
            board.note_error(&format!("connect: {e}"));
            board.settled.fetch_add(1, Ordering::Relaxed);
            board.done.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let connected = if spec.deflate {
        let host = addr.to_string();
        let handshake = RawWs::connect(stream, &host, "/v2/event/subscription", true);
        match tokio::time::timeout(Duration::from_secs(30), handshake).await {
            Ok(Ok(ws)) if ws.deflate => Ok(Conn::Deflate(Box::new(ws))),
            Ok(Ok(ws)) => Err(format!(
                "compression was not accepted (extensions: {:?})",
                ws.extensions
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    } else {
        let config = WebSocketConfig {
            max_message_size: Some(1 << 30),
            max_frame_size: Some(1 << 30),
            ..WebSocketConfig::default()
        };
        let url = format!("ws://{addr}/v2/event/subscription");
        let handshake = tokio_tungstenite::client_async_with_config(url, stream, Some(config));
        match tokio::time::timeout(Duration::from_secs(30), handshake).await {
            Ok(Ok((ws, _))) => Ok(Conn::Plain(Box::new(ws))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    };
    let mut ws = match connected {
        Ok(ws) => ws,
        Err(why) => {
            board.errors.handshake.fetch_add(1, Ordering::Relaxed);
            board.note_error(&format!("handshake: {why}"));
            board.settled.fetch_add(1, Ordering::Relaxed);
            board.done.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    board.connected.fetch_add(1, Ordering::Relaxed);
    // Wait for the go signal (a burst of subscribes starts at once), or stop.
    while !*ctl.go.borrow() && !*ctl.stop.borrow() {
        tokio::select! {
            r = ctl.go.changed() => if r.is_err() { break },
            _ = ctl.stop.changed() => {}
        }
    }
    if *ctl.stop.borrow() {
        board.settled.fetch_add(1, Ordering::Relaxed);
        board.done.fetch_add(1, Ordering::Relaxed);
        return;
    }

    let (mut track, fleet_len) = match &spec.sub {
        Sub::State { lo, count, .. } => (
            Track {
                lo: *lo,
                last: vec![0; *count],
            },
            *count,
        ),
        Sub::Batch { fleet, .. } => {
            let n = usize::try_from(*fleet).unwrap_or(0);
            (
                Track {
                    lo: 1,
                    last: if spec.parse_batches {
                        vec![0; n]
                    } else {
                        Vec::new()
                    },
                },
                n,
            )
        }
    };
    let is_batch = matches!(spec.sub, Sub::Batch { .. });
    let messages = subscribe_messages(&spec.sub, &hash);
    let mut pending = messages.len();
    let t0 = now_ns();
    let mut send_failed = false;
    for m in messages {
        if !ws.send(m).await {
            send_failed = true;
            break;
        }
    }
    if send_failed {
        board.errors.subscribe.fetch_add(1, Ordering::Relaxed);
        board.note_error("subscribe: send failed");
    }

    let mut normals = 0usize;
    let mut initial_left = 0usize;
    let mut initial_done = false;
    let mut settled = false;
    let mut subscribe_failed = send_failed;
    let mut stopping = false;
    let mut reading = true;
    let mut batch_times: Vec<u64> = Vec::new();
    let mut first_batch = true;
    loop {
        let msg = tokio::select! {
            biased;
            _ = ctl.stop.changed() => { stopping = true; break }
            r = ctl.slow.changed(), if spec.slow && reading && initial_done => {
                if r.is_ok() && *ctl.slow.borrow() {
                    reading = false;
                }
                continue;
            }
            m = ws.next(), if reading => m,
        };
        let at = now_ns();
        let (wire, compressed) = match msg {
            Got::Text(t, compressed) => (t, compressed),
            Got::Closed => {
                board.errors.closed.fetch_add(1, Ordering::Relaxed);
                board.note_error("the gateway closed the socket");
                break;
            }
            Got::Other => continue,
            Got::Failed(e) => {
                board.errors.closed.fetch_add(1, Ordering::Relaxed);
                board.note_error(&format!("read: {e}"));
                break;
            }
        };
        board.bytes.fetch_add(wire.len() as u64, Ordering::Relaxed);
        // A compressed message is inflated whole where it is read whole (every frame of a probe;
        // a `state` subscribe response, whose statuses tell how many initial states follow);
        // otherwise only its first bytes, to tell what it is. A hundred dashboards each
        // inflating their first batch of 100,000 entries (25 MB) took the bench more CPU than
        // the gateway spent sending it, and their subscribe responses (1.7 MB each) half as
        // much again: a batch dashboard's statuses are counted on the probes only.
        let text = if !compressed {
            wire
        } else {
            let whole = spec.parse_batches;
            let inflated = if whole && wire.len() >= 64 * 1024 {
                // A probe's large frame (a first batch inflates to 40 MB) is inflated off the
                // runtime's threads: on them it held up the other dashboards' reads, and so
                // their receipt times, by tens of milliseconds a probe.
                tokio::task::spawn_blocking(move || wsraw::inflate(&wire))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            } else {
                wsraw::inflate_prefix(&wire, if whole { usize::MAX } else { 64 }).and_then(|t| {
                    if !whole && !is_batch && pending > 0 && t.starts_with(RESPONSE_PREFIX) {
                        wsraw::inflate(&wire)
                    } else {
                        Ok(t)
                    }
                })
            };
            match inflated {
                Ok(t) => t,
                Err(e) => {
                    board.errors.parse.fetch_add(1, Ordering::Relaxed);
                    board.note_error(&format!("inflate: {e}"));
                    continue;
                }
            }
        };
        let b = text.as_slice();
        if b.starts_with(STATE_PREFIX) {
            board.state_frames.fetch_add(1, Ordering::Relaxed);
            match next_state(b, 0) {
                Some((id, alt, _)) => track.see(&board, id, alt, at, spec.record),
                None => {
                    board.errors.parse.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !initial_done {
                // Each response announces its trackers' initial states, which follow it.
                initial_left = initial_left.saturating_sub(1);
            }
        } else if b.starts_with(BATCH_PREFIX) {
            board.batch_frames.fetch_add(1, Ordering::Relaxed);
            let mut entries = 0u64;
            if spec.parse_batches {
                let mut parse = || {
                    let mut pos = 0;
                    while let Some((id, alt, end)) = next_state(b, pos) {
                        track.see(&board, id, alt, at, spec.record);
                        entries += 1;
                        pos = end;
                    }
                };
                // A first batch (40 MB) is parsed with this worker thread handed over to the
                // other dashboards, as it is inflated (above): they are not kept waiting.
                let multi = tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::MultiThread;
                if multi && b.len() >= 1 << 20 {
                    tokio::task::block_in_place(parse);
                } else {
                    parse();
                }
                board.batch_entries.fetch_add(entries, Ordering::Relaxed);
            }
            if first_batch {
                first_batch = false;
                if spec.parse_batches {
                    board
                        .first_batch_entries
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(entries);
                }
            } else {
                batch_times.push(at);
            }
            if !initial_done && pending == 0 {
                initial_left = 0;
            }
        } else if b.starts_with(RESPONSE_PREFIX) && pending > 0 {
            pending -= 1;
            // What a batch dashboard that is not a probe read of its response is the prefix.
            let counted = !is_batch || spec.parse_batches || !compressed;
            let n = NORMAL.find_iter(b).count();
            normals += n;
            if !is_batch {
                initial_left += n;
            } else {
                initial_left = 1; // the first batch
            }
            if pending == 0 {
                board
                    .subscribe_ns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(at - t0);
                board
                    .answered_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(at);
                if counted && normals != fleet_len {
                    subscribe_failed = true;
                    board.errors.subscribe.fetch_add(1, Ordering::Relaxed);
                    board.note_error(&format!(
                        "subscribe answered {normals} trackers normal of {fleet_len}"
                    ));
                }
            }
        } else if b.starts_with(ERROR_PREFIX) {
            pending = pending.saturating_sub(1);
            subscribe_failed = true;
            board.errors.subscribe.fetch_add(1, Ordering::Relaxed);
            board.note_error(&format!("error frame: {}", String::from_utf8_lossy(b)));
        } else {
            board.other_frames.fetch_add(1, Ordering::Relaxed);
        }
        if !initial_done && pending == 0 && initial_left == 0 && !subscribe_failed {
            initial_done = true;
            board
                .initial_ns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(at - t0);
            board.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        if !settled && (initial_done || (pending == 0 && subscribe_failed)) {
            settled = true;
            board.settled.fetch_add(1, Ordering::Relaxed);
            permit.take();
        }
    }
    permit.take();
    if !settled {
        board.settled.fetch_add(1, Ordering::Relaxed);
    }

    if stopping && spec.record && initial_done && !track.last.is_empty() {
        board
            .stale
            .fetch_add(track.stale(&board.tape), Ordering::Relaxed);
        board
            .checked
            .fetch_add(track.last.len() as u64, Ordering::Relaxed);
    }
    if is_batch {
        let from = board.period_window[0].load(Ordering::Relaxed);
        let to = board.period_window[1].load(Ordering::Relaxed);
        let inside: Vec<u64> = batch_times
            .into_iter()
            .filter(|t| *t >= from && *t <= to)
            .collect();
        let gap = inside.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        board
            .periods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((inside.len(), gap));
    }
    if reading {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close()).await;
    }
    board.done.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_frames_are_read_without_a_json_parser() {
        let f = br#"{"type":"event","event":"state","user_time":"2026-01-01 00:00:00","tracker_id":1234,"data":{"source_id":1001234,"gps":{"updated":"x","signal_level":100,"location":{"lat":1.0,"lng":2.0},"heading":5,"speed":3,"alt":987},"connection_status":"active"}}"#;
        assert_eq!(next_state(f, 0).map(|(i, a, _)| (i, a)), Some((1234, 987)));
        let batch = br#"{"type":"event","event":"state_batch","user_time":"x","data":[{"type":"source_state_event","tracker_id":1,"state":{"gps":{"alt":5}}},{"type":"source_state_event","tracker_id":2,"state":{"gps":{"alt":-6}}}]}"#;
        let mut pos = 0;
        let mut seen = Vec::new();
        while let Some((id, alt, end)) = next_state(batch, pos) {
            seen.push((id, alt));
            pos = end;
        }
        assert_eq!(seen, vec![(1, 5), (2, -6)]);
    }

    #[test]
    fn large_subscriptions_are_split() {
        let m = subscribe_messages(
            &Sub::State {
                lo: 1,
                count: 20_000,
                format: "full",
            },
            "h",
        );
        assert_eq!(m.len(), 2);
        assert!(m[0].len() < 262_144);
    }
}
