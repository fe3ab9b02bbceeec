//! librdkafka's own statistics as Prometheus gauges: where a produced record waits before the
//! broker acknowledges it, per broker. `elo_kafka_produce_latency_seconds` says how long a send
//! took; these say where: in the producer's queue until a request takes it (`int_latency`:
//! records wait here for the requests ahead of them, one partition per request, one request in
//! flight when idempotence is off), in the request queue until written to the socket
//! (`outbuf_latency`), or at the broker (`rtt`, every request: Produce and Metadata alike).
//!
//! librdkafka emits the statistics as JSON every `statistics.interval.ms` (the producer's
//! `--kafka-statistics-interval-ms`) on the thread that serves delivery reports, and its windows
//! restart at each emission, so each gauge is the last window's value; a broker gone from the
//! emission loses its series. `avg` and `max` are exact; `p99` is librdkafka's HDR histogram
//! estimate, which leaves out samples past the histogram's range (at first 100 ms for the queue
//! waits, 500 ms for the round trip; librdkafka widens it for the next window): in a window
//! with such samples, read `max`. The parse builds only these fields and skips over the rest
//! (rdkafka's own `Statistics` type would build every topic's and partition's entry on that
//! thread, delaying delivery reports while it does). No maintained crate exports librdkafka
//! statistics to the `prometheus` crate, hence this module.

use std::collections::{BTreeSet, HashMap};
use std::sync::{LazyLock, Mutex};

use prometheus::{GaugeVec, IntGaugeVec, register_gauge_vec, register_int_gauge_vec};
use serde::Deserialize;

/// Applies one statistics emission of the client labelled `client` to the gauges. A payload
/// that is not librdkafka's statistics is counted as an error and otherwise ignored.
pub(crate) fn record(client: &str, raw: &[u8]) {
    let snapshot: Snapshot = match serde_json::from_slice(raw) {
        Ok(snapshot) => snapshot,
        Err(error) => {
            tracing::debug!(client, error = %error, "unreadable librdkafka statistics");
            crate::metrics::CLIENT_ERRORS.with_label_values(&[client, "statistics_unreadable"]).inc();
            return;
        }
    };
    QUEUED.with_label_values(&[client]).set(snapshot.msg_cnt);
    // Bootstrap and logical handles (the group coordinator) keep `nodeid` -1 and carry no
    // produce traffic; real brokers are bounded by the cluster's size.
    let mut nodes = BTreeSet::new();
    for broker in snapshot.brokers.values().filter(|b| b.nodeid >= 0) {
        let node = broker.nodeid.to_string();
        let windows = [
            (&*QUEUE_WAIT, &broker.int_latency),
            (&*REQUEST_QUEUE_WAIT, &broker.outbuf_latency),
            (&*BROKER_RTT, &broker.rtt),
        ];
        for (gauge, window) in windows {
            let window = window.unwrap_or_default();
            for (stat, micros) in [("avg", window.avg), ("p99", window.p99), ("max", window.max)] {
                gauge.with_label_values(&[client, &node, stat]).set(micros as f64 / 1e6);
            }
        }
        IN_FLIGHT.with_label_values(&[client, &node]).set(broker.waitresp_cnt);
        nodes.insert(node);
    }
    // A broker that left the cluster must not keep showing its last window.
    let mut reported = REPORTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = reported.insert(client.to_owned(), nodes.clone()).unwrap_or_default();
    for gone in before.difference(&nodes) {
        for gauge in [&*QUEUE_WAIT, &*REQUEST_QUEUE_WAIT, &*BROKER_RTT] {
            for stat in ["avg", "p99", "max"] {
                let _ = gauge.remove_label_values(&[client, gone, stat]);
            }
        }
        let _ = IN_FLIGHT.remove_label_values(&[client, gone]);
    }
}

/// The brokers each client's last emission reported.
static REPORTED: LazyLock<Mutex<HashMap<String, BTreeSet<String>>>> = LazyLock::new(Mutex::default);

/// The fields read; everything else in the payload is skipped.
#[derive(Deserialize)]
struct Snapshot {
    /// Records in the producer's queues (not yet acknowledged or failed).
    #[serde(default)]
    msg_cnt: i64,
    #[serde(default)]
    brokers: HashMap<String, BrokerSnapshot>,
}

#[derive(Deserialize)]
struct BrokerSnapshot {
    nodeid: i32,
    /// Requests sent and awaiting the broker's response.
    #[serde(default)]
    waitresp_cnt: i64,
    int_latency: Option<Window>,
    outbuf_latency: Option<Window>,
    rtt: Option<Window>,
}

/// A rolling window in microseconds (all zero when it saw no sample).
#[derive(Clone, Copy, Default, Deserialize)]
struct Window {
    #[serde(default)]
    avg: i64,
    #[serde(default)]
    p99: i64,
    #[serde(default)]
    max: i64,
}

const LABELS: &[&str] = &["client", "broker", "stat"];

static QUEUE_WAIT: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "elo_kafka_producer_queue_wait_seconds",
        "Time records waited in the producer's queue until a request took them (librdkafka int_latency), over the last statistics window: avg, p99, max.",
        LABELS
    )
    .expect("metric registers once")
});
static REQUEST_QUEUE_WAIT: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "elo_kafka_request_queue_wait_seconds",
        "Time requests waited to be written to the broker's socket (librdkafka outbuf_latency), over the last statistics window: avg, p99, max.",
        LABELS
    )
    .expect("metric registers once")
});
static BROKER_RTT: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "elo_kafka_broker_rtt_seconds",
        "Broker round trip of requests (librdkafka rtt), over the last statistics window: avg, p99, max.",
        LABELS
    )
    .expect("metric registers once")
});
static IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "elo_kafka_requests_in_flight",
        "Requests sent to the broker and awaiting its response, at the last statistics emission.",
        &["client", "broker"]
    )
    .expect("metric registers once")
});
static QUEUED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "elo_kafka_producer_queued_records",
        "Records in the producer's queues, not yet acknowledged or failed, at the last statistics emission.",
        &["client"]
    )
    .expect("metric registers once")
});

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from librdkafka's STATISTICS.md example: a bootstrap handle, one broker, and the
    /// topics section the parse must skip.
    fn emission(rtt_p99_us: i64) -> String {
        serde_json::json!({
            "name": "rdkafka#producer-1", "client_id": "elo", "type": "producer", "ts": 1, "time": 1, "age": 1,
            "replyq": 0, "msg_cnt": 7, "msg_size": 900, "msg_max": 100000, "msg_size_max": 1000000,
            "brokers": {
                "127.0.0.1:9092/bootstrap": {"name": "127.0.0.1:9092/bootstrap", "nodeid": -1, "waitresp_cnt": 0,
                    "rtt": {"min": 0, "max": 0, "avg": 0, "p99": 0, "cnt": 0}},
                "127.0.0.1:9092/1": {
                    "name": "127.0.0.1:9092/1", "nodeid": 1, "nodename": "127.0.0.1:9092", "state": "UP",
                    "outbuf_cnt": 0, "waitresp_cnt": 1, "req": {"Produce": 120, "Metadata": 2},
                    "int_latency": {"min": 10, "max": 24_800, "avg": 2_200, "sum": 1, "cnt": 400, "p50": 900, "p99": 12_700},
                    "outbuf_latency": {"min": 5, "max": 300, "avg": 20, "p99": 150, "cnt": 120},
                    "rtt": {"min": 300, "max": 6_000, "avg": 950, "p99": rtt_p99_us, "cnt": 120},
                    "toppars": {"commerce.events-0": {"topic": "commerce.events", "partition": 0}}
                }
            },
            "topics": {"commerce.events": {"topic": "commerce.events", "partitions": {"0": {"partition": 0, "msgq_cnt": 3}}}}
        })
        .to_string()
    }

    #[test]
    fn an_emission_sets_each_brokers_waits_in_seconds() {
        record("stats-test-a", emission(2_700).as_bytes());
        let get = |gauge: &GaugeVec, stat| gauge.with_label_values(&["stats-test-a", "1", stat]).get();
        assert_eq!(get(&QUEUE_WAIT, "avg"), 0.0022);
        assert_eq!(get(&QUEUE_WAIT, "p99"), 0.0127);
        assert_eq!(get(&QUEUE_WAIT, "max"), 0.0248);
        assert_eq!(get(&REQUEST_QUEUE_WAIT, "p99"), 0.000_15);
        assert_eq!(get(&BROKER_RTT, "avg"), 0.000_95);
        assert_eq!(get(&BROKER_RTT, "p99"), 0.0027);
        assert_eq!(IN_FLIGHT.with_label_values(&["stats-test-a", "1"]).get(), 1);
        assert_eq!(QUEUED.with_label_values(&["stats-test-a"]).get(), 7);
        // The next window replaces the last one's values.
        record("stats-test-a", emission(4_400).as_bytes());
        assert_eq!(get(&BROKER_RTT, "p99"), 0.0044);
    }

    #[test]
    fn the_bootstrap_handle_gets_no_series() {
        record("stats-test-b", emission(1).as_bytes());
        let text = String::from_utf8(
            prometheus::TextEncoder::new().encode_to_string(&prometheus::gather()).unwrap().into_bytes(),
        )
        .unwrap();
        let brokers: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("elo_kafka_broker_rtt_seconds{") && l.contains("stats-test-b"))
            .collect();
        assert_eq!(brokers.len(), 3, "avg, p99 and max of broker 1 only: {brokers:?}");
        assert!(brokers.iter().all(|l| l.contains("broker=\"1\"")), "{brokers:?}");
    }

    #[test]
    fn a_broker_gone_from_the_emission_loses_its_series() {
        let mut two: serde_json::Value = serde_json::from_str(&emission(2_000)).unwrap();
        let mut second = two["brokers"]["127.0.0.1:9092/1"].clone();
        second["nodeid"] = 2.into();
        two["brokers"]["127.0.0.1:9093/2"] = second;
        record("stats-test-d", two.to_string().as_bytes());
        let series = |broker: &str| {
            prometheus::gather()
                .iter()
                .filter(|f| f.name().starts_with("elo_kafka_"))
                .flat_map(|f| f.get_metric().to_vec())
                .filter(|m| {
                    let label = |k: &str| m.get_label().iter().find(|l| l.name() == k).map(|l| l.value().to_owned());
                    label("client").as_deref() == Some("stats-test-d") && label("broker").as_deref() == Some(broker)
                })
                .count()
        };
        // Three windows of three stats, and requests in flight.
        assert_eq!((series("1"), series("2")), (10, 10));
        record("stats-test-d", emission(2_000).as_bytes());
        assert_eq!((series("1"), series("2")), (10, 0), "broker 2 left: its series go");
    }

    #[test]
    fn an_unreadable_emission_is_counted_and_changes_nothing() {
        record("stats-test-c", emission(3_000).as_bytes());
        record("stats-test-c", b"{\"brokers\": 12}");
        let errors = crate::metrics::CLIENT_ERRORS.with_label_values(&["stats-test-c", "statistics_unreadable"]).get();
        assert_eq!(errors, 1);
        assert_eq!(BROKER_RTT.with_label_values(&["stats-test-c", "1", "p99"]).get(), 0.003);
    }
}
