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
use std::io::{BufRead, BufReader, BufWriter, Seek, Write};
use std::time::{Duration, Instant};

use elo_events::{CommerceEvent, OutcomeStatus};
use elo_kafka::{ErrorClass, HandlerError};
use reqwest::Method;
use serde_json::{Value, json};

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

/// What is kept in memory of a row spooled for a job.
#[derive(Debug)]
struct RowInfo {
    /// The spool line that is uploaded (of several for one external id: the newest data).
    line: u32,
    /// When the row's data was true (customer rows: the customer version), to pick the line.
    rank: i64,
    /// Batch indices of the records it belongs to.
    owners: Vec<u32>,
}

/// One job's rows: an object upserted by an external-id field, rows spooled to a file as
/// JSON lines `[ext, [[column, cell], ...]]`.
struct Spool {
    object: String,
    ext_field: String,
    file: Option<BufWriter<std::fs::File>>,
    columns: Vec<String>,
    column_at: HashMap<String, usize>,
    rows: HashMap<Box<str>, RowInfo>,
    lines: u32,
}

impl Spool {
    fn new() -> Self {
        Self {
            object: String::new(),
            ext_field: String::new(),
            file: None,
            columns: Vec::new(),
            column_at: HashMap::new(),
            rows: HashMap::new(),
            lines: 0,
        }
    }

    fn column(&mut self, name: &str) -> usize {
        if let Some(at) = self.column_at.get(name) {
            return *at;
        }
        self.columns.push(name.to_owned());
        self.column_at.insert(name.to_owned(), self.columns.len() - 1);
        self.columns.len() - 1
    }

    /// Spools one row; the same external id again (an account in two chunks) is one row,
    /// sent with the newest data.
    fn add(
        &mut self,
        ext: String,
        cells: Vec<(usize, String)>,
        owners: &BTreeSet<usize>,
        rank: i64,
    ) -> std::io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(BufWriter::new(tempfile::tempfile()?)),
        };
        serde_json::to_writer(&mut *file, &(&ext, &cells))?;
        file.write_all(b"\n")?;
        let line = self.lines;
        self.lines += 1;
        let owners = owners.iter().map(|i| *i as u32);
        match self.rows.get_mut(ext.as_str()) {
            Some(row) => {
                if rank >= row.rank {
                    (row.line, row.rank) = (line, rank);
                }
                row.owners.extend(owners);
                row.owners.sort_unstable();
                row.owners.dedup();
            }
            None => {
                self.rows.insert(ext.into_boxed_str(), RowInfo { line, rank, owners: owners.collect() });
            }
        }
        Ok(())
    }

    /// The upload: a CSV made from the spool as it is sent, of the rows some of whose
    /// records have not failed.
    fn upload(&mut self, failed: &HashMap<usize, (HandlerError, bool)>) -> std::io::Result<Option<UploadPlan>> {
        let Some(file) = &mut self.file else { return Ok(None) };
        file.flush()?;
        let mut keep = vec![false; self.lines as usize];
        let mut rows = 0;
        for row in self.rows.values() {
            if row.owners.iter().any(|i| !failed.contains_key(&(*i as usize))) {
                keep[row.line as usize] = true;
                rows += 1;
            }
        }
        if rows == 0 {
            return Ok(None);
        }
        // The external id first, the other columns by name.
        let mut names: Vec<(usize, &str)> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != self.ext_field)
            .map(|(i, c)| (i, c.as_str()))
            .collect();
        names.sort_by(|a, b| a.1.cmp(b.1));
        let mut position = vec![usize::MAX; self.columns.len()];
        let mut header = vec![quote(&self.ext_field)];
        for (n, (i, name)) in names.iter().enumerate() {
            position[*i] = n + 1;
            header.push(quote(name));
        }
        let header = format!("{}\n", header.join(","));
        Ok(Some(UploadPlan { file: file.get_ref().try_clone()?, keep, position, header, rows }))
    }
}

/// A job's upload, made anew for each try.
struct UploadPlan {
    file: std::fs::File,
    keep: Vec<bool>,
    /// Spool column → CSV column.
    position: Vec<usize>,
    header: String,
    rows: usize,
}

impl UploadPlan {
    fn body(&self) -> std::io::Result<reqwest::Body> {
        Ok(reqwest::Body::wrap_stream(futures::stream::iter(self.rows()?)))
    }

    fn rows(&self) -> std::io::Result<CsvRows> {
        let mut file = self.file.try_clone()?;
        file.seek(std::io::SeekFrom::Start(0))?;
        Ok(CsvRows {
            reader: BufReader::new(file),
            keep: self.keep.clone(),
            position: self.position.clone(),
            width: self.position.iter().filter(|p| **p != usize::MAX).count() + 1,
            header: Some(self.header.clone().into_bytes()),
            line: 0,
            done: false,
        })
    }
}

/// The CSV of a spool, about [`UPLOAD_PIECE`] bytes at a time.
struct CsvRows {
    reader: BufReader<std::fs::File>,
    keep: Vec<bool>,
    position: Vec<usize>,
    width: usize,
    header: Option<Vec<u8>>,
    line: usize,
    done: bool,
}

const UPLOAD_PIECE: usize = 64 << 10;

impl Iterator for CsvRows {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(header) = self.header.take() {
            return Some(Ok(header));
        }
        if self.done {
            return None;
        }
        let mut out = Vec::with_capacity(UPLOAD_PIECE + 1024);
        let mut text = String::new();
        while out.len() < UPLOAD_PIECE {
            text.clear();
            match self.reader.read_line(&mut text) {
                Ok(0) => {
                    self.done = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            let line = self.line;
            self.line += 1;
            if !self.keep.get(line).copied().unwrap_or(false) {
                continue;
            }
            let (ext, cells): (String, Vec<(usize, String)>) = match serde_json::from_str(&text) {
                Ok(row) => row,
                Err(e) => return Some(Err(std::io::Error::other(e))),
            };
            let mut row = vec![String::new(); self.width];
            row[0] = ext;
            for (column, value) in cells {
                if let Some(at) = self.position.get(column).filter(|p| **p != usize::MAX) {
                    row[*at] = value;
                }
            }
            let row: Vec<String> = row.iter().map(|c| quote(c)).collect();
            out.extend_from_slice(row.join(",").as_bytes());
            out.push(b'\n');
        }
        if out.is_empty() && self.done { None } else { Some(Ok(out)) }
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

/// Decodes a percent-encoded path segment.
fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = segment.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON value as a Bulk CSV cell (`#N/A` clears a field, an empty cell leaves it alone).
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "#N/A".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// Splits Bulk 2.0's `sf__Error` (`CODE:message:fields --`) into code, message and fields.
fn row_error(text: &str) -> (String, String, Vec<String>) {
    let text = text.trim_end_matches(" --").trim_end_matches("--");
    let (code, rest) = text.split_once(':').unwrap_or((text, ""));
    let (message, fields) = rest.rsplit_once(':').unwrap_or((rest, ""));
    let fields = fields.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect();
    (code.trim().to_owned(), message.trim().to_owned(), fields)
}

/// RFC 4180 CSV (quoted cells, doubled quotes, LF or CRLF) read as it arrives, in pieces
/// that may split a cell or a UTF-8 character anywhere.
#[derive(Default)]
struct CsvReader {
    row: Vec<String>,
    cell: Vec<u8>,
    quoted: bool,
    /// A quote inside a quoted cell: a doubled quote or the cell's end, per the next byte.
    quote_seen: bool,
    /// A `\r` ended the row: a `\n` right after it is part of the same line end.
    after_cr: bool,
    any: bool,
}

impl CsvReader {
    fn end_cell(&mut self) {
        let cell = std::mem::take(&mut self.cell);
        self.row.push(String::from_utf8(cell).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()));
    }

    fn feed(&mut self, bytes: &[u8], each: &mut impl FnMut(Vec<String>)) {
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            if self.quote_seen {
                self.quote_seen = false;
                if b == b'"' {
                    self.cell.push(b'"');
                    continue;
                }
                self.quoted = false;
            }
            self.any = true;
            if self.quoted {
                if b == b'"' {
                    self.quote_seen = true;
                } else {
                    self.cell.push(b);
                }
            } else if b == b'"' && self.cell.is_empty() {
                self.quoted = true;
            } else if b == b',' {
                self.end_cell();
            } else if b == b'\n' || b == b'\r' {
                self.after_cr = b == b'\r';
                self.end_cell();
                each(std::mem::take(&mut self.row));
                self.any = false;
            } else {
                self.cell.push(b);
            }
        }
    }

    fn finish(mut self, each: &mut impl FnMut(Vec<String>)) {
        if self.any {
            self.end_cell();
            each(std::mem::take(&mut self.row));
        }
    }
}

/// Two columns of a results CSV, row by row (a job's results hold every column it was
/// sent), as the CSV arrives: `each(key, value)`.
struct ResultPairs<F: FnMut(String, String)> {
    csv: CsvReader,
    names: (String, String),
    columns: Option<(Option<usize>, Option<usize>)>,
    each: F,
}

impl<F: FnMut(String, String)> ResultPairs<F> {
    fn new(key: &str, value: &str, each: F) -> Self {
        Self { csv: CsvReader::default(), names: (key.to_owned(), value.to_owned()), columns: None, each }
    }

    fn row(
        columns: &mut Option<(Option<usize>, Option<usize>)>,
        names: &(String, String),
        each: &mut F,
        mut row: Vec<String>,
    ) {
        match *columns {
            None => {
                let at = |name: &str| row.iter().position(|c| c == name);
                *columns = Some((at(&names.0), at(&names.1)));
            }
            Some((k, v)) => {
                let mut take =
                    |i: Option<usize>| i.and_then(|i| row.get_mut(i)).map(std::mem::take).unwrap_or_default();
                let key = take(k);
                each(key, take(v));
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let (columns, names, each) = (&mut self.columns, &self.names, &mut self.each);
        self.csv.feed(bytes, &mut |row| Self::row(columns, names, each, row));
    }

    fn finish(self) {
        let Self { csv, names, mut columns, mut each } = self;
        csv.finish(&mut |row| Self::row(&mut columns, &names, &mut each, row));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `csv` one byte at a time (a piece may end anywhere, even inside a character).
    fn result_pairs(csv: &str, key: &str, value: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut pairs = ResultPairs::new(key, value, |k, v| out.push((k, v)));
        for b in csv.as_bytes() {
            pairs.feed(std::slice::from_ref(b));
        }
        pairs.finish();
        out
    }

    #[test]
    fn bulk_errors_and_cells_read_like_salesforce_writes_them() {
        let (code, message, fields) =
            row_error("REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --");
        assert_eq!(code, "REQUIRED_FIELD_MISSING");
        assert_eq!(message, "Required fields are missing: [LastName]");
        assert_eq!(fields, vec!["LastName"]);
        assert_eq!(decode("c%3A42"), "c:42");
        assert_eq!(cell(&Value::Null), "#N/A");
        let rows = result_pairs("\"sf__Id\",\"Elo_Id__c\"\n\"001\",\"c:1, \"\"x\"\"\"\n", "Elo_Id__c", "sf__Id");
        assert_eq!(rows, vec![("c:1, \"x\"".to_owned(), "001".to_owned())]);
        let csv = "\"sf__Id\",\"Elo_Id__c\"\r\n\"001\",\"c:1 São\"\r\n\"002\",c:2";
        assert_eq!(
            result_pairs(csv, "Elo_Id__c", "sf__Id"),
            vec![("c:1 São".into(), "001".into()), ("c:2".into(), "002".into())]
        );
    }

    /// The upload is made from the spool: one row per external id with the newest customer
    /// data, cells under the right columns, rows whose records all failed left out.
    #[test]
    fn a_spooled_job_uploads_one_row_per_external_id_with_the_newest_data() {
        let mut spool = Spool::new();
        spool.ext_field = "Elo_Id__c".into();
        let (name, city) = (spool.column("Name"), spool.column("BillingCity"));
        let owners = |i: &[usize]| i.iter().copied().collect::<BTreeSet<usize>>();
        spool.add("c:1".into(), vec![(name, "New \"Ana\"".into()), (city, "Rio".into())], &owners(&[0]), 20).unwrap();
        spool.add("c:2".into(), vec![(name, "Bo".into())], &owners(&[1]), 5).unwrap();
        // The same account again with older data (an older order later in the batch).
        spool.add("c:1".into(), vec![(name, "Old".into())], &owners(&[2]), 10).unwrap();
        spool.add("c:3".into(), vec![(city, "Natal".into())], &owners(&[3]), 5).unwrap();
        let failed: HashMap<usize, (HandlerError, bool)> =
            [(3, (HandlerError::permanent("X", "x"), false))].into_iter().collect();
        let plan = spool.upload(&failed).unwrap().unwrap();
        let csv: Vec<u8> = plan.rows().unwrap().flat_map(Result::unwrap).collect();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "\"Elo_Id__c\",\"BillingCity\",\"Name\"\n\"c:1\",\"Rio\",\"New \"\"Ana\"\"\"\n\"c:2\",\"\",\"Bo\"\n"
        );
        assert_eq!(plan.rows, 2);
        assert_eq!(spool.rows["c:1"].owners, vec![0, 2]);
        // Made anew for a second try.
        assert_eq!(plan.rows().unwrap().count(), plan.rows().unwrap().count());
    }
}
