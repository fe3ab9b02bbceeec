//! The at-least-once consumer runtime shared by the sinks and the reconciler.
//!
//! # How it works
//! A dedicated OS thread owns the librdkafka consumer and polls it ([`runtime`]). Each assigned
//! partition gets a worker task fed by a bounded channel ([`worker`]); the worker takes batches
//! (up to `max_batch` records, one partition, in offset order) and runs them through the retry
//! engine ([`batch`]): classified retries that keep per-key order, DLQ parking, and only then
//! the partition's *done* offset moves. Because a partition's records finish strictly in
//! order, the done offset is always contiguous: nothing before it is unfinished.
//!
//! Commits follow librdkafka's at-least-once pattern: the poll thread *stores* each
//! partition's done offset (`enable.auto.offset.store=false`) and librdkafka commits stored
//! offsets every `commit_interval` (`enable.auto.commit=true`), retrying failed commits on the
//! next interval and reporting every result to the commit callback, which feeds
//! `elo_consumer_committed_offset` and `elo_consumer_commit_errors_total`. (Manual async
//! commits are not used: with rdkafka 0.39 their result never reaches the callback,
//! rust-rdkafka #856.) Revokes and shutdown store and then commit synchronously.
//!
//! Backpressure: when a partition's buffer is full (records or bytes) the poll thread pauses
//! that partition alone and holds the one record it could not hand over. librdkafka then drops
//! its prefetched records for that partition and, on resume, fetches again from the record
//! after the held one (librdkafka #2052), so nothing is skipped and other partitions keep
//! flowing. The poll loop never blocks on a worker, so `max.poll.interval.ms` is never
//! exceeded by slow handlers. librdkafka's own prefetch queue is bounded too
//! (`queued.max.messages.kbytes`), so memory stays bounded under any backlog.
//!
//! Rebalances: a revoke stops the revoked partitions' workers (each finishes its current
//! batch), waits up to `drain_timeout`, then aborts stragglers and waits until they have really
//! stopped, and commits the done offsets synchronously before the partitions move. A *lost*
//! assignment (the group moved on without us) is not committed: the workers are stopped and
//! their records are left to the new owner.
//!
//! Defects are loud: a handler panic or broken contract holds its partition and marks the
//! process not live; a worker that dies is restarted from its done offset, and if the seek
//! that needs fails, the partition is halted (metric, ERROR, not ready) rather than skipped.
//!
//! Why not rdkafka's `StreamConsumer` with `split_partition_queue`: the rebalance callbacks
//! must block while partitions drain, which is only safe on a thread that is not a tokio
//! worker; and per-partition queues lose their forwarding on every reassignment.

mod batch;
mod runtime;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use elo_telemetry::Health;
use rdkafka::message::{BorrowedMessage, Message};
use tokio_util::sync::CancellationToken;

use crate::dlq::{DeadLetterSink, KafkaDeadLetters};
use crate::{HandlerError, KafkaArgs, Producer, Result, RetryPolicy, headers};

/// One consumed record, owned.
#[derive(Clone, Debug)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

impl Record {
    fn from_message(m: &BorrowedMessage<'_>) -> Self {
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: headers::collect(m.headers()),
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// Approximate memory held by this record, for the per-partition byte bound.
    pub fn size_bytes(&self) -> usize {
        const OVERHEAD: usize = 128;
        OVERHEAD
            + self.topic.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self.headers.iter().map(|(k, v)| k.len() + v.len() + 48).sum::<usize>()
    }
}

/// What a consumer service does with its records.
pub trait Handler: Send + Sync + 'static {
    /// Applies a batch of records of one partition, in offset order, and returns one result per
    /// record, in the same order. Must be idempotent: after a crash, and after a retriable
    /// failure of an earlier record in the batch, the same records come again.
    fn handle(&self, batch: &[Record]) -> impl Future<Output = Vec<Result<(), HandlerError>>> + Send;

    /// Called on the poll thread when a partition is assigned. Must be quick: it runs inside
    /// the rebalance. Slow preparation (restoring state) belongs in
    /// [`Handler::on_partition_start`].
    fn on_assigned(&self, _topic: &str, _partition: i32) {}

    /// Runs on the partition's worker before its first batch, e.g. to restore per-partition
    /// state ([`crate::StateStore::restore_async`]). No record of the partition is handled until
    /// it succeeds; a failure is retried with backoff (the partition waits, the others go on).
    fn on_partition_start(
        &self,
        _topic: &str,
        _partition: i32,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }

    /// Called on the poll thread after a revoked partition was drained and committed.
    fn on_revoked(&self, _topic: &str, _partition: i32) {}
}

/// Consumer runtime settings.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub group_id: String,
    pub topics: Vec<String>,
    /// Where records that cannot be applied are parked (never dropped).
    pub dlq_topic: String,
    /// Records per handler call (Salesforce collections take 200).
    pub max_batch: usize,
    /// How long a worker waits to fill a batch once it has one record.
    pub batch_linger: Duration,
    /// The linger instead of `batch_linger` while the partition is busy (its previous batch
    /// was taken within `busy_window`): a busy stream fills larger batches while a record
    /// after a quiet spell leaves at once. Zero (the default): always `batch_linger`.
    pub busy_linger: Duration,
    pub busy_window: Duration,
    /// Records buffered per partition before the partition is paused.
    pub partition_buffer: usize,
    /// Bytes buffered per partition before the partition is paused.
    pub partition_buffer_bytes: usize,
    /// Handler calls running at once across all partitions.
    pub max_in_flight: usize,
    /// Offset commit interval (librdkafka `auto.commit.interval.ms`).
    pub commit_interval: Duration,
    /// How long revoke and shutdown wait for in-flight batches.
    pub drain_timeout: Duration,
    pub retry: RetryPolicy,
}

impl ConsumerSettings {
    /// Defaults that work locally.
    pub fn new(group_id: impl Into<String>, topics: Vec<String>, dlq_topic: impl Into<String>) -> Self {
        Self {
            group_id: group_id.into(),
            topics,
            dlq_topic: dlq_topic.into(),
            max_batch: 1,
            batch_linger: Duration::ZERO,
            busy_linger: Duration::ZERO,
            busy_window: Duration::from_secs(1),
            partition_buffer: 5000,
            partition_buffer_bytes: 4 << 20,
            max_in_flight: 8,
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }
}

/// librdkafka consumer tuning that bounds memory; operators may change it
/// (`ELO_RDKAFKA_QUEUED_MAX_MESSAGES_KBYTES`, ...). librdkafka's defaults prefetch up to
/// 64 MiB, plus 1 MiB per partition per fetch.
/// `reconnect.backoff.max.ms` (librdkafka: 10 s) is lowered so a returning broker is seen
/// within seconds.
const CONSUMER_DEFAULTS: [(&str, &str); 4] = [
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.max.bytes", "8388608"),
    ("queued.min.messages", "10000"),
    ("reconnect.backoff.max.ms", "2000"),
];

/// Runs the consumer until `shutdown` is cancelled, then drains, commits and leaves the group.
/// Dead letters go to `settings.dlq_topic` through `producer`.
///
/// Offsets move only through the done offsets (stored, then committed by librdkafka);
/// `auto.offset.reset=earliest` so a new group starts from the beginning rather than
/// skipping what was already there. Returns an error when librdkafka reports a fatal error
/// (the process should exit and be restarted).
pub async fn run_consumer<H: Handler>(
    args: &KafkaArgs,
    settings: ConsumerSettings,
    handler: Arc<H>,
    producer: Producer,
    health: Health,
    shutdown: CancellationToken,
) -> Result<()> {
    let dlq = KafkaDeadLetters::new(producer, settings.dlq_topic.clone(), settings.group_id.clone());
    run_consumer_with_dlq(args, settings, handler, dlq, health, shutdown).await
}

/// [`run_consumer`] with any dead-letter sink.
pub async fn run_consumer_with_dlq<H: Handler, D: DeadLetterSink>(
    args: &KafkaArgs,
    settings: ConsumerSettings,
    handler: Arc<H>,
    dlq: D,
    health: Health,
    shutdown: CancellationToken,
) -> Result<()> {
    crate::metrics::register_all();
    if settings.drain_timeout.is_zero() {
        return Err(crate::Error::Config("drain timeout must be positive".into()));
    }
    let interval = settings.commit_interval.as_millis().max(1).to_string();
    let config = args.client_config_with(
        &CONSUMER_DEFAULTS,
        &[
            ("group.id", settings.group_id.as_str()),
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", interval.as_str()),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
        ],
    )?;
    runtime::run(config, settings, handler, dlq, health, shutdown).await
}
