//! `state_batch`: first batch, deltas, newest-state-wins, no empty batches, growing `all`
//! targets, selected targets, rate limits, mixed requests, unsubscribe, lifecycle, shared groups.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn batch_request(target: Value, rate: &str, format: &str) -> Value {
    json!({"type": "state_batch", "target": target, "rate_limit": rate, "format": format})
}

async fn subscribe_batch(c: &mut Client, hash: &str, req: Value) -> Value {
    c.send(json!({"action": "subscribe", "hash": hash, "requests": [req]}))
        .await;
    c.recv().await
}

/// tracker_id → speed of each item of a batch event.
fn items(v: &Value) -> HashMap<i64, i64> {
    assert_eq!(v["event"], "state_batch", "{v}");
    let mut out = HashMap::new();
    for item in v["data"].as_array().expect("data array") {
        assert_eq!(item["type"], "source_state_event");
        let id = item["tracker_id"].as_i64().expect("tracker_id");
        let prev = out.insert(id, item["state"]["gps"]["speed"].as_i64().unwrap_or(-1));
        assert!(prev.is_none(), "tracker {id} twice in one batch: {v}");
    }
    out
}

/// The tracker ids of each of the next `n` batches, sorted (and the batches sorted by them).
async fn first_batches(c: &mut Client, n: usize) -> Vec<Vec<i64>> {
    let mut batches = Vec::new();
    for _ in 0..n {
        let mut ids: Vec<i64> = items(&c.recv().await).into_keys().collect();
        ids.sort_unstable();
        batches.push(ids);
    }
    batches.sort_unstable();
    batches
}

/// The next response, skipping the batches before it.
async fn next_response(c: &mut Client) -> Value {
    c.recv_until(|v| v["type"] == "response").await.0
}

/// A dashboard of RIVAL's `all` batch (compact, 200 ms), past its first batch (tracker 201).
async fn rival_all_dashboard(app: &TestApp) -> Client {
    let mut c = app.connect().await;
    subscribe_batch(
        &mut c,
        RIVAL,
        batch_request(json!({"type": "all"}), "200ms", "compact"),
    )
    .await;
    assert_eq!(
        items(&c.recv().await).into_keys().collect::<Vec<_>>(),
        [201]
    );
    c
}

async fn next_batch(c: &mut Client) -> Value {
    c.recv_until(|v| v["event"] == "state_batch").await.0
}

#[tokio::test]
async fn first_batch_then_only_changed_trackers() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let resp = subscribe_batch(
        &mut c,
        ACME,
        batch_request(json!({"type": "all"}), "200ms", "compact"),
    )
    .await;
    assert_eq!(
        resp,
        json!({"type": "response", "action": "subscription/subscribe", "events": ["state_batch"],
               "data": {"state_batch": {"success": true, "value": {
                   "101": "normal", "102": "normal", "103": "normal", "104": "normal", "105": "blocked"}}}})
    );
    let first = c.recv().await;
    let mut ids: Vec<i64> = items(&first).into_keys().collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        [101, 102, 103, 104],
        "every non-blocked tracker of the account"
    );
    let item = &first["data"][0];
    assert_eq!(item["state"]["source_id"], 10101);
    assert!(item["state"].get("gsm").is_none(), "compact format");
    assert_eq!(
        item["state"]["last_update"], "2018-10-17 12:51:46",
        "user's zone"
    );
    assert!(first["user_time"].is_string());

    app.set_speed(&[102], 40).await;
    let b = next_batch(&mut c).await;
    assert_eq!(items(&b), HashMap::from([(102, 40)]));
    app.set_speed(&[101, 104], 41).await;
    let b = next_batch(&mut c).await;
    assert_eq!(items(&b), HashMap::from([(101, 41), (104, 41)]));
}

/// A compact group reads only the columns the compact format renders, and its trackers' source
/// ids from the tracker read: its first batch holds, for each tracker, what a compact `state`
/// event of that tracker holds (the optional `precision` and `gsm_lbs` included).
#[tokio::test]
async fn a_compact_first_batch_holds_what_compact_state_events_hold() {
    let app = spawn_app().await;
    app.exec("UPDATE tracker_states SET gps_precision = 7, gsm_lbs = true WHERE tracker_id = 102")
        .await;
    let mut watcher = app.connect().await;
    watcher
        .send(json!({"action": "subscribe", "hash": ACME, "requests": [
            {"type": "state", "trackers": [101, 102, 103, 104], "format": "compact"}]}))
        .await;
    assert_eq!(watcher.recv().await["type"], "response");
    let mut states: HashMap<i64, Value> = HashMap::new();
    while states.len() < 4 {
        let v = watcher.recv().await;
        assert_eq!(v["event"], "state", "{v}");
        states.insert(
            v["tracker_id"].as_i64().expect("tracker_id"),
            v["data"].clone(),
        );
    }
    assert_eq!(states[&102]["gps"]["precision"], 7);
    assert_eq!(states[&102]["gps"]["gsm_lbs"], true);

    let mut c = app.connect().await;
    let resp = subscribe_batch(
        &mut c,
        ACME,
        batch_request(json!({"type": "all"}), "1s", "compact"),
    )
    .await;
    assert_eq!(resp["type"], "response", "{resp}");
    let first = c.recv().await;
    assert_eq!(items(&first).len(), 4, "{first}");
    for item in first["data"].as_array().expect("data array") {
        let id = item["tracker_id"].as_i64().expect("tracker_id");
        assert_eq!(item["state"], states[&id], "tracker {id}");
    }
}

#[tokio::test]
async fn newest_state_wins_within_a_period_and_empty_periods_send_nothing() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    subscribe_batch(
        &mut c,
        ACME,
        batch_request(json!({"type": "all"}), "1s", "full"),
    )
    .await;
    items(&c.recv().await);
    for speed in 1..=20 {
        app.set_speed(&[103], speed).await;
    }
    let mut seen = 0;
    loop {
        let b = items(&next_batch(&mut c).await);
        assert_eq!(b.keys().collect::<Vec<_>>(), [&103]);
        seen += 1;
        if b[&103] == 20 {
            break;
        }
    }
    assert!(
        seen <= 3,
        "20 quick writes arrive in a few batches, not {seen}"
    );
    // Nothing changed since: the next periods send nothing (checked over 2.5 periods).
    let quiet = tokio::time::timeout(Duration::from_millis(2500), c.next()).await;
    assert!(quiet.is_err(), "no batch for empty periods: {quiet:?}");
}

#[tokio::test]
async fn all_picks_up_trackers_added_later() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    subscribe_batch(
        &mut c,
        ACME,
        batch_request(json!({"type": "all"}), "200ms", "compact"),
    )
    .await;
    items(&c.recv().await);
    app.exec(
        "INSERT INTO trackers (id, account_id, source_id, label) VALUES (107, 1, 10107, 'Truck 7'); \
         INSERT INTO tracker_states (tracker_id, speed) VALUES (107, 70);",
    )
    .await;
    let (b, _) = c
        .recv_until(|v| v["event"] == "state_batch" && items(v).contains_key(&107))
        .await;
    assert_eq!(items(&b)[&107], 70);
    // Another account's new tracker never shows up; ours keeps flowing.
    app.exec(
        "INSERT INTO trackers (id, account_id, source_id, label) VALUES (202, 3, 20202, 'Rival 2'); \
         INSERT INTO tracker_states (tracker_id, speed) VALUES (202, 71);",
    )
    .await;
    app.set_speed(&[107], 72).await;
    let b = next_batch(&mut c).await;
    assert_eq!(items(&b), HashMap::from([(107, 72)]));
}

/// A tracker moved into an account joins that account's `all` batches with its state; the
/// `corrupt` announcing the move is for its old account's viewers alone. (The move notifies
/// `t|…:corrupt` and `n|<new account>` together: with both in one round, the new account's
/// group used to admit the tracker and then take the `corrupt` as its own, forget it, and
/// leave the hub's entry blocked, so that it never saw the tracker again.)
#[tokio::test]
async fn a_tracker_moved_in_joins_all_and_only_its_old_viewers_get_corrupt() {
    let app = spawn_app().await;
    let mut old = app.connect().await;
    old.subscribe(ACME, &[101]).await;
    old.recv_until(|v| v["event"] == "state").await;
    let mut new = rival_all_dashboard(&app).await;

    app.exec("UPDATE trackers SET account_id = 3 WHERE id = 101")
        .await;
    let (corrupt, _) = old.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(corrupt["data"]["lifecycle_event"], "corrupt", "{corrupt}");
    app.set_speed(&[101], 55).await;
    let (b, before) = new
        .recv_until(|v| v["event"] == "state_batch" && items(v).get(&101) == Some(&55))
        .await;
    assert!(
        before.iter().all(|v| v["event"] != "lifecycle"),
        "no lifecycle event for the new account: {before:?} then {b}"
    );
    // A `state` subscriber of the new account gets it too; the old viewer nothing more.
    let mut state = app.connect().await;
    let resp = state.subscribe(RIVAL, &[101]).await;
    assert_eq!(resp["data"]["state"]["101"], "normal", "{resp}");
    state.recv_until(|v| v["event"] == "state").await;
    // And it stays: later changes come in later batches.
    app.set_speed(&[101], 56).await;
    let (b, before) = new
        .recv_until(|v| v["event"] == "state_batch" && items(v).get(&101) == Some(&56))
        .await;
    assert!(
        before.iter().all(|v| v["event"] != "lifecycle"),
        "{before:?} then {b}"
    );
    state.recv_until(|v| is_state_with_speed(v, 101, 56)).await;
    let quiet = tokio::time::timeout(Duration::from_millis(300), old.next()).await;
    assert!(quiet.is_err(), "nothing for the old viewer: {quiet:?}");
}

/// A tracker that joins an `all` target blocked (here moved in and blocked in one
/// transaction) is announced to the dashboards with `block`: a fresh subscribe would answer it
/// `blocked`, and its later `unblock` must not name a tracker the dashboard never heard of.
#[tokio::test]
async fn a_tracker_that_joins_all_blocked_is_announced_with_block() {
    let app = spawn_app().await;
    let mut new = rival_all_dashboard(&app).await;

    app.exec("UPDATE trackers SET account_id = 3, blocked = true WHERE id = 101")
        .await;
    let (block, _) = new.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(block["tracker_id"], 101, "{block}");
    assert_eq!(block["data"]["lifecycle_event"], "block", "{block}");
    let mut fresh = app.connect().await;
    let resp = subscribe_batch(
        &mut fresh,
        RIVAL,
        batch_request(json!({"type": "all"}), "200ms", "compact"),
    )
    .await;
    assert_eq!(
        resp["data"]["state_batch"]["value"]["101"], "blocked",
        "{resp}"
    );

    // Its unblock follows, and then its state in a batch.
    app.exec("UPDATE trackers SET blocked = false WHERE id = 101")
        .await;
    let (unblock, _) = new.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(unblock["data"]["lifecycle_event"], "unblock", "{unblock}");
    new.recv_until(|v| v["event"] == "state_batch" && items(v).contains_key(&101))
        .await;
}

/// A dashboard joining a batch another already shares, later in the period, gets the latest
/// states right away: not only those of the period's first join (an hour old here, at worst,
/// and older than a state its socket already had as a `state` event).
#[tokio::test]
async fn joining_a_shared_batch_later_in_its_period_starts_at_the_latest_states() {
    let app = spawn_app().await;
    let req = batch_request(
        json!({"type": "selected", "tracker_ids": [101, 102]}),
        "1h",
        "full",
    );
    let mut first = app.connect().await;
    subscribe_batch(&mut first, ACME, req.clone()).await;
    first.recv_until(|v| v["event"] == "state_batch").await;

    let mut late = app.connect().await;
    late.subscribe_and_states(ACME, &[101], 1).await;
    app.set_speed(&[101], 77).await;
    late.recv_until(|v| is_state_with_speed(v, 101, 77)).await;
    late.send(json!({"action": "subscribe", "hash": ACME, "requests": [req]}))
        .await;
    late.recv_until(|v| v["event"] == "state_batch" && items(v).get(&101) == Some(&77))
        .await;
    // And the dashboard that was there first gets it at its next period, not before.
    let quiet = tokio::time::timeout(Duration::from_millis(300), first.next()).await;
    assert!(quiet.is_err(), "{quiet:?}");
}

/// One socket watching a tracker with its old account's session and in its new account's `all`
/// batch: the move (and block, in one transaction) is `corrupt` for the watch and `block` for
/// the batch, both at the move's change number, and the socket sends both.
#[tokio::test]
async fn a_socket_of_both_accounts_gets_the_moves_corrupt_and_the_batchs_block() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    subscribe_batch(
        &mut c,
        RIVAL,
        batch_request(json!({"type": "all"}), "200ms", "compact"),
    )
    .await;
    c.recv_until(|v| v["event"] == "state_batch").await;
    app.exec("UPDATE trackers SET account_id = 3, blocked = true WHERE id = 101")
        .await;
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let (v, _) = c
            .recv_until(|v| v["event"] == "lifecycle" && v["tracker_id"] == 101)
            .await;
        kinds.push(
            v["data"]["lifecycle_event"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    kinds.sort();
    assert_eq!(kinds, ["block", "corrupt"]);
}

#[tokio::test]
async fn a_sub_user_batch_covers_its_grants_and_new_grants() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let resp = subscribe_batch(
        &mut c,
        SUB,
        batch_request(json!({"type": "all"}), "200ms", "compact"),
    )
    .await;
    assert_eq!(
        resp["data"]["state_batch"]["value"],
        json!({"101": "normal", "102": "normal"})
    );
    let mut ids: Vec<i64> = items(&c.recv().await).into_keys().collect();
    ids.sort_unstable();
    assert_eq!(ids, [101, 102]);
    app.exec("INSERT INTO tracker_grants (user_id, tracker_id) VALUES (2, 103)")
        .await;
    app.set_speed(&[103], 33).await;
    c.recv_until(|v| v["event"] == "state_batch" && items(v).get(&103) == Some(&33))
        .await;
}

#[tokio::test]
async fn selected_target_reports_every_named_id() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let resp = subscribe_batch(
        &mut c,
        SUB,
        batch_request(
            json!({"type": "selected", "tracker_ids": [102, 103, 201, 999]}),
            "200ms",
            "full",
        ),
    )
    .await;
    assert_eq!(
        resp["data"]["state_batch"]["value"],
        json!({"102": "normal", "103": "disallowed", "201": "unknown", "999": "unknown"})
    );
    let first = c.recv().await;
    assert_eq!(items(&first).into_keys().collect::<Vec<_>>(), [102]);
    assert!(
        first["data"][0]["state"].get("gsm").is_some(),
        "full format"
    );
    app.set_speed(&[101], 1).await; // not in the target
    app.set_speed(&[102], 2).await;
    let b = next_batch(&mut c).await;
    assert_eq!(items(&b), HashMap::from([(102, 2)]));
}

#[tokio::test]
async fn rate_limit_errors_and_mixed_requests() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    // Only an invalid batch: a plain error with code 7.
    let err = subscribe_batch(
        &mut c,
        ACME,
        batch_request(json!({"type": "all"}), "fast", "full"),
    )
    .await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["status"]["code"], 7);
    // Mixed: state succeeds, the invalid batch fails in its own slot.
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state", "trackers": [101]},
        batch_request(json!({"type": "all"}), "5ms", "full")]}))
        .await;
    let resp = c.recv().await;
    assert_eq!(resp["events"], json!(["state", "state_batch"]));
    assert_eq!(
        resp["data"]["state"],
        json!({"success": true, "value": {"101": "normal"}})
    );
    assert_eq!(resp["data"]["state_batch"]["success"], false);
    assert_eq!(resp["data"]["state_batch"]["status"]["code"], 7);
    assert!(is_state_of(&c.recv().await, 101));
    // Mixed and both valid: response, the initial state, the first batch.
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state", "trackers": [102]},
        batch_request(json!({"type": "selected", "tracker_ids": [103]}), "200ms", "compact")]}))
        .await;
    let resp = c.recv().await;
    assert_eq!(resp["data"]["state"]["value"], json!({"102": "normal"}));
    assert_eq!(
        resp["data"]["state_batch"]["value"],
        json!({"103": "normal"})
    );
    let mut rest = [c.recv().await, c.recv().await];
    rest.sort_by_key(|v| v["event"].as_str().unwrap_or("").to_string());
    assert!(is_state_of(&rest[0], 102));
    assert_eq!(items(&rest[1]).into_keys().collect::<Vec<_>>(), [103]);
}

#[tokio::test]
async fn unsubscribing_the_batch_leaves_state_flowing() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state", "trackers": [101]},
        batch_request(json!({"type": "all"}), "100ms", "compact")]}))
        .await;
    c.recv().await;
    c.recv_until(|v| v["event"] == "state_batch").await;
    c.send(json!({"action": "unsubscribe", "hash": ACME, "requests": [{"type": "state_batch"}]}))
        .await;
    let (r, _) = c.recv_until(|v| v["type"] == "response").await;
    assert_eq!(r["action"], "subscription/unsubscribe");
    app.until("the group retires", || app.hub.batches.group_count() == 0)
        .await;
    app.set_speed(&[101], 61).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 101, 61)).await;
    assert!(skipped
        .iter()
        .all(|v| v["event"] != "state_batch" || !items(v).contains_key(&101)));
    let quiet = tokio::time::timeout(Duration::from_millis(500), c.next()).await;
    assert!(quiet.is_err(), "no batches after unsubscribe: {quiet:?}");
}

/// A group nobody holds any more retires at once, not at its next period: with a rate of an
/// hour it stayed registered in the hub (its trackers watched, their states read and kept) for
/// up to an hour after its last dashboard left, and a client reconnecting could pile them up.
#[tokio::test]
async fn a_group_retires_when_its_last_member_leaves_not_at_its_next_period() {
    let app = spawn_app().await;
    let mut a = app.connect().await;
    let mut b = app.connect().await;
    for c in [&mut a, &mut b] {
        subscribe_batch(
            c,
            ACME,
            batch_request(json!({"type": "all"}), "1h", "compact"),
        )
        .await;
        next_batch(c).await;
    }
    assert_eq!(app.hub.batches.group_count(), 1);
    // One member leaves by unsubscribing: the other still holds the group.
    a.send(json!({"action": "unsubscribe", "hash": ACME, "requests": [{"type": "state_batch"}]}))
        .await;
    next_response(&mut a).await;
    assert_eq!(app.hub.batches.group_count(), 1);
    assert!(app.hub.is_watched(101));
    // The last one closes its socket.
    drop(b);
    app.until("the group to retire", || {
        app.hub.batches.group_count() == 0 && !app.hub.is_watched(101)
    })
    .await;
    // A new dashboard gets a new group, filled afresh.
    subscribe_batch(
        &mut a,
        ACME,
        batch_request(json!({"type": "all"}), "1h", "compact"),
    )
    .await;
    assert_eq!(items(&next_batch(&mut a).await).len(), 4);
}

/// A group whose fill fails (the database fails a read after some trackers were admitted)
/// does not stay behind: it was never joined and its task never started, so its trackers
/// stayed watched, read and kept for the life of the process.
#[tokio::test]
async fn a_batch_whose_fill_fails_leaves_no_group_behind() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    // The target and the trackers' facts are read; the states' (or readings') read fails.
    for (kind, table) in [
        ("state_batch", "tracker_states"),
        ("readings_batch", "sensor_values"),
    ] {
        app.exec(&format!("ALTER TABLE {table} RENAME TO {table}_away"))
            .await;
        c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
            {"type": kind, "target": {"type": "all"}, "rate_limit": "1h"}]}))
            .await;
        let r = next_response(&mut c).await;
        assert_eq!(r["data"][kind]["success"], false, "{r}");
        app.exec(&format!("ALTER TABLE {table}_away RENAME TO {table}"))
            .await;
    }
    app.until("nothing to be left of the failed group", || {
        app.hub.batches.group_count() == 0 && app.hub.tracker_count() == 0
    })
    .await;
    // Asked for again, the batch is filled afresh.
    let r = subscribe_batch(
        &mut c,
        ACME,
        batch_request(json!({"type": "all"}), "1h", "compact"),
    )
    .await;
    assert_eq!(r["data"]["state_batch"]["success"], true, "{r}");
    let first = items(&next_batch(&mut c).await);
    assert!(
        [101, 102, 103, 104].iter().all(|id| first.contains_key(id)),
        "{first:?}"
    );
    assert_eq!(app.hub.batches.group_count(), 1);
}

/// A `selected` batch shared by several dashboards: an id that becomes visible after the group
/// was filled (restored, granted, moved in) is picked up by the next subscribe that names it,
/// which answers it `normal` and must then deliver it. The group used to keep the trackers it
/// was filled with, so that subscribe was answered `normal` and got nothing for it.
#[tokio::test]
async fn a_selected_batch_picks_up_a_tracker_visible_since_it_was_filled() {
    let app = spawn_app().await;
    let selected = || {
        batch_request(
            json!({"type": "selected", "tracker_ids": [101, 106]}),
            "100ms",
            "compact",
        )
    };
    let mut first = app.connect().await;
    let r = subscribe_batch(&mut first, ACME, selected()).await;
    assert_eq!(
        r["data"]["state_batch"]["value"],
        json!({"101": "normal", "106": "unknown"}),
        "{r}"
    );
    next_batch(&mut first).await;
    // 106 is restored; another dashboard asks for the same batch and joins the same group.
    app.exec("UPDATE trackers SET removed = false WHERE id = 106")
        .await;
    let mut second = app.connect().await;
    let r = subscribe_batch(&mut second, ACME, selected()).await;
    assert_eq!(
        r["data"]["state_batch"]["value"],
        json!({"101": "normal", "106": "normal"}),
        "{r}"
    );
    assert_eq!(app.hub.batches.group_count(), 1, "one group for both");
    let batch = items(&next_batch(&mut second).await);
    assert!(
        batch.contains_key(&106),
        "106 in the first batch: {batch:?}"
    );
    // Its changes reach both dashboards from now on.
    app.set_speed(&[106], 66).await;
    for c in [&mut first, &mut second] {
        c.recv_until(|v| v["event"] == "state_batch" && items(v).get(&106) == Some(&66))
            .await;
    }
}

#[tokio::test]
async fn lifecycle_during_batching() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    subscribe_batch(
        &mut c,
        ACME,
        batch_request(json!({"type": "all"}), "200ms", "compact"),
    )
    .await;
    items(&c.recv().await);
    app.exec("UPDATE trackers SET blocked = true WHERE id = 102")
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type": "event", "event": "lifecycle", "tracker_id": 102,
               "data": {"source_id": 10102, "lifecycle_event": "block"}})
    );
    app.set_speed(&[102], 90).await;
    app.set_speed(&[103], 91).await;
    let b = next_batch(&mut c).await;
    assert_eq!(
        items(&b),
        HashMap::from([(103, 91)]),
        "blocked 102 drops out"
    );
    app.exec("UPDATE trackers SET blocked = false WHERE id = 102")
        .await;
    assert_eq!(c.recv().await["data"]["lifecycle_event"], "unblock");
    let b = next_batch(&mut c).await;
    assert_eq!(
        items(&b),
        HashMap::from([(102, 90)]),
        "back in the next batch at its latest"
    );
    app.exec("UPDATE trackers SET removed = true WHERE id = 104")
        .await;
    assert_eq!(c.recv().await["data"]["lifecycle_event"], "corrupt");
    app.exec(&format!(
        "UPDATE sessions SET revoked_at = now() WHERE hash = '{ACME}'"
    ))
    .await;
    let (code, before) = c.recv_close().await;
    assert_eq!(
        before.last().map(|v| v["event"].clone()),
        Some("logout".into())
    );
    assert!(code.is_some());
    app.until("the group retires", || app.hub.batches.group_count() == 0)
        .await;
    // Removed 104 included: the hub keeps no entry for a tracker no group watches any more.
    app.until("the hub forgets every tracker", || {
        app.hub.tracker_count() == 0
    })
    .await;
}

#[tokio::test]
async fn dashboards_asking_the_same_share_one_group() {
    let app = spawn_app().await;
    let mut clients = Vec::new();
    for hash in [ACME, ACME2, ACME] {
        let mut c = app.connect().await;
        subscribe_batch(
            &mut c,
            hash,
            batch_request(json!({"type": "all"}), "200ms", "compact"),
        )
        .await;
        items(&c.recv().await);
        clients.push(c);
    }
    assert_eq!(
        app.hub.batches.group_count(),
        1,
        "same account, target, rate and format"
    );
    app.set_speed(&[101], 7).await;
    let mut frames = Vec::new();
    for c in &mut clients {
        let b = next_batch(c).await;
        assert_eq!(items(&b), HashMap::from([(101, 7)]));
        frames.push(b);
    }
    assert!(
        frames.windows(2).all(|w| w[0] == w[1]),
        "the same bytes to every member"
    );
    // A different format is another group.
    let mut other = app.connect().await;
    subscribe_batch(
        &mut other,
        ACME,
        batch_request(json!({"type": "all"}), "200ms", "full"),
    )
    .await;
    assert_eq!(app.hub.batches.group_count(), 2);
}

#[tokio::test]
async fn a_large_response_is_the_same_for_every_member_until_a_status_changes() {
    let app = spawn_app().await;
    app.add_vans(10_000..=14_999).await;
    let req = || batch_request(json!({"type": "all"}), "200ms", "compact");
    let mut responses = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = app.connect().await;
        responses.push(subscribe_batch(&mut c, ACME, req()).await);
        clients.push(c);
    }
    assert_eq!(responses[0], responses[1]);
    let map = responses[0]["data"]["state_batch"]["value"]
        .as_object()
        .expect("a status map")
        .clone();
    assert!(map.len() > 5_000, "{} statuses", map.len());
    assert_eq!(map["10000"], "normal");
    assert_eq!(map["14999"], "normal");

    app.exec("UPDATE trackers SET blocked = true WHERE id = 10000")
        .await;
    for c in &mut clients {
        let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
        assert_eq!(ev["tracker_id"], 10000);
    }
    let mut late = app.connect().await;
    let after = subscribe_batch(&mut late, ACME, req()).await;
    let after = after["data"]["state_batch"]["value"]
        .as_object()
        .expect("a status map");
    assert_eq!(
        after["10000"], "blocked",
        "not the map from before the block"
    );
    assert_eq!(after.len(), map.len());
    assert!(map
        .iter()
        .all(|(id, status)| id == "10000" || after[id] == *status));
}

#[tokio::test]
async fn a_revoked_grant_leaves_the_sub_users_batches() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    subscribe_batch(
        &mut c,
        SUB,
        batch_request(json!({"type": "all"}), "200ms", "compact"),
    )
    .await;
    items(&c.recv().await);
    app.exec("DELETE FROM tracker_grants WHERE user_id = 2 AND tracker_id = 102")
        .await;
    let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(
        ev,
        json!({"type": "event", "event": "lifecycle", "tracker_id": 102,
               "data": {"source_id": 10102, "lifecycle_event": "disallowed"}})
    );
    app.set_speed(&[102], 80).await;
    app.set_speed(&[101], 81).await;
    let b = next_batch(&mut c).await;
    assert_eq!(
        items(&b),
        HashMap::from([(101, 81)]),
        "102 no longer in the batches"
    );
}

/// A socket that watches a tracker both as a `state` subscription and in batch groups gets one
/// `disallowed` for it when the grant goes (it got one per group and one for the watch), and
/// one again for a later revocation.
#[tokio::test]
async fn a_revoked_grant_is_announced_once_per_socket() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.send(json!({"action": "subscribe", "hash": SUB, "requests": [
        {"type": "state", "trackers": [101, 102]},
        batch_request(json!({"type": "all"}), "200ms", "compact"),
        batch_request(json!({"type": "selected", "tracker_ids": [101, 102]}), "300ms", "full")]}))
        .await;
    next_response(&mut c).await;
    let disallowed = |v: &Value| v["data"]["lifecycle_event"] == "disallowed";
    for round in 0..2 {
        app.exec("DELETE FROM tracker_grants WHERE user_id = 2 AND tracker_id = 102")
            .await;
        let speed = 81 + round;
        app.set_speed(&[101], speed).await;
        // Both groups' batches with the new state come after every event of the revocation.
        let mut seen = Vec::new();
        let mut batches = 0;
        while batches < 2 {
            let v = c.recv().await;
            if v["event"] == "state_batch" && items(&v).get(&101) == Some(&i64::from(speed)) {
                batches += 1;
            }
            seen.push(v);
        }
        let events: Vec<&Value> = seen.iter().filter(|v| disallowed(v)).collect();
        assert_eq!(events.len(), 1, "round {round}: {events:?}");
        assert_eq!(events[0]["tracker_id"], 102);
        // Granted again and watched again, for the next round.
        app.exec("INSERT INTO tracker_grants (user_id, tracker_id) VALUES (2, 102)")
            .await;
        c.send(json!({"action": "subscribe", "hash": SUB, "requests": [
            {"type": "state", "trackers": [102]}]}))
            .await;
        next_response(&mut c).await;
        app.until("the groups to hold 102 again", || {
            app.hub.batches.group_count() == 2
        })
        .await;
    }
}

#[tokio::test]
async fn a_connection_joins_at_most_max_batch_subscriptions_groups() {
    let app = spawn_app_with(|s| s.websocket.max_batch_subscriptions = 2).await;
    let mut c = app.connect().await;
    let all = || json!({"type": "all"});
    // Two groups that differ only in `rate_limit`: both accepted.
    for rate in ["100ms", "101ms"] {
        c.send(json!({"action": "subscribe", "hash": ACME,
                      "requests": [batch_request(all(), rate, "compact")]}))
            .await;
        let r = next_response(&mut c).await;
        assert_eq!(r["data"]["state_batch"]["success"], true, "{r}");
    }
    assert_eq!(app.hub.batches.group_count(), 2);
    // A third distinct one (another rate, a readings filter) fails in its slot with code 9 and
    // creates nothing; the `state` item beside it still succeeds.
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state", "trackers": [101]},
        batch_request(all(), "102ms", "compact"),
        {"type": "readings_batch", "target": all(), "sensor_type": "fuel"}]}))
        .await;
    let r = next_response(&mut c).await;
    assert_eq!(
        r["data"]["state"],
        json!({"success": true, "value": {"101": "normal"}})
    );
    for kind in ["state_batch", "readings_batch"] {
        assert_eq!(r["data"][kind]["success"], false, "{r}");
        assert_eq!(r["data"][kind]["status"]["code"], 9, "{r}");
    }
    // Many distinct items in one message: none of them creates a group.
    let many: Vec<Value> = (200..260)
        .map(|ms| batch_request(all(), &format!("{ms}ms"), "full"))
        .collect();
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": many}))
        .await;
    let r = next_response(&mut c).await;
    assert_eq!(r["data"]["state_batch"]["status"]["code"], 9, "{r}");
    assert_eq!(app.hub.batches.group_count(), 2);
    // A group the socket is already in is not counted again, whichever session asks.
    for hash in [ACME, ACME2] {
        c.send(json!({"action": "subscribe", "hash": hash,
                      "requests": [batch_request(all(), "101ms", "compact")]}))
            .await;
        let r = next_response(&mut c).await;
        assert_eq!(r["data"]["state_batch"]["success"], true, "{r}");
    }
    assert_eq!(app.hub.batches.group_count(), 2);
    // Leaving groups frees places.
    c.send(json!({"action": "unsubscribe", "hash": ACME, "requests": [
        {"type": "state_batch", "target": all()}]}))
        .await;
    next_response(&mut c).await;
    c.send(json!({"action": "subscribe", "hash": ACME,
                  "requests": [batch_request(all(), "5s", "full")]}))
        .await;
    let r = next_response(&mut c).await;
    assert_eq!(r["data"]["state_batch"]["success"], true, "{r}");
}

#[tokio::test]
async fn batch_items_of_one_type_answer_together() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    // A malformed item first, then two valid ones: the accepted ones' maps, merged.
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        batch_request(json!({"type": "all"}), "fast", "full"),
        batch_request(json!({"type": "selected", "tracker_ids": [101]}), "200ms", "full"),
        batch_request(json!({"type": "selected", "tracker_ids": [102, 105]}), "300ms", "full")]}))
        .await;
    let resp = c.recv().await;
    assert_eq!(
        resp["data"]["state_batch"],
        json!({"success": true, "value": {"101": "normal", "102": "normal", "105": "blocked"}}),
        "{resp}"
    );
    let firsts = first_batches(&mut c, 2).await;
    assert_eq!(firsts, [vec![101], vec![102]]);
}

#[tokio::test]
async fn an_item_repeated_in_one_message_is_joined_and_sent_once() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    // One message of 2,000 copies of one item (70 KB) had the gateway send 2,000 first batches.
    let item = batch_request(json!({"type": "all"}), "1h", "compact");
    let mut requests = vec![item.clone(); 2000];
    requests.push(batch_request(
        json!({"type": "selected", "tracker_ids": [101]}),
        "1h",
        "compact",
    ));
    requests.push(item);
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": requests}))
        .await;
    let resp = c.recv().await;
    assert_eq!(
        resp["data"]["state_batch"],
        json!({"success": true, "value": {
            "101": "normal", "102": "normal", "103": "normal", "104": "normal", "105": "blocked"}}),
        "{resp}"
    );
    let firsts = first_batches(&mut c, 2).await;
    assert_eq!(firsts, [vec![101], vec![101, 102, 103, 104]]);
    // Nothing more: the next frame is the answer to the next message.
    let next = c.subscribe(ACME, &[101]).await;
    assert_eq!(next["type"], "response", "{next}");
    assert_eq!(app.hub.batches.group_count(), 2);
}

#[tokio::test]
async fn joining_a_shared_selected_batch_answers_from_the_batchs_view() {
    let app = spawn_app().await;
    let target = json!({"type": "selected", "tracker_ids": [101, 102]});
    let mut first = app.connect().await;
    subscribe_batch(
        &mut first,
        ACME,
        batch_request(target.clone(), "1h", "compact"),
    )
    .await;
    next_batch(&mut first).await;
    // 101 is blocked while the event processor is stalled on a lock over the states: the
    // group has not taken the block when a second dashboard joins it.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tracker_states IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    app.exec("UPDATE trackers SET blocked = true WHERE id = 101")
        .await;
    until_a_query_waits_for_a_lock(&app.pool).await;
    let mut second = app.connect().await;
    let resp = subscribe_batch(&mut second, ACME, batch_request(target, "1h", "compact")).await;
    let batch = second.recv().await;
    // The answer and the first batch agree (the database already said `blocked`, and the
    // first batch held 101's state): then the block comes, as to the first dashboard.
    assert_eq!(
        resp["data"]["state_batch"]["value"],
        json!({"101": "normal", "102": "normal"}),
        "{resp}"
    );
    assert!(items(&batch).contains_key(&101), "{batch}");
    lock.rollback().await.unwrap();
    for c in [&mut first, &mut second] {
        let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
        assert_eq!(
            (
                ev["tracker_id"].as_i64(),
                ev["data"]["lifecycle_event"].as_str()
            ),
            (Some(101), Some("block")),
            "{ev}"
        );
    }
}

#[tokio::test]
async fn each_session_of_a_socket_holds_a_shared_batch_of_its_own() {
    // ACME and ACME2 (one user) ask one socket for the same batch: one group, held by both.
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let subscribe = |hash: &str| {
        json!({"action": "subscribe", "hash": hash,
               "requests": [batch_request(json!({"type": "all"}), "200ms", "compact")]})
    };
    let unsubscribe = |hash: &str| json!({"action": "unsubscribe", "hash": hash, "requests": [{"type": "state_batch"}]});
    // ACME also watches a tracker of its own here: an older session whose only holds are
    // batches the latest one holds too is released (logout.rs).
    c.subscribe_and_states(ACME, &[103], 1).await;
    for hash in [ACME, ACME2] {
        c.send(subscribe(hash)).await;
        assert_eq!(
            next_response(&mut c).await["data"]["state_batch"]["success"],
            true
        );
    }
    assert_eq!(app.hub.batches.group_count(), 1);
    // ACME2 leaves it: ACME still holds it.
    c.send(unsubscribe(ACME2)).await;
    next_response(&mut c).await;
    app.set_speed(&[101], 7).await;
    c.recv_until(|v| v["event"] == "state_batch" && items(v).get(&101) == Some(&7))
        .await;
    // ACME2 again, then ACME's logout: ACME2's batches keep flowing.
    c.send(subscribe(ACME2)).await;
    next_response(&mut c).await;
    app.exec(&format!(
        "UPDATE sessions SET revoked_at = now() WHERE hash = '{ACME}'"
    ))
    .await;
    c.recv_until(|v| v["event"] == "logout").await;
    app.set_speed(&[102], 8).await;
    c.recv_until(|v| v["event"] == "state_batch" && items(v).get(&102) == Some(&8))
        .await;
    // ACME2 leaves too: nobody holds the group any more.
    c.send(unsubscribe(ACME2)).await;
    next_response(&mut c).await;
    app.until("the group retires", || app.hub.batches.group_count() == 0)
        .await;
}
