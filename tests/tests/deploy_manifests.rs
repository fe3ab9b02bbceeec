//! The Kubernetes manifests agree with what the binaries really do: every ConfigMap variable
//! is one the services read, the probes point at the admin server's routes and port, and the
//! grace period outlasts the drain timeout. Then `tests/python/deploy_checks.py` (one test per
//! subcommand): every overlay renders with `kubectl kustomize` and validates against the
//! Kubernetes and the checked-in CRD schemas, with the topics the binaries' `--help` says they
//! provision; the alert rules pass `promtool check rules` and their unit tests; the dashboards
//! are well formed; the Dockerfile builds a non-root multi-stage image; the AsyncAPI catalog
//! validates, matches the topics and schemas, and renders as HTML. Whether the metrics the
//! alerts and dashboards read are exported is `deploy_metrics.rs`.

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

/// `ELO_*` names set in `env:` lists of a manifest (`- name: ELO_X` or `- {name: ELO_X, ...}`).
fn env_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim().trim_start_matches("- ").trim_start_matches('{');
            let rest = l.strip_prefix("name: ")?;
            let name: String = rest.chars().take_while(|c| c.is_ascii_uppercase() || *c == '_').collect();
            name.starts_with("ELO_").then_some(name)
        })
        .collect()
}

/// Every variable a Deployment (or an overlay's patch) sets is one its service reads, so a
/// renamed flag cannot leave a credential file or the rules file silently unused.
#[test]
fn deployment_env_vars_are_read_by_their_service() {
    let mut checked = 0;
    for service in SERVICES {
        let help = help(service);
        let text = std::fs::read_to_string(root().join(format!("deploy/base/{service}.yaml"))).unwrap();
        for name in env_names(&text).into_iter().filter(|n| !n.starts_with("ELO_RDKAFKA_")) {
            assert!(help.contains(&format!("[env: {name}=")), "{service} sets {name}, which it does not read");
            checked += 1;
        }
    }
    let helps: Vec<String> = SERVICES.iter().map(|s| help(s)).collect();
    for overlay in ["dev", "prod"] {
        let text =
            std::fs::read_to_string(root().join(format!("deploy/overlays/{overlay}/kustomization.yaml"))).unwrap();
        for name in env_names(&text).into_iter().filter(|n| !n.starts_with("ELO_RDKAFKA_")) {
            assert!(
                helps.iter().any(|h| h.contains(&format!("[env: {name}="))),
                "{overlay} sets {name}, read by no service"
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "the sinks' credential and rules settings are in the manifests ({checked} checked)");
}

/// The rules and event mapping the rdstation-sink ConfigMap mounts are valid, and the mapping is
/// the sink's embedded default (update both together).
#[test]
fn rdstation_config_map_holds_valid_rules_and_the_default_event_mapping() {
    let dir = root().join("deploy/base/rdstation");
    let rules = rdstation_sink::rules::Rules::load(&dir.join("rules.toml")).unwrap();
    assert!(!rules.rules.is_empty());
    rdstation_sink::events::EventMapping::load(&dir.join("events.toml")).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("events.toml")).unwrap(),
        rdstation_sink::events::DEFAULT_MAPPING,
        "deploy/base/rdstation/events.toml differs from services/rdstation-sink/config/events.toml"
    );
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

/// The value of `[default: ...]` printed right after `[env: KEY=]` in a `--help`.
fn env_default(help: &str, key: &str) -> Option<String> {
    let after = help.split(&format!("[env: {key}=")).nth(1)?;
    let line = after.lines().skip(1).map(str::trim).find(|l| !l.is_empty())?;
    line.strip_prefix("[default: ").and_then(|l| l.strip_suffix(']')).map(str::to_owned)
}

/// Every topic the services provision, read from their `--help` defaults.
fn provisioned_topics() -> Vec<String> {
    let mut topics = Vec::new();
    for service in SERVICES {
        let help = help(service);
        // Every topic setting: the shared ELO_TOPIC_* names and each service's own *_TOPIC
        // (DLQ, checkpoints, state stores, sent-logs), so a new store cannot miss its KafkaTopic.
        for key in topic_settings(&help) {
            topics.extend(env_default(&help, &key));
        }
        if help.contains("[env: ELO_DLQ_TOPIC=") {
            assert!(help.contains("[default: <service>.dlq]"), "{service}: the consumer DLQ default changed:\n{help}");
            topics.push(format!("{service}.dlq"));
        }
        if help.contains("[env: ELO_CONSUMER_GROUP=") {
            // KEDA scales on this group (deploy/base/scaling.yaml, checked by deploy_checks.py).
            assert!(
                help.contains("[default: elo-<service>]"),
                "{service}: the consumer group default changed; update the ScaledObjects:\n{help}"
            );
        }
    }
    topics.sort();
    topics.dedup();
    topics
}

/// The environment variables in `help` that name one topic.
fn topic_settings(help: &str) -> Vec<String> {
    let mut keys: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split_once('=').map(|(key, _)| key.to_owned()))
        .filter(|key| {
            let shared =
                key.starts_with("ELO_TOPIC_") && !key.ends_with("_PARTITIONS") && !key.ends_with("_REPLICATION");
            let own = key.ends_with("_TOPIC") && key != "ELO_DLQ_TOPIC";
            shared || own || key == "ELO_RECONCILER_REPLAY_CHECKPOINTS"
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Runs `tests/python/deploy_checks.py <args>` and fails with its report unless every check held.
fn deploy_check(args: &[&str]) -> String {
    let script = root().join("tests/python/deploy_checks.py");
    let out = Command::new("python3").arg(&script).args(args).output().expect("python3");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "deploy_checks.py {args:?} failed:\n{report}");
    report
}

#[test]
fn topic_settings_are_every_single_topic_variable() {
    let help = "[env: ELO_TOPIC_COMMERCE=]\n[env: ELO_TOPIC_PARTITIONS=]\n[env: ELO_X_STATE_TOPIC=]\n\
                [env: ELO_DLQ_TOPIC=]\n[env: ELO_PROVISION_TOPICS=]\n[env: ELO_RECONCILER_DLQ_TOPICS=]";
    assert_eq!(topic_settings(help), ["ELO_TOPIC_COMMERCE", "ELO_X_STATE_TOPIC"]);
}

#[test]
fn env_default_reads_the_help_format() {
    let help = "      --x <X>\n          Doc\n          \n          [env: ELO_X=]\n          [default: a.b]\n";
    assert_eq!(env_default(help, "ELO_X").as_deref(), Some("a.b"));
    assert_eq!(env_default(help, "ELO_Y"), None);
}

#[test]
fn every_overlay_renders_and_validates_against_kubernetes_and_crd_schemas() {
    let topics = provisioned_topics();
    assert!(topics.len() >= 9, "expected the four shared topics, a checkpoint topic and four DLQs: {topics:?}");
    let report = deploy_check(&["manifests", "--expect-topics", &topics.join(",")]);
    for target in ["base:", "overlays/dev:", "overlays/prod:"] {
        assert!(report.contains(target), "{target} not rendered:\n{report}");
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let report = deploy_check(&["rules"]);
    assert_eq!(report.matches("SUCCESS").count(), 4, "two rule files checked, two test files passed:\n{report}");
}

#[test]
fn grafana_dashboards_load_and_are_provisioned() {
    deploy_check(&["dashboards"]);
}

#[test]
fn dockerfile_builds_a_small_non_root_image_per_service() {
    let report = deploy_check(&["dockerfile"]);
    assert!(report.contains("user 65532"), "{report}");
}

#[test]
fn asyncapi_catalog_validates_and_lists_every_provisioned_topic_with_its_schema() {
    let topics = provisioned_topics();
    let report = deploy_check(&["asyncapi", "--expect-topics", &topics.join(",")]);
    assert!(report.contains(&format!("{} channels", topics.len())), "{report}");
}

#[test]
fn asyncapi_catalog_renders_as_a_browsable_html_page() {
    let report = deploy_check(&["asyncapi-html"]);
    assert!(report.contains("index.html"), "{report}");
}

#[test]
fn deployment_env_only_sets_variables_the_service_reads() {
    for service in SERVICES {
        let help = help(service);
        let text = std::fs::read_to_string(root().join(format!("deploy/base/{service}.yaml"))).unwrap();
        for key in text.lines().filter_map(|l| l.trim().strip_prefix("- name: ")).filter(|k| k.starts_with("ELO_")) {
            if key.starts_with("ELO_RDKAFKA_") {
                continue;
            }
            assert!(help.contains(&format!("[env: {key}=")), "{service}: {key} is set but not read");
        }
    }
}

/// Every address a service defaults to the local sandbox (a loopback URL, or "the local
/// sandbox") is set in its Deployment or `elo-config`: a pod left on a loopback default starts
/// and then fails every call. The sandbox's own control API is the one exception (used only
/// against a loopback RD URL).
#[test]
fn deployments_point_every_sandbox_default_at_a_real_system() {
    let shared: Vec<String> = config_map().into_iter().map(|(k, _)| k).collect();
    for service in SERVICES {
        let help = help(service);
        let text = std::fs::read_to_string(root().join(format!("deploy/base/{service}.yaml"))).unwrap();
        let set: Vec<&str> = text.lines().filter_map(|l| l.trim().strip_prefix("- name: ")).collect();
        let keys = help.split("[env: ").skip(1).filter_map(|rest| rest.split_once('=').map(|(key, _)| key.to_owned()));
        for key in keys.filter(|k| k != "ELO_RDSTATION_SANDBOX_CONTROL") {
            let block = help.split(&format!("[env: {key}=")).next().unwrap_or_default();
            // The option's own text: from its flag line to the env line.
            let doc = block.rsplit("\n      -").next().unwrap_or_default();
            let default = env_default(&help, &key).unwrap_or_default();
            let local = default.starts_with("http://127.0.0.1")
                || default.starts_with("http://localhost")
                || doc.contains("[default: the local sandbox");
            if local {
                assert!(
                    set.contains(&key.as_str()) || shared.contains(&key),
                    "{service}: {key} defaults to the local sandbox ({default:?}) and is set neither in \
                     deploy/base/{service}.yaml nor in elo-config"
                );
            }
        }
    }
}
