//! Dead-letter records: the original key, bytes and headers, plus headers that say what went
//! wrong and where the record came from, so an operator (or the replay tool) can act on it.

/// Error class: transient, rate_limited, auth, permanent.
pub const ERROR_CLASS: &str = "elo-dlq-error-class";
/// Bounded error code, e.g. `decode`, `DUPLICATES_DETECTED`.
pub const ERROR_CODE: &str = "elo-dlq-error-code";
/// Human-readable message (truncated to 1 KiB).
pub const ERROR_MESSAGE: &str = "elo-dlq-error-message";
/// Attempts made before parking.
pub const ATTEMPTS: &str = "elo-dlq-attempts";
/// Origin topic, partition, offset.
pub const ORIGIN_TOPIC: &str = "elo-dlq-origin-topic";
pub const ORIGIN_PARTITION: &str = "elo-dlq-origin-partition";
pub const ORIGIN_OFFSET: &str = "elo-dlq-origin-offset";
/// First failure, milliseconds since the epoch.
pub const FIRST_FAILURE_MS: &str = "elo-dlq-first-failure-ms";
/// Consumer group that parked it.
pub const GROUP: &str = "elo-dlq-group";
/// Where a record that never was on Kafka came from, e.g. `magento-poll/orders`.
pub const ORIGIN_SOURCE: &str = "elo-dlq-origin-source";

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
