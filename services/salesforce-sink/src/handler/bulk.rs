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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use elo_events::OutcomeStatus;
use elo_kafka::{ErrorClass, HandlerError};
use reqwest::Method;
use serde_json::{Value, json};

use super::{Sink, Verdict, classify, from_client};
use crate::client::Body;
use crate::graph::{Builder, Owner, Work};
use crate::metrics;

/// When and how the sink uses Bulk API 2.0.
#[derive(Clone, Debug)]
pub struct BulkSettings {
    /// Batches of at least this many records go through Bulk API 2.0 (0: never).
    pub min_records: usize,
    /// Wait between looks at a running job.
    pub poll: Duration,
    /// A job not finished by then is aborted and its records retried.
    pub timeout: Duration,
}

impl Default for BulkSettings {
    fn default() -> Self {
        Self { min_records: 1000, poll: Duration::from_secs(1), timeout: Duration::from_secs(600) }
    }
}

/// One CSV row of a job: its external id, its cells, and the batch records it belongs to.
#[derive(Debug)]
struct Row {
    ext: String,
    /// Column (shared by every row of the job: a backlog has thousands) → cell.
    cells: BTreeMap<Arc<str>, String>,
    owners: BTreeSet<usize>,
}

/// One job: an object upserted by an external-id field.
#[derive(Debug, Default)]
struct JobPlan {
    object: String,
    ext_field: String,
    rows: Vec<Row>,
}

/// The one shared copy of a column name.
fn intern(columns: &mut HashMap<String, Arc<str>>, name: &str) -> Arc<str> {
    if let Some(shared) = columns.get(name) {
        return shared.clone();
    }
    let shared: Arc<str> = Arc::from(name);
    columns.insert(name.to_owned(), shared.clone());
    shared
}

/// The phases, in dependency order, by the first letter of a graph node's reference.
const PHASES: [char; 5] = ['a', 'c', 'o', 'i', 'x'];

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

impl JobPlan {
    fn csv(&self) -> String {
        let mut columns: BTreeSet<&str> = BTreeSet::new();
        for row in &self.rows {
            columns.extend(row.cells.keys().map(|c| &**c));
        }
        let columns: Vec<&str> = std::iter::once(self.ext_field.as_str())
            .chain(columns.into_iter().filter(|c| *c != self.ext_field))
            .collect();
        let mut out = columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(",");
        out.push('\n');
        for row in &self.rows {
            let line: Vec<String> = columns
                .iter()
                .map(|c| {
                    if *c == self.ext_field {
                        quote(&row.ext)
                    } else {
                        quote(row.cells.get(*c).map_or("", String::as_str))
                    }
                })
                .collect();
            out.push_str(&line.join(","));
            out.push('\n');
        }
        out
    }
}

/// Splits Bulk 2.0's `sf__Error` (`CODE:message:fields --`) into code, message and fields.
fn row_error(text: &str) -> (String, String, Vec<String>) {
    let text = text.trim_end_matches(" --").trim_end_matches("--");
    let (code, rest) = text.split_once(':').unwrap_or((text, ""));
    let (message, fields) = rest.rsplit_once(':').unwrap_or((rest, ""));
    let fields = fields.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect();
    (code.trim().to_owned(), message.trim().to_owned(), fields)
}

/// Two columns of a results CSV, row by row (a job's results hold every column it was sent).
fn result_pairs(csv: &str, key: &str, value: &str) -> Vec<(String, String)> {
    let mut columns: Option<(Option<usize>, Option<usize>)> = None;
    let mut out = Vec::new();
    read_csv(csv, |mut row| match columns {
        None => {
            let at = |name: &str| row.iter().position(|c| c == name);
            columns = Some((at(key), at(value)));
        }
        Some((k, v)) => {
            let mut take = |i: Option<usize>| i.and_then(|i| row.get_mut(i)).map(std::mem::take).unwrap_or_default();
            let key = take(k);
            out.push((key, take(v)));
        }
    });
    out
}

/// RFC 4180 CSV (quoted cells, doubled quotes, LF or CRLF).
fn read_csv(text: &str, mut each: impl FnMut(Vec<String>)) {
    let (mut row, mut cell) = (Vec::new(), String::new());
    let (mut quoted, mut any) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    cell.push('"');
                    chars.next();
                }
                '"' => quoted = false,
                _ => cell.push(c),
            }
        } else if c == '"' && cell.is_empty() {
            quoted = true;
        } else if c == ',' {
            row.push(std::mem::take(&mut cell));
        } else if c == '\n' || c == '\r' {
            if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
            }
            row.push(std::mem::take(&mut cell));
            each(std::mem::take(&mut row));
            any = false;
        } else {
            cell.push(c);
        }
    }
    if any {
        row.push(cell);
        each(row);
    }
}

impl Sink {
    /// Writes `work` through Bulk API 2.0 jobs; sets every record's verdict.
    pub(super) async fn write_bulk(&self, work: &[Work<'_>], verdicts: &mut [Option<Verdict>]) {
        let builder = Builder { mapping: &self.mapping, org: &self.org, version: self.client.api_version() };
        let mut jobs: Vec<JobPlan> = PHASES.iter().map(|_| JobPlan::default()).collect();
        let mut index: Vec<HashMap<String, usize>> = PHASES.iter().map(|_| HashMap::new()).collect();
        let mut columns: HashMap<String, Arc<str>> = HashMap::new();
        // Rows are built a slice of records at a time (the graphs of a whole backlog batch as
        // JSON would hold tens of KB per record) and kept as cells only.
        let requests =
            crate::graph::slices(work, super::GRAPH_SLICE).into_iter().flat_map(|s| builder.build(&s, false));
        for request in requests {
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
                    let mut cells: BTreeMap<Arc<str>, String> = BTreeMap::new();
                    for (k, v) in node["body"].as_object().into_iter().flatten() {
                        match v.as_object() {
                            Some(lookup) => {
                                for (f, x) in lookup {
                                    cells.insert(intern(&mut columns, &format!("{k}.{f}")), cell(x));
                                }
                            }
                            None => {
                                cells.insert(intern(&mut columns, k), cell(v));
                            }
                        }
                    }
                    let job = &mut jobs[phase];
                    job.object.clone_from(&object);
                    job.ext_field.clone_from(&field);
                    // One row per external id: the same account in two graphs is one row.
                    match index[phase].get(&value) {
                        Some(&at) => {
                            job.rows[at].cells.extend(cells);
                            job.rows[at].owners.extend(owners);
                        }
                        None => {
                            index[phase].insert(value.clone(), job.rows.len());
                            job.rows.push(Row { ext: value, cells, owners });
                        }
                    }
                }
            }
        }
        // Failed records, and whether to resend them at once through Composite Graph (a row's
        // lock error: a few records) or leave them to the runtime's retry (a whole job failed:
        // the batch comes back and the confirmed part of it is skipped).
        let mut failed: HashMap<usize, (HandlerError, bool)> = HashMap::new();
        let mut ids: HashMap<usize, BTreeMap<String, String>> = HashMap::new();
        for mut job in jobs {
            job.rows.retain(|r| r.owners.iter().any(|i| !failed.contains_key(i)));
            if job.rows.is_empty() {
                continue;
            }
            match self.run_job(&job).await {
                Err(error) => {
                    tracing::warn!(object = %job.object, error_code = %error.code, rows = job.rows.len(), "bulk job failed");
                    for row in &job.rows {
                        for i in &row.owners {
                            failed.entry(*i).or_insert_with(|| (error.clone(), false));
                        }
                    }
                }
                Ok((successes, failures)) => {
                    let by_ext: HashMap<&str, &Row> = job.rows.iter().map(|r| (r.ext.as_str(), r)).collect();
                    for (ext, id) in successes {
                        let Some(row) = by_ext.get(ext.as_str()) else { continue };
                        if job.object != "OrderItem" {
                            for i in &row.owners {
                                ids.entry(*i).or_default().insert(job.object.clone(), id.clone());
                            }
                        }
                    }
                    for (ext, error) in failures {
                        let Some(row) = by_ext.get(ext.as_str()) else { continue };
                        let (code, message, fields) = row_error(&error);
                        let error = classify(
                            400,
                            &code,
                            &format!("{}: {message} (bulk)", job.object),
                            &fields,
                            self.quota_pause,
                        );
                        for i in &row.owners {
                            failed.entry(*i).or_insert_with(|| (error.clone(), true));
                        }
                    }
                }
            }
        }
        metrics::RECORDS_PER_CALL.observe(work.len() as f64);
        for w in work {
            verdicts[w.index] = Some(match failed.remove(&w.index) {
                Some((error, true)) if error.class == ErrorClass::Transient => Verdict::graph_failed(error),
                Some((error, _)) => Verdict::failed(error),
                None => Verdict {
                    target_ids: ids.remove(&w.index).unwrap_or_default(),
                    ..Verdict::ok(OutcomeStatus::Applied)
                },
            });
        }
    }

    /// Runs one upsert job to the end; returns (external id, Salesforce id) of the successful
    /// rows and (external id, `sf__Error`) of the failed ones.
    async fn run_job(&self, job: &JobPlan) -> Result<(Vec<(String, String)>, Vec<(String, String)>), HandlerError> {
        let spec = json!({"object": job.object, "externalIdFieldName": job.ext_field, "contentType": "CSV",
                          "operation": "upsert", "lineEnding": "LF"});
        let created = self.step(Method::POST, "/jobs/ingest", Body::Json(&spec)).await?;
        let created: Value =
            serde_json::from_str(&created).map_err(|e| HandlerError::transient("decode_response", e.to_string()))?;
        let id = created["id"].as_str().unwrap_or_default().to_owned();
        let path = format!("/jobs/ingest/{id}");
        let result = self.finish_job(job, &path).await;
        if result.is_err() {
            // Best effort: a job left open or running would still write later.
            let _ = self.client.call("bulk", Method::PATCH, &path, Some(&json!({"state": "Aborted"}))).await;
        }
        result
    }

    async fn finish_job(
        &self,
        job: &JobPlan,
        path: &str,
    ) -> Result<(Vec<(String, String)>, Vec<(String, String)>), HandlerError> {
        let fail = |e: crate::client::Error| from_client(&e, self.quota_pause);
        let csv = job.csv();
        self.client.call_raw("bulk", Method::PUT, &format!("{path}/batches"), Body::Csv(&csv)).await.map_err(fail)?;
        self.client.call("bulk", Method::PATCH, path, Some(&json!({"state": "UploadComplete"}))).await.map_err(fail)?;
        let started = Instant::now();
        loop {
            tokio::time::sleep(self.bulk.poll).await;
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
        let mut out = (Vec::new(), Vec::new());
        for kind in ["successfulResults", "failedResults"] {
            let text = self.results(&format!("{path}/{kind}")).await?;
            if kind == "successfulResults" {
                out.0 = result_pairs(&text, &job.ext_field, "sf__Id");
            } else {
                out.1 = result_pairs(&text, &job.ext_field, "sf__Error");
            }
        }
        Ok(out)
    }

    /// Reads a results CSV, trying a transient failure again a few times (the results stay).
    async fn results(&self, path: &str) -> Result<String, HandlerError> {
        self.step(Method::GET, path, Body::None).await
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
        let csv = "\"sf__Id\",\"Elo_Id__c\"\n\"001\",\"c:1\"\n\"002\",\"c:2\"\n";
        assert_eq!(
            result_pairs(csv, "Elo_Id__c", "sf__Id"),
            vec![("c:1".into(), "001".into()), ("c:2".into(), "002".into())]
        );
    }
}
