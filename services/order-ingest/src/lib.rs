//! order-ingest: the single writer of `commerce.events` and `inventory.events`.
//!
//! # Status
//! The foundation version: it provisions Elo's topics (commerce, inventory, commands, its DLQ
//! and its compacted checkpoint topic), registers the event schemas, connects its idempotent
//! producer, exposes probes and metrics, and stops cleanly. Magento push and poll, inventory
//! checks and the refetch command path land with the order-ingest issue; [`normalize`] (Magento
//! order payloads to deterministic `CommerceEvent`s) is already here and tested against the
//! sandbox's orders.

pub mod normalize;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use elo_events::{CommerceEvent, IntegrationCommand, InventoryEvent};
use elo_service::{CommonArgs, Service};

/// Service name.
pub const NAME: &str = "order-ingest";

/// Default admin address (/metrics, /health/livez, /health/readyz).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9101);

/// order-ingest settings.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "order-ingest",
    version,
    about = "Publishes Magento orders and customers as Avro domain events on Kafka."
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Compacted topic holding the poll checkpoints.
    #[arg(
        long = "checkpoint-topic",
        env = "ELO_ORDER_INGEST_CHECKPOINT_TOPIC",
        default_value = "order-ingest.checkpoints"
    )]
    pub checkpoint_topic: String,
    /// Dead-letter topic for commands that cannot be executed.
    #[arg(long = "dlq-topic", env = "ELO_ORDER_INGEST_DLQ_TOPIC", default_value = "order-ingest.dlq")]
    pub dlq_topic: String,
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let t = &config.common.topics;
    let topics = vec![
        t.spec(&t.commerce),
        t.spec(&t.inventory),
        t.spec(&t.commands),
        t.spec(&t.outcomes),
        t.spec(&config.dlq_topic),
        t.spec(&config.checkpoint_topic).compacted(),
    ];
    let Some(service) = Service::start(NAME, &config.common, DEFAULT_ADMIN, topics).await? else {
        return Ok(());
    };
    register_schemas(&service, &config).await;
    service.shutdown.cancelled().await;
    service.finish().await;
    Ok(())
}

/// Registers the schemas this service writes, retrying while the registry is unavailable.
/// Readiness does not wait for it: encoding registers on first use anyway.
async fn register_schemas(service: &Service, config: &Config) {
    let t = &config.common.topics;
    for attempt in 0u32.. {
        let result = async {
            let commerce = service.codec.schema_id::<CommerceEvent>(&t.commerce).await?;
            let inventory = service.codec.schema_id::<InventoryEvent>(&t.inventory).await?;
            let commands = service.codec.schema_id::<IntegrationCommand>(&t.commands).await?;
            Ok::<_, elo_events::CodecError>((commerce, inventory, commands))
        }
        .await;
        match result {
            Ok((commerce, inventory, commands)) => {
                tracing::info!(commerce, inventory, commands, "schemas registered");
                return;
            }
            Err(error) => {
                tracing::error!(error = %error, error_code = error.code(), attempt, "schema registration failed");
                if !error.is_retriable() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = service.shutdown.cancelled() => return,
                }
            }
        }
    }
}
