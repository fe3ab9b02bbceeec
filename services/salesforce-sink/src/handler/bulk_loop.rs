//! The one loop that drives a Bulk API 2.0 batch through its passes, chunk by chunk, used by
//! the service (chunks read from the partition's records under the in-flight budget) and by
//! [`Sink::apply_partition`] (chunks of decoded events).

use std::future::Future;
use std::ops::Range;

use elo_events::CommerceEvent;
use elo_kafka::HandlerError;

use super::bulk::{BulkBatch, Prepared};
use super::{Sink, Verdict};

/// Decoded events of one chunk.
pub type Events = Vec<Result<CommerceEvent, HandlerError>>;

/// How [`Sink::apply_bulk`] reads a batch's chunks and hands back their verdicts.
pub trait BulkChunks: Send {
    /// Held while a chunk is read and worked on (the service's in-flight budget permit).
    type Held: Send;
    /// Reads the chunk of the batch at `range` (waiting for room in the budget first).
    fn read(&self, range: Range<usize>) -> impl Future<Output = (Self::Held, Events)> + Send;
    /// The verdicts of the chunk at `range`, as read for them.
    fn done(&mut self, range: Range<usize>, events: &Events, verdicts: Vec<Verdict>)
    -> impl Future<Output = ()> + Send;
}

impl Sink {
    /// A Bulk batch of `records` records of `partition`, read in the chunks `chunks` (in order,
    /// covering the batch): the newest versions, the rows spooled, the jobs (no chunk held),
    /// then confirmations and verdicts. Rows that would pass the spool bound run as several
    /// Bulk batches in turn. A batch with fewer than the Bulk threshold of records still to
    /// write (not confirmed yet) goes through Composite Graph a chunk at a time instead.
    ///
    /// No hold-and-wait: a chunk that needs room in the spool bound while its batch holds
    /// none is dropped, with its budget, while the room is awaited, then read again; a batch
    /// holding room never waits for more (it runs what it has). So a partition holding spool
    /// room waits only for budget, and one holding budget never waits for spool room.
    pub async fn apply_bulk<C: BulkChunks>(
        &self,
        partition: i32,
        records: usize,
        chunks: &[Range<usize>],
        reader: &mut C,
    ) {
        let mut start = 0;
        while start < chunks.len() {
            let mut batch = BulkBatch::new(partition, records);
            for range in &chunks[start..] {
                let (_held, events) = reader.read(range.clone()).await;
                self.bulk_note(&mut batch, range.start, &events);
            }
            // Few records left to write (the runtime hands a batch back from its first failure,
            // so a retried backlog batch is mostly confirmed): Composite Graph, as for a batch
            // that small. In Bulk a failed job (a 503 on its upload or close) fails its records
            // for the runtime to retry, and each retry would run jobs again for them, spending
            // their retries until they are dead-lettered.
            if !self.bulk_sized(self.bulk_writes(&batch)) {
                for range in &chunks[start..] {
                    let (_held, events) = reader.read(range.clone()).await;
                    // After a stop no more writes (as in Bulk): the records stay transient for
                    // the next owner (one that cannot be read keeps its own error).
                    let verdicts = match self.pool.stop.is_cancelled() {
                        true => events
                            .iter()
                            .map(|e| Verdict::failed(e.as_ref().err().cloned().unwrap_or_else(super::bulk::stopped)))
                            .collect(),
                        false => self.apply_composite(partition, &events).await,
                    };
                    reader.done(range.clone(), &events, verdicts).await;
                }
                return;
            }
            let mut end = start;
            while let Some(range) = chunks.get(end) {
                let (held, events) = reader.read(range.clone()).await;
                match self.bulk_prepare(&mut batch, range.start, &events).await {
                    Prepared::Taken => end += 1,
                    Prepared::Full => break,
                    Prepared::NeedsRoom(bytes) => {
                        drop((held, events));
                        self.bulk_reserve(&mut batch, bytes).await;
                    }
                }
            }
            self.bulk_run(&mut batch).await;
            for range in &chunks[start..end] {
                let (_held, events) = reader.read(range.clone()).await;
                let verdicts = self.bulk_finish(&mut batch, range.start, &events).await;
                reader.done(range.clone(), &events, verdicts).await;
            }
            start = end;
        }
    }
}
