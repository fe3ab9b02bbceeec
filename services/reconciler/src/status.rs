//! The reconciler's live figures: what the ledger and the sweeps know right now.
//!
//! The ledger side (consumer, sweeps, repair) publishes a [`LedgerStatus`] through a
//! `tokio::sync::watch` channel; the HTTP side (flow diagram, reports, `make run`'s status line)
//! only reads it. A watch channel keeps the two decoupled: readers always see the latest
//! snapshot and never slow the consumer down.

use std::collections::BTreeMap;

/// Per-target counters, keyed by target name (`salesforce`, `rdstation`, `magento`).
pub type PerTarget = BTreeMap<String, u64>;

/// A snapshot of the ledger. Counts are over the records the ledger currently holds (its
/// assigned partitions), except the `*_total` counters, which count since the process started.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LedgerStatus {
    /// Orders with a source version in the ledger.
    pub orders: u64,
    /// Customers with a source version in the ledger.
    pub customers: u64,
    /// Records whose latest source version the target confirmed (APPLIED or SKIPPED_STALE).
    pub confirmed: PerTarget,
    /// Records not confirmed within the target's SLA.
    pub overdue: PerTarget,
    /// Records whose latest outcome is DEAD_LETTERED.
    pub failed: PerTarget,
    /// Records a sweep found drifted (deleted or edited in the target, or newer in the source
    /// `magento`) whose repair the target has not confirmed yet.
    #[serde(default)]
    pub drifted: PerTarget,
    /// Records currently escalated (attempts exhausted, problem still open).
    #[serde(default)]
    pub escalated_open: u64,
    /// Orders flagged oversold by the inventory check.
    pub oversold_orders: u64,
    /// Drift found by sweeps since start, by target.
    pub drift_found_total: PerTarget,
    /// Drift repaired (the repair confirmed by the target) since start, by target.
    pub repaired_total: PerTarget,
    /// Records given up on (attempts exhausted), by target: they need a person.
    pub escalated_total: PerTarget,
    /// SKUs (`sku@stock`) whose salable quantity stayed negative past the grace period.
    #[serde(default)]
    pub negative_stock: u64,
    /// The first of them (at most [`LIST_CAP`]), for reports.
    #[serde(default)]
    pub negative_stock_skus: Vec<String>,
    /// Oversold orders (ledger keys, at most [`LIST_CAP`]), for reports.
    #[serde(default)]
    pub oversold: Vec<String>,
    /// Records escalated whose problem is still open (at most [`LIST_CAP`]), with the reason.
    #[serde(default)]
    pub escalations: Vec<Escalation>,
    /// Progress of each configured sweep since start, by sweep (`magento`, `salesforce`,
    /// `rdstation`).
    #[serde(default)]
    pub sweeps: BTreeMap<String, SweepStatus>,
    /// Partitions assigned and restored.
    pub partitions: u32,
    /// When this snapshot was taken, Unix milliseconds.
    pub as_of_ms: i64,
}

/// Longest list a snapshot carries (reports page through the metrics for totals).
pub const LIST_CAP: usize = 100;

/// A record the reconciler gave up on.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Escalation {
    /// Ledger key (`order:<id>`, `customer:<id>`).
    pub key: String,
    /// Why, e.g. `salesforce failed after 3 attempts (last error INVALID_FIELD)`.
    pub reason: String,
    /// When the first repair command for this problem went out, Unix ms.
    pub since_ms: i64,
}

/// What a sweep did since the process started.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SweepStatus {
    /// API calls spent.
    pub calls: u64,
    /// Records compared.
    pub checked: u64,
    /// Drift findings recorded.
    pub found: u64,
    /// Rounds run (complete, partial or failed).
    pub rounds: u64,
}

/// The sending half, owned by the ledger side.
pub type StatusSender = tokio::sync::watch::Sender<LedgerStatus>;
/// The reading half, cloned by every HTTP handler.
pub type StatusReceiver = tokio::sync::watch::Receiver<LedgerStatus>;

/// A channel starting from an empty snapshot.
pub fn channel() -> (StatusSender, StatusReceiver) {
    tokio::sync::watch::channel(LedgerStatus::default())
}
