//! One batch of one partition, from the first handler call to the last record finished.
//!
//! The rules, in the order they protect the data:
//! - **Per-key order.** When a record fails in a way worth retrying, the whole suffix from that
//!   record on is retried, not just the failures: records after it may already have been
//!   applied, and applying them again after the earlier record restores the newest state.
//!   Handlers are idempotent, so the repeat is harmless. Results after the first retriable
//!   failure are therefore discarded.
//! - **Classes.** `Permanent` is parked at once; `Transient` is retried with backoff until the
//!   record's own transient budget is spent, then parked; `RateLimited` and `Auth` wait
//!   (honouring `retry_after`) for as long as it takes and never touch the transient budget.
//! - **Defects are not data.** A handler that panics or returns the wrong number of results
//!   has a bug: nothing is parked, the batch stays unfinished, and the caller holds the
//!   partition and reports the process not live.
//! - **Fairness.** The concurrency permit is held only while the handler runs: a partition
//!   waiting out a backoff or an unwritable DLQ never blocks the others.
//! - **Nothing lost.** A record is finished only when applied or durably parked; `done` moves
//!   only over finished records, so a DLQ that cannot be written holds its partition (loudly)
//!   rather than skipping the record.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Handler, Record};
use crate::dlq::{DeadLetter, DeadLetterSink};
use crate::{ErrorClass, HandlerError, RetryPolicy, metrics};

/// What a batch needs from its worker.
pub(crate) struct BatchEnv<'a, H, D> {
    pub handler: &'a H,
    pub dlq: &'a D,
    pub retry: &'a RetryPolicy,
    pub permits: &'a Semaphore,
    pub stop: &'a CancellationToken,
    /// Next offset to commit for the partition; moves as records finish.
    pub done: &'a AtomicI64,
    /// This consumer's group: replays meant for another group are skipped.
    pub group: &'a str,
}

/// How a batch ended.
#[derive(Debug, PartialEq)]
pub(crate) enum BatchOutcome {
    /// Every record applied or parked.
    Finished,
    /// A stop request cut the batch short; its unfinished records will be redelivered.
    Stopped,
    /// The handler broke its contract (panic, wrong result count): a bug, not bad data.
    Defect(String),
}

/// What the runtime knows about one record's tries.
#[derive(Clone, Copy, Debug, Default)]
struct Tries {
    attempts: u32,
    transient_failures: u32,
    first_failure_ms: Option<i64>,
}

/// Runs `batch` (one partition, offset order) to completion.
pub(crate) async fn process_batch<H: Handler, D: DeadLetterSink>(
    env: &BatchEnv<'_, H, D>,
    mut records: Vec<Record>,
) -> BatchOutcome {
    let topic = records[0].topic.clone();
    let last = records.last().map(|r| r.offset).expect("batch is never empty");
    // Replays for another group: finished without a handler call (the group they are for
    // handles them). `done` still moves past them once the records before them are finished;
    // they are counted only then, so a batch redelivered after a stop counts them once.
    let mut skipped = Skipped { topic: topic.clone(), offsets: Vec::new() };
    records.retain(|r| {
        let other = crate::dlq::is_replay_for_other(r, env.group);
        if other {
            tracing::debug!(topic = %r.topic, partition = r.partition, offset = r.offset, "replay for another group skipped");
            skipped.offsets.push(r.offset);
        }
        !other
    });
    if records.is_empty() {
        skipped.commit(env.done, last + 1);
        return BatchOutcome::Finished;
    }
    let mut tries = vec![Tries::default(); records.len()];
    let mut waits = 0u32;
    loop {
        let permit = tokio::select! {
            biased;
            _ = env.stop.cancelled() => return BatchOutcome::Stopped,
            p = env.permits.acquire() => p.expect("semaphore never closed"),
        };
        // The whole call inside the guard: a handler may do work before its future's first poll.
        let results = AssertUnwindSafe(async { env.handler.handle(&records).await }).catch_unwind().await;
        drop(permit);
        let results = match results {
            Ok(results) if results.len() == records.len() => results,
            Ok(results) => {
                return BatchOutcome::Defect(format!(
                    "handler returned {} results for {} records",
                    results.len(),
                    records.len()
                ));
            }
            Err(panic) => return BatchOutcome::Defect(format!("handler panicked: {}", panic_text(&*panic))),
        };

        let now = now_ms();
        let mut cut: Option<(usize, HandlerError)> = None;
        let mut park: Vec<(usize, HandlerError)> = Vec::new();
        let mut applied = 0u64;
        for (i, result) in results.into_iter().enumerate() {
            let t = &mut tries[i];
            t.attempts += 1;
            let error = match result {
                Ok(()) => {
                    applied += u64::from(cut.is_none());
                    continue;
                }
                Err(error) => error,
            };
            metrics::HANDLER_ERRORS
                .with_label_values(&[&topic, error.class.as_str(), &bounded_code(&error.code), "handle"])
                .inc();
            t.first_failure_ms.get_or_insert(now);
            if cut.is_some() {
                // Retried with the suffix anyway; only the first retriable failure decides.
                continue;
            }
            match error.class {
                ErrorClass::Permanent => park.push((i, error)),
                ErrorClass::Transient => {
                    t.transient_failures += 1;
                    if t.transient_failures >= env.retry.transient_attempts.max(1) {
                        park.push((i, error));
                    } else {
                        cut = Some((i, error));
                    }
                }
                ErrorClass::RateLimited | ErrorClass::Auth => {
                    if error.class == ErrorClass::Auth && waits == 0 {
                        let r = &records[i];
                        tracing::error!(topic = %r.topic, partition = r.partition, offset = r.offset, code = %error.code, "downstream refused credentials; holding the partition until they work again");
                    }
                    cut = Some((i, error));
                }
            }
        }
        if applied > 0 {
            metrics::CONSUMED.with_label_values(&[&topic, "applied"]).inc_by(applied);
        }
        for (i, error) in park {
            let t = tries[i];
            let letter = DeadLetter {
                record: records[i].clone(),
                error,
                attempts: t.attempts,
                transient_failures: t.transient_failures,
                first_failure_ms: t.first_failure_ms.unwrap_or(now),
            };
            if park_until_written(env, &letter).await.is_err() {
                return BatchOutcome::Stopped;
            }
            metrics::CONSUMED.with_label_values(&[&topic, "dead_lettered"]).inc();
        }
        let Some((at, error)) = cut else {
            skipped.commit(env.done, last + 1);
            return BatchOutcome::Finished;
        };
        if at > 0 {
            // Everything before the cut is finished: commit it even if the wait is long.
            skipped.commit(env.done, records[at].offset);
            records.drain(..at);
            tries.drain(..at);
            waits = 0;
        }
        let delay = env.retry.backoff(waits).max(error.retry_after.unwrap_or_default());
        waits = waits.saturating_add(1);
        let _waiting = GaugeGuard::raise(metrics::RETRY_BLOCKED.with_label_values(&[error.class.as_str()]));
        let stopped = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = env.stop.cancelled() => true,
        };
        if stopped {
            return BatchOutcome::Stopped;
        }
    }
}

/// The batch's skipped replays not yet committed past.
struct Skipped {
    topic: String,
    /// Ascending.
    offsets: Vec<i64>,
}

impl Skipped {
    /// Moves `done` to `to` and counts the skipped replays now behind it.
    fn commit(&mut self, done: &AtomicI64, to: i64) {
        done.store(to, Ordering::Release);
        let behind = self.offsets.partition_point(|o| *o < to);
        if behind > 0 {
            metrics::CONSUMED.with_label_values(&[&self.topic, "skipped_replay"]).inc_by(behind as u64);
            self.offsets.drain(..behind);
        }
    }
}

/// Writes a dead letter, retrying for as long as it takes: the record is not finished until
/// it is parked. Meanwhile only this partition waits, and says why.
async fn park_until_written<H, D: DeadLetterSink>(env: &BatchEnv<'_, H, D>, letter: &DeadLetter) -> Result<(), ()> {
    let r = &letter.record;
    let mut failures = 0u32;
    let mut blocked = None;
    loop {
        let written = tokio::select! {
            written = env.dlq.park(letter) => written,
            _ = env.stop.cancelled() => return Err(()),
        };
        match written {
            Ok(()) => break,
            Err(e) => {
                blocked.get_or_insert_with(|| GaugeGuard::raise(metrics::DLQ_BLOCKED.with_label_values(&[&r.topic])));
                failures += 1;
                metrics::DLQ_WRITE_ERRORS.with_label_values(&[&r.topic, e.code()]).inc();
                tracing::error!(error = %e, error_code = e.code(), error_class = e.class().as_str(), topic = %r.topic, partition = r.partition, offset = r.offset, failures, "cannot write the dead letter; this partition waits until it can");
                let delay = env.retry.backoff(failures - 1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = env.stop.cancelled() => return Err(()),
                }
            }
        }
    }
    tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, error_type = letter.error.class.as_str(), error_code = %letter.error.code, attempts = letter.attempts, "record parked in the DLQ");
    Ok(())
}

/// Raises a gauge for as long as it lives, however the task ends (an aborted task drops it).
pub(crate) struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    pub(crate) fn raise(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Codes come from handlers; keep label cardinality bounded whatever they send.
pub(crate) fn bounded_code(code: &str) -> String {
    let clean: String = code.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(40).collect();
    if clean.is_empty() { "unknown".to_owned() } else { clean }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
