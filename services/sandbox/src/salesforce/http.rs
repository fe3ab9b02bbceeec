//! The HTTP front: OAuth token endpoints, authentication, the daily quota and the
//! concurrency cap on long-running requests, faults, and dispatch into [`Salesforce`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::model::SfResponse;
use super::{Salesforce, SalesforceConfig, api_version, percent_decode, query_param};
use crate::faults::{FaultDecision, Faults};
use crate::{Counters, now_ms};

/// Shared state of the HTTP front.
#[derive(Clone)]
pub struct SalesforceApp {
    pub sim: Arc<Mutex<Salesforce>>,
    pub faults: Faults,
    pub counters: Counters,
    in_flight: InFlightRequests,
}

impl SalesforceApp {
    pub fn new(config: SalesforceConfig, faults: Faults, counters: Counters) -> Self {
        Self {
            sim: Arc::new(Mutex::new(Salesforce::new(config))),
            faults,
            counters,
            in_flight: InFlightRequests::default(),
        }
    }

    pub fn router(self) -> Router {
        Router::new().fallback(handle).with_state(self)
    }
}

/// Requests being served and since when: Salesforce's concurrent-request limit counts only
/// the long-running ones (20 s or more, "Salesforce app limits cheatsheet").
#[derive(Clone, Default)]
struct InFlightRequests {
    started: Arc<Mutex<HashMap<u64, Instant>>>,
    next: Arc<AtomicU64>,
}

impl InFlightRequests {
    /// Registers a request; it leaves the registry when the guard drops.
    fn enter(&self) -> InFlight {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.started.lock().expect("in-flight lock").insert(id, Instant::now());
        InFlight { id, registry: self.clone() }
    }

    /// Requests that have been running for at least `threshold`.
    fn long_running(&self, threshold: Duration) -> usize {
        self.started.lock().expect("in-flight lock").values().filter(|t| t.elapsed() >= threshold).count()
    }
}

struct InFlight {
    id: u64,
    registry: InFlightRequests,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.registry.started.lock().expect("in-flight lock").remove(&self.id);
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
    // New calls are refused while `max_concurrent` calls have been running for the
    // long-running threshold or more (injected latency included, as a slow org's would be).
    let long_running = {
        let threshold = Duration::from_millis(app.sim.lock().expect("sim lock").config.long_running_ms);
        app.in_flight.long_running(threshold)
    };
    let _in_flight = app.in_flight.enter();
    let data_call = path.starts_with("/services/data/v");
    if data_call {
        let sim = app.sim.lock().expect("sim lock");
        if long_running >= sim.config.max_concurrent {
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
    if let Some(ids) = path.strip_prefix("/id/")
        && parts.method == Method::GET
    {
        let sim = app.sim.lock().expect("sim lock");
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let live = token.is_some_and(|t| sim.tokens.get(t).copied().unwrap_or(false));
        return super::identity::serve(ids, live, &sim.config.instance_url);
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
                    "id": super::identity::url(&sim.config.instance_url),
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
                            "id": super::identity::url(&sim.config.instance_url),
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
