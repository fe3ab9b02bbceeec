//! The checked-in Avro schemas, embedded at build time and parsed once.

use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;

/// `schemas/commerce.events.avsc`.
pub const COMMERCE_EVENT_AVSC: &str = include_str!("../../../schemas/commerce.events.avsc");
/// `schemas/inventory.events.avsc`.
pub const INVENTORY_EVENT_AVSC: &str = include_str!("../../../schemas/inventory.events.avsc");
/// `schemas/integration.outcomes.avsc`.
pub const SYNC_OUTCOME_AVSC: &str = include_str!("../../../schemas/integration.outcomes.avsc");
/// `schemas/integration.commands.avsc`.
pub const INTEGRATION_COMMAND_AVSC: &str = include_str!("../../../schemas/integration.commands.avsc");

/// A type carried on a topic as Avro: its schema and the topic it lives on by default.
pub trait AvroEvent: serde::Serialize + serde::de::DeserializeOwned + Send + Sync {
    /// The schema as checked in (what gets registered).
    const AVSC: &'static str;
    /// Default topic name (configurable per deployment).
    const DEFAULT_TOPIC: &'static str;
    /// The parsed schema (what Elo writes with).
    fn schema() -> &'static Schema;
    /// The schema Elo reads with: decimals as plain bytes, see [`crate::codec::decoding_schema`].
    fn decoding_schema() -> &'static Schema;
    /// Canonical form of [`AvroEvent::decoding_schema`], to spot writers that need no resolution.
    fn decoding_canonical() -> &'static str;
    /// A reader for data written with exactly our schema: deserialises straight from Avro
    /// binary into `Self`, with no value tree and no resolution (the common, fast case).
    fn direct_reader() -> &'static GenericDatumReader<'static>;
    /// A writer with our schema, built once: its name index is not rebuilt per record.
    fn direct_writer() -> &'static GenericDatumWriter<'static>;
}

macro_rules! avro_event {
    ($ty:ty, $avsc:expr, $topic:expr) => {
        impl AvroEvent for $ty {
            const AVSC: &'static str = $avsc;
            const DEFAULT_TOPIC: &'static str = $topic;
            fn schema() -> &'static Schema {
                static SCHEMA: LazyLock<Schema> =
                    LazyLock::new(|| Schema::parse_str($avsc).expect("checked-in schema parses (tested)"));
                &SCHEMA
            }
            fn decoding_schema() -> &'static Schema {
                static SCHEMA: LazyLock<Schema> =
                    LazyLock::new(|| crate::codec::decoding_schema($avsc).expect("checked-in schema parses (tested)"));
                &SCHEMA
            }
            fn decoding_canonical() -> &'static str {
                static CANONICAL: LazyLock<String> = LazyLock::new(|| <$ty>::decoding_schema().canonical_form());
                &CANONICAL
            }
            fn direct_reader() -> &'static GenericDatumReader<'static> {
                static READER: LazyLock<GenericDatumReader<'static>> = LazyLock::new(|| {
                    GenericDatumReader::builder(<$ty>::decoding_schema())
                        .build()
                        .expect("checked-in schema resolves (tested)")
                });
                &READER
            }
            fn direct_writer() -> &'static GenericDatumWriter<'static> {
                static WRITER: LazyLock<GenericDatumWriter<'static>> = LazyLock::new(|| {
                    GenericDatumWriter::builder(<$ty>::schema()).build().expect("checked-in schema resolves (tested)")
                });
                &WRITER
            }
        }
    };
}

avro_event!(crate::CommerceEvent, COMMERCE_EVENT_AVSC, "commerce.events");
avro_event!(crate::InventoryEvent, INVENTORY_EVENT_AVSC, "inventory.events");
avro_event!(crate::SyncOutcome, SYNC_OUTCOME_AVSC, "integration.outcomes");
avro_event!(crate::IntegrationCommand, INTEGRATION_COMMAND_AVSC, "integration.commands");

/// Every schema with its default topic, for provisioning and compatibility checks.
pub const ALL: &[(&str, &str)] = &[
    ("commerce.events", COMMERCE_EVENT_AVSC),
    ("inventory.events", INVENTORY_EVENT_AVSC),
    ("integration.outcomes", SYNC_OUTCOME_AVSC),
    ("integration.commands", INTEGRATION_COMMAND_AVSC),
];
