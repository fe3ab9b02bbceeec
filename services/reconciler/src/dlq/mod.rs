//! DLQ operations over every `<service>.dlq`: list, show, replay.
//!
//! A dead letter is the original record (key, value, headers incl. `traceparent`) plus the
//! `elo-dlq-*` headers the consumer runtime adds ([`elo_kafka::dlq`]). This module reads them
//! ([`DeadLetterEntry`]), selects them ([`Filter`]) and replays them ([`replay`]); [`cli`] is
//! the `reconciler dlq ...` command line.

pub mod cli;
pub mod groups;
pub mod redact;
pub mod replay;

use elo_kafka::{Record, dlq};

/// The DLQ topics of Elo's services, in workflow order.
pub const DEFAULT_DLQ_TOPICS: [&str; 4] =
    ["order-ingest.dlq", "salesforce-sink.dlq", "rdstation-sink.dlq", "reconciler.dlq"];

/// One record read from a DLQ topic.
#[derive(Clone, Debug)]
pub struct DeadLetterEntry(pub Record);

impl DeadLetterEntry {
    /// `<dlq topic>/<partition>/<offset>`: how operators name a dead letter.
    pub fn coordinate(&self) -> String {
        format!("{}/{}/{}", self.0.topic, self.0.partition, self.0.offset)
    }

    /// A text header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.0.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The service whose DLQ this is (`salesforce-sink` for `salesforce-sink.dlq`).
    pub fn service(&self) -> &str {
        self.0.topic.strip_suffix(".dlq").unwrap_or(&self.0.topic)
    }

    pub fn class(&self) -> &str {
        self.header(dlq::ERROR_CLASS).unwrap_or("unknown")
    }

    pub fn code(&self) -> &str {
        self.header(dlq::ERROR_CODE).unwrap_or("unknown")
    }

    pub fn key(&self) -> Option<String> {
        self.0.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// Where the record was consumed from, when it was on Kafka at all (order-ingest's dead
    /// letters come from Magento and name an `elo-dlq-origin-source` instead).
    pub fn origin(&self) -> Option<(String, i32, i64)> {
        let topic = self.header(dlq::ORIGIN_TOPIC)?;
        let partition = self.header(dlq::ORIGIN_PARTITION)?.parse().ok()?;
        let offset = self.header(dlq::ORIGIN_OFFSET)?.parse().ok()?;
        Some((topic.to_owned(), partition, offset))
    }

    /// The consumer group that parked it: the one a replay is for.
    pub fn group(&self) -> Option<&str> {
        self.header(dlq::GROUP)
    }

    /// When it was parked (the dead letter's own timestamp).
    pub fn parked_ms(&self) -> Option<i64> {
        self.0.timestamp_ms
    }

    /// The headers a replay carries: the originals (incl. `traceparent`), without the
    /// `elo-dlq-*` ones and without an earlier replay's marks.
    pub fn original_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.0
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with("elo-dlq-") && k != dlq::REPLAY_OF && k != dlq::REPLAY_FOR)
            .cloned()
            .collect()
    }

    /// Why it cannot be replayed, if it cannot.
    pub fn not_replayable(&self) -> Option<&'static str> {
        if self.origin().is_none() {
            return Some(
                "no origin topic (it never was on Kafka: fix it at the source and it comes back on the next poll)",
            );
        }
        if self.group().is_none() {
            return Some("no elo-dlq-group header (cannot tell which consumer it is for)");
        }
        None
    }
}

/// Which dead letters an operation applies to. Every set criterion must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Services (DLQ topic without `.dlq`); empty = all.
    pub services: Vec<String>,
    pub class: Option<String>,
    pub code: Option<String>,
    pub key: Option<String>,
    /// Parked at or after (ms).
    pub since_ms: Option<i64>,
    /// Parked before (ms).
    pub until_ms: Option<i64>,
}

impl Filter {
    pub fn matches(&self, e: &DeadLetterEntry) -> bool {
        let parked = e.parked_ms();
        (self.services.is_empty() || self.services.iter().any(|s| s == e.service()))
            && self.class.as_deref().is_none_or(|c| c.eq_ignore_ascii_case(e.class()))
            && self.code.as_deref().is_none_or(|c| c == e.code())
            && self.key.as_deref().is_none_or(|k| e.key().as_deref() == Some(k))
            && self.since_ms.is_none_or(|s| parked.is_some_and(|p| p >= s))
            && self.until_ms.is_none_or(|u| parked.is_some_and(|p| p < u))
    }

    /// The DLQ topics to read, from `all` (every DLQ topic of the deployment). A service with
    /// no DLQ topic among them is an error (a typo must not select nothing in silence).
    pub fn checked_topics<'a>(&self, all: &'a [String]) -> Result<Vec<&'a String>, String> {
        let known: Vec<&str> = all.iter().map(|t| t.strip_suffix(".dlq").unwrap_or(t)).collect();
        if let Some(unknown) = self.services.iter().find(|s| !known.contains(&s.as_str())) {
            return Err(format!("no DLQ topic for service {unknown:?}; the services are {}", known.join(", ")));
        }
        Ok(self.topics(all))
    }

    /// The DLQ topics to read, from `all` (every DLQ topic of the deployment).
    pub fn topics<'a>(&self, all: &'a [String]) -> Vec<&'a String> {
        all.iter()
            .filter(|t| {
                let service = t.strip_suffix(".dlq").unwrap_or(t);
                self.services.is_empty() || self.services.iter().any(|s| s == service)
            })
            .collect()
    }
}

/// The selected letters, at most `limit` of them: the ones parked first. Memory is bounded by
/// the limit (a heap of the oldest so far), not by the DLQ.
pub struct Oldest {
    limit: Option<usize>,
    heap: std::collections::BinaryHeap<Ordered>,
}

/// Ordered by when parked, then where.
struct Ordered(DeadLetterEntry);

impl Ordered {
    fn key(&self) -> (i64, &str, i32, i64) {
        let r = &self.0.0;
        (r.timestamp_ms.unwrap_or(i64::MIN), &r.topic, r.partition, r.offset)
    }
}

impl PartialEq for Ordered {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Ordered {}
impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl Oldest {
    pub fn new(limit: Option<usize>) -> Self {
        Self { limit, heap: std::collections::BinaryHeap::new() }
    }

    pub fn push(&mut self, entry: DeadLetterEntry) {
        if self.limit == Some(0) {
            return;
        }
        self.heap.push(Ordered(entry));
        if self.limit.is_some_and(|l| self.heap.len() > l) {
            self.heap.pop();
        }
    }

    /// In DLQ order (topic, partition, offset): a replay keeps each key's order.
    pub fn into_sorted(self) -> Vec<DeadLetterEntry> {
        let mut out: Vec<DeadLetterEntry> = self.heap.into_iter().map(|o| o.0).collect();
        out.sort_by(|a, b| (&a.0.topic, a.0.partition, a.0.offset).cmp(&(&b.0.topic, b.0.partition, b.0.offset)));
        out
    }
}

/// Parses an instant: `2026-11-30` (UTC midnight), `2026-11-30T08:15[:30]Z`, Unix
/// milliseconds, or a duration before `now_ms` such as `90m`, `2h`, `3d`.
pub fn parse_instant(text: &str, now_ms: i64) -> Result<i64, String> {
    let t = text.trim();
    let bad = || format!("invalid time {text:?}: use 2026-11-30, 2026-11-30T08:15Z, epoch ms, or 2h / 30m / 3d ago");
    if let Some(n) = t.strip_suffix('d').and_then(|n| n.parse::<i64>().ok()) {
        return Ok(now_ms - n * 86_400_000);
    }
    if let Some(n) = t.strip_suffix('h').and_then(|n| n.parse::<i64>().ok()) {
        return Ok(now_ms - n * 3_600_000);
    }
    if let Some(n) = t.strip_suffix('m').and_then(|n| n.parse::<i64>().ok()) {
        return Ok(now_ms - n * 60_000);
    }
    if t.len() > 10 && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| bad());
    }
    let (date, time) = t.split_once('T').unwrap_or((t, ""));
    let day = parse_date(date).ok_or_else(bad)?;
    let mut ms = day * 86_400_000;
    if !time.is_empty() {
        let time = time.strip_suffix('Z').ok_or_else(bad)?;
        let parts: Vec<i64> = time.split(':').map(|p| p.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
        let (h, m, s) = match parts[..] {
            [h, m] => (h, m, 0),
            [h, m, s] => (h, m, s),
            _ => return Err(bad()),
        };
        if h > 23 || m > 59 || s > 59 {
            return Err(bad());
        }
        ms += ((h * 60 + m) * 60 + s) * 1000;
    }
    Ok(ms)
}

/// Days since 1970-01-01 of `YYYY-MM-DD` (Howard Hinnant's days-from-civil; the inverse of
/// [`elo_events::time::civil_date`]).
pub fn parse_date(text: &str) -> Option<i64> {
    let mut it = text.split('-');
    let (y, m, d): (i64, i64, i64) = (it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?);
    if it.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) || text.len() != 10 {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // Reject dates that do not exist (2026-02-30).
    (elo_events::time::civil_date(days) == text).then_some(days)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn letter(topic: &str, offset: i64, headers: &[(&str, &str)], ts: i64) -> DeadLetterEntry {
        DeadLetterEntry(Record {
            topic: topic.into(),
            partition: 1,
            offset,
            key: Some(b"c:42".to_vec()),
            payload: Some(b"\0\0\0\0\x01body".to_vec()),
            headers: headers.iter().map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())).collect(),
            timestamp_ms: Some(ts),
        })
    }

    fn sf_letter() -> DeadLetterEntry {
        letter(
            "salesforce-sink.dlq",
            7,
            &[
                ("traceparent", "00-aa-bb-01"),
                (dlq::ERROR_CLASS, "permanent"),
                (dlq::ERROR_CODE, "DUPLICATES_DETECTED"),
                (dlq::ORIGIN_TOPIC, "commerce.events"),
                (dlq::ORIGIN_PARTITION, "3"),
                (dlq::ORIGIN_OFFSET, "120"),
                (dlq::GROUP, "elo-salesforce-sink"),
                (dlq::REPLAY_OF, "salesforce-sink.dlq/1/2"),
            ],
            1_000,
        )
    }

    #[test]
    fn entries_expose_their_dlq_headers() {
        let e = sf_letter();
        assert_eq!(e.coordinate(), "salesforce-sink.dlq/1/7");
        assert_eq!(e.service(), "salesforce-sink");
        assert_eq!((e.class(), e.code()), ("permanent", "DUPLICATES_DETECTED"));
        assert_eq!(e.origin(), Some(("commerce.events".into(), 3, 120)));
        assert_eq!(e.group(), Some("elo-salesforce-sink"));
        assert_eq!(e.key().as_deref(), Some("c:42"));
        assert_eq!(e.not_replayable(), None);
        let kept: Vec<_> = e.original_headers().into_iter().map(|(k, _)| k).collect();
        assert_eq!(kept, ["traceparent"], "dlq and earlier replay headers are dropped, the trace is kept");
    }

    #[test]
    fn a_letter_from_outside_kafka_is_not_replayable() {
        let e = letter("order-ingest.dlq", 0, &[(dlq::ORIGIN_SOURCE, "magento-poll/orders")], 5);
        assert!(e.not_replayable().unwrap().contains("no origin topic"));
    }

    #[test]
    fn filters_combine_every_criterion() {
        let e = sf_letter();
        assert!(Filter::default().matches(&e));
        let by = |f: Filter| f.matches(&e);
        assert!(by(Filter { services: vec!["salesforce-sink".into()], ..Filter::default() }));
        assert!(!by(Filter { services: vec!["rdstation-sink".into()], ..Filter::default() }));
        assert!(by(Filter {
            class: Some("PERMANENT".into()),
            code: Some("DUPLICATES_DETECTED".into()),
            ..Filter::default()
        }));
        assert!(!by(Filter { code: Some("INVALID_FIELD".into()), ..Filter::default() }));
        assert!(by(Filter { key: Some("c:42".into()), ..Filter::default() }));
        assert!(!by(Filter { key: Some("c:4".into()), ..Filter::default() }));
        assert!(by(Filter { since_ms: Some(1_000), until_ms: Some(1_001), ..Filter::default() }));
        assert!(!by(Filter { since_ms: Some(1_001), ..Filter::default() }));
        assert!(!by(Filter { until_ms: Some(1_000), ..Filter::default() }));
    }

    #[test]
    fn filter_selects_topics_by_service() {
        let all: Vec<String> = DEFAULT_DLQ_TOPICS.iter().map(|t| (*t).to_owned()).collect();
        assert_eq!(Filter::default().topics(&all).len(), 4);
        let f = Filter { services: vec!["rdstation-sink".into()], ..Filter::default() };
        assert_eq!(f.topics(&all), [&"rdstation-sink.dlq".to_owned()]);
        assert_eq!(f.checked_topics(&all).unwrap(), [&"rdstation-sink.dlq".to_owned()]);
        let typo = Filter { services: vec!["rdstation".into()], ..Filter::default() };
        let error = typo.checked_topics(&all).unwrap_err();
        assert!(error.contains("\"rdstation\"") && error.contains("rdstation-sink"), "{error}");
    }

    #[test]
    fn a_limit_keeps_the_oldest_letters_in_dlq_order() {
        let mut oldest = Oldest::new(Some(2));
        for (offset, ts) in [(0, 50), (1, 10), (2, 40), (3, 20)] {
            oldest.push(letter("a.dlq", offset, &[], ts));
        }
        let kept: Vec<i64> = oldest.into_sorted().iter().map(|e| e.0.offset).collect();
        assert_eq!(kept, [1, 3], "the two parked first, in offset order");
        let mut all = Oldest::new(None);
        all.push(letter("b.dlq", 5, &[], 1));
        all.push(letter("a.dlq", 9, &[], 2));
        let kept: Vec<String> = all.into_sorted().iter().map(DeadLetterEntry::coordinate).collect();
        assert_eq!(kept, ["a.dlq/1/9", "b.dlq/1/5"]);
    }

    #[test]
    fn instants_parse_in_every_documented_form() {
        let now = 1_796_083_200_000; // 2026-12-01T00:00Z
        assert_eq!(parse_instant("2026-12-01", now), Ok(now));
        assert_eq!(parse_instant("2026-11-30T23:30Z", now), Ok(now - 1_800_000));
        assert_eq!(parse_instant("2026-11-30T23:59:59Z", now), Ok(now - 1_000));
        assert_eq!(parse_instant("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_instant("30m", now), Ok(now - 1_800_000));
        assert_eq!(parse_instant("1d", now), Ok(now - 86_400_000));
        assert_eq!(parse_instant("1796083200000", now), Ok(now));
        for bad in ["2026-02-30", "2026-13-01", "yesterday", "2026-11-30T25:00Z", "2026-11-30T10:00"] {
            assert!(parse_instant(bad, now).is_err(), "{bad}");
        }
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2000-02-29"), Some(11_016));
    }
}
