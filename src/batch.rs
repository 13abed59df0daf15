//! `state_batch` and `readings_batch` subscriptions. Owns the batch groups: one per (session
//! scope, target, rate limit, variant, kind), shared by every socket that asks for the same
//! thing, so that a thousand dashboards watching the same account at the same rate cost one
//! batch build per period.
//!
//! A group is a subscriber in the [`Hub`] index like a socket is: the hub hands it every state
//! and lifecycle event of its target's trackers. The group keeps the newest state per tracker and
//! the set changed since the last period; a timer task per group renders one frame per period
//! (nothing when nothing changed) and queues the same bytes to every member. A member whose queue
//! is full is skipped; once it has drained it gets one catch-up batch with every tracker changed
//! since the last batch it got (rendered once for all members that fell behind at the same
//! period), so slow dashboards cost bounded memory and still end with the latest state.
//!
//! A readings group ([`GroupKind::Readings`]) works the same way, keyed one level deeper: it
//! keeps the newest reading per (tracker, key) by change number, offered by the LISTEN processor
//! through [`Hub::offer_readings`], and each batch carries only the keys changed in the period.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytestring::ByteString;
use chrono::Utc;
use dashmap::DashMap;
use futures_util::stream::{self, StreamExt};
use sqlx::PgPool;
use tokio::sync::{Notify, OnceCell};

use crate::access;
use crate::db::queries;
use crate::hub::{ConnId, Hub, Outbox, Outgoing, TrackerFacts};
use crate::model::{self, Format, Lifecycle, TrackerId, TrackerState, Variant};
use crate::readings::{self, ReadingKey, ReadingRow, ReadingsFilter};
use crate::ws::deflate::SharedFrame;
use crate::ws::protocol::StatusMap;

/// Smallest accepted `rate_limit`.
pub const MIN_RATE: Duration = Duration::from_millis(100);
/// Largest accepted `rate_limit`.
pub const MAX_RATE: Duration = Duration::from_secs(3600);
/// `rate_limit` when the request has none.
pub const DEFAULT_RATE: Duration = Duration::from_secs(1);

/// Parses a timespan such as `"500ms"`, `"5s"`, `"1m"` or `"1h"` within [`MIN_RATE`, `MAX_RATE`].
pub fn parse_rate(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (MIN_RATE..=MAX_RATE).contains(&d).then_some(d)
}

/// What a batch covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Every tracker the session may see, now and later.
    All,
    /// These trackers (sorted, deduplicated).
    Selected(Vec<TrackerId>),
}

/// Whose view of the account a group has: the account, or a sub-user's granted part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope {
    pub account_id: i64,
    /// Set for a sub-user: only its granted trackers are visible.
    pub sub_user: Option<i64>,
}

/// What a group batches: tracker states (`state_batch`) or sensor readings (`readings_batch`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GroupKind {
    State,
    Readings(ReadingsFilter),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub scope: Scope,
    pub target: Target,
    pub rate: Duration,
    pub variant: Variant,
    pub kind: GroupKind,
}

impl GroupKey {
    pub fn is_readings(&self) -> bool {
        matches!(self.kind, GroupKind::Readings(_))
    }
}

struct Member {
    conn: ConnId,
    outbox: Arc<Outbox>,
    capacity: usize,
    /// The member holds every change sent up to this tick (see [`GroupState::ticks`]).
    seen: u64,
}

#[derive(Default)]
struct GroupState {
    members: Vec<Member>,
    /// Trackers of the target (blocked ones included: they still get lifecycle events), each
    /// with the change number of the newest lifecycle facts the group holds for it (from the
    /// read that admitted it, or a later event): an event no newer is old news to the group.
    /// (A tracker moved into the group's account is admitted with the move's change number,
    /// while the move's `corrupt` is on its way to the old account's viewers.)
    trackers: HashMap<TrackerId, i64>,
    blocked: HashSet<TrackerId>,
    latest: HashMap<TrackerId, Arc<TrackerState>>,
    dirty: HashSet<TrackerId>,
    /// Readings groups: the newest reading per tracker and key (blocked trackers' included, so
    /// an unblock can send them), and the keys changed since the last period.
    readings: HashMap<TrackerId, HashMap<ReadingKey, Arc<ReadingRow>>>,
    readings_dirty: HashMap<TrackerId, HashSet<ReadingKey>>,
    /// Periods batched so far.
    ticks: u64,
    /// The tick that last sent a change of each tracker (of each reading key, for readings
    /// groups): a member that missed batches catches up on what changed after the last tick it
    /// got, however far behind it is.
    changed_at: HashMap<TrackerId, u64>,
    readings_changed_at: HashMap<TrackerId, HashMap<ReadingKey, u64>>,
    /// The full batch rendered in the current period, shared by every member that joins or
    /// catches up before the next tick (see [`BatchGroup::shared_full`]).
    full: Option<Option<SharedFrame>>,
    /// What changed since `full` was rendered (trackers; reading keys, for readings groups),
    /// for members joining now (see [`BatchGroup::first_batch`]), and for a readings group the
    /// batch of it, rendered once until the next change. Kept only while `full` is, and at
    /// most a quarter of the target.
    since_full: HashSet<TrackerId>,
    readings_since_full: HashMap<TrackerId, HashSet<ReadingKey>>,
    since_full_batch: Option<Option<SharedFrame>>,
    /// Lifecycle changes of trackers the group is registered for in the hub but has not yet
    /// admitted (between [`add_trackers`]'s registration and the end of its read): applied,
    /// if newer than what the read said, when they are admitted.
    early: HashMap<TrackerId, (i64, Lifecycle)>,
    /// Bumped each time the event processor restricts the group to its sub-user's grants: a
    /// chunk read before a revocation and admitted after it is read again (see [`fill_chunk`]),
    /// since the restriction only reached the trackers already admitted.
    grants_epoch: u64,
    /// The target's statuses as the subscribe response's map, rendered once while they stay
    /// the same (see [`BatchGroup::status_map`]), and the last large subscribe response that
    /// held it (see [`BatchGroup::shared_response`]). Both go when a status changes.
    status_map: Option<StatusMap>,
    response: Option<SharedFrame>,
    /// Bumped by every status change (see [`GroupState::statuses_changed`]).
    status_epoch: u64,
    retired: bool,
}

impl GroupState {
    /// Adds a member that is about to get the full batch (which holds every change up to now).
    fn add_member(&mut self, conn: ConnId, outbox: &Arc<Outbox>, capacity: usize) {
        if !self.members.iter().any(|m| m.conn == conn) {
            self.members.push(Member {
                conn,
                outbox: outbox.clone(),
                capacity: capacity.max(1),
                seen: self.ticks,
            });
        }
    }

    /// Admits trackers with the facts a read gave, or a newer lifecycle change that came while
    /// the read was on its way. Returns those not admitted: removed or moved meanwhile, or all
    /// of them once the group has retired (its last member left while a target that grew was
    /// being read: the group's task has already taken it out of the hub, and trackers admitted
    /// now would stay registered for good).
    ///
    /// Members hold the target's statuses (their response's, and events since): a tracker that
    /// joins a target they share blocked (added, moved in or granted that way) is announced
    /// with `block`, and one whose status this read changes with its event, which the event
    /// processor's own, no newer, then leaves out. One that joins unblocked simply appears in
    /// the next batch. (A group being filled has no members yet.)
    fn admit(&mut self, group: u64, facts: &[(TrackerId, TrackerFacts)]) -> Vec<TrackerId> {
        if self.retired {
            return facts.iter().map(|(id, _)| *id).collect();
        }
        self.drop_full();
        self.statuses_changed();
        let mut gone = Vec::new();
        for (id, f) in facts {
            let (blocked, change) = match self.early.remove(id) {
                Some((change, kind)) if change > f.change_no => match kind {
                    Lifecycle::Corrupt => {
                        gone.push(*id);
                        continue;
                    }
                    kind => (kind == Lifecycle::Block, change),
                },
                _ => (f.blocked, f.change_no),
            };
            // Held already with facts at least as new (two subscribes picking up the same
            // tracker, or the processor's lifecycle change after this read): kept as it is.
            let held = self.trackers.get(id).copied();
            if held.is_some_and(|held| held >= change) {
                continue;
            }
            self.trackers.insert(*id, change);
            let was_blocked = if blocked {
                self.dirty.remove(id);
                self.readings_dirty.remove(id);
                !self.blocked.insert(*id)
            } else {
                let was_blocked = self.blocked.remove(id);
                if was_blocked {
                    // Reopened by this read: what the group holds goes out in the next batch
                    // (a newer state this admission reads replaces it).
                    if self.latest.contains_key(id) {
                        self.dirty.insert(*id);
                    }
                    if let Some(held) = self.readings.get(id) {
                        let keys: HashSet<ReadingKey> = held.keys().cloned().collect();
                        self.readings_dirty.entry(*id).or_default().extend(keys);
                    }
                }
                was_blocked
            };
            let news = if held.is_some() {
                blocked != was_blocked
            } else {
                blocked
            };
            if news && !self.members.is_empty() {
                let kind = if blocked {
                    Lifecycle::Block
                } else {
                    Lifecycle::Unblock
                };
                let frame = ByteString::from(model::lifecycle_event(*id, f.source_id, kind));
                for m in &self.members {
                    m.outbox.push(Outgoing::GroupLifecycle {
                        group,
                        tracker: *id,
                        change,
                        frame: frame.clone(),
                        announced: true,
                    });
                }
            }
        }
        gone
    }

    /// Those of `facts` the group holds unblocked, with their source ids: the trackers whose
    /// states an admission reads.
    fn open_among(&self, facts: &[(TrackerId, TrackerFacts)]) -> HashMap<TrackerId, i64> {
        facts
            .iter()
            .filter(|(id, _)| self.trackers.contains_key(id) && !self.blocked.contains(id))
            .map(|(id, f)| (*id, f.source_id))
            .collect()
    }

    /// Drops the shared full batch and what changed since it was rendered.
    fn drop_full(&mut self) {
        self.full = None;
        self.since_full.clear();
        self.readings_since_full.clear();
        self.since_full_batch = None;
    }

    fn statuses_changed(&mut self) {
        self.status_epoch += 1;
        self.status_map = None;
        self.response = None;
    }

    fn forget(&mut self, id: &TrackerId) {
        self.drop_full();
        self.statuses_changed();
        self.early.remove(id);
        self.trackers.remove(id);
        self.blocked.remove(id);
        self.latest.remove(id);
        self.dirty.remove(id);
        self.readings.remove(id);
        self.readings_dirty.remove(id);
        self.changed_at.remove(id);
        self.readings_changed_at.remove(id);
    }
}

/// What [`BatchGroup::apply_lifecycle`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleApplied {
    /// The group still holds the tracker (or is about to admit it).
    pub keeps: bool,
    /// The event was news to the group and went to its members.
    pub sent: bool,
}

/// A joining member's first batch: frames ready to send, and the states changed since the
/// shared one was rendered, to render without the group's lock.
pub struct FirstBatch {
    frames: Vec<SharedFrame>,
    since: Vec<Arc<TrackerState>>,
}

impl FirstBatch {
    /// The frames, in order (the changes last).
    fn frames(self, group: &BatchGroup) -> Vec<SharedFrame> {
        let mut frames = self.frames;
        let n = self.since.len();
        frames.extend(
            group
                .render_states(self.since.iter().map(|s| &**s), n)
                .map(SharedFrame::new),
        );
        frames
    }
}

pub struct BatchGroup {
    pub key: GroupKey,
    /// Unique in the process: the items a group queues carry it, so that a socket that has
    /// left the group (unsubscribed, or its session ended) drops what it queued before.
    pub id: u64,
    state: Mutex<GroupState>,
    filled: OnceCell<()>,
    /// Told when the last member leaves: the group's task retires it then, not at its next
    /// period (which, at a `rate_limit` of an hour, kept a group nobody held registered in
    /// the hub, reading and keeping its trackers' states, for up to an hour).
    emptied: Notify,
}

impl BatchGroup {
    fn new(key: GroupKey) -> BatchGroup {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        BatchGroup {
            key,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(GroupState::default()),
            filled: OnceCell::new(),
            emptied: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // Every mutation is a short sequence of map operations; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A state from the hub: kept if newer (or re-sent after an unblock), marked changed.
    pub fn offer(&self, state: &Arc<TrackerState>, resend: bool) {
        let mut g = self.lock();
        let g = &mut *g;
        let id = state.tracker_id;
        // A tracker with a state held is one of the target's (`forget` drops both), so the
        // common case costs one lookup in `latest` rather than one in `trackers` as well: with
        // the whole fleet in a group, each lookup is a cache miss.
        let old = match g.latest.get_mut(&id) {
            Some(old) => Some(old),
            None if g.trackers.contains_key(&id) => None,
            None => return,
        };
        if g.blocked.contains(&id) {
            return;
        }
        match old {
            Some(old) if state.change_no > old.change_no || resend => *old = state.clone(),
            Some(_) => return,
            None => {
                g.latest.insert(id, state.clone());
            }
        }
        g.dirty.insert(id);
        if g.full.is_some() {
            g.since_full.insert(id);
            // A quarter of the target changed: the next join renders a new full batch anyway
            // (see `first_batch`), so stop keeping track.
            if g.since_full.len() * 4 >= g.latest.len() {
                g.drop_full();
            }
        }
    }

    /// A reading from the hub (readings groups): kept if it passes the filter and is newer than
    /// the one held for its key, and marked changed unless the tracker is blocked.
    pub fn offer_reading(&self, r: &Arc<ReadingRow>) {
        let GroupKind::Readings(filter) = &self.key.kind else {
            return;
        };
        if !filter.accepts(r) {
            return;
        }
        let mut g = self.lock();
        if !g.trackers.contains_key(&r.tracker_id) {
            return;
        }
        let key = r.key();
        let held = g.readings.entry(r.tracker_id).or_default();
        if held
            .get(&key)
            .is_some_and(|old| old.change_no >= r.change_no)
        {
            return;
        }
        held.insert(key.clone(), r.clone());
        if !g.blocked.contains(&r.tracker_id) {
            if g.full.is_some() {
                g.readings_since_full
                    .entry(r.tracker_id)
                    .or_default()
                    .insert(key.clone());
                g.since_full_batch = None;
                if g.readings_since_full.len() * 4 >= g.readings.len() {
                    g.drop_full();
                }
            }
            g.readings_dirty
                .entry(r.tracker_id)
                .or_default()
                .insert(key);
        }
    }

    /// A lifecycle event from the hub: forwarded to every member at once (never batched), unless
    /// the group already knew it (a block its target read saw, published later; a `corrupt`
    /// older than the move that brought the tracker in): the members were told that in their
    /// statuses. Returns whether the group still holds the tracker (or is about to admit it).
    pub fn lifecycle(
        &self,
        id: TrackerId,
        change: i64,
        kind: Lifecycle,
        frame: &ByteString,
    ) -> bool {
        self.apply_lifecycle(id, change, kind, frame).keeps
    }

    /// As [`BatchGroup::lifecycle`], saying also whether the members were sent the event. The
    /// decision and the sending are made under one lock: a resync that judged first and sent
    /// after could see an admission in between (see [`crate::hub::Hub::resync_lifecycle`]).
    pub fn apply_lifecycle(
        &self,
        id: TrackerId,
        change: i64,
        kind: Lifecycle,
        frame: &ByteString,
    ) -> LifecycleApplied {
        let kept = LifecycleApplied {
            keeps: true,
            sent: false,
        };
        let mut g = self.lock();
        let Some(known) = g.trackers.get_mut(&id) else {
            // Registered in the hub, not yet admitted: keep the newest for the admission.
            let e = g.early.entry(id).or_insert((change, kind));
            if change > e.0 {
                *e = (change, kind);
            }
            return kept;
        };
        if change <= *known {
            return kept;
        }
        *known = change;
        let news = match kind {
            Lifecycle::Block => !g.blocked.contains(&id),
            Lifecycle::Unblock => g.blocked.contains(&id),
            Lifecycle::Corrupt => true,
        };
        if !news {
            return kept;
        }
        // A member joining later must not get a full batch, or statuses, that predate this
        // event.
        g.drop_full();
        g.statuses_changed();
        match kind {
            Lifecycle::Block => {
                g.blocked.insert(id);
                g.dirty.remove(&id);
                g.readings_dirty.remove(&id);
            }
            Lifecycle::Unblock => {
                g.blocked.remove(&id);
                // Readings come back in the next batch (states are re-sent by the processor).
                let keys: HashSet<ReadingKey> = g
                    .readings
                    .get(&id)
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                if !keys.is_empty() {
                    g.readings_dirty.insert(id, keys);
                }
            }
            Lifecycle::Corrupt => g.forget(&id),
        }
        for m in &g.members {
            m.outbox.push(Outgoing::GroupLifecycle {
                group: self.id,
                tracker: id,
                change,
                frame: frame.clone(),
                announced: false,
            });
        }
        LifecycleApplied {
            keeps: kind != Lifecycle::Corrupt,
            sent: true,
        }
    }

    /// A readings batch: per tracker (sorted, blocked ones left out), the readings named by
    /// `keys`, or all of the tracker's readings when `keys` is `None`.
    fn render_readings(
        &self,
        g: &GroupState,
        mut ids: Vec<TrackerId>,
        keys: Option<&HashMap<TrackerId, HashSet<ReadingKey>>>,
    ) -> Option<ByteString> {
        ids.sort_unstable();
        let mut out = String::new();
        let mut n = 0usize;
        for id in ids {
            if g.blocked.contains(&id) {
                continue;
            }
            let Some(held) = g.readings.get(&id) else {
                continue;
            };
            let mut rows: Vec<(&ReadingKey, &Arc<ReadingRow>)> = match keys {
                Some(k) => k
                    .get(&id)
                    .into_iter()
                    .flatten()
                    .filter_map(|key| held.get_key_value(key))
                    .collect(),
                None => held.iter().collect(),
            };
            if rows.is_empty() {
                continue;
            }
            rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(if n == 0 { '[' } else { ',' });
            out.push_str(&readings::render_item(
                id,
                rows.into_iter().map(|(_, r)| r.as_ref()),
                self.key.variant,
            ));
            n += 1;
        }
        if n == 0 {
            return None;
        }
        out.push(']');
        Some(ByteString::from(model::batch_event(
            "readings_batch",
            &out,
            self.key.variant,
            Utc::now(),
        )))
    }

    fn render(
        &self,
        g: &GroupState,
        ids: &mut dyn Iterator<Item = TrackerId>,
    ) -> Option<ByteString> {
        let hint = ids.size_hint().0;
        self.render_states(
            ids.filter(|id| !g.blocked.contains(id))
                .filter_map(|id| g.latest.get(&id).map(|s| &**s)),
            hint,
        )
    }

    /// A state batch of `states` (about `hint` of them), or `None` if there are none.
    fn render_states<'a>(
        &self,
        states: impl Iterator<Item = &'a TrackerState>,
        hint: usize,
    ) -> Option<ByteString> {
        // One buffer for the whole frame, sized for the items up front: a batch can hold the
        // whole target (100,000 items, tens of megabytes).
        let per_item = if self.key.variant.format == Format::Full {
            800
        } else {
            420
        };
        let mut out = String::with_capacity(128 + hint * per_item);
        model::write_batch_head(&mut out, "state_batch", self.key.variant, Utc::now());
        let mut n = 0usize;
        for s in states {
            out.push(if n == 0 { '[' } else { ',' });
            model::write_batch_item(&mut out, s, self.key.variant);
            n += 1;
        }
        if n == 0 {
            return None;
        }
        out.push_str("]}");
        Some(ByteString::from(out))
    }

    /// Every non-blocked tracker's latest state, as one frame (a member's first batch).
    fn full_frame(&self, g: &GroupState) -> Option<ByteString> {
        if self.key.is_readings() {
            return self.render_readings(g, g.readings.keys().copied().collect(), None);
        }
        let mut ids: Vec<TrackerId> = g.latest.keys().copied().collect();
        ids.sort_unstable();
        self.render(g, &mut ids.into_iter())
    }

    /// The full batch, rendered at most once per period: every member joining (or catching up)
    /// until the next tick gets the same bytes. It stays valid until then because whatever
    /// changes after it was rendered is marked dirty and so goes out in the next delta, and a
    /// member joining meanwhile gets that too, at once ([`BatchGroup::first_batch`]); a
    /// lifecycle change or a change of target drops it. Rendering it once per join cost a
    /// hundred renders of 100,000 trackers (and gigabytes of frames) when a hundred dashboards
    /// joined at once in the benchmark.
    fn shared_full(&self, g: &mut GroupState) -> Option<SharedFrame> {
        if let Some(f) = &g.full {
            return f.clone();
        }
        let f = self.full_frame(g).map(SharedFrame::new);
        g.full = Some(f.clone());
        f
    }

    /// What a member joining now gets: the period's shared full batch, then what changed since
    /// it was rendered, so that the member starts at the latest states (not at those of the
    /// period's first join, up to a period old, and older than states its socket may already
    /// have had as `state` events). Once a quarter of the target changed, a new full batch
    /// instead, shared from then on (`offer` drops the old one then). A state group's changes
    /// come as a snapshot, rendered by [`FirstBatch::frames`] once the lock is released: with
    /// live traffic nearly every join has its own, and rendering it under the lock held up the
    /// event processor's offers. A readings group's are rendered here, once until the next
    /// change.
    fn first_batch(&self, g: &mut GroupState) -> FirstBatch {
        let full = self.shared_full(g);
        let mut first = FirstBatch {
            frames: full.into_iter().collect(),
            since: Vec::new(),
        };
        if self.key.is_readings() {
            if g.readings_since_full.is_empty() {
                return first;
            }
            if g.since_full_batch.is_none() {
                let keys = std::mem::take(&mut g.readings_since_full);
                let batch = self.render_readings(g, keys.keys().copied().collect(), Some(&keys));
                g.readings_since_full = keys;
                g.since_full_batch = Some(batch.map(SharedFrame::new));
            }
            first.frames.extend(g.since_full_batch.clone().flatten());
            return first;
        }
        let mut ids: Vec<TrackerId> = g.since_full.iter().copied().collect();
        ids.sort_unstable();
        first.since = ids
            .iter()
            .filter(|id| !g.blocked.contains(id))
            .filter_map(|id| g.latest.get(id).cloned())
            .collect();
        first
    }

    /// A catch-up batch for a member that holds every change up to tick `since`: every tracker
    /// changed after it (every reading key, for readings groups), each at its latest. When that
    /// is the whole target, the period's shared full batch.
    fn catch_up(&self, g: &mut GroupState, since: u64) -> Option<SharedFrame> {
        if self.key.is_readings() {
            let keys: HashMap<TrackerId, HashSet<ReadingKey>> = g
                .readings_changed_at
                .iter()
                .filter_map(|(id, at)| {
                    let keys: HashSet<ReadingKey> = at
                        .iter()
                        .filter(|(_, t)| **t > since)
                        .map(|(k, _)| k.clone())
                        .collect();
                    (!keys.is_empty()).then_some((*id, keys))
                })
                .collect();
            return self
                .render_readings(g, keys.keys().copied().collect(), Some(&keys))
                .map(SharedFrame::new);
        }
        let mut ids: Vec<TrackerId> = g
            .changed_at
            .iter()
            .filter(|(_, t)| **t > since)
            .map(|(id, _)| *id)
            .collect();
        if ids.len() >= g.latest.len() {
            return self.shared_full(g);
        }
        ids.sort_unstable();
        self.render(g, &mut ids.into_iter()).map(SharedFrame::new)
    }

    /// One period: the changed trackers to every member that keeps up; to a member that missed
    /// batches and has drained, a catch-up of everything changed since the last batch it got.
    /// Returns `None` once the group has no members, else how many members were skipped.
    /// A member is skipped when its queue is full or when a batch of an earlier period is still
    /// waiting in it: batches can weigh megabytes, so counting queued items alone let a slow
    /// dashboard hold hundreds of them (gigabytes, in the benchmark).
    fn tick(&self) -> Option<usize> {
        self.tick_with(|| {})
    }

    /// [`BatchGroup::tick`], running `meanwhile` while a state group's delta is rendered with
    /// the lock released (before the period, for a readings group): what tests interleave.
    fn tick_with(&self, meanwhile: impl FnOnce()) -> Option<usize> {
        let mut meanwhile = Some(meanwhile);
        if self.key.is_readings() {
            if let Some(f) = meanwhile.take() {
                f();
            }
        }
        let mut g = self.lock();
        if g.members.is_empty() {
            g.retired = true;
            return None;
        }
        let now = g.ticks + 1;
        g.ticks = now;
        let delta = if self.key.is_readings() {
            let dirty = std::mem::take(&mut g.readings_dirty);
            for (id, keys) in &dirty {
                let at = g.readings_changed_at.entry(*id).or_default();
                for key in keys {
                    at.insert(key.clone(), now);
                }
            }
            g.drop_full();
            self.render_readings(&g, dirty.keys().copied().collect(), Some(&dirty))
        } else {
            let mut changed: Vec<TrackerId> = g.dirty.drain().collect();
            for id in &changed {
                g.changed_at.insert(*id, now);
            }
            changed.sort_unstable();
            // A new period starts: the dirty set was just drained into the delta.
            g.drop_full();
            // The delta is rendered from a snapshot with the lock released: rendering 50,000
            // entries took 50-380 ms, and the event processor's offers (every state event of
            // the process) waited for it. Whatever comes meanwhile is dirty for the next
            // period; a status change meanwhile (a block) means rendering again, below.
            let snapshot: Vec<Arc<TrackerState>> = changed
                .iter()
                .filter(|id| !g.blocked.contains(id))
                .filter_map(|id| g.latest.get(id).cloned())
                .collect();
            let epoch = g.status_epoch;
            drop(g);
            let rendered = self.render_states(snapshot.iter().map(|s| &**s), snapshot.len());
            drop(snapshot);
            if let Some(f) = meanwhile.take() {
                f();
            }
            g = self.lock();
            if g.status_epoch == epoch {
                rendered
            } else {
                self.render(&g, &mut changed.into_iter())
            }
        };
        // Catch-ups rendered this tick, by the tick their members were at: a hundred dashboards
        // that fell behind together cost one render.
        let delta = delta.map(SharedFrame::new);
        let mut catch_ups: HashMap<u64, Option<SharedFrame>> = HashMap::new();
        let mut members = std::mem::take(&mut g.members);
        let mut skipped = 0;
        for m in &mut members {
            if m.seen >= now {
                // Joined while the delta was rendered: its full batch holds this period.
                continue;
            }
            if m.outbox.len() >= m.capacity || m.outbox.frames() > 0 {
                skipped += 1;
                continue;
            }
            let frame = if m.seen + 1 >= now {
                delta.clone()
            } else {
                catch_ups
                    .entry(m.seen)
                    .or_insert_with(|| self.catch_up(&mut g, m.seen))
                    .clone()
            };
            if let Some(f) = frame {
                m.outbox.push(Outgoing::Frame {
                    group: self.id,
                    frame: f,
                });
            }
            m.seen = now;
        }
        g.members = members;
        Some(skipped)
    }

    /// The target's statuses (`normal` or `blocked`, by id) as the subscribe response's map:
    /// rendered once and shared by every member that joins while they stay the same.
    pub fn status_map(&self) -> StatusMap {
        Self::status_map_of(&mut self.lock())
    }

    fn status_map_of(g: &mut GroupState) -> StatusMap {
        if let Some(m) = &g.status_map {
            return m.clone();
        }
        let mut ids: Vec<TrackerId> = g.trackers.keys().copied().collect();
        ids.sort_unstable();
        let m = StatusMap::new(ids.into_iter().map(|id| {
            let status = if g.blocked.contains(&id) {
                access::BLOCKED
            } else {
                access::NORMAL
            };
            (id, status)
        }));
        g.status_map = Some(m.clone());
        m
    }

    /// A large subscribe response that holds this group's statuses, as a frame shared with the
    /// members that got the same bytes before it: compressed once for all of them. A hundred
    /// dashboards joining a group of 100,000 trackers each compressed their own copy of the
    /// same 2 MB response. Kept until a status changes (or a different response comes).
    pub fn shared_response(&self, text: String) -> SharedFrame {
        let last = self.lock().response.clone();
        if let Some(f) = last {
            if f.text().as_bytes() == text.as_bytes() {
                return f;
            }
        }
        let f = SharedFrame::new(text.into());
        self.lock().response = Some(f.clone());
        f
    }

    pub fn tracker_ids(&self) -> Vec<TrackerId> {
        self.lock().trackers.keys().copied().collect()
    }

    pub fn member_count(&self) -> usize {
        self.lock().members.len()
    }
}

/// Trackers per chunk when a group reads its target's facts and states (see `fill_chunk`).
const FILL_CHUNK: usize = 10_000;
/// Those chunks in flight at once (a pool connection each): a group of 100,000 trackers read
/// its states one chunk after another in 450 ms, while PostgreSQL used one core of two.
const FILL_READS_IN_FLIGHT: usize = 3;

/// The registry of batch groups.
pub struct Batches {
    groups: DashMap<GroupKey, Arc<BatchGroup>>,
    runtime: Option<tokio::runtime::Handle>,
}

impl Default for Batches {
    fn default() -> Self {
        Batches {
            groups: DashMap::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

/// What a socket gets when it joins a group.
pub struct Joined {
    pub group: Arc<BatchGroup>,
    /// The target's statuses. A selected target's response names every id asked for, so the
    /// socket reads those itself and falls back on these only if that read fails.
    pub statuses: StatusMap,
    /// For a selected target, the trackers the group holds, and whether each is blocked, as
    /// of the first batch: the answer for those follows the group's view (a status read after
    /// it may already say `blocked` of a tracker whose state is in the first batch).
    pub held: HashMap<TrackerId, bool>,
    /// The period's shared full batch and, if anything changed since it was rendered, a batch
    /// of that (see [`BatchGroup::first_batch`]).
    pub first_batch: Vec<SharedFrame>,
}

impl Batches {
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Calls `f` with every member's connection and outbox (for `/metrics`' queue gauges).
    pub fn for_each_member(&self, mut f: impl FnMut(ConnId, &Arc<Outbox>)) {
        for group in self.groups.iter() {
            for m in &group.lock().members {
                f(m.conn, &m.outbox);
            }
        }
    }

    /// Joins (creating and filling if needed) the group for `key`.
    pub async fn join(
        &self,
        hub: &Arc<Hub>,
        pool: &PgPool,
        key: GroupKey,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        capacity: usize,
    ) -> Result<Joined, sqlx::Error> {
        loop {
            let group = self
                .groups
                .entry(key.clone())
                .or_insert_with(|| Arc::new(BatchGroup::new(key.clone())))
                .clone();
            group
                .filled
                .get_or_try_init(|| self.fill(hub, pool, &group))
                .await?;
            if let Err(e) = self.pick_up(hub, pool, &group).await {
                // A group just filled for this join has no member: its task retires it now,
                // not at its first period (up to an hour away), unless one joins meanwhile.
                if group.lock().members.is_empty() {
                    group.emptied.notify_one();
                }
                return Err(e);
            }
            let mut g = group.lock();
            if g.retired {
                // Lost a race with the group's last member leaving: start over with a new one.
                drop(g);
                self.groups.remove_if(&key, |_, v| Arc::ptr_eq(v, &group));
                continue;
            }
            g.add_member(conn, outbox, capacity);
            // The statuses of the same view as the first batch, under the same lock: a block
            // the group takes after it comes to the member as its event, after both.
            let first = group.first_batch(&mut g);
            let statuses = BatchGroup::status_map_of(&mut g);
            let held = match &group.key.target {
                Target::Selected(_) => g
                    .trackers
                    .keys()
                    .map(|&id| (id, g.blocked.contains(&id)))
                    .collect(),
                Target::All => HashMap::new(),
            };
            drop(g);
            let first_batch = first.frames(&group);
            return Ok(Joined {
                group,
                statuses,
                held,
                first_batch,
            });
        }
    }

    /// For a `selected` target shared by a filled group: admits the ids it does not hold that
    /// the scope sees now (created, restored, granted or moved in since the group was filled).
    /// A subscribe that answers them `normal` or `blocked` must deliver them, and only `all`
    /// targets follow their account as it changes ([`Batches::accounts_changed`]); without
    /// this a dashboard subscribing again after a grant was told `normal` and never got the
    /// tracker, as long as the group lived.
    async fn pick_up(
        &self,
        hub: &Arc<Hub>,
        pool: &PgPool,
        group: &Arc<BatchGroup>,
    ) -> Result<(), sqlx::Error> {
        let Target::Selected(ids) = &group.key.target else {
            return Ok(());
        };
        let missing: Vec<TrackerId> = {
            let g = group.lock();
            ids.iter()
                .copied()
                .filter(|id| !g.trackers.contains_key(id))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let facts = visible_facts(pool, group.key.scope, &Target::Selected(missing)).await?;
        if !facts.is_empty() {
            tracing::debug!(
                added = facts.len(),
                "selected batch target picked up trackers"
            );
            add_trackers(hub, pool, group, facts).await?;
        }
        Ok(())
    }

    /// Registers a new group in the hub, reads its target and current states, and starts its
    /// timer. Registration comes first, so no change committed meanwhile is missed.
    ///
    /// A fill that fails retires the group: nobody has joined it (members join once it is
    /// filled) and its task, which would take it out of the registry and the hub, has not
    /// started, so the trackers it had admitted stayed watched (their states read and kept) for
    /// the life of the process unless the same batch was asked for again. A subscribe waiting
    /// on the same fill then finds the group retired and starts a new one (see [`Batches::join`]).
    async fn fill(
        &self,
        hub: &Arc<Hub>,
        pool: &PgPool,
        group: &Arc<BatchGroup>,
    ) -> Result<(), sqlx::Error> {
        if group.lock().retired {
            return Ok(());
        }
        let filled = self.fill_new(hub, pool, group).await;
        if filled.is_err() {
            group.lock().retired = true;
            self.groups
                .remove_if(&group.key, |_, v| Arc::ptr_eq(v, group));
            hub.unsubscribe_group(group, &group.tracker_ids());
        }
        filled
    }

    async fn fill_new(
        &self,
        hub: &Arc<Hub>,
        pool: &PgPool,
        group: &Arc<BatchGroup>,
    ) -> Result<(), sqlx::Error> {
        let started = Instant::now();
        let facts = target_trackers(pool, &group.key).await?;
        let target_read = started.elapsed();
        let trackers = facts.len();
        add_trackers(hub, pool, group, facts).await?;
        tracing::debug!(
            trackers,
            target_ms = target_read.as_millis() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            "batch group filled"
        );
        // Nobody has joined yet: the first member's full batch carries these states.
        {
            let mut g = group.lock();
            g.dirty.clear();
            g.readings_dirty.clear();
        }
        if let Some(rt) = &self.runtime {
            rt.spawn(run_group(hub.clone(), group.clone()));
        } else {
            tokio::spawn(run_group(hub.clone(), group.clone()));
        }
        Ok(())
    }

    /// A sub-user's groups keep only the trackers it is still granted; each tracker dropped is
    /// announced to the members as `disallowed`, as for `state` subscriptions.
    pub fn restrict_to_grants(&self, hub: &Hub, user: i64, keep: &HashSet<TrackerId>, round: u64) {
        let groups: Vec<Arc<BatchGroup>> = self
            .groups
            .iter()
            .filter(|g| g.key.scope.sub_user == Some(user))
            .map(|g| g.value().clone())
            .collect();
        for group in groups {
            let dropped: Vec<TrackerId> = {
                let mut g = group.lock();
                g.grants_epoch += 1;
                g.trackers
                    .keys()
                    .copied()
                    .filter(|id| !keep.contains(id))
                    .collect()
            };
            if dropped.is_empty() {
                continue;
            }
            // Source ids are read before taking the group lock: the hub locks a tracker entry
            // and then a group, never the other way round.
            let frames: Vec<(TrackerId, SharedFrame)> = dropped
                .iter()
                .map(|id| {
                    let text = model::disallowed_event(*id, hub.source_id(*id).unwrap_or_default());
                    (*id, SharedFrame::new(text.into()))
                })
                .collect();
            {
                let mut g = group.lock();
                for id in &dropped {
                    g.forget(id);
                }
                for m in &g.members {
                    for (tracker, frame) in &frames {
                        m.outbox.push(Outgoing::GroupDisallow {
                            group: group.id,
                            tracker: *tracker,
                            round,
                            frame: frame.clone(),
                        });
                    }
                }
            }
            unregister(hub, &group, &dropped);
        }
    }

    /// The accounts of the groups whose target is `all`.
    pub fn all_target_accounts(&self) -> HashSet<i64> {
        self.groups
            .iter()
            .filter(|g| g.key.target == Target::All)
            .map(|g| g.key.scope.account_id)
            .collect()
    }

    /// The sub-users that have batch groups.
    pub fn sub_users(&self) -> HashSet<i64> {
        self.groups
            .iter()
            .filter_map(|g| g.key.scope.sub_user)
            .collect()
    }

    pub fn leave(&self, group: &Arc<BatchGroup>, conn: ConnId) {
        let mut g = group.lock();
        g.members.retain(|m| m.conn != conn);
        if g.members.is_empty() {
            group.emptied.notify_one();
        }
    }

    /// Trackers were added to (or granted within) these accounts: `all` groups pick them up.
    pub async fn accounts_changed(
        &self,
        hub: &Arc<Hub>,
        pool: &PgPool,
        accounts: &HashSet<i64>,
    ) -> Result<(), sqlx::Error> {
        let groups: Vec<Arc<BatchGroup>> = self
            .groups
            .iter()
            .filter(|g| g.key.target == Target::All && accounts.contains(&g.key.scope.account_id))
            .map(|g| g.value().clone())
            .collect();
        for group in groups {
            let known: HashSet<TrackerId> = group.lock().trackers.keys().copied().collect();
            let facts: Vec<(TrackerId, TrackerFacts)> = target_trackers(pool, &group.key)
                .await?
                .into_iter()
                .filter(|(id, _)| !known.contains(id))
                .collect();
            if !facts.is_empty() {
                tracing::debug!(added = facts.len(), "batch target grew");
                add_trackers(hub, pool, &group, facts).await?;
            }
        }
        Ok(())
    }
}

/// The target's trackers as the database sees them now.
async fn target_trackers(
    pool: &PgPool,
    key: &GroupKey,
) -> Result<Vec<(TrackerId, TrackerFacts)>, sqlx::Error> {
    visible_facts(pool, key.scope, &key.target).await
}

/// The trackers of `target` that `scope` sees now, with their facts.
async fn visible_facts(
    pool: &PgPool,
    scope: Scope,
    target: &Target,
) -> Result<Vec<(TrackerId, TrackerFacts)>, sqlx::Error> {
    let rows = match target {
        Target::All => queries::visible_trackers(pool, scope.account_id, scope.sub_user).await?,
        Target::Selected(ids) => {
            queries::visible_trackers_among(pool, scope.account_id, scope.sub_user, ids).await?
        }
    };
    Ok(rows.iter().map(|r| (r.id, TrackerFacts::from(r))).collect())
}

async fn add_trackers(
    hub: &Arc<Hub>,
    pool: &PgPool,
    group: &Arc<BatchGroup>,
    candidates: Vec<(TrackerId, TrackerFacts)>,
) -> Result<(), sqlx::Error> {
    // Registered first, then read again: a block, removal or move committed after the target
    // was read, and notified before the group was registered, was dropped by the listener (no
    // one watched the tracker then); only a read made after registering is sure to see it.
    let ids: Vec<TrackerId> = candidates.iter().map(|(id, _)| *id).collect();
    hub.subscribe_group(group, &ids);
    // Then chunk by chunk, several at once (see `fill_chunk`): one chunk's states are read
    // while the next one's facts are.
    let chunks: Vec<Vec<(TrackerId, TrackerFacts)>> =
        candidates.chunks(FILL_CHUNK).map(<[_]>::to_vec).collect();
    // (Owned clones: the event processor's future, which reaches here through
    // `accounts_changed`, must be `Send` for any lifetime.)
    let (h, p, g) = (hub.clone(), pool.clone(), group.clone());
    let mut fills = stream::iter(chunks)
        .map(move |chunk| fill_chunk(h.clone(), p.clone(), g.clone(), chunk))
        .buffered(FILL_READS_IN_FLIGHT);
    while let Some(filled) = fills.next().await {
        if let Err(e) = filled {
            // Those not admitted leave the hub's index.
            unregister(hub, group, &ids);
            return Err(e);
        }
    }
    Ok(())
}

/// Admits a chunk of a group's candidates with the facts read now, then reads their states (or
/// readings). A tracker's state must be read after it is admitted: until then the group drops
/// what the hub offers it for that tracker.
async fn fill_chunk(
    hub: Arc<Hub>,
    pool: PgPool,
    group: Arc<BatchGroup>,
    candidates: Vec<(TrackerId, TrackerFacts)>,
) -> Result<(), sqlx::Error> {
    let ids: Vec<TrackerId> = candidates.iter().map(|(id, _)| *id).collect();
    // Read again if the sub-user's grants were restricted while the read was on its way: the
    // restriction reached only the trackers admitted then, and this read may predate it.
    let (facts, mut gone) = loop {
        let epoch = group.lock().grants_epoch;
        let facts = recheck(&pool, group.key.scope, candidates.clone()).await?;
        let mut g = group.lock();
        if g.grants_epoch == epoch {
            let gone = g.admit(group.id, &facts);
            break (facts, gone);
        }
    };
    let facts: Vec<(TrackerId, TrackerFacts)> = if gone.is_empty() {
        facts
    } else {
        facts
            .into_iter()
            .filter(|(id, _)| !gone.contains(id))
            .collect()
    };
    if facts.len() < ids.len() {
        let kept: HashSet<TrackerId> = facts.iter().map(|(id, _)| *id).collect();
        gone.extend(ids.iter().copied().filter(|id| !kept.contains(id)));
        unregister(&hub, &group, &gone);
    }
    for (id, f) in &facts {
        hub.observe(*id, *f);
    }
    if group.key.is_readings() {
        // Blocked trackers' readings too: they are held back until an unblock.
        let ids: Vec<TrackerId> = facts.iter().map(|(id, _)| *id).collect();
        for r in readings::readings_by_ids(&pool, &ids).await? {
            group.offer_reading(&Arc::new(r));
        }
        return Ok(());
    }
    // The states alone, with the source ids just read with the facts (looking each up in
    // `trackers` again was a quarter of the read); a compact group reads only the columns it
    // renders (its states are never rendered in another format). Those the group holds
    // unblocked now: an unblock that came during the read was applied at admission, and the
    // state the event processor re-sent after it did not reach the group, which did not hold
    // the tracker yet.
    let sources = group.lock().open_among(&facts);
    if sources.is_empty() {
        return Ok(());
    }
    let open: Vec<TrackerId> = sources.keys().copied().collect();
    let compact = group.key.variant.format == Format::Compact;
    for mut s in queries::states_by_ids_for(&pool, &open, compact).await? {
        if let Some(source) = sources.get(&s.tracker_id) {
            s.source_id = *source;
        }
        group.offer(&Arc::new(s), false);
    }
    Ok(())
}

/// Takes the group out of the hub's index for those of `ids` it does not hold (forgotten, or
/// never admitted), and drops the lifecycle changes it kept for them meanwhile.
fn unregister(hub: &Hub, group: &Arc<BatchGroup>, ids: &[TrackerId]) {
    let ids: Vec<TrackerId> = {
        let g = group.lock();
        ids.iter()
            .copied()
            .filter(|id| !g.trackers.contains_key(id))
            .collect()
    };
    hub.unsubscribe_group(group, &ids);
    let mut g = group.lock();
    for id in &ids {
        g.early.remove(id);
    }
}

/// The candidates' lifecycle facts read again (one query: a chunk's worth): those removed,
/// deleted, moved to another account or (for a sub-user) no longer granted since are left out,
/// the others take the newer facts.
pub async fn recheck(
    pool: &PgPool,
    scope: Scope,
    candidates: Vec<(TrackerId, TrackerFacts)>,
) -> Result<Vec<(TrackerId, TrackerFacts)>, sqlx::Error> {
    let ids: Vec<TrackerId> = candidates.iter().map(|(id, _)| *id).collect();
    let rows: HashMap<TrackerId, queries::TrackerLifecycleRow> =
        queries::visible_trackers_among(pool, scope.account_id, scope.sub_user, &ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
    Ok(candidates
        .into_iter()
        .filter_map(|(id, f)| {
            let r = rows.get(&id)?;
            if r.removed || r.account_id != f.account_id {
                return None;
            }
            if r.change_no <= f.change_no {
                return Some((id, f));
            }
            Some((id, TrackerFacts::from(r)))
        })
        .collect())
}

/// The group's timer: one batch per period until the last member leaves.
async fn run_group(hub: Arc<Hub>, group: Arc<BatchGroup>) {
    let mut interval = tokio::time::interval(group.key.rate);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await; // the first tick is immediate; the first batch was sent on join
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = group.emptied.notified() => {
                // (A member may have joined since: then the group goes on.)
                let mut g = group.lock();
                if g.members.is_empty() {
                    g.retired = true;
                    break;
                }
                continue;
            }
        }
        match group.tick() {
            None => break,
            Some(0) => {}
            Some(skipped) => {
                tracing::debug!(skipped, "batch period skipped for members still sending");
                hub.metrics.batches_skipped.inc_by(skipped as u64);
            }
        }
    }
    hub.batches
        .groups
        .remove_if(&group.key, |_, v| Arc::ptr_eq(v, &group));
    hub.unsubscribe_group(&group, &group.tracker_ids());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Format, Variant};

    fn variant() -> Variant {
        Variant {
            format: Format::Compact,
            tz: chrono_tz::UTC,
            iso: false,
        }
    }

    fn group(kind: GroupKind, trackers: impl IntoIterator<Item = TrackerId>) -> BatchGroup {
        let g = BatchGroup::new(GroupKey {
            scope: Scope {
                account_id: 1,
                sub_user: None,
            },
            target: Target::All,
            rate: DEFAULT_RATE,
            variant: variant(),
            kind,
        });
        g.lock().trackers = trackers.into_iter().map(|id| (id, 0)).collect();
        g
    }

    /// What an admission read says of tracker `id` of account 1 (its source id 1000 + `id`).
    fn read_facts(id: TrackerId, blocked: bool, change_no: i64) -> (TrackerId, TrackerFacts) {
        let facts = TrackerFacts {
            source_id: 1000 + id,
            account_id: 1,
            blocked,
            change_no,
        };
        (id, facts)
    }

    /// Lifecycle changes that reach a group between its registration in the hub and the end of
    /// the read that admits the trackers are applied at admission when newer than the read.
    #[test]
    fn a_lifecycle_change_during_the_admission_read_is_not_lost() {
        let g = group(GroupKind::State, []);
        let frame = ByteString::from_static("lifecycle");
        g.lifecycle(5, 20, Lifecycle::Block, &frame);
        g.lifecycle(6, 21, Lifecycle::Corrupt, &frame);
        g.lifecycle(7, 5, Lifecycle::Block, &frame); // older than the read: the read wins
        let facts = |id| read_facts(id, false, 10);
        let gone = g.lock().admit(0, &[facts(5), facts(6), facts(7)]);
        assert_eq!(gone, [6]);
        let st = g.lock();
        let mut trackers: Vec<TrackerId> = st.trackers.keys().copied().collect();
        trackers.sort_unstable();
        assert_eq!(trackers, [5, 7]);
        assert!(st.blocked.contains(&5) && !st.blocked.contains(&7));
        assert!(st.early.is_empty());
        drop(st);
        // 5 holds the early block's change (20), so an event between the read and it is old.
        g.lifecycle(5, 15, Lifecycle::Unblock, &frame);
        assert!(g.lock().blocked.contains(&5));
    }

    /// An unblock that comes while the admission read is on its way (which read the tracker
    /// blocked) is applied at admission, and the tracker's state is read with the others: the
    /// state the event processor re-sent after the unblock did not reach the group.
    #[test]
    fn a_tracker_unblocked_during_the_admission_read_has_its_state_read() {
        let g = group(GroupKind::State, []);
        let frame = ByteString::from_static("lifecycle");
        g.lifecycle(8, 30, Lifecycle::Unblock, &frame);
        g.lifecycle(9, 31, Lifecycle::Block, &frame);
        let facts = |id, blocked| read_facts(id, blocked, 10);
        let read = [
            facts(8, true),
            facts(9, false),
            facts(10, false),
            facts(11, true),
        ];
        let mut st = g.lock();
        assert!(st.admit(0, &read).is_empty());
        let open = st.open_among(&read);
        let mut ids: Vec<TrackerId> = open.keys().copied().collect();
        ids.sort_unstable();
        assert_eq!(ids, [8, 10], "8 unblocked meanwhile, 9 blocked, 11 blocked");
        assert_eq!(open[&8], 1008);
    }

    /// A lifecycle event no newer than the facts a tracker was admitted with is old news: a
    /// tracker moved into the group's account is admitted with the move's change number, and
    /// the move's `corrupt` (for the old account's viewers) must not make the group forget it.
    #[test]
    fn a_lifecycle_event_older_than_the_admission_is_ignored() {
        let g = group(GroupKind::State, []);
        let facts = TrackerFacts {
            source_id: 0,
            account_id: 3,
            blocked: false,
            change_no: 10,
        };
        assert!(g.lock().admit(0, &[(5, facts)]).is_empty());
        let frame = ByteString::from_static("lifecycle");
        assert!(g.lifecycle(5, 10, Lifecycle::Corrupt, &frame), "kept");
        assert!(g.lifecycle(5, 9, Lifecycle::Block, &frame));
        assert_eq!(g.tracker_ids(), [5]);
        assert!(!g.lock().blocked.contains(&5));
        // Newer ones apply.
        assert!(g.lifecycle(5, 11, Lifecycle::Block, &frame));
        assert!(g.lock().blocked.contains(&5));
        assert!(!g.lifecycle(5, 12, Lifecycle::Corrupt, &frame), "forgotten");
        assert!(g.tracker_ids().is_empty());
    }

    /// What a resync counts and follows with a state: whether the event went to the members,
    /// decided under the lock that applies it.
    #[test]
    fn apply_lifecycle_says_whether_the_members_were_told() {
        let g = group(GroupKind::State, []);
        assert!(g.lock().admit(0, &[read_facts(5, true, 10)]).is_empty());
        let frame = ByteString::from_static("lifecycle");
        let told = |keeps, sent| LifecycleApplied { keeps, sent };
        // Older than the admission, or what the group already holds: nothing is sent.
        assert_eq!(
            g.apply_lifecycle(5, 9, Lifecycle::Corrupt, &frame),
            told(true, false)
        );
        assert_eq!(
            g.apply_lifecycle(5, 11, Lifecycle::Block, &frame),
            told(true, false)
        );
        // Not admitted yet: kept for the admission, not sent.
        assert_eq!(
            g.apply_lifecycle(6, 11, Lifecycle::Unblock, &frame),
            told(true, false)
        );
        // News.
        assert_eq!(
            g.apply_lifecycle(5, 12, Lifecycle::Unblock, &frame),
            told(true, true)
        );
        assert!(!g.lock().blocked.contains(&5));
        assert_eq!(
            g.apply_lifecycle(5, 13, Lifecycle::Corrupt, &frame),
            told(false, true)
        );
        assert!(g.tracker_ids().is_empty());
    }

    /// A retired group admits nothing: a target that grew while its last member left would
    /// otherwise register trackers that nobody takes out of the hub.
    #[test]
    fn a_retired_group_admits_nothing() {
        let hub = Hub::new();
        let g = Arc::new(group(GroupKind::State, []));
        g.lock().retired = true;
        hub.subscribe_group(&g, &[5]);
        let facts = TrackerFacts {
            source_id: 0,
            account_id: 1,
            blocked: false,
            change_no: 1,
        };
        assert_eq!(g.lock().admit(0, &[(5, facts)]), [5]);
        unregister(&hub, &g, &[5]);
        assert!(g.tracker_ids().is_empty());
        assert!(!hub.is_watched(5));
    }

    /// A tracker the group lets go of (a grant revoked, a read that failed or found it gone)
    /// leaves neither a hub registration nor a kept lifecycle change behind.
    #[test]
    fn a_tracker_let_go_leaves_nothing_behind() {
        let hub = Hub::new();
        let g = Arc::new(group(GroupKind::State, [5, 7]));
        hub.subscribe_group(&g, &[5, 6, 7]);
        g.lock().forget(&5);
        let frame = ByteString::from_static("lifecycle");
        g.lifecycle(5, 9, Lifecycle::Block, &frame); // in the instant before it is unregistered
        g.lifecycle(6, 9, Lifecycle::Block, &frame); // never admitted
        unregister(&hub, &g, &[5, 6, 7]);
        assert!(g.lock().early.is_empty());
        assert!(!hub.is_watched(5) && !hub.is_watched(6));
        assert!(hub.is_watched(7), "a tracker it holds stays registered");
    }

    /// The statuses' map is rendered once and shared until a status changes; a large response
    /// holding it is shared while its bytes are the same, and dropped with the map.
    #[test]
    fn the_status_map_and_the_shared_response_last_until_a_status_changes() {
        let g = group(GroupKind::State, [3, 1, 2]);
        let first = g.status_map();
        assert_eq!(
            first.as_str(),
            r#"{"1":"normal","2":"normal","3":"normal"}"#
        );
        let frame = ByteString::from_static("lifecycle");
        g.lifecycle(2, 7, Lifecycle::Unblock, &frame); // not news: nothing changes
        assert!(g.lock().status_map.is_some());

        let a = g.shared_response(format!("response {}", first.as_str()));
        let b = g.shared_response(format!("response {}", first.as_str()));
        assert_eq!(a.text(), b.text());
        assert!(
            std::ptr::eq(a.text(), b.text()),
            "the same bytes share one frame"
        );
        let other = g.shared_response("another response".to_owned());
        assert_eq!(other.text(), "another response");

        g.lifecycle(2, 8, Lifecycle::Block, &frame);
        assert!(g.lock().response.is_none(), "dropped with the map");
        assert_eq!(
            g.status_map().as_str(),
            r#"{"1":"normal","2":"blocked","3":"normal"}"#
        );
        g.lifecycle(3, 9, Lifecycle::Corrupt, &frame);
        assert_eq!(g.status_map().as_str(), r#"{"1":"normal","2":"blocked"}"#);
        let facts = TrackerFacts {
            source_id: 0,
            account_id: 1,
            blocked: false,
            change_no: 10,
        };
        g.lock().admit(0, &[(4, facts)]);
        assert_eq!(
            g.status_map().as_str(),
            r#"{"1":"normal","2":"blocked","4":"normal"}"#
        );
    }

    /// Members are told what an admission changes in the statuses they hold: a tracker that
    /// joins blocked, or a held one whose status the read changed; not one that joins open.
    #[tokio::test]
    async fn an_admission_tells_the_members_what_it_changes() {
        let g = group(GroupKind::State, []);
        g.lock().admit(g.id, &[read_facts(1, false, 5)]);
        offer(&g, 1, 5);
        filled(&g);
        let (outbox, _) = join(&g, 1, 16);
        let first = g.lock().admit(
            g.id,
            &[
                read_facts(2, false, 6), // joins open: appears in the next batch
                read_facts(3, true, 7),  // joins blocked
                read_facts(1, true, 4),  // older than what the group holds: nothing
            ],
        );
        assert!(first.is_empty());
        g.lock()
            .admit(g.id, &[read_facts(1, true, 8), read_facts(3, true, 9)]);
        assert!(!g.lock().dirty.contains(&1));
        // Reopened by a read: its state goes out in the next batch.
        g.lock().admit(g.id, &[read_facts(1, false, 10)]);
        assert!(g.lock().dirty.contains(&1));
        g.lock().admit(g.id, &[read_facts(1, true, 11)]);
        let mut told = Vec::new();
        while !outbox.is_empty() {
            let mut items = Vec::new();
            outbox.pop_batch(64, &mut items).await;
            for item in items {
                if let Outgoing::GroupLifecycle {
                    group,
                    tracker,
                    change,
                    frame,
                    announced,
                } = item
                {
                    assert_eq!(group, g.id);
                    assert!(announced, "an admission's own");
                    let v: serde_json::Value = serde_json::from_str(&frame).unwrap_or_default();
                    assert_eq!(v["data"]["source_id"], 1000 + tracker, "{v}");
                    let kind = v["data"]["lifecycle_event"].as_str().map(str::to_owned);
                    told.push((tracker, change, kind.unwrap_or_default()));
                }
            }
        }
        assert_eq!(
            told,
            [
                (3, 7, "block".into()),
                (1, 8, "block".into()),
                (1, 10, "unblock".into()),
                (1, 11, "block".into())
            ]
        );
        assert_eq!(
            g.status_map().as_str(),
            r#"{"1":"blocked","2":"normal","3":"blocked"}"#
        );
    }

    /// A member joining after the period's full batch was rendered starts at the latest states:
    /// the shared full batch, then one of what changed since; once that is a quarter of the
    /// target, a new full batch (and the group stops keeping track until then).
    #[test]
    fn a_member_joining_later_in_the_period_gets_what_changed_since_the_full_batch() {
        let g = state_group(16);
        let frames = |g: &BatchGroup| -> Vec<SharedFrame> {
            let first = g.first_batch(&mut g.lock());
            first.frames(g)
        };
        let ids =
            |f: &SharedFrame| -> Vec<i64> { items_of(f.text()).iter().map(|i| i.0).collect() };
        let a = frames(&g);
        assert_eq!(a.len(), 1);
        assert_eq!(ids(&a[0]), (1..=16).collect::<Vec<_>>());
        offer(&g, 2, 5);
        let b = frames(&g);
        assert_eq!(b.len(), 2);
        assert!(
            b[0].text().as_ptr() == a[0].text().as_ptr(),
            "the shared full batch"
        );
        assert_eq!(ids(&b[1]), [2]);
        offer(&g, 3, 5);
        assert_eq!(ids(&frames(&g)[1]), [2, 3]);
        // A quarter of the target: the shared batch goes, and so does the record of changes.
        offer(&g, 4, 5);
        offer(&g, 5, 5);
        assert!(g.lock().full.is_none() && g.lock().since_full.is_empty());
        let c = frames(&g);
        assert_eq!(c.len(), 1);
        assert!(
            c[0].text().as_ptr() != a[0].text().as_ptr(),
            "rendered again"
        );
        let d = frames(&g);
        assert!(
            d.len() == 1 && d[0].text().as_ptr() == c[0].text().as_ptr(),
            "shared"
        );
        // A blocked tracker's change is not in a joiner's batch.
        offer(&g, 6, 5);
        let frame = ByteString::from_static("lifecycle");
        g.lifecycle(6, 9, Lifecycle::Block, &frame);
        assert_eq!(frames(&g).len(), 1, "a block drops the shared batch");
        offer(&g, 7, 5);
        g.lock().since_full.insert(6);
        assert_eq!(ids(&frames(&g)[1]), [7]);
        // A tick starts the period afresh.
        let _member = join(&g, 1, 16);
        offer(&g, 8, 5);
        g.tick();
        assert_eq!(frames(&g).len(), 1);
    }

    /// Two groups of one socket, admitted from reads on either side of a block: the one that
    /// read it announces `block`, the other still batches the state before it, and then takes
    /// the processor's `block`. The announcement is marked as such, so the socket (which sends a
    /// processor's event of a change once) still sends that last `block`.
    #[tokio::test]
    async fn an_announced_block_does_not_hide_the_processors_from_another_group() {
        let (g1, g2) = (group(GroupKind::State, []), group(GroupKind::State, []));
        let outbox = Outbox::new(64);
        for g in [&g1, &g2] {
            g.lock().add_member(1, &outbox, 64);
        }
        g1.lock().admit(g1.id, &[read_facts(9, false, 5)]);
        offer(&g1, 9, 4);
        g2.lock().admit(g2.id, &[read_facts(9, true, 6)]);
        g1.tick();
        let frame = ByteString::from(model::lifecycle_event(9, 0, Lifecycle::Block));
        g1.lifecycle(9, 6, Lifecycle::Block, &frame);
        g2.lifecycle(9, 6, Lifecycle::Block, &frame);
        let mut seen = Vec::new();
        while !outbox.is_empty() {
            let mut items = Vec::new();
            outbox.pop_batch(64, &mut items).await;
            for item in items {
                seen.push(match item {
                    Outgoing::GroupLifecycle {
                        group, announced, ..
                    } => format!("block from {} announced {announced}", group == g1.id),
                    Outgoing::Frame { group, .. } => format!("batch from {}", group == g1.id),
                    _ => "other".into(),
                });
            }
        }
        assert_eq!(
            seen,
            [
                "block from false announced true",
                "batch from true",
                "block from true announced false"
            ]
        );
    }

    // A randomized model of a state group and its members' views (from a review): offers,
    // blocks and unblocks, admissions that read a change before the processor publishes it,
    // joins, ticks with all of these inside the unlocked render, members that fall behind.

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[derive(Default, Clone)]
    struct View {
        blocked: HashSet<TrackerId>,
        state: HashMap<TrackerId, i64>,
        lifecycle_sent: HashMap<TrackerId, i64>,
    }

    struct Db {
        c: i64,
        state: HashMap<TrackerId, i64>,
        blocked: HashMap<TrackerId, bool>,
        lc: HashMap<TrackerId, i64>,
    }

    fn st(id: TrackerId, change: i64) -> Arc<TrackerState> {
        let mut s = model::test_state(id, change);
        s.speed = change as i32;
        Arc::new(s)
    }

    fn batch_items(frame: &str) -> Vec<(i64, i64)> {
        let v: serde_json::Value = serde_json::from_str(frame).unwrap();
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                (
                    i["tracker_id"].as_i64().unwrap(),
                    i["state"]["gps"]["speed"].as_i64().unwrap(),
                )
            })
            .collect()
    }

    fn apply_frame(view: &mut View, frame: &str, what: &str, errs: &mut Vec<String>) {
        for (id, ch) in batch_items(frame) {
            if view.blocked.contains(&id) {
                errs.push(format!("{what}: item of blocked {id} (change {ch})"));
            }
            if let Some(&old) = view.state.get(&id) {
                if ch < old && what != "first" {
                    errs.push(format!("{what}: {id} went back from {old} to {ch}"));
                }
            }
            view.state.insert(id, ch);
        }
    }

    async fn drain(members: &mut [(Arc<Outbox>, View)], errs: &mut Vec<String>) {
        drain_some(members, errs, &mut Rng(1), false).await
    }

    async fn drain_some(
        members: &mut [(Arc<Outbox>, View)],
        errs: &mut Vec<String>,
        rng: &mut Rng,
        some: bool,
    ) {
        for (outbox, view) in members.iter_mut() {
            if some && rng.below(3) == 0 {
                continue;
            }
            let mut items = Vec::new();
            while !outbox.is_empty() {
                outbox.pop_batch(64, &mut items).await;
            }
            for item in items {
                match item {
                    Outgoing::Frame { frame, .. } => apply_frame(view, frame.text(), "batch", errs),
                    Outgoing::GroupLifecycle {
                        tracker,
                        change,
                        frame,
                        announced,
                        ..
                    } => {
                        // As the socket does (see `Connection::deliver`).
                        if !announced {
                            let sent = view.lifecycle_sent.entry(tracker).or_insert(0);
                            if change <= *sent {
                                continue;
                            }
                            *sent = change;
                        }
                        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
                        let kind = v["data"]["lifecycle_event"].as_str().unwrap_or_default();
                        let news = match kind {
                            "block" => view.blocked.insert(tracker),
                            "unblock" => view.blocked.remove(&tracker),
                            _ => true,
                        };
                        if !news {
                            errs.push(format!("{kind} of {tracker} at {change}: no news"));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn do_join(g: &BatchGroup, conn: ConnId, errs: &mut Vec<String>) -> (Arc<Outbox>, View) {
        let outbox = Outbox::new(1 << 20);
        let mut st_ = g.lock();
        st_.add_member(conn, &outbox, 1 << 20);
        let first = g.first_batch(&mut st_);
        let statuses = BatchGroup::status_map_of(&mut st_);
        let expect: Vec<(TrackerId, i64)> = st_
            .latest
            .iter()
            .filter(|(id, _)| !st_.blocked.contains(id))
            .map(|(id, s)| (*id, s.change_no))
            .collect();
        drop(st_);
        let first = first.frames(g);
        let mut view = View::default();
        let m: serde_json::Value = serde_json::from_str(statuses.as_str()).unwrap();
        for (k, v) in m.as_object().unwrap() {
            if v == "blocked" {
                view.blocked.insert(k.parse().unwrap());
            }
        }
        for f in &first {
            apply_frame(&mut view, f.text(), "first", errs);
        }
        for (id, c) in expect {
            if view.state.get(&id) != Some(&c) {
                errs.push(format!(
                    "joined at {:?} for {id}, latest {c}",
                    view.state.get(&id)
                ));
            }
        }
        (outbox, view)
    }

    /// Blocks or unblocks `id` in `db` at a new change number; the event's kind.
    fn toggle(db: &mut Db, id: TrackerId) -> Lifecycle {
        let was_blocked = db.blocked[&id];
        db.c += 1;
        db.blocked.insert(id, !was_blocked);
        db.lc.insert(id, db.c);
        if was_blocked {
            Lifecycle::Unblock
        } else {
            Lifecycle::Block
        }
    }

    /// One processor-like step on `db` and the group (no join, no tick).
    fn step(
        g: &BatchGroup,
        db: &mut Db,
        rng: &mut Rng,
        pending: &mut Vec<(TrackerId, i64, Lifecycle)>,
        n: TrackerId,
    ) {
        let id = 1 + rng.below(n as u64) as TrackerId;
        let flush = |g: &BatchGroup, db: &Db, pending: &mut Vec<(TrackerId, i64, Lifecycle)>| {
            for (id, c, kind) in pending.drain(..) {
                g.lifecycle(
                    id,
                    c,
                    kind,
                    &ByteString::from(model::lifecycle_event(id, 0, kind)),
                );
                if kind == Lifecycle::Unblock {
                    if let Some(&s) = db.state.get(&id) {
                        g.offer(&st(id, s), true);
                    }
                }
            }
        };
        match rng.below(4) {
            0 => {
                flush(g, db, pending);
                db.c += 1;
                db.state.insert(id, db.c);
                g.offer(&st(id, db.c), false);
            }
            1 | 2 => {
                flush(g, db, pending);
                let kind = toggle(db, id);
                pending.push((id, db.c, kind));
                flush(g, db, pending);
            }
            _ => {
                // A lifecycle change an admission reads before the processor publishes it.
                flush(g, db, pending);
                let kind = toggle(db, id);
                let facts = TrackerFacts {
                    source_id: 0,
                    account_id: 1,
                    blocked: kind == Lifecycle::Block,
                    change_no: db.c,
                };
                g.lock().admit(g.id, &[(id, facts)]);
                let open = g.lock().open_among(&[(id, facts)]);
                if open.contains_key(&id) {
                    if let Some(&s) = db.state.get(&id) {
                        g.offer(&st(id, s), false);
                    }
                }
                pending.push((id, db.c, kind));
            }
        }
    }

    async fn fuzz_once(seed: u64) -> Vec<String> {
        let n: TrackerId = 16;
        let mut rng = Rng(seed * 2654435761 + 1);
        let g = group(GroupKind::State, []);
        let mut db = Db {
            c: 0,
            state: HashMap::new(),
            blocked: HashMap::new(),
            lc: HashMap::new(),
        };
        let mut facts = Vec::new();
        for id in 1..=n {
            db.c += 1;
            let b = rng.below(4) == 0;
            db.blocked.insert(id, b);
            db.lc.insert(id, db.c);
            db.state.insert(id, db.c);
            facts.push((
                id,
                TrackerFacts {
                    source_id: 0,
                    account_id: 1,
                    blocked: b,
                    change_no: db.c,
                },
            ));
        }
        g.lock().admit(g.id, &facts);
        for id in 1..=n {
            if !db.blocked[&id] {
                g.offer(&st(id, db.state[&id]), false);
            }
        }
        filled(&g);
        let mut errs = Vec::new();
        let mut members: Vec<(Arc<Outbox>, View)> = Vec::new();
        let mut pending = Vec::new();
        let mut conn = 0;
        for _ in 0..120 {
            match rng.below(6) {
                0 => {
                    conn += 1;
                    let m = do_join(&g, conn, &mut errs);
                    members.push(m);
                }
                1 => {
                    let k = rng.below(3);
                    let mut joined = Vec::new();
                    {
                        let gr = &g;
                        let db_ = &mut db;
                        let rng_ = &mut rng;
                        let p = &mut pending;
                        let j = &mut joined;
                        let e = &mut errs;
                        let c = &mut conn;
                        g.tick_with(move || {
                            for _ in 0..k {
                                if rng_.below(4) == 0 {
                                    *c += 1;
                                    j.push(do_join(gr, *c, e));
                                } else {
                                    step(gr, db_, rng_, p, n);
                                }
                            }
                        });
                    }
                    members.extend(joined);
                }
                _ => step(&g, &mut db, &mut rng, &mut pending, n),
            }
            drain_some(&mut members, &mut errs, &mut rng, true).await;
        }
        drain(&mut members, &mut errs).await;
        // Settle: the processor's events, then two periods.
        {
            let frame_of = |id, kind| ByteString::from(model::lifecycle_event(id, 0, kind));
            for (id, c, kind) in pending.drain(..) {
                g.lifecycle(id, c, kind, &frame_of(id, kind));
                if kind == Lifecycle::Unblock {
                    if let Some(&s) = db.state.get(&id) {
                        g.offer(&st(id, s), true);
                    }
                }
            }
        }
        g.tick();
        drain(&mut members, &mut errs).await;
        g.tick();
        drain(&mut members, &mut errs).await;
        for (i, (_, view)) in members.iter().enumerate() {
            for id in 1..=n {
                let b = db.blocked[&id];
                if view.blocked.contains(&id) != b {
                    errs.push(format!(
                        "member {i}: {id} blocked={} in view, {b} in db",
                        !b
                    ));
                }
                if !b && view.state.get(&id) != db.state.get(&id) {
                    errs.push(format!(
                        "member {i}: {id} ends at {:?}, db has {:?}",
                        view.state.get(&id),
                        db.state.get(&id)
                    ));
                }
            }
        }
        errs
    }

    #[tokio::test]
    async fn every_members_view_ends_at_the_database_under_random_interleavings() {
        let mut failed = 0;
        for seed in 1..=300u64 {
            let errs = fuzz_once(seed).await;
            if !errs.is_empty() {
                failed += 1;
                if failed <= 8 {
                    eprintln!("seed {seed}: {errs:?}");
                }
            }
        }
        assert_eq!(failed, 0);
    }

    /// A state group of trackers 1..=n, each at change 1, filled.
    fn state_group(n: TrackerId) -> BatchGroup {
        let g = group(GroupKind::State, 1..=n);
        for id in 1..=n {
            offer(&g, id, 1);
        }
        filled(&g);
        g
    }

    /// What [`Batches::fill`] does once the group holds its first states.
    fn filled(g: &BatchGroup) {
        let mut st = g.lock();
        st.dirty.clear();
        st.readings_dirty.clear();
    }

    /// A member with an outbox of `capacity`; returns its outbox and its first (full) batch.
    fn join(g: &BatchGroup, conn: ConnId, capacity: usize) -> (Arc<Outbox>, Option<SharedFrame>) {
        let outbox = Outbox::new(capacity);
        let mut st = g.lock();
        st.add_member(conn, &outbox, capacity);
        let first = g.shared_full(&mut st);
        (outbox, first)
    }

    fn offer(g: &BatchGroup, id: TrackerId, change: i64) {
        let mut s = model::test_state(id, change);
        s.change_no = change;
        g.offer(&Arc::new(s), false);
    }

    /// The batch frames queued in `outbox`, each as its items' (tracker id, key) pairs.
    async fn batches(outbox: &Outbox) -> Vec<Vec<(i64, String)>> {
        let mut items = Vec::new();
        while !outbox.is_empty() {
            outbox.pop_batch(64, &mut items).await;
        }
        items
            .iter()
            .filter_map(|i| match i {
                Outgoing::Frame { frame: f, .. } => Some(items_of(f.text())),
                _ => None,
            })
            .filter(|batch| !batch.is_empty()) // the stand-in frames of `stall`
            .collect()
    }

    fn items_of(frame: &str) -> Vec<(i64, String)> {
        let v: serde_json::Value = serde_json::from_str(frame).unwrap_or_default();
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| {
                let key = item["inputs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| i["name"].as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                (item["tracker_id"].as_i64().unwrap_or(-1), key)
            })
            .collect()
    }

    fn ids(batch: &[(i64, String)]) -> Vec<i64> {
        batch.iter().map(|(id, _)| *id).collect()
    }

    /// Holds a member's queue up, as a dashboard that stopped reading does.
    fn stall(outbox: &Outbox) {
        outbox.push(Outgoing::Frame {
            group: 0,
            frame: ByteString::from("{}").into(),
        });
    }

    async fn unstall(outbox: &Outbox) {
        let mut out = Vec::new();
        while !outbox.is_empty() {
            outbox.pop_batch(64, &mut out).await;
        }
    }

    #[test]
    fn an_offer_is_kept_only_for_a_target_tracker_not_blocked_and_newer() {
        let g = group(GroupKind::State, [1, 2, 3]);
        g.lock().blocked.insert(3);
        let change_of = |id| g.lock().latest.get(&id).map(|s| s.change_no);
        let dirty = |g: &BatchGroup| {
            let mut d: Vec<TrackerId> = g.lock().dirty.iter().copied().collect();
            d.sort_unstable();
            d
        };
        offer(&g, 1, 5); // first state of a target tracker
        offer(&g, 3, 5); // blocked
        offer(&g, 9, 5); // not in the target
        assert_eq!(
            (change_of(1), change_of(3), change_of(9)),
            (Some(5), None, None)
        );
        assert_eq!(dirty(&g), [1]);

        filled(&g);
        offer(&g, 1, 4); // older than the one held
        offer(&g, 1, 5); // the same again
        assert_eq!((change_of(1), dirty(&g)), (Some(5), vec![]));
        offer(&g, 1, 6);
        assert_eq!((change_of(1), dirty(&g)), (Some(6), vec![1]));

        // After an unblock the current state is re-sent with the same change number.
        filled(&g);
        let mut s = model::test_state(1, 6);
        s.change_no = 6;
        g.offer(&Arc::new(s), true);
        assert_eq!((change_of(1), dirty(&g)), (Some(6), vec![1]));

        // A tracker let go keeps nothing, and a later offer for it is ignored.
        g.lock().forget(&1);
        offer(&g, 1, 7);
        assert_eq!((change_of(1), dirty(&g)), (None, vec![]));
    }

    #[tokio::test]
    async fn a_member_behind_gets_only_what_changed_since_its_last_batch() {
        let g = state_group(6);
        let (steady, first) = join(&g, 1, 8);
        assert_eq!(
            ids(&items_of(first.as_ref().map_or("", |f| f.text()))),
            [1, 2, 3, 4, 5, 6]
        );
        let (slow, _) = join(&g, 2, 8);
        let (slowest, _) = join(&g, 3, 8);
        let mut got: [Vec<Vec<i64>>; 3] = Default::default();
        // Each tick changes one tracker; `reading` says which members read what they were sent.
        let steps: [(TrackerId, [bool; 3]); 5] = [
            (1, [true, false, false]),
            (2, [true, false, false]),
            (3, [true, true, false]),
            (4, [true, true, true]),
            (5, [true, true, true]),
        ];
        stall(&slow);
        stall(&slowest);
        let mut skipped = Vec::new();
        for (change, (id, reading)) in (2..).zip(steps) {
            offer(&g, id, change);
            skipped.extend(g.tick());
            for (i, outbox) in [&steady, &slow, &slowest].into_iter().enumerate() {
                if reading[i] {
                    got[i].extend(batches(outbox).await.iter().map(|b| ids(b)));
                }
            }
        }
        assert_eq!(got[0], [vec![1], vec![2], vec![3], vec![4], vec![5]]);
        // Stalled for two ticks and drained after the third: one batch of the four changes at the
        // fourth, never the unchanged trackers, then deltas again.
        assert_eq!(got[1], [vec![1, 2, 3, 4], vec![5]]);
        assert_eq!(got[2], [vec![1, 2, 3, 4, 5]]);
        assert_eq!(skipped, [2, 2, 2, 1, 0], "members skipped at each tick");
    }

    /// The delta is rendered with the lock released: a block meanwhile takes the tracker out
    /// of it (the members got the block event first), and a member joining meanwhile gets
    /// its full batch and not this delta too (which could hold an older state than it).
    #[tokio::test]
    async fn a_block_or_a_join_while_the_delta_is_rendered() {
        let g = state_group(3);
        let (a, _) = join(&g, 1, 8);
        offer(&g, 1, 2);
        offer(&g, 2, 2);
        let frame = ByteString::from_static("lifecycle");
        let mut late = None;
        assert_eq!(
            g.tick_with(|| {
                g.lifecycle(2, 3, Lifecycle::Block, &frame);
                offer(&g, 1, 4);
                late = Some(join(&g, 2, 8));
            }),
            Some(0)
        );
        let got: Vec<Vec<i64>> = batches(&a).await.iter().map(|b| ids(b)).collect();
        assert_eq!(got, [vec![1]], "blocked 2 left out");
        let (late, first) = late.expect("joined");
        assert_eq!(
            ids(&items_of(first.as_ref().map_or("", |f| f.text()))),
            [1, 3]
        );
        assert!(batches(&late).await.is_empty(), "no delta on top of it");
        // The state that came meanwhile goes out in the next period, to both.
        assert_eq!(g.tick(), Some(0));
        for outbox in [&a, &late] {
            let got: Vec<Vec<i64>> = batches(outbox).await.iter().map(|b| ids(b)).collect();
            assert_eq!(got, [vec![1]]);
        }
    }

    #[tokio::test]
    async fn members_behind_since_the_same_tick_share_one_catch_up() {
        let g = state_group(3);
        let (a, _) = join(&g, 1, 8);
        let (b, _) = join(&g, 2, 8);
        stall(&a);
        stall(&b);
        offer(&g, 1, 2);
        assert!(g.tick().is_some());
        unstall(&a).await;
        unstall(&b).await;
        offer(&g, 2, 3);
        assert!(g.tick().is_some());
        let frame = |o: &Outbox| {
            let mut out = Vec::new();
            futures_util::FutureExt::now_or_never(o.pop_batch(8, &mut out));
            match out.pop() {
                Some(Outgoing::Frame { frame: f, .. }) => Some(f.text().clone()),
                _ => None,
            }
        };
        let (fa, fb) = (frame(&a), frame(&b));
        assert!(fa.is_some());
        assert_eq!(
            fa.as_ref().map(|f| f.as_ptr()),
            fb.as_ref().map(|f| f.as_ptr())
        );
        assert_eq!(ids(&items_of(&fa.unwrap_or_default())), [1, 2]);
    }

    #[tokio::test]
    async fn a_catch_up_of_every_tracker_is_the_full_batch_and_skips_blocked_ones() {
        let g = state_group(3);
        let (a, _) = join(&g, 1, 8);
        stall(&a);
        for id in 1..=3 {
            offer(&g, id, 2);
        }
        assert!(g.tick().is_some());
        g.lifecycle(2, 3, Lifecycle::Block, &ByteString::from("{}"));
        unstall(&a).await;
        assert!(g.tick().is_some());
        assert_eq!(
            batches(&a).await.iter().map(|b| ids(b)).collect::<Vec<_>>(),
            [vec![1, 3]]
        );
    }

    #[tokio::test]
    async fn a_readings_member_behind_gets_only_the_keys_changed_since_its_last_batch() {
        let g = group(
            GroupKind::Readings(ReadingsFilter {
                sensor_type: None,
                include_components: true,
            }),
            [1, 2],
        );
        let reading = |tracker: TrackerId, sensor: i64, change: i64| {
            let mut r = readings::test_reading(tracker, change);
            r.sensor_id = Some(sensor);
            r.name = format!("s{sensor}");
            g.offer_reading(&Arc::new(r));
        };
        for t in [1, 2] {
            for sensor in [10, 11, 12] {
                reading(t, sensor, 1);
            }
        }
        filled(&g);
        let (steady, first) = join(&g, 1, 8);
        assert_eq!(
            items_of(first.as_ref().map_or("", |f| f.text())),
            [
                (1, "s10,s11,s12".to_string()),
                (2, "s10,s11,s12".to_string())
            ]
        );
        let (slow, _) = join(&g, 2, 8);
        stall(&slow);
        let mut steady_got = Vec::new();
        reading(1, 10, 2);
        assert!(g.tick().is_some());
        steady_got.extend(batches(&steady).await);
        reading(1, 11, 3);
        reading(2, 12, 3);
        assert!(g.tick().is_some());
        steady_got.extend(batches(&steady).await);
        unstall(&slow).await;
        reading(2, 10, 4);
        assert!(g.tick().is_some());
        steady_got.extend(batches(&steady).await);
        let s = |v: &str| v.to_string();
        assert_eq!(
            steady_got,
            [
                vec![(1, s("s10"))],
                vec![(1, s("s11")), (2, s("s12"))],
                vec![(2, s("s10"))],
            ]
        );
        assert_eq!(
            batches(&slow).await,
            [vec![(1, s("s10,s11")), (2, s("s10,s12"))]]
        );
    }
}
