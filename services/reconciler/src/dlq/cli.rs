//! `reconciler dlq list|show|replay`.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::Duration;

use elo_events::{CommerceEvent, EventCodec, IntegrationCommand, InventoryEvent, SyncOutcome};
use elo_kafka::{KafkaArgs, Producer, headers};
use elo_service::CommonArgs;
use elo_telemetry::Health;
use serde_json::{Value, json};

use super::replay::{self, Action, ReplayWriter};
use super::{DEFAULT_DLQ_TOPICS, DeadLetterEntry, Filter, parse_instant, redact};
use crate::ops::{OpsArgs, now_ms};
use crate::scan::{self, Window};

#[derive(Clone, Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters (one line each, or JSON lines with --json).
    List {
        #[command(flatten)]
        select: SelectArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter, `<dlq topic>/<partition>/<offset>`, decoded, with its headers.
    Show {
        coordinate: String,
        /// Show e-mails, phones and names as they are (redacted by default).
        #[arg(long)]
        reveal: bool,
    },
    /// Replay dead letters through the normal path (the origin topic, for the group that parked
    /// them). Records that fail again return to their DLQ.
    Replay {
        #[command(flatten)]
        select: SelectArgs,
        /// List what would be replayed; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replay records a previous run already replayed.
        #[arg(long)]
        again: bool,
        /// Replay for this consumer group instead of the one that parked each record (a group
        /// renamed since).
        #[arg(long = "for-group")]
        for_group: Option<String>,
        /// Replay even for a group that has neither members nor committed offsets on the origin
        /// topic (its records would be skipped by every running consumer).
        #[arg(long)]
        force: bool,
    },
}

/// The deployment's DLQ topics (one setting for the service and every `dlq` subcommand).
#[derive(Clone, Debug, clap::Args)]
pub struct DlqTopicsArgs {
    /// Every DLQ topic (comma-separated).
    #[arg(long = "dlq-topics", global = true, env = "ELO_RECONCILER_DLQ_TOPICS", value_delimiter = ',', default_values_t = DEFAULT_DLQ_TOPICS.map(String::from))]
    pub dlq_topics: Vec<String>,
}

/// Which dead letters.
#[derive(Clone, Debug, clap::Args)]
pub struct SelectArgs {
    /// Only these services' DLQs (repeatable), e.g. `salesforce-sink`.
    #[arg(long = "service")]
    pub services: Vec<String>,
    /// Error class: permanent, transient, rate_limited, auth.
    #[arg(long)]
    pub class: Option<String>,
    /// Error code, e.g. DUPLICATES_DETECTED.
    #[arg(long)]
    pub code: Option<String>,
    /// Record key, e.g. `c:42`.
    #[arg(long)]
    pub key: Option<String>,
    /// Parked at or after: 2026-11-30, 2026-11-30T08:00Z, epoch ms, or 2h / 30m / 3d ago.
    #[arg(long)]
    pub since: Option<String>,
    /// Parked before (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many records: the ones parked first (listed, and replayed, in DLQ order).
    #[arg(long)]
    pub limit: Option<usize>,
}

impl SelectArgs {
    fn filter(&self) -> anyhow::Result<Filter> {
        let now = now_ms();
        let instant = |t: &Option<String>| t.as_deref().map(|t| parse_instant(t, now)).transpose();
        Ok(Filter {
            services: self.services.clone(),
            class: self.class.clone(),
            code: self.code.clone(),
            key: self.key.clone(),
            since_ms: instant(&self.since).map_err(anyhow::Error::msg)?,
            until_ms: instant(&self.until).map_err(anyhow::Error::msg)?,
        })
    }
}

/// Reads the selected dead letters from every matching DLQ topic.
pub async fn select(
    kafka: &KafkaArgs,
    dlq_topics: &[String],
    args: &SelectArgs,
) -> anyhow::Result<Vec<DeadLetterEntry>> {
    let filter = args.filter()?;
    let topics: Vec<String> =
        filter.checked_topics(dlq_topics).map_err(anyhow::Error::msg)?.into_iter().cloned().collect();
    let (kafka, limit) = (kafka.clone(), args.limit);
    tokio::task::spawn_blocking(move || {
        let window = Window { from_ms: filter.since_ms, until_ms: filter.until_ms };
        let mut out = super::Oldest::new(limit);
        for topic in &topics {
            scan::scan(&kafka, topic, window, |r| {
                let e = DeadLetterEntry(r);
                if filter.matches(&e) {
                    out.push(e);
                }
            })?;
        }
        Ok(out.into_sorted())
    })
    .await?
}

pub async fn run(common: &CommonArgs, ops: &OpsArgs, command: DlqCommand) -> anyhow::Result<()> {
    let dlq_topics = &ops.dlq.dlq_topics;
    match command {
        DlqCommand::List { select: args, json } => {
            let entries = select(&common.kafka, dlq_topics, &args).await?;
            if !json {
                println!(
                    "{:<28} {:<24} {:<10} {:<24} {:<26} {:<14} {:>3}  REPLAY OF",
                    "DEAD LETTER", "PARKED", "CLASS", "CODE", "ORIGIN", "KEY", "TRY"
                );
            }
            for e in &entries {
                if json {
                    println!("{}", summary_json(e, false));
                } else {
                    println!("{}", summary_line(e));
                }
            }
            if !json {
                eprintln!("{} dead letter(s)", entries.len());
            }
            Ok(())
        }
        DlqCommand::Show { coordinate, reveal } => {
            let entry = find(&common.kafka, dlq_topics, &coordinate).await?;
            let codec = EventCodec::new(&common.registry.config()?)?;
            let value = decoded_value(&codec, common, &entry, reveal).await;
            println!("{}", serde_json::to_string_pretty(&shown(&entry, value, reveal))?);
            Ok(())
        }
        DlqCommand::Replay { select: args, dry_run, again, for_group, force } => {
            let options = ReplayOptions { dry_run, again, force, for_group };
            replay_command(common, dlq_topics, &args, &options, &ops.replay_checkpoints).await
        }
    }
}

struct ReplayOptions {
    dry_run: bool,
    again: bool,
    force: bool,
    for_group: Option<String>,
}

async fn replay_command(
    common: &CommonArgs,
    dlq_topics: &[String],
    args: &SelectArgs,
    options: &ReplayOptions,
    checkpoint_topic: &str,
) -> anyhow::Result<()> {
    let entries = select(&common.kafka, dlq_topics, args).await?;
    let done = replayed(&common.kafka, checkpoint_topic).await?;
    let actions = replay::plan(&entries, &done, options.again, options.for_group.as_deref());
    let missing = missing_groups(&common.kafka, &actions).await?;
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|(g, t)| format!("{g} (on {t})")).collect();
        let text = format!(
            "no consumer group {} has members or committed offsets: every running consumer would skip these replays",
            names.join(", ")
        );
        if !options.force && !options.dry_run {
            anyhow::bail!("{text}; check --for-group, or pass --force to replay anyway");
        }
        eprintln!("warning: {text}");
    }
    if options.dry_run {
        for (e, a) in entries.iter().zip(&actions) {
            let what = match a {
                Action::Replay { topic, partition, group } => {
                    let on = partition.map_or_else(|| "by key".to_owned(), |p| format!("partition {p}"));
                    format!("would replay to {topic} ({on}) for {group}")
                }
                Action::AlreadyReplayed => "already replayed (use --again)".to_owned(),
                Action::NotReplayable(why) => format!("not replayable: {why}"),
            };
            println!("{}  {}  {}  {what}", e.coordinate(), e.code(), e.key().unwrap_or_default());
        }
        let would = actions.iter().filter(|a| matches!(a, Action::Replay { .. })).count();
        eprintln!("dry run: {would} of {} selected dead letter(s) would be replayed; nothing written", entries.len());
        return Ok(());
    }
    let health = Health::new();
    if common.topics.provision {
        // Compacted, and gone after the DLQs' 30 days (as deploy/base/topics.yaml says).
        let spec = common
            .topics
            .spec(checkpoint_topic)
            .with_config("cleanup.policy", "compact,delete")
            .with_config("retention.ms", "2592000000");
        elo_kafka::ensure_topics(&common.kafka, &[spec], Duration::from_secs(10), &health).await?;
    }
    let writer =
        KafkaReplays { producer: Producer::new(&common.kafka, health)?, checkpoint_topic: checkpoint_topic.to_owned() };
    let bar = std::io::stderr().is_terminal().then(|| {
        let style =
            indicatif::ProgressStyle::with_template("replay [{bar:40}] {pos}/{len} ({per_sec}, eta {eta}) {msg}")
                .expect("valid template");
        indicatif::ProgressBar::new(entries.len() as u64).with_style(style)
    });
    let result = replay::execute(&writer, &entries, &actions, |e, _| {
        if let Some(bar) = &bar {
            bar.set_message(e.coordinate());
            bar.inc(1);
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    writer.producer.flush(Duration::from_secs(10))?;
    let summary = result?;
    println!("{}", serde_json::to_string(&summary)?);
    eprintln!(
        "replayed {}, already replayed {}, not replayable {}; records that fail again return to their DLQ",
        summary.replayed, summary.already_replayed, summary.not_replayable
    );
    Ok(())
}

/// The (group, topic) pairs the plan replays for that no consumer group answers to.
async fn missing_groups(kafka: &KafkaArgs, actions: &[Action]) -> anyhow::Result<Vec<(String, String)>> {
    let wanted: std::collections::BTreeSet<(String, String)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Replay { topic, group, .. } => Some((group.clone(), topic.clone())),
            _ => None,
        })
        .collect();
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || {
        let mut missing = Vec::new();
        for (group, topic) in wanted {
            if !super::groups::consumes(&kafka, &group, &topic)? {
                missing.push((group, topic));
            }
        }
        Ok(missing)
    })
    .await?
}

/// The coordinates a previous replay already did.
async fn replayed(kafka: &KafkaArgs, topic: &str) -> anyhow::Result<HashSet<String>> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut done = HashSet::new();
        scan::scan(&kafka, &topic, Window::default(), |r| {
            if let (Some(k), Some(_)) = (r.key, r.payload) {
                done.insert(String::from_utf8_lossy(&k).into_owned());
            }
        })?;
        Ok(done)
    })
    .await?
}

struct KafkaReplays {
    producer: Producer,
    checkpoint_topic: String,
}

impl ReplayWriter for KafkaReplays {
    async fn publish(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        hs: &[(String, Vec<u8>)],
    ) -> anyhow::Result<String> {
        let owned = headers::to_owned_headers(hs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        let d = match partition {
            Some(p) => self.producer.send_with_headers_to_partition(topic, p, key, payload, owned).await?,
            None => self.producer.send_with_headers(topic, key, payload, owned).await?,
        };
        Ok(format!("{topic}/{}/{}", d.partition, d.offset))
    }

    async fn checkpoint(&self, coordinate: &str, landed: &str, group: &str) -> anyhow::Result<()> {
        let value = json!({ "replayed_to": landed, "group": group, "at_ms": now_ms() }).to_string();
        self.producer.send(&self.checkpoint_topic, coordinate.as_bytes(), value.as_bytes(), None).await?;
        Ok(())
    }
}

/// Finds one dead letter by coordinate.
async fn find(kafka: &KafkaArgs, dlq_topics: &[String], coordinate: &str) -> anyhow::Result<DeadLetterEntry> {
    let bad = || anyhow::anyhow!("expected <dlq topic>/<partition>/<offset>, got {coordinate:?}");
    let mut parts = coordinate.rsplitn(3, '/');
    let offset: i64 = parts.next().and_then(|o| o.parse().ok()).ok_or_else(bad)?;
    let partition: i32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let topic = parts.next().ok_or_else(bad)?.to_owned();
    if !dlq_topics.contains(&topic) {
        anyhow::bail!("{topic} is not one of the DLQ topics ({})", dlq_topics.join(", "));
    }
    let kafka = kafka.clone();
    let found = tokio::task::spawn_blocking(move || scan::read_at(&kafka, &topic, partition, offset)).await??;
    found.map(DeadLetterEntry).ok_or_else(|| anyhow::anyhow!("no dead letter at {coordinate}"))
}

/// One table row.
fn summary_line(e: &DeadLetterEntry) -> String {
    let parked = e.parked_ms().map(format_ms).unwrap_or_default();
    let origin = match e.origin() {
        Some((t, p, o)) => format!("{t}/{p}/{o}"),
        None => e.header(elo_kafka::dlq::ORIGIN_SOURCE).unwrap_or("-").to_owned(),
    };
    let replay_of = e.header(elo_kafka::dlq::REPLAY_OF).unwrap_or("-");
    format!(
        "{:<28} {:<24} {:<10} {:<24} {:<26} {:<14} {:>3}  {replay_of}",
        e.coordinate(),
        parked,
        e.class(),
        e.code(),
        origin,
        e.key().unwrap_or_default(),
        e.header(elo_kafka::dlq::ATTEMPTS).unwrap_or("-"),
    )
}

/// `dlq show`'s output: the summary, the headers and the value (already redacted by
/// [`decoded_value`] unless `reveal`), personal data hidden unless `reveal`.
fn shown(entry: &DeadLetterEntry, value: Value, reveal: bool) -> Value {
    let mut out = summary_json(entry, reveal);
    out["headers"] = Value::Object(
        entry
            .0
            .headers
            .iter()
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v);
                (k.clone(), json!(if reveal { v.into_owned() } else { redact::header(k, &v) }))
            })
            .collect(),
    );
    out["value"] = value;
    out
}

fn summary_json(e: &DeadLetterEntry, reveal: bool) -> Value {
    use elo_kafka::dlq as h;
    let message = e.header(h::ERROR_MESSAGE).map(|m| if reveal { m.to_owned() } else { redact::text(m) });
    json!({
        "dead_letter": e.coordinate(),
        "service": e.service(),
        "parked_ms": e.parked_ms(),
        "class": e.class(),
        "code": e.code(),
        "message": message,
        "key": e.key(),
        "origin": e.origin().map(|(t, p, o)| format!("{t}/{p}/{o}")),
        "origin_source": e.header(h::ORIGIN_SOURCE),
        "group": e.group(),
        "attempts": e.header(h::ATTEMPTS).and_then(|a| a.parse::<u32>().ok()),
        "replay_of": e.header(h::REPLAY_OF),
    })
}

/// `2026-11-30T08:15:02Z`.
pub(crate) fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (day, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    format!("{}T{:02}:{:02}:{:02}Z", elo_events::time::civil_date(day), rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The value decoded by the topic it came from; undecodable bytes shown as text or size.
async fn decoded_value(codec: &EventCodec, common: &CommonArgs, e: &DeadLetterEntry, reveal: bool) -> Value {
    let Some(payload) = e.0.payload.as_deref() else { return Value::Null };
    let t = &common.topics;
    let origin = e.origin().map(|(topic, _, _)| topic).unwrap_or_default();
    let decoded = if origin == t.commerce {
        Some(codec.decode::<CommerceEvent>(payload).await.map(|v| serde_json::to_value(v).unwrap_or_default()))
    } else if origin == t.outcomes {
        Some(codec.decode::<SyncOutcome>(payload).await.map(|v| serde_json::to_value(v).unwrap_or_default()))
    } else if origin == t.commands {
        Some(codec.decode::<IntegrationCommand>(payload).await.map(|v| serde_json::to_value(v).unwrap_or_default()))
    } else if origin == t.inventory {
        Some(codec.decode::<InventoryEvent>(payload).await.map(|v| serde_json::to_value(v).unwrap_or_default()))
    } else {
        None
    };
    match decoded {
        Some(Ok(mut v)) => {
            if !reveal {
                redact::value(&mut v);
            }
            v
        }
        Some(Err(error)) => json!({ "undecodable": error.to_string(), "raw": raw(payload, reveal) }),
        None => raw(payload, reveal),
    }
}

/// A payload no schema decodes: JSON as JSON (redacted unless `reveal`), other text only when
/// revealed, otherwise (and binary always) as size and hash.
fn raw(payload: &[u8], reveal: bool) -> Value {
    match std::str::from_utf8(payload) {
        Ok(text) => match serde_json::from_str(text) {
            Ok(mut v) => {
                if !reveal {
                    redact::value(&mut v);
                }
                v
            }
            Err(_) if reveal => json!(text),
            Err(_) => redact::opaque(payload),
        },
        Err(_) => redact::opaque(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_and_list_hide_personal_data_in_payloads_and_messages_unless_revealed() {
        let truncated = br#"{"entity_id":"9","customer_taxvat":"123.456.789-09","customer_email":"a@b.c","grand"#;
        let mut entry = crate::dlq::tests::letter(
            "order-ingest.dlq",
            3,
            &[
                (elo_kafka::dlq::ERROR_MESSAGE, "invalid phone +55 11 98765-4321 for a@b.c"),
                ("x-forwarded-for", "200.100.50.25"),
                ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ],
            1,
        );
        entry.0.payload = Some(truncated.to_vec());
        let hidden = shown(&entry, raw(truncated, false), false).to_string();
        let listed = summary_json(&entry, false).to_string();
        for secret in ["123.456.789-09", "a@b.c", "98765-4321", "200.100.50.25"] {
            assert!(!hidden.contains(secret), "{secret} in {hidden}");
            assert!(!listed.contains(secret), "{secret} in {listed}");
        }
        assert!(hidden.contains(&format!("<{} bytes, sha256 ", truncated.len())), "{hidden}");
        assert!(hidden.contains("0af7651916cd43dd8448eb211c80319c"), "the trace context stays: {hidden}");
        let json = br#"{"entity_id":"9","customer_taxvat":"123.456.789-09","remote_ip":"10.1.1.1"}"#;
        let hidden = shown(&entry, raw(json, false), false);
        assert_eq!(hidden["value"]["entity_id"], "9");
        assert_eq!(hidden["value"]["customer_taxvat"], redact::REDACTED);
        assert_eq!(hidden["value"]["remote_ip"], redact::REDACTED);
        let revealed = shown(&entry, raw(truncated, true), true).to_string();
        assert!(revealed.contains("123.456.789-09") && revealed.contains("98765-4321"), "--reveal shows all");
    }

    #[test]
    fn instants_format_as_utc() {
        assert_eq!(format_ms(1_796_083_200_000 - 1_000), "2026-11-30T23:59:59Z");
    }
}
