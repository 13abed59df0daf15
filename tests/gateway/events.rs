//! Events after subscribing: state changes, block / unblock / remove, unsubscribe.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_change_becomes_a_state_event() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    app.exec(
        "UPDATE tracker_states SET lat = 52.5, lng = 13.4, speed = 64, heading = 90, \
         movement_status = 'moving', ignition = true, last_update = '2024-01-01 12:00:00+00' \
         WHERE tracker_id = 102",
    )
    .await;
    let (ev, _) = c.recv_until(|v| is_state_of(v, 102)).await;
    let d = &ev["data"];
    assert_eq!(d["gps"]["location"], json!({"lat": 52.5, "lng": 13.4}));
    assert_eq!(d["gps"]["speed"], 64);
    assert_eq!(d["gps"]["heading"], 90);
    assert_eq!(d["movement_status"], "moving");
    assert_eq!(d["ignition"], true);
    assert_eq!(
        d["last_update"], "2024-01-01 13:00:00",
        "Berlin in winter is UTC+1"
    );
}

/// A compact subscriber's changes are read with the compact columns alone: each event holds what
/// its first one (from the subscribe's full read) held, but for what changed; `precision` and
/// `gsm_lbs` included.
#[tokio::test]
async fn a_compact_subscribers_change_holds_every_compact_field() {
    let app = spawn_app().await;
    app.exec("UPDATE tracker_states SET gps_precision = 7, gsm_lbs = true WHERE tracker_id = 102")
        .await;
    let mut c = app.connect().await;
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state", "trackers": [102], "format": "compact"}]}))
        .await;
    assert_eq!(c.recv().await["type"], "response");
    let first = c.recv().await;
    assert!(is_state_of(&first, 102), "{first}");
    assert_eq!(first["data"]["gps"]["precision"], 7);
    app.exec("UPDATE tracker_states SET speed = 64 WHERE tracker_id = 102")
        .await;
    let (ev, _) = c.recv_until(|v| is_state_with_speed(v, 102, 64)).await;
    let mut want = first["data"].clone();
    want["gps"]["speed"] = json!(64);
    assert_eq!(ev["data"], want);
}

#[tokio::test]
async fn a_batched_write_reaches_every_tracker_in_order() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102, 103, 104], 4).await;
    for speed in 1..=20 {
        app.set_speed(&[101, 102, 103, 104], speed).await;
    }
    // Per tracker, speeds never go backwards and each ends at 20.
    let mut last = std::collections::HashMap::new();
    while last.len() < 4 || last.values().any(|s| *s != 20) {
        let v = c.recv().await;
        let (id, speed) = (
            v["tracker_id"].as_i64().unwrap(),
            v["data"]["gps"]["speed"].as_i64().unwrap(),
        );
        let prev = last.insert(id, speed).unwrap_or(0);
        assert!(speed > prev, "tracker {id}: {speed} after {prev}");
    }
}

#[tokio::test]
async fn block_stops_states_and_unblock_resends_the_current_state() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    app.exec("UPDATE trackers SET blocked = true WHERE id = 101")
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type": "event", "event": "lifecycle", "tracker_id": 101,
               "data": {"source_id": 10101, "lifecycle_event": "block"}})
    );
    // While blocked, 101's changes are not delivered; 102's change is the barrier.
    app.set_speed(&[101], 77).await;
    app.set_speed(&[102], 78).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 102, 78)).await;
    assert!(skipped.iter().all(|v| !is_state_of(v, 101)), "{skipped:?}");
    // Unblock: the lifecycle event, then the current state at once.
    app.exec("UPDATE trackers SET blocked = false WHERE id = 101")
        .await;
    let unblock = c.recv().await;
    assert_eq!(unblock["data"]["lifecycle_event"], "unblock");
    let state = c.recv().await;
    assert!(is_state_with_speed(&state, 101, 77), "{state}");
}

#[tokio::test]
async fn unblock_without_changes_resends_the_same_state() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    app.exec("UPDATE trackers SET blocked = true WHERE id = 101")
        .await;
    assert_eq!(c.recv().await["data"]["lifecycle_event"], "block");
    app.exec("UPDATE trackers SET blocked = false WHERE id = 101")
        .await;
    assert_eq!(c.recv().await["data"]["lifecycle_event"], "unblock");
    assert!(is_state_of(&c.recv().await, 101));
}

#[tokio::test]
async fn a_tracker_blocked_at_subscribe_sends_its_state_on_unblock() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let (resp, _) = c.subscribe_and_states(ACME, &[105], 0).await;
    assert_eq!(resp["data"]["state"]["105"], "blocked");
    app.exec("UPDATE trackers SET blocked = false WHERE id = 105")
        .await;
    assert_eq!(c.recv().await["data"]["lifecycle_event"], "unblock");
    let s = c.recv().await;
    assert!(is_state_of(&s, 105));
    assert_eq!(s["data"]["source_id"], 10105);
}

#[tokio::test]
async fn removal_sends_corrupt_and_ends_the_subscription() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    app.exec("UPDATE trackers SET removed = true WHERE id = 101")
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type": "event", "event": "lifecycle", "tracker_id": 101,
               "data": {"source_id": 10101, "lifecycle_event": "corrupt"}})
    );
    app.exec("DELETE FROM trackers WHERE id = 102").await;
    let ev = c.recv().await;
    assert_eq!(ev["data"]["lifecycle_event"], "corrupt");
    assert_eq!(ev["tracker_id"], 102);
    app.until("hub forgets removed trackers", || {
        !app.hub.is_watched(101) && !app.hub.is_watched(102)
    })
    .await;
}

#[tokio::test]
async fn unsubscribe_stops_some_and_leaves_the_others_flowing() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    c.send(json!({"action": "unsubscribe", "hash": ACME, "events": ["state"], "trackers": [101]}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type": "response", "action": "subscription/unsubscribe", "events": ["state"], "data": [101]})
    );
    app.set_speed(&[101], 50).await;
    app.set_speed(&[102], 51).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 102, 51)).await;
    assert!(
        skipped.is_empty(),
        "nothing for 101 after unsubscribe: {skipped:?}"
    );
    // Requests form unsubscribe.
    c.send(json!({"action": "unsubscribe", "hash": ACME,
                  "requests": [{"type": "state", "trackers": [102]}]}))
        .await;
    let r = c.recv().await;
    assert_eq!(r["action"], "subscription/unsubscribe");
    assert_eq!(r["data"]["state"]["value"], json!([102]));
    app.until("hub forgets both", || {
        !app.hub.is_watched(101) && !app.hub.is_watched(102)
    })
    .await;
}

#[tokio::test]
async fn lifecycle_reaches_every_socket_watching() {
    let app = spawn_app().await;
    let mut a = app.connect().await;
    let mut b = app.connect().await;
    a.subscribe_and_states(ACME, &[103], 1).await;
    b.subscribe_and_states(SUB, &[101], 1).await;
    b.subscribe_and_states(ACME2, &[103], 1).await;
    app.exec("UPDATE trackers SET blocked = true WHERE id = 103")
        .await;
    assert_eq!(a.recv().await["data"]["lifecycle_event"], "block");
    assert_eq!(b.recv().await["data"]["lifecycle_event"], "block");
}

/// Keeps the event processor's next round waiting: it reads the state of every tracker with a
/// lifecycle change before it publishes, and this lock holds that read until it is dropped.
async fn hold_state_reads(app: &TestApp) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&app.db_url)
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE tracker_states IN ACCESS EXCLUSIVE MODE")
        .execute(&mut conn)
        .await
        .expect("lock");
    conn
}

/// A socket subscribing reads a block (and later an unblock) that the event processor has not
/// published yet: the sockets already watching the tracker still get both events, and the state
/// the unblock re-sends.
#[tokio::test]
async fn lifecycle_read_first_by_a_later_subscribe_still_reaches_earlier_sockets() {
    use sqlx::Connection;
    let app = spawn_app().await;
    let mut a = app.connect().await;
    a.subscribe_and_states(ACME, &[101], 1).await;

    let hold = hold_state_reads(&app).await;
    app.exec("UPDATE trackers SET blocked = true WHERE id = 101")
        .await;
    let mut b = app.connect().await;
    let r = b.subscribe(ACME2, &[101]).await;
    assert_eq!(r["data"]["state"]["101"], "blocked", "{r}");
    hold.close().await.expect("release");
    let (ev, _) = a
        .recv_until(|v| v["tracker_id"] == 101 && v["event"] == "lifecycle")
        .await;
    assert_eq!(ev["data"]["lifecycle_event"], "block");

    let hold = hold_state_reads(&app).await;
    app.exec("UPDATE trackers SET blocked = false WHERE id = 101")
        .await;
    let mut c = app.connect().await;
    let r = c.subscribe(SUB, &[101]).await;
    assert_eq!(r["data"]["state"]["101"], "normal", "{r}");
    hold.close().await.expect("release");
    let (ev, _) = a
        .recv_until(|v| v["tracker_id"] == 101 && v["event"] == "lifecycle")
        .await;
    assert_eq!(ev["data"]["lifecycle_event"], "unblock");
    a.recv_until(|v| is_state_of(v, 101)).await;
}

/// A round larger than the processor's read chunk (2,000 trackers): every tracker gets its
/// latest state, and a block committed after a state in the same transaction still comes
/// after that state, whichever chunk the tracker falls in.
#[tokio::test]
async fn a_round_of_thousands_of_trackers_is_delivered_whole_and_in_order() {
    let app = spawn_app().await;
    let n = 5000i64;
    app.exec(&format!(
        "INSERT INTO trackers (id, account_id, source_id, label) \
           SELECT g, 1, g, 'bulk ' || g FROM generate_series(200001, {}) g; \
         INSERT INTO tracker_states (tracker_id, lat, lng, speed, last_update) \
           SELECT g, 52.5, 13.4, 0, now() FROM generate_series(200001, {}) g;",
        200_000 + n,
        200_000 + n
    ))
    .await;
    let ids: Vec<i64> = (200_001..=200_000 + n).collect();
    let mut c = app.connect().await;
    let (response, _) = c.subscribe_and_states(ACME, &ids, n as usize).await;
    assert_eq!(response["data"]["state"]["200001"], "normal");
    // One transaction: every tracker's speed, then a block of one of them.
    app.exec(&format!(
        "BEGIN; \
         UPDATE tracker_states SET speed = 5, last_update = now() \
           WHERE tracker_id BETWEEN 200001 AND {}; \
         UPDATE trackers SET blocked = true WHERE id = 204999; \
         COMMIT;",
        200_000 + n
    ))
    .await;
    let mut fast = std::collections::HashSet::new();
    let mut blocked = false;
    while fast.len() < n as usize || !blocked {
        let v = c.recv().await;
        let id = v["tracker_id"].as_i64().unwrap_or(0);
        if v["event"] == "lifecycle" {
            assert_eq!(id, 204_999, "{v}");
            assert_eq!(v["data"]["lifecycle_event"], "block");
            assert!(
                fast.contains(&id),
                "the block came before the state committed first"
            );
            blocked = true;
        } else {
            assert_eq!(v["event"], "state", "{v}");
            assert!(!blocked || id != 204_999, "a state after the block: {v}");
            assert_eq!(v["data"]["gps"]["speed"], 5, "{v}");
            assert!(fast.insert(id), "tracker {id} sent twice: {v}");
        }
    }
}

#[tokio::test]
async fn a_new_source_id_reaches_the_next_state_and_lifecycle_events() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let (_, states) = c.subscribe_and_states(ACME, &[101, 102], 2).await;
    assert!(
        states
            .iter()
            .any(|s| is_state_of(s, 101) && s["data"]["source_id"] == 10101),
        "{states:?}"
    );
    // A state read once the hub knows the source id (it is not looked up for each state).
    app.set_speed(&[101], 5).await;
    let (ev, _) = c.recv_until(|v| is_state_with_speed(v, 101, 5)).await;
    assert_eq!(ev["data"]["source_id"], 10101);
    // The device is replaced: the tracker gets another data source.
    app.exec("UPDATE trackers SET source_id = 90101 WHERE id = 101")
        .await;
    app.set_speed(&[101], 6).await;
    let (ev, _) = c.recv_until(|v| is_state_with_speed(v, 101, 6)).await;
    assert_eq!(ev["data"]["source_id"], 90101, "{ev}");
    app.exec("UPDATE trackers SET blocked = true WHERE id = 101")
        .await;
    let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(
        ev["data"],
        json!({"source_id": 90101, "lifecycle_event": "block"})
    );
}

#[tokio::test]
async fn a_state_row_the_gateway_cannot_decode_holds_back_only_its_tracker() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    // A two-dimensional `inputs` array (the column takes one): no state event can hold it.
    // Before, every read that met the row failed, with it every round and resync, and no
    // tracker's state was delivered.
    app.exec("UPDATE tracker_states SET inputs = '{{t},{f}}', speed = 60 WHERE tracker_id = 101")
        .await;
    app.set_speed(&[102], 61).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 102, 61)).await;
    assert!(skipped.iter().all(|v| !is_state_of(v, 101)), "{skipped:?}");
    // A new subscribe is answered with the states it can read.
    let mut d = app.connect().await;
    let (resp, states) = d.subscribe_and_states(ACME, &[102], 1).await;
    assert_eq!(resp["data"]["state"]["102"], "normal", "{resp}");
    assert!(is_state_with_speed(&states[0], 102, 61), "{states:?}");
    // Written again, it is delivered.
    app.exec("UPDATE tracker_states SET inputs = '{t,f}', speed = 62 WHERE tracker_id = 101")
        .await;
    c.recv_until(|v| is_state_with_speed(v, 101, 62)).await;
}

#[tokio::test]
async fn infinite_dates_and_unreported_inputs_are_rendered() {
    let app = spawn_app().await;
    // A session that never ends, as an operator may write it.
    app.exec(&format!(
        "UPDATE sessions SET expires_at = 'infinity' WHERE hash = '{ACME2}'"
    ))
    .await;
    let mut c = app.connect().await;
    let (resp, _) = c.subscribe_and_states(ACME2, &[101], 1).await;
    assert_eq!(resp["data"]["state"]["101"], "normal", "{resp}");
    app.exec(
        "UPDATE tracker_states SET gps_updated = 'infinity', inputs = '{t,NULL,f}', \
         outputs_update = '-infinity', speed = 63 WHERE tracker_id = 101",
    )
    .await;
    let (ev, _) = c.recv_until(|v| is_state_with_speed(v, 101, 63)).await;
    let data = &ev["data"];
    let updated = data["gps"]["updated"].as_str().expect("gps.updated");
    assert!(updated.starts_with("9999-12-3"), "{data}");
    assert!(
        data["outputs_update"]
            .as_str()
            .is_some_and(|d| d.starts_with("0001-01-0")),
        "{data}"
    );
    assert_eq!(data["inputs"], json!([true, false, false]), "{data}");
}
