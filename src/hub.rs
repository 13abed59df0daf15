//! The subscription index and fan-out. Owns: which sockets watch which tracker (a dashmap from
//! tracker id to subscribers), which sockets hold which session, each tracker's last known
//! lifecycle and state change numbers, and every socket's bounded [`Outbox`].
//!
//! The hub never blocks and never awaits: the LISTEN processor ([`crate::listen`]) calls it with
//! events it has already read from the database, the hub serializes each event once per
//! [`Variant`] and pushes the same bytes into every subscriber's outbox. What a socket does with
//! them (per-tracker ordering, blocked filtering, writing frames) belongs to [`crate::ws`].
//!
//! The hub also carries the process's [`Metrics`] (so every task that reaches the hub can count
//! with atomics) and answers `/metrics`' questions about the index with [`Hub::sample`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytestring::ByteString;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::batch::{BatchGroup, Batches};
use crate::metrics::{Metrics, Sample};
use crate::model::{self, Lifecycle, TrackerId, TrackerState, Variant};

pub type ConnId = u64;

/// One item in a socket's outbound queue.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A state event. `resend` allows a state whose change number equals the last one sent (the
    /// current state pushed again after an unblock). `notified`: when the notification behind it
    /// arrived (for the notify-to-send latency metric).
    State {
        tracker: TrackerId,
        change: i64,
        resend: bool,
        frame: ByteString,
        notified: Instant,
    },
    Lifecycle {
        tracker: TrackerId,
        change: i64,
        kind: Lifecycle,
        frame: ByteString,
    },
    /// A lifecycle event from a batch group; the socket sends it once per tracker change.
    GroupLifecycle {
        tracker: TrackerId,
        change: i64,
        frame: ByteString,
    },
    /// A ready frame (a batch); never coalesced (a group skips members whose queue is full).
    Frame(ByteString),
    /// The session with this hash may no longer see these trackers (a sub-user's grants were
    /// revoked): the socket stops them and sends a `disallowed` lifecycle event for each.
    Disallow {
        hash: Arc<str>,
        revoked: Arc<Revoked>,
    },
    /// The session with this hash has ended.
    Logout { hash: Arc<str> },
    /// The server is shutting down.
    Shutdown,
}

/// The trackers a session lost the grants of.
#[derive(Debug)]
pub enum Revoked {
    /// These trackers.
    These(HashSet<TrackerId>),
    /// Every tracker but these (the grants it still holds, as read after a LISTEN gap).
    AllBut(HashSet<TrackerId>),
}

impl Revoked {
    pub fn covers(&self, id: TrackerId) -> bool {
        match self {
            Revoked::These(ids) => ids.contains(&id),
            Revoked::AllBut(ids) => !ids.contains(&id),
        }
    }
}

#[derive(Default)]
struct OutboxInner {
    queue: VecDeque<Outgoing>,
    /// States that arrived while the queue was full: the newest per tracker.
    overflow: HashMap<TrackerId, Outgoing>,
    /// How many of the queued items are ready frames (batches): batch groups skip a member
    /// that still has one waiting, since a single batch can weigh megabytes.
    frames: usize,
    closed: bool,
}

/// A socket's bounded outbound queue. States beyond the capacity are coalesced (the newest per
/// tracker wins); lifecycle, logout and shutdown items are always queued.
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    ready: Notify,
    capacity: usize,
    coalesced: AtomicU64,
    /// The process-wide total, shared by every outbox.
    total_coalesced: Arc<AtomicU64>,
}

impl Outbox {
    pub fn new(capacity: usize, total_coalesced: Arc<AtomicU64>) -> Arc<Outbox> {
        Arc::new(Outbox {
            inner: Mutex::new(OutboxInner::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
            coalesced: AtomicU64::new(0),
            total_coalesced,
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutboxInner> {
        // A panic while holding this lock cannot leave the queue inconsistent (every mutation
        // is a single push/pop), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, item: Outgoing) {
        {
            let mut inner = self.lock();
            if inner.closed {
                return;
            }
            match item {
                Outgoing::State { tracker, .. } if inner.queue.len() >= self.capacity => {
                    if inner.overflow.insert(tracker, item).is_some() {
                        self.coalesced.fetch_add(1, Ordering::Relaxed);
                        self.total_coalesced.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Outgoing::Lifecycle { tracker, .. } | Outgoing::GroupLifecycle { tracker, .. } => {
                    // Keep per-tracker order: a state held back for this tracker goes first.
                    if let Some(held) = inner.overflow.remove(&tracker) {
                        inner.queue.push_back(held);
                    }
                    inner.queue.push_back(item);
                }
                other => {
                    if matches!(other, Outgoing::Frame(_)) {
                        inner.frames += 1;
                    }
                    inner.queue.push_back(other)
                }
            }
        }
        self.ready.notify_one();
    }

    /// Takes up to `max` items, waiting until at least one is there.
    pub async fn pop_batch(&self, max: usize, out: &mut Vec<Outgoing>) {
        loop {
            {
                let mut inner = self.lock();
                while out.len() < max {
                    let Some(item) = inner.queue.pop_front() else {
                        break;
                    };
                    if matches!(item, Outgoing::Frame(_)) {
                        inner.frames = inner.frames.saturating_sub(1);
                    }
                    out.push(item);
                }
                if out.len() < max && !inner.overflow.is_empty() {
                    // Taken in one pass: finding each first key anew rescans the emptied front
                    // of the table, which made draining a large overflow quadratic (100,000
                    // held states: 214 ms taken one by one, 19 ms in passes of 64). Entries the
                    // pass does not reach stay held.
                    let room = max - out.len();
                    out.extend(
                        inner
                            .overflow
                            .extract_if(|_, _| true)
                            .take(room)
                            .map(|(_, item)| item),
                    );
                }
                if !out.is_empty() {
                    return;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Marks the outbox closed and frees what it holds; later pushes are dropped.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.queue.clear();
        inner.overflow.clear();
        inner.frames = 0;
    }

    /// Ready frames (batches) queued and not yet taken by the socket.
    pub fn frames(&self) -> usize {
        self.lock().frames
    }

    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.queue.len() + inner.overflow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// States dropped because a newer one for the same tracker replaced them.
    pub fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Subscriber {
    conn: ConnId,
    outbox: Arc<Outbox>,
    variant: Variant,
}

#[derive(Default)]
struct TrackerEntry {
    subs: Vec<Subscriber>,
    groups: Vec<Arc<BatchGroup>>,
    /// `readings_batch` groups: fed by [`Hub::offer_readings`], never by state fan-out.
    readings_groups: Vec<Arc<BatchGroup>>,
    source_id: i64,
    blocked: bool,
    lifecycle_change: i64,
    state_change: i64,
}

impl TrackerEntry {
    fn is_idle(&self) -> bool {
        self.subs.is_empty() && self.groups.is_empty() && self.readings_groups.is_empty()
    }
}

struct SessionEntry {
    conns: Vec<(ConnId, Arc<Outbox>)>,
    expires_at: DateTime<Utc>,
}

/// What the hub knows of a tracker from the database (a subscribe query or a resync).
#[derive(Debug, Clone, Copy)]
pub struct TrackerFacts {
    pub source_id: i64,
    pub blocked: bool,
    pub change_no: i64,
}

/// Counters the hub keeps for logs, `/ready` and metrics.
#[derive(Default)]
pub struct HubStats {
    /// States dropped from full outboxes because a newer one replaced them.
    pub coalesced: Arc<AtomicU64>,
    pub states_fanned_out: AtomicU64,
    pub frames_queued: AtomicU64,
    pub lifecycle_events: AtomicU64,
    pub logouts: AtomicU64,
}

#[derive(Default)]
pub struct Hub {
    trackers: DashMap<TrackerId, TrackerEntry>,
    sessions: DashMap<Arc<str>, SessionEntry>,
    next_conn: AtomicU64,
    stream_up: AtomicBool,
    pub stats: HubStats,
    pub batches: Batches,
    /// Prometheus metrics; the hot paths only touch its atomics.
    pub metrics: Metrics,
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    /// A new outbox whose coalesced states count towards the hub's total.
    pub fn outbox(&self, capacity: usize) -> Arc<Outbox> {
        Outbox::new(capacity, self.stats.coalesced.clone())
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether the LISTEN stream is up (reported by `/ready`).
    pub fn stream_up(&self) -> bool {
        self.stream_up.load(Ordering::Acquire)
    }

    pub fn set_stream_up(&self, up: bool) {
        self.stream_up.store(up, Ordering::Release);
    }

    // --- subscriptions -------------------------------------------------------------------------

    /// Adds (or updates the variant of) `conn`'s subscription to each tracker. Called before the
    /// subscribe query runs, so that no change committed meanwhile is missed.
    pub fn subscribe(&self, conn: ConnId, outbox: &Arc<Outbox>, ids: &[TrackerId], v: Variant) {
        for &id in ids {
            let mut entry = self.trackers.entry(id).or_default();
            match entry.subs.iter_mut().find(|s| s.conn == conn) {
                Some(sub) => sub.variant = v,
                None => entry.subs.push(Subscriber {
                    conn,
                    outbox: outbox.clone(),
                    variant: v,
                }),
            }
        }
    }

    pub fn unsubscribe(&self, conn: ConnId, ids: &[TrackerId]) {
        for id in ids {
            let empty = match self.trackers.get_mut(id) {
                Some(mut entry) => {
                    entry.subs.retain(|s| s.conn != conn);
                    entry.is_idle()
                }
                None => false,
            };
            if empty {
                self.trackers.remove_if(id, |_, e| e.is_idle());
            }
        }
    }

    /// Adds a batch group as a subscriber of each tracker.
    pub fn subscribe_group(&self, group: &Arc<BatchGroup>, ids: &[TrackerId]) {
        for &id in ids {
            let mut entry = self.trackers.entry(id).or_default();
            let list = if group.key.is_readings() {
                &mut entry.readings_groups
            } else {
                &mut entry.groups
            };
            if !list.iter().any(|g| Arc::ptr_eq(g, group)) {
                list.push(group.clone());
            }
        }
    }

    pub fn unsubscribe_group(&self, group: &Arc<BatchGroup>, ids: &[TrackerId]) {
        for id in ids {
            let empty = match self.trackers.get_mut(id) {
                Some(mut entry) => {
                    entry.groups.retain(|g| !Arc::ptr_eq(g, group));
                    entry.readings_groups.retain(|g| !Arc::ptr_eq(g, group));
                    entry.is_idle()
                }
                None => false,
            };
            if empty {
                self.trackers.remove_if(id, |_, e| e.is_idle());
            }
        }
    }

    /// Records what a database read said of a tracker, unless the hub already knows newer.
    pub fn observe(&self, id: TrackerId, facts: TrackerFacts) {
        if let Some(mut entry) = self.trackers.get_mut(&id) {
            entry.source_id = facts.source_id;
            if facts.change_no > entry.lifecycle_change {
                entry.blocked = facts.blocked;
                entry.lifecycle_change = facts.change_no;
            }
        }
    }

    pub fn is_watched(&self, id: TrackerId) -> bool {
        self.trackers.contains_key(&id)
    }

    /// Whether a state fetch for this tracker could reach anyone: watched (by a socket or a
    /// state batch) and not blocked.
    pub fn wants_state(&self, id: TrackerId) -> bool {
        self.trackers
            .get(&id)
            .is_some_and(|e| !e.blocked && (!e.subs.is_empty() || !e.groups.is_empty()))
    }

    /// Whether some `readings_batch` group watches this tracker (blocked or not: a blocked
    /// tracker's readings are kept for its unblock).
    pub fn wants_readings(&self, id: TrackerId) -> bool {
        self.trackers
            .get(&id)
            .is_some_and(|e| !e.readings_groups.is_empty())
    }

    /// The trackers some `readings_batch` group watches (for a resync).
    pub fn readings_trackers(&self) -> Vec<TrackerId> {
        self.trackers
            .iter()
            .filter(|e| !e.readings_groups.is_empty())
            .map(|e| *e.key())
            .collect()
    }

    /// Hands readings to the `readings_batch` groups of their trackers (each group keeps the
    /// newest per key and applies its filters).
    pub fn offer_readings(&self, rows: Vec<crate::readings::ReadingRow>) {
        for r in rows {
            let Some(entry) = self.trackers.get(&r.tracker_id) else {
                continue;
            };
            if entry.readings_groups.is_empty() {
                continue;
            }
            let r = Arc::new(r);
            for g in &entry.readings_groups {
                g.offer_reading(&r);
            }
        }
    }

    pub fn watched_trackers(&self) -> Vec<TrackerId> {
        self.trackers.iter().map(|e| *e.key()).collect()
    }

    /// Per watched tracker: (id, last lifecycle change, blocked).
    pub fn lifecycle_marks(&self) -> Vec<(TrackerId, i64, bool)> {
        self.trackers
            .iter()
            .map(|e| (*e.key(), e.lifecycle_change, e.blocked))
            .collect()
    }

    pub fn tracker_count(&self) -> usize {
        self.trackers.len()
    }

    // --- fan-out ---------------------------------------------------------------------------------

    /// Sends a state to every subscriber of its tracker, serialized once per variant. A state not
    /// newer than the last one fanned out is skipped unless `resend` is set.
    pub fn publish_state(&self, state: &TrackerState, resend: bool, now: DateTime<Utc>) -> usize {
        let Some(mut entry) = self.trackers.get_mut(&state.tracker_id) else {
            return 0;
        };
        if entry.blocked
            || state.change_no < entry.state_change
            || (state.change_no == entry.state_change && !resend)
        {
            return 0;
        }
        entry.state_change = state.change_no;
        entry.source_id = state.source_id;
        let notified = self.metrics.round_notified();
        let mut frames: Vec<(Variant, ByteString)> = Vec::with_capacity(1);
        for sub in &entry.subs {
            let frame = match frames.iter().find(|(v, _)| *v == sub.variant) {
                Some((_, f)) => f.clone(),
                None => {
                    let f = ByteString::from(model::state_event(state, sub.variant, now));
                    frames.push((sub.variant, f.clone()));
                    f
                }
            };
            sub.outbox.push(Outgoing::State {
                tracker: state.tracker_id,
                change: state.change_no,
                resend,
                frame,
                notified,
            });
        }
        if !entry.groups.is_empty() {
            let shared = Arc::new(state.clone());
            for g in &entry.groups {
                g.offer(&shared, resend);
            }
        }
        let n = entry.subs.len() + entry.groups.len();
        self.stats
            .states_fanned_out
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.stats
            .frames_queued
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Applies a lifecycle change and sends the event to every subscriber of the tracker.
    /// Returns false when the hub already knew this change (or nobody watches the tracker).
    pub fn publish_lifecycle(&self, id: TrackerId, change: i64, kind: Lifecycle) -> bool {
        let Some(mut entry) = self.trackers.get_mut(&id) else {
            return false;
        };
        if change <= entry.lifecycle_change {
            return false;
        }
        entry.lifecycle_change = change;
        entry.blocked = kind != Lifecycle::Unblock;
        let frame = ByteString::from(model::lifecycle_event(id, entry.source_id, kind));
        for sub in &entry.subs {
            sub.outbox.push(Outgoing::Lifecycle {
                tracker: id,
                change,
                kind,
                frame: frame.clone(),
            });
        }
        for g in entry.groups.iter().chain(&entry.readings_groups) {
            g.lifecycle(id, change, kind, &frame);
        }
        self.stats.lifecycle_events.fetch_add(1, Ordering::Relaxed);
        true
    }

    // --- sessions ----------------------------------------------------------------------------------

    pub fn register_session(
        &self,
        hash: &Arc<str>,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        expires_at: DateTime<Utc>,
    ) {
        let mut entry = self
            .sessions
            .entry(hash.clone())
            .or_insert_with(|| SessionEntry {
                conns: Vec::new(),
                expires_at,
            });
        entry.expires_at = expires_at;
        if !entry.conns.iter().any(|(c, _)| *c == conn) {
            entry.conns.push((conn, outbox.clone()));
        }
    }

    pub fn unregister_session(&self, hash: &str, conn: ConnId) {
        let empty = match self.sessions.get_mut(hash) {
            Some(mut entry) => {
                entry.conns.retain(|(c, _)| *c != conn);
                entry.conns.is_empty()
            }
            None => false,
        };
        if empty {
            self.sessions.remove_if(hash, |_, e| e.conns.is_empty());
        }
    }

    pub fn set_session_expiry(&self, hash: &str, expires_at: DateTime<Utc>) {
        if let Some(mut entry) = self.sessions.get_mut(hash) {
            entry.expires_at = expires_at;
        }
    }

    pub fn has_session(&self, hash: &str) -> bool {
        self.sessions.contains_key(hash)
    }

    pub fn session_hashes(&self) -> Vec<Arc<str>> {
        self.sessions.iter().map(|e| e.key().clone()).collect()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Tells every socket holding `hash` that the session lost trackers; returns how many sockets.
    pub fn disallow(&self, hash: &str, revoked: Arc<Revoked>) -> usize {
        let Some(entry) = self.sessions.get(hash) else {
            return 0;
        };
        for (_, outbox) in &entry.conns {
            outbox.push(Outgoing::Disallow {
                hash: entry.key().clone(),
                revoked: revoked.clone(),
            });
        }
        entry.conns.len()
    }

    /// The data source id of a watched tracker.
    pub fn source_id(&self, id: TrackerId) -> Option<i64> {
        self.trackers.get(&id).map(|e| e.source_id)
    }

    /// The values `/metrics` samples from the index. Walks every watched tracker and session:
    /// meant for a scrape every few seconds, not for hot paths.
    pub fn sample(&self) -> Sample {
        let mut sample = Sample {
            subscribed_trackers: self.trackers.len() as u64,
            sessions: self.sessions.len() as u64,
            coalesced: self.stats.coalesced.load(Ordering::Relaxed),
            ..Sample::default()
        };
        for e in self.trackers.iter() {
            sample.subscriptions +=
                (e.subs.len() + e.groups.len() + e.readings_groups.len()) as u64;
        }
        let mut outboxes: HashMap<ConnId, Arc<Outbox>> = HashMap::new();
        for e in self.sessions.iter() {
            for (conn, outbox) in &e.conns {
                outboxes.entry(*conn).or_insert_with(|| outbox.clone());
            }
        }
        for outbox in outboxes.values() {
            let n = outbox.len() as u64;
            sample.queue_depth += n;
            sample.queue_depth_max = sample.queue_depth_max.max(n);
        }
        sample
    }

    /// Ends a session: every socket holding it gets a logout item. The entry is removed, so a
    /// second logout for the same session is a no-op.
    pub fn logout(&self, hash: &str) -> usize {
        let Some((key, entry)) = self.sessions.remove(hash) else {
            return 0;
        };
        for (_, outbox) in &entry.conns {
            outbox.push(Outgoing::Logout { hash: key.clone() });
        }
        self.stats.logouts.fetch_add(1, Ordering::Relaxed);
        entry.conns.len()
    }

    /// Logs out every session whose expiry has passed; returns how many.
    pub fn expire_sessions(&self, now: DateTime<Utc>) -> usize {
        let expired: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|e| e.expires_at <= now)
            .map(|e| e.key().clone())
            .collect();
        expired
            .iter()
            .map(|h| self.logout(h))
            .filter(|n| *n > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_item(tracker: TrackerId, change: i64) -> Outgoing {
        Outgoing::State {
            tracker,
            change,
            resend: false,
            frame: ByteString::from(format!("{tracker}:{change}")),
            notified: Instant::now(),
        }
    }

    async fn drain(outbox: &Outbox) -> Vec<Outgoing> {
        let mut all = Vec::new();
        while !outbox.is_empty() {
            outbox.pop_batch(64, &mut all).await;
        }
        all
    }

    #[tokio::test]
    async fn a_large_overflow_drains_whole_in_batches() {
        let outbox = Outbox::new(1, Default::default());
        for tracker in 0..10_000 {
            outbox.push(state_item(tracker, 1));
        }
        outbox.push(state_item(5, 2));
        let mut seen = HashSet::new();
        let mut batch = Vec::new();
        while !outbox.is_empty() {
            batch.clear();
            outbox.pop_batch(64, &mut batch).await;
            assert!(batch.len() <= 64);
            for item in &batch {
                let Outgoing::State {
                    tracker, change, ..
                } = item
                else {
                    panic!("only states were queued");
                };
                assert!(seen.insert(*tracker), "tracker {tracker} taken twice");
                if *tracker == 5 {
                    assert_eq!(*change, 2, "the newest state of a coalesced tracker");
                }
            }
        }
        assert_eq!(seen.len(), 10_000);
    }

    #[tokio::test]
    async fn full_outbox_keeps_newest_state_per_tracker() {
        let outbox = Outbox::new(2, Default::default());
        for change in 1..=10 {
            outbox.push(state_item(1, change));
            outbox.push(state_item(2, change));
        }
        assert!(outbox.len() <= 4, "queue stays bounded");
        let items = drain(&outbox).await;
        let last_for = |t| {
            items
                .iter()
                .filter_map(|i| match i {
                    Outgoing::State {
                        tracker, change, ..
                    } if *tracker == t => Some(*change),
                    _ => None,
                })
                .max()
        };
        assert_eq!(last_for(1), Some(10));
        assert_eq!(last_for(2), Some(10));
        assert!(outbox.coalesced() >= 14);
    }

    #[tokio::test]
    async fn queued_frames_are_counted_until_taken() {
        let outbox = Outbox::new(8, Default::default());
        outbox.push(Outgoing::Frame(ByteString::from("batch 1")));
        outbox.push(state_item(1, 1));
        outbox.push(Outgoing::Frame(ByteString::from("batch 2")));
        assert_eq!(outbox.frames(), 2);
        let mut out = Vec::new();
        outbox.pop_batch(2, &mut out).await;
        assert_eq!(outbox.frames(), 1);
        outbox.close();
        assert_eq!(outbox.frames(), 0);
    }

    #[tokio::test]
    async fn lifecycle_is_never_dropped_and_follows_held_state() {
        let outbox = Outbox::new(1, Default::default());
        outbox.push(state_item(1, 1));
        outbox.push(state_item(2, 5)); // held in overflow
        outbox.push(Outgoing::Lifecycle {
            tracker: 2,
            change: 6,
            kind: Lifecycle::Block,
            frame: ByteString::from("block"),
        });
        let items = drain(&outbox).await;
        let order: Vec<String> = items
            .iter()
            .map(|i| match i {
                Outgoing::State { frame, .. } | Outgoing::Lifecycle { frame, .. } => {
                    frame.to_string()
                }
                _ => String::new(),
            })
            .collect();
        assert_eq!(order, ["1:1", "2:5", "block"]);
    }
}
