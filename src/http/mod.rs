//! Plain HTTP endpoints: `/health` (the process is up), `/ready` (the database answers and the
//! LISTEN stream is up, so events are flowing), `/metrics` (Prometheus), `/openapi.json`, and the
//! Navixy-style JSON API: `user` (sessions), `tracker` (trackers and states) and `admin`
//! (operator actions), with `params` reading requests, `error` mapping failures to codes and
//! statuses, `limit` rate-limiting logins and `openapi` describing it all.

use std::time::Duration;

use actix_web::{web, FromRequest, Handler, HttpResponse, Responder};
use serde::Serialize;
use utoipa::ToSchema;

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

/// A resource that answers GET and HEAD (for load balancers and uptime checks that probe with
/// it) with `handler`, and any other method with code 112.
pub fn get_only<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: Handler<Args>,
    Args: FromRequest + 'static,
    F::Output: Responder + 'static,
{
    web::resource(path)
        .route(web::get().to(handler.clone()))
        .route(web::head().to(handler))
        .default_service(web::to(wrong_method))
}

/// What `serve` answers while it waits for its database at start (`database.startup_wait_secs`):
/// `/health` 200 (the process is up), `/ready` 503 with everything down, and every other
/// request code 14 with HTTP 503 (a WebSocket client's handshake fails with it), so that probes
/// and clients get an answer instead of a connection that hangs.
pub fn configure_waiting(cfg: &mut web::ServiceConfig) {
    async fn not_ready() -> HttpResponse {
        HttpResponse::ServiceUnavailable().json(ReadyBody {
            ready: false,
            database: false,
            listen_stream: false,
            events_current: false,
            sockets_sessions: 0,
            watched_trackers: 0,
        })
    }
    async fn unavailable() -> Result<HttpResponse, ApiError> {
        Err(ApiError::DbUnavailable)
    }
    cfg.service(get_only("/health", health))
        .service(get_only("/ready", not_ready))
        .default_service(web::to(unavailable));
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(get_only("/health", health))
        .service(get_only("/ready", ready))
        .service(get_only("/metrics", metrics))
        .service(get_only("/openapi.json", openapi::serve));
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
    admin!("/v2/admin/user/api_key", admin::user_api_key);
    admin!("/v2/admin/user/api_keys", admin::user_api_keys);
}

/// Code 111 for a path no route serves: HTTP 400 under `/v2/` as Navixy answers an unknown API
/// call, 404 elsewhere, so that a mistyped URL reads as such in a browser or a probe's log.
pub async fn wrong_handler(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::WrongHandler {
        api: req.path().starts_with("/v2/"),
    })
}

/// Code 112 for a method an endpoint does not take.
pub async fn wrong_method() -> Result<HttpResponse, ApiError> {
    Err(ApiError::WrongMethod)
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition: the gateway's counters \
and gauges (README, Metrics)", content_type = "text/plain", body = String))
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let hub = &state.hub;
    let body = hub.metrics.render(hub.sample());
    HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .body(body)
}

/// `{"status": "ok"}`
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    /// Always `ok`.
    pub status: &'static str,
}

/// `GET /health`: the process is up and serving HTTP (liveness).
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "The process is up (HEAD works too)", body = HealthBody))
)]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(HealthBody { status: "ok" })
}

/// What `/ready` reports.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyBody {
    /// `database`, `listen_stream` and `events_current` all hold: events are flowing.
    pub ready: bool,
    /// A `SELECT 1` on the pool answered within 2 s (300 ms when the stream is down or behind,
    /// as the answer is 503 then anyway).
    pub database: bool,
    /// The LISTEN connection is up.
    pub listen_stream: bool,
    /// The event processor has caught up: false from a lost stream, or a round of reads that
    /// failed or was given up (`listen.round_timeout_secs`), until the resync after it has run.
    pub events_current: bool,
    /// Sessions held by this process's sockets.
    pub sockets_sessions: usize,
    /// Trackers that at least one socket of this process watches.
    pub watched_trackers: usize,
}

/// `GET /ready`: the database answers, the LISTEN stream is up and the event processor has
/// caught up (readiness).
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: events are flowing (HEAD works too)", body = ReadyBody),
        (status = 503, description = "Not ready: the database or the LISTEN stream is down, or the event processor is behind", body = ReadyBody),
    )
)]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let stream = state.hub.stream_up();
    let current = state.hub.caught_up();
    // Not ready already when the stream is down or behind: the database's own answer is then
    // only for the body, and a probe (Kubernetes' times out after 1 s) should get its 503 at
    // once rather than wait out a server that is gone. Otherwise a busy pool gets 2 s.
    let wait = if stream && current {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(300)
    };
    let db = matches!(
        tokio::time::timeout(wait, sqlx::query("SELECT 1").execute(&state.pool)).await,
        Ok(Ok(_))
    );
    let body = ReadyBody {
        ready: stream && db && current,
        database: db,
        listen_stream: stream,
        events_current: current,
        sockets_sessions: state.hub.session_count(),
        watched_trackers: state.hub.tracker_count(),
    };
    if body.ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
