//! reconciler: Keeps a ledger of what each target should hold versus what sinks confirmed, and repairs drift.
//!
//! # Status
//! The foundation version: it joins its consumer group, validates every record against Elo's
//! Avro contracts (malformed records go to `reconciler.dlq` with their error class), exposes its
//! probes and metrics, and drains and commits on SIGTERM. The ledger work lands with its own
//! issue; until then the default group ends in `-validate`, so the applying version starts
//! from the beginning of the topic and skips nothing.

pub mod ledger;
pub mod repair;
pub mod status;

use std::net::{Ipv4Addr, SocketAddr};

use elo_service::{CommonArgs, ConsumerArgs, ConsumerPlan};

/// Service name, used in logs, metrics, the default group and the DLQ topic.
pub const NAME: &str = "reconciler";

/// Default admin address (/metrics, /health/livez, /health/readyz).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9104);

/// reconciler settings.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "reconciler",
    version,
    about = "Keeps a ledger of what each target should hold versus what sinks confirmed, and repairs drift."
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
}

/// Runs until SIGTERM/SIGINT: stop intake, drain, commit, exit.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let common = &config.common;
    let plan = ConsumerPlan {
        name: NAME,
        default_admin: DEFAULT_ADMIN,
        topics: vec![common.topics.commerce.clone(), common.topics.outcomes.clone()],
        default_batch: 200,
    };
    elo_service::run_validating_consumer(plan, common, &config.consumer).await
}
