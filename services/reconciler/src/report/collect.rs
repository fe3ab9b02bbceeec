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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use elo_events::{CommerceEvent, EventCodec, IntegrationCommand, SyncOutcome};
use elo_kafka::{KafkaArgs, Record};
use elo_service::CommonArgs;

use super::{DailyReport, QuotaFigures, ReportBuilder};
use crate::dlq::{DeadLetterEntry, parse_date};
use crate::ops::{OpsArgs, metric_sum};
use crate::scan::{self, Window};
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
        })
    }

    /// The report of `date` (`YYYY-MM-DD`, UTC).
    pub async fn daily(&self, date: &str, status: &LedgerStatus) -> anyhow::Result<DailyReport> {
        let day = parse_date(date).ok_or_else(|| anyhow::anyhow!("invalid date {date:?}: use YYYY-MM-DD"))?;
        let window = Window { from_ms: Some(day * 86_400_000), until_ms: Some((day + 1) * 86_400_000) };
        let now = crate::dlq::cli::now_ms();
        let mut builder = ReportBuilder::new(date, now);

        let records = self.read(window).await?;
        for r in &records.commerce {
            if let Some(event) = self.decode::<CommerceEvent>(r).await {
                builder.commerce(&event, r.timestamp_ms.unwrap_or(now));
            }
        }
        for r in &records.outcomes {
            if let Some(outcome) = self.decode::<SyncOutcome>(r).await {
                builder.outcome(&outcome);
            }
        }
        for r in &records.commands {
            if let Some(command) = self.decode::<IntegrationCommand>(r).await {
                builder.command(&command);
            }
        }
        for e in &records.dead_letters {
            builder.dead_letter(e, records.replayed.contains(&e.coordinate()));
        }
        builder.ledger(status);
        let today = elo_events::time::date_of_ms(now) == date;
        for (target, figures) in self.quota(today).await {
            builder.quota(target, figures);
        }
        Ok(builder.finish())
    }

    async fn decode<T: elo_events::AvroEvent>(&self, r: &Record) -> Option<T> {
        match self.codec.decode::<T>(r.payload.as_deref()?).await {
            Ok(v) => Some(v),
            Err(error) => {
                // Malformed records are the consumers' business (they park them); the report
                // counts what it can read.
                tracing::debug!(topic = %r.topic, partition = r.partition, offset = r.offset, error = %error, "record left out of the report");
                None
            }
        }
    }

    async fn read(&self, window: Window) -> anyhow::Result<DayRecords> {
        let (kafka, ops) = (self.kafka.clone(), self.ops.clone());
        let topics = [self.commerce.clone(), self.outcomes.clone(), self.commands.clone()];
        tokio::task::spawn_blocking(move || {
            let all = |topic: &str| -> anyhow::Result<Vec<Record>> {
                let mut out = Vec::new();
                scan::scan(&kafka, topic, window, |r| out.push(r))?;
                Ok(out)
            };
            let mut dead_letters = Vec::new();
            for topic in &ops.dlq.dlq_topics {
                scan::scan(&kafka, topic, window, |r| dead_letters.push(DeadLetterEntry(r)))?;
            }
            let mut replayed = HashSet::new();
            scan::scan(&kafka, &ops.replay_checkpoints, Window::default(), |r| {
                if let (Some(k), Some(_)) = (r.key, r.payload) {
                    replayed.insert(String::from_utf8_lossy(&k).into_owned());
                }
            })?;
            Ok(DayRecords {
                commerce: all(&topics[0])?,
                outcomes: all(&topics[1])?,
                commands: all(&topics[2])?,
                dead_letters,
                replayed,
            })
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

struct DayRecords {
    commerce: Vec<Record>,
    outcomes: Vec<Record>,
    commands: Vec<Record>,
    dead_letters: Vec<DeadLetterEntry>,
    replayed: HashSet<String>,
}
