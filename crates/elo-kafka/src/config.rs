//! Broker connection settings.
//!
//! Besides the flags below, every librdkafka property can be set from the environment:
//! `ELO_RDKAFKA_<PROPERTY>` with dots written as `_` (and a literal `_` as `__`), e.g.
//! `ELO_RDKAFKA_SECURITY_PROTOCOL=SASL_SSL`, `ELO_RDKAFKA_SASL_MECHANISM=SCRAM-SHA-512`,
//! `ELO_RDKAFKA_SSL_CA_LOCATION=/etc/ca.pem`. A name ending in `_FILE` reads the value from
//! that file (Kubernetes secrets): `ELO_RDKAFKA_SASL_PASSWORD_FILE=/run/secrets/kafka`.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

use crate::{Error, Result};

const ENV_PREFIX: &str = "ELO_RDKAFKA_";

/// Kafka connection flags shared by every service.
#[derive(Clone, Debug, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap brokers, comma separated.
    #[arg(long = "kafka-brokers", env = "ELO_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Extra librdkafka properties as key=value (repeatable; `;`-separated in the variable);
    /// they override ELO_RDKAFKA_* ones.
    #[arg(long = "kafka-option", env = "ELO_KAFKA_OPTIONS", value_delimiter = ';', value_parser = parse_key_value)]
    pub options: Vec<(String, String)>,
    /// How long a produced record may wait for the broker's acknowledgement before the producer
    /// gives up on it (librdkafka `message.timeout.ms`). A failure is then definite: the record
    /// will not be delivered later, so an HTTP front can answer 503 without a late duplicate.
    #[arg(long = "kafka-delivery-timeout-ms", env = "ELO_KAFKA_DELIVERY_TIMEOUT_MS", default_value_t = 30_000)]
    pub delivery_timeout_ms: u64,
    /// Idempotent producer (no duplicates or reordering from retries). Off, the producer keeps
    /// order with one request in flight per connection. The local Tansu stack turns it off:
    /// Tansu 0.6 wedges when an idempotent producer bumps its epoch after a timed-out record
    /// (README, "Known broker issues").
    #[arg(long = "kafka-idempotence", env = "ELO_KAFKA_IDEMPOTENCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub idempotence: bool,
    /// How often the producer reports where its sends waited (librdkafka statistics into the
    /// `elo_kafka_*_wait_seconds` and `elo_kafka_broker_rtt_seconds` gauges, each window's value
    /// kept until the next); 0 turns it off. The default matches the shipped 30 s scrape: a
    /// shorter interval than the scrape's loses windows. The producer's own setting: it wins
    /// over `statistics.interval.ms` among the librdkafka settings (which would turn statistics
    /// on for every client, and only the producer reports them).
    #[arg(
        long = "kafka-statistics-interval-ms",
        env = "ELO_KAFKA_STATISTICS_INTERVAL_MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(0..=86_400_000)
    )]
    pub statistics_interval_ms: u64,
}

fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

impl KafkaArgs {
    /// Settings for a local broker at `brokers`, no extras (tests).
    pub fn local(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            options: Vec::new(),
            delivery_timeout_ms: 30_000,
            idempotence: true,
            statistics_interval_ms: 30_000,
        }
    }

    /// All librdkafka properties: bootstrap servers, then `ELO_RDKAFKA_*`, then `--kafka-option`.
    pub fn properties(&self) -> Result<BTreeMap<String, String>> {
        let mut props = BTreeMap::new();
        props.insert("bootstrap.servers".to_owned(), self.brokers.clone());
        props.extend(from_env(std::env::vars())?);
        props.extend(self.options.iter().cloned());
        Ok(props)
    }

    /// A librdkafka config with these properties plus `overrides` (set by the runtime, which
    /// needs e.g. manual commits to keep its promise).
    pub fn client_config(&self, overrides: &[(&str, &str)]) -> Result<ClientConfig> {
        self.client_config_with(&[], overrides)
    }

    /// Like [`KafkaArgs::client_config`], with `defaults` that the operator's properties may
    /// change (tuning such as `linger.ms`), under the `overrides` they may not.
    pub fn client_config_with(&self, defaults: &[(&str, &str)], overrides: &[(&str, &str)]) -> Result<ClientConfig> {
        let mut config = ClientConfig::new();
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in self.properties()? {
            config.set(k, v);
        }
        for (k, v) in overrides {
            config.set(*k, *v);
        }
        Ok(config)
    }

    /// The properties for logs, secrets masked.
    pub fn describe(&self) -> String {
        match self.properties() {
            Ok(props) => props
                .iter()
                .map(|(k, v)| format!("{k}={}", elo_telemetry::redact::setting(k, v)))
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => format!("<invalid: {e}>"),
        }
    }
}

/// Maps `ELO_RDKAFKA_*` variables to librdkafka properties.
pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<BTreeMap<String, String>> {
    let mut props = BTreeMap::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let (rest, from_file) = match rest.strip_suffix("_FILE") {
            Some(stripped) => (stripped, true),
            None => (rest, false),
        };
        let key = rest.to_ascii_lowercase().replace("__", "\u{0}").replace('_', ".").replace('\u{0}', "_");
        let value = if from_file {
            std::fs::read_to_string(&value)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| Error::Config(format!("{name}: cannot read {value}: {e}")))?
        } else {
            value
        };
        props.insert(key, value);
    }
    Ok(props)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_map_to_librdkafka_properties() {
        let dir = std::env::temp_dir().join(format!("elo-kafka-cfg-{}", std::process::id()));
        std::fs::write(&dir, "s3cret\n").unwrap();
        let vars = vec![
            ("ELO_RDKAFKA_SECURITY_PROTOCOL".to_owned(), "SASL_SSL".to_owned()),
            ("ELO_RDKAFKA_SASL_MECHANISM".to_owned(), "SCRAM-SHA-512".to_owned()),
            ("ELO_RDKAFKA_SASL_PASSWORD_FILE".to_owned(), dir.display().to_string()),
            ("ELO_RDKAFKA_SOME__UNDERSCORE_NAME".to_owned(), "x".to_owned()),
            ("UNRELATED".to_owned(), "y".to_owned()),
        ];
        let props = from_env(vars).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(props["security.protocol"], "SASL_SSL");
        assert_eq!(props["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(props["sasl.password"], "s3cret");
        assert_eq!(props["some_underscore.name"], "x");
        assert_eq!(props.len(), 4);
    }

    #[test]
    fn unreadable_secret_file_is_a_clear_error() {
        let err =
            from_env(vec![("ELO_RDKAFKA_SASL_PASSWORD_FILE".to_owned(), "/nonexistent/x".to_owned())]).unwrap_err();
        assert!(err.to_string().contains("ELO_RDKAFKA_SASL_PASSWORD_FILE"), "{err}");
    }

    #[test]
    fn describe_masks_secrets() {
        let args =
            KafkaArgs { options: vec![("sasl.password".into(), "hunter2".into())], ..KafkaArgs::local("b:9092") };
        let text = args.describe();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("bootstrap.servers=b:9092"));
    }
}
