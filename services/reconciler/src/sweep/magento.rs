//! The Magento window sweep: orders updated in the window that the ledger lacks.

use std::sync::atomic::Ordering;

use order_ingest::normalize::parse_magento_time;
use order_ingest::poll::{Entity, EntitySearch, Keyset};

use super::{Sweeps, partition_for};
use crate::ledger::{DriftKind, Entry};
use crate::repair::SOURCE;
use crate::store::{CommandSink, Ledger, now_ms};

/// Whether Magento's version of an entity is newer than anything the ledger saw.
pub fn source_ahead(entry: Option<&Entry>, magento_version: i64) -> bool {
    entry.is_none_or(|e| e.version < magento_version)
}

/// What one page of the window holds: the orders up to `until` (normalised), where the
/// keyset cursor ends up, and whether the page reached the grace period or the store's end.
#[derive(Debug, Default)]
pub(super) struct PageScan {
    pub(super) events: Vec<elo_events::CommerceEvent>,
    pub(super) after: Option<Keyset>,
    pub(super) reached_grace: bool,
}

/// Scans one page. The cursor moves on every item's raw `updated_at` / `entity_id`, also past
/// orders that do not normalise (order-ingest parks those itself), so a page of them cannot
/// hold the sweep in place.
pub(super) fn scan_page(items: &[serde_json::Value], page_size: usize, until: i64) -> PageScan {
    let mut scan = PageScan { reached_grace: items.len() < page_size, ..PageScan::default() };
    for item in items {
        let raw_version = item.get("updated_at").and_then(serde_json::Value::as_str).and_then(parse_magento_time);
        let raw_id = item.get("entity_id").and_then(serde_json::Value::as_i64);
        if raw_version.is_some_and(|v| v > until) {
            scan.reached_grace = true;
            break;
        }
        let event = order_ingest::normalize::order_event(item, None, &Default::default(), 0).ok();
        let version = raw_version.or(event.as_ref().map(|e| e.source_version.updated_at));
        if let Some(version) = version {
            if version > until {
                scan.reached_grace = true;
                break;
            }
            let id = raw_id.or(event.as_ref().and_then(|e| e.order.as_ref().map(|o| o.entity_id))).unwrap_or(0);
            scan.after = Some(Keyset::new(version, id));
        }
        scan.events.extend(event);
    }
    scan
}

impl Sweeps {
    /// One Magento round from `resume` (a round cut by its budget resumes there next time).
    /// Returns where to resume, `None` when the window was covered. What a round found is
    /// judged even when the round was cut short (see [`super::Suspects::merge`]).
    pub async fn magento_round<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        resume: Option<(usize, Keyset)>,
    ) -> Option<(usize, Keyset)> {
        let (source, budget) = self.magento.as_ref()?;
        if !budget.set_share(ledger.held_count(), self.partitions) {
            return resume; // nothing held here: another replica's turn
        }
        let now = now_ms();
        let until = now - self.args.grace.as_millis() as i64;
        let window_start = now - self.args.magento_window.as_millis() as i64;
        let (mut store_index, mut after) = resume.unwrap_or((0, Keyset::new(window_start, 0)));
        let mut spent = 0;
        let mut suspects: Vec<(String, i32, i64, elo_events::CommerceEvent)> = Vec::new();
        let stores = &self.args.magento_store_ids;
        let mut resume_at = None;
        while store_index < stores.len() {
            let store_id = stores[store_index];
            if !budget.spend(&mut spent).await {
                budget.round("partial");
                resume_at = Some((store_index, after));
                break;
            }
            let items = match source.page_after(Entity::Orders, store_id, after, self.args.magento_page_size).await {
                Ok((items, _)) => items,
                Err(error) => {
                    tracing::warn!(error = %error, store_id, "magento sweep: search failed; next round resumes here");
                    budget.round("failed");
                    resume_at = Some((store_index, after));
                    break;
                }
            };
            let scan = scan_page(&items, self.args.magento_page_size, until);
            if let Some(next) = scan.after {
                after = next;
            }
            for event in scan.events {
                let version = event.source_version.updated_at;
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
            if scan.reached_grace {
                store_index += 1;
                after = Keyset::new(window_start, 0);
            }
        }
        let names: Vec<String> = suspects.iter().map(|(k, _, v, _)| format!("{k}@{v}")).collect();
        let horizon = self.args.magento_window.as_millis() as i64;
        let confirmed = self.magento_suspects.merge(&names, self.args.grace.as_millis() as i64, horizon, now_ms());
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
        if resume_at.is_none() {
            budget.round("complete");
        }
        resume_at
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

    #[test]
    fn the_cursor_moves_past_orders_that_do_not_normalise() {
        let bad = |id: i64, at: &str| serde_json::json!({"entity_id": id, "updated_at": at});
        let items = vec![bad(10, "2026-11-01 00:00:01"), bad(11, "2026-11-01 00:00:02")];
        let until = parse_magento_time("2026-11-01 01:00:00").unwrap();
        let scan = scan_page(&items, 2, until);
        assert!(scan.events.is_empty());
        assert_eq!(scan.after, Some(Keyset::new(parse_magento_time("2026-11-01 00:00:02").unwrap(), 11)));
        assert!(!scan.reached_grace, "a full page: more may follow");
        let late = vec![bad(12, "2026-11-01 02:00:00")];
        let scan = scan_page(&late, 2, until);
        assert!(scan.reached_grace && scan.after.is_none());
    }
}
