//! The repair path: `integration.commands` addressed to order-ingest (`REFETCH_ORDER`,
//! `REFETCH_CUSTOMER`, usually from the reconciler) reload the entity from Magento and
//! republish it through the same enrichment as push and poll. An unchanged entity gets the
//! same `event_id` as before, so a repeated repair is harmless downstream.
//!
//! Commands for other services are skipped. A command that can never succeed (unknown entity,
//! an invalid payload, a command type order-ingest does not execute) goes to the DLQ as
//! `permanent`; Magento or broker outages are `transient` and retried by the consumer runtime.

use std::sync::Arc;

use elo_events::{CommandType, EventCodec, IntegrationCommand};
use elo_kafka::{Handler, HandlerError, Record};

use crate::normalize::{Stores, customer_event, order_event};
use crate::push::{PublishError, Publisher};
use crate::source::{MagentoApi, SourceError};

/// Executes refetch commands.
pub struct CommandHandler<P, M> {
    pub codec: Arc<EventCodec>,
    pub publisher: P,
    pub magento: M,
    pub stores: Stores,
}

fn source_error(error: SourceError) -> HandlerError {
    match error {
        SourceError::NotFound => HandlerError::permanent("not_found", "Magento has no such entity"),
        SourceError::Unavailable(reason) => HandlerError::transient("magento_unavailable", reason),
        SourceError::Refused(reason) => HandlerError::permanent("magento_refused", reason),
    }
}

fn publish_error(error: PublishError) -> HandlerError {
    match error {
        PublishError::Unavailable(reason) => HandlerError::transient("publish_unavailable", reason),
        PublishError::Rejected(reason) => HandlerError::permanent("publish_rejected", reason),
        PublishError::Blocked(class, reason) => HandlerError::new(class, "publish_blocked", reason),
    }
}

impl<P: Publisher, M: MagentoApi> CommandHandler<P, M> {
    async fn execute(&self, record: &Record) -> Result<&'static str, HandlerError> {
        let command: IntegrationCommand = elo_service::decode_record(&self.codec, record).await?;
        self.apply(&command).await
    }

    /// Executes one decoded command.
    pub async fn apply(&self, command: &IntegrationCommand) -> Result<&'static str, HandlerError> {
        if command.target_service != crate::NAME {
            return Ok("skipped");
        }
        let id: i64 = command.entity_id.parse().map_err(|_| {
            HandlerError::permanent("invalid_entity_id", format!("{:?} is not a Magento id", command.entity_id))
        })?;
        let event = match command.command_type {
            CommandType::RefetchOrder => {
                let order = self.magento.order(id).await.map_err(source_error)?;
                order_event(&order, None, &self.stores, crate::now_ms())
            }
            CommandType::RefetchCustomer => {
                let customer = self.magento.customer(id).await.map_err(source_error)?;
                customer_event(&customer, &self.stores, crate::now_ms())
            }
            other => {
                return Err(HandlerError::permanent(
                    "unsupported_command",
                    format!("order-ingest executes REFETCH_ORDER and REFETCH_CUSTOMER, not {other:?}"),
                ));
            }
        }
        .map_err(|e| HandlerError::permanent("invalid_payload", e.to_string()))?;
        if event.customer_key != command.customer_key {
            // The source is the truth; the requester's key may predate a guest's registration.
            tracing::warn!(command_id = %command.command_id, "refetched entity has another customer key than the command");
        }
        let event_id = event.event_id.clone();
        self.publisher.publish_owned(event).await.map_err(publish_error)?;
        tracing::info!(command_id = %command.command_id, event_id = %event_id, reason = %command.reason, "entity refetched and republished");
        Ok("executed")
    }
}

impl<P: Publisher, M: MagentoApi> Handler for CommandHandler<P, M> {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        let mut results = Vec::with_capacity(batch.len());
        for record in batch {
            let result = self.execute(record).await;
            let outcome = match &result {
                Ok(outcome) => *outcome,
                Err(e) if e.class == elo_kafka::ErrorClass::Transient => "retrying",
                Err(_) => "rejected",
            };
            metrics::COMMANDS.with_label_values(&[outcome]).inc();
            results.push(result.map(|_| ()));
        }
        results
    }
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntCounterVec, register_int_counter_vec};

    pub(super) static COMMANDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "order_ingest_commands_total",
            "integration.commands records by outcome (executed, skipped, retrying, rejected).",
            &["outcome"]
        )
        .expect("metric registers once")
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_broker_that_refuses_us_is_waited_for_not_blamed_on_the_command() {
        let acl = elo_kafka::Error::Kafka(rdkafka::error::KafkaError::MessageProduction(
            rdkafka::types::RDKafkaErrorCode::TopicAuthorizationFailed,
        ));
        assert_eq!(publish_error(PublishError::from_kafka(&acl)).class, elo_kafka::ErrorClass::Auth);
        let too_big = elo_kafka::Error::Kafka(rdkafka::error::KafkaError::MessageProduction(
            rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert_eq!(publish_error(PublishError::from_kafka(&too_big)).class, elo_kafka::ErrorClass::Permanent);
        assert_eq!(
            publish_error(PublishError::from_kafka(&elo_kafka::Error::QueueFull)).class,
            elo_kafka::ErrorClass::Transient
        );
    }

    use elo_events::CommerceEventType;
    use elo_kafka::ErrorClass;

    use super::*;
    use crate::enrich::tests::Recorder;
    use crate::source::fake::Shop;

    fn handler(shop: Shop, recorder: Recorder) -> CommandHandler<Recorder, Shop> {
        let codec = Arc::new(EventCodec::new(&elo_events::RegistryConfig::local("http://127.0.0.1:9")).unwrap());
        CommandHandler { codec, publisher: recorder, magento: shop, stores: Stores::default() }
    }

    fn command(kind: CommandType, target: &str, entity_id: &str) -> IntegrationCommand {
        IntegrationCommand {
            command_id: "c1".into(),
            command_type: kind,
            target_service: target.into(),
            customer_key: "c:1".into(),
            entity_id: entity_id.into(),
            store_id: None,
            reason: "drift".into(),
            requested_by: "reconciler".into(),
            requested_at: 0,
        }
    }

    #[tokio::test]
    async fn refetches_republish_the_current_version_with_its_deterministic_id() {
        let shop = Shop::generated(20);
        let recorder = Recorder::default();
        let handler = handler(shop.clone(), recorder.clone());
        let order = shop.0.lock().unwrap().orders[&4].clone();
        let original = order_event(&order, None, &Stores::default(), 0).unwrap();
        assert_eq!(handler.apply(&command(CommandType::RefetchOrder, "order-ingest", "4")).await.unwrap(), "executed");
        assert_eq!(
            handler.apply(&command(CommandType::RefetchCustomer, "order-ingest", "1")).await.unwrap(),
            "executed"
        );
        let events = recorder.events.lock().unwrap();
        assert_eq!(events[0].event_id, original.event_id, "same source version, same id");
        assert_eq!(events[1].event_type, CommerceEventType::CustomerChanged);
        assert_eq!(events[1].customer_key, "c:1");
    }

    #[tokio::test]
    async fn commands_that_cannot_succeed_are_permanent_and_others_are_skipped() {
        let shop = Shop::generated(5);
        let recorder = Recorder::default();
        let handler = handler(shop, recorder.clone());
        let class = |r: Result<&'static str, HandlerError>| r.map_err(|e| (e.class, e.code));
        assert_eq!(
            handler.apply(&command(CommandType::RefetchOrder, "salesforce-sink", "4")).await.unwrap(),
            "skipped"
        );
        assert_eq!(
            class(handler.apply(&command(CommandType::RefetchOrder, "order-ingest", "999")).await),
            Err((ErrorClass::Permanent, "not_found".to_owned()))
        );
        assert_eq!(
            class(handler.apply(&command(CommandType::RefetchOrder, "order-ingest", "x")).await),
            Err((ErrorClass::Permanent, "invalid_entity_id".to_owned()))
        );
        assert_eq!(
            class(handler.apply(&command(CommandType::Resend, "order-ingest", "4")).await),
            Err((ErrorClass::Permanent, "unsupported_command".to_owned()))
        );
        assert!(recorder.events.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn outages_are_transient() {
        struct Down;
        impl MagentoApi for Down {
            async fn order(&self, _: i64) -> Result<serde_json::Value, SourceError> {
                Err(SourceError::Unavailable("503".into()))
            }
            async fn customer(&self, _: i64) -> Result<serde_json::Value, SourceError> {
                Err(SourceError::Unavailable("503".into()))
            }
            async fn salable_qty(&self, _: &str, _: i32) -> Result<Option<elo_events::Decimal4>, SourceError> {
                Err(SourceError::Unavailable("503".into()))
            }
        }
        let codec = Arc::new(EventCodec::new(&elo_events::RegistryConfig::local("http://127.0.0.1:9")).unwrap());
        let handler =
            CommandHandler { codec, publisher: Recorder::default(), magento: Down, stores: Stores::default() };
        let error = handler.apply(&command(CommandType::RefetchOrder, "order-ingest", "1")).await.unwrap_err();
        assert_eq!((error.class, error.code.as_str()), (ErrorClass::Transient, "magento_unavailable"));
    }
}
