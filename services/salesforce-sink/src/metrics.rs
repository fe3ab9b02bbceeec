//! Every metric of the sink, declared once (labels are bounded: object, result, kind).

use std::sync::LazyLock;

use prometheus::{
    Gauge, Histogram, IntCounterVec, IntGauge, register_gauge, register_histogram, register_int_counter_vec,
    register_int_gauge,
};

/// Records written, by Salesforce object and result (`applied`, `failed`, `skipped_stale`).
pub static RECORDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "salesforce_sink_records_total",
        "Events handled by the sink, by Salesforce object (Account, Order, ...) and result.",
        &["object", "result"]
    )
    .expect("metric registers once")
});

/// API calls by kind (`graph`, `composite`, `query`, `describe`, `token`, ...).
pub static API_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("salesforce_sink_api_calls_total", "Salesforce API calls by kind.", &["kind"])
        .expect("metric registers once")
});

/// Bulk jobs aborted because their batch ended before them, by result (`sent`, `failed`).
pub static BULK_ABORTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "salesforce_sink_bulk_aborts_total",
        "Bulk API 2.0 jobs aborted because their batch failed, stopped or was dropped, by result.",
        &["result"]
    )
    .expect("metric registers once")
});

/// Customer heads (Account and Contact nodes) of a graph, by whether they were `written` or
/// `left_out` (Salesforce holds that data: the repeat-buyer skip) or `gone` (an order found its
/// Account gone after it was left out, and is resent with it).
pub static CUSTOMER_HEADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "salesforce_sink_customer_heads_total",
        "Customers' Account/Contact nodes in graphs: written, left out (held already), or resent because the Account was gone.",
        &["result"]
    )
    .expect("metric registers once")
});

/// Records carried per Composite Graph call.
pub static RECORDS_PER_CALL: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "salesforce_sink_records_per_call",
        "Events applied per Composite Graph call.",
        vec![1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 200.0]
    )
    .expect("metric registers once")
});

/// Daily API requests used, from the last `Sforce-Limit-Info`.
pub static QUOTA_USED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("salesforce_sink_api_quota_used", "Daily API requests used (Sforce-Limit-Info).")
        .expect("metric registers once")
});

/// Daily API requests remaining, from the last `Sforce-Limit-Info`.
pub static QUOTA_REMAINING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("salesforce_sink_api_quota_remaining", "Daily API requests remaining (Sforce-Limit-Info).")
        .expect("metric registers once")
});

/// Calls the sink may still spend today (limit minus reserve minus used).
pub static QUOTA_BUDGET: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "salesforce_sink_api_quota_budget",
        "Daily API requests the sink may still spend (limit - reserve - used)."
    )
    .expect("metric registers once")
});

/// Forecast: hours until the budget is spent at the last hour's rate.
pub static QUOTA_HOURS_LEFT: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(
        "salesforce_sink_api_quota_hours_left",
        "Hours until the sink's API budget is spent at the recent rate."
    )
    .expect("metric registers once")
});

/// Event-to-confirmed latency.
pub static LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "salesforce_sink_confirm_latency_seconds",
        "From the source event to Salesforce's confirmation.",
        vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0]
    )
    .expect("metric registers once")
});

/// Decoded events by topic and type (the business dashboard's order counts read it). The
/// name dates from the consumers' validate-only stage; kept so dashboards and `make run`
/// keep counting across the change.
pub static DECODED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_validated_events_total",
        "Records that decoded against Elo's contracts, by service, topic and event type.",
        &["service", "topic", "event_type"]
    )
    .expect("metric registers once")
});

/// Touches every metric so /metrics lists them from the start.
pub fn register_all() {
    for result in ["applied", "failed", "skipped_stale"] {
        RECORDS.with_label_values(&["Order", result]).inc_by(0);
    }
    for kind in ["graph", "composite", "query", "describe", "token"] {
        API_CALLS.with_label_values(&[kind]).inc_by(0);
    }
    for result in ["sent", "failed"] {
        BULK_ABORTS.with_label_values(&[result]).inc_by(0);
    }
    for result in ["written", "left_out", "gone"] {
        CUSTOMER_HEADS.with_label_values(&[result]).inc_by(0);
    }
    let _ = RECORDS_PER_CALL.get_sample_count();
    QUOTA_USED.set(0);
    QUOTA_REMAINING.set(0);
    QUOTA_BUDGET.set(0);
    QUOTA_HOURS_LEFT.set(0.0);
    let _ = LATENCY.get_sample_count();
    DECODED.with_label_values(&[crate::NAME, "none", "none"]).inc_by(0);
}
