//! A rule change reaches exactly the contacts it affects, without a restart, and
//! `rdstation-sink rules dry-run` predicted exactly those changes. Also checks the metrics the
//! sink must export (budget use, coalescing, rule hits, events by type).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use elo_events::{CommerceEvent, Customer, EventCodec, RegistryConfig, ids, sample};
use elo_integration_tests::*;
use sandbox::rdstation::{RdConfig, RdStationApp};
use serde_json::Value;

const RULES_V1: &str = r#"
[[rule]]
name = "repeat"
when = { frequency_gte = 2 }
tags = ["repeat-buyer"]
stage = "Client"
"#;

const RULES_V2: &str = r#"
[[rule]]
name = "loyal"
when = { frequency_gte = 4 }
tags = ["loyal"]
stage = "Client"
fields = { cf_elo_tier = "gold" }

[[rule]]
name = "repeat"
when = { frequency_gte = 2 }
tags = ["repeat-buyer"]
stage = "Client"
"#;

/// V2 with a stricter `repeat` rule: customers with 3 orders no longer match it.
const RULES_V3: &str = r#"
[[rule]]
name = "loyal"
when = { frequency_gte = 4 }
tags = ["loyal"]
stage = "Client"
fields = { cf_elo_tier = "gold" }

[[rule]]
name = "repeat"
when = { frequency_gte = 4 }
tags = ["repeat-buyer"]
stage = "Client"
"#;

const CUSTOMERS: usize = 60;

/// Contacts marketers tagged in RD before Elo saw them: customer 21's `repeat-buyer` is the
/// marketers' own (Elo must never remove it), customer 22 carries an outside tag.
const PRE_TAGGED: &[(usize, &[&str])] = &[(21, &["repeat-buyer"]), (22, &["from-crm"])];

/// `rdstation-sink rules dry-run` of `rules` against the state of `topic`: key → changes.
fn dry_run(topic: &str, rules: &std::path::Path) -> (BTreeMap<String, String>, String) {
    let output = Command::new(binary("rdstation-sink"))
        .args(["rules", "dry-run"])
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_RDSTATION_STATE_TOPIC", format!("{topic}.rd-state"))
        .env("ELO_RDSTATION_RULES_FILE", rules)
        .env("ELO_LOG", "warn")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = String::from_utf8(output.stdout).unwrap();
    let predicted = report
        .lines()
        .filter_map(|l| {
            l.split_once(' ').filter(|(k, _)| k.starts_with("c:")).map(|(k, rest)| (k.to_owned(), rest.to_owned()))
        })
        .collect();
    (predicted, report)
}
const ORDERS: usize = 200;

/// email → (tags, stage, cf_elo_tier).
fn snapshot(rd: &RdStationApp) -> BTreeMap<String, (BTreeSet<String>, Value, Value)> {
    let sim = rd.sim.lock().unwrap();
    sim.contacts
        .values()
        .map(|c| {
            let tags = c.fields.get("tags").and_then(Value::as_array).into_iter().flatten();
            (
                c.fields["email"].as_str().unwrap().to_owned(),
                (
                    tags.map(|t| t.as_str().unwrap().to_owned()).collect(),
                    c.funnel["lifecycle_stage"].clone(),
                    c.fields.get("cf_elo_tier").cloned().unwrap_or(Value::Null),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_lands_without_restart_exactly_as_the_dry_run_said() {
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    write_rd_credentials(dir.path(), &rd, &rd_url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES_V1).unwrap();

    {
        let mut sim = rd.sim.lock().unwrap();
        for (c, tags) in PRE_TAGGED {
            let uuid = format!("00000000-0000-4000-b000-{c:012}");
            let mut fields = serde_json::Map::new();
            fields.insert("email".into(), format!("rules{c}@example.com").into());
            fields.insert("tags".into(), serde_json::json!(tags));
            let funnel = serde_json::json!({"lifecycle_stage": "Lead", "opportunity": false});
            sim.contacts.insert(uuid.clone(), sandbox::rdstation::Contact { uuid, fields, funnel, created_ms: 0 });
        }
    }
    let topic = unique("e2e.rd-rules.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut records = Vec::new();
    let mut email_of = BTreeMap::new();
    let mut orders_of: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..ORDERS {
        let c = n % CUSTOMERS;
        let email = format!("rules{c}@example.com");
        let key = ids::customer_key(Some(c as i64 + 1), &email);
        let mut event = sample::order_placed(n as u64);
        event.customer_key = key.clone();
        let order = event.order.as_mut().unwrap();
        order.entity_id = 70_000 + n as i64;
        order.increment_id = format!("R{n:06}");
        order.created_at = now - 5 * 86_400_000;
        event.source_version.entity_id = order.entity_id.to_string();
        event.event_id = ids::event_id(&["rules-e2e", &n.to_string()]);
        event.customer = Some(Customer {
            customer_id: Some(c as i64 + 1),
            is_guest: false,
            email: email.clone(),
            ..event.customer.unwrap()
        });
        records.push((key.clone(), codec.encode(&topic, &event).await.unwrap()));
        email_of.insert(key.clone(), email);
        *orders_of.entry(key).or_default() += 1;
    }
    produce(&producer(&brokers()), &topic, &records).await;

    let group = unique("e2e.rd-rules.group");
    let admin = free_port();
    let mut command = rdstation_sink(dir.path(), &topic, &group, &rd_url, &rules, "sink");
    let mut sink = ChildGuard::spawn("rdstation-sink", command.env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}")));
    let done = wait_until(Duration::from_secs(120), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        let committed = tokio::task::block_in_place(|| committed(&brokers(), &group, &topic, 3)).values().sum::<i64>();
        // Contact writes the budget deferred land with the sweep, after the commit.
        let contacts = snapshot(&rd);
        committed >= ORDERS as i64
            && contacts.len() == CUSTOMERS
            && contacts.values().all(|(t, s, _)| t.contains("repeat-buyer") && s == "Client")
    })
    .await;
    assert!(done, "the sink did not catch up:\n{}", log(dir.path(), "sink"));
    let before = snapshot(&rd);
    assert_eq!(before.len(), CUSTOMERS);
    assert!(before.values().all(|(t, s, _)| t.contains("repeat-buyer") && s == "Client"));

    // The dry run of the new rules, from the state in Kafka.
    let proposed = dir.path().join("proposed.toml");
    std::fs::write(&proposed, RULES_V2).unwrap();
    let (predicted, report) = dry_run(&topic, &proposed);
    let loyal: BTreeSet<String> = orders_of.iter().filter(|(_, n)| **n >= 4).map(|(k, _)| k.clone()).collect();
    assert_eq!(predicted.keys().cloned().collect::<BTreeSet<_>>(), loyal, "dry run:\n{report}");
    assert!(
        predicted.values().all(|c| c.contains("+tag loyal") && c.contains(r#"cf_elo_tier - -> "gold""#)),
        "{report}"
    );
    assert!(report.contains(&format!("{} of {CUSTOMERS} contacts would change", loyal.len())), "{report}");
    assert_eq!(snapshot(&rd), before, "a dry run writes nothing");

    // The back-test replays the history through the proposed rules: the last week holds every
    // customer, the loyal ones in their segment.
    let csv = dir.path().join("backtest.csv");
    let output = Command::new(binary("rdstation-sink"))
        .args(["rules", "backtest", "--csv"])
        .arg(&csv)
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_TOPIC_COMMERCE", &topic)
        .env("ELO_RDSTATION_RULES_FILE", &proposed)
        .env("ELO_LOG", "warn")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert!(csv.starts_with("week_ending,customers,loyal,repeat\n"), "{csv}");
    let last = csv.lines().last().unwrap().split(',').skip(1).collect::<Vec<_>>();
    assert_eq!(last, [CUSTOMERS.to_string(), loyal.len().to_string(), CUSTOMERS.to_string()], "{csv}");

    // The new rules go live: the running sink reloads and applies them, no new orders needed.
    std::fs::write(dir.path().join("rules.next"), RULES_V2).unwrap();
    std::fs::rename(dir.path().join("rules.next"), &rules).unwrap();
    let applied = wait_until(Duration::from_secs(60), || {
        let now = snapshot(&rd);
        loyal.iter().all(|k| now[&email_of[k]].0.contains("loyal"))
    })
    .await;
    assert!(applied, "the new rules did not reach the contacts:\n{}", log(dir.path(), "sink"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = snapshot(&rd);
    let changed: BTreeSet<String> =
        email_of.iter().filter(|(_, e)| before[*e] != after[*e]).map(|(k, _)| k.clone()).collect();
    assert_eq!(changed, loyal, "exactly the contacts the dry run named changed");
    for key in &loyal {
        let (tags, stage, tier) = &after[&email_of[key]];
        assert!(tags.contains("loyal") && tags.contains("repeat-buyer"), "{key}: {tags:?}");
        assert_eq!((stage.as_str(), tier.as_str()), (Some("Client"), Some("gold")));
    }

    // A stricter rule un-matches the customers with 3 orders: the dry run says Elo's tag goes,
    // the running sink removes it, and tags Elo did not set stay (customer 21's marketers set
    // `repeat-buyer` themselves; customer 22's `from-crm`).
    std::fs::write(&proposed, RULES_V3).unwrap();
    let (predicted, report) = dry_run(&topic, &proposed);
    let marketers_own = ids::customer_key(Some(22), "rules21@example.com");
    let unmatched: BTreeSet<String> =
        orders_of.iter().filter(|(k, n)| **n < 4 && **k != marketers_own).map(|(k, _)| k.clone()).collect();
    assert!(unmatched.len() > 10, "the data un-matches customers: {unmatched:?}");
    assert_eq!(predicted.keys().cloned().collect::<BTreeSet<_>>(), unmatched, "dry run:\n{report}");
    assert!(predicted.values().all(|c| c.ends_with("): -tag repeat-buyer")), "only the tag goes:\n{report}");
    let before = after;
    std::fs::write(dir.path().join("rules.next"), RULES_V3).unwrap();
    std::fs::rename(dir.path().join("rules.next"), &rules).unwrap();
    let removed = wait_until(Duration::from_secs(60), || {
        let now = snapshot(&rd);
        unmatched.iter().all(|k| !now[&email_of[k]].0.contains("repeat-buyer"))
    })
    .await;
    assert!(removed, "Elo's tags were not removed:\n{}", log(dir.path(), "sink"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = snapshot(&rd);
    let changed: BTreeSet<String> =
        email_of.iter().filter(|(_, e)| before[*e] != after[*e]).map(|(k, _)| k.clone()).collect();
    assert_eq!(changed, unmatched, "exactly the contacts the dry run named changed");
    let tags_of = |c: usize| after[&format!("rules{c}@example.com")].0.clone();
    assert!(tags_of(21).contains("repeat-buyer"), "the marketers' own tag stays: {:?}", tags_of(21));
    assert_eq!(tags_of(22), BTreeSet::from(["from-crm".to_owned()]), "an outside tag stays, Elo's goes");

    // The metrics an operator needs.
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await.unwrap().text().await.unwrap();
    for needle in [
        "rdstation_sink_budget_requests_total",
        "rdstation_sink_budget_requests_per_minute 30000",
        "rdstation_sink_rate_limited_total 0",
        "rdstation_sink_coalesced_updates_total",
        r#"rdstation_sink_rule_hits_total{rule="loyal"}"#,
        r#"rdstation_sink_events_sent_total{event_type="ECOMMERCE_ORDER_PLACED"} 200"#,
        r#"rdstation_sink_contact_writes_total{operation="tag"}"#,
        r#"rdstation_sink_contact_writes_total{operation="untag"}"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }
    sink.signal("TERM");
    assert!(sink.wait_timeout(Duration::from_secs(30)).is_some_and(|s| s.success()));
}

/// One customer ordering again and again: the contact is written at most `ELO_RDSTATION_CONTACT_UPDATES`
/// times per window (RD allows 24 PATCH per contact per 24 h; here 3 per 8 s so the test is
/// short), updates beyond it are coalesced, and the latest state lands once the window allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_customer_stays_within_the_per_contact_budget_and_the_last_state_wins() {
    const ORDERS: i64 = 30;
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    write_rd_credentials(dir.path(), &rd, &rd_url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES_V1).unwrap();
    let topic = unique("e2e.rd-budget.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let mut records = Vec::new();
    for n in 0..ORDERS {
        let mut event = sample::order_placed(0);
        let order = event.order.as_mut().unwrap();
        order.entity_id = 90_000 + n;
        order.increment_id = format!("B{n:06}");
        event.source_version.entity_id = order.entity_id.to_string();
        event.source_version.updated_at += n;
        event.event_id = ids::event_id(&["budget-e2e", &n.to_string()]);
        records.push((event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap()));
    }
    let group = unique("e2e.rd-budget.group");
    let admin = free_port();
    let mut command = rdstation_sink(dir.path(), &topic, &group, &rd_url, &rules, "sink");
    command
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("ELO_MAX_BATCH", "1")
        .env("ELO_RDSTATION_CONTACT_UPDATES", "3")
        .env("ELO_RDSTATION_CONTACT_UPDATE_WINDOW", "8s");
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut command);
    let started = std::time::Instant::now();
    produce(&producer(&brokers()), &topic, &records).await;
    let landed = wait_until(Duration::from_secs(90), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        let sim = rd.sim.lock().unwrap();
        sim.contacts.values().any(|c| c.fields.get("cf_elo_order_count") == Some(&Value::from(ORDERS)))
    })
    .await;
    assert!(landed, "the last state never landed:\n{}", log(dir.path(), "sink"));
    let elapsed = started.elapsed().as_secs_f64();
    let patches = rd.counters.snapshot()["rdstation"]["PATCH /platform/contacts/{id}"].as_u64().unwrap();
    let allowed = 3 * ((elapsed / 8.0).ceil() as u64 + 1);
    assert!(patches <= allowed && patches < ORDERS as u64, "{patches} PATCHes in {elapsed:.1}s (allowed {allowed})");
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("rdstation_sink_rate_limited_total 0"), "{metrics}");
    let deferred = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rdstation_sink_deferred_updates_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(deferred > 0, "the budget never held an update back: {patches} PATCHes");
    assert_eq!(rd.sim.lock().unwrap().events.len(), ORDERS as usize, "events are not held back");
}

/// An erasure deletes the contact and leaves a floor in the sink's state: an order placed
/// before the erasure that arrives after it (late, replayed) neither recreates the contact nor
/// sends its event; an order placed after the erasure is worked as usual, counting only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_event_arriving_after_an_erasure_does_not_bring_the_contact_back() {
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    write_rd_credentials(dir.path(), &rd, &rd_url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES_V1).unwrap();
    let topic = unique("e2e.rd-erasure.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    // Orders of one customer, `at` ms after the first.
    let order = |n: i64, at: i64| {
        let mut event = sample::order_placed(0);
        let order = event.order.as_mut().unwrap();
        order.entity_id = 95_000 + n;
        order.increment_id = format!("ER{n:05}");
        order.created_at += at;
        event.source_version.entity_id = order.entity_id.to_string();
        event.source_version.updated_at += at;
        event.occurred_at += at;
        event.event_id = ids::event_id(&["erasure-e2e", &n.to_string()]);
        event
    };
    let first = order(1, 0);
    let email = first.customer.as_ref().unwrap().email.to_lowercase();
    let mut erasure = sample::order_placed(0);
    erasure.event_type = elo_events::CommerceEventType::CustomerErased;
    erasure.event_id = ids::event_id(&["erasure-e2e", "erase"]);
    erasure.occurred_at += 10_000;
    erasure.order = None;
    erasure.customer = None;
    erasure.erasure = Some(elo_events::CustomerErasure {
        customer_id: first.customer.as_ref().unwrap().customer_id,
        email_sha256: ids::email_sha256(&email),
        reason: "customer request".into(),
    });
    let contact = |rd: &RdStationApp| {
        rd.sim
            .lock()
            .unwrap()
            .contacts
            .values()
            .find(|c| c.fields.get("email") == Some(&Value::from(email.clone())))
            .map(|c| c.fields.clone())
    };
    let events_of = |rd: &RdStationApp, id: &str| {
        rd.sim.lock().unwrap().events.iter().filter(|e| e["payload"]["order_id"] == id).count()
    };

    let mut command = rdstation_sink(dir.path(), &topic, &unique("e2e.rd-erasure.group"), &rd_url, &rules, "sink");
    command.env("ELO_MAX_BATCH", "1");
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut command);
    let producer = producer(&brokers());
    let encode = |e: CommerceEvent| {
        let (codec, topic) = (&codec, &topic);
        async move { (e.customer_key.clone(), codec.encode(topic, &e).await.unwrap()) }
    };
    produce(&producer, &topic, &[encode(first).await]).await;
    let created = wait_until(Duration::from_secs(60), || contact(&rd).is_some()).await;
    assert!(created, "the contact was never created:\n{}", log(dir.path(), "sink"));
    produce(&producer, &topic, &[encode(erasure).await]).await;
    let deleted = wait_until(Duration::from_secs(60), || contact(&rd).is_none()).await;
    assert!(deleted, "the erasure did not delete the contact:\n{}", log(dir.path(), "sink"));

    // Placed 5 s before the erasure, arriving after it; then one placed 20 s after it.
    produce(&producer, &topic, &[encode(order(2, 5_000)).await, encode(order(3, 30_000)).await]).await;
    let back = wait_until(Duration::from_secs(60), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        events_of(&rd, "ER00003") > 0 && contact(&rd).is_some_and(|c| c.get("cf_elo_order_count").is_some())
    })
    .await;
    assert!(back, "the order after the erasure was not worked:\n{}", log(dir.path(), "sink"));
    assert_eq!(events_of(&rd, "ER00002"), 0, "the late order's event reached RD");
    let fields = contact(&rd).unwrap();
    assert_eq!(fields["cf_elo_order_count"], Value::from(1), "only the order after the erasure counts: {fields:?}");
    assert_eq!(fields["cf_last_order_id"], Value::from("ER00003"), "{fields:?}");
}

/// A customer's first record of a batch refused for good (RD answers 400): it is parked, and
/// the customer's later records of the same batch are still worked afterwards, never
/// committed unprocessed.
#[tokio::test]
async fn records_after_a_refused_one_of_the_same_customer_are_worked_after_it_is_parked() {
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    write_rd_credentials(dir.path(), &rd, &rd_url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES_V1).unwrap();
    // A mapping that sends the payment method (a string) as ORDER_PLACED's `shipping_price` (a
    // number): RD refuses the order that has one, and accepts those without.
    let default = rdstation_sink::events::DEFAULT_MAPPING;
    assert!(default.contains("shipping_price = \"order.shipping\""));
    let mapping =
        default.replacen("shipping_price = \"order.shipping\"", "shipping_price = \"order.payment_method\"", 1);
    let events_file = dir.path().join("events.toml");
    std::fs::write(&events_file, mapping).unwrap();
    let topic = unique("e2e.rd-park.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let order = |n: i64, payment: Option<&str>| {
        let mut event = sample::order_placed(0);
        let order = event.order.as_mut().unwrap();
        order.entity_id = 96_000 + n;
        order.increment_id = format!("PK{n:05}");
        order.payment_method = payment.map(str::to_owned);
        order.created_at += n;
        event.source_version.entity_id = order.entity_id.to_string();
        event.source_version.updated_at += n;
        event.occurred_at += n;
        event.event_id = ids::event_id(&["park-e2e", &n.to_string()]);
        event
    };
    let events_of = |rd: &RdStationApp, id: &str| {
        rd.sim.lock().unwrap().events.iter().filter(|e| e["payload"]["order_id"] == id).count()
    };

    let mut command = rdstation_sink(dir.path(), &topic, &unique("e2e.rd-park.group"), &rd_url, &rules, "sink");
    command.env("ELO_RDSTATION_EVENTS_FILE", &events_file);
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut command);
    let producer = producer(&brokers());
    let mut records = Vec::new();
    for e in [order(1, Some("checkmo")), order(2, None), order(3, None)] {
        records.push((e.customer_key.clone(), codec.encode(&topic, &e).await.unwrap()));
    }
    // One produce call: the three land together and the sink reads them as one batch.
    produce(&producer, &topic, &records).await;
    let landed = wait_until(Duration::from_secs(90), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        events_of(&rd, "PK00002") > 0 && events_of(&rd, "PK00003") > 0
    })
    .await;
    assert!(landed, "the customer's records after the refused one were never worked:\n{}", log(dir.path(), "sink"));
    assert_eq!(events_of(&rd, "PK00001"), 0, "RD refused the first order's event");
    assert!(log(dir.path(), "sink").contains("parked"), "the refused record was parked:\n{}", log(dir.path(), "sink"));
}

/// New rules written while the sink is down (or a rules pass a restart or rebalance cut
/// short) reach every contact after the restart, without any new event: each partition's
/// state records the rules applied to it, and a restore finding other rules runs the pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_changed_while_the_sink_was_down_are_applied_after_the_restart() {
    const PEOPLE: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    write_rd_credentials(dir.path(), &rd, &rd_url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"all\"\ntags = [\"wave-one\"]\n").unwrap();
    let topic = unique("e2e.rd-restart-rules.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut records = Vec::new();
    for c in 0..PEOPLE {
        let event = rd_order("restartrules", 95_000, c, c, at);
        records.push((event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap()));
    }
    produce(&producer(&brokers()), &topic, &records).await;
    let all_tagged = |tag: &str| {
        let contacts = snapshot(&rd);
        contacts.len() == PEOPLE && contacts.values().all(|(tags, _, _)| tags.contains(tag))
    };

    let group = unique("e2e.rd-restart-rules.group");
    let mut sink =
        ChildGuard::spawn("rdstation-sink", &mut rdstation_sink(dir.path(), &topic, &group, &rd_url, &rules, "sink"));
    let first = wait_until(Duration::from_secs(90), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        all_tagged("wave-one")
    })
    .await;
    assert!(first, "the first rules never landed:\n{}", log(dir.path(), "sink"));
    sink.signal("TERM");
    assert!(sink.wait_timeout(Duration::from_secs(30)).is_some(), "the sink did not stop");

    std::fs::write(&rules, "[[rule]]\nname = \"all\"\ntags = [\"wave-two\"]\n").unwrap();
    let mut sink =
        ChildGuard::spawn("rdstation-sink", &mut rdstation_sink(dir.path(), &topic, &group, &rd_url, &rules, "sink2"));
    let second = wait_until(Duration::from_secs(90), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink2"));
        all_tagged("wave-two")
    })
    .await;
    assert!(
        second,
        "the new rules never reached the contacts after the restart: {:?}\n{}",
        snapshot(&rd),
        log(dir.path(), "sink2")
    );
    // Elo's own old tag is gone, as with a reload without restart.
    assert!(snapshot(&rd).values().all(|(tags, _, _)| !tags.contains("wave-one")), "{:?}", snapshot(&rd));
}
