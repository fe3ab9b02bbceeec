//! Confluent Schema Registry REST routes.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::store::{Compatibility, Store, StoreError};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

type Shared = Arc<Mutex<Store>>;

/// A Confluent error body: `{"error_code": 40401, "message": "..."}`.
pub struct ApiError {
    code: u32,
    message: String,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self { code: e.error_code(), message: e.to_string() }
    }
}

impl ApiError {
    fn unprocessable(message: impl Into<String>) -> Self {
        Self { code: 42201, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let http = if self.code >= 10_000 { self.code / 100 } else { self.code };
        let status = StatusCode::from_u16(http as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self.message, "registry error");
        }
        json_response(status, json!({"error_code": self.code, "message": self.message}))
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body.to_string()).into_response()
}

fn ok(body: Value) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, body))
}

fn raw(schema: &str) -> Result<Response, ApiError> {
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], schema.to_owned()).into_response())
}

/// The router over a store.
pub fn app(store: Store) -> Router {
    let shared: Shared = Arc::new(Mutex::new(store));
    Router::new()
        .route("/", get(|| async { ok(json!({})) }))
        .route("/schemas/types", get(|| async { ok(json!(["AVRO"])) }))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(id_versions))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(version).delete(delete_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(version_schema))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(compatibility))
        .route("/compatibility/subjects/{subject}/versions", post(compatibility_all))
        .route("/config", get(global_config).put(set_global_config))
        .route("/config/{subject}", get(subject_config).put(set_subject_config))
        .route("/mode", get(|| async { ok(json!({"mode": "READWRITE"})) }))
        .fallback(|| async { ApiError { code: 404, message: "HTTP 404 Not Found".into() } })
        .with_state(shared)
}

fn lock(store: &Shared) -> std::sync::MutexGuard<'_, Store> {
    store.lock().expect("registry lock poisoned")
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
}

fn parse_body(body: &Bytes) -> Result<SchemaBody, ApiError> {
    let parsed: SchemaBody =
        serde_json::from_slice(body).map_err(|e| ApiError::unprocessable(format!("Invalid request body: {e}")))?;
    if let Some(t) = &parsed.schema_type
        && !t.eq_ignore_ascii_case("AVRO")
    {
        return Err(StoreError::UnsupportedType(t.clone()).into());
    }
    if !parsed.references.is_empty() {
        return Err(ApiError::unprocessable("Schema references are not supported by this registry"));
    }
    Ok(parsed)
}

async fn schema_by_id(State(s): State<Shared>, Path(id): Path<u32>) -> Result<Response, ApiError> {
    ok(json!({"schema": lock(&s).schema_by_id(id)?}))
}

async fn raw_schema_by_id(State(s): State<Shared>, Path(id): Path<u32>) -> Result<Response, ApiError> {
    raw(lock(&s).schema_by_id(id)?)
}

async fn id_versions(State(s): State<Shared>, Path(id): Path<u32>) -> Result<Response, ApiError> {
    let usages = lock(&s).id_usages(id)?;
    ok(Value::Array(
        usages.into_iter().map(|(subject, version)| json!({"subject": subject, "version": version})).collect(),
    ))
}

async fn subjects(State(s): State<Shared>) -> Result<Response, ApiError> {
    ok(json!(lock(&s).subjects()))
}

async fn versions(State(s): State<Shared>, Path(subject): Path<String>) -> Result<Response, ApiError> {
    ok(json!(lock(&s).versions(&subject)?))
}

async fn version(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    ok(serde_json::to_value(lock(&s).version(&subject, &version)?).expect("serialisable"))
}

async fn version_schema(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    raw(&lock(&s).version(&subject, &version)?.schema)
}

async fn register(State(s): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let registered = lock(&s).register(&subject, &body.schema)?;
    tracing::info!(subject, id = registered.id, version = registered.version, "schema registered");
    ok(
        json!({"id": registered.id, "subject": registered.subject, "version": registered.version, "schema": registered.schema}),
    )
}

async fn lookup(State(s): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    ok(serde_json::to_value(lock(&s).lookup(&subject, &body.schema)?).expect("serialisable"))
}

async fn delete_subject(State(s): State<Shared>, Path(subject): Path<String>) -> Result<Response, ApiError> {
    ok(json!(lock(&s).delete_subject(&subject)?))
}

async fn delete_version(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    ok(json!(lock(&s).delete_version(&subject, &version)?))
}

/// Query flags arrive as `true`, `True`, `false`...; anything but true-ish is false.
fn flag(value: &Option<String>) -> bool {
    value.as_deref().is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

#[derive(Deserialize)]
struct Verbose {
    verbose: Option<String>,
}

async fn compatibility(
    State(s): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<Verbose>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let problems = lock(&s).check(&subject, &body.schema, Some(&version))?;
    compatibility_answer(problems, flag(&q.verbose))
}

async fn compatibility_all(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Query(q): Query<Verbose>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let problems = lock(&s).check(&subject, &body.schema, None)?;
    compatibility_answer(problems, flag(&q.verbose))
}

fn compatibility_answer(problems: Vec<String>, verbose: bool) -> Result<Response, ApiError> {
    let mut body = json!({"is_compatible": problems.is_empty()});
    if verbose {
        body["messages"] = json!(problems);
    }
    ok(body)
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: Compatibility,
}

fn parse_config(body: &Bytes) -> Result<Compatibility, ApiError> {
    serde_json::from_slice::<ConfigBody>(body)
        .map(|c| c.compatibility)
        .map_err(|e| ApiError { code: 42203, message: format!("Invalid compatibility level: {e}") })
}

async fn global_config(State(s): State<Shared>) -> Result<Response, ApiError> {
    ok(json!({"compatibilityLevel": lock(&s).global_compatibility()}))
}

async fn set_global_config(State(s): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let level = parse_config(&body)?;
    lock(&s).set_global_compatibility(level)?;
    ok(json!({"compatibility": level}))
}

#[derive(Deserialize)]
struct DefaultToGlobal {
    #[serde(rename = "defaultToGlobal")]
    default_to_global: Option<String>,
}

async fn subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    Query(q): Query<DefaultToGlobal>,
) -> Result<Response, ApiError> {
    let store = lock(&s);
    match (store.subject_compatibility(&subject), flag(&q.default_to_global)) {
        (Some(level), _) => ok(json!({"compatibilityLevel": level})),
        (None, true) => ok(json!({"compatibilityLevel": store.global_compatibility()})),
        (None, false) => Err(ApiError {
            code: 40408,
            message: format!("Subject '{subject}' does not have subject-level compatibility configured"),
        }),
    }
}

async fn set_subject_config(
    State(s): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let level = parse_config(&body)?;
    lock(&s).set_subject_compatibility(&subject, level)?;
    ok(json!({"compatibility": level}))
}
