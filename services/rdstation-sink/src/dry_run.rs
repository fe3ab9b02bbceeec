//! `rdstation-sink rules dry-run`: which contacts a rules file would change, and how, computed
//! from the per-customer state in Kafka (the changelog) and written nowhere.

use std::collections::BTreeSet;
use std::time::Duration;

use elo_kafka::{Producer, StateStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

use crate::aggregates::CustomerState;
use crate::contacts;
use crate::rules::Rules;

/// The changes the rules call for on one contact (empty: nothing to do). Tags are added, and
/// removed only when Elo added them (`-tag`); fields the mapping writes (lifetime value, last order) change with orders, not rules,
/// and are listed too when they differ.
pub fn changes(state: &CustomerState, rules: &Rules, now_ms: i64) -> Vec<String> {
    if state.identity.email.is_empty() {
        // No contact is written without an e-mail (a guest order without one, an erasure floor).
        return Vec::new();
    }
    let aggregate = state.aggregate(now_ms);
    let desired = contacts::desired(state, &aggregate, &rules.evaluate(&aggregate));
    let mut out = Vec::new();
    for tag in desired.tags.difference(&state.applied.tags) {
        out.push(format!("+tag {tag}"));
    }
    if state.contact_uuid.is_some() {
        for tag in contacts::tags_to_remove(state, &desired) {
            out.push(format!("-tag {tag}"));
        }
    }
    if let Some(stage) = &desired.stage
        && state.applied.stage.as_ref() != Some(stage)
    {
        out.push(format!("stage {} -> {stage}", state.applied.stage.as_deref().unwrap_or("-")));
    }
    let keys: BTreeSet<&String> = desired.fields.keys().chain(state.applied.fields.keys()).collect();
    for key in keys {
        if key == "email" || key == "mobile_phone" {
            continue;
        }
        let (old, new) = (state.applied.fields.get(key), desired.fields.get(key));
        if old != new {
            let show = |v: Option<&Value>| v.map_or("-".to_owned(), Value::to_string);
            out.push(format!("{key} {} -> {}", show(old), show(new)));
        }
    }
    out
}

/// Restores every partition of the state changelog and prints the changes.
pub async fn run(config: &crate::Config) -> anyhow::Result<()> {
    let rules = config.rd.rules()?;
    let kafka = &config.common.kafka;
    let topic = config.rd.state_topic.clone();
    let partitions = {
        let consumer: BaseConsumer = kafka.client_config(&[])?.create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        metadata.topics().first().map_or(0, |t| t.partitions().len() as i32)
    };
    anyhow::ensure!(partitions > 0, "state topic {topic} not found: has the sink run yet?");
    let producer = Producer::new(kafka, elo_telemetry::Health::new())?;
    let store: StateStore<CustomerState> = StateStore::new(kafka, producer, topic);
    let now = crate::handler::now_ms();
    let (mut total, mut changed) = (0usize, 0usize);
    for partition in 0..partitions {
        tokio::task::block_in_place(|| store.restore(partition))?;
        let mut entries = store.entries(partition);
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        // The partition's rules marker is no contact.
        for (key, state) in entries.into_iter().filter(|(k, _)| k != crate::handler::RULES_MARKER) {
            total += 1;
            let diff = changes(&state, &rules, now);
            if !diff.is_empty() {
                changed += 1;
                println!("{key} ({}): {}", elo_telemetry::redact::email(&state.identity.email), diff.join("; "));
            }
        }
    }
    println!("{changed} of {total} contacts would change");
    Ok(())
}

#[cfg(test)]
mod tests {
    use elo_events::sample;

    use super::*;

    #[test]
    fn lists_only_what_the_new_rules_change() {
        let mut state = CustomerState::default();
        state.apply(&sample::order_placed(1));
        let old =
            Rules::parse("[[rule]]\nname = \"b\"\nwhen = { frequency_gte = 1 }\ntags = [\"buyer\"]\n", "t").unwrap();
        let agg = state.aggregate(0);
        let d = contacts::desired(&state, &agg, &old.evaluate(&agg));
        state.applied.fields = d.fields;
        state.applied.tags = d.tags;
        assert!(changes(&state, &old, 0).is_empty(), "in step with the rules in use");
        let new = Rules::parse(
            "[[rule]]\nname = \"b\"\nwhen = { frequency_gte = 1 }\ntags = [\"buyer\", \"fan\"]\nstage = \"Client\"\nfields = { cf_seg = \"x\" }\n",
            "t",
        )
        .unwrap();
        assert_eq!(changes(&state, &new, 0), ["+tag fan", "stage - -> Client", "cf_seg - -> \"x\""]);
    }
}
