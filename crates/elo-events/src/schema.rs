//! The checked-in Avro schemas, embedded at build time and parsed once.

use std::sync::LazyLock;

use apache_avro::Schema;

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
