//! reconciler binary: parse config, start telemetry, run until shutdown.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = reconciler::Config::parse();
    let _telemetry = elo_telemetry::init(reconciler::NAME, &config.common.telemetry)?;
    reconciler::run(config).await
}
