//! The service's paths, each started on its own: push (signed webhooks), poll (per store
//! view, checkpointed), repair commands, and what they share (erased keys, publishers, schemas).

use std::sync::Arc;
use std::time::Duration;

use elo_events::{CommerceEvent, IntegrationCommand, InventoryEvent};
use elo_service::Service;

use crate::config::Config;
use crate::{
    KafkaEnricher, SharedPublisher, commands, compacted, enrich, erasure, inventory, now_ms, poll, push, wiring,
};

/// Reads the erased keys (retrying while Kafka is unavailable) and keeps following them;
/// `None` when shutdown came first.
pub(crate) async fn load_erasures(
    service: &Service,
    config: &Config,
) -> Option<(Arc<erasure::ErasedKeys>, tokio::task::JoinHandle<()>)> {
    let keys = Arc::new(erasure::ErasedKeys::default());
    loop {
        let stop = service.shutdown.clone();
        match compacted::follow_erasures(&config.common.kafka, &config.erased_topic, keys.clone(), stop).await {
            Ok(follower) => return Some((keys, follower)),
            Err(error) => {
                tracing::error!(error = %error, "cannot read the erased keys; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = service.shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// `push`: the push path, whose enrichment past `ELO_ORDER_INGEST_ENRICHMENT_BUDGET` is
/// finished by a follow-up worker, and whose cached consents are refreshed ahead of expiry by
/// another (both stopped with the service), so a webhook waits for Magento as little as
/// possible.
pub(crate) fn shared_publisher(
    service: &Service,
    config: &Config,
    source: Arc<wiring::MagentoSource>,
    erased: Arc<erasure::ErasedKeys>,
    push: bool,
) -> SharedPublisher {
    let timeout = Duration::from_millis(config.common.kafka.delivery_timeout_ms) + Duration::from_secs(5);
    let log =
        compacted::KafkaErasureLog { producer: service.producer.clone(), topic: config.erased_topic.clone(), timeout };
    let mut enricher = enriching_publisher(service, config, source);
    if !push {
        return erasure::ErasureGuard::new(Arc::new(enricher), erased, log);
    }
    let stop = service.shutdown.clone();
    let mut late_queue = None;
    if !config.enrichment_budget.is_zero() {
        // Bounded: past 1,024 waiting follow-ups, late orders simply stay unchecked (counted).
        let (late, queue) = tokio::sync::mpsc::channel(1024);
        enricher = enricher.with_budget(enrich::Budget { limit: config.enrichment_budget, late });
        late_queue = Some(queue);
    }
    // Bounded too: past 1,024 due, a consent simply expires and is read inline as before.
    let (refresh, due) = tokio::sync::mpsc::channel(1024);
    let (stock_refresh, stock_due) = tokio::sync::mpsc::channel(1024);
    let enricher = Arc::new(enricher.with_consent_refresh(refresh).with_stock_refresh(stock_refresh));
    if let Some(queue) = late_queue {
        tokio::spawn(enrich::follow_ups(queue, enricher.clone(), erased.clone(), stop.clone()));
    }
    tokio::spawn(enrich::refresh_consents(due, enricher.clone(), stop.clone()));
    tokio::spawn(enrich::refresh_stock(stock_due, enricher.clone(), stop));
    erasure::ErasureGuard::new(enricher, erased, log)
}

fn enriching_publisher(service: &Service, config: &Config, source: Arc<wiring::MagentoSource>) -> KafkaEnricher {
    let kafka = wiring::KafkaPublisher {
        producer: service.producer.clone(),
        codec: service.codec.clone(),
        topic: config.common.topics.commerce.clone(),
        inventory_topic: config.common.topics.inventory.clone(),
        dlq_topic: config.dlq_topic.clone(),
        // Past the producer's own delivery timeout, so a 503 follows a definite failure.
        timeout: Duration::from_millis(config.common.kafka.delivery_timeout_ms) + Duration::from_secs(5),
    };
    let inventory = config.inventory_checks.then(|| {
        inventory::InventoryChecker::new(inventory::InventoryConfig {
            stock_id: config.stock_id,
            low_stock_threshold: config.low_stock_threshold,
            cache_ttl: config.inventory_cache_ttl,
            concurrency: config.inventory_concurrency,
            max_order_age: config.inventory_max_order_age,
        })
    });
    enrich::Enricher::new(kafka, source, inventory, config.customer_cache_ttl)
}

/// Consumes `integration.commands` (the repair path) until shutdown, then drains and commits.
pub(crate) fn start_commands(
    service: &Service,
    config: &Config,
    source: Arc<wiring::MagentoSource>,
    publisher: Arc<SharedPublisher>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let settings = elo_kafka::ConsumerSettings::new(
        config.commands_group.clone(),
        vec![config.common.topics.commands.clone()],
        config.dlq_topic.clone(),
    );
    let handler = Arc::new(commands::CommandHandler {
        codec: service.codec.clone(),
        publisher,
        magento: source,
        stores: config.magento_stores.clone(),
    });
    // The consumer's own health is kept out of readiness: a rebalance of the commands group
    // (10-20 s) must not take the push endpoint out of the load balancer.
    let (kafka, producer, health, stop) =
        (config.common.kafka.clone(), service.producer.clone(), elo_telemetry::Health::new(), service.shutdown.clone());
    tokio::spawn(async move {
        elo_kafka::run_consumer(&kafka, settings, handler, producer, health, stop).await.map_err(anyhow::Error::from)
    })
}

/// Polls every store view until shutdown; each store's checkpoint lives in the compacted
/// checkpoint topic and moves only after the round's events were acknowledged.
pub(crate) fn start_poll(
    service: &Service,
    config: &Config,
    source: Arc<wiring::MagentoSource>,
    publisher: Arc<SharedPublisher>,
) -> tokio::task::JoinHandle<()> {
    let checkpoints = compacted::KafkaCheckpoints {
        producer: service.producer.clone(),
        kafka: config.common.kafka.clone(),
        topic: config.checkpoint_topic.clone(),
    };
    let (stores, interval, overlap, page_size, max_pages) = (
        config.magento_stores.clone(),
        config.poll_interval,
        config.poll_overlap,
        config.poll_page_size.clamp(1, 300),
        config.poll_max_pages,
    );
    let (entities, poll_start) = (config.poll_entities.clone(), config.poll_start);
    let stop = service.shutdown.clone();
    tokio::spawn(async move {
        let mut store_ids: Vec<(i64, String)> = stores.0.iter().map(|(id, (code, _))| (*id, code.clone())).collect();
        store_ids.sort();
        // Every store's checkpoint comes from one pass over the compacted topic.
        let mut cursors = loop {
            match checkpoints.load_all().await {
                Ok(all) => {
                    tracing::info!(checkpoints = all.len(), "poll checkpoints loaded");
                    break all;
                }
                Err(error) => {
                    tracing::error!(error = %error, "cannot read the poll checkpoints; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        let mut saved: std::collections::HashSet<String> = cursors.keys().cloned().collect();
        loop {
            let mut more = false;
            for entity in &entities {
                for (store_id, code) in &store_ids {
                    let key = entity.checkpoint_key(code);
                    // A fresh start is saved even if its first round finds nothing, so a restart
                    // days later does not move it (and skip what came in between).
                    let fresh = !saved.contains(&key);
                    let start = cursors
                        .entry(key.clone())
                        .or_insert_with(|| poll::Checkpoint::starting_at(poll_start.resolve(now_ms())));
                    let spec = poll::RoundSpec { entity: *entity, store_id: *store_id, overlap, page_size, max_pages };
                    // Stopping mid-round is safe: the checkpoint is not saved, so the next start
                    // republishes the unconfirmed tail with the same event ids.
                    let mut no_progress = |_, _| {};
                    let (round, error) = tokio::select! {
                        r = poll::poll_once(&*source, &*publisher, &stores, &spec, start, &mut no_progress) => r,
                        _ = stop.cancelled() => return,
                    };
                    if let Some(error) = error {
                        tracing::warn!(checkpoint = %key, error = %error, published = round.published, "poll round stopped early");
                    }
                    more |= round.more;
                    if fresh || &round.checkpoint != start {
                        match checkpoints.save(&key, &round.checkpoint).await {
                            Ok(()) => {
                                saved.insert(key.clone());
                                cursors.insert(key.clone(), round.checkpoint)
                            }
                            Err(error) => {
                                tracing::error!(checkpoint = %key, error = %error, "cannot save the poll checkpoint");
                                None
                            }
                        };
                    }
                    let cursor = cursors.get(&key).map_or(0, |c| c.cursor_ms);
                    metrics::POLL_LAG.with_label_values(&[entity.as_str(), code]).set(if cursor > 0 {
                        (now_ms() - cursor) / 1000
                    } else {
                        0
                    });
                    if round.published > 0 {
                        tracing::info!(checkpoint = %key, published = round.published, "poll round published");
                    }
                }
            }
            // A cut round continues at once; a finished one waits for the next interval.
            if more {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntGaugeVec, register_int_gauge_vec};

    pub(crate) static POLL_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
        register_int_gauge_vec!(
            "order_ingest_poll_lag_seconds",
            "Now minus the poll cursor (the newest updated_at published), per entity and store view.",
            &["entity", "store"]
        )
        .expect("metric registers once")
    });
}

/// Serves the signed push endpoint until shutdown (in-flight requests finish first).
pub(crate) async fn start_push(
    service: &Service,
    config: &Config,
    verifier: push::Verifier,
    source: Arc<wiring::MagentoSource>,
    publisher: Arc<SharedPublisher>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    let push_config =
        push::PushConfig { verifier, max_body_bytes: config.max_body_bytes, stores: config.magento_stores.clone() };
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, "push endpoint listening");
    let app = push::router(push_config, publisher, source);
    let stop = service.shutdown.clone();
    let limits = push::ListenerLimits {
        header_read_timeout: config.header_read_timeout,
        request_timeout: config.request_timeout,
        max_connections: config.max_connections,
    };
    // In-flight requests finish within their own timeout.
    let drain = config.request_timeout;
    Ok(tokio::spawn(push::serve(listener, app, limits, stop, drain)))
}

/// Registers the schemas this service writes, retrying while the registry is unavailable.
/// Readiness does not wait for it: encoding registers on first use anyway.
pub(crate) async fn register_schemas(service: &Service, config: &Config) {
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
