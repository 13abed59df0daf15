//! Logout: every way a session ends reaches its sockets as `logout`, then a normal close.

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

async fn assert_logout_then_close(c: &mut Client) {
    let (code, before) = c.recv_close().await;
    assert_eq!(
        before.last(),
        Some(&json!({"type": "event", "event": "logout", "data": "session closed"})),
        "{before:?}"
    );
    assert_eq!(code, Some(CloseCode::Normal));
}

/// Ends a session the way any writer of the database may.
async fn revoke(app: &TestApp, hash: &str) {
    app.exec(&format!(
        "UPDATE sessions SET revoked_at = now() WHERE hash = '{hash}'"
    ))
    .await;
}

#[tokio::test]
async fn revoked_session_gets_logout_then_close() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    revoke(&app, ACME).await;
    assert_logout_then_close(&mut c).await;
}

#[tokio::test]
async fn deleted_session_gets_logout() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    app.exec(&format!("DELETE FROM sessions WHERE hash = '{ACME}'"))
        .await;
    assert_logout_then_close(&mut c).await;
}

#[tokio::test]
async fn session_expiry_is_enforced_by_a_timer() {
    let app = spawn_app().await;
    let hash = "tttttttttttttttttttttttttttttttt";
    app.exec(&format!(
        "INSERT INTO sessions (hash, user_id, expires_at) VALUES ('{hash}', 1, now() + interval '1 second')"
    ))
    .await;
    let mut c = app.connect().await;
    let (resp, _) = c.subscribe_and_states(hash, &[101], 1).await;
    assert_eq!(resp["data"]["state"]["101"], "normal");
    // No database write happens: the expiry alone must end it.
    assert_logout_then_close(&mut c).await;
}

#[tokio::test]
async fn moving_expiry_into_the_past_logs_out() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    app.exec(&format!(
        "UPDATE sessions SET expires_at = now() WHERE hash = '{ACME}'"
    ))
    .await;
    assert_logout_then_close(&mut c).await;
}

#[tokio::test]
async fn blocked_user_password_change_and_removed_user_end_sessions() {
    let app = spawn_app().await;
    let mut a = app.connect().await;
    a.subscribe_and_states(ACME, &[101], 1).await;
    app.exec("UPDATE users SET blocked = true WHERE id = 1")
        .await;
    assert_logout_then_close(&mut a).await;

    let mut r = app.connect().await;
    r.subscribe_and_states(RIVAL, &[201], 1).await;
    app.exec("UPDATE users SET password_hash = 'changed' WHERE id = 3")
        .await;
    assert_logout_then_close(&mut r).await;
}

#[tokio::test]
async fn blocking_the_master_ends_its_sub_users_sessions() {
    let app = spawn_app().await;
    let mut s = app.connect().await;
    s.subscribe_and_states(SUB, &[101], 1).await;
    app.exec("UPDATE users SET removed = true WHERE id = 1")
        .await;
    assert_logout_then_close(&mut s).await;
}

#[tokio::test]
async fn another_live_session_keeps_the_connection_open() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    c.subscribe_and_states(RIVAL, &[201], 1).await;
    revoke(&app, ACME).await;
    assert_eq!(c.recv().await["event"], "logout");
    // 101 no longer flows (its session ended); 201 does, on the same connection.
    app.set_speed(&[101], 12).await;
    app.set_speed(&[201], 13).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 201, 13)).await;
    assert!(skipped.is_empty(), "{skipped:?}");
}

#[tokio::test]
async fn the_operator_command_revokes_like_sql() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    fleetgate::commands::revoke_session(&app.pool, ACME)
        .await
        .expect("revoke");
    assert_logout_then_close(&mut c).await;
    assert!(
        fleetgate::commands::revoke_session(&app.pool, ACME)
            .await
            .is_err(),
        "twice is an error"
    );
}

#[tokio::test]
async fn a_failed_resubscribe_keeps_the_session_expiry() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    // Subscribing again while the session cannot be read (its table renamed away for a
    // moment) fails with code 6 ...
    app.exec("ALTER TABLE sessions RENAME TO sessions_away")
        .await;
    let resp = c.subscribe(ACME, &[102]).await;
    app.exec("ALTER TABLE sessions_away RENAME TO sessions")
        .await;
    assert_eq!(resp["type"], "error", "{resp}");
    assert_eq!(resp["status"]["code"], 6, "{resp}");
    // ... and must not have made the session immortal: an expiry check as of the day after its
    // expiry (one day from now) still ends it.
    let later = chrono::Utc::now() + chrono::Duration::days(2);
    assert_eq!(app.hub.sessions_due(later), vec![ACME.to_string()]);
}

#[tokio::test]
async fn an_expiry_is_confirmed_with_the_database_before_the_logout() {
    use fleetgate::listen::expire_due;
    // Only the checks below run (the process's own checker would race them).
    let app = spawn_app_with(|s| s.sessions.expiry_check_ms = 3_600_000).await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    // The process's record says the session has expired (as when its expiry was moved while
    // this process could not hear of it); the database says it lives a day more.
    let past = chrono::Utc::now() - chrono::Duration::seconds(5);
    app.hub.set_session_expiry(ACME, past);
    let now = chrono::Utc::now();
    assert_eq!(
        expire_due(&app.pool, &app.hub, now).await.expect("check"),
        0
    );
    // The record now holds the database's expiry: nothing is due any more.
    assert!(app.hub.sessions_due(now).is_empty());
    // When the database cannot say, nothing is ended here either (the checker defers while the
    // database is unreachable, and falls back to the recorded expiry on other failures).
    app.hub.set_session_expiry(ACME, past);
    app.exec("ALTER TABLE sessions RENAME TO sessions_away")
        .await;
    let failed = expire_due(&app.pool, &app.hub, now).await;
    app.exec("ALTER TABLE sessions_away RENAME TO sessions")
        .await;
    assert!(failed.is_err());
    assert_eq!(app.hub.sessions_due(now), vec![ACME.to_string()]);
    // The socket still works: a change arrives.
    app.set_speed(&[101], 42).await;
    let (state, _) = c
        .recv_until(|v| v["event"] == "state" && v["data"]["gps"]["speed"] == 42)
        .await;
    assert!(state["data"]["source_id"].is_number(), "{state}");
    // Once the database agrees that it has ended, the logout goes.
    app.exec(&format!(
        "UPDATE sessions SET expires_at = now() - interval '1 second' WHERE hash = '{ACME}'"
    ))
    .await;
    assert_logout_then_close(&mut c).await;
}

#[tokio::test]
async fn a_subscribe_handled_before_its_sessions_queued_logout_leaves_nothing_behind() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    // Keep the socket busy: a subscribe with a second session waits in its status query (which
    // reads `tracker_grants`, locked here). A subscribe with ACME follows it in the same write,
    // so the server has read it before it is done with the first.
    let mut tx = app.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE tracker_grants IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .expect("lock");
    for (hash, tracker) in [(ACME2, 102), (ACME, 103)] {
        let msg = json!({"action": "subscribe", "hash": hash, "events": ["state"],
                         "trackers": [tracker]});
        c.ws.feed(Message::Text(msg.to_string()))
            .await
            .expect("queue");
    }
    c.ws.flush().await.expect("send");
    until_a_query_waits_for_a_lock(&app.pool).await;
    // Meanwhile ACME is revoked: its logout is queued for the socket, behind that subscribe.
    revoke(&app, ACME).await;
    app.until("the hub logs ACME out", || !app.hub.has_session(ACME))
        .await;
    tx.rollback().await.expect("rollback");

    let (_, before) = c.recv_until(|v| v["event"] == "logout").await;
    assert!(
        before
            .iter()
            .any(|v| v["type"] == "error" && v["status"]["code"] == 4),
        "the subscribe with the revoked session is refused: {before:?}"
    );
    // The socket holds ACME2 still; nothing of ACME is left in the hub for it.
    app.until("ACME's hub entry is gone", || !app.hub.has_session(ACME))
        .await;
    assert!(app.hub.has_session(ACME2));
    app.set_speed(&[101, 102], 5).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 102, 5)).await;
    assert!(skipped.iter().all(|v| !is_state_of(v, 101)), "{skipped:?}");
}

#[tokio::test]
async fn a_session_whose_trackers_moved_to_a_new_one_is_released() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    // A new login on the same dashboard: everything moves to ACME2.
    let resp = c.subscribe(ACME2, &[101, 102]).await;
    assert_eq!(resp["data"]["state"]["101"], "normal", "{resp}");
    app.until("the socket releases ACME", || !app.hub.has_session(ACME))
        .await;
    // The old session's end does not reach the dashboard ...
    revoke(&app, ACME).await;
    app.set_speed(&[101], 21).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 101, 21)).await;
    assert!(
        skipped.iter().all(|v| v["event"] != "logout"),
        "{skipped:?}"
    );
    // ... and, with nothing left of it, the new session's end closes the connection.
    revoke(&app, ACME2).await;
    assert_logout_then_close(&mut c).await;
}

#[tokio::test]
async fn a_session_that_still_holds_a_tracker_or_is_the_latest_is_kept() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    // Only 101 moves: ACME still holds 102, and its end reaches the socket.
    c.subscribe(ACME2, &[101]).await;
    assert!(app.hub.has_session(ACME));
    revoke(&app, ACME).await;
    assert_eq!(
        c.recv_until(|v| v["event"] == "logout").await.0["data"],
        "session closed"
    );
    // The latest session is kept with nothing under it: unsubscribing its last tracker
    // leaves it (its end still logs the socket out and closes it).
    let msg =
        json!({"action": "unsubscribe", "hash": ACME2, "events": ["state"], "trackers": [101]});
    c.send(msg).await;
    let (resp, _) = c.recv_until(|v| v["type"] == "response").await;
    assert_eq!(resp["data"], json!([101]), "{resp}");
    assert!(app.hub.has_session(ACME2));
    revoke(&app, ACME2).await;
    assert_logout_then_close(&mut c).await;
}

#[tokio::test]
async fn unsubscribing_everything_of_an_older_session_releases_it() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    c.subscribe_and_states(ACME2, &[102], 1).await;
    let msg =
        json!({"action": "unsubscribe", "hash": ACME, "events": ["state"], "trackers": [101]});
    c.send(msg).await;
    c.recv_until(|v| v["type"] == "response").await;
    app.until("the socket releases ACME", || !app.hub.has_session(ACME))
        .await;
    // Released: an unsubscribe with it removes nothing and takes nothing up again (the
    // session is live, so the answer is no error).
    c.send(json!({"action": "unsubscribe", "hash": ACME, "events": ["state"], "trackers": [101]}))
        .await;
    let (resp, _) = c.recv_until(|v| v["type"] != "event").await;
    assert_eq!(resp["type"], "response", "{resp}");
    assert!(!app.hub.has_session(ACME));
    revoke(&app, ACME).await;
    app.set_speed(&[102], 22).await;
    let (_, skipped) = c.recv_until(|v| is_state_with_speed(v, 102, 22)).await;
    assert!(
        skipped.iter().all(|v| v["event"] != "logout"),
        "{skipped:?}"
    );
}

#[tokio::test]
async fn a_batch_dashboard_that_logged_in_again_releases_its_old_session() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let batch = |hash: &str| {
        json!({"action": "subscribe", "hash": hash, "requests": [
            {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "100ms"}]})
    };
    c.send(batch(ACME)).await;
    c.recv_until(|v| v["event"] == "state_batch").await;
    // A new login joins the same batch: the old session holds nothing the new one does not.
    c.send(batch(ACME2)).await;
    let (resp, _) = c.recv_until(|v| v["type"] == "response").await;
    assert_eq!(resp["data"]["state_batch"]["success"], true, "{resp}");
    app.until("the socket releases ACME", || !app.hub.has_session(ACME))
        .await;
    revoke(&app, ACME).await;
    app.set_speed(&[101], 71).await;
    let (_, skipped) = c
        .recv_until(|v| v["event"] == "state_batch" && v.to_string().contains("\"speed\":71"))
        .await;
    assert!(
        skipped.iter().all(|v| v["event"] != "logout"),
        "{skipped:?}"
    );
    revoke(&app, ACME2).await;
    assert_logout_then_close(&mut c).await;
}

/// `fleetgate` run against the test's database.
fn cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    fleetgate_command()
        .args(args)
        .env("DATABASE_URL", &app.db_url)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run fleetgate")
}

/// A user API key (from `fleetgate user api-key`) works where a session hash does, outlives the
/// password change that ends the user's sessions, and ends like a session when revoked.
#[tokio::test]
async fn a_user_api_key_stands_in_for_a_session_and_outlives_a_password_change() {
    let app = spawn_app().await;
    let out = cli(&app, &["user", "api-key", "acme", "fleet sync"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(key.len(), 32, "{key:?}");
    let listed = cli(&app, &["user", "api-keys", "1"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&key) && listed.contains("fleet sync") && listed.contains("active"),
        "{listed}"
    );

    let mut by_key = app.connect().await;
    let (resp, _) = by_key.subscribe_and_states(&key, &[101], 1).await;
    assert_eq!(resp["data"]["state"]["101"], "normal", "{resp}");
    let mut by_session = app.connect().await;
    by_session.subscribe_and_states(ACME, &[101], 1).await;

    // A new password ends the user's sessions, not its key.
    app.exec("UPDATE users SET password_hash = 'changed' WHERE id = 1")
        .await;
    assert_logout_then_close(&mut by_session).await;
    app.set_speed(&[101], 61).await;
    by_key.recv_until(|v| is_state_with_speed(v, 101, 61)).await;

    fleetgate::commands::revoke_session(&app.pool, &key)
        .await
        .expect("revoke");
    assert_logout_then_close(&mut by_key).await;
    let listed = cli(&app, &["user", "api-keys", "acme"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("ended"),
        "{listed:?}"
    );
}

/// Blocking the user ends its keys too, and a blocked user gets none.
#[tokio::test]
async fn blocking_the_user_ends_its_api_keys() {
    let app = spawn_app().await;
    let out = cli(&app, &["user", "api-key", "acme", "ops"]);
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut c = app.connect().await;
    c.subscribe_and_states(&key, &[101], 1).await;
    app.exec("UPDATE users SET blocked = true WHERE id = 1")
        .await;
    assert_logout_then_close(&mut c).await;
    // Neither to it nor to its sub-user (the key would come alive at the master's unblock).
    for user in ["acme", "2"] {
        let refused = cli(&app, &["user", "api-key", user, "ops"]);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("blocked"),
            "{refused:?}"
        );
    }
}

/// Unblocking a sub-user whose master is blocked says that it still cannot log in.
#[tokio::test]
async fn unblocking_a_sub_user_of_a_blocked_master_says_so() {
    let app = spawn_app().await;
    assert!(cli(&app, &["user", "block", "acme"]).status.success());
    let out = cli(&app, &["user", "unblock", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("its master account 1 (acme) is blocked"),
        "{stderr}"
    );
}
