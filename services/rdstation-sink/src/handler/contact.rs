//! One customer's contact: its write (coalesced, within the per-contact and account budgets,
//! deferred to the sweep when they are spent or RD's 429 asks to wait) and its erasure.

use std::sync::atomic::Ordering;

use elo_kafka::{ErrorClass, HandlerError};

use super::{Sink, Write, kafka_failure};
use crate::aggregates::CustomerState;
use crate::{contacts, metrics};

impl Sink {
    /// Marks the customer's contact write as deferred (the sweep lands it, coalesced with
    /// whatever comes later).
    pub(super) fn defer(&self, partition: i32, key: &str, state: &mut CustomerState) {
        if !state.deferred {
            metrics::DEFERRED.inc();
        }
        metrics::COALESCED.inc();
        state.deferred = true;
        self.deferred.lock().expect("deferred lock").insert((partition, key.to_owned()));
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
        if !contacts::needs_write(&state, &desired) {
            metrics::COALESCED.inc();
            state.deferred = false;
            self.deferred.lock().expect("deferred lock").remove(&(partition, key.to_owned()));
            return self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e));
        }
        // The per-contact budget (RD: 24 PATCH, 24 tag posts and 24 funnel updates per contact
        // per 24 h): a sync is at most one of each, so syncs are counted. Over budget (or
        // before the time a 429 named) the write waits for the sweep, which lands the latest
        // state when the window has room.
        state.writes_ms.retain(|t| now - t < self.budget.window.as_millis() as i64);
        if state.writes_ms.len() >= self.budget.per_contact || !state.contact_writable(now) {
            self.defer(partition, key, &mut state);
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
        let result = contacts::sync(&client, &mut state, &desired, &persist).await;
        if (&state.applied, &state.contact_uuid) != (&before.0, &before.1) {
            state.writes_ms.push(now);
        }
        match result {
            Ok(writes) => {
                if writes == 0 {
                    metrics::COALESCED.inc();
                }
                state.deferred = false;
                state.contact_not_before_ms = None;
                self.deferred.lock().expect("deferred lock").remove(&(partition, key.to_owned()));
            }
            Err(error) => match on_sync_error(&mut state, &error, now) {
                SyncFailure::Defer => {
                    if matches!(error, crate::client::Error::BudgetSpent) {
                        self.contact_backlog.store(true, Ordering::Release);
                    }
                    self.defer(partition, key, &mut state);
                }
                SyncFailure::Fail { error: failure, keep } => {
                    tracing::warn!(key, email = %elo_telemetry::redact::email(&state.identity.email), error = %error, error_code = error.code(), "contact sync failed");
                    if keep {
                        self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e))?;
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
const RETRY_AFTER_UNSAID: std::time::Duration = std::time::Duration::from_secs(60);

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
