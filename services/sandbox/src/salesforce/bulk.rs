//! Bulk API 2.0 ingest: create a job, upload CSV, close it with `UploadComplete`, watch it go
//! `InProgress` → `JobComplete` (or `Failed`/`Aborted`), then read successful, failed and
//! unprocessed records as CSV (saas-apis.md §2, "Bulk API 2.0 ingest").

use axum::http::Method;
use serde_json::{Map, Value, json};

use super::model::{Org, SfResponse, UpsertError};
use super::schema::Schema;

/// One ingest job.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub object: String,
    pub operation: String,
    pub external_id: Option<String>,
    pub delimiter: char,
    pub line_ending: String,
    pub state: String,
    pub data: String,
    pub successful: Vec<(String, bool, Vec<String>)>,
    pub failed: Vec<(String, String, Vec<String>)>,
    /// Rows the platform did not get to (`unprocessedrecords/` of a completed job).
    pub unprocessed: Vec<Vec<String>>,
    pub header: Vec<String>,
    pub created_ms: i64,
    /// `PUT .../batches` calls: Bulk 2.0 takes one upload per job.
    pub uploads: u32,
    /// Why the job failed, as `GET` on the job reports it.
    pub error_message: Option<String>,
}

const DELIMITERS: &[(&str, char)] =
    &[("COMMA", ','), ("SEMICOLON", ';'), ("TAB", '\t'), ("PIPE", '|'), ("CARET", '^'), ("BACKQUOTE", '`')];

fn invalid_job(message: &str) -> SfResponse {
    SfResponse::error(400, "INVALIDJOB", format!("InvalidJob : {message}"))
}

impl Job {
    /// Validates a create request.
    pub fn create(id: String, body: &Value, now: i64, schema: &Schema) -> Result<Self, SfResponse> {
        let object = body.get("object").and_then(Value::as_str).unwrap_or_default().to_owned();
        if !schema.object_exists(&object) {
            return Err(invalid_job(&format!("Invalid object: {object}")));
        }
        let operation = body.get("operation").and_then(Value::as_str).unwrap_or_default().to_owned();
        if !["insert", "update", "upsert", "delete", "hardDelete"].contains(&operation.as_str()) {
            return Err(invalid_job(&format!("Invalid operation: {operation}")));
        }
        let external_id = body.get("externalIdFieldName").and_then(Value::as_str).map(str::to_owned);
        if operation == "upsert" && external_id.is_none() {
            return Err(invalid_job(&format!(
                "External ID was blank for {object}. An External ID must be specified for upsert."
            )));
        }
        if let Some(field) = external_id.as_deref().filter(|f| !schema.matching_field(&object, f)) {
            return Err(invalid_job(&format!(
                "Field name provided, {field} does not match an External ID, Salesforce Id, or indexed field for {object}"
            )));
        }
        if body.get("contentType").and_then(Value::as_str).is_some_and(|c| c != "CSV") {
            return Err(invalid_job("Only CSV content is supported"));
        }
        let delimiter_name = body.get("columnDelimiter").and_then(Value::as_str).unwrap_or("COMMA");
        let delimiter = DELIMITERS
            .iter()
            .find(|(n, _)| *n == delimiter_name)
            .map(|(_, c)| *c)
            .ok_or_else(|| invalid_job("Invalid column delimiter"))?;
        let line_ending = body.get("lineEnding").and_then(Value::as_str).unwrap_or("LF").to_owned();
        if line_ending != "LF" && line_ending != "CRLF" {
            return Err(invalid_job("Invalid line ending"));
        }
        Ok(Self {
            id,
            object,
            operation,
            external_id,
            delimiter,
            line_ending,
            state: "Open".into(),
            data: String::new(),
            successful: Vec::new(),
            failed: Vec::new(),
            unprocessed: Vec::new(),
            header: Vec::new(),
            created_ms: now,
            uploads: 0,
            error_message: None,
        })
    }

    pub fn info(&self, version: &str) -> Value {
        let delimiter = DELIMITERS.iter().find(|(_, c)| *c == self.delimiter).map_or("COMMA", |(n, _)| n);
        let mut info = json!({
            "id": self.id, "operation": self.operation, "object": self.object, "createdById": "005sandbox",
            "createdDate": super::model::format_datetime(self.created_ms), "systemModstamp": super::model::format_datetime(self.created_ms),
            "state": self.state, "concurrencyMode": "Parallel", "contentType": "CSV", "apiVersion": version.trim_start_matches('v').parse::<f64>().unwrap_or(0.0),
            "contentUrl": format!("services/data/{version}/jobs/ingest/{}/batches", self.id), "lineEnding": self.line_ending,
            "columnDelimiter": delimiter, "jobType": "V2Ingest",
            "numberRecordsProcessed": self.successful.len() + self.failed.len(), "numberRecordsFailed": self.failed.len(),
        });
        if let Some(ext) = &self.external_id {
            info["externalIdFieldName"] = json!(ext);
        }
        if let Some(message) = &self.error_message {
            info["errorMessage"] = json!(message);
        }
        info
    }

    /// Closes the upload (`UploadComplete`); a job that got more than one upload fails.
    pub fn close(&mut self) -> Result<(), SfResponse> {
        if self.uploads > 1 {
            let message = format!(
                "Found multiple contents for job: <{}>, please 'Close' / 'Abort' / 'Delete' the current Job then create a new Job and make sure you only do 'PUT' once on a given Job.",
                self.id
            );
            self.state = "Failed".into();
            self.error_message = Some(format!("InvalidBatch : {message}"));
            return Err(SfResponse::error(400, "INVALIDJOB", message));
        }
        self.state = "UploadComplete".into();
        Ok(())
    }

    /// Whether the data uses the declared `lineEnding` (outside quoted fields).
    fn line_ending_matches(&self) -> bool {
        let (mut quoted, mut previous) = (false, '\0');
        for c in self.data.chars() {
            match c {
                '"' => quoted = !quoted,
                '\n' if !quoted => {
                    let crlf = previous == '\r';
                    if crlf != (self.line_ending == "CRLF") {
                        return false;
                    }
                }
                _ => {}
            }
            previous = c;
        }
        true
    }

    /// Applies the uploaded rows to the org.
    /// `config`: the share of rows refused with UNABLE_TO_LOCK_ROW (as Composite writes are),
    /// rows locked once and rows left unprocessed, by external id value.
    pub fn process(&mut self, org: &mut Org, now: i64, config: &mut super::SalesforceConfig) {
        let lock_row_rate = config.lock_row_rate;
        if !self.line_ending_matches() {
            self.state = "Failed".into();
            self.error_message = Some(format!(
                "ClientInputError : LineEnding is invalid on user data. Current LineEnding setting is {}",
                self.line_ending
            ));
            return;
        }
        let rows = match parse_csv(&self.data, self.delimiter) {
            Ok(rows) => rows,
            Err(e) => {
                self.state = "Failed".into();
                self.failed.push((String::new(), format!("InvalidBatch : {e}"), Vec::new()));
                return;
            }
        };
        let mut rows = rows.into_iter();
        self.header = rows.next().unwrap_or_default();
        for row in rows {
            let mut fields = Map::new();
            for (column, value) in self.header.iter().zip(&row) {
                // `Account.Elo_Id__c`: a lookup by the parent's external id (relationship name,
                // dot, an External ID field of the parent).
                if let Some((relationship, field)) = column.split_once('.') {
                    if !value.is_empty() {
                        fields.insert(relationship.to_owned(), json!({ field: value }));
                    }
                    continue;
                }
                match value.as_str() {
                    "" => {}
                    "#N/A" => {
                        fields.insert(column.clone(), Value::Null);
                    }
                    v => {
                        // CSV is text: the platform types each cell by its field.
                        let kind = org.schema.field(&self.object, column).map(|f| f.kind);
                        let typed = match kind.as_deref() {
                            Some("double" | "currency" | "percent" | "int") => {
                                v.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number)
                            }
                            Some("boolean") => v.parse::<bool>().ok().map(Value::Bool),
                            _ => None,
                        };
                        fields.insert(column.clone(), typed.unwrap_or_else(|| json!(v)));
                    }
                }
            }
            let ext_value = self
                .external_id
                .as_ref()
                .and_then(|ext| self.header.iter().position(|c| c == ext))
                .and_then(|at| row.get(at).cloned())
                .unwrap_or_default();
            if config.bulk_unprocessed.contains(&ext_value) {
                self.unprocessed.push(row);
                continue;
            }
            let locked_once = match config.bulk_locked_once.iter().position(|v| *v == ext_value) {
                Some(at) => {
                    config.bulk_locked_once.remove(at);
                    true
                }
                None => false,
            };
            let locked = locked_once || (lock_row_rate > 0.0 && rand::random::<f64>() < lock_row_rate);
            let result: Result<(String, bool), super::model::SaveError> = match self.operation.as_str() {
                _ if locked => Err(super::model::SaveError::new(
                    "UNABLE_TO_LOCK_ROW",
                    "unable to obtain exclusive access to this record or 1 records: 001000000000000AAA",
                )),
                "insert" => org
                    .prepare(&self.object, &fields)
                    .and_then(|f| org.create(&self.object, f, now))
                    .map(|id| (id, true)),
                "upsert" => {
                    let ext = self.external_id.clone().unwrap_or_default();
                    match fields.get(&ext).map(super::model::scalar_text) {
                        None => Err(super::model::SaveError::new("MISSING_ARGUMENT", format!("{ext} not specified"))),
                        Some(value) => org.upsert(&self.object, &ext, &value, &fields, now).map_err(|e| match e {
                            UpsertError::Save(e) => e,
                            UpsertError::Multiple(_) => super::model::SaveError::new(
                                "DUPLICATE_EXTERNAL_ID",
                                format!("{ext}: more than one record found"),
                            ),
                        }),
                    }
                }
                "update" | "delete" | "hardDelete" => {
                    match fields.remove("Id").and_then(|v| v.as_str().map(str::to_owned)) {
                        None => Err(super::model::SaveError::new("MISSING_ARGUMENT", "Id not specified")),
                        Some(id) if self.operation == "update" => org
                            .prepare(&self.object, &fields)
                            .and_then(|f| org.update(&id, f, now))
                            .map(|()| (id, false)),
                        Some(id) => match org.delete(&self.object, &id) {
                            Ok(true) => Ok((id, false)),
                            Ok(false) => Err(super::model::SaveError::new("ENTITY_IS_DELETED", "entity is deleted")),
                            Err(e) => Err(e),
                        },
                    }
                }
                _ => unreachable!("validated at creation"),
            };
            match result {
                Ok((id, created)) => self.successful.push((id, created, row)),
                Err(e) => self.failed.push((
                    String::new(),
                    format!("{}:{}:{} --", e.code, e.message, e.fields.join(",")),
                    row,
                )),
            }
        }
        self.state = "JobComplete".into();
    }

    /// `successfulResults/`, `failedResults/` or `unprocessedrecords/` as CSV.
    pub fn results(&self, kind: &str) -> Option<String> {
        let d = self.delimiter.to_string();
        let line = |cells: Vec<String>| cells.iter().map(|c| quote(c)).collect::<Vec<_>>().join(&d);
        let mut out = Vec::new();
        match kind {
            "successfulResults" => {
                out.push(line([vec!["sf__Id".into(), "sf__Created".into()], self.header.clone()].concat()));
                for (id, created, row) in &self.successful {
                    out.push(line([vec![id.clone(), created.to_string()], row.clone()].concat()));
                }
            }
            "failedResults" => {
                out.push(line([vec!["sf__Id".into(), "sf__Error".into()], self.header.clone()].concat()));
                for (id, error, row) in &self.failed {
                    out.push(line([vec![id.clone(), error.clone()], row.clone()].concat()));
                }
            }
            "unprocessedrecords" => {
                out.push(line(self.header.clone()));
                out.extend(self.unprocessed.iter().cloned().map(line));
                if (self.state == "Aborted" || self.state == "Failed")
                    && let Ok(rows) = parse_csv(&self.data, self.delimiter)
                {
                    out.extend(rows.into_iter().skip(1).map(line));
                }
            }
            _ => return None,
        }
        let ending = if self.line_ending == "CRLF" { "\r\n" } else { "\n" };
        Some(out.join(ending) + ending)
    }
}

fn quote(cell: &str) -> String {
    format!("\"{}\"", cell.replace('"', "\"\""))
}

impl super::Salesforce {
    /// Bulk API 2.0 ingest routes below `/jobs/ingest`.
    pub(super) fn bulk(&mut self, version: &str, method: &Method, rest: &[&str], body: &Value, now: i64) -> SfResponse {
        match (method.as_str(), rest) {
            ("POST", []) => {
                let id = format!("750SANDBOX{:08}", self.jobs.len() + 1);
                match Job::create(id.clone(), body, now, &self.org.schema) {
                    Ok(job) => {
                        let info = job.info(version);
                        self.jobs.insert(id, job);
                        SfResponse::json(200, info)
                    }
                    Err(e) => e,
                }
            }
            ("GET", []) => {
                let records: Vec<Value> = self.jobs.values().map(|j| j.info(version)).collect();
                SfResponse::json(200, json!({"done": true, "records": records, "nextRecordsUrl": null}))
            }
            ("PUT", [id, "batches"]) => match (self.jobs.get_mut(*id), body.as_str()) {
                (None, _) => SfResponse::not_found(),
                (Some(job), _) if job.state != "Open" => SfResponse::error(
                    409,
                    "INVALIDJOBSTATE",
                    format!("Job {id} is not open for uploads, it is {}", job.state),
                ),
                (Some(_), None) => {
                    SfResponse::error(400, "INVALIDBATCH", "InvalidBatch : Upload CSV with Content-Type text/csv")
                }
                (Some(job), Some(csv)) => {
                    // Accepted, but a job takes one upload: closing it will fail.
                    job.uploads += 1;
                    if job.uploads == 1 {
                        job.data.push_str(csv);
                    }
                    SfResponse::empty(201)
                }
            },
            ("PATCH", [id]) => {
                let Some(job) = self.jobs.get_mut(*id) else { return SfResponse::not_found() };
                match (body.get("state").and_then(Value::as_str), job.state.as_str()) {
                    (Some("UploadComplete"), "Open") => {
                        if let Err(e) = job.close() {
                            return e;
                        }
                    }
                    (Some("Aborted"), "Open" | "UploadComplete") => job.state = "Aborted".into(),
                    (Some(target), current) => {
                        return SfResponse::error(
                            400,
                            "INVALIDJOBSTATE",
                            format!("Cannot change the state of job {id} from {current} to {target}"),
                        );
                    }
                    (None, _) => return SfResponse::error(400, "INVALIDJOB", "InvalidJob : state is required"),
                }
                SfResponse::json(200, job.info(version))
            }
            ("GET", [id]) => {
                let Some(job) = self.jobs.get_mut(*id) else { return SfResponse::not_found() };
                // Each look advances a closed job one step: UploadComplete → InProgress → done.
                match job.state.as_str() {
                    "UploadComplete" => job.state = "InProgress".into(),
                    "InProgress" => job.process(&mut self.org, now, &mut self.config),
                    _ => {}
                }
                SfResponse::json(200, job.info(version))
            }
            ("GET", [id, kind]) => match self.jobs.get(*id).and_then(|j| j.results(kind)) {
                Some(csv) => SfResponse::csv(200, csv),
                None => SfResponse::not_found(),
            },
            ("DELETE", [id]) => match self.jobs.get(*id).map(|j| j.state.clone()) {
                None => SfResponse::not_found(),
                Some(state) if ["JobComplete", "Failed", "Aborted"].contains(&state.as_str()) => {
                    self.jobs.remove(*id);
                    SfResponse::empty(204)
                }
                Some(state) => {
                    SfResponse::error(400, "INVALIDJOBSTATE", format!("Cannot delete a job in state {state}"))
                }
            },
            _ => SfResponse::not_found(),
        }
    }
}

/// RFC 4180 CSV: quoted fields, doubled quotes, LF or CRLF line endings.
pub fn parse_csv(text: &str, delimiter: char) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut any = false;
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
        } else if c == delimiter {
            row.push(std::mem::take(&mut cell));
        } else if c == '\n' || c == '\r' {
            if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
            }
            row.push(std::mem::take(&mut cell));
            rows.push(std::mem::take(&mut row));
            any = false;
        } else {
            cell.push(c);
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    if any {
        row.push(cell);
        rows.push(row);
    }
    let width = rows.first().map_or(0, Vec::len);
    if let Some((i, _)) = rows.iter().enumerate().find(|(_, r)| r.len() != width) {
        return Err(format!("row {} has a different number of columns than the header", i + 1));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_quotes_and_line_endings() {
        let rows = parse_csv("Name,Note\r\n\"Souza, Ana\",\"say \"\"hi\"\"\"\nBia,\n", ',').unwrap();
        assert_eq!(rows, vec![vec!["Name", "Note"], vec!["Souza, Ana", "say \"hi\""], vec!["Bia", ""]]);
        assert!(parse_csv("a,b\n1\n", ',').is_err());
        assert!(parse_csv("a\n\"open", ',').is_err());
        assert_eq!(quote("x\"y"), "\"x\"\"y\"");
    }
}
