//! Production connectivity: a service configured for SASL/SCRAM-SHA-512 over TLS connects to
//! an authenticating Tansu through a TLS front (Tansu 0.6.0's own --cert/--key cannot be used
//! together, so `socat` terminates TLS, as a load balancer would), and a wrong password fails
//! with a clear error and a non-ready probe while the process stays up.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use elo_integration_tests::*;

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
}

struct SecureBroker {
    _tansu: TansuProcess,
    _tls: ChildGuard,
    tls_port: u16,
}

/// Tansu with authentication and one SCRAM user, behind a TLS terminator with a self-signed
/// certificate for 127.0.0.1.
fn secure_broker(dir: &Path, user: &str, password: &str) -> SecureBroker {
    let (plain_port, tls_port) = (free_port(), free_port());
    let advertised = format!("tcp://127.0.0.1:{tls_port}");
    // Users are created while authentication is off, then the broker restarts with it on.
    {
        let setup = TansuProcess::start(dir, plain_port, &advertised, false);
        run(
            Command::new(tansu_bin()).args([
                "user",
                "create",
                user,
                password,
                "--mechanism",
                "scram512",
                "--broker",
                &format!("tcp://127.0.0.1:{plain_port}"),
            ]),
            "tansu user create",
        );
        drop(setup);
    }
    let tansu = TansuProcess::start(dir, plain_port, &advertised, true);
    run(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem")),
        "openssl req",
    );
    let listen = format!(
        "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    let tls = ChildGuard::spawn(
        "socat",
        Command::new("socat")
            .arg(listen)
            .arg(format!("TCP:127.0.0.1:{plain_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "TLS front did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    SecureBroker { _tansu: tansu, _tls: tls, tls_port }
}

fn service_binary(name: &str) -> std::path::PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} missing: build the services first (`cargo build --workspace --bins`, as `make test` does)",
        path.display()
    );
    path
}

fn start_sink(dir: &Path, broker: &SecureBroker, password_file: &Path, admin_port: u16, log: &str) -> ChildGuard {
    ChildGuard::spawn(
        "salesforce-sink",
        Command::new(service_binary("salesforce-sink"))
            .env("ELO_KAFKA_BROKERS", format!("127.0.0.1:{}", broker.tls_port))
            .env("ELO_RDKAFKA_SECURITY_PROTOCOL", "SASL_SSL")
            .env("ELO_RDKAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
            .env("ELO_RDKAFKA_SASL_USERNAME", "elo-sink")
            .env("ELO_RDKAFKA_SASL_PASSWORD_FILE", password_file)
            .env("ELO_RDKAFKA_SSL_CA_LOCATION", dir.join("cert.pem"))
            .env("ELO_REGISTRY_URL", registry_url())
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("ELO_TOPIC_PARTITIONS", "2")
            .env("ELO_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(log)).unwrap()),
    )
}

async fn readyz(port: u16) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}/health/readyz")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Polls the readiness probe until `done` holds or `timeout` passes; returns the last answer.
async fn poll_readyz(port: u16, timeout: Duration, done: impl Fn(&(u16, String)) -> bool) -> (bool, (u16, String)) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let answer = readyz(port).await;
        if done(&answer) {
            return (true, answer);
        }
        if std::time::Instant::now() >= deadline {
            return (false, answer);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_connects_and_a_wrong_password_is_a_clear_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let broker = secure_broker(dir.path(), "elo-sink", "correct-horse-battery");

    let good = dir.path().join("good-password");
    std::fs::write(&good, "correct-horse-battery\n").unwrap();
    let port = free_port();
    let mut sink = start_sink(dir.path(), &broker, &good, port, "good.log");
    let (ready, last) = poll_readyz(port, Duration::from_secs(60), |(code, _)| *code == 200).await;
    assert!(
        ready,
        "service never became ready over SASL_SSL: {last:?}\n{}",
        std::fs::read_to_string(dir.path().join("good.log")).unwrap_or_default()
    );
    assert!(last.1.contains("group joined"), "{}", last.1);
    sink.signal("TERM");
    assert!(sink.wait_timeout(Duration::from_secs(30)).expect("exits on SIGTERM").success());

    let bad = dir.path().join("bad-password");
    std::fs::write(&bad, "wrong-password-123\n").unwrap();
    let port = free_port();
    let mut sink = start_sink(dir.path(), &broker, &bad, port, "bad.log");
    let (refused, last) = poll_readyz(port, Duration::from_secs(30), |(code, body)| {
        *code == 503 && body.contains("authentication failed")
    })
    .await;
    assert!(refused, "expected a 503 naming the authentication failure, got {last:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        sink.child.try_wait().unwrap().is_none(),
        "the service must stay up (live, not ready) on refused credentials"
    );
    assert_eq!(readyz(port).await.0, 503, "still not ready");
    let log = std::fs::read_to_string(dir.path().join("bad.log")).unwrap();
    assert!(log.contains("SASL SCRAM authentication failed"), "log must say why:\n{log}");
    assert!(!log.contains("wrong-password-123"), "the password must never reach the logs");
    sink.signal("TERM");
    assert!(sink.wait_timeout(Duration::from_secs(30)).expect("exits on SIGTERM").success());
}
