//! rdstation-sink under load (`ELO_BENCH=rdstation`): the release binary against the RD
//! simulator answering every call after [`LATENCY_MS`], with RD's own limits (120 contact
//! requests per minute per account, 24 per contact per day). Orders come from a load generator
//! in a process of its own (this executable with `ELO_BENCH_RD_LOAD` set), paced open loop.
//!
//! - **Budget under a backlog.** [`BACKLOG_ORDERS`] orders of [`BACKLOG_CUSTOMERS`] customers
//!   wait in `commerce.events` before the sink starts (far more contact work than a minute's
//!   budget). After [`WARMUP`], the contact requests RD receives in [`BUDGET_WINDOW`] are
//!   counted: share of RD's limit used (target at least 90%; the sink allows itself 114 of
//!   120 per minute, so 95% is the most it takes) and 429s RD answered (target 0).
//! - **Freshness** at [`RATE`] orders/s of new customers while that backlog is still being
//!   worked: for each order sent after the warm-up, from the generator's send to RD recording
//!   its `ECOMMERCE_ORDER_PLACED` event; p50/p99 over [`FRESH_WINDOW`]. Baseline: the same
//!   event posted straight to the simulator (the injected latency plus the HTTP round trip).
//!   Contact updates of those customers are deferred and coalesced under the budget (the
//!   budget share above), so freshness is the events'.
//! - **Back-test**: `rdstation-sink rules backtest` over the topic's whole history (both phases),
//!   orders/s; baseline: a raw consumer reading the same records.
//! - **Peak RSS** of the sink process over the run (`VmHWM`).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use elo_events::{EventCodec, RegistryConfig};
use elo_integration_tests::{
    ChildGuard, brokers, create_topics, free_port, rd_order, rdstation_sink, registry_url, serve_rdstation, unique,
    wait_until, write_rd_credentials,
};
use elo_kafka::KafkaArgs;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sandbox::rdstation::RdConfig;
use serde_json::Value;

const LATENCY_MS: u64 = 100;
const PARTITIONS: i32 = 6;
const BACKLOG_ORDERS: usize = 3_000;
const BACKLOG_CUSTOMERS: usize = 1_500;
const RATE: f64 = 200.0;
const WARMUP: Duration = Duration::from_secs(15);
const BUDGET_WINDOW: Duration = Duration::from_secs(60);
const FRESH_WINDOW: Duration = Duration::from_secs(45);
const BACKTEST_LIMIT: Duration = Duration::from_secs(300);
/// The back-test's fetch size (`rdstation_sink::backtest`), used by the raw read too.
const FETCH_BYTES: &str = "65536";
const RULES: &str = include_str!("../../../../services/rdstation-sink/config/rules.example.toml");

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The load generator (a child process): orders `first..first+count` of customers
/// `customer_base + n % customers`, at `rate` per second (0: as fast as possible), open loop;
/// writes `order_id sent_ms` lines to `out`.
async fn load() -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).map_err(|_| anyhow::anyhow!("{k} unset"));
    let topic = var("ELO_BENCH_RD_TOPIC")?;
    let first: usize = var("ELO_BENCH_RD_FIRST")?.parse()?;
    let count: usize = var("ELO_BENCH_RD_COUNT")?.parse()?;
    let customers: usize = var("ELO_BENCH_RD_CUSTOMERS")?.parse()?;
    let customer_base: usize = var("ELO_BENCH_RD_CUSTOMER_BASE")?.parse()?;
    let rate: f64 = var("ELO_BENCH_RD_RATE")?.parse()?;
    let out = var("ELO_BENCH_RD_OUT")?;
    let kafka = KafkaArgs {
        idempotence: std::env::var("ELO_KAFKA_IDEMPOTENCE").map_or(true, |v| v != "false"),
        ..KafkaArgs::local(brokers())
    };
    let producer: FutureProducer = crate::raw_producer_config(&kafka).create()?;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url()))?;
    let started = Instant::now();
    let mut sent = String::new();
    let mut deliveries = Vec::with_capacity(count);
    for i in 0..count {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let n = first + i;
        let now = now_ms();
        let event = rd_order("bench", 1_000_000, n, customer_base + n % customers, now);
        let bytes = codec.encode(&topic, &event).await?;
        let key = event.customer_key.clone();
        let delivery = producer
            .send_result(FutureRecord::to(&topic).key(&key).payload(&bytes))
            .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?;
        deliveries.push(delivery);
        sent.push_str(&format!("{} {now}\n", event.order.as_ref().expect("order").increment_id));
    }
    for delivery in deliveries {
        delivery.await?.map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    std::fs::write(out, sent)?;
    Ok(())
}

/// Starts the load generator process.
fn generator(
    topic: &str,
    first: usize,
    count: usize,
    customers: (usize, usize),
    rate: f64,
    out: &Path,
) -> anyhow::Result<ChildGuard> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .env("ELO_BENCH", "rdstation")
        .env("ELO_BENCH_RD_LOAD", "1")
        .env("ELO_BENCH_RD_TOPIC", topic)
        .env("ELO_BENCH_RD_FIRST", first.to_string())
        .env("ELO_BENCH_RD_COUNT", count.to_string())
        .env("ELO_BENCH_RD_CUSTOMER_BASE", customers.0.to_string())
        .env("ELO_BENCH_RD_CUSTOMERS", customers.1.to_string())
        .env("ELO_BENCH_RD_RATE", rate.to_string())
        .env("ELO_BENCH_RD_OUT", out);
    Ok(ChildGuard::spawn("rd-loadgen", &mut command))
}

fn wait_exit(child: &mut ChildGuard, timeout: Duration, what: &str) -> anyhow::Result<()> {
    let status = child.wait_timeout(timeout).ok_or_else(|| anyhow::anyhow!("{what} did not finish"))?;
    anyhow::ensure!(status.success(), "{what} failed: {status:?}");
    Ok(())
}

/// Contact requests RD received so far, and how many it refused with 429.
fn contact_requests(rd: &sandbox::rdstation::RdStationApp) -> u64 {
    let counters = rd.counters.snapshot();
    counters["rdstation"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.contains("/platform/contacts")).filter_map(|(_, v)| v.as_u64()).sum())
        .unwrap_or(0)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
}

/// Sum of every series of `name` whose labels contain `filter` (`""`: all).
fn metric_sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?;
            (labels.is_empty() || labels.starts_with('{')).then_some(())?;
            labels.contains(filter).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Where the sink's time went between two `/metrics` scrapes: mean batch duration, mean RD
/// request, mean produce acknowledgement per topic (state, sent-log, outcomes), records done.
fn breakdown(before: &str, after: &str, state_topic: &str, sent_topic: &str) -> (String, Value) {
    let delta = |name: &str, filter: &str| metric_sum(after, name, filter) - metric_sum(before, name, filter);
    let mean_ms = |name: &str, filter: &str| {
        let n = delta(&format!("{name}_count"), filter);
        if n > 0.0 { delta(&format!("{name}_sum"), filter) / n * 1000.0 } else { 0.0 }
    };
    let batch = mean_ms("elo_consumer_batch_duration_seconds", "");
    let batches = delta("elo_consumer_batch_duration_seconds_count", "");
    let records = delta("elo_consumer_records_total", "");
    let http = mean_ms("elo_http_client_request_duration_seconds", "rdstation");
    let state = mean_ms("elo_kafka_produce_latency_seconds", &format!("\"{state_topic}\""));
    let sent = mean_ms("elo_kafka_produce_latency_seconds", &format!("\"{sent_topic}\""));
    let outcomes = mean_ms("elo_kafka_produce_latency_seconds", ".outcomes\"");
    let deferred = delta("rdstation_sink_deferred_updates_total", "");
    let text = format!(
        "{batches:.0} batches ({:.1} records each), mean batch {batch:.0} ms; mean RD request {http:.0} ms; mean produce ack: state {state:.0} ms, sent-log {sent:.0} ms, outcomes {outcomes:.0} ms; {deferred:.0} contact updates deferred",
        if batches > 0.0 { records / batches } else { 0.0 }
    );
    let json = serde_json::json!({"batches": batches, "records": records, "batch_ms": batch, "rd_request_ms": http, "state_ack_ms": state, "sent_log_ack_ms": sent, "outcome_ack_ms": outcomes, "deferred": deferred});
    (text, json)
}

fn peak_rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) async fn rdstation(rows: &mut Vec<Value>) -> anyhow::Result<()> {
    if std::env::var("ELO_BENCH_RD_LOAD").is_ok() {
        return load().await;
    }
    let dir = tempfile::tempdir()?;
    let (rd, rd_url) = serve_rdstation(RdConfig::default()).await;
    let limit_per_minute = rd.sim.lock().expect("rd lock").config.contacts_per_minute as f64;
    write_rd_credentials(dir.path(), &rd, &rd_url).await;
    rd.faults
        .set("rdstation", sandbox::faults::FaultConfig { latency_fixed_ms: Some(LATENCY_MS), ..Default::default() });
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES)?;
    let topic = unique("bench.rd.commerce");
    create_topics(&brokers(), &[(&topic, PARTITIONS)]).await;

    // The backlog, before the sink starts.
    let mut backlog =
        generator(&topic, 0, BACKLOG_ORDERS, (0, BACKLOG_CUSTOMERS), 0.0, &dir.path().join("backlog.sent"))?;
    wait_exit(&mut backlog, Duration::from_secs(120), "the backlog generator")?;

    // The release sink, the test harness's settings but production budget and concurrency.
    let base = rdstation_sink(dir.path(), &topic, &unique("bench.rd.group"), &rd_url, &rules, "sink");
    let mut command = Command::new(crate::push::sibling("rdstation-sink")?);
    for (key, value) in base.get_envs() {
        if let Some(value) = value
            && !matches!(
                key.to_str(),
                Some("ELO_RDSTATION_CONTACTS_PER_MINUTE" | "ELO_RDSTATION_RULES_RELOAD_INTERVAL")
            )
        {
            command.env(key, value);
        }
    }
    let admin = free_port();
    command
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("ELO_TOPIC_PARTITIONS", PARTITIONS.to_string())
        .env("ELO_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("sink.log"))?);
    let sink = ChildGuard::spawn("rdstation-sink", &mut command);
    let started = Instant::now();

    // Budget: RD's count of contact requests over the window, after the warm-up.
    tokio::time::sleep(WARMUP).await;
    let (before, t0) = (contact_requests(&rd), Instant::now());
    tokio::time::sleep(BUDGET_WINDOW).await;
    let (after, window) = (contact_requests(&rd), t0.elapsed());
    let per_minute = (after - before) as f64 * 60.0 / window.as_secs_f64();
    let share = per_minute / limit_per_minute;
    println!(
        "rdstation budget under a backlog      {per_minute:>8.1} contact requests/min of RD's {limit_per_minute:.0}: share {:.1}% (target >= 90%)",
        share * 100.0
    );
    rows.push(serde_json::json!({"benchmark": "rdstation budget share", "unit": "share of RD's limit", "elo": share, "per_minute": per_minute, "limit_per_minute": limit_per_minute, "target": 0.9}));

    // Freshness at RATE orders/s of new customers, with the contact backlog still being worked.
    let count = (RATE * (WARMUP + FRESH_WINDOW).as_secs_f64()) as usize;
    let sent_file = dir.path().join("fresh.sent");
    let mut fresh = generator(&topic, BACKLOG_ORDERS, count, (BACKLOG_CUSTOMERS, 100_000), RATE, &sent_file)?;
    let scrape = || async { reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await?.text().await };
    tokio::time::sleep(WARMUP).await;
    let metrics_before = scrape().await?;
    tokio::time::sleep(FRESH_WINDOW).await;
    let metrics_after = scrape().await?;
    wait_exit(&mut fresh, WARMUP + FRESH_WINDOW + Duration::from_secs(60), "the load generator")?;
    let sent: Vec<(String, i64)> = std::fs::read_to_string(&sent_file)?
        .lines()
        .filter_map(|l| l.split_once(' ').and_then(|(o, t)| Some((o.to_owned(), t.parse().ok()?))))
        .collect();
    let measured_from = sent.first().map_or(0, |(_, t)| *t) + WARMUP.as_millis() as i64;
    let placed = |rd: &sandbox::rdstation::RdStationApp| -> HashMap<String, i64> {
        rd.sim
            .lock()
            .expect("rd lock")
            .events
            .iter()
            .filter(|e| e["event_type"] == "ECOMMERCE_ORDER_PLACED")
            .filter_map(|e| Some((e["payload"]["order_id"].as_str()?.to_owned(), e["received_at_ms"].as_i64()?)))
            .collect()
    };
    let all_in = wait_until(Duration::from_secs(300), || {
        let got = placed(&rd);
        sent.iter().all(|(o, _)| got.contains_key(o))
    })
    .await;
    anyhow::ensure!(all_in, "not every order's event reached RD; see {}", dir.path().join("sink.log").display());
    let got = placed(&rd);
    let mut latencies: Vec<f64> =
        sent.iter().filter(|(_, t)| *t >= measured_from).map(|(o, t)| (got[o] - t) as f64).collect();
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));

    // Baseline: the same kind of event posted straight to the simulator, one at a time.
    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("{rd_url}/auth/token"))
        .json(&serde_json::json!({"client_id": "elo-rd-client", "client_secret": "elo-rd-secret", "refresh_token": std::fs::read_to_string(dir.path().join("rd-refresh-token"))?.trim()}))
        .send()
        .await?
        .json()
        .await?;
    let token = token["access_token"].as_str().unwrap_or_default().to_owned();
    let mapping = rdstation_sink::events::EventMapping::default_mapping();
    let mut direct = Vec::new();
    for n in 0..50 {
        let body = &mapping.events_for(&rd_order("bench", 1_000_000, 10_000_000 + n, 900_000 + n, now_ms()))[0].body;
        let t = Instant::now();
        let status =
            http.post(format!("{rd_url}/platform/events")).bearer_auth(&token).json(body).send().await?.status();
        anyhow::ensure!(status.is_success(), "direct event: {status}");
        direct.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    direct.sort_by(f64::total_cmp);
    let direct_p50 = percentile(&direct, 0.5);
    println!(
        "rdstation freshness at {RATE:.0} orders/s   p50 {p50:>6.0} ms  p99 {p99:>6.0} ms over {} orders   direct post p50 {direct_p50:>5.0} ms   ratio p50 {:.2}",
        latencies.len(),
        p50 / direct_p50
    );
    let (state_topic, sent_topic) = (format!("{topic}.rd-state"), format!("{topic}.rd-sent"));
    let (text, parts) = breakdown(&metrics_before, &metrics_after, &state_topic, &sent_topic);
    println!("rdstation freshness window breakdown   {text}");
    rows.push(serde_json::json!({"benchmark": "rdstation freshness order -> RD", "unit": "ms", "rate": RATE, "latency_ms": LATENCY_MS, "p50": p50, "p99": p99, "orders": latencies.len(), "baseline": "direct post p50", "baseline_value": direct_p50, "ratio": p50 / direct_p50, "breakdown": parts}));

    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await?.text().await?;
    let rate_limited = metric(&metrics, "rdstation_sink_rate_limited_total");
    println!("rdstation 429s received over the run   {rate_limited:.0} (target 0)");
    rows.push(serde_json::json!({"benchmark": "rdstation 429s received", "unit": "responses", "elo": rate_limited, "target": 0}));
    let rss = peak_rss_mib(sink.pid());
    println!(
        "rdstation-sink peak RSS                {rss:>8.1} MiB (over {:.0} s, {} orders)",
        started.elapsed().as_secs_f64(),
        BACKLOG_ORDERS + count
    );
    rows.push(serde_json::json!({"benchmark": "rdstation-sink peak RSS", "unit": "MiB", "elo": rss}));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "rdstation load average (1/5/15 min)    {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    drop(sink);

    // Back-test over the whole history, against a raw read of the same records.
    let records = (BACKLOG_ORDERS + count) as f64;
    // Bounded: on a loaded machine Tansu's fetches of the whole history have timed out for
    // good (seen once, 2026-11-30); then the figure is missing, not the rest of the report.
    let t = Instant::now();
    let mut command = Command::new(crate::push::sibling("rdstation-sink")?);
    command
        .args(["rules", "backtest"])
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_TOPIC_COMMERCE", &topic)
        .env("ELO_RDSTATION_RULES_FILE", &rules)
        .env("ELO_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("backtest.log"))?);
    let mut job = ChildGuard::spawn("rdstation-sink rules backtest", &mut command);
    let Some(status) = job.wait_timeout(BACKTEST_LIMIT) else {
        println!("rdstation rules backtest              did not finish in {BACKTEST_LIMIT:?}: not measured");
        rows.push(serde_json::json!({"benchmark": "rdstation rules backtest", "unit": "orders/s", "elo": null, "note": "did not finish"}));
        return Ok(());
    };
    let backtest = t.elapsed();
    anyhow::ensure!(status.success(), "backtest failed: {status:?}");
    // Tansu 0.6 scans its whole header table for every record it serves: the figure depends
    // on how many records with headers the broker holds (the sink's outcomes carry one).
    if let Ok(data) = std::env::var("ELO_STACK_DATA")
        && let Ok(out) =
            Command::new("sqlite3").arg(format!("{data}/tansu/tansu.db")).arg("select count(*) from header").output()
    {
        let headers = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!(
            "rdstation rules backtest              broker holds {headers} header rows (Tansu scans them per record served)"
        );
    }
    let t = Instant::now();
    let read = tokio::task::block_in_place(|| raw_read(&topic, records as usize))?;
    let raw = t.elapsed();
    crate::report(
        rows,
        "rdstation rules backtest",
        "orders/s",
        records / backtest.as_secs_f64(),
        "raw consumer read",
        read as f64 / raw.as_secs_f64(),
    );
    Ok(())
}

/// Reads `expect` records of `topic` from the beginning with a plain consumer; returns the count.
fn raw_read(topic: &str, expect: usize) -> anyhow::Result<usize> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("fetch.max.bytes", FETCH_BYTES)
        .set("max.partition.fetch.bytes", FETCH_BYTES)
        .set("message.max.bytes", FETCH_BYTES)
        .set("group.id", unique("bench.rd.raw"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut partitions = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&partitions)?;
    let deadline = Instant::now() + BACKTEST_LIMIT;
    let mut n = 0;
    while n < expect && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            message?;
            n += 1;
        }
    }
    Ok(n)
}
