//! The operator API under `/v2/admin/`: block, unblock and remove trackers, revoke sessions, block
//! and unblock users, create users and sub-users, grant and revoke a sub-user's trackers, create
//! and list users' API keys. Every
//! call needs an operator key (`Authorization: Bearer <key>`, created with
//! `fleetgate api-key create`): none is code 2, a wrong or revoked one code 11, and nothing is
//! read or written before the key is accepted. The actions are [`service`]'s, shared with the
//! command line; their WebSocket effects come through the database triggers.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::params::{de, OperatorKey, OperatorParams, Params};
use super::user::SuccessResponse;
use crate::service::{self, NewUser, TrackerOp, UserRef};
use crate::startup::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrackerRequest {
    #[serde(deserialize_with = "de::int")]
    pub tracker_id: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRevokeRequest {
    /// The hash of the session to end.
    #[serde(deserialize_with = "de::string")]
    pub session_hash: String,
}

/// A user, by `user_id` or by `login` (one of them).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserRequest {
    #[serde(default, deserialize_with = "de::opt_int")]
    pub user_id: Option<i64>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub login: Option<String>,
}

impl UserRequest {
    fn user(&self) -> Result<UserRef, ApiError> {
        match (self.user_id, &self.login) {
            (Some(id), None) => Ok(UserRef::Id(id)),
            (None, Some(login)) => Ok(UserRef::Login(login.clone())),
            _ => Err(ApiError::Invalid(
                "name the user by exactly one of `user_id` and `login`".into(),
            )),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreateRequest {
    #[serde(deserialize_with = "de::string")]
    pub login: String,
    #[serde(deserialize_with = "de::string")]
    pub password: String,
    /// IANA time zone (default `UTC`).
    #[serde(default, deserialize_with = "de::opt_string")]
    pub time_zone: Option<String>,
    /// Make a sub-user of this master account (by id)…
    #[serde(default, deserialize_with = "de::opt_int")]
    pub master_id: Option<i64>,
    /// …or by login.
    #[serde(default, deserialize_with = "de::opt_string")]
    pub master_login: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserCreateResponse {
    pub success: bool,
    /// The new user's id.
    pub id: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// The sub-user, by id…
    #[serde(default, deserialize_with = "de::opt_int")]
    pub user_id: Option<i64>,
    /// …or by login.
    #[serde(default, deserialize_with = "de::opt_string")]
    pub login: Option<String>,
    /// Tracker ids of the sub-user's account.
    #[serde(deserialize_with = "de::int_list")]
    pub trackers: Vec<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CountResponse {
    pub success: bool,
    /// How many grants were added (grant) or removed (revoke).
    pub count: u64,
}

async fn tracker_op(
    state: web::Data<AppState>,
    params: Params,
    key: OperatorKey,
    op: TrackerOp,
) -> Result<HttpResponse, ApiError> {
    let p: TrackerRequest = params.parse()?;
    service::tracker_op(&state.pool, p.tracker_id, op).await?;
    tracing::info!(
        operator_key = key.0,
        tracker = p.tracker_id,
        "operator API: tracker {}",
        op.done()
    );
    Ok(HttpResponse::Ok().json(SuccessResponse { success: true }))
}

/// Blocks a tracker: its subscribers get a `block` lifecycle event and no more states.
#[utoipa::path(
    post, path = "/v2/admin/tracker/block", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = TrackerRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Blocked", body = SuccessResponse),
        (status = 400, description = "Code 7: `tracker_id` missing; code 201: no such tracker (or removed)", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn tracker_block(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    tracker_op(state, params, key, TrackerOp::Block).await
}

/// Unblocks a tracker: its subscribers get `unblock`, then its current state.
#[utoipa::path(
    post, path = "/v2/admin/tracker/unblock", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = TrackerRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Unblocked", body = SuccessResponse),
        (status = 400, description = "Code 7: `tracker_id` missing; code 201: no such tracker (or removed)", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn tracker_unblock(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    tracker_op(state, params, key, TrackerOp::Unblock).await
}

/// Removes a tracker: its subscribers get a `corrupt` lifecycle event.
#[utoipa::path(
    post, path = "/v2/admin/tracker/remove", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = TrackerRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Removed", body = SuccessResponse),
        (status = 400, description = "Code 7: `tracker_id` missing; code 201: no such tracker (or already removed)", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn tracker_remove(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    tracker_op(state, params, key, TrackerOp::Remove).await
}

/// Ends a session: its sockets get `logout`.
#[utoipa::path(
    post, path = "/v2/admin/session/revoke", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = SessionRevokeRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Revoked", body = SuccessResponse),
        (status = 400, description = "Code 7: `session_hash` missing; code 201: no live session with that hash", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn session_revoke(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    let p: SessionRevokeRequest = params.parse()?;
    service::revoke_session(&state.pool, &p.session_hash).await?;
    tracing::info!(
        operator_key = key.0,
        session = crate::telemetry::session_tag(&p.session_hash),
        "operator API: session revoked"
    );
    Ok(HttpResponse::Ok().json(SuccessResponse { success: true }))
}

async fn user_blocked(
    state: web::Data<AppState>,
    params: Params,
    key: OperatorKey,
    blocked: bool,
) -> Result<HttpResponse, ApiError> {
    let p: UserRequest = params.parse()?;
    let user = service::set_user_blocked(&state.pool, &p.user()?, blocked).await?;
    tracing::info!(
        operator_key = key.0,
        user = user.id,
        blocked,
        "operator API: user blocked flag set"
    );
    Ok(HttpResponse::Ok().json(SuccessResponse { success: true }))
}

/// Blocks a user: its sessions (and, for a master account, its sub-users') end, their sockets get
/// `logout`, and `user/auth` refuses it.
#[utoipa::path(
    post, path = "/v2/admin/user/block", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = UserRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Blocked", body = SuccessResponse),
        (status = 400, description = "Code 7: neither or both of `user_id` and `login`; code 201: no such user", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn user_block(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    user_blocked(state, params, key, true).await
}

/// Unblocks a user (its ended sessions stay ended: it logs in again).
#[utoipa::path(
    post, path = "/v2/admin/user/unblock", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = UserRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Unblocked", body = SuccessResponse),
        (status = 400, description = "Code 7: neither or both of `user_id` and `login`; code 201: no such user", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn user_unblock(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    user_blocked(state, params, key, false).await
}

/// Creates a master account, or a sub-user of one (it then sees only the trackers granted to it).
#[utoipa::path(
    post, path = "/v2/admin/user/create", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = UserCreateRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Created", body = UserCreateResponse),
        (status = 400, description = "Code 7: a missing or invalid parameter (empty login or password, unknown time zone, a master that is itself a sub-user); code 201: no such master; code 206: login already in use", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn user_create(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    let p: UserCreateRequest = params.parse()?;
    let master = match (p.master_id, p.master_login) {
        (None, None) => None,
        (Some(id), None) => Some(UserRef::Id(id)),
        (None, Some(login)) => Some(UserRef::Login(login)),
        (Some(_), Some(_)) => {
            return Err(ApiError::Invalid(
                "name the master by one of `master_id` and `master_login`".into(),
            ))
        }
    };
    let id = service::create_user(
        &state.pool,
        NewUser {
            login: p.login,
            password: p.password,
            time_zone: p.time_zone,
            master,
        },
    )
    .await?;
    tracing::info!(
        operator_key = key.0,
        user = id,
        "operator API: user created"
    );
    Ok(HttpResponse::Ok().json(UserCreateResponse { success: true, id }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserApiKeyRequest {
    /// The user, by id…
    #[serde(default, deserialize_with = "de::opt_int")]
    pub user_id: Option<i64>,
    /// …or by login.
    #[serde(default, deserialize_with = "de::opt_string")]
    pub login: Option<String>,
    /// What the key is for (1 to 100 characters), e.g. the integration using it.
    #[serde(deserialize_with = "de::string")]
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserApiKeyResponse {
    pub success: bool,
    /// The key: use it as a session hash (`hash`, or `Authorization: NVX <key>`).
    pub hash: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserApiKey {
    pub hash: String,
    pub name: String,
    /// `YYYY-MM-DD HH:MM:SS`, UTC.
    pub created: String,
    /// When it ended (revoked, or its user blocked or removed), UTC; absent while it works.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserApiKeysResponse {
    pub success: bool,
    /// The user's keys, the newest first.
    pub list: Vec<UserApiKey>,
}

/// Creates an API key for a user: a hash that stands in for a session hash on the socket and in
/// the HTTP API. It never expires and outlives password changes; it ends when revoked
/// (`session/revoke`) or when its user is blocked or removed.
#[utoipa::path(
    post, path = "/v2/admin/user/api_key", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = UserApiKeyRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Created", body = UserApiKeyResponse),
        (status = 400, description = "Code 7: neither or both of `user_id` and `login`, or a name that is empty or over 100 characters; code 201: no such user", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key, or the user is blocked", body = ErrorBody),
    )
)]
pub async fn user_api_key(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    let p: UserApiKeyRequest = params.parse()?;
    let user = UserRequest {
        user_id: p.user_id,
        login: p.login,
    }
    .user()?;
    let (u, hash) = service::create_user_api_key(&state.pool, &user, &p.name).await?;
    tracing::info!(
        operator_key = key.0,
        user = u.id,
        "operator API: user API key created"
    );
    Ok(HttpResponse::Ok().json(UserApiKeyResponse {
        success: true,
        hash,
    }))
}

/// Lists a user's API keys, ended ones included.
#[utoipa::path(
    post, path = "/v2/admin/user/api_keys", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = UserRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The keys", body = UserApiKeysResponse),
        (status = 400, description = "Code 7: neither or both of `user_id` and `login`; code 201: no such user", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn user_api_keys(
    state: web::Data<AppState>,
    OperatorParams(params, _key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    let p: UserRequest = params.parse()?;
    let (_, keys) = service::list_user_api_keys(&state.pool, &p.user()?).await?;
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    let list = keys
        .into_iter()
        .map(|k| UserApiKey {
            hash: k.hash,
            name: k.name,
            created: time(k.created_at),
            ended: k.revoked_at.map(time),
        })
        .collect();
    Ok(HttpResponse::Ok().json(UserApiKeysResponse {
        success: true,
        list,
    }))
}

fn grant_user(p: &GrantRequest) -> Result<UserRef, ApiError> {
    UserRequest {
        user_id: p.user_id,
        login: p.login.clone(),
    }
    .user()
}

/// Grants trackers of its account to a sub-user.
#[utoipa::path(
    post, path = "/v2/admin/user/grant", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = GrantRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Granted; `count` is how many grants are new", body = CountResponse),
        (status = 400, description = "Code 7: a missing parameter, an empty list, or a master account; code 201: no such user; code 217: trackers not in the sub-user's account (nothing is granted)", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn user_grant(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    let p: GrantRequest = params.parse()?;
    let count = service::grant(&state.pool, &grant_user(&p)?, &p.trackers).await?;
    tracing::info!(
        operator_key = key.0,
        user = ?p.user_id,
        login = ?p.login,
        trackers = p.trackers.len(),
        new = count,
        "operator API: trackers granted"
    );
    Ok(HttpResponse::Ok().json(CountResponse {
        success: true,
        count,
    }))
}

/// Revokes a sub-user's grants. Its live subscriptions to those trackers stop, each with a
/// `lifecycle` event whose `lifecycle_event` is `disallowed`.
#[utoipa::path(
    post, path = "/v2/admin/user/revoke_grant", tag = "admin",
    security(("operator_key" = [])),
    request_body(content = GrantRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Revoked; `count` is how many grants existed", body = CountResponse),
        (status = 400, description = "Code 7: a missing parameter, an empty list, or a master account; code 201: no such user", body = ErrorBody),
        (status = 403, description = "Code 2: no operator key; code 11: wrong or revoked key", body = ErrorBody),
    )
)]
pub async fn user_revoke_grant(
    state: web::Data<AppState>,
    OperatorParams(params, key): OperatorParams,
) -> Result<HttpResponse, ApiError> {
    let p: GrantRequest = params.parse()?;
    let count = service::revoke_grant(&state.pool, &grant_user(&p)?, &p.trackers).await?;
    tracing::info!(
        operator_key = key.0,
        user = ?p.user_id,
        login = ?p.login,
        trackers = p.trackers.len(),
        revoked = count,
        "operator API: grants revoked"
    );
    Ok(HttpResponse::Ok().json(CountResponse {
        success: true,
        count,
    }))
}
