use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::{Error, Result};

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for terminals.
    Text,
    /// One JSON object per line, for log shippers in Kubernetes.
    Json,
}

/// Telemetry settings shared by every service (flattened into each service's `Config`).
#[derive(Clone, Debug, clap::Args)]
pub struct TelemetryArgs {
    /// Log filter in `tracing` syntax, e.g. `info,elo_kafka=debug`.
    #[arg(long = "log-filter", env = "ELO_LOG", default_value = "info")]
    pub log_filter: String,
    /// Log format.
    #[arg(long = "log-format", env = "ELO_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Span filter for tracing (independent of the log filter, so quiet logs do not break
    /// trace propagation through Kafka).
    #[arg(long = "trace-filter", env = "ELO_TRACE_FILTER", default_value = "info")]
    pub trace_filter: String,
    /// OTLP/HTTP endpoint for traces (e.g. `http://otel-collector:4318`); unset = no export.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Keeps the tracer provider alive; dropping it flushes and shuts down span export.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("telemetry shutdown: {error}");
        }
    }
}

/// Installs the global subscriber and the W3C propagator. Spans always get OpenTelemetry ids
/// (so `traceparent` propagates through Kafka even without an exporter); they are exported
/// only when an OTLP endpoint is configured.
pub fn init(service: &'static str, args: &TelemetryArgs) -> Result<TelemetryGuard> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|source| Error::LogFilter { filter: args.log_filter.clone(), source })?;
    let trace_filter = EnvFilter::try_new(&args.trace_filter)
        .map_err(|source| Error::LogFilter { filter: args.trace_filter.clone(), source })?;

    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &args.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint_from_base(endpoint)
            .build()
            .map_err(|e| Error::Otlp(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    let otel_layer = span_layer(provider.tracer(service)).with_filter(trace_filter);

    let fmt_layer = match args.log_format {
        // Logs go to stderr; stdout stays free for command output.
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(true).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
    .with_filter(filter);
    // `try_init` fails when a subscriber is already set (tests): keep the first one.
    let _ = tracing_subscriber::registry().with(otel_layer).with(fmt_layer).try_init();
    BUILD_INFO.with_label_values(&[service, env!("CARGO_PKG_VERSION")]).set(1);
    Ok(TelemetryGuard { provider })
}

/// The layer that gives `tracing` spans OpenTelemetry ids (and exports them, when the tracer
/// does), as every service installs it. Lean per span: no thread attributes (an async span
/// moves between threads), no busy/idle timing on every poll, and no OpenTelemetry context
/// attached on every enter (nothing here reads `Context::current()`: injection reads the span's
/// own context, [`crate::propagation::inject_current`]). Together these cost a webhook some 4 µs
/// on the push path. Exported spans carry no `thread.*`, `busy_ns` or `idle_ns` attributes.
pub(crate) fn span_layer<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_tracer(tracer)
}

/// `elo_build_info{service,version} 1`: every service exports at least this from its first
/// scrape, and dashboards join on it to show versions.
static BUILD_INFO: std::sync::LazyLock<prometheus::IntGaugeVec> = std::sync::LazyLock::new(|| {
    prometheus::register_int_gauge_vec!(
        "elo_build_info",
        "Service name and version; always 1.",
        &["service", "version"]
    )
    .expect("metric registers once")
});

/// `with_endpoint` wants the full signal URL; accept the base URL as the OTel spec does.
trait EndpointFromBase {
    fn with_endpoint_from_base(self, base: &str) -> Self;
}

impl EndpointFromBase for opentelemetry_otlp::SpanExporterBuilder<opentelemetry_otlp::HttpExporterBuilderSet> {
    fn with_endpoint_from_base(self, base: &str) -> Self {
        use opentelemetry_otlp::WithExportConfig;
        let base = base.trim_end_matches('/');
        let url = if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") };
        self.with_endpoint(url)
    }
}
