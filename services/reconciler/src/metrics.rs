//! Every metric the reconciler exports (bounded labels: kind, target, command, reason, sweep).

use std::sync::LazyLock;

use prometheus::{
    IntCounterVec, IntGauge, IntGaugeVec, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
};

use crate::status::LedgerStatus;

pub(crate) static RECORDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "reconciler_records_total",
        "Records folded into the ledger, by source (event, outcome, inventory).",
        &["source"]
    )
    .expect("metric registers once")
});

pub(crate) static DRIFT_FOUND: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "reconciler_drift_found_total",
        "Drift found by sweeps, by kind (missing, altered, source_ahead) and target (salesforce, rdstation, magento).",
        &["kind", "target"]
    )
    .expect("metric registers once")
});

pub(crate) static REPAIRED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "reconciler_drift_repaired_total",
        "Drift whose repair the target (or the source's new event) confirmed, by kind and target.",
        &["kind", "target"]
    )
    .expect("metric registers once")
});

pub(crate) static COMMANDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "reconciler_repair_commands_total",
        "Repair commands sent on integration.commands, by command and reason (overdue, failed, drift).",
        &["command", "reason"]
    )
    .expect("metric registers once")
});

pub(crate) static ESCALATED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "reconciler_escalated_total",
        "Records given up on after the last repair attempt, by reason and target.",
        &["reason", "target"]
    )
    .expect("metric registers once")
});

pub(crate) static HEALTH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "reconciler_records",
        "Ledger records by state (confirmed, overdue, failed, drifted) and target, on this replica's partitions.",
        &["state", "target"]
    )
    .expect("metric registers once")
});

pub(crate) static LEDGER_SIZE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("reconciler_ledger_entries", "Ledger entries by kind (order, customer).", &["kind"])
        .expect("metric registers once")
});

pub(crate) static LEDGER_PARTITIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("reconciler_ledger_partitions", "Ledger partitions this replica holds.")
        .expect("metric registers once")
});

pub(crate) static OVERSOLD: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("reconciler_oversold_orders", "Orders whose latest version is flagged oversold.")
        .expect("metric registers once")
});

pub(crate) static NEGATIVE_STOCK: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "reconciler_negative_stock_skus",
        "SKUs whose salable quantity stayed negative past the grace period."
    )
    .expect("metric registers once")
});

pub(crate) static ESCALATED_OPEN: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("reconciler_escalated_open", "Records escalated whose problem is still open.")
        .expect("metric registers once")
});

pub(crate) static SWEEP_CHECKED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "reconciler_sweep_checked_total",
        "Records a sweep compared, by sweep (magento, salesforce, rdstation).",
        &["sweep"]
    )
    .expect("metric registers once")
});

pub(crate) static SWEEP_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("reconciler_sweep_api_calls_total", "API calls the sweeps made, by sweep.", &["sweep"])
        .expect("metric registers once")
});

pub(crate) static SWEEP_ROUNDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "reconciler_sweep_rounds_total",
        "Sweep rounds by sweep and result (complete, partial: stopped by the budget, failed).",
        &["sweep", "result"]
    )
    .expect("metric registers once")
});

pub(crate) static SWEEP_LAST: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "reconciler_sweep_last_complete_timestamp_seconds",
        "When each sweep last covered its whole scope.",
        &["sweep"]
    )
    .expect("metric registers once")
});

/// Sets the gauges from a status snapshot.
pub(crate) fn publish(status: &LedgerStatus) {
    for (state, figures) in [
        ("confirmed", &status.confirmed),
        ("overdue", &status.overdue),
        ("failed", &status.failed),
        ("drifted", &status.drifted),
    ] {
        for (target, n) in figures {
            HEALTH.with_label_values(&[state, target]).set(*n as i64);
        }
    }
    LEDGER_SIZE.with_label_values(&["order"]).set(status.orders as i64);
    LEDGER_SIZE.with_label_values(&["customer"]).set(status.customers as i64);
    LEDGER_PARTITIONS.set(i64::from(status.partitions));
    OVERSOLD.set(status.oversold_orders as i64);
    ESCALATED_OPEN.set(status.escalated_open as i64);
    NEGATIVE_STOCK.set(status.negative_stock as i64);
}

/// Registers every series at zero so dashboards see them before the first event.
pub fn register_all() {
    for source in ["event", "outcome", "inventory"] {
        RECORDS.with_label_values(&[source]).inc_by(0);
    }
    for sweep in ["magento", "salesforce", "rdstation"] {
        SWEEP_CHECKED.with_label_values(&[sweep]).inc_by(0);
        SWEEP_CALLS.with_label_values(&[sweep]).inc_by(0);
        // At zero from the start, so the first failed round is an increase the alert sees.
        for result in ["complete", "partial", "failed"] {
            SWEEP_ROUNDS.with_label_values(&[sweep, result]).inc_by(0);
        }
    }
    publish(&LedgerStatus::default());
}
