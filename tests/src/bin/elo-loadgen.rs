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
//! Prints one JSON line: `count` (2xx answers completed in the measured window), `errors`,
//! `elapsed_secs`, `rate`, `p50_ms`, `p99_ms` (of the requests sent and answered in the
//! window), `sent` (all requests, warm-up included), `bodies_reused` (whether the bodies ran
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
    bodies: Vec<(String, String)>,
    next: AtomicUsize,
    reused: AtomicBool,
    errors: AtomicU64,
    completed: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.bodies)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let bodies: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| (sandbox::magento::webhook::sign(&args.secret, now, l.as_bytes()), l.to_owned()))
        .collect();
    anyhow::ensure!(!bodies.is_empty(), "no bodies in {}", args.bodies.display());
    let shared = Arc::new(Shared {
        bodies,
        next: AtomicUsize::new(0),
        reused: AtomicBool::new(false),
        errors: AtomicU64::new(0),
        completed: AtomicU64::new(0),
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    if args.prime {
        prime(&client, &args.url, &shared.bodies, args.concurrency).await?;
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup_secs);
    let end = measure_from + Duration::from_secs_f64(args.secs);
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let (client, shared, url) = (client.clone(), shared.clone(), args.url.clone());
        let (concurrency, rate) = (args.concurrency, args.rate);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut j = 0u64;
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
                let response = client
                    .post(&url)
                    .header("x-elo-webhook-signature", signature)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let ok = match response {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        let _ = r.bytes().await;
                        ok
                    }
                    Err(_) => false,
                };
                let done = Instant::now();
                if ok && done >= measure_from && done <= end {
                    shared.completed.fetch_add(1, Ordering::Relaxed);
                }
                if due >= measure_from && done <= end {
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

/// Sends every body once, `concurrency` at a time; any refusal fails the run.
async fn prime(
    client: &reqwest::Client,
    url: &str,
    bodies: &[(String, String)],
    concurrency: usize,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut answers = futures::stream::iter(bodies)
        .map(|(signature, body)| {
            client
                .post(url)
                .header("x-elo-webhook-signature", signature)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
        })
        .buffer_unordered(concurrency);
    while let Some(answer) = answers.next().await {
        let status = answer?.status();
        anyhow::ensure!(status.is_success(), "priming request answered {status}");
    }
    Ok(())
}
