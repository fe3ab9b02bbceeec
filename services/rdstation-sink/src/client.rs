//! The RD Station Marketing API client: one shared HTTP client, OAuth with refresh on an
//! expired token, a per-account budget for contact requests, and RD's error bodies turned into
//! the runtime's error classes.
//!
//! Every call is sent once ([`HttpClient::send_once`]): the consumer runtime owns retries
//! (classified, with backoff, honouring `Retry-After`), and a retry inside the client would
//! spend contact budget behind the limiter's back. The budget ([`crate::budget`]) counts
//! contact requests as RD sees them, in a rolling window; a 429 pauses it for every request.

use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::time::Duration;

use elo_http_client::{HttpClient, HttpClientConfig};
use elo_kafka::{ErrorClass, HandlerError};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::{Mutex, RwLock, Semaphore};

use crate::budget::{AccountBudget, Slot};
use crate::metrics;

/// The window of the per-account budget (RD counts contact requests per minute).
const BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// How long the account waits after a 429 that named no `Retry-After` (at most one window).
pub const RETRY_AFTER_UNSAID: Duration = Duration::from_secs(60);

/// Failures of an RD Station call, by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Credentials refused (after one refresh): wait and alert, never drop.
    #[error("rd station refused our credentials ({code})")]
    Auth { code: String },
    /// 429: wait for the window.
    #[error("rd station rate limit reached")]
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, timeouts, transport errors.
    #[error("rd station unavailable: {0}")]
    Transient(String),
    /// RD refused the request itself (4xx with a reason).
    #[error("rd station refused the request: HTTP {status} {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    /// Local setup (unreadable secret files).
    #[error("rd station client setup: {0}")]
    Setup(String),
    /// A client that does not wait ([`RdClient::without_waiting`]) found the contact budget
    /// spent: nothing was sent; the caller defers the work.
    #[error("the contact budget is spent for now")]
    BudgetSpent,
}

impl Error {
    /// RD's `error_type`, or a bounded local code.
    pub fn code(&self) -> &str {
        match self {
            Self::Auth { code } | Self::Refused { code, .. } => code,
            Self::RateLimited { .. } => "RATE_LIMIT_EXCEDDED",
            Self::BudgetSpent => "budget_spent",
            Self::Transient(_) => "unavailable",
            Self::Setup(_) => "setup",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Auth { .. } | Self::Setup(_) => ErrorClass::Auth,
            Self::RateLimited { .. } | Self::BudgetSpent => ErrorClass::RateLimited,
            Self::Transient(_) => ErrorClass::Transient,
            Self::Refused { .. } => ErrorClass::Permanent,
        }
    }

    /// The runtime's verdict for the record this call served.
    pub fn to_handler_error(&self) -> HandlerError {
        let error = HandlerError::new(self.class(), self.code(), self.to_string());
        match self {
            Self::RateLimited { retry_after: Some(after) } => error.with_retry_after(*after),
            _ => error,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The most access tokens one request refreshes before its 401 is an `auth` failure.
pub const TOKENS_PER_REQUEST: u32 = 4;

/// Requests of non-waiting clients ([`RdClient::without_waiting`]) that may queue for the
/// budget.
const QUEUE_WITHOUT_WAITING: u32 = 2;

/// A place in the budget queue, given back when dropped (also when the wait is cancelled).
struct Queued<'a> {
    count: &'a AtomicU32,
    ahead: u32,
}

impl<'a> Queued<'a> {
    fn join(count: &'a AtomicU32) -> Self {
        Self { count, ahead: count.fetch_add(1, AtomicOrdering::AcqRel) }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, AtomicOrdering::AcqRel);
    }
}

/// What a request counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// The per-account contact budget (contacts, tags, funnels, fields).
    Contacts,
    /// Not limited by the sink (events, auth).
    None,
}

/// Client settings.
#[derive(Clone)]
pub struct RdSettings {
    pub base_url: String,
    pub client_id: String,
    pub client_secret: String,
    /// `None` only against the local sandbox (see `sandbox_control`).
    pub refresh_token: Option<String>,
    /// Local development only: the sandbox control API that hands out authorization codes,
    /// used when no refresh token is configured (the code grant then yields one).
    pub sandbox_control: Option<String>,
    /// Contact requests per minute the sink allows itself.
    pub contacts_per_minute: NonZeroU32,
    pub request_timeout: Duration,
}

impl fmt::Debug for RdSettings {
    /// Secrets never reach a log line, even through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdSettings")
            .field("base_url", &self.base_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .field("refresh_token", &"***")
            .field("sandbox_control", &self.sandbox_control)
            .field("contacts_per_minute", &self.contacts_per_minute)
            .finish()
    }
}

impl RdSettings {
    /// Reads a secret file (trailing newline trimmed).
    pub fn read_secret(path: &Path) -> Result<String> {
        std::fs::read_to_string(path)
            .map(|s| s.trim_end().to_owned())
            .map_err(|e| Error::Setup(format!("cannot read {}: {e}", path.display())))
    }
}

/// The shared RD Station client (cheap to clone).
#[derive(Clone)]
pub struct RdClient {
    inner: Arc<Inner>,
    /// How a contact request takes the budget.
    mode: Mode,
    /// Slots taken by [`RdClient::reserve`] and not used yet; shared by clones, fresh for
    /// each [`RdClient::reserving`] client (so one contact's reservation is its own).
    credits: Arc<std::sync::Mutex<Vec<Slot>>>,
    /// Contact writes (budgeted, not `GET`) this client sent, answered or not: RD may have
    /// applied any of them, so the per-contact budget counts them all. Fresh for each
    /// non-waiting or reserving client (one per contact sync).
    writes_sent: Arc<AtomicU32>,
}

/// How a contact request takes the account budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Waits for a slot.
    Wait,
    /// Takes a free slot, or queues behind at most this many others, else
    /// [`Error::BudgetSpent`].
    Queue(u32),
    /// Uses its reserved slots first, then only a slot free at this instant, never waiting
    /// (the sweep, which holds a partition's lock while it writes).
    Reserved,
}

struct Inner {
    http: HttpClient,
    settings: RdSettings,
    access_token: RwLock<Option<String>>,
    refresh_token: RwLock<Option<String>>,
    refreshing: Mutex<()>,
    budget: Arc<AccountBudget>,
    /// RD requests in flight. Taken before the budget slot, so a slot is never held while a
    /// request queues for the connection (the HTTP client's own cap is set above this one
    /// and never makes a request wait once it holds its slot).
    permits: Semaphore,
    /// Requests of non-waiting clients queued for the budget.
    queued: AtomicU32,
}

impl RdClient {
    /// A client with the shared HTTP client's default cap on requests in flight (8).
    pub fn new(settings: RdSettings) -> Result<Self> {
        Self::with_concurrency(settings, HttpClientConfig::new("rdstation").max_concurrency)
    }

    /// A client allowing `max_concurrency` requests in flight. The sink needs one per customer
    /// it works at once: with the default cap of 8 and RD answering in 100 ms, at most 80
    /// events/s could go out, whatever the customer concurrency (the bench's bottleneck).
    pub fn with_concurrency(settings: RdSettings, max_concurrency: usize) -> Result<Self> {
        let mut config = HttpClientConfig::new("rdstation");
        // Room above our own permits for the token refreshes (sent without one).
        config.max_concurrency = max_concurrency.max(1) + 4;
        config.request_timeout = settings.request_timeout;
        config.max_attempts = 1;
        let http = HttpClient::new(config).map_err(|e| Error::Setup(e.to_string()))?;
        let budget = AccountBudget::new(settings.contacts_per_minute.get() as usize, BUDGET_WINDOW);
        metrics::BUDGET_LIMIT.set(i64::from(settings.contacts_per_minute.get()));
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                access_token: RwLock::new(None),
                refresh_token: RwLock::new(settings.refresh_token.clone()),
                settings,
                refreshing: Mutex::new(()),
                budget,
                permits: Semaphore::new(max_concurrency.max(1)),
                queued: AtomicU32::new(0),
            }),
            mode: Mode::Wait,
            credits: Arc::default(),
            writes_sent: Arc::default(),
        })
    }

    fn with_mode(&self, mode: Mode) -> Self {
        Self { inner: self.inner.clone(), mode, credits: Arc::default(), writes_sent: Arc::default() }
    }

    /// The same client, but a contact request finding the budget spent (and already
    /// [`QUEUE_WITHOUT_WAITING`] requests waiting for it) fails at once with
    /// [`Error::BudgetSpent`]: the consumer's batches use it, so e-commerce events never queue
    /// behind contact writes (those are deferred and coalesced).
    pub fn without_waiting(&self) -> Self {
        self.with_mode(Mode::Queue(QUEUE_WITHOUT_WAITING))
    }

    /// A client whose contact requests only take the budget when it has room at this instant
    /// (no queueing): batches use it while the sweep works through a backlog.
    pub fn only_if_free(&self) -> Self {
        self.with_mode(Mode::Queue(0))
    }

    /// A client with a reservation of its own (empty): the sweep reserves one contact's
    /// requests on it (waiting) before it takes the partition's lock; under the lock it
    /// spends them, then only slots free at that instant: it never waits for the budget while
    /// it holds the lock (a contact needing more than it reserved, because a batch changed it
    /// meanwhile, stays deferred for the next pass). Slots it does not use are freed with it.
    pub fn reserving(&self) -> Self {
        self.with_mode(Mode::Reserved)
    }

    /// Waits until the budget has room and takes one request's worth for a later contact
    /// request of this client, so a background sweep can wait before it takes a lock.
    pub async fn reserve(&self) {
        let slot = self.inner.budget.acquire().await;
        self.credits.lock().expect("credits lock").push(slot);
    }

    /// Counts the account's budget as spent for `hold` from now (start-up: a previous process
    /// may have spent it; see [`AccountBudget::assume_spent_until`]). Zero: no hold.
    pub fn hold_budget(&self, hold: Duration) {
        if !hold.is_zero() {
            self.inner.budget.assume_spent_until(tokio::time::Instant::now() + hold);
        }
    }

    /// Contact requests the account allows in a window.
    pub fn budget_limit(&self) -> u32 {
        self.inner.settings.contacts_per_minute.get()
    }

    /// Contact writes this client sent (answered or not).
    pub fn writes_sent(&self) -> u32 {
        self.writes_sent.load(AtomicOrdering::Acquire)
    }

    /// Takes the budget for one contact request (waiting, or not, as this client does).
    async fn spend_budget(&self) -> Result<Slot> {
        let slot = match self.mode {
            Mode::Wait => self.inner.budget.acquire().await,
            Mode::Reserved => {
                // A slot reserved before a 429 must not go out into the pause (RD would
                // answer 429 again): the contact stays deferred and the reservation is freed.
                if self.inner.budget.paused() {
                    self.credits.lock().expect("credits lock").clear();
                    return Err(Error::BudgetSpent);
                }
                match self.credits.lock().expect("credits lock").pop() {
                    Some(slot) => slot,
                    None => self.inner.budget.try_acquire().ok_or(Error::BudgetSpent)?,
                }
            }
            Mode::Queue(queue) => match self.inner.budget.try_acquire() {
                Some(slot) => slot,
                // A 429 pause lasts up to a minute: not a short queue.
                None if self.inner.budget.paused() => return Err(Error::BudgetSpent),
                None => {
                    // A short queue may wait (a sync's next request, a light load); beyond it
                    // the budget is spent for now.
                    let place = Queued::join(&self.inner.queued);
                    if place.ahead >= queue {
                        return Err(Error::BudgetSpent);
                    }
                    self.inner.budget.acquire().await
                }
            },
        };
        metrics::BUDGET_USED.inc();
        Ok(slot)
    }

    /// Sends one request; on a 401 refreshes the access token (unless another task already
    /// did) and sends it again, with at most [`TOKENS_PER_REQUEST`] tokens.
    /// Returns the JSON body (`Null` when empty).
    ///
    /// Order: a request permit, a token (a refresh happens here, before the budget), the
    /// budget slot, then the request at once: the slot is held only around the request itself.
    pub async fn request(&self, method: Method, path: &str, body: Option<&Value>, budget: Budget) -> Result<Value> {
        let mut tokens_tried = 0;
        loop {
            let _permit = self.inner.permits.acquire().await.expect("permits never closed");
            let mut token = self.access_token().await?;
            let mut slot = match budget {
                Budget::Contacts => Some(self.spend_budget().await?),
                Budget::None => {
                    self.inner.budget.unpaused().await;
                    None
                }
            };
            // A wait for the budget may have outlived the token: another task's refresh
            // replaced it meanwhile (a read, no refresh while holding the slot).
            if let Some(current) = self.inner.access_token.read().await.clone() {
                token = current;
            }
            if let Some(slot) = slot.as_mut() {
                slot.sent();
                if method != Method::GET {
                    self.writes_sent.fetch_add(1, AtomicOrdering::AcqRel);
                }
            }
            let url = format!("{}{}", self.inner.settings.base_url.trim_end_matches('/'), path);
            let result = self
                .inner
                .http
                .send_once(|c| {
                    let request = c.request(method.clone(), &url).bearer_auth(&token);
                    match body {
                        Some(body) => request.json(body),
                        None => request,
                    }
                })
                .await;
            match result {
                Ok(response) => {
                    let bytes = response.bytes().await.map_err(|e| Error::Transient(e.to_string()))?;
                    drop(slot);
                    return Ok(if bytes.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                    });
                }
                Err(error) => {
                    drop(slot);
                    let error = classify(&error);
                    // RD answers 401 for expired and for invalid tokens (some integrations only
                    // check one of `expired_token`/`invalid_token`): refresh either way. Not
                    // just once per request: when another task refreshed first, the token it
                    // got may have expired too before this request used it. Bad credentials
                    // still end here: the refresh itself is refused.
                    if matches!(&error, Error::Auth { code } if code == "UNAUTHORIZED")
                        && tokens_tried < TOKENS_PER_REQUEST
                    {
                        drop(_permit);
                        // Only tokens this request had refreshed count: one another task
                        // replaced meanwhile says nothing about our credentials.
                        if self.refresh(&token).await? {
                            tokens_tried += 1;
                        }
                        continue;
                    }
                    if let Error::RateLimited { retry_after } = &error {
                        metrics::RATE_LIMITED.inc();
                        // The whole account waits, not only this call.
                        self.inner.budget.pause(retry_after.unwrap_or(RETRY_AFTER_UNSAID));
                    }
                    return Err(error);
                }
            }
        }
    }

    async fn access_token(&self) -> Result<String> {
        if let Some(token) = self.inner.access_token.read().await.clone() {
            return Ok(token);
        }
        self.refresh("").await?;
        self.inner.access_token.read().await.clone().ok_or_else(|| Error::Auth { code: "no_token".into() })
    }

    /// Exchanges the refresh token for a new access token, unless another task already
    /// replaced `stale` meanwhile. Returns whether this call refreshed.
    async fn refresh(&self, stale: &str) -> Result<bool> {
        let _guard = self.inner.refreshing.lock().await;
        if let Some(current) = self.inner.access_token.read().await.as_deref()
            && current != stale
        {
            return Ok(false);
        }
        let s = &self.inner.settings;
        let url = format!("{}/auth/token", s.base_url.trim_end_matches('/'));
        let refresh_token = self.inner.refresh_token.read().await.clone();
        let body = match (refresh_token, &s.sandbox_control) {
            (Some(refresh), _) => {
                json!({"client_id": s.client_id, "client_secret": s.client_secret, "refresh_token": refresh})
            }
            (None, Some(control)) => {
                let code = self.sandbox_code(control).await?;
                json!({"client_id": s.client_id, "client_secret": s.client_secret, "code": code})
            }
            (None, None) => return Err(Error::Auth { code: "no_refresh_token".into() }),
        };
        let response =
            self.inner.http.send_once(|c| c.post(&url).json(&body)).await.map_err(|e| match classify(&e) {
                Error::Refused { code, .. } => Error::Auth { code },
                other => other,
            })?;
        let value: Value = response.json().await.map_err(|e| Error::Transient(e.to_string()))?;
        let Some(token) = value.get("access_token").and_then(Value::as_str) else {
            return Err(Error::Auth { code: "no_access_token".into() });
        };
        *self.inner.access_token.write().await = Some(token.to_owned());
        if let Some(refresh) = value.get("refresh_token").and_then(Value::as_str) {
            *self.inner.refresh_token.write().await = Some(refresh.to_owned());
        }
        metrics::TOKEN_REFRESHES.inc();
        let expires_in = value.get("expires_in").and_then(Value::as_i64);
        tracing::info!(expires_in, "rd station access token refreshed");
        Ok(true)
    }
}

impl RdClient {
    /// An authorization code from the sandbox's control API (what RD's `/auth/dialog` would
    /// redirect with after a user's consent).
    async fn sandbox_code(&self, control: &str) -> Result<String> {
        let url = format!("{}/rdstation/auth-code", control.trim_end_matches('/'));
        let response = self.inner.http.send_once(|c| c.post(&url)).await.map_err(|e| classify(&e))?;
        let value: Value = response.json().await.map_err(|e| Error::Transient(e.to_string()))?;
        value
            .get("code")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Auth { code: "no_code".into() })
    }
}

/// RD's `error_type` from any of its three body shapes: flat `{"errors":{"error_type"}}`,
/// array `{"errors":[{"error_type"}]}`, per-field `{"errors":{"field":[{"error_type"}]}}`.
pub fn error_type(body: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(body).ok()?;
    let errors = value.get("errors")?;
    let first = match errors {
        Value::Array(items) => items.first()?.clone(),
        Value::Object(map) if map.contains_key("error_type") => errors.clone(),
        Value::Object(map) => map.values().find_map(|v| v.as_array().and_then(|a| a.first()).cloned())?,
        _ => return None,
    };
    let kind = first.get("error_type")?.as_str()?.to_owned();
    let message = first.get("error_message").and_then(Value::as_str).unwrap_or_default().to_owned();
    Some((kind, message))
}

fn classify(error: &elo_http_client::Error) -> Error {
    let Some(status) = error.status() else { return Error::Transient(error.to_string()) };
    let (code, message) = error_type(error.body().unwrap_or_default())
        .unwrap_or_else(|| (format!("http_{}", status.as_u16()), String::new()));
    match status.as_u16() {
        401 | 403 => Error::Auth { code },
        429 => Error::RateLimited { retry_after: error.retry_after() },
        408 => Error::Transient("request timeout".into()),
        s if s >= 500 => Error::Transient(format!("HTTP {s}")),
        s => Error::Refused { status: s, code, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_three_error_shapes() {
        let flat = r#"{"errors":{"error_type":"EMAIL_ALREADY_IN_USE","error_message":"Email already in use."}}"#;
        assert_eq!(error_type(flat).unwrap().0, "EMAIL_ALREADY_IN_USE");
        let array = r#"{"errors":[{"error_type":"CANNOT_BE_NULL","error_message":"Cannot be null.","path":"body.x"}]}"#;
        assert_eq!(error_type(array).unwrap().0, "CANNOT_BE_NULL");
        let field =
            r#"{"errors":{"tags":[{"error_type":"VALUES_MUST_BE_UNIQUE","error_message":"Values must be unique."}]}}"#;
        assert_eq!(error_type(field).unwrap().0, "VALUES_MUST_BE_UNIQUE");
        assert!(error_type("not json").is_none());
    }

    fn test_settings() -> RdSettings {
        RdSettings {
            base_url: "http://127.0.0.1:9".into(),
            client_id: "id".into(),
            client_secret: "secret".into(),
            refresh_token: Some("refresh".into()),
            sandbox_control: None,
            contacts_per_minute: NonZeroU32::new(10).unwrap(),
            request_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reserved_slot_is_not_spent_into_a_429_pause() {
        let client = RdClient::new(test_settings()).unwrap().reserving();
        // The sweep reserved the contact's request before RD's 429 paused the account.
        client.reserve().await;
        client.inner.budget.pause(Duration::from_secs(30));
        assert!(matches!(client.spend_budget().await, Err(Error::BudgetSpent)), "sent into the pause");
        // The reservation is freed, not kept: the whole budget is there once the pause ends.
        assert!(client.credits.lock().unwrap().is_empty());
        tokio::time::advance(Duration::from_secs(31)).await;
        let slots: Vec<_> = (0..10).map_while(|_| client.inner.budget.try_acquire()).collect();
        assert_eq!(slots.len(), 10);
    }

    #[test]
    fn settings_debug_hides_secrets() {
        let settings = RdSettings {
            client_secret: "very-secret".into(),
            refresh_token: Some("refresh-secret".into()),
            ..test_settings()
        };
        let text = format!("{settings:?}");
        assert!(!text.contains("very-secret") && !text.contains("refresh-secret"), "{text}");
    }
}
