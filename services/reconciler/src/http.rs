//! The reconciler's operator listener: `/report`, `/flow`, `/api/flow`, `/api/status`.
//! Separate from the admin port (probes and metrics) so it can be exposed to people without
//! exposing those, and so a slow report never delays a probe.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::flow::{FlowSnapshot, FlowSources};
use crate::report::collect::ReportSources;
use crate::report::render::{self, Format};
use crate::status::StatusReceiver;

/// How often the flow page refreshes itself.
const REFRESH_MS: u32 = 3000;
/// Figures younger than this are served again rather than asked for again (several open
/// pages cost the services one round of questions per second at most).
const FLOW_CACHE: Duration = Duration::from_secs(1);

pub struct OpsState {
    pub report: ReportSources,
    pub flow: FlowSources,
    pub status: StatusReceiver,
    pub commerce_topic: String,
    served: AtomicU64,
    cache: tokio::sync::Mutex<Option<(Instant, FlowSnapshot)>>,
    /// One report at a time: each reads a day of several topics, and a page reloaded many
    /// times must not multiply that load on the brokers.
    report_lock: tokio::sync::Mutex<()>,
}

impl OpsState {
    pub fn new(report: ReportSources, flow: FlowSources, status: StatusReceiver, commerce_topic: String) -> Self {
        Self {
            report,
            flow,
            status,
            commerce_topic,
            served: AtomicU64::new(0),
            cache: tokio::sync::Mutex::new(None),
            report_lock: tokio::sync::Mutex::new(()),
        }
    }

    async fn flow(&self) -> FlowSnapshot {
        let mut cache = self.cache.lock().await;
        if let Some((at, snapshot)) = cache.as_ref()
            && at.elapsed() < FLOW_CACHE
        {
            return snapshot.clone();
        }
        let mut observed = self.flow.observe().await;
        observed.reports_served = self.served.load(Ordering::Relaxed);
        let status = self.status.borrow().clone();
        let snapshot = crate::flow::snapshot(&observed, &status, &self.commerce_topic, crate::dlq::cli::now_ms());
        *cache = Some((Instant::now(), snapshot.clone()));
        snapshot
    }
}

pub fn router(state: Arc<OpsState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/report", get(report))
        .route("/flow", get(flow_page))
        .route("/api/flow", get(flow_api))
        .route("/api/status", get(status_api))
        .with_state(state)
}

/// Binds `addr` and serves until the task is aborted (the process ends).
pub async fn serve(
    addr: SocketAddr,
    state: Arc<OpsState>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for reports and the flow diagram: {e}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router(state)).await {
            tracing::error!(error = %error, "reports listener failed");
        }
    });
    tracing::info!(%bound, report = %format!("http://{bound}/report"), flow = %format!("http://{bound}/flow"), "reports and flow diagram listening");
    Ok((bound, task))
}

async fn index() -> Html<&'static str> {
    Html(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Elo reconciler</title><link rel="icon" href="data:,"></head><body><h1>Elo reconciler</h1><ul><li><a href="/flow">Live flow diagram</a></li><li><a href="/report">Today's report</a> (<code>/report?date=YYYY-MM-DD&amp;format=html|json|csv</code>)</li><li><a href="/api/flow">/api/flow</a></li><li><a href="/api/status">/api/status</a></li></ul></body></html>"#,
    )
}

#[derive(serde::Deserialize)]
struct ReportQuery {
    date: Option<String>,
    format: Option<Format>,
}

async fn report(State(state): State<Arc<OpsState>>, Query(q): Query<ReportQuery>) -> Response {
    let date = q.date.unwrap_or_else(|| elo_events::time::date_of_ms(crate::dlq::cli::now_ms()));
    if crate::dlq::parse_date(&date).is_none() {
        return (StatusCode::BAD_REQUEST, format!("invalid date {date:?}: use YYYY-MM-DD\n")).into_response();
    }
    let format = q.format.unwrap_or(Format::Html);
    let _one_at_a_time = state.report_lock.lock().await;
    let status = state.status.borrow().clone();
    match state.report.daily(&date, &status).await {
        Ok(report) => {
            state.served.fetch_add(1, Ordering::Relaxed);
            ([(header::CONTENT_TYPE, format.content_type())], render::render(&report, format)).into_response()
        }
        Err(error) => {
            tracing::error!(error = %error, date, "report failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("cannot build the report: {error}\n")).into_response()
        }
    }
}

async fn flow_page(State(state): State<Arc<OpsState>>) -> Html<String> {
    Html(crate::flow::page::html(&state.flow().await, REFRESH_MS))
}

#[derive(serde::Deserialize)]
struct FlowQuery {
    format: Option<String>,
}

async fn flow_api(State(state): State<Arc<OpsState>>, Query(q): Query<FlowQuery>) -> Response {
    let snapshot = state.flow().await;
    if q.format.as_deref() == Some("line") {
        return format!("{}\n", snapshot.line()).into_response();
    }
    axum::Json(snapshot).into_response()
}

async fn status_api(State(state): State<Arc<OpsState>>) -> Response {
    let status = state.status.borrow().clone();
    axum::Json(status).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use clap::Parser;
    use tower::ServiceExt;

    use super::*;

    /// The listener's routes with no broker behind them (requests that need none).
    fn app() -> (Router, crate::status::StatusSender) {
        let config = crate::Config::parse_from(["reconciler", "--kafka-brokers", "127.0.0.1:1"]);
        let codec = Arc::new(elo_events::EventCodec::new(&config.common.registry.config().unwrap()).unwrap());
        let report = ReportSources::new(&config.common, &config.ops, codec).unwrap();
        let flow = FlowSources::new(&config.common.kafka, &config.ops, &config.common.topics, "g").unwrap();
        let (tx, rx) = crate::status::channel();
        (router(Arc::new(OpsState::new(report, flow, rx, "commerce.events".into()))), tx)
    }

    async fn get(app: Router, uri: &str) -> (StatusCode, String) {
        let response = app.oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_bad_date_is_refused_and_the_ledger_status_is_served_as_published() {
        let (app, tx) = app();
        let (status, body) = get(app.clone(), "/report?date=2026-02-30").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (status, body) = get(app.clone(), "/api/status").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(serde_json::from_str::<crate::status::LedgerStatus>(&body).unwrap(), Default::default());
        tx.send_replace(crate::status::LedgerStatus { orders: 7, ..Default::default() });
        let (_, body) = get(app.clone(), "/api/status").await;
        assert_eq!(serde_json::from_str::<crate::status::LedgerStatus>(&body).unwrap().orders, 7);
        let (status, body) = get(app, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("/flow") && body.contains("/report"));
    }
}
