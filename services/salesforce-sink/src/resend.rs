//! `RESEND` commands addressed to salesforce-sink on `integration.commands` (the reconciler
//! sends them when a record Salesforce confirmed is gone or altered there). The sink marks the
//! version it confirmed for the entity for rewriting and forgets the customer's fingerprint
//! (its next event writes the Account and Contact), then asks order-ingest to refetch it: the
//! republished version is then written again rather than skipped as already applied (see
//! `elo_events::resend`), while older versions stay skipped. `integration.commands` is keyed
//! like `commerce.events` and has as many partitions, so the range assignor gives this replica
//! the command's partition together with the entity's state. Other commands are skipped.

use elo_events::{CommandType, EventCodec, IntegrationCommand};
use elo_kafka::{HandlerError, Producer, Record};

use crate::handler::Sink;

/// Executes one record of `integration.commands`; returns what happened (for logs/tests).
pub async fn execute(
    sink: &Sink,
    codec: &EventCodec,
    producer: &Producer,
    topic: &str,
    record: &Record,
) -> Result<&'static str, HandlerError> {
    let command: IntegrationCommand = elo_service::decode_record(codec, record).await?;
    let Some((key, refetch)) = plan(&command, now_ms())? else { return Ok("skipped") };
    sink.request_rewrite(record.partition, &key)
        .await
        .map_err(|e| HandlerError::new(e.class(), format!("state_{}", e.code()), e.to_string()))?;
    sink.forget_customer_digest(record.partition, &command.customer_key)
        .await
        .map_err(|e| HandlerError::new(e.class(), format!("state_{}", e.code()), e.to_string()))?;
    let bytes = codec.encode(topic, &refetch).await.map_err(|e| elo_service::codec_failure(&e))?;
    producer
        .send(topic, refetch.customer_key.as_bytes(), &bytes, Some(refetch.command_type.as_str()))
        .await
        .map_err(|e| HandlerError::new(e.class(), format!("refetch_{}", e.code()), e.to_string()))?;
    tracing::info!(command_id = %command.command_id, entity = %command.entity_id, "resend: confirmation forgotten, refetch requested");
    Ok("executed")
}

/// The state key to mark for rewriting and the refetch to send (`None`: not ours).
pub fn plan(command: &IntegrationCommand, now: i64) -> Result<Option<(String, IntegrationCommand)>, HandlerError> {
    if command.target_service != crate::NAME || command.command_type != CommandType::Resend {
        return Ok(None);
    }
    let Some((kind, id)) = elo_events::resend::entity(command) else {
        return Err(HandlerError::permanent(
            "invalid_resend",
            format!("{:?} names no order or customer", command.entity_id),
        ));
    };
    // The sink's own keys: orders by Magento id, customers by customer key.
    let key = if kind == "order" { format!("order:{id}") } else { format!("customer:{}", command.customer_key) };
    Ok(elo_events::resend::refetch_after_resend(command, crate::NAME, now).map(|refetch| (key, refetch)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
