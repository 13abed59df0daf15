//! Account, session and operator actions: the one code path behind both the HTTP API
//! ([`crate::http`]) and the command line ([`crate::cli`]). Every action is a plain database write;
//! the triggers announce it and the LISTEN stream turns it into WebSocket events, so nothing here
//! talks to the hub. Owns the rules (who may be granted what, what a valid login is, how keys and
//! passwords are checked); the SQL is in [`queries`], the wire formats in the callers.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::commands;
use crate::db::queries::{self, UserRow};
use crate::model::TrackerId;

/// Why an action was refused. Callers map each variant to their own form (an API error code, a
/// command's message); `Db` and `Internal` are logged, never shown.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("no tracker {0} (or it was removed)")]
    TrackerNotFound(TrackerId),
    #[error("no live session with that hash")]
    SessionNotFound,
    #[error("no user {0}")]
    UserNotFound(String),
    #[error("no operator key {0} (or it was revoked)")]
    KeyNotFound(i64),
    #[error("login {0:?} is already in use")]
    LoginInUse(String),
    #[error("{0}")]
    Invalid(String),
    #[error("trackers not in the user's account: {0:?}")]
    TrackersNotInAccount(Vec<TrackerId>),
    #[error("wrong login or password")]
    WrongCredentials,
    #[error("the user is blocked")]
    UserBlocked,
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, ServiceError>;

/// A user named by id or by login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    Id(i64),
    Login(String),
}

impl UserRef {
    /// A command-line argument: digits are an id, anything else a login.
    pub fn parse(s: &str) -> UserRef {
        match s.parse::<i64>() {
            Ok(id) => UserRef::Id(id),
            Err(_) => UserRef::Login(s.to_owned()),
        }
    }

    /// The user, unless it does not exist or was removed.
    pub async fn resolve(&self, pool: &PgPool) -> Result<UserRow> {
        let row = match self {
            UserRef::Id(id) => queries::user_by_id(pool, *id).await?,
            UserRef::Login(login) => queries::user_by_login_full(pool, login).await?,
        };
        match row {
            Some(u) if !u.removed => Ok(u),
            _ => Err(ServiceError::UserNotFound(self.to_string())),
        }
    }
}

impl std::fmt::Display for UserRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserRef::Id(id) => write!(f, "#{id}"),
            UserRef::Login(login) => write!(f, "{login:?}"),
        }
    }
}

// --- trackers and sessions ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerOp {
    Block,
    Unblock,
    Remove,
}

impl TrackerOp {
    pub fn done(self) -> &'static str {
        match self {
            TrackerOp::Block => "blocked",
            TrackerOp::Unblock => "unblocked",
            TrackerOp::Remove => "removed",
        }
    }
}

/// Blocks, unblocks or removes a tracker; subscribers get `lifecycle` events.
pub async fn tracker_op(pool: &PgPool, id: TrackerId, op: TrackerOp) -> Result<()> {
    let found = match op {
        TrackerOp::Block => queries::set_tracker_blocked(pool, id, true).await?,
        TrackerOp::Unblock => queries::set_tracker_blocked(pool, id, false).await?,
        TrackerOp::Remove => queries::remove_tracker(pool, id).await?,
    };
    if found {
        Ok(())
    } else {
        Err(ServiceError::TrackerNotFound(id))
    }
}

/// Ends a session; its sockets get `logout`.
pub async fn revoke_session(pool: &PgPool, hash: &str) -> Result<()> {
    if queries::revoke_session(pool, hash).await? {
        Ok(())
    } else {
        Err(ServiceError::SessionNotFound)
    }
}

// --- users ------------------------------------------------------------------------------------------

/// Blocks or unblocks a user. Blocking ends its sessions and, for a master account, its sub-users'
/// (the `users_end_sessions` trigger); unblocking does not bring sessions back.
pub async fn set_user_blocked(pool: &PgPool, user: &UserRef, blocked: bool) -> Result<UserRow> {
    let row = user.resolve(pool).await?;
    if !queries::set_user_blocked(pool, row.id, blocked).await? {
        return Err(ServiceError::UserNotFound(user.to_string()));
    }
    Ok(row)
}

/// A user to create: a master account, or a sub-user of `master`.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub login: String,
    pub password: String,
    pub time_zone: Option<String>,
    pub master: Option<UserRef>,
}

/// Longest accepted login, in characters.
pub const MAX_LOGIN_CHARS: usize = 100;
/// Longest accepted password, in bytes (hashing cost grows with it).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Creates a user with an argon2 password hash; returns its id.
pub async fn create_user(pool: &PgPool, new: NewUser) -> Result<i64> {
    let login = new.login.trim();
    if login.is_empty() || login.chars().count() > MAX_LOGIN_CHARS || login != new.login {
        return Err(ServiceError::Invalid(format!(
            "`login` must be 1 to {MAX_LOGIN_CHARS} characters without surrounding spaces"
        )));
    }
    if login.chars().any(char::is_control) {
        return Err(ServiceError::Invalid(
            "`login` must not contain control characters".into(),
        ));
    }
    if login.parse::<i64>().is_ok() {
        // The commands take a user as an id or a login, digits meaning an id: such a login
        // could never be named, or would name another user.
        return Err(ServiceError::Invalid(
            "`login` must not be a number (commands read a number as a user id)".into(),
        ));
    }
    if new.password.is_empty() || new.password.len() > MAX_PASSWORD_BYTES {
        return Err(ServiceError::Invalid(format!(
            "`password` must be 1 to {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    let time_zone = new.time_zone.unwrap_or_else(|| "UTC".into());
    if time_zone.parse::<chrono_tz::Tz>().is_err() {
        return Err(ServiceError::Invalid(format!(
            "`time_zone` {time_zone:?} is not an IANA time zone"
        )));
    }
    let master_id = match &new.master {
        None => None,
        Some(m) => {
            let master = m.resolve(pool).await?;
            if master.master_id.is_some() {
                return Err(ServiceError::Invalid(format!(
                    "master {m} is itself a sub-user"
                )));
            }
            Some(master.id)
        }
    };
    let password = new.password;
    let hash = password_work(move || commands::hash_password(&password))
        .await?
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    match queries::insert_user(pool, login, &hash, master_id, &time_zone).await? {
        Some(id) => Ok(id),
        None => Err(ServiceError::LoginInUse(login.to_owned())),
    }
}

/// The sub-user named by `user`, refusing master accounts (they see every tracker anyway).
async fn sub_user(pool: &PgPool, user: &UserRef) -> Result<(UserRow, i64)> {
    let row = user.resolve(pool).await?;
    match row.master_id {
        Some(master) => Ok((row, master)),
        None => Err(ServiceError::Invalid(format!(
            "user {user} is a master account, not a sub-user: it sees every tracker of its account"
        ))),
    }
}

fn check_ids(ids: &[TrackerId]) -> Result<()> {
    if ids.is_empty() {
        return Err(ServiceError::Invalid("`trackers` must not be empty".into()));
    }
    Ok(())
}

/// Grants trackers of its account to a sub-user; returns how many grants are new. Every tracker
/// must be a live tracker of the sub-user's account, or nothing is granted.
pub async fn grant(pool: &PgPool, user: &UserRef, ids: &[TrackerId]) -> Result<u64> {
    check_ids(ids)?;
    let (row, account) = sub_user(pool, user).await?;
    let outside = queries::trackers_outside_account(pool, account, ids).await?;
    if !outside.is_empty() {
        return Err(ServiceError::TrackersNotInAccount(outside));
    }
    Ok(queries::insert_grants(pool, row.id, ids).await?)
}

/// Revokes a sub-user's grants; returns how many existed. Its live subscriptions to those trackers
/// get a `disallowed` lifecycle event and stop.
pub async fn revoke_grant(pool: &PgPool, user: &UserRef, ids: &[TrackerId]) -> Result<u64> {
    check_ids(ids)?;
    let (row, _) = sub_user(pool, user).await?;
    Ok(queries::delete_grants(pool, row.id, ids).await?)
}

// --- logging in ---------------------------------------------------------------------------------------

/// A hash of a random password with the default parameters, verified against when the login is
/// unknown, so that an unknown login and a wrong password take the same time.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let password: [u8; 16] = rand::thread_rng().gen();
        commands::hash_password(&hex(&password)).unwrap_or_default()
    })
}

/// Computes the dummy hash ahead of the first login (call at start-up, off the async threads).
pub fn warm_up() {
    let _ = dummy_hash();
}

/// How many password hashes run at once: one per core. Each argon2 hash holds about 19 MiB
/// while it runs, and the blocking pool would otherwise run hundreds together (concurrent
/// logins with random names, within the rate limits, took a gateway to 1.8 GB); the others
/// wait their turn, holding nothing but their request.
pub fn password_permits() -> &'static Arc<tokio::sync::Semaphore> {
    static PERMITS: OnceLock<Arc<tokio::sync::Semaphore>> = OnceLock::new();
    PERMITS.get_or_init(|| {
        Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ))
    })
}

/// Runs a password hash off the async threads, within [`password_permits`]. The permit goes
/// with the hash, not with the request: a client that drops its connection while its hash runs
/// does not free a permit for another while the hash goes on.
async fn password_work<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let permit = password_permits()
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let done = work();
        drop(permit);
        done
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))
}

/// Checks a password against a stored argon2 PHC string. An empty or unreadable stored hash never
/// matches, but costs the same as a real one.
pub(crate) fn verify_password(password: &str, stored: Option<&str>) -> bool {
    let argon = argon2::Argon2::default();
    match stored.and_then(|s| PasswordHash::new(s).ok()) {
        Some(parsed) => argon.verify_password(password.as_bytes(), &parsed).is_ok(),
        None => {
            if let Ok(parsed) = PasswordHash::new(dummy_hash()) {
                let _ = argon.verify_password(password.as_bytes(), &parsed);
            }
            false
        }
    }
}

/// Checks a login and password and opens a session living `lifetime_secs`; returns its hash.
/// An unknown or removed login costs the same password check as a wrong password. A blocked user
/// (or a sub-user of a blocked master) is told so only after the password matched.
pub async fn login(
    pool: &PgPool,
    login: &str,
    password: &str,
    lifetime_secs: i64,
) -> Result<String> {
    let row = queries::user_by_login(pool, login)
        .await?
        .filter(|u| !u.removed);
    let stored = row.as_ref().map(|u| u.password_hash.clone());
    let password = password.to_owned();
    let ok = password_work(move || verify_password(&password, stored.as_deref())).await?;
    let Some(user) = row.filter(|_| ok) else {
        return Err(ServiceError::WrongCredentials);
    };
    if user.blocked {
        return Err(ServiceError::UserBlocked);
    }
    let hash = commands::new_session_hash();
    queries::insert_session(pool, &hash, user.id, lifetime_secs.max(1)).await?;
    Ok(hash)
}

// --- user API keys ---------------------------------------------------------------------------------

/// Creates an API key for `user`: a hash that stands in for a session hash on the socket and in
/// the HTTP API, never expires and outlives password changes (it ends when revoked, or when the
/// user is blocked or removed). Returns the user and the key.
pub async fn create_user_api_key(
    pool: &PgPool,
    user: &UserRef,
    name: &str,
) -> Result<(UserRow, String)> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ServiceError::Invalid(
            "a key's name must be 1 to 100 characters".into(),
        ));
    }
    let u = user.resolve(pool).await?;
    // A sub-user of a blocked master is blocked too (its key would come alive at the unblock).
    let master_blocked = match u.master_id {
        Some(m) => UserRef::Id(m).resolve(pool).await?.blocked,
        None => false,
    };
    if u.blocked || master_blocked {
        return Err(ServiceError::UserBlocked);
    }
    let hash = commands::new_session_hash();
    queries::insert_user_api_key(pool, &hash, u.id, name).await?;
    Ok((u, hash))
}

/// A user's API keys, revoked ones included.
pub async fn list_user_api_keys(
    pool: &PgPool,
    user: &UserRef,
) -> Result<(UserRow, Vec<queries::UserApiKeyRow>)> {
    let u = user.resolve(pool).await?;
    let keys = queries::user_api_keys(pool, u.id).await?;
    Ok((u, keys))
}

// --- operator API keys -----------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The stored form of an operator key: its SHA-256, lowercase hex. Keys are 256 random bits, so a
/// fast hash is enough (nothing to brute-force).
pub fn key_hash(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Prefix of every operator key, so that a leaked one is easy to recognise.
pub const KEY_PREFIX: &str = "fgk_";

/// Creates an operator key; returns its id and the key itself (shown once, never stored).
pub async fn create_api_key(pool: &PgPool, name: &str) -> Result<(i64, String)> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ServiceError::Invalid(
            "a key's name must be 1 to 100 characters".into(),
        ));
    }
    let bytes: [u8; 32] = rand::thread_rng().gen();
    let key = format!("{KEY_PREFIX}{}", hex(&bytes));
    let id = queries::insert_operator_key(pool, name, &key_hash(&key)).await?;
    Ok((id, key))
}

pub async fn revoke_api_key(pool: &PgPool, id: i64) -> Result<()> {
    if queries::revoke_operator_key(pool, id).await? {
        Ok(())
    } else {
        Err(ServiceError::KeyNotFound(id))
    }
}

pub async fn list_api_keys(pool: &PgPool) -> Result<Vec<queries::OperatorKeyRow>> {
    Ok(queries::operator_keys(pool).await?)
}

/// Whether `key` is a live operator key.
/// The id of the operator key `key` (as `api-key list` shows it), if it is valid.
pub async fn check_api_key(pool: &PgPool, key: &str) -> Result<Option<i64>> {
    Ok(queries::operator_key_id(pool, &key_hash(key)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With every permit taken, a password hash waits; it runs once one is given back.
    #[tokio::test]
    async fn password_hashes_run_one_per_permit() {
        let permits = password_permits();
        let total = u32::try_from(permits.available_permits()).unwrap();
        let held = permits.acquire_many(total).await.unwrap();
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let mut work = tokio::spawn(password_work(move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            password_permits().available_permits()
        }));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(200), &mut work).await;
        assert!(waited.is_err() && !ran.load(std::sync::atomic::Ordering::SeqCst));
        drop(held);
        let free_while_running = work.await.unwrap().unwrap();
        assert_eq!(free_while_running, total as usize - 1);

        // A request given up on while its hash runs keeps the permit until the hash ends.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
        let work = tokio::spawn(password_work(move || {
            let _ = started_tx.send(());
            let _ = finish_rx.recv();
        }));
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .unwrap()
            .unwrap();
        work.abort();
        assert!(work.await.is_err(), "aborted");
        assert_eq!(permits.available_permits(), total as usize - 1);
        finish_tx.send(()).unwrap();
        let back = async {
            while permits.available_permits() < total as usize {
                tokio::task::yield_now().await; // until the blocking task has ended
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), back)
            .await
            .expect("the permit comes back when the hash ends");
    }

    #[test]
    fn key_hash_is_sha256_hex() {
        assert_eq!(
            key_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn user_ref_parses_ids_and_logins() {
        assert_eq!(UserRef::parse("42"), UserRef::Id(42));
        assert_eq!(UserRef::parse("acme"), UserRef::Login("acme".into()));
    }

    #[test]
    fn passwords_verify_and_empty_hashes_never_match() {
        let stored = commands::hash_password("s3cret").unwrap();
        assert!(verify_password("s3cret", Some(&stored)));
        assert!(!verify_password("wrong", Some(&stored)));
        assert!(!verify_password("", Some("")));
        assert!(!verify_password("s3cret", None));
    }
}
