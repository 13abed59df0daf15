//! The one error type of the HTTP API, mapped in one place to Navixy's error code, description and
//! HTTP status. Internal causes (database errors, failed tasks) are logged here and never shown.
//!
//! Codes and statuses follow Navixy's backend API error table ("Getting started → Errors",
//! developers.navixy.com/backend-api/getting-started/errors): the default HTTP status is 400;
//! 1 and 6 are 500, 2, 11, 13 and 208 are 403, 9 is 412, 14 is 503, 15 is 429, 204 is 404
//! (and 15 is 503 for a WebSocket refused because the whole process is at its socket limit).

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::db;
use crate::model::TrackerId;
use crate::service::ServiceError;
use crate::ws::slots::Refused;

/// Why a request failed. Each variant documents its code and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 1, HTTP 500: the database answered with an error (logged).
    Database,
    /// 2, HTTP 403: an operator endpoint was called without an operator key.
    ServiceAuth,
    /// 3, HTTP 400: `hash` missing, not a string, or not 32 characters.
    WrongHash,
    /// 4, HTTP 400: no such session, or it has ended.
    SessionNotFound,
    /// 5, HTTP 400: the body is not JSON (or form) or not an object.
    BadFormat(String),
    /// 6, HTTP 500: anything unexpected (logged).
    Unexpected,
    /// 7, HTTP 400: a parameter is missing or has the wrong type or value.
    Invalid(String),
    /// 9, HTTP 412: the body or a list is over its limit.
    TooLarge(String),
    /// 11, HTTP 403: the key or session may not do this.
    AccessDenied(String),
    /// 14, HTTP 503: the database is unreachable; the request may be retried.
    DbUnavailable,
    /// 15, HTTP 429: too many login attempts; retry after the given seconds.
    RateLimited(u64),
    /// 15: a WebSocket upgrade past the socket limits, HTTP 503 for the process's
    /// (`websocket.max_sockets`), 429 for the address's (`max_sockets_per_address`).
    TooManySockets(Refused),
    /// 102, HTTP 400: unknown login or wrong password (indistinguishable on purpose).
    WrongCredentials,
    /// 111, HTTP 400 under `/v2/` (as Navixy answers), 404 elsewhere: no endpoint at this path.
    WrongHandler { api: bool },
    /// 112, HTTP 400: the endpoint does not accept this HTTP method.
    WrongMethod,
    /// 201, HTTP 400: the named entity does not exist (or is not visible to the caller).
    NotFound(String),
    /// 206, HTTP 400: a user with this login exists.
    LoginInUse,
    /// 208, HTTP 403: the tracker is blocked.
    DeviceBlocked,
    /// 217, HTTP 400: a list names entities that do not exist (or are not visible).
    NonexistentEntities(Vec<TrackerId>),
}

/// What a refused WebSocket upgrade is told to wait, in seconds.
const SOCKET_RETRY_AFTER_SECS: u64 = 5;

/// `{"success": false, "status": {"code": N, "description": "…"}}`
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Always `false`.
    pub success: bool,
    pub status: ErrorStatus,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorStatus {
    /// Navixy error code.
    pub code: u16,
    pub description: String,
}

impl ApiError {
    pub fn code(&self) -> u16 {
        match self {
            ApiError::Database => 1,
            ApiError::ServiceAuth => 2,
            ApiError::WrongHash => 3,
            ApiError::SessionNotFound => 4,
            ApiError::BadFormat(_) => 5,
            ApiError::Unexpected => 6,
            ApiError::Invalid(_) => 7,
            ApiError::TooLarge(_) => 9,
            ApiError::AccessDenied(_) => 11,
            ApiError::DbUnavailable => 14,
            ApiError::RateLimited(_) | ApiError::TooManySockets(_) => 15,
            ApiError::WrongCredentials => 102,
            ApiError::WrongHandler { .. } => 111,
            ApiError::WrongMethod => 112,
            ApiError::NotFound(_) => 201,
            ApiError::LoginInUse => 206,
            ApiError::DeviceBlocked => 208,
            ApiError::NonexistentEntities(_) => 217,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ApiError::Database | ApiError::Unexpected => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::ServiceAuth | ApiError::AccessDenied(_) | ApiError::DeviceBlocked => {
                StatusCode::FORBIDDEN
            }
            ApiError::TooLarge(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::DbUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited(_) | ApiError::TooManySockets(Refused::Address) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::TooManySockets(Refused::Full) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::WrongHandler { api: false } => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn description(&self) -> String {
        match self {
            ApiError::Database => "Database error".into(),
            ApiError::ServiceAuth => "Service Auth error: operator key required".into(),
            ApiError::WrongHash => "Wrong hash".into(),
            ApiError::SessionNotFound => "User or API key not found or session ended".into(),
            ApiError::BadFormat(d) => format!("Wrong request format: {d}"),
            ApiError::Unexpected => "Unexpected error".into(),
            ApiError::Invalid(d) => format!("Invalid parameters: {d}"),
            ApiError::TooLarge(d) => format!("Too large request: {d}"),
            ApiError::AccessDenied(d) => format!("Access denied: {d}"),
            ApiError::DbUnavailable => "Database unavailable".into(),
            ApiError::RateLimited(_) => "Too many requests (rate limit exceeded)".into(),
            ApiError::TooManySockets(Refused::Full) => {
                "Too many requests (rate limit exceeded): the gateway holds its most sockets".into()
            }
            ApiError::TooManySockets(Refused::Address) => {
                "Too many requests (rate limit exceeded): too many sockets from this address".into()
            }
            ApiError::WrongCredentials => "Wrong login or password".into(),
            ApiError::WrongHandler { .. } => "Wrong handler".into(),
            ApiError::WrongMethod => "Wrong method".into(),
            ApiError::NotFound(d) => format!("Not found in database: {d}"),
            ApiError::LoginInUse => "Login already in use".into(),
            ApiError::DeviceBlocked => "Device blocked".into(),
            ApiError::NonexistentEntities(ids) => {
                format!("List contains nonexistent entities: {ids:?}")
            }
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            success: false,
            status: ErrorStatus {
                code: self.code(),
                description: self.description(),
            },
        }
    }

    /// A database error: unavailability is code 14, anything else is logged and code 1.
    pub fn db(e: sqlx::Error) -> ApiError {
        if db::is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::DbUnavailable
        } else {
            tracing::error!(error = %e, "database error");
            ApiError::Database
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.description(), self.code())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.http_status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.http_status());
        match self {
            ApiError::RateLimited(secs) => {
                response.insert_header((header::RETRY_AFTER, secs.max(&1).to_string()));
            }
            ApiError::TooManySockets(_) => {
                response.insert_header((header::RETRY_AFTER, SOCKET_RETRY_AFTER_SECS.to_string()));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::db(e)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::TrackerNotFound(id) => ApiError::NotFound(format!("tracker {id}")),
            ServiceError::SessionNotFound => {
                ApiError::NotFound("no live session with that hash".into())
            }
            ServiceError::UserNotFound(u) => ApiError::NotFound(format!("user {u}")),
            ServiceError::KeyNotFound(id) => ApiError::NotFound(format!("operator key {id}")),
            ServiceError::LoginInUse(_) => ApiError::LoginInUse,
            ServiceError::Invalid(d) => ApiError::Invalid(d),
            ServiceError::TrackersNotInAccount(ids) => ApiError::NonexistentEntities(ids),
            ServiceError::WrongCredentials => ApiError::WrongCredentials,
            ServiceError::UserBlocked => ApiError::AccessDenied("the user is blocked".into()),
            ServiceError::Db(e) => ApiError::db(e),
            ServiceError::Internal(e) => {
                tracing::error!(error = %e, "internal error");
                ApiError::Unexpected
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses_follow_navixy() {
        let cases = [
            (ApiError::Database, 1, 500),
            (ApiError::ServiceAuth, 2, 403),
            (ApiError::WrongHash, 3, 400),
            (ApiError::SessionNotFound, 4, 400),
            (ApiError::Invalid("x".into()), 7, 400),
            (ApiError::TooLarge("x".into()), 9, 412),
            (ApiError::AccessDenied("x".into()), 11, 403),
            (ApiError::DbUnavailable, 14, 503),
            (ApiError::RateLimited(1), 15, 429),
            (ApiError::WrongCredentials, 102, 400),
            (ApiError::NotFound("x".into()), 201, 400),
            (ApiError::DeviceBlocked, 208, 403),
            (ApiError::NonexistentEntities(vec![1]), 217, 400),
        ];
        for (e, code, status) in cases {
            assert_eq!(e.code(), code, "{e:?}");
            assert_eq!(e.http_status().as_u16(), status, "{e:?}");
        }
    }
}
