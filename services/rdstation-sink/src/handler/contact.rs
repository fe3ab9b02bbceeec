//! One customer's contact: its write (coalesced, within the per-contact and account budgets,
//! deferred to the sweep when they are spent or RD's 429 asks to wait) and its erasure.

use std::sync::atomic::Ordering;

use elo_kafka::{ErrorClass, HandlerError};

use super::{Deferral, Sink, Write, kafka_failure};
use crate::aggregates::CustomerState;
use crate::{contacts, metrics};

impl Sink {
    /// Marks the customer's contact write as deferred (the sweep lands it, coalesced with
    /// whatever comes later, once its per-contact budget has room and a 429's wait is over).
    pub(super) fn defer(&self, partition: i32, key: &str, state: &mut CustomerState, now: i64) {
        if !state.deferred {
            metrics::DEFERRED.inc();
        }
        metrics::COALESCED.inc();
        state.deferred = true;
        let due_ms = state.writable_at(self.budget.per_contact, self.budget.window_ms(), now);
        self.deferred
            .lock()
            .expect("deferred lock")
            .insert((partition, key.to_owned()), Deferral { due_ms, failures: 0 });
    }

    /// The contact is as Elo wants it (or refused for good): nothing waits for the sweep.
    pub(super) fn undefer(&self, partition: i32, key: &str, state: &mut CustomerState) {
        state.deferred = false;
        self.deferred.lock().expect("deferred lock").remove(&(partition, key.to_owned()));
    }

    /// Syncs one customer's contact and persists the state. A batch never waits for the
    /// account budget: a spent budget (or a backlog the sweep is still working through) defers
    /// the write to the sweep.
    pub(super) async fn settle(
        &self,
        partition: i32,
        key: &str,
        mut state: CustomerState,
        now: i64,
        write: Write<'_>,
    ) -> Result<(), HandlerError> {
        if state.identity.email.is_empty() {
            // Orders without a customer block carry nothing to write to a contact yet.
            return self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e));
        }
        let aggregate = state.aggregate(now);
        let verdict = self.rules().evaluate(&aggregate);
        for hit in &verdict.hits {
            metrics::RULE_HITS.with_label_values(&[hit]).inc();
        }
        let desired = contacts::desired(&state, &aggregate, &verdict);
        let fingerprint = contacts::fingerprint(&desired);
        // Nothing to write, or exactly what RD refused already (sent again only once new data
        // or new rules change it).
        if !contacts::needs_write(&state, &desired) || state.refused == Some(fingerprint) {
            metrics::COALESCED.inc();
            self.undefer(partition, key, &mut state);
            return self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e));
        }
        // The per-contact budget (RD: 24 PATCH, 24 tag posts and 24 funnel updates per contact
        // per 24 h): a sync is at most one of each, so syncs are counted. Over budget (or
        // before the time a 429 named) the write waits for the sweep, which lands the latest
        // state when the window has room.
        state.writes_ms.retain(|t| now - t < self.budget.window_ms());
        if state.writable_at(self.budget.per_contact, self.budget.window_ms(), now) > now {
            self.defer(partition, key, &mut state, now);
            return self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e));
        }
        // A batch does not wait for the account budget: its contact write is deferred (and
        // coalesced with later ones) rather than holding back the partition's events.
        let client = match write {
            Write::Sweep(client) => client.clone(),
            // Under a backlog a batch takes only a cell the budget has free at this instant
            // (never waiting behind the sweep; the rest of the sync is deferred to it).
            Write::Batch if self.contact_backlog.load(Ordering::Acquire) => self.client.only_if_free(),
            Write::Batch => self.client.without_waiting(),
        };
        let before = (state.applied.clone(), state.contact_uuid.clone());
        let customers = &self.customers;
        let persist = |s: CustomerState| -> futures::future::BoxFuture<'_, crate::client::Result<()>> {
            Box::pin(async move {
                customers
                    .put(partition, key, s)
                    .await
                    .map_err(|e| crate::client::Error::Transient(format!("state write: {e}")))
            })
        };
        let sent_before = client.writes_sent();
        let result = contacts::sync(&client, &mut state, &desired, &persist).await;
        // RD counts a write when it receives it: after the sync, not at the batch's start (a
        // batch under load can take seconds, and an early stamp frees the cap early).
        let written_at = now.max(super::now_ms());
        let counted = counts_against_contact(&state, &before, sent_before, client.writes_sent());
        if counted {
            state.writes_ms.push(written_at);
        }
        match result {
            Ok(writes) => {
                if writes == 0 {
                    metrics::COALESCED.inc();
                }
                state.contact_not_before_ms = None;
                state.refused = None;
                self.undefer(partition, key, &mut state);
            }
            Err(error) => match on_sync_error(&mut state, &error, now) {
                SyncFailure::Defer => {
                    if matches!(error, crate::client::Error::BudgetSpent) {
                        self.contact_backlog.store(true, Ordering::Release);
                    }
                    self.defer(partition, key, &mut state, now);
                }
                SyncFailure::Fail { error: failure, keep } => {
                    if failure.class == ErrorClass::Permanent {
                        // Recorded: neither the sweeps nor the next batch send this contact
                        // again until something changes it (the record goes to the DLQ, a
                        // sweep's refusal to the outcomes, with its class).
                        state.refused = Some(fingerprint);
                        self.undefer(partition, key, &mut state);
                    }
                    tracing::warn!(key, email = %elo_telemetry::redact::email(&state.identity.email), error = %error, error_code = error.code(), "contact sync failed");
                    if keep {
                        self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e))?;
                    } else if counted {
                        // The records are retried, so their folding must not be stored, but
                        // RD may have applied the write (5xx, timeout) and counts it: the
                        // stored state gets the write, or every retry would send another one
                        // past the cap.
                        let stored = self.customers.get(partition, key).unwrap_or_default();
                        let stored = with_write(stored, written_at, self.budget.window_ms());
                        self.customers.put(partition, key, stored).await.map_err(|e| kafka_failure("state", &e))?;
                    }
                    return Err(failure);
                }
            },
        }
        self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e))
    }

    /// Deletes the contact and replaces the customer's state with an erasure floor (not a
    /// tombstone: an older event arriving later would otherwise recreate the contact).
    pub(super) async fn erase(&self, partition: i32, key: &str, erased_at_ms: i64) -> Result<(), HandlerError> {
        let state = self.customers.get(partition, key).unwrap_or_default();
        contacts::erase(&self.client, &state).await.map_err(|e| e.to_handler_error())?;
        self.deferred.lock().expect("deferred lock").remove(&(partition, key.to_owned()));
        let floor = CustomerState::erased(state.erased_at_ms.unwrap_or(i64::MIN).max(erased_at_ms));
        self.customers.put(partition, key, floor).await.map_err(|e| kafka_failure("state", &e))
    }
}

/// How long a contact waits after a 429 that named no `Retry-After`.
const RETRY_AFTER_UNSAID: std::time::Duration = crate::client::RETRY_AFTER_UNSAID;

/// Whether a sync counts against the contact's budget (RD: 24 updates per 24 h): it changed
/// what Elo knows RD holds, or it sent any write, answered or not. A write that timed out or
/// got a 5xx may have been applied by RD all the same, and RD counts it.
fn counts_against_contact(
    state: &CustomerState,
    before: &(crate::aggregates::Applied, Option<String>),
    sent_before: u32,
    sent_after: u32,
) -> bool {
    sent_after > sent_before || (&state.applied, &state.contact_uuid) != (&before.0, &before.1)
}

/// The stored state with one more write counted against the contact (older ones past the
/// window dropped). Nothing else of the failed attempt is kept.
fn with_write(mut stored: CustomerState, written_at: i64, window_ms: i64) -> CustomerState {
    stored.writes_ms.retain(|t| written_at - t < window_ms);
    stored.writes_ms.push(written_at);
    stored
}

/// What a failed contact sync means for the customer's records.
#[derive(Debug)]
enum SyncFailure {
    /// The write waits in the state for the sweep; the records are done.
    Defer,
    /// The records fail with `error`; `keep` persists the state first.
    Fail { error: HandlerError, keep: bool },
}

fn on_sync_error(state: &mut CustomerState, error: &crate::client::Error, now: i64) -> SyncFailure {
    match error {
        crate::client::Error::BudgetSpent => SyncFailure::Defer,
        // RD's 429 for this contact may ask to wait for hours: only this contact's write waits
        // (in the state, so a restart keeps it), never the partition's other customers.
        crate::client::Error::RateLimited { retry_after } => {
            let after = retry_after.unwrap_or(RETRY_AFTER_UNSAID).as_millis() as i64;
            state.contact_not_before_ms = Some(now.saturating_add(after));
            SyncFailure::Defer
        }
        // A refused contact is parked (DLQ) but its aggregates are kept.
        error => SyncFailure::Fail { error: error.to_handler_error(), keep: error.class() == ErrorClass::Permanent },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_counts_against_the_contact_when_it_sent_a_write_whatever_the_answer() {
        let state = CustomerState::default();
        let before = (state.applied.clone(), state.contact_uuid.clone());
        // A PATCH sent and answered 503 (or timed out): RD may have applied it.
        assert!(counts_against_contact(&state, &before, 0, 1));
        // Nothing sent (the budget was spent before the first request): no count.
        assert!(!counts_against_contact(&state, &before, 2, 2));
        // A write known to have landed counts.
        let mut landed = state.clone();
        landed.contact_uuid = Some("u".into());
        assert!(counts_against_contact(&landed, &before, 0, 0));
    }

    #[test]
    fn a_failed_write_is_added_to_the_stored_state_only() {
        let stored = CustomerState { writes_ms: vec![1_000, 50_000], ..Default::default() };
        let counted = with_write(stored.clone(), 70_000, 60_000);
        // The write outside the window is dropped, the new one counted, nothing else changed.
        assert_eq!(counted.writes_ms, vec![50_000, 70_000]);
        assert_eq!((counted.applied, counted.contact_uuid), (stored.applied, stored.contact_uuid));
    }

    #[test]
    fn a_failed_sweep_write_backs_off() {
        use super::super::sweep::backoff_ms;
        assert_eq!(backoff_ms(1), 10_000);
        assert_eq!(backoff_ms(2), 20_000);
        assert!(backoff_ms(3) > backoff_ms(2));
        assert_eq!(backoff_ms(50), 600_000);
    }

    #[test]
    fn a_contact_429_defers_that_contact_instead_of_holding_the_partition() {
        use crate::client::Error;
        let now = 1_000_000;
        let hours = std::time::Duration::from_secs(3 * 3600);
        let mut state = CustomerState::default();
        let verdict = on_sync_error(&mut state, &Error::RateLimited { retry_after: Some(hours) }, now);
        assert!(matches!(verdict, SyncFailure::Defer), "{verdict:?}");
        assert_eq!(state.contact_not_before_ms, Some(now + hours.as_millis() as i64));
        assert!(!state.contact_writable(now + 1000) && state.contact_writable(now + hours.as_millis() as i64));
        // Without a Retry-After the contact still waits a while, not a hot loop.
        let mut state = CustomerState::default();
        assert!(matches!(
            on_sync_error(&mut state, &Error::RateLimited { retry_after: None }, now),
            SyncFailure::Defer
        ));
        assert!(state.contact_not_before_ms.is_some_and(|t| t > now));
        // Other failures still fail the records (5xx retried, a refusal parked with its state kept).
        let mut state = CustomerState::default();
        match on_sync_error(&mut state, &Error::Transient("HTTP 503".into()), now) {
            SyncFailure::Fail { error, keep: false } => assert_eq!(error.class, ErrorClass::Transient),
            other => panic!("{other:?}"),
        }
        let refused = Error::Refused { status: 400, code: "INVALID".into(), message: "no".into() };
        assert!(matches!(on_sync_error(&mut state, &refused, now), SyncFailure::Fail { keep: true, .. }));
        assert_eq!(state.contact_not_before_ms, None);
    }
}
