//! `user/auth`, `user/logout` and `user/get_info`: opening a session with a login and password,
//! ending it (its sockets get `logout` through the LISTEN stream), and describing its user. The
//! login rate limit is applied here; the password check and session creation are
//! [`service::login`].

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::params::{self, de, Params};
use crate::db::queries;
use crate::service::{self, ServiceError};
use crate::startup::AppState;

/// `user/auth` parameters.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AuthRequest {
    #[serde(deserialize_with = "de::string")]
    pub login: String,
    #[serde(deserialize_with = "de::string")]
    pub password: String,
}

/// A session opened by `user/auth`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthResponse {
    pub success: bool,
    /// The new session hash (32 hexadecimal characters): pass it as `hash` to the API and to the
    /// WebSocket `subscribe`.
    #[schema(example = "22eac1c27af4be7b9d04da2ce1af111b")]
    pub hash: String,
}

/// Parameters of the calls made with a session.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SessionRequest {
    /// Session hash (or send `Authorization: NVX <hash>`).
    #[schema(example = "22eac1c27af4be7b9d04da2ce1af111b")]
    pub hash: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SuccessResponse {
    pub success: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserInfo {
    pub id: i64,
    pub login: String,
    /// IANA zone in which every date of this user's states and events is written.
    pub time_zone: String,
    /// Whether this is a sub-user (it sees only the trackers granted to it).
    pub sub_user: bool,
    /// The master account of a sub-user; `null` for a master.
    pub master_id: Option<i64>,
    /// The account whose trackers this user sees (itself for a master).
    pub account_id: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserInfoResponse {
    pub success: bool,
    pub user_info: UserInfo,
}

/// The client's address for the rate limit and the socket limit: the peer, or with `api.trust_forwarded_for` the
/// address a reverse proxy reported. The port is dropped.
pub(crate) fn client_address(req: &HttpRequest, trust_forwarded: bool) -> String {
    let raw = if trust_forwarded {
        req.connection_info()
            .realip_remote_addr()
            .map(str::to_owned)
    } else {
        req.peer_addr().map(|a| a.to_string())
    };
    let Some(raw) = raw else {
        return "-".into();
    };
    if let Ok(sa) = raw.parse::<std::net::SocketAddr>() {
        sa.ip().to_string()
    } else {
        raw
    }
}

/// Logs in: a new session for a login and password.
#[utoipa::path(
    post,
    path = "/v2/user/auth",
    tag = "user",
    request_body(
        content = AuthRequest,
        description = "JSON body, form fields or query parameters (GET works too)",
        content_type = "application/json"
    ),
    responses(
        (status = 200, description = "The session was opened", body = AuthResponse),
        (status = 400, description = "Code 7: `login` or `password` missing; code 102: wrong login or password", body = ErrorBody),
        (status = 403, description = "Code 11: the user (or its master account) is blocked", body = ErrorBody),
        (status = 429, description = "Code 15: too many attempts for this login or from this address (see `Retry-After`)", body = ErrorBody),
    )
)]
pub async fn auth(
    req: HttpRequest,
    state: web::Data<AppState>,
    params: Params,
) -> Result<HttpResponse, ApiError> {
    let p: AuthRequest = params.parse()?;
    if p.login.chars().count() > service::MAX_LOGIN_CHARS
        || p.password.len() > service::MAX_PASSWORD_BYTES
    {
        return Err(ApiError::WrongCredentials);
    }
    let address = client_address(&req, state.settings.api.trust_forwarded_for);
    if let Err(wait) = state.login_limiter.attempt(&p.login, &address) {
        if let Some(also) = state.login_limiter.log_gate.pass() {
            tracing::warn!(address = %address, also, "login rate limit exceeded");
        }
        return Err(ApiError::RateLimited(wait));
    }
    let lifetime = state.settings.api.session_lifetime_secs;
    let hash = service::login(&state.pool, &p.login, &p.password, lifetime).await?;
    tracing::info!(
        session = crate::telemetry::session_tag(&hash),
        "session opened"
    );
    Ok(HttpResponse::Ok().json(AuthResponse {
        success: true,
        hash,
    }))
}

/// Ends the session: every socket subscribed with it gets a `logout` event.
#[utoipa::path(
    post,
    path = "/v2/user/logout",
    tag = "user",
    request_body(content = SessionRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The session ended", body = SuccessResponse),
        (status = 400, description = "Code 3: wrong hash; code 4: no such session, or it has ended", body = ErrorBody),
        (status = 429, description = "Code 15: too many calls with this session (see `Retry-After`)", body = ErrorBody),
    )
)]
pub async fn logout(state: web::Data<AppState>, params: Params) -> Result<HttpResponse, ApiError> {
    let session = params::session(&state, &params).await?;
    match service::revoke_session(&state.pool, &session.hash).await {
        Ok(()) => {}
        // Ended between the check and the write.
        Err(ServiceError::SessionNotFound) => return Err(ApiError::SessionNotFound),
        Err(e) => return Err(e.into()),
    }
    Ok(HttpResponse::Ok().json(SuccessResponse { success: true }))
}

/// Describes the session's user.
#[utoipa::path(
    post,
    path = "/v2/user/get_info",
    tag = "user",
    request_body(content = SessionRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The user", body = UserInfoResponse),
        (status = 400, description = "Code 3: wrong hash; code 4: no such session, or it has ended", body = ErrorBody),
        (status = 429, description = "Code 15: too many calls with this session (see `Retry-After`)", body = ErrorBody),
    )
)]
pub async fn get_info(
    state: web::Data<AppState>,
    params: Params,
) -> Result<HttpResponse, ApiError> {
    let session = params::session(&state, &params).await?;
    let user = queries::user_by_id(&state.pool, session.user_id)
        .await?
        .ok_or(ApiError::SessionNotFound)?;
    Ok(HttpResponse::Ok().json(UserInfoResponse {
        success: true,
        user_info: UserInfo {
            id: user.id,
            login: user.login,
            time_zone: user.time_zone,
            sub_user: user.master_id.is_some(),
            master_id: user.master_id,
            account_id: session.account_id,
        },
    }))
}
