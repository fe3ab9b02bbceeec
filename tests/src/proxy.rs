//! A counting reverse proxy: put between one service and a sandbox simulator, it counts that
//! service's API calls as the vendor would see them, whatever the service's own counters say
//! (a budget check that compares a limiter with itself cannot fail).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;

/// A running proxy.
#[derive(Clone)]
pub struct CountingProxy {
    /// Where the service should send its calls.
    pub url: String,
    calls: Arc<AtomicU64>,
}

impl CountingProxy {
    /// API calls forwarded so far (token requests not counted: vendors do not charge them).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Upstream {
    base: String,
    own: String,
    client: reqwest::Client,
    calls: Arc<AtomicU64>,
}

/// Starts a proxy to `upstream` (a base URL). The upstream's own URL in response bodies is
/// rewritten to the proxy's (Salesforce's token answer names the instance URL the client
/// calls next), so every later call comes through the proxy too.
pub async fn counting_proxy(upstream: &str) -> CountingProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let calls = Arc::new(AtomicU64::new(0));
    let state = Upstream {
        base: upstream.trim_end_matches('/').to_owned(),
        own: url.clone(),
        client: reqwest::Client::new(),
        calls: calls.clone(),
    };
    let router = axum::Router::new().fallback(forward).with_state(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    CountingProxy { url, calls }
}

async fn forward(State(up): State<Upstream>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    if !parts.uri.path().contains("token") {
        up.calls.fetch_add(1, Ordering::SeqCst);
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
