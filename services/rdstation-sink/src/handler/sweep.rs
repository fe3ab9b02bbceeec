//! The sweeps between batches: new rules applied to every contact of the assigned partitions,
//! and the contact writes the budgets deferred, landed.
//!
//! The sweep is the contact writer under a backlog, so it keeps the account budget busy: while
//! one contact is written (under its partition's lock), the budget for the next one is already
//! being reserved. A cell the budget offers while nobody waits for it is lost (burst of one).

use std::sync::atomic::Ordering;

use futures::future::maybe_done;

use super::{Sink, Write, now_ms};
use crate::client::RdClient;
use crate::contacts;

/// A contact the sweep will write, with the budget reserved for it.
struct Reserved {
    partition: i32,
    key: String,
    client: RdClient,
}

impl Sink {
    /// Brings every contact of the assigned partitions in line with the rules in use (after a
    /// reload), one customer at a time between batches. Returns (contacts changed, failures).
    pub async fn apply_rules(&self) -> (usize, usize) {
        self.sweep(false).await
    }

    /// Lands the contacts whose write the budgets deferred. When it has gone through them
    /// all, batches may write contacts themselves again (when the budget has room).
    pub async fn flush_deferred(&self) -> (usize, usize) {
        let result = self.sweep(true).await;
        self.contact_backlog.store(false, Ordering::Release);
        result
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
        let mut upcoming = targets.into_iter();
        let mut next = upcoming.next().map(|(p, k)| Box::pin(maybe_done(self.reserve_for(p, k, only_deferred))));
        while let Some(mut reserving) = next.take() {
            reserving.as_mut().await;
            let target = reserving.as_mut().take_output().expect("the reservation is done");
            // The next contact's budget is reserved while this one is written.
            next = upcoming.next().map(|(p, k)| Box::pin(maybe_done(self.reserve_for(p, k, only_deferred))));
            let land = self.land(target, only_deferred);
            let landed = match next.as_mut() {
                Some(reserving) => futures::join!(land, reserving.as_mut()).0,
                None => land.await,
            };
            match landed {
                Some(true) => changed += 1,
                Some(false) => failed += 1,
                None => {}
            }
        }
        (changed, failed)
    }

    /// Reserves the budget the contact's write will take, before the partition's lock, so the
    /// partition's batches do not wait while the sweep waits for the budget; only for a
    /// contact that will be written now (not one whose per-contact budget is spent, nor one a
    /// 429 told to wait).
    async fn reserve_for(&self, partition: i32, key: String, only_deferred: bool) -> Reserved {
        let client = self.client.reserving();
        if let Some(peek) = self.customers.get(partition, &key)
            && (!only_deferred || peek.deferred)
            && !peek.identity.email.is_empty()
        {
            let now = now_ms();
            let window = self.budget.window.as_millis() as i64;
            let recent = peek.writes_ms.iter().filter(|t| now - **t < window).count();
            let aggregate = peek.aggregate(now);
            let desired = contacts::desired(&peek, &aggregate, &self.rules().evaluate(&aggregate));
            if recent < self.budget.per_contact && peek.contact_writable(now) {
                for _ in 0..contacts::planned_requests(&peek, &desired) {
                    client.reserve().await;
                }
            }
        }
        Reserved { partition, key, client }
    }

    /// Writes one contact under its partition's lock: `Some(true)` written, `Some(false)`
    /// failed (tried again later), `None` nothing to do or still deferred.
    async fn land(&self, target: Reserved, only_deferred: bool) -> Option<bool> {
        let Reserved { partition, key, client } = target;
        let lock = self.partition_lock(partition);
        let _guard = lock.lock().await;
        if !self.restored.lock().expect("restored lock").contains(&partition) {
            return None;
        }
        let Some(state) = self.customers.get(partition, &key) else {
            self.deferred.lock().expect("deferred lock").remove(&(partition, key));
            return None;
        };
        if only_deferred && !state.deferred {
            return None;
        }
        let now = now_ms();
        if state.identity.email.is_empty()
            || !only_deferred && crate::dry_run::changes(&state, &self.rules(), now).is_empty()
        {
            return None;
        }
        match self.settle(partition, &key, state, now, Write::Sweep(&client)).await {
            Ok(()) if self.customers.get(partition, &key).is_some_and(|s| s.deferred) => None,
            Ok(()) => Some(true),
            Err(error) => {
                tracing::warn!(partition, key, error = %error, "rules sweep could not update a contact; will retry");
                Some(false)
            }
        }
    }
}
