//! The reconciler's acceptance on the real broker with the sandbox: Magento loses 1% of its
//! webhooks, and once everything settled, 1% of the Salesforce orders are deleted (one order
//! and one Account edited, one Account deleted) and 1% of the RD Station contacts edited
//! behind Elo's back. The reconciler (ledger, sweeps, repair
//! commands through order-ingest and the sinks) must find and repair all of it within a
//! bounded time, spending API calls within its budgets: counted by the sandbox side (a proxy
//! in front of each API the reconciler calls), per account, with two replicas sweeping at
//! once after the restart. The figures are printed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use elo_integration_tests::proxy::{CountingProxy, counting_proxy};
use elo_integration_tests::*;
use sandbox::magento::webhook::{WebhookConfig, WebhookStyle};
use sandbox::rdstation::RdConfig;
use sandbox::salesforce::SalesforceConfig;
use serde_json::{Value, json};

const SECRET: &str = "e2e-webhook-secret-0123456789";
/// Facts the Magento generator makes (orders and status changes).
const FACTS: usize = 600;
const MAGENTO_PER_MINUTE: u64 = 120;
const SALESFORCE_PER_MINUTE: u64 = 60;
/// Low enough that one replica's rounds would spend it all: two replicas each spending the
/// whole rate (a budget per replica) exceed it.
const RD_PER_MINUTE: u64 = 40;

fn reconciler(dir: &Path, topic: &str, admin: u16, urls: [&str; 3], log: &str) -> Command {
    let [magento, salesforce, rd] = urls;
    let mut command = Command::new(binary("reconciler"));
    command
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        // Its own reports port: a taken one stops the service (make run may hold 9180).
        .env("ELO_RECONCILER_HTTP_LISTEN", format!("127.0.0.1:{}", elo_integration_tests::free_port()))
        .env("ELO_TOPIC_COMMERCE", topic)
        .env("ELO_TOPIC_OUTCOMES", format!("{topic}.outcomes"))
        .env("ELO_TOPIC_COMMANDS", format!("{topic}.commands"))
        .env("ELO_TOPIC_INVENTORY", format!("{topic}.inventory"))
        .env("ELO_TOPIC_PARTITIONS", "3")
        .env("ELO_DLQ_TOPIC", format!("{topic}.recon-dlq"))
        .env("ELO_CONSUMER_GROUP", format!("{topic}.recon-group"))
        .env("ELO_RECONCILER_LEDGER_TOPIC", format!("{topic}.ledger"))
        .env("ELO_RECONCILER_STOCK_TOPIC", format!("{topic}.stock"))
        .env("ELO_RECONCILER_NEGATIVE_STOCK_GRACE", "1s")
        // Debug builds on a shared machine: a generous SLA, so the initial load is not "overdue".
        .env("ELO_RECONCILER_TARGETS", "salesforce:120s,rdstation:120s")
        .env("ELO_RECONCILER_REPAIR_BACKOFF", "20s")
        .env("ELO_RECONCILER_CHECK_INTERVAL", "2s")
        .env("ELO_MAGENTO_URL", magento)
        // The simulator's orders start on 2026-11-01: look back ten years.
        .env("ELO_RECONCILER_MAGENTO_SWEEP_WINDOW", "5256000m")
        .env("ELO_RECONCILER_MAGENTO_SWEEP_INTERVAL", "8s")
        .env("ELO_RECONCILER_MAGENTO_SWEEP_CALLS_PER_MINUTE", MAGENTO_PER_MINUTE.to_string())
        .env("ELO_RECONCILER_SWEEP_GRACE", "5s")
        .env("ELO_SALESFORCE_LOGIN_URL", salesforce)
        .env("ELO_RECONCILER_SALESFORCE_SWEEP_INTERVAL", "8s")
        .env("ELO_RECONCILER_SALESFORCE_SWEEP_CALLS_PER_MINUTE", SALESFORCE_PER_MINUTE.to_string())
        .env("ELO_RDSTATION_URL", rd)
        .env("ELO_RDSTATION_CLIENT_SECRET_FILE", dir.join("rd-client-secret"))
        .env("ELO_RDSTATION_REFRESH_TOKEN_FILE", dir.join("rd-refresh-token"))
        .env("ELO_RECONCILER_RDSTATION_SWEEP_INTERVAL", "8s")
        .env("ELO_RECONCILER_RDSTATION_SWEEP_CALLS_PER_MINUTE", RD_PER_MINUTE.to_string())
        // librdkafka's default session timeout (45 s): the reconciler is only ever stopped
        // gracefully here, and a loaded broker can leave heartbeats unanswered for seconds.
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{log}.log"))).expect("log file"));
    command
}

/// `name{labels}` → value, from a Prometheus text page.
async fn metrics(admin: u16) -> BTreeMap<String, f64> {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else { return BTreeMap::new() };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("reconciler_"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect()
}

/// [`metrics`] summed over replicas.
async fn metrics_of(admins: &[u16]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for admin in admins {
        for (k, v) in metrics(*admin).await {
            *out.entry(k).or_insert(0.0) += v;
        }
    }
    out
}

fn metric(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// Magento orders whose current status Salesforce does not show (missing or stale).
fn salesforce_behind(magento: &sandbox::magento::MagentoApp, sf: &sandbox::salesforce::SalesforceApp) -> Vec<i64> {
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

/// Asserts each sweep ran and that the API, as the sandbox saw it (the proxies), got no more
/// of the reconciler's calls than the account's budget over `elapsed` (a minute's worth on top
/// for the limiters' bursts); returns (calls, budget, minutes) per sweep.
fn within_budget(
    proxies: &[(&'static str, &CountingProxy, u64)],
    elapsed: Duration,
) -> BTreeMap<&'static str, (u64, f64, f64)> {
    let minutes = elapsed.as_secs_f64() / 60.0;
    let mut calls = BTreeMap::new();
    for (sweep, proxy, per_minute) in proxies {
        let spent = proxy.calls();
        let budget = (*per_minute as f64 * (minutes + 1.0)).floor();
        assert!(spent > 0, "the {sweep} sweep ran");
        assert!(spent as f64 <= budget, "{sweep}: the API saw {spent} calls, over the account's budget of {budget}");
        calls.insert(*sweep, (spent, budget, (minutes * 10.0).round() / 10.0));
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_behind_elos_back_is_found_and_repaired_within_budget() {
    // A broker of its own: see `use_private_broker`.
    let (_broker, _broker_dir) = elo_integration_tests::use_private_broker();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let topic = unique("e2e.recon");
    let (magento, magento_url) = serve_magento(0).await;
    let (sf, sf_url, _) = serve_salesforce(SalesforceConfig::default()).await;
    let (rd, rd_url) = serve_rdstation(RdConfig {
        contacts_per_minute: 1_000_000,
        patches_per_contact_per_day: 1_000,
        ..RdConfig::default()
    })
    .await;
    std::fs::write(dir.path().join("rd-client-secret"), "elo-rd-secret\n").unwrap();
    std::fs::write(dir.path().join("rd-refresh-token"), rd_refresh_token(&rd, &rd_url).await).unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"everyone\"\nstage = \"Lead\"\n").unwrap();

    let listen = free_port();
    let commands = format!("{topic}.commands");
    let _ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "ingest")
            .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{listen}"))
            .env("ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE", &secret_file),
    );
    let _sf_sink = ChildGuard::spawn(
        "salesforce-sink",
        salesforce_sink(dir.path(), &topic, &sf_url, "sf-sink").env("ELO_TOPIC_COMMANDS", &commands),
    );
    let _rd_sink = ChildGuard::spawn(
        "rdstation-sink",
        rdstation_sink(dir.path(), &topic, &format!("{topic}.rd-group"), &rd_url, &rules, "rd-sink")
            .env("ELO_TOPIC_COMMANDS", &commands),
    );
    let admin = free_port();
    // The reconciler reaches each API through a proxy that counts its calls.
    let (magento_proxy, sf_proxy, rd_proxy) =
        (counting_proxy(&magento_url).await, counting_proxy(&sf_url).await, counting_proxy(&rd_url).await);
    let proxies = [
        ("magento", &magento_proxy, MAGENTO_PER_MINUTE),
        ("salesforce", &sf_proxy, SALESFORCE_PER_MINUTE),
        ("rdstation", &rd_proxy, RD_PER_MINUTE),
    ];
    let urls = [magento_proxy.url.as_str(), sf_proxy.url.as_str(), rd_proxy.url.as_str()];
    let first_started = Instant::now();
    let mut first = ChildGuard::spawn("reconciler", &mut reconciler(dir.path(), &topic, admin, urls, "reconciler"));
    let up = wait_until(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()).await;
    assert!(up, "push endpoint never listened:\n{}", log(dir.path(), "ingest"));

    // Magento loses every webhook of 1% of its orders (those whose id ends in 07: chosen, not
    // drawn, so every run loses some), so only the sweep can bring them in.
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(magento.clone(), shutdown.clone()));
    {
        let mut sim = magento.sim.lock().unwrap();
        sim.webhook = WebhookConfig {
            url: Some(format!("http://127.0.0.1:{listen}/webhooks/magento/orders")),
            customer_url: None,
            secret: SECRET.into(),
            duplicate_rate: 0.0,
            style: WebhookStyle::Plain,
            ..Default::default()
        };
        sim.webhook_drop_rate = 0.0;
        sim.generate(FACTS);
        // Still under the lock: the dispatcher has sent nothing yet.
        let lost_id = |n: &sandbox::magento::webhook::Notification| {
            n.id.strip_prefix("order-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|id| id.parse::<i64>().ok())
                .filter(|id| id % 100 == 7)
        };
        let lost: BTreeSet<i64> = sim.outbox.queue.iter().filter_map(lost_id).collect();
        sim.outbox.queue.retain(|n| lost_id(n).is_none());
        sim.outbox.dropped_orders = lost.into_iter().collect();
    }
    let generated = Instant::now();
    let (orders, lost) = {
        let sim = magento.sim.lock().unwrap();
        (sim.orders.len(), sim.outbox.dropped_orders.clone())
    };
    assert!(!lost.is_empty(), "some orders lose their webhooks");

    // Phase 1: every order reaches Salesforce at its current status, lost webhooks included.
    let deadline = generated + Duration::from_secs(150);
    let mut behind = salesforce_behind(&magento, &sf);
    while !behind.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        behind = salesforce_behind(&magento, &sf);
    }
    let m = metrics(admin).await;
    assert!(
        behind.is_empty(),
        "{} orders never reached Salesforce at their current status ({:?}...), lost webhooks {lost:?}\nmetrics {m:#?}\n{}",
        behind.len(),
        &behind[..behind.len().min(10)],
        log(dir.path(), "reconciler")
    );
    let converged = generated.elapsed();
    let lost_found = metric(&m, "reconciler_drift_found_total{kind=\"source_ahead\",target=\"magento\"}");
    assert!(
        lost_found >= lost.len() as f64,
        "the Magento sweep found {lost_found} lost orders of {}:\n{}",
        lost.len(),
        log(dir.path(), "reconciler")
    );

    // RD: every order's customer has a contact.
    let contacts = || rd.sim.lock().unwrap().contacts.len();
    let customers: BTreeSet<String> = magento
        .sim
        .lock()
        .unwrap()
        .orders
        .values()
        .filter_map(|o| o["customer_email"].as_str().map(str::to_lowercase))
        .collect();
    let all_contacts = wait_until(Duration::from_secs(60), || contacts() >= customers.len()).await;
    assert!(all_contacts, "{} contacts for {} customers:\n{}", contacts(), customers.len(), log(dir.path(), "rd-sink"));
    // Let the ledger see the last outcomes (the sweeps only judge what was confirmed a while ago).
    let mut settled = false;
    let settling = Instant::now();
    while !settled && settling.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let m = metrics(admin).await;
        settled = ["salesforce", "rdstation"]
            .iter()
            .all(|t| metric(&m, &format!("reconciler_records{{state=\"confirmed\",target=\"{t}\"}}")) >= orders as f64);
    }
    assert!(settled, "the ledger never saw every order confirmed:\n{}", log(dir.path(), "reconciler"));

    // A restart: the ledger comes back from its changelog, not from the input's history (the
    // group's offsets are committed, so without the restore it would know no order at all and
    // the sweeps below would find nothing).
    let first_calls = within_budget(&proxies, first_started.elapsed());
    first.signal("TERM");
    assert!(first.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "graceful stop");
    // Two replicas from now on: the sweeps' budget is the account's, shared between them.
    let restarted = Instant::now();
    let admins = [free_port(), free_port()];
    let _second = ChildGuard::spawn("reconciler", &mut reconciler(dir.path(), &topic, admins[0], urls, "reconciler2"));
    let _third = ChildGuard::spawn("reconciler", &mut reconciler(dir.path(), &topic, admins[1], urls, "reconciler3"));
    let mut restored = false;
    while !restored && restarted.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let held =
            [metrics(admins[0]).await, metrics(admins[1]).await].map(|m| metric(&m, "reconciler_ledger_partitions"));
        restored = held.iter().all(|h| *h > 0.0)
            && held.iter().sum::<f64>() == 3.0
            && metric(&metrics_of(&admins).await, "reconciler_ledger_entries{kind=\"order\"}") >= orders as f64;
    }
    let logs = || format!("{}\n{}", log(dir.path(), "reconciler2"), log(dir.path(), "reconciler3"));
    assert!(restored, "the ledger was not restored on the two replicas:\n{}", logs());
    let restore_time = restarted.elapsed();

    // Phase 2: behind Elo's back, 1% of the Salesforce orders deleted, 1% of the contacts edited.
    let tampered = Instant::now();
    // And two Accounts: one deleted (of an order still there), one renamed.
    type Accounts = ((String, String), (String, Value));
    let (deleted, sf_edited, accounts): (Vec<String>, (String, Value), Accounts) = {
        let mut sim = sf.sim.lock().unwrap();
        let mut ids: Vec<(String, String)> = sim
            .org
            .records
            .iter()
            .filter(|(_, r)| r.object == "Order")
            .map(|(id, r)| (r.fields["Elo_Id__c"].as_str().unwrap().to_owned(), id.clone()))
            .collect();
        ids.sort();
        let picked: Vec<(String, String)> = ids.iter().step_by(100).cloned().collect();
        for (_, id) in &picked {
            sim.org.remove_record(id);
        }
        // And one order's status edited by hand (found by LastModifiedDate), as the control
        // API's PATCH /salesforce/records/{id} does.
        let (external, id) = ids[50].clone();
        let status = sim.org.records.get(&id).unwrap().fields["Magento_Status__c"].clone();
        let edit = serde_json::Map::from_iter([("Magento_Status__c".to_owned(), json!("edited_by_hand"))]);
        sim.org.alter(&id, &edit, sandbox::now_ms());
        let account_of =
            |id: &str| sim.org.records.get(id).and_then(|r| r.fields["AccountId"].as_str()).map(str::to_owned);
        let (gone_order, order_id) = ids[30].clone();
        let gone = account_of(&order_id).expect("an order with an Account");
        let renamed =
            ids[70..].iter().filter_map(|(_, id)| account_of(id)).find(|a| *a != gone).expect("another Account");
        sim.org.remove_record(&gone);
        let account = sim.org.records.get(&renamed).unwrap();
        let (account_external, name) =
            (account.fields["Elo_Id__c"].as_str().unwrap().to_owned(), account.fields["Name"].clone());
        let edit = serde_json::Map::from_iter([("Name".to_owned(), json!("Edited By Hand"))]);
        sim.org.alter(&renamed, &edit, sandbox::now_ms());
        (
            picked.into_iter().map(|(external, _)| external).collect(),
            (external, status),
            ((gone_order, gone), (account_external, name)),
        )
    };
    let edited: BTreeMap<String, Value> = {
        let mut sim = rd.sim.lock().unwrap();
        let uuids: Vec<String> = sim.contacts.keys().cloned().collect();
        let mut edited = BTreeMap::new();
        for uuid in uuids.into_iter().step_by(100) {
            let contact = sim.contacts.get_mut(&uuid).unwrap();
            edited.insert(uuid, contact.fields.get("name").cloned().unwrap_or(Value::Null));
            contact.fields.insert("name".into(), json!("Edited Behind Elos Back"));
        }
        edited
    };
    assert!(!deleted.is_empty() && !edited.is_empty());

    // Every deleted and edited order restored, every edited contact rewritten.
    let sf_repaired = || {
        let sim = sf.sim.lock().unwrap();
        let present: BTreeSet<&str> = sim
            .org
            .records
            .values()
            .filter(|r| r.object == "Order")
            .filter_map(|r| r.fields.get("Elo_Id__c").and_then(Value::as_str))
            .collect();
        let (external, status) = &sf_edited;
        let restored = sim.org.records.values().any(|r| {
            r.object == "Order"
                && r.fields["Elo_Id__c"] == external.as_str()
                && r.fields["Magento_Status__c"] == *status
        });
        // The deleted Account's order points to an Account again; the renamed one has its name back.
        let ((gone_order, gone), (renamed, name)) = &accounts;
        let rehomed = sim.org.records.values().any(|r| {
            r.object == "Order"
                && r.fields["Elo_Id__c"] == gone_order.as_str()
                && r.fields["AccountId"].as_str().is_some_and(|a| a != gone && sim.org.records.get(a).is_some())
        });
        let renamed_back =
            sim.org.records.values().any(|r| {
                r.object == "Account" && r.fields["Elo_Id__c"] == renamed.as_str() && r.fields["Name"] == *name
            });
        deleted.iter().all(|d| present.contains(d.as_str())) && restored && rehomed && renamed_back
    };
    let rd_restored = || {
        let sim = rd.sim.lock().unwrap();
        edited
            .iter()
            .filter(|(uuid, name)| sim.contacts.get(*uuid).and_then(|c| c.fields.get("name")) == Some(*name))
            .count()
    };
    let all_repaired = || sf_repaired() && rd_restored() == edited.len();
    let done = wait_until(Duration::from_secs(150), all_repaired).await;
    let repair_time = tampered.elapsed();
    let m = metrics_of(&admins).await;
    let rd_left: Vec<(String, Value, Option<Value>)> = {
        let sim = rd.sim.lock().unwrap();
        edited
            .iter()
            .filter(|(uuid, name)| sim.contacts.get(*uuid).and_then(|c| c.fields.get("name")) != Some(*name))
            .map(|(uuid, name)| {
                let now = sim.contacts.get(uuid).and_then(|c| c.fields.get("name").cloned());
                (uuid.clone(), name.clone(), now)
            })
            .collect()
    };
    let orders_of_left: Vec<Value> = {
        let rd_sim = rd.sim.lock().unwrap();
        let emails: BTreeSet<String> = rd_left
            .iter()
            .filter_map(|(uuid, ..)| rd_sim.contacts.get(uuid))
            .filter_map(|c| c.fields.get("email").and_then(Value::as_str).map(str::to_lowercase))
            .collect();
        let keep = [
            "entity_id",
            "customer_id",
            "customer_firstname",
            "customer_lastname",
            "updated_at",
            "status",
            "customer_email",
        ];
        magento
            .sim
            .lock()
            .unwrap()
            .orders
            .values()
            .filter(|o| o["customer_email"].as_str().is_some_and(|e| emails.contains(&e.to_lowercase())))
            .map(|o| Value::Object(keep.iter().map(|k| ((*k).to_owned(), o[*k].clone())).collect()))
            .collect()
    };
    assert!(
        done,
        "not repaired in 150 s (Salesforce whole: {}); RD contacts left (uuid, name before, name now): {rd_left:?}; their orders in Magento {orders_of_left:#?}; metrics {m:#?}\n{}",
        sf_repaired(),
        logs()
    );

    // The reconciler saw and counted what it repaired, and escalated nothing.
    let missing_found = metric(&m, "reconciler_drift_found_total{kind=\"missing\",target=\"salesforce\"}");
    let altered_found = metric(&m, "reconciler_drift_found_total{kind=\"altered\",target=\"rdstation\"}");
    let sf_altered = metric(&m, "reconciler_drift_found_total{kind=\"altered\",target=\"salesforce\"}");
    assert!(sf_altered >= 2.0, "the order and the Account edits were found by LastModifiedDate: {sf_altered}");
    // The deleted orders, and the deleted Account (on its order).
    let gone = deleted.len() + 1;
    assert!(missing_found >= gone as f64, "{missing_found} missing found for {gone} deleted");
    assert!(altered_found >= edited.len() as f64, "{altered_found} altered found for {} edited", edited.len());
    let m = {
        // The repaired counters follow the sinks' outcomes: give the ledger a moment to read them.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = metrics_of(&admins).await;
            let r1 = metric(&m, "reconciler_drift_repaired_total{kind=\"missing\",target=\"salesforce\"}");
            let r2 = metric(&m, "reconciler_drift_repaired_total{kind=\"altered\",target=\"rdstation\"}");
            if (r1 >= missing_found && r2 >= altered_found) || Instant::now() > deadline {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    assert_eq!(
        metric(&m, "reconciler_drift_repaired_total{kind=\"missing\",target=\"salesforce\"}"),
        missing_found,
        "every Salesforce deletion found is confirmed repaired"
    );
    assert_eq!(
        metric(&m, "reconciler_drift_repaired_total{kind=\"altered\",target=\"rdstation\"}"),
        altered_found,
        "every contact edit found is confirmed repaired"
    );
    let escalated: f64 = m.iter().filter(|(k, _)| k.starts_with("reconciler_escalated_total")).map(|(_, v)| v).sum();
    assert_eq!(escalated, 0.0, "nothing escalated: {m:#?}");

    let second_calls = within_budget(&proxies, first_started.elapsed());
    // Stock facts that stay negative are reported: as many as the inventory topic says.
    let codec = elo_events::EventCodec::new(&elo_events::RegistryConfig::local(registry_url())).unwrap();
    let mut latest: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for record in read_all(&brokers(), &format!("{topic}.inventory"), 3) {
        use rdkafka::Message;
        let fact: elo_events::InventoryEvent = codec.decode(record.payload().unwrap()).await.unwrap();
        let slot = latest.entry(format!("{}@{}", fact.sku, fact.stock_id)).or_insert((i64::MIN, 0));
        if fact.occurred_at >= slot.0 {
            *slot = (fact.occurred_at, fact.salable_qty.unscaled());
        }
    }
    let negative = latest.values().filter(|(_, qty)| *qty < 0).count() as f64;
    let mut reported = 0.0;
    for _ in 0..40 {
        reported = metric(&metrics_of(&admins).await, "reconciler_negative_stock_skus");
        if reported == negative {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!latest.is_empty(), "order-ingest published stock facts");
    assert_eq!(reported, negative, "SKUs left negative, of {} with stock facts", latest.len());
    let m = metrics_of(&admins).await;
    let commands: f64 =
        m.iter().filter(|(k, _)| k.starts_with("reconciler_repair_commands_total")).map(|(_, v)| v).sum();
    shutdown.cancel();
    eprintln!(
        "reconciler drift figures: {orders} orders from {FACTS} facts; {} webhooks lost, {lost_found} lost latest \
         versions found; all orders current in Salesforce {:.1} s after generation; {} Salesforce orders deleted and \
         {} RD contacts edited and 1 Salesforce order and 2 Accounts edited or deleted, all repaired {:.1} s after the tampering; {commands} repair commands; API calls the \
         sandbox saw (calls, account budget, minutes since the first start) before the restart {first_calls:?} and at \
         the end, two replicas sweeping since the restart, {second_calls:?}; ledger restored on two replicas in {:.1} s; {negative} of {} SKUs left negative, all reported",
        lost.len(),
        converged.as_secs_f64(),
        deleted.len(),
        edited.len(),
        repair_time.as_secs_f64(),
        restore_time.as_secs_f64(),
        latest.len()
    );
}
