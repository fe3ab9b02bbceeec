//! order-ingest binary: parse config, start telemetry, run until shutdown.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = order_ingest::Config::parse();
    let _telemetry = elo_telemetry::init(order_ingest::NAME, &config.common.telemetry)?;
    order_ingest::run(config).await
}
