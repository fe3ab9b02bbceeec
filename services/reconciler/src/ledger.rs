//! The ledger entry of one order or customer and its pure transitions: what the source said
//! last (`commerce.events`), what each target confirmed (`integration.outcomes`), what the
//! sweeps found, and where its repair stands. No I/O here: [`crate::store`] keeps the entries
//! in the state store and [`crate::repair`] decides what to do about them.
//!
//! Keys are `order:<entity_id>` and `customer:<entity_id>` (the `source_version` both topics
//! carry), so an event and the outcomes about it meet on one key whatever order they arrive
//! in: the two topics are co-partitioned by customer key, so both land in the same partition.

use std::collections::BTreeMap;
use std::time::Duration;

use elo_events::{CommerceEvent, CommerceEventType, InventoryStatus, OutcomeStatus, SyncOutcome};
use serde::{Deserialize, Serialize};

/// The ledger key of a source entity.
pub fn key(entity_type: &str, entity_id: &str) -> String {
    format!("{entity_type}:{entity_id}")
}

/// The `kind` of an erasure mark: the entry `erased:<customer key>` a `CUSTOMER_ERASED`
/// leaves behind, so the outcomes of the erasure itself, late versions from before it and
/// sweep findings about the person's orders do not bring entries (and target ids) back.
pub const ERASED: &str = "erased";

/// How long an erasure mark is kept (longer than any sweep window or replayed backlog).
pub const ERASURE_MEMORY: Duration = Duration::from_secs(7 * 86_400);

/// How long a drift repaired by a RESEND is remembered: if it comes back within this time the
/// earlier attempts still count, so a repair that only *looks* applied ends in an escalation.
pub const REDRIFT_MEMORY: Duration = Duration::from_secs(86_400);

/// The key of a customer key's erasure mark.
pub fn erased_key(customer_key: &str) -> String {
    key(ERASED, customer_key)
}

/// Whether an erasure mark hides news of `version` (at or before the erasure), or, for
/// a sweep finding (`None`), anything while the mark lives.
pub fn erasure_hides(mark: Option<&Entry>, version: Option<i64>) -> bool {
    mark.is_some_and(|m| m.kind == ERASED && version.is_none_or(|v| v <= m.version))
}

/// What a target holds for one entity, as its sink reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Source version (`updated_at`) of the last outcome.
    pub version: i64,
    /// The last outcome was DEAD_LETTERED (the version is parked in the sink's DLQ).
    pub failed: bool,
    /// Bounded error code of a failure, e.g. `DUPLICATES_DETECTED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Error class of a failure (`permanent`, `transient`, ...): a permanent one is not
    /// repaired by sending the same data again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    /// When the outcome was read, Unix ms.
    pub at_ms: i64,
    /// Ids the target assigned, by role (`order`, `contact_uuid`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ids: BTreeMap<String, String>,
}

/// Drift a sweep found, per target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// The target lacks a record it confirmed (deleted behind Elo's back).
    Missing,
    /// The target's record differs from what Elo wrote (edited behind Elo's back).
    Altered,
    /// The source holds a newer version than any event Elo saw (a lost webhook).
    SourceAhead,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Altered => "altered",
            Self::SourceAhead => "source_ahead",
        }
    }
}

/// A drift finding, kept until the repair is confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub kind: DriftKind,
    /// When the sweep found it, Unix ms.
    pub found_ms: i64,
    /// For `SourceAhead`: the version the source holds.
    #[serde(default)]
    pub version: i64,
}

/// Where an entity's repair stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repair {
    /// Commands sent so far for the current problem.
    pub attempts: u32,
    /// Not before this (Unix ms) is the next command sent.
    pub next_at_ms: i64,
    /// When the first command for this problem went out.
    pub since_ms: i64,
    /// Attempts are exhausted: a person must look (the reason says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalated: Option<String>,
}

/// The ledger entry of one order or customer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `order` or `customer` (the source version's entity type).
    pub kind: String,
    pub entity_id: String,
    pub customer_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<i32>,
    /// Latest source version seen on `commerce.events` (0: only outcomes seen so far).
    pub version: i64,
    /// When the ledger first saw `version`, Unix ms: the SLA clock starts here.
    pub seen_at_ms: i64,
    /// The order was flagged oversold by order-ingest's inventory check.
    #[serde(default)]
    pub oversold: bool,
    /// What each target confirmed, by target name.
    #[serde(default)]
    pub targets: BTreeMap<String, Target>,
    /// Open drift findings, by target name (`magento` for the source).
    #[serde(default)]
    pub drift: BTreeMap<String, Drift>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<Repair>,
    /// A contact mark's print of the contact rdstation-sink writes (see [`crate::contact`]).
    /// Entity entries of earlier releases carry an older print here, which nothing reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<crate::contact::ContactPrint>,
    /// Attempts spent on drift repairs that closed recently, by target (see [`REDRIFT_MEMORY`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redrift: BTreeMap<String, Redrift>,
}

/// The attempts a closed drift repair spent, remembered until `until_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redrift {
    pub attempts: u32,
    pub until_ms: i64,
}

/// The state of one entity in one target, at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// The target holds the latest source version.
    Confirmed,
    /// Not confirmed yet, within the SLA.
    Pending,
    /// Not confirmed within the SLA.
    Overdue,
    /// The latest version is parked in the sink's DLQ.
    Failed,
    /// A sweep found the target (or the source) differs from what the ledger says.
    Drifted(DriftKind),
}

/// What an applied record changed, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// Drift findings the record closed, by (target, kind).
    pub repaired: Vec<(String, DriftKind)>,
}

impl Entry {
    fn new(kind: &str, entity_id: &str, customer_key: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            entity_id: entity_id.to_owned(),
            customer_key: customer_key.to_owned(),
            ..Self::default()
        }
    }

    /// Names the entity if the entry does not yet (an entry made by a sweep).
    fn identify(&mut self, v: &elo_events::SourceVersion) {
        if self.kind.is_empty() {
            self.kind.clone_from(&v.entity_type);
            self.entity_id.clone_from(&v.entity_id);
        }
    }

    /// A new entry for an event's entity.
    pub fn for_event(event: &CommerceEvent) -> Self {
        let v = &event.source_version;
        Self::new(&v.entity_type, &v.entity_id, &event.customer_key)
    }

    /// The erasure mark of an erased customer key (`version`: the erasure's source version).
    pub fn erasure_mark(customer_key: &str, version: i64, now_ms: i64) -> Self {
        Self { version, seen_at_ms: now_ms, ..Self::new(ERASED, customer_key, customer_key) }
    }

    /// Whether this entry is an erasure mark rather than an entity.
    pub fn is_erasure_mark(&self) -> bool {
        self.kind == ERASED
    }

    /// Whether this entry is a mark (erasure, contact, sweep cursor) rather than an entity:
    /// no command names it and no figure counts it.
    pub fn is_mark(&self) -> bool {
        [ERASED, crate::contact::CONTACT, crate::cursor::CURSOR].contains(&self.kind.as_str())
    }

    /// A new entry for an outcome's entity (the outcome came first).
    pub fn for_outcome(outcome: &SyncOutcome) -> Self {
        let v = &outcome.source_version;
        Self::new(&v.entity_type, &v.entity_id, &outcome.customer_key)
    }

    /// Folds a source event in. Older versions change nothing (the ledger tracks the latest).
    pub fn apply_event(&mut self, event: &CommerceEvent, now_ms: i64) -> Effect {
        let mut effect = Effect::default();
        let v = event.source_version.updated_at;
        self.identify(&event.source_version);
        self.store_id = Some(event.store.store_id);
        self.customer_key.clone_from(&event.customer_key);
        if let Some(order) = &event.order
            && v >= self.version
        {
            self.oversold = order.inventory_status == InventoryStatus::Oversold;
        }
        if v > self.version {
            self.version = v;
            self.seen_at_ms = now_ms;
        }
        if let Some(d) = self.drift.get("magento")
            && d.kind == DriftKind::SourceAhead
            && self.version >= d.version
        {
            effect.repaired.push(("magento".to_owned(), DriftKind::SourceAhead));
            self.drift.remove("magento");
        }
        effect
    }

    /// Folds a sink's outcome in. A target's record only moves forward, except that a newer
    /// outcome of the same version replaces the older one (a failure then a success).
    pub fn apply_outcome(&mut self, outcome: &SyncOutcome, now_ms: i64) -> Effect {
        let mut effect = Effect::default();
        let v = outcome.source_version.updated_at;
        self.identify(&outcome.source_version);
        if self.customer_key.is_empty() {
            self.customer_key.clone_from(&outcome.customer_key);
        }
        let failed = match outcome.status {
            OutcomeStatus::Applied | OutcomeStatus::SkippedStale => false,
            OutcomeStatus::DeadLettered => true,
            OutcomeStatus::Unknown => return effect,
        };
        let target = self.targets.entry(outcome.target.clone()).or_default();
        if v < target.version || (v == target.version && failed && !target.failed && target.at_ms > 0) {
            // Older news, or a late failure of a version the target already confirmed.
            return effect;
        }
        target.version = v;
        target.failed = failed;
        target.error_code = if failed { outcome.error_code.clone() } else { None };
        target.error_class = if failed { outcome.error_class.clone() } else { None };
        target.at_ms = now_ms;
        if !outcome.target_ids.is_empty() {
            target.ids.clone_from(&outcome.target_ids);
        }
        // A confirmation the sink made after a sweep found the record drifted is the repair
        // landing (one it made before, read late, is not).
        if !failed
            && let Some(d) = self.drift.get(&outcome.target)
            && d.kind != DriftKind::SourceAhead
            && outcome.occurred_at >= d.found_ms
        {
            effect.repaired.push((outcome.target.clone(), d.kind));
            self.drift.remove(&outcome.target);
            let attempts = self.repair.as_ref().map_or(0, |r| r.attempts);
            let until_ms = now_ms + REDRIFT_MEMORY.as_millis() as i64;
            self.redrift.insert(outcome.target.clone(), Redrift { attempts, until_ms });
        }
        effect
    }

    /// The entity's health in `target` at `now_ms`, given the target's SLA.
    pub fn health(&self, target: &str, sla: Duration, now_ms: i64) -> Health {
        if let Some(d) = self.drift.get(target) {
            return Health::Drifted(d.kind);
        }
        if self.version == 0 {
            // Only outcomes seen so far: the event is still on its way to the ledger.
            return Health::Pending;
        }
        match self.targets.get(target) {
            Some(t) if t.version >= self.version && t.failed => Health::Failed,
            Some(t) if t.version >= self.version => Health::Confirmed,
            _ if now_ms - self.seen_at_ms > sla.as_millis() as i64 => Health::Overdue,
            _ => Health::Pending,
        }
    }

    /// Records a sweep finding; returns false when it was already known.
    pub fn flag_drift(&mut self, target: &str, kind: DriftKind, version: i64, now_ms: i64) -> bool {
        if self.drift.get(target).is_some_and(|d| d.kind == kind && d.version >= version) {
            return false;
        }
        self.drift.insert(target.to_owned(), Drift { kind, found_ms: now_ms, version });
        // The same drift again soon after a RESEND "repaired" it: the attempts carry over.
        self.redrift.retain(|_, r| r.until_ms > now_ms);
        if kind != DriftKind::SourceAhead
            && self.repair.is_none()
            && let Some(r) = self.redrift.get(target).filter(|r| r.attempts > 0)
        {
            self.repair = Some(Repair { attempts: r.attempts, next_at_ms: now_ms, since_ms: now_ms, escalated: None });
        }
        true
    }

    /// The ledger key of this entry.
    pub fn key(&self) -> String {
        key(&self.kind, &self.entity_id)
    }
}

/// Whether an event erases its customer (every entry of that customer key goes).
pub fn is_erasure(event: &CommerceEvent) -> bool {
    event.event_type == CommerceEventType::CustomerErased
}

#[cfg(test)]
pub(crate) mod tests {
    use elo_events::{SourceVersion, StoreRef};

    use super::*;

    pub(crate) fn event(kind: &str, id: &str, key: &str, version: i64) -> CommerceEvent {
        let mut e = elo_events::sample::order_placed(1);
        e.source_version = SourceVersion { entity_type: kind.into(), entity_id: id.into(), updated_at: version };
        e.customer_key = key.into();
        e.store = StoreRef { store_id: 1, store_code: None, website_id: None };
        if kind == "customer" {
            e.event_type = CommerceEventType::CustomerChanged;
            e.order = None;
        }
        e
    }

    pub(crate) fn outcome(target: &str, kind: &str, id: &str, version: i64, status: OutcomeStatus) -> SyncOutcome {
        SyncOutcome {
            outcome_id: "o".into(),
            sink: format!("{target}-sink"),
            target: target.into(),
            event_id: "e".into(),
            customer_key: "c:1".into(),
            source_version: SourceVersion { entity_type: kind.into(), entity_id: id.into(), updated_at: version },
            status,
            error_class: None,
            error_code: (status == OutcomeStatus::DeadLettered).then(|| "INVALID_FIELD".to_owned()),
            target_ids: BTreeMap::new(),
            attempts: 1,
            latency_ms: 5,
            occurred_at: 0,
        }
    }

    const SLA: Duration = Duration::from_secs(60);

    #[test]
    fn an_event_then_its_outcome_is_confirmed_and_late_news_changes_nothing() {
        let mut e = Entry::for_event(&event("order", "7", "c:1", 100));
        e.apply_event(&event("order", "7", "c:1", 100), 1_000);
        assert_eq!(e.key(), "order:7");
        assert_eq!(e.health("salesforce", SLA, 2_000), Health::Pending);
        assert_eq!(e.health("salesforce", SLA, 62_000), Health::Overdue, "past the SLA");
        e.apply_outcome(&outcome("salesforce", "order", "7", 100, OutcomeStatus::Applied), 3_000);
        assert_eq!(e.health("salesforce", SLA, 100_000), Health::Confirmed);
        assert_eq!(e.health("rdstation", SLA, 100_000), Health::Overdue, "each target on its own");
        // An older event and an older outcome change nothing.
        e.apply_event(&event("order", "7", "c:1", 50), 4_000);
        e.apply_outcome(&outcome("salesforce", "order", "7", 50, OutcomeStatus::DeadLettered), 4_000);
        assert_eq!((e.version, e.seen_at_ms), (100, 1_000));
        assert_eq!(e.health("salesforce", SLA, 100_000), Health::Confirmed);
        // A newer version restarts the clock.
        e.apply_event(&event("order", "7", "c:1", 200), 90_000);
        assert_eq!(e.health("salesforce", SLA, 100_000), Health::Pending);
        assert_eq!(e.health("salesforce", SLA, 151_000), Health::Overdue);
    }

    #[test]
    fn outcomes_may_come_before_their_event() {
        let o = outcome("rdstation", "customer", "3", 100, OutcomeStatus::Applied);
        let mut e = Entry::for_outcome(&o);
        e.apply_outcome(&o, 1_000);
        assert_eq!(e.health("rdstation", SLA, 1_000_000), Health::Pending, "no event yet: nothing to judge");
        e.apply_event(&event("customer", "3", "c:1", 100), 2_000);
        assert_eq!(e.health("rdstation", SLA, 1_000_000), Health::Confirmed);
    }

    #[test]
    fn a_dead_lettered_version_is_failed_until_a_success_replaces_it() {
        let mut e = Entry::default();
        e.apply_event(&event("order", "7", "c:1", 100), 0);
        e.apply_outcome(&outcome("salesforce", "order", "7", 100, OutcomeStatus::DeadLettered), 10);
        assert_eq!(e.health("salesforce", SLA, 20), Health::Failed);
        assert_eq!(e.targets["salesforce"].error_code.as_deref(), Some("INVALID_FIELD"));
        e.apply_outcome(&outcome("salesforce", "order", "7", 100, OutcomeStatus::Applied), 30);
        assert_eq!(e.health("salesforce", SLA, 40), Health::Confirmed);
        // A stale redelivery of the old failure does not undo the success.
        e.apply_outcome(&outcome("salesforce", "order", "7", 100, OutcomeStatus::DeadLettered), 50);
        assert_eq!(e.health("salesforce", SLA, 60), Health::Confirmed);
        // SKIPPED_STALE confirms: the target holds something newer.
        e.apply_event(&event("order", "7", "c:1", 150), 70);
        e.apply_outcome(&outcome("salesforce", "order", "7", 150, OutcomeStatus::SkippedStale), 80);
        assert_eq!(e.health("salesforce", SLA, 90), Health::Confirmed);
    }

    #[test]
    fn drift_lasts_until_the_target_confirms_again() {
        let mut e = Entry::default();
        e.apply_event(&event("order", "7", "c:1", 100), 0);
        e.apply_outcome(&outcome("salesforce", "order", "7", 100, OutcomeStatus::Applied), 10);
        assert!(e.flag_drift("salesforce", DriftKind::Missing, 0, 20));
        assert!(!e.flag_drift("salesforce", DriftKind::Missing, 0, 30), "found once");
        assert_eq!(e.health("salesforce", SLA, 40), Health::Drifted(DriftKind::Missing));
        let late = outcome("salesforce", "order", "7", 100, OutcomeStatus::Applied);
        assert!(e.apply_outcome(&late, 45).repaired.is_empty(), "made before the finding: not the repair");
        let repair = SyncOutcome { occurred_at: 48, ..late };
        let effect = e.apply_outcome(&repair, 50);
        assert_eq!(effect.repaired, vec![("salesforce".to_owned(), DriftKind::Missing)]);
        assert_eq!(e.health("salesforce", SLA, 60), Health::Confirmed);
    }

    #[test]
    fn a_source_ahead_of_the_ledger_is_repaired_by_the_newer_event() {
        let mut e = Entry::default();
        e.apply_event(&event("order", "7", "c:1", 100), 0);
        assert!(e.flag_drift("magento", DriftKind::SourceAhead, 200, 10));
        assert_eq!(e.health("magento", SLA, 20), Health::Drifted(DriftKind::SourceAhead));
        assert!(e.apply_event(&event("order", "7", "c:1", 150), 30).repaired.is_empty(), "still behind");
        let effect = e.apply_event(&event("order", "7", "c:1", 200), 40);
        assert_eq!(effect.repaired, vec![("magento".to_owned(), DriftKind::SourceAhead)]);
        assert!(e.drift.is_empty());
    }

    #[test]
    fn entries_survive_the_changelog_round_trip() {
        let mut e = Entry::for_event(&event("order", "7", "c:1", 100));
        e.apply_event(&event("order", "7", "c:1", 100), 1);
        e.apply_outcome(&outcome("salesforce", "order", "7", 100, OutcomeStatus::Applied), 2);
        e.flag_drift("rdstation", DriftKind::Altered, 0, 3);
        e.repair = Some(Repair { attempts: 1, next_at_ms: 9, since_ms: 3, escalated: None });
        let json = serde_json::to_vec(&e).unwrap();
        assert_eq!(serde_json::from_slice::<Entry>(&json).unwrap(), e);
    }

    #[test]
    fn an_erasure_mark_hides_the_erasures_outcomes_and_older_news_only() {
        let mark = Entry::erasure_mark("c:9", 500, 1_000);
        assert!(mark.is_erasure_mark());
        assert_eq!(mark.key(), erased_key("c:9"));
        assert!(erasure_hides(Some(&mark), Some(500)), "the erasure's own outcome");
        assert!(erasure_hides(Some(&mark), Some(400)), "a late older version");
        assert!(!erasure_hides(Some(&mark), Some(600)), "the key's life after the erasure");
        assert!(erasure_hides(Some(&mark), None), "sweep findings while the mark lives");
        assert!(!erasure_hides(None, None));
        let plain = Entry::for_event(&event("customer", "9", "c:9", 100));
        assert!(!erasure_hides(Some(&plain), None), "only marks hide");
    }

    #[test]
    fn a_drift_found_again_soon_keeps_its_attempts() {
        let mut e = Entry::for_event(&event("order", "7", "c:1", 100));
        e.apply_event(&event("order", "7", "c:1", 100), 0);
        e.flag_drift("rdstation", DriftKind::Altered, 0, 1_000);
        e.repair = Some(Repair { attempts: 2, next_at_ms: 0, since_ms: 1_000, escalated: None });
        let mut applied = outcome("rdstation", "order", "7", 100, OutcomeStatus::Applied);
        applied.occurred_at = 2_000;
        assert_eq!(e.apply_outcome(&applied, 2_000).repaired, vec![("rdstation".to_owned(), DriftKind::Altered)]);
        e.repair = None; // the check closes it
        e.flag_drift("rdstation", DriftKind::Altered, 0, 3_000);
        assert_eq!(e.repair.as_ref().map(|r| r.attempts), Some(2), "the attempts carry over");
        // Long after, a new drift starts afresh.
        e.drift.clear();
        e.repair = None;
        e.flag_drift("rdstation", DriftKind::Altered, 0, 3_000 + REDRIFT_MEMORY.as_millis() as i64 + 1);
        assert!(e.repair.is_none());
    }
}
