//! `tracker/list`, `tracker/get_state` and `tracker/get_states`: what a session may see and the
//! current states, over plain HTTP. Statuses come from [`access`], the same computation as the
//! WebSocket subscribe, and states are rendered by [`model::write_state_data`] exactly as `state`
//! events are (full format, dates in the session user's time zone).

use std::collections::HashSet;

use actix_web::{web, HttpResponse};
use chrono::Utc;
use chrono_tz::Tz;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::params::{self, de, Params};
use crate::access;
use crate::db::queries::{self, SessionRow};
use crate::model::{self, Format, TrackerId, TrackerState, Variant};
use crate::startup::AppState;

/// The full-format variant in the session user's zone (UTC if the zone is unreadable).
fn variant(session: &SessionRow) -> Variant {
    Variant {
        format: Format::Full,
        tz: session.time_zone.parse::<Tz>().unwrap_or(chrono_tz::UTC),
        iso: false,
    }
}

/// The state as the socket's `state` event carries it, byte for byte: passed through as raw
/// JSON, not parsed into a `Value` (whose numbers are 64-bit floats: coordinates came out one
/// unit in the last place off, `additional`'s `1.50` as `1.5`, big integers in exponent form,
/// and a state holding a number beyond a float's range as `null`).
fn render(state: &TrackerState, variant: Variant) -> Box<RawValue> {
    RawValue::from_string(model::state_data(state, variant)).unwrap_or_else(|e| {
        // The renderer writes valid JSON (its tests parse every form of it).
        tracing::error!(error = %e, tracker = state.tracker_id, "rendered state is not JSON");
        RawValue::NULL.to_owned()
    })
}

/// Rendered states by tracker id, in the order read: a JSON object.
#[derive(Debug, Default)]
pub struct RawStates(Vec<(TrackerId, Box<RawValue>)>);

impl Serialize for RawStates {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, state) in &self.0 {
            map.serialize_entry(&id.to_string(), state)?;
        }
        map.end()
    }
}

/// A tracker's data source.
#[derive(Debug, Serialize, ToSchema)]
pub struct Source {
    /// Data source id: the `source_id` of its states and lifecycle events.
    pub id: i64,
    /// Device id (fleetgate has no separate device id and uses the source id).
    pub device_id: String,
    /// Whether the tracker is blocked (no state events; lifecycle events only).
    pub blocked: bool,
    /// Registration date in the user's zone, `YYYY-MM-DD`.
    pub creation_date: String,
}

/// A tracker, in Navixy's shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct Tracker {
    /// Tracker id: the id to subscribe to.
    pub id: i64,
    pub label: String,
    /// Always false.
    pub clone: bool,
    /// Always 0 (no groups).
    pub group_id: i64,
    pub source: Source,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TrackerListResponse {
    pub success: bool,
    pub list: Vec<Tracker>,
}

/// Lists the trackers this session may see: its account's (a sub-user: those granted to it), the
/// blocked ones included, removed ones excluded.
#[utoipa::path(
    post,
    path = "/v2/tracker/list",
    tag = "tracker",
    request_body(content = super::user::SessionRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The trackers, by id", body = TrackerListResponse),
        (status = 400, description = "Code 3: wrong hash; code 4: no such session, or it has ended", body = ErrorBody),
        (status = 429, description = "Code 15: too many calls with this session (see `Retry-After`)", body = ErrorBody),
    )
)]
pub async fn list(state: web::Data<AppState>, params: Params) -> Result<HttpResponse, ApiError> {
    let session = params::session(&state, &params).await?;
    let sub_user = session.is_sub_user.then_some(session.user_id);
    let tz: Tz = session.time_zone.parse().unwrap_or(chrono_tz::UTC);
    let rows = queries::tracker_list(&state.pool, session.account_id, sub_user).await?;
    let list = rows
        .into_iter()
        .map(|r| Tracker {
            id: r.id,
            label: r.label,
            clone: false,
            group_id: 0,
            source: Source {
                id: r.source_id,
                device_id: r.source_id.to_string(),
                blocked: r.blocked,
                creation_date: r
                    .created_at
                    .with_timezone(&tz)
                    .format("%Y-%m-%d")
                    .to_string(),
            },
        })
        .collect();
    Ok(HttpResponse::Ok().json(TrackerListResponse {
        success: true,
        list,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct GetStateRequest {
    /// Session hash (or send `Authorization: NVX <hash>`).
    pub hash: Option<String>,
    #[serde(deserialize_with = "de::int")]
    pub tracker_id: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GetStateResponse {
    pub success: bool,
    /// The current time in the user's zone, `YYYY-MM-DD HH:MM:SS`.
    pub user_time: String,
    /// The full source state, exactly as in a `state` event's `data`; `null` while the tracker has
    /// never reported.
    #[schema(value_type = Option<Object>, nullable)]
    pub state: Option<Box<RawValue>>,
}

/// One tracker's current state.
#[utoipa::path(
    post,
    path = "/v2/tracker/get_state",
    tag = "tracker",
    request_body(content = GetStateRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The state", body = GetStateResponse),
        (status = 400, description = "Code 3 or 4 (session); code 7: `tracker_id` missing or not an integer; code 201: no such tracker in this account (or removed)", body = ErrorBody),
        (status = 429, description = "Code 15: too many calls with this session (see `Retry-After`)", body = ErrorBody),
        (status = 403, description = "Code 208: the tracker is blocked; code 11: a sub-user without a grant for it", body = ErrorBody),
    )
)]
pub async fn get_state(
    state: web::Data<AppState>,
    params: Params,
) -> Result<HttpResponse, ApiError> {
    let session = params::session(&state, &params).await?;
    let p: GetStateRequest = params.parse()?;
    let (statuses, states) = access::snapshot(&state.pool, &session, &[p.tracker_id]).await?;
    match statuses.first().map(|(_, s, _)| *s) {
        Some(access::NORMAL) => {}
        Some(access::BLOCKED) => return Err(ApiError::DeviceBlocked),
        Some(access::DISALLOWED) => {
            return Err(ApiError::AccessDenied(format!(
                "tracker {} is not granted to this user",
                p.tracker_id
            )))
        }
        _ => return Err(ApiError::NotFound(format!("tracker {}", p.tracker_id))),
    }
    let v = variant(&session);
    Ok(HttpResponse::Ok().json(GetStateResponse {
        success: true,
        user_time: v.date(Utc::now()),
        state: states.first().map(|s| render(s, v)),
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct GetStatesRequest {
    /// Session hash (or send `Authorization: NVX <hash>`).
    pub hash: Option<String>,
    /// Tracker ids: a JSON array, or in a form or query string `[1,2]` or `1,2`.
    #[serde(deserialize_with = "de::int_list")]
    pub trackers: Vec<i64>,
    /// List blocked trackers in `blocked` instead of failing with code 208.
    #[serde(default, deserialize_with = "de::boolean")]
    pub list_blocked: bool,
    /// List trackers that do not exist (or that this session may not see) in `not_exist` instead
    /// of failing with code 217.
    #[serde(default, deserialize_with = "de::boolean")]
    pub allow_not_exist: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GetStatesResponse {
    pub success: bool,
    /// The current time in the user's zone, `YYYY-MM-DD HH:MM:SS`.
    pub user_time: String,
    /// Full source states of the `normal` trackers that have reported, keyed by tracker id.
    #[schema(value_type = Object)]
    pub states: RawStates,
    /// Blocked trackers among those asked for (with `list_blocked`).
    pub blocked: Vec<i64>,
    /// Trackers asked for that do not exist, were removed, are another account's, or are not
    /// granted to this sub-user (with `allow_not_exist`).
    pub not_exist: Vec<i64>,
    /// Extension: each tracker's status, as the WebSocket subscribe answers it (`normal`,
    /// `blocked`, `unknown`, `disallowed`).
    #[schema(value_type = Object)]
    pub statuses: Map<String, Value>,
}

/// Several trackers' current states at once, with their statuses.
#[utoipa::path(
    post,
    path = "/v2/tracker/get_states",
    tag = "tracker",
    request_body(content = GetStatesRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The states", body = GetStatesResponse),
        (status = 400, description = "Code 3 or 4 (session); code 7: `trackers` missing or not a list of integers; code 217: some trackers do not exist (without `allow_not_exist`)", body = ErrorBody),
        (status = 429, description = "Code 15: too many calls with this session (see `Retry-After`)", body = ErrorBody),
        (status = 403, description = "Code 208: some trackers are blocked (without `list_blocked`)", body = ErrorBody),
        (status = 412, description = "Code 9: more trackers than `websocket.max_trackers_per_request`", body = ErrorBody),
    )
)]
pub async fn get_states(
    state: web::Data<AppState>,
    params: Params,
) -> Result<HttpResponse, ApiError> {
    let session = params::session(&state, &params).await?;
    let p: GetStatesRequest = params.parse()?;
    let limit = state.settings.websocket.max_trackers_per_request;
    if p.trackers.len() > limit {
        return Err(ApiError::TooLarge(format!(
            "at most {limit} trackers per request"
        )));
    }
    let mut seen = HashSet::new();
    let ids: Vec<TrackerId> = p
        .trackers
        .into_iter()
        .filter(|id| seen.insert(*id))
        .collect();
    let (statuses, states) = access::snapshot(&state.pool, &session, &ids).await?;
    let mut blocked = Vec::new();
    let mut not_exist = Vec::new();
    let mut status_map = Map::new();
    for (id, status, _) in &statuses {
        match *status {
            access::NORMAL => {}
            access::BLOCKED => blocked.push(*id),
            _ => not_exist.push(*id),
        }
        status_map.insert(id.to_string(), Value::from(*status));
    }
    if !not_exist.is_empty() && !p.allow_not_exist {
        return Err(ApiError::NonexistentEntities(not_exist));
    }
    if !blocked.is_empty() && !p.list_blocked {
        return Err(ApiError::DeviceBlocked);
    }
    let v = variant(&session);
    let rendered = RawStates(
        states
            .iter()
            .map(|s| (s.tracker_id, render(s, v)))
            .collect(),
    );
    Ok(HttpResponse::Ok().json(GetStatesResponse {
        success: true,
        user_time: v.date(Utc::now()),
        states: rendered,
        blocked,
        not_exist,
        statuses: status_map,
    }))
}
