//! The figures of one pass over the ledger: counts per target and state, and the lists
//! reports need, turned into a [`LedgerStatus`].

use std::collections::BTreeMap;

use crate::ledger::{Entry, Health};
use crate::repair::{self, Policy};
use crate::status::{Escalation, LIST_CAP, LedgerStatus};

/// Counters since start, for the status snapshot.
#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) drift_found: BTreeMap<String, u64>,
    pub(crate) repaired: BTreeMap<String, u64>,
    pub(crate) escalated: BTreeMap<String, u64>,
}

/// Figures gathered in one pass.
#[derive(Default)]
pub(crate) struct Figures {
    orders: u64,
    customers: u64,
    oversold: u64,
    confirmed: BTreeMap<String, u64>,
    overdue: BTreeMap<String, u64>,
    failed: BTreeMap<String, u64>,
    drifted: BTreeMap<String, u64>,
    escalated_open: u64,
    oversold_keys: Vec<String>,
    escalations: Vec<Escalation>,
}

impl Figures {
    pub(crate) fn count(&mut self, key: &str, entry: &Entry, policy: &Policy, now: i64) {
        if let Some(repair) = &entry.repair
            && let Some(reason) = &repair.escalated
            && self.escalations.len() < LIST_CAP
        {
            self.escalations.push(Escalation {
                key: key.to_owned(),
                reason: reason.clone(),
                since_ms: repair.since_ms,
            });
        }
        self.escalated_open += u64::from(entry.repair.as_ref().is_some_and(|r| r.escalated.is_some()));
        if entry.drift.contains_key(repair::SOURCE) {
            // Also before its event came: a lost webhook of a new order has only this entry.
            *self.drifted.entry(repair::SOURCE.to_owned()).or_default() += 1;
        }
        if entry.version == 0 {
            return;
        }
        if entry.oversold && self.oversold_keys.len() < LIST_CAP {
            self.oversold_keys.push(key.to_owned());
        }
        match entry.kind.as_str() {
            "order" => self.orders += 1,
            _ => self.customers += 1,
        }
        self.oversold += u64::from(entry.oversold);
        for t in &policy.targets {
            let bucket = match entry.health(&t.name, t.sla, now) {
                Health::Confirmed => &mut self.confirmed,
                Health::Overdue => &mut self.overdue,
                Health::Failed => &mut self.failed,
                Health::Drifted(_) => &mut self.drifted,
                Health::Pending => continue,
            };
            *bucket.entry(t.name.clone()).or_default() += 1;
        }
    }

    pub(crate) fn into_status(self, policy: &Policy, partitions: u32, totals: &Totals, now: i64) -> LedgerStatus {
        let zeroed = |m: BTreeMap<String, u64>| {
            let mut out: BTreeMap<String, u64> = policy.targets.iter().map(|t| (t.name.clone(), 0)).collect();
            out.extend(m);
            out
        };
        LedgerStatus {
            orders: self.orders,
            customers: self.customers,
            confirmed: zeroed(self.confirmed),
            overdue: zeroed(self.overdue),
            failed: zeroed(self.failed),
            drifted: zeroed(self.drifted),
            escalated_open: self.escalated_open,
            oversold_orders: self.oversold,
            oversold: self.oversold_keys,
            escalations: self.escalations,
            drift_found_total: totals.drift_found.clone(),
            repaired_total: totals.repaired.clone(),
            escalated_total: totals.escalated.clone(),
            partitions,
            as_of_ms: now,
            ..LedgerStatus::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use elo_events::OutcomeStatus;

    use super::*;
    use crate::ledger::DriftKind;
    use crate::ledger::tests::{event, outcome};
    use crate::repair::TargetSpec;

    #[test]
    fn the_status_counts_each_target_and_lists_what_reports_need() {
        let t =
            |name: &str| TargetSpec { name: name.into(), sink: format!("{name}-sink"), sla: Duration::from_secs(60) };
        let policy = Policy {
            targets: vec![t("salesforce"), t("rdstation")],
            max_attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
        };
        let mut confirmed = Entry::default();
        confirmed.apply_event(&event("order", "1", "c:1", 100), 0);
        confirmed.apply_outcome(&outcome("salesforce", "order", "1", 100, OutcomeStatus::Applied), 1);
        confirmed.apply_outcome(&outcome("rdstation", "order", "1", 100, OutcomeStatus::DeadLettered), 1);
        confirmed.oversold = true;
        let mut overdue = Entry::default();
        overdue.apply_event(&event("customer", "2", "c:2", 100), 0);
        overdue.flag_drift("magento", DriftKind::SourceAhead, 200, 5);
        overdue.repair = Some(crate::ledger::Repair {
            attempts: 3,
            next_at_ms: 0,
            since_ms: 7,
            escalated: Some("salesforce overdue after 3 attempts".into()),
        });
        let only_outcome = Entry::for_outcome(&outcome("salesforce", "order", "3", 100, OutcomeStatus::Applied));
        let mut figures = Figures::default();
        let now = 120_000;
        figures.count("order:1", &confirmed, &policy, now);
        figures.count("customer:2", &overdue, &policy, now);
        figures.count("order:3", &only_outcome, &policy, now);
        let totals = Totals::default();
        let s = figures.into_status(&policy, 2, &totals, now);
        assert_eq!((s.orders, s.customers, s.partitions), (1, 1, 2), "an entry without its event is not counted yet");
        assert_eq!(s.confirmed, BTreeMap::from([("rdstation".into(), 0), ("salesforce".into(), 1)]));
        assert_eq!(s.failed["rdstation"], 1);
        assert_eq!((s.overdue["salesforce"], s.overdue["rdstation"]), (1, 1));
        assert_eq!(s.drifted["magento"], 1);
        assert_eq!((s.oversold_orders, s.oversold.clone()), (1, vec!["order:1".to_owned()]));
        assert_eq!(s.escalated_open, 1);
        assert_eq!(
            s.escalations,
            vec![Escalation {
                key: "customer:2".into(),
                reason: "salesforce overdue after 3 attempts".into(),
                since_ms: 7
            }]
        );
    }

    #[test]
    fn a_lost_webhook_for_a_new_order_is_counted_drifted_and_escalated() {
        let policy = Policy {
            targets: vec![],
            max_attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
        };
        // The Magento sweep's entry for an order the ledger never saw: version 0.
        let mut lost = Entry::for_event(&event("order", "9", "c:9", 500));
        lost.flag_drift("magento", DriftKind::SourceAhead, 500, 5);
        lost.repair =
            Some(crate::ledger::Repair { attempts: 3, next_at_ms: 0, since_ms: 7, escalated: Some("x".into()) });
        let mut figures = Figures::default();
        figures.count("order:9", &lost, &policy, 10);
        let s = figures.into_status(&policy, 1, &Totals::default(), 10);
        assert_eq!(s.drifted.get("magento"), Some(&1));
        assert_eq!(s.escalated_open, 1);
    }
}
