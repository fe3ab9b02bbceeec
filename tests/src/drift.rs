//! Helpers of the reconciler's drift end-to-end test (`tests/reconciler_drift.rs`): the
//! reconciler's command line, its metrics, and the budget and ground-truth checks.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{binary, brokers, free_port, registry_url};

/// Partitions of the test's topics.
pub const PARTITIONS: u32 = 3;

/// A sweep's account budget: calls a minute, and the limiter's burst (a tenth of it).
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub per_minute: u64,
}

impl Rate {
    pub fn burst(self) -> u64 {
        (self.per_minute / 10).max(1)
    }
}

/// The reconciler against the three APIs (`[magento, salesforce, rd]`), its sweeps bound by
/// their rates alone: an interval of a few milliseconds, so a round starts as soon as the last
/// one ended and every sweep spends all its replica may.
pub fn reconciler_command(
    dir: &Path,
    topic: &str,
    admin: u16,
    urls: [&str; 3],
    rates: [Rate; 3],
    log: &str,
) -> Command {
    let [magento, salesforce, rd] = urls;
    let [magento_rate, salesforce_rate, rd_rate] = rates;
    let mut command = Command::new(binary("reconciler"));
    command
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        // Its own reports port: a taken one stops the service (make run may hold 9180).
        .env("ELO_RECONCILER_HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("ELO_TOPIC_COMMERCE", topic)
        .env("ELO_TOPIC_OUTCOMES", format!("{topic}.outcomes"))
        .env("ELO_TOPIC_COMMANDS", format!("{topic}.commands"))
        .env("ELO_TOPIC_INVENTORY", format!("{topic}.inventory"))
        .env("ELO_TOPIC_PARTITIONS", PARTITIONS.to_string())
        .env("ELO_DLQ_TOPIC", format!("{topic}.recon-dlq"))
        .env("ELO_CONSUMER_GROUP", format!("{topic}.recon-group"))
        .env("ELO_RECONCILER_LEDGER_TOPIC", format!("{topic}.ledger"))
        .env("ELO_RECONCILER_STOCK_TOPIC", format!("{topic}.stock"))
        .env("ELO_RECONCILER_NEGATIVE_STOCK_GRACE", "1s")
        // Debug builds on a shared machine: a generous SLA, so the initial load is not "overdue".
        .env("ELO_RECONCILER_TARGETS", "salesforce:120s,rdstation:120s")
        // Longer than a repair takes here: every drift found costs exactly one command.
        .env("ELO_RECONCILER_REPAIR_BACKOFF", "60s")
        .env("ELO_RECONCILER_CHECK_INTERVAL", "2s")
        .env("ELO_MAGENTO_URL", magento)
        // The simulator's orders start on 2026-11-01: look back ten years.
        .env("ELO_RECONCILER_MAGENTO_SWEEP_WINDOW", "5256000m")
        .env("ELO_RECONCILER_MAGENTO_SWEEP_INTERVAL", "10ms")
        .env("ELO_RECONCILER_MAGENTO_SWEEP_CALLS_PER_MINUTE", magento_rate.per_minute.to_string())
        .env("ELO_RECONCILER_SWEEP_GRACE", "5s")
        .env("ELO_SALESFORCE_LOGIN_URL", salesforce)
        .env("ELO_RECONCILER_SALESFORCE_SWEEP_INTERVAL", "10ms")
        .env("ELO_RECONCILER_SALESFORCE_SWEEP_CALLS_PER_MINUTE", salesforce_rate.per_minute.to_string())
        .env("ELO_RDSTATION_URL", rd)
        .env("ELO_RDSTATION_CLIENT_SECRET_FILE", dir.join("rd-client-secret"))
        .env("ELO_RDSTATION_REFRESH_TOKEN_FILE", dir.join("rd-refresh-token"))
        .env("ELO_RECONCILER_RDSTATION_SWEEP_INTERVAL", "10ms")
        .env("ELO_RECONCILER_RDSTATION_SWEEP_CALLS_PER_MINUTE", rd_rate.per_minute.to_string())
        // A contact write the sink deferred lands within seconds here.
        .env("ELO_RECONCILER_RDSTATION_SWEEP_DEFERRED_HOLD", "20s")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{log}.log"))).expect("log file"));
    command
}

/// `name{labels}` → value, from a Prometheus text page.
pub async fn metrics(admin: u16) -> BTreeMap<String, f64> {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else { return BTreeMap::new() };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("reconciler_"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect()
}

/// [`metrics`] summed over replicas.
pub async fn metrics_of(admins: &[u16]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for admin in admins {
        for (k, v) in metrics(*admin).await {
            *out.entry(k).or_insert(0.0) += v;
        }
    }
    out
}

pub fn metric(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// The sum of every series of metric `prefix` (e.g. `reconciler_drift_found_total`) whose
/// labels contain each of `labels`.
pub fn metric_sum(m: &BTreeMap<String, f64>, prefix: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(&format!("{prefix}{{")) && labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

/// Drift found, by `kind/target`, every kind and target the metrics name.
pub fn drift_found(m: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, v) in m.iter().filter(|(k, _)| k.starts_with("reconciler_drift_found_total{")) {
        let label = |name: &str| {
            k.split(&format!("{name}=\"")).nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("?").to_owned()
        };
        if *v > 0.0 {
            out.insert(format!("{}/{}", label("kind"), label("target")), *v);
        }
    }
    out
}

/// Magento orders whose current status Salesforce does not show (missing or stale).
pub fn salesforce_behind(magento: &sandbox::magento::MagentoApp, sf: &sandbox::salesforce::SalesforceApp) -> Vec<i64> {
    let orders: Vec<(i64, String)> = magento
        .sim
        .lock()
        .unwrap()
        .orders
        .iter()
        .map(|(id, o)| (*id, o["status"].as_str().unwrap_or_default().to_owned()))
        .collect();
    let sim = sf.sim.lock().unwrap();
    let in_sf: BTreeMap<String, String> = sim
        .org
        .records
        .values()
        .filter(|r| r.object == "Order")
        .filter_map(|r| {
            let id = r.fields.get("Elo_Id__c")?.as_str()?.to_owned();
            Some((id, r.fields.get("Magento_Status__c").and_then(Value::as_str).unwrap_or_default().to_owned()))
        })
        .collect();
    orders.into_iter().filter(|(id, status)| in_sf.get(&format!("o:{id}")) != Some(status)).map(|(id, _)| id).collect()
}

/// What a sweep spent over a window, as the API saw it.
#[derive(Clone, Copy, Debug)]
pub struct Spend {
    pub calls: u64,
    /// The account's budget over the window: its rate, plus each replica's burst.
    pub budget: f64,
    /// The least a saturated sweep spends over the window (see [`saturated_within_budget`]).
    pub floor: f64,
    pub minutes: f64,
}

/// The part of the account's rate replicas holding `held` partitions (of [`PARTITIONS`]) can
/// spend: a call costs `partitions / held` cells, rounded up (2 and 1 of 3: 1/2 + 1/3).
pub fn spendable_share(held: &[u32]) -> f64 {
    held.iter().filter(|h| **h > 0).map(|h| 1.0 / f64::from(PARTITIONS.div_ceil(*h))).sum()
}

/// Asserts a sweep whose rounds are bound by its rate alone spent, over `elapsed`, at most the
/// account's budget (its rate, plus the `replicas`' bursts) and at least 80% of what replicas
/// holding `held` partitions can spend (their [`spendable_share`] of the rate): the budget,
/// not the interval or anything else, is what bounds it, so a budget per replica (twice the
/// spend) would fail the first bound.
pub fn saturated_within_budget(sweep: &str, calls: u64, rate: Rate, held: &[u32], elapsed: Duration) -> Spend {
    let minutes = elapsed.as_secs_f64() / 60.0;
    let replicas = held.iter().filter(|h| **h > 0).count() as f64;
    let budget = rate.per_minute as f64 * minutes + replicas * rate.burst() as f64;
    let floor = 0.8 * spendable_share(held) * rate.per_minute as f64 * minutes;
    assert!(calls as f64 <= budget, "{sweep}: the API saw {calls} calls, over the account's budget of {budget:.1}");
    assert!(
        calls as f64 >= floor,
        "{sweep}: {calls} calls in {minutes:.2} min, under {floor:.1}: the sweep is not bound by its budget"
    );
    Spend { calls, budget, floor, minutes }
}

/// Asserts a sweep spent at most the account's budget over `elapsed` (one replica's burst on
/// top) and ran.
pub fn within_budget(sweep: &str, calls: u64, rate: Rate, elapsed: Duration) -> Spend {
    let minutes = elapsed.as_secs_f64() / 60.0;
    let budget = rate.per_minute as f64 * minutes + rate.burst() as f64;
    assert!(calls > 0, "the {sweep} sweep ran");
    assert!(calls as f64 <= budget, "{sweep}: the API saw {calls} calls, over the account's budget of {budget:.1}");
    Spend { calls, budget, floor: 0.0, minutes }
}
