//! The command line: one binary for the server, migrations, the demo fleet, the traffic
//! simulator and the operator commands. Each command is a thin call into `commands` or `startup`.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::{commands, db, startup::Application};

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
    /// Print the effective configuration (secrets redacted) and exit.
    CheckConfig,
}

#[derive(Debug, Subcommand)]
pub enum TrackerAction {
    /// Block a tracker: subscribers get a `block` lifecycle event and no more states.
    Block { id: i64 },
    /// Unblock a tracker: subscribers get `unblock` and then its current state.
    Unblock { id: i64 },
    /// Remove a tracker: subscribers get a `corrupt` lifecycle event.
    Remove { id: i64 },
}

#[derive(Debug, Subcommand)]
pub enum SessionAction {
    /// End a session: its sockets get `logout` and are closed.
    Revoke { hash: String },
}

pub async fn run(cli: Cli, mut settings: Settings) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { listen } => {
            if let Some(addr) = listen {
                settings.server.listen = addr;
            }
            let listener = TcpListener::bind(&settings.server.listen)
                .with_context(|| format!("binding {}", settings.server.listen))?;
            let app = Application::build(settings, listener).await?;
            tracing::info!(port = app.port(), "fleetgate listening");
            let stop = app.shutdown_handle();
            tokio::spawn(async move {
                wait_for_signal().await;
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
            let pool = commands::pool(&settings).await?;
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
            let pool = commands::pool(&settings).await?;
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
        Command::CheckConfig => {
            println!("{settings:#?}");
            Ok(())
        }
    }
}

async fn wait_for_signal() {
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
