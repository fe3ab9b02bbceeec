//! Telemetry compliance of the consumer runtime: it emits its required metrics, and the W3C
//! trace context travels from the producing span through Kafka headers to the handler.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use elo_integration_tests::*;
use elo_kafka::{ConsumerSettings, Handler, HandlerError, KafkaArgs, Producer, Record};
use opentelemetry::trace::TraceContextExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[derive(Default)]
struct Recorder {
    traces: Mutex<Vec<(i64, String)>>,
}

impl Handler for Recorder {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        let trace_id = tracing::Span::current().context().span().span_context().trace_id().to_string();
        batch
            .iter()
            .map(|r| {
                if r.payload.as_deref() == Some(b"bad") {
                    return Err(HandlerError::permanent("test_bad", "bad record"));
                }
                self.traces.lock().unwrap().push((r.offset, trace_id.clone()));
                Ok(())
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_emits_required_metrics_and_continues_the_producers_trace() {
    let args = elo_telemetry::TelemetryArgs {
        log_filter: "warn".into(),
        trace_filter: "info".into(),
        log_format: elo_telemetry::LogFormat::Text,
        otlp_endpoint: None,
    };
    let _guard = elo_telemetry::init("telemetry-test", &args).unwrap();
    let (topic, dlq, group) = (unique("telemetry"), unique("telemetry-dlq"), unique("telemetry-group"));
    create_topics(&brokers(), &[(&topic, 1), (&dlq, 1)]).await;
    let kafka = KafkaArgs::local(brokers());
    let health = elo_telemetry::Health::new();
    let producer = Producer::new(&kafka, health.clone()).unwrap();
    assert!(!health.is_ready(), "not ready before the producer connected");
    producer.wait_connected(Duration::from_secs(30)).await.unwrap();

    let span = tracing::info_span!("webhook");
    let producer_trace = span.context().span().span_context().trace_id().to_string();
    assert_ne!(producer_trace, "00000000000000000000000000000000", "spans must carry OpenTelemetry ids");
    async {
        producer.send(&topic, b"k", b"good", Some("ORDER_PLACED")).await.unwrap();
        producer.send(&topic, b"k", b"bad", Some("ORDER_PLACED")).await.unwrap();
    }
    .instrument(span)
    .await;

    let stored = read_all(&brokers(), &topic, 1);
    let header = |name: &str| {
        use rdkafka::Message;
        use rdkafka::message::Headers;
        stored[0]
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(h.value.unwrap()).into_owned())
    };
    let traceparent = header("traceparent").expect("traceparent header");
    assert!(traceparent.starts_with(&format!("00-{producer_trace}-")), "{traceparent}");
    assert_eq!(header("elo-event-type").as_deref(), Some("ORDER_PLACED"));

    let recorder = Arc::new(Recorder::default());
    let shutdown = CancellationToken::new();
    let mut settings = ConsumerSettings::new(group.clone(), vec![topic.clone()], dlq.clone());
    settings.commit_interval = Duration::from_millis(200);
    let run = tokio::spawn({
        let (kafka, recorder, producer, health, shutdown) =
            (kafka.clone(), recorder.clone(), producer.clone(), health.clone(), shutdown.clone());
        async move { elo_kafka::run_consumer(&kafka, settings, recorder, producer, health, shutdown).await }
    });
    assert!(wait_until(Duration::from_secs(60), || committed(&brokers(), &group, &topic, 1).get(&0) == Some(&2)).await);
    assert!(health.is_ready());
    // Commits made while running show in the metric (not only the final one at shutdown).
    let committed_gauge = || {
        prometheus::gather()
            .iter()
            .filter(|f| f.name() == "elo_consumer_committed_offset")
            .flat_map(|f| f.get_metric().to_vec())
            .filter(|m| m.get_label().iter().any(|l| l.value() == topic))
            .map(|m| m.get_gauge().get_value())
            .sum::<f64>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || committed_gauge() == 2.0).await,
        "elo_consumer_committed_offset did not move before shutdown ({})",
        committed_gauge()
    );
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert!(!health.is_ready(), "a stopped consumer is not ready");

    let traces = recorder.traces.lock().unwrap().clone();
    assert_eq!(traces, vec![(0, producer_trace.clone())], "the handler runs inside the producer's trace");

    let text = {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&prometheus::gather(), &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    };
    for required in [
        format!("elo_consumer_records_total{{outcome=\"applied\",topic=\"{topic}\"}} 1"),
        format!("elo_consumer_records_total{{outcome=\"dead_lettered\",topic=\"{topic}\"}} 1"),
        format!(
            "elo_consumer_handler_errors_total{{error_code=\"test_bad\",error_type=\"permanent\",stage=\"handle\",topic=\"{topic}\"}} 1"
        ),
        format!("elo_consumer_committed_offset{{partition=\"0\",topic=\"{topic}\"}} 2"),
        format!("elo_consumer_batch_duration_seconds_count{{topic=\"{topic}\"}}"),
        format!("elo_kafka_produced_records_total{{topic=\"{topic}\"}} 2"),
        format!("elo_kafka_produced_records_total{{topic=\"{dlq}\"}} 1"),
        format!("elo_kafka_produce_latency_seconds_bucket{{topic=\"{topic}\""),
        "elo_consumer_rebalances_total{kind=\"assign\"}".to_owned(),
        "elo_build_info{service=\"telemetry-test\"".to_owned(),
    ] {
        assert!(text.contains(&required), "missing {required} in:\n{text}");
    }
}

/// The producer turns librdkafka's statistics into gauges of where a send waits: the real
/// client's emission (not a fixture) must parse, and while records go out the broker's round
/// trip must show a positive average with a p99 and a max at or above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_reports_where_its_sends_waited() {
    let topic = unique("stats");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let mut kafka = KafkaArgs::local(brokers());
    kafka.statistics_interval_ms = 200;
    let producer = Producer::new(&kafka, elo_telemetry::Health::new()).unwrap();
    producer.wait_connected(Duration::from_secs(30)).await.unwrap();
    // The producer's series of one gauge family: (avg, p99, max), read in one gather.
    let windows = |name: &str| {
        let families = prometheus::gather();
        let stat = |stat: &str| {
            families
                .iter()
                .filter(|f| f.name() == name)
                .flat_map(|f| f.get_metric().to_vec())
                .filter(|m| {
                    let label = |k: &str| m.get_label().iter().find(|l| l.name() == k).map(|l| l.value().to_owned());
                    label("client").as_deref() == Some("kafka_producer") && label("stat").as_deref() == Some(stat)
                })
                .map(|m| m.get_gauge().get_value())
                .fold(0.0, f64::max)
        };
        (stat("avg"), stat("p99"), stat("max"))
    };
    // Windows restart at each emission: keep sending until one window held produce requests.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (avg, p99, max) = loop {
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let sends = keys.iter().map(|k| producer.send(&topic, k.as_bytes(), b"v", None));
        for delivery in futures::future::join_all(sends).await {
            delivery.unwrap();
        }
        // Queue waits are counted for produced records only (round trips for any request).
        let (rtt, queued) = (windows("elo_kafka_broker_rtt_seconds"), windows("elo_kafka_producer_queue_wait_seconds"));
        if rtt.0 > 0.0 && queued.0 > 0.0 {
            assert!(queued.0 < 0.5, "queue wait avg {} s: not in seconds?", queued.0);
            break rtt;
        }
        assert!(std::time::Instant::now() < deadline, "no broker round trip reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // p99 is an HDR histogram's estimate: it may round past the exact max.
    assert!(avg < 0.5 && p99 >= avg && max >= avg, "rtt avg {avg}, p99 {p99}, max {max}");
    let families: Vec<String> = prometheus::gather().iter().map(|f| f.name().to_owned()).collect();
    for family in [
        "elo_kafka_producer_queue_wait_seconds",
        "elo_kafka_request_queue_wait_seconds",
        "elo_kafka_requests_in_flight",
        "elo_kafka_producer_queued_records",
    ] {
        assert!(families.iter().any(|f| f == family), "{family} missing from {families:?}");
    }
}
