//! `sandbox`: runs the SaaS simulators and their control API.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use sandbox::rdstation::{RdConfig, RdStationApp};
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use sandbox::{Counters, control, faults::Faults};

/// Local simulators of Magento 2, Salesforce and RD Station Marketing.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {
    /// Salesforce simulator address.
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_LISTEN", default_value = "127.0.0.1:8702")]
    salesforce_listen: SocketAddr,
    /// RD Station Marketing simulator address.
    #[arg(long, env = "ELO_SANDBOX_RDSTATION_LISTEN", default_value = "127.0.0.1:8703")]
    rdstation_listen: SocketAddr,
    /// Control and inspection API address.
    #[arg(long, env = "ELO_SANDBOX_CONTROL_LISTEN", default_value = "127.0.0.1:8700")]
    control_listen: SocketAddr,
    /// Salesforce OAuth client id.
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_CLIENT_ID", default_value = "elo-sandbox-client")]
    salesforce_client_id: String,
    /// File holding the Salesforce OAuth client secret [default: elo-sandbox-secret].
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_CLIENT_SECRET_FILE")]
    salesforce_client_secret_file: Option<std::path::PathBuf>,
    /// Salesforce daily API quota.
    #[arg(long, env = "ELO_SANDBOX_SALESFORCE_DAILY_QUOTA", default_value_t = 100_000)]
    salesforce_daily_quota: u64,
    #[command(flatten)]
    telemetry: elo_telemetry::TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _guard = elo_telemetry::init("sandbox", &config.telemetry)?;
    let shutdown = elo_telemetry::shutdown::on_signals();
    let faults = Faults::default();
    let counters = Counters::default();
    let secret = match &config.salesforce_client_secret_file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?.trim().to_owned()
        }
        None => "elo-sandbox-secret".to_owned(),
    };
    let sf_listener = tokio::net::TcpListener::bind(config.salesforce_listen).await.context("binding salesforce")?;
    let sf_config = SalesforceConfig {
        client_id: config.salesforce_client_id.clone(),
        client_secret: secret,
        instance_url: format!("http://{}", sf_listener.local_addr()?),
        daily_quota: config.salesforce_daily_quota,
        ..SalesforceConfig::default()
    };
    let salesforce = SalesforceApp::new(sf_config, faults.clone(), counters.clone());
    let rd_listener = tokio::net::TcpListener::bind(config.rdstation_listen).await.context("binding rdstation")?;
    let rdstation = RdStationApp::new(RdConfig::default(), faults.clone(), counters.clone());
    let control_listener = tokio::net::TcpListener::bind(config.control_listen).await.context("binding control")?;
    let control_app = control::router(control::Control {
        faults,
        counters,
        salesforce: salesforce.clone(),
        rdstation: rdstation.clone(),
    });
    tracing::info!(salesforce = %config.salesforce_listen, rdstation = %config.rdstation_listen, control = %config.control_listen, "sandbox listening");
    let sf = axum::serve(sf_listener, salesforce.router()).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let rd = axum::serve(rd_listener, rdstation.router()).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let ctl = axum::serve(control_listener, control_app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let (a, b, c) = tokio::join!(sf.into_future(), rd.into_future(), ctl.into_future());
    a?;
    b?;
    c?;
    Ok(())
}
