//! order-ingest: the single writer of `commerce.events` and `inventory.events` (steps 1 and 2
//! of the workflow).
//!
//! - [`push`]: signed Magento webhooks (orders, customers, erasures), 2xx only after the ack.
//! - [`poll`]: incremental keyset poll of orders and customers per store view, checkpointed in a
//!   compacted topic; [`backfill`] runs the same rounds from a date as a CLI.
//! - [`normalize`]: Magento payloads to deterministic `CommerceEvent`s.
//! - [`enrich`] and [`inventory`]: consent from the customer record, MSI salable quantity, stock
//!   facts on `inventory.events`; every path publishes through them.
//! - [`commands`]: the reconciler's repair path (`REFETCH_ORDER`, `REFETCH_CUSTOMER`).
//! - [`erasure`]: erased keys (compacted topic) checked before anything is published.
//! - [`source`], [`wiring`], [`compacted`] and [`oauth`]: the Magento and Kafka seams and their
//!   production implementations (REST client, OAuth 1.0a signing, compacted-topic state).
//! - [`json`] (money read without floats), [`flight`] (single-flight lookups) and [`swept`]
//!   (caches bounded by amortised sweeps): small helpers.
//! - `config` ([`Config`]) and `paths`: settings, and how each path is started.
//!
//! Magento is reached with `elo-http-client` (one client per path, classified retries) rather
//! than a Magento client crate: a search of crates.io and the package indexes found maintained
//! clients for PHP, Node and Python only, and the few calls needed here (tokens or OAuth 1.0a,
//! orders, customers, salable quantity, keyset searchCriteria) are small and tested against the
//! sandbox.

pub mod backfill;
pub mod commands;
pub mod compacted;
pub mod enrich;
pub mod erasure;
pub mod flight;
pub mod inventory;
pub mod json;
pub mod normalize;
pub mod oauth;
pub mod poll;
pub mod push;
pub mod source;
pub mod swept;
pub mod wiring;

mod config;
mod paths;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use elo_service::Service;

pub(crate) use config::magento_source;
pub use config::{
    Command, Config, MagentoAuthKind, PollStart, magento_auth, magento_password, no_idle_linger, parse_age,
    parse_poll_start, parse_stores, webhook_verifier,
};
pub(crate) use paths::{load_erasures, shared_publisher};
use paths::{register_schemas, start_commands, start_poll, start_push};

/// Service name.
pub const NAME: &str = "order-ingest";

/// Default admin address (/metrics, /health/livez, /health/readyz).
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9101);

/// Runs until SIGTERM/SIGINT.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    no_idle_linger(&mut config.common.kafka)?;
    let t = &config.common.topics;
    let topics = vec![
        t.spec(&t.commerce),
        t.spec(&t.inventory),
        t.spec(&t.commands),
        t.spec(&t.outcomes),
        t.spec(&config.dlq_topic),
        t.spec(&config.checkpoint_topic).compacted(),
        t.spec(&config.erased_topic).compacted(),
    ];
    let Some(service) = Service::start(NAME, &config.common, DEFAULT_ADMIN, topics).await? else {
        return Ok(());
    };
    // Not ready until the push endpoint listens: readiness routes webhooks to this pod.
    service.health.set_ready("order_ingest_paths", false, "registering schemas, loading erasures");
    register_schemas(&service, &config).await;
    // Nothing is published before every erasure so far is known.
    let Some((erased, follower)) = load_erasures(&service, &config).await else {
        service.finish().await;
        return Ok(());
    };
    // Each path has its own Magento connection pool (and enrichment caches), so a slow poll or
    // a storm of repairs cannot take the connections webhooks are waiting for.
    let path = |downstream, budgeted| -> anyhow::Result<_> {
        let source = Arc::new(magento_source(&config, downstream)?);
        let publisher = Arc::new(shared_publisher(&service, &config, source.clone(), erased.clone(), budgeted));
        Ok((source, publisher))
    };
    let (push_source, push_publisher) = path("magento-push", true)?;
    let (poll_source, poll_publisher) = path("magento-poll", false)?;
    let (commands_source, commands_publisher) = path("magento-commands", false)?;
    let poller = (!config.poll_interval.is_zero()).then(|| start_poll(&service, &config, poll_source, poll_publisher));
    let push = match webhook_verifier(&config)? {
        Some(verifier) => Some(start_push(&service, &config, verifier, push_source, push_publisher).await?),
        None => {
            tracing::warn!(
                "no webhook secret or Adobe key configured (ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE, \
                 ELO_ORDER_INGEST_ADOBE_WEBHOOK_PUBLIC_KEY_FILE): the push endpoint is off"
            );
            None
        }
    };
    service.health.set_ready("order_ingest_paths", true, "push, poll and commands started");
    let mut commands = start_commands(&service, &config, commands_source, commands_publisher);
    let mut failure = None;
    tokio::select! {
        _ = service.shutdown.cancelled() => {
            if let Err(error) = (&mut commands).await.unwrap_or_else(|e| Err(anyhow::anyhow!(e))) {
                tracing::error!(error = %error, "the commands consumer failed while stopping");
            }
        }
        result = &mut commands => {
            // Without its repair path the service is broken: stop everything and exit non-zero.
            let error = result.unwrap_or_else(|e| Err(anyhow::anyhow!(e))).err()
                .unwrap_or_else(|| anyhow::anyhow!("the commands consumer stopped unexpectedly"));
            tracing::error!(error = %error, "the commands consumer failed; stopping");
            service.shutdown.cancel();
            failure = Some(error);
        }
    }
    if let Some(push) = push {
        let _ = push.await;
    }
    if let Some(poller) = poller {
        let _ = poller.await;
    }
    let _ = follower.await;
    service.finish().await;
    failure.map_or(Ok(()), Err)
}

/// The publisher every path uses: Kafka behind consent and inventory enrichment, behind the
/// erasure guard (an erased person's data is dropped before any Magento lookup).
pub type SharedPublisher = erasure::ErasureGuard<Arc<KafkaEnricher>, compacted::KafkaErasureLog>;

/// Enrichment in front of Kafka.
pub type KafkaEnricher = enrich::Enricher<wiring::KafkaPublisher, Arc<wiring::MagentoSource>>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}
