//! Idempotent producer: `acks=all`, `enable.idempotence=true`, and every send awaits the
//! broker's delivery report, so a caller that gets `Ok` knows the record is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use elo_telemetry::Health;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::{Error, KafkaArgs, Result, headers, metrics};

/// Where the broker stored a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
}

/// Reports connection-level errors (authentication, all brokers down, fatal) to health and
/// metrics, and brings readiness back once the connection works again.
///
/// librdkafka reports failures but never "the broker is back"; whoever owns the client calls
/// [`ConnectionContext::recovered`] after a successful round trip (a delivery, a fetched record,
/// a metadata probe while degraded).
#[derive(Clone)]
pub struct ConnectionContext {
    health: Health,
    check: &'static str,
    degraded: Arc<AtomicBool>,
    fatal: Arc<AtomicBool>,
    /// Records librdkafka's statistics into the producer's gauges (producers only).
    statistics: bool,
}

impl ConnectionContext {
    pub(crate) fn new(health: Health, check: &'static str) -> Self {
        Self { health, check, degraded: Arc::default(), fatal: Arc::default(), statistics: false }
    }

    /// A producer's context: its statistics emissions feed the gauges of [`crate::stats`].
    fn reporting_statistics(mut self) -> Self {
        self.statistics = true;
        self
    }

    /// A failure made this connection not ready and no round trip has succeeded since.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// librdkafka reported a fatal error: this client instance is unusable.
    pub fn is_fatal(&self) -> bool {
        self.fatal.load(Ordering::Acquire)
    }

    /// A round trip succeeded: readiness returns if a failure had taken it away.
    pub fn recovered(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!(check = self.check, "kafka connection works again");
            self.health.set_ready(AUTH_CHECK, true, "credentials accepted");
            self.health.set_ready(self.check, true, "connected");
        }
    }
}

impl ClientContext for ConnectionContext {
    // Other clients' emissions (the librdkafka settings reach every client) are dropped, not
    // dumped into the log at info level (rdkafka's default).
    fn stats_raw(&self, statistics: &[u8]) {
        if self.statistics {
            crate::stats::record(self.check, statistics);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        let label = Error::Kafka(error.clone()).code();
        metrics::CLIENT_ERRORS.with_label_values(&[self.check, label]).inc();
        let auth = matches!(code, Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed));
        if code == Some(RDKafkaErrorCode::Fatal) {
            // Retrying cannot help (e.g. an idempotent producer fenced): only a restart does.
            tracing::error!(error = %error, reason, check = self.check, "fatal kafka error; reporting not live");
            self.fatal.store(true, Ordering::Release);
            self.health.set_live(self.check, false, format!("fatal: {reason}"));
            self.health.set_ready(self.check, false, format!("fatal: {reason}"));
        } else if auth {
            // Its own check, so later "brokers down" noise cannot hide the real cause. Readiness
            // first, then the flag: a concurrent `recovered` either sees the flag and restores
            // readiness after this, or does not and leaves it to the next probe.
            tracing::error!(error = %error, reason, check = self.check, "kafka refused our credentials");
            self.health.set_ready(AUTH_CHECK, false, format!("authentication failed: {reason}"));
            self.degraded.store(true, Ordering::Release);
        } else if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            tracing::error!(error = %error, reason, check = self.check, "kafka connection failing");
            self.health.set_ready(self.check, false, format!("{label}: {reason}"));
            self.degraded.store(true, Ordering::Release);
        } else {
            tracing::warn!(error = %error, reason, check = self.check, "kafka client error");
        }
    }
}

/// Readiness check that reports rejected broker credentials until a later request succeeds.
pub const AUTH_CHECK: &str = "kafka_auth";

/// The shared producer of a service (cheap to clone).
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer<ConnectionContext>,
    /// The same state the client context updates (rdkafka does not hand its context back).
    connection: ConnectionContext,
    health: Health,
}

impl Producer {
    /// Creates the producer; it connects lazily. Call [`Producer::wait_connected`] to gate
    /// readiness on a successful metadata round-trip.
    pub fn new(args: &KafkaArgs, health: Health) -> Result<Self> {
        metrics::register_all();
        let delivery_timeout = args.delivery_timeout_ms.max(1).to_string();
        // Tuning the operator may change (`ELO_RDKAFKA_LINGER_MS`, ...); reliability they may not.
        // A lower reconnect backoff cap (librdkafka: 10 s) notices a returning broker sooner.
        let defaults = [("linger.ms", "5"), ("compression.type", "lz4"), ("reconnect.backoff.max.ms", "2000")];
        let mut settings = vec![("acks", "all"), ("message.timeout.ms", delivery_timeout.as_str())];
        if args.idempotence {
            settings.push(("enable.idempotence", "true"));
        } else {
            // Retries must not reorder a key's records: one request in flight.
            settings.extend([("enable.idempotence", "false"), ("max.in.flight.requests.per.connection", "1")]);
        }
        let mut config = args.client_config_with(&defaults, &settings)?;
        // Statistics feed the queue-wait and round-trip gauges (`stats`), at the producer's own
        // interval: a librdkafka-level setting is overridden here, so say so.
        if config.get("statistics.interval.ms").is_some() {
            tracing::warn!(
                "statistics.interval.ms among the librdkafka settings is ignored by the producer (ELO_KAFKA_STATISTICS_INTERVAL_MS sets its interval) and turns statistics on for every other client"
            );
        }
        config.set("statistics.interval.ms", args.statistics_interval_ms.to_string());
        let connection = ConnectionContext::new(health.clone(), "kafka_producer").reporting_statistics();
        let inner = config.create_with_context(connection.clone())?;
        health.set_ready("kafka_producer", false, "connecting");
        Ok(Self { inner, connection, health })
    }

    /// Waits until the brokers answer a metadata request (credentials accepted), then marks
    /// the producer ready. Retries until `deadline`.
    pub async fn wait_connected(&self, deadline: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let producer = self.inner.clone();
            let attempt = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(None, Timeout::After(Duration::from_secs(5))).map(|_| ())
            })
            .await
            .expect("metadata task does not panic");
            match attempt {
                Ok(()) => {
                    self.connection.recovered();
                    self.health.set_ready(AUTH_CHECK, true, "credentials accepted");
                    self.health.set_ready("kafka_producer", true, "connected");
                    return Ok(());
                }
                Err(error) if started.elapsed() < deadline => {
                    tracing::warn!(error = %error, "kafka not reachable yet, retrying");
                    self.health.set_ready("kafka_producer", false, format!("{error}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => {
                    self.health.set_ready("kafka_producer", false, format!("{error}"));
                    return Err(error.into());
                }
            }
        }
    }

    /// Waits until connected, then keeps watching: whenever a failure took readiness away, a
    /// metadata round trip every two seconds brings it back as soon as the broker answers, even
    /// when no record is being sent (an unready pod receives no traffic to send).
    pub async fn keep_connected(&self, shutdown: CancellationToken) {
        tokio::select! {
            r = self.wait_connected(Duration::from_secs(u64::MAX / 4)) => if let Err(error) = r {
                tracing::error!(error = %error, "producer cannot reach kafka");
            },
            _ = shutdown.cancelled() => return,
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.cancelled() => return,
            }
            if !self.connection.is_degraded() {
                continue;
            }
            let producer = self.inner.clone();
            let probe = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(None, Timeout::After(Duration::from_secs(2))).map(|_| ())
            })
            .await;
            if matches!(probe, Ok(Ok(()))) {
                self.connection.recovered();
            }
        }
    }

    /// How many partitions `topic` has, from the brokers' metadata (blocking: call it off the
    /// async workers, e.g. in `spawn_blocking`). `None` when the brokers do not list the topic.
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> Result<Option<i32>> {
        let metadata = self.inner.client().fetch_metadata(Some(topic), Timeout::After(timeout))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0))
    }

    /// The client context (connection state), for tests and probes.
    pub fn connection(&self) -> &ConnectionContext {
        &self.connection
    }

    /// Sends one record with the event-type header and the current trace context, and waits
    /// for the broker's acknowledgement. `QueueFull` is returned at once, not waited out, so
    /// an HTTP front can answer 503 with `Retry-After`.
    pub async fn send(&self, topic: &str, key: &[u8], payload: &[u8], event_type: Option<&str>) -> Result<Delivery> {
        let headers = headers::traced(event_type.map(|t| (headers::EVENT_TYPE, t.as_bytes())));
        self.send_with_headers(topic, Some(key), Some(payload), headers).await
    }

    /// Sends a record to one partition (state changelogs are co-partitioned with their
    /// input), with the current trace context; `None` payload is a tombstone.
    pub async fn send_to_partition(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: Option<&[u8]>,
    ) -> Result<Delivery> {
        self.deliver(topic, Some(partition), Some(key), payload, headers::traced([])).await
    }

    /// Sends a record with exactly the given headers (DLQ writes keep the originals).
    pub async fn send_with_headers(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<Delivery> {
        self.deliver(topic, None, key, payload, headers).await
    }

    /// Sends a record with exactly the given headers to one partition (a DLQ replay goes back to
    /// the partition it came from, so per-key order and co-partitioning hold).
    pub async fn send_with_headers_to_partition(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<Delivery> {
        self.deliver(topic, Some(partition), key, payload, headers).await
    }

    async fn deliver(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<Delivery> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        let started = Instant::now();
        let delivery = match self.inner.send_result(record) {
            Ok(future) => future,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                metrics::PRODUCE_ERRORS.with_label_values(&[topic, "queue_full"]).inc();
                return Err(Error::QueueFull);
            }
            Err((error, _)) => {
                let error = Error::Kafka(error);
                metrics::PRODUCE_ERRORS.with_label_values(&[topic, error.code()]).inc();
                return Err(error);
            }
        };
        match delivery.await {
            Ok(Ok(d)) => {
                self.connection.recovered();
                metrics::PRODUCED.with_label_values(&[topic]).inc();
                metrics::PRODUCE_LATENCY.with_label_values(&[topic]).observe(started.elapsed().as_secs_f64());
                Ok(Delivery { partition: d.partition, offset: d.offset })
            }
            Ok(Err((error, _))) => {
                let error = Error::Kafka(error);
                metrics::PRODUCE_ERRORS.with_label_values(&[topic, error.code()]).inc();
                if let Some((code, reason)) = self.inner.client().fatal_error() {
                    tracing::error!(?code, reason, "fatal producer error; reporting not live");
                    self.health.set_live("kafka_producer", false, format!("fatal: {code:?}: {reason}"));
                }
                Err(error)
            }
            Err(_canceled) => {
                metrics::PRODUCE_ERRORS.with_label_values(&[topic, "canceled"]).inc();
                Err(Error::Kafka(KafkaError::Canceled))
            }
        }
    }

    /// Waits for every outstanding record (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.inner.flush(Timeout::After(timeout)).map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health_of(health: &Health, live: bool) -> bool {
        if live { health.is_live() } else { health.is_ready() }
    }

    #[test]
    fn readiness_returns_after_an_outage() {
        let health = Health::new();
        let context = ConnectionContext::new(health.clone(), "kafka_producer");
        health.set_ready("kafka_producer", true, "connected");
        context.error(KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        assert!(!health_of(&health, false));
        assert!(context.is_degraded());
        context.recovered();
        assert!(health_of(&health, false), "ready again after a successful round trip");
        assert!(!context.is_degraded());
    }

    /// Only a producer's emissions reach the gauges: a consumer or admin client that got
    /// `statistics.interval.ms` through the shared librdkafka settings must not mix its fetch
    /// long-polls into the producer's round trips.
    #[test]
    fn only_a_producers_statistics_reach_the_gauges() {
        let emission = br#"{"msg_cnt": 3, "brokers": {"b:9092/1": {"nodeid": 1, "waitresp_cnt": 1, "rtt": {"avg": 500000, "p99": 500000, "max": 500000}}}}"#;
        let series = |client: &str| {
            prometheus::gather()
                .iter()
                .filter(|f| f.name() == "elo_kafka_broker_rtt_seconds")
                .flat_map(|f| f.get_metric().to_vec())
                .filter(|m| m.get_label().iter().any(|l| l.name() == "client" && l.value() == client))
                .count()
        };
        ConnectionContext::new(Health::new(), "stats-consumer-test").stats_raw(emission);
        assert_eq!(series("stats-consumer-test"), 0, "a consumer's emission is dropped");
        ConnectionContext::new(Health::new(), "stats-producer-test").reporting_statistics().stats_raw(emission);
        assert_eq!(series("stats-producer-test"), 3, "avg, p99 and max of broker 1");
    }

    #[test]
    fn a_fatal_error_makes_the_process_not_live() {
        let health = Health::new();
        let context = ConnectionContext::new(health.clone(), "kafka_producer");
        assert!(health_of(&health, true));
        context.error(KafkaError::Global(RDKafkaErrorCode::Fatal), "producer fenced");
        assert!(!health_of(&health, true), "a fatal error must fail liveness");
        assert!(context.is_fatal());
        context.recovered();
        assert!(!health_of(&health, true), "nothing but a restart clears a fatal error");
    }

    #[test]
    fn acl_denials_are_auth_and_oversized_records_permanent() {
        let acl = Error::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert_eq!(acl.class(), crate::ErrorClass::Auth);
        let big = Error::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
        assert_eq!(big.class(), crate::ErrorClass::Permanent);
        let down = Error::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown));
        assert_eq!(down.class(), crate::ErrorClass::Transient);
        let throttled = Error::Kafka(KafkaError::MessageProduction(RDKafkaErrorCode::ThrottlingQuotaExceeded));
        assert_eq!(throttled.class(), crate::ErrorClass::RateLimited);
        assert_eq!(Error::QueueFull.class(), crate::ErrorClass::Transient);
    }
}
