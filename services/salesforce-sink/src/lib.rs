//! salesforce-sink: applies commerce events to Salesforce (Account/Contact or Person Account,
//! Order and OrderItems, Product2/PricebookEntry by SKU), batched into Composite Graph calls,
//! never stale, and reports every record on `integration.outcomes`.
//!
//! # Layout
//! - [`client`]: OAuth (client credentials, JWT bearer), REST calls, `Sforce-Limit-Info`;
//!   why not the `force` crate is written there.
//! - [`mapping`]: the mapping file, its defaults and the startup check against describe.
//! - [`graph`]: Composite Graph requests from a batch (≤ 500 nodes, ≤ 75 graphs).
//! - [`handler`]: the batch: staleness, products (`handler/products.rs`), Composite Graph
//!   calls (`handler/composite.rs`), Bulk API 2.0 for backlogs (`handler/bulk.rs`, its CSV
//!   spool, upload and results in `handler/bulk_csv.rs`), errors by
//!   class, erasure (`handler/erasure.rs`), a second key for one person (`handler/alias.rs`), and
//!   the confirmed versions and ids in a `StateStore` (`handler/state.rs`).
//! - [`quota`]: the reserve left to other integrations and the hours-left forecast.
//! - [`setup`]: startup: the mapping checked against the org, price books found or created.
//! - [`outcomes`]: `SyncOutcome` records; [`metrics`].

pub mod client;
pub mod graph;
pub mod handler;
pub mod mapping;
pub mod metrics;
pub mod outcomes;
pub mod quota;
pub mod resend;
pub mod setup;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use elo_kafka::{ErrorClass, HandlerError, Record, StateStore};
use elo_service::{CommonArgs, ConsumerArgs, Service, parse_duration};

/// Service name, used in logs, metrics, the default group and the DLQ topic.
pub const NAME: &str = "salesforce-sink";

/// Default admin address (/metrics, /health/livez, /health/readyz).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9102);

/// Records per batch unless ELO_MAX_BATCH says otherwise.
pub const DEFAULT_MAX_BATCH: usize = 5000;

/// OAuth flow names for `--salesforce-auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthKind {
    ClientCredentials,
    Jwt,
}

/// Salesforce settings.
#[derive(Clone, Debug, clap::Args)]
pub struct SalesforceArgs {
    /// Token endpoint host: a My Domain URL, https://login.salesforce.com, or the sandbox
    /// [default: the local sandbox, http://$ELO_SANDBOX_SALESFORCE_LISTEN or http://127.0.0.1:8702].
    #[arg(long = "salesforce-login-url", env = "ELO_SALESFORCE_LOGIN_URL")]
    pub login_url: Option<String>,
    /// REST API version.
    #[arg(long = "salesforce-api-version", env = "ELO_SALESFORCE_API_VERSION", default_value = "v66.0")]
    pub api_version: String,
    /// OAuth flow: client-credentials or jwt (JWT bearer).
    #[arg(long = "salesforce-auth", env = "ELO_SALESFORCE_AUTH", value_enum, default_value = "client-credentials")]
    pub auth: AuthKind,
    /// Connected app's consumer key.
    #[arg(long = "salesforce-client-id", env = "ELO_SALESFORCE_CLIENT_ID", default_value = "elo-sandbox-client")]
    pub client_id: String,
    /// File holding the consumer secret (client credentials) [default: the sandbox's secret].
    #[arg(long = "salesforce-client-secret-file", env = "ELO_SALESFORCE_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,
    /// File holding the PEM private key that signs JWT assertions (jwt flow).
    #[arg(long = "salesforce-jwt-key-file", env = "ELO_SALESFORCE_JWT_KEY_FILE")]
    pub jwt_key_file: Option<PathBuf>,
    /// Username the JWT assertion names (jwt flow).
    #[arg(long = "salesforce-username", env = "ELO_SALESFORCE_USERNAME", default_value = "")]
    pub username: String,
    /// `aud` of the JWT assertion: the login host (https://test.salesforce.com for sandboxes).
    #[arg(
        long = "salesforce-jwt-audience",
        env = "ELO_SALESFORCE_JWT_AUDIENCE",
        default_value = "https://login.salesforce.com"
    )]
    pub jwt_audience: String,
    /// Mapping file (JSON) [default: built-in mapping, see the README].
    #[arg(long = "salesforce-mapping-file", env = "ELO_SALESFORCE_MAPPING_FILE")]
    pub mapping_file: Option<PathBuf>,
    /// Request timeout.
    #[arg(long = "salesforce-timeout", env = "ELO_SALESFORCE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Concurrent Salesforce requests.
    #[arg(long = "salesforce-max-concurrent", env = "ELO_SALESFORCE_MAX_CONCURRENT", default_value_t = 4)]
    pub max_concurrent: usize,
    /// Wait after 403 REQUEST_LIMIT_EXCEEDED before trying again (Salesforce sends no Retry-After).
    #[arg(long = "salesforce-quota-pause", env = "ELO_SALESFORCE_QUOTA_PAUSE", default_value = "60s", value_parser = parse_duration)]
    pub quota_pause: Duration,
    /// Percent of the org's daily API quota left to other integrations: the sink pauses there.
    #[arg(
        long = "salesforce-quota-reserve-percent",
        env = "ELO_SALESFORCE_QUOTA_RESERVE_PERCENT",
        default_value_t = 10
    )]
    pub quota_reserve_percent: u64,
    /// Warn when the forecast leaves fewer hours of quota than this.
    #[arg(long = "salesforce-quota-warn-hours", env = "ELO_SALESFORCE_QUOTA_WARN_HOURS", default_value_t = 4.0)]
    pub quota_warn_hours: f64,
    /// Batches of at least this many records go through Bulk API 2.0 jobs instead of Composite
    /// Graph (0: never). A batch only fills that far when that many records wait on the
    /// partition (a backfill, a backlog after an outage); see ELO_MAX_BATCH.
    #[arg(long = "salesforce-bulk-min-records", env = "ELO_SALESFORCE_BULK_MIN_RECORDS", default_value_t = 2000)]
    pub bulk_min_records: usize,
    /// Wait between looks at a running Bulk API 2.0 job.
    #[arg(long = "salesforce-bulk-poll", env = "ELO_SALESFORCE_BULK_POLL", default_value = "1s", value_parser = parse_duration)]
    pub bulk_poll: Duration,
    /// A Bulk API 2.0 job not finished by then is aborted and its records retried.
    #[arg(long = "salesforce-bulk-timeout", env = "ELO_SALESFORCE_BULK_TIMEOUT", default_value = "600s", value_parser = parse_duration)]
    pub bulk_timeout: Duration,
    /// Bytes the Bulk API 2.0 jobs' row spools may take on disk at once, all partitions
    /// together (below the pod's 64 MiB `/tmp`): a batch whose rows would pass it runs as
    /// several Bulk batches in turn.
    #[arg(long = "salesforce-bulk-spool-bytes", env = "ELO_SALESFORCE_BULK_SPOOL_BYTES", default_value_t = 48 << 20)]
    pub bulk_spool_bytes: usize,
    /// Directory of the Bulk API 2.0 row spools (default: the system's temporary directory).
    #[arg(long = "salesforce-bulk-spool-dir", env = "ELO_SALESFORCE_BULK_SPOOL_DIR")]
    pub bulk_spool_dir: Option<std::path::PathBuf>,
    /// Longest a Composite Graph write waits for the other busy partitions' writes to share
    /// its request (it leaves as soon as they have all boarded, or at 500 nodes; after a quiet
    /// spell at once). 0 sends every batch's requests at once.
    #[arg(long = "salesforce-graph-linger", env = "ELO_SALESFORCE_GRAPH_LINGER", default_value = "200ms", value_parser = parse_duration)]
    pub graph_linger: Duration,
    /// How long a busy partition (its previous batch taken within the last second) waits to
    /// fill its next batch: the records arriving meanwhile share its request, so this sets
    /// the calls per order of a busy stream; it counts against the freshness budget. A record
    /// after a quiet spell does not wait.
    #[arg(long = "salesforce-busy-linger", env = "ELO_SALESFORCE_BUSY_LINGER", default_value = "300ms", value_parser = parse_duration)]
    pub busy_linger: Duration,
    /// Encoded bytes of records decoded and written at once across partitions: a batch is
    /// applied in chunks of a quarter of this (a Bulk API 2.0 batch too). Bounds
    /// memory under a backlog whatever ELO_MAX_BATCH says.
    #[arg(long = "salesforce-inflight-bytes", env = "ELO_SALESFORCE_INFLIGHT_BYTES", default_value_t = 256 << 10)]
    pub inflight_bytes: usize,
    /// A repeat buyer's unchanged Account/Contact is left out of its orders' graphs only
    /// within this long after the customer's last full write; past it the next order writes
    /// them again, repairing a Contact or Account changed behind Elo's back. 0: never left out.
    #[arg(
        long = "salesforce-customer-rewrite-after",
        env = "ELO_SALESFORCE_CUSTOMER_REWRITE_AFTER",
        default_value = "1h",
        value_parser = parse_duration
    )]
    pub customer_rewrite_after: Duration,
    /// Compacted changelog of the confirmed versions and Salesforce ids per order and customer.
    #[arg(
        long = "salesforce-state-topic",
        env = "ELO_SALESFORCE_STATE_TOPIC",
        default_value = "salesforce-sink.confirmed"
    )]
    pub state_topic: String,
}

/// salesforce-sink settings.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "salesforce-sink",
    version,
    about = "Applies commerce events to Salesforce (Account/Contact, Order and items, upserted by external id)."
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    #[command(flatten)]
    pub salesforce: SalesforceArgs,
}

fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    Ok(text.trim().to_owned())
}

/// Builds the Salesforce client from the settings (secrets read from files).
pub fn build_client(args: &SalesforceArgs) -> anyhow::Result<client::SalesforceClient> {
    // Locally the sandbox's own setting says where it listens (`make run` moves it).
    let login_url = args.login_url.clone().unwrap_or_else(|| {
        let listen = std::env::var("ELO_SANDBOX_SALESFORCE_LISTEN").unwrap_or_else(|_| "127.0.0.1:8702".into());
        format!("http://{listen}")
    });
    let auth = match args.auth {
        AuthKind::ClientCredentials => {
            let client_secret = match &args.client_secret_file {
                Some(path) => read_secret(path)?,
                None => {
                    tracing::warn!("no ELO_SALESFORCE_CLIENT_SECRET_FILE: using the sandbox's default secret");
                    "elo-sandbox-secret".to_owned()
                }
            };
            client::AuthFlow::ClientCredentials { client_id: args.client_id.clone(), client_secret }
        }
        AuthKind::Jwt => {
            let path = args
                .jwt_key_file
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("jwt flow needs ELO_SALESFORCE_JWT_KEY_FILE"))?;
            client::AuthFlow::JwtBearer {
                client_id: args.client_id.clone(),
                username: args.username.clone(),
                private_key_pem: std::fs::read_to_string(path)?,
                audience: args.jwt_audience.clone(),
            }
        }
    };
    Ok(client::SalesforceClient::new(client::ClientConfig {
        login_url,
        api_version: args.api_version.clone(),
        auth,
        request_timeout: args.timeout,
        max_concurrent: args.max_concurrent,
        quota_reserve_percent: args.quota_reserve_percent,
        quota_warn_hours: args.quota_warn_hours,
        quota_probe_every: args.quota_pause,
    })?)
}

/// The consumer handler: decodes, applies through the [`handler::Sink`] once startup has
/// checked the org, publishes outcomes.
pub struct SinkHandler {
    codec: Arc<elo_events::EventCodec>,
    sink: Arc<OnceLock<handler::Sink>>,
    /// The sink's confirmations (shared with it): restored before a partition's first batch.
    state: Arc<StateStore<handler::Confirmed>>,
    outcomes: outcomes::Outcomes,
    /// `integration.commands` (RESEND, see [`resend`]) and the producer that forwards refetches.
    commands: (String, elo_kafka::Producer),
    /// Handler calls per record so far (for outcomes), dropped when the record finishes.
    attempts: Mutex<std::collections::HashMap<(i32, i64), i32>>,
    /// Bytes of records in flight across partitions.
    budget: MemoryBudget,
}

impl elo_kafka::Handler for SinkHandler {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        let Some(sink) = self.sink.get() else {
            // Startup has not reached Salesforce yet: wait, never park.
            let wait = HandlerError::new(ErrorClass::RateLimited, "salesforce_not_ready", "startup checks pending")
                .with_retry_after(Duration::from_secs(2));
            return batch.iter().map(|_| Err(wait.clone())).collect();
        };
        if batch.first().is_some_and(|r| r.topic == self.commands.0) {
            let (topic, producer) = &self.commands;
            let mut results = Vec::with_capacity(batch.len());
            for record in batch {
                results.push(resend::execute(sink, &self.codec, producer, topic, record).await.map(|_| ()));
            }
            return results;
        }
        // Records are decoded and written a chunk at a time under a process-wide byte budget,
        // so memory follows the budget, not the batch: a backlog batch (the runtime's
        // ELO_MAX_BATCH) is only the signal for Bulk API 2.0, which reads it in chunks too.
        if sink.bulk_sized(batch.len()) {
            return self.handle_bulk(sink, batch).await;
        }
        let mut results = Vec::with_capacity(batch.len());
        let mut rest = batch;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(chunk_len(rest, self.budget.chunk_bytes));
            rest = tail;
            let bytes: usize = chunk.iter().map(Record::size_bytes).sum();
            let _permit = self.budget.acquire(bytes).await;
            let started = Instant::now();
            let events = self.decode(chunk).await;
            let partition = chunk.first().map_or(0, |r| r.partition);
            let verdicts = sink.apply_partition(partition, &events).await;
            results.extend(self.report(chunk, &events, verdicts, started).await);
        }
        results
    }

    async fn on_partition_start(&self, _topic: &str, partition: i32) -> Result<(), HandlerError> {
        let keys = self
            .state
            .restore_async(partition)
            .await
            .map_err(|e| HandlerError::transient("state_restore", e.to_string()))?;
        tracing::debug!(partition, keys, "confirmed versions restored");
        Ok(())
    }

    fn on_revoked(&self, _topic: &str, partition: i32) {
        self.attempts.lock().expect("attempts lock").retain(|(p, _), _| *p != partition);
        self.state.release(partition);
    }
}

impl SinkHandler {
    /// A Bulk API 2.0 batch, read a chunk at a time under the byte budget three times (the
    /// newest versions, the rows spooled for the jobs, then confirmations and outcomes after
    /// the jobs), so it is never held decoded; the jobs run holding no budget. The loop is
    /// the sink's own (`Sink::apply_bulk`, also what the tests drive): it never waits for
    /// spool room while holding budget.
    async fn handle_bulk(&self, sink: &handler::Sink, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        let partition = batch.first().map_or(0, |r| r.partition);
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < batch.len() {
            let end = at + chunk_len(&batch[at..], self.budget.chunk_bytes);
            chunks.push(at..end);
            at = end;
        }
        let mut reader = BulkReader { handler: self, batch, started: Instant::now(), results: Vec::new() };
        sink.apply_bulk(partition, batch.len(), &chunks, &mut reader).await;
        reader.results
    }

    async fn decode(&self, records: &[Record]) -> Vec<Result<elo_events::CommerceEvent, HandlerError>> {
        let mut events = Vec::with_capacity(records.len());
        for record in records {
            let event = elo_service::decode_record::<elo_events::CommerceEvent>(&self.codec, record).await;
            events.push(event);
        }
        events
    }

    /// Counts the attempts, publishes the outcomes of a chunk; its records' results.
    async fn report(
        &self,
        batch: &[Record],
        events: &[Result<elo_events::CommerceEvent, HandlerError>],
        verdicts: Vec<handler::Verdict>,
        started: Instant,
    ) -> Vec<Result<(), HandlerError>> {
        for (record, event) in batch.iter().zip(events) {
            if let Ok(e) = event {
                metrics::DECODED.with_label_values(&[NAME, &record.topic, e.event_type.as_str()]).inc();
            }
        }
        let attempts: Vec<i32> = {
            let mut map = self.attempts.lock().expect("attempts lock");
            batch
                .iter()
                .zip(&verdicts)
                .map(|(r, v)| {
                    let n = map.entry((r.partition, r.offset)).or_insert(0);
                    *n += 1;
                    let n = *n;
                    if v.outcome.is_some() {
                        map.remove(&(r.partition, r.offset));
                    }
                    n
                })
                .collect()
        };
        let published = self.outcomes.publish(events, &verdicts, &attempts, started).await;
        verdicts
            .into_iter()
            .zip(published)
            .map(|(v, ok)| match (v.result, ok) {
                (Ok(()), Err(e)) => Err(e),
                (result, _) => result,
            })
            .collect()
    }
}

/// A Bulk batch's chunks read from its records under the in-flight budget, their verdicts
/// reported as they come.
struct BulkReader<'a> {
    handler: &'a SinkHandler,
    batch: &'a [Record],
    started: Instant,
    results: Vec<Result<(), HandlerError>>,
}

impl<'a> handler::BulkChunks for BulkReader<'a> {
    type Held = tokio::sync::SemaphorePermit<'a>;

    async fn read(&self, range: std::ops::Range<usize>) -> (Self::Held, handler::Events) {
        let chunk = &self.batch[range];
        let permit = self.handler.budget.acquire(chunk.iter().map(Record::size_bytes).sum()).await;
        (permit, self.handler.decode(chunk).await)
    }

    async fn done(&mut self, range: std::ops::Range<usize>, events: &handler::Events, verdicts: Vec<handler::Verdict>) {
        let chunk = &self.batch[range];
        let results = self.handler.report(chunk, events, verdicts, self.started).await;
        self.results.extend(results);
    }
}

/// Records from the front of `records` that fit `bytes` (at least one).
fn chunk_len(records: &[Record], bytes: usize) -> usize {
    let mut total = 0;
    records
        .iter()
        .position(|r| {
            total += r.size_bytes();
            total > bytes
        })
        .unwrap_or(records.len())
        .max(1)
}

/// The process-wide budget of encoded record bytes being decoded and written at once.
pub struct MemoryBudget {
    permits: tokio::sync::Semaphore,
    /// Budget in KiB (a semaphore permit each).
    total_kib: u32,
    /// Largest chunk of a partition's batch handled at once: a quarter of the budget, so
    /// several partitions' chunks are in flight together (and share Composite Graph calls).
    pub chunk_bytes: usize,
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> Self {
        let total_kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX >> 4);
        let permits = tokio::sync::Semaphore::new(total_kib as usize);
        Self { permits, total_kib, chunk_bytes: (bytes / 4).max(1) }
    }

    /// Waits until `bytes` fit the budget (more than the whole budget waits for all of it).
    pub async fn acquire(&self, bytes: usize) -> tokio::sync::SemaphorePermit<'_> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, self.total_kib);
        self.permits.acquire_many(kib).await.expect("the budget is never closed")
    }
}

/// The sink's librdkafka defaults (an operator's `ELO_RDKAFKA_*` or `--kafka-option` wins):
/// a short fetch wait, so a record reaches the graph pool soon after it is produced (the
/// freshness budget), and a smaller prefetch queue (4 MiB instead of the runtime's 16): the
/// partition buffers already hold a Bulk-sized batch, more prefetch is only memory.
fn consumer_kafka(kafka: &elo_kafka::KafkaArgs) -> anyhow::Result<elo_kafka::KafkaArgs> {
    let mut kafka = kafka.clone();
    let set = kafka.properties()?;
    for (key, value) in [("fetch.wait.max.ms", "100"), ("queued.max.messages.kbytes", "4096")] {
        if !set.contains_key(key) {
            kafka.options.push((key.to_owned(), value.to_owned()));
        }
    }
    Ok(kafka)
}

/// Runs until SIGTERM/SIGINT: stop intake, drain, commit, exit. Returns an error when the
/// mapping does not fit the org (the error names the field).
pub async fn run(config: Config) -> anyhow::Result<()> {
    metrics::register_all();
    let common = &config.common;
    let dlq = config.consumer.dlq_topic.clone().unwrap_or_else(|| format!("{NAME}.dlq"));
    let topics = vec![
        common.topics.spec(&common.topics.commerce),
        common.topics.spec(&common.topics.outcomes),
        common.topics.spec(&common.topics.commands),
        common.topics.spec(&dlq),
        StateStore::<()>::changelog_spec(&config.salesforce.state_topic, common.topics.partitions)
            .with_replication(common.topics.replication),
    ];
    let mapping = mapping::Mapping::load(config.salesforce.mapping_file.as_deref())?.resolve()?;
    let client = build_client(&config.salesforce)?;
    let Some(service) = Service::start(NAME, common, DEFAULT_ADMIN, topics).await? else {
        return Ok(());
    };
    let state =
        Arc::new(StateStore::new(&common.kafka, service.producer.clone(), config.salesforce.state_topic.clone()));
    let cell = Arc::new(OnceLock::new());
    let fatal: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    {
        let (cell, fatal, shutdown) = (cell.clone(), fatal.clone(), service.shutdown.clone());
        let quota_pause = config.salesforce.quota_pause;
        let graph_linger = config.salesforce.graph_linger;
        let rewrite_after = config.salesforce.customer_rewrite_after;
        let confirmations = handler::Confirmations::Store(state.clone());
        let bulk = handler::BulkSettings {
            min_records: config.salesforce.bulk_min_records,
            poll: config.salesforce.bulk_poll,
            timeout: config.salesforce.bulk_timeout,
            spool_bytes: config.salesforce.bulk_spool_bytes,
            spool_dir: config.salesforce.bulk_spool_dir.clone(),
        };
        if bulk.min_records > 0 {
            bulk.check_spool_dir()?;
        }
        tokio::spawn(async move {
            match setup::prepare(&client, &mapping, &shutdown).await {
                Ok(Some(org)) => {
                    let sink = handler::Sink::new(client, mapping, org, quota_pause)
                        .with_confirmations(confirmations)
                        .with_bulk(bulk)
                        .with_graph_linger(graph_linger)
                        .with_customer_rewrite_after(rewrite_after)
                        .with_stop(shutdown.clone());
                    let _ = cell.set(sink);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(error = %error, "the mapping does not fit the Salesforce org; stopping");
                    *fatal.lock().expect("fatal lock") = Some(error.into());
                    shutdown.cancel();
                }
            }
        });
    }
    let group = config.consumer.group.clone().unwrap_or_else(|| format!("elo-{NAME}"));
    let mut settings = elo_kafka::ConsumerSettings::new(
        group,
        vec![common.topics.commerce.clone(), common.topics.commands.clone()],
        dlq,
    );
    // Large enough that a backlog reaches Bulk API 2.0; live traffic stays in small batches
    // (the 50 ms linger), which go out as Composite Graph at once.
    settings.max_batch = config.consumer.max_batch.unwrap_or(DEFAULT_MAX_BATCH).max(1);
    // Short: the graph pool does the waiting for company (ELO_SALESFORCE_GRAPH_LINGER).
    settings.batch_linger = Duration::from_millis(20);
    settings.busy_linger = config.salesforce.busy_linger;
    settings.max_in_flight = config.consumer.max_in_flight.max(1);
    settings.partition_buffer = config.consumer.partition_buffer.max(1);
    settings.partition_buffer_bytes = config.consumer.partition_buffer_bytes.max(1);
    settings.drain_timeout = config.consumer.drain_timeout;
    let handler = Arc::new(SinkHandler {
        codec: service.codec.clone(),
        sink: cell,
        state,
        outcomes: outcomes::Outcomes::new(
            service.producer.clone(),
            service.codec.clone(),
            common.topics.outcomes.clone(),
        ),
        commands: (common.topics.commands.clone(), service.producer.clone()),
        attempts: Mutex::default(),
        budget: MemoryBudget::new(config.salesforce.inflight_bytes),
    });
    let kafka = consumer_kafka(&common.kafka)?;
    let result = elo_kafka::run_consumer(
        &kafka,
        settings,
        handler,
        service.producer.clone(),
        service.health.clone(),
        service.shutdown.clone(),
    )
    .await;
    service.finish().await;
    if let Some(error) = fatal.lock().expect("fatal lock").take() {
        return Err(error);
    }
    result?;
    Ok(())
}
