//! Database access. `pool` connects (creating the database if needed) and migrates; `queries`
//! holds every SQL statement the gateway and its commands run; `rows` decodes state rows.

pub mod queries;
pub mod rows;
pub mod time;

use std::time::Duration;

use anyhow::Context;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::Connection;
use sqlx::{PgPool, Postgres};

use crate::config::DatabaseSettings;

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long the first connection of a command or of `serve` may take: a server that accepts
/// TCP and never answers (a wrong port, a stuck proxy) otherwise held it until the peer closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of the first connection name the server and database (password redacted).
fn at(url: &str) -> String {
    format!("PostgreSQL at {}", crate::config::redact_password(url))
}

/// Creates the database named in `url` if it does not exist yet.
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let ensure = async {
        if !Postgres::database_exists(url).await? {
            tracing::info!("creating database");
            if let Err(e) = Postgres::create_database(url).await {
                // Another process may have created it in the meantime.
                if !Postgres::database_exists(url).await? {
                    return Err(e);
                }
            }
        }
        Ok::<_, sqlx::Error>(())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, ensure).await {
        Ok(r) => r.with_context(|| at(url)),
        Err(_) => Err(NoAnswer(at(url)).into()),
    }
}

/// A server that did not answer within the connect timeout (unreachable, or a host that drops
/// packets): as unavailable as one that refuses, but with no `sqlx::Error` to say so.
#[derive(Debug, thiserror::Error)]
#[error("{0}: no answer within {CONNECT_TIMEOUT:?}")]
pub struct NoAnswer(String);

/// Whether `serve` should wait for the database rather than give up at start: it is down,
/// starting up, out of connections or not answering. Not a refused login (class 28, which
/// [`is_unavailable`] counts in for clients): at start that is a setting to mend.
pub fn worth_waiting_for(e: &anyhow::Error) -> bool {
    if e.downcast_ref::<NoAnswer>().is_some() {
        return true;
    }
    match e.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(d)) if d.code().is_some_and(|c| c.starts_with("28")) => false,
        Some(e) => is_unavailable(e),
        None => false,
    }
}

pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = settings.url.parse().with_context(|| at(&settings.url))?;
    let options = options.application_name("fleetgate");
    let connect = async {
        // One connection of our own first: a server that refuses connections, an unknown host
        // or a refused login is reported at once, where the pool retries until its acquire
        // timeout (an operator command waited 5 s to say `Connection refused`).
        PgConnection::connect_with(&options).await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs.max(1)))
            .connect_with(options.clone())
            .await;
        match pool {
            // The pool retries until its acquire timeout and then says only that: one
            // connection of our own tells why (refused, unknown host, authentication).
            Err(sqlx::Error::PoolTimedOut) => match PgConnection::connect_with(&options).await {
                Err(e) => Err(e),
                Ok(_) => Err(sqlx::Error::PoolTimedOut),
            },
            other => other,
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Err(_) => Err(NoAnswer(at(&settings.url)).into()),
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("3D000") => {
            // The paths that do not create the database (operator commands, `serve` with
            // `database.migrate_on_start = false`) say how to.
            anyhow::bail!(
                "{}: {}: run `fleetgate migrate` (it creates the database), or check \
                 database.url / DATABASE_URL",
                at(&settings.url),
                e.message()
            )
        }
        Ok(r) => r.with_context(|| at(&settings.url)),
    }
}

/// The `application_name` of the event processor's connections, as seen in `pg_stat_activity`.
pub const EVENTS_APPLICATION_NAME: &str = "fleetgate-events";

/// The event processor's pool, on the same server and database as `pool`: its own connections,
/// not tested before use (one round trip less per read; a broken connection fails a round, and
/// the processor then resyncs). Connects lazily.
///
/// Its statements end on the server after `statement_timeout` (the longest a round may run,
/// eight times `listen.round_timeout_secs`): a round the processor abandons (see
/// `listen::run_processor`) leaves its reads running on a slow server otherwise. Set after
/// connecting, not as a startup option (which PgBouncer refuses); a refusal is logged.
pub fn events_pool(
    pool: &PgPool,
    settings: &DatabaseSettings,
    statement_timeout: Duration,
) -> PgPool {
    let options = (*pool.connect_options()).clone();
    let set = format!("SET statement_timeout = {}", statement_timeout.as_millis());
    PgPoolOptions::new()
        .max_connections(settings.event_connections.max(1))
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs.max(1)))
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            let set = set.clone();
            Box::pin(async move {
                if let Err(e) = sqlx::Executor::execute(&mut *conn, set.as_str()).await {
                    tracing::warn!(error = %e, "event connection: statement_timeout not set");
                }
                Ok(())
            })
        })
        .connect_lazy_with(options.application_name(EVENTS_APPLICATION_NAME))
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Checks that every migration of this build has been applied, for the paths that do not
/// migrate themselves (`serve` with `database.migrate_on_start = false`, the operator
/// commands): without it they started on an empty database and failed on every request
/// (`relation "users" does not exist`, HTTP 500), or acted on a misspelt one.
pub async fn check_schema(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<i64> =
        match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
        {
            Ok(v) => v,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
                // A runtime role without access to the migrations table (they are applied by
                // another, as least-privilege set-ups do): nothing to check against.
                tracing::warn!(
                    "cannot read _sqlx_migrations (permission denied): schema not checked"
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| m.version.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else if applied.is_empty() {
        anyhow::bail!(
            "the database has no fleetgate schema: run `fleetgate migrate` (or check \
             database.url / DATABASE_URL)"
        )
    } else {
        anyhow::bail!(
            "the database lacks migration(s) {}: run `fleetgate migrate`",
            missing.join(", ")
        )
    }
}

/// Whether an error means the database is unreachable (protocol code 14) rather than a bug.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed
    ) || matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| unavailable_code(&c))
        // 55000 is a broad class; only this one of its errors means "not now".
        || (d.code().as_deref() == Some("55000")
            && d.message().contains("is not currently accepting connections")))
}

/// SQLSTATEs of a server that cannot serve now: connection exceptions (08), operator
/// intervention such as a shutdown or a cancelled statement (57), insufficient resources such as
/// too many connections (53), a login refused (28: a `pg_hba.conf` rule, a password rotated,
/// a role without LOGIN, a pooler refusing during a failover); and (in `is_unavailable`) a
/// database that does not accept connections (`ALLOW_CONNECTIONS false`, 55000). A refused
/// login is the operator's to mend, and the logs say why; to a client it is a database it
/// cannot reach now (code 14, retry), not a server error, and sessions are not ended on a
/// guess meanwhile.
fn unavailable_code(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57")
        || code.starts_with("53")
        || code.starts_with("28")
}

#[cfg(test)]
mod tests {
    #[test]
    fn serve_waits_for_a_server_that_is_not_there_yet_not_for_a_wrong_setting() {
        use anyhow::Context;
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let waits = |e: anyhow::Error| super::worth_waiting_for(&e);
        assert!(waits(
            Err::<(), _>(sqlx::Error::Io(refused))
                .context("PostgreSQL at h")
                .unwrap_err()
        ));
        assert!(waits(sqlx::Error::PoolTimedOut.into()));
        assert!(waits(super::NoAnswer("PostgreSQL at h".into()).into()));
        assert!(!waits(anyhow::anyhow!("the database lacks migration(s) 6")));
        assert!(!waits(sqlx::Error::RowNotFound.into()));
    }

    #[test]
    fn a_server_that_cannot_serve_now_is_unavailable_not_an_error() {
        for code in ["08006", "57P01", "57P03", "53300", "28000", "28P01"] {
            assert!(super::unavailable_code(code), "{code}");
        }
        for code in ["23505", "42P01", "22007", "40001", "55000"] {
            assert!(!super::unavailable_code(code), "{code}");
        }
    }
}
