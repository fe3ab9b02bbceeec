//! Dead-letter records: the original key, bytes and headers, plus headers that say what went
//! wrong and where the record came from, so an operator (or the replay tool) can act on it.
//!
//! The runtime writes dead letters through [`DeadLetterSink`], so its retry rules can be
//! tested without a broker; [`KafkaDeadLetters`] is the production sink.

use std::future::Future;

use crate::consumer::Record;
use crate::{HandlerError, Producer, Result, headers};

/// Error class: transient, rate_limited, auth, permanent.
pub const ERROR_CLASS: &str = "elo-dlq-error-class";
/// Bounded error code, e.g. `decode`, `DUPLICATES_DETECTED`.
pub const ERROR_CODE: &str = "elo-dlq-error-code";
/// Human-readable message (truncated to 1 KiB).
pub const ERROR_MESSAGE: &str = "elo-dlq-error-message";
/// Handler calls that really tried this record, whatever their outcome.
pub const ATTEMPTS: &str = "elo-dlq-attempts";
/// Of those, the ones that failed transiently (the budget that ran out).
pub const TRANSIENT_FAILURES: &str = "elo-dlq-transient-failures";
/// Origin topic, partition, offset.
pub const ORIGIN_TOPIC: &str = "elo-dlq-origin-topic";
pub const ORIGIN_PARTITION: &str = "elo-dlq-origin-partition";
pub const ORIGIN_OFFSET: &str = "elo-dlq-origin-offset";
/// The original record's timestamp (ms since the epoch). Kept as a header rather than as the
/// dead letter's own timestamp: time-based retention would delete an old record the moment
/// it was parked.
pub const ORIGIN_TIMESTAMP_MS: &str = "elo-dlq-origin-timestamp-ms";
/// This record's first failure, milliseconds since the epoch.
pub const FIRST_FAILURE_MS: &str = "elo-dlq-first-failure-ms";
/// Consumer group that parked it.
pub const GROUP: &str = "elo-dlq-group";
/// Where a record that never was on Kafka came from, e.g. `magento-poll/orders`.
pub const ORIGIN_SOURCE: &str = "elo-dlq-origin-source";

/// On a replayed record: the dead letter it replays, `<dlq topic>/<partition>/<offset>`.
pub const REPLAY_OF: &str = "elo-replay-of";
/// On a replayed record: the one consumer group it is for. Every other group skips it, without
/// side effects, committing past it (see [`is_replay_for_other`]).
pub const REPLAY_FOR: &str = "elo-replay-for";

/// Whether `record` is a replay meant for another consumer group than `group`. A replay goes
/// back to the origin topic, which other services read too; they already handled the
/// original, so only the group that parked it may act on the copy.
/// A record is a replay only with both marks: a stray `elo-replay-for` alone (a producer's
/// own header) never makes a consumer drop a record.
pub fn is_replay_for_other(record: &Record, group: &str) -> bool {
    record.header(REPLAY_OF).is_some() && record.header(REPLAY_FOR).is_some_and(|target| target != group.as_bytes())
}

const MAX_MESSAGE: usize = 1024;

/// Truncates on a character boundary.
pub fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// A record the runtime gave up on, with what it knows about the failure.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub record: Record,
    pub error: HandlerError,
    /// Handler calls that tried this record.
    pub attempts: u32,
    /// Of those, transient failures.
    pub transient_failures: u32,
    /// When this record first failed (ms since the epoch).
    pub first_failure_ms: i64,
}

impl DeadLetter {
    /// The original headers followed by the `elo-dlq-*` ones.
    pub fn headers(&self, group: &str) -> Vec<(String, Vec<u8>)> {
        let mut out = self.record.headers.clone();
        let mut add = |name: &str, value: String| out.push((name.to_owned(), value.into_bytes()));
        add(ERROR_CLASS, self.error.class.as_str().to_owned());
        add(ERROR_CODE, self.error.code.clone());
        add(ERROR_MESSAGE, truncate_message(&self.error.message).to_owned());
        add(ATTEMPTS, self.attempts.to_string());
        add(TRANSIENT_FAILURES, self.transient_failures.to_string());
        add(ORIGIN_TOPIC, self.record.topic.clone());
        add(ORIGIN_PARTITION, self.record.partition.to_string());
        add(ORIGIN_OFFSET, self.record.offset.to_string());
        if let Some(ts) = self.record.timestamp_ms {
            add(ORIGIN_TIMESTAMP_MS, ts.to_string());
        }
        add(FIRST_FAILURE_MS, self.first_failure_ms.to_string());
        add(GROUP, group.to_owned());
        out
    }
}

/// Where the runtime parks records. `Ok` means durably written: only then is the record
/// finished and its offset committable.
pub trait DeadLetterSink: Send + Sync + 'static {
    fn park(&self, letter: &DeadLetter) -> impl Future<Output = Result<()>> + Send;
}

/// Dead letters on a Kafka topic (`<service>.dlq`), written by the service's producer.
#[derive(Clone)]
pub struct KafkaDeadLetters {
    producer: Producer,
    topic: String,
    group: String,
}

impl KafkaDeadLetters {
    pub fn new(producer: Producer, topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self { producer, topic: topic.into(), group: group.into() }
    }
}

impl DeadLetterSink for KafkaDeadLetters {
    async fn park(&self, letter: &DeadLetter) -> Result<()> {
        let headers = letter.headers(&self.group);
        let owned = headers::to_owned_headers(headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        self.producer
            .send_with_headers(&self.topic, letter.record.key.as_deref(), letter.record.payload.as_deref(), owned)
            .await
            .map(|_| ())
    }
}
