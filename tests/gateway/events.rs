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
