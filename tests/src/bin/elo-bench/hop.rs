//! The HTTP hop alone: a web service that does nothing but what any webhook front must (read
//! the request, produce one record, await its acknowledgement, answer), run as its own process
//! in place of order-ingest. Measured beside the raw producer and order-ingest it splits the
//! gap between them: what the HTTP round trip and the webhooks' arrival pattern cost on this
//! machine, and what order-ingest's own work (signature, parsing, normalising, enrichment,
//! encoding) costs on top.
//!
//! The record sent is the request body cut to the average encoded event's size, keyed by a hash
//! of the body (the events' keys spread over the partitions the same way), with the headers
//! order-ingest puts on an event ([`crate::event_headers`]) and its producer settings (no
//! linger).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Environment of the hop process (set by [`spawn`]).
const LISTEN: &str = "ELO_BENCH_HOP_LISTEN";
const TOPIC: &str = "ELO_BENCH_HOP_TOPIC";
const PAYLOAD_BYTES: &str = "ELO_BENCH_HOP_PAYLOAD_BYTES";
const EVENT_TYPE: &str = "ELO_BENCH_HOP_EVENT_TYPE";
/// Experiments: microseconds of wall-clock busy-waiting per request before the produce (less CPU
/// than that when the box is contended), standing in for a service's own work
/// (`ELO_BENCH_HOP_SPIN_US`, passed through from the bench's environment).
const SPIN_US: &str = "ELO_BENCH_HOP_SPIN_US";
/// Experiments: send through Elo's own producer (`elo_kafka::Producer`, no linger: order-ingest's
/// wrapper, metrics and settings) instead of a bare one (`ELO_BENCH_HOP_ELO_PRODUCER`, passed
/// through). Its records carry the event-type header only: the hop has no span to propagate.
const ELO_PRODUCER: &str = "ELO_BENCH_HOP_ELO_PRODUCER";

struct Hop {
    producer: FutureProducer,
    /// Set by [`ELO_PRODUCER`]: used instead of `producer`.
    elo: Option<elo_kafka::Producer>,
    topic: String,
    payload_bytes: usize,
    event_type: String,
    spin: std::time::Duration,
    sent: std::sync::atomic::AtomicU64,
}

/// True when this process was started as the hop (see [`spawn`]).
pub(crate) fn requested() -> bool {
    std::env::var_os(LISTEN).is_some()
}

/// Serves until killed.
pub(crate) async fn serve(kafka: &elo_kafka::KafkaArgs) -> anyhow::Result<()> {
    let listen = std::env::var(LISTEN)?;
    let mut settings = crate::raw_producer_config(kafka);
    settings.set("linger.ms", "0");
    let elo = match std::env::var_os(ELO_PRODUCER) {
        Some(_) => {
            let mut kafka = kafka.clone();
            kafka.options.push(("linger.ms".to_owned(), "0".to_owned()));
            Some(elo_kafka::Producer::new(&kafka, elo_telemetry::Health::new())?)
        }
        None => None,
    };
    let hop = std::sync::Arc::new(Hop {
        producer: settings.create()?,
        elo,
        topic: std::env::var(TOPIC)?,
        payload_bytes: std::env::var(PAYLOAD_BYTES)?.parse()?,
        event_type: std::env::var(EVENT_TYPE)?,
        spin: std::time::Duration::from_micros(std::env::var(SPIN_US).map_or(Ok(0), |v| v.parse())?),
        sent: Default::default(),
    });
    let router = axum::Router::new().route("/webhooks/magento/orders", axum::routing::post(receive)).with_state(hop);
    axum::serve(tokio::net::TcpListener::bind(&listen).await?, router).await?;
    Ok(())
}

async fn receive(State(hop): State<std::sync::Arc<Hop>>, body: Bytes) -> StatusCode {
    use std::hash::{Hash, Hasher};
    let spun = std::time::Instant::now();
    while spun.elapsed() < hop.spin {
        std::hint::spin_loop();
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    let key = format!("customer-{}", hasher.finish() % 1_000);
    let payload = &body[..body.len().min(hop.payload_bytes)];
    let n = hop.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(elo) = &hop.elo {
        let sent = elo.send(&hop.topic, key.as_bytes(), payload, Some(&hop.event_type)).await;
        return if sent.is_ok() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    }
    let record = FutureRecord::to(&hop.topic)
        .key(key.as_bytes())
        .payload(payload)
        .headers(crate::event_headers(n, &hop.event_type));
    let acknowledged = match hop.producer.send_result(record) {
        Ok(delivery) => matches!(delivery.await, Ok(Ok(_))),
        Err(_) => false,
    };
    if acknowledged { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

/// This executable started as the hop on `listen`, producing to `topic`; with `spin_us`, it
/// busy-waits that long per request (else as `ELO_BENCH_HOP_SPIN_US` says, if set).
pub(crate) fn spawn(
    listen: u16,
    topic: &str,
    payload_bytes: usize,
    event_type: &str,
    spin_us: Option<u64>,
) -> anyhow::Result<elo_integration_tests::ChildGuard> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    if let Some(spin_us) = spin_us {
        command.env(SPIN_US, spin_us.to_string());
    }
    command
        .env(LISTEN, format!("127.0.0.1:{listen}"))
        .env(TOPIC, topic)
        .env(PAYLOAD_BYTES, payload_bytes.to_string())
        .env(EVENT_TYPE, event_type)
        .stdout(std::process::Stdio::null());
    Ok(elo_integration_tests::ChildGuard::spawn("elo-bench (HTTP hop)", &mut command))
}
