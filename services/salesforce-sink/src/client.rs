//! A thin Salesforce REST client: OAuth (client credentials or JWT bearer), one shared
//! `reqwest::Client`, the calls the sink makes (describe, SOQL, Composite, Composite Graph),
//! `Sforce-Limit-Info` read on every answer, and a cap on concurrent requests.
//!
//! # Why not the `force` crate
//! `force` (crates.io, 0.x, a young single-maintainer project) wraps REST, Bulk 2.0 and JWT,
//! but brings its own retry/rate-limit middleware, `chrono`, `secrecy`, `url` and
//! `async-trait`, and has no Composite Graph builder. Elo's consumer runtime already owns
//! retries by error class (a second retry layer would multiply calls against a shared daily
//! quota), and the sink needs the raw per-node results of Composite Graph to blame the right
//! record. What is left is ~300 lines of typed calls, so the sink keeps its own client.
//! It does not use `elo-http-client` for the same reason: that client retries by itself.
//!
//! # Sessions
//! Neither flow returns `expires_in`, so expiry shows up as 401 `INVALID_SESSION_ID`: the
//! client then re-authenticates once and repeats only the call that failed; a second 401 is
//! an [`Error::Auth`] (the runtime waits and alerts, never drops). Secrets are read from
//! files and never logged; only the token's length is.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::{RwLock, Semaphore};

use crate::metrics;
use crate::quota::Governor;

/// How the sink authenticates.
#[derive(Clone)]
pub enum AuthFlow {
    /// `grant_type=client_credentials` with the connected app's secret.
    ClientCredentials { client_id: String, client_secret: String },
    /// `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`, an RS256 assertion signed
    /// with the connected app's private key.
    JwtBearer { client_id: String, username: String, private_key_pem: String, audience: String },
}

impl std::fmt::Debug for AuthFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClientCredentials { client_id, .. } => write!(f, "ClientCredentials({client_id}, secret: ***)"),
            Self::JwtBearer { client_id, username, .. } => {
                write!(f, "JwtBearer({client_id}, {username}, key: ***)")
            }
        }
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Token endpoint host (`https://login.salesforce.com`, a My Domain, or the sandbox).
    pub login_url: String,
    pub api_version: String,
    pub auth: AuthFlow,
    pub request_timeout: Duration,
    /// Requests in flight at once (Salesforce counts long-running concurrent requests).
    pub max_concurrent: usize,
    /// Share of the daily quota left to other integrations (percent).
    pub quota_reserve_percent: u64,
    /// Warn when the forecast says fewer hours of quota are left.
    pub quota_warn_hours: f64,
    /// While only the reserve is left, one call per this interval probes for budget.
    pub quota_probe_every: Duration,
}

/// Failures of a Salesforce call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("salesforce transport error: {0}")]
    Transport(#[from] reqwest::Error),
    /// The call was answered with an error status; `code` is Salesforce's `errorCode`.
    #[error("salesforce HTTP {status}: {code}: {message}")]
    Status { status: u16, code: String, message: String },
    /// Authentication refused (token endpoint), or a 401 right after re-authenticating.
    #[error("salesforce auth failed: {code}: {message}")]
    Auth { code: String, message: String },
    #[error("salesforce answer unreadable: {0}")]
    Decode(String),
}

impl Error {
    /// Salesforce's error code, or a bounded stand-in.
    pub fn code(&self) -> String {
        match self {
            Self::Transport(e) if e.is_timeout() => "timeout".into(),
            Self::Transport(_) => "transport".into(),
            Self::Status { code, .. } | Self::Auth { code, .. } => code.clone(),
            Self::Decode(_) => "decode".into(),
        }
    }
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An authenticated session.
#[derive(Clone)]
struct Session {
    token: String,
    instance_url: String,
    /// Bumped on every new token, so concurrent 401s re-authenticate once.
    generation: u64,
}

/// API usage from `Sforce-Limit-Info: api-usage=used/limit`, the newest reading kept.
///
/// Answers of concurrent calls are read in any order, so the last answer read is not always the
/// server's last count: a call sent before the held answer was received overlapped it and may
/// have been counted first, and of such readings the higher count is the later one. A call sent
/// after the held answer arrived was counted after it, so its reading replaces it even when lower
/// (Salesforce's count is over a rolling day). Keeping the last answer read instead left the
/// gauge one or more calls behind once the sink went quiet (the report's quota then disagreed
/// with Salesforce's own count).
#[derive(Default, Debug)]
pub struct Usage(std::sync::Mutex<Option<UsageReading>>);

/// One `Sforce-Limit-Info` reading and when its call was sent and answered.
#[derive(Clone, Copy, Debug)]
pub struct UsageReading {
    pub used: u64,
    pub limit: u64,
    pub sent: Instant,
    pub received: Instant,
}

impl Usage {
    /// Keeps `reading` if it is not older than the one held (see [`Usage`]); whether it was kept.
    pub fn record(&self, reading: UsageReading) -> bool {
        let mut held = self.0.lock().expect("usage lock");
        let newer = held.is_none_or(|h| reading.sent >= h.received || reading.used >= h.used);
        if newer {
            *held = Some(reading);
        }
        newer
    }

    /// (used, limit) of the reading held.
    pub fn current(&self) -> Option<(u64, u64)> {
        self.0.lock().expect("usage lock").map(|r| (r.used, r.limit))
    }
}

/// The shared Salesforce client (cheap to clone).
#[derive(Clone)]
pub struct SalesforceClient {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
    session: Arc<RwLock<Option<Session>>>,
    permits: Arc<Semaphore>,
    pub usage: Arc<Usage>,
    quota: Arc<Governor>,
}

impl SalesforceClient {
    pub fn new(config: ClientConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(config.request_timeout)
            .pool_max_idle_per_host(config.max_concurrent.max(1))
            .build()?;
        Ok(Self {
            http,
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            quota: Arc::new(Governor::new(
                config.quota_reserve_percent,
                config.quota_warn_hours,
                config.quota_probe_every,
            )),
            config: Arc::new(config),
            session: Arc::new(RwLock::new(None)),
            usage: Arc::new(Usage::default()),
        })
    }

    pub fn api_version(&self) -> &str {
        &self.config.api_version
    }

    /// Obtains a token (token endpoint failures are [`Error::Auth`] or transient).
    async fn authenticate(&self) -> Result<Session> {
        let url = format!("{}/services/oauth2/token", self.config.login_url.trim_end_matches('/'));
        let form: Vec<(&str, String)> = match &self.config.auth {
            AuthFlow::ClientCredentials { client_id, client_secret } => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", client_id.clone()),
                ("client_secret", client_secret.clone()),
            ],
            AuthFlow::JwtBearer { client_id, username, private_key_pem, audience } => {
                let assertion = jwt_assertion(client_id, username, audience, private_key_pem)?;
                vec![("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()), ("assertion", assertion)]
            }
        };
        metrics::API_CALLS.with_label_values(&["token"]).inc();
        let response = self.http.post(&url).form(&form).send().await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_server_error() {
            return Err(Error::Status {
                status: status.as_u16(),
                code: format!("http_{}", status.as_u16()),
                message: "token endpoint unavailable".into(),
            });
        }
        if !status.is_success() {
            return Err(Error::Auth {
                code: body["error"].as_str().unwrap_or("invalid_grant").to_owned(),
                message: body["error_description"].as_str().unwrap_or_default().to_owned(),
            });
        }
        let token = body["access_token"].as_str().ok_or_else(|| Error::Decode("no access_token".into()))?;
        let instance = body["instance_url"].as_str().ok_or_else(|| Error::Decode("no instance_url".into()))?;
        tracing::info!(instance_url = instance, token_len = token.len(), "salesforce session opened");
        Ok(Session { token: token.to_owned(), instance_url: instance.trim_end_matches('/').to_owned(), generation: 0 })
    }

    /// The current session, authenticating if there is none or if `stale` is the generation
    /// that just got a 401 (another task may already have renewed it).
    async fn session(&self, stale: Option<u64>) -> Result<Session> {
        if let Some(s) = self.session.read().await.as_ref()
            && Some(s.generation) != stale
        {
            return Ok(s.clone());
        }
        let mut guard = self.session.write().await;
        if let Some(s) = guard.as_ref()
            && Some(s.generation) != stale
        {
            return Ok(s.clone());
        }
        let next = guard.as_ref().map_or(1, |s| s.generation + 1);
        let mut fresh = self.authenticate().await?;
        fresh.generation = next;
        *guard = Some(fresh.clone());
        Ok(fresh)
    }

    /// Calls `{instance}/services/data/{version}{path}`; on 401 re-authenticates once and
    /// repeats this call only. `kind` labels the API-call metric.
    pub async fn call(&self, kind: &'static str, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let text = self.call_raw(kind, method, path, body.map_or(Body::None, Body::Json)).await?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| Error::Decode(e.to_string()))
    }

    /// [`SalesforceClient::call`] returning the body as text (Bulk API 2.0's CSV results).
    pub async fn call_raw(&self, kind: &'static str, method: Method, path: &str, body: Body<'_>) -> Result<String> {
        let (_permit, response) = self.respond(kind, method, path, body).await?;
        Ok(response.text().await?)
    }

    /// [`SalesforceClient::call_raw`] handing the body over as it arrives (a Bulk API 2.0
    /// results CSV is as large as the job), so it is never held whole.
    pub async fn call_chunks(
        &self,
        kind: &'static str,
        method: Method,
        path: &str,
        each: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<()> {
        let (_permit, mut response) = self.respond(kind, method, path, Body::None).await?;
        while let Some(chunk) = response.chunk().await? {
            each(&chunk);
        }
        Ok(())
    }

    /// Sends a call (re-authenticating once on 401); a successful answer, its body unread,
    /// with the concurrency permit it holds until read.
    async fn respond(
        &self,
        kind: &'static str,
        method: Method,
        path: &str,
        body: Body<'_>,
    ) -> Result<(tokio::sync::OwnedSemaphorePermit, reqwest::Response)> {
        if !self.quota.admit() {
            return Err(Error::Status {
                status: 403,
                code: "REQUEST_LIMIT_EXCEEDED".into(),
                message: "only the reserve of the daily API quota is left (held back by the sink)".into(),
            });
        }
        let permit = self.permits.clone().acquire_owned().await.expect("semaphore never closed");
        let mut session = self.session(None).await?;
        for attempt in 0..2 {
            let url = format!("{}/services/data/{}{}", session.instance_url, self.config.api_version, path);
            let mut request = self.http.request(method.clone(), &url).bearer_auth(&session.token);
            match body {
                Body::None => {}
                Body::Json(body) => request = request.json(body),
                Body::Csv(csv) => {
                    request = request.header(reqwest::header::CONTENT_TYPE, "text/csv").body(csv.to_owned());
                }
                Body::CsvStream(upload) => {
                    let stream = (upload.0)().map_err(|e| Error::Status {
                        status: 0,
                        code: "spool".into(),
                        message: format!("upload not readable: {e}"),
                    })?;
                    request = request.header(reqwest::header::CONTENT_TYPE, "text/csv").body(stream);
                }
            }
            metrics::API_CALLS.with_label_values(&[kind]).inc();
            let sent = Instant::now();
            let response = request.send().await?;
            self.read_limits(response.headers(), sent);
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED {
                let (code, message) = error_of(&response.text().await?);
                if attempt == 0 {
                    tracing::info!(error_code = %code, "salesforce session refused; re-authenticating once");
                    session = self.session(Some(session.generation)).await?;
                    continue;
                }
                return Err(Error::Auth { code, message });
            }
            if !status.is_success() {
                let (code, message) = error_of(&response.text().await?);
                return Err(Error::Status { status: status.as_u16(), code, message });
            }
            return Ok((permit, response));
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn read_limits(&self, headers: &reqwest::header::HeaderMap, sent: Instant) {
        let Some(info) = headers.get("sforce-limit-info").and_then(|v| v.to_str().ok()) else { return };
        if let Some((used, limit)) = parse_limit_info(info)
            && self.usage.record(UsageReading { used, limit, sent, received: Instant::now() })
        {
            metrics::QUOTA_USED.set(used as i64);
            metrics::QUOTA_REMAINING.set(limit.saturating_sub(used) as i64);
            self.quota.observe(used, limit);
        }
    }

    /// `GET /sobjects/{object}/describe`.
    pub async fn describe(&self, object: &str) -> Result<Value> {
        self.call("describe", Method::GET, &format!("/sobjects/{object}/describe"), None).await
    }

    /// Runs a SOQL query and returns every record (follows `nextRecordsUrl`).
    pub async fn query(&self, soql: &str) -> Result<Vec<Value>> {
        let encoded: String = soql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let mut page = self.call("query", Method::GET, &format!("/query?q={encoded}"), None).await?;
        let mut out = Vec::new();
        loop {
            out.extend(page["records"].as_array().cloned().unwrap_or_default());
            let Some(next) = page["nextRecordsUrl"].as_str() else { break };
            let prefix = format!("/services/data/{}", self.config.api_version);
            let path = next.strip_prefix(&prefix).unwrap_or(next).to_owned();
            page = self.call("query", Method::GET, &path, None).await?;
        }
        Ok(out)
    }
}

/// A request body.
#[derive(Clone, Copy, Debug)]
pub enum Body<'a> {
    None,
    Json(&'a Value),
    /// `text/csv` (a Bulk API 2.0 upload).
    Csv(&'a str),
    /// `text/csv` streamed from a spool, made anew for each try (a retry, a re-authentication).
    CsvStream(&'a Upload<'a>),
}

/// Makes a streamed request body (see [`Body::CsvStream`]).
pub struct Upload<'a>(pub &'a (dyn Fn() -> std::io::Result<reqwest::Body> + Send + Sync));

impl std::fmt::Debug for Upload<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upload")
    }
}

/// `api-usage=25/15000` (other entries, such as `api-bursts`, are ignored).
pub fn parse_limit_info(header: &str) -> Option<(u64, u64)> {
    header.split(',').find_map(|part| {
        let (name, value) = part.trim().split_once('=')?;
        if name != "api-usage" {
            return None;
        }
        let (used, limit) = value.split_once('/')?;
        Some((used.trim().parse().ok()?, limit.trim().parse().ok()?))
    })
}

/// Salesforce's `[{"errorCode","message"}]` body (or OAuth's `{"error"}`), as (code, message).
pub fn error_of(text: &str) -> (String, String) {
    let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let first = body.as_array().and_then(|a| a.first()).unwrap_or(&body);
    let code = first["errorCode"].as_str().or_else(|| first["error"].as_str()).unwrap_or("unknown").to_owned();
    let message = first["message"].as_str().or_else(|| first["error_description"].as_str()).unwrap_or_default();
    (code, message.chars().take(300).collect())
}

fn jwt_assertion(client_id: &str, username: &str, audience: &str, pem: &str) -> Result<String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let claims = serde_json::json!({"iss": client_id, "sub": username, "aud": audience, "exp": now + 180});
    let key = EncodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|e| Error::Auth { code: "invalid_private_key".into(), message: e.to_string() })?;
    encode(&Header::new(Algorithm::RS256), &claims, &key)
        .map_err(|e| Error::Auth { code: "jwt_signing".into(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    /// Two calls in flight at once, the later count's answer read first: the gauge keeps the
    /// later count (reading answers in arrival order left it at the earlier one); a call sent
    /// after that answer arrived replaces it even when lower (a rolling day).
    #[test]
    fn answers_read_out_of_order_never_set_the_usage_back() {
        let usage = super::Usage::default();
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let reading =
            |used, sent, received| super::UsageReading { used, limit: 100, sent: at(sent), received: at(received) };
        assert!(usage.record(reading(11, 0, 5)));
        assert!(!usage.record(reading(10, 1, 6)), "an overlapping call's lower count is the earlier one");
        assert_eq!(usage.current(), Some((11, 100)));
        assert!(usage.record(reading(12, 2, 7)), "an overlapping call's higher count is the later one");
        assert!(usage.record(reading(9, 8, 9)), "a call sent after the answer was counted after it");
        assert_eq!(usage.current(), Some((9, 100)));
    }

    use super::*;

    #[test]
    fn limit_info_reads_api_usage_only() {
        assert_eq!(parse_limit_info("api-usage=25/15000"), Some((25, 15000)));
        assert_eq!(parse_limit_info("api-bursts=1/100, api-usage=7/100"), Some((7, 100)));
        assert_eq!(parse_limit_info("api-bursts=1/100"), None);
    }

    #[test]
    fn error_bodies_of_rest_and_oauth() {
        let (code, _) = error_of(r#"[{"errorCode":"INVALID_SESSION_ID","message":"Session expired or invalid"}]"#);
        assert_eq!(code, "INVALID_SESSION_ID");
        let (code, message) = error_of(r#"{"error":"invalid_grant","error_description":"bad"}"#);
        assert_eq!((code.as_str(), message.as_str()), ("invalid_grant", "bad"));
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let flow = AuthFlow::ClientCredentials { client_id: "id".into(), client_secret: "s3cr3t".into() };
        assert!(!format!("{flow:?}").contains("s3cr3t"));
    }
}
