//! A consumer built on the runtime, for the broker tests: it "applies" each record by
//! appending `partition offset key nanos` to a file (fsynced per batch), parks payloads that start
//! with `poison` in the DLQ as permanent errors, panics on payloads that start with `panic`
//! (a handler bug), and can be slowed down to stay mid-stream.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use elo_kafka::{ConsumerSettings, Handler, HandlerError, KafkaArgs, Producer, Record};

/// Test consumer for the Kafka runtime.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[arg(long)]
    group: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    dlq: String,
    /// File the applied records are appended to.
    #[arg(long)]
    output: PathBuf,
    /// Sleep per batch, to keep the consumer mid-stream.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    #[arg(long, default_value_t = 10)]
    max_batch: usize,
    /// Handler calls at once across partitions.
    #[arg(long, default_value_t = 8)]
    max_in_flight: usize,
    #[arg(long, default_value = "127.0.0.1:0")]
    admin_listen: std::net::SocketAddr,
}

struct FileSink {
    file: Mutex<std::fs::File>,
    delay: Duration,
}

impl Handler for FileSink {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut lines = String::new();
        // Wall-clock time of the batch, so outputs of several processes can be merged in order.
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let results: Vec<_> = batch
            .iter()
            .map(|r| {
                if r.payload.as_deref().is_some_and(|p| p.starts_with(b"panic")) {
                    panic!("test handler bug at offset {}", r.offset);
                }
                if r.payload.as_deref().is_some_and(|p| p.starts_with(b"poison")) {
                    return Err(HandlerError::permanent("poison", "payload marked poison"));
                }
                let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
                lines.push_str(&format!("{} {} {} {at}\n", r.partition, r.offset, key));
                Ok(())
            })
            .collect();
        let mut file = self.file.lock().expect("file lock");
        file.write_all(lines.as_bytes()).expect("append output");
        file.sync_data().expect("fsync output");
        results
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = elo_telemetry::TelemetryArgs {
        log_filter: "info".into(),
        trace_filter: "info".into(),
        log_format: elo_telemetry::LogFormat::Text,
        otlp_endpoint: None,
    };
    let _guard = elo_telemetry::init("elo-test-consumer", &telemetry)?;
    let shutdown = elo_telemetry::shutdown::on_signals();
    let health = elo_telemetry::Health::new();
    let (admin_addr, _admin) = elo_telemetry::serve_admin(args.admin_listen, health.clone(), shutdown.clone()).await?;
    println!("admin {admin_addr}");
    let producer = Producer::new(&args.kafka, health.clone())?;
    tokio::spawn({
        let (producer, shutdown) = (producer.clone(), shutdown.clone());
        async move { producer.keep_connected(shutdown).await }
    });
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&args.output)?;
    let handler = Arc::new(FileSink { file: Mutex::new(file), delay: Duration::from_millis(args.delay_ms) });
    let mut settings = ConsumerSettings::new(args.group, vec![args.topic], args.dlq);
    settings.max_batch = args.max_batch;
    settings.max_in_flight = args.max_in_flight;
    settings.commit_interval = Duration::from_millis(500);
    settings.drain_timeout = Duration::from_secs(10);
    let result = elo_kafka::run_consumer(&args.kafka, settings, handler, producer.clone(), health, shutdown).await;
    producer.flush(Duration::from_secs(5))?;
    result?;
    Ok(())
}
