//! Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary) with a
//! Schema Registry, subject naming by TopicNameStrategy (`<topic>-value`).

use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};

use crate::AvroEvent;

/// Length of the Confluent prefix: magic byte plus schema id.
pub const WIRE_HEADER_LEN: usize = 5;

/// Codec failures. [`CodecError::class`] says what a caller should do about each.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The registry could not be reached, timed out, or answered with a server error.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    /// The registry refused our credentials (401/403).
    #[error("schema registry refused our credentials: {0}")]
    RegistryAuth(String),
    /// The registry throttled us (429).
    #[error("schema registry rate limit: {0}")]
    RegistryRateLimited(String),
    /// The registry refused the request itself (incompatible schema, unknown subject or id).
    #[error("schema registry refused: {0}")]
    RegistryRefused(String),
    /// The bytes are not in the Confluent wire format.
    #[error("not confluent wire format: {0}")]
    Framing(String),
    /// The bytes do not decode with the writer schema, or do not resolve to ours.
    #[error("avro: {0}")]
    Avro(String),
}

/// What a codec failure means for the record at hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodecErrorClass {
    /// The bytes (or the schema they name) can never be decoded: park the record.
    Undecodable,
    /// The registry is down or failing: retry with backoff.
    Unavailable,
    /// The registry refuses our credentials: wait for them to be fixed, never park.
    Auth,
    /// The registry throttles us: wait, never park.
    RateLimited,
}

impl CodecError {
    /// What this failure means: only undecodable bytes are the record's fault.
    pub fn class(&self) -> CodecErrorClass {
        match self {
            Self::RegistryUnavailable(_) => CodecErrorClass::Unavailable,
            Self::RegistryAuth(_) => CodecErrorClass::Auth,
            Self::RegistryRateLimited(_) => CodecErrorClass::RateLimited,
            Self::RegistryRefused(_) | Self::Framing(_) | Self::Avro(_) => CodecErrorClass::Undecodable,
        }
    }

    /// Whether the same call may succeed later (registry down, throttled, credentials being
    /// fixed) rather than never (bad data).
    pub fn is_retriable(&self) -> bool {
        self.class() != CodecErrorClass::Undecodable
    }

    /// Bounded code for metrics and DLQ headers.
    pub fn code(&self) -> &'static str {
        match self {
            Self::RegistryUnavailable(_) => "registry_unavailable",
            Self::RegistryAuth(_) => "registry_auth",
            Self::RegistryRateLimited(_) => "registry_rate_limited",
            Self::RegistryRefused(_) => "registry_refused",
            Self::Framing(_) => "framing",
            Self::Avro(_) => "avro",
        }
    }

    /// Classifies a registry client error by the HTTP status in its text: the client
    /// (schema_registry_converter 6) only marks 502/503 retriable and calls everything else
    /// final, which would park valid records whenever the registry answers 500, 504, 429 or
    /// 401 after a restart (when the schema cache is empty).
    fn from_src(err: SRCError) -> Self {
        let text = match &err.cause {
            Some(cause) => format!("{}: {cause}", err.error),
            None => err.error.clone(),
        };
        match http_status(&err.error) {
            Some(401 | 403) => Self::RegistryAuth(text),
            Some(429) => Self::RegistryRateLimited(text),
            Some(408) => Self::RegistryUnavailable(text),
            Some(status) if status >= 500 => Self::RegistryUnavailable(text),
            // A registry's own 404 carries its error code (40401 subject, 40403 schema not
            // found): the bytes name a schema that does not exist. A bare 404 (an ingress or
            // proxy during a rollout) says nothing about the record.
            Some(404) if !(text.contains("40401") || text.contains("40403")) => Self::RegistryUnavailable(text),
            Some(_) => Self::RegistryRefused(text),
            // No status: a transport failure (refused, reset, timeout) or the client's own
            // retriable verdict; a non-retriable one without a status is a bad answer body.
            None if err.retriable || is_transport(&text) => Self::RegistryUnavailable(text),
            None => Self::RegistryRefused(text),
        }
    }
}

/// The status in "HTTP request to schema registry failed with status 503 Service Unavailable".
fn http_status(error: &str) -> Option<u16> {
    let (_, rest) = error.split_once("with status ")?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn is_transport(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ["error sending request", "connect", "timed out", "timeout", "connection", "dns"].iter().any(|t| lower.contains(t))
}

/// How to reach the registry.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Base URL, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// Register our schema under the topic's subject when it is not there yet. Turn off where
    /// schemas are registered by a pipeline; encoding then uses the subject's latest version.
    pub auto_register: bool,
    /// Optional basic auth (`user`, `password`), e.g. Confluent Cloud API keys.
    pub basic_auth: Option<(String, String)>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl RegistryConfig {
    /// Local defaults: auto-registration on.
    pub fn local(url: impl Into<String>) -> Self {
        Self { url: url.into(), auto_register: true, basic_auth: None, timeout: Duration::from_secs(5) }
    }
}

/// Encodes and decodes [`AvroEvent`]s in the Confluent wire format. Schemas are cached by
/// subject (encode) and by id (decode), so the registry is hit once per schema, not per record.
pub struct EventCodec {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    auto_register: bool,
    /// Writer schemas by id, decimals read as plain bytes (see [`decoding_schema`]), with
    /// their canonical form.
    writers: Mutex<HashMap<u32, Arc<(Schema, String)>>>,
    /// With auto-registration, the id our own schema got under each topic's subject, by event
    /// type (its default topic names it): later encodes need no schema text, no subject
    /// lookup and no writer built, only our static writer.
    own_ids: Mutex<HashMap<&'static str, HashMap<String, u32>>>,
}

impl std::fmt::Debug for EventCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventCodec").field("auto_register", &self.auto_register).finish_non_exhaustive()
    }
}

impl EventCodec {
    /// Builds the codec; no network call happens until the first encode or decode.
    pub fn new(config: &RegistryConfig) -> Result<Self, CodecError> {
        let build = || {
            let mut builder = SrSettings::new_builder(config.url.clone());
            builder.set_timeout(config.timeout);
            if let Some((user, password)) = &config.basic_auth {
                builder.set_basic_authorization(user, Some(password));
            }
            builder.build().map_err(CodecError::from_src)
        };
        Ok(Self {
            encoder: AvroEncoder::new(build()?),
            decoder: AvroDecoder::new(build()?),
            auto_register: config.auto_register,
            writers: Mutex::new(HashMap::new()),
            own_ids: Mutex::new(HashMap::new()),
        })
    }

    fn strategy<T: AvroEvent>(&self, topic: &str) -> SubjectNameStrategy {
        if self.auto_register {
            let supplied = SuppliedSchema::new(None, SchemaType::Avro, T::AVSC.to_owned());
            SubjectNameStrategy::TopicNameStrategyWithSchema(topic.to_owned(), false, supplied)
        } else {
            SubjectNameStrategy::TopicNameStrategy(topic.to_owned(), false)
        }
    }

    /// Encodes `value` for `topic` with the subject `<topic>-value`: the schema is registered
    /// (or, without auto-registration, the subject's latest version is used) and the value is
    /// written with exactly the schema its id names.
    pub async fn encode<T: AvroEvent>(&self, topic: &str, value: &T) -> Result<Vec<u8>, CodecError> {
        let own_id =
            self.own_ids.lock().expect("id cache lock").get(T::DEFAULT_TOPIC).and_then(|t| t.get(topic)).copied();
        if let Some(id) = own_id {
            return encode_framed(id, T::direct_writer(), value);
        }
        let strategy = self.strategy::<T>(topic);
        let subject = strategy.get_subject().map_err(CodecError::from_src)?;
        let registered = self.encoder.get_schema_and_id(&subject, strategy).await.map_err(|e| {
            // The library caches failures; a registry outage must not stick.
            self.encoder.remove_errors_from_cache();
            CodecError::from_src(e)
        })?;
        if self.auto_register {
            // What was registered is our own schema: its id stands for this topic from now on.
            let mut ids = self.own_ids.lock().expect("id cache lock");
            ids.entry(T::DEFAULT_TOPIC).or_default().insert(topic.to_owned(), registered.id);
            return encode_framed(registered.id, T::direct_writer(), value);
        }
        let body = encode_body_with(&registered.parsed, value)?;
        Ok(frame(registered.id, &body))
    }

    /// Registers (or looks up) the schema of `T` for `topic` and returns its id.
    pub async fn schema_id<T: AvroEvent>(&self, topic: &str) -> Result<u32, CodecError> {
        let strategy = self.strategy::<T>(topic);
        let subject = strategy.get_subject().map_err(CodecError::from_src)?;
        let result = self.encoder.get_schema_and_id(&subject, strategy).await;
        if result.is_err() {
            self.encoder.remove_errors_from_cache();
        }
        result.map(|s| s.id).map_err(CodecError::from_src)
    }

    /// Decodes a Confluent-framed value written with any registered schema version, resolved
    /// to our schema of `T` by Avro's evolution rules.
    pub async fn decode<T: AvroEvent>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let (id, body) = unframe(bytes)?;
        let cached = self.writers.lock().expect("writer cache lock").get(&id).cloned();
        let writer = match cached {
            Some(writer) => writer,
            None => {
                let registered = self.decoder.get_schema(id).await.map_err(|e| {
                    self.decoder.remove_errors_from_cache();
                    CodecError::from_src(e)
                })?;
                let schema = decoding_schema(&registered.raw)?;
                let canonical = schema.canonical_form();
                let writer = Arc::new((schema, canonical));
                self.writers.lock().expect("writer cache lock").insert(id, writer.clone());
                writer
            }
        };
        if writer.1 == T::decoding_canonical() {
            return decode_direct::<T>(body);
        }
        decode_with::<T>(&writer.0, body)
    }
}

/// Parses a schema for *decoding*, with every `decimal` logical type read as its underlying
/// `bytes`/`fixed`. The wire format is identical; [`Decimal4`](crate::Decimal4) turns the
/// bytes into the value. The reason: apache-avro 0.22's resolver rejects a bytes decimal
/// shorter than its precision would need (`max_prec_for_len(len) < precision`), yet Avro
/// writers such as fastavro and the Java library write the shortest two's complement, so
/// `20.14` arrives as 3 bytes. Elo must read what every other producer writes.
pub fn decoding_schema(avsc: &str) -> Result<Schema, CodecError> {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                if map.get("logicalType").and_then(|v| v.as_str()) == Some("decimal") {
                    map.remove("logicalType");
                    map.remove("precision");
                    map.remove("scale");
                }
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut json: serde_json::Value =
        serde_json::from_str(avsc).map_err(|e| CodecError::Avro(format!("schema is not JSON: {e}")))?;
    strip(&mut json);
    Schema::parse(&json).map_err(|e| CodecError::Avro(e.to_string()))
}

/// Splits the Confluent prefix from the Avro body.
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    if bytes.len() < WIRE_HEADER_LEN {
        return Err(CodecError::Framing(format!("{} bytes is shorter than the 5-byte header", bytes.len())));
    }
    if bytes[0] != 0 {
        return Err(CodecError::Framing(format!("magic byte is {}, expected 0", bytes[0])));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[WIRE_HEADER_LEN..]))
}

/// Prefixes an Avro body with the Confluent header.
pub fn frame(schema_id: u32, avro_body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(WIRE_HEADER_LEN + avro_body.len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(avro_body);
    out
}

/// Encodes `value` as a bare Avro body with `T`'s own schema (no registry): for benchmarks and
/// for tests that frame by hand.
pub fn encode_body<T: AvroEvent>(value: &T) -> Result<Vec<u8>, CodecError> {
    T::direct_writer().write_ser_to_vec(value).map_err(|e| CodecError::Avro(e.to_string()))
}

/// The Confluent header and the Avro body written straight after it (one buffer, no copy).
fn encode_framed<T: serde::Serialize>(
    schema_id: u32,
    writer: &GenericDatumWriter<'_>,
    value: &T,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    writer.write_ser(&mut out, value).map_err(|e| CodecError::Avro(e.to_string()))?;
    Ok(out)
}

/// Encodes `value` as a bare Avro body with the given writer schema, serialising straight from
/// serde into Avro binary (no intermediate value tree).
pub fn encode_body_with<T: serde::Serialize>(writer: &Schema, value: &T) -> Result<Vec<u8>, CodecError> {
    GenericDatumWriter::builder(writer)
        .build()
        .and_then(|w| w.write_ser_to_vec(value))
        .map_err(|e| CodecError::Avro(e.to_string()))
}

/// Decodes a bare Avro body written with `T`'s own schema: no resolution needed.
pub fn decode_direct<T: AvroEvent>(mut body: &[u8]) -> Result<T, CodecError> {
    let value = T::direct_reader().read_deser::<T>(&mut body).map_err(|e| CodecError::Avro(e.to_string()))?;
    if !body.is_empty() {
        return Err(CodecError::Avro(format!("{} trailing bytes after the record", body.len())));
    }
    Ok(value)
}

/// Decodes a bare Avro body written with `writer`, resolved to `T`'s schema by Avro's
/// evolution rules (defaults for fields the writer lacked, unknown enum symbols to defaults).
pub fn decode_with<T: AvroEvent>(writer: &Schema, mut body: &[u8]) -> Result<T, CodecError> {
    let reader = GenericDatumReader::builder(writer)
        .reader_schema(T::decoding_schema())
        .build()
        .map_err(|e| CodecError::Avro(e.to_string()))?;
    let value = reader.read_value(&mut body).map_err(|e| CodecError::Avro(e.to_string()))?;
    if !body.is_empty() {
        return Err(CodecError::Avro(format!("{} trailing bytes after the record", body.len())));
    }
    apache_avro::from_value::<T>(&value).map_err(|e| CodecError::Avro(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommerceEvent, IntegrationCommand, InventoryEvent, SyncOutcome, sample, schema};

    #[test]
    fn checked_in_schemas_parse() {
        for (topic, avsc) in schema::ALL {
            Schema::parse_str(avsc).unwrap_or_else(|e| panic!("{topic}: {e}"));
        }
        // Touch each lazily parsed schema.
        let _ =
            (CommerceEvent::schema(), InventoryEvent::schema(), SyncOutcome::schema(), IntegrationCommand::schema());
    }

    #[test]
    fn commerce_event_round_trips_through_its_schema() {
        for n in 0..50 {
            let event = sample::order_placed(n);
            let body = encode_body(&event).unwrap();
            let framed = frame(7, &body);
            let (id, rest) = unframe(&framed).unwrap();
            assert_eq!(id, 7);
            let back: CommerceEvent = decode_with(CommerceEvent::decoding_schema(), rest).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn direct_and_resolving_decoders_agree() {
        for n in 0..30 {
            let event = sample::order_placed(n);
            let body = encode_body(&event).unwrap();
            let direct: CommerceEvent = decode_direct(&body).unwrap();
            let resolved: CommerceEvent = decode_with(CommerceEvent::decoding_schema(), &body).unwrap();
            assert_eq!(direct, event);
            assert_eq!(resolved, event);
        }
        assert!(decode_direct::<CommerceEvent>(&[0x02]).is_err());
    }

    #[test]
    fn reader_resolves_older_writer_with_defaults() {
        // An older writer schema without `erasure` and `inventory_status`.
        let mut old: serde_json::Value = serde_json::from_str(schema::COMMERCE_EVENT_AVSC).unwrap();
        old["fields"].as_array_mut().unwrap().retain(|f| f["name"] != "erasure");
        let order = old["fields"].as_array_mut().unwrap().iter_mut().find(|f| f["name"] == "order").unwrap();
        order["type"][1]["fields"].as_array_mut().unwrap().retain(|f| f["name"] != "inventory_status");
        let old_schema = Schema::parse_str(&old.to_string()).unwrap();

        #[derive(serde::Serialize)]
        struct OldOrder<'a> {
            entity_id: i64,
            increment_id: &'a str,
            state: &'a str,
            status: &'a str,
            currency: &'a str,
            created_at: i64,
            totals: &'a crate::OrderTotals,
            items: &'a [crate::OrderItem],
            billing_address: Option<&'a crate::Address>,
            shipping_address: Option<&'a crate::Address>,
            payment_method: Option<&'a str>,
            shipping_method: Option<&'a str>,
        }
        #[derive(serde::Serialize)]
        struct OldEvent<'a> {
            event_id: &'a str,
            event_type: crate::CommerceEventType,
            source_system: &'a str,
            source_version: &'a crate::SourceVersion,
            occurred_at: i64,
            produced_at: i64,
            customer_key: &'a str,
            store: &'a crate::StoreRef,
            order: Option<OldOrder<'a>>,
            customer: Option<&'a crate::Customer>,
        }
        let event = sample::order_placed(3);
        let o = event.order.as_ref().unwrap();
        let old_event = OldEvent {
            event_id: &event.event_id,
            event_type: event.event_type,
            source_system: &event.source_system,
            source_version: &event.source_version,
            occurred_at: event.occurred_at,
            produced_at: event.produced_at,
            customer_key: &event.customer_key,
            store: &event.store,
            order: Some(OldOrder {
                entity_id: o.entity_id,
                increment_id: &o.increment_id,
                state: &o.state,
                status: &o.status,
                currency: &o.currency,
                created_at: o.created_at,
                totals: &o.totals,
                items: &o.items,
                billing_address: o.billing_address.as_ref(),
                shipping_address: o.shipping_address.as_ref(),
                payment_method: o.payment_method.as_deref(),
                shipping_method: o.shipping_method.as_deref(),
            }),
            customer: event.customer.as_ref(),
        };
        let body = encode_body_with(&old_schema, &old_event).unwrap();
        let back: CommerceEvent = decode_with(&decoding_schema(&old.to_string()).unwrap(), &body).unwrap();
        let mut expected = event.clone();
        expected.order.as_mut().unwrap().inventory_status = crate::InventoryStatus::Unchecked;
        assert_eq!(back, expected);
    }

    #[test]
    fn decimals_of_any_byte_length_decode() {
        use apache_avro::types::Value;
        // Other writers use the shortest two's complement: 20.14 is [0x03, 0x12, 0xb8].
        let writer = decoding_schema(schema::INVENTORY_EVENT_AVSC).unwrap();
        for (bytes, expected) in [(vec![0x03u8, 0x12, 0xb8], 201_400i64), (vec![0xff], -1), (vec![], 0)] {
            let record = Value::Record(vec![
                ("event_id".into(), Value::String("e".into())),
                ("event_type".into(), Value::Enum(2, "OVERSOLD".into())),
                ("source_system".into(), Value::String("magento".into())),
                ("sku".into(), Value::String("SKU-1".into())),
                ("stock_id".into(), Value::Int(1)),
                ("salable_qty".into(), Value::Bytes(bytes.clone())),
                ("low_stock_threshold".into(), Value::Union(1, Box::new(Value::Bytes(vec![0x01])))),
                ("order_increment_id".into(), Value::Union(0, Box::new(Value::Null))),
                ("occurred_at".into(), Value::Long(1)),
                ("produced_at".into(), Value::Long(2)),
            ]);
            let body = GenericDatumWriter::builder(&writer).build().unwrap().write_value_to_vec(record).unwrap();
            let event: InventoryEvent = decode_with(&writer, &body).unwrap();
            assert_eq!(event.salable_qty.unscaled(), expected, "{bytes:?}");
            assert_eq!(event.low_stock_threshold.map(|d| d.unscaled()), Some(1));
            assert_eq!(event.event_type, crate::InventoryEventType::Oversold);
        }
    }

    #[test]
    fn registry_failures_are_classified_by_status() {
        let failed = |status: &str, retriable: bool| {
            CodecError::from_src(SRCError::new(
                &format!("HTTP request to schema registry failed with status {status}"),
                Some("body".into()),
                retriable,
            ))
            .class()
        };
        assert_eq!(failed("500 Internal Server Error", false), CodecErrorClass::Unavailable);
        assert_eq!(failed("504 Gateway Timeout", false), CodecErrorClass::Unavailable);
        assert_eq!(failed("503 Service Unavailable", true), CodecErrorClass::Unavailable);
        assert_eq!(failed("429 Too Many Requests", false), CodecErrorClass::RateLimited);
        assert_eq!(failed("401 Unauthorized", false), CodecErrorClass::Auth);
        assert_eq!(failed("403 Forbidden", false), CodecErrorClass::Auth);
        assert_eq!(failed("404 Not Found", false), CodecErrorClass::Unavailable, "a proxy's 404");
        let unknown_schema = CodecError::from_src(SRCError::new(
            "HTTP request to schema registry failed with status 404 Not Found",
            Some("error_code: 40403, message: Schema not found".into()),
            false,
        ));
        assert_eq!(unknown_schema.class(), CodecErrorClass::Undecodable);
        let transport = CodecError::from_src(SRCError::new("error sending request for url", None, false));
        assert_eq!(transport.class(), CodecErrorClass::Unavailable);
    }

    #[tokio::test]
    async fn a_registry_that_answers_500_is_not_bad_data() {
        // A registry answering 500 (e.g. restarting) with an empty schema cache: the record is
        // fine and must be retried, not parked.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let body = r#"{"error_code":50001,"message":"store not ready"}"#;
                    let reply = format!(
                        "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        });
        let codec = EventCodec::new(&RegistryConfig::local(format!("http://{addr}"))).unwrap();
        let framed = frame(42, &encode_body(&sample::order_placed(1)).unwrap());
        let err = codec.decode::<CommerceEvent>(&framed).await.unwrap_err();
        assert_eq!(err.class(), CodecErrorClass::Unavailable, "{err}");
    }

    #[test]
    fn garbage_is_a_permanent_error() {
        assert!(matches!(unframe(&[1, 0, 0, 0, 1, 2]), Err(CodecError::Framing(_))));
        assert!(matches!(unframe(&[0, 0]), Err(CodecError::Framing(_))));
        let err = decode_with::<CommerceEvent>(CommerceEvent::decoding_schema(), &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(!err.is_retriable());
    }

    /// A registry that answers every request with schema id 7, counting requests.
    async fn fake_registry() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    let mut read = 0;
                    // Headers, then the body its content-length announces.
                    loop {
                        let Ok(n) = stream.read(&mut buf[read..]).await else { return };
                        if n == 0 {
                            return;
                        }
                        read += n;
                        let text = String::from_utf8_lossy(&buf[..read]).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                                .unwrap_or(0usize);
                            if read >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = r#"{"id":7}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.schemaregistry.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        (url, count)
    }

    #[tokio::test]
    async fn encoding_with_our_registered_schema_writes_what_the_slow_path_wrote() {
        let (url, requests) = fake_registry().await;
        let codec = EventCodec::new(&RegistryConfig::local(url)).unwrap();
        for n in 0..3 {
            let event = sample::order_placed(n);
            let framed = codec.encode("commerce.events", &event).await.unwrap();
            assert_eq!(framed, frame(7, &encode_body_with(CommerceEvent::schema(), &event).unwrap()));
            let (id, body) = unframe(&framed).unwrap();
            assert_eq!((id, decode_direct::<CommerceEvent>(body).unwrap()), (7, event));
        }
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1, "registered once");
        // Another topic is another subject: registered on its own.
        codec.encode("other.events", &sample::order_placed(9)).await.unwrap();
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
