//! Metrics of the Kafka runtime. Labels are bounded: topic, partition, class, code.

use std::sync::LazyLock;

use prometheus::{
    HistogramVec, IntCounterVec, IntGaugeVec, register_histogram_vec, register_int_counter_vec, register_int_gauge_vec,
};

pub(crate) static PRODUCED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("elo_kafka_produced_records_total", "Records acknowledged by the broker.", &["topic"])
        .expect("metric registers once")
});
pub(crate) static PRODUCE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_kafka_produce_errors_total",
        "Records the broker did not acknowledge, by error code.",
        &["topic", "error_code"]
    )
    .expect("metric registers once")
});
pub(crate) static PRODUCE_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "elo_kafka_produce_latency_seconds",
        "From send to delivery report.",
        &["topic"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
    )
    .expect("metric registers once")
});
pub(crate) static CONSUMED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_consumer_records_total",
        "Records finished by the consumer runtime, by outcome (applied, dead_lettered, skipped_replay: a replay meant for another group).",
        &["topic", "outcome"]
    )
    .expect("metric registers once")
});
pub(crate) static HANDLER_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_consumer_handler_errors_total",
        "Handler failures by class and code (each attempt counts).",
        &["topic", "error_type", "error_code", "stage"]
    )
    .expect("metric registers once")
});
pub(crate) static BATCH_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "elo_consumer_batch_duration_seconds",
        "Time to finish one batch, retries included.",
        &["topic"],
        vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]
    )
    .expect("metric registers once")
});
pub(crate) static COMMITTED_OFFSET: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "elo_consumer_committed_offset",
        "Last offset committed, per partition.",
        &["topic", "partition"]
    )
    .expect("metric registers once")
});
pub(crate) static COMMIT_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("elo_consumer_commit_errors_total", "Offset commits the broker refused.", &["mode"])
        .expect("metric registers once")
});
pub(crate) static PAUSED_PARTITIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "elo_consumer_paused_partitions",
        "Partitions paused because their worker is behind.",
        &["topic"]
    )
    .expect("metric registers once")
});
pub(crate) static ASSIGNED_PARTITIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("elo_consumer_assigned_partitions", "Partitions assigned to this instance.", &["topic"])
        .expect("metric registers once")
});
pub(crate) static REBALANCES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_consumer_rebalances_total",
        "Rebalance events by kind (assign, revoke, error).",
        &["kind"]
    )
    .expect("metric registers once")
});
pub(crate) static RETRY_BLOCKED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "elo_consumer_retrying_partitions",
        "Partitions waiting to retry, by error class.",
        &["error_type"]
    )
    .expect("metric registers once")
});
pub(crate) static CLIENT_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_kafka_client_errors_total",
        "Errors librdkafka reported for the connection, by code.",
        &["client", "error_code"]
    )
    .expect("metric registers once")
});

pub(crate) static DLQ_BLOCKED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "elo_consumer_dlq_blocked_partitions",
        "Partitions held because their dead letter cannot be written.",
        &["topic"]
    )
    .expect("metric registers once")
});
pub(crate) static DLQ_WRITE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_consumer_dlq_write_errors_total",
        "Failed dead-letter writes, by error code (unknown_topic, topic_authorization, message_too_large...).",
        &["topic", "error_code"]
    )
    .expect("metric registers once")
});
pub(crate) static HANDLER_DEFECTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_consumer_handler_defects_total",
        "Handler panics and broken result contracts (the partition is held, the process not live).",
        &["topic"]
    )
    .expect("metric registers once")
});
pub(crate) static HALTED_PARTITIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "elo_consumer_halted_partitions",
        "Partitions stopped until a restart or rebalance (a failed seek, a batch that would not stop).",
        &["topic"]
    )
    .expect("metric registers once")
});
pub(crate) static WORKER_RESTARTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_consumer_worker_restarts_total",
        "Partition workers that died and were restarted from their last finished offset.",
        &["topic"]
    )
    .expect("metric registers once")
});

/// Forces registration so every metric shows on `/metrics` from the start (telemetry tests
/// check the names).
pub fn register_all() {
    let _ = (&*PRODUCED, &*PRODUCE_ERRORS, &*PRODUCE_LATENCY, &*CONSUMED, &*HANDLER_ERRORS, &*BATCH_LATENCY);
    let _ = (
        &*COMMITTED_OFFSET,
        &*COMMIT_ERRORS,
        &*PAUSED_PARTITIONS,
        &*ASSIGNED_PARTITIONS,
        &*REBALANCES,
        &*RETRY_BLOCKED,
        &*CLIENT_ERRORS,
    );
    let _ = (&*DLQ_BLOCKED, &*DLQ_WRITE_ERRORS, &*HANDLER_DEFECTS, &*HALTED_PARTITIONS, &*WORKER_RESTARTS);
    for class in ["transient", "rate_limited", "auth", "permanent"] {
        RETRY_BLOCKED.with_label_values(&[class]).add(0);
    }
}
