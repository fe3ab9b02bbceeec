//! Elo's Kafka runtime, used by every service.
//!
//! # Layout
//! - [`config`]: broker address and librdkafka pass-through settings from flags and the
//!   environment (TLS, SASL PLAIN/SCRAM, anything librdkafka accepts); secrets from files.
//! - [`producer`]: idempotent `acks=all` producer that awaits the delivery report and stamps
//!   event-type and W3C `traceparent` headers.
//! - [`consumer`]: the at-least-once consumer runtime: one ordered worker per assigned
//!   partition, bounded concurrency across partitions, contiguous commits, classified retries
//!   that keep per-key order, DLQ parking, pause/resume backpressure bounded in records and
//!   bytes, drain-and-commit on revoke and on shutdown.
//! - [`retry`]: backoff and the transient budget.
//! - [`dlq`]: dead-letter records, their headers, and the sink the runtime writes them to.
//! - [`state`]: per-partition key-value state backed by a compacted changelog topic, restored
//!   on assignment (the Kafka Streams pattern).
//! - [`admin`]: topic provisioning (the broker does not auto-create topics).
//! - `stats`: librdkafka's statistics as gauges (where a send waits: queue, socket, broker).
//! - [`metrics`]: the metrics this crate exports (the statistics gauges are in `stats`).
//!
//! # Delivery promise
//! An offset is committed only when every earlier record of its partition was applied or
//! parked in the DLQ (acknowledged by the broker). A crash at any point therefore replays,
//! never skips; handlers must be idempotent (upserts by external id). A record is never left
//! applied before an earlier record of its partition (and so of its key): a retriable failure
//! retries the batch from the failed record on. Only the record's own data sends it to the
//! DLQ (`Permanent`, or `Transient` past its budget); waits for credentials or rate windows
//! never do, and a handler bug holds the partition and fails liveness instead.

pub mod admin;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod producer;
pub mod retry;
pub mod state;
mod stats;

pub use admin::{TopicSpec, ensure_topics};
pub use config::KafkaArgs;
pub use consumer::{ConsumerSettings, Handler, Record, run_consumer, run_consumer_with_dlq};
pub use dlq::{DeadLetter, DeadLetterSink, KafkaDeadLetters};
pub use error::{Error, ErrorClass, HandlerError, Result};
pub use producer::{Delivery, Producer};
pub use retry::RetryPolicy;
pub use state::StateStore;
