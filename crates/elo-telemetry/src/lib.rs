//! Elo's operational surface, shared by every service: logs and traces, metrics, health
//! probes, W3C trace context in Kafka headers, shutdown signals and PII redaction.
//!
//! # Layout
//! - [`init`]: `tracing` subscriber (text locally, JSON in Kubernetes) plus the OpenTelemetry
//!   layer; spans are exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! - [`admin`]: the admin HTTP server (`/metrics`, `/health/livez`, `/health/readyz`) on its
//!   own port, and [`Health`], the readiness/liveness state services update.
//! - [`propagation`]: inject and extract `traceparent` through a string map, which the Kafka
//!   crate maps to record headers.
//! - [`shutdown`]: SIGTERM/SIGINT to a `CancellationToken`.
//! - [`redact`]: masking of e-mails and phone numbers before they reach a log line.

pub mod admin;
pub mod propagation;
pub mod redact;
mod setup;
pub mod shutdown;

pub use admin::{Health, serve_admin};
pub use setup::{LogFormat, TelemetryArgs, TelemetryGuard, init};

/// Telemetry failures (startup only; nothing here fails at run time).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid log filter {filter:?}: {source}")]
    LogFilter { filter: String, source: tracing_subscriber::filter::ParseError },
    #[error("otlp exporter: {0}")]
    Otlp(String),
    #[error("admin server could not bind {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
