//! Every metric rdstation-sink exports (labels are bounded: RD event types from the mapping
//! file, rule names from the rules file, fixed operation names).

use std::sync::LazyLock;

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, register_int_counter, register_int_counter_vec, register_int_gauge,
};

pub(crate) static BUDGET_USED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "rdstation_sink_budget_requests_total",
        "Contact requests (contacts, tags, funnels, fields) taken from the per-account budget."
    )
    .expect("metric registers once")
});
pub(crate) static BUDGET_LIMIT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "rdstation_sink_budget_requests_per_minute",
        "The per-account contact budget the sink keeps to (rate(budget_requests_total[1m])*60 / this = share used)."
    )
    .expect("metric registers once")
});
pub(crate) static RATE_LIMITED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("rdstation_sink_rate_limited_total", "429 answers received from RD Station.")
        .expect("metric registers once")
});
pub(crate) static TOKEN_REFRESHES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "rdstation_sink_token_refreshes_total",
        "OAuth access tokens obtained with the refresh token."
    )
    .expect("metric registers once")
});
pub(crate) static CONTACT_WRITES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "rdstation_sink_contact_writes_total",
        "Contact writes by operation (upsert, tag, tag_by_patch, untag, funnel, delete).",
        &["operation"]
    )
    .expect("metric registers once")
});
pub(crate) static COALESCED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "rdstation_sink_coalesced_updates_total",
        "Records whose contact update was merged into a later one of the same batch or needed no write."
    )
    .expect("metric registers once")
});
pub(crate) static DEFERRED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "rdstation_sink_deferred_updates_total",
        "Contact updates held back by the per-contact budget (24 per 24 h), landed later by the sweep."
    )
    .expect("metric registers once")
});
pub(crate) static EVENTS_SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "rdstation_sink_events_sent_total",
        "E-commerce events RD Station accepted, by type.",
        &["event_type"]
    )
    .expect("metric registers once")
});
pub(crate) static EVENTS_SKIPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "rdstation_sink_events_already_sent_total",
        "Events not sent again because the sent-log holds RD's acknowledgement, by type.",
        &["event_type"]
    )
    .expect("metric registers once")
});
pub(crate) static TAG_POSTS_LEFT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "rdstation_sink_tag_posts_left",
        "Tag posts left in the last 24 h for the partitions this replica owns (their shares of RD's daily limit; past it tags go through a PATCH)."
    )
    .expect("metric registers once")
});
pub(crate) static EVENTS_TOO_OLD: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "rdstation_sink_events_too_old_total",
        "Events not sent because their order was created before the sent-log's retention (ELO_RDSTATION_SENT_LOG_RETENTION), by type.",
        &["event_type"]
    )
    .expect("metric registers once")
});
pub(crate) static SENT_LOG_PRUNED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "rdstation_sink_sent_log_pruned_total",
        "Sent-log entries dropped because their orders are older than the retention."
    )
    .expect("metric registers once")
});
pub(crate) static RULE_HITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "rdstation_sink_rule_hits_total",
        "Contacts a segmentation rule matched when their state was evaluated, by rule.",
        &["rule"]
    )
    .expect("metric registers once")
});

/// Registers every metric so `/metrics` lists them from the start.
pub(crate) fn register_all() {
    let _ = (&*TAG_POSTS_LEFT, &*SENT_LOG_PRUNED, &*BUDGET_USED, &*BUDGET_LIMIT, &*RATE_LIMITED, &*TOKEN_REFRESHES);
    let _ = (&*COALESCED, &*DEFERRED, &*EVENTS_TOO_OLD);
    for op in ["upsert", "tag", "tag_by_patch", "untag", "funnel", "delete"] {
        CONTACT_WRITES.with_label_values(&[op]).inc_by(0);
    }
}
