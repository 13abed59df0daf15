//! One task per socket. The upgrade handler only does the handshake and spawns [`Connection::run`],
//! which owns the socket's sessions, its watched trackers, its outbound queue and its heartbeat
//! clock, and always ends with a best-effort close and a cleanup of its hub entries.
//!
//! Per-tracker ordering is enforced here: each watched tracker remembers the change numbers of
//! the last state and lifecycle event sent, so a state older than one already sent (for example
//! one queued while the subscribe snapshot was being read) is never written.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use actix_http::body::{BodyStream, MessageBody};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason};
use bytestring::ByteString;
use chrono::Utc;
use chrono_tz::Tz;
use tracing::Instrument;

use super::atmosphere::Transport;
use super::deflate::{self, SharedFrame};
use super::protocol::{self, Action, ClientMessage, Item, ProtoError, StatusMap};
use super::reader::{self, Message, ReadError, Reader};
use super::slots::Slot;
use super::writer::{self, Writer};
use crate::access;
use crate::batch::{BatchGroup, GroupKey, GroupKind, Scope, Target};
use crate::db::queries;
use crate::http::error::ApiError;
use crate::hub::{ConnId, Outbox, Outgoing, TrackerFacts};
use crate::metrics::{FrameKind, SentTally};
use crate::model::{self, Format, Lifecycle, TrackerId, TrackerState, Variant};
use crate::readings::ReadingsFilter;
use crate::startup::AppState;
use crate::telemetry::session_tag;

/// Most outbox items written per wake-up before the task looks at client frames again.
const WRITE_BATCH: usize = 64;

/// A subscribe response at least this long that names a batch group's statuses goes through
/// the group's shared slot ([`BatchGroup::shared_response`]), to be compressed once.
const SHARED_RESPONSE_BYTES: usize = 64 * 1024;

/// How long a socket the gateway closes waits for the peer's answering close frame before it
/// closes the connection anyway (actix's own wait for a peer to hang up, which it replaces).
const CLOSE_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// The first wait before reading again the states a subscribe could not read, doubling after
/// each failed read up to [`OWED_RETRY_MAX`].
const OWED_RETRY_MIN: Duration = Duration::from_millis(100);
const OWED_RETRY_MAX: Duration = Duration::from_secs(5);

/// What a read of owed states gives: the ids asked for and the states read.
type OwedStates = (Vec<TrackerId>, Result<Vec<TrackerState>, sqlx::Error>);

/// A read of owed states: waits for its time, then reads. Boxed, and only while states are
/// owed, so that the many sockets that owe none carry a pointer for it; dropped (and the read
/// with it) if the socket ends first.
type OwedRead = std::pin::Pin<Box<dyn std::future::Future<Output = OwedStates> + Send>>;

/// `GET /event/subscription` and `/v2/event/subscription`: the WebSocket upgrade.
pub async fn subscription(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let transport = Transport::from_query(req.query_string());
    let settings = &state.settings.websocket;
    let address = crate::http::user::client_address(&req, state.settings.api.trust_forwarded_for);
    // The handshake is checked first, so that a request that is none is told so rather than
    // counted against the socket limits; the client's frames are read by `reader` and what the
    // gateway writes goes through its own byte-bounded queue (`writer`).
    let mut response = match handshake(&req) {
        Ok(r) => r,
        Err(refused) => return Ok(*refused),
    };
    let slot = match state.sockets.take(&address) {
        Ok(slot) => slot,
        Err(refused) => {
            state.hub.metrics.sockets_refused[refused as usize].inc();
            // Logged once a second at most: a client in a reconnect loop would flood the log.
            if let Some(also) = state.sockets.log_gate.pass() {
                tracing::warn!(
                    %address,
                    open = state.sockets.open(),
                    limit = refused.label(),
                    also,
                    "WebSocket refused: socket limit reached (see fleetgate_sockets_refused_total)"
                );
            }
            return Err(ApiError::TooManySockets(refused).into());
        }
    };
    let accepted = settings
        .compression
        .then(|| {
            deflate::accept(
                req.headers()
                    .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                    .filter_map(|v| v.to_str().ok()),
            )
        })
        .flatten();
    if let Some(answer) = accepted {
        response.insert_header((header::SEC_WEBSOCKET_EXTENSIONS, answer));
    }
    let deflate = accepted.is_some();
    let deflate_min = deflate.then_some(settings.compression_min_bytes);
    let (session, out) = writer::channel(settings.write_buffer_bytes, deflate_min);
    let response = response.message_body(BodyStream::new(out).boxed())?.into();
    let stream = Reader::new(body, settings.max_frame_bytes.max(256), deflate);
    let conn_id = state.hub.next_conn_id();
    let peer = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into());
    let span = tracing::info_span!(
        "ws",
        conn = conn_id,
        peer = %peer,
        session = tracing::field::Empty
    );
    let conn = Connection::new(conn_id, state.get_ref().clone(), transport, session, slot);
    actix_web::rt::spawn(conn.run(stream).instrument(span));
    Ok(response)
}

/// Checks the upgrade request (RFC 6455 §4.2.1: HTTP/1.1 or later, GET, the upgrade headers,
/// version 13, a key). A refusal keeps the status and headers actix-http gives it (426 with
/// `Sec-WebSocket-Version`, 400) with the API's JSON error body (code 5), so that a browser or
/// `curl` pointed at the socket's URL learns what is wrong. (A method other than GET does not
/// get here: the route takes GET alone, and the others get code 112 as on every path.)
fn handshake(req: &HttpRequest) -> Result<actix_http::ResponseBuilder, Box<HttpResponse>> {
    use actix_http::ws::HandshakeError;
    if req.version() < actix_web::http::Version::HTTP_11 {
        let e = ApiError::BadFormat("not a WebSocket handshake: it needs HTTP/1.1 or later".into());
        return Err(Box::new(actix_web::ResponseError::error_response(&e)));
    }
    let error = match actix_http::ws::handshake(req.head()) {
        Ok(r) => return Ok(r),
        Err(e) => e,
    };
    let api = match error {
        HandshakeError::GetMethodRequired => ApiError::WrongMethod,
        ref e => ApiError::BadFormat(format!("not a WebSocket handshake: {e}")),
    };
    let refused: actix_http::Response<actix_http::body::BoxBody> = error.into();
    let mut response = actix_web::ResponseError::error_response(&api);
    *response.status_mut() = refused.status();
    for (name, value) in refused.headers() {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    Err(Box::new(response))
}

/// Queues one frame within `limit` (the idle timeout): a frame waits while the socket's write
/// queue is full, and a peer that takes nothing for that long is given up on.
async fn within<T>(
    limit: Duration,
    write: impl std::future::Future<Output = Result<T, writer::Closed>>,
) -> Result<T, Stop> {
    // Most writes are accepted at once: only arm a timer (a clock read and a timer entry) for
    // one that has to wait.
    let mut write = std::pin::pin!(write);
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    let result = match first {
        Poll::Ready(r) => Ok(r),
        Poll::Pending => tokio::time::timeout(limit, write).await,
    };
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(Stop::Gone),
        Err(_) => {
            tracing::info!("peer stopped reading: closing");
            Err(Stop::Gone)
        }
    }
}

struct Watch {
    tracker: TrackerId,
    session: Arc<str>,
    blocked: bool,
    state_change: i64,
    lifecycle_change: i64,
}

/// The trackers a socket watches, by id and by the slot the hub gave each in the socket's
/// outbox ([`Hub::subscribe`](crate::hub::Hub::subscribe)). Every state item carries its slot,
/// so the per-frame check is an index into a dense table instead of a hash lookup (with 1,000
/// trackers per socket the map's lookup was the socket task's costliest cache miss).
#[derive(Default)]
struct Watches {
    slot_of: HashMap<TrackerId, u32>,
    by_slot: Vec<Option<Watch>>,
}

impl Watches {
    fn contains(&self, id: &TrackerId) -> bool {
        self.slot_of.contains_key(id)
    }

    fn get(&self, id: &TrackerId) -> Option<&Watch> {
        let slot = *self.slot_of.get(id)?;
        self.by_slot.get(slot as usize)?.as_ref()
    }

    fn get_mut(&mut self, id: &TrackerId) -> Option<&mut Watch> {
        let slot = *self.slot_of.get(id)?;
        self.by_slot.get_mut(slot as usize)?.as_mut()
    }

    /// The watch in `slot`, if it is still `tracker`'s (an item queued before an unsubscribe
    /// may name a slot that has since gone to another tracker).
    fn at(&mut self, slot: u32, tracker: TrackerId) -> Option<&mut Watch> {
        self.by_slot
            .get_mut(slot as usize)?
            .as_mut()
            .filter(|w| w.tracker == tracker)
    }

    /// `id`'s watch, created in `slot` (the one the hub gave it) if there is none.
    fn get_or_insert(&mut self, id: TrackerId, slot: u32, session: &Arc<str>) -> &mut Watch {
        let slot = *self.slot_of.entry(id).or_insert(slot) as usize;
        if self.by_slot.len() <= slot {
            self.by_slot.resize_with(slot + 1, || None);
        }
        self.by_slot[slot].get_or_insert_with(|| Watch {
            tracker: id,
            session: session.clone(),
            blocked: false,
            state_change: 0,
            lifecycle_change: 0,
        })
    }

    fn remove(&mut self, id: &TrackerId) {
        if let Some(slot) = self.slot_of.remove(id) {
            if let Some(w) = self.by_slot.get_mut(slot as usize) {
                *w = None;
            }
        }
    }

    fn ids(&self) -> Vec<TrackerId> {
        self.slot_of.keys().copied().collect()
    }

    /// The trackers whose watch matches `f`.
    fn ids_where(&self, f: impl Fn(&Watch) -> bool) -> Vec<TrackerId> {
        self.by_slot
            .iter()
            .flatten()
            .filter(|w| f(w))
            .map(|w| w.tracker)
            .collect()
    }
}

/// Why the loop stopped.
enum Stop {
    /// The peer is gone or the socket is closed: nothing more can be written.
    Gone,
    /// Close with this reason, then give the peer a moment to answer with its own close frame.
    Close(CloseReason),
    /// The peer sent a close frame: answer it with this reason.
    Answer(CloseReason),
}

struct Connection {
    id: ConnId,
    app: AppState,
    transport: Transport,
    ws: Writer,
    outbox: Arc<Outbox>,
    /// The sessions this socket holds: each that holds a watch or a batch membership here, and
    /// the latest one subscribed with (see [`Connection::release_idle_sessions`]).
    sessions: HashSet<Arc<str>>,
    /// The session of the last subscribe that was accepted.
    latest: Option<Arc<str>>,
    /// Whether the connection's span names a session yet.
    span_session: bool,
    watches: Watches,
    /// The batch groups this socket belongs to, once per session that joined each: the socket
    /// leaves a group when no session of it holds the group any more.
    memberships: Vec<(Arc<BatchGroup>, Arc<str>)>,
    /// The last lifecycle change sent per tracker, so a tracker watched both ways sends it once.
    lifecycle_sent: HashMap<TrackerId, i64>,
    /// Likewise the last revocation whose `disallowed` event went out per tracker (a `state`
    /// watch and each batch group holding the tracker are told apart).
    disallowed_sent: HashMap<TrackerId, u64>,
    /// Trackers a subscribe answered `normal` whose current state it could not read, with the
    /// variant to send it in. Read again ([`Connection::owed_read`]) until it comes: the event
    /// processor cannot send it, since the hub does not fan out a state it already has.
    owed: HashMap<TrackerId, Variant>,
    /// When to read the owed states next, and the wait after that read if it fails.
    owed_at: Option<tokio::time::Instant>,
    owed_backoff: Duration,
    /// Frames written, added to the process's metrics after each step of the loop.
    sent: SentTally,
    /// When the notifications behind the state frames written in this step arrived.
    notified: Vec<Instant>,
    tokens: f64,
    refilled: Instant,
    /// Counted against the socket limits until the task ends.
    _slot: Slot,
}

impl Connection {
    fn new(id: ConnId, app: AppState, transport: Transport, ws: Writer, slot: Slot) -> Self {
        let cap = app.settings.websocket.queue_capacity;
        let burst = f64::from(app.settings.websocket.messages_burst.max(1));
        let outbox = app.hub.outbox(cap);
        Connection {
            id,
            app,
            transport,
            ws,
            outbox,
            sessions: HashSet::new(),
            latest: None,
            span_session: false,
            watches: Watches::default(),
            memberships: Vec::new(),
            lifecycle_sent: HashMap::new(),
            disallowed_sent: HashMap::new(),
            owed: HashMap::new(),
            owed_at: None,
            owed_backoff: OWED_RETRY_MIN,
            sent: SentTally::default(),
            notified: Vec::new(),
            tokens: burst,
            refilled: Instant::now(),
            _slot: slot,
        }
    }

    async fn run(mut self, mut stream: Reader<web::Payload>) {
        tracing::debug!("connected");
        let metrics = &self.app.hub.metrics;
        metrics.open_sockets.inc();
        if self.ws.deflates() {
            metrics.compressed_sockets.inc();
        }
        let stop = self.serve(&mut stream).await;
        self.count_sent();
        let metrics = &self.app.hub.metrics;
        metrics.open_sockets.dec();
        if self.ws.deflates() {
            metrics.compressed_sockets.dec();
        }
        // Cleanup first, so the hub stops queueing for this socket.
        self.outbox.close();
        self.app.hub.unsubscribe(self.id, &self.watches.ids());
        for hash in &self.sessions {
            self.app.hub.unregister_session(hash, self.id);
        }
        for (group, _) in &self.memberships {
            self.app.hub.batches.leave(group, self.id);
        }
        let (reason, await_answer) = match stop {
            Stop::Gone => (None, false),
            Stop::Close(reason) => (Some(reason), true),
            Stop::Answer(reason) => (Some(reason), false),
        };
        if let Some(reason) = reason {
            let close = self.ws.close(Some(reason));
            let queued = tokio::time::timeout(Duration::from_secs(2), close).await;
            if await_answer && matches!(queued, Ok(Ok(()))) {
                // The server closes the TCP connection once the peer has answered (RFC 6455
                // §7.1.1), which clients wait for; the response body ends when `self` drops.
                let answered = async {
                    while let Some(Ok(m)) = stream.recv().await {
                        if matches!(m, Message::Close) {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_ANSWER_WAIT, answered).await;
            }
        }
        tracing::debug!("disconnected");
    }

    async fn serve(&mut self, stream: &mut Reader<web::Payload>) -> Stop {
        let heartbeat = self.app.settings.websocket.heartbeat();
        let idle = self.app.settings.websocket.idle_timeout();
        let max_frame = self.app.settings.websocket.max_frame_bytes;
        if let Some(hs) = self.transport.handshake(heartbeat.as_millis() as u64) {
            match self.ws.text(hs).await {
                Ok(len) => self.sent.frame(FrameKind::Other, len),
                Err(_) => return Stop::Gone,
            }
        }
        let mut shutdown = self.app.shutdown.clone();
        if *shutdown.borrow() {
            return Stop::Close(CloseCode::Away.into());
        }
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let outbox = self.outbox.clone();
        // Grows to the largest batch this socket has seen: most sockets never need the 64
        // items (about 5 KiB) that reserving WRITE_BATCH up front cost each of them.
        let mut batch: Vec<Outgoing> = Vec::new();
        let mut owed_read: Option<OwedRead> = None;
        loop {
            if owed_read.is_none() {
                owed_read = self.owed_read_due();
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Stop::Close(CloseCode::Away.into()),
                msg = stream.recv() => {
                    last_seen = Instant::now();
                    let step = match msg {
                        None => Err(Stop::Gone),
                        Some(Ok(Message::Text(text))) => self.on_text(text, false).await,
                        // Charged before it is inflated: a few hundred bytes can stand for a
                        // message of the full size limit.
                        Some(Ok(Message::Compressed(z))) => {
                            if self.take_token() {
                                match reader::inflate_text(&z, stream.max()) {
                                    Ok(text) => self.on_text(text, true).await,
                                    Err(e) => Err(self.read_failed(e, max_frame).await),
                                }
                            } else {
                                self.send_error(None, &ProtoError::rate_limited(), None).await
                            }
                        }
                        Some(Ok(Message::Binary)) => {
                            let e = if self.take_token() {
                                ProtoError::bad_format()
                            } else {
                                ProtoError::rate_limited()
                            };
                            self.send_error(None, &e, None).await
                        }
                        Some(Ok(Message::Ping(p))) => within(idle, self.ws.pong(&p)).await,
                        Some(Ok(Message::Pong)) => Ok(()),
                        Some(Ok(Message::Close)) => Err(Stop::Answer(CloseCode::Normal.into())),
                        Some(Err(e)) => Err(self.read_failed(e, max_frame).await),
                    };
                    if let Err(stop) = step {
                        return stop;
                    }
                }
                _ = outbox.pop_batch(WRITE_BATCH, &mut batch) => {
                    for item in batch.drain(..) {
                        if let Err(stop) = self.deliver(item).await {
                            return stop;
                        }
                    }
                }
                read = async {
                    match owed_read.as_mut() {
                        Some(r) => r.await,
                        None => std::future::pending().await,
                    }
                }, if owed_read.is_some() => {
                    owed_read = None;
                    // Boxed, as subscribe is: rare, and it holds a state across its writes.
                    if let Err(stop) = Box::pin(self.owed_read(read)).await {
                        return stop;
                    }
                }
                _ = ticker.tick() => {
                    // Bytes of a message still coming count too: a peer sending a large
                    // message slowly (in fragments, or one frame in pieces) is not idle.
                    if last_seen.max(stream.received_at()).elapsed() >= idle {
                        tracing::info!(idle_ms = idle.as_millis() as u64, "peer idle: closing");
                        return Stop::Close(CloseReason {
                            code: CloseCode::Away,
                            description: Some("idle timeout".into()),
                        });
                    }
                    let beat = if self.transport.atmo_protocol {
                        self.send(ByteString::from_static("X")).await
                    } else {
                        within(idle, self.ws.ping(b"")).await
                    };
                    if let Err(stop) = beat {
                        return stop;
                    }
                }
            }
            self.count_sent();
        }
    }

    /// Writes one frame (with Atmosphere framing if negotiated). A peer that does not take it
    /// within the idle timeout is given up on.
    async fn send(&mut self, msg: ByteString) -> Result<(), Stop> {
        self.send_kind(FrameKind::of(&msg), msg).await
    }

    async fn send_kind(&mut self, kind: FrameKind, msg: ByteString) -> Result<(), Stop> {
        let frame = self.transport.frame(msg);
        let idle = self.app.settings.websocket.idle_timeout();
        let len = within(idle, self.ws.text(frame)).await?;
        self.sent.frame(kind, len);
        Ok(())
    }

    /// Sends a frame rendered once for many sockets (a batch): compressed once for all of them
    /// unless this socket's transport wraps each frame.
    async fn send_shared(&mut self, frame: SharedFrame) -> Result<(), Stop> {
        if self.transport.track_size {
            return self.send(frame.text().clone()).await;
        }
        let kind = FrameKind::of(frame.text());
        let idle = self.app.settings.websocket.idle_timeout();
        let len = within(idle, self.ws.shared(&frame)).await?;
        self.sent.frame(kind, len);
        Ok(())
    }

    /// Adds the frames written since the last call to the process's metrics: once per step of
    /// the loop (a batch of up to [`WRITE_BATCH`] items), not once per frame.
    fn count_sent(&mut self) {
        let metrics = &self.app.hub.metrics;
        if !self.notified.is_empty() {
            let now = Instant::now();
            for at in self.notified.drain(..) {
                self.sent
                    .notify_to_send(metrics, now.saturating_duration_since(at));
            }
        }
        metrics.add_sent(&mut self.sent);
    }

    async fn send_error(
        &mut self,
        action: Option<&str>,
        e: &ProtoError,
        data: Option<&serde_json::Value>,
    ) -> Result<(), Stop> {
        self.send(protocol::error_frame(action, e, data).into())
            .await
    }

    fn take_token(&mut self) -> bool {
        let ws = &self.app.settings.websocket;
        let rate = f64::from(ws.messages_per_second.max(1));
        let burst = f64::from(ws.messages_burst.max(1));
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate).min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How a socket ends when its input breaks the protocol: a frame or message over the size
    /// limit (compressed or once inflated) gets error 9 and close 1009.
    async fn read_failed(&mut self, e: ReadError, max_frame: usize) -> Stop {
        match e {
            ReadError::TooLarge => {
                let e = ProtoError::frame_too_large(max_frame);
                let _ = self.send_error(None, &e, None).await;
                Stop::Close(CloseReason {
                    code: CloseCode::Size,
                    description: Some("message too large".into()),
                })
            }
            ReadError::InvalidText => {
                tracing::debug!("text message not UTF-8");
                Stop::Close(CloseCode::Invalid.into())
            }
            ReadError::Protocol(e) => {
                tracing::debug!(error = %e, "protocol error from peer");
                Stop::Close(CloseCode::Protocol.into())
            }
        }
    }

    /// A text message; `charged`: its rate-limit token was already taken (a compressed one).
    async fn on_text(&mut self, text: ByteString, charged: bool) -> Result<(), Stop> {
        let text = text.trim();
        if text == "X" || text.is_empty() {
            return Ok(()); // Atmosphere heartbeat (or an empty keep-alive)
        }
        if !charged && !self.take_token() {
            return self
                .send_error(None, &ProtoError::rate_limited(), None)
                .await;
        }
        let msg = match protocol::parse(text) {
            Ok(m) => m,
            Err(rejection) => {
                tracing::debug!(code = rejection.error.code, "rejected client message");
                return self
                    .send(protocol::rejection_frame(&rejection).into())
                    .await;
            }
        };
        let limit = self.app.settings.websocket.max_trackers_per_request;
        if msg.tracker_count() > limit {
            let e = ProtoError::too_many_trackers(limit);
            return self
                .send_error(Some(msg.action.wire()), &e, Some(&msg.echo))
                .await;
        }
        // Boxed: these futures are large (kilobytes of state across their awaits) and rare, and
        // an unboxed one would make every idle socket's task that large.
        match msg.action {
            Action::Subscribe => Box::pin(self.subscribe(msg)).await,
            Action::Unsubscribe => Box::pin(self.unsubscribe(msg)).await,
        }
    }

    async fn subscribe(&mut self, msg: ClientMessage) -> Result<(), Stop> {
        let started = Instant::now();
        let action = Some(msg.action.wire());
        let hash: Arc<str> = match self.sessions.get(msg.hash.as_str()) {
            Some(k) => k.clone(),
            None => Arc::from(msg.hash.as_str()),
        };
        let known = self.sessions.contains(&hash);
        let hub = self.app.hub.clone();
        // Register before checking, so that a logout committed while we check still reaches us.
        // A session the hub already holds keeps its expiry; a new entry has none until read.
        hub.register_session(
            &hash,
            self.id,
            &self.outbox,
            chrono::DateTime::<Utc>::MAX_UTC,
        );
        let session = match queries::session(&self.app.pool, &hash).await {
            Ok(Some(s)) if s.live => s,
            other => {
                let ended = other.is_ok();
                if !known {
                    hub.unregister_session(&hash, self.id);
                }
                let e = match other {
                    Err(e) => ProtoError::db("session lookup", &e),
                    Ok(_) => ProtoError::session_not_found(),
                };
                self.send_error(action, &e, Some(&msg.echo)).await?;
                if ended && known {
                    // The session is over but this socket still holds it: its logout may be
                    // queued behind this message (and the registration above re-created the
                    // hub entry that logout removed), or the expiry checker has not come round
                    // yet. End it here as that logout would; a logout arriving later finds
                    // nothing left to end.
                    return self.end_session(&hash).await;
                }
                return Ok(());
            }
        };
        hub.set_session_expiry(&hash, session.expires_at);
        // The span names the connection's first session (a hash prefix, never the whole hash):
        // recorded once, since each record adds the field again to every later line of the
        // connection (a client subscribing in a loop grew its lines without bound). Lines about
        // another session name it themselves.
        if !self.span_session {
            tracing::Span::current().record("session", session_tag(&hash));
            self.span_session = true;
        }
        let tz: Tz = session.time_zone.parse().unwrap_or(chrono_tz::UTC);
        self.sessions.insert(hash.clone());

        // Requested trackers, deduplicated in request order; a later item's format wins.
        let mut order: Vec<TrackerId> = Vec::new();
        let mut format_of: HashMap<TrackerId, Format> = HashMap::new();
        for item in &msg.items {
            if let Item::State(req) = item {
                for &id in &req.trackers {
                    if format_of.insert(id, req.format).is_none() {
                        order.push(id);
                    }
                }
            }
        }
        let variant = |f: Format| Variant {
            format: f,
            tz,
            iso: msg.iso_datetime,
        };
        // Trackers new to this socket are registered before the reads, so that nothing
        // committed meanwhile is missed. Those it already watches are registered already: they
        // keep their format and time zone (and session) until the statuses accept them below.
        let mut slot_of: HashMap<TrackerId, u32> = HashMap::with_capacity(order.len());
        for f in [Format::Full, Format::Compact] {
            let ids: Vec<TrackerId> = order
                .iter()
                .copied()
                .filter(|id| format_of.get(id) == Some(&f) && !self.watches.contains(id))
                .collect();
            if !ids.is_empty() {
                let slots = hub.subscribe(self.id, &self.outbox, &ids, variant(f));
                slot_of.extend(ids.into_iter().zip(slots));
            }
        }

        // The states are read on another task while the statuses are read here, and the
        // response goes out as soon as the statuses are known; the states follow it. Both
        // reads start after the registration above, so a change committed meanwhile is
        // either in the snapshot or delivered as an event (PROTOCOL.md §5).
        let states_task = (!order.is_empty()).then(|| {
            let (pool, ids) = (self.app.pool.clone(), order.clone());
            tokio::spawn(async move { queries::states_by_ids_unsourced(&pool, &ids).await })
        });
        let statuses = match self.statuses(&session, &order).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(task) = states_task {
                    task.abort();
                }
                // Undo the registrations this request added.
                let added: Vec<TrackerId> = order
                    .iter()
                    .copied()
                    .filter(|id| !self.watches.contains(id))
                    .collect();
                hub.unsubscribe(self.id, &added);
                // A session this socket took up for this request alone is not kept.
                self.release_idle_sessions();
                let err = ProtoError::db("subscribe query", &e);
                return self.send_error(action, &err, Some(&msg.echo)).await;
            }
        };

        // Watched trackers that this session may see take the new variant now.
        for f in [Format::Full, Format::Compact] {
            let ids: Vec<TrackerId> = statuses
                .iter()
                .filter(|(id, status, facts)| {
                    matches!(*status, "normal" | "blocked")
                        && facts.is_some()
                        && format_of.get(id) == Some(&f)
                        && self.watches.contains(id)
                })
                .map(|(id, _, _)| *id)
                .collect();
            if !ids.is_empty() {
                let slots = hub.subscribe(self.id, &self.outbox, &ids, variant(f));
                slot_of.extend(ids.into_iter().zip(slots));
            }
        }
        let mut drop_ids = Vec::new();
        for (id, status, facts) in &statuses {
            match (*status, facts) {
                ("normal" | "blocked", Some(f)) => {
                    hub.observe_for(self.id, *id, *f);
                    let Some(&slot) = slot_of.get(id) else {
                        continue;
                    };
                    let w = self.watches.get_or_insert(*id, slot, &hash);
                    w.session = hash.clone();
                    if f.change_no >= w.lifecycle_change {
                        w.blocked = f.blocked;
                        w.lifecycle_change = f.change_no;
                    }
                }
                _ => {
                    if !self.watches.contains(id) {
                        drop_ids.push(*id);
                    }
                }
            }
        }
        hub.unsubscribe(self.id, &drop_ids);

        let map = StatusMap::new(statuses.iter().map(|(id, s, _)| (*id, *s)));
        // state_batch and readings_batch items: join (or create) the shared group of each.
        let capacity = self.app.settings.websocket.queue_capacity;
        let max_batches = self.app.settings.websocket.max_batch_subscriptions;
        let mut batch_results: Vec<Result<StatusMap, ProtoError>> = Vec::new();
        let mut first_batches: Vec<SharedFrame> = Vec::new();
        // The first group joined, whose slot may share this response (see below).
        let mut shared_slot: Option<Arc<BatchGroup>> = None;
        // Items of this message by group: one asked again gets the same answer, without joining
        // again (each join would send the whole first batch once more, and one message of
        // thousands of copies of an item was thousands of full batches).
        let mut asked: HashMap<GroupKey, usize> = HashMap::new();
        for item in &msg.items {
            let (target, rate, format, kind) = match item {
                Item::StateBatch(req) => (&req.target, req.rate, req.format, GroupKind::State),
                Item::ReadingsBatch(req) => (
                    &req.target,
                    req.rate,
                    Format::Full,
                    GroupKind::Readings(ReadingsFilter {
                        sensor_type: req.sensor_type.clone(),
                        include_components: req.include_components,
                    }),
                ),
                _ => continue,
            };
            let Some(target) = target.clone() else {
                batch_results.push(Err(ProtoError::invalid("`target` is required")));
                continue;
            };
            let key = GroupKey {
                scope: Scope {
                    account_id: session.account_id,
                    sub_user: session.is_sub_user.then_some(session.user_id),
                },
                target,
                rate,
                variant: variant(format),
                kind,
            };
            if let Some(&n) = asked.get(&key) {
                batch_results.push(batch_results[n].clone());
                continue;
            }
            asked.insert(key.clone(), batch_results.len());
            // Each group reads its target, runs a timer and holds a rendered batch: a socket
            // may be in at most `max_batch_subscriptions` of them. A group it is already in
            // (under any of its sessions) costs nothing more.
            let held = self.memberships.iter().any(|(g, _)| g.key == key);
            if !held && self.batch_group_count() >= max_batches {
                batch_results.push(Err(ProtoError::too_many_batches(max_batches)));
                continue;
            }
            let joined = hub
                .batches
                .join(&hub, &self.app.pool, key, self.id, &self.outbox, capacity)
                .await;
            match joined {
                Ok(j) => {
                    if !self
                        .memberships
                        .iter()
                        .any(|(g, s)| Arc::ptr_eq(g, &j.group) && *s == hash)
                    {
                        self.memberships.push((j.group.clone(), hash.clone()));
                    }
                    // A selected target answers for every id it names, as `state` does.
                    let statuses = match &j.group.key.target {
                        Target::Selected(ids) => self
                            .selected_statuses(&session, ids, &j.held)
                            .await
                            .unwrap_or(j.statuses),
                        Target::All => j.statuses,
                    };
                    batch_results.push(Ok(statuses));
                    shared_slot.get_or_insert_with(|| j.group.clone());
                    first_batches.extend(j.first_batch);
                }
                Err(e) => batch_results.push(Err(ProtoError::db("batch join", &e))),
            }
        }

        self.latest = Some(hash.clone());
        self.release_idle_sessions();

        // One response entry per requested type, in request order; several items of a type
        // share it (a success wins, status maps are merged).
        let mut per_type: Vec<(String, Result<StatusMap, ProtoError>)> = Vec::new();
        let mut map = Some(map);
        let batches_joined = batch_results.iter().filter(|r| r.is_ok()).count();
        let batches_refused = batch_results.len() - batches_joined;
        let mut batch_results = batch_results.into_iter();
        for item in &msg.items {
            let result = match item {
                Item::State(_) => match map.take() {
                    Some(m) => Ok(m),
                    None => continue,
                },
                Item::StateBatch(_) | Item::ReadingsBatch(_) => match batch_results.next() {
                    Some(r) => r,
                    None => continue,
                },
                Item::Failed { error, .. } => Err(error.clone()),
            };
            protocol::add_result(&mut per_type, item.kind(), result);
        }
        let response = protocol::subscribe_response(msg.form, &msg.events, per_type);
        match shared_slot {
            // A batch group's dashboards usually send the same request: a large response is
            // compressed once for all of them.
            Some(group) if response.len() >= SHARED_RESPONSE_BYTES => {
                self.send_shared(group.shared_response(response)).await?
            }
            _ => self.send(response.into()).await?,
        }
        for frame in first_batches {
            self.send_shared(frame).await?;
        }

        // The `normal` trackers with their source ids, which the states' read leaves out.
        let normal: HashMap<TrackerId, i64> = statuses
            .iter()
            .filter(|(_, s, _)| *s == access::NORMAL)
            .filter_map(|(id, _, facts)| Some((*id, facts.as_ref()?.source_id)))
            .collect();
        let read = match states_task {
            None => Ok(Vec::new()),
            Some(task) => match task.await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        let states = match read {
            Ok(states) => {
                // Whatever an earlier subscribe still owed for these is answered here.
                if !self.owed.is_empty() {
                    for id in normal.keys() {
                        self.owed.remove(id);
                    }
                }
                states
            }
            Err(error) => {
                // The response said `normal`: the states must still come. This socket reads
                // them again until it can.
                tracing::warn!(%error, "subscribe: states not read; retrying");
                for id in normal.keys() {
                    let f = format_of.get(id).copied().unwrap_or(Format::Full);
                    self.owed.insert(*id, variant(f));
                }
                if self.owed_at.is_none() {
                    self.owed_at = Some(tokio::time::Instant::now() + self.owed_backoff);
                }
                Vec::new()
            }
        };
        let now = Utc::now();
        for mut s in states {
            // Only the trackers this request found `normal` (the read covered every id).
            let Some(&source_id) = normal.get(&s.tracker_id) else {
                continue;
            };
            s.source_id = source_id;
            if !self.takes_snapshot(&s) {
                continue;
            }
            let f = format_of
                .get(&s.tracker_id)
                .copied()
                .unwrap_or(Format::Full);
            let frame = model::state_event(&s, variant(f), now);
            self.send(frame.into()).await?;
        }
        hub.metrics.subscribe_latency.observe(started.elapsed());
        tracing::info!(
            session = session_tag(&hash),
            trackers = order.len(),
            batches_joined,
            batches_refused,
            took_ms = started.elapsed().as_millis() as u64,
            "subscribed"
        );
        Ok(())
    }

    /// Whether this socket is still a member of the group with this [`BatchGroup::id`].
    fn member_of(&self, group: u64) -> bool {
        self.memberships.iter().any(|(g, _)| g.id == group)
    }

    /// Drops the memberships `ended` picks, and leaves each of their groups that no other
    /// session of this socket still holds.
    fn drop_memberships(&mut self, ended: impl Fn(&BatchGroup, &Arc<str>) -> bool) {
        let mut dropped: Vec<Arc<BatchGroup>> = Vec::new();
        self.memberships.retain(|(group, session)| {
            let gone = ended(group, session);
            if gone {
                dropped.push(group.clone());
            }
            !gone
        });
        for group in dropped {
            if !self.memberships.iter().any(|(g, _)| Arc::ptr_eq(g, &group)) {
                self.app.hub.batches.leave(&group, self.id);
            }
        }
    }

    /// The outcome of a read of owed states ([`Connection::owed`]): each state read is sent in
    /// the variant it is owed in, unless the watch is gone or blocked or already has a newer
    /// state; a failed read is tried again after a longer wait.
    async fn owed_read(&mut self, (ids, read): OwedStates) -> Result<(), Stop> {
        let states = match read {
            Ok(states) => states,
            Err(e) => {
                self.owed_failed(&e.to_string());
                return Ok(());
            }
        };
        self.owed_backoff = OWED_RETRY_MIN;
        let mut owed: HashMap<TrackerId, Variant> = HashMap::with_capacity(ids.len());
        for id in ids {
            // Not owed any more: a later subscribe read it, or a newer state was sent.
            if let Some(v) = self.owed.remove(&id) {
                owed.insert(id, v);
            }
        }
        let now = Utc::now();
        for s in states {
            let Some(v) = owed.get(&s.tracker_id).copied() else {
                continue;
            };
            if self.takes_snapshot(&s) {
                self.send(model::state_event(&s, v, now).into()).await?;
            }
        }
        // Owed since this read started: the next read comes at once.
        if !self.owed.is_empty() && self.owed_at.is_none() {
            self.owed_at = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    /// Whether a state read for a subscribe goes out: the tracker is still watched, not
    /// blocked, and holds nothing newer (an event may have overtaken the read). Marks it sent.
    fn takes_snapshot(&mut self, s: &TrackerState) -> bool {
        match self.watches.get_mut(&s.tracker_id) {
            Some(w) if !w.blocked && s.change_no >= w.state_change => {
                w.state_change = s.change_no;
                true
            }
            _ => false,
        }
    }

    /// The read of the states owed now, to start at the time set for it, if one is set.
    fn owed_read_due(&mut self) -> Option<OwedRead> {
        let at = self.owed_at.take()?;
        let ids: Vec<TrackerId> = self.owed.keys().copied().collect();
        if ids.is_empty() {
            return None;
        }
        let pool = self.app.pool.clone();
        Some(Box::pin(async move {
            tokio::time::sleep_until(at).await;
            let read = queries::states_by_ids(&pool, &ids).await;
            (ids, read)
        }))
    }

    fn owed_failed(&mut self, error: &str) {
        tracing::warn!(%error, owed = self.owed.len(), "owed states not read; retrying");
        self.owed_backoff = (self.owed_backoff * 2).min(OWED_RETRY_MAX);
        self.owed_at = Some(tokio::time::Instant::now() + self.owed_backoff);
    }

    /// How many distinct batch groups this socket is in.
    fn batch_group_count(&self) -> usize {
        let mut groups: Vec<&Arc<BatchGroup>> = Vec::with_capacity(self.memberships.len());
        for (g, _) in &self.memberships {
            if !groups.iter().any(|h| Arc::ptr_eq(h, g)) {
                groups.push(g);
            }
        }
        groups.len()
    }

    /// Each requested tracker's status for this session, in request order, in one query: the
    /// computation shared with the HTTP API ([`crate::access`]).
    async fn statuses(
        &self,
        session: &queries::SessionRow,
        ids: &[TrackerId],
    ) -> Result<Vec<(TrackerId, &'static str, Option<TrackerFacts>)>, sqlx::Error> {
        access::statuses(&self.app.pool, session, ids).await
    }

    /// The answer for a selected batch target: the group's view for the trackers it holds
    /// (`held`, as of the first batch), the session's statuses read for the others.
    async fn selected_statuses(
        &self,
        session: &queries::SessionRow,
        ids: &[TrackerId],
        held: &HashMap<TrackerId, bool>,
    ) -> Result<StatusMap, sqlx::Error> {
        let unheld: Vec<TrackerId> = ids
            .iter()
            .copied()
            .filter(|id| !held.contains_key(id))
            .collect();
        let read: HashMap<TrackerId, &'static str> = if unheld.is_empty() {
            HashMap::new()
        } else {
            let st = self.statuses(session, &unheld).await?;
            st.into_iter().map(|(id, s, _)| (id, s)).collect()
        };
        Ok(StatusMap::new(ids.iter().map(|&id| {
            let status = match held.get(&id) {
                Some(true) => access::BLOCKED,
                Some(false) => access::NORMAL,
                None => read.get(&id).copied().unwrap_or(access::UNKNOWN),
            };
            (id, status)
        })))
    }

    async fn unsubscribe(&mut self, msg: ClientMessage) -> Result<(), Stop> {
        let mut ids: Vec<TrackerId> = Vec::new();
        for item in &msg.items {
            if let Item::State(req) = item {
                ids.extend(&req.trackers);
            }
        }
        let Some(hash) = self.sessions.get(msg.hash.as_str()) else {
            // Nothing here was subscribed with this hash (or it was released), so nothing is
            // removed. Code 4 says the session has ended, so it goes only where that is true:
            // a dashboard that unsubscribes on a fresh connection must not be sent to log in.
            let error = match queries::session(&self.app.pool, &msg.hash).await {
                Ok(Some(s)) if s.live => None,
                Ok(_) => Some(ProtoError::session_not_found()),
                Err(e) => Some(ProtoError::db("session lookup", &e)),
            };
            return match error {
                Some(e) => {
                    self.send_error(Some(msg.action.wire()), &e, Some(&msg.echo))
                        .await
                }
                None => {
                    let response =
                        protocol::unsubscribe_response(msg.form, &msg.events, &msg.items, &ids);
                    self.send(response.into()).await
                }
            };
        };
        let hash = hash.clone();
        for item in &msg.items {
            let (target, readings) = match item {
                Item::StateBatch(req) => (&req.target, false),
                Item::ReadingsBatch(req) => (&req.target, true),
                _ => continue,
            };
            self.drop_memberships(|group, session| {
                *session == hash
                    && group.key.is_readings() == readings
                    && target.as_ref().is_none_or(|t| *t == group.key.target)
            });
        }
        let mine: Vec<TrackerId> = ids
            .iter()
            .copied()
            .filter(|id| self.watches.get(id).is_some_and(|w| w.session == hash))
            .collect();
        for id in &mine {
            self.watches.remove(id);
        }
        self.app.hub.unsubscribe(self.id, &mine);
        self.release_idle_sessions();
        let events = msg.events.clone();
        self.send(protocol::unsubscribe_response(msg.form, &events, &msg.items, &ids).into())
            .await
    }

    /// Releases the sessions this socket no longer uses: each that holds no watch and no batch
    /// membership here and is not the latest one subscribed with. A dashboard that moved its
    /// trackers to a new session (after a new login) or unsubscribed everything of an old one
    /// must not get that session's `logout` later, nor be kept open by it when the session it
    /// uses ends. The server's own removals (`corrupt`, `disallowed`) release nothing: the
    /// client did not leave that session.
    fn release_idle_sessions(&mut self) {
        if self.sessions.len() < 2 {
            return;
        }
        let mut held: HashSet<&str> = self
            .watches
            .by_slot
            .iter()
            .flatten()
            .map(|w| &*w.session)
            .collect();
        // A batch the latest session holds too does not keep an older one: a dashboard that
        // logged in again and joined its batches anew holds each under both.
        let latest = self.latest.as_deref();
        let also_latest = |group: &Arc<BatchGroup>| {
            self.memberships
                .iter()
                .any(|(g, s)| Arc::ptr_eq(g, group) && Some(&**s) == latest)
        };
        held.extend(
            self.memberships
                .iter()
                .filter(|(g, s)| Some(&**s) == latest || !also_latest(g))
                .map(|(_, s)| &**s),
        );
        held.extend(latest);
        let idle: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|s| !held.contains(&***s))
            .cloned()
            .collect();
        for hash in idle {
            self.sessions.remove(&hash);
            // Its batches are all held by the latest session as well: no group is left.
            self.memberships.retain(|(_, s)| *s != hash);
            self.app.hub.unregister_session(&hash, self.id);
            tracing::info!(
                session = session_tag(&hash),
                "session released: nothing subscribed under it"
            );
        }
    }

    /// Ends a session this socket holds (its logout): drops its trackers, batches and hub
    /// registration, sends `logout`, and closes the socket if no other session is left.
    async fn end_session(&mut self, hash: &Arc<str>) -> Result<(), Stop> {
        if !self.sessions.remove(hash) {
            return Ok(());
        }
        if self.latest.as_ref() == Some(hash) {
            self.latest = None;
        }
        // The hub's entry is normally gone already (its logout removed it), but a subscribe
        // with this hash handled before the logout was delivered may have re-created it.
        self.app.hub.unregister_session(hash, self.id);
        let gone = self.watches.ids_where(|w| w.session == *hash);
        for id in &gone {
            self.watches.remove(id);
        }
        self.app.hub.unsubscribe(self.id, &gone);
        self.drop_memberships(|_, session| session == hash);
        tracing::info!(session = session_tag(hash), "logout");
        self.send(ByteString::from_static(model::LOGOUT_EVENT))
            .await?;
        if self.sessions.is_empty() {
            return Err(Stop::Close(CloseReason {
                code: CloseCode::Normal,
                description: Some("session closed".into()),
            }));
        }
        Ok(())
    }

    /// Sends a lifecycle frame unless this change was already sent for the tracker.
    async fn send_lifecycle(
        &mut self,
        tracker: TrackerId,
        change: i64,
        frame: ByteString,
    ) -> Result<(), Stop> {
        let sent = self.lifecycle_sent.entry(tracker).or_insert(0);
        if change <= *sent {
            return Ok(());
        }
        *sent = change;
        self.send(frame).await
    }

    /// Writes one item from the outbox, if this socket should still see it.
    async fn deliver(&mut self, item: Outgoing) -> Result<(), Stop> {
        match item {
            Outgoing::State {
                slot,
                tracker,
                change,
                resend,
                frame,
                notified,
            } => {
                let Some(w) = self.watches.at(slot, tracker) else {
                    return Ok(());
                };
                let newer = change > w.state_change || (resend && change == w.state_change);
                if w.blocked || !newer {
                    return Ok(());
                }
                w.state_change = change;
                if !self.owed.is_empty() {
                    // A newer state than any read could owe.
                    self.owed.remove(&tracker);
                }
                self.send_kind(FrameKind::State, frame).await?;
                self.notified.push(notified);
                Ok(())
            }
            Outgoing::Disallow {
                hash,
                revoked,
                round,
            } => {
                let gone = self
                    .watches
                    .ids_where(|w| w.session == hash && revoked.covers(w.tracker));
                if gone.is_empty() {
                    return Ok(());
                }
                // Read the source ids before unsubscribing drops the hub's entries.
                let frames: Vec<String> = gone
                    .iter()
                    .filter(|&&id| self.disallowed_sent.insert(id, round) != Some(round))
                    .map(|&id| {
                        let source = self.app.hub.source_id(id).unwrap_or_default();
                        model::disallowed_event(id, source)
                    })
                    .collect();
                for id in &gone {
                    self.watches.remove(id);
                }
                self.app.hub.unsubscribe(self.id, &gone);
                tracing::info!(
                    session = session_tag(&hash),
                    trackers = gone.len(),
                    "grants revoked: trackers disallowed"
                );
                for frame in frames {
                    self.send(frame.into()).await?;
                }
                Ok(())
            }
            Outgoing::Lifecycle {
                tracker,
                change,
                kind,
                frame,
            } => {
                let Some(w) = self.watches.get_mut(&tracker) else {
                    return Ok(());
                };
                if change <= w.lifecycle_change {
                    return Ok(());
                }
                w.lifecycle_change = change;
                match kind {
                    Lifecycle::Block => w.blocked = true,
                    Lifecycle::Unblock => w.blocked = false,
                    Lifecycle::Corrupt => {
                        self.watches.remove(&tracker);
                        self.app.hub.unsubscribe(self.id, &[tracker]);
                    }
                }
                self.send_lifecycle(tracker, change, frame).await
            }
            // A group's items queued before the socket left it (an unsubscribe, or the
            // session that held it ended) stay unsent.
            Outgoing::GroupLifecycle {
                group,
                tracker,
                change,
                frame,
                announced,
            } => {
                if !self.member_of(group) {
                    return Ok(());
                }
                if announced {
                    return self.send(frame).await;
                }
                self.send_lifecycle(tracker, change, frame).await
            }
            Outgoing::Frame { group, frame } => {
                if !self.member_of(group) {
                    return Ok(());
                }
                self.send_shared(frame).await
            }
            Outgoing::GroupDisallow {
                group,
                tracker,
                round,
                frame,
            } => {
                if !self.member_of(group)
                    || self.disallowed_sent.insert(tracker, round) == Some(round)
                {
                    return Ok(());
                }
                self.send_shared(frame).await
            }
            Outgoing::Logout { hash } => self.end_session(&hash).await,
            Outgoing::Shutdown => Err(Stop::Close(CloseCode::Away.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_given_to_another_tracker_no_longer_finds_the_old_one() {
        let session: Arc<str> = Arc::from("s".repeat(32));
        let mut w = Watches::default();
        w.get_or_insert(7, 0, &session).state_change = 3;
        w.get_or_insert(8, 1, &session);
        assert_eq!(w.at(0, 7).map(|w| w.state_change), Some(3));
        assert!(w.at(1, 7).is_none(), "slot 1 is tracker 8's");
        assert!(w.at(5, 7).is_none(), "a slot past the table");

        // Unsubscribed: its slot goes to another tracker; items queued for 7 are skipped.
        w.remove(&7);
        assert!(!w.contains(&7) && w.get(&7).is_none());
        w.get_or_insert(9, 0, &session);
        assert!(w.at(0, 7).is_none());
        assert_eq!(w.at(0, 9).map(|w| w.tracker), Some(9));

        // Subscribing again keeps the watch (and its slot) it has.
        w.get_or_insert(9, 4, &session).state_change = 11;
        assert_eq!(w.get(&9).map(|w| w.state_change), Some(11));
        assert!(w.at(4, 9).is_none());

        let mut ids = w.ids_where(|_| true);
        ids.sort_unstable();
        assert_eq!(ids, [8, 9]);
        let mut ids = w.ids();
        ids.sort_unstable();
        assert_eq!(ids, [8, 9]);
    }
}
