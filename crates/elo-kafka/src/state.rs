//! Per-partition state in Kafka, the Kafka Streams way: a key-value store for each assigned
//! partition of a consumer's input, backed by a compacted *changelog* topic with the same
//! partition count, and restored from that changelog when the partition is assigned.
//!
//! Sinks and the reconciler keep what they must remember per customer (aggregates, key → target
//! id mappings, sent-logs, ledgers) here. A restart or rebalance reads only the changelog
//! partition of what it was assigned (latest value per key once compacted), never the whole
//! input history, and the state is exactly as durable as the offsets: a handler writes the
//! state before it reports a record done, so a crash replays the record and rewrites the same
//! state (handlers are idempotent).
//!
//! Usage: create the changelog with [`StateStore::changelog_spec`] (compacted, partitions equal
//! to the input's); call [`StateStore::restore_async`] from `Handler::on_partition_start` (the
//! partition's worker runs it before its first batch and retries it until it succeeds, so a
//! partition is never worked without its state) and [`StateStore::release`] from
//! `Handler::on_revoked`; read with [`StateStore::get`] and write
//! with [`StateStore::put`] / [`StateStore::remove`] from `Handler::handle`, using the record's
//! partition. Values are JSON in the changelog, readable with any Kafka tool.
//!
//! Why not a library: Rust has no Kafka Streams; the embedded stores (RocksDB via
//! `rust-rocksdb`) bring a C++ build and disk state that Kubernetes pods lose anyway. Elo's
//! state per partition is small (one entry per customer), so memory plus the changelog is
//! enough and keeps the build lean.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, KafkaArgs, Producer, Result, TopicSpec};

/// How long a restore may take before it fails (and the assignment with it).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// A per-partition key-value store backed by a compacted changelog topic.
pub struct StateStore<V> {
    changelog: String,
    kafka: KafkaArgs,
    producer: Producer,
    partitions: RwLock<HashMap<i32, HashMap<String, V>>>,
}

impl<V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> StateStore<V> {
    pub fn new(kafka: &KafkaArgs, producer: Producer, changelog: impl Into<String>) -> Self {
        Self { changelog: changelog.into(), kafka: kafka.clone(), producer, partitions: RwLock::default() }
    }

    /// The changelog topic to provision: compacted, co-partitioned with the input.
    pub fn changelog_spec(name: &str, input_partitions: i32) -> TopicSpec {
        TopicSpec::new(name, input_partitions).compacted()
    }

    pub fn changelog(&self) -> &str {
        &self.changelog
    }

    /// Rebuilds `partition`'s state from its changelog partition, blocking the calling thread.
    /// Returns the number of keys restored.
    pub fn restore(&self, partition: i32) -> Result<usize> {
        let state = read_partition::<V>(&self.kafka, &self.changelog, partition)?;
        Ok(self.install(partition, state))
    }

    /// [`StateStore::restore`] on a blocking thread, for `Handler::on_partition_start`.
    pub async fn restore_async(&self, partition: i32) -> Result<usize> {
        let (kafka, changelog) = (self.kafka.clone(), self.changelog.clone());
        let state = tokio::task::spawn_blocking(move || read_partition::<V>(&kafka, &changelog, partition))
            .await
            .map_err(|e| Error::Config(format!("state restore task failed: {e}")))??;
        Ok(self.install(partition, state))
    }

    /// Keeps a restored partition's state unless the partition is held already: a second
    /// restore (two input topics' workers of one partition, say) read the changelog only up to
    /// its own start, so replacing the map would drop the writes made since the first one.
    /// Returns the keys held.
    fn install(&self, partition: i32, state: HashMap<String, V>) -> usize {
        self.partitions.write().expect("state lock").entry(partition).or_insert(state).len()
    }

    /// Forgets a partition's state (call from `Handler::on_revoked`).
    pub fn release(&self, partition: i32) {
        self.partitions.write().expect("state lock").remove(&partition);
    }

    /// The value of `key` in `partition`, if any.
    pub fn get(&self, partition: i32, key: &str) -> Option<V> {
        self.partitions.read().expect("state lock").get(&partition)?.get(key).cloned()
    }

    /// Keys held for `partition`.
    pub fn len(&self, partition: i32) -> usize {
        self.partitions.read().expect("state lock").get(&partition).map_or(0, HashMap::len)
    }

    /// Whether `partition` holds no keys.
    pub fn is_empty(&self, partition: i32) -> bool {
        self.len(partition) == 0
    }

    /// Every (key, value) of `partition`, for reports and sweeps.
    pub fn entries(&self, partition: i32) -> Vec<(String, V)> {
        self.partitions
            .read()
            .expect("state lock")
            .get(&partition)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// The keys of `partition` whose value matches `keep` (no value is cloned: for sweeps over
    /// large stores, e.g. pruning).
    pub fn keys_where(&self, partition: i32, keep: impl Fn(&V) -> bool) -> Vec<String> {
        self.partitions
            .read()
            .expect("state lock")
            .get(&partition)
            .map(|m| m.iter().filter(|(_, v)| keep(v)).map(|(k, _)| k.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether `partition` is restored here (and not released since).
    pub fn holds(&self, partition: i32) -> bool {
        self.partitions.read().expect("state lock").contains_key(&partition)
    }

    /// Writes `key` = `value` to the changelog (acknowledged), then to memory. Refused with
    /// [`Error::PartitionNotAssigned`] unless the partition is restored here: a write after
    /// the release would reach the changelog the new owner restored from, and re-create the
    /// released map. (A release while the write is on its way is reported the same way.)
    pub async fn put(&self, partition: i32, key: &str, value: V) -> Result<()> {
        if !self.holds(partition) {
            return Err(Error::PartitionNotAssigned(partition));
        }
        let bytes = serde_json::to_vec(&value).map_err(|e| Error::Config(format!("state value: {e}")))?;
        self.producer.send_to_partition(&self.changelog, partition, key.as_bytes(), Some(&bytes)).await?;
        match self.partitions.write().expect("state lock").get_mut(&partition) {
            Some(map) => {
                map.insert(key.to_owned(), value);
                Ok(())
            }
            None => Err(Error::PartitionNotAssigned(partition)),
        }
    }

    /// Deletes `key` (a tombstone in the changelog, compacted away later); refused like
    /// [`StateStore::put`] for a partition not restored here.
    pub async fn remove(&self, partition: i32, key: &str) -> Result<()> {
        if !self.holds(partition) {
            return Err(Error::PartitionNotAssigned(partition));
        }
        self.producer.send_to_partition(&self.changelog, partition, key.as_bytes(), None).await?;
        match self.partitions.write().expect("state lock").get_mut(&partition) {
            Some(map) => {
                map.remove(key);
                Ok(())
            }
            None => Err(Error::PartitionNotAssigned(partition)),
        }
    }
}

/// Reads a changelog partition from the beginning to its high watermark: latest value per key,
/// tombstones delete.
fn read_partition<V: DeserializeOwned>(
    kafka: &KafkaArgs,
    changelog: &str,
    partition: i32,
) -> Result<HashMap<String, V>> {
    let started = Instant::now();
    let consumer: BaseConsumer = kafka
        .client_config(&[
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
            ("group.id", "elo-state-restore"),
        ])?
        .create()?;
    let (low, high) = consumer.fetch_watermarks(changelog, partition, Duration::from_secs(10)).map_err(Error::Kafka)?;
    let mut state: HashMap<String, V> = HashMap::new();
    if high > low {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(changelog, partition, Offset::Beginning).map_err(Error::Kafka)?;
        consumer.assign(&tpl).map_err(Error::Kafka)?;
        let mut next = low;
        while next < high {
            if started.elapsed() > RESTORE_TIMEOUT {
                return Err(Error::Timeout(RESTORE_TIMEOUT));
            }
            let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
            let message = message.map_err(Error::Kafka)?;
            next = message.offset() + 1;
            let Some(key) = message.key().map(|k| String::from_utf8_lossy(k).into_owned()) else { continue };
            match message.payload() {
                None => {
                    state.remove(&key);
                }
                Some(bytes) => match serde_json::from_slice::<V>(bytes) {
                    Ok(value) => {
                        state.insert(key, value);
                    }
                    Err(e) => {
                        // An entry an older version wrote in another shape: drop it rather than
                        // the whole partition; the next record of that key rewrites it.
                        tracing::warn!(changelog, partition, offset = message.offset(), error = %e, "unreadable state entry skipped");
                    }
                },
            }
        }
    }
    tracing::info!(
        changelog,
        partition,
        keys = state.len(),
        records = high - low,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "state restored"
    );
    Ok(state)
}

/// Waits on the poll thread (from `Handler::on_revoked`), at most `within`, for whatever holds
/// a partition's lock (a batch, a sweep, a periodic check) to let go, so nothing writes the
/// partition's changelog after its new owner restored it; `None` when it did not in time (the
/// holder must then re-check ownership before writing). Bounded because a blocked poll thread
/// would cost the whole group its session.
pub fn wait_for_partition_lock<T>(
    lock: &tokio::sync::Mutex<T>,
    within: std::time::Duration,
) -> Option<tokio::sync::MutexGuard<'_, T>> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match lock.try_lock() {
            Ok(guard) => return Some(guard),
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    #[tokio::test]
    async fn a_partition_not_restored_or_released_refuses_writes() {
        // No broker: a refused write must not even try to reach the changelog.
        let kafka = KafkaArgs::local("127.0.0.1:1");
        let producer = Producer::new(&kafka, elo_telemetry::Health::new()).unwrap();
        let store: StateStore<u32> = StateStore::new(&kafka, producer, "state-test");
        let refused = |r: Result<()>| matches!(r, Err(Error::PartitionNotAssigned(3)));
        assert!(refused(store.put(3, "k", 1).await), "never restored");
        assert!(refused(store.remove(3, "k").await));
        assert!(store.get(3, "k").is_none() && !store.holds(3), "nothing re-created");
        store.partitions.write().unwrap().insert(3, HashMap::from([("k".to_owned(), 1)]));
        store.release(3);
        assert!(refused(store.put(3, "k", 2).await), "released");
        assert!(!store.holds(3) && store.get(3, "k").is_none(), "the released map is not re-created");
        let e = store.put(3, "k", 2).await.unwrap_err();
        assert_eq!((e.class(), e.code()), (ErrorClass::Transient, "partition_not_assigned"));
    }

    #[test]
    fn a_second_restore_of_a_held_partition_keeps_the_writes_made_since_the_first() {
        let kafka = KafkaArgs::local("127.0.0.1:1");
        let producer = Producer::new(&kafka, elo_telemetry::Health::new()).unwrap();
        let store: StateStore<u32> = StateStore::new(&kafka, producer, "state-test");
        assert_eq!(store.install(5, HashMap::from([("k".to_owned(), 1)])), 1);
        // A write acknowledged after the first restore, then a restore that read less.
        store.partitions.write().unwrap().get_mut(&5).unwrap().insert("k".to_owned(), 2);
        store.install(5, HashMap::from([("k".to_owned(), 1)]));
        assert_eq!(store.get(5, "k"), Some(2), "the held state wins over a stale restore");
        store.release(5);
        store.install(5, HashMap::from([("k".to_owned(), 1)]));
        assert_eq!(store.get(5, "k"), Some(1), "after a release the restore is the state");
    }
}
