//! fleetgate-bench: the benchmark of issue 6. It sets up its own database, fleet and gateway
//! process, drives the gateway over real WebSocket sockets while writers write through the
//! ingest contract, and compares what the dashboards receive with what a bare LISTEN client
//! receives from the same writes, in the same run.
//!
//! ```text
//! cargo run --release -p fleetgate-bench -- <ingest|fanout|latency|connections|subscribe|batch|slow|all> [--quick]
//! ```
//!
//! Modules:
//! - [`scenarios`]: the seven scenarios, their sizes and targets, and the two-phase engine
//!   (raw LISTEN baseline, then the gateway) they share.
//! - [`db`]: the bench database `fleetgate_bench_<pid>` and its fleets.
//! - [`gateway`]: the `fleetgate serve` child process, its guard, `/proc` and `/metrics`.
//! - [`writer`]: writers using the batched upsert of `docs/ingest.md`, and the [`writer::Tape`]
//!   of batch numbers and commit times.
//! - [`raw`]: the bare LISTEN client of the baseline.
//! - [`client`]: the WebSocket dashboards and their checks.
//! - [`stats`]: the bench clock, latency histograms.
//! - [`procfs`]: CPU, memory and file-descriptor limits from the kernel.
//! - [`report`]: Markdown and JSON output.

mod client;
mod db;
mod gateway;
mod procfs;
mod raw;
mod report;
mod scenarios;
mod stats;
mod worker;
mod writer;
mod wsraw;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use futures_util::FutureExt;

use report::{Machine, Outcome, Run};

#[derive(Debug, Parser)]
#[command(
    name = "fleetgate-bench",
    about = "Benchmark of the fleetgate gateway against a raw LISTEN baseline, on real sockets"
)]
struct Cli {
    /// ingest, fanout, latency, connections, subscribe, batch, slow, several separated by commas
    /// (run in that order), or all.
    scenario: String,
    /// A small fleet for a few seconds per scenario (what CI runs; proves the tool works).
    #[arg(long)]
    quick: bool,
    /// Length of each measurement window in seconds (default 20; --quick: 2).
    #[arg(long)]
    window: Option<f64>,
    /// The PostgreSQL server on which the bench creates (and drops) its own database.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Gateway binary to run (default: build and run target/release/fleetgate).
    #[arg(long, env = "FLEETGATE_BENCH_GATEWAY")]
    gateway: Option<PathBuf>,
    /// Sockets of the connections scenario (default 100,000; --quick: 2,000; capped by the
    /// open-file limit), or dashboards of the batch scenario (default 100; --quick: 10).
    #[arg(long)]
    sockets: Option<usize>,
    /// Gateway processes of the connections scenario (default: as many as the open-file limit
    /// requires, each holding up to the limit less 500 sockets; --quick: 2). Their clients run
    /// in as many worker processes.
    #[arg(long)]
    gateways: Option<usize>,
    /// Dashboards with a `state_batch` of the whole fleet (rate 1 s) added to the latency
    /// scenario, to see what batch building costs the other sockets (default 0).
    #[arg(long, default_value_t = 0)]
    batch_dashboards: usize,
    /// Batch dashboards do not offer `permessage-deflate` (by default they do, as browsers).
    #[arg(long)]
    no_compression: bool,
    /// Output folder for JSON results and gateway logs (default: target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    stats::init_clock();
    let cli = Cli::parse();
    if cli.scenario == "worker" {
        // A client shard of the `connections` scenario (see worker.rs); not for direct use.
        return match tokio::runtime::Runtime::new().map(|rt| rt.block_on(worker::run())) {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("bench worker: {e:#}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("bench worker: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let names: Vec<&'static str> = if cli.scenario == "all" {
        scenarios::ALL.to_vec()
    } else {
        let mut names = Vec::new();
        for name in cli.scenario.split(',').map(str::trim) {
            let Some(n) = scenarios::ALL.iter().find(|n| **n == name) else {
                eprintln!(
                    "unknown scenario {name:?}; choose one of {}, several separated by commas, or all",
                    scenarios::ALL.join(", ")
                );
                return ExitCode::from(2);
            };
            names.push(*n);
        }
        names
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli, names));
    // Client tasks still closing must not hold the process.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn machine(postgres: String) -> Machine {
    Machine {
        cores: procfs::cores(),
        memory_gib: (procfs::mem_total_gib() * 10.0).round() / 10.0,
        cpu: procfs::cpu_model(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        postgres,
        load_average_at_start: std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
    }
}

async fn run(cli: Cli, names: Vec<&'static str>) -> anyhow::Result<bool> {
    let out_dir = cli
        .out
        .clone()
        .unwrap_or_else(|| gateway::target_dir().join("bench"));
    std::fs::create_dir_all(&out_dir)?;
    // Sockets of both ends live in this process tree: raise the limit (the gateway inherits it).
    let want = if names.contains(&"connections") && !cli.quick {
        cli.sockets.unwrap_or(100_000) as u64 + 1000
    } else {
        65_536
    };
    let nofile = procfs::raise_nofile(want);
    if nofile < want {
        eprintln!("bench: open-file limit is {nofile} (wanted {want}); large scenarios may fail");
    }
    let gateway_bin = match &cli.gateway {
        Some(p) => p.clone(),
        None => tokio::task::spawn_blocking(gateway::build).await??,
    };
    let config_dir = gateway::config_dir(&out_dir)?;
    let started = chrono::Utc::now();
    let stamp = started.format("%Y%m%dT%H%M%SZ").to_string();

    eprintln!(
        "bench: creating the bench database on {}",
        db::redact(&cli.database_url)
    );
    let bench_db = db::BenchDb::create(&cli.database_url).await?;
    let pg_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&bench_db.pool)
        .await
        .unwrap_or_default();
    let machine = machine(format!("PostgreSQL {pg_version}"));
    let mut ctx = scenarios::Ctx {
        db: bench_db,
        gateway_bin,
        config_dir,
        out_dir: out_dir.clone(),
        quick: cli.quick,
        window: cli.window.map(Duration::from_secs_f64),
        sockets: cli.sockets,
        gateways: cli.gateways,
        batch_dashboards: cli.batch_dashboards,
        deflate: !cli.no_compression,
        done: Vec::new(),
    };

    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut ok = true;
    let mut interrupted = false;
    for name in &names {
        eprintln!("bench: === {name} ===");
        let result = tokio::select! {
            r = AssertUnwindSafe(scenarios::run(&mut ctx, name)).catch_unwind() => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(result) = result else {
            interrupted = true;
            eprintln!("bench: interrupted");
            break;
        };
        let failure = match result {
            Ok(Ok(o)) => {
                outcomes.push(o);
                None
            }
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(panic) => Some(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".into()),
            ),
        };
        if let Some(why) = failure {
            ok = false;
            eprintln!("bench: {name} failed: {why}");
            outcomes.push(Outcome {
                scenario: name.to_string(),
                quick: cli.quick,
                errors: 1,
                first_error: Some(why),
                ..Outcome::default()
            });
        }
    }
    let db = ctx.db;
    if let Err(e) = db.drop_database().await {
        eprintln!("bench: could not drop the bench database: {e:#}");
    }

    let title = if cli.quick {
        "fleetgate-bench (quick)"
    } else {
        "fleetgate-bench"
    };
    println!("## {title}: {}\n", names.join(", "));
    println!(
        "Machine: {} cores ({}), {} GiB, Linux {}, {}; load average at start {}.\n",
        machine.cores,
        machine.cpu,
        machine.memory_gib,
        machine.kernel,
        machine.postgres,
        machine.load_average_at_start
    );
    println!("{}", report::markdown(&outcomes));
    let notes = report::notes(&outcomes);
    if !notes.is_empty() {
        println!("{notes}");
    }
    let name = if cli.scenario == "all" {
        "all"
    } else {
        names.first().copied().unwrap_or("bench")
    };
    let run = Run {
        started: started.to_rfc3339(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        quick: cli.quick,
        machine: &machine,
        results: &outcomes,
    };
    report::write_json(&out_dir, name, &stamp, &run)?;
    eprintln!(
        "bench: JSON in {}",
        out_dir.join(format!("{name}-{stamp}.json")).display()
    );
    Ok(ok && !interrupted)
}
