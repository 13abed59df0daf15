//! The command line: one binary for the server, migrations, the demo fleet, the traffic
//! simulator and the operator commands. Each command is a thin call into `commands`, `service`
//! (the operator actions the HTTP API shares) or `startup`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::service::{self, UserRef};
use crate::startup::{self, Application};
use crate::{commands, db};

#[derive(Debug, Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "Live GPS-tracker state over WebSocket, from PostgreSQL"
)]
pub struct Cli {
    /// Folder holding default.toml and local.toml.
    #[arg(
        long,
        env = "FLEETGATE_CONFIG_DIR",
        default_value = "config",
        global = true
    )]
    pub config_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Address to bind (overrides server.listen), e.g. 0.0.0.0:8080.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Create (or reuse) the demo fleet and print its sessions and trackers.
    SeedDemo {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move trackers along plausible paths, writing through the ingest contract.
    Simulate {
        /// State updates per second, over all trackers.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Only trackers of this account login (default: every non-removed tracker).
        #[arg(long)]
        account: Option<String>,
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// Operator actions on a tracker.
    Tracker {
        #[command(subcommand)]
        action: TrackerAction,
    },
    /// Operator actions on a session.
    Session {
        #[command(subcommand)]
        action: SessionAction,
    },
    /// Operator actions on users: create, block, unblock, API keys.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Grant trackers of its account to a sub-user.
    Grant {
        /// The sub-user: an id or a login (digits are taken as an id).
        user: String,
        /// Tracker ids.
        #[arg(required = true)]
        trackers: Vec<i64>,
    },
    /// Revoke a sub-user's grants: its live subscriptions to them stop (`disallowed`).
    RevokeGrant {
        /// The sub-user: an id or a login (digits are taken as an id).
        user: String,
        /// Tracker ids.
        #[arg(required = true)]
        trackers: Vec<i64>,
    },
    /// Operator API keys for `/v2/admin/`.
    ApiKey {
        #[command(subcommand)]
        action: ApiKeyAction,
    },
    /// Print the effective configuration (secrets redacted) and exit.
    CheckConfig,
}

#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Create a master account, or with --master a sub-user of one; prints its id.
    Create {
        login: String,
        /// The password (or set FLEETGATE_USER_PASSWORD, which stays out of `ps`).
        #[arg(long, env = "FLEETGATE_USER_PASSWORD", hide_env_values = true)]
        password: String,
        /// IANA time zone of the user's dates (default UTC).
        #[arg(long)]
        time_zone: Option<String>,
        /// Make a sub-user of this master account (an id or a login).
        #[arg(long)]
        master: Option<String>,
    },
    /// Block a user: its sessions (and its sub-users') end with `logout`; logging in is refused.
    Block {
        /// An id or a login (digits are taken as an id).
        user: String,
    },
    /// Unblock a user (ended sessions stay ended).
    Unblock {
        /// An id or a login (digits are taken as an id).
        user: String,
    },
    /// Create an API key for a user and print it: a hash that stands in for a session hash
    /// (socket and HTTP API), never expires and outlives password changes. It ends with
    /// `session revoke KEY`, or when the user is blocked or removed.
    ApiKey {
        /// An id or a login (digits are taken as an id).
        user: String,
        /// What the key is for, e.g. the integration using it.
        name: String,
    },
    /// List a user's API keys (revoked ones too).
    ApiKeys {
        /// An id or a login (digits are taken as an id).
        user: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyAction {
    /// Create a key and print it (only its hash is stored: it cannot be shown again).
    Create {
        /// What the key is for, e.g. the tool or person using it.
        name: String,
    },
    /// Revoke a key by id: it is refused from now on (code 11).
    Revoke {
        /// The key's id, as `api-key list` shows it.
        id: i64,
    },
    /// List keys (ids, names, dates; never the keys).
    List,
}

#[derive(Debug, Subcommand)]
pub enum TrackerAction {
    /// Block a tracker: subscribers get a `block` lifecycle event and no more states.
    Block {
        /// The tracker's id.
        #[arg(allow_negative_numbers = true)]
        id: i64,
    },
    /// Unblock a tracker: subscribers get `unblock` and then its current state.
    Unblock {
        /// The tracker's id.
        #[arg(allow_negative_numbers = true)]
        id: i64,
    },
    /// Remove a tracker: subscribers get a `corrupt` lifecycle event.
    Remove {
        /// The tracker's id.
        #[arg(allow_negative_numbers = true)]
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum SessionAction {
    /// End a session: its sockets get `logout` and are closed.
    Revoke {
        /// The session hash (or a user's API key).
        hash: String,
    },
}

pub async fn run(cli: Cli, mut settings: Settings) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { listen } => {
            let from = match listen {
                Some(addr) => {
                    crate::config::check_listen("--listen", &addr).map_err(anyhow::Error::msg)?;
                    settings.server.listen = addr;
                    "--listen"
                }
                None => {
                    crate::config::check_listen("server.listen", &settings.server.listen)
                        .map_err(anyhow::Error::msg)?;
                    "server.listen"
                }
            };
            log_config_files(&cli.config_dir);
            if from == "server.listen" {
                let demo = std::env::var("FLEETGATE_LISTEN").ok();
                if let Some(w) =
                    crate::config::listen_variable_ignored(demo.as_deref(), &settings.server.listen)
                {
                    tracing::warn!("{w}");
                }
            }
            if let Some(w) = crate::config::frame_limit_warning(&settings.websocket) {
                tracing::warn!("{w}");
            }
            startup::log_open_file_limit();
            startup::tune_process(&settings.server);
            let listener = TcpListener::bind(&settings.server.listen)
                .with_context(|| format!("binding {from} {}", settings.server.listen))?;
            let address = listener
                .local_addr()
                .map_or_else(|_| settings.server.listen.clone(), |a| a.to_string());
            // One signal future from start to stop: tokio keeps its handler once installed, so
            // a signal between two futures would be lost, not the default kill.
            let mut signal = Box::pin(wait_for_signal());
            let Some(app) = build_waiting_for_database(settings, listener, &mut signal).await?
            else {
                return Ok(());
            };
            tracing::info!(address = %address, port = app.port(), "fleetgate listening");
            let stop = app.shutdown_handle();
            tokio::spawn(async move {
                signal.await;
                let _ = stop.send(true);
            });
            app.run_until_stopped().await?;
            Ok(())
        }
        Command::Migrate => {
            db::ensure_database(&settings.database.url).await?;
            let pool = db::connect(&settings.database).await?;
            db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::SeedDemo { json } => {
            let pool = commands::demo_pool(&settings).await?;
            let demo = commands::seed_demo(&pool).await?;
            if json {
                println!("{}", serde_json::to_string(&demo)?);
            } else {
                print!("{}", demo.describe());
            }
            Ok(())
        }
        Command::Simulate {
            rate,
            account,
            seconds,
        } => {
            let pool = commands::demo_pool(&settings).await?;
            commands::simulate(&pool, rate, account.as_deref(), seconds).await
        }
        Command::Tracker { action } => {
            let pool = commands::pool(&settings).await?;
            let (id, what) = match action {
                TrackerAction::Block { id } => (id, commands::TrackerOp::Block),
                TrackerAction::Unblock { id } => (id, commands::TrackerOp::Unblock),
                TrackerAction::Remove { id } => (id, commands::TrackerOp::Remove),
            };
            commands::tracker_op(&pool, id, what).await?;
            println!("tracker {id}: {}", what.done());
            Ok(())
        }
        Command::Session {
            action: SessionAction::Revoke { hash },
        } => {
            let pool = commands::pool(&settings).await?;
            commands::revoke_session(&pool, &hash).await?;
            println!("session revoked");
            Ok(())
        }
        Command::User { action } => {
            let pool = commands::pool(&settings).await?;
            match action {
                UserAction::Create {
                    login,
                    password,
                    time_zone,
                    master,
                } => {
                    let new = service::NewUser {
                        login,
                        password,
                        time_zone,
                        master: master.as_deref().map(UserRef::parse),
                    };
                    let id = service::create_user(&pool, new).await?;
                    println!("user {id} created");
                }
                UserAction::Block { user } => {
                    let u = service::set_user_blocked(&pool, &UserRef::parse(&user), true).await?;
                    println!("user {} ({}) blocked", u.id, u.login);
                }
                UserAction::Unblock { user } => {
                    let u = service::set_user_blocked(&pool, &UserRef::parse(&user), false).await?;
                    println!("user {} ({}) unblocked", u.id, u.login);
                    if let Some(master) = u.master_id {
                        let m = UserRef::Id(master).resolve(&pool).await?;
                        if m.blocked {
                            eprintln!(
                                "note: its master account {} ({}) is blocked: the sub-user cannot \
                                 log in until that is unblocked too",
                                m.id, m.login
                            );
                        }
                    }
                }
                UserAction::ApiKey { user, name } => {
                    let (u, key) =
                        service::create_user_api_key(&pool, &UserRef::parse(&user), &name).await?;
                    eprintln!(
                        "API key for user {} ({}) created; use it as a session hash:",
                        u.id, u.login
                    );
                    println!("{key}");
                }
                UserAction::ApiKeys { user } => {
                    let (u, keys) =
                        service::list_user_api_keys(&pool, &UserRef::parse(&user)).await?;
                    if keys.is_empty() {
                        eprintln!("user {} ({}) has no API keys", u.id, u.login);
                    }
                    for k in keys {
                        println!(
                            "{}  {:<24}  created {}  {}",
                            k.hash,
                            k.name,
                            utc(k.created_at),
                            key_state(k.revoked_at, "ended")
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Grant { user, trackers } => {
            let pool = commands::pool(&settings).await?;
            let n = service::grant(&pool, &UserRef::parse(&user), &trackers).await?;
            println!("{n} new grant(s)");
            Ok(())
        }
        Command::RevokeGrant { user, trackers } => {
            let pool = commands::pool(&settings).await?;
            let n = service::revoke_grant(&pool, &UserRef::parse(&user), &trackers).await?;
            println!("{n} grant(s) revoked");
            Ok(())
        }
        Command::ApiKey { action } => {
            let pool = commands::pool(&settings).await?;
            match action {
                ApiKeyAction::Create { name } => {
                    let (id, key) = service::create_api_key(&pool, &name).await?;
                    eprintln!("operator key {id} created; it is shown only once:");
                    println!("{key}");
                }
                ApiKeyAction::Revoke { id } => {
                    service::revoke_api_key(&pool, id).await?;
                    println!("operator key {id} revoked");
                }
                ApiKeyAction::List => {
                    let keys = service::list_api_keys(&pool).await?;
                    if keys.is_empty() {
                        eprintln!(
                            "no operator keys (create one with `fleetgate api-key create NAME`)"
                        );
                    }
                    for k in keys {
                        println!(
                            "{:>4}  {:<24}  created {}  {}",
                            k.id,
                            k.name,
                            utc(k.created_at),
                            key_state(k.revoked_at, "revoked")
                        );
                    }
                }
            }
            Ok(())
        }
        Command::CheckConfig => {
            use crate::telemetry::RustLog;
            // Which files were layered, then the result (the database password redacted), then
            // what serve works out beyond the files.
            for (path, read) in config_files(&cli.config_dir) {
                let found = if read { "read" } else { "not found" };
                eprintln!("{}: {found}", path.display());
            }
            // What serve refuses beyond the files' own checks.
            crate::config::check_listen("server.listen", &settings.server.listen)
                .map_err(anyhow::Error::msg)?;
            println!("{}", settings.to_toml()?.trim_end());
            // (A warning about RUST_LOG, if any, went out at start: see main.)
            let rust_log = crate::telemetry::rust_log();
            if let (spec, RustLog::Used(_)) =
                crate::telemetry::filter_spec(&settings.log.level, rust_log.as_deref())
            {
                eprintln!("RUST_LOG overrides log.level: logs go through `{spec}`");
            }
            if let Some(w) = crate::config::frame_limit_warning(&settings.websocket) {
                eprintln!("warning: {w}");
            }
            let _ = startup::raise_open_file_limit();
            let automatic = startup::automatic_socket_limit(&settings);
            let set = settings.websocket.max_sockets;
            if set == 0 {
                eprintln!(
                    "websocket.max_sockets = 0: serve would hold at most {automatic} sockets \
                     (from the open-file limit)"
                );
            } else if automatic > 0 && set > automatic {
                eprintln!(
                    "warning: websocket.max_sockets = {set} is above the {automatic} sockets the \
                     open-file limit allows: past that, new connections would fail for want of \
                     descriptors instead of being refused with code 15"
                );
            }
            Ok(())
        }
    }
}

/// A time as the key listings print it.
fn utc(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `active`, or `<ended> <when>` for a key that ended then.
fn key_state(ended_at: Option<chrono::DateTime<chrono::Utc>>, ended: &str) -> String {
    ended_at.map_or_else(|| "active".into(), |t| format!("{ended} {}", utc(t)))
}

/// The configuration files layered from `dir` (and `FLEETGATE_CONFIG`), and whether each was
/// there to read.
fn config_files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, bool)> {
    let mut files: Vec<_> = ["default.toml", "local.toml"]
        .iter()
        .map(|name| {
            let p = dir.join(name);
            let read = p.is_file();
            (p, read)
        })
        .collect();
    // Required when named (loading fails without it), and may be given without its extension.
    files.extend(crate::config::extra_file().map(|p| (p.into(), true)));
    files
}

/// Logs the files `serve` read its settings from, and warns when the folder or its
/// `default.toml` is not there (run from another directory, the gateway would otherwise run on built-in defaults
/// without a word).
fn log_config_files(dir: &std::path::Path) {
    let read: Vec<String> = config_files(dir)
        .into_iter()
        .filter(|(_, read)| *read)
        .map(|(p, _)| p.display().to_string())
        .collect();
    if dir.join("default.toml").is_file() {
        tracing::info!(files = ?read, "configuration read");
    } else if dir.is_dir() {
        // A folder without the defaults file (a copy of config/ that left it out): every
        // setting the others do not set is at its built-in default.
        tracing::warn!(
            folder = %dir.display(),
            files = ?read,
            "no default.toml in the config folder: built-in defaults for every setting the \
             files read and the environment do not set"
        );
    } else {
        let cwd = std::env::current_dir().unwrap_or_default();
        tracing::warn!(
            folder = %dir.display(),
            cwd = %cwd.display(),
            files = ?read,
            "config folder not found: built-in defaults and the environment only \
             (run from the repository, or pass --config-dir)"
        );
    }
}

/// How long the first try to build the application may take before the address starts
/// answering `/health` (200) and `/ready` (503) while it goes on.
const SLOW_TRY: Duration = Duration::from_secs(1);

/// `serve`'s start: builds the application, waiting up to `database.startup_wait_secs` while
/// the database cannot be reached yet ([`db::worth_waiting_for`]), so that a gateway started
/// before its database comes up with it instead of exiting. Meanwhile the address answers
/// `/health` (200), `/ready` (503) and anything else with code 14 ([`startup::waiting_server`]).
/// The last try is made when the wait is up (a try can take up to the connect timeout, 15 s, on
/// a server that does not answer; the address answers as above once a try has taken
/// [`SLOW_TRY`]). `None`: stopped by `signal` (serve's, which it goes on using once started)
/// before the application was built.
async fn build_waiting_for_database(
    settings: Settings,
    listener: TcpListener,
    signal: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> anyhow::Result<Option<Application>> {
    let wait = Duration::from_secs(settings.database.startup_wait_secs);
    let started = Instant::now();
    let mut delay = Duration::from_millis(settings.listen.reconnect_min_ms.max(100));
    let longest = Duration::from_millis(settings.listen.reconnect_max_ms).max(delay);
    let mut waiting: Option<actix_web::dev::ServerHandle> = None;
    let stop_waiting = |waiting: Option<actix_web::dev::ServerHandle>| async move {
        if let Some(handle) = waiting {
            handle.stop(true).await;
        }
    };
    let answer_meanwhile = || -> anyhow::Result<actix_web::dev::ServerHandle> {
        let server = startup::waiting_server(
            listener
                .try_clone()
                .context("duplicating the listening socket")?,
        )?;
        let handle = server.handle();
        tokio::spawn(server);
        Ok(handle)
    };
    let stopped = |waiting| async move {
        tracing::info!("stopped while waiting for the database");
        stop_waiting(waiting).await;
        Ok(None)
    };
    loop {
        let attempt = listener
            .try_clone()
            .context("duplicating the listening socket")?;
        let build = Application::build(settings.clone(), attempt);
        tokio::pin!(build);
        // A try on a server that does not answer takes up to 15 s: the address answers
        // /health meanwhile once a try is slow, not only after the first one failed.
        let mut built = None;
        if waiting.is_none() && !wait.is_zero() {
            tokio::select! {
                b = &mut build => built = Some(b),
                _ = tokio::time::sleep(SLOW_TRY) => waiting = Some(answer_meanwhile()?),
                _ = &mut *signal => return stopped(waiting).await,
            }
        }
        let built = match built {
            Some(b) => b,
            None => tokio::select! {
                b = &mut build => b,
                _ = &mut *signal => return stopped(waiting).await,
            },
        };
        let e = match built {
            Ok(app) => {
                stop_waiting(waiting).await;
                return Ok(Some(app));
            }
            Err(e) => e,
        };
        let left = wait.saturating_sub(started.elapsed());
        if !db::worth_waiting_for(&e) || left.is_zero() {
            stop_waiting(waiting).await;
            return Err(e);
        }
        if waiting.is_none() {
            waiting = Some(answer_meanwhile()?);
        }
        let pause = delay.min(left);
        tracing::warn!(
            error = error_line(&e),
            retry_in_ms = pause.as_millis() as u64,
            waited_s = started.elapsed().as_secs(),
            "the database cannot be reached yet: waiting for it (database.startup_wait_secs)"
        );
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut *signal => return stopped(waiting).await,
        }
        delay = (delay * 2).min(longest);
    }
}

/// An error and its causes on one line, as `{:#}` writes them, less a cause whose text its
/// error already ends with (sqlx's I/O error writes its source into its own message, which
/// read `Connection refused (os error 111): Connection refused (os error 111)`).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn an_error_line_leaves_out_a_cause_its_error_already_ends_with() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = anyhow::Error::from(sqlx::Error::Io(io)).context("PostgreSQL at postgres://x");
        assert_eq!(
            error_line(&e),
            "PostgreSQL at postgres://x: error communicating with database: Connection refused"
        );
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(error_line(&e), "outer: middle: inner");
    }
}
