//! Errors of the runtime itself and the classification handlers give their failures.
//!
//! Every error carries an [`ErrorClass`], the one vocabulary the runtime, the DLQ headers and
//! the metrics share: a broker that refuses our credentials or ACLs is `Auth` (wait, alert,
//! never drop), a throttled client is `RateLimited`, an unreachable or overloaded broker is
//! `Transient`, and only a record that can never be written (too large, invalid) is
//! `Permanent`.

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
    /// A state write for a partition this member does not hold (never restored, or released
    /// on revoke): the new owner restored it, and a late write would overwrite its state.
    #[error("state partition {0} is not assigned to this member")]
    PartitionNotAssigned(i32),
}

impl Error {
    /// How a caller should treat this failure.
    pub fn class(&self) -> ErrorClass {
        match self {
            // The record comes again to whoever holds the partition now.
            Self::QueueFull | Self::Timeout(_) | Self::PartitionNotAssigned(_) => ErrorClass::Transient,
            Self::Kafka(e) => e.rdkafka_error_code().map_or(ErrorClass::Transient, class_of_code),
            Self::Config(_) | Self::TopicCreation { .. } => ErrorClass::Permanent,
        }
    }

    /// Whether retrying later may succeed: every class but `Permanent` (shorthand for callers
    /// that only choose between "try again" and "refuse", such as an HTTP front's 503 vs 4xx).
    pub fn is_retriable(&self) -> bool {
        self.class() != ErrorClass::Permanent
    }

    /// The client instance is unusable (librdkafka's fatal error): only a restart helps.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Kafka(KafkaError::MessageConsumptionFatal(_)))
            || matches!(self, Self::Kafka(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal))
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
                Some(RDKafkaErrorCode::GroupAuthorizationFailed) => "group_authorization",
                Some(RDKafkaErrorCode::ClusterAuthorizationFailed) => "cluster_authorization",
                Some(RDKafkaErrorCode::SaslAuthenticationFailed | RDKafkaErrorCode::Authentication) => "authentication",
                Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => "broker_down",
                Some(RDKafkaErrorCode::ThrottlingQuotaExceeded) => "throttled",
                Some(RDKafkaErrorCode::Fatal) => "fatal",
                _ => "kafka",
            },
            Self::Config(_) => "config",
            Self::QueueFull => "queue_full",
            Self::Timeout(_) => "timeout",
            Self::TopicCreation { .. } => "topic_creation",
            Self::PartitionNotAssigned(_) => "partition_not_assigned",
        }
    }
}

/// The class of a librdkafka error code. Unknown codes are transient: a wrong "retry" costs a
/// delay, a wrong "permanent" parks valid records.
pub fn class_of_code(code: RDKafkaErrorCode) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::DelegationTokenAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication => ErrorClass::Auth,
        C::ThrottlingQuotaExceeded => ErrorClass::RateLimited,
        C::MessageSizeTooLarge
        | C::InvalidMessage
        | C::InvalidMessageSize
        | C::InvalidRecord
        | C::InvalidConfig
        | C::InvalidArgument
        | C::UnsupportedCompressionType
        | C::UnsupportedForMessageFormat => ErrorClass::Permanent,
        // The client is unusable, but the record is fine: liveness fails and a restarted
        // process delivers it. Parking it would blame the data for the client's state.
        C::Fatal => ErrorClass::Transient,
        _ => ErrorClass::Transient,
    }
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
