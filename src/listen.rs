//! The database event stream: one LISTEN connection per process, and the processor that turns
//! notifications into hub events.
//!
//! Notifications are wake-ups that name what changed (see the payload formats atop the
//! migration). The listener task only parses them into a [`Pending`] set, keeping what some
//! socket watches (state ids are filtered by the processor); the processor task takes
//! everything pending at once, reads the rows in batched
//! queries, orders the resulting events by change number and hands them to the [`Hub`]. When the
//! LISTEN connection is lost, the listener reconnects with backoff, re-LISTENs, and asks the
//! processor to resync: every watched tracker, and every session held, is compared with the
//! tables, so that what changed during the gap is delivered. Revoked grants (`g|` payloads, and
//! the grant table on resync) make the sockets of the sub-user's sessions drop those trackers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::{watch, Notify};

use crate::config::{ListenSettings, SessionSettings};
use crate::db::{self, queries};
use crate::hub::{Hub, Revoked, TrackerFacts};
use crate::model::{Lifecycle, TrackerId, TrackerState};

pub const CHANNEL: &str = "fleetgate";

/// A set of tracker ids, hashed with foldhash rather than std's SipHash: the listener and the
/// processor insert and look up every notified tracker several times a round (parsed, kept if
/// wanted, read, published): with SipHash, about a twentieth of the processor's instructions
/// per state (`processor_cost_per_state` in `tests/gateway/db.rs`, under callgrind). (The ids
/// come from the database; foldhash is randomly seeded.)
pub type IdSet = HashSet<TrackerId, foldhash::fast::RandomState>;

/// A map keyed by tracker id, hashed as [`IdSet`].
pub type IdMap<V> = HashMap<TrackerId, V, foldhash::fast::RandomState>;

/// The `application_name` of the LISTEN connection, as seen in `pg_stat_activity`.
pub const LISTEN_APPLICATION_NAME: &str = "fleetgate-listen";

/// TCP settings of the LISTEN connection's backend (PostgreSQL's per-session `tcp_keepalives_*`
/// and `tcp_user_timeout`, which any user may set). PostgreSQL keeps every notification until
/// each listening backend has sent it on, and writers fail once that queue (8 GB) is full: the
/// backend of a gateway that vanished without closing its connection (host lost, network cut)
/// would hold the queue until the server's own keepalive gave up on it, two hours or more by
/// default, or fifteen minutes of retransmissions while it had notifications in flight. With
/// these it is dropped within about a minute either way. (No effect over a Unix socket.)
pub const LISTEN_TCP_SETTINGS: [(&str, &str); 4] = [
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "60000"),
];

/// A share of PostgreSQL's notification queue in use above which the probe warns.
const QUEUE_USAGE_WARN: f64 = 0.25;

/// Applies [`LISTEN_TCP_SETTINGS`] to the LISTEN connection's session, each on its own: one the
/// server does not know (`tcp_user_timeout` before PostgreSQL 12) or a pooler refuses is logged
/// and skipped, and the connection is used all the same. (Sent as `SET`s, not as startup
/// options, which PgBouncer refuses unless told to ignore them.)
async fn apply_tcp_settings(listener: &mut PgListener) {
    for (name, value) in LISTEN_TCP_SETTINGS {
        let set = format!("SET {name} = {value}");
        if let Err(e) = sqlx::query(&set).execute(&mut *listener).await {
            tracing::warn!(setting = name, error = %e, "LISTEN connection: setting not applied");
        }
    }
}

/// Largest id list sent to the database in one query during a resync.
const RESYNC_CHUNK: usize = 5000;

/// Trackers whose states one round reads and publishes at a time.
const STATE_FETCH_CHUNK: usize = 2000;

/// Most chunk reads in flight at once (and at most the processor pool's connections,
/// `database.event_connections`): the next chunks are read while one is decoded and published.
/// On the 2-core benchmark machine, where PostgreSQL's writers compete for the same cores, 1, 2,
/// 3 and 4 reads in flight delivered 25%, 37%, 46–59% and 61% of the raw LISTEN rate
/// (docs/performance.md, "What changed").
const STATE_FETCHES_IN_FLIGHT: usize = 4;

/// Work the listener has collected for the processor.
#[derive(Debug, Default)]
pub struct Pending {
    pub state_ids: IdSet,
    /// Trackers whose readings changed (`r|` payloads), for those a readings group watches.
    pub readings_ids: HashSet<TrackerId>,
    pub state_ranges: Vec<(i64, i64)>,
    pub lifecycle: Vec<(i64, TrackerId, Lifecycle)>,
    pub lifecycle_ranges: Vec<(i64, i64)>,
    pub sessions: HashSet<String>,
    pub session_ranges: Vec<(i64, i64)>,
    /// Accounts that gained trackers (added, or granted to a sub-user).
    pub accounts: HashSet<i64>,
    /// Grants revoked, as `(user_id, tracker_id)`, for watched trackers.
    pub revoked_grants: Vec<(i64, TrackerId)>,
    /// Watched trackers whose data source id changed (`i|` payloads).
    pub sources: HashSet<TrackerId>,
    /// When the earliest notification of this work arrived (for the notify-to-send metric).
    pub notified_at: Option<Instant>,
    pub resync: bool,
    /// Trackers a resync published an unblock for, whose current state it has yet to send
    /// (with `carried`, see `resync_with`): kept when the resync fails after the unblock went
    /// out, for the next one to send (it would find nothing changed and send no state).
    reopened: HashSet<TrackerId>,
}

impl Pending {
    /// The lifecycle changes alone (a copy; usually empty, so nearly free).
    fn lifecycle_copy(&self) -> Pending {
        Pending {
            lifecycle: self.lifecycle.clone(),
            lifecycle_ranges: self.lifecycle_ranges.clone(),
            ..Pending::default()
        }
    }

    /// Adds `other`'s lifecycle changes to these.
    fn add_lifecycle(&mut self, other: Pending) {
        self.lifecycle.extend(other.lifecycle);
        self.lifecycle_ranges.extend(other.lifecycle_ranges);
    }

    fn has_lifecycle(&self) -> bool {
        !self.lifecycle.is_empty() || !self.lifecycle_ranges.is_empty()
    }

    fn is_empty(&self) -> bool {
        self.state_ids.is_empty()
            && self.readings_ids.is_empty()
            && self.state_ranges.is_empty()
            && self.lifecycle.is_empty()
            && self.lifecycle_ranges.is_empty()
            && self.sessions.is_empty()
            && self.session_ranges.is_empty()
            && self.accounts.is_empty()
            && self.revoked_grants.is_empty()
            && self.sources.is_empty()
            && !self.resync
    }

    /// Adds one notification payload, keeping only what the hub watches (state ids are kept
    /// as they come and filtered by `process`). Returns false for a payload it cannot read
    /// (logged by the caller, never fatal).
    pub fn add_payload(&mut self, payload: &str, hub: &Hub) -> bool {
        let Some((kind, body)) = payload.split_once('|') else {
            return false;
        };
        match kind {
            "s" => {
                for id in body.split(',') {
                    // Not filtered here: `process` keeps the wanted ids with one lookup each.
                    // Looking them up here too doubled the index lookups, and these ran on
                    // another thread than the processor, whose `publish_state` holds the
                    // same shard locks while it serializes: the benchmark's profile showed the
                    // listener spending more time in those lookups than in parsing.
                    match id.parse::<TrackerId>() {
                        Ok(id) => {
                            self.state_ids.insert(id);
                        }
                        Err(_) => return false,
                    }
                }
                true
            }
            "r" => add_ids(body, &mut self.readings_ids, |id| hub.wants_readings(id)),
            "i" => add_ids(body, &mut self.sources, |id| hub.is_watched(id)),
            "t" => {
                for item in body.split(',') {
                    let mut parts = item.splitn(3, ':');
                    let (Some(c), Some(id), Some(ev)) = (parts.next(), parts.next(), parts.next())
                    else {
                        return false;
                    };
                    let (Ok(c), Ok(id), Some(ev)) = (
                        c.parse::<i64>(),
                        id.parse::<TrackerId>(),
                        Lifecycle::parse(ev),
                    ) else {
                        return false;
                    };
                    if hub.is_watched(id) {
                        self.lifecycle.push((c, id, ev));
                    }
                }
                true
            }
            "e" => {
                for hash in body.split(',') {
                    if hub.has_session(hash) {
                        self.sessions.insert(hash.to_owned());
                    }
                }
                true
            }
            "n" => {
                for acct in body.split(',') {
                    match acct.parse::<i64>() {
                        Ok(a) => {
                            self.accounts.insert(a);
                        }
                        Err(_) => return false,
                    }
                }
                true
            }
            "g" => {
                for item in body.split(',') {
                    let mut parts = item.splitn(3, ':');
                    let (Some(user), Some(id), Some(ev)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        return false;
                    };
                    let (Ok(user), Ok(id)) = (user.parse::<i64>(), id.parse::<TrackerId>()) else {
                        return false;
                    };
                    match ev {
                        "revoke" if hub.is_watched(id) => self.revoked_grants.push((user, id)),
                        // A new grant changes nothing for `state` subscriptions (the tracker was
                        // answered `disallowed` and is not watched); batch targets follow `n|`.
                        "revoke" | "grant" => {}
                        _ => return false,
                    }
                }
                true
            }
            "S" | "T" | "E" => {
                let Some((lo, hi)) = body.split_once('|') else {
                    return false;
                };
                let (Ok(lo), Ok(hi)) = (lo.parse::<i64>(), hi.parse::<i64>()) else {
                    return false;
                };
                match kind {
                    "S" => self.state_ranges.push((lo, hi)),
                    "T" => self.lifecycle_ranges.push((lo, hi)),
                    _ => self.session_ranges.push((lo, hi)),
                }
                true
            }
            _ => false,
        }
    }
}

/// Adds the ids of a `<id>,<id>,…` payload body that `keep` wants to `set`; false if one is not
/// a number.
fn add_ids(body: &str, set: &mut HashSet<TrackerId>, keep: impl Fn(TrackerId) -> bool) -> bool {
    for id in body.split(',') {
        match id.parse::<TrackerId>() {
            Ok(id) if keep(id) => {
                set.insert(id);
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Shared between the listener (producer) and the processor (consumer).
#[derive(Default)]
pub struct Inbox {
    pending: Mutex<Pending>,
    ready: Notify,
}

impl Inbox {
    pub fn update(&self, f: impl FnOnce(&mut Pending)) {
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut p);
        }
        self.ready.notify_one();
    }

    /// Takes the ended sessions and revoked grants gathered so far (see `process_with`).
    fn take_ends(&self) -> Ends {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let ends = Ends {
            sessions: std::mem::take(&mut p.sessions),
            session_ranges: std::mem::take(&mut p.session_ranges),
            revoked_grants: std::mem::take(&mut p.revoked_grants),
        };
        if p.is_empty() {
            // Nothing left for the next round: its notifications start afresh.
            p.notified_at = None;
        }
        ends
    }

    /// The blocks and removals (`corrupt`) gathered so far for these trackers, left in place:
    /// the next round finds them published already.
    fn stops_of(&self, ids: &[TrackerId]) -> Vec<(i64, TrackerId, Lifecycle)> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.lifecycle.is_empty() {
            return Vec::new();
        }
        let ids: HashSet<TrackerId> = ids.iter().copied().collect();
        p.lifecycle
            .iter()
            .filter(|(_, id, kind)| *kind != Lifecycle::Unblock && ids.contains(id))
            .copied()
            .collect()
    }

    async fn take(&self) -> Pending {
        loop {
            {
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if !p.is_empty() {
                    return std::mem::take(&mut *p);
                }
            }
            self.ready.notified().await;
        }
    }
}

/// Runs the LISTEN connection until shutdown.
pub async fn run_listener(
    url: String,
    hub: Arc<Hub>,
    inbox: Arc<Inbox>,
    settings: ListenSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let min = Duration::from_millis(settings.reconnect_min_ms.max(1));
    let max = Duration::from_millis(settings.reconnect_max_ms.max(settings.reconnect_min_ms));
    let probe = Duration::from_millis(settings.probe_interval_ms.max(100));
    let mut backoff = min;
    let mut down_since: Option<Instant> = None;
    let mut first = true;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let connected = async {
            // A pool of one, named so operators (and tests) can find the listening backend.
            let options: PgConnectOptions = url.parse()?;
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.application_name(LISTEN_APPLICATION_NAME))
                .await?;
            let mut l = PgListener::connect_with(&pool).await?;
            // A lost connection is reported at once: by default sqlx first reconnects, and
            // retries a refused or shutting-down server for the pool's acquire timeout, so a
            // stopped server read as up for seconds (until the probe gave up). This loop
            // reconnects itself, and LISTENs again before its resync.
            l.eager_reconnect(false);
            apply_tcp_settings(&mut l).await;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "LISTEN connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        backoff = min;
        // LISTEN is in place before the resync reads the tables: nothing committed from now on
        // can be missed, and anything read twice is dropped by change number.
        // (Up first: a resync taken from here on may mark the processor caught up.)
        hub.set_stream_up(true);
        inbox.update(|p| p.resync = true);
        match down_since.take() {
            Some(t) => {
                hub.metrics.listen_reconnects.inc();
                hub.metrics.listen_gap.observe(t.elapsed());
                tracing::warn!(
                    gap_ms = t.elapsed().as_millis() as u64,
                    "LISTEN stream restored; resyncing watched trackers and sessions"
                )
            }
            None if first => tracing::info!(channel = CHANNEL, "LISTEN stream up"),
            None => {}
        }
        first = false;

        // The probe runs every `probe` whether notifications come or not: it checks that the
        // connection still answers (a silently dead one delivers nothing and reports no error)
        // and reads how full PostgreSQL's notification queue is.
        let mut probe_timer = tokio::time::interval_at(tokio::time::Instant::now() + probe, probe);
        probe_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                r = listener.try_recv() => match r {
                    Ok(Some(n)) => {
                        let payload = n.payload();
                        let mut ok = true;
                        hub.metrics.notifications.inc();
                        let now = Instant::now();
                        inbox.update(|p| {
                            p.notified_at.get_or_insert(now);
                            ok = p.add_payload(payload, &hub);
                        });
                        if !ok {
                            tracing::warn!(payload = %payload.chars().take(120).collect::<String>(), "unreadable notification ignored");
                        }
                    }
                    Ok(None) => break "connection lost".to_string(),
                    Err(e) => break e.to_string(),
                },
                _ = probe_timer.tick() => {
                    let ping = sqlx::query_scalar::<_, f64>("SELECT pg_notification_queue_usage()")
                        .fetch_one(&mut listener);
                    match tokio::time::timeout(Duration::from_secs(5), ping).await {
                        Ok(Ok(usage)) => {
                            hub.metrics.notify_queue_usage.set(usage);
                            if usage >= QUEUE_USAGE_WARN {
                                tracing::warn!(
                                    percent = format!("{:.1}", usage * 100.0),
                                    "PostgreSQL's notification queue is filling: a listening \
                                     backend is not consuming (pg_stat_activity shows which); \
                                     writes fail once it is full"
                                );
                            }
                        }
                        Ok(Err(e)) => break format!("probe failed: {e}"),
                        Err(_) => break "probe timed out".to_string(),
                    }
                }
                _ = shutdown.changed() => return,
            }
        };
        hub.set_stream_up(false);
        down_since = Some(Instant::now());
        tracing::warn!(reason = %reason, retry_in_ms = backoff.as_millis() as u64, "LISTEN stream down; reconnecting");
        drop(listener);
        // Pause before reconnecting, so a restarting server is not hammered.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Runs the processor until shutdown: takes pending work, reads it from the database in batches
/// and publishes it through the hub. A failed round becomes a resync once the database answers.
pub async fn run_processor(
    pool: PgPool,
    hub: Arc<Hub>,
    inbox: Arc<Inbox>,
    settings: ListenSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = Duration::from_millis(settings.reconnect_max_ms.max(1));
    let mut backoff = Duration::from_millis(settings.reconnect_min_ms.max(1));
    // Failed rounds retried at once (see below), since the last round that succeeded.
    let mut quick_retries = 0;
    let connections = pool.options().get_max_connections();
    let round_timeout = Duration::from_secs(settings.round_timeout_secs.max(1));
    let mut limit = round_timeout;
    let mut pool = pool;
    // Lifecycle changes notified to rounds that did not finish, and to resyncs. A resync reads
    // where things stand, which would fold a block and the unblock after it into nothing
    // (PROTOCOL.md §5: lifecycle events are never dropped): they were notified one by one, so
    // the next resync publishes them one by one before it compares (see `resync_with`). Every
    // failure queues a resync, so a round that is not one never finds any here.
    let mut carried = Pending::default();
    loop {
        let pending = tokio::select! {
            p = inbox.take() => p,
            _ = shutdown.changed() => return,
        };
        hub.metrics
            .round_started(pending.notified_at.unwrap_or_else(Instant::now));
        let kept = if pending.resync {
            carried.add_lifecycle(pending.lifecycle_copy());
            Pending::default()
        } else {
            pending.lifecycle_copy()
        };
        let resyncs = pending.resync;
        // What a resync that finishes finds when the stream went down meanwhile: a resync
        // taken before that cannot have caught up with the gap.
        let epoch = hub.stream_epoch();
        let round = async {
            if pending.resync {
                resync_with(&pool, &hub, &mut carried).await
            } else {
                process(&pool, &hub, pending, Some(&inbox)).await
            }
        };
        let result = tokio::select! {
            r = tokio::time::timeout(limit, round) => r,
            _ = shutdown.changed() => return,
        };
        let Ok(result) = result else {
            // A read that does not come back is most likely on a connection that is gone
            // without either end being told (a failover, a network cut): TCP would keep it for
            // many minutes. Dropping the round drops its reads; their connections would hang
            // the pool as they are returned to it (it checks each), so the pool goes with them.
            // What the round had to deliver, the resync delivers.
            tracing::warn!(
                limit_ms = limit.as_millis() as u64,
                "event round did not finish in time: its database connections are dropped and \
                 a resync on new ones follows"
            );
            hub.metrics.rounds_abandoned.inc();
            hub.set_caught_up(false);
            let fresh = pool
                .options()
                .clone()
                .connect_lazy_with((*pool.connect_options()).clone());
            let old = std::mem::replace(&mut pool, fresh);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), old.close()).await;
            });
            inbox.update(|p| p.resync = true);
            carried.add_lifecycle(kept);
            limit = (limit * 2).min(round_timeout * 8);
            continue;
        };
        match result {
            Ok(()) => {
                if resyncs && hub.stream_epoch() == epoch && hub.stream_up() {
                    hub.set_caught_up(true);
                }
                backoff = Duration::from_millis(settings.reconnect_min_ms.max(1));
                quick_retries = 0;
                limit = round_timeout;
            }
            Err(e) => {
                tracing::warn!(error = %e, "event processing failed; will resync");
                hub.set_caught_up(false);
                inbox.update(|p| p.resync = true);
                carried.add_lifecycle(kept);
                // The processor's connections are not tested before use: after the server
                // dropped them all (a restart, a failover), each failed one round. With the
                // LISTEN connection up again the server answers, so the resync goes again at
                // once, up to once per pooled connection, instead of waiting a backoff each
                // (with `reconnect_min_ms` of seconds, the missed changes came many seconds
                // late).
                if db::is_unavailable(&e) && hub.stream_up() && quick_retries < connections {
                    quick_retries += 1;
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(max);
            }
        }
    }
}

enum Step {
    Lifecycle(TrackerId, i64, Lifecycle),
    State(TrackerState),
    /// A state read with the compact columns alone (see `read_states`).
    Compact(TrackerState),
    /// The current state re-sent after an unblock with this change number.
    Forced(TrackerState),
}

/// The lifecycle event a tracker row stands for, to subscribers admitted under `accounts` (the
/// hub's record of them, if any; see [`Hub::accounts_of`]): a tracker removed, or in another
/// account than any of them, is `corrupt`. (For subscribers on both sides of a move that the
/// gateway never saw published, as normal processing would have told them: the old account's
/// at the move, the new one's at the move back.)
fn lifecycle_of(row: &queries::TrackerLifecycleRow, accounts: &[i64]) -> Lifecycle {
    if row.removed || accounts.iter().any(|&a| a != row.account_id) {
        Lifecycle::Corrupt
    } else if row.blocked {
        Lifecycle::Block
    } else {
        Lifecycle::Unblock
    }
}

/// One round: everything the listener gathered since the last round.
pub async fn process(
    pool: &PgPool,
    hub: &Arc<Hub>,
    p: Pending,
    inbox: Option<&Inbox>,
) -> Result<(), sqlx::Error> {
    process_with(pool, hub, p, inbox, &|| {}).await
}

/// [`process`], calling `before_publish` after each chunk of states is read and before it is
/// published (tests use it to change the hub in between, as a subscribe may).
#[doc(hidden)]
pub async fn process_with(
    pool: &PgPool,
    hub: &Arc<Hub>,
    p: Pending,
    inbox: Option<&Inbox>,
    before_publish: &(dyn Fn() + Sync),
) -> Result<(), sqlx::Error> {
    // Source ids first: the states read below take theirs from the hub.
    if !p.sources.is_empty() {
        let ids: Vec<TrackerId> = p.sources.iter().copied().collect();
        hub.forget_source_ids(&ids);
        hub.set_source_ids(&queries::source_ids(pool, &ids).await?);
    }
    let accounts = p.accounts;
    let ends = Ends {
        sessions: p.sessions,
        session_ranges: p.session_ranges,
        revoked_grants: p.revoked_grants,
    };
    end_sessions_and_grants(pool, hub, ends).await?;
    let mut lifecycle = p.lifecycle;
    for (lo, hi) in p.lifecycle_ranges {
        for row in queries::trackers_by_range(pool, lo, hi).await? {
            if hub.is_watched(row.id) {
                let kind = lifecycle_of(&row, &hub.accounts_of(row.id));
                lifecycle.push((row.change_no, row.id, kind));
            }
        }
    }

    // Which trackers need their state read: those notified and still wanted, plus every tracker
    // with a lifecycle change in this round (an unblock pushes the current state); each with
    // its data source id if the hub knows it (see `read_states`). Those whose subscribers and
    // groups all take the compact format are read with its columns alone (`compact`), unless
    // the round has a lifecycle change or a range of them.
    let mut compact = IdSet::default();
    let mut ids: IdMap<Option<i64>> = p
        .state_ids
        .into_iter()
        .filter_map(|id| {
            let (source, compact_only) = hub.wanted_read(id)?;
            if compact_only && source.is_some() {
                compact.insert(id);
            }
            Some((id, source))
        })
        .collect();
    let mut unblocked_at: IdMap<i64> = IdMap::default();
    let mut lifecycle_of_id: IdMap<Vec<(i64, Lifecycle)>> = IdMap::default();
    for (c, id, kind) in lifecycle {
        ids.entry(id).or_insert_with(|| hub.source_id(id));
        compact.remove(&id);
        if kind == Lifecycle::Unblock {
            let e = unblocked_at.entry(id).or_insert(c);
            *e = (*e).max(c);
        }
        lifecycle_of_id.entry(id).or_default().push((c, kind));
    }
    // Overflow payloads name change-number ranges: rare, read whole.
    let mut ranged: IdMap<Vec<TrackerState>> = IdMap::default();
    for (lo, hi) in p.state_ranges {
        for s in queries::states_by_range(pool, lo, hi).await? {
            if hub.is_watched(s.tracker_id) {
                ranged.entry(s.tracker_id).or_default().push(s);
            }
        }
    }
    for id in ranged.keys() {
        compact.remove(id);
    }
    let mut all: Vec<TrackerId> = ids.keys().copied().collect();
    all.extend(ranged.keys().filter(|id| !ids.contains_key(id)).copied());

    // Read and publish in chunks of trackers: a backlog of the whole fleet (after a burst, or
    // when the gateway falls behind) then costs a few chunks of rows at a time, and the first
    // chunk's sockets are written while the next chunks are read (several reads in flight, so
    // the database works on them in parallel). Every step of one tracker is in the same chunk,
    // so per-tracker order holds: within a chunk, steps go by change number (a state committed
    // before a block is delivered before the block; a state re-sent after an unblock sorts
    // right after it).
    let ids = &ids;
    let compact = &compact;
    let reads: Vec<_> = all
        .chunks(STATE_FETCH_CHUNK)
        .map(|chunk| {
            let fetch: Vec<TrackerId> = chunk
                .iter()
                .copied()
                .filter(|id| ids.contains_key(id))
                .collect();
            async move {
                let states = if fetch.is_empty() {
                    (Vec::new(), Vec::new())
                } else {
                    read_states(pool, ids, compact, &fetch).await?
                };
                Ok::<_, sqlx::Error>((chunk, states))
            }
        })
        .collect();
    let in_flight =
        (pool.options().get_max_connections() as usize).clamp(1, STATE_FETCHES_IN_FLIGHT);
    let mut fetches = futures_util::stream::iter(reads).buffered(in_flight);
    while let Some(fetched) = fetches.next().await {
        let (chunk, (mut states, compact_states)) = fetched?;
        before_publish();
        let mut steps: Vec<((i64, u8), Step)> =
            Vec::with_capacity(states.len() + compact_states.len());
        // The rows are current: one may have been committed after a session ended, a grant
        // was revoked or the tracker was blocked or removed, whose notification came after
        // this round began (it is in the inbox by now: PostgreSQL sent it at that commit,
        // before the read began, unless the LISTEN connection lags behind; see PROTOCOL.md §5).
        // Those go first, so that the state is held back as the next round would (a block or
        // removal published here is known to the hub then, and skipped).
        if let Some(inbox) = inbox {
            end_sessions_and_grants(pool, hub, inbox.take_ends()).await?;
            for (c, id, kind) in inbox.stops_of(chunk) {
                steps.push(((c, 0), Step::Lifecycle(id, c, kind)));
            }
        }
        for id in chunk {
            if let Some(rows) = ranged.remove(id) {
                states.extend(rows);
            }
            for &(c, kind) in lifecycle_of_id.get(id).into_iter().flatten() {
                steps.push(((c, 0), Step::Lifecycle(*id, c, kind)));
            }
        }
        for s in states {
            match unblocked_at.get(&s.tracker_id) {
                Some(&u) if s.change_no < u => steps.push(((u, 1), Step::Forced(s))),
                _ => steps.push(((s.change_no, 0), Step::State(s))),
            }
        }
        // (No lifecycle change for these in this round: see `compact`.)
        steps.extend(
            compact_states
                .into_iter()
                .map(|s| ((s.change_no, 0), Step::Compact(s))),
        );
        steps.sort_by_key(|(k, _)| *k);
        let now = Utc::now();
        let mut reopened = IdSet::default();
        let mut read_again: Vec<TrackerId> = Vec::new();
        for (_, step) in steps {
            match step {
                Step::Lifecycle(id, change, kind) => {
                    if hub.publish_lifecycle(id, change, kind) && kind == Lifecycle::Unblock {
                        reopened.insert(id);
                    }
                }
                Step::State(s) => {
                    let resend = reopened.contains(&s.tracker_id);
                    hub.publish_state(s, resend, now);
                }
                Step::Compact(s) => {
                    let id = s.tracker_id;
                    if hub.publish_compact_state(s, now).is_none() {
                        read_again.push(id);
                    }
                }
                Step::Forced(s) => {
                    if reopened.contains(&s.tracker_id) {
                        hub.publish_state(s, true, now);
                    }
                }
            }
        }
        // Trackers that gained a full-format subscriber or group since the round began: their
        // state read in full (the current one, so at least as new) and published after all.
        if !read_again.is_empty() {
            let (states, _) = read_states(pool, ids, &IdSet::default(), &read_again).await?;
            for s in states {
                hub.publish_state(s, false, now);
            }
        }
    }

    // Trackers added to an account (or moved into it, restored, granted): its `all` groups
    // read their targets again. After the round's lifecycle changes, not before: a tracker
    // removed and restored (or moved away and back) since the last round is still held by its
    // groups until the round's `corrupt` makes them forget it, and a target read before that
    // added nothing back. (A group that admits a tracker with facts newer than a `corrupt`
    // still to come keeps it: see `Hub::publish_lifecycle`.)
    if !accounts.is_empty() && hub.batches.group_count() > 0 {
        hub.batches.accounts_changed(hub, pool, &accounts).await?;
    }

    // Readings: the current rows of the notified trackers, in one query; each group keeps the
    // newest per key by change number, so rows read twice change nothing.
    let readings_ids: Vec<TrackerId> = p
        .readings_ids
        .into_iter()
        .filter(|id| hub.wants_readings(*id))
        .collect();
    if !readings_ids.is_empty() {
        hub.offer_readings(crate::readings::readings_by_ids(pool, &readings_ids).await?);
    }

    Ok(())
}

/// Sessions that ended and grants that were revoked, as notified.
struct Ends {
    sessions: HashSet<String>,
    session_ranges: Vec<(i64, i64)>,
    revoked_grants: Vec<(i64, TrackerId)>,
}

/// Ends the sessions that ended and the grants that were revoked: `logout` and `disallowed`
/// are queued before any state this round (or a chunk of it) publishes, since a state read now
/// may have been committed after the session or the grant ended, and must not reach its
/// sockets first (PROTOCOL.md §5: per tracker, commit order).
async fn end_sessions_and_grants(pool: &PgPool, hub: &Hub, ends: Ends) -> Result<(), sqlx::Error> {
    let Ends {
        sessions: mut hashes,
        session_ranges,
        revoked_grants,
    } = ends;
    for (lo, hi) in session_ranges {
        hashes.extend(
            queries::session_hashes_by_range(pool, lo, hi)
                .await?
                .into_iter()
                .filter(|h| hub.has_session(h)),
        );
    }
    if !hashes.is_empty() {
        check_sessions(pool, hub, hashes.into_iter().collect()).await?;
    }
    if !revoked_grants.is_empty() {
        disallow_revoked(pool, hub, revoked_grants).await?;
    }
    Ok(())
}

/// The current states of `fetch`, each with its tracker's data source id as the hub knew it
/// when the round began (`sources`, from the same lookup that found the state wanted). The hub
/// learns source ids from subscribes and reads that join `trackers` and is told of changes
/// (`i|`, applied at the start of the round): looking the id up in `trackers` for every state
/// was a third of this read's cost in PostgreSQL. Trackers whose source id the hub did not know
/// are read with it.
///
/// Those in `compact` (every subscriber and group of theirs takes the compact format, and the
/// source id is known) are read with the compact columns alone and returned apart, to be
/// published with [`Hub::publish_compact_state`]: no compact event holds the other columns, and
/// sending them (`additional` above all, a `jsonb` rendered as text) was about a sixth of what
/// PostgreSQL spent on these reads in the bench's `batch`.
async fn read_states(
    pool: &PgPool,
    sources: &IdMap<Option<i64>>,
    compact: &IdSet,
    fetch: &[TrackerId],
) -> Result<(Vec<TrackerState>, Vec<TrackerState>), sqlx::Error> {
    let mut known: Vec<TrackerId> = Vec::new();
    let mut known_compact: Vec<TrackerId> = Vec::new();
    let mut unknown: Vec<TrackerId> = Vec::new();
    for id in fetch {
        match sources.get(id) {
            Some(Some(_)) if compact.contains(id) => known_compact.push(*id),
            Some(Some(_)) => known.push(*id),
            _ => unknown.push(*id),
        }
    }
    let with_sources = |mut states: Vec<TrackerState>| {
        for s in &mut states {
            if let Some(Some(source)) = sources.get(&s.tracker_id) {
                s.source_id = *source;
            }
        }
        states
    };
    let mut states = Vec::new();
    if !known.is_empty() {
        states = with_sources(queries::states_by_ids_source_unread(pool, &known).await?);
    }
    if !unknown.is_empty() {
        states.extend(queries::states_by_ids(pool, &unknown).await?);
    }
    let compact_states = if known_compact.is_empty() {
        Vec::new()
    } else {
        with_sources(queries::states_by_ids_for(pool, &known_compact, true).await?)
    };
    Ok((states, compact_states))
}

/// Logs out the sessions among `hashes` that ended, and refreshes the expiry of the others;
/// returns how many were logged out.
async fn check_sessions(
    pool: &PgPool,
    hub: &Hub,
    hashes: Vec<String>,
) -> Result<usize, sqlx::Error> {
    let rows = queries::sessions(pool, &hashes).await?;
    let mut ended = 0;
    let mut live: HashMap<&str, &queries::SessionRow> = HashMap::new();
    for row in &rows {
        if row.live {
            live.insert(row.hash.as_str(), row);
        }
    }
    for hash in &hashes {
        match live.get(hash.as_str()) {
            Some(row) => hub.set_session_expiry(hash, row.expires_at),
            None => {
                let n = hub.logout(hash);
                if n > 0 {
                    ended += 1;
                    tracing::info!(
                        session = crate::telemetry::session_tag(hash),
                        sockets = n,
                        "session ended: logout sent"
                    );
                }
            }
        }
    }
    Ok(ended)
}

/// Compares everything the hub holds with the tables and publishes the differences.
pub async fn resync(pool: &PgPool, hub: &Arc<Hub>) -> Result<(), sqlx::Error> {
    resync_with(pool, hub, &mut Pending::default()).await
}

/// [`resync`], first publishing the lifecycle changes in `carried` (notified to rounds that
/// failed or were given up, or with the resync's own request) in change order, as the rounds
/// would have: lifecycle events only, as the comparison below publishes its own; the current
/// state of a tracker they reopen follows with the other states, after sessions and grants.
/// `carried`'s lifecycle changes are emptied once they are published (the hub skips a change
/// number it has seen, so a retry would publish nothing anew); the trackers they reopened stay
/// in it until their states are sent.
pub async fn resync_with(
    pool: &PgPool,
    hub: &Arc<Hub>,
    carried: &mut Pending,
) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let mut events = 0usize;
    if carried.has_lifecycle() {
        let mut lifecycle = carried.lifecycle.clone();
        for &(lo, hi) in &carried.lifecycle_ranges {
            for row in queries::trackers_by_range(pool, lo, hi).await? {
                if hub.is_watched(row.id) {
                    let kind = lifecycle_of(&row, &hub.accounts_of(row.id));
                    lifecycle.push((row.change_no, row.id, kind));
                }
            }
        }
        // A block or unblock notified one by one speaks of the viewers of the account the
        // tracker was in then. A subscriber of another account that the hub still counts was
        // admitted before a move whose `corrupt` never reached the gateway: for such a tracker
        // the comparison below tells each subscriber what it needs (`corrupt` to the old
        // account's) instead; the trigger's kind would have told them `block`.
        let mut accounts: HashMap<TrackerId, i64> = HashMap::new();
        let named: Vec<TrackerId> = carried
            .lifecycle
            .iter()
            .filter(|(_, _, kind)| *kind != Lifecycle::Corrupt)
            .map(|(_, id, _)| *id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for chunk in named.chunks(RESYNC_CHUNK) {
            // If the database cannot say, the events go out as notified (and the resync fails
            // below): a block must not wait for the database to come back.
            let Ok(rows) = queries::trackers_by_ids(pool, chunk).await else {
                accounts.clear();
                break;
            };
            for row in rows {
                if !row.removed {
                    accounts.insert(row.id, row.account_id);
                }
            }
        }
        lifecycle.sort_by_key(|(c, _, _)| *c);
        for (change, id, kind) in lifecycle {
            let moved_unseen = kind != Lifecycle::Corrupt
                && accounts
                    .get(&id)
                    .is_some_and(|&now| hub.accounts_of(id).iter().any(|&a| a != now));
            if moved_unseen {
                continue;
            }
            if hub.publish_lifecycle(id, change, kind) {
                events += 1;
                if kind == Lifecycle::Unblock {
                    carried.reopened.insert(id);
                } else {
                    carried.reopened.remove(&id);
                }
            }
        }
        carried.lifecycle.clear();
        carried.lifecycle_ranges.clear();
    }
    let marks = hub.lifecycle_marks();
    for chunk in marks.chunks(RESYNC_CHUNK) {
        let ids: Vec<TrackerId> = chunk.iter().map(|m| m.id).collect();
        let rows = queries::trackers_by_ids(pool, &ids).await?;
        // A source id may have changed while the stream was down (its `i|` lost).
        let sources: Vec<(TrackerId, i64)> = rows.iter().map(|r| (r.id, r.source_id)).collect();
        hub.set_source_ids(&sources);
        let by_id: HashMap<TrackerId, &queries::TrackerLifecycleRow> =
            rows.iter().map(|r| (r.id, r)).collect();
        for m in chunk {
            match by_id.get(&m.id) {
                None => {
                    // Deleted while we were away.
                    if hub.publish_lifecycle(m.id, i64::MAX, Lifecycle::Corrupt) {
                        events += 1;
                    }
                }
                Some(row) if row.change_no > m.change && row.removed => {
                    if hub.publish_lifecycle(m.id, row.change_no, Lifecycle::Corrupt) {
                        events += 1;
                    }
                }
                Some(row) if row.change_no > m.change => {
                    // Subscribers know the published facts or those of their own read (see
                    // `Hub::observe_for`), each in the account it read: each is told what
                    // differs for it.
                    let told = hub.resync_lifecycle(m.id, TrackerFacts::from(*row));
                    if told.sent {
                        events += 1;
                    }
                    if told.unblocked {
                        carried.reopened.insert(m.id);
                    }
                }
                Some(_) => {}
            }
        }
    }
    // Sessions and grants before states: a state read now may have been committed after a
    // session ended or a grant was revoked while the stream was down (see `process_with`).
    let hashes: Vec<String> = hub.session_hashes().iter().map(|h| h.to_string()).collect();
    for chunk in hashes.chunks(RESYNC_CHUNK) {
        check_sessions(pool, hub, chunk.to_vec()).await?;
        resync_grants(pool, hub, chunk).await?;
    }
    let now = Utc::now();
    let watched = hub.watched_trackers();
    for chunk in watched.chunks(RESYNC_CHUNK) {
        for s in queries::states_by_ids(pool, chunk).await? {
            let resend = carried.reopened.contains(&s.tracker_id);
            if hub.publish_state(s, resend, now) > 0 {
                events += 1;
            }
        }
    }
    carried.reopened.clear();
    for chunk in hub.readings_trackers().chunks(RESYNC_CHUNK) {
        hub.offer_readings(crate::readings::readings_by_ids(pool, chunk).await?);
    }
    // Trackers added to (or granted within) an account meanwhile: their `n|` was lost with the
    // stream (or with the failed round this resync replaces), so every `all` target is read
    // again.
    let accounts = hub.batches.all_target_accounts();
    if !accounts.is_empty() {
        hub.batches.accounts_changed(hub, pool, &accounts).await?;
    }
    if !watched.is_empty() || !hashes.is_empty() {
        tracing::info!(
            trackers = watched.len(),
            sessions = hashes.len(),
            events,
            took_ms = started.elapsed().as_millis() as u64,
            "resync done"
        );
    }
    Ok(())
}

/// Logs out sessions whose expiry time has passed, every `expiry_check_ms`.
pub async fn run_expiry(
    pool: PgPool,
    hub: Arc<Hub>,
    settings: SessionSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(settings.expiry_check_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let check =
            tokio::time::timeout(EXPIRY_CONFIRM_TIMEOUT, expire_due(&pool, &hub, Utc::now()));
        let result = tokio::select! {
            r = check => r,
            _ = shutdown.changed() => return,
        };
        match result {
            Ok(Ok(_)) => {
                if failing {
                    tracing::info!("expiry checks reach the database again");
                }
                failing = false;
            }
            // Unreachable: deferred (see `expire_due`), said once per outage.
            Ok(Err(e)) if db::is_unavailable(&e) => {
                if !failing {
                    tracing::warn!(error = %e, "could not confirm that sessions expired: logout deferred");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::warn!("could not confirm that sessions expired (the database did not answer): logout deferred");
                }
                failing = true;
            }
            // Any other failure (a permission, a schema that changed under us) would defer
            // for good: the sessions go by this process's record of their expiry, as they did
            // before the database was asked.
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not confirm that sessions expired: logging them out by their recorded expiry");
                for hash in hub.sessions_due(Utc::now()) {
                    hub.logout(&hash);
                }
            }
        }
    }
}

/// How long the expiry checker waits for the database to confirm an expiry.
const EXPIRY_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Ends the sessions whose expiry has passed by the hub's record of it, once the database
/// confirms it: an expiry moved meanwhile (by an operator, or by another gateway's writer while
/// this process could not hear of it) keeps the session, with its new expiry. The caller
/// defers while the database cannot be reached (a session is not logged out on a guess).
/// Returns how many sessions were logged out.
pub async fn expire_due(
    pool: &PgPool,
    hub: &Hub,
    now: chrono::DateTime<Utc>,
) -> Result<usize, sqlx::Error> {
    let due = hub.sessions_due(now);
    if due.is_empty() {
        return Ok(0);
    }
    check_sessions(pool, hub, due).await
}

/// Revoked grants `(user, tracker)`: every socket that watches one of those trackers under a live
/// session of that (sub-)user stops it and is told `disallowed`. A grant re-inserted since does not
/// count (the query checks the table), and master accounts are never affected.
async fn disallow_revoked(
    pool: &PgPool,
    hub: &Hub,
    revoked: Vec<(i64, TrackerId)>,
) -> Result<(), sqlx::Error> {
    let (users, trackers): (Vec<i64>, Vec<TrackerId>) = revoked.into_iter().unzip();
    let round = hub.revocation_round();
    restrict_batches(pool, hub, &users, round).await?;
    let mut by_session: HashMap<String, HashSet<TrackerId>> = HashMap::new();
    for (hash, tracker) in queries::sessions_losing_grants(pool, &users, &trackers).await? {
        if hub.has_session(&hash) {
            by_session.entry(hash).or_default().insert(tracker);
        }
    }
    for (hash, ids) in by_session {
        let n = hub.disallow(&hash, Arc::new(Revoked::These(ids)), round);
        tracing::info!(
            session = crate::telemetry::session_tag(&hash),
            sockets = n,
            "grants revoked: trackers disallowed"
        );
    }
    Ok(())
}

/// The batch groups of these sub-users keep only the trackers still granted.
async fn restrict_batches(
    pool: &PgPool,
    hub: &Hub,
    users: &[i64],
    round: u64,
) -> Result<(), sqlx::Error> {
    let with_groups = hub.batches.sub_users();
    let users: Vec<i64> = users
        .iter()
        .copied()
        .filter(|u| with_groups.contains(u))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    let mut granted: HashMap<i64, HashSet<TrackerId>> = HashMap::new();
    for (user, tracker) in queries::grants_of(pool, &users).await? {
        granted.entry(user).or_default().insert(tracker);
    }
    for u in users {
        hub.batches
            .restrict_to_grants(hub, u, &granted.remove(&u).unwrap_or_default(), round);
    }
    Ok(())
}

/// After a gap: every held session of a sub-user keeps only the trackers it is still granted.
async fn resync_grants(pool: &PgPool, hub: &Hub, hashes: &[String]) -> Result<(), sqlx::Error> {
    let subs: Vec<queries::SessionRow> = queries::sessions(pool, hashes)
        .await?
        .into_iter()
        .filter(|s| s.live && s.is_sub_user)
        .collect();
    if subs.is_empty() {
        return Ok(());
    }
    let users: Vec<i64> = subs.iter().map(|s| s.user_id).collect();
    let round = hub.revocation_round();
    restrict_batches(pool, hub, &users, round).await?;
    let mut granted: HashMap<i64, HashSet<TrackerId>> = HashMap::new();
    for (user, tracker) in queries::grants_of(pool, &users).await? {
        granted.entry(user).or_default().insert(tracker);
    }
    for s in subs {
        let keep = granted.get(&s.user_id).cloned().unwrap_or_default();
        hub.disallow(&s.hash, Arc::new(Revoked::AllBut(keep)), round);
    }
    Ok(())
}
