//! Salesforce REST simulator: OAuth client credentials and JWT bearer, revocable tokens, the
//! identity URL, `Sforce-Limit-Info`, a daily quota that ends in 403 `REQUEST_LIMIT_EXCEEDED`,
//! a concurrency cap on long-running requests, a describe-able org schema ([`schema`]), upsert
//! by external id, sObject Collections, Composite and Composite Graph, Bulk API 2.0 ingest, a
//! SOQL subset with paging, and org rules (required fields, lookups, price books, the Order
//! lifecycle, Person Accounts, duplicate rules), with injectable `UNABLE_TO_LOCK_ROW`.
//! Behaviour follows `../shared/docs/saas-apis.md` §2 and §7.
//!
//! Layout: `http` is the HTTP front (auth, limits, faults); this module dispatches REST calls;
//! [`model`] holds records and validation, `rules` the platform rules, `composite`,
//! `query` and [`bulk`] their resources.

pub mod bulk;
mod composite;
mod http;
pub mod identity;
pub mod model;
mod query;
mod rules;
pub mod schema;
pub mod soql;
pub mod store;

pub use http::SalesforceApp;

use std::collections::{BTreeMap, HashMap};

use axum::http::{HeaderMap, Method};
use serde_json::{Map, Value, json};

use crate::now_ms;
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
    /// Long-running requests in flight before new ones get 403 REQUEST_LIMIT_EXCEEDED.
    pub max_concurrent: usize,
    /// How long a request runs before it counts as long-running (20 s in Salesforce).
    #[serde(default = "default_long_running_ms")]
    pub long_running_ms: u64,
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
    /// Bulk API 2.0 rows by external id value refused once with UNABLE_TO_LOCK_ROW (a row
    /// another transaction holds; the next write of it goes through).
    #[serde(default)]
    pub bulk_locked_once: Vec<String>,
    /// Bulk API 2.0 rows by external id value the platform does not get to (an internal batch
    /// given up): in neither result file, listed in `unprocessedrecords/`.
    #[serde(default)]
    pub bulk_unprocessed: Vec<String>,
}

fn default_long_running_ms() -> u64 {
    20_000
}

impl Default for SalesforceConfig {
    fn default() -> Self {
        Self {
            client_id: "elo-sandbox-client".into(),
            client_secret: "elo-sandbox-secret".into(),
            instance_url: "http://127.0.0.1:8702".into(),
            daily_quota: 100_000,
            max_concurrent: 25,
            long_running_ms: default_long_running_ms(),
            query_batch: 2000,
            lock_row_rate: 0.0,
            jwt_public_key_pem: None,
            person_accounts: false,
            bulk_locked_once: Vec::new(),
            bulk_unprocessed: Vec::new(),
        }
    }
}

/// Simulator state (behind one lock: requests are short and the org must change atomically).
pub struct Salesforce {
    pub config: SalesforceConfig,
    pub org: Org,
    tokens: HashMap<String, bool>,
    pub api_usage: u64,
    /// Query locators: (size of the whole result, rows still to serve).
    cursors: HashMap<String, (usize, Vec<Value>)>,
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
    fn finish_collection(
        &mut self,
        savepoint: store::OrgSavepoint,
        all_or_none: bool,
        mut rows: Vec<Value>,
    ) -> SfResponse {
        let failed = rows.iter().any(|r| r["success"] == json!(false));
        if !(all_or_none && failed) {
            self.org.release(savepoint);
        } else {
            self.org.rollback(savepoint);
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
        let savepoint = self.org.savepoint();
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
        self.finish_collection(savepoint, all_or_none, rows)
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
