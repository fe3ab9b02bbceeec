//! order-ingest's settings: one `Config` (clap, every flag with its `ELO_*` variable) and the
//! parsers and file readers that turn it into what the paths need.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use elo_service::CommonArgs;

use crate::{backfill, normalize, poll, push, wiring};

/// order-ingest settings.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "order-ingest",
    version,
    about = "Publishes Magento orders and customers as Avro domain events on Kafka."
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Compacted topic holding the poll checkpoints.
    #[arg(
        long = "checkpoint-topic",
        env = "ELO_ORDER_INGEST_CHECKPOINT_TOPIC",
        default_value = "order-ingest.checkpoints"
    )]
    pub checkpoint_topic: String,
    /// Address of the Magento push endpoint (`POST /webhooks/magento/orders`).
    #[arg(long = "listen", env = "ELO_ORDER_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// File holding the webhook HMAC signing secret; the push endpoint stays off without it
    /// (or without an Adobe Commerce public key).
    #[arg(long = "webhook-secret-file", env = "ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<std::path::PathBuf>,
    /// File holding the previous HMAC secret, still accepted while senders move to the new one.
    #[arg(long = "webhook-previous-secret-file", env = "ELO_ORDER_INGEST_WEBHOOK_PREVIOUS_SECRET_FILE")]
    pub webhook_previous_secret_file: Option<std::path::PathBuf>,
    /// File holding the Adobe Commerce Webhooks public key (PEM, from Stores > Configuration >
    /// Adobe Services > Webhooks): `x-adobe-commerce-webhook-signature` is then accepted.
    #[arg(long = "adobe-webhook-public-key-file", env = "ELO_ORDER_INGEST_ADOBE_WEBHOOK_PUBLIC_KEY_FILE")]
    pub adobe_webhook_public_key_file: Option<std::path::PathBuf>,
    /// Accepted clock difference for signed notifications (replay protection), e.g. `300s`.
    #[arg(long = "webhook-tolerance", env = "ELO_ORDER_INGEST_WEBHOOK_TOLERANCE", default_value = "300s", value_parser = elo_service::parse_duration)]
    pub webhook_tolerance: Duration,
    /// Time a push client has to send its request headers (slow clients are cut off).
    #[arg(long = "header-read-timeout", env = "ELO_ORDER_INGEST_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = elo_service::parse_duration)]
    pub header_read_timeout: Duration,
    /// Time a push request may take, body and publication included (answered 503 past it);
    /// keep it above the delivery timeout plus 5 s so a slow broker ends in its own 503.
    #[arg(long = "request-timeout", env = "ELO_ORDER_INGEST_REQUEST_TIMEOUT", default_value = "45s", value_parser = elo_service::parse_duration)]
    pub request_timeout: Duration,
    /// Push connections served at once; more are refused at once with a 503 (load shedding).
    #[arg(long = "max-connections", env = "ELO_ORDER_INGEST_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Largest accepted notification body.
    #[arg(long = "max-body-bytes", env = "ELO_ORDER_INGEST_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Magento base URL (orders are refetched when a notification is partial).
    #[arg(long = "magento-url", env = "ELO_MAGENTO_URL", default_value = "http://127.0.0.1:8701")]
    pub magento_url: String,
    /// How order-ingest authenticates to Magento: `admin` (user and password), `bearer` (an
    /// integration's access token) or `oauth1` (an integration's OAuth 1.0a credentials, signed
    /// per request, Magento's default for integrations).
    #[arg(long = "magento-auth", env = "ELO_MAGENTO_AUTH", value_enum, default_value = "admin")]
    pub magento_auth: MagentoAuthKind,
    /// File holding the integration access token (`ELO_MAGENTO_AUTH=bearer`).
    #[arg(long = "magento-token-file", env = "ELO_MAGENTO_TOKEN_FILE")]
    pub magento_token_file: Option<std::path::PathBuf>,
    /// JSON file with the integration's `consumer_key`, `consumer_secret`, `access_token` and
    /// `access_token_secret` (`ELO_MAGENTO_AUTH=oauth1`).
    #[arg(long = "magento-oauth-file", env = "ELO_MAGENTO_OAUTH_FILE")]
    pub magento_oauth_file: Option<std::path::PathBuf>,
    /// Magento admin user for REST calls.
    #[arg(long = "magento-username", env = "ELO_MAGENTO_USERNAME", default_value = "admin")]
    pub magento_username: String,
    /// File holding the Magento admin password (required unless Magento is the local sandbox).
    #[arg(long = "magento-password-file", env = "ELO_MAGENTO_PASSWORD_FILE")]
    pub magento_password_file: Option<std::path::PathBuf>,
    /// Pause between poll rounds (`0s` turns polling off).
    #[arg(long = "poll-interval", env = "ELO_ORDER_INGEST_POLL_INTERVAL", default_value = "10s", value_parser = elo_service::parse_duration)]
    pub poll_interval: Duration,
    /// Window re-read before the cursor each round, for late commits.
    #[arg(long = "poll-overlap", env = "ELO_ORDER_INGEST_POLL_OVERLAP", default_value = "300s", value_parser = elo_service::parse_duration)]
    pub poll_overlap: Duration,
    /// What the poll reads, comma separated.
    #[arg(
        long = "poll-entities",
        env = "ELO_ORDER_INGEST_POLL_ENTITIES",
        default_value = "orders,customers",
        value_delimiter = ','
    )]
    pub poll_entities: Vec<poll::Entity>,
    /// Where a poll without a checkpoint (a new deployment, a new store) starts: a time back
    /// from now (`24h`, `7d`) or a UTC date (`2026-01-01`, `2026-01-01T08:00:00Z`). History
    /// before it is republished with `backfill`.
    #[arg(long = "poll-start", env = "ELO_ORDER_INGEST_POLL_START", default_value = "24h", value_parser = parse_poll_start)]
    pub poll_start: PollStart,
    /// Pages read per poll round before the checkpoint is saved (long catch-ups checkpoint as they go).
    #[arg(long = "poll-max-pages", env = "ELO_ORDER_INGEST_POLL_MAX_PAGES", default_value_t = 20)]
    pub poll_max_pages: usize,
    /// Orders per search page (Magento caps it at 300).
    #[arg(long = "poll-page-size", env = "ELO_ORDER_INGEST_POLL_PAGE_SIZE", default_value_t = 100)]
    pub poll_page_size: usize,
    /// Store views as `id=code:website`, comma separated (put on every event).
    #[arg(long = "magento-stores", env = "ELO_MAGENTO_STORES", default_value = "1=default:1,2=br:1", value_parser = parse_stores)]
    pub magento_stores: normalize::Stores,
    /// Check salable quantities (MSI) for every order and publish stock facts.
    #[arg(long = "inventory-checks", env = "ELO_ORDER_INGEST_INVENTORY_CHECKS", default_value_t = true, action = clap::ArgAction::Set)]
    pub inventory_checks: bool,
    /// MSI stock id the store sells from.
    #[arg(long = "stock-id", env = "ELO_MAGENTO_STOCK_ID", default_value_t = 1)]
    pub stock_id: i32,
    /// Salable quantity at or below which a SKU is reported LOW_STOCK.
    #[arg(long = "low-stock-threshold", env = "ELO_ORDER_INGEST_LOW_STOCK_THRESHOLD", default_value = "5")]
    pub low_stock_threshold: elo_events::Decimal4,
    /// How long a SKU's salable quantity is reused before asking Magento again.
    #[arg(long = "inventory-cache-ttl", env = "ELO_ORDER_INGEST_INVENTORY_CACHE_TTL", default_value = "30s", value_parser = elo_service::parse_duration)]
    pub inventory_cache_ttl: Duration,
    /// Orders placed longer ago than this get no stock check (`UNCHECKED`): today's stock says
    /// nothing about them. Units s, m, h, d.
    #[arg(long = "inventory-max-order-age", env = "ELO_ORDER_INGEST_INVENTORY_MAX_ORDER_AGE", default_value = "24h", value_parser = parse_age)]
    pub inventory_max_order_age: Duration,
    /// Magento REST requests in flight at once per path (push, poll and repair commands each
    /// have their own pool). Push throughput is about this over Magento's latency.
    #[arg(long = "magento-concurrency", env = "ELO_ORDER_INGEST_MAGENTO_CONCURRENCY", default_value_t = 32)]
    pub magento_concurrency: usize,
    /// Salable-quantity requests to Magento in flight at once.
    #[arg(long = "inventory-concurrency", env = "ELO_ORDER_INGEST_INVENTORY_CONCURRENCY", default_value_t = 32)]
    pub inventory_concurrency: usize,
    /// Push path: enrichment (consent, stock) taking longer than this is finished later; the
    /// order goes out `UNCHECKED`/`UNKNOWN` and the result follows as its own event (`0s`: wait).
    #[arg(long = "enrichment-budget", env = "ELO_ORDER_INGEST_ENRICHMENT_BUDGET", default_value = "250ms", value_parser = elo_service::parse_duration)]
    pub enrichment_budget: Duration,
    /// How long a customer's marketing consent is reused for their next orders.
    #[arg(long = "customer-cache-ttl", env = "ELO_ORDER_INGEST_CUSTOMER_CACHE_TTL", default_value = "60s", value_parser = elo_service::parse_duration)]
    pub customer_cache_ttl: Duration,
    /// Consumer group reading `integration.commands`.
    #[arg(
        long = "commands-group",
        env = "ELO_ORDER_INGEST_COMMANDS_GROUP",
        default_value = "elo-order-ingest-commands"
    )]
    pub commands_group: String,
    /// Compacted topic of erased customer keys: checked before anything is published, so an
    /// erased person's data is never republished by the poll, a backfill or a repair.
    #[arg(long = "erased-topic", env = "ELO_ORDER_INGEST_ERASED_TOPIC", default_value = "order-ingest.erased")]
    pub erased_topic: String,
    /// Dead-letter topic for commands that cannot be executed and polled records that cannot
    /// become events.
    #[arg(long = "dlq-topic", env = "ELO_ORDER_INGEST_DLQ_TOPIC", default_value = "order-ingest.dlq")]
    pub dlq_topic: String,
}

/// One-off jobs (the service runs without a subcommand).
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Republish what Magento changed since a date, with a progress bar, then exit.
    Backfill(backfill::BackfillArgs),
}

/// Every publish here waits for its acknowledgement (a webhook's 200 depends on it), so a
/// batching delay is pure latency when idle (measured: 4,009 webhooks/s, p99 14 ms with the
/// shared 5 ms default; 10,504/s, p99 8 ms with 0). librdkafka still batches whatever piles up
/// while requests are in flight, so batches form exactly when busy. An operator's own
/// `linger.ms` (`ELO_RDKAFKA_LINGER_MS` or `--kafka-option`) wins.
pub fn no_idle_linger(kafka: &mut elo_kafka::KafkaArgs) -> anyhow::Result<()> {
    let props = kafka.properties()?;
    if !props.contains_key("linger.ms") && !props.contains_key("queue.buffering.max.ms") {
        kafka.options.push(("linger.ms".to_owned(), "0".to_owned()));
    }
    Ok(())
}

/// The Magento REST client, authenticated as configured.
/// `downstream` names its pool in the HTTP client's metrics.
pub(crate) fn magento_source(config: &Config, downstream: &'static str) -> anyhow::Result<wiring::MagentoSource> {
    Ok(wiring::MagentoSource::with_concurrency(
        downstream,
        config.magento_url.clone(),
        magento_auth(config)?,
        config.magento_concurrency,
    )?)
}

/// How to authenticate to Magento, with the secrets read from their files.
pub fn magento_auth(config: &Config) -> anyhow::Result<wiring::MagentoAuth> {
    use anyhow::Context;
    let read = |path: &Option<std::path::PathBuf>, what: &str| -> anyhow::Result<String> {
        let path = path.as_ref().with_context(|| format!("ELO_MAGENTO_AUTH={what} needs its file"))?;
        Ok(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_owned())
    };
    Ok(match config.magento_auth {
        MagentoAuthKind::Admin => wiring::MagentoAuth::Admin {
            username: config.magento_username.clone(),
            password: magento_password(config)?,
        },
        MagentoAuthKind::Bearer => wiring::MagentoAuth::Bearer(read(&config.magento_token_file, "bearer")?),
        MagentoAuthKind::Oauth1 => {
            let json = read(&config.magento_oauth_file, "oauth1")?;
            let credentials = serde_json::from_str(&json).context(
                "ELO_MAGENTO_OAUTH_FILE: expected {\"consumer_key\", \"consumer_secret\", \"access_token\", \"access_token_secret\"}",
            )?;
            wiring::MagentoAuth::OAuth1(credentials)
        }
    })
}

/// Magento authentication schemes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MagentoAuthKind {
    /// Admin user and password (`ELO_MAGENTO_USERNAME`, `ELO_MAGENTO_PASSWORD_FILE`).
    Admin,
    /// An integration's access token as Bearer (`ELO_MAGENTO_TOKEN_FILE`).
    Bearer,
    /// An integration's OAuth 1.0a credentials (`ELO_MAGENTO_OAUTH_FILE`, JSON).
    Oauth1,
}

/// The admin password from `ELO_MAGENTO_PASSWORD_FILE`. Only a Magento on this machine (the
/// local sandbox) may go without one: a real store never gets a built-in password tried on it.
pub fn magento_password(config: &Config) -> anyhow::Result<String> {
    use anyhow::Context;
    match &config.magento_password_file {
        Some(path) => {
            Ok(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_owned())
        }
        None => {
            let host = config.magento_url.split("://").nth(1).unwrap_or_default();
            let local = ["127.0.0.1", "localhost", "[::1]"]
                .iter()
                .any(|h| host.strip_prefix(h).is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/'])));
            anyhow::ensure!(
                local,
                "ELO_MAGENTO_PASSWORD_FILE is required for {} (only the local sandbox has a default)",
                config.magento_url
            );
            Ok("elo-sandbox-admin1".to_owned())
        }
    }
}

/// The accepted webhook signatures from their files; `None` when none is configured.
pub fn webhook_verifier(config: &Config) -> anyhow::Result<Option<push::Verifier>> {
    use anyhow::Context;
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))
            .map(|s| s.trim().to_owned())
    };
    let mut hmac_secrets = Vec::new();
    for path in [&config.webhook_secret_file, &config.webhook_previous_secret_file].into_iter().flatten() {
        let secret = read(path)?;
        anyhow::ensure!(
            secret.len() >= 16,
            "the webhook secret in {} must have at least 16 characters",
            path.display()
        );
        hmac_secrets.push(secret);
    }
    let adobe_key = match &config.adobe_webhook_public_key_file {
        Some(path) => {
            let pem = read(path)?;
            let key = push::Verifier::adobe_key_from_pem(pem.as_bytes()).map_err(anyhow::Error::msg)?;
            Some(Arc::new(key))
        }
        None => None,
    };
    if hmac_secrets.is_empty() && adobe_key.is_none() {
        return Ok(None);
    }
    Ok(Some(push::Verifier { hmac_secrets, adobe_key, tolerance: config.webhook_tolerance }))
}

/// Where a poll without a checkpoint starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollStart {
    /// This long before the first round.
    Ago(Duration),
    /// At this time (ms, UTC).
    At(i64),
}

impl PollStart {
    /// The start as epoch milliseconds, given the time now.
    pub fn resolve(self, now_ms: i64) -> i64 {
        match self {
            Self::Ago(back) => now_ms - back.as_millis() as i64,
            Self::At(at) => at,
        }
    }
}

/// Parses `24h`, `7d`, `90m` or a UTC date (`2026-01-01`, `2026-01-01T08:00:00Z`).
pub fn parse_poll_start(text: &str) -> Result<PollStart, String> {
    parse_age(text).map(PollStart::Ago).or_else(|_| backfill::parse_from(text).map(PollStart::At))
}

/// A duration in s, m, h or d (`elo_service::parse_duration` stops at minutes).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let hours = |suffix: char, factor: u64| {
        text.strip_suffix(suffix)?.parse::<u64>().ok().map(|n| Duration::from_secs(n * factor * 3600))
    };
    match hours('h', 1).or_else(|| hours('d', 24)) {
        Some(age) => Ok(age),
        None => elo_service::parse_duration(text).map_err(|e| format!("{e}, h or d")),
    }
}

/// Parses `1=default:1,2=br:1`.
pub fn parse_stores(text: &str) -> Result<normalize::Stores, String> {
    let mut stores = std::collections::HashMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, rest) = entry.split_once('=').ok_or_else(|| format!("{entry:?}: expected id=code:website"))?;
        let (code, website) = rest.split_once(':').ok_or_else(|| format!("{entry:?}: expected id=code:website"))?;
        let id = id.parse().map_err(|_| format!("{entry:?}: store id is not a number"))?;
        let website = website.parse().map_err(|_| format!("{entry:?}: website id is not a number"))?;
        stores.insert(id, (code.to_owned(), website));
    }
    Ok(normalize::Stores(stores))
}

#[cfg(test)]
mod tests {
    #[test]
    fn store_lists_parse() {
        let stores = crate::config::parse_stores("1=default:1, 2=br:3").unwrap();
        assert_eq!(stores.0[&2], ("br".to_owned(), 3));
        assert!(crate::config::parse_stores("1=default").is_err());
        assert!(crate::config::parse_stores("x=default:1").is_err());
    }

    #[test]
    fn the_producer_does_not_linger_when_idle_unless_the_operator_says_so() {
        let mut kafka = elo_kafka::KafkaArgs::local("127.0.0.1:9092");
        crate::config::no_idle_linger(&mut kafka).unwrap();
        let producer = kafka.client_config_with(&[("linger.ms", "5")], &[]).unwrap();
        assert_eq!(producer.get("linger.ms"), Some("0"), "the shared default is overridden");
        let mut tuned = elo_kafka::KafkaArgs::local("127.0.0.1:9092");
        tuned.options.push(("linger.ms".into(), "20".into()));
        crate::config::no_idle_linger(&mut tuned).unwrap();
        assert_eq!(tuned.client_config_with(&[("linger.ms", "5")], &[]).unwrap().get("linger.ms"), Some("20"));
    }

    #[test]
    fn only_the_local_sandbox_has_a_default_admin_password() {
        use clap::Parser;
        let config = |url: &str| crate::config::Config::try_parse_from(["order-ingest", "--magento-url", url]).unwrap();
        assert!(crate::config::magento_password(&config("http://127.0.0.1:8701")).is_ok());
        assert!(crate::config::magento_password(&config("http://localhost:8701/")).is_ok());
        for remote in ["https://shop.example.com", "http://127.0.0.1.evil.example:80", "http://localhost.example"] {
            let error = crate::config::magento_password(&config(remote)).unwrap_err().to_string();
            assert!(error.contains("ELO_MAGENTO_PASSWORD_FILE"), "{remote}: {error}");
        }
    }

    #[test]
    fn a_poll_start_is_a_time_back_or_a_date() {
        use crate::config::{PollStart, parse_poll_start};
        use std::time::Duration;
        assert_eq!(parse_poll_start("24h"), Ok(PollStart::Ago(Duration::from_secs(86_400))));
        assert_eq!(parse_poll_start("7d"), Ok(PollStart::Ago(Duration::from_secs(7 * 86_400))));
        assert_eq!(parse_poll_start("90m"), Ok(PollStart::Ago(Duration::from_secs(5_400))));
        assert_eq!(parse_poll_start("1970-01-02"), Ok(PollStart::At(86_400_000)));
        assert!(parse_poll_start("soon").is_err());
        assert_eq!(PollStart::Ago(Duration::from_secs(1)).resolve(5_000), 4_000);
    }
}
