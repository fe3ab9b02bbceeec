//! The poll thread: owns the librdkafka consumer, hands records to partition workers, pauses
//! what is behind, stores done offsets for librdkafka to commit, and handles rebalances.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elo_telemetry::Health;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::worker::{self, Shared, TopicPartition, WorkerHandle};
use super::{ConsumerSettings, Handler, Record};
use crate::dlq::DeadLetterSink;
use crate::producer::ConnectionContext;
use crate::{Result, metrics};

/// Readiness check of the consumer's broker connection.
const CONNECTION_CHECK: &str = "kafka_consumer_connection";
/// Readiness check that fails while any partition is halted.
const HALTED_CHECK: &str = "kafka_partitions";
/// How often a degraded connection is probed with a metadata request.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// Worker restarts without progress before the partition is halted and the process not live.
const MAX_REVIVES: u32 = 3;

/// The poll thread's view of one assigned partition.
struct Partition {
    worker: WorkerHandle,
    /// Last done offset handed to librdkafka's offset store.
    stored: i64,
    /// First offset ever dispatched here, to seek back to if the worker dies before finishing one.
    first_dispatched: i64,
    /// The record that found the buffer full; the partition is paused until it is handed over.
    parked: Option<Record>,
    /// A record arrived while paused and was dropped: seek to just after `parked` on resume.
    seek_on_resume: bool,
    /// Why the partition was stopped for good (until it is revoked or the process restarts).
    halted: Option<String>,
    /// Worker restarts since the done offset last moved, and where it stood then.
    revives: (u32, i64),
}

struct RuntimeContext<H, D> {
    connection: ConnectionContext,
    shared: Arc<Shared<H, D>>,
    partitions: Mutex<HashMap<TopicPartition, Partition>>,
    /// Workers aborted after a drain timeout that had not ended yet: their partition must not
    /// be worked again until they have.
    zombies: Mutex<HashMap<TopicPartition, WorkerHandle>>,
    health: Health,
}

impl<H: Handler, D: DeadLetterSink> ClientContext for RuntimeContext<H, D> {
    // Statistics are the producer's: a consumer's emissions are dropped (see there).
    fn stats_raw(&self, statistics: &[u8]) {
        self.connection.stats_raw(statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.connection.error(error, reason);
    }
}

impl<H: Handler, D: DeadLetterSink> ConsumerContext for RuntimeContext<H, D> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<TopicPartition> =
                tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            if consumer.assignment_lost() {
                // The group already gave these partitions to someone else: committing now
                // could move their offsets under the new owner. Stop, and leave the rest to it.
                metrics::REBALANCES.with_label_values(&["lost"]).inc();
                tracing::warn!(partitions = ?partitions, "assignment lost; stopping workers without committing");
                self.stop_partitions(consumer, &partitions, false);
            } else {
                metrics::REBALANCES.with_label_values(&["revoke"]).inc();
                tracing::info!(partitions = ?partitions, "partitions revoked, draining");
                self.stop_partitions(consumer, &partitions, true);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::REBALANCES.with_label_values(&["assign"]).inc();
                for e in tpl.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    self.assign(consumer, tp);
                }
                let count = self.partitions.lock().expect("partitions lock").len();
                tracing::info!(assigned = count, "partitions assigned");
                self.health.set_ready(crate::producer::AUTH_CHECK, true, "credentials accepted");
                self.health.set_ready("kafka_consumer", true, format!("group joined, {count} partitions"));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                metrics::REBALANCES.with_label_values(&["error"]).inc();
                tracing::error!(error = %error, "rebalance failed");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        metrics::COMMITTED_OFFSET.with_label_values(&[e.topic(), &e.partition().to_string()]).set(o);
                    }
                }
            }
            Err(error) => {
                // librdkafka commits the stored offsets again on its next interval.
                metrics::COMMIT_ERRORS.with_label_values(&["auto"]).inc();
                tracing::warn!(error = %error, offsets = ?tpl_summary(offsets), "offset commit failed; retried on the next interval");
            }
        }
    }
}

impl<H: Handler, D: DeadLetterSink> RuntimeContext<H, D> {
    fn assign(&self, consumer: &impl PartitionControl, tp: TopicPartition) {
        if self.partitions.lock().expect("partitions lock").contains_key(&tp) {
            return;
        }
        let zombie_running = self.zombies.lock().expect("zombies lock").remove(&tp).and_then(|zombie| {
            match zombie.finished.recv_timeout(self.shared.settings.drain_timeout) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Some(zombie),
                _ => None,
            }
        });
        // Zero samples from the start, so dashboards and alerts see 0 rather than nothing.
        for gauge in [&metrics::DLQ_BLOCKED, &metrics::HALTED_PARTITIONS, &metrics::PAUSED_PARTITIONS] {
            gauge.with_label_values(&[&tp.0]).add(0);
        }
        let worker = worker::spawn(&self.shared, &tp);
        let mut partition = Partition {
            worker,
            stored: -1,
            first_dispatched: -1,
            parked: None,
            seek_on_resume: false,
            halted: None,
            revives: (0, -1),
        };
        if let Some(zombie) = zombie_running {
            self.zombies.lock().expect("zombies lock").insert(tp.clone(), zombie);
            self.halt(consumer, &tp, &mut partition, "an earlier batch of this partition is still running".into());
        }
        self.shared.handler.on_assigned(&tp.0, tp.1);
        let mut partitions = self.partitions.lock().expect("partitions lock");
        partitions.insert(tp, partition);
        update_assigned_gauge(&partitions);
    }

    /// Stops the given partitions' workers: each finishes its current batch within the drain
    /// timeout; stragglers are aborted and waited for until they have really stopped. With
    /// `commit`, what they finished is committed synchronously.
    fn stop_partitions(&self, consumer: &BaseConsumer<Self>, tps: &[TopicPartition], commit: bool) {
        let stopped: Vec<(TopicPartition, Partition)> = {
            let mut partitions = self.partitions.lock().expect("partitions lock");
            let stopped = tps.iter().filter_map(|tp| partitions.remove(tp).map(|p| (tp.clone(), p))).collect();
            update_assigned_gauge(&partitions);
            stopped
        };
        if stopped.is_empty() {
            return;
        }
        for (_, p) in &stopped {
            p.worker.stop.cancel();
        }
        let drain = self.shared.settings.drain_timeout;
        let deadline = Instant::now() + if commit { drain } else { Duration::ZERO };
        for ((topic, partition), p) in &stopped {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if p.worker.finished.recv_timeout(remaining) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                continue;
            }
            if commit {
                tracing::warn!(
                    topic,
                    partition,
                    "partition did not drain in time; aborting its batch, whose records will be redelivered"
                );
            }
            p.worker.task.abort();
            if p.worker.finished.recv_timeout(drain) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                tracing::error!(
                    topic,
                    partition,
                    "an aborted batch is still running (a handler blocking its thread?); the partition will not be worked here until it ends"
                );
                self.health.set_live(
                    worker::HANDLER_CHECK,
                    false,
                    format!("batch of {topic}/{partition} ignores cancellation"),
                );
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in &stopped {
            let done = p.worker.done.load(Ordering::Acquire);
            if commit && done >= 0 {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(done));
            }
            if p.parked.is_some() || p.halted.is_some() {
                // Pause flags outlive assignments in librdkafka; clear ours.
                let mut one = TopicPartitionList::new();
                one.add_partition(topic, *partition);
                let _ = consumer.resume(&one);
                metrics::PAUSED_PARTITIONS.with_label_values(&[topic]).dec();
            }
            if p.halted.is_some() {
                metrics::HALTED_PARTITIONS.with_label_values(&[topic]).dec();
            }
        }
        if tpl.count() > 0 {
            // Store first: with auto-commit on, librdkafka commits the *stored* offsets again
            // when the partitions go (and on close), which would move them back.
            if let Err(error) = consumer.store_offsets(&tpl) {
                tracing::warn!(error = %error, "storing final offsets failed");
            }
            match consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => {
                    for e in tpl.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            metrics::COMMITTED_OFFSET
                                .with_label_values(&[e.topic(), &e.partition().to_string()])
                                .set(o);
                        }
                    }
                    tracing::info!(offsets = ?tpl_summary(&tpl), "committed after drain");
                }
                Err(error) => {
                    metrics::COMMIT_ERRORS.with_label_values(&["sync"]).inc();
                    tracing::error!(error = %error, "final commit failed; records after the last commit will be redelivered");
                }
            }
        }
        let mut zombies = self.zombies.lock().expect("zombies lock");
        for (tp, p) in stopped {
            self.shared.handler.on_revoked(&tp.0, tp.1);
            if !p.worker.has_ended() {
                zombies.insert(tp, p.worker);
            }
        }
        drop(zombies);
        self.refresh_halted_check();
    }

    /// Hands every partition's done offset to librdkafka's offset store; librdkafka commits it
    /// on its next auto-commit interval (and retries failed commits there).
    fn store_progress(&self, consumer: &BaseConsumer<Self>) {
        let mut partitions = self.partitions.lock().expect("partitions lock");
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in partitions.iter() {
            let done = p.worker.done.load(Ordering::Acquire);
            if done >= 0 && done != p.stored {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(done));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        // librdkafka reports success if any partition was stored; each element says its own.
        let outcome = consumer.store_offsets(&tpl);
        for e in tpl.elements() {
            match (e.error(), e.offset()) {
                (Ok(()), Offset::Offset(o)) if outcome.is_ok() => {
                    if let Some(p) = partitions.get_mut(&(e.topic().to_owned(), e.partition())) {
                        p.stored = o;
                    }
                }
                (result, _) => {
                    metrics::COMMIT_ERRORS.with_label_values(&["store"]).inc();
                    let error = result.err().map(|e| e.to_string()).or(outcome.as_ref().err().map(|e| e.to_string()));
                    tracing::warn!(error = ?error, topic = e.topic(), partition = e.partition(), "storing the offset failed; retrying");
                }
            }
        }
    }

    /// Hands a record to its partition's worker, pausing the partition if the worker is full.
    fn dispatch(&self, consumer: &impl PartitionControl, record: Record) {
        let tp = (record.topic.clone(), record.partition);
        let mut partitions = self.partitions.lock().expect("partitions lock");
        let Some(p) = partitions.get_mut(&tp) else {
            // Workers exist for every assigned partition (created in the assign callback). A
            // record of a partition we no longer own belongs to its new owner: processing it
            // here could commit past what that owner has done.
            tracing::warn!(topic = %tp.0, partition = tp.1, offset = record.offset, "record for an unassigned partition ignored");
            return;
        };
        if p.halted.is_some() {
            // Never applied, never committed: fetched again after a restart or reassignment.
            return;
        }
        if p.first_dispatched < 0 {
            p.first_dispatched = record.offset;
        }
        if p.parked.is_some() {
            // librdkafka stops delivering a paused partition, so this should not happen; if a
            // prefetched record slips through anyway, drop it and seek back on resume so it is
            // fetched again rather than skipped.
            p.seek_on_resume = true;
            return;
        }
        let size = record.size_bytes();
        let buffered = p.worker.buffered_bytes.load(Ordering::Acquire);
        if buffered > 0 && buffered + size > self.shared.settings.partition_buffer_bytes {
            return self.pause(consumer, &tp, p, record);
        }
        p.worker.buffered_bytes.fetch_add(size, Ordering::AcqRel);
        match p.worker.tx.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(record)) => {
                p.worker.buffered_bytes.fetch_sub(size, Ordering::AcqRel);
                self.pause(consumer, &tp, p, record);
            }
            Err(mpsc::error::TrySendError::Closed(record)) => {
                p.worker.buffered_bytes.fetch_sub(size, Ordering::AcqRel);
                self.revive(consumer, &tp, p, record.offset);
            }
        }
    }

    fn pause(&self, consumer: &impl PartitionControl, tp: &TopicPartition, p: &mut Partition, record: Record) {
        if let Err(error) = consumer.pause_one(&tp.0, tp.1) {
            tracing::error!(error = %error, topic = %tp.0, partition = tp.1, "pause failed");
        }
        metrics::PAUSED_PARTITIONS.with_label_values(&[&tp.0]).inc();
        p.parked = Some(record);
    }

    /// Hands parked records over where there is room again, resuming their partitions; a
    /// worker found dead meanwhile is revived.
    fn unpark(&self, consumer: &impl PartitionControl) {
        let limit = self.shared.settings.partition_buffer_bytes;
        let mut partitions = self.partitions.lock().expect("partitions lock");
        for (tp, p) in partitions.iter_mut() {
            if p.parked.is_none() || p.halted.is_some() {
                continue;
            }
            if p.worker.has_ended() {
                let offset = p.parked.as_ref().map_or(-1, |r| r.offset);
                self.resume(consumer, tp, p);
                self.revive(consumer, tp, p, offset);
                continue;
            }
            // Resume only once half the buffer is free: each resume costs a fresh fetch, so
            // resuming for a single free slot would thrash.
            let room = p.worker.tx.capacity() * 2 >= p.worker.tx.max_capacity()
                && p.worker.buffered_bytes.load(Ordering::Acquire) * 2 <= limit;
            if !room {
                continue;
            }
            let Some(record) = p.parked.take() else { continue };
            let (next, size) = (record.offset + 1, record.size_bytes());
            p.worker.buffered_bytes.fetch_add(size, Ordering::AcqRel);
            match p.worker.tx.try_send(record) {
                Ok(()) => {
                    self.resume(consumer, tp, p);
                    if std::mem::take(&mut p.seek_on_resume)
                        && let Err(error) = consumer.seek_to(&tp.0, tp.1, next)
                    {
                        self.halt(consumer, tp, p, format!("seek to {next} after resume failed: {error}"));
                    }
                }
                Err(mpsc::error::TrySendError::Full(record) | mpsc::error::TrySendError::Closed(record)) => {
                    p.worker.buffered_bytes.fetch_sub(size, Ordering::AcqRel);
                    p.parked = Some(record);
                }
            }
        }
    }

    fn resume(&self, consumer: &impl PartitionControl, tp: &TopicPartition, p: &mut Partition) {
        p.parked = None;
        if let Err(error) = consumer.resume_one(&tp.0, tp.1) {
            tracing::error!(error = %error, topic = %tp.0, partition = tp.1, "resume failed");
        }
        metrics::PAUSED_PARTITIONS.with_label_values(&[&tp.0]).dec();
    }

    /// A worker ended without being asked to (a panic outside the handler): start a fresh one
    /// from the last finished offset, so the records it held are fetched again. If the seek
    /// that needs fails, the partition is halted instead of silently skipping them.
    fn revive(&self, consumer: &impl PartitionControl, tp: &TopicPartition, p: &mut Partition, offset: i64) {
        let restart_at = match p.worker.done.load(Ordering::Acquire) {
            done if done >= 0 => done,
            _ => p.first_dispatched.min(offset).max(0),
        };
        metrics::WORKER_RESTARTS.with_label_values(&[&tp.0]).inc();
        let done = p.worker.done.load(Ordering::Acquire);
        p.revives = if p.revives.1 == done { (p.revives.0 + 1, done) } else { (1, done) };
        if p.revives.0 > MAX_REVIVES {
            // Dying again and again at the same place is a bug, not bad luck.
            let reason = format!("worker died {} times without progress at offset {restart_at}", p.revives.0);
            self.health.set_live(super::worker::HANDLER_CHECK, false, format!("{}/{}: {reason}", tp.0, tp.1));
            return self.halt(consumer, tp, p, reason);
        }
        tracing::error!(topic = %tp.0, partition = tp.1, restart_at, "partition worker died; restarting it from its last finished offset");
        let fresh = worker::spawn(&self.shared, tp);
        fresh.done.store(p.worker.done.load(Ordering::Acquire), Ordering::Release);
        p.worker = fresh;
        p.first_dispatched = restart_at;
        p.seek_on_resume = false;
        if let Err(error) = consumer.seek_to(&tp.0, tp.1, restart_at) {
            self.halt(consumer, tp, p, format!("seek to {restart_at} after a worker restart failed: {error}"));
        }
    }

    /// Stops a partition for good (until revoked or restarted): nothing after its done offset
    /// is applied or committed, and the process says so.
    fn halt(&self, consumer: &impl PartitionControl, tp: &TopicPartition, p: &mut Partition, reason: String) {
        p.worker.stop.cancel();
        if p.parked.take().is_none() {
            let _ = consumer.pause_one(&tp.0, tp.1);
            metrics::PAUSED_PARTITIONS.with_label_values(&[&tp.0]).inc();
        }
        metrics::HALTED_PARTITIONS.with_label_values(&[&tp.0]).inc();
        tracing::error!(topic = %tp.0, partition = tp.1, reason = %reason, "partition halted; its records wait for a restart or a rebalance");
        self.health.set_ready(HALTED_CHECK, false, format!("{}/{} halted: {reason}", tp.0, tp.1));
        p.halted = Some(reason);
    }

    fn refresh_halted_check(&self) {
        let partitions = self.partitions.lock().expect("partitions lock");
        if partitions.values().all(|p| p.halted.is_none()) {
            self.health.set_ready(HALTED_CHECK, true, "no halted partitions");
        }
    }
}

/// The partition operations the dispatch path needs, so its recovery rules (worker death,
/// failed seeks) can be tested without a broker.
pub(super) trait PartitionControl {
    fn pause_one(&self, topic: &str, partition: i32) -> KafkaResult<()>;
    fn resume_one(&self, topic: &str, partition: i32) -> KafkaResult<()>;
    fn seek_to(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()>;
}

impl<C: ConsumerContext> PartitionControl for BaseConsumer<C> {
    fn pause_one(&self, topic: &str, partition: i32) -> KafkaResult<()> {
        let mut one = TopicPartitionList::new();
        one.add_partition(topic, partition);
        self.pause(&one)
    }
    fn resume_one(&self, topic: &str, partition: i32) -> KafkaResult<()> {
        let mut one = TopicPartitionList::new();
        one.add_partition(topic, partition);
        self.resume(&one)
    }
    fn seek_to(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        self.seek(topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
    }
}

fn update_assigned_gauge(partitions: &HashMap<TopicPartition, Partition>) {
    let mut per_topic: HashMap<&str, i64> = HashMap::new();
    for (topic, _) in partitions.keys() {
        *per_topic.entry(topic).or_default() += 1;
    }
    metrics::ASSIGNED_PARTITIONS.reset();
    for (topic, n) in per_topic {
        metrics::ASSIGNED_PARTITIONS.with_label_values(&[topic]).set(n);
    }
}

fn tpl_summary(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements().iter().map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset())).collect()
}

/// Creates the consumer, runs the poll thread until `shutdown`, then drains and commits.
pub(super) async fn run<H: Handler, D: DeadLetterSink>(
    config: ClientConfig,
    settings: ConsumerSettings,
    handler: Arc<H>,
    dlq: D,
    health: Health,
    shutdown: CancellationToken,
) -> Result<()> {
    health.set_ready("kafka_consumer", false, "joining group");
    health.set_ready(HALTED_CHECK, true, "no halted partitions");
    let shared = Arc::new(Shared {
        handler,
        dlq,
        permits: Semaphore::new(settings.max_in_flight.max(1)),
        settings: settings.clone(),
        health: health.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    let context = RuntimeContext {
        // Its own check: "kafka_consumer" says whether the group was joined, which a returning
        // broker does not restore by itself.
        connection: ConnectionContext::new(health.clone(), CONNECTION_CHECK),
        shared,
        partitions: Mutex::new(HashMap::new()),
        zombies: Mutex::new(HashMap::new()),
        health: health.clone(),
    };
    let consumer: BaseConsumer<RuntimeContext<H, D>> = config.create_with_context(context)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(group = %settings.group_id, topics = ?settings.topics, "consumer started");

    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("elo-poll-{}", settings.group_id))
        .spawn(move || {
            let outcome = poll_loop(&consumer, &shutdown);
            // Dropping the consumer closes it and sends LeaveGroup, so the partitions move to
            // the other members at once instead of after the session timeout. Only then may
            // the process exit: signalling before the drop let `main` return mid-close.
            let started = Instant::now();
            drop(consumer);
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "left the consumer group");
            let _ = done_tx.send(outcome);
        })
        .map_err(|e| crate::Error::Config(format!("cannot start poll thread: {e}")))?;
    let outcome = done_rx.await.unwrap_or(Ok(()));
    health.set_ready("kafka_consumer", false, "stopped");
    tracing::info!("consumer stopped");
    outcome
}

fn poll_loop<H: Handler, D: DeadLetterSink>(
    consumer: &BaseConsumer<RuntimeContext<H, D>>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let context = consumer.context();
    let mut last_probe = Instant::now();
    let mut fatal = None;
    while !shutdown.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                context.connection.recovered();
                context.dispatch(consumer, Record::from_message(&message));
            }
            Some(Err(error @ KafkaError::MessageConsumptionFatal(_))) => {
                fatal = Some(error);
                break;
            }
            // The event API hands client errors (all brokers down, authentication) to poll,
            // not to the context's error callback.
            Some(Err(error)) => context.connection.error(error, "consumer poll"),
            None => {}
        }
        if context.connection.is_fatal() {
            fatal = Some(KafkaError::MessageConsumptionFatal(rdkafka::types::RDKafkaErrorCode::Fatal));
            break;
        }
        context.unpark(consumer);
        context.store_progress(consumer);
        if context.connection.is_degraded() && last_probe.elapsed() >= PROBE_INTERVAL {
            // No record may arrive for a while (an idle topic): ask the broker directly.
            last_probe = Instant::now();
            if consumer.fetch_metadata(None, Duration::from_secs(2)).is_ok() {
                context.connection.recovered();
            }
        }
    }
    if let Some(error) = &fatal {
        let detail = match consumer.client().fatal_error() {
            Some((code, reason)) => format!("{code:?}: {reason}"),
            None => error.to_string(),
        };
        tracing::error!(error = %detail, "fatal kafka consumer error; the process must be restarted");
        context.health.set_live(CONNECTION_CHECK, false, format!("fatal: {detail}"));
    }
    // Stop intake, let in-flight batches finish, commit what is done.
    let assigned: Vec<TopicPartition> = context.partitions.lock().expect("partitions lock").keys().cloned().collect();
    tracing::info!(partitions = assigned.len(), "shutting down consumer: draining");
    context.stop_partitions(consumer, &assigned, true);
    match fatal {
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
#[path = "runtime_tests.rs"]
mod tests;
