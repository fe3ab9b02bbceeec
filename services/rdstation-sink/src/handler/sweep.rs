//! The sweeps between batches: new rules applied to every contact of the assigned partitions,
//! and the contact writes the budgets deferred, landed.
//!
//! The sweep is the contact writer under a backlog, so it keeps the account budget busy: while
//! one contact is written (under its partition's lock), the budget for the next one is already
//! being reserved. Under the lock it never waits for the budget: a contact needing more
//! requests than were reserved for it (a batch changed it meanwhile) takes only slots free at
//! that instant, else stays deferred.
//!
//! A contact is only tried when it is due: its per-contact budget has room, a 429's wait is
//! over, and after a transient failure its backoff ran out (a contact not due is neither
//! written nor its state rewritten). A contact RD refused (4xx) is recorded in its state with
//! an outcome (`DEAD_LETTERED`, class `permanent`, RD's code) and not tried again until its
//! data or the rules change it.

use std::sync::atomic::Ordering;

use futures::future::maybe_done;

use elo_events::{OutcomeStatus, SourceVersion, SyncOutcome};
use elo_kafka::{ErrorClass, HandlerError};
use tracing::Instrument;

use super::{Deferral, RULES_MARKER, Sink, Write, is_marker, kafka_failure, now_ms};
use crate::aggregates::CustomerState;
use crate::client::RdClient;
use crate::contacts;

/// Backoff of a contact whose sweep write failed transiently: 10 s, doubling, at most 10 min.
pub(crate) fn backoff_ms(failures: u32) -> i64 {
    (10_000i64 << failures.saturating_sub(1).min(6)).min(600_000)
}

/// A contact for the sweep, and whether only a deferred write of it is landed.
type Target = (i32, String, bool);

/// How often a rules pass lands the deferred writes that came due meanwhile: a pass over
/// every contact at the account's budget can take hours, and a contact deferred after the
/// pass walked past it must not wait for its end.
const FLUSH_DURING_PASS: std::time::Duration = std::time::Duration::from_secs(1);

/// The order a sweep works its contacts in: a deferred-writes pass its due contacts; a rules
/// pass every contact, with the deferred writes due at the time put first every
/// [`FLUSH_DURING_PASS`].
struct Walk {
    queue: std::collections::VecDeque<Target>,
    /// When a rules pass last took the due deferred writes in (`None`: not a rules pass).
    flushed: Option<std::time::Instant>,
    /// Deferred writes taken in and not worked yet: taken in again they would pile up (every
    /// second, all of them, while they land at the budget's pace).
    queued: std::collections::HashSet<(i32, String)>,
}

impl Walk {
    fn deferred(due: Vec<(i32, String)>) -> Self {
        let queue = due.into_iter().map(|(p, k)| (p, k, true)).collect();
        Self { queue, flushed: None, queued: Default::default() }
    }

    fn rules_pass(targets: impl IntoIterator<Item = (i32, String)>, now: std::time::Instant) -> Self {
        let queue = targets.into_iter().map(|(p, k)| (p, k, false)).collect();
        Self { queue, flushed: Some(now), queued: Default::default() }
    }

    fn next(&mut self, now: std::time::Instant, due: impl FnOnce() -> Vec<(i32, String)>) -> Option<Target> {
        if let Some(flushed) = self.flushed
            && now.duration_since(flushed) >= FLUSH_DURING_PASS
            && !self.queue.is_empty()
        {
            self.flushed = Some(now);
            let fresh: Vec<(i32, String)> = due().into_iter().filter(|t| !self.queued.contains(t)).collect();
            for (p, k) in fresh.into_iter().rev() {
                self.queued.insert((p, k.clone()));
                self.queue.push_front((p, k, true));
            }
        }
        let next = self.queue.pop_front()?;
        if next.2 {
            self.queued.remove(&(next.0, next.1.clone()));
        }
        Some(next)
    }
}

/// A contact the sweep will write, with the budget reserved for it.
struct Reserved {
    partition: i32,
    key: String,
    client: RdClient,
}

impl Sink {
    /// Brings every contact of the assigned partitions in line with the rules in use (after a
    /// reload), one customer at a time between batches. Returns (contacts changed, failures).
    /// A contact that failed transiently is deferred (the deferred-writes pass retries it with
    /// backoff), so one pass is enough.
    ///
    /// It covers the partitions pending a pass ([`Sink::rules_changed`], or restored with a
    /// marker naming other rules); each partition's marker records the rules once the pass
    /// went through it, so a pass a restart or rebalance cut short is run again.
    pub async fn apply_rules(&self) -> (usize, usize) {
        let partitions: Vec<i32> = self.rules_pending.lock().expect("rules pending lock").drain().collect();
        let fingerprint = self.rules().fingerprint();
        let targets = partitions.iter().flat_map(|&p| {
            self.customers.entries(p).into_iter().filter(|(k, _)| !is_marker(k)).map(move |(k, _)| (p, k))
        });
        let result = self.sweep(Walk::rules_pass(targets, std::time::Instant::now())).await;
        for partition in partitions {
            let lock = self.partition_lock(partition);
            let _guard = lock.lock().await;
            // Revoked meanwhile (the changelog is its new owner's now), or revoked and restored
            // again (pending again: the next pass records it).
            if !self.restored.lock().expect("restored lock").contains(&partition)
                || self.rules_pending.lock().expect("rules pending lock").contains(&partition)
            {
                continue;
            }
            // Rules reloaded during the pass: this pass applied the older ones, and the next
            // one (pending already) records the new.
            if self.rules().fingerprint() != fingerprint {
                continue;
            }
            let marker = CustomerState { rules_applied: Some(fingerprint), ..CustomerState::default() };
            if let Err(error) = self.customers.put(partition, RULES_MARKER, marker).await {
                // Without the marker a restore runs the pass again: harmless.
                tracing::warn!(partition, error = %error, "cannot record the rules applied to the partition");
            }
        }
        result
    }

    /// New rules: every restored partition needs a pass.
    pub fn rules_changed(&self) {
        let restored = self.restored.lock().expect("restored lock").clone();
        self.rules_pending.lock().expect("rules pending lock").extend(restored);
    }

    /// Whether some partition waits for a rules pass.
    pub fn rules_pending(&self) -> bool {
        !self.rules_pending.lock().expect("rules pending lock").is_empty()
    }

    /// Lands the contacts whose write the budgets deferred. When it has gone through them
    /// all, batches may write contacts themselves again (when the budget has room).
    pub async fn flush_deferred(&self) -> (usize, usize) {
        let result = self.sweep(Walk::deferred(self.due_deferred())).await;
        self.contact_backlog.store(false, Ordering::Release);
        result
    }

    /// The deferred contacts whose write is due now.
    fn due_deferred(&self) -> Vec<(i32, String)> {
        let now = now_ms();
        let deferred = self.deferred.lock().expect("deferred lock");
        deferred.iter().filter(|(_, d)| d.due_ms <= now).map(|(k, _)| k.clone()).collect()
    }

    async fn sweep(&self, mut walk: Walk) -> (usize, usize) {
        let (mut changed, mut failed) = (0, 0);
        let reserve = |(p, k, deferred_only): Target| Box::pin(maybe_done(self.reserve_for(p, k, deferred_only)));
        let mut next = walk.next(std::time::Instant::now(), || self.due_deferred()).map(reserve);
        while let Some(mut reserving) = next.take() {
            reserving.as_mut().await;
            let (target, deferred_only) = reserving.as_mut().take_output().expect("the reservation is done");
            // The next contact's budget is reserved while this one is written.
            next = walk.next(std::time::Instant::now(), || self.due_deferred()).map(reserve);
            let land = self.land(target, deferred_only);
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
    async fn reserve_for(&self, partition: i32, key: String, only_deferred: bool) -> (Reserved, bool) {
        let client = self.client.reserving();
        if let Some(peek) = self.customers.get(partition, &key)
            && (!only_deferred || peek.deferred)
            && !peek.identity.email.is_empty()
        {
            let now = now_ms();
            let aggregate = peek.aggregate(now);
            let desired = contacts::desired(&peek, &aggregate, &self.rules().evaluate(&aggregate));
            if peek.writable_at(self.budget.per_contact, self.budget.window_ms(), now) <= now
                && peek.refused != Some(contacts::fingerprint(&desired))
            {
                // Never more than the whole budget: reserved slots are held until used, so
                // asking for more would wait for ever.
                let tag_posts_left = self.tag_posts_left(partition, now);
                let planned = contacts::planned_requests(&peek, &desired, tag_posts_left).min(client.budget_limit());
                let _one_collector = self.reserving.lock().await;
                for _ in 0..planned {
                    client.reserve().await;
                }
            }
        }
        (Reserved { partition, key, client }, only_deferred)
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
            self.deferred.lock().expect("deferred lock").remove(&(partition, key));
            return None;
        }
        let now = now_ms();
        if state.identity.email.is_empty()
            || !only_deferred && crate::dry_run::changes(&state, &self.rules(), now).is_empty()
        {
            return None;
        }
        // Not due (its budget has no room, a 429's wait runs): it waits, untouched, in the
        // deferred set; nothing is written, not even its state.
        let due_ms = state.writable_at(self.budget.per_contact, self.budget.window_ms(), now);
        if due_ms > now {
            if !state.deferred {
                // A rules pass found it over budget: the deferred-writes pass lands it.
                let mut state = state;
                state.deferred = true;
                crate::metrics::DEFERRED.inc();
                if let Err(failure) = self.customers.put(partition, &key, state).await {
                    tracing::warn!(partition, key, error = %failure, "cannot mark the contact deferred");
                    self.unsaved_deferral(partition);
                }
            }
            let mut deferred = self.deferred.lock().expect("deferred lock");
            let entry = deferred.entry((partition, key)).or_default();
            entry.due_ms = entry.due_ms.max(due_ms);
            return None;
        }
        let failures =
            self.deferred.lock().expect("deferred lock").get(&(partition, key.clone())).map_or(0, |d| d.failures);
        match self.settle(partition, &key, state, now, Write::Sweep(&client)).await {
            Ok(()) if self.customers.get(partition, &key).is_some_and(|s| s.deferred) => None,
            Ok(()) => Some(true),
            Err(error) if error.class == ErrorClass::Permanent => {
                // `settle` recorded the refusal in the state; the outcome says why.
                tracing::warn!(partition, key, error = %error, "rd station refused a contact; not retried until it changes");
                if let Err(failure) = self.publish_refusal(&key, &error).await {
                    tracing::warn!(partition, key, error = %failure, "cannot publish the refused contact's outcome");
                }
                Some(false)
            }
            Err(error) => {
                let failures = failures + 1;
                let due_ms = now + backoff_ms(failures);
                tracing::warn!(partition, key, error = %error, retry_in_ms = due_ms - now, "sweep could not update a contact; will retry");
                // Deferred (also after a rules pass), so a restart still lands it.
                if let Some(mut state) = self.customers.get(partition, &key).filter(|s| !s.deferred) {
                    state.deferred = true;
                    if let Err(failure) = self.customers.put(partition, &key, state).await {
                        tracing::warn!(partition, key, error = %failure, "cannot mark the contact deferred");
                        self.unsaved_deferral(partition);
                    }
                }
                self.deferred.lock().expect("deferred lock").insert((partition, key), Deferral { due_ms, failures });
                Some(false)
            }
        }
    }

    /// A contact's deferred flag could not be saved: after a restart nothing would say its
    /// write is still due, so the partition's rules marker must not say it is done either.
    /// The partition gets another rules pass (which the marker is written after); contacts
    /// already as the rules want cost nothing in it.
    fn unsaved_deferral(&self, partition: i32) {
        self.rules_pending.lock().expect("rules pending lock").insert(partition);
    }

    /// The outcome of a contact RD refused during a sweep (no record to dead-letter: the
    /// outcome carries the error class and RD's code).
    async fn publish_refusal(&self, key: &str, error: &HandlerError) -> Result<(), HandlerError> {
        let now = now_ms();
        let event_id = elo_events::ids::event_id(&[crate::NAME, "sweep", key, &now.to_string()]);
        let outcome = SyncOutcome {
            outcome_id: elo_events::ids::event_id(&[crate::NAME, &event_id]),
            sink: crate::NAME.into(),
            target: "rdstation".into(),
            event_id,
            customer_key: key.to_owned(),
            source_version: SourceVersion {
                entity_type: "customer".into(),
                entity_id: key.to_owned(),
                updated_at: now,
            },
            status: OutcomeStatus::DeadLettered,
            error_class: Some(error.class.as_str().to_owned()),
            error_code: Some(error.code.to_string()),
            target_ids: Default::default(),
            attempts: 1,
            latency_ms: 0,
            occurred_at: now,
        };
        let bytes =
            self.codec.encode(&self.outcomes_topic, &outcome).await.map_err(|e| elo_service::codec_failure(&e))?;
        // A trace of its own (a sweep pass can last hours; one trace per refusal stays small).
        let span = tracing::info_span!("rdstation_refusal", error_code = %error.code);
        let send =
            self.producer.send(&self.outcomes_topic, key.as_bytes(), &bytes, Some(elo_events::SyncOutcome::EVENT_TYPE));
        send.instrument(span).await.map_err(|e| kafka_failure("outcome", &e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_long_rules_pass_lands_deferred_writes_that_come_due_during_it() {
        let start = Instant::now();
        let mut walk = Walk::rules_pass((0..1000).map(|n| (0, format!("c{n}"))), start);
        let due = || vec![(1, "late".to_owned())];
        // Within the first second the pass walks on.
        assert_eq!(walk.next(start, due), Some((0, "c0".into(), false)));
        assert_eq!(walk.next(start + Duration::from_millis(500), due), Some((0, "c1".into(), false)));
        // A second later the deferred writes due then go first, then the pass goes on.
        let later = start + FLUSH_DURING_PASS;
        assert_eq!(walk.next(later, due), Some((1, "late".into(), true)));
        assert_eq!(walk.next(later, due), Some((0, "c2".into(), false)));
        // Still due a second later but not worked yet: taken in once, not again.
        let mut walk = Walk::rules_pass((0..1000).map(|n| (0, format!("c{n}"))), start);
        let many = || (0..50).map(|n| (1, format!("d{n}"))).collect::<Vec<_>>();
        assert_eq!(walk.next(start + FLUSH_DURING_PASS, many), Some((1, "d0".into(), true)));
        for second in 2..20 {
            let _ = walk.next(start + FLUSH_DURING_PASS * second, many);
        }
        // (The one worked each second is due again and taken in again; the 49 waiting are not.)
        assert_eq!(walk.queue.len(), 1000 + 49, "each due write queued once: {}", walk.queue.len());
        // A deferred-writes pass is just its due contacts.
        let mut walk = Walk::deferred(vec![(2, "d".into())]);
        assert_eq!(walk.next(later + Duration::from_secs(60), due), Some((2, "d".into(), true)));
        assert_eq!(walk.next(later + Duration::from_secs(60), due), None);
    }
}
