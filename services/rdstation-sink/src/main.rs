//! rdstation-sink binary: parse config, start telemetry, run until shutdown.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = rdstation_sink::Config::parse();
    let _telemetry = elo_telemetry::init(rdstation_sink::NAME, &config.common.telemetry)?;
    rdstation_sink::run(config).await
}
