//! Churn: sockets that come and go in every way a client can leave (closing, dropping the TCP
//! connection mid-stream, leaving before the subscribe's answer, never reading, logged out,
//! unsubscribing) while states, lifecycle changes and grants flow. A gateway that runs for months
//! must end each wave with nothing of its sockets left: no index entry, subscription, batch
//! group, session or queued item, whatever the order things happened in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::common::*;

const ROUNDS: usize = 6;
const CLIENTS_PER_ROUND: usize = 32;
const VANS: std::ops::RangeInclusive<i64> = 1000..=1199;

fn vans() -> Vec<i64> {
    VANS.collect()
}

/// A response to a subscribe (skipping whatever came before it).
async fn response(c: &mut Client) -> Value {
    c.recv_until(|v| v["type"] == "response").await.0
}

/// The `i`th client of a wave; `i % 8` picks how it behaves and how it leaves. A client that should
/// stay connected until the wave ends (it stopped reading) is handed back.
async fn client(url: String, pool: PgPool, round: usize, i: usize) -> Option<Client> {
    let mut c = Client::connect(&url).await;
    match i % 8 {
        // A list with every status, a state, an unsubscribe, then a clean close.
        0 => {
            let r = c
                .subscribe(ACME, &[101, 102, 103, 104, 105, 201, 999])
                .await;
            assert_eq!(r["type"], "response", "{r}");
            c.recv_until(|v| v["event"] == "state").await;
            c.send(json!({"action": "unsubscribe", "hash": ACME, "trackers": [101]}))
                .await;
            let _ = c.ws.close(None).await;
            None
        }
        // A batch of the whole account, then the TCP connection dropped without a close frame.
        1 => {
            c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
                {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "100ms",
                 "format": "compact"}]}))
                .await;
            c.recv_until(|v| v["event"] == "state_batch").await;
            None
        }
        // Readings of the whole account beside states of a few trackers, dropped at the answer.
        2 => {
            c.send(json!({"action": "subscribe", "hash": ACME2, "requests": [
                {"type": "readings_batch", "target": {"type": "all"}, "rate_limit": "100ms"},
                {"type": "state", "trackers": [101, 1000 + round as i64]}]}))
                .await;
            response(&mut c).await;
            None
        }
        // Gone before the answer.
        3 => {
            c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
                {"type": "state", "trackers": vans()},
                {"type": "state_batch", "target": {"type": "selected", "tracker_ids": [101, 1001]},
                 "rate_limit": "200ms"}]}))
                .await;
            None
        }
        // Subscribed to the vans and to a batch of everything, then never reads again: kept
        // open until the wave ends, its queue full.
        4 => {
            c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
                {"type": "state", "trackers": vans(), "format": "full"},
                {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "100ms"}]}))
                .await;
            Some(c)
        }
        // Both kinds subscribed, both unsubscribed, then a clean close.
        5 => {
            c.send(json!({"action": "subscribe", "hash": ACME, "requests": [
                {"type": "state", "trackers": [102, 103]},
                {"type": "state_batch", "target": {"type": "selected", "tracker_ids": [102, 1002]},
                 "rate_limit": "100ms", "format": "compact"}]}))
                .await;
            response(&mut c).await;
            c.send(json!({"action": "unsubscribe", "hash": ACME, "requests": [
                {"type": "state", "trackers": [102, 103]}, {"type": "state_batch"}]}))
                .await;
            response(&mut c).await;
            let _ = c.ws.close(None).await;
            None
        }
        // Garbage first (answered with errors), then a sub-user's subscription, dropped.
        6 => {
            c.send_text("not json").await;
            c.send_text(r#"{"action":"subscribe","hash":"short"}"#)
                .await;
            c.send(json!({"action": "subscribe", "hash": SUB, "requests": [
                {"type": "state", "trackers": [101, 102, 103]},
                {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "100ms"}]}))
                .await;
            response(&mut c).await;
            None
        }
        // A session of its own, revoked while subscribed: the socket gets `logout`.
        _ => {
            let hash = format!("{:032x}", 0x00c0_ffee_0000 + round * 1000 + i);
            sqlx::query(
                "INSERT INTO sessions (hash, user_id, expires_at) \
                 VALUES ($1, 1, now() + interval '1 day')",
            )
            .bind(&hash)
            .execute(&pool)
            .await
            .expect("a session");
            c.send(json!({"action": "subscribe", "hash": hash, "requests": [
                {"type": "state", "trackers": [101, 104]},
                {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "100ms"}]}))
                .await;
            response(&mut c).await;
            sqlx::query("UPDATE sessions SET revoked_at = now() WHERE hash = $1")
                .bind(&hash)
                .execute(&pool)
                .await
                .expect("revoke");
            c.recv_until(|v| v["event"] == "logout").await;
            None
        }
    }
}

/// States of the vans and of acme's trackers, and an operator blocking, unblocking and
/// granting, until `stop`.
async fn traffic(pool: PgPool, stop: Arc<AtomicBool>) {
    let mut n: i32 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let lo = 1000 + i64::from(n % 180);
        sqlx::query(
            "UPDATE tracker_states SET speed = $1, last_update = now() \
              WHERE tracker_id = ANY($2) OR tracker_id BETWEEN $3 AND $3 + 20",
        )
        .bind(n % 200)
        .bind(&[101_i64, 102, 103, 104][..])
        .bind(lo)
        .execute(&pool)
        .await
        .expect("write states");
        let op = match n % 4 {
            0 => "UPDATE trackers SET blocked = true WHERE id = 103",
            1 => "UPDATE trackers SET blocked = false WHERE id = 103",
            2 => {
                "INSERT INTO tracker_grants (user_id, tracker_id) VALUES (2, 103) \
                  ON CONFLICT DO NOTHING"
            }
            _ => "DELETE FROM tracker_grants WHERE user_id = 2 AND tracker_id = 103",
        };
        sqlx::query(op)
            .execute(&pool)
            .await
            .expect("operator action");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn waves_of_sockets_leave_nothing_behind() {
    let app = spawn_app().await;
    app.add_vans(VANS).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(traffic(app.pool.clone(), stop.clone()));

    for round in 0..ROUNDS {
        let mut wave = JoinSet::new();
        for i in 0..CLIENTS_PER_ROUND {
            wave.spawn(client(app.ws_url(), app.pool.clone(), round, i));
        }
        let mut stalled = Vec::new();
        while let Some(done) = wave.join_next().await {
            if let Some(c) = done.expect("a client of the wave") {
                stalled.push(c);
            }
        }
        // The sockets that stopped reading have queues full of states and batches by now.
        app.until("the stalled sockets to have queued items", || {
            app.hub.sample().queue_depth > 0
        })
        .await;
        drop(stalled);
        let left = || {
            let s = app.hub.sample();
            let sockets = app.hub.metrics.open_sockets.get();
            let trackers = app.hub.tracker_count();
            let clean = sockets == 0
                && s.sessions == 0
                && s.subscriptions == 0
                && s.queue_depth == 0
                && s.batch_groups == 0
                && trackers == 0;
            (!clean).then(|| format!("{sockets} sockets, {trackers} trackers, {s:?}"))
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while let Some(what) = left() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: still held after every socket left: {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await; // poll interval
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("the writer");

    // Still serving: a new socket gets current states and live changes.
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 1000], 2).await;
    app.set_speed(&[1000], 233).await;
    c.recv_until(|v| is_state_with_speed(v, 1000, 233)).await;
}
