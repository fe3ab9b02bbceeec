//! `make run`'s stack (scripts/stack.sh + scripts/run-local.sh) comes up with every service
//! ready, and Ctrl-C brings everything down with no process left behind.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use elo_integration_tests::*;

fn descendants(pid: u32) -> Vec<u32> {
    let out = Command::new("ps").args(["-e", "-o", "pid=,ppid="]).output().unwrap();
    let pairs: Vec<(u32, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(pairs.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    found
}

fn pgid(pid: u32) -> Option<u32> {
    let out = Command::new("ps").args(["-o", "pgid=", "-p", &pid.to_string()]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn same_group(pid: u32, other: u32) -> bool {
    pgid(pid).is_some() && pgid(pid) == pgid(other)
}

fn alive(pid: u32) -> bool {
    Command::new("kill").args(["-0", &pid.to_string()]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

#[test]
fn the_local_stack_starts_ready_and_ctrl_c_leaves_nothing_behind() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    // Four consecutive admin ports starting at `admin`, all claimed.
    let (kafka, registry, admin) = (free_port(), free_port(), elo_integration_tests::free_ports(4));
    let log = dir.path().join("run.log");
    let reports = format!("127.0.0.1:{}", free_port());
    let mut stack = ChildGuard::spawn(
        "stack",
        Command::new(root.join("scripts/stack.sh"))
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--")
            .arg(root.join("scripts/run-local.sh"))
            .env("ELO_STACK_KAFKA_PORT", kafka.to_string())
            .env("ELO_STACK_REGISTRY_PORT", registry.to_string())
            .env("ELO_RUN_ADMIN_BASE_PORT", admin.to_string())
            .env("ELO_RUN_STATUS_INTERVAL", "1")
            .env("ELO_TOPIC_PARTITIONS", "2")
            .env("ELO_SANDBOX_MAGENTO_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("ELO_SANDBOX_SALESFORCE_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("ELO_SANDBOX_RDSTATION_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("ELO_SANDBOX_CONTROL_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("ELO_RUN_ORDERS_PER_SECOND", "20")
            .env("ELO_RECONCILER_HTTP_LISTEN", &reports)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null()),
    );
    let all_ready = |text: &str| {
        text.lines().any(|l| {
            ["sandbox", "order-ingest", "salesforce-sink", "rdstation-sink", "reconciler"]
                .iter()
                .all(|s| l.contains(&format!("{s}=ready")))
        })
    };
    let mut ready = false;
    for _ in 0..120 {
        if all_ready(&std::fs::read_to_string(&log).unwrap_or_default()) {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(ready, "stack never reported every service ready:\n{text}");

    // The demo flows: generated orders are pushed to order-ingest and validated downstream.
    let mut flowing = false;
    for _ in 0..120 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let last =
            text.lines().rev().find_map(|l| l.split("events-validated-by-salesforce-sink=").nth(1)).unwrap_or("0");
        if last.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0) > 0 {
            flowing = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        flowing,
        "no event flowed from the sandbox to the sinks:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // The report and flow URLs are printed at start, and the status line carries the
    // reconciler's per-step counts, with orders counted as they flow.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(&format!("http://{reports}/report")) && text.contains(&format!("http://{reports}/flow")),
        "{text}"
    );
    let step = |line: &str, id: &str| -> Option<u64> {
        line.split("steps: ").nth(1)?.split_whitespace().find_map(|kv| kv.strip_prefix(&format!("{id}="))?.parse().ok())
    };
    let mut counted = false;
    for _ in 0..60 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(last) = text.lines().rev().find(|l| l.contains("steps: ")) {
            let all = ["order", "inventory", "salesforce", "rdstation", "repair", "report"];
            if all.iter().all(|id| step(last, id).is_some()) && step(last, "order") > Some(0) {
                counted = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(counted, "no status line with every step's count:\n{}", std::fs::read_to_string(&log).unwrap_or_default());

    let spawned = descendants(stack.child.id());
    assert!(
        spawned.len() >= 7,
        "expected broker, registry, sandbox and four services, found {} processes",
        spawned.len()
    );
    // Ctrl-C in a terminal signals the foreground process group: the scripts. The services run
    // in sessions of their own and are stopped by the scripts, with one SIGTERM each.
    let foreground: Vec<u32> = spawned.iter().copied().filter(|pid| same_group(*pid, stack.child.id())).collect();
    stack.signal("INT");
    for pid in &foreground {
        let _ = Command::new("kill").args(["-INT", &pid.to_string()]).stderr(Stdio::null()).status();
    }
    let status = stack.wait_timeout(Duration::from_secs(60)).expect("stack stops after Ctrl-C");
    assert!(status.success(), "Ctrl-C is a clean stop, got {status}");
    std::thread::sleep(Duration::from_millis(500));
    let left: Vec<_> = spawned.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("all services stopped"), "{text}");
    let logs = dir.path().join("data/logs");
    for service in ["order-ingest", "salesforce-sink", "rdstation-sink", "reconciler", "sandbox"] {
        let log = std::fs::read_to_string(logs.join(format!("{service}.log"))).unwrap_or_default();
        assert!(!log.contains("exiting without drain"), "{service} was not stopped gracefully:\n{log}");
    }
}
