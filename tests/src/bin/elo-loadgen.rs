//! Load generator for `make bench`, run as a process of its own so it does not share a runtime
//! with the service it measures.
//!
//! Reads webhook bodies (one JSON document a line), signs them all before the clock starts
//! (`x-elo-webhook-signature`, the HMAC scheme order-ingest verifies), then keeps
//! `--concurrency` requests in flight over keep-alive connections: `--warmup-secs` unmeasured,
//! then `--secs` measured. With `--rate`, requests are paced open-loop at that many per second
//! (still at most `--concurrency` in flight) and a latency counts from when its request was due,
//! so a stalled server is not hidden by the generator waiting for it.
//!
//! With `--prime`, every body is first sent once (closed loop, unmeasured, before the warm-up),
//! so a run can measure a service whose caches already hold what the bodies refer to.
//!
//! The generator shares the machine with the service it measures (and the broker), so it is kept
//! lean: one keep-alive HTTP/1.1 connection per request in flight (hyper's client connection,
//! no pool), requests rendered once before the clock starts (their bodies shared, not copied),
//! and a single-threaded runtime. `reqwest` cost about 50 CPU-µs per request here (pool lock,
//! URL parse, body copies, cross-thread wake-ups), as much as the HTTP hop it measured.
//!
//! Prints one JSON line: `count` (2xx answers completed in the measured window), `errors`,
//! `elapsed_secs`, `rate`, `p50_ms`, `p99_ms` (of the requests due in the window, each waited
//! for even when its answer comes after the window), `sent` (all requests, warm-up included), `bodies_reused` (whether the bodies ran
//! out and were sent again).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Webhook endpoint.
    #[arg(long)]
    url: String,
    /// HMAC secret shared with the receiver.
    #[arg(long)]
    secret: String,
    /// File of bodies, one a line.
    #[arg(long)]
    bodies: std::path::PathBuf,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 3.0)]
    warmup_secs: f64,
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Open-loop pacing, requests per second (0: closed loop, as fast as answers come).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Send every body once before the warm-up (unmeasured).
    #[arg(long)]
    prime: bool,
}

struct Shared {
    bodies: Vec<(String, bytes::Bytes)>,
    next: AtomicUsize,
    reused: AtomicBool,
    errors: AtomicU64,
    completed: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.bodies)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let bodies: Vec<(String, bytes::Bytes)> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| (sandbox::magento::webhook::sign(&args.secret, now, l.as_bytes()), bytes::Bytes::from(l.to_owned())))
        .collect();
    anyhow::ensure!(!bodies.is_empty(), "no bodies in {}", args.bodies.display());
    let shared = Arc::new(Shared {
        bodies,
        next: AtomicUsize::new(0),
        reused: AtomicBool::new(false),
        errors: AtomicU64::new(0),
        completed: AtomicU64::new(0),
    });
    let target = Target::parse(&args.url)?;
    if args.prime {
        prime(&target, &shared.bodies, args.concurrency).await?;
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup_secs);
    let end = measure_from + Duration::from_secs_f64(args.secs);
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let (target, shared) = (target.clone(), shared.clone());
        let (concurrency, rate) = (args.concurrency, args.rate);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut j = 0u64;
            let mut connection = None;
            loop {
                let due = if rate > 0.0 {
                    let due = start + Duration::from_secs_f64((j * concurrency as u64 + worker as u64) as f64 / rate);
                    j += 1;
                    tokio::time::sleep_until(due.into()).await;
                    due
                } else {
                    Instant::now()
                };
                if due >= end {
                    break;
                }
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= shared.bodies.len() {
                    shared.reused.store(true, Ordering::Relaxed);
                }
                let (signature, body) = &shared.bodies[i % shared.bodies.len()];
                let ok = target.send(&mut connection, signature, body).await;
                let done = Instant::now();
                if ok && done >= measure_from && done <= end {
                    shared.completed.fetch_add(1, Ordering::Relaxed);
                }
                // Every request due in the window counts, however late its answer: dropping the
                // ones answered after the window would drop the slowest (its tail).
                if due >= measure_from {
                    if ok {
                        latencies.push(done - due);
                    } else {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await?);
    }
    latencies.sort();
    let quantile =
        |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1))).copied();
    let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let elapsed = args.secs;
    let completed = shared.completed.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "count": completed,
            "errors": shared.errors.load(Ordering::Relaxed),
            "elapsed_secs": elapsed,
            "rate": completed as f64 / elapsed,
            "p50_ms": ms(quantile(0.50)),
            "p99_ms": ms(quantile(0.99)),
            "bodies_reused": shared.reused.load(Ordering::Relaxed),
            "sent": shared.next.load(Ordering::Relaxed),
            "concurrency": args.concurrency,
            "target_rate": args.rate,
        })
    );
    Ok(())
}

/// Where requests go: the connection address and the request target.
#[derive(Clone)]
struct Target {
    address: String,
    authority: String,
    path: String,
}

type Connection = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: axum::http::Uri = url.parse()?;
        anyhow::ensure!(uri.scheme_str() == Some("http"), "only http:// targets: {url}");
        let authority = uri.authority().ok_or_else(|| anyhow::anyhow!("no host in {url}"))?.to_string();
        let address = if uri.port().is_some() { authority.clone() } else { format!("{authority}:80") };
        let path = uri.path_and_query().map_or("/".to_owned(), |p| p.to_string());
        Ok(Self { address, authority, path })
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        let stream = tokio::net::TcpStream::connect(&self.address).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// One signed POST on `connection` (opened, or opened again after a failure); whether it
    /// was answered 2xx within [`REQUEST_TIMEOUT`]. A keep-alive connection the server closed
    /// meanwhile is replaced and the request sent once more on a new one (as reqwest's pool
    /// did); a request that failed on a fresh connection, or timed out, is an error.
    async fn send(&self, connection: &mut Option<Connection>, signature: &str, body: &bytes::Bytes) -> bool {
        for _ in 0..2 {
            let reused = connection.as_ref().is_some_and(|c| !c.is_closed());
            let answered = tokio::time::timeout(REQUEST_TIMEOUT, self.send_once(connection, signature, body)).await;
            match answered {
                Ok(Ok(ok)) => return ok,
                // The connection is in an unknown state: never reuse it.
                Ok(Err(_)) if reused => *connection = None,
                Ok(Err(_)) | Err(_) => {
                    *connection = None;
                    return false;
                }
            }
        }
        false
    }

    async fn send_once(
        &self,
        connection: &mut Option<Connection>,
        signature: &str,
        body: &bytes::Bytes,
    ) -> anyhow::Result<bool> {
        use http_body_util::BodyExt;
        if connection.as_ref().is_none_or(|c| c.is_closed()) {
            *connection = Some(self.connect().await?);
        }
        let sender = connection.as_mut().expect("connected above");
        sender.ready().await?;
        let request = axum::http::Request::post(&self.path)
            .header(axum::http::header::HOST, &self.authority)
            .header("x-elo-webhook-signature", signature)
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(body.clone()))?;
        let response = sender.send_request(request).await?;
        let ok = response.status().is_success();
        // Read to the end so the connection can carry the next request.
        response.into_body().collect().await?;
        Ok(ok)
    }
}

/// Longer than any answer a working service gives; past it a request counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends every body once, `concurrency` at a time; any refusal fails the run.
async fn prime(target: &Target, bodies: &[(String, bytes::Bytes)], concurrency: usize) -> anyhow::Result<()> {
    let next = AtomicUsize::new(0);
    let worker = || async {
        let mut connection = None;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((signature, body)) = bodies.get(i) else { return Ok(()) };
            anyhow::ensure!(target.send(&mut connection, signature, body).await, "priming request {i} was refused");
        }
    };
    futures::future::try_join_all((0..concurrency).map(|_| worker())).await?;
    Ok(())
}
