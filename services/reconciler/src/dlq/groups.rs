//! Does a consumer group exist for a topic? A replay is marked for one group and every other
//! group skips it, so a replay for a group nobody runs (a typo in `--for-group`, a renamed
//! group) would be dropped by all and still be checkpointed as done.

use std::time::Duration;

use elo_kafka::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(10);

/// True when `group` has live members, or has committed an offset on some partition of
/// `topic`. Blocking: call from a blocking thread.
pub fn consumes(kafka: &KafkaArgs, group: &str, topic: &str) -> anyhow::Result<bool> {
    // A client with the group's id asks for its offsets; it never joins the group.
    let consumer: BaseConsumer =
        kafka.client_config(&[("group.id", group), ("enable.auto.commit", "false")])?.create()?;
    if let Ok(list) = consumer.fetch_group_list(Some(group), TIMEOUT)
        && list.groups().iter().any(|g| g.name() == group && !g.members().is_empty())
    {
        return Ok(true);
    }
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let Some(t) = metadata.topics().first().filter(|t| t.error().is_none()) else { return Ok(false) };
    let mut tpl = TopicPartitionList::new();
    for p in 0..t.partitions().len() as i32 {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, TIMEOUT)?;
    Ok(committed.elements().iter().any(|e| matches!(e.offset(), Offset::Offset(o) if o >= 0)))
}

/// The committed offset of `group` on each of `partitions` that has one. Blocking.
pub fn committed(
    kafka: &KafkaArgs,
    group: &str,
    partitions: &[(String, i32)],
) -> anyhow::Result<Vec<((String, i32), i64)>> {
    let consumer: BaseConsumer =
        kafka.client_config(&[("group.id", group), ("enable.auto.commit", "false")])?.create()?;
    let mut tpl = TopicPartitionList::new();
    for (topic, p) in partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, TIMEOUT)?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) if o >= 0 => Some(((e.topic().to_owned(), e.partition()), o)),
            _ => None,
        })
        .collect())
}
