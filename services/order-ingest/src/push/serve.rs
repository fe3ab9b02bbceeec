//! The push listener: axum's router behind an accept loop with the limits a public endpoint
//! needs, which `axum::serve` does not offer.
//!
//! - **Header-read timeout**: a client that opens a connection and dribbles its headers is cut
//!   off (slowloris), and idle keep-alive connections are closed.
//! - **Connection cap with load shedding**: past `max_connections`, a new connection gets an
//!   immediate `503` with `Retry-After` and is closed, instead of queueing without bound; the
//!   sender (Magento's webhook queue) retries.
//! - **Request timeout**: a request (body read included) that takes longer is answered `503`
//!   with `Retry-After`; it must exceed the publish timeout so a slow broker still ends in a
//!   definite answer.
//!
//! One task per connection (the unit HTTP/1.1 is served in), bounded by the cap.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Limits of the push listener.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// Time allowed to send a request's headers (and to stay idle between keep-alive requests).
    pub header_read_timeout: Duration,
    /// Time allowed for a whole request, body read and publication included.
    pub request_timeout: Duration,
    /// Connections served at once; more are shed with a 503.
    pub max_connections: usize,
}

/// What a shed connection is told before it is closed.
const SHED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Adds the request timeout to the router.
fn with_request_timeout(app: Router, timeout: Duration) -> Router {
    app.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            match tokio::time::timeout(timeout, next.run(request)).await {
                Ok(response) => response,
                Err(_) => {
                    super::metrics::NOTIFICATIONS.with_label_values(&["unavailable"]).inc();
                    let body = axum::Json(serde_json::json!({"error": "timeout", "message": "request took too long"}));
                    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], body).into_response()
                }
            }
        },
    ))
}

/// Serves `app` on `listener` until `stop`, then lets in-flight requests finish (up to `drain`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    stop: CancellationToken,
    drain: Duration,
) {
    let app = with_request_timeout(app, limits.request_timeout);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Best effort, never blocking the accept loop: the socket is fresh, the write fits.
            let _ = stream.try_write(SHED);
            metrics::SHED.inc();
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Errors here are clients going away or timing out: nothing to act on.
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "push connection ended");
            }
            drop(permit);
        });
    }
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("push connections still open after the drain deadline");
    }
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntCounter, register_int_counter};

    pub(super) static SHED: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "order_ingest_connections_shed_total",
            "Push connections refused with a 503 because the connection cap was reached."
        )
        .expect("metric registers once")
    });
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn start(limits: ListenerLimits, app: Router) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, app, limits, stop.clone(), Duration::from_secs(1)));
        (addr, stop)
    }

    fn slow_app() -> Router {
        Router::new().route(
            "/slow",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
    }

    async fn read_all(stream: &mut tokio::net::TcpStream) -> String {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_client_dribbling_its_headers_is_cut_off() {
        let limits = ListenerLimits {
            header_read_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(5),
            max_connections: 4,
        };
        let (addr, _stop) = start(limits, slow_app()).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"POST /slow HTTP/1.1\r\nhost: x\r\n").await.unwrap(); // and never the rest
        let started = Instant::now();
        let _ = read_all(&mut stream).await;
        assert!(started.elapsed() < Duration::from_secs(3), "closed after the header timeout: {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn past_the_connection_cap_new_connections_are_shed_with_a_503_and_slow_requests_time_out() {
        let limits = ListenerLimits {
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_millis(500),
            max_connections: 1,
        };
        let (addr, _stop) = start(limits, slow_app()).await;
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        first.write_all(b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let shed = read_all(&mut second).await;
        assert!(shed.starts_with("HTTP/1.1 503") && shed.contains("retry-after: 1"), "{shed}");
        let mut answer = vec![0; 512];
        let n = tokio::time::timeout(Duration::from_secs(3), first.read(&mut answer)).await.unwrap().unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 503"), "the slow request timed out: {answer}");
    }
}
