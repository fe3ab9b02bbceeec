//! The live flow diagram's figures: the six workflow steps (order → inventory → Salesforce →
//! RD Station → monitoring/repair → report) with a count, a backlog and a health each.
//!
//! - Counts come from the services' own `/metrics` (since each process started) and the
//!   ledger's [`LedgerStatus`]; a service that does not answer shows no count, not zero.
//! - Backlog is consumer-group lag: high watermarks minus committed offsets of the group that
//!   does the step's work (a partition the group never committed counts whole).
//! - Health is the service's `/health/readyz`.

pub mod page;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elo_kafka::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::ops::{OpsArgs, metric_sum};
use crate::status::LedgerStatus;

/// A service's health as the diagram shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Ready,
    NotReady,
    Unreachable,
}

/// One step of the workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowStep {
    /// `order`, `inventory`, `salesforce`, `rdstation`, `repair`, `report`.
    pub id: String,
    pub title: String,
    /// The service doing the step.
    pub service: String,
    /// The step's main count (`None`: the service did not answer).
    pub count: Option<u64>,
    /// What `count` counts.
    pub count_label: String,
    /// Further figures (dead-lettered, overdue, ...).
    pub details: BTreeMap<String, u64>,
    /// Records waiting for the step (`None`: not a consumer, or unknown).
    pub backlog: Option<i64>,
    pub health: Health,
}

/// The whole diagram.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowSnapshot {
    pub as_of_ms: i64,
    pub steps: Vec<FlowStep>,
}

impl FlowSnapshot {
    /// `order=12 inventory=12 ...`: the one-line form `make run` prints (`-` when unknown).
    pub fn line(&self) -> String {
        self.steps
            .iter()
            .map(|s| format!("{}={}", s.id, s.count.map_or_else(|| "-".to_owned(), |c| c.to_string())))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the services answered, gathered by [`FlowSources::observe`].
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// `/metrics` text per service (absent: no answer).
    pub metrics: BTreeMap<String, String>,
    /// `/health/readyz` per service.
    pub health: BTreeMap<String, Health>,
    /// Lag per service group.
    pub backlog: BTreeMap<String, i64>,
    /// Records held in all DLQ topics.
    pub dead_letters: Option<i64>,
    /// Replays recorded in the checkpoint topic (one per dead letter, once compacted).
    pub replayed: Option<i64>,
    /// Reports served by this process.
    pub reports_served: u64,
}

/// Builds the six steps from what was observed (pure: unit-tested).
pub fn snapshot(o: &Observed, status: &LedgerStatus, commerce_topic: &str, as_of_ms: i64) -> FlowSnapshot {
    let health = |s: &str| o.health.get(s).copied().unwrap_or(Health::Unreachable);
    let metric = |s: &str, name: &str, labels: &[&str]| -> Option<u64> {
        o.metrics.get(s).map(|m| metric_sum(m, name, labels).unwrap_or(0.0) as u64)
    };
    let consumer_step = |id: &str, title: &str, service: &str| {
        let mut details = BTreeMap::new();
        for outcome in ["dead_lettered", "skipped_replay"] {
            if let Some(v) = metric(service, "elo_consumer_records_total", &[&format!("outcome=\"{outcome}\"")]) {
                details.insert(outcome.to_owned(), v);
            }
        }
        FlowStep {
            id: id.into(),
            title: title.into(),
            service: service.into(),
            count: metric(service, "elo_consumer_records_total", &["outcome=\"applied\""]),
            count_label: "records applied".into(),
            details,
            backlog: o.backlog.get(service).copied(),
            health: health(service),
        }
    };
    let produced = format!("topic=\"{commerce_topic}\"");
    let mut order_details = BTreeMap::new();
    if let Some(v) = metric("order-ingest", "order_ingest_notifications_total", &["outcome=\"published\""]) {
        order_details.insert("notifications_published".into(), v);
    }
    let mut inventory_details = BTreeMap::new();
    inventory_details.insert("oversold_orders".into(), status.oversold_orders);
    if let Some(v) = metric("order-ingest", "order_ingest_inventory_checks_total", &["outcome=\"failed\""]) {
        inventory_details.insert("failed".into(), v);
    }
    let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
    let repair_details: BTreeMap<String, u64> = [
        ("orders_in_ledger", status.orders),
        ("overdue", sum(&status.overdue)),
        ("failed", sum(&status.failed)),
        ("drift_found", sum(&status.drift_found_total)),
        ("escalated", sum(&status.escalated_total)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut report_details = BTreeMap::new();
    if let Some(d) = o.dead_letters {
        report_details.insert("dead_letters_held".into(), d.max(0) as u64);
        // Held counts every letter the DLQs keep, replayed or not; this says how many were.
        if let Some(r) = o.replayed {
            report_details.insert("dead_letters_replayed".into(), r.clamp(0, d.max(0)) as u64);
        }
    }
    let steps = vec![
        FlowStep {
            id: "order".into(),
            title: "Order".into(),
            service: "order-ingest".into(),
            count: metric("order-ingest", "elo_kafka_produced_records_total", &[&produced]),
            count_label: "events published".into(),
            details: order_details,
            backlog: o.backlog.get("order-ingest").copied(),
            health: health("order-ingest"),
        },
        FlowStep {
            id: "inventory".into(),
            title: "Inventory".into(),
            service: "order-ingest".into(),
            count: metric("order-ingest", "order_ingest_inventory_checks_total", &[]),
            count_label: "stock checks".into(),
            details: inventory_details,
            backlog: None,
            health: health("order-ingest"),
        },
        consumer_step("salesforce", "Salesforce", "salesforce-sink"),
        consumer_step("rdstation", "RD Station", "rdstation-sink"),
        FlowStep {
            id: "repair".into(),
            title: "Monitoring / repair".into(),
            service: "reconciler".into(),
            count: Some(sum(&status.repaired_total)),
            count_label: "repaired".into(),
            details: repair_details,
            backlog: o.backlog.get("reconciler").copied(),
            health: health("reconciler"),
        },
        FlowStep {
            id: "report".into(),
            title: "Report".into(),
            service: "reconciler".into(),
            count: Some(o.reports_served),
            count_label: "reports served".into(),
            details: report_details,
            backlog: None,
            // This process answers, or there would be no diagram.
            health: Health::Ready,
        },
    ];
    FlowSnapshot { as_of_ms, steps }
}

/// Where the live figures come from.
pub struct FlowSources {
    pub kafka: KafkaArgs,
    pub ops: OpsArgs,
    /// Topics each service group consumes.
    pub group_topics: Vec<(String, String, Vec<String>)>,
    pub http: reqwest::Client,
    /// Kafka clients made once and reused by every refresh (one per group: committed offsets
    /// are asked with the group's id).
    clients: Arc<Mutex<Option<LagClients>>>,
}

struct LagClients {
    meta: BaseConsumer,
    groups: Vec<(String, BaseConsumer, Vec<String>)>,
}

impl FlowSources {
    /// `reconciler_group` and the topic names come from the reconciler's own settings.
    pub fn new(
        kafka: &KafkaArgs,
        ops: &OpsArgs,
        topics: &elo_service::TopicArgs,
        reconciler_group: &str,
    ) -> anyhow::Result<Self> {
        let mut group_topics = Vec::new();
        for (service, topics) in [
            ("order-ingest", vec![topics.commands.clone()]),
            ("salesforce-sink", vec![topics.commerce.clone()]),
            ("rdstation-sink", vec![topics.commerce.clone()]),
        ] {
            if let Some(group) = ops.group(service) {
                group_topics.push((service.to_owned(), group.to_owned(), topics));
            }
        }
        group_topics.push((
            "reconciler".into(),
            reconciler_group.to_owned(),
            vec![topics.commerce.clone(), topics.outcomes.clone()],
        ));
        Ok(Self {
            kafka: kafka.clone(),
            ops: ops.clone(),
            group_topics,
            http: reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?,
            clients: Arc::default(),
        })
    }

    /// Asks every service and the broker, concurrently; never fails (what does not answer is
    /// shown as such).
    pub async fn observe(&self) -> Observed {
        let mut o = Observed::default();
        let asks = crate::ops::SERVICES.iter().filter_map(|s| Some((*s, self.ops.admin_url(s)?.to_owned()))).map(
            |(s, url)| async move {
                let health = match self.http.get(format!("{url}/health/readyz")).send().await {
                    Ok(r) if r.status().is_success() => Health::Ready,
                    Ok(_) => Health::NotReady,
                    Err(_) => Health::Unreachable,
                };
                let metrics = match self.http.get(format!("{url}/metrics")).send().await {
                    Ok(r) if r.status().is_success() => r.text().await.ok(),
                    _ => None,
                };
                (s, health, metrics)
            },
        );
        for (s, health, metrics) in futures::future::join_all(asks).await {
            o.health.insert(s.to_owned(), health);
            if let Some(m) = metrics {
                o.metrics.insert(s.to_owned(), m);
            }
        }
        let (kafka, groups, dlqs) = (self.kafka.clone(), self.group_topics.clone(), self.ops.dlq.dlq_topics.clone());
        let checkpoints = self.ops.replay_checkpoints.clone();
        let clients = self.clients.clone();
        let lag = tokio::task::spawn_blocking(move || {
            let mut clients = clients.lock().expect("lag clients");
            if clients.is_none() {
                *clients = Some(LagClients::new(&kafka, &groups)?);
            }
            lags(clients.as_ref().expect("made above"), &dlqs, &checkpoints)
        })
        .await;
        match lag {
            Ok(Ok((backlog, dead_letters, replayed))) => {
                o.backlog = backlog;
                o.dead_letters = Some(dead_letters);
                o.replayed = Some(replayed);
            }
            Ok(Err(error)) => tracing::warn!(error = %error, "cannot read consumer lag for the flow diagram"),
            Err(error) => tracing::warn!(error = %error, "lag task failed"),
        }
        o
    }
}

/// Lag per service, letters held in the DLQs, replays checkpointed.
type Lags = (BTreeMap<String, i64>, i64, i64);

impl LagClients {
    fn new(kafka: &KafkaArgs, groups: &[(String, String, Vec<String>)]) -> anyhow::Result<Self> {
        let groups = groups
            .iter()
            .map(|(service, group, topics)| {
                let consumer: BaseConsumer =
                    kafka.client_config(&[("group.id", group.as_str()), ("enable.auto.commit", "false")])?.create()?;
                Ok((service.clone(), consumer, topics.clone()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { meta: crate::scan::metadata_consumer(kafka)?, groups })
    }
}

/// Short: a refresh is repeated soon anyway, and a slow broker must not stall the diagram.
const LAG_TIMEOUT: Duration = Duration::from_secs(2);

/// Low and high watermark of every partition of `topic` (empty when it does not exist).
fn watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i64, i64)>> {
    let metadata = consumer.fetch_metadata(Some(topic), LAG_TIMEOUT)?;
    let Some(t) = metadata.topics().first().filter(|t| t.error().is_none()) else { return Ok(Vec::new()) };
    (0..t.partitions().len() as i32).map(|p| Ok(consumer.fetch_watermarks(topic, p, LAG_TIMEOUT)?)).collect()
}

/// Lag per service group, and the records held in the DLQ topics.
fn lags(clients: &LagClients, dlqs: &[String], checkpoints: &str) -> anyhow::Result<Lags> {
    let mut out = BTreeMap::new();
    // Each topic's watermarks once, whichever groups read it.
    let mut marks: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for (service, consumer, topics) in &clients.groups {
        let mut tpl = TopicPartitionList::new();
        let mut ends = Vec::new();
        for topic in topics {
            if !marks.contains_key(topic) {
                marks.insert(topic.clone(), watermarks(&clients.meta, topic)?);
            }
            for (p, (low, high)) in marks[topic].iter().enumerate() {
                tpl.add_partition(topic, p as i32);
                ends.push((topic.clone(), p as i32, *low, *high));
            }
        }
        if ends.is_empty() {
            out.insert(service.clone(), 0);
            continue;
        }
        let committed = consumer.committed_offsets(tpl, LAG_TIMEOUT)?;
        let lag: i64 = ends
            .iter()
            .map(|(topic, p, low, high)| {
                let done = match committed.find_partition(topic, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o.max(*low),
                    _ => *low,
                };
                (high - done).max(0)
            })
            .sum();
        out.insert(service.clone(), lag);
    }
    let mut held = 0i64;
    for topic in dlqs {
        held += watermarks(&clients.meta, topic)?.iter().map(|(low, high)| high - low).sum::<i64>();
    }
    let replayed = watermarks(&clients.meta, checkpoints)?.iter().map(|(low, high)| high - low).sum::<i64>();
    Ok((out, held, replayed))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn observed() -> Observed {
        let mut o = Observed::default();
        o.metrics.insert(
            "order-ingest".into(),
            "elo_kafka_produced_records_total{topic=\"commerce.events\"} 120\n\
elo_kafka_produced_records_total{topic=\"inventory.events\"} 7\n\
order_ingest_inventory_checks_total{outcome=\"fetched\"} 90\norder_ingest_inventory_checks_total{outcome=\"cached\"} 10\n\
order_ingest_notifications_total{outcome=\"published\"} 100\n"
                .into(),
        );
        o.metrics.insert(
            "salesforce-sink".into(),
            "elo_consumer_records_total{topic=\"commerce.events\",outcome=\"applied\"} 110\n\
elo_consumer_records_total{topic=\"commerce.events\",outcome=\"dead_lettered\"} 3\n"
                .into(),
        );
        o.health.insert("order-ingest".into(), Health::Ready);
        o.health.insert("salesforce-sink".into(), Health::NotReady);
        o.backlog.insert("salesforce-sink".into(), 7);
        o.backlog.insert("reconciler".into(), 0);
        o.dead_letters = Some(3);
        o.replayed = Some(5);
        o.reports_served = 2;
        o
    }

    #[test]
    fn six_steps_in_workflow_order_with_counts_backlog_and_health() {
        let status = LedgerStatus {
            oversold_orders: 2,
            repaired_total: [("salesforce".to_owned(), 5)].into(),
            ..LedgerStatus::default()
        };
        let s = snapshot(&observed(), &status, "commerce.events", 9);
        let ids: Vec<&str> = s.steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["order", "inventory", "salesforce", "rdstation", "repair", "report"]);
        assert_eq!(s.steps[0].count, Some(120), "only the commerce topic counts as orders");
        assert_eq!(s.steps[0].details["notifications_published"], 100);
        assert_eq!(s.steps[1].count, Some(100));
        assert_eq!(s.steps[1].details["oversold_orders"], 2);
        assert_eq!((s.steps[2].count, s.steps[2].backlog, s.steps[2].health), (Some(110), Some(7), Health::NotReady));
        assert_eq!(s.steps[2].details["dead_lettered"], 3);
        assert_eq!((s.steps[3].count, s.steps[3].health), (None, Health::Unreachable), "no answer is not zero");
        assert_eq!(s.steps[4].count, Some(5));
        assert_eq!(s.steps[5].details["dead_letters_held"], 3);
        assert_eq!(
            s.steps[5].details["dead_letters_replayed"], 3,
            "never more than held (duplicates before compaction)"
        );
        assert_eq!(s.line(), "order=120 inventory=100 salesforce=110 rdstation=- repair=5 report=2");
    }

    #[test]
    fn with_nothing_published_the_ledger_steps_show_zeros() {
        let s = snapshot(&Observed::default(), &LedgerStatus::default(), "commerce.events", 0);
        assert_eq!(s.steps[4].count, Some(0));
        assert!(s.steps[..4].iter().all(|s| s.count.is_none() && s.health == Health::Unreachable));
    }
}
