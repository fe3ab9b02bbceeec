//! The common lifecycle of an Elo service, so each `main` stays thin: shared settings (Kafka,
//! registry, telemetry, topic names), the admin server, topic provisioning, the producer and
//! the codec, and the shutdown token.
//!
//! Startup never crashes on a broker that is down or refuses credentials: the admin server
//! comes up first, readiness stays false with the reason in `/health/readyz` and in the logs,
//! and provisioning is retried until it works or the process is told to stop. Kubernetes then
//! sees a live but unready pod, which is the truth.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use elo_events::{CodecError, EventCodec, RegistryConfig};
use elo_kafka::{ErrorClass, HandlerError, KafkaArgs, Producer, Record, TopicSpec};
use elo_telemetry::{Health, TelemetryArgs};
use tokio_util::sync::CancellationToken;

/// Topic names (defaults from architecture.md; every deployment may rename them).
#[derive(Clone, Debug, clap::Args)]
pub struct TopicArgs {
    /// Commerce events topic (order and customer facts), keyed by customer.
    #[arg(long = "topic-commerce", env = "ELO_TOPIC_COMMERCE", default_value = "commerce.events")]
    pub commerce: String,
    /// Inventory events topic, keyed by SKU.
    #[arg(long = "topic-inventory", env = "ELO_TOPIC_INVENTORY", default_value = "inventory.events")]
    pub inventory: String,
    /// Sink outcomes topic, keyed by customer.
    #[arg(long = "topic-outcomes", env = "ELO_TOPIC_OUTCOMES", default_value = "integration.outcomes")]
    pub outcomes: String,
    /// Repair commands topic, keyed by customer.
    #[arg(long = "topic-commands", env = "ELO_TOPIC_COMMANDS", default_value = "integration.commands")]
    pub commands: String,
    /// Partitions for topics this service creates (= the most replicas a consumer group can use).
    #[arg(long = "topic-partitions", env = "ELO_TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor for topics this service creates.
    #[arg(long = "topic-replication", env = "ELO_TOPIC_REPLICATION", default_value_t = 1)]
    pub replication: i32,
    /// Create missing topics at startup (turn off where topics are managed, e.g. by Strimzi).
    #[arg(long = "provision-topics", env = "ELO_PROVISION_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub provision: bool,
}

impl TopicArgs {
    /// A topic spec with this deployment's partitions and replication.
    pub fn spec(&self, name: &str) -> TopicSpec {
        TopicSpec::new(name, self.partitions).with_replication(self.replication)
    }
}

/// Schema Registry settings.
#[derive(Clone, Debug, clap::Args)]
pub struct RegistryArgs {
    /// Confluent-compatible Schema Registry URL.
    #[arg(long = "registry-url", env = "ELO_REGISTRY_URL", default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// Register Elo's schemas when missing; off = use the subject's latest version.
    #[arg(long = "registry-auto-register", env = "ELO_REGISTRY_AUTO_REGISTER", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_register: bool,
    /// Registry basic-auth user (e.g. a Confluent Cloud API key).
    #[arg(long = "registry-user", env = "ELO_REGISTRY_USER")]
    pub user: Option<String>,
    /// File holding the registry basic-auth password (never passed as a flag value).
    #[arg(long = "registry-password-file", env = "ELO_REGISTRY_PASSWORD_FILE")]
    pub password_file: Option<std::path::PathBuf>,
}

impl RegistryArgs {
    /// The codec configuration, reading the password file if set.
    pub fn config(&self) -> anyhow::Result<RegistryConfig> {
        let basic_auth = match (&self.user, &self.password_file) {
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("cannot read registry password file {}: {e}", file.display()))?;
                Some((user.clone(), password.trim_end().to_owned()))
            }
            (Some(user), None) => Some((user.clone(), String::new())),
            (None, _) => None,
        };
        Ok(RegistryConfig {
            url: self.url.clone(),
            auto_register: self.auto_register,
            basic_auth,
            timeout: Duration::from_secs(5),
        })
    }
}

/// Settings every service has.
#[derive(Clone, Debug, clap::Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Address of the admin server (/metrics, /health/livez, /health/readyz).
    #[arg(long = "admin-listen", env = "ELO_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
}

/// A started service's shared parts.
pub struct Service {
    pub name: &'static str,
    pub health: Health,
    pub shutdown: CancellationToken,
    pub producer: Producer,
    pub codec: Arc<EventCodec>,
    pub admin_addr: SocketAddr,
    admin_task: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Starts the admin server, provisions `topics` (retrying while the broker is unreachable
    /// or refuses us), connects the producer and builds the codec. Returns `None` when shutdown
    /// was requested before the broker became usable.
    pub async fn start(
        name: &'static str,
        common: &CommonArgs,
        default_admin: SocketAddr,
        topics: Vec<TopicSpec>,
    ) -> anyhow::Result<Option<Self>> {
        let shutdown = elo_telemetry::shutdown::on_signals();
        let health = Health::new();
        health.set_ready("kafka_topics", !common.topics.provision, "provisioning");
        let (admin_addr, admin_task) =
            elo_telemetry::serve_admin(common.admin_listen.unwrap_or(default_admin), health.clone(), shutdown.clone())
                .await?;
        tracing::info!(service = name, kafka = %common.kafka.describe(), registry = %common.registry.url, "starting");
        let codec = Arc::new(EventCodec::new(&common.registry.config()?)?);
        let producer = Producer::new(&common.kafka, health.clone())?;

        if common.topics.provision {
            let mut attempt = 0u32;
            loop {
                let outcome = tokio::select! {
                    r = elo_kafka::ensure_topics(&common.kafka, &topics, Duration::from_secs(10), &health) => r,
                    _ = shutdown.cancelled() => return Ok(None),
                };
                match outcome {
                    Ok(created) => {
                        health.set_ready(
                            "kafka_topics",
                            true,
                            format!("{} topics ok, {} created", topics.len(), created.len()),
                        );
                        break;
                    }
                    Err(error) => {
                        attempt += 1;
                        tracing::error!(error = %error, error_code = error.code(), attempt, "cannot provision topics; the broker is unreachable or refuses our credentials");
                        health.set_ready("kafka_topics", false, format!("{}: {error}", error.code()));
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                            _ = shutdown.cancelled() => return Ok(None),
                        }
                    }
                }
            }
        }
        let connect = producer.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { connect.keep_connected(stop).await });
        Ok(Some(Self { name, health, shutdown, producer, codec, admin_addr, admin_task }))
    }

    /// Flushes the producer and stops the admin server.
    pub async fn finish(self) {
        if let Err(error) = self.producer.flush(Duration::from_secs(10)) {
            tracing::error!(error = %error, "producer flush on shutdown failed");
        }
        self.shutdown.cancel();
        let _ = self.admin_task.await;
        tracing::info!(service = self.name, "stopped");
    }
}

/// Decodes a record's value as `T`, classifying failures for the consumer runtime: only bytes
/// that cannot be decoded are permanent (DLQ); a registry that refuses our credentials is
/// `Auth`, one that throttles us `RateLimited`, and one that is down or failing `Transient`,
/// so a registry incident never parks valid records.
pub async fn decode_record<T: elo_events::AvroEvent>(codec: &EventCodec, record: &Record) -> Result<T, HandlerError> {
    let Some(payload) = record.payload.as_deref() else {
        return Err(HandlerError::permanent("empty_value", "record has no value (tombstone)"));
    };
    codec.decode::<T>(payload).await.map_err(|e| codec_failure(&e))
}

/// The handler error for a codec failure.
pub fn codec_failure(e: &CodecError) -> HandlerError {
    let class = match e.class() {
        elo_events::CodecErrorClass::Undecodable => ErrorClass::Permanent,
        elo_events::CodecErrorClass::Unavailable => ErrorClass::Transient,
        elo_events::CodecErrorClass::Auth => ErrorClass::Auth,
        elo_events::CodecErrorClass::RateLimited => ErrorClass::RateLimited,
    };
    HandlerError::new(class, e.code(), e.to_string())
}

/// Settings of a consumer service (every sink and the reconciler).
#[derive(Clone, Debug, clap::Args)]
pub struct ConsumerArgs {
    /// Consumer group id [default: elo-<service>].
    #[arg(long = "group", env = "ELO_CONSUMER_GROUP")]
    pub group: Option<String>,
    /// Dead-letter topic for records that cannot be applied [default: <service>.dlq].
    #[arg(long = "dlq-topic", env = "ELO_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,
    /// Records per batch handed to the target [default: the target's bulk size].
    #[arg(long = "max-batch", env = "ELO_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Records buffered per partition before that partition is paused. Each pause drops
    /// librdkafka's prefetch for the partition, so too small a buffer costs refetches; too
    /// large a one costs memory (records x average size x assigned partitions).
    #[arg(long = "partition-buffer", env = "ELO_PARTITION_BUFFER", default_value_t = 5000)]
    pub partition_buffer: usize,
    /// Bytes buffered per partition before that partition is paused (bounds memory whatever
    /// the record size).
    #[arg(long = "partition-buffer-bytes", env = "ELO_PARTITION_BUFFER_BYTES", default_value_t = 4 << 20)]
    pub partition_buffer_bytes: usize,
    /// Concurrent batches across partitions.
    #[arg(long = "max-in-flight", env = "ELO_MAX_IN_FLIGHT", default_value_t = 4)]
    pub max_in_flight: usize,
    /// How long shutdown and revoke wait for in-flight batches; keep it below the pod's
    /// terminationGracePeriodSeconds. E.g. `20s`, `500ms`.
    #[arg(long = "drain-timeout", env = "ELO_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

impl ConsumerArgs {
    /// Runtime settings from these flags: `group` and `dlq` unless overridden, the target's
    /// `default_batch` unless `--max-batch` is set.
    pub fn settings(
        &self,
        default_group: String,
        topics: Vec<String>,
        default_dlq: String,
        default_batch: usize,
    ) -> elo_kafka::ConsumerSettings {
        let group = self.group.clone().unwrap_or(default_group);
        let dlq = self.dlq_topic.clone().unwrap_or(default_dlq);
        let mut settings = elo_kafka::ConsumerSettings::new(group, topics, dlq);
        settings.max_batch = self.max_batch.unwrap_or(default_batch).max(1);
        settings.batch_linger = Duration::from_millis(50);
        settings.max_in_flight = self.max_in_flight.max(1);
        settings.partition_buffer = self.partition_buffer.max(1);
        settings.partition_buffer_bytes = self.partition_buffer_bytes.max(1);
        settings.drain_timeout = self.drain_timeout;
        settings
    }
}

/// Parses `250ms`, `20s`, `5m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("invalid duration {text:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3_600)),
        "d" => Ok(Duration::from_secs(n * 86_400)),
        _ => Err(format!("invalid duration unit in {text:?} (use ms, s, m, h or d)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("5h"), Ok(Duration::from_secs(5 * 3_600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
