//! The task that works one partition: it gathers batches from the partition's bounded channel
//! and runs each through the retry engine, strictly one after another.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Instant;

use elo_telemetry::Health;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::{BatchEnv, BatchOutcome, process_batch};
use super::{ConsumerSettings, Handler, Record};
use crate::dlq::DeadLetterSink;
use crate::{headers, metrics};

/// Everything the workers of one consumer share.
pub(crate) struct Shared<H, D> {
    pub handler: Arc<H>,
    pub dlq: D,
    pub settings: ConsumerSettings,
    pub permits: Semaphore,
    pub health: Health,
    pub runtime: tokio::runtime::Handle,
}

pub(crate) type TopicPartition = (String, i32);

/// Liveness check a handler defect turns off.
pub(crate) const HANDLER_CHECK: &str = "kafka_consumer_handler";

/// The poll thread's side of a running worker.
pub(crate) struct WorkerHandle {
    pub tx: mpsc::Sender<Record>,
    pub stop: CancellationToken,
    /// Next offset to commit (every earlier record is finished); -1 before the first one.
    pub done: Arc<AtomicI64>,
    /// Bytes of records handed over and not yet taken into a batch.
    pub buffered_bytes: Arc<AtomicUsize>,
    /// Disconnects when the worker task ends (finished, aborted or panicked).
    pub finished: std::sync::mpsc::Receiver<()>,
    pub task: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
    /// Whether the task has ended, without waiting.
    pub(crate) fn has_ended(&self) -> bool {
        matches!(self.finished.try_recv(), Err(std::sync::mpsc::TryRecvError::Disconnected))
    }
}

pub(crate) fn spawn<H: Handler, D: DeadLetterSink>(shared: &Arc<Shared<H, D>>, tp: &TopicPartition) -> WorkerHandle {
    let (tx, rx) = mpsc::channel(shared.settings.partition_buffer.max(1));
    let (finished_tx, finished) = std::sync::mpsc::channel::<()>();
    let stop = CancellationToken::new();
    let done = Arc::new(AtomicI64::new(-1));
    let buffered_bytes = Arc::new(AtomicUsize::new(0));
    let worker = PartitionWorker {
        shared: shared.clone(),
        tp: tp.clone(),
        stop: stop.clone(),
        done: done.clone(),
        buffered_bytes: buffered_bytes.clone(),
        _finished: finished_tx,
    };
    let task = shared.runtime.spawn(worker.run(rx));
    WorkerHandle { tx, stop, done, buffered_bytes, finished, task }
}

struct PartitionWorker<H, D> {
    shared: Arc<Shared<H, D>>,
    tp: TopicPartition,
    stop: CancellationToken,
    done: Arc<AtomicI64>,
    buffered_bytes: Arc<AtomicUsize>,
    /// Dropped with the task, whichever way it ends: the poll thread waits on that.
    _finished: std::sync::mpsc::Sender<()>,
}

impl<H: Handler, D: DeadLetterSink> PartitionWorker<H, D> {
    async fn run(self, mut rx: mpsc::Receiver<Record>) {
        if !self.start().await {
            return;
        }
        let mut last_take: Option<Instant> = None;
        loop {
            let Some(batch) = self.next_batch(&mut rx, last_take).await else { break };
            last_take = Some(Instant::now());
            let (first, last, size) = (batch[0].offset, batch[batch.len() - 1].offset, batch.len());
            let (topic, partition) = (&self.tp.0, self.tp.1);
            let span = tracing::info_span!("consume_batch", topic = %topic, partition, first_offset = first, last_offset = last, size);
            elo_telemetry::propagation::set_parent_from(&span, &headers::text_map(&batch[0].headers));
            let started = Instant::now();
            let env = BatchEnv {
                handler: &*self.shared.handler,
                dlq: &self.shared.dlq,
                retry: &self.shared.settings.retry,
                permits: &self.shared.permits,
                stop: &self.stop,
                done: &self.done,
                group: &self.shared.settings.group_id,
            };
            let outcome = process_batch(&env, batch).instrument(span).await;
            metrics::BATCH_LATENCY.with_label_values(&[topic]).observe(started.elapsed().as_secs_f64());
            match outcome {
                BatchOutcome::Finished => {}
                BatchOutcome::Stopped => return,
                BatchOutcome::Defect(reason) => return self.hold_after_defect(first, &reason).await,
            }
        }
    }

    /// Runs the handler's partition preparation until it succeeds; false on stop.
    async fn start(&self) -> bool {
        let (topic, partition) = (&self.tp.0, self.tp.1);
        let mut failures = 0u32;
        loop {
            let started = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return false,
                r = self.shared.handler.on_partition_start(topic, partition) => r,
            };
            let Err(error) = started else { return true };
            tracing::error!(topic = %topic, partition, error = %error, failures, "partition preparation failed; retrying before any record is handled");
            let _waiting =
                super::batch::GaugeGuard::raise(metrics::RETRY_BLOCKED.with_label_values(&[error.class.as_str()]));
            let delay = self.shared.settings.retry.backoff(failures);
            failures = failures.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => return false,
            }
        }
    }

    /// Up to `max_batch` records, waiting up to `batch_linger` to fill (`busy_linger` when
    /// busy: the previous batch was taken within `busy_window` of this one's first record
    /// arriving, judged on its arrival, so a record after a quiet spell goes at once); `None`
    /// on stop.
    async fn next_batch(&self, rx: &mut mpsc::Receiver<Record>, last_take: Option<Instant>) -> Option<Vec<Record>> {
        let settings = &self.shared.settings;
        let first = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return None,
            next = rx.recv() => next?,
        };
        let mut batch = vec![first];
        let busy = last_take.is_some_and(|t| t.elapsed() <= settings.busy_window);
        let linger = if busy { settings.batch_linger.max(settings.busy_linger) } else { settings.batch_linger };
        let linger_until = tokio::time::Instant::now() + linger;
        while batch.len() < settings.max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) if linger.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(linger_until, rx.recv()).await {
                    Ok(Some(r)) => batch.push(r),
                    _ => break,
                },
            }
        }
        let taken: usize = batch.iter().map(Record::size_bytes).sum();
        self.buffered_bytes.fetch_sub(taken, Ordering::AcqRel);
        Some(batch)
    }

    /// A bug in the handler: the batch stays unfinished (never parked: the data is fine), the
    /// partition is held, and the process reports itself not live so it gets restarted.
    async fn hold_after_defect(&self, offset: i64, reason: &str) {
        let (topic, partition) = (&self.tp.0, self.tp.1);
        metrics::HANDLER_DEFECTS.with_label_values(&[topic]).inc();
        tracing::error!(topic = %topic, partition, offset, reason, "handler defect: holding the partition and reporting not live; nothing was parked");
        self.shared.health.set_live(
            HANDLER_CHECK,
            false,
            format!("handler defect on {topic}/{partition} at offset {offset}: {reason}"),
        );
        self.stop.cancelled().await;
    }
}
