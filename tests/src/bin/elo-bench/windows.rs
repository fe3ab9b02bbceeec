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

/// Reads the windows from `admin` (host:port) until [`Sampler::finish`].
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, (f64, f64))>>,
    started: Instant,
}

impl Sampler {
    pub(crate) fn start(admin: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut windows: Vec<(Instant, (f64, f64))> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // Twice per interval, keeping a window once: no window is missed.
                    std::thread::sleep(Duration::from_millis(INTERVAL_MS / 2));
                    let Some(window) = fetch(&admin).ok().as_deref().and_then(p99s) else { continue };
                    if windows.last().is_none_or(|(_, last)| *last != window) {
                        windows.push((Instant::now(), window));
                    }
                }
                windows
            }
        });
        Self { stop, thread, started: Instant::now() }
    }

    /// The windows read after `warmup`, and a line saying what they show (`None`: no window).
    pub(crate) fn finish(self, warmup: Duration) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let windows: Vec<(f64, f64)> = (self.thread.join().unwrap_or_default().into_iter())
            .filter(|(at, _)| at.duration_since(self.started) > warmup)
            .map(|(_, w)| w)
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
            "  librdkafka's {} s windows over the half-rate run ({} after the warm-up): p99 of the wait in the producer's queue median {queue:.1} ms (worst window {queue_worst:.1}), of the broker's round trip median {rtt:.1} ms (worst {rtt_worst:.1})",
            INTERVAL_MS / 1000,
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
}
