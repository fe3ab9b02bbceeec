//! A batch of one partition's records: grouped by customer, customers worked in parallel
//! (bounded), each in offset order (events, then one contact sync), then an outcome per
//! record done. A customer stops at its first failed record; its later records wait for it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use elo_events::{CommerceEvent, CommerceEventType, OutcomeStatus};
use elo_kafka::{ErrorClass, HandlerError, Record};
use futures::StreamExt;

use super::{SentWrite, Sink, Write, now_ms};
use crate::aggregates::{Change, CustomerState};
use crate::metrics;

impl Sink {
    /// One customer's records of a batch, in offset order: fold each into the state, send its
    /// events (sequentially: the customer's order is RD's order), then sync the contact once.
    async fn handle_customer(
        &self,
        partition: i32,
        now: i64,
        key: String,
        records: Vec<(usize, CommerceEvent)>,
    ) -> CustomerDone {
        let indices = records.iter().map(|(i, _)| *i).collect();
        let mut out =
            CustomerDone { key, records: indices, done: Vec::new(), failures: Vec::new(), uuid: None, deferred: false };
        // The state since the last erasure, and the first record that touched it.
        let mut touched: Option<(usize, CustomerState)> = None;
        let mut pending: Option<SentWrite<'_>> = None;
        for (i, event) in records {
            if event.event_type == CommerceEventType::CustomerErased {
                if let Some(write) = pending.take()
                    && let Err(error) = write.await
                {
                    out.failures.push((i, error));
                    return out;
                }
                // Anything pending for this key is moot: the person is gone.
                touched = None;
                if let Err(error) = self.erase(partition, &out.key, event.occurred_at).await {
                    out.failures.push((i, error));
                    return out;
                }
                out.done.push((i, event, OutcomeStatus::Applied, Vec::new()));
                continue;
            }
            let (first, state) =
                touched.get_or_insert_with(|| (i, self.customers.get(partition, &out.key).unwrap_or_default()));
            if state.before_erasure(&event) {
                // The person was erased after this happened: nothing of it reaches RD.
                out.done.push((i, event, OutcomeStatus::SkippedStale, Vec::new()));
                continue;
            }
            if *first < i {
                metrics::COALESCED.inc();
            }
            let change = state.apply(&event);
            match self.send_events(partition, &event, &mut pending).await {
                Ok(sent) => {
                    let status =
                        if change == Change::Stale { OutcomeStatus::SkippedStale } else { OutcomeStatus::Applied };
                    out.done.push((i, event, status, sent));
                }
                Err(error) => {
                    out.failures.push((i, error));
                    break;
                }
            }
        }
        let logged = async {
            match pending {
                Some(write) => write.await,
                None => Ok(()),
            }
        };
        match touched {
            Some((first, state)) => {
                let uuid_before = state.contact_uuid.clone();
                // The last event's sent-log write and the state write travel together.
                let (logged, result) =
                    futures::join!(logged, self.settle(partition, &out.key, state, now, Write::Batch));
                let settled = self.customers.get(partition, &out.key);
                out.deferred = settled.as_ref().is_some_and(|s| s.deferred);
                out.uuid = settled.and_then(|s| s.contact_uuid).or(uuid_before);
                for error in [logged.err(), result.err()].into_iter().flatten() {
                    out.failures.push((first, error));
                }
            }
            None => {
                if let Err(error) = logged.await
                    && let Some(last) = out.done.last().map(|(i, ..)| *i)
                {
                    out.failures.push((last, error));
                }
            }
        }
        out
    }

    pub(super) async fn handle_batch(self: &Arc<Self>, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        let started = Instant::now();
        let Some(partition) = batch.first().map(|r| r.partition) else { return Vec::new() };
        if !self.ensure_restored(partition).await {
            let error = HandlerError::transient("state_not_restored", "the partition's state could not be restored");
            return vec![Err(error); batch.len()];
        }
        if let Err(error) = self.ensure_fields().await {
            return vec![Err(error); batch.len()];
        }
        let lock = self.partition_lock(partition);
        let _guard = lock.lock().await;
        let now = now_ms();
        let mut results: Vec<Result<(), HandlerError>> = vec![Ok(()); batch.len()];
        // Records grouped by customer, in offset order within each; a retriable decode failure
        // stops the batch there (the runtime retries from it).
        let mut groups: Vec<(String, Vec<(usize, CommerceEvent)>)> = Vec::new();
        let mut group_of: HashMap<String, usize> = HashMap::new();
        let mut stop: Option<usize> = None;
        for (i, record) in batch.iter().enumerate() {
            match elo_service::decode_record::<CommerceEvent>(&self.codec, record).await {
                Ok(event) => {
                    let g = *group_of.entry(event.customer_key.clone()).or_insert_with(|| {
                        groups.push((event.customer_key.clone(), Vec::new()));
                        groups.len() - 1
                    });
                    groups[g].1.push((i, event));
                }
                Err(error) => {
                    let retriable = error.class != ErrorClass::Permanent;
                    results[i] = Err(error);
                    if retriable {
                        stop = Some(i);
                        break;
                    }
                }
            }
        }
        // Customers in parallel (bounded), each in order: RD sees every customer's events in
        // the order they happened, and at most `customer_concurrency` requests of this
        // partition are in flight (the most a crash can make RD see twice).
        let customers: Vec<CustomerDone> = futures::stream::iter(groups)
            .map(|(key, records)| self.handle_customer(partition, now, key, records))
            .buffer_unordered(self.customer_concurrency.max(1))
            .collect()
            .await;
        let (uuids, deferred, done) = merge(&mut results, customers);
        let first_failure = results.iter().position(|r| r.as_ref().is_err_and(|e| e.class != ErrorClass::Permanent));
        let latency = started.elapsed().as_millis() as i64;
        let outcomes = done.iter().filter(|(i, ..)| first_failure.is_none_or(|f| *i < f) && results[*i].is_ok()).map(
            |(i, event, status, sent)| {
                let mut ids = BTreeMap::new();
                if let Some(uuid) = uuids.get(&event.customer_key) {
                    ids.insert("contact_uuid".to_owned(), uuid.clone());
                }
                // RD does not hold this contact as the event leaves it yet: the reconciler's
                // sweep leaves it alone until the deferred-writes pass lands it.
                if deferred.contains(&event.customer_key) {
                    ids.insert("contact_deferred".to_owned(), "1".to_owned());
                }
                if !sent.is_empty() {
                    ids.insert("events".to_owned(), sent.join(","));
                }
                async move { (*i, self.publish_outcome(event, *status, ids, latency).await) }
            },
        );
        // Concurrently: the producer batches the acknowledgements.
        for (i, result) in futures::future::join_all(outcomes).await {
            if let Err(error) = result {
                results[i] = Err(error);
            }
        }
        if let Some(stop) = stop
            && let Err(error) = results[stop].clone()
        {
            for r in results.iter_mut().skip(stop + 1) {
                *r = Err(error.clone());
            }
        }
        results
    }
}

/// Folds the customers' shares of a batch into the per-record results; returns the contact
/// uuids by customer key and the records done, in offset order.
fn merge(
    results: &mut [Result<(), HandlerError>],
    customers: Vec<CustomerDone>,
) -> (BTreeMap<String, String>, HashSet<String>, Vec<Done>) {
    let mut uuids: BTreeMap<String, String> = BTreeMap::new();
    let mut deferred: HashSet<String> = HashSet::new();
    let mut done: Vec<Done> = Vec::new();
    for customer in customers {
        if let Some(uuid) = customer.uuid {
            uuids.insert(customer.key.clone(), uuid);
        }
        if customer.deferred {
            deferred.insert(customer.key.clone());
        }
        // A customer stops at its first record that fails; its records after that one were not
        // processed. They must not read as done (the runtime would commit them when it parks
        // the failed one): they wait for it as `RateLimited` with no delay, which the runtime
        // retries from (after parking the failed record, if it does) without spending their
        // own transient budget and never parks.
        let reported: HashSet<usize> =
            customer.done.iter().map(|(i, ..)| *i).chain(customer.failures.iter().map(|(i, _)| *i)).collect();
        for (i, error) in customer.failures {
            if results[i].is_ok() {
                results[i] = Err(error);
            }
        }
        for i in customer.records.into_iter().filter(|i| !reported.contains(i)) {
            if results[i].is_ok() {
                results[i] = Err(HandlerError::new(
                    ErrorClass::RateLimited,
                    "waiting_for_earlier_record",
                    "an earlier record of the same customer failed; retried after it",
                )
                .with_retry_after(std::time::Duration::ZERO));
            }
        }
        done.extend(customer.done);
    }
    done.sort_by_key(|(i, ..)| *i);
    (uuids, deferred, done)
}

/// A record done: its index in the batch, the event, its outcome and the RD events sent.
type Done = (usize, CommerceEvent, OutcomeStatus, Vec<String>);

/// What one customer's share of a batch came to.
struct CustomerDone {
    key: String,
    /// The batch indices of all the customer's records, in offset order.
    records: Vec<usize>,
    done: Vec<Done>,
    failures: Vec<(usize, HandlerError)>,
    uuid: Option<String>,
    /// The contact write was deferred (budget spent): RD holds an older contact, or none.
    deferred: bool,
}

#[cfg(test)]
mod tests {
    use elo_events::sample;

    use super::*;

    fn customer(key: &str, records: &[usize], failures: Vec<(usize, HandlerError)>, done: &[usize]) -> CustomerDone {
        let done =
            done.iter().map(|i| (*i, sample::order_placed(*i as u64), OutcomeStatus::Applied, Vec::new())).collect();
        CustomerDone { key: key.into(), records: records.to_vec(), done, failures, uuid: None, deferred: false }
    }

    /// What the runtime does with the results (elo-kafka `consumer::batch`): the records it
    /// commits without a retry, those it parks, and where it retries from.
    fn runtime(results: &[Result<(), HandlerError>]) -> (Vec<usize>, Vec<usize>, Option<usize>) {
        let cut = results.iter().position(|r| r.as_ref().is_err_and(|e| e.class != ErrorClass::Permanent));
        let before = |i: &usize| cut.is_none_or(|c| *i < c);
        let committed = (0..results.len()).filter(|i| before(i) && results[*i].is_ok()).collect();
        let parked = (0..results.len()).filter(|i| before(i) && results[*i].is_err()).collect();
        (committed, parked, cut)
    }

    #[test]
    fn records_after_a_customers_failure_wait_for_it_and_are_never_committed_unprocessed() {
        // Customer a's records at 0, 2 and 3; b's at 1. a's first is refused for good: a stops
        // there, so 2 and 3 were never processed.
        let refused = HandlerError::permanent("rd_400", "refused");
        let mut results = vec![Ok(()); 4];
        merge(
            &mut results,
            vec![customer("a", &[0, 2, 3], vec![(0, refused)], &[]), customer("b", &[1], vec![], &[1])],
        );
        let (committed, parked, cut) = runtime(&results);
        assert_eq!(parked, [0], "the refused record is parked");
        assert_eq!(committed, [1], "only the other customer's record is committed");
        assert_eq!(cut, Some(2), "a's later records are retried after the park");
        for i in [2, 3] {
            let error = results[i].as_ref().expect_err("a later record of the customer is not Ok");
            // Waiting spends none of the record's own transient budget and never parks it.
            assert_eq!(error.class, ErrorClass::RateLimited);
            assert_eq!(error.code, "waiting_for_earlier_record");
            assert_eq!(error.retry_after, Some(std::time::Duration::ZERO));
        }

        // A transient failure: the runtime retries from it; the later ones wait, unparked.
        let mut results = vec![Ok(()); 3];
        let failed = HandlerError::transient("rd_503", "unavailable");
        merge(&mut results, vec![customer("a", &[0, 1, 2], vec![(0, failed)], &[])]);
        assert_eq!(runtime(&results), (vec![], vec![], Some(0)));
        assert!(results[1..].iter().all(|r| r.as_ref().is_err_and(|e| e.class == ErrorClass::RateLimited)));
    }
}
