//! For each simulated API, a widely used third-party client library runs unchanged against the
//! sandbox: authenticate, write, read back (see `python/third_party_clients.py`).

use std::path::Path;
use std::process::Command;

use sandbox::Counters;
use sandbox::faults::Faults;
use sandbox::magento::{MagentoApp, MagentoConfig};
use sandbox::rdstation::{RdConfig, RdStationApp};
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_salesforce_my_magento_and_rdstation_python_work_against_the_sandbox() {
    let (faults, counters) = (Faults::default(), Counters::default());
    let magento = MagentoApp::new(MagentoConfig::default(), Default::default(), faults.clone(), counters.clone());
    magento.sim.lock().unwrap().generate(20);
    // my-magento drops any port from the store's domain (it assumes 80/443), so this test
    // serves the Magento simulator on loopback port 80.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:80")
        .await
        .expect("port 80 on loopback is needed by my-magento, which ignores ports; is something else using it?");
    let router = magento.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let magento_addr = "127.0.0.1".to_owned();
    let sf_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sf_addr = sf_listener.local_addr().unwrap().to_string();
    let keys = tempfile::tempdir().unwrap();
    let private_key = keys.path().join("app.key");
    let public_key = keys.path().join("app.pub");
    let openssl = |args: &[&std::ffi::OsStr]| {
        assert!(Command::new("openssl").args(args).output().unwrap().status.success(), "openssl {args:?}")
    };
    openssl(&["genrsa".as_ref(), "-out".as_ref(), private_key.as_os_str(), "2048".as_ref()]);
    openssl(&[
        "rsa".as_ref(),
        "-pubout".as_ref(),
        "-in".as_ref(),
        private_key.as_os_str(),
        "-out".as_ref(),
        public_key.as_os_str(),
    ]);
    let salesforce = SalesforceApp::new(
        SalesforceConfig {
            instance_url: format!("https://{sf_addr}"),
            jwt_public_key_pem: Some(std::fs::read_to_string(&public_key).unwrap()),
            ..SalesforceConfig::default()
        },
        faults.clone(),
        counters.clone(),
    );
    let router = salesforce.clone().router();
    tokio::spawn(async move { axum::serve(sf_listener, router).await.unwrap() });
    let rd = RdStationApp::new(RdConfig::default(), faults, counters.clone());
    let rd_addr = serve(rd.clone().router()).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/third_party_clients.py");
    let log_dir = keys.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            // my-magento writes a log file into its working directory.
            .current_dir(&log_dir)
            .arg(script)
            .arg(&magento_addr)
            .arg(&sf_addr)
            .arg(format!("http://{rd_addr}"))
            .arg(&private_key)
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("third-party clients passed"), "{stdout}");

    // The writes really landed in the simulators.
    let sf = salesforce.sim.lock().unwrap();
    assert!(sf.org.records.values().any(|r| r.fields.get("Elo_Id__c").and_then(|v| v.as_str()) == Some("c:1001")));
    drop(sf);
    assert_eq!(magento.sim.lock().unwrap().stock["SKU-002"].0, 37.0);
    assert!(
        rd.sim
            .lock()
            .unwrap()
            .contacts
            .values()
            .any(|c| c.fields.get("email").and_then(|v| v.as_str()) == Some("lib@example.com"))
    );
    let calls = counters.snapshot();
    assert!(calls["salesforce"]["POST /services/oauth2/token"].as_u64().unwrap() >= 1, "{calls}");
}
