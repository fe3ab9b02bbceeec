//! Bounded reads of a topic: everything between two instants, or all of it. The DLQ tools and
//! the daily report read this way (a day of records, or a DLQ, is small enough); the live
//! service never re-reads history. Blocking: call from a blocking thread.

use std::time::{Duration, Instant};

use elo_kafka::{KafkaArgs, Record, headers};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// `[from_ms, until_ms)` in record timestamps; `None` is open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub from_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl Window {
    pub fn contains(&self, ts: Option<i64>) -> bool {
        let Some(ts) = ts else { return self.from_ms.is_none() && self.until_ms.is_none() };
        self.from_ms.is_none_or(|f| ts >= f) && self.until_ms.is_none_or(|u| ts < u)
    }
}

/// Producers stamp records (CreateTime), so timestamps are only nearly ordered: a partition's
/// read stops at the first record this far past the window's end.
const LATE_SLACK_MS: i64 = 10 * 60 * 1000;

/// How long a partition may go without a record before the read gives up.
const STALL: Duration = Duration::from_secs(20);
const TIMEOUT: Duration = Duration::from_secs(10);

fn consumer(kafka: &KafkaArgs) -> anyhow::Result<BaseConsumer> {
    // A short fetch wait: partitions that reached their end must not hold up the others.
    let overrides = [("group.id", "elo-reconciler-scan"), ("enable.auto.commit", "false"), ("fetch.wait.max.ms", "20")];
    Ok(kafka.client_config(&overrides)?.create()?)
}

/// The offset of the first record at or after `ts` in each partition (`None`: none is), or
/// `None` altogether when the broker cannot answer (the caller then filters by timestamp).
fn offsets_at(consumer: &BaseConsumer, topic: &str, partitions: i32, ts: i64) -> Option<Vec<Option<i64>>> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(ts)).ok()?;
    }
    let found = consumer.offsets_for_times(tpl, TIMEOUT).ok()?;
    (0..partitions)
        .map(|p| match found.find_partition(topic, p)?.offset() {
            Offset::Offset(o) => Some(Some(o)),
            Offset::End => Some(None),
            _ => None,
        })
        .collect()
}

/// Limits on a read (or several reads sharing it): a deadline and a record cap, so a report
/// cannot run or grow without end.
#[derive(Debug, Default)]
pub struct Budget {
    pub deadline: Option<Instant>,
    pub max_records: Option<u64>,
    /// Records visited so far under this budget.
    pub used: u64,
}

/// Calls `visit` with every record of `topic` whose timestamp is in `window`, partition by
/// partition, in offset order. Returns the records visited. A missing topic reads as empty.
pub fn scan(kafka: &KafkaArgs, topic: &str, window: Window, visit: impl FnMut(Record)) -> anyhow::Result<u64> {
    scan_within(kafka, topic, window, &mut Budget::default(), visit)
}

/// [`scan`] that stops with an error when `budget` runs out.
pub fn scan_within(
    kafka: &KafkaArgs,
    topic: &str,
    window: Window,
    budget: &mut Budget,
    mut visit: impl FnMut(Record),
) -> anyhow::Result<u64> {
    let consumer = consumer(kafka)?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions =
        metadata.topics().first().map_or(0, |t| if t.error().is_some() { 0 } else { t.partitions().len() as i32 });
    if partitions == 0 {
        return Ok(0);
    }
    // The start comes from offsets-for-times; the end is found by reading, because Tansu 0.6
    // answers the earliest offset for any time (a safe start, a useless end).
    let starts = window.from_ms.and_then(|ts| offsets_at(&consumer, topic, partitions, ts));
    let stop_after = window.until_ms.map(|u| u.saturating_add(LATE_SLACK_MS));
    // Every partition at once (one fetch session), each read from its start to its end.
    let mut tpl = TopicPartitionList::new();
    let mut ends: Vec<Option<i64>> = vec![None; partitions as usize];
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
        let start = match &starts {
            Some(s) => s[p as usize].unwrap_or(high).max(low),
            None => low,
        };
        if start < high {
            tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
            ends[p as usize] = Some(high);
        }
    }
    let mut open = ends.iter().filter(|e| e.is_some()).count();
    if open == 0 {
        return Ok(0);
    }
    consumer.assign(&tpl)?;
    let mut visited = 0u64;
    let mut last_progress = Instant::now();
    while open > 0 {
        if last_progress.elapsed() > STALL {
            anyhow::bail!("reading {topic} stalled with {open} partition(s) unfinished");
        }
        if budget.deadline.is_some_and(|d| Instant::now() >= d) {
            anyhow::bail!("reading {topic} took too long (time budget spent)");
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message?;
        last_progress = Instant::now();
        let p = message.partition();
        let Some(end) = ends.get(p as usize).copied().flatten() else { continue };
        let ts = message.timestamp().to_millis();
        let past_window = stop_after.zip(ts).is_some_and(|(stop, ts)| ts >= stop);
        if message.offset() >= end || past_window {
            ends[p as usize] = None;
            open -= 1;
            continue;
        }
        if message.offset() + 1 >= end {
            ends[p as usize] = None;
            open -= 1;
        }
        let record = Record {
            topic: topic.to_owned(),
            partition: p,
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: headers::collect(message.headers()),
            timestamp_ms: ts,
        };
        if window.contains(record.timestamp_ms) {
            visited += 1;
            budget.used += 1;
            if budget.max_records.is_some_and(|m| budget.used > m) {
                anyhow::bail!("reading {topic}: more than {} records, over the budget", budget.used - 1);
            }
            visit(record);
        }
    }
    Ok(visited)
}

/// The one record at `partition`/`offset` of `topic` (`None`: no such record, e.g. compacted
/// away or past the end). Reads from that offset only, not the whole topic.
pub fn read_at(kafka: &KafkaArgs, topic: &str, partition: i32, offset: i64) -> anyhow::Result<Option<Record>> {
    let consumer = consumer(kafka)?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions =
        metadata.topics().first().map_or(0, |t| if t.error().is_some() { 0 } else { t.partitions().len() as i32 });
    if partition < 0 || partition >= partitions {
        return Ok(None);
    }
    let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
    if offset < low || offset >= high {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + STALL;
    while Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message?;
        if message.offset() < offset {
            continue;
        }
        if message.offset() > offset {
            return Ok(None);
        }
        return Ok(Some(Record {
            topic: topic.to_owned(),
            partition,
            offset,
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers: headers::collect(message.headers()),
            timestamp_ms: message.timestamp().to_millis(),
        }));
    }
    anyhow::bail!("reading {topic}/{partition}/{offset} stalled")
}

/// A consumer for metadata and watermark queries (no group membership).
pub fn metadata_consumer(kafka: &KafkaArgs) -> anyhow::Result<BaseConsumer> {
    consumer(kafka)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_half_open_and_untimed_records_only_match_open_windows() {
        let w = Window { from_ms: Some(10), until_ms: Some(20) };
        assert!(w.contains(Some(10)) && w.contains(Some(19)));
        assert!(!w.contains(Some(9)) && !w.contains(Some(20)));
        assert!(!w.contains(None));
        assert!(Window::default().contains(None));
        assert!(Window { from_ms: Some(5), until_ms: None }.contains(Some(1 << 40)));
    }
}
