//! A counting reverse proxy: put between one service and a sandbox simulator, it counts that
//! service's API calls as the vendor would see them, whatever the service's own counters say
//! (a budget check that compares a limiter with itself cannot fail).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;

/// A running proxy.
#[derive(Clone)]
pub struct CountingProxy {
    /// Where the service should send its calls.
    pub url: String,
    calls: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Call>>>,
    hold: Arc<Mutex<(u64, Duration)>>,
}

/// One API call as the vendor received it.
#[derive(Clone, Debug)]
pub struct Call {
    /// When it arrived at the proxy.
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// The vendor's answer (502: not reached).
    pub status: u16,
}

impl CountingProxy {
    /// API calls forwarded so far (token requests not counted: vendors do not charge them).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Every API call so far (token requests left out), in arrival order.
    pub fn log(&self) -> Vec<Call> {
        self.log.lock().expect("log lock").clone()
    }

    /// The next `calls` API calls are answered `delay` late (counted when they arrive): a slow
    /// vendor, so the caller's later requests queue behind them.
    pub fn hold(&self, calls: u64, delay: Duration) {
        *self.hold.lock().expect("hold lock") = (calls, delay);
    }
}

/// The most calls of `calls` (arrival times) that fall in any rolling `window`.
pub fn max_in_window(calls: &[Instant], window: Duration) -> usize {
    let mut times = calls.to_vec();
    times.sort();
    let mut start = 0;
    let mut most = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= window {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

#[derive(Clone)]
struct Upstream {
    base: String,
    own: String,
    client: reqwest::Client,
    calls: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Call>>>,
    hold: Arc<Mutex<(u64, Duration)>>,
}

/// Starts a proxy to `upstream` (a base URL). The upstream's own URL in response bodies is
/// rewritten to the proxy's (Salesforce's token answer names the instance URL the client
/// calls next), so every later call comes through the proxy too.
pub async fn counting_proxy(upstream: &str) -> CountingProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let calls = Arc::new(AtomicU64::new(0));
    let log = Arc::new(Mutex::new(Vec::new()));
    let hold = Arc::new(Mutex::new((0, Duration::ZERO)));
    let state = Upstream {
        base: upstream.trim_end_matches('/').to_owned(),
        own: url.clone(),
        client: reqwest::Client::new(),
        calls: calls.clone(),
        log: log.clone(),
        hold: hold.clone(),
    };
    let router = axum::Router::new().fallback(forward).with_state(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    CountingProxy { url, calls, log, hold }
}

async fn forward(State(up): State<Upstream>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let at = Instant::now();
    let counted = !parts.uri.path().contains("token");
    let mut delay = Duration::ZERO;
    if counted {
        up.calls.fetch_add(1, Ordering::SeqCst);
        let mut hold = up.hold.lock().expect("hold lock");
        if hold.0 > 0 {
            hold.0 -= 1;
            delay = hold.1;
        }
    }
    let method = parts.method.to_string();
    let response = forward_to(&up, parts, body, &path, delay).await;
    if counted {
        let status = response.status().as_u16();
        up.log.lock().expect("log lock").push(Call { at, method, path, status });
    }
    response
}

async fn forward_to(
    up: &Upstream,
    parts: axum::http::request::Parts,
    body: Body,
    path: &str,
    delay: Duration,
) -> Response {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let bytes = axum::body::to_bytes(body, 64 * 1024 * 1024).await.unwrap_or_default();
    let mut out = up.client.request(parts.method, format!("{}{path}", up.base)).body(bytes);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            out = out.header(name, value);
        }
    }
    let answer = match out.send().await {
        Ok(a) => a,
        Err(error) => return Response::builder().status(502).body(Body::from(error.to_string())).expect("response"),
    };
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if name != "content-length" && name != "transfer-encoding" {
            response = response.header(name, value);
        }
    }
    let body = answer.bytes().await.unwrap_or_default();
    let body = match std::str::from_utf8(&body) {
        Ok(text) if text.contains(&up.base) => Body::from(text.replace(&up.base, &up.own)),
        _ => Body::from(body),
    };
    response.body(body).expect("response")
}
