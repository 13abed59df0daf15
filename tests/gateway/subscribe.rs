//! Subscribe: statuses, both message forms, the initial state with its field values, formats.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn legacy_subscribe_reports_every_status_and_sends_initial_states() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    // 101 normal, 105 blocked, 106 removed, 201 other account, 999 missing.
    let (resp, states) = c
        .subscribe_and_states(ACME, &[101, 105, 106, 201, 999], 1)
        .await;
    assert_eq!(
        resp,
        json!({"type": "response", "action": "subscription/subscribe", "events": ["state"],
               "data": {"state": {"101": "normal", "105": "blocked", "106": "unknown",
                                  "201": "unknown", "999": "unknown"}}})
    );
    let s = &states[0];
    assert_eq!(s["type"], "event");
    assert_eq!(s["tracker_id"], 101);
    // Dates are rendered in the user's zone (Europe/Berlin, UTC+2 in October).
    let d = &s["data"];
    assert_eq!(d["source_id"], 10101);
    assert_eq!(d["gps"]["updated"], "2018-10-17 12:51:43");
    assert_eq!(d["gps"]["location"]["lat"], 14.330065796228606);
    assert_eq!(d["gps"]["location"]["lng"], -90.99037259141691);
    assert_eq!(d["gps"]["heading"], 248);
    assert_eq!(d["gps"]["alt"], 431);
    assert_eq!(d["gps"]["signal_level"], 100);
    assert_eq!(d["connection_status"], "active");
    assert_eq!(d["movement_status"], "parked");
    assert_eq!(d["movement_status_update"], "2018-10-04 22:47:07");
    assert_eq!(d["ignition"], false);
    assert_eq!(
        d["gsm"],
        json!({"updated": "2018-10-17 12:51:43", "signal_level": 80,
                                "network_name": "T-Mobile", "roaming": false})
    );
    assert_eq!(d["last_update"], "2018-10-17 12:51:46");
    assert_eq!(d["battery_level"], 97);
    assert_eq!(d["inputs"], json!([false, false, true]));
    assert_eq!(d["outputs"], json!([true, false]));
    assert_eq!(
        d["additional"],
        json!({"hardware_key": {"value": "20910998202956382057", "updated": "2018-10-17 10:47:09"}})
    );
    assert_eq!(d["actual_track_update"], "2018-10-04 22:47:07");
    let user_time = s["user_time"].as_str().expect("user_time");
    assert_eq!(user_time.len(), "2018-10-17 12:51:43".len());
}

#[tokio::test]
async fn requests_form_with_compact_format() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.send(json!({"action": "subscribe", "hash": ACME,
                  "requests": [{"type": "state", "trackers": [102, 105], "format": "compact"}]}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type": "response", "action": "subscription/subscribe", "events": ["state"],
               "data": {"state": {"success": true, "value": {"102": "normal", "105": "blocked"}}}})
    );
    let s = c.recv().await;
    assert!(is_state_of(&s, 102), "{s}");
    let mut keys: Vec<&str> = s["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "connection_status",
            "gps",
            "ignition",
            "ignition_update",
            "last_update",
            "movement_status",
            "movement_status_update",
            "source_id"
        ]
    );
    // A change arrives in the compact format too.
    app.set_speed(&[102], 33).await;
    let (ev, _) = c.recv_until(|v| is_state_with_speed(v, 102, 33)).await;
    assert!(ev["data"].get("gsm").is_none());
}

#[tokio::test]
async fn iso_datetime_renders_offsets() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.send(
        json!({"action": "subscribe", "hash": ACME, "iso_datetime": true,
                  "events": ["state"], "trackers": [101]}),
    )
    .await;
    c.recv().await;
    let s = c.recv().await;
    assert_eq!(s["data"]["gps"]["updated"], "2018-10-17T12:51:43+02:00");
}

#[tokio::test]
async fn sub_user_sees_only_granted_trackers() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let (resp, states) = c.subscribe_and_states(SUB, &[101, 102, 103, 201], 2).await;
    assert_eq!(
        resp["data"]["state"],
        json!({"101": "normal", "102": "normal", "103": "disallowed", "201": "unknown"})
    );
    let mut ids: Vec<i64> = states
        .iter()
        .map(|s| s["tracker_id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [101, 102]);
    // No events flow for the disallowed tracker: 103 changes, then 101 (a barrier).
    app.set_speed(&[103], 5).await;
    app.set_speed(&[101], 6).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 101, 6)).await;
    assert!(skipped.iter().all(|v| !is_state_of(v, 103)), "{skipped:?}");
}

#[tokio::test]
async fn other_account_sees_its_own_and_not_ours() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let (resp, _) = c.subscribe_and_states(RIVAL, &[201, 101], 1).await;
    assert_eq!(
        resp["data"]["state"],
        json!({"201": "normal", "101": "unknown"})
    );
}

#[tokio::test]
async fn subscribing_again_updates_format_and_resends_state() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    c.send(json!({"action": "subscribe", "hash": ACME,
                  "requests": [{"type": "state", "trackers": [101], "format": "compact"}]}))
        .await;
    let resp = c.recv().await;
    assert_eq!(resp["data"]["state"]["value"]["101"], "normal");
    let again = c.recv().await;
    assert!(is_state_of(&again, 101));
    assert!(again["data"].get("gsm").is_none(), "now compact: {again}");
    app.set_speed(&[101], 9).await;
    let (ev, _) = c.recv_until(|v| is_state_with_speed(v, 101, 9)).await;
    assert!(
        ev["data"].get("battery_level").is_none(),
        "changes compact too"
    );
}

#[tokio::test]
async fn one_connection_holds_several_sessions() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    c.subscribe_and_states(RIVAL, &[201], 1).await;
    app.set_speed(&[201], 21).await;
    c.recv_until(|v| is_state_with_speed(v, 201, 21)).await;
    app.set_speed(&[101], 11).await;
    c.recv_until(|v| is_state_with_speed(v, 101, 11)).await;
}

#[tokio::test]
async fn subscribe_of_many_trackers_uses_one_status_query() {
    // 2,000 trackers in one request: every status comes back in one response.
    let app = spawn_app().await;
    app.exec(
        "INSERT INTO trackers (id, account_id, source_id, label) \
         SELECT g, 1, 500000 + g, 'Bulk ' || g FROM generate_series(1000, 2999) g; \
         INSERT INTO tracker_states (tracker_id) SELECT g FROM generate_series(1000, 2999) g;",
    )
    .await;
    let ids: Vec<i64> = (1000..3000).collect();
    let mut c = app.connect().await;
    let (resp, states) = c.subscribe_and_states(ACME, &ids, 2000).await;
    let map = resp["data"]["state"].as_object().unwrap();
    assert_eq!(map.len(), 2000);
    assert!(map.values().all(|s| s == "normal"));
    assert_eq!(states.len(), 2000);
}

#[tokio::test]
async fn states_that_cannot_be_read_after_the_response_still_arrive() {
    // The response goes out once the statuses are read; the states are read beside it. When
    // that read fails (here: the table is renamed away for a moment), the socket reads them
    // again until it can.
    let app = spawn_app().await;
    app.wait_ready().await;
    app.exec("ALTER TABLE tracker_states RENAME TO tracker_states_away")
        .await;
    let mut c = app.connect().await;
    let resp = c.subscribe(ACME, &[101, 102]).await;
    assert_eq!(
        resp["data"]["state"],
        json!({"101": "normal", "102": "normal"})
    );
    app.exec("ALTER TABLE tracker_states_away RENAME TO tracker_states")
        .await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        let v = c.recv().await;
        assert_eq!(v["event"], "state", "{v}");
        seen.insert(v["tracker_id"].as_i64().unwrap_or(0));
    }
    assert_eq!(seen, [101, 102].into_iter().collect());
}

#[tokio::test]
async fn a_tracker_disallowed_to_a_second_session_is_not_sent_again() {
    // 103 is watched under ACME; the sub-user's subscribe answers it `disallowed` and must not
    // re-send its state, while 101 (allowed to both) is sent.
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[103], 1).await;
    let (resp, states) = c.subscribe_and_states(SUB, &[103, 101], 1).await;
    assert_eq!(
        resp["data"]["state"],
        json!({"103": "disallowed", "101": "normal"})
    );
    assert!(is_state_of(&states[0], 101), "{}", states[0]);
    app.set_speed(&[101], 31).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 101, 31)).await;
    assert!(skipped.is_empty(), "{skipped:?}");
}

#[tokio::test]
async fn a_malformed_state_item_does_not_hide_an_accepted_one() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state", "trackers": "x"},
        {"type": "state", "trackers": [101]},
        {"type": "state", "trackers": [102], "format": "tiny"},
        {"type": "state", "trackers": [103], "format": "compact"}]}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type": "response", "action": "subscription/subscribe", "events": ["state"],
               "data": {"state": {"success": true,
                                  "value": {"101": "normal", "103": "normal"}}}})
    );
    let mut ids = vec![
        c.recv().await["tracker_id"].as_i64(),
        c.recv().await["tracker_id"].as_i64(),
    ];
    ids.sort_unstable();
    assert_eq!(ids, [Some(101), Some(103)]);
}

#[tokio::test]
async fn a_refused_resubscribe_leaves_the_watch_as_it_was() {
    // 101 and 103 are watched under ACME: full format, Berlin time.
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 103], 2).await;
    // Sessions that may not see them ask for them in compact form (RIVAL, in UTC: `unknown`;
    // the sub-user without a grant for 103: `disallowed`).
    for (hash, id, status) in [(RIVAL, 101, "unknown"), (SUB, 103, "disallowed")] {
        c.send(json!({"action": "subscribe", "hash": hash,
                      "requests": [{"type": "state", "trackers": [id], "format": "compact"}]}))
            .await;
        let resp = c.recv().await;
        assert_eq!(
            resp["data"]["state"]["value"][id.to_string()],
            status,
            "{resp}"
        );
    }
    // Their events still come as ACME asked.
    app.set_speed(&[101, 103], 44).await;
    for id in [101, 103] {
        let (ev, _) = c.recv_until(|v| is_state_with_speed(v, id, 44)).await;
        assert!(ev["data"].get("gsm").is_some(), "still full: {ev}");
        assert_eq!(
            ev["data"]["gps"]["updated"], "2018-10-17 12:51:43",
            "still Berlin time"
        );
    }
}

#[tokio::test]
async fn a_state_another_socket_already_has_still_arrives_after_a_failed_read() {
    // Socket A watches 101 and has seen a change of it, so the hub has fanned that state out.
    let app = spawn_app().await;
    let mut a = app.connect().await;
    a.subscribe_and_states(ACME, &[101], 1).await;
    app.set_speed(&[101], 17).await;
    a.recv_until(|v| is_state_with_speed(v, 101, 17)).await;
    // B subscribes while the states cannot be read (the table is renamed away for a moment):
    // its response says `normal`, so 101's current state must still reach it, although the hub
    // would not fan the same state out again.
    app.exec("ALTER TABLE tracker_states RENAME TO tracker_states_away")
        .await;
    let mut b = app.connect().await;
    let resp = b.subscribe(ACME, &[101]).await;
    app.exec("ALTER TABLE tracker_states_away RENAME TO tracker_states")
        .await;
    assert_eq!(resp["data"]["state"], json!({"101": "normal"}));
    let s = b.recv().await;
    assert!(is_state_with_speed(&s, 101, 17), "{s}");
    // Sent once: the next frame is the next change.
    app.set_speed(&[101], 18).await;
    let s = b.recv().await;
    assert!(is_state_with_speed(&s, 101, 18), "{s}");
}

#[tokio::test]
async fn a_resubscribe_whose_read_fails_still_resends_the_state_in_the_new_format() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    app.exec("ALTER TABLE tracker_states RENAME TO tracker_states_away")
        .await;
    c.send(json!({"action": "subscribe", "hash": ACME,
                  "requests": [{"type": "state", "trackers": [101], "format": "compact"}]}))
        .await;
    let resp = c.recv().await;
    app.exec("ALTER TABLE tracker_states_away RENAME TO tracker_states")
        .await;
    assert_eq!(resp["data"]["state"]["value"]["101"], "normal", "{resp}");
    let again = c.recv().await;
    assert!(is_state_of(&again, 101), "{again}");
    assert!(again["data"].get("gsm").is_none(), "now compact: {again}");
}
