//! The HTTP front: store codes, JSON decoding, faults and dispatch into [`Magento`].

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Magento, MagentoConfig, STORES, generator, signing};
use crate::Counters;
use crate::faults::{FaultDecision, Faults};

/// Shared state of the HTTP front.
#[derive(Clone)]
pub struct MagentoApp {
    pub sim: Arc<Mutex<Magento>>,
    pub faults: Faults,
    pub counters: Counters,
    /// The key Adobe-style webhook signatures are made with.
    pub webhook_key: signing::KeySlot,
}

impl MagentoApp {
    pub fn new(
        config: MagentoConfig,
        generator: generator::GeneratorConfig,
        faults: Faults,
        counters: Counters,
    ) -> Self {
        Self {
            sim: Arc::new(Mutex::new(Magento::new(config, generator))),
            faults,
            counters,
            webhook_key: signing::KeySlot::default(),
        }
    }

    pub fn router(self) -> Router {
        Router::new().fallback(handle).with_state(self)
    }
}

async fn handle(State(app): State<MagentoApp>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let reply = |status: u16, body: Value| {
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            body.to_string(),
        )
            .into_response()
    };
    let label = match segments.as_slice() {
        ["rest", _, "V1", rest @ ..] => {
            let shape: Vec<&str> = rest
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if i > 0 && (s.chars().any(|c| c.is_ascii_digit()) || s.contains('-') && i > 1) {
                        "{id}"
                    } else {
                        s
                    }
                })
                .collect();
            format!("{} /V1/{}", parts.method, shape.join("/"))
        }
        _ => format!("{} other", parts.method),
    };
    app.counters.hit("magento", &label);
    let bytes: Bytes = match axum::body::to_bytes(body, 8 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return reply(413, json!({"message": "Request entity too large"})),
    };
    if let FaultDecision::Fail(status) = app.faults.decide("magento", parts.method.as_str(), &path).await {
        return reply(status, json!({"message": "Service temporarily unavailable (injected fault)"}));
    }
    // `/rest/V1/...` is the default store view; `/rest/<code>/V1/...` names one.
    let (store, rest): (&str, &[&str]) = match segments.as_slice() {
        ["rest", "V1", rest @ ..] => ("default", rest),
        ["rest", store, "V1", rest @ ..] => (store, rest),
        _ => return reply(404, json!({"message": "Request does not match any route."})),
    };
    if !(store == "all" || STORES.iter().any(|(_, code)| *code == store)) {
        return reply(
            400,
            json!({"message": "The store that was requested wasn't found. Verify the store and try again."}),
        );
    }
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) => return reply(400, json!({"message": "Decoding error: \nJSON syntax error", "parameters": []})),
        }
    };
    let mut sim = app.sim.lock().expect("magento lock");
    // The URL the client signed (OAuth 1.0a): the sandbox serves plain HTTP.
    let host = parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("localhost");
    let url = format!("http://{host}{path}");
    match sim.execute(&parts.method, &url, rest, &query, &body, &parts.headers) {
        Ok((status, body)) => reply(status, body),
        Err(e) => reply(e.status, e.body),
    }
}
