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
use std::num::NonZeroI64;
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
use crate::ws::deflate::SharedFrame;

pub type ConnId = u64;

/// One item in a socket's outbound queue.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A state event. `slot`: the tracker's slot in the socket's outbox (see
    /// [`Hub::subscribe`]), by which the socket finds its watch without a hash lookup.
    /// `resend` allows a state whose change number equals the last one sent (the current state
    /// pushed again after an unblock). `notified`: when the notification behind it arrived (for
    /// the notify-to-send latency metric).
    State {
        slot: u32,
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
        /// The group's [`BatchGroup::id`] (every group item names it: a socket drops the items
        /// of a group it has left).
        group: u64,
        tracker: TrackerId,
        change: i64,
        frame: ByteString,
        /// Sent by the group's admission of the tracker (see `GroupState::admit`), not by the
        /// event processor: written as is and not recorded, so that the processor's event of
        /// the same change through another watch or group of the socket still goes out (a
        /// `corrupt` for the old account's watch and the new account's `block` share the move's
        /// change number; another group may still batch the tracker's state before its block).
        announced: bool,
    },
    /// A ready frame (a batch); never coalesced (a group skips members whose queue is full).
    Frame { group: u64, frame: SharedFrame },
    /// The session with this hash may no longer see these trackers (a sub-user's grants were
    /// revoked): the socket stops them and sends a `disallowed` lifecycle event for each.
    Disallow {
        hash: Arc<str>,
        revoked: Arc<Revoked>,
        /// The revocation (see [`Hub::revocation_round`]): a socket that takes it both here and
        /// from a batch group ([`Outgoing::GroupDisallow`]) sends each tracker's event once.
        round: u64,
    },
    /// A batch group of this socket dropped a tracker whose grant was revoked: its
    /// `disallowed` event, sent once per socket and revocation.
    GroupDisallow {
        group: u64,
        tracker: TrackerId,
        round: u64,
        frame: SharedFrame,
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

/// A tracker's newest state, kept in the hub while some socket's outbox holds a [`Mark`] for
/// it instead of a copy: the socket takes the state from here when it gets to the mark.
struct HeldState {
    /// Marks outstanding (set in an outbox and not yet taken or dropped). Incremented under
    /// the outbox's lock when a mark is set; decremented once the mark's state has been read.
    marks: AtomicU64,
    latest: Mutex<Latest>,
}

struct Latest {
    change: i64,
    resend: bool,
    notified: Instant,
    /// The state event once per variant its subscribers wanted.
    frames: Vec<(Variant, ByteString)>,
}

impl HeldState {
    fn new(latest: Latest) -> Arc<HeldState> {
        Arc::new(HeldState {
            marks: AtomicU64::new(0),
            latest: Mutex::new(latest),
        })
    }

    fn latest(&self) -> MutexGuard<'_, Latest> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self, latest: Latest) {
        *self.latest() = latest;
    }

    fn outstanding(&self) -> u64 {
        self.marks.load(Ordering::Acquire)
    }

    /// The state a mark stands for: the newest, in the mark's variant (or, should the socket
    /// have changed its format since the mark was set, in the first variant there is).
    fn item(&self, slot: u32, tracker: TrackerId, variant: Variant) -> Option<Outgoing> {
        let latest = self.latest();
        let frame = latest
            .frames
            .iter()
            .find(|(v, _)| *v == variant)
            .or_else(|| latest.frames.first())
            .map(|(_, f)| f.clone())?;
        Some(Outgoing::State {
            slot,
            tracker,
            change: latest.change,
            resend: latest.resend,
            frame,
            notified: latest.notified,
        })
    }

    /// Reads the state of a mark that is being taken, then counts the mark as gone (in that
    /// order: the hub stops keeping the state once no mark is outstanding).
    fn take(&self, slot: u32, tracker: TrackerId, variant: Variant) -> Option<Outgoing> {
        let item = self.item(slot, tracker, variant);
        self.marks.fetch_sub(1, Ordering::AcqRel);
        item
    }

    fn drop_mark(&self) {
        self.marks.fetch_sub(1, Ordering::AcqRel);
    }
}

/// In a socket's outbox instead of a state: "this tracker has a newer state, held in the hub".
struct Mark {
    slot: u32,
    /// The slot's generation when the mark was set: a mark dropped by an unsubscribe or a
    /// lifecycle event stays in the queue until reached, and is then skipped.
    gen: u32,
    tracker: TrackerId,
    variant: Variant,
    held: Arc<HeldState>,
}

/// What [`Outbox::push_state`] did with a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pushed {
    Queued,
    /// The queue was full: a mark was set, the state stays in the hub.
    Marked,
    /// The queue was full and a mark was already set: the newer state replaces the older.
    Coalesced,
    Closed,
}

#[derive(Default)]
struct OutboxInner {
    queue: VecDeque<Outgoing>,
    /// States that arrived while the queue was full, as marks in the order they were set, at
    /// most one per tracker. A mark is a few words in this socket's memory; the state itself is
    /// kept once in the hub for every socket that fell behind on it, so a socket that is behind
    /// costs the publisher a bit test per state, not a map insert.
    marks: VecDeque<Mark>,
    /// Which slots have a mark, one bit per slot.
    marked: Vec<u64>,
    /// Per slot, bumped when its mark is dropped before being taken.
    gens: Vec<u32>,
    /// Marks in `marks` that were dropped and not yet reached.
    stale: usize,
    /// Slots given back by unsubscribes, to be reused.
    free_slots: Vec<u32>,
    next_slot: u32,
    /// How many of the queued items are ready frames (batches): batch groups skip a member
    /// that still has one waiting, since a single batch can weigh megabytes.
    frames: usize,
    coalesced: u64,
    closed: bool,
}

impl OutboxInner {
    fn is_marked(&self, slot: u32) -> bool {
        self.marked
            .get(slot as usize / 64)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    fn set_mark(&mut self, slot: u32, on: bool) {
        let i = slot as usize / 64;
        if self.marked.len() <= i {
            self.marked.resize(i + 1, 0);
        }
        if on {
            self.marked[i] |= 1 << (slot % 64);
        } else {
            self.marked[i] &= !(1 << (slot % 64));
        }
    }

    fn gen(&self, slot: u32) -> u32 {
        self.gens.get(slot as usize).copied().unwrap_or(0)
    }

    fn is_live(&self, mark: &Mark) -> bool {
        self.is_marked(mark.slot) && self.gen(mark.slot) == mark.gen
    }

    /// Drops the mark of a slot, if it has one; returns whether it had. The mark stays in the
    /// queue (finding it would be a scan) and is skipped when reached; once more than half the
    /// queue is dropped marks, they are swept out.
    fn unmark(&mut self, slot: u32) -> bool {
        if !self.is_marked(slot) {
            return false;
        }
        self.set_mark(slot, false);
        let i = slot as usize;
        if self.gens.len() <= i {
            self.gens.resize(i + 1, 0);
        }
        self.gens[i] = self.gens[i].wrapping_add(1);
        self.stale += 1;
        if self.stale > 64 && self.stale * 2 > self.marks.len() {
            let mut marks = std::mem::take(&mut self.marks);
            marks.retain(|m| self.is_live(m));
            self.marks = marks;
            self.stale = 0;
        }
        true
    }
}

/// A socket's bounded outbound queue. A state that finds the queue full leaves a [`Mark`]
/// instead (the newest state per tracker wins); lifecycle, logout and shutdown items are always
/// queued. Every tracker a socket watches has a slot in its outbox, given by [`Outbox::slot`].
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    ready: Notify,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            inner: Mutex::new(OutboxInner::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutboxInner> {
        // A panic while holding this lock cannot leave the queue inconsistent (every mutation
        // is a single push/pop), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a newly watched tracker.
    fn slot(&self) -> u32 {
        let mut inner = self.lock();
        match inner.free_slots.pop() {
            Some(slot) => slot,
            None => {
                inner.next_slot += 1;
                inner.next_slot - 1
            }
        }
    }

    /// Gives a slot back (its tracker is no longer watched), dropping its mark; returns
    /// whether it had one (the caller counts it off the tracker's [`HeldState`]).
    fn release(&self, slot: u32) -> bool {
        let mut inner = self.lock();
        let marked = inner.unmark(slot);
        inner.free_slots.push(slot);
        marked
    }

    /// Queues a state, or marks its slot when the queue is full. `item` builds the queued
    /// item; `held` gives the hub's [`HeldState`] for the tracker, already holding this state.
    fn push_state(
        &self,
        slot: u32,
        tracker: TrackerId,
        variant: Variant,
        item: impl FnOnce() -> Outgoing,
        held: impl FnOnce() -> Arc<HeldState>,
    ) -> Pushed {
        let pushed = {
            let mut inner = self.lock();
            if inner.closed {
                return Pushed::Closed;
            }
            if inner.queue.len() < self.capacity {
                inner.queue.push_back(item());
                Pushed::Queued
            } else if inner.is_marked(slot) {
                inner.coalesced += 1;
                return Pushed::Coalesced;
            } else {
                let held = held();
                held.marks.fetch_add(1, Ordering::AcqRel);
                inner.set_mark(slot, true);
                let gen = inner.gen(slot);
                inner.marks.push_back(Mark {
                    slot,
                    gen,
                    tracker,
                    variant,
                    held,
                });
                Pushed::Marked
            }
        };
        self.ready.notify_one();
        pushed
    }

    /// Queues a lifecycle event for a tracker, after the state marked for it (if any), so the
    /// socket sees them in the order they happened.
    /// `held` is the tracker's [`HeldState`], which any mark of this slot counts on.
    fn push_lifecycle(
        &self,
        slot: u32,
        (tracker, variant): (TrackerId, Variant),
        held: Option<&HeldState>,
        item: Outgoing,
    ) {
        {
            let mut inner = self.lock();
            if inner.closed {
                return;
            }
            if inner.unmark(slot) {
                if let Some(state) = held.and_then(|h| h.take(slot, tracker, variant)) {
                    inner.queue.push_back(state);
                }
            }
            inner.queue.push_back(item);
        }
        self.ready.notify_one();
    }

    /// Queues any item but a state (those go through the hub, see [`Hub::publish_state`]).
    pub fn push(&self, item: Outgoing) {
        {
            let mut inner = self.lock();
            if inner.closed {
                return;
            }
            if matches!(item, Outgoing::Frame { .. }) {
                inner.frames += 1;
            }
            inner.queue.push_back(item);
        }
        self.ready.notify_one();
    }

    /// Takes up to `max` items, waiting until at least one is there: queued items first, then
    /// the newest state of each marked tracker.
    pub async fn pop_batch(&self, max: usize, out: &mut Vec<Outgoing>) {
        let mut marks: Vec<Mark> = Vec::new();
        loop {
            {
                let mut inner = self.lock();
                while out.len() < max {
                    let Some(item) = inner.queue.pop_front() else {
                        break;
                    };
                    if matches!(item, Outgoing::Frame { .. }) {
                        inner.frames = inner.frames.saturating_sub(1);
                    }
                    out.push(item);
                }
                while out.len() + marks.len() < max {
                    let Some(mark) = inner.marks.pop_front() else {
                        break;
                    };
                    if !inner.is_live(&mark) {
                        inner.stale = inner.stale.saturating_sub(1);
                        continue;
                    }
                    inner.set_mark(mark.slot, false);
                    marks.push(mark);
                }
            }
            // Read outside the outbox's lock: the publisher may be writing the newest state.
            out.extend(
                marks
                    .drain(..)
                    .filter_map(|m| m.held.take(m.slot, m.tracker, m.variant)),
            );
            if !out.is_empty() {
                return;
            }
            self.ready.notified().await;
        }
    }

    /// Marks the outbox closed and frees what it holds; later pushes are dropped.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.queue.clear();
        let marks = std::mem::take(&mut inner.marks);
        for mark in marks.iter().filter(|m| inner.is_live(m)) {
            mark.held.drop_mark();
        }
        inner.marked.clear();
        inner.stale = 0;
        inner.frames = 0;
    }

    /// Ready frames (batches) queued and not yet taken by the socket.
    pub fn frames(&self) -> usize {
        self.lock().frames
    }

    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.queue.len() + inner.marks.len() - inner.stale
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// States dropped because a newer one for the same tracker replaced them.
    pub fn coalesced(&self) -> u64 {
        self.lock().coalesced
    }
}

#[derive(Clone)]
struct Subscriber {
    conn: ConnId,
    outbox: Arc<Outbox>,
    variant: Variant,
    /// This tracker's slot in the outbox (where a mark goes when the queue is full).
    slot: u32,
    /// What this subscriber knows of the tracker's lifecycle: from its subscribe's read (see
    /// [`Hub::observe_for`]) or a later event, whichever is newer; `told_change` is
    /// `i64::MIN` until then. A resync compares the database with it, since subscribers
    /// admitted during a gap in the stream each read the tracker at another point.
    told_blocked: bool,
    told_change: i64,
    /// The account its read found the tracker in (0 until then).
    account: i64,
}

/// A data source id, or none, in one word where an `Option<i64>` takes two (every watched
/// tracker's entry holds one; see `a_tracker_entry_stays_small`). `i64::MIN` stands for none (ids are database keys; one that was `i64::MIN` would
/// only be read again with every state).
#[derive(Clone, Copy)]
struct SourceId(i64);

impl Default for SourceId {
    fn default() -> Self {
        SourceId(i64::MIN)
    }
}

impl SourceId {
    fn of(id: i64) -> SourceId {
        SourceId(id)
    }

    fn get(self) -> Option<i64> {
        (self.0 != i64::MIN).then_some(self.0)
    }
}

#[derive(Default)]
struct TrackerEntry {
    subs: Vec<Subscriber>,
    groups: Vec<Arc<BatchGroup>>,
    /// `readings_batch` groups: fed by [`Hub::offer_readings`], never by state fan-out.
    readings_groups: Vec<Arc<BatchGroup>>,
    /// The tracker's data source id, once a database read has said it (none before, and after
    /// an `i|` notification said it changed).
    source_id: SourceId,
    /// The tracker's account, as the reads that admitted its subscribers said it (None before,
    /// and after a `corrupt` unless a group of the new account holds the tracker): a resync
    /// that finds it moved sends `corrupt`.
    account_id: Option<NonZeroI64>,
    /// The lifecycle as last published to the subscribers (`blocked` and its change number):
    /// only the event processor and a resync move it, so that every change past it still
    /// reaches every subscriber. A subscribe's read never does (see [`Hub::observe`]).
    blocked: bool,
    lifecycle_change: i64,
    /// The newest lifecycle facts from any source, published or read. Only for deciding
    /// whether the processor reads the tracker's state at all, and for a resync. (Two fields,
    /// not a tuple, so that the flags share a word: 100,000 entries are 1.6 MB per word.)
    newest_change: i64,
    newest_blocked: bool,
    /// The account of the newest facts when a read gave them (a later event does not move it):
    /// the account a `corrupt` older than that read leaves to the read's subscriber.
    newest_account: Option<NonZeroI64>,
    /// Whether states are held back: `blocked`, unless a read has seen a newer lifecycle than
    /// the last one published (then that read's; see [`Hub::publish_lifecycle`]).
    states_blocked: bool,
    state_change: i64,
    /// The newest state, while some subscriber's outbox holds a mark for it.
    held: Option<Arc<HeldState>>,
}

impl TrackerEntry {
    /// Whether the processor reads the tracker's state: someone watches it, and it is not
    /// blocked as far as the hub knows.
    fn wants_state(&self) -> bool {
        !self.newest_blocked && (!self.subs.is_empty() || !self.groups.is_empty())
    }

    /// Whether every subscriber and group of the tracker takes the compact format.
    fn compact_only(&self) -> bool {
        self.subs
            .iter()
            .all(|s| s.variant.format == model::Format::Compact)
            && self
                .groups
                .iter()
                .all(|g| g.key.variant.format == model::Format::Compact)
    }

    fn is_idle(&self) -> bool {
        self.subs.is_empty() && self.groups.is_empty() && self.readings_groups.is_empty()
    }

    /// See [`Hub::observe`].
    fn observe(&mut self, facts: TrackerFacts) {
        if self.source_id.get().is_none() {
            self.source_id = SourceId::of(facts.source_id);
        }
        if self.account_id.is_none() {
            self.account_id = NonZeroI64::new(facts.account_id);
        }
        if facts.change_no > self.newest_change {
            self.newest_change = facts.change_no;
            self.newest_blocked = facts.blocked;
            self.newest_account = NonZeroI64::new(facts.account_id);
        }
    }

    /// See [`Hub::accounts_of`].
    fn accounts(&self) -> Vec<i64> {
        let mut out: Vec<i64> = [self.account_id.map(NonZeroI64::get), self.read_account()]
            .into_iter()
            .flatten()
            .chain(self.subs.iter().map(|s| s.account).filter(|&a| a != 0))
            .chain(
                self.groups
                    .iter()
                    .chain(&self.readings_groups)
                    .map(|g| g.key.scope.account_id),
            )
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The account of a read newer than every change published, where it is not the entry's:
    /// a subscriber admitted after a move whose event has not been published, beside those
    /// admitted before it. (An older read's account was settled by the events since.)
    fn read_account(&self) -> Option<i64> {
        (self.newest_change > self.lifecycle_change && self.newest_account != self.account_id)
            .then_some(self.newest_account)
            .flatten()
            .map(NonZeroI64::get)
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
    pub account_id: i64,
    pub blocked: bool,
    pub change_no: i64,
}

impl From<&crate::db::queries::TrackerLifecycleRow> for TrackerFacts {
    fn from(r: &crate::db::queries::TrackerLifecycleRow) -> Self {
        TrackerFacts {
            source_id: r.source_id,
            account_id: r.account_id,
            blocked: r.blocked,
            change_no: r.change_no,
        }
    }
}

/// A watched tracker's lifecycle as the hub last published it (see [`Hub::lifecycle_marks`]).
#[derive(Debug, Clone, Copy)]
pub struct LifecycleMark {
    pub id: TrackerId,
    /// The last change published.
    pub change: i64,
}

/// What [`Hub::resync_lifecycle`] told a tracker's subscribers and groups.
#[derive(Debug, Default, Clone, Copy)]
pub struct Resynced {
    /// Some event went to a subscriber or a group.
    pub sent: bool,
    /// Some were told `unblock`: its current state follows.
    pub unblocked: bool,
}

impl Resynced {
    fn note(&mut self, kind: Lifecycle) {
        self.sent = true;
        self.unblocked |= kind == Lifecycle::Unblock;
    }
}

/// Counters the hub keeps for logs, `/ready` and metrics.
#[derive(Default)]
pub struct HubStats {
    /// States dropped from full outboxes because a newer one replaced them.
    pub coalesced: AtomicU64,
    pub states_fanned_out: AtomicU64,
    pub frames_queued: AtomicU64,
    pub lifecycle_events: AtomicU64,
    pub logouts: AtomicU64,
}

#[derive(Default)]
pub struct Hub {
    /// Looked up for every state read, so with a faster hasher than std's SipHash (the keys are
    /// tracker ids from the database; foldhash is randomly seeded too).
    trackers: DashMap<TrackerId, TrackerEntry, foldhash::fast::RandomState>,
    sessions: DashMap<Arc<str>, SessionEntry>,
    next_conn: AtomicU64,
    next_revocation: AtomicU64,
    stream_up: AtomicBool,
    /// An event task ended before shutdown (see `startup::spawn_event_thread`): the stream stays
    /// down whatever the LISTEN connection reports.
    events_stopped: AtomicBool,
    /// The event processor has caught up: a resync finished, and no round since failed or was
    /// given up (reported by `/ready`).
    caught_up: AtomicBool,
    /// Times the stream went down: a resync taken before the latest loss has not caught up.
    stream_epoch: AtomicU64,
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
        Outbox::new(capacity)
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A new revocation of grants, to tag its `disallowed` events with (see
    /// [`Outgoing::Disallow`]).
    pub fn revocation_round(&self) -> u64 {
        self.next_revocation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether the LISTEN stream is up (reported by `/ready`).
    pub fn stream_up(&self) -> bool {
        self.stream_up.load(Ordering::Acquire) && !self.events_stopped.load(Ordering::Acquire)
    }

    /// Marks the event stream down for good: events are no longer read.
    pub fn set_events_stopped(&self) {
        self.events_stopped.store(true, Ordering::Release);
    }

    /// A stream that goes down leaves the processor behind until its resync has run.
    pub fn set_stream_up(&self, up: bool) {
        if !up {
            self.stream_epoch.fetch_add(1, Ordering::AcqRel);
            self.set_caught_up(false);
        }
        self.stream_up.store(up, Ordering::Release);
    }

    /// How many times the stream has gone down (see the field).
    pub fn stream_epoch(&self) -> u64 {
        self.stream_epoch.load(Ordering::Acquire)
    }

    /// Whether the event processor has caught up (see the field).
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    pub fn set_caught_up(&self, current: bool) {
        self.caught_up.store(current, Ordering::Release);
    }

    // --- subscriptions -------------------------------------------------------------------------

    /// Adds (or updates the variant of) `conn`'s subscription to each tracker. Called before the
    /// subscribe query runs, so that no change committed meanwhile is missed. Returns each
    /// tracker's slot in `outbox`, in the order of `ids`: the slot every state item for it
    /// carries, until [`Hub::unsubscribe`] gives it back (it may then go to another tracker).
    pub fn subscribe(
        &self,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        ids: &[TrackerId],
        v: Variant,
    ) -> Vec<u32> {
        let mut slots = Vec::with_capacity(ids.len());
        for &id in ids {
            let mut entry = self.trackers.entry(id).or_default();
            match entry.subs.iter_mut().find(|s| s.conn == conn) {
                Some(sub) => {
                    sub.variant = v;
                    // Subscribed again: its new read is on its way, and what it was told before
                    // no longer says what it will know (a resync sends it the database's
                    // lifecycle, see `resync_lifecycle`).
                    sub.told_change = i64::MIN;
                    slots.push(sub.slot);
                }
                None => {
                    let slot = outbox.slot();
                    if entry.subs.is_empty() {
                        // Most trackers have one watcher: a first push would make room for
                        // four subscriptions (192 bytes; 14 MB more over 100,000 trackers).
                        entry.subs.reserve_exact(1);
                    }
                    entry.subs.push(Subscriber {
                        conn,
                        outbox: outbox.clone(),
                        variant: v,
                        slot,
                        told_blocked: false,
                        told_change: i64::MIN,
                        account: 0,
                    });
                    slots.push(slot);
                }
            }
        }
        slots
    }

    pub fn unsubscribe(&self, conn: ConnId, ids: &[TrackerId]) {
        for id in ids {
            let empty = match self.trackers.get_mut(id) {
                Some(mut entry) => {
                    let entry = &mut *entry;
                    entry.subs.retain(|s| {
                        let gone = s.conn == conn;
                        if gone && s.outbox.release(s.slot) {
                            if let Some(held) = &entry.held {
                                held.drop_mark();
                            }
                        }
                        !gone
                    });
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

    /// Records what a database read said of a tracker: its source id and account, each only
    /// when the hub has none (a subscribe's read may predate a change that the processor has
    /// already applied; sources change only through the processor, in notification order:
    /// [`Hub::set_source_ids`], and the reads that join `trackers`).
    ///
    /// The read's lifecycle facts are not taken. The hub's lifecycle mark is what the tracker's
    /// subscribers have been told, and the processor forwards only changes past it: a subscribe
    /// that read a block the processor had not yet published used to raise the mark, so the
    /// block (or a later unblock) never reached the sockets that were there before. The new
    /// subscriber knows its facts from its own read, and drops the event when it comes. They
    /// only spare the processor reading the state of a tracker that is blocked.
    pub fn observe(&self, id: TrackerId, facts: TrackerFacts) {
        if let Some(mut entry) = self.trackers.get_mut(&id) {
            entry.observe(facts);
        }
    }

    /// [`Hub::observe`] for the subscribe of `conn`, which also records what that subscriber
    /// now knows of the tracker (see [`Subscriber::told_change`]), unless an event it has been
    /// given since is newer. (Under one lock: an event published in between is either before
    /// it, and older than the read, or after it, and newer.)
    pub fn observe_for(&self, conn: ConnId, id: TrackerId, facts: TrackerFacts) {
        if let Some(mut entry) = self.trackers.get_mut(&id) {
            entry.observe(facts);
            if let Some(sub) = entry.subs.iter_mut().find(|s| s.conn == conn) {
                if facts.change_no >= sub.told_change {
                    sub.account = facts.account_id;
                    sub.told_change = facts.change_no;
                    sub.told_blocked = facts.blocked;
                }
            }
        }
    }

    pub fn is_watched(&self, id: TrackerId) -> bool {
        self.trackers.contains_key(&id)
    }

    /// Whether a state fetch for this tracker could reach anyone: watched (by a socket or a
    /// state batch) and not blocked.
    pub fn wants_state(&self, id: TrackerId) -> bool {
        self.wanted_source(id).is_some()
    }

    /// For a tracker whose state is wanted (see [`Hub::wants_state`]), its data source id if
    /// the hub knows it (`Some(None)` if not); `None` if its state is not wanted. One lookup
    /// for both, which the event processor makes for every notified tracker.
    pub fn wanted_source(&self, id: TrackerId) -> Option<Option<i64>> {
        self.trackers
            .get(&id)
            .filter(|e| e.wants_state())
            .map(|e| e.source_id.get())
    }

    /// [`Hub::wanted_source`], and whether every subscriber and group of the tracker takes the
    /// compact format: its state may then be read with the compact columns alone (see
    /// [`Hub::publish_compact_state`]).
    pub fn wanted_read(&self, id: TrackerId) -> Option<(Option<i64>, bool)> {
        self.trackers
            .get(&id)
            .filter(|e| e.wants_state())
            .map(|e| (e.source_id.get(), e.compact_only()))
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

    /// Per watched tracker: the last lifecycle change published.
    pub fn lifecycle_marks(&self) -> Vec<LifecycleMark> {
        self.trackers
            .iter()
            .map(|e| LifecycleMark {
                id: *e.key(),
                change: e.lifecycle_change,
            })
            .collect()
    }

    /// The accounts a watched tracker's subscribers were admitted under, as far as known: the
    /// entry's, that of a read newer than the last change published if it differs, and each
    /// subscriber's own read's, unless a `corrupt` has been published to it since (it leaves
    /// when it takes that), and the account of each batch group that holds it. A row in
    /// another account than one of them is a move for someone.
    pub fn accounts_of(&self, id: TrackerId) -> Vec<i64> {
        self.trackers
            .get(&id)
            .map_or_else(Vec::new, |e| e.accounts())
    }

    pub fn tracker_count(&self) -> usize {
        self.trackers.len()
    }

    // --- fan-out ---------------------------------------------------------------------------------

    /// Sends a state to every subscriber of its tracker, serialized once per variant. A state not
    /// newer than the last one fanned out is skipped unless `resend` is set.
    pub fn publish_state(&self, state: TrackerState, resend: bool, now: DateTime<Utc>) -> usize {
        self.publish(state, resend, now, false).unwrap_or(0)
    }

    /// [`Hub::publish_state`] for a state read with the compact columns alone
    /// ([`model::STATE_COLUMNS_COMPACT`]), which only compact subscribers and groups may be
    /// given. `None`, and nothing changed, when the tracker has gained a full-format subscriber
    /// or group since [`Hub::wanted_read`] said it had none: the state must be read in full and
    /// published again. (Checked under the entry's lock, which a subscribe takes too.)
    pub fn publish_compact_state(&self, state: TrackerState, now: DateTime<Utc>) -> Option<usize> {
        self.publish(state, false, now, true)
    }

    fn publish(
        &self,
        state: TrackerState,
        resend: bool,
        now: DateTime<Utc>,
        compact_read: bool,
    ) -> Option<usize> {
        let Some(mut entry) = self.trackers.get_mut(&state.tracker_id) else {
            return Some(0);
        };
        if compact_read && !entry.compact_only() {
            return None;
        }
        if entry.states_blocked
            || state.change_no < entry.state_change
            || (state.change_no == entry.state_change && !resend)
        {
            return Some(0);
        }
        entry.state_change = state.change_no;
        entry.source_id = SourceId::of(state.source_id);
        let notified = self.metrics.round_notified();
        let entry = &mut *entry;
        // Each variant's frame, serialized once for all its subscribers.
        let mut frames: Vec<(Variant, ByteString)> = Vec::with_capacity(1);
        for sub in &entry.subs {
            if !frames.iter().any(|(v, _)| *v == sub.variant) {
                let f = ByteString::from(model::state_event(&state, sub.variant, now));
                frames.push((sub.variant, f));
            }
        }
        let latest = || Latest {
            change: state.change_no,
            resend,
            notified,
            frames: frames.clone(),
        };
        // Sockets that are behind hold a mark, not this state: keep it where they will look,
        // before any of them can look.
        if let Some(held) = &entry.held {
            held.store(latest());
        }
        let mut coalesced = 0;
        for sub in &entry.subs {
            let pushed = sub.outbox.push_state(
                sub.slot,
                state.tracker_id,
                sub.variant,
                || {
                    let frame = frames
                        .iter()
                        .find(|(v, _)| *v == sub.variant)
                        .map(|(_, f)| f.clone())
                        .unwrap_or_default();
                    Outgoing::State {
                        slot: sub.slot,
                        tracker: state.tracker_id,
                        change: state.change_no,
                        resend,
                        frame,
                        notified,
                    }
                },
                || {
                    entry
                        .held
                        .get_or_insert_with(|| HeldState::new(latest()))
                        .clone()
                },
            );
            if pushed == Pushed::Coalesced {
                coalesced += 1;
            }
        }
        // Nobody is behind on this tracker any more: stop keeping its state.
        if entry.held.as_ref().is_some_and(|h| h.outstanding() == 0) {
            entry.held = None;
        }
        if coalesced > 0 {
            self.stats.coalesced.fetch_add(coalesced, Ordering::Relaxed);
        }
        let n = entry.subs.len() + entry.groups.len();
        if !entry.groups.is_empty() {
            // The groups keep the state itself, not a copy.
            let shared = Arc::new(state);
            for g in &entry.groups {
                g.offer(&shared, resend);
            }
        }
        self.stats
            .states_fanned_out
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.stats
            .frames_queued
            .fetch_add(n as u64, Ordering::Relaxed);
        Some(n)
    }

    /// Applies a lifecycle change and sends the event to every subscriber of the tracker.
    /// Returns false when the hub already knew this change (or nobody watches the tracker).
    pub fn publish_lifecycle(&self, id: TrackerId, change: i64, kind: Lifecycle) -> bool {
        let Some(mut guard) = self.trackers.get_mut(&id) else {
            return false;
        };
        let entry = &mut *guard;
        if change <= entry.lifecycle_change {
            return false;
        }
        entry.lifecycle_change = change;
        // A `corrupt` is settled below: it says nothing of the tracker's own lifecycle.
        if kind != Lifecycle::Corrupt {
            entry.blocked = kind == Lifecycle::Block;
            if change >= entry.newest_change {
                entry.newest_change = change;
                entry.newest_blocked = entry.blocked;
                entry.states_blocked = entry.blocked;
            } else {
                // A read has seen a newer lifecycle than this event: its watcher admitted
                // since. The gate on states follows that read. The later change's own event
                // may never come: notified while nobody watched the tracker (its entry was
                // dropped and made again in between), the listener dropped it, and a stale
                // block gating here then froze the tracker for every watcher. Subscribers
                // older than the read still get this event and hold states back on their own
                // watch until the newer change reaches them (a resync compares the database
                // with `blocked`, what they were told, to find the change they still need).
                entry.states_blocked = entry.newest_blocked;
            }
        }
        let frame = ByteString::from(model::lifecycle_event(
            id,
            entry.source_id.get().unwrap_or_default(),
            kind,
        ));
        for sub in entry.subs.iter_mut() {
            if change > sub.told_change {
                sub.told_change = change;
                sub.told_blocked = kind == Lifecycle::Block;
                if kind == Lifecycle::Corrupt {
                    // It leaves when it takes the event: its account no longer counts (a later
                    // change would be `corrupt` for the new account's subscribers too).
                    sub.account = 0;
                }
            }
            sub.outbox.push_lifecycle(
                sub.slot,
                (id, sub.variant),
                entry.held.as_deref(),
                Outgoing::Lifecycle {
                    tracker: id,
                    change,
                    kind,
                    frame: frame.clone(),
                },
            );
        }
        if entry.held.as_ref().is_some_and(|h| h.outstanding() == 0) {
            entry.held = None;
        }
        let idle = if kind == Lifecycle::Corrupt {
            // A `corrupt` ends the watches it reaches, not the tracker: the subscribers' sockets
            // drop their watch when they take the event (and whatever comes after it for the
            // tracker), then leave the entry. The groups that forgot the tracker leave it here,
            // or the entry (and, through it, a retired group with all its states) would outlive
            // them for good. A group that admitted the tracker with facts at least as new (moved
            // into its account: the move's `corrupt` is for the old account's viewers) keeps
            // it. Whoever watches it from now on (such a group, a subscriber that read it in its
            // new account, before or after this event) holds its own lifecycle from that read
            // and filters on it, so the entry stops gating: blocking the whole entry here kept
            // a subscriber of the new account from ever getting a state while an old socket had
            // not yet left, since a subscribe's read does not move the published lifecycle.
            // The account goes, unless such a group holds the tracker, or a subscribe read it
            // after the move (the newest facts are a read's, at least as new as this event):
            // then it is that account (a resync compares it with the database's to find a
            // later move away), else a tracker moved back and watched again is admitted anew.
            entry
                .groups
                .retain(|g| g.lifecycle(id, change, kind, &frame));
            entry
                .readings_groups
                .retain(|g| g.lifecycle(id, change, kind, &frame));
            entry.blocked = false;
            entry.states_blocked = false;
            let read_since = (entry.newest_change >= change)
                .then_some(entry.newest_account)
                .flatten();
            entry.account_id = entry
                .groups
                .iter()
                .chain(&entry.readings_groups)
                .find_map(|g| NonZeroI64::new(g.key.scope.account_id))
                .or(read_since);
            entry.is_idle()
        } else {
            for g in entry.groups.iter().chain(&entry.readings_groups) {
                g.lifecycle(id, change, kind, &frame);
            }
            false
        };
        drop(guard);
        if idle {
            self.trackers.remove_if(&id, |_, e| e.is_idle());
        }
        self.stats.lifecycle_events.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A resync's lifecycle for a watched tracker that the database has at `row` (not removed),
    /// newer than the last change published: each subscriber and batch group is told what it
    /// needs, by the account it was admitted under and what it was told or read. Those of
    /// another account get `corrupt`, those of the tracker's that know otherwise get its
    /// `block` or `unblock`, the rest nothing. (Subscribers admitted during a gap in the stream
    /// each read the tracker at another point: one event for all made a tracker moved into an
    /// account and then blocked `corrupt` for that account's sockets too, and one moved away
    /// and back `corrupt` for a socket that read it back home.) A subscriber whose read has not
    /// been recorded yet (a subscribe on its way, a first or a repeated one) gets the row's
    /// event, or `corrupt` if any account known differs: it drops what its read has passed.
    /// Then the hub's own record is the row's.
    pub fn resync_lifecycle(&self, id: TrackerId, row: TrackerFacts) -> Resynced {
        let mut told = Resynced::default();
        let Some(mut guard) = self.trackers.get_mut(&id) else {
            return told;
        };
        let entry = &mut *guard;
        let change = row.change_no;
        if change <= entry.lifecycle_change {
            return told;
        }
        let own = if row.blocked {
            Lifecycle::Block
        } else {
            Lifecycle::Unblock
        };
        // For a subscriber whose read is not recorded (on its way, and it may have seen an
        // older lifecycle than the row's): the row's event, `corrupt` if any account known
        // differs from the row's. It drops the event if its read is as new.
        let unread = if entry.accounts().iter().any(|&a| a != row.account_id) {
            Lifecycle::Corrupt
        } else {
            own
        };
        let source = entry.source_id.get().unwrap_or_default();
        let mut frames: [Option<ByteString>; 3] = Default::default();
        let mut frame = |kind: Lifecycle| -> ByteString {
            frames[kind as usize]
                .get_or_insert_with(|| ByteString::from(model::lifecycle_event(id, source, kind)))
                .clone()
        };
        let held = entry.held.clone();
        for sub in entry.subs.iter_mut() {
            let kind = if sub.told_change == i64::MIN {
                unread
            } else if sub.account == 0 || sub.told_change >= change {
                // Told `corrupt` (it is leaving), or it read something at least as new.
                continue;
            } else if sub.account != row.account_id {
                Lifecycle::Corrupt
            } else if sub.told_blocked != row.blocked {
                own
            } else {
                continue;
            };
            sub.told_change = sub.told_change.max(change);
            sub.told_blocked = kind == Lifecycle::Block;
            if kind == Lifecycle::Corrupt {
                sub.account = 0;
            }
            told.note(kind);
            sub.outbox.push_lifecycle(
                sub.slot,
                (id, sub.variant),
                held.as_deref(),
                Outgoing::Lifecycle {
                    tracker: id,
                    change,
                    kind,
                    frame: frame(kind),
                },
            );
        }
        let mut keep = |g: &Arc<BatchGroup>| {
            let kind = if g.key.scope.account_id != row.account_id {
                Lifecycle::Corrupt
            } else {
                own
            };
            let applied = g.apply_lifecycle(id, change, kind, &frame(kind));
            if applied.sent {
                told.note(kind);
            }
            applied.keeps
        };
        entry.groups.retain(&mut keep);
        entry.readings_groups.retain(&mut keep);
        if entry.held.as_ref().is_some_and(|h| h.outstanding() == 0) {
            entry.held = None;
        }
        entry.lifecycle_change = change;
        entry.blocked = row.blocked;
        entry.account_id = NonZeroI64::new(row.account_id);
        if change >= entry.newest_change {
            entry.newest_change = change;
            entry.newest_blocked = row.blocked;
            entry.newest_account = entry.account_id;
        }
        // As in `publish_lifecycle`: a read newer than the row keeps the gate.
        entry.states_blocked = entry.newest_blocked;
        let idle = entry.is_idle();
        drop(guard);
        if idle {
            self.trackers.remove_if(&id, |_, e| e.is_idle());
        }
        if told.sent {
            self.stats.lifecycle_events.fetch_add(1, Ordering::Relaxed);
        }
        told
    }

    // --- sessions ----------------------------------------------------------------------------------

    /// Adds `conn` to the sockets holding `hash`. `expires_at` is the expiry of a new entry
    /// only: an entry that exists keeps the expiry a database read gave it (a socket registers
    /// before it reads the session, and a read that fails must not leave the session without
    /// its expiry). [`Hub::set_session_expiry`] sets it once read.
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
    pub fn disallow(&self, hash: &str, revoked: Arc<Revoked>, round: u64) -> usize {
        let Some(entry) = self.sessions.get(hash) else {
            return 0;
        };
        for (_, outbox) in &entry.conns {
            outbox.push(Outgoing::Disallow {
                hash: entry.key().clone(),
                revoked: revoked.clone(),
                round,
            });
        }
        entry.conns.len()
    }

    /// The data source id of a watched tracker, if a database read has said it.
    pub fn source_id(&self, id: TrackerId) -> Option<i64> {
        self.trackers.get(&id).and_then(|e| e.source_id.get())
    }

    /// Sets the data source id of watched trackers (after an `i|` notification).
    pub fn set_source_ids(&self, sources: &[(TrackerId, i64)]) {
        for &(id, source) in sources {
            if let Some(mut entry) = self.trackers.get_mut(&id) {
                entry.source_id = SourceId::of(source);
            }
        }
    }

    /// Forgets the data source id of these trackers: their next states are read with it.
    pub fn forget_source_ids(&self, ids: &[TrackerId]) {
        for id in ids {
            if let Some(mut entry) = self.trackers.get_mut(id) {
                entry.source_id = SourceId::default();
            }
        }
    }

    /// The values `/metrics` samples from the index. Walks every watched tracker and session:
    /// meant for a scrape every few seconds, not for hot paths.
    pub fn sample(&self) -> Sample {
        let mut sample = Sample {
            subscribed_trackers: self.trackers.len() as u64,
            sessions: self.sessions.len() as u64,
            batch_groups: self.batches.group_count() as u64,
            coalesced: self.stats.coalesced.load(Ordering::Relaxed),
            ..Sample::default()
        };
        // Every socket's outbox, found through its sessions, its subscriptions and its batch
        // groups: a socket whose session ended holds no session entry until it has read its
        // `logout`, which one that stopped reading may not do before its idle timeout, and its
        // queue is then the one to see.
        let mut outboxes: HashMap<ConnId, Arc<Outbox>> = HashMap::new();
        for e in self.trackers.iter() {
            sample.subscriptions +=
                (e.subs.len() + e.groups.len() + e.readings_groups.len()) as u64;
            for sub in &e.subs {
                outboxes
                    .entry(sub.conn)
                    .or_insert_with(|| sub.outbox.clone());
            }
        }
        for e in self.sessions.iter() {
            for (conn, outbox) in &e.conns {
                outboxes.entry(*conn).or_insert_with(|| outbox.clone());
            }
        }
        self.batches.for_each_member(|conn, outbox| {
            outboxes.entry(conn).or_insert_with(|| outbox.clone());
        });
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

    /// The sessions whose expiry, as this process last read it, has passed: the expiry checker
    /// asks the database about them before it logs any out (`listen::expire_due`).
    pub fn sessions_due(&self, now: DateTime<Utc>) -> Vec<String> {
        self.sessions
            .iter()
            .filter(|e| e.expires_at <= now)
            .map(|e| e.key().to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Format;

    fn variant() -> Variant {
        Variant {
            format: Format::Full,
            tz: chrono_tz::UTC,
            iso: false,
        }
    }

    fn publish(hub: &Hub, tracker: TrackerId, change: i64) {
        hub.publish_state(model::test_state(tracker, change), false, Utc::now());
    }

    async fn drain(outbox: &Outbox) -> Vec<Outgoing> {
        let mut all = Vec::new();
        while !outbox.is_empty() {
            let mut batch = Vec::new();
            outbox.pop_batch(64, &mut batch).await;
            all.extend(batch);
        }
        all
    }

    /// (tracker, change) of each state taken, in order.
    fn states(items: &[Outgoing]) -> Vec<(TrackerId, i64)> {
        items
            .iter()
            .filter_map(|i| match i {
                Outgoing::State {
                    tracker, change, ..
                } => Some((*tracker, *change)),
                _ => None,
            })
            .collect()
    }

    /// A state read with the compact columns goes only where every subscriber takes the compact
    /// format; a full-format subscriber that came meanwhile makes the hub refuse it without
    /// moving anything, so the same change read in full still reaches both.
    #[tokio::test]
    async fn a_compact_read_is_refused_once_a_full_subscriber_watches() {
        let hub = Hub::new();
        let compact = Variant {
            format: Format::Compact,
            ..variant()
        };
        let a = hub.outbox(8);
        let b = hub.outbox(8);
        hub.subscribe(1, &a, &[7], compact);
        hub.set_source_ids(&[(7, 70)]);
        assert_eq!(hub.wanted_read(7), Some((Some(70), true)));
        assert_eq!(
            hub.publish_compact_state(model::test_state(7, 10), Utc::now()),
            Some(1)
        );
        assert_eq!(states(&drain(&a).await), [(7, 10)]);

        hub.subscribe(2, &b, &[7], variant());
        assert_eq!(hub.wanted_read(7).map(|(_, compact)| compact), Some(false));
        assert_eq!(
            hub.publish_compact_state(model::test_state(7, 11), Utc::now()),
            None
        );
        assert!(a.is_empty() && b.is_empty());
        publish(&hub, 7, 11);
        assert_eq!(states(&drain(&a).await), [(7, 11)]);
        assert_eq!(states(&drain(&b).await), [(7, 11)]);
    }

    /// A socket whose session ended still counts in the queue gauges until it has taken its
    /// `logout` (one that stopped reading may not for up to its idle timeout).
    #[test]
    fn the_queue_gauges_see_a_socket_whose_session_ended() {
        let hub = Hub::new();
        let outbox = hub.outbox(8);
        let hash: Arc<str> = Arc::from("f4bf1b75403d851653dad99c78c4b237");
        hub.register_session(&hash, 1, &outbox, Utc::now() + chrono::Duration::hours(1));
        hub.subscribe(1, &outbox, &[5, 6], variant());
        publish(&hub, 5, 10);
        publish(&hub, 6, 10);
        assert_eq!(hub.sample().queue_depth, 2);
        assert_eq!(hub.logout(&hash), 1);
        let s = hub.sample();
        assert_eq!((s.sessions, s.queue_depth, s.queue_depth_max), (0, 3, 3));
    }

    #[test]
    fn a_tracker_with_one_watcher_holds_room_for_one() {
        let hub = Hub::new();
        let outbox = hub.outbox(8);
        hub.subscribe(1, &outbox, &[5], variant());
        let capacity = hub.trackers.get(&5).map(|e| e.subs.capacity());
        assert_eq!(capacity, Some(1));
        hub.subscribe(2, &outbox, &[5], variant());
        assert_eq!(hub.trackers.get(&5).map(|e| e.subs.len()), Some(2));
    }

    /// Every watched tracker has an entry: 100,000 trackers cost 100,000 of them; and a
    /// subscription per watcher.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_tracker_entry_stays_small() {
        let size = std::mem::size_of::<Subscriber>();
        assert!(size <= 48, "Subscriber is {size} bytes");
        let size = std::mem::size_of::<TrackerEntry>();
        assert!(size <= 136, "TrackerEntry is {size} bytes");
    }

    #[test]
    fn a_read_older_than_a_source_change_does_not_undo_it() {
        let hub = Hub::new();
        let outbox = hub.outbox(8);
        hub.subscribe(1, &outbox, &[5], variant());
        let facts = |source_id| TrackerFacts {
            source_id,
            account_id: 1,
            blocked: false,
            change_no: 1,
        };
        assert_eq!(hub.source_id(5), None);
        hub.observe(5, facts(50));
        assert_eq!(hub.source_id(5), Some(50));
        // `i|5`: the processor forgets and re-reads it; a subscribe's older read comes after.
        hub.forget_source_ids(&[5]);
        assert_eq!(hub.source_id(5), None);
        hub.set_source_ids(&[(5, 51)]);
        hub.observe(5, facts(50));
        assert_eq!(hub.source_id(5), Some(51));
        // Unwatched trackers are not added.
        hub.set_source_ids(&[(6, 60)]);
        assert_eq!(hub.source_id(6), None);
    }

    /// A `corrupt` (here: the tracker moved to another account) ends the watches it reaches,
    /// not the tracker. A subscriber of the new account, whether it read the tracker before the
    /// event was published or after, gets its states while the old subscribers have not left
    /// yet (their sockets leave when they take the event; a stalled one much later).
    #[tokio::test]
    async fn a_corrupt_ends_the_old_watches_not_the_trackers_states() {
        let facts = |account_id, blocked, change_no| TrackerFacts {
            source_id: 50,
            account_id,
            blocked,
            change_no,
        };
        // (Blocked in its old account, moved and unblocked in one statement: the event says
        // only `corrupt`.)
        for new_reads_first in [false, true] {
            let hub = Hub::new();
            let (old, new) = (hub.outbox(8), hub.outbox(8));
            hub.subscribe(1, &old, &[5], variant());
            hub.observe(5, facts(1, false, 1));
            assert!(hub.publish_lifecycle(5, 2, Lifecycle::Block));
            if new_reads_first {
                hub.subscribe(2, &new, &[5], variant());
                hub.observe(5, facts(3, false, 10));
            }
            assert!(hub.publish_lifecycle(5, 10, Lifecycle::Corrupt));
            if !new_reads_first {
                hub.subscribe(2, &new, &[5], variant());
                hub.observe(5, facts(3, false, 10));
            }
            assert!(hub.wants_state(5));
            publish(&hub, 5, 11);
            let got = drain(&new).await;
            assert_eq!(
                states(&got),
                [(5, 11)],
                "new_reads_first: {new_reads_first}"
            );
            // The old socket takes the block, then the corrupt (and drops its watch there).
            let taken = drain(&old).await;
            let kinds: Vec<Lifecycle> = taken
                .iter()
                .filter_map(|i| match i {
                    Outgoing::Lifecycle { kind, .. } => Some(*kind),
                    _ => None,
                })
                .collect();
            assert_eq!(kinds, [Lifecycle::Block, Lifecycle::Corrupt]);
            // It leaves; the new one keeps the tracker.
            hub.unsubscribe(1, &[5]);
            publish(&hub, 5, 12);
            assert_eq!(states(&drain(&new).await), [(5, 12)]);
            assert!(old.is_empty());
        }
    }

    fn holds_state(hub: &Hub, id: TrackerId) -> bool {
        hub.trackers.get(&id).is_some_and(|e| e.held.is_some())
    }

    #[tokio::test]
    async fn a_large_overflow_drains_whole_in_batches() {
        let hub = Hub::new();
        let outbox = hub.outbox(1);
        let ids: Vec<TrackerId> = (0..10_000).collect();
        hub.subscribe(1, &outbox, &ids, variant());
        for &id in &ids {
            publish(&hub, id, 1);
        }
        publish(&hub, 5, 2);
        let mut seen = HashSet::new();
        let mut batch = Vec::new();
        while !outbox.is_empty() {
            batch.clear();
            outbox.pop_batch(64, &mut batch).await;
            assert!(batch.len() <= 64);
            for (tracker, change) in states(&batch) {
                assert!(seen.insert(tracker), "tracker {tracker} taken twice");
                if tracker == 5 {
                    assert_eq!(change, 2, "the newest state of a coalesced tracker");
                }
            }
        }
        assert_eq!(seen.len(), 10_000);
    }

    #[tokio::test]
    async fn full_outbox_keeps_newest_state_per_tracker() {
        let hub = Hub::new();
        let outbox = hub.outbox(2);
        hub.subscribe(1, &outbox, &[1, 2], variant());
        for change in 1..=10 {
            publish(&hub, 1, change);
            publish(&hub, 2, change);
        }
        assert!(outbox.len() <= 4, "queue stays bounded");
        let items = states(&drain(&outbox).await);
        let last_for = |t| {
            items
                .iter()
                .filter(|(id, _)| *id == t)
                .map(|(_, c)| *c)
                .max()
        };
        assert_eq!(last_for(1), Some(10));
        assert_eq!(last_for(2), Some(10));
        // Two queued each, one marked each, and the other eight replaced the mark's state.
        assert_eq!(outbox.coalesced(), 16);
        assert_eq!(hub.stats.coalesced.load(Ordering::Relaxed), 16);
    }

    #[tokio::test]
    async fn a_socket_behind_gets_the_newest_and_the_others_every_state() {
        let hub = Hub::new();
        let (slow, fast) = (hub.outbox(1), hub.outbox(64));
        hub.subscribe(1, &slow, &[7], variant());
        hub.subscribe(2, &fast, &[7], variant());
        for change in 1..=5 {
            publish(&hub, 7, change);
            // The fast socket reads as it goes.
            assert_eq!(states(&drain(&fast).await), [(7, change)]);
        }
        assert!(holds_state(&hub, 7), "the slow socket holds a mark");
        assert_eq!(states(&drain(&slow).await), [(7, 1), (7, 5)]);
        // The next state finds nobody behind: the hub stops keeping it.
        publish(&hub, 7, 6);
        assert!(!holds_state(&hub, 7));
        assert_eq!(states(&drain(&slow).await), [(7, 6)]);
        assert_eq!(states(&drain(&fast).await), [(7, 6)]);
    }

    #[tokio::test]
    async fn a_state_taken_while_published_is_the_newest() {
        // The mark is taken between two states: the second must still arrive.
        let hub = Hub::new();
        let outbox = hub.outbox(1);
        hub.subscribe(1, &outbox, &[3, 4], variant());
        publish(&hub, 3, 1);
        publish(&hub, 4, 1); // marked
        publish(&hub, 4, 2); // coalesced into the mark
        let mut first = Vec::new();
        outbox.pop_batch(64, &mut first).await;
        assert_eq!(states(&first), [(3, 1), (4, 2)]);
        publish(&hub, 4, 3);
        assert_eq!(states(&drain(&outbox).await), [(4, 3)]);
    }

    #[tokio::test]
    async fn unsubscribing_drops_the_mark_and_frees_the_slot() {
        let hub = Hub::new();
        let outbox = hub.outbox(1);
        hub.subscribe(1, &outbox, &[1, 2], variant());
        publish(&hub, 1, 1);
        publish(&hub, 2, 1); // marked
        hub.unsubscribe(1, &[2]);
        assert_eq!(outbox.len(), 1);
        // Tracker 3 reuses tracker 2's slot, and is marked in its own right.
        hub.subscribe(1, &outbox, &[3], variant());
        publish(&hub, 3, 4);
        assert_eq!(states(&drain(&outbox).await), [(1, 1), (3, 4)]);
        publish(&hub, 3, 5);
        assert!(!holds_state(&hub, 3));
        outbox.close();
        hub.subscribe(1, &outbox, &[9], variant());
        publish(&hub, 9, 1);
        assert!(outbox.is_empty(), "a closed outbox takes nothing");
    }

    #[tokio::test]
    async fn dropped_marks_are_skipped_and_swept() {
        let hub = Hub::new();
        let outbox = hub.outbox(1);
        let ids: Vec<TrackerId> = (0..1_000).collect();
        hub.subscribe(1, &outbox, &ids, variant());
        for &id in &ids {
            publish(&hub, id, 1); // 0 queued, the rest marked
        }
        hub.unsubscribe(1, &ids[100..]);
        assert_eq!(outbox.len(), 100, "the queued state and 99 marks");
        assert!(outbox.lock().marks.len() < 200, "dropped marks were swept");
        let taken = states(&drain(&outbox).await);
        assert_eq!(taken.len(), 100);
        assert!(taken.iter().all(|(id, _)| *id < 100));
        // Every held state was counted off: the next states keep nothing.
        for &id in &ids[..100] {
            publish(&hub, id, 2);
            assert!(!holds_state(&hub, id));
            assert_eq!(states(&drain(&outbox).await), [(id, 2)]);
        }
    }

    #[tokio::test]
    async fn closing_drops_the_marks() {
        let hub = Hub::new();
        let outbox = hub.outbox(1);
        hub.subscribe(1, &outbox, &[1, 2], variant());
        publish(&hub, 1, 1);
        publish(&hub, 2, 1); // marked
        outbox.close();
        hub.unsubscribe(1, &[1, 2]);
        assert_eq!(hub.tracker_count(), 0);
        let other = hub.outbox(8);
        hub.subscribe(2, &other, &[2], variant());
        publish(&hub, 2, 2);
        assert!(!holds_state(&hub, 2));
    }

    #[tokio::test]
    async fn queued_frames_are_counted_until_taken() {
        let outbox = Outbox::new(8);
        outbox.push(Outgoing::Frame {
            group: 1,
            frame: ByteString::from("batch 1").into(),
        });
        outbox.push(Outgoing::Logout {
            hash: Arc::from("h"),
        });
        outbox.push(Outgoing::Frame {
            group: 1,
            frame: ByteString::from("batch 2").into(),
        });
        assert_eq!(outbox.frames(), 2);
        let mut out = Vec::new();
        outbox.pop_batch(2, &mut out).await;
        assert_eq!(outbox.frames(), 1);
        outbox.close();
        assert_eq!(outbox.frames(), 0);
    }

    #[tokio::test]
    async fn lifecycle_is_never_dropped_and_follows_held_state() {
        let hub = Hub::new();
        let outbox = hub.outbox(1);
        hub.subscribe(1, &outbox, &[1, 2], variant());
        publish(&hub, 1, 1);
        publish(&hub, 2, 5); // marked
        assert!(hub.publish_lifecycle(2, 6, Lifecycle::Block));
        let order: Vec<String> = drain(&outbox)
            .await
            .iter()
            .map(|i| match i {
                Outgoing::State {
                    tracker, change, ..
                } => format!("{tracker}:{change}"),
                Outgoing::Lifecycle { kind, .. } => format!("{kind:?}"),
                _ => String::new(),
            })
            .collect();
        assert_eq!(order, ["1:1", "2:5", "Block"]);
        // The mark went with the lifecycle event: nothing is kept for it.
        assert!(hub.publish_lifecycle(2, 7, Lifecycle::Unblock));
        assert!(!holds_state(&hub, 2));
    }
}
