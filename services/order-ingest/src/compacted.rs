//! Small state kept in compacted topics (JSON values, the last record of a key wins): the poll
//! checkpoints and the erased customer keys. Reading a topic from the start rebuilds the state;
//! erased keys are then tailed so every replica sees every other replica's erasures.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use elo_kafka::{KafkaArgs, Producer};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::erasure::{Erased, ErasedKeys, ErasureLog};
use crate::push::PublishError;

/// Latest value of every key, and where each partition ended (to tail from there).
type Snapshot = (HashMap<String, Vec<u8>>, Vec<(i32, i64)>);

fn consumer(kafka: &KafkaArgs, group: &str) -> Result<BaseConsumer, String> {
    kafka
        .client_config(&[("group.id", group), ("enable.auto.commit", "false")])
        .map_err(|e| e.to_string())?
        .create()
        .map_err(|e| e.to_string())
}

/// Reads a whole compacted topic (blocking: run it on a blocking thread).
fn read_all(kafka: &KafkaArgs, topic: &str, group: &str) -> Result<Snapshot, String> {
    let consumer = consumer(kafka, group)?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let partitions = metadata.topics().first().map(|t| t.partitions().len() as i32).unwrap_or(0);
    let (mut latest, mut ends) = (HashMap::new(), Vec::new());
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        ends.push((p, high));
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(low)).map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next = low;
        while next < high {
            if Instant::now() > deadline {
                return Err(format!("reading {topic} partition {p} timed out"));
            }
            let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
            let message = message.map_err(|e| e.to_string())?;
            next = message.offset() + 1;
            if let (Some(key), Some(payload)) = (message.key(), message.payload()) {
                latest.insert(String::from_utf8_lossy(key).into_owned(), payload.to_vec());
            }
        }
    }
    Ok((latest, ends))
}

/// Poll checkpoints, keyed by store code.
pub struct KafkaCheckpoints {
    pub producer: Producer,
    pub kafka: KafkaArgs,
    pub topic: String,
}

impl KafkaCheckpoints {
    /// Reads the latest checkpoint of every store in one pass over the topic.
    pub async fn load_all(&self) -> Result<HashMap<String, crate::poll::Checkpoint>, String> {
        let (kafka, topic) = (self.kafka.clone(), self.topic.clone());
        let (latest, _) =
            tokio::task::spawn_blocking(move || read_all(&kafka, &topic, "order-ingest-checkpoint-reader"))
                .await
                .map_err(|e| e.to_string())??;
        latest
            .into_iter()
            .map(|(key, value)| {
                let checkpoint = serde_json::from_slice(&value).map_err(|e| format!("corrupt checkpoint: {e}"))?;
                Ok((key, checkpoint))
            })
            .collect()
    }

    /// Stores a checkpoint and waits for the broker's acknowledgement.
    pub async fn save(&self, store: &str, checkpoint: &crate::poll::Checkpoint) -> Result<(), String> {
        let value = serde_json::to_vec(checkpoint).map_err(|e| e.to_string())?;
        self.producer.send(&self.topic, store.as_bytes(), &value, None).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Erased customer keys: `{"erased_at": <ms>}` keyed by customer key.
pub struct KafkaErasureLog {
    pub producer: Producer,
    pub topic: String,
    /// Bounded wait for the acknowledgement (past the producer's own delivery timeout).
    pub timeout: Duration,
}

impl ErasureLog for KafkaErasureLog {
    async fn append(&self, key: &str, erased: Erased) -> Result<(), PublishError> {
        let value = serde_json::to_vec(&erased).expect("plain data serialises");
        match tokio::time::timeout(self.timeout, self.producer.send(&self.topic, key.as_bytes(), &value, None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PublishError::from_kafka(&e)),
            Err(_) => Err(PublishError::Unavailable(format!("erasure not acknowledged within {:?}", self.timeout))),
        }
    }
}

/// Loads every erased key, then keeps applying new ones (other replicas' erasures) until
/// `stop`. Returns once the initial load is done, so nothing is published before it.
pub async fn follow_erasures(
    kafka: &KafkaArgs,
    topic: &str,
    keys: Arc<ErasedKeys>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    let group = "order-ingest-erasure-reader";
    let (reader_kafka, reader_topic) = (kafka.clone(), topic.clone());
    let (latest, ends) = tokio::task::spawn_blocking(move || read_all(&reader_kafka, &reader_topic, group))
        .await
        .map_err(|e| e.to_string())??;
    for (key, value) in &latest {
        apply(&keys, key.as_bytes(), value);
    }
    tracing::info!(erased_keys = keys.len(), "erased keys loaded");
    Ok(tokio::task::spawn_blocking(move || {
        let result = (|| -> Result<(), String> {
            let consumer = consumer(&kafka, group)?;
            let mut tpl = TopicPartitionList::new();
            for (p, end) in &ends {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(*end)).map_err(|e| e.to_string())?;
            }
            consumer.assign(&tpl).map_err(|e| e.to_string())?;
            while !stop.is_cancelled() {
                match consumer.poll(Duration::from_millis(500)) {
                    Some(Ok(message)) => {
                        if let (Some(key), Some(value)) = (message.key(), message.payload()) {
                            apply(&keys, key, value);
                        }
                    }
                    Some(Err(error)) => tracing::warn!(error = %error, "reading erased keys"),
                    None => {}
                }
            }
            Ok(())
        })();
        if let Err(error) = result {
            tracing::error!(error = %error, "cannot follow the erased keys; other replicas' erasures are not seen");
        }
    }))
}

fn apply(keys: &ErasedKeys, key: &[u8], value: &[u8]) {
    match serde_json::from_slice::<Erased>(value) {
        Ok(erased) => keys.record(&String::from_utf8_lossy(key), erased.erased_at),
        Err(error) => tracing::warn!(error = %error, "unreadable erased-key record skipped"),
    }
}
