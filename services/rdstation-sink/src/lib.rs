//! rdstation-sink: step 4 of the workflow. Consumes `commerce.events` and keeps RD Station
//! Marketing in step: contacts (fields, LGPD legal bases, tags, lifecycle stage) from
//! per-customer aggregates and declarative segmentation rules, and the order lifecycle as
//! `ECOMMERCE_*` events, within RD's rate limits.
//!
//! # Layout
//! - [`client`]: the RD API client (OAuth refresh, per-account contact budget, error classes).
//! - [`aggregates`]: per-customer state and aggregates, kept in the state store.
//! - [`rules`]: the segmentation rules file (validation with line numbers, evaluation).
//! - [`contacts`]: the contact a customer should have, and the coalesced writes to get there.
//! - [`events`]: the `ECOMMERCE_*` events of an order, mapped by a configuration file.
//! - [`handler`]: the consumer handler tying them together, with the sent-log.
//! - [`dry_run`]: `rdstation-sink rules dry-run`; [`backtest`]: `rdstation-sink rules backtest`.
//! - [`metrics`]: every metric the service exports.

pub mod aggregates;
pub mod backtest;
pub mod budget;
pub mod client;
pub mod contacts;
pub mod dry_run;
pub mod events;
pub mod handler;
mod metrics;
pub mod rules;
pub mod tag_posts;

use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use elo_kafka::StateStore;
use elo_service::{CommonArgs, ConsumerArgs, Service};

use crate::client::{RdClient, RdSettings};
use crate::events::EventMapping;
use crate::handler::{ContactBudget, Sink, SinkHandler, WithCommands};
use crate::rules::Rules;

/// Service name, used in logs, metrics, the default group and the DLQ topic.
pub const NAME: &str = "rdstation-sink";

/// Default admin address (/metrics, /health/livez, /health/readyz).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9103);

/// rdstation-sink settings.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "rdstation-sink",
    version,
    about = "Keeps RD Station Marketing contacts, segments and e-commerce events in step with commerce.events."
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    #[command(flatten)]
    pub rd: RdArgs,
}

/// RD Station and rdstation-sink settings.
#[derive(Clone, Debug, clap::Args)]
pub struct RdArgs {
    /// RD Station Marketing API base URL.
    #[arg(long = "rd-url", env = "ELO_RDSTATION_URL", default_value = "http://127.0.0.1:8703")]
    pub rd_url: String,
    /// OAuth client id of the RD Station app.
    #[arg(long = "rd-client-id", env = "ELO_RDSTATION_CLIENT_ID", default_value = "elo-rd-client")]
    pub client_id: String,
    /// File holding the OAuth client secret.
    #[arg(long = "rd-client-secret-file", env = "ELO_RDSTATION_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,
    /// File holding the OAuth refresh token (RD Marketing refresh tokens do not expire).
    #[arg(long = "rd-refresh-token-file", env = "ELO_RDSTATION_REFRESH_TOKEN_FILE")]
    pub refresh_token_file: Option<PathBuf>,
    /// Local development: the sandbox control API that issues authorization codes when no
    /// refresh token file is given (loopback RD URLs only).
    #[arg(long = "rd-sandbox-control", env = "ELO_RDSTATION_SANDBOX_CONTROL", default_value = "http://127.0.0.1:8700")]
    pub sandbox_control: String,
    /// Contact requests per minute the sink allows itself (RD: 120 per account, 500 on
    /// Advanced). The default keeps 5% headroom for clock and latency jitter.
    #[arg(long = "rd-contacts-per-minute", env = "ELO_RDSTATION_CONTACTS_PER_MINUTE", default_value_t = NonZeroU32::new(114).expect("non-zero"))]
    pub contacts_per_minute: NonZeroU32,
    /// At start-up, contact requests wait this long, as if the account's budget were spent:
    /// a previous process (crashed, killed, replaced by a rollout) may have spent it in its
    /// last minute, which this one cannot see. E-commerce events are not held. `0s` for an
    /// account nothing else used in the last minute (tests).
    #[arg(long = "rd-start-hold", env = "ELO_RDSTATION_START_HOLD", default_value = "60s", value_parser = elo_service::parse_duration)]
    pub start_hold: Duration,
    /// RD request timeout, e.g. `30s`.
    #[arg(long = "rd-timeout", env = "ELO_RDSTATION_TIMEOUT", default_value = "30s", value_parser = elo_service::parse_duration)]
    pub rd_timeout: Duration,
    /// Segmentation rules file (TOML); without it contacts get no tags, stage or rule fields.
    #[arg(long = "rules-file", env = "ELO_RDSTATION_RULES_FILE")]
    pub rules_file: Option<PathBuf>,
    /// How often the rules file is checked for changes (`0s`: never reloaded).
    #[arg(long = "rules-reload-interval", env = "ELO_RDSTATION_RULES_RELOAD_INTERVAL", default_value = "10s", value_parser = elo_service::parse_duration)]
    pub rules_reload_interval: Duration,
    /// Contact writes allowed per contact in `--contact-update-window` (RD: 24 PATCH per
    /// contact per 24 h); updates beyond it are coalesced and land when the window has room.
    #[arg(long = "contact-updates", env = "ELO_RDSTATION_CONTACT_UPDATES", default_value_t = 24)]
    pub contact_updates: usize,
    /// The per-contact budget's sliding window.
    #[arg(long = "contact-update-window", env = "ELO_RDSTATION_CONTACT_UPDATE_WINDOW", default_value = "86400s", value_parser = elo_service::parse_duration)]
    pub contact_update_window: Duration,
    /// Tag posts (`POST …/tag`) the account allows per day (RD: 15,000). Each partition of the
    /// input topic spends an equal share; past it, tags go through a read and a PATCH.
    #[arg(long = "tag-posts-per-day", env = "ELO_RDSTATION_TAG_POSTS_PER_DAY", default_value_t = handler::RD_TAG_POSTS_PER_DAY)]
    pub tag_posts_per_day: u32,
    /// Customers of one batch worked at the same time (each customer's events stay in order).
    /// Times ELO_MAX_IN_FLIGHT (batches at once): the most events a crash can make RD receive
    /// twice. 32 × 4 keeps 200 orders/s flowing against 100 ms of RD latency plus the sent-log
    /// writes.
    #[arg(long = "customer-concurrency", env = "ELO_RDSTATION_CUSTOMER_CONCURRENCY", default_value_t = 32)]
    pub customer_concurrency: usize,
    /// E-commerce event mapping file (TOML) [default: the embedded `config/events.toml`].
    #[arg(long = "events-file", env = "ELO_RDSTATION_EVENTS_FILE")]
    pub events_file: Option<PathBuf>,
    /// Create the custom fields the mapping and rules need when the account lacks them.
    #[arg(long = "create-fields", env = "ELO_RDSTATION_CREATE_FIELDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_fields: bool,
    /// Compacted changelog of the per-customer state (aggregates, contact mapping).
    #[arg(long = "state-topic", env = "ELO_RDSTATION_STATE_TOPIC", default_value = "rdstation-sink.customers")]
    pub state_topic: String,
    /// How long the sent-log remembers the events of an order, from the order's creation.
    /// Orders older than this get no RD event at all (neither a replay of older history nor a
    /// late change of an old order can repeat one whose entry is gone).
    #[arg(long = "sent-log-retention", env = "ELO_RDSTATION_SENT_LOG_RETENTION", default_value = "90d", value_parser = elo_service::parse_duration)]
    pub sent_log_retention: Duration,
    /// Compacted changelog of the events RD acknowledged (the sent-log).
    #[arg(long = "sent-log-topic", env = "ELO_RDSTATION_SENT_LOG_TOPIC", default_value = "rdstation-sink.sent-events")]
    pub sent_log_topic: String,
}

impl RdArgs {
    /// Client settings, reading the secret files. Against a loopback URL (the local sandbox)
    /// the files may be left out: the sandbox's client secret is used and an authorization
    /// code is fetched from its control API, so `make run` needs no setup.
    pub fn settings(&self) -> anyhow::Result<RdSettings> {
        let local = self.rd_url.starts_with("http://127.0.0.1") || self.rd_url.starts_with("http://localhost");
        let client_secret = match &self.client_secret_file {
            Some(path) => RdSettings::read_secret(path)?,
            None if local => "elo-rd-secret".to_owned(),
            None => anyhow::bail!("the RD Station client secret file is required (ELO_RDSTATION_CLIENT_SECRET_FILE)"),
        };
        let (refresh_token, sandbox_control) = match &self.refresh_token_file {
            Some(path) => (Some(RdSettings::read_secret(path)?), None),
            None if local => {
                tracing::warn!(control = %self.sandbox_control, "no refresh token file: authorizing through the local sandbox");
                (None, Some(self.sandbox_control.clone()))
            }
            None => anyhow::bail!("the RD Station refresh token file is required (ELO_RDSTATION_REFRESH_TOKEN_FILE)"),
        };
        Ok(RdSettings {
            base_url: self.rd_url.clone(),
            client_id: self.client_id.clone(),
            client_secret,
            refresh_token,
            sandbox_control,
            contacts_per_minute: self.contacts_per_minute,
            request_timeout: self.rd_timeout,
        })
    }

    pub fn rules(&self) -> anyhow::Result<Rules> {
        Ok(match &self.rules_file {
            Some(path) => Rules::load(path)?,
            None => Rules::default(),
        })
    }

    pub fn mapping(&self) -> anyhow::Result<EventMapping> {
        Ok(match &self.events_file {
            Some(path) => EventMapping::load(path)?,
            None => EventMapping::default_mapping(),
        })
    }
}

/// One-off jobs (the service runs without a subcommand).
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Segmentation rules tools.
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum RulesCommand {
    /// Validate the rules file (errors name the line) and exit.
    Validate,
    /// Show which contacts the rules file would change and how, from the state in Kafka;
    /// nothing is written.
    DryRun,
    /// Replay the order history in commerce.events through the rules file and report each
    /// rule's segment size week by week.
    Backtest(backtest::BacktestArgs),
}

/// Runs the service until SIGTERM/SIGINT, or a subcommand.
pub async fn run(config: Config) -> anyhow::Result<()> {
    match &config.command {
        Some(Command::Rules(RulesCommand::Validate)) => {
            let rules = config.rd.rules()?;
            println!("{} rules ok", rules.rules.len());
            return Ok(());
        }
        Some(Command::Rules(RulesCommand::DryRun)) => return dry_run::run(&config).await,
        Some(Command::Rules(RulesCommand::Backtest(args))) => return backtest::run(&config, args).await,
        None => {}
    }
    metrics::register_all();
    // Refuse bad local configuration before touching the broker.
    let rules = config.rd.rules()?;
    let mapping = config.rd.mapping()?;
    // One request in flight per customer worked at once, plus the sweep's and the rules'.
    let in_flight = config.rd.customer_concurrency.max(1) * config.consumer.max_in_flight.max(1) + 4;
    let client = RdClient::with_concurrency(config.rd.settings()?, in_flight)?;
    let common = &config.common;
    let t = &common.topics;
    let dlq = config.consumer.dlq_topic.clone().unwrap_or_else(|| format!("{NAME}.dlq"));
    let specs = vec![
        t.spec(&t.commerce),
        t.spec(&t.outcomes),
        t.spec(&t.commands),
        t.spec(&dlq),
        StateStore::<()>::changelog_spec(&config.rd.state_topic, t.partitions).with_replication(t.replication),
        StateStore::<()>::changelog_spec(&config.rd.sent_log_topic, t.partitions).with_replication(t.replication),
    ];
    let Some(service) = Service::start(NAME, common, DEFAULT_ADMIN, specs).await? else {
        return Ok(());
    };
    let customers = Arc::new(StateStore::new(&common.kafka, service.producer.clone(), config.rd.state_topic.clone()));
    let sent = Arc::new(StateStore::new(&common.kafka, service.producer.clone(), config.rd.sent_log_topic.clone()));
    let rules = Arc::new(RwLock::new(Arc::new(rules)));
    let sink = Arc::new(Sink::new(
        client.clone(),
        service.codec.clone(),
        service.producer.clone(),
        customers,
        sent,
        rules.clone(),
        mapping,
        t.outcomes.clone(),
        ContactBudget { per_contact: config.rd.contact_updates.max(1), window: config.rd.contact_update_window },
        config.rd.customer_concurrency.max(1),
        config.rd.create_fields,
    ));
    sink.set_sent_log_retention(config.rd.sent_log_retention);
    // The tag-post shares follow the input topic's real partition count (it may differ from
    // the count the service would create it with, and partitions may be added later: read
    // again every five minutes). Not knowing it, no share: tags go by PATCH meanwhile.
    refresh_tag_post_shares(&sink, &service.producer, &t.commerce, config.rd.tag_posts_per_day).await;
    // The custom fields are checked before the start-up hold: batches need them for every
    // record, e-commerce events included, which must not wait out the hold (a failed check
    // is retried by the batches, which then do wait). A couple of requests, sent at once.
    if let Err(error) = sink.ensure_fields().await {
        tracing::warn!(error = %error, "custom fields not checked at start-up; batches will retry");
    }
    client.hold_budget(config.rd.start_hold);
    let reload_every = config.rd.rules_reload_interval;
    let pruning = tokio::spawn(prune_sent_log(sink.clone(), config.rd.sent_log_retention, service.shutdown.clone()));
    let shares = tokio::spawn(follow_tag_post_shares(
        sink.clone(),
        (service.producer.clone(), t.commerce.clone(), config.rd.tag_posts_per_day),
        service.shutdown.clone(),
    ));
    let maintenance = tokio::spawn(maintain(
        config.rd.rules_file.clone().filter(|_| !reload_every.is_zero()),
        if reload_every.is_zero() { Duration::from_secs(10) } else { reload_every },
        sink.clone(),
        config.rd.create_fields,
        service.shutdown.clone(),
    ));
    // RESEND commands ride the same group: `integration.commands` is co-partitioned with
    // `commerce.events`, so a command meets the customer's state on this replica.
    let topics = vec![t.commerce.clone(), t.commands.clone()];
    let settings = config.consumer.settings(format!("elo-{NAME}"), topics, dlq, 50);
    let result = elo_kafka::run_consumer(
        &common.kafka,
        settings,
        Arc::new(WithCommands { inner: SinkHandler(sink.clone()), commands_topic: t.commands.clone() }),
        service.producer.clone(),
        service.health.clone(),
        service.shutdown.clone(),
    )
    .await;
    service.shutdown.cancel();
    let _ = maintenance.await;
    let _ = pruning.await;
    let _ = shares.await;
    service.finish().await;
    result.map_err(Into::into)
}

/// Reads the input topic's partition count and sets each partition's tag-post share from it;
/// when it cannot be read the share stays as it was (0, tags by PATCH, before the first read).
async fn refresh_tag_post_shares(sink: &Sink, producer: &elo_kafka::Producer, topic: &str, per_day: u32) {
    let partitions = {
        let (producer, topic) = (producer.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || producer.partition_count(&topic, Duration::from_secs(10))).await
    };
    match partitions {
        Ok(Ok(Some(n))) => sink.set_tag_posts_per_day(per_day, n),
        other => {
            let reason = match other {
                Ok(Ok(_)) => "the topic is not listed".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            // The last share read stays (none before the first read: tags by PATCH until then).
            tracing::warn!(
                topic,
                reason,
                "cannot read the input topic's partition count; the tag-post share stays as it was"
            );
        }
    }
}

/// How often the input topic's partition count is read again for the tag-post shares: partitions
/// added to it make every partition's share smaller, and until the count is read the old
/// partitions spend their old shares beside the new ones' (over RD's daily limit, for as long
/// as this interval at most).
const TAG_POST_SHARE_REFRESH: Duration = Duration::from_secs(300);

/// Re-reads the tag-post shares every [`TAG_POST_SHARE_REFRESH`].
async fn follow_tag_post_shares(
    sink: Arc<Sink>,
    (producer, topic, tag_posts_per_day): (elo_kafka::Producer, String, u32),
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TAG_POST_SHARE_REFRESH) => {}
            _ = shutdown.cancelled() => return,
        }
        refresh_tag_post_shares(&sink, &producer, &topic, tag_posts_per_day).await;
    }
}

/// Prunes the sent-log of orders past the retention, every quarter of it (at most hourly).
async fn prune_sent_log(sink: Arc<Sink>, retention: Duration, shutdown: tokio_util::sync::CancellationToken) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3_600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let pruned = tokio::select! {
            n = sink.prune_sent_log() => n,
            _ = shutdown.cancelled() => return,
        };
        if pruned > 0 {
            tracing::info!(pruned, "sent-log entries past the retention dropped");
        }
    }
}

/// Every tick: reloads the rules file when it changed (an invalid file is logged and the rules
/// in use stay) and applies new rules to every contact of the assigned partitions, once (a
/// contact that failed transiently is deferred, one RD refused is recorded); otherwise lands the
/// contact updates that are due (budgets with room, backoff over).
async fn maintain(
    rules_file: Option<PathBuf>,
    every: Duration,
    sink: Arc<Sink>,
    create_fields: bool,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = rules_file.as_ref().and_then(modified);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Some(path) = &rules_file
            && modified(path) != seen
        {
            let now = modified(path);
            match Rules::load(path) {
                Ok(new) => {
                    match contacts::ensure_fields(&sink.client, &contacts::needed_fields(&new), create_fields).await {
                        Ok(missing) if missing.is_empty() => {
                            let count = new.rules.len();
                            *sink.rules.write().expect("rules lock") = Arc::new(new);
                            tracing::info!(rules = count, "segmentation rules reloaded");
                            sink.rules_changed();
                            seen = now;
                        }
                        Ok(missing) => {
                            tracing::error!(fields = ?missing, "new rules need custom fields rd station lacks; keeping the rules in use");
                            seen = now;
                        }
                        // Not marked seen: tried again on the next tick.
                        Err(error) => {
                            tracing::warn!(error = %error, "cannot check custom fields for the new rules; will retry")
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(error = %error, "invalid rules file; keeping the rules in use");
                    seen = now;
                }
            }
        }
        let sweep = async {
            if sink.rules_pending() { (true, sink.apply_rules().await) } else { (false, sink.flush_deferred().await) }
        };
        let (full, (changed, failed)) = tokio::select! {
            r = sweep => r,
            _ = shutdown.cancelled() => return,
        };
        if full {
            // One pass: contacts that failed transiently are deferred now (retried by the
            // deferred-writes pass with backoff), those RD refused are recorded; neither may
            // keep the rules pass, and with it the deferred writes, from ending.
            tracing::info!(changed, failed, "rules applied to the assigned contacts");
        } else if changed + failed > 0 {
            tracing::info!(changed, failed, "deferred contact updates landed");
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Config::command().debug_assert();
    }
}
