//! Control and inspection API, on its own port: tests and the demo inject faults, revoke
//! tokens, exhaust quotas, alter data behind Elo's back, and read state and call counters.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::Counters;
use crate::faults::{FaultConfig, Faults};
use crate::magento::MagentoApp;
use crate::magento::admin::MassStatus;
use crate::rdstation::{RdStationApp, Segmentation};
use crate::salesforce::SalesforceApp;
use crate::salesforce::schema::{FieldSchema, ObjectSchema};

/// Everything the control API can reach.
#[derive(Clone)]
pub struct Control {
    pub faults: Faults,
    pub counters: Counters,
    pub salesforce: SalesforceApp,
    pub rdstation: RdStationApp,
    pub magento: MagentoApp,
}

type ApiResult = Result<Json<Value>, (StatusCode, Json<Value>)>;

fn bad_request(message: impl Into<String>) -> (StatusCode, Json<Value>) {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message.into()})))
}

pub fn router(control: Control) -> Router {
    Router::new()
        .route("/faults/{simulator}", put(set_faults).get(get_faults))
        .route("/counters", get(|State(c): State<Control>| async move { Json(c.counters.snapshot()) }))
        .route(
            "/counters/reset",
            post(|State(c): State<Control>| async move {
                c.counters.reset();
                Json(json!({"ok": true}))
            }),
        )
        .route("/salesforce/state", get(salesforce_state))
        .route("/salesforce/revoke-tokens", post(salesforce_revoke))
        .route("/salesforce/quota", put(salesforce_quota))
        .route("/salesforce/config", put(salesforce_config))
        .route("/salesforce/schema", get(salesforce_schema))
        .route("/salesforce/schema/objects", post(salesforce_add_object))
        .route("/salesforce/schema/objects/{object}/fields", post(salesforce_add_field))
        .route("/salesforce/records/{id}", axum::routing::delete(salesforce_delete).patch(salesforce_alter))
        .route("/rdstation/state", get(rd_state))
        .route("/rdstation/expire-tokens", post(rd_expire))
        .route("/rdstation/auth-code", post(rd_code))
        .route("/rdstation/segmentations", post(rd_segmentation))
        .route("/rdstation/config", put(rd_config))
        .route("/magento/generate", post(magento_generate))
        .route("/magento/state", get(magento_state))
        .route("/magento/config", put(magento_config))
        .route("/magento/webhook", put(magento_webhook))
        .route("/magento/webhook/public-key", get(magento_webhook_public_key))
        .route("/magento/integration", get(magento_integration))
        .route("/magento/generator", put(magento_rate))
        .route("/magento/orders/mass-status", post(magento_mass_status))
        .route("/magento/orders/{id}", axum::routing::patch(magento_alter_order))
        .route("/magento/orders/{id}/ship", post(magento_ship))
        .route("/magento/customers/{id}", axum::routing::patch(magento_alter_customer))
        .route("/rdstation/contacts/{uuid}", axum::routing::delete(rd_delete).patch(rd_alter))
        .with_state(control)
        // /metrics and /health/{livez,readyz}, as on every Elo process.
        .merge(elo_telemetry::admin::router(elo_telemetry::Health::new()))
}

/// Applies `updates` (known keys only) to a settings struct.
fn merge_config<T: serde::Serialize + serde::de::DeserializeOwned>(
    current: &T,
    updates: &Value,
) -> Result<T, (StatusCode, Json<Value>)> {
    let mut merged = serde_json::to_value(current).expect("serialisable");
    let Some(updates) = updates.as_object() else { return Err(bad_request("expected an object")) };
    for (k, v) in updates {
        if merged.get(k).is_none() {
            return Err(bad_request(format!("unknown setting {k}")));
        }
        merged[k] = v.clone();
    }
    serde_json::from_value(merged).map_err(|e| bad_request(e.to_string()))
}

const SIMULATORS: &[&str] = &["salesforce", "rdstation", "magento"];

async fn set_faults(State(c): State<Control>, Path(sim): Path<String>, Json(config): Json<FaultConfig>) -> ApiResult {
    if !SIMULATORS.contains(&sim.as_str()) {
        return Err(bad_request(format!("unknown simulator {sim}")));
    }
    config.validate(true).map_err(bad_request)?;
    c.faults.set(&sim, config.clone());
    Ok(Json(serde_json::to_value(config).expect("serialisable")))
}

async fn get_faults(State(c): State<Control>, Path(sim): Path<String>) -> Json<Value> {
    Json(serde_json::to_value(c.faults.get(&sim)).expect("serialisable"))
}

async fn salesforce_state(State(c): State<Control>) -> Json<Value> {
    let sim = c.salesforce.sim.lock().expect("sim lock");
    let records: Vec<Value> = sim.org.records.values().map(|r| r.to_json("v66.0")).collect();
    Json(
        json!({"api_usage": sim.api_usage, "daily_quota": sim.config.daily_quota, "records": records, "config": sim.config}),
    )
}

async fn salesforce_revoke(State(c): State<Control>) -> Json<Value> {
    c.salesforce.sim.lock().expect("sim lock").revoke_all();
    Json(json!({"revoked": true}))
}

async fn salesforce_quota(State(c): State<Control>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.salesforce.sim.lock().expect("sim lock");
    if let Some(max) = body.get("daily_quota").and_then(Value::as_u64) {
        sim.config.daily_quota = max;
    }
    if let Some(used) = body.get("api_usage").and_then(Value::as_u64) {
        sim.api_usage = used;
    }
    if body.get("exhaust").and_then(Value::as_bool) == Some(true) {
        sim.api_usage = sim.config.daily_quota;
    }
    Ok(Json(json!({"api_usage": sim.api_usage, "daily_quota": sim.config.daily_quota})))
}

async fn salesforce_config(State(c): State<Control>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.salesforce.sim.lock().expect("sim lock");
    sim.config = merge_config(&sim.config, &body)?;
    sim.apply_org_settings();
    Ok(Json(serde_json::to_value(&sim.config).expect("serialisable")))
}

async fn salesforce_schema(State(c): State<Control>) -> Json<Value> {
    Json(serde_json::to_value(&c.salesforce.sim.lock().expect("sim lock").org.schema).expect("serialisable"))
}

/// Declares a custom object: `{"name": "Thing__c", "label"?, "fields": [...]}`.
async fn salesforce_add_object(State(c): State<Control>, Json(mut body): Json<Value>) -> ApiResult {
    let name = body.get("name").and_then(Value::as_str).ok_or_else(|| bad_request("name is required"))?.to_owned();
    body.as_object_mut().map(|o| o.remove("name"));
    let object: ObjectSchema = serde_json::from_value(body).map_err(|e| bad_request(e.to_string()))?;
    let mut sim = c.salesforce.sim.lock().expect("sim lock");
    sim.org.schema.add_object(&name, object).map_err(|e| bad_request(e.to_string()))?;
    Ok(Json(json!({"created": name})))
}

/// Declares a custom field on an object: a field as the schema file writes it.
async fn salesforce_add_field(
    State(c): State<Control>,
    Path(object): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult {
    let field: FieldSchema = serde_json::from_value(body).map_err(|e| bad_request(e.to_string()))?;
    let name = field.name.clone();
    let mut sim = c.salesforce.sim.lock().expect("sim lock");
    sim.org.schema.add_field(&object, field).map_err(|e| bad_request(e.to_string()))?;
    Ok(Json(json!({"created": format!("{object}.{name}")})))
}

/// Drift: a record deleted behind Elo's back.
async fn salesforce_delete(State(c): State<Control>, Path(id): Path<String>) -> ApiResult {
    let mut sim = c.salesforce.sim.lock().expect("sim lock");
    match sim.org.remove_record(&id) {
        Some(_) => Ok(Json(json!({"deleted": id}))),
        None => Err((StatusCode::NOT_FOUND, Json(json!({"error": "no such record"})))),
    }
}

/// Drift: fields changed behind Elo's back (no validation, as an admin's data fix would be).
async fn salesforce_alter(State(c): State<Control>, Path(id): Path<String>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.salesforce.sim.lock().expect("sim lock");
    let Some(fields) = body.as_object() else { return Err(bad_request("expected an object")) };
    let Some(record) = sim.org.alter(&id, fields, crate::now_ms()) else {
        return Err((StatusCode::NOT_FOUND, Json(json!({"error": "no such record"}))));
    };
    Ok(Json(record.to_json("v66.0")))
}

async fn rd_state(State(c): State<Control>) -> Json<Value> {
    let sim = c.rdstation.sim.lock().expect("rd lock");
    let contacts: Vec<Value> =
        sim.contacts.values().map(|c| json!({"uuid": c.uuid, "fields": c.fields, "funnel": c.funnel})).collect();
    Json(json!({"contacts": contacts, "events": sim.events, "segmentations": sim.segmentations, "config": sim.config}))
}

async fn rd_expire(State(c): State<Control>) -> Json<Value> {
    c.rdstation.sim.lock().expect("rd lock").expire_tokens();
    Json(json!({"expired": true}))
}

/// An authorization code, as the consent screen would hand out.
async fn rd_code(State(c): State<Control>) -> Json<Value> {
    Json(json!({"code": c.rdstation.sim.lock().expect("rd lock").issue_code()}))
}

async fn rd_segmentation(State(c): State<Control>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.rdstation.sim.lock().expect("rd lock");
    let name = body.get("name").and_then(Value::as_str).ok_or_else(|| bad_request("name is required"))?.to_owned();
    let id = sim.segmentations.iter().map(|s| s.id).max().unwrap_or(0) + 1;
    let tag = body.get("tag").and_then(Value::as_str).map(str::to_owned);
    sim.segmentations.push(Segmentation { id, name, standard: false, tag });
    Ok(Json(json!({"id": id})))
}

async fn rd_config(State(c): State<Control>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.rdstation.sim.lock().expect("rd lock");
    sim.config = merge_config(&sim.config, &body)?;
    Ok(Json(serde_json::to_value(&sim.config).expect("serialisable")))
}

/// Runs the order generator: `{"count": N}` facts (new orders and status changes), or
/// `{"orders": N}` new orders only.
async fn magento_generate(State(c): State<Control>, Json(body): Json<Value>) -> ApiResult {
    let (count, orders_only) = match (body.get("count"), body.get("orders")) {
        (Some(n), None) => (n.as_u64(), false),
        (None, Some(n)) => (n.as_u64(), true),
        _ => (None, false),
    };
    let count = count.ok_or_else(|| bad_request("exactly one of count and orders is required"))? as usize;
    if count > 1_000_000 {
        return Err(bad_request("count must be at most 1000000"));
    }
    let started = std::time::Instant::now();
    let mut sim = c.magento.sim.lock().expect("magento lock");
    sim.keep_generator_behind_now(count);
    let placed = if orders_only { sim.generate_orders(count) } else { sim.generate(count) };
    Ok(Json(
        json!({"facts": count, "orders_placed": placed, "orders_total": sim.orders.len(), "elapsed_ms": started.elapsed().as_millis() as u64}),
    ))
}

async fn magento_state(State(c): State<Control>) -> Json<Value> {
    let sim = c.magento.sim.lock().expect("magento lock");
    let stock: serde_json::Map<String, Value> =
        sim.stock.iter().map(|(k, (q, s))| (k.clone(), json!({"quantity": q, "status": s}))).collect();
    Json(json!({
        "orders": sim.orders.len(),
        "customers": sim.customers.len(),
        "stock": stock,
        "reservations": sim.reservations,
        "config": sim.config,
        "webhook": {"url": sim.webhook.url, "style": sim.webhook.style, "duplicate_rate": sim.webhook.duplicate_rate,
            "pending": sim.outbox.queue.len(), "delivered": sim.outbox.delivered, "duplicates_sent": sim.outbox.duplicates_sent,
            "failed_attempts": sim.outbox.failed_attempts, "drop_rate": sim.webhook_drop_rate,
            "dropped": sim.outbox.dropped, "dropped_orders": sim.outbox.dropped_orders},
    }))
}

async fn magento_config(State(c): State<Control>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.magento.sim.lock().expect("magento lock");
    sim.config = merge_config(&sim.config, &body)?;
    Ok(Json(serde_json::to_value(&sim.config).expect("serialisable")))
}

/// Points notifications at a receiver: `{"url", "secret", "duplicate_rate", "style",
/// "customer_url"?, "max_backoff_ms"?, "signature"?}`.
async fn magento_webhook(
    State(c): State<Control>,
    Json(settings): Json<crate::magento::webhook::WebhookSettings>,
) -> ApiResult {
    if !(0.0..=1.0).contains(&settings.config.duplicate_rate) {
        return Err(bad_request("duplicate_rate must be between 0 and 1"));
    }
    if !(0.0..=1.0).contains(&settings.drop_rate) {
        return Err(bad_request("drop_rate must be between 0 and 1"));
    }
    let mut sim = c.magento.sim.lock().expect("magento lock");
    sim.webhook = settings.config;
    sim.webhook_signature = settings.signature;
    sim.webhook_drop_rate = settings.drop_rate;
    Ok(Json(
        json!({"url": sim.webhook.url, "style": sim.webhook.style, "signature": sim.webhook_signature, "drop_rate": sim.webhook_drop_rate}),
    ))
}

/// The public half of the key `adobe-rsa` webhook signatures are made with, as PEM.
async fn magento_webhook_public_key(State(c): State<Control>) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/x-pem-file")], c.magento.webhook_key.get().public_pem())
}

/// The integration's OAuth 1.0a credentials, as the admin's activation dialog shows them.
async fn magento_integration(State(c): State<Control>) -> Json<Value> {
    Json(
        serde_json::to_value(c.magento.sim.lock().expect("magento lock").integration_credentials())
            .expect("serialisable"),
    )
}

/// Background generation rate: `{"rate_per_sec": 50}` (0 stops it).
async fn magento_rate(State(c): State<Control>, Json(body): Json<Value>) -> ApiResult {
    let rate =
        body.get("rate_per_sec").and_then(Value::as_f64).ok_or_else(|| bad_request("rate_per_sec is required"))?;
    if !(0.0..=100_000.0).contains(&rate) {
        return Err(bad_request("rate_per_sec must be between 0 and 100000"));
    }
    c.magento.sim.lock().expect("magento lock").rate_per_sec = rate;
    Ok(Json(json!({"rate_per_sec": rate})))
}

/// A shipment of the whole order: MSI deducts the source and compensates the reservation.
async fn magento_ship(State(c): State<Control>, Path(id): Path<i64>) -> ApiResult {
    let mut sim = c.magento.sim.lock().expect("magento lock");
    if !sim.orders.contains_key(&id) {
        return Err((StatusCode::NOT_FOUND, Json(json!({"error": "no such order"}))));
    }
    let lines = sim.ship(id).map_err(bad_request)?;
    let deducted: Vec<Value> = lines.iter().map(|(sku, qty)| json!({"sku": sku, "qty": qty})).collect();
    Ok(Json(json!({"order_id": id, "deducted": deducted})))
}

/// An admin's mass action: many orders to one status in one transaction, one `updated_at`.
async fn magento_mass_status(State(c): State<Control>, body: Json<Value>) -> ApiResult {
    let change: MassStatus = serde_json::from_value(body.0).map_err(|e| bad_request(e.to_string()))?;
    if change.status.is_empty() {
        return Err(bad_request("status must not be empty"));
    }
    let (changed, updated_at) = c.magento.sim.lock().expect("magento lock").mass_status(&change);
    Ok(Json(json!({"changed": changed, "updated_at": updated_at})))
}

/// Drift: an order changed behind Elo's back (fields merged; `updated_at` is left alone unless
/// given, as a direct database edit would).
async fn magento_alter_order(State(c): State<Control>, Path(id): Path<i64>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.magento.sim.lock().expect("magento lock");
    let Some(order) = sim.orders.get_mut(&id) else {
        return Err((StatusCode::NOT_FOUND, Json(json!({"error": "no such order"}))));
    };
    let Some(fields) = body.as_object() else { return Err(bad_request("expected an object")) };
    for (k, v) in fields {
        order[k] = v.clone();
    }
    Ok(Json(order.clone()))
}

/// A customer edits their account (name, e-mail, newsletter subscription): `updated_at` moves
/// and a `customer_save_after` notification is queued, as Magento's own save would do.
async fn magento_alter_customer(State(c): State<Control>, Path(id): Path<i64>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.magento.sim.lock().expect("magento lock");
    let Some(customer) = sim.customers.get_mut(&id) else {
        return Err((StatusCode::NOT_FOUND, Json(json!({"error": "no such customer"}))));
    };
    let Some(fields) = body.as_object() else { return Err(bad_request("expected an object")) };
    for (k, v) in fields {
        match (k.as_str(), v) {
            ("subscribed", Value::Bool(b)) => customer.subscribed = *b,
            ("firstname", Value::String(t)) => customer.firstname = t.clone(),
            ("lastname", Value::String(t)) => customer.lastname = t.clone(),
            ("email", Value::String(t)) => customer.email = t.clone(),
            _ => return Err(bad_request(format!("cannot change {k} to {v}"))),
        }
    }
    // Magento timestamps have second precision: make the change visible as a new version.
    customer.updated_ms = (customer.updated_ms / 1000 + 1).max(crate::now_ms() / 1000) * 1000;
    let json = customer.to_json();
    sim.notify_customer(&json, false);
    Ok(Json(json))
}

/// Drift: a contact deleted behind Elo's back.
async fn rd_delete(State(c): State<Control>, Path(uuid): Path<String>) -> ApiResult {
    match c.rdstation.sim.lock().expect("rd lock").contacts.remove(&uuid) {
        Some(_) => Ok(Json(json!({"deleted": uuid}))),
        None => Err((StatusCode::NOT_FOUND, Json(json!({"error": "no such contact"})))),
    }
}

/// Drift: contact fields changed behind Elo's back.
async fn rd_alter(State(c): State<Control>, Path(uuid): Path<String>, Json(body): Json<Value>) -> ApiResult {
    let mut sim = c.rdstation.sim.lock().expect("rd lock");
    let Some(contact) = sim.contacts.get_mut(&uuid) else {
        return Err((StatusCode::NOT_FOUND, Json(json!({"error": "no such contact"}))));
    };
    let Some(fields) = body.as_object() else { return Err(bad_request("expected an object")) };
    for (k, v) in fields {
        contact.fields.insert(k.clone(), v.clone());
    }
    Ok(Json(json!({"uuid": uuid, "fields": contact.fields})))
}
