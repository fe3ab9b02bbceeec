//! Incremental poll of `GET /V1/orders` and `GET /V1/customers/search` by `updated_at`: the
//! safety net under push, and the engine of the backfill command.
//!
//! Paging is keyset on the pair (`updated_at`, id), expressed in Magento's searchCriteria as
//! `updated_at >= T` AND (`updated_at > T` OR `entity_id > X`) sorted by both, always page 1.
//! Every page starts strictly after the last entity read, so a round advances whatever the
//! number of entities sharing one second (a mass status change, an import), an entity updated
//! mid-round (it moves to the end) cannot push an unread one out of reach, and Magento's
//! "a page past the end repeats the last page" never comes into play.
//!
//! A round has a budget of `max_pages` searches, spent in two steps:
//! 1. **Head**: versions after the checkpoint's head (the last entity read). A round cut by the
//!    budget saves the head and says `more`, so long catch-ups checkpoint as they go.
//! 2. **Overlap**: the window `overlap` behind the head is re-read for late commits (Magento's
//!    naive timestamps and concurrent transactions make them real) and for a second version
//!    saved in the same second. This re-read is resumable too: its position is saved, so a
//!    window holding several budgets' worth is covered over several rounds, and new versions
//!    still go first in each round.
//!
//! Versions published inside the window are remembered by their event id (which names the
//! content), so the overlap costs reads, not duplicates. The checkpoint only moves past what
//! the broker acknowledged.

mod checkpoint;
#[cfg(test)]
pub(crate) mod tests;

use std::time::Duration;

use serde_json::Value;
use sha2::Digest;
use tracing::Instrument;

pub use checkpoint::{Checkpoint, Keyset, MAX_SEEN};

use crate::normalize::{NormalizeError, Stores, customer_event, order_event};
use crate::push::{DeadLetter, PublishError, Publisher};

/// What a poll reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Entity {
    Orders,
    Customers,
}

impl Entity {
    /// Field holding the id in search results (`entity_id` for orders, `id` for customers).
    pub fn id_field(self) -> &'static str {
        match self {
            Self::Orders => "entity_id",
            Self::Customers => "id",
        }
    }

    /// Checkpoint key of a store's poll (orders keep the bare store code).
    pub fn checkpoint_key(self, store_code: &str) -> String {
        match self {
            Self::Orders => store_code.to_owned(),
            Self::Customers => format!("customers/{store_code}"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Customers => "customers",
        }
    }
}

/// One page of a keyset search: the entities and Magento's `total_count`.
pub trait EntitySearch: Send + Sync {
    /// The first `page_size` entities of store view `store_id` strictly after `after` in
    /// (`updated_at`, id) order, sorted by both, and how many entities are after `after`.
    fn page_after(
        &self,
        entity: Entity,
        store_id: i64,
        after: Keyset,
        page_size: usize,
    ) -> impl Future<Output = Result<(Vec<Value>, usize), String>> + Send;
}

/// Why a round stopped early (its progress so far is kept).
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("magento search failed: {0}")]
    Source(String),
    #[error("publish failed: {0}")]
    Publish(#[from] PublishError),
}

/// Outcome of one round.
#[derive(Debug, PartialEq)]
pub struct Round {
    pub checkpoint: Checkpoint,
    pub published: usize,
    pub skipped_invalid: usize,
    /// The round stopped at `max_pages` with new versions still to read.
    pub more: bool,
}

/// What one round is asked to do.
#[derive(Clone, Debug)]
pub struct RoundSpec {
    pub entity: Entity,
    pub store_id: i64,
    /// Window re-read behind the head (zero: no re-read, as in a backfill).
    pub overlap: Duration,
    pub page_size: usize,
    pub max_pages: usize,
}

/// Progress after each page: entities handled so far and Magento's count at the round's start.
pub type Progress<'a> = &'a mut (dyn FnMut(usize, usize) + Send);

/// Which position a scan moves.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    Head,
    Overlap,
}

/// Runs one poll round. On error, returns the checkpoint as far as it got.
pub async fn poll_once<S: EntitySearch, P: Publisher>(
    search: &S,
    publisher: &P,
    stores: &Stores,
    spec: &RoundSpec,
    start: &Checkpoint,
    progress: Progress<'_>,
) -> (Round, Option<PollError>) {
    let overlap_ms = spec.overlap.as_millis() as i64;
    let mut scan = Scan {
        search,
        publisher,
        stores,
        spec,
        progress,
        round: Round { checkpoint: start.clone(), published: 0, skipped_invalid: 0, more: false },
        pages_left: spec.max_pages.max(1),
        initial_total: None,
    };
    let head = scan.round.checkpoint.head();
    match scan.run(head, Step::Head).await {
        Err(error) => return (scan.round, Some(error)),
        Ok(false) => scan.round.more = true,
        Ok(true) if overlap_ms > 0 && scan.pages_left > 0 => {
            let c = &scan.round.checkpoint;
            let window = Keyset::new((c.cursor_ms - overlap_ms).max(c.recheck_floor_ms), 0);
            let from = c.recheck.map_or(window, |at| at.max(window));
            match scan.run(from, Step::Overlap).await {
                Err(error) => return (scan.round, Some(error)),
                // Re-reading is background work: the rest waits for the next round.
                Ok(false) => {}
                Ok(true) => scan.round.checkpoint.recheck = None,
            }
        }
        Ok(true) => {}
    }
    scan.round.checkpoint.prune(overlap_ms);
    (scan.round, None)
}

/// One round's state while it reads pages.
struct Scan<'a, 'p, S, P> {
    search: &'a S,
    publisher: &'a P,
    stores: &'a Stores,
    spec: &'a RoundSpec,
    progress: Progress<'p>,
    round: Round,
    pages_left: usize,
    initial_total: Option<usize>,
}

impl<S: EntitySearch, P: Publisher> Scan<'_, '_, S, P> {
    /// Reads pages after `at` until the end (`Ok(true)`) or the budget (`Ok(false)`).
    async fn run(&mut self, mut at: Keyset, step: Step) -> Result<bool, PollError> {
        let (entity, page_size) = (self.spec.entity, self.spec.page_size.max(1));
        // Magento keeps whole seconds: "after 10.5 s" is "from 11 s", which the search can say.
        if at.updated_at_ms.rem_euclid(1000) != 0 {
            at = Keyset::new(at.updated_at_ms.div_euclid(1000) * 1000 + 1000, 0);
        }
        while self.pages_left > 0 {
            self.pages_left -= 1;
            let (items, total) =
                self.search.page_after(entity, self.spec.store_id, at, page_size).await.map_err(PollError::Source)?;
            let initial_total = *self.initial_total.get_or_insert(total);
            let end = items.is_empty() || items.len() >= total;
            let mut entries: Vec<(Keyset, Value)> = Vec::with_capacity(items.len());
            for item in items {
                let ts = item.get("updated_at").and_then(Value::as_str).and_then(crate::normalize::parse_magento_time);
                match (ts, item.get(entity.id_field()).and_then(Value::as_i64)) {
                    (Some(ts), Some(id)) => entries.push((Keyset::new(ts, id), item)),
                    _ => self.round.skipped_invalid += 1,
                }
            }
            entries.sort_by_key(|(key, _)| *key);
            let before = at;
            for (key, item) in entries {
                if key <= at {
                    continue; // a search that ignores the keyset must not make us go back
                }
                self.handle(key, &item).await?;
                at = key;
                self.round.checkpoint.advance(key);
                if step == Step::Overlap {
                    self.round.checkpoint.recheck = Some(key);
                }
            }
            let done = self.round.published + self.round.skipped_invalid;
            (self.progress)(done, initial_total.max(done));
            if end {
                return Ok(true);
            }
            if at == before {
                // Nothing usable after the position: going on would read the same page forever.
                return Err(PollError::Source(format!(
                    "a search page after ({}, {}) held no entity with a readable updated_at and id",
                    before.updated_at_ms, before.id
                )));
            }
        }
        Ok(false)
    }

    /// Publishes one version (or parks it in the DLQ) unless it was already handled.
    async fn handle(&mut self, key: Keyset, item: &Value) -> Result<(), PollError> {
        let entity = self.spec.entity;
        let event = match entity {
            Entity::Orders => order_event(item, None, self.stores, crate::now_ms()),
            Entity::Customers => customer_event(item, self.stores, crate::now_ms()),
        };
        let version = match &event {
            Ok(event) => version_key(event.event_id.as_bytes()),
            Err(_) => version_key(&serde_json::to_vec(item).unwrap_or_default()),
        };
        if self.round.checkpoint.seen.contains(&(key.updated_at_ms, version)) {
            return Ok(());
        }
        match event {
            Ok(event) => {
                // One trace per polled version: its span's context becomes the record's
                // `traceparent`, so the sinks' work on it joins the same trace.
                let span = tracing::info_span!("poll_publish", entity = entity.as_str(), entity_id = key.id);
                self.publisher.publish_owned(event).instrument(span).await?;
                self.round.published += 1;
            }
            Err(error) => {
                // Parked in the DLQ with its error, then remembered as handled: a broken
                // record is reported once per version, not every round.
                tracing::warn!(entity = entity.as_str(), id = key.id, error = %error, "dead-lettered: not a valid payload");
                let letter = DeadLetter {
                    source: format!("magento-poll/{}", entity.as_str()),
                    entity_id: key.id.to_string(),
                    payload: dead_letter_payload(entity, key, item, &error),
                    code: "invalid_payload",
                    message: error.to_string(),
                };
                let span = tracing::info_span!("poll_dead_letter", entity = entity.as_str(), entity_id = key.id);
                self.publisher.dead_letter(&letter).instrument(span).await?;
                metrics::INVALID.with_label_values(&[entity.as_str()]).inc();
                self.round.skipped_invalid += 1;
            }
        }
        self.round.checkpoint.seen.insert((key.updated_at_ms, version));
        Ok(())
    }
}

/// What an operator needs to find and fix a record, without copying the person into the DLQ:
/// the entity, its version, the error and the field in question as Magento sent it.
fn dead_letter_payload(entity: Entity, key: Keyset, item: &Value, error: &NormalizeError) -> Vec<u8> {
    let field = error.field();
    let fields = serde_json::json!({ field: item.get(field).cloned().unwrap_or(Value::Null) });
    let payload = serde_json::json!({
        "entity": entity.as_str(),
        "entity_id": key.id,
        "updated_at": crate::normalize::format_magento_time(key.updated_at_ms),
        "error": error.to_string(),
        "fields": fields,
    });
    serde_json::to_vec(&payload).expect("plain data serialises")
}

/// 64 bits of SHA-256: the event id names the version's content, so equal keys mean the same
/// version (a collision among the few thousand versions of one second is ~1e-12).
fn version_key(bytes: &[u8]) -> u64 {
    let digest = sha2::Sha256::digest(bytes);
    u64::from_be_bytes(digest[..8].try_into().expect("32-byte digest"))
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntCounterVec, register_int_counter_vec};

    pub(super) static INVALID: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "order_ingest_poll_invalid_total",
            "Polled records that could not become events (parked in the DLQ), by entity.",
            &["entity"]
        )
        .expect("metric registers once")
    });
}
