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
//!
//! Given work per request ([`spawn`]'s `work_us`), the hop also stands in for a service that
//! spends order-ingest's CPU per request but has none of its structure: the bench runs it at the
//! half rate to split order-ingest's tail into what its CPU costs and what the rest does.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Environment of the hop process (set by [`spawn`]).
const LISTEN: &str = "ELO_BENCH_HOP_LISTEN";
const TOPIC: &str = "ELO_BENCH_HOP_TOPIC";
const PAYLOAD_BYTES: &str = "ELO_BENCH_HOP_PAYLOAD_BYTES";
const EVENT_TYPE: &str = "ELO_BENCH_HOP_EVENT_TYPE";
/// Microseconds of work per request before the produce, standing in for a service's own work
/// (set by [`spawn`]; for experiments also `ELO_BENCH_HOP_SPIN_US` in the bench's environment,
/// which every hop then inherits). A fixed amount of work calibrated at start ([`Work`]), not a
/// deadline: preemption on a busy box must not count as work done. The work hashes a 256 KiB
/// buffer, so it keeps the core and its caches busy as real work does; a `spin_loop` pause
/// would yield them (on SMT hosts, the whole core) to the broker.
pub(crate) const SPIN_US: &str = "ELO_BENCH_HOP_SPIN_US";
/// Experiments: send through Elo's own producer (`elo_kafka::Producer`, no linger: order-ingest's
/// wrapper, metrics and settings) instead of a bare one, with the same headers
/// (`ELO_BENCH_HOP_ELO_PRODUCER` in the bench's environment: every hop inherits it).
pub(crate) const ELO_PRODUCER: &str = "ELO_BENCH_HOP_ELO_PRODUCER";

struct Hop {
    producer: Sender,
    topic: String,
    payload_bytes: usize,
    event_type: String,
    work: Work,
    sent: std::sync::atomic::AtomicU64,
}

/// True when this process was started as the hop (see [`spawn`]).
pub(crate) fn requested() -> bool {
    std::env::var_os(LISTEN).is_some()
}

/// Serves until killed.
pub(crate) async fn serve(kafka: &elo_kafka::KafkaArgs) -> anyhow::Result<()> {
    let listen = std::env::var(LISTEN)?;
    let producer = if std::env::var_os(ELO_PRODUCER).is_some() {
        let mut kafka = kafka.clone();
        kafka.options.push(("linger.ms".to_owned(), "0".to_owned()));
        Sender::Elo(elo_kafka::Producer::new(&kafka, elo_telemetry::Health::new())?)
    } else {
        let mut settings = crate::raw_producer_config(kafka);
        settings.set("linger.ms", "0");
        Sender::Bare(settings.create()?)
    };
    let work_us: u64 = std::env::var(SPIN_US).map_or(Ok(0), |v| v.parse())?;
    let hop = std::sync::Arc::new(Hop {
        producer,
        topic: std::env::var(TOPIC)?,
        payload_bytes: std::env::var(PAYLOAD_BYTES)?.parse()?,
        event_type: std::env::var(EVENT_TYPE)?,
        work: Work::calibrated(work_us),
        sent: Default::default(),
    });
    let router = axum::Router::new().route("/webhooks/magento/orders", axum::routing::post(receive)).with_state(hop);
    axum::serve(tokio::net::TcpListener::bind(&listen).await?, router).await?;
    Ok(())
}

/// How the hop produces.
enum Sender {
    /// A bare librdkafka producer with Elo's reliability settings.
    Bare(FutureProducer),
    /// Elo's producer ([`ELO_PRODUCER`]).
    Elo(elo_kafka::Producer),
}

async fn receive(State(hop): State<std::sync::Arc<Hop>>, body: Bytes) -> StatusCode {
    use std::hash::{Hash, Hasher};
    hop.work.run();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    let key = format!("customer-{}", hasher.finish() % 1_000);
    let payload = &body[..body.len().min(hop.payload_bytes)];
    let n = hop.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let headers = crate::event_headers(n, &hop.event_type);
    let acknowledged = match &hop.producer {
        Sender::Elo(producer) => {
            producer.send_with_headers(&hop.topic, Some(key.as_bytes()), Some(payload), headers).await.is_ok()
        }
        Sender::Bare(producer) => {
            let record = FutureRecord::to(&hop.topic).key(key.as_bytes()).payload(payload).headers(headers);
            match producer.send_result(record) {
                Ok(delivery) => matches!(delivery.await, Ok(Ok(_))),
                Err(_) => false,
            }
        }
    };
    if acknowledged { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

/// A fixed amount of CPU work: SipHash over a 256 KiB buffer, 4 KiB at a time.
struct Work {
    chunks: usize,
}

const CHUNK: usize = 4096;

impl Work {
    /// As many chunks as take `us` microseconds on this box, measured once at start (best of
    /// five timings of 1,000 chunks: the least disturbed).
    fn calibrated(us: u64) -> Self {
        if us == 0 {
            return Self { chunks: 0 };
        }
        let per_chunk = (0..5)
            .map(|_| {
                let started = std::time::Instant::now();
                Self { chunks: 1_000 }.run();
                started.elapsed() / 1_000
            })
            .min()
            .unwrap_or_default()
            .max(std::time::Duration::from_nanos(1));
        Self { chunks: (std::time::Duration::from_micros(us).as_nanos() / per_chunk.as_nanos()).max(1) as usize }
    }

    fn run(&self) {
        use std::hash::Hasher;
        static BUFFER: std::sync::LazyLock<Vec<u8>> =
            std::sync::LazyLock::new(|| (0..256 * 1024).map(|i| (i * 31 % 251) as u8).collect());
        if self.chunks == 0 {
            return;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for chunk in BUFFER.chunks(CHUNK).cycle().take(self.chunks) {
            hasher.write(chunk);
        }
        std::hint::black_box(hasher.finish());
    }
}

/// This executable started as the hop on `listen`, producing to `topic`; with `work_us`, it
/// works that long per request before producing (else as [`SPIN_US`] in the environment says).
pub(crate) fn spawn(
    listen: u16,
    topic: &str,
    payload_bytes: usize,
    event_type: &str,
    work_us: Option<u64>,
) -> anyhow::Result<elo_integration_tests::ChildGuard> {
    let mut command = std::process::Command::new(std::env::current_exe()?);
    if let Some(work_us) = work_us {
        command.env(SPIN_US, work_us.to_string());
    }
    command
        .env(LISTEN, format!("127.0.0.1:{listen}"))
        .env(TOPIC, topic)
        .env(PAYLOAD_BYTES, payload_bytes.to_string())
        .env(EVENT_TYPE, event_type)
        .stdout(std::process::Stdio::null());
    Ok(elo_integration_tests::ChildGuard::spawn("elo-bench (HTTP hop)", &mut command))
}
