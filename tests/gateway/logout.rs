//! Logout: every way a session ends reaches its sockets as `logout`, then a normal close.

use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

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

#[tokio::test]
async fn revoked_session_gets_logout_then_close() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    app.exec(&format!(
        "UPDATE sessions SET revoked_at = now() WHERE hash = '{ACME}'"
    ))
    .await;
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
    app.exec(&format!(
        "UPDATE sessions SET revoked_at = now() WHERE hash = '{ACME}'"
    ))
    .await;
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
