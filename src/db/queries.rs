//! Every SQL statement of the gateway. Each function is one round trip; those that take a list
//! of ids take them as one array parameter (never one query per tracker).

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::model::{TrackerId, TrackerState, STATE_COLUMNS};

/// A session as seen by a subscribe: its user, the account it belongs to, and whether it is live.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub hash: String,
    pub user_id: i64,
    pub account_id: i64,
    pub is_sub_user: bool,
    pub time_zone: String,
    pub expires_at: DateTime<Utc>,
    pub live: bool,
}

const SESSION_SELECT: &str =
    "SELECT s.hash, s.user_id, COALESCE(u.master_id, u.id) AS account_id, \
       (u.master_id IS NOT NULL) AS is_sub_user, u.time_zone, s.expires_at, \
       (s.revoked_at IS NULL AND s.expires_at > now() \
        AND NOT u.blocked AND NOT u.removed \
        AND NOT COALESCE(m.blocked, false) AND NOT COALESCE(m.removed, false)) AS live \
  FROM sessions s JOIN users u ON u.id = s.user_id LEFT JOIN users m ON m.id = u.master_id";

pub async fn session(pool: &PgPool, hash: &str) -> Result<Option<SessionRow>, sqlx::Error> {
    sqlx::query_as::<_, SessionRow>(&format!("{SESSION_SELECT} WHERE s.hash = $1"))
        .bind(hash)
        .fetch_optional(pool)
        .await
}

/// The sessions among `hashes` that still exist (live or not).
pub async fn sessions(pool: &PgPool, hashes: &[String]) -> Result<Vec<SessionRow>, sqlx::Error> {
    sqlx::query_as::<_, SessionRow>(&format!("{SESSION_SELECT} WHERE s.hash = ANY($1)"))
        .bind(hashes)
        .fetch_all(pool)
        .await
}

/// One requested tracker as a subscribe sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrackerAccess {
    pub id: i64,
    pub source_id: Option<i64>,
    pub account_id: Option<i64>,
    pub blocked: Option<bool>,
    pub removed: Option<bool>,
    pub granted: bool,
    pub change_no: Option<i64>,
}

/// The facts that decide each requested tracker's status, in one query.
pub async fn tracker_access(
    pool: &PgPool,
    user_id: i64,
    ids: &[TrackerId],
) -> Result<Vec<TrackerAccess>, sqlx::Error> {
    sqlx::query_as::<_, TrackerAccess>(
        "SELECT r.id, t.source_id, t.account_id, t.blocked, t.removed, \
                (g.tracker_id IS NOT NULL) AS granted, t.change_no \
           FROM unnest($1::bigint[]) AS r(id) \
           LEFT JOIN trackers t ON t.id = r.id \
           LEFT JOIN tracker_grants g ON g.user_id = $2 AND g.tracker_id = r.id",
    )
    .bind(ids)
    .bind(user_id)
    .fetch_all(pool)
    .await
}

/// Current states of the given trackers (those that have one).
pub async fn states_by_ids(
    pool: &PgPool,
    ids: &[TrackerId],
) -> Result<Vec<TrackerState>, sqlx::Error> {
    sqlx::query_as::<_, TrackerState>(&format!(
        "SELECT {STATE_COLUMNS} FROM tracker_states s JOIN trackers t ON t.id = s.tracker_id \
          WHERE s.tracker_id = ANY($1) ORDER BY s.change_no"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// States whose change number lies in `[lo, hi]` (the overflow form of a notification).
pub async fn states_by_range(
    pool: &PgPool,
    lo: i64,
    hi: i64,
) -> Result<Vec<TrackerState>, sqlx::Error> {
    sqlx::query_as::<_, TrackerState>(&format!(
        "SELECT {STATE_COLUMNS} FROM tracker_states s JOIN trackers t ON t.id = s.tracker_id \
          WHERE s.change_no BETWEEN $1 AND $2 ORDER BY s.change_no"
    ))
    .bind(lo)
    .bind(hi)
    .fetch_all(pool)
    .await
}

/// Lifecycle facts of trackers: (id, source_id, blocked, removed, change_no).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrackerLifecycleRow {
    pub id: i64,
    pub source_id: i64,
    pub blocked: bool,
    pub removed: bool,
    pub change_no: i64,
}

/// Every tracker visible in an account (to a sub-user: only its grants), removed ones excepted.
pub async fn visible_trackers(
    pool: &PgPool,
    account_id: i64,
    sub_user: Option<i64>,
) -> Result<Vec<TrackerLifecycleRow>, sqlx::Error> {
    sqlx::query_as::<_, TrackerLifecycleRow>(
        "SELECT t.id, t.source_id, t.blocked, t.removed, t.change_no FROM trackers t \
          WHERE t.account_id = $1 AND NOT t.removed \
            AND ($2::bigint IS NULL \
                 OR EXISTS (SELECT 1 FROM tracker_grants g WHERE g.user_id = $2 AND g.tracker_id = t.id))",
    )
    .bind(account_id)
    .bind(sub_user)
    .fetch_all(pool)
    .await
}

/// The visible trackers among `ids`.
pub async fn visible_trackers_among(
    pool: &PgPool,
    account_id: i64,
    sub_user: Option<i64>,
    ids: &[TrackerId],
) -> Result<Vec<TrackerLifecycleRow>, sqlx::Error> {
    sqlx::query_as::<_, TrackerLifecycleRow>(
        "SELECT t.id, t.source_id, t.blocked, t.removed, t.change_no FROM trackers t \
          WHERE t.id = ANY($3) AND t.account_id = $1 AND NOT t.removed \
            AND ($2::bigint IS NULL \
                 OR EXISTS (SELECT 1 FROM tracker_grants g WHERE g.user_id = $2 AND g.tracker_id = t.id))",
    )
    .bind(account_id)
    .bind(sub_user)
    .bind(ids)
    .fetch_all(pool)
    .await
}

pub async fn trackers_by_ids(
    pool: &PgPool,
    ids: &[TrackerId],
) -> Result<Vec<TrackerLifecycleRow>, sqlx::Error> {
    sqlx::query_as::<_, TrackerLifecycleRow>(
        "SELECT id, source_id, blocked, removed, change_no FROM trackers WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
}

pub async fn trackers_by_range(
    pool: &PgPool,
    lo: i64,
    hi: i64,
) -> Result<Vec<TrackerLifecycleRow>, sqlx::Error> {
    sqlx::query_as::<_, TrackerLifecycleRow>(
        "SELECT id, source_id, blocked, removed, change_no FROM trackers \
          WHERE change_no BETWEEN $1 AND $2 ORDER BY change_no",
    )
    .bind(lo)
    .bind(hi)
    .fetch_all(pool)
    .await
}

pub async fn session_hashes_by_range(
    pool: &PgPool,
    lo: i64,
    hi: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT hash FROM sessions WHERE change_no BETWEEN $1 AND $2")
        .bind(lo)
        .bind(hi)
        .fetch_all(pool)
        .await
}

// --- operator commands ---------------------------------------------------------------------------

/// Sets a tracker's blocked flag; returns whether a (non-removed) tracker was found.
pub async fn set_tracker_blocked<'e>(
    db: impl PgExecutor<'e>,
    id: TrackerId,
    blocked: bool,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE trackers SET blocked = $2 WHERE id = $1 AND NOT removed")
        .bind(id)
        .bind(blocked)
        .execute(db)
        .await?;
    Ok(r.rows_affected() > 0)
}

pub async fn remove_tracker<'e>(
    db: impl PgExecutor<'e>,
    id: TrackerId,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE trackers SET removed = true WHERE id = $1 AND NOT removed")
        .bind(id)
        .execute(db)
        .await?;
    Ok(r.rows_affected() > 0)
}

pub async fn revoke_session<'e>(db: impl PgExecutor<'e>, hash: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE sessions SET revoked_at = now() WHERE hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash)
    .execute(db)
    .await?;
    Ok(r.rows_affected() > 0)
}
