//! Each service binary documents its settings with their environment variables, serves
//! `/metrics`, `/health/livez` and `/health/readyz`, joins the stack, and stops cleanly.

use std::process::{Command, Stdio};
use std::time::Duration;

use elo_integration_tests::*;

const SERVICES: &[&str] =
    &["order-ingest", "salesforce-sink", "rdstation-sink", "reconciler", "schema-registry", "sandbox"];

#[test]
fn help_lists_every_setting_with_its_environment_variable() {
    for service in SERVICES {
        let out = Command::new(binary(service)).arg("--help").output().unwrap();
        assert!(out.status.success(), "{service} --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        let mut expected = vec!["ELO_LOG", "ELO_LOG_FORMAT", "OTEL_EXPORTER_OTLP_ENDPOINT"];
        if *service == "schema-registry" {
            expected.extend(["ELO_REGISTRY_LISTEN", "ELO_REGISTRY_DATA_FILE", "ELO_REGISTRY_ADMIN_LISTEN"]);
        } else if *service == "sandbox" {
            expected.extend([
                "ELO_SANDBOX_MAGENTO_LISTEN",
                "ELO_SANDBOX_SALESFORCE_LISTEN",
                "ELO_SANDBOX_RDSTATION_LISTEN",
                "ELO_SANDBOX_CONTROL_LISTEN",
                "ELO_SANDBOX_SEED",
            ]);
        } else {
            expected.extend([
                "ELO_KAFKA_BROKERS",
                "ELO_REGISTRY_URL",
                "ELO_ADMIN_LISTEN",
                "ELO_TOPIC_COMMERCE",
                "ELO_TOPIC_PARTITIONS",
                "ELO_PROVISION_TOPICS",
            ]);
        }
        if ["salesforce-sink", "rdstation-sink", "reconciler"].contains(service) {
            expected.extend(["ELO_CONSUMER_GROUP", "ELO_DLQ_TOPIC", "ELO_MAX_BATCH", "ELO_DRAIN_TIMEOUT"]);
        }
        for var in expected {
            assert!(help.contains(&format!("[env: {var}")), "{service} --help does not mention {var}:\n{help}");
        }
        // Every option has its environment variable (nothing undocumented); -h/-V are not counted.
        let options = help.lines().filter(|l| l.trim_start().starts_with("--")).count();
        let with_env = help.matches("[env: ").count();
        assert_eq!(with_env, options, "{service}: {options} options but {with_env} environment variables:\n{help}");
    }
}

async fn get(port: u16, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_serve_probes_and_metrics_and_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("svc");
    let mut running = Vec::new();
    for service in &SERVICES[..4] {
        let port = free_port();
        let guard = ChildGuard::spawn(
            service,
            Command::new(binary(service))
                .env("ELO_KAFKA_BROKERS", brokers())
                .env("ELO_REGISTRY_URL", registry_url())
                .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{port}"))
                // The reconciler's reports listener: a port of its own (a taken one stops it).
                .env("ELO_RECONCILER_HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
                // Topics of this test only, so parallel tests do not interfere.
                .env("ELO_TOPIC_COMMERCE", format!("{prefix}.commerce"))
                .env("ELO_TOPIC_INVENTORY", format!("{prefix}.inventory"))
                .env("ELO_TOPIC_OUTCOMES", format!("{prefix}.outcomes"))
                .env("ELO_TOPIC_COMMANDS", format!("{prefix}.commands"))
                .env("ELO_TOPIC_PARTITIONS", "2")
                .env("ELO_CONSUMER_GROUP", format!("{prefix}-{service}"))
                .env("ELO_DLQ_TOPIC", format!("{prefix}.{service}.dlq"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(format!("{service}.log"))).unwrap()),
        );
        running.push((service, port, guard));
    }
    for (service, port, _) in &running {
        let mut last = (0, String::new());
        for _ in 0..150 {
            last = get(*port, "/health/readyz").await;
            if last.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(dir.path().join(format!("{service}.log"))).unwrap_or_default();
        assert_eq!(last.0, 200, "{service} not ready: {}\n{log}", last.1);
        assert_eq!(get(*port, "/health/livez").await.0, 200, "{service} livez");
        let (code, metrics) = get(*port, "/metrics").await;
        assert_eq!(code, 200);
        assert!(metrics.contains("# TYPE elo_"), "{service} exports no elo_ metrics:\n{metrics}");
        if **service != "order-ingest" {
            assert!(metrics.contains("elo_consumer_assigned_partitions"), "{service}: {metrics}");
            assert!(metrics.contains("elo_consumer_rebalances_total{kind=\"assign\"}"), "{service}: {metrics}");
        }
    }
    for (service, _, guard) in &mut running {
        guard.signal("TERM");
        let status =
            guard.wait_timeout(Duration::from_secs(30)).unwrap_or_else(|| panic!("{service} did not stop on SIGTERM"));
        assert!(status.success(), "{service} exited with {status}");
    }
}
