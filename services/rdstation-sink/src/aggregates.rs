//! Per-customer state kept in the [`elo_kafka::StateStore`] (one entry per customer key): who
//! the customer is, the facts of each order (so a replayed event changes nothing), the RD
//! contact it maps to, and what the sink last wrote there. Aggregates (recency, frequency,
//! monetary, SKUs, stores, region, consent) are derived from it on demand.
//!
//! Orders are kept by entity id with their latest source version: an older version of an order
//! never overwrites a newer one, and frequency counts each order once however often it comes.

use std::collections::{BTreeMap, BTreeSet};

use elo_events::{CommerceEvent, ConsentStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Order statuses that do not count as a purchase.
const NOT_PURCHASES: &[&str] = &["canceled", "cancelled", "closed"];
const DAY_MS: i64 = 86_400_000;

/// Who the customer is, from the newest event that said so.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub email: String,
    pub customer_id: Option<i64>,
    pub is_guest: bool,
    pub firstname: Option<String>,
    pub lastname: Option<String>,
    pub phone: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub country: Option<String>,
    /// `granted`, `declined` or `unknown`.
    pub consent: String,
    pub legal_basis: Option<String>,
    /// Source `updated_at` this identity came from.
    pub version: i64,
}

/// What one order contributes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderFacts {
    pub increment_id: String,
    pub status: String,
    /// Grand total in ten-thousandths (`Decimal4` unscaled).
    pub total: i64,
    pub created_at: i64,
    pub store: Option<String>,
    pub skus: Vec<String>,
    pub version: i64,
}

/// What the sink last wrote to the contact, so unchanged state is not written again.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub fields: Map<String, Value>,
    pub tags: BTreeSet<String>,
    pub stage: Option<String>,
    /// Tags Elo itself added to the contact (it lacked them): the only ones Elo removes when
    /// no rule asks for them any more. Tags the contact had already, from marketers or other
    /// tools, are never Elo's, even when a rule asks for them too.
    #[serde(default)]
    pub owned_tags: BTreeSet<String>,
}

/// The state store value of one customer key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerState {
    pub identity: Identity,
    pub orders: BTreeMap<String, OrderFacts>,
    /// RD contact uuid, once known: an e-mail change then updates the same contact.
    pub contact_uuid: Option<String>,
    pub applied: Applied,
    /// When the contact was written in the last day (the per-contact budget).
    #[serde(default)]
    pub writes_ms: Vec<i64>,
    /// A write is due but the per-contact budget was spent: the periodic sweep lands the
    /// latest state once the window has room.
    #[serde(default)]
    pub deferred: bool,
    /// Set by `CUSTOMER_ERASED` (its `occurred_at`), in place of everything else the state
    /// held: an event that happened before the erasure and arrives after it (late, replayed)
    /// must not bring the person back into RD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erased_at_ms: Option<i64>,
    /// RD answered the contact's write with 429 and a `Retry-After`: the write is deferred
    /// (the sweep lands it) and not tried before this time, while the customer's events flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_not_before_ms: Option<i64>,
    /// RD refused (4xx) the contact as Elo wanted it then: that contact's fingerprint
    /// ([`crate::contacts::fingerprint`]). The same contact is not sent again (not by a batch,
    /// not by a sweep) until something changes it: new data or new rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
    /// Only on a partition's rules marker ([`crate::handler::RULES_MARKER`]): the fingerprint
    /// ([`crate::rules::Rules::fingerprint`]) of the rules last applied to every contact of
    /// the partition, so a pass cut short by a restart or a rebalance is run after the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_applied: Option<u64>,
}

/// Whether an event changed the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Applied,
    /// Older than what the state holds.
    Stale,
}

impl CustomerState {
    /// The erasure floor left for a customer erased at `at_ms`.
    pub fn erased(at_ms: i64) -> Self {
        Self { erased_at_ms: Some(at_ms), ..Self::default() }
    }

    /// Whether `event` belongs to the person before they were erased (and must be ignored):
    /// it happened before the erasure, or it is about an order created before it (an order
    /// shipped, cancelled or refunded after the erasure is still the erased person's).
    pub fn before_erasure(&self, event: &CommerceEvent) -> bool {
        self.erased_at_ms.is_some_and(|floor| {
            event.occurred_at <= floor || event.order.as_ref().is_some_and(|o| o.created_at <= floor)
        })
    }

    /// Whether the contact may be written at `now_ms` (no 429 asked to wait past it).
    pub fn contact_writable(&self, now_ms: i64) -> bool {
        self.contact_not_before_ms.is_none_or(|t| now_ms >= t)
    }

    /// When the contact may be written next (never before `now_ms`): once its per-contact
    /// budget (`per_contact` writes in any `window_ms`) has room and no 429 asks to wait.
    pub fn writable_at(&self, per_contact: usize, window_ms: i64, now_ms: i64) -> i64 {
        let per_contact = per_contact.max(1);
        let mut recent: Vec<i64> = self.writes_ms.iter().copied().filter(|t| now_ms - t < window_ms).collect();
        recent.sort_unstable();
        // The write that must leave the window for the count to drop below the budget.
        let budget = if recent.len() >= per_contact { recent[recent.len() - per_contact] + window_ms } else { now_ms };
        budget.max(self.contact_not_before_ms.unwrap_or(now_ms)).max(now_ms)
    }

    /// Folds one event in; idempotent (the same event twice is the same as once).
    pub fn apply(&mut self, event: &CommerceEvent) -> Change {
        let version = event.source_version.updated_at;
        let mut changed = false;
        if let Some(customer) = &event.customer
            && version >= self.identity.version
        {
            let address = event.order.as_ref().and_then(|o| o.billing_address.clone().or(o.shipping_address.clone()));
            let id = &mut self.identity;
            id.email = elo_events::ids::normalise_email(&customer.email);
            id.customer_id = customer.customer_id;
            id.is_guest = customer.is_guest;
            merge_name(&mut id.firstname, &mut id.lastname, customer.firstname.clone(), customer.lastname.clone());
            let phone = customer.phone.clone().or_else(|| address.as_ref().and_then(|a| a.telephone.clone()));
            id.phone = phone.or(id.phone.take());
            if let Some(a) = address {
                id.city = a.city.or(id.city.take());
                id.state = a.region_code.or(a.region).or(id.state.take());
                id.country = a.country_id.or(id.country.take());
            }
            id.consent = match customer.consent.status {
                ConsentStatus::Granted => "granted",
                ConsentStatus::Declined => "declined",
                ConsentStatus::Unknown => "unknown",
            }
            .into();
            id.legal_basis = customer.consent.legal_basis.clone();
            id.version = version;
            changed = true;
        }
        if let Some(order) = &event.order {
            let key = order.entity_id.to_string();
            let newer = self.orders.get(&key).is_none_or(|o| version >= o.version);
            if newer {
                let skus = order
                    .items
                    .iter()
                    .filter(|i| i.parent_item_id.is_none())
                    .map(|i| i.sku.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                self.orders.insert(
                    key,
                    OrderFacts {
                        increment_id: order.increment_id.clone(),
                        status: order.status.clone(),
                        total: order.totals.grand_total.unscaled(),
                        created_at: order.created_at,
                        store: event.store.store_code.clone(),
                        skus,
                        version,
                    },
                );
                changed = true;
            }
        }
        if changed || event.order.is_none() && event.customer.is_none() { Change::Applied } else { Change::Stale }
    }

    /// The aggregates rules are evaluated on, at `now_ms`.
    pub fn aggregate(&self, now_ms: i64) -> Aggregate {
        let purchases: Vec<&OrderFacts> =
            self.orders.values().filter(|o| !NOT_PURCHASES.contains(&o.status.as_str())).collect();
        let last = purchases.iter().map(|o| o.created_at).max();
        let last_order = self.orders.values().max_by_key(|o| (o.created_at, o.increment_id.clone()));
        Aggregate {
            frequency: purchases.len() as u64,
            monetary: purchases.iter().map(|o| o.total).sum::<i64>() as f64 / 10_000.0,
            recency_days: last.map(|t| ((now_ms - t).max(0) / DAY_MS) as u64),
            skus: purchases.iter().flat_map(|o| o.skus.iter().cloned()).collect(),
            stores: purchases.iter().filter_map(|o| o.store.clone()).collect(),
            region: self.identity.state.clone(),
            country: self.identity.country.clone(),
            consent: if self.identity.consent.is_empty() { "unknown".into() } else { self.identity.consent.clone() },
            guest: self.identity.is_guest,
            last_order_id: last_order.map(|o| o.increment_id.clone()),
        }
    }
}

/// The contact's name-merge rule: a customer block's first and last name replace the held
/// ones part by part, and a part the block omits keeps its earlier value. Generic so the
/// reconciler's RD sweep folds its fingerprints of the parts by this very rule (it must expect
/// exactly the name this sink writes).
pub fn merge_name<T>(first: &mut Option<T>, last: &mut Option<T>, block_first: Option<T>, block_last: Option<T>) {
    if let Some(f) = block_first {
        *first = Some(f);
    }
    if let Some(l) = block_last {
        *last = Some(l);
    }
}

/// A customer's aggregates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Aggregate {
    /// Orders that count as purchases (not cancelled or closed).
    pub frequency: u64,
    /// Sum of their grand totals, in the order currency.
    pub monetary: f64,
    /// Whole days since the last purchase (`None` without one).
    pub recency_days: Option<u64>,
    pub skus: BTreeSet<String>,
    pub stores: BTreeSet<String>,
    pub region: Option<String>,
    pub country: Option<String>,
    pub consent: String,
    pub guest: bool,
    pub last_order_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use elo_events::sample;

    use super::*;

    #[test]
    fn a_contact_over_its_budget_is_writable_when_its_oldest_counted_write_leaves_the_window() {
        let state = CustomerState { writes_ms: vec![5_000, 1_000, 3_000], ..CustomerState::default() };
        // 3 per 10 s: full until the oldest (1 s) leaves at 11 s.
        assert_eq!(state.writable_at(3, 10_000, 6_000), 11_000);
        // 4 per 10 s: room now.
        assert_eq!(state.writable_at(4, 10_000, 6_000), 6_000);
        // 2 per 10 s: the second oldest (3 s) must leave too.
        assert_eq!(state.writable_at(2, 10_000, 6_000), 13_000);
        // A 429's wait counts too, and writes out of the window do not.
        let waiting = CustomerState { contact_not_before_ms: Some(20_000), ..state };
        assert_eq!(waiting.writable_at(3, 10_000, 6_000), 20_000);
        assert_eq!(waiting.writable_at(3, 10_000, 30_000), 30_000);
    }

    #[test]
    fn replays_and_stale_versions_change_nothing() {
        let mut state = CustomerState::default();
        let placed = sample::order_placed(1);
        assert_eq!(state.apply(&placed), Change::Applied);
        let once = state.clone();
        state.apply(&placed);
        assert_eq!(state, once, "a replay is harmless");
        assert_eq!(state.aggregate(placed.occurred_at).frequency, 1);

        let mut cancelled = placed.clone();
        cancelled.source_version.updated_at += 10;
        cancelled.order.as_mut().unwrap().status = "canceled".into();
        state.apply(&cancelled);
        assert_eq!(state.aggregate(0).frequency, 0, "a cancelled order is no purchase");
        assert_eq!(state.apply(&placed), Change::Stale, "the older version does not come back");
        assert_eq!(state.aggregate(0).frequency, 0);
    }

    #[test]
    fn aggregates_sum_orders_and_measure_recency() {
        let mut state = CustomerState::default();
        let a = sample::order_placed(0);
        let mut b = sample::order_placed(97);
        b.customer_key = a.customer_key.clone();
        state.apply(&a);
        state.apply(&b);
        let total = (a.order.as_ref().unwrap().totals.grand_total.unscaled()
            + b.order.as_ref().unwrap().totals.grand_total.unscaled()) as f64
            / 10_000.0;
        let now = b.order.as_ref().unwrap().created_at + 3 * DAY_MS + 5;
        let agg = state.aggregate(now);
        assert_eq!(agg.frequency, 2);
        assert!((agg.monetary - total).abs() < 1e-9);
        assert_eq!(agg.recency_days, Some(3));
        assert_eq!(agg.region.as_deref(), Some("SP"));
        assert_eq!(state.identity.email, "customer0@example.com");
    }

    #[test]
    fn an_erasure_floor_marks_older_events_and_survives_the_changelog() {
        let older = sample::order_placed(0);
        let mut newer = sample::order_placed(1);
        newer.customer_key = older.customer_key.clone();
        let floor = CustomerState::erased(older.occurred_at);
        assert!(floor.before_erasure(&older));
        assert!(!floor.before_erasure(&newer));
        // An order placed before the erasure and shipped (updated) after it is still the erased
        // person's: it must not recreate the contact.
        let mut shipped = older.clone();
        shipped.occurred_at = older.occurred_at + DAY_MS;
        shipped.source_version.updated_at = shipped.occurred_at;
        shipped.order.as_mut().unwrap().status = "complete".into();
        assert!(shipped.order.as_ref().unwrap().created_at <= older.occurred_at);
        assert!(floor.before_erasure(&shipped), "an order created before the erasure stays erased");
        // A customer event (no order) after the floor is a new registration.
        let mut registered = newer.clone();
        registered.order = None;
        registered.occurred_at = older.occurred_at + DAY_MS;
        assert!(!floor.before_erasure(&registered));
        assert!(floor.identity.email.is_empty() && floor.orders.is_empty() && floor.contact_uuid.is_none());
        let bytes = serde_json::to_vec(&floor).unwrap();
        let back: CustomerState = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.erased_at_ms, Some(older.occurred_at));
        // States written before the floor existed read as never erased.
        let plain = serde_json::to_vec(&CustomerState::default()).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("erased_at_ms"));
        assert!(!serde_json::from_slice::<CustomerState>(&plain).unwrap().before_erasure(&older));
    }
}
