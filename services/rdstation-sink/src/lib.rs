//! rdstation-sink: Applies commerce events to RD Station Marketing (contacts, legal bases, tags, e-commerce events).
//!
//! # Status
//! The foundation version: it joins its consumer group, validates every record against Elo's
//! Avro contracts (malformed records go to `rdstation-sink.dlq` with their error class), exposes its
//! probes and metrics, and drains and commits on SIGTERM. The RD Station work lands with its own
//! issue; until then the default group ends in `-validate`, so the applying version starts
//! from the beginning of the topic and skips nothing.

use std::net::{Ipv4Addr, SocketAddr};

use elo_service::{CommonArgs, ConsumerArgs, ConsumerPlan};

/// Service name, used in logs, metrics, the default group and the DLQ topic.
pub const NAME: &str = "rdstation-sink";

/// Default admin address (/metrics, /health/livez, /health/readyz).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9103);

/// rdstation-sink settings.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "rdstation-sink",
    version,
    about = "Applies commerce events to RD Station Marketing (contacts, legal bases, tags, e-commerce events)."
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
        topics: vec![common.topics.commerce.clone()],
        default_batch: 50,
    };
    elo_service::run_validating_consumer(plan, common, &config.consumer).await
}
