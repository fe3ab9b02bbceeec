//! The repair policy: which command a problem calls for, how many attempts it gets and how far
//! apart, and when to give up and escalate. Pure: [`decide`] reads and updates one ledger
//! entry; the caller publishes the command and persists the entry.
//!
//! - Overdue or failed in a target, or the source ahead of the ledger (a lost webhook):
//!   `REFETCH_ORDER` / `REFETCH_CUSTOMER` to order-ingest, which reloads the entity from Magento
//!   and republishes it; the sinks apply it as any other version.
//! - Drifted in one target (deleted or edited there behind Elo's back): `RESEND` to that
//!   target's sink, whose entity id is the ledger key (`order:<id>`, `customer:<id>`). The sink
//!   forgets what it believed the target holds for that entity, so the republished version is
//!   written again rather than skipped as already applied.
//!
//! Attempt `n` (1-based) waits `backoff * 2^(n-1)` (capped) before the next one is allowed;
//! after `max_attempts` commands the entity is escalated with the reason, and stays escalated
//! (counted in the status and reports) until the problem clears.

use std::time::Duration;

use elo_events::{CommandType, IntegrationCommand};

use crate::ledger::{DriftKind, Entry, Health, Repair};

/// The source's name in the ledger's drift map.
pub const SOURCE: &str = "magento";

/// One target the ledger expects to confirm every order and customer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// Target name as the sinks report it (`salesforce`, `rdstation`).
    pub name: String,
    /// The sink that writes it (the `RESEND` addressee).
    pub sink: String,
    /// Confirmation expected within this long after the ledger saw a version.
    pub sla: Duration,
}

/// Repair settings.
#[derive(Clone, Debug)]
pub struct Policy {
    pub targets: Vec<TargetSpec>,
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Policy {
    /// The wait after attempt `n` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// One problem of an entity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub target: String,
    pub health: Health,
}

impl Problem {
    /// Bounded reason text: `overdue`, `failed`, `drift`.
    pub fn reason(&self) -> &'static str {
        match self.health {
            Health::Overdue => "overdue",
            Health::Failed => "failed",
            Health::Drifted(_) => "drift",
            Health::Confirmed | Health::Pending => "none",
        }
    }
}

/// The entity's current problems, source first.
pub fn problems(entry: &Entry, policy: &Policy, now_ms: i64) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(d) = entry.drift.get(SOURCE) {
        out.push(Problem { target: SOURCE.to_owned(), health: Health::Drifted(d.kind) });
    }
    for t in &policy.targets {
        let health = entry.health(&t.name, t.sla, now_ms);
        if matches!(health, Health::Overdue | Health::Failed | Health::Drifted(_)) {
            out.push(Problem { target: t.name.clone(), health });
        }
    }
    out
}

/// Whether an entry may leave the ledger: every target confirmed its latest version, nothing
/// is open (drift, repair), and nothing happened to it for `retention`. A later version of it
/// starts a new entry; the sweeps only judge what the ledger holds.
pub fn expired(entry: &Entry, policy: &Policy, retention: Duration, now_ms: i64) -> bool {
    let last = entry.targets.values().map(|t| t.at_ms).chain([entry.seen_at_ms]).max().unwrap_or(0);
    if entry.kind.is_empty() {
        return true; // a ghost (a finding recorded on an entry that had gone): names nothing
    }
    if entry.is_erasure_mark() {
        return now_ms - entry.seen_at_ms > crate::ledger::ERASURE_MEMORY.as_millis() as i64;
    }
    if entry.kind == crate::contact::CONTACT || entry.kind == crate::cursor::CURSOR {
        // A contact mark lives as long as the sink keeps the identity (until the erasure); a
        // cursor as long as the sweep.
        return false;
    }
    if entry.version == 0 {
        // Only outcomes, never their event (e.g. the outcomes of an erasure): once quiet.
        return entry.drift.is_empty() && now_ms - last > retention.as_millis() as i64;
    }
    entry.version > 0
        && entry.repair.is_none()
        && entry.drift.is_empty()
        && now_ms - last > retention.as_millis() as i64
        && policy.targets.iter().all(|t| entry.health(&t.name, t.sla, now_ms) == Health::Confirmed)
}

/// What to do about an entity now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing wrong, or waiting for the backoff / an earlier command.
    Wait,
    /// The problems cleared: the open repair (if any) is closed.
    Resolved { had_repair: bool },
    /// Send this command (the entry's attempt count was raised).
    Send(IntegrationCommand, Problem),
    /// Attempts exhausted: escalate with this reason (recorded in the entry).
    Escalate(Problem, String),
}

/// Decides and records the next step for `entry` (the caller persists it when it changed).
pub fn decide(entry: &mut Entry, policy: &Policy, now_ms: i64) -> Decision {
    decide_with(entry, policy, now_ms, &std::collections::BTreeSet::new())
}

/// [`decide`], with overdue repairs for the `suspended` targets held back (a down or lagging
/// sink: see [`crate::plan`]).
pub fn decide_with(
    entry: &mut Entry,
    policy: &Policy,
    now_ms: i64,
    suspended: &std::collections::BTreeSet<String>,
) -> Decision {
    if entry.kind.is_empty() || entry.is_mark() {
        return Decision::Wait; // nothing a command could name
    }
    let mut found = problems(entry, policy, now_ms);
    let any = !found.is_empty();
    found.retain(|p| !(p.health == Health::Overdue && suspended.contains(&p.target)));
    if any && found.is_empty() {
        return Decision::Wait; // only suspended problems: the repair (if any) stays open
    }
    let Some(problem) = found.into_iter().next() else {
        let had_repair = entry.repair.take().is_some();
        return if had_repair { Decision::Resolved { had_repair } } else { Decision::Wait };
    };
    let permanent = problem.health == Health::Failed
        && entry.targets.get(&problem.target).is_some_and(|t| t.error_class.as_deref() == Some("permanent"));
    let code = entry.targets.get(&problem.target).and_then(|t| t.error_code.clone());
    let repair = entry.repair.get_or_insert_with(Repair::default);
    if repair.escalated.is_some() || now_ms < repair.next_at_ms {
        return Decision::Wait;
    }
    if permanent {
        // The target refused this data (a duplicate rule, a required field): a refetch sends
        // the same data and parks it again. A person fixes it, then replays the dead letter.
        let reason = format!(
            "{} refused the record permanently ({}): fix it upstream, then `reconciler dlq replay`",
            problem.target,
            code.as_deref().unwrap_or("no code")
        );
        repair.escalated = Some(reason.clone());
        return Decision::Escalate(problem, reason);
    }
    if repair.attempts >= policy.max_attempts {
        let mut reason = format!("{} {} after {} attempts", problem.target, describe(problem.health), repair.attempts);
        if let Some(code) = entry.targets.get(&problem.target).and_then(|t| t.error_code.as_ref()) {
            reason.push_str(&format!(" (last error {code})"));
        }
        repair.escalated = Some(reason.clone());
        return Decision::Escalate(problem, reason);
    }
    repair.attempts += 1;
    if repair.attempts == 1 {
        repair.since_ms = now_ms;
    }
    repair.next_at_ms = now_ms + policy.delay(repair.attempts).as_millis() as i64;
    let attempt = repair.attempts;
    let command = command_for(entry, policy, &problem, attempt, now_ms);
    Decision::Send(command, problem)
}

fn describe(health: Health) -> String {
    match health {
        Health::Drifted(kind) => format!("drift ({})", kind.as_str()),
        Health::Overdue => "overdue".into(),
        Health::Failed => "failed".into(),
        Health::Confirmed | Health::Pending => "ok".into(),
    }
}

/// The command that repairs `problem`.
pub fn command_for(entry: &Entry, policy: &Policy, problem: &Problem, attempt: u32, now_ms: i64) -> IntegrationCommand {
    let resend_to = match problem.health {
        Health::Drifted(DriftKind::Missing | DriftKind::Altered) => {
            policy.targets.iter().find(|t| t.name == problem.target).map(|t| t.sink.clone())
        }
        _ => None,
    };
    let key = entry.key();
    let (command_type, target_service, entity_id) = match resend_to {
        Some(sink) => (CommandType::Resend, sink, key.clone()),
        None if entry.kind == "customer" => {
            (CommandType::RefetchCustomer, "order-ingest".into(), entry.entity_id.clone())
        }
        None => (CommandType::RefetchOrder, "order-ingest".into(), entry.entity_id.clone()),
    };
    let version = entry.version.to_string();
    let attempt_text = attempt.to_string();
    IntegrationCommand {
        // Deterministic per (entity, version, attempt): a replayed decision is the same command.
        command_id: elo_events::ids::event_id(&[crate::NAME, &key, &version, &problem.target, &attempt_text]),
        command_type,
        target_service,
        customer_key: entry.customer_key.clone(),
        entity_id,
        store_id: entry.store_id,
        reason: problem.reason().to_owned(),
        requested_by: crate::NAME.to_owned(),
        requested_at: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use elo_events::OutcomeStatus;

    use super::*;
    use crate::ledger::tests::{event, outcome};

    fn policy() -> Policy {
        let t =
            |name: &str| TargetSpec { name: name.into(), sink: format!("{name}-sink"), sla: Duration::from_secs(60) };
        Policy {
            targets: vec![t("salesforce"), t("rdstation")],
            max_attempts: 3,
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(25),
        }
    }

    fn confirmed_order() -> Entry {
        let mut e = Entry::for_event(&event("order", "7", "c:1", 100));
        e.apply_event(&event("order", "7", "c:1", 100), 0);
        e.apply_outcome(&outcome("salesforce", "order", "7", 100, OutcomeStatus::Applied), 10);
        e.apply_outcome(&outcome("rdstation", "order", "7", 100, OutcomeStatus::Applied), 10);
        e
    }

    #[test]
    fn only_settled_quiet_entries_expire() {
        let p = policy();
        let day = Duration::from_secs(86_400);
        let e = confirmed_order();
        assert!(!expired(&e, &p, day, 1_000), "recent");
        assert!(expired(&e, &p, day, 2 * 86_400_000));
        let mut open = e.clone();
        open.flag_drift("salesforce", DriftKind::Missing, 0, 20);
        assert!(!expired(&open, &p, day, 2 * 86_400_000), "drift open");
        let mut unconfirmed = e.clone();
        unconfirmed.targets.remove("rdstation");
        assert!(!expired(&unconfirmed, &p, day, 2 * 86_400_000), "a target never confirmed");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = policy();
        assert_eq!(p.delay(1), Duration::from_secs(10));
        assert_eq!(p.delay(2), Duration::from_secs(20));
        assert_eq!(p.delay(3), Duration::from_secs(25));
        assert_eq!(p.delay(40), Duration::from_secs(25));
    }

    #[test]
    fn a_healthy_entry_needs_nothing() {
        let mut e = confirmed_order();
        assert_eq!(decide(&mut e, &policy(), 1_000_000), Decision::Wait);
        assert!(e.repair.is_none());
    }

    #[test]
    fn an_overdue_order_is_refetched_with_backoff_then_escalated() {
        let p = policy();
        let mut e = Entry::for_event(&event("order", "7", "c:1", 100));
        e.apply_event(&event("order", "7", "c:1", 100), 0);
        assert_eq!(decide(&mut e, &p, 30_000), Decision::Wait, "within the SLA");
        let Decision::Send(first, problem) = decide(&mut e, &p, 61_000) else { panic!("expected a command") };
        assert_eq!(problem, Problem { target: "salesforce".into(), health: Health::Overdue });
        assert_eq!(
            (first.command_type, first.target_service.as_str(), first.entity_id.as_str()),
            (CommandType::RefetchOrder, "order-ingest", "7")
        );
        assert_eq!((first.reason.as_str(), first.store_id, first.customer_key.as_str()), ("overdue", Some(1), "c:1"));
        assert_eq!(decide(&mut e, &p, 70_000), Decision::Wait, "backing off 10 s");
        let Decision::Send(second, _) = decide(&mut e, &p, 71_000) else { panic!("second attempt") };
        assert_ne!(first.command_id, second.command_id, "each attempt is its own command");
        assert_eq!(decide(&mut e, &p, 90_000), Decision::Wait, "backing off 20 s");
        assert!(matches!(decide(&mut e, &p, 91_000), Decision::Send(..)));
        let Decision::Escalate(_, reason) = decide(&mut e, &p, 116_000) else { panic!("escalation") };
        assert_eq!(reason, "salesforce overdue after 3 attempts");
        assert_eq!(decide(&mut e, &p, 500_000), Decision::Wait, "escalated once");
        assert_eq!(e.repair.as_ref().unwrap().escalated.as_deref(), Some(reason.as_str()));
        // The sink catches up: the repair closes, escalation included.
        e.apply_outcome(&outcome("salesforce", "order", "7", 100, OutcomeStatus::Applied), 600_000);
        e.apply_outcome(&outcome("rdstation", "order", "7", 100, OutcomeStatus::Applied), 600_000);
        assert_eq!(decide(&mut e, &p, 600_001), Decision::Resolved { had_repair: true });
        assert!(e.repair.is_none());
    }

    #[test]
    fn a_failure_escalates_with_the_targets_error_code() {
        let p = Policy { max_attempts: 1, ..policy() };
        let mut e = confirmed_order();
        e.apply_event(&event("order", "7", "c:1", 200), 20);
        e.apply_outcome(&outcome("salesforce", "order", "7", 200, OutcomeStatus::DeadLettered), 30);
        e.apply_outcome(&outcome("rdstation", "order", "7", 200, OutcomeStatus::Applied), 30);
        let Decision::Send(c, problem) = decide(&mut e, &p, 40) else { panic!("a command") };
        assert_eq!((c.command_type, c.reason.as_str()), (CommandType::RefetchOrder, "failed"));
        assert_eq!(problem.health, Health::Failed);
        let Decision::Escalate(_, reason) = decide(&mut e, &p, 20_000) else { panic!("escalation") };
        assert_eq!(reason, "salesforce failed after 1 attempts (last error INVALID_FIELD)");
    }

    #[test]
    fn a_permanent_refusal_is_escalated_at_once_without_a_refetch() {
        // A refetch would send the same data and park it again (a duplicate rule refusing a
        // Contact): a person fixes it and replays the dead letter.
        let p = policy();
        let mut e = confirmed_order();
        e.apply_event(&event("order", "7", "c:1", 200), 20);
        let mut refused = outcome("salesforce", "order", "7", 200, OutcomeStatus::DeadLettered);
        refused.error_class = Some("permanent".into());
        refused.error_code = Some("DUPLICATES_DETECTED".into());
        e.apply_outcome(&refused, 30);
        e.apply_outcome(&outcome("rdstation", "order", "7", 200, OutcomeStatus::Applied), 30);
        let Decision::Escalate(problem, reason) = decide(&mut e, &p, 40) else { panic!("escalated at once") };
        assert_eq!(problem.health, Health::Failed);
        assert!(reason.contains("DUPLICATES_DETECTED") && reason.contains("dlq replay"), "{reason}");
        assert_eq!(decide(&mut e, &p, 500_000), Decision::Wait, "no command, ever");
        // The replayed record lands: the repair closes.
        e.apply_outcome(&outcome("salesforce", "order", "7", 200, OutcomeStatus::Applied), 600_000);
        assert_eq!(decide(&mut e, &p, 600_001), Decision::Resolved { had_repair: true });
    }

    #[test]
    fn drift_in_one_target_is_resent_to_its_sink_and_a_lost_webhook_refetched() {
        let p = policy();
        let mut e = confirmed_order();
        e.flag_drift("rdstation", DriftKind::Altered, 0, 50);
        let Decision::Send(c, _) = decide(&mut e, &p, 60) else { panic!("a command") };
        assert_eq!(
            (c.command_type, c.target_service.as_str(), c.entity_id.as_str(), c.reason.as_str()),
            (CommandType::Resend, "rdstation-sink", "order:7", "drift")
        );
        let mut customer = Entry::for_event(&event("customer", "3", "c:3", 100));
        customer.apply_event(&event("customer", "3", "c:3", 100), 0);
        customer.flag_drift(SOURCE, DriftKind::SourceAhead, 200, 10);
        let Decision::Send(c, problem) = decide(&mut customer, &p, 20) else { panic!("a command") };
        assert_eq!(problem.target, "magento");
        assert_eq!((c.command_type, c.entity_id.as_str()), (CommandType::RefetchCustomer, "3"));
    }

    #[test]
    fn a_drift_that_keeps_coming_back_escalates() {
        // Every sweep re-finds it, the RESEND gets an APPLIED that wrote nothing, the drift
        // closes: the attempts must still add up.
        let p = policy();
        let mut e = confirmed_order();
        let mut now = 1_000_000;
        let mut escalated = false;
        for _ in 0..10 {
            now += 600_000;
            e.flag_drift("rdstation", DriftKind::Altered, 0, now);
            match decide(&mut e, &p, now + 1) {
                Decision::Escalate(..) => {
                    escalated = true;
                    break;
                }
                Decision::Send(..) => {}
                other => panic!("unexpected {other:?}"),
            }
            let mut applied = outcome("rdstation", "order", "7", 100, OutcomeStatus::Applied);
            applied.occurred_at = now + 2;
            e.apply_outcome(&applied, now + 3);
            assert_eq!(decide(&mut e, &p, now + 4), Decision::Resolved { had_repair: true });
        }
        assert!(escalated, "a drift repaired in vain over and over ends with a person");
    }

    #[test]
    fn a_ghost_entry_gets_no_command_and_expires() {
        // A sweep's finding recorded on an entry that had gone (no kind, no customer key).
        let p = policy();
        let mut ghost = Entry::default();
        ghost.flag_drift("salesforce", DriftKind::Missing, 0, 10);
        for now in [20, 100_000, 1_000_000] {
            if let Decision::Send(c, _) = decide(&mut ghost, &p, now) {
                panic!("a command for a ghost: {c:?}");
            }
        }
        assert!(expired(&ghost, &p, Duration::from_secs(60), 10_000_000), "a ghost leaves the ledger");
    }

    #[test]
    fn an_entry_whose_event_never_came_expires() {
        // Outcomes only (e.g. of an erasure): version 0 forever.
        let p = policy();
        let mut e = Entry::for_outcome(&outcome("salesforce", "customer", "3", 500, OutcomeStatus::Applied));
        e.apply_outcome(&outcome("salesforce", "customer", "3", 500, OutcomeStatus::Applied), 10);
        let day = Duration::from_secs(86_400);
        assert!(!expired(&e, &p, day, 1_000), "recent: its event may still come");
        assert!(expired(&e, &p, day, 2 * 86_400_000));
    }

    #[test]
    fn an_erasure_mark_gets_no_command_and_leaves_after_a_week() {
        let p = policy();
        let mut mark = Entry::erasure_mark("c:9", 500, 1_000);
        assert_eq!(decide(&mut mark, &p, 10_000_000), Decision::Wait);
        assert!(!expired(&mark, &p, Duration::from_secs(60), 10_000_000), "kept past the retention");
        assert!(expired(&mark, &p, Duration::from_secs(60), 1_001 + crate::ledger::ERASURE_MEMORY.as_millis() as i64));
    }
}
