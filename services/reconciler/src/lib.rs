//! reconciler: Keeps a ledger of what each target should hold versus what sinks confirmed, and repairs drift.
//!
//! # Status
//! The foundation version: it joins its consumer group, validates every record against Elo's
//! Avro contracts (malformed records go to `reconciler.dlq` with their error class), exposes its
//! probes and metrics, and drains and commits on SIGTERM. The ledger work lands with its own
//! issue; until then the default group ends in `-validate`, so the applying version starts
//! from the beginning of the topic and skips nothing.

pub mod dlq;
pub mod flow;
pub mod http;
pub mod ops;
pub mod report;
pub mod scan;
pub mod status;

#[cfg(test)]
mod cli_tests;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

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
    /// Operator commands; without one, the service runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    #[command(flatten)]
    pub ops: ops::OpsArgs,
}

/// Operator commands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Dead letters of every service: list, show, replay.
    #[command(subcommand)]
    Dlq(dlq::cli::DlqCommand),
    /// Write the daily process report (HTML, JSON, CSV) and exit.
    Report(report::cli::ReportArgs),
}

/// Runs an operator command and exits, or runs the service until SIGTERM/SIGINT: stop
/// intake, drain, commit, exit.
pub async fn run(config: Config) -> anyhow::Result<()> {
    match config.command.clone() {
        Some(Command::Dlq(command)) => return dlq::cli::run(&config.common, &config.ops, command).await,
        Some(Command::Report(args)) => return report::cli::run(&config.common, &config.ops, args).await,
        None => {}
    }
    let common = &config.common;
    // The ledger side publishes its figures on `_status_tx`; until it does, the reports and
    // the flow diagram show zeros for them.
    let (_status_tx, status_rx) = status::channel();
    let group = config.consumer.group.clone().unwrap_or_else(|| format!("elo-{NAME}-validate"));
    // The reports listener is for people: with --http-optional a taken port leaves the
    // ledger running (the gauge and the error say why the pages are missing); any other
    // start-up error is a misconfiguration and stops the service.
    let ops_task = match start_ops_listener(&config, &group, status_rx).await {
        Ok((_, task)) => {
            http::LISTENER_UP.set(1);
            Some(task)
        }
        Err(error) if config.ops.http_optional && http::is_address_in_use(&error) => {
            http::LISTENER_UP.set(0);
            tracing::error!(error = %format!("{error:#}"), "reports and flow diagram unavailable; the reconciler runs without them");
            None
        }
        Err(error) => return Err(error),
    };
    let plan = ConsumerPlan {
        name: NAME,
        default_admin: DEFAULT_ADMIN,
        topics: vec![common.topics.commerce.clone(), common.topics.outcomes.clone()],
        default_batch: 200,
    };
    let result = elo_service::run_validating_consumer(plan, common, &config.consumer).await;
    if let Some(task) = ops_task {
        task.abort();
    }
    result
}

/// Starts the reports and flow-diagram listener (`--http-listen`).
pub async fn start_ops_listener(
    config: &Config,
    group: &str,
    status: status::StatusReceiver,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let common = &config.common;
    let codec = Arc::new(elo_events::EventCodec::new(&common.registry.config()?)?);
    let report = report::collect::ReportSources::new(common, &config.ops, codec)?;
    let flow = flow::FlowSources::new(&common.kafka, &config.ops, &common.topics, group)?;
    let state = Arc::new(http::OpsState::new(report, flow, status, common.topics.commerce.clone()));
    http::serve(config.ops.http_listen, state, http::ListenerLimits::default()).await
}
