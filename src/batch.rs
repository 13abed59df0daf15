//! `state_batch` and `readings_batch` subscriptions. Owns the batch groups: one per (session
//! scope, target, rate limit, variant, kind), shared by every socket that asks for the same
//! thing, so that a thousand dashboards watching the same account at the same rate cost one
//! batch build per period.
//!
//! A group is a subscriber in the [`Hub`] index like a socket is: the hub hands it every state
//! and lifecycle event of its target's trackers. The group keeps the newest state per tracker and
//! the set changed since the last period; a timer task per group renders one frame per period
//! (nothing when nothing changed) and queues the same bytes to every member. A member whose queue
//! is full is skipped and later gets one catch-up batch with the latest state of every tracker,
//! so slow dashboards cost bounded memory and still end with the latest state.
//!
//! A readings group ([`GroupKind::Readings`]) works the same way, keyed one level deeper: it
//! keeps the newest reading per (tracker, key) by change number, offered by the LISTEN processor
//! through [`Hub::offer_readings`], and each batch carries only the keys changed in the period.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytestring::ByteString;
use chrono::Utc;
use dashmap::DashMap;
use sqlx::PgPool;
use tokio::sync::OnceCell;

use crate::db::queries;
use crate::hub::{ConnId, Hub, Outbox, Outgoing, TrackerFacts};
use crate::model::{self, Lifecycle, TrackerId, TrackerState, Variant};
use crate::readings::{self, ReadingKey, ReadingRow, ReadingsFilter};

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
    lagging: bool,
}

#[derive(Default)]
struct GroupState {
    members: Vec<Member>,
    /// Trackers of the target (blocked ones included: they still get lifecycle events).
    trackers: HashSet<TrackerId>,
    blocked: HashSet<TrackerId>,
    latest: HashMap<TrackerId, Arc<TrackerState>>,
    dirty: HashSet<TrackerId>,
    /// Readings groups: the newest reading per tracker and key (blocked trackers' included, so
    /// an unblock can send them), and the keys changed since the last period.
    readings: HashMap<TrackerId, HashMap<ReadingKey, Arc<ReadingRow>>>,
    readings_dirty: HashMap<TrackerId, HashSet<ReadingKey>>,
    /// The full batch rendered in the current period, shared by every member that joins or
    /// catches up before the next tick (see [`BatchGroup::shared_full`]).
    full: Option<Option<ByteString>>,
    retired: bool,
}

impl GroupState {
    fn forget(&mut self, id: &TrackerId) {
        self.full = None;
        self.trackers.remove(id);
        self.blocked.remove(id);
        self.latest.remove(id);
        self.dirty.remove(id);
        self.readings.remove(id);
        self.readings_dirty.remove(id);
    }
}

pub struct BatchGroup {
    pub key: GroupKey,
    state: Mutex<GroupState>,
    filled: OnceCell<()>,
}

impl BatchGroup {
    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // Every mutation is a short sequence of map operations; a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A state from the hub: kept if newer (or re-sent after an unblock), marked changed.
    pub fn offer(&self, state: &Arc<TrackerState>, resend: bool) {
        let mut g = self.lock();
        if !g.trackers.contains(&state.tracker_id) || g.blocked.contains(&state.tracker_id) {
            return;
        }
        let newer = match g.latest.get(&state.tracker_id) {
            Some(old) => state.change_no > old.change_no || resend,
            None => true,
        };
        if newer {
            g.latest.insert(state.tracker_id, state.clone());
            g.dirty.insert(state.tracker_id);
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
        if !g.trackers.contains(&r.tracker_id) {
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
            g.readings_dirty
                .entry(r.tracker_id)
                .or_default()
                .insert(key);
        }
    }

    /// A lifecycle event from the hub: forwarded to every member at once (never batched).
    pub fn lifecycle(&self, id: TrackerId, change: i64, kind: Lifecycle, frame: &ByteString) {
        let mut g = self.lock();
        if !g.trackers.contains(&id) {
            return;
        }
        // A member joining later must not get a full batch that predates this event.
        g.full = None;
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
                tracker: id,
                change,
                frame: frame.clone(),
            });
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
        let now = Utc::now();
        let mut out = String::new();
        let mut n = 0usize;
        for id in ids {
            if g.blocked.contains(&id) {
                continue;
            }
            let Some(s) = g.latest.get(&id) else {
                continue;
            };
            out.push(if n == 0 { '[' } else { ',' });
            out.push_str(&model::batch_item(s, self.key.variant));
            n += 1;
        }
        if n == 0 {
            return None;
        }
        out.push(']');
        Some(ByteString::from(model::batch_event(
            "state_batch",
            &out,
            self.key.variant,
            now,
        )))
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
    /// changes after it was rendered is marked dirty and so goes out in the next delta; a
    /// lifecycle change or a change of target drops it. Rendering it once per join cost a
    /// hundred renders of 100,000 trackers (and gigabytes of frames) when a hundred dashboards
    /// joined at once in the benchmark.
    fn shared_full(&self, g: &mut GroupState) -> Option<ByteString> {
        if let Some(f) = &g.full {
            return f.clone();
        }
        let f = self.full_frame(g);
        g.full = Some(f.clone());
        f
    }

    /// One period: the changed trackers to every member that keeps up, a full catch-up batch to
    /// members that lagged and have drained. Returns false once the group has no members.
    /// A member lags when its queue is full or when the batch of an earlier period is still
    /// waiting in it: batches can weigh megabytes, so counting queued items alone let a slow
    /// dashboard hold hundreds of them (gigabytes, in the benchmark).
    fn tick(&self) -> bool {
        let mut g = self.lock();
        if g.members.is_empty() {
            g.retired = true;
            return false;
        }
        let delta = if self.key.is_readings() {
            let dirty = std::mem::take(&mut g.readings_dirty);
            self.render_readings(&g, dirty.keys().copied().collect(), Some(&dirty))
        } else {
            let mut changed: Vec<TrackerId> = g.dirty.drain().collect();
            changed.sort_unstable();
            self.render(&g, &mut changed.into_iter())
        };
        // A new period starts: the dirty set was just drained into the delta.
        g.full = None;
        let mut members = std::mem::take(&mut g.members);
        for m in &mut members {
            if m.outbox.len() >= m.capacity || m.outbox.frames() > 0 {
                m.lagging = true;
                continue;
            }
            if m.lagging {
                if let Some(f) = self.shared_full(&mut g) {
                    m.outbox.push(Outgoing::Frame(f));
                }
                m.lagging = false;
            } else if let Some(f) = &delta {
                m.outbox.push(Outgoing::Frame(f.clone()));
            }
        }
        g.members = members;
        true
    }

    /// Statuses of the target's trackers, for the subscribe response.
    pub fn statuses(&self) -> Vec<(TrackerId, &'static str)> {
        let g = self.lock();
        let mut ids: Vec<TrackerId> = g.trackers.iter().copied().collect();
        ids.sort_unstable();
        ids.into_iter()
            .map(|id| {
                (
                    id,
                    if g.blocked.contains(&id) {
                        "blocked"
                    } else {
                        "normal"
                    },
                )
            })
            .collect()
    }

    pub fn tracker_ids(&self) -> Vec<TrackerId> {
        self.lock().trackers.iter().copied().collect()
    }

    pub fn member_count(&self) -> usize {
        self.lock().members.len()
    }
}

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
    pub statuses: Vec<(TrackerId, &'static str)>,
    pub first_batch: Option<ByteString>,
}

impl Batches {
    pub fn group_count(&self) -> usize {
        self.groups.len()
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
                .or_insert_with(|| {
                    Arc::new(BatchGroup {
                        key: key.clone(),
                        state: Mutex::new(GroupState::default()),
                        filled: OnceCell::new(),
                    })
                })
                .clone();
            group
                .filled
                .get_or_try_init(|| self.fill(hub, pool, &group))
                .await?;
            let mut g = group.lock();
            if g.retired {
                // Lost a race with the group's last member leaving: start over with a new one.
                drop(g);
                self.groups.remove_if(&key, |_, v| Arc::ptr_eq(v, &group));
                continue;
            }
            if !g.members.iter().any(|m| m.conn == conn) {
                g.members.push(Member {
                    conn,
                    outbox: outbox.clone(),
                    capacity: capacity.max(1),
                    lagging: false,
                });
            }
            let first_batch = group.shared_full(&mut g);
            drop(g);
            let statuses = group.statuses();
            return Ok(Joined {
                group,
                statuses,
                first_batch,
            });
        }
    }

    /// Registers a new group in the hub, reads its target and current states, and starts its
    /// timer. Registration comes first, so no change committed meanwhile is missed.
    async fn fill(
        &self,
        hub: &Arc<Hub>,
        pool: &PgPool,
        group: &Arc<BatchGroup>,
    ) -> Result<(), sqlx::Error> {
        let facts = target_trackers(pool, &group.key).await?;
        add_trackers(hub, pool, group, facts).await?;
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
    pub fn restrict_to_grants(&self, hub: &Hub, user: i64, keep: &HashSet<TrackerId>) {
        let groups: Vec<Arc<BatchGroup>> = self
            .groups
            .iter()
            .filter(|g| g.key.scope.sub_user == Some(user))
            .map(|g| g.value().clone())
            .collect();
        for group in groups {
            let dropped: Vec<TrackerId> = group
                .lock()
                .trackers
                .iter()
                .copied()
                .filter(|id| !keep.contains(id))
                .collect();
            if dropped.is_empty() {
                continue;
            }
            // Source ids are read before taking the group lock: the hub locks a tracker entry
            // and then a group, never the other way round.
            let frames: Vec<ByteString> = dropped
                .iter()
                .map(|id| {
                    model::disallowed_event(*id, hub.source_id(*id).unwrap_or_default()).into()
                })
                .collect();
            {
                let mut g = group.lock();
                for id in &dropped {
                    g.forget(id);
                }
                for m in &g.members {
                    for f in &frames {
                        m.outbox.push(Outgoing::Frame(f.clone()));
                    }
                }
            }
            hub.unsubscribe_group(&group, &dropped);
        }
    }

    /// The sub-users that have batch groups.
    pub fn sub_users(&self) -> HashSet<i64> {
        self.groups
            .iter()
            .filter_map(|g| g.key.scope.sub_user)
            .collect()
    }

    pub fn leave(&self, group: &Arc<BatchGroup>, conn: ConnId) {
        group.lock().members.retain(|m| m.conn != conn);
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
            let known: HashSet<TrackerId> = group.lock().trackers.clone();
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
    let rows = match &key.target {
        Target::All => {
            queries::visible_trackers(pool, key.scope.account_id, key.scope.sub_user).await?
        }
        Target::Selected(ids) => {
            queries::visible_trackers_among(pool, key.scope.account_id, key.scope.sub_user, ids)
                .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.id,
                TrackerFacts {
                    source_id: r.source_id,
                    blocked: r.blocked,
                    change_no: r.change_no,
                },
            )
        })
        .collect())
}

async fn add_trackers(
    hub: &Arc<Hub>,
    pool: &PgPool,
    group: &Arc<BatchGroup>,
    facts: Vec<(TrackerId, TrackerFacts)>,
) -> Result<(), sqlx::Error> {
    {
        let mut g = group.lock();
        g.full = None;
        for (id, f) in &facts {
            g.trackers.insert(*id);
            if f.blocked {
                g.blocked.insert(*id);
            }
        }
    }
    let ids: Vec<TrackerId> = facts.iter().map(|(id, _)| *id).collect();
    hub.subscribe_group(group, &ids);
    for (id, f) in &facts {
        hub.observe(*id, *f);
    }
    if group.key.is_readings() {
        // Blocked trackers' readings too: they are held back until an unblock.
        let ids: Vec<TrackerId> = facts.iter().map(|(id, _)| *id).collect();
        for chunk in ids.chunks(10_000) {
            for r in readings::readings_by_ids(pool, chunk).await? {
                group.offer_reading(&Arc::new(r));
            }
        }
        return Ok(());
    }
    let open: Vec<TrackerId> = facts
        .iter()
        .filter(|(_, f)| !f.blocked)
        .map(|(id, _)| *id)
        .collect();
    for chunk in open.chunks(10_000) {
        for s in queries::states_by_ids(pool, chunk).await? {
            group.offer(&Arc::new(s), false);
        }
    }
    Ok(())
}

/// The group's timer: one batch per period until the last member leaves.
async fn run_group(hub: Arc<Hub>, group: Arc<BatchGroup>) {
    let mut interval = tokio::time::interval(group.key.rate);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await; // the first tick is immediate; the first batch was sent on join
    loop {
        interval.tick().await;
        if !group.tick() {
            break;
        }
    }
    hub.batches
        .groups
        .remove_if(&group.key, |_, v| Arc::ptr_eq(v, &group));
    hub.unsubscribe_group(&group, &group.tracker_ids());
}
