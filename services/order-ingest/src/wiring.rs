//! Production implementations of the push path's seams: Kafka as the publisher, Magento's
//! REST API as the source of full orders.

use std::sync::Arc;
use std::time::Duration;

use elo_events::{CommerceEvent, EventCodec};
use elo_http_client::{HttpClient, HttpClientConfig};
use elo_kafka::Producer;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::push::{OrderSource, PublishError, Publisher};

/// Publishes to `commerce.events`, keyed by customer, and waits for the acknowledgement
/// (bounded, so a dead broker becomes a 503 rather than a hung webhook).
pub struct KafkaPublisher {
    pub producer: Producer,
    pub codec: Arc<EventCodec>,
    pub topic: String,
    pub timeout: Duration,
}

impl Publisher for KafkaPublisher {
    async fn publish(&self, event: &CommerceEvent) -> Result<(), PublishError> {
        let payload = self.codec.encode(&self.topic, event).await.map_err(|e| {
            if e.is_retriable() {
                PublishError::Unavailable(e.to_string())
            } else {
                PublishError::Rejected(e.to_string())
            }
        })?;
        let send =
            self.producer.send(&self.topic, event.customer_key.as_bytes(), &payload, Some(event.event_type.as_str()));
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.is_retriable() => Err(PublishError::Unavailable(e.to_string())),
            Ok(Err(e)) => Err(PublishError::Rejected(e.to_string())),
            Err(_) => Err(PublishError::Unavailable(format!("no acknowledgement within {:?}", self.timeout))),
        }
    }
}

/// Reads full orders from Magento with an admin token (fetched on first use, renewed once on
/// a 401).
pub struct MagentoSource {
    client: HttpClient,
    base_url: String,
    username: String,
    password: String,
    token: Mutex<Option<String>>,
}

impl MagentoSource {
    pub fn new(base_url: String, username: String, password: String) -> Result<Self, elo_http_client::Error> {
        let client = HttpClient::new(HttpClientConfig { max_attempts: 3, ..HttpClientConfig::new("magento") })?;
        Ok(Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            username,
            password,
            token: Mutex::new(None),
        })
    }

    async fn token(&self, renew: bool) -> Result<String, String> {
        let mut token = self.token.lock().await;
        if renew || token.is_none() {
            let url = format!("{}/rest/V1/integration/admin/token", self.base_url);
            let body = json!({"username": self.username, "password": self.password});
            let response = self.client.send(|c| c.post(&url).json(&body)).await.map_err(|e| e.to_string())?;
            let value: Value = response.json().await.map_err(|e| e.to_string())?;
            *token = Some(value.as_str().ok_or("the admin token is not a JSON string")?.to_owned());
        }
        Ok(token.clone().expect("set above"))
    }
}

impl OrderSource for MagentoSource {
    async fn order(&self, entity_id: i64) -> Result<Value, String> {
        let url = format!("{}/rest/V1/orders/{entity_id}", self.base_url);
        for renew in [false, true] {
            let token = self.token(renew).await?;
            match self.client.send(|c| c.get(&url).bearer_auth(&token)).await {
                Ok(response) => return response.json().await.map_err(|e| e.to_string()),
                Err(e) if e.status().map(|s| s.as_u16()) == Some(401) && !renew => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("Magento refused the renewed token".into())
    }
}
