//! Gathers one day's records from Kafka (a bounded read of each topic's day, found by
//! offsets-for-times) and the targets' quota from the sinks, and builds the report.
//!
//! API quota: the reconciler holds no Salesforce or RD Station credentials, so it asks the
//! sinks. salesforce-sink reads Salesforce's own count of the day's API requests from the
//! `Sforce-Limit-Info` header of every answer (the same figure as `/limits`
//! DailyApiRequests) and exports it as `salesforce_sink_api_quota_used`/`_remaining`.
//! RD Station has no quota API; rdstation-sink counts the requests it takes from its
//! per-account budget (`rdstation_sink_budget_requests_total`, since it started). Both are
//! live figures, so they are shown for today only; past days say unknown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use elo_events::{CommerceEvent, EventCodec, IntegrationCommand, SyncOutcome};
use elo_kafka::{KafkaArgs, Record};
use elo_service::CommonArgs;

use super::{DailyReport, QuotaFigures, ReportBuilder};
use crate::dlq::{DeadLetterEntry, parse_date};
use crate::ops::{OpsArgs, metric_sum};
use crate::scan::{self, Budget, Window};
use crate::status::LedgerStatus;

/// Where a report's figures come from.
pub struct ReportSources {
    pub kafka: KafkaArgs,
    pub commerce: String,
    pub outcomes: String,
    pub commands: String,
    pub ops: OpsArgs,
    pub codec: Arc<EventCodec>,
    pub http: reqwest::Client,
    pub budget: ReportBudget,
}

/// How long and how big one report may get. A day of a busy shop is well under both; past
/// them the report fails with a clear error rather than starving the ledger of memory.
#[derive(Clone, Copy, Debug)]
pub struct ReportBudget {
    pub time: Duration,
    pub records: u64,
}

impl Default for ReportBudget {
    fn default() -> Self {
        Self { time: Duration::from_secs(120), records: 5_000_000 }
    }
}

impl ReportSources {
    pub fn new(common: &CommonArgs, ops: &OpsArgs, codec: Arc<EventCodec>) -> anyhow::Result<Self> {
        Ok(Self {
            kafka: common.kafka.clone(),
            commerce: common.topics.commerce.clone(),
            outcomes: common.topics.outcomes.clone(),
            commands: common.topics.commands.clone(),
            ops: ops.clone(),
            codec,
            http: reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?,
            budget: ReportBudget::default(),
        })
    }

    /// The report of `date` (`YYYY-MM-DD`, UTC). Records are folded into the report as they
    /// are read (never held as a day's list), under a time and record budget.
    pub async fn daily(&self, date: &str, status: &LedgerStatus) -> anyhow::Result<DailyReport> {
        let day = parse_date(date).ok_or_else(|| anyhow::anyhow!("invalid date {date:?}: use YYYY-MM-DD"))?;
        let window = Window { from_ms: Some(day * 86_400_000), until_ms: Some((day + 1) * 86_400_000) };
        let now = crate::ops::now_ms();
        let builder = ReportBuilder::new(date, now);
        let mut builder = self.read(window, builder, now).await?;
        builder.ledger(status);
        let today = elo_events::time::date_of_ms(now) == date;
        for (target, figures) in self.quota(today).await {
            builder.quota(target, figures);
        }
        Ok(builder.finish())
    }

    /// Reads the day of every topic on a blocking thread, decoding each record as it comes
    /// (the codec's schema lookups run on the runtime through `block_on`).
    async fn read(&self, window: Window, mut builder: ReportBuilder, now: i64) -> anyhow::Result<ReportBuilder> {
        let (kafka, ops, codec) = (self.kafka.clone(), self.ops.clone(), self.codec.clone());
        let topics = [self.commerce.clone(), self.outcomes.clone(), self.commands.clone()];
        let budget = self.budget;
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let mut budget =
                Budget { deadline: Some(Instant::now() + budget.time), max_records: Some(budget.records), used: 0 };
            let mut checkpoints = HashMap::new();
            scan::scan_within(&kafka, &ops.replay_checkpoints, Window::default(), &mut budget, |r| {
                if let (Some(k), Some(v)) = (r.key, r.payload) {
                    checkpoints.insert(String::from_utf8_lossy(&k).into_owned(), Checkpoint::parse(&v));
                }
            })?;
            let replayed = handled_replays(&kafka, &checkpoints);
            for topic in &ops.dlq.dlq_topics {
                scan::scan_within(&kafka, topic, window, &mut budget, |r| {
                    let e = DeadLetterEntry(r);
                    let was_replayed = replayed.contains(&e.coordinate());
                    builder.dead_letter(&e, was_replayed);
                })?;
            }
            scan::scan_within(&kafka, &topics[0], window, &mut budget, |r| {
                commerce_record(&mut builder, &r, now, |r| runtime.block_on(decode_record(&codec, r)));
            })?;
            scan::scan_within(&kafka, &topics[1], window, &mut budget, |r| {
                if let Some(outcome) = runtime.block_on(decode_record::<SyncOutcome>(&codec, &r)) {
                    builder.outcome(&outcome);
                }
            })?;
            scan::scan_within(&kafka, &topics[2], window, &mut budget, |r| {
                if let Some(command) = runtime.block_on(decode_record::<IntegrationCommand>(&codec, &r)) {
                    builder.command(&command);
                }
            })?;
            Ok(builder)
        })
        .await?
    }

    async fn metrics(&self, service: &str) -> Option<String> {
        let url = format!("{}/metrics", self.ops.admin_url(service)?);
        self.http.get(url).send().await.ok()?.error_for_status().ok()?.text().await.ok()
    }

    async fn quota(&self, today: bool) -> Vec<(&'static str, QuotaFigures)> {
        if !today {
            let past =
                || QuotaFigures { used: None, limit: None, source: "live figure: not kept for past days".into() };
            return vec![("salesforce", past()), ("rdstation", past())];
        }
        let sf = self.metrics("salesforce-sink").await;
        let used = sf.as_deref().and_then(|m| metric_sum(m, "salesforce_sink_api_quota_used", &[])).map(|v| v as u64);
        let remaining =
            sf.as_deref().and_then(|m| metric_sum(m, "salesforce_sink_api_quota_remaining", &[])).map(|v| v as u64);
        let limit = used.zip(remaining).map(|(u, r)| u + r).filter(|l| *l > 0);
        let salesforce = QuotaFigures {
            used: if limit.is_some() { used } else { None },
            limit,
            source: "Salesforce DailyApiRequests, from salesforce-sink (Sforce-Limit-Info)".into(),
        };
        let rd = self.metrics("rdstation-sink").await;
        let rdstation = QuotaFigures {
            used: rd
                .as_deref()
                .and_then(|m| metric_sum(m, "rdstation_sink_budget_requests_total", &[]))
                .map(|v| v as u64),
            limit: None,
            source: "requests counted by rdstation-sink since it started (RD Station has no quota API)".into(),
        };
        vec![("salesforce", salesforce), ("rdstation", rdstation)]
    }
}

/// A replay checkpoint's value: where the replay was written and for which group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub landed: Option<(String, i32, i64)>,
    pub group: Option<String>,
}

impl Checkpoint {
    pub(crate) fn parse(value: &[u8]) -> Self {
        let v: serde_json::Value = serde_json::from_slice(value).unwrap_or_default();
        let landed = v["replayed_to"].as_str().and_then(|t| {
            let mut parts = t.rsplitn(3, '/');
            let offset = parts.next()?.parse().ok()?;
            let partition = parts.next()?.parse().ok()?;
            Some((parts.next()?.to_owned(), partition, offset))
        });
        Self { landed, group: v["group"].as_str().map(str::to_owned) }
    }

    /// Whether the group handled the replay: its committed offset is past it. A checkpoint
    /// from before the group was recorded counts as handled (as it always did).
    pub(crate) fn handled(&self, committed: &BTreeMap<(String, String, i32), i64>) -> bool {
        match (&self.landed, &self.group) {
            (Some((topic, partition, offset)), Some(group)) => {
                committed.get(&(group.clone(), topic.clone(), *partition)).is_some_and(|c| c > offset)
            }
            _ => true,
        }
    }
}

/// The dead letters whose replay the group it was for has handled (committed past). A letter
/// replayed but not yet handled still needs a person's eye. Blocking.
fn handled_replays(kafka: &KafkaArgs, checkpoints: &HashMap<String, Checkpoint>) -> HashSet<String> {
    let mut wanted: BTreeMap<String, std::collections::BTreeSet<(String, i32)>> = BTreeMap::new();
    for c in checkpoints.values() {
        if let (Some((topic, partition, _)), Some(group)) = (&c.landed, &c.group) {
            wanted.entry(group.clone()).or_default().insert((topic.clone(), *partition));
        }
    }
    let mut committed = BTreeMap::new();
    for (group, partitions) in wanted {
        let partitions: Vec<(String, i32)> = partitions.into_iter().collect();
        match crate::dlq::groups::committed(kafka, &group, &partitions) {
            Ok(offsets) => {
                for ((topic, partition), offset) in offsets {
                    committed.insert((group.clone(), topic, partition), offset);
                }
            }
            // Unknown: those replays count as not handled yet.
            Err(error) => {
                tracing::warn!(error = %error, group, "cannot read the committed offsets of a replay's group")
            }
        }
    }
    checkpoints.iter().filter(|(_, c)| c.handled(&committed)).map(|(k, _)| k.clone()).collect()
}

/// Feeds one commerce.events record: a replay (`elo-replay-of`) is the same event again,
/// counted apart and kept out of the traffic and latency figures.
pub(crate) fn commerce_record(
    builder: &mut ReportBuilder,
    r: &Record,
    now: i64,
    decode: impl FnOnce(&Record) -> Option<CommerceEvent>,
) {
    if r.header(elo_kafka::dlq::REPLAY_OF).is_some() {
        builder.replayed_record();
        return;
    }
    if let Some(event) = decode(r) {
        builder.commerce(&event, r.timestamp_ms.unwrap_or(now));
    }
}

async fn decode_record<T: elo_events::AvroEvent>(codec: &EventCodec, r: &Record) -> Option<T> {
    match codec.decode::<T>(r.payload.as_deref()?).await {
        Ok(v) => Some(v),
        Err(error) => {
            // Malformed records are the consumers' business (they park them); the report
            // counts what it can read.
            tracing::debug!(topic = %r.topic, partition = r.partition, offset = r.offset, error = %error, "record left out of the report");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use elo_events::sample;

    use super::*;

    #[test]
    fn a_replay_counts_as_handled_only_once_its_group_committed_past_it() {
        let c = Checkpoint::parse(br#"{"replayed_to":"commerce.events/2/40","group":"g","at_ms":1}"#);
        assert_eq!(c.landed, Some(("commerce.events".to_owned(), 2, 40)));
        let at = |offset: i64| BTreeMap::from([(("g".to_owned(), "commerce.events".to_owned(), 2), offset)]);
        assert!(!c.handled(&BTreeMap::new()), "no committed offset: not handled");
        assert!(!c.handled(&at(40)), "committed up to the replay, not past it");
        assert!(c.handled(&at(41)));
        assert!(Checkpoint::parse(br#"{"replayed_to":"commerce.events/2/40","at_ms":1}"#).handled(&BTreeMap::new()));
    }

    #[test]
    fn replayed_commerce_records_are_counted_apart_not_as_new_traffic() {
        let event = sample::order_placed(7);
        let record = |headers: Vec<(String, Vec<u8>)>| Record {
            topic: "commerce.events".into(),
            partition: 0,
            offset: 1,
            key: None,
            payload: None,
            headers,
            timestamp_ms: Some(event.occurred_at + 3 * 86_400_000),
        };
        let mut b = ReportBuilder::new("2026-11-30", 0);
        let replay = record(vec![(elo_kafka::dlq::REPLAY_OF.to_owned(), b"salesforce-sink.dlq/0/4".to_vec())]);
        commerce_record(&mut b, &replay, 0, |_| Some(event.clone()));
        let r = b.finish();
        assert_eq!((r.order_events, r.orders_received, r.replayed_records), (0, 0, 1));
        assert!(r.latency.is_empty(), "a replay's age is not a latency sample");
        let mut b = ReportBuilder::new("2026-11-30", 0);
        commerce_record(&mut b, &record(Vec::new()), 0, |_| Some(event.clone()));
        let r = b.finish();
        assert_eq!((r.order_events, r.orders_received, r.replayed_records), (1, 1, 0));
    }
}
