//! The sweeps between batches: new rules applied to every contact of the assigned partitions,
//! and the contact writes the budgets deferred, landed.

use super::{Sink, now_ms};
use crate::contacts;

impl Sink {
    /// Brings every contact of the assigned partitions in line with the rules in use (after a
    /// reload), one customer at a time between batches. Returns (contacts changed, failures).
    pub async fn apply_rules(&self) -> (usize, usize) {
        self.sweep(false).await
    }

    /// Lands the contacts whose write waited for the per-contact budget.
    pub async fn flush_deferred(&self) -> (usize, usize) {
        self.sweep(true).await
    }

    async fn sweep(&self, only_deferred: bool) -> (usize, usize) {
        let targets: Vec<(i32, String)> = if only_deferred {
            self.deferred.lock().expect("deferred lock").iter().cloned().collect()
        } else {
            let partitions: Vec<i32> = self.restored.lock().expect("restored lock").iter().copied().collect();
            partitions
                .into_iter()
                .flat_map(|p| self.customers.entries(p).into_iter().map(move |(k, _)| (p, k)))
                .collect()
        };
        let (mut changed, mut failed) = (0, 0);
        for (partition, key) in targets {
            // Cells reserved for the previous customer and not used would add up to a burst.
            self.client.forfeit_reserved();
            // The budget is taken before the partition's lock, so the partition's batches do
            // not wait while the sweep waits for the budget; only for a contact that will be
            // written now (not one whose per-contact budget is spent).
            if let Some(peek) = self.customers.get(partition, &key)
                && (!only_deferred || peek.deferred)
                && !peek.identity.email.is_empty()
            {
                let now = now_ms();
                let window = self.budget.window.as_millis() as i64;
                let recent = peek.writes_ms.iter().filter(|t| now - **t < window).count();
                let aggregate = peek.aggregate(now);
                let desired = contacts::desired(&peek, &aggregate, &self.rules().evaluate(&aggregate));
                if recent < self.budget.per_contact {
                    for _ in 0..contacts::planned_requests(&peek, &desired) {
                        self.client.reserve().await;
                    }
                }
            }
            let lock = self.partition_lock(partition);
            let _guard = lock.lock().await;
            if !self.restored.lock().expect("restored lock").contains(&partition) {
                continue;
            }
            let Some(state) = self.customers.get(partition, &key) else {
                self.deferred.lock().expect("deferred lock").remove(&(partition, key));
                continue;
            };
            if only_deferred && !state.deferred {
                continue;
            }
            let now = now_ms();
            if state.identity.email.is_empty()
                || !only_deferred && crate::dry_run::changes(&state, &self.rules(), now).is_empty()
            {
                continue;
            }
            match self.settle(partition, &key, state, now, true).await {
                Ok(()) if self.customers.get(partition, &key).is_some_and(|s| s.deferred) => {}
                Ok(()) => changed += 1,
                Err(error) => {
                    failed += 1;
                    tracing::warn!(partition, key, error = %error, "rules sweep could not update a contact; will retry");
                }
            }
        }
        self.client.forfeit_reserved();
        (changed, failed)
    }
}
