//! salesforce-sink (`ELO_BENCH=salesforce`), measured on the release binary next to this one
//! against the Salesforce simulator served by this process, every call answered after
//! [`LATENCY_MS`]. Orders come from the Magento simulator's generator (guests and registered
//! customers, repeat buyers, configurable and bundle items, two stores, statuses through to
//! activation), normalised by order-ingest's own code and published to `commerce.events`.
//!
//! - **Live** ([`LIVE_ORDERS`] at [`LIVE_RATE`]/s, the first [`WARMUP_ORDERS`] unmeasured):
//!   freshness p50/p99, from the event's publication to the Order's creation in the simulator
//!   (the simulator stamps `CreatedDate` when it writes), and Salesforce calls per 1,000 orders
//!   (every call: the simulator's usage count plus the sink's token requests from its /metrics).
//!   order-ingest's own webhook-to-topic latency is measured by the push bench (`ELO_BENCH=push`).
//! - **Backlog** ([`BACKLOG_ORDERS`] published before the sink starts): orders per second
//!   through Composite Graph (Bulk off), then through Bulk API 2.0 (the default threshold), each
//!   on a fresh org and consumer group; calls per 1,000 orders for both.
//! - **One call per record**: what a connector that upserts each record on its own (account,
//!   contact, order, each item, the activation, a product and two price book entries per new
//!   SKU) would spend on the same orders: the baseline of the calls ratio.
//! - **Peak RSS** of the sink process over every run (sampled every 100 ms; target < 64 MiB).
//!
//! `ELO_BENCH_SF_RUNS` picks the runs (default `live,graph,bulk`). On Tansu 0.6 a second
//! backlog run in the same broker sometimes stops getting answers from the group coordinator
//! (session timeouts, then `ApiVersionRequest` timeouts); `make bench-salesforce` therefore
//! runs each backlog on a fresh stack.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use elo_events::{EventCodec, RegistryConfig};
use elo_integration_tests::{ChildGuard, brokers, create_topics, registry_url, salesforce_sink, unique};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use serde_json::Value;

use crate::report;

const LATENCY_MS: u64 = 100;
const LIVE_RATE: f64 = 200.0;
const LIVE_ORDERS: usize = 4_000;
const WARMUP_ORDERS: usize = 1_000;
const BACKLOG_ORDERS: usize = 10_000;

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(path.exists(), "{} is missing (make bench builds it)", path.display());
    Ok(path)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The simulator, every call delayed by [`LATENCY_MS`], on a free port.
async fn salesforce() -> anyhow::Result<(SalesforceApp, String)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let config = SalesforceConfig { instance_url: url.clone(), daily_quota: 10_000_000, ..Default::default() };
    let app = SalesforceApp::new(config, Default::default(), Default::default());
    app.faults
        .set("salesforce", sandbox::faults::FaultConfig { latency_fixed_ms: Some(LATENCY_MS), ..Default::default() });
    let router = app.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok((app, url))
}

/// Generated orders as order-ingest publishes them: (customer key, entity id, event).
fn orders(n: usize) -> Vec<elo_events::CommerceEvent> {
    let mut shop = sandbox::magento::Magento::new(Default::default(), Default::default());
    shop.generate_orders(n);
    let stores = order_ingest::normalize::Stores(
        [(1, ("default".to_owned(), 1)), (2, ("br".to_owned(), 1))].into_iter().collect(),
    );
    let mut out: Vec<_> =
        shop.orders.values().filter_map(|o| order_ingest::normalize::order_event(o, None, &stores, 0).ok()).collect();
    out.truncate(n);
    out
}

/// Calls a one-call-per-record connector would make for `events`.
fn per_record_calls(events: &[elo_events::CommerceEvent]) -> usize {
    let activating = ["processing", "complete", "closed"];
    let (mut calls, mut skus, mut entries) = (0, BTreeSet::new(), BTreeSet::new());
    for e in events {
        let Some(order) = &e.order else { continue };
        let lines = salesforce_sink::graph::sellable(order);
        calls += 3 + lines.len() + usize::from(activating.contains(&order.status.as_str()));
        for line in lines {
            skus.insert(line.sku.clone());
            entries.insert((e.store.store_id, line.sku.clone()));
        }
    }
    calls + skus.len() * 2 + entries.len()
}

fn order_ids(sf: &SalesforceApp) -> HashMap<String, i64> {
    let sim = sf.sim.lock().expect("sf lock");
    sim.org
        .records
        .values()
        .filter(|r| r.object == "Order")
        .filter_map(|r| r.fields.get("Elo_Id__c").and_then(Value::as_str).map(|e| (e.to_owned(), r.created_ms)))
        .collect()
}

/// The sink's OAuth token requests so far (the simulator's usage counter, like Salesforce's
/// API quota, leaves them out; the bench counts every call), from its /metrics.
async fn token_calls(admin: &str) -> u64 {
    let Ok(response) = reqwest::get(format!("http://{admin}/metrics")).await else { return 0 };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("salesforce_sink_api_calls_total{kind=\"token\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .map_or(0, |n| n as u64)
}

/// Every Salesforce call the sink made so far: the simulator's count plus token requests.
async fn calls(sf: &SalesforceApp, admin: &str) -> u64 {
    let api = sf.sim.lock().expect("sf lock").api_usage;
    api + token_calls(admin).await
}

fn rss_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// The release sink with the test harness's settings for `topic`; its admin address.
fn sink(dir: &Path, topic: &str, url: &str, log: &str, extra: &[(&str, &str)]) -> anyhow::Result<(ChildGuard, String)> {
    let base = salesforce_sink(dir, topic, url, log);
    let mut command = Command::new(sibling("salesforce-sink")?);
    let mut admin = String::new();
    for (key, value) in base.get_envs() {
        if let Some(value) = value {
            if key == "ELO_ADMIN_LISTEN" {
                admin = value.to_string_lossy().into_owned();
            }
            command.env(key, value);
        }
    }
    for (k, v) in extra {
        command.env(k, v);
    }
    command.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(dir.join(format!("{log}.log")))?);
    Ok((ChildGuard::spawn("salesforce-sink", &mut command), admin))
}

async fn publish(
    producer: &FutureProducer,
    codec: &EventCodec,
    topic: &str,
    event: &elo_events::CommerceEvent,
) -> anyhow::Result<()> {
    let payload = codec.encode(topic, event).await?;
    producer
        .send_result(FutureRecord::to(topic).key(event.customer_key.as_bytes()).payload(&payload))
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// Waits until every order of `events` is in the org; samples the sink's RSS meanwhile.
async fn drain(sf: &SalesforceApp, events: &[elo_events::CommerceEvent], pid: u32, timeout: Duration) -> (bool, f64) {
    let wanted: Vec<String> =
        events.iter().filter_map(|e| e.order.as_ref().map(|o| format!("o:{}", o.entity_id))).collect();
    let (started, mut peak) = (Instant::now(), 0.0f64);
    while started.elapsed() < timeout {
        peak = peak.max(rss_kib(pid, "VmRSS:").unwrap_or(0.0));
        let ids = order_ids(sf);
        if wanted.iter().all(|w| ids.contains_key(w)) {
            return (true, peak);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (false, peak)
}

pub(crate) async fn run(rows: &mut Vec<Value>) -> anyhow::Result<()> {
    let codec = EventCodec::new(&RegistryConfig::local(registry_url()))?;
    let producer = elo_integration_tests::producer(&brokers());
    let dir = tempfile::tempdir()?;
    let mut peak_rss = 0.0f64;
    let runs = std::env::var("ELO_BENCH_SF_RUNS").unwrap_or_else(|_| "live,graph,bulk".into());
    let runs: Vec<&str> = runs.split(',').map(str::trim).collect();
    if runs.contains(&"live") {
        peak_rss = peak_rss.max(live(rows, &codec, &producer, dir.path()).await?);
    }
    // Backlog: Composite Graph, then Bulk API 2.0, on the same orders.
    let backlog = orders(BACKLOG_ORDERS);
    let per_record = per_record_calls(&backlog) as f64 * 1000.0 / backlog.len() as f64;
    let mut rates = Vec::new();
    for (name, bulk_min) in [("graph", "0"), ("bulk", "2000")] {
        if !runs.contains(&name) {
            continue;
        }
        let topic = unique(&format!("bench-sf-{name}"));
        create_topics(&brokers(), &[(&topic, 3)]).await;
        for e in &backlog {
            publish(&producer, &codec, &topic, e).await?;
        }
        producer.flush(Duration::from_secs(30))?;
        let (sf, url) = salesforce().await?;
        let started = Instant::now();
        let (guard, admin) = sink(dir.path(), &topic, &url, name, &[("ELO_SALESFORCE_BULK_MIN_RECORDS", bulk_min)])?;
        let pid = guard.pid() as u32;
        let (done, peak) = drain(&sf, &backlog, pid, Duration::from_secs(600)).await;
        peak_rss = peak_rss.max(peak).max(rss_kib(pid, "VmHWM:").unwrap_or(0.0));
        anyhow::ensure!(
            done,
            "the {name} backlog did not finish; see {}",
            dir.path().join(format!("{name}.log")).display()
        );
        let elapsed = started.elapsed();
        let jobs = sf.sim.lock().expect("sf lock").jobs.len();
        let calls = calls(&sf, &admin).await;
        let rate = crate::rate(backlog.len(), elapsed);
        println!(
            "  backlog via {name}: {} orders in {:.1}s ({rate:.0} orders/s, sink start and group join included), {calls} calls, {jobs} bulk jobs",
            backlog.len(),
            elapsed.as_secs_f64()
        );
        report(
            rows,
            &format!("salesforce backlog calls / 1,000 ({name})"),
            "calls",
            calls as f64 * 1000.0 / backlog.len() as f64,
            "one call per record",
            per_record,
        );
        rates.push(rate);
    }
    if let [graph, bulk] = rates[..] {
        report(rows, "salesforce backfill, Bulk API 2.0", "orders/s", bulk, "same via Composite Graph", graph);
    }
    let mib = peak_rss / 1024.0;
    report(rows, "salesforce-sink peak RSS", "MiB", mib, "target", 64.0);
    println!("  (peak RSS over the runs; target < 64 MiB: {})", if mib < 64.0 { "met" } else { "NOT met" });
    Ok(())
}

/// The paced stream; returns the sink's peak RSS (KiB).
async fn live(rows: &mut Vec<Value>, codec: &EventCodec, producer: &FutureProducer, dir: &Path) -> anyhow::Result<f64> {
    let mut peak_rss = 0.0f64;
    let topic = unique("bench-sf-live");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let (sf, url) = salesforce().await?;
    let events = orders(LIVE_ORDERS + 1);
    let (guard, admin) = sink(dir, &topic, &url, "live", &[])?;
    let pid = guard.pid() as u32;
    // One order first: the sink is up, assigned and has checked the org.
    publish(producer, codec, &topic, &events[0]).await?;
    let (up, _) = drain(&sf, &events[..1], pid, Duration::from_secs(120)).await;
    anyhow::ensure!(up, "the sink never applied its first order; see {}", dir.join("live.log").display());
    let events = &events[1..];
    let mut sent_at: HashMap<String, i64> = HashMap::new();
    let mut calls_at_warm = 0;
    let started = Instant::now();
    for (i, e) in events.iter().enumerate() {
        let due = started + Duration::from_secs_f64(i as f64 / LIVE_RATE);
        tokio::time::sleep_until(due.into()).await;
        if i == WARMUP_ORDERS {
            calls_at_warm = calls(&sf, &admin).await;
        }
        sent_at.insert(format!("o:{}", e.order.as_ref().map_or(0, |o| o.entity_id)), now_ms());
        publish(producer, codec, &topic, e).await?;
        if i % 100 == 0 {
            peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:").unwrap_or(0.0));
        }
    }
    let (done, peak) = drain(&sf, events, pid, Duration::from_secs(180)).await;
    peak_rss = peak_rss.max(peak).max(rss_kib(pid, "VmHWM:").unwrap_or(0.0));
    anyhow::ensure!(done, "the live run did not finish; see {}", dir.join("live.log").display());
    let calls = calls(&sf, &admin).await - calls_at_warm;
    let created = order_ids(&sf);
    let measured = &events[WARMUP_ORDERS..];
    let mut latencies: Vec<i64> = measured
        .iter()
        .filter_map(|e| {
            let ext = format!("o:{}", e.order.as_ref()?.entity_id);
            Some(created.get(&ext)? - sent_at.get(&ext)?)
        })
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)] as f64;
    // Calls counted after the warm-up include some of the warm-up's tail: a slight overcount.
    let live_calls = calls as f64 * 1000.0 / measured.len() as f64;
    let live_per_record = per_record_calls(measured) as f64 * 1000.0 / measured.len() as f64;
    report(rows, "salesforce live calls / 1,000 orders", "calls", live_calls, "one call per record", live_per_record);
    report(rows, "salesforce freshness p50", "ms", pct(0.50), "injected API latency", LATENCY_MS as f64);
    report(rows, "salesforce freshness p99", "ms", pct(0.99), "injected API latency", LATENCY_MS as f64);
    println!(
        "  ({} orders at {LIVE_RATE}/s after {WARMUP_ORDERS} warm-up; targets: p99 < 1000 ms {}, calls <= 12 per 1,000)",
        measured.len(),
        if pct(0.99) < 1000.0 { "met" } else { "NOT met" }
    );
    drop(guard);
    Ok(peak_rss)
}
