//! The consumer handler: a batch of one partition's `commerce.events` becomes RD e-commerce
//! events (each at most once per order and type, through the sent-log), per-customer state in
//! the state store, and one contact sync per customer touched by the batch (coalesced).
//!
//! Order of effects, so a crash or a retry at any point repeats nothing RD acknowledged:
//! 1. fold the record into the customer's state (in memory, idempotent);
//! 2. send the events the order calls for that the sent-log lacks; each acknowledged event is
//!    written to the sent-log at once (a crash between RD's answer and that write is the only
//!    way an event is sent twice: the one in flight);
//! 3. after the batch, sync each touched customer's contact, then persist its state;
//! 4. publish an outcome per record on `integration.outcomes`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use elo_events::{CommerceEvent, CommerceEventType, EventCodec, OutcomeStatus, SourceVersion, SyncOutcome};
use elo_kafka::{ErrorClass, HandlerError, Producer, Record, StateStore};
use reqwest::Method;

use crate::aggregates::{Change, CustomerState};
use crate::client::{Budget, RdClient};
use crate::contacts;
use crate::events::{EventMapping, Sent};
use crate::metrics;
use crate::rules::Rules;

mod resend;
pub use resend::WithCommands;

/// Everything the handler needs.
pub struct Sink {
    pub client: RdClient,
    pub codec: Arc<EventCodec>,
    pub producer: Producer,
    pub customers: Arc<StateStore<CustomerState>>,
    pub sent: Arc<StateStore<Sent>>,
    pub rules: Arc<RwLock<Arc<Rules>>>,
    pub mapping: EventMapping,
    pub outcomes_topic: String,
    pub budget: ContactBudget,
    /// Create the custom fields the mapping and rules need when RD lacks them.
    pub create_fields: bool,
    /// Whether RD's custom fields were checked (done on the first batch, not at startup:
    /// readiness must not depend on RD).
    fields_checked: AtomicBool,
    fields_lock: tokio::sync::Mutex<()>,
    restored: Mutex<HashSet<i32>>,
    /// Customers whose contact update waits for the per-contact budget, so the periodic flush
    /// does not scan every customer.
    deferred: Mutex<HashSet<(i32, String)>>,
    /// One per partition: a batch and the rules sweep never work on a partition's state at
    /// the same time (either would overwrite the other's aggregates).
    partition_locks: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
}

/// Writes allowed per contact in a sliding window (RD: 24 in 24 h).
#[derive(Clone, Copy, Debug)]
pub struct ContactBudget {
    pub per_contact: usize,
    pub window: std::time::Duration,
}

struct Touched {
    first: usize,
    state: CustomerState,
}

impl Sink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: RdClient,
        codec: Arc<EventCodec>,
        producer: Producer,
        customers: Arc<StateStore<CustomerState>>,
        sent: Arc<StateStore<Sent>>,
        rules: Arc<RwLock<Arc<Rules>>>,
        mapping: EventMapping,
        outcomes_topic: String,
        budget: ContactBudget,
        create_fields: bool,
    ) -> Self {
        Self {
            client,
            codec,
            producer,
            customers,
            sent,
            rules,
            mapping,
            outcomes_topic,
            budget,
            create_fields,
            fields_checked: AtomicBool::new(false),
            fields_lock: tokio::sync::Mutex::new(()),
            restored: Mutex::default(),
            deferred: Mutex::default(),
            partition_locks: Mutex::default(),
        }
    }

    fn restore(&self, partition: i32) -> bool {
        let result = self.customers.restore(partition).and_then(|_| self.sent.restore(partition));
        match result {
            Ok(_) => {
                let waiting = self.customers.entries(partition).into_iter().filter(|(_, s)| s.deferred);
                self.deferred.lock().expect("deferred lock").extend(waiting.map(|(k, _)| (partition, k)));
                self.restored.lock().expect("restored lock").insert(partition);
                true
            }
            Err(error) => {
                tracing::error!(partition, error = %error, "cannot restore the partition's state; its records wait until it is restored");
                false
            }
        }
    }

    async fn ensure_restored(self: &Arc<Self>, partition: i32) -> bool {
        if self.restored.lock().expect("restored lock").contains(&partition) {
            return true;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.restore(partition)).await.unwrap_or(false)
    }

    /// Checks (and creates) the custom fields once; until that succeeds records wait with the
    /// class of RD's answer (missing fields with creation off wait as `auth`: an operator must
    /// act, nothing is dropped).
    async fn ensure_fields(&self) -> Result<(), HandlerError> {
        if self.fields_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self.fields_lock.lock().await;
        if self.fields_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        let needed = contacts::needed_fields(&self.rules());
        match contacts::ensure_fields(&self.client, &needed, self.create_fields).await {
            Ok(missing) if missing.is_empty() => {
                self.fields_checked.store(true, Ordering::Release);
                Ok(())
            }
            Ok(missing) => {
                tracing::error!(fields = ?missing, "rd station lacks custom fields and creating them is off (ELO_RDSTATION_CREATE_FIELDS)");
                Err(HandlerError::new(
                    ErrorClass::Auth,
                    "rd_fields_missing",
                    format!("missing custom fields {missing:?}"),
                ))
            }
            Err(error) => Err(error.to_handler_error()),
        }
    }

    fn partition_lock(&self, partition: i32) -> Arc<tokio::sync::Mutex<()>> {
        self.partition_locks.lock().expect("locks lock").entry(partition).or_default().clone()
    }

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
            match self.settle(partition, &key, state, now).await {
                Ok(()) if self.customers.get(partition, &key).is_some_and(|s| s.deferred) => {}
                Ok(()) => changed += 1,
                Err(error) => {
                    failed += 1;
                    tracing::warn!(partition, key, error = %error, "rules sweep could not update a contact; will retry");
                }
            }
        }
        (changed, failed)
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().expect("rules lock").clone()
    }

    /// Sends the events `event` calls for that RD has not acknowledged yet; returns their types.
    async fn send_events(&self, partition: i32, event: &CommerceEvent) -> Result<Vec<String>, HandlerError> {
        let mut sent = Vec::new();
        for rd in self.mapping.events_for(event) {
            if self.sent.get(partition, &rd.id).is_some() {
                metrics::EVENTS_SKIPPED.with_label_values(&[&rd.event_type]).inc();
                continue;
            }
            let answer = self
                .client
                .request(Method::POST, "/platform/events", Some(&rd.body), Budget::None)
                .await
                .map_err(|e| e.to_handler_error())?;
            metrics::EVENTS_SENT.with_label_values(&[&rd.event_type]).inc();
            let entry = Sent {
                event_type: rd.event_type.clone(),
                order_id: rd.order_id.clone(),
                source_event_id: event.event_id.clone(),
                rd_event_uuid: answer.get("event_uuid").and_then(|v| v.as_str()).map(str::to_owned),
                sent_at_ms: now_ms(),
            };
            self.sent.put(partition, &rd.id, entry).await.map_err(|e| kafka_failure("sent_log", &e))?;
            sent.push(rd.event_type);
        }
        Ok(sent)
    }

    /// Syncs one customer's contact and persists the state.
    async fn settle(&self, partition: i32, key: &str, mut state: CustomerState, now: i64) -> Result<(), HandlerError> {
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
        // per 24 h): a sync is at most one of each, so syncs are counted. Over budget the write
        // waits for the sweep, which lands the latest state when the window has room.
        state.writes_ms.retain(|t| now - t < self.budget.window.as_millis() as i64);
        if state.writes_ms.len() >= self.budget.per_contact {
            if !state.deferred {
                metrics::DEFERRED.inc();
            }
            metrics::COALESCED.inc();
            state.deferred = true;
            self.deferred.lock().expect("deferred lock").insert((partition, key.to_owned()));
            return self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e));
        }
        let result = contacts::sync(&self.client, &mut state, &desired).await;
        if result.as_ref().is_ok_and(|w| *w > 0) {
            state.writes_ms.push(now);
            state.deferred = false;
            self.deferred.lock().expect("deferred lock").remove(&(partition, key.to_owned()));
        }
        match result {
            Ok(0) => metrics::COALESCED.inc(),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(key, email = %elo_telemetry::redact::email(&state.identity.email), error = %error, error_code = error.code(), "contact sync failed");
                // A refused contact is parked (DLQ) but its aggregates are kept.
                if error.class() == ErrorClass::Permanent {
                    self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e))?;
                }
                return Err(error.to_handler_error());
            }
        }
        self.customers.put(partition, key, state).await.map_err(|e| kafka_failure("state", &e))
    }

    async fn erase(&self, partition: i32, key: &str) -> Result<(), HandlerError> {
        let Some(state) = self.customers.get(partition, key) else { return Ok(()) };
        if let Some(uuid) = &state.contact_uuid {
            contacts::delete(&self.client, uuid).await.map_err(|e| e.to_handler_error())?;
        }
        self.customers.remove(partition, key).await.map_err(|e| kafka_failure("state", &e))
    }

    async fn publish_outcome(
        &self,
        event: &CommerceEvent,
        status: OutcomeStatus,
        target_ids: BTreeMap<String, String>,
        latency_ms: i64,
    ) -> Result<(), HandlerError> {
        let outcome = SyncOutcome {
            outcome_id: elo_events::ids::event_id(&[crate::NAME, &event.event_id]),
            sink: crate::NAME.into(),
            target: "rdstation".into(),
            event_id: event.event_id.clone(),
            customer_key: event.customer_key.clone(),
            source_version: SourceVersion { ..event.source_version.clone() },
            status,
            error_class: None,
            error_code: None,
            target_ids,
            attempts: 1,
            latency_ms,
            occurred_at: now_ms(),
        };
        let bytes =
            self.codec.encode(&self.outcomes_topic, &outcome).await.map_err(|e| elo_service::codec_failure(&e))?;
        self.producer
            .send(&self.outcomes_topic, event.customer_key.as_bytes(), &bytes, Some("OUTCOME"))
            .await
            .map_err(|e| kafka_failure("outcome", &e))?;
        Ok(())
    }

    async fn handle_batch(self: &Arc<Self>, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
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
        let mut touched: BTreeMap<String, Touched> = BTreeMap::new();
        let mut done: Vec<(usize, CommerceEvent, OutcomeStatus, Vec<String>)> = Vec::new();
        let mut stop: Option<usize> = None;
        for (i, record) in batch.iter().enumerate() {
            let event = match elo_service::decode_record::<CommerceEvent>(&self.codec, record).await {
                Ok(event) => event,
                Err(error) => {
                    let retriable = error.class != ErrorClass::Permanent;
                    results[i] = Err(error);
                    if retriable {
                        stop = Some(i);
                        break;
                    }
                    continue;
                }
            };
            let key = event.customer_key.clone();
            if event.event_type == CommerceEventType::CustomerErased {
                // Anything pending for this key is moot: the person is gone.
                touched.remove(&key);
                if let Err(error) = self.erase(partition, &key).await {
                    results[i] = Err(error);
                    stop = Some(i);
                    break;
                }
                done.push((i, event, OutcomeStatus::Applied, Vec::new()));
                continue;
            }
            let entry = touched.entry(key.clone()).or_insert_with(|| Touched {
                first: i,
                state: self.customers.get(partition, &key).unwrap_or_default(),
            });
            if entry.first > i {
                entry.first = i;
            } else if entry.first < i {
                metrics::COALESCED.inc();
            }
            let change = entry.state.apply(&event);
            match self.send_events(partition, &event).await {
                Ok(sent) => {
                    let status =
                        if change == Change::Stale { OutcomeStatus::SkippedStale } else { OutcomeStatus::Applied };
                    done.push((i, event, status, sent));
                }
                Err(error) => {
                    results[i] = Err(error);
                    stop = Some(i);
                    break;
                }
            }
        }
        let mut uuids: BTreeMap<String, String> = BTreeMap::new();
        for (key, t) in touched {
            if let Some(uuid) = &t.state.contact_uuid {
                uuids.insert(key.clone(), uuid.clone());
            }
            let uuid_before = t.state.contact_uuid.clone();
            match self.settle(partition, &key, t.state, now).await {
                Ok(()) => {
                    if let Some(state) = self.customers.get(partition, &key)
                        && let Some(uuid) = state.contact_uuid.or(uuid_before)
                    {
                        uuids.insert(key, uuid);
                    }
                }
                Err(error) => {
                    if results[t.first].is_ok() {
                        results[t.first] = Err(error);
                    }
                }
            }
        }
        let first_failure = results.iter().position(|r| r.as_ref().is_err_and(|e| e.class != ErrorClass::Permanent));
        let latency = started.elapsed().as_millis() as i64;
        let outcomes = done.iter().filter(|(i, ..)| first_failure.is_none_or(|f| *i < f) && results[*i].is_ok()).map(
            |(i, event, status, sent)| {
                let mut ids = BTreeMap::new();
                if let Some(uuid) = uuids.get(&event.customer_key) {
                    ids.insert("contact_uuid".to_owned(), uuid.clone());
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

fn kafka_failure(stage: &str, error: &elo_kafka::Error) -> HandlerError {
    HandlerError::new(error.class(), format!("{stage}_{}", error.code()), error.to_string())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// The runtime's handler: an `Arc<Sink>` so state restores can run on a blocking thread.
pub struct SinkHandler(pub Arc<Sink>);

impl elo_kafka::Handler for SinkHandler {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        self.0.handle_batch(batch).await
    }

    fn on_assigned(&self, _topic: &str, partition: i32) {
        self.0.restore(partition);
    }

    fn on_revoked(&self, _topic: &str, partition: i32) {
        // Wait (bounded: a batch that would not end must not hold the poll thread) for a rules
        // or deferred-update sweep working on this partition, so it cannot write the
        // partition's changelog after the new owner restored it; the sweep re-checks
        // `restored` once it has the lock.
        let lock = self.0.partition_lock(partition);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let _guard = loop {
            match lock.try_lock() {
                Ok(guard) => break Some(guard),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(_) => {
                    tracing::warn!(partition, "revoked while the partition's state was still in use");
                    break None;
                }
            }
        };
        self.0.restored.lock().expect("restored lock").remove(&partition);
        self.0.deferred.lock().expect("deferred lock").retain(|(p, _)| *p != partition);
        self.0.customers.release(partition);
        self.0.sent.release(partition);
    }
}
