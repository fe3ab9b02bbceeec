//! The reconciler's acceptance on the real broker with the sandbox: Magento loses 1% of its
//! webhooks, and once everything settled, 1% of the Salesforce orders are deleted (one order
//! and one Account edited, one Account deleted) and 1% of the RD Station contacts edited
//! behind Elo's back. The reconciler (ledger, sweeps, repair commands through order-ingest and
//! the sinks) must find exactly that drift (no more: a false finding fails the test) and
//! repair all of it within a bounded time, with one repair command per finding. Its sweeps
//! run back to back (bound by their budgets alone), and the API calls, counted by a proxy in
//! front of each API, per account, must stay within the account's budget yet come close to it
//! while two replicas share it after a restart. The figures are printed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use elo_integration_tests::drift::*;
use elo_integration_tests::proxy::counting_proxy;
use elo_integration_tests::*;
use sandbox::magento::webhook::{WebhookConfig, WebhookStyle};
use sandbox::rdstation::RdConfig;
use sandbox::salesforce::SalesforceConfig;
use serde_json::{Value, json};

const SECRET: &str = "e2e-webhook-secret-0123456789";
/// Facts the Magento generator makes (orders and status changes).
const FACTS: usize = 600;
/// Low rates: every sweep's rounds are bound by them (see [`reconciler_command`]).
const MAGENTO: Rate = Rate { per_minute: 60 };
const SALESFORCE: Rate = Rate { per_minute: 40 };
const RD: Rate = Rate { per_minute: 30 };
const RATES: [Rate; 3] = [MAGENTO, SALESFORCE, RD];

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
    write_rd_credentials(dir.path(), &rd, &rd_url).await;
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
    let proxies =
        [("magento", &magento_proxy, MAGENTO), ("salesforce", &sf_proxy, SALESFORCE), ("rdstation", &rd_proxy, RD)];
    let urls = [magento_proxy.url.as_str(), sf_proxy.url.as_str(), rd_proxy.url.as_str()];
    let first_started = Instant::now();
    let mut first =
        ChildGuard::spawn("reconciler", &mut reconciler_command(dir.path(), &topic, admin, urls, RATES, "reconciler"));
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
    // A lower bound here only: while the generated backlog is being delivered, a webhook still
    // on its way after the grace is refetched too (harmless). Phase 2 below is exact.
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
    // One replica, holding every partition: within the whole rate.
    let first_calls: Vec<(&str, Spend)> =
        proxies.iter().map(|(n, p, r)| (*n, within_budget(n, p.calls(), *r, first_started.elapsed()))).collect();
    first.signal("TERM");
    assert!(first.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()), "graceful stop");
    // Two replicas from now on: the sweeps' budget is the account's, shared between them.
    let restarted = Instant::now();
    let admins = [free_port(), free_port()];
    let _second = ChildGuard::spawn(
        "reconciler",
        &mut reconciler_command(dir.path(), &topic, admins[0], urls, RATES, "reconciler2"),
    );
    let _third = ChildGuard::spawn(
        "reconciler",
        &mut reconciler_command(dir.path(), &topic, admins[1], urls, RATES, "reconciler3"),
    );
    let mut restored = false;
    let mut held = [0.0; 2];
    while !restored && restarted.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        held = [metrics(admins[0]).await, metrics(admins[1]).await].map(|m| metric(&m, "reconciler_ledger_partitions"));
        restored = held.iter().all(|h| *h > 0.0)
            && held.iter().sum::<f64>() == 3.0
            && metric(&metrics_of(&admins).await, "reconciler_ledger_entries{kind=\"order\"}") >= orders as f64;
    }
    let logs = || format!("{}\n{}", log(dir.path(), "reconciler2"), log(dir.path(), "reconciler3"));
    assert!(restored, "the ledger was not restored on the two replicas:\n{}", logs());
    let restore_time = restarted.elapsed();
    // The budget is measured from here: both replicas hold partitions and sweep.
    let both_hold = Instant::now();
    let calls_at = proxies.map(|(_, p, _)| p.calls());
    let held = held.map(|h| h as u32);

    // Phase 2: behind Elo's back, 1% of the Salesforce orders deleted, 1% of the contacts edited.
    let tampered = Instant::now();
    // And two Accounts: one deleted (of an order still there), one renamed.
    type Accounts = ((String, String), (String, Value));
    let (deleted, sf_edited, accounts, sf_missing): (Vec<String>, (String, Value), Accounts, usize) = {
        let mut sim = sf.sim.lock().unwrap();
        let mut ids: Vec<(String, String)> = sim
            .org
            .records
            .iter()
            .filter(|(_, r)| r.object == "Order")
            .map(|(id, r)| (r.fields["Elo_Id__c"].as_str().unwrap().to_owned(), id.clone()))
            .collect();
        ids.sort();
        let account: BTreeMap<String, String> = ids
            .iter()
            .filter_map(|(e, id)| Some((e.clone(), sim.org.records.get(id)?.fields["AccountId"].as_str()?.to_owned())))
            .collect();
        let picked: Vec<(String, String)> = ids.iter().step_by(100).cloned().collect();
        // And one order's status edited by hand (found by LastModifiedDate), as the control
        // API's PATCH /salesforce/records/{id} does.
        let (external, id) = ids[50].clone();
        // The two Accounts: none of a deleted or the edited order, so each finding is on
        // entries of its own (one drift per entry and target).
        let taken: BTreeSet<&String> = picked.iter().chain([&ids[50]]).filter_map(|(e, _)| account.get(e)).collect();
        let mut free = ids[20..].iter().filter(|(e, _)| account.get(e).is_some_and(|a| !taken.contains(a)));
        // The deleted Account is of a customer with one order: salesforce-sink rewrites an
        // Account only with the customer's newest data, so only that order's rewrite can
        // recreate it (an older order's would refer to an Account not there yet).
        let orders_of = |a: &String| account.values().filter(|b| *b == a).count();
        let (gone_order, _) =
            free.find(|(e, _)| orders_of(&account[e]) == 1).expect("a customer with one order").clone();
        let gone = account[&gone_order].clone();
        // The renamed one too: an Account of a customer with several orders is repaired only
        // if the entry resent is the one carrying the customer's newest data (a known gap,
        // see the reconciler's README), which this test would hit at random.
        let free = ids[70..].iter().filter(|(e, _)| account.get(e).is_some_and(|a| !taken.contains(a)));
        let renamed = free
            .map(|(e, _)| account[e].clone())
            .find(|a| *a != gone && orders_of(a) == 1)
            .expect("another Account of a customer with one order");
        // Every order pointing at the deleted Account is rewritten.
        let pointing = account.iter().filter(|(_, a)| **a == gone).map(|(e, _)| e.clone());
        let missing: BTreeSet<String> = picked.iter().map(|(e, _)| e.clone()).chain(pointing).collect();
        for (_, id) in &picked {
            sim.org.remove_record(id);
        }
        let status = sim.org.records.get(&id).unwrap().fields["Magento_Status__c"].clone();
        let edit = serde_json::Map::from_iter([("Magento_Status__c".to_owned(), json!("edited_by_hand"))]);
        sim.org.alter(&id, &edit, sandbox::now_ms());
        sim.org.remove_record(&gone);
        let record = sim.org.records.get(&renamed).unwrap();
        let (account_external, name) =
            (record.fields["Elo_Id__c"].as_str().unwrap().to_owned(), record.fields["Name"].clone());
        let edit = serde_json::Map::from_iter([("Name".to_owned(), json!("Edited By Hand"))]);
        sim.org.alter(&renamed, &edit, sandbox::now_ms());
        (
            picked.into_iter().map(|(external, _)| external).collect(),
            (external, status),
            ((gone_order, gone), (account_external, name)),
            missing.len(),
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
    // What is not repaired in Salesforce yet (empty: all of it).
    let sf_left = || {
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
        let mut left: Vec<String> = deleted.iter().filter(|d| !present.contains(d.as_str())).cloned().collect();
        for (ok, what) in [
            (restored, "the edited order"),
            (rehomed, "the deleted Account's order"),
            (renamed_back, "the renamed Account"),
        ] {
            if !ok {
                left.push(what.to_owned());
            }
        }
        left
    };
    let sf_repaired = || sf_left().is_empty();
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
        "not repaired in 150 s (Salesforce left: {:?}); RD contacts left (uuid, name before, name now): {rd_left:?}; their orders in Magento {orders_of_left:#?}; metrics {m:#?}\n{}",
        sf_left(),
        logs()
    );

    // Exactly the drift made behind Elo's back was found (the replicas' counters start at the
    // restart: phase 2 only), each repaired, with one repair command each, nothing escalated.
    let want: BTreeMap<String, f64> = [
        ("missing/salesforce", sf_missing as f64),
        ("altered/salesforce", 2.0), // the order's and the Account's edits
        ("altered/rdstation", edited.len() as f64),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let found = drift_found(&m);
    assert_eq!(found, want, "drift found (kind/target) vs made: {m:#?}\n{}", logs());
    let total: f64 = want.values().sum();
    let m = {
        // The repaired counters follow the sinks' outcomes: give the ledger a moment to read them.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = metrics_of(&admins).await;
            if metric_sum(&m, "reconciler_drift_repaired_total", &[]) >= total || Instant::now() > deadline {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    for (kind_target, n) in &want {
        let (kind, target) = kind_target.split_once('/').unwrap();
        let labels = [format!("kind=\"{kind}\""), format!("target=\"{target}\"")];
        let repaired = metric_sum(&m, "reconciler_drift_repaired_total", &[&labels[0], &labels[1]]);
        assert_eq!(repaired, *n, "{kind_target}: every finding is confirmed repaired");
    }
    let commands = metric_sum(&m, "reconciler_repair_commands_total", &["reason=\"drift\""]);
    assert_eq!(commands, total, "one repair command per finding: {m:#?}");
    let escalated = metric_sum(&m, "reconciler_escalated_total", &[]);
    assert_eq!(escalated, 0.0, "nothing escalated: {m:#?}");
    assert_eq!(drift_found(&m), found, "no drift found after the repairs");

    // The budget: both replicas' sweeps ran back to back since both held partitions.
    let window = both_hold.elapsed();
    let second_calls: Vec<(&str, Spend)> = proxies
        .iter()
        .zip(calls_at)
        .map(|((n, p, r), at)| (*n, saturated_within_budget(n, p.calls() - at, *r, &held, window)))
        .collect();
    // Every repair command names its type in the header, as the record's own symbol.
    let codec = elo_events::EventCodec::new(&elo_events::RegistryConfig::local(registry_url())).unwrap();
    let mut sent = 0;
    for record in read_all(&brokers(), &format!("{topic}.commands"), 3) {
        use rdkafka::Message;
        let command: elo_events::IntegrationCommand = codec.decode(record.payload().unwrap()).await.unwrap();
        assert_event_type(&record, command.command_type.as_str());
        // Sent by the periodic check (the reconciler's) or a sink's RESEND handling: traced either way.
        assert_traceparent(&record);
        sent += 1;
    }
    assert!(sent as f64 >= total, "the repair commands are on the topic ({sent} for {total} findings)");
    // Stock facts that stay negative are reported: as many as the inventory topic says.
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
    shutdown.cancel();
    eprintln!(
        "reconciler drift figures: {orders} orders from {FACTS} facts; {} webhooks lost, {lost_found} lost latest \
         versions found; all orders current in Salesforce {:.1} s after generation; {} Salesforce orders deleted and \
         {} RD contacts edited and 1 Salesforce order and 2 Accounts edited or deleted ({sf_missing} orders to rewrite), all repaired {:.1} s after the tampering; found {found:?}; {commands} repair commands; API calls the \
         sandbox saw (calls, account budget, floor, minutes) before the restart, one replica {first_calls:?}, and \
         from when both replicas held partitions {held:?} to the end {second_calls:?}; ledger restored on two replicas in {:.1} s; {negative} of {} SKUs left negative, all reported",
        lost.len(),
        converged.as_secs_f64(),
        deleted.len(),
        edited.len(),
        repair_time.as_secs_f64(),
        restore_time.as_secs_f64(),
        latest.len()
    );
}
