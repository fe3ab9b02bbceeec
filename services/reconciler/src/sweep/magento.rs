//! The Magento window sweep: orders updated in the window that the ledger lacks.

use std::sync::atomic::Ordering;

use order_ingest::poll::{Entity, EntitySearch, Keyset};

use super::{Sweeps, partition_for};
use crate::ledger::{DriftKind, Entry};
use crate::repair::SOURCE;
use crate::store::{CommandSink, Ledger, now_ms};

/// Whether Magento's version of an entity is newer than anything the ledger saw.
pub fn source_ahead(entry: Option<&Entry>, magento_version: i64) -> bool {
    entry.is_none_or(|e| e.version < magento_version)
}

impl Sweeps {
    /// One Magento round from `resume` (a round cut by its budget resumes there next time).
    /// Returns where to resume, `None` when the window was covered.
    pub async fn magento_round<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        resume: Option<(usize, Keyset)>,
    ) -> Option<(usize, Keyset)> {
        let (source, budget) = self.magento.as_ref()?;
        let now = now_ms();
        let until = now - self.args.grace.as_millis() as i64;
        let (mut store_index, mut after) =
            resume.unwrap_or((0, Keyset::new(now - self.args.magento_window.as_millis() as i64, 0)));
        let mut spent = 0;
        let mut suspects: Vec<(String, i32, i64, elo_events::CommerceEvent)> = Vec::new();
        let stores = &self.args.magento_store_ids;
        while store_index < stores.len() {
            let store_id = stores[store_index];
            if !budget.spend(&mut spent).await {
                budget.round("partial");
                return Some((store_index, after));
            }
            let items = match source.page_after(Entity::Orders, store_id, after, self.args.magento_page_size).await {
                Ok((items, _)) => items,
                Err(error) => {
                    tracing::warn!(error = %error, store_id, "magento sweep: search failed; next round resumes here");
                    budget.round("failed");
                    return Some((store_index, after));
                }
            };
            let mut reached_grace = items.len() < self.args.magento_page_size;
            for item in &items {
                let Ok(event) = order_ingest::normalize::order_event(item, None, &Default::default(), 0) else {
                    continue; // order-ingest parks those itself
                };
                let version = event.source_version.updated_at;
                if version > until {
                    reached_grace = true;
                    break;
                }
                after = Keyset::new(version, event.order.as_ref().map_or(0, |o| o.entity_id));
                budget.checked(1);
                let partition = partition_for(&event.customer_key, self.partitions);
                if !ledger.partitions().contains(&partition) {
                    continue; // another replica's
                }
                let key = crate::ledger::key("order", &event.source_version.entity_id);
                if source_ahead(ledger.store.get(partition, &key).as_ref(), version) {
                    suspects.push((key, partition, version, event));
                }
            }
            if reached_grace {
                store_index += 1;
                after = Keyset::new(now - self.args.magento_window.as_millis() as i64, 0);
            }
        }
        let names: Vec<String> = suspects.iter().map(|(k, _, v, _)| format!("{k}@{v}")).collect();
        let confirmed = self.magento_suspects.confirm(&names, self.args.grace.as_millis() as i64, now_ms());
        for (key, partition, version, event) in suspects {
            if !confirmed.contains(&format!("{key}@{version}"))
                || !source_ahead(ledger.store.get(partition, &key).as_ref(), version)
            {
                continue;
            }
            let found = ledger
                .flag(partition, &key, SOURCE, DriftKind::SourceAhead, version, || Some(Entry::for_event(&event)))
                .await;
            match found {
                Ok(true) => {
                    budget.progress.found.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(error = %error, key, "magento sweep: cannot record drift"),
            }
        }
        budget.round("complete");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::event;

    #[test]
    fn magento_is_ahead_when_the_ledger_lacks_the_version() {
        let mut e = Entry::for_event(&event("order", "7", "c:1", 100));
        e.apply_event(&event("order", "7", "c:1", 100), 0);
        assert!(source_ahead(None, 100), "an order the ledger never saw");
        assert!(source_ahead(Some(&e), 101), "a change whose webhook was lost");
        assert!(!source_ahead(Some(&e), 100));
        assert!(!source_ahead(Some(&e), 90));
    }
}
