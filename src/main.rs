use clap::Parser;

use fleetgate::{cli, config::Settings, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Errors go out as one `error: …` line with their causes, never with a stack trace (which
/// `anyhow` adds to a returned error when `RUST_BACKTRACE` is set): an operator's mistake is
/// not a bug.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    // A folder named on purpose (--config-dir, FLEETGATE_CONFIG_DIR) must be there: its files
    // would otherwise be left out without a word. The default one may be missing (built-in
    // defaults and the environment then).
    if !cli.config_dir.is_dir() && cli.config_dir != std::path::Path::new("config") {
        anyhow::bail!(
            "config folder {} not found (--config-dir or FLEETGATE_CONFIG_DIR)",
            cli.config_dir.display()
        );
    }
    let settings = Settings::load(&cli.config_dir)?;
    // RUST_LOG overrides log.level and gets the same check, but only a warning: a bare target
    // name (`RUST_LOG=fleetgate`) is valid filter syntax. Written to stderr directly, since the
    // filter in question may hide it.
    match telemetry::filter_spec(&settings.log.level, telemetry::rust_log().as_deref()).1 {
        telemetry::RustLog::Used(Some(warning)) | telemetry::RustLog::Ignored(warning) => {
            eprintln!("warning: {warning}")
        }
        _ => {}
    }
    telemetry::init(&settings.log, std::io::stderr);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(cli::run(cli, settings))
}
