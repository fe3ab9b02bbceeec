//! Bulk API 2.0 for backlogs: a batch of at least `ELO_SALESFORCE_BULK_MIN_RECORDS` records
//! (the runtime only fills batches that large when that many records wait on the partition,
//! i.e. during a backfill or after an outage) is written by upsert jobs instead of Composite
//! Graph calls: Accounts, Contacts, Orders (Draft), OrderItems, then the activations, each
//! one job whose rows come from the same graph nodes the Composite path would send (so the
//! mapping, the lifecycle and the external ids are the same). Each job's successful and
//! failed results are read back: a failed row fails the records it belongs to by the class
//! of its Salesforce error (data errors to the DLQ, lock errors retried at once through
//! Composite Graph, one record per graph), and their rows are left out of the later jobs; a
//! job that fails as a whole fails its records `transient`.
//!
//! Memory: a batch is never held decoded. It is read a chunk at a time three times
//! ([`BulkBatch`]): to find the newest version of each entity, to build the rows (spooled to
//! a temporary file per job, only each row's external id, line and owners kept in memory),
//! and after the jobs to confirm and report. Uploads stream from the spool and results are
//! parsed as they arrive, so a job's CSV is never held whole either.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use elo_events::{CommerceEvent, OutcomeStatus};
use elo_kafka::{ErrorClass, HandlerError};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::bulk_csv::{ResultPairs, Spool, UploadPlan, cell, decode, row_error};
use super::enrichment_rank;
use super::{GRAPH_SLICE, Newest, Sink, Verdict, classify, from_client};
use crate::client::{Body, Upload};
use crate::graph::{Builder, Owner, Work, customer_version};
use crate::metrics;

/// When and how the sink uses Bulk API 2.0.
#[derive(Clone, Debug)]
pub struct BulkSettings {
    /// Batches of at least this many records go through Bulk API 2.0 (0: never).
    pub min_records: usize,
    /// Longest wait between looks at a running job (the first look comes after a quarter of
    /// it, each later one after twice the previous wait: a small job is seen done early).
    pub poll: Duration,
    /// A job not finished by then is aborted and its records retried.
    pub timeout: Duration,
    /// Bytes the process's job spools may take on disk at once (the pod's `/tmp` is a 64 MiB
    /// `emptyDir`): a batch whose rows would pass it runs as several Bulk batches in turn.
    pub spool_bytes: usize,
    /// Where the spools go (default: the system's temporary directory).
    pub spool_dir: Option<PathBuf>,
}

impl Default for BulkSettings {
    fn default() -> Self {
        Self {
            min_records: 1000,
            poll: Duration::from_secs(1),
            timeout: Duration::from_secs(600),
            spool_bytes: 48 << 20,
            spool_dir: None,
        }
    }
}

/// The spool directory cannot take a file.
#[derive(Debug, thiserror::Error)]
#[error("Bulk API 2.0 spool directory {dir} is not writable (ELO_SALESFORCE_BULK_SPOOL_DIR): {source}")]
pub struct SpoolDirError {
    pub dir: String,
    #[source]
    pub source: std::io::Error,
}

impl BulkSettings {
    /// Creates and removes a file in the spool directory: a bad directory stops the service
    /// at startup with its name, rather than sending every backlog batch the slow way.
    pub fn check_spool_dir(&self) -> Result<(), SpoolDirError> {
        let dir = self.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
        let probe = tempfile::NamedTempFile::new_in(&dir).and_then(|f| f.close());
        probe.map_err(|source| SpoolDirError { dir: dir.display().to_string(), source })
    }
}

/// The process-wide bound on spooled bytes (KiB permits), shared by the partitions' batches.
pub(super) struct SpoolBudget {
    permits: Arc<Semaphore>,
    total_kib: u32,
    /// Bytes written to the spools and not yet released (tests check the bound with it).
    live: Arc<AtomicU64>,
    /// Most live bytes at once.
    peak: Arc<AtomicU64>,
}

/// Bytes a batch wrote to its spools, counted live until it is dropped.
struct LiveBytes {
    live: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for LiveBytes {
    fn drop(&mut self) {
        self.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl SpoolBudget {
    pub(super) fn new(bytes: usize) -> Self {
        // Rounded down: each reservation rounds its bytes up, so the live bytes stay within.
        let total_kib = u32::try_from((bytes / 1024).max(1)).unwrap_or(u32::MAX >> 4);
        Self {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            live: Arc::default(),
            peak: Arc::default(),
        }
    }

    fn kib(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).clamp(1, self.total_kib)
    }

    /// Whether `bytes` could ever fit the bound.
    fn fits(&self, bytes: usize) -> bool {
        bytes.div_ceil(1024) <= self.total_kib as usize
    }

    /// Waits for room for `bytes` (a chunk larger than the whole bound takes all of it).
    async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        self.permits.clone().acquire_many_owned(self.kib(bytes)).await.expect("never closed")
    }

    /// Room for `bytes` if there is some now.
    fn try_reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_many_owned(self.kib(bytes)).ok()
    }

    /// Counts `bytes` written to a spool until the returned value is dropped.
    fn written(&self, bytes: usize) -> LiveBytes {
        let now = self.live.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.peak.fetch_max(now, Ordering::Relaxed);
        LiveBytes { live: self.live.clone(), bytes: bytes as u64 }
    }

    pub(super) fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// Jobs a job's rows may go up in when uploads fail transiently (one upload per job).
const UPLOAD_TRIES: u32 = 3;
/// Closes sent to a job whose close fails transiently.
const CLOSE_TRIES: u32 = 4;

/// The phases, in dependency order, by the first letter of a graph node's reference.
const PHASES: [char; 5] = ['a', 'c', 'o', 'i', 'x'];

/// A record the batch writes: what its [`Work`] said when its rows were built.
#[derive(Clone, Debug)]
struct Planned {
    write_customer: bool,
    held_digest: Option<u64>,
    /// Written under its key's alias (the alias known when its rows were built: one found by
    /// a later chunk must not change which key the record is settled under).
    aliased: bool,
    /// The customer key it was written under.
    customer: Box<str>,
}

/// Customer data that reached Salesforce for a key in this batch (its (version, enrichment
/// rank) and the Account/Contact ids): a retry never writes older data.
type Landed = HashMap<Box<str>, ((i64, u8), BTreeMap<String, String>)>;

/// A Bulk API 2.0 batch read a chunk at a time (see the module docs): [`Sink::bulk_note`]
/// over every chunk, [`Sink::bulk_prepare`] over every chunk, [`Sink::bulk_run`], then
/// [`Sink::bulk_finish`] over every chunk, each chunk with the same offset each time.
pub struct BulkBatch {
    partition: i32,
    newest: Newest,
    jobs: Vec<Spool>,
    verdicts: Vec<Option<Verdict>>,
    planned: BTreeMap<usize, Planned>,
    erasures: BTreeSet<usize>,
    /// Records the first pass could not read: their newest versions were not noted.
    unread: HashSet<usize>,
    landed: Landed,
    /// The batch's room in the spool bound, held until its jobs are done.
    permits: Vec<(OwnedSemaphorePermit, LiveBytes)>,
    /// Records whose rows could not be spooled: written through Composite Graph instead.
    unspooled: BTreeSet<usize>,
    /// Room awaited (holding no chunk) for a chunk read again next (see [`Prepared::NeedsRoom`]).
    reserved: Option<(OwnedSemaphorePermit, usize)>,
}

/// What [`Sink::bulk_prepare`] did with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Its rows are spooled (or it had none): go on with the next chunk.
    Taken,
    /// The spool bound has no room for it now and the batch holds some already: nothing of
    /// the chunk was taken; run the batch, then start the next one at this chunk.
    Full,
    /// The batch holds no room and the bound has none free for the chunk's `usize` bytes:
    /// nothing was taken. Drop the chunk (and its budget), await [`Sink::bulk_reserve`], then
    /// read the chunk again and prepare it again.
    NeedsRoom(usize),
}

impl BulkBatch {
    /// A batch of `records` records of `partition`.
    pub fn new(partition: i32, records: usize) -> Self {
        Self {
            partition,
            newest: HashMap::new(),
            jobs: PHASES.iter().map(|_| Spool::new()).collect(),
            verdicts: vec![None; records],
            planned: BTreeMap::new(),
            erasures: BTreeSet::new(),
            unread: HashSet::new(),
            landed: HashMap::new(),
            permits: Vec::new(),
            unspooled: BTreeSet::new(),
            reserved: None,
        }
    }
}

/// A job's outcome per record: failures (and whether to resend at once through Composite
/// Graph) and Salesforce ids.
#[derive(Default)]
struct Outcome {
    failed: HashMap<usize, (HandlerError, bool)>,
    ids: HashMap<usize, BTreeMap<String, String>>,
    /// Per record, the newest customer data of its Account/Contact rows that landed.
    landed: HashMap<usize, (i64, u8)>,
}

impl Sink {
    /// Pass one over a chunk (`offset`: its first record's batch index): the newest version
    /// of each entity in the batch.
    pub fn bulk_note(&self, batch: &mut BulkBatch, offset: usize, events: &[Result<CommerceEvent, HandlerError>]) {
        let aliased = self.aliases(batch.partition, events);
        self.note_newest(events, &aliased, offset, &mut batch.newest);
        batch.unread.extend(events.iter().enumerate().filter(|(_, e)| e.is_err()).map(|(i, _)| offset + i));
    }

    /// After pass one: how many entities of the batch are still to be written (their newest
    /// version not yet confirmed), i.e. about what pass two keeps. A retried backlog batch,
    /// mostly confirmed already, has few.
    pub(super) fn bulk_writes(&self, batch: &BulkBatch) -> usize {
        let pending = |key: &str, at: (i64, u8)| {
            self.confirmed.get(batch.partition, key).is_none_or(|c| at > c.at() || (at == c.at() && c.rewrite))
        };
        batch.newest.iter().filter(|(key, (at, _))| pending(key, *at)).count()
    }

    /// Pass two over a chunk: staleness, products, and the chunk's rows spooled for the jobs
    /// (see [`Prepared`]). It never waits for spool room: the caller may hold budget.
    pub async fn bulk_prepare(
        &self,
        batch: &mut BulkBatch,
        offset: usize,
        events: &[Result<CommerceEvent, HandlerError>],
    ) -> Prepared {
        let partition = batch.partition;
        let aliased = self.aliases(partition, events);
        let mut verdicts = vec![None; events.len()];
        let (mut work, mut erasures, _rewrites) =
            self.select(partition, events, &aliased, &batch.newest, offset, &mut verdicts);
        // Read now but not by the first pass: its version was not weighed against the batch's
        // others (it may be an entity's newest), so it is retried rather than judged.
        let unread = |i: usize| events[i].is_ok() && batch.unread.contains(&(offset + i));
        for (_, verdict) in verdicts.iter_mut().enumerate().filter(|(i, _)| unread(*i)) {
            let error = HandlerError::transient("bulk_reread", "not readable in the batch's first pass; retried");
            *verdict = Some(Verdict::failed(error));
        }
        work.retain(|w| !unread(w.index));
        erasures.retain(|(i, _)| !unread(*i));
        let failed = self.ensure_entries(&work).await;
        // Indices from here on are the batch's.
        let mut planned = Vec::with_capacity(work.len());
        let mut plans = Vec::with_capacity(work.len());
        for w in work {
            match failed.get(&w.index) {
                Some(error) => verdicts[w.index] = Some(Verdict::failed(error.clone())),
                None => {
                    plans.push((
                        offset + w.index,
                        Planned {
                            write_customer: w.write_customer,
                            held_digest: w.held_digest,
                            aliased: aliased[w.index].is_some(),
                            customer: w.event.customer_key.as_str().into(),
                        },
                    ));
                    planned.push(Work { index: offset + w.index, ..w });
                }
            }
        }
        self.spool(batch, &planned);
        let bytes: usize = batch.jobs.iter().map(Spool::staged_bytes).sum();
        if !self.spool_budget.fits(bytes) {
            // Larger than the whole bound: never spooled past it, its records go through
            // Composite Graph after the jobs (as rows that cannot be spooled do).
            batch.jobs.iter_mut().for_each(Spool::discard);
            tracing::warn!(
                bytes,
                records = plans.len(),
                "bulk chunk larger than the spool bound; sent through Composite Graph"
            );
            batch.unspooled.extend(plans.iter().map(|(g, _)| *g));
        } else if bytes > 0 {
            // Never waits here (the caller may hold budget): room awaited for this chunk before
            // it was read again, else room free now; a batch holding none asks the caller to
            // await some without the chunk, one holding some runs what it has.
            let permit = match batch.reserved.take() {
                Some((permit, reserved)) if reserved >= bytes => Some(permit),
                _ => self.spool_budget.try_reserve(bytes),
            };
            let Some(permit) = permit else {
                batch.jobs.iter_mut().for_each(Spool::discard);
                return match batch.permits.is_empty() {
                    true => Prepared::NeedsRoom(bytes),
                    false => Prepared::Full,
                };
            };
            let dir = self.bulk.spool_dir.as_deref();
            match batch.jobs.iter_mut().try_for_each(|job| job.write_staged(dir)) {
                Ok(()) => {
                    batch.jobs.iter_mut().for_each(Spool::commit);
                    batch.permits.push((permit, self.spool_budget.written(bytes)));
                }
                Err(e) => {
                    // Only this chunk leaves the jobs (the rows spooled before stay whole): its
                    // records go through Composite Graph after the jobs (in `bulk_finish`, never
                    // below the customer data the jobs landed), so a full or broken spool
                    // directory slows a backlog but never uses up its retries.
                    batch.jobs.iter_mut().for_each(Spool::discard);
                    tracing::warn!(error = %e, records = plans.len(), "bulk rows not spooled; the records go through Composite Graph");
                    batch.unspooled.extend(plans.iter().map(|(g, _)| *g));
                }
            }
        }
        batch.planned.extend(plans);
        batch.erasures.extend(erasures.iter().map(|(i, _)| offset + i));
        for (i, v) in verdicts.into_iter().enumerate() {
            if v.is_some() {
                batch.verdicts[offset + i] = v;
            }
        }
        Prepared::Taken
    }

    /// Waits for `bytes` of room in the spool bound for the batch's next chunk (call it
    /// holding no chunk and no budget; see [`Prepared::NeedsRoom`]).
    pub async fn bulk_reserve(&self, batch: &mut BulkBatch, bytes: usize) {
        batch.reserved = None;
        batch.reserved = Some((self.spool_budget.reserve(bytes).await, bytes));
    }

    /// Stages the rows of `work` (batch indices) in the batch's jobs.
    fn spool(&self, batch: &mut BulkBatch, work: &[Work<'_>]) {
        let builder = Builder { mapping: &self.mapping, org: &self.org, version: self.client.api_version() };
        let customer_at: HashMap<usize, (i64, u8)> =
            work.iter().map(|w| (w.index, (customer_version(w.event), enrichment_rank(w.event)))).collect();
        for request in crate::graph::slices(work, GRAPH_SLICE).into_iter().flat_map(|s| builder.build(&s, false)) {
            for graph in request {
                let Some(nodes) = graph.body["compositeRequest"].as_array() else { continue };
                // Activation nodes name their order by reference (`@{o7.id}`): by external id here.
                let mut order_ext: HashMap<String, (String, String)> = HashMap::new();
                for node in nodes {
                    let reference = node["referenceId"].as_str().unwrap_or_default();
                    let url = node["url"].as_str().unwrap_or_default();
                    let parts: Vec<&str> = url.rsplit('/').take(3).collect();
                    let (value, field, object) = match parts.as_slice() {
                        [value, field, object] => (decode(value), (*field).to_owned(), (*object).to_owned()),
                        _ => continue,
                    };
                    let (object, field, value) = if value.starts_with("@{") {
                        let oref = value.trim_start_matches("@{").trim_end_matches(".id}");
                        let Some((f, v)) = order_ext.get(oref).cloned() else { continue };
                        ("Order".to_owned(), f, v)
                    } else {
                        (object, field, value)
                    };
                    if reference.starts_with('o') {
                        order_ext.insert(reference.to_owned(), (field.clone(), value.clone()));
                    }
                    let Some(phase) = PHASES.iter().position(|p| reference.starts_with(*p)) else { continue };
                    let owners: BTreeSet<usize> = match graph.owners.get(reference) {
                        Some(Owner::Record(i)) => [*i].into(),
                        Some(Owner::Customer(records)) => records.iter().copied().collect(),
                        None => graph.records.iter().copied().collect(),
                    };
                    // Customer rows of one key in two chunks: the newer customer data wins.
                    let rank = if phase < 2 {
                        owners.iter().filter_map(|i| customer_at.get(i)).copied().max().unwrap_or((0, 0))
                    } else {
                        (0, 0)
                    };
                    let job = &mut batch.jobs[phase];
                    let mut cells: Vec<(usize, String)> = Vec::new();
                    for (k, v) in node["body"].as_object().into_iter().flatten() {
                        match v.as_object() {
                            Some(lookup) => {
                                for (f, x) in lookup {
                                    cells.push((job.column(&format!("{k}.{f}")), cell(x)));
                                }
                            }
                            None => cells.push((job.column(k), cell(v))),
                        }
                    }
                    if job.object.is_empty() {
                        (job.object, job.ext_field) = (object, field);
                    }
                    job.add(value, cells, &owners, rank);
                }
            }
        }
    }

    /// Runs the batch's jobs in order; every planned record gets its verdict.
    pub async fn bulk_run(&self, batch: &mut BulkBatch) {
        // Every chunk is prepared: the newest versions are no longer needed.
        batch.newest = HashMap::new();
        let mut outcome = Outcome::default();
        for (phase, job) in batch.jobs.iter_mut().enumerate() {
            let Some(plan) = job.upload(&outcome.failed) else {
                *job = Spool::new();
                continue;
            };
            let result = match self.pool.stop.is_cancelled() {
                true => Err(stopped()),
                false => self.run_job(job, &plan, phase < 2, &mut outcome).await,
            };
            if let Err(error) = result {
                tracing::warn!(object = %job.object, error_code = %error.code, rows = plan.rows, "bulk job failed");
                for row in job.rows.values() {
                    for i in &row.owners {
                        outcome.failed.entry(*i as usize).or_insert_with(|| (error.clone(), false));
                    }
                }
            }
            // The spool is done with: its file and index go.
            *job = Spool::new();
        }
        batch.permits.clear();
        batch.reserved = None;
        metrics::RECORDS_PER_CALL.observe(batch.planned.len() as f64);
        for (i, at) in &outcome.landed {
            let Some(p) = batch.planned.get(i) else { continue };
            let mut ids = outcome.ids.get(i).cloned().unwrap_or_default();
            ids.remove("Order");
            let entry = batch.landed.entry(p.customer.clone()).or_insert(((i64::MIN, 0), BTreeMap::new()));
            if *at >= entry.0 {
                *entry = (*at, ids);
            }
        }
        let unspooled = HandlerError::transient("bulk_spool", "rows not spooled; sent through Composite Graph");
        for (i, p) in &batch.planned {
            if batch.unspooled.contains(i) {
                batch.verdicts[*i] = Some(Verdict::graph_failed(unspooled.clone()));
                continue;
            }
            batch.verdicts[*i] = Some(match outcome.failed.remove(i) {
                Some((error, true)) if error.class == ErrorClass::Transient => Verdict::graph_failed(error),
                Some((error, _)) => Verdict::failed(error),
                None => {
                    let mut ids = outcome.ids.remove(i).unwrap_or_default();
                    // Customer rows of a record with older data than its key's row are the row's.
                    if let Some((_, landed)) = batch.landed.get(&p.customer) {
                        for (object, id) in landed {
                            ids.entry(object.clone()).or_insert_with(|| id.clone());
                        }
                    }
                    Verdict { target_ids: ids, ..Verdict::ok(OutcomeStatus::Applied) }
                }
            });
        }
    }

    /// Pass three over a chunk: records whose rows hit a lock resent through Composite Graph
    /// (never with older customer data than what landed for the key), confirmations, e-mail
    /// matches and erasures; the chunk's verdicts.
    pub async fn bulk_finish(
        &self,
        batch: &mut BulkBatch,
        offset: usize,
        events: &[Result<CommerceEvent, HandlerError>],
    ) -> Vec<Verdict> {
        let partition = batch.partition;
        let aliased = self.aliases(partition, events);
        let range = offset..offset + events.len();
        let mut verdicts: Vec<Option<Verdict>> = batch.verdicts[range.clone()].iter_mut().map(Option::take).collect();
        let mut work: Vec<Work<'_>> = Vec::new();
        for (g, p) in batch.planned.range(range.clone()) {
            let i = g - offset;
            let event = if p.aliased { aliased[i].as_ref() } else { events[i].as_ref().ok() };
            match event {
                Some(event) => {
                    work.push(Work { index: i, event, write_customer: p.write_customer, held_digest: p.held_digest })
                }
                // Written, but not readable now to be confirmed: retried (the upserts repeat).
                None => {
                    let error = HandlerError::transient("bulk_reread", "not readable after its write; retried");
                    verdicts[i] = Some(Verdict::failed(error));
                }
            }
        }
        let erasures: Vec<(usize, &CommerceEvent)> = batch
            .erasures
            .range(range.clone())
            .filter_map(|g| Some((g - offset, events[g - offset].as_ref().ok()?)))
            .collect();
        let landed = &batch.landed;
        let floor = |key: &str| landed.get(key).map(|(at, _)| *at);
        // Records whose rows were not spooled: their graphs as the Composite path sends them,
        // customer data only where it is not older than what the jobs landed for the key.
        let unspooled: Vec<Work<'_>> = work
            .iter()
            .filter(|w| batch.unspooled.contains(&(offset + w.index)))
            .map(|w| Work {
                write_customer: w.write_customer
                    && floor(&w.event.customer_key)
                        .is_none_or(|f| (customer_version(w.event), enrichment_rank(w.event)) >= f),
                ..*w
            })
            .collect();
        // After a stop no more writes: the records stay transient for the next owner.
        let stopped = self.pool.stop.is_cancelled();
        let mut wrote = HashSet::new();
        if !stopped {
            self.ride_graphs(partition, &unspooled, &mut verdicts).await;
            wrote = self.retry_in_call(&mut work, &mut verdicts, &floor).await;
        }
        wrote.extend(
            unspooled
                .iter()
                .filter(|w| w.write_customer && verdicts[w.index].as_ref().is_some_and(|v| v.result.is_ok()))
                .map(|w| w.index),
        );
        for w in &work {
            let Some(verdict) = verdicts[w.index].as_mut().filter(|v| v.result.is_ok()) else { continue };
            if let Some((_, ids)) = landed.get(w.event.customer_key.as_str()) {
                for (object, id) in ids {
                    verdict.target_ids.entry(object.clone()).or_insert_with(|| id.clone());
                }
            }
        }
        // What the retries wrote is what later chunks' retries must not go below.
        for w in work.iter().filter(|w| wrote.contains(&w.index)) {
            let Some(verdict) = verdicts[w.index].as_ref() else { continue };
            let mut ids = verdict.target_ids.clone();
            ids.remove("Order");
            let at = (customer_version(w.event), enrichment_rank(w.event));
            let entry =
                batch.landed.entry(w.event.customer_key.as_str().into()).or_insert(((i64::MIN, 0), ids.clone()));
            if at >= entry.0 {
                *entry = (at, ids);
            }
        }
        let landed = &batch.landed;
        let floor = |key: &str| landed.get(key).map(|(at, _)| *at);
        self.settle(partition, &work, erasures, verdicts, &floor).await
    }

    /// Runs one upsert job to the end, its results read into `outcome`. An upload that fails
    /// transiently is sent again in a new job (the failed one aborted): Bulk 2.0 takes one
    /// upload per job, and one 503 must not fail every record of the batch.
    async fn run_job(
        &self,
        job: &Spool,
        plan: &UploadPlan,
        customer: bool,
        outcome: &mut Outcome,
    ) -> Result<(), HandlerError> {
        let spec = json!({"object": job.object, "externalIdFieldName": job.ext_field, "contentType": "CSV",
                          "operation": "upsert", "lineEnding": "LF"});
        let mut tries = 0;
        loop {
            tries += 1;
            let created = self.step(Method::POST, "/jobs/ingest", Body::Json(&spec)).await?;
            let created: Value = serde_json::from_str(&created)
                .map_err(|e| HandlerError::transient("decode_response", e.to_string()))?;
            let id = created["id"].as_str().unwrap_or_default().to_owned();
            let path = format!("/jobs/ingest/{id}");
            // A job left open or running would still land its rows later, older data over the
            // next owner's writes: aborted when this future ends without it done, even when the
            // future is dropped (a revoked partition's task is aborted after the drain timeout).
            let mut guard = AbortOnDrop { job: Some((self.client.clone(), path.clone())) };
            let uploaded = self.upload(plan, &path).await;
            let again = matches!(&uploaded, Err(e) if e.class == ErrorClass::Transient)
                && tries < UPLOAD_TRIES
                && !self.pool.stop.is_cancelled();
            let result = match uploaded {
                Ok(()) => self.finish_job(job, plan, &path, customer, outcome).await,
                Err(error) => Err(error),
            };
            if result.is_err()
                && let Some((client, path)) = guard.job.clone()
            {
                // Still armed while the abort is sent: dropped during it, the guard sends another.
                abort_job(client, path).await;
            }
            guard.job = None;
            match result {
                Err(error) if again => {
                    tracing::warn!(object = %job.object, error_code = %error.code, tries, "bulk upload failed; sent again in a new job");
                    tokio::select! {
                        () = tokio::time::sleep(self.bulk.poll) => {}
                        () = self.pool.stop.cancelled() => return Err(stopped()),
                    }
                }
                result => return result,
            }
        }
    }

    /// Uploads the job's rows (streamed from the spool) into the job at `path`, once.
    async fn upload(&self, plan: &UploadPlan, path: &str) -> Result<(), HandlerError> {
        let body = || plan.body();
        let upload = Upload(&body);
        self.client
            .call_raw("bulk", Method::PUT, &format!("{path}/batches"), Body::CsvStream(&upload))
            .await
            .map_err(|e| from_client(&e, self.quota_pause))?;
        // Stopped while uploading: the job is aborted while still Open (it never runs).
        if self.pool.stop.is_cancelled() {
            return Err(stopped());
        }
        Ok(())
    }

    /// Closes the job at `path` (`UploadComplete`). After a transient failure the close may
    /// have landed though its answer was lost: the job's state says, and it is closed again
    /// only when seen still `Open` (a second close of a closed job would be refused), with
    /// `CLOSE_TRIES` failed calls in all.
    async fn close(&self, path: &str) -> Result<(), HandlerError> {
        let mut tries = 0;
        loop {
            let closed = self.client.call("bulk", Method::PATCH, path, Some(&json!({"state": "UploadComplete"}))).await;
            let mut error = match closed {
                Ok(_) => return Ok(()),
                Err(e) => from_client(&e, self.quota_pause),
            };
            // Looks at the job until it is seen open (then closed again) or settled.
            loop {
                tries += 1;
                if error.class != ErrorClass::Transient || tries >= CLOSE_TRIES {
                    return Err(error);
                }
                tokio::select! {
                    () = tokio::time::sleep(self.bulk.poll) => {}
                    () = self.pool.stop.cancelled() => return Err(stopped()),
                }
                match self.client.call("bulk", Method::GET, path, None).await {
                    Ok(info) => match info["state"].as_str() {
                        Some("UploadComplete" | "InProgress" | "JobComplete") => return Ok(()),
                        Some("Failed" | "Aborted") => {
                            let message = info["errorMessage"].as_str().unwrap_or("job failed").to_owned();
                            return Err(HandlerError::transient("bulk_job_failed", message));
                        }
                        _ => break,
                    },
                    Err(e) => error = from_client(&e, self.quota_pause),
                }
            }
        }
    }

    async fn finish_job(
        &self,
        job: &Spool,
        plan: &UploadPlan,
        path: &str,
        customer: bool,
        outcome: &mut Outcome,
    ) -> Result<(), HandlerError> {
        let fail = |e: crate::client::Error| from_client(&e, self.quota_pause);
        self.close(path).await?;
        let started = Instant::now();
        let mut wait = self.bulk.poll / 4;
        loop {
            // On shutdown the job is aborted (by the caller): its records go back to the topic
            // for the next owner, and no job keeps writing behind its back.
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.pool.stop.cancelled() => return Err(stopped()),
            }
            wait = (wait * 2).min(self.bulk.poll);
            match self.client.call("bulk", Method::GET, path, None).await {
                Ok(info) => match info["state"].as_str() {
                    Some("JobComplete") => break,
                    Some("Failed" | "Aborted") => {
                        let message = info["errorMessage"].as_str().unwrap_or("job failed").to_owned();
                        return Err(HandlerError::transient("bulk_job_failed", message));
                    }
                    _ => {}
                },
                Err(e) => {
                    // A look that failed transiently costs nothing but the look: the job runs on.
                    let error = fail(e);
                    if error.class != ErrorClass::Transient {
                        return Err(error);
                    }
                }
            }
            if started.elapsed() > self.bulk.timeout {
                return Err(HandlerError::transient(
                    "bulk_timeout",
                    format!("job not done in {:?}", self.bulk.timeout),
                ));
            }
        }
        let Outcome { failed, ids, landed } = outcome;
        // Rows in neither result file (Salesforce lists them in `unprocessedrecords/`) are
        // not applied: their records are retried.
        let mut seen = vec![false; plan.keep.len()];
        let successes = |ext: String, id: String| {
            let Some(row) = job.rows.get(ext.as_str()) else { return };
            seen[row.line as usize] = true;
            if customer {
                for i in &row.owners {
                    let at = landed.entry(*i as usize).or_insert(row.rank);
                    *at = (*at).max(row.rank);
                }
            }
            if job.object != "OrderItem" {
                for i in &row.owners {
                    ids.entry(*i as usize).or_default().insert(job.object.clone(), id.clone());
                }
            }
        };
        self.results(&format!("{path}/successfulResults"), &job.ext_field, "sf__Id", successes).await?;
        let failures = |ext: String, error: String| {
            let Some(row) = job.rows.get(ext.as_str()) else { return };
            seen[row.line as usize] = true;
            let (code, message, fields) = row_error(&error);
            let error = classify(400, &code, &format!("{}: {message} (bulk)", job.object), &fields, self.quota_pause);
            for i in &row.owners {
                failed.entry(*i as usize).or_insert_with(|| (error.clone(), true));
            }
        };
        self.results(&format!("{path}/failedResults"), &job.ext_field, "sf__Error", failures).await?;
        let unprocessed =
            HandlerError::transient("bulk_unprocessed", format!("{}: row not processed (bulk)", job.object));
        for row in job.rows.values().filter(|r| plan.keep[r.line as usize] && !seen[r.line as usize]) {
            for i in &row.owners {
                failed.entry(*i as usize).or_insert_with(|| (unprocessed.clone(), false));
            }
        }
        Ok(())
    }

    /// The spool bound's peak so far, in bytes.
    pub fn bulk_spool_peak(&self) -> u64 {
        self.spool_budget.peak_bytes()
    }

    /// Reads two columns of a results CSV as it arrives, trying a transient failure again a
    /// few times (the results stay; `each` must take a row twice without harm).
    async fn results(
        &self,
        path: &str,
        key: &str,
        value: &str,
        mut each: impl FnMut(String, String) + Send,
    ) -> Result<(), HandlerError> {
        let mut tries = 0;
        loop {
            let mut pairs = ResultPairs::new(key, value, &mut each);
            let read = self.client.call_chunks("bulk", Method::GET, path, &mut |bytes| pairs.feed(bytes)).await;
            match read {
                Ok(()) => {
                    pairs.finish();
                    return Ok(());
                }
                Err(e) => {
                    let error = from_client(&e, self.quota_pause);
                    tries += 1;
                    if error.class != ErrorClass::Transient || tries >= 4 {
                        return Err(error);
                    }
                    tokio::time::sleep(self.bulk.poll).await;
                }
            }
        }
    }

    /// One call of a job's life, tried again (up to four times in all) after a transient
    /// failure, so one 503 does not cost a whole job.
    async fn step(&self, method: Method, path: &str, body: Body<'_>) -> Result<String, HandlerError> {
        let mut tries = 0;
        loop {
            match self.client.call_raw("bulk", method.clone(), path, body).await {
                Ok(text) => return Ok(text),
                Err(e) => {
                    let error = from_client(&e, self.quota_pause);
                    tries += 1;
                    if error.class != ErrorClass::Transient || tries >= 4 {
                        return Err(error);
                    }
                    tokio::time::sleep(self.bulk.poll).await;
                }
            }
        }
    }
}

/// Aborts its job, if still armed, when dropped (see [`Sink::run_job`]).
struct AbortOnDrop {
    job: Option<(crate::client::SalesforceClient, String)>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some((client, path)) = self.job.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(abort_job(client, path))),
            Err(_) => {
                metrics::BULK_ABORTS.with_label_values(&["failed"]).inc();
                tracing::warn!(job = %path, "bulk job dropped without a runtime to abort it; it may still write");
            }
        }
    }
}

/// Sends `PATCH state Aborted` for the job at `path`; a failure is logged and counted (the job
/// may still write: Salesforce ends it at its own timeout).
async fn abort_job(client: crate::client::SalesforceClient, path: String) {
    match client.call("bulk", Method::PATCH, &path, Some(&json!({"state": "Aborted"}))).await {
        Ok(_) => metrics::BULK_ABORTS.with_label_values(&["sent"]).inc(),
        Err(e) => {
            metrics::BULK_ABORTS.with_label_values(&["failed"]).inc();
            tracing::warn!(job = %path, error = %e, "bulk job not aborted; it may still write");
        }
    }
}

pub(super) fn stopped() -> HandlerError {
    HandlerError::transient("bulk_stopped", "the service is stopping: job aborted, records retried")
}
