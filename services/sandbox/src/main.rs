//! `sandbox`: runs the SaaS simulators and their control API.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use sandbox::magento::generator::GeneratorConfig;
use sandbox::magento::{MagentoApp, MagentoConfig};
use sandbox::rdstation::{RdConfig, RdStationApp};
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use sandbox::{Counters, control, faults::Faults};

/// Local simulators of Magento 2, Salesforce and RD Station Marketing.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {
    /// Magento simulator address.
    #[arg(long, env = "ELO_SANDBOX_MAGENTO_LISTEN", default_value = "127.0.0.1:8701")]
    magento_listen: SocketAddr,
    /// Salesforce simulator address.
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_LISTEN", default_value = "127.0.0.1:8702")]
    salesforce_listen: SocketAddr,
    /// RD Station Marketing simulator address.
    #[arg(long, env = "ELO_SANDBOX_RDSTATION_LISTEN", default_value = "127.0.0.1:8703")]
    rdstation_listen: SocketAddr,
    /// Control and inspection API address.
    #[arg(long, env = "ELO_SANDBOX_CONTROL_LISTEN", default_value = "127.0.0.1:8700")]
    control_listen: SocketAddr,
    /// Order generator seed (the same seed gives the same orders).
    #[arg(long, env = "ELO_SANDBOX_SEED", default_value_t = 42)]
    seed: u64,
    /// Facts (orders and status changes) generated per second in the background (0 = none).
    #[arg(long, env = "ELO_SANDBOX_ORDERS_PER_SECOND", default_value_t = 0.0)]
    orders_per_second: f64,
    /// Orders to generate at startup.
    #[arg(long, env = "ELO_SANDBOX_INITIAL_ORDERS", default_value_t = 0)]
    initial_orders: usize,
    /// JSON file keeping every simulator's data across restarts (unset = memory only).
    #[arg(long, env = "ELO_SANDBOX_STATE_FILE")]
    state_file: Option<std::path::PathBuf>,
    /// Salesforce OAuth client id.
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_CLIENT_ID", default_value = "elo-sandbox-client")]
    salesforce_client_id: String,
    /// File holding the Salesforce OAuth client secret [default: elo-sandbox-secret].
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_CLIENT_SECRET_FILE")]
    salesforce_client_secret_file: Option<std::path::PathBuf>,
    /// PEM public key (certificate key) that verifies JWT bearer assertions.
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_JWT_PUBLIC_KEY_FILE")]
    salesforce_jwt_public_key_file: Option<std::path::PathBuf>,
    /// PKCS#8 PEM RSA private key that signs `adobe-rsa` Magento webhooks [default: generated
    /// at start; the control API serves the public half at `/magento/webhook/public-key`].
    #[arg(long, env = "ELO_SANDBOX_MAGENTO_WEBHOOK_PRIVATE_KEY_FILE")]
    magento_webhook_private_key_file: Option<std::path::PathBuf>,
    /// JSON file declaring the org's custom objects and `__c` fields [default: the embedded
    /// `data/salesforce-custom.json`].
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_SCHEMA_FILE")]
    salesforce_schema_file: Option<std::path::PathBuf>,
    /// JSON file with the payload schema of RD Station events [default: the embedded
    /// `data/rdstation-events.json`].
    #[arg(long, env = "ELO_SANDBOX_RDSTATION_EVENT_SCHEMA_FILE")]
    rdstation_event_schema_file: Option<std::path::PathBuf>,
    /// Salesforce daily API quota.
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_DAILY_QUOTA", default_value_t = 100_000)]
    salesforce_daily_quota: u64,
    #[command(flatten)]
    telemetry: elo_telemetry::TelemetryArgs,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the {what} simulator to {addr}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _guard = elo_telemetry::init("sandbox", &config.telemetry)?;
    let shutdown = elo_telemetry::shutdown::on_signals();
    let (faults, counters) = (Faults::default(), Counters::default());
    let secret = match &config.salesforce_client_secret_file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_owned()
        }
        None => "elo-sandbox-secret".to_owned(),
    };
    let (mg_listener, sf_listener, rd_listener, ctl_listener) = (
        bind(config.magento_listen, "magento").await?,
        bind(config.salesforce_listen, "salesforce").await?,
        bind(config.rdstation_listen, "rdstation").await?,
        bind(config.control_listen, "control").await?,
    );
    let salesforce = SalesforceApp::new(
        SalesforceConfig {
            client_id: config.salesforce_client_id.clone(),
            client_secret: secret,
            instance_url: format!("http://{}", sf_listener.local_addr()?),
            daily_quota: config.salesforce_daily_quota,
            jwt_public_key_pem: match &config.salesforce_jwt_public_key_file {
                Some(path) => {
                    Some(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
                }
                None => None,
            },
            ..SalesforceConfig::default()
        },
        faults.clone(),
        counters.clone(),
    );
    if let Some(path) = &config.salesforce_schema_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let schema = sandbox::salesforce::schema::Schema::load(&text)
            .with_context(|| format!("loading the Salesforce schema {}", path.display()))?;
        let mut sim = salesforce.sim.lock().expect("sim lock");
        sim.org.schema = schema;
        sim.apply_org_settings();
    }
    let rdstation = RdStationApp::new(RdConfig::default(), faults.clone(), counters.clone());
    if let Some(path) = &config.rdstation_event_schema_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        rdstation.sim.lock().expect("rd lock").event_schema = sandbox::rdstation::events::EventSchema::load(&text)
            .with_context(|| format!("loading the RD Station event schema {}", path.display()))?;
    }
    let generator = GeneratorConfig { seed: config.seed, start_ms: sandbox::now_ms(), ..GeneratorConfig::default() };
    let magento = MagentoApp::new(MagentoConfig::default(), generator, faults.clone(), counters.clone());
    if let Some(path) = &config.magento_webhook_private_key_file {
        let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let key = sandbox::magento::signing::WebhookKey::from_pkcs8_pem(&pem)
            .with_context(|| format!("loading the webhook key {}", path.display()))?;
        magento.webhook_key.set(key);
    }
    // Generated now rather than on the first signed delivery, so no delivery waits for it.
    let _ = magento.webhook_key.get();
    let integration = magento.sim.lock().expect("magento lock").integration_credentials();
    tracing::info!(
        consumer_key = %integration.consumer_key,
        access_token = %integration.access_token,
        "magento integration (secrets: GET /magento/integration on the control API)"
    );
    let control_app = control::router(control::Control {
        faults,
        counters,
        salesforce: salesforce.clone(),
        rdstation: rdstation.clone(),
        magento: magento.clone(),
    });
    tracing::info!(
        magento = %config.magento_listen,
        salesforce = %config.salesforce_listen,
        rdstation = %config.rdstation_listen,
        control = %config.control_listen,
        "sandbox listening"
    );
    if let Some(path) = &config.state_file
        && let Some(snapshot) = sandbox::persist::load(path).with_context(|| format!("reading {}", path.display()))?
    {
        sandbox::persist::restore(snapshot, &salesforce, &rdstation, &magento);
        tracing::info!(path = %path.display(), "state restored");
    } else if config.initial_orders > 0 {
        let mut sim = magento.sim.lock().expect("magento lock");
        sim.keep_generator_behind_now(config.initial_orders);
        sim.generate(config.initial_orders);
    }
    let saver = config.state_file.clone().map(|path| {
        let (sf, rd, mg, stop) = (salesforce.clone(), rdstation.clone(), magento.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => false,
                    _ = stop.cancelled() => true,
                };
                let snapshot = sandbox::persist::snapshot(&sf, &rd, &mg);
                if let Err(error) = sandbox::persist::save(&path, &snapshot) {
                    tracing::error!(error = %error, path = %path.display(), "saving sandbox state failed");
                }
                if stopping {
                    return;
                }
            }
        })
    });
    magento.sim.lock().expect("magento lock").rate_per_sec = config.orders_per_second.max(0.0);
    let webhooks = tokio::spawn(sandbox::magento::webhook::dispatch(magento.clone(), shutdown.clone()));
    let generator_task = tokio::spawn(sandbox::magento::run_generator(magento.clone(), shutdown.clone()));
    let stop = || shutdown.clone().cancelled_owned();
    let (a, b, c, d) = tokio::join!(
        axum::serve(mg_listener, magento.router()).with_graceful_shutdown(stop()).into_future(),
        axum::serve(sf_listener, salesforce.router()).with_graceful_shutdown(stop()).into_future(),
        axum::serve(rd_listener, rdstation.router()).with_graceful_shutdown(stop()).into_future(),
        axum::serve(ctl_listener, control_app).with_graceful_shutdown(stop()).into_future(),
    );
    shutdown.cancel();
    let _ = webhooks.await;
    let _ = generator_task.await;
    if let Some(saver) = saver {
        let _ = saver.await;
    }
    a?;
    b?;
    c?;
    d?;
    Ok(())
}
