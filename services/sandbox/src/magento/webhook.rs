//! Outbound order notifications, as a Magento store with an eventing module sends them:
//! at-least-once (retried with backoff until the receiver answers 2xx, sometimes delivered
//! twice on purpose), signed with HMAC-SHA256 so the receiver can verify origin and age.
//!
//! Signature header: `x-elo-webhook-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>`; the timestamp inside the signed text lets the receiver refuse replays. With
//! `"signature": "adobe-rsa"`, signed as Adobe Commerce Webhooks sign instead ([`super::signing`]).

use std::collections::VecDeque;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use super::MagentoApp;
use super::signing::ADOBE_SIGNATURE_HEADER;
use crate::now_ms;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-elo-webhook-signature";
/// Header carrying the notification id (stable across redeliveries).
pub const EVENT_ID_HEADER: &str = "x-elo-webhook-id";

/// Payload style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStyle {
    /// Adobe I/O Events CloudEvents envelope with a partial order in `data.value`: the
    /// receiver must fetch the full order.
    CloudEvents,
    /// A plain JSON body with the full order.
    Plain,
}

/// How deliveries are signed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SignatureScheme {
    /// `x-elo-webhook-signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
    #[default]
    #[serde(rename = "hmac")]
    Hmac,
    /// Adobe Commerce Webhooks: base64 RSA-SHA256 over the body in
    /// `x-adobe-commerce-webhook-signature`, verified with the store's public key.
    #[serde(rename = "adobe-rsa")]
    AdobeRsa,
}

/// Where and how notifications go.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WebhookConfig {
    /// Receiver of order notifications.
    pub url: Option<String>,
    /// Receiver of customer notifications (saved, deleted); none are sent without it.
    #[serde(default)]
    pub customer_url: Option<String>,
    pub secret: String,
    /// Probability (0..1) that a delivered notification is delivered once more.
    pub duplicate_rate: f64,
    pub style: WebhookStyle,
    /// Cap of the exponential retry backoff, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: i64,
}

/// The control API's webhook settings: the config plus the signature scheme. The scheme is
/// kept beside [`WebhookConfig`] (in `Magento::webhook_signature`) so code that builds a
/// `WebhookConfig` literal keeps compiling.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct WebhookSettings {
    #[serde(flatten)]
    pub config: WebhookConfig,
    /// `"hmac"` (default) or `"adobe-rsa"`.
    #[serde(default)]
    pub signature: SignatureScheme,
    /// Probability (0..1) that a notification is lost: never sent, not even retried.
    #[serde(default)]
    pub drop_rate: f64,
}

fn default_max_backoff_ms() -> i64 {
    60_000
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: None,
            customer_url: None,
            secret: "elo-sandbox-webhook-secret".into(),
            duplicate_rate: 0.05,
            style: WebhookStyle::CloudEvents,
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

/// One notification waiting for delivery.
#[derive(Clone, Debug)]
pub struct Notification {
    pub id: String,
    /// Goes to `customer_url` rather than `url`.
    pub about_customer: bool,
    pub body: Vec<u8>,
    pub attempts: u32,
    pub not_before_ms: i64,
}

/// The outbox and its counters.
#[derive(Debug, Default)]
pub struct Outbox {
    pub queue: VecDeque<Notification>,
    pub delivered: u64,
    pub duplicates_sent: u64,
    pub failed_attempts: u64,
    /// Notifications lost on purpose (`drop_rate`), and the orders whose were.
    pub dropped: u64,
    pub dropped_orders: Vec<i64>,
}

/// Signs `body` at time `t` (unix seconds) with `secret`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("t={t},v1={}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// A Magento UTC timestamp (`YYYY-MM-DD HH:MM:SS`) as the RFC 3339 CloudEvents `time` wants.
fn rfc3339(magento_ts: &str) -> String {
    format!("{}Z", magento_ts.replace(' ', "T"))
}

/// Builds the notification for an order's current version.
pub fn notification(config: &WebhookConfig, order: &Value) -> Notification {
    let id =
        format!("order-{}-{}", order["entity_id"], order["updated_at"].as_str().unwrap_or_default().replace(' ', "T"));
    let body = match config.style {
        WebhookStyle::CloudEvents => json!({
            "specversion": "1.0",
            "id": id,
            "source": "urn:magento:sandbox",
            "type": "com.adobe.commerce.observer.sales_order_save_after",
            "datacontenttype": "application/json",
            "time": order["updated_at"].as_str().map(rfc3339),
            "data": {"value": {
                "entity_id": order["entity_id"], "increment_id": order["increment_id"], "state": order["state"],
                "status": order["status"], "store_id": order["store_id"], "customer_id": order["customer_id"],
                "updated_at": order["updated_at"],
            }},
        }),
        WebhookStyle::Plain => json!({"event": "sales_order_save_after", "id": id, "order": order}),
    };
    Notification { id, about_customer: false, body: body.to_string().into_bytes(), attempts: 0, not_before_ms: 0 }
}

/// Builds the notification for a customer saved (`deleted: false`) or deleted. A deletion
/// carries the e-mail, since the record can no longer be fetched.
pub fn customer_notification(config: &WebhookConfig, customer: &Value, deleted: bool, now_ms: i64) -> Notification {
    let event = if deleted { "customer_delete_after" } else { "customer_save_after" };
    let id =
        format!("{event}-{}-{}", customer["id"], customer["updated_at"].as_str().unwrap_or_default().replace(' ', "T"));
    let summary = json!({"id": customer["id"], "email": customer["email"], "store_id": customer["store_id"], "updated_at": customer["updated_at"]});
    let body = match config.style {
        WebhookStyle::CloudEvents => json!({
            "specversion": "1.0",
            "id": id,
            "source": "urn:magento:sandbox",
            "type": format!("com.adobe.commerce.observer.{event}"),
            "datacontenttype": "application/json",
            "time": rfc3339(&crate::magento::fmt_ts(now_ms)),
            "data": {"value": summary},
        }),
        WebhookStyle::Plain => {
            json!({"event": event, "id": id, "customer": if deleted { summary } else { customer.clone() }})
        }
    };
    Notification { id, about_customer: true, body: body.to_string().into_bytes(), attempts: 0, not_before_ms: 0 }
}

/// Delivers the outbox until `shutdown`: up to 16 notifications at a time, failures retried
/// with exponential backoff (capped at `max_backoff_ms`, 60 s by default), never dropped.
pub async fn dispatch(app: MagentoApp, shutdown: CancellationToken) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("http client");
    loop {
        let (config, scheme, due) = {
            let mut sim = app.sim.lock().expect("magento lock");
            let (config, scheme) = (sim.webhook.clone(), sim.webhook_signature);
            let now = now_ms();
            let mut due = Vec::new();
            let mut keep = VecDeque::new();
            while let Some(n) = sim.outbox.queue.pop_front() {
                let has_url = if n.about_customer { config.customer_url.is_some() } else { config.url.is_some() };
                if has_url && due.len() < 16 && n.not_before_ms <= now { due.push(n) } else { keep.push_back(n) }
            }
            sim.outbox.queue = keep;
            (config, scheme, due)
        };
        if due.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                _ = shutdown.cancelled() => return,
            }
        }
        let sends = due.into_iter().map(|n| {
            let url = if n.about_customer { config.customer_url.clone() } else { config.url.clone() };
            let url = url.expect("checked above");
            let (client, secret, key) = (client.clone(), config.secret.clone(), app.webhook_key.clone());
            async move {
                let (header, signature) = match scheme {
                    SignatureScheme::Hmac => (SIGNATURE_HEADER, sign(&secret, now_ms() / 1000, &n.body)),
                    SignatureScheme::AdobeRsa => (ADOBE_SIGNATURE_HEADER, key.get().sign(&n.body)),
                };
                let result = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header(header, signature)
                    .header(EVENT_ID_HEADER, &n.id)
                    .body(n.body.clone())
                    .send()
                    .await;
                let ok = matches!(&result, Ok(r) if r.status().is_success());
                (n, ok)
            }
        });
        let results = futures::future::join_all(sends).await;
        let mut sim = app.sim.lock().expect("magento lock");
        for (mut n, ok) in results {
            if ok {
                sim.outbox.delivered += 1;
                if n.attempts < u32::MAX && rand::random::<f64>() < config.duplicate_rate {
                    // At-least-once in practice: the same notification again, same id.
                    sim.outbox.duplicates_sent += 1;
                    n.attempts = u32::MAX;
                    n.not_before_ms = now_ms() + 200;
                    sim.outbox.queue.push_back(n);
                }
            } else {
                sim.outbox.failed_attempts += 1;
                n.attempts = n.attempts.saturating_add(1).min(u32::MAX - 1);
                n.not_before_ms = now_ms() + (250i64 << n.attempts.min(8)).min(config.max_backoff_ms.max(1));
                sim.outbox.queue.push_back(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_and_body() {
        // RFC 4231 test case 2 shape: key "Jefe"; message "1.what do ya want for nothing?".
        let sig = sign("Jefe", 1, b"what do ya want for nothing?");
        assert!(sig.starts_with("t=1,v1="));
        assert_eq!(sig.len(), "t=1,v1=".len() + 64);
        assert_ne!(sign("Jefe", 2, b"what do ya want for nothing?"), sig, "the timestamp is signed");
        assert_ne!(sign("jefe", 1, b"what do ya want for nothing?"), sig, "the secret matters");
    }
}
