//! The consumer handler: a batch of one partition's `commerce.events` becomes RD e-commerce
//! events (each at most once per order and type, through the sent-log), per-customer state in
//! the state store, and at most one contact sync per customer touched by the batch
//! (coalesced; the write itself and the erasure are in `handler/contact.rs`).
//!
//! Customers of a batch are worked in parallel (bounded), each in offset order; a customer
//! stops at its first failed record, and its later records wait for it (they are never
//! reported done unprocessed). Order of effects, so a crash or a retry at any point repeats
//! nothing RD acknowledged:
//! 1. fold the record into the customer's state (in memory, idempotent);
//! 2. send the events the order calls for that the sent-log lacks; each acknowledged event is
//!    written to the sent-log before the customer's next request (a crash between RD's answer
//!    and that write is the only way an event is sent twice: the one in flight);
//! 3. after the customer's records, sync its contact (or defer the write to the sweep when the
//!    budgets are spent or RD's 429 asks to wait), and persist its state together with the
//!    last sent-log write;
//! 4. publish an outcome per record done before the batch's first retriable failure on
//!    `integration.outcomes`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use elo_events::{CommerceEvent, EventCodec, OutcomeStatus, SourceVersion, SyncOutcome};
use elo_kafka::{ErrorClass, HandlerError, Producer, Record, StateStore};
use reqwest::Method;

use crate::aggregates::CustomerState;
use crate::client::{Budget, RdClient};
use crate::contacts;
use crate::events::{EventMapping, Sent};
use crate::metrics;
use crate::rules::Rules;

mod batch;
mod contact;
mod resend;
mod sweep;
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
    /// Customers of one partition's batch worked at the same time.
    pub customer_concurrency: usize,
    /// Create the custom fields the mapping and rules need when RD lacks them.
    pub create_fields: bool,
    /// Whether RD's custom fields were checked (done on the first batch, not at startup:
    /// readiness must not depend on RD).
    fields_checked: AtomicBool,
    fields_lock: tokio::sync::Mutex<()>,
    restored: Mutex<HashSet<i32>>,
    /// Restored partitions whose contacts the rules in use were not applied to yet (new rules,
    /// or a restore found the partition's marker naming other rules).
    rules_pending: Mutex<HashSet<i32>>,
    /// Partitions assigned to this member (restores of others are dropped).
    assigned: Mutex<HashSet<i32>>,
    restoring: Mutex<()>,
    /// Where restores run off the consumer's poll thread.
    runtime: Option<tokio::runtime::Handle>,
    /// Customers whose contact update waits for the per-contact budget, so the periodic flush
    /// does not scan every customer.
    deferred: Mutex<HashMap<(i32, String), Deferral>>,
    /// Set when a batch found the account budget spent, until the sweep has gone through the
    /// deferred writes: meanwhile batches never queue for the budget (a contact write takes
    /// only a cell free at that instant, else it is deferred), so their customers' events never
    /// wait behind contact writes.
    contact_backlog: AtomicBool,
    /// One per partition: a batch and the rules sweep never work on a partition's state at
    /// the same time (either would overwrite the other's aggregates).
    partition_locks: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
    /// Each partition's share of RD's daily tag posts ([`crate::tag_posts`]).
    tag_post_share: AtomicU32,
    /// A partition's tag posts are counted one at a time (read its ledger, count, save it).
    tag_post_locks: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
    /// Reservations are collected by one task at a time (the sweep's for a contact, a batch's
    /// for its erasures): two collecting a slot at a time, each holding what it has, could
    /// hold the whole budget between them and wait for ever.
    reserving: tokio::sync::Mutex<()>,
    /// How long the sent-log remembers an event, from when it occurred; an event older than
    /// this is not sent at all (so a pruned entry can never let an event through twice).
    sent_log_retention_ms: std::sync::atomic::AtomicI64,
}

/// A partition's share of RD's daily tag posts, as [`contacts::sync`] spends it.
pub(crate) struct PartitionTagPosts<'a> {
    pub sink: &'a Sink,
    pub partition: i32,
}

impl contacts::TagPosts for PartitionTagPosts<'_> {
    fn left(&self) -> bool {
        self.sink.tag_posts_left(self.partition, now_ms())
    }

    fn take(&self) -> futures::future::BoxFuture<'_, crate::client::Result<Option<i64>>> {
        Box::pin(self.sink.take_tag_post(self.partition))
    }

    fn give_back(&self, hour: i64) -> futures::future::BoxFuture<'_, crate::client::Result<()>> {
        Box::pin(self.sink.give_back_tag_post(self.partition, hour))
    }
}

/// Who writes a contact: a batch (never waits for the account budget: the write is deferred)
/// or the sweep (with the budget it reserved for this contact).
pub(crate) enum Write<'a> {
    Batch,
    Sweep(&'a RdClient),
}

/// An acknowledged event's sent-log write, not awaited yet.
type SentWrite<'a> = futures::future::BoxFuture<'a, Result<(), HandlerError>>;

/// A contact write waiting for the sweep: not tried before `due_ms` (its per-contact budget
/// has room, a 429's wait is over, or the backoff after `failures` transient failures ran out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Deferral {
    pub due_ms: i64,
    pub failures: u32,
}

/// The key of a partition's rules marker in the customers' store (no customer key starts
/// with a NUL): its state holds only `rules_applied`, no e-mail, so nothing writes it to RD.
pub const RULES_MARKER: &str = "\u{0}elo:rules-applied";

/// The key of a partition's tag-post ledger in the customers' store (see [`RULES_MARKER`]).
pub const TAG_POSTS_MARKER: &str = "\u{0}elo:tag-posts";

/// The key of a partition's sent-log pruning high-water mark in the customers' store.
pub const SENT_LOG_PRUNED_MARKER: &str = "\u{0}elo:sent-log-pruned";

/// Whether a key of the customers' store is one of the partition's markers, not a customer.
pub fn is_marker(key: &str) -> bool {
    key.starts_with('\u{0}')
}

/// RD counts tag posts per day.
const TAG_POST_WINDOW_MS: i64 = 86_400_000;

/// Whether a restored partition's contacts need a rules pass: its marker names no rules, or
/// other rules than those in use (new rules while the partition was elsewhere, or a pass cut
/// short by a restart or a rebalance).
pub(crate) fn needs_rules_pass(marker: Option<&CustomerState>, rules: &Rules) -> bool {
    marker.and_then(|m| m.rules_applied) != Some(rules.fingerprint())
}

/// The sent-log's default retention (90 days).
pub const DEFAULT_SENT_LOG_RETENTION_MS: i64 = 90 * 86_400_000;

/// RD's limit on tag posts per account per day (saas-apis.md §3).
pub const RD_TAG_POSTS_PER_DAY: u32 = 15_000;

/// Writes allowed per contact in a sliding window (RD: 24 in 24 h).
#[derive(Clone, Copy, Debug)]
pub struct ContactBudget {
    pub per_contact: usize,
    pub window: std::time::Duration,
}

impl ContactBudget {
    pub fn window_ms(&self) -> i64 {
        self.window.as_millis() as i64
    }
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
        customer_concurrency: usize,
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
            customer_concurrency,
            create_fields,
            fields_checked: AtomicBool::new(false),
            fields_lock: tokio::sync::Mutex::new(()),
            restored: Mutex::default(),
            rules_pending: Mutex::default(),
            assigned: Mutex::default(),
            restoring: Mutex::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            deferred: Mutex::default(),
            contact_backlog: AtomicBool::new(false),
            partition_locks: Mutex::default(),
            // No tag posts (tags by PATCH) until the input topic's partitions are known.
            tag_post_share: AtomicU32::new(0),
            tag_post_locks: Mutex::default(),
            reserving: tokio::sync::Mutex::new(()),
            sent_log_retention_ms: std::sync::atomic::AtomicI64::new(DEFAULT_SENT_LOG_RETENTION_MS),
        }
    }

    /// Sets how long the sent-log remembers an event (and so how old an event may be and
    /// still be sent).
    pub fn set_sent_log_retention(&self, retention: std::time::Duration) {
        let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        self.sent_log_retention_ms.store(ms, Ordering::Release);
    }

    /// The oldest order (by `created_at`) that may get an RD event at `now_ms`.
    fn sent_log_horizon(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.sent_log_retention_ms.load(Ordering::Acquire))
    }

    /// Entries of orders created before this are pruned: the horizon less a margin (a tenth
    /// of the retention, at most a day), so a replica whose clock runs behind the pruning
    /// one's, or a Magento clock ahead of the sink's for entries aged from when they were
    /// sent, never finds an order young enough to send whose entry is gone.
    fn prune_horizon(&self, now_ms: i64) -> i64 {
        let retention = self.sent_log_retention_ms.load(Ordering::Acquire);
        let margin = (retention / 10).min(86_400_000);
        now_ms.saturating_sub(retention.saturating_add(margin))
    }

    /// Drops the sent-log entries of orders older than the retention (tombstones in its
    /// changelog), partition by partition, a chunk at a time under the partition's lock (the
    /// lock is let go between chunks: batches are not held up by a long prune). Returns how
    /// many.
    pub async fn prune_sent_log(&self) -> usize {
        const CHUNK: usize = 512;
        let partitions: Vec<i32> = self.restored.lock().expect("restored lock").iter().copied().collect();
        let mut pruned = 0;
        for partition in partitions {
            let horizon = self.prune_horizon(now_ms());
            let old = self.sent.keys_where(partition, |s| s.aged_from_ms() < horizon);
            if old.is_empty() {
                continue;
            }
            // Recorded first: orders created before the horizon get no event from now on, even
            // if the retention is raised later (their entries are gone).
            if let Err(error) = self.record_pruned_before(partition, horizon).await {
                tracing::warn!(partition, error = %error, "cannot record the sent-log's pruning; will retry");
                continue;
            }
            for chunk in old.chunks(CHUNK) {
                let lock = self.partition_lock(partition);
                let _guard = lock.lock().await;
                if !self.restored.lock().expect("restored lock").contains(&partition) {
                    break;
                }
                let removals = chunk.iter().map(|key| self.sent.remove(partition, key));
                let results = futures::future::join_all(removals).await;
                pruned += results.iter().filter(|r| r.is_ok()).count();
                if let Some(Err(error)) = results.into_iter().find(Result::is_err) {
                    tracing::warn!(partition, error = %error, "cannot prune the sent-log; will retry");
                    break;
                }
            }
        }
        metrics::SENT_LOG_PRUNED.inc_by(pruned as u64);
        pruned
    }

    /// The oldest order `created_at` that may get an RD event in `partition`: the retention's
    /// horizon, or the partition's pruning high-water mark when that is later (the retention
    /// was raised after entries were pruned).
    fn send_horizon(&self, partition: i32, now_ms: i64) -> i64 {
        let pruned = self.customers.get(partition, SENT_LOG_PRUNED_MARKER).and_then(|m| m.pruned_before);
        self.sent_log_horizon(now_ms).max(pruned.unwrap_or(i64::MIN))
    }

    /// Raises the partition's pruning high-water mark to `horizon` (under its partition lock).
    async fn record_pruned_before(&self, partition: i32, horizon: i64) -> Result<(), elo_kafka::Error> {
        let lock = self.partition_lock(partition);
        let _guard = lock.lock().await;
        let mut marker = self.customers.get(partition, SENT_LOG_PRUNED_MARKER).unwrap_or_default();
        if marker.pruned_before.is_some_and(|p| p >= horizon) {
            return Ok(());
        }
        marker.pruned_before = Some(horizon);
        self.customers.put(partition, SENT_LOG_PRUNED_MARKER, marker).await
    }

    /// Sets each partition's share of the account's daily tag posts (RD: 15,000), from the
    /// input topic's partition count.
    pub fn set_tag_posts_per_day(&self, per_day: u32, partitions: i32) {
        let share = crate::tag_posts::share(per_day, partitions);
        if self.tag_post_share.swap(share, Ordering::AcqRel) != share {
            tracing::info!(per_day, partitions, share, "tag posts per partition per day");
        }
    }

    /// Whether the partition's tag posts of the last day leave room for one more.
    pub(crate) fn tag_posts_left(&self, partition: i32, now_ms: i64) -> bool {
        let ledger = self.customers.get(partition, TAG_POSTS_MARKER).and_then(|m| m.tag_posts).unwrap_or_default();
        ledger.left(self.tag_post_share.load(Ordering::Acquire), TAG_POST_WINDOW_MS, now_ms) > 0
    }

    /// Counts one tag post against the partition's share and saves the ledger before the post
    /// is sent (a crash after RD took it must not forget it): the hour it was counted in, or
    /// `None` when the share is spent.
    pub(crate) async fn take_tag_post(&self, partition: i32) -> crate::client::Result<Option<i64>> {
        let share = self.tag_post_share.load(Ordering::Acquire);
        let mut hour = None;
        self.update_tag_posts(partition, |ledger, now| {
            hour = ledger.take(share, TAG_POST_WINDOW_MS, now);
            hour.is_some()
        })
        .await?;
        Ok(hour)
    }

    /// Gives back a tag post counted in `hour` and never sent.
    pub(crate) async fn give_back_tag_post(&self, partition: i32, hour: i64) -> crate::client::Result<()> {
        self.update_tag_posts(partition, |ledger, _| {
            ledger.give_back(hour);
            true
        })
        .await
        .map(|_| ())
    }

    /// Changes the partition's ledger under its lock and saves it when `change` says so.
    async fn update_tag_posts(
        &self,
        partition: i32,
        change: impl FnOnce(&mut crate::tag_posts::TagPostLedger, i64) -> bool,
    ) -> crate::client::Result<bool> {
        let lock = self.tag_post_locks.lock().expect("tag post locks").entry(partition).or_default().clone();
        let _one_at_a_time = lock.lock().await;
        let now = now_ms();
        let mut marker = self.customers.get(partition, TAG_POSTS_MARKER).unwrap_or_default();
        let mut ledger = marker.tag_posts.take().unwrap_or_default();
        let changed = change(&mut ledger, now);
        if changed {
            marker.tag_posts = Some(ledger);
            self.customers
                .put(partition, TAG_POSTS_MARKER, marker)
                .await
                .map_err(|e| crate::client::Error::Transient(format!("tag post ledger write: {e}")))?;
        }
        self.report_tag_posts_left(now);
        Ok(changed)
    }

    fn report_tag_posts_left(&self, now: i64) {
        let share = self.tag_post_share.load(Ordering::Acquire);
        let restored: Vec<i32> = self.restored.lock().expect("restored lock").iter().copied().collect();
        let left: u32 = restored
            .into_iter()
            .map(|p| {
                let ledger = self.customers.get(p, TAG_POSTS_MARKER).and_then(|m| m.tag_posts).unwrap_or_default();
                ledger.left(share, TAG_POST_WINDOW_MS, now)
            })
            .sum();
        metrics::TAG_POSTS_LEFT.set(i64::from(left));
    }

    /// Restores the partition's state from the changelogs (blocking; one partition at a time),
    /// unless it is restored already or no longer assigned.
    fn restore(&self, partition: i32) -> bool {
        let _one_at_a_time = self.restoring.lock().expect("restoring lock");
        if self.restored.lock().expect("restored lock").contains(&partition) {
            return true;
        }
        if !self.assigned.lock().expect("assigned lock").contains(&partition) {
            return false;
        }
        let result = self.customers.restore(partition).and_then(|_| self.sent.restore(partition));
        match result {
            Ok(_) if !self.assigned.lock().expect("assigned lock").contains(&partition) => {
                // Revoked while restoring: the new owner's state, not ours.
                self.customers.release(partition);
                self.sent.release(partition);
                false
            }
            Ok(_) => {
                let now = now_ms();
                let waiting = self.customers.entries(partition).into_iter().filter(|(_, s)| s.deferred);
                let waiting = waiting.map(|(k, s)| {
                    let due_ms = s.writable_at(self.budget.per_contact, self.budget.window_ms(), now);
                    ((partition, k), Deferral { due_ms, failures: 0 })
                });
                self.deferred.lock().expect("deferred lock").extend(waiting);
                if needs_rules_pass(self.customers.get(partition, RULES_MARKER).as_ref(), &self.rules()) {
                    self.rules_pending.lock().expect("rules pending lock").insert(partition);
                }
                self.restored.lock().expect("restored lock").insert(partition);
                self.report_tag_posts_left(now);
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
    pub async fn ensure_fields(&self) -> Result<(), HandlerError> {
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

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().expect("rules lock").clone()
    }

    /// Sends the events `event` calls for that RD has not acknowledged yet; returns their types.
    /// The sent-log write of the last event sent is left in `pending` (the caller awaits it
    /// together with the customer's state write, one broker round trip instead of two); any
    /// earlier pending write is awaited before the next request, so at most one event per
    /// customer is ever acknowledged by RD without being in the sent-log or in flight.
    async fn send_events<'a>(
        &'a self,
        partition: i32,
        event: &CommerceEvent,
        pending: &mut Option<SentWrite<'a>>,
    ) -> Result<Vec<String>, HandlerError> {
        let mut sent = Vec::new();
        for rd in self.mapping.events_for(event) {
            if let Some(write) = pending.take() {
                write.await?;
            }
            if self.sent.get(partition, &rd.id).is_some() {
                metrics::EVENTS_SKIPPED.with_label_values(&[&rd.event_type]).inc();
                continue;
            }
            // An order older than the sent-log's retention may have lost its entries: sending
            // could repeat them (every version of an order calls for ORDER_PLACED again). Its
            // later events (a refund months on) are no news for RD's automations either.
            let created_at = event.order.as_ref().map_or(event.occurred_at, |o| o.created_at);
            if created_at < self.send_horizon(partition, now_ms()) {
                metrics::EVENTS_TOO_OLD.with_label_values(&[&rd.event_type]).inc();
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
                order_created_at_ms: Some(created_at),
            };
            let (log, id) = (&self.sent, rd.id);
            *pending = Some(Box::pin(async move {
                log.put(partition, &id, entry).await.map_err(|e| kafka_failure("sent_log", &e))
            }));
            sent.push(rd.event_type);
        }
        Ok(sent)
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
            .send(
                &self.outcomes_topic,
                event.customer_key.as_bytes(),
                &bytes,
                Some(elo_events::SyncOutcome::EVENT_TYPE),
            )
            .await
            .map_err(|e| kafka_failure("outcome", &e))?;
        Ok(())
    }
}

pub(crate) fn kafka_failure(stage: &str, error: &elo_kafka::Error) -> HandlerError {
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

    /// Starts restoring the partition's state at once, but off the poll thread: a restore
    /// takes seconds on a busy broker, and blocking the rebalance callback that long lets the
    /// group session expire (the assignment is lost and the restore starts over). The first
    /// batch waits for it (`ensure_restored`).
    fn on_assigned(&self, _topic: &str, partition: i32) {
        self.0.assigned.lock().expect("assigned lock").insert(partition);
        let sink = self.0.clone();
        match &self.0.runtime {
            Some(runtime) => drop(runtime.spawn_blocking(move || sink.restore(partition))),
            None => {
                sink.restore(partition);
            }
        }
    }

    fn on_revoked(&self, _topic: &str, partition: i32) {
        // Wait (bounded: a batch that would not end must not hold the poll thread) for a rules
        // or deferred-update sweep working on this partition, so it cannot write the
        // partition's changelog after the new owner restored it; the sweep re-checks
        // `restored` once it has the lock.
        let lock = self.0.partition_lock(partition);
        let _guard = elo_kafka::state::wait_for_partition_lock(&lock, std::time::Duration::from_secs(10));
        if _guard.is_none() {
            tracing::warn!(partition, "revoked while the partition's state was still in use");
        }
        self.0.assigned.lock().expect("assigned lock").remove(&partition);
        self.0.restored.lock().expect("restored lock").remove(&partition);
        self.0.rules_pending.lock().expect("rules pending lock").remove(&partition);
        self.0.deferred.lock().expect("deferred lock").retain(|(p, _), _| *p != partition);
        self.0.customers.release(partition);
        self.0.sent.release(partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_restored_without_a_record_of_the_rules_in_use_gets_a_rules_pass() {
        let v1 = Rules::parse("[[rule]]\nname = \"a\"\ntags = [\"x\"]\n", "v1").unwrap();
        let v2 = Rules::parse("[[rule]]\nname = \"a\"\ntags = [\"y\"]\n", "v2").unwrap();
        // The same rules, laid out differently, are the same rules.
        let v1_again = Rules::parse("# tags\n[[rule]]\nname = \"a\"\ntags = [ \"x\" ]\n", "v1b").unwrap();
        assert_eq!(v1.fingerprint(), v1_again.fingerprint());
        let marker = |rules: &Rules| CustomerState { rules_applied: Some(rules.fingerprint()), ..Default::default() };
        // Never recorded (first start, or a pass a restart cut short before its end).
        assert!(needs_rules_pass(None, &v1));
        // Applied before the restart or on the previous owner: nothing to do.
        assert!(!needs_rules_pass(Some(&marker(&v1)), &v1_again));
        // The rules changed while the partition was elsewhere (or the pass never finished).
        assert!(needs_rules_pass(Some(&marker(&v1)), &v2));
        // The marker is no customer: no e-mail, so no sweep or dry run writes it to RD.
        assert!(marker(&v1).identity.email.is_empty());
        assert!(crate::dry_run::changes(&marker(&v1), &v2, 0).is_empty());
    }
}
