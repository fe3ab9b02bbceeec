//! order-ingest binary: parse config, start telemetry, run until shutdown.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = order_ingest::Config::parse();
    let _telemetry = elo_telemetry::init(order_ingest::NAME, &config.common.telemetry)?;
    match config.command.clone() {
        Some(order_ingest::Command::Backfill(args)) => order_ingest::backfill::main(config, args).await,
        None => order_ingest::run(config).await,
    }
}
