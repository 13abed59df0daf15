//! Every SQL statement of the gateway. Each function is one round trip; those that take a list
//! of ids take them as one array parameter (never one query per tracker).

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use super::rows;
use crate::model::{
    TrackerId, TrackerState, STATE_COLUMNS, STATE_COLUMNS_COMPACT, STATE_COLUMNS_SOURCE_UNREAD,
    STATE_FROM,
};

/// A session as seen by a subscribe: its user, the account it belongs to, and whether it is live.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub hash: String,
    pub user_id: i64,
    pub account_id: i64,
    pub is_sub_user: bool,
    pub time_zone: String,
    /// `infinity` (a session that never ends) reads as the end of year 9999.
    #[sqlx(try_from = "crate::db::time::PgTime")]
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
    if hash.contains('\0') {
        // No session has one, and PostgreSQL's text cannot hold it (the query would fail).
        return Ok(None);
    }
    sqlx::query_as::<_, SessionRow>(&format!("{SESSION_SELECT} WHERE s.hash = $1"))
        .bind(hash)
        .fetch_optional(pool)
        .await
}

/// The sessions among `hashes` that still exist (live or not).
pub async fn sessions(pool: &PgPool, hashes: &[String]) -> Result<Vec<SessionRow>, sqlx::Error> {
    // A hash a client sent may hold NUL, which no session has and PostgreSQL's text cannot
    // hold (the whole query would fail).
    let hashes: Vec<&str> = hashes
        .iter()
        .map(String::as_str)
        .filter(|h| !h.contains('\0'))
        .collect();
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

/// The facts that decide each requested tracker's status, in one query: a row per requested
/// tracker that exists (the caller takes a missing one as unknown). Written as `= ANY` rather
/// than a join with `unnest`, whose plan (a merge join) read the trackers' whole primary key
/// for a large request: this one reads the table or probes the key, as the request's share of
/// the fleet makes cheaper (10,000 ids of 100,000 trackers: 14 ms -> 9 ms of execution, a
/// sub-user's 24 -> 18 ms).
pub async fn tracker_access(
    pool: &PgPool,
    user_id: i64,
    ids: &[TrackerId],
) -> Result<Vec<TrackerAccess>, sqlx::Error> {
    sqlx::query_as::<_, TrackerAccess>(
        "SELECT t.id, t.source_id, t.account_id, t.blocked, t.removed, \
                EXISTS (SELECT FROM tracker_grants g \
                         WHERE g.user_id = $2 AND g.tracker_id = t.id) AS granted, \
                t.change_no \
           FROM trackers t WHERE t.id = ANY($1)",
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
    states_of_ids(pool, &format!("{STATE_COLUMNS} FROM {STATE_FROM}"), ids).await
}

/// Current states of the given trackers by change number, without their source ids (0 in
/// each), for a caller that has them from the trackers' access ([`tracker_access`]): the join
/// that reads them took half the read's time (10,000 ids: 29 -> 14.5 ms of execution).
pub async fn states_by_ids_unsourced(
    pool: &PgPool,
    ids: &[TrackerId],
) -> Result<Vec<TrackerState>, sqlx::Error> {
    states_of_ids(
        pool,
        &format!("{STATE_COLUMNS_SOURCE_UNREAD} FROM tracker_states s"),
        ids,
    )
    .await
}

/// The current states of these trackers without their source ids (0 in each; the event
/// processor fills them in from the hub, see `listen::read_states`), in no particular order:
/// the processor orders each chunk's steps by change number itself, and sorting the rows in
/// the database cost it a copy of every row.
pub async fn states_by_ids_source_unread(
    pool: &PgPool,
    ids: &[TrackerId],
) -> Result<Vec<TrackerState>, sqlx::Error> {
    let sql = format!(
        "SELECT {STATE_COLUMNS_SOURCE_UNREAD} FROM tracker_states s WHERE s.tracker_id = ANY($1)"
    );
    rows::fetch_states(pool, sqlx::query(&sql).bind(ids)).await
}

/// As [`states_by_ids_source_unread`], with only the columns the compact format renders when
/// `compact` (see [`STATE_COLUMNS_COMPACT`]).
pub async fn states_by_ids_for(
    pool: &PgPool,
    ids: &[TrackerId],
    compact: bool,
) -> Result<Vec<TrackerState>, sqlx::Error> {
    if !compact {
        return states_by_ids_source_unread(pool, ids).await;
    }
    let sql = format!(
        "SELECT {STATE_COLUMNS_COMPACT} FROM tracker_states s WHERE s.tracker_id = ANY($1)"
    );
    rows::fetch_states(pool, sqlx::query(&sql).bind(ids)).await
}

/// `SELECT <select> WHERE s.tracker_id = ANY(ids)`, by change number.
async fn states_of_ids(
    pool: &PgPool,
    select: &str,
    ids: &[TrackerId],
) -> Result<Vec<TrackerState>, sqlx::Error> {
    let sql = format!("SELECT {select} WHERE s.tracker_id = ANY($1) ORDER BY s.change_no");
    rows::fetch_states(pool, sqlx::query(&sql).bind(ids)).await
}

/// The data source ids of these trackers (removed ones included; deleted ones are missing).
pub async fn source_ids(
    pool: &PgPool,
    ids: &[TrackerId],
) -> Result<Vec<(TrackerId, i64)>, sqlx::Error> {
    sqlx::query_as::<_, (TrackerId, i64)>("SELECT id, source_id FROM trackers WHERE id = ANY($1)")
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
    let sql = format!(
        "SELECT {STATE_COLUMNS} FROM {STATE_FROM} \
          WHERE s.change_no BETWEEN $1 AND $2 ORDER BY s.change_no"
    );
    rows::fetch_states(pool, sqlx::query(&sql).bind(lo).bind(hi)).await
}

/// Lifecycle facts of trackers: (id, source_id, account_id, blocked, removed, change_no).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrackerLifecycleRow {
    pub id: i64,
    pub source_id: i64,
    pub account_id: i64,
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
        "SELECT t.id, t.source_id, t.account_id, t.blocked, t.removed, t.change_no FROM trackers t \
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
        "SELECT t.id, t.source_id, t.account_id, t.blocked, t.removed, t.change_no FROM trackers t \
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
        "SELECT id, source_id, account_id, blocked, removed, change_no FROM trackers WHERE id = ANY($1)",
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
        "SELECT id, source_id, account_id, blocked, removed, change_no FROM trackers \
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
        "UPDATE sessions SET revoked_at = now() \
          WHERE hash = $1 AND revoked_at IS NULL AND expires_at > now()",
    )
    .bind(hash)
    .execute(db)
    .await?;
    Ok(r.rows_affected() > 0)
}

// --- HTTP API and operator service (src/service.rs, src/http/) -----------------------------------

/// What `user/auth` needs to know of a login. `removed` covers the user and its master.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LoginRow {
    pub id: i64,
    pub password_hash: String,
    pub blocked: bool,
    pub removed: bool,
}

pub async fn user_by_login(pool: &PgPool, login: &str) -> Result<Option<LoginRow>, sqlx::Error> {
    sqlx::query_as::<_, LoginRow>(
        "SELECT u.id, u.password_hash, \
                (u.blocked OR COALESCE(m.blocked, false)) AS blocked, \
                (u.removed OR COALESCE(m.removed, false)) AS removed \
           FROM users u LEFT JOIN users m ON m.id = u.master_id WHERE u.login = $1",
    )
    .bind(login)
    .fetch_optional(pool)
    .await
}

/// A user as the API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: i64,
    pub login: String,
    pub master_id: Option<i64>,
    pub time_zone: String,
    pub blocked: bool,
    pub removed: bool,
    #[sqlx(try_from = "crate::db::time::PgTime")]
    pub created_at: DateTime<Utc>,
}

const USER_SELECT: &str =
    "SELECT id, login, master_id, time_zone, blocked, removed, created_at FROM users";

pub async fn user_by_id(pool: &PgPool, id: i64) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as::<_, UserRow>(&format!("{USER_SELECT} WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn user_by_login_full(
    pool: &PgPool,
    login: &str,
) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as::<_, UserRow>(&format!("{USER_SELECT} WHERE login = $1"))
        .bind(login)
        .fetch_optional(pool)
        .await
}

/// Inserts a user; `None` when the login is taken.
pub async fn insert_user(
    pool: &PgPool,
    login: &str,
    password_hash: &str,
    master_id: Option<i64>,
    time_zone: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO users (login, password_hash, master_id, time_zone) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (login) DO NOTHING RETURNING id",
    )
    .bind(login)
    .bind(password_hash)
    .bind(master_id)
    .bind(time_zone)
    .fetch_optional(pool)
    .await
}

/// Sets a user's blocked flag (blocking ends its sessions and its sub-users' through the
/// `users_end_sessions` trigger); returns whether a non-removed user was found.
pub async fn set_user_blocked(pool: &PgPool, id: i64, blocked: bool) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("UPDATE users SET blocked = $2 WHERE id = $1 AND NOT removed")
        .bind(id)
        .bind(blocked)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() > 0)
}

/// Creates a session for `user_id` that lives `lifetime_secs`.
pub async fn insert_session(
    pool: &PgPool,
    hash: &str,
    user_id: i64,
    lifetime_secs: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sessions (hash, user_id, expires_at) \
         VALUES ($1, $2, now() + make_interval(secs => $3::double precision))",
    )
    .bind(hash)
    .bind(user_id)
    .bind(lifetime_secs as f64)
    .execute(pool)
    .await?;
    Ok(())
}

/// One row of `tracker/list`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrackerListRow {
    pub id: i64,
    pub label: String,
    pub source_id: i64,
    pub blocked: bool,
    #[sqlx(try_from = "crate::db::time::PgTime")]
    pub created_at: DateTime<Utc>,
}

/// The trackers of an account that a user may see (a sub-user: only its grants), removed ones
/// excepted, by id.
pub async fn tracker_list(
    pool: &PgPool,
    account_id: i64,
    sub_user: Option<i64>,
) -> Result<Vec<TrackerListRow>, sqlx::Error> {
    sqlx::query_as::<_, TrackerListRow>(
        "SELECT t.id, t.label, t.source_id, t.blocked, t.created_at FROM trackers t \
          WHERE t.account_id = $1 AND NOT t.removed \
            AND ($2::bigint IS NULL \
                 OR EXISTS (SELECT 1 FROM tracker_grants g WHERE g.user_id = $2 AND g.tracker_id = t.id)) \
          ORDER BY t.id",
    )
    .bind(account_id)
    .bind(sub_user)
    .fetch_all(pool)
    .await
}

/// Among `ids`, those that are not live trackers of `account_id` (missing, removed, or another
/// account's).
pub async fn trackers_outside_account(
    pool: &PgPool,
    account_id: i64,
    ids: &[TrackerId],
) -> Result<Vec<TrackerId>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT r.id FROM unnest($1::bigint[]) AS r(id) \
          WHERE NOT EXISTS (SELECT 1 FROM trackers t \
                             WHERE t.id = r.id AND t.account_id = $2 AND NOT t.removed) \
          ORDER BY r.id",
    )
    .bind(ids)
    .bind(account_id)
    .fetch_all(pool)
    .await
}

/// Grants trackers to a user; returns how many grants were new.
pub async fn insert_grants(
    pool: &PgPool,
    user_id: i64,
    ids: &[TrackerId],
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "INSERT INTO tracker_grants (user_id, tracker_id) SELECT $1, unnest($2::bigint[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Revokes grants; returns how many existed.
pub async fn delete_grants(
    pool: &PgPool,
    user_id: i64,
    ids: &[TrackerId],
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query("DELETE FROM tracker_grants WHERE user_id = $1 AND tracker_id = ANY($2)")
        .bind(user_id)
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(r.rows_affected())
}

/// For revoked grants `(user, tracker)`: the live sessions of those users that are sub-users,
/// paired with each tracker whose grant is still absent (a grant deleted and re-inserted in the
/// same transaction does not count).
pub async fn sessions_losing_grants(
    pool: &PgPool,
    users: &[i64],
    trackers: &[TrackerId],
) -> Result<Vec<(String, TrackerId)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.hash, r.tracker_id \
           FROM unnest($1::bigint[], $2::bigint[]) AS r(user_id, tracker_id) \
           JOIN users u ON u.id = r.user_id AND u.master_id IS NOT NULL \
           JOIN sessions s ON s.user_id = r.user_id AND s.revoked_at IS NULL \
          WHERE NOT EXISTS (SELECT 1 FROM tracker_grants g \
                             WHERE g.user_id = r.user_id AND g.tracker_id = r.tracker_id)",
    )
    .bind(users)
    .bind(trackers)
    .fetch_all(pool)
    .await
}

/// Every grant of the given users, as `(user_id, tracker_id)`.
pub async fn grants_of(pool: &PgPool, users: &[i64]) -> Result<Vec<(i64, TrackerId)>, sqlx::Error> {
    sqlx::query_as("SELECT user_id, tracker_id FROM tracker_grants WHERE user_id = ANY($1)")
        .bind(users)
        .fetch_all(pool)
        .await
}

/// A user API key (a session with a name that never expires; see the migration
/// `user_api_keys`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserApiKeyRow {
    pub hash: String,
    pub name: String,
    #[sqlx(try_from = "crate::db::time::PgTime")]
    pub created_at: DateTime<Utc>,
    #[sqlx(try_from = "crate::db::time::OptPgTime")]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Creates a user API key named `name` for `user_id`.
pub async fn insert_user_api_key(
    pool: &PgPool,
    hash: &str,
    user_id: i64,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sessions (hash, user_id, expires_at, api_key_name) \
         VALUES ($1, $2, 'infinity', $3)",
    )
    .bind(hash)
    .bind(user_id)
    .bind(name)
    .execute(pool)
    .await?;
    Ok(())
}

/// A user's API keys, the newest first.
pub async fn user_api_keys(pool: &PgPool, user_id: i64) -> Result<Vec<UserApiKeyRow>, sqlx::Error> {
    sqlx::query_as::<_, UserApiKeyRow>(
        "SELECT hash, api_key_name AS name, created_at, revoked_at FROM sessions \
          WHERE user_id = $1 AND api_key_name IS NOT NULL ORDER BY created_at DESC, hash",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await
}

/// An operator API key, without its hash.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct OperatorKeyRow {
    pub id: i64,
    pub name: String,
    #[sqlx(try_from = "crate::db::time::PgTime")]
    pub created_at: DateTime<Utc>,
    #[sqlx(try_from = "crate::db::time::OptPgTime")]
    pub revoked_at: Option<DateTime<Utc>>,
}

pub async fn insert_operator_key(
    pool: &PgPool,
    name: &str,
    key_hash: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("INSERT INTO operator_keys (name, key_hash) VALUES ($1, $2) RETURNING id")
        .bind(name)
        .bind(key_hash)
        .fetch_one(pool)
        .await
}

/// The id of the non-revoked key with this hash, if there is one.
pub async fn operator_key_id(pool: &PgPool, key_hash: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM operator_keys WHERE key_hash = $1 AND revoked_at IS NULL")
        .bind(key_hash)
        .fetch_optional(pool)
        .await
}

pub async fn revoke_operator_key(pool: &PgPool, id: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE operator_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(r.rows_affected() > 0)
}

pub async fn operator_keys(pool: &PgPool) -> Result<Vec<OperatorKeyRow>, sqlx::Error> {
    sqlx::query_as::<_, OperatorKeyRow>(
        "SELECT id, name, created_at, revoked_at FROM operator_keys ORDER BY id",
    )
    .fetch_all(pool)
    .await
}
