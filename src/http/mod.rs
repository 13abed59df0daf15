//! Plain HTTP endpoints: `/health` (the process is up), `/ready` (the database answers and the
//! LISTEN stream is up, so events are flowing), `/metrics` (Prometheus), `/openapi.json`, and the
//! Navixy-style JSON API: `user` (sessions), `tracker` (trackers and states) and `admin`
//! (operator actions), with `params` reading requests, `error` mapping failures to codes and
//! statuses, `limit` rate-limiting logins and `openapi` describing it all.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::metrics;
use crate::startup::AppState;

pub mod admin;
pub mod error;
pub mod limit;
pub mod openapi;
pub mod params;
pub mod tracker;
pub mod user;

use error::ApiError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    // HEAD too, for load balancers and uptime checks that probe with it.
    cfg.route("/health", web::get().to(health))
        .route("/health", web::head().to(health))
        .route("/ready", web::get().to(ready))
        .route("/ready", web::head().to(ready))
        .route("/metrics", web::get().to(metrics))
        .route("/openapi.json", web::get().to(openapi::serve));
    // Navixy's API takes GET and POST alike for its calls.
    macro_rules! api {
        ($path:literal, $handler:path) => {
            cfg.service(
                web::resource($path)
                    .route(web::get().to($handler))
                    .route(web::post().to($handler))
                    .default_service(web::to(wrong_method)),
            );
        };
    }
    api!("/v2/user/auth", user::auth);
    api!("/v2/user/logout", user::logout);
    api!("/v2/user/get_info", user::get_info);
    api!("/v2/tracker/list", tracker::list);
    api!("/v2/tracker/get_state", tracker::get_state);
    api!("/v2/tracker/get_states", tracker::get_states);
    // Operator actions change things: POST only.
    macro_rules! admin {
        ($path:literal, $handler:path) => {
            cfg.service(
                web::resource($path)
                    .route(web::post().to($handler))
                    .default_service(web::to(wrong_method)),
            );
        };
    }
    admin!("/v2/admin/tracker/block", admin::tracker_block);
    admin!("/v2/admin/tracker/unblock", admin::tracker_unblock);
    admin!("/v2/admin/tracker/remove", admin::tracker_remove);
    admin!("/v2/admin/session/revoke", admin::session_revoke);
    admin!("/v2/admin/user/block", admin::user_block);
    admin!("/v2/admin/user/unblock", admin::user_unblock);
    admin!("/v2/admin/user/create", admin::user_create);
    admin!("/v2/admin/user/grant", admin::user_grant);
    admin!("/v2/admin/user/revoke_grant", admin::user_revoke_grant);
}

/// Code 112 for a method an API endpoint does not take.
async fn wrong_method() -> Result<HttpResponse, ApiError> {
    Err(ApiError::WrongMethod)
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let hub = &state.hub;
    let body = hub.metrics.render(hub.sample());
    HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(body)
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
