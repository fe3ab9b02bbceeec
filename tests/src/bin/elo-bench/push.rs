//! order-ingest push and poll, measured on the production binary (the release `order-ingest`
//! next to this executable) against the Magento simulator answering every call after 20 ms.
//!
//! **Push.** The simulator (served by this process) holds [`PUSH_ORDERS`] orders; their
//! webhook notifications (Adobe I/O CloudEvents envelopes with a partial order, the sandbox's
//! default style, so order-ingest refetches the full order) go to a file, and `elo-loadgen`, a
//! process of its own, signs them all up front and keeps C requests in flight over keep-alive
//! connections: [`WARMUP`] unmeasured, then [`WINDOW`] measured, at C = 32 and 128 (closed
//! loop). order-ingest runs with its production settings (enrichment on: consent and stock
//! checks with their caches, the 250 ms enrichment budget) except that stock is checked for
//! orders of any age (the simulator's orders are up to a month old). A webhook is answered 2xx
//! only after the broker acknowledged its event, so a request's latency is webhook in to event
//! acknowledged. Then a paced run at half the best closed-loop rate gives p50/p99 latency
//! there (open loop: latency counts from when a request was due). The same runs follow with
//! plain webhooks (the full order in the body, so no refetch), which shows the path without
//! the one Magento call every CloudEvents notification costs.
//!
//! **Ceiling.** A raw rdkafka producer (Elo's reliability settings, see
//! [`crate::raw_producer_config`]) sends the same orders' encoded events to the same topic with
//! C sends in flight, each awaiting its acknowledgement before the next, for the same warm-up
//! and window. The push ratio is push/s over raw/s at the same C (target: at least 0.70).
//!
//! **Poll.** A fresh simulator with [`POLL_ORDERS`] orders, order-ingest polling it from
//! scratch (production page size and budget, 1 s interval): orders per second from the first
//! event acknowledged to the last (the topic stops growing). Customers are polled in the same
//! rounds, so their events share the time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use elo_integration_tests::{ChildGuard, free_port, order_ingest, unique, wait_until};
use elo_kafka::KafkaArgs;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const PUSH_ORDERS: usize = 40_000;
const POLL_ORDERS: usize = 3_000;
const MAGENTO_LATENCY_MS: u64 = 20;
const WARMUP: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(10);
const CONCURRENCY: [usize; 2] = [32, 128];
const PLAIN_BODIES: usize = 10_000;
const SECRET: &str = "bench-secret-0123456789abcdef";

/// The Magento simulator with `orders` orders (one version each), every call answered after
/// [`MAGENTO_LATENCY_MS`], served on a free port.
async fn magento(orders: usize) -> anyhow::Result<(sandbox::magento::MagentoApp, String)> {
    let generator = sandbox::magento::generator::GeneratorConfig { transition_rate: 0.0, ..Default::default() };
    let app = sandbox::magento::MagentoApp::new(
        Default::default(),
        generator,
        sandbox::faults::Faults::default(),
        sandbox::Counters::default(),
    );
    app.sim.lock().expect("magento lock").generate(orders);
    app.faults.set(
        "magento",
        sandbox::faults::FaultConfig { latency_fixed_ms: Some(MAGENTO_LATENCY_MS), ..Default::default() },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = app.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok((app, url))
}

/// A binary built next to this one (the release profile under `make bench`).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(path.exists(), "{} is missing (make bench builds it)", path.display());
    Ok(path)
}

/// The release order-ingest with the test harness's settings (own topics, polling off unless
/// set), but the production enrichment budget.
fn ingest(dir: &Path, topic: &str, magento_url: &str, log: &str, listen: u16) -> anyhow::Result<Command> {
    let base = order_ingest(dir, topic, magento_url, log);
    let mut command = Command::new(sibling("order-ingest")?);
    for (key, value) in base.get_envs() {
        if let Some(value) = value
            && key != "ELO_ORDER_INGEST_ENRICHMENT_BUDGET"
        {
            command.env(key, value);
        }
    }
    command
        .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{listen}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{log}.log")))?);
    Ok(command)
}

/// CPU seconds a process has used (user + system), from `/proc/<pid>/stat` (Linux).
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

/// One `elo-loadgen` run; its JSON line.
fn loadgen(url: &str, bodies: &Path, concurrency: usize, rate: f64) -> anyhow::Result<Value> {
    let output = Command::new(sibling("elo-loadgen")?)
        .args(["--url", url, "--secret", SECRET])
        .arg("--bodies")
        .arg(bodies)
        .args(["--concurrency", &concurrency.to_string(), "--rate", &rate.to_string()])
        .args(["--warmup-secs", &WARMUP.as_secs_f64().to_string(), "--secs", &WINDOW.as_secs_f64().to_string()])
        .output()?;
    anyhow::ensure!(output.status.success(), "elo-loadgen failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The ceiling: `concurrency` tasks each sending one event and awaiting its acknowledgement,
/// over the same warm-up and window. Returns (acks/s, p50 ms, p99 ms).
async fn raw_ceiling(
    producer: &FutureProducer,
    topic: &str,
    events: &Arc<Vec<(String, Vec<u8>)>>,
    concurrency: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let start = Instant::now();
    let (measure_from, end) = (start + WARMUP, start + WARMUP + WINDOW);
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (producer, topic, events, acked, failed) =
            (producer.clone(), topic.to_owned(), events.clone(), acked.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = worker;
            while Instant::now() < end {
                let (key, payload) = &events[i % events.len()];
                i += concurrency;
                let sent = Instant::now();
                let result = match producer.send_result(FutureRecord::to(&topic).key(key.as_bytes()).payload(payload)) {
                    Ok(delivery) => matches!(delivery.await, Ok(Ok(_))),
                    Err(_) => false,
                };
                let done = Instant::now();
                if !result {
                    failed.store(true, Ordering::Relaxed);
                    continue;
                }
                if done >= measure_from && done <= end {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                if sent >= measure_from && done <= end {
                    latencies.push(done - sent);
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    anyhow::ensure!(!failed.load(Ordering::Relaxed), "the raw producer failed a send");
    latencies.sort();
    let ms = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Ok((acked.load(Ordering::Relaxed) as f64 / WINDOW.as_secs_f64(), ms(0.5), ms(0.99)))
}

pub(crate) async fn push(rows: &mut Vec<Value>, kafka: &KafkaArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n"))?;

    // The orders and their webhook bodies.
    let (magento_app, magento_url) = magento(PUSH_ORDERS).await?;
    let orders: Vec<Value> = magento_app.sim.lock().expect("magento lock").orders.values().cloned().collect();
    let webhook = sandbox::magento::webhook::WebhookConfig::default();
    let mut bodies = String::new();
    for order in &orders {
        bodies.push_str(std::str::from_utf8(&sandbox::magento::webhook::notification(&webhook, order).body)?);
        bodies.push('\n');
    }
    let bodies_file = dir.path().join("bodies.jsonl");
    std::fs::write(&bodies_file, bodies)?;

    let topic = unique("bench.push");
    let listen = free_port();
    let mut command = ingest(dir.path(), &topic, &magento_url, "push", listen)?;
    command.env("ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE", &secret_file);
    let ingest_process = ChildGuard::spawn("order-ingest", &mut command);
    let ready =
        wait_until(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()).await;
    anyhow::ensure!(ready, "order-ingest never listened:\n{}", elo_integration_tests::log(dir.path(), "push"));
    let url = format!("http://127.0.0.1:{listen}/webhooks/magento/orders");

    let mut push = Vec::new();
    let mut diagnostics = Vec::new();
    for c in CONCURRENCY {
        magento_app.counters.reset();
        let cpu = cpu_secs(ingest_process.pid());
        let run = loadgen(&url, &bodies_file, c, 0.0)?;
        let cpu = cpu_secs(ingest_process.pid()) - cpu;
        diagnostics.push(format!(
            "  {c} in flight: {} webhooks sent in {:.0} s; order-ingest used {:.0}% of one core; Magento calls: {}",
            run["sent"],
            (WARMUP + WINDOW).as_secs_f64(),
            100.0 * cpu / (WARMUP + WINDOW).as_secs_f64(),
            magento_app.counters.snapshot()["magento"]
        ));
        anyhow::ensure!(
            run["errors"] == 0,
            "push answered errors at {c} concurrent: {run}\n{}",
            elo_integration_tests::log(dir.path(), "push")
        );
        push.push(run);
    }
    let max_rate = push.iter().map(|r| r["rate"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max);
    let half = loadgen(&url, &bodies_file, *CONCURRENCY.last().expect("a concurrency"), (max_rate / 2.0).floor())?;

    // The same path without the refetch: plain webhooks carrying the full order (fewer bodies,
    // they are large; a body sent again is published again, same event id).
    let plain = sandbox::magento::webhook::WebhookConfig {
        style: sandbox::magento::webhook::WebhookStyle::Plain,
        ..Default::default()
    };
    let mut plain_bodies = String::new();
    for order in orders.iter().take(PLAIN_BODIES) {
        plain_bodies.push_str(std::str::from_utf8(&sandbox::magento::webhook::notification(&plain, order).body)?);
        plain_bodies.push('\n');
    }
    let plain_file = dir.path().join("plain.jsonl");
    std::fs::write(&plain_file, plain_bodies)?;
    let mut plain_runs = Vec::new();
    for c in CONCURRENCY {
        let run = loadgen(&url, &plain_file, c, 0.0)?;
        anyhow::ensure!(run["errors"] == 0, "plain push answered errors at {c} concurrent: {run}");
        plain_runs.push(run);
    }
    let plain_max = plain_runs.iter().map(|r| r["rate"].as_f64().unwrap_or(0.0)).fold(0.0, f64::max);
    let plain_half =
        loadgen(&url, &plain_file, *CONCURRENCY.last().expect("a concurrency"), (plain_max / 2.0).floor())?;

    // The ceiling: the same orders' events, encoded, on the same topic.
    let codec = elo_events::EventCodec::new(&elo_events::RegistryConfig::local(elo_integration_tests::registry_url()))?;
    let mut encoded = Vec::with_capacity(orders.len());
    for order in &orders {
        let event = order_ingest::normalize::order_event(order, None, &Default::default(), 0)?;
        encoded.push((event.customer_key.clone(), codec.encode(&topic, &event).await?));
    }
    let encoded = Arc::new(encoded);
    let raw: FutureProducer = crate::raw_producer_config(kafka).create()?;
    let mut ceiling = Vec::new();
    for c in CONCURRENCY {
        ceiling.push(raw_ceiling(&raw, &topic, &encoded, c).await?);
    }
    drop(ingest_process);

    println!();
    println!(
        "order-ingest push: signed CloudEvents webhook -> Magento refetch + enrichment ({MAGENTO_LATENCY_MS} ms per Magento call) -> acked event"
    );
    println!(
        "  {} binaries; load generator in its own process; {}s warm-up, {}s measured per run",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        WARMUP.as_secs(),
        WINDOW.as_secs()
    );
    println!(
        "  {:>11}  {:>10} {:>8} {:>8}   {:>13} {:>8} {:>8}   {:>6}",
        "in flight", "push/s", "p50 ms", "p99 ms", "raw acked/s", "p50 ms", "p99 ms", "ratio"
    );
    for ((c, run), (raw_rate, raw_p50, raw_p99)) in CONCURRENCY.iter().zip(&push).zip(&ceiling) {
        let rate = run["rate"].as_f64().unwrap_or(0.0);
        let ratio = rate / raw_rate;
        println!(
            "  {c:>11}  {rate:>10.0} {:>8.1} {:>8.1}   {raw_rate:>13.0} {raw_p50:>8.1} {raw_p99:>8.1}   {ratio:>6.2}{}",
            run["p50_ms"].as_f64().unwrap_or(0.0),
            run["p99_ms"].as_f64().unwrap_or(0.0),
            if run["bodies_reused"] == true { "  (bodies reused)" } else { "" }
        );
        rows.push(serde_json::json!({
            "benchmark": format!("push webhook -> acked event, {c} in flight"), "unit": "orders/s",
            "elo": rate, "p50_ms": run["p50_ms"], "p99_ms": run["p99_ms"],
            "baseline": "raw producer, same events, same in flight", "baseline_value": raw_rate,
            "baseline_p50_ms": raw_p50, "baseline_p99_ms": raw_p99, "ratio": ratio,
        }));
    }
    for line in &diagnostics {
        println!("{line}");
    }
    let best_ratio = push
        .iter()
        .zip(&ceiling)
        .map(|(run, (raw_rate, _, _))| run["rate"].as_f64().unwrap_or(0.0) / raw_rate)
        .fold(0.0, f64::max);
    let half_p99 = half["p99_ms"].as_f64().unwrap_or(f64::INFINITY);
    println!(
        "  half the best rate, paced at {:.0}/s (open loop, up to {} in flight): {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
        half["target_rate"].as_f64().unwrap_or(0.0),
        half["concurrency"],
        half["rate"].as_f64().unwrap_or(0.0),
        half["p50_ms"].as_f64().unwrap_or(0.0),
        half_p99,
    );
    println!(
        "  targets: ratio >= 0.70: {}; p99 < 10 ms at half the maximum rate: {}",
        if best_ratio >= 0.70 { "met" } else { "NOT met" },
        if half_p99 < 10.0 { "met" } else { "NOT met" }
    );
    println!("  plain webhooks (full order in the body: no refetch; consent and stock checks as above):");
    for ((c, run), (raw_rate, _, _)) in CONCURRENCY.iter().zip(&plain_runs).zip(&ceiling) {
        let rate = run["rate"].as_f64().unwrap_or(0.0);
        println!(
            "  {c:>11}  {rate:>10.0} {:>8.1} {:>8.1}   ratio {:.2}{}",
            run["p50_ms"].as_f64().unwrap_or(0.0),
            run["p99_ms"].as_f64().unwrap_or(0.0),
            rate / raw_rate,
            if run["bodies_reused"] == true { "  (bodies reused)" } else { "" }
        );
        rows.push(serde_json::json!({
            "benchmark": format!("plain push webhook -> acked event, {c} in flight"), "unit": "orders/s",
            "elo": rate, "p50_ms": run["p50_ms"], "p99_ms": run["p99_ms"], "ratio": rate / raw_rate,
        }));
    }
    println!(
        "  half the best plain rate, paced at {:.0}/s: {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
        plain_half["target_rate"].as_f64().unwrap_or(0.0),
        plain_half["rate"].as_f64().unwrap_or(0.0),
        plain_half["p50_ms"].as_f64().unwrap_or(0.0),
        plain_half["p99_ms"].as_f64().unwrap_or(0.0),
    );
    rows.push(serde_json::json!({
        "benchmark": "plain push at half the best rate", "unit": "orders/s", "elo": plain_half["rate"],
        "target_rate": plain_half["target_rate"], "p50_ms": plain_half["p50_ms"], "p99_ms": plain_half["p99_ms"],
    }));
    rows.push(serde_json::json!({
        "benchmark": "push at half the best rate", "unit": "orders/s", "elo": half["rate"],
        "target_rate": half["target_rate"], "p50_ms": half["p50_ms"], "p99_ms": half_p99,
    }));

    Ok(())
}

/// Orders per second polled from Magento to acknowledged events.
pub(crate) async fn poll(rows: &mut Vec<Value>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (poll_app, poll_url) = magento(POLL_ORDERS).await?;
    let customers = poll_app.sim.lock().expect("magento lock").customers.len();
    let topic = unique("bench.poll");
    let mut command = ingest(dir.path(), &topic, &poll_url, "poll", free_port())?;
    command.env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s");
    let ingest = ChildGuard::spawn("order-ingest", &mut command);
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut first, mut last, mut seen) = (None, Instant::now(), 0i64);
    while Instant::now() < deadline {
        // A fresh reader each time (one created before the topic exists does not see it).
        let n = elo_integration_tests::topic_count(&topic, 3);
        if n > seen {
            seen = n;
            last = Instant::now();
            first.get_or_insert(last);
        }
        if seen >= POLL_ORDERS as i64 && last.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(ingest);
    let first = first.ok_or_else(|| {
        anyhow::anyhow!("poll published nothing:\n{}", elo_integration_tests::log(dir.path(), "poll"))
    })?;
    anyhow::ensure!(
        seen >= POLL_ORDERS as i64,
        "poll published {seen} events for {POLL_ORDERS} orders:\n{}",
        elo_integration_tests::log(dir.path(), "poll")
    );
    let elapsed = last.duration_since(first).as_secs_f64();
    let poll_rate = POLL_ORDERS as f64 / elapsed;
    println!(
        "order-ingest poll: {POLL_ORDERS} orders ({customers} customers, {seen} events) from Magento ({MAGENTO_LATENCY_MS} ms per call) to acked events in {elapsed:.1} s: {poll_rate:.0} orders/s"
    );
    println!();
    rows.push(serde_json::json!({
        "benchmark": "poll Magento -> acked event", "unit": "orders/s", "elo": poll_rate,
        "orders": POLL_ORDERS, "events": seen, "seconds": elapsed,
    }));
    Ok(())
}
