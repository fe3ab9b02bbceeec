//! Magento push: signed webhook notifications in, commerce events out.
//!
//! `POST /webhooks/magento/orders` takes either an Adobe I/O Events CloudEvents envelope (a
//! partial order in `data.value`, so the full order is fetched from Magento) or a plain JSON
//! body with the full order (`{"order": {...}}`). Every request must carry
//! `x-elo-webhook-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! within the timestamp tolerance (replays of old notifications are refused). The answer is
//! 2xx only after the broker acknowledged the event; a duplicate notification yields the same
//! `event_id`, so downstream deduplication is exact.
//!
//! Errors: 401 bad or stale signature, 400 malformed JSON, 413 body over the limit, 422 a
//! payload that is JSON but not an order, 502 Magento refusing the refetch, 503 with
//! `Retry-After` when the broker is unavailable or the producer queue is full. Unknown fields
//! are ignored. None of the refusals publishes anything.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::normalize::raw::{Lenient, Scalar};
use crate::normalize::{
    ErasureRequest, NormalizeError, RawOrder, Stores, customer_event, erasure_events, order_event, order_event_of,
};
use crate::now_ms;
use crate::source::{MagentoApi, SourceError};

mod serve;
mod signature;

pub use serve::{ListenerLimits, serve};

pub use signature::{ADOBE_SIGNATURE_HEADER, SIGNATURE_HEADER, Verifier, verify_signature};

/// Where events go: Kafka in production, a recorder in tests.
pub trait Publisher: Send + Sync + 'static {
    /// Publishes one event and resolves once the broker acknowledged it.
    fn publish(&self, event: &elo_events::CommerceEvent) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Parks a source record that cannot become an event (the service's DLQ), acknowledged.
    fn dead_letter(&self, letter: &DeadLetter) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Publishes an event the caller is done with: enrichment fills it in place instead of
    /// copying it.
    fn publish_owned(&self, event: elo_events::CommerceEvent) -> impl Future<Output = Result<(), PublishError>> + Send {
        async move { self.publish(&event).await }
    }
}

/// A Magento record Elo could not turn into an event, kept for an operator to inspect and fix.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// Where it was read, e.g. `magento-poll/orders`.
    pub source: String,
    /// The entity id (the DLQ record's key).
    pub entity_id: String,
    /// What identifies and explains the record (entity, version, error, the fields in
    /// question), never the whole record: the DLQ must not become a copy of people's data.
    pub payload: Vec<u8>,
    /// Bounded code, e.g. `invalid_payload`.
    pub code: &'static str,
    pub message: String,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Broker down, queue full, registry unreachable: try again later.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// The broker or registry refuses us for now (credentials, ACL, throttling): try again
    /// later, and never blame the event for it (a command waits rather than being parked).
    #[error("refused for now ({class}): {reason}", class = .0.as_str(), reason = .1)]
    Blocked(elo_kafka::ErrorClass, String),
    /// The event cannot be encoded (a bug or an incompatible schema).
    #[error("cannot publish: {0}")]
    Rejected(String),
}

/// A shared publisher (one per process, used by push, poll and commands) works as its inner one.
impl PublishError {
    /// A Kafka runtime error as a publish error, by its class.
    pub fn from_kafka(e: &elo_kafka::Error) -> Self {
        match e.class() {
            elo_kafka::ErrorClass::Transient => Self::Unavailable(e.to_string()),
            elo_kafka::ErrorClass::Permanent => Self::Rejected(e.to_string()),
            class => Self::Blocked(class, e.to_string()),
        }
    }

    /// A codec (registry) error as a publish error, by its class.
    pub fn from_codec(e: &elo_events::CodecError) -> Self {
        match e.class() {
            elo_events::CodecErrorClass::Unavailable => Self::Unavailable(e.to_string()),
            elo_events::CodecErrorClass::Undecodable => Self::Rejected(e.to_string()),
            elo_events::CodecErrorClass::Auth => Self::Blocked(elo_kafka::ErrorClass::Auth, e.to_string()),
            elo_events::CodecErrorClass::RateLimited => {
                Self::Blocked(elo_kafka::ErrorClass::RateLimited, e.to_string())
            }
        }
    }
}

impl<T: Publisher> Publisher for Arc<T> {
    fn publish(&self, event: &elo_events::CommerceEvent) -> impl Future<Output = Result<(), PublishError>> + Send {
        (**self).publish(event)
    }
    fn dead_letter(&self, letter: &DeadLetter) -> impl Future<Output = Result<(), PublishError>> + Send {
        (**self).dead_letter(letter)
    }
    fn publish_owned(&self, event: elo_events::CommerceEvent) -> impl Future<Output = Result<(), PublishError>> + Send {
        (**self).publish_owned(event)
    }
}

/// Push endpoint settings.
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// Accepted signatures (HMAC secrets, Adobe Commerce public key) and clock tolerance.
    pub verifier: Verifier,
    pub max_body_bytes: usize,
    pub stores: Stores,
}

struct PushState<P, S> {
    config: PushConfig,
    publisher: P,
    source: S,
}

/// The push router.
pub fn router<P: Publisher, S: MagentoApi>(config: PushConfig, publisher: P, source: S) -> Router {
    let limit = config.max_body_bytes;
    let verifier = config.verifier.clone();
    Router::new()
        .route("/webhooks/magento/orders", post(receive_order::<P, S>))
        .route("/webhooks/magento/customers", post(receive_customer::<P, S>))
        .layer(DefaultBodyLimit::max(limit))
        // Runs before any handler reads the body: unsigned or stale requests cost no body read.
        .layer(axum::middleware::from_fn_with_state(verifier, precheck))
        .with_state(Arc::new(PushState { config, publisher, source }))
}

async fn precheck(
    State(verifier): State<Verifier>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Err(reason) = verifier.precheck(request.headers(), now_secs()) {
        metrics::NOTIFICATIONS.with_label_values(&["unauthorized"]).inc();
        return refuse(StatusCode::UNAUTHORIZED, "invalid_signature", reason);
    }
    next.run(request).await
}

/// Answer bodies: `{"error": code, "message": text}`; no internals.
fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": code, "message": message.into()}))).into_response()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

/// Verifies the signature and parses the body; the refusal otherwise.
// The refusal is the handler's answer as is; boxing it would only add an allocation.
#[allow(clippy::result_large_err)]
fn authenticate<P, S>(state: &PushState<P, S>, headers: &HeaderMap, body: &[u8]) -> Result<Value, Response> {
    verified(state, headers, body)?;
    // Amounts keep their decimal text: never rounded through an f64.
    crate::json::parse_lossless(body).map_err(malformed)
}

/// The signature check alone.
#[allow(clippy::result_large_err)]
fn verified<P, S>(state: &PushState<P, S>, headers: &HeaderMap, body: &[u8]) -> Result<(), Response> {
    state.config.verifier.verify(headers, body, now_secs()).map_err(|reason| {
        metrics::NOTIFICATIONS.with_label_values(&["unauthorized"]).inc();
        refuse(StatusCode::UNAUTHORIZED, "invalid_signature", reason)
    })
}

fn malformed(e: serde_json::Error) -> Response {
    metrics::NOTIFICATIONS.with_label_values(&["malformed"]).inc();
    refuse(StatusCode::BAD_REQUEST, "malformed_json", format!("body is not JSON: {e}"))
}

/// An order notification as read off the wire: the Adobe Commerce webhook's full `order`, or a
/// CloudEvent's partial `data.value` (read straight into the typed view: no JSON tree).
#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct OrderNotification<'a> {
    #[serde(borrow)]
    order: Lenient<RawOrder<'a>>,
    #[serde(borrow)]
    data: Lenient<CloudData<'a>>,
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct CloudData<'a> {
    #[serde(borrow)]
    value: Lenient<PartialOrder<'a>>,
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct PartialOrder<'a> {
    #[serde(borrow)]
    entity_id: Scalar<'a>,
}

fn invalid(code: &str, message: impl Into<String>) -> Response {
    metrics::NOTIFICATIONS.with_label_values(&["invalid"]).inc();
    refuse(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// A refetch that Magento did not answer. A 404 is answered like an outage (502, retried by the
/// sender): Magento's save observers run inside the saving transaction, so a notification can
/// arrive before the entity is visible to a read; the poll covers anything never delivered.
fn source_failed(entity: &str, id: i64, error: SourceError) -> Response {
    metrics::NOTIFICATIONS.with_label_values(&["source_error"]).inc();
    tracing::warn!(entity, entity_id = id, error = %error, "refetch failed");
    let message = match error {
        SourceError::NotFound => format!("Magento has no {entity} {id} (yet); retry later"),
        _ => format!("Magento did not return the {entity}; retry later"),
    };
    refuse(StatusCode::BAD_GATEWAY, "source_unavailable", message)
}

// One trace per notification: its span's context becomes the records' `traceparent`.
#[tracing::instrument(name = "magento_webhook", skip_all, fields(route = "/webhooks/magento/orders"))]
async fn receive_order<P: Publisher, S: MagentoApi>(
    State(state): State<Arc<PushState<P, S>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    if let Err(refusal) = verified(&state, &headers, &body) {
        return refusal;
    }
    // Amounts keep their decimal text: never rounded through an f64.
    let text = crate::json::quote_fractions(&body);
    // JSON that is not an object reads as an empty notification (a 422 below, not a 400).
    let notification = match serde_json::from_slice::<Lenient<OrderNotification<'_>>>(&text) {
        Ok(notification) => notification.0.unwrap_or_default(),
        Err(e) => return malformed(e),
    };
    // Full order (plain style) or partial (CloudEvents: data.value) that must be refetched.
    let normalized = match (notification.order.0, notification.data.0.and_then(|d| d.value.0)) {
        (Some(order), _) if order.items.0.is_some() => order_event_of(&order, None, &state.config.stores, now_ms()),
        (_, Some(partial)) => {
            let Scalar::Int(id) = partial.entity_id else {
                return invalid("invalid_payload", "data.value.entity_id is missing");
            };
            match state.source.order(id).await {
                Ok(order) => order_event(&order, None, &state.config.stores, now_ms()),
                Err(error) => return source_failed("order", id, error),
            }
        }
        _ => return invalid("invalid_payload", "expected {\"order\": {...}} or a CloudEvent with data.value"),
    };
    match normalized {
        Ok(event) => publish_all(&state.publisher, vec![event], started).await,
        Err(e @ (NormalizeError::Missing(_) | NormalizeError::Invalid { .. })) => {
            invalid("invalid_order", e.to_string())
        }
    }
}

/// What a customer notification asks for.
enum CustomerNotice {
    /// Saved: refetch (partial) or take (full) the record.
    Saved { id: Option<i64>, record: Option<Value> },
    /// Deleted in Magento, or an erasure request (LGPD/GDPR) from the shop's privacy tooling.
    Erase(ErasureRequest),
}

/// Reads the customer notification styles: CloudEvents (`...customer_save_after` /
/// `...customer_delete_after` with `data.value`) and plain (`{"event": ..., "customer": {...}}`,
/// where `event` is `customer_save_after`, `customer_delete_after` or `erasure_request`).
fn customer_notice(payload: &Value) -> Result<CustomerNotice, &'static str> {
    let (kind, subject) = if let Some(value) = payload.pointer("/data/value") {
        (payload.get("type").and_then(Value::as_str).unwrap_or_default(), value)
    } else {
        let subject =
            payload.get("customer").ok_or("expected a CloudEvent with data.value or {\"event\", \"customer\"}")?;
        (payload.get("event").and_then(Value::as_str).unwrap_or_default(), subject)
    };
    let id = subject.get("id").or_else(|| subject.get("entity_id")).and_then(Value::as_i64);
    let requested_at = payload
        .get("time")
        .and_then(Value::as_str)
        .and_then(crate::normalize::parse_magento_time)
        .unwrap_or_else(crate::now_ms);
    let erase = |reason: &'static str| -> Result<CustomerNotice, &'static str> {
        let email = subject.get("email").and_then(Value::as_str).ok_or("an erasure needs customer.email")?;
        Ok(CustomerNotice::Erase(ErasureRequest {
            customer_id: id,
            email: email.to_owned(),
            reason,
            store_id: subject.get("store_id").and_then(Value::as_i64).unwrap_or(0),
            requested_at,
            request_ref: payload
                .get("id")
                .or_else(|| payload.get("request_id"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        }))
    };
    if kind.ends_with("customer_save_after") {
        let full =
            subject.get("email").is_some() && subject.get("updated_at").is_some() && payload.get("data").is_none();
        id.ok_or("customer.id is missing")?;
        Ok(CustomerNotice::Saved { id, record: full.then(|| subject.clone()) })
    } else if kind.ends_with("customer_delete_after") {
        erase("customer_deleted")
    } else if kind == "erasure_request" {
        erase("erasure_request")
    } else {
        Err("unknown customer event: expected customer_save_after, customer_delete_after or erasure_request")
    }
}

#[tracing::instrument(name = "magento_webhook", skip_all, fields(route = "/webhooks/magento/customers"))]
async fn receive_customer<P: Publisher, S: MagentoApi>(
    State(state): State<Arc<PushState<P, S>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let payload = match authenticate(&state, &headers, &body) {
        Ok(payload) => payload,
        Err(refusal) => return refusal,
    };
    let events = match customer_notice(&payload) {
        Err(reason) => return invalid("invalid_payload", reason),
        Ok(CustomerNotice::Saved { id, record }) => {
            let record = match (record, id) {
                (Some(record), _) => record,
                (None, Some(id)) => match state.source.customer(id).await {
                    Ok(record) => record,
                    Err(error) => return source_failed("customer", id, error),
                },
                (None, None) => return invalid("invalid_payload", "customer.id is missing"),
            };
            customer_event(&record, &state.config.stores, now_ms()).map(|e| vec![e])
        }
        Ok(CustomerNotice::Erase(request)) => erasure_events(&request, &state.config.stores, now_ms()),
    };
    match events {
        Ok(events) => publish_all(&state.publisher, events, started).await,
        Err(e) => invalid("invalid_customer", e.to_string()),
    }
}

/// Publishes in order and answers 200 only when every event was acknowledged.
async fn publish_all<P: Publisher>(
    publisher: &P,
    events: Vec<elo_events::CommerceEvent>,
    started: std::time::Instant,
) -> Response {
    let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    let event_type = events[0].event_type.as_str();
    for event in events {
        match publisher.publish_owned(event).await {
            Ok(()) => {}
            Err(PublishError::Unavailable(reason) | PublishError::Blocked(_, reason)) => {
                metrics::NOTIFICATIONS.with_label_values(&["unavailable"]).inc();
                tracing::warn!(error = %reason, "publish unavailable, asking Magento to retry");
                let mut r = refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "event store temporarily unavailable; retry later",
                );
                r.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
                return r;
            }
            Err(PublishError::Rejected(reason)) => {
                metrics::NOTIFICATIONS.with_label_values(&["rejected"]).inc();
                tracing::error!(error = %reason, "event could not be published");
                return refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the event could not be published");
            }
        }
    }
    metrics::NOTIFICATIONS.with_label_values(&["published"]).inc();
    metrics::PUBLISH_LATENCY.observe(started.elapsed().as_secs_f64());
    // `op` is what Adobe Commerce webhooks expect from a receiver that accepted the call.
    // Serialised from borrowed fields (no JSON tree per answer), keys in the order a `json!`
    // map wrote them.
    let body = Accepted { event_id: &ids[0], event_ids: &ids, event_type, op: "success" };
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// The 200 answer's body.
#[derive(serde::Serialize)]
struct Accepted<'a> {
    event_id: &'a str,
    event_ids: &'a [String],
    event_type: &'a str,
    op: &'static str,
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{Histogram, IntCounterVec, register_histogram, register_int_counter_vec};

    pub(super) static NOTIFICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "order_ingest_notifications_total",
            "Magento notifications by outcome (published, unauthorized, malformed, invalid, source_error, unavailable, rejected).",
            &["outcome"]
        )
        .expect("metric registers once")
    });
    pub(super) static PUBLISH_LATENCY: LazyLock<Histogram> = LazyLock::new(|| {
        register_histogram!(
            "order_ingest_publish_latency_seconds",
            "From a notification's arrival to the broker's acknowledgement.",
            vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
        )
        .expect("metric registers once")
    });
}

#[cfg(test)]
mod tests;
