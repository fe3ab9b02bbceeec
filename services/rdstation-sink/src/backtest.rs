//! `rdstation-sink rules backtest`: replays the order history kept in `commerce.events`
//! through a proposed rules file and reports how each rule's segment would have moved, week by
//! week (a table, and CSV with `--csv`). Nothing is written to RD or Kafka.
//!
//! Events are folded into per-customer state exactly as the sink does, in time order across
//! partitions; at the end of each week every customer's aggregates are evaluated at that
//! instant, so recency-based segments age as they would have.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use elo_events::{CommerceEvent, CommerceEventType, EventCodec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::aggregates::CustomerState;
use crate::rules::Rules;

const WEEK_MS: i64 = 7 * 86_400_000;

/// Bytes per fetch response (librdkafka `fetch.max.bytes`; an operator may change it with
/// `ELO_RDKAFKA_FETCH_MAX_BYTES`). Small on purpose: Tansu 0.6 (the local broker) looks up
/// each record's headers with a query that scans its whole header table (no index), so a
/// response of librdkafka's default size (Tansu caps it at 5 MiB, thousands of records) takes
/// minutes once the broker holds a few ten thousand records with headers, and librdkafka times
/// the request out and sends it again, for ever: the back-test hung. A few hundred records
/// per response keep every request well inside the timeout; on Kafka it costs little.
const FETCH_BYTES: &str = "65536";

/// No record for this long while records remain: the back-test fails instead of hanging.
const STALL: Duration = Duration::from_secs(120);

/// `rules backtest` options.
#[derive(Clone, Debug, clap::Args)]
pub struct BacktestArgs {
    /// Also write the table as CSV to this file.
    #[arg(long = "csv")]
    pub csv: Option<PathBuf>,
}

/// One week's segment sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct Week {
    /// End of the week (ms since the epoch, exclusive).
    pub end_ms: i64,
    pub customers: usize,
    /// Customers each rule matched at the end of the week, in file order.
    pub sizes: Vec<usize>,
}

/// Replays `events` (any order) and measures the rules' segments at the end of each week.
pub fn weekly(rules: &Rules, mut events: Vec<CommerceEvent>) -> Vec<Week> {
    events.sort_by_key(|e| (e.occurred_at, e.source_version.updated_at));
    let Some(first) = events.first().map(|e| e.occurred_at) else { return Vec::new() };
    let mut states: BTreeMap<String, CustomerState> = BTreeMap::new();
    let mut weeks = Vec::new();
    let mut end = first - first.rem_euclid(WEEK_MS) + WEEK_MS;
    let measure = |states: &BTreeMap<String, CustomerState>, end: i64| {
        let mut sizes = vec![0; rules.rules.len()];
        for state in states.values() {
            let aggregate = state.aggregate(end);
            for (i, rule) in rules.rules.iter().enumerate() {
                if rule.when.matches(&aggregate) {
                    sizes[i] += 1;
                }
            }
        }
        Week { end_ms: end, customers: states.len(), sizes }
    };
    for event in events {
        while event.occurred_at >= end {
            weeks.push(measure(&states, end));
            end += WEEK_MS;
        }
        if event.event_type == CommerceEventType::CustomerErased {
            states.remove(&event.customer_key);
        } else {
            states.entry(event.customer_key.clone()).or_default().apply(&event);
        }
    }
    weeks.push(measure(&states, end));
    weeks
}

/// The report: a header and one row per week, `sep`-separated.
pub fn table(rules: &Rules, weeks: &[Week], sep: &str) -> String {
    let mut out = String::new();
    let names: Vec<&str> = rules.rules.iter().map(|r| r.name.as_str()).collect();
    out.push_str(&format!("week_ending{sep}customers{sep}{}\n", names.join(sep)));
    for week in weeks {
        let day = week.end_ms.div_euclid(86_400_000);
        let sizes: Vec<String> = week.sizes.iter().map(ToString::to_string).collect();
        out.push_str(&format!("{}{sep}{}{sep}{}\n", civil_date(day), week.customers, sizes.join(sep)));
    }
    out
}

fn civil_date(days: i64) -> String {
    elo_events::time::civil_date(days)
}

/// Reads `commerce.events` from the beginning to the current end and prints the report.
pub async fn run(config: &crate::Config, args: &BacktestArgs) -> anyhow::Result<()> {
    let rules = config.rd.rules()?;
    let kafka = &config.common.kafka;
    let topic = config.common.topics.commerce.clone();
    let codec = EventCodec::new(&config.common.registry.config()?)?;
    let consumer: BaseConsumer = kafka
        .client_config_with(
            &[
                ("fetch.max.bytes", FETCH_BYTES),
                ("max.partition.fetch.bytes", FETCH_BYTES),
                // librdkafka requires fetch.max.bytes >= message.max.bytes.
                ("message.max.bytes", FETCH_BYTES),
            ],
            &[("group.id", "elo-rdstation-backtest"), ("enable.auto.commit", "false")],
        )?
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len() as i32);
    anyhow::ensure!(partitions > 0, "topic {topic} not found");
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = BTreeMap::new();
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
        if high > low {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
            ends.insert(p, high);
            remaining += high - low;
        }
    }
    consumer.assign(&tpl)?;
    let progress = indicatif::ProgressBar::with_draw_target(
        Some(remaining.max(0) as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let mut events = Vec::new();
    let mut skipped = 0u64;
    let mut last_record = std::time::Instant::now();
    while !ends.is_empty() {
        let Some(message) = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(500))) else {
            anyhow::ensure!(
                last_record.elapsed() < STALL,
                "no record from the broker in {STALL:?} ({} of {remaining} read; partitions left: {:?})",
                events.len() as u64 + skipped,
                ends.keys().collect::<Vec<_>>()
            );
            continue;
        };
        let message = message?;
        last_record = std::time::Instant::now();
        let (partition, offset) = (message.partition(), message.offset());
        match message.payload() {
            Some(bytes) => match codec.decode::<CommerceEvent>(bytes).await {
                Ok(event) => events.push(event),
                Err(_) => skipped += 1,
            },
            None => skipped += 1,
        }
        progress.inc(1);
        if ends.get(&partition).is_some_and(|end| offset + 1 >= *end) {
            ends.remove(&partition);
        }
    }
    progress.finish_and_clear();
    let count = events.len();
    let weeks = weekly(&rules, events);
    print!("{}", table(&rules, &weeks, "\t"));
    eprintln!("{count} events replayed ({skipped} undecodable skipped)");
    if let Some(path) = &args.csv {
        std::fs::File::create(path)?.write_all(table(&rules, &weeks, ",").as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use elo_events::sample;

    use super::*;

    #[test]
    fn segments_move_week_by_week() {
        let rules = Rules::parse(
            "[[rule]]\nname = \"buyer\"\nwhen = { frequency_gte = 1 }\n[[rule]]\nname = \"repeat\"\nwhen = { frequency_gte = 2 }\n",
            "t",
        )
        .unwrap();
        // Customer A buys in week 1 and week 3; customer B in week 2.
        let at = |n: u64, key: &str, t: i64| {
            let mut e = sample::order_placed(n);
            e.customer_key = key.into();
            e.occurred_at = t;
            e.source_version.updated_at = t;
            e
        };
        let start = 1_793_491_200_000 - 1_793_491_200_000_i64.rem_euclid(WEEK_MS) + 1000;
        let events = vec![at(3, "a", start + 2 * WEEK_MS), at(1, "a", start), at(2, "b", start + WEEK_MS)];
        let weeks = weekly(&rules, events);
        let sizes: Vec<(usize, Vec<usize>)> = weeks.iter().map(|w| (w.customers, w.sizes.clone())).collect();
        assert_eq!(sizes, [(1, vec![1, 0]), (2, vec![2, 0]), (2, vec![2, 1])]);
        let csv = table(&rules, &weeks, ",");
        assert!(csv.starts_with("week_ending,customers,buyer,repeat\n"), "{csv}");
        assert_eq!(csv.lines().count(), 4);
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_787), "2026-11-30");
    }
}
