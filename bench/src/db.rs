//! The bench's own database: `fleetgate_bench_<pid>` on the server of `DATABASE_URL`, migrated
//! with the gateway's embedded migrations, refilled with a fresh fleet for every scenario, and
//! dropped at the end.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// `url` with its database (path) replaced by `name`; query parameters are kept.
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    let mut out = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A database of the bench's own on the PostgreSQL server.
pub struct BenchDb {
    pub name: String,
    /// URL of the bench database (what the gateway, writers and listeners connect to).
    pub url: String,
    admin_url: String,
    pub pool: PgPool,
}

/// The fleet of one scenario: trackers `1..=trackers` in one account, one session.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub hash: String,
}

async fn admin(url: &str) -> anyhow::Result<PgConnection> {
    let options: PgConnectOptions = url.parse().context("parsing DATABASE_URL")?;
    options
        .application_name("fleetgate-bench")
        .disable_statement_logging()
        .connect()
        .await
        .with_context(|| format!("connecting to {}", redact(url)))
}

/// Hides a password in a URL for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl BenchDb {
    /// Creates and migrates `fleetgate_bench_<pid>` on the server of `server_url`.
    pub async fn create(server_url: &str) -> anyhow::Result<BenchDb> {
        let name = format!("fleetgate_bench_{}", std::process::id());
        let admin_url = with_database(server_url, "postgres");
        let url = with_database(server_url, &name);
        let mut conn = admin(&admin_url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await.ok();
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.application_name("fleetgate-bench"))
            .await?;
        fleetgate::db::MIGRATOR
            .run(&pool)
            .await
            .context("migrating the bench database")?;
        Ok(BenchDb {
            name,
            url,
            admin_url,
            pool,
        })
    }

    /// Replaces whatever the previous scenario left with `trackers` trackers (ids `1..=n`), each
    /// with a full state row, in one account whose user lives in Europe/Berlin, and one session.
    pub async fn fleet(&self, trackers: i64) -> anyhow::Result<Fleet> {
        let hash = format!(
            "{:016x}{:016x}",
            u64::from(std::process::id()),
            crate::stats::now_ns()
        );
        let mut tx = self.pool.begin().await?;
        sqlx::query("TRUNCATE users RESTART IDENTITY CASCADE")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO users (id, login, time_zone) VALUES (1, 'bench', 'Europe/Berlin')",
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO trackers (id, account_id, source_id, label) \
             SELECT g, 1, 1000000 + g, 'bench ' || g FROM generate_series(1, $1::bigint) g",
        )
        .bind(trackers)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO tracker_states (tracker_id, gps_updated, gps_signal_level, lat, lng, \
               heading, speed, alt, connection_status, movement_status, movement_status_update, \
               ignition, ignition_update, gsm_updated, gsm_signal_level, gsm_network_name, \
               gsm_roaming, last_update, battery_level, battery_update, inputs, inputs_update, \
               outputs, outputs_update, additional) \
             SELECT g, now(), 100, 52.4 + (g % 1000) * 0.0002, 13.3 + (g / 1000) * 0.0002, \
               (g % 360)::int2, 0, 0, 'active', 'parked', now(), false, now(), now(), 80, \
               'Bench GSM', false, now(), 97, now(), '{false,false,true}', now(), \
               '{true,false}', now(), \
               jsonb_build_object('hardware_key', jsonb_build_object('value', g::text, 'updated', now())) \
             FROM generate_series(1, $1::bigint) g",
        )
        .bind(trackers)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO sessions (hash, user_id, expires_at) VALUES ($1, 1, now() + interval '1 day')",
        )
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        for table in ["trackers", "tracker_states", "sessions", "users"] {
            sqlx::raw_sql(&format!("VACUUM ANALYZE {table}"))
                .execute(&self.pool)
                .await?;
        }
        Ok(Fleet { hash })
    }

    /// Drops the database (disconnecting whoever is still on it).
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut conn = admin(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await?;
        conn.close().await.ok();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "b"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/x?sslmode=disable", "b"),
            "postgres://u:p@h:1/b?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "b"), "postgres://h/b");
        assert_eq!(redact("postgres://u:secret@h/x"), "postgres://u:***@h/x");
        assert_eq!(redact("postgres://u@h/x"), "postgres://u@h/x");
    }
}
