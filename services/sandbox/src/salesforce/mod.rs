//! Salesforce REST simulator: OAuth client credentials, revocable tokens, `Sforce-Limit-Info`,
//! a daily quota that ends in 403 `REQUEST_LIMIT_EXCEEDED`, a concurrency cap, upsert by
//! external id, sObject Collections, Composite and Composite Graph, a SOQL subset with paging,
//! and org validation (required fields, lookups, price books, duplicate rules), with
//! injectable `UNABLE_TO_LOCK_ROW`. Behaviour follows `../shared/docs/saas-apis.md` §2.

pub mod bulk;
pub mod model;
mod rules;
pub mod schema;
pub mod soql;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::faults::{FaultDecision, Faults};
use crate::{Counters, now_ms};
use model::{Org, SaveError, SfResponse, UpsertError, scalar_text};

/// Settings of the simulated org.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SalesforceConfig {
    pub client_id: String,
    pub client_secret: String,
    /// Base URL clients are told to use (`instance_url`).
    pub instance_url: String,
    /// API requests allowed per 24 h.
    pub daily_quota: u64,
    /// Requests served at once before 403 REQUEST_LIMIT_EXCEEDED.
    pub max_concurrent: usize,
    /// Default SOQL page size (`Sforce-Query-Options: batchSize=` overrides, 200..=2000).
    pub query_batch: usize,
    /// Probability (0..1) that a write fails with UNABLE_TO_LOCK_ROW.
    pub lock_row_rate: f64,
    /// PEM public key of the connected app's certificate, for the JWT bearer flow.
    #[serde(default)]
    pub jwt_public_key_pem: Option<String>,
    /// Person Accounts enabled (an org setting): Account takes person fields and `__pc` fields.
    #[serde(default)]
    pub person_accounts: bool,
}

impl Default for SalesforceConfig {
    fn default() -> Self {
        Self {
            client_id: "elo-sandbox-client".into(),
            client_secret: "elo-sandbox-secret".into(),
            instance_url: "http://127.0.0.1:8702".into(),
            daily_quota: 100_000,
            max_concurrent: 25,
            query_batch: 2000,
            lock_row_rate: 0.0,
            jwt_public_key_pem: None,
            person_accounts: false,
        }
    }
}

/// Simulator state (behind one lock: requests are short and the org must change atomically).
pub struct Salesforce {
    pub config: SalesforceConfig,
    pub org: Org,
    tokens: HashMap<String, bool>,
    pub api_usage: u64,
    cursors: HashMap<String, Vec<Value>>,
    next_token: u64,
    pub jobs: BTreeMap<String, bulk::Job>,
}

impl Salesforce {
    pub fn new(config: SalesforceConfig) -> Self {
        let mut sim = Self {
            config,
            org: Org::default(),
            tokens: HashMap::new(),
            api_usage: 0,
            cursors: HashMap::new(),
            next_token: 1,
            jobs: BTreeMap::new(),
        };
        sim.apply_org_settings();
        sim
    }

    /// Brings the org in line with the settings (Person Accounts and their record types).
    pub fn apply_org_settings(&mut self) {
        self.org.set_person_accounts(self.config.person_accounts);
    }

    fn issue_token(&mut self) -> String {
        let token = format!(
            "00Dsandbox!{:016x}{:08x}",
            self.next_token.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            rand::random::<u32>()
        );
        self.next_token += 1;
        self.tokens.insert(token.clone(), true);
        token
    }

    /// Revokes every token (the control API's "token revocation").
    pub fn revoke_all(&mut self) {
        self.tokens.values_mut().for_each(|live| *live = false);
    }

    fn limit_header(&self) -> (String, String) {
        ("Sforce-Limit-Info".into(), format!("api-usage={}/{}", self.api_usage, self.config.daily_quota))
    }

    /// Runs one REST call below `/services/data/{version}` (also used for composite parts).
    pub fn execute(
        &mut self,
        version: &str,
        method: &Method,
        path: &str,
        query: &str,
        body: &Value,
        headers: &HeaderMap,
    ) -> SfResponse {
        // Path segments arrive percent-encoded (`c%3A42` for an external id `c:42`).
        let decoded: Vec<String> =
            path.trim_matches('/').split('/').filter(|s| !s.is_empty()).map(path_decode).collect();
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let now = now_ms();
        match (method.as_str(), segments.as_slice()) {
            ("GET", []) => SfResponse::json(
                200,
                json!({"sobjects": format!("/services/data/{version}/sobjects"), "query": format!("/services/data/{version}/query"), "composite": format!("/services/data/{version}/composite"), "limits": format!("/services/data/{version}/limits")}),
            ),
            ("GET", ["limits"]) => SfResponse::json(
                200,
                json!({"DailyApiRequests": {"Max": self.config.daily_quota, "Remaining": self.config.daily_quota.saturating_sub(self.api_usage)}}),
            ),
            ("GET", ["query"]) => self.query(version, query, headers),
            ("GET", ["query", locator]) => self.query_more(version, locator),
            ("GET", ["sobjects"]) => SfResponse::json(200, self.org.schema.global_describe(version)),
            ("GET", ["sobjects", object, "describe"]) => self
                .org
                .schema
                .describe(object, version)
                .map_or_else(SfResponse::not_found, |d| SfResponse::json(200, d)),
            ("GET", ["sobjects", object]) => match self.org.schema.describe(object, version) {
                Some(mut d) => {
                    d.as_object_mut().map(|o| o.remove("fields"));
                    SfResponse::json(200, json!({"objectDescribe": d, "recentItems": []}))
                }
                None => SfResponse::not_found(),
            },
            ("POST", ["sobjects", object]) => self.create(object, body, now),
            ("GET", ["sobjects", object, id]) => self.get(version, object, "Id", id),
            ("GET", ["sobjects", object, field, value]) => self.get(version, object, field, value),
            ("PATCH", ["sobjects", object, field]) => {
                if field.ends_with("__c") || *field == "Id" {
                    // An external-id field without its value.
                    SfResponse::error(
                        405,
                        "METHOD_NOT_ALLOWED",
                        "HTTP Method 'PATCH' not allowed. Allowed are GET,HEAD,POST",
                    )
                } else {
                    self.update_by_id(object, field, body, now)
                }
            }
            ("PATCH", ["sobjects", object, field, value]) => self.upsert(version, object, field, value, body, now),
            ("DELETE", ["sobjects", object, id]) => match self.org.delete(object, id) {
                Ok(true) => SfResponse::empty(204),
                Ok(false) => SfResponse::not_found(),
                Err(e) => e.response(),
            },
            ("PATCH", ["composite", "sobjects", object, field]) => self.collections_upsert(object, field, body, now),
            ("POST", ["composite", "sobjects"]) => self.collections_create(body, now),
            ("POST", ["composite"]) => self.composite(version, body, headers),
            ("POST", ["composite", "graph"]) => self.graph(version, body, headers),
            (_, ["jobs", "ingest", rest @ ..]) => self.bulk(version, method, rest, body, now),
            _ => SfResponse::not_found(),
        }
    }

    fn lock_fault(&self) -> Option<SaveError> {
        (self.config.lock_row_rate > 0.0 && rand::random::<f64>() < self.config.lock_row_rate).then(|| {
            SaveError::new(
                "UNABLE_TO_LOCK_ROW",
                "unable to obtain exclusive access to this record or 1 records: 001000000000000AAA",
            )
        })
    }

    fn create(&mut self, object: &str, body: &Value, now: i64) -> SfResponse {
        if !self.org.schema.object_exists(object) {
            return SfResponse::not_found();
        }
        let Some(map) = body.as_object() else { return json_parse_error() };
        if let Some(e) = self.lock_fault() {
            return e.response();
        }
        match self.org.prepare(object, map).and_then(|fields| self.org.create(object, fields, now)) {
            Ok(id) => SfResponse::json(201, json!({"id": id, "success": true, "errors": []})),
            Err(e) => e.response(),
        }
    }

    fn get(&self, version: &str, object: &str, field: &str, value: &str) -> SfResponse {
        if !self.org.schema.object_exists(object) {
            return SfResponse::not_found();
        }
        let found = if field == "Id" {
            self.org.get(object, value).into_iter().collect::<Vec<_>>()
        } else {
            if !self.org.schema.matching_field(object, field) {
                return SfResponse::not_found();
            }
            self.org.find_by(object, field, value)
        };
        match found.as_slice() {
            [one] => SfResponse::json(200, one.to_json(version)),
            [] => SfResponse::not_found(),
            many => SfResponse::json(
                300,
                json!(
                    many.iter()
                        .map(|r| format!("/services/data/{version}/sobjects/{object}/{}", r.id))
                        .collect::<Vec<_>>()
                ),
            ),
        }
    }

    fn update_by_id(&mut self, object: &str, id: &str, body: &Value, now: i64) -> SfResponse {
        let Some(map) = body.as_object() else { return json_parse_error() };
        if self.org.get(object, id).is_none() {
            return SfResponse::not_found();
        }
        if let Some(e) = self.lock_fault() {
            return e.response();
        }
        match self.org.prepare(object, map).and_then(|fields| self.org.update(id, fields, now)) {
            Ok(()) => SfResponse::empty(204),
            Err(e) => e.response(),
        }
    }

    fn upsert(&mut self, version: &str, object: &str, field: &str, value: &str, body: &Value, now: i64) -> SfResponse {
        if !self.org.schema.object_exists(object) || !self.org.schema.matching_field(object, field) {
            return SfResponse::not_found();
        }
        let Some(map) = body.as_object() else { return json_parse_error() };
        if let Some(e) = self.lock_fault() {
            return e.response();
        }
        match self.org.upsert(object, field, value, map, now) {
            Ok((id, true)) => SfResponse::json(201, json!({"id": id, "success": true, "errors": [], "created": true})),
            Ok((id, false)) if api_version(version) >= 46.0 => {
                SfResponse::json(200, json!({"id": id, "success": true, "errors": [], "created": false}))
            }
            Ok((_, false)) => SfResponse::empty(204),
            Err(UpsertError::Save(e)) => e.response(),
            Err(UpsertError::Multiple(ids)) => SfResponse::json(
                300,
                json!(
                    ids.iter().map(|id| format!("/services/data/{version}/sobjects/{object}/{id}")).collect::<Vec<_>>()
                ),
            ),
        }
    }

    fn collection_records(body: &Value) -> Result<(&Vec<Value>, bool), SfResponse> {
        let records = body.get("records").and_then(Value::as_array).ok_or_else(json_parse_error)?;
        if records.len() > 200 {
            return Err(SfResponse::error(
                400,
                "EXCEEDED_ID_LIMIT",
                "record limit reached. cannot submit more than 200 records into this call",
            ));
        }
        Ok((records, body.get("allOrNone").and_then(Value::as_bool).unwrap_or(false)))
    }

    /// Applies per-row results under `allOrNone`: on any failure the org is restored and the
    /// rows that had succeeded report the rollback.
    fn finish_collection(&mut self, snapshot: Org, all_or_none: bool, mut rows: Vec<Value>) -> SfResponse {
        let failed = rows.iter().any(|r| r["success"] == json!(false));
        if all_or_none && failed {
            self.org = snapshot;
            for row in rows.iter_mut().filter(|r| r["success"] == json!(true)) {
                *row = json!({"id": null, "success": false, "errors": [{"statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK", "message": "Record rolled back because not all records were valid and the request was using AllOrNone header", "fields": []}]});
            }
        }
        SfResponse::json(200, Value::Array(rows))
    }

    /// Applies `apply` to each record of a Collections request (up to 200, `allOrNone` honoured):
    /// one row per record, `{"id", "success", "errors"}` plus whatever `apply` adds on success.
    fn apply_collection(
        &mut self,
        body: &Value,
        mut apply: impl FnMut(&mut Self, &Map<String, Value>) -> Result<(String, Option<bool>), SaveError>,
    ) -> SfResponse {
        let (records, all_or_none) = match Self::collection_records(body) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let records = records.clone();
        let snapshot = self.org.clone();
        let mut rows = Vec::with_capacity(records.len());
        for record in &records {
            let row = record
                .as_object()
                .ok_or_else(|| SaveError::new("INVALID_INPUT", "record must be an object"))
                .and_then(|map| apply(self, map));
            rows.push(match row {
                Ok((id, Some(created))) => json!({"id": id, "success": true, "errors": [], "created": created}),
                Ok((id, None)) => json!({"id": id, "success": true, "errors": []}),
                Err(e) => json!({"id": null, "success": false, "errors": [e.row()]}),
            });
        }
        self.finish_collection(snapshot, all_or_none, rows)
    }

    fn collections_upsert(&mut self, object: &str, field: &str, body: &Value, now: i64) -> SfResponse {
        if !self.org.schema.object_exists(object) || !self.org.schema.matching_field(object, field) {
            return SfResponse::not_found();
        }
        self.apply_collection(body, |sf, map| {
            match map.get("attributes").and_then(|a| a.get("type")).and_then(Value::as_str) {
                None => return Err(SaveError::new("INVALID_INPUT", "Missing attributes.type")),
                Some(t) if t != object => {
                    return Err(SaveError::new(
                        "INVALID_INPUT",
                        format!("attributes.type {t} does not match {object}"),
                    ));
                }
                _ => {}
            }
            let value = map.get(field).map(scalar_text).ok_or_else(|| {
                SaveError::new("MISSING_ARGUMENT", format!("{field} not specified")).with_fields(&[field])
            })?;
            if let Some(e) = sf.lock_fault() {
                return Err(e);
            }
            let (id, created) = sf.org.upsert(object, field, &value, map, now).map_err(|e| match e {
                UpsertError::Save(e) => e,
                UpsertError::Multiple(_) => SaveError::new(
                    "DUPLICATE_EXTERNAL_ID",
                    format!("{field}: more than one record found for external id field"),
                ),
            })?;
            Ok((id, Some(created)))
        })
    }

    fn collections_create(&mut self, body: &Value, now: i64) -> SfResponse {
        self.apply_collection(body, |sf, map| {
            let object = map
                .get("attributes")
                .and_then(|a| a.get("type"))
                .and_then(Value::as_str)
                .ok_or_else(|| SaveError::new("INVALID_INPUT", "Missing attributes.type"))?
                .to_owned();
            if !sf.org.schema.object_exists(&object) {
                return Err(SaveError::new("INVALID_TYPE", format!("sObject type '{object}' is not supported.")));
            }
            if let Some(e) = sf.lock_fault() {
                return Err(e);
            }
            let fields = sf.org.prepare(&object, map)?;
            Ok((sf.org.create(&object, fields, now)?, None))
        })
    }

    /// Runs composite subrequests in order, resolving `@{ref.path}`; returns the per-item
    /// responses and whether all succeeded. With `all_or_none`, a failure rolls back the org.
    fn run_subrequests(
        &mut self,
        version: &str,
        requests: &[Value],
        all_or_none: bool,
        headers: &HeaderMap,
    ) -> (Vec<Value>, bool) {
        let snapshot = all_or_none.then(|| self.org.clone());
        let mut results: BTreeMap<String, Value> = BTreeMap::new();
        let mut items = Vec::new();
        let mut failed_at = None;
        for (i, request) in requests.iter().enumerate() {
            let reference = request.get("referenceId").and_then(Value::as_str).unwrap_or_default().to_owned();
            if failed_at.is_some() && all_or_none {
                items.push(json!({"body": [{"errorCode": "PROCESSING_HALTED", "message": "The transaction was rolled back since another operation in the same transaction failed."}], "httpHeaders": {}, "httpStatusCode": 400, "referenceId": reference}));
                continue;
            }
            let response = match resolve_references(request, &results) {
                Err(missing) => SfResponse::error(
                    400,
                    "PROCESSING_HALTED",
                    format!(
                        "Invalid reference specified. No value for {missing} found. Provided referenceId must be a valid reference to a preceding sub request."
                    ),
                ),
                Ok(request) => {
                    let method = request
                        .get("method")
                        .and_then(Value::as_str)
                        .unwrap_or("GET")
                        .parse::<Method>()
                        .unwrap_or(Method::GET);
                    let url = request.get("url").and_then(Value::as_str).unwrap_or_default();
                    let (path, query) = url.split_once('?').unwrap_or((url, ""));
                    let prefix = format!("/services/data/{version}");
                    match path.strip_prefix(&prefix) {
                        Some(rest) => self.execute(
                            version,
                            &method,
                            rest,
                            query,
                            request.get("body").unwrap_or(&Value::Null),
                            headers,
                        ),
                        None => SfResponse::error(400, "INVALID_REQUEST", format!("url must start with {prefix}")),
                    }
                }
            };
            if response.is_success() {
                if let Some(body) = &response.body {
                    results.insert(reference.clone(), body.clone());
                }
            } else if failed_at.is_none() {
                failed_at = Some(i);
            }
            items.push(json!({"body": response.body.clone().unwrap_or(Value::Null), "httpHeaders": {}, "httpStatusCode": response.status, "referenceId": reference}));
        }
        if let (Some(failed), Some(snapshot)) = (failed_at, snapshot) {
            self.org = snapshot;
            for item in items.iter_mut().take(failed) {
                *item = json!({"body": [{"errorCode": "PROCESSING_HALTED", "message": "The transaction was rolled back since another operation in the same transaction failed."}], "httpHeaders": {}, "httpStatusCode": 400, "referenceId": item["referenceId"]});
            }
        }
        (items, failed_at.is_none())
    }

    fn composite(&mut self, version: &str, body: &Value, headers: &HeaderMap) -> SfResponse {
        let Some(requests) = body.get("compositeRequest").and_then(Value::as_array) else { return json_parse_error() };
        if requests.len() > 25 {
            return SfResponse::error(
                400,
                "INVALID_INPUT",
                format!("The composite request has {} subrequests; the limit is 25.", requests.len()),
            );
        }
        let all_or_none = body.get("allOrNone").and_then(Value::as_bool).unwrap_or(false);
        let (items, _) = self.run_subrequests(version, &requests.clone(), all_or_none, headers);
        SfResponse::json(200, json!({"compositeResponse": items}))
    }

    fn graph(&mut self, version: &str, body: &Value, headers: &HeaderMap) -> SfResponse {
        let Some(graphs) = body.get("graphs").and_then(Value::as_array) else { return json_parse_error() };
        if graphs.len() > 75 {
            return SfResponse::error(
                400,
                "INVALID_INPUT",
                format!("Composite graph request has {} graphs; the limit is 75.", graphs.len()),
            );
        }
        let nodes: usize =
            graphs.iter().map(|g| g.get("compositeRequest").and_then(Value::as_array).map_or(0, Vec::len)).sum();
        if nodes > 500 {
            return SfResponse::error(
                400,
                "INVALID_INPUT",
                format!("Composite graph payload has {nodes} nodes; the limit is 500."),
            );
        }
        let graphs = graphs.clone();
        let mut failed = 0;
        let mut out = Vec::new();
        for graph in &graphs {
            let id = graph.get("graphId").cloned().unwrap_or(Value::Null);
            let requests = graph.get("compositeRequest").and_then(Value::as_array).cloned().unwrap_or_default();
            if failed >= 14 {
                let halted: Vec<Value> = requests
                    .iter()
                    .map(|r| json!({"body": [{"errorCode": "PROCESSING_HALTED", "message": "Processing halted because too many graphs failed."}], "httpHeaders": {}, "httpStatusCode": 400, "referenceId": r.get("referenceId")}))
                    .collect();
                out.push(json!({"graphId": id, "graphResponse": {"compositeResponse": halted}, "isSuccessful": false}));
                continue;
            }
            let (items, ok) = self.run_subrequests(version, &requests, true, headers);
            if !ok {
                failed += 1;
            }
            out.push(json!({"graphId": id, "graphResponse": {"compositeResponse": items}, "isSuccessful": ok}));
        }
        SfResponse::json(200, json!({"graphs": out}))
    }

    /// Bulk API 2.0 ingest routes below `/jobs/ingest`.
    fn bulk(&mut self, version: &str, method: &Method, rest: &[&str], body: &Value, now: i64) -> SfResponse {
        match (method.as_str(), rest) {
            ("POST", []) => {
                let id = format!("750SANDBOX{:08}", self.jobs.len() + 1);
                match bulk::Job::create(id.clone(), body, now, &self.org.schema) {
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
                    if job.data.is_empty() {
                        job.data.push_str(csv);
                    } else {
                        // Later uploads continue the first one, without repeating the header.
                        job.data.push_str(csv.split_once('\n').map_or("", |(_, r)| r));
                    }
                    SfResponse::empty(201)
                }
            },
            ("PATCH", [id]) => {
                let Some(job) = self.jobs.get_mut(*id) else { return SfResponse::not_found() };
                match (body.get("state").and_then(Value::as_str), job.state.as_str()) {
                    (Some("UploadComplete"), "Open") => job.state = "UploadComplete".into(),
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
                    "InProgress" => job.process(&mut self.org, now),
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

    fn query(&mut self, version: &str, query: &str, headers: &HeaderMap) -> SfResponse {
        let Some(q) = query_param(query, "q") else {
            return SfResponse::error(400, "MALFORMED_QUERY", "A query string has to be specified");
        };
        let parsed = match soql::parse(&q, &self.org.schema) {
            Ok(p) => p,
            Err(e) => return SfResponse::error(400, e.code, e.message),
        };
        let rows: Vec<Value> = soql::run(&parsed, self.org.records.values(), &self.org.schema)
            .into_iter()
            .map(|r| {
                let mut out = Map::new();
                out.insert("attributes".into(), json!({"type": r.object, "url": format!("/services/data/{version}/sobjects/{}/{}", r.object, r.id)}));
                for f in &parsed.fields {
                    out.insert(f.clone(), r.get(f).unwrap_or(Value::Null));
                }
                Value::Object(out)
            })
            .collect();
        let batch = headers
            .get("sforce-query-options")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').find_map(|p| p.trim().strip_prefix("batchSize=")))
            .and_then(|n| n.parse::<usize>().ok())
            .map_or(self.config.query_batch, |n| n.clamp(200, 2000));
        self.page(version, rows, batch)
    }

    fn page(&mut self, version: &str, mut rows: Vec<Value>, batch: usize) -> SfResponse {
        let total = rows.len();
        if rows.len() <= batch {
            return SfResponse::json(200, json!({"totalSize": total, "done": true, "records": rows}));
        }
        let rest = rows.split_off(batch);
        let locator = format!("01gSANDBOX{:08x}-{}", rand::random::<u32>(), batch);
        self.cursors.insert(locator.clone(), rest);
        SfResponse::json(
            200,
            json!({"totalSize": total, "done": false, "nextRecordsUrl": format!("/services/data/{version}/query/{locator}"), "records": rows}),
        )
    }

    fn query_more(&mut self, version: &str, locator: &str) -> SfResponse {
        let Some(rows) = self.cursors.remove(locator) else {
            return SfResponse::error(400, "INVALID_QUERY_LOCATOR", "invalid query locator");
        };
        let batch = locator.rsplit('-').next().and_then(|b| b.parse().ok()).unwrap_or(self.config.query_batch);
        let total_left = rows.len();
        let mut response = self.page(version, rows, batch);
        if let Some(body) = response.body.as_mut() {
            // totalSize stays the size of the whole result, as Salesforce reports it.
            body["totalSize"] = json!(total_left);
        }
        response
    }
}

fn api_version(version: &str) -> f64 {
    version.trim_start_matches('v').parse().unwrap_or(0.0)
}

fn json_parse_error() -> SfResponse {
    SfResponse::error(400, "JSON_PARSER_ERROR", "Cannot deserialize instance of object from request body")
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

/// Decodes a percent-encoded path segment (`+` stays a plus sign).
pub fn path_decode(segment: &str) -> String {
    percent_decode(&segment.replace('+', "%2B"))
}

/// Decodes `application/x-www-form-urlencoded` text.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&text[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces `@{ref.path}` in a subrequest (url and body) with values of earlier results.
fn resolve_references(request: &Value, results: &BTreeMap<String, Value>) -> Result<Value, String> {
    fn lookup(results: &BTreeMap<String, Value>, expr: &str) -> Option<Value> {
        let mut parts = expr.split('.');
        let mut current = results.get(parts.next()?)?.clone();
        for part in parts {
            let (name, index) = match part.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (part, None),
            };
            if !name.is_empty() {
                current = current.get(name)?.clone();
            }
            if let Some(i) = index {
                current = current.get(i)?.clone();
            }
        }
        Some(current)
    }
    fn walk(value: &Value, results: &BTreeMap<String, Value>) -> Result<Value, String> {
        Ok(match value {
            Value::String(s) => {
                if let Some(expr) = s.strip_prefix("@{").and_then(|r| r.strip_suffix('}'))
                    && !expr.contains("@{")
                {
                    return lookup(results, expr).ok_or_else(|| expr.to_owned());
                }
                let mut out = String::new();
                let mut rest = s.as_str();
                while let Some(start) = rest.find("@{") {
                    out.push_str(&rest[..start]);
                    let end = rest[start..].find('}').ok_or_else(|| rest.to_owned())? + start;
                    let expr = &rest[start + 2..end];
                    out.push_str(&scalar_text(&lookup(results, expr).ok_or_else(|| expr.to_owned())?));
                    rest = &rest[end + 1..];
                }
                out.push_str(rest);
                Value::String(out)
            }
            Value::Array(items) => Value::Array(items.iter().map(|v| walk(v, results)).collect::<Result<_, _>>()?),
            Value::Object(map) => Value::Object(
                map.iter().map(|(k, v)| Ok((k.clone(), walk(v, results)?))).collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }
    walk(request, results)
}

/// Shared state of the HTTP front.
#[derive(Clone)]
pub struct SalesforceApp {
    pub sim: Arc<Mutex<Salesforce>>,
    pub faults: Faults,
    pub counters: Counters,
    in_flight: Arc<AtomicUsize>,
}

impl SalesforceApp {
    pub fn new(config: SalesforceConfig, faults: Faults, counters: Counters) -> Self {
        Self {
            sim: Arc::new(Mutex::new(Salesforce::new(config))),
            faults,
            counters,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn router(self) -> Router {
        Router::new().fallback(handle).with_state(self)
    }
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn to_http(response: SfResponse) -> Response {
    let csv = response.headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/csv"));
    match response.body {
        // Bulk results are CSV text, not JSON.
        Some(Value::String(text)) if csv => {
            let mut out = (StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK), text).into_response();
            out.headers_mut().insert(header::CONTENT_TYPE, axum::http::HeaderValue::from_static("text/csv"));
            out
        }
        body => {
            crate::json_response(response.status, body.as_ref(), "application/json;charset=UTF-8", response.headers)
        }
    }
}

async fn handle(State(app): State<SalesforceApp>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let endpoint = endpoint_label(&parts.method, &path);
    app.counters.hit("salesforce", &endpoint);
    let bytes: Bytes = match axum::body::to_bytes(body, 32 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return to_http(SfResponse::error(413, "REQUEST_TOO_LARGE", "request body too large")),
    };
    // A request counts against the concurrency cap for its whole life, injected latency
    // included, as a slow org's long transactions do.
    let _in_flight = InFlight(app.in_flight.clone());
    let concurrent = app.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let data_call = path.starts_with("/services/data/v");
    if data_call {
        let sim = app.sim.lock().expect("sim lock");
        if concurrent > sim.config.max_concurrent {
            let mut r = SfResponse::error(403, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded.");
            r.headers.push(sim.limit_header());
            return to_http(r);
        }
    }
    match app.faults.decide("salesforce", parts.method.as_str(), &path).await {
        FaultDecision::Proceed => {}
        FaultDecision::Fail(status) => {
            return to_http(SfResponse::error(
                status,
                "SERVER_UNAVAILABLE",
                "The server is temporarily unable to handle the request (injected fault).",
            ));
        }
    }
    if path == "/services/oauth2/token" && parts.method == Method::POST {
        return to_http(token(&app, &parts.headers, &bytes));
    }
    if path == "/services/oauth2/revoke" && parts.method == Method::POST {
        let form = String::from_utf8_lossy(&bytes);
        if let Some(t) = query_param(&form, "token") {
            app.sim.lock().expect("sim lock").tokens.insert(t, false);
        }
        return to_http(SfResponse::empty(200));
    }
    if path.trim_end_matches('/') == "/services/data" {
        let versions: Vec<Value> = (46..=66).map(|v| json!({"label": format!("v{v}.0"), "url": format!("/services/data/v{v}.0"), "version": format!("{v}.0")})).collect();
        return to_http(SfResponse::json(200, Value::Array(versions)));
    }
    let Some(rest) = path.strip_prefix("/services/data/") else { return to_http(SfResponse::not_found()) };
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let v = api_version(version);
    if !version.starts_with('v') || !(20.0..=66.0).contains(&v) {
        return to_http(SfResponse::not_found());
    }
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let mut sim = app.sim.lock().expect("sim lock");
    let limit = sim.limit_header();
    let authorized = token.as_ref().is_some_and(|t| sim.tokens.get(t).copied().unwrap_or(false));
    if !authorized {
        return to_http(SfResponse::error(401, "INVALID_SESSION_ID", "Session expired or invalid"));
    }
    if sim.api_usage >= sim.config.daily_quota {
        let mut r = SfResponse::error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.");
        r.headers.push(limit);
        return to_http(r);
    }
    sim.api_usage += 1;
    let is_csv = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/csv"));
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else if is_csv {
        Value::String(String::from_utf8_lossy(&bytes).into_owned())
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                let mut r = SfResponse::error(400, "JSON_PARSER_ERROR", format!("Unexpected character: {e}"));
                r.headers.push(sim.limit_header());
                return to_http(r);
            }
        }
    };
    let mut response = sim.execute(version, &parts.method, &format!("/{rest}"), &query, &body, &parts.headers);
    response.headers.push(sim.limit_header());
    to_http(response)
}

/// Client id and secret from HTTP Basic auth (as clients such as simple-salesforce send them).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let encoded = headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = base64_decode(encoded.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((percent_decode(id), percent_decode(secret)))
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        buffer = (buffer << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn token(app: &SalesforceApp, headers: &HeaderMap, body: &[u8]) -> SfResponse {
    let form = String::from_utf8_lossy(body);
    let grant = query_param(&form, "grant_type").unwrap_or_default();
    let mut sim = app.sim.lock().expect("sim lock");
    match grant.as_str() {
        "client_credentials" => {
            let (id, secret) = basic_credentials(headers).unwrap_or_else(|| {
                (
                    query_param(&form, "client_id").unwrap_or_default(),
                    query_param(&form, "client_secret").unwrap_or_default(),
                )
            });
            let ok = id == sim.config.client_id && secret == sim.config.client_secret;
            if !ok {
                return SfResponse::json(
                    400,
                    json!({"error": "invalid_client", "error_description": "invalid client credentials"}),
                );
            }
            let token = sim.issue_token();
            SfResponse::json(
                200,
                json!({
                    "access_token": token,
                    "signature": "c2FuZGJveA==",
                    "token_format": "opaque",
                    "scope": "api",
                    "instance_url": sim.config.instance_url,
                    "id": format!("{}/id/00Dsandbox/005sandbox", sim.config.instance_url),
                    "token_type": "Bearer",
                    "issued_at": now_ms().to_string(),
                }),
            )
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            let assertion = query_param(&form, "assertion").unwrap_or_default();
            match verify_jwt(&sim.config, &assertion) {
                Ok(()) => {
                    let token = sim.issue_token();
                    SfResponse::json(
                        200,
                        json!({
                            "access_token": token,
                            "scope": "api",
                            "instance_url": sim.config.instance_url,
                            "id": format!("{}/id/00Dsandbox/005sandbox", sim.config.instance_url),
                            "token_type": "Bearer",
                        }),
                    )
                }
                Err(e) => e,
            }
        }
        "" => SfResponse::json(400, json!({"error": "invalid_request", "error_description": "grant_type is required"})),
        _ => SfResponse::json(
            400,
            json!({"error": "unsupported_grant_type", "error_description": "grant type not supported"}),
        ),
    }
}

/// Checks a JWT bearer assertion: RS256 signature by the configured certificate, `iss` = the
/// client id, `aud` = a Salesforce login host, `sub` present, `exp` in the future.
fn verify_jwt(config: &SalesforceConfig, assertion: &str) -> Result<(), SfResponse> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
    let invalid =
        |description: &str| SfResponse::json(400, json!({"error": "invalid_grant", "error_description": description}));
    let Some(pem) = &config.jwt_public_key_pem else {
        return Err(invalid("user hasn't approved this consumer"));
    };
    let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| invalid("invalid assertion"))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_aud = false;
    // Salesforce accepts `exp` as a number or a numeric string (simple-salesforce sends a
    // string), so expiry is checked below rather than by the JWT library.
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["iss", "sub", "aud"]);
    let claims = decode::<Value>(assertion, &key, &validation)
        .map_err(|e| {
            tracing::info!(error = %e, "JWT assertion refused");
            invalid("invalid assertion")
        })?
        .claims;
    if claims.get("iss").and_then(Value::as_str) != Some(config.client_id.as_str()) {
        return Err(SfResponse::json(
            400,
            json!({"error": "invalid_client_id", "error_description": "client identifier invalid"}),
        ));
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a.starts_with("https://") && a.trim_end_matches('/').ends_with(".salesforce.com"),
        _ => false,
    };
    if !aud_ok {
        return Err(invalid("audience is invalid"));
    }
    if claims.get("sub").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(invalid("invalid assertion"));
    }
    let exp = match claims.get("exp") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.parse::<f64>().ok(),
        _ => None,
    };
    if exp.is_none_or(|exp| exp * 1000.0 <= now_ms() as f64) {
        return Err(invalid("invalid assertion"));
    }
    Ok(())
}

/// Bounded endpoint label for the call counters: ids and values are replaced by placeholders.
fn endpoint_label(method: &Method, path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let shape: Vec<String> = segments
        .iter()
        .enumerate()
        .map(|(i, s)| match (segments.get(i.wrapping_sub(1)).copied(), i) {
            (Some("data"), _) => "{version}".to_owned(),
            (Some("sobjects"), _) if segments.get(i.wrapping_sub(2)) != Some(&"composite") => (*s).to_owned(),
            (_, _) if i >= 5 && segments.get(3) == Some(&"sobjects") => "{value}".to_owned(),
            (Some("query"), _) => "{locator}".to_owned(),
            _ => (*s).to_owned(),
        })
        .collect();
    format!("{} /{}", method, shape.join("/"))
}
