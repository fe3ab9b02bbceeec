//! `RESEND` commands addressed to rdstation-sink on `integration.commands` (the reconciler
//! sends them when a contact was edited in RD behind Elo's back). The sink forgets what it
//! wrote to the customer's contact, then asks order-ingest to refetch the entity: the
//! republished version finds nothing "already written" and the whole contact is written
//! again (see `elo_events::resend`). Other commands are skipped.

use std::sync::Arc;

use elo_events::{CommandType, IntegrationCommand};
use elo_kafka::{HandlerError, Record};

use super::{Sink, SinkHandler, kafka_failure, now_ms};

impl Sink {
    /// Forgets the contact writes of the command's customer and returns the refetch to send
    /// (`None`: not ours).
    pub async fn resend(
        self: &Arc<Self>,
        partition: i32,
        command: &IntegrationCommand,
    ) -> Result<Option<IntegrationCommand>, HandlerError> {
        if command.target_service != crate::NAME || command.command_type != CommandType::Resend {
            return Ok(None);
        }
        if elo_events::resend::entity(command).is_none() {
            return Err(HandlerError::permanent(
                "invalid_resend",
                format!("{:?} names no order or customer", command.entity_id),
            ));
        }
        if !self.ensure_restored(partition).await {
            return Err(HandlerError::transient("state_not_restored", "the partition's state could not be restored"));
        }
        let lock = self.partition_lock(partition);
        let _guard = lock.lock().await;
        if let Some(mut state) = self.customers.get(partition, &command.customer_key) {
            state.applied = Default::default();
            state.refused = None;
            // Written in full by the next deferred-writes pass, whether or not the refetched
            // event is new to this sink (a republished version it already counted is not
            // processed again, so waiting for it would leave the contact as it was found).
            state.deferred = true;
            let due_ms = state.writable_at(self.budget.per_contact, self.budget.window_ms(), now_ms());
            let deferral = super::Deferral { due_ms, failures: 0 };
            self.deferred.lock().expect("deferred lock").insert((partition, command.customer_key.clone()), deferral);
            self.customers
                .put(partition, &command.customer_key, state)
                .await
                .map_err(|e| kafka_failure("state", &e))?;
        }
        Ok(elo_events::resend::refetch_after_resend(command, crate::NAME, now_ms()))
    }

    async fn execute_command(self: &Arc<Self>, record: &Record) -> Result<(), HandlerError> {
        let command: IntegrationCommand = elo_service::decode_record(&self.codec, record).await?;
        let Some(refetch) = self.resend(record.partition, &command).await? else { return Ok(()) };
        let bytes = self.codec.encode(&record.topic, &refetch).await.map_err(|e| elo_service::codec_failure(&e))?;
        self.producer
            .send(&record.topic, refetch.customer_key.as_bytes(), &bytes, Some(refetch.command_type.as_str()))
            .await
            .map_err(|e| kafka_failure("refetch", &e))?;
        tracing::info!(command_id = %command.command_id, entity = %command.entity_id, "resend: contact writes forgotten, refetch requested");
        Ok(())
    }
}

/// The runtime's handler when the sink also takes `RESEND` commands: commands go to
/// [`Sink::resend`], everything else to [`SinkHandler`]. The state is the commerce
/// partitions': a commands partition neither restores nor releases it.
pub struct WithCommands {
    pub inner: SinkHandler,
    pub commands_topic: String,
}

impl elo_kafka::Handler for WithCommands {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        if batch.first().is_some_and(|r| r.topic == self.commands_topic) {
            let mut results = Vec::with_capacity(batch.len());
            for record in batch {
                results.push(self.inner.0.execute_command(record).await);
            }
            return results;
        }
        elo_kafka::Handler::handle(&self.inner, batch).await
    }

    fn on_assigned(&self, topic: &str, partition: i32) {
        if topic != self.commands_topic {
            elo_kafka::Handler::on_assigned(&self.inner, topic, partition);
        }
    }

    fn on_revoked(&self, topic: &str, partition: i32) {
        if topic != self.commands_topic {
            elo_kafka::Handler::on_revoked(&self.inner, topic, partition);
        }
    }
}
