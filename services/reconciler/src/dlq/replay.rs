//! Replaying dead letters through the normal path.
//!
//! A replay republishes the original key, value and headers (incl. `traceparent`) to the
//! origin topic, on the partition the key maps to now (the producers' partitioner; the origin
//! partition for a record without key), so after partitions were added the replay still sits
//! with the key's newer records. It is marked `elo-replay-of: <dlq topic/partition/offset>` and
//! `elo-replay-for: <group that parked it>`. Only that group's consumer handles it (every other
//! consumer of the topic skips it, committing past it: see `elo_kafka::dlq::REPLAY_FOR`), so all
//! of the consumer's guarantees hold: ordered per key, retried by class, and a record that
//! fails again is parked in its DLQ again (with its `elo-replay-of`), never lost.
//!
//! Progress is checkpointed in a compacted topic (`reconciler.replay.checkpoints`, key = the dead letter's
//! coordinate) after each record is acknowledged: a replay interrupted and run again skips
//! what was done. A crash between the publish and the checkpoint replays that one record twice,
//! which is harmless: every handler is idempotent (upserts by external id, stale versions
//! skipped).

use std::collections::HashSet;
use std::future::Future;

use elo_kafka::dlq;

use super::DeadLetterEntry;

/// What a replay does with one dead letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Republish to this topic, for this group: on the partition its key maps to (`None`), or
    /// on this one (a record without key).
    Replay { topic: String, partition: Option<i32>, group: String },
    /// Already replayed (checkpoint found); `--again` replays it anyway.
    AlreadyReplayed,
    /// Cannot be replayed, and why.
    NotReplayable(&'static str),
}

/// Decides what to do with each selected dead letter. `done` holds the coordinates already
/// replayed (from the checkpoint topic); `for_group` replaces the group that parked them (a
/// consumer group renamed since).
pub fn plan(entries: &[DeadLetterEntry], done: &HashSet<String>, again: bool, for_group: Option<&str>) -> Vec<Action> {
    entries
        .iter()
        .map(|e| {
            if e.origin().is_none() || (e.group().is_none() && for_group.is_none()) {
                return Action::NotReplayable(e.not_replayable().unwrap_or("no consumer group to replay for"));
            }
            if !again && done.contains(&e.coordinate()) {
                return Action::AlreadyReplayed;
            }
            let (topic, partition, _) = e.origin().expect("checked above");
            let group = for_group.or(e.group()).expect("checked above").to_owned();
            let partition = if e.0.key.is_some() { None } else { Some(partition) };
            Action::Replay { topic, partition, group }
        })
        .collect()
}

/// The headers of the republished record.
pub fn replay_headers(entry: &DeadLetterEntry, group: &str) -> Vec<(String, Vec<u8>)> {
    let mut headers = entry.original_headers();
    headers.push((dlq::REPLAY_OF.to_owned(), entry.coordinate().into_bytes()));
    headers.push((dlq::REPLAY_FOR.to_owned(), group.as_bytes().to_vec()));
    headers
}

/// Where replays are written: Kafka in production, a fake in tests.
pub trait ReplayWriter {
    /// Publishes the record (on `partition`, or by key) and waits for the broker's
    /// acknowledgement; returns where it was written.
    fn publish(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(String, Vec<u8>)],
    ) -> impl Future<Output = anyhow::Result<String>>;
    /// Records that `coordinate` was replayed to `landed` (`<topic>/<partition>/<offset>`) for
    /// `group`.
    fn checkpoint(&self, coordinate: &str, landed: &str, group: &str) -> impl Future<Output = anyhow::Result<()>>;
}

/// What a replay run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub replayed: u64,
    pub already_replayed: u64,
    pub not_replayable: u64,
}

/// Replays the planned records in order (one at a time: order within a key is kept). Stops at
/// the first write error; what was done is checkpointed, so running it again continues.
pub async fn execute<W: ReplayWriter>(
    writer: &W,
    entries: &[DeadLetterEntry],
    actions: &[Action],
    mut progress: impl FnMut(&DeadLetterEntry, &Action),
) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    for (entry, action) in entries.iter().zip(actions) {
        match action {
            Action::Replay { topic, partition, group } => {
                let headers = replay_headers(entry, group);
                let landed = writer
                    .publish(topic, *partition, entry.0.key.as_deref(), entry.0.payload.as_deref(), &headers)
                    .await
                    .map_err(|e| e.context(format!("replaying {}", entry.coordinate())))?;
                writer.checkpoint(&entry.coordinate(), &landed, group).await?;
                summary.replayed += 1;
            }
            Action::AlreadyReplayed => summary.already_replayed += 1,
            Action::NotReplayable(_) => summary.not_replayable += 1,
        }
        progress(entry, action);
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::dlq::tests::letter;

    fn sf(offset: i64) -> DeadLetterEntry {
        letter(
            "salesforce-sink.dlq",
            offset,
            &[
                ("traceparent", "00-aa-bb-01"),
                (dlq::ERROR_CODE, "DUPLICATES_DETECTED"),
                (dlq::ORIGIN_TOPIC, "commerce.events"),
                (dlq::ORIGIN_PARTITION, "3"),
                (dlq::ORIGIN_OFFSET, &(100 + offset).to_string()),
                (dlq::GROUP, "elo-salesforce-sink"),
            ],
            1,
        )
    }

    type Published = (String, Option<i32>, Vec<(String, Vec<u8>)>);

    #[derive(Default)]
    struct Fake {
        published: Mutex<Vec<Published>>,
        checkpoints: Mutex<Vec<String>>,
        fail_after: Option<usize>,
        /// Checkpoints refused once this many were written (a crash after a publish).
        checkpoint_fails_after: Option<usize>,
    }

    impl ReplayWriter for Fake {
        async fn publish(
            &self,
            topic: &str,
            partition: Option<i32>,
            _key: Option<&[u8]>,
            _payload: Option<&[u8]>,
            headers: &[(String, Vec<u8>)],
        ) -> anyhow::Result<String> {
            let mut p = self.published.lock().unwrap();
            if self.fail_after.is_some_and(|n| p.len() >= n) {
                anyhow::bail!("broker down");
            }
            p.push((topic.to_owned(), partition, headers.to_vec()));
            Ok(format!("{topic}/{}/{}", partition.unwrap_or(0), p.len()))
        }
        async fn checkpoint(&self, coordinate: &str, _landed: &str, _group: &str) -> anyhow::Result<()> {
            if self.checkpoint_fails_after.is_some_and(|n| self.checkpoints.lock().unwrap().len() >= n) {
                anyhow::bail!("process killed before the checkpoint");
            }
            self.checkpoints.lock().unwrap().push(coordinate.to_owned());
            Ok(())
        }
    }

    #[test]
    fn the_plan_skips_what_was_replayed_and_what_cannot_be() {
        let outside = letter("order-ingest.dlq", 0, &[(dlq::ORIGIN_SOURCE, "magento-poll/orders")], 1);
        let entries = vec![sf(1), sf(2), outside];
        let done: HashSet<String> = ["salesforce-sink.dlq/1/1".to_owned()].into();
        let actions = plan(&entries, &done, false, None);
        assert_eq!(actions[0], Action::AlreadyReplayed);
        assert_eq!(
            actions[1],
            Action::Replay { topic: "commerce.events".into(), partition: None, group: "elo-salesforce-sink".into() },
            "keyed: the partition the key maps to now"
        );
        assert!(matches!(actions[2], Action::NotReplayable(_)));
        assert!(matches!(plan(&entries, &done, true, None)[0], Action::Replay { .. }), "--again replays it anyway");
        let renamed = plan(&entries, &done, false, Some("elo-salesforce-sink-v2"));
        assert!(matches!(&renamed[1], Action::Replay { group, .. } if group == "elo-salesforce-sink-v2"));
        assert!(
            matches!(renamed[2], Action::NotReplayable(_)),
            "a group does not give a Magento record an origin topic"
        );
    }

    #[tokio::test]
    async fn replays_go_to_the_origin_topic_marked_for_one_group_and_are_checkpointed() {
        let mut keyless = sf(3);
        keyless.0.key = None;
        assert!(
            matches!(&plan(&[keyless], &HashSet::new(), false, None)[0], Action::Replay { partition: Some(3), .. }),
            "a record without key goes back to its origin partition"
        );
        let entries = vec![sf(1), sf(2)];
        let actions = plan(&entries, &HashSet::new(), false, None);
        let fake = Fake::default();
        let summary = execute(&fake, &entries, &actions, |_, _| {}).await.unwrap();
        assert_eq!(summary, Summary { replayed: 2, already_replayed: 0, not_replayable: 0 });
        let published = fake.published.lock().unwrap();
        let (topic, partition, headers) = &published[0];
        assert_eq!((topic.as_str(), *partition), ("commerce.events", None), "by key");
        let get =
            |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8(v.clone()).unwrap());
        assert_eq!(get("traceparent").as_deref(), Some("00-aa-bb-01"));
        assert_eq!(get(dlq::REPLAY_OF).as_deref(), Some("salesforce-sink.dlq/1/1"));
        assert_eq!(get(dlq::REPLAY_FOR).as_deref(), Some("elo-salesforce-sink"));
        assert_eq!(get(dlq::ERROR_CODE), None, "the dlq headers stay behind");
        assert_eq!(*fake.checkpoints.lock().unwrap(), ["salesforce-sink.dlq/1/1", "salesforce-sink.dlq/1/2"]);
    }

    #[tokio::test]
    async fn an_interrupted_replay_resumes_without_repeating_what_was_done() {
        let entries = vec![sf(1), sf(2), sf(3)];
        let first = Fake { fail_after: Some(1), ..Fake::default() };
        let actions = plan(&entries, &HashSet::new(), false, None);
        assert!(execute(&first, &entries, &actions, |_, _| {}).await.is_err());
        let done: HashSet<String> = first.checkpoints.lock().unwrap().iter().cloned().collect();
        let second = Fake::default();
        let summary = execute(&second, &entries, &plan(&entries, &done, false, None), |_, _| {}).await.unwrap();
        assert_eq!(summary, Summary { replayed: 2, already_replayed: 1, not_replayable: 0 });
        let replayed_of: Vec<_> =
            second.published.lock().unwrap().iter().map(|(_, _, h)| h.last().unwrap().1.clone()).collect();
        assert_eq!(replayed_of.len(), 2);
    }

    #[tokio::test]
    async fn a_crash_between_publish_and_checkpoint_replays_that_one_record_again_and_no_other() {
        let entries = vec![sf(1), sf(2), sf(3)];
        let first = Fake { checkpoint_fails_after: Some(1), ..Fake::default() };
        let actions = plan(&entries, &HashSet::new(), false, None);
        assert!(execute(&first, &entries, &actions, |_, _| {}).await.is_err(), "the run stops at the failure");
        assert_eq!(first.published.lock().unwrap().len(), 2, "the second record was published, not checkpointed");
        let done: HashSet<String> = first.checkpoints.lock().unwrap().iter().cloned().collect();
        let second = Fake::default();
        let summary = execute(&second, &entries, &plan(&entries, &done, false, None), |_, _| {}).await.unwrap();
        assert_eq!(summary, Summary { replayed: 2, already_replayed: 1, not_replayable: 0 });
        let of = |f: &Fake| -> Vec<String> {
            f.published
                .lock()
                .unwrap()
                .iter()
                .map(|(_, _, h)| {
                    String::from_utf8(h.iter().find(|(k, _)| k == dlq::REPLAY_OF).unwrap().1.clone()).unwrap()
                })
                .collect()
        };
        assert_eq!(of(&first), ["salesforce-sink.dlq/1/1", "salesforce-sink.dlq/1/2"]);
        assert_eq!(
            of(&second),
            ["salesforce-sink.dlq/1/2", "salesforce-sink.dlq/1/3"],
            "only the unconfirmed one twice"
        );
    }
}
