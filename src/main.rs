use clap::Parser;

use fleetgate::{cli, config::Settings, telemetry};

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    let settings = Settings::load(&cli.config_dir)?;
    telemetry::init(&settings.log, std::io::stderr);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(cli::run(cli, settings))
}
