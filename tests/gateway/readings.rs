//! `readings_batch`: first batch contents, only changed readings later, `sensor_type` and
//! `include_components` filters, blocked trackers, no empty batches, mixed with `state_batch`.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// Sensors and readings of ACME's trackers 101 and 102: on 101 a fuel sensor (1), a
/// temperature sensor (2), a fuel component (3) of the virtual composite fuel sensor (5), a
/// state field and a counter; on 102 a fuel sensor (4).
const SEED: &str = "
INSERT INTO sensors (id, tracker_id, kind, name, label, type, units, units_type,
                     converted_units_type, min_value, max_value, composite_sensor_ids, part_of) VALUES
    (5, 101, 'virtual', 'fuel_total', 'Fuel total', 'fuel', 'l', NULL, NULL, NULL, NULL, '{1,3}', NULL),
    (1, 101, 'input', 'fuel_1', 'Tank 1', 'fuel', 'l', 'litre', 'gallon', 0, 100, NULL, NULL),
    (2, 101, 'input', 'temp_1', 'Cabin', 'temperature', 'C', 'celsius', NULL, -40, 85, NULL, NULL),
    (3, 101, 'input', 'fuel_2', 'Tank 2', 'fuel', 'l', 'litre', NULL, 0, 50, NULL, 5),
    (4, 102, 'input', 'fuel_1', 'Tank', 'fuel', 'l', 'litre', NULL, 0, 80, NULL, NULL);
INSERT INTO sensor_values (tracker_id, sensor_id, value, converted_value, update_time) VALUES
    (101, 1, 42.5, 11.2, '2025-01-01 10:00:00+00'),
    (101, 2, 21, NULL, '2025-01-01 10:00:00+00'),
    (101, 3, 10, NULL, '2025-01-01 10:00:00+00'),
    (101, 5, 52.5, NULL, '2025-01-01 10:00:00+00'),
    (102, 4, 30, NULL, '2025-01-01 10:00:00+00');
INSERT INTO state_readings (tracker_id, field, value, update_time) VALUES
    (101, 'ignition', 'true', '2025-01-01 10:00:00+00');
INSERT INTO counter_readings (tracker_id, type, value, update_time) VALUES
    (101, 'odometer', 12345.5, '2025-01-01 10:00:00+00');
";

fn request(target: Value, rate: &str) -> Value {
    json!({"type": "readings_batch", "target": target, "rate_limit": rate})
}

async fn seeded_app() -> TestApp {
    let app = spawn_app().await;
    app.exec(SEED).await;
    app
}

async fn subscribe(c: &mut Client, req: Value) -> Value {
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [req]}))
        .await;
    c.recv().await
}

async fn next_readings(c: &mut Client) -> Value {
    c.recv_until(|v| v["event"] == "readings_batch").await.0
}

/// tracker_id → item of a readings batch.
fn items(v: &Value) -> HashMap<i64, Value> {
    assert_eq!(v["event"], "readings_batch", "{v}");
    let mut out = HashMap::new();
    for item in v["data"].as_array().expect("data array") {
        let id = item["tracker_id"].as_i64().expect("tracker_id");
        assert!(out.insert(id, item.clone()).is_none(), "{id} twice: {v}");
    }
    out
}

/// The sensor ids of one list of an item.
fn ids(item: &Value, list: &str) -> Vec<i64> {
    item[list]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["sensor_id"].as_i64().expect("sensor_id"))
        .collect()
}

async fn set_value(app: &TestApp, sensor: i64, value: f64) {
    sqlx::query(
        "UPDATE sensor_values SET value = $2, update_time = '2025-01-01 11:00:00+00' \
          WHERE sensor_id = $1",
    )
    .bind(sensor)
    .bind(value)
    .execute(&app.pool)
    .await
    .expect("update reading");
}

#[tokio::test]
async fn first_batch_has_every_reading_then_only_changed_ones() {
    let app = seeded_app().await;
    let mut c = app.connect().await;
    let resp = subscribe(&mut c, request(json!({"type": "all"}), "200ms")).await;
    assert_eq!(
        resp,
        json!({"type": "response", "action": "subscription/subscribe", "events": ["readings_batch"],
               "data": {"readings_batch": {"success": true, "value": {
                   "101": "normal", "102": "normal", "103": "normal", "104": "normal", "105": "blocked"}}}})
    );
    let first = c.recv().await;
    assert!(first["user_time"].is_string());
    let all = items(&first);
    assert_eq!(all.len(), 2, "only trackers with readings: {first}");
    assert_eq!(
        all[&101],
        json!({"tracker_id": 101,
               "inputs": [
                   {"sensor_id": 1, "label": "Tank 1", "units": "l", "name": "fuel_1", "type": "fuel",
                    "min_value": 0.0, "max_value": 100.0, "value": 42.5, "units_type": "litre",
                    "converted_units_type": "gallon", "converted_value": 11.2,
                    "update_time": "2025-01-01 11:00:00"},
                   {"sensor_id": 2, "label": "Cabin", "units": "C", "name": "temp_1",
                    "type": "temperature", "min_value": -40.0, "max_value": 85.0, "value": 21.0,
                    "units_type": "celsius", "converted_units_type": null, "converted_value": null,
                    "update_time": "2025-01-01 11:00:00"},
                   {"sensor_id": 3, "label": "Tank 2", "units": "l", "name": "fuel_2", "type": "fuel",
                    "min_value": 0.0, "max_value": 50.0, "value": 10.0, "units_type": "litre",
                    "converted_units_type": null, "converted_value": null,
                    "update_time": "2025-01-01 11:00:00"}],
               "states": [{"field": "ignition", "value": true, "update_time": "2025-01-01 11:00:00"}],
               "virtual_sensors": [{"sensor_id": 5, "label": "Fuel total", "value": 52.5,
                                    "type": "fuel", "update_time": "2025-01-01 11:00:00"}],
               "counters": [{"type": "odometer", "value": 12345.5,
                             "update_time": "2025-01-01 11:00:00"}]}),
        "every reading, dates in the user's zone (Europe/Berlin)"
    );
    assert_eq!(ids(&all[&102], "inputs"), [4]);

    set_value(&app, 2, 22.5).await;
    let b = items(&next_readings(&mut c).await);
    assert_eq!(b.len(), 1);
    assert_eq!(
        b[&101],
        json!({"tracker_id": 101,
               "inputs": [{"sensor_id": 2, "label": "Cabin", "units": "C", "name": "temp_1",
                    "type": "temperature", "min_value": -40.0, "max_value": 85.0, "value": 22.5,
                    "units_type": "celsius", "converted_units_type": null, "converted_value": null,
                    "update_time": "2025-01-01 12:00:00"}],
               "states": [], "virtual_sensors": [], "counters": []}),
        "only the changed reading"
    );
    app.exec(
        "UPDATE counter_readings SET value = 12400 WHERE tracker_id = 101; \
         UPDATE sensor_values SET value = 29 WHERE sensor_id = 4;",
    )
    .await;
    let mut seen: HashMap<i64, Value> = HashMap::new();
    while seen.len() < 2 {
        seen.extend(items(&next_readings(&mut c).await));
    }
    assert_eq!(seen[&101]["counters"][0]["value"], 12400.0);
    assert_eq!(seen[&101]["inputs"], json!([]));
    assert_eq!(ids(&seen[&102], "inputs"), [4]);
    assert_eq!(seen[&102]["inputs"][0]["value"], 29.0);
}

#[tokio::test]
async fn sensor_type_and_include_components_filter() {
    let app = seeded_app().await;
    let mut fuel = app.connect().await;
    let mut whole = app.connect().await;
    let mut req = request(
        json!({"type": "selected", "tracker_ids": [101, 102]}),
        "200ms",
    );
    req["sensor_type"] = json!("fuel");
    subscribe(&mut fuel, req).await;
    let mut req = request(json!({"type": "all"}), "200ms");
    req["include_components"] = json!(false);
    subscribe(&mut whole, req).await;

    let f = items(&fuel.recv().await);
    assert_eq!(ids(&f[&101], "inputs"), [1, 3], "fuel sensors only");
    assert_eq!(ids(&f[&101], "virtual_sensors"), [5]);
    assert_eq!(f[&101]["states"], json!([]), "sensor_type drops states");
    assert_eq!(f[&101]["counters"], json!([]), "sensor_type drops counters");
    assert_eq!(ids(&f[&102], "inputs"), [4]);

    let w = items(&whole.recv().await);
    assert_eq!(
        ids(&w[&101], "inputs"),
        [1, 2],
        "the component sensor 3 is left out"
    );
    assert_eq!(ids(&w[&101], "virtual_sensors"), [5]);
    assert_eq!(w[&101]["virtual_sensors"][0]["type"], "fuel");
    assert_eq!(w[&101]["states"][0]["field"], "ignition");
    assert_eq!(w[&101]["counters"][0]["type"], "odometer");

    // A temperature change is not a fuel reading; a component change is not whole's.
    set_value(&app, 2, 30.0).await;
    set_value(&app, 3, 11.0).await;
    set_value(&app, 1, 40.0).await;
    let mut fuel_seen: Vec<i64> = Vec::new();
    while !fuel_seen.contains(&1) {
        let b = items(&next_readings(&mut fuel).await);
        assert_eq!(b.keys().collect::<Vec<_>>(), [&101]);
        fuel_seen.extend(ids(&b[&101], "inputs"));
    }
    fuel_seen.sort_unstable();
    assert_eq!(fuel_seen, [1, 3]);
    let mut whole_seen: Vec<i64> = Vec::new();
    while !whole_seen.contains(&1) {
        let b = items(&next_readings(&mut whole).await);
        whole_seen.extend(ids(&b[&101], "inputs"));
    }
    whole_seen.sort_unstable();
    assert_eq!(whole_seen, [1, 2]);
}

#[tokio::test]
async fn blocked_trackers_drop_out_until_unblocked() {
    let app = seeded_app().await;
    let mut c = app.connect().await;
    subscribe(&mut c, request(json!({"type": "all"}), "200ms")).await;
    assert_eq!(items(&c.recv().await).len(), 2);

    app.exec("UPDATE trackers SET blocked = true WHERE id = 102")
        .await;
    let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(ev["data"]["lifecycle_event"], "block");
    set_value(&app, 4, 5.0).await;
    set_value(&app, 1, 41.0).await;
    let b = items(&next_readings(&mut c).await);
    assert_eq!(b.keys().collect::<Vec<_>>(), [&101], "102 is blocked");

    app.exec("UPDATE trackers SET blocked = false WHERE id = 102")
        .await;
    let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(ev["data"]["lifecycle_event"], "unblock");
    let b = items(&next_readings(&mut c).await);
    assert_eq!(b.keys().collect::<Vec<_>>(), [&102]);
    assert_eq!(
        b[&102]["inputs"][0]["value"], 5.0,
        "its newest reading after the unblock"
    );
}

#[tokio::test]
async fn newest_reading_wins_and_empty_periods_send_nothing() {
    let app = seeded_app().await;
    let mut c = app.connect().await;
    subscribe(&mut c, request(json!({"type": "all"}), "300ms")).await;
    items(&c.recv().await);
    for v in 1..=20 {
        set_value(&app, 1, f64::from(v)).await;
    }
    let mut batches = 0;
    loop {
        let b = items(&next_readings(&mut c).await);
        assert_eq!(b.keys().collect::<Vec<_>>(), [&101]);
        assert_eq!(ids(&b[&101], "inputs"), [1], "one item per key per batch");
        batches += 1;
        if b[&101]["inputs"][0]["value"] == 20.0 {
            break;
        }
    }
    assert!(
        batches <= 4,
        "20 quick writes in a few batches, not {batches}"
    );
    // Nothing changed since: no batch over more than three periods.
    let quiet = tokio::time::timeout(Duration::from_millis(1000), c.next()).await;
    assert!(quiet.is_err(), "no batch for empty periods: {quiet:?}");
}

#[tokio::test]
async fn mixed_with_state_batch_and_unsubscribe_one_type() {
    let app = seeded_app().await;
    let mut c = app.connect().await;
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state_batch", "target": {"type": "selected", "tracker_ids": [101]}, "rate_limit": "200ms"},
        {"type": "readings_batch", "target": {"type": "selected", "tracker_ids": [101]}, "rate_limit": "200ms"},
        {"type": "iot_monitor", "target": {"type": "all"}}
    ]}))
    .await;
    let resp = c.recv().await;
    assert_eq!(
        resp["events"],
        json!(["state_batch", "readings_batch", "iot_monitor"])
    );
    assert_eq!(
        resp["data"]["state_batch"],
        json!({"success": true, "value": {"101": "normal"}})
    );
    assert_eq!(
        resp["data"]["readings_batch"],
        json!({"success": true, "value": {"101": "normal"}})
    );
    assert_eq!(resp["data"]["iot_monitor"]["success"], false);
    let mut firsts = [c.recv().await, c.recv().await];
    firsts.sort_by_key(|v| v["event"].to_string());
    assert_eq!(firsts[0]["event"], "readings_batch");
    assert_eq!(firsts[1]["event"], "state_batch");

    set_value(&app, 1, 7.0).await;
    let b = items(&next_readings(&mut c).await);
    assert_eq!(ids(&b[&101], "inputs"), [1]);
    app.set_speed(&[101], 33).await;
    let (s, _) = c.recv_until(|v| v["event"] == "state_batch").await;
    assert_eq!(s["data"][0]["state"]["gps"]["speed"], 33);

    // A malformed readings_batch fails in its slot.
    c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state", "trackers": [103]},
        {"type": "readings_batch", "target": {"type": "all"}, "include_components": "yes"}
    ]}))
    .await;
    let (resp, _) = c.recv_until(|v| v["type"] == "response").await;
    assert_eq!(resp["data"]["readings_batch"]["status"]["code"], 7);
    assert_eq!(resp["data"]["state"]["success"], true);

    c.send(json!({"action": "unsubscribe", "hash": ACME,
                  "requests": [{"type": "state", "trackers": [103]}, {"type": "readings_batch"}]}))
        .await;
    let (resp, _) = c.recv_until(|v| v["type"] == "response").await;
    // Each entry answers for its own type: the trackers are the `state` entry's.
    assert_eq!(
        resp["data"],
        json!({"state": {"success": true, "value": [103]},
               "readings_batch": {"success": true, "value": []}}),
        "{resp}"
    );
    set_value(&app, 1, 8.0).await;
    app.set_speed(&[101], 34).await;
    let (s, skipped) = c
        .recv_until(|v| v["event"] == "state_batch" && v["data"][0]["state"]["gps"]["speed"] == 34)
        .await;
    assert!(s.is_object());
    assert!(
        skipped.iter().all(|v| v["event"] != "readings_batch"),
        "readings stopped: {skipped:?}"
    );
    let quiet = tokio::time::timeout(Duration::from_millis(700), async {
        loop {
            if let Received::Text(t) = c.next().await {
                if t.contains("readings_batch") {
                    return t;
                }
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "no readings after unsubscribe: {quiet:?}");
}

#[tokio::test]
async fn a_reading_dated_infinity_stops_neither_events_nor_batches() {
    let app = seeded_app().await;
    let mut dash = app.connect().await;
    let r = subscribe(&mut dash, request(json!({"type": "all"}), "100ms")).await;
    assert_eq!(r["type"], "response", "{r}");
    next_readings(&mut dash).await;
    let mut states = app.connect().await;
    states.subscribe_and_states(ACME, &[102], 1).await;
    // A valid timestamptz outside chrono's range: sqlx's decoding panicked on it, in the event
    // thread (no event of the process was delivered again) and in a fill (the socket dropped).
    app.exec("UPDATE sensor_values SET value = 43, update_time = 'infinity' WHERE sensor_id = 1")
        .await;
    let (batch, _) = dash
        .recv_until(|v| v["event"] == "readings_batch" && v.to_string().contains("9999-12-3"))
        .await;
    assert!(batch.to_string().contains("43"), "{batch}");
    app.set_speed(&[102], 44).await;
    states.recv_until(|v| is_state_with_speed(v, 102, 44)).await;
    // A dashboard whose first batch reads that row is answered too.
    let mut late = app.connect().await;
    let r = subscribe(&mut late, request(json!({"type": "all"}), "100ms")).await;
    assert_eq!(r["type"], "response", "{r}");
    next_readings(&mut late).await;
    app.exec("UPDATE counter_readings SET value = 777, update_time = '270000-01-01+00'")
        .await;
    // Delivered, dated at the end of 9999, in a later period's batch.
    late.recv_until(|v| {
        v["event"] == "readings_batch" && {
            let text = v.to_string();
            text.contains("777") && text.contains("9999-12-3")
        }
    })
    .await;
    app.set_speed(&[102], 45).await;
    states.recv_until(|v| is_state_with_speed(v, 102, 45)).await;
}

/// A dashboard joining a readings batch another already shares, later in the period, gets the
/// readings changed since the period's first join at once, not at the next period (an hour
/// away here).
#[tokio::test]
async fn joining_a_shared_readings_batch_later_in_its_period_gets_what_changed() {
    let app = seeded_app().await;
    let mut first = app.connect().await;
    subscribe(&mut first, request(json!({"type": "all"}), "1h")).await;
    next_readings(&mut first).await;
    // A faster batch of the same readings tells when the change has reached the groups.
    let mut probe = app.connect().await;
    subscribe(&mut probe, request(json!({"type": "all"}), "200ms")).await;
    next_readings(&mut probe).await;
    set_value(&app, 2, 22.5).await;
    let changed = |v: &Value| {
        v["event"] == "readings_batch"
            && items(v).get(&101).is_some_and(|item| {
                item["inputs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["sensor_id"] == 2 && s["value"] == 22.5)
            })
    };
    probe.recv_until(changed).await;
    let mut late = app.connect().await;
    subscribe(&mut late, request(json!({"type": "all"}), "1h")).await;
    late.recv_until(changed).await;
}
