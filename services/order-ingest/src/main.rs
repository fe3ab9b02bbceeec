//! order-ingest binary: parse config, start telemetry, run until shutdown.

use clap::Parser;

/// See the workspace manifest for why (malloc-heavy JSON trees on the push path).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = order_ingest::Config::parse();
    let _telemetry = elo_telemetry::init(order_ingest::NAME, &config.common.telemetry)?;
    match config.command.clone() {
        Some(order_ingest::Command::Backfill(args)) => order_ingest::backfill::main(config, args).await,
        None => order_ingest::run(config).await,
    }
}
