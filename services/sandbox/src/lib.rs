//! Elo's sandbox: local simulators of the SaaS APIs Elo integrates, faithful to the real ones
//! (paths, auth, status codes, error bodies, paging, limits) as documented in
//! `../shared/docs/saas-apis.md`, so Elo can be developed and tested without accounts and
//! fail here the way it would fail in production.
//!
//! # Layout
//! - [`salesforce`]: Salesforce REST (OAuth, sObjects, Collections, Composite, Graph, SOQL).
//! - [`magento`]: Magento 2 REST (tokens, searchCriteria, orders, customers, MSI) and the
//!   seeded order generator.
//! - [`rdstation`]: RD Station Marketing (OAuth, contacts, tags, funnels, events, segmentations).
//! - [`faults`]: latency, error rates and outage windows per simulator and per endpoint.
//!
//! Data the simulators load at start (embedded, overridable by a file) lives in `data/`: the
//! Salesforce org schema, RD Station's event payload schema and seeded contact fields.
//! - [`persist`]: optional state file, so a restart keeps every simulator's data.
//! - [`control`]: the control and inspection API (faults, token revocation, quota, state,
//!   per-endpoint call counters).

pub mod control;
pub mod faults;
pub mod magento;
pub mod persist;
pub mod rdstation;
pub mod salesforce;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// Per-endpoint call counters of every simulator, for tests and reports.
#[derive(Clone, Default)]
pub struct Counters {
    inner: Arc<Mutex<BTreeMap<(String, String), u64>>>,
}

impl Counters {
    pub fn hit(&self, simulator: &str, endpoint: &str) {
        *self.inner.lock().expect("counters lock").entry((simulator.to_owned(), endpoint.to_owned())).or_default() += 1;
    }

    /// `{simulator: {endpoint: count}}`.
    pub fn snapshot(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for ((sim, endpoint), n) in self.inner.lock().expect("counters lock").iter() {
            out.entry(sim.clone()).or_insert_with(|| serde_json::json!({}))[endpoint] = serde_json::json!(n);
        }
        serde_json::Value::Object(out)
    }

    pub fn reset(&self) {
        self.inner.lock().expect("counters lock").clear();
    }
}

/// An HTTP response from a simulator's status, JSON body (or none) and extra headers.
pub fn json_response(
    status: u16,
    body: Option<&serde_json::Value>,
    content_type: &str,
    headers: Vec<(String, String)>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = match body {
        Some(body) => {
            (status, [(axum::http::header::CONTENT_TYPE, content_type.to_owned())], body.to_string()).into_response()
        }
        None => status.into_response(),
    };
    for (k, v) in headers {
        if let (Ok(name), Ok(value)) = (axum::http::HeaderName::try_from(k), axum::http::HeaderValue::try_from(v)) {
            out.headers_mut().insert(name, value);
        }
    }
    out
}
