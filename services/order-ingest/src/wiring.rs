//! Production implementations of the push path's seams: Kafka as the publisher, Magento's
//! REST API as the source of full orders.

use std::sync::Arc;
use std::time::Duration;

use elo_events::{CommerceEvent, EventCodec};
use elo_http_client::{HttpClient, HttpClientConfig};
use elo_kafka::Producer;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::enrich::InventoryPublisher;
use crate::push::{PublishError, Publisher};
use crate::source::{MagentoApi, SourceError};

/// Publishes to `commerce.events` (keyed by customer) and `inventory.events` (keyed by SKU),
/// and waits for the acknowledgement (bounded, so a dead broker becomes a 503 rather than a
/// hung webhook).
pub struct KafkaPublisher {
    pub producer: Producer,
    pub codec: Arc<EventCodec>,
    pub topic: String,
    pub inventory_topic: String,
    /// Where source records that cannot become events are parked.
    pub dlq_topic: String,
    pub timeout: Duration,
}

impl KafkaPublisher {
    async fn send<T: elo_events::AvroEvent>(
        &self,
        topic: &str,
        key: &str,
        event: &T,
        event_type: &str,
    ) -> Result<(), PublishError> {
        let payload = self.codec.encode(topic, event).await.map_err(|e| PublishError::from_codec(&e))?;
        let send = self.producer.send(topic, key.as_bytes(), &payload, Some(event_type));
        self.acknowledged(send).await
    }
}

impl KafkaPublisher {
    /// Waits (bounded) for a send's acknowledgement and classifies its failure.
    async fn acknowledged(
        &self,
        send: impl Future<Output = elo_kafka::Result<elo_kafka::Delivery>>,
    ) -> Result<(), PublishError> {
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PublishError::from_kafka(&e)),
            Err(_) => Err(PublishError::Unavailable(format!("no acknowledgement within {:?}", self.timeout))),
        }
    }
}

impl Publisher for KafkaPublisher {
    async fn publish(&self, event: &CommerceEvent) -> Result<(), PublishError> {
        self.send(&self.topic, &event.customer_key, event, event.event_type.as_str()).await
    }

    async fn dead_letter(&self, letter: &crate::push::DeadLetter) -> Result<(), PublishError> {
        use elo_kafka::dlq;
        let now = crate::now_ms().to_string();
        // The caller's trace, as on every record: an operator follows a dead letter to its cause.
        let headers = elo_kafka::headers::traced([
            (dlq::ERROR_CLASS, b"permanent".as_slice()),
            (dlq::ERROR_CODE, letter.code.as_bytes()),
            (dlq::ERROR_MESSAGE, dlq::truncate_message(&letter.message).as_bytes()),
            (dlq::ORIGIN_SOURCE, letter.source.as_bytes()),
            (dlq::ATTEMPTS, b"1".as_slice()),
            (dlq::FIRST_FAILURE_MS, now.as_bytes()),
        ]);
        let send = self.producer.send_with_headers(
            &self.dlq_topic,
            Some(letter.entity_id.as_bytes()),
            Some(&letter.payload),
            headers,
        );
        self.acknowledged(send).await
    }
}

impl InventoryPublisher for KafkaPublisher {
    async fn publish_inventory(&self, event: &elo_events::InventoryEvent) -> Result<(), PublishError> {
        self.send(&self.inventory_topic, &event.sku, event, event.event_type.as_str()).await
    }
}

/// Reads full orders from Magento with an admin token (fetched on first use, renewed once on
/// a 401).
pub struct MagentoSource {
    client: HttpClient,
    base_url: String,
    auth: MagentoAuth,
    token: Mutex<Option<String>>,
}

/// How order-ingest proves itself to Magento.
#[derive(Clone)]
pub enum MagentoAuth {
    /// An admin user: a token from `POST /V1/integration/admin/token`, renewed once on a 401
    /// (admin logins usually require 2FA on 2.4: prefer an integration).
    Admin { username: String, password: String },
    /// An integration's access token as Bearer (Magento's `enable_integration_as_bearer`).
    Bearer(String),
    /// An integration signing every request with OAuth 1.0a, as Magento expects by default.
    OAuth1(crate::oauth::Credentials),
}

impl std::fmt::Debug for MagentoAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log line.
        match self {
            Self::Admin { username, .. } => f.debug_struct("Admin").field("username", username).finish_non_exhaustive(),
            Self::Bearer(_) => f.write_str("Bearer(..)"),
            Self::OAuth1(credentials) => f.debug_tuple("OAuth1").field(credentials).finish(),
        }
    }
}

impl MagentoSource {
    /// `downstream` names this client's pool (`magento-push`, `magento-poll`...): each has its
    /// own connections and concurrency cap.
    pub fn new(downstream: &'static str, base_url: String, auth: MagentoAuth) -> Result<Self, elo_http_client::Error> {
        Self::with_concurrency(downstream, base_url, auth, 8)
    }

    /// With at most `max_in_flight` requests at once on this client's pool. Every CloudEvents
    /// webhook costs a refetch, so the push path's rate is bounded by this over Magento's
    /// latency (8 at 20 ms: 400 webhooks/s); too high a value overloads a small Magento.
    pub fn with_concurrency(
        downstream: &'static str,
        base_url: String,
        auth: MagentoAuth,
        max_in_flight: usize,
    ) -> Result<Self, elo_http_client::Error> {
        let client = HttpClient::new(HttpClientConfig {
            max_attempts: 3,
            max_concurrency: max_in_flight.max(1),
            ..HttpClientConfig::new(downstream)
        })?;
        // Exported from the start, zeros included, so dashboards and alerts see the series.
        std::sync::LazyLock::force(&metrics::MAGENTO_ERRORS);
        Ok(Self { client, base_url: base_url.trim_end_matches('/').to_owned(), auth, token: Mutex::new(None) })
    }

    async fn token(&self, username: &str, password: &str, renew: bool) -> Result<String, SourceError> {
        let mut token = self.token.lock().await;
        if renew || token.is_none() {
            let url = format!("{}/rest/V1/integration/admin/token", self.base_url);
            let body = json!({"username": username, "password": password});
            let response = self.client.send(|c| c.post(&url).json(&body)).await.map_err(classify)?;
            let value: Value =
                response.json().await.map_err(|e| SourceError::Refused(format!("unreadable token answer: {e}")))?;
            let text =
                value.as_str().ok_or_else(|| SourceError::Refused("the admin token is not a JSON string".into()))?;
            *token = Some(text.to_owned());
        }
        Ok(token.clone().expect("set above"))
    }

    /// GET of something that must exist; failures (a 404 included) are counted by class.
    async fn get_json(&self, url: &str) -> Result<Value, SourceError> {
        self.get_optional(url).await?.ok_or_else(|| {
            metrics::MAGENTO_ERRORS.with_label_values(&[SourceError::NotFound.class()]).inc();
            SourceError::NotFound
        })
    }

    /// GET where a 404 is an answer (`None`), not an API error; other failures are counted.
    async fn get_optional(&self, url: &str) -> Result<Option<Value>, SourceError> {
        match self.get_json_once(url).await {
            Ok(value) => Ok(Some(value)),
            Err(SourceError::NotFound) => Ok(None),
            Err(error) => {
                metrics::MAGENTO_ERRORS.with_label_values(&[error.class()]).inc();
                Err(error)
            }
        }
    }

    /// GET, authenticated as configured.
    async fn get_json_once(&self, url: &str) -> Result<Value, SourceError> {
        let response = match &self.auth {
            MagentoAuth::Admin { username, password } => {
                let mut answer = None;
                for renew in [false, true] {
                    let token = self.token(username, password, renew).await?;
                    match self.client.send(|c| c.get(url).bearer_auth(&token)).await {
                        Err(e) if e.status().map(|s| s.as_u16()) == Some(401) && !renew => continue,
                        result => {
                            answer = Some(result.map_err(classify)?);
                            break;
                        }
                    }
                }
                answer.ok_or_else(|| SourceError::Refused("Magento refused the renewed token".into()))?
            }
            MagentoAuth::Bearer(token) => {
                self.client.send(|c| c.get(url).bearer_auth(token)).await.map_err(classify)?
            }
            MagentoAuth::OAuth1(credentials) => self
                .client
                .send(|c| {
                    // Signed per attempt: each retry needs a fresh nonce.
                    let now = crate::now_ms() / 1000;
                    let header = crate::oauth::authorization(credentials, "GET", url, &crate::oauth::nonce(), now);
                    c.get(url).header(axum::http::header::AUTHORIZATION, header)
                })
                .await
                .map_err(classify)?,
        };
        let body = response.bytes().await.map_err(|e| SourceError::Unavailable(format!("answer cut short: {e}")))?;
        // Money keeps its decimal text (never an f64 on the way).
        crate::json::parse_lossless(&body).map_err(|e| SourceError::Refused(format!("unreadable answer: {e}")))
    }
}

/// 404 is final, anything retriable (transport, 5xx, 429) is an outage, the rest a refusal.
/// Magento's error bodies can echo what was asked (a customer's e-mail, an address): they are
/// logged at debug only and never travel in the error, which reaches warn-level logs.
fn classify(error: elo_http_client::Error) -> SourceError {
    if let Some(body) = error.body() {
        tracing::debug!(body, "magento error body");
    }
    let what = match error.status() {
        Some(status) => format!("magento: HTTP {}", status.as_u16()),
        None => error.to_string(), // transport errors carry no body
    };
    match error.status().map(|s| s.as_u16()) {
        Some(404) => SourceError::NotFound,
        _ if error.is_retriable() => SourceError::Unavailable(what),
        _ => SourceError::Refused(what),
    }
}

impl MagentoApi for MagentoSource {
    async fn order(&self, entity_id: i64) -> Result<Value, SourceError> {
        self.get_json(&format!("{}/rest/V1/orders/{entity_id}", self.base_url)).await
    }

    async fn customer(&self, customer_id: i64) -> Result<Value, SourceError> {
        self.get_json(&format!("{}/rest/V1/customers/{customer_id}", self.base_url)).await
    }

    async fn salable_qty(&self, sku: &str, stock_id: i32) -> Result<Option<elo_events::Decimal4>, SourceError> {
        let url =
            format!("{}/rest/V1/inventory/get-product-salable-quantity/{}/{stock_id}", self.base_url, urlencode(sku));
        // An unknown SKU is not stock-managed: an answer, not an error.
        match self.get_optional(&url).await? {
            // Integers stay numbers, fractions arrive as their text (see `crate::json`).
            Some(value @ (Value::Number(_) | Value::String(_))) => {
                let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
                elo_events::Decimal4::parse(&text)
                    .map(Some)
                    .map_err(|e| SourceError::Refused(format!("salable quantity {text}: {e}")))
            }
            Some(other) => Err(SourceError::Refused(format!("salable quantity is not a number: {other}"))),
            None => Ok(None),
        }
    }
}

impl crate::poll::EntitySearch for MagentoSource {
    async fn page_after(
        &self,
        entity: crate::poll::Entity,
        store_id: i64,
        after: crate::poll::Keyset,
        page_size: usize,
    ) -> Result<(Vec<Value>, usize), String> {
        let url =
            format!("{}/rest/V1/{}?{}", self.base_url, search_path(entity), keyset_query(store_id, after, page_size));
        let body = self.get_json(&url).await.map_err(|e| e.to_string())?;
        let items = body.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
        let total =
            body.get("total_count").and_then(Value::as_u64).ok_or("search result without total_count")? as usize;
        Ok((items, total))
    }
}

fn search_path(entity: crate::poll::Entity) -> &'static str {
    match entity {
        crate::poll::Entity::Orders => "orders",
        crate::poll::Entity::Customers => "customers/search",
    }
}

/// searchCriteria for "strictly after (T, X) in (updated_at, entity_id) order": filter groups
/// are ANDed and filters inside a group ORed, so `updated_at >= T` AND (`updated_at > T` OR
/// `entity_id > X`), sorted by both, always page 1 (the position does the paging). Customers
/// are filtered and sorted by `entity_id` too (their collection's column; items say `id`).
pub(crate) fn keyset_query(store_id: i64, after: crate::poll::Keyset, page_size: usize) -> String {
    let at = crate::normalize::format_magento_time(after.updated_at_ms.max(0));
    let g = "searchCriteria[filter_groups]";
    let query = [
        (format!("{g}[0][filters][0][field]"), "updated_at".to_owned()),
        (format!("{g}[0][filters][0][value]"), at.clone()),
        (format!("{g}[0][filters][0][condition_type]"), "gteq".to_owned()),
        (format!("{g}[1][filters][0][field]"), "updated_at".to_owned()),
        (format!("{g}[1][filters][0][value]"), at),
        (format!("{g}[1][filters][0][condition_type]"), "gt".to_owned()),
        (format!("{g}[1][filters][1][field]"), "entity_id".to_owned()),
        (format!("{g}[1][filters][1][value]"), after.id.to_string()),
        (format!("{g}[1][filters][1][condition_type]"), "gt".to_owned()),
        (format!("{g}[2][filters][0][field]"), "store_id".to_owned()),
        (format!("{g}[2][filters][0][value]"), store_id.to_string()),
        (format!("{g}[2][filters][0][condition_type]"), "eq".to_owned()),
        ("searchCriteria[sortOrders][0][field]".to_owned(), "updated_at".to_owned()),
        ("searchCriteria[sortOrders][0][direction]".to_owned(), "ASC".to_owned()),
        ("searchCriteria[sortOrders][1][field]".to_owned(), "entity_id".to_owned()),
        ("searchCriteria[sortOrders][1][direction]".to_owned(), "ASC".to_owned()),
        ("searchCriteria[pageSize]".to_owned(), page_size.to_string()),
        ("searchCriteria[currentPage]".to_owned(), "1".to_owned()),
    ];
    query.iter().map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v))).collect::<Vec<_>>().join("&")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::poll::EntitySearch;

    /// A Magento whose order search takes 3 s and whose single-order read is instant.
    async fn slow_search_magento() -> String {
        let app = axum::Router::new()
            .route("/rest/V1/integration/admin/token", axum::routing::post(|| async { axum::Json(json!("token")) }))
            .route(
                "/rest/V1/orders",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    axum::Json(json!({"items": [], "total_count": 0}))
                }),
            )
            .route("/rest/V1/orders/{id}", axum::routing::get(|| async { axum::Json(json!({"entity_id": 1})) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// How long a webhook's refetch (through `push`) waits while `poll` has 8 slow searches out.
    async fn refetch_during_a_slow_poll(push: Arc<MagentoSource>, poll: Arc<MagentoSource>) -> Duration {
        push.order(1).await.unwrap(); // token fetched, connection warm
        for _ in 0..8 {
            let poll = poll.clone();
            tokio::spawn(async move { poll.page_after(crate::poll::Entity::Orders, 1, Default::default(), 10).await });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        push.order(1).await.unwrap();
        started.elapsed()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_poll_cannot_starve_webhook_refetches() {
        let url = slow_search_magento().await;
        let admin = MagentoAuth::Admin { username: "admin".into(), password: "pw".into() };
        let source = |name| Arc::new(MagentoSource::new(name, url.clone(), admin.clone()).unwrap());
        let separate = refetch_during_a_slow_poll(source("magento-push"), source("magento-poll")).await;
        assert!(separate < Duration::from_millis(500), "separate pools: {separate:?}");
        // What one shared client did: the poll held every slot, the webhook waited for it.
        let shared = source("magento");
        let waited = refetch_during_a_slow_poll(shared.clone(), shared).await;
        assert!(waited > Duration::from_secs(1), "one pool: {waited:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_integration_signs_every_call_with_oauth_1a() {
        let app = sandbox::magento::MagentoApp::new(
            Default::default(),
            Default::default(),
            sandbox::faults::Faults::default(),
            sandbox::Counters::default(),
        );
        app.sim.lock().unwrap().generate(20);
        let theirs = app.sim.lock().unwrap().integration_credentials();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = app.clone().router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let credentials = crate::oauth::Credentials {
            consumer_key: theirs.consumer_key.clone(),
            consumer_secret: theirs.consumer_secret.clone(),
            access_token: theirs.access_token.clone(),
            access_token_secret: theirs.access_token_secret.clone(),
        };
        let source = MagentoSource::new("magento-test", url.clone(), MagentoAuth::OAuth1(credentials.clone())).unwrap();
        assert_eq!(source.order(1).await.unwrap()["entity_id"], 1);
        let (_, total) = source.page_after(crate::poll::Entity::Orders, 1, Default::default(), 5).await.unwrap();
        assert!(total > 0, "a signed search (its criteria in the query) is answered");
        let wrong = crate::oauth::Credentials { access_token_secret: "not-it".into(), ..credentials };
        let refused = MagentoSource::new("magento-test", url.clone(), MagentoAuth::OAuth1(wrong)).unwrap();
        assert!(matches!(refused.order(1).await, Err(SourceError::Refused(_))));
        // Magento 2.4 refuses an integration token as Bearer unless the store allows it.
        let bearer = MagentoSource::new("magento-test", url, MagentoAuth::Bearer(theirs.access_token)).unwrap();
        assert!(matches!(bearer.order(1).await, Err(SourceError::Refused(_))));
    }

    #[test]
    fn magento_error_bodies_stay_out_of_errors() {
        for status in [400, 500] {
            let error = elo_http_client::Error::Status {
                downstream: "magento",
                status: axum::http::StatusCode::from_u16(status).unwrap(),
                body: r#"{"message":"No such entity with email = ana@example.com"}"#.into(),
                retry_after: None,
            };
            let classified = super::classify(error).to_string();
            assert!(!classified.contains("ana@example.com"), "{classified}");
            assert!(classified.contains(&status.to_string()), "{classified}");
        }
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntCounterVec, register_int_counter_vec};

    pub(super) static MAGENTO_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        let counter = register_int_counter_vec!(
            "order_ingest_magento_errors_total",
            "Failed Magento REST calls by class (not_found, unavailable, refused).",
            &["class"]
        )
        .expect("metric registers once");
        for class in ["not_found", "unavailable", "refused"] {
            counter.with_label_values(&[class]).inc_by(0);
        }
        counter
    });
}
