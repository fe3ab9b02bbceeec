//! Applies a batch of commerce events to Salesforce and says, per record, what happened.
//!
//! Steps: decode failures and unmappable events (no e-mail, unknown store) are refused with
//! a reason; versions older than what the sink confirmed for the same order or customer are
//! skipped (never stale), and of several versions of one order in a batch only the newest is
//! written; missing products and price book entries are upserted (one Composite call of
//! sObject Collections, cached afterwards); then the Composite Graph requests go out and
//! each graph's result is read back node by node.
//!
//! Errors by class: a row-level data error fails its record `Permanent` (DLQ, with the
//! Salesforce code and fields) and the other records of its graph, rolled back with it,
//! `Transient` so the runtime retries them without it; lock errors and 5xx are `Transient`;
//! 403 `REQUEST_LIMIT_EXCEEDED` is `RateLimited` (the runtime waits, never drops); a session
//! refused after one re-authentication is `Auth`.
//!
//! State: the confirmed version and Salesforce ids per order and per customer live in a
//! changelog-backed store ([`state`]), written before a batch is reported done, so a restart
//! restores them and a replayed older version stays skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use elo_events::{CommerceEvent, CommerceEventType, OutcomeStatus};
use elo_kafka::{ErrorClass, HandlerError};
use serde_json::Value;

use crate::client::{self, SalesforceClient};
use crate::graph::{self, Builder, OrgIds, Work, customer_version};
use crate::mapping::{AccountMode, Resolved};
use skip::{restore_gone_accounts, set_digest};

mod alias;
mod bulk;
mod bulk_csv;
mod bulk_loop;
mod composite;
mod erasure;
mod pool;
mod products;
mod resend;
mod skip;

/// Default of `ELO_SALESFORCE_CUSTOMER_REWRITE_AFTER`: how long after a full write of a
/// customer its unchanged data may be left out of its orders' graphs (see `handler/skip.rs`).
pub const CUSTOMER_REWRITE_AFTER: Duration = Duration::from_secs(3600);

pub mod state;

pub use bulk::{BulkBatch, BulkSettings, Prepared};
pub use bulk_loop::{BulkChunks, Events};
pub use state::{Confirmations, Confirmed, enrichment_rank};

/// What happened to one record.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub result: Result<(), HandlerError>,
    /// The outcome to publish (`None`: nothing to report yet, e.g. a retriable failure).
    pub outcome: Option<OutcomeStatus>,
    pub target_ids: BTreeMap<String, String>,
    /// The failure came from its graph (a lock, a rollback), not from the whole call.
    retry_in_call: bool,
}

/// Entity key → its newest version in a batch and that record's batch index.
type Newest = HashMap<String, ((i64, u8), usize)>;

/// A version: (source updated_at, enrichment rank).
fn version_of(e: &CommerceEvent) -> (i64, u8) {
    (e.source_version.updated_at, enrichment_rank(e))
}

/// Records whose graphs are built at once (a few full Composite Graph requests; also the
/// slice a Bulk API 2.0 batch's rows are built from).
const GRAPH_SLICE: usize = 250;

/// Customers share a graph up to this many nodes (a few small orders' worth), so a request
/// of 500 nodes is not cut short by the 75-graph limit.
const MERGE_NODES: usize = 30;

/// Extra rounds within one handler call for graphs that failed transiently.
const IN_CALL_RETRIES: usize = 4;

impl Verdict {
    fn ok(status: OutcomeStatus) -> Self {
        Self { result: Ok(()), outcome: Some(status), target_ids: BTreeMap::new(), retry_in_call: false }
    }
    fn failed(error: HandlerError) -> Self {
        let outcome = (error.class == ErrorClass::Permanent).then_some(OutcomeStatus::DeadLettered);
        Self { result: Err(error), outcome, target_ids: BTreeMap::new(), retry_in_call: false }
    }
    fn graph_failed(error: HandlerError) -> Self {
        let retry_in_call = error.class == ErrorClass::Transient;
        Self { retry_in_call, ..Self::failed(error) }
    }
}

/// Chunks of events already decoded, for [`Sink::apply_bulk`].
struct Decoded<'e> {
    events: &'e [Result<CommerceEvent, HandlerError>],
    out: Vec<Verdict>,
}

impl BulkChunks for Decoded<'_> {
    type Held = ();

    async fn read(&self, range: std::ops::Range<usize>) -> ((), Events) {
        ((), self.events[range].to_vec())
    }

    async fn done(&mut self, _range: std::ops::Range<usize>, _events: &Events, verdicts: Vec<Verdict>) {
        self.out.extend(verdicts);
    }
}

/// The Salesforce side of the sink.
pub struct Sink {
    pub client: SalesforceClient,
    pub mapping: Resolved,
    pub org: OrgIds,
    /// How long to wait after 403 REQUEST_LIMIT_EXCEEDED (Salesforce sends no Retry-After).
    pub quota_pause: Duration,
    /// Price book entries known to exist (`pbe:s<store>:<sku>`).
    entries: Mutex<HashSet<String>>,
    /// Confirmed version and Salesforce ids per `order:<id>` and `customer:<key>`.
    confirmed: Confirmations,
    /// When batches go through Bulk API 2.0.
    bulk: BulkSettings,
    /// The bound on the Bulk jobs' spooled bytes, shared by the partitions.
    spool_budget: bulk::SpoolBudget,
    /// Composite Graph requests shared by the partitions' batches.
    pool: pool::Pool,
    /// How long after a full write a repeat buyer's unchanged customer data is left out.
    customer_rewrite_after: Duration,
}

fn order_entity(e: &CommerceEvent) -> Option<String> {
    e.order.as_ref().map(|o| format!("order:{}", o.entity_id))
}

fn customer_entity(e: &CommerceEvent) -> String {
    customer_entity_key(&e.customer_key)
}

fn customer_entity_key(customer_key: &str) -> String {
    format!("customer:{customer_key}")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Keeps personal data out of messages that reach the DLQ and logs.
fn scrub(message: &str) -> String {
    message.split(' ').map(|w| if w.contains('@') { "<redacted>" } else { w }).collect::<Vec<_>>().join(" ")
}

/// The class of a Salesforce error code / status.
pub fn classify(status: u16, code: &str, message: &str, fields: &[String], quota_pause: Duration) -> HandlerError {
    let text =
        if fields.is_empty() { scrub(message) } else { format!("{} [fields: {}]", scrub(message), fields.join(", ")) };
    match code {
        "REQUEST_LIMIT_EXCEEDED" => {
            HandlerError::new(ErrorClass::RateLimited, code, text).with_retry_after(quota_pause)
        }
        "INVALID_SESSION_ID" | "invalid_grant" | "invalid_client" => HandlerError::new(ErrorClass::Auth, code, text),
        "UNABLE_TO_LOCK_ROW" | "SERVER_UNAVAILABLE" | "timeout" | "transport" => HandlerError::transient(code, text),
        _ if status >= 500 || status == 0 || status == 408 || status == 429 => HandlerError::transient(code, text),
        _ => HandlerError::permanent(code, text),
    }
}

fn from_client(e: &client::Error, quota_pause: Duration) -> HandlerError {
    match e {
        client::Error::Transport(_) => classify(0, &e.code(), &e.to_string(), &[], quota_pause),
        client::Error::Status { status, code, message } => classify(*status, code, message, &[], quota_pause),
        client::Error::Auth { code, message } => HandlerError::new(ErrorClass::Auth, code.clone(), scrub(message)),
        client::Error::Decode(m) => HandlerError::transient("decode_response", m.clone()),
    }
}

/// The first real error of a composite item body (`[{"errorCode","message","fields"}]`).
fn item_error(item: &Value) -> Option<(u16, String, String, Vec<String>)> {
    let status = item["httpStatusCode"].as_u64().unwrap_or(0) as u16;
    if (200..300).contains(&status) {
        return None;
    }
    let first = item["body"].as_array().and_then(|a| a.first()).cloned().unwrap_or(Value::Null);
    let code = first["errorCode"].as_str().unwrap_or("unknown").to_owned();
    let message = first["message"].as_str().unwrap_or_default().to_owned();
    let fields = first["fields"].as_array().map(|f| f.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect());
    Some((status, code, message, fields.unwrap_or_default()))
}

impl Sink {
    pub fn new(client: SalesforceClient, mapping: Resolved, org: OrgIds, quota_pause: Duration) -> Self {
        Self {
            client,
            mapping,
            org,
            quota_pause,
            entries: Mutex::new(HashSet::new()),
            confirmed: Confirmations::memory(),
            spool_budget: bulk::SpoolBudget::new(BulkSettings::default().spool_bytes),
            bulk: BulkSettings::default(),
            pool: pool::Pool::new(Duration::ZERO),
            customer_rewrite_after: CUSTOMER_REWRITE_AFTER,
        }
    }

    /// Leaves a repeat buyer's unchanged customer data out only within `after` of its last
    /// full write (zero: never left out).
    pub fn with_customer_rewrite_after(mut self, after: Duration) -> Self {
        self.customer_rewrite_after = after;
        self
    }

    /// Lets graphs wait up to `linger` for other batches' graphs to share a request (see
    /// `handler/pool.rs`); zero sends each batch's requests at once.
    pub fn with_graph_linger(mut self, linger: Duration) -> Self {
        let stop = self.pool.stop.clone();
        self.pool = pool::Pool::new(linger);
        self.pool.stop = stop;
        self
    }

    /// Graphs waiting for company leave at once when `stop` fires (the service's shutdown).
    pub fn with_stop(mut self, stop: tokio_util::sync::CancellationToken) -> Self {
        self.pool.stop = stop;
        self
    }

    /// Whether a batch of `records` goes through Bulk API 2.0.
    pub fn bulk_sized(&self, records: usize) -> bool {
        self.bulk.min_records > 0 && records >= self.bulk.min_records
    }

    /// Uses Bulk API 2.0 as `bulk` says.
    pub fn with_bulk(mut self, bulk: BulkSettings) -> Self {
        self.spool_budget = bulk::SpoolBudget::new(bulk.spool_bytes);
        self.bulk = bulk;
        self
    }

    /// Keeps confirmations in `confirmed` (the service passes its changelog-backed store).
    pub fn with_confirmations(mut self, confirmed: Confirmations) -> Self {
        self.confirmed = confirmed;
        self
    }

    /// Restores a partition's confirmations (from `Handler::on_partition_start`).
    pub async fn restore(&self, partition: i32) -> Result<usize, elo_kafka::Error> {
        self.confirmed.restore(partition).await
    }

    /// Forgets a revoked partition's confirmations.
    pub fn release(&self, partition: i32) {
        self.confirmed.release(partition);
    }

    /// Applies decoded events of partition 0 (tests and benches; the service uses
    /// [`Sink::apply_partition`]).
    pub async fn apply(&self, events: &[Result<CommerceEvent, HandlerError>]) -> Vec<Verdict> {
        self.apply_partition(0, events).await
    }

    /// Applies decoded events of one partition (a decode failure stays that record's verdict).
    pub async fn apply_partition(
        &self,
        partition: i32,
        events: &[Result<CommerceEvent, HandlerError>],
    ) -> Vec<Verdict> {
        if self.bulk_sized(events.len()) {
            // Through the service's loop (see `bulk_loop`), the events as they are.
            let chunks: Vec<_> =
                (0..events.len()).step_by(GRAPH_SLICE).map(|at| at..(at + GRAPH_SLICE).min(events.len())).collect();
            let mut reader = Decoded { events, out: Vec::with_capacity(events.len()) };
            self.apply_bulk(partition, events.len(), &chunks, &mut reader).await;
            return reader.out;
        }
        self.apply_composite(partition, events).await
    }

    /// Applies decoded events of one partition through Composite Graph (a batch too small for
    /// Bulk API 2.0, or a Bulk-sized one with few records left to write: see `bulk_loop`).
    async fn apply_composite(&self, partition: i32, events: &[Result<CommerceEvent, HandlerError>]) -> Vec<Verdict> {
        let started = now_ms();
        let mut verdicts: Vec<Option<Verdict>> = vec![None; events.len()];
        let aliased = self.aliases(partition, events);
        let mut newest = HashMap::new();
        self.note_newest(events, &aliased, 0, &mut newest);
        let (mut work, erasures, rewrites) = self.select(partition, events, &aliased, &newest, 0, &mut verdicts);
        self.plan_skips(partition, &mut work, &rewrites);
        // A record written under an alias writes its newer customer data over the owner's
        // Account and Contact (the same person's, as without the skip) and is never left out:
        // the owner's fingerprint lives on the owner's partition and does not describe what
        // an alias wrote.
        for w in work.iter_mut().filter(|w| aliased[w.index].is_some()) {
            w.held_digest = None;
        }
        let failed = self.ensure_entries(&work).await;
        work.retain(|w| match failed.get(&w.index) {
            Some(error) => {
                verdicts[w.index] = Some(Verdict::failed(error.clone()));
                false
            }
            None => true,
        });
        self.write(partition, &mut work, &mut verdicts).await;
        self.name_held_customers(partition, &work, &mut verdicts);
        let under_alias: Vec<(usize, &str)> = work
            .iter()
            .filter(|w| aliased[w.index].is_some())
            .filter_map(|w| Some((w.index, events.get(w.index)?.as_ref().ok()?.customer_key.as_str())))
            .collect();
        self.name_alias_customers(partition, &under_alias, &mut verdicts);
        let verdicts = self.settle(partition, &work, erasures, verdicts, &|_| None).await;
        self.forget_resent_digests(partition, &rewrites, started).await;
        verdicts
    }

    /// Each event under its key's alias, if it has one (a guest who registered).
    fn aliases(&self, partition: i32, events: &[Result<CommerceEvent, HandlerError>]) -> Vec<Option<CommerceEvent>> {
        events.iter().map(|e| e.as_ref().ok().and_then(|e| self.aliased(partition, e))).collect()
    }

    /// The events that can be written (a decode failure or an unmappable event gets its
    /// verdict here), under their aliases.
    fn pending<'e>(
        &self,
        events: &'e [Result<CommerceEvent, HandlerError>],
        aliased: &'e [Option<CommerceEvent>],
        verdicts: &mut [Option<Verdict>],
    ) -> Vec<(usize, &'e CommerceEvent)> {
        let mut pending: Vec<(usize, &CommerceEvent)> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let event = match (&aliased[i], event) {
                (Some(e), _) => Ok(e),
                (None, event) => event.as_ref(),
            };
            match event {
                Err(e) => verdicts[i] = Some(Verdict::failed(e.clone())),
                Ok(e) => match self.unmappable(e) {
                    Some(reason) => verdicts[i] = Some(Verdict::failed(HandlerError::permanent("unmappable", reason))),
                    None => pending.push((i, e)),
                },
            }
        }
        pending
    }

    /// Notes the newest version of each entity among `events` (batch indices from `offset`):
    /// of several versions of an entity in a batch only the newest is written.
    fn note_newest(
        &self,
        events: &[Result<CommerceEvent, HandlerError>],
        aliased: &[Option<CommerceEvent>],
        offset: usize,
        newest: &mut Newest,
    ) {
        let mut scratch = vec![None; events.len()];
        for (i, e) in self.pending(events, aliased, &mut scratch) {
            let key = order_entity(e).unwrap_or_else(|| customer_entity(e));
            let entry = newest.entry(key).or_insert((version_of(e), offset + i));
            if version_of(e) >= entry.0 {
                *entry = (version_of(e), offset + i);
            }
        }
    }

    /// The records to write: versions older than the confirmed one, redeliveries and all but
    /// the newest version of an entity in the batch get their verdicts here; erasures apart;
    /// and the customer keys with a RESEND of any of their entries (written in full).
    #[allow(clippy::type_complexity)]
    fn select<'e>(
        &self,
        partition: i32,
        events: &'e [Result<CommerceEvent, HandlerError>],
        aliased: &'e [Option<CommerceEvent>],
        newest: &Newest,
        offset: usize,
        verdicts: &mut [Option<Verdict>],
    ) -> (Vec<Work<'e>>, Vec<(usize, &'e CommerceEvent)>, HashSet<&'e str>) {
        let pending = self.pending(events, aliased, verdicts);
        // Never stale: drop versions older than the confirmed one, and all but the newest
        // version of an entity within the batch. A version is (source updated_at, enrichment
        // rank): a late-enrichment follow-up beats the event it completes, never the reverse.
        let at = version_of;
        let mut work = Vec::new();
        let mut erasures = Vec::new();
        // Customer keys with a RESEND of any of their entries in the batch: written in full.
        let mut rewrites: HashSet<&str> = HashSet::new();
        for (i, e) in &pending {
            if e.event_type == CommerceEventType::CustomerErased {
                // Always applied (idempotent), after the batch's other writes.
                erasures.push((*i, *e));
                continue;
            }
            let key = order_entity(e).unwrap_or_else(|| customer_entity(e));
            let confirmed = self.confirmed.get(partition, &key);
            let rewriting = confirmed.as_ref().is_some_and(|c| c.rewrite);
            match confirmed {
                Some(c) if at(e) < c.at() => {
                    verdicts[*i] = Some(Verdict::ok(OutcomeStatus::SkippedStale));
                    continue;
                }
                Some(c) if at(e) == c.at() && !c.rewrite => {
                    // Already applied (a redelivery): reported again, no call.
                    let mut verdict = Verdict::ok(OutcomeStatus::Applied);
                    verdict.target_ids = c.target_ids;
                    verdicts[*i] = Some(verdict);
                    continue;
                }
                _ => {}
            }
            if newest.get(&key).is_some_and(|(_, j)| *j != offset + i) {
                verdicts[*i] = Some(Verdict::ok(OutcomeStatus::SkippedStale));
                continue;
            }
            let customer = self.confirmed.get(partition, &customer_entity(e));
            if rewriting || customer.as_ref().is_some_and(|c| c.rewrite) {
                rewrites.insert(e.customer_key.as_str());
            }
            let write_customer = customer.as_ref().is_none_or(|c| (customer_version(e), enrichment_rank(e)) >= c.at());
            work.push(Work { index: *i, event: e, write_customer, held_digest: None });
        }
        (work, erasures, rewrites)
    }

    /// After the writes: confirms what was applied, matches records the duplicate rule
    /// refused by e-mail, applies the erasures; every record's verdict.
    async fn settle(
        &self,
        partition: i32,
        work: &[Work<'_>],
        erasures: Vec<(usize, &CommerceEvent)>,
        mut verdicts: Vec<Option<Verdict>>,
        floor: &(dyn Fn(&str) -> Option<(i64, u8)> + Sync),
    ) -> Vec<Verdict> {
        self.confirm(partition, work, &mut verdicts, floor).await;
        // A second key for a person Salesforce already holds (the duplicate rule refused the
        // Contact): matched by e-mail, remembered, and written to the existing records.
        let matched = self.match_by_email(partition, work, &verdicts).await;
        if !matched.is_empty() {
            let mut again: Vec<Work<'_>> = matched
                .iter()
                .map(|(i, e)| {
                    // Never older customer data than landed outside `work` (a Bulk batch's
                    // other chunks), under the key it was written with or the matched one.
                    let at = (customer_version(e), enrichment_rank(e));
                    let original = work.iter().find(|w| w.index == *i);
                    let below = |key: &str| floor(key).is_some_and(|f| at < f);
                    Work {
                        index: *i,
                        event: e,
                        write_customer: original.is_some_and(|w| w.write_customer && !below(&w.event.customer_key))
                            && !below(&e.customer_key),
                        held_digest: None,
                    }
                })
                .collect();
            self.ride_graphs(partition, &again, &mut verdicts).await;
            self.retry_in_call(&mut again, &mut verdicts, floor).await;
            // Named by their own key's alias entry (the owner's ids), as when they wrote them.
            let own: Vec<(usize, &str)> = again
                .iter()
                .filter_map(|a| Some((a.index, work.iter().find(|w| w.index == a.index)?.event.customer_key.as_str())))
                .collect();
            self.name_alias_customers(partition, &own, &mut verdicts);
            self.confirm(partition, &again, &mut verdicts, floor).await;
        }
        for (i, e) in erasures {
            let verdict = match self.erase(partition, e).await {
                Ok(ids) => Verdict { target_ids: ids, ..Verdict::ok(OutcomeStatus::Applied) },
                Err(error) => Verdict::failed(error),
            };
            verdicts[i] = Some(verdict);
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| Verdict::failed(HandlerError::transient("not_attempted", "not attempted"))))
            .collect()
    }

    /// Sends the graphs, then those that failed transiently once more per round, one record
    /// per graph (and those refused because the Account their graph left out is gone, with
    /// their customer's nodes).
    async fn write(&self, partition: i32, work: &mut [Work<'_>], verdicts: &mut [Option<Verdict>]) {
        self.ride_graphs(partition, work, verdicts).await;
        self.retry_in_call(work, verdicts, &|_| None).await;
    }

    /// The Composite Graph requests of `work` (customers sharing graphs), sent once.
    async fn ride_graphs(&self, partition: i32, work: &[Work<'_>], verdicts: &mut [Option<Verdict>]) {
        let builder = Builder { mapping: &self.mapping, org: &self.org, version: self.client.api_version() };
        // Built and sent a slice at a time: a backlog batch of thousands of records would
        // otherwise hold every request body at once.
        for slice in graph::slices(work, GRAPH_SLICE) {
            for (index, verdict) in self.ride(partition, builder.graphs(&slice, false, MERGE_NODES)).await {
                verdicts[index] = Some(verdict);
            }
        }
    }

    /// Graphs that failed transiently (a lock, a record rolled back with another one) are
    /// sent again at once, one record per graph, before the batch is handed back: the
    /// runtime would otherwise retry the whole suffix and spend every record's budget.
    /// `floor`: per customer key, the customer data that already reached Salesforce outside
    /// `work` (a Bulk batch's other chunks); a retry never writes older. Returns the records
    /// that wrote their customer data and were applied.
    async fn retry_in_call(
        &self,
        work: &mut [Work<'_>],
        verdicts: &mut [Option<Verdict>],
        floor: &(dyn Fn(&str) -> Option<(i64, u8)> + Sync),
    ) -> HashSet<usize> {
        let mut wrote = HashSet::new();
        let builder = Builder { mapping: &self.mapping, org: &self.org, version: self.client.api_version() };
        let position: HashMap<usize, usize> = work.iter().enumerate().map(|(at, w)| (w.index, at)).collect();
        // Which records may write their customer data at all, whatever an earlier round resent.
        let may_write: Vec<bool> = work.iter().map(|w| w.write_customer).collect();
        let mut restored = HashSet::new();
        for _ in 0..IN_CALL_RETRIES {
            restore_gone_accounts(work, verdicts, &mut restored);
            let view: Vec<Work<'_>> =
                work.iter().zip(&may_write).map(|(w, &may)| Work { write_customer: may, ..*w }).collect();
            let newest = newest_customer_data(&view, verdicts);
            let again: Vec<Work<'_>> = view
                .iter()
                .filter(|w| verdicts[w.index].as_ref().is_some_and(|v| v.retry_in_call))
                .map(|w| Work {
                    // Only the batch's newest customer data of the key is written again: an
                    // older order retried alone would otherwise write its own, older data over
                    // what an applied graph of the same batch wrote (and the confirmed version).
                    write_customer: w.write_customer
                        && newest.get(w.event.customer_key.as_str())
                            == Some(&(customer_version(w.event), enrichment_rank(w.event)))
                        && floor(&w.event.customer_key)
                            .is_none_or(|f| (customer_version(w.event), enrichment_rank(w.event)) >= f),
                    ..*w
                })
                .collect();
            if again.is_empty() {
                break;
            }
            // What a record resends is what it is confirmed with: one resent without its
            // customer data (another record's newer data heads its key's graphs) must not
            // record its own data as what Salesforce holds.
            for a in &again {
                if let Some(&at) = position.get(&a.index) {
                    work[at].write_customer = a.write_customer;
                }
            }
            for request in builder.build(&again, true) {
                for (index, verdict) in self.send(&request).await {
                    verdicts[index] = Some(verdict);
                }
            }
            for w in again.iter().filter(|w| w.write_customer) {
                if verdicts[w.index].as_ref().is_some_and(|v| v.result.is_ok()) {
                    wrote.insert(w.index);
                }
            }
            // A record resent without its customer's nodes (the batch already wrote newer data)
            // still names the Account and Contact in its outcome, as its first graph did.
            let written = customer_ids_written(work, verdicts);
            for w in again.iter().filter(|w| !w.write_customer) {
                let Some(ids) = written.get(w.event.customer_key.as_str()) else { continue };
                if let Some(verdict) = verdicts[w.index].as_mut().filter(|v| v.result.is_ok()) {
                    for (object, id) in ids {
                        verdict.target_ids.entry(object.clone()).or_insert_with(|| id.clone());
                    }
                }
            }
        }
        // Refused for a gone Account in the last round: the runtime retries them (the skip is
        // planned again, and the next call's first retry round sends the customer's nodes).
        restore_gone_accounts(work, verdicts, &mut restored);
        skip::hold_gone_for_the_runtime(verdicts);
        wrote
    }

    /// Records what was applied (acknowledged by the changelog before the batch is reported
    /// done; a failed state write fails its records `transient`, and the replay rewrites the
    /// same upserts).
    /// `floor`: per customer key, customer data that reached Salesforce outside `work` (a Bulk
    /// batch's rows of a newer record, dead-lettered after): the key's confirmed customer
    /// version is raised to it, so an older one later never writes over it.
    async fn confirm(
        &self,
        partition: i32,
        work: &[Work<'_>],
        verdicts: &mut [Option<Verdict>],
        floor: &(dyn Fn(&str) -> Option<(i64, u8)> + Sync),
    ) {
        let builder = Builder { mapping: &self.mapping, org: &self.org, version: self.client.api_version() };
        let mut updates: BTreeMap<String, (Confirmed, Vec<usize>)> = BTreeMap::new();
        let now = now_ms();
        let current = |key: &str, updates: &BTreeMap<String, (Confirmed, Vec<usize>)>| -> Confirmed {
            updates.get(key).map(|(c, _)| c.clone()).or_else(|| self.confirmed.get(partition, key)).unwrap_or_default()
        };
        for w in work {
            // What Bulk landed for the customer counts whatever became of the record that
            // carried it (dead-lettered after its Account and Contact rows landed: a later,
            // older version must still not overwrite them). If this write fails, the record
            // is retried rather than parked, so the floor is written next time.
            if let Some(landed) = floor(&w.event.customer_key) {
                let key = customer_entity(w.event);
                let mut c = current(&key, &updates);
                if landed > c.at() {
                    // The data is not at hand: no digest (never taken for unchanged).
                    (c.version, c.rank, c.rewrite, c.digest, c.digest_at) = (landed.0, landed.1, false, 0, 0);
                    let entry = updates.entry(key).or_default();
                    entry.0 = c;
                    entry.1.push(w.index);
                }
            }
            let Some(verdict) = verdicts[w.index].as_ref().filter(|v| v.result.is_ok()) else { continue };
            let (v, rank) = (w.event.source_version.updated_at, enrichment_rank(w.event));
            let customer_ids = || {
                let mut ids = verdict.target_ids.clone();
                ids.remove("Order");
                ids
            };
            if let Some(key) = order_entity(w.event) {
                let ids = verdict.target_ids.get("Order").map(|id| ("Order".to_owned(), id.clone())).into_iter();
                let entry = updates.entry(key).or_default();
                entry.0 = Confirmed { version: v, rank, target_ids: ids.collect(), ..Confirmed::default() };
                entry.1.push(w.index);
            } else if w.write_customer && w.event.customer.is_some() {
                let key = customer_entity(w.event);
                let mut c = current(&key, &updates);
                if (v, rank) >= c.at() {
                    (c.version, c.rank, c.rewrite) = (v, rank, false);
                    set_digest(&mut c, builder.customer_digest(w.event), w.held_digest, now);
                }
                let ids = customer_ids();
                if !ids.is_empty() {
                    c.target_ids = ids;
                }
                let entry = updates.entry(key).or_default();
                entry.0 = c;
                entry.1.push(w.index);
            }
            if w.write_customer && w.event.order.is_some() {
                let key = customer_entity(w.event);
                let mut c = current(&key, &updates);
                let cv = (customer_version(w.event), rank);
                if cv >= c.at() {
                    (c.version, c.rank) = cv;
                    c.rewrite = false;
                    set_digest(&mut c, builder.customer_digest(w.event), w.held_digest, now);
                }
                let ids = customer_ids();
                if !ids.is_empty() {
                    c.target_ids = ids;
                }
                let entry = updates.entry(key).or_default();
                entry.0 = c;
                entry.1.push(w.index);
            }
        }
        let writes = updates
            .into_iter()
            .map(|(key, (value, indexes))| async move { (self.confirmed.put(partition, &key, value).await, indexes) });
        for (result, indexes) in futures::future::join_all(writes).await {
            if let Err(e) = result {
                tracing::warn!(error = %e, partition, "confirmed version not stored; the records are retried");
                let error = HandlerError::transient("state_write", e.to_string());
                for i in indexes {
                    verdicts[i] = Some(Verdict::failed(error.clone()));
                }
            }
        }
    }

    /// Why an event cannot be mapped, if it cannot.
    fn unmappable(&self, e: &CommerceEvent) -> Option<String> {
        match e.event_type {
            CommerceEventType::OrderPlaced | CommerceEventType::OrderChanged => {
                let Some(order) = &e.order else { return Some("order event without an order".into()) };
                if e.customer.as_ref().is_none_or(|c| c.email.trim().is_empty()) {
                    return Some("order without a customer e-mail".into());
                }
                if !self.org.pricebooks.contains_key(&e.store.store_id) {
                    return Some(format!("unknown store {} (no price book mapped)", e.store.store_id));
                }
                if order.items.is_empty() {
                    return Some("order without items".into());
                }
                None
            }
            CommerceEventType::CustomerChanged => match &e.customer {
                Some(c) if !c.email.trim().is_empty() => {
                    if self.mapping.mode == AccountMode::Person && c.lastname.as_deref().is_none_or(str::is_empty) {
                        return Some("person account without a last name".into());
                    }
                    None
                }
                _ => Some("customer event without an e-mail".into()),
            },
            CommerceEventType::CustomerErased => None,
            CommerceEventType::Unknown => Some("unknown event type".into()),
        }
    }
}

/// Per customer key, the Account/Contact ids an applied record of the batch wrote.
fn customer_ids_written<'a>(
    work: &[Work<'a>],
    verdicts: &[Option<Verdict>],
) -> HashMap<&'a str, BTreeMap<String, String>> {
    let mut written = HashMap::new();
    for w in work.iter().filter(|w| w.write_customer) {
        let Some(verdict) = verdicts[w.index].as_ref().filter(|v| v.result.is_ok()) else { continue };
        if verdict.target_ids.contains_key("Account") {
            let mut ids = verdict.target_ids.clone();
            ids.remove("Order");
            written.insert(w.event.customer_key.as_str(), ids);
        }
    }
    written
}

/// Per customer key, the newest customer (version, enrichment rank) among the records that may write their
/// customer data and have not failed for good (applied, or about to be sent again): what a
/// retry may write. A record refused for good no longer counts, so its older siblings still
/// create the Account when nothing newer reached Salesforce.
fn newest_customer_data<'a>(work: &[Work<'a>], verdicts: &[Option<Verdict>]) -> HashMap<&'a str, (i64, u8)> {
    let mut newest: HashMap<&'a str, (i64, u8)> = HashMap::new();
    for w in work.iter().filter(|w| w.write_customer && w.event.customer.is_some()) {
        let live = verdicts[w.index].as_ref().is_some_and(|v| v.result.is_ok() || v.retry_in_call);
        if live {
            let at = newest.entry(w.event.customer_key.as_str()).or_insert((i64::MIN, 0));
            *at = (*at).max((customer_version(w.event), enrichment_rank(w.event)));
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_salesforce_codes() {
        let p = Duration::from_secs(30);
        assert_eq!(classify(400, "UNABLE_TO_LOCK_ROW", "", &[], p).class, ErrorClass::Transient);
        assert_eq!(classify(503, "SERVER_UNAVAILABLE", "", &[], p).class, ErrorClass::Transient);
        let quota = classify(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.", &[], p);
        assert_eq!((quota.class, quota.retry_after), (ErrorClass::RateLimited, Some(p)));
        assert_eq!(classify(401, "INVALID_SESSION_ID", "", &[], p).class, ErrorClass::Auth);
        let data =
            classify(400, "REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]", &["LastName".into()], p);
        assert_eq!(data.class, ErrorClass::Permanent);
        assert!(data.message.contains("[fields: LastName]"), "{}", data.message);
    }

    #[test]
    fn messages_lose_email_addresses() {
        assert_eq!(scrub("duplicate ana@example.com found"), "duplicate <redacted> found");
    }
}
