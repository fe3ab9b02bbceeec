//! Elo's Kafka runtime, used by every service.
//!
//! # Layout
//! - [`config`]: broker address and librdkafka pass-through settings from flags and the
//!   environment (TLS, SASL PLAIN/SCRAM, anything librdkafka accepts); secrets from files.
//! - [`producer`]: idempotent `acks=all` producer that awaits the delivery report and stamps
//!   event-type and W3C `traceparent` headers.
//! - [`consumer`]: the at-least-once consumer runtime: one ordered worker per assigned
//!   partition, bounded concurrency across partitions, contiguous commits, classified retries,
//!   DLQ parking, pause/resume backpressure, drain-and-commit on revoke and on shutdown.
//! - [`dlq`]: dead-letter record headers.
//! - [`admin`]: topic provisioning (the broker does not auto-create topics).
//! - [`metrics`]: every metric this crate exports.
//!
//! # Delivery promise
//! An offset is committed only when every earlier record of its partition was applied or
//! parked in the DLQ (acknowledged by the broker). A crash at any point therefore replays,
//! never skips; handlers must be idempotent (upserts by external id).

pub mod admin;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod headers;
pub mod metrics;
pub mod producer;

pub use admin::{TopicSpec, ensure_topics};
pub use config::KafkaArgs;
pub use consumer::{ConsumerSettings, Handler, Record, RetryPolicy, run_consumer};
pub use error::{Error, ErrorClass, HandlerError, Result};
pub use producer::{Delivery, Producer};
