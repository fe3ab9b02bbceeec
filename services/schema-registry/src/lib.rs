//! A Confluent-compatible Schema Registry for local runs and tests.
//!
//! Production uses a real registry (Confluent, Karapace, Apicurio, Redpanda) by URL; this one
//! exists so `make run` and the tests need no JVM. It implements the subset of the Confluent
//! REST API that serializers and operators use: subjects and versions, global ids shared by
//! identical schemas, lookup by id, compatibility levels (global and per subject, including
//! transitive ones) checked with `apache-avro`'s schema-compatibility rules, and deletes.
//! State lives in memory and, with `--data-file`, in a JSON file rewritten atomically on every
//! change so a restart keeps ids stable.
//!
//! # Layout
//! - [`store`]: subjects, versions, ids, compatibility.
//! - [`api`]: the HTTP routes and the Confluent error bodies (`{"error_code","message"}`).

pub mod api;
pub mod store;
