//! reconciler: keeps a ledger of what each target should hold versus what the sinks confirmed,
//! finds what is overdue, failed or drifted, and repairs it through `integration.commands`.
//!
//! # Layout
//! - [`ledger`]: one entry per order and customer and its pure transitions.
//! - [`store`]: the ledger in a [`elo_kafka::StateStore`] (changelog `reconciler.ledger`), the
//!   consumer handler folding `commerce.events` and `integration.outcomes` into it, and the
//!   periodic check (figures, repairs, [`status::LedgerStatus`]).
//! - `figures`: one pass's counts and report lists, as a [`status::LedgerStatus`].
//! - [`repair`]: which command a problem calls for, attempts, backoff and escalation.
//! - [`sweep`]: reads the source and the targets within an API budget to find drift.
//! - [`stock`]: stock facts from `inventory.events`; quantities that stay negative.
//! - [`metrics`]: every metric the service exports.

pub mod contact;
pub mod cursor;
pub mod dlq;
mod figures;
pub mod flow;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod ops;
pub mod plan;
pub mod repair;
pub mod report;
pub mod scan;
pub mod status;
pub mod stock;
pub mod store;
pub mod sweep;

#[cfg(test)]
mod cli_tests;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use elo_kafka::StateStore;
use elo_service::{CommonArgs, ConsumerArgs, Service};

use crate::repair::{Policy, TargetSpec};
use crate::stock::StockSide;
use crate::store::{KafkaCommands, Ledger, LedgerHandler};

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
    pub ledger: LedgerArgs,
    #[command(flatten)]
    pub sweeps: sweep::SweepArgs,
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

/// Ledger, SLA and repair settings.
#[derive(Clone, Debug, clap::Args)]
pub struct LedgerArgs {
    /// Compacted changelog of the ledger (one entry per order and customer).
    #[arg(long = "ledger-topic", env = "ELO_RECONCILER_LEDGER_TOPIC", default_value = "reconciler.ledger")]
    pub ledger_topic: String,
    /// Targets every order and customer must reach, with the SLA to confirm a new version in,
    /// as `target:sla` (the sink is `<target>-sink`).
    #[arg(long = "targets", env = "ELO_RECONCILER_TARGETS", default_value = "salesforce:5m,rdstation:10m", value_parser = parse_targets)]
    pub targets: Targets,
    /// Settled records (every target confirmed, nothing open) leave the ledger after this long
    /// without news, which bounds its size; a later version starts a new entry.
    #[arg(long = "ledger-retention", env = "ELO_RECONCILER_LEDGER_RETENTION", default_value = "43200m", value_parser = elo_service::parse_duration)]
    pub retention: Duration,
    /// Compacted changelog of the stock facts (co-partitioned with `inventory.events`).
    #[arg(long = "stock-topic", env = "ELO_RECONCILER_STOCK_TOPIC", default_value = "reconciler.stock")]
    pub stock_topic: String,
    /// A salable quantity negative for longer than this is reported.
    #[arg(long = "negative-stock-grace", env = "ELO_RECONCILER_NEGATIVE_STOCK_GRACE", default_value = "60m", value_parser = elo_service::parse_duration)]
    pub negative_stock_grace: Duration,
    /// Repair commands per problem before it is escalated.
    #[arg(long = "repair-max-attempts", env = "ELO_RECONCILER_REPAIR_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Wait after the first repair command; doubles with each attempt.
    #[arg(long = "repair-backoff", env = "ELO_RECONCILER_REPAIR_BACKOFF", default_value = "2m", value_parser = elo_service::parse_duration)]
    pub backoff: Duration,
    /// Longest wait between two repair commands for one record.
    #[arg(long = "repair-max-backoff", env = "ELO_RECONCILER_REPAIR_MAX_BACKOFF", default_value = "30m", value_parser = elo_service::parse_duration)]
    pub max_backoff: Duration,
    /// How often the ledger is measured and repairs are sent.
    #[arg(long = "check-interval", env = "ELO_RECONCILER_CHECK_INTERVAL", default_value = "10s", value_parser = elo_service::parse_duration)]
    pub check_interval: Duration,
    /// Repair commands sent per check at most (an outage of a sink must not flood Magento
    /// with refetches when it ends).
    #[arg(long = "max-commands-per-check", env = "ELO_RECONCILER_MAX_COMMANDS_PER_CHECK", default_value_t = 200)]
    pub max_commands: usize,
}

/// The targets list.
#[derive(Clone, Debug)]
pub struct Targets(pub Vec<TargetSpec>);

/// Parses `salesforce:5m,rdstation:10m`.
pub fn parse_targets(text: &str) -> Result<Targets, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, sla) = item.split_once(':').ok_or_else(|| format!("expected target:sla, got {item:?}"))?;
        out.push(TargetSpec {
            name: name.to_owned(),
            sink: format!("{name}-sink"),
            sla: elo_service::parse_duration(sla)?,
        });
    }
    if out.is_empty() {
        return Err("at least one target".into());
    }
    Ok(Targets(out))
}

impl LedgerArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            targets: self.targets.0.clone(),
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            max_backoff: self.max_backoff.max(self.backoff),
        }
    }
}

/// The reconciler's consumer group unless `ELO_CONSUMER_GROUP` names another.
pub fn group(config: &Config) -> String {
    config.consumer.group.clone().unwrap_or_else(|| format!("elo-{NAME}"))
}

/// Runs an operator command and exits, or runs the service until SIGTERM/SIGINT: stop
/// intake, drain, commit, exit. The ledger publishes its figures to the reports and flow
/// listener through a watch channel.
pub async fn run(config: Config) -> anyhow::Result<()> {
    match config.command.clone() {
        Some(Command::Dlq(command)) => return dlq::cli::run(&config.common, &config.ops, command).await,
        Some(Command::Report(args)) => return report::cli::run(&config.common, &config.ops, args).await,
        None => {}
    }
    let (status_tx, status_rx) = status::channel();
    // The reports listener is for people: with --http-optional a taken port leaves the
    // ledger running (the gauge and the error say why the pages are missing); any other
    // start-up error is a misconfiguration and stops the service.
    let ops_task = match start_ops_listener(&config, &group(&config), status_rx).await {
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
    let result = run_with_status(config, status_tx).await;
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

/// [`run`], publishing the ledger's figures through `status_tx` (the HTTP side keeps a
/// receiver: reports, the flow diagram, `make run`'s status line).
pub async fn run_with_status(config: Config, status_tx: status::StatusSender) -> anyhow::Result<()> {
    metrics::register_all();
    let common = &config.common;
    let t = &common.topics;
    let dlq = config.consumer.dlq_topic.clone().unwrap_or_else(|| format!("{NAME}.dlq"));
    let specs = vec![
        t.spec(&t.commerce),
        t.spec(&t.outcomes),
        t.spec(&t.commands),
        t.spec(&t.inventory),
        t.spec(&dlq),
        StateStore::<()>::changelog_spec(&config.ledger.ledger_topic, t.partitions).with_replication(t.replication),
        StateStore::<()>::changelog_spec(&config.ledger.stock_topic, t.partitions).with_replication(t.replication),
    ];
    let sweeps = sweep::Sweeps::new(&config.sweeps, t.partitions)?;
    let Some(service) = Service::start(NAME, common, DEFAULT_ADMIN, specs).await? else {
        return Ok(());
    };
    let sweeps = sweeps.with_partitions(sweep::topic_partitions(&common.kafka, &t.commerce, t.partitions).await);
    let commands =
        KafkaCommands { codec: service.codec.clone(), producer: service.producer.clone(), topic: t.commands.clone() };
    let ledger = Arc::new(
        Ledger::new(
            StateStore::new(&common.kafka, service.producer.clone(), config.ledger.ledger_topic.clone()),
            service.codec.clone(),
            commands,
            config.ledger.policy(),
            t.commerce.clone(),
            config.ledger.retention,
            status_tx,
        )
        .with_stock(StockSide::new(
            StateStore::new(&common.kafka, service.producer.clone(), config.ledger.stock_topic.clone()),
            t.inventory.clone(),
            config.ledger.negative_stock_grace,
        ))
        .with_sweeps(sweeps.progress()),
    );
    let checker = tokio::spawn(check_loop(
        ledger.clone(),
        config.ledger.check_interval,
        config.ledger.max_commands,
        service.shutdown.clone(),
    ));
    let sweeper = tokio::spawn(sweeps.run(ledger.clone(), service.shutdown.clone()));
    let settings = config.consumer.settings(
        group(&config),
        vec![t.commerce.clone(), t.outcomes.clone(), t.inventory.clone()],
        dlq,
        500,
    );
    let result = elo_kafka::run_consumer(
        &common.kafka,
        settings,
        Arc::new(LedgerHandler(ledger)),
        service.producer.clone(),
        service.health.clone(),
        service.shutdown.clone(),
    )
    .await;
    service.shutdown.cancel();
    let _ = checker.await;
    let _ = sweeper.await;
    service.finish().await;
    result.map_err(Into::into)
}

/// Measures the ledger and sends repairs every `every` until shutdown.
async fn check_loop<C: store::CommandSink>(
    ledger: Arc<Ledger<C>>,
    every: Duration,
    max_commands: usize,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = ledger.check(max_commands) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn the_defaults_parse() {
        // Every default goes through its value parser (`2h` once did not).
        let config = <Config as clap::Parser>::try_parse_from(["reconciler"]).expect("defaults parse");
        assert_eq!(config.sweeps.magento_window, Duration::from_secs(7200));
        assert_eq!(config.ledger.retention, Duration::from_secs(30 * 86_400));
    }

    #[test]
    fn targets_parse_with_their_slas() {
        let t = parse_targets("salesforce:5m, rdstation:90s").unwrap().0;
        assert_eq!(
            t[0],
            TargetSpec { name: "salesforce".into(), sink: "salesforce-sink".into(), sla: Duration::from_secs(300) }
        );
        assert_eq!(t[1].sla, Duration::from_secs(90));
        assert!(parse_targets("salesforce").is_err());
        assert!(parse_targets("").is_err());
    }
}
