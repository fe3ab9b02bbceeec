//! What the sink confirmed per entity (`order:<entity_id>`, `customer:<key>`): the source
//! version Salesforce holds and the Salesforce ids written. The service keeps it in an
//! [`elo_kafka::StateStore`] (compacted changelog co-partitioned with `commerce.events`,
//! restored when a partition is assigned), so after a restart a replayed older version is
//! still skipped and an erasure still finds the person's records by id. Tests and benches
//! without a broker use the in-memory variant.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use elo_events::{CommerceEvent, ConsentStatus, InventoryStatus};
use elo_kafka::StateStore;
use serde::{Deserialize, Serialize};

/// What Salesforce holds for one entity, as far as the sink confirmed it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmed {
    /// Source `updated_at` (for customers: when the customer data was true).
    pub version: i64,
    /// Enrichment rank at that version ([`enrichment_rank`]): order-ingest's late-enrichment
    /// follow-up carries the same version with a higher rank and must win over the first.
    #[serde(default)]
    pub rank: u8,
    /// Salesforce ids by object (`Account`, `Contact`, `Order`).
    #[serde(default)]
    pub target_ids: BTreeMap<String, String>,
    /// For a customer key: the key whose Account and Contact this person already has in
    /// Salesforce (a guest who registered later: same e-mail, second key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// A `RESEND` found Salesforce no longer holding what was confirmed (deleted or changed
    /// behind Elo's back): the next event at exactly this version is written once more
    /// instead of being taken for a redelivery. Older versions stay skipped and the version
    /// (an erasure's floor included) is kept, so a late duplicate can never win.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rewrite: bool,
    /// For a customer key: a digest of the customer data written at `version` (the Account
    /// and Contact fields). A later order whose customer data has the same digest leaves
    /// those nodes out (a repeat buyer costs the order's nodes only); 0: unknown.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub digest: u64,
    /// When (wall clock, ms) `digest` was last confirmed by a write that carried the customer
    /// nodes: the skip holds only for `ELO_SALESFORCE_CUSTOMER_REWRITE_AFTER` after it, so an
    /// Account or Contact changed behind Elo's back is rewritten by the next order after that.
    /// 0: never (state from before it existed: one full write first).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub digest_at: i64,
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Confirmed {
    pub fn at(&self) -> (i64, u8) {
        (self.version, self.rank)
    }
}

/// How complete an event's enrichment is: one point for a checked stock status, one for a
/// known consent. order-ingest publishes an order past its enrichment budget `UNCHECKED` /
/// `UNKNOWN` and the result later with the same source version, so within one version the
/// more enriched event is the newer one.
pub fn enrichment_rank(e: &CommerceEvent) -> u8 {
    let checked = e.order.as_ref().is_some_and(|o| o.inventory_status != InventoryStatus::Unchecked);
    let consent = e.customer.as_ref().is_some_and(|c| c.consent.status != ConsentStatus::Unknown);
    u8::from(checked) + u8::from(consent)
}

/// Where confirmations live.
pub enum Confirmations {
    /// Per process, for tests and benches without a broker.
    Memory(Mutex<HashMap<(i32, String), Confirmed>>),
    /// The service's: a changelog-backed store.
    Store(Arc<StateStore<Confirmed>>),
}

impl Confirmations {
    pub fn memory() -> Self {
        Self::Memory(Mutex::default())
    }

    pub fn get(&self, partition: i32, key: &str) -> Option<Confirmed> {
        match self {
            Self::Memory(map) => map.lock().expect("confirmed lock").get(&(partition, key.to_owned())).cloned(),
            Self::Store(store) => store.get(partition, key),
        }
    }

    /// Writes (to the changelog, acknowledged, for the store) before the records are reported done.
    pub async fn put(&self, partition: i32, key: &str, value: Confirmed) -> Result<(), elo_kafka::Error> {
        match self {
            Self::Memory(map) => {
                map.lock().expect("confirmed lock").insert((partition, key.to_owned()), value);
                Ok(())
            }
            Self::Store(store) => store.put(partition, key, value).await,
        }
    }

    /// Restores a partition (store only), from `Handler::on_partition_start`.
    pub async fn restore(&self, partition: i32) -> Result<usize, elo_kafka::Error> {
        match self {
            Self::Memory(_) => Ok(0),
            Self::Store(store) => store.restore_async(partition).await,
        }
    }

    /// Forgets a revoked partition.
    pub fn release(&self, partition: i32) {
        match self {
            Self::Memory(map) => map.lock().expect("confirmed lock").retain(|(p, _), _| *p != partition),
            Self::Store(store) => store.release(partition),
        }
    }
}
