//! Record header helpers.

use std::collections::HashMap;

use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Header with the event type symbol, so consumers can filter without decoding.
pub const EVENT_TYPE: &str = "elo-event-type";

/// Builds rdkafka headers from name/value pairs.
pub fn to_owned_headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> OwnedHeaders {
    pairs.into_iter().fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(value) }))
}

/// The current span's trace context (`traceparent`, and `tracestate` when it holds vendor
/// state), then `extra`: how every record Elo writes carries the trace of what caused it.
pub fn traced<'a>(extra: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> OwnedHeaders {
    let trace = elo_telemetry::propagation::inject_current();
    let headers = to_owned_headers(trace.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
    extra.into_iter().fold(headers, |h, (key, value)| h.insert(Header { key, value: Some(value) }))
}

/// Collects headers into owned pairs, keeping order and duplicates.
pub fn collect<H: Headers>(headers: Option<&H>) -> Vec<(String, Vec<u8>)> {
    headers
        .map(|h| {
            h.iter()
                .map(|header| (header.key.to_owned(), header.value.map(<[u8]>::to_vec).unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// The UTF-8 headers as a map (last one wins), e.g. for trace-context extraction.
pub fn text_map(headers: &[(String, Vec<u8>)]) -> HashMap<String, String> {
    headers.iter().filter_map(|(k, v)| std::str::from_utf8(v).ok().map(|v| (k.clone(), v.to_owned()))).collect()
}
