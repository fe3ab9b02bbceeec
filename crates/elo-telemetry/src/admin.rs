//! Admin HTTP server on its own port: Prometheus metrics and health probes.
//!
//! Readiness means "this instance can do its job with Kafka" (producer connected, partitions
//! assigned, broker credentials accepted), never the state of external SaaS APIs: a Salesforce
//! outage must not make Kubernetes restart healthy pods.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// One component's condition.
#[derive(Clone, Debug, serde::Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

/// Readiness and liveness of one process, shared by its components.
///
/// Each component registers a named readiness check and flips it as its condition changes;
/// `/health/readyz` is 200 only when every check is ok. Liveness fails only when a component
/// declares itself wedged, which is what a restart can fix.
#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<Mutex<HealthInner>>,
}

#[derive(Debug, Default)]
struct HealthInner {
    ready: BTreeMap<&'static str, Check>,
    live: BTreeMap<&'static str, Check>,
}

impl Health {
    /// A fresh state with no checks (ready and live).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a readiness check.
    pub fn set_ready(&self, component: &'static str, ok: bool, detail: impl Into<String>) {
        let mut inner = self.inner.lock().expect("health lock poisoned");
        inner.ready.insert(component, Check { ok, detail: detail.into() });
    }

    /// Sets a liveness check.
    pub fn set_live(&self, component: &'static str, ok: bool, detail: impl Into<String>) {
        let mut inner = self.inner.lock().expect("health lock poisoned");
        inner.live.insert(component, Check { ok, detail: detail.into() });
    }

    /// Whether every readiness check passes.
    pub fn is_ready(&self) -> bool {
        self.inner.lock().expect("health lock poisoned").ready.values().all(|c| c.ok)
    }

    /// Whether every liveness check passes.
    pub fn is_live(&self) -> bool {
        self.inner.lock().expect("health lock poisoned").live.values().all(|c| c.ok)
    }

    fn report(&self, live: bool) -> (bool, serde_json::Value) {
        let inner = self.inner.lock().expect("health lock poisoned");
        let checks = if live { &inner.live } else { &inner.ready };
        let ok = checks.values().all(|c| c.ok);
        (ok, serde_json::json!({ "status": if ok { "ok" } else { "unavailable" }, "checks": checks }))
    }
}

/// The admin router: `/metrics`, `/health/livez`, `/health/readyz`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health/livez", get(|State(h): State<Health>| async move { probe(&h, true) }))
        .route("/health/readyz", get(|State(h): State<Health>| async move { probe(&h, false) }))
        .with_state(health)
}

fn probe(health: &Health, live: bool) -> impl IntoResponse + use<> {
    let (ok, body) = health.report(live);
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body))
}

async fn metrics() -> impl IntoResponse {
    let families = prometheus::gather();
    let mut buffer = Vec::new();
    match TextEncoder::new().encode(&families, &mut buffer) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, TextEncoder::new().format_type().to_owned())], buffer),
        Err(error) => {
            tracing::error!(error = %error, "metrics encoding failed");
            (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain".to_owned())], Vec::new())
        }
    }
}

/// Binds the admin server and serves it until `shutdown` is cancelled. Returns the bound
/// address (useful with port 0 in tests) and the server task.
pub async fn serve_admin(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, router(health)).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(error) = server.await {
            tracing::error!(error = %error, "admin server failed");
        }
    });
    tracing::info!(%bound, "admin server listening");
    Ok((bound, task))
}
