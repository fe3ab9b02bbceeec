//! The dispatch path's recovery rules without a broker: a fake partition control records
//! pauses, resumes and seeks (and can refuse seeks).

use std::sync::Mutex as StdMutex;
use std::sync::atomic::AtomicUsize;

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use super::*;
use crate::HandlerError;
use crate::dlq::DeadLetter;

#[derive(Default)]
struct FakeControl {
    paused: StdMutex<Vec<i32>>,
    resumed: StdMutex<Vec<i32>>,
    seeks: StdMutex<Vec<(i32, i64)>>,
    refuse_seeks: bool,
}

impl PartitionControl for FakeControl {
    fn pause_one(&self, _topic: &str, partition: i32) -> KafkaResult<()> {
        self.paused.lock().unwrap().push(partition);
        Ok(())
    }
    fn resume_one(&self, _topic: &str, partition: i32) -> KafkaResult<()> {
        self.resumed.lock().unwrap().push(partition);
        Ok(())
    }
    fn seek_to(&self, _topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        self.seeks.lock().unwrap().push((partition, offset));
        if self.refuse_seeks { Err(KafkaError::Seek("erroneous state".into())) } else { Ok(()) }
    }
}

/// A handler whose batches never finish, so records stay buffered.
struct Stuck(AtomicUsize);

impl Handler for Stuck {
    async fn handle(&self, _batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending().await
    }
}

struct NoDlq;

impl DeadLetterSink for NoDlq {
    async fn park(&self, _letter: &DeadLetter) -> crate::Result<()> {
        Err(crate::Error::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition)))
    }
}

fn context(buffer: usize) -> RuntimeContext<Stuck, NoDlq> {
    context_with(Stuck(AtomicUsize::new(0)), buffer)
}

fn context_with<H: Handler>(handler: H, buffer: usize) -> RuntimeContext<H, NoDlq> {
    let health = Health::new();
    let mut settings = ConsumerSettings::new("g", vec!["t".into()], "t.dlq");
    settings.partition_buffer = buffer;
    let shared = Arc::new(Shared {
        handler: Arc::new(handler),
        dlq: NoDlq,
        permits: Semaphore::new(4),
        settings,
        health: health.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    health.set_ready(HALTED_CHECK, true, "no halted partitions");
    RuntimeContext {
        connection: ConnectionContext::new(health.clone(), CONNECTION_CHECK),
        shared,
        partitions: Mutex::new(HashMap::new()),
        zombies: Mutex::new(HashMap::new()),
        health,
    }
}

fn record(offset: i64) -> Record {
    Record {
        topic: "t".into(),
        partition: 0,
        offset,
        key: Some(b"k".to_vec()),
        payload: Some(b"v".to_vec()),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

async fn kill_worker(ctx: &RuntimeContext<Stuck, NoDlq>) {
    ctx.partitions.lock().unwrap()[&("t".to_owned(), 0)].worker.task.abort();
    for _ in 0..100 {
        if ctx.partitions.lock().unwrap()[&("t".to_owned(), 0)].worker.has_ended() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("worker did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_whose_seek_fails_halts_its_partition_loudly() {
    let ctx = context(10);
    let control = FakeControl { refuse_seeks: true, ..FakeControl::default() };
    ctx.assign(&control, ("t".into(), 0));
    ctx.dispatch(&control, record(5));
    kill_worker(&ctx).await;
    ctx.dispatch(&control, record(6));
    assert_eq!(*control.seeks.lock().unwrap(), vec![(0, 5)], "restart from the first unfinished record");
    let halted = ctx.partitions.lock().unwrap()[&("t".to_owned(), 0)].halted.clone();
    assert!(halted.is_some_and(|r| r.contains("seek")), "a failed seek must halt the partition");
    assert!(!ctx.health.is_ready(), "a halted partition makes the process not ready");
    assert_eq!(*control.paused.lock().unwrap(), vec![0], "a halted partition is paused");
    // Nothing more is dispatched to it (it would be applied past a gap).
    ctx.dispatch(&control, record(7));
    assert_eq!(control.seeks.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_while_paused_is_revived_from_its_done_offset() {
    // Buffer of one: record 10 is taken into a (stuck) batch, 11 fills the channel, 12 parks
    // and pauses the partition.
    let ctx = context(1);
    let control = FakeControl::default();
    ctx.assign(&control, ("t".into(), 0));
    ctx.dispatch(&control, record(10));
    for _ in 0..100 {
        if ctx.shared.handler.0.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ctx.dispatch(&control, record(11));
    ctx.dispatch(&control, record(12));
    assert_eq!(*control.paused.lock().unwrap(), vec![0], "full buffer pauses the partition");
    kill_worker(&ctx).await;
    ctx.unpark(&control);
    assert_eq!(*control.resumed.lock().unwrap(), vec![0], "the partition is resumed");
    assert_eq!(*control.seeks.lock().unwrap(), vec![(0, 10)], "and fetched again from the first unfinished record");
    let partitions = ctx.partitions.lock().unwrap();
    let p = &partitions[&("t".to_owned(), 0)];
    assert!(p.halted.is_none() && p.parked.is_none());
    assert!(!p.worker.has_ended(), "a fresh worker runs");
}

/// Restores its "state" only on the third try; records must wait for it.
struct SlowStart {
    tries: AtomicUsize,
    handled_before_start: AtomicUsize,
    handled: AtomicUsize,
}

impl Handler for SlowStart {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        if self.tries.load(Ordering::SeqCst) < 3 {
            self.handled_before_start.fetch_add(batch.len(), Ordering::SeqCst);
        }
        self.handled.fetch_add(batch.len(), Ordering::SeqCst);
        batch.iter().map(|_| Ok(())).collect()
    }

    async fn on_partition_start(&self, _topic: &str, _partition: i32) -> Result<(), HandlerError> {
        if self.tries.fetch_add(1, Ordering::SeqCst) < 2 {
            Err(HandlerError::transient("restore_failed", "changelog unreachable"))
        } else {
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_record_is_handled_before_the_partition_start_succeeds() {
    let handler = SlowStart {
        tries: AtomicUsize::new(0),
        handled_before_start: AtomicUsize::new(0),
        handled: AtomicUsize::new(0),
    };
    let mut ctx = context_with(handler, 10);
    Arc::get_mut(&mut ctx.shared).unwrap().settings.retry.initial = Duration::from_millis(5);
    let control = FakeControl::default();
    ctx.assign(&control, ("t".into(), 0));
    for offset in 0..3 {
        ctx.dispatch(&control, record(offset));
    }
    for _ in 0..200 {
        if ctx.shared.handler.handled.load(Ordering::SeqCst) == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ctx.shared.handler.handled.load(Ordering::SeqCst), 3, "records handled once the start succeeded");
    assert_eq!(ctx.shared.handler.handled_before_start.load(Ordering::SeqCst), 0, "none before");
    assert_eq!(ctx.shared.handler.tries.load(Ordering::SeqCst), 3);
}

/// Records the size of each batch it is handed.
#[derive(Default)]
struct Sizes(StdMutex<Vec<usize>>);

impl Handler for Sizes {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        self.0.lock().unwrap().push(batch.len());
        batch.iter().map(|_| Ok(())).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_record_goes_at_once_and_a_busy_partition_lingers_to_fill_its_batch() {
    let mut ctx = context_with(Sizes::default(), 100);
    {
        let settings = &mut Arc::get_mut(&mut ctx.shared).unwrap().settings;
        settings.max_batch = 100;
        settings.busy_linger = Duration::from_secs(2);
        settings.busy_window = Duration::from_secs(5);
    }
    let control = FakeControl::default();
    ctx.assign(&control, ("t".into(), 0));
    let sizes = || ctx.shared.handler.0.lock().unwrap().clone();
    // Quiet partition: the first record is handed over at once, not after the busy linger.
    let started = std::time::Instant::now();
    ctx.dispatch(&control, record(0));
    while sizes().is_empty() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(1), "a lone record waited {:?}", started.elapsed());
    // Busy now: records trickling in 100 ms apart land in one batch (without the busy linger
    // each would be a batch of its own).
    for offset in 1..=5 {
        ctx.dispatch(&control, record(offset));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while sizes().iter().sum::<usize>() < 6 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sizes(), vec![1, 5]);
    // Quiet again (past the busy window since the last take): a lone record goes at once,
    // not after the busy linger.
    tokio::time::sleep(Duration::from_millis(5_300)).await;
    let quiet = std::time::Instant::now();
    ctx.dispatch(&control, record(6));
    while sizes().len() < 3 && quiet.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(quiet.elapsed() < Duration::from_secs(1), "a record after a quiet spell waited {:?}", quiet.elapsed());
    assert_eq!(sizes(), vec![1, 5, 1]);
}
