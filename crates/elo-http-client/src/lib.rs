//! Elo's outbound HTTP client: one shared client per downstream (Salesforce, RD Station,
//! Magento), with connect and request timeouts, a concurrency cap, a request-rate limit, and
//! retries only where retrying can help.
//!
//! # Retry rules
//! Retried, with exponential backoff and full jitter, up to `max_attempts`: connection and
//! timeout errors, 408, 429 and 5xx except 501. A `Retry-After` header (seconds) is honoured
//! as the minimum wait. Everything else (other 4xx, 501, 3xx) is returned at once: repeating a
//! refused request only burns the downstream's quota. Callers decide what is safe to retry by
//! calling [`HttpClient::send`] (idempotent requests: upserts, GETs) or
//! [`HttpClient::send_once`].
//!
//! # Why these libraries
//! - `reqwest` (fixed stack) with rustls, one `Client` per downstream so connections are pooled.
//! - `governor` for the rate limit: a well-kept GCRA implementation with an async wait.
//! - Retries are written here rather than with `reqwest-middleware`/`reqwest-retry`: the rules
//!   above need the status and `Retry-After` of each attempt, metrics per attempt, and the
//!   concurrency permit held across attempts; the middleware crates add a second client type
//!   and dependency tree for twenty lines of loop.
//!
//! # Layout
//! - [`HttpClientConfig`], [`HttpClient`]: configuration and the client.
//! - [`Error`]: failures with [`Error::is_retriable`] and [`Error::status`].

use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus::{HistogramVec, IntCounterVec, register_histogram_vec, register_int_counter_vec};
use reqwest::{RequestBuilder, Response, StatusCode};
use tokio::sync::Semaphore;

/// Failures of an outbound call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request never got an HTTP answer (connect, TLS, timeout, reset).
    #[error("{downstream}: transport error: {source}")]
    Transport { downstream: &'static str, source: reqwest::Error },
    /// The downstream answered with a non-success status. The body stays out of the message
    /// (vendors echo the request's fields, e-mails included, in their error bodies, and this
    /// message reaches logs); callers that need it read [`Error::body`].
    #[error("{downstream}: HTTP {status} ({len} bytes of body withheld)", len = body.len())]
    Status { downstream: &'static str, status: StatusCode, body: String, retry_after: Option<Duration> },
    /// The request could not be built (bad URL, body).
    #[error("{downstream}: invalid request: {message}")]
    Request { downstream: &'static str, message: String },
}

impl Error {
    /// Whether the same request may succeed later.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Transport { source, .. } => !source.is_builder() && !source.is_redirect(),
            Self::Status { status, .. } => retriable_status(*status),
            Self::Request { .. } => false,
        }
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The response body, when there was an answer (truncated to 4 KiB).
    pub fn body(&self) -> Option<&str> {
        match self {
            Self::Status { body, .. } => Some(body),
            _ => None,
        }
    }

    /// The wait the downstream asked for.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// 408, 429 and 5xx except 501 (not implemented will not become implemented by waiting).
pub fn retriable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
}

/// Settings of one downstream.
#[derive(Clone, Debug)]
pub struct HttpClientConfig {
    /// Downstream name for logs and metric labels (`salesforce`, `rdstation`, `magento`).
    pub downstream: &'static str,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Requests in flight at once.
    pub max_concurrency: usize,
    /// Requests started per second (bursts of up to one second's worth); `None` = unlimited.
    pub rate_per_second: Option<NonZeroU32>,
    /// Follow 3xx redirects (reqwest's default, up to 10). Off for a downstream whose requests
    /// are counted against a budget: each hop is another request the API counts, and a 3xx is
    /// then returned as [`Error::Status`] for the caller to classify.
    pub follow_redirects: bool,
}

impl HttpClientConfig {
    /// Defaults that suit a SaaS API: 5 s connect, 30 s request, 5 attempts, 8 in flight.
    pub fn new(downstream: &'static str) -> Self {
        Self {
            downstream,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            max_concurrency: 8,
            rate_per_second: None,
            follow_redirects: true,
        }
    }
}

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "elo_http_client_requests_total",
        "Outbound HTTP attempts by downstream and status class (2xx, 4xx, 5xx, transport).",
        &["downstream", "status_class"]
    )
    .expect("metric registers once")
});
static RETRIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("elo_http_client_retries_total", "Outbound HTTP retries by downstream.", &["downstream"])
        .expect("metric registers once")
});
static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "elo_http_client_request_duration_seconds",
        "Outbound HTTP attempt latency.",
        &["downstream"],
        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("metric registers once")
});

/// The shared client of one downstream (cheap to clone).
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    config: Arc<HttpClientConfig>,
    permits: Arc<Semaphore>,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
}

impl HttpClient {
    /// Builds the client.
    pub fn new(config: HttpClientConfig) -> Result<Self, Error> {
        let redirects = if config.follow_redirects {
            reqwest::redirect::Policy::default()
        } else {
            reqwest::redirect::Policy::none()
        };
        let client = reqwest::Client::builder()
            .redirect(redirects)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .user_agent(concat!("elo/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Request { downstream: config.downstream, message: e.to_string() })?;
        let limiter = config.rate_per_second.map(|rate| Arc::new(RateLimiter::direct(Quota::per_second(rate))));
        Ok(Self {
            client,
            permits: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            limiter,
            config: Arc::new(config),
        })
    }

    /// The underlying client, to build requests with.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends an idempotent request, retrying transient failures. `build` is called once per
    /// attempt. Non-2xx answers come back as [`Error::Status`] with the body.
    pub async fn send(&self, build: impl Fn(&reqwest::Client) -> RequestBuilder) -> Result<Response, Error> {
        self.send_with(build, self.config.max_attempts).await
    }

    /// Sends a request exactly once (not idempotent).
    pub async fn send_once(&self, build: impl Fn(&reqwest::Client) -> RequestBuilder) -> Result<Response, Error> {
        self.send_with(build, 1).await
    }

    async fn send_with(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
        attempts: u32,
    ) -> Result<Response, Error> {
        let downstream = self.config.downstream;
        let _permit = self.permits.acquire().await.expect("semaphore never closed");
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Some(limiter) = &self.limiter {
                limiter.until_ready().await;
            }
            let started = Instant::now();
            let result = build(&self.client).send().await;
            LATENCY.with_label_values(&[downstream]).observe(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(response) if response.status().is_success() => {
                    REQUESTS.with_label_values(&[downstream, "2xx"]).inc();
                    return Ok(response);
                }
                Ok(response) => {
                    let status = response.status();
                    REQUESTS.with_label_values(&[downstream, status_class(status)]).inc();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let mut body = response.text().await.unwrap_or_default();
                    truncate(&mut body, 4096);
                    Error::Status { downstream, status, body, retry_after }
                }
                Err(source) => {
                    REQUESTS.with_label_values(&[downstream, "transport"]).inc();
                    Error::Transport { downstream, source }
                }
            };
            if attempt >= attempts || !error.is_retriable() {
                return Err(error);
            }
            let wait = self.backoff(attempt).max(error.retry_after().unwrap_or_default());
            RETRIES.with_label_values(&[downstream]).inc();
            tracing::warn!(downstream, attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Exponential backoff with full jitter: uniform in [base/2, base].
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.config.initial_backoff.saturating_mul(1 << (attempt - 1).min(16)).min(self.config.max_backoff);
        base / 2 + (base / 2).mul_f64(rand::random::<f64>())
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use axum::Router;
    use axum::http::StatusCode as AxumStatus;
    use axum::routing::get;

    use super::*;

    /// A local server answering `statuses` in turn, then 200; returns its URL and a hit counter.
    async fn server(statuses: Vec<(u16, Option<&'static str>)>) -> (String, Arc<AtomicU32>) {
        let hits = Arc::new(AtomicU32::new(0));
        let counter = hits.clone();
        let app = Router::new().route(
            "/",
            get(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst) as usize;
                let answer = statuses.get(n).copied();
                async move {
                    match answer {
                        Some((code, retry_after)) => {
                            let mut headers = axum::http::HeaderMap::new();
                            if let Some(v) = retry_after {
                                headers.insert("retry-after", v.parse().unwrap());
                            }
                            (AxumStatus::from_u16(code).unwrap(), headers, format!("answer {n}"))
                        }
                        None => (AxumStatus::OK, axum::http::HeaderMap::new(), "ok".to_owned()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/"), hits)
    }

    fn fast(downstream: &'static str) -> HttpClientConfig {
        HttpClientConfig {
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            ..HttpClientConfig::new(downstream)
        }
    }

    #[tokio::test]
    async fn retries_429_and_5xx_then_succeeds() {
        let (url, hits) = server(vec![(429, None), (503, None)]).await;
        let client = HttpClient::new(fast("test")).unwrap();
        let response = client.send(|c| c.get(&url)).await.unwrap();
        assert_eq!(response.text().await.unwrap(), "ok");
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn never_retries_other_4xx_or_501() {
        for code in [400, 401, 403, 404, 409, 422, 501] {
            let (url, hits) = server(vec![(code, None)]).await;
            let err = HttpClient::new(fast("test")).unwrap().send(|c| c.get(&url)).await.unwrap_err();
            assert_eq!(err.status().map(|s| s.as_u16()), Some(code));
            assert_eq!(err.body(), Some("answer 0"));
            assert!(!err.to_string().contains("answer 0"), "the body must stay out of the message: {err}");
            assert!(!err.is_retriable());
            assert_eq!(hits.load(Ordering::SeqCst), 1, "HTTP {code} must not be retried");
        }
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let (url, hits) = server(vec![(500, None); 10]).await;
        let config = HttpClientConfig { max_attempts: 3, ..fast("test") };
        let err = HttpClient::new(config).unwrap().send(|c| c.get(&url)).await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn honours_retry_after() {
        let (url, hits) = server(vec![(429, Some("1"))]).await;
        let started = Instant::now();
        HttpClient::new(fast("test")).unwrap().send(|c| c.get(&url)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1), "waited {:?}", started.elapsed());
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn send_once_does_not_retry() {
        let (url, hits) = server(vec![(503, None)]).await;
        let err = HttpClient::new(fast("test")).unwrap().send_once(|c| c.get(&url)).await.unwrap_err();
        assert!(err.is_retriable());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connection_errors_are_retriable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = HttpClientConfig { max_attempts: 2, ..fast("test") };
        let err =
            HttpClient::new(config).unwrap().send(|c| c.get(format!("http://127.0.0.1:{port}/"))).await.unwrap_err();
        assert!(matches!(err, Error::Transport { .. }) && err.is_retriable(), "{err}");
    }

    #[tokio::test]
    async fn rate_limit_spaces_requests() {
        let (url, hits) = server(vec![]).await;
        let config = HttpClientConfig { rate_per_second: NonZeroU32::new(10), ..fast("test") };
        let client = HttpClient::new(config).unwrap();
        let started = Instant::now();
        for _ in 0..13 {
            client.send(|c| c.get(&url)).await.unwrap();
        }
        // A burst of one second's worth (10), then one every 100 ms.
        assert!(started.elapsed() >= Duration::from_millis(280), "{:?}", started.elapsed());
        assert_eq!(hits.load(Ordering::SeqCst), 13);
    }
}
