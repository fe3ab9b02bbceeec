//! Sweeps: read the source and the targets, within an API budget, and flag what the ledger
//! cannot see by itself.
//!
//! - **Magento window** (`magento`): orders updated in the last `--magento-sweep-window` (but
//!   not in the last `--sweep-grace`, whose webhooks may still be on their way) are compared
//!   with the ledger; a version the ledger lacks is `source_ahead` (a webhook Magento never
//!   delivered) and is refetched. An order the ledger has never seen belongs to the partition
//!   of its customer key (librdkafka's default partitioner, CRC32 of the key), so each replica
//!   flags only its own.
//! - **Salesforce by external id** (`salesforce`): the orders Salesforce confirmed are looked
//!   up by `Elo_Id__c` in batches of 200 (one SOQL query each); one it lacks is `missing`
//!   (deleted behind Elo's back) and resent. A cursor walks the ledger across rounds, so a
//!   round's budget bounds the calls however large the ledger is.
//!
//!   A second query per round asks for the orders whose `LastModifiedDate` is after the last
//!   round: one Salesforce changed after Elo's confirmed write (beyond the grace) is `altered`
//!   and resent too. The orders' Accounts are looked up by `Id` with each batch and by
//!   `LastModifiedDate` likewise ([`accounts`]).
//! - **RD Station contacts** (`rdstation`): the account's "all contacts" segmentation is listed
//!   (125 a page); a contact whose e-mail and name no longer match the fingerprint the ledger
//!   keeps for its customer is `altered`, one whose uuid RD reported and that is gone from a
//!   complete listing `missing`; both are resent to rdstation-sink, which rewrites the whole
//!   contact. A contact whose write the sink deferred is left alone for a while.
//!
//! Findings that a lagging ledger or a write in flight could explain (Magento versions, RD
//! contacts, Account edits) only count when a second round, `--sweep-grace` later, finds them
//! again.
//!
//! Each sweep spends at most `--<sweep>-sweep-calls-per-minute` (a `governor` rate limiter,
//! the workspace's) and `--<sweep>-sweep-max-calls` per round. The rate is the account's, not
//! the replica's: every replica runs the sweeps over the partitions it holds, and the
//! account-wide reads (the Magento window, the Salesforce `LastModifiedDate` query, the RD
//! listing) are made by each, so each replica spends the share of the rate its partitions
//! are of the whole (a call costs `partitions / held` of the limiter's cells, rounded up, from
//! the partitions held when the call is made): the replicas together stay within the rate, and
//! a replica holding nothing sweeps nothing.
//! The price: more replicas do not sweep faster (each reads the whole account at its share).

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use order_ingest::wiring::{MagentoAuth, MagentoSource};
use rdstation_sink::client::RdClient;
use tokio_util::sync::CancellationToken;

use crate::store::{CommandSink, Ledger};
use budget::{Budget, Cut};

mod accounts;
mod budget;
#[cfg(test)]
mod contact_tests;
mod magento;
mod rdstation;
mod salesforce;

pub use accounts::{
    AccountRef, AccountSuspects, accounts_in, confirm_account_edits, customers_point_at_accounts, missing_accounts,
    soql_accounts_by_id, soql_accounts_modified_since,
};
pub use magento::source_ahead;
pub use rdstation::{CONTACT_DEFERRED, ExpectedContact, contact_drift, expected_contacts, expected_in};
pub use salesforce::{
    edited_after, missing_ids, order_external_id, parse_sf_datetime, soql_by_external_ids, soql_modified_since,
};

/// Sweep settings.
#[derive(Clone, Debug, clap::Args)]
pub struct SweepArgs {
    /// Magento REST base URL (the sweep reads `GET /V1/orders` by `updated_at`).
    #[arg(long = "magento-url", env = "ELO_MAGENTO_URL", default_value = "http://127.0.0.1:8701")]
    pub magento_url: String,
    /// Magento admin user (`POST /V1/integration/admin/token`); ignored with a token file.
    #[arg(long = "magento-username", env = "ELO_MAGENTO_USERNAME", default_value = "admin")]
    pub magento_username: String,
    /// File holding the admin password (only a local sandbox may go without).
    #[arg(long = "magento-password-file", env = "ELO_MAGENTO_PASSWORD_FILE")]
    pub magento_password_file: Option<std::path::PathBuf>,
    /// File holding an integration access token, sent as Bearer (preferred over admin).
    #[arg(long = "magento-token-file", env = "ELO_MAGENTO_TOKEN_FILE")]
    pub magento_token_file: Option<std::path::PathBuf>,
    /// Magento store ids whose orders are swept.
    #[arg(
        long = "magento-store-ids",
        env = "ELO_RECONCILER_MAGENTO_STORE_IDS",
        default_value = "1,2",
        value_delimiter = ','
    )]
    pub magento_store_ids: Vec<i64>,
    /// How far back the Magento sweep looks (`0s`: no Magento sweep).
    #[arg(long = "magento-sweep-window", env = "ELO_RECONCILER_MAGENTO_SWEEP_WINDOW", default_value = "120m", value_parser = parse_duration)]
    pub magento_window: Duration,
    /// Time between two Magento sweeps.
    #[arg(long = "magento-sweep-interval", env = "ELO_RECONCILER_MAGENTO_SWEEP_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub magento_interval: Duration,
    /// Magento searches per minute at most.
    #[arg(long = "magento-sweep-calls-per-minute", env = "ELO_RECONCILER_MAGENTO_SWEEP_CALLS_PER_MINUTE", default_value_t = NonZeroU32::new(60).expect("non-zero"))]
    pub magento_per_minute: NonZeroU32,
    /// Magento searches per sweep round at most.
    #[arg(long = "magento-sweep-max-calls", env = "ELO_RECONCILER_MAGENTO_SWEEP_MAX_CALLS", default_value_t = 100)]
    pub magento_max_calls: u64,
    /// Orders per Magento search page.
    #[arg(long = "magento-sweep-page-size", env = "ELO_RECONCILER_MAGENTO_SWEEP_PAGE_SIZE", default_value_t = 100)]
    pub magento_page_size: usize,
    /// Versions younger than this are left to the webhook and the sinks (no false drift).
    #[arg(long = "sweep-grace", env = "ELO_RECONCILER_SWEEP_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Time between two Salesforce sweeps (`0s`: no Salesforce sweep).
    #[arg(long = "salesforce-sweep-interval", env = "ELO_RECONCILER_SALESFORCE_SWEEP_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub salesforce_interval: Duration,
    /// Salesforce queries per minute at most.
    #[arg(long = "salesforce-sweep-calls-per-minute", env = "ELO_RECONCILER_SALESFORCE_SWEEP_CALLS_PER_MINUTE", default_value_t = NonZeroU32::new(30).expect("non-zero"))]
    pub salesforce_per_minute: NonZeroU32,
    /// Salesforce queries per sweep round at most (200 orders each).
    #[arg(
        long = "salesforce-sweep-max-calls",
        env = "ELO_RECONCILER_SALESFORCE_SWEEP_MAX_CALLS",
        default_value_t = 50
    )]
    pub salesforce_max_calls: u64,
    /// External-id field of Salesforce orders.
    #[arg(
        long = "salesforce-order-external-id",
        env = "ELO_RECONCILER_SALESFORCE_ORDER_EXTERNAL_ID",
        default_value = "Elo_Id__c"
    )]
    pub salesforce_order_field: String,
    #[command(flatten)]
    pub salesforce: salesforce_sink::SalesforceArgs,
    /// Time between two RD Station sweeps (`0s`: no RD Station sweep).
    #[arg(long = "rdstation-sweep-interval", env = "ELO_RECONCILER_RDSTATION_SWEEP_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub rd_interval: Duration,
    /// RD segmentation listing every contact [default: the account's first standard one].
    #[arg(long = "rdstation-sweep-segmentation", env = "ELO_RECONCILER_RDSTATION_SWEEP_SEGMENTATION")]
    pub rd_segmentation: Option<u64>,
    /// RD listing calls per minute at most (RD allows 120 per account for segmentations).
    #[arg(long = "rdstation-sweep-calls-per-minute", env = "ELO_RECONCILER_RDSTATION_SWEEP_CALLS_PER_MINUTE", default_value_t = NonZeroU32::new(20).expect("non-zero"))]
    pub rd_per_minute: NonZeroU32,
    /// How long a contact whose write rdstation-sink deferred (its outcome says
    /// `contact_deferred`) is left alone: the sink's deferred-writes pass lands it later and
    /// publishes no outcome of its own.
    #[arg(long = "rdstation-sweep-deferred-hold", env = "ELO_RECONCILER_RDSTATION_SWEEP_DEFERRED_HOLD", default_value = "60m", value_parser = parse_duration)]
    pub rd_deferred_hold: Duration,
    /// RD listing calls per round at most (125 contacts each).
    #[arg(long = "rdstation-sweep-max-calls", env = "ELO_RECONCILER_RDSTATION_SWEEP_MAX_CALLS", default_value_t = 200)]
    pub rd_max_calls: u64,
    /// RD Station Marketing API base URL.
    #[arg(long = "rd-url", env = "ELO_RDSTATION_URL", default_value = "http://127.0.0.1:8703")]
    pub rd_url: String,
    /// OAuth client id of the RD Station app.
    #[arg(long = "rd-client-id", env = "ELO_RDSTATION_CLIENT_ID", default_value = "elo-rd-client")]
    pub rd_client_id: String,
    /// File holding the OAuth client secret.
    #[arg(long = "rd-client-secret-file", env = "ELO_RDSTATION_CLIENT_SECRET_FILE")]
    pub rd_client_secret_file: Option<std::path::PathBuf>,
    /// File holding the OAuth refresh token.
    #[arg(long = "rd-refresh-token-file", env = "ELO_RDSTATION_REFRESH_TOKEN_FILE")]
    pub rd_refresh_token_file: Option<std::path::PathBuf>,
    /// Local development: the sandbox control API that issues authorization codes when no
    /// refresh token file is given (loopback RD URLs only).
    #[arg(long = "rd-sandbox-control", env = "ELO_RDSTATION_SANDBOX_CONTROL", default_value = "http://127.0.0.1:8700")]
    pub rd_sandbox_control: String,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    elo_service::parse_duration(text)
}

/// What the sweeps did since start, per sweep.
#[derive(Default, Debug)]
pub struct Progress {
    pub calls: AtomicU64,
    pub checked: AtomicU64,
    pub found: AtomicU64,
    pub rounds: AtomicU64,
}

/// Findings that must hold across two rounds, `grace` apart, before they count: a version
/// the ledger has not read yet (consumer lag) or a contact a newer event is rewriting is
/// not drift, and will be gone by the next round.
#[derive(Default)]
pub struct Suspects {
    first_seen: std::sync::Mutex<HashMap<String, i64>>,
    /// For [`Suspects::merge`]: (first seen, last seen) per finding.
    seen: std::sync::Mutex<HashMap<String, (i64, i64)>>,
}

impl Suspects {
    /// Replaces the suspects with this round's `found`; returns those already suspected at
    /// least `grace` ago (the confirmed findings).
    pub fn confirm(&self, found: &[String], grace: i64, now: i64) -> BTreeSet<String> {
        let mut first_seen = self.first_seen.lock().expect("suspects");
        let next: HashMap<String, i64> =
            found.iter().map(|k| (k.clone(), first_seen.get(k).copied().unwrap_or(now))).collect();
        *first_seen = next;
        first_seen.iter().filter(|(_, t)| now - **t >= grace).map(|(k, _)| k.clone()).collect()
    }

    /// For a sweep that covers its window in parts (a round cut short by its budget or an
    /// error): adds this part's `found` to the suspects instead of replacing them, forgets
    /// suspects not seen again within `horizon`, and returns those of `found` first seen at
    /// least `grace` ago. A finding of part A thus survives the rounds that cover part B.
    pub fn merge(&self, found: &[String], grace: i64, horizon: i64, now: i64) -> BTreeSet<String> {
        let mut seen = self.seen.lock().expect("suspects");
        seen.retain(|_, (_, last)| now - *last <= horizon);
        let mut out = BTreeSet::new();
        for k in found {
            let slot = seen.entry(k.clone()).or_insert((now, now));
            slot.1 = now;
            if now - slot.0 >= grace {
                out.insert(k.clone());
            }
        }
        out
    }
}

/// The partition librdkafka's default partitioner (`consistent_random`) gives a key: CRC32
/// (IEEE, as zlib) of the key modulo the partition count.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    let mut crc: u32 = !0;
    for &byte in key.as_bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    ((!crc) % partitions.max(1) as u32) as i32
}

/// The partition count `topic` really has: the Magento sweep must place customers where the
/// producers did, whatever `ELO_TOPIC_PARTITIONS` says. `configured` when it cannot be read.
pub async fn topic_partitions(kafka: &elo_kafka::KafkaArgs, topic: &str, configured: i32) -> i32 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (kafka, name) = (kafka.clone(), topic.to_owned());
    let found = tokio::task::spawn_blocking(move || -> Option<i32> {
        let consumer: BaseConsumer = kafka.client_config(&[]).ok()?.create().ok()?;
        let metadata = consumer.fetch_metadata(Some(&name), Duration::from_secs(10)).ok()?;
        let n = metadata.topics().first()?.partitions().len() as i32;
        (n > 0).then_some(n)
    })
    .await
    .ok()
    .flatten();
    match found {
        Some(n) if n != configured => {
            tracing::warn!(
                topic,
                actual = n,
                configured,
                "topic partition count differs from the configured one; using the actual count"
            );
            n
        }
        Some(n) => n,
        None => {
            tracing::warn!(topic, configured, "cannot read the topic's partition count; using the configured one");
            configured
        }
    }
}

/// The configured sweeps.
pub struct Sweeps {
    args: SweepArgs,
    partitions: i32,
    magento: Option<(MagentoSource, Budget)>,
    salesforce: Option<(salesforce_sink::client::SalesforceClient, Budget)>,
    rdstation: Option<(RdClient, Budget)>,
    magento_suspects: Suspects,
    rd_suspects: Suspects,
    account_suspects: std::sync::Mutex<accounts::AccountSuspects>,
    /// The Account external-id field (salesforce-sink's mapping): the customer key it was
    /// created for.
    account_external_id: String,
    /// Where the RD listing resumes (page) and what it read so far, across rounds.
    rd_listing: std::sync::Mutex<rdstation::Listing>,
}

impl Sweeps {
    pub fn new(args: &SweepArgs, partitions: i32) -> anyhow::Result<Self> {
        let magento = if args.magento_window.is_zero() {
            None
        } else {
            let source = MagentoSource::new("magento-sweep", args.magento_url.clone(), magento_auth(args)?)?;
            Some((source, Budget::new("magento", args.magento_per_minute, args.magento_max_calls)))
        };
        let account_external_id =
            salesforce_sink::mapping::Mapping::load(args.salesforce.mapping_file.as_deref())?.resolve()?.ids.account;
        let salesforce = if args.salesforce_interval.is_zero() {
            None
        } else {
            let client = salesforce_sink::build_client(&args.salesforce)?;
            Some((client, Budget::new("salesforce", args.salesforce_per_minute, args.salesforce_max_calls)))
        };
        let rdstation = if args.rd_interval.is_zero() {
            None
        } else {
            let client = RdClient::new(rdstation::rd_settings(args)?)?;
            Some((client, Budget::new("rdstation", args.rd_per_minute, args.rd_max_calls)))
        };
        Ok(Self {
            args: args.clone(),
            partitions,
            magento,
            salesforce,
            rdstation,
            magento_suspects: Suspects::default(),
            rd_suspects: Suspects::default(),
            account_suspects: std::sync::Mutex::default(),
            account_external_id,
            rd_listing: std::sync::Mutex::new((1, HashMap::new())),
        })
    }

    /// Places customers on `partitions` partitions (see [`topic_partitions`]).
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Progress counters of each configured sweep, by name.
    pub fn progress(&self) -> Vec<(&'static str, Arc<Progress>)> {
        let mut out = Vec::new();
        if let Some((_, b)) = &self.magento {
            out.push((b.name, b.progress.clone()));
        }
        if let Some((_, b)) = &self.salesforce {
            out.push((b.name, b.progress.clone()));
        }
        if let Some((_, b)) = &self.rdstation {
            out.push((b.name, b.progress.clone()));
        }
        out
    }

    /// Runs every configured sweep on its interval until shutdown.
    pub async fn run<C: CommandSink>(self, ledger: Arc<Ledger<C>>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let magento = {
            let (this, ledger, shutdown) = (this.clone(), ledger.clone(), shutdown.clone());
            async move {
                if this.magento.is_none() {
                    return;
                }
                let mut cursor = None;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(this.args.magento_interval) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    tokio::select! {
                        c = this.magento_round(&ledger, cursor.take()) => cursor = c,
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        let salesforce = {
            let (this, ledger, shutdown) = (this.clone(), ledger.clone(), shutdown.clone());
            async move {
                if this.salesforce.is_none() {
                    return;
                }
                let mut cursor = String::new();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(this.args.salesforce_interval) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    tokio::select! {
                        c = this.salesforce_round(&ledger, std::mem::take(&mut cursor)) => cursor = c,
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        let rdstation = {
            let (this, ledger, shutdown) = (this.clone(), ledger.clone(), shutdown.clone());
            async move {
                if this.rdstation.is_none() {
                    return;
                }
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(this.args.rd_interval) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    tokio::select! {
                        _ = this.rdstation_round(&ledger) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        tokio::join!(magento, salesforce, rdstation);
    }
}

/// Magento credentials: a Bearer token file, else the admin user (the local sandbox's
/// password when no file is given and Magento is on this machine).
fn magento_auth(args: &SweepArgs) -> anyhow::Result<MagentoAuth> {
    use anyhow::Context;
    let read = |path: &std::path::Path| -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_owned())
    };
    if let Some(path) = &args.magento_token_file {
        return Ok(MagentoAuth::Bearer(read(path)?));
    }
    let password = match &args.magento_password_file {
        Some(path) => read(path)?,
        None => {
            let host = args.magento_url.split("://").nth(1).unwrap_or_default();
            let local = ["127.0.0.1", "localhost"].iter().any(|h| host.starts_with(h));
            anyhow::ensure!(
                local,
                "ELO_MAGENTO_PASSWORD_FILE or ELO_MAGENTO_TOKEN_FILE is required for {}",
                args.magento_url
            );
            "elo-sandbox-admin1".to_owned()
        }
    };
    Ok(MagentoAuth::Admin { username: args.magento_username.clone(), password })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_librdkafkas_default_partitioner() {
        // CRC32 check value of the IEEE polynomial.
        assert_eq!(partition_for("123456789", i32::MAX), (0xCBF4_3926u32 % i32::MAX as u32) as i32);
        assert_eq!(partition_for("123456789", 6), (0xCBF4_3926u32 % 6) as i32);
        for key in ["c:1", "c:2", "g:abc"] {
            assert!((0..6).contains(&partition_for(key, 6)));
        }
    }

    #[test]
    fn a_finding_counts_once_it_held_for_the_grace_period() {
        let s = Suspects::default();
        let found = |keys: &[&str]| keys.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
        assert!(s.confirm(&found(&["a", "b"]), 10, 100).is_empty(), "first sighting");
        assert!(s.confirm(&found(&["a", "b"]), 10, 105).is_empty(), "not yet the grace period");
        assert!(s.confirm(&found(&["a"]), 10, 110).contains("a"));
        assert!(s.confirm(&found(&["a", "b"]), 10, 115).len() == 1, "b went away and starts over");
    }

    #[test]
    fn findings_of_a_window_covered_in_parts_are_confirmed() {
        // Two parts per window; each round covers one part, alternately.
        let s = Suspects::default();
        let part_a = vec!["order:1@5".to_owned()];
        let part_b = vec!["order:9@7".to_owned()];
        let mut confirmed = BTreeSet::new();
        for round in 0..6i64 {
            let found = if round % 2 == 0 { &part_a } else { &part_b };
            confirmed.extend(s.merge(found, 10, 1_000, 100 + round * 10));
        }
        assert!(confirmed.contains("order:1@5") && confirmed.contains("order:9@7"), "{confirmed:?}");
        assert!(s.merge(&part_a, 10, 1_000, 10_000).is_empty(), "not seen within the horizon: starts over");
    }
}
