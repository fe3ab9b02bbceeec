//! Local Confluent-compatible Schema Registry.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Local Confluent-compatible Schema Registry (AVRO).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Config {
    /// Address the registry API listens on.
    #[arg(long, env = "ELO_REGISTRY_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// JSON file keeping registry state across restarts; unset = in memory only.
    #[arg(long, env = "ELO_REGISTRY_DATA_FILE")]
    data_file: Option<PathBuf>,
    /// Admin address for /metrics and health probes.
    #[arg(long, env = "ELO_REGISTRY_ADMIN_LISTEN", default_value = "127.0.0.1:9181")]
    admin_listen: SocketAddr,
    #[command(flatten)]
    telemetry: elo_telemetry::TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _guard = elo_telemetry::init("schema-registry", &config.telemetry)?;
    let shutdown = elo_telemetry::shutdown::on_signals();
    let health = elo_telemetry::Health::new();
    let (_, admin) = elo_telemetry::serve_admin(config.admin_listen, health, shutdown.clone()).await?;
    let store = schema_registry::store::Store::open(config.data_file.clone()).context("opening registry state")?;
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, data_file = ?config.data_file, "schema registry listening");
    axum::serve(listener, schema_registry::api::app(store))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    shutdown.cancel();
    let _ = admin.await;
    Ok(())
}
