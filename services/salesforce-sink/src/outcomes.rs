//! `SyncOutcome` records on `integration.outcomes`: every applied, skipped or dead-lettered
//! record, with the Salesforce ids, source version, attempts and latency. A record whose
//! outcome cannot be published is retried (its Salesforce write is confirmed, so the retry
//! costs no API call and only republishes).

use std::sync::Arc;
use std::time::Instant;

use elo_events::{CommerceEvent, EventCodec, OutcomeStatus, SyncOutcome};
use elo_kafka::{HandlerError, Producer};

use crate::handler::Verdict;
use crate::{NAME, metrics};

pub struct Outcomes {
    producer: Producer,
    codec: Arc<EventCodec>,
    topic: String,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The outcome record of one event.
pub fn outcome(
    event: &CommerceEvent,
    verdict: &Verdict,
    status: OutcomeStatus,
    attempts: i32,
    now: i64,
) -> SyncOutcome {
    let error = verdict.result.as_ref().err();
    SyncOutcome {
        outcome_id: elo_events::ids::event_id(&[NAME, &event.event_id, &format!("{status:?}")]),
        sink: NAME.into(),
        target: "salesforce".into(),
        event_id: event.event_id.clone(),
        customer_key: event.customer_key.clone(),
        source_version: event.source_version.clone(),
        status,
        error_class: error.map(|e| e.class.as_str().to_owned()),
        error_code: error.map(|e| e.code.clone()),
        target_ids: verdict.target_ids.clone(),
        attempts,
        latency_ms: (now - event.occurred_at).max(0),
        occurred_at: now,
    }
}

impl Outcomes {
    pub fn new(producer: Producer, codec: Arc<EventCodec>, topic: String) -> Self {
        Self { producer, codec, topic }
    }

    /// Publishes the outcomes of a batch; per record, whether that worked.
    pub async fn publish(
        &self,
        events: &[Result<CommerceEvent, HandlerError>],
        verdicts: &[Verdict],
        attempts: &[i32],
        started: Instant,
    ) -> Vec<Result<(), HandlerError>> {
        let now = now_ms();
        let _ = started;
        // A few hundred at a time: a Bulk batch's thousands of encoded outcomes are not held at once.
        let mut out = Vec::with_capacity(events.len());
        for start in (0..events.len()).step_by(256) {
            let end = (start + 256).min(events.len()).min(verdicts.len()).min(attempts.len());
            let sends = (start..end).map(|i| self.publish_one(&events[i], &verdicts[i], attempts[i], now));
            out.extend(futures::future::join_all(sends).await);
        }
        out
    }

    async fn publish_one(
        &self,
        event: &Result<CommerceEvent, HandlerError>,
        verdict: &Verdict,
        attempts: i32,
        now: i64,
    ) -> Result<(), HandlerError> {
        let (Ok(event), Some(status)) = (event, verdict.outcome) else { return Ok(()) };
        let object = if event.order.is_some() { "Order" } else { "Account" };
        let result = match status {
            OutcomeStatus::Applied => "applied",
            OutcomeStatus::SkippedStale => "skipped_stale",
            OutcomeStatus::DeadLettered => "failed",
            OutcomeStatus::Unknown => "not_handled",
        };
        metrics::RECORDS.with_label_values(&[object, result]).inc();
        if status == OutcomeStatus::Applied {
            metrics::LATENCY.observe((now - event.occurred_at).max(0) as f64 / 1000.0);
        }
        let record = outcome(event, verdict, status, attempts, now);
        let payload = self.codec.encode(&self.topic, &record).await.map_err(|e| elo_service::codec_failure(&e))?;
        self.producer
            .send(&self.topic, event.customer_key.as_bytes(), &payload, Some(elo_events::SyncOutcome::EVENT_TYPE))
            .await
            .map(|_| ())
            .map_err(|e| HandlerError::transient("outcome_publish", e.to_string()))
    }
}
