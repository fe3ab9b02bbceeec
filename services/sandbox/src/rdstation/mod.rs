//! RD Station Marketing simulator (`https://api.rd.services`), following
//! `../shared/docs/saas-apis.md` §3, §6 and §7: OAuth code and refresh grants with 86400 s
//! tokens (expired → 401 with `WWW-Authenticate: … error="expired_token"`), contacts and the
//! account's contact fields ([`contacts`]), events and batch events validated against a schema
//! in data ([`events`]), API-key conversions, segmentations with paging headers, per-account
//! and per-contact rate limits (429 `RATE_LIMIT_EXCEDDED`), and the three error-body shapes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::faults::{FaultDecision, Faults};
use crate::{Counters, now_ms};

pub mod contacts;
pub mod events;

const BODY_LIMIT: usize = 200 * 1024;

/// `Retry-After` (seconds) of an injected 429.
pub const INJECTED_RETRY_AFTER_SECS: u64 = 1;

/// Settings of the simulated account.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RdConfig {
    pub client_id: String,
    pub client_secret: String,
    /// API key for `/platform/conversions`.
    pub api_key: String,
    pub token_ttl_secs: i64,
    /// Contact requests (GET/POST/PATCH/DELETE) per account per minute.
    pub contacts_per_minute: usize,
    /// PATCH requests per contact per 24 h.
    pub patches_per_contact_per_day: usize,
    /// `POST …/tag` requests per contact per 24 h and per account per 24 h.
    #[serde(default = "default_tags_per_contact")]
    pub tags_per_contact_per_day: usize,
    #[serde(default = "default_tags_per_account")]
    pub tags_per_account_per_day: usize,
    /// Segmentation list requests per minute.
    pub segmentations_per_minute: usize,
    /// Accept the legacy e-commerce events RD removed on 31 Dec 2025 (an old account).
    #[serde(default)]
    pub legacy_ecommerce_events: bool,
}

fn default_tags_per_contact() -> usize {
    24
}

fn default_tags_per_account() -> usize {
    15_000
}

impl Default for RdConfig {
    fn default() -> Self {
        Self {
            client_id: "elo-rd-client".into(),
            client_secret: "elo-rd-secret".into(),
            api_key: "elo-rd-api-key".into(),
            token_ttl_secs: 86_400,
            contacts_per_minute: 120,
            patches_per_contact_per_day: 24,
            tags_per_contact_per_day: default_tags_per_contact(),
            tags_per_account_per_day: default_tags_per_account(),
            segmentations_per_minute: 120,
            legacy_ecommerce_events: false,
        }
    }
}

/// A response: status, JSON body, extra headers.
pub struct RdResponse {
    status: u16,
    body: Option<Value>,
    headers: Vec<(String, String)>,
}

impl RdResponse {
    fn json(status: u16, body: Value) -> Self {
        Self { status, body: Some(body), headers: Vec::new() }
    }
    /// Flat shape: `{"errors": {"error_type", "error_message"}}`.
    fn flat(status: u16, error_type: &str, message: &str) -> Self {
        Self::json(status, json!({"errors": {"error_type": error_type, "error_message": message}}))
    }
    /// Array shape: `{"errors": [{"error_type", "error_message", "path"}]}`.
    fn array(status: u16, errors: Vec<Value>) -> Self {
        Self::json(status, json!({"errors": errors}))
    }
    /// Per-field map shape: `{"errors": {"field": [{"error_type", "error_message"}]}}`.
    fn field(status: u16, field: &str, error_type: &str, message: &str) -> Self {
        Self::json(status, json!({"errors": {field: [{"error_type": error_type, "error_message": message}]}}))
    }
    fn with_header(mut self, name: &str, value: String) -> Self {
        self.headers.push((name.to_owned(), value));
        self
    }
}

fn array_error(error_type: &str, message: &str, path: &str) -> Value {
    json!({"error_type": error_type, "error_message": message, "path": path})
}

/// A stored contact.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Contact {
    pub uuid: String,
    pub fields: Map<String, Value>,
    pub funnel: Value,
    pub created_ms: i64,
}

impl Contact {
    fn email(&self) -> &str {
        self.fields.get("email").and_then(Value::as_str).unwrap_or_default()
    }

    fn to_json(&self) -> Value {
        let mut out = self.fields.clone();
        out.insert("uuid".into(), json!(self.uuid));
        out.entry("tags").or_insert(json!([]));
        out.insert("links".into(), json!([{"rel": "SELF", "href": format!("https://api.rd.services/platform/contacts/{}", self.uuid), "media": "application/json", "type": "GET"}]));
        Value::Object(out)
    }
}

/// A segmentation: contacts carrying `tag` (or every contact when `tag` is absent).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Segmentation {
    pub id: u64,
    pub name: String,
    pub standard: bool,
    pub tag: Option<String>,
}

/// Simulator state.
pub struct RdStation {
    pub config: RdConfig,
    pub contacts: BTreeMap<String, Contact>,
    pub events: Vec<Value>,
    pub segmentations: Vec<Segmentation>,
    /// The account's custom contact fields.
    pub fields: Vec<contacts::ContactField>,
    /// Payload rules of each event type.
    pub event_schema: events::EventSchema,
    codes: HashMap<String, i64>,
    tokens: HashMap<String, i64>,
    refresh_tokens: HashMap<String, bool>,
    contact_calls: VecDeque<i64>,
    segmentation_calls: VecDeque<i64>,
    patches: HashMap<String, VecDeque<i64>>,
    tag_posts: HashMap<String, VecDeque<i64>>,
    account_tag_posts: VecDeque<i64>,
    next: u64,
}

impl RdStation {
    pub fn new(config: RdConfig) -> Self {
        Self {
            config,
            contacts: BTreeMap::new(),
            events: Vec::new(),
            segmentations: vec![Segmentation {
                id: 1,
                name: "Todos os contatos da base de Leads".into(),
                standard: true,
                tag: None,
            }],
            fields: contacts::seeded_fields(),
            event_schema: events::EventSchema::default(),
            codes: HashMap::new(),
            tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            contact_calls: VecDeque::new(),
            segmentation_calls: VecDeque::new(),
            patches: HashMap::new(),
            tag_posts: HashMap::new(),
            account_tag_posts: VecDeque::new(),
            next: 1,
        }
    }

    fn uuid(&mut self) -> String {
        let n = self.next;
        self.next += 1;
        let r: u64 = rand::random();
        format!("{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}", (r >> 32) as u32, n & 0xffff, r & 0xfff, (r >> 12) & 0xfff, n)
    }

    /// An authorization code, as `/auth/dialog` would redirect with (valid 1 h).
    pub fn issue_code(&mut self) -> String {
        let code = format!("code-{}", self.uuid());
        self.codes.insert(code.clone(), now_ms());
        code
    }

    /// Makes every access token expired (control API).
    pub fn expire_tokens(&mut self) {
        self.tokens.values_mut().for_each(|exp| *exp = 0);
    }

    fn issue_tokens(&mut self) -> Value {
        let access = format!("rd-access-{}", self.uuid());
        let refresh = format!("rd-refresh-{}", self.uuid());
        self.tokens.insert(access.clone(), now_ms() + self.config.token_ttl_secs * 1000);
        self.refresh_tokens.insert(refresh.clone(), true);
        json!({"access_token": access, "expires_in": self.config.token_ttl_secs, "refresh_token": refresh})
    }

    fn token_grant(&mut self, body: &Value) -> RdResponse {
        let client_ok = body.get("client_id").and_then(Value::as_str) == Some(self.config.client_id.as_str())
            && body.get("client_secret").and_then(Value::as_str) == Some(self.config.client_secret.as_str());
        if !client_ok {
            return RdResponse::flat(401, "ACCESS_DENIED", "Wrong credentials provided.");
        }
        if let Some(code) = body.get("code").and_then(Value::as_str) {
            return match self.codes.remove(code) {
                Some(issued) if now_ms() - issued <= 3_600_000 => RdResponse::json(200, self.issue_tokens()),
                Some(_) => RdResponse::flat(401, "EXPIRED_CODE_GRANT", "The authorization code grant has expired."),
                None => RdResponse::flat(401, "ACCESS_DENIED", "Wrong credentials provided."),
            };
        }
        if let Some(refresh) = body.get("refresh_token").and_then(Value::as_str) {
            // Marketing refresh tokens do not expire and stay valid after use.
            return if self.refresh_tokens.get(refresh).copied().unwrap_or(false) {
                let mut tokens = self.issue_tokens();
                tokens["refresh_token"] = json!(refresh);
                RdResponse::json(200, tokens)
            } else {
                RdResponse::flat(401, "INVALID_REFRESH_TOKEN", "The refresh token is invalid.")
            };
        }
        RdResponse::array(400, vec![array_error("CANNOT_BE_NULL", "Cannot be null.", "body.code")])
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), RdResponse> {
        let token =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match token.and_then(|t| self.tokens.get(t)) {
            Some(exp) if *exp > now_ms() => Ok(()),
            Some(_) => Err(RdResponse::flat(401, "UNAUTHORIZED", "Invalid token.").with_header(
                "www-authenticate",
                r#"Bearer realm="https://api.rd.services/", error="expired_token", error_description="The access token expired""#.into(),
            )),
            None => Err(RdResponse::flat(401, "UNAUTHORIZED", "Invalid token.")
                .with_header("www-authenticate", r#"Bearer realm="https://api.rd.services/", error="invalid_token""#.into())),
        }
    }

    /// Sliding-window limiter: `Err` when `window` already holds `max` calls in `span_ms`.
    fn limit(window: &mut VecDeque<i64>, max: usize, span_ms: i64) -> Result<(), RdResponse> {
        let now = now_ms();
        while window.front().is_some_and(|t| now - t >= span_ms) {
            window.pop_front();
        }
        if window.len() >= max {
            let retry = window.front().map_or(1, |t| ((span_ms - (now - t)) / 1000).max(1));
            return Err(rate_limited().with_header("retry-after", retry.to_string()));
        }
        window.push_back(now);
        Ok(())
    }

    fn find(&self, identifier: &str) -> Option<String> {
        let (kind, value) = identifier.split_once(':').unwrap_or(("uuid", identifier));
        match kind {
            "uuid" => self.contacts.contains_key(value).then(|| value.to_owned()),
            "email" => self.contacts.values().find(|c| c.email().eq_ignore_ascii_case(value)).map(|c| c.uuid.clone()),
            _ => None,
        }
    }

    fn not_found() -> RdResponse {
        RdResponse::flat(404, "RESOURCE_NOT_FOUND", "Lead not found.")
    }

    fn segmentation_page(&mut self, query: &str, items: Vec<Value>, key: &str) -> RdResponse {
        let page: usize = query_value(query, "page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
        let size: usize = query_value(query, "page_size").and_then(|p| p.parse().ok()).unwrap_or(25);
        if size > 125 || size == 0 {
            return RdResponse::flat(400, "BAD_REQUEST", "page_size must be between 1 and 125");
        }
        let total = items.len();
        let rows: Vec<Value> = items.into_iter().skip((page - 1) * size).take(size).collect();
        RdResponse::json(200, json!({key: rows}))
            .with_header("pagination-total-rows", total.to_string())
            .with_header("pagination-page-size", size.to_string())
            .with_header("pagination-page", page.to_string())
    }

    fn segmentations(&mut self, rest: &[&str], query: &str) -> RdResponse {
        if let Err(e) = Self::limit(&mut self.segmentation_calls, self.config.segmentations_per_minute, 60_000) {
            return e;
        }
        match rest {
            [] => {
                let items = self
                    .segmentations
                    .iter()
                    .map(|s| json!({"id": s.id, "name": s.name, "standard": s.standard, "created_at": "2026-01-01T00:00:00.000-03:00", "updated_at": "2026-01-01T00:00:00.000-03:00", "process_status": "processed", "links": [{"rel": "SEGMENTATIONS.CONTACTS", "href": format!("https://api.rd.services/platform/segmentations/{}/contacts", s.id), "media": "application/json", "type": "GET"}]}))
                    .collect();
                self.segmentation_page(query, items, "segmentations")
            }
            [id, "contacts"] => {
                let Some(seg) =
                    id.parse::<u64>().ok().and_then(|id| self.segmentations.iter().find(|s| s.id == id)).cloned()
                else {
                    return RdResponse::flat(404, "RESOURCE_NOT_FOUND", "Segmentation not found.");
                };
                let items = self
                    .contacts
                    .values()
                    .filter(|c| match &seg.tag {
                        None => true,
                        Some(tag) => c.fields.get("tags").and_then(Value::as_array).is_some_and(|t| t.iter().any(|x| x.as_str() == Some(tag))),
                    })
                    .map(|c| json!({"uuid": c.uuid, "name": c.fields.get("name"), "email": c.email(), "last_conversion_date": null, "created_at": crate::salesforce::model::format_datetime(c.created_ms), "links": []}))
                    .collect();
                self.segmentation_page(query, items, "contacts")
            }
            _ => RdResponse::flat(404, "RESOURCE_NOT_FOUND", "Resource not found."),
        }
    }
}

fn default_funnel() -> Value {
    json!({"lifecycle_stage": "Lead", "opportunity": false, "contact_owner_email": null, "interest": 0, "fit": 0, "origin": "API"})
}

fn invalid_json() -> RdResponse {
    RdResponse::flat(400, "BAD_REQUEST", "The request body is not valid JSON.")
}

fn percent(text: &str) -> String {
    crate::salesforce::percent_decode(text)
}

fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| percent(v)))
}

/// RD's 429 body, with its own spelling of the error type ("Limite de requisições da API").
fn rate_limited() -> RdResponse {
    RdResponse::flat(429, "RATE_LIMIT_EXCEDDED", "API usage limit exceeded")
}

/// Shared state of the HTTP front.
#[derive(Clone)]
pub struct RdStationApp {
    pub sim: Arc<Mutex<RdStation>>,
    pub faults: Faults,
    pub counters: Counters,
}

impl RdStationApp {
    pub fn new(config: RdConfig, faults: Faults, counters: Counters) -> Self {
        Self { sim: Arc::new(Mutex::new(RdStation::new(config))), faults, counters }
    }

    pub fn router(self) -> Router {
        Router::new().fallback(handle).with_state(self)
    }
}

fn to_http(response: RdResponse) -> Response {
    crate::json_response(response.status, response.body.as_ref(), "application/json; charset=utf-8", response.headers)
}

fn endpoint_label(method: &Method, segments: &[&str]) -> String {
    let shape: Vec<&str> = segments
        .iter()
        .enumerate()
        .map(
            |(i, s)| if i == 2 && matches!(segments.get(1), Some(&"contacts" | &"segmentations")) { "{id}" } else { s },
        )
        .collect();
    format!("{method} /{}", shape.join("/"))
}

async fn handle(State(app): State<RdStationApp>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    app.counters.hit("rdstation", &endpoint_label(&parts.method, &segments));
    let bytes: Bytes = match axum::body::to_bytes(body, 4 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return to_http(RdResponse::flat(413, "REQUEST_ENTITY_TOO_LARGE", "Request body too large.")),
    };
    if let FaultDecision::Fail(status) = app.faults.decide("rdstation", parts.method.as_str(), &path).await {
        return to_http(match status {
            // Real RD's 429s carry `Retry-After`; an injected one asks for a short wait.
            429 => rate_limited().with_header("retry-after", INJECTED_RETRY_AFTER_SECS.to_string()),
            _ => RdResponse::flat(status, "SERVICE_UNAVAILABLE", "Service unavailable (injected fault)."),
        });
    }
    let writes = matches!(parts.method, Method::POST | Method::PATCH | Method::PUT);
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let form_endpoint = path == "/auth/revoke";
    if writes && !is_json && !form_endpoint && !bytes.is_empty() {
        return to_http(RdResponse::flat(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json."));
    }
    let body: Value = if bytes.is_empty() || form_endpoint {
        Value::Null
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) => return to_http(invalid_json()),
        }
    };
    let mut sim = app.sim.lock().expect("rd lock");
    let response = match (parts.method.as_str(), segments.as_slice()) {
        ("GET", ["auth", "dialog"]) => {
            let Some(redirect) = query_value(&query, "redirect_uri").or_else(|| query_value(&query, "redirect_url"))
            else {
                return to_http(RdResponse::flat(400, "BAD_REQUEST", "redirect_uri is required."));
            };
            if query_value(&query, "client_id").as_deref() != Some(sim.config.client_id.as_str()) {
                return to_http(RdResponse::flat(401, "ACCESS_DENIED", "Wrong credentials provided."));
            }
            let code = sim.issue_code();
            let sep = if redirect.contains('?') { '&' } else { '?' };
            return (StatusCode::FOUND, [(header::LOCATION, format!("{redirect}{sep}code={code}"))]).into_response();
        }
        ("POST", ["auth", "token"]) => sim.token_grant(&body),
        ("POST", ["auth", "revoke"]) => {
            let form = String::from_utf8_lossy(&bytes).into_owned();
            if let Some(token) = query_value(&form, "token") {
                sim.tokens.remove(&token);
                sim.refresh_tokens.insert(token, false);
            }
            RdResponse::json(200, json!({}))
        }
        ("POST", ["platform", "conversions"]) => {
            if query_value(&query, "api_key").as_deref() != Some(sim.config.api_key.as_str()) {
                RdResponse::flat(401, "UNAUTHORIZED", "Invalid API key.")
            } else {
                sim.events(&body, bytes.len(), false, Some("CONVERSION"))
            }
        }
        (_, ["platform", ..]) => match sim.authorize(&parts.headers) {
            Err(e) => e,
            Ok(()) => match (parts.method.as_str(), &segments[1..]) {
                (_, ["contacts", rest @ ..]) => sim.contacts(&parts.method, rest, &body),
                ("POST", ["events"]) => sim.events(&body, bytes.len(), false, None),
                ("POST", ["events", "batch"]) => sim.events(&body, bytes.len(), true, None),
                ("GET", ["segmentations", rest @ ..]) => sim.segmentations(rest, &query),
                _ => RdResponse::flat(404, "RESOURCE_NOT_FOUND", "Resource not found."),
            },
        },
        _ => RdResponse::flat(404, "RESOURCE_NOT_FOUND", "Resource not found."),
    };
    to_http(response)
}
