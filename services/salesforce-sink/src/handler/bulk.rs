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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use elo_events::{CommerceEvent, OutcomeStatus};
use elo_kafka::{ErrorClass, HandlerError};
use reqwest::Method;
use serde_json::{Value, json};

use super::bulk_csv::{ResultPairs, Spool, UploadPlan, cell, decode, row_error};
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
}

impl Default for BulkSettings {
    fn default() -> Self {
        Self { min_records: 1000, poll: Duration::from_secs(1), timeout: Duration::from_secs(600) }
    }
}

/// The phases, in dependency order, by the first letter of a graph node's reference.
const PHASES: [char; 5] = ['a', 'c', 'o', 'i', 'x'];

/// A record the batch writes: what its [`Work`] said when its rows were built.
#[derive(Clone, Copy, Debug)]
struct Planned {
    write_customer: bool,
    held_digest: Option<u64>,
}

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
        }
    }
}

/// A job's outcome per record: failures (and whether to resend at once through Composite
/// Graph) and Salesforce ids.
#[derive(Default)]
struct Outcome {
    failed: HashMap<usize, (HandlerError, bool)>,
    ids: HashMap<usize, BTreeMap<String, String>>,
}

impl Sink {
    /// Pass one over a chunk (`offset`: its first record's batch index): the newest version
    /// of each entity in the batch.
    pub fn bulk_note(&self, batch: &mut BulkBatch, offset: usize, events: &[Result<CommerceEvent, HandlerError>]) {
        let aliased = self.aliases(batch.partition, events);
        self.note_newest(events, &aliased, offset, &mut batch.newest);
    }

    /// Pass two over a chunk: staleness, products, and the chunk's rows spooled for the jobs.
    pub async fn bulk_prepare(
        &self,
        batch: &mut BulkBatch,
        offset: usize,
        events: &[Result<CommerceEvent, HandlerError>],
    ) {
        let partition = batch.partition;
        let aliased = self.aliases(partition, events);
        let mut verdicts = vec![None; events.len()];
        let (work, erasures) = self.select(partition, events, &aliased, &batch.newest, offset, &mut verdicts);
        let failed = self.ensure_entries(&work).await;
        // Indices from here on are the batch's.
        let mut planned = Vec::with_capacity(work.len());
        for w in work {
            match failed.get(&w.index) {
                Some(error) => verdicts[w.index] = Some(Verdict::failed(error.clone())),
                None => {
                    let planned_work = Work { index: offset + w.index, ..w };
                    batch.planned.insert(
                        planned_work.index,
                        Planned { write_customer: w.write_customer, held_digest: w.held_digest },
                    );
                    planned.push(planned_work);
                }
            }
        }
        batch.erasures.extend(erasures.iter().map(|(i, _)| offset + i));
        for (i, v) in verdicts.into_iter().enumerate() {
            if v.is_some() {
                batch.verdicts[offset + i] = v;
            }
        }
        if let Err(e) = self.spool(batch, &planned) {
            let error = HandlerError::transient("bulk_spool", e.to_string());
            tracing::warn!(error = %e, "bulk rows not spooled; the records are retried");
            for w in &planned {
                batch.verdicts[w.index] = Some(Verdict::failed(error.clone()));
                batch.planned.remove(&w.index);
            }
        }
    }

    /// Spools the rows of `work` (batch indices) into the batch's jobs.
    fn spool(&self, batch: &mut BulkBatch, work: &[Work<'_>]) -> std::io::Result<()> {
        let builder = Builder { mapping: &self.mapping, org: &self.org, version: self.client.api_version() };
        let customer_at: HashMap<usize, i64> = work.iter().map(|w| (w.index, customer_version(w.event))).collect();
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
                        owners.iter().filter_map(|i| customer_at.get(i)).copied().max().unwrap_or(0)
                    } else {
                        0
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
                    job.add(value, cells, &owners, rank)?;
                }
            }
        }
        Ok(())
    }

    /// Runs the batch's jobs in order; every planned record gets its verdict.
    pub async fn bulk_run(&self, batch: &mut BulkBatch) {
        // Every chunk is prepared: the newest versions are no longer needed.
        batch.newest = HashMap::new();
        let mut outcome = Outcome::default();
        for job in &mut batch.jobs {
            let plan = match job.upload(&outcome.failed) {
                Ok(Some(plan)) => plan,
                Ok(None) => continue,
                Err(e) => {
                    let error = HandlerError::transient("bulk_spool", e.to_string());
                    for i in batch.planned.keys() {
                        outcome.failed.entry(*i).or_insert_with(|| (error.clone(), false));
                    }
                    continue;
                }
            };
            if let Err(error) = self.run_job(job, &plan, &mut outcome).await {
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
        metrics::RECORDS_PER_CALL.observe(batch.planned.len() as f64);
        for i in batch.planned.keys() {
            batch.verdicts[*i] = Some(match outcome.failed.remove(i) {
                Some((error, true)) if error.class == ErrorClass::Transient => Verdict::graph_failed(error),
                Some((error, _)) => Verdict::failed(error),
                None => Verdict {
                    target_ids: outcome.ids.remove(i).unwrap_or_default(),
                    ..Verdict::ok(OutcomeStatus::Applied)
                },
            });
        }
    }

    /// Pass three over a chunk: records whose rows hit a lock resent through Composite Graph,
    /// confirmations, e-mail matches and erasures; the chunk's verdicts.
    pub async fn bulk_finish(
        &self,
        batch: &mut BulkBatch,
        offset: usize,
        events: &[Result<CommerceEvent, HandlerError>],
    ) -> Vec<Verdict> {
        let partition = batch.partition;
        let aliased = self.aliases(partition, events);
        let event = |i: usize| aliased[i].as_ref().or(events[i].as_ref().ok());
        let range = offset..offset + events.len();
        let work: Vec<Work<'_>> = batch
            .planned
            .range(range.clone())
            .filter_map(|(g, p)| {
                let event = event(g - offset)?;
                Some(Work { index: g - offset, event, write_customer: p.write_customer, held_digest: p.held_digest })
            })
            .collect();
        let erasures: Vec<(usize, &CommerceEvent)> = batch
            .erasures
            .range(range.clone())
            .filter_map(|g| Some((g - offset, events[g - offset].as_ref().ok()?)))
            .collect();
        let mut verdicts: Vec<Option<Verdict>> = batch.verdicts[range].iter_mut().map(Option::take).collect();
        self.retry_in_call(&work, &mut verdicts).await;
        self.settle(partition, &work, erasures, verdicts).await
    }

    /// Runs one upsert job to the end, its results read into `outcome`.
    async fn run_job(&self, job: &Spool, plan: &UploadPlan, outcome: &mut Outcome) -> Result<(), HandlerError> {
        let spec = json!({"object": job.object, "externalIdFieldName": job.ext_field, "contentType": "CSV",
                          "operation": "upsert", "lineEnding": "LF"});
        let created = self.step(Method::POST, "/jobs/ingest", Body::Json(&spec)).await?;
        let created: Value =
            serde_json::from_str(&created).map_err(|e| HandlerError::transient("decode_response", e.to_string()))?;
        let id = created["id"].as_str().unwrap_or_default().to_owned();
        let path = format!("/jobs/ingest/{id}");
        let result = self.finish_job(job, plan, &path, outcome).await;
        if result.is_err() {
            // Best effort: a job left open or running would still write later.
            let _ = self.client.call("bulk", Method::PATCH, &path, Some(&json!({"state": "Aborted"}))).await;
        }
        result
    }

    async fn finish_job(
        &self,
        job: &Spool,
        plan: &UploadPlan,
        path: &str,
        outcome: &mut Outcome,
    ) -> Result<(), HandlerError> {
        let fail = |e: crate::client::Error| from_client(&e, self.quota_pause);
        let body = || plan.body();
        let upload = Upload(&body);
        self.client
            .call_raw("bulk", Method::PUT, &format!("{path}/batches"), Body::CsvStream(&upload))
            .await
            .map_err(fail)?;
        self.client.call("bulk", Method::PATCH, path, Some(&json!({"state": "UploadComplete"}))).await.map_err(fail)?;
        let started = Instant::now();
        let mut wait = self.bulk.poll / 4;
        loop {
            tokio::time::sleep(wait).await;
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
        let Outcome { failed, ids } = outcome;
        let successes = |ext: String, id: String| {
            let Some(row) = job.rows.get(ext.as_str()) else { return };
            if job.object != "OrderItem" {
                for i in &row.owners {
                    ids.entry(*i as usize).or_default().insert(job.object.clone(), id.clone());
                }
            }
        };
        self.results(&format!("{path}/successfulResults"), &job.ext_field, "sf__Id", successes).await?;
        let failures = |ext: String, error: String| {
            let Some(row) = job.rows.get(ext.as_str()) else { return };
            let (code, message, fields) = row_error(&error);
            let error = classify(400, &code, &format!("{}: {message} (bulk)", job.object), &fields, self.quota_pause);
            for i in &row.owners {
                failed.entry(*i as usize).or_insert_with(|| (error.clone(), true));
            }
        };
        self.results(&format!("{path}/failedResults"), &job.ext_field, "sf__Error", failures).await
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
