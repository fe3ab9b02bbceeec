//! salesforce-sink binary: parse config, start telemetry, run until shutdown.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = salesforce_sink::Config::parse();
    let _telemetry = elo_telemetry::init(salesforce_sink::NAME, &config.common.telemetry)?;
    salesforce_sink::run(config).await
}
