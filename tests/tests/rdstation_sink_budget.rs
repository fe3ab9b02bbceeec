//! rdstation-sink with its budgets actually spent (Tansu + RD simulator behind a counting
//! proxy): RD sees no 429 and never more than the account budget in a rolling minute, each
//! contact stays within its own cap, counted at RD, and the latest state still lands; a
//! contact waiting for its cap is not rewritten on every sweep. And a contact RD refuses during
//! a rules sweep is recorded once (an outcome with its class), while the deferred writes
//! keep landing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use elo_events::{EventCodec, OutcomeStatus, RegistryConfig, SyncOutcome};
use elo_integration_tests::proxy::{Call, counting_proxy, max_in_window};
use elo_integration_tests::*;
use rdkafka::Message;
use sandbox::rdstation::{RdConfig, RdStationApp};
use serde_json::Value;

/// `email` → the contact's fields, from the simulator.
fn contacts(rd: &RdStationApp) -> BTreeMap<String, serde_json::Map<String, Value>> {
    let sim = rd.sim.lock().unwrap();
    sim.contacts
        .values()
        .filter_map(|c| Some((c.fields.get("email")?.as_str()?.to_owned(), c.fields.clone())))
        .collect()
}

/// The contact calls of `log` (events and token calls left out).
fn contact_calls(log: &[Call]) -> Vec<&Call> {
    log.iter().filter(|c| !c.path.starts_with("/platform/events")).collect()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// M9 (with M7, M8 and M4 end to end): 40 new customers and one more, who then orders 11
/// times more, one order a second, against RD's own limit of 30 contact requests a minute
/// (the sink's budget is the same 30, so any overrun is a 429) and a per-contact cap of 3
/// writes per 20 s, checked where RD counts (a counting proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_budgets_spent_rd_sees_no_429_each_contact_keeps_its_cap_and_the_latest_state_wins() {
    const CUSTOMERS: usize = 40;
    const BUSY_ORDERS: usize = 12;
    const BUDGET: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: BUDGET, ..RdConfig::default() }).await;
    let proxy = counting_proxy(&rd_url).await;
    write_rd_credentials(dir.path(), &rd, &proxy.url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"everyone\"\nfields = { cf_elo_segment = \"all\" }\n").unwrap();
    let topic = unique("e2e.rd-spent.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut records = Vec::new();
    // The busy customer's first order with the others; its next ones later, one at a time.
    let busy = rd_order("spent", 80_000, 0, CUSTOMERS, at);
    records.push((busy.customer_key.clone(), codec.encode(&topic, &busy).await.unwrap()));
    for c in 0..CUSTOMERS {
        let event = rd_order("spent", 80_000, BUSY_ORDERS + c, c, at);
        records.push((event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap()));
    }
    produce(&producer(&brokers()), &topic, &records).await;

    let group = unique("e2e.rd-spent.group");
    let admin = free_port();
    let mut command = rdstation_sink(dir.path(), &topic, &group, &proxy.url, &rules, "sink");
    command
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("ELO_MAX_BATCH", "1")
        .env("ELO_RDSTATION_CONTACTS_PER_MINUTE", BUDGET.to_string())
        .env("ELO_RDSTATION_CONTACT_UPDATES", "3")
        .env("ELO_RDSTATION_CONTACT_UPDATE_WINDOW", "20s");
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut command);
    let busy_email = busy.customer.as_ref().unwrap().email.clone();
    let first = wait_until(Duration::from_secs(240), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        contacts(&rd).len() == CUSTOMERS + 1
    })
    .await;
    assert!(first, "the first contacts never landed:\n{}", log(dir.path(), "sink"));
    // The busy customer's orders one a second: its cap (3 per 20 s) holds most writes back.
    let producer = producer(&brokers());
    for n in 1..BUSY_ORDERS {
        let event = rd_order("spent", 80_000, n, CUSTOMERS, at + n as i64);
        produce(&producer, &topic, &[(event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap())]).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let landed = wait_until(Duration::from_secs(240), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        let all = contacts(&rd);
        all.len() == CUSTOMERS + 1
            && all.iter().all(|(email, fields)| {
                let orders = if *email == busy_email { BUSY_ORDERS } else { 1 };
                fields.get("cf_elo_order_count") == Some(&Value::from(orders))
            })
    })
    .await;
    let calls = proxy.log();
    assert!(landed, "the latest state did not land everywhere ({} calls):\n{}", calls.len(), log(dir.path(), "sink"));

    // No 429, and never more than the budget in a rolling minute, counted where RD counts.
    let contact = contact_calls(&calls);
    assert!(contact.iter().all(|c| c.status != 429), "RD answered 429: {contact:?}");
    let arrivals: Vec<Instant> = contact.iter().map(|c| c.at).collect();
    let most = max_in_window(&arrivals, Duration::from_secs(60));
    assert!(most <= BUDGET, "RD saw {most} contact requests in a rolling minute (budget {BUDGET})");
    assert!(contact.len() > BUDGET, "the budget was never spent: {} contact requests", contact.len());

    // The busy contact's writes, at RD, within its cap of 3 per 20 s (by e-mail, then by uuid).
    let uuid = rd.sim.lock().unwrap().contacts.values().find_map(|c| {
        (c.fields.get("email").and_then(Value::as_str) == Some(busy_email.as_str())).then(|| c.uuid.clone())
    });
    let uuid = uuid.unwrap();
    let busy_writes: Vec<Instant> = contact
        .iter()
        .filter(|c| c.method != "GET" && (c.path.contains(&uuid) || c.path.contains(&busy_email.replace('+', "%2B"))))
        .map(|c| c.at)
        .collect();
    assert!(!busy_writes.is_empty());
    let most = max_in_window(&busy_writes, Duration::from_secs(20));
    assert!(most <= 3, "the busy contact got {most} writes in 20 s (cap 3)");

    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&metrics, "rdstation_sink_rate_limited_total"), 0);
    assert!(metric(&metrics, "rdstation_sink_deferred_updates_total") > 0, "nothing was ever deferred");

    // M7: while it waits for its cap, the busy contact is not rewritten on every sweep (the
    // sweep runs every second here): one state record per batch and per landed write at most.
    let state_topic = format!("{topic}.rd-state");
    let key = busy.customer_key.clone();
    let records = tokio::task::block_in_place(|| read_all(&brokers(), &state_topic, 3));
    let writes = records.iter().filter(|r| r.key() == Some(key.as_bytes())).count();
    eprintln!(
        "busy customer: {writes} state records, {} writes at RD; {} contact requests",
        busy_writes.len(),
        contact.len()
    );
    // (13 seen: 12 batches and the landing; a rewrite per sweep would add one a second.)
    assert!(writes <= BUSY_ORDERS + 4, "{writes} state records for the busy customer ({BUSY_ORDERS} orders)");
    assert_eq!(rd.sim.lock().unwrap().events.len(), CUSTOMERS + BUSY_ORDERS, "events are not held back");
}

const TIER_V1: &str = "[[rule]]\nname = \"tier\"\nfields = { cf_elo_tier = \"gold\" }\n";
/// An integer for a field RD holds as a string: RD refuses every contact it matches.
const TIER_V2: &str = "[[rule]]\nname = \"tier\"\nwhen = { frequency_lte = 1 }\nfields = { cf_elo_tier = 5 }\n";

/// M6: RD refuses (400) the contacts a new rule set changes, in the rules pass. Each is tried
/// once, recorded as a `DEAD_LETTERED` outcome with class `permanent`, and not retried on
/// every sweep; the deferred writes keep landing meanwhile (a customer over its cap gets its
/// latest state). Before, the rules pass started over on every tick, sending the refused
/// contacts again each time, with no outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_rd_refuses_in_a_rules_sweep_is_recorded_once_and_deferred_writes_still_land() {
    const REFUSED: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    let proxy = counting_proxy(&rd_url).await;
    write_rd_credentials(dir.path(), &rd, &proxy.url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, TIER_V1).unwrap();
    let topic = unique("e2e.rd-refused.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let order = |n: usize, c: usize| rd_order("refused", 85_000, n, c, at + n as i64);
    let mut first = Vec::new();
    for c in 0..=REFUSED {
        let event = order(c, c);
        first.push((event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap()));
    }
    let producer = producer(&brokers());
    produce(&producer, &topic, &first).await;

    let group = unique("e2e.rd-refused.group");
    let mut command = rdstation_sink(dir.path(), &topic, &group, &proxy.url, &rules, "sink");
    command
        .env("ELO_MAX_BATCH", "1")
        .env("ELO_RDSTATION_CONTACT_UPDATES", "1")
        .env("ELO_RDSTATION_CONTACT_UPDATE_WINDOW", "20s");
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut command);
    let alive = |sink: &mut ChildGuard| {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
    };
    let gold = wait_until(Duration::from_secs(90), || {
        alive(&mut sink);
        let all = contacts(&rd);
        all.len() == REFUSED + 1 && all.values().all(|f| f.get("cf_elo_tier") == Some(&Value::from("gold")))
    })
    .await;
    assert!(gold, "the first rules never landed:\n{}", log(dir.path(), "sink"));
    // Past every contact's cap window (1 per 20 s), so the rules pass itself meets RD's refusal.
    tokio::time::sleep(Duration::from_secs(21)).await;

    // Customer REFUSED orders twice more (one batch each): the first is written, its cap
    // defers the second. Then the new rules, which RD refuses for the one-order customers.
    let busy = order(REFUSED, REFUSED);
    let more = [order(10, REFUSED), order(11, REFUSED)];
    let mut records = Vec::new();
    for event in &more {
        records.push((event.customer_key.clone(), codec.encode(&topic, event).await.unwrap()));
    }
    produce(&producer, &topic, &records).await;
    let busy_email = busy.customer.as_ref().unwrap().email.clone();
    let count = |rd: &RdStationApp| contacts(rd).get(&busy_email).and_then(|f| f.get("cf_elo_order_count").cloned());
    // Its second order written (so the new rules, for one-order customers, do not match it).
    let second = wait_until(Duration::from_secs(60), || {
        alive(&mut sink);
        count(&rd) == Some(Value::from(2))
    })
    .await;
    assert!(second, "the second order's write never landed:\n{}", log(dir.path(), "sink"));
    std::fs::write(&rules, TIER_V2).unwrap();

    let landed = wait_until(Duration::from_secs(90), || {
        alive(&mut sink);
        count(&rd) == Some(Value::from(3))
    })
    .await;
    assert!(landed, "the deferred write never landed (the sweeps stuck?):\n{}", log(dir.path(), "sink"));

    // Each refused contact: one outcome with its class and RD's code.
    let outcomes_topic = format!("{topic}.outcomes");
    let mut refused = BTreeMap::new();
    let found = wait_until(Duration::from_secs(30), || {
        let records = tokio::task::block_in_place(|| read_all(&brokers(), &outcomes_topic, 3));
        refused.clear();
        for record in records {
            assert_event_type(&record, SyncOutcome::EVENT_TYPE);
            assert_traceparent(&record);
            let outcome: SyncOutcome = futures::executor::block_on(codec.decode(record.payload().unwrap())).unwrap();
            if outcome.status == OutcomeStatus::DeadLettered {
                refused.insert(outcome.customer_key.clone(), outcome);
            }
        }
        refused.len() >= REFUSED
    })
    .await;
    assert!(found, "refused contacts' outcomes: {refused:?}");
    for outcome in refused.values() {
        assert_eq!(outcome.error_class.as_deref(), Some("permanent"), "{outcome:?}");
        assert_eq!(outcome.error_code.as_deref(), Some("INVALID"), "{outcome:?}");
    }
    assert_eq!(refused.len(), REFUSED, "{refused:?}");

    // Not retried on every sweep (one a second here): still one refused PATCH each.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let refusals = proxy.log().iter().filter(|c| c.method == "PATCH" && c.status == 400).count();
    assert_eq!(refusals, REFUSED, "refused PATCHes: {:?}", proxy.log());
}

/// A contact write RD answers 503 (it may have applied it, and RD counts it) is saved
/// against the contact's cap, even though the record fails and is retried: the retries stop
/// at the cap (the write is then deferred) instead of sending RD a write per retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_failed_with_a_5xx_are_saved_against_the_contacts_cap() {
    const CAP: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    let proxy = counting_proxy(&rd_url).await;
    write_rd_credentials(dir.path(), &rd, &proxy.url).await;
    let patch = sandbox::faults::FaultConfig { error_rate: 1.0, ..Default::default() };
    let faults = sandbox::faults::FaultConfig {
        endpoints: [("PATCH /platform/contacts/{id}".to_owned(), patch)].into(),
        ..Default::default()
    };
    rd.faults.set("rdstation", faults);
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"everyone\"\nfields = { cf_elo_segment = \"all\" }\n").unwrap();
    let topic = unique("e2e.rd-5xx.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let event = rd_order("fivexx", 90_000, 0, 0, at);
    let record = (event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap());
    produce(&producer(&brokers()), &topic, &[record]).await;

    let group = unique("e2e.rd-5xx.group");
    let mut command = rdstation_sink(dir.path(), &topic, &group, &proxy.url, &rules, "sink");
    command.env("ELO_RDSTATION_CONTACT_UPDATES", CAP.to_string()).env("ELO_RDSTATION_CONTACT_UPDATE_WINDOW", "60m");
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut command);
    let patches = || proxy.log().iter().filter(|c| c.method == "PATCH").count();
    let capped = wait_until(Duration::from_secs(90), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        patches() >= CAP
    })
    .await;
    assert!(capped, "the contact write was never retried up to its cap:\n{}", log(dir.path(), "sink"));
    // The runtime keeps retrying a transient failure (200 ms, 400 ms, ... backoff): without
    // the failed writes saved, RD would see a PATCH per retry.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(patches(), CAP, "RD got more writes for one contact than its cap: {:?}", proxy.log());
}

/// At start-up the account's budget counts as spent for `ELO_RDSTATION_START_HOLD`: a
/// previous process's last minute is invisible to this one. Contact requests wait out the
/// hold; the order's e-commerce event does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_requests_wait_out_the_start_up_hold_and_events_do_not() {
    const HOLD: Duration = Duration::from_secs(15);
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    let proxy = counting_proxy(&rd_url).await;
    write_rd_credentials(dir.path(), &rd, &proxy.url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"everyone\"\nfields = { cf_elo_segment = \"all\" }\n").unwrap();
    let topic = unique("e2e.rd-hold.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let event = rd_order("hold", 95_000, 0, 0, at);
    let record = (event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap());
    produce(&producer(&brokers()), &topic, &[record]).await;

    let group = unique("e2e.rd-hold.group");
    let mut command = rdstation_sink(dir.path(), &topic, &group, &proxy.url, &rules, "sink");
    command.env("ELO_RDSTATION_START_HOLD", format!("{}s", HOLD.as_secs()));
    let started = Instant::now();
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut command);
    // The custom-field check is sent before the hold (events need it); the contact's own
    // requests are what the hold is about.
    let contact_request = |c: &&Call| c.path.starts_with("/platform/contacts/") && !c.path.ends_with("/fields");
    let landed = wait_until(Duration::from_secs(90), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        proxy.log().iter().any(|c| contact_request(&c))
    })
    .await;
    assert!(landed, "the contact never landed:\n{}", log(dir.path(), "sink"));
    let calls = proxy.log();
    let contact = calls.iter().find(contact_request).unwrap().at;
    let event = calls.iter().find(|c| c.path == "/platform/events").expect("the order's event reached RD").at;
    assert!(contact >= started + HOLD, "a contact request {:?} after start, inside the hold", contact - started);
    assert!(event < started + HOLD, "the event waited for the hold: {:?} after start", event - started);
}

/// RD allows 15,000 tag posts per account per day. Each partition spends an equal share, kept
/// in its state store: a restarted sink remembers the day's posts, and past the share tags
/// still land (read + PATCH) with no 429. Here the account allows 6 a day over 3 partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_days_tag_posts_survive_a_restart_and_past_them_tags_still_land_without_a_429() {
    const PER_DAY: usize = 6;
    const FIRST: usize = 12;
    const SECOND: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let config = RdConfig { contacts_per_minute: 1_000_000, tags_per_account_per_day: PER_DAY, ..RdConfig::default() };
    let (rd, rd_url) = serve_rdstation(config).await;
    let proxy = counting_proxy(&rd_url).await;
    write_rd_credentials(dir.path(), &rd, &proxy.url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"everyone\"\ntags = [\"elo-customer\"]\n").unwrap();
    let topic = unique("e2e.rd-tags.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let orders = async |customers: std::ops::Range<usize>| {
        let mut records = Vec::new();
        for c in customers {
            let event = rd_order("tags", 70_000, c, c, at);
            records.push((event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap()));
        }
        produce(&producer(&brokers()), &topic, &records).await;
    };
    let tagged = |n: usize| {
        let all = contacts(&rd);
        all.len() == n
            && all
                .values()
                .all(|f| f.get("tags").and_then(Value::as_array).is_some_and(|t| t.contains(&"elo-customer".into())))
    };
    let group = unique("e2e.rd-tags.group");
    let sink_command = || {
        let mut command = rdstation_sink(dir.path(), &topic, &group, &proxy.url, &rules, "sink");
        command.env("ELO_RDSTATION_TAG_POSTS_PER_DAY", PER_DAY.to_string());
        command
    };

    orders(0..FIRST).await;
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut sink_command());
    let landed = wait_until(Duration::from_secs(120), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        tagged(FIRST)
    })
    .await;
    assert!(landed, "the first customers were not all tagged:\n{}", log(dir.path(), "sink"));
    sink.signal("TERM");
    assert!(sink.wait_timeout(Duration::from_secs(30)).is_some(), "the sink did not stop");
    let posts = |calls: &[Call]| calls.iter().filter(|c| c.method == "POST" && c.path.ends_with("/tag")).count();
    let first_posts = posts(&proxy.log());
    assert!(first_posts > 0, "no tag post was used");

    // A new process: the partitions' ledgers come back from the changelog.
    orders(FIRST..FIRST + SECOND).await;
    let mut sink = ChildGuard::spawn("rdstation-sink", &mut sink_command());
    let landed = wait_until(Duration::from_secs(120), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        tagged(FIRST + SECOND)
    })
    .await;
    let calls = proxy.log();
    assert!(landed, "the later customers were not all tagged ({} calls):\n{}", calls.len(), log(dir.path(), "sink"));
    assert!(
        calls.iter().all(|c| c.status != 429),
        "RD answered 429: {:?}",
        calls.iter().filter(|c| c.status == 429).collect::<Vec<_>>()
    );
    let all_posts = posts(&calls);
    eprintln!("tag posts: {first_posts} before the restart, {all_posts} in all (the account allows {PER_DAY})");
    assert!(all_posts <= PER_DAY, "{all_posts} tag posts in a day; the account allows {PER_DAY}");
}

/// The sent-log is bounded: an entry is dropped (a tombstone in its changelog) once its order
/// is older than the retention, and an order that old gets no event again: not from a replay
/// (a backfill, an offset reset), nor from a new version (a status change months later calls
/// for ORDER_PLACED again, whose entry is gone), and not after the retention is raised (the
/// partition remembers how far it pruned). RD still gets each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_log_entries_past_the_retention_are_pruned_and_a_replay_of_their_events_is_not_resent() {
    let dir = tempfile::tempdir().unwrap();
    let (rd, rd_url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    write_rd_credentials(dir.path(), &rd, &rd_url).await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"everyone\"\nfields = { cf_elo_segment = \"all\" }\n").unwrap();
    let topic = unique("e2e.rd-retention.commerce");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let group = unique("e2e.rd-retention.group");
    let sink_with = |retention: &str| {
        let mut command = rdstation_sink(dir.path(), &topic, &group, &rd_url, &rules, "sink");
        command.env("ELO_RDSTATION_SENT_LOG_RETENTION", retention);
        ChildGuard::spawn("rdstation-sink", &mut command)
    };
    // Pruned every 5 s, once the order is 22 s old (the retention and its margin); the order is
    // produced once the sink runs, so it is sent well within its 20 s.
    let mut sink = sink_with("20s");
    let first = rd_order("retention", 60_000, 0, 0, now());
    let first_record = (first.customer_key.clone(), codec.encode(&topic, &first).await.unwrap());
    let producer = producer(&brokers());
    produce(&producer, &topic, std::slice::from_ref(&first_record)).await;
    let sent = wait_until(Duration::from_secs(90), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        rd.sim.lock().unwrap().events.len() == 1
    })
    .await;
    assert!(sent, "the order's event never reached RD:\n{}", log(dir.path(), "sink"));

    let sent_log = format!("{topic}.rd-sent");
    let deadline = Instant::now() + Duration::from_secs(90);
    // The entry is written once RD confirmed the event, so RD may hold it a moment before the
    // sent-log does: wait for the entry, then for its tombstone.
    let pruned = loop {
        let records = tokio::task::block_in_place(|| read_all(&brokers(), &sent_log, 3));
        if records.iter().any(|r| r.payload().is_none()) {
            break true;
        }
        if Instant::now() > deadline {
            assert!(!records.is_empty(), "nothing in the sent-log");
            break false;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(pruned, "the sent-log entry was never pruned:\n{}", log(dir.path(), "sink"));

    // The retention raised to ten years, on a new process.
    sink.signal("TERM");
    assert!(sink.wait_timeout(Duration::from_secs(30)).is_some(), "the sink did not stop");
    let mut sink = sink_with("3650d");
    // The old event again, a new version of its order (paid now: it calls for ORDER_PLACED and
    // ORDER_PAID), then a new order of the same customer (same partition, after them): once
    // the new order's event is at RD, the others were handled, and nothing of theirs sent.
    let mut paid = first.clone();
    paid.source_version.updated_at = now();
    paid.occurred_at = paid.source_version.updated_at;
    paid.order.as_mut().unwrap().status = "processing".into();
    paid.event_id = elo_events::ids::event_id(&["rd-retention", "paid"]);
    let paid_record = (paid.customer_key.clone(), codec.encode(&topic, &paid).await.unwrap());
    let second = rd_order("retention", 60_000, 1, 0, now());
    let second_record = (second.customer_key.clone(), codec.encode(&topic, &second).await.unwrap());
    produce(&producer, &topic, &[first_record, paid_record, second_record]).await;
    let handled = wait_until(Duration::from_secs(90), || {
        assert!(sink.child.try_wait().unwrap().is_none(), "the sink exited:\n{}", log(dir.path(), "sink"));
        rd.sim.lock().unwrap().events.len() >= 2
    })
    .await;
    assert!(handled, "the new order's event never reached RD:\n{}", log(dir.path(), "sink"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = rd.sim.lock().unwrap().events.clone();
    assert_eq!(events.len(), 2, "RD got an event again after its sent-log entry was pruned: {events:#?}");
}
