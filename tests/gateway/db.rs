//! The data layer: every query a subscribe or the processor runs, the NOTIFY triggers (one
//! payload per statement, the range and chunked forms for big statements, the session-ending
//! cascades), and the parsing of those payloads by the LISTEN side ([`Pending::add_payload`]).
//! Each test gets its own migrated database loaded with `tests/fixtures/fleet.sql`.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use fleetgate::batch::{GroupKey, GroupKind, Scope, Target};
use fleetgate::db::queries;
use fleetgate::hub::{Hub, Outgoing, TrackerFacts};
use fleetgate::listen::{Pending, CHANNEL};
use fleetgate::model::{Format, Lifecycle, Variant};
use sqlx::postgres::PgListener;
use sqlx::PgPool;

use crate::common::*;

/// Waits for the next notification on the listener's channel and returns its payload.
async fn next_payload(l: &mut PgListener) -> String {
    let n = tokio::time::timeout(WAIT, l.try_recv())
        .await
        .expect("a notification in time")
        .expect("the listener works")
        .expect("the LISTEN connection was not lost");
    assert_eq!(n.channel(), CHANNEL);
    n.payload().to_owned()
}

/// Sends a marker notification and returns every payload that arrived before it. Notifications
/// from one session arrive in commit order, so these are exactly what the statements before the
/// marker sent: none can still be on its way.
async fn payloads_until_marker(pool: &PgPool, l: &mut PgListener) -> Vec<String> {
    let marker = format!("marker|{}", uuid::Uuid::new_v4().simple());
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(&marker)
        .execute(pool)
        .await
        .expect("send the marker");
    let mut before = Vec::new();
    loop {
        let p = next_payload(l).await;
        if p == marker {
            return before;
        }
        before.push(p);
    }
}

async fn listener(pool: &PgPool) -> PgListener {
    let mut l = PgListener::connect_with(pool)
        .await
        .expect("LISTEN connection");
    l.listen(CHANNEL).await.expect("LISTEN");
    l
}

/// The body of a `<kind>|<body>` payload, asserting the kind.
#[track_caller]
fn body<'a>(payload: &'a str, kind: &str) -> &'a str {
    let (k, body) = payload
        .split_once('|')
        .unwrap_or_else(|| panic!("no kind: {payload:?}"));
    assert_eq!(k, kind, "{payload:?}");
    body
}

fn ids_of(body: &str) -> BTreeSet<i64> {
    body.split(',')
        .map(|s| s.parse().unwrap_or_else(|_| panic!("not an id: {s:?}")))
        .collect()
}

fn hashes_of(body: &str) -> BTreeSet<String> {
    body.split(',').map(str::to_owned).collect()
}

/// `<change>:<id>:<event>` items of a `t|` payload.
fn lifecycle_items(body: &str) -> Vec<(i64, i64, String)> {
    body.split(',')
        .map(|item| {
            let parts: Vec<&str> = item.split(':').collect();
            assert_eq!(parts.len(), 3, "{item:?}");
            (
                parts[0].parse().unwrap(),
                parts[1].parse().unwrap(),
                parts[2].to_owned(),
            )
        })
        .collect()
}

#[track_caller]
fn range_of(payload: &str, kind: &str) -> (i64, i64) {
    let body = body(payload, kind);
    let (lo, hi) = body
        .split_once('|')
        .unwrap_or_else(|| panic!("not a range: {payload:?}"));
    (lo.parse().unwrap(), hi.parse().unwrap())
}

fn set(hashes: &[&str]) -> BTreeSet<String> {
    hashes.iter().map(|h| (*h).to_owned()).collect()
}

fn variant() -> Variant {
    Variant {
        format: Format::Full,
        tz: chrono_tz::UTC,
        iso: false,
    }
}

async fn revoked_at(pool: &PgPool, hash: &str) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT revoked_at FROM sessions WHERE hash = $1")
        .bind(hash)
        .fetch_one(pool)
        .await
        .unwrap()
}

// --- queries -------------------------------------------------------------------------------------

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn session_rows_tell_user_account_zone_and_liveness(pool: PgPool) {
    let acme = queries::session(&pool, ACME).await.unwrap().expect("acme");
    assert_eq!(acme.hash, ACME);
    assert_eq!(acme.user_id, 1);
    assert_eq!(acme.account_id, 1);
    assert!(!acme.is_sub_user);
    assert_eq!(acme.time_zone, "Europe/Berlin");
    assert!(acme.live);
    assert!(acme.expires_at > Utc::now());

    let sub = queries::session(&pool, SUB).await.unwrap().expect("sub");
    assert_eq!(sub.user_id, 2);
    assert_eq!(sub.account_id, 1, "a sub-user's account is its master's");
    assert!(sub.is_sub_user);
    assert!(sub.live);

    let rival = queries::session(&pool, RIVAL)
        .await
        .unwrap()
        .expect("rival");
    assert_eq!((rival.user_id, rival.account_id), (3, 3));
    assert_eq!(rival.time_zone, "UTC");
    assert!(rival.live);

    let expired = queries::session(&pool, EXPIRED)
        .await
        .unwrap()
        .expect("row");
    assert_eq!(expired.user_id, 1);
    assert!(!expired.live, "expired");
    assert!(expired.expires_at < Utc::now());

    let revoked = queries::session(&pool, REVOKED)
        .await
        .unwrap()
        .expect("row");
    assert_eq!(revoked.user_id, 1);
    assert!(!revoked.live, "revoked");

    assert!(queries::session(&pool, "0123456789abcdef0123456789abcdef")
        .await
        .unwrap()
        .is_none());

    // The batch form returns the rows that exist, live or not.
    let hashes: Vec<String> = [ACME, EXPIRED, "0123456789abcdef0123456789abcdef"]
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
    let mut rows = queries::sessions(&pool, &hashes).await.unwrap();
    rows.sort_by(|a, b| a.hash.cmp(&b.hash));
    let got: Vec<(&str, bool)> = rows.iter().map(|r| (r.hash.as_str(), r.live)).collect();
    assert_eq!(got, [(ACME, true), (EXPIRED, false)]);

    // A master removed without the trigger path (flag set, sessions untouched): the sub-user's
    // session is not live either, through the join on its master.
    sqlx::query("ALTER TABLE users DISABLE TRIGGER users_end_sessions")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE users SET removed = true WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let sub = queries::session(&pool, SUB).await.unwrap().expect("sub");
    assert!(revoked_at(&pool, SUB).await.is_none());
    assert!(!sub.live, "a removed master ends its sub-users' sessions");
    assert!(queries::session(&pool, RIVAL).await.unwrap().unwrap().live);
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn tracker_access_answers_every_requested_tracker_in_one_call(pool: PgPool) {
    let ids = [101, 105, 106, 201, 999];
    for (user, granted_101) in [(1_i64, false), (2, true)] {
        let rows = queries::tracker_access(&pool, user, &ids).await.unwrap();
        let mut found: Vec<i64> = rows.iter().map(|r| r.id).collect();
        found.sort_unstable();
        assert_eq!(
            found,
            [101, 105, 106, 201],
            "a row per requested tracker that exists"
        );
        let row = |id: i64| rows.iter().find(|r| r.id == id).expect("row for id");

        let r = row(101);
        assert_eq!(r.source_id, Some(10101));
        assert_eq!(r.account_id, Some(1));
        assert_eq!((r.blocked, r.removed), (Some(false), Some(false)));
        assert_eq!(r.granted, granted_101, "user {user}");
        assert!(r.change_no.unwrap() > 0, "stamped on insert");

        let r = row(105);
        assert_eq!(r.source_id, Some(10105));
        assert_eq!((r.blocked, r.removed), (Some(true), Some(false)));
        assert!(!r.granted);

        let r = row(106);
        assert_eq!(r.source_id, Some(10106));
        assert_eq!((r.blocked, r.removed), (Some(false), Some(true)));
        assert!(!r.granted);

        let r = row(201);
        assert_eq!(r.account_id, Some(3));
        assert_eq!(r.source_id, Some(20201));
        assert!(!r.granted);
    }
    // The sub-user's grants: 101 and 102, nothing else.
    let rows = queries::tracker_access(&pool, 2, &[101, 102, 103, 104])
        .await
        .unwrap();
    let granted: BTreeSet<i64> = rows.iter().filter(|r| r.granted).map(|r| r.id).collect();
    assert_eq!(granted, BTreeSet::from([101, 102]));
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn states_by_ids_reads_every_column(pool: PgPool) {
    // 102 gets a newer state, so it sorts after 101 and 105.
    sqlx::query("UPDATE tracker_states SET speed = 55, gps_precision = 12, gsm_lbs = true WHERE tracker_id = 102")
        .execute(&pool)
        .await
        .unwrap();
    let states = queries::states_by_ids(&pool, &[102, 101, 999, 105])
        .await
        .unwrap();
    let ids: Vec<i64> = states.iter().map(|s| s.tracker_id).collect();
    assert_eq!(ids.len(), 3, "999 has no state");
    assert_eq!(ids[2], 102, "ordered by change number");
    assert!(states.windows(2).all(|w| w[0].change_no < w[1].change_no));

    let s = states.iter().find(|s| s.tracker_id == 101).unwrap();
    let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
    assert_eq!(s.source_id, 10101);
    assert_eq!(s.gps_updated, Some(at("2018-10-17T10:51:43Z")));
    assert_eq!(s.gps_signal_level, Some(100));
    assert_eq!(s.lat, 14.330065796228606);
    assert_eq!(s.lng, -90.99037259141691);
    assert_eq!((s.heading, s.speed, s.alt), (248, 0, 431));
    assert_eq!((s.gps_precision, s.gsm_lbs), (None, None));
    assert_eq!(s.connection_status, "active");
    assert_eq!(s.movement_status, "parked");
    assert_eq!(s.movement_status_update, Some(at("2018-10-04T20:47:07Z")));
    assert!(!s.ignition);
    assert_eq!(s.ignition_update, Some(at("2018-10-04T20:47:07Z")));
    assert_eq!(s.gsm_updated, Some(at("2018-10-17T10:51:43Z")));
    assert_eq!(s.gsm_signal_level, Some(80));
    assert_eq!(s.gsm_network_name.as_deref(), Some("T-Mobile"));
    assert_eq!(s.gsm_roaming, Some(false));
    assert_eq!(
        s.last_update,
        Utc.with_ymd_and_hms(2018, 10, 17, 10, 51, 46).unwrap()
    );
    assert_eq!(s.battery_level, Some(97));
    assert_eq!(s.battery_update, Some(at("2018-10-17T10:51:43Z")));
    assert_eq!(s.inputs, [false, false, true]);
    assert_eq!(s.outputs, [true, false]);
    assert_eq!(s.outputs_update, Some(at("2018-10-17T10:51:43Z")));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&s.additional).unwrap(),
        serde_json::json!({"hardware_key": {"value": "20910998202956382057",
                                            "updated": "2018-10-17T08:47:09Z"}})
    );
    assert_eq!(s.actual_track_update, Some(at("2018-10-04T20:47:07Z")));

    let s102 = states.iter().find(|s| s.tracker_id == 102).unwrap();
    assert_eq!((s102.source_id, s102.speed), (10102, 55));
    assert_eq!((s102.gps_precision, s102.gsm_lbs), (Some(12), Some(true)));
    let s105 = states.iter().find(|s| s.tracker_id == 105).unwrap();
    assert_eq!(s105.source_id, 10105);

    assert!(queries::states_by_ids(&pool, &[]).await.unwrap().is_empty());
}

/// Tracker 101's row as a `TrackerState`, read after `UPDATE tracker_states SET {set}` in a
/// transaction that is rolled back.
async fn read_101_with(
    pool: &PgPool,
    set: &str,
) -> Result<fleetgate::model::TrackerState, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "UPDATE tracker_states SET {set} WHERE tracker_id = 101"
    ))
    .execute(&mut *tx)
    .await?;
    let read = sqlx::query_as::<_, fleetgate::model::TrackerState>(&format!(
        "SELECT {} FROM {} WHERE s.tracker_id = 101",
        fleetgate::model::STATE_COLUMNS,
        fleetgate::model::STATE_FROM
    ))
    .fetch_one(&mut *tx)
    .await;
    tx.rollback().await?;
    read
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn state_rows_decode_nulls_edges_and_refuse_what_they_cannot_represent(pool: PgPool) {
    // Every nullable column NULL, empty arrays, a date before 2000 with microseconds.
    sqlx::query(
        "UPDATE tracker_states SET gps_updated = NULL, gps_signal_level = NULL, lat = -89.5, \
           lng = 179.25, heading = 360, speed = 2147483647, alt = -2147483648, \
           gps_precision = NULL, gsm_lbs = NULL, movement_status_update = NULL, \
           ignition = true, ignition_update = NULL, gsm_updated = NULL, gsm_signal_level = NULL, \
           gsm_network_name = NULL, gsm_roaming = NULL, \
           last_update = '1999-12-31 23:59:59.999999+00', battery_level = NULL, \
           battery_update = NULL, inputs = '{}', inputs_update = NULL, \
           outputs = '{true,false,true}', outputs_update = NULL, \
           additional = '{\"k\": {\"value\": 1.50, \"updated\": \"x\"}}', \
           actual_track_update = '2038-01-19 03:14:08.000001+00' \
         WHERE tracker_id = 102",
    )
    .execute(&pool)
    .await
    .unwrap();
    let states = queries::states_by_ids(&pool, &[102]).await.unwrap();
    let s = &states[0];
    assert_eq!((s.tracker_id, s.source_id), (102, 10102));
    assert_eq!((s.gps_updated, s.gps_signal_level), (None, None));
    assert_eq!((s.lat, s.lng, s.heading), (-89.5, 179.25, 360));
    assert_eq!((s.speed, s.alt), (i32::MAX, i32::MIN));
    assert_eq!(
        (s.gps_precision, s.gsm_lbs, s.gsm_roaming),
        (None, None, None)
    );
    assert!(s.ignition);
    assert_eq!(s.gsm_network_name, None);
    assert_eq!(
        s.last_update,
        "1999-12-31T23:59:59.999999Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
    );
    assert_eq!(
        s.actual_track_update,
        Some(
            "2038-01-19T03:14:08.000001Z"
                .parse::<DateTime<Utc>>()
                .unwrap()
        )
    );
    assert_eq!(s.inputs, Vec::<bool>::new());
    assert_eq!(s.outputs, [true, false, true]);
    // jsonb's own text: the number keeps its scale.
    assert_eq!(&*s.additional, r#"{"k": {"value": 1.50, "updated": "x"}}"#);

    // Infinite and far dates are clamped to years 1..9999; a NULL input reads as false.
    for (set, check) in [
        (
            "last_update = 'infinity', gps_updated = '-infinity'",
            (|s: &fleetgate::model::TrackerState| {
                s.last_update.format("%Y-%m-%d").to_string() == "9999-12-30"
                    && s.gps_updated.map(|d| d.format("%Y-%m-%d").to_string())
                        == Some("0001-01-02".into())
            }) as fn(&fleetgate::model::TrackerState) -> bool,
        ),
        ("last_update = '270000-01-01+00'", |s| {
            s.last_update.format("%Y").to_string() == "9999"
        }),
        ("inputs = '{true,NULL}'", |s| s.inputs == [true, false]),
    ] {
        let read = read_101_with(&pool, set).await.unwrap();
        assert!(check(&read), "{set}: {read:?}");
    }
    // What a TrackerState cannot hold is an error, not a wrong value.
    for (set, what) in [("inputs = '{{true},{false}}'", "two-dimensional array")] {
        let read = read_101_with(&pool, set).await;
        assert!(read.is_err(), "{what}: {read:?}");
    }
    // Columns of the wrong type are refused by name and type, not misread.
    let wrong = sqlx::query_as::<_, fleetgate::model::TrackerState>(&format!(
        "SELECT {} FROM {} WHERE s.tracker_id = 101",
        fleetgate::model::STATE_COLUMNS.replace("s.speed", "s.speed::int8 AS speed"),
        fleetgate::model::STATE_FROM
    ))
    .fetch_all(&pool)
    .await;
    let message = wrong.unwrap_err().to_string();
    assert!(message.contains("speed"), "{message}");
}

// --- triggers ------------------------------------------------------------------------------------

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_batch_upsert_sends_one_notification_naming_its_trackers(pool: PgPool) {
    let mut l = listener(&pool).await;
    // The ingest contract: one INSERT … ON CONFLICT DO UPDATE over unnest for the whole batch.
    let ids: Vec<i64> = vec![101, 102, 103, 104];
    let speeds: Vec<i32> = vec![10, 20, 30, 40];
    sqlx::query(
        "INSERT INTO tracker_states (tracker_id, speed, last_update) \
         SELECT u.id, u.speed, now() FROM unnest($1::bigint[], $2::int4[]) AS u(id, speed) \
         ON CONFLICT (tracker_id) DO UPDATE SET speed = EXCLUDED.speed, \
                                              last_update = EXCLUDED.last_update",
    )
    .bind(&ids)
    .bind(&speeds)
    .execute(&pool)
    .await
    .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(
        payloads.len(),
        1,
        "one statement, one notification: {payloads:?}"
    );
    assert_eq!(
        ids_of(body(&payloads[0], "s")),
        BTreeSet::from([101, 102, 103, 104])
    );

    // The states carry fresh, distinct change numbers and the written values.
    let states = queries::states_by_ids(&pool, &ids).await.unwrap();
    let got: Vec<(i64, i32)> = states.iter().map(|s| (s.tracker_id, s.speed)).collect();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [(101, 10), (102, 20), (103, 30), (104, 40)]);
    let changes: BTreeSet<i64> = states.iter().map(|s| s.change_no).collect();
    assert_eq!(changes.len(), 4);

    // A batch mixing a new row with an existing one: the INSERT and the UPDATE parts each name
    // their own trackers, and nothing is announced twice.
    sqlx::query(
        "INSERT INTO trackers (id, account_id, source_id, label) VALUES (107, 1, 10107, 'Truck 7')",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(payloads_until_marker(&pool, &mut l).await, ["n|1"]);
    sqlx::query(
        "INSERT INTO tracker_states (tracker_id, speed) \
         SELECT u.id, u.speed FROM unnest($1::bigint[], $2::int4[]) AS u(id, speed) \
         ON CONFLICT (tracker_id) DO UPDATE SET speed = EXCLUDED.speed",
    )
    .bind(vec![101_i64, 107])
    .bind(vec![11_i32, 17])
    .execute(&pool)
    .await
    .unwrap();
    let mut payloads = payloads_until_marker(&pool, &mut l).await;
    payloads.sort();
    assert_eq!(payloads, ["s|101", "s|107"]);

    // A statement that changes no row sends nothing.
    sqlx::query("UPDATE tracker_states SET speed = 1 WHERE tracker_id = 999")
        .execute(&pool)
        .await
        .unwrap();
    assert!(payloads_until_marker(&pool, &mut l).await.is_empty());
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn block_unblock_and_remove_announce_lifecycle_with_rising_change_numbers(pool: PgPool) {
    let mut l = listener(&pool).await;
    assert!(queries::set_tracker_blocked(&pool, 101, true)
        .await
        .unwrap());
    assert!(queries::set_tracker_blocked(&pool, 101, false)
        .await
        .unwrap());
    assert!(queries::remove_tracker(&pool, 101).await.unwrap());
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 3, "{payloads:?}");
    let items: Vec<(i64, i64, String)> = payloads
        .iter()
        .flat_map(|p| lifecycle_items(body(p, "t")))
        .collect();
    let events: Vec<(i64, &str)> = items.iter().map(|(_, id, e)| (*id, e.as_str())).collect();
    assert_eq!(events, [(101, "block"), (101, "unblock"), (101, "corrupt")]);
    assert!(
        items[0].0 < items[1].0 && items[1].0 < items[2].0,
        "{items:?}"
    );
    // The last announced change number is the tracker's own.
    let change: i64 = sqlx::query_scalar("SELECT change_no FROM trackers WHERE id = 101")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(change, items[2].0);

    // No-ops announce nothing: a removed tracker cannot be blocked or removed again, blocking a
    // blocked tracker changes nothing, and a label change is not a lifecycle event.
    assert!(!queries::set_tracker_blocked(&pool, 101, true)
        .await
        .unwrap());
    assert!(!queries::remove_tracker(&pool, 101).await.unwrap());
    assert!(queries::set_tracker_blocked(&pool, 105, true)
        .await
        .unwrap());
    sqlx::query("UPDATE trackers SET label = 'renamed' WHERE id = 102")
        .execute(&pool)
        .await
        .unwrap();
    assert!(payloads_until_marker(&pool, &mut l).await.is_empty());

    // Moving a tracker to another account is a removal for its old viewers, and the new
    // account's `all` batch targets are told it gained a tracker.
    sqlx::query("UPDATE trackers SET account_id = 3 WHERE id = 102")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    assert_eq!(payloads[1], "n|3");
    let items = lifecycle_items(body(&payloads[0], "t"));
    assert_eq!(items.len(), 1);
    assert_eq!((items[0].1, items[0].2.as_str()), (102, "corrupt"));
    assert!(items[0].0 > change);

    // Several trackers in one statement: one payload naming them all.
    sqlx::query("UPDATE trackers SET blocked = true WHERE id IN (103, 104)")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    let mut items = lifecycle_items(body(&payloads[0], "t"));
    items.sort();
    assert_eq!(items.len(), 2);
    assert_ne!(items[0].0, items[1].0, "each row its own change number");
    let mut named: Vec<(i64, &str)> = items.iter().map(|(_, id, e)| (*id, e.as_str())).collect();
    named.sort_unstable();
    assert_eq!(named, [(103, "block"), (104, "block")]);
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn blocking_a_user_ends_its_sessions_and_its_sub_users_once(pool: PgPool) {
    let mut l = listener(&pool).await;
    let revoked_before = revoked_at(&pool, REVOKED)
        .await
        .expect("revoked in the fixture");
    sqlx::query("UPDATE users SET blocked = true WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(
        payloads.len(),
        1,
        "one statement, one payload: {payloads:?}"
    );
    let named = hashes_of(body(&payloads[0], "e"));
    // acme's live sessions and its sub-user's; the expired one is stamped revoked too. The
    // already revoked session is not announced again, and other accounts are untouched.
    assert_eq!(named, set(&[ACME, ACME2, SUB, EXPIRED]));
    assert!(!named.contains(REVOKED));
    assert!(!named.contains(RIVAL));
    assert_eq!(revoked_at(&pool, REVOKED).await, Some(revoked_before));
    for hash in [ACME, ACME2, SUB] {
        assert!(revoked_at(&pool, hash).await.is_some(), "{hash} revoked");
        let row = queries::session(&pool, hash).await.unwrap().unwrap();
        assert!(!row.live, "{hash} ended");
    }
    assert!(queries::session(&pool, RIVAL).await.unwrap().unwrap().live);

    // Blocking again changes nothing, and announces nothing.
    sqlx::query("UPDATE users SET blocked = true WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert!(payloads_until_marker(&pool, &mut l).await.is_empty());
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_password_change_ends_the_users_and_its_sub_users_sessions(pool: PgPool) {
    let mut l = listener(&pool).await;
    // An unrelated change of the user announces nothing.
    sqlx::query("UPDATE users SET time_zone = 'Europe/Paris' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    assert!(payloads_until_marker(&pool, &mut l).await.is_empty());

    // The sub-user's own password: only its session.
    sqlx::query("UPDATE users SET password_hash = 'sub-new' WHERE id = 2")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads, [format!("e|{SUB}")]);
    assert!(!queries::session(&pool, SUB).await.unwrap().unwrap().live);
    assert!(queries::session(&pool, ACME).await.unwrap().unwrap().live);

    // Give the sub-user a fresh session, then change the master's password: it ends too.
    let fresh = "56565656565656565656565656565656";
    sqlx::query("INSERT INTO sessions (hash, user_id) VALUES ($1, 2)")
        .bind(fresh)
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        payloads_until_marker(&pool, &mut l).await.is_empty(),
        "a new session is not an event"
    );
    sqlx::query("UPDATE users SET password_hash = 'acme-new' WHERE id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    let named = hashes_of(body(&payloads[0], "e"));
    assert_eq!(named, set(&[ACME, ACME2, EXPIRED, fresh]));
    for hash in [ACME, ACME2, fresh] {
        assert!(
            !queries::session(&pool, hash).await.unwrap().unwrap().live,
            "{hash}"
        );
    }
    assert!(queries::session(&pool, RIVAL).await.unwrap().unwrap().live);

    // Moving a session's expiry is announced too (the gateway refreshes its expiry timer).
    sqlx::query("UPDATE sessions SET expires_at = now() + interval '2 days' WHERE hash = $1")
        .bind(RIVAL)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        payloads_until_marker(&pool, &mut l).await,
        [format!("e|{RIVAL}")]
    );
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn deleting_a_tracker_announces_corrupt_with_a_fresh_change_number(pool: PgPool) {
    let before: i64 = sqlx::query_scalar("SELECT max(change_no) FROM tracker_states")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut l = listener(&pool).await;
    sqlx::query("DELETE FROM trackers WHERE id = 101")
        .execute(&pool)
        .await
        .unwrap();
    // The cascade removes its state without any other notification; the removal of its grant is
    // announced as a revoke (migration 20261123000002), which changes nothing for a removed tracker.
    let mut payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    payloads.sort();
    assert_eq!(payloads[0], "g|2:101:revoke");
    let items = lifecycle_items(body(&payloads[1], "t"));
    assert_eq!(items.len(), 1);
    let (change, id, event) = &items[0];
    assert_eq!((*id, event.as_str()), (101, "corrupt"));
    assert!(*change > before, "a fresh change number");
    assert!(queries::states_by_ids(&pool, &[101])
        .await
        .unwrap()
        .is_empty());
    let rows = queries::tracker_access(&pool, 2, &[101]).await.unwrap();
    assert!(rows.is_empty(), "{rows:?}");
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn deleting_450_sessions_is_announced_in_chunks_under_the_payload_limit(pool: PgPool) {
    let hashes: Vec<String> = (1..=450).map(|i| format!("d{i:031}")).collect();
    sqlx::query("INSERT INTO sessions (hash, user_id) SELECT unnest($1::text[]), 3")
        .bind(&hashes)
        .execute(&pool)
        .await
        .unwrap();
    let mut l = listener(&pool).await;
    let r = sqlx::query("DELETE FROM sessions WHERE hash LIKE 'd%'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(r.rows_affected(), 450);
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert!(payloads.len() >= 3, "several payloads: {}", payloads.len());
    let mut seen: Vec<String> = Vec::new();
    for p in &payloads {
        assert!(p.len() < 8000, "payload of {} bytes", p.len());
        let chunk: Vec<&str> = body(p, "e").split(',').collect();
        assert!(chunk.len() <= 200, "chunks of at most 200: {}", chunk.len());
        seen.extend(chunk.into_iter().map(str::to_owned));
    }
    assert_eq!(seen.len(), 450, "no hash announced twice");
    let seen: BTreeSet<String> = seen.into_iter().collect();
    let want: BTreeSet<String> = hashes.into_iter().collect();
    assert_eq!(seen, want);
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_2000_row_update_is_announced_as_a_range(pool: PgPool) {
    let mut l = listener(&pool).await;
    sqlx::query(
        "INSERT INTO trackers (id, account_id, source_id, label) \
         SELECT g, 1, 1000000 + g, 'Bulk ' || g FROM generate_series(10001, 12000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tracker_states (tracker_id) SELECT g FROM generate_series(10001, 12000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    assert_eq!(payloads[0], "n|1", "the account gained trackers");
    let (lo, hi) = range_of(&payloads[1], "S");
    assert_eq!(hi - lo, 1999, "the insert as a range");

    sqlx::query("UPDATE tracker_states SET speed = 77 WHERE tracker_id BETWEEN 10001 AND 12000")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    // 2000 ids of 5 digits do not fit in a payload: the change number range is sent instead.
    let (lo2, hi2) = range_of(&payloads[0], "S");
    assert!(lo2 > hi, "newer than the insert");
    assert_eq!(hi2 - lo2, 1999);
    let states = queries::states_by_range(&pool, lo2, hi2).await.unwrap();
    assert_eq!(states.len(), 2000);
    assert!(states.iter().all(|s| s.speed == 77));
    assert!(states
        .iter()
        .all(|s| s.source_id == 1_000_000 + s.tracker_id));
    assert!(states.windows(2).all(|w| w[0].change_no < w[1].change_no));
    let ids: BTreeSet<i64> = states.iter().map(|s| s.tracker_id).collect();
    assert_eq!(ids, (10001..=12000).collect());
    // The fixture's states are outside the range.
    assert!(states.iter().all(|s| s.tracker_id > 10000));

    // The LISTEN side reads the range form.
    let hub = Hub::new();
    let mut p = Pending::default();
    assert!(p.add_payload(&payloads[0], &hub));
    assert_eq!(p.state_ranges, [(lo2, hi2)]);

    // Deleting them all: chunked `t|` payloads, each under the limit, every id once, each with
    // its own change number.
    sqlx::query("DELETE FROM trackers WHERE id BETWEEN 10001 AND 12000")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert!(payloads.len() >= 10, "{} payloads", payloads.len());
    let mut items = Vec::new();
    for p in &payloads {
        assert!(p.len() < 8000, "payload of {} bytes", p.len());
        items.extend(lifecycle_items(body(p, "t")));
    }
    assert_eq!(items.len(), 2000);
    assert!(items.iter().all(|(c, _, e)| *c > hi2 && e == "corrupt"));
    let ids: BTreeSet<i64> = items.iter().map(|(_, id, _)| *id).collect();
    assert_eq!(ids, (10001..=12000).collect());
    let changes: HashSet<i64> = items.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(changes.len(), 2000);
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn the_list_form_is_used_up_to_7900_bytes(pool: PgPool) {
    // 1316 five-digit ids joined by commas: 7895 bytes, a list; one more id: 7901, a range.
    sqlx::query(
        "INSERT INTO trackers (id, account_id, source_id, label) \
         SELECT g, 1, 1000000 + g, 'Bulk ' || g FROM generate_series(10001, 11317) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tracker_states (tracker_id) SELECT g FROM generate_series(10001, 11317) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut l = listener(&pool).await;
    sqlx::query("UPDATE tracker_states SET speed = 5 WHERE tracker_id BETWEEN 10001 AND 11316")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 1);
    let list = body(&payloads[0], "s");
    assert_eq!(list.len(), 7895);
    assert_eq!(ids_of(list), (10001..=11316).collect());

    sqlx::query("UPDATE tracker_states SET speed = 6 WHERE tracker_id BETWEEN 10001 AND 11317")
        .execute(&pool)
        .await
        .unwrap();
    let payloads = payloads_until_marker(&pool, &mut l).await;
    assert_eq!(payloads.len(), 1);
    let (lo, hi) = range_of(&payloads[0], "S");
    assert_eq!(hi - lo, 1316);
    assert_eq!(
        queries::states_by_range(&pool, lo, hi).await.unwrap().len(),
        1317
    );
}

/// A batch group registers its trackers before it reads their facts again: what changed since
/// the target was read wins, and trackers removed, deleted or moved away drop out.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_batch_target_read_again_takes_what_changed_since(pool: PgPool) {
    let stale = |id: i64| {
        (
            id,
            TrackerFacts {
                source_id: 10000 + id,
                account_id: 1,
                blocked: false,
                change_no: 0,
            },
        )
    };
    sqlx::raw_sql(
        "UPDATE trackers SET blocked = true WHERE id = 102; \
         UPDATE trackers SET account_id = 3 WHERE id = 103; \
         DELETE FROM trackers WHERE id = 104;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let scope = |sub_user| Scope {
        account_id: 1,
        sub_user,
    };
    let mut facts = fleetgate::batch::recheck(
        &pool,
        scope(None),
        [101, 102, 103, 104, 106].into_iter().map(stale).collect(),
    )
    .await
    .unwrap();
    facts.sort_by_key(|(id, _)| *id);
    let seen: Vec<(i64, bool)> = facts.iter().map(|(id, f)| (*id, f.blocked)).collect();
    assert_eq!(
        seen,
        [(101, false), (102, true)],
        "103 moved, 104 deleted, 106 removed"
    );
    assert!(facts[1].1.change_no > 0);

    // A sub-user's: only what it is still granted (101's grant revoked, 102 kept, 105 never).
    sqlx::query("DELETE FROM tracker_grants WHERE user_id = 2 AND tracker_id = 101")
        .execute(&pool)
        .await
        .unwrap();
    let facts = fleetgate::batch::recheck(
        &pool,
        scope(Some(2)),
        [101, 102, 105].into_iter().map(stale).collect(),
    )
    .await
    .unwrap();
    let seen: Vec<i64> = facts.iter().map(|(id, _)| *id).collect();
    assert_eq!(seen, [102]);
}

/// A tracker whose subscribers all take the compact format has its state read with the compact
/// columns alone. One that gains a full-format subscriber between that read and the publish (as
/// a subscribe may) has it read again in full: the full subscriber gets the whole state, the
/// compact one its compact event, each once.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_compact_read_is_read_again_in_full_for_a_full_subscriber_come_meanwhile(pool: PgPool) {
    let hub = Hub::new();
    let compact = Variant {
        format: Format::Compact,
        ..variant()
    };
    let compact_box = hub.outbox(8);
    let full_box = hub.outbox(8);
    hub.subscribe(1, &compact_box, &[101], compact);
    hub.set_source_ids(&[(101, 10101)]);
    assert_eq!(hub.wanted_read(101), Some((Some(10101), true)));
    sqlx::query("UPDATE tracker_states SET speed = 55 WHERE tracker_id = 101")
        .execute(&pool)
        .await
        .unwrap();
    let mut p = Pending::default();
    p.state_ids.insert(101);
    let joined = std::sync::atomic::AtomicBool::new(false);
    fleetgate::listen::process_with(&pool, &hub, p, None, &|| {
        if !joined.swap(true, std::sync::atomic::Ordering::SeqCst) {
            hub.subscribe(2, &full_box, &[101], variant());
        }
    })
    .await
    .unwrap();
    assert!(joined.into_inner());

    async fn frames(outbox: &fleetgate::hub::Outbox) -> Vec<serde_json::Value> {
        let mut items = Vec::new();
        if !outbox.is_empty() {
            outbox.pop_batch(64, &mut items).await;
        }
        items
            .iter()
            .filter_map(|i| match i {
                Outgoing::State { frame, .. } => Some(serde_json::from_str(frame).unwrap()),
                _ => None,
            })
            .collect()
    }
    let full = frames(&full_box).await;
    assert_eq!(full.len(), 1, "{full:?}");
    let data = &full[0]["data"];
    assert_eq!(data["gps"]["speed"], 55);
    assert_eq!(data["source_id"], 10101);
    assert_eq!(data["gsm"]["network_name"], "T-Mobile");
    assert_eq!(
        data["additional"]["hardware_key"]["value"],
        "20910998202956382057"
    );
    assert_eq!(data["inputs"], serde_json::json!([false, false, true]));
    let compact = frames(&compact_box).await;
    assert_eq!(compact.len(), 1, "{compact:?}");
    assert_eq!(compact[0]["data"]["gps"]["speed"], 55);
    assert!(compact[0]["data"].get("gsm").is_none());
}

/// What an outbox holds, in order: `state <id>`, `lifecycle <id>`, `disallow`, `logout`.
async fn queued(outbox: &fleetgate::hub::Outbox) -> Vec<String> {
    let mut items = Vec::new();
    if !outbox.is_empty() {
        outbox.pop_batch(64, &mut items).await;
    }
    items
        .iter()
        .map(|i| match i {
            Outgoing::State { tracker, .. } => format!("state {tracker}"),
            Outgoing::Lifecycle { tracker, .. } => format!("lifecycle {tracker}"),
            Outgoing::Disallow { .. } => "disallow".into(),
            Outgoing::Logout { .. } => "logout".into(),
            _ => "other".into(),
        })
        .collect()
}

/// A state read in a round may have been committed after a grant was revoked or a session
/// ended in the same round: `disallowed` and `logout` go first (they went after the round's
/// states, so a state written after the revoke reached the sub-user before its `disallowed`).
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_round_ends_grants_and_sessions_before_it_publishes_states(pool: PgPool) {
    let hub = Hub::new();
    let sub_box = hub.outbox(16);
    let rival_box = hub.outbox(16);
    hub.subscribe(1, &sub_box, &[101], variant());
    hub.register_session(&Arc::from(SUB), 1, &sub_box, DateTime::<Utc>::MAX_UTC);
    hub.subscribe(2, &rival_box, &[201], variant());
    hub.register_session(&Arc::from(RIVAL), 2, &rival_box, DateTime::<Utc>::MAX_UTC);
    for sql in [
        "DELETE FROM tracker_grants WHERE user_id = 2 AND tracker_id = 101",
        "UPDATE sessions SET revoked_at = now() WHERE hash = 'rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr'",
        "UPDATE tracker_states SET speed = 77 WHERE tracker_id IN (101, 201)",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let mut p = Pending::default();
    p.state_ids.extend([101, 201]);
    p.revoked_grants.push((2, 101));
    p.sessions.insert(RIVAL.to_owned());
    fleetgate::listen::process(&pool, &hub, p, None)
        .await
        .unwrap();
    assert_eq!(queued(&sub_box).await, ["disallow", "state 101"]);
    assert_eq!(queued(&rival_box).await, ["logout", "state 201"]);
}

/// The same when the revoke, the session's end or a block was notified after the round began:
/// a row read now may have been committed after it, so what the inbox holds of them goes
/// before the chunk's states (a block published there holds the state back).
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn what_came_meanwhile_ends_before_a_round_publishes(pool: PgPool) {
    let hub = Hub::new();
    let sub_box = hub.outbox(16);
    let acme_box = hub.outbox(16);
    hub.subscribe(1, &sub_box, &[101], variant());
    hub.register_session(&Arc::from(SUB), 1, &sub_box, DateTime::<Utc>::MAX_UTC);
    hub.subscribe(2, &acme_box, &[102, 103], variant());
    hub.register_session(&Arc::from(ACME), 2, &acme_box, DateTime::<Utc>::MAX_UTC);
    hub.set_source_ids(&[(101, 10101), (102, 10102), (103, 10103)]);
    // The round was gathered with the states' notifications...
    let mut p = Pending::default();
    p.state_ids.extend([101, 102, 103]);
    // ...then came a revoke and a block, and states written after them.
    sqlx::query("DELETE FROM tracker_grants WHERE user_id = 2 AND tracker_id = 101")
        .execute(&pool)
        .await
        .unwrap();
    let block: i64 =
        sqlx::query_scalar("UPDATE trackers SET blocked = true WHERE id = 102 RETURNING change_no")
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query("UPDATE tracker_states SET speed = 78 WHERE tracker_id IN (101, 102, 103)")
        .execute(&pool)
        .await
        .unwrap();
    let inbox = fleetgate::listen::Inbox::default();
    inbox.update(|p| {
        p.revoked_grants.push((2, 101));
        p.lifecycle.push((block, 102, Lifecycle::Block));
    });
    fleetgate::listen::process(&pool, &hub, p, Some(&inbox))
        .await
        .unwrap();
    assert_eq!(queued(&sub_box).await, ["disallow", "state 101"]);
    assert_eq!(queued(&acme_box).await, ["lifecycle 102", "state 103"]);
}

/// A resync finds a watched tracker moved to another account while the stream was down: its
/// subscribers get `corrupt`, as the live path sends it.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_resync_sends_corrupt_for_a_tracker_moved_away(pool: PgPool) {
    let hub = Hub::new();
    let outbox = hub.outbox(8);
    hub.subscribe(1, &outbox, &[101, 102], variant());
    let session = queries::session(&pool, ACME).await.unwrap().expect("acme");
    for (id, _, facts) in fleetgate::access::statuses(&pool, &session, &[101, 102])
        .await
        .unwrap()
    {
        // As a socket records its read.
        hub.observe_for(1, id, facts.expect("visible"));
    }
    sqlx::query("UPDATE trackers SET account_id = 3 WHERE id = 101")
        .execute(&pool)
        .await
        .unwrap();
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    let mut items = Vec::new();
    outbox.pop_batch(64, &mut items).await;
    let lifecycle: Vec<(i64, Lifecycle)> = items
        .iter()
        .filter_map(|i| match i {
            Outgoing::Lifecycle { tracker, kind, .. } => Some((*tracker, *kind)),
            _ => None,
        })
        .collect();
    assert_eq!(lifecycle, [(101, Lifecycle::Corrupt)]);
}

/// A resync tells the subscribers every lifecycle change they may not know: a tracker blocked
/// when they subscribed and unblocked during the gap (with its state re-sent), and a block that
/// a later subscribe read before the event processor could publish it.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_resync_sends_the_lifecycle_changes_subscribers_may_have_missed(pool: PgPool) {
    let hub = Hub::new();
    let outbox = hub.outbox(8);
    hub.subscribe(1, &outbox, &[101, 105], variant());
    let session = queries::session(&pool, ACME).await.unwrap().expect("acme");
    let read = |ids: &'static [i64]| {
        let (pool, session) = (pool.clone(), session.clone());
        async move {
            fleetgate::access::statuses(&pool, &session, ids)
                .await
                .unwrap()
        }
    };
    for (id, _, facts) in read(&[101, 105]).await {
        hub.observe(id, facts.expect("visible"));
    }
    sqlx::raw_sql(
        "UPDATE trackers SET blocked = false WHERE id = 105; \
         UPDATE trackers SET blocked = true WHERE id = 101;",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Another socket's subscribe reads 101 blocked before any event is published.
    for (id, _, facts) in read(&[101]).await {
        hub.observe(id, facts.expect("visible"));
    }
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    let mut items = Vec::new();
    outbox.pop_batch(64, &mut items).await;
    let seen: Vec<(i64, &str)> = items
        .iter()
        .filter_map(|i| match i {
            Outgoing::Lifecycle { tracker, kind, .. } => Some((*tracker, kind.as_str())),
            Outgoing::State { tracker, .. } => Some((*tracker, "state")),
            _ => None,
        })
        .collect();
    // Lifecycle first (in the hub's order), then the states.
    let (lifecycle, states) = seen.split_at(2);
    let mut lifecycle = lifecycle.to_vec();
    lifecycle.sort_unstable();
    assert_eq!(lifecycle, [(101, "block"), (105, "unblock")], "{seen:?}");
    assert_eq!(states, [(105, "state")], "{seen:?}");
}

/// Trackers added to an account while the stream was down (their `n|` lost) join the account's
/// `all` batch targets on the resync.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_resync_reads_all_targets_again(pool: PgPool) {
    let hub = Hub::new();
    let outbox = hub.outbox(8);
    let key = GroupKey {
        scope: Scope {
            account_id: 1,
            sub_user: None,
        },
        target: Target::All,
        rate: std::time::Duration::from_secs(1),
        variant: variant(),
        kind: GroupKind::State,
    };
    let joined = hub
        .batches
        .join(&hub, &pool, key, 1, &outbox, 8)
        .await
        .unwrap();
    assert!(!joined.group.tracker_ids().contains(&107));
    sqlx::raw_sql(
        "INSERT INTO trackers (id, account_id, source_id, label) VALUES (107, 1, 10107, 'Truck 7'); \
         INSERT INTO tracker_states (tracker_id, speed) VALUES (107, 70);",
    )
    .execute(&pool)
    .await
    .unwrap();
    fleetgate::listen::resync(&pool, &hub).await.unwrap();
    assert!(joined.group.tracker_ids().contains(&107));
}

// --- the LISTEN side's parsing -------------------------------------------------------------------

#[test]
fn pending_keeps_only_what_the_hub_watches() {
    let hub = Hub::new();
    let outbox = hub.outbox(8);
    hub.subscribe(1, &outbox, &[101, 102, 105], variant());
    hub.observe(
        105,
        TrackerFacts {
            source_id: 10105,
            account_id: 1,
            blocked: true,
            change_no: 10,
        },
    );
    let acme: Arc<str> = Arc::from(ACME);
    hub.register_session(&acme, 1, &outbox, DateTime::<Utc>::MAX_UTC);

    let mut p = Pending::default();
    assert!(p.add_payload("s|101,102,103,105,999", &hub));
    // State ids are kept as notified; `process` reads only the wanted ones: 103 and 999 are not
    // watched, 105 is blocked, so its state is not wanted.
    assert_eq!(
        p.state_ids.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([101, 102, 103, 105, 999])
    );
    let wanted: HashSet<i64> = p
        .state_ids
        .iter()
        .copied()
        .filter(|id| hub.wants_state(*id))
        .collect();
    assert_eq!(wanted, HashSet::from([101, 102]));

    assert!(p.add_payload(
        "t|11:101:block,12:103:unblock,13:105:unblock,14:102:corrupt",
        &hub
    ));
    assert_eq!(
        p.lifecycle,
        [
            (11, 101, Lifecycle::Block),
            (13, 105, Lifecycle::Unblock),
            (14, 102, Lifecycle::Corrupt)
        ]
    );

    assert!(p.add_payload(&format!("e|{ACME},{SUB}"), &hub));
    assert_eq!(p.sessions, HashSet::from([ACME.to_owned()]));

    assert!(p.add_payload("S|100|250", &hub));
    assert!(p.add_payload("T|3|4", &hub));
    assert!(p.add_payload("E|5|6", &hub));
    assert_eq!(p.state_ranges, [(100, 250)]);
    assert_eq!(p.lifecycle_ranges, [(3, 4)]);
    assert_eq!(p.session_ranges, [(5, 6)]);

    // `i|`: the watched trackers among them get their source id read again.
    assert!(p.add_payload("i|101,103", &hub));
    assert_eq!(p.sources, HashSet::from([101]));

    // `n|` is read but adds nothing for state subscriptions.
    assert!(p.add_payload("n|1,3", &hub));
    assert_eq!(p.state_ids.len(), 5);
    assert_eq!(p.lifecycle.len(), 3);
    assert!(!p.resync);
}

#[test]
fn pending_rejects_unreadable_payloads() {
    let hub = Hub::new();
    let outbox = hub.outbox(8);
    hub.subscribe(1, &outbox, &[101], variant());
    for bad in [
        "",
        "s",
        "nonsense",
        "s|101,abc",
        "s|",
        "t|11:101",
        "t|x:101:block",
        "t|11:y:block",
        "t|11:101:explode",
        "S|10",
        "S|a|b",
        "T|1|",
        "E||2",
        "i|101,x",
        "q|1",
        "marker|x",
    ] {
        let mut p = Pending::default();
        assert!(!p.add_payload(bad, &hub), "{bad:?} must be refused");
    }
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn a_bulk_account_move_is_announced_as_corrupt_items_never_a_range(pool: PgPool) {
    sqlx::raw_sql(
        "INSERT INTO trackers (id, account_id, source_id, label) \
         SELECT g, 1, 700000 + g, 'Bulk ' || g FROM generate_series(5000, 5499) g",
    )
    .execute(&pool)
    .await
    .expect("seed 500 trackers");
    let mut l = listener(&pool).await;
    sqlx::query("UPDATE trackers SET account_id = 3 WHERE id BETWEEN 5000 AND 5499")
        .execute(&pool)
        .await
        .expect("move them to another account");
    let payloads = payloads_until_marker(&pool, &mut l).await;
    let mut moved = BTreeSet::new();
    let mut accounts = BTreeSet::new();
    for p in &payloads {
        assert!(p.len() < 8000, "{} bytes", p.len());
        if let Some(body) = p.strip_prefix("t|") {
            for (_, id, ev) in lifecycle_items(body) {
                assert_eq!(ev, "corrupt", "a moved tracker is gone for its old account");
                moved.insert(id);
            }
        } else if let Some(body) = p.strip_prefix("n|") {
            accounts.extend(ids_of(body));
        } else {
            panic!("unexpected payload {p}");
        }
    }
    assert_eq!(moved, (5000..5500).collect::<BTreeSet<i64>>());
    assert_eq!(
        accounts,
        BTreeSet::from([3]),
        "the new account's `all` targets pick them up"
    );
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn trackers_added_to_1500_accounts_name_every_account(pool: PgPool) {
    sqlx::raw_sql(
        "INSERT INTO users (id, login) SELECT g, 'bulk' || g FROM generate_series(10000, 11499) g",
    )
    .execute(&pool)
    .await
    .expect("seed 1500 accounts");
    let mut l = listener(&pool).await;
    sqlx::query(
        "INSERT INTO trackers (id, account_id, source_id, label) \
         SELECT g, g, 800000 + g, 'New ' || g FROM generate_series(10000, 11499) g",
    )
    .execute(&pool)
    .await
    .expect("one tracker per account");
    let mut accounts = BTreeSet::new();
    for p in payloads_until_marker(&pool, &mut l).await {
        assert!(p.len() < 8000);
        accounts.extend(ids_of(body(&p, "n")));
    }
    assert_eq!(accounts, (10000..11500).collect::<BTreeSet<i64>>());
}

#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn restoring_a_removed_tracker_announces_its_account(pool: PgPool) {
    let mut l = listener(&pool).await;
    sqlx::query("UPDATE trackers SET removed = false WHERE id = 106")
        .execute(&pool)
        .await
        .expect("restore");
    assert_eq!(payloads_until_marker(&pool, &mut l).await, ["n|1"]);
}

// --- cost of the processor's read --------------------------------------------------------------

/// PostgreSQL's CPU per row of the event processor's read (`states_by_ids_source_unread`, and
/// the compact columns), against reading the tracker id alone: what writing the columns out
/// costs beside finding the rows. A harness, not a check (ignored); PostgreSQL must run on this
/// machine (its backend's CPU is read from `/proc`):
/// `cargo test --release --test gateway read_cost -- --ignored --nocapture`
/// (`SECS` sets the seconds per figure, default 3).
#[sqlx::test(migrations = "./migrations")]
#[ignore]
async fn read_cost_per_row(pool: PgPool) {
    use rand::seq::SliceRandom;
    const TRACKERS: i64 = 100_000;
    // One connection, so that every read runs on the backend whose CPU is counted.
    let one = untested_pool(&pool, 1).await;
    bench_fleet(&one).await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&one)
        .await
        .unwrap();
    let backend_cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    };
    let secs: f64 = std::env::var("SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let mut ids: Vec<i64> = (1..=TRACKERS).collect();
    let mut rng = rand::thread_rng();
    for n in [1, 10, 125, 2000] {
        for what in ["full columns", "compact columns", "tracker id only"] {
            let (start, cpu) = (std::time::Instant::now(), backend_cpu());
            let mut rows = 0;
            while start.elapsed().as_secs_f64() < secs {
                ids.shuffle(&mut rng);
                let chunk = &ids[..n];
                rows += match what {
                    "full columns" => queries::states_by_ids_source_unread(&one, chunk)
                        .await
                        .unwrap()
                        .len(),
                    "compact columns" => queries::states_by_ids_for(&one, chunk, true)
                        .await
                        .unwrap()
                        .len(),
                    _ => sqlx::query(
                        "SELECT s.tracker_id FROM tracker_states s WHERE s.tracker_id = ANY($1)",
                    )
                    .bind(chunk)
                    .fetch_all(&one)
                    .await
                    .unwrap()
                    .len(),
                };
            }
            println!(
                "{n:>5} ids per read, {what:<16}: PostgreSQL {:.2} µs of CPU per row",
                (backend_cpu() - cpu) * 1e6 / rows as f64
            );
        }
    }
}

/// A pool on `pool`'s database whose connections are not tested before use, as the event
/// processor's (`db::events_pool`), for the cost harnesses.
async fn untested_pool(pool: &PgPool, connections: u32) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .test_before_acquire(false)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap()
}

/// The benchmark's fleet (bench/src/db.rs) of 100,000 trackers in account 1, states included.
async fn bench_fleet(pool: &PgPool) {
    for sql in [
        "INSERT INTO users (id, login, time_zone) VALUES (1, 'bench', 'Europe/Berlin')",
        "INSERT INTO trackers (id, account_id, source_id, label) \
         SELECT g, 1, 1000000 + g, 'bench ' || g FROM generate_series(1, 100000) g",
        "INSERT INTO tracker_states (tracker_id, gps_updated, gps_signal_level, lat, lng, \
           heading, speed, alt, connection_status, movement_status, movement_status_update, \
           ignition, ignition_update, gsm_updated, gsm_signal_level, gsm_network_name, \
           gsm_roaming, last_update, battery_level, battery_update, inputs, inputs_update, \
           outputs, outputs_update, additional) \
         SELECT g, now(), 100, 52.4 + (g % 1000) * 0.0002, 13.3 + (g / 1000) * 0.0002, \
           (g % 360)::int2, 0, 0, 'active', 'parked', now(), false, now(), now(), 80, \
           'Bench GSM', false, now(), 97, now(), '{false,false,true}', now(), \
           '{true,false}', now(), \
           jsonb_build_object('hardware_key', jsonb_build_object('value', g::text, 'updated', now())) \
         FROM generate_series(1, 100000) g",
        "VACUUM ANALYZE tracker_states",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
}

/// What the event processor costs per state on the benchmark's `ingest` fleet, for comparing
/// changes to it: `ingest` cannot tell apart a few percent, as the writers share the cores with
/// the gateway and the baseline moves by a quarter from run to run. 100,000 trackers watched by
/// 1,000 outboxes of 100 (full format, source ids known, as after a subscribe); each round,
/// 1,000 random trackers' states are written and `listen::process` reads and publishes them, as
/// for one notification of the bench's writers. Prints the gateway's CPU (the whole process's,
/// taken around each round: PostgreSQL's backends are other processes) per state published,
/// and the rounds' wall time. Draining the outboxes (the sockets' work) is not counted.
/// `cargo test --release --test gateway processor_cost -- --ignored --nocapture` (`SECS` sets
/// the seconds of the measured part, default 5). The CPU time of a 2-core virtual machine moves
/// by a tenth from run to run; instructions do not: `ROUNDS=20` runs that many rounds, to be
/// counted by callgrind (`valgrind --tool=callgrind --toggle-collect='*listen::process_with*'
/// <test binary> processor_cost --ignored`: instructions per state are the total over 20,000).
#[cfg(target_os = "linux")]
#[sqlx::test(migrations = "./migrations")]
#[ignore]
async fn processor_cost_per_state(pool: PgPool) {
    use rand::seq::SliceRandom;
    const TRACKERS: i64 = 100_000;
    const ROUND: usize = 1_000;
    let events = untested_pool(&pool, 4).await;
    bench_fleet(&pool).await;
    let hub = Hub::new();
    let all: Vec<i64> = (1..=TRACKERS).collect();
    let outboxes: Vec<_> = all
        .chunks(100)
        .enumerate()
        .map(|(conn, ids)| {
            let outbox = hub.outbox(100);
            hub.subscribe(conn as u64 + 1, &outbox, ids, variant());
            outbox
        })
        .collect();
    let sources: Vec<(i64, i64)> = all.iter().map(|&id| (id, 1_000_000 + id)).collect();
    hub.set_source_ids(&sources);
    let cpu = || {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
        let usage = unsafe {
            libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
            usage.assume_init()
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(usage.ru_utime) + secs(usage.ru_stime)
    };
    let secs: f64 = std::env::var("SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let mut ids = all.clone();
    let mut rng = rand::thread_rng();
    let mut items = Vec::new();
    let max_rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    let (mut spent, mut wall, mut published, mut rounds) = (0.0, 0.0, 0usize, 0usize);
    let started = std::time::Instant::now();
    // The first second warms the caches, the index and the connections up, and is not counted.
    for _ in 0..max_rounds {
        if started.elapsed().as_secs_f64() >= secs + 1.0 {
            break;
        }
        ids.shuffle(&mut rng);
        let round = &ids[..ROUND];
        sqlx::query("UPDATE tracker_states SET speed = speed + 1 WHERE tracker_id = ANY($1)")
            .bind(round)
            .execute(&pool)
            .await
            .unwrap();
        let mut p = Pending::default();
        p.state_ids.extend(round.iter().copied());
        let (cpu_before, wall_before) = (cpu(), std::time::Instant::now());
        fleetgate::listen::process(&events, &hub, p, None)
            .await
            .unwrap();
        let (cpu_after, wall_after) = (cpu(), wall_before.elapsed().as_secs_f64());
        let mut queued = 0;
        for outbox in &outboxes {
            if !outbox.is_empty() {
                items.clear();
                outbox.pop_batch(usize::MAX, &mut items).await;
                queued += items.len();
            }
        }
        assert_eq!(queued, ROUND, "every state read is published");
        if started.elapsed().as_secs_f64() > 1.0 || max_rounds != usize::MAX {
            spent += cpu_after - cpu_before;
            wall += wall_after;
            published += queued;
            rounds += 1;
        }
    }
    println!(
        "{rounds} rounds of {ROUND} states: the gateway's CPU {:.2} µs per state, \
         {:.2} ms a round",
        spent * 1e6 / published as f64,
        wall * 1e3 / rounds as f64
    );
}

/// Timestamps any writer may store decode without panicking (sqlx's own decoding panicked on
/// `infinity` and on years beyond chrono's range), clamped to years 1..9999.
#[sqlx::test]
async fn every_timestamp_decodes_clamped(pool: PgPool) {
    use fleetgate::db::time::{OptPgTime, PgTime};
    let row: (PgTime, PgTime, PgTime, OptPgTime, OptPgTime) = sqlx::query_as(
        "SELECT 'infinity'::timestamptz, '-infinity'::timestamptz, \
                '270000-01-01+00'::timestamptz, NULL::timestamptz, \
                '2026-12-06 10:00:00+00'::timestamptz",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let year = |t: DateTime<Utc>| t.format("%Y").to_string();
    assert_eq!(year(row.0 .0), "9999");
    assert_eq!(year(row.1 .0), "0001");
    assert_eq!(year(row.2 .0), "9999");
    assert_eq!(row.3 .0, None);
    assert_eq!(
        row.4 .0,
        Some("2026-12-06T10:00:00Z".parse::<DateTime<Utc>>().unwrap())
    );
}

/// `simulate` goes on with the rest of its fleet when one of its trackers is deleted: every
/// batch naming it used to fail on the foreign key, so nothing was written any more.
#[sqlx::test(
    migrations = "./migrations",
    fixtures(path = "../fixtures", scripts("fleet"))
)]
async fn simulate_goes_on_when_one_of_its_trackers_is_deleted(pool: PgPool) {
    let change_of_102 = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT change_no FROM tracker_states WHERE tracker_id = 102",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let start = change_of_102().await;
    // Faster than the fleet allows: every tick moves every tracker, 104 included. (Not Send:
    // it runs beside the checks in this task.)
    let sim = fleetgate::commands::simulate(&pool, 1000.0, Some("acme"), Some(30.0));
    let checks = async {
        eventually("a first write", || async { change_of_102().await > start }).await;
        sqlx::query("DELETE FROM trackers WHERE id = 104")
            .execute(&pool)
            .await
            .unwrap();
        let deleted = change_of_102().await;
        eventually("102 written after 104 was deleted", || async {
            change_of_102().await > deleted
        })
        .await;
    };
    tokio::select! {
        r = sim => panic!("simulate ended first: {r:?}"),
        () = checks => {}
    }
}
