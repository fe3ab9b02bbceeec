//! Errors of the runtime itself and the classification handlers give their failures.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Runtime errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("invalid kafka setting: {0}")]
    Config(String),
    #[error("producer queue is full")]
    QueueFull,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("could not create topic {topic}: {reason}")]
    TopicCreation { topic: String, reason: String },
}

impl Error {
    /// Whether retrying later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::QueueFull | Self::Timeout(_) => true,
            Self::Kafka(e) => e.rdkafka_error_code().is_some_and(is_retriable_code),
            Self::Config(_) | Self::TopicCreation { .. } => false,
        }
    }

    /// Bounded code for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Kafka(e) => match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::MessageTimedOut) => "message_timed_out",
                Some(RDKafkaErrorCode::QueueFull) => "queue_full",
                Some(RDKafkaErrorCode::MessageSizeTooLarge) => "message_too_large",
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => "unknown_topic",
                Some(RDKafkaErrorCode::TopicAuthorizationFailed) => "topic_authorization",
                Some(RDKafkaErrorCode::SaslAuthenticationFailed | RDKafkaErrorCode::Authentication) => "authentication",
                Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => "broker_down",
                _ => "kafka",
            },
            Self::Config(_) => "config",
            Self::QueueFull => "queue_full",
            Self::Timeout(_) => "timeout",
            Self::TopicCreation { .. } => "topic_creation",
        }
    }
}

fn is_retriable_code(code: RDKafkaErrorCode) -> bool {
    !matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::UnknownTopicOrPartition
    )
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a failed record is treated (architecture.md, "Delivery semantics").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Network blips, 5xx, lock contention: retry with jittered backoff, then DLQ after the
    /// configured number of attempts so a poison record never blocks its partition forever.
    Transient,
    /// Quota or rate window: wait for the window (honouring `retry_after`), never DLQ.
    RateLimited,
    /// Credentials refused: back off and keep the record (never drop), alerting meanwhile.
    Auth,
    /// The record itself is wrong: DLQ at once and carry on.
    Permanent,
}

impl ErrorClass {
    /// Stable name used in DLQ headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::RateLimited => "rate_limited",
            Self::Auth => "auth",
            Self::Permanent => "permanent",
        }
    }
}

/// A handler's verdict on one record.
#[derive(Clone, Debug)]
pub struct HandlerError {
    pub class: ErrorClass,
    /// Bounded, machine-readable code (`DUPLICATES_DETECTED`, `decode`, `http_503`).
    pub code: String,
    /// Human-readable detail; must not contain personal data.
    pub message: String,
    /// Earliest retry the downstream asked for (429 `Retry-After`, quota window).
    pub retry_after: Option<Duration>,
}

impl HandlerError {
    pub fn new(class: ErrorClass, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { class, code: code.into(), message: message.into(), retry_after: None }
    }
    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, code, message)
    }
    pub fn transient(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient, code, message)
    }
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} error {}: {}", self.class.as_str(), self.code, self.message)
    }
}
