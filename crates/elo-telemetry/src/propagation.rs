//! W3C trace context (`traceparent`, `tracestate`) through a plain string map, so the Kafka
//! crate can carry it in record headers without depending on OpenTelemetry types.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Header carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";

/// Header carrying vendor trace state (only when there is some).
pub const TRACESTATE: &str = "tracestate";

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        // OpenTelemetry's propagator always sets `tracestate`, empty without vendor state; W3C
        // Trace Context: vendors "SHOULD avoid sending" an empty one (it means the same as none),
        // and every header costs a broker (Tansu stores each as a row) and each consumer bytes.
        if key == TRACESTATE && value.trim().is_empty() {
            return;
        }
        self.0.insert(key.to_owned(), value);
    }
}

struct MapReader<'a>(&'a HashMap<String, String>);

impl Extractor for MapReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The current span's trace context as headers (empty when there is no active trace).
pub fn inject_current() -> HashMap<String, String> {
    let mut headers = HashMap::new();
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut MapCarrier(&mut headers)));
    headers
}

/// Makes `span` a child of the trace carried in `headers`, if any.
pub fn set_parent_from(span: &tracing::Span, headers: &HashMap<String, String>) {
    if !headers.contains_key(TRACEPARENT) {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MapReader(headers)));
    // Only fails when the span is disabled; nothing to attach then.
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Runs `f` inside a span of a subscriber that gives spans OpenTelemetry ids as the services'
    /// does ([`crate::setup::span_layer`]), with the W3C propagator the services install.
    fn in_traced_span<T>(parent: Option<&HashMap<String, String>>, f: impl FnOnce() -> T) -> T {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(crate::setup::span_layer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("publish");
            if let Some(parent) = parent {
                set_parent_from(&span, parent);
            }
            span.in_scope(f)
        })
    }

    #[test]
    fn an_empty_tracestate_is_not_sent() {
        let headers = in_traced_span(None, inject_current);
        assert!(headers.get(TRACEPARENT).is_some_and(|v| v.starts_with("00-")), "{headers:?}");
        assert_eq!(headers.len(), 1, "traceparent only: {headers:?}");
    }

    #[test]
    fn vendor_trace_state_and_the_trace_id_pass_through() {
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let parent = HashMap::from([
            (TRACEPARENT.to_owned(), format!("00-{trace_id}-00f067aa0ba902b7-01")),
            (TRACESTATE.to_owned(), "vendor=opaque".to_owned()),
        ]);
        let headers = in_traced_span(Some(&parent), inject_current);
        assert!(headers[TRACEPARENT].contains(trace_id), "{headers:?}");
        assert_eq!(headers.get(TRACESTATE).map(String::as_str), Some("vendor=opaque"));
    }
}
