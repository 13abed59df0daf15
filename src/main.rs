use clap::Parser;

use fleetgate::{cli, config::Settings, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
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
    // name (`RUST_LOG=fleetgate`) is valid filter syntax, however little it logs. Written to
    // stderr directly, since the filter in question may hide it.
    if let Some(filter) = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        if let Err(e) = fleetgate::config::check_filter("RUST_LOG", &filter) {
            eprintln!("warning: {e}; it may log nothing at all");
        }
    }
    telemetry::init(&settings.log, std::io::stderr);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(cli::run(cli, settings))
}
