//! The reconciler's daily report and live flow diagram on the whole pipeline: the sandbox
//! (Magento with about 150 orders, Salesforce, RD Station) → order-ingest → salesforce-sink and
//! rdstation-sink → reconciler. Once everything has landed, the report's figures must equal
//! the ground truth read from the sandbox's inspection API, and both pages must render in
//! headless Chromium (Debian's `chromium`) with no console message at all, the flow diagram
//! showing the six steps with their counts and updating itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use elo_integration_tests::*;
use serde_json::{Value, json};

/// Facts the sandbox's Magento generates at start (new orders and status changes: about 150
/// orders).
const FACTS: u64 = 200;
const RULES: &str = "[[rule]]\nname = \"everyone\"\nstage = \"Lead\"\n";

fn chromium() -> String {
    std::env::var("ELO_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Runs headless Chromium on `url` with `mode` (`--screenshot=…` or `--dump-dom`), letting the
/// page's scripts run for `budget_ms` of virtual time. Returns stdout and the console messages
/// Chromium logged (every `console.*` call, uncaught error and failed load).
fn headless(dir: &Path, url: &str, mode: &str, budget_ms: u32) -> (String, Vec<String>) {
    let profile = tempfile::tempdir_in(dir).unwrap();
    // Output to files (a pipe nobody reads while waiting could fill and hang Chromium), and a
    // deadline: a hung browser fails the test instead of holding it until nextest kills it.
    let (out_path, err_path) = (profile.path().join("stdout"), profile.path().join("stderr"));
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--enable-logging=stderr",
            "--v=0",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--virtual-time-budget={budget_ms}"),
            mode,
            url,
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run chromium (apt-get install chromium)");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish {url} within 60 s:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let console: Vec<String> = stderr.lines().filter(|l| l.contains(":CONSOLE")).map(str::to_owned).collect();
    assert!(status.success(), "chromium failed on {url}:\n{stderr}");
    (std::fs::read_to_string(&out_path).unwrap(), console)
}

/// Today (UTC) as `YYYY-MM-DD`.
fn today() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    elo_events::time::date_of_ms(ms)
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client.get(url).send().await.unwrap().error_for_status().unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_equals_the_sandbox_and_both_pages_render_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("rc.report");
    let client = reqwest::Client::new();
    // The console check must be able to fail: a page that logs an error is caught.
    let (_, control_console) =
        headless(dir.path(), "data:text/html,<script>console.error('elo-console-control')</script>", "--dump-dom", 500);
    assert!(
        control_console.iter().any(|l| l.contains("elo-console-control")),
        "console messages are not detected: {control_console:?}"
    );
    let start_day = today();
    // A port found free may be taken by another test before the sandbox binds it: started
    // again on other ports then (up to three times), never on a port someone else holds.
    let mut attempts = 0;
    let (_sandbox, [magento, salesforce, rdstation, control]) = loop {
        attempts += 1;
        let ports = [free_port(), free_port(), free_port(), free_port()];
        let [magento, salesforce, rdstation, control] = ports;
        let sandbox = ChildGuard::spawn(
            "sandbox",
            Command::new(binary("sandbox"))
                .env("ELO_SANDBOX_MAGENTO_LISTEN", format!("127.0.0.1:{magento}"))
                .env("ELO_SANDBOX_SALESFORCE_LISTEN", format!("127.0.0.1:{salesforce}"))
                .env("ELO_SANDBOX_RDSTATION_LISTEN", format!("127.0.0.1:{rdstation}"))
                .env("ELO_SANDBOX_CONTROL_LISTEN", format!("127.0.0.1:{control}"))
                .env("ELO_SANDBOX_INITIAL_ORDERS", FACTS.to_string())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("sandbox.log")).unwrap()),
        );
        let up = wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", control)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", rdstation)).is_ok()
        })
        .await;
        if up {
            break (sandbox, ports);
        }
        let sandbox_log = log(dir.path(), "sandbox");
        assert!(
            attempts < 3 && sandbox_log.contains("Address already in use"),
            "sandbox did not start:\n{sandbox_log}"
        );
    };
    let control_url = format!("http://127.0.0.1:{control}");
    // RD's per-minute limits would make a 200-order run take minutes; they have tests of their own.
    client
        .put(format!("{control_url}/rdstation/config"))
        .json(&json!({"contacts_per_minute": 1_000_000, "patches_per_contact_per_day": 1_000}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

    let (ingest_admin, sf_admin, rd_admin, rc_admin, rc_http) =
        (free_port(), free_port(), free_port(), free_port(), free_port());
    let _ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &format!("http://127.0.0.1:{magento}"), "ingest")
            .env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s")
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{ingest_admin}")),
    );
    let _sf = ChildGuard::spawn(
        "salesforce-sink",
        salesforce_sink(dir.path(), &topic, &format!("http://127.0.0.1:{salesforce}"), "sf")
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{sf_admin}")),
    );
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let rd_group = format!("{topic}.rd-group");
    let _rd = ChildGuard::spawn(
        "rdstation-sink",
        rdstation_sink(dir.path(), &topic, &rd_group, &format!("http://127.0.0.1:{rdstation}"), &rules, "rd")
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{rd_admin}"))
            // As `make run` does: the sink gets its authorization code from the sandbox.
            .env_remove("ELO_RDSTATION_CLIENT_SECRET_FILE")
            .env_remove("ELO_RDSTATION_REFRESH_TOKEN_FILE")
            .env("ELO_RDSTATION_SANDBOX_CONTROL", &control_url),
    );
    let _rc = ChildGuard::spawn(
        "reconciler",
        reconciler(dir.path(), &topic, rc_admin, "reconciler")
            .env("ELO_RECONCILER_HTTP_LISTEN", format!("127.0.0.1:{rc_http}"))
            .env(
                "ELO_RECONCILER_SERVICE_ADMIN",
                format!(
                    "order-ingest=http://127.0.0.1:{ingest_admin},salesforce-sink=http://127.0.0.1:{sf_admin},rdstation-sink=http://127.0.0.1:{rd_admin},reconciler=http://127.0.0.1:{rc_admin}"
                ),
            )
            .env(
                "ELO_RECONCILER_SERVICE_GROUPS",
                format!("order-ingest={topic}.commands-group,salesforce-sink={topic}.sf-group,rdstation-sink={rd_group}"),
            )
            .env("ELO_RECONCILER_DLQ_TOPICS", format!("{topic}.dlq,{topic}.sf-dlq,{topic}.rd-dlq,{topic}.rc-dlq"))
            .env("ELO_RECONCILER_REPLAY_CHECKPOINTS", format!("{topic}.replays"))
            .stdout(Stdio::null()),
    );

    // Ground truth from the sandbox's inspection API, until every order and customer landed
    // and nothing is left to consume.
    let truth = || async {
        let magento = get_json(&client, &format!("{control_url}/magento/state")).await;
        let sf = get_json(&client, &format!("{control_url}/salesforce/state")).await;
        let rd = get_json(&client, &format!("{control_url}/rdstation/state")).await;
        (magento, sf, rd)
    };
    let sf_orders = |sf: &Value| {
        sf["records"].as_array().unwrap().iter().filter(|r| r["attributes"]["type"] == "Order").count() as u64
    };
    let rd_contacts = |rd: &Value| rd["contacts"].as_array().unwrap().len() as u64;
    let flow_url = format!("http://127.0.0.1:{rc_http}/api/flow");
    let mut settled = None;
    let mut last_contacts = (0, 0);
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (m, sf, rd) = truth().await;
        let Ok(flow) = client.get(&flow_url).send().await else { continue };
        let Ok(flow) = flow.json::<Value>().await else { continue };
        let idle = flow["steps"].as_array().unwrap().iter().all(|s| s["backlog"].as_i64().unwrap_or(0) == 0);
        // RD contacts: one per e-mail; settled when the count holds still with nothing to consume.
        let contacts = rd_contacts(&rd);
        last_contacts = if contacts == last_contacts.0 { (contacts, last_contacts.1 + 1) } else { (contacts, 0) };
        let orders = m["orders"].as_u64().unwrap();
        if orders > 100 && sf_orders(&sf) == orders && contacts > 0 && last_contacts.1 >= 3 && idle {
            settled = Some(());
            break;
        }
    }
    let (m, sf, rd) = truth().await;
    let orders = m["orders"].as_u64().unwrap();
    assert!(
        settled.is_some(),
        "pipeline did not settle: {} Salesforce orders, {} RD contacts of {} customers\n{}\n{}",
        sf_orders(&sf),
        rd_contacts(&rd),
        m["customers"],
        log(dir.path(), "sf"),
        log(dir.path(), "rd")
    );

    // The report, as JSON over HTTP, against the same ground truth. The data is of the day the
    // run started; a run across 00:00 UTC splits it over two days (checked by their sum).
    let report_url = format!("http://127.0.0.1:{rc_http}/report");
    let report = get_json(&client, &format!("{report_url}?format=json&date={start_day}")).await;
    let crossed_midnight = today() != start_day;
    if crossed_midnight {
        let next = get_json(&client, &format!("{report_url}?format=json&date={}", today())).await;
        let sum = |f: &str| report[f].as_u64().unwrap() + next[f].as_u64().unwrap();
        assert!(sum("orders_received") >= orders, "orders received over both days: {report} {next}");
        assert!(sum("order_events") >= orders);
    } else {
        assert_eq!(report["orders_received"].as_u64(), m["orders"].as_u64(), "orders received: {report}");
    }
    let inventory = &report["inventory"];
    let checked: u64 =
        ["ok", "low_stock", "oversold", "unchecked"].iter().map(|k| inventory[k].as_u64().unwrap()).sum();
    assert_eq!(checked, report["orders_received"].as_u64().unwrap(), "one inventory status per order: {inventory}");
    assert_eq!(report["replayed_records"], 0, "nothing was replayed");
    let sf_figures = &report["synced"]["salesforce"];
    assert_eq!(sf_figures["dead_lettered"], 0);
    assert!(sf_figures["customers"].as_u64().unwrap() > 0);
    assert_eq!(report["synced"]["salesforce"]["orders"].as_u64(), Some(sf_orders(&sf)), "orders in Salesforce");
    assert_eq!(report["synced"]["rdstation"]["customers"].as_u64(), Some(rd_contacts(&rd)), "contacts in RD Station");
    assert_eq!(report["failures"], json!([]), "nothing was parked");
    assert_eq!(report["needs_person"]["dead_letters"], 0);
    let steps: Vec<&str> = report["latency"].as_array().unwrap().iter().map(|l| l["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["order", "salesforce", "rdstation"]);
    // The Salesforce quota is Salesforce's own count (the sink reads it from every answer):
    // equal to the simulator's once no call is in flight.
    let mut quota_matches = false;
    for _ in 0..20 {
        let report = get_json(&client, &format!("{report_url}?format=json")).await;
        let used = report["quota"]["salesforce"]["used"].as_u64();
        let (_, sf, _) = truth().await;
        if used.is_some() && used == sf["api_usage"].as_u64() {
            assert_eq!(report["quota"]["salesforce"]["limit"], sf["daily_quota"]);
            quota_matches = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(quota_matches, "Salesforce quota used never matched the simulator's count");
    // `reconciler report --date` writes the same figures as files.
    let out = dir.path().join("reports");
    let date = report["date"].as_str().unwrap().to_owned();
    let written = reconciler(dir.path(), &topic, free_port(), "report-cli")
        .env("ELO_RECONCILER_HTTP_LISTEN", format!("127.0.0.1:{rc_http}"))
        .env("ELO_RECONCILER_DLQ_TOPICS", format!("{topic}.dlq,{topic}.sf-dlq,{topic}.rd-dlq,{topic}.rc-dlq"))
        .env("ELO_RECONCILER_REPLAY_CHECKPOINTS", format!("{topic}.replays"))
        .args(["report", "--date", &date, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(written.status.success(), "report CLI failed:\n{}", log(dir.path(), "report-cli"));
    for ext in ["html", "json", "csv"] {
        assert!(out.join(format!("elo-report-{date}.{ext}")).exists(), "no {ext} report written");
    }
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(format!("elo-report-{date}.json"))).unwrap()).unwrap();
    assert_eq!(file["orders_received"], report["orders_received"]);
    assert_eq!(file["synced"], report["synced"]);
    let csv =
        client.get(format!("{report_url}?format=csv&date={start_day}")).send().await.unwrap().text().await.unwrap();
    let received = report["orders_received"].as_u64().unwrap();
    assert!(csv.lines().any(|l| l == format!("orders,,received,{received}")), "{csv}");

    // Both pages in headless Chromium: screenshots taken, no console message, the six steps
    // with their counts, and the diagram updating itself.
    let shots = std::env::var("ELO_SCREENSHOT_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| dir.path().into());
    for (name, url) in [("report", report_url.clone()), ("flow", format!("http://127.0.0.1:{rc_http}/flow"))] {
        let png = shots.join(format!("reconciler-{name}.png"));
        let (_, console) = headless(dir.path(), &url, &format!("--screenshot={}", png.display()), 2000);
        assert!(console.is_empty(), "{name} page logged to the console: {console:?}");
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no {name} screenshot: {e}"));
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "{name} screenshot is not a real PNG");
    }
    let (report_dom, console) = headless(dir.path(), &format!("{report_url}?date={start_day}"), "--dump-dom", 1000);
    assert!(console.is_empty(), "{console:?}");
    assert!(report_dom.contains(&format!("id=\"orders-received\"><b>{received}</b>")), "report page figures");
    let flow_before = get_json(&client, &flow_url).await;
    let (dom, console) = headless(dir.path(), &format!("http://127.0.0.1:{rc_http}/flow"), "--dump-dom", 7000);
    assert!(console.is_empty(), "flow page logged to the console: {console:?}");
    let flow = get_json(&client, &flow_url).await;
    let ids: Vec<&str> = flow["steps"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["order", "inventory", "salesforce", "rdstation", "repair", "report"], "the six steps in order");
    for (i, step) in flow["steps"].as_array().unwrap().iter().enumerate() {
        let id = step["id"].as_str().unwrap();
        assert!(dom.contains(&format!("id=\"step-{id}\"")), "step {id} missing from the diagram");
        let count = step["count"].as_u64().unwrap_or_else(|| panic!("step {id} has no count: {step}"));
        let shown = dom
            .split(&format!("id=\"count-{id}\">"))
            .nth(1)
            .and_then(|rest| rest.split('<').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no count shown for {id}"));
        // The page read /api/flow between these two reads: its figure lies between theirs.
        let before = flow_before["steps"][i]["count"].as_u64().unwrap();
        let (low, high) = (before.min(count), before.max(count));
        assert!((low..=high).contains(&shown), "step {id} shows {shown}, the API said {before} then {count}");
    }
    let shown_orders: u64 =
        dom.split("id=\"count-order\">").nth(1).and_then(|r| r.split('<').next()).unwrap().parse().unwrap();
    assert!(shown_orders >= orders, "the order step counts every published order event: {shown_orders}");
    let refreshes: u64 =
        dom.split("id=\"refreshes\">").nth(1).and_then(|r| r.split('<').next()).unwrap().parse().unwrap();
    assert!(refreshes >= 1, "the diagram fetched /api/flow by itself");
}
