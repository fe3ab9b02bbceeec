//! The daily process report: what happened to the day's orders, step by step.
//!
//! [`ReportBuilder`] turns the day's records (commerce events, sink outcomes, repair commands,
//! dead letters: read by [`collect`]) plus the live [`LedgerStatus`] and the targets' quota into
//! a [`DailyReport`]; [`render`] writes it as HTML (inline SVG charts, no scripts), JSON or CSV.
//! The day is a UTC calendar day of Kafka record timestamps: when Elo *received* something.

pub mod cli;
pub mod collect;
pub mod render;
pub mod runner;

use std::collections::{BTreeMap, BTreeSet};

use elo_events::{CommerceEvent, CommerceEventType, IntegrationCommand, InventoryStatus, OutcomeStatus, SyncOutcome};
use serde::{Deserialize, Serialize};

use crate::dlq::DeadLetterEntry;
use crate::status::LedgerStatus;

/// One day's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DailyReport {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    pub generated_at_ms: i64,
    /// Distinct orders with an order event received this day.
    pub orders_received: u64,
    /// Order events (placed and changed) received.
    pub order_events: u64,
    /// Customer events (changed, erased) received.
    pub customer_events: u64,
    /// Records replayed from a DLQ onto commerce.events this day (`elo-replay-of`): the same
    /// events again, so they are not in the figures above.
    #[serde(default)]
    pub replayed_records: u64,
    /// The inventory check of the day's orders (latest status of each order).
    pub inventory: InventoryFigures,
    /// Per target (`salesforce`, `rdstation`): what the sinks confirmed this day.
    pub synced: BTreeMap<String, TargetFigures>,
    /// Latency percentiles per workflow step.
    pub latency: Vec<LatencyFigures>,
    /// Dead letters parked this day, by service, error class and code.
    pub failures: Vec<FailureFigures>,
    pub repairs: RepairFigures,
    pub needs_person: NeedsPerson,
    /// API quota used per target (`None`: unknown).
    pub quota: BTreeMap<String, QuotaFigures>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryFigures {
    pub ok: u64,
    pub low_stock: u64,
    pub oversold: u64,
    /// Not checked or unknown (e.g. the order predates what stock can tell).
    pub unchecked: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetFigures {
    /// Distinct orders the target confirmed (applied or already newer).
    pub orders: u64,
    /// Distinct customers (customer keys) the target confirmed.
    pub customers: u64,
    /// Outcomes by status.
    pub applied: u64,
    pub skipped_stale: u64,
    pub dead_lettered: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// Workflow step: `order` (Magento change → event published), `salesforce`, `rdstation`
    /// (Magento change → applied in the target).
    pub step: String,
    pub count: u64,
    pub p50_ms: i64,
    pub p90_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureFigures {
    pub service: String,
    pub class: String,
    pub code: String,
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairFigures {
    /// Repair commands issued this day, by command type.
    pub commands: BTreeMap<String, u64>,
    /// Drift found and repaired by the live ledger since it started, by target.
    pub drift_found: BTreeMap<String, u64>,
    pub repaired: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedsPerson {
    /// The day's dead letters not replayed yet.
    pub dead_letters: u64,
    /// Records the ledger gave up on (attempts exhausted), by target.
    pub escalated: BTreeMap<String, u64>,
    /// Records past their target's SLA right now, by target.
    pub overdue: BTreeMap<String, u64>,
    /// Up to 20 of those dead letters, `<dlq topic>/<partition>/<offset> <code> <key>`.
    pub examples: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaFigures {
    pub used: Option<u64>,
    pub limit: Option<u64>,
    /// Where the figure comes from.
    pub source: String,
}

impl DailyReport {
    /// Sets the live ledger's figures (they are "now", so a cached report gets fresh ones).
    pub fn apply_ledger(&mut self, status: &LedgerStatus) {
        self.repairs.drift_found = status.drift_found_total.clone();
        self.repairs.repaired = status.repaired_total.clone();
        self.needs_person.escalated = status.escalated_total.clone();
        self.needs_person.overdue = status.overdue.clone();
    }
}

/// Accumulates one day's records.
#[derive(Debug, Default)]
pub struct ReportBuilder {
    report: DailyReport,
    orders: BTreeMap<String, InventoryStatus>,
    confirmed_orders: BTreeMap<String, BTreeSet<String>>,
    confirmed_customers: BTreeMap<String, BTreeSet<String>>,
    latencies: BTreeMap<String, Vec<i64>>,
    failures: BTreeMap<(String, String, String), u64>,
}

const MAX_EXAMPLES: usize = 20;

impl ReportBuilder {
    pub fn new(date: &str, generated_at_ms: i64) -> Self {
        let mut b = Self::default();
        b.report.date = date.to_owned();
        b.report.generated_at_ms = generated_at_ms;
        b
    }

    /// A commerce event received this day; `published_ms` is its record timestamp.
    pub fn commerce(&mut self, event: &CommerceEvent, published_ms: i64) {
        match event.event_type {
            CommerceEventType::OrderPlaced | CommerceEventType::OrderChanged => {
                self.report.order_events += 1;
                let status = event.order.as_ref().map_or(InventoryStatus::Unknown, |o| o.inventory_status);
                self.orders.insert(event.source_version.entity_id.clone(), status);
                self.latencies.entry("order".into()).or_default().push((published_ms - event.occurred_at).max(0));
            }
            CommerceEventType::CustomerChanged | CommerceEventType::CustomerErased => self.report.customer_events += 1,
            CommerceEventType::Unknown => {}
        }
    }

    /// A commerce record that is a replay of a dead letter.
    pub fn replayed_record(&mut self) {
        self.report.replayed_records += 1;
    }

    /// A sink outcome published this day.
    pub fn outcome(&mut self, outcome: &SyncOutcome) {
        let figures = self.report.synced.entry(outcome.target.clone()).or_default();
        match outcome.status {
            OutcomeStatus::Applied => figures.applied += 1,
            OutcomeStatus::SkippedStale => figures.skipped_stale += 1,
            OutcomeStatus::DeadLettered => figures.dead_lettered += 1,
            OutcomeStatus::Unknown => {}
        }
        if matches!(outcome.status, OutcomeStatus::Applied | OutcomeStatus::SkippedStale) {
            if outcome.source_version.entity_type == "order" {
                self.confirmed_orders
                    .entry(outcome.target.clone())
                    .or_default()
                    .insert(outcome.source_version.entity_id.clone());
            }
            self.confirmed_customers.entry(outcome.target.clone()).or_default().insert(outcome.customer_key.clone());
            if outcome.status == OutcomeStatus::Applied {
                self.latencies.entry(outcome.target.clone()).or_default().push(outcome.latency_ms.max(0));
            }
        }
    }

    /// A repair command issued this day.
    pub fn command(&mut self, command: &IntegrationCommand) {
        let kind = serde_json::to_value(command.command_type)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "UNKNOWN".into());
        *self.report.repairs.commands.entry(kind).or_default() += 1;
    }

    /// A dead letter parked this day; `replayed` when a replay of it was recorded.
    pub fn dead_letter(&mut self, entry: &DeadLetterEntry, replayed: bool) {
        let key = (entry.service().to_owned(), entry.class().to_owned(), entry.code().to_owned());
        *self.failures.entry(key).or_default() += 1;
        if !replayed {
            let needs = &mut self.report.needs_person;
            needs.dead_letters += 1;
            if needs.examples.len() < MAX_EXAMPLES {
                needs.examples.push(format!(
                    "{} {} {}",
                    entry.coordinate(),
                    entry.code(),
                    entry.key().unwrap_or_default()
                ));
            }
        }
    }

    /// The live ledger's figures (zeros while nothing publishes them).
    pub fn ledger(&mut self, status: &LedgerStatus) {
        self.report.apply_ledger(status);
    }

    pub fn quota(&mut self, target: &str, figures: QuotaFigures) {
        self.report.quota.insert(target.to_owned(), figures);
    }

    pub fn finish(mut self) -> DailyReport {
        let r = &mut self.report;
        r.orders_received = self.orders.len() as u64;
        for status in self.orders.values() {
            match status {
                InventoryStatus::Ok => r.inventory.ok += 1,
                InventoryStatus::LowStock => r.inventory.low_stock += 1,
                InventoryStatus::Oversold => r.inventory.oversold += 1,
                InventoryStatus::Unchecked | InventoryStatus::Unknown => r.inventory.unchecked += 1,
            }
        }
        for (target, figures) in &mut r.synced {
            figures.orders = self.confirmed_orders.get(target).map_or(0, |s| s.len() as u64);
            figures.customers = self.confirmed_customers.get(target).map_or(0, |s| s.len() as u64);
        }
        r.latency = self
            .latencies
            .into_iter()
            .map(|(step, mut samples)| {
                samples.sort_unstable();
                LatencyFigures {
                    count: samples.len() as u64,
                    p50_ms: percentile(&samples, 50.0),
                    p90_ms: percentile(&samples, 90.0),
                    p99_ms: percentile(&samples, 99.0),
                    max_ms: samples.last().copied().unwrap_or(0),
                    step,
                }
            })
            .collect();
        // Workflow order, not alphabetical.
        r.latency.sort_by_key(|l| ["order", "salesforce", "rdstation"].iter().position(|s| *s == l.step).unwrap_or(9));
        r.failures = self
            .failures
            .into_iter()
            .map(|((service, class, code), count)| FailureFigures { service, class, code, count })
            .collect();
        self.report
    }
}

/// Nearest-rank percentile of sorted samples (0 when empty).
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
pub(crate) mod tests {
    use elo_events::sample;

    use super::*;

    pub(crate) fn outcome(
        target: &str,
        entity: (&str, &str),
        key: &str,
        status: OutcomeStatus,
        latency: i64,
    ) -> SyncOutcome {
        SyncOutcome {
            outcome_id: format!("{target}-{}-{latency}", entity.1),
            sink: format!("{target}-sink"),
            target: target.into(),
            event_id: "e".into(),
            customer_key: key.into(),
            source_version: elo_events::SourceVersion {
                entity_type: entity.0.into(),
                entity_id: entity.1.into(),
                updated_at: 1,
            },
            status,
            error_class: None,
            error_code: None,
            target_ids: BTreeMap::new(),
            attempts: 1,
            latency_ms: latency,
            occurred_at: 1,
        }
    }

    /// A day with three orders (one twice), outcomes from both sinks, one repair command and
    /// two dead letters of which one was replayed.
    pub(crate) fn sample_report() -> DailyReport {
        let mut b = ReportBuilder::new("2026-11-30", 42);
        for (n, status, delay) in
            [(1, InventoryStatus::Ok, 100), (2, InventoryStatus::Oversold, 300), (3, InventoryStatus::Ok, 200)]
        {
            let mut e = sample::order_placed(n);
            e.source_version.entity_id = n.to_string();
            e.order.as_mut().unwrap().inventory_status = status;
            b.commerce(&e, e.occurred_at + delay);
        }
        let mut changed = sample::order_placed(1);
        changed.event_type = CommerceEventType::OrderChanged;
        changed.source_version.entity_id = "1".into();
        changed.order.as_mut().unwrap().inventory_status = InventoryStatus::LowStock;
        b.commerce(&changed, changed.occurred_at + 400);
        b.outcome(&outcome("salesforce", ("order", "1"), "c:1", OutcomeStatus::Applied, 1000));
        b.outcome(&outcome("salesforce", ("order", "1"), "c:1", OutcomeStatus::SkippedStale, 5));
        b.outcome(&outcome("salesforce", ("order", "2"), "c:2", OutcomeStatus::Applied, 3000));
        b.outcome(&outcome("salesforce", ("order", "3"), "c:3", OutcomeStatus::DeadLettered, 9));
        b.outcome(&outcome("rdstation", ("customer", "c:1"), "c:1", OutcomeStatus::Applied, 2000));
        b.command(&IntegrationCommand {
            command_id: "x".into(),
            command_type: elo_events::CommandType::RefetchOrder,
            target_service: "order-ingest".into(),
            customer_key: "c:1".into(),
            entity_id: "1".into(),
            store_id: None,
            reason: "drift".into(),
            requested_by: "reconciler".into(),
            requested_at: 1,
        });
        let letter = |offset: i64| {
            crate::dlq::tests::letter(
                "salesforce-sink.dlq",
                offset,
                &[(elo_kafka::dlq::ERROR_CLASS, "permanent"), (elo_kafka::dlq::ERROR_CODE, "DUPLICATES_DETECTED")],
                5,
            )
        };
        b.dead_letter(&letter(1), true);
        b.dead_letter(&letter(2), false);
        b.ledger(&LedgerStatus {
            repaired_total: [("salesforce".to_owned(), 4)].into(),
            escalated_total: [("rdstation".to_owned(), 1)].into(),
            ..LedgerStatus::default()
        });
        b.quota("salesforce", QuotaFigures { used: Some(120), limit: Some(15_000), source: "test".into() });
        b.quota("rdstation", QuotaFigures { used: None, limit: None, source: "test".into() });
        b.finish()
    }

    #[test]
    fn the_day_is_summed_per_order_target_step_and_failure() {
        let r = sample_report();
        assert_eq!((r.orders_received, r.order_events, r.customer_events), (3, 4, 0));
        assert_eq!(
            r.inventory,
            InventoryFigures { ok: 1, low_stock: 1, oversold: 1, unchecked: 0 },
            "latest status per order"
        );
        let sf = &r.synced["salesforce"];
        assert_eq!((sf.orders, sf.customers, sf.applied, sf.skipped_stale, sf.dead_lettered), (2, 2, 2, 1, 1));
        assert_eq!((r.synced["rdstation"].orders, r.synced["rdstation"].customers), (0, 1));
        let steps: Vec<&str> = r.latency.iter().map(|l| l.step.as_str()).collect();
        assert_eq!(steps, ["order", "salesforce", "rdstation"]);
        assert_eq!((r.latency[0].count, r.latency[0].p50_ms, r.latency[0].max_ms), (4, 200, 400));
        assert_eq!(
            (r.latency[1].count, r.latency[1].p50_ms, r.latency[1].p99_ms),
            (2, 1000, 3000),
            "applied outcomes only"
        );
        assert_eq!(
            r.failures,
            [FailureFigures {
                service: "salesforce-sink".into(),
                class: "permanent".into(),
                code: "DUPLICATES_DETECTED".into(),
                count: 2
            }]
        );
        assert_eq!(r.needs_person.dead_letters, 1, "the replayed one needs nobody");
        assert_eq!(r.needs_person.examples, ["salesforce-sink.dlq/1/2 DUPLICATES_DETECTED c:42"]);
        assert_eq!(r.needs_person.escalated["rdstation"], 1);
        assert_eq!(r.repairs.commands["REFETCH_ORDER"], 1);
        assert_eq!(r.repairs.repaired["salesforce"], 4);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<i64> = (1..=100).collect();
        assert_eq!((percentile(&s, 50.0), percentile(&s, 90.0), percentile(&s, 99.0)), (50, 90, 99));
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[1, 2], 0.0), 1);
    }
}
