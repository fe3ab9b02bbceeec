//! Shared harness for Elo's integration tests.
//!
//! The tests run against the real Tansu broker and the local registry that
//! `scripts/stack.sh` starts for `make test`; their addresses come from `ELO_TEST_BROKERS` and
//! `ELO_TEST_REGISTRY`. Tests that need a broker of their own (authentication, TLS) start
//! one with [`TansuProcess`]. Every test uses random topic and group names, so tests can run
//! in parallel against one broker.

pub mod drift;
pub mod proxy;
pub mod runtime_suite;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// Broker address of the shared test broker.
pub fn brokers() -> String {
    if let Some(private) = PRIVATE_BROKER.get() {
        return private.clone();
    }
    std::env::var("ELO_TEST_BROKERS")
        .expect("ELO_TEST_BROKERS is not set: run the broker tests with `make test` (scripts/stack.sh starts Tansu)")
}

/// URL of the shared test registry.
pub fn registry_url() -> String {
    std::env::var("ELO_TEST_REGISTRY").expect("ELO_TEST_REGISTRY is not set: run the broker tests with `make test`")
}

/// A name unique to this run.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}-{}-{}", std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Creates topics on the shared broker.
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let args = elo_kafka::KafkaArgs::local(brokers);
    let specs: Vec<_> = topics.iter().map(|(t, p)| elo_kafka::TopicSpec::new(*t, *p)).collect();
    elo_kafka::ensure_topics(&args, &specs, Duration::from_secs(10), &elo_telemetry::Health::new())
        .await
        .expect("create topics");
}

/// A plain producer for test input.
pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer")
}

/// Produces `(key, payload)` pairs and waits for every acknowledgement; returns where each went.
pub async fn produce(producer: &FutureProducer, topic: &str, records: &[(String, Vec<u8>)]) -> Vec<(i32, i64)> {
    let futures: Vec<_> = records
        .iter()
        .map(|(k, v)| {
            producer.send(FutureRecord::to(topic).key(k.as_bytes()).payload(v.as_slice()), Duration::from_secs(10))
        })
        .collect();
    let mut out = Vec::new();
    for f in futures {
        let d = f.await.map_err(|(e, _)| e).expect("delivery");
        out.push((d.partition, d.offset));
    }
    out
}

/// Reads a whole topic (every partition from the beginning up to its high watermark).
///
/// Tansu 0.6 under heavy load sometimes stops answering one client's fetches (seen reading a
/// topic of 8,000 outcomes: nothing in 60 s). A reader that makes no progress for 20 s is
/// replaced by a fresh one resuming where it stopped; the whole read may take 3 minutes.
pub fn read_all(brokers: &str, topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    let reader = || -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader")
    };
    let mut consumer = reader();
    let mut next = HashMap::new();
    let mut highs = HashMap::new();
    let mut remaining = 0i64;
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks");
        remaining += high - low;
        highs.insert(p, high);
        next.insert(p, low);
    }
    let assign = |consumer: &BaseConsumer, next: &HashMap<i32, i64>| {
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in next {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*offset)).unwrap();
        }
        consumer.assign(&tpl).expect("assign");
    };
    assign(&consumer, &next);
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut progress = Instant::now();
    let mut readers = 1;
    while remaining > 0 && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("read");
            progress = Instant::now();
            if m.offset() < highs[&m.partition()] && m.offset() >= next[&m.partition()] {
                remaining -= 1;
                next.insert(m.partition(), m.offset() + 1);
                out.push(m.detach());
            }
        } else if progress.elapsed() > Duration::from_secs(20) {
            consumer = reader();
            assign(&consumer, &next);
            progress = Instant::now();
            readers += 1;
        }
    }
    assert_eq!(remaining, 0, "could not read all of {topic} ({readers} readers)");
    out
}

/// Offsets committed by `group` for each partition of `topic` (absent = none committed).
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("offset reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A child process killed when dropped, so a failing test leaves nothing behind.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> Self {
        let child = command.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { child, name: name.to_owned() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (`TERM`, `KILL`) through `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Waits for exit up to `timeout`; returns the exit status if it exited.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ChildGuard {
    /// SIGTERM first, so scripts can stop what they started (SIGKILL cannot be trapped and
    /// would orphan their children), then SIGKILL after five seconds.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).stderr(Stdio::null()).status();
        if self.wait_timeout(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Lines of an output file written by `elo-test-consumer`, as (partition, offset, key).
pub fn applied(path: &Path) -> Vec<(i32, i64, String)> {
    applied_at(path).into_iter().map(|(p, o, k, _)| (p, o, k)).collect()
}

/// Lines of an output file written by `elo-test-consumer`, with when each was applied (ns).
pub fn applied_at(path: &Path) -> Vec<(i32, i64, String, u128)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            Some((
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
                parts.next()?.to_owned(),
                parts.next().and_then(|t| t.parse().ok()).unwrap_or(0),
            ))
        })
        .collect()
}

/// Where the Tansu binary is: `ELO_TANSU_BIN`, else the tools folder `make` installs into.
pub fn tansu_bin() -> PathBuf {
    if let Ok(path) = std::env::var("ELO_TANSU_BIN") {
        return PathBuf::from(path);
    }
    let tools = std::env::var("ELO_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/elo/tools"));
    tools.join("tansu/bin/tansu")
}

/// Set by [`use_private_broker`]: the broker of this test process.
static PRIVATE_BROKER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Starts a Tansu of this test process's own (nextest runs each test in a process of its own)
/// and makes [`brokers`] return it. For the heavy end-to-end runs: on the shared broker, after
/// twenty minutes of other tests, Tansu 0.6 left their group heartbeats and fetches unanswered
/// for seconds at a time (sessions lost every 6 s, a reader getting nothing in 60 s), which
/// failed runs that pass on a broker of their own. Keep the guard for the whole test.
pub fn use_private_broker() -> (TansuProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("broker dir");
    let port = free_port();
    let tansu = TansuProcess::start(dir.path(), port, &format!("tcp://127.0.0.1:{port}"), false);
    PRIVATE_BROKER.set(format!("127.0.0.1:{port}")).expect("one private broker per test process");
    (tansu, dir)
}

/// Where [`free_port`] picks from: below Linux's ephemeral range (32768-60999), so no outgoing
/// connection can be given the port between the pick and the child's bind, and clear of the
/// fixed ports the stacks and `make run` use (19092/18081, 9092/8081, 8080, 87xx, 91xx).
const TEST_PORTS: std::ops::Range<u16> = 20_000..28_000;

/// Claims are kept per period of this many seconds, and a port claimed in the current or the
/// previous period is not handed out again: 10 to 20 minutes.
const CLAIM_PERIOD_SECS: u64 = 600;

/// A free TCP port on loopback for a service a test starts.
///
/// Ports used to come from `bind(0)`: the kernel's ephemeral range, where any test's outgoing
/// connection (Kafka clients open many) or another test's `bind(0)` could take the port before
/// the service bound it ("Address already in use" in clean-clone runs). Now a port is drawn from
/// [`TEST_PORTS`], below that range, and claimed across test processes (see [`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(1)
}

/// `count` consecutive free ports, claimed; the first is returned.
///
/// A claim is a file created with `create_new` (atomic: one process wins) in a directory of the
/// current [`CLAIM_PERIOD_SECS`] period, and a port is skipped while a claim of it exists in
/// this period or the previous one, so nothing is ever taken over or removed while it may be
/// in use; directories of older periods are deleted.
pub fn free_ports(count: u16) -> u16 {
    let root = std::env::temp_dir().join("elo-test-ports");
    let period = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
        / CLAIM_PERIOD_SECS;
    let (current, previous) = (root.join(period.to_string()), root.join(period.saturating_sub(1).to_string()));
    if std::fs::create_dir_all(&current).is_err() {
        eprintln!("free_ports: cannot write claims under {}; ports are not claimed", root.display());
    }
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let old = name.to_str().and_then(|n| n.parse::<u64>().ok()).is_some_and(|p| p + 1 < period);
            if old {
                let path = entry.path();
                let _ = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
            }
        }
    }
    let span = u128::from(TEST_PORTS.end - TEST_PORTS.start - count);
    for _ in 0..2_000 {
        // std's randomly keyed hasher as the random source (no rand crate for this).
        let draw = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), Instant::now());
        let first = TEST_PORTS.start + (u128::from(draw) % span) as u16;
        let ports = first..first + count;
        let claimed_before = ports.clone().any(|port| previous.join(port.to_string()).exists());
        // Only one process creates a claim; the bind proves nothing else listens there.
        let claimed = !claimed_before
            && ports.clone().all(|port| {
                std::fs::OpenOptions::new().write(true).create_new(true).open(current.join(port.to_string())).is_ok()
            });
        if claimed && ports.clone().all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return first;
        }
    }
    panic!("no {count} free consecutive ports in {TEST_PORTS:?}");
}

/// A Tansu broker of a test's own, with sqlite storage in `dir`.
pub struct TansuProcess {
    pub guard: ChildGuard,
    pub port: u16,
}

impl TansuProcess {
    /// Starts Tansu on `port` (advertising `advertised`), optionally with authentication.
    pub fn start(dir: &Path, port: u16, advertised: &str, authentication: bool) -> Self {
        let mut cmd = Command::new(tansu_bin());
        cmd.arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(advertised)
            .arg("--storage-engine")
            .arg("sqlite://tansu.db")
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("tansu-{port}.log"))).unwrap());
        if authentication {
            cmd.arg("--authentication");
        }
        let guard = ChildGuard::spawn("tansu", &mut cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { guard, port }
    }
}

/// A workspace binary built by `cargo build` (debug profile).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug").join(name)
}

/// An order-ingest command on the shared stack with topics of its own (`topic` and
/// `topic.{inventory,outcomes,commands,checkpoints,dlq,erased}`, 3 partitions), reading `magento_url`,
/// logging to `dir/<log>.log`. Polling is off unless the caller sets an interval.
pub fn order_ingest(dir: &Path, topic: &str, magento_url: &str, log: &str) -> Command {
    let mut command = Command::new(binary("order-ingest"));
    command
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("ELO_MAGENTO_URL", magento_url)
        .env("ELO_MAGENTO_STORES", "1=default:1,2=br:1")
        .env("ELO_ORDER_INGEST_POLL_INTERVAL", "0s")
        // The simulator's orders start on 2026-11-01: poll and check them all.
        .env("ELO_ORDER_INGEST_POLL_START", "2026-01-01")
        .env("ELO_ORDER_INGEST_INVENTORY_MAX_ORDER_AGE", "3650d")
        // Debug builds on a shared machine: tests assert every order is checked, so no budget.
        .env("ELO_ORDER_INGEST_ENRICHMENT_BUDGET", "0s")
        .env("ELO_TOPIC_COMMERCE", topic)
        .env("ELO_TOPIC_INVENTORY", format!("{topic}.inventory"))
        .env("ELO_TOPIC_OUTCOMES", format!("{topic}.outcomes"))
        .env("ELO_TOPIC_COMMANDS", format!("{topic}.commands"))
        .env("ELO_ORDER_INGEST_CHECKPOINT_TOPIC", format!("{topic}.checkpoints"))
        .env("ELO_ORDER_INGEST_DLQ_TOPIC", format!("{topic}.dlq"))
        .env("ELO_ORDER_INGEST_ERASED_TOPIC", format!("{topic}.erased"))
        .env("ELO_ORDER_INGEST_COMMANDS_GROUP", format!("{topic}.commands-group"))
        .env("ELO_TOPIC_PARTITIONS", "3")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{log}.log"))).expect("log file"));
    command
}

/// The Magento simulator served on a free loopback port: its state and base URL.
pub async fn serve_magento(orders: usize) -> (sandbox::magento::MagentoApp, String) {
    let magento = sandbox::magento::MagentoApp::new(
        sandbox::magento::MagentoConfig::default(),
        Default::default(),
        sandbox::faults::Faults::default(),
        sandbox::Counters::default(),
    );
    magento.sim.lock().expect("magento lock").generate(orders);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let router = magento.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (magento, url)
}

/// A process's log, for assertion messages.
pub fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Records in a topic (sum of watermark spans over `partitions`).
pub fn topic_count(topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("consumer");
    (0..partitions)
        .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).map(|(l, h)| h - l).unwrap_or(0))
        .sum()
}

/// The value of `record`'s header `name`, if present.
pub fn header(record: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    let headers = record.headers()?;
    (0..headers.count())
        .map(|i| headers.get(i))
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Asserts `record`'s `elo-event-type` header is `expected` (the record's own type symbol).
pub fn assert_event_type(record: &rdkafka::message::OwnedMessage, expected: &str) {
    use rdkafka::Message;
    assert_eq!(
        header(record, elo_kafka::headers::EVENT_TYPE).as_deref(),
        Some(expected),
        "elo-event-type of the record at {}:{}",
        record.topic(),
        record.offset()
    );
}

/// Asserts `record` carries a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`) with
/// a real (non-zero) trace id, and no empty `tracestate` (W3C: not to be sent; a header costs
/// every broker and consumer).
pub fn assert_traceparent(record: &rdkafka::message::OwnedMessage) {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    let value = header(record, "traceparent")
        .unwrap_or_else(|| panic!("record at offset {} has no traceparent", record.offset()));
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(
        parts.len() == 4 && parts[0] == "00" && hex(parts[1], 32) && hex(parts[2], 16) && hex(parts[3], 2),
        "not a W3C traceparent: {value}"
    );
    assert_ne!(parts[1], "0".repeat(32), "an invalid (zero) trace id");
    let empty_state = record.headers().is_some_and(|h| {
        (0..h.count()).map(|i| h.get(i)).any(|h| {
            h.key == elo_telemetry::propagation::TRACESTATE && h.value.is_none_or(|v| v.trim_ascii().is_empty())
        })
    });
    assert!(!empty_state, "record at offset {} carries an empty tracestate", record.offset());
}

/// The Salesforce simulator served on a free loopback port: its state, base URL and faults.
pub async fn serve_salesforce(
    config: sandbox::salesforce::SalesforceConfig,
) -> (sandbox::salesforce::SalesforceApp, String, sandbox::faults::Faults) {
    // Its own runtime on its own threads: a test that checks results synchronously on its
    // runtime's workers (comparisons, broker reads) must not starve the API it is testing.
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", std_listener.local_addr().expect("bound"));
    let faults = sandbox::faults::Faults::default();
    let app = sandbox::salesforce::SalesforceApp::new(
        sandbox::salesforce::SalesforceConfig { instance_url: url.clone(), ..config },
        faults.clone(),
        sandbox::Counters::default(),
    );
    let router = app.clone().router();
    std::thread::Builder::new()
        .name("salesforce-simulator".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("simulator runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                let _ = axum::serve(listener, router).await;
            });
        })
        .expect("simulator thread");
    (app, url, faults)
}

/// A salesforce-sink command on the shared stack reading `topic` (outcomes on
/// `topic.outcomes`, dead letters on `topic.sf-dlq`, its own group), writing to the
/// Salesforce simulator at `salesforce_url`, logging to `dir/<log>.log`.
pub fn salesforce_sink(dir: &Path, topic: &str, salesforce_url: &str, log: &str) -> Command {
    let mut command = Command::new(binary("salesforce-sink"));
    command
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("ELO_TOPIC_COMMERCE", topic)
        .env("ELO_TOPIC_OUTCOMES", format!("{topic}.outcomes"))
        .env("ELO_DLQ_TOPIC", format!("{topic}.sf-dlq"))
        .env("ELO_SALESFORCE_STATE_TOPIC", format!("{topic}.sf-state"))
        .env("ELO_CONSUMER_GROUP", format!("{topic}.sf-group"))
        .env("ELO_TOPIC_PARTITIONS", "3")
        .env("ELO_SALESFORCE_LOGIN_URL", salesforce_url)
        // A killed member is noticed after the session timeout; keep tests short.
        .env("ELO_RDKAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("ELO_RDKAFKA_HEARTBEAT_INTERVAL_MS", "1000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{log}.log"))).expect("log file"));
    command
}

/// The RD Station simulator served on a free loopback port: its state and base URL.
pub async fn serve_rdstation(config: sandbox::rdstation::RdConfig) -> (sandbox::rdstation::RdStationApp, String) {
    let rd =
        sandbox::rdstation::RdStationApp::new(config, sandbox::faults::Faults::default(), sandbox::Counters::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let router = rd.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (rd, url)
}

/// A refresh token for the RD simulator, obtained as an app would: authorization code, then
/// the code grant.
pub async fn rd_refresh_token(rd: &sandbox::rdstation::RdStationApp, url: &str) -> String {
    let (code, config) = {
        let mut sim = rd.sim.lock().expect("rd lock");
        (sim.issue_code(), sim.config.clone())
    };
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/auth/token"))
        .json(&serde_json::json!({"client_id": config.client_id, "client_secret": config.client_secret, "code": code}))
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token body");
    answer["refresh_token"].as_str().expect("refresh token").to_owned()
}

/// Writes the secret files the RD clients read from `dir` (`rd-client-secret`,
/// `rd-refresh-token`), the token obtained from the simulator as an app would.
pub async fn write_rd_credentials(dir: &Path, rd: &sandbox::rdstation::RdStationApp, url: &str) {
    std::fs::write(dir.join("rd-client-secret"), "elo-rd-secret\n").expect("secret file");
    std::fs::write(dir.join("rd-refresh-token"), rd_refresh_token(rd, url).await).expect("token file");
}

/// Order `n` of customer `c` (registered, e-mail `<label><c>@example.com`), placed at `at`
/// with status `pending` (one PLACED event), entity id `base + n`: a history of many customers
/// for the RD Station sink's bench and back-test.
pub fn rd_order(label: &str, base: i64, n: usize, c: usize, at: i64) -> elo_events::CommerceEvent {
    let mut event = elo_events::sample::order_placed(n as u64);
    let email = format!("{label}{c}@example.com");
    event.customer_key = elo_events::ids::customer_key(Some(c as i64 + 1), &email);
    let order = event.order.as_mut().expect("sample order");
    order.entity_id = base + n as i64;
    order.increment_id = format!("{}{n:08}", label.to_uppercase());
    order.status = "pending".into();
    order.created_at = at;
    event.source_version.entity_id = order.entity_id.to_string();
    event.source_version.updated_at = at;
    event.occurred_at = at;
    event.event_id = elo_events::ids::event_id(&[&format!("rd-{label}"), &n.to_string()]);
    let customer = event.customer.take().expect("sample customer");
    event.customer = Some(elo_events::Customer { customer_id: Some(c as i64 + 1), is_guest: false, email, ..customer });
    event
}

/// An rdstation-sink command on the shared stack reading `topic` (3 partitions) with topics of
/// its own (`topic.{outcomes,rd-dlq,rd-state,rd-sent}`), group `group`, RD at `rd_url` with the
/// given secret files and rules file, logging to `dir/<log>.log` (appended, so restarts keep
/// one log).
pub fn rdstation_sink(dir: &Path, topic: &str, group: &str, rd_url: &str, rules: &Path, log: &str) -> Command {
    let mut command = Command::new(binary("rdstation-sink"));
    let log_file =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{log}.log"))).expect("log file");
    command
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("ELO_TOPIC_COMMERCE", topic)
        .env("ELO_TOPIC_OUTCOMES", format!("{topic}.outcomes"))
        .env("ELO_DLQ_TOPIC", format!("{topic}.rd-dlq"))
        .env("ELO_RDSTATION_STATE_TOPIC", format!("{topic}.rd-state"))
        .env("ELO_RDSTATION_SENT_LOG_TOPIC", format!("{topic}.rd-sent"))
        .env("ELO_TOPIC_PARTITIONS", "3")
        .env("ELO_CONSUMER_GROUP", group)
        .env("ELO_RDSTATION_URL", rd_url)
        .env("ELO_RDSTATION_CLIENT_SECRET_FILE", dir.join("rd-client-secret"))
        .env("ELO_RDSTATION_REFRESH_TOKEN_FILE", dir.join("rd-refresh-token"))
        .env("ELO_RDSTATION_RULES_FILE", rules)
        .env("ELO_RDSTATION_RULES_RELOAD_INTERVAL", "1s")
        .env("ELO_RDSTATION_CONTACTS_PER_MINUTE", "30000")
        // Each test's RD account is fresh: no previous process spent its budget.
        .env("ELO_RDSTATION_START_HOLD", "0s")
        // Orders from `elo_events::sample` are dated from 2026-11-01 and the e2e's history
        // spans 120 days: all of it is to reach RD, whatever the day the tests run (the
        // retention itself is tested with its own setting).
        .env("ELO_RDSTATION_SENT_LOG_RETENTION", "3650d")
        .env("ELO_DRAIN_TIMEOUT", "10s")
        // A killed member's session ends quickly (Tansu 0.6 strands the partitions of a member
        // killed while another is active: restart after its session timed out).
        .env("ELO_RDKAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("ELO_RDKAFKA_HEARTBEAT_INTERVAL_MS", "1000")
        .stdout(Stdio::null())
        .stderr(log_file);
    command
}

/// A reconciler command on the shared stack with topics of its own
/// (`topic.{outcomes,commands,inventory,rc-dlq}`, 3 partitions), group `topic.rc-group`,
/// admin on `admin_port`, logging to `dir/<log>.log`. Add `dlq ...` or `report ...` arguments
/// for an operator command.
pub fn reconciler(dir: &Path, topic: &str, admin_port: u16, log: &str) -> Command {
    let mut command = Command::new(binary("reconciler"));
    command
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("ELO_RECONCILER_HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("ELO_TOPIC_COMMERCE", topic)
        .env("ELO_TOPIC_OUTCOMES", format!("{topic}.outcomes"))
        .env("ELO_TOPIC_COMMANDS", format!("{topic}.commands"))
        .env("ELO_TOPIC_INVENTORY", format!("{topic}.inventory"))
        .env("ELO_DLQ_TOPIC", format!("{topic}.rc-dlq"))
        .env("ELO_CONSUMER_GROUP", format!("{topic}.rc-group"))
        // Each run its own replay checkpoints: a replay of one run never counts in another.
        .env("ELO_RECONCILER_REPLAY_CHECKPOINTS", format!("{topic}.replays"))
        // Its own ledger and stock stores: another run's state is never restored into this one.
        .env("ELO_RECONCILER_LEDGER_TOPIC", format!("{topic}.ledger"))
        .env("ELO_RECONCILER_STOCK_TOPIC", format!("{topic}.stock"))
        .env("ELO_TOPIC_PARTITIONS", "3")
        .env("ELO_RDKAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("ELO_RDKAFKA_HEARTBEAT_INTERVAL_MS", "1000")
        .stderr(std::fs::File::create(dir.join(format!("{log}.log"))).expect("log file"));
    command
}

#[cfg(test)]
mod tests {
    /// Ports handed out in one run never repeat (200 draws from 8,000 ports would repeat with
    /// a probability of about 92% without the claims), stay below the ephemeral range and are
    /// free to bind.
    #[test]
    fn free_ports_are_claimed_once_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| super::free_port()).collect();
        let block = super::free_ports(4);
        assert!(!ports.iter().any(|p| (block..block + 4).contains(p)), "a block overlaps a port handed out");
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        assert!(ports.iter().all(|p| super::TEST_PORTS.contains(p)), "{ports:?}");
        for port in ports.iter().take(20) {
            std::net::TcpListener::bind(("127.0.0.1", *port)).expect("a handed-out port is free");
        }
    }
}
