//! Elo's event contracts: the Avro schemas in `schemas/`, their Rust types, deterministic
//! ids and the Confluent wire-format codec backed by a Schema Registry.
//!
//! # Layout
//! - [`schema`]: the checked-in `.avsc` files, embedded and parsed once; topic defaults.
//! - [`types`]: Rust mirrors of the schemas ([`CommerceEvent`], [`InventoryEvent`],
//!   [`SyncOutcome`], [`IntegrationCommand`]).
//! - [`money`]: [`Decimal4`], money and quantities as Avro `decimal(18,4)`, never a float.
//! - [`ids`]: deterministic event ids and customer keys.
//! - [`resend`]: what a `RESEND` command names and the refetch that completes it.
//! - [`codec`]: Confluent framing (magic byte 0, 4-byte schema id, Avro binary) with a
//!   registry client, subject naming by TopicNameStrategy.
//!
//! # Why `schema_registry_converter`
//! It is the maintained Rust client for Confluent-compatible registries on top of
//! `apache-avro` (registration, lookup by subject or id, caching, framing). We use it for the
//! registry round-trips and framing, and decode with `apache-avro`'s writer/reader schema
//! resolution ourselves so that readers with a newer or older schema than the writer's get
//! Avro's evolution rules (defaults, ignored fields, enum defaults) rather than a plain decode.

pub mod codec;
pub mod ids;
pub mod money;
pub mod resend;
pub mod sample;
pub mod schema;
pub mod time;
pub mod types;

pub use codec::{CodecError, CodecErrorClass, EventCodec, RegistryConfig};
pub use money::Decimal4;
pub use schema::AvroEvent;
pub use types::*;
