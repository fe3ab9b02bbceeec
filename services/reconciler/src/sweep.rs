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
//!   and resent too.
//! - **RD Station contacts** (`rdstation`): the account's "all contacts" segmentation is listed
//!   (125 a page); a contact whose e-mail and name no longer match the fingerprint the ledger
//!   keeps for its customer is `altered`, one gone from a complete listing `missing`; both are
//!   resent to rdstation-sink, which rewrites the whole contact.
//!
//! Findings that a lagging ledger or a write in flight could explain (Magento versions, RD
//! contacts) only count when a second round, `--sweep-grace` later, finds them again.
//!
//! Each sweep spends at most `--<sweep>-sweep-calls-per-minute` (a `governor` rate limiter,
//! the workspace's) and `--<sweep>-sweep-max-calls` per round.

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use order_ingest::poll::{Entity, EntitySearch, Keyset};
use order_ingest::wiring::{MagentoAuth, MagentoSource};
use rdstation_sink::client::{Budget as RdBudget, RdClient, RdSettings};
use reqwest::Method;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::ledger::{DriftKind, Entry, Health};
use crate::metrics;
use crate::repair::SOURCE;
use crate::store::{CommandSink, Ledger, now_ms};

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
}

/// A sweep's API budget: a rate and a cap per round.
struct Budget {
    name: &'static str,
    limiter: DefaultDirectRateLimiter,
    per_round: u64,
    progress: Arc<Progress>,
}

impl Budget {
    fn new(name: &'static str, per_minute: NonZeroU32, per_round: u64) -> Self {
        Self { name, limiter: RateLimiter::direct(Quota::per_minute(per_minute)), per_round, progress: Arc::default() }
    }

    /// Waits for the rate limiter and counts the call; `false` when the round's cap is spent.
    async fn spend(&self, spent_this_round: &mut u64) -> bool {
        if *spent_this_round >= self.per_round {
            return false;
        }
        self.limiter.until_ready().await;
        *spent_this_round += 1;
        self.progress.calls.fetch_add(1, Ordering::Relaxed);
        metrics::SWEEP_CALLS.with_label_values(&[self.name]).inc();
        true
    }

    fn checked(&self, n: u64) {
        self.progress.checked.fetch_add(n, Ordering::Relaxed);
        metrics::SWEEP_CHECKED.with_label_values(&[self.name]).inc_by(n);
    }

    fn round(&self, result: &'static str) {
        self.progress.rounds.fetch_add(1, Ordering::Relaxed);
        metrics::SWEEP_ROUNDS.with_label_values(&[self.name, result]).inc();
        if result == "complete" {
            metrics::SWEEP_LAST.with_label_values(&[self.name]).set(now_ms() / 1000);
        }
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

/// Whether Magento's version of an entity is newer than anything the ledger saw.
pub fn source_ahead(entry: Option<&Entry>, magento_version: i64) -> bool {
    entry.is_none_or(|e| e.version < magento_version)
}

/// `SELECT <field> FROM Order WHERE <field> IN ('o:1','o:2')` (ids are Elo's own, quoted).
pub fn soql_by_external_ids(field: &str, ids: &[String]) -> String {
    let quoted: Vec<String> =
        ids.iter().map(|id| format!("'{}'", id.replace('\\', "\\\\").replace('\'', "\\'"))).collect();
    format!("SELECT {field} FROM Order WHERE {field} IN ({})", quoted.join(","))
}

/// The asked ids a query result lacks.
pub fn missing_ids(asked: &[String], records: &[Value], field: &str) -> Vec<String> {
    let found: BTreeSet<&str> = records.iter().filter_map(|r| r.get(field).and_then(Value::as_str)).collect();
    asked.iter().filter(|id| !found.contains(id.as_str())).cloned().collect()
}

/// `SELECT <field>, LastModifiedDate FROM Order WHERE LastModifiedDate > <since> LIMIT 2000`:
/// orders someone changed since the last round (one call: 2000 is a query page).
pub fn soql_modified_since(field: &str, since_ms: i64) -> String {
    let at = order_ingest::normalize::format_magento_time(since_ms.max(0)).replace(' ', "T");
    format!(
        "SELECT {field}, LastModifiedDate FROM Order WHERE LastModifiedDate > {at}Z ORDER BY LastModifiedDate ASC LIMIT 2000"
    )
}

/// Salesforce's `2026-11-30T08:00:00.000+0000` (UTC), to the second.
pub fn parse_sf_datetime(text: &str) -> Option<i64> {
    order_ingest::normalize::parse_magento_time(text.get(..19)?)
}

/// Whether Salesforce changed a record after Elo's write was confirmed (`confirmed_ms`, when
/// the outcome was read, later than the write itself) by more than `grace_ms`: someone else
/// edited it.
pub fn edited_after(confirmed_ms: i64, last_modified_ms: i64, grace_ms: i64) -> bool {
    last_modified_ms > confirmed_ms + grace_ms
}

/// The external id the salesforce-sink gives an order.
pub fn order_external_id(entity_id: &str) -> String {
    format!("o:{entity_id}")
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
    /// Where the next `LastModifiedDate` pass starts (Unix ms; 0: one interval back).
    salesforce_modified_since: std::sync::atomic::AtomicI64,
}

impl Sweeps {
    pub fn new(args: &SweepArgs, partitions: i32) -> anyhow::Result<Self> {
        let magento = if args.magento_window.is_zero() {
            None
        } else {
            let source = MagentoSource::new("magento-sweep", args.magento_url.clone(), magento_auth(args)?)?;
            Some((source, Budget::new("magento", args.magento_per_minute, args.magento_max_calls)))
        };
        let salesforce = if args.salesforce_interval.is_zero() {
            None
        } else {
            let client = salesforce_sink::build_client(&args.salesforce)?;
            Some((client, Budget::new("salesforce", args.salesforce_per_minute, args.salesforce_max_calls)))
        };
        let rdstation = if args.rd_interval.is_zero() {
            None
        } else {
            let client = RdClient::new(rd_settings(args)?)?;
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
            salesforce_modified_since: std::sync::atomic::AtomicI64::new(0),
        })
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

    /// One Magento round from `resume` (a round cut by its budget resumes there next time).
    /// Returns where to resume, `None` when the window was covered.
    pub async fn magento_round<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        resume: Option<(usize, Keyset)>,
    ) -> Option<(usize, Keyset)> {
        let (source, budget) = self.magento.as_ref()?;
        let now = now_ms();
        let until = now - self.args.grace.as_millis() as i64;
        let (mut store_index, mut after) =
            resume.unwrap_or((0, Keyset::new(now - self.args.magento_window.as_millis() as i64, 0)));
        let mut spent = 0;
        let mut suspects: Vec<(String, i32, i64, elo_events::CommerceEvent)> = Vec::new();
        let stores = &self.args.magento_store_ids;
        while store_index < stores.len() {
            let store_id = stores[store_index];
            if !budget.spend(&mut spent).await {
                budget.round("partial");
                return Some((store_index, after));
            }
            let items = match source.page_after(Entity::Orders, store_id, after, self.args.magento_page_size).await {
                Ok((items, _)) => items,
                Err(error) => {
                    tracing::warn!(error = %error, store_id, "magento sweep: search failed; next round resumes here");
                    budget.round("failed");
                    return Some((store_index, after));
                }
            };
            let mut reached_grace = items.len() < self.args.magento_page_size;
            for item in &items {
                let Ok(event) = order_ingest::normalize::order_event(item, None, &Default::default(), 0) else {
                    continue; // order-ingest parks those itself
                };
                let version = event.source_version.updated_at;
                if version > until {
                    reached_grace = true;
                    break;
                }
                after = Keyset::new(version, event.order.as_ref().map_or(0, |o| o.entity_id));
                budget.checked(1);
                let partition = partition_for(&event.customer_key, self.partitions);
                if !ledger.partitions().contains(&partition) {
                    continue; // another replica's
                }
                let key = crate::ledger::key("order", &event.source_version.entity_id);
                if source_ahead(ledger.store.get(partition, &key).as_ref(), version) {
                    suspects.push((key, partition, version, event));
                }
            }
            if reached_grace {
                store_index += 1;
                after = Keyset::new(now - self.args.magento_window.as_millis() as i64, 0);
            }
        }
        let names: Vec<String> = suspects.iter().map(|(k, _, v, _)| format!("{k}@{v}")).collect();
        let confirmed = self.magento_suspects.confirm(&names, self.args.grace.as_millis() as i64, now_ms());
        for (key, partition, version, event) in suspects {
            if !confirmed.contains(&format!("{key}@{version}"))
                || !source_ahead(ledger.store.get(partition, &key).as_ref(), version)
            {
                continue;
            }
            let found = ledger
                .flag(partition, &key, SOURCE, DriftKind::SourceAhead, version, || Entry::for_event(&event))
                .await;
            match found {
                Ok(true) => {
                    budget.progress.found.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(error = %error, key, "magento sweep: cannot record drift"),
            }
        }
        budget.round("complete");
        None
    }

    /// One Salesforce round over the confirmed orders after `cursor` (a ledger key); returns
    /// where the next round starts (empty: from the beginning).
    pub async fn salesforce_round<C: CommandSink>(&self, ledger: &Ledger<C>, cursor: String) -> String {
        let Some((client, budget)) = self.salesforce.as_ref() else { return String::new() };
        let field = &self.args.salesforce_order_field;
        let now = now_ms();
        let grace = self.args.grace.as_millis() as i64;
        let sla = ledger.policy.targets.iter().find(|t| t.name == "salesforce").map(|t| t.sla).unwrap_or_default();
        // (key, partition, external id) of every order Salesforce confirmed a while ago.
        let mut orders: Vec<(String, i32, String)> = Vec::new();
        for partition in ledger.partitions() {
            for (key, entry) in ledger.store.entries(partition) {
                let confirmed_at = entry.targets.get("salesforce").map_or(i64::MAX, |t| t.at_ms);
                if entry.kind == "order"
                    && entry.health("salesforce", sla, now) == Health::Confirmed
                    && now - confirmed_at > grace
                {
                    orders.push((key, partition, order_external_id(&entry.entity_id)));
                }
            }
        }
        orders.sort();
        let start = orders.partition_point(|(k, ..)| k.as_str() <= cursor.as_str());
        let mut spent = 0;
        let mut next = String::new();
        for chunk in orders[start..].chunks(200) {
            if !budget.spend(&mut spent).await {
                budget.round("partial");
                return next;
            }
            let ids: Vec<String> = chunk.iter().map(|(.., id)| id.clone()).collect();
            let records = match client.query(&soql_by_external_ids(field, &ids)).await {
                Ok(r) => r,
                Err(error) => {
                    tracing::warn!(error = %error, "salesforce sweep: query failed; next round resumes here");
                    budget.round("failed");
                    return next;
                }
            };
            budget.checked(chunk.len() as u64);
            let missing: BTreeSet<String> = missing_ids(&ids, &records, field).into_iter().collect();
            for (key, partition, id) in chunk {
                if !missing.contains(id) {
                    continue;
                }
                match ledger.flag(*partition, key, "salesforce", DriftKind::Missing, 0, Entry::default).await {
                    Ok(true) => {
                        budget.progress.found.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(error) => tracing::warn!(error = %error, key, "salesforce sweep: cannot record drift"),
                }
            }
            next.clone_from(&chunk[chunk.len() - 1].0);
        }
        if !self.salesforce_edits(ledger, client, budget, &mut spent).await {
            return next;
        }
        budget.round("complete");
        String::new()
    }

    /// The `LastModifiedDate` pass: orders changed in Salesforce after Elo's confirmed write
    /// are `altered`. Returns false when the budget or an error cut it short (it resumes from
    /// the same point next round).
    async fn salesforce_edits<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        client: &salesforce_sink::client::SalesforceClient,
        budget: &Budget,
        spent: &mut u64,
    ) -> bool {
        let field = &self.args.salesforce_order_field;
        let grace = self.args.grace.as_millis() as i64;
        let started = now_ms();
        let sla = ledger.policy.targets.iter().find(|t| t.name == "salesforce").map(|t| t.sla).unwrap_or_default();
        let mut since = self.salesforce_modified_since.load(Ordering::Relaxed);
        if since == 0 {
            since = started - self.args.salesforce_interval.as_millis() as i64 - grace;
        }
        if !budget.spend(spent).await {
            budget.round("partial");
            return false;
        }
        let records = match client.query(&soql_modified_since(field, since)).await {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(error = %error, "salesforce sweep: LastModifiedDate query failed");
                budget.round("failed");
                return false;
            }
        };
        let mut last_seen = since;
        for record in &records {
            let (Some(external), Some(modified)) = (
                record.get(field).and_then(Value::as_str),
                record.get("LastModifiedDate").and_then(Value::as_str).and_then(parse_sf_datetime),
            ) else {
                continue;
            };
            last_seen = last_seen.max(modified);
            let Some(id) = external.strip_prefix("o:") else { continue };
            let key = crate::ledger::key("order", id);
            let Some((partition, entry)) =
                ledger.partitions().into_iter().find_map(|p| ledger.store.get(p, &key).map(|e| (p, e)))
            else {
                continue; // another replica's, or not in the ledger
            };
            // Only a record whose latest version Salesforce confirmed: a newer version the sink
            // is writing now is not an edit.
            let Some(confirmed) = entry.targets.get("salesforce") else { continue };
            if entry.health("salesforce", sla, started) != Health::Confirmed
                || !edited_after(confirmed.at_ms, modified, grace)
            {
                continue;
            }
            match ledger.flag(partition, &key, "salesforce", DriftKind::Altered, 0, Entry::default).await {
                Ok(true) => {
                    budget.progress.found.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(error = %error, key, "salesforce sweep: cannot record drift"),
            }
        }
        budget.checked(records.len() as u64);
        // A full page may hold more: go on from its last change; otherwise from this round's
        // start (minus the grace, for clock skew).
        let next = if records.len() >= 2000 { last_seen } else { started - grace };
        self.salesforce_modified_since.store(next, Ordering::Relaxed);
        true
    }
}

impl Sweeps {
    /// One RD Station round: lists the contacts segmentation page by page (125 a call) and
    /// compares each contact Elo wrote with the ledger's fingerprint. A contact missing from
    /// the list is only judged when the whole list was read.
    pub async fn rdstation_round<C: CommandSink>(&self, ledger: &Ledger<C>) {
        let Some((client, budget)) = self.rdstation.as_ref() else { return };
        let now = now_ms();
        let expected = expected_contacts(ledger, self.args.grace.as_millis() as i64, now);
        let mut spent = 0;
        let segmentation = match self.args.rd_segmentation {
            Some(id) => id,
            None => {
                if !budget.spend(&mut spent).await {
                    budget.round("partial");
                    return;
                }
                match client.request(Method::GET, "/platform/segmentations", None, RdBudget::None).await {
                    Ok(body) => match standard_segmentation(&body) {
                        Some(id) => id,
                        None => {
                            tracing::warn!(
                                "rdstation sweep: the account has no standard segmentation; set --rdstation-sweep-segmentation"
                            );
                            budget.round("failed");
                            return;
                        }
                    },
                    Err(error) => {
                        tracing::warn!(error = %error, "rdstation sweep: cannot list segmentations");
                        budget.round("failed");
                        return;
                    }
                }
            }
        };
        let mut listed: HashMap<String, String> = HashMap::new();
        let mut complete = false;
        for page in 1.. {
            if !budget.spend(&mut spent).await {
                break;
            }
            let path = format!("/platform/segmentations/{segmentation}/contacts?page={page}&page_size=125");
            let body = match client.request(Method::GET, &path, None, RdBudget::None).await {
                Ok(body) => body,
                Err(error) => {
                    tracing::warn!(error = %error, "rdstation sweep: listing failed");
                    break;
                }
            };
            let rows = body.get("contacts").and_then(Value::as_array).cloned().unwrap_or_default();
            for row in &rows {
                if let Some(uuid) = row.get("uuid").and_then(Value::as_str) {
                    let email = row.get("email").and_then(Value::as_str).unwrap_or_default();
                    let name = row.get("name").and_then(Value::as_str).unwrap_or_default();
                    listed.insert(uuid.to_owned(), crate::ledger::contact_fp(email, name));
                }
            }
            if rows.len() < 125 {
                complete = true;
                break;
            }
        }
        budget.checked(expected.len() as u64);
        let drift = contact_drift(&expected, &listed, complete);
        let names: Vec<String> = drift.iter().map(|(uuid, kind)| format!("{uuid}:{}", kind.as_str())).collect();
        let confirmed = self.rd_suspects.confirm(&names, self.args.grace.as_millis() as i64, now_ms());
        for (uuid, kind) in drift {
            if !confirmed.contains(&format!("{uuid}:{}", kind.as_str())) {
                continue;
            }
            let Some(c) = expected.iter().find(|c| c.uuid == uuid) else { continue };
            match ledger.flag(c.partition, &c.key, "rdstation", kind, 0, Entry::default).await {
                Ok(true) => {
                    budget.progress.found.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(error = %error, key = %c.key, "rdstation sweep: cannot record drift"),
            }
        }
        budget.round(if complete { "complete" } else { "partial" });
    }
}

/// A contact the ledger expects in RD Station.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedContact {
    pub uuid: String,
    pub fp: String,
    pub partition: i32,
    /// The ledger entry whose customer block the contact follows (the one flagged).
    pub key: String,
}

/// Per customer: the newest contact print, the contact uuid RD reported, when RD confirmed
/// that entry's latest version more than `grace` ago and no drift is open on it.
pub fn expected_contacts<C: CommandSink>(ledger: &Ledger<C>, grace: i64, now: i64) -> Vec<ExpectedContact> {
    let sla = ledger.policy.targets.iter().find(|t| t.name == "rdstation").map(|t| t.sla).unwrap_or_default();
    let mut out = Vec::new();
    for partition in ledger.partitions() {
        out.extend(expected_in(partition, &ledger.store.entries(partition), sla, grace, now));
    }
    out
}

/// [`expected_contacts`] over one partition's entries.
pub fn expected_in(
    partition: i32,
    entries: &[(String, Entry)],
    sla: Duration,
    grace: i64,
    now: i64,
) -> Vec<ExpectedContact> {
    let mut best: HashMap<&str, (&str, &Entry)> = HashMap::new();
    let mut uuids: HashMap<&str, (i64, &str)> = HashMap::new();
    for (key, entry) in entries {
        if let Some(t) = entry.targets.get("rdstation")
            && let Some(uuid) = t.ids.get("contact_uuid")
        {
            let slot = uuids.entry(&entry.customer_key).or_insert((t.at_ms, uuid));
            if t.at_ms >= slot.0 {
                *slot = (t.at_ms, uuid);
            }
        }
        if let Some(print) = &entry.contact {
            let slot = best.entry(&entry.customer_key).or_insert((key, entry));
            if slot.1.contact.as_ref().is_none_or(|p| print.version > p.version) {
                *slot = (key, entry);
            }
        }
    }
    let mut out = Vec::new();
    for (customer, (key, entry)) in best {
        let Some((_, uuid)) = uuids.get(customer) else { continue };
        let settled = entry.health("rdstation", sla, now) == Health::Confirmed
            && entry.targets.get("rdstation").is_some_and(|t| now - t.at_ms > grace);
        if let (true, Some(print)) = (settled, &entry.contact) {
            out.push(ExpectedContact {
                uuid: (*uuid).to_owned(),
                fp: print.fp.clone(),
                partition,
                key: key.to_owned(),
            });
        }
    }
    out
}

/// Contacts that differ from the ledger (`altered`) or, when the listing is `complete`, are
/// gone (`missing`).
pub fn contact_drift(
    expected: &[ExpectedContact],
    listed: &HashMap<String, String>,
    complete: bool,
) -> Vec<(String, DriftKind)> {
    expected
        .iter()
        .filter_map(|c| match listed.get(&c.uuid) {
            Some(fp) if *fp != c.fp => Some((c.uuid.clone(), DriftKind::Altered)),
            None if complete => Some((c.uuid.clone(), DriftKind::Missing)),
            _ => None,
        })
        .collect()
}

/// The id of the first standard segmentation (RD's "all contacts").
fn standard_segmentation(body: &Value) -> Option<u64> {
    body.get("segmentations")?.as_array()?.iter().find(|s| s["standard"] == true)?.get("id")?.as_u64()
}

/// RD client settings: secrets from files; against a loopback URL (the local sandbox) the
/// sandbox's client secret and control API stand in, as for rdstation-sink.
fn rd_settings(args: &SweepArgs) -> anyhow::Result<RdSettings> {
    let local = args.rd_url.starts_with("http://127.0.0.1") || args.rd_url.starts_with("http://localhost");
    let client_secret = match &args.rd_client_secret_file {
        Some(path) => RdSettings::read_secret(path)?,
        None if local => "elo-rd-secret".to_owned(),
        None => anyhow::bail!("the RD Station client secret file is required (ELO_RDSTATION_CLIENT_SECRET_FILE)"),
    };
    let (refresh_token, sandbox_control) = match &args.rd_refresh_token_file {
        Some(path) => (Some(RdSettings::read_secret(path)?), None),
        None if local => (None, Some(args.rd_sandbox_control.clone())),
        None => anyhow::bail!("the RD Station refresh token file is required (ELO_RDSTATION_REFRESH_TOKEN_FILE)"),
    };
    Ok(RdSettings {
        base_url: args.rd_url.clone(),
        client_id: args.rd_client_id.clone(),
        client_secret,
        refresh_token,
        sandbox_control,
        contacts_per_minute: args.rd_per_minute,
        request_timeout: Duration::from_secs(30),
    })
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
    use serde_json::json;

    use super::*;
    use crate::ledger::tests::event;

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
    fn magento_is_ahead_when_the_ledger_lacks_the_version() {
        let mut e = Entry::for_event(&event("order", "7", "c:1", 100));
        e.apply_event(&event("order", "7", "c:1", 100), 0);
        assert!(source_ahead(None, 100), "an order the ledger never saw");
        assert!(source_ahead(Some(&e), 101), "a change whose webhook was lost");
        assert!(!source_ahead(Some(&e), 100));
        assert!(!source_ahead(Some(&e), 90));
    }

    #[test]
    fn salesforce_lookups_find_the_missing_ids() {
        let ids = vec!["o:1".to_owned(), "o:2".to_owned(), "o:3".to_owned()];
        assert_eq!(
            soql_by_external_ids("Elo_Id__c", &ids),
            "SELECT Elo_Id__c FROM Order WHERE Elo_Id__c IN ('o:1','o:2','o:3')"
        );
        assert_eq!(soql_by_external_ids("F", &["o:'x".to_owned()]), "SELECT F FROM Order WHERE F IN ('o:\\'x')");
        let found = vec![json!({"Elo_Id__c": "o:1"}), json!({"Elo_Id__c": "o:3", "attributes": {}})];
        assert_eq!(missing_ids(&ids, &found, "Elo_Id__c"), vec!["o:2".to_owned()]);
        assert!(
            missing_ids(
                &ids,
                &[json!({"Elo_Id__c": "o:1"}), json!({"Elo_Id__c": "o:2"}), json!({"Elo_Id__c": "o:3"})],
                "Elo_Id__c"
            )
            .is_empty()
        );
    }

    fn rd_entry(key: &str, version: i64, name: &str, uuid: &str, confirmed_at: i64) -> (String, Entry) {
        let mut ev = event("order", key, "c:1", version);
        ev.customer.as_mut().unwrap().firstname = Some(name.into());
        ev.customer.as_mut().unwrap().lastname = None;
        let mut e = Entry::for_event(&ev);
        e.apply_event(&ev, 0);
        let mut o =
            crate::ledger::tests::outcome("rdstation", "order", key, version, elo_events::OutcomeStatus::Applied);
        o.target_ids.insert("contact_uuid".into(), uuid.into());
        e.apply_outcome(&o, confirmed_at);
        (format!("order:{key}"), e)
    }

    #[test]
    fn the_contact_follows_the_customers_newest_entry_and_drift_is_found() {
        let sla = Duration::from_secs(60);
        let entries = vec![rd_entry("1", 100, "Old", "u1", 10), rd_entry("2", 200, "New", "u1", 20)];
        let expected = expected_in(3, &entries, sla, 5, 1_000);
        assert_eq!(expected.len(), 1, "one contact per customer");
        let email = elo_events::sample::order_placed(1).customer.unwrap().email;
        assert_eq!(expected[0].key, "order:2");
        assert_eq!(expected[0].fp, crate::ledger::contact_fp(&email, "New"));
        assert_eq!((expected[0].uuid.as_str(), expected[0].partition), ("u1", 3));
        assert!(expected_in(3, &entries, sla, 5_000, 1_000).is_empty(), "confirmed too recently: left alone");

        let mut listed = HashMap::from([("u1".to_owned(), crate::ledger::contact_fp(&email, "New"))]);
        assert!(contact_drift(&expected, &listed, true).is_empty());
        listed.insert("u1".into(), crate::ledger::contact_fp(&email, "Edited"));
        assert_eq!(contact_drift(&expected, &listed, true), vec![("u1".to_owned(), DriftKind::Altered)]);
        listed.clear();
        assert!(contact_drift(&expected, &listed, false).is_empty(), "a partial listing proves no absence");
        assert_eq!(contact_drift(&expected, &listed, true), vec![("u1".to_owned(), DriftKind::Missing)]);
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
    fn salesforce_edits_are_changes_after_the_confirmed_write() {
        assert_eq!(
            soql_modified_since("Elo_Id__c", 1_793_491_200_000),
            "SELECT Elo_Id__c, LastModifiedDate FROM Order WHERE LastModifiedDate > 2026-11-01T00:00:00Z ORDER BY LastModifiedDate ASC LIMIT 2000"
        );
        assert_eq!(parse_sf_datetime("2026-11-01T00:00:05.123+0000"), Some(1_793_491_205_000));
        assert_eq!(parse_sf_datetime("soon"), None);
        assert!(!edited_after(10_000, 12_000, 5_000), "Elo's own write, confirmed a moment later");
        assert!(edited_after(10_000, 20_000, 5_000));
    }

    #[test]
    fn the_standard_segmentation_is_found() {
        let body = json!({"segmentations": [{"id": 4, "standard": false}, {"id": 1, "standard": true}]});
        assert_eq!(standard_segmentation(&body), Some(1));
        assert_eq!(standard_segmentation(&json!({"segmentations": []})), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_a_round_and_counts_every_call() {
        let budget = Budget::new("test", NonZeroU32::new(600).unwrap(), 3);
        let mut spent = 0;
        for _ in 0..3 {
            assert!(budget.spend(&mut spent).await);
        }
        assert!(!budget.spend(&mut spent).await, "the round's cap");
        assert_eq!(budget.progress.calls.load(Ordering::Relaxed), 3);
    }
}
