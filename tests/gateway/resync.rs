//! The LISTEN connection lost mid-stream: reconnect, then resync what changed during the gap.
//!
//! These run the whole path, but a notification committed just before the new connection's
//! `LISTEN` can still reach it (PostgreSQL starts a new listener from the oldest notification
//! it keeps, or from where another listener of the database has read to), so they do not always
//! need the resync to pass. The resync itself is tested directly, on a hub, in `db.rs`.

use crate::common::*;

/// Terminates the gateway's LISTEN backend inside `during_gap`'s transaction, before it commits,
/// so the commit's notification is certainly lost: only the resync can deliver it.
async fn terminate_listener_then(app: &TestApp, during_gap: &str) {
    app.exec(&format!(
        "BEGIN; {during_gap}; \
         SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
          WHERE application_name = '{}' AND datname = current_database(); \
         COMMIT;",
        fleetgate::listen::LISTEN_APPLICATION_NAME
    ))
    .await;
}

#[tokio::test]
async fn a_state_missed_during_the_gap_still_arrives() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    terminate_listener_then(
        &app,
        "UPDATE tracker_states SET speed = 99 WHERE tracker_id = 101",
    )
    .await;
    let (ev, _) = c.recv_until(|v| is_state_of(v, 101)).await;
    assert_eq!(ev["data"]["gps"]["speed"], 99);
    // And the stream works again afterwards.
    app.set_speed(&[102], 98).await;
    c.recv_until(|v| is_state_with_speed(v, 102, 98)).await;
}

#[tokio::test]
async fn blocks_and_ended_sessions_during_the_gap_take_effect() {
    let app = spawn_app().await;
    let mut a = app.connect().await;
    a.subscribe_and_states(ACME, &[101, 102, 105], 2).await;
    let mut b = app.connect().await;
    b.subscribe_and_states(ACME2, &[103], 1).await;
    terminate_listener_then(
        &app,
        &format!(
            "UPDATE trackers SET blocked = true WHERE id = 101; \
             UPDATE trackers SET blocked = false WHERE id = 105; \
             UPDATE trackers SET removed = true WHERE id = 102; \
             UPDATE sessions SET revoked_at = now() WHERE hash = '{ACME2}'"
        ),
    )
    .await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let v = a.recv().await;
        seen.push(v);
        let has = |id: i64, what: &str| {
            seen.iter().any(|v| {
                v["tracker_id"] == id
                    && (v["data"]["lifecycle_event"] == what || v["event"] == what)
            })
        };
        if has(101, "block") && has(102, "corrupt") && has(105, "unblock") && has(105, "state") {
            break;
        }
    }
    let pos = |pred: &dyn Fn(&serde_json::Value) -> bool| seen.iter().position(pred);
    let unblock = pos(&|v| v["tracker_id"] == 105 && v["data"]["lifecycle_event"] == "unblock");
    let state = pos(&|v| is_state_of(v, 105));
    assert!(
        unblock.is_some() && state.is_some() && unblock < state,
        "{seen:?}"
    );
    let (_, before) = b.recv_close().await;
    assert_eq!(
        before.last().map(|v| v["event"].clone()),
        Some("logout".into())
    );
}

#[tokio::test]
async fn ready_reports_the_stream_down_during_the_gap() {
    let app = spawn_app_with(|s| s.listen.reconnect_min_ms = 1500).await;
    terminate_listener_then(&app, "SELECT 1").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = app.get("/ready").await;
        if code == 503 {
            assert!(body.contains("\"listen_stream\":false"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never reported the gap"
        );
    }
    app.wait_ready().await;
}

/// The LISTEN connection and the event processor run on a thread of their own
/// (`startup::spawn_event_thread`): stopping the gateway ends them, and their connections with
/// them, rather than leaving a thread that keeps reconnecting to the database.
#[tokio::test]
async fn stopping_the_gateway_ends_the_listen_and_event_connections() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    // A change read by the processor: its pool has a connection open now.
    app.set_speed(&[101], 77).await;
    c.recv_until(|v| is_state_with_speed(v, 101, 77)).await;

    // Watched from the server's own database, since the gateway's pool closes as it stops.
    let admin = sqlx::PgPool::connect(&server_url())
        .await
        .expect("connect to the server");
    let names = [
        fleetgate::listen::LISTEN_APPLICATION_NAME,
        fleetgate::db::EVENTS_APPLICATION_NAME,
    ];
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE datname = $1 AND application_name = ANY($2)",
        )
        .bind(&app.db_name)
        .bind(&names[..])
        .fetch_one(&admin)
        .await
        .expect("pg_stat_activity")
    };
    eventually("the LISTEN and event connections", || async {
        count().await >= 2
    })
    .await;
    app.stop();
    eventually("the LISTEN and event connections to close", || async {
        count().await == 0
    })
    .await;
}

/// The server drops every connection of the gateway's (a restart, a failover): the LISTEN
/// connection comes back after its backoff, and the resync must not then wait a backoff more for
/// each dead connection of the event processor's pool (they are not tested before use). With a
/// backoff of 5 s, the missed state took 10 s and more; it now comes right after the LISTEN.
#[tokio::test]
async fn a_resync_after_every_connection_dropped_does_not_wait_for_each_dead_one() {
    let app = spawn_app_with(|s| {
        s.listen.reconnect_min_ms = 5_000;
        s.listen.reconnect_max_ms = 5_000;
    })
    .await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    // The event processor's pool has connections open.
    app.set_speed(&[101, 102], 41).await;
    c.recv_until(|v| is_state_with_speed(v, 102, 41)).await;
    app.exec(&format!(
        "BEGIN; UPDATE tracker_states SET speed = 42 WHERE tracker_id = 101; \
         SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
          WHERE application_name IN ('{}', '{}') AND datname = current_database(); \
         COMMIT;",
        fleetgate::listen::LISTEN_APPLICATION_NAME,
        fleetgate::db::EVENTS_APPLICATION_NAME,
    ))
    .await;
    // The LISTEN's 5 s, then the resync at once (it took a 5 s backoff more per dead one).
    let arrived = tokio::time::timeout(
        std::time::Duration::from_secs(8),
        c.recv_until(|v| is_state_with_speed(v, 101, 42)),
    )
    .await;
    assert!(arrived.is_ok(), "the missed state came after 8 s");
}
