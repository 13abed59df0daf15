//! Plain HTTP endpoints: `/health` (the process is up) and `/ready` (the database answers and
//! the LISTEN stream is up, so events are flowing).

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::startup::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready));
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let stream = state.hub.stream_up();
    let db = matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&state.pool)
        )
        .await,
        Ok(Ok(_))
    );
    let body = json!({
        "ready": stream && db,
        "database": db,
        "listen_stream": stream,
        "sockets_sessions": state.hub.session_count(),
        "watched_trackers": state.hub.tracker_count(),
    });
    if stream && db {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
