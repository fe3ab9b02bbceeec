//! One check's repair plan over a snapshot of the ledger, pure (no I/O, no locks): the store
//! sends the commands outside any partition lock and then persists the repair states.
//!
//! Storm control: when most of a target's entries are overdue the target itself is down or
//! lagging, and a refetch per entry cannot help (it only adds to the backlog): overdue repairs
//! for that target are suspended until the share drops. The per-check command budget starts
//! where the previous check stopped, so low partitions and keys are not always served first,
//! and escalations are summed per target for one log line per check.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use elo_events::IntegrationCommand;

use crate::ledger::{Entry, Health, Repair};
use crate::repair::{self, Decision, Policy, Problem};

/// A target needs at least this many entries before its repairs can be suspended.
pub const SUSPEND_MIN_ENTRIES: usize = 20;

/// One entry the check changed.
#[derive(Debug)]
pub struct Planned {
    pub partition: i32,
    pub key: String,
    /// The repair state the snapshot held (the store only writes over an unchanged one).
    pub before: Option<Repair>,
    pub entry: Entry,
    /// The command to send first (the new state is only persisted if it went out).
    pub command: Option<(IntegrationCommand, Problem)>,
}

/// What one check does.
#[derive(Debug, Default)]
pub struct Plan {
    pub planned: Vec<Planned>,
    /// Entries to retire.
    pub expired: Vec<(i32, String)>,
    /// Escalations by (target, reason): count and a few keys.
    pub escalations: BTreeMap<(String, &'static str), (u64, Vec<String>)>,
    /// Targets whose overdue repairs are suspended.
    pub suspended: BTreeSet<String>,
    /// Where the next check starts.
    pub next_start: usize,
}

/// Targets with at least [`SUSPEND_MIN_ENTRIES`] entries of which more than half are overdue.
pub fn suspended_targets(entries: &[(i32, String, Entry)], policy: &Policy, now: i64) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in &policy.targets {
        let (mut total, mut overdue) = (0usize, 0usize);
        for (_, _, e) in entries.iter().filter(|(_, _, e)| e.version > 0 && !e.is_mark()) {
            total += 1;
            overdue += usize::from(e.health(&t.name, t.sla, now) == Health::Overdue);
        }
        if total >= SUSPEND_MIN_ENTRIES && overdue * 2 > total {
            out.insert(t.name.clone());
        }
    }
    out
}

/// Plans one check over `entries` (sorted by partition and key), sending at most
/// `max_commands`, starting at `start` (mod the entry count).
pub fn plan(
    entries: &[(i32, String, Entry)],
    policy: &Policy,
    retention: Duration,
    now: i64,
    max_commands: usize,
    start: usize,
) -> Plan {
    let mut plan = Plan { suspended: suspended_targets(entries, policy, now), ..Plan::default() };
    let n = entries.len();
    let start = if n == 0 { 0 } else { start % n };
    plan.next_start = start;
    let mut sent = 0usize;
    let mut budget_hit = false;
    for i in 0..n {
        let (partition, key, entry) = &entries[(start + i) % n];
        if repair::expired(entry, policy, retention, now) {
            plan.expired.push((*partition, key.clone()));
            continue;
        }
        if sent >= max_commands {
            // Budget spent: the next check starts here (the rest is still retired if due).
            if !budget_hit {
                plan.next_start = (start + i) % n;
                budget_hit = true;
            }
            continue;
        }
        let mut entry = entry.clone();
        let before = entry.repair.clone();
        let mut command = None;
        match repair::decide_with(&mut entry, policy, now, &plan.suspended) {
            Decision::Wait | Decision::Resolved { .. } => {}
            Decision::Send(c, problem) => {
                sent += 1;
                command = Some((c, problem));
            }
            Decision::Escalate(problem, _) => {
                let reason = problem.reason();
                let slot = plan.escalations.entry((problem.target, reason)).or_default();
                slot.0 += 1;
                if slot.1.len() < 5 {
                    slot.1.push(key.clone());
                }
            }
        }
        if entry.repair != before {
            plan.planned.push(Planned { partition: *partition, key: key.clone(), before, entry, command });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::event;
    use crate::repair::TargetSpec;

    fn policy() -> Policy {
        let t =
            |name: &str| TargetSpec { name: name.into(), sink: format!("{name}-sink"), sla: Duration::from_secs(300) };
        Policy {
            targets: vec![t("salesforce"), t("rdstation")],
            max_attempts: 3,
            backoff: Duration::from_secs(60),
            max_backoff: Duration::from_secs(900),
        }
    }

    fn overdue_orders(n: usize) -> Vec<(i32, String, Entry)> {
        (0..n)
            .map(|i| {
                let id = i.to_string();
                let mut e = Entry::for_event(&event("order", &id, "c:1", 100));
                e.apply_event(&event("order", &id, "c:1", 100), 0);
                ((i % 12) as i32, crate::ledger::key("order", &id), e)
            })
            .collect()
    }

    /// Runs a check every 10 s for `minutes`, applying each plan; (commands, escalations).
    fn simulate(entries: &mut [(i32, String, Entry)], minutes: i64) -> (usize, u64) {
        let p = policy();
        let (mut commands, mut escalations, mut start) = (0, 0, 0);
        let mut now = 600_000; // already past the SLA
        while now < 600_000 + minutes * 60_000 {
            let plan = plan(entries, &p, Duration::from_secs(86_400), now, 200, start);
            start = plan.next_start;
            escalations += plan.escalations.values().map(|(n, _)| n).sum::<u64>();
            for planned in plan.planned {
                commands += usize::from(planned.command.is_some());
                let slot = entries.iter_mut().find(|(p, k, _)| *p == planned.partition && *k == planned.key).unwrap();
                slot.2 = planned.entry;
            }
            now += 10_000;
        }
        (commands, escalations)
    }

    #[test]
    fn a_down_sink_does_not_set_off_a_repair_storm() {
        let mut entries = overdue_orders(10_000);
        let (commands, escalations) = simulate(&mut entries, 30);
        assert_eq!((commands, escalations), (0, 0), "every entry overdue: the target is down, not the entries");
    }

    #[test]
    fn a_few_overdue_entries_are_still_repaired_each_in_turn() {
        let mut entries = overdue_orders(30);
        // Most are confirmed in both targets.
        for (_, _, e) in entries.iter_mut().skip(3) {
            for t in ["salesforce", "rdstation"] {
                e.apply_outcome(
                    &crate::ledger::tests::outcome(
                        t,
                        "order",
                        &e.entity_id.clone(),
                        100,
                        elo_events::OutcomeStatus::Applied,
                    ),
                    1,
                );
            }
        }
        assert!(suspended_targets(&entries, &policy(), 600_000).is_empty());
        // One command per check: rotation reaches all three overdue entries.
        let p = policy();
        let mut start = 0;
        let mut served = BTreeSet::new();
        for check in 0..3 {
            let plan = plan(&entries, &p, Duration::from_secs(86_400), 600_000 + check, 1, start);
            start = plan.next_start;
            for planned in plan.planned {
                served.insert(planned.key.clone());
                let slot = entries.iter_mut().find(|(_, k, _)| *k == planned.key).unwrap();
                slot.2 = planned.entry;
            }
        }
        assert_eq!(served.len(), 3, "{served:?}");
    }

    #[test]
    fn escalations_are_summed_per_target() {
        let p = Policy { max_attempts: 0, ..policy() };
        let mut entries = overdue_orders(3);
        entries.extend(overdue_orders(30).into_iter().skip(3).map(|(p, k, mut e)| {
            e.targets
                .insert("salesforce".into(), crate::ledger::Target { version: 100, at_ms: 1, ..Default::default() });
            e.targets
                .insert("rdstation".into(), crate::ledger::Target { version: 100, at_ms: 1, ..Default::default() });
            (p, k, e)
        }));
        let plan = plan(&entries, &p, Duration::from_secs(86_400), 600_000, 200, 0);
        assert_eq!(
            plan.escalations.get(&("salesforce".to_owned(), "overdue")).map(|(n, keys)| (*n, keys.len())),
            Some((3, 3))
        );
    }
}
