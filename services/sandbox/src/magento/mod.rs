//! Magento 2 / Adobe Commerce REST simulator (`/rest/<store>/V1/...`), following
//! `../shared/docs/saas-apis.md` §1 and §7: admin tokens returned as a JSON string (4 h),
//! integrations signed with OAuth 1.0a ([`oauth`]; their token as Bearer only when enabled),
//! the `%resources` 401, `searchCriteria` with the last-page-repeats behaviour and the Web API
//! input limits, orders with flat configurable/bundle items, UTC timestamps without zone and
//! `shipping_assignments`, customers by id and search, MSI with reservations (`inventory`),
//! the legacy stock item, admin mass actions ([`admin`]) and signed notifications
//! ([`webhook`], [`signing`]).

pub mod admin;
mod catalog;
pub mod generator;
mod http;
mod inventory;
pub mod oauth;
pub mod search;
pub mod signing;
pub mod webhook;

use axum::http::{HeaderMap, Method, header};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::now_ms;
use search::MagentoError;

pub use catalog::{Catalog, Customer, Product, ProductKind};
pub use http::MagentoApp;

/// Settings of the simulated store.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MagentoConfig {
    pub admin_username: String,
    pub admin_password: String,
    /// Integration access token (never expires).
    pub integration_token: String,
    /// The integration's access token secret (OAuth 1.0a).
    pub integration_token_secret: String,
    /// The integration's consumer key and secret (OAuth 1.0a).
    pub integration_consumer_key: String,
    pub integration_consumer_secret: String,
    /// `oauth/consumer/enable_integration_as_bearer` (off by default in 2.4.x).
    pub integration_as_bearer: bool,
    pub admin_token_ttl_secs: i64,
    /// A page past the end answers the last page again (as Magento does).
    pub last_page_repeats: bool,
    /// Web API input limits: off as Magento ships; on, page size at most 300 (20 when not
    /// given) and lists of at most 20 entities.
    pub input_limits: bool,
    pub low_stock_seed_qty: f64,
}

impl Default for MagentoConfig {
    fn default() -> Self {
        Self {
            admin_username: "admin".into(),
            admin_password: "elo-sandbox-admin1".into(),
            integration_token: "elo-sandbox-integration-token".into(),
            integration_token_secret: "elo-sandbox-integration-token-secret".into(),
            integration_consumer_key: "elo-sandbox-consumer-key".into(),
            integration_consumer_secret: "elo-sandbox-consumer-secret".into(),
            integration_as_bearer: false,
            admin_token_ttl_secs: 4 * 3600,
            last_page_repeats: true,
            input_limits: false,
            low_stock_seed_qty: 3.0,
        }
    }
}

/// Web API input limits (2.4.3+ defaults): maximum and default page size, entities per list.
const MAX_PAGE_SIZE: usize = 300;
const DEFAULT_PAGE_SIZE: usize = 20;
pub(crate) const MAX_LIST_ITEMS: usize = 20;

/// Stores (views) of the simulated website.
pub const STORES: &[(i64, &str)] = &[(1, "default"), (2, "br")];

/// `YYYY-MM-DD HH:MM:SS`, UTC, no zone: Magento's format whatever the store timezone.
pub fn fmt_ts(ms: i64) -> String {
    crate::salesforce::model::format_datetime(ms)[..19].replace('T', " ")
}

/// The store's data.
pub struct Magento {
    pub config: MagentoConfig,
    pub catalog: Catalog,
    pub orders: BTreeMap<i64, Value>,
    pub customers: BTreeMap<i64, Customer>,
    /// MSI source items: sku → (quantity, status).
    pub stock: BTreeMap<String, (f64, u8)>,
    /// MSI reservations, summed per SKU (negative: held by orders not yet shipped).
    pub reservations: BTreeMap<String, f64>,
    /// Orders whose shipment has deducted the source.
    pub shipped: BTreeSet<i64>,
    admin_tokens: HashMap<String, i64>,
    nonces: oauth::Nonces,
    pub generator: generator::Generator,
    pub webhook: webhook::WebhookConfig,
    /// How notifications are signed.
    pub webhook_signature: webhook::SignatureScheme,
    /// Probability (0..1) that a notification is never sent, as a real Magento loses some
    /// (a crashed cron, a full queue): only a poll or a reconciliation finds those changes.
    pub webhook_drop_rate: f64,
    pub outbox: webhook::Outbox,
    /// Facts per second the background generator adds (0 = stopped).
    pub rate_per_sec: f64,
}

impl Magento {
    pub fn new(config: MagentoConfig, generator: generator::GeneratorConfig) -> Self {
        let catalog = Catalog::build();
        let stock = catalog
            .all
            .values()
            .filter(|p| matches!(p.kind, ProductKind::Simple))
            .map(|p| {
                (
                    p.sku.clone(),
                    (if p.id % 7 == 0 { config.low_stock_seed_qty } else { 100.0 + (p.id % 5) as f64 * 50.0 }, 1),
                )
            })
            .collect();
        Self {
            config,
            catalog,
            orders: BTreeMap::new(),
            customers: BTreeMap::new(),
            stock,
            reservations: BTreeMap::new(),
            shipped: BTreeSet::new(),
            admin_tokens: HashMap::new(),
            nonces: oauth::Nonces::default(),
            generator: generator::Generator::new(generator),
            webhook: webhook::WebhookConfig::default(),
            webhook_signature: webhook::SignatureScheme::default(),
            webhook_drop_rate: 0.0,
            outbox: webhook::Outbox::default(),
            rate_per_sec: 0.0,
        }
    }

    /// Runs the generator for `count` facts; returns how many orders were placed.
    pub fn generate(&mut self, count: usize) -> usize {
        let mut generator = std::mem::replace(&mut self.generator, generator::Generator::new(Default::default()));
        let placed = generator.run(self, count);
        self.generator = generator;
        placed
    }

    /// Places exactly `orders` new orders (no status changes in between).
    pub fn generate_orders(&mut self, orders: usize) -> usize {
        let rate = std::mem::replace(&mut self.generator.config.transition_rate, 0.0);
        let placed = self.generate(orders);
        self.generator.config.transition_rate = rate;
        placed
    }

    /// Keeps the next `facts` out of the future: when they would run past the wall clock at the
    /// configured spacing, they are squeezed between the last fact and now (1 ms apart at the
    /// least), as a busy store's orders would be. Magento never stamps a future time, and a
    /// poller's cursor must not jump ahead of later real changes (a mass action stamps now).
    pub fn keep_generator_behind_now(&mut self, facts: usize) {
        let config = &mut self.generator.config;
        let step = self.generator.step;
        let last = config.start_ms + step * config.spacing_ms;
        let now = now_ms();
        let facts = i64::try_from(facts).unwrap_or(i64::MAX).max(1);
        if last.saturating_add(facts.saturating_mul(config.spacing_ms)) <= now {
            return;
        }
        let spacing = ((now - last) / facts).max(1);
        config.spacing_ms = spacing;
        config.start_ms = last - step * spacing;
    }

    /// Queues a notification for the order's current version (when a webhook URL is set).
    pub fn notify(&mut self, order_id: i64) {
        if self.webhook.url.is_none() {
            return;
        }
        if let Some(order) = self.orders.get(&order_id) {
            let n = webhook::notification(&self.webhook, order);
            if self.lose(&n) {
                self.outbox.dropped_orders.push(order_id);
                return;
            }
            self.outbox.queue.push_back(n);
        }
    }

    /// Whether this notification is lost (never sent), counting it if so.
    fn lose(&mut self, n: &webhook::Notification) -> bool {
        if self.webhook_drop_rate <= 0.0 || rand::random::<f64>() >= self.webhook_drop_rate {
            return false;
        }
        self.outbox.dropped += 1;
        tracing::debug!(id = %n.id, "webhook dropped (drop_rate)");
        true
    }

    /// Queues a customer notification (saved or deleted) when a customer URL is set.
    pub fn notify_customer(&mut self, customer: &Value, deleted: bool) {
        if self.webhook.customer_url.is_none() {
            return;
        }
        let n = webhook::customer_notification(&self.webhook, customer, deleted, now_ms());
        if self.lose(&n) {
            return;
        }
        self.outbox.queue.push_back(n);
    }

    /// The integration's OAuth 1.0a credentials.
    pub fn integration_credentials(&self) -> oauth::Credentials {
        oauth::Credentials {
            consumer_key: self.config.integration_consumer_key.clone(),
            consumer_secret: self.config.integration_consumer_secret.clone(),
            access_token: self.config.integration_token.clone(),
            access_token_secret: self.config.integration_token_secret.clone(),
        }
    }

    /// Admin bearer tokens, OAuth 1.0a-signed integration requests, and the integration token
    /// as a bearer only when `integration_as_bearer` is on.
    fn authorize(&mut self, method: &Method, url: &str, query: &str, headers: &HeaderMap) -> Result<(), MagentoError> {
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if let Some(params) = oauth::header_params(authorization) {
            let request = oauth::Request { method: method.as_str(), base_url: url, query, form: None };
            let credentials = self.integration_credentials();
            return oauth::verify(&request, &params, &credentials, &mut self.nonces, now_ms() / 1000);
        }
        let ok = match authorization.strip_prefix("Bearer ") {
            Some(t) if t == self.config.integration_token => self.config.integration_as_bearer,
            Some(t) => self.admin_tokens.get(t).is_some_and(|exp| *exp > now_ms()),
            None => false,
        };
        if ok {
            Ok(())
        } else {
            Err(MagentoError::new(
                401,
                "The consumer isn't authorized to access %resources.",
                json!({"resources": "Magento_Sales::actions_view"}),
            ))
        }
    }

    /// The request's searchCriteria, refused above the maximum page size when the Web API input
    /// limits are on ("Input limiting"; `SearchCriteriaValidator`).
    fn search_criteria(&self, query: &str) -> Result<search::SearchCriteria, MagentoError> {
        let c = search::parse(query)?;
        if self.config.input_limits && c.page_size.is_some_and(|s| s > MAX_PAGE_SIZE) {
            return Err(MagentoError::new(
                400,
                "Maximum SearchCriteria pageSize is %max",
                json!({"max": MAX_PAGE_SIZE}),
            ));
        }
        Ok(c)
    }

    /// Page size when the request names none: the input limits' default, else everything.
    fn default_page_size(&self) -> usize {
        if self.config.input_limits { DEFAULT_PAGE_SIZE } else { usize::MAX }
    }

    fn execute(
        &mut self,
        method: &Method,
        url: &str,
        segments: &[&str],
        query: &str,
        body: &Value,
        headers: &HeaderMap,
    ) -> Result<(u16, Value), MagentoError> {
        if let (&Method::POST, ["integration", "admin", "token"]) = (method, segments) {
            let user = body.get("username").and_then(Value::as_str);
            let pass = body.get("password").and_then(Value::as_str);
            if user.is_none() || pass.is_none() {
                return Err(MagentoError::new(
                    400,
                    "\"%fieldName\" is required. Enter and try again.",
                    json!({"fieldName": if user.is_none() { "username" } else { "password" }}),
                ));
            }
            if user != Some(self.config.admin_username.as_str()) || pass != Some(self.config.admin_password.as_str()) {
                return Err(MagentoError::new(
                    401,
                    "The account sign-in was incorrect or your account is disabled temporarily. Please wait and try again later.",
                    json!([]),
                ));
            }
            let token: String = (0..32)
                .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::random::<u32>() as usize % 36]))
                .collect();
            self.admin_tokens.insert(token.clone(), now_ms() + self.config.admin_token_ttl_secs * 1000);
            return Ok((200, json!(token)));
        }
        self.authorize(method, url, query, headers)?;
        if inventory::handles(segments) {
            return self.inventory(method.as_str(), segments, query, body);
        }
        let criteria = || self.search_criteria(query);
        match (method.as_str(), segments) {
            ("GET", ["orders"]) => {
                let c = criteria()?;
                if let Some(f) =
                    c.groups.iter().flatten().find(|f| {
                        !f.field.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_' || ch.is_ascii_digit())
                    })
                {
                    // camelCase columns reach SQL and fail there.
                    tracing::debug!(field = %f.field, "unknown order column");
                    return Err(MagentoError::new(
                        500,
                        "Internal Error. Details are available in Magento log file. Report ID: webapi-6580f5c1a2b3c",
                        json!([]),
                    ));
                }
                let items: Vec<Value> = self.orders.values().map(list_view).collect();
                Ok((200, search::run(items, &c, self.default_page_size(), self.config.last_page_repeats)))
            }
            ("GET", ["orders", id]) => {
                let order = id.parse::<i64>().ok().and_then(|id| self.orders.get(&id)).ok_or_else(|| {
                    MagentoError::new(
                        404,
                        "The entity that was requested doesn't exist. Verify the entity and try again.",
                        json!([]),
                    )
                })?;
                Ok((200, order.clone()))
            }
            ("GET", ["customers", "search"]) => {
                let c = criteria()?;
                const FIELDS: &[&str] = &[
                    "entity_id",
                    "id",
                    "email",
                    "firstname",
                    "lastname",
                    "store_id",
                    "website_id",
                    "group_id",
                    "created_at",
                    "updated_at",
                ];
                if let Some(f) = c.groups.iter().flatten().find(|f| !FIELDS.contains(&f.field.as_str())) {
                    return Err(MagentoError::new(400, "Invalid attribute name: %1", json!([f.field])));
                }
                let items: Vec<Value> = self
                    .customers
                    .values()
                    .map(|c| {
                        let mut v = c.to_json();
                        v["entity_id"] = json!(c.id);
                        v
                    })
                    .collect();
                let mut result = search::run(items, &c, self.default_page_size(), self.config.last_page_repeats);
                if let Some(items) = result["items"].as_array_mut() {
                    items.iter_mut().for_each(|i| {
                        i.as_object_mut().map(|o| o.remove("entity_id"));
                    });
                }
                Ok((200, result))
            }
            ("GET", ["customers", id]) => {
                let customer =
                    id.parse::<i64>().ok().and_then(|id| self.customers.get(&id)).ok_or_else(|| no_such_customer(id))?;
                Ok((200, customer.to_json()))
            }
            ("DELETE", ["customers", id]) => {
                // Magento answers `true`; the customer's orders stay (their customer_id is kept).
                let customer =
                    id.parse::<i64>().ok().and_then(|id| self.customers.remove(&id)).ok_or_else(|| no_such_customer(id))?;
                let json = customer.to_json();
                self.notify_customer(&json, true);
                Ok((200, json!(true)))
            }
            ("GET", ["store", "websites"]) => Ok((
                200,
                json!([
                    {"id": 0, "code": "admin", "name": "Admin", "default_group_id": 0},
                    {"id": 1, "code": "base", "name": "Main Website", "default_group_id": 1}
                ]),
            )),
            ("GET", ["store", "storeViews"]) => Ok((
                200,
                json!(STORES.iter().map(|(id, code)| json!({"id": id, "code": code, "name": code, "website_id": 1, "store_group_id": 1, "is_active": 1})).collect::<Vec<_>>()),
            )),
            ("GET", ["products", sku]) => {
                let sku = crate::salesforce::percent_decode(sku);
                let product = self.product_json(&sku).ok_or_else(|| {
                    MagentoError::new(404, "The product that was requested doesn't exist. Verify the product and try again.", json!([]))
                })?;
                Ok((200, product))
            }
            (_, ["customers"]) | (_, []) => Err(MagentoError::new(404, "Request does not match any route.", json!([]))),
            _ => Err(MagentoError::new(404, "Request does not match any route.", json!([]))),
        }
    }

    fn product_json(&self, sku: &str) -> Option<Value> {
        let p = self.catalog.all.get(sku)?;
        let type_id = match p.kind {
            ProductKind::Simple => "simple",
            ProductKind::Configurable { .. } => "configurable",
            ProductKind::Bundle { .. } => "bundle",
        };
        let (qty, status) = self.stock.get(sku).copied().unwrap_or((0.0, 1));
        Some(json!({
            "id": p.id, "sku": p.sku, "name": p.name, "attribute_set_id": 4, "price": p.price, "status": 1,
            "visibility": 4, "type_id": type_id, "weight": 1, "created_at": "2026-01-01 00:00:00", "updated_at": "2026-01-01 00:00:00",
            "extension_attributes": {
                "website_ids": [1],
                "stock_item": {"item_id": p.id, "product_id": p.id, "stock_id": 1, "qty": qty, "is_in_stock": status == 1, "manage_stock": true},
            },
            "product_links": [], "options": [], "media_gallery_entries": [], "tier_prices": [],
            "custom_attributes": [{"attribute_code": "url_key", "value": p.sku.to_lowercase()}],
        }))
    }
}

/// Runs the generator at `rate_per_sec` (read every tick, so the control API can change it)
/// until `shutdown`; simulated time follows the wall clock.
pub async fn run_generator(app: MagentoApp, shutdown: tokio_util::sync::CancellationToken) {
    let tick = std::time::Duration::from_millis(100);
    let mut owed = 0.0f64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.cancelled() => return,
        }
        let mut sim = app.sim.lock().expect("magento lock");
        if sim.rate_per_sec <= 0.0 {
            owed = 0.0;
            continue;
        }
        owed += sim.rate_per_sec * tick.as_secs_f64();
        let due = owed.floor() as usize;
        if due > 0 {
            owed -= due as f64;
            let spacing = (1000.0 / sim.rate_per_sec).max(1.0) as i64;
            sim.generator.config.spacing_ms = spacing;
            let steps = sim.generator.step;
            sim.generator.config.start_ms = now_ms() - steps * spacing;
            sim.generate(due);
        }
    }
}

/// Magento's 404 for a customer id.
fn no_such_customer(id: &str) -> MagentoError {
    MagentoError::new(
        404,
        "No such entity with %fieldName = %fieldValue",
        json!({"fieldName": "customerId", "fieldValue": id}),
    )
}

/// The list endpoint omits some extension attributes the single GET returns (M20).
fn list_view(order: &Value) -> Value {
    let mut v = order.clone();
    if let Some(ext) = v.get_mut("extension_attributes").and_then(Value::as_object_mut) {
        ext.remove("shipping_assignments");
    }
    v
}
