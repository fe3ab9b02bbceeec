//! The ledger in Kafka: a [`StateStore`] of [`Entry`] per partition (changelog
//! `reconciler.ledger`, compacted, co-partitioned with `commerce.events` and
//! `integration.outcomes`), the consumer handler that folds both topics into it, and the
//! periodic check that measures it and sends repairs.
//!
//! Both input topics deliver partition `p` to this replica together (same partition count, the
//! range assignor), and both write ledger partition `p`: the partition is restored when the
//! first of its topics starts and released when the last one is revoked, and a per-partition
//! lock keeps the two topics' workers, the check and the sweeps from overwriting each other's
//! read-modify-write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use elo_events::{CommerceEvent, EventCodec, IntegrationCommand, SyncOutcome};
use elo_kafka::{HandlerError, Producer, Record, StateStore};
use tracing::Instrument;

use crate::figures::{Figures, Totals};
use crate::ledger::{self, DriftKind, Effect, Entry};
use crate::metrics;
use crate::repair::{self, Policy};
use crate::status::{LIST_CAP, LedgerStatus, StatusSender, SweepStatus};
use crate::stock::StockSide;
use crate::sweep::Progress;

/// Where repair commands go.
pub trait CommandSink: Send + Sync + 'static {
    fn send(&self, command: &IntegrationCommand) -> impl Future<Output = Result<(), String>> + Send;
}

/// `integration.commands` on the broker, keyed by customer (co-partitioned with its events).
pub struct KafkaCommands {
    pub codec: Arc<EventCodec>,
    pub producer: Producer,
    pub topic: String,
}

impl CommandSink for KafkaCommands {
    async fn send(&self, command: &IntegrationCommand) -> Result<(), String> {
        let bytes = self.codec.encode(&self.topic, command).await.map_err(|e| e.to_string())?;
        // A trace per command (a root span when sent by the periodic check), so the command and
        // the refetch or rewrite it causes carry one `traceparent`; an idle check starts none.
        let span = tracing::info_span!("repair_command", command_type = command.command_type.as_str(), entity = %command.entity_id);
        let send = self.producer.send(
            &self.topic,
            command.customer_key.as_bytes(),
            &bytes,
            Some(command.command_type.as_str()),
        );
        send.instrument(span).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// The ledger and everything that touches it.
pub struct Ledger<C> {
    pub store: StateStore<Entry>,
    pub codec: Arc<EventCodec>,
    pub commands: C,
    pub policy: Policy,
    pub commerce_topic: String,
    /// Settled entries leave the ledger after this long without news.
    pub retention: std::time::Duration,
    /// Input topics holding each restored partition.
    held: Arc<Mutex<HashMap<i32, BTreeSet<String>>>>,
    /// Which restore of each held partition this is (a write planned under one restore is
    /// dropped under another).
    generations: Mutex<HashMap<i32, u64>>,
    next_generation: std::sync::atomic::AtomicU64,
    /// Where the next check's command budget starts.
    rotation: std::sync::atomic::AtomicUsize,
    locks: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
    totals: Mutex<Totals>,
    status: StatusSender,
    stock: Option<StockSide>,
    sweeps: Vec<(&'static str, Arc<Progress>)>,
}

impl<C: CommandSink> Ledger<C> {
    pub fn new(
        store: StateStore<Entry>,
        codec: Arc<EventCodec>,
        commands: C,
        policy: Policy,
        commerce_topic: String,
        retention: std::time::Duration,
        status: StatusSender,
    ) -> Self {
        Self {
            store,
            codec,
            commands,
            policy,
            commerce_topic,
            retention,
            held: Arc::default(),
            generations: Mutex::default(),
            next_generation: Default::default(),
            rotation: Default::default(),
            locks: Mutex::default(),
            totals: Mutex::default(),
            status,
            stock: None,
            sweeps: Vec::new(),
        }
    }

    /// Also follows stock facts (`inventory.events`).
    pub fn with_stock(mut self, stock: StockSide) -> Self {
        self.stock = Some(stock);
        self
    }

    /// Reports these sweeps' progress in the status.
    pub fn with_sweeps(mut self, sweeps: Vec<(&'static str, Arc<Progress>)>) -> Self {
        self.sweeps = sweeps;
        self
    }

    fn stock_topic(&self, topic: &str) -> Option<&StockSide> {
        self.stock.as_ref().filter(|s| s.topic == topic)
    }

    /// The lock serialising every read-modify-write of partition `p`.
    pub fn lock(&self, partition: i32) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("locks").entry(partition).or_default().clone()
    }

    /// The current restore of `partition` (`None`: not held).
    fn generation(&self, partition: i32) -> Option<u64> {
        self.generations.lock().expect("generations").get(&partition).copied()
    }

    /// Partitions restored on this replica.
    pub fn partitions(&self) -> Vec<i32> {
        let mut out: Vec<i32> = self.held.lock().expect("held").keys().copied().collect();
        out.sort_unstable();
        out
    }

    /// How many partitions this replica holds, read live (the sweeps' budget share).
    pub fn held_count(&self) -> Arc<dyn Fn() -> usize + Send + Sync> {
        let held = self.held.clone();
        Arc::new(move || held.lock().expect("held").len())
    }

    /// Restores `partition` unless another topic of it already did.
    pub async fn start(&self, topic: &str, partition: i32) -> Result<(), HandlerError> {
        if let Some(stock) = self.stock_topic(topic) {
            return stock.start(partition).await;
        }
        let lock = self.lock(partition);
        let _guard = lock.lock().await;
        if self.held.lock().expect("held").contains_key(&partition) {
            self.held.lock().expect("held").entry(partition).or_default().insert(topic.to_owned());
            return Ok(());
        }
        let keys = self
            .store
            .restore_async(partition)
            .await
            .map_err(|e| HandlerError::new(e.class(), e.code(), e.to_string()))?;
        tracing::info!(partition, keys, "ledger partition restored");
        let generation = self.next_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.generations.lock().expect("generations").insert(partition, generation);
        self.held.lock().expect("held").entry(partition).or_default().insert(topic.to_owned());
        Ok(())
    }

    /// Forgets `partition` once no topic holds it. Runs on the poll thread: waits (bounded) for
    /// a check or sweep working on the partition, so none writes its changelog after the new
    /// owner restored it (they re-check `held` once they have the lock).
    pub fn stop(&self, topic: &str, partition: i32) {
        if let Some(stock) = self.stock_topic(topic) {
            return stock.stop(partition);
        }
        let lock = self.lock(partition);
        let _guard = elo_kafka::state::wait_for_partition_lock(&lock, std::time::Duration::from_secs(10));
        if _guard.is_none() {
            tracing::warn!(partition, "revoked while the ledger partition was still in use");
        }
        let mut held = self.held.lock().expect("held");
        if let Some(topics) = held.get_mut(&partition) {
            topics.remove(topic);
            if topics.is_empty() {
                held.remove(&partition);
                self.generations.lock().expect("generations").remove(&partition);
                self.store.release(partition);
            }
        }
    }

    fn count(&self, effect: &Effect) {
        let mut totals = self.totals.lock().expect("totals");
        for (target, kind) in &effect.repaired {
            // Bounded label: a target the policy does not know is not a series of its own.
            let known = target == repair::SOURCE || self.policy.targets.iter().any(|t| &t.name == target);
            let target = if known { target.clone() } else { "other".to_owned() };
            let target = &target;
            metrics::REPAIRED.with_label_values(&[kind.as_str(), target]).inc();
            *totals.repaired.entry(target.clone()).or_default() += 1;
        }
    }

    /// Folds a batch of one partition into the ledger. Entries are written once per batch,
    /// before the records are reported done.
    pub async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        let Some(first) = batch.first() else { return Vec::new() };
        if let Some(stock) = self.stock_topic(&first.topic) {
            return stock.handle(&self.codec, batch).await;
        }
        let partition = first.partition;
        let lock = self.lock(partition);
        let _guard = lock.lock().await;
        let generation = self.generation(partition);
        let now = now_ms();
        let mut results: Vec<Result<(), HandlerError>> = Vec::with_capacity(batch.len());
        let mut touched: BTreeMap<String, Option<Entry>> = BTreeMap::new();
        // Counted once the batch is written (a batch that comes again is not counted twice).
        let mut effects: Vec<Effect> = Vec::new();
        let get = |touched: &BTreeMap<String, Option<Entry>>, key: &str| match touched.get(key) {
            Some(entry) => entry.clone(),
            None => self.store.get(partition, key),
        };
        for record in batch {
            if record.topic == self.commerce_topic {
                let event: CommerceEvent = match elo_service::decode_record(&self.codec, record).await {
                    Ok(e) => e,
                    Err(e) => {
                        results.push(Err(e));
                        continue;
                    }
                };
                if ledger::is_erasure(&event) {
                    // The person is gone: so is everything the ledger held about them.
                    let mut keys: BTreeSet<String> = self
                        .store
                        .entries(partition)
                        .into_iter()
                        .filter(|(_, e)| e.customer_key == event.customer_key)
                        .map(|(k, _)| k)
                        .collect();
                    keys.extend(
                        touched
                            .iter()
                            .filter(|(_, e)| e.as_ref().is_some_and(|e| e.customer_key == event.customer_key))
                            .map(|(k, _)| k.clone()),
                    );
                    for k in keys {
                        touched.insert(k, None);
                    }
                    // Remembered a while: the erasure's own outcomes (they carry target ids),
                    // late older versions and sweep findings must not bring the person back.
                    let mark = Entry::erasure_mark(&event.customer_key, event.source_version.updated_at, now);
                    touched.insert(ledger::erased_key(&event.customer_key), Some(mark));
                } else if ledger::erasure_hides(
                    get(&touched, &ledger::erased_key(&event.customer_key)).as_ref(),
                    Some(event.source_version.updated_at),
                ) {
                    tracing::debug!("an event from before its customer's erasure: ignored");
                } else {
                    let v = &event.source_version;
                    let key = ledger::key(&v.entity_type, &v.entity_id);
                    let mut entry = get(&touched, &key).unwrap_or_else(|| Entry::for_event(&event));
                    let effect = entry.apply_event(&event, now);
                    effects.push(effect);
                    // The contact rdstation-sink writes, folded by its rule (the RD sweep's yardstick).
                    let mark_key = crate::contact::contact_key(&event.customer_key);
                    if let Some(mark) = crate::contact::fold(get(&touched, &mark_key), &event, &key, now) {
                        touched.insert(mark_key, Some(mark));
                    }
                    touched.insert(key, Some(entry));
                }
                metrics::RECORDS.with_label_values(&["event"]).inc();
            } else {
                let outcome: SyncOutcome = match elo_service::decode_record(&self.codec, record).await {
                    Ok(o) => o,
                    Err(e) => {
                        results.push(Err(e));
                        continue;
                    }
                };
                let v = &outcome.source_version;
                let key = ledger::key(&v.entity_type, &v.entity_id);
                if ledger::erasure_hides(
                    get(&touched, &ledger::erased_key(&outcome.customer_key)).as_ref(),
                    Some(v.updated_at),
                ) {
                    // The erasure's own outcome (or older news): nothing to keep about the person.
                    metrics::RECORDS.with_label_values(&["outcome"]).inc();
                    results.push(Ok(()));
                    continue;
                }
                let mut entry = get(&touched, &key).unwrap_or_else(|| Entry::for_outcome(&outcome));
                let effect = entry.apply_outcome(&outcome, now);
                effects.push(effect);
                touched.insert(key, Some(entry));
                metrics::RECORDS.with_label_values(&["outcome"]).inc();
            }
            results.push(Ok(()));
        }
        for (key, entry) in touched {
            if self.generation(partition) != generation {
                // Released (stop gave up waiting) or restored anew meanwhile: the batch comes
                // again to whoever holds the partition now.
                let e = HandlerError::transient("ledger_partition_released", "the ledger partition was released");
                return vec![Err(e); batch.len()];
            }
            let written = match entry {
                Some(entry) => self.store.put(partition, &key, entry).await,
                None => self.store.remove(partition, &key).await,
            };
            if let Err(error) = written {
                // Nothing is done until the ledger holds it: the batch comes again.
                let e = HandlerError::new(error.class(), format!("ledger_{}", error.code()), error.to_string());
                return vec![Err(e); batch.len()];
            }
        }
        for effect in &effects {
            self.count(effect);
        }
        results
    }

    /// Records a sweep's finding on `key` in `partition`. When the ledger has no entry only
    /// `create` may make one (a fully identified entity: a lost webhook's order); a target's
    /// drift on an entry that has gone meanwhile is dropped, never recorded on a nameless
    /// entry. Findings about an erased customer are dropped too. Returns whether it was new.
    pub async fn flag(
        &self,
        partition: i32,
        key: &str,
        target: &str,
        kind: DriftKind,
        version: i64,
        create: impl FnOnce() -> Option<Entry>,
    ) -> Result<bool, elo_kafka::Error> {
        let lock = self.lock(partition);
        let _guard = lock.lock().await;
        if !self.held.lock().expect("held").contains_key(&partition) {
            return Ok(false); // revoked meanwhile: the new owner's sweep will see it
        }
        let Some(mut entry) = self.store.get(partition, key).or_else(create) else { return Ok(false) };
        if entry.kind.is_empty()
            || ledger::erasure_hides(self.store.get(partition, &ledger::erased_key(&entry.customer_key)).as_ref(), None)
            || !entry.flag_drift(target, kind, version, now_ms())
        {
            return Ok(false);
        }
        self.store.put(partition, key, entry).await?;
        metrics::DRIFT_FOUND.with_label_values(&[kind.as_str(), target]).inc();
        *self.totals.lock().expect("totals").drift_found.entry(target.to_owned()).or_default() += 1;
        tracing::info!(partition, key, target, kind = kind.as_str(), "drift found");
        Ok(true)
    }

    /// One pass over every restored partition: measures the ledger, sends the repairs the
    /// policy calls for (bounded by `max_commands`, see [`crate::plan`]), and publishes the
    /// status. The plan is made on a snapshot; commands go out with no partition lock held;
    /// each write re-checks under the lock that this replica still holds the same restore of
    /// the partition and that the entry's repair state did not move meanwhile.
    pub async fn check(&self, max_commands: usize) -> LedgerStatus {
        let now = now_ms();
        let mut figures = Figures::default();
        let mut snapshot: Vec<(i32, String, Entry)> = Vec::new();
        let mut generations = HashMap::new();
        for partition in self.partitions() {
            let Some(generation) = self.generation(partition) else { continue };
            generations.insert(partition, generation);
            let mut entries = self.store.entries(partition);
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            snapshot.extend(entries.into_iter().map(|(k, e)| (partition, k, e)));
        }
        for (_, key, entry) in &snapshot {
            if !entry.is_mark() && !repair::expired(entry, &self.policy, self.retention, now) {
                figures.count(key, entry, &self.policy, now);
            }
        }
        let start = self.rotation.load(std::sync::atomic::Ordering::Relaxed);
        let mut plan = crate::plan::plan(&snapshot, &self.policy, self.retention, now, max_commands, start);
        drop(snapshot);
        self.rotation.store(plan.next_start, std::sync::atomic::Ordering::Relaxed);
        for target in &plan.suspended {
            tracing::warn!(target = %target, "most of the target's entries are overdue: the sink is down or lagging; overdue repairs suspended");
        }
        // Commands first, outside any lock; an entry whose command failed keeps its old state.
        for planned in &mut plan.planned {
            let Some((command, problem)) = &planned.command else { continue };
            if let Err(error) = self.commands.send(command).await {
                tracing::warn!(key = %planned.key, error = %error, "cannot send a repair command; next check tries again");
                planned.entry.repair.clone_from(&planned.before);
                planned.command = None;
                continue;
            }
            metrics::COMMANDS.with_label_values(&[command_name(command), problem.reason()]).inc();
            tracing::info!(key = %planned.key, command = command_name(command), target = %problem.target, reason = problem.reason(), attempt = planned.entry.repair.as_ref().map_or(0, |r| r.attempts), "repair requested");
        }
        for ((target, reason), (count, keys)) in &plan.escalations {
            metrics::ESCALATED.with_label_values(&[*reason, target.as_str()]).inc_by(*count);
            *self.totals.lock().expect("totals").escalated.entry(target.clone()).or_default() += count;
            tracing::error!(target = %target, reason, count, keys = ?keys, "repairs escalated: a person must look");
        }
        let mut by_partition: BTreeMap<i32, (Vec<String>, Vec<crate::plan::Planned>)> = BTreeMap::new();
        for (partition, key) in plan.expired {
            by_partition.entry(partition).or_default().0.push(key);
        }
        for planned in plan.planned {
            by_partition.entry(planned.partition).or_default().1.push(planned);
        }
        for (partition, (expired, planned)) in by_partition {
            let lock = self.lock(partition);
            let _guard = lock.lock().await;
            let generation = generations.get(&partition).copied();
            for key in expired {
                if self.generation(partition) != generation {
                    break; // released (or restored again) meanwhile: not ours to write
                }
                let still = self
                    .store
                    .get(partition, &key)
                    .is_some_and(|e| repair::expired(&e, &self.policy, self.retention, now));
                if still && let Err(error) = self.store.remove(partition, &key).await {
                    tracing::warn!(key, error = %error, "cannot retire a settled entry; next check tries again");
                }
            }
            for planned in planned {
                if self.generation(partition) != generation {
                    break;
                }
                let Some(mut current) = self.store.get(partition, &planned.key) else { continue };
                if planned.entry.repair == planned.before || current.repair != planned.before {
                    continue; // moved meanwhile (or the command was not sent): next check decides again
                }
                current.repair = planned.entry.repair;
                if let Err(error) = self.store.put(partition, &planned.key, current).await {
                    tracing::warn!(key = %planned.key, error = %error, "cannot persist the repair state; next check tries again");
                }
            }
        }
        let mut status = figures.into_status(
            &self.policy,
            self.partitions().len() as u32,
            &self.totals.lock().expect("totals"),
            now,
        );
        if let Some(stock) = &self.stock {
            let stuck = stock.stuck(now);
            status.negative_stock = stuck.len() as u64;
            status.negative_stock_skus = stuck.into_iter().take(LIST_CAP).collect();
        }
        status.sweeps = self
            .sweeps
            .iter()
            .map(|(name, p)| {
                let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                let s = SweepStatus {
                    calls: get(&p.calls),
                    checked: get(&p.checked),
                    found: get(&p.found),
                    rounds: get(&p.rounds),
                };
                ((*name).to_owned(), s)
            })
            .collect();
        metrics::publish(&status);
        self.status.send_replace(status.clone());
        status
    }
}

fn command_name(command: &IntegrationCommand) -> &'static str {
    match command.command_type {
        elo_events::CommandType::RefetchOrder => "refetch_order",
        elo_events::CommandType::RefetchCustomer => "refetch_customer",
        elo_events::CommandType::Resend => "resend",
        elo_events::CommandType::Unknown => "unknown",
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// The consumer runtime's handler.
pub struct LedgerHandler<C>(pub Arc<Ledger<C>>);

impl<C: CommandSink> elo_kafka::Handler for LedgerHandler<C> {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        self.0.handle(batch).await
    }

    async fn on_partition_start(&self, topic: &str, partition: i32) -> Result<(), HandlerError> {
        self.0.start(topic, partition).await
    }

    fn on_revoked(&self, topic: &str, partition: i32) {
        self.0.stop(topic, partition);
    }
}
