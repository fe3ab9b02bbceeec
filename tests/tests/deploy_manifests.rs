//! The Kubernetes manifests agree with what the binaries really do: every ConfigMap variable
//! is one the services read, the probes point at the admin server's routes and port, and the
//! grace period outlasts the drain timeout.

use std::path::{Path, PathBuf};
use std::process::Command;

const SERVICES: &[&str] = &["order-ingest", "salesforce-sink", "rdstation-sink", "reconciler"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn help(service: &str) -> String {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root().join("target"));
    let out =
        Command::new(target.join("debug").join(service)).arg("--help").output().expect("service binary (make build)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn config_map() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("deploy/base/configmap.yaml")).unwrap();
    let data = text.split("\ndata:\n").nth(1).expect("data section");
    data.lines()
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

#[test]
fn config_map_only_sets_variables_the_services_read() {
    let helps: Vec<String> = SERVICES.iter().map(|s| help(s)).collect();
    for (key, value) in config_map() {
        if key.starts_with("ELO_RDKAFKA_") {
            continue; // passed through to librdkafka (documented in elo-kafka::config)
        }
        let known = helps.iter().any(|h| h.contains(&format!("[env: {key}=")));
        assert!(known, "{key}={value} in the ConfigMap is read by no service");
    }
    let admin = config_map().into_iter().find(|(k, _)| k == "ELO_ADMIN_LISTEN").expect("admin address set").1;
    assert!(admin.ends_with(":9100"), "probes target 9100, admin listens on {admin}");
}

#[test]
fn deployments_probe_the_admin_routes_and_outlast_the_drain() {
    let drain: u64 = config_map()
        .into_iter()
        .find(|(k, _)| k == "ELO_DRAIN_TIMEOUT")
        .map(|(_, v)| v.trim_end_matches('s').parse().unwrap())
        .expect("drain timeout set");
    let kustomization = std::fs::read_to_string(root().join("deploy/base/kustomization.yaml")).unwrap();
    for service in SERVICES {
        assert!(kustomization.contains(&format!("- {service}.yaml")), "{service} missing from kustomization");
        let text = std::fs::read_to_string(root().join(format!("deploy/base/{service}.yaml"))).unwrap();
        for needle in [
            "path: /health/readyz",
            "path: /health/livez",
            "containerPort: 9100",
            "kind: PodDisruptionBudget",
            "prometheus.io/path: /metrics",
        ] {
            assert!(text.contains(needle), "{service}: missing {needle}");
        }
        let grace: u64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
            .expect("grace period set")
            .parse()
            .unwrap();
        assert!(grace > drain + 5, "{service}: grace {grace}s must outlast the {drain}s drain");
    }
}
