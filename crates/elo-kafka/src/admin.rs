//! Topic provisioning. Tansu (and many managed clusters) do not auto-create topics, so every
//! service makes sure its topics exist at startup, with the configured partitions and configs.

use std::time::Duration;

use elo_telemetry::Health;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;

use crate::producer::{AUTH_CHECK, ConnectionContext};
use crate::{Error, KafkaArgs, Result};

/// A topic to provision.
#[derive(Clone, Debug)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
    /// Topic configs, e.g. `("cleanup.policy", "compact")` for state topics.
    pub configs: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self { name: name.into(), partitions, replication: 1, configs: Vec::new() }
    }
    pub fn with_replication(mut self, replication: i32) -> Self {
        self.replication = replication;
        self
    }
    pub fn with_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.configs.push((key.into(), value.into()));
        self
    }
    /// A compacted topic (checkpoints, per-key state).
    pub fn compacted(self) -> Self {
        self.with_config("cleanup.policy", "compact")
    }
}

/// Creates the topics that do not exist yet; existing ones are left as they are.
/// Returns the names it created. Connection problems (refused credentials) are reported on
/// `health` as they happen.
pub async fn ensure_topics(
    args: &KafkaArgs,
    topics: &[TopicSpec],
    timeout: Duration,
    health: &Health,
) -> Result<Vec<String>> {
    let admin: AdminClient<ConnectionContext> =
        args.client_config(&[])?.create_with_context(ConnectionContext::new(health.clone(), "kafka_topics"))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            t.configs
                .iter()
                .fold(NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(t.replication)), |nt, (k, v)| {
                    nt.set(k, v)
                })
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
    let results = admin.create_topics(new_topics.iter(), &options).await?;
    health.set_ready(AUTH_CHECK, true, "credentials accepted");
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, "topic created");
                created.push(name);
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Error::TopicCreation { topic: name, reason: code.to_string() });
            }
        }
    }
    Ok(created)
}
