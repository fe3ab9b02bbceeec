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

use tokio::sync::watch;

use crate::flow::{FlowSnapshot, FlowSources, Observed};
use crate::report::render::{self, Format};
use crate::report::runner::{Answer, DailySource, ReportRunner};
use crate::status::StatusReceiver;

/// How often the flow page refreshes itself.
const REFRESH_MS: u32 = 3000;
/// How often the background task asks the services and the broker for the diagram's figures
/// while someone watches (several open pages cost one round per interval, whatever their
/// number); a round that takes longer is abandoned.
const FLOW_REFRESH: Duration = Duration::from_secs(1);
const FLOW_DEADLINE: Duration = Duration::from_secs(5);
/// Nobody asked for this long: the refreshes pause.
const FLOW_IDLE: Duration = Duration::from_secs(30);
/// A first request waits this long for the first round, then gets what is known.
const FLOW_FIRST_WAIT: Duration = Duration::from_secs(1);
/// How long a report request waits for the report before being told to reload (the build
/// goes on: the reload gets it).
const REPORT_WAIT: Duration = Duration::from_secs(60);

pub struct OpsState {
    source: Arc<dyn DailySource>,
    report: Arc<ReportRunner>,
    flow: Arc<FlowSources>,
    pub status: StatusReceiver,
    pub commerce_topic: String,
    served: AtomicU64,
    /// The latest observation, published by the refresher (started by the first request).
    observed: tokio::sync::OnceCell<watch::Receiver<Option<Observed>>>,
    /// When the diagram was last asked for.
    last_asked: Arc<std::sync::Mutex<Instant>>,
}

impl OpsState {
    pub fn new(report: impl DailySource, flow: FlowSources, status: StatusReceiver, commerce_topic: String) -> Self {
        let source: Arc<dyn DailySource> = Arc::new(report);
        Self {
            report: ReportRunner::new(source.clone(), REPORT_WAIT),
            source,
            flow: Arc::new(flow),
            status,
            commerce_topic,
            served: AtomicU64::new(0),
            observed: tokio::sync::OnceCell::new(),
            last_asked: Arc::new(std::sync::Mutex::new(Instant::now())),
        }
    }

    /// How long a report request waits before being told to reload.
    pub fn with_report_wait(mut self, wait: Duration) -> Self {
        self.report = ReportRunner::new(self.source.clone(), wait);
        self
    }

    /// The diagram from the latest observation; never waits on the services (beyond a
    /// first request's short wait for the first round).
    async fn flow(&self) -> FlowSnapshot {
        *self.last_asked.lock().expect("flow clock") = Instant::now();
        let mut rx = self.observed.get_or_init(|| async { self.start_refresher() }).await.clone();
        if rx.borrow().is_none() {
            let _ = tokio::time::timeout(FLOW_FIRST_WAIT, rx.wait_for(Option::is_some)).await;
        }
        let mut observed = rx.borrow().clone().unwrap_or_default();
        observed.reports_served = self.served.load(Ordering::Relaxed);
        let status = self.status.borrow().clone();
        crate::flow::snapshot(&observed, &status, &self.commerce_topic, crate::ops::now_ms())
    }

    /// One task refreshes the figures while someone watches; it ends with the process.
    fn start_refresher(&self) -> watch::Receiver<Option<Observed>> {
        let (tx, rx) = watch::channel(None);
        let (flow, last_asked) = (self.flow.clone(), self.last_asked.clone());
        tokio::spawn(async move {
            loop {
                let idle = last_asked.lock().expect("flow clock").elapsed() > FLOW_IDLE;
                if !idle {
                    match tokio::time::timeout(FLOW_DEADLINE, flow.observe()).await {
                        Ok(observed) => {
                            tx.send_replace(Some(observed));
                        }
                        Err(_) => tracing::warn!("the flow figures took too long to gather; showing the previous ones"),
                    }
                }
                tokio::time::sleep(FLOW_REFRESH).await;
            }
        });
        rx
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

/// Limits of the listener (the same as order-ingest's push listener): it may be exposed to
/// people's browsers, so a slow or greedy client must not hold it.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// Time allowed to send a request's headers (and to stay idle between keep-alive requests).
    pub header_read_timeout: Duration,
    /// Time allowed for a whole request (a report waits at most [`REPORT_WAIT`] inside it).
    pub request_timeout: Duration,
    /// Connections served at once; more are shed with a 503.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: REPORT_WAIT + Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

const SHED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Whether the listener is serving (1) or could not start (0).
pub static LISTENER_UP: std::sync::LazyLock<prometheus::IntGauge> = std::sync::LazyLock::new(|| {
    prometheus::register_int_gauge!(
        "reconciler_http_listener_up",
        "1 while the reports and flow-diagram listener serves, 0 when it could not start."
    )
    .expect("metric registers once")
});

/// Whether `error` is the listen address being taken (the only start-up error that
/// `--http-optional` tolerates).
pub fn is_address_in_use(error: &anyhow::Error) -> bool {
    error.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse))
}

/// Binds `addr` and serves until the task is aborted (the process ends).
pub async fn serve(
    addr: SocketAddr,
    state: Arc<OpsState>,
    limits: ListenerLimits,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::Error::new(e).context(format!("cannot listen on {addr} for reports and the flow diagram"))
    })?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(listener, router(state), limits));
    tracing::info!(%bound, report = %format!("http://{bound}/report"), flow = %format!("http://{bound}/flow"), "reports and flow diagram listening");
    Ok((bound, task))
}

/// axum's router behind an accept loop with a header-read timeout, a request timeout and a
/// connection cap (past it, a new connection gets an immediate 503).
async fn accept_loop(listener: tokio::net::TcpListener, app: Router, limits: ListenerLimits) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let timeout = limits.request_timeout;
    let app = app.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            match tokio::time::timeout(timeout, next.run(request)).await {
                Ok(response) => response,
                Err(_) => (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], "request took too long\n")
                    .into_response(),
            }
        },
    ));
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let _ = stream.try_write(SHED);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "reports connection ended");
            }
            drop(permit);
        });
    }
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
    let date = q.date.unwrap_or_else(|| elo_events::time::date_of_ms(crate::ops::now_ms()));
    if crate::dlq::parse_date(&date).is_none() {
        return (StatusCode::BAD_REQUEST, format!("invalid date {date:?}: use YYYY-MM-DD\n")).into_response();
    }
    let format = q.format.unwrap_or(Format::Html);
    let today = elo_events::time::date_of_ms(crate::ops::now_ms());
    let status = state.status.borrow().clone();
    let retry = |text: String| (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], text).into_response();
    match state.report.get(&date, &today, &status).await {
        Answer::Ready(report) => {
            state.served.fetch_add(1, Ordering::Relaxed);
            ([(header::CONTENT_TYPE, format.content_type())], render::render(&report, format)).into_response()
        }
        Answer::Busy(other) => retry(format!("the report of {other} is being built; one at a time: retry shortly\n")),
        Answer::Building => retry(format!("the report of {date} is still being built: reload shortly\n")),
        Answer::Failed(error) => {
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

/// Names the commerce topic this reconciler reads, so `reconciler report` can tell whether
/// the process answering is the one of its own deployment.
pub const TOPIC_HEADER: &str = "x-elo-commerce-topic";

async fn status_api(State(state): State<Arc<OpsState>>) -> Response {
    let status = state.status.borrow().clone();
    ([(TOPIC_HEADER, state.commerce_topic.clone())], axum::Json(status)).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use clap::Parser;
    use tower::ServiceExt;

    use super::*;
    use crate::report::collect::ReportSources;

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

    fn state() -> Arc<OpsState> {
        let config = crate::Config::parse_from(["reconciler", "--kafka-brokers", "127.0.0.1:1"]);
        let codec = Arc::new(elo_events::EventCodec::new(&config.common.registry.config().unwrap()).unwrap());
        let report = ReportSources::new(&config.common, &config.ops, codec).unwrap();
        let flow = FlowSources::new(&config.common.kafka, &config.ops, &config.common.topics, "g").unwrap();
        Arc::new(OpsState::new(report, flow, crate::status::channel().1, "commerce.events".into()))
    }

    #[tokio::test]
    async fn a_slow_client_is_cut_off_and_connections_past_the_cap_are_shed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = ListenerLimits {
            header_read_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(5),
            max_connections: 1,
        };
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), state(), limits).await.unwrap();
        // A client that never finishes its headers holds the only slot until the timeout.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut shed = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), shed.read_to_end(&mut answer)).await;
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 503"), "{:?}", String::from_utf8_lossy(&answer));
        let started = Instant::now();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest)).await;
        assert!(started.elapsed() < Duration::from_secs(2), "the slow client was cut off: {:?}", started.elapsed());
        task.abort();
    }

    #[tokio::test]
    async fn only_a_taken_address_counts_as_address_in_use() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let error = serve(taken.local_addr().unwrap(), state(), ListenerLimits::default()).await.unwrap_err();
        assert!(is_address_in_use(&error), "{error:#}");
        assert!(!is_address_in_use(&anyhow::anyhow!("invalid registry url")));
    }

    #[tokio::test]
    async fn the_flow_answers_at_once_whatever_the_broker_and_services_do() {
        // Nothing answers: no broker at 127.0.0.1:1, no service admin ports.
        let app = router(state());
        for round in 0..3 {
            let started = Instant::now();
            let requests = (0..5).map(|_| get(app.clone(), "/api/flow"));
            for (status, body) in futures::future::join_all(requests).await {
                assert_eq!(status, StatusCode::OK, "{body}");
                let snapshot: FlowSnapshot = serde_json::from_str(&body).unwrap();
                assert_eq!(snapshot.steps.len(), 6);
            }
            let took = started.elapsed();
            assert!(took < Duration::from_millis(1800), "round {round}: 5 requests took {took:?}");
        }
    }

    /// Builds reports like the real source does: on a blocking thread that goes on when the
    /// request is gone. Counts how many run at once.
    struct SlowSource {
        running: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
        builds: Arc<AtomicU64>,
    }

    impl DailySource for SlowSource {
        fn build(
            &self,
            date: String,
            _status: crate::status::LedgerStatus,
        ) -> crate::report::runner::BoxFuture<'_, anyhow::Result<crate::report::DailyReport>> {
            let (running, most, builds) = (self.running.clone(), self.most.clone(), self.builds.clone());
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    builds.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(crate::report::DailyReport { date, order_events: 5, ..Default::default() })
                })
                .await?
            })
        }
    }

    #[tokio::test]
    async fn one_report_runs_at_a_time_even_when_requests_give_up() {
        let config = crate::Config::parse_from(["reconciler", "--kafka-brokers", "127.0.0.1:1"]);
        let flow = FlowSources::new(&config.common.kafka, &config.ops, &config.common.topics, "g").unwrap();
        let (_tx, rx) = crate::status::channel();
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let builds = Arc::new(AtomicU64::new(0));
        let source = SlowSource { running: Default::default(), most: most.clone(), builds: builds.clone() };
        let state = OpsState::new(source, flow, rx, "commerce.events".into()).with_report_wait(Duration::from_secs(5));
        let app = router(Arc::new(state));
        // Reloads that give up after 50 ms, for the same day and for others.
        for uri in [
            "/report?date=2026-11-01&format=json",
            "/report?date=2026-11-01&format=json",
            "/report?date=2026-11-02&format=json",
            "/report?date=2026-11-03&format=json",
            "/report?date=2026-11-01&format=json",
        ] {
            let request = Request::get(uri).body(Body::empty()).unwrap();
            let _ = tokio::time::timeout(Duration::from_millis(50), app.clone().oneshot(request)).await;
        }
        // The build that the first request started finishes and is shared, then cached.
        let (status, body) = get(app.clone(), "/report?date=2026-11-01&format=json").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(serde_json::from_str::<crate::report::DailyReport>(&body).unwrap().order_events, 5);
        let (status, _) = get(app.clone(), "/report?date=2026-11-01&format=json").await;
        assert_eq!(status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(most.load(Ordering::SeqCst), 1, "reports built at the same time");
        assert_eq!(builds.load(Ordering::SeqCst), 1, "one build of 2026-11-01, shared and cached; other days refused");
    }
}
