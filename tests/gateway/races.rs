//! The event processor against batch groups and re-made index entries: lifecycle changes,
//! moves between accounts and revoked grants that land while a group is filled, while an entry
//! is dropped and made again, or within one round. (Found by a code review of the batch
//! features; each test failed before its fix.)

use std::time::Duration;

use fleetgate::batch::{GroupKey, GroupKind, Scope, Target};
use fleetgate::db::queries;
use fleetgate::hub::{Hub, Outbox, Outgoing};
use fleetgate::listen::Pending;
use fleetgate::model::{Format, Lifecycle, Variant};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::common::*;

fn variant() -> Variant {
    Variant {
        format: Format::Full,
        tz: chrono_tz::UTC,
        iso: false,
    }
}

fn all_of(account_id: i64, sub_user: Option<i64>, rate_ms: u64) -> GroupKey {
    GroupKey {
        scope: Scope {
            account_id,
            sub_user,
        },
        target: Target::All,
        rate: Duration::from_millis(rate_ms),
        variant: variant(),
        kind: GroupKind::State,
    }
}

/// A dashboard (a fresh outbox, connection `conn`) joining `account`'s `all` batch at 100 ms.
async fn join_all(
    pool: &PgPool,
    hub: &std::sync::Arc<Hub>,
    account: i64,
    conn: u64,
) -> (std::sync::Arc<Outbox>, fleetgate::batch::Joined) {
    let member = hub.outbox(64);
    let joined = hub
        .batches
        .join(hub, pool, all_of(account, None, 100), conn, &member, 64)
        .await
        .unwrap();
    (member, joined)
}

/// (tracker_id, speed) of every item of every batch queued in `outbox` within `wait`.
async fn batch_items(outbox: &Outbox, wait: Duration) -> Vec<(i64, i64)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut items = Vec::new();
        if left.is_zero()
            || tokio::time::timeout(left, outbox.pop_batch(64, &mut items))
                .await
                .is_err()
        {
            return out;
        }
        for item in items {
            if let Outgoing::Frame { frame: f, .. } = item {
                let v: Value = serde_json::from_str(f.text()).unwrap();
                for i in v["data"].as_array().into_iter().flatten() {
                    out.push((
                        i["tracker_id"].as_i64().unwrap(),
                        i["state"]["gps"]["speed"].as_i64().unwrap_or(-1),
                    ));
                }
            }
        }
    }
}

/// Until the batch holding `(tracker, speed)` is queued (or [`WAIT`] has passed).
async fn until_batch_has(outbox: &Outbox, tracker: i64, speed: i64) -> Vec<(i64, i64)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while tokio::time::Instant::now() < deadline && !got.contains(&(tracker, speed)) {
        got.extend(batch_items(outbox, Duration::from_millis(200)).await);
    }
    got
}

/// Asserts that the group `joined` no longer holds 101, and that a new state of 101 reaches no
/// batch of its `member`.
async fn no_longer_carries_101(
    pool: &PgPool,
    hub: &std::sync::Arc<Hub>,
    member: &Outbox,
    joined: &fleetgate::batch::Joined,
) {
    assert!(!joined.group.tracker_ids().contains(&101), "moved away");
    batch_items(member, Duration::from_millis(300)).await;
    new_speed(pool, hub, 101, 77).await;
    let got = batch_items(member, Duration::from_millis(500)).await;
    assert!(!got.iter().any(|(id, _)| *id == 101), "{got:?}");
}

/// Subscribes `conn` (with a fresh outbox) to 101 under acme's session, as a socket does:
/// registered in the hub, then 101 read and its facts observed.
async fn acme_subscriber(pool: &PgPool, hub: &Hub, conn: u64) -> std::sync::Arc<Outbox> {
    subscriber(pool, hub, conn, ACME).await
}

/// [`acme_subscriber`] under the session `hash`.
async fn subscriber(pool: &PgPool, hub: &Hub, conn: u64, hash: &str) -> std::sync::Arc<Outbox> {
    let outbox = hub.outbox(64);
    hub.subscribe(conn, &outbox, &[101], variant());
    let session = queries::session(pool, hash).await.unwrap().unwrap();
    for (id, _, facts) in fleetgate::access::statuses(pool, &session, &[101])
        .await
        .unwrap()
    {
        hub.observe_for(conn, id, facts.unwrap());
    }
    outbox
}

async fn change_of(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Blocks or unblocks 101; returns the change number.
async fn block_101(pool: &PgPool, blocked: bool) -> i64 {
    sqlx::query_scalar("UPDATE trackers SET blocked = $1 WHERE id = 101 RETURNING change_no")
        .bind(blocked)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Moves 101 into `account`; returns the move's change number.
async fn move_101(pool: &PgPool, account: i64) -> i64 {
    sqlx::query_scalar("UPDATE trackers SET account_id = $1 WHERE id = 101 RETURNING change_no")
        .bind(account)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn round(pool: &PgPool, hub: &std::sync::Arc<Hub>, payloads: &[String]) {
    let mut p = Pending::default();
    for payload in payloads {
        p.add_payload(payload, hub);
    }
    fleetgate::listen::process(pool, hub, p, None)
        .await
        .unwrap();
}

async fn new_speed(pool: &PgPool, hub: &std::sync::Arc<Hub>, tracker: i64, speed: i32) {
    sqlx::query("UPDATE tracker_states SET speed = $2 WHERE tracker_id = $1")
        .bind(tracker)
        .bind(speed)
        .execute(pool)
        .await
        .unwrap();
    round(pool, hub, &[format!("s|{tracker}")]).await;
}

/// A block kept for the next round while 101 was watched, processed after its last watcher
/// left and a batch group watched it again having read it unblocked (the unblock came while
/// nobody watched it, so the listener dropped it): the stale block used to close the hub's gate
/// on 101's states for every watcher until its next lifecycle change.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_stale_block_for_a_remade_entry_does_not_hold_back_states(pool: PgPool) {
    let hub = Hub::new();
    let socket = hub.outbox(64);
    hub.subscribe(1, &socket, &[101], variant());
    let blocked = block_101(&pool, true).await;
    let mut stale = Pending::default();
    assert!(stale.add_payload(&format!("t|{blocked}:101:block"), &hub));
    hub.unsubscribe(1, &[101]);
    let unblocked = block_101(&pool, false).await;
    let mut dropped = Pending::default();
    dropped.add_payload(&format!("t|{unblocked}:101:unblock"), &hub);
    assert!(dropped.lifecycle.is_empty(), "nobody watches 101");

    let (member, joined) = join_all(&pool, &hub, 1, 2).await;
    assert!(joined.statuses.as_str().contains("\"101\":\"normal\""));
    fleetgate::listen::process(&pool, &hub, stale, None)
        .await
        .unwrap();
    new_speed(&pool, &hub, 101, 77).await;
    let got = until_batch_has(&member, 101, 77).await;
    assert!(got.contains(&(101, 77)), "{got:?}");
}

/// Removed and restored between two rounds: the round's `corrupt` makes the account's `all`
/// group forget 101, and the restore's `n|` must bring it back (the target used to be read
/// before the `corrupt` was applied, while the group still held 101, and added nothing).
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_tracker_removed_and_restored_within_a_round_stays_in_the_all_batch(pool: PgPool) {
    let hub = Hub::new();
    let (member, joined) = join_all(&pool, &hub, 1, 1).await;
    assert!(joined.group.tracker_ids().contains(&101));
    let removed = change_of(
        &pool,
        "UPDATE trackers SET removed = true WHERE id = 101 RETURNING change_no",
    )
    .await;
    sqlx::query("UPDATE trackers SET removed = false WHERE id = 101")
        .execute(&pool)
        .await
        .unwrap();
    round(
        &pool,
        &hub,
        &[format!("t|{removed}:101:corrupt"), "n|1".to_string()],
    )
    .await;
    assert!(joined.group.tracker_ids().contains(&101));
    new_speed(&pool, &hub, 101, 77).await;
    let got = until_batch_has(&member, 101, 77).await;
    assert!(got.contains(&(101, 77)), "{got:?}");
}

/// 101 moves into the rival account (its `all` group admits it), then back to acme while the
/// LISTEN stream is down: the resync must take it out of the rival's batch. The hub used to
/// forget 101's account at the first move's `corrupt`, so the resync could not tell it moved.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_tracker_moved_back_during_a_gap_leaves_the_other_accounts_batch(pool: PgPool) {
    let hub = Hub::new();
    let _acme = acme_subscriber(&pool, &hub, 1).await;
    let (rival, joined) = join_all(&pool, &hub, 3, 2).await;
    let moved = move_101(&pool, 3).await;
    round(
        &pool,
        &hub,
        &[format!("t|{moved}:101:corrupt"), "n|3".to_string()],
    )
    .await;
    assert!(joined.group.tracker_ids().contains(&101), "moved in");
    // The acme socket takes its `corrupt` and leaves, as a socket does.
    hub.unsubscribe(1, &[101]);

    // Back to acme while the stream is down (no notification), then the resync.
    move_101(&pool, 1).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    no_longer_carries_101(&pool, &hub, &rival, &joined).await;
}

/// 101 moves into the rival account and a rival socket subscribes to it before the move's
/// `corrupt` is processed; then 101 moves back to acme while the LISTEN stream is down. The
/// resync must tell the rival socket `corrupt`. The hub used to forget 101's account at the
/// first `corrupt` (the rival's read came before it), so the resync could not tell it moved,
/// and the rival socket kept getting acme's tracker.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_tracker_moved_back_during_a_gap_leaves_a_socket_that_read_it_moved(pool: PgPool) {
    let hub = Hub::new();
    let _acme = acme_subscriber(&pool, &hub, 1).await;
    let moved = move_101(&pool, 3).await;
    let rival = subscriber(&pool, &hub, 2, RIVAL).await;
    round(&pool, &hub, &[format!("t|{moved}:101:corrupt")]).await;
    // The acme socket takes its `corrupt` and leaves; the rival socket drops it (its own read
    // is as new), as sockets do.
    hub.unsubscribe(1, &[101]);
    assert_eq!(lifecycle_kinds(&rival, 101).await, [Lifecycle::Corrupt]);

    // Back to acme while the stream is down (no notification), then the resync.
    move_101(&pool, 1).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    assert_eq!(lifecycle_kinds(&rival, 101).await, [Lifecycle::Corrupt]);
}

/// 101 moves into the rival account and a rival socket reads it there, then the stream goes
/// down before the move's `corrupt` is processed, and 101 moves back to acme. The resync must
/// tell the rival socket `corrupt`: the hub used to compare the database with the acme account
/// alone, saw no move, and the rival socket kept getting acme's tracker. The acme socket is
/// told nothing: for it the move and its return fold into where things stand, as a block and
/// its unblock do (PROTOCOL.md §5), and 101 is still its to see.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_move_and_its_return_both_lost_still_reach_the_socket_that_read_it_moved(pool: PgPool) {
    let hub = Hub::new();
    let acme = acme_subscriber(&pool, &hub, 1).await;
    move_101(&pool, 3).await;
    let rival = subscriber(&pool, &hub, 2, RIVAL).await;
    // The stream goes down: neither move's notification is processed.
    move_101(&pool, 1).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    assert_eq!(lifecycle_kinds(&rival, 101).await, [Lifecycle::Corrupt]);
    assert_eq!(steps_of(&acme, 101).await, ["state"]);
}

/// Every grant of sub-user 2 revoked while its `all` group is being filled (the first chunks
/// admitted and waiting on their states, the last one not yet read): the group must end with
/// none of them. The revocation used to reach only the trackers already admitted.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn grants_revoked_while_a_sub_users_group_fills_are_all_taken_away(pool: PgPool) {
    sqlx::raw_sql(
        "INSERT INTO trackers (id, account_id, source_id, label) \
           SELECT i, 1, 100000 + i, 'Van ' || i FROM generate_series(1000, 31099) i; \
         INSERT INTO tracker_states (tracker_id, speed) \
           SELECT i, 10 FROM generate_series(1000, 31099) i; \
         INSERT INTO tracker_grants (user_id, tracker_id) \
           SELECT 2, i FROM generate_series(1000, 31099) i;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let hub = Hub::new();
    // Holds the fill's reads of states (not those of the target or of the facts).
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tracker_states IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let outbox = hub.outbox(64);
    let join = {
        let (hub, pool, outbox) = (hub.clone(), pool.clone(), outbox.clone());
        tokio::spawn(async move {
            hub.batches
                .join(&hub, &pool, all_of(1, Some(2), 1000), 1, &outbox, 64)
                .await
        })
    };
    until_a_query_waits_for_a_lock(&pool).await;

    sqlx::query("DELETE FROM tracker_grants WHERE user_id = 2")
        .execute(&pool)
        .await
        .unwrap();
    let mut p = Pending::default();
    for id in [101, 102].into_iter().chain(1000..31100) {
        p.revoked_grants.push((2, id));
    }
    fleetgate::listen::process(&pool, &hub, p, None)
        .await
        .unwrap();
    lock.rollback().await.unwrap();

    let joined = join.await.unwrap().unwrap();
    let kept = joined.group.tracker_ids();
    let first: usize = joined
        .first_batch
        .iter()
        .map(|f| f.text().matches("\"tracker_id\"").count())
        .sum();
    assert!(
        kept.is_empty() && first == 0,
        "no grant left, yet the group holds {} trackers (e.g. {:?}); first batch {first} items",
        kept.len(),
        kept.iter().take(3).collect::<Vec<_>>(),
    );
}

/// A batch that acme's readings group queued for a socket after acme's `logout` was queued to
/// it (the socket busy meanwhile) used to be written after the `logout`, since the socket also
/// held a batch of another session: it dropped group items only when it held no batch at all.
#[tokio::test]
async fn no_batch_of_an_ended_session_follows_its_logout() {
    let app = spawn_app().await;
    app.exec(
        "INSERT INTO sensors (id, tracker_id, kind, name, label, type, units) VALUES \
           (1, 101, 'input', 'fuel_1', 'Tank 1', 'fuel', 'l'); \
         INSERT INTO sensor_values (tracker_id, sensor_id, value, update_time) VALUES \
           (101, 1, 42.5, '2025-01-01 10:00:00+00');",
    )
    .await;
    let readings =
        json!({"type": "readings_batch", "target": {"type": "all"}, "rate_limit": "100ms"});
    let mut c = app.connect().await;
    c.send(json!({"action": "subscribe", "hash": RIVAL, "requests": [
        {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "1s"}]}))
        .await;
    assert_eq!(c.recv().await["type"], "response");
    assert_eq!(c.recv().await["event"], "state_batch");
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [readings.clone()]}))
        .await;
    assert_eq!(c.recv().await["type"], "response");
    assert_eq!(c.recv().await["event"], "readings_batch");
    // Another member of acme's readings group, under acme's other session (which goes on).
    let mut witness = app.connect().await;
    witness
        .send(json!({"action": "subscribe", "hash": ACME2, "requests": [readings]}))
        .await;
    assert_eq!(witness.recv().await["type"], "response");
    assert_eq!(witness.recv().await["event"], "readings_batch");

    // The socket busy in a subscribe whose group's fill waits on a lock.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tracker_states IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    c.send(json!({"action": "subscribe", "hash": RIVAL, "requests": [
        {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "300ms"}]}))
        .await;
    until_a_query_waits_for_a_lock(&app.pool).await;
    // acme's session ends (its `logout` is queued), then a reading changes: the group's next
    // batch, which the witness gets, is queued for the busy socket too.
    app.exec(&format!(
        "UPDATE sessions SET revoked_at = now() WHERE hash = '{ACME}'"
    ))
    .await;
    app.until("acme's logout", || !app.hub.has_session(ACME))
        .await;
    app.exec("UPDATE sensor_values SET value = 50 WHERE sensor_id = 1")
        .await;
    witness
        .recv_until(|v| v["event"] == "readings_batch" && v.to_string().contains("50"))
        .await;
    lock.rollback().await.unwrap();

    let (_, before) = c.recv_until(|v| v["event"] == "logout").await;
    // After the logout: rival batches, nothing of acme's. A rival batch with a change made now
    // is queued after anything queued before the logout was handled.
    app.set_speed(&[201], 66).await;
    let (_, after) = c
        .recv_until(|v| {
            v["event"] == "state_batch"
                && v["data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|i| i["tracker_id"] == 201 && i["state"]["gps"]["speed"] == 66)
        })
        .await;
    let after: Vec<&Value> = after
        .iter()
        .filter(|v| v["event"] != "state_batch")
        .collect();
    assert!(
        after.iter().all(|v| v["type"] == "response"),
        "after the logout: {after:?} (before it: {} messages)",
        before.len()
    );
}

/// The state and lifecycle items queued in `outbox` for `tracker` (within 200 ms of quiet).
async fn queued_for(outbox: &Outbox, tracker: i64) -> Vec<Outgoing> {
    let items = queued(outbox).await;
    items
        .into_iter()
        .filter(|item| match item {
            Outgoing::State { tracker: t, .. } | Outgoing::Lifecycle { tracker: t, .. } => {
                *t == tracker
            }
            _ => false,
        })
        .collect()
}

/// Everything queued in `outbox` until nothing more comes for 200 ms.
async fn queued(outbox: &Outbox) -> Vec<Outgoing> {
    let mut out = Vec::new();
    loop {
        let mut items = Vec::new();
        if tokio::time::timeout(Duration::from_millis(200), outbox.pop_batch(64, &mut items))
            .await
            .is_err()
        {
            return out;
        }
        out.extend(items);
    }
}

/// The lifecycle events queued in `outbox` for `tracker`, with their change numbers.
async fn lifecycle_changes(outbox: &Outbox, tracker: i64) -> Vec<(i64, Lifecycle)> {
    queued_for(outbox, tracker)
        .await
        .into_iter()
        .filter_map(|item| match item {
            Outgoing::Lifecycle { change, kind, .. } => Some((change, kind)),
            _ => None,
        })
        .collect()
}

/// The lifecycle events queued in `outbox` for `tracker` with a change number above `change`
/// (those a socket that read the tracker at `change` takes).
async fn lifecycle_after(outbox: &Outbox, tracker: i64, change: i64) -> Vec<(i64, Lifecycle)> {
    let changes = lifecycle_changes(outbox, tracker).await;
    changes.into_iter().filter(|&(c, _)| c > change).collect()
}

/// The lifecycle events queued in `outbox` for `tracker`.
async fn lifecycle_kinds(outbox: &Outbox, tracker: i64) -> Vec<Lifecycle> {
    let changes = lifecycle_changes(outbox, tracker).await;
    changes.into_iter().map(|(_, kind)| kind).collect()
}

/// A socket told of a block carried into a resync, whose unblock was lost with the stream
/// while a newer socket read the tracker unblocked: the resync still tells it `unblock`. (The
/// hub's gate on states follows the newer read; what the old socket was told is kept apart,
/// and the resync compares the database with that.)
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_resync_unblocks_a_socket_told_a_block_that_a_newer_read_has_passed(pool: PgPool) {
    let hub = Hub::new();
    let old = acme_subscriber(&pool, &hub, 1).await;
    let blocked = block_101(&pool, true).await;
    let mut carried = Pending::default();
    assert!(carried.add_payload(&format!("t|{blocked}:101:block"), &hub));
    // The stream goes down: the unblock's notification is lost. A new socket reads 101.
    sqlx::query("UPDATE trackers SET blocked = false WHERE id = 101")
        .execute(&pool)
        .await
        .unwrap();
    let _new = acme_subscriber(&pool, &hub, 2).await;
    fleetgate::listen::resync_with(&pool, &hub, &mut carried)
        .await
        .unwrap();
    let kinds = lifecycle_kinds(&old, 101).await;
    assert_eq!(kinds, [Lifecycle::Block, Lifecycle::Unblock]);
}

/// What `outbox` holds for `tracker`: `state`, or the lifecycle kind.
async fn steps_of(outbox: &Outbox, tracker: i64) -> Vec<&'static str> {
    let items = queued_for(outbox, tracker).await;
    items
        .into_iter()
        .map(|item| match item {
            Outgoing::Lifecycle { kind, .. } => kind.as_str(),
            _ => "state",
        })
        .collect()
}

/// While the stream is down, 101 moves to the rival account, where a rival socket reads it,
/// then back to acme, where another acme socket reads it. The resync must tell the rival
/// socket `corrupt`: the hub used to keep two accounts per tracker (the published one and the
/// newest read's), the second acme read replaced the rival one, and the rival socket kept
/// getting acme's tracker.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_socket_that_read_a_tracker_in_another_account_during_a_gap_is_told_corrupt(
    pool: PgPool,
) {
    let hub = Hub::new();
    let _first = acme_subscriber(&pool, &hub, 1).await;
    move_101(&pool, 3).await;
    let rival = subscriber(&pool, &hub, 2, RIVAL).await;
    move_101(&pool, 1).await;
    let _last = acme_subscriber(&pool, &hub, 3).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    assert_eq!(lifecycle_kinds(&rival, 101).await, [Lifecycle::Corrupt]);
}

/// While the stream is down, 101 is blocked and a socket reads it so (`blocked`), then
/// unblocked and another socket reads it so. The resync must tell the first of them
/// `unblock`: the hub compared the database with the published lifecycle and the newest
/// read's only, both unblocked, and that socket never got 101 again.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_socket_told_blocked_during_a_gap_is_told_the_unblock_a_newer_read_saw(pool: PgPool) {
    let hub = Hub::new();
    let _first = acme_subscriber(&pool, &hub, 1).await;
    block_101(&pool, true).await;
    let told_blocked = acme_subscriber(&pool, &hub, 2).await;
    block_101(&pool, false).await;
    let _last = acme_subscriber(&pool, &hub, 3).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    let steps = steps_of(&told_blocked, 101).await;
    assert_eq!(steps.first(), Some(&"unblock"), "{steps:?}");
    assert!(
        steps.contains(&"state"),
        "the current state follows: {steps:?}"
    );
}

/// A resync publishes a carried unblock, then fails before it sends the states; the next
/// resync finds nothing changed. It must still send 101's current state after the unblock,
/// as the protocol promises: the set of trackers to send again went with the failed resync.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn an_unblock_from_a_failed_resync_still_brings_the_state(pool: PgPool) {
    let hub = Hub::new();
    let outbox = acme_subscriber(&pool, &hub, 1).await;
    new_speed(&pool, &hub, 101, 33).await;
    let blocked = block_101(&pool, true).await;
    round(&pool, &hub, &[format!("t|{blocked}:101:block")]).await;
    assert_eq!(steps_of(&outbox, 101).await, ["state", "block"]);

    let unblocked = block_101(&pool, false).await;
    let mut carried = Pending::default();
    assert!(carried.add_payload(&format!("t|{unblocked}:101:unblock"), &hub));
    let closed = PgPool::connect_lazy_with((*pool.connect_options()).clone());
    closed.close().await;
    fleetgate::listen::resync_with(&closed, &hub, &mut carried)
        .await
        .expect_err("a closed pool fails the resync");
    assert_eq!(steps_of(&outbox, 101).await, ["unblock"]);
    fleetgate::listen::resync_with(&pool, &hub, &mut carried)
        .await
        .unwrap();
    assert_eq!(steps_of(&outbox, 101).await, ["state"]);
}

/// 101 moves from acme to rival; the move's `corrupt` is published but still waits in the acme
/// socket's outbox (a slow socket: it has not left the index yet). A rival socket reads 101 in
/// rival, then 101 is blocked there, a change that comes as a range (an overflow payload). The
/// rival socket must get `block`: the acme socket's account, still counted, made it `corrupt`,
/// and the rival socket dropped a tracker it may see. (Found in review.)
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_range_after_a_published_move_does_not_corrupt_the_new_accounts_socket(pool: PgPool) {
    let hub = Hub::new();
    let _slow_acme = acme_subscriber(&pool, &hub, 1).await;
    let moved = move_101(&pool, 3).await;
    round(&pool, &hub, &[format!("t|{moved}:101:corrupt")]).await;
    let rival = subscriber(&pool, &hub, 2, RIVAL).await;
    let blocked = block_101(&pool, true).await;
    round(&pool, &hub, &[format!("T|{blocked}|{blocked}")]).await;
    assert_eq!(lifecycle_kinds(&rival, 101).await, [Lifecycle::Block]);
}

/// The same through a resync: the move's `corrupt` is carried from a failed round, the block
/// is lost with the stream.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_resync_after_a_carried_move_does_not_corrupt_the_new_accounts_socket(pool: PgPool) {
    let hub = Hub::new();
    let _slow_acme = acme_subscriber(&pool, &hub, 1).await;
    let moved = move_101(&pool, 3).await;
    let mut carried = Pending::default();
    assert!(carried.add_payload(&format!("t|{moved}:101:corrupt"), &hub));
    let rival = subscriber(&pool, &hub, 2, RIVAL).await;
    block_101(&pool, true).await;
    fleetgate::listen::resync_with(&pool, &hub, &mut carried)
        .await
        .unwrap();
    // The rival socket read the move: it drops the move's `corrupt` by its change number.
    let after = lifecycle_after(&rival, 101, moved).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].1, Lifecycle::Block);
}

/// The batch-group side of `a_socket_that_read_a_tracker_in_another_account_during_a_gap_is_told_corrupt`:
/// while the stream is down, 101 moves to rival, where a rival `all` batch admits it, then back
/// to acme, where a socket reads it. The resync must take 101 out of the rival batch: the
/// groups' accounts were not compared with the database, and the rival dashboard kept getting
/// acme's tracker. (Found by a second campaign.)
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_batch_that_admitted_a_tracker_in_another_account_during_a_gap_lets_it_go(pool: PgPool) {
    let hub = Hub::new();
    let _first = acme_subscriber(&pool, &hub, 1).await;
    move_101(&pool, 3).await;
    let (rival, joined) = join_all(&pool, &hub, 3, 2).await;
    assert!(
        joined.group.tracker_ids().contains(&101),
        "admitted in rival"
    );
    move_101(&pool, 1).await;
    let _last = acme_subscriber(&pool, &hub, 3).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    no_longer_carries_101(&pool, &hub, &rival, &joined).await;
}

/// The batch-group side of `a_socket_told_blocked_during_a_gap_is_told_the_unblock_a_newer_read_saw`:
/// while the stream is down, 101 is blocked, an acme `all` batch admits it blocked, 101 is
/// unblocked and a socket reads it so. After the resync the batch must carry 101 again.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_batch_that_admitted_a_tracker_blocked_during_a_gap_gets_its_unblock(pool: PgPool) {
    let hub = Hub::new();
    let _first = acme_subscriber(&pool, &hub, 1).await;
    block_101(&pool, true).await;
    let (member, _joined) = join_all(&pool, &hub, 1, 2).await;
    block_101(&pool, false).await;
    let _last = acme_subscriber(&pool, &hub, 3).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    new_speed(&pool, &hub, 101, 79).await;
    let got = until_batch_has(&member, 101, 79).await;
    assert!(got.contains(&(101, 79)), "{got:?}");
}

/// While the stream is down, 101 moves to rival, where a rival socket reads it, and is then
/// blocked there. The resync must tell the acme socket `corrupt` and the rival socket `block`:
/// one event for every subscriber, chosen by the account it was admitted under, made it
/// `corrupt` for both, and the rival dashboard dropped a tracker it may see.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_resync_tells_each_account_its_own_event_for_a_tracker_moved_and_blocked(pool: PgPool) {
    let hub = Hub::new();
    let acme = acme_subscriber(&pool, &hub, 1).await;
    move_101(&pool, 3).await;
    let rival = subscriber(&pool, &hub, 2, RIVAL).await;
    block_101(&pool, true).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    assert_eq!(lifecycle_kinds(&acme, 101).await, [Lifecycle::Corrupt]);
    assert_eq!(lifecycle_kinds(&rival, 101).await, [Lifecycle::Block]);
}

/// While the stream is down, 101 moves to rival and back to acme, and an acme socket reads it
/// after its return. The resync must tell that socket nothing (it read what is true), where it
/// used to get the `corrupt` meant for the rival socket and drop 101.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_socket_that_read_a_tracker_back_in_its_account_is_not_told_corrupt(pool: PgPool) {
    let hub = Hub::new();
    let _first = acme_subscriber(&pool, &hub, 1).await;
    move_101(&pool, 3).await;
    let rival = subscriber(&pool, &hub, 2, RIVAL).await;
    move_101(&pool, 1).await;
    let last = acme_subscriber(&pool, &hub, 3).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    assert_eq!(lifecycle_kinds(&rival, 101).await, [Lifecycle::Corrupt]);
    let steps = steps_of(&last, 101).await;
    assert!(!steps.contains(&"corrupt"), "{steps:?}");
}

/// The batch-group side of the two above: while the stream is down, 101 moves to rival, where
/// a rival `all` batch admits it, and is blocked there. The batch must keep 101 (blocked, and
/// carrying it again once unblocked), where the `corrupt` meant for the acme socket took it out.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_batch_that_admitted_a_tracker_moved_into_its_account_keeps_it_through_a_block(
    pool: PgPool,
) {
    let hub = Hub::new();
    let acme = acme_subscriber(&pool, &hub, 1).await;
    move_101(&pool, 3).await;
    let (rival, joined) = join_all(&pool, &hub, 3, 2).await;
    assert!(joined.group.tracker_ids().contains(&101), "admitted");
    block_101(&pool, true).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    assert_eq!(lifecycle_kinds(&acme, 101).await, [Lifecycle::Corrupt]);
    // (The resync reads every `all` target again, which would bring 101 back after a
    // `corrupt`: the dashboard must not have been told one.)
    let told: Vec<String> = queued(&rival)
        .await
        .into_iter()
        .filter_map(|item| match item {
            Outgoing::GroupLifecycle {
                tracker: 101,
                frame,
                ..
            } => Some(frame.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].contains(r#""lifecycle_event":"block""#), "{told:?}");
    assert!(joined.group.tracker_ids().contains(&101), "kept");
    let unblocked = block_101(&pool, false).await;
    round(&pool, &hub, &[format!("t|{unblocked}:101:unblock")]).await;
    new_speed(&pool, &hub, 101, 81).await;
    let got = until_batch_has(&rival, 101, 81).await;
    assert!(got.contains(&(101, 81)), "{got:?}");
}

/// While the stream is down, 101 is blocked and a socket reads it so; a third socket's
/// subscribe reads it blocked too, but that read is still on its way (not yet recorded in the
/// hub) when 101 is unblocked, a fourth socket reads it unblocked and the resync runs. The
/// third socket then sets its watch `blocked` from its read: the resync must have queued it the
/// `unblock`, newer than that read, or it never gets 101's states again. (Found in review.)
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_subscribe_read_in_flight_during_a_resync_gets_the_unblock_it_has_not_seen(pool: PgPool) {
    let hub = Hub::new();
    let _first = acme_subscriber(&pool, &hub, 1).await;
    block_101(&pool, true).await;
    let _told_blocked = acme_subscriber(&pool, &hub, 2).await;
    // Socket 3 subscribes: registered, then its read (which sees the block) is on its way.
    let in_flight = hub.outbox(64);
    hub.subscribe(3, &in_flight, &[101], variant());
    let facts = read_blocked_101(&pool).await;
    let unblocked = block_101(&pool, false).await;
    let _last = acme_subscriber(&pool, &hub, 4).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    // Its read arrives: the socket's watch is `blocked` as of that read.
    hub.observe_for(3, 101, facts);
    let after = lifecycle_after(&in_flight, 101, facts.change_no).await;
    assert_eq!(after, [(unblocked, Lifecycle::Unblock)]);
}

/// The same for a socket that already watches 101 and subscribes to it again (a dashboard
/// sending its whole list): its second read sees the block while the stream is down, and the
/// unblock and the resync come before that read is recorded. (Found in review.)
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_second_subscribe_read_in_flight_during_a_resync_gets_the_unblock(pool: PgPool) {
    let hub = Hub::new();
    let again = acme_subscriber(&pool, &hub, 1).await;
    block_101(&pool, true).await;
    let _told_blocked = acme_subscriber(&pool, &hub, 2).await;
    hub.subscribe(1, &again, &[101], variant());
    let facts = read_blocked_101(&pool).await;
    let unblocked = block_101(&pool, false).await;
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    hub.observe_for(1, 101, facts);
    let after = lifecycle_after(&again, 101, facts.change_no).await;
    assert_eq!(after, [(unblocked, Lifecycle::Unblock)]);
}

/// A subscribe's read of 101 under acme's session, which finds it blocked.
async fn read_blocked_101(pool: &PgPool) -> fleetgate::hub::TrackerFacts {
    let session = queries::session(pool, ACME).await.unwrap().unwrap();
    let read = fleetgate::access::statuses(pool, &session, &[101])
        .await
        .unwrap();
    let (_, status, facts) = read[0];
    assert_eq!(status, "blocked");
    facts.unwrap()
}

/// 101 moves to rival while the stream is down (its `corrupt` is lost); the stream is back and,
/// before the resync reads, 101 is blocked in rival, a notification the resync carries. The
/// acme socket must be told `corrupt`: it was told the trigger's `block` (a kind that speaks
/// of rival's viewers), the comparison then found nothing newer than that block, and rival's
/// next `unblock` reopened rival's tracker to the acme socket. (Found in review.)
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_carried_block_after_a_lost_move_is_corrupt_for_the_old_accounts_socket(pool: PgPool) {
    let hub = Hub::new();
    let acme = acme_subscriber(&pool, &hub, 1).await;
    move_101(&pool, 3).await;
    let blocked = block_101(&pool, true).await;
    let mut carried = Pending::default();
    assert!(carried.add_payload(&format!("t|{blocked}:101:block"), &hub));
    fleetgate::listen::resync_with(&pool, &hub, &mut carried)
        .await
        .unwrap();
    assert_eq!(lifecycle_kinds(&acme, 101).await, [Lifecycle::Corrupt]);
}
