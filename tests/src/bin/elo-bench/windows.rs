//! Where order-ingest's sends waited during a run, window by window: its producer's librdkafka
//! statistics gauges (`elo_kafka_producer_queue_wait_seconds`, `elo_kafka_broker_rtt_seconds`),
//! emitted every [`INTERVAL_MS`] and read from its `/metrics` by a thread of the bench while the
//! load generator runs. A queue wait far over the round trip means records waited for the
//! requests ahead of them; a long round trip, for the broker.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The statistics interval the bench gives order-ingest (`ELO_KAFKA_STATISTICS_INTERVAL_MS`).
pub(crate) const INTERVAL_MS: u64 = 1_000;

/// One emission's worst broker p99, in seconds: (producer queue wait, broker round trip).
pub(crate) fn p99s(page: &str) -> Option<(f64, f64)> {
    let worst = |name: &str| {
        let prefix = format!("{name}{{");
        page.lines()
            .filter(|l| l.starts_with(&prefix) && l.contains("client=\"kafka_producer\"") && l.contains("stat=\"p99\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .reduce(f64::max)
    };
    Some((worst("elo_kafka_producer_queue_wait_seconds")?, worst("elo_kafka_broker_rtt_seconds")?))
}

/// Every statistics line of the producer in a page: what identifies one emission (its exact
/// maxima in microseconds differ from one window to the next while records flow).
fn fingerprint(page: &str) -> String {
    const FAMILIES: [&str; 5] = [
        "elo_kafka_producer_queue_wait_seconds{",
        "elo_kafka_request_queue_wait_seconds{",
        "elo_kafka_broker_rtt_seconds{",
        "elo_kafka_requests_in_flight{",
        "elo_kafka_producer_queued_records{",
    ];
    page.lines()
        .filter(|l| FAMILIES.iter().any(|f| l.starts_with(f)) && l.contains("client=\"kafka_producer\""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A window first seen at `seen`, emitted after `previous` (the read before): it covers one
/// interval up to its emission.
struct Window {
    previous: Instant,
    seen: Instant,
    p99s: (f64, f64),
}

/// Reads the windows from `admin` (host:port) until [`Sampler::finish`]. A thread of its own,
/// not a task: the bench blocks a runtime worker while the load generator runs, and a task
/// spawned from it could wait behind that worker; hence also a plain HTTP/1.0 read rather than
/// the bench's async `reqwest` (its blocking client is not built).
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Window>>,
    started: Instant,
}

impl Sampler {
    pub(crate) fn start(admin: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let (mut windows, mut last, mut previous) = (Vec::new(), String::new(), started);
                // Twice per interval: every window is seen, each kept once.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(INTERVAL_MS / 2));
                    let Ok(page) = fetch(&admin) else { continue };
                    let seen = Instant::now();
                    let print = fingerprint(&page);
                    if print != last
                        && let Some(p99s) = p99s(&page)
                    {
                        windows.push(Window { previous, seen, p99s });
                        last = print;
                    }
                    previous = seen;
                }
                windows
            }
        });
        Self { stop, thread, started }
    }

    /// A line on the windows that lie wholly inside the measured part of the run: after
    /// `warmup`, before `warmup + measured`, counted from the sampler's start (the load
    /// generator is started right after it, so the cut errs towards leaving windows out).
    pub(crate) fn finish(self, warmup: Duration, measured: Duration) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let interval = Duration::from_millis(INTERVAL_MS);
        let (from, until) = (self.started + warmup, self.started + warmup + measured);
        let windows: Vec<(f64, f64)> = (self.thread.join().expect("the sampler does not panic").into_iter())
            .filter(|w| w.previous.checked_sub(interval).is_some_and(|start| start >= from) && w.seen <= until)
            .map(|w| w.p99s)
            .collect();
        if windows.is_empty() {
            return "  librdkafka's windows over the half-rate run: none read".to_owned();
        }
        let summary = |values: Vec<f64>| {
            let mut values = values;
            values.sort_by(f64::total_cmp);
            (1e3 * values[values.len() / 2], 1e3 * values[values.len() - 1])
        };
        let (queue, queue_worst) = summary(windows.iter().map(|w| w.0).collect());
        let (rtt, rtt_worst) = summary(windows.iter().map(|w| w.1).collect());
        format!(
            "  librdkafka's {} s windows inside the half-rate run's measured {} s ({} read): p99 of the wait in the producer's queue median {queue:.1} ms (worst window {queue_worst:.1}), of the broker's round trip median {rtt:.1} ms (worst {rtt_worst:.1})",
            INTERVAL_MS / 1000,
            measured.as_secs(),
            windows.len()
        )
    }
}

/// `GET /metrics` over HTTP/1.0 (the answer ends with the connection).
fn fetch(admin: &str) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(admin)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n")?;
    let mut page = String::new();
    stream.read_to_string(&mut page)?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_brokers_p99_of_the_producer_is_read() {
        let page = r#"# TYPE elo_kafka_broker_rtt_seconds gauge
elo_kafka_broker_rtt_seconds{broker="1",client="kafka_producer",stat="avg"} 0.001
elo_kafka_broker_rtt_seconds{broker="1",client="kafka_producer",stat="p99"} 0.004
elo_kafka_broker_rtt_seconds{broker="2",client="kafka_producer",stat="p99"} 0.006
elo_kafka_broker_rtt_seconds{broker="1",client="kafka_topics",stat="p99"} 0.5
elo_kafka_producer_queue_wait_seconds{broker="1",client="kafka_producer",stat="p99"} 0.0127
elo_kafka_producer_queue_wait_seconds{broker="1",client="kafka_producer",stat="max"} 0.03
"#;
        assert_eq!(p99s(page), Some((0.0127, 0.006)));
        assert_eq!(p99s("elo_kafka_broker_rtt_seconds{client=\"kafka_producer\",stat=\"p99\"} 1"), None);
    }

    #[test]
    fn an_emission_is_told_apart_by_the_producers_statistics_alone() {
        let page = |max: &str, webhooks: u32| {
            format!(
                "elo_kafka_broker_rtt_seconds{{broker=\"1\",client=\"kafka_producer\",stat=\"max\"}} {max}\n\
                 elo_kafka_broker_rtt_seconds{{broker=\"1\",client=\"kafka_topics\",stat=\"max\"}} 0.2\n\
                 order_ingest_notifications_total{{outcome=\"published\"}} {webhooks}\n"
            )
        };
        // Other metrics move between reads of one emission; a new emission changes its own lines.
        assert_eq!(fingerprint(&page("0.004213", 10)), fingerprint(&page("0.004213", 99)));
        assert_ne!(fingerprint(&page("0.004213", 10)), fingerprint(&page("0.004871", 10)));
    }
}
